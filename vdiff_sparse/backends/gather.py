"""The PyTorch backend: gather the keys a plan selects and attend with fused SDPA.

Works on CPU and GPU, is differentiable through autograd, and keeps memory bounded.

How: every (batch, head, query block) is a *row*. Each row's selected key blocks, at every pool
level, plus the extra keys, are gathered into one key list with an additive bias (``ln count``
for pooled keys, ``-inf`` for pad slots and masked pairs), and one
``F.scaled_dot_product_attention`` call per chunk of rows does the softmax. Rows are sorted by
their number of keys, so a chunk pads only to the longest row among similar rows, and chunks
are sized so that their gathered keys fit ``chunk_bytes``. With gradients enabled each chunk is
recomputed in backward (activation checkpointing), so training memory is bounded the same way.
Blocks are padded to a common width; pad slots point at an appended zero token and are masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..plan import LEVELS, AttentionPlan
from .base import Backend, ExtraKeys

DEFAULT_CHUNK_BYTES = 32 * 2**20


def _padded_positions(offsets: torch.Tensor, multiple: int, pad: int):
    """``[n_blocks, width]`` plan positions of each block's tokens (``pad`` in unused slots)
    and the validity mask; ``width`` is the largest block rounded up to ``multiple``."""
    sizes = offsets.diff()
    width = max(int(sizes.max()), 1)
    width = -(-width // multiple) * multiple
    slot = torch.arange(width, device=offsets.device)
    valid = slot < sizes[:, None]
    pos = torch.where(valid, offsets[:-1, None] + slot, torch.full_like(slot, pad))
    return pos, valid


def _to_blocks(x: torch.Tensor, offsets: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``[B, N, H, D]`` -> ``[B, H, n_blocks, width, D]`` with zeros in pad slots.

    Blocks of equal size (but maybe a shorter last one) are a pad and a view; ragged blocks
    need a gather through ``pos`` (from :func:`_padded_positions`).
    """
    B, N, H, D = x.shape
    n_blocks, width = pos.shape
    xt = x.transpose(1, 2)
    if bool((offsets[:-1] == torch.arange(n_blocks, device=offsets.device) * width).all()):
        xt = F.pad(xt, (0, 0, 0, n_blocks * width - N))
        return xt.reshape(B, H, n_blocks, width, D)
    return torch.cat([xt, xt.new_zeros(B, H, 1, D)], 2)[:, :, pos]


class _Level:
    """One pool level: where its pooled keys sit in the flat key table, and each row's
    entries at this level."""

    def __init__(self, p, table_offset, width, index, drop, counts):
        self.p = p
        self.table_offset = table_offset  # first row of this level in the flat key table
        self.width = width  # pooled keys per block
        self.index = index  # [R, E] key block ids, packed to the front, -1 = unused
        self.drop = drop  # [B'|1, H'|1, N + 1, E] True where a query skips an entry, or None
        self.counts = counts  # entries used by each row (a list, in sorted row order)


class _Problem:
    """Everything the chunks need, prepared once per call.

    All keys any row can see (every pool level's pooled blocks and the extra keys, for every
    batch and head) sit in one flat table with a matching bias table (``ln count``, ``-inf``
    for pad slots and masked extra keys) and a final all-zero "null" key with bias ``-inf``.
    A chunk then builds one index list per row and does one gather: no concatenation of
    gathered keys.
    """

    def __init__(self, q, k, v, plan: AttentionPlan, extra: ExtraKeys | None, scale: float):
        B, N, H, D = q.shape
        self.plan, self.scale, self.extra = plan, scale, extra
        self.B, self.H, self.D, self.Dv = B, H, D, v.shape[-1]
        nqb, nkb = plan.num_q_blocks, plan.num_k_blocks
        self.rows = B * H * nqb
        dev = q.device

        self.q_pos, _ = _padded_positions(plan.q_offsets, 1, N)
        self.q_rows = _to_blocks(q, plan.q_offsets, self.q_pos).reshape(self.rows, -1, D)

        valid = plan.kv_index >= 0
        levels = plan.levels()
        present = [p for p in LEVELS if bool(((levels == p) & valid).any())]
        self.k_pos, k_valid = _padded_positions(plan.k_offsets, max(present, default=1), N)
        width = self.k_pos.shape[1]
        k_blocks = _to_blocks(k, plan.k_offsets, self.k_pos)  # [B, H, nkb, width, D]
        v_blocks = _to_blocks(v, plan.k_offsets, self.k_pos)

        # Row r = (b, h, query block); plan tensors may broadcast over b and h.
        r = torch.arange(self.rows, device=dev)
        self.row_b, self.row_h, self.row_qb = r // (H * nqb), (r // nqb) % H, r % nqb
        self.row_bh = self.row_b * H + self.row_h
        bp, hp = plan.kv_index.shape[:2]
        self.plan_b = self.row_b if bp > 1 else torch.zeros_like(r)
        self.plan_h = self.row_h if hp > 1 else torch.zeros_like(r)
        self.nkb = nkb

        key_parts, val_parts, bias_parts = [], [], []
        offset = 0
        self.levels: list[_Level] = []
        cost = torch.zeros(self.rows, device=dev)
        for p in present:
            use = valid & (levels == p)
            count = k_valid.view(nkb, width // p, p).sum(-1)
            bias = torch.where(count > 0, count.to(q.dtype).log(), float("-inf"))
            if p == 1:
                pk, pv = k_blocks, v_blocks
            else:
                denom = count.clamp(min=1).to(q.dtype)[:, :, None]
                pk = k_blocks.unflatten(3, (width // p, p)).sum(4) / denom
                pv = v_blocks.unflatten(3, (width // p, p)).sum(4) / denom
            key_parts.append(pk.reshape(-1, D))
            val_parts.append(pv.reshape(-1, self.Dv))
            bias_parts.append(bias.reshape(-1).repeat(B * H))
            e = int(use.sum(-1).max())
            order = (~use).to(torch.int8).argsort(dim=-1, stable=True)[..., :e]
            index = torch.where(use.gather(-1, order), plan.kv_index.gather(-1, order), -1)
            drop = None
            if plan.token_keep is not None:
                q_block = plan.query_block_of_position()
                keep = plan.token_keep.gather(-1, order[:, :, q_block, :])  # [B',H',N,e]
                pad = keep.new_zeros(*keep.shape[:2], 1, e)  # the pad query slot keeps nothing
                drop = ~torch.cat([keep, pad], 2)
            row_index = index[self.plan_b, self.plan_h, self.row_qb]  # [R, e]
            row_count = (row_index >= 0).sum(-1)
            cost += row_count * (width // p)
            self.levels.append(_Level(p, offset, width // p, row_index, drop, row_count))
            offset += B * H * nkb * (width // p)
        self.extra_offset = offset
        if extra is not None:
            bias = torch.zeros(extra.k.shape[:2], dtype=q.dtype, device=dev)
            if extra.mask is not None:
                bias = bias.masked_fill(~extra.mask, float("-inf"))
            key_parts.append(extra.k.transpose(1, 2).reshape(-1, D))
            val_parts.append(extra.v.transpose(1, 2).reshape(-1, self.Dv))
            bias_parts.append(bias[:, None, :].expand(B, H, -1).reshape(-1))
            offset += extra.k.shape[1] * B * H
        self.null = offset
        key_parts.append(q.new_zeros(1, D))
        val_parts.append(v.new_zeros(1, self.Dv))
        bias_parts.append(torch.full((1,), float("-inf"), dtype=q.dtype, device=dev))
        self.key_table = torch.cat(key_parts)
        self.value_table = torch.cat(val_parts)
        self.bias_table = torch.cat(bias_parts)
        if plan.window is not None:  # small ints: the window test is many full-size passes
            window = plan.window
            small = torch.int16 if int(window.coords.max()) < 2**14 else torch.int32
            self.window = (window.coords.to(small), window.lo.to(small), window.hi.to(small),
                           window.dilation)

        # Longest rows first, so each chunk pads to a length close to all of its rows.
        self.order = torch.argsort(cost, descending=True, stable=True)
        self.cost = cost[self.order].tolist()
        for level in self.levels:
            level.counts = level.counts[self.order].tolist()

    def chunks(self, chunk_bytes: int, itemsize: int):
        """Slices of the sorted rows whose gathered keys and values fit ``chunk_bytes``."""
        n_extra = 0 if self.extra is None else self.extra.k.shape[1]
        per_key = 2 * self.D * itemsize + 2 * itemsize  # K, V and the mask entry
        start = 0
        while start < self.rows:
            # Sorted descending: the first row is the longest of the chunk.
            longest = self.cost[start] + n_extra
            step = max(1, chunk_bytes // max(1, int(longest) * per_key))
            stop = min(self.rows, start + step)
            yield start, stop
            start = stop

    def _window_outside(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """``[r, bq, E, w]`` True where key ``k_pos [r, E, w]`` is outside the window of query
        ``q_pos [r, bq]`` (pad positions are clamped; they are masked by their bias)."""
        coords, lo_all, hi_all, dilation = self.window
        n = coords.shape[0]
        q_pos = q_pos.clamp(max=n - 1)
        k_pos = k_pos.clamp(max=n - 1)
        outside = None
        for axis in range(3):
            lo = lo_all[q_pos, axis][:, :, None, None]  # [r, bq, 1, 1]
            hi = hi_all[q_pos, axis][:, :, None, None]
            x = coords[k_pos, axis].unsqueeze(1)  # [r, 1, E, w]
            out = (x < lo) | (x > hi)
            if dilation[axis] > 1:
                out |= torch.remainder(x - lo, dilation[axis]) != 0
            outside = out if outside is None else outside.logical_or_(out)
        return outside

    def chunk(self, start: int, stop: int, q_rows, key_table, value_table) -> torch.Tensor:
        """Output ``[stop - start, bq, Dv]`` for sorted rows ``start:stop``."""
        rows = self.order[start:stop]
        qc = q_rows.index_select(0, rows)  # [r, bq, D]
        r, bq = qc.shape[0], qc.shape[1]
        index, drops, widths = [], [], []
        for level in self.levels:
            e = max(level.counts[start:stop])
            if e == 0:
                continue
            w = level.width
            idx = level.index[rows, :e]  # [r, e]
            first = level.table_offset + ((self.row_bh[rows, None] * self.nkb + idx) * w)
            first = torch.where(idx >= 0, first, self.null)
            step = torch.arange(w, device=idx.device) * (idx >= 0)[..., None]
            index.append((first[..., None] + step).reshape(r, e * w))
            widths.append(e * w)
            dropped = None
            if level.drop is not None:
                q_pos = self.q_pos[self.row_qb[rows]]  # [r, bq]
                dropped = level.drop[self.plan_b[rows, None], self.plan_h[rows, None], q_pos, :e]
                dropped = dropped.unsqueeze(-1)  # [r, bq, e, 1]
            if level.p == 1 and self.plan.window is not None:
                q_pos = self.q_pos[self.row_qb[rows]]
                outside = self._window_outside(q_pos, self.k_pos[idx.clamp(min=0)])
                dropped = outside if dropped is None else dropped | outside
            drops.append(None if dropped is None else dropped.expand(r, bq, e, w).reshape(r, bq, e * w))
        if self.extra is not None:
            ne = self.extra.k.shape[1]
            first = self.extra_offset + self.row_bh[rows, None] * ne
            index.append(first + torch.arange(ne, device=first.device))
            drops.append(None)
            widths.append(ne)
        if not index:
            return qc.new_zeros(r, bq, self.Dv)
        index = index[0] if len(index) == 1 else torch.cat(index, 1)  # [r, L]
        flat = index.reshape(-1)
        keys = key_table.index_select(0, flat).view(r, 1, -1, self.D)
        values = value_table.index_select(0, flat).view(r, 1, -1, self.Dv)
        mask = self.bias_table[index].unsqueeze(1)  # [r, 1, L]
        if any(d is not None for d in drops):
            parts = [
                d if d is not None else torch.zeros(r, bq, width, dtype=torch.bool, device=qc.device)
                for d, width in zip(drops, widths)
            ]
            dropped = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
            mask = mask.expand(r, bq, -1).masked_fill(dropped, float("-inf"))
        # Queries with no key at all must get 0, like the reference. SDPA's CPU kernels do
        # that for fully masked rows (finite gradients too); elsewhere give such rows a
        # harmless all-zero mask row and zero their output after.
        empty = None
        if qc.device.type != "cpu":
            empty = torch.isneginf(mask).all(-1, keepdim=True)
            mask = mask.masked_fill(empty, 0.0)
        # 4D [r, 1, bq, D]: the layout SDPA's fused CPU kernel takes (3D falls back to math).
        out = F.scaled_dot_product_attention(
            qc.unsqueeze(1), keys, values, attn_mask=mask.unsqueeze(1), scale=self.scale
        ).squeeze(1)
        return out if empty is None else out.masked_fill(empty, 0.0)


def gather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    extra: ExtraKeys | None = None,
    scale: float | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Execute ``plan`` by gathering selected key blocks.

    Args:
        q, k, v: ``[B, N, heads, D]`` in plan order.
        plan: the plan (any method).
        extra: always-attended keys ``[B, Ne, heads, D]`` with an optional ``[B, Ne]`` mask.
        scale: logit scale, ``D ** -0.5`` if ``None``.
        chunk_bytes: soft bound on the gathered keys/values of one chunk of rows.

    Returns:
        ``[B, N, heads, Dv]`` in plan order.
    """
    B, N, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    prob = _Problem(q, k, v, plan, extra, scale)
    tables = (prob.key_table, prob.value_table)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, *(() if extra is None else (extra.k, extra.v)))
    )
    outs = []
    spans = list(prob.chunks(chunk_bytes, q.element_size()))
    for start, stop in spans:
        if needs_grad and len(spans) > 1:
            outs.append(checkpoint(prob.chunk, start, stop, prob.q_rows, *tables, use_reentrant=False))
        else:
            outs.append(prob.chunk(start, stop, prob.q_rows, *tables))
    sorted_out = torch.cat(outs, 0)  # [R, bq, Dv] in sorted row order
    inverse = torch.empty_like(prob.order)
    inverse[prob.order] = torch.arange(prob.rows, device=q.device)
    out = sorted_out.index_select(0, inverse).view(B, H, -1, sorted_out.shape[-1])
    # Padded query slots -> tokens (the token order is the slot order with pads removed).
    slot = prob.q_pos.reshape(-1)
    return out[:, :, slot < N].transpose(1, 2)


class GatherBackend(Backend):
    """``backend="torch"``: runs everywhere torch runs."""

    name = "torch"

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes

    def why_not(self, q, plan) -> str | None:
        return None

    def forward(self, q, k, v, plan, extra=None, scale=None):
        return gather_attention(q, k, v, plan, extra, scale, self.chunk_bytes)


__all__ = ["DEFAULT_CHUNK_BYTES", "GatherBackend", "gather_attention"]
