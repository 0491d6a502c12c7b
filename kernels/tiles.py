"""Tile sizes the kernels launch with, and the autotune configurations around them.

Tiles are a function of the GPU generation, the head dims and the plan's block sizes only
(never of a benchmark), so :func:`~vdiff_sparse.kernels.work.work` knows the work a launch does
before it runs; the autotuner varies only ``num_warps`` and ``num_stages`` among the options
listed with each tile shape.

Kinds of launch (:class:`TileChoice`):

* ``forward``, ``dq``: query-major kernels of block plans (:mod:`.blocks`): ``BLOCK_M`` queries
  per program, ``BLOCK_N`` keys per step.
* ``window``: query-major kernels with a per-pair coordinate window test (:mod:`.window`, and
  :mod:`.blocks` for hand-built windows), forward and ``dq``.
* ``keys``: key-major ``dk``/``dv`` (:mod:`.blocks`, :mod:`.window`): ``BLOCK_N`` keys per
  program, ``BLOCK_M`` queries per step.
* ``routed``: per-token routed forward and ``dq`` (:mod:`.routed`): ``BLOCK_M`` gathered
  queries of one key range per program, ``BLOCK_N`` keys per step.

Rules on top of the table: a query-major launch whose query blocks all fit in ``small_m``
rows uses ``BLOCK_M = small_m`` (a 64-token GNA tile would leave half of a 128-row tile empty);
a key-major launch uses the smallest power of two >= 16 that holds its key ranges, up to
``BLOCK_N`` (a x8 level of 128-token blocks has 16-row ranges). A shape smaller than the
table's runs with the table's smaller options (:func:`launch_options`).

Every shape, switch and option in :data:`GPU_TILES` compiles without register spills for its
GPU generation in bf16 and fp16 (``bench/kernel_resources.py``, the table in
``bench/results/kernel_resources.json``; the test ``tests/test_kernel_resources.py``). Ampere
(sm_80) has fewer registers to spare than Hopper (sm_90), whose wgmma keeps operands in shared
memory: it gets narrower key steps. Head dim 256 uses smaller tiles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import triton

from .common import INTERPRET

#: The smallest tile side ``tl.dot`` accepts.
MIN_TILE = 16
#: ``maxnreg`` of the options that need it: left to itself, ptxas may aim at a higher
#: occupancy for a small program and spill a few values instead of using more registers; with
#: the hardware's limit as the cap it does not (for large programs the cap can make it spill).
MAX_REGISTERS = 255


@dataclass(frozen=True)
class Tiles:
    """``BLOCK_M`` (queries) x ``BLOCK_N`` (keys) of one kind of launch, its ``(num_warps,
    num_stages, maxnreg)`` options (``maxnreg`` ``None`` or :data:`MAX_REGISTERS`), and
    ``small_m`` (query-major kinds) with its options."""

    block_m: int
    block_n: int
    options: tuple = ((4, 2, None),)
    small_m: int | None = None
    small_options: tuple = ((4, 2, None),)


@dataclass(frozen=True)
class TileChoice:
    """The tiles of every kind of launch for one GPU generation and head dim."""

    forward: Tiles
    dq: Tiles
    window: Tiles
    keys: Tiles
    routed: Tiles


def _choice(**kinds) -> TileChoice:
    return TileChoice(**kinds)


# Launch options (num_warps, num_stages, maxnreg).
W4, W4S3, W8, W8S3 = (4, 2, None), (4, 3, None), (8, 2, None), (8, 3, None)
W4CAP, W8CAP = (4, 2, MAX_REGISTERS), (8, 2, MAX_REGISTERS)

#: By compute capability major (9: Hopper, 8: Ampere/Ada) and head dim (the larger of q's and
#: v's, rounded up to a listed one).
GPU_TILES = {
    9: {
        64: _choice(forward=Tiles(128, 64, (W8,), 64, (W4CAP,)), dq=Tiles(128, 64, (W8,), 64, (W4CAP,)),
                    window=Tiles(128, 32, (W8,), 64, (W4CAP,)), keys=Tiles(32, 128, (W8,), None, (W4CAP,)),
                    routed=Tiles(64, 64, (W4,))),
        128: _choice(forward=Tiles(128, 64, (W8S3,), 64, (W4CAP,)), dq=Tiles(128, 32, (W8, W8S3), 64, (W4CAP,)),
                     window=Tiles(128, 32, (W8, W8S3), 64, (W4CAP,)), keys=Tiles(32, 64, (W8, W8S3), None, (W4CAP,)),
                     routed=Tiles(64, 64, (W4,))),
        256: _choice(forward=Tiles(64, 32, (W8,), 32, (W4CAP,)), dq=Tiles(64, 16, (W8,), 32, (W4CAP,)),
                     window=Tiles(64, 16, (W8,), 32, (W4CAP,)), keys=Tiles(16, 32, (W8,), None, (W4CAP,)),
                     routed=Tiles(32, 32, (W4,))),
    },
    8: {
        64: _choice(forward=Tiles(128, 64, (W8,), 64, (W8,)), dq=Tiles(128, 32, (W8,), 64, (W8,)),
                    window=Tiles(128, 32, (W8,), 64, (W8,)), keys=Tiles(32, 64, (W8,), None, (W4CAP,)),
                    routed=Tiles(64, 64, (W4,))),
        128: _choice(forward=Tiles(128, 32, (W8, W8S3), 64, (W4CAP,)), dq=Tiles(128, 32, (W8, W8S3), 64, (W4CAP,)),
                     window=Tiles(64, 32, (W4,), None), keys=Tiles(32, 64, (W8,), None, (W4CAP,)),
                     routed=Tiles(64, 32, (W4,))),
        256: _choice(forward=Tiles(64, 32, (W8,), 32, (W4CAP,)), dq=Tiles(64, 16, (W4,), 32, (W4CAP,)),
                     window=Tiles(32, 16, (W4CAP,), 16, (W4CAP,)), keys=Tiles(16, 32, (W8,), None, (W4CAP,)),
                     routed=Tiles(32, 32, (W4,))),
    },
}
# Head dim 32 as 64, but ptxas spills a few values of Ampere's small window tile unless capped.
GPU_TILES[9][32] = GPU_TILES[9][64]
GPU_TILES[8][32] = dataclasses.replace(GPU_TILES[8][64], window=Tiles(128, 32, (W8,), 64, (W8CAP,)))
#: Under the interpreter (small test problems, ~ms per tile pair): small tiles everywhere.
_T = Tiles(32, 32, ((1, 1, None),), 16, ((1, 1, None),))
INTERPRETER_TILES = _choice(forward=_T, dq=_T, window=_T, keys=Tiles(32, 32, ((1, 1, None),)),
                            routed=Tiles(32, 32, ((1, 1, None),)))
#: The GPU generation :func:`~vdiff_sparse.kernels.work.work` reports by default.
HOPPER = 9


def gpu_tiles(head_dim: int, major: int = HOPPER) -> TileChoice:
    """The tiles of a GPU of compute capability ``major`` (Hopper's from 9 on, Ampere's below)
    for a head dim (the next listed size up)."""
    table = GPU_TILES[HOPPER if major >= HOPPER else 8]
    for dim in sorted(table):
        if head_dim <= dim:
            return table[dim]
    raise ValueError(f"head dim {head_dim} is above the largest supported ({max(table)})")


def launch_tiles(head_dim: int, device) -> TileChoice:
    """What a launch on ``device`` uses: the interpreter's tiles under ``TRITON_INTERPRET=1``,
    else those of the device's GPU generation."""
    if INTERPRET:
        return INTERPRETER_TILES
    import torch

    # The properties, not get_device_capability: torch.compile folds them into a constant.
    return gpu_tiles(head_dim, torch.cuda.get_device_properties(device).major)


def rows_block_m(tiles: Tiles, q_block_max: int) -> int:
    """``BLOCK_M`` of a query-major launch whose largest query block has ``q_block_max`` tokens."""
    if tiles.small_m is not None and q_block_max <= tiles.small_m:
        return tiles.small_m
    return tiles.block_m


def keys_block_n(tiles: Tiles, range_rows: int) -> int:
    """``BLOCK_N`` of a key-major launch whose key ranges have at most ``range_rows`` rows."""
    return min(tiles.block_n, max(MIN_TILE, triton.next_power_of_2(max(1, range_rows))))


def launch_options(tiles: Tiles, block_m: int, block_n: int) -> tuple:
    """The ``(num_warps, num_stages, maxnreg)`` the autotuner tries for a launch of ``tiles`` at
    ``block_m`` x ``block_n`` (the table's shape, or a smaller one the rules picked)."""
    if (block_m, block_n) == (tiles.block_m, tiles.block_n):
        return tiles.options
    return tiles.small_options


# --- autotune ---------------------------------------------------------------------------------

def configs() -> list[triton.Config]:
    """Every ``(num_warps, num_stages)`` any table lists (each launch keeps its own, see
    :func:`pruner`); one config under the interpreter, which cannot benchmark."""
    if INTERPRET:
        return [triton.Config({}, num_warps=1, num_stages=1)]
    options = set()
    for table in GPU_TILES.values():
        for choice in table.values():
            for tiles in (choice.forward, choice.dq, choice.window, choice.keys, choice.routed):
                options.update(tiles.options)
                options.update(tiles.small_options)
    return [triton.Config({}, num_warps=w, num_stages=s, maxnreg=r) for w, s, r in sorted(options, key=str)]


def pruner(kind):
    """The autotuner's config filter of a kernel: ``kind(args)`` names the launch's kind of
    tiles (a :class:`TileChoice` field) from its arguments; the configurations kept are the
    options of its tile shape on the launch's GPU."""

    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        import torch

        args = {**named_args, **kwargs}
        major = torch.cuda.get_device_capability(args["Q"].device)[0]
        tiles = getattr(gpu_tiles(max(args["HEAD_D"], args["HEAD_DV"]), major), kind(args))
        wanted = launch_options(tiles, args["BLOCK_M"], args["BLOCK_N"])
        kept = [c for c in configs if (c.num_warps, c.num_stages, c.maxnreg) in wanted]
        return kept or configs[:1]

    return {"early_config_prune": prune}


__all__ = [
    "GPU_TILES", "HOPPER", "INTERPRETER_TILES", "MAX_REGISTERS", "MIN_TILE", "TileChoice", "Tiles", "configs", "gpu_tiles",
    "keys_block_n", "launch_options", "launch_tiles", "pruner", "rows_block_m",
]
