"""Tile sizes the kernels launch with, and the autotune configurations around them.

Tiles are a function of the head dims and the plan's block sizes only (never of a benchmark),
so :func:`~vdiff_sparse.kernels.work.work` knows the work a launch does before it runs; the
autotuner varies only ``num_warps`` and ``num_stages`` (:func:`configs`).

Rules (:func:`choose_tiles`), for the kernels of :mod:`.blocks`, :mod:`.window` and
:mod:`.routed`:

* ``rows`` (query-major forward and ``dq``): ``BLOCK_M`` queries per program, ``BLOCK_N`` keys
  per step. ``BLOCK_M`` drops to the smaller size when every query block fits in it (a
  64-token GNA tile would leave half of a 128-row tile empty).
* ``keys`` (key-major ``dk``/``dv``): ``BLOCK_N`` keys per program, ``BLOCK_M`` queries per
  step. A pooled level's key ranges are short (``ceil(block_k / p)`` rows): its launch uses the
  smallest power of two >= 16 that holds them, up to ``BLOCK_N``.
* ``routed`` (per-token routed plans, forward and ``dq``): ``BLOCK_M`` gathered queries of one
  key range per program, ``BLOCK_N`` keys per step. Small ``BLOCK_M``: a range's queries are
  cut into tiles, the last one padded.

The sizes per head dim were chosen by compiling every variant for sm_90 and sm_80 and reading
the registers and local memory (``bench/kernel_resources.py``, result in
``bench/results/kernel_resources.json``): none spills. Head dim 256 uses smaller tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton

from .common import INTERPRET

#: The smallest tile side ``tl.dot`` accepts.
MIN_TILE = 16


@dataclass(frozen=True)
class Tiles:
    """``BLOCK_M`` (queries) x ``BLOCK_N`` (keys) of one kernel kind; ``small_m`` is the
    ``BLOCK_M`` used when every query block fits in it (``rows`` only)."""

    block_m: int
    block_n: int
    small_m: int | None = None


@dataclass(frozen=True)
class TileChoice:
    """The base tiles of the three kernel kinds (before the per-plan rules)."""

    rows: Tiles
    keys: Tiles
    routed: Tiles


#: What the kernels launch with on a GPU, by the larger of the query and value head dims.
GPU_TILES = {
    64: TileChoice(rows=Tiles(128, 64, small_m=64), keys=Tiles(64, 128), routed=Tiles(64, 64)),
    128: TileChoice(rows=Tiles(128, 64, small_m=64), keys=Tiles(64, 64), routed=Tiles(64, 64)),
    256: TileChoice(rows=Tiles(64, 32, small_m=32), keys=Tiles(32, 32), routed=Tiles(32, 32)),
}
#: Under the interpreter (small test problems, ~ms per tile pair): one small size everywhere.
INTERPRETER_TILES = TileChoice(rows=Tiles(32, 32, small_m=16), keys=Tiles(32, 32), routed=Tiles(32, 32))


def gpu_tiles(head_dim: int) -> TileChoice:
    """The GPU tiles for a head dim (the next size up in :data:`GPU_TILES`)."""
    for dim in sorted(GPU_TILES):
        if head_dim <= dim:
            return GPU_TILES[dim]
    raise ValueError(f"head dim {head_dim} is above the largest supported ({max(GPU_TILES)})")


def default_tiles(head_dim: int) -> TileChoice:
    """What a launch uses now: the interpreter's tiles under ``TRITON_INTERPRET=1``, else the GPU's."""
    return INTERPRETER_TILES if INTERPRET else gpu_tiles(head_dim)


def rows_block_m(tiles: Tiles, q_block_max: int) -> int:
    """``BLOCK_M`` of a query-major launch whose largest query block has ``q_block_max`` tokens."""
    if tiles.small_m is not None and q_block_max <= tiles.small_m:
        return tiles.small_m
    return tiles.block_m


def keys_block_n(tiles: Tiles, range_rows: int) -> int:
    """``BLOCK_N`` of a key-major launch whose key ranges have at most ``range_rows`` rows."""
    return min(tiles.block_n, max(MIN_TILE, triton.next_power_of_2(max(1, range_rows))))


# --- autotune ---------------------------------------------------------------------------------

#: (num_warps, num_stages) tried per tile area; every one compiles without spills.
_LAUNCH = {
    "small": [(2, 2), (4, 2)],
    "medium": [(4, 2), (4, 3)],
    "large": [(8, 2), (8, 3)],
}


def _size(block_m: int, block_n: int, head_dim: int) -> str:
    area = block_m * max(block_n, head_dim)
    if area <= 32 * 64:
        return "small"
    return "medium" if area <= 64 * 128 else "large"


def launch_options(block_m: int, block_n: int, head_dim: int) -> list[tuple[int, int]]:
    """The ``(num_warps, num_stages)`` the autotuner tries for one tile shape."""
    return _LAUNCH[_size(block_m, block_n, head_dim)]


def configs() -> list[triton.Config]:
    """Every ``(num_warps, num_stages)`` of :data:`_LAUNCH` (pruned per tile by :func:`prune`);
    one config under the interpreter, which cannot benchmark."""
    if INTERPRET:
        return [triton.Config({}, num_warps=1, num_stages=1)]
    seen = sorted({opt for opts in _LAUNCH.values() for opt in opts})
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in seen]


def prune(configs, named_args, **kwargs):
    """Keep the configurations of this launch's tile shape."""
    if INTERPRET:
        return configs
    args = {**named_args, **kwargs}
    wanted = launch_options(args["BLOCK_M"], args["BLOCK_N"], max(args["HEAD_D"], args["HEAD_DV"]))
    return [c for c in configs if (c.num_warps, c.num_stages) in wanted]


__all__ = [
    "GPU_TILES", "INTERPRETER_TILES", "MIN_TILE", "TileChoice", "Tiles", "configs", "default_tiles",
    "gpu_tiles", "keys_block_n", "launch_options", "prune", "rows_block_m",
]
