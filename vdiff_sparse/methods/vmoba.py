"""VMoBA: mixture-of-block attention with a layer-wise 1D/2D/3D block partition.

Semantics (from the VMoBA paper, with ragged edge blocks allowed), per batch and head, for the
self-attention layer ``l``:

1. Partition: ``l mod 3`` = 0 -> 1D (``c_t`` whole frames per block), 1 -> 2D (a ``c_h x c_w``
   spatial tile across all frames), 2 -> 3D (a ``c_t x c_h x c_w`` cube). Edge blocks may be
   smaller; tokens are reordered so that every block is contiguous.
2. Block keys: mean of each block's keys (at least fp32).
3. Gate: ``s[i, j] = q_i . kmean_j`` (no scale, no softmax).
4. Every query attends its own block.
5. Selection, with the own block always credited first:

   * ``topk, local``: the own block plus the ``topk - 1`` best other blocks of the token.
   * ``topk, global``: the ``N`` own pairs plus the ``(topk - 1) * N`` best other (token, block)
     pairs of the head's ``[N, n_blocks]`` matrix, so exactly ``topk * N`` pairs per head (``topk``
     per token on average) and ``topk = 1`` means own block only, as in the local mode.
   * ``threshold``: scores are min-max normalised to [0, 1] (per token row if local, over the
     head's whole matrix if global; a constant row/matrix normalises to all ones, i.e. every
     block equally relevant). The own pair(s) are credited first; the other pairs, sorted by
     descending score, are added until the cumulative share of the total first reaches ``tau``
     (the shortest such prefix).

6. Each query attends the union of its selected blocks in one softmax, with the extra (text)
   keys if any.

The plan stores the reorder of the layer's partition, key blocks = partition blocks, query tiles
of ``query_block`` consecutive plan positions, per tile the union of blocks any of its tokens
selected (``kv_index``) and per token which of those it selected (``token_keep``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..attention import run_plan
from ..checks import (
    Grid, check_choice, check_finite, check_grid, check_positive_int, check_positive_ints, check_qkv,
)
from ..layout import BlockOrder, sequence_order, tile_order
from ..plan import AttentionPlan, PlanFacts, pack_block_selection
from .registry import Method, build_config, get_method, register_method

MODES = ("topk", "threshold")
#: The paper's fine-tuning selection: threshold over the head's whole score matrix, tau = 0.25.
TRAINING_SETTINGS = {"mode": "threshold", "scope": "global", "tau": 0.25}
SCOPES = ("local", "global")
PARTITIONS = ("1d", "2d", "3d")

# Selection runs a few (batch, head) rows at a time, never part of one: a row's gate is one
# matmul (row-chunked matmuls may round differently) and a global row is one selection. About 1M
# gate entries (or query values, if D > n_blocks) per chunk: one head at N = 16K with 64 blocks;
# top-k's temporaries are then a few MiB, threshold's (float64 sort, cumulative sums) ~25 MiB.
_CHUNK_ELEMENTS = 2**20


@dataclass
class VMoBAConfig:
    """VMoBA settings (``OmegaConf.structured``-compatible).

    Default block sizes reproduce the paper's Wan 2.1 training setup: at 93x576x1024 the latent
    grid is 24x36x64 (55,296 tokens) and the paper uses 8 / 48 / 72 blocks for 1D / 2D / 3D:
    ``c_t = 3`` gives 24 / 3 = 8 temporal blocks, a ``6 x 8`` tile gives 6 x 8 = 48 spatial
    blocks, a ``4 x 12 x 16`` cube gives 6 x 3 x 4 = 72 cubes (768 tokens, as 55,296 / 72). We
    store absolute tile sizes, not counts, so that the block size (what the kernels and the
    quality care about) stays fixed when the resolution changes.

    The defaults select training-free (``topk``, ``local``); :meth:`training` gives the paper's
    fine-tuning setting (``threshold``, ``global``, ``tau = 0.25``).

    Attributes:
        block_1d: ``c_t``, frames per 1D block.
        block_2d: ``(c_h, c_w)`` spatial tile of a 2D block (spans all frames).
        block_3d: ``(c_t, c_h, c_w)`` cube of a 3D block.
        mode: ``"topk"`` or ``"threshold"``.
        scope: ``"local"`` (per query token) or ``"global"`` (per head).
        topk: blocks per token, own block included (on average per token when global);
            ``topk >= n_blocks`` is dense attention. Default 6: with 8 / 48 / 72 blocks the
            per-token density is 0.75 / 0.125 / 0.083 (mean 0.32), in the range of the paper's
            training-free 2.40x FLOP reduction.
        tau: threshold mode's cumulative score share, in (0, 1].
        query_block: query tile (in plan order) of the block-sparse kernels; changes speed and
            ``block_density``, never which keys a token attends.
    """

    block_1d: int = 3
    block_2d: tuple[int, int] = (6, 8)
    block_3d: tuple[int, int, int] = (4, 12, 16)
    mode: str = "topk"
    scope: str = "local"
    topk: int = 6
    tau: float = 0.25
    query_block: int = 128

    def __post_init__(self) -> None:
        check_positive_int("block_1d", self.block_1d)
        self.block_2d = check_positive_ints("block_2d", self.block_2d, 2)
        self.block_3d = check_positive_ints("block_3d", self.block_3d, 3)
        check_choice("mode", self.mode, MODES)
        check_choice("scope", self.scope, SCOPES)
        check_positive_int("topk", self.topk, " (own block included)")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 < self.tau <= 1:
            raise ValueError(f"tau must be a float in (0, 1], got {self.tau!r}")
        self.tau = float(self.tau)
        check_positive_int("query_block", self.query_block)

    @classmethod
    def training(cls, **overrides) -> "VMoBAConfig":
        """The paper's fine-tuning setting (:data:`TRAINING_SETTINGS`: threshold, global,
        ``tau = 0.25``)."""
        return cls(**{**TRAINING_SETTINGS, **overrides})

    def replace(self, **overrides) -> "VMoBAConfig":
        """A copy with ``overrides`` applied (validated); unknown names raise ``ValueError``."""
        return build_config(VMoBAConfig, self, overrides, "VMoBA")


def partition_for_layer(layer_index: int) -> Literal["1d", "2d", "3d"]:
    """The partition of self-attention layer ``layer_index``: ``1d``, ``2d``, ``3d``, repeating."""
    if isinstance(layer_index, bool) or not isinstance(layer_index, int) or layer_index < 0:
        raise ValueError(f"layer_index must be an int >= 0, got {layer_index!r}")
    return PARTITIONS[layer_index % 3]  # type: ignore[return-value]


def partition_tile(grid: Grid, partition: str, config: VMoBAConfig) -> Grid:
    """The ``(c_t, c_h, c_w)`` tile of ``partition`` on ``grid`` (before clamping to the grid)."""
    check_choice("partition", partition, PARTITIONS)
    T, H, W = check_grid(grid)
    if partition == "1d":
        return (config.block_1d, H, W)
    if partition == "2d":
        return (T, *config.block_2d)
    return config.block_3d


def partition_order(
    grid: Grid, layer_index: int, config: VMoBAConfig, device: torch.device | str = "cpu"
) -> BlockOrder:
    """Reorder and block boundaries of layer ``layer_index``'s partition of ``grid``."""
    tile = partition_tile(grid, partition_for_layer(layer_index), config)
    return tile_order(grid, tile, device=device)


def _select_topk(
    score: torch.Tensor, own_block: torch.Tensor, per_token: bool, count: int, out: torch.Tensor
) -> None:
    """Top-k of the ``[c, N, nb]`` gate ``score`` (overwritten) into bool ``out`` (same shape).

    ``own_block`` ``[N]`` is each token's own block, credited first by an infinite score;
    ``count`` entries are kept per token if ``per_token``, else per head (``[N * nb]`` rows).
    """
    c, n, nb = score.shape
    score.scatter_(-1, own_block.view(1, n, 1).expand(c, n, 1), float("inf"))
    rows = score.view(c * n, nb) if per_token else score.view(c, n * nb)
    chosen = rows.topk(count, dim=-1, sorted=False).indices
    out.zero_().view(rows.shape).scatter_(-1, chosen, True)


def _select_threshold(score: torch.Tensor, own: torch.Tensor, tau: float, out: torch.Tensor) -> None:
    """Rows of ``score`` ``[R, L]`` (overwritten): own entries plus the shortest descending
    prefix of the others whose cumulative share of the row's min-max normalised total reaches
    ``tau``, into bool ``out`` ``[R, L]``. Works in place wherever it can: at a whole head per
    row (global scope) the float64 temporaries are the cost of the plan."""
    lo = score.amin(-1, keepdim=True)
    span = score.amax(-1, keepdim=True) - lo
    flat = ~(span > 0)  # a constant row (or NaN span) normalises to all ones
    score.sub_(lo).div_(span.clamp(min=torch.finfo(score.dtype).tiny)).masked_fill_(flat, 1.0)
    # float64 sums: a global row has up to ~1e7 entries and the cut must not drift.
    norm = score.double()
    credited = norm.masked_fill(~own, 0.0).sum(-1, keepdim=True)
    ranked, order = norm.masked_fill_(own, float("-inf")).sort(dim=-1, descending=True)
    del norm
    ranked.masked_fill_(own.gather(-1, order), 0.0)  # own entries sorted last
    running = ranked.cumsum_(-1).add_(credited)
    # The total comes from the same running sum, so with tau = 1 the prefix stops exactly at
    # the last non-zero entry instead of wherever rounding of a separate sum() would put it.
    reach = tau * running[..., -1:]
    # Entry m is taken iff the prefix before it has not reached tau yet (shares only grow).
    take = torch.empty_like(out)
    torch.lt(credited, reach, out=take[..., :1])
    torch.lt(running[..., :-1], reach, out=take[..., 1:])
    out.zero_().scatter_(-1, order, take).logical_or_(own)


def _select_blocks(
    gate: torch.Tensor, own_block: torch.Tensor, config: VMoBAConfig, out: torch.Tensor
) -> None:
    """``[c, N, nb]`` gate (overwritten) and ``[N]`` own block ids -> bool selection in ``out``."""
    c, n, nb = gate.shape
    local = config.scope == "local"
    if config.mode == "topk":
        # topk < nb here (else the plan is dense), so the count is below the row length.
        _select_topk(gate, own_block, local, config.topk if local else config.topk * n, out)
        return
    own = torch.nn.functional.one_hot(own_block, nb).bool().expand(c, n, nb)
    if local:
        rows, own_rows = gate.view(c * n, nb), own.reshape(c * n, nb)
    else:
        rows, own_rows = gate.view(c, n * nb), own.reshape(c, n * nb)
    _select_threshold(rows, own_rows, config.tau, out.view(rows.shape))


def _block_means(
    k: torch.Tensor, order: BlockOrder, block: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``[B, N, H, D]`` keys -> ``[B*H, n_blocks, D]`` block means in ``dtype``, without a
    reordered copy of ``k``; ``block`` ``[N]`` is the block of each plan position.

    Each block sums its tokens in ascending original index, which is also their plan order
    (tiles keep frame-major, row-major order inside), so the sums equal those of the plan-order
    keys bit for bit.
    """
    B, n, H, D = k.shape
    block_of_token = block if order.perm is None else block[order.inverse]
    sums = torch.zeros(B, order.num_blocks, H, D, dtype=dtype, device=k.device)
    # Only a slice of k at a time is converted when k is not already in ``dtype``.
    tokens_per_step = n if k.dtype == dtype else max(1, _CHUNK_ELEMENTS // (B * H * D))
    for start in range(0, n, tokens_per_step):
        stop = min(n, start + tokens_per_step)
        sums.index_add_(1, block_of_token[start:stop], k[:, start:stop].to(dtype))
    sums = sums.transpose(1, 2).reshape(B * H, order.num_blocks, D)
    return sums / order.offsets.diff().to(dtype)[:, None]


def _tile_spans(n: int, query_block: int) -> list[tuple[slice, slice, int]]:
    """Plan positions grouped by query tile: ``(positions, tiles, tile_size)`` for the full
    tiles, then for the shorter last tile if ``query_block`` does not divide ``n``."""
    full = n // query_block
    spans = [(slice(0, full * query_block), slice(0, full), query_block)] if full else []
    if full * query_block < n:
        spans.append((slice(full * query_block, n), slice(full, full + 1), n - full * query_block))
    return spans


def _facts(grid: Grid, tile: Grid, n: int, config: VMoBAConfig) -> PlanFacts:
    """What the plan's maker knows on the host: query tiles of ``query_block`` positions, key
    blocks of at most the partition's tile (edge tiles are smaller), full resolution only, and
    in local top-k mode ``topk`` entries kept per token."""
    largest = 1
    for g, t in zip(grid, tile):
        largest *= min(g, t)
    keep = config.topk if config.mode == "topk" and config.scope == "local" else None
    return PlanFacts(min(config.query_block, n), largest, (1,), (n,), keep)


def _dense_selection_plan(order: BlockOrder, q_offsets: torch.Tensor, info: dict, n: int,
                          facts: PlanFacts) -> AttentionPlan:
    n_q, n_k = q_offsets.numel() - 1, order.num_blocks
    kv_index = torch.arange(n_k, device=q_offsets.device).expand(1, 1, n_q, n_k).contiguous()
    return AttentionPlan(order.perm, q_offsets, order.offsets, kv_index, method="vmoba", info=info, tokens=n,
                         facts=facts)


def plan_vmoba(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: Grid,
    config: VMoBAConfig | None = None,
    *,
    layer_index: int = 0,
    scale: float | None = None,
) -> AttentionPlan:
    """Route every query token to key blocks of layer ``layer_index``'s partition.

    Args:
        q, k: ``[B, N, heads, D]`` video tokens, ``N = T*H*W`` frame-major row-major.
        grid: latent grid ``(T, H, W)``.
        config: :class:`VMoBAConfig`, a mapping of its fields, or ``None`` (defaults:
            training-free top-k, local).
        layer_index: index among the model's self-attention layers (selects 1D/2D/3D).
        scale: unused (the gate is an unscaled dot product); accepted for the common planner
            signature.

    Returns:
        An :class:`AttentionPlan` with ``perm`` the partition's reorder, ``k_offsets`` its
        blocks, ``q_offsets`` tiles of ``config.query_block`` plan positions, ``kv_index``
        ``[B, H, n_tiles, max_kv]`` the union of blocks chosen by each tile's tokens and
        ``token_keep`` ``[B, H, N, max_kv]`` each token's own choice. When every token keeps
        every block (top-k with ``topk >= n_blocks``) the plan is dense and shared by all
        batches and heads (``kv_index`` ``[1, 1, n_tiles, n_blocks]``, no ``token_keep``).
    """
    config = get_method("vmoba").make_config(config)
    grid = check_qkv(q, k, k, grid)
    partition = partition_for_layer(layer_index)
    order = partition_order(grid, layer_index, config, device=q.device)
    tile = partition_tile(grid, partition, config)
    n, nb = q.shape[1], order.num_blocks
    q_offsets = sequence_order(n, config.query_block, q.device).offsets
    info = {
        "partition": partition,
        "layer_index": layer_index,
        "num_blocks": nb,
        "blocks_per_axis": tuple(-(-g // min(t, g)) for g, t in zip(grid, tile)),
        "mode": config.mode,
        "scope": config.scope,
    }
    check_finite(q=q, k=k)
    facts = _facts(grid, tile, n, config)
    if config.mode == "topk" and config.topk >= nb:
        return _dense_selection_plan(order, q_offsets, info, n, facts)

    B, _, H, D = q.shape
    gate_dtype = torch.promote_types(q.dtype, torch.float32)
    n_tiles = q_offsets.numel() - 1
    spans = _tile_spans(n, config.query_block)
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        own_block = order.block_of_position(n)
        kmean_t = _block_means(k, order, own_block, gate_dtype).transpose(1, 2)  # [B*H, D, nb]

        # A chunk's queries (plan order) and gate, both bounded, reused: no reordered copy of q.
        heads_per_chunk = min(B * H, max(1, _CHUNK_ELEMENTS // (n * max(nb, D))))
        q_rows = q.new_empty(heads_per_chunk, n, D)
        gate = torch.empty(heads_per_chunk, n, nb, dtype=gate_dtype, device=q.device)
        selected = torch.empty(B * H, n, nb, dtype=torch.bool, device=q.device)
        for start in range(0, B * H, heads_per_chunk):
            stop = min(B * H, start + heads_per_chunk)
            c = stop - start
            for i, row in enumerate(range(start, stop)):
                head_q = q[row // H, :, row % H]  # [N, D] original order
                if order.perm is None:
                    q_rows[i].copy_(head_q)
                else:
                    torch.index_select(head_q, 0, order.perm, out=q_rows[i])
            torch.bmm(q_rows[:c].to(gate_dtype), kmean_t[start:stop], out=gate[:c])
            _select_blocks(gate[:c], own_block, config, selected[start:stop])
        del q_rows, gate
        # A tile needs every block any of its tokens chose.
        tile_used = torch.cat(
            [selected[:, positions].unflatten(1, (-1, size)).any(2) for positions, _, size in spans], 1
        )
        kv_index, _ = pack_block_selection(tile_used.view(B, H, n_tiles, nb))
        max_kv = kv_index.shape[-1]

        # token_keep[p, e] = selected[p, kv_index[tile of p, e]], False on unused (-1) slots:
        # one gather per span, each tile's index row broadcast over its tokens.
        flat_index = kv_index.view(B * H, n_tiles, max_kv)
        token_keep = torch.empty(B * H, n, max_kv, dtype=torch.bool, device=q.device)
        for positions, tiles, size in spans:
            keep = token_keep[:, positions].unflatten(1, (-1, size))
            index = flat_index[:, tiles, None, :]
            source = selected[:, positions].unflatten(1, (-1, size))
            torch.gather(source, -1, index.clamp(min=0).expand_as(keep), out=keep)
            keep &= index >= 0

    return AttentionPlan(
        perm=order.perm,
        q_offsets=q_offsets,
        k_offsets=order.offsets,
        kv_index=kv_index,
        token_keep=token_keep.view(B, H, n, max_kv),
        method="vmoba",
        info=info,
        tokens=n,
        facts=facts,
    )


def vmoba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Grid,
    config: VMoBAConfig | None = None,
    *,
    layer_index: int = 0,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_plan: bool = False,
    **overrides,
):
    """VMoBA attention of video tokens (plus always-attended extra keys).

    Args:
        q, k, v: ``[B, N, heads, D]`` video tokens, ``N = T*H*W`` frame-major row-major.
        grid: latent grid ``(T, H, W)``.
        config: :class:`VMoBAConfig`, a mapping of its fields, or ``None`` for the defaults.
        layer_index: index among the model's self-attention layers (1D/2D/3D partition).
        extra_k, extra_v: ``[B, Ne, heads, D]`` keys every query attends (text), or ``None``.
        extra_mask: ``[B, Ne]`` bool, False for padding among the extra keys.
        scale: logit scale, ``D ** -0.5`` if ``None``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``.
        return_plan: also return the :class:`AttentionPlan`.
        **overrides: :class:`VMoBAConfig` fields replacing those of ``config``
            (e.g. ``topk=4``); unknown names raise ``ValueError``.

    Returns:
        ``[B, N, heads, D]`` in the original token order, or ``(out, plan)``.
    """
    config = get_method("vmoba").make_config(config, **overrides)
    check_qkv(q, k, v, grid)
    check_finite(v=v)  # q and k: plan_vmoba
    plan = plan_vmoba(q, k, grid, config, layer_index=layer_index)
    out = run_plan(
        q, k, v, plan,
        extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask, scale=scale, backend=backend,
    )
    return (out, plan) if return_plan else out


# --- the definition --------------------------------------------------------------------------
def vmoba_mask(q: torch.Tensor, k: torch.Tensor, grid: Grid, config: VMoBAConfig | None = None, *,
               layer_index: int = 0) -> torch.Tensor:
    """VMoBA's definition, written as plainly as possible (loops over tokens and blocks, float64):
    which key token each query token attends.

    Every query token ``i`` of head ``h`` scores every block ``j`` of the layer's partition by
    ``q_i . mean(k over block j)``, keeps its own block, then adds blocks by the selection rule
    (top-k or the shortest prefix reaching ``tau`` of the min-max normalised total, per token or
    over the head's whole matrix) and attends every key token of its chosen blocks. Slow
    (``O(N * blocks * D)`` Python steps): for tests on small grids; :func:`plan_vmoba` must
    agree with it exactly.

    Args:
        q, k: ``[B, N, heads, D]`` video tokens in the original (frame-major) order.
        grid: latent grid ``(T, H, W)``.
        config: :class:`VMoBAConfig`, a mapping or ``None``.
        layer_index: selects the 1D/2D/3D partition.

    Returns:
        ``[B, heads, N, N]`` bool, ``mask[b, h, i, j]``: query ``i`` attends key ``j``.
    """
    config = get_method("vmoba").make_config(config)
    grid = check_qkv(q, k, k, grid)
    block_of = vmoba_block_ids(grid, config, layer_index=layer_index)
    blocks = sorted(set(block_of))
    B, N, heads, _ = q.shape
    mask = torch.zeros(B, heads, N, N, dtype=torch.bool)
    for b in range(B):
        for h in range(heads):
            qs = q[b, :, h].double()
            kmean = {j: k[b, [n for n in range(N) if block_of[n] == j], h].double().mean(0) for j in blocks}
            score = {(i, j): float(qs[i] @ kmean[j]) for i in range(N) for j in blocks}
            own = [(i, block_of[i]) for i in range(N)]
            chosen: set = set()
            if config.scope == "local":
                for i in range(N):
                    others = [(i, j) for j in blocks if j != block_of[i]]
                    if config.mode == "topk":
                        chosen |= {own[i], *sorted(others, key=lambda p: -score[p])[: config.topk - 1]}
                    else:
                        row = {(i, j): score[(i, j)] for j in blocks}
                        chosen |= _shortest_prefix([own[i]], others, row, config.tau)
            else:
                others = [p for p in score if p[1] != block_of[p[0]]]
                if config.mode == "topk":
                    chosen = set(own) | set(sorted(others, key=lambda p: -score[p])[: (config.topk - 1) * N])
                else:
                    chosen = _shortest_prefix(own, others, score, config.tau)
            for i, j in chosen:
                for n in range(N):
                    if block_of[n] == j:
                        mask[b, h, i, n] = True
    return mask


def vmoba_block_ids(grid: Grid, config: VMoBAConfig | None = None, *, layer_index: int = 0) -> list[int]:
    """The block of every token (frame-major order) under layer ``layer_index``'s partition,
    from its coordinates only: 1D blocks of ``block_1d`` frames, 2D ``block_2d`` tiles through all
    frames, 3D ``block_3d`` cubes, numbered frame-major by block coordinates; edge blocks are
    smaller when the grid does not divide."""
    config = get_method("vmoba").make_config(config)
    T, H, W = check_grid(grid)
    partition = partition_for_layer(layer_index)
    ct, ch, cw = {"1d": (config.block_1d, H, W), "2d": (T, *config.block_2d), "3d": config.block_3d}[partition]
    blocks_h, blocks_w = -(-H // ch), -(-W // cw)
    return [((t // ct) * blocks_h + h // ch) * blocks_w + w // cw for t in range(T) for h in range(H) for w in range(W)]


def _shortest_prefix(own: list, others: list, score: dict, tau: float) -> set:
    """``own`` pairs, then ``others`` by descending score until their min-max normalised share
    of the total over ``score`` reaches ``tau``. Ties keep the order of ``others``."""
    lo, hi = min(score.values()), max(score.values())
    norm = {p: (x - lo) / (hi - lo) if hi > lo else 1.0 for p, x in score.items()}
    total = sum(norm.values())
    chosen = set(own)
    share = sum(norm[p] for p in own)
    for p in sorted(others, key=lambda p: -score[p]):
        if share >= tau * total:
            break
        chosen.add(p)
        share += norm[p]
    return chosen


register_method(Method(
    name="vmoba",
    config_cls=VMoBAConfig,
    attention=vmoba_attention,
    plan=plan_vmoba,
    summary="its own block plus the key blocks it routes to (1D/2D/3D blocks by layer)",
    training=TRAINING_SETTINGS,
    processor_name="VMoBAProcessor",
))

__all__ = [
    "TRAINING_SETTINGS",
    "VMoBAConfig",
    "partition_for_layer",
    "partition_order",
    "partition_tile",
    "plan_vmoba",
    "vmoba_attention",
    "vmoba_block_ids",
    "vmoba_mask",
]
