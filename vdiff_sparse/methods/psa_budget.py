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

**Estimates** (:func:`logit_spread`). ``S_ij`` is the mean of ``(s_a - s_b)^2`` over consecutive
pairs of key block ``j``'s sampled keys (samples ``2m`` and ``2m + 1``, ``b_k / s`` positions
apart: 4 at the default quarter-block sampling) and every :data:`SPREAD_QUERY_STRIDE`-th sampled
query of query block ``i``; ``Var_ij`` the variance over key block ``j``'s samples of the first
sampled query's logits (it only enters the per-head sum). Neither reads the importance
estimate's logits: ``s_a - s_b = q . (k_a - k_b)`` and ``s_t - mean s = q . (k_t - mean k)``, so
they are one matmul of the spread queries against the key pairs' differences (``s_k / 2`` per
key block) and one of the first sampled query against the block-centred sampled keys (``s_k``
per key block), each followed by one sum of squares. With ``SPREAD_QUERY_STRIDE = 4`` and the
default sampling (``s_q = b_q / 4`` queries, ``s_k = b_k / 4`` keys per block) the spread matmul
has a quarter of the importance estimate's rows and half its columns, ``1/8`` of its
multiply-adds (when ``b_q`` is a multiple of 16 and ``b_k`` of 8; other sizes round the counts),
and the variance's one query per block adds ``4 / b_q`` of them. Neither makes a pass over the
``s_q * s_k`` logits of every block pair, which is the importance estimate's own cost (its
max). The differences are taken in float32 before the matmul (in ``importance_dtype`` on a GPU,
in float32 on the CPU), so no two large rounded logits are subtracted. A key block whose samples are all one position
(a block of one key) has ``S = 0``: pooling it is exact.

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

**Cost of the allocation:** a sort of two moves per (query block, key block) pair, against the
one-per-pair sort of the quantile and threshold modes.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..layout import BlockOrder
from .psa_importance import chunk_elements, sample_positions

#: Which of the importance estimate's sampled query positions measure the logit spread: every
#: this many-th one of a query block (at least one). A block's spread seen from one query is
#: noisy: every 16th (one query per 64-token block) let a very local head pool a block its one
#: query saw as flat, and lose to binary block-sparse by over 3% (``bench/results/
#: psa_budget_stride/``: seeds 0-2 at strides 16 and 4); at 1/8 of the importance estimate's
#: multiply-adds (module docstring).
SPREAD_QUERY_STRIDE = 4

# Pool factors from the coarsest (cheapest) to full resolution.
LEVELS_COARSE_FIRST = (8, 4, 2, 1)


def logit_spread(
    q: torch.Tensor, k: torch.Tensor, order: BlockOrder, q_offsets: torch.Tensor, k_offsets: torch.Tensor,
    sq: int, sk: int, scale: float, matmul_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The budget mode's two logit statistics per block pair (module docstring, *Estimates*).

    Args:
        q, k: ``[B, N, heads, D]`` in the original order; only the sampled tokens are read,
            through ``order``'s reorder, one (batch, head) row at a time.
        order: the plan's block order; ``q_offsets`` / ``k_offsets`` its blocks (plan positions).
        sq, sk: tokens sampled per query / key block, as the importance estimate samples them.
        scale: the logit scale.
        matmul_dtype: operand dtype of the two matmuls off the CPU (the importance estimate's,
            for a GPU's tensor cores). On the CPU they run in float32 (float64 when
            ``matmul_dtype`` is float64): oneDNN's bfloat16 path is slower there for these thin
            ``K = D`` products (in a scratch run on 2 cores, ``[256, 64] x [64, 4096]``: 0.9 ms
            in bfloat16, 0.5 ms in float32; the whole estimate at 16K tokens: 12.1 vs 8.0 ms).

    Returns:
        ``spread`` and ``variance``, ``[B*heads, n_q_blocks, n_k_blocks]``, float32 (float64
        when ``matmul_dtype`` is float64): the mean squared logit difference of consecutive
        sampled keys over every :data:`SPREAD_QUERY_STRIDE`-th sampled query (0 for key
        blocks without two distinct samples, and everywhere when ``sk < 2``), and the variance
        of the first sampled query's logits over the key block's samples.
    """
    B, _, H, D = q.shape
    nqb, nkb = q_offsets.numel() - 1, k_offsets.numel() - 1
    work_dtype = torch.promote_types(matmul_dtype, torch.float32)
    if q.device.type == "cpu":
        matmul_dtype = work_dtype
    query_samples = sample_positions(q_offsets, sq)[:, ::SPREAD_QUERY_STRIDE]  # [nqb, q']
    spread_queries = query_samples.shape[1]
    # Keys sample-major (sample, key block), so that the sums of squares reduce over strided
    # axes with key blocks contiguous and vectorise across blocks (as the importance estimate's
    # max does).
    key_samples = sample_positions(k_offsets, sk)  # [nkb, sk]
    q_tokens, k_tokens = query_samples.reshape(-1), key_samples.t().reshape(-1)
    if order.perm is not None:
        q_tokens, k_tokens = order.perm[q_tokens], order.perm[k_tokens]
    pairs = sk // 2
    # A pair of samples at one position (a block shorter than its samples) has a zero difference
    # and says nothing: each block averages its real pairs only (none: S = 0, a block of one key).
    real_pairs = (key_samples[:, 0 : 2 * pairs : 2] != key_samples[:, 1 : 2 * pairs : 2]).sum(1)  # [nkb]
    pair_norm = (real_pairs.clamp(min=1) * spread_queries).to(work_dtype)
    spread = torch.zeros(B * H, nqb, nkb, dtype=work_dtype, device=q.device)
    variance = torch.empty_like(spread)
    limit = chunk_elements(q)

    def squares(out, queries, columns):  # out[i, j] = sum over queries x columns of (query . key)^2
        rows, per_block = queries.shape[1], columns.shape[0]
        queries = queries.to(matmul_dtype)
        columns = columns.reshape(-1, D).t().to(matmul_dtype)  # [D, per_block*nkb]
        blocks_per_chunk = max(1, min(nqb, limit // (rows * nkb * per_block)))
        for b0 in range(0, nqb, blocks_per_chunk):
            b1 = min(nqb, b0 + blocks_per_chunk)
            logits = torch.mm(queries[b0:b1].reshape(-1, D), columns).view(b1 - b0, rows * per_block, nkb)
            # square + sum: vector_norm over a strided axis is ~30x slower on the CPU.
            out[b0:b1] = (logits * logits).sum(1, dtype=work_dtype)

    for b in range(B):
        for h in range(H):  # one row at a time: its sampled keys are all that is gathered
            r = b * H + h
            queries = (q[b, q_tokens, h].to(work_dtype) * scale).view(nqb, spread_queries, D)
            keys = k[b, k_tokens, h].to(work_dtype).view(sk, nkb, D)
            if pairs:
                squares(spread[r], queries, keys[0 : 2 * pairs : 2] - keys[1 : 2 * pairs : 2])  # [pairs, nkb, D]
                spread[r].div_(pair_norm)
            squares(variance[r], queries[:, :1], keys - keys.mean(0))  # first query; centred keys
            variance[r].div_(sk)
    return spread, variance


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
    kept_mass = torch.exp(-spread.float().clamp(min=0) * lost / 4)
    return 1 - kept_mass * (1 - rho.float() * lost).clamp(min=0)


def _coarse_and_fine(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarsest and finest pool factor ``allowed`` (``[..., 4]`` over 8, 4, 2, 1) permits, on
    its own (usually broadcast) shape; ``0`` where none is."""
    coarse = torch.zeros(allowed.shape[:-1], dtype=torch.long, device=allowed.device)
    fine = torch.zeros_like(coarse)
    for i, p in enumerate(LEVELS_COARSE_FIRST):
        coarse = torch.where(allowed[..., i] & (coarse == 0), p, coarse)
        fine = torch.where(allowed[..., i], p, fine)
    return coarse, fine


def allocate_budget(
    importance: torch.Tensor,
    distortion: Callable[[torch.Tensor], torch.Tensor],
    k_sizes: torch.Tensor,
    budget: float,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """Pool factor of every key block of every row under a per-row key budget.

    Args:
        importance: ``[..., n_k_blocks]`` non-negative importance, one row per query block.
        distortion: ``x -> e``: the fraction of each block's weight lost at cost fraction
            ``x = 1/p`` (``x`` a tensor broadcastable to ``importance``; the result has its
            shape), 0 at ``x = 1``, at most 1, and concave and non-increasing in ``x``, so a
            block's hull is skipping, its coarsest and its finest allowed level.
        k_sizes: ``[n_k_blocks]`` keys per block.
        budget: keys (pooled keys count ``1/p``) each row may spend.
        allowed: bool, broadcastable to ``[..., n_k_blocks, 4]``: whether a block may take
            pool factor 8, 4, 2, 1 (skipping it always is).

    Returns:
        ``[..., n_k_blocks]`` int64, ``p`` in {1, 2, 4, 8} or ``0`` for skipped blocks.
    """
    shape = importance.shape
    coarse, fine = _coarse_and_fine(allowed)
    x_coarse = 1 / coarse.clamp(min=1).float()  # cost fractions
    x_fine = 1 / fine.clamp(min=1).float()
    e_coarse = distortion(x_coarse)
    e_fine = distortion(x_fine)  # 0 where the finest level is 1 (x = 1)
    # Slopes (distortion removed per cost fraction) of skip -> coarse, coarse -> fine and
    # skip -> fine. The coarse level is on the hull iff the first beats the second (it lies
    # strictly below the chord from skipping to the fine level); then the block has two moves,
    # with falling slopes, else one.
    to_coarse = (1 - e_coarse) / x_coarse
    coarse_to_fine = (e_coarse - e_fine) / (x_fine - x_coarse).clamp(min=1e-6)
    to_fine = (1 - e_fine) / x_fine
    two = (coarse != fine) & (to_coarse > coarse_to_fine)
    some = coarse > 0
    weight = importance.float()
    efficiency = torch.stack([
        torch.where(some, weight * torch.where(two, to_coarse, to_fine), -1.0),
        torch.where(two, weight * coarse_to_fine, -1.0),
    ], -1).view(-1, 2 * shape[-1])
    sizes = k_sizes.float()
    cost = torch.stack([
        sizes * torch.where(two, x_coarse, x_fine), sizes * torch.where(two, x_fine - x_coarse, 0.0),
    ], -1).expand(*shape, 2).reshape(-1, 2 * shape[-1])
    # Block-major flattening + stable sort: ties go by key block, then first move first.
    order = efficiency.argsort(dim=-1, descending=True, stable=True)
    sorted_cost = cost.gather(-1, order).double()
    spent_before = sorted_cost.cumsum(-1) - sorted_cost
    # Slack against rounding: a row that spent its budget exactly takes nothing more.
    limit = budget - 1e-9 * max(1.0, budget)
    taken = torch.zeros_like(order, dtype=torch.bool).scatter_(-1, order, spent_before < limit)
    taken = (taken & (efficiency >= 0)).view(*shape, 2)
    # Moves are taken in chain order: the level is that of the last one taken.
    reached_coarse = torch.where(two, coarse, fine)
    return torch.where(taken[..., 1], fine, torch.where(taken[..., 0], reached_coarse, 0))


__all__ = ["LEVELS_COARSE_FIRST", "SPREAD_QUERY_STRIDE", "allocate_budget", "head_variation_ratio", "logit_spread",
           "pooling_distortion"]
