"""``vdiff-sparse finetune`` / ``python -m vdiff_sparse.pipelines.finetune``."""

from __future__ import annotations

import argparse
import logging
import sys

from vdiff_sparse.pipelines.data import DataError

from .config import SetupError
from .loading import load_config, shipped_configs
from .loop import train

logger = logging.getLogger("vdiff_sparse.finetune")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``[--config FILE] [--resume latest|DIR] [key=value ...]``.

    Bad settings, paths and data end with a one-line ``error:`` message and exit status 2;
    anything else (a bug) keeps its traceback."""
    parser = argparse.ArgumentParser(
        prog="vdiff-sparse finetune",
        description="Sparse-aware fine-tuning (run under `accelerate launch -m vdiff_sparse.pipelines.finetune` "
                    "for several processes). Overrides are OmegaConf dot-keys, e.g. train.max_steps=100.",
    )
    parser.add_argument("--config", help=f"training YAML, or the name of one in configs/finetune/ "
                                         f"({', '.join(shipped_configs())})")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder OUTPUT_DIR/checkpoints/step-N (same as "
                                         "resume=...); without it, output_dir must hold no checkpoints")
    parser.add_argument("overrides", nargs="*", help="key=value settings")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides) + ([f"resume={args.resume}"] if args.resume else [])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, overrides)
    except ValueError as e:
        parser.error(str(e))
    try:
        result = train(config)
    except (SetupError, DataError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    if result.stopped_early:
        logger.info("stopped after step %d (train.stop_after); resume with resume=latest", result.step)
    elif result.report is not None:
        logger.info("report: %s", result.report)
    return 0


__all__ = ["main"]
