"""Fidelity at matched compute: error vs FLOP-equivalent density of every method variant on
video-like attention of four kinds of scene (smooth, mixed, cellular, texture) and eight heads
from local to global; PSA's budget mode case by case against binary block-sparse and a fixed
split; and budget vs binary PSA end to end on the tiny model (see
:mod:`vdiff_sparse.benchmarks.fidelity`). Same as ``vdiff-sparse bench fidelity``.

    python bench/fidelity.py                      # grid (8, 16, 24), seed 1 -> results/fidelity_cpu.*
    python bench/fidelity.py --grid 8 24 32 --psa-block 128 --no-curves --no-e2e \
        --out bench/results/fidelity_psa_budget_b128_cpu.json   # budget-mode cases only
    python bench/fidelity.py --grid 4 12 16 --heads 4 --no-e2e --out /tmp/f.json   # quick
"""

import sys

from vdiff_sparse.benchmarks.fidelity import main

if __name__ == "__main__":
    sys.exit(main())
