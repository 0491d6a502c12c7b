"""Coordinate-window plans over a whole grid (GNA): each tile reads the box of keys its
queries' windows span, not whole key blocks.

A GNA window is a product of per-axis intervals, so the keys the queries of a tile can see lie
in the box bounding their windows (for a tile of queries that share one window, stride =
tile, exactly that window; for neighborhood attention, stride 1, the union of the windows).
The box is walked in raster order (``w`` fastest) in ``BLOCK_N`` steps: a key's coordinates
come from its index in the box, its plan position from the grid's position table. Launches
where some tile's box holds keys outside some of its queries' windows (``MASKED``) test every
pair (:func:`~.common.window_ok`); ``DILATED`` adds the lattice test.

* :func:`_box_rows_kernel` — forward or ``dq`` (``BACKWARD``) of one ``BLOCK_M`` tile of a
  query block, then the extra (text) keys.
* :func:`_box_keys_kernel` — ``dk``/``dv`` of one ``BLOCK_N`` tile of a key block over the box
  of queries whose windows meet it, ``BLOCK_M`` at a time.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import tiles
from .common import (
    attend, count_tile, dkdv_step, finish_rows, key_bias, load_group, load_rows, load_windows,
    query_tile_t, scores, scores_t, start_rows, store_rows, window_ok,
)

#: Tile table columns: first plan position, positions, then per axis (t, h, w) the box's first
#: coordinate and extent.
TILE_START = tl.constexpr(0)
TILE_COUNT = tl.constexpr(1)
TILE_BOX = tl.constexpr(2)
TILE_WIDTH = tl.constexpr(8)


@triton.jit
def _box_walk(tile, idx, valid, GH, GW, POS_OF_TOKEN):
    """Plan positions (int64) of the raster indices ``idx`` of a tile's box."""
    box = tile + TILE_BOX
    ext_w = tl.load(box + 5)
    ext_h = tl.load(box + 3)
    x_w = tl.load(box + 4) + idx % ext_w
    rest = idx // ext_w
    x_h = tl.load(box + 2) + rest % ext_h
    x_t = tl.load(box) + rest // ext_h
    return tl.load(POS_OF_TOKEN + (x_t * GH + x_h) * GW + x_w, mask=valid, other=0).to(tl.int64)


@triton.jit
def _tile_program(TILES, H):
    """This program's tile row, batch and head (int64), and the tile's count of rows."""
    tile = TILES + tl.program_id(0).to(tl.int64) * TILE_WIDTH
    bh = tl.program_id(1)
    return tile, (bh // H).to(tl.int64), (bh % H).to(tl.int64), tl.load(tile + TILE_COUNT)


@triton.jit
def _box_size(tile):
    box = tile + TILE_BOX
    return tl.load(box + 1) * tl.load(box + 3) * tl.load(box + 5)


@triton.jit
def _box_rows_kernel(
    Q, K, V, O, DO, LSE, DELTA,
    TILES, POS_OF_TOKEN, GH, GW, CODE, GROUP, LO_CODE, HI_CODE, LO_GROUP, GUARD,
    EK, EV, EMASK, N_EXTRA, has_emask,
    N, H,
    qk_scale, sm_scale, WORK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    MASKED: tl.constexpr, DILATED: tl.constexpr, BACKWARD: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, COUNT_WORK: tl.constexpr,
):
    """Program ``(query tile, batch * H + head)``; ``TILES`` ``[n_tiles, TILE_WIDTH]`` int32
    (shared by every batch and head); ``CODE``/``GROUP`` per plan position and
    ``LO_CODE``/``HI_CODE``/``LO_GROUP`` per query: the packed window operands of
    :func:`~.common.window_ok`."""
    tile, b64, h64, count = _tile_program(TILES, H)
    if count > 0:
        q_ok = tl.arange(0, BLOCK_M) < count
        q_rows = (tl.load(tile + TILE_START) + tl.arange(0, BLOCK_M)).to(tl.int64)
        q, do, m_i, l_i, acc = start_rows(Q, DO, LSE, DELTA, b64, h64, q_rows, q_ok, N, H,
                                          BLOCK_M, HEAD_D, HEAD_DV, BACKWARD, UPCAST)
        k_base = K + (b64 * N * H + h64) * HEAD_D
        v_base = V + (b64 * N * H + h64) * HEAD_DV
        if MASKED:
            q_lo, q_hi, q_group = load_windows(LO_CODE, HI_CODE, LO_GROUP, q_rows, q_ok, DILATED)
            q_lo, q_hi, q_group = q_lo[:, None], q_hi[:, None], q_group[:, None]
        n_box = _box_size(tile)
        for n0 in range(0, n_box, BLOCK_N):
            idx = n0 + tl.arange(0, BLOCK_N)
            k_ok = idx < n_box
            k_rows = _box_walk(tile, idx, k_ok, GH, GW, POS_OF_TOKEN)
            k = load_rows(k_base, k_rows, k_ok, H * HEAD_D, HEAD_D, UPCAST)
            v = load_rows(v_base, k_rows, k_ok, H * HEAD_DV, HEAD_DV, UPCAST)
            s = scores(q, k, key_bias(k_ok), qk_scale, PRECISION)
            if MASKED:
                k_code = tl.load(CODE + k_rows, mask=k_ok, other=0)[None, :]
                k_group = load_group(GROUP, k_rows, k_ok, DILATED)[None, :]
                s = tl.where(window_ok(k_code, k_group, q_lo, q_hi, q_group, GUARD, DILATED), s, float("-inf"))
            acc, m_i, l_i = attend(acc, m_i, l_i, s, k, v, do, BACKWARD, PRECISION)
            count_tile(WORK, BLOCK_M, BLOCK_N, COUNT_WORK)
        finish_rows(O, LSE, acc, m_i, l_i, q, do, q_rows, q_ok, EK, EV, EMASK, N_EXTRA, has_emask, b64, h64, N, H,
                    qk_scale, sm_scale, WORK, BLOCK_M, BLOCK_N, HEAD_D, HEAD_DV, BACKWARD, UPCAST, PRECISION,
                    COUNT_WORK)


@triton.jit
def _box_keys_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    TILES, POS_OF_TOKEN, GH, GW, CODE, GROUP, LO_CODE, HI_CODE, LO_GROUP, GUARD,
    N, H,
    qk_scale, sm_scale, WORK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    MASKED: tl.constexpr, DILATED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    COUNT_WORK: tl.constexpr,
):
    """Program ``(key tile, batch * H + head)``; ``TILES`` as in :func:`_box_rows_kernel`, for
    key tiles, whose box is of the queries whose windows can meet the tile."""
    tile, b64, h64, count = _tile_program(TILES, H)
    if count > 0:
        k_ok = tl.arange(0, BLOCK_N) < count
        k_rows = (tl.load(tile + TILE_START) + tl.arange(0, BLOCK_N)).to(tl.int64)
        k = load_rows(K + (b64 * N * H + h64) * HEAD_D, k_rows, k_ok, H * HEAD_D, HEAD_D, UPCAST)
        v = load_rows(V + (b64 * N * H + h64) * HEAD_DV, k_rows, k_ok, H * HEAD_DV, HEAD_DV, UPCAST)
        bias = key_bias(k_ok)
        if MASKED:
            k_code = tl.load(CODE + k_rows, mask=k_ok, other=0)[:, None]
            k_group = load_group(GROUP, k_rows, k_ok, DILATED)[:, None]
        n_box = _box_size(tile)
        dk = tl.full([BLOCK_N, HEAD_D], 0.0, dtype=tl.float32)
        dv = tl.full([BLOCK_N, HEAD_DV], 0.0, dtype=tl.float32)
        for m0 in range(0, n_box, BLOCK_M):
            idx = m0 + tl.arange(0, BLOCK_M)
            q_ok = idx < n_box
            q_rows = _box_walk(tile, idx, q_ok, GH, GW, POS_OF_TOKEN)
            q, do, lse, delta = query_tile_t(Q, DO, LSE, DELTA, b64, h64, q_rows, q_ok, N, H,
                                             HEAD_D, HEAD_DV, UPCAST)
            st = scores_t(k, q, bias, qk_scale, PRECISION)
            if MASKED:
                q_lo, q_hi, q_group = load_windows(LO_CODE, HI_CODE, LO_GROUP, q_rows, q_ok, DILATED)
                ok = window_ok(k_code, k_group, q_lo[None, :], q_hi[None, :], q_group[None, :], GUARD, DILATED)
                st = tl.where(ok, st, float("-inf"))
            dk, dv = dkdv_step(dk, dv, st, v, q, do, lse, delta, PRECISION)
            count_tile(WORK, BLOCK_M, BLOCK_N, COUNT_WORK)
        store_rows(DK + (b64 * N * H + h64) * HEAD_D, k_rows, k_ok, H * HEAD_D, dk * sm_scale, HEAD_D)
        store_rows(DV + (b64 * N * H + h64) * HEAD_DV, k_rows, k_ok, H * HEAD_DV, dv, HEAD_DV)


_KEY = ["BLOCK_M", "BLOCK_N", "HEAD_D", "HEAD_DV", "PRECISION", "MASKED", "DILATED"]
box_rows_kernel = triton.autotune(tiles.configs(), key=_KEY + ["BACKWARD"],
                                  prune_configs_by=tiles.pruner(lambda args: "window"))(_box_rows_kernel)
box_keys_kernel = triton.autotune(tiles.configs(), key=_KEY,
                                  prune_configs_by=tiles.pruner(lambda args: "keys"))(_box_keys_kernel)
