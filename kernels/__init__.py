"""Triton kernels (imported as ``vdiff_sparse.kernels``): sparse attention forward and backward
for any plan, in three families that each compute only the tiles the plan asks for —
block plans (:mod:`.blocks`), coordinate windows over a grid (:mod:`.window`), per-token routed
plans (:mod:`.routed`) — launched by :mod:`.ops`, counted by :mod:`.work`, PSA pooling in
:mod:`.pooling`, PSA planning's sampled importance estimate in :mod:`.estimate`. ``backend="triton"`` (:mod:`vdiff_sparse.backends.triton`) loads them lazily;
they import nothing of the library above the plan. Importing this package loads no kernel."""
