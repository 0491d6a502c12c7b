"""PSA's importance estimate: how much each (query block, key block) pair matters, from
sampled or block-mean logits, and how alike a key block's keys are (the similarity cap).

Everything here works in plan order (``BlockOrder``) on ``[B, N, heads, D]`` inputs or
``[R, N, D]`` rows (``R = B * heads``); :mod:`vdiff_sparse.methods.psa` turns the estimate into
levels. The sampled estimate has two paths with one result: on a GPU a Triton kernel
(:mod:`vdiff_sparse.kernels.estimate`, :func:`sampled_stats_on_kernel`) that keeps the logits
in registers, elsewhere torch matmuls over chunks of logits (:func:`sampled_logit_chunks`),
each chunk reduced by eager torch or, for large calls on the CPU, by one compiled function
(:func:`fused_on_cpu`); :func:`estimate_on_kernel` picks, and the budget mode's statistics
(:func:`vdiff_sparse.methods.psa_budget.sampled_estimates`) ride on either.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Iterator

import torch

from ..layout import BlockOrder

# The sampled logits of one chunk stay below this many elements on the CPU (4 MiB in fp32):
# one head at N = 16K with 128-token blocks is 16M sampled pairs, 16 chunks of 8 query blocks.
# Much bigger chunks make the matmul write and reread logits from memory (2^24 took twice as
# long on 2 cores in a scratch run) and cost memory; much smaller ones split the matmul too finely for the
# threads. A GPU has no such cache to fit and pays a few kernel launches per chunk instead.
CHUNK_ELEMENTS = 2**20
CHUNK_ELEMENTS_GPU = 2**26

#: On the CPU, a call with at least this many sampled logits reduces each chunk of them in one
#: compiled function (``torch.compile``: inductor's C++ fuses each reduction's elementwise work
#: into its pass over the chunk, the budget mode's statistics in the same call) instead of eager
#: torch's operation per pass over logits in memory: from 8K tokens at 4 heads with the default
#: quarter-block samples (``batch * heads * (N / 4)^2`` logits). Compiling takes seconds, once per
#: process and chunk shape (then once more with the shape dynamic), more than a small call
#: saves: smaller calls (the tests', the fidelity benchmark's 3K-token problems) run eagerly.
FUSED_CPU_MIN_LOGITS = 2**24
#: Sampled logits per chunk on the fused path, bigger than eager torch's: at 16K tokens, 4 heads
#: the estimate took 1.5x as long with chunks of 2^20 (the matmuls' shapes; a compiled call's
#: guards and dispatch cost about 30 microseconds) as with 2^22, 2^23 was no faster and 2^24
#: 1.4x slower (scratch runs on 2 cores).
CHUNK_ELEMENTS_FUSED = 2**22

# Set when compiling failed in this process (no C++ toolchain for inductor, say): the
# automatic choice runs eagerly from then on, after one warning.
_FUSED_FAILED: list[str] = []


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


def by_residue(samples: torch.Tensor, stride: int) -> torch.Tensor:
    """``[n_blocks, s]`` sample positions reordered along the last axis: those whose index is
    ``0 mod stride`` first (index 0 leading), then ``1 mod stride``, and so on."""
    return samples if stride == 1 else torch.cat([samples[:, r::stride] for r in range(stride)], 1)


def pairs_split(samples: torch.Tensor) -> torch.Tensor:
    """``[n_blocks, s]`` sample positions reordered along the last axis: ``0, 2, 4, ...`` (the
    first of each pair ``(2m, 2m + 1)``), then ``1, 3, 5, ...``, then sample ``s - 1`` when
    ``s`` is odd."""
    pairs = samples.shape[1] // 2
    return torch.cat([samples[:, 0 : 2 * pairs : 2], samples[:, 1 : 2 * pairs : 2], samples[:, 2 * pairs :]], 1)


def _sampled_rows(x: torch.Tensor, order: BlockOrder, positions: torch.Tensor) -> torch.Tensor:
    """``[B, N, heads, D]`` -> ``[B*heads, len(positions), D]``: the tokens at plan positions
    ``positions`` (through the reorder), every row one (batch, head)."""
    B, _, H, D = x.shape
    tokens = positions if order.perm is None else order.perm[positions]
    return x.index_select(1, tokens).transpose(1, 2).reshape(B * H, -1, D)


def _sampled_queries(q, order, positions, scale, matmul_dtype):
    """:func:`_sampled_rows` of ``q``, times ``scale``, in ``matmul_dtype``."""
    work_dtype = torch.promote_types(matmul_dtype, torch.float32)
    return (_sampled_rows(q, order, positions).to(work_dtype) * scale).to(matmul_dtype)  # scaled here, not the logits


def estimate_on_kernel(q: torch.Tensor, matmul_dtype: torch.dtype, sq: int, sk: int, kernel: bool | None) -> bool:
    """Whether the sampled estimate runs on the Triton kernel (:mod:`vdiff_sparse.kernels.estimate`)
    rather than on torch matmuls: ``kernel`` if given (``True`` raises where it cannot), else
    on a GPU when the kernel can take the head dim, dtype and sample counts and triton imports."""
    if kernel is False or (kernel is None and not q.is_cuda):
        return False
    try:
        from ..backends.triton import _kernels

        reason = _kernels("estimate").why_not(q.shape[-1], matmul_dtype, sq, sk, q.device)
    except ImportError as err:
        reason = f"triton cannot be imported ({err})"
    if kernel and reason:
        raise ValueError(f"the sampled estimate cannot run on the Triton kernel: {reason}")
    return reason is None


def sampled_stats_on_kernel(
    q: torch.Tensor, k: torch.Tensor, order: BlockOrder, q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    sq: int, sk: int, scale: float, matmul_dtype: torch.dtype, spread_stride: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The sampled estimate on the Triton kernel, a few (batch, head) rows per launch.

    Returns:
        ``importance`` ``[B*heads, n_q_blocks, n_k_blocks]`` rows summing to 1 and, with a
        ``spread_stride``, the kernel's ``spread_sum`` and ``variance`` (else ``None``), all
        float32 (:func:`vdiff_sparse.kernels.estimate.sampled_block_stats`).
    """
    from ..backends.triton import _kernels

    estimate = _kernels("estimate")
    nqb, nkb = q_offsets.numel() - 1, k_offsets.numel() - 1
    qs = _sampled_queries(q, order, sample_positions(q_offsets, sq).reshape(-1), scale, matmul_dtype)
    ks = _sampled_rows(k, order, sample_positions(k_offsets, sk).reshape(-1)).to(matmul_dtype)
    rows = qs.shape[0]
    stats = spread_stride is not None
    importance = torch.empty(rows, nqb, nkb, dtype=torch.float32, device=q.device)
    spread = torch.empty_like(importance) if stats else None
    variance = torch.empty_like(importance) if stats else None
    # The per-query block maxima are 1/sk of the logits; a chunk of rows keeps them bounded.
    rows_per_chunk = max(1, chunk_elements(q) // (nqb * nkb * sq))
    for r0 in range(0, rows, rows_per_chunk):
        r1 = min(rows, r0 + rows_per_chunk)
        block_max, spread_sum, var = estimate.sampled_block_stats(qs[r0:r1], ks[r0:r1], sq, sk, spread_stride or 1,
                                                                  stats=stats)
        importance[r0:r1] = importance_of_block_max(block_max.transpose(2, 3))  # as [..., sq, nkb]
        if stats:
            spread[r0:r1], variance[r0:r1] = spread_sum, var
    return importance / importance.sum(-1, keepdim=True), spread, variance


def sampled_logit_chunks(
    q: torch.Tensor, k: torch.Tensor, order: BlockOrder, q_offsets: torch.Tensor,
    k_offsets: torch.Tensor, sq: int, sk: int, scale: float, matmul_dtype: torch.dtype,
    q_sample_stride: int = 1, k_pairs_first: bool = False, max_elements: int | None = None,
) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """The sampled logits, a few query blocks of one (batch, head) row at a time.

    ``q``, ``k`` are ``[B, N, heads, D]`` in the original order; only the sampled tokens
    (:func:`sample_positions` of every block, in plan order) are read, through the reorder,
    never a reordered copy of q or k.

    Args:
        q_sample_stride: each query block's samples along the logits' query axis in the
            order :func:`by_residue` gives (samples ``0, s, 2s, ...`` first; ``1``: ascending).
        k_pairs_first: each key block's samples in the order :func:`pairs_split` gives (the
            first samples of the pairs ``(2m, 2m + 1)``, then the second ones, then an odd one
            out), else ascending. A consumer that reads some samples together lays them out
            contiguously this way (slices of the positions: no index list reaches the device).
        max_elements: logits per chunk (default :func:`chunk_elements`).

    Yields:
        ``(row, b0, b1, logits)``: ``row = b * heads + h``, query blocks ``b0:b1`` and
        ``logits`` ``[b1 - b0, sq, sk, n_k_blocks]`` in ``matmul_dtype``, ``logits[i, s, t, j]``
        the scaled logit of query block ``b0 + i``'s ``s``-th sample and key block ``j``'s
        ``t``-th sample in those orders, valid until the next chunk is asked for (one
        buffer holds them all). At most ``max_elements`` logits per chunk (one query block
        when a block's are more).
    """
    B, _, H, D = q.shape
    nqb, nkb = q_offsets.numel() - 1, k_offsets.numel() - 1

    # Queries block-major (a chunk is a few query blocks); keys sample-major, so that a
    # reduction over a key block's samples runs over a strided axis with key blocks contiguous
    # and vectorises across blocks (in a scratch run, the importance's max in bfloat16: 0.09 ms
    # per chunk, against 1.09 ms reducing over 32 adjacent samples).
    q_positions = by_residue(sample_positions(q_offsets, sq), q_sample_stride).reshape(-1)
    k_samples = sample_positions(k_offsets, sk)
    k_positions = (pairs_split(k_samples) if k_pairs_first else k_samples).t().reshape(-1)
    qs = _sampled_queries(q, order, q_positions, scale, matmul_dtype).view(B * H, nqb, sq, D)
    ks = _sampled_rows(k, order, k_positions).to(matmul_dtype).transpose(1, 2)  # [R, D, sk*nkb]
    blocks_per_chunk = max(1, min(nqb, (max_elements or chunk_elements(q)) // (sq * nkb * sk)))
    buffer = torch.empty(blocks_per_chunk * sq, sk * nkb, dtype=matmul_dtype, device=q.device)
    for r in range(B * H):
        for b0 in range(0, nqb, blocks_per_chunk):
            b1 = min(nqb, b0 + blocks_per_chunk)
            logits = torch.mm(qs[r, b0:b1].reshape(-1, D), ks[r], out=buffer[: (b1 - b0) * sq])
            yield r, b0, b1, logits.view(b1 - b0, sq, sk, nkb)


def importance_of_block_max(block_max: torch.Tensor) -> torch.Tensor:
    """Each sampled query's largest logit per key block, ``[..., sq, n_k_blocks]`` ->
    ``[..., n_k_blocks]``, the unnormalised importance: per query block, the largest over its
    sampled queries of ``exp(max logit over the key block's samples - the query's largest
    logit)``."""
    return (block_max - block_max.amax(-1, keepdim=True)).exp().amax(-2)


def importance_reduction(logits: torch.Tensor, work_dtype: torch.dtype) -> torch.Tensor:
    """One chunk of :func:`sampled_logit_chunks` -> ``[b1 - b0, n_k_blocks]`` (``work_dtype``):
    :func:`importance_of_block_max` of its maxima over the key samples."""
    return importance_of_block_max(logits.amax(2).to(work_dtype))  # [blocks, sq, nkb]


def fused_on_cpu(x: torch.Tensor, size: int, fused: bool | None, minimum: int | None = None) -> bool:
    """Whether a step on ``x``'s device runs as a compiled function: ``fused`` if given
    (``True`` raises off the CPU), else on the CPU for calls of at least ``minimum`` elements
    (``size``: a sampled estimate's logits, at least :data:`FUSED_CPU_MIN_LOGITS` by default),
    outside ``torch.compile`` (which fuses the eager operations itself) and unless compiling
    failed before in this process."""
    if fused:
        if x.device.type != "cpu":
            raise ValueError(f"the fused path runs on the CPU; got device {x.device}")
        return True
    minimum = FUSED_CPU_MIN_LOGITS if minimum is None else minimum
    return (fused is None and x.device.type == "cpu" and not torch.compiler.is_compiling() and size >= minimum
            and not _FUSED_FAILED)


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``fn`` through ``torch.compile``, once per process. ``emulate_precision_casts``: inductor
    otherwise computes bfloat16 operations in float32 without rounding their results, and the
    fused path would differ from the eager one (by up to 2**-8 in the budget mode's spread)."""
    return torch.compile(fn, options={"emulate_precision_casts": True})


def fused_or_eager(fn: Callable, *args, fused: bool, forced: bool) -> tuple:
    """``(fn(*args), ran_compiled)``: with ``fused`` through :func:`compiled`, else eagerly. If
    it cannot compile and was not asked for by name (``forced``), eagerly after one warning per
    process, and ``ran_compiled`` is ``False`` so that a caller's next steps do not try again."""
    if fused:
        try:
            return compiled(fn)(*args), True
        except Exception as err:  # inductor's errors have no common type short of Exception
            if forced:
                raise
            _FUSED_FAILED.append(f"{type(err).__name__}: {err}")
            warnings.warn(f"PSA: the fused CPU step {fn.__name__} did not compile ({_FUSED_FAILED[0][:300]}); "
                          "running eagerly instead (same results, slower)", RuntimeWarning, stacklevel=3)
    return fn(*args), False


def reduced_chunks(chunks: Iterator, reduce: Callable, *args, fused: bool, forced: bool) -> Iterator:
    """``(row, b0, b1, reduce(logits, *args))`` for every chunk of :func:`sampled_logit_chunks`:
    with ``fused`` the compiled ``reduce`` (:func:`fused_or_eager`: eager from the first chunk
    it cannot compile, unless ``forced``), else eager torch. One function either way, so the
    two paths give one result up to rounding."""
    for r, b0, b1, logits in chunks:
        result, fused = fused_or_eager(reduce, logits, *args, fused=fused, forced=forced)
        yield r, b0, b1, result


def sampled_importance(
    q: torch.Tensor, k: torch.Tensor, order: BlockOrder, q_offsets: torch.Tensor,
    k_offsets: torch.Tensor, sq: int, sk: int, scale: float, matmul_dtype: torch.dtype,
    kernel: bool | None = None, fused: bool | None = None,
) -> torch.Tensor:
    """``[B, N, heads, D]`` q, k in the original order -> ``[B*heads, n_q_blocks, n_k_blocks]``
    rows summing to 1: per query block and key block, the largest over the block's sampled
    queries of ``exp(max logit over the key block's samples - the query's largest logit)``.
    The logits are ``matmul_dtype``; the rest runs in float32 or float64. On the Triton kernel
    (``kernel``: :func:`estimate_on_kernel`) the logits stay in registers; else torch matmuls
    (:func:`sampled_logit_chunks`), each chunk reduced by :func:`importance_reduction`, eagerly
    or, ``fused`` (:func:`fused_on_cpu`: large calls on the CPU), compiled: equal up to
    rounding."""
    if estimate_on_kernel(q, matmul_dtype, sq, sk, kernel):
        return sampled_stats_on_kernel(q, k, order, q_offsets, k_offsets, sq, sk, scale, matmul_dtype, None)[0]
    B, _, H, _ = q.shape
    nqb, nkb = q_offsets.numel() - 1, k_offsets.numel() - 1
    work_dtype = torch.promote_types(matmul_dtype, torch.float32)
    out = torch.empty(B * H, nqb, nkb, dtype=work_dtype, device=q.device)
    use_fused = fused_on_cpu(q, B * H * nqb * sq * nkb * sk, fused)
    chunks = sampled_logit_chunks(q, k, order, q_offsets, k_offsets, sq, sk, scale, matmul_dtype,
                                  max_elements=CHUNK_ELEMENTS_FUSED if use_fused else None)
    for r, b0, b1, reduced in reduced_chunks(chunks, importance_reduction, work_dtype, fused=use_fused,
                                             forced=bool(fused)):
        out[r, b0:b1] = reduced
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
