"""Per-token routed plans (VMoBA): each key range runs with exactly the queries that chose it.

A query tile of a routed plan lists every key block any of its queries chose; run query-major,
it would compute all of them and mask per token (3-25x the pairs the plan asks for). Here the
work follows the routing, key-major:

* A query's chosen ranges (key block x pool level) are numbered in its entry order: its
  ``r``-th choice belongs to *round* ``r``. In one round every query appears at most once, so
  the round's programs — each one range and up to ``BLOCK_M`` of the queries that chose it in
  this round, gathered — own their queries' rows: :func:`_routed_rows_kernel` reads a query's
  running softmax state (numerator, max, denominator; ``dq`` in backward), folds the range's
  keys in and writes it back. Rounds run one after another (one launch each), so the result
  is the exact single softmax over all of a query's keys, merged in a fixed order: no atomics,
  deterministic. The extra (text) keys are one more round, every query in plan order.
* ``dk``/``dv``: :func:`~vdiff_sparse.kernels.blocks._keys_kernel` with ``GATHER``, one key
  tile of a range over all queries that chose it (all rounds, one list).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import tiles
from .common import attend_range, load_range, load_rows, store_rows

#: Task table columns: key range, first index in the query list, queries.
TASK_RANGE = tl.constexpr(0)
TASK_FIRST = tl.constexpr(1)
TASK_COUNT = tl.constexpr(2)
TASK_WIDTH = tl.constexpr(3)


@triton.jit
def _routed_rows_kernel(
    Q, K, V, DO, LSE, DELTA, ACC, M, L,
    TASKS, stride_tb, stride_th, POS, stride_pb, stride_ph, RANGES,
    KMASK, has_kmask,
    N, NK, H,
    qk_scale, WORK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BACKWARD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, COUNT_WORK: tl.constexpr,
):
    """Program ``(task, batch * H + head)`` of one round.

    ``TASKS`` ``[B'|1, H'|1, n_tasks, TASK_WIDTH]`` and ``POS`` ``[B'|1, H'|1, L]`` (query plan
    positions) with strides 0 where the plan broadcasts; ``RANGES`` ``[n_ranges,
    RANGE_WIDTH]``; ``KMASK`` ``[B, NK]`` drops padding keys when ``has_kmask``. State, float32:
    forward ``ACC`` ``[B, N, H, HEAD_DV]`` numerator, ``M``/``L`` ``[B, H, N]`` base-2 running
    max and denominator; backward ``ACC`` ``[B, N, H, HEAD_D]`` unscaled ``dq``.
    """
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    task = TASKS + b64 * stride_tb + h64 * stride_th + tl.program_id(0).to(tl.int64) * TASK_WIDTH
    count = tl.load(task + TASK_COUNT)
    if count > 0:
        r = tl.load(task + TASK_RANGE)
        q_ok = tl.arange(0, BLOCK_M) < count
        idx = tl.load(task + TASK_FIRST) + tl.arange(0, BLOCK_M)
        q_rows = tl.load(POS + b64 * stride_pb + h64 * stride_ph + idx, mask=q_ok, other=0).to(tl.int64)
        q = load_rows(Q + (b64 * N * H + h64) * HEAD_D, q_rows, q_ok, H * HEAD_D, HEAD_D, UPCAST)
        stat = (b64 * H + h64) * N + q_rows
        if BACKWARD:
            do = load_rows(DO + (b64 * N * H + h64) * HEAD_DV, q_rows, q_ok, H * HEAD_DV, HEAD_DV, UPCAST)
            m_i = tl.load(LSE + stat, mask=q_ok, other=0.0)
            l_i = tl.load(DELTA + stat, mask=q_ok, other=0.0)
            acc_base = ACC + (b64 * N * H + h64) * HEAD_D
            acc = load_rows(acc_base, q_rows, q_ok, H * HEAD_D, HEAD_D, False)
        else:
            do = q
            m_i = tl.load(M + stat, mask=q_ok, other=0.0)
            l_i = tl.load(L + stat, mask=q_ok, other=0.0)
            acc_base = ACC + (b64 * N * H + h64) * HEAD_DV
            acc = load_rows(acc_base, q_rows, q_ok, H * HEAD_DV, HEAD_DV, False)
        start, n_rows, p, size = load_range(RANGES, r)
        acc, m_i, l_i = attend_range(acc, m_i, l_i, q, do, K, V, start, n_rows, p, size, KMASK, has_kmask, b64, h64,
                                     NK, H, qk_scale, WORK, BLOCK_M, BLOCK_N, HEAD_D, HEAD_DV, BACKWARD, UPCAST,
                                     PRECISION, COUNT_WORK)
        if BACKWARD:
            store_rows(acc_base, q_rows, q_ok, H * HEAD_D, acc, HEAD_D)
        else:
            store_rows(acc_base, q_rows, q_ok, H * HEAD_DV, acc, HEAD_DV)
            tl.store(M + stat, m_i, mask=q_ok)
            tl.store(L + stat, l_i, mask=q_ok)


routed_rows_kernel = triton.autotune(
    tiles.configs(), key=["BLOCK_M", "BLOCK_N", "HEAD_D", "HEAD_DV", "PRECISION", "BACKWARD"],
    prune_configs_by=tiles.pruner(lambda args: "routed"),
    # Benchmark runs fold a range in again; put the state back after each.
    restore_value=["ACC", "M", "L"],
)(_routed_rows_kernel)
