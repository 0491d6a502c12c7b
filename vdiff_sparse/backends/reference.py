"""Float64 dense masked execution of a plan: the definition every other backend is tested
against. O(N²) memory; for tests only.

Every (key block, pool level) pair is expanded into its pooled keys ("virtual keys"); a query's
mask over virtual keys is built straight from the plan's lists, so no blocking trick of the
fast backends is reused here.
"""

from __future__ import annotations

import torch

from ..layout import BlockOrder
from ..plan import LEVELS, AttentionPlan
from .base import Backend, ExtraKeys


def _pool_groups(plan: AttentionPlan, p: int):
    """Group id of every plan position when each key block is cut into groups of ``p``."""
    device = plan.k_offsets.device
    n = plan.num_tokens
    block = BlockOrder(None, plan.k_offsets).block_of_position()
    within = torch.arange(n, device=device) - plan.k_offsets[:-1][block]
    starts = within % p == 0
    group = torch.cumsum(starts.long(), 0) - 1
    first = torch.nonzero(starts).squeeze(1)
    return group, block[first], first


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    extra: ExtraKeys | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Execute ``plan`` densely in float64.

    Args:
        q, k, v: ``[B, N, heads, D]`` in plan order.
        plan: the plan.
        extra: always-attended keys (text), ``[B, Ne, heads, D]``.
        scale: logit scale, ``D ** -0.5`` if ``None``.

    Returns:
        ``[B, N, heads, D]`` float64 output in plan order.
    """
    B, N, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    qf = q.double().transpose(1, 2)
    kf = k.double().transpose(1, 2)
    vf = v.double().transpose(1, 2)
    levels = plan.levels()
    valid = plan.kv_index >= 0

    q_block = plan.query_block_of_position()
    entry_block = plan.kv_index[:, :, q_block, :]  # [B', H', N, E]
    entry_level = levels[:, :, q_block, :]
    entry_on = valid[:, :, q_block, :]
    if plan.token_keep is not None:
        entry_on = entry_on & plan.token_keep

    keys, values, bias, masks = [], [], [], []
    for p in LEVELS:
        use = entry_on & (entry_level == p)
        if not bool(use.any()):
            continue
        group, group_block, first = _pool_groups(plan, p)
        m = int(group_block.numel())
        count = torch.bincount(group, minlength=m).double()
        sums_k = torch.zeros(B, H, m, D, dtype=torch.float64, device=q.device)
        sums_v = torch.zeros(B, H, m, v.shape[-1], dtype=torch.float64, device=q.device)
        keys.append(sums_k.index_add_(2, group, kf) / count[:, None])
        values.append(sums_v.index_add_(2, group, vf) / count[:, None])
        bias.append(torch.log(count))
        # allowed[b, h, n, g]: some used entry of query n names the block of group g.
        nkb = plan.num_k_blocks
        selected = torch.zeros(*use.shape[:3], nkb + 1, dtype=torch.bool, device=q.device)
        selected.scatter_(-1, torch.where(use, entry_block, nkb), True)  # slot nkb = unused
        allowed = selected[..., group_block]
        if p == 1 and plan.window is not None:
            pos = torch.arange(N, device=q.device)
            allowed = allowed & plan.window.allows(pos, pos[first])
        masks.append(allowed)

    logits = [torch.einsum("bhnd,bhmd->bhnm", qf, kk) * scale + bb for kk, bb in zip(keys, bias)]
    logits = [lg.masked_fill(~mk, float("-inf")) for lg, mk in zip(logits, masks)]
    if extra is not None:
        ek = extra.k.double().transpose(1, 2)
        values.append(extra.v.double().transpose(1, 2))
        lg = torch.einsum("bhnd,bhmd->bhnm", qf, ek) * scale
        if extra.mask is not None:
            lg = lg.masked_fill(~extra.mask[:, None, None, :].to(q.device), float("-inf"))
        logits.append(lg)
    if not logits:
        return torch.zeros(B, N, H, v.shape[-1], dtype=torch.float64, device=q.device)
    logits = torch.cat(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with no key -> 0
    out = probs @ torch.cat(values, dim=2)
    return out.transpose(1, 2)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    extra: ExtraKeys | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense float64 attention under a token mask: what a method's plain definition (a
    ``<method>_mask`` function of its module) means as attention.

    Args:
        q, k, v: ``[B, N, heads, D]`` in the mask's token order.
        mask: ``[B|1, heads|1, N, N]`` or ``[N, N]`` bool, ``mask[..., i, j]``: query ``i``
            attends key ``j``.
        extra: always-attended keys (text), ``[B, Ne, heads, D]``, with their padding mask.
        scale: logit scale, ``D ** -0.5`` if ``None``.

    Returns:
        ``[B, N, heads, D]`` float64; a query with no key at all gets 0.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = (x.double().transpose(1, 2) for x in (q, k, v))
    logits = (qf @ kf.transpose(-1, -2) * scale).masked_fill(~mask.to(q.device), float("-inf"))
    if extra is not None:
        ek, ev = extra.k.double().transpose(1, 2), extra.v.double().transpose(1, 2)
        extra_logits = qf @ ek.transpose(-1, -2) * scale
        if extra.mask is not None:
            extra_logits = extra_logits.masked_fill(~extra.mask[:, None, None, :], float("-inf"))
        logits = torch.cat([logits, extra_logits], -1)
        vf = torch.cat([vf, ev], 2)
    return (torch.softmax(logits, -1).nan_to_num(0.0) @ vf).transpose(1, 2)


class ReferenceBackend(Backend):
    name = "reference"

    def why_not(self, q, v, plan) -> str | None:
        if plan.num_tokens > 16384:
            return f"N={plan.num_tokens} is too large for the dense float64 reference (max 16384)"
        return None

    def forward(self, q, k, v, plan, extra=None, scale=None):
        return reference_attention(q, k, v, plan, extra, scale).to(q.dtype)
