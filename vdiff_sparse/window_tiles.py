"""Tiles of a window plan's blocks and the boxes their windows span (GNA over a whole grid).

A block of plan positions is cut into tiles of ``block`` positions from its start. A query
tile sees the box bounding its queries' windows; a key tile is seen by the box of the queries
whose windows can meet it. A box holds pairs outside the windows unless every query of a query
tile shares one window (resp. every query that can see a key tile sees all of it): only then
may a kernel skip its per-pair window test.

The Triton box tables (``vdiff_sparse.kernels.tables``) build their tiles and boxes here on the
plan's device; :func:`largest_unmasked_tiles` finds, on the host, the tile sizes that need no
test, which a plan made on the CPU carries to the GPU (:class:`~vdiff_sparse.plan.PlanFacts`).
Positions, coordinates and windows are int64; ``grid`` is ``(T, H, W)``.
"""

from __future__ import annotations

import torch


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def clipped_windows(lo: torch.Tensor, hi: torch.Tensor, grid: tuple[int, int, int]):
    """``lo``, ``hi`` ``[N, 3]`` clipped to the grid (a window past an edge holds no key there)."""
    lo = lo.long().clamp(min=0)
    hi = torch.stack([hi[:, axis].long().clamp(max=grid[axis] - 1) for axis in range(3)], 1)
    return lo, hi


def tiles_of(offsets: torch.Tensor, block: int, block_max: int, n: int):
    """Cut every block of ``offsets`` (``N = n`` positions, the largest block ``block_max``)
    into tiles of ``block`` positions, as many per block as the largest needs.

    Returns:
        ``(tile [N], start [n_tiles], count [n_tiles])``: the tile of each position, each
        tile's first position and size (0 for tiles past a block's end).
    """
    dev = offsets.device
    sizes = offsets.diff()
    sub = _cdiv(block_max, block)
    n_blocks = sizes.numel()
    within = torch.arange(sub, device=dev) * block
    start = (offsets[:-1, None] + within).flatten()
    count = (sizes[:, None] - within).clamp(0, block).flatten()
    block_of = torch.repeat_interleave(torch.arange(n_blocks, device=dev), sizes, output_size=n)
    pos = torch.arange(n, device=dev)
    tile = block_of * sub + (pos - offsets[:-1][block_of]) // block
    return tile, start, count


def segment(values: torch.Tensor, segment_of: torch.Tensor, n: int, how: str) -> torch.Tensor:
    """``[n, 3]`` reduction (``amin``/``amax``) of ``values`` ``[N, 3]`` per segment id."""
    fill = torch.iinfo(torch.int64).max if how == "amin" else torch.iinfo(torch.int64).min
    out = torch.full((n, 3), fill, dtype=torch.int64, device=values.device)
    return out.scatter_reduce(0, segment_of[:, None].expand(-1, 3), values, how, include_self=True)


def query_boxes(lo: torch.Tensor, hi: torch.Tensor, tile: torch.Tensor, n_tiles: int):
    """Per query tile, the box bounding its windows: ``[n_tiles, 3]`` low and high ends."""
    return segment(lo, tile, n_tiles, "amin"), segment(hi, tile, n_tiles, "amax")


def shares_one_window(lo, hi, tile: torch.Tensor, n_tiles: int, box_lo, box_hi) -> torch.Tensor:
    """``[n_tiles]`` whether all queries of each tile have the window its box is."""
    same = (segment(lo, tile, n_tiles, "amax") == box_lo) & (segment(hi, tile, n_tiles, "amin") == box_hi)
    return same.all(-1)


def key_boxes(coords, lo, hi, tile: torch.Tensor, n_tiles: int, grid: tuple[int, int, int], held: bool = False):
    """Per key tile: the box of query coordinates whose windows can meet it (``[n_tiles, 3]``
    low and high ends), and with ``held`` ``[n_tiles]`` whether each of those queries sees the
    whole tile (else ``None``).

    Per axis and coordinate c, the widest and the narrowest window of the queries at c: a query
    can see a key tile only if, on every axis, its window meets the tile's span, and sees all of
    it if, on every axis, its window holds the span.
    """
    dev = coords.device
    key_lo, key_hi = segment(coords, tile, n_tiles, "amin"), segment(coords, tile, n_tiles, "amax")
    box_lo, box_hi, holds = [], [], torch.ones(n_tiles, dtype=torch.bool, device=dev)
    for axis in range(3):
        length = grid[axis]
        c = coords[:, axis]
        along = torch.arange(length, device=dev)

        def per_coordinate(values, how, fill):
            out = torch.full((length,), fill, dtype=torch.long, device=dev)
            return out.scatter_reduce(0, c, values[:, axis], how, include_self=True)

        widest_lo, widest_hi = per_coordinate(lo, "amin", length), per_coordinate(hi, "amax", -1)
        meets = (widest_lo[None, :] <= key_hi[:, axis, None]) & (widest_hi[None, :] >= key_lo[:, axis, None])
        first, last = torch.where(meets, along, length).amin(1), torch.where(meets, along, -1).amax(1)
        box_lo.append(first)
        box_hi.append(last)
        if not held:
            continue
        narrow_lo, narrow_hi = per_coordinate(lo, "amax", -1), per_coordinate(hi, "amin", length)
        inside = (along[None, :] < first[:, None]) | (along[None, :] > last[:, None]) | (
            (narrow_lo[None, :] <= key_lo[:, axis, None]) & (narrow_hi[None, :] >= key_hi[:, axis, None]))
        holds &= inside.all(1)
    return torch.stack(box_lo, 1), torch.stack(box_hi, 1), holds if held else None


#: The tile sizes a kernel launches: powers of two from 16 (the smallest ``tl.dot`` side) to
#: 256 positions. Only these are checked (a check costs a pass over every position).
TILE_SIZES = (16, 32, 64, 128, 256)


def largest_unmasked_tiles(coords, lo, hi, grid: tuple[int, int, int], q_offsets, k_offsets, n: int,
                           q_block_max: int, k_block_max: int) -> tuple[int, int]:
    """``(query tile, key tile)``: the largest of :data:`TILE_SIZES` whose tiles need no
    per-pair window test (one at or above a side's largest block: whole blocks need none, nor
    does any tile; 0: every size needs it). Reads the tensors (for CPU ones).

    A tile that needs no test stays so when halved (its halves are subsets seen by the same
    window, resp. met by fewer queries), so the sizes that need none are those up to the
    largest.
    """
    lo, hi = clipped_windows(lo, hi, grid)

    def query_ok(block):
        tile, _, count = tiles_of(q_offsets, block, q_block_max, n)
        box_lo, box_hi = query_boxes(lo, hi, tile, count.numel())
        same = shares_one_window(lo, hi, tile, count.numel(), box_lo, box_hi)
        return bool((same | (count == 0)).all())

    def key_ok(block):
        tile, _, count = tiles_of(k_offsets, block, k_block_max, n)
        _, _, holds = key_boxes(coords, lo, hi, tile, count.numel(), grid, held=True)
        return bool((holds | (count == 0)).all())

    def largest(ok, block_max):
        best = 0
        for block in TILE_SIZES:
            if not ok(block):
                break
            best = block
            if block >= block_max:
                break
        return best

    return largest(query_ok, q_block_max), largest(key_ok, k_block_max)


def needs_window_test(block: int, unmasked: int, block_max: int) -> bool:
    """Whether tiles of ``block`` positions need the pair test, given the largest size that
    needs none (:func:`largest_unmasked_tiles`) and the largest block."""
    if unmasked >= block_max:
        return False  # whole blocks need none, so no tile of any size does
    return not (block <= unmasked and block & (block - 1) == 0)


__all__ = ["TILE_SIZES", "clipped_windows", "key_boxes", "largest_unmasked_tiles", "needs_window_test", "query_boxes", "segment",
           "shares_one_window", "tiles_of"]
