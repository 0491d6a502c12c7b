"""End-to-end generation on CPU where attention dominates: the tiny model widened, at 8K-16K
video tokens, dense against each sparse method with the same seed.

    python bench/generate_cpu.py [--tokens 8192 16384] [--methods gna vmoba psa] [--steps 2]

Each size runs ``vdiff-sparse generate --compare-dense`` once per method (a warm-up generation
first) and writes ``bench/results/generate_cpu.json`` (machine, versions, command, one report
per run) and prints a table of latency, speedup, density and PSNR / SSIM. The widened model
has 4 heads x 64 dims (hidden 256), so attention, O(N^2), outweighs the MLPs and the VAE.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vdiff_sparse.benchmarks.meta import command_line, run_metadata, write_json

# Token grid (T, H, W) -> frames, height, width for the tiny model (2x VAE, 2x2 patches).
SIZES = {
    8192: (8, 32, 32),
    12288: (12, 32, 32),
    16384: (16, 32, 32),
}


# On random weights attention is nearly flat, so PSA's threshold mode (the presets') keeps most
# blocks (density ~0.7 measured here); for a speed comparison PSA runs in quantile mode at a
# FLOP-equivalent density near the other methods' (full 6%, x2 6%, x4 12%: about 0.12), with
# the method's default 128-token blocks: the tiny config's 64 are sized for its 5K-token grid,
# and at 8K-16K tokens they would halve the query rows of every attention call.
METHOD_OVERRIDES = {"psa": ["mode=quantile", "fractions={1: 0.06, 2: 0.06, 4: 0.12}",
                            "block_q=128", "block_k=128"]}


def size_args(grid):
    t, h, w = grid
    return ["--frames", str(2 * (t - 1) + 1), "--height", str(4 * h), "--width", str(4 * w)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384], choices=sorted(SIZES),
                        help="video token counts")
    parser.add_argument("--methods", nargs="+", default=["gna", "vmoba", "psa"], help="sparse methods")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps")
    parser.add_argument("--heads", type=int, default=4, help="tiny model heads")
    parser.add_argument("--head-dim", type=int, default=64, help="tiny model head dimension")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate_cpu.json"))
    args = parser.parse_args(argv)

    runs = []
    for tokens in args.tokens:
        for method in args.methods:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-m", "vdiff_sparse", "generate", "--attn", method, "--compare-dense",
                       "--steps", str(args.steps), "--tiny-heads", str(args.heads), "--tiny-head-dim",
                       str(args.head_dim), "--out", tmp, "dense_steps=0", *METHOD_OVERRIDES.get(method, []), *size_args(SIZES[tokens])]
                start = time.perf_counter()
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                report = json.loads((Path(tmp) / "report.json").read_text())
            report["command"] = " ".join(cmd[1:])
            report["wall_s"] = time.perf_counter() - start
            runs.append(report)
            print(f"{tokens:6d} tokens {method:6s} dense {report['latency_dense_s']:7.2f} s  sparse "
                  f"{report['latency_sparse_s']:7.2f} s  speedup {report['speedup']:5.2f}x  density "
                  f"{report['density']:.3f}  attention share (dense) {report['attention_share_dense']:.0%}  "
                  f"PSNR {report['psnr_db'] or float('inf'):.1f} dB  SSIM {report['ssim']:.4f}", flush=True)
    out = write_json(args.out, {"benchmark": "generate_cpu", **run_metadata(command_line()), "runs": runs})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
