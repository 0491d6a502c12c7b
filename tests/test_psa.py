"""PSA: pooled-level attention against independent dense float64 constructions (DESIGN §4.2.5
identity), level allocation against hand-made rows and a loop reference, the importance
estimate, reorders, backends against each other (outputs and gradients), config and checks."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import assert_close, random_qkv
from vdiff_sparse.attention import dense_attention, run_plan
from vdiff_sparse.layout import tile_order, uniform_offsets
from vdiff_sparse.methods.psa import (
    PSAConfig,
    allocate_levels,
    block_similarity,
    importance_matmul_dtype,
    level_histogram,
    plan_psa,
    psa_attention,
)
from vdiff_sparse.plan import AttentionPlan

LEVELS = (1, 2, 4, 8)
RAGGED_GRIDS = {"3x5x7": (3, 5, 7), "2x9x11": (2, 9, 11)}


# --- independent dense float64 constructions ------------------------------------------------
def _groups(k_offsets, p):
    """``(start, stop)`` of every pool group of ``p`` inside every key block, per block."""
    bounds = k_offsets.tolist()
    return [
        [(g, min(g + p, b1)) for g in range(b0, b1, p)] for b0, b1 in zip(bounds[:-1], bounds[1:])
    ]


def _dense64(q, k, v, scale=None, bias=None):
    """softmax(q kᵀ * scale + bias) v on ``[B, N, H, D]`` / ``[B, M, H, D]`` in float64."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()) * scale
    if bias is not None:
        logits = logits + bias
    return torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), v.double())


def repeated_pool_attention(q, k, v, q_offsets, k_offsets, row_levels, scale=None):
    """Dense attention where, for query block ``i``, key block ``j`` at level ``p =
    row_levels[i][j]`` has every pool group replaced by its mean repeated ``count`` times
    (``0`` drops the block). No ``ln(count)`` bias: this is the identity the bias encodes."""
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    qb = q_offsets.tolist()
    for i, (q0, q1) in enumerate(zip(qb[:-1], qb[1:])):
        keys, values = [], []
        for j, p in enumerate(row_levels[i]):
            if p == 0:
                continue
            for g0, g1 in _groups(k_offsets, p)[j]:
                count = g1 - g0
                keys.append(k[:, g0:g1].double().mean(1, keepdim=True).expand(-1, count, -1, -1))
                values.append(v[:, g0:g1].double().mean(1, keepdim=True).expand(-1, count, -1, -1))
        out[:, q0:q1] = _dense64(q[:, q0:q1], torch.cat(keys, 1), torch.cat(values, 1), scale)
    return out


def log_count_attention(q, k, v, k_offsets, p, scale=None):
    """Every query over every pooled key of factor ``p`` with logit bias ``ln(count)``."""
    groups = [g for block in _groups(k_offsets, p) for g in block]
    kp = torch.stack([k[:, a:b].double().mean(1) for a, b in groups], 1)
    vp = torch.stack([v[:, a:b].double().mean(1) for a, b in groups], 1)
    bias = torch.tensor([math.log(b - a) for a, b in groups], dtype=torch.float64)
    return _dense64(q, kp, vp, scale, bias)


def hand_plan(n, block_q, block_k, row_levels, perm=None):
    """A plan from per-row level lists (``0`` = skipped), shared by all batches and heads."""
    q_offsets, k_offsets = uniform_offsets(n, block_q), uniform_offsets(n, block_k)
    levels = torch.tensor(row_levels, dtype=torch.long)
    assert levels.shape == (q_offsets.numel() - 1, k_offsets.numel() - 1)
    max_kv = int((levels > 0).sum(-1).max())
    kv_index = torch.full((1, 1, levels.shape[0], max_kv), -1, dtype=torch.long)
    kv_level = torch.ones_like(kv_index)
    for i, row in enumerate(row_levels):
        # Deliberately not ascending, to catch any assumption on entry order.
        kept = [j for j, p in enumerate(row) if p][::-1]
        kv_index[0, 0, i, : len(kept)] = torch.tensor(kept)
        kv_level[0, 0, i, : len(kept)] = torch.tensor([row[j] for j in kept])
    return AttentionPlan(perm, q_offsets, k_offsets, kv_index, kv_level, method="hand")


# --- the pooled-level identity (DESIGN §4.2.5) ------------------------------------------------
@pytest.mark.parametrize("p", LEVELS, ids=lambda p: f"p{p}")
@pytest.mark.parametrize(
    "n,block_q,block_k",
    [(45, 16, 12), (61, 13, 10), (37, 8, 37), (50, 7, 5)],
    ids=["n45-q16-k12", "n61-q13-k10", "n37-one-key-block", "n50-k5"],
)
def test_uniform_level_equals_repeated_pool(p, n, block_q, block_k, seed):
    q, k, v = random_qkv(2, n, 2, 8, dtype=torch.float64, seed=seed)
    nqb, nkb = -(-n // block_q), -(-n // block_k)
    plan = hand_plan(n, block_q, block_k, [[p] * nkb] * nqb)
    out = run_plan(q, k, v, plan, backend="reference")
    expected = repeated_pool_attention(q, k, v, plan.q_offsets, plan.k_offsets, [[p] * nkb] * nqb)
    assert_close(out, expected, torch.float64, f"reference vs repeated means, p={p}")
    assert_close(
        log_count_attention(q, k, v, plan.k_offsets, p), expected, torch.float64,
        "ln(count) formulation vs repeated means",
    )
    if p > 1:
        # A pooled plan is not dense attention: guard against a trivially passing identity.
        assert (out - _dense64(q, k, v)).abs().max() > 1e-3


def test_mixed_levels_in_one_row(seed):
    n, block_q, block_k = 70, 16, 11  # 5 query blocks (last 6), 7 key blocks (last 4)
    rows = [
        [1, 2, 4, 8, 0, 2, 1],
        [0, 0, 8, 8, 1, 0, 4],
        [8, 4, 2, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 2],
        [4, 1, 0, 2, 8, 1, 8],
    ]
    q, k, v = random_qkv(2, n, 3, 8, dtype=torch.float64, seed=seed)
    plan = hand_plan(n, block_q, block_k, rows)
    expected = repeated_pool_attention(q, k, v, plan.q_offsets, plan.k_offsets, rows)
    assert_close(run_plan(q, k, v, plan, backend="reference"), expected, torch.float64, "reference")
    assert_close(run_plan(q, k, v, plan, backend="torch"), expected, torch.float64, "torch")


# --- density-1 and uniform-level quantile plans ------------------------------------------------
@pytest.mark.parametrize("reorder", ["none", "tile", "hilbert"])
@pytest.mark.parametrize("grid", RAGGED_GRIDS.values(), ids=RAGGED_GRIDS.keys())
def test_quantile_full_resolution_is_dense(grid, reorder, seed):
    n = math.prod(grid)
    q, k, v = random_qkv(2, n, 2, 16, seed=seed)
    out, plan = psa_attention(
        q, k, v, grid, mode="quantile", fractions={1: 1.0}, block_q=32, block_k=16,
        reorder=reorder, backend="torch", return_plan=True,
    )
    assert abs(plan.density() - 1.0) < 1e-12
    assert_close(out, dense_attention(q, k, v), torch.float32, f"dense, reorder={reorder}")


@pytest.mark.parametrize("grid", RAGGED_GRIDS.values(), ids=RAGGED_GRIDS.keys())
def test_quantile_all_level_two(grid, seed):
    n = math.prod(grid)
    q, k, v = random_qkv(1, n, 2, 8, dtype=torch.float64, seed=seed)
    config = PSAConfig(mode="quantile", fractions={2: 1.0}, block_q=24, block_k=18, reorder="none")
    out, plan = psa_attention(q, k, v, grid, config, backend="reference", return_plan=True)
    assert abs(plan.density() - 0.5) < 1e-12
    assert bool((plan.kv_index >= 0).all()) and plan.max_kv == plan.num_k_blocks
    assert bool((plan.kv_level == 2).all())
    assert level_histogram(plan)[2] == 2 * plan.num_q_blocks * plan.num_k_blocks
    expected = log_count_attention(q, k, v, plan.k_offsets, 2)
    assert_close(out, expected, torch.float64, "all p=2")


# --- level allocation ------------------------------------------------------------------------
T = {1: 0.5, 2: 0.6, 4: 0.7, 8: 0.8}


@pytest.mark.parametrize(
    "importance,thresholds,min_full,expected",
    [
        # ranked: b1 .4, b3 .25, b4 .2, b2 .1, b0 .05; share before: 0, .4, .65, .85, .95
        ([0.05, 0.4, 0.1, 0.25, 0.2], T, 0.0, [0, 1, 0, 1, 4]),
        ([0.05, 0.4, 0.1, 0.25, 0.2], {1: 0.3, 2: 0.6, 4: 0.7, 8: 0.9}, 0.0, [0, 1, 8, 2, 4]),
        # min_full_fraction: ceil(0.5 * 5) = 3 blocks at p=1 whatever the thresholds
        ([0.05, 0.4, 0.1, 0.25, 0.2], T, 0.5, [0, 1, 0, 1, 1]),
        # a threshold reached exactly is reached: the block after it is not included
        ([0.5, 0.25, 0.25], {1: 0.5, 8: 0.75}, 0.0, [1, 8, 0]),
        # the first block always gets p=1, even with min_full_fraction = 0
        ([0.9, 0.05, 0.05], {4: 0.5}, 0.0, [1, 0, 0]),
        # ties ranked by block id (stable), so the plan never depends on sort internals
        ([0.25, 0.25, 0.25, 0.25], {1: 0.5}, 0.0, [1, 1, 0, 0]),
        # unnormalised rows: shares are taken of the row total
        ([2.0, 1.0, 1.0], {1: 0.5, 2: 0.75}, 0.0, [1, 2, 0]),
        # threshold 1 keeps every block with importance, never the zero ones after them
        ([0.0, 0.5, 0.5, 0.0], {1: 0.4, 8: 1.0}, 0.0, [0, 1, 8, 0]),
    ],
    ids=[
        "default", "all-levels", "min-full", "exact-hit", "first-is-full", "ties",
        "unnormalised", "tau-one",
    ],
)
def test_threshold_allocation_by_hand(importance, thresholds, min_full, expected):
    config = PSAConfig(thresholds=thresholds, min_full_fraction=min_full)
    got = allocate_levels(torch.tensor([importance], dtype=torch.float64), config)
    assert got.tolist() == [expected]


def _threshold_loop(row, thresholds, min_full):
    """DESIGN §4.2.4 one block at a time: blocks up to each cumulative share get that level,
    the block crossing a threshold included; the top ceil(min_full * n) (>= 1) at p = 1."""
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))
    total = sum(row)
    levels, acc = [0] * len(row), 0.0
    n_full = max(1, math.ceil(min_full * len(row)))
    for rank, j in enumerate(order):
        reached = [p for p in sorted(thresholds) if acc < thresholds[p] * total]
        levels[j] = 1 if rank < n_full else (reached[0] if reached else 0)
        acc += row[j]
    return levels


@pytest.mark.parametrize("min_full", [0.0, 0.06, 0.3], ids=lambda m: f"minfull{m}")
@pytest.mark.parametrize(
    "thresholds",
    [T, {1: 0.7, 2: 0.8, 4: 0.9, 8: 0.97}, {2: 0.4, 8: 0.95}],
    ids=["released", "dense-ish", "two-levels"],
)
def test_threshold_allocation_matches_loop(thresholds, min_full, seed):
    g = torch.Generator().manual_seed(seed)
    # Peaked rows like real attention, with exact ties from rounding to a coarse grid.
    rows = (torch.rand(40, 23, generator=g, dtype=torch.float64) ** 4 * 64).round() / 64
    rows[:, 0] += 1 / 64  # no all-zero row
    config = PSAConfig(thresholds=thresholds, min_full_fraction=min_full)
    got = allocate_levels(rows, config)
    expected = [_threshold_loop(r, thresholds, min_full) for r in rows.tolist()]
    assert got.tolist() == expected


@pytest.mark.parametrize(
    "fractions,nk,expected_counts",
    [
        ({1: 0.1, 2: 0.15, 8: 0.2}, 10, {1: 1, 2: 2, 8: 2, 0: 5}),
        ({1: 0.1, 2: 0.05, 8: 0.2}, 7, {1: 1, 2: 1, 8: 1, 0: 4}),  # cuts 0.7, 1.05, 2.45 rounded up
        ({1: 1.0}, 9, {1: 9}),
        ({4: 0.5, 8: 0.5}, 5, {4: 3, 8: 2}),
    ],
    ids=["design-example", "rounding-up", "dense", "coarse-only"],
)
def test_quantile_allocation(fractions, nk, expected_counts, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(6, nk, generator=g)
    levels = allocate_levels(rows, PSAConfig(mode="quantile", fractions=fractions))
    order = rows.argsort(-1, descending=True)
    for row_levels in levels.gather(-1, order).tolist():
        # Finer levels go to the more important blocks; then skipped.
        key = [p if p else 16 for p in row_levels]
        assert key == sorted(key)
        assert {p: row_levels.count(p) for p in set(row_levels)} == expected_counts


# --- importance estimate ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "importance,importance_dtype",
    [("sampled", "bfloat16"), ("sampled", "float32"), ("mean_pooled", "auto")],
)
def test_importance_finds_aligned_key_block(importance, importance_dtype, seed):
    grid = (2, 9, 11)  # 198 tokens; 13 key blocks of 16 (last 6)
    n, D = math.prod(grid), 32
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(2, 1, 2, D, generator=g)  # one per (batch, head)
    q = direction + 0.3 * torch.randn(2, n, 2, D, generator=g)
    k = torch.randn(2, n, 2, D, generator=g)
    target = int(torch.randint(0, 12, (1,), generator=g))
    k[:, target * 16 : (target + 1) * 16] += 2.0 * direction
    config = PSAConfig(
        mode="quantile", fractions={1: 0.01}, block_q=32, block_k=16, reorder="none",
        importance=importance, importance_dtype=importance_dtype,
    )
    plan = plan_psa(q, k, grid, config)
    # Exactly one block per row (ceil(0.01 * 13) = 1): the aligned one, for every row.
    assert plan.max_kv == 1
    assert bool((plan.kv_index == target).all()), plan.kv_index.flatten().tolist()


def _importance_loop(q, k, q_offsets, k_offsets, sq, sk):
    """DESIGN §4.2.3 for one (batch, head) ``q, k [N, D]``, one block pair at a time."""
    def samples(a, b, s):
        return [a + (2 * i + 1) * (b - a) // (2 * s) for i in range(s)]

    qo, ko = q_offsets.tolist(), k_offsets.tolist()
    rows = []
    for q0, q1 in zip(qo[:-1], qo[1:]):
        per_query = []
        for i in samples(q0, q1, sq):
            block_max = [
                max(float(q[i] @ k[j]) * q.shape[-1] ** -0.5 for j in samples(k0, k1, sk))
                for k0, k1 in zip(ko[:-1], ko[1:])
            ]
            per_query.append([math.exp(m - max(block_max)) for m in block_max])
        row = [max(col) for col in zip(*per_query)]
        rows.append([x / sum(row) for x in row])
    return rows


@pytest.mark.parametrize("reorder", ["none", "hilbert"])
@pytest.mark.parametrize("mode", ["threshold", "quantile"])
def test_plan_levels_match_loop_pipeline(mode, reorder, seed):
    grid = (2, 9, 11)
    n = math.prod(grid)
    q, k, _ = random_qkv(1, n, 2, 8, dtype=torch.float64, seed=seed)
    config = PSAConfig(
        mode=mode, block_q=40, block_k=24, reorder=reorder, samples_per_block=5,
        **(dict(thresholds={1: 0.3, 2: 0.45, 4: 0.6, 8: 0.75}) if mode == "threshold"
           else dict(fractions={1: 0.25, 4: 0.25, 8: 0.25})),
    )
    plan = plan_psa(q, k, grid, config)
    qp, kp = plan.permute(q), plan.permute(k)
    for h in range(2):
        importance = _importance_loop(qp[0, :, h], kp[0, :, h], plan.q_offsets, plan.k_offsets, 5, 5)
        if mode == "threshold":
            expected = [
                _threshold_loop(row, config.thresholds, config.min_full_fraction) for row in importance
            ]
        else:
            expected = allocate_levels(torch.tensor(importance), config).tolist()
        got = torch.zeros(plan.num_q_blocks, plan.num_k_blocks + 1, dtype=torch.long)
        index = plan.kv_index[0, h]
        got.scatter_(1, torch.where(index >= 0, index, plan.num_k_blocks), plan.kv_level[0, h])
        got = got[:, :-1]
        assert got.tolist() == expected, f"head {h}"


@pytest.mark.parametrize("magnitude", [1.0, 4.0], ids=["logits~5", "logits~20"])
@pytest.mark.parametrize("importance_dtype", ["bfloat16", "float32"])
def test_low_precision_importance_close_to_loop(importance_dtype, magnitude, seed):
    """The sampled estimate with bfloat16 / float32 matmul operands stays within their
    rounding of the float64 loop. In bfloat16 operands and logits are rounded (8 mantissa
    bits), so ``blockmax - rowmax`` is off by up to ~``2 * max|logit| * 2**-8`` and the
    importance by about as much relatively."""
    from vdiff_sparse.methods.psa_importance import sampled_importance

    grid = (2, 9, 11)
    n = math.prod(grid)
    q, k, _ = random_qkv(1, n, 2, 16, dtype=torch.float32, seed=seed)
    q = q * magnitude
    order = tile_order(grid, (2, 4, 4))
    q_offsets, k_offsets = uniform_offsets(n, 40), uniform_offsets(n, 24)
    dtype = getattr(torch, importance_dtype)
    got = sampled_importance(q, k, order, q_offsets, k_offsets, 5, 6, 16**-0.5, dtype)
    assert got.dtype == torch.float32
    if dtype == torch.bfloat16:  # the dtype is used, not just accepted
        exact = sampled_importance(q, k, order, q_offsets, k_offsets, 5, 6, 16**-0.5, torch.float32)
        assert not torch.equal(got, exact)
    qp, kp = order.permute(q.double(), 1), order.permute(k.double(), 1)
    max_logit = float(torch.einsum("bnhd,bmhd->bhnm", qp, kp).abs().max()) * 16**-0.5
    tol = 2 * max_logit * 2**-8 if dtype == torch.bfloat16 else 1e-5
    for h in range(2):
        rows = _importance_loop(qp[0, :, h], kp[0, :, h], q_offsets, k_offsets, 5, 6)
        expected = torch.tensor(rows, dtype=torch.float64)
        err = float(((got[h].double() - expected).abs() / expected.clamp(min=1e-3)).max())
        assert err <= tol, f"head {h}: relative error {err:.3g} > {tol:.3g} (max |logit| {max_logit:.3g})"


def test_importance_dtype_auto_resolution(monkeypatch):
    import vdiff_sparse.methods.psa_importance as psa_importance

    auto = PSAConfig()
    q32, q64 = torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8, dtype=torch.float64)
    for fast in (True, False):
        monkeypatch.setattr(psa_importance, "_cpu_has_fast_bf16", lambda fast=fast: fast)
        low = torch.bfloat16 if fast else torch.float32
        for q in (q32, q32.bfloat16(), q32.half()):
            assert importance_matmul_dtype(auto, q) == low, q.dtype
        assert importance_matmul_dtype(auto, q64) == torch.float64  # exact inputs, exact estimate
    for name in ("bfloat16", "float32", "float64"):  # an explicit choice is kept
        assert importance_matmul_dtype(PSAConfig(importance_dtype=name), q64) == getattr(torch, name)


def test_samples_per_block_default_is_quarter_block(seed):
    grid = (3, 5, 7)
    q, k, _ = random_qkv(1, 105, 2, 8, seed=seed)
    base = dict(block_q=16, block_k=16, mode="quantile", fractions={1: 0.3, 4: 0.3})
    default = plan_psa(q, k, grid, PSAConfig(**base))
    quarter = plan_psa(q, k, grid, PSAConfig(**base, samples_per_block=4))
    assert torch.equal(default.kv_index, quarter.kv_index)
    assert torch.equal(default.kv_level, quarter.kv_level)


# --- determinism -----------------------------------------------------------------------------
@pytest.mark.parametrize("importance", ["sampled", "mean_pooled"])
def test_plan_is_deterministic(importance, seed):
    grid = (5, 7, 9)
    config = PSAConfig(block_q=32, block_k=16, importance=importance)
    q, k, _ = random_qkv(2, math.prod(grid), 2, 16, seed=seed)
    a, b = plan_psa(q, k, grid, config), plan_psa(q.clone(), k.clone(), grid, config)
    assert torch.equal(a.kv_index, b.kv_index) and torch.equal(a.kv_level, b.kv_level)
    assert torch.equal(a.perm, b.perm)
    q2, k2, _ = random_qkv(2, math.prod(grid), 2, 16, seed=seed + 1)
    c = plan_psa(q2, k2, grid, config)
    assert c.kv_index.shape != a.kv_index.shape or not (
        torch.equal(c.kv_index, a.kv_index) and torch.equal(c.kv_level, a.kv_level)
    )


@pytest.mark.parametrize("mode", [{}, {"mode": "budget", "density": 0.3}], ids=["threshold", "budget"])
@pytest.mark.parametrize("budget", [1, 700], ids=["one-block-per-chunk", "few-blocks-per-chunk"])
def test_chunked_importance_gives_same_plan(budget, mode, seed, monkeypatch):
    import vdiff_sparse.methods.psa_importance as psa_importance

    grid = (3, 5, 7)
    q, k, _ = random_qkv(2, 105, 3, 8, seed=seed)
    config = PSAConfig(block_q=16, block_k=8, **mode)
    whole = plan_psa(q, k, grid, config)
    monkeypatch.setattr(psa_importance, "CHUNK_ELEMENTS", budget)
    chunked = plan_psa(q, k, grid, config)
    assert torch.equal(whole.kv_index, chunked.kv_index) and torch.equal(whole.kv_level, chunked.kv_level)


# --- every (block_k, level) on ragged N (DESIGN §4.2.8) -----------------------------------------
@pytest.mark.parametrize("p", LEVELS, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("block_k", [32, 64, 128], ids=lambda b: f"bk{b}")
def test_block_k_level_grid(block_k, p, seed):
    grid = (3, 5, 23)  # 345 tokens: key blocks of 128 are 128, 128, 89
    q, k, v = random_qkv(1, math.prod(grid), 2, 16, dtype=torch.float64, seed=seed)
    config = PSAConfig(mode="quantile", fractions={p: 1.0}, block_q=64, block_k=block_k, reorder="none")
    plan = plan_psa(q, k, grid, config)
    assert bool((plan.kv_level == p).all())
    expected = log_count_attention(q, k, v, plan.k_offsets, p)
    for backend in ("reference", "torch"):
        out = run_plan(q, k, v, plan, backend=backend)
        assert_close(out, expected, torch.float64, f"{backend}, block_k={block_k}, p={p}")


# --- reorders ---------------------------------------------------------------------------------
@pytest.mark.parametrize("reorder", ["none", "tile", "hilbert"])
@pytest.mark.parametrize("grid", RAGGED_GRIDS.values(), ids=RAGGED_GRIDS.keys())
def test_reorders_give_valid_plans(grid, reorder, seed):
    n = math.prod(grid)
    q, k, v = random_qkv(2, n, 2, 16, seed=seed)
    config = PSAConfig(block_q=32, block_k=16, reorder=reorder, tile=(2, 3, 4))
    out, plan = psa_attention(q, k, v, grid, config, backend="torch", return_plan=True)
    if reorder == "none":
        assert plan.perm is None
    else:
        assert torch.equal(plan.perm.sort().values, torch.arange(n))
    if reorder == "tile":
        assert torch.equal(plan.perm, tile_order(grid, (2, 3, 4)).perm)
    assert plan.kv_index.shape[:3] == (2, 2, plan.num_q_blocks)
    assert int(plan.kv_index.max()) < plan.num_k_blocks
    assert bool(((plan.kv_level == 1) | (plan.kv_index >= 0)).all())  # pad slots are level 1
    assert 0 < plan.density() < 1
    hist = level_histogram(plan)
    assert sum(hist.values()) == 2 * 2 * plan.num_q_blocks * plan.num_k_blocks
    for p in LEVELS:
        assert hist[p] == int(((plan.kv_level == p) & (plan.kv_index >= 0)).sum())
    reference = run_plan(q, k, v, plan, backend="reference")
    assert_close(out, reference, torch.float32, f"torch vs reference, reorder={reorder}")


# --- torch backend vs reference: forward and gradients ----------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", ["threshold", "quantile"])
def test_torch_backend_matches_reference_with_grads(mode, dtype, seed):
    grid = (2, 9, 11)
    n = math.prod(grid)
    inputs = random_qkv(2, n, 2, 16, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    extra_k, extra_v = (torch.randn(2, 5, 2, 16, generator=g).to(dtype) for _ in range(2))
    extra_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    config = PSAConfig(
        mode=mode, block_q=32, block_k=24,
        **(dict(thresholds={1: 0.3, 2: 0.5, 4: 0.7, 8: 0.9}, min_full_fraction=0.0) if mode == "threshold"
           else dict(fractions={1: 0.2, 2: 0.2, 4: 0.2, 8: 0.2})),
    )
    grad_out = torch.randn(2, n, 2, 16, generator=g).to(dtype)
    results = {}
    for backend in ("reference", "torch"):
        q, k, v = (x.clone().requires_grad_(True) for x in inputs)
        out, plan = psa_attention(
            q, k, v, grid, config, extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask,
            backend=backend, return_plan=True,
        )
        out.backward(grad_out)
        results[backend] = (out.detach(), q.grad, k.grad, v.grad, plan)
    ref, fast = results["reference"], results["torch"]
    levels = set(ref[4].kv_level[ref[4].kv_index >= 0].tolist())
    assert levels == {1, 2, 4, 8}, f"the plan should use every level, got {levels}"
    tol = dtype if dtype == torch.float64 else torch.float32
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast[:4], ref[:4]):
        scale = max(1.0, b.abs().max().item())
        assert_close(a / scale, b / scale, tol, f"{name} ({mode})")


# --- similarity cap ---------------------------------------------------------------------------
def test_block_similarity_groups():
    # One block of 6 keys: p=4 groups are [0..3] and [4, 5]; p=8 is one group [0..5].
    e = torch.eye(4, dtype=torch.float64)
    keys = torch.stack([e[0], e[1], e[2], e[0], e[3], e[3]])[None]  # [1, 6, 4]
    offsets = torch.tensor([0, 6])
    # p=2 pairs: (e0, e1) 0, (e2, e0) 0, (e3, e3) 1 -> 1/3
    assert block_similarity(keys, offsets, 2)[0].tolist() == pytest.approx([1 / 3])
    # p=4: first/last of [0..3] is (e0, e0) = 1, of [4, 5] (e3, e3) = 1
    assert block_similarity(keys, offsets, 4)[0].tolist() == pytest.approx([1.0])
    # p=8: (e0, e3) = 0
    assert block_similarity(keys, offsets, 8)[0].tolist() == pytest.approx([0.0], abs=1e-12)
    # A one-token block pools exactly: similarity 1.
    assert block_similarity(keys[:, :1], torch.tensor([0, 1]), 8).tolist() == [[1.0]]


def test_similarity_cap_lowers_levels(seed):
    grid = (1, 4, 16)  # 64 tokens, 4 key blocks of 16
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 64, 1, 8, generator=g) for _ in range(3))
    k[:, 0:16] = k[:, 0:1]  # block 0: all keys equal -> similar at every level
    k[:, 16:32] = k[:, 16:32:2].repeat_interleave(2, 1)  # block 1: equal pairs only
    config = PSAConfig(
        mode="quantile", fractions={8: 1.0}, block_q=16, block_k=16, reorder="none",
        similarity_cap={2: 0.9, 4: 0.9, 8: 0.9},
    )
    plan = plan_psa(q, k, grid, config)
    assert plan.kv_index[0, 0].tolist() == [[0, 1, 2, 3]] * 4  # ascending, nothing skipped
    # block 0 keeps 8, block 1 drops to 2, random blocks 2 and 3 fall to full resolution
    assert plan.kv_level[0, 0].tolist() == [[8, 2, 1, 1]] * 4
    out = run_plan(q, k, v, plan, backend="torch")
    assert_close(out, run_plan(q, k, v, plan, backend="reference"), torch.float32, "capped plan")
    # Without the cap everything stays at 8.
    uncapped = plan_psa(q, k, grid, config.replace(similarity_cap=None))
    assert bool((uncapped.kv_level == 8).all())


# --- config, overrides, checks ----------------------------------------------------------------
def test_config_omegaconf_and_overrides(seed):
    structured = OmegaConf.structured(PSAConfig)
    cfg = OmegaConf.to_object(
        OmegaConf.merge(structured, {"mode": "quantile", "block_k": 32, "tile": [1, 2, 2]})
    )
    assert isinstance(cfg, PSAConfig) and cfg.block_k == 32 and cfg.tile == (1, 2, 2)
    assert cfg.thresholds == {1: 0.5, 2: 0.6, 4: 0.7, 8: 0.8}
    with pytest.raises(Exception, match="block_kk"):
        OmegaConf.merge(structured, {"block_kk": 32})
    grid = (3, 5, 7)
    q, k, v = random_qkv(1, 105, 2, 8, seed=seed)
    _, plan = psa_attention(
        q, k, v, grid, mode="quantile", fractions={1: 0.2}, block_q=16, block_k=16,
        backend="reference", return_plan=True,
    )
    assert plan.info["config"].fractions == {1: 0.2} and plan.info["config"].mode == "quantile"
    assert plan.max_kv == 2 and bool((plan.kv_level == 1).all())  # ceil(0.2 * 7) = 2
    with pytest.raises(ValueError, match=r"unknown PSA option\(s\) \['fraction'\].*fractions"):
        psa_attention(q, k, v, grid, fraction={1: 0.2})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="topk"), r"mode must be one of \['threshold', 'quantile', 'budget'\], got 'topk'"),
        (dict(reorder="gilbert"), r"reorder must be one of .*'hilbert'.*got 'gilbert'"),
        (dict(importance="exact"), r"importance must be one of"),
        (dict(importance_dtype="float16"), r"importance_dtype must be one of \['auto', 'bfloat16', 'float32', 'float64'\], got 'float16'"),
        (dict(thresholds={1: 0.6, 2: 0.5}), r"thresholds must increase strictly.*\{1: 0.6, 2: 0.5\}"),
        (dict(thresholds={1: 0.5, 4: 0.5}), r"thresholds must increase strictly"),
        (dict(thresholds={3: 0.5}), r"thresholds keys must be pool levels among \[1, 2, 4, 8\], got \[3\]"),
        (dict(thresholds={1: 1.5}), r"thresholds\[1\] must be a float in \(0.0, 1.0\], got 1.5"),
        (dict(thresholds={}), r"thresholds must name at least one level"),
        (dict(fractions={16: 0.1}), r"fractions keys must be pool levels"),
        (dict(fractions={1: -0.1}), r"fractions\[1\] must be a float in \[0.0, 1.0\]"),
        (dict(fractions={1: 0.6, 2: 0.6}), r"fractions must sum to a value in \(0, 1\]"),
        (dict(fractions={1: 0.0}), r"fractions must sum to a value in \(0, 1\]"),
        (dict(min_full_fraction=1.5), r"min_full_fraction must be a float in \[0, 1\], got 1.5"),
        (dict(similarity_cap={1: 0.5}), r"similarity_cap keys must be pool levels among \[2, 4, 8\]"),
        (dict(block_q=0), r"block_q must be an int >= 1, got 0"),
        (dict(samples_per_block=0), r"samples_per_block must be an int >= 1"),
        (dict(tile=(2, 4)), r"tile must be a tuple of 3 positive ints"),
    ],
    ids=[
        "mode", "reorder", "importance", "importance-dtype", "thresholds-decreasing", "thresholds-equal",
        "thresholds-key", "thresholds-range", "thresholds-empty", "fractions-key",
        "fractions-negative", "fractions-sum", "fractions-zero", "min-full", "cap-key",
        "block-q", "samples", "tile",
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PSAConfig(**kwargs)


def test_input_errors(seed):
    q, k, v = random_qkv(1, 105, 2, 8, seed=seed)
    with pytest.raises(ValueError, match=r"grid \(3, 5, 8\) has 120 tokens but q/k/v have N=105"):
        psa_attention(q, k, v, (3, 5, 8))
    bad = q.clone()
    bad[0, 3, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^q contains 1 NaN/Inf"):
        psa_attention(bad, k, v, (3, 5, 7))
    bad_k = k.clone()
    bad_k[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^k contains 1 NaN/Inf"):
        plan_psa(q, bad_k, (3, 5, 7))
    bad_v = v.clone()
    bad_v[0, 9, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^v contains 1 NaN/Inf"):
        psa_attention(q, k, bad_v, (3, 5, 7))
    with pytest.raises(ValueError, match=r"q must be \[B, N, heads, D\]"):
        plan_psa(q[0], k[0], (3, 5, 7))


def test_default_config_runs_and_is_sparse(seed):
    grid = (4, 12, 14)  # 672 tokens: 6 blocks of 128 (last 32)
    q, k, v = random_qkv(1, math.prod(grid), 2, 16, seed=seed)
    out, plan = psa_attention(q, k, v, grid, backend="torch", return_plan=True)
    assert plan.method == "psa" and plan.perm is not None  # default reorder: hilbert
    assert plan.kv_index.shape[:2] == (1, 2)
    assert 0 < plan.density() <= 1
    assert_close(out, run_plan(q, k, v, plan, backend="reference"), torch.float32, "default config")
