"""Host side of the kernels: a plan turned into the small int32 tables each kernel family
reads, built on the plan's device. The work count (:mod:`.work`) reads the same tables, so it
counts what the launches do.

* :class:`BlockTables` — plans without per-token routing (:mod:`.blocks`);
* :class:`BoxTables` — coordinate-window plans over a whole grid (:mod:`.window`);
* :class:`RoutedTables` — per-token routed plans (:mod:`.routed`).

Tables shaped ``[B'|1, H'|1, ...]`` follow the plan's batch and head dims (1 = shared); the
kernels read them through strides that are 0 where a dim is shared.
"""

from __future__ import annotations

import torch

from vdiff_sparse.plan import LEVELS, AttentionPlan

from .blocks import ENT_WIDTH, RANGE_WIDTH
from .routed import TASK_WIDTH
from .tiles import TileChoice, keys_block_n, rows_block_m
from .window import TILE_WIDTH

I32 = torch.int32


def broadcast_strides(t: torch.Tensor) -> tuple[int, int]:
    """Strides of dims 0 and 1 of a contiguous table, 0 where the dim has size 1."""
    return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0)


def _cdiv(a, b):
    return (a + b - 1) // b


def level_index(levels: torch.Tensor) -> torch.Tensor:
    """Pool factors -> their index in ``LEVELS`` (1, 2, 4, 8 -> 0, 1, 2, 3)."""
    return torch.log2(levels.double()).round().long()


class KeyRanges:
    """The key ranges of one pool level for the ``dk``/``dv`` kernel: ``table`` ``[n_k_blocks,
    RANGE_WIDTH]`` (first stacked row, rows, pool factor, tokens), the launch's ``block_n`` and
    ``sub`` tiles per range."""

    def __init__(self, rows: torch.Tensor, sizes: torch.Tensor, p: int, level_rows: int, block_n: int):
        self.p = p
        self.table = torch.stack(
            [rows[:, 0], rows[:, 1], torch.full_like(sizes, p), sizes], -1
        ).to(I32).contiguous()
        self.block_n = block_n
        self.sub = max(1, _cdiv(level_rows, block_n))


class BlockTables:
    """A plan without per-token routing as the tables of :mod:`.blocks`.

    Attributes:
        ent: ``[B'|1, H'|1, n_q_blocks, max_kv, ENT_WIDTH]`` entries of each query block,
            sorted by pool level then key block (unused slots at the end, 0 rows).
        counts: ``[B'|1, H'|1, n_q_blocks, 4]`` entries per level.
        rows_per_entry: ``[4]`` key rows reserved per entry of each level (the most any key
            block has at that level).
        block_m, sub: the forward/``dq`` launch's ``BLOCK_M`` and tiles per query block.
        levels: per level used, :class:`KeyRanges` and its slice of the inverted lists:
            ``rowptr`` (``[B' * H' * 4 * n_k_blocks + 1]``, query blocks of (plan batch, plan
            head, level, key block)) and ``list_qb``.
        window: the plan's coordinate window, tested per pair (a hand-built window).
    """

    def __init__(self, plan: AttentionPlan, rows: torch.Tensor, choice: TileChoice):
        dev = plan.kv_index.device
        nkb, nqb = plan.num_k_blocks, plan.num_q_blocks
        sizes = plan.k_offsets.diff()
        self.n_q_blocks = nqb
        self.q_offsets = plan.q_offsets.to(I32).contiguous()
        self.q_block_max = int(plan.q_offsets.diff().max())
        self.k_block_max = int(sizes.max())
        self.max_kv = plan.max_kv
        self.block_m = rows_block_m(choice.rows, self.q_block_max)
        self.block_n = choice.rows.block_n
        self.sub = _cdiv(self.q_block_max, self.block_m)

        valid = plan.kv_index >= 0
        kb = plan.kv_index.clamp(min=0)
        li = level_index(torch.where(valid, plan.levels(), 1))
        # Entries sorted by (level, key block); unused slots last.
        order = torch.where(valid, li * nkb + kb, len(LEVELS) * nkb).argsort(-1)
        kb_s, li_s, valid_s = kb.gather(-1, order), li.gather(-1, order), valid.gather(-1, order)
        self.ent = torch.stack(
            [rows[li_s, kb_s, 0], torch.where(valid_s, rows[li_s, kb_s, 1], 0), sizes[kb_s]], -1
        ).to(I32).contiguous()
        assert self.ent.shape[-1] == ENT_WIDTH
        self.ent_strides = broadcast_strides(self.ent)
        self.counts = torch.stack([(valid & (li == g)).sum(-1) for g in range(len(LEVELS))], -1).to(I32).contiguous()
        self.counts_strides = broadcast_strides(self.counts)
        self.rows_per_entry = torch.tensor([_cdiv(self.k_block_max, p) for p in LEVELS], dtype=I32, device=dev)

        # Inverted lists: the valid entries sorted by (plan batch, plan head, level, key block).
        n_ranges = len(LEVELS) * nkb
        Bp, Hp = plan.kv_index.shape[:2]
        bh = torch.arange(Bp * Hp, device=dev).view(Bp, Hp, 1, 1)
        key = torch.where(valid, bh * n_ranges + li * nkb + kb, Bp * Hp * n_ranges)
        order = torch.argsort(key.flatten(), stable=True)
        counts = torch.zeros(Bp * Hp * n_ranges + 1, dtype=torch.int64, device=dev)
        counts.scatter_add_(0, key.flatten(), torch.ones_like(key.flatten()))
        self.rowptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts[:-1], 0)]).to(I32)
        qb_of = torch.arange(nqb, device=dev).view(1, 1, nqb, 1).expand_as(kb).flatten()
        self.list_qb = qb_of[order].to(I32).contiguous()  # pad entries (unused slots) sort last
        self.rowptr_strides = (Hp * n_ranges if Bp > 1 else 0, n_ranges if Hp > 1 else 0)
        self.levels = [(ranges, self.rowptr[g * nkb:]) for g, ranges in _key_ranges(plan, rows, choice)]
        self.keys_block_m = choice.keys.block_m
        self.window = WindowArgs(plan, dev)


class WindowArgs:
    """A plan's coordinate window as kernel arguments (placeholders when there is none, or
    when ``plan`` is ``None``)."""

    def __init__(self, plan: AttentionPlan | None, dev):
        w = None if plan is None else plan.window
        self.active = w is not None
        if w is None:
            self.coords = self.lo = self.hi = self.dil = torch.zeros(3, dtype=I32, device=dev)
            self.dilated = 0
            return
        self.coords = w.coords.to(I32).contiguous()
        self.lo = w.lo.to(I32).contiguous()
        self.hi = w.hi.to(I32).contiguous()
        self.dil = torch.tensor(w.dilation, dtype=I32, device=dev)
        self.dilated = int(any(d > 1 for d in w.dilation))


def box_supported(plan: AttentionPlan) -> bool:
    """Whether the box kernels (:mod:`.window`) run ``plan``: a coordinate window over a whole
    grid whose listed key blocks hold every key of every window (GNA), no per-token routing."""
    return plan.window is not None and plan.window.grid is not None and plan.token_keep is None


class BoxTables:
    """A GNA window plan as the tables of :mod:`.window` (shared by every batch and head).

    Attributes:
        q_tiles: ``[n_q_blocks * q_sub, TILE_WIDTH]``: ``BLOCK_M`` query tiles of every query
            block with the box bounding their windows (clipped to the grid) and the
            intersection of their windows.
        k_tiles: ``[n_k_blocks * k_sub, TILE_WIDTH]``: ``BLOCK_N`` key tiles of every key
            block with the box of queries whose windows can meet them, and the box bounding
            the tile's own keys.
        pos_of_token: ``[T * H * W]`` plan position of each grid token.
    """

    def __init__(self, plan: AttentionPlan, choice: TileChoice):
        w = plan.window
        dev = plan.q_offsets.device
        self.grid = w.grid
        self.window = WindowArgs(plan, dev)
        self.q_offsets = plan.q_offsets.to(I32).contiguous()
        self.n_q_blocks = plan.num_q_blocks
        n = plan.num_tokens
        positions = torch.arange(n, device=dev)
        token = positions if plan.perm is None else plan.perm
        self.pos_of_token = torch.empty(n, dtype=I32, device=dev)
        self.pos_of_token[token] = positions.to(I32)
        size = torch.tensor(w.grid, device=dev)
        lo, hi, coords = w.lo.long(), w.hi.long(), w.coords.long()

        q_block_max = int(plan.q_offsets.diff().max())
        self.block_m = rows_block_m(choice.rows, q_block_max)
        self.block_n = choice.rows.block_n
        self.q_sub = _cdiv(q_block_max, self.block_m)
        tile_q, start_q, count_q = _tiles_of(plan.q_offsets, self.block_m, self.q_sub)
        box_lo = _segment(lo.clamp(min=0), tile_q, start_q.numel(), "amin")
        box_hi = _segment(hi.minimum(size - 1), tile_q, start_q.numel(), "amax")
        inner_lo = _segment(lo, tile_q, start_q.numel(), "amax")
        inner_hi = _segment(hi, tile_q, start_q.numel(), "amin")
        self.q_tiles = _tile_table(start_q, count_q, box_lo, box_hi, inner_lo, inner_hi)

        k_block_max = int(plan.k_offsets.diff().max())
        self.keys_block_n = keys_block_n(choice.keys, k_block_max)
        self.keys_block_m = choice.keys.block_m
        self.k_sub = _cdiv(k_block_max, self.keys_block_n)
        tile_k, start_k, count_k = _tiles_of(plan.k_offsets, self.keys_block_n, self.k_sub)
        key_lo = _segment(coords, tile_k, start_k.numel(), "amin")
        key_hi = _segment(coords, tile_k, start_k.numel(), "amax")
        # Per axis and coordinate c, the widest window of a query at c: a query can see a key
        # tile only if, on every axis, that window meets the tile's span.
        qbox_lo, qbox_hi = [], []
        for axis in range(3):
            length = int(w.grid[axis])
            c = coords[:, axis]
            widest_lo = torch.full((length,), length, dtype=torch.long, device=dev).scatter_reduce(
                0, c, lo[:, axis], "amin", include_self=True)
            widest_hi = torch.full((length,), -1, dtype=torch.long, device=dev).scatter_reduce(
                0, c, hi[:, axis], "amax", include_self=True)
            meets = (widest_lo[None, :] <= key_hi[:, axis, None]) & (widest_hi[None, :] >= key_lo[:, axis, None])
            along = torch.arange(length, device=dev)
            qbox_lo.append(torch.where(meets, along, length).amin(1))
            qbox_hi.append(torch.where(meets, along, -1).amax(1))
        self.k_tiles = _tile_table(start_k, count_k, torch.stack(qbox_lo, 1), torch.stack(qbox_hi, 1),
                                   key_lo, key_hi)


def _tiles_of(offsets: torch.Tensor, block: int, sub: int):
    """Cut every block of ``offsets`` into tiles of ``block`` positions, ``sub`` per block:
    the tile of each position ``[N]`` and each tile's first position and size ``[n * sub]``
    (size 0 for tiles past a block's end)."""
    dev = offsets.device
    sizes = offsets.diff()
    n_blocks = sizes.numel()
    within = torch.arange(sub, device=dev) * block
    start = (offsets[:-1, None] + within).flatten()
    count = (sizes[:, None] - within).clamp(0, block).flatten()
    block_of = torch.repeat_interleave(torch.arange(n_blocks, device=dev), sizes)
    pos = torch.arange(int(offsets[-1]), device=dev)
    tile = block_of * sub + (pos - offsets[:-1][block_of]) // block
    return tile, start, count


def _segment(values: torch.Tensor, segment: torch.Tensor, n: int, how: str) -> torch.Tensor:
    """``[n, 3]`` reduction (``amin``/``amax``) of ``values`` ``[N, 3]`` per segment id."""
    fill = torch.iinfo(torch.int64).max if how == "amin" else torch.iinfo(torch.int64).min
    out = torch.full((n, 3), fill, dtype=torch.int64, device=values.device)
    return out.scatter_reduce(0, segment[:, None].expand(-1, 3), values, how, include_self=True)


def _tile_table(start, count, box_lo, box_hi, inner_lo, inner_hi) -> torch.Tensor:
    """Rows of :data:`~.window.TILE_WIDTH` columns (empty tiles and empty boxes get count or
    extent 0; an empty intersection stays as first > last)."""
    extent = (box_hi - box_lo + 1).clamp(min=0)
    real = count > 0
    box = torch.stack([torch.where(real[:, None], box_lo, 0), torch.where(real[:, None], extent, 0)], -1)
    inner = torch.stack([inner_lo, inner_hi], -1).clamp(-(2**30), 2**30)
    table = torch.cat([start[:, None], count[:, None], box.flatten(1), inner.flatten(1)], 1)
    assert table.shape[1] == TILE_WIDTH
    return table.to(I32).contiguous()


class RoutedTables:
    """A per-token routed plan as the tables of :mod:`.routed` and the gathered ``dk``/``dv``.

    A query's kept entries, in entry order, are its rounds ``0, 1, ...``; its ``r``-th names
    range ``level * n_k_blocks + key block``. Per (plan batch, plan head):

    Attributes:
        pos: ``[B', H', rounds * N]`` int32 query positions of every (query, round) pair,
            sorted by (range, round, position); pairs without a range come last.
        tasks: ``[B', H', rounds, n_tasks, TASK_WIDTH]``: round ``r``'s tasks, each up to
            ``block_m`` queries of one range.
        rowptr: ``[B', H', n_ranges + 1]`` where each range's queries start in the flattened
            ``pos`` (all rounds), for the ``dk``/``dv`` kernel.
        rounds: the largest number of entries a query keeps (one host read).
    """

    def __init__(self, plan: AttentionPlan, rows: torch.Tensor, choice: TileChoice):
        dev = plan.kv_index.device
        n, nkb = plan.num_tokens, plan.num_k_blocks
        n_ranges = len(LEVELS) * nkb
        self.n_ranges = n_ranges
        self.block_m = choice.routed.block_m
        self.block_n = choice.routed.block_n
        self.keys_block_m = choice.keys.block_m
        sizes = plan.k_offsets.diff()
        self.q_offsets = plan.q_offsets.to(I32).contiguous()
        self.n_q_blocks = plan.num_q_blocks
        self.q_block_max = int(plan.q_offsets.diff().max())

        bp = max(plan.kv_index.shape[0], plan.token_keep.shape[0])
        hp = max(plan.kv_index.shape[1], plan.token_keep.shape[1])
        q_block = plan.query_block_of_position()
        kv_index = plan.kv_index.expand(bp, hp, -1, -1)[:, :, q_block]  # [B', H', N, max_kv]
        li = level_index(torch.where(kv_index >= 0, plan.levels().expand(bp, hp, -1, -1)[:, :, q_block], 1))
        kept = plan.token_keep.expand(bp, hp, -1, -1) & (kv_index >= 0)
        range_of = torch.where(kept, li * nkb + kv_index, n_ranges)
        rank = kept.to(torch.int32).cumsum(-1) - 1
        self.rounds = int(kept.sum(-1).max()) if kept.numel() else 0
        R = max(self.rounds, 1)
        # Range of each (round, query), n_ranges where the query has fewer entries.
        by_round = torch.full((bp, hp, n, R + 1), n_ranges, dtype=torch.long, device=dev)
        by_round.scatter_(-1, torch.where(kept, rank, R).long(), range_of)
        by_round = by_round[..., :R].transpose(-1, -2).reshape(bp, hp, R * n)  # round-major
        key = by_round * R + torch.arange(R, device=dev).repeat_interleave(n)
        order = torch.argsort(key, dim=-1, stable=True)
        self.pos = (order % n).to(I32).contiguous()
        self.pos_strides = broadcast_strides(self.pos)
        counts = torch.zeros(bp, hp, (n_ranges + 1) * R, dtype=torch.long, device=dev)
        counts.scatter_add_(-1, key, torch.ones_like(key))
        counts = counts[..., : n_ranges * R].view(bp, hp, n_ranges, R)
        flat = counts.flatten(2)
        run_start = (flat.cumsum(-1) - flat).view(bp, hp, n_ranges, R)
        total = flat.sum(-1, keepdim=True)
        base = (torch.arange(bp * hp, device=dev) * (R * n)).view(bp, hp, 1)
        self.rowptr = (torch.cat([run_start[..., 0], total], -1) + base).to(I32).contiguous()
        self.rowptr_strides = broadcast_strides(self.rowptr)

        # Round r's tasks: each range's run of that round, cut into block_m queries.
        bm = self.block_m
        per_round = counts.transpose(-1, -2)  # [B', H', R, n_ranges]
        n_tasks = _cdiv(per_round, bm)
        ends = n_tasks.cumsum(-1)
        self.n_tasks = _cdiv(n, bm) + min(n_ranges, n)
        t = torch.arange(self.n_tasks, device=dev).expand(bp, hp, R, -1).contiguous()
        rng = torch.searchsorted(ends, t, right=True).clamp(max=n_ranges - 1)
        chunk = t - (ends.gather(-1, rng) - n_tasks.gather(-1, rng))
        first = run_start.transpose(-1, -2).gather(-1, rng) + chunk * bm
        count = (per_round.gather(-1, rng) - chunk * bm).clamp(0, bm)
        count = torch.where(t < ends[..., -1:], count, 0)
        self.tasks = torch.stack([rng, first, count], -1).to(I32).contiguous()
        assert self.tasks.shape[-1] == TASK_WIDTH
        self.tasks_strides = broadcast_strides(self.tasks)

        self.ranges = torch.cat([
            torch.stack([rows[g, :, 0], rows[g, :, 1], torch.full_like(sizes, p), sizes], -1)
            for g, p in enumerate(LEVELS)
        ]).to(I32).contiguous()
        assert self.ranges.shape[-1] == RANGE_WIDTH
        self.levels = [(ranges, self.rowptr[..., g * nkb:]) for g, ranges in _key_ranges(plan, rows, choice)]

    def extra_round(self, n_extra: int) -> "ExtraRound":
        """The round of the extra keys: every query, in plan order."""
        return ExtraRound(self.q_offsets.device, int(self.q_offsets[-1]), n_extra, self.block_m)


class ExtraRound:
    """Tasks of the extra-key round: ``block_m`` consecutive queries each, one range (all
    ``n_extra`` keys)."""

    def __init__(self, dev, n: int, n_extra: int, block_m: int):
        first = torch.arange(0, n, block_m, device=dev)
        count = (n - first).clamp(max=block_m)
        self.tasks = torch.stack([torch.zeros_like(first), first, count], -1).to(I32).view(1, 1, -1, TASK_WIDTH)
        self.pos = torch.arange(n, dtype=I32, device=dev).view(1, 1, n)
        self.ranges = torch.tensor([[0, n_extra, 1, n_extra]], dtype=I32, device=dev)


def used_levels(plan: AttentionPlan) -> tuple[int, ...]:
    """The pool factors the plan's entries use (1 always: the keys themselves)."""
    valid = plan.kv_index >= 0
    return tuple(sorted({1, *(int(p) for p in plan.levels()[valid].unique().tolist())}))


def _key_ranges(plan: AttentionPlan, rows: torch.Tensor, choice: TileChoice):
    """``(level index, KeyRanges)`` of every stacked level, for the ``dk``/``dv`` launches
    (level 1 always: its rows are written, as zeros where no query uses them)."""
    sizes = plan.k_offsets.diff()
    k_block_max = int(sizes.max())
    used = used_levels(plan)
    out = []
    for g, p in enumerate(LEVELS):
        if p in used:
            level_rows = _cdiv(k_block_max, p)
            out.append((g, KeyRanges(rows[g], sizes, p, level_rows, keys_block_n(choice.keys, level_rows))))
    return out


def plan_tables(plan: AttentionPlan, choice: TileChoice):
    """The tables of the kernel family that runs ``plan``, and the pool factors to stack.

    Raises:
        NotImplementedError: per-token routing together with a coordinate window.
    """
    from .pooling import pyramid_rows

    if plan.token_keep is not None and plan.window is not None:
        raise NotImplementedError("the Triton kernels do not run per-token routing together with a coordinate window")
    levels = used_levels(plan)
    if box_supported(plan):
        return BoxTables(plan, choice), levels
    rows = pyramid_rows(plan.k_offsets, levels, plan.num_tokens)
    if plan.token_keep is not None:
        return RoutedTables(plan, rows, choice), levels
    return BlockTables(plan, rows, choice), levels


__all__ = ["BlockTables", "BoxTables", "ExtraRound", "KeyRanges", "RoutedTables", "WindowArgs", "box_supported",
           "plan_tables", "used_levels"]
