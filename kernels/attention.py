"""Block-sparse attention kernels executing any :class:`~vdiff_sparse.plan.AttentionPlan`.

One kernel family, in reading order:

* :func:`_window_ok` and :func:`_logits` — the scores of one (query tile, key tile) pair with
  every plan rule applied: pooled-key bias ``log2(count)``, bounds, per-token routing and the
  GNA coordinate window computed from token coordinates (never a materialised mask).
* :func:`_row_segment` — the shared inner loop over the keys of one key range (a plan entry or
  the extra keys) in ``BLOCK_N`` steps; online softmax in the forward pass, ``dq`` in backward.
* :func:`_rows_kernel` — one program per (query block, ``BLOCK_M`` sub-tile, batch, head):
  walks the block's ``kv_index`` row, then the extra keys. ``BACKWARD`` selects the pass.
* :func:`_keys_kernel` — one program per (key range, ``BLOCK_N`` sub-tile, batch, head): walks
  the query blocks that use the range (the plan's inverted lists) and accumulates ``dk``/``dv``
  (FlashAttention-2 backward, recomputing probabilities from the saved log-sum-exp).

Logits are kept in base 2 (``qk_scale = scale * log2(e)``). Keys of every level are rows of one
stacked tensor (see :mod:`.pooling`); a plan entry is a row range with a pool factor.

Differences from the reference: inputs are multiplied in their own dtype with float32
accumulation (the interpreter upcasts to float32 first); float32 inputs use IEEE dot products.
A row must not list the same key block twice at the same level (the reference would count it
once, these kernels twice); no method makes such plans.
"""

from __future__ import annotations

import math
import os

import triton
import triton.language as tl

#: Set when this module was imported under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.0 / math.log(2.0)


# The standard library's tl.max/tl.sum/tl.zeros/tl.cdiv are themselves @triton.jit functions,
# decorated when triton is imported; under an interpreter switched on after that import they
# cannot run. These kernels reduce with tl.reduce and the standard combine functions, which the
# interpreter recognises and runs as numpy reductions (any other combine function it calls per
# element, ~100x slower), and use builtins for the rest.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


@triton.jit
def _window_ok(COORDS, LO, HI, DIL, q_pos, q_ok, k_pos, k_ok, DILATED: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]``: key ``k_pos`` inside the coordinate window of query ``q_pos``."""
    ok = q_ok[:, None] & k_ok[None, :]
    for axis in tl.static_range(3):
        lo = tl.load(LO + q_pos * 3 + axis, mask=q_ok, other=0)
        hi = tl.load(HI + q_pos * 3 + axis, mask=q_ok, other=0)
        x = tl.load(COORDS + k_pos * 3 + axis, mask=k_ok, other=0)
        ok = ok & (x[None, :] >= lo[:, None]) & (x[None, :] <= hi[:, None])
        # An integer modulo per pair costs more than the rest of the test: only when dilated.
        if DILATED:
            ok = ok & ((x[None, :] - lo[:, None]) % tl.load(DIL + axis) == 0)
    return ok


@triton.jit
def _logits(q, k, offs_n, p, size, ok, qk_scale, PRECISION: tl.constexpr):
    """Base-2 logits ``[BLOCK_M, BLOCK_N]`` of query tile ``q`` against key tile ``k`` (local
    key indices ``offs_n`` of a range pooled by ``p`` from ``size`` tokens), ``-inf`` where
    ``ok`` is False."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    # A pooled key stands for `count` tokens: logit + ln(count), i.e. + log2(count) in base 2.
    count = tl.maximum(tl.minimum(p, size - offs_n * p), 1)
    s += tl.log2(count.to(tl.float32))[None, :]
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _row_segment(
    acc, m_i, l_i, q, do, q_pos, q_ok,
    K, V, key_start, n_keys, p, size, windowed, CMASK,
    COORDS, LO, HI, DIL, stride_kn, stride_vn, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    WINDOW: tl.constexpr, COL_MASK: tl.constexpr, BACKWARD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Attend the query tile to keys ``[key_start, key_start + n_keys)`` of ``K``/``V``.

    Forward: ``(acc, m_i, l_i)`` is the online-softmax state. Backward: ``acc`` is ``dq``
    (unscaled), ``m_i`` the saved base-2 log-sum-exp and ``l_i`` ``rowsum(dO * O)``.
    """
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    for n0 in range(0, n_keys, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < n_keys
        rows = (key_start + offs_n).to(tl.int64)
        k = tl.load(K + rows[:, None] * stride_kn + offs_d[None, :], mask=in_range[:, None], other=0.0)
        v = tl.load(V + rows[:, None] * stride_vn + offs_dv[None, :], mask=in_range[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        k_ok = in_range
        if COL_MASK:
            k_ok = k_ok & (tl.load(CMASK + offs_n, mask=in_range, other=0) != 0)
        ok = q_ok[:, None] & k_ok[None, :]
        if WINDOW:
            # Entries whose key block lies inside every query's window skip the test.
            if windowed:
                ok = _window_ok(COORDS, LO, HI, DIL, q_pos, q_ok, key_start + offs_n, k_ok, WINDOW == 2)
        s = _logits(q, k, offs_n, p, size, ok, qk_scale, PRECISION)
        if BACKWARD:
            prob = tl.exp2(s - m_i[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = prob * (dp - l_i[:, None])
            acc += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        else:
            m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
            # A row with nothing allowed yet keeps m = -inf; shift by 0 to avoid inf - inf.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            prob = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.reduce(prob, 1, _SUM)
            acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _rows_kernel(
    Q, K, V, O, DO, LSE, DELTA,
    Q_OFF, ENT, stride_eb, stride_eh,
    KEEP, stride_pb, stride_ph,
    COORDS, LO, HI, DIL,
    EK, EV, EMASK,
    N, NK, N_EXTRA, H, MAX_KV, Q_BLOCK_MAX,
    qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    HAS_KEEP: tl.constexpr, WINDOW: tl.constexpr, HAS_EXTRA: tl.constexpr,
    EXTRA_MASK: tl.constexpr, BACKWARD: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Forward (``O``, ``LSE``) or ``dq`` (written to ``O``) for one query sub-tile.

    All token tensors are contiguous ``[B, length, H, dim]``; ``LSE``/``DELTA`` ``[B, H, N]``.
    ``WINDOW``: 0 no coordinate window, 1 a window, 2 a window with dilation.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n_sub = (Q_BLOCK_MAX + BLOCK_M - 1) // BLOCK_M
    qb = pid // n_sub
    q_lo = tl.load(Q_OFF + qb)
    q_hi = tl.load(Q_OFF + qb + 1)
    m0 = q_lo + (pid % n_sub) * BLOCK_M
    if m0 < q_hi:
        q_pos = m0 + tl.arange(0, BLOCK_M)
        q_ok = q_pos < q_hi
        offs_d = tl.arange(0, HEAD_D)
        offs_dv = tl.arange(0, HEAD_DV)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        # Row `n` of a [B, L, H, dim] tensor at (b, h): base + n * H * dim.
        q_base = Q + (b64 * N * H + h64) * HEAD_D
        o_base = O + (b64 * N * H + h64) * (HEAD_D if BACKWARD else HEAD_DV)
        k_base = K + (b64 * NK * H + h64) * HEAD_D
        v_base = V + (b64 * NK * H + h64) * HEAD_DV
        q_rows = q_pos.to(tl.int64)
        q = tl.load(q_base + q_rows[:, None] * (H * HEAD_D) + offs_d[None, :], mask=q_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        stat = LSE + (b64 * H + h64) * N + q_pos
        if BACKWARD:
            do = tl.load(DO + (b64 * N * H + h64) * HEAD_DV + q_rows[:, None] * (H * HEAD_DV) + offs_dv[None, :],
                         mask=q_ok[:, None], other=0.0)
            if UPCAST:
                do = do.to(tl.float32)
            m_i = tl.load(stat, mask=q_ok, other=0.0)
            l_i = tl.load(DELTA + (b64 * H + h64) * N + q_pos, mask=q_ok, other=0.0)
            acc = tl.full([BLOCK_M, HEAD_D], 0.0, dtype=tl.float32)
        else:
            do = q
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
            acc = tl.full([BLOCK_M, HEAD_DV], 0.0, dtype=tl.float32)

        ent = ENT + b64 * stride_eb + h64 * stride_eh + qb * MAX_KV * 5
        keep_base = KEEP + b64 * stride_pb + h64 * stride_ph + q_rows * MAX_KV
        for j in range(MAX_KV):
            start = tl.load(ent + j * 5)
            n_keys = tl.load(ent + j * 5 + 1)
            p = tl.load(ent + j * 5 + 2)
            size = tl.load(ent + j * 5 + 3)
            use = q_ok
            if HAS_KEEP:
                use = use & (tl.load(keep_base + j, mask=q_ok, other=0) != 0)
            # Skip empty slots and key blocks no query of this tile routed to.
            if (n_keys > 0) & (tl.reduce(use.to(tl.int32), 0, _MAX) > 0):
                acc, m_i, l_i = _row_segment(
                    acc, m_i, l_i, q, do, q_pos, use, k_base, v_base, start, n_keys, p, size,
                    tl.load(ent + j * 5 + 4) != 0, EMASK, COORDS, LO, HI, DIL, H * HEAD_D, H * HEAD_DV,
                    qk_scale, BLOCK_N, HEAD_D, HEAD_DV, WINDOW, False, BACKWARD, UPCAST, PRECISION)
        if HAS_EXTRA:
            acc, m_i, l_i = _row_segment(
                acc, m_i, l_i, q, do, q_pos, q_ok,
                EK + (b64 * N_EXTRA * H + h64) * HEAD_D, EV + (b64 * N_EXTRA * H + h64) * HEAD_DV,
                0, N_EXTRA, 1, N_EXTRA, False, EMASK + b64 * N_EXTRA,
                COORDS, LO, HI, DIL, H * HEAD_D, H * HEAD_DV, qk_scale,
                BLOCK_N, HEAD_D, HEAD_DV, False, EXTRA_MASK, BACKWARD, UPCAST, PRECISION)

        if BACKWARD:
            dq = acc * sm_scale
            tl.store(o_base + q_rows[:, None] * (H * HEAD_D) + offs_d[None, :],
                     dq.to(O.dtype.element_ty), mask=q_ok[:, None])
        else:
            # Queries with no key at all get 0 (and a harmless log-sum-exp of 0).
            has = l_i > 0
            out = acc / tl.where(has, l_i, 1.0)[:, None]
            tl.store(o_base + q_rows[:, None] * (H * HEAD_DV) + offs_dv[None, :],
                     out.to(O.dtype.element_ty), mask=q_ok[:, None])
            tl.store(stat, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), 0.0), mask=q_ok)


@triton.jit
def _keys_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    Q_OFF, N_QB, RANGES, ROWPTR, LIST_QB, LIST_J, stride_rb, stride_rh,
    ENT, stride_eb, stride_eh, KEEP, stride_pb, stride_ph, MAX_KV,
    COORDS, LO, HI, DIL, CMASK,
    N, NK, H, N_RANGES, K_BLOCK_MAX,
    qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    HAS_KEEP: tl.constexpr, WINDOW: tl.constexpr, ALL_QUERIES: tl.constexpr,
    COL_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dk``, ``dv`` of one ``BLOCK_N`` sub-tile of a key range (``RANGES`` ``[n, 4]``: first
    stacked row, rows, pool factor, tokens). The query blocks using range ``r`` are
    ``LIST_QB[ROWPTR[r]:ROWPTR[r+1]]`` with their entry slots ``LIST_J``, ``ROWPTR`` offset by
    the plan's (batch, head) through ``stride_rb``/``stride_rh`` (0 where the plan broadcasts);
    or every query block when ``ALL_QUERIES`` (the extra keys)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n_sub = (K_BLOCK_MAX + BLOCK_N - 1) // BLOCK_N
    r = pid // n_sub
    start = tl.load(RANGES + r * 4)
    n_keys = tl.load(RANGES + r * 4 + 1)
    p = tl.load(RANGES + r * 4 + 2)
    size = tl.load(RANGES + r * 4 + 3)
    n0 = (pid % n_sub) * BLOCK_N
    if n0 < n_keys:
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < n_keys
        offs_d = tl.arange(0, HEAD_D)
        offs_dv = tl.arange(0, HEAD_DV)
        rows = (start + offs_n).to(tl.int64)
        k_ptrs = (b64 * NK * H + h64) * HEAD_D + rows[:, None] * (H * HEAD_D) + offs_d[None, :]
        v_ptrs = (b64 * NK * H + h64) * HEAD_DV + rows[:, None] * (H * HEAD_DV) + offs_dv[None, :]
        k = tl.load(K + k_ptrs, mask=in_range[:, None], other=0.0)
        v = tl.load(V + v_ptrs, mask=in_range[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        k_ok = in_range
        if COL_MASK:
            k_ok = k_ok & (tl.load(CMASK + b64 * NK + offs_n, mask=in_range, other=0) != 0)
        dk = tl.full([BLOCK_N, HEAD_D], 0.0, dtype=tl.float32)
        dv = tl.full([BLOCK_N, HEAD_DV], 0.0, dtype=tl.float32)
        q_base = Q + (b64 * N * H + h64) * HEAD_D
        do_base = DO + (b64 * N * H + h64) * HEAD_DV
        stat_base = (b64 * H + h64) * N
        if ALL_QUERIES:
            n_items = N_QB
        else:
            row = ROWPTR + b64 * stride_rb + h64 * stride_rh + r
            first = tl.load(row)
            n_items = tl.load(row + 1) - first
        ent = ENT + b64 * stride_eb + h64 * stride_eh
        for it in range(n_items):
            if ALL_QUERIES:
                qb = it
                j = 0
            else:
                qb = tl.load(LIST_QB + first + it)
                j = tl.load(LIST_J + first + it)
            q_lo = tl.load(Q_OFF + qb)
            q_hi = tl.load(Q_OFF + qb + 1)
            for m0 in range(q_lo, q_hi, BLOCK_M):
                q_pos = m0 + tl.arange(0, BLOCK_M)
                q_ok = q_pos < q_hi
                q_rows = q_pos.to(tl.int64)
                if HAS_KEEP:
                    keep = tl.load(KEEP + b64 * stride_pb + h64 * stride_ph + q_rows * MAX_KV + j, mask=q_ok, other=0)
                    q_ok = q_ok & (keep != 0)
                if tl.reduce(q_ok.to(tl.int32), 0, _MAX) > 0:
                    q = tl.load(q_base + q_rows[:, None] * (H * HEAD_D) + offs_d[None, :], mask=q_ok[:, None], other=0.0)
                    do = tl.load(do_base + q_rows[:, None] * (H * HEAD_DV) + offs_dv[None, :],
                                 mask=q_ok[:, None], other=0.0)
                    if UPCAST:
                        q = q.to(tl.float32)
                        do = do.to(tl.float32)
                    lse = tl.load(LSE + stat_base + q_pos, mask=q_ok, other=0.0)
                    delta = tl.load(DELTA + stat_base + q_pos, mask=q_ok, other=0.0)
                    ok = q_ok[:, None] & k_ok[None, :]
                    if WINDOW:
                        if tl.load(ent + (qb * MAX_KV + j) * 5 + 4) != 0:
                            ok = _window_ok(COORDS, LO, HI, DIL, q_pos, q_ok, start + offs_n, k_ok, WINDOW == 2)
                    s = _logits(q, k, offs_n, p, size, ok, qk_scale, PRECISION)
                    prob = tl.exp2(s - lse[:, None])
                    dv += tl.dot(tl.trans(prob).to(do.dtype), do, input_precision=PRECISION)
                    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                    ds = prob * (dp - delta[:, None])
                    dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        tl.store(DK + k_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=in_range[:, None])
        tl.store(DV + v_ptrs, dv.to(DV.dtype.element_ty), mask=in_range[:, None])


# --- configurations ------------------------------------------------------------------------

def _configs(pairs):
    if INTERPRET:
        # The interpreter cannot benchmark several configs; small tiles keep it fast.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in pairs
    ]


_ROW_CONFIGS = _configs([
    (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3),
])
_KEY_CONFIGS = _configs([
    (32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (64, 32, 4, 2), (64, 128, 8, 3),
])


def _prune(configs, named_args, **kwargs):
    """Drop tiles far larger than the blocks (they would mostly compute masked lanes) and
    register-hungry tiles at head dim 256."""
    args = {**named_args, **kwargs}
    big_m = max(16, triton.next_power_of_2(int(args["Q_BLOCK_MAX"])))
    wide = max(args["HEAD_D"], args["HEAD_DV"])
    kept = []
    for c in configs:
        if c.kwargs["BLOCK_M"] > big_m:
            continue
        if wide >= 256 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64:
            continue
        kept.append(c)
    return kept or configs[:1]


# Tuned per head dims and block size only: keying on the plan's row length would re-tune on
# almost every call of a content-dependent method.
_rows_fwd = triton.autotune(
    _ROW_CONFIGS, key=["HEAD_D", "HEAD_DV", "Q_BLOCK_MAX", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
)(_rows_kernel)
_rows_dq = triton.autotune(
    _ROW_CONFIGS, key=["HEAD_D", "HEAD_DV", "Q_BLOCK_MAX", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
)(_rows_kernel)
_keys_bwd = triton.autotune(
    _KEY_CONFIGS, key=["HEAD_D", "HEAD_DV", "K_BLOCK_MAX", "ALL_QUERIES", "PRECISION"],
)(_keys_kernel)
