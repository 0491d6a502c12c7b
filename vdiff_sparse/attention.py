"""Run a plan: execute it on a backend, in plan order (permuted in and out) or, where the
backend applies the reorder inside its own gathers, directly in the original token order.

This is the one place where "which pairs" (a plan, from a method) meets "how to compute"
(a backend). The method functions (``gna_attention`` ...) build a plan and call
:func:`run_plan`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import ExtraKeys, select_backend
from .checks import check_finite, check_qkv, check_scale
from .plan import AttentionPlan


def make_extra(
    extra_k: torch.Tensor | None,
    extra_v: torch.Tensor | None,
    extra_mask: torch.Tensor | None,
    q: torch.Tensor,
    v: torch.Tensor,
) -> ExtraKeys | None:
    """Validate always-attended keys against q and v ``[B, N, heads, D|Dv]``: ``extra_k``
    ``[B, Ne, heads, D]``, ``extra_v`` ``[B, Ne, heads, Dv]``, ``extra_mask`` ``[B, Ne]`` bool
    (True = real key)."""
    if extra_k is None and extra_v is None:
        if extra_mask is not None:
            raise ValueError("extra_mask was given without extra_k/extra_v")
        return None
    if extra_k is None or extra_v is None:
        raise ValueError("extra_k and extra_v must be given together")
    B, _, H, D = q.shape
    if extra_k.dim() != 4 or extra_k.shape[0] != B or extra_k.shape[2] != H or extra_k.shape[3] != D:
        raise ValueError(
            f"extra_k must be [B={B}, Ne, heads={H}, D={D}], got {tuple(extra_k.shape)}"
        )
    if extra_v.dim() != 4 or extra_v.shape[:3] != extra_k.shape[:3] or extra_v.shape[3] != v.shape[3]:
        raise ValueError(
            f"extra_v must be [B, Ne, heads, Dv={v.shape[3]}] like extra_k {tuple(extra_k.shape)} "
            f"with v's head dim, got {tuple(extra_v.shape)}"
        )
    if extra_mask is not None:
        if extra_mask.shape != extra_k.shape[:2] or extra_mask.dtype != torch.bool:
            raise ValueError(
                f"extra_mask must be bool [B, Ne] = {tuple(extra_k.shape[:2])}, "
                f"got {extra_mask.dtype} {tuple(extra_mask.shape)}"
            )
    if not (extra_k.device == extra_v.device == q.device):
        raise ValueError(f"extra_k/extra_v must be on q's device {q.device}, got {extra_k.device}, {extra_v.device}")
    if extra_mask is not None and extra_mask.device != q.device:
        raise ValueError(f"extra_mask must be on q's device {q.device}, got {extra_mask.device}")
    check_finite(extra_k=extra_k, extra_v=extra_v)
    return ExtraKeys(extra_k.to(q.dtype), extra_v.to(q.dtype), extra_mask)


def run_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    *,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of video queries over the plan's keys plus always-attended extra keys.

    Args:
        q, k, v: ``[B, N, heads, D]`` video tokens in original (frame-major) order.
        plan: from a method (``plan_gna``, ``plan_psa``, ``plan_vmoba``) or built by hand.
        extra_k, extra_v: ``[B, Ne, heads, D]`` keys every query attends (text), or ``None``.
        extra_mask: ``[B, Ne]`` bool, False for padding among the extra keys.
        scale: logit scale; ``D ** -0.5`` if ``None``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``[B, N, heads, D]`` in original order, dtype of q.
    """
    check_qkv(q, k, v)
    check_finite(q=q, k=k, v=v)
    scale = check_scale(scale)
    if q.shape[1] != plan.num_tokens:
        raise ValueError(f"the plan covers N={plan.num_tokens} tokens but q has N={q.shape[1]}")
    extra = make_extra(extra_k, extra_v, extra_mask, q, v)
    runner = select_backend(backend, q, v, plan)
    if plan.kv_index.device != q.device:
        plan = plan.to(q.device)
    return runner.forward_original_order(q, k, v, plan, extra, scale)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense SDPA on ``[B, N, heads, D]`` tensors (with extra keys appended): the baseline."""
    check_qkv(q, k, v)
    check_finite(q=q, k=k, v=v)
    scale = check_scale(scale)
    extra = make_extra(extra_k, extra_v, extra_mask, q, v)
    mask = None
    if extra is not None:
        k = torch.cat([k, extra.k], dim=1)
        v = torch.cat([v, extra.v], dim=1)
        if extra.mask is not None:
            real = torch.ones(q.shape[0], q.shape[1], dtype=torch.bool, device=q.device)
            mask = torch.cat([real, extra.mask], dim=1)[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)
