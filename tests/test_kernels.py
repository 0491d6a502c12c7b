"""Triton kernels (``backend="triton"``) against the float64 reference, forward and backward.

Without CUDA the kernels run under the Triton interpreter on CPU tensors. The flag is set only
for this module's tests (a fixture), so other test modules keep choosing the torch backend for
``backend="auto"``; the backend reloads its kernel module if it was imported in the other mode.
The interpreter costs ~1 ms per tile pair: problems here are small (N ~ 100-300, 32x32 tiles).
The work count of the kernels is tested in ``test_kernel_work.py``.

Covered: dense, hand-built and real method plans (GNA incl. causal axes,
dilation and block-aligned configs; PSA levels 1/2/4/8 for b_k 32/64/128; VMoBA routing incl. the
skip of tiles no query routed to), ragged blocks, fp32/fp16/bf16, head dims 32/64/128, text keys
with padding masks, forward and dq/dk/dv plus text key gradients.
"""

from __future__ import annotations


import pytest
import torch

from tests.conftest import random_qkv
from vdiff_sparse.backends import ExtraKeys
from vdiff_sparse.backends.reference import reference_attention
from vdiff_sparse.layout import token_coords, uniform_offsets
from vdiff_sparse.plan import AttentionPlan, TokenWindow, dense_plan, pack_block_selection

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytest.importorskip("triton", reason="the Triton kernels need the triton package")

# Max abs error vs float64 (outputs are O(1); gradients are divided by max(1, |ref|max)).
FWD_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
BWD_TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Run the kernels under the interpreter when there is no GPU (this module only)."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def triton_backend():
    from vdiff_sparse.backends.triton import TritonBackend

    return TritonBackend()


# --- plans built by hand ----------------------------------------------------------------------

def ragged_offsets(n: int, sizes: list[int]) -> torch.Tensor:
    """Block boundaries cycling through ``sizes`` until ``n`` (last block cut short)."""
    cuts, pos, i = [0], 0, 0
    while pos < n:
        pos = min(n, pos + sizes[i % len(sizes)])
        cuts.append(pos)
        i += 1
    return torch.tensor(cuts, dtype=torch.int64)


def block_plan(q_offsets, k_offsets, selected, levels=None, token_keep=None, window=None):
    kv_index, kv_level = pack_block_selection(selected, levels)
    return AttentionPlan(None, q_offsets, k_offsets, kv_index, kv_level, token_keep, window, method="test")


def random_selection(shape, density, gen, empty_rows=0):
    sel = torch.rand(shape, generator=gen) < density
    if empty_rows:
        sel[..., :empty_rows, :] = False
    return sel


def cube_window(grid, radius, dilation=(1, 1, 1)):
    """A per-query box of half-width ``radius * dilation`` around each token, clipped nowhere
    (keys outside the grid simply do not exist)."""
    coords = token_coords(grid, None)
    reach = torch.tensor(radius) * torch.tensor(dilation)
    return TokenWindow(coords, coords - reach, coords + reach, tuple(dilation))


# --- running and comparing ----------------------------------------------------------------------

def check(plan, B=1, H=2, D=32, dtype=torch.float32, seed=0, extra=None, backward=True, device=DEVICE):
    """Compare forward (and dq, dk, dv, extra grads) of the triton backend with the reference."""
    N = plan.num_tokens
    q, k, v = random_qkv(B, N, H, D, dtype=dtype, seed=seed, device=device, requires_grad=backward)
    plan = plan.to(device)
    leaves = [q, k, v]
    if extra is not None:
        extra = ExtraKeys(extra.k.to(device, dtype).requires_grad_(backward),
                          extra.v.to(device, dtype).requires_grad_(backward),
                          None if extra.mask is None else extra.mask.to(device))
        leaves += [extra.k, extra.v]
    out = triton_backend().forward(q, k, v, plan, extra)
    assert out.dtype == dtype and out.shape == (B, N, H, D)

    ref_leaves = [t.detach().double().requires_grad_(backward) for t in leaves]
    ref_extra = None if extra is None else ExtraKeys(ref_leaves[3], ref_leaves[4], extra.mask)
    ref = reference_attention(*ref_leaves[:3], plan, ref_extra)
    err = (out.double() - ref).abs().max().item()
    assert err <= FWD_TOL[dtype], f"forward max abs error {err:.3g} > {FWD_TOL[dtype]}"
    if not backward:
        return out, ref
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=g).to(device)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    for name, got, want in zip(["dq", "dk", "dv", "d_extra_k", "d_extra_v"], grads, ref_grads):
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        rel = ((got.double() - want).abs().max() / want.abs().max().clamp(min=1.0)).item()
        assert rel <= BWD_TOL[dtype], f"{name}: relative error {rel:.3g} > {BWD_TOL[dtype]}"
    return out, ref


# --- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_dense_plan(dtype, seed):
    check(dense_plan(100, 32), dtype=dtype, seed=seed)


@pytest.mark.parametrize("D", [32, 64, 128], ids=lambda d: f"D{d}")
def test_random_blocks_ragged(D, seed):
    """Per-(batch, head) plans over ragged, different query and key blocks; some rows empty."""
    gen = torch.Generator().manual_seed(seed)
    N = 107
    qo, ko = ragged_offsets(N, [24, 40, 9]), ragged_offsets(N, [33, 17])
    sel = random_selection((2, 2, qo.numel() - 1, ko.numel() - 1), 0.5, gen, empty_rows=1)
    check(block_plan(qo, ko, sel), B=2, D=D, seed=seed)


@pytest.mark.parametrize("level", [1, 2, 4, 8], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("b_k", [32, 64, 128], ids=lambda b: f"bk{b}")
def test_pool_levels(b_k, level, seed):
    """Every (key block, pool factor) pair, ragged last block (packing pooled rows into tiles
    is easy to get wrong when a pooled block is shorter than half a tile)."""
    gen = torch.Generator().manual_seed(seed)
    N = 2 * b_k + 37
    qo, ko = uniform_offsets(N, 48), uniform_offsets(N, b_k)
    sel = random_selection((1, 1, qo.numel() - 1, ko.numel() - 1), 0.7, gen)
    sel[..., -1] = True  # the ragged last key block is always seen
    levels = torch.full(sel.shape, level, dtype=torch.int64)
    check(block_plan(qo, ko, sel, levels), H=1, seed=seed)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_mixed_levels_ragged_blocks(dtype, seed):
    """Random levels per entry over ragged key blocks whose sizes are not multiples of 8."""
    gen = torch.Generator().manual_seed(seed)
    N = 150
    qo, ko = ragged_offsets(N, [40, 23]), ragged_offsets(N, [29, 13, 36])
    sel = random_selection((1, 2, qo.numel() - 1, ko.numel() - 1), 0.8, gen)
    levels = torch.tensor([1, 2, 4, 8])[torch.randint(0, 4, sel.shape, generator=gen)]
    check(block_plan(qo, ko, sel, levels), dtype=dtype, seed=seed)


def test_token_keep(seed):
    """Per-token routing: queries use only their own entries; tiles with no user skip a block."""
    gen = torch.Generator().manual_seed(seed)
    N = 130
    qo, ko = uniform_offsets(N, 40), uniform_offsets(N, 24)
    sel = random_selection((1, 2, qo.numel() - 1, ko.numel() - 1), 0.6, gen)
    kv_index, _ = pack_block_selection(sel)
    keep = torch.rand(1, 2, N, kv_index.shape[-1], generator=gen) < 0.4
    keep[:, :, :20] = False  # a whole tile that routes nowhere: those queries output 0
    plan = AttentionPlan(None, qo, ko, kv_index, token_keep=keep)
    out, _ = check(plan, B=2, seed=seed)
    assert out[:, :16].abs().max() == 0


@pytest.mark.parametrize(
    "radius,dilation",
    [((1, 2, 2), (1, 1, 1)), ((0, 1, 2), (1, 2, 1)), ((1, 5, 7), (1, 1, 1))],
    ids=["plain", "dilated", "frame_aligned"],  # frame_aligned: most pairs skip the window test
)
def test_window(radius, dilation, seed):
    """GNA coordinate windows (hand-built) over tiles of a ragged grid."""
    grid = (3, 5, 7)
    N = 105
    offsets = uniform_offsets(N, 35)
    sel = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    sel[0, 0, 0, 2] = False  # frame 0 never reaches frame 2 with radius <= 1
    plan = block_plan(offsets, offsets, sel, window=cube_window(grid, radius, dilation))
    check(plan, H=1, seed=seed)


def method_plan(method, q, k, grid):
    """A small real plan of ``method`` (pooled levels for PSA, per-token routing for VMoBA)."""
    mod = pytest.importorskip(f"vdiff_sparse.methods.{method}", reason=f"{method} not written yet")
    if method == "gna":
        return mod.plan_gna(grid, window=(2, 3, 5), stride=(1, 2, 1))
    if method == "psa":
        config = mod.PSAConfig(block_q=32, block_k=32, mode="quantile", fractions={1: 0.3, 2: 0.2, 4: 0.2, 8: 0.2})
        plan = mod.plan_psa(q, k, grid, config)
        assert bool((plan.kv_level > 1).any())
        return plan
    config = mod.VMoBAConfig(topk=3, query_block=32, block_3d=(2, 3, 4))
    plan = mod.plan_vmoba(q, k, grid, layer_index=2, config=config)
    assert plan.token_keep is not None
    return plan


def text_keys(B, H, D, n, gen):
    """``n`` extra keys with a padding mask (batch 0 keeps only its first 5)."""
    ek, ev = torch.randn(2, B, n, H, D, generator=gen)
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[0, 5:] = False
    return ExtraKeys(ek, ev, mask)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("method", ["gna", "psa", "vmoba"])
def test_method_plans(method, dtype, seed):
    """Real plans of each method (permuted, pooled, routed, windowed) on a ragged grid, with
    masked text keys, forward and backward in every dtype."""
    grid = (3, 5, 7)
    q, k, _ = random_qkv(1, 105, 2, 32, seed=seed)
    plan = method_plan(method, q, k, grid)
    gen = torch.Generator().manual_seed(seed)
    # The kernels get plan-order tensors; a fresh draw keeps selection and attention inputs apart.
    check(plan, B=1, dtype=dtype, seed=seed + 7, extra=text_keys(1, 2, 32, 9, gen))


@pytest.mark.parametrize(
    "window,stride,dilation,causal",
    [
        ((2, 3, 4), (1, 2, 1), 1, (True, False, False)),
        ((2, 2, 3), (1, 1, 2), (1, 2, 2), (False, True, True)),
        ((3, 3, 3), 1, (1, 1, 2), True),
    ],
    ids=["causal_t", "causal_hw_dilated", "causal_all_dilated_w"],
)
def test_gna_causal_dilated(window, stride, dilation, causal, seed):
    """Real GNA plans with causal axes and dilation (in-kernel coordinate windows)."""
    from vdiff_sparse.methods.gna import plan_gna

    plan = plan_gna((4, 5, 6), window, stride, dilation, causal)
    assert plan.window is not None
    check(plan, H=1, seed=seed)


def test_gna_block_aligned_has_no_window(seed):
    """Blocked attention with tiles equal to the windows: the plan carries no window, so the
    kernels run without any coordinate test, and still match the reference."""
    from vdiff_sparse.methods.gna import plan_gna

    plan = plan_gna((4, 6, 8), window=(2, 3, 4), stride=(2, 3, 4), tile=(2, 3, 4))
    assert plan.info["block_aligned"] and plan.window is None
    check(plan, H=1, seed=seed)


def test_gna_tiles_sharing_a_window(seed):
    """Stride = tile with a window that is not a union of whole tiles: every query tile shares
    one window, so the box kernels launch without the pair test (and ``dk``/``dv`` with it)."""
    from vdiff_sparse.backends.triton import _kernels
    from vdiff_sparse.methods.gna import plan_gna

    plan = plan_gna((4, 6, 6), window=(4, 4, 4), stride=(2, 3, 3))
    assert plan.window is not None and plan.window.grid is not None
    tables, _ = _kernels("tables").plan_tables(plan, _kernels("tiles").INTERPRETER_TILES)
    assert isinstance(tables, _kernels("tables").BoxTables) and not tables.q_masked
    check(plan, H=2, seed=seed)


def test_routed_with_pooled_levels(seed):
    """Per-token routing over entries at pool levels 1/2/4/8 (key-major rounds over pooled
    ranges), ragged key blocks."""
    gen = torch.Generator().manual_seed(seed)
    N = 140
    qo, ko = uniform_offsets(N, 40), ragged_offsets(N, [32, 27])
    sel = random_selection((1, 2, qo.numel() - 1, ko.numel() - 1), 0.7, gen)
    levels = torch.tensor([1, 2, 4, 8])[torch.randint(0, 4, sel.shape, generator=gen)]
    kv_index, kv_level = pack_block_selection(sel, levels)
    keep = torch.rand(1, 2, N, kv_index.shape[-1], generator=gen) < 0.5
    check(AttentionPlan(None, qo, ko, kv_index, kv_level, keep), seed=seed)


def test_unrouted_blocks_are_skipped(seed):
    """A key block that a query tile lists but none of its queries routed to is never read:
    poisoned (NaN) keys and values there leave outputs and dq finite and give dk = dv = 0."""
    gen = torch.Generator().manual_seed(seed)
    N, H = 96, 2
    offsets = uniform_offsets(N, 32)
    sel = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 0]], dtype=torch.bool).expand(1, H, 3, 3)
    kv_index, _ = pack_block_selection(sel)
    keep = torch.rand(1, H, N, kv_index.shape[-1], generator=gen) < 0.6
    keep[:, :, :32, 2] = False  # tile 0 lists key block 2, but none of its queries uses it
    keep[:, :, 40:50] = False  # ten queries route nowhere: output 0
    plan = AttentionPlan(None, offsets, offsets, kv_index, token_keep=keep).to(DEVICE)
    q, k, v = random_qkv(1, N, H, 32, seed=seed, device=DEVICE)
    clean = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = reference_attention(*clean, plan)
    poisoned = [t.detach().clone() for t in (q, k, v)]
    poisoned[1][:, 64:] = float("nan")
    poisoned[2][:, 64:] = float("nan")
    poisoned = [t.requires_grad_(True) for t in poisoned]
    out = triton_backend().forward(*poisoned, plan)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() <= FWD_TOL[torch.float32]
    assert out[:, 40:50].abs().max() == 0
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    dq, dk, dv = torch.autograd.grad(out, poisoned, dout)
    ref_dq, _, _ = torch.autograd.grad(ref, clean, dout.double())
    assert (dq.double() - ref_dq).abs().max() <= BWD_TOL[torch.float32] * max(1.0, ref_dq.abs().max().item())
    assert dk[:, 64:].abs().max() == 0 and dv[:, 64:].abs().max() == 0


@pytest.mark.parametrize("masked", [False, True], ids=["all_real", "padding_mask"])
def test_extra_keys(masked, seed):
    gen = torch.Generator().manual_seed(seed)
    B, H, D, N, Ne = 2, 2, 32, 90, 21
    qo = uniform_offsets(N, 32)
    sel = random_selection((1, 1, 3, 3), 0.5, gen, empty_rows=1)  # block 0: text keys only
    ek, ev = torch.randn(2, B, Ne, H, D, generator=gen)
    mask = None
    if masked:
        mask = torch.rand(B, Ne, generator=gen) < 0.6
        mask[1] = False  # batch 1 has no real text: its empty rows output 0
    out, _ = check(block_plan(qo, qo, sel), B=B, H=H, D=D, seed=seed, extra=ExtraKeys(ek, ev, mask))
    if masked:
        assert out[1, :32].abs().max() == 0


def test_rows_without_keys(seed):
    """Query blocks with no entry output 0 with zero, finite gradients."""
    N = 64
    offsets = uniform_offsets(N, 16)
    sel = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    sel[0, 0, 1, 2] = True
    out, _ = check(block_plan(offsets, offsets, sel), seed=seed)
    assert out[:, :16].abs().max() == 0 and out[:, 32:].abs().max() == 0


def test_pool_gradient_spreads_evenly():
    from vdiff_sparse.kernels.pooling import pool

    offsets = torch.tensor([0, 5, 13])  # groups of 4: [4, 1] and [4, 4]
    x = torch.randn(1, 13, 1, 2, requires_grad=True)
    pooled = pool(x, offsets, 4, rows=4)
    assert pooled.shape == (1, 4, 1, 2)
    torch.testing.assert_close(pooled[0, 1, 0], x[0, 4, 0])
    torch.testing.assert_close(pooled[0, 3, 0], x[0, 9:13, 0].mean(0))
    pooled.sum().backward()
    expected = torch.tensor([0.25] * 4 + [1.0] + [0.25] * 8)
    torch.testing.assert_close(x.grad[0, :, 0, 0], expected)


@pytest.mark.parametrize(
    "shape,value_dim,dtype,device,interp,reason",
    [
        ((1, 8, 1, 96), 96, torch.float32, "cpu", True, "head dim 96 is not supported"),
        ((1, 8, 1, 32), 48, torch.float32, "cpu", True, "value head dim 48 is not supported"),
        ((1, 8, 1, 32), 32, torch.float64, "cpu", True, "dtype torch.float64 is not supported"),
        ((1, 8, 1, 32), 32, torch.float32, "cpu", False, "need a CUDA tensor"),
        ((1, 8, 1, 32), 32, torch.float32, "cpu", True, "per-token routing together with a coordinate window"),
    ],
    ids=["head_dim", "value_head_dim", "dtype", "cpu_without_interpreter", "routing_and_window"],
)
def test_why_not(shape, value_dim, dtype, device, interp, reason, monkeypatch):
    if not interp:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.zeros(shape, dtype=dtype, device=device)
    v = torch.zeros(*shape[:3], value_dim, dtype=dtype, device=device)
    plan = dense_plan(8, 8)
    if "window" in reason:
        plan = AttentionPlan(None, plan.q_offsets, plan.k_offsets, plan.kv_index,
                             token_keep=torch.ones(1, 1, 8, 1, dtype=torch.bool), window=cube_window((1, 2, 4), (0, 1, 1)))
    got = triton_backend().why_not(q, v, plan)
    assert got is not None and reason in got


def test_auto_backend_falls_back_for_a_value_head_dim_the_kernels_cannot_do(monkeypatch):
    """q's head dim is one the kernels do, v's is not: "auto" runs the torch backend."""
    from vdiff_sparse import gna_attention

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, _ = random_qkv(1, 4 * 4 * 4, 2, 32, seed=0)
    v = torch.randn(1, 64, 2, 48)
    out = gna_attention(q, k, v, (4, 4, 4), window=3, backend="auto")
    expected = gna_attention(q, k, v, (4, 4, 4), window=3, backend="torch")
    assert out.shape == (1, 64, 2, 48)
    torch.testing.assert_close(out, expected)


def test_run_plan_with_permutation(seed):
    """Through run_plan: a permuted plan, picked by name."""
    from vdiff_sparse.attention import run_plan

    N = 96
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    base = dense_plan(N, 32)
    plan = AttentionPlan(perm, base.q_offsets, base.k_offsets, base.kv_index)
    q, k, v = random_qkv(1, N, 2, 32, seed=seed, device=DEVICE)
    out = run_plan(q, k, v, plan, backend="triton")
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    assert (out - ref.transpose(1, 2)).abs().max() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (covered above under the interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_realistic(dtype, seed):
    """The same checks on hardware at a realistic block size and ragged N."""
    gen = torch.Generator().manual_seed(seed)
    N = 4000
    qo, ko = uniform_offsets(N, 128), ragged_offsets(N, [128, 96, 64])
    sel = random_selection((1, 4, qo.numel() - 1, ko.numel() - 1), 0.3, gen)
    levels = torch.tensor([1, 2, 4, 8])[torch.randint(0, 4, sel.shape, generator=gen)]
    ek, ev = torch.randn(2, 2, 77, 4, 128, generator=gen)
    mask = torch.rand(2, 77, generator=gen) < 0.7
    check(block_plan(qo, ko, sel, levels), B=2, H=4, D=128, dtype=dtype, seed=seed,
          extra=ExtraKeys(ek, ev, mask))
    kv_index, _ = pack_block_selection(sel)
    keep = torch.rand(1, 4, N, kv_index.shape[-1], generator=gen) < 0.5
    check(AttentionPlan(None, qo, ko, kv_index, token_keep=keep), B=2, H=4, D=64, dtype=dtype, seed=seed)
