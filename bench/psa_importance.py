"""PSA's importance estimate in float32 vs bfloat16: its time, and what the plan and output lose.

On video-like attention (``video_attention_qkv``, 4 heads, D = 64, float32) at 16K tokens, for
three PSA settings (quantile at 12.5% full blocks, the threshold defaults, levels 1/2/4 in
quantile mode), per ``importance_dtype``: the median time of ``plan_psa`` (the estimate plus
level allocation), the share of the float32 plan's (key block, level) entries the plan keeps,
and the output's relative error against dense attention (torch backend).

    python bench/psa_importance.py                       # writes bench/results/psa_importance.json
    python bench/psa_importance.py --tokens 8192 --out /tmp/x.json

bfloat16 is only fast where the hardware multiplies it (AVX512-BF16 / AMX CPUs, GPUs of compute
capability 8+); elsewhere its timing here shows the emulation's cost, which ``"auto"`` avoids.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vdiff_sparse.benchmarks.meta import command_line, median_time, run_metadata, write_json

GRIDS = {8192: (8, 32, 32), 16384: (16, 32, 32)}
SETTINGS = {
    "quantile-0.125": dict(mode="quantile", fractions={1: 0.125}),
    "threshold-defaults": {},
    "quantile-levels-1-2-4": dict(mode="quantile", fractions={1: 0.0625, 2: 0.0625, 4: 0.125}),
}
DTYPES = ("float32", "bfloat16")


def entries(plan) -> list[set[tuple[int, int]]]:
    """Per (batch, head, query block) row, its set of (key block, level) entries."""
    index = plan.kv_index.reshape(-1, plan.kv_index.shape[-1]).tolist()
    level = plan.kv_level.reshape(-1, plan.kv_level.shape[-1]).tolist()
    return [{(i, p) for i, p in zip(ri, rl) if i >= 0} for ri, rl in zip(index, level)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, choices=sorted(GRIDS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "psa_importance.json"))
    args = parser.parse_args()

    from vdiff_sparse import dense_attention
    from vdiff_sparse.attention import run_plan
    from vdiff_sparse.methods.psa import PSAConfig, importance_matmul_dtype, plan_psa
    from vdiff_sparse.video_attention_data import video_attention_qkv

    grid = GRIDS[args.tokens]
    q, k, v = video_attention_qkv(grid, heads=4, head_dim=64)
    with torch.no_grad():
        reference = dense_attention(q, k, v).double()
        results = []
        for name, overrides in SETTINGS.items():
            plans = {}
            for dtype in DTYPES:
                config = PSAConfig(**overrides, importance_dtype=dtype)
                plan = plan_psa(q, k, grid, config)
                seconds = median_time(lambda: plan_psa(q, k, grid, config), args.repeats)
                out = run_plan(q, k, v, plan, backend="torch").double()
                error = float((out - reference).norm() / reference.norm())
                plans[dtype] = plan
                kept = sum(len(a & b) for a, b in zip(entries(plans["float32"]), entries(plan)))
                total = sum(len(a) for a in entries(plans["float32"]))
                row = dict(setting=name, importance_dtype=dtype, plan_s=seconds,
                           flop_density=float(plan.density()), relative_error=error,
                           float32_entries_kept=kept / total)
                results.append(row)
                print(f"{name:24s} {dtype:9s} plan {seconds * 1e3:7.1f} ms  density "
                      f"{row['flop_density']:.3f}  error vs dense {error:.4f}  "
                      f"float32 entries kept {row['float32_entries_kept']:.4f}", flush=True)
    write_json(args.out, {
        "benchmark": "psa_importance",
        **run_metadata(command_line()),
        "shape": {"grid": list(grid), "tokens": args.tokens, "heads": 4, "head_dim": 64, "dtype": "float32",
                  "data": "video_attention_qkv(seed=0)"},
        "auto_resolves_to": str(importance_matmul_dtype(PSAConfig(), q)).removeprefix("torch."),
        "timing": f"median of {args.repeats} plan_psa calls after one warm-up",
        "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
