"""What budget mode's planning must cost over the quantile mode's on the CPU, part by part.

``bench/psa_planning.py`` times the library as it is: budget mode's estimate and allocation
against the quantile mode's. This script asks how low the difference could go, on the same
data (``video_attention_qkv``, 16K tokens, 4 heads, D = 64):

* **Estimate.** Each chunk of sampled logits (``sampled_logit_chunks``, in the budget mode's
  sample order) reduced to the importance alone and to the importance plus the spread and
  variance sums, eagerly (what the library runs) and as one ``torch.compile``-fused pass
  (what a fused CPU kernel would run). The compiled results are checked against the library's.
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
    picked = logits[:, :q_spread].float()
    difference = picked[:, :, :pairs] - picked[:, :, pairs : 2 * pairs]
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
    from vdiff_sparse.methods.psa_budget import SPREAD_QUERY_STRIDE
    from vdiff_sparse.methods.psa_importance import chunk_importance, importance_matmul_dtype, sampled_logit_chunks
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
        chunks = [(r, b0, b1, logits.clone()) for r, b0, b1, logits in sampled_logit_chunks(
            q, k, psa._order(grid, n, config, q.device), offsets, offsets, samples, samples, q.shape[-1] ** -0.5,
            importance_matmul_dtype(config, q), q_sample_stride=SPREAD_QUERY_STRIDE, k_pairs_first=True)]
        nqb = nkb = offsets.numel() - 1
        library = torch.empty(q.shape[0] * q.shape[2], nqb, nkb)
        for r, b0, b1, logits in chunks:
            chunk_importance(logits, torch.float32, library[r, b0:b1])
        compiled_importance = torch.compile(importance_reduction, dynamic=False)
        compiled_budget = torch.compile(budget_reduction, dynamic=False)
        start = time.perf_counter()
        fused = [compiled_budget(logits, q_spread, pairs) for _, _, _, logits in chunks]
        [compiled_importance(logits) for _, _, _, logits in chunks]
        compile_s = time.perf_counter() - start
        for (r, b0, b1, logits), (importance, spread, variance) in zip(chunks, fused):
            torch.testing.assert_close(importance, library[r, b0:b1], rtol=1e-5, atol=1e-6)
            eager = budget_reduction(logits, q_spread, pairs)
            torch.testing.assert_close(spread, eager[1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(variance, eager[2], rtol=1e-4, atol=1e-4)

        def over_chunks(fn):
            return lambda: [fn(logits) for _, _, _, logits in chunks]

        reductions = {
            "importance_eager": over_chunks(lambda l: chunk_importance(l, torch.float32, torch.empty(l.shape[0], nkb))),
            "budget_eager": over_chunks(lambda l: budget_reduction(l, q_spread, pairs)),
            "importance_compiled": over_chunks(compiled_importance),
            "budget_compiled": over_chunks(lambda l: compiled_budget(l, q_spread, pairs)),
        }
        rows = library.view(-1, nkb)
        moves = torch.cat([rows, rows * 0.5], -1)
        sorts = {
            "one_key_per_pair": lambda: rows.argsort(dim=-1, descending=True, stable=True),
            "two_moves_per_pair": lambda: moves.argsort(dim=-1, descending=True, stable=True),
        }
        times = {name: [] for name in (*reductions, *sorts)}
        for _ in range(args.repeats):  # interleaved
            for name, fn in (*reductions.items(), *sorts.items()):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        row = {"block": block, "chunks": len(chunks), "chunk_shape": list(chunks[0][3].shape),
               "reduction_ms": {name: medians[name] for name in reductions},
               "sort_ms": {name: medians[name] for name in sorts}, "compile_s": compile_s,
               "extra_ms": {"estimate_eager": medians["budget_eager"] - medians["importance_eager"],
                            "estimate_compiled": medians["budget_compiled"] - medians["importance_compiled"],
                            "sort": medians["two_moves_per_pair"] - medians["one_key_per_pair"]}}
        results.append(row)
        print(f"block {block}: " + ", ".join(f"{name} {t:.1f} ms" for name, t in medians.items()), flush=True)
    write_json(args.out, {
        "benchmark": "psa_planning_floor",
        **run_metadata(command_line()),
        "shape": {"grid": list(grid), "tokens": args.tokens, "heads": 4, "head_dim": 64, "dtype": "float32",
                  "device": "cpu", "data": "video_attention_qkv(seed=0)", "importance_dtype": "auto"},
        "timing": f"{args.repeats} interleaved repeats after a warm-up; medians; the reductions over every chunk "
                  "of the sampled logits (precomputed), the sorts over every row",
        "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
