"""Host side of the kernels: a plan turned into the small int32 tables each kernel family
reads, built on the plan's device. The work count (:mod:`.work`) reads the same tables, so it
counts what the launches do.

* :class:`BlockTables` — plans without per-token routing (:mod:`.blocks`);
* :class:`BoxTables` — coordinate-window plans over a whole grid (:mod:`.window`);
* :class:`RoutedTables` — per-token routed plans (:mod:`.routed`).

Tables shaped ``[B'|1, H'|1, ...]`` follow the plan's batch and head dims (1 = shared); the
kernels read them through strides that are 0 where a dim is shared.

Building them reads nothing back from the device: every host number (block sizes, pool levels,
tile counts, launch switches) comes from the plan's :class:`~vdiff_sparse.plan.PlanFacts` and
its shapes (only a routed plan on the CPU has its round count read, exact where reading is
free: :class:`RoutedTables`), and small constant tables are written on the device by fills (a host-to-device copy
would stall the host and cannot be captured in a CUDA graph), so the construction traces into a
``torch.compile`` graph. A plan without facts has them read off its tensors
(:func:`~vdiff_sparse.plan.plan_facts`: free on the CPU, a host read on a GPU). The custom op
of :mod:`.ops` takes the tables flattened into tensors and ints (:func:`flatten`).
"""

from __future__ import annotations

import torch

from vdiff_sparse.plan import LEVELS, AttentionPlan, PlanFacts, plan_facts, read_facts
from vdiff_sparse.window_tiles import clipped_windows, key_boxes, needs_window_test, query_boxes, tiles_of

from .blocks import ENT_WIDTH
from .common import RANGE_WIDTH
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


def device_ints(values, device) -> torch.Tensor:
    """``[len(values)]`` int32 of host ints, written on ``device`` by fills, not copied there."""
    out = torch.empty(len(values), dtype=I32, device=device)
    for i, x in enumerate(values):
        out[i] = x
    return out


class OpArgs:
    """Tables as operands of a custom op (which takes only tensors and primitives): the
    ``tensors`` and ``ints`` the tables :meth:`put`, read back in the same order by ``take``."""

    def __init__(self, tensors=(), ints=()):
        self.tensors, self.ints = list(tensors), list(ints)
        self._tensor = self._int = 0

    def put(self, *values) -> None:
        """Append tensors and ints (a bool as 0/1, a tuple of ints item by item)."""
        for x in values:
            if isinstance(x, torch.Tensor):
                self.tensors.append(x)
            elif isinstance(x, tuple):
                self.ints.extend(x)
            else:
                self.ints.append(int(x) if isinstance(x, bool) else x)

    def take_tensors(self, count: int) -> list[torch.Tensor]:
        self._tensor += count
        return self.tensors[self._tensor - count:self._tensor]

    def take_ints(self, count: int) -> tuple:
        self._int += count
        return tuple(self.ints[self._int - count:self._int])


class KeyRanges:
    """The key ranges of one pool level ``p`` (``LEVELS[level]``) for the ``dk``/``dv`` kernel:
    ``table`` ``[n_k_blocks, RANGE_WIDTH]`` (first stacked row, rows, pool factor, tokens), the
    launch's ``block_n`` and ``sub`` tiles per range."""

    def __init__(self, rows: torch.Tensor, sizes: torch.Tensor, p: int, level: int, level_rows: int, block_n: int):
        self.p, self.level = p, level
        self.table = torch.stack(
            [rows[:, 0], rows[:, 1], torch.full_like(sizes, p), sizes], -1
        ).to(I32).contiguous()
        self.block_n = block_n
        self.sub = max(1, _cdiv(level_rows, block_n))

    def put(self, a: OpArgs) -> None:
        a.put(self.table, self.p, self.level, self.block_n, self.sub)

    @classmethod
    def take(cls, a: OpArgs) -> "KeyRanges":
        r = cls.__new__(cls)
        (r.table,) = a.take_tensors(1)
        r.p, r.level, r.block_n, r.sub = a.take_ints(4)
        return r


def _put_levels(a: OpArgs, levels: list[KeyRanges]) -> None:
    a.put(len(levels))
    for ranges in levels:
        ranges.put(a)


def _take_levels(a: OpArgs) -> list[KeyRanges]:
    (count,) = a.take_ints(1)
    return [KeyRanges.take(a) for _ in range(count)]


class BlockTables:
    """A plan without per-token routing as the tables of :mod:`.blocks`.

    Attributes:
        ent: ``[B'|1, H'|1, n_q_blocks, max_kv, ENT_WIDTH]`` entries of each query block,
            sorted by pool level, then rows (descending), then key block (unused slots at the
            end, 0 rows).
        counts: ``[B'|1, H'|1, n_q_blocks, 4, 2]`` entries and slots walked per level.
        rows_per_entry: ``[4]`` key rows reserved per entry of each level (the most any key
            block has at that level; only a level's last entry may have fewer, or the walk
            also computes the gap).
        passes: ``{"forward" | "dq": (BLOCK_M, BLOCK_N, tiles per query block)}``.
        rowptr, list_qb: the inverted lists: ``rowptr`` ``[B' * H' * 4 * n_k_blocks + 1]``
            where the query blocks ``list_qb`` of each (plan batch, plan head, level, key
            block) start.
        levels: the :class:`KeyRanges` of every level stacked; level ``g``'s lists start at
            ``rowptr[g * n_k_blocks]``.
        window: the plan's coordinate window (:class:`WindowArgs`), tested per pair (a
            hand-built window; the launches then use the ``window`` tiles).
    """

    def __init__(self, plan: AttentionPlan, rows: torch.Tensor, choice: TileChoice, facts: PlanFacts):
        dev = plan.kv_index.device
        nkb, nqb = plan.num_k_blocks, plan.num_q_blocks
        sizes = plan.k_offsets.diff()
        self.n_q_blocks = nqb
        self.q_offsets = plan.q_offsets.to(I32).contiguous()
        self.q_block_max, self.k_block_max = facts.q_block_max, facts.k_block_max
        self.max_kv = plan.max_kv
        self.window = WindowArgs(plan, dev, facts)
        # (BLOCK_M, BLOCK_N, tiles per query block) of the forward and dq launches.
        self.passes = {}
        for name, kind in (("forward", choice.forward), ("dq", choice.dq)):
            kind = choice.window if self.window.active else kind
            block_m = rows_block_m(kind, self.q_block_max)
            self.passes[name] = (block_m, kind.block_n, _cdiv(self.q_block_max, block_m))

        valid = plan.kv_index >= 0
        kb = plan.kv_index.clamp(min=0)
        li = level_index(torch.where(valid, plan.levels(), 1))
        n_rows = torch.where(valid, rows[li, kb, 1], 0)
        # Entries sorted by level, then rows (descending: a ragged block last), then key block;
        # unused slots last.
        order = torch.where(valid, (li * (self.k_block_max + 1) + self.k_block_max - n_rows) * nkb + kb,
                            len(LEVELS) * (self.k_block_max + 1) * nkb).argsort(-1)
        kb_s, li_s, rows_s = kb.gather(-1, order), li.gather(-1, order), n_rows.gather(-1, order)
        self.ent = torch.stack([rows[li_s, kb_s, 0], rows_s, sizes[kb_s]], -1).to(I32).contiguous()
        assert self.ent.shape[-1] == ENT_WIDTH.value
        self.ent_strides = broadcast_strides(self.ent)
        # Per level: entries, and slots walked: rows_per_entry for each entry but the last
        # (the shortest), which ends the walk at its last row.
        per_entry = [_cdiv(self.k_block_max, p) for p in LEVELS]
        self.rows_per_entry = device_ints(per_entry, dev)
        counts = []
        for g in range(len(LEVELS)):
            at_level = valid & (li == g)
            n = at_level.sum(-1)
            shortest = torch.where(at_level, n_rows, self.k_block_max).amin(-1)
            slots = torch.where(n > 0, (n - 1) * per_entry[g] + shortest, 0)
            counts.append(torch.stack([n, slots], -1))
        self.counts = torch.stack(counts, -2).to(I32).contiguous()
        self.counts_strides = broadcast_strides(self.counts)

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
        self.levels = _key_ranges(rows, sizes, facts, choice)
        self.keys_block_m = choice.keys.block_m

    def put(self, a: OpArgs) -> None:
        """The fields the launches read (:meth:`take` restores them)."""
        a.put(self.q_offsets, self.ent, self.counts, self.rows_per_entry, self.rowptr, self.list_qb,
              self.n_q_blocks, self.max_kv, self.keys_block_m, self.ent_strides, self.counts_strides,
              self.rowptr_strides, self.passes["forward"], self.passes["dq"])
        self.window.put(a)
        _put_levels(a, self.levels)

    @classmethod
    def take(cls, a: OpArgs) -> "BlockTables":
        t = cls.__new__(cls)
        t.q_offsets, t.ent, t.counts, t.rows_per_entry, t.rowptr, t.list_qb = a.take_tensors(6)
        t.n_q_blocks, t.max_kv, t.keys_block_m = a.take_ints(3)
        t.ent_strides, t.counts_strides, t.rowptr_strides = a.take_ints(2), a.take_ints(2), a.take_ints(2)
        t.passes = {"forward": a.take_ints(3), "dq": a.take_ints(3)}
        t.window = WindowArgs.take(a)
        t.levels = _take_levels(a)
        return t


class WindowArgs:
    """A plan's coordinate window as the packed operands of :func:`~.common.window_ok`
    (placeholders when there is none, or when ``plan`` is ``None``).

    Per axis ``a`` with dilation ``d``, a coordinate ``x`` is the lattice index ``x // d`` and
    the lattice ``x % d``. Lattice indices are packed into bit fields of one int32, each one
    bit wider than the largest index it holds, with a guard bit above each field
    (``guard``); lattices into one mixed-radix int. Per plan position: ``code`` and ``group``
    of its coordinates, ``lo_code``/``hi_code`` (guard bits set) and ``lo_group`` of its
    window, clipped to the grid and onto its lattice (a window empty on some axis gets a low
    end above every key). The field widths come from the grid, else from the extent in the
    plan's ``facts`` (needed with a window).

    Raises:
        NotImplementedError: a grid too large for the fields to fit in 31 bits.
    """

    def __init__(self, plan: AttentionPlan | None, dev, facts: PlanFacts | None = None):
        w = None if plan is None else plan.window
        self.active = w is not None
        if w is None:
            self.code = self.group = self.lo_code = self.hi_code = self.lo_group = torch.zeros(1, dtype=I32, device=dev)
            self.guard = 0
            self.dilated = False
            return
        extent = w.grid or facts.window_extent or read_facts(plan, window_tiles=False).window_extent
        coords, lo, hi = w.coords.long(), w.lo.long(), w.hi.long()
        d = device_ints(w.dilation, dev).long()
        n_axis = device_ints(extent, dev).long()
        lo = torch.where(lo < 0, torch.remainder(lo, d), lo)  # the first lattice point inside the grid
        hi = torch.minimum(hi, n_axis - 1)
        lo_group = torch.remainder(lo, d)
        lo_index = lo.div(d, rounding_mode="floor")
        hi_index = (hi - lo_group).div(d, rounding_mode="floor")
        lattice = [_cdiv(n, step) for n, step in zip(extent, w.dilation)]  # lattice points per axis
        n_index = device_ints(lattice, dev).long()
        empty = (hi_index < lo_index).any(-1, keepdim=True)
        lo_index = torch.where(empty, n_index, lo_index)
        hi_index = torch.where(empty, 0, hi_index)
        widths = [n.bit_length() for n in lattice]  # holds 0..n_index (the empty mark)
        offsets = [0, widths[0] + 1, widths[0] + widths[1] + 2]
        if sum(widths) + 3 > 31:
            raise NotImplementedError(
                f"a coordinate window over a grid of {tuple(extent)} ({tuple(lattice)} lattice points per axis) is "
                "too large for the kernels' packed window test (at most 31 bits of fields and guards)")

        def pack(x):
            return sum(x[..., a] << offsets[a] for a in range(3))

        self.guard = sum(1 << (offsets[a] + widths[a]) for a in range(3))
        self.code = pack(coords.div(d, rounding_mode="floor")).to(I32).contiguous()
        self.lo_code = pack(lo_index).to(I32).contiguous()
        self.hi_code = (pack(hi_index) | self.guard).to(I32).contiguous()

        def mix(x):
            return (x[..., 0] * d[1] + x[..., 1]) * d[2] + x[..., 2]

        self.group = mix(torch.remainder(coords, d)).to(I32).contiguous()
        self.lo_group = mix(lo_group).to(I32).contiguous()
        self.dilated = any(x > 1 for x in w.dilation)

    def args(self) -> tuple:
        """The kernels' ``CODE, GROUP, LO_CODE, HI_CODE, LO_GROUP, GUARD`` arguments."""
        return self.code, self.group, self.lo_code, self.hi_code, self.lo_group, self.guard

    def put(self, a: OpArgs) -> None:
        a.put(self.code, self.group, self.lo_code, self.hi_code, self.lo_group, self.guard, self.active, self.dilated)

    @classmethod
    def take(cls, a: OpArgs) -> "WindowArgs":
        w = cls.__new__(cls)
        w.code, w.group, w.lo_code, w.hi_code, w.lo_group = a.take_tensors(5)
        w.guard, active, dilated = a.take_ints(3)
        w.active, w.dilated = bool(active), bool(dilated)
        return w


def box_supported(plan: AttentionPlan) -> bool:
    """Whether the box kernels (:mod:`.window`) run ``plan``: a coordinate window over a whole
    grid whose listed key blocks hold every key of every window (GNA), no per-token routing."""
    return plan.window is not None and plan.window.grid is not None and plan.token_keep is None


class BoxTables:
    """A GNA window plan as the tables of :mod:`.window` (shared by every batch and head).

    Attributes:
        q_tiles: ``[n_q_blocks * tiles per block, TILE_WIDTH]``: ``BLOCK_M`` query tiles of every query
            block with the box bounding their windows (clipped to the grid).
        k_tiles: ``[n_k_blocks * tiles per block, TILE_WIDTH]``: ``BLOCK_N`` key tiles of every key
            block with the box of the queries whose windows can meet them.
        q_masked, k_masked: whether some box holds a pair outside a window (the launches
            then test pairs): from the facts' ``window_tiles``, which say up to which tile size
            no box does.
        pos_of_token: ``[T * H * W]`` plan position of each grid token.
    """

    def __init__(self, plan: AttentionPlan, choice: TileChoice, facts: PlanFacts):
        w = plan.window
        dev = plan.q_offsets.device
        self.grid = w.grid
        self.window = WindowArgs(plan, dev, facts)
        self.q_offsets = plan.q_offsets.to(I32).contiguous()
        self.n_q_blocks = plan.num_q_blocks
        n = plan.num_tokens
        positions = torch.arange(n, device=dev)
        token = positions if plan.perm is None else plan.perm
        self.pos_of_token = torch.empty(n, dtype=I32, device=dev)
        self.pos_of_token[token] = positions.to(I32)
        lo, hi = clipped_windows(w.lo, w.hi, w.grid)
        coords = w.coords.long()
        dilated = any(x > 1 for x in w.dilation)
        unmasked_q, unmasked_k = facts.window_tiles

        self.block_m = rows_block_m(choice.window, facts.q_block_max)
        self.block_n = choice.window.block_n
        tile_q, start_q, count_q = tiles_of(plan.q_offsets, self.block_m, facts.q_block_max, n)
        self.q_tiles = _tile_table(start_q, count_q, *query_boxes(lo, hi, tile_q, start_q.numel()))
        self.q_masked = dilated or needs_window_test(self.block_m, unmasked_q, facts.q_block_max)

        self.keys_block_n = keys_block_n(choice.keys, facts.k_block_max)
        self.keys_block_m = choice.keys.block_m
        tile_k, start_k, count_k = tiles_of(plan.k_offsets, self.keys_block_n, facts.k_block_max, n)
        qbox_lo, qbox_hi, _ = key_boxes(coords, lo, hi, tile_k, start_k.numel(), w.grid)
        self.k_tiles = _tile_table(start_k, count_k, qbox_lo, qbox_hi)
        self.k_masked = dilated or needs_window_test(self.keys_block_n, unmasked_k, facts.k_block_max)

    def put(self, a: OpArgs) -> None:
        """The fields the launches read (:meth:`take` restores them)."""
        a.put(self.q_offsets, self.q_tiles, self.k_tiles, self.pos_of_token, self.grid, self.n_q_blocks,
              self.block_m, self.block_n, self.keys_block_m, self.keys_block_n, self.q_masked, self.k_masked)
        self.window.put(a)

    @classmethod
    def take(cls, a: OpArgs) -> "BoxTables":
        t = cls.__new__(cls)
        t.q_offsets, t.q_tiles, t.k_tiles, t.pos_of_token = a.take_tensors(4)
        t.grid = a.take_ints(3)
        t.n_q_blocks, t.block_m, t.block_n, t.keys_block_m, t.keys_block_n, q_masked, k_masked = a.take_ints(7)
        t.q_masked, t.k_masked = bool(q_masked), bool(k_masked)
        t.window = WindowArgs.take(a)
        return t


def _tile_table(start, count, box_lo, box_hi) -> torch.Tensor:
    """Rows of :data:`~.window.TILE_WIDTH` columns (empty tiles and empty boxes get count or
    extent 0)."""
    extent = (box_hi - box_lo + 1).clamp(min=0)
    real = count > 0
    box = torch.stack([torch.where(real[:, None], box_lo, 0), torch.where(real[:, None], extent, 0)], -1)
    table = torch.cat([start[:, None], count[:, None], box.flatten(1)], 1)
    assert table.shape[1] == TILE_WIDTH.value
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
        rounds: the most entries a query keeps: counted on the CPU (outside traced code);
            elsewhere the facts' ``keep_max``, else ``max_kv`` (a bound: see below).
    """

    def __init__(self, plan: AttentionPlan, rows: torch.Tensor, choice: TileChoice, facts: PlanFacts):
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

        bp = max(plan.kv_index.shape[0], plan.token_keep.shape[0])
        hp = max(plan.kv_index.shape[1], plan.token_keep.shape[1])
        q_block = plan.query_block_of_position()
        kv_index = plan.kv_index.expand(bp, hp, -1, -1)[:, :, q_block]  # [B', H', N, max_kv]
        li = level_index(torch.where(kv_index >= 0, plan.levels().expand(bp, hp, -1, -1)[:, :, q_block], 1))
        kept = plan.token_keep.expand(bp, hp, -1, -1) & (kv_index >= 0)
        range_of = torch.where(kept, li * nkb + kv_index, n_ranges)
        rank = kept.to(torch.int32).cumsum(-1) - 1
        if dev.type == "cpu" and not torch.compiler.is_compiling():
            self.rounds = int(kept.sum(-1).max()) if kept.numel() else 0
        else:
            # On a GPU (or in a traced graph) the count would be a host read per call. A bound
            # costs a launch per round past the true count (every task empty: its programs
            # return at once) and [B', H', N] of the round tables per round; a local top-k
            # planner knows the count exactly.
            self.rounds = plan.max_kv if facts.keep_max is None else min(facts.keep_max, plan.max_kv)
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
        assert self.tasks.shape[-1] == TASK_WIDTH.value
        self.tasks_strides = broadcast_strides(self.tasks)

        self.ranges = torch.cat([
            torch.stack([rows[g, :, 0], rows[g, :, 1], torch.full_like(sizes, p), sizes], -1)
            for g, p in enumerate(LEVELS)
        ]).to(I32).contiguous()
        assert self.ranges.shape[-1] == RANGE_WIDTH.value
        self.levels = _key_ranges(rows, sizes, facts, choice)

    def put(self, a: OpArgs) -> None:
        """The fields the launches read (:meth:`take` restores them)."""
        a.put(self.q_offsets, self.pos, self.tasks, self.rowptr, self.ranges, self.n_ranges, self.n_q_blocks,
              self.block_m, self.block_n, self.keys_block_m, self.rounds, self.n_tasks, self.pos_strides,
              self.tasks_strides, self.rowptr_strides)
        _put_levels(a, self.levels)

    @classmethod
    def take(cls, a: OpArgs) -> "RoutedTables":
        t = cls.__new__(cls)
        t.q_offsets, t.pos, t.tasks, t.rowptr, t.ranges = a.take_tensors(5)
        t.n_ranges, t.n_q_blocks, t.block_m, t.block_n, t.keys_block_m, t.rounds, t.n_tasks = a.take_ints(7)
        t.pos_strides, t.tasks_strides, t.rowptr_strides = a.take_ints(2), a.take_ints(2), a.take_ints(2)
        t.levels = _take_levels(a)
        return t


class ExtraRound:
    """Tasks of the extra-key round of :mod:`.routed`: ``block_m`` consecutive queries each of
    the ``n`` in plan order, one range (all ``n_extra`` keys)."""

    def __init__(self, dev, n: int, n_extra: int, block_m: int):
        first = torch.arange(0, n, block_m, device=dev)
        count = (n - first).clamp(max=block_m)
        self.tasks = torch.stack([torch.zeros_like(first), first, count], -1).to(I32).view(1, 1, -1, TASK_WIDTH.value)
        self.pos = torch.arange(n, dtype=I32, device=dev).view(1, 1, n)
        self.ranges = device_ints([0, n_extra, 1, n_extra], dev).view(1, RANGE_WIDTH.value)


def _key_ranges(rows: torch.Tensor, sizes: torch.Tensor, facts: PlanFacts, choice: TileChoice) -> list[KeyRanges]:
    """The :class:`KeyRanges` of every stacked level, for the ``dk``/``dv`` launches (level 1
    always: its rows are written, as zeros where no query uses them)."""
    out = []
    for g, p in enumerate(LEVELS):
        if p in facts.levels:
            level_rows = _cdiv(facts.k_block_max, p)
            out.append(KeyRanges(rows[g], sizes, p, g, level_rows, keys_block_n(choice.keys, level_rows)))
    return out


def plan_tables(plan: AttentionPlan, choice: TileChoice):
    """The tables of the kernel family that runs ``plan``, and the plan's facts
    (:func:`~vdiff_sparse.plan.plan_facts`; their ``levels`` are the pool factors to stack).

    Raises:
        NotImplementedError: per-token routing together with a coordinate window.
    """
    from .pooling import pyramid_rows

    if plan.token_keep is not None and plan.window is not None:
        raise NotImplementedError("the Triton kernels do not run per-token routing together with a coordinate window")
    facts = plan_facts(plan)
    if box_supported(plan):
        return BoxTables(plan, choice, facts), facts
    rows = pyramid_rows(plan.k_offsets, facts.levels, plan.num_tokens)
    if plan.token_keep is not None:
        return RoutedTables(plan, rows, choice, facts), facts
    return BlockTables(plan, rows, choice, facts), facts


FAMILIES = (BlockTables, BoxTables, RoutedTables)


def flatten(tables) -> tuple[int, list[torch.Tensor], list[int]]:
    """``tables`` as custom op operands: ``(family, tensors, ints)`` (:func:`unflatten`)."""
    a = OpArgs()
    tables.put(a)
    return FAMILIES.index(type(tables)), a.tensors, a.ints


def unflatten(family: int, tensors, ints):
    """The launch fields of the tables :func:`flatten` gave ``(family, tensors, ints)`` for."""
    return FAMILIES[family].take(OpArgs(tensors, ints))


__all__ = ["FAMILIES", "BlockTables", "BoxTables", "ExtraRound", "KeyRanges", "OpArgs", "RoutedTables", "WindowArgs",
           "box_supported", "device_ints", "flatten", "plan_tables", "unflatten"]
