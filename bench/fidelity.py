"""Fidelity at matched compute: error vs FLOP-equivalent density of every method variant on
video-like attention (see :mod:`vdiff_sparse.benchmarks.fidelity`). Same as
``vdiff-sparse bench fidelity``.

    python bench/fidelity.py                      # grid (8, 24, 32), 4 heads, D 64 -> results/fidelity_cpu.*
    python bench/fidelity.py --grid 4 12 16 --out /tmp/f.json   # quick
"""

import sys

from vdiff_sparse.benchmarks.fidelity import main

if __name__ == "__main__":
    sys.exit(main())
