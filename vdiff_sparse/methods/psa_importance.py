"""PSA's importance estimate: how much each (query block, key block) pair matters, from
sampled or block-mean logits, and how alike a key block's keys are (the similarity cap).

Everything here works in plan order (``BlockOrder``) on ``[B, N, heads, D]`` inputs or
``[R, N, D]`` rows (``R = B * heads``); :mod:`vdiff_sparse.methods.psa` turns the estimate into
levels.
"""

from __future__ import annotations

import functools
import torch

from ..layout import BlockOrder

# The sampled logits of one chunk stay below this many elements on the CPU (4 MiB in fp32):
# one head at N = 16K with 128-token blocks is 16M sampled pairs, 16 chunks of 8 query blocks.
# Much bigger chunks make the matmul write and reread logits from memory (2^24 took twice as
# long on 2 cores in a scratch run) and cost memory; much smaller ones split the matmul too finely for the
# threads. A GPU has no such cache to fit and pays a few kernel launches per chunk instead.
CHUNK_ELEMENTS = 2**20
CHUNK_ELEMENTS_GPU = 2**26


def chunk_elements(x: torch.Tensor) -> int:
    """Sampled logits per chunk for tensors on ``x``'s device (read at call time)."""
    return CHUNK_ELEMENTS_GPU if x.is_cuda else CHUNK_ELEMENTS


def sample_positions(offsets: torch.Tensor, samples: int) -> torch.Tensor:
    """``[n_blocks, samples]`` evenly spaced plan positions inside each block (repeated when
    a block is shorter than ``samples``)."""
    sizes = offsets.diff()
    i = torch.arange(samples, device=offsets.device)
    return offsets[:-1, None] + ((2 * i + 1) * sizes[:, None]).div(2 * samples, rounding_mode="floor")


def _block_means(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[R, N, D]`` -> ``[R, n_blocks, D]`` mean of every block."""
    block = BlockOrder(None, offsets).block_of_position(x.shape[1])
    sums = x.new_zeros(x.shape[0], offsets.numel() - 1, x.shape[-1]).index_add_(1, block, x)
    return sums / offsets.diff().to(x.dtype)[:, None]


@functools.lru_cache(maxsize=None)
def _cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX). Without it oneDNN
    emulates bfloat16: no faster than float32 on AVX-512, over 100x slower on AVX2
    (scratch runs on 2 cores, a [4096, 64] x [64, 4096] matmul in 256-row chunks: with
    ONEDNN_MAX_CPU_ISA=AVX2 1.9 s in bfloat16 vs 12 ms in float32; with AVX512_CORE 20-24 vs
    27 ms)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def importance_matmul_dtype(config, q: torch.Tensor) -> torch.dtype:
    """The operand dtype ``config.importance_dtype`` (a :class:`~vdiff_sparse.methods.psa.PSAConfig`'s)
    resolves to for inputs like ``q``."""
    if config.importance_dtype != "auto":
        return getattr(torch, config.importance_dtype)
    if q.dtype == torch.float64:
        return torch.float64
    if q.is_cuda:  # bfloat16 tensor cores from compute capability 8.0 (Ampere) on
        fast_bf16 = torch.cuda.get_device_capability(q.device)[0] >= 8
    else:
        fast_bf16 = q.device.type == "cpu" and _cpu_has_fast_bf16()
    return torch.bfloat16 if fast_bf16 else torch.float32


def sampled_importance(
    q: torch.Tensor, k: torch.Tensor, order: BlockOrder, q_offsets: torch.Tensor,
    k_offsets: torch.Tensor, sq: int, sk: int, scale: float, matmul_dtype: torch.dtype,
) -> torch.Tensor:
    """``[B, N, heads, D]`` q, k in the original order -> ``[B*heads, n_q_blocks, n_k_blocks]``
    rows summing to 1. Only the sampled tokens are read (through the reorder), never a
    reordered copy of q or k. The logits are ``matmul_dtype``; the rest runs in float32 or
    float64."""
    B, _, H, D = q.shape
    nqb, nkb = q_offsets.numel() - 1, k_offsets.numel() - 1
    work_dtype = torch.promote_types(matmul_dtype, torch.float32)

    def sampled(x, positions):  # [B*H, positions, D]
        tokens = positions if order.perm is None else order.perm[positions]
        return x.index_select(1, tokens).transpose(1, 2).reshape(B * H, -1, D)

    # Queries block-major (a chunk is a few query blocks); keys sample-major, so that the max
    # over a key block's samples reduces over a strided axis with key blocks contiguous: the
    # reduction vectorises across blocks (in a scratch run in bfloat16: 0.09 ms per chunk,
    # against 1.09 ms reducing over 32 adjacent samples).
    q_positions = sample_positions(q_offsets, sq).reshape(-1)
    k_positions = sample_positions(k_offsets, sk).t().reshape(-1)
    scaled = sampled(q, q_positions).to(work_dtype) * scale  # scaled here, not the logits
    qs = scaled.to(matmul_dtype).view(B * H, nqb, sq, D)
    ks = sampled(k, k_positions).to(matmul_dtype).transpose(1, 2)  # [R, D, sk*nkb]
    blocks_per_chunk = max(1, min(nqb, chunk_elements(q) // (sq * nkb * sk)))
    out = torch.empty(B * H, nqb, nkb, dtype=work_dtype, device=q.device)
    for r in range(B * H):
        for b0 in range(0, nqb, blocks_per_chunk):
            b1 = min(nqb, b0 + blocks_per_chunk)
            logits = torch.mm(qs[r, b0:b1].reshape(-1, D), ks[r])  # [(b1-b0)*sq, sk*nkb]
            per_block = logits.view(b1 - b0, sq, sk, nkb)
            block_max = per_block.amax(2).to(work_dtype)
            row_max = block_max.amax(-1, keepdim=True)
            out[r, b0:b1] = (block_max - row_max).exp_().amax(1)
    return out / out.sum(-1, keepdim=True)


def mean_pooled_importance(
    qp: torch.Tensor, kp: torch.Tensor, q_offsets: torch.Tensor, k_offsets: torch.Tensor, scale: float
) -> torch.Tensor:
    logits = torch.einsum("rbd,rkd->rbk", _block_means(qp, q_offsets), _block_means(kp, k_offsets))
    return torch.softmax(logits * scale, dim=-1)


def block_similarity(kp: torch.Tensor, k_offsets: torch.Tensor, p: int) -> torch.Tensor:
    """Mean cosine similarity between the first and last key of every pool group of ``p``.

    Args:
        kp: ``[R, N, D]`` keys in plan order.
        k_offsets: key block boundaries; groups start at each block start, the last group of
            a block may be shorter.
        p: pool factor.

    Returns:
        ``[R, n_k_blocks]``; a block without any group of two or more keys (pooling it is
        exact) gets 1.
    """
    n = kp.shape[1]
    nkb = k_offsets.numel() - 1
    block = BlockOrder(None, k_offsets).block_of_position(n)
    # Every position is paired with the last of a group starting there; only group starts
    # count. (Selecting the starts would be a shape that depends on the offsets' values.)
    first = torch.arange(n, device=kp.device)
    starts = (first - k_offsets[:-1][block]) % p == 0
    last = torch.minimum(first + p, k_offsets[1:][block]) - 1
    cos = torch.nn.functional.cosine_similarity(kp, kp[:, last], dim=-1)
    real = ((last > first) & starts).to(kp.dtype)
    sums = kp.new_zeros(kp.shape[0], nkb).index_add_(1, block, cos * real)
    counts = kp.new_zeros(nkb).index_add_(0, block, real)
    return torch.where(counts > 0, sums / counts.clamp(min=1), 1.0)
