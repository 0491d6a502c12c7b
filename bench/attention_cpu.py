"""Dense SDPA vs each sparse method on the torch backend, on the CPU, side by side.

For N in {8K, 16K, 32K} (4 heads, D = 64, float32) and target densities {5, 10, 12.5, 20%}: median
time of dense SDPA and of each method (selection included), the speedup, the plan's
FLOP-equivalent density, and the peak extra memory of one call (measured in a fresh
subprocess, so one call's peak is not hidden by another's; large allocations are mmapped
there, so the resident set follows the live tensors).

    python bench/attention_cpu.py                      # full sweep, writes bench/results/
    python bench/attention_cpu.py --sizes 8192 --repeats 1 --out /tmp/x.json   # quick
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import math
import os
import subprocess
import sys

import torch

from vdiff_sparse.benchmarks.meta import command_line, median_time, run_metadata, write_json

GRIDS = {8192: (8, 32, 32), 16384: (16, 32, 32), 32768: (16, 32, 64)}
HEADS, HEAD_DIM = 4, 64
GNA_TILE = (2, 8, 8)  # tile of the sliding-tile (block-aligned) GNA rows: 128 tokens


def method_call(method: str, grid, density: float):
    """A function (q, k, v) -> (out, plan) running ``method`` at about ``density``."""
    from vdiff_sparse import gna_attention, psa_attention, vmoba_attention

    if method == "dense":
        from vdiff_sparse import dense_attention

        return lambda q, k, v: (dense_attention(q, k, v), None)
    if method == "gna":
        # Window volume / N = density: scale every axis by density^(1/3).
        scale = density ** (1 / 3)
        window = tuple(max(2, round(n * scale)) for n in grid)
        return lambda q, k, v: gna_attention(q, k, v, grid, window=window, backend="torch",
                                             return_plan=True)
    if method == "gna-tile":
        # Sliding tile attention: stride = tile, window a whole number of tiles per axis, so
        # the plan is block-aligned (no per-query mask). A window of c tiles centred on its
        # tile starts on a tile boundary when c is odd (or covers the axis), so the numbers of
        # tiles are such c, the ones whose window volume is closest to the target density.
        tile = tuple(min(t, n) for t, n in zip(GNA_TILE, grid))
        counts = itertools.product(*(
            [c for c in range(1, n // t + 1) if c % 2 == 1 or c == n // t] for t, n in zip(tile, grid)
        ))
        volume = math.prod(grid)
        volume_ratio = lambda c: math.prod(c) * math.prod(tile) / volume / density  # noqa: E731
        best = min(counts, key=lambda c: abs(math.log(volume_ratio(c))))
        window = tuple(max(2, c * t) for c, t in zip(best, tile))
        return lambda q, k, v: gna_attention(q, k, v, grid, window=window, stride=tile, tile=tile,
                                             backend="torch", return_plan=True)
    if method == "psa":
        return lambda q, k, v: psa_attention(q, k, v, grid, mode="quantile",
                                             fractions={1: density}, backend="torch",
                                             return_plan=True)
    if method == "psa-pyramid":
        # Same FLOP-equivalent density spread over levels: d = f1 + f2/2 + f4/4.
        f = {1: density / 2, 2: density / 2, 4: density}
        return lambda q, k, v: psa_attention(q, k, v, grid, mode="quantile", fractions=f,
                                             backend="torch", return_plan=True)
    if method == "vmoba":
        # The library's default 3D cube; the density knob is top-k, k / blocks ~ density.
        from vdiff_sparse import VMoBAConfig

        cube = VMoBAConfig().block_3d
        blocks = 1
        for n, c in zip(grid, cube):
            blocks *= -(-n // c)
        topk = max(1, round(density * blocks))
        return lambda q, k, v: vmoba_attention(q, k, v, grid, layer_index=2,
                                               block_3d=cube, topk=topk, mode="topk",
                                               scope="local", backend="torch", return_plan=True)
    raise ValueError(f"unknown method {method!r}")


def inputs(n: int):
    from vdiff_sparse.synthetic import video_qkv

    return video_qkv(GRIDS[n], HEADS, HEAD_DIM, seed=0)


def _memory_kib() -> dict:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmHWM", "VmRSS"))}


def peak_memory_child(method: str, n: int, density: float) -> None:
    """Run one call in this (fresh) process and print its peak memory above the inputs.

    One warm-up call first (lazy imports, cached plans: the steady state of a model's calls).
    Then freed heap memory goes back to the OS (``malloc_trim``: otherwise a call can reuse
    pages still resident from earlier temporaries and look free) and the high-water mark is
    reset (``/proc/self/clear_refs`` "5"), so the peak is this call's own. Run with
    :data:`CHILD_ENV`, so that the peak is that of the live tensors, not of the heap's layout.
    """
    q, k, v = inputs(n)
    fn = method_call(method, GRIDS[n], density)
    with torch.no_grad():
        fn(q, k, v)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _memory_kib()["VmRSS"]
    with torch.no_grad():
        fn(q, k, v)
    peak = _memory_kib()["VmHWM"]
    print(json.dumps({"peak_extra_bytes": max(0, peak - base) * 1024}))


# In the child, glibc serves every allocation of 128 KiB or more with its own mmap and unmaps
# it on free, so the resident set follows the live tensors. With the default dynamic
# threshold, freed blocks stay in the heap and whether a later tensor fits in them depends on
# the order of earlier frees: the same call measured anywhere from +0 to +10 MiB at N = 16K.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def peak_memory(method: str, n: int, density: float) -> int:
    cmd = [sys.executable, __file__, "--child", method, str(n), str(density)]
    env = {**os.environ, **CHILD_ENV}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(GRIDS), choices=sorted(GRIDS))
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.10, 0.125, 0.20])
    parser.add_argument("--methods", nargs="+",
                        default=["gna", "gna-tile", "psa", "psa-pyramid", "vmoba"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attention_cpu.json"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, n, density = args.child
        peak_memory_child(method, int(n), float(density))
        return

    results = []
    for n in args.sizes:
        q, k, v = inputs(n)
        dense = method_call("dense", GRIDS[n], 1)
        with torch.no_grad():
            t_dense_before = median_time(lambda: dense(q, k, v), args.repeats)
        mem_dense = None if args.no_memory else peak_memory("dense", n, 1.0)
        print(f"N={n} grid={GRIDS[n]} dense SDPA {t_dense_before * 1e3:.1f} ms"
              + ("" if mem_dense is None else f", peak +{mem_dense / 2**20:.0f} MiB"), flush=True)
        rows = []
        for method in args.methods:
            for density in args.densities:
                fn = method_call(method, GRIDS[n], density)
                with torch.no_grad():
                    _, plan = fn(q, k, v)
                    t = median_time(lambda: fn(q, k, v), args.repeats)
                mem = None if args.no_memory else peak_memory(method, n, density)
                rows.append({
                    "N": n, "grid": GRIDS[n], "method": method, "target_density": density,
                    "density": plan.density(), "block_density": plan.stats()["block_density"],
                    "sparse_s": t, "dense_peak_extra_bytes": mem_dense, "sparse_peak_extra_bytes": mem,
                    "memory_ratio": None if mem is None or not mem_dense else mem / mem_dense,
                })
                print(f"  {method:<12} target {density:.2f} density {plan.density():.3f}: "
                      f"{t * 1e3:8.1f} ms" + ("" if mem is None else f"  peak +{mem / 2**20:.0f} MiB "
                      f"({rows[-1]['memory_ratio']:.2f}x dense)"), flush=True)
        # Dense again after the methods: the speedups use the mean of both medians, so a slow
        # drift of the machine's speed during the sweep shows up in the record, not in a ratio.
        with torch.no_grad():
            t_dense_after = median_time(lambda: dense(q, k, v), args.repeats)
        t_dense = (t_dense_before + t_dense_after) / 2
        print(f"N={n} dense SDPA again {t_dense_after * 1e3:.1f} ms; speedups vs {t_dense * 1e3:.1f} ms:")
        for row in rows:
            row.update(dense_s=t_dense, dense_s_before=t_dense_before, dense_s_after=t_dense_after,
                       speedup=t_dense / row["sparse_s"])
            print(f"  {row['method']:<12} target {row['target_density']:.2f}: "
                  f"speedup {row['speedup']:5.2f}x", flush=True)
        results += rows
    report = {
        "benchmark": "attention_cpu",
        **run_metadata(command_line()),
        "shape": {"batch": 1, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float32"},
        "timing": (f"median of {args.repeats} runs after one warm-up; selection included; dense "
                   "timed before and after the methods, speedups against the mean of the two"),
        "results": results,
    }
    print("wrote", write_json(args.out, report))


if __name__ == "__main__":
    main()
