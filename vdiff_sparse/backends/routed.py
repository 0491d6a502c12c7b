"""Key-major execution of per-token-routed plans (VMoBA): attend each query only to its own
blocks, merge the partial softmaxes by their log-sum-exp.

The query-major gather path gives a query tile the union of the key blocks its queries chose
and masks per token, so with per-token routing it does the union's work (often most blocks).
Here the work follows the routing exactly:

1. The plan's ``token_keep`` is turned into (query, key block) pairs, grouped by
   ``(batch, head, key block)``; each group's queries are cut into *tasks* of
   :data:`QUERIES_PER_TASK` queries (the last one padded) that attend that one block's keys.
   The extra (text) keys are one more "block" per batch, attended by every query in tasks too.
2. A chunk is some tasks of one group (bounded by ``chunk_bytes``): the group's keys are
   gathered once, and the tasks, which share them, are one query sequence for one fused
   attention call that returns every query's output and log-sum-exp (LSE).
3. A query's partial results (one per block it chose, plus the extra keys) are merged into one
   softmax online: running max, denominator and numerator per query, gathered and written
   back per chunk (a group holds each query once), so memory is the output plus one chunk.
4. Backward is the flash-attention split-KV backward, chunk by chunk over the same tasks: with
   the *final* output and LSE of each query, a task's share of dq, dk, dv is exactly the
   single-softmax gradient restricted to its keys, and it is scattered (``index_add_``) into
   the input gradients. Nothing per pair is stored between forward and backward.

On CPU the fused call is ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its
backward), which returns the LSE; elsewhere a matmul softmax over the same sequence does the same.

Supported plans (:func:`routed_supported`): ``token_keep`` given, every entry full resolution
(level 1), no coordinate window. Queries with no key at all get output 0, like the reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ..plan import AttentionPlan
from .base import ExtraKeys

DEFAULT_CHUNK_BYTES = 4 * 2**20
# Queries per task: the last task of a group is padded to it, so smaller pads less (a run's
# tasks are one sequence to the kernel, so task size does not set its tile size); 32 keeps the
# padding and the task tables small.
QUERIES_PER_TASK = 32
# On CPU, aten's flash-attention op, which returns the LSE without materialising a chunk's
# probabilities; tests switch it off to check the matmul path that other devices use.
FUSED_CPU = True


def routed_supported(plan: AttentionPlan) -> bool:
    """Whether :func:`routed_attention` can run ``plan``: per-token routing (``token_keep``),
    every entry at full resolution, no coordinate window."""
    return (
        plan.token_keep is not None
        and plan.window is None
        and (plan.kv_level is None or bool((plan.kv_level == 1).all()))
    )


@dataclass
class _TaskSet:
    """Tasks of one (batch, head) with the same number of keys ``W``, attending one key source.

    Key rows of task ``t`` (into the source flattened to ``[B * Nk * heads, D]``) are
    ``key_base + key_table[key_group[t]]``; its query rows (into q flattened to
    ``[B * N * heads, D]``) are ``query_rows[t]``, with ``Q = B * N * heads`` in pad slots.

    Tasks are grouped into *runs* (``run_bounds``, task indices) that share their keys (one
    key block) and never repeat a query row. A chunk never spans two runs, so it gathers its
    keys once and its merge is a plain gather and write-back of each query's running state.

    Attributes:
        source: 0 for the video keys, 1 for the extra keys.
        key_table: ``[groups, W]`` int64 row offsets of each key group (a block's tokens, in
            whichever token order the inputs have) relative to ``key_base``.
        key_group: ``[n]`` int64 row of ``key_table`` of each task.
        key_base: the (batch, head)'s offset into the key rows.
        query_rows: ``[n, QUERIES_PER_TASK]``, int32 where rows fit (:func:`_row_dtype`).
        run_bounds: ``[0, ..., n]`` Python ints.
    """

    source: int
    key_table: torch.Tensor
    key_group: torch.Tensor
    key_base: int
    query_rows: torch.Tensor
    run_bounds: list[int]


def _row_dtype(Q: int) -> torch.dtype:
    """Dtype of the query row tables: int32 (half of int64's memory; a chunk's rows become
    int64 when gathered) unless the ``Q + 1`` rows (pad sink included) need more."""
    return torch.int32 if Q < 2**31 - 1 else torch.long


def _chosen_blocks(token_keep: torch.Tensor, kv_index: torch.Tensor, q_block: torch.Tensor, nkb: int,
                   positions_per_step: int = 4096) -> torch.Tensor:
    """``[nkb, N]`` bool: plan position ``i`` uses key block ``j`` (one (batch, head)).

    Args:
        token_keep: ``[N, E]`` bool, the plan's per-position keep flags.
        kv_index: ``[n_q_blocks, E]`` key block per slot, ``nkb`` on unused slots.
        q_block: ``[N]`` query tile of each plan position.

    A block listed twice in a tile counts once. Built from the kept (position, slot) entries,
    a slice of positions at a time, so the index temporaries stay small.
    """
    N, E = token_keep.shape
    chosen = torch.zeros(nkb + 1, N, dtype=torch.bool, device=token_keep.device)
    for start in range(0, N, positions_per_step):
        kept = token_keep[start:start + positions_per_step].flatten().nonzero().squeeze(1)
        position = kept.div(E, rounding_mode="floor").add_(start)  # kept = local position * E + slot
        block = kv_index.flatten()[q_block[position].mul_(E).add_(kept.remainder_(E))]
        chosen.view(-1)[block.mul_(N).add_(position)] = True
    return chosen[:nkb]


def _row_counts(chosen: torch.Tensor, elements_per_step: int = 2**17) -> torch.Tensor:
    """``[nkb]`` True count of each row of ``chosen [nkb, N]``, a few rows at a time: a
    reduction of a bool tensor first widens it to int64 (8x the map's memory)."""
    step = max(1, elements_per_step // chosen.shape[1])
    return torch.cat([chosen[j:j + step].sum(1) for j in range(0, chosen.shape[0], step)])


def _fill_runs(position: torch.Tensor, chosen: torch.Tensor, counts: torch.Tensor, run_start: torch.Tensor,
               blocks_per_step: int = 32) -> None:
    """Write the positions chosen by each key block ``j`` (``chosen [nkb, N]``, ``counts
    [nkb]``) to ``position[run_start[j]:][:counts[j]]``, ascending. One ``nonzero`` per
    ``blocks_per_step`` blocks: few calls (no per-block loop on the hot path), small temporaries."""
    nkb, N = chosen.shape
    for j0 in range(0, nkb, blocks_per_step):
        flat = chosen[j0:j0 + blocks_per_step].flatten().nonzero().squeeze(1)  # (block, position) order
        block = flat.div(N, rounding_mode="floor")
        step_counts = counts[j0:j0 + blocks_per_step]
        first = step_counts.cumsum(0) - step_counts  # index in ``flat`` of each block's first pair
        rank = torch.arange(flat.numel(), device=flat.device) - first[block]
        position[run_start[j0 + block] + rank] = flat.remainder_(N)


def _video_tasks(plan: AttentionPlan, B: int, H: int, per_task: int, original_order: bool) -> Iterator[_TaskSet]:
    """Task sets of every (batch, head) group of chosen (query, block) pairs, made one
    (batch, head) at a time when the caller gets to it (so only one head's tables exist);
    rows address q, k, v in plan order, or in the original token order (through ``plan.perm``)."""
    N, nkb = plan.num_tokens, plan.num_k_blocks
    Q = B * N * H
    dev = plan.kv_index.device
    k_starts, k_sizes = plan.k_offsets[:-1], plan.k_offsets.diff()
    q_block = plan.query_block_of_position()
    # Token (row of q/k/v) of each plan position.
    token_of = plan.perm if original_order and plan.perm is not None else torch.arange(N, device=dev)
    # Per key block width: the key rows of each block of that width (shared by all heads) and
    # the row of that table of each block. An empty block adds nothing to the softmax.
    tables = []
    for w in k_sizes.unique().tolist():
        if w > 0:
            blocks = (k_sizes == w).nonzero().squeeze(1)
            row_of_block = torch.full((nkb,), -1, dtype=torch.long, device=dev)
            row_of_block[blocks] = torch.arange(blocks.numel(), device=dev)
            tables.append((w, token_of[k_starts[blocks, None] + torch.arange(w, device=dev)] * H, row_of_block))
    # kv_index and token_keep may broadcast over batch and heads independently.
    bp = max(plan.kv_index.shape[0], plan.token_keep.shape[0])
    hp = max(plan.kv_index.shape[1], plan.token_keep.shape[1])
    # Unused slots name the extra block nkb, dropped below.
    kv_index = torch.where(plan.kv_index >= 0, plan.kv_index, nkb).expand(bp, hp, -1, -1)
    token_keep = plan.token_keep.expand(bp, hp, -1, -1)
    for pb in range(bp):
        for ph in range(hp):
            chosen = _chosen_blocks(token_keep[pb, ph], kv_index[pb, ph], q_block, nkb)
            counts = _row_counts(chosen)
            tasks = (counts + per_task - 1) // per_task
            task_block = torch.repeat_interleave(torch.arange(nkb, device=dev), tasks)
            # Plan positions of each block's queries, block after block, each block's run
            # padded to whole tasks (pad = -1); filled a block at a time: no per-pair tables.
            position = torch.full((int(tasks.sum()) * per_task,), -1, dtype=torch.long, device=dev)
            _fill_runs(position, chosen, counts, (tasks.cumsum(0) - tasks) * per_task)
            del chosen
            pad = position < 0
            token = token_of[position.clamp_(min=0)]
            del position
            # Tasks are in block order, so each block's tasks are a run.
            picks = []
            for w, table, row_of_block in tables:
                pick = (k_sizes[task_block] == w).nonzero().squeeze(1)
                if pick.numel() == task_block.numel():  # one width (blocks tile the grid): views
                    pick = slice(None)
                runs = torch.unique_consecutive(task_block[pick], return_counts=True)[1]
                picks.append((table, row_of_block[task_block[pick]], pick, [0, *runs.cumsum(0).tolist()]))
            # A plan shared over batch or heads serves every (b, h) it covers.
            for b in range(B) if bp == 1 else (pb,):
                for h in range(H) if hp == 1 else (ph,):
                    rows = token.add(b * N).mul_(H).add_(h).masked_fill_(pad, Q).to(_row_dtype(Q)).view(-1, per_task)
                    for table, key_group, pick, bounds in picks:
                        yield _TaskSet(0, table, key_group, b * N * H + h, rows[pick], bounds)
                    del rows
            del token, pad, picks, task_block  # before the next head's tables are made


def _extra_tasks(extra: ExtraKeys, B: int, N: int, H: int, per_task: int) -> Iterator[_TaskSet]:
    """Every query of batch ``b`` attends the real extra keys of ``b``: one task set per
    (batch, head), made when the caller gets to it."""
    dev = extra.k.device
    ne = extra.k.shape[1]
    Q = B * N * H
    n_tasks = -(-N // per_task)
    token = torch.arange(n_tasks * per_task, device=dev)
    for b in range(B):
        real = torch.arange(ne, device=dev) if extra.mask is None else extra.mask[b].nonzero().squeeze(1)
        if real.numel() == 0:
            continue
        for h in range(H):
            rows = torch.where(token < N, (b * N + token) * H + h, Q).to(_row_dtype(Q))
            yield _TaskSet(1, ((b * ne + real) * H)[None], torch.zeros(n_tasks, dtype=torch.long, device=dev),
                           h, rows.view(n_tasks, per_task), [0, n_tasks])


def _fused(device: torch.device, d: int, dv: int) -> bool:
    """Whether to use the CPU flash-attention op (returns the LSE; needs equal q and v head
    dims) or matmuls."""
    return FUSED_CPU and device.type == "cpu" and d == dv


def _attend(q, k, v, scale):
    """Attention of ``[c, T, D]`` queries (one run's tasks) to the run's ``[W, D]`` keys:
    output ``[c, T, Dv]`` and log-sum-exp ``[c, T]``. The tasks share their keys, so they are
    one query sequence of ``c * T``, which the CPU flash kernel tiles with larger query blocks
    than it would a batch of short tasks."""
    c, T, D = q.shape
    if _fused(q.device, D, v.shape[-1]):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.reshape(1, 1, c * T, D), k[None, None], v[None, None], scale=scale
        )
        return out.view(c, T, -1), lse.view(c, T)
    s = torch.mm(q.reshape(c * T, D), k.t()).mul_(scale)
    m = s.amax(-1, keepdim=True)
    p = s.sub_(m).exp_()
    total = p.sum(-1, keepdim=True)
    return torch.mm(p, v).div_(total).view(c, T, -1), (m + total.log()).view(c, T)


def _attend_backward(grad_out, q, k, v, out, lse, scale):
    """Gradients ``(dq [c, T, D], dk [W, D], dv [W, Dv])`` of one chunk's tasks given every
    query's final output and LSE (``[c, T, .]``, ``[c, T]``): the flash-attention backward
    restricted to the run's keys ``k``, ``v`` ``[W, .]``."""
    c, T, D = q.shape
    if _fused(q.device, D, v.shape[-1]):
        def seq(x):
            return x.reshape(1, 1, c * T, x.shape[-1])

        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            seq(grad_out), seq(q), k[None, None], v[None, None], seq(out),
            lse.reshape(1, 1, c * T), 0.0, False, scale=scale,
        )
        return dq.view(c, T, D), dk.view(k.shape), dv.view(v.shape)
    q2, go, o2 = q.reshape(c * T, D), grad_out.reshape(c * T, -1), out.reshape(c * T, -1)
    p = torch.mm(q2, k.t()).mul_(scale).sub_(lse.reshape(-1, 1)).exp_()
    dv = torch.mm(p.t(), go)
    delta = (go * o2).sum(-1, keepdim=True)
    ds = torch.mm(go, v.t()).sub_(delta).mul_(p).mul_(scale)
    return torch.mm(ds, k).view(c, T, D), torch.mm(ds.t(), q2), dv


class _Problem:
    """The task sets of one call and how to walk them in chunks."""

    def __init__(self, q, k, v, plan: AttentionPlan, extra: ExtraKeys | None, scale: float,
                 chunk_bytes: int, original_order: bool):
        B, N, H, D = q.shape
        self.shape = (B, N, H, D, v.shape[-1])
        self.scale, self.chunk_bytes = scale, chunk_bytes
        self.compute_dtype = torch.promote_types(q.dtype, torch.float32)
        self.plan, self.extra, self.original_order = plan, extra, original_order
        self.device = q.device

    def task_sets(self) -> Iterator[_TaskSet]:
        """Every task set, made afresh on each walk (forward, then again in backward): the
        tables of one (batch, head) at a time, nothing per pair kept between the two."""
        B, N, H = self.shape[:3]
        yield from _video_tasks(self.plan, B, H, QUERIES_PER_TASK, self.original_order)
        if self.extra is not None:
            yield from _extra_tasks(self.extra, B, N, H, QUERIES_PER_TASK)

    def chunks(self, backward: bool):
        """``(task set, its tasks start:stop)`` inside one run, with a chunk's temporaries
        about ``chunk_bytes``: per task, forward's q, out and merge terms, backward's q, dO,
        out and dq; plus the logits where they are materialised (the matmul path; the fused
        kernel keeps them per thread tile)."""
        _, _, _, D, Dv = self.shape
        item = torch.finfo(self.compute_dtype).bits // 8
        for ts in self.task_sets():
            T, W = ts.query_rows.shape[1], ts.key_table.shape[1]
            per_task = item * T * ((2 * D + 2 * Dv) if backward else (D + 3 * Dv))
            if not _fused(self.device, D, Dv):
                per_task += item * T * W
            step = max(1, self.chunk_bytes // per_task)
            for run_start, run_stop in zip(ts.run_bounds[:-1], ts.run_bounds[1:]):
                for start in range(run_start, run_stop, step):
                    yield ts, start, min(start + step, run_stop)

    def gather(self, ts, start, stop, q_flat, sources):
        """Query rows ``[c * T]`` (pads = Q), key rows ``[W]``, the chunk's q ``[c, T, D]``
        and the run's k, v ``[W, .]`` (gathered once for all of the chunk's tasks)."""
        rows = ts.query_rows[start:stop].long()
        c, T = rows.shape
        Q = q_flat.shape[0]
        key_rows = ts.key_base + ts.key_table[ts.key_group[start]]
        k_src, v_src = sources[ts.source]
        dt = self.compute_dtype
        qg = q_flat.index_select(0, rows.flatten().clamp(max=Q - 1)).view(c, T, -1).to(dt)
        kg = k_src.index_select(0, key_rows).to(dt)
        vg = v_src.index_select(0, key_rows).to(dt)
        return rows.flatten(), key_rows, qg, kg, vg

    def forward(self, q_flat, sources):
        """Output ``[Q, Dv]`` (compute dtype, contiguous) and LSE ``[Q]`` (``-inf`` for
        queries with no key)."""
        Q, Dv = q_flat.shape[0], self.shape[4]
        # Per query: the numerator, and the running max of the partial LSEs with the
        # denominator relative to it (column 0, 1 of ``stats``). Row Q is a sink for pad slots,
        # so the output is the numerator's first Q rows: contiguous, no copy.
        numerator = torch.zeros(Q + 1, Dv, dtype=self.compute_dtype, device=q_flat.device)
        stats = torch.zeros(Q + 1, 2, dtype=self.compute_dtype, device=q_flat.device)
        stats[:, 0] = float("-inf")
        for ts, start, stop in self.chunks(backward=False):
            rows, _, qg, kg, vg = self.gather(ts, start, stop, q_flat, sources)
            out, lse = _attend(qg, kg, vg, self.scale)
            # Online softmax merge; no query repeats within a chunk (pads all write the sink).
            # Few, whole-chunk ops: on a shared CPU each op can cost a thread wake-up.
            merged, merged_stats = numerator.index_select(0, rows), stats.index_select(0, rows)
            running_max, lse = merged_stats[:, 0], lse.reshape(-1)
            new_max = torch.maximum(running_max, lse)
            rescale = (running_max - new_max).exp_()  # of what the query had; 0 on its first
            weight = lse.sub(new_max).exp_()
            merged.mul_(rescale[:, None]).addcmul_(out.reshape(-1, Dv), weight[:, None])
            merged_stats[:, 1].mul_(rescale).add_(weight)
            merged_stats[:, 0] = new_max
            numerator.index_copy_(0, rows, merged)
            stats.index_copy_(0, rows, merged_stats)
        running_max, denominator = stats[:Q, 0], stats[:Q, 1]
        lse = running_max + denominator.log()  # -inf where a query has no key
        out = numerator[:Q].div_(torch.where(denominator > 0, denominator, 1.0)[:, None])
        return out, lse

    def backward(self, grad_out, out, lse, q_flat, sources, needs):
        """``dq`` ``[Q, D]`` and per source ``(dk, dv)`` (compute dtype), from the final
        ``out`` ``[Q, Dv]`` and ``lse`` ``[Q]``."""
        Q, Dv = q_flat.shape[0], self.shape[4]
        dt = self.compute_dtype
        grad_q = torch.zeros(q_flat.shape, dtype=dt, device=q_flat.device)
        grads_kv = [
            None if src is None or not needs[i] else
            (torch.zeros(src[0].shape, dtype=dt, device=src[0].device),
             torch.zeros(src[1].shape, dtype=dt, device=src[1].device))
            for i, src in enumerate(sources)
        ]
        for ts, start, stop in self.chunks(backward=True):
            rows, key_rows, qg, kg, vg = self.gather(ts, start, stop, q_flat, sources)
            c, T = qg.shape[:2]
            pad = rows == Q
            rows = rows.clamp(max=Q - 1)
            # Pad slots: zero output gradient and +inf LSE make their probabilities and every
            # gradient they would add exactly 0.
            go = grad_out.index_select(0, rows).to(dt).masked_fill_(pad[:, None], 0.0).view(c, T, Dv)
            og = out.index_select(0, rows).view(c, T, Dv)
            lg = lse.index_select(0, rows).masked_fill_(pad, float("inf")).view(c, T)
            dq, dk, dv = _attend_backward(go, qg, kg, vg, og, lg, self.scale)
            grad_q.index_add_(0, rows, dq.reshape(c * T, -1))
            if grads_kv[ts.source] is not None:
                grads_kv[ts.source][0].index_add_(0, key_rows, dk)
                grads_kv[ts.source][1].index_add_(0, key_rows, dv)
        return grad_q, grads_kv


class _RoutedFunction(torch.autograd.Function):
    """Autograd around :class:`_Problem`: q, k, v, extra k, extra v ``[B, N|Ne, heads, D]``."""

    @staticmethod
    def forward(ctx, problem, q, k, v, extra_k, extra_v):
        B, N, H, _, Dv = problem.shape
        q_flat, sources = _flat_inputs(q, k, v, extra_k, extra_v)
        out, lse = problem.forward(q_flat, sources)
        ctx.problem = problem
        ctx.save_for_backward(q, k, v, extra_k, extra_v, out, lse)
        return out.view(B, N, H, Dv).to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, extra_k, extra_v, out, lse = ctx.saved_tensors
        problem = ctx.problem
        q_flat, sources = _flat_inputs(q, k, v, extra_k, extra_v)
        needs = (ctx.needs_input_grad[2] or ctx.needs_input_grad[3],
                 ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
        grad_flat = grad_out.reshape(q_flat.shape[0], -1)
        grad_q, grads_kv = problem.backward(grad_flat, out, lse, q_flat, sources, needs)
        grads = [grad_q.view(q.shape).to(q.dtype)]
        for (key, value), g in zip(((k, v), (extra_k, extra_v)), grads_kv):
            if g is None:
                grads += [None, None]
            else:
                grads += [g[0].view(key.shape).to(key.dtype), g[1].view(value.shape).to(value.dtype)]
        return (None, *grads)


def _flat_inputs(q, k, v, extra_k, extra_v):
    """q as rows ``[B * N * heads, D]`` and the key sources (video, extra) likewise."""
    def rows(x):
        return x.reshape(-1, x.shape[-1])

    extra = None if extra_k is None else (rows(extra_k), rows(extra_v))
    return rows(q), [(rows(k), rows(v)), extra]


def routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    extra: ExtraKeys | None = None,
    scale: float | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    original_order: bool = False,
) -> torch.Tensor:
    """Execute a per-token-routed ``plan`` key-major (see the module docstring).

    Args:
        q, k, v: ``[B, N, heads, D]`` in plan order (original order if ``original_order``).
        plan: a plan with :func:`routed_supported` true.
        extra: always-attended keys ``[B, Ne, heads, D]`` with an optional ``[B, Ne]`` mask.
        scale: logit scale, ``D ** -0.5`` if ``None``.
        chunk_bytes: soft bound on the gathered rows of one chunk of tasks.
        original_order: q, k, v and the output are in the original token order; the task
            rows go through ``plan.perm``, so no reordered copies are made.

    Returns:
        ``[B, N, heads, Dv]`` in plan order (original order if ``original_order``), dtype of q; differentiable in q, k, v and the
        extra keys and values.
    """
    if not routed_supported(plan):
        raise NotImplementedError(
            "routed_attention needs token_keep, full-resolution entries and no window"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if plan.kv_index.device != q.device:
        plan = plan.to(q.device)
    problem = _Problem(q, k, v, plan, extra, scale, chunk_bytes, original_order)
    ek = ev = None
    if extra is not None:
        ek, ev = extra.k.contiguous(), extra.v.contiguous()
    return _RoutedFunction.apply(problem, q.contiguous(), k.contiguous(), v.contiguous(), ek, ev)


__all__ = ["DEFAULT_CHUNK_BYTES", "routed_attention", "routed_supported"]
