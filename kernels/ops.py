"""Host side of the Triton kernels: plan tables, launches, autograd and the torch custom op.

:func:`plan_attention` is the entry point: it stacks the pooled key/value pyramid the plan
needs (:mod:`.pooling`, differentiable), turns the plan into small int32 tables the kernels
read (:class:`PlanTables`), and runs :class:`PlanAttentionFunction` — forward, then ``dq`` and
``dk``/``dv`` kernels in backward. Gradients of pooled rows flow back to the un-pooled keys
through autograd of the pooling.
"""

from __future__ import annotations

import torch
import triton

from vdiff_sparse.plan import LEVELS, AttentionPlan, ExtraKeys

from . import attention as _k
from .pooling import pyramid

_LEVEL_INDEX = {p: i for i, p in enumerate(LEVELS)}


def _broadcast_strides(t: torch.Tensor) -> tuple[int, int]:
    """Strides of dims 0 and 1 of a contiguous plan tensor, 0 where the dim broadcasts."""
    return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0)


def _window_needed(plan: AttentionPlan) -> torch.Tensor:
    """``[n_q_blocks, n_k_blocks]`` bool: some query of the block has a key of the key block
    outside its window (pairs fully inside skip the in-kernel test)."""
    w = plan.window
    n = plan.num_tokens
    dev = plan.q_offsets.device
    if any(d > 1 for d in w.dilation):
        return torch.ones(plan.num_q_blocks, plan.num_k_blocks, dtype=torch.bool, device=dev)
    big = torch.iinfo(torch.int64).max
    qb = plan.query_block_of_position()[:, None].expand(n, 3)
    kb = torch.repeat_interleave(torch.arange(plan.num_k_blocks, device=dev), plan.k_offsets.diff())
    kb = kb[:, None].expand(n, 3)

    def reduce(index, src, nblocks, how, fill):
        out = torch.full((nblocks, 3), fill, dtype=torch.int64, device=dev)
        return out.scatter_reduce(0, index, src.long(), how, include_self=False)

    lo_max = reduce(qb, w.lo, plan.num_q_blocks, "amax", -big)
    hi_min = reduce(qb, w.hi, plan.num_q_blocks, "amin", big)
    k_min = reduce(kb, w.coords, plan.num_k_blocks, "amin", big)
    k_max = reduce(kb, w.coords, plan.num_k_blocks, "amax", -big)
    inside = (lo_max[:, None] <= k_min[None]) & (hi_min[:, None] >= k_max[None])
    return ~inside.all(-1)


class PlanTables:
    """The plan as int32 tables for the kernels (built once per call, on the plan's device).

    * ``ent`` ``[B'|1, H'|1, n_q_blocks, max_kv, 5]``: per entry the first row in the stacked
      keys, number of rows (0 = unused slot), pool factor, tokens, whether the GNA window test
      is needed;
    * ``ranges`` ``[len(LEVELS) * n_k_blocks, 4]``: the same facts per (level, key block);
    * ``rowptr``/``list_qb``/``list_j``: for each (plan batch, plan head, range) the query
      blocks and entry slots that use it (the inverted lists for the ``dk``/``dv`` kernel).
    """

    def __init__(self, plan: AttentionPlan, rows: torch.Tensor):
        dev = plan.kv_index.device
        i32 = torch.int32
        nkb, nqb = plan.num_k_blocks, plan.num_q_blocks
        sizes = plan.k_offsets.diff()
        self.n_q_blocks = nqb
        self.q_offsets = plan.q_offsets.to(i32).contiguous()
        self.q_block_max = int(plan.q_offsets.diff().max())
        self.k_block_max = int(sizes.max())
        self.max_kv = plan.max_kv

        valid = plan.kv_index >= 0
        kb = plan.kv_index.clamp(min=0)
        level = torch.where(valid, plan.levels(), 1)
        li = torch.log2(level.double()).round().long()
        n_rows = torch.where(valid, rows[li, kb, 1], 0)
        if plan.window is not None:
            qb = torch.arange(nqb, device=dev)[:, None].expand_as(kb[0, 0])
            windowed = _window_needed(plan)[qb.expand_as(kb), kb]
        else:
            windowed = torch.zeros_like(valid)
        self.ent = torch.stack(
            [rows[li, kb, 0], n_rows, level, sizes[kb], windowed.long()], -1
        ).to(i32).contiguous()
        self.ent_strides = _broadcast_strides(self.ent)

        if plan.token_keep is not None:
            self.keep = plan.token_keep.to(torch.int8).contiguous()
            self.keep_strides = _broadcast_strides(self.keep)
        else:
            self.keep = torch.zeros(1, dtype=torch.int8, device=dev)
            self.keep_strides = (0, 0)

        if plan.window is not None:
            w = plan.window
            self.coords = w.coords.to(i32).contiguous()
            self.lo = w.lo.to(i32).contiguous()
            self.hi = w.hi.to(i32).contiguous()
            self.dil = torch.tensor(w.dilation, dtype=i32, device=dev)
        else:
            self.coords = self.lo = self.hi = self.dil = torch.ones(3, dtype=i32, device=dev)

        n_ranges = len(LEVELS) * nkb
        level_of_range = torch.tensor(LEVELS, device=dev).repeat_interleave(nkb)
        self.ranges = torch.stack(
            [rows[..., 0].reshape(-1), rows[..., 1].reshape(-1), level_of_range, sizes.repeat(len(LEVELS))], -1
        ).to(i32).contiguous()
        self.n_ranges = n_ranges

        # Inverted lists: sort the valid entries by (plan batch, plan head, range).
        Bp, Hp = plan.kv_index.shape[:2]
        bh = torch.arange(Bp * Hp, device=dev).view(Bp, Hp, 1, 1).expand_as(kb)
        key = (bh * n_ranges + li * nkb + kb)[valid]
        order = torch.argsort(key, stable=True)
        qb_of = torch.arange(nqb, device=dev).view(1, 1, nqb, 1).expand_as(kb)[valid]
        j_of = torch.arange(plan.max_kv, device=dev).view(1, 1, 1, -1).expand_as(kb)[valid]
        counts = torch.bincount(key, minlength=Bp * Hp * n_ranges)
        self.rowptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(i32)
        self.list_qb = qb_of[order].to(i32).contiguous()
        self.list_j = j_of[order].to(i32).contiguous()
        if self.list_qb.numel() == 0:
            self.list_qb = self.list_j = torch.zeros(1, dtype=i32, device=dev)
        self.rowptr_strides = (Hp * n_ranges if Bp > 1 else 0, n_ranges if Hp > 1 else 0)
        self.has_keep = plan.token_keep is not None
        # The kernels' WINDOW switch: 0 none, 1 a window, 2 a dilated one (needs a modulo).
        self.window_mode = 0 if plan.window is None else 2 if any(d > 1 for d in plan.window.dilation) else 1


def _precision(q: torch.Tensor) -> str:
    # TF32 would cost float32 inputs ~1e-3 relative error; 16-bit inputs ignore this.
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _extra_args(extra: ExtraKeys | None, q: torch.Tensor):
    if extra is None:
        dummy = q.new_zeros(1)
        return dummy, dummy, torch.zeros(1, dtype=torch.int8, device=q.device), 0
    mask = extra.mask if extra.mask is not None else torch.zeros(1, dtype=torch.bool, device=q.device)
    return extra.k.contiguous(), extra.v.contiguous(), mask.to(torch.int8).contiguous(), extra.k.shape[1]


def _rows(kernel, q, k_all, v_all, out, do, lse, delta, t: PlanTables, extra, scale, backward):
    B, N, H, D = q.shape
    ek, ev, emask, n_extra = _extra_args(extra, q)

    def grid(meta):
        return (t.n_q_blocks * triton.cdiv(t.q_block_max, meta["BLOCK_M"]), B * H)

    kernel[grid](
        q, k_all, v_all, out, do, lse, delta,
        t.q_offsets, t.ent, *t.ent_strides,
        t.keep, *t.keep_strides,
        t.coords, t.lo, t.hi, t.dil,
        ek, ev, emask,
        N, k_all.shape[1], n_extra, H, t.max_kv, t.q_block_max,
        scale * _k.LOG2E, scale,
        HEAD_D=D, HEAD_DV=v_all.shape[-1], HAS_KEEP=t.has_keep, WINDOW=t.window_mode,
        HAS_EXTRA=n_extra > 0, EXTRA_MASK=extra is not None and extra.mask is not None,
        BACKWARD=backward, UPCAST=_k.INTERPRET, PRECISION=_precision(q),
    )


def _keys(q, k, v, do, lse, delta, dk, dv, t: PlanTables, scale, *, ranges, n_ranges, block_max,
          mask=None, all_queries=False):
    B, N, H, D = q.shape

    def grid(meta):
        return (n_ranges * triton.cdiv(block_max, meta["BLOCK_N"]), B * H)

    _k._keys_bwd[grid](
        q, k, v, do, lse, delta, dk, dv,
        t.q_offsets, t.n_q_blocks, ranges, t.rowptr, t.list_qb, t.list_j, *t.rowptr_strides,
        t.ent, *t.ent_strides, t.keep, *t.keep_strides, t.max_kv,
        t.coords, t.lo, t.hi, t.dil, mask if mask is not None else t.keep,
        N, k.shape[1], H, n_ranges, block_max,
        scale * _k.LOG2E, scale,
        HEAD_D=D, HEAD_DV=v.shape[-1], HAS_KEEP=t.has_keep and not all_queries,
        WINDOW=0 if all_queries else t.window_mode, ALL_QUERIES=all_queries,
        COL_MASK=mask is not None, UPCAST=_k.INTERPRET, PRECISION=_precision(q),
    )


class PlanAttentionFunction(torch.autograd.Function):
    """Sparse attention over stacked keys ``k_all``/``v_all`` ``[B, NK, H, D]`` and optional
    extra keys ``ek``/``ev`` ``[B, Ne, H, D]``; ``q`` ``[B, N, H, D]`` -> ``[B, N, H, Dv]``."""

    @staticmethod
    def forward(ctx, q, k_all, v_all, ek, ev, emask, tables: PlanTables, scale: float):
        B, N, H, _ = q.shape
        extra = None if ek is None else ExtraKeys(ek, ev, emask)
        out = q.new_empty(B, N, H, v_all.shape[-1])
        lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
        _rows(_k._rows_fwd, q, k_all, v_all, out, q, lse, lse, tables, extra, scale, backward=False)
        ctx.save_for_backward(q, k_all, v_all, ek, ev, emask, out, lse)
        ctx.tables, ctx.scale = tables, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k_all, v_all, ek, ev, emask, out, lse = ctx.saved_tensors
        t, scale = ctx.tables, ctx.scale
        extra = None if ek is None else ExtraKeys(ek, ev, emask)
        do = dout.contiguous()
        delta = (do.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, N]
        dq = torch.empty_like(q)
        _rows(_k._rows_dq, q, k_all, v_all, dq, do, lse, delta, t, extra, scale, backward=True)
        dk = torch.empty_like(k_all)
        dv = torch.empty_like(v_all)
        _keys(q, k_all, v_all, do, lse, delta, dk, dv, t, scale,
              ranges=t.ranges, n_ranges=t.n_ranges, block_max=t.k_block_max)
        dek = dev = None
        if ek is not None:
            n_extra = ek.shape[1]
            dek = torch.empty_like(ek)
            dev = torch.empty_like(ev)
            whole = torch.tensor([[0, n_extra, 1, n_extra]], dtype=torch.int32, device=q.device)
            mask = None if emask is None else emask.to(torch.int8).contiguous()
            _keys(q, ek, ev, do, lse, delta, dek, dev, t, scale, ranges=whole, n_ranges=1,
                  block_max=n_extra, mask=mask, all_queries=True)
        return dq, dk, dv, dek, dev, None, None, None


def plan_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    extra: ExtraKeys | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Execute ``plan`` with the Triton kernels (differentiable).

    Args:
        q, k, v: ``[B, N, heads, D]`` / ``[B, N, heads, Dv]`` in plan order, on the GPU (or
            on the CPU under ``TRITON_INTERPRET=1``).
        plan: any plan, its tensors on q's device.
        extra: always-attended keys ``[B, Ne, heads, D]`` and optional ``[B, Ne]`` mask.
        scale: logit scale, ``D ** -0.5`` if ``None``.

    Returns:
        ``[B, N, heads, Dv]`` in plan order, q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    valid = plan.kv_index >= 0
    used = {int(p) for p in plan.levels()[valid].unique().tolist()}
    k, v = k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
    k_all, v_all, rows = pyramid(k, v, plan.k_offsets, tuple(sorted(used)))
    tables = PlanTables(plan, rows)
    ek = ev = emask = None
    if extra is not None and extra.k.shape[1] > 0:
        ek, ev, emask = extra.k.to(q.dtype).contiguous(), extra.v.to(q.dtype).contiguous(), extra.mask
    return PlanAttentionFunction.apply(q.contiguous(), k_all, v_all, ek, ev, emask, tables, scale)


__all__ = ["PlanAttentionFunction", "PlanTables", "plan_attention"]
