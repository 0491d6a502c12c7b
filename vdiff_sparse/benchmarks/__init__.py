"""``vdiff-sparse bench``: speed and fidelity of every method, side by side.

Subcommands (each writes one JSON file with the machine, versions, date and exact command):

    fidelity    error vs FLOP-equivalent density of every method variant on video-like
                attention (:mod:`.fidelity`); JSON + PNG. CPU is enough.
    attention   attention op time, dense SDPA vs each method: ``bench/attention_cpu.py`` on the
                CPU, ``bench/attention_gpu.py`` (Triton kernels) when a GPU is present. Runs
                those scripts of the source checkout; extra arguments are passed on.
    e2e         Wan 2.1 1.3B transformer (random weights) at 480p / 81 frames, time per
                denoising step with dense attention and each processor (:mod:`.wan_e2e`); needs
                a GPU unless ``--smoke``.
    all         fidelity, attention (CPU, and GPU if present) and e2e (if a GPU is present).

Examples::

    vdiff-sparse bench fidelity --grid 8 24 32
    vdiff-sparse bench attention --sizes 8192 --repeats 1
    vdiff-sparse bench e2e --smoke
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def attention_scripts(gpu: bool | None = None) -> list[Path]:
    """The op-level scripts to run: CPU always, GPU when ``gpu`` (default: CUDA available)."""
    import torch

    gpu = torch.cuda.is_available() if gpu is None else gpu
    names = ["attention_cpu.py"] + (["attention_gpu.py"] if gpu else [])
    return [BENCH_DIR / name for name in names]


def run_attention(extra: list[str], gpu: bool | None = None) -> int:
    """Run the op-level scripts in subprocesses (their own argument parsers take ``extra``)."""
    scripts = attention_scripts(gpu)
    missing = [str(s) for s in scripts if not s.exists()]
    if missing:
        print(f"the attention benchmarks live in the source checkout's bench/ folder; not found: "
              f"{missing}. Run from a git clone of vdiff_sparse.", file=sys.stderr)
        return 2
    code = 0
    for script in scripts:
        print("$", sys.executable, script, *extra, flush=True)
        code = code or subprocess.run([sys.executable, str(script), *extra]).returncode
    return code


def build_parser() -> argparse.ArgumentParser:
    from . import fidelity, wan_e2e

    parser = argparse.ArgumentParser(prog="vdiff-sparse bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    fidelity.build_parser(sub.add_parser(
        "fidelity", help="error vs density of every method variant (CPU)",
        description=fidelity.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    sub.add_parser("attention", help="attention op time vs dense SDPA (bench/attention_*.py)",
                   add_help=False)
    wan_e2e.build_parser(sub.add_parser(
        "e2e", help="Wan 2.1 1.3B transformer step time per processor (GPU, or --smoke on CPU)",
        description=wan_e2e.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    sub.add_parser("all", help="fidelity, attention, and e2e when a GPU is present")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vdiff-sparse bench`` (``argv`` without the ``bench`` word)."""
    import torch

    from . import fidelity, wan_e2e

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["attention"]:
        return run_attention(argv[1:])
    args = build_parser().parse_args(argv)
    if args.benchmark == "fidelity":
        fidelity.run(args)
        return 0
    if args.benchmark == "e2e":
        return wan_e2e.run(args)
    fidelity.main([])
    code = run_attention([])
    if torch.cuda.is_available():
        code = code or wan_e2e.main([])
    else:
        print("no GPU: skipping the Wan 2.1 end-to-end benchmark (try `vdiff-sparse bench e2e --smoke`)")
    return code


__all__ = ["attention_scripts", "main", "run_attention"]
