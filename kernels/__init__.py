"""Triton kernels (imported as ``vdiff_sparse.kernels``): block-sparse attention forward and
backward for any plan (:mod:`.attention`, launched by :mod:`.ops`), PSA pooling
(:mod:`.pooling`). ``backend="triton"`` (:mod:`vdiff_sparse.backends.triton`) loads them lazily;
they import nothing of the library above the plan. Importing this package loads no kernel."""
