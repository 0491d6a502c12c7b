"""Coordinate-window plans over a whole grid (GNA): each tile reads the box of keys its
queries' windows span, not whole key blocks.

A GNA window is a product of per-axis intervals, so the keys the queries of a tile can see lie
in the box bounding their windows (for a tile of queries that share one window, stride =
tile, exactly that window; for neighborhood attention, stride 1, the union of the windows).
The box is walked in raster order (``w`` fastest) in ``BLOCK_N`` steps: a key's coordinates
come from its index in the box, its plan position from the grid's position table. The window
test runs per pair only on steps that are not inside every query's window (the intersection
of the tile's windows, per tile in the tables).

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
    _MAX, attend, count_tile, dkdv_step, extra_keys, finish_rows, key_bias, load_rows, query_tile_t,
    scores, scores_t, start_rows, store_rows, window_ok,
)

#: Tile table columns: first plan position, positions, then per axis (t, h, w) the box's first
#: coordinate and extent, then the intersection of the windows (first, last) per axis.
TILE_START, TILE_COUNT, TILE_BOX, TILE_INNER, TILE_WIDTH = 0, 1, 2, 8, 14


@triton.jit
def _box_walk(idx, lo_t, lo_h, lo_w, ext_h, ext_w, GH, GW, POS_OF_TOKEN, valid):
    """Coordinates and plan positions of the raster indices ``idx`` of a box."""
    x_w = lo_w + idx % ext_w
    rest = idx // ext_w
    x_h = lo_h + rest % ext_h
    x_t = lo_t + rest // ext_h
    pos = tl.load(POS_OF_TOKEN + (x_t * GH + x_h) * GW + x_w, mask=valid, other=0)
    return x_t, x_h, x_w, pos.to(tl.int64)


@triton.jit
def _any(flags):
    """1 if any of the bool vector ``flags`` is set, else 0."""
    return tl.reduce(flags.to(tl.int32), 0, _MAX)


@triton.jit
def _outside(x_t, x_h, x_w, valid, TILE):
    """1 if some valid coordinate lies outside the tile's inner box (the intersection of its
    queries' windows), else 0."""
    inner = TILE + TILE_INNER
    ins = ((x_t >= tl.load(inner)) & (x_t <= tl.load(inner + 1)) & (x_h >= tl.load(inner + 2))
           & (x_h <= tl.load(inner + 3)) & (x_w >= tl.load(inner + 4)) & (x_w <= tl.load(inner + 5)))
    return _any(valid & ~ins)


@triton.jit
def _box_rows_kernel(
    Q, K, V, O, DO, LSE, DELTA,
    TILES, POS_OF_TOKEN, LO, HI, DIL, dilated, GH, GW,
    EK, EV, EMASK, N_EXTRA, has_emask,
    N, H,
    qk_scale, sm_scale, WORK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BACKWARD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, COUNT_WORK: tl.constexpr,
):
    """Program ``(query tile, batch * H + head)``; ``TILES`` ``[n_tiles, TILE_WIDTH]`` int32
    (shared by every batch and head), ``LO``/``HI`` ``[N, 3]`` windows in plan order."""
    tile = TILES + tl.program_id(0).to(tl.int64) * TILE_WIDTH
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    count = tl.load(tile + TILE_COUNT)
    if count > 0:
        q_pos = tl.load(tile + TILE_START) + tl.arange(0, BLOCK_M)
        q_ok = tl.arange(0, BLOCK_M) < count
        q_rows = q_pos.to(tl.int64)
        q, do, m_i, l_i, acc = start_rows(Q, DO, LSE, DELTA, b64, h64, q_rows, q_ok, N, H,
                                          BLOCK_M, HEAD_D, HEAD_DV, BACKWARD, UPCAST)
        k_base = K + (b64 * N * H + h64) * HEAD_D
        v_base = V + (b64 * N * H + h64) * HEAD_DV
        lo_t = tl.load(LO + q_rows * 3, mask=q_ok, other=0)[:, None]
        lo_h = tl.load(LO + q_rows * 3 + 1, mask=q_ok, other=0)[:, None]
        lo_w = tl.load(LO + q_rows * 3 + 2, mask=q_ok, other=0)[:, None]
        hi_t = tl.load(HI + q_rows * 3, mask=q_ok, other=0)[:, None]
        hi_h = tl.load(HI + q_rows * 3 + 1, mask=q_ok, other=0)[:, None]
        hi_w = tl.load(HI + q_rows * 3 + 2, mask=q_ok, other=0)[:, None]
        box = tile + TILE_BOX
        box_t, box_h, box_w = tl.load(box), tl.load(box + 2), tl.load(box + 4)
        ext_t, ext_h, ext_w = tl.load(box + 1), tl.load(box + 3), tl.load(box + 5)
        n_box = ext_t * ext_h * ext_w
        for n0 in range(0, n_box, BLOCK_N):
            idx = n0 + tl.arange(0, BLOCK_N)
            k_ok = idx < n_box
            x_t, x_h, x_w, k_rows = _box_walk(idx, box_t, box_h, box_w, ext_h, ext_w, GH, GW, POS_OF_TOKEN, k_ok)
            k = load_rows(k_base, k_rows, k_ok, H * HEAD_D, HEAD_D, UPCAST)
            v = load_rows(v_base, k_rows, k_ok, H * HEAD_DV, HEAD_DV, UPCAST)
            s = scores(q, k, key_bias(k_ok), qk_scale, PRECISION)
            if dilated + _outside(x_t, x_h, x_w, k_ok, tile) > 0:
                ok = window_ok(x_t[None, :], x_h[None, :], x_w[None, :], lo_t, lo_h, lo_w, hi_t, hi_h, hi_w,
                               DIL, dilated)
                s = tl.where(ok, s, float("-inf"))
            acc, m_i, l_i = attend(acc, m_i, l_i, s, k, v, do, BACKWARD, PRECISION)
            count_tile(WORK, BLOCK_M, BLOCK_N, COUNT_WORK)
        acc, m_i, l_i = extra_keys(acc, m_i, l_i, q, do, EK, EV, EMASK, N_EXTRA, has_emask, b64, h64, H,
                                   qk_scale, WORK, BLOCK_M, BLOCK_N, HEAD_D, HEAD_DV, BACKWARD, UPCAST,
                                   PRECISION, COUNT_WORK)
        finish_rows(O, LSE, b64, h64, q_rows, q_ok, acc, m_i, l_i, sm_scale, N, H, HEAD_D, HEAD_DV, BACKWARD)


@triton.jit
def _box_keys_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    TILES, POS_OF_TOKEN, COORDS, LO, HI, DIL, dilated, GH, GW,
    N, H,
    qk_scale, sm_scale, WORK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, COUNT_WORK: tl.constexpr,
):
    """Program ``(key tile, batch * H + head)``; ``TILES`` as in :func:`_box_rows_kernel`, for
    key tiles: the box is of the queries whose windows meet the tile, the inner box the keys
    of the tile's bounding box (a query step whose windows all hold it skips the test)."""
    tile = TILES + tl.program_id(0).to(tl.int64) * TILE_WIDTH
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    count = tl.load(tile + TILE_COUNT)
    if count > 0:
        k_ok = tl.arange(0, BLOCK_N) < count
        k_rows = (tl.load(tile + TILE_START) + tl.arange(0, BLOCK_N)).to(tl.int64)
        k = load_rows(K + (b64 * N * H + h64) * HEAD_D, k_rows, k_ok, H * HEAD_D, HEAD_D, UPCAST)
        v = load_rows(V + (b64 * N * H + h64) * HEAD_DV, k_rows, k_ok, H * HEAD_DV, HEAD_DV, UPCAST)
        bias = key_bias(k_ok)
        x_t = tl.load(COORDS + k_rows * 3, mask=k_ok, other=0)[:, None]
        x_h = tl.load(COORDS + k_rows * 3 + 1, mask=k_ok, other=0)[:, None]
        x_w = tl.load(COORDS + k_rows * 3 + 2, mask=k_ok, other=0)[:, None]
        inner = tile + TILE_INNER
        kt0, kt1, kh0 = tl.load(inner), tl.load(inner + 1), tl.load(inner + 2)
        kh1, kw0, kw1 = tl.load(inner + 3), tl.load(inner + 4), tl.load(inner + 5)
        box = tile + TILE_BOX
        box_t, box_h, box_w = tl.load(box), tl.load(box + 2), tl.load(box + 4)
        ext_t, ext_h, ext_w = tl.load(box + 1), tl.load(box + 3), tl.load(box + 5)
        n_box = ext_t * ext_h * ext_w
        dk = tl.full([BLOCK_N, HEAD_D], 0.0, dtype=tl.float32)
        dv = tl.full([BLOCK_N, HEAD_DV], 0.0, dtype=tl.float32)
        for m0 in range(0, n_box, BLOCK_M):
            idx = m0 + tl.arange(0, BLOCK_M)
            q_ok = idx < n_box
            _, _, _, q_rows = _box_walk(idx, box_t, box_h, box_w, ext_h, ext_w, GH, GW, POS_OF_TOKEN, q_ok)
            q, do, lse, delta = query_tile_t(Q, DO, LSE, DELTA, b64, h64, q_rows, q_ok, N, H,
                                             HEAD_D, HEAD_DV, UPCAST)
            st = scores_t(k, q, bias, qk_scale, PRECISION)
            lo_t = tl.load(LO + q_rows * 3, mask=q_ok, other=0)
            lo_h = tl.load(LO + q_rows * 3 + 1, mask=q_ok, other=0)
            lo_w = tl.load(LO + q_rows * 3 + 2, mask=q_ok, other=0)
            hi_t = tl.load(HI + q_rows * 3, mask=q_ok, other=0)
            hi_h = tl.load(HI + q_rows * 3 + 1, mask=q_ok, other=0)
            hi_w = tl.load(HI + q_rows * 3 + 2, mask=q_ok, other=0)
            sees_all = ((lo_t <= kt0) & (hi_t >= kt1) & (lo_h <= kh0) & (hi_h >= kh1) & (lo_w <= kw0)
                        & (hi_w >= kw1))
            if dilated + _any(q_ok & ~sees_all) > 0:
                ok = window_ok(x_t, x_h, x_w, lo_t[None, :], lo_h[None, :], lo_w[None, :], hi_t[None, :],
                               hi_h[None, :], hi_w[None, :], DIL, dilated)
                st = tl.where(ok, st, float("-inf"))
            dk, dv = dkdv_step(dk, dv, st, v, q, do, lse, delta, PRECISION)
            count_tile(WORK, BLOCK_M, BLOCK_N, COUNT_WORK)
        store_rows(DK + (b64 * N * H + h64) * HEAD_D, k_rows, k_ok, H * HEAD_D, dk * sm_scale, HEAD_D)
        store_rows(DV + (b64 * N * H + h64) * HEAD_DV, k_rows, k_ok, H * HEAD_DV, dv, HEAD_DV)


_KEY = ["BLOCK_M", "BLOCK_N", "HEAD_D", "HEAD_DV", "PRECISION"]
box_rows_kernel = triton.autotune(tiles.configs(), key=_KEY + ["BACKWARD"],
                                  prune_configs_by={"early_config_prune": tiles.prune})(_box_rows_kernel)
box_keys_kernel = triton.autotune(tiles.configs(), key=_KEY,
                                  prune_configs_by={"early_config_prune": tiles.prune})(_box_keys_kernel)
