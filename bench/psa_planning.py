"""PSA planning time: budget mode against the quantile and threshold modes, interleaved.

``plan_psa`` alone (importance estimate + level allocation + packing) on video-like attention
(``video_attention_qkv``, 4 heads, D = 64, float32; on a GPU bfloat16, where the estimate runs
on its Triton kernel), for block sizes 64 and 128. The modes run
in turn within every repeat, in a fresh random order each time (a fixed order let the mode
that ran first after another pay for its caches: two modes with the same estimate differed by
5 ms in one run), so a shared machine's load hits them alike; reported per mode: median wall
and process CPU time, and the median of the per-repeat ratios budget / quantile and budget /
threshold. Then the parts, interleaved the same way (wall time
medians): the importance estimate alone against the budget mode's (importance, spread and
variance), each as ``plan_psa`` runs it (on the CPU at these sizes: every chunk of sampled
logits reduced by one compiled function) and with eager torch's reductions, the quantile
mode's allocation against the budget mode's, and the budget allocation's sort of its keys as
it runs (numpy's on the CPU) against ``torch.sort`` of the same keys.

    python bench/psa_planning.py                          # writes bench/results/psa_planning_cpu.json
    python bench/psa_planning.py --tokens 8192 --repeats 5 --threads 1 --out /tmp/p.json
    python bench/psa_planning.py --device cuda --tokens 32768 --out bench/results/psa_planning_gpu.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from vdiff_sparse.benchmarks.meta import command_line, run_metadata, write_json

GRIDS = {8192: (8, 32, 32), 16384: (16, 32, 32), 32768: (32, 32, 32)}
MODES = {
    "quantile": dict(mode="quantile", fractions={1: 0.125}),
    "threshold": {},
    "budget": dict(mode="budget", density=0.125),
}


def time_parts(q, k, grid, configs, repeats: int, sync) -> dict:
    """Median wall seconds of the estimates and the allocations of the quantile and budget
    configs (the steps ``plan_psa`` runs, on the same inputs)."""
    from vdiff_sparse.layout import uniform_offsets
    from vdiff_sparse.methods import psa
    from vdiff_sparse.methods.psa_budget import (
        head_variation_ratio,
        move_keys,
        sampled_estimates,
        sorted_keys,
    )
    from vdiff_sparse.methods.psa_importance import importance_matmul_dtype, sampled_importance

    quantile, budget = configs["quantile"], configs["budget"]
    n = q.shape[1]
    offsets = uniform_offsets(n, budget.block_q).to(q.device)
    samples = max(1, budget.block_q // 4)
    args = (q, k, psa._order(grid, n, budget, q.device), offsets, offsets, samples, samples, q.shape[-1] ** -0.5,
            importance_matmul_dtype(budget, q))
    importance, spread, variance = sampled_estimates(*args)
    coarse, fine = torch.tensor(8, device=q.device), torch.tensor(1, device=q.device)  # every level allowed
    rho = head_variation_ratio(importance, spread, variance).expand(*importance.shape[:-1], 1)
    nkb = importance.shape[-1]
    keys = move_keys(importance.reshape(-1, nkb), spread.reshape(-1, nkb), rho.reshape(-1, 1), offsets.diff(), coarse,
                     fine, 32 - (2 * nkb - 1).bit_length())
    parts = {  # as plan_psa runs them; "_eager": each chunk reduced by eager torch (on a GPU: the same)
        "importance_estimate": lambda: sampled_importance(*args),
        "budget_estimate": lambda: sampled_estimates(*args),
        "importance_estimate_eager": lambda: sampled_importance(*args, fused=False),
        "budget_estimate_eager": lambda: sampled_estimates(*args, fused=False),
        "quantile_allocation": lambda: psa.allocate_levels(importance, quantile),
        "budget_allocation": lambda: psa._budget_levels(importance, spread, variance, None, offsets, budget, n),
        # The allocation's sort alone: as it runs (numpy's on the CPU) and by torch.sort.
        "budget_sort": lambda: sorted_keys(keys),
        "budget_sort_torch": lambda: keys.sort(dim=-1),
    }
    times = {name: [] for name in parts}
    shuffle = random.Random(n)
    for _ in range(repeats):
        for name in shuffle.sample(list(parts), len(parts)):
            part = parts[name]
            sync()
            start = time.perf_counter()
            part()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, choices=sorted(GRIDS))
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bfloat16 inputs there)")
    parser.add_argument("--out", default=None, help="JSON path (default results/psa_planning_<cpu|gpu>.json)")
    args = parser.parse_args()
    if args.out is None:
        kind = "gpu" if args.device.startswith("cuda") else "cpu"
        args.out = str(Path(__file__).parent / "results" / f"psa_planning_{kind}.json")
    if args.threads:
        torch.set_num_threads(args.threads)

    from vdiff_sparse.methods.psa import PSAConfig, plan_psa
    from vdiff_sparse.methods.psa_importance import importance_matmul_dtype
    from vdiff_sparse.video_attention_data import video_attention_qkv

    grid = GRIDS[args.tokens]
    q, k, _ = video_attention_qkv(grid, heads=4, head_dim=64)
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    q, k = q.to(args.device, dtype), k.to(args.device, dtype)

    def sync():  # a GPU's work is done when the clock is read
        if cuda:
            torch.cuda.synchronize()
    results = []
    for block in args.blocks:
        configs = {name: PSAConfig(block_q=block, block_k=block, **options) for name, options in MODES.items()}
        wall = {name: [] for name in configs}
        cpu = {name: [] for name in configs}
        first_call = {}
        for name, config in configs.items():  # warm-up; on the CPU budget mode's first large call compiles
            sync()
            start = time.perf_counter()
            plan_psa(q, k, grid, config)
            sync()
            first_call[name] = time.perf_counter() - start
        shuffle = random.Random(block)
        for _ in range(args.repeats):
            for name in shuffle.sample(list(configs), len(configs)):
                config = configs[name]
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                plan_psa(q, k, grid, config)
                sync()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        row = {"block": block, "first_call_wall_s": first_call}
        for name in configs:
            row[name] = {"wall_s": statistics.median(wall[name]), "cpu_s": statistics.median(cpu[name])}
        for base in ("quantile", "threshold"):
            for clock, times in (("wall", wall), ("cpu", cpu)):
                row[f"budget_over_{base}_{clock}"] = statistics.median(
                    b / a for a, b in zip(times[base], times["budget"]))
        row["parts_wall_s"] = time_parts(q, k, grid, configs, args.repeats, sync)
        results.append(row)
        print(f"block {block}: parts " + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in row["parts_wall_s"].items()))
        print(f"block {block}: " + ", ".join(f"{n} {row[n]['wall_s'] * 1e3:.1f} ms" for n in configs)
              + f"; budget / quantile {row['budget_over_quantile_wall']:.3f} (cpu {row['budget_over_quantile_cpu']:.3f}),"
              f" budget / threshold {row['budget_over_threshold_wall']:.3f} (cpu {row['budget_over_threshold_cpu']:.3f})",
              flush=True)
    write_json(args.out, {
        "benchmark": "psa_planning",
        **run_metadata(command_line()),
        "shape": {"grid": list(grid), "tokens": args.tokens, "heads": 4, "head_dim": 64,
                  "dtype": str(dtype).removeprefix("torch."), "device": args.device,
                  "data": "video_attention_qkv(seed=0)",
                  "importance_dtype": str(importance_matmul_dtype(PSAConfig(), q)).removeprefix("torch.")},
        "timing": f"{args.repeats} repeats, the modes in a random order in each, after one warm-up each "
                  "(first_call_wall_s: the warm-up, compiling included); medians",
        "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
