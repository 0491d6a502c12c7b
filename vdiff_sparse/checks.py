"""Argument checks, in one place.

Each ``check_<arg>`` returns the cleaned value (ints widened to per-axis tuples) or raises a
``ValueError`` that names the argument, what was given and what is allowed. Nothing here uses
``assert`` (``python -O`` removes it). :data:`Grid` is the one latent-grid type.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

Grid = tuple[int, int, int]


def check_grid(grid: Sequence[int]) -> Grid:
    """A latent grid ``(T, H, W)`` of positive ints; 1D/2D grids are padded with leading 1s."""
    try:
        values = tuple(int(g) for g in grid)
    except TypeError:
        raise ValueError(f"grid must be a tuple (T, H, W) of positive ints, got {grid!r}") from None
    if not 1 <= len(values) <= 3 or any(g < 1 for g in values) or any(
        int(g) != g for g in grid
    ):
        raise ValueError(f"grid must be 1 to 3 positive ints (T, H, W), got {grid!r}")
    return (1,) * (3 - len(values)) + values  # type: ignore[return-value]


def check_per_axis(
    name: str, value, *, minimum: int | None = None, ndim: int = 3, kind: type = int
) -> tuple:
    """Widen ``value`` (a scalar or a tuple of ``ndim`` or fewer entries) to ``ndim`` entries.

    A tuple shorter than ``ndim`` describes the trailing axes (a 2D window ``(7, 7)`` means
    ``(1, 7, 7)`` for ints, ``(False, ...)`` for bools). Ints must be integral (``2.5`` is
    refused, ``2.0`` from YAML is 2); bools must be ``True``/``False`` (or ``0``/``1``).
    """
    what = f"{name} must be a {kind.__name__} or a tuple of 1 to {ndim} of them (one per axis), got {value!r}"
    if isinstance(value, (str, bytes)):
        raise ValueError(what)
    raw = (value,) if isinstance(value, (int, float, bool)) else value
    try:
        raw = tuple(raw)
    except TypeError:
        raise ValueError(what) from None
    if not 1 <= len(raw) <= ndim:
        raise ValueError(what)
    values = []
    for v in raw:
        if kind is bool:
            if not (isinstance(v, bool) or (isinstance(v, int) and v in (0, 1))):
                raise ValueError(f"{name} entries must be True or False, got {value!r}")
            values.append(bool(v))
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError(f"{name} entries must be ints, got {value!r}")
        else:
            values.append(int(v))
    if len(values) == 1 and isinstance(value, (int, float, bool)):
        values = values * ndim
    fill = False if kind is bool else 1
    values = [fill] * (ndim - len(values)) + values
    if minimum is not None and any(v < minimum for v in values):
        raise ValueError(f"{name} must be >= {minimum} on every axis, got {value!r}")
    return tuple(values)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Sequence[int] | None = None):
    """q, k, v are floating ``[B, N, heads, D]`` tensors on one device, q and k of one shape,
    v of the same ``[B, N, heads]``, none of the sizes 0; ``N`` matches the grid if given.

    Returns the checked grid (or ``None``).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [B, N, heads, D], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{name} must be [B, N, heads, D] (4 dims), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
        if 0 in x.shape:
            raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)} ([B, N, heads, D], all >= 1)")
    if q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q, k, v must share [B, N, heads] and q/k the head dim; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if grid is None:
        return None
    grid = check_grid(grid)
    n = grid[0] * grid[1] * grid[2]
    if q.shape[1] != n:
        raise ValueError(
            f"grid {grid} has {n} tokens but q/k/v have N={q.shape[1]} (layout [B, N, heads, D]); "
            f"pass the latent grid after patchify, with T*H*W == N"
        )
    return grid


def check_scale(scale) -> float | None:
    """A logit scale: ``None`` (the default ``D ** -0.5``) or a finite number > 0."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0 (or None for head_dim ** -0.5), got {scale!r}")
    return float(scale)


def check_finite(**tensors: torch.Tensor) -> None:
    """Raise if any tensor holds NaN or Inf (selection on such inputs is meaningless, and
    attention would spread them over every query that sees them).

    Costs one sum per tensor: a NaN or Inf summand makes a sum NaN or Inf, so a finite total
    clears every tensor. A non-finite total can also be an overflow of large finite values, so
    only then does the element-wise test decide. On a GPU the check is an asynchronous device
    assert of the element-wise test (no host read): a non-finite value stops the program there,
    naming the tensor.
    """
    present = {name: x for name, x in tensors.items() if x is not None}
    if not present:
        return
    if next(iter(present.values())).device.type != "cpu":
        # On a GPU, reading a result back would stall the launch queue on every call: the
        # device checks every element and stops the program with this message if one is not
        # finite.
        for name, x in present.items():
            torch._assert_async(torch.isfinite(x).all(), f"{name} contains NaN/Inf values; inputs must be finite")
        return
    total = torch.stack([x.sum(dtype=torch.float32) for x in present.values()]).sum()
    if torch.isfinite(total):
        return
    for name, x in present.items():
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).sum().item()
            raise ValueError(f"{name} contains {bad} NaN/Inf values; inputs must be finite")


def check_choice(name: str, value, allowed: Sequence) -> None:
    """``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_positive_int(name: str, value, what: str = "") -> int:
    """``value`` is an int ``>= 1`` (not a bool); ``what`` adds a note to the message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{what}, got {value!r}")
    return value


def check_positive_ints(name: str, value, n: int) -> tuple[int, ...]:
    """``value`` is a sequence of ``n`` positive ints (integral floats from YAML accepted)."""
    try:
        values = tuple(value)
    except TypeError:
        values = ()
    if (
        len(values) != n
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v for v in values)
        or any(v < 1 for v in values)
    ):
        raise ValueError(f"{name} must be a tuple of {n} positive ints, got {value!r}")
    return tuple(int(v) for v in values)
