"""PSA's sampled importance estimate on a GPU: every query block's sampled queries against every
key block's sampled keys, reduced where they are computed.

One program per (query block, batch-head row) holds the block's ``sq`` sampled queries and walks
the key blocks; per key block one ``[sq, sk]`` tile of logits (a ``tl.dot``) gives

* ``block_max`` ``[R, n_q_blocks, n_k_blocks, sq]``: each sampled query's largest logit over
  the key block's samples (what the importance is made of, :func:`sampled_block_stats`);
* with ``STATS`` (PSA's budget mode), from the same tile: ``spread_sum``, the sum of squared
  differences of the logits of consecutive key samples (``2m``, ``2m + 1``) over every
  ``SPREAD_STRIDE``-th sampled query, and ``variance``, the variance of sampled query 0's
  logits over the key block's samples.

The logits never leave the registers: the torch path writes them to memory and reads them back
for the max and again for the spread; here the spread costs a subtraction and a sum on a tile
already computed, and no multiply-add beyond the importance's. Samples are gathered (through the
plan's reorder) by the caller; queries come scaled.

Requirements (:func:`why_not`): ``HEAD_D`` a power of two of at least 16 (``tl.dot``), at most
:data:`MAX_SAMPLES` samples per block (a tile of logits in registers), float16, bfloat16 or
float32 operands (float32 with IEEE products), CUDA tensors (CPU ones under the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _MAX, _SUM, INTERPRET, load_rows


@triton.jit
def sampled_stats(Q, K, BLOCK_MAX, SPREAD, VARIANCE, n_q_blocks, n_k_blocks,
                  SQ: tl.constexpr, SK: tl.constexpr, SPREAD_STRIDE: tl.constexpr, HEAD_D: tl.constexpr,
                  SQ_PAD: tl.constexpr, SK_PAD: tl.constexpr, STATS: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISION: tl.constexpr):
    """``Q`` ``[R, n_q_blocks * SQ, HEAD_D]`` sampled scaled queries and ``K`` ``[R, n_k_blocks *
    SK, HEAD_D]`` sampled keys, block-major, contiguous; outputs float32 (module docstring)."""
    r = tl.program_id(0).to(tl.int64)  # rows on the first axis (up to 2**31 programs)
    i = tl.program_id(1)
    qs = tl.arange(0, SQ_PAD)
    q_ok = qs < SQ
    q = load_rows(Q, (r * n_q_blocks + i) * SQ + qs, q_ok, HEAD_D, HEAD_D, UPCAST)
    ks = tl.arange(0, SK_PAD)
    k_ok = ks < SK
    pad = tl.where(k_ok, 0.0, float("-inf"))
    # Pairs (2m, 2m + 1), m < SK // 2; an odd last sample has no partner.
    pair_ok = tl.arange(0, SK_PAD // 2) < SK // 2
    spread_rows = (q_ok & (qs % SPREAD_STRIDE == 0))[:, None] & pair_ok[None, :]
    out_row = (r * n_q_blocks + i) * n_k_blocks
    for j in range(0, n_k_blocks):
        k = load_rows(K, (r * n_k_blocks + j) * SK + ks, k_ok, HEAD_D, HEAD_D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [SQ_PAD, SK_PAD] float32
        tl.store(BLOCK_MAX + (out_row + j) * SQ + qs, tl.reduce(s + pad[None, :], 1, _MAX), mask=q_ok)
        if STATS:
            first, second = tl.split(tl.reshape(s, (SQ_PAD, SK_PAD // 2, 2)))
            diff = tl.where(spread_rows, first - second, 0.0)
            tl.store(SPREAD + out_row + j, tl.reduce(tl.reduce(diff * diff, 1, _SUM), 0, _SUM))
            query0 = tl.where(k_ok, tl.reduce(tl.where(qs[:, None] == 0, s, 0.0), 0, _SUM), 0.0)  # [SK_PAD]
            centred = tl.where(k_ok, query0 - tl.reduce(query0, 0, _SUM) / SK, 0.0)
            tl.store(VARIANCE + out_row + j, tl.reduce(centred * centred, 0, _SUM) / SK)


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


#: Samples per query or key block the kernel takes (the default sampling, a quarter of the
#: block, of blocks up to 128): the sampled queries and the ``[sq, sk]`` float32 tile live in
#: registers, and at 64 samples of head dim 128 in float32 they spill (sm_90 and sm_80).
MAX_SAMPLES = 32


def why_not(head_dim: int, dtype: torch.dtype, sq: int, sk: int, device: torch.device) -> str | None:
    """Why :func:`sampled_block_stats` cannot take these samples (``None`` when it can)."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head dim {head_dim} is not a power of two of at least 16"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"{dtype} operands (float16, bfloat16 or float32 are)"
    if max(sq, sk) > MAX_SAMPLES:
        return f"{max(sq, sk)} samples per block (at most {MAX_SAMPLES} are)"
    if device.type != "cuda" and not INTERPRET:
        return f"{device.type} tensors (CUDA ones are, or CPU ones under TRITON_INTERPRET=1)"
    return None


def sampled_block_stats(
    qs: torch.Tensor, ks: torch.Tensor, sq: int, sk: int, spread_stride: int, stats: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch :func:`sampled_stats`.

    Args:
        qs: ``[R, n_q_blocks * sq, D]`` scaled sampled queries, block-major (``sq`` per block).
        ks: ``[R, n_k_blocks * sk, D]`` sampled keys, block-major, same dtype.
        spread_stride: every this many-th sampled query measures the spread.
        stats: also the spread and the variance.

    Returns:
        ``block_max`` ``[R, n_q_blocks, n_k_blocks, sq]`` and, with ``stats``, ``spread_sum``
        and ``variance`` ``[R, n_q_blocks, n_k_blocks]`` (else ``None``), float32.
    """
    R, _, D = qs.shape
    reason = why_not(D, qs.dtype, sq, sk, qs.device)
    if reason:
        raise ValueError(f"sampled_block_stats cannot run: {reason}")
    if ks.shape[0] != R or ks.shape[2] != D or ks.dtype != qs.dtype or ks.device != qs.device:
        raise ValueError(f"sampled keys {tuple(ks.shape)} {ks.dtype} on {ks.device} do not match the queries "
                         f"{tuple(qs.shape)} {qs.dtype} on {qs.device} (same rows, head dim, dtype and device)")
    if qs.shape[1] % sq or ks.shape[1] % sk:
        raise ValueError(f"{qs.shape[1]} sampled queries / {ks.shape[1]} keys are not whole blocks of {sq} / {sk}")
    nqb, nkb = qs.shape[1] // sq, ks.shape[1] // sk
    qs, ks = qs.contiguous(), ks.contiguous()
    block_max = torch.empty(R, nqb, nkb, sq, dtype=torch.float32, device=qs.device)
    # Without STATS the kernel never touches SPREAD / VARIANCE: any float32 pointer will do.
    spread = torch.empty(R, nqb, nkb, dtype=torch.float32, device=qs.device) if stats else block_max
    variance = torch.empty_like(spread) if stats else block_max
    sampled_stats[(R, nqb)](
        qs, ks, block_max, spread, variance, nqb, nkb,
        SQ=sq, SK=sk, SPREAD_STRIDE=spread_stride, HEAD_D=D, SQ_PAD=_pad(sq), SK_PAD=_pad(sk), STATS=stats,
        UPCAST=INTERPRET, PRECISION="ieee",
    )
    return block_max, spread if stats else None, variance if stats else None
