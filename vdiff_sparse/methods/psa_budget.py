"""PSA's budget mode: spend a FLOP-equivalent density on each query block's key blocks where it
lowers the estimated output error most, across full resolution, ×2, ×4, ×8 pooling and skipping.

Per batch, head and query block ``i`` (one *row*), over its key blocks ``j`` of ``n_j`` keys:

**Cost.** Key block ``j`` at pool factor ``p`` costs ``n_j / p`` keys (pooled keys count
``1/p``, as :meth:`~vdiff_sparse.plan.AttentionPlan.density` counts them), ``0`` when skipped.
Each row may spend ``density * N`` keys, so the plan's FLOP-equivalent density is ``density``
(a little above: see *Allocation*).

**Error model.** The estimated error of a row is ``sum_j w_ij * e_j(p_j)``: ``w_ij`` the
sampled importance (the row sums to 1), ``e_j(p)`` the *distortion*, the fraction of the
block's weight lost at pool factor ``p``: 1 when skipped, 0 in full. A pooled level keeps a
part of the block's attention mass and, of that, a part of its variation (``x = 1/p``, so
``u = 1 - x`` is the share of a group that is not its mean):

* *Mass.* For a query ``q`` and a pool group of ``p`` keys with logits ``s_t = scale * q . k_t``
  the pooled key (logit ``+ ln p``) carries ``p * exp(mean s)`` of attention where the keys
  carry ``sum exp(s_t)``; by Jensen's inequality less, and for logits spread around their mean
  with variance ``V`` like a normal distribution the ratio is ``exp(-V / 2)``. The variance of
  ``p`` values is ``(1 / p^2) * sum over pairs (s_t - s_u)^2``; taking the expected squared
  difference ``S_ij`` of two keys of a group the same at any distance inside it gives
  ``V = S_ij u / 2``: pooling keeps ``exp(-S_ij u / 4)`` of the mass.
* *Variation.* The attention output is made of the variation of the logits over the keys as
  much as of their mass, and pooling keeps only the part between groups: the within-group
  variance ``S_ij u / 2`` over the block's variance ``Var_ij``, ``rho u`` with
  ``rho = S / (2 Var)``, is lost. Keys no more alike within a group than across the block
  ("white" keys, ``rho = 1``) keep ``x`` of the block for ``x`` of its cost, no better than
  keeping blocks in full. ``rho`` is one number per batch and head,
  ``sum_ij w_ij S_ij / sum_ij w_ij 2 Var_ij``: per block it is too noisy to act on.

So ``e_j(p) = 1 - exp(-S_ij u / 4) * max(0, 1 - rho u)``, a concave function of ``x``.

**Estimates** (:func:`sampled_estimates`). ``S_ij`` is the mean of ``(s_a - s_b)^2`` over
consecutive pairs of key block ``j``'s sampled keys (samples ``2m`` and ``2m + 1``, ``b_k / s``
positions apart: 4 at the default quarter-block sampling) and every
:data:`SPREAD_QUERY_STRIDE`-th sampled query of query block ``i``; ``Var_ij`` the variance over
key block ``j``'s samples of the first sampled query's logits (it only enters the per-head sum).
Both are read off the importance estimate's own sampled logits, in the same pass: no
multiply-add is added. On a GPU the Triton kernel (:mod:`vdiff_sparse.kernels.estimate`)
computes each ``[s_q, s_k]`` tile of logits in registers and reduces it there to the
importance's maxima, the spread's sum of squared pair differences and the variance: the budget
mode's statistics cost a subtraction and two sums per tile, and no memory traffic but their
outputs (``2`` floats per block pair, against the maxima's ``s_q``). On the CPU, torch matmuls
write each chunk of logits to memory. Eager torch then reads them once for the importance and
again for the statistics (a quarter of them for the spread, one query's for the variance): on 2
cores at N = 16K, 4 heads, D = 64 the estimate takes 1.4x the importance estimate alone
(67.6 vs 48.2 ms with 64-token blocks, ``bench/results/psa_planning_cpu.json``). Calls of at
least :data:`~vdiff_sparse.methods.psa_importance.FUSED_CPU_MIN_LOGITS` sampled logits reduce
each chunk in one compiled function instead (:func:`chunk_statistics` through
``torch.compile``; the importance estimate alone does the same), whose generated C++ runs
the statistics' loops in the same call, right after the importance's loop over the chunk:
then the estimate takes 1.10x the importance estimate (34.4 vs 31.3 ms there), the spread's
quarter of the logits being read again. Smaller calls, where compiling would cost more than it
saves, stay eager. The logits are in the importance's ``matmul_dtype``: bfloat16 operands
on a GPU (float32 accumulation in the kernel), so a logit is off by about ``2**-8`` of
``scale |q| |k|`` and ``sqrt(S)`` by about twice that (tested). A key block whose samples are
all one position (a block of one key) has ``S = 0`` up to rounding: pooling it is exact.

**Allocation** (:func:`allocate_budget`). The errors and costs of a block's options are the
points ``(x, e)`` and ``(0, 1)`` for skipping, scaled by ``w_ij`` and ``n_j``, so its useful
options are the lower convex hull of those points; a pooled level strictly below the hull is
used, one on or above it never is. ``e`` being concave in ``x``, the hull is skipping, the
coarsest allowed level (if it lies strictly below the chord from skipping to the finest) and
the finest allowed level: with every level allowed a block is skipped, pooled ×8 or kept in
full. A level with ``e(p) >= 1 - 1/p`` lies on or above the chord from skipping to full
resolution; when every pooled level of every block of a row is there (white keys, or spreads
``S >= 4 p ln(p) / (p - 1)``: 5.5, 7.4, 9.5 for ``p = 2, 4, 8``), each block's hull is
skip-or-full and the row is binary block-sparse at the same budget, blocks taken in order of
importance. Moving along a block's hull is a *move* with a cost and an error drop; its
efficiency (drop per key) is ``w_ij / b_k`` times the hull segment's slope. A row takes moves in
decreasing efficiency (ties: key block order, then along the hull) while what it has spent is
below its budget, so it spends at least the budget (unless every block is at its finest allowed
level) and at most one move, less than one key block, more. This greedy is the optimum of the
relaxed problem where a block may sit between two hull points.

**How it runs.** One sort per row, of one int64 key per move (:func:`move_keys`): the float32
efficiency's bits on top (they order like the non-negative floats), the move's index below them
(ties: key block, then first move), its cost in eighths of a key in the lowest bits. The keys
are unique, so any sort gives the greedy's order, and the cost rides along: the sorted keys
alone give each move's running cost and the last move taken (:func:`levels_of_prefix`). On the
CPU numpy sorts them (:func:`sorted_keys`: its vectorised sort, single-threaded where torch's
uses every core, is timed against torch's in ``bench/psa_planning.py``), and large calls
(:data:`FUSED_CPU_MIN_MOVES`) run the elementwise halves before and after the sort compiled,
one pass each. No bool tensor enters or leaves those compiled halves: inductor's CPU code moves
bools one value at a time. On a GPU the halves run eagerly (a few dozen
small kernels) around one segmented sort.

**Cost of the allocation:** a sort of two int64 keys per (query block, key block) pair and an
elementwise pass before and after it, against the quantile and threshold modes' stable sort of
one float64 per pair: on 2 CPU cores at N = 16K, 4 heads, 7.1 ms against the quantile mode's
6.1 ms with 64-token blocks and 2.7 against 1.5 ms with 128-token ones (numpy's sort 3.0 and
0.6 ms of them, torch's 8.6 and 2.0 ms); with the estimate, budget mode's planning takes 1.16x
and 1.12x the quantile mode's there
(``bench/results/psa_planning_cpu.json``; the README's paragraph on budget mode has the rest).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..layout import BlockOrder
from .psa_importance import (
    CHUNK_ELEMENTS_FUSED,
    estimate_on_kernel,
    fused_on_cpu,
    fused_or_eager,
    importance_reduction,
    reduced_chunks,
    sample_positions,
    sampled_logit_chunks,
    sampled_stats_on_kernel,
)

#: Which of the importance estimate's sampled query positions measure the logit spread: every
#: this many-th one of a query block (at least one). A block's spread seen from one query is
#: noisy: every 16th (one query per 64-token block) let a very local head pool a block its one
#: query saw as flat, and lose to binary block-sparse by over 3% (``bench/results/
#: psa_budget_stride/``: seeds 0-2 at strides 16 and 4). Read off the importance estimate's
#: logits, the spread adds no multiply-add; on the CPU its passes read a quarter of them.
SPREAD_QUERY_STRIDE = 4

#: On the CPU, an allocation of at least this many moves (two per block pair: 2^19 at 16K
#: tokens, 4 heads, 64-token blocks) runs its two halves compiled (inductor's C++ fuses each
#: half's elementwise passes into one), the sort between them by numpy. Compiling takes a few
#: seconds once per process (again once the shapes vary), more than a smaller call saves.
FUSED_CPU_MIN_MOVES = 2**17

# Pool factors from the coarsest (cheapest) to full resolution.
LEVELS_COARSE_FIRST = (8, 4, 2, 1)


def chunk_statistics(
    logits: torch.Tensor, q_spread: int, pairs: int, work_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of :func:`~vdiff_sparse.methods.psa_importance.sampled_logit_chunks` in the
    budget mode's sample order, ``[blocks, sq, sk, nkb]`` -> the unnormalised importance, the
    spread's sum of squared pair differences over the first ``q_spread`` query samples and the
    first query's variance, each ``[blocks, nkb]`` in ``work_dtype`` (the spread ``0`` without
    pairs): :func:`sampled_estimates`' reduction, eager or through ``torch.compile``."""
    picked = logits[:, :q_spread]
    # In the logits' dtype: bfloat16 differences are rounded (the fused path emulates it).
    difference = (picked[:, :, :pairs] - picked[:, :, pairs : 2 * pairs]).to(work_dtype)
    first = logits[:, 0].to(work_dtype)
    variance = (first - first.mean(1, keepdim=True)).square().mean(1)
    return importance_reduction(logits, work_dtype), difference.square().sum((1, 2)), variance


def sampled_estimates(
    q: torch.Tensor, k: torch.Tensor, order: BlockOrder, q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    sq: int, sk: int, scale: float, matmul_dtype: torch.dtype, kernel: bool | None = None,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The importance estimate and the budget mode's two logit statistics per block pair, from
    one pass over the sampled logits (module docstring, *Estimates*): on the Triton kernel
    (``kernel``: :func:`~vdiff_sparse.methods.psa_importance.estimate_on_kernel`, a GPU's
    default) in registers, else from torch matmuls' logits, a chunk at a time, each reduced
    eagerly or (``fused``: :func:`~vdiff_sparse.methods.psa_importance.fused_on_cpu`, large
    calls on the CPU, with at least one key pair) by the compiled :func:`chunk_statistics`.

    Args:
        q, k: ``[B, N, heads, D]`` in the original order; only the sampled tokens are read,
            through ``order``'s reorder, one (batch, head) row at a time.
        order: the plan's block order; ``q_offsets`` / ``k_offsets`` its blocks (plan positions).
        sq, sk: tokens sampled per query / key block.
        scale: the logit scale.
        matmul_dtype: the logits' dtype (the importance estimate's).

    Returns:
        ``importance``, ``spread`` and ``variance``, ``[B*heads, n_q_blocks, n_k_blocks]``,
        float32 (float64 when ``matmul_dtype`` is): :func:`~vdiff_sparse.methods.
        psa_importance.sampled_importance`; the mean squared logit difference of consecutive
        sampled keys over every :data:`SPREAD_QUERY_STRIDE`-th sampled query (for key blocks
        without two distinct samples the difference of two logits of one key, 0 up to the
        matmul's rounding; 0 everywhere when ``sk < 2``); the variance of the first sampled
        query's logits over the key block's samples. Both from logits in ``matmul_dtype`` on
        the torch path (bfloat16 rounds each by about ``2**-8`` of ``scale |q| |k|``) and from
        float32-accumulated ones on the kernel: equal up to that rounding.
    """
    B, _, H, _ = q.shape
    nqb, nkb = q_offsets.numel() - 1, k_offsets.numel() - 1
    work_dtype = torch.promote_types(matmul_dtype, torch.float32)
    pairs = sk // 2
    # Sample orders that make what the spread reads contiguous: the spread queries first
    # (query sample 0, the variance's, leads), the pairs' first keys, then their second ones.
    # The importance's max and the variance do not depend on the order.
    q_spread = len(range(0, sq, SPREAD_QUERY_STRIDE))
    # A pair of samples at one position (a block shorter than its samples) says nothing: each
    # block averages its real pairs only (none: S = 0, a block of one key). Its difference is
    # that of two logits of one key, zero up to the matmul's rounding, so it is not masked.
    key_samples = sample_positions(k_offsets, sk)
    real_pairs = (key_samples[:, 0 : 2 * pairs : 2] != key_samples[:, 1 : 2 * pairs : 2]).sum(1)
    pair_norm = (real_pairs.clamp(min=1) * q_spread).to(work_dtype)
    if estimate_on_kernel(q, matmul_dtype, sq, sk, kernel):
        importance, spread, variance = sampled_stats_on_kernel(q, k, order, q_offsets, k_offsets, sq, sk, scale,
                                                               matmul_dtype, SPREAD_QUERY_STRIDE)
        return importance, spread / pair_norm, variance
    importance = torch.empty(B * H, nqb, nkb, dtype=work_dtype, device=q.device)
    spread = torch.empty_like(importance)
    variance = torch.empty_like(importance)
    if fused and pairs < 1:
        raise ValueError(f"the fused estimate needs at least 2 key samples per block; got {sk}")
    use_fused = pairs >= 1 and fused_on_cpu(q, B * H * nqb * sq * nkb * sk, fused)
    chunks = sampled_logit_chunks(q, k, order, q_offsets, k_offsets, sq, sk, scale, matmul_dtype,
                                  q_sample_stride=SPREAD_QUERY_STRIDE, k_pairs_first=True,
                                  max_elements=CHUNK_ELEMENTS_FUSED if use_fused else None)
    for r, b0, b1, stats in reduced_chunks(chunks, chunk_statistics, q_spread, pairs, work_dtype, fused=use_fused,
                                           forced=bool(fused)):
        importance[r, b0:b1], spread[r, b0:b1], variance[r, b0:b1] = stats
    spread /= pair_norm
    return importance / importance.sum(-1, keepdim=True), spread, variance


def head_variation_ratio(importance: torch.Tensor, spread: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """``rho = sum w S / sum w 2 Var`` over the last two dims (query and key blocks) of each
    row group, ``[..., 1, 1]``; ``0`` where the sampled logits do not vary at all."""
    num = (importance * spread).sum((-2, -1), keepdim=True)
    den = (importance * 2 * variance).sum((-2, -1), keepdim=True)
    return torch.where(den > 0, num / den.clamp(min=1e-30), 0.0)


def pooling_distortion(spread: torch.Tensor, rho: torch.Tensor, x) -> torch.Tensor:
    """``e = 1 - exp(-S (1 - x) / 4) * max(0, 1 - rho (1 - x))`` at cost fraction ``x = 1/p``
    (module docstring), elementwise, float32: 0 at ``x = 1``, concave in ``x``."""
    lost = 1 - torch.as_tensor(x, dtype=torch.float32)
    # Nothing is lost at x = 1, even where a spread or rho is infinite (inf * 0 would be NaN).
    kept_mass = torch.exp(-torch.where(lost > 0, spread.float().clamp(min=0) * lost, 0.0) / 4)
    return 1 - kept_mass * (1 - torch.where(lost > 0, rho.float() * lost, 0.0)).clamp(min=0)


def _coarse_and_fine(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarsest and finest pool factor ``allowed`` (``[..., 4]`` over 8, 4, 2, 1) permits, on
    its own (usually broadcast) shape; ``0`` where none is."""
    coarse = torch.zeros(allowed.shape[:-1], dtype=torch.long, device=allowed.device)
    fine = torch.zeros_like(coarse)
    for i, p in enumerate(LEVELS_COARSE_FIRST):
        coarse = torch.where(allowed[..., i] & (coarse == 0), p, coarse)
        fine = torch.where(allowed[..., i], p, fine)
    return coarse, fine


def move_keys(
    importance: torch.Tensor, spread: torch.Tensor, rho: torch.Tensor, k_sizes: torch.Tensor,
    coarse: torch.Tensor, fine: torch.Tensor, cost_bits: int,
) -> torch.Tensor:
    """Every row's moves (module docstring, *Allocation*) as sort keys: the first half of
    :func:`allocate_budget`, elementwise, eager or through ``torch.compile``.

    Args:
        importance, spread: ``[rows, n_k_blocks]``; ``rho`` ``[rows, 1]`` (or 0-d).
        k_sizes: ``[n_k_blocks]`` keys per block, at least 1.
        coarse, fine: coarsest and finest allowed pool factor per block (``0``: none),
            ``[rows, n_k_blocks]`` or 0-d.
        cost_bits: bits of a key that hold the move's cost in eighths of a key (``8 *
            max(k_sizes) < 2**cost_bits``), below ``32 - cost_bits`` bits of index.

    Returns:
        int64 ``[rows, 2 * n_k_blocks]``, unique keys whose ascending order is the
        greedy's (moves of the first kind, from skipping, in the first half, ``m = 0``; those
        on to the finest level in the second, ``m = 1``). Bits 32-62: the move's efficiency,
        descending (from its float32 bits, which order like the non-negative floats they
        are), moves that do not exist last; below them the move's index ``2 j + m`` (``j`` the
        key block: ties go by key block, then first move first); the lowest ``cost_bits``: its
        cost in eighths of a key (a block of ``n`` keys costs ``n / p``: ``n * 8 / p`` eighths,
        an integer), which for a move on from the coarse level is not 0, and 0 for the second
        move of a block that has one move. (No bool tensor goes in or out: inductor's CPU code
        moves bools a value at a time.)
    """
    x_coarse = 1 / coarse.clamp(min=1).float()  # cost fractions
    x_fine = 1 / fine.clamp(min=1).float()
    e_coarse = pooling_distortion(spread, rho, x_coarse)
    e_fine = pooling_distortion(spread, rho, x_fine)  # 0 where the finest level is 1 (x = 1)
    # Slopes (distortion removed per cost fraction) of skip -> coarse, coarse -> fine and
    # skip -> fine. The coarse level is on the hull iff the first beats the second (it lies
    # strictly below the chord from skipping to the fine level); then the block has two moves,
    # with falling slopes, else one.
    to_coarse = (1 - e_coarse) / x_coarse
    coarse_to_fine = (e_coarse - e_fine) / (x_fine - x_coarse).clamp(min=1e-6)
    to_fine = (1 - e_fine) / x_fine
    two = (coarse != fine) & (to_coarse > coarse_to_fine)
    weight = importance.float()
    first = torch.where(coarse > 0, weight * torch.where(two, to_coarse, to_fine), -1.0)
    second = torch.where(two, weight * coarse_to_fine, -1.0)
    first_cost = k_sizes * (8 // torch.where(two, coarse, fine).clamp(min=1))
    second_cost = torch.where(two, k_sizes * (8 // fine.clamp(min=1)) - first_cost, 0)
    block = torch.arange(importance.shape[-1], device=importance.device)

    def keys(efficiency, cost, m):
        # A move with a negative efficiency is never taken (nor a rounding-negative one); the
        # others' bits + 1, so that 0 is left for them (+ 0.0 makes -0.0 +0.0).
        rank = torch.where(efficiency >= 0, (efficiency + 0.0).view(torch.int32).long() + 1, 0)
        return ((NO_MOVE_RANK - rank) << 32) | ((2 * block + m) << cost_bits) | cost

    return torch.cat([keys(first, first_cost, 0), keys(second, second_cost, 1)], -1)


#: Bits 32-62 of the key (:func:`move_keys`) of a move that does not exist: every real move's
#: are lower.
NO_MOVE_RANK = 2**31 - 1


def sorted_keys(key: torch.Tensor) -> torch.Tensor:
    """``key`` sorted along its last dim. On the CPU by numpy, whose vectorised sort (AVX-512 or
    AVX2 where the CPU has them) beats torch's on short rows (``bench/psa_planning.py`` times
    both); keys are unique, so every sort gives this one order."""
    if key.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.from_numpy(np.sort(key.numpy(), axis=-1))
    return key.sort(dim=-1).values


def levels_of_prefix(
    ordered: torch.Tensor, key: torch.Tensor, limit: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor,
    cost_bits: int,
) -> torch.Tensor:
    """The second half of :func:`allocate_budget`: each row takes its moves in ``ordered``
    (:func:`sorted_keys` of ``key``) while what it spent before a move is below ``limit`` (a
    0-d float64 tensor, in eighths of a key), and each block gets the level of its last move
    taken, ``[rows, n_k_blocks]`` int64: the finest after the second; after the first the
    coarse one if the block has a second move (one that costs something), else the finest.
    Costs are integers: their sums are exact."""
    cost_mask = (1 << cost_bits) - 1
    spent = ordered & cost_mask
    spent_before = spent.cumsum(-1) - spent
    real_moves = (key < (NO_MOVE_RANK << 32)).sum(-1, keepdim=True)  # they come first
    taken_count = torch.minimum((spent_before < limit).sum(-1, keepdim=True), real_moves)
    last_taken = ordered.gather(-1, (taken_count - 1).clamp(min=0))
    taken = (key <= last_taken) & (taken_count > 0)
    first_taken, second_taken = taken.chunk(2, -1)
    reached = torch.where((key[..., key.shape[-1] // 2:] & cost_mask) != 0, coarse, fine)
    return torch.where(second_taken, fine, torch.where(first_taken, reached, 0))


def allocate_budget(
    importance: torch.Tensor,
    spread: torch.Tensor,
    rho: torch.Tensor,
    k_sizes: torch.Tensor,
    budget: float,
    allowed: torch.Tensor,
    fused: bool | None = None,
    k_block_max: int | None = None,
) -> torch.Tensor:
    """Pool factor of every key block of every row under a per-row key budget, the distortion
    of pool factor ``p`` being :func:`pooling_distortion` ``(spread, rho, 1 / p)``.

    Args:
        importance: ``[..., n_k_blocks]`` non-negative importance, one row per query block (a
            NaN makes the block's moves count as moves that do not exist).
        spread: the blocks' mean squared logit difference, broadcastable to ``importance``.
        rho: the variation ratio of each row (:func:`head_variation_ratio`), broadcastable to
            ``[..., 1]``.
        k_sizes: ``[n_k_blocks]`` integer keys per block, each at least 1.
        budget: keys (pooled keys count ``1/p``) each row may spend (``inf``: every move).
        allowed: bool, broadcastable to ``[..., n_k_blocks, 4]``: whether a block may take
            pool factor 8, 4, 2, 1 (skipping it always is).
        fused: run both halves (:func:`move_keys`, :func:`levels_of_prefix`) compiled (``True``,
            CPU only), eagerly (``False``), or compiled on the CPU from
            :data:`FUSED_CPU_MIN_MOVES` moves (``None``). One result either way; the sort
            between them is :func:`sorted_keys`.
        k_block_max: the largest of ``k_sizes`` (``plan_psa`` passes its ``block_k``), which
            sizes the keys' cost bits; ``None`` reads it off ``k_sizes`` (on a GPU, a wait for
            the device; under ``torch.compile``, a graph break).

    Returns:
        ``[..., n_k_blocks]`` int64, ``p`` in {1, 2, 4, 8} or ``0`` for skipped blocks.

    Raises:
        TypeError: ``k_sizes`` not integers. ValueError: a NaN ``budget``; blocks too large for
        the keys' cost bits (``8 * k_block_max < 2**(32 - bits of 2 * n_k_blocks - 1)``: uniform
        blocks fit for any total below 2^26 keys); on the CPU, where reading them is free, sizes
        below 1 or above ``k_block_max``.
    """
    shape, nkb = importance.shape, importance.shape[-1]
    if k_sizes.dtype.is_floating_point or k_sizes.dtype.is_complex or k_sizes.dtype == torch.bool:
        raise TypeError(f"k_sizes must be an integer tensor of keys per block; got {k_sizes.dtype}")
    if math.isnan(budget):
        raise ValueError("budget must be a number of keys (inf for every move); got nan")
    if nkb == 0:
        return torch.zeros(shape, dtype=torch.long, device=importance.device)
    if k_sizes.device.type == "cpu" and not torch.compiler.is_compiling():
        smallest, largest = int(k_sizes.min()), int(k_sizes.max())
        if smallest < 1 or (k_block_max is not None and largest > k_block_max):
            raise ValueError(f"allocate_budget needs key blocks of 1 to k_block_max={k_block_max} keys; got sizes "
                             f"from {smallest} to {largest}")
        k_block_max = largest if k_block_max is None else k_block_max
    elif k_block_max is None:
        k_block_max = int(k_sizes.max())
    # The low 32 bits of a key: the move's index, then its cost in eighths of a key.
    cost_bits = 32 - (2 * nkb - 1).bit_length()
    if 8 * k_block_max >= 2**cost_bits:
        raise ValueError(f"allocate_budget counts a move's cost in {cost_bits} bits with {nkb} key blocks: blocks of "
                         f"at most {2**cost_bits // 8 - 1} keys; got k_block_max={k_block_max}")

    def rows(x: torch.Tensor) -> torch.Tensor:  # [rows, last dim] (0-d stays 0-d)
        return x if x.dim() == 0 else x.expand(*shape[:-1], x.shape[-1]).reshape(-1, x.shape[-1])

    coarse, fine = (rows(level) for level in _coarse_and_fine(allowed))
    use_fused = fused_on_cpu(importance, 2 * importance.numel(), fused, minimum=FUSED_CPU_MIN_MOVES)
    key, use_fused = fused_or_eager(
        move_keys, importance.reshape(-1, nkb), rows(spread.expand(shape)), rows(rho),
        k_sizes, coarse, fine, cost_bits, fused=use_fused, forced=bool(fused))
    # Slack against rounding: a row that spent its budget exactly takes nothing more. A tensor,
    # so that a compiled function is not specialised on its value.
    limit = budget - 1e-9 * max(1.0, budget) if math.isfinite(budget) else budget
    limit = torch.full((), 8 * limit, dtype=torch.float64, device=importance.device)
    levels, _ = fused_or_eager(levels_of_prefix, sorted_keys(key), key, limit, coarse, fine, cost_bits,
                               fused=use_fused, forced=bool(fused))
    return levels.view(shape)


__all__ = ["FUSED_CPU_MIN_MOVES", "LEVELS_COARSE_FIRST", "SPREAD_QUERY_STRIDE", "allocate_budget", "chunk_statistics",
           "head_variation_ratio", "levels_of_prefix", "move_keys", "pooling_distortion", "sampled_estimates",
           "sorted_keys"]
