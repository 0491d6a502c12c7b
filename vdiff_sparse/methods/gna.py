"""GNA: generalized neighborhood attention over the (t, h, w) latent grid.

Each query attends a window of keys around itself, per axis: window ``k``, stride ``s``
(queries of one stride group share the window of their group's leader), dilation ``d`` (queries
and keys on the same ``x mod d`` lattice) and a causal flag. Windows are shifted inward at the
borders, never truncated, so every non-causal query sees exactly ``k`` keys per axis.

Per axis of length ``n``, for query coordinate ``x``: group ``g = x mod d``, lattice coordinate
``x' = x // d`` on a lattice of ``n_g = ceil((n - g) / d)`` points. Non-causal:
``leader = min((x' // s) * s + s // 2, n_g - 1)``, ``start = clamp(leader - k // 2, 0, n_g - k)``,
keys ``g + d * [start, start + k)``. Causal: ``leader = min((x' // s) * s + s - 1, n_g - 1)``,
``start = max(leader - k + 1, 0)``, keys ``g + d * [start, x']``. A key is in a query's window
iff it is on every axis (:func:`gna_mask` is this definition, written plainly). ``s = 1`` is neighborhood attention, ``s = k`` blocked attention, ``window = k * tile``
with ``stride = tile`` Sliding Tile Attention (perfectly block-sparse); a window covering every
axis without causality is dense attention.

Axes of length 1 have a single coordinate, hence a single possible neighborhood: window, stride
and dilation there are taken as 1 whatever was given, so a video preset such as
``window=(5, 7, 7)`` also runs on a one-frame grid and a 2D window ``(7, 7)`` means ``(1, 7, 7)``.

The plan: tokens are reordered into tiles (:func:`~vdiff_sparse.layout.tile_order`), every query
tile lists the key tiles that hold at least one key of one of its queries' windows, and a
per-query :class:`~vdiff_sparse.plan.TokenWindow` masks the rest; when the windows are exact
unions of whole key tiles (block-aligned configs) the window is dropped so kernels skip the mask.
Windows are products of per-axis intervals, so everything is computed per axis (``n × n`` for an
axis of length ``n``) and combined by outer products: no loop over tokens or tile pairs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import torch

from ..attention import dense_attention, run_plan
from ..checks import Grid, check_finite, check_grid, check_per_axis, check_qkv
from ..layout import tile_order, token_coords
from ..plan import AttentionPlan, TokenWindow, pack_block_selection, read_facts
from .registry import Method, get_method, register_method

PerAxisInt = Union[int, Sequence[int]]
PerAxisBool = Union[bool, Sequence[bool]]

# Automatic tiles grow until they hold at least this many tokens (see :func:`auto_tile`).
AUTO_TILE_MIN_TOKENS = 64


@dataclass
class GNAConfig:
    """Generalized neighborhood attention settings (usable with ``OmegaConf.structured``).

    Every field is one value for all axes or a tuple per axis; tuples shorter than 3 describe
    the trailing axes (``(7, 7)`` is ``(1, 7, 7)``, i.e. ``(h, w)`` of a ``(t, h, w)`` grid).

    Attributes:
        window: keys per axis ``k``; ``2 <= k`` and ``k * dilation <= n`` on every axis of
            length ``n >= 2`` (checked against the grid when planning).
        stride: queries per stride group, ``1 <= stride <= window``.
        dilation: ``>= 1``; a query attends keys of its own ``x mod dilation`` lattice.
        causal: per axis, keys never lie past the query on that axis.
        tile: query/key tile shape of the plan, or ``None`` for :func:`auto_tile`.
    """

    window: Union[int, tuple[int, ...]]
    stride: Union[int, tuple[int, ...]] = 1
    dilation: Union[int, tuple[int, ...]] = 1
    causal: Union[bool, tuple[bool, ...]] = False
    tile: Optional[Union[int, tuple[int, ...]]] = None

    def __post_init__(self) -> None:
        window = check_per_axis("window", self.window, minimum=1)
        stride = check_per_axis("stride", self.stride, minimum=1)
        check_per_axis("dilation", self.dilation, minimum=1)
        check_per_axis("causal", self.causal, kind=bool)
        if self.tile is not None:
            check_per_axis("tile", self.tile, minimum=1)
        # A window of 1 is only valid on an axis of length 1, where stride is ignored.
        for axis, (k, s) in enumerate(zip(window, stride)):
            if k > 1 and s > k:
                raise ValueError(
                    f"stride must be in 1..window on every axis; stride[{axis}]={s} > "
                    f"window[{axis}]={k} (stride={self.stride!r}, window={self.window!r})"
                )

    def plan(self, grid: Sequence[int], device: torch.device | str = "cpu") -> AttentionPlan:
        """:func:`plan_gna` with these settings."""
        return plan_gna(
            grid, self.window, self.stride, self.dilation, self.causal, tile=self.tile, device=device
        )


def _check_problem(grid, window, stride, dilation, causal, tile):
    """Widen every argument to 3 axes, apply the length-1 axis rule and check it against the
    grid. Returns hashable tuples ``(grid, window, stride, dilation, causal, tile)``."""
    grid = check_grid(grid)
    window = check_per_axis("window", window, minimum=1)
    stride = check_per_axis("stride", stride, minimum=1)
    dilation = check_per_axis("dilation", dilation, minimum=1)
    causal = check_per_axis("causal", causal, kind=bool)
    ones = tuple(n == 1 for n in grid)
    window, stride, dilation = (
        tuple(1 if one else x for one, x in zip(ones, values)) for values in (window, stride, dilation)
    )
    for axis, n in enumerate(grid):
        if n == 1:
            continue
        k, s, d = window[axis], stride[axis], dilation[axis]
        if not 2 <= k <= n:
            raise ValueError(
                f"window[{axis}]={k} must be in 2..{n} (axis {axis} of grid {grid} has length "
                f"{n}); got window={window}"
            )
        if not 1 <= s <= k:
            raise ValueError(
                f"stride[{axis}]={s} must be in 1..window[{axis}]={k}; got stride={stride}"
            )
        if k * d > n:
            raise ValueError(
                f"window[{axis}] * dilation[{axis}] = {k} * {d} = {k * d} must be <= {n} "
                f"(axis {axis} of grid {grid}); allowed dilation[{axis}] is 1..{n // k}, "
                f"got dilation={dilation}"
            )
    if tile is None:
        tile = auto_tile(grid, window, stride, dilation)
    else:
        tile = check_per_axis("tile", tile, minimum=1)
    tile = tuple(min(t, n) for t, n in zip(tile, grid))
    return grid, window, stride, dilation, causal, tile


def auto_tile(grid: Grid, window: Grid, stride: Grid, dilation: Grid) -> Grid:
    """The tile :func:`plan_gna` uses when none is given.

    Rule: an axis with stride ``s > 1`` gets tile ``s``, so a stride group is exactly one tile
    (Sliding Tile Attention, ``window = k * s``, is then perfectly block-sparse). The other
    axes start at 1 and are doubled one at a time — always the one whose tile is smallest
    relative to its window extent ``window * dilation``, the later axis on ties — until the tile
    holds at least :data:`AUTO_TILE_MIN_TOKENS` tokens (so at most twice that) or every such
    axis covers its grid length. All arguments are 3-tuples (already checked).
    """
    tile = [min(s, n) for s, n in zip(stride, grid)]
    growable = [axis for axis in range(3) if stride[axis] == 1]
    while tile[0] * tile[1] * tile[2] < AUTO_TILE_MIN_TOKENS:
        open_axes = [axis for axis in growable if tile[axis] < grid[axis]]
        if not open_axes:
            break
        axis = min(reversed(open_axes), key=lambda a: tile[a] / (window[a] * dilation[a]))
        tile[axis] = min(2 * tile[axis], grid[axis])
    return tuple(tile)


def _axis_bounds(n: int, k: int, s: int, d: int, causal: bool):
    """Inclusive key bounds ``lo, hi`` ``[n]`` of every query coordinate on one axis (the rule in
    the module docstring), in grid coordinates; keys lie on the lattice ``lo, lo + d, ...``."""
    x = torch.arange(n)
    group, xg = x % d, x // d
    n_group = (n - group + d - 1) // d  # tokens on the query's lattice
    first = (xg // s) * s
    if causal:
        leader = torch.minimum(first + s - 1, n_group - 1)
        start = (leader - k + 1).clamp(min=0)
        return group + start * d, x
    leader = torch.minimum(first + s // 2, n_group - 1)
    start = torch.maximum(torch.minimum(leader - k // 2, n_group - k), torch.zeros_like(x))
    return group + start * d, group + (start + k - 1) * d


def _axis_mask(lo: torch.Tensor, hi: torch.Tensor, d: int) -> torch.Tensor:
    """``[n, n]`` bool: key coordinate ``y`` (columns) is in the window of query ``x`` (rows)."""
    y = torch.arange(lo.numel())[None, :]
    return (y >= lo[:, None]) & (y <= hi[:, None]) & ((y - lo[:, None]) % d == 0)


def _tile_any(mask: torch.Tensor, t: int) -> torch.Tensor:
    """``[n, n]`` token mask -> ``[n_tiles, n_tiles]``: some pair of the two tiles is allowed."""
    n = mask.shape[0]
    nt = -(-n // t)
    padded = mask.new_zeros(nt * t, nt * t)
    padded[:n, :n] = mask
    return padded.view(nt, t, nt, t).any(3).any(1)


@functools.lru_cache(maxsize=32)
def _plan_gna_cpu(
    grid: Grid, window: Grid, stride: Grid, dilation: Grid, causal: tuple[bool, bool, bool], tile: Grid
) -> AttentionPlan:
    order = tile_order(grid, tile)
    lows, highs, lists, aligned = [], [], [], True
    for axis in range(3):
        n, t = grid[axis], tile[axis]
        lo, hi = _axis_bounds(n, window[axis], stride[axis], dilation[axis], causal[axis])
        mask = _axis_mask(lo, hi, dilation[axis])
        tiles = _tile_any(mask, t)
        # Block-aligned on this axis iff each query's keys are exactly its tile's key tiles.
        tile_of = torch.arange(n) // t
        aligned &= bool(torch.equal(tiles[tile_of][:, tile_of], mask))
        lows.append(lo)
        highs.append(hi)
        lists.append(pack_block_selection(tiles[None, None])[0][0, 0])  # [n_tiles, m], -1 pads

    # The window is a product over axes, so the key tiles of a query tile are the products of
    # its per-axis key tile lists: tile id = (i0 * nt1 + i1) * nt2 + i2, as in tile_order.
    l0, l1, l2 = lists
    nt1, nt2 = l1.shape[0], l2.shape[0]
    ids = (l0[:, None, None, :, None, None] * nt1 + l1[None, :, None, None, :, None]) * nt2 + l2[
        None, None, :, None, None, :
    ]
    valid = (
        (l0 >= 0)[:, None, None, :, None, None]
        & (l1 >= 0)[None, :, None, None, :, None]
        & (l2 >= 0)[None, None, :, None, None, :]
    )
    n_qt = order.num_blocks
    ids, valid = ids.reshape(n_qt, -1), valid.reshape(n_qt, -1)
    front = (~valid).to(torch.int8).argsort(dim=-1, stable=True)[:, : int(valid.sum(-1).max())]
    kv_index = torch.where(valid.gather(-1, front), ids.gather(-1, front), -1)

    dense = all(k == n and not c for k, n, c in zip(window, grid, causal))
    token_window = None
    if not aligned:
        coords = token_coords(grid, order.perm)
        lo = torch.stack([lows[a][coords[:, a]] for a in range(3)], dim=1)
        hi = torch.stack([highs[a][coords[:, a]] for a in range(3)], dim=1)
        # Every key of every window is in a listed key tile (the lists are the tiles the
        # windows touch), which is what ``grid`` promises backends.
        token_window = TokenWindow(coords, lo, hi, dilation, grid=tuple(grid))
    info = {
        "grid": grid,
        "window": window,
        "stride": stride,
        "dilation": dilation,
        "causal": causal,
        "tile": tile,
        "block_aligned": aligned,
        "dense": dense,
    }
    plan = AttentionPlan(
        order.perm,
        order.offsets,
        order.offsets,
        kv_index[None, None],
        window=token_window,
        method="gna",
        info=info,
        tokens=grid[0] * grid[1] * grid[2],
    )
    # Read once here (the plan is cached), carried to every device and copy.
    return replace(plan, facts=read_facts(plan))


def plan_gna(
    grid: Sequence[int],
    window: PerAxisInt,
    stride: PerAxisInt = 1,
    dilation: PerAxisInt = 1,
    causal: PerAxisBool = False,
    *,
    tile: PerAxisInt | None = None,
    device: torch.device | str = "cpu",
) -> AttentionPlan:
    """The GNA plan of a ``(T, H, W)`` grid (shared by all batches and heads).

    Args:
        grid: latent grid ``(T, H, W)``; 1D/2D grids are ``(W,)`` / ``(H, W)``.
        window, stride, dilation, causal: per axis or one value for all (see :class:`GNAConfig`);
            tuples shorter than 3 give the trailing axes.
        tile: query/key tile shape (clipped to the grid), or ``None`` for :func:`auto_tile`.
        device: where the plan's tensors live.

    Returns:
        A new :class:`AttentionPlan` (a copy of a cached one) with ``method="gna"``: tiles in ``tile_order``, each query
        tile listing the key tiles its windows touch, a per-query ``window`` unless the config
        is block-aligned, and the checked config in ``plan.info`` (``grid, window, stride,
        dilation, causal, tile, block_aligned, dense``).

    Raises:
        ValueError: a window outside ``2..n`` on an axis of length ``n >= 2``, a stride outside
            ``1..window``, ``window * dilation > n``, or a bad grid/tile.
    """
    return _shared_plan(grid, window, stride, dilation, causal, tile, device).clone()


def _shared_plan(grid, window, stride, dilation, causal, tile, device) -> AttentionPlan:
    """The cached plan itself (never handed to users: they get :meth:`AttentionPlan.clone`):
    built once per problem on the CPU and kept on each device it is used on, so a call on a GPU
    copies nothing."""
    problem = _check_problem(grid, window, stride, dilation, causal, tile)
    device = torch.device(device)
    if device.type == "cpu":
        return _plan_gna_cpu(*problem)
    return _plan_on_device(*problem, str(device))


@functools.lru_cache(maxsize=32)
def _plan_on_device(grid, window, stride, dilation, causal, tile, device: str) -> AttentionPlan:
    return _plan_gna_cpu(grid, window, stride, dilation, causal, tile).to(device)


def gna_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    config: GNAConfig | None = None,
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
    """Generalized neighborhood attention of video tokens (plus always-attended extra keys).

    Args:
        q, k, v: ``[B, N, heads, D]`` with ``N = T*H*W`` tokens frame-major, row-major.
        grid: latent grid ``(T, H, W)`` after patchify.
        config: :class:`GNAConfig`, a mapping of its fields, or ``None`` (then ``window`` must
            be among ``overrides``).
        layer_index: unused (the neighbourhood is the same on every layer).
        extra_k, extra_v: ``[B, Ne, heads, D]`` keys every query attends (text), or ``None``.
        extra_mask: ``[B, Ne]`` bool, False for padding among the extra keys.
        scale: logit scale; ``D ** -0.5`` if ``None``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``. With ``"auto"`` a
            dense config (whole-axis windows, no causality) runs as dense SDPA.
        return_plan: also return the plan.
        **overrides: :class:`GNAConfig` fields (``window``, ``stride``, ``dilation``,
            ``causal``, ``tile``) replacing those of ``config``, e.g.
            ``gna_attention(q, k, v, grid, window=(3, 7, 7))``.

    Returns:
        ``[B, N, heads, D]`` output in the input order (and the plan if ``return_plan``).
    """
    config = get_method("gna").make_config(config, **overrides)
    grid = check_qkv(q, k, v, grid)
    check_finite(q=q, k=k, v=v)
    plan = _shared_plan(grid, config.window, config.stride, config.dilation, config.causal, config.tile, q.device)
    extras = dict(extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask, scale=scale)
    if backend == "auto" and plan.info["dense"]:
        out = dense_attention(q, k, v, **extras)
    else:
        out = run_plan(q, k, v, plan, backend=backend, **extras)
    return (out, plan.clone()) if return_plan else out


def _plan_for_qk(q: torch.Tensor, k: torch.Tensor, grid: Sequence[int], config: GNAConfig | None = None, *,
                 layer_index: int = 0, scale: float | None = None) -> AttentionPlan:
    """:func:`plan_gna` in the methods' planner convention (the plan depends on the grid only)."""
    check_qkv(q, k, k, grid)
    return get_method("gna").make_config(config).plan(grid, device=q.device)


def fit_to_grid(config: GNAConfig, grid: Sequence[int]) -> GNAConfig:
    """Shrink a GNA neighbourhood to a grid: window at most the axis length (at least 2),
    stride at most the window, dilation at most ``n // window``, tile at most the axis. A preset
    made for 720p then runs on any latent size; a window covering a whole axis is dense along
    it.

    Raises:
        ValueError: the shrunk window covers the whole grid (without causality) although the
            given one did not say so: GNA would run as dense attention, which a processor never
            does silently. A window equal to the grid is taken as meant.
    """
    grid = check_grid(grid)
    window = check_per_axis("window", config.window, minimum=1)
    stride = check_per_axis("stride", config.stride, minimum=1)
    dilation = check_per_axis("dilation", config.dilation, minimum=1)
    causal = check_per_axis("causal", config.causal, kind=bool)
    w, s, d = [], [], []
    for n, k, st, dl in zip(grid, window, stride, dilation):
        k = max(2, min(k, n)) if n > 1 else 1
        w.append(k)
        s.append(min(st, k))
        d.append(max(1, min(dl, n // k)))
    covers = all(k == n and not c for k, n, c in zip(w, grid, causal))
    clipped = any(k > n for k, n in zip(window, grid) if n > 1)
    if covers and clipped:
        raise ValueError(
            f"GNA window {tuple(window)} covers the whole latent grid {tuple(grid)}: every query would "
            f"attend every key (dense attention). Give a window smaller than the grid on at least one "
            f"axis, e.g. window={tuple(max(2, n // 2) if n > 1 else 1 for n in grid)}, or use "
            f"DenseProcessor"
        )
    tile = None
    if config.tile is not None:
        tile = tuple(min(t, n) for t, n in zip(check_per_axis("tile", config.tile, minimum=1), grid))
    return GNAConfig(window=tuple(w), stride=tuple(s), dilation=tuple(d), causal=config.causal, tile=tile)


# --- the definition --------------------------------------------------------------------------
def gna_axis_mask(n: int, k: int, s: int, d: int, causal: bool) -> torch.Tensor:
    """The definition on one axis of length ``n`` (window ``k``, stride ``s``, dilation ``d``):
    ``[n, n]`` bool, ``[x, y]``: key coordinate ``y`` is in the window of query ``x``."""
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for x in range(n):
        g, xg = x % d, x // d
        n_g = -(-(n - g) // d)
        if causal:
            leader = min((xg // s) * s + s - 1, n_g - 1)
            keys = range(max(leader - k + 1, 0), xg + 1)
        else:
            leader = min((xg // s) * s + s // 2, n_g - 1)
            start = min(max(leader - k // 2, 0), n_g - k)
            keys = range(start, start + k)
        for key in keys:
            allowed[x, g + key * d] = True
    return allowed


def gna_mask(grid: Sequence[int], window: PerAxisInt, stride: PerAxisInt = 1, dilation: PerAxisInt = 1,
             causal: PerAxisBool = False) -> torch.Tensor:
    """GNA's definition, written as plainly as possible: which key token each query token
    attends (the rule in the module docstring, axis by axis, then the AND over axes).

    Arguments are checked and widened like :func:`plan_gna`'s. Slow (``O(N²)`` Python steps):
    for tests on small grids; :func:`plan_gna` must agree with it exactly.

    Returns:
        ``[N, N]`` bool over frame-major tokens, ``mask[i, j]``: query ``i`` attends key ``j``.
    """
    grid, window, stride, dilation, causal, _ = _check_problem(grid, window, stride, dilation, causal, None)
    axes = [gna_axis_mask(*args) for args in zip(grid, window, stride, dilation, causal)]
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    t, h, w = t.reshape(-1), h.reshape(-1), w.reshape(-1)
    # Query i attends key j iff j's coordinate is in i's window on all three axes.
    return axes[0][t[:, None], t[None, :]] & axes[1][h[:, None], h[None, :]] & axes[2][w[:, None], w[None, :]]


register_method(Method(
    name="gna",
    config_cls=GNAConfig,
    attention=gna_attention,
    plan=_plan_for_qk,
    summary="a window around itself in (t, h, w): window, stride, dilation, causal per axis",
    fit=fit_to_grid,
    resets={"window": {"stride": 1}},
    plans_from_qk=False,
    processor_name="GNAProcessor",
))

__all__ = ["AUTO_TILE_MIN_TOKENS", "GNAConfig", "auto_tile", "fit_to_grid", "gna_attention", "gna_axis_mask", "gna_mask",
           "plan_gna"]
