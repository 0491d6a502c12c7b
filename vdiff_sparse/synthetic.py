"""Video-like attention inputs for demos and benchmarks (no model, no download).

i.i.d. noise makes every sparse method look equally bad: real video attention is local and
content-driven. Here q/k/v come from a moving texture (a smooth random image translated a
little every frame), as patch features through fixed random projections, plus a 3D sinusoidal
position code whose weight differs per head, so some heads are local and some are not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _position_code(grid, dim: int, device) -> torch.Tensor:
    """``[N, dim]`` sinusoidal code of (t, h, w), a third of the channels per axis."""
    T, H, W = grid
    per_axis = dim // 6 * 2
    axes = torch.meshgrid(
        torch.arange(T, device=device), torch.arange(H, device=device), torch.arange(W, device=device),
        indexing="ij",
    )
    codes = []
    for coord in axes:
        freq = torch.exp(-math.log(100.0) * torch.arange(per_axis // 2, device=device) / max(per_axis // 2, 1))
        angle = coord.reshape(-1, 1).float() * freq
        codes += [angle.sin(), angle.cos()]
    code = torch.cat(codes, dim=1)
    return F.pad(code, (0, dim - code.shape[1]))


def video_qkv(
    grid: tuple[int, int, int],
    heads: int = 4,
    head_dim: int = 64,
    *,
    batch: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
):
    """q, k, v ``[batch, T*H*W, heads, head_dim]`` from synthetic moving video content.

    Head ``h`` weighs the position code by ``4 * h / (heads - 1)``: head 0 attends by content
    alone, the last head is strongly local.
    """
    T, H, W = grid
    g = torch.Generator().manual_seed(seed)
    channels = 16
    speed = 1  # pixels per frame, along w
    texture = torch.randn(batch, channels, H + 8, W + 8 + speed * T, generator=g)
    texture = F.avg_pool2d(texture, 5, stride=1, padding=2)
    frames = torch.stack([texture[..., 4 : 4 + H, 4 + speed * t : 4 + speed * t + W] for t in range(T)], 1)
    features = frames.permute(0, 1, 3, 4, 2).reshape(batch, T * H * W, channels)
    features = features / features.std()
    pos = _position_code(grid, head_dim, "cpu")
    out = []
    for _ in range(3):
        proj = torch.randn(heads, channels, head_dim, generator=g) / math.sqrt(channels)
        x = torch.einsum("bnc,hcd->bnhd", features, proj)
        out.append(x)
    locality = torch.linspace(0, 4, heads) if heads > 1 else torch.zeros(1)
    q, k, v = out
    q = q + locality[None, None, :, None] * pos[None, :, None, :]
    k = k + locality[None, None, :, None] * pos[None, :, None, :]
    return [x.to(device=device, dtype=dtype).contiguous() for x in (q, k, v)]
