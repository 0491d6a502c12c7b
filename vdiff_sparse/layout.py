"""Where video tokens sit in a sequence, and reorders that make blocks contiguous.

Video tokens come from a latent grid ``(T, H, W)`` (after patchify) flattened frame-major,
row-major: token ``n = (t * H + h) * W + w``. A :class:`VideoLayout` adds text tokens before
(CogVideoX) or after (HunyuanVideo, Mochi) the video.

A :class:`BlockOrder` is an invertible reorder of the video tokens plus block boundaries in
the new ("plan") order: VMoBA's 2D/3D partitions, GNA tiles and PSA's optional tiled or Hilbert
order all become contiguous blocks this way. Grids need not be divisible by the tile: edge
tiles are simply smaller, so no padding token ever exists.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from .checks import Grid


@dataclass(frozen=True)
class VideoLayout:
    """A sequence of ``T*H*W`` video tokens and ``text_tokens`` text tokens.

    Args:
        grid: latent token grid ``(T, H, W)``; video tokens are frame-major, row-major.
        text_tokens: number of text (or other global) tokens in the same sequence.
        text_position: ``"before"`` (CogVideoX) or ``"after"`` (HunyuanVideo, Mochi).
    """

    grid: Grid
    text_tokens: int = 0
    text_position: Literal["before", "after"] = "after"

    def __post_init__(self) -> None:
        from .checks import check_grid

        object.__setattr__(self, "grid", check_grid(self.grid))
        if self.text_tokens < 0:
            raise ValueError(f"text_tokens must be >= 0, got {self.text_tokens}")
        if self.text_position not in ("before", "after"):
            raise ValueError(
                f"text_position must be 'before' or 'after', got {self.text_position!r}"
            )

    @property
    def num_video_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def num_tokens(self) -> int:
        return self.num_video_tokens + self.text_tokens

    def split(self, x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Split ``x`` along ``dim`` (length ``num_tokens``) into ``(video, text)``."""
        if x.shape[dim] != self.num_tokens:
            raise ValueError(
                f"sequence length {x.shape[dim]} does not match the layout: grid {self.grid} "
                f"gives {self.num_video_tokens} video tokens + {self.text_tokens} text tokens "
                f"= {self.num_tokens}"
            )
        n_video = self.num_video_tokens
        if self.text_position == "before":
            text, video = x.split([self.text_tokens, n_video], dim=dim)
        else:
            video, text = x.split([n_video, self.text_tokens], dim=dim)
        return video, text

    def merge(self, video: torch.Tensor, text: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Inverse of :meth:`split`."""
        parts = (text, video) if self.text_position == "before" else (video, text)
        return torch.cat(parts, dim=dim)


@dataclass(frozen=True, eq=False)
class BlockOrder:
    """An invertible reorder of ``N`` video tokens with block boundaries in the new order.

    Attributes:
        perm: ``[N]`` int64; ``perm[i]`` is the original token index at plan position ``i``.
            ``None`` means the identity (no reorder).
        offsets: ``[n_blocks + 1]`` int64 block boundaries in plan order, ``offsets[0] = 0``,
            ``offsets[-1] = N``; blocks may differ in size (ragged edge tiles).
    """

    perm: torch.Tensor | None
    offsets: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_blocks(self) -> int:
        return self.offsets.numel() - 1

    @functools.cached_property
    def inverse(self) -> torch.Tensor | None:
        """``[N]`` int64 plan position of each original token, or ``None`` for identity."""
        if self.perm is None:
            return None
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(self.perm.numel(), device=self.perm.device)
        return inv

    def permute(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Original order -> plan order along ``dim``."""
        if self.perm is None:
            return x
        return x.index_select(dim, self.perm.to(x.device))

    def unpermute(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Plan order -> original order along ``dim``."""
        if self.perm is None:
            return x
        return x.index_select(dim, self.inverse.to(x.device))

    def block_of_position(self, num_tokens: int | None = None) -> torch.Tensor:
        """``[N]`` int64 block id of each plan position. Give ``num_tokens`` (``N``) when it is
        known on the host: then nothing is read back from the offsets' device."""
        n = self.num_tokens if num_tokens is None else num_tokens
        positions = torch.arange(n, device=self.offsets.device)
        return torch.searchsorted(self.offsets[1:], positions, right=True)

    def to(self, device: torch.device | str) -> "BlockOrder":
        perm = None if self.perm is None else self.perm.to(device)
        return BlockOrder(perm, self.offsets.to(device))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def uniform_offsets(num_tokens: int, block: int) -> torch.Tensor:
    """Boundaries of consecutive blocks of ``block`` tokens; the last one may be shorter."""
    if block < 1:
        raise ValueError(f"block size must be >= 1, got {block}")
    bounds = list(range(0, num_tokens, block)) + [num_tokens]
    return torch.tensor(bounds, dtype=torch.long)


@functools.lru_cache(maxsize=64)
def _tile_order_cpu(grid: Grid, tile: Grid) -> BlockOrder:
    T, H, W = grid
    tt, th, tw = (min(a, b) for a, b in zip(tile, grid))
    t = torch.arange(T).view(T, 1, 1).expand(grid)
    h = torch.arange(H).view(1, H, 1).expand(grid)
    w = torch.arange(W).view(1, 1, W).expand(grid)
    n_th, n_tw = _ceil_div(H, th), _ceil_div(W, tw)
    tile_id = ((t // tt) * n_th + h // th) * n_tw + w // tw
    # Sort by tile, then by original index: tokens inside a tile stay frame-major, row-major.
    key = tile_id.reshape(-1) * (T * H * W) + torch.arange(T * H * W)
    perm = torch.argsort(key)
    counts = torch.bincount(tile_id.reshape(-1), minlength=_ceil_div(T, tt) * n_th * n_tw)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    if torch.equal(perm, torch.arange(perm.numel())):
        return BlockOrder(None, offsets)
    return BlockOrder(perm, offsets)


def tile_order(grid: Grid, tile: Grid, device: torch.device | str = "cpu") -> BlockOrder:
    """Reorder a ``(T, H, W)`` grid into ``tile``-shaped blocks (tiles/cubes).

    Tiles are visited frame-major, row-major; tokens inside a tile keep frame-major, row-major
    order. Tiles on the far edge of an axis that does not divide are smaller. A tile larger
    than the grid on some axis covers that whole axis. ``tile = (c_t, H, W)`` gives VMoBA's 1D
    temporal blocks (identity reorder), ``(T, c_h, c_w)`` its 2D spatial blocks.
    """
    from .checks import check_grid, check_per_axis

    grid = check_grid(grid)
    tile = check_per_axis("tile", tile, minimum=1)
    return _on_device(_tile_order_cpu, grid, tile, device=device)


def _on_device(make, *key, device) -> "BlockOrder":
    """``make(*key)`` (a cached CPU order) on ``device``, itself cached per device, so a call on
    a GPU copies nothing to it after the first."""
    device = torch.device(device)
    if device.type == "cpu":
        return make(*key)
    return _cached_on(make, key, str(device))


@functools.lru_cache(maxsize=128)
def _cached_on(make, key: tuple, device: str) -> "BlockOrder":
    return make(*key).to(device)


def _hilbert_index_3d(coords: torch.Tensor, bits: int) -> torch.Tensor:
    """Hilbert curve index of integer points ``coords`` ``[N, 3]`` in a ``2**bits`` cube.

    Skilling's transpose algorithm ("Programming the Hilbert curve", 2004), vectorised.
    """
    x = [coords[:, i].clone() for i in range(3)]
    n = 3
    m = 1 << (bits - 1)
    # Inverse undo excess work.
    q = m
    while q > 1:
        p = q - 1
        for i in range(n):
            swap = (x[i] & q) != 0
            # if bit set: invert low bits of x[0]; else exchange low bits of x[0] and x[i]
            x0_inv = x[0] ^ p
            t = (x[0] ^ x[i]) & p
            new_x0 = torch.where(swap, x0_inv, x[0] ^ t)
            new_xi = torch.where(swap, x[i], x[i] ^ t)
            x[0] = new_x0
            if i != 0:
                x[i] = new_xi
        q >>= 1
    # Gray encode.
    for i in range(1, n):
        x[i] = x[i] ^ x[i - 1]
    t = torch.zeros_like(x[0])
    q = m
    while q > 1:
        t = torch.where((x[n - 1] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    for i in range(n):
        x[i] = x[i] ^ t
    # Interleave the transposed bits into one index (x[0] holds the most significant bit).
    index = torch.zeros_like(x[0])
    for b in range(bits - 1, -1, -1):
        for i in range(n):
            index = (index << 1) | ((x[i] >> b) & 1)
    return index


@functools.lru_cache(maxsize=32)
def _hilbert_perm_cpu(grid: Grid) -> torch.Tensor:
    T, H, W = grid
    bits = max(1, (max(grid) - 1).bit_length())
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    coords = torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=1)
    return torch.argsort(_hilbert_index_3d(coords, bits), stable=True)


def hilbert_order(grid: Grid, block: int, device: torch.device | str = "cpu") -> BlockOrder:
    """Tokens along a 3D Hilbert curve over the grid, cut into blocks of ``block`` tokens.

    Neighbouring tokens on the curve are neighbours in (t, h, w), so consecutive blocks are
    compact 3D regions for any grid size (points outside the grid are simply absent).
    """
    from .checks import check_grid

    grid = check_grid(grid)
    return _on_device(_hilbert_order_cpu, grid, block, device=device)


@functools.lru_cache(maxsize=32)
def _hilbert_order_cpu(grid: Grid, block: int) -> BlockOrder:
    perm = _hilbert_perm_cpu(grid)
    return BlockOrder(perm, uniform_offsets(perm.numel(), block))


def sequence_order(num_tokens: int, block: int, device: torch.device | str = "cpu") -> BlockOrder:
    """No reorder; consecutive blocks of ``block`` tokens (last one may be shorter)."""
    return _on_device(_sequence_order_cpu, num_tokens, block, device=device)


@functools.lru_cache(maxsize=32)
def _sequence_order_cpu(num_tokens: int, block: int) -> BlockOrder:
    return BlockOrder(None, uniform_offsets(num_tokens, block))


def token_coords(grid: Grid, perm: torch.Tensor | None, device: torch.device | str = "cpu"):
    """``[N, 3]`` int64 ``(t, h, w)`` of each plan position (original order if ``perm`` is None)."""
    T, H, W = grid
    n = torch.arange(T * H * W, device=device) if perm is None else perm.to(device)
    return torch.stack([n // (H * W), (n // W) % H, n % W], dim=1)
