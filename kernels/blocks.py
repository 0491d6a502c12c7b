"""Block-sparse plans (dense, PSA, block-aligned GNA, any plan without per-token routing): a
query tile reads exactly its block's entries; a key tile the query blocks that list it.

* :func:`_rows_kernel` — forward or ``dq`` (``BACKWARD``) of one ``BLOCK_M`` tile of a query
  block. The block's entries come sorted by pool level; the entries of one level are laid end
  to end, ``rows_per_entry[level]`` key rows each (the largest key block at that level), and
  walked in ``BLOCK_N`` steps, so short pooled entries share a tile (a x8 entry of a 128-token
  block is 16 rows: four to a 64-wide tile) and a row's loop ends at its own entries. A shorter
  (ragged, last) key block comes last in its level, so the walk stops at its last row. Then
  the extra (text) keys.
* :func:`_keys_kernel` — ``dk``/``dv`` of one ``BLOCK_N`` tile of one key range (a key block
  at one pool level, or the extra keys): walks the query blocks that list the range, in
  ``BLOCK_M`` steps; or (``GATHER``) a list of query positions (the per-token routed plans of
  :mod:`.routed`). One launch per pool level, each with a ``BLOCK_N`` that fits its ranges.

A coordinate window without a grid (hand-built plans: GNA's go through :mod:`.window`) is
tested per pair (``WINDOW`` 1, or 2 with dilation; :func:`~.common.window_ok`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import tiles
from .common import (
    attend, count_tile, dkdv_step, finish_rows, load_group, load_range, load_rows, load_windows, pooled_bias,
    range_keys, query_tile_t, scores, scores_t, start_rows, store_rows, window_ok,
)

#: Entry table columns: first row in the stacked keys, rows, tokens of the key block.
ENT_START = tl.constexpr(0)
ENT_ROWS = tl.constexpr(1)
ENT_SIZE = tl.constexpr(2)
ENT_WIDTH = tl.constexpr(3)


@triton.jit
def _rows_kernel(
    Q, K, V, O, DO, LSE, DELTA,
    Q_OFF, ENT, COUNTS, ROWS_PER_ENTRY, stride_eb, stride_eh, stride_cb, stride_ch,
    CODE, GROUP, LO_CODE, HI_CODE, LO_GROUP, GUARD,
    EK, EV, EMASK, N_EXTRA, has_emask,
    N, NK, H, MAX_KV, SUB,
    qk_scale, sm_scale, WORK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    WINDOW: tl.constexpr, BACKWARD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    COUNT_WORK: tl.constexpr,
):
    """Program ``(query block * SUB + sub-tile, batch * H + head)``.

    ``ENT`` ``[B'|1, H'|1, n_q_blocks, MAX_KV, ENT_WIDTH]`` entries sorted by pool level (and
    by rows, descending, within one), ``COUNTS`` ``[B'|1, H'|1, n_q_blocks, 4, 2]`` entries and
    slots to walk per level (pool factor ``2**g``), ``ROWS_PER_ENTRY`` ``[4]``; strides 0 where
    the plan broadcasts. Forward writes ``O`` and ``LSE``; backward writes ``dq`` to ``O``.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    qb = pid // SUB
    q_lo = tl.load(Q_OFF + qb)
    q_hi = tl.load(Q_OFF + qb + 1)
    m0 = q_lo + (pid % SUB) * BLOCK_M
    if m0 < q_hi:
        q_pos = m0 + tl.arange(0, BLOCK_M)
        q_ok = q_pos < q_hi
        q_rows = q_pos.to(tl.int64)
        q, do, m_i, l_i, acc = start_rows(Q, DO, LSE, DELTA, b64, h64, q_rows, q_ok, N, H,
                                          BLOCK_M, HEAD_D, HEAD_DV, BACKWARD, UPCAST)
        k_base = K + (b64 * NK * H + h64) * HEAD_D
        v_base = V + (b64 * NK * H + h64) * HEAD_DV
        if WINDOW:
            win_lo, win_hi, win_group = load_windows(LO_CODE, HI_CODE, LO_GROUP, q_rows, q_ok, WINDOW == 2)
            win_lo, win_hi, win_group = win_lo[:, None], win_hi[:, None], win_group[:, None]
        ent = ENT + b64 * stride_eb + h64 * stride_eh + qb.to(tl.int64) * MAX_KV * ENT_WIDTH
        counts = COUNTS + b64 * stride_cb + h64 * stride_ch + qb.to(tl.int64) * 8  # [4 levels, 2]
        first = 0
        for g in range(4):
            n_entries = tl.load(counts + g * 2)
            total = tl.load(counts + g * 2 + 1)
            per_entry = tl.load(ROWS_PER_ENTRY + g)
            for n0 in range(0, total, BLOCK_N):
                slot = n0 + tl.arange(0, BLOCK_N)
                in_range = slot < total
                e = first + slot // per_entry
                offs = slot % per_entry
                start = tl.load(ent + e * ENT_WIDTH + ENT_START, mask=in_range, other=0)
                n_rows = tl.load(ent + e * ENT_WIDTH + ENT_ROWS, mask=in_range, other=0)
                size = tl.load(ent + e * ENT_WIDTH + ENT_SIZE, mask=in_range, other=1)
                k_ok = in_range & (offs < n_rows)
                k_rows = (start + offs).to(tl.int64)
                k = load_rows(k_base, k_rows, k_ok, H * HEAD_D, HEAD_D, UPCAST)
                v = load_rows(v_base, k_rows, k_ok, H * HEAD_DV, HEAD_DV, UPCAST)
                s = scores(q, k, pooled_bias(offs, k_ok, 1 << g, size), qk_scale, PRECISION)
                if WINDOW:
                    k_code = tl.load(CODE + k_rows, mask=k_ok, other=0)[None, :]
                    k_group = load_group(GROUP, k_rows, k_ok, WINDOW == 2)[None, :]
                    ok = window_ok(k_code, k_group, win_lo, win_hi, win_group, GUARD, WINDOW == 2)
                    s = tl.where(ok, s, float("-inf"))
                acc, m_i, l_i = attend(acc, m_i, l_i, s, k, v, do, BACKWARD, PRECISION)
                count_tile(WORK, BLOCK_M, BLOCK_N, COUNT_WORK)
            first += n_entries
        finish_rows(O, LSE, acc, m_i, l_i, q, do, q_rows, q_ok, EK, EV, EMASK, N_EXTRA, has_emask, b64, h64, N, H,
                    qk_scale, sm_scale, WORK, BLOCK_M, BLOCK_N, HEAD_D, HEAD_DV, BACKWARD, UPCAST, PRECISION,
                    COUNT_WORK)


@triton.jit
def _keys_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    RANGES, SUB, Q_OFF, ROWPTR, ITEMS, stride_rb, stride_rh,
    CODE, GROUP, LO_CODE, HI_CODE, LO_GROUP, GUARD,
    KMASK, has_kmask,
    N, NK, H,
    qk_scale, sm_scale, WORK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    GATHER: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    COUNT_WORK: tl.constexpr,
):
    """Program ``(range * SUB + sub-tile, batch * H + head)``: ``dk``, ``dv`` of key rows
    ``[start + sub * BLOCK_N, ...)`` of range ``RANGES[range]`` (``[n, RANGE_WIDTH]``, see
    :func:`~.common.load_range`).

    The queries: ``ROWPTR[(b', h') offset + range]`` and the next entry bound the range's items
    in ``ITEMS``: query block ids (each walked from ``Q_OFF[qb]`` to ``Q_OFF[qb + 1]``), or with
    ``GATHER`` query positions. ``KMASK`` ``[B, NK]`` (when ``has_kmask``) drops padding keys.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    r = pid // SUB
    start, n_rows, p, size = load_range(RANGES, r)
    n0 = (pid % SUB) * BLOCK_N
    if n0 < n_rows:
        k_rows, in_range, bias = range_keys(start, n_rows, p, size, n0, KMASK, has_kmask, b64, NK, BLOCK_N)
        k_base = K + (b64 * NK * H + h64) * HEAD_D
        v_base = V + (b64 * NK * H + h64) * HEAD_DV
        k = load_rows(k_base, k_rows, in_range, H * HEAD_D, HEAD_D, UPCAST)
        v = load_rows(v_base, k_rows, in_range, H * HEAD_DV, HEAD_DV, UPCAST)
        if WINDOW:
            k_code = tl.load(CODE + k_rows, mask=in_range, other=0)[:, None]
            k_group = load_group(GROUP, k_rows, in_range, WINDOW == 2)[:, None]
        dk = tl.full([BLOCK_N, HEAD_D], 0.0, dtype=tl.float32)
        dv = tl.full([BLOCK_N, HEAD_DV], 0.0, dtype=tl.float32)
        row = ROWPTR + b64 * stride_rb + h64 * stride_rh + r
        first = tl.load(row)
        last = tl.load(row + 1)
        if GATHER:
            n_items = 1
        else:
            n_items = last - first
        for it in range(n_items):
            if GATHER:
                q_lo = first
                q_hi = last
            else:
                qb = tl.load(ITEMS + first + it)
                q_lo = tl.load(Q_OFF + qb)
                q_hi = tl.load(Q_OFF + qb + 1)
            for m0 in range(q_lo, q_hi, BLOCK_M):
                idx = m0 + tl.arange(0, BLOCK_M)
                q_ok = idx < q_hi
                if GATHER:
                    q_rows = tl.load(ITEMS + idx, mask=q_ok, other=0).to(tl.int64)
                else:
                    q_rows = idx.to(tl.int64)
                q, do, lse, delta = query_tile_t(Q, DO, LSE, DELTA, b64, h64, q_rows, q_ok, N, H,
                                                 HEAD_D, HEAD_DV, UPCAST)
                st = scores_t(k, q, bias, qk_scale, PRECISION)
                if WINDOW:
                    win_lo, win_hi, win_group = load_windows(LO_CODE, HI_CODE, LO_GROUP, q_rows, q_ok, WINDOW == 2)
                    ok = window_ok(k_code, k_group, win_lo[None, :], win_hi[None, :], win_group[None, :], GUARD,
                                   WINDOW == 2)
                    st = tl.where(ok, st, float("-inf"))
                dk, dv = dkdv_step(dk, dv, st, v, q, do, lse, delta, PRECISION)
                count_tile(WORK, BLOCK_M, BLOCK_N, COUNT_WORK)
        store_rows(DK + (b64 * NK * H + h64) * HEAD_D, k_rows, in_range, H * HEAD_D, dk * sm_scale, HEAD_D)
        store_rows(DV + (b64 * NK * H + h64) * HEAD_DV, k_rows, in_range, H * HEAD_DV, dv, HEAD_DV)


_KEY = ["BLOCK_M", "BLOCK_N", "HEAD_D", "HEAD_DV", "PRECISION"]
rows_kernel = triton.autotune(tiles.configs(), key=_KEY + ["WINDOW", "BACKWARD"], prune_configs_by=tiles.pruner(
    lambda args: "window" if args["WINDOW"] else "dq" if args["BACKWARD"] else "forward"))(_rows_kernel)
keys_kernel = triton.autotune(tiles.configs(), key=_KEY + ["GATHER", "WINDOW"],
                              prune_configs_by=tiles.pruner(lambda args: "keys"))(_keys_kernel)
