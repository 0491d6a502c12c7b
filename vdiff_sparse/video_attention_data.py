"""Video-like attention problems for fidelity benchmarks (no model, no download).

Sparse methods are only as good as the structure they exploit, and i.i.d. noise has none: on it
every method looks equally bad. Attention in video diffusion transformers is content-driven and
local in (t, h, w), with some heads far more local than others. :func:`video_attention_qkv`
builds q, k, v with that structure from a small synthetic video:

1. **Content.** Frames of ``C`` channels at ``patch`` x the token resolution: a background
   texture panned by a camera motion, with a few textured elliptical objects moving at their
   own velocities on top (each object has its own channel mean, so its patches are alike and
   unlike the background's). The ``scene`` picks the textures (:data:`SCENES`): multi-scale
   smooth noise, a smooth background under finely textured objects, Voronoi cells (flat inside,
   sharp edges) or per-pixel noise (high-frequency texture). Every token's feature is its
   ``patch x patch`` pixel patch (``C * patch**2`` values), standardised per channel.
2. **Projections.** Per head fixed random projections of the features: ``q = f W_q``, ``k = f
   W_k`` with ``W_k`` correlated with ``W_q`` (so q.k measures feature similarity, as trained
   models learn), ``v = f W_v``; head ``h`` scales its content part by ``content[h]``.
3. **Position.** A per-head vector ``b_h`` is added to q and k, then a 3D rotary embedding
   (Wan's split of the head dim over t, h, w, theta 10000) rotates q and k. The rotated
   ``b_h . b_h`` term is a kernel ``sum_f |b_f|^2 cos(theta_f * offset)`` of the (t, h, w)
   offset. With a white ``b_h`` the fastest frequencies (period ~6 tokens) give the kernel
   strong side lobes 6, 12, ... tokens away, which trained models do not show, so the energy of
   ``b_h`` over frequencies is shaped (``theta * exp(-(theta * w)^2 / 2)``, ``w`` =
   :data:`POSITION_WIDTH` tokens) into a kernel that decays smoothly over a few tokens.
   ``locality[h] = (l_t, l_h, l_w)`` weighs the channels of ``b_h`` that rotate with each axis,
   so it sets how local head ``h`` is along each axis: ``0`` means no preference along it.

The default heads cycle through four kinds seen in video DiTs (:data:`HEAD_KINDS`): global
(content only), temporal (same place in every frame), mid-range 3D local and strongly local;
:func:`head_profile` also offers :data:`MORE_HEAD_KINDS` (very local, wide, and heads that attend
sharply by content).
Everything is drawn from one seeded generator on the CPU: the same arguments give the same
tensors, bit for bit.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .checks import Grid, check_choice, check_grid

CHANNELS = 8
PATCH = 2
OBJECTS = 3
CELL_AREA = 36
QK_CORRELATION = 0.8
ROPE_THETA = 10000.0
POSITION_WIDTH = 2.0


# name: ((l_t, l_h, l_w), content scale)
HEAD_KINDS = {
    "global": ((0.0, 0.0, 0.0), 0.9),
    "temporal": ((0.0, 1.5, 1.5), 0.8),
    "mid": ((1.0, 1.0, 1.0), 0.8),
    "local": ((1.75, 1.75, 1.75), 0.8),
}


# More kinds, for a spread of heads from strongly local to global (``head_profile``).
MORE_HEAD_KINDS = {
    "very_local": ((2.5, 2.5, 2.5), 0.8),
    "wide": ((0.5, 0.5, 0.5), 0.9),
    "sharp_mid": ((1.0, 1.0, 1.0), 1.5),
    "sharp_global": ((0.0, 0.0, 0.0), 1.6),
}


def head_profile(kinds: Sequence[str]) -> tuple[list[tuple[float, float, float]], list[float]]:
    """``(locality, content)`` per head for head kinds named in :data:`HEAD_KINDS` or
    :data:`MORE_HEAD_KINDS`, to pass to :func:`video_attention_qkv`."""
    table = {**HEAD_KINDS, **MORE_HEAD_KINDS}
    for kind in kinds:
        check_choice("head kind", kind, tuple(table))
    return [table[k][0] for k in kinds], [table[k][1] for k in kinds]


def default_head_profile(heads: int) -> tuple[list[tuple[float, float, float]], list[float], list[str]]:
    """``(locality, content, kind)`` per head: head ``h`` is of kind ``list(HEAD_KINDS)[h % 4]``."""
    kinds = [list(HEAD_KINDS)[h % len(HEAD_KINDS)] for h in range(heads)]
    return [HEAD_KINDS[n][0] for n in kinds], [HEAD_KINDS[n][1] for n in kinds], kinds


def _smooth_texture(g: torch.Generator, batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """``[batch, channels, height, width]`` sum of blurred noise at three scales, unit std."""
    out = torch.zeros(batch, channels, height, width)
    for scale, weight in ((1, 0.5), (4, 1.0), (16, 1.0)):
        h, w = max(1, height // scale), max(1, width // scale)
        noise = torch.randn(batch, channels, h + 2, w + 2, generator=g)
        noise = F.avg_pool2d(noise, 3, stride=1)
        out += weight * F.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False)
    return out / out.std()


def _fine_texture(g: torch.Generator, batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """``[batch, channels, height, width]`` high-frequency texture, unit std: per-pixel noise
    (independent from one token's patch to the next) over a weaker smooth pattern."""
    fine = torch.randn(batch, channels, height, width, generator=g)
    return (fine + 0.5 * _smooth_texture(g, batch, channels, height, width)) / math.sqrt(1.25)


def _cellular_texture(g: torch.Generator, batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """``[batch, channels, height, width]`` Voronoi cells, unit std: every pixel takes the
    colour of its nearest of random sites (one per :data:`CELL_AREA` pixels), so the image is
    flat inside cells and jumps at their edges."""
    sites = max(2, round(height * width / CELL_AREA))
    ys = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width).reshape(-1)
    xs = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width).reshape(-1)
    out = torch.empty(batch, channels, height * width)
    for b in range(batch):
        sy = torch.rand(sites, generator=g) * height
        sx = torch.rand(sites, generator=g) * width
        colour = torch.randn(channels, sites, generator=g)
        nearest = ((ys[:, None] - sy) ** 2 + (xs[:, None] - sx) ** 2).argmin(1)
        out[b] = colour[:, nearest]
    return (out / out.std()).reshape(batch, channels, height, width)


# scene: (background texture, object texture)
SCENES = {
    "smooth": (_smooth_texture, _smooth_texture),
    "mixed": (_smooth_texture, _fine_texture),
    "cellular": (_cellular_texture, _cellular_texture),
    "texture": (_fine_texture, _fine_texture),
}


def video_frames(grid: Sequence[int], *, batch: int = 1, seed: int = 0,
                 channels: int = CHANNELS, patch: int = PATCH, scene: str = "smooth") -> torch.Tensor:
    """The synthetic video ``[batch, T, channels, H * patch, W * patch]`` (float32, CPU).

    A textured background panned by a camera velocity, plus :data:`OBJECTS` textured ellipses
    moving with their own velocities (wrapping around the frame). ``scene`` (a key of
    :data:`SCENES`) picks the textures: ``"smooth"`` multi-scale blurred noise everywhere;
    ``"mixed"`` a smooth background under objects carrying a fine (per-pixel)
    texture over their own colour; ``"cellular"``
    Voronoi cells (flat inside, sharp edges, about 3 x 3 tokens each at ``patch`` 2);
    ``"texture"`` per-pixel noise over a weak smooth pattern everywhere."""
    T, H, W = check_grid(grid)
    check_choice("scene", scene, tuple(SCENES))
    background_texture, object_texture = SCENES[scene]
    g = torch.Generator().manual_seed(seed)
    ph, pw = H * patch, W * patch
    cam = torch.rand(batch, 2, generator=g) * 2 - 1  # pixels per frame, (dy, dx)
    margin = int(math.ceil(T * 1.0)) + 1
    background = background_texture(g, batch, channels, ph + 2 * margin, pw + 2 * margin)
    ys = torch.arange(ph, dtype=torch.float32)[:, None]
    xs = torch.arange(pw, dtype=torch.float32)[None, :]
    frames = torch.empty(batch, T, channels, ph, pw)
    objects = []
    for _ in range(OBJECTS):
        objects.append(dict(
            texture=object_texture(g, batch, channels, ph, pw) * 0.5
            + torch.randn(batch, channels, 1, 1, generator=g) * 1.5,
            center=torch.rand(batch, 2, generator=g) * torch.tensor([ph, pw]),
            velocity=(torch.rand(batch, 2, generator=g) * 2 - 1) * 2.5,
            radius=(0.15 + 0.15 * torch.rand(batch, 2, generator=g)) * torch.tensor([ph, pw]),
        ))
    for b in range(batch):
        for t in range(T):
            oy = margin + int(round(float(cam[b, 0]) * t))
            ox = margin + int(round(float(cam[b, 1]) * t))
            frame = background[b, :, oy : oy + ph, ox : ox + pw].clone()
            for obj in objects:
                cy, cx = (obj["center"][b] + obj["velocity"][b] * t).tolist()
                ry, rx = obj["radius"][b].tolist()
                # Distances on the torus, so objects wrap around instead of leaving.
                dy = torch.remainder(ys - cy + ph / 2, ph) - ph / 2
                dx = torch.remainder(xs - cx + pw / 2, pw) - pw / 2
                inside = (dy / ry) ** 2 + (dx / rx) ** 2 <= 1
                shift = (int(round(cy)) % ph, int(round(cx)) % pw)
                # The object's texture moves with it.
                tex = torch.roll(obj["texture"][b], shifts=shift, dims=(1, 2))
                frame = torch.where(inside, tex, frame)
            frames[b, t] = frame
    return frames


def patch_features(frames: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """``[batch, T, C, H*patch, W*patch]`` frames -> ``[batch, T*H*W, C*patch**2]`` token
    features (frame-major, row-major), standardised per feature."""
    B, T, C, ph, pw = frames.shape
    x = F.unfold(frames.reshape(B * T, C, ph, pw), kernel_size=patch, stride=patch)  # [BT, Cp², HW]
    x = x.transpose(1, 2).reshape(B, T * (ph // patch) * (pw // patch), C * patch * patch)
    return (x - x.mean((0, 1))) / x.std((0, 1)).clamp(min=1e-6)


def _rope_dims(head_dim: int) -> list[int]:
    """Channels rotated by t, h and w (Wan's split)."""
    return [head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)]


def _position_spectrum(head_dim: int, width: float = POSITION_WIDTH) -> torch.Tensor:
    """``[head_dim]`` amplitude of each rotary channel in ``b_h`` (mean square 1 per axis): the
    energy per frequency ``theta * exp(-(theta * width)^2 / 2)`` of a kernel about ``width``
    tokens wide (log-spaced frequencies, hence the ``theta`` factor)."""
    amplitudes = []
    for dim in _rope_dims(head_dim):
        theta = 1.0 / ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        energy = theta * torch.exp(-((theta * width) ** 2) / 2)
        amplitudes.append((energy / energy.mean()).sqrt().repeat_interleave(2))
    return torch.cat(amplitudes).float()


def _per_head(name: str, values, heads: int, per_axis: bool = False) -> torch.Tensor:
    """``[heads]`` (or ``[heads, 3]`` if ``per_axis``) float tensor of finite values >= 0."""
    try:
        rows = [[float(x)] * 3 if per_axis and not isinstance(x, (tuple, list)) else
                [float(y) for y in x] if per_axis else float(x) for x in values]
        out = torch.tensor(rows, dtype=torch.float32)
    except (TypeError, ValueError):
        out = None
    shape = (heads, 3) if per_axis else (heads,)
    if out is None or tuple(out.shape) != shape or not bool(torch.isfinite(out).all() and (out >= 0).all()):
        what = "a value or (t, h, w) triple" if per_axis else "a value"
        raise ValueError(f"{name} must give {what} >= 0 for each of the {heads} heads, got {values!r}")
    return out


def rope_3d(x: torch.Tensor, grid: Sequence[int], theta: float = ROPE_THETA) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[B, N, heads, D]`` (``D`` even) by the (t, h, w) position of
    every token, the head dim split over the axes as in Wan (t gets ``D - 4 * (D // 6)``, h and
    w ``2 * (D // 6)`` each), channel pairs ``(2i, 2i + 1)`` rotated together."""
    T, H, W = check_grid(grid)
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"head_dim must be even for the rotary embedding, got {D}")
    dims = _rope_dims(D)
    coords = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij"), -1)
    coords = coords.reshape(-1, 3).to(torch.float64)
    angles = []
    for axis, d in enumerate(dims):
        freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles.append(coords[:, axis : axis + 1] * freq)
    angle = torch.cat(angles, -1)[None, :, None, :]  # [1, N, 1, D/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


def video_attention_qkv(
    grid: Sequence[int],
    heads: int = 4,
    head_dim: int = 64,
    *,
    batch: int = 1,
    seed: int = 0,
    locality: Sequence[float | Sequence[float]] | None = None,
    content: Sequence[float] | None = None,
    scene: str = "smooth",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
):
    """q, k, v ``[batch, T*H*W, heads, head_dim]`` of a synthetic video (see the module
    docstring), frame-major row-major tokens.

    Args:
        grid: token grid ``(T, H, W)``.
        heads, head_dim: attention heads and (even) head dimension.
        batch: independent videos.
        seed: seeds the video and the projections; same arguments, same tensors.
        locality: per head weight of the positional term, one value or ``(l_t, l_h, l_w)``
            (0 = content only); default :func:`default_head_profile`.
        content: per head scale of the content term; default :func:`default_head_profile`.
        scene: the kind of video, a key of :data:`SCENES` (see :func:`video_frames`).
        dtype, device: of the returned tensors (generated in float32 on the CPU).
    """
    grid = check_grid(grid)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an int >= 1, got {heads!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be an even int >= 2, got {head_dim!r}")
    default_loc, default_content, _ = default_head_profile(heads)
    loc = _per_head("locality", default_loc if locality is None else locality, heads, per_axis=True)
    scale_c = _per_head("content", default_content if content is None else content, heads)

    features = patch_features(video_frames(grid, batch=batch, seed=seed, scene=scene))
    g = torch.Generator().manual_seed(seed + 1)
    F_dim = features.shape[-1]
    w_q = torch.randn(heads, F_dim, head_dim, generator=g) / math.sqrt(F_dim)
    w_k = QK_CORRELATION * w_q + math.sqrt(1 - QK_CORRELATION**2) * torch.randn(
        heads, F_dim, head_dim, generator=g) / math.sqrt(F_dim)
    w_v = torch.randn(heads, F_dim, head_dim, generator=g) / math.sqrt(F_dim)
    bias = torch.randn(heads, head_dim, generator=g)

    dims = _rope_dims(head_dim)
    pos = bias * _position_spectrum(head_dim) * torch.repeat_interleave(loc, torch.tensor(dims), dim=1)
    scale_c = scale_c[None, None, :, None]
    q = torch.einsum("bnf,hfd->bnhd", features, w_q) * scale_c + pos
    k = torch.einsum("bnf,hfd->bnhd", features, w_k) * scale_c + pos
    v = torch.einsum("bnf,hfd->bnhd", features, w_v)
    q, k = rope_3d(q, grid), rope_3d(k, grid)
    return [x.to(device=device, dtype=dtype).contiguous() for x in (q, k, v)]


__all__ = [
    "HEAD_KINDS",
    "MORE_HEAD_KINDS",
    "SCENES",
    "default_head_profile",
    "head_profile",
    "patch_features",
    "rope_3d",
    "video_attention_qkv",
    "video_frames",
]
