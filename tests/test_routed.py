"""Key-major routed execution (backends/routed.py) against the float64 reference: VMoBA plans
and random per-token plans, outputs and gradients, both compute paths, broadcast plans."""

from __future__ import annotations

import pytest
import torch

from conftest import TOLERANCE, random_qkv
from vdiff_sparse.backends import routed
from vdiff_sparse.backends.base import ExtraKeys
from vdiff_sparse.backends.reference import reference_attention
from vdiff_sparse.backends.routed import routed_attention, routed_supported
from vdiff_sparse.methods.vmoba import VMoBAConfig, plan_vmoba
from vdiff_sparse.plan import AttentionPlan, TokenWindow, dense_plan, pack_block_selection

# Ragged blocks on a grid no block size divides (as in test_vmoba.py).
SMALL = dict(block_1d=1, block_2d=(2, 3), block_3d=(2, 4, 3))
LAYERS = {"1d": 0, "2d": 1, "3d": 2}
VMOBA_CASES = [
    pytest.param("topk", "local", 2, id="topk-local"),
    pytest.param("topk", "global", 3, id="topk-global"),
    pytest.param("threshold", "local", 0.3, id="threshold-local"),
    pytest.param("threshold", "global", 0.5, id="threshold-global"),
]


def check_against_reference(q, k, v, plan, extra, chunk_bytes=routed.DEFAULT_CHUNK_BYTES):
    """Routed output and gradients (q, k, v and the extra k, v) vs the reference's; returns
    the routed output."""
    leaves = [q, k, v] + ([] if extra is None else [extra.k, extra.v])
    grad = torch.randn(q.shape[:3] + v.shape[-1:], dtype=q.dtype,
                       generator=torch.Generator().manual_seed(int(q.shape[1])))
    got = routed_attention(q, k, v, plan, extra, chunk_bytes=chunk_bytes)
    want = reference_attention(q, k, v, plan, extra)
    got_grads = torch.autograd.grad(got, leaves, grad)
    want_grads = torch.autograd.grad(want, leaves, grad.double())
    names = ("out", "q", "k", "v", "extra k", "extra v")
    for name, g, w in zip(names, (got, *got_grads), (want, *want_grads)):
        # Gradients sum over many keys: allow a few times the output tolerance in float32.
        tol = TOLERANCE[q.dtype] * (1 if name == "out" or q.dtype == torch.float64 else 5)
        err = (g.double() - w).abs().max().item()
        assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.1g} ({q.dtype})"
    return got


@pytest.mark.parametrize("partition", list(LAYERS))
@pytest.mark.parametrize("mode,scope,value", VMOBA_CASES)
def test_vmoba_plans_match_reference(mode, scope, value, partition, seed):
    grid, B, H = (5, 6, 10), 2, 2
    q, k, v = random_qkv(B, 300, H, 16, seed=seed, requires_grad=True)
    ek, ev, _ = random_qkv(B, 5, H, 16, seed=seed + 1, requires_grad=True)
    emask = torch.tensor([[True, False, True, True, False], [True] * 5])
    extra_value = {"topk": value} if mode == "topk" else {"tau": value}
    config = VMoBAConfig(mode=mode, scope=scope, query_block=24, **SMALL, **extra_value)
    plan = plan_vmoba(q, k, grid, layer_index=LAYERS[partition], config=config)
    assert routed_supported(plan)
    qp, kp, vp = (plan.permute(x) for x in (q, k, v))
    check_against_reference(qp, kp, vp, plan, ExtraKeys(ek, ev, emask))


def random_routed_plan(N, B, H, *, plan_dims, keep_dims, seed, with_perm=False):
    """A per-token plan with ragged blocks (one of them empty), pad slots, a key block listed
    twice in some rows, and queries that keep nothing. ``plan_dims`` / ``keep_dims`` are the
    (batch, head) dims of ``kv_index`` / ``token_keep`` (1 = broadcast)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 24, (N,), generator=g)
    bounds = sizes.cumsum(0)
    k_off = torch.cat([torch.zeros(1, dtype=torch.long), bounds[bounds < N], torch.tensor([N])])
    k_off = torch.cat([k_off[:2], k_off[1:]])  # block 0 is empty
    q_off = torch.cat([torch.arange(0, N, 13), torch.tensor([N])])
    nq, nk = q_off.numel() - 1, k_off.numel() - 1
    selected = torch.rand(*plan_dims, nq, nk, generator=g) < 0.4
    selected[..., 0] = True  # the empty block is listed (and must add nothing)
    kv_index, _ = pack_block_selection(selected)
    kv_index[..., :2, -1] = kv_index[..., :2, 1]  # listed twice (or a pad twice)
    token_keep = torch.rand(*keep_dims, N, kv_index.shape[-1], generator=g) < 0.5
    token_keep[..., :5, :] = False  # queries without a plan key
    perm = torch.randperm(N, generator=g) if with_perm else None
    return AttentionPlan(perm, q_off, k_off, kv_index, token_keep=token_keep)


SHARING = {
    "per-head": ((2, 3), (2, 3)),
    "shared": ((1, 1), (1, 1)),
    "blocks-shared-keep-per-head": ((1, 1), (2, 3)),
    "per-head-blocks-keep-shared-over-batch": ((2, 3), (1, 3)),
    "shared-over-batch": ((1, 3), (1, 3)),
}


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-flash-op", "matmul"])
@pytest.mark.parametrize("sharing", list(SHARING))
def test_random_token_plans_match_reference(sharing, fused, seed, monkeypatch):
    monkeypatch.setattr(routed, "FUSED_CPU", fused)
    N, B, H = 150, 2, 3
    plan_dims, keep_dims = SHARING[sharing]
    plan = random_routed_plan(N, B, H, plan_dims=plan_dims, keep_dims=keep_dims, seed=seed)
    q, k, v = random_qkv(B, N, H, 8, seed=seed, requires_grad=True)
    ek, ev, _ = random_qkv(B, 4, H, 8, seed=seed + 1, requires_grad=True)
    # Batch 1 has no real extra key: its first queries have no key at all and must give 0.
    emask = torch.tensor([[True, False, True, True], [False] * 4])
    # Tiny chunks: many chunks per run, runs split across chunks.
    out = check_against_reference(q, k, v, plan, ExtraKeys(ek, ev, emask), chunk_bytes=4096)
    assert torch.equal(out[1, :5], torch.zeros_like(out[1, :5]))


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-flash-op", "matmul"])
def test_random_plan_in_original_order_with_only_q_grad(fused, seed, monkeypatch):
    """Rows through a random ``perm`` (``original_order``), k and v without gradients (their
    backward work is skipped), a contiguous output like every other backend's."""
    monkeypatch.setattr(routed, "FUSED_CPU", fused)
    N, B, H = 150, 2, 3
    plan = random_routed_plan(N, B, H, plan_dims=(2, 3), keep_dims=(2, 3), seed=seed, with_perm=True)
    q, k, v = random_qkv(B, N, H, 8, seed=seed)
    q.requires_grad_(True)
    got = routed_attention(q, k, v, plan, original_order=True, chunk_bytes=4096)
    assert got.is_contiguous()
    want = plan.unpermute(reference_attention(*(plan.permute(x) for x in (q, k, v)), plan, None))
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed))
    (got_dq,) = torch.autograd.grad(got, [q], grad)
    (want_dq,) = torch.autograd.grad(want, [q], grad.double())
    tol = TOLERANCE[torch.float32]
    assert (got.double() - want).abs().max().item() <= tol
    assert (got_dq.double() - want_dq).abs().max().item() <= 5 * tol


@pytest.mark.parametrize("with_extra", [False, True], ids=["no-extra", "extra"])
def test_float64_and_value_width(with_extra, seed):
    """Float64 at the reference's tolerance; values wider than keys; no extra mask."""
    N, B, H = 120, 1, 2
    plan = random_routed_plan(N, B, H, plan_dims=(1, 2), keep_dims=(1, 2), seed=seed)
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, N, H, 8, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    v = torch.randn(B, N, H, 12, generator=g, dtype=torch.float64).requires_grad_()
    extra = None
    if with_extra:
        ek = torch.randn(B, 3, H, 8, generator=g, dtype=torch.float64).requires_grad_()
        ev = torch.randn(B, 3, H, 12, generator=g, dtype=torch.float64).requires_grad_()
        extra = ExtraKeys(ek, ev)
    check_against_reference(q, k, v, plan, extra)


def test_bfloat16_forward_close_to_reference(seed):
    plan = random_routed_plan(100, 1, 2, plan_dims=(1, 2), keep_dims=(1, 2), seed=seed)
    q, k, v = random_qkv(1, 100, 2, 16, dtype=torch.bfloat16, seed=seed)
    out = routed_attention(q, k, v, plan)
    assert out.dtype == torch.bfloat16
    err = (out.double() - reference_attention(q, k, v, plan)).abs().max().item()
    assert err <= TOLERANCE[torch.bfloat16]


def test_supported_plans():
    plan = dense_plan(64, 16)
    assert not routed_supported(plan)  # no per-token routing: the gather path's job
    keep = torch.ones(1, 1, 64, plan.max_kv, dtype=torch.bool)
    routed_plan = AttentionPlan(None, plan.q_offsets, plan.k_offsets, plan.kv_index, token_keep=keep)
    assert routed_supported(routed_plan)
    pooled = AttentionPlan(None, plan.q_offsets, plan.k_offsets, plan.kv_index,
                           torch.full_like(plan.kv_index, 2), token_keep=keep)
    assert not routed_supported(pooled)
    coords = torch.zeros(64, 3, dtype=torch.long)
    windowed = AttentionPlan(None, plan.q_offsets, plan.k_offsets, plan.kv_index,
                             token_keep=keep, window=TokenWindow(coords, coords, coords, (1, 1, 1)))
    assert not routed_supported(windowed)
    q, k, v = random_qkv(1, 64, 1, 8)
    with pytest.raises(NotImplementedError, match="token_keep"):
        routed_attention(q, k, v, pooled)


@pytest.mark.parametrize("mode,scope,value", VMOBA_CASES[:3])
def test_original_order_equals_plan_order(mode, scope, value, seed):
    """With ``original_order`` the rows go through ``plan.perm``: same result and gradients as
    permuting around a plan-order call, without the copies."""
    grid, B, H = (5, 6, 10), 2, 2
    q, k, v = random_qkv(B, 300, H, 16, seed=seed, requires_grad=True)
    ek, ev, _ = random_qkv(B, 5, H, 16, seed=seed + 1, requires_grad=True)
    extra = ExtraKeys(ek, ev, torch.tensor([[True, False, True, True, False], [True] * 5]))
    extra_value = {"topk": value} if mode == "topk" else {"tau": value}
    plan = plan_vmoba(q, k, grid, layer_index=LAYERS["3d"], config=VMoBAConfig(mode=mode, scope=scope, query_block=24,
                                                            **SMALL, **extra_value))
    assert plan.perm is not None
    leaves = [q, k, v, ek, ev]
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed))
    direct = routed_attention(q, k, v, plan, extra, original_order=True)
    permuted = plan.unpermute(routed_attention(plan.permute(q), plan.permute(k), plan.permute(v), plan, extra))
    torch.testing.assert_close(direct, permuted, rtol=0, atol=1e-6)
    for a, b in zip(torch.autograd.grad(direct, leaves, grad), torch.autograd.grad(permuted, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("step", [1, 5, 4096])
def test_chosen_blocks_counts_repeated_blocks_once(step):
    """The block-major pair map, built a slice of positions at a time, equals a direct
    construction; a block listed twice in a tile (kept in one slot only) is chosen once."""
    gen = torch.Generator().manual_seed(0)
    N, E, nkb, tile = 23, 4, 6, 8
    q_block = torch.arange(N) // tile
    kv_index = torch.randint(0, nkb + 1, (3, E), generator=gen)  # nkb marks unused slots
    kv_index[0, 0] = kv_index[0, 1] = 2  # a repeated block
    keep = torch.rand(N, E, generator=gen) < 0.5
    keep[0, 0], keep[0, 1] = False, True
    expected = torch.zeros(nkb + 1, N, dtype=torch.bool)
    for i in range(N):
        for e in range(E):
            if keep[i, e]:
                expected[kv_index[q_block[i], e], i] = True
    got = routed._chosen_blocks(keep, kv_index, q_block, nkb, positions_per_step=step)
    assert torch.equal(got, expected[:nkb])
    assert got[2, 0]  # chosen through its second slot, though the first one is not kept
