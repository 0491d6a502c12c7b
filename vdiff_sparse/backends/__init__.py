"""Backends that execute attention plans, and the choice among them.

``backend="auto"`` walks :data:`AUTO_ORDER` and takes the first backend whose ``why_not``
returns ``None``; asking for a backend by name raises with its reason if it cannot run.
Adding a backend: subclass :class:`Backend` in a new file, add a factory to ``_FACTORIES``.
"""

from __future__ import annotations

import logging

import torch

from ..plan import AttentionPlan
from .base import Backend, ExtraKeys

logger = logging.getLogger(__name__)


def _reference() -> Backend:
    from .reference import ReferenceBackend

    return ReferenceBackend()


def _torch() -> Backend:
    from .gather import GatherBackend

    return GatherBackend()


def _triton() -> Backend:
    from .triton import TritonBackend

    return TritonBackend()


_FACTORIES = {"reference": _reference, "torch": _torch, "triton": _triton}
AUTO_ORDER = ("triton", "torch")
BACKENDS = tuple(_FACTORIES)
_instances: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (one of :data:`BACKENDS`)."""
    if name not in _FACTORIES:
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {name!r}")
    if name not in _instances:
        _instances[name] = _FACTORIES[name]()
    return _instances[name]


def _probe(name: str, q: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> str | None:
    try:
        backend = get_backend(name)
    except ImportError as err:  # e.g. triton not installed
        return f"cannot be imported ({err})"
    return backend.why_not(q, v, plan)


def select_backend(name: str, q: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> Backend:
    """Resolve ``name`` (``"auto"`` or a backend name) to a backend that can run ``plan`` on
    queries ``q`` and values ``v`` (``[B, N, heads, D|Dv]``)."""
    if name == "auto":
        reasons = []
        for candidate in AUTO_ORDER:
            reason = _probe(candidate, q, v, plan)
            if reason is None:
                return get_backend(candidate)
            logger.debug("backend %s declined: %s", candidate, reason)
            reasons.append(f"{candidate}: {reason}")
        raise NotImplementedError("no backend can run this problem: " + "; ".join(reasons))
    if name not in _FACTORIES:
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {name!r}")
    reason = _probe(name, q, v, plan)
    if reason is not None:
        raise NotImplementedError(f"backend {name!r} cannot run this problem: {reason}")
    return get_backend(name)


__all__ = ["AUTO_ORDER", "BACKENDS", "Backend", "ExtraKeys", "get_backend", "select_backend"]
