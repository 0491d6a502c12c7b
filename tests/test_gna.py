"""GNA: plans against the method's plain definition (``gna_mask``), attention against float64
dense attention under that mask, the torch backend against the reference, and NATTEN as an
oracle."""

from __future__ import annotations

import os
import random
import time
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from conftest import assert_close, random_qkv
from vdiff_sparse import GNAConfig, dense_attention, gna_attention, plan_gna
from vdiff_sparse.backends.reference import masked_attention
from vdiff_sparse.layout import BlockOrder, token_coords
from vdiff_sparse.methods.gna import (
    AUTO_TILE_MIN_TOKENS, _plan_gna_cpu, _shared_plan, auto_tile, gna_axis_mask, gna_mask,
)
from vdiff_sparse.plan import ExtraKeys

RAGGED_GRIDS = [(3, 5, 7), (4, 9, 11), (1, 13, 17), (2, 6, 10), (1, 1, 29), (5, 4, 6)]


# --- what a plan lets through ----------------------------------------------------------------
def plan_mask(plan):
    """``[N, N]`` bool in original token order: the pairs a plan lets through (its kv tiles,
    then its window), built from the plan's fields without any backend."""
    n = plan.num_tokens
    q_tile = plan.query_block_of_position()
    k_tile = BlockOrder(None, plan.k_offsets).block_of_position()
    listed = torch.zeros(plan.num_q_blocks, plan.num_k_blocks + 1, dtype=torch.bool)
    index = plan.kv_index[0, 0]
    listed.scatter_(1, torch.where(index >= 0, index, plan.num_k_blocks), True)
    mask = listed[q_tile][:, k_tile]
    if plan.window is not None:
        pos = torch.arange(n)
        mask &= plan.window.allows(pos, pos)
    perm = torch.arange(n) if plan.perm is None else plan.perm
    out = torch.zeros(n, n, dtype=torch.bool)
    out[perm[:, None], perm[None, :]] = mask
    return out


def random_config(rng, grid, tile=False):
    """Window, stride, dilation and causality valid for ``grid`` (1 on length-1 axes)."""
    window, stride, dilation, causal = [], [], [], []
    for n in grid:
        k = 1 if n == 1 else rng.randint(2, n)
        d = rng.randint(1, n // k)
        s = rng.randint(1, k)
        window.append(k)
        stride.append(s)
        dilation.append(d)
        causal.append(n > 1 and rng.random() < 0.3)
    cfg = dict(window=tuple(window), stride=tuple(stride), dilation=tuple(dilation), causal=tuple(causal))
    if tile:
        cfg["tile"] = tuple(rng.randint(1, n + 1) for n in grid)
    return cfg


def masked_sdpa(q, k, v, mask, extra_k=None, extra_v=None, extra_mask=None):
    """Dense float64 attention of ``[B, N, heads, D]`` tensors under an ``[N, N]`` key mask."""
    extra = None if extra_k is None else ExtraKeys(extra_k, extra_v, extra_mask)
    return masked_attention(q, k, v, mask, extra)


# --- the plan is exactly the spec ----------------------------------------------------------


@pytest.mark.parametrize("grid", RAGGED_GRIDS, ids=str)
@pytest.mark.parametrize("tile", [False, True], ids=["auto_tile", "random_tile"])
def test_plan_mask_equals_brute_force(grid, tile, seed):
    rng = random.Random(seed)
    for _ in range(12):
        cfg = random_config(rng, grid, tile)
        plan = plan_gna(grid, **cfg)
        expected = gna_mask(grid, cfg["window"], cfg["stride"], cfg["dilation"], cfg["causal"])
        assert torch.equal(plan_mask(plan), expected), f"{grid} {cfg}"
        # Density counts exactly the window keys of each query.
        assert plan.density() == pytest.approx(expected.double().mean().item(), rel=1e-12)
        assert plan.method == "gna" and plan.info["window"] == cfg["window"]


@pytest.mark.parametrize(
    "grid, cfg",
    [
        ((1, 1, 19), dict(window=5)),
        ((1, 9, 11), dict(window=(3, 4), stride=(2, 3), dilation=(2, 1))),
        ((3, 8, 8), dict(window=(2, 3, 3), causal=(True, False, False))),
        ((4, 9, 11), dict(window=(3, 5, 5), stride=(3, 5, 5))),  # blocked attention (s = k)
        ((5, 7, 9), dict(window=(3, 3, 3), dilation=(1, 2, 3))),
        ((6, 7, 9), dict(window=(4, 4, 4), stride=(4, 2, 1), causal=(True, True, False))),
    ],
    ids=["1d", "2d-dilated-strided", "causal-t", "blocked", "dilated", "causal-strided"],
)
def test_named_configs_equal_brute_force(grid, cfg):
    plan = plan_gna(grid, **cfg)
    g = plan.info
    expected = gna_mask(grid, g["window"], g["stride"], g["dilation"], g["causal"])
    assert torch.equal(plan_mask(plan), expected)
    n = grid[0] * grid[1] * grid[2]
    assert plan.density() == pytest.approx(expected.sum().item() / n**2, rel=1e-12)


def test_non_causal_windows_have_exactly_k_keys_per_axis():
    # Shifted inward at borders, never truncated: k^3 keys / dilation lattices included.
    plan = plan_gna((7, 9, 12), (3, 4, 5), stride=(2, 1, 3), dilation=(2, 2, 1))
    assert plan.window is not None
    assert (plan.window.keys_per_query() == 3 * 4 * 5).all()
    assert plan.density() == pytest.approx(60 / (7 * 9 * 12))


def test_block_aligned_config_drops_the_window(seed):
    # Sliding-tile style: tile-aligned starts on every axis, also at the clamped borders.
    grid, cfg = (8, 12, 20), dict(window=(6, 12, 12), stride=(2, 4, 4), tile=(2, 4, 4))
    plan = plan_gna(grid, **cfg)
    assert plan.window is None and plan.info["block_aligned"] and not plan.info["dense"]
    expected = gna_mask(grid, (6, 12, 12), (2, 4, 4), (1, 1, 1), (False,) * 3)
    assert torch.equal(plan_mask(plan), expected)
    assert plan.density() == pytest.approx(expected.double().mean().item())
    assert plan.stats()["block_density"] == pytest.approx(plan.density())
    q, k, v = random_qkv(1, 8 * 12 * 20, 2, 8, dtype=torch.float64, seed=seed)
    for backend in ("reference", "torch"):
        out = gna_attention(q, k, v, grid, **cfg, backend=backend)
        assert_close(out, masked_sdpa(q, k, v, expected), torch.float64, backend)


def test_sliding_tile_attention_is_block_sparse_with_auto_tile():
    # window = 3 tiles, stride = tile: auto_tile picks tile = stride, no mask needed.
    plan = plan_gna((256, 256), (80, 80), (16, 16))
    assert plan.info["tile"] == (1, 16, 16) and plan.window is None
    assert plan.density() == pytest.approx(plan.stats()["block_density"])
    assert plan.density() == pytest.approx(80 * 80 / 256**2)


def test_misaligned_config_keeps_the_window():
    plan = plan_gna((4, 8, 16), (4, 8, 8), (2, 4, 4), tile=(2, 4, 4))
    assert plan.window is not None and not plan.info["block_aligned"]


@pytest.mark.parametrize("grid", [(3, 5, 7), (1, 6, 10), (4, 4, 4)], ids=str)
def test_whole_axis_window_is_dense(grid, seed):
    plan = plan_gna(grid, grid, stride=(1, 2, 3))
    assert plan.info["dense"] and plan.window is None and plan.density() == 1.0
    assert (plan.kv_index >= 0).sum(-1).eq(plan.num_k_blocks).all()
    n = grid[0] * grid[1] * grid[2]
    q, k, v = random_qkv(2, n, 2, 8, dtype=torch.float64, seed=seed)
    expected = dense_attention(q, k, v)
    for backend in ("auto", "reference", "torch"):
        assert_close(gna_attention(q, k, v, grid, window=grid, backend=backend), expected, torch.float64, backend)
    causal = plan_gna(grid, grid, causal=(False, False, True))
    assert not causal.info["dense"] and causal.density() < 1.0


def test_plan_is_cached_on_normalised_arguments_and_handed_out_as_copies():
    a = _shared_plan((3, 5, 7), (3, 3, 3), 1, 1, False, None, "cpu")
    b = _shared_plan([3, 5, 7], [3, 3, 3], (1, 1, 1), 1, (False, False, False), None, "cpu")
    assert a is b
    assert _shared_plan((3, 5, 7), (3, 3, 3), 1, (1, 1, 2), False, None, "cpu") is not a  # another dilation
    copy = plan_gna((3, 5, 7), (3, 3, 3), 1)
    assert copy is not a and copy.kv_index.data_ptr() != a.kv_index.data_ptr()
    assert torch.equal(copy.kv_index, a.kv_index) and copy.info == a.info


@pytest.mark.parametrize(
    "grid, window, stride, dilation, expected",
    [
        ((21, 30, 52), (3, 7, 7), 1, 1, (2, 4, 8)),
        ((30, 48, 80), (18, 24, 24), (16, 8, 8), 1, (16, 8, 8)),
        ((1, 64, 64), (9, 9), 1, 1, (1, 8, 8)),
        ((2, 3, 5), (2, 3, 3), 1, 1, (2, 3, 5)),  # whole grid is below the target volume
    ],
    ids=["wan-na", "hunyuan-sta", "image", "tiny"],
)
def test_auto_tile_rule(grid, window, stride, dilation, expected):
    g = plan_gna(grid, window, stride, dilation).info
    assert g["tile"] == expected
    assert auto_tile(grid, g["window"], g["stride"], g["dilation"]) == expected
    # Stride-1 axes grow only until the target volume is reached.
    if all(s == 1 for s in g["stride"]) and expected != grid:
        assert AUTO_TILE_MIN_TOKENS <= expected[0] * expected[1] * expected[2] < 2 * AUTO_TILE_MIN_TOKENS


@pytest.mark.parametrize(
    "grid, window, stride",
    [((21, 30, 52), (3, 7, 7), 1), ((30, 48, 80), (18, 24, 24), (16, 8, 8)), ((21, 30, 52), (5, 9, 9), (1, 3, 3))],
    ids=["wan-480p", "hunyuan-720p", "wan-strided"],
)
def test_large_grid_plans_are_fast_and_consistent(grid, window, stride):
    _plan_gna_cpu.cache_clear()
    start = time.perf_counter()
    plan = plan_gna(grid, window, stride)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"planning {grid} took {elapsed:.2f}s"
    n = grid[0] * grid[1] * grid[2]
    # Spot-check rows of the token mask: the plan's keys of a few queries equal the spec's.
    per_axis = [gna_axis_mask(a, k, s, 1, False) for a, k, s in zip(grid, plan.info["window"], plan.info["stride"])]
    pos = torch.tensor([0, 1, n // 3, n // 2 + 17, n - 1])
    q_tile = plan.query_block_of_position()[pos]
    k_tile = BlockOrder(None, plan.k_offsets).block_of_position()
    keys = torch.arange(n)
    listed = (plan.kv_index[0, 0, q_tile][:, :, None] == k_tile[None, None, :]).any(1)
    if plan.window is not None:
        listed &= plan.window.allows(pos, keys)
    coords = token_coords(grid, plan.perm)
    for row, p in enumerate(pos.tolist()):
        c = coords[p]
        want = torch.ones(n, dtype=torch.bool)
        for axis in range(3):
            want &= per_axis[axis][int(c[axis])][coords[:, axis]]
        assert torch.equal(listed[row], want), f"query at {tuple(c.tolist())}"
    vol = 1
    for k in plan.info["window"]:
        vol *= k
    assert plan.density() == pytest.approx(vol / n)


# --- attention -----------------------------------------------------------------------------


ATTENTION_CASES = {
    "3d-ragged": ((3, 5, 7), dict(window=(2, 3, 5), stride=(1, 2, 3), dilation=(1, 1, 1))),
    "3d-dilated-causal": ((4, 9, 11), dict(window=(2, 4, 3), dilation=(2, 2, 3), causal=(True, False, False))),
    "2d": ((1, 13, 17), dict(window=(5, 7), stride=(2, 4), causal=(False, True))),
    "1d": ((1, 1, 37), dict(window=9, stride=3, dilation=2)),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES), ids=str)
@pytest.mark.parametrize("text", [False, True], ids=["no_text", "text"])
def test_reference_attention_equals_brute_force(case, text, seed):
    grid, cfg = ATTENTION_CASES[case]
    n = grid[0] * grid[1] * grid[2]
    q, k, v = random_qkv(2, n, 3, 8, dtype=torch.float64, seed=seed)
    extra = {}
    if text:
        ek, ev, _ = random_qkv(2, 5, 3, 8, dtype=torch.float64, seed=seed + 1)
        pad = torch.tensor([[True] * 5, [True, True, True, False, False]])
        extra = dict(extra_k=ek, extra_v=ev, extra_mask=pad)
    out, plan = gna_attention(q, k, v, grid, **cfg, backend="reference", return_plan=True, **extra)
    g = plan.info
    mask = gna_mask(grid, g["window"], g["stride"], g["dilation"], g["causal"])
    assert_close(out, masked_sdpa(q, k, v, mask, **extra), torch.float64, case)


@pytest.mark.parametrize("case", list(ATTENTION_CASES), ids=str)
def test_gradients_equal_brute_force(case, seed):
    grid, cfg = ATTENTION_CASES[case]
    n = grid[0] * grid[1] * grid[2]
    q, k, v = random_qkv(1, n, 2, 8, dtype=torch.float64, seed=seed, requires_grad=True)
    ek, ev, _ = random_qkv(1, 3, 2, 8, dtype=torch.float64, seed=seed + 1, requires_grad=True)
    grad_out = torch.randn(1, n, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    plan = plan_gna(grid, **cfg)
    g = plan.info
    mask = gna_mask(grid, g["window"], g["stride"], g["dilation"], g["causal"])
    inputs = (q, k, v, ek, ev)
    expected = torch.autograd.grad((masked_sdpa(q, k, v, mask, ek, ev) * grad_out).sum(), inputs)
    for backend in ("reference", "torch"):
        out = gna_attention(q, k, v, grid, **cfg, extra_k=ek, extra_v=ev, backend=backend)
        grads = torch.autograd.grad((out * grad_out).sum(), inputs)
        for name, got, want in zip(("q", "k", "v", "extra_k", "extra_v"), grads, expected):
            assert_close(got, want, torch.float64, f"{backend} d{name}")


@pytest.mark.parametrize("grid", RAGGED_GRIDS[:4], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_backend_matches_reference(grid, dtype, seed):
    rng = random.Random(seed)
    n = grid[0] * grid[1] * grid[2]
    for i in range(3):
        cfg = random_config(rng, grid, tile=i == 2)
        q, k, v = random_qkv(2, n, 2, 16, dtype=dtype, seed=seed + i)
        ek, ev, _ = random_qkv(2, 4, 2, 16, dtype=dtype, seed=seed + 100 + i)
        pad = torch.tensor([[True, True, True, True], [True, False, True, False]])
        extra = dict(extra_k=ek, extra_v=ev, extra_mask=pad)
        ref = gna_attention(q, k, v, grid, **cfg, backend="reference", **extra)
        out = gna_attention(q, k, v, grid, **cfg, backend="torch", **extra)
        g = plan_gna(grid, **cfg).info
        mask = gna_mask(grid, g["window"], g["stride"], g["dilation"], g["causal"])
        expected = masked_sdpa(q, k, v, mask, **extra)
        assert out.dtype == dtype
        assert_close(out, expected, dtype, f"torch {cfg}")
        assert_close(ref, expected, dtype, f"reference {cfg}")


def test_auto_backend_and_batch_heads_broadcast(seed):
    grid = (2, 6, 10)
    q, k, v = random_qkv(3, 120, 4, 16, seed=seed)
    out, plan = gna_attention(q, k, v, grid, window=(2, 3, 5), return_plan=True)
    assert plan.kv_index.shape[:2] == (1, 1)
    mask = gna_mask(grid, (2, 3, 5), (1, 1, 1), (1, 1, 1), (False,) * 3)
    assert_close(out, masked_sdpa(q, k, v, mask), torch.float32)


# --- NATTEN as an oracle -------------------------------------------------------------------


def import_natten():
    """NATTEN, the independent GNA oracle. Missing, the oracle tests fail (a skip would pass an
    install that forgot it) unless ``VDIFF_SPARSE_WITHOUT_NATTEN=1`` says it is left out on
    purpose."""
    try:
        import natten
    except ImportError:
        if os.environ.get("VDIFF_SPARSE_WITHOUT_NATTEN") == "1":
            pytest.skip("NATTEN left out on purpose (VDIFF_SPARSE_WITHOUT_NATTEN=1)")
        pytest.fail("NATTEN, the GNA oracle, is not installed: pip install --no-build-isolation "
                    "'natten>=0.21,<0.22' after torch (make test does), or set VDIFF_SPARSE_WITHOUT_NATTEN=1")
    return natten


def natten_configs():
    """At least 24 seeded configs (1D/2D/3D, stride, dilation, causal), each < 2K tokens."""
    rng = random.Random(20240521)
    grids = [(1, 1, 97), (1, 1, 64), (1, 19, 29), (1, 12, 16), (1, 23, 31), (5, 9, 13), (4, 8, 12), (3, 11, 7)]
    out = []
    for i in range(27):
        grid = grids[i % len(grids)]
        cfg = random_config(rng, grid)
        out.append(pytest.param(grid, cfg, id=f"{i}-{'x'.join(map(str, grid))}"))
    return out


@pytest.mark.parametrize("grid, cfg", natten_configs())
def test_matches_natten(grid, cfg, seed):
    """NATTEN 0.21's ``na1d/na2d/na3d`` with ``backend="flex-fna"``: FlexAttention run eagerly
    (unfused, materialises the scores; float32 only) — the NATTEN backend that runs on CPU."""
    natten = import_natten()
    ndim = sum(n > 1 for n in grid)
    spatial = grid[3 - ndim :]
    n = grid[0] * grid[1] * grid[2]
    q, k, v = random_qkv(2, n, 2, 16, seed=seed)
    ours = gna_attention(q, k, v, grid, **cfg, backend="torch")
    fn = {1: natten.functional.na1d, 2: natten.functional.na2d, 3: natten.functional.na3d}[ndim]
    args = {name: tuple(cfg[name][3 - ndim :]) for name in ("window", "stride", "dilation", "causal")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = fn(
            *(x.reshape(2, *spatial, 2, 16) for x in (q, k, v)),
            kernel_size=args["window"],
            stride=args["stride"],
            dilation=args["dilation"],
            is_causal=args["causal"],
            backend="flex-fna",
        )
    assert_close(ours, theirs.reshape(2, n, 2, 16), torch.float32, f"{grid} {cfg}")


# --- configs and errors --------------------------------------------------------------------


def test_config_plan_and_omegaconf():
    cfg = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(GNAConfig), {"window": [3, 7, 7], "stride": [1, 2, 2]})
    )
    assert isinstance(cfg, GNAConfig)
    plan = cfg.plan((3, 8, 10))
    assert plan.info["window"] == (3, 7, 7) and plan.info["stride"] == (1, 2, 2)
    assert torch.equal(plan.kv_index, plan_gna((3, 8, 10), (3, 7, 7), (1, 2, 2)).kv_index)
    # A video preset on a one-frame grid: the length-1 axis takes window 1.
    assert GNAConfig(window=(5, 7, 7)).plan((1, 9, 9)).info["window"] == (1, 7, 7)
    with pytest.raises(ValueError, match=r"stride\[0\]=4 > window\[0\]=3"):
        GNAConfig(window=3, stride=4)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        GNAConfig(window=3, dilation=0)
    with pytest.raises(ValueError, match="tile must be >= 1"):
        GNAConfig(window=3, tile=(0, 2, 2))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(window=(3, 6, 3)), r"window\[1\]=6 must be in 2\.\.5 .*got window=\(3, 6, 3\)"),
        (dict(window=(3, 1, 3)), r"window\[1\]=1 must be in 2\.\.5"),
        (dict(window=(3, 3, 3), stride=(1, 4, 1)), r"stride\[1\]=4 must be in 1\.\.window\[1\]=3"),
        (dict(window=(2, 3, 4), dilation=(1, 1, 2)), r"window\[2\] \* dilation\[2\] = 4 \* 2 = 8 must be <= 7.*dilation\[2\] is 1\.\.1"),
        (dict(window=(2, 2, 2), dilation=(2, 2, 0)), r"dilation must be >= 1"),
        (dict(window=(2, 2, 2), tile=(2, -1, 2)), r"tile must be >= 1"),
    ],
    ids=["window-too-large", "window-1", "stride-gt-window", "dilation-too-large", "dilation-0", "tile"],
)
def test_plan_errors_name_the_argument(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        plan_gna((3, 5, 7), **kwargs)


def test_attention_errors():
    q, k, v = random_qkv(1, 105, 2, 8)
    with pytest.raises(ValueError, match=r"grid \(3, 5, 6\) has 90 tokens but q/k/v have N=105"):
        gna_attention(q, k, v, (3, 5, 6), window=3)
    with pytest.raises(ValueError, match=r"window\[0\]=4 must be in 2\.\.3"):
        gna_attention(q, k, v, (3, 5, 7), window=(4, 3, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        gna_attention(q, k, v, (3, 5, 7), window=3, backend="cuda")
    # Non-finite inputs, also for a window covering the grid (run as dense SDPA).
    for name, window in (("q", 3), ("k", 3), ("v", 3), ("v", (3, 5, 7))):
        bad = {"q": q, "k": k, "v": v}
        bad[name] = bad[name].clone()
        bad[name][0, 4, 1, 3] = float("nan") if name != "k" else float("-inf")
        with pytest.raises(ValueError, match=rf"^{name} contains 1 NaN/Inf values"):
            gna_attention(bad["q"], bad["k"], bad["v"], (3, 5, 7), window=window)
