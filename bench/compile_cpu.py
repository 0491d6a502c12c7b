"""The CPU demo eager and under torch.compile, side by side: ``vdiff-sparse generate`` on the
built-in tiny model, dense and sparse with the same seed, once eager and once with ``--compile``
(regional, fullgraph; the warm-up generation compiles, the timed ones run compiled).

    python bench/compile_cpu.py [--methods gna vmoba psa] [--tokens 5120 8192] [--repeats 3]

Writes ``bench/results/compile_cpu.json`` (machine, versions, commit, every report) and prints,
per size and method, the median latency of dense and sparse, eager and compiled, over
``--repeats`` runs of the generate command (alternating eager and compiled, so that both see
the same machine load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from vdiff_sparse.benchmarks.meta import command_line, run_metadata, write_json

# Token count -> generate's size options on the tiny model (2x VAE, 2x2 patches); 5,120 is the
# default demo (9 frames x 128 x 128).
SIZES = {5120: ["--frames", "9", "--height", "128", "--width", "128"],
         8192: ["--frames", "15", "--height", "128", "--width", "128"]}
# PSA in quantile mode at a FLOP density near the others' (random weights make the threshold
# mode keep most blocks), as in generate_cpu.py.
METHOD_OVERRIDES = {"psa": ["mode=quantile", "fractions={1: 0.06, 2: 0.06, 4: 0.12}"]}


def run(method: str, size: list[str], steps: int, compiled: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "vdiff_sparse", "generate", "--attn", method, "--compare-dense", "--steps",
               str(steps), "--out", tmp, "dense_steps=0", *METHOD_OVERRIDES.get(method, []), *size]
        if compiled:
            cmd.append("--compile")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        report = json.loads((Path(tmp) / "report.json").read_text())
    report["command"] = " ".join(cmd[1:])
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["gna", "vmoba", "psa"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[5120, 8192], choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command (medians)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compile_cpu.json"))
    args = parser.parse_args(argv)

    results = []
    for tokens in args.tokens:
        for method in args.methods:
            reports = {"eager": [], "compiled": []}
            for _ in range(args.repeats):
                for label in ("eager", "compiled"):
                    reports[label].append(run(method, SIZES[tokens], args.steps, label == "compiled"))
            row = {"tokens": tokens, "method": method, "reports": reports}
            for label, runs in reports.items():
                for side in ("dense", "sparse"):
                    row[f"{label}_{side}_s"] = statistics.median(r[f"latency_{side}_s"] for r in runs)
            row["compile_speedup_sparse"] = row["eager_sparse_s"] / row["compiled_sparse_s"]
            row["compile_speedup_dense"] = row["eager_dense_s"] / row["compiled_dense_s"]
            row["sparse_vs_dense_compiled"] = row["compiled_dense_s"] / row["compiled_sparse_s"]
            results.append(row)
            print(f"{tokens:6d} tokens {method:6s} dense {row['eager_dense_s']:6.2f} -> {row['compiled_dense_s']:6.2f} s"
                  f"  {method} {row['eager_sparse_s']:6.2f} -> {row['compiled_sparse_s']:6.2f} s (eager -> compiled)"
                  f"  sparse vs dense compiled {row['sparse_vs_dense_compiled']:.2f}x", flush=True)
    out = write_json(args.out, {"benchmark": "compile_cpu", **run_metadata(command_line()), "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
