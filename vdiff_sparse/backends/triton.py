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
# The kernel modules in dependency order (each imports only those before it).
_KERNEL_MODULES = ("common", "estimate", "tiles", "blocks", "window", "routed", "tables", "ops", "work", "resources")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels(name: str = "ops"):
    """A kernel module, (re)loaded in the current interpreter mode.

    ``@triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is decorated (module import);
    if the flag changed since (e.g. a test process imported the kernels before setting it),
    the kernel modules are reloaded so the kernels match the mode of the tensors they get.
    """
    from .. import kernels

    common = importlib.import_module(".common", kernels.__name__)
    if common.INTERPRET != _interpreting():
        for module in _KERNEL_MODULES:
            importlib.reload(importlib.import_module(f".{module}", kernels.__name__))
    return importlib.import_module(f".{name}", kernels.__name__)


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
        if plan.token_keep is not None and plan.window is not None:
            return "per-token routing together with a coordinate window is not supported"
        return None

    def forward(self, q, k, v, plan, extra=None, scale=None):
        reason = self.why_not(q, v, plan)  # called directly, not through select_backend
        if reason is not None:
            raise NotImplementedError(f"backend 'triton' cannot run this problem: {reason}")
        if torch.compiler.is_compiling():
            # dynamo cannot trace importlib (_kernels): the kernels as they are loaded, so a
            # graph keeps the interpreter mode of the last eager call (or of this import).
            from ..kernels import ops
        else:
            ops = _kernels()
        return ops.plan_attention(q, k, v, plan, extra, scale)

    def count_work(self, device="cpu"):
        """Context manager: while active, the kernels count the query-key pairs of every tile
        they compute (a debug aid, e.g. to check :meth:`work`); yields a counter whose
        ``totals()`` gives ``{"forward", "dq", "dkdv"}``. The counting kernels are separate
        variants, slower: not for timing."""
        return _kernels().count_work(device)

    def work(self, plan, head_dim: int = 128, *, value_head_dim: int | None = None, batch: int | None = None,
             heads: int | None = None, text_keys: int = 0, gpu: int = 9, tiles=None) -> dict:
        """Query-key pairs the kernels compute for ``plan`` against those it asks for.

        Args:
            plan: any plan the backend runs.
            head_dim, value_head_dim: of q/k and of v (``head_dim`` if ``None``); with ``gpu``
                (compute capability major; 9 = Hopper) they set the tiles a launch uses
                (:data:`vdiff_sparse.kernels.tiles.GPU_TILES`).
            batch, heads: of the call (default: the plan's own batch and head dims).
            text_keys: extra keys every query attends (all counted as real).
            tiles: a :class:`~vdiff_sparse.kernels.tiles.TileChoice` instead of the GPU's
                (e.g. the interpreter's).

        Returns:
            ``{"forward": {...}, "backward": {...}}``, each with ``useful`` (pairs the plan
            asks for; pooled keys count as the pooled rows they are, as
            ``plan.stats()["density"]``; backward: once for ``dq`` and once for ``dk``/``dv``),
            ``executed`` (pairs of every tile the kernels compute, masked lanes included),
            ``efficiency`` (useful / executed), per-pass parts, and for window plans over a
            grid ``union`` (pairs of the union of each tile's windows: the least any tile
            kernel reads). See :func:`vdiff_sparse.kernels.work.work`.
        """
        return _kernels("work").work(plan, head_dim, value_head_dim=value_head_dim, batch=batch, heads=heads,
                                     text_keys=text_keys, gpu=gpu, tiles=tiles)


__all__ = ["SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "TritonBackend"]
