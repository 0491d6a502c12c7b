"""How much of the kernels' work a plan asks for: query-key pairs, useful against executed.

On a GPU a tile that is computed and masked costs as much as a useful one, so the pairs of
every tile the kernels compute are the work they do. :func:`work` counts them from the same
tables the launches read (:mod:`.tables`) at the tiles a launch uses (:mod:`.tiles`), with the
loop bounds of the kernels: a query-major program computes ``BLOCK_M`` rows times every
``BLOCK_N`` step of its key loop; a key-major one ``BLOCK_N`` keys times every ``BLOCK_M``
step of its query loop. Under the interpreter the kernels count the same tiles themselves
(:func:`~.ops.count_work`), and the tests check the two agree on every method.

For a coordinate-window plan over a grid (GNA) the count also gives the *union*: for each
tile, its real queries times the keys in the union of their windows (key tiles: its real keys
times the queries whose windows meet it) — what any kernel with these tiles must read. It is
exact for windows that are products of per-axis windows over row-major tile boxes (GNA's), and
left out (``None``) otherwise.
"""

from __future__ import annotations

import itertools

import torch

from vdiff_sparse.plan import LEVELS, AttentionPlan

from .tables import BlockTables, BoxTables, RoutedTables, plan_tables
from .tiles import HOPPER, TileChoice, gpu_tiles, keys_block_n


def _cdiv(a, b):
    return (a + b - 1) // b


def _padded(n, block):
    """``n`` rounded up to whole tiles of ``block``."""
    return _cdiv(n, block) * block


def _part(useful: float, executed: float, union: float | None = None) -> dict:
    out = {"useful": useful, "executed": executed, "efficiency": useful / executed if executed else 1.0}
    if union is not None:
        out["union"] = union
        out["executed_over_union"] = executed / union if union else 1.0
    return out


def work(plan: AttentionPlan, head_dim: int = 128, *, value_head_dim: int | None = None, batch: int | None = None,
         heads: int | None = None, text_keys: int = 0, gpu: int = HOPPER, tiles: TileChoice | None = None) -> dict:
    """Useful and executed query-key pairs of the forward and backward kernels for ``plan``.

    Args:
        plan: any plan the Triton backend runs.
        head_dim, value_head_dim: of q/k and of v; with ``gpu`` (compute capability major,
            default Hopper) they select the tiles (:data:`~.tiles.GPU_TILES`).
        batch, heads: of the call (default: the plan's own batch and head dims; a dim the plan
            shares counts once).
        text_keys: extra keys every query attends (counted as real keys).
        tiles: the base tiles (default the GPU's for the head dims).

    Returns:
        ``{"forward": part, "backward": part}``; a part is ``{"useful", "executed",
        "efficiency"}`` (plus ``union`` and ``executed_over_union`` for GNA window plans);
        ``backward`` adds the parts ``dq`` and ``dkdv``: each computes every pair once.
    """
    value_head_dim = head_dim if value_head_dim is None else value_head_dim
    choice = gpu_tiles(max(head_dim, value_head_dim), gpu) if tiles is None else tiles
    tables, _ = plan_tables(plan, choice)
    plan_b = max(plan.kv_index.shape[0], 1 if plan.token_keep is None else plan.token_keep.shape[0])
    plan_h = max(plan.kv_index.shape[1], 1 if plan.token_keep is None else plan.token_keep.shape[1])
    batch = plan_b if batch is None else batch
    heads = plan_h if heads is None else heads
    n = plan.num_tokens
    calls = batch * heads
    useful = plan.density() * n * n * calls + n * text_keys * calls

    if isinstance(tables, RoutedTables):
        fwd, dq, dkdv = _routed(tables, text_keys, choice)
        per_plan = True
    elif isinstance(tables, BoxTables):
        fwd, dq, dkdv = _box(tables, text_keys, choice)
        per_plan = False
    else:
        fwd, dq, dkdv = _blocks(plan, tables, text_keys, choice)
        per_plan = True
    # Per-plan counts are summed over the plan's own (batch, head) entries: scale to the call.
    scale = calls / (plan_b * plan_h) if per_plan else calls
    fwd, dq, dkdv = fwd * scale, dq * scale, dkdv * scale
    union_f = union_k = None
    if isinstance(tables, BoxTables):
        unions = box_unions(plan, tables)
        if unions is not None:
            union_f, union_k = (u * calls + n * text_keys * calls for u in unions)
    backward = _part(2 * useful, dq + dkdv, None if union_f is None else union_f + union_k)
    return {"forward": _part(useful, fwd, union_f),
            "backward": {**backward, "dq": _part(useful, dq, union_f), "dkdv": _part(useful, dkdv, union_k)}}


def _text_dkdv(q_offsets: torch.Tensor, text_keys: int, choice: TileChoice) -> float:
    """The extra keys' ``dk``/``dv`` launch: one range over every query block."""
    if not text_keys:
        return 0.0
    q_pad = _padded(q_offsets.diff().long(), choice.keys.block_m).sum().item()
    return float(q_pad * _padded(text_keys, keys_block_n(choice.keys, text_keys)))


def _blocks(plan: AttentionPlan, t: BlockTables, text_keys: int, choice: TileChoice) -> tuple[float, float, float]:
    """Forward, ``dq`` and ``dk``/``dv`` pairs of :mod:`.blocks`, summed over the plan's
    (batch, head) entries."""
    level_rows = t.counts[..., 1].long()  # [B', H', nqb, 4]: key slots walked per level
    q_sizes = plan.q_offsets.diff()
    rows = []
    for name in ("forward", "dq"):
        block_m, block_n, _ = t.passes[name]
        keys = _padded(level_rows, block_n).sum(-1) + _padded(text_keys, block_n)  # [B', H', nqb]
        rows.append(float((keys * _padded(q_sizes, block_m)).sum()))

    valid = plan.kv_index >= 0
    kb = plan.kv_index.clamp(min=0)
    level = torch.where(valid, plan.levels(), 1)
    q_pad = _padded(q_sizes, t.keys_block_m)[None, None, :, None]
    dkdv = 0.0
    for ranges in t.levels:
        k_rows = ranges.table[:, 1].long()
        k_pad = _padded(k_rows, ranges.block_n)
        sel = valid & (level == ranges.p)
        dkdv += float((torch.where(sel, k_pad[kb], 0) * q_pad).sum())
    dkdv += _text_dkdv(plan.q_offsets, text_keys, choice) * level_rows.shape[0] * level_rows.shape[1]
    return rows[0], rows[1], dkdv


def _routed(t: RoutedTables, text_keys: int, choice: TileChoice) -> tuple[float, float, float]:
    """Forward, ``dq`` (the same tasks) and ``dk``/``dv`` pairs of :mod:`.routed`, summed over the plan's
    (batch, head) entries."""
    tasks = t.tasks[:, :, : t.rounds].long()
    k_pad = _padded(t.ranges[:, 1].long(), t.block_n)
    real = tasks[..., 2] > 0
    forward = float(torch.where(real, k_pad[tasks[..., 0]], 0).sum() * t.block_m)
    n_entries = tasks.shape[0] * tasks.shape[1]
    n = int(t.q_offsets[-1])
    if text_keys:
        forward += _padded(n, t.block_m) * _padded(text_keys, t.block_n) * n_entries
    dkdv = 0.0
    nkb = t.n_ranges // len(LEVELS)
    runs = t.rowptr.long().diff(dim=-1)  # [B', H', n_ranges] queries per range
    for ranges in t.levels:
        g = ranges.level
        k_pad = _padded(ranges.table[:, 1].long(), ranges.block_n)
        dkdv += float((_padded(runs[..., g * nkb:(g + 1) * nkb], t.keys_block_m) * k_pad).sum())
    dkdv += _text_dkdv(t.q_offsets, text_keys, choice) * n_entries
    return forward, forward, dkdv


def _box(t: BoxTables, text_keys: int, choice: TileChoice) -> tuple[float, float, float]:
    """Forward, ``dq`` (the same tiles) and ``dk``/``dv`` pairs of :mod:`.window` for one (batch, head)."""
    q_tiles, k_tiles = t.q_tiles.long(), t.k_tiles.long()
    real = q_tiles[:, 1] > 0
    box = q_tiles[:, 3] * q_tiles[:, 5] * q_tiles[:, 7]
    keys = _padded(box, t.block_n) + _padded(text_keys, t.block_n)
    forward = float(torch.where(real, keys, 0).sum() * t.block_m)
    real = k_tiles[:, 1] > 0
    box = k_tiles[:, 3] * k_tiles[:, 5] * k_tiles[:, 7]
    dkdv = float(torch.where(real, _padded(box, t.keys_block_m), 0).sum() * t.keys_block_n)
    return forward, forward, dkdv + _text_dkdv(t.q_offsets, text_keys, choice)


# --- the union bound of window plans ---------------------------------------------------------

def _axis_relations(plan: AttentionPlan):
    """Per axis, the key coordinates each query coordinate's window holds (bitmasks as
    Python ints), and the transpose; ``None`` if the window is not a product of per-axis
    windows."""
    w = plan.window
    coords, lo, hi = w.coords.long(), w.lo.long(), w.hi.long()
    rel, rel_t = [], []
    for axis in range(3):
        n = int(w.grid[axis])
        c = coords[:, axis]
        first = torch.full((n,), -1, dtype=torch.long).scatter_(0, c.flip(0), torch.arange(c.numel()).flip(0))
        lo1, hi1 = lo[first, axis], hi[first, axis]
        if not (torch.equal(lo[:, axis], lo1[c]) and torch.equal(hi[:, axis], hi1[c])):
            return None
        d = w.dilation[axis]
        masks = []
        for x in range(n):
            m = 0
            for y in range(max(0, int(lo1[x])), min(n - 1, int(hi1[x])) + 1):
                if (y - int(lo1[x])) % d == 0:
                    m |= 1 << y
            masks.append(m)
        rel.append(masks)
        rel_t.append([sum(1 << x for x in range(n) if masks[x] >> y & 1) for y in range(n)])
    return rel, rel_t


def _row_major_boxes(start: int, stop: int, extent) -> list:
    """Cut raster indices ``[start, stop)`` of a box of ``extent`` (t, h, w) into at most five
    boxes, each ``((t0, t1), (h0, h1), (w0, w1))`` half-open."""
    _, eh, ew = extent
    plane = eh * ew
    boxes = []
    i = start

    def at(j):
        return j // plane, (j % plane) // ew, j % ew

    if i < stop and i % ew:  # the rest of a row
        end = min(stop, (i // ew + 1) * ew)
        t, h, w = at(i)
        boxes.append(((t, t + 1), (h, h + 1), (w, w + (end - i))))
        i = end
    if i < stop and i % plane:  # the rest of a plane, whole rows
        end = min((stop // ew) * ew, (i // plane + 1) * plane)
        if end > i:
            t, h, _ = at(i)
            boxes.append(((t, t + 1), (h, h + (end - i) // ew), (0, ew)))
            i = end
    end = (stop // plane) * plane
    if end > i:  # whole planes
        boxes.append(((i // plane, end // plane), (0, eh), (0, ew)))
        i = end
    end = (stop // ew) * ew
    if end > i:  # whole rows of the last plane
        t, h, _ = at(i)
        boxes.append(((t, t + 1), (h, h + (end - i) // ew), (0, ew)))
        i = end
    if stop > i:  # part of the last row
        t, h, w = at(i)
        boxes.append(((t, t + 1), (h, h + 1), (w, w + stop - i)))
    return boxes


def _union_size(boxes, origin, rel) -> int:
    """Size of the union over ``boxes`` (local, shifted by ``origin``) of the product over
    axes of the related coordinates (inclusion-exclusion over the boxes)."""
    sets = []
    for box in boxes:
        per_axis = []
        for axis, (a, b) in enumerate(box):
            m = 0
            for x in range(origin[axis] + a, origin[axis] + b):
                m |= rel[axis][x]
            per_axis.append(m)
        sets.append(per_axis)
    total = 0
    for r in range(1, len(sets) + 1):
        for subset in itertools.combinations(sets, r):
            size = 1
            for axis in range(3):
                m = subset[0][axis]
                for s in subset[1:]:
                    m &= s[axis]
                size *= m.bit_count()
            total += size if r % 2 else -size
    return total


def _tile_unions(offsets: torch.Tensor, tiles: torch.Tensor, coords: torch.Tensor, rel) -> float | None:
    """Sum over tiles of real rows x the union of their related coordinates; ``None`` if a
    block is not a row-major box of coordinates."""
    bounds = offsets.tolist()
    origin_extent = []
    for b0, b1 in zip(bounds[:-1], bounds[1:]):
        c = coords[b0:b1]
        origin = c.min(0).values
        extent = c.max(0).values - origin + 1
        local = torch.arange(b1 - b0)
        raster = torch.stack([local // (extent[1] * extent[2]), (local // extent[2]) % extent[1], local % extent[2]], 1)
        if int(extent.prod()) != b1 - b0 or not torch.equal(c - origin, raster):
            return None
        origin_extent.append((b0, origin.tolist(), extent.tolist()))
    block_of = torch.repeat_interleave(torch.arange(len(bounds) - 1), offsets.diff())
    total = 0
    for start, count in tiles[:, :2].tolist():
        if count == 0:
            continue
        b0, origin, extent = origin_extent[int(block_of[start])]
        boxes = _row_major_boxes(start - b0, start - b0 + count, extent)
        total += count * _union_size(boxes, origin, rel)
    return float(total)


def box_unions(plan: AttentionPlan, t: BoxTables) -> tuple[float, float] | None:
    """Per (batch, head): the forward union (query tiles x keys of their windows' union) and
    the ``dk``/``dv`` one (key tiles x queries whose windows meet them), or ``None``."""
    relations = _axis_relations(plan)
    if relations is None:
        return None
    rel, rel_t = relations
    coords = plan.window.coords.long().cpu()
    forward = _tile_unions(plan.q_offsets.cpu(), t.q_tiles.cpu(), coords, rel)
    keys = _tile_unions(plan.k_offsets.cpu(), t.k_tiles.cpu(), coords, rel_t)
    if forward is None or keys is None:
        return None
    return forward, keys


__all__ = ["box_unions", "work"]
