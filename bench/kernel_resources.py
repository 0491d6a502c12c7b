"""Registers, spills and shared memory of every Triton kernel variant the library can launch.

Compiles each variant (:func:`vdiff_sparse.kernels.resources.variants`: kernel x constexpr
switches x tiles the launch rules can pick x the autotuner's ``(num_warps, num_stages)``) for
sm_90 (H100/H200, with Hopper's tiles) and sm_80 (A100, with Ampere's), in bfloat16 and
float16, at head dims 32, 64, 128 and 256, on this CPU machine
(Triton's CUDA backend and the ``cuobjdump`` in its wheel; no GPU needed), and records
``cuobjdump --dump-resource-usage``: registers per thread, stack and local memory (spills), and
shared memory. Also a hash of the kernels' code and tile table (``resources.code_key``), so the
tests can tell whether the table describes the kernels of the checkout.

    python bench/kernel_resources.py             # bench/results/kernel_resources.json (~30 min)
    python bench/kernel_resources.py --jobs 2    # compile in 2 processes
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from vdiff_sparse.benchmarks.meta import command_line, run_metadata, write_json

HEAD_DIMS = (32, 64, 128, 256)
DTYPES = ("bf16", "fp16")
ARCHS = (90, 80)


def _compile(job):
    from vdiff_sparse.kernels import resources

    variant, arch, head_dim = job
    try:
        usage = resources.compile_variant(variant, arch)
    except Exception as err:  # recorded: a variant that does not compile is a finding
        usage = {"error": f"{type(err).__name__}: {err}"[-2000:]}
    return {"arch": f"sm_{arch}", "head_dim": head_dim, "kernel": variant.kernel, "dtype": variant.dtype,
            "constexprs": variant.constexprs, "num_warps": variant.num_warps, "num_stages": variant.num_stages,
            "label": variant.label(), **usage}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1, help="compile processes")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernel_resources.json"))
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)

    from vdiff_sparse.kernels import resources

    reason = resources.why_not_available()
    if reason:
        raise SystemExit(f"cannot compile the kernels here: {reason}")
    jobs = [(variant, arch, head_dim) for arch in ARCHS for head_dim in HEAD_DIMS for dtype in DTYPES
            for variant in resources.variants(head_dim, dtype, arch // 10)]
    print(f"{len(jobs)} variants", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = []
        for row in pool.map(_compile, jobs, chunksize=4):
            rows.append(row)
            if row.get("spills") or "error" in row:
                print("!", row["arch"], row["label"], row.get("registers"), row.get("stack"), row.get("error", ""),
                      flush=True)
    spilled = [r for r in rows if r.get("spills")]
    failed = [r for r in rows if "error" in r]
    summary = {}
    for r in rows:
        key = f"{r['arch']} D{r['head_dim']}"
        entry = summary.setdefault(key, {"variants": 0, "spilling": 0, "max_registers": 0, "max_shared": 0})
        entry["variants"] += 1
        entry["spilling"] += bool(r.get("spills"))
        entry["max_registers"] = max(entry["max_registers"], r.get("registers", 0))
        entry["max_shared"] = max(entry["max_shared"], r.get("shared", 0))
    report = {
        **run_metadata(command_line()),
        "what": "cuobjdump --dump-resource-usage of every kernel variant the launches can use: registers per "
                "thread, stack and local bytes per thread (spills when > 0), shared bytes (static + dynamic)",
        "kernel_code_key": resources.code_key(),
        "summary": summary,
        "spilling": len(spilled),
        "errors": len(failed),
        "variants": rows,
    }
    print(f"{len(rows)} variants, {len(spilled)} spilling, {len(failed)} not compiling")
    print(f"wrote {write_json(args.out, report)}")


if __name__ == "__main__":
    main()
