"""The ``vdiff-sparse`` command line (also ``python -m vdiff_sparse``).

Subcommands:
    demo   the three methods on a synthetic video-attention problem: density, error and
           speed against dense SDPA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: plan caches, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def demo_methods(grid):
    """The demo's method settings, each at roughly 5-20% density on the default grid."""
    from . import gna_attention, psa_attention, vmoba_attention

    # Sliding tile attention (GNA with stride = tile, window = 3 tiles in h and w): perfectly
    # block-sparse, so no per-token mask work.
    tile = tuple(min(4, n) for n in grid)
    window = (tile[0], min(3 * tile[1], grid[1]), min(3 * tile[2], grid[2]))
    cube = tuple(min(c, n) for c, n in zip((2, 8, 8), grid))
    return {
        f"gna window={window} stride={tile}": lambda q, k, v: gna_attention(
            q, k, v, grid, window=window, stride=tile, tile=tile, return_plan=True
        ),
        "psa threshold (default)": lambda q, k, v: psa_attention(q, k, v, grid, return_plan=True),
        f"vmoba top-6 local, cubes {cube}": lambda q, k, v: vmoba_attention(
            q, k, v, grid, layer_index=2, block_3d=cube, topk=6, return_plan=True
        ),
    }


def run_demo(args) -> int:
    from .attention import dense_attention
    from .synthetic import video_qkv

    torch.manual_seed(0)
    grid = tuple(args.grid)
    q, k, v = video_qkv(grid, args.heads, args.head_dim, seed=args.seed)
    n = q.shape[1]
    print(f"synthetic video attention: grid {grid} = {n} tokens, {args.heads} heads x "
          f"{args.head_dim}, float32, {torch.get_num_threads()} CPU threads")
    with torch.no_grad():
        dense = dense_attention(q, k, v)
        t_dense = _median_time(lambda: dense_attention(q, k, v), args.repeats)
        rows = [("dense SDPA", 1.0, 0.0, 1.0, t_dense)]
        for name, fn in demo_methods(grid).items():
            out, plan = fn(q, k, v)
            err = ((out - dense).norm() / dense.norm()).item()
            cos = torch.nn.functional.cosine_similarity(out.flatten(), dense.flatten(), dim=0).item()
            t = _median_time(lambda: fn(q, k, v), args.repeats)
            rows.append((name, plan.density(), err, cos, t))
    print(f"\n| {'method':<36} | density | rel L2 err | cosine | time (ms) | speedup |")
    print(f"|{'-' * 38}|---------|------------|--------|-----------|---------|")
    for name, density, err, cos, t in rows:
        print(f"| {name:<36} | {density:7.3f} | {err:10.4f} | {cos:6.4f} | {t * 1e3:9.1f} | "
              f"{t_dense / t:6.2f}x |")
    print("\nTimes are medians of", args.repeats, "runs, selection (planning) included.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdiff-sparse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the three methods vs dense SDPA on synthetic video attention",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--grid", type=int, nargs=3, default=(8, 32, 32), metavar=("T", "H", "W"),
                      help="latent token grid")
    demo.add_argument("--heads", type=int, default=4, help="attention heads")
    demo.add_argument("--head-dim", type=int, default=64, help="head dimension")
    demo.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic video")
    demo.set_defaults(func=run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
