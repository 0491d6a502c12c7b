"""Pieces shared by every kernel family: one tile of attention, forward and backward.

Logits are kept in base 2 (``qk_scale = scale * log2(e)``); a key's bias (``log2(count)`` of
a pooled key, ``-inf`` for a pad lane or a masked key) is added to its column. Token tensors
are contiguous ``[B, length, H, dim]``: row ``r`` of (batch ``b``, head ``h``) starts at
``((b * length + r) * H + h) * dim``; per-query statistics (``LSE``, ``DELTA``) are
``[B, H, N]`` float32.

Differences from the float64 reference: inputs are multiplied in their own dtype with float32
accumulation (the interpreter upcasts to float32 first); float32 inputs use IEEE dot products.
A plan row must not list the same key block twice at the same level (the reference would count
it once, these kernels twice); no method makes such plans.

With ``COUNT_WORK`` (a debug switch, off in every launch the library makes) each tile adds the
query-key pairs it computes, masked lanes included, to an int64 counter: the tests compare
that count with :func:`vdiff_sparse.kernels.work.work`.
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

#: Key range table columns: first row in the stacked keys, rows, pool factor, tokens of the
#: key block.
RANGE_START = tl.constexpr(0)
RANGE_ROWS = tl.constexpr(1)
RANGE_POOL = tl.constexpr(2)
RANGE_SIZE = tl.constexpr(3)
RANGE_WIDTH = tl.constexpr(4)


@triton.jit
def count_tile(WORK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COUNT_WORK: tl.constexpr):
    """Add one tile's pairs to the work counter (compiled out unless ``COUNT_WORK``)."""
    if COUNT_WORK:
        tl.atomic_add(WORK, BLOCK_M * BLOCK_N)


@triton.jit
def load_rows(base, rows, valid, row_stride, DIM: tl.constexpr, UPCAST: tl.constexpr):
    """``[len(rows), DIM]`` rows ``rows`` (int64) of one (batch, head) starting at ``base``;
    zeros where ``valid`` is False (float32 under the interpreter, whose 16-bit arithmetic on
    raw loads is wrong)."""
    cols = tl.arange(0, DIM)
    x = tl.load(base + rows[:, None] * row_stride + cols[None, :], mask=valid[:, None], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def pooled_bias(offs, valid, p, size):
    """Bias ``[n]`` of keys ``offs`` of a key range pooled by ``p`` from ``size`` tokens:
    ``log2(count)`` (a pooled key stands for ``count`` tokens: logit + ln(count) in base e),
    ``-inf`` where not ``valid``."""
    count = tl.maximum(tl.minimum(p, size - offs * p), 1)
    return tl.where(valid, tl.log2(count.to(tl.float32)), float("-inf"))


@triton.jit
def load_range(RANGES, r):
    """``(first row, rows, pool factor, tokens)`` of key range ``r``."""
    row = RANGES + r * RANGE_WIDTH
    return tl.load(row + RANGE_START), tl.load(row + RANGE_ROWS), tl.load(row + RANGE_POOL), tl.load(row + RANGE_SIZE)


@triton.jit
def range_keys(start, n_rows, p, size, n0, KMASK, has_kmask, b64, NK, BLOCK_N: tl.constexpr):
    """Keys ``n0 ... n0 + BLOCK_N`` of a key range: rows (int64), lanes inside the range, and
    their bias (pooled count; ``-inf`` outside the range and, when ``has_kmask``, where the
    ``[B, NK]`` mask drops the key)."""
    offs = n0 + tl.arange(0, BLOCK_N)
    in_range = offs < n_rows
    k_rows = (start + offs).to(tl.int64)
    k_ok = in_range
    if has_kmask:
        k_ok = k_ok & (tl.load(KMASK + b64 * NK + k_rows, mask=in_range, other=0) != 0)
    return k_rows, in_range, pooled_bias(offs, k_ok, p, size)


@triton.jit
def key_bias(valid):
    """Bias ``[n]`` of full-resolution keys: 0, ``-inf`` where not ``valid``."""
    return tl.where(valid, 0.0, float("-inf"))


@triton.jit
def scores(q, k, bias, qk_scale, PRECISION: tl.constexpr):
    """Base-2 logits ``[BLOCK_M, BLOCK_N]`` of queries ``q`` against keys ``k`` plus the keys' bias."""
    return tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + bias[None, :]


@triton.jit
def forward_step(acc, m_i, l_i, s, v, PRECISION: tl.constexpr):
    """Online softmax: fold logits ``s`` (``-inf`` = not attended) and values ``v`` into the
    running numerator ``acc``, row max ``m_i`` and denominator ``l_i``."""
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
    # A row with nothing allowed yet keeps m = -inf; shift by 0 to avoid inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    prob = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.reduce(prob, 1, _SUM)
    acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def dq_step(dq, s, k, v, do, lse, delta, PRECISION: tl.constexpr):
    """``dq += dS k`` (unscaled) for logits ``s`` with the saved base-2 log-sum-exp ``lse`` and
    ``delta = rowsum(dO * O)``."""
    prob = tl.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = prob * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def scores_t(k, q, bias, qk_scale, PRECISION: tl.constexpr):
    """Transposed base-2 logits ``[BLOCK_N, BLOCK_M]`` of keys ``k`` (with their bias) against
    queries ``q``: the key-major passes keep key rows in the first dimension."""
    return tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale + bias[:, None]


@triton.jit
def dkdv_step(dk, dv, st, v, q, do, lse, delta, PRECISION: tl.constexpr):
    """``dk += dSᵀ q`` (unscaled), ``dv += Pᵀ dO`` from transposed logits ``st``
    (``-inf`` = not attended). Pad queries carry ``lse = +inf``: probability 0."""
    prob = tl.exp2(st - lse[None, :])
    dv += tl.dot(prob.to(do.dtype), do, input_precision=PRECISION)
    dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds = prob * (dp - delta[None, :])
    dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def query_tile_t(Q, DO, LSE, DELTA, b64, h64, q_rows, q_ok, N, H,
                 HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, UPCAST: tl.constexpr):
    """A key-major pass's query tile: ``q``, ``dO``, the log-sum-exp (``+inf`` on pad rows, so
    they add nothing) and ``delta``."""
    q = load_rows(Q + (b64 * N * H + h64) * HEAD_D, q_rows, q_ok, H * HEAD_D, HEAD_D, UPCAST)
    do = load_rows(DO + (b64 * N * H + h64) * HEAD_DV, q_rows, q_ok, H * HEAD_DV, HEAD_DV, UPCAST)
    stat = (b64 * H + h64) * N + q_rows
    lse = tl.load(LSE + stat, mask=q_ok, other=float("inf"))
    delta = tl.load(DELTA + stat, mask=q_ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def store_rows(base, rows, valid, row_stride, x, DIM: tl.constexpr):
    """Store ``x`` ``[len(rows), DIM]`` to rows ``rows`` where ``valid``, in ``base``'s dtype."""
    cols = tl.arange(0, DIM)
    tl.store(base + rows[:, None] * row_stride + cols[None, :], x.to(base.dtype.element_ty), mask=valid[:, None])


@triton.jit
def attend(acc, m_i, l_i, s, k, v, do, BACKWARD: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of a query-major pass: the online softmax forward, ``dq`` in backward
    (where ``m_i`` is the saved log-sum-exp and ``l_i`` is ``delta``)."""
    if BACKWARD:
        acc = dq_step(acc, s, k, v, do, m_i, l_i, PRECISION)
    else:
        acc, m_i, l_i = forward_step(acc, m_i, l_i, s, v, PRECISION)
    return acc, m_i, l_i


@triton.jit
def start_rows(Q, DO, LSE, DELTA, b64, h64, q_rows, q_ok, N, H,
               BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
               BACKWARD: tl.constexpr, UPCAST: tl.constexpr):
    """Load a query tile (rows ``q_rows`` int64, real where ``q_ok``) and its pass's starting
    state ``(q, do, m_i, l_i, acc)``: forward an empty softmax; backward ``dO``, the saved
    log-sum-exp, ``delta`` and ``dq = 0``."""
    q = load_rows(Q + (b64 * N * H + h64) * HEAD_D, q_rows, q_ok, H * HEAD_D, HEAD_D, UPCAST)
    if BACKWARD:
        do = load_rows(DO + (b64 * N * H + h64) * HEAD_DV, q_rows, q_ok, H * HEAD_DV, HEAD_DV, UPCAST)
        stat = (b64 * H + h64) * N + q_rows
        m_i = tl.load(LSE + stat, mask=q_ok, other=0.0)
        l_i = tl.load(DELTA + stat, mask=q_ok, other=0.0)
        acc = tl.full([BLOCK_M, HEAD_D], 0.0, dtype=tl.float32)
    else:
        do = q
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        acc = tl.full([BLOCK_M, HEAD_DV], 0.0, dtype=tl.float32)
    return q, do, m_i, l_i, acc


@triton.jit
def attend_range(acc, m_i, l_i, q, do, K, V, start, n_rows, p, size, KMASK, has_kmask, b64, h64, NK, H, qk_scale,
                 WORK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
                 BACKWARD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 COUNT_WORK: tl.constexpr):
    """Attend a query tile to one key range (rows ``start ...`` of ``K``/``V`` ``[B, NK, H, D]``,
    pooled by ``p`` from ``size`` tokens), ``BLOCK_N`` keys at a time."""
    k_base = K + (b64 * NK * H + h64) * HEAD_D
    v_base = V + (b64 * NK * H + h64) * HEAD_DV
    for n0 in range(0, n_rows, BLOCK_N):
        k_rows, in_range, bias = range_keys(start, n_rows, p, size, n0, KMASK, has_kmask, b64, NK, BLOCK_N)
        k = load_rows(k_base, k_rows, in_range, H * HEAD_D, HEAD_D, UPCAST)
        v = load_rows(v_base, k_rows, in_range, H * HEAD_DV, HEAD_DV, UPCAST)
        s = scores(q, k, bias, qk_scale, PRECISION)
        acc, m_i, l_i = attend(acc, m_i, l_i, s, k, v, do, BACKWARD, PRECISION)
        count_tile(WORK, BLOCK_M, BLOCK_N, COUNT_WORK)
    return acc, m_i, l_i


@triton.jit
def load_windows(LO_CODE, HI_CODE, LO_GROUP, q_rows, q_ok, DILATED: tl.constexpr):
    """The packed window operands ``(lo, hi, group)`` of queries ``q_rows`` (see
    :func:`window_ok`)."""
    lo = tl.load(LO_CODE + q_rows, mask=q_ok, other=0)
    hi = tl.load(HI_CODE + q_rows, mask=q_ok, other=0)
    return lo, hi, load_group(LO_GROUP, q_rows, q_ok, DILATED)


@triton.jit
def finish_rows(O, LSE, acc, m_i, l_i, q, do, q_rows, q_ok, EK, EV, EMASK, N_EXTRA, has_emask,
                b64, h64, N, H, qk_scale, sm_scale, WORK,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
                BACKWARD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                COUNT_WORK: tl.constexpr):
    """End a query tile's pass: attend the extra (text) keys ``[B, N_EXTRA, H, D]`` (their
    ``[B, N_EXTRA]`` mask, when ``has_emask``, drops padding), then store ``dq`` (scaled) in
    backward; forward the output and the base-2 log-sum-exp (a query with no key at all gets
    output 0 and log-sum-exp 0)."""
    acc, m_i, l_i = attend_range(acc, m_i, l_i, q, do, EK, EV, 0, N_EXTRA, 1, N_EXTRA, EMASK, has_emask,
                                 b64, h64, N_EXTRA, H, qk_scale, WORK, BLOCK_M, BLOCK_N, HEAD_D, HEAD_DV,
                                 BACKWARD, UPCAST, PRECISION, COUNT_WORK)
    if BACKWARD:
        store_rows(O + (b64 * N * H + h64) * HEAD_D, q_rows, q_ok, H * HEAD_D, acc * sm_scale, HEAD_D)
    else:
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        store_rows(O + (b64 * N * H + h64) * HEAD_DV, q_rows, q_ok, H * HEAD_DV, out, HEAD_DV)
        tl.store(LSE + (b64 * H + h64) * N + q_rows, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), 0.0),
                 mask=q_ok)


@triton.jit
def window_ok(k_code, k_group, q_lo, q_hi, q_group, GUARD, DILATED: tl.constexpr):
    """Pair mask: keys inside the queries' coordinate windows (``[n, 1]`` against ``[1, m]``
    operands, either way round).

    Coordinates are packed per axis into bit fields of one int32, each with a guard bit above
    it (:class:`~vdiff_sparse.kernels.tables.WindowArgs`): a key's ``k_code`` is in a query's
    window on every axis iff, field by field, ``q_lo <= k_code <= q_hi``, which is two
    subtractions that borrow from no neighbouring field: ``(k_code | GUARD) - q_lo`` keeps a
    field's guard bit iff the key is not below the window there, ``q_hi - k_code`` (``q_hi``
    has the guard bits set) iff it is not above. With dilation the fields hold lattice indices
    ``x // d`` and a key must also be on the query's lattice (``k_group == q_group``, the
    packed ``x % d``).
    """
    ok = (((k_code | GUARD) - q_lo) & (q_hi - k_code) & GUARD) == GUARD
    if DILATED:
        ok = ok & (k_group == q_group)
    return ok


@triton.jit
def load_group(GROUP, rows, valid, DILATED: tl.constexpr):
    """The packed lattice offsets ``GROUP[rows]`` when ``DILATED`` (else zeros, never read)."""
    if DILATED:
        group = tl.load(GROUP + rows, mask=valid, other=0)
    else:
        group = tl.full(rows.shape, 0, dtype=tl.int32)
    return group
