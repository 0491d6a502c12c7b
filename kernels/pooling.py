"""Pooled key/value pyramids for PSA levels, and the per-block row tables of the pyramid.

A key block of ``s`` tokens seen at pool factor ``p`` becomes ``ceil(s / p)`` pooled keys: the
means of ``p`` consecutive plan positions from the block start (the last group may be shorter).
All pooled blocks of all levels are stacked after the full-resolution keys in one tensor
``[B, N + M_2 + M_4 + M_8, heads, D]``, so the attention kernels read every entry from one
pointer and a row range. The pooling is a fused torch expression (``p`` strided gathers and a
weighted sum, or a reshape-mean when every block is a multiple of ``p``), differentiable by
autograd: gradients of pooled rows reach the un-pooled keys evenly spread over each group.

The number of pooled rows of each level is a host number the caller gives (the plan's
:class:`~vdiff_sparse.plan.PlanFacts`), so pooling reads nothing back from the device.
"""

from __future__ import annotations

import torch

from vdiff_sparse.plan import LEVELS


def pool_groups(k_offsets: torch.Tensor, p: int, rows: int):
    """The ``rows`` groups of ``p`` consecutive positions inside each key block.

    Returns:
        ``(start, count, per_block)``: ``[M]`` first plan position and number of tokens of each
        group, and ``[n_k_blocks]`` groups per block.
    """
    sizes = k_offsets.diff()
    per_block = (sizes + p - 1) // p
    block = torch.repeat_interleave(torch.arange(sizes.numel(), device=sizes.device), per_block, output_size=rows)
    first_group = torch.cumsum(per_block, 0) - per_block
    within = torch.arange(block.numel(), device=sizes.device) - first_group[block]
    start = k_offsets[:-1][block] + within * p
    count = torch.clamp(sizes[block] - within * p, max=p)
    return start, count, per_block


def pool(x: torch.Tensor, k_offsets: torch.Tensor, p: int, rows: int) -> torch.Tensor:
    """Mean-pool ``x`` ``[B, N, heads, D]`` in groups of ``p`` within each key block.

    Returns ``[B, rows, heads, D]`` (``rows``: the number of groups, ``sum(ceil(size / p))``
    over the blocks; in block order) in ``x``'s dtype, summed in float32.
    """
    B, N, H, D = x.shape
    if rows * p == N:
        # Every block is a multiple of p (else it would have a short group, and rows * p > N):
        # blocks are contiguous and tile the sequence, so the groups do too.
        return x.unflatten(1, (N // p, p)).float().mean(2).to(x.dtype)
    start, count, _ = pool_groups(k_offsets, p, rows)
    last = x.shape[1] - 1
    inv = 1.0 / count.float()
    acc = None
    for r in range(p):
        # Rows past a short group's end are clamped in range and weighted 0.
        w = torch.where(r < count, inv, 0.0)[None, :, None, None]
        term = x.index_select(1, torch.clamp(start + r, max=last)).float() * w
        acc = term if acc is None else acc + term
    return acc.to(x.dtype)


def pyramid_rows(k_offsets: torch.Tensor, levels: tuple[int, ...], num_keys: int) -> torch.Tensor:
    """Where each (level, key block) sits in the stacked keys of :func:`pyramid`.

    Args:
        k_offsets: ``[n_k_blocks + 1]`` key block boundaries.
        levels: pool factors stacked (1 is always first, as the keys themselves).
        num_keys: rows of the full-resolution keys (``k_offsets[-1]``).

    Returns:
        ``[len(LEVELS), n_k_blocks, 2]`` int64: first row and number of rows; levels not in
        ``levels`` have no rows.
    """
    sizes = k_offsets.diff()
    rows = torch.zeros(len(LEVELS), sizes.numel(), 2, dtype=torch.int64, device=k_offsets.device)
    rows[0, :, 0] = k_offsets[:-1]
    rows[0, :, 1] = sizes
    base = torch.zeros((), dtype=torch.int64, device=k_offsets.device) + num_keys
    for li, p in enumerate(LEVELS):
        if p == 1 or p not in levels:
            continue
        per_block = (sizes + p - 1) // p
        ends = torch.cumsum(per_block, 0)
        rows[li, :, 0] = base + ends - per_block
        rows[li, :, 1] = per_block
        base = base + ends[-1]
    return rows


def pyramid(k: torch.Tensor, v: torch.Tensor, k_offsets: torch.Tensor, levels: dict[int, int]):
    """Stack full-resolution and pooled keys/values for the pool factors in ``levels``.

    Args:
        k, v: ``[B, N, heads, D]`` / ``[B, N, heads, Dv]`` in plan order.
        k_offsets: ``[n_k_blocks + 1]`` key block boundaries.
        levels: ``{pool factor: pooled rows}`` of the levels the plan uses (1 is always
            stacked first, as ``k`` itself; :meth:`~vdiff_sparse.plan.PlanFacts.rows_of`).

    Returns:
        ``(k_all, v_all, rows)``: the stacked tensors (``k`` and ``v`` themselves when no
        pooled level is used) and ``rows`` (:func:`pyramid_rows`).
    """
    rows = pyramid_rows(k_offsets, levels, k.shape[1])
    ks, vs = [k], [v]
    for p in LEVELS:
        if p == 1 or p not in levels:
            continue
        ks.append(pool(k, k_offsets, p, levels[p]))
        vs.append(pool(v, k_offsets, p, levels[p]))
    if len(ks) == 1:
        return k, v, rows
    return torch.cat(ks, 1), torch.cat(vs, 1), rows


__all__ = ["pool", "pool_groups", "pyramid", "pyramid_rows"]
