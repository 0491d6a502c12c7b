"""Wan 2.1 T2V 1.3B transformer (random weights, bf16) at 480p / 81 frames on one GPU: time per
denoising step with dense attention and each vdiff_sparse processor (see
:mod:`vdiff_sparse.benchmarks.wan_e2e`). Same as ``vdiff-sparse bench e2e``.

    python bench/wan_e2e_gpu.py                          # GPU -> results/wan_e2e_gpu.json
    python bench/wan_e2e_gpu.py --methods dense psa --steps 3
    python bench/wan_e2e_gpu.py --smoke --out /tmp/smoke.json   # CPU check in seconds
"""

import sys

from vdiff_sparse.benchmarks.wan_e2e import main

if __name__ == "__main__":
    sys.exit(main())
