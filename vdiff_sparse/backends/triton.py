"""``backend="triton"``: the fused block-sparse kernels behind the :class:`Backend` interface.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``,
how the tests exercise the kernels without a GPU). Importing this module imports neither triton
nor the kernels (:mod:`vdiff_sparse.kernels`); they load on the first call, so the dependency
points one way: backends -> kernels -> plan.
"""

from __future__ import annotations

import importlib
import os

import torch

from .base import Backend

SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _ops():
    """The kernel modules, (re)loaded in the current interpreter mode.

    ``@triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is decorated (module import);
    if the flag changed since (e.g. a test process imported the kernels before setting it),
    the kernel module is reloaded so the kernels match the mode of the tensors they get.
    """
    from ..kernels import attention, ops

    if attention.INTERPRET != _interpreting():
        importlib.reload(attention)
        importlib.reload(ops)
    return ops


class TritonBackend(Backend):
    """Fused Triton kernels, forward and backward, for any plan."""

    name = "triton"

    def why_not(self, q, v, plan) -> str | None:
        try:
            import triton  # noqa: F401
        except ImportError as err:
            return f"triton cannot be imported ({err})"
        if q.device.type != "cuda" and not (q.device.type == "cpu" and _interpreting()):
            return (
                f"q is on {q.device.type}; the Triton kernels need a CUDA tensor "
                "(or CPU tensors with TRITON_INTERPRET=1)"
            )
        supported = ", ".join(map(str, SUPPORTED_HEAD_DIMS))
        if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
            return f"head dim {q.shape[-1]} is not supported (supported: {supported})"
        if v.shape[-1] not in SUPPORTED_HEAD_DIMS:
            return f"value head dim {v.shape[-1]} is not supported (supported: {supported})"
        if q.dtype not in SUPPORTED_DTYPES:
            return f"dtype {q.dtype} is not supported (supported: float16, bfloat16, float32)"
        return None

    def forward(self, q, k, v, plan, extra=None, scale=None):
        reason = self.why_not(q, v, plan)  # called directly, not through select_backend
        if reason is not None:
            raise NotImplementedError(f"backend 'triton' cannot run this problem: {reason}")
        return _ops().plan_attention(q, k, v, plan, extra, scale)


__all__ = ["SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "TritonBackend"]
