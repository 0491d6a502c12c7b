"""Dense attention as a method: every query attends every key. The baseline of every comparison,
and what a schedule runs on dense layers and warm-up steps.

With ``backend="auto"`` it is dense SDPA (:func:`~vdiff_sparse.attention.dense_attention`); with a
plan backend named (``"torch"``, ``"triton"``, ``"reference"``) it runs a density-1 plan of
``block``-token blocks on that backend, which is how backends are compared with SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..attention import dense_attention, run_plan
from ..checks import check_positive_int, check_qkv
from ..plan import AttentionPlan, dense_plan
from .registry import Method, get_method, register_method


@dataclass
class DenseConfig:
    """Settings of dense attention.

    Attributes:
        block: block size of the density-1 plan when a plan backend is named.
    """

    block: int = 128

    def __post_init__(self) -> None:
        self.block = check_positive_int("block", self.block)


def plan_dense(q: torch.Tensor, k: torch.Tensor, grid: Sequence[int], config: DenseConfig | None = None, *,
               layer_index: int = 0, scale: float | None = None) -> AttentionPlan:
    """The density-1 plan of ``q`` ``[B, N, heads, D]`` (shared by all batches and heads)."""
    config = get_method("dense").make_config(config)
    check_qkv(q, k, k, grid)
    return dense_plan(q.shape[1], config.block, device=q.device)


def full_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    config: DenseConfig | None = None,
    *,
    layer_index: int = 0,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_plan: bool = False,
    **overrides,
):
    """Dense attention in the methods' calling convention.

    Args:
        q, k, v: ``[B, N, heads, D]`` video tokens, ``N = T*H*W``.
        grid: latent grid ``(T, H, W)`` (checked against ``N``).
        config: :class:`DenseConfig`, a mapping of its fields or ``None``.
        layer_index: unused (dense attention is the same on every layer).
        extra_k, extra_v, extra_mask: always-attended keys ``[B, Ne, heads, D]`` and their
            ``[B, Ne]`` bool mask.
        scale: logit scale, ``D ** -0.5`` if ``None``.
        backend: ``"auto"`` (SDPA) or a plan backend name.
        return_plan: also return the plan (``None`` for SDPA).

    Returns:
        ``[B, N, heads, D]``, or ``(out, plan)``.
    """
    config = get_method("dense").make_config(config, **overrides)
    check_qkv(q, k, v, grid)
    extras = dict(extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask, scale=scale)
    if backend == "auto":
        out, plan = dense_attention(q, k, v, **extras), None
    else:
        plan = plan_dense(q, k, grid, config)
        out = run_plan(q, k, v, plan, backend=backend, **extras)
    return (out, plan) if return_plan else out


register_method(Method(
    name="dense",
    config_cls=DenseConfig,
    attention=full_attention,
    plan=plan_dense,
    plans_from_qk=False,
    summary="every key (dense attention, the baseline)",
    processor_name="DenseProcessor",
))

__all__ = ["DenseConfig", "full_attention", "plan_dense"]
