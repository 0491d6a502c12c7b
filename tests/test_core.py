"""Layouts, the plan format, and the reference and torch backends on arbitrary plans."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import TOLERANCE, assert_close, random_qkv
from vdiff_sparse import VideoLayout, dense_attention, run_plan
from vdiff_sparse.backends import ExtraKeys, select_backend
from vdiff_sparse.backends.gather import gather_attention
from vdiff_sparse.backends.reference import reference_attention
from vdiff_sparse.layout import hilbert_order, tile_order, token_coords, uniform_offsets
from vdiff_sparse.plan import AttentionPlan, TokenWindow, dense_plan, pack_block_selection

RAGGED_GRIDS = [(3, 5, 7), (2, 9, 11), (1, 13, 17), (4, 4, 4)]


# --- layouts -------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", RAGGED_GRIDS, ids=str)
@pytest.mark.parametrize("tile", [(1, 2, 3), (2, 4, 4), (3, 3, 5), (8, 8, 8)], ids=str)
def test_tile_order_blocks_are_tiles(grid, tile):
    order = tile_order(grid, tile)
    n = grid[0] * grid[1] * grid[2]
    perm = torch.arange(n) if order.perm is None else order.perm
    assert torch.equal(perm.sort().values, torch.arange(n)), "not a permutation"
    coords = token_coords(grid, order.perm)
    for b in range(order.num_blocks):
        c = coords[order.offsets[b] : order.offsets[b + 1]]
        tile_id = c // torch.tensor(tile)
        assert (tile_id == tile_id[0]).all(), f"block {b} spans several tiles"
        expected = 1
        for axis in range(3):
            start = int(tile_id[0, axis]) * tile[axis]
            expected *= min(tile[axis], grid[axis] - start)
        assert c.shape[0] == expected, "edge tiles must be exactly the part inside the grid"
    x = torch.randn(2, n, 3)
    assert torch.equal(order.unpermute(order.permute(x)), x)


def test_hilbert_order_is_local():
    order = hilbert_order((8, 8, 8), 64)
    coords = token_coords((8, 8, 8), order.perm)
    steps = (coords[1:] - coords[:-1]).abs().sum(-1)
    assert (steps == 1).all(), "consecutive Hilbert positions must be grid neighbours"
    ragged = hilbert_order((3, 5, 7), 16)
    assert torch.equal(ragged.perm.sort().values, torch.arange(105))
    assert ragged.offsets.tolist()[-2:] == [96, 105]


def test_video_layout_split_merge():
    for position in ("before", "after"):
        layout = VideoLayout((2, 3, 4), text_tokens=5, text_position=position)
        x = torch.randn(2, 29, 8)
        video, text = layout.split(x)
        assert video.shape[1] == 24 and text.shape[1] == 5
        assert torch.equal(layout.merge(video, text), x)
    with pytest.raises(ValueError, match=r"sequence length 30 does not match the layout"):
        VideoLayout((2, 3, 4), 5).split(torch.randn(1, 30, 2))
    with pytest.raises(ValueError, match="text_position"):
        VideoLayout((2, 3, 4), 5, "middle")
    with pytest.raises(ValueError, match="grid"):
        VideoLayout((2, 0, 4))


# --- plans ---------------------------------------------------------------------------------


def test_pack_block_selection_lists_selected_blocks_in_order():
    g = torch.Generator().manual_seed(0)
    selected = torch.rand(2, 3, 5, 7, generator=g) < 0.4
    levels = torch.tensor([1, 2, 4, 8])[torch.randint(0, 4, (2, 3, 5, 7), generator=g)]
    index, level = pack_block_selection(selected, levels)
    for b, h, i in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(5)).tolist():
        row = index[b, h, i]
        kept = row[row >= 0].tolist()
        assert kept == torch.nonzero(selected[b, h, i]).squeeze(1).tolist()
        assert level[b, h, i, : len(kept)].tolist() == levels[b, h, i, kept].tolist()


def random_plan(N, bq, bk, B, H, *, levels=False, keep=False, ragged=False, seed=0, share=False):
    """A random plan; ``ragged`` makes block sizes vary, ``share`` broadcasts over b and h."""
    g = torch.Generator().manual_seed(seed)

    def offsets(block):
        if not ragged:
            return uniform_offsets(N, block)
        sizes = torch.randint(1, 2 * block, (N,), generator=g)
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        bounds = bounds[bounds < N]
        return torch.cat([bounds, torch.tensor([N])])

    q_off, k_off = offsets(bq), offsets(bk)
    nq, nk = q_off.numel() - 1, k_off.numel() - 1
    b, h = (1, 1) if share else (B, H)
    selected = torch.rand(b, h, nq, nk, generator=g) < 0.5
    lv = torch.tensor([1, 2, 4, 8])[torch.randint(0, 4, (b, h, nq, nk), generator=g)] if levels else None
    index, level = pack_block_selection(selected, lv)
    token_keep = torch.rand(b, h, N, index.shape[-1], generator=g) < 0.6 if keep else None
    perm = torch.randperm(N, generator=g)
    return AttentionPlan(perm, q_off, k_off, index, level, token_keep)


def test_plan_density():
    plan = dense_plan(100, 16)
    assert plan.density() == pytest.approx(1.0)
    index = plan.kv_index
    halved = AttentionPlan(None, plan.q_offsets, plan.k_offsets, index, torch.full_like(index, 2))
    assert halved.density() == pytest.approx(0.5)
    stats = halved.stats()
    assert stats["level_fractions"][2] == pytest.approx(1.0) and stats["num_tokens"] == 100
    # Per-token routing: half the queries drop every entry -> half the density.
    keep = torch.zeros(1, 1, 100, index.shape[-1], dtype=torch.bool)
    keep[:, :, ::2] = True
    routed = AttentionPlan(None, plan.q_offsets, plan.k_offsets, index, token_keep=keep)
    assert routed.density() == pytest.approx(0.5)
    assert routed.stats()["block_density"] == pytest.approx(1.0)


# --- backends --------------------------------------------------------------------------------


def test_reference_dense_plan_equals_sdpa(seed):
    q, k, v = random_qkv(2, 77, 3, 16, dtype=torch.float64, seed=seed)
    out = reference_attention(q, k, v, dense_plan(77, 16))
    assert_close(out, dense_attention(q, k, v), torch.float64, "dense plan")


def test_reference_extra_keys_equal_sdpa_with_text(seed):
    q, k, v = random_qkv(2, 40, 2, 8, dtype=torch.float64, seed=seed)
    ek, ev, _ = random_qkv(2, 6, 2, 8, dtype=torch.float64, seed=seed + 1)
    mask = torch.tensor([[True] * 6, [True, True, False, True, False, False]])
    out = reference_attention(q, k, v, dense_plan(40, 16), ExtraKeys(ek, ev, mask))
    expected = dense_attention(q, k, v, extra_k=ek, extra_v=ev, extra_mask=mask)
    assert_close(out, expected, torch.float64, "extra keys")


def test_reference_pooled_equals_repeated_means(seed):
    """A level-p entry is attention over the block's group means, each repeated count times."""
    N, p = 21, 4  # groups of 4 with a ragged group of 1 in the last block of 10 + 11
    q, k, v = random_qkv(1, N, 1, 8, dtype=torch.float64, seed=seed)
    offsets = torch.tensor([0, 10, 21])
    index = torch.tensor([[[[0, 1]]]])
    plan = AttentionPlan(None, torch.tensor([0, 21]), offsets, index, torch.full_like(index, p))
    rep_k, rep_v = [], []
    for lo, hi in ((0, 10), (10, 21)):
        for g in range(lo, hi, p):
            stop = min(g + p, hi)
            rep_k.append(k[:, g:stop].mean(1, keepdim=True).expand(-1, stop - g, -1, -1))
            rep_v.append(v[:, g:stop].mean(1, keepdim=True).expand(-1, stop - g, -1, -1))
    expected = dense_attention(q, torch.cat(rep_k, 1), torch.cat(rep_v, 1))
    assert_close(reference_attention(q, k, v, plan), expected, torch.float64, "pooled")


CASES = {
    "dense-ish": dict(N=64, bq=16, bk=16),
    "levels": dict(N=100, bq=16, bk=32, levels=True),
    "ragged-levels": dict(N=90, bq=8, bk=12, levels=True, ragged=True),
    "token-keep": dict(N=90, bq=32, bk=16, keep=True),
    "keep+levels+ragged": dict(N=70, bq=16, bk=8, keep=True, levels=True, ragged=True),
    "shared": dict(N=50, bq=16, bk=8, levels=True, share=True),
    # One plan for every head with per-token routing: the gather path's all-heads rows with a
    # per-query drop mask (levels keep it off the routed path).
    "shared+keep": dict(N=60, bq=16, bk=8, levels=True, keep=True, share=True),
}


@pytest.mark.parametrize("extra", [False, True], ids=["no-text", "text"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_torch_backend_matches_reference(case, extra, dtype, seed):
    B, H, D = 2, 3, 16
    plan = random_plan(B=B, H=H, seed=seed, **CASES[case])
    q, k, v = random_qkv(B, plan.num_tokens, H, D, dtype=dtype, seed=seed)
    kw = {}
    if extra:
        ek, ev, _ = random_qkv(B, 5, H, D, dtype=dtype, seed=seed + 1)
        kw = dict(extra_k=ek, extra_v=ev, extra_mask=torch.rand(B, 5) < 0.7)
    expected = run_plan(q.double(), k.double(), v.double(), plan, backend="reference",
                        **{n: (t.double() if t.is_floating_point() else t) for n, t in kw.items()})
    out = run_plan(q, k, v, plan, backend="torch", **kw)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, case)


@pytest.mark.parametrize("extra", [False, True], ids=["no-text", "text"])
def test_torch_backend_query_blocks_without_keys(extra, seed):
    """Query blocks that select no key block get 0 without text keys (a chunk of such rows
    runs no attention at all) and attend only the text with it, in every chunking."""
    B, H, D, N = 2, 2, 8, 80
    g = torch.Generator().manual_seed(seed)
    offsets = uniform_offsets(N, 16)
    selected = torch.rand(B, H, 5, 5, generator=g) < 0.5
    selected[:, :, 1::2] = False  # every other query block of every (batch, head) is empty
    levels = torch.tensor([1, 2, 4])[torch.randint(0, 3, (B, H, 5, 5), generator=g)]
    plan = AttentionPlan(torch.randperm(N, generator=g), offsets, offsets,
                         *pack_block_selection(selected, levels))
    q, k, v = random_qkv(B, N, H, D, dtype=torch.float64, seed=seed, requires_grad=True)
    kw = {}
    if extra:
        ek, ev, _ = random_qkv(B, 3, H, D, dtype=torch.float64, seed=seed + 1)
        kw = dict(extra_k=ek, extra_v=ev)
    expected = run_plan(q, k, v, plan, backend="reference", **kw)
    extra_keys = ExtraKeys(kw["extra_k"], kw["extra_v"]) if extra else None
    for chunk_bytes in (1, 2**40):
        out = gather_attention(q, k, v, plan, extra_keys, chunk_bytes=chunk_bytes, original_order=True)
        assert_close(out, expected, torch.float64, f"chunk_bytes={chunk_bytes}")
        empty = plan.unpermute(torch.zeros(B, N, H, 1, dtype=torch.bool).index_fill_(
            1, torch.arange(N)[plan.query_block_of_position() % 2 == 1], True))
        assert bool((out.masked_select(empty) == 0).all()) != extra
        grad_out = torch.randn_like(out)
        for a, b, name in zip(torch.autograd.grad((expected * grad_out).sum(), (q, k, v), retain_graph=True),
                              torch.autograd.grad((out * grad_out).sum(), (q, k, v)), "qkv"):
            assert_close(b, a, torch.float64, f"chunk_bytes={chunk_bytes} d{name}")


@pytest.mark.parametrize("index_dims,keep_dims", [((1, 1), (2, 3)), ((2, 3), (1, 1)), ((1, 3), (2, 1))],
                         ids=["shared-index", "shared-keep", "crossed"])
def test_torch_backend_index_and_token_keep_broadcast_independently(index_dims, keep_dims, seed):
    """kv_index / kv_level and token_keep may each be shared over batch and heads (dims of 1)
    on their own; pooled levels keep the plan on the gather path (not the routed one)."""
    B, H, D, N = 2, 3, 8, 64
    g = torch.Generator().manual_seed(seed)
    offsets = uniform_offsets(N, 16)
    selected = torch.rand(*index_dims, 4, 4, generator=g) < 0.6
    selected[..., 0] = True
    levels = torch.tensor([1, 2, 4])[torch.randint(0, 3, (*index_dims, 4, 4), generator=g)]
    index, level = pack_block_selection(selected, levels)
    keep = torch.rand(*keep_dims, N, index.shape[-1], generator=g) < 0.6
    plan = AttentionPlan(torch.randperm(N, generator=g), offsets, offsets, index, level, keep)
    q, k, v = random_qkv(B, N, H, D, dtype=torch.float64, seed=seed, requires_grad=True)
    expected = run_plan(q, k, v, plan, backend="reference")
    out = run_plan(q, k, v, plan, backend="torch")
    assert_close(out, expected, torch.float64, "out")
    grad_out = torch.randn_like(out)
    for a, b, name in zip(torch.autograd.grad((expected * grad_out).sum(), (q, k, v)),
                          torch.autograd.grad((out * grad_out).sum(), (q, k, v)), "qkv"):
        assert_close(b, a, torch.float64, f"d{name}")


def test_torch_backend_chunking_does_not_change_result(seed):
    plan = random_plan(100, 16, 16, 2, 2, levels=True, keep=True, seed=seed)
    q, k, v = random_qkv(2, 100, 2, 8, dtype=torch.float64, seed=seed)
    qp, kp, vp = (plan.permute(x) for x in (q, k, v))
    one = gather_attention(qp, kp, vp, plan, chunk_bytes=1)
    all_ = gather_attention(qp, kp, vp, plan, chunk_bytes=2**40)
    assert_close(one, all_, torch.float64, "chunking")


@pytest.mark.parametrize("case", ["levels", "keep+levels+ragged", "shared"], ids=str)
def test_torch_backend_in_original_order_equals_plan_order(case, seed):
    """Applying the plan's perm inside the gathers (no reordered copies) changes nothing."""
    B, H, D = 2, 3, 8
    plan = random_plan(B=B, H=H, seed=seed, **CASES[case])
    q, k, v = random_qkv(B, plan.num_tokens, H, D, dtype=torch.float64, seed=seed, requires_grad=True)
    ek, ev, _ = random_qkv(B, 5, H, D, dtype=torch.float64, seed=seed + 1)
    extra = ExtraKeys(ek, ev, torch.rand(B, 5) < 0.7)
    expected = plan.unpermute(gather_attention(*(plan.permute(x) for x in (q, k, v)), plan, extra))
    out = gather_attention(q, k, v, plan, extra, chunk_bytes=1, original_order=True)
    assert_close(out, expected, torch.float64, case)
    grad_out = torch.randn_like(out)
    for a, b, name in zip(torch.autograd.grad((expected * grad_out).sum(), (q, k, v)),
                          torch.autograd.grad((out * grad_out).sum(), (q, k, v)), "qkv"):
        assert_close(b, a, torch.float64, f"{case} d{name}")


def gna_plan_with_keys_from(plan: AttentionPlan, keys_from: str) -> AttentionPlan:
    """``plan`` (a GNA plan with a window) as it is (``"boxes"``: its ``TokenWindow.grid``
    lets the torch backend take keys from window boxes) or without that promise (``"tiles"``)."""
    assert plan.window is not None and plan.window.grid is not None
    if keys_from == "boxes":
        return plan
    return dataclasses.replace(plan, window=dataclasses.replace(plan.window, grid=None))


@pytest.mark.parametrize("config", [
    dict(window=(3, 5, 5)),
    dict(window=(2, 3, 4), dilation=(1, 2, 2), causal=(True, False, False)),
    dict(window=(3, 6, 6), stride=(1, 2, 3)),
], ids=str)
@pytest.mark.parametrize("keys_from", ["boxes", "tiles"])
def test_torch_backend_gna_windows_any_chunking(config, keys_from, seed):
    """Rows carrying every head and per-chunk window masks agree with the reference for every
    chunk size and batch > 1, with keys taken from the boxes bounding the windows (GNA plans
    promise their windows fill them) or, with that promise removed, from the listed tiles."""
    from vdiff_sparse.methods.gna import plan_gna

    grid = (4, 7, 9)
    plan = gna_plan_with_keys_from(plan_gna(grid, tile=(2, 3, 4), **config), keys_from)
    q, k, v = random_qkv(2, plan.num_tokens, 3, 8, dtype=torch.float64, seed=seed)
    ek, ev, _ = random_qkv(2, 3, 3, 8, dtype=torch.float64, seed=seed + 1)
    extra = ExtraKeys(ek, ev, torch.tensor([[True, False, True], [True, True, True]]))
    qp, kp, vp = (plan.permute(x) for x in (q, k, v))
    expected = reference_attention(qp, kp, vp, plan, extra)
    for chunk_bytes in (1, 50_000, 2**40):
        out = gather_attention(qp, kp, vp, plan, extra, chunk_bytes=chunk_bytes)
        assert_close(out, expected, torch.float64, f"chunk_bytes={chunk_bytes}")


@pytest.mark.parametrize("keys_from", ["boxes", "tiles"])
def test_torch_backend_window_grads_through_checkpointed_chunks(keys_from, seed):
    """Gradients of q, k, v and the masked extra keys with a window plan, a chunk per row
    (each chunk recomputed in backward), against the reference's."""
    from vdiff_sparse.methods.gna import plan_gna

    grid = (4, 7, 9)
    plan = plan_gna(grid, tile=(2, 3, 4), window=(3, 3, 5), dilation=(1, 2, 1))
    plan = gna_plan_with_keys_from(plan, keys_from)
    q, k, v = random_qkv(2, plan.num_tokens, 3, 8, dtype=torch.float64, seed=seed, requires_grad=True)
    ek, ev, _ = random_qkv(2, 3, 3, 8, dtype=torch.float64, seed=seed + 1, requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    leaves = (q, k, v, ek, ev)
    qp, kp, vp = (plan.permute(x) for x in (q, k, v))
    expected = reference_attention(qp, kp, vp, plan, ExtraKeys(ek, ev, mask))
    out = gather_attention(qp, kp, vp, plan, ExtraKeys(ek, ev, mask), chunk_bytes=1)
    assert_close(out, expected, torch.float64, "out")
    grad_out = torch.randn_like(out)
    want = torch.autograd.grad(expected, leaves, grad_out, retain_graph=True)  # shares the permutes
    for a, b, name in zip(want, torch.autograd.grad(out, leaves, grad_out), ("q", "k", "v", "extra k", "extra v")):
        assert_close(b, a, torch.float64, f"d{name}")


def test_torch_backend_window_plan(seed):
    grid = (3, 5, 7)
    order = tile_order(grid, (1, 2, 4))
    coords = token_coords(grid, order.perm)
    reach = torch.tensor([1, 1, 2])
    window = TokenWindow(coords, (coords - reach).clamp(min=0), coords + reach, (1, 1, 2))
    nb = order.num_blocks
    index = torch.arange(nb).expand(1, 1, nb, nb).contiguous()
    plan = AttentionPlan(order.perm, order.offsets, order.offsets, index, window=window)
    q, k, v = random_qkv(2, 105, 2, 8, dtype=torch.float64, seed=seed)
    # Brute force from the window's definition: inside [lo, hi] per axis, and w on the
    # dilation-2 lattice that starts at lo.
    c = token_coords(grid, None)
    lo, hi = (c - reach).clamp(min=0), c + reach
    allowed = ((c[None, :, :] >= lo[:, None, :]) & (c[None, :, :] <= hi[:, None, :])).all(-1)
    allowed &= (c[None, :, 2] - lo[:, None, 2]) % 2 == 0
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed
    ).transpose(1, 2)
    for backend in ("reference", "torch"):
        assert_close(run_plan(q, k, v, plan, backend=backend), expected, torch.float64, backend)
    assert plan.density() == pytest.approx(allowed.double().mean().item())


@pytest.mark.parametrize("case", ["levels", "keep+levels+ragged", "shared", "shared+keep"], ids=str)
def test_torch_backend_gradients_match_reference(case, seed):
    B, H, D = 2, 2, 8
    plan = random_plan(B=B, H=H, seed=seed, **CASES[case])
    N = plan.num_tokens
    q, k, v = random_qkv(B, N, H, D, dtype=torch.float64, seed=seed, requires_grad=True)
    ek, ev, _ = random_qkv(B, 4, H, D, dtype=torch.float64, seed=seed + 1, requires_grad=True)
    grad_out = torch.randn(B, N, H, D, dtype=torch.float64)
    grads = {}
    for backend in ("reference", "torch"):
        out = run_plan(q, k, v, plan, extra_k=ek, extra_v=ev, backend=backend)
        grads[backend] = torch.autograd.grad((out * grad_out).sum(), (q, k, v, ek, ev))
    for name, a, b in zip("q k v ek ev".split(), grads["reference"], grads["torch"]):
        assert_close(b, a, torch.float64, f"d{name}")


def test_torch_backend_float32_gradients_with_checkpointed_chunks(seed):
    plan = random_plan(96, 16, 16, 1, 2, levels=True, seed=seed)
    q, k, v = random_qkv(1, 96, 2, 16, dtype=torch.float32, seed=seed, requires_grad=True)
    out = gather_attention(*(plan.permute(x) for x in (q, k, v)), plan, chunk_bytes=4096)
    gq, gk, gv = torch.autograd.grad(out.square().sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(*(plan.permute(x) for x in (q64, k64, v64)), plan)
    rq, rk, rv = torch.autograd.grad(ref.square().sum(), (q64, k64, v64))
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        assert (a.double() - b).abs().max() < 20 * TOLERANCE[torch.float32]


# --- dispatch and errors -------------------------------------------------------------------


def test_auto_backend_on_cpu_is_torch():
    q = torch.randn(1, 10, 1, 8)
    assert select_backend("auto", q, q, dense_plan(10, 4)).name in ("torch", "triton")
    with pytest.raises(ValueError, match=r"backend must be one of .*'torch'.*got 'cuda'"):
        select_backend("cuda", q, q, dense_plan(10, 4))


def test_run_plan_errors():
    q, k, v = random_qkv(1, 10, 2, 8)
    with pytest.raises(ValueError, match=r"q, k, v must share \[B, N, heads\].*k \(1, 12, 2, 8\)"):
        run_plan(q, torch.randn(1, 12, 2, 8), torch.randn(1, 12, 2, 8), dense_plan(10, 4))
    with pytest.raises(ValueError, match=r"q, k, v must share a dtype"):
        run_plan(q, k.double(), v, dense_plan(10, 4))
    with pytest.raises(ValueError, match=r"k must be \[B, N, heads, D\] \(4 dims\)"):
        run_plan(q, k[0], v, dense_plan(10, 4))
    with pytest.raises(ValueError, match=r"extra_v must be \[B, Ne, heads, Dv=8\]"):
        run_plan(q, k, v, dense_plan(10, 4), extra_k=torch.randn(1, 3, 2, 8), extra_v=torch.randn(1, 3, 2, 4))
    with pytest.raises(ValueError, match="plan covers N=12 tokens but q has N=10"):
        run_plan(q, k, v, dense_plan(12, 4))
    with pytest.raises(ValueError, match=r"extra_k must be \[B=1, Ne, heads=2, D=8\]"):
        run_plan(q, k, v, dense_plan(10, 4), extra_k=torch.randn(1, 3, 2, 4), extra_v=torch.randn(1, 3, 2, 4))
    with pytest.raises(ValueError, match="extra_k and extra_v must be given together"):
        run_plan(q, k, v, dense_plan(10, 4), extra_k=torch.randn(1, 3, 2, 8))
