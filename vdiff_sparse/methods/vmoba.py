"""VMoBA: mixture-of-block attention with a layer-wise 1D/2D/3D block partition.

Semantics (DESIGN §4.1), per batch and head, for the self-attention layer ``l``:

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

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from ..attention import run_plan
from ..checks import check_choice, check_finite, check_grid, check_qkv
from ..layout import BlockOrder, Grid, tile_order, uniform_offsets
from ..plan import AttentionPlan, pack_block_selection

MODES = ("topk", "threshold")
SCOPES = ("local", "global")
PARTITIONS = ("1d", "2d", "3d")

# Selection runs a few (batch, head) rows at a time: its temporaries (int64 sort indices,
# float64 cumulative sums) are several times the fp32 gate, so only ~4M gate entries are in
# flight at once (one head at N = 32K with ~130+ blocks; a global row is never split).
_CHUNK_ELEMENTS = 2**22


def _positive_int(name: str, value, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{what}, got {value!r}")
    return value


def _positive_ints(name: str, value, n: int) -> tuple[int, ...]:
    try:
        values = tuple(value)
    except TypeError:
        values = ()
    if (
        len(values) != n
        or any(isinstance(v, bool) or int(v) != v for v in values)
        or any(v < 1 for v in values)
    ):
        raise ValueError(f"{name} must be a tuple of {n} positive ints, got {value!r}")
    return tuple(int(v) for v in values)


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
        _positive_int("block_1d", self.block_1d)
        self.block_2d = _positive_ints("block_2d", self.block_2d, 2)
        self.block_3d = _positive_ints("block_3d", self.block_3d, 3)
        check_choice("mode", self.mode, MODES)
        check_choice("scope", self.scope, SCOPES)
        _positive_int("topk", self.topk, " (own block included)")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 < self.tau <= 1:
            raise ValueError(f"tau must be a float in (0, 1], got {self.tau!r}")
        self.tau = float(self.tau)
        _positive_int("query_block", self.query_block)

    @classmethod
    def training(cls, **overrides) -> "VMoBAConfig":
        """The paper's fine-tuning setting: threshold, global, ``tau = 0.25``."""
        return cls(**{"mode": "threshold", "scope": "global", "tau": 0.25, **overrides})

    def replace(self, **overrides) -> "VMoBAConfig":
        """A copy with ``overrides`` applied (validated); unknown names raise ``ValueError``."""
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(f"unknown VMoBA option(s) {unknown}; valid options are {fields}")
        return dataclasses.replace(self, **overrides)


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


def _select_topk(score: torch.Tensor, own: torch.Tensor, count: int) -> torch.Tensor:
    """Rows of ``score`` ``[R, L]``: own entries plus the best others, ``count`` in all."""
    key = score.masked_fill(own, float("inf"))
    chosen = key.topk(count, dim=-1, sorted=False).indices
    return torch.zeros_like(own).scatter_(-1, chosen, True)


def _select_threshold(score: torch.Tensor, own: torch.Tensor, tau: float) -> torch.Tensor:
    """Rows of ``score`` ``[R, L]``: own entries plus the shortest descending prefix of the
    others whose cumulative share of the row's min-max normalised total reaches ``tau``."""
    lo = score.amin(-1, keepdim=True)
    span = score.amax(-1, keepdim=True) - lo
    norm = torch.where(span > 0, (score - lo) / span.clamp(min=torch.finfo(score.dtype).tiny), 1.0)
    # float64 sums: a global row has up to ~1e7 entries and the cut must not drift.
    norm = norm.double()
    credited = norm.masked_fill(~own, 0.0).sum(-1, keepdim=True)
    ranked, order = norm.masked_fill(own, float("-inf")).sort(dim=-1, descending=True)
    ranked = ranked.masked_fill(own.gather(-1, order), 0.0)  # own entries sorted last
    running = credited + torch.cumsum(ranked, -1)
    # The total comes from the same running sum, so with tau = 1 the prefix stops exactly at
    # the last non-zero entry instead of wherever rounding of a separate sum() would put it.
    total = running[..., -1:]
    before = torch.cat([credited, running[..., :-1]], -1)  # reached before adding each entry
    # Entry m is taken iff the prefix before it has not reached tau yet (shares only grow).
    take = before < tau * total
    return own | torch.zeros_like(own).scatter_(-1, order, take)


def _select_blocks(
    gate: torch.Tensor, own: torch.Tensor, config: VMoBAConfig
) -> torch.Tensor:
    """``[c, N, nb]`` gate and own-block mask -> bool selection of the same shape."""
    c, n, nb = gate.shape
    if config.scope == "local":
        rows, own_rows = gate.reshape(c * n, nb), own.reshape(c * n, nb)
        count = config.topk
    else:
        rows, own_rows = gate.reshape(c, n * nb), own.reshape(c, n * nb)
        count = config.topk * n
    if config.mode == "topk":
        selected = _select_topk(rows, own_rows, min(count, rows.shape[-1]))
    else:
        selected = _select_threshold(rows, own_rows, config.tau)
    return selected.view(c, n, nb)


def _dense_selection_plan(order: BlockOrder, q_offsets: torch.Tensor, info: dict) -> AttentionPlan:
    n_q, n_k = q_offsets.numel() - 1, order.num_blocks
    kv_index = torch.arange(n_k, device=q_offsets.device).expand(1, 1, n_q, n_k).contiguous()
    return AttentionPlan(order.perm, q_offsets, order.offsets, kv_index, method="vmoba", info=info)


def plan_vmoba(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: Grid,
    layer_index: int = 0,
    config: VMoBAConfig | None = None,
) -> AttentionPlan:
    """Route every query token to key blocks of layer ``layer_index``'s partition.

    Args:
        q, k: ``[B, N, heads, D]`` video tokens, ``N = T*H*W`` frame-major row-major.
        grid: latent grid ``(T, H, W)``.
        layer_index: index among the model's self-attention layers (selects 1D/2D/3D).
        config: :class:`VMoBAConfig` (defaults: training-free top-k, local).

    Returns:
        An :class:`AttentionPlan` with ``perm`` the partition's reorder, ``k_offsets`` its
        blocks, ``q_offsets`` tiles of ``config.query_block`` plan positions, ``kv_index``
        ``[B, H, n_tiles, max_kv]`` the union of blocks chosen by each tile's tokens and
        ``token_keep`` ``[B, H, N, max_kv]`` each token's own choice. When every token keeps
        every block (top-k with ``topk >= n_blocks``) the plan is dense and shared by all
        batches and heads (``kv_index`` ``[1, 1, n_tiles, n_blocks]``, no ``token_keep``).
    """
    config = VMoBAConfig() if config is None else config
    grid = check_qkv(q, k, k, grid)
    partition = partition_for_layer(layer_index)
    order = partition_order(grid, layer_index, config, device=q.device)
    tile = partition_tile(grid, partition, config)
    n, nb = order.num_tokens, order.num_blocks
    q_offsets = uniform_offsets(n, config.query_block).to(q.device)
    info = {
        "partition": partition,
        "layer_index": layer_index,
        "num_blocks": nb,
        "blocks_per_axis": tuple(-(-g // min(t, g)) for g, t in zip(grid, tile)),
        "mode": config.mode,
        "scope": config.scope,
    }
    if config.mode == "topk" and config.topk >= nb:
        return _dense_selection_plan(order, q_offsets, info)
    check_finite(q=q, k=k)

    B, _, H, D = q.shape
    gate_dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.no_grad():
        # [B*H, N, D] in plan order; everything below is per (batch, head) row.
        qp = order.permute(q.detach(), 1).transpose(1, 2).reshape(B * H, n, D).to(gate_dtype)
        kp = order.permute(k.detach(), 1).transpose(1, 2).reshape(B * H, n, D).to(gate_dtype)
        block = order.block_of_position()
        sizes = order.offsets.diff().to(gate_dtype)
        kmean = kp.new_zeros(B * H, nb, D).index_add_(1, block, kp) / sizes[:, None]
        own = torch.nn.functional.one_hot(block, nb).bool()  # [N, nb]

        n_tiles = q_offsets.numel() - 1
        tile_of = torch.arange(n, device=q.device) // config.query_block
        heads_per_chunk = max(1, _CHUNK_ELEMENTS // (n * nb))
        selected = torch.empty(B * H, n, nb, dtype=torch.bool, device=q.device)
        tile_count = torch.zeros(B * H, n_tiles, nb, dtype=torch.int32, device=q.device)
        for start in range(0, B * H, heads_per_chunk):
            stop = min(B * H, start + heads_per_chunk)
            gate = torch.bmm(qp[start:stop], kmean[start:stop].transpose(1, 2))
            chosen = _select_blocks(gate, own.expand_as(gate), config)
            selected[start:stop] = chosen
            # A tile needs every block any of its tokens chose.
            tile_count[start:stop].index_add_(1, tile_of, chosen.to(torch.int32))
        kv_index, _ = pack_block_selection(tile_count.view(B, H, n_tiles, nb) > 0)
        max_kv = kv_index.shape[-1]

        token_keep = torch.empty(B * H, n, max_kv, dtype=torch.bool, device=q.device)
        flat_index = kv_index.view(B * H, n_tiles, max_kv)
        for start in range(0, B * H, heads_per_chunk):
            stop = min(B * H, start + heads_per_chunk)
            entry = flat_index[start:stop, tile_of]  # [c, N, max_kv] block of each entry
            keep = selected[start:stop].gather(-1, entry.clamp(min=0))
            token_keep[start:stop] = keep & (entry >= 0)

    return AttentionPlan(
        perm=order.perm,
        q_offsets=q_offsets,
        k_offsets=order.offsets,
        kv_index=kv_index,
        token_keep=token_keep.view(B, H, n, max_kv),
        method="vmoba",
        info=info,
    )


def vmoba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Grid,
    layer_index: int = 0,
    config: VMoBAConfig | None = None,
    *,
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
        layer_index: index among the model's self-attention layers (1D/2D/3D partition).
        config: :class:`VMoBAConfig`; ``None`` for the defaults.
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
    config = VMoBAConfig() if config is None else config
    if overrides:
        config = config.replace(**overrides)
    check_qkv(q, k, v, grid)
    plan = plan_vmoba(q, k, grid, layer_index, config)
    out = run_plan(
        q, k, v, plan,
        extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask, scale=scale, backend=backend,
    )
    return (out, plan) if return_plan else out


__all__ = [
    "VMoBAConfig",
    "partition_for_layer",
    "partition_order",
    "partition_tile",
    "plan_vmoba",
    "vmoba_attention",
]
