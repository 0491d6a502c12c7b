"""The PyTorch backend: gather the keys a plan selects and attend with fused SDPA.

Works on CPU and GPU, is differentiable through autograd, and keeps memory bounded.

How: every (batch, head group, query block) is a *row*. When the plan is the same for every
head (GNA), a row carries all heads, so its key list and mask are built once for all of
them; otherwise a row is one head. Each row's selected key blocks, at every pool level, plus
the extra keys, are gathered into one key list, and one ``F.scaled_dot_product_attention``
call per chunk of rows does the softmax. Keys are gathered straight from their source, with
no copy of the inputs: full-resolution keys from ``k``/``v`` themselves, pooled keys from a
small table per pool level, made for one (batch, head group) at a time (``1 / (p B G)`` of
``k``), extra keys from ``extra.k``/``extra.v``.

A mask is only passed to SDPA when a chunk needs one: a per-key bias (``ln count`` of pooled
keys, ``-inf`` for pad slots and masked extra keys) broadcast over queries, plus per-query
``-inf`` where a coordinate window or per-token routing drops a key. With a window, keys
outside the box bounding all windows of a row's queries are left out of its key list (a
block-sparse plan of GNA lists whole key tiles, a third of whose keys no query of the row
can see); when the plan promises that the listed tiles hold every key of every window
(``TokenWindow.grid``: GNA), the row's keys are that box in raster order and the window test
is a sum of per-axis tests. Rows are sorted by their number of keys, so a chunk pads only to the longest row
among similar rows, and chunks are sized so that their gathered keys fit ``chunk_bytes``.
With gradients enabled each chunk is recomputed in backward (activation checkpointing), so
training memory is bounded the same way.

Every source but the pooled tables (q, k, v, extra keys, the output) is a ``[B, M, heads, D]``
tensor seen as ``[B * M * G, Hg * D]`` rows, ``G`` head groups of ``Hg`` heads: the row of
(batch ``b``, position ``m``, group ``g``) is ``(b * M + m) * G + g``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..plan import LEVELS, AttentionPlan
from .base import Backend, ExtraKeys
from .routed import DEFAULT_CHUNK_BYTES, routed_attention, routed_supported



def _padded_positions(offsets: torch.Tensor, width: int):
    """``[n_blocks, width]`` plan positions of each block's first ``width`` tokens (0 in
    unused slots) and the validity mask."""
    slot = torch.arange(width, device=offsets.device)
    valid = slot < offsets.diff()[:, None]
    return torch.where(valid, offsets[:-1, None] + slot, 0), valid


class _PoolIndex:
    """Which tokens make up each pooled key of one level: the same for every (batch, head
    group), so it is built once per call."""

    def __init__(self, offsets: torch.Tensor, p: int, width: int, perm):
        """Groups of ``p`` plan positions from each block start, ``width`` groups per block
        (``perm``: plan position -> token, or ``None`` when x is in plan order)."""
        sizes = offsets.diff()
        slot = torch.arange(width * p, device=offsets.device)
        valid = (slot < sizes[:, None]).view(-1, width, p)  # [n_blocks, width, p]
        positions = torch.where(valid, offsets[:-1, None, None] + slot.view(width, p), 0)
        tokens = positions if perm is None else perm[positions]
        # Member j of every group, as one flat index each; pad members read position 0.
        self.members = [tokens[..., j].reshape(-1) for j in range(p)]
        self.pad = None if bool(valid.all()) else [~valid[..., j].reshape(-1, 1) for j in range(p)]
        self.counts = valid.sum(-1).reshape(-1, 1).clamp(min=1)


def _pool(x: torch.Tensor, index: _PoolIndex) -> torch.Tensor:
    """``[N, H, D]`` (one batch element) -> ``[n_blocks * width, H * D]``: the means of the
    groups of ``index`` (unused groups are 0)."""
    # The j-th member of every group is gathered at once and added up, p gathers in all: no
    # scatter of tokens into their groups (index_add_ serialises on the CPU) and no temporary
    # larger than the table.
    # Half-precision inputs are summed in float32. Rows of ``H * D`` keep the gathers on
    # index_select's fast path: a view when the heads are adjacent in memory (k, v contiguous
    # in their last two dims, as projections give them), else one copy of x.
    rows = x.reshape(x.shape[0], -1)
    sum_dtype = torch.promote_types(x.dtype, torch.float32)
    sums = None
    for j, member_index in enumerate(index.members):
        member = rows.index_select(0, member_index).to(sum_dtype)
        if index.pad is not None:
            member.masked_fill_(index.pad[j], 0.0)
        sums = member if sums is None else sums.add_(member)
    return (sums / index.counts.to(sum_dtype)).to(x.dtype)


class _WindowBoxes:
    """The keys of a window plan's rows taken straight from the boxes bounding their queries'
    windows (plans with ``TokenWindow.grid``: GNA), instead of from the listed key tiles.

    The window is a product of per-axis intervals, so with a row's keys laid out as the box's
    ``[t, h, w]`` raster the window test is three small per-axis ``[r, bq, extent]`` tests
    added together, where the tile-list path compares every (query, key) pair on every axis
    and first has to drop the listed keys outside the box.
    """

    def __init__(self, problem: "_Problem", grid: tuple[int, int, int], perm: torch.Tensor | None):
        """``problem``'s window and query-block boxes; ``perm`` the plan's reorder when the
        sources are in plan order (a box key's token is then looked up in it), ``None`` when
        they are indexed by token."""
        self.window, self.row_qb, self.grid = problem.window, problem.row_qb, grid
        size = torch.tensor(grid, device=problem.box_lo.device)
        self.lo = problem.box_lo.long().clamp(min=0)  # [nqb, 3], clipped to the grid
        self.extent = (problem.box_hi.long().minimum(size - 1) - self.lo + 1).clamp(min=0)
        self.volume = self.extent.prod(-1)  # [nqb]
        self.position_of_token = None
        if perm is not None:
            self.position_of_token = torch.empty_like(perm)
            self.position_of_token[perm] = torch.arange(perm.numel(), device=perm.device)

    def keys(self, rows: torch.Tensor, q_pos: torch.Tensor, dtype: torch.dtype):
        """``([r, n] source positions, [r, bq, n] 0 / -inf window bias)`` of the rows' box keys
        (pad slots past a smaller box read position 0 and are masked for every query)."""
        _, lo_all, hi_all, dilation = self.window
        lo, extent = self.lo[self.row_qb[rows]], self.extent[self.row_qb[rows]]  # [r, 3]
        widths = extent.amax(0).tolist()
        token, bias = None, None
        for axis, width in enumerate(widths):
            slot = torch.arange(width, device=rows.device)
            x = lo[:, axis, None] + slot  # [r, width] key coordinate on this axis
            in_box = slot < extent[:, axis, None]
            x = torch.where(in_box, x, 0)
            token = x if token is None else token[..., None] * self.grid[axis] + x.view(
                -1, *([1] * (token.dim() - 1)), width)
            q_lo = lo_all[q_pos, axis][:, :, None].long()  # [r, bq, 1]
            q_hi = hi_all[q_pos, axis][:, :, None].long()
            xq = x[:, None, :]
            inside = (xq >= q_lo) & (xq <= q_hi) & in_box[:, None, :]
            if dilation[axis] > 1:
                inside &= torch.remainder(xq - q_lo, dilation[axis]) == 0
            axis_bias = torch.zeros(inside.shape, dtype=dtype, device=rows.device).masked_fill_(~inside, float("-inf"))
            # [r, bq, e0, e1, ...]: the sum over axes is -inf wherever one axis says no.
            bias = axis_bias if bias is None else bias[..., None] + axis_bias.view(
                *axis_bias.shape[:2], *([1] * (bias.dim() - 2)), width)
        r = rows.numel()
        token = token.reshape(r, -1)
        source = token if self.position_of_token is None else self.position_of_token[token]
        return source, bias.reshape(r, q_pos.shape[1], -1)


class _Level:
    """One pool level: its keys per block and each row's entries at this level."""

    def __init__(self, p, width, index, counts, bias, drop):
        self.p = p
        self.width = width  # keys per block at this level
        self.index = index  # [R, E] key block ids packed to the front, -1 = unused
        self.counts = counts  # entries used by each row (a list, in sorted row order)
        self.bias = bias  # [n_k_blocks, width] ln(count) per key, -inf for empty slots
        self.has_empty_slots = bool(torch.isneginf(bias).any())  # a block shorter than width
        self.drop = drop  # [B'|1, H'|1, N, E] True where a query skips an entry, or None


class _Problem:
    """Everything the chunks need, prepared once per call (index lists, no key copies)."""

    def __init__(self, q, k, v, plan, extra, scale, original_order: bool):
        B, N, H, D = q.shape
        self.plan, self.scale, self.extra = plan, scale, extra
        self.B, self.N, self.D, self.Dv = B, N, D, v.shape[-1]
        dev = q.device
        nqb = plan.num_q_blocks
        # kv_index / kv_level and token_keep broadcast over batch and heads each on its own:
        # seen here at their joint shape [bp, hp, ...] (views).
        kv_index, levels, keep = plan.kv_index, plan.levels(), plan.token_keep
        bp, hp = kv_index.shape[:2]
        if keep is not None:
            bp, hp = max(bp, keep.shape[0]), max(hp, keep.shape[1])
            keep = keep.expand(bp, hp, *keep.shape[2:])
        kv_index, levels = (x.expand(bp, hp, *x.shape[2:]) for x in (kv_index, levels))
        # One row for all heads when nothing in the plan differs between heads.
        self.Hg = H if hp == 1 else 1
        self.G = H // self.Hg
        self.rows = B * self.G * nqb

        bq = int(plan.q_offsets.diff().max())
        self.q_pos, self.q_valid = _padded_positions(plan.q_offsets, bq)  # [nqb, bq]
        k_sizes = plan.k_offsets.diff()
        self.k_pos, _ = _padded_positions(plan.k_offsets, int(k_sizes.max()))
        # Where the plan positions' tokens sit in q, k, v and the output.
        self.perm = plan.perm if original_order else None
        self.q_token = self.q_pos if self.perm is None else self.perm[self.q_pos]

        # Row r = (b, g, query block); plan tensors may broadcast over b and heads.
        r = torch.arange(self.rows, device=dev)
        self.row_b, self.row_g, self.row_qb = r // (self.G * nqb), (r // nqb) % self.G, r % nqb
        self.plan_b = self.row_b if bp > 1 else torch.zeros_like(r)
        self.plan_h = self.row_g if hp > 1 else torch.zeros_like(r)

        valid = kv_index >= 0
        self.levels: list[_Level] = []
        self.pooled_sources: dict[int, _PoolIndex] = {}  # p -> what its pooled table holds
        cost = torch.zeros(self.rows, dtype=torch.long, device=dev)
        for p in LEVELS:
            use = valid & (levels == p)
            if not bool(use.any()):
                continue
            width = -(-int(k_sizes.max()) // p)
            slot = torch.arange(width, device=dev)
            count = (k_sizes[:, None] - slot * p).clamp(0, p)  # tokens behind each pooled key
            bias = torch.where(count > 0, count.to(q.dtype).log(), float("-inf"))
            if p > 1:
                self.pooled_sources[p] = _PoolIndex(plan.k_offsets, p, width, self.perm)
            e = int(use.sum(-1).max())
            order = (~use).to(torch.int8).argsort(dim=-1, stable=True)[..., :e]
            index = torch.where(use.gather(-1, order), kv_index.gather(-1, order), -1)
            drop = None
            if keep is not None:
                q_block = plan.query_block_of_position()
                drop = ~keep.gather(-1, order[:, :, q_block, :])  # [bp, hp, N, e]
            row_index = index[self.plan_b, self.plan_h, self.row_qb]  # [R, e]
            row_count = (row_index >= 0).sum(-1)
            cost += row_count * width
            self.levels.append(_Level(p, width, row_index, row_count, bias, drop))
        if extra is not None and extra.mask is not None:
            self.extra_bias = torch.where(extra.mask, 0.0, float("-inf")).to(q.dtype)  # [B, Ne]
        else:
            self.extra_bias = None

        self.window = self.boxes = None
        if plan.window is not None:  # small ints: the window test is many full-size passes
            window = plan.window
            small = torch.int16 if int(window.coords.abs().max()) < 2**14 else torch.int32
            self.window = (window.coords.to(small), window.lo.to(small), window.hi.to(small),
                           window.dilation)
            # Per query block, the box bounding all its queries' windows: [nqb, 3].
            big = torch.iinfo(small).max
            lo = torch.where(self.q_valid[..., None], self.window[1][self.q_pos], big)
            hi = torch.where(self.q_valid[..., None], self.window[2][self.q_pos], -big)
            self.box_lo, self.box_hi = lo.amin(1), hi.amax(1)
            if window.grid is not None and plan.token_keep is None:
                self.boxes = _WindowBoxes(self, window.grid, plan.perm if self.perm is None else None)
                cost = self.boxes.volume[self.row_qb]  # the keys a row gathers

        # Longest rows first, so each chunk pads to a length close to all of its rows.
        # Rows stay grouped by (batch, head group), nqb rows each, so that only one group's
        # pooled tables exist at a time.
        order = torch.argsort(cost, descending=True, stable=True)
        group = self.row_b * self.G + self.row_g
        self.order = order[torch.argsort(group[order], stable=True)]
        self.group_rows = nqb
        self.cost = cost[self.order].tolist()
        for level in self.levels:
            level.counts = level.counts[self.order].tolist()

    def chunks(self, chunk_bytes: int, itemsize: int):
        """Slices of the sorted rows whose gathered keys, values and mask fit ``chunk_bytes``,
        each within one (batch, head group)."""
        n_extra = 0 if self.extra is None else self.extra.k.shape[1]
        bq = self.q_pos.shape[1]
        per_key = self.Hg * (self.D + self.Dv) * itemsize
        if self.window is not None or self.plan.token_keep is not None:
            per_key += bq * itemsize  # a per-query mask
        start = 0
        while start < self.rows:
            # Sorted descending: the first row is the longest of the chunk.
            longest = self.cost[start] + n_extra
            step = max(1, chunk_bytes // max(1, longest * per_key))
            stop = min(self.rows, start + step, (start // self.group_rows + 1) * self.group_rows)
            yield start, stop
            start = stop

    def pool(self, group: int, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        """Pooled k, v tables ``[n_k_blocks * width, Hg * D]`` of every pool level > 1 for
        one (batch, head group): ``1 / (p B G)`` of k each."""
        b, g = divmod(group, self.G)
        heads = slice(g * self.Hg, (g + 1) * self.Hg)
        tables = []
        for index in self.pooled_sources.values():
            for x in (k, v):
                tables.append(_pool(x[b, :, heads], index))
        return tables

    def source_rows(self, rows: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Flat source rows of ``positions [r, n]`` of a source with ``length`` positions."""
        b = self.row_b[rows, None]
        return (b * length + positions) * self.G + self.row_g[rows, None]

    def query_rows(self, rows: torch.Tensor):
        """``(gather, scatter)`` flat rows ``[r * bq]`` of the chunk's query slots: pad slots
        read row 0 and write the sink row ``B * N * G`` past the output."""
        flat = self.source_rows(rows, self.q_token[self.row_qb[rows]], self.N)
        sink = torch.where(self.q_valid[self.row_qb[rows]], flat, self.B * self.N * self.G)
        return torch.where(self.q_valid[self.row_qb[rows]], flat, 0).reshape(-1), sink.reshape(-1)

    def _keys_in_reach(self, rows, entry, positions, bias):
        """Drop the full-resolution key columns ``[r, n]`` (entry slot, plan position, bias)
        outside the box that bounds every window of the row's queries: no query of the row
        can see them. Returns the kept columns packed to the front, padded with ``-inf``."""
        coords = self.window[0][positions]  # [r, n, 3]
        qb = self.row_qb[rows, None]
        reach = ((coords >= self.box_lo[qb]) & (coords <= self.box_hi[qb])).all(-1)
        reach &= ~torch.isneginf(bias)
        width = int(reach.sum(-1).max())
        keep = (~reach).to(torch.int8).argsort(dim=-1, stable=True)[:, :width]
        bias = bias.gather(1, keep).masked_fill(~reach.gather(1, keep), float("-inf"))
        return entry.gather(1, keep), positions.gather(1, keep), bias

    def _window_outside(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """``[r, bq, c]`` True where key ``k_pos [r, c]`` is outside the window of query
        ``q_pos [r, bq]`` (plan positions)."""
        coords, lo_all, hi_all, dilation = self.window
        outside = None
        for axis in range(3):
            lo = lo_all[q_pos, axis][:, :, None]  # [r, bq, 1]
            hi = hi_all[q_pos, axis][:, :, None]
            x = coords[k_pos, axis].unsqueeze(1)  # [r, 1, c]
            out = (x < lo) | (x > hi)
            if dilation[axis] > 1:
                out |= torch.remainder(x - lo, dilation[axis]) != 0
            outside = out if outside is None else outside.logical_or_(out)
        return outside

    def chunk(self, start: int, stop: int, q_gather, q, k, v, pooled, extra_k, extra_v) -> torch.Tensor:
        """Output ``[stop - start, Hg, bq, Dv]`` for sorted rows ``start:stop``.

        ``q_gather`` are the rows' query rows (from :meth:`query_rows`), ``q, k, v``
        ``[B, N, H, D]``, ``pooled`` the chunk's (batch, head group)'s pooled tables
        ``[n_k_blocks * width, Hg * D]`` (k, v per level in :attr:`pooled_sources` order, from
        :meth:`pool`), ``extra_k``/``extra_v`` ``[B, Ne, H, D]`` or None.
        """
        rows = self.order[start:stop]
        r, Hg, D, Dv = rows.numel(), self.Hg, self.D, self.Dv
        bq = self.q_pos.shape[1]
        qc = q.reshape(-1, Hg * D).index_select(0, q_gather).view(r, bq, Hg, D).transpose(1, 2)
        q_pos = self.q_pos[self.row_qb[rows]]  # [r, bq]
        pooled_at = dict(zip(self.pooled_sources, range(0, 2 * len(self.pooled_sources), 2)))
        keys, values, biases, per_query = [], [], [], []  # per_query: (offset, [r, bq, n] drop)
        window_masks = []  # (offset, [r, bq, n] 0 / -inf): the box path's window test
        length = 0
        for level in self.levels:
            counts = level.counts[start:stop]
            e = max(counts)
            if e == 0:
                continue
            if self.boxes is not None:  # a window plan whose windows fill their boxes
                source_pos, allowed = self.boxes.keys(rows, q_pos, qc.dtype)
                n = source_pos.shape[1]
                flat = self.source_rows(rows, source_pos, self.N).reshape(-1)
                keys.append(k.reshape(-1, Hg * D).index_select(0, flat).view(r, n, Hg, D))
                values.append(v.reshape(-1, Hg * Dv).index_select(0, flat).view(r, n, Hg, Dv))
                window_masks.append((length, allowed))
                length += n
                continue  # the box replaces the listed tiles: no entry slots or biases
            w = level.width
            idx = level.index[rows, :e]  # [r, e]
            block = idx.clamp(min=0)
            # Per key column: its entry slot, plan position (full resolution) and bias, each
            # built only where something reads it: many plans (PSA at full resolution, whole
            # blocks, equal counts per row) need neither a bias nor the entry slots.
            entry = bias = None
            if self.window is not None or level.drop is not None:
                entry = torch.arange(e * w, device=idx.device).div(w, rounding_mode="floor").expand(r, -1)
            if level.p > 1 or level.has_empty_slots or min(counts) < e or self.window is not None:
                bias = level.bias[block]
                if min(counts) < e:  # entries a row leaves unused are pad slots
                    bias = bias.masked_fill((idx < 0)[..., None], float("-inf"))
                bias = bias.reshape(r, e * w)
            if level.p == 1:
                positions = self.k_pos[block].reshape(r, e * w)
                if self.window is not None:
                    entry, positions, bias = self._keys_in_reach(rows, entry, positions, bias)
                    if positions.shape[1] == 0:
                        continue
                source_pos = positions if self.perm is None else self.perm[positions]
                ks, vs = k, v
            else:
                source_pos = (block[..., None] * w + torch.arange(w, device=idx.device)).reshape(r, e * w)
                i = pooled_at[level.p]
                ks, vs = pooled[i], pooled[i + 1]
            n = source_pos.shape[1]
            flat = (self.source_rows(rows, source_pos, self.N) if level.p == 1 else source_pos).reshape(-1)
            keys.append(ks.reshape(-1, Hg * D).index_select(0, flat).view(r, n, Hg, D))
            values.append(vs.reshape(-1, Hg * Dv).index_select(0, flat).view(r, n, Hg, Dv))
            if bias is not None and (level.p > 1 or bool(torch.isneginf(bias).any())):
                biases.append((length, bias))
            dropped = None
            if level.drop is not None:
                dropped = level.drop[self.plan_b[rows, None], self.plan_h[rows, None], q_pos, :e]
                dropped = dropped.gather(2, entry[:, None, :].expand(r, bq, n))  # [r, bq, n]
            if level.p == 1 and self.window is not None:
                outside = self._window_outside(q_pos, positions)  # [r, bq, n]
                dropped = outside if dropped is None else dropped | outside
            if dropped is not None:
                per_query.append((length, dropped))
            length += n
        if extra_k is not None:
            ne = extra_k.shape[1]
            flat = self.source_rows(rows, torch.arange(ne, device=rows.device).expand(r, ne), ne)
            keys.append(extra_k.reshape(-1, Hg * D).index_select(0, flat.reshape(-1)).view(r, ne, Hg, D))
            values.append(extra_v.reshape(-1, Hg * Dv).index_select(0, flat.reshape(-1)).view(r, ne, Hg, Dv))
            if self.extra_bias is not None:
                biases.append((length, self.extra_bias[self.row_b[rows]]))
            length += ne
        if length == 0:
            return qc.new_zeros(r, Hg, bq, Dv)
        keys = (keys[0] if len(keys) == 1 else torch.cat(keys, 1)).transpose(1, 2)  # [r, Hg, L, D]
        values = (values[0] if len(values) == 1 else torch.cat(values, 1)).transpose(1, 2)

        mask = None
        if biases or per_query or window_masks:
            # [r, 1, 1|bq, L]: a per-key bias, widened per query only where a query drops keys.
            mask = qc.new_zeros(r, 1, bq if per_query or window_masks else 1, length)
            for offset, bias in biases:
                mask[:, 0, :, offset : offset + bias.shape[-1]] = bias[:, None, :]
            for offset, allowed in window_masks:
                mask[:, 0, :, offset : offset + allowed.shape[-1]] = allowed
            for offset, dropped in per_query:
                mask[:, 0, :, offset : offset + dropped.shape[-1]].masked_fill_(dropped, float("-inf"))
        # Queries with no key at all must get 0, like the reference. SDPA's CPU kernels do
        # that for fully masked rows (finite gradients too); elsewhere give such rows a
        # harmless all-zero mask row and zero their output after.
        empty = None
        if mask is not None and qc.device.type != "cpu":
            empty = torch.isneginf(mask).all(-1, keepdim=True)
            mask = mask.masked_fill(empty, 0.0)
        out = F.scaled_dot_product_attention(qc, keys, values, attn_mask=mask, scale=self.scale)
        return out if empty is None else out.masked_fill(empty, 0.0)


def gather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    extra: ExtraKeys | None = None,
    scale: float | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    original_order: bool = False,
) -> torch.Tensor:
    """Execute ``plan`` by gathering selected key blocks.

    Args:
        q, k, v: ``[B, N, heads, D]`` in plan order (original order if ``original_order``).
        plan: the plan (any method).
        extra: always-attended keys ``[B, Ne, heads, D]`` with an optional ``[B, Ne]`` mask.
        scale: logit scale, ``D ** -0.5`` if ``None``.
        chunk_bytes: soft bound on the gathered keys/values (and mask) of one chunk of rows.
        original_order: q, k, v and the output are in the original token order and the
            plan's ``perm`` is applied by the gathers themselves, which saves the four
            reordered copies (``3 + 1`` tensors of the input's size) of permuting around the call.

    Returns:
        ``[B, N, heads, Dv]`` in plan order (original order if ``original_order``).
    """
    B, N, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    prob = _Problem(q, k, v, plan, extra, scale, original_order)
    extra_kv = (None, None) if extra is None else (extra.k, extra.v)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, *(() if extra is None else (extra.k, extra.v)))
    )
    Hg, Dv = prob.Hg, prob.Dv
    # One spare sink row past the end takes the output of pad query slots.
    out = q.new_zeros(B * N * prob.G + 1, Hg * Dv)
    spans = list(prob.chunks(chunk_bytes, q.element_size()))
    group, pooled, sources = None, [], None
    for start, stop in spans:
        if start // prob.group_rows != group:
            group = start // prob.group_rows
            pooled = sources = None  # the last group's tables go before this group's are made
            pooled = prob.pool(group, k, v)
        sources = (q, k, v, pooled, *extra_kv)
        q_gather, scatter = prob.query_rows(prob.order[start:stop])
        if needs_grad and len(spans) > 1:
            part = checkpoint(prob.chunk, start, stop, q_gather, *sources, use_reentrant=False)
        else:
            part = prob.chunk(start, stop, q_gather, *sources)
        out.index_copy_(0, scatter, part.transpose(1, 2).reshape(-1, Hg * Dv))
    return out[:-1].view(B, N, H, Dv)


class GatherBackend(Backend):
    """``backend="torch"``: runs everywhere torch runs. Per-token-routed plans (VMoBA) go to
    the key-major :func:`~.routed.routed_attention`, which does only the routed pairs' work;
    every other plan to :func:`gather_attention`."""

    name = "torch"

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes

    def why_not(self, q, v, plan) -> str | None:
        return None

    def forward(self, q, k, v, plan, extra=None, scale=None):
        if routed_supported(plan):
            return routed_attention(q, k, v, plan, extra, scale, self.chunk_bytes)
        return gather_attention(q, k, v, plan, extra, scale, self.chunk_bytes)

    def forward_original_order(self, q, k, v, plan, extra=None, scale=None):
        if routed_supported(plan):
            return routed_attention(q, k, v, plan, extra, scale, self.chunk_bytes, original_order=True)
        return gather_attention(q, k, v, plan, extra, scale, self.chunk_bytes, original_order=True)


__all__ = ["DEFAULT_CHUNK_BYTES", "GatherBackend", "gather_attention"]
