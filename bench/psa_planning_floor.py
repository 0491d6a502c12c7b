"""What budget mode's planning must cost over the quantile mode's on the CPU, part by part.

``bench/psa_planning.py`` times the library as it is: budget mode's estimate and allocation
against the quantile mode's. This script asks how low the difference could go, on the same
data (``video_attention_qkv``, 16K tokens, 4 heads, D = 64):

* **Estimate.** The library's importance estimate and budget estimate (``sampled_importance``,
  ``sampled_estimates``: the sampled logits' matmuls, a chunk at a time, and their reductions),
  the matmuls alone, and the same matmuls with each chunk reduced by one ``torch.compile``-fused
  pass to the importance alone or to the importance, spread and variance (what a fused CPU
  kernel would run). The fused results are checked against the library's.
* **Allocation.** The stable sort each needs: one key per block pair (quantile) against two
  moves per block pair (budget), ``argsort`` over ``[rows, n_k_blocks]`` and ``[rows, 2 n_k_blocks]``.

    python bench/psa_planning_floor.py          # writes bench/results/psa_planning_floor_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from vdiff_sparse.benchmarks.meta import command_line, run_metadata, write_json

GRIDS = {8192: (8, 32, 32), 16384: (16, 32, 32)}


def importance_reduction(logits: torch.Tensor) -> torch.Tensor:
    """A chunk ``[blocks, sq, sk, nkb]`` -> unnormalised importance ``[blocks, nkb]``
    (``psa_importance.chunk_importance``)."""
    block_max = logits.amax(2).float()
    return (block_max - block_max.amax(-1, keepdim=True)).exp().amax(-2)


def budget_reduction(logits: torch.Tensor, q_spread: int, pairs: int):
    """The importance plus the spread's sum of squared pair differences over the first
    ``q_spread`` query samples and the first query's variance (``psa_budget.sampled_estimates``)."""
    picked = logits[:, :q_spread]
    difference = (picked[:, :, :pairs] - picked[:, :, pairs : 2 * pairs]).float()
    first = logits[:, 0].float()
    variance = (first - first.mean(1, keepdim=True)).square().mean(1)
    return importance_reduction(logits), difference.square().sum((1, 2)), variance


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, choices=sorted(GRIDS))
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "psa_planning_floor_cpu.json"))
    args = parser.parse_args()

    from vdiff_sparse.layout import uniform_offsets
    from vdiff_sparse.methods import psa
    from vdiff_sparse.methods.psa_budget import SPREAD_QUERY_STRIDE, sampled_estimates
    from vdiff_sparse.methods.psa_importance import importance_matmul_dtype, sampled_importance, sampled_logit_chunks
    from vdiff_sparse.video_attention_data import video_attention_qkv

    grid = GRIDS[args.tokens]
    q, k, _ = video_attention_qkv(grid, heads=4, head_dim=64)
    n = q.shape[1]
    results = []
    for block in args.blocks:
        config = psa.PSAConfig(mode="budget", density=0.125, block_q=block, block_k=block)
        offsets = uniform_offsets(n, block)
        samples = max(1, block // 4)
        q_spread, pairs = len(range(0, samples, SPREAD_QUERY_STRIDE)), samples // 2
        args_ = (q, k, psa._order(grid, n, config, q.device), offsets, offsets, samples, samples,
                 q.shape[-1] ** -0.5, importance_matmul_dtype(config, q))

        def chunks():  # the budget mode's sample order; the importance does not depend on it
            return sampled_logit_chunks(*args_, q_sample_stride=SPREAD_QUERY_STRIDE, k_pairs_first=True)

        compiled_importance = torch.compile(importance_reduction, dynamic=False)
        compiled_budget = torch.compile(budget_reduction, dynamic=False)
        start = time.perf_counter()
        fused = [(r, b0, b1, compiled_importance(logits), compiled_budget(logits, q_spread, pairs))
                 for r, b0, b1, logits in chunks()]
        compile_s = time.perf_counter() - start
        importance, spread, variance = sampled_estimates(*args_)  # the library's, normalised
        fused_importance = torch.empty_like(importance)
        for r, b0, b1, alone, (with_stats, spread_sum, var) in fused:
            torch.testing.assert_close(alone, with_stats)
            fused_importance[r, b0:b1] = alone
            torch.testing.assert_close(var, variance[r, b0:b1], rtol=1e-4, atol=1e-5)
            # The library rounds each pair difference to the logits' bfloat16; inductor subtracts
            # in float32: equal up to that rounding (2**-8 relative).
            torch.testing.assert_close(spread_sum / (q_spread * pairs), spread[r, b0:b1], rtol=1e-2, atol=1e-4)
        torch.testing.assert_close(fused_importance / fused_importance.sum(-1, keepdim=True), importance)

        def loop(reduce):
            return lambda: [reduce(logits) for _, _, _, logits in chunks()]

        estimates = {
            "matmul_only": loop(lambda logits: None),
            "importance_library": lambda: sampled_importance(*args_),
            "budget_library": lambda: sampled_estimates(*args_),
            "importance_fused": loop(compiled_importance),
            "budget_fused": loop(lambda logits: compiled_budget(logits, q_spread, pairs)),
        }
        nkb = offsets.numel() - 1
        rows = importance.view(-1, nkb)
        moves = torch.cat([rows, rows * 0.5], -1)
        sorts = {
            "one_key_per_pair": lambda: rows.argsort(dim=-1, descending=True, stable=True),
            "two_moves_per_pair": lambda: moves.argsort(dim=-1, descending=True, stable=True),
        }
        times = {name: [] for name in (*estimates, *sorts)}
        for fn in (*estimates.values(), *sorts.values()):
            fn()  # warm-up
        for _ in range(args.repeats):  # interleaved
            for name, fn in (*estimates.items(), *sorts.items()):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        row = {"block": block, "estimate_ms": {name: ms[name] for name in estimates},
               "sort_ms": {name: ms[name] for name in sorts}, "compile_s": compile_s,
               "budget_extra_ms": {"estimate_library": ms["budget_library"] - ms["importance_library"],
                                   "estimate_fused": ms["budget_fused"] - ms["importance_fused"],
                                   "sort": ms["two_moves_per_pair"] - ms["one_key_per_pair"]}}
        results.append(row)
        print(f"block {block}: " + ", ".join(f"{name} {t:.1f} ms" for name, t in ms.items()), flush=True)
    write_json(args.out, {
        "benchmark": "psa_planning_floor",
        **run_metadata(command_line()),
        "shape": {"grid": list(grid), "tokens": args.tokens, "heads": 4, "head_dim": 64, "dtype": "float32",
                  "device": "cpu", "data": "video_attention_qkv(seed=0)", "importance_dtype": "auto"},
        "timing": f"{args.repeats} interleaved repeats after a warm-up; medians. Estimates: the sampled logits' "
                  "matmuls and their reductions (library: as plan_psa runs them; fused: torch.compile'd, the matmuls "
                  "the library's); sorts: stable argsort over every row",
        "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
