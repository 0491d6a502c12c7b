"""VMoBA: selection against the method's plain definition (``vmoba_mask``), the chunked plan bit for bit
against a direct vectorised derivation, attention against masked dense attention, backends
against each other, config and argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TOLERANCE, assert_close, random_qkv
from vdiff_sparse.attention import dense_attention
from vdiff_sparse.methods import vmoba
from vdiff_sparse.backends.reference import masked_attention as reference_masked_attention
from vdiff_sparse.methods.vmoba import (
    VMoBAConfig,
    partition_for_layer,
    partition_order,
    plan_vmoba,
    vmoba_attention,
    vmoba_block_ids,
    vmoba_mask,
)
from vdiff_sparse.plan import ExtraKeys, pack_block_selection

GRIDS = {"3x5x7": (3, 5, 7), "5x6x10": (5, 6, 10)}
# Small ragged blocks: none of the grids above divides evenly on every axis.
SMALL = dict(block_1d=1, block_2d=(2, 3), block_3d=(2, 4, 3))
LAYERS = {"1d": 0, "2d": 1, "3d": 2}


# --- what a plan lets through ----------------------------------------------------------------
def plan_mask(plan, B, Hh):
    """``[B, heads, N, N]`` bool from the plan: per token, the key tokens of its kept entries."""
    N = plan.num_tokens
    perm = torch.arange(N) if plan.perm is None else plan.perm
    tile = plan.query_block_of_position()
    mask_plan = torch.zeros(B, Hh, N, N, dtype=torch.bool)
    for b in range(B):
        for h in range(Hh):
            bi = b if plan.kv_index.shape[0] > 1 else 0
            hi = h if plan.kv_index.shape[1] > 1 else 0
            for p in range(N):
                for e, j in enumerate(plan.kv_index[bi, hi, tile[p]].tolist()):
                    keep = plan.token_keep is None or bool(plan.token_keep[bi, hi, p, e])
                    if j >= 0 and keep:
                        mask_plan[b, h, p, plan.k_offsets[j] : plan.k_offsets[j + 1]] = True
    mask = torch.zeros_like(mask_plan)
    mask[:, :, perm[:, None], perm[None, :]] = mask_plan
    return mask


def masked_attention(q, k, v, mask, extra_k=None, extra_v=None, extra_mask=None, scale=None):
    """Float64 dense softmax over the keys allowed by ``mask`` [B, heads, N, N] plus extra keys."""
    extra = None if extra_k is None else ExtraKeys(extra_k, extra_v, extra_mask)
    return reference_masked_attention(q, k, v, mask, extra, scale)


def make_config(mode, scope, value, query_block=16, **kw):
    extra = {"topk": value} if mode == "topk" else {"tau": value}
    return VMoBAConfig(mode=mode, scope=scope, query_block=query_block, **SMALL, **extra, **kw)


SELECTION_CASES = [
    pytest.param(mode, scope, value, id=f"{mode}-{scope}-{value}")
    for mode, values in (("topk", (2, 4)), ("threshold", (0.25, 0.7)))
    for scope in ("local", "global")
    for value in values
]


# --- selection ---------------------------------------------------------------------------------
@pytest.mark.parametrize("partition", list(LAYERS))
@pytest.mark.parametrize("grid", list(GRIDS.values()), ids=list(GRIDS))
@pytest.mark.parametrize("mode,scope,value", SELECTION_CASES)
def test_selection_matches_loop_reference(mode, scope, value, grid, partition, seed):
    N = math.prod(grid)
    q, k, _ = random_qkv(2, N, 2, 8, dtype=torch.float64, seed=seed)
    config = make_config(mode, scope, value, query_block=[16, 37][seed % 2])
    plan = plan_vmoba(q, k, grid, layer_index=LAYERS[partition], config=config)
    expected = vmoba_mask(q, k, grid, config, layer_index=LAYERS[partition])
    got = plan_mask(plan, 2, 2)
    assert torch.equal(got, expected), f"{int((got != expected).sum())} pairs differ"
    assert plan.method == "vmoba" and plan.info["partition"] == partition
    # Stats: FLOP density is the reference's share of kept pairs.
    assert plan.density() == pytest.approx(expected.double().mean().item(), rel=1e-12)


@pytest.mark.parametrize("partition", list(LAYERS))
@pytest.mark.parametrize("mode,scope,value", SELECTION_CASES)
def test_plan_lists_only_blocks_some_token_uses(mode, scope, value, partition, seed):
    grid = (5, 6, 10)
    q, k, _ = random_qkv(1, 300, 3, 16, seed=seed)
    plan = plan_vmoba(q, k, grid, layer_index=LAYERS[partition], config=make_config(mode, scope, value, query_block=24))
    tile = plan.query_block_of_position()
    users = torch.zeros(plan.kv_index.shape, dtype=torch.int32)
    used = users.index_add_(2, tile, plan.token_keep.to(torch.int32)) > 0
    valid = plan.kv_index >= 0
    assert torch.equal(used, valid), "a listed block is used by no token of its tile, or vice versa"
    assert not plan.token_keep[~valid[:, :, tile]].any(), "a token keeps an unused slot"
    # Every token keeps its own block under the layer's partition.
    block = torch.repeat_interleave(torch.arange(plan.num_k_blocks), plan.k_offsets.diff())
    own_kept = (plan.kv_index[:, :, tile] == block[:, None]) & plan.token_keep
    assert own_kept.any(-1).all()


@pytest.mark.parametrize("scope", ["local", "global"])
def test_topk_keeps_exactly_k_blocks(scope, seed):
    grid, topk = (3, 5, 7), 3
    q, k, _ = random_qkv(2, 105, 2, 8, seed=seed)
    plan = plan_vmoba(q, k, grid, layer_index=2, config=make_config("topk", scope, topk))
    per_token = plan.token_keep.sum(-1)  # [B, H, N]
    if scope == "local":
        assert (per_token == topk).all()
    else:
        assert (per_token.sum(-1) == topk * 105).all()


def test_partition_recurs_by_layer():
    assert [partition_for_layer(l) for l in range(7)] == ["1d", "2d", "3d", "1d", "2d", "3d", "1d"]
    q, k, _ = random_qkv(1, 105, 1, 8, seed=1)
    counts = [plan_vmoba(q, k, (3, 5, 7), layer_index=l, config=make_config("topk", "local", 2)).info["num_blocks"] for l in range(6)]
    # 1D: 3 frames; 2D: ceil(5/2) * ceil(7/3) = 9; 3D: ceil(3/2) * ceil(5/4) * ceil(7/3) = 12.
    assert counts == [3, 9, 12, 3, 9, 12]
    assert plan_vmoba(q, k, (3, 5, 7), layer_index=0, config=make_config("topk", "local", 1)).perm is None


@pytest.mark.parametrize("partition", list(LAYERS))
@pytest.mark.parametrize("grid", [(3, 5, 7), (2, 9, 11), (1, 1, 5)], ids=["3x5x7", "2x9x11", "1x1x5"])
def test_partition_blocks_are_coordinate_blocks(grid, partition):
    config = VMoBAConfig(**SMALL)
    order = partition_order(grid, LAYERS[partition], config)
    expected = torch.tensor(vmoba_block_ids(grid, config, layer_index=LAYERS[partition]))
    perm = torch.arange(math.prod(grid)) if order.perm is None else order.perm
    # Contiguous plan blocks hold exactly the tokens of one coordinate block each.
    got = order.block_of_position()
    assert order.num_blocks == len(set(expected.tolist()))
    assert torch.equal(expected[perm].unique_consecutive(), torch.arange(order.num_blocks))
    assert torch.equal(got, expected[perm])


@pytest.mark.parametrize("tau", [1e-9, 1.0], ids=["tiny", "one"])
def test_threshold_extremes(tau, seed):
    q, k, _ = random_qkv(1, 300, 2, 8, dtype=torch.float64, seed=seed)
    plan = plan_vmoba(q, k, (5, 6, 10), layer_index=1, config=make_config("threshold", "local", tau))
    kept = plan.token_keep.sum(-1)
    if tau < 1e-3:
        # Only the own block, unless it is the row's lowest (normalised score 0, share 0).
        assert ((kept == 1) | (kept == 2)).all() and (kept == 1).float().mean() > 0.8
    else:
        # Everything but the row's lowest block (normalised score 0, never needed to reach the
        # total) unless that one is the own block.
        nb = plan.num_k_blocks
        assert (kept >= nb - 1).all() and (kept == nb - 1).float().mean() > 0.8


def rederived_plan(q, k, grid, layer_index, config):
    """``(kv_index, token_keep)`` the direct way, all heads at once: reordered copies of q and
    k, the whole ``[B*H, N, nb]`` gate, threshold's arithmetic out of place, a per-token copy
    of its tile's entries."""
    order = partition_order(grid, layer_index, config)
    n, nb = order.num_tokens, order.num_blocks
    B, _, Hh, D = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    qp, kp = (order.permute(x, 1).transpose(1, 2).reshape(B * Hh, n, D).to(dtype) for x in (q, k))
    block = order.block_of_position()
    kmean = kp.new_zeros(B * Hh, nb, D).index_add_(1, block, kp) / order.offsets.diff().to(dtype)[:, None]
    gate = torch.bmm(qp, kmean.transpose(1, 2))
    own = torch.nn.functional.one_hot(block, nb).bool().expand_as(gate)
    row_shape = (B * Hh * n, nb) if config.scope == "local" else (B * Hh, n * nb)
    rows, own_rows = gate.reshape(row_shape), own.reshape(row_shape)
    if config.mode == "topk":
        count = config.topk if config.scope == "local" else config.topk * n
        chosen = rows.masked_fill(own_rows, float("inf")).topk(count, dim=-1).indices
        selected = torch.zeros_like(own_rows).scatter_(-1, chosen, True)
    else:
        lo = rows.amin(-1, keepdim=True)
        span = rows.amax(-1, keepdim=True) - lo
        norm = torch.where(span > 0, (rows - lo) / span.clamp(min=torch.finfo(dtype).tiny), 1.0).double()
        credited = norm.masked_fill(~own_rows, 0.0).sum(-1, keepdim=True)
        ranked, rank = norm.masked_fill(own_rows, float("-inf")).sort(dim=-1, descending=True)
        running = credited + ranked.masked_fill(own_rows.gather(-1, rank), 0.0).cumsum(-1)
        before = torch.cat([credited, running[..., :-1]], -1)
        take = before < config.tau * running[..., -1:]
        selected = own_rows | torch.zeros_like(own_rows).scatter_(-1, rank, take)
    selected = selected.view(B * Hh, n, nb)
    tile_of = torch.arange(n) // config.query_block
    n_tiles = int(tile_of[-1]) + 1
    tile_count = torch.zeros(B * Hh, n_tiles, nb, dtype=torch.int32).index_add_(1, tile_of, selected.int())
    kv_index, _ = pack_block_selection(tile_count.view(B, Hh, n_tiles, nb) > 0)
    entry = kv_index.view(B * Hh, n_tiles, -1)[:, tile_of]
    token_keep = selected.gather(-1, entry.clamp(min=0)) & (entry >= 0)
    return kv_index, token_keep.view(B, Hh, n, -1)


@pytest.mark.parametrize("chunk", ["default", "one_head"])
@pytest.mark.parametrize("partition", list(LAYERS))
@pytest.mark.parametrize("grid,query_block", [((3, 5, 7), 16), ((5, 6, 10), 37), ((2, 9, 11), 128)],
                         ids=["3x5x7-16", "5x6x10-37", "2x9x11-128"])
@pytest.mark.parametrize("mode,scope,value", SELECTION_CASES[::2])
def test_plan_is_bit_identical_to_direct_derivation(
    mode, scope, value, grid, query_block, partition, chunk, seed, monkeypatch
):
    """The chunked, copy-free selection gives exactly the plan of the direct one, in float32
    (where a different rounding would show) and in bfloat16 (keys converted in slices)."""
    if chunk == "one_head":
        monkeypatch.setattr(vmoba, "_CHUNK_ELEMENTS", 1)  # one head per chunk, k in 1-token slices
    N = math.prod(grid)
    q, k, _ = random_qkv(2, N, 3, 16, seed=seed)
    config = make_config(mode, scope, value, query_block=query_block)
    for queries, keys in ((q, k), (q.bfloat16(), k.bfloat16())):
        plan = plan_vmoba(queries, keys, grid, layer_index=LAYERS[partition], config=config)
        kv_index, token_keep = rederived_plan(queries, keys, grid, LAYERS[partition], config)
        if plan.token_keep is None:  # topk >= blocks: the shared dense plan
            assert token_keep.all() and torch.equal(plan.kv_index[0, 0], kv_index[0, 0])
            continue
        assert torch.equal(plan.kv_index, kv_index)
        assert torch.equal(plan.token_keep, token_keep)


def test_finite_check_allows_sums_that_overflow(seed):
    """Large finite inputs whose sum overflows float32 pass the cheap finiteness check."""
    q, k, _ = random_qkv(1, 105, 2, 8, seed=seed)
    q = q.abs() * 1e37  # the sum of 1.7K such entries overflows, a gate entry does not
    assert not torch.isfinite(q.sum())
    config = make_config("topk", "local", 3)
    plan = plan_vmoba(q, k, (3, 5, 7), layer_index=2, config=config)
    kv_index, token_keep = rederived_plan(q, k, (3, 5, 7), 2, config)
    assert torch.equal(plan.kv_index, kv_index) and torch.equal(plan.token_keep, token_keep)


# --- attention -----------------------------------------------------------------------------------
@pytest.mark.parametrize("partition", list(LAYERS))
@pytest.mark.parametrize("mode,scope", [("topk", "local"), ("threshold", "global")])
def test_attention_equals_masked_dense_with_text(mode, scope, partition, seed):
    grid, N, Hh = (3, 5, 7), 105, 2
    q, k, v = random_qkv(2, N, Hh, 8, dtype=torch.float64, seed=seed, requires_grad=True)
    ek, ev, _ = random_qkv(2, 5, Hh, 8, dtype=torch.float64, seed=seed + 1, requires_grad=True)
    emask = torch.tensor([[True] * 5, [True, True, False, True, False]])
    config = make_config(mode, scope, 3 if mode == "topk" else 0.4)
    scale = 0.3
    out = vmoba_attention(
        q, k, v, grid, config, layer_index=LAYERS[partition],
        extra_k=ek, extra_v=ev, extra_mask=emask, scale=scale, backend="reference",
    )
    mask = vmoba_mask(q.detach(), k.detach(), grid, config, layer_index=LAYERS[partition])
    expected = masked_attention(q, k, v, mask, ek, ev, emask, scale)
    assert_close(out, expected, torch.float64, "forward")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, ek, ev), grad)
    want = torch.autograd.grad(expected, (q, k, v, ek, ev), grad)
    for name, g, w in zip(("q", "k", "v", "extra_k", "extra_v"), got, want):
        assert_close(g, w, torch.float64, f"grad {name}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("partition", list(LAYERS))
def test_dense_limit_equals_sdpa(partition, scope, backend, seed):
    grid = (5, 6, 10)
    q, k, v = random_qkv(1, 300, 2, 16, seed=seed)
    config = make_config("topk", scope, 10_000)
    out, plan = vmoba_attention(q, k, v, grid, config, layer_index=LAYERS[partition], backend=backend, return_plan=True)
    assert plan.density() == pytest.approx(1.0)
    assert_close(out, dense_attention(q, k, v), torch.float32, "dense limit")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("partition", list(LAYERS))
@pytest.mark.parametrize("mode,scope,value", SELECTION_CASES[::2])
def test_torch_backend_matches_reference(mode, scope, value, partition, dtype, seed):
    grid, Hh = (5, 6, 10), 2
    q, k, v = random_qkv(2, 300, Hh, 16, dtype=dtype, seed=seed, requires_grad=True)
    ek, ev, _ = random_qkv(2, 4, Hh, 16, dtype=dtype, seed=seed + 1, requires_grad=True)
    emask = torch.tensor([[True, False, True, True], [True] * 4])
    config = make_config(mode, scope, value, query_block=32)
    grad = torch.randn(2, 300, Hh, 16, dtype=dtype)
    results = {}
    for backend in ("reference", "torch"):
        out = vmoba_attention(
            q, k, v, grid, config, layer_index=LAYERS[partition],
            extra_k=ek, extra_v=ev, extra_mask=emask, backend=backend,
        )
        results[backend] = (out, *torch.autograd.grad(out, (q, k, v, ek, ev), grad))
    for name, got, want in zip(("out", "q", "k", "v", "ek", "ev"), results["torch"], results["reference"]):
        # Gradients sum over many keys: allow a few times the output tolerance in float32.
        tol = TOLERANCE[dtype] * (1 if name == "out" or dtype == torch.float64 else 5)
        err = (got.double() - want.double()).abs().max().item()
        assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.1g}"


# --- config and arguments ------------------------------------------------------------------------
def test_config_defaults_and_omegaconf():
    default = VMoBAConfig()
    assert (default.mode, default.scope) == ("topk", "local")
    training = VMoBAConfig.training()
    assert (training.mode, training.scope, training.tau) == ("threshold", "global", 0.25)
    structured = OmegaConf.structured(VMoBAConfig)
    merged = OmegaConf.merge(structured, {"block_3d": [2, 4, 4], "scope": "global"})
    config = OmegaConf.to_object(merged)
    assert isinstance(config, VMoBAConfig) and config.block_3d == (2, 4, 4)
    assert config.scope == "global"


@pytest.mark.parametrize(
    "field,value",
    [
        ("mode", "topp"),
        ("scope", "regional"),
        ("tau", 0.0),
        ("tau", 1.5),
        ("topk", 0),
        ("block_1d", 0),
        ("block_2d", (4,)),
        ("block_3d", (2, 0, 2)),
        ("query_block", 0),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        VMoBAConfig(**{field: value})


def test_argument_errors():
    q, k, v = random_qkv(1, 105, 2, 8, seed=3)
    with pytest.raises(ValueError, match="grid"):
        vmoba_attention(q, k, v, (3, 5, 6), backend="reference")
    with pytest.raises(ValueError, match="topk"):
        vmoba_attention(q, k, v, (3, 5, 7), topk=0, backend="reference")
    with pytest.raises(ValueError, match="tau"):
        vmoba_attention(q, k, v, (3, 5, 7), mode="threshold", tau=2.0, backend="reference")
    with pytest.raises(ValueError, match="mode"):
        vmoba_attention(q, k, v, (3, 5, 7), mode="sample", backend="reference")
    with pytest.raises(ValueError, match="scope"):
        vmoba_attention(q, k, v, (3, 5, 7), scope="all", backend="reference")
    with pytest.raises(ValueError, match="valid options are .*topk"):
        vmoba_attention(q, k, v, (3, 5, 7), top_k=3, backend="reference")
    with pytest.raises(ValueError, match="layer_index"):
        vmoba_attention(q, k, v, (3, 5, 7), layer_index=-1, backend="reference")
    bad = q.clone()
    bad[0, 7, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="q contains"):
        vmoba_attention(bad, k, v, (3, 5, 7), layer_index=2, **SMALL, topk=2, backend="reference")
    bad_k = k.clone()
    bad_k[0, 3, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="k contains"):
        plan_vmoba(q, bad_k, (3, 5, 7), layer_index=1, config=make_config("threshold", "global", 0.5))
    with pytest.raises(ValueError, match="q contains"):  # top-k >= blocks: a dense plan, still checked
        vmoba_attention(bad, k, v, (3, 5, 7), layer_index=2, **SMALL, topk=1000, backend="reference")
    bad_v = v.clone()
    bad_v[0, 9, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="v contains 1 NaN/Inf"):
        vmoba_attention(q, k, bad_v, (3, 5, 7), layer_index=2, **SMALL, topk=2, backend="reference")
