"""Triton kernels (imported as ``vdiff_sparse.kernels``): block-sparse attention forward and
backward for any plan (:mod:`.attention`, launched by :mod:`.ops`), PSA pooling
(:mod:`.pooling`) and ``backend="triton"`` (:mod:`.backend`). Importing this package loads no
kernel."""
