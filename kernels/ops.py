"""Launches, the custom op ``vdiff_sparse::plan_attention`` and the entry point :func:`plan_attention`.

:func:`plan_attention` stacks the pooled key/value pyramid the plan needs (:mod:`.pooling`,
differentiable), builds the tables of the kernel family that runs the plan
(:func:`~.tables.plan_tables`: per-token routing :mod:`.routed`, a coordinate window over a
grid :mod:`.window`, anything else :mod:`.blocks`) and calls the custom op with the tables
flattened into tensors and ints (:func:`~.tables.flatten`):

* ``vdiff_sparse::plan_attention(q, k_all, v_all, ek?, ev?, emask?, tables, ints, family, scale)
  -> (out [B, N, H, Dv], lse [B, H, N] float32)``: the forward launches;
* ``vdiff_sparse::plan_attention_backward(dout, ..., out, lse, tables, ints, family, scale)
  -> (dq, dk_all, dv_all, dek, dev)``: the ``dq`` and ``dk``/``dv`` launches (``dek``/``dev``
  empty without extra keys), the op's registered autograd formula (not itself differentiable).

Both have fake implementations (output shapes from the inputs'), so ``torch.compile`` traces
through them with ``fullgraph=True``: table building and pooling are plain torch code in the
graph, and neither reads anything back from the device when the plan carries its
:class:`~vdiff_sparse.plan.PlanFacts` (planners give them), nor does anything inside the ops
(small constant tables are written by fills, not host-to-device copies): nothing makes the
host wait for the device, as CUDA-graph capture requires (after a warm-up call has autotuned
the launches; not yet run on a GPU). What still reads the device: a plan made on a GPU by hand, without
facts (read per call, :func:`~vdiff_sparse.plan.plan_facts`) or without ``tokens``, and the
round count of a routed plan on the CPU (exact there, where reading is free; a bound elsewhere,
see :class:`~.tables.RoutedTables`).

The ops are defined when this module first loads (importing :mod:`vdiff_sparse` loads no
kernel); a reload (a change of ``TRITON_INTERPRET``) keeps them, and their bodies call this
module's functions, which the reload replaced. Gradients of pooled rows flow back to the
un-pooled keys through autograd of the pooling.

:func:`count_work` switches on the kernels' work counters (a debug aid for the tests).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from vdiff_sparse.plan import AttentionPlan, ExtraKeys

from . import blocks, common, routed, window
from .pooling import pyramid
from .tables import (BlockTables, BoxTables, ExtraRound, KeyRanges, RoutedTables, WindowArgs, device_ints, flatten,
                     plan_tables, unflatten)
from .tiles import TileChoice, keys_block_n, launch_tiles

PASSES = ("forward", "dq", "dkdv")


class WorkCounter:
    """Query-key pairs of the tiles the kernels computed, per pass (``forward``, ``dq``,
    ``dkdv``), while :func:`count_work` is active."""

    def __init__(self, device):
        self.counters = {name: torch.zeros(1, dtype=torch.int64, device=device) for name in PASSES}

    def totals(self) -> dict[str, int]:
        return {name: int(c.item()) for name, c in self.counters.items()}


_counter: WorkCounter | None = None


@contextlib.contextmanager
def count_work(device="cpu"):
    """Count the pairs of every tile the kernels compute inside the block (masked lanes
    included); yields the :class:`WorkCounter`. The counting kernels are separate variants:
    for tests, not for timing."""
    global _counter
    previous, _counter = _counter, WorkCounter(device)
    try:
        yield _counter
    finally:
        _counter = previous


def _launch_args(pass_name: str, q: torch.Tensor, backward: bool | None = None) -> dict:
    """Keyword arguments every launch takes: the work counter, the interpreter's upcast, the
    dot precision (TF32 would cost float32 inputs ~1e-3 relative error; 16-bit inputs ignore
    it) and ``BACKWARD`` for the kernels that have both passes."""
    work = _counter.counters[pass_name] if _counter is not None else q.new_zeros(1, dtype=torch.int64)
    args = dict(WORK=work, COUNT_WORK=_counter is not None, UPCAST=common.INTERPRET,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if backward is not None:
        args["BACKWARD"] = backward
    return args


def _no_mask(q: torch.Tensor) -> torch.Tensor:
    """Placeholder of a key mask argument (never read)."""
    return torch.zeros(1, dtype=torch.int8, device=q.device)


@dataclass
class _Extra:
    """The extra keys as kernel arguments (placeholders when there are none)."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    n: int
    has_mask: int

    @classmethod
    def of(cls, ek, ev, emask, q):
        if ek is None:
            dummy = q.new_zeros(1)
            return cls(dummy, dummy, _no_mask(q), 0, 0)
        mask = _no_mask(q) if emask is None else emask.to(torch.int8).contiguous()
        return cls(ek, ev, mask, ek.shape[1], int(emask is not None))


def _level_rowptr(rowptr: torch.Tensor, ranges: KeyRanges) -> torch.Tensor:
    """The inverted lists of one level: ``rowptr`` from the level's first (key block) range."""
    return rowptr[..., ranges.level * ranges.table.shape[0]:]


def _window_mode(win: WindowArgs) -> int:
    """The ``WINDOW`` switch of :mod:`.blocks`: 0 none, 1 a window, 2 a dilated one."""
    return 0 if not win.active else 2 if win.dilated else 1


def _keys(q, k, v, do, lse, delta, dk, dv, scale, *, ranges: KeyRanges, rowptr, rowptr_strides, items,
          gather: bool, win: WindowArgs, block_m: int, q_offsets, kmask=None):
    """``dk``/``dv`` of every key range of one level (:func:`blocks._keys_kernel`)."""
    B, N, H, D = q.shape
    blocks.keys_kernel[(ranges.table.shape[0] * ranges.sub, B * H)](
        q, k, v, do, lse, delta, dk, dv,
        ranges.table, ranges.sub, q_offsets, rowptr, items, *rowptr_strides,
        *win.args(),
        _no_mask(q) if kmask is None else kmask, int(kmask is not None),
        N, k.shape[1], H,
        scale * common.LOG2E, scale,
        BLOCK_M=block_m, BLOCK_N=ranges.block_n, HEAD_D=D, HEAD_DV=v.shape[-1], GATHER=gather,
        WINDOW=_window_mode(win), **_launch_args("dkdv", q),
    )


def _extra_dkdv(q, x: _Extra, do, lse, delta, scale, q_offsets, n_q_blocks: int, choice: TileChoice):
    """``dk``/``dv`` of the extra keys: one range that every query block uses."""
    dev = q.device
    n = x.n
    ranges = KeyRanges(device_ints([0, n], dev).view(1, 2), device_ints([n], dev), 1, 0, n,
                       keys_block_n(choice.keys, n))
    dek, dev_ = torch.empty_like(x.k), torch.empty_like(x.v)
    _keys(q, x.k, x.v, do, lse, delta, dek, dev_, scale, ranges=ranges,
          rowptr=device_ints([0, n_q_blocks], dev), rowptr_strides=(0, 0),
          items=torch.arange(n_q_blocks, dtype=torch.int32, device=dev), gather=False,
          win=WindowArgs(None, dev), block_m=choice.keys.block_m, q_offsets=q_offsets,
          kmask=x.mask if x.has_mask else None)
    return dek, dev_


class _QueryMajorRun:
    """A family whose forward is one query-major launch (``_rows``) writing O and the LSE."""

    def __init__(self, t):
        self.t = t

    def forward(self, q, k_all, v_all, x, scale):
        B, N, H, _ = q.shape
        out = q.new_empty(B, N, H, v_all.shape[-1])
        lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
        self._rows(q, k_all, v_all, out, q, lse, lse, x, scale, backward=False)
        return out, lse


class _BlockRun(_QueryMajorRun):
    """:mod:`.blocks`: query-major forward and ``dq``, key-major ``dk``/``dv`` per level."""

    t: BlockTables

    def _rows(self, q, k_all, v_all, o, do, lse, delta, x: _Extra, scale, backward: bool):
        t = self.t
        name = "dq" if backward else "forward"
        block_m, block_n, sub = t.passes[name]
        B, N, H, D = q.shape
        blocks.rows_kernel[(t.n_q_blocks * sub, B * H)](
            q, k_all, v_all, o, do, lse, delta,
            t.q_offsets, t.ent, t.counts, t.rows_per_entry, *t.ent_strides, *t.counts_strides,
            *t.window.args(),
            x.k, x.v, x.mask, x.n, x.has_mask,
            N, k_all.shape[1], H, t.max_kv, sub,
            scale * common.LOG2E, scale,
            BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=D, HEAD_DV=v_all.shape[-1], WINDOW=_window_mode(t.window),
            **_launch_args(name, q, backward),
        )

    def backward(self, q, k_all, v_all, x, out, lse, do, delta, scale):
        t = self.t
        dq = torch.empty_like(q)
        self._rows(q, k_all, v_all, dq, do, lse, delta, x, scale, backward=True)
        dk, dv = torch.empty_like(k_all), torch.empty_like(v_all)
        for ranges in t.levels:
            _keys(q, k_all, v_all, do, lse, delta, dk, dv, scale, ranges=ranges, rowptr=_level_rowptr(t.rowptr, ranges),
                  rowptr_strides=t.rowptr_strides, items=t.list_qb, gather=False, win=t.window,
                  block_m=t.keys_block_m, q_offsets=t.q_offsets)
        return dq, dk, dv


class _BoxRun(_QueryMajorRun):
    """:mod:`.window`: every tile walks the box its windows span."""

    t: BoxTables

    def _rows(self, q, k, v, o, do, lse, delta, x: _Extra, scale, backward: bool):
        t, w = self.t, self.t.window
        B, N, H, D = q.shape
        window.box_rows_kernel[(t.q_tiles.shape[0], B * H)](
            q, k, v, o, do, lse, delta,
            t.q_tiles, t.pos_of_token, t.grid[1], t.grid[2], *w.args(),
            x.k, x.v, x.mask, x.n, x.has_mask,
            N, H,
            scale * common.LOG2E, scale,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, HEAD_D=D, HEAD_DV=v.shape[-1], MASKED=t.q_masked,
            DILATED=w.dilated, **_launch_args("dq" if backward else "forward", q, backward),
        )

    def backward(self, q, k, v, x, out, lse, do, delta, scale):
        t, w = self.t, self.t.window
        B, N, H, D = q.shape
        dq = torch.empty_like(q)
        self._rows(q, k, v, dq, do, lse, delta, x, scale, backward=True)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        window.box_keys_kernel[(t.k_tiles.shape[0], B * H)](
            q, k, v, do, lse, delta, dk, dv,
            t.k_tiles, t.pos_of_token, t.grid[1], t.grid[2], *w.args(),
            N, H,
            scale * common.LOG2E, scale,
            BLOCK_M=t.keys_block_m, BLOCK_N=t.keys_block_n, HEAD_D=D, HEAD_DV=v.shape[-1], MASKED=t.k_masked,
            DILATED=w.dilated, **_launch_args("dkdv", q),
        )
        return dq, dk, dv


class _RoutedRun:
    """:mod:`.routed`: one launch per round, the extra keys first; ``dk``/``dv`` per range
    over the gathered queries that chose it."""

    def __init__(self, t: RoutedTables):
        self.t = t

    def _rounds(self, q, k_all, v_all, do, lse, delta, acc, m, l, x: _Extra, scale, backward: bool):
        t = self.t
        B, N, H, D = q.shape
        shared = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, HEAD_D=D, HEAD_DV=v_all.shape[-1],
                      **_launch_args("dq" if backward else "forward", q, backward))
        if x.n > 0:
            extra = ExtraRound(q.device, N, x.n, t.block_m)
            routed.routed_rows_kernel[(extra.tasks.shape[2], B * H)](
                q, x.k, x.v, do, lse, delta, acc, m, l,
                extra.tasks, 0, 0, extra.pos, 0, 0, extra.ranges,
                x.mask, x.has_mask,
                N, x.n, H, scale * common.LOG2E, **shared,
            )
        for r in range(t.rounds):
            routed.routed_rows_kernel[(t.n_tasks, B * H)](
                q, k_all, v_all, do, lse, delta, acc, m, l,
                t.tasks[:, :, r], *t.tasks_strides, t.pos, *t.pos_strides, t.ranges,
                _no_mask(q), 0,
                N, k_all.shape[1], H, scale * common.LOG2E, **shared,
            )

    def forward(self, q, k_all, v_all, x, scale):
        B, N, H, _ = q.shape
        acc = torch.zeros(B, N, H, v_all.shape[-1], dtype=torch.float32, device=q.device)
        m = torch.full((B, H, N), float("-inf"), dtype=torch.float32, device=q.device)
        l = torch.zeros(B, H, N, dtype=torch.float32, device=q.device)
        self._rounds(q, k_all, v_all, q, m, l, acc, m, l, x, scale, backward=False)
        has = l > 0
        denominator = torch.where(has, l, 1.0).transpose(1, 2).unsqueeze(-1)
        out = (acc / denominator).to(q.dtype)
        lse = torch.where(has, m + torch.log2(torch.where(has, l, 1.0)), 0.0)
        return out, lse.contiguous()

    def backward(self, q, k_all, v_all, x, out, lse, do, delta, scale):
        t = self.t
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        state = lse.new_zeros(1)
        self._rounds(q, k_all, v_all, do, lse, delta, dq_acc, state, state, x, scale, backward=True)
        dk, dv = torch.empty_like(k_all), torch.empty_like(v_all)
        for ranges in t.levels:
            _keys(q, k_all, v_all, do, lse, delta, dk, dv, scale, ranges=ranges, rowptr=_level_rowptr(t.rowptr, ranges),
                  rowptr_strides=t.rowptr_strides, items=t.pos, gather=True, win=WindowArgs(None, q.device),
                  block_m=t.keys_block_m, q_offsets=t.q_offsets)
        return (dq_acc * scale).to(q.dtype), dk, dv


def _runner(tables):
    if isinstance(tables, RoutedTables):
        return _RoutedRun(tables)
    if isinstance(tables, BoxTables):
        return _BoxRun(tables)
    return _BlockRun(tables)


def _forward(q, k_all, v_all, ek, ev, emask, tables, ints, family: int, scale: float):
    """The body of ``vdiff_sparse::plan_attention`` (see the module docstring)."""
    run = _runner(unflatten(family, tables, ints))
    return run.forward(q, k_all, v_all, _Extra.of(ek, ev, emask, q), scale)


def _backward(dout, q, k_all, v_all, ek, ev, emask, out, lse, tables, ints, family: int, scale: float):
    """The body of ``vdiff_sparse::plan_attention_backward``."""
    t = unflatten(family, tables, ints)
    x = _Extra.of(ek, ev, emask, q)
    do = dout.contiguous()
    delta = (do.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, N]
    dq, dk, dv = _runner(t).backward(q, k_all, v_all, x, out, lse, do, delta, scale)
    if ek is None:
        return dq, dk, dv, q.new_empty(0), q.new_empty(0)
    choice = launch_tiles(max(q.shape[-1], v_all.shape[-1]), q.device)
    dek, dev = _extra_dkdv(q, x, do, lse, delta, scale, t.q_offsets, t.n_q_blocks, choice)
    return dq, dk, dv, dek, dev


def _setup_context(ctx, inputs, output) -> None:
    q, k_all, v_all, ek, ev, emask, tables, ints, family, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k_all, v_all, ek, ev, emask, out, lse, *tables)
    ctx.ints, ctx.family, ctx.scale = ints, family, scale
    ctx.mark_non_differentiable(lse)


def _grad(ctx, dout, _dlse):
    """The op's autograd formula: the backward op (gradients of q, k_all, v_all, ek, ev)."""
    q, k_all, v_all, ek, ev, emask, out, lse, *tables = ctx.saved_tensors
    dq, dk, dv, dek, dev = torch.ops.vdiff_sparse.plan_attention_backward(
        dout, q, k_all, v_all, ek, ev, emask, out, lse, tables, ctx.ints, ctx.family, ctx.scale)
    if ek is None:
        dek = dev = None
    return dq, dk, dv, dek, dev, None, [None] * len(tables), None, None, None


def _define_ops() -> None:
    """Define ``vdiff_sparse::plan_attention`` and its backward op, fake implementations and
    autograd formula. Their bodies look ``_forward``/``_backward`` up in this module's
    namespace at each call, so after a reload (which refreshes that namespace in place) they
    run the reloaded code; defining them again is not needed."""

    @torch.library.custom_op("vdiff_sparse::plan_attention", mutates_args=())
    def attention(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, ek: torch.Tensor | None,
                  ev: torch.Tensor | None, emask: torch.Tensor | None, tables: list[torch.Tensor], ints: list[int],
                  family: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward(q, k_all, v_all, ek, ev, emask, tables, ints, family, scale)

    @attention.register_fake
    def _(q, k_all, v_all, ek, ev, emask, tables, ints, family, scale):
        B, N, H, _ = q.shape
        return q.new_empty(B, N, H, v_all.shape[-1]), q.new_empty(B, H, N, dtype=torch.float32)

    @torch.library.custom_op("vdiff_sparse::plan_attention_backward", mutates_args=())
    def attention_backward(dout: torch.Tensor, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
                           ek: torch.Tensor | None, ev: torch.Tensor | None, emask: torch.Tensor | None,
                           out: torch.Tensor, lse: torch.Tensor, tables: list[torch.Tensor], ints: list[int],
                           family: int, scale: float,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward(dout, q, k_all, v_all, ek, ev, emask, out, lse, tables, ints, family, scale)

    @attention_backward.register_fake
    def _(dout, q, k_all, v_all, ek, ev, emask, out, lse, tables, ints, family, scale):
        extra = [q.new_empty(0) if x is None else torch.empty_like(x) for x in (ek, ev)]
        return torch.empty_like(q), torch.empty_like(k_all), torch.empty_like(v_all), *extra

    attention.register_autograd(_grad, setup_context=_setup_context)


if not hasattr(torch.ops.vdiff_sparse, "plan_attention"):
    _define_ops()


def op_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan,
                 extra: ExtraKeys | None = None, scale: float | None = None) -> tuple:
    """The operands of ``vdiff_sparse::plan_attention`` for :func:`plan_attention` (same
    arguments): ``q``, the stacked keys and values ``[B, N + pooled rows, heads, D|Dv]``, the
    extra keys, values and mask (``None`` without), the flattened tables and the scale."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    choice = launch_tiles(max(q.shape[-1], v.shape[-1]), q.device)
    k, v = k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
    tables, facts = plan_tables(plan, choice)
    k_all, v_all, _ = pyramid(k, v, plan.k_offsets, facts.rows_of())
    ek = ev = emask = None
    if extra is not None and extra.k.shape[1] > 0:
        ek, ev, emask = extra.k.to(q.dtype).contiguous(), extra.v.to(q.dtype).contiguous(), extra.mask
    family, tensors, ints = flatten(tables)
    return q.contiguous(), k_all, v_all, ek, ev, emask, tensors, ints, family, float(scale)


def plan_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    extra: ExtraKeys | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Execute ``plan`` with the Triton kernels (differentiable), through the custom op.

    Args:
        q, k, v: ``[B, N, heads, D]`` / ``[B, N, heads, Dv]`` in plan order, on the GPU (or
            on the CPU under ``TRITON_INTERPRET=1``).
        plan: any plan, its tensors on q's device (per-token routing together with a
            coordinate window is not supported).
        extra: always-attended keys ``[B, Ne, heads, D]`` and optional ``[B, Ne]`` mask.
        scale: logit scale, ``D ** -0.5`` if ``None``.

    Returns:
        ``[B, N, heads, Dv]`` in plan order, q's dtype.
    """
    out, _ = torch.ops.vdiff_sparse.plan_attention(*op_arguments(q, k, v, plan, extra, scale))
    return out


__all__ = ["PASSES", "WorkCounter", "count_work", "op_arguments", "plan_attention"]
