"""PSA's budget mode: the allocator against a loop definition of its greedy, the budget met per
head on ragged grids and every block size, exact binary block-sparse when the estimate forbids
every pooling (and only then), the spread estimate against a loop over the sampled logits,
backends against the float64 reference on budget plans, and the mode wherever PSA is
(processors, presets, CLI overrides, fine-tuning options)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import assert_close, random_qkv
from vdiff_sparse.attention import run_plan
from vdiff_sparse.layout import uniform_offsets
from vdiff_sparse.methods import psa as psa_module
from vdiff_sparse.methods import psa_budget, psa_importance
from vdiff_sparse.methods.psa import PSAConfig, plan_psa, psa_attention
from vdiff_sparse.methods.psa_budget import (
    LEVELS_COARSE_FIRST,
    SPREAD_QUERY_STRIDE,
    allocate_budget,
    head_variation_ratio,
    pooling_distortion,
    sampled_estimates,
)

RAGGED_GRIDS = {"3x5x7": (3, 5, 7), "2x9x11": (2, 9, 11), "1x6x10": (1, 6, 10)}
BLOCKS = [(5, 5), (8, 8), (16, 16), (16, 24), (32, 32), (64, 64), (128, 128)]


# --- a loop definition of the allocation ------------------------------------------------------
def loop_allocation(importance, distortion, sizes, budget):
    """One row: every block's lower convex hull over its allowed points ``(1/p, e(p))`` (``e``
    finite) plus skip ``(0, 1)``, its moves ranked by ``importance * slope`` (ties: block, then
    chain order), taken while the spent keys are below the budget. Slopes and efficiencies in
    float32 arithmetic, as the allocator computes them, so ties are the same ties."""
    f32 = np.float32
    moves = []
    for j, (w, n) in enumerate(zip(importance, sizes)):
        points = [(0.0, 1.0, 0)] + [(1 / p, distortion[p][j], p) for p in (8, 4, 2, 1)
                                     if p in distortion and math.isfinite(distortion[p][j])]
        hull = [points[0]]
        for k in range(1, len(points)):
            x, e, _ = points[k]
            # A point is on the hull only strictly below every chord around it (by more than
            # float32 rounding: the distortions are float32, collinear points are not on it).
            if all(e < a[1] + (x - a[0]) / (c[0] - a[0]) * (c[1] - a[1]) - 1e-6
                   for a in points[:k] for c in points[k + 1:]):
                hull.append(points[k])
        for order, (a, b) in enumerate(zip(hull, hull[1:])):
            slope = (f32(a[1]) - f32(b[1])) / (f32(b[0]) - f32(a[0]))
            moves.append((f32(w) * slope, j, order, n * (b[0] - a[0]), b[2]))
    ranked = sorted(moves, key=lambda m: (-m[0], m[1], m[2]))
    level, spent = [0] * len(importance), 0.0
    limit = budget - 1e-9 * max(1.0, budget)
    for _, j, _, cost, p in ranked:
        if spent >= limit:
            break
        level[j], spent = p, spent + cost
    return level


def _random_rows(gen, rows, nk, levels, ties: bool):
    """Importance rows (some zero, some tied), spreads on both sides of the forbidding ones,
    one ``rho`` per row, and which levels each block may take (some denied per block)."""
    w = torch.rand(rows, nk, generator=gen) ** 3
    w[torch.rand(rows, nk, generator=gen) < 0.2] = 0.0
    if ties:
        w[:, 1::3] = w[:, :1]
    spread = torch.rand(rows, nk, generator=gen) * 14
    spread[torch.rand(rows, nk, generator=gen) < 0.1] = 0.0
    rho = torch.rand(rows, 1, generator=gen) * 1.2
    allowed = torch.tensor([p in levels for p in LEVELS_COARSE_FIRST]).expand(nk, 4).clone()
    allowed[:, :3] &= torch.rand(nk, 3, generator=gen) > 0.15
    return w, spread, rho, allowed


def _loop_rows(w, spread, rho, allowed, sizes, budget):
    out = []
    for r in range(w.shape[0]):
        distortion = {p: [float(pooling_distortion(spread[r, j], rho[r, 0], 1 / p)) if allowed[j, i] else math.inf
                          for j in range(w.shape[1])] for i, p in enumerate(LEVELS_COARSE_FIRST)}
        out.append(loop_allocation(w[r].tolist(), distortion, sizes.tolist(), budget))
    return out


@pytest.mark.parametrize("levels", [(1, 2, 4, 8), (1, 2), (2, 4), (1,), (8,)], ids=lambda l: "L" + "".join(map(str, l)))
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_allocation_matches_loop_definition(levels, ties, seed):
    """The allocator's shortcut (hull = skip, coarsest, finest allowed level, which needs a
    concave distortion) against the general hull of every allowed level."""
    gen = torch.Generator().manual_seed(seed)
    nk = 23
    sizes = torch.full((nk,), 16)
    sizes[-1] = 7  # ragged last block
    w, spread, rho, allowed = _random_rows(gen, 12, nk, levels, ties)
    for budget_fraction in (0.02, 0.1, 0.25, 0.6, 1.0):
        budget = budget_fraction * float(sizes.sum())
        got = allocate_budget(w, spread, rho, sizes, budget, allowed)
        assert got.tolist() == _loop_rows(w, spread, rho, allowed, sizes, budget), budget_fraction


def test_allocation_spends_the_budget_and_at_most_one_move_more(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.full((40,), 32)
    w, spread, rho, _ = _random_rows(gen, 50, 40, (1, 2, 4, 8), False)
    for d in (0.05, 0.13, 0.3, 0.77):
        budget = d * float(sizes.sum())
        levels = allocate_budget(w, spread, rho, sizes, budget,
                                 torch.ones(4, dtype=torch.bool))
        spent = torch.where(levels > 0, sizes / levels.clamp(min=1), 0.0).sum(-1)
        assert bool((spent >= budget - 1e-6).all()) and bool((spent < budget + 32).all()), (d, spent)


def _argsort_allocation(w, spread, rho, sizes, budget, allowed):
    """The greedy as a stable argsort of the efficiencies (ties: block, then first move), its
    prefix under the budget taken: the formulation the allocator's sort keys replace."""
    coarse, fine = psa_budget._coarse_and_fine(allowed)
    x_coarse, x_fine = 1 / coarse.clamp(min=1).float(), 1 / fine.clamp(min=1).float()
    e_coarse, e_fine = pooling_distortion(spread, rho, x_coarse), pooling_distortion(spread, rho, x_fine)
    to_coarse = (1 - e_coarse) / x_coarse
    coarse_to_fine = (e_coarse - e_fine) / (x_fine - x_coarse).clamp(min=1e-6)
    two = (coarse != fine) & (to_coarse > coarse_to_fine)
    efficiency = torch.stack([torch.where(coarse > 0, w * torch.where(two, to_coarse, (1 - e_fine) / x_fine), -1.0),
                              torch.where(two, w * coarse_to_fine, -1.0)], -1).flatten(-2)
    cost = torch.stack([sizes * torch.where(two, x_coarse, x_fine), sizes * torch.where(two, x_fine - x_coarse, 0.0)],
                       -1).flatten(-2).expand(efficiency.shape)
    order = efficiency.argsort(dim=-1, descending=True, stable=True)
    spent = cost.gather(-1, order).double()
    limit = budget - 1e-9 * max(1.0, budget)
    taken = torch.zeros_like(order, dtype=torch.bool).scatter_(-1, order, spent.cumsum(-1) - spent < limit)
    taken = (taken & (efficiency >= 0)).unflatten(-1, (-1, 2))
    return torch.where(taken[..., 1], fine, torch.where(taken[..., 0], torch.where(two, coarse, fine), 0))


@pytest.mark.parametrize("shape", ["rows", "heads"])
def test_allocation_keys_compiled_and_eager_match_the_argsort_greedy(shape, seed):
    """The allocator (sort keys packing efficiency, index and cost; numpy's sort between the
    two halves) against the argsort formulation, eager and compiled, on rows with ties, zero
    importance (moves of efficiency 0 and -0.0), ragged sizes, levels denied per block or per
    (head, block) like the similarity cap, and budgets from nothing taken to everything."""
    gen = torch.Generator().manual_seed(seed)
    nk = 37
    sizes = torch.full((nk,), 24)
    sizes[-1] = 5
    w, spread, rho, allowed = _random_rows(gen, 30, nk, (1, 2, 4, 8), ties=True)
    w[:, 3] = 0.0
    w[:, 5] = -0.0  # efficiencies of -0.0, tied with the 0.0 ones
    spread[:, 4] = 1e9  # pooling keeps nothing (e = 1): the block's one move is to full resolution
    if shape == "heads":  # [heads, query blocks, key blocks], levels denied per (head, key block)
        w, spread, rho = w.view(3, 10, nk), spread.view(3, 10, nk), rho.view(3, 10, 1)[:, :1]
        allowed = allowed & (torch.rand(3, 1, nk, 4, generator=gen) > 0.2)
    for fraction in (0.0, 0.03, 0.2, 0.55, 1.0, 1.5):
        budget = fraction * float(sizes.sum())
        want = _argsort_allocation(w, spread, rho, sizes, budget, allowed)
        eager = allocate_budget(w, spread, rho, sizes, budget, allowed, fused=False)
        assert torch.equal(eager, want), fraction
        assert torch.equal(allocate_budget(w, spread, rho, sizes, budget, allowed, fused=True), want), fraction


def test_sorted_keys_agree_with_torch_and_costs_must_fit_their_bits(seed):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randperm(1 << 20, generator=gen)[: 6 * 50].view(6, 50) * 7919 + (1 << 40)
    assert torch.equal(psa_budget.sorted_keys(keys), keys.sort(dim=-1).values)  # numpy's sort on the CPU
    w = torch.rand(2, 1000, generator=gen)
    every, rho = torch.ones(4, dtype=torch.bool), torch.tensor(0.5)
    # 1000 key blocks: 11 bits of move index leave 21 for costs, in eighths of a key.
    too_large = "cost in 21 bits with 1000 key blocks: blocks of at most 262143 keys; got k_block_max=262144"
    with pytest.raises(ValueError, match=too_large):
        allocate_budget(w, w, rho, torch.full((1000,), 2**18), 1e6, every)
    with pytest.raises(ValueError, match=too_large):  # said, not read: the same off the CPU
        allocate_budget(w, w, rho, torch.full((1000,), 7), 1e6, every, k_block_max=2**18)
    with pytest.raises(ValueError, match="needs key blocks of 1 to k_block_max=6 keys; got sizes from 7 to 7"):
        allocate_budget(w, w, rho, torch.full((1000,), 7), 1e6, every, k_block_max=6)
    with pytest.raises(ValueError, match="needs key blocks of 1 to k_block_max=None keys; got sizes from 0 to 999"):
        allocate_budget(w, w, rho, torch.arange(1000), 1e6, every)
    # Under torch.compile the sizes are read (a graph break), never skipped.
    compiled = torch.compile(lambda sizes: allocate_budget(w, w, rho, sizes, 1e6, every), backend="eager")
    with pytest.raises(ValueError, match=too_large):
        compiled(torch.full((1000,), 2**18))
    sizes = torch.full((1000,), 2**18 - 1)
    assert torch.equal(allocate_budget(w, w, rho, sizes, 1e6, every), _argsort_allocation(w, w, rho, sizes, 1e6, every))


def test_allocation_edge_inputs_are_refused_or_defined(seed):
    gen = torch.Generator().manual_seed(seed)
    w, spread, rho, allowed = _random_rows(gen, 6, 9, (1, 2, 4, 8), ties=False)
    sizes = torch.full((9,), 8)
    with pytest.raises(TypeError, match="k_sizes must be an integer tensor of keys per block; got torch.float32"):
        allocate_budget(w, spread, rho, sizes.float(), 10.0, allowed)
    with pytest.raises(ValueError, match="budget must be a number of keys .inf for every move.; got nan"):
        allocate_budget(w, spread, rho, sizes, math.nan, allowed)
    # An infinite budget takes every move: each block at its finest allowed level.
    _, fine = psa_budget._coarse_and_fine(allowed)
    assert torch.equal(allocate_budget(w, spread, rho, sizes, math.inf, allowed), fine.expand(w.shape))
    assert allocate_budget(w[:, :0], spread[:, :0], rho, sizes[:0], 10.0, allowed[:0]).shape == (6, 0)
    # A NaN importance: the block's moves do not exist, as for a block with no allowed level.
    nan, none = w.clone(), allowed.clone()
    nan[:, 2] = math.nan
    none[2] = False
    assert torch.equal(allocate_budget(nan, spread, rho, sizes, 30.0, allowed),
                       allocate_budget(w, spread, rho, sizes, 30.0, none))


def test_distortion_values():
    s = torch.tensor([0.0, 1.0, 40.0])
    e8 = pooling_distortion(s, torch.tensor(0.0), 1 / 8)  # mass only
    assert e8.tolist() == pytest.approx([0.0, 1 - math.exp(-7 / 32), 1 - math.exp(-40 * 7 / 32)], rel=1e-6)
    both = pooling_distortion(torch.tensor(1.0), torch.tensor(0.5), 1 / 4)
    assert float(both) == pytest.approx(1 - math.exp(-3 / 16) * (1 - 0.375), rel=1e-6)
    assert float(pooling_distortion(torch.tensor(0.5), torch.tensor(3.0), 1 / 2)) == 1.0
    assert float(pooling_distortion(torch.tensor(9.0), torch.tensor(0.7), 1.0)) == 0.0
    assert float(pooling_distortion(torch.tensor(math.inf), torch.tensor(math.inf), 1.0)) == 0.0  # not NaN
    assert float(pooling_distortion(torch.tensor(math.inf), torch.tensor(0.0), 0.5)) == 1.0
    w = torch.rand(2, 3, 5)
    spread, variance = torch.rand(2, 3, 5), torch.rand(2, 3, 5) + 0.5
    rho = head_variation_ratio(w, spread, variance)
    assert rho.shape == (2, 1, 1)
    assert float(rho[1]) == pytest.approx(float((w[1] * spread[1]).sum() / (w[1] * 2 * variance[1]).sum()))
    assert float(head_variation_ratio(w, spread, torch.zeros_like(variance))[0]) == 0.0


# --- forbidden pooling: exactly binary ---------------------------------------------------------
def test_binary_exactly_when_every_pooling_is_forbidden(seed):
    gen = torch.Generator().manual_seed(seed)
    nk, sizes = 30, torch.full((30,), 64)
    w = torch.rand(8, nk, generator=gen)
    w[:, ::4] = w[:, :1]  # ties, broken by block order
    every, full = torch.ones(4, dtype=torch.bool), torch.tensor([False, False, False, True])
    zero = torch.zeros_like(w)
    for d in (0.05, 0.1, 0.2, 0.5):
        budget = d * float(sizes.sum())
        binary = allocate_budget(w, zero, torch.tensor(0.0), sizes, budget, full)
        # Binary at a budget ranks blocks by importance, ceil(d n) of them, like quantile mode.
        assert torch.equal(binary, psa_module.allocate_levels(w, PSAConfig(mode="quantile", fractions={1: d})))
        # White keys (rho = 1): every pooled level on or above the skip-to-full chord.
        for spread in (zero, torch.rand(w.shape, generator=gen) * 3):
            white = allocate_budget(w, spread, torch.tensor(1.0), sizes, budget, every)
            assert torch.equal(white, binary)
        # Spreads at the mass model's limit 4 p ln(p) / (p - 1) for x8 (the largest): the same.
        limit = torch.full_like(w, 32 * math.log(8) / 7 * (1 + 1e-5))
        assert torch.equal(allocate_budget(w, limit, torch.tensor(0.0), sizes,
                                           budget, every), binary)
        # Just below it, x8 is a hull point: the most important block moves there first.
        top = w.clone()
        top[:, 7] = 2.0
        below = limit.clone()
        below[:, 7] = 32 * math.log(8) / 7 * (1 - 1e-3)
        steps = allocate_budget(top, below, torch.tensor(0.0), sizes, 4.0, every)
        assert bool((steps[:, 7] == 8).all()) and bool((steps.count_nonzero(-1) == 1).all())
        # A block that pools exactly (S = 0) stays at x8: going on to full buys nothing.
        exact = limit.clone()
        exact[:, 7] = 0.0
        pooled = allocate_budget(top, exact, torch.tensor(0.0), sizes, budget, every)
        assert bool((pooled[:, 7] == 8).all()) and set(pooled.unique().tolist()) <= {0, 1, 8}


@pytest.mark.parametrize("block", [16, 32, 64], ids=lambda b: f"b{b}")
def test_plan_is_binary_when_the_keys_forbid_pooling(block, seed):
    gen = torch.Generator().manual_seed(seed)
    grid = (4, 8, 12)
    n = math.prod(grid)
    base = PSAConfig(block_q=block, block_k=block, reorder="none", importance_dtype="float64")
    q = torch.randn(1, n, 2, 8, generator=gen, dtype=torch.float64)
    white = torch.randn(1, n, 2, 8, generator=gen, dtype=torch.float64)  # neighbours unrelated
    flip = torch.where(torch.arange(n) % 8 < 4, 1.0, -1.0).double()[None, :, None, None]
    alike = white[:, ::8].repeat_interleave(8, 1)[:, :n] + 0.01 * white  # alike in each group of 8
    # Keys unrelated to their neighbours with logits a few nats apart, keys flipping within
    # every group of 8: no pooling; keys alike within groups: pooling.
    cases = {"white": (3 * white, True), "flipping": (4 * alike * flip, True), "alike": (alike, False)}
    for name, (k, binary_expected) in cases.items():
        for d in (0.1, 0.3):
            budget = plan_psa(q, k, grid, base.replace(mode="budget", density=d))
            binary = plan_psa(q, k, grid, base.replace(mode="budget", density=d, budget_levels=(1,)))
            quantile = plan_psa(q, k, grid, base.replace(mode="quantile", fractions={1: d}))
            assert torch.equal(binary.kv_index, quantile.kv_index) and torch.equal(binary.kv_level, quantile.kv_level)
            same = torch.equal(budget.kv_index, binary.kv_index) and torch.equal(budget.kv_level, binary.kv_level)
            assert same == binary_expected, (name, d)
            if not binary_expected:  # alike keys: the budget buys x8 of many blocks
                assert psa_module.level_histogram(budget)[8] > 0


# --- the spread estimate -----------------------------------------------------------------------
def _loop_spread(q, k, order, q_offsets, k_offsets, sq, sk, scale):
    """spread and variance by their definition, one logit at a time, through the reorder."""
    B, _, H, _ = q.shape
    q_pos = psa_importance.sample_positions(q_offsets, sq)
    k_pos = psa_importance.sample_positions(k_offsets, sk)
    token = (lambda p: p) if order.perm is None else (lambda p: int(order.perm[p]))
    spread = torch.zeros(B * H, q_pos.shape[0], k_pos.shape[0], dtype=torch.float64)
    variance = torch.zeros_like(spread)
    for b in range(B):
        for h in range(H):
            for i in range(q_pos.shape[0]):
                queries = [token(p) for p in q_pos[i, ::SPREAD_QUERY_STRIDE].tolist()]
                for j in range(k_pos.shape[0]):
                    positions = k_pos[j].tolist()
                    keys = [token(p) for p in positions]
                    logits = [[float(q[b, t, h].double() @ k[b, u, h].double()) * scale for u in keys] for t in queries]
                    terms = [(row[2 * m] - row[2 * m + 1]) ** 2 for row in logits for m in range(sk // 2)
                             if positions[2 * m] != positions[2 * m + 1]]  # a short block repeats positions
                    spread[b * H + h, i, j] = sum(terms) / len(terms) if terms else 0.0
                    row = logits[0]  # the first sampled query
                    variance[b * H + h, i, j] = sum((x - sum(row) / len(row)) ** 2 for x in row) / len(row)
    return spread, variance


SPREAD_CASES = {  # grid, block_q, block_k, sq, sk, reorder
    "seq-b12": ((3, 3, 5), 12, 12, 3, 3, "none"),
    "seq-q16-k8": ((2, 5, 7), 16, 8, 4, 2, "none"),
    "tile-q32-k24": ((3, 5, 7), 32, 24, 8, 6, "tile"),
    "hilbert-b64": ((2, 9, 11), 64, 64, 16, 16, "hilbert"),
    "seq-b128-sq32": ((3, 5, 23), 128, 128, 32, 32, "none"),  # 8 spread queries per block
    "hilbert-short-blocks": ((1, 6, 10), 8, 8, 12, 12, "hilbert"),  # more samples than keys: repeats
    "seq-sk1": ((2, 3, 5), 8, 8, 2, 1, "none"),  # no pairs: spread 0
}


@pytest.mark.parametrize("case", SPREAD_CASES.values(), ids=SPREAD_CASES.keys())
def test_spread_and_variance_match_a_loop_over_sampled_logits(case, seed, monkeypatch):
    grid, block_q, block_k, sq, sk, reorder = case
    n = math.prod(grid)
    q, k, _ = random_qkv(2, n, 2, 8, dtype=torch.float64, seed=seed)
    config = PSAConfig(block_q=block_q, block_k=block_k, reorder=reorder, tile=(1, 2, 4))
    order = psa_module._order(grid, n, config, q.device)
    q_offsets, k_offsets = uniform_offsets(n, block_q), uniform_offsets(n, block_k)
    scale = 8**-0.5
    want_spread, want_variance = _loop_spread(q, k, order, q_offsets, k_offsets, sq, sk, scale)
    want_importance = psa_importance.sampled_importance(q, k, order, q_offsets, k_offsets, sq, sk, scale, torch.float64)
    for chunk in (None, 1, 3 * 8 * k_offsets.numel()):  # whole rows, one query block, a few
        if chunk is not None:
            monkeypatch.setattr(psa_importance, "CHUNK_ELEMENTS", chunk)
        importance, spread, variance = sampled_estimates(q, k, order, q_offsets, k_offsets, sq, sk, scale,
                                                         torch.float64)
        assert importance.dtype == spread.dtype == variance.dtype == torch.float64
        # The importance is the importance estimate's (the samples' order inside the logits
        # differs, the maxima do not).
        torch.testing.assert_close(importance, want_importance, rtol=1e-12, atol=1e-15, msg=f"chunk {chunk}")
        torch.testing.assert_close(spread, want_spread, rtol=1e-9, atol=1e-12, msg=f"spread, chunk {chunk}")
        torch.testing.assert_close(variance, want_variance, rtol=1e-9, atol=1e-12, msg=f"variance, chunk {chunk}")


def _low_precision_spread_case(seed):
    """float32 q, k on a 2x9x11 grid in blocks of 32 (8 samples), their order and offsets, the
    float64 loop's spread and variance, and the largest ``scale * |q| * |k|`` (what bounds a
    logit's rounding)."""
    n = 2 * 9 * 11
    q, k, _ = random_qkv(2, n, 2, 8, seed=seed)
    order = psa_module.sequence_order(n, 32)
    offsets = uniform_offsets(n, 32)
    norm = float(q.norm(dim=-1).max() * k.norm(dim=-1).max()) * 8**-0.5
    return q, k, order, offsets, _loop_spread(q, k, order, offsets, offsets, 8, 8, 8**-0.5), norm


def _assert_spread_close(got, want, dtype, norm, device="cpu"):
    """float32 logits: close to the float64 loop. bfloat16 operands and logits (8 mantissa bits)
    put a logit off by at most ~``3 * 2**-8 * scale |q| |k|``, so the root mean square of the
    differences (sqrt of the spread) and the standard deviation (sqrt of the variance) move by at
    most about twice that."""
    for name, g, w in zip(("spread", "variance"), got, want):
        assert g.dtype == torch.float32 and g.device.type == device, name
        g = g.double().cpu()
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)
        else:
            error = float((g.sqrt() - w.sqrt()).abs().max())
            assert error <= 6 * 2**-8 * norm, (name, error, norm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_spread_in_the_logits_dtype_is_close_to_the_definition(dtype, seed):
    q, k, order, offsets, want, norm = _low_precision_spread_case(seed)
    got = sampled_estimates(q, k, order, offsets, offsets, 8, 8, 8**-0.5, dtype)
    _assert_spread_close(got[1:], want, dtype, norm)
    if dtype == torch.bfloat16:  # the dtype is used, not only accepted
        exact = sampled_estimates(q, k, order, offsets, offsets, 8, 8, 8**-0.5, torch.float32)
        assert not torch.equal(got[1], exact[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_spread_in_bfloat16_on_gpu_is_close_to_the_definition(seed):
    q, k, order, offsets, want, norm = _low_precision_spread_case(seed)
    got = sampled_estimates(q.cuda(), k.cuda(), order.to("cuda"), offsets.cuda(), offsets.cuda(), 8, 8, 8**-0.5,
                            torch.bfloat16)
    _assert_spread_close(got[1:], want, torch.bfloat16, norm, device="cuda")


# --- the estimate on the Triton kernel (interpreter) ---------------------------------------------
KERNEL_CASES = {  # grid, block_q, block_k, sq, sk, reorder, head dim
    "seq-q32-k24-d16": ((2, 9, 11), 32, 24, 8, 6, "none", 16),
    "hilbert-b16-odd-sk": ((2, 9, 11), 16, 16, 4, 5, "hilbert", 16),
    "tile-b64-d32": ((3, 5, 7), 64, 64, 16, 16, "tile", 32),
    "hilbert-short-blocks": ((1, 6, 10), 8, 8, 12, 12, "hilbert", 16),  # repeated samples
}


@pytest.mark.parametrize("case", KERNEL_CASES.values(), ids=KERNEL_CASES.keys())
def test_estimate_kernel_matches_the_torch_path(case, seed, monkeypatch):
    pytest.importorskip("triton", reason="the kernel needs the triton package")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grid, block_q, block_k, sq, sk, reorder, head_dim = case
    n = math.prod(grid)
    q, k = (x.to(device) for x in random_qkv(2, n, 2, head_dim, seed=seed)[:2])
    config = PSAConfig(block_q=block_q, block_k=block_k, reorder=reorder, tile=(1, 2, 4))
    order = psa_module._order(grid, n, config, q.device)
    offsets = (uniform_offsets(n, block_q).to(device), uniform_offsets(n, block_k).to(device))
    args = (q, k, order, *offsets, sq, sk, head_dim**-0.5)
    want = sampled_estimates(*args, torch.float32, kernel=False)
    for chunk in (None, 1):  # every row in one launch, one row per launch
        if chunk is not None:
            monkeypatch.setattr(psa_importance, "CHUNK_ELEMENTS", chunk)
            monkeypatch.setattr(psa_importance, "CHUNK_ELEMENTS_GPU", chunk)
        got = sampled_estimates(*args, torch.float32, kernel=True)
        for name, g, w in zip(("importance", "spread", "variance"), got, want):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=f"{name}, chunk {chunk}")
        importance = psa_importance.sampled_importance(*args, torch.float32, kernel=True)
        torch.testing.assert_close(importance, got[0], rtol=1e-6, atol=1e-7)
    # And against the definition: the float64 loop over the sampled logits.
    loop = _loop_spread(q.cpu(), k.cpu(), order.to("cpu"), offsets[0].cpu(), offsets[1].cpu(), sq, sk, head_dim**-0.5)
    for name, g, w in zip(("spread", "variance"), got[1:], loop):
        torch.testing.assert_close(g.double().cpu(), w, rtol=1e-4, atol=1e-6, msg=f"{name} vs the float64 loop")
    # bfloat16 operands, float32 logits: within the operands' rounding of the float32 path.
    norm = float(q.norm(dim=-1).max() * k.norm(dim=-1).max()) * head_dim**-0.5
    low = sampled_estimates(*args, torch.bfloat16, kernel=True)
    for name, g, w in zip(("spread", "variance"), low[1:], want[1:]):
        assert float((g.sqrt() - w.sqrt()).abs().max()) <= 6 * 2**-8 * norm, name


def test_estimate_kernel_refuses_what_it_cannot_take():
    pytest.importorskip("triton", reason="the kernel needs the triton package")
    q, k, _ = random_qkv(1, 64, 1, 8)
    order = psa_module.sequence_order(64, 16)
    offsets = uniform_offsets(64, 16)
    with pytest.raises(ValueError, match="head dim 8 is not a power of two of at least 16"):
        sampled_estimates(q, k, order, offsets, offsets, 4, 4, 0.3, torch.float32, kernel=True)
    q, k, _ = random_qkv(1, 64, 1, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"torch.float64 operands \(float16, bfloat16 or float32 are\)"):
        psa_importance.sampled_importance(q, k, order, offsets, offsets, 4, 4, 0.3, torch.float64, kernel=True)
    with pytest.raises(ValueError, match=r"40 samples per block \(at most 32 are\)"):
        psa_importance.sampled_importance(q.float(), k.float(), order, offsets, offsets, 40, 4, 0.3, torch.float32,
                                          kernel=True)
    # On the CPU the default is the torch path (the kernel only runs there under the interpreter).
    assert not psa_importance.estimate_on_kernel(q, torch.float32, 4, 4, None)


def test_estimate_kernel_needs_the_interpreter_for_cpu_tensors(monkeypatch):
    pytest.importorskip("triton", reason="the kernel needs the triton package")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, _ = random_qkv(1, 64, 1, 16)
    order = psa_module.sequence_order(64, 16)
    offsets = uniform_offsets(64, 16)
    with pytest.raises(ValueError, match=r"cpu tensors \(CUDA ones are, or CPU ones under TRITON_INTERPRET=1\)"):
        sampled_estimates(q, k, order, offsets, offsets, 4, 4, 0.3, torch.float32, kernel=True)


# --- the fused CPU reduction (torch.compile) -----------------------------------------------------
FUSED_CASES = {  # grid, block_q, block_k, sq, sk, reorder, matmul dtype
    "hilbert-b64-bf16": ((2, 9, 11), 64, 64, 16, 16, "hilbert", torch.bfloat16),
    "tile-q32-k24-odd-sk-f32": ((3, 5, 7), 32, 24, 8, 5, "tile", torch.float32),
    "hilbert-short-blocks-f64": ((1, 6, 10), 8, 8, 12, 12, "hilbert", torch.float64),  # repeated samples
}


@pytest.mark.slow
@pytest.mark.parametrize("case", FUSED_CASES.values(), ids=FUSED_CASES.keys())
def test_fused_cpu_estimates_match_the_eager_ones(case, seed, monkeypatch):
    grid, block_q, block_k, sq, sk, reorder, dtype = case
    n = math.prod(grid)
    q, k, _ = random_qkv(2, n, 2, 16, dtype=torch.float64 if dtype == torch.float64 else torch.float32, seed=seed)
    config = PSAConfig(block_q=block_q, block_k=block_k, reorder=reorder, tile=(1, 2, 4))
    order = psa_module._order(grid, n, config, q.device)
    args = (q, k, order, uniform_offsets(n, block_q), uniform_offsets(n, block_k), sq, sk, 16**-0.5, dtype)
    want = sampled_estimates(*args, fused=False)
    want_importance = psa_importance.sampled_importance(*args, fused=False)
    tolerance = dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    for chunk in (None, 1):  # whole rows, then one query block per chunk (other shapes: a recompile)
        if chunk is not None:
            monkeypatch.setattr(psa_importance, "CHUNK_ELEMENTS_FUSED", chunk)
        got = sampled_estimates(*args, fused=True)
        for name, g, w in zip(("importance", "spread", "variance"), got, want):
            assert g.dtype == w.dtype
            # bfloat16 logits: the pair differences are rounded to bfloat16 on both paths
            # (unrounded, the spreads would differ by up to 2**-8 relative).
            torch.testing.assert_close(g, w, **tolerance, msg=f"{name}, chunk {chunk}")
        importance = psa_importance.sampled_importance(*args, fused=True)
        torch.testing.assert_close(importance, want_importance, **tolerance, msg=f"importance alone, chunk {chunk}")


def test_fused_estimate_runs_on_large_cpu_calls_only():
    q = torch.zeros(1, 64, 1, 16)
    limit = psa_importance.FUSED_CPU_MIN_LOGITS
    assert psa_importance.fused_on_cpu(q, limit, None)
    assert not psa_importance.fused_on_cpu(q, limit - 1, None)
    assert not psa_importance.fused_on_cpu(q, limit, False)
    assert psa_importance.fused_on_cpu(q, 1, True)
    with pytest.raises(ValueError, match="the fused path runs on the CPU; got device meta"):
        psa_importance.fused_on_cpu(q.to("meta"), 1, True)
    offsets = uniform_offsets(64, 16)
    with pytest.raises(ValueError, match="needs at least 2 key samples per block; got 1"):
        sampled_estimates(q, q, psa_module.sequence_order(64, 16), offsets, offsets, 4, 1, 0.3, torch.float32,
                          fused=True)


@pytest.mark.parametrize("mode", ["budget", "quantile"])
def test_plans_above_the_size_take_the_fused_reduction(mode, monkeypatch, seed):
    """plan_psa reaches the fused path by size alone, and the functions it compiles give the
    eager loops' plans (run eagerly here: the compiled ones are checked above)."""
    calls = []

    def count_calls(fn):
        def eager(*args):
            calls.append(fn.__name__)
            return fn(*args)
        return eager

    grid = (2, 9, 11)
    q, k, _ = random_qkv(2, math.prod(grid), 2, 16, seed=seed)
    config = PSAConfig(block_q=32, block_k=32, **(dict(mode="budget", density=0.3) if mode == "budget" else
                                                  dict(mode="quantile", fractions={1: 0.2, 4: 0.3})))
    eager = plan_psa(q, k, grid, config)
    monkeypatch.setattr(psa_importance, "FUSED_CPU_MIN_LOGITS", 1)
    monkeypatch.setattr(psa_importance, "compiled", count_calls)
    fused = plan_psa(q, k, grid, config)
    assert set(calls) == {"chunk_statistics" if mode == "budget" else "importance_reduction"}
    assert torch.equal(fused.kv_index, eager.kv_index) and torch.equal(fused.kv_level, eager.kv_level)
    if mode == "budget":  # the allocation has its own size: moves, two per block pair
        calls.clear()
        monkeypatch.setattr(psa_importance, "FUSED_CPU_MIN_LOGITS", 2**62)
        monkeypatch.setattr(psa_budget, "FUSED_CPU_MIN_MOVES", 2 * 2 * 2 * 7 * 7)  # moves, B, heads, blocks^2
        fused = plan_psa(q, k, grid, config)
        assert calls == ["move_keys", "levels_of_prefix"]
        assert torch.equal(fused.kv_index, eager.kv_index) and torch.equal(fused.kv_level, eager.kv_level)
        monkeypatch.setattr(psa_budget, "FUSED_CPU_MIN_MOVES", 2 * 2 * 2 * 7 * 7 + 1)
        calls.clear()
        plan_psa(q, k, grid, config)
        assert not calls


def test_fused_estimate_that_cannot_compile_runs_eagerly_once_warned(monkeypatch, seed):
    def no_toolchain(fn):
        def fail(*args):
            raise RuntimeError("C++ compile error: no compiler")
        return fail

    grid = (2, 9, 11)
    n = math.prod(grid)
    q, k, _ = random_qkv(2, n, 2, 16, seed=seed)
    offsets = uniform_offsets(n, 32)
    args = (q, k, psa_module.sequence_order(n, 32), offsets, offsets, 8, 8, 0.25, torch.float32)
    want = sampled_estimates(*args, fused=False)
    monkeypatch.setattr(psa_importance, "FUSED_CPU_MIN_LOGITS", 1)
    monkeypatch.setattr(psa_importance, "_FUSED_FAILED", [])
    monkeypatch.setattr(psa_importance, "compiled", no_toolchain)
    with pytest.raises(RuntimeError, match="no compiler"):  # asked for by name: the error itself
        sampled_estimates(*args, fused=True)
    with pytest.warns(RuntimeWarning, match="chunk_statistics did not compile .RuntimeError: C.. compile error: no "
                                            "compiler.; running eagerly"):
        got = sampled_estimates(*args)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert not psa_importance.fused_on_cpu(q, 10**9, None)  # and from then on eagerly without a word
    assert torch.equal(psa_importance.sampled_importance(*args), psa_importance.sampled_importance(*args, fused=False))


def test_fused_allocation_that_cannot_compile_runs_eagerly_once_warned(monkeypatch, seed):
    def no_toolchain(fn):
        def fail(*args):
            raise RuntimeError("C++ compile error: no compiler")
        return fail

    gen = torch.Generator().manual_seed(seed)
    w, spread, rho, allowed = _random_rows(gen, 8, 20, (1, 2, 4, 8), ties=False)
    sizes = torch.full((20,), 16)
    want = allocate_budget(w, spread, rho, sizes, 100.0, allowed, fused=False)
    monkeypatch.setattr(psa_budget, "FUSED_CPU_MIN_MOVES", 1)
    monkeypatch.setattr(psa_importance, "_FUSED_FAILED", [])
    monkeypatch.setattr(psa_importance, "compiled", no_toolchain)
    with pytest.raises(RuntimeError, match="no compiler"):
        allocate_budget(w, spread, rho, sizes, 100.0, allowed, fused=True)
    with pytest.warns(RuntimeWarning, match="move_keys did not compile .RuntimeError: C.. compile error: no "
                                            "compiler.; running eagerly"):
        assert torch.equal(allocate_budget(w, spread, rho, sizes, 100.0, allowed), want)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(allocate_budget(w, spread, rho, sizes, 100.0, allowed), want)
    assert not caught  # eagerly from then on, without a second warning
    with pytest.raises(ValueError, match="the fused path runs on the CPU; got device meta"):
        allocate_budget(w.to("meta"), spread.to("meta"), rho.to("meta"), sizes.to("meta"), 100.0, allowed.to("meta"),
                        fused=True, k_block_max=16)


def test_sample_orders_are_permutations():
    samples = torch.arange(3 * 11).view(3, 11)
    assert psa_importance.by_residue(samples, 4)[0].tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7]
    assert psa_importance.pairs_split(samples)[1].tolist() == [11 + i for i in (0, 2, 4, 6, 8, 1, 3, 5, 7, 9, 10)]
    assert torch.equal(psa_importance.by_residue(samples, 1), samples)


# --- plans: budget met, valid, on ragged grids and every block size -----------------------------
@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"q{b[0]}-k{b[1]}")
@pytest.mark.parametrize("grid", RAGGED_GRIDS.values(), ids=RAGGED_GRIDS.keys())
def test_budget_met_per_head_and_plan_valid(grid, blocks, seed):
    from vdiff_sparse.video_attention_data import video_attention_qkv

    n = math.prod(grid)
    block_q, block_k = blocks
    q, k, v = video_attention_qkv(grid, 3, 16, batch=2, seed=seed % 1000)
    for d in (0.1, 0.25, 0.5):
        # Budget mode needs 2 key samples per block (a quarter of block_k by default).
        config = PSAConfig(mode="budget", density=d, block_q=block_q, block_k=block_k,
                           samples_per_block=None if block_k >= 8 else 2)
        plan = plan_psa(q, k, grid, config)
        nqb, nkb = -(-n // block_q), -(-n // block_k)
        assert plan.kv_index.shape[:3] == (2, 3, nqb) and plan.max_kv <= nkb
        valid = plan.kv_index >= 0
        assert bool((plan.kv_index < nkb).all())
        assert set(plan.kv_level[valid].tolist()) <= {1, 2, 4, 8}
        ids = torch.where(valid, plan.kv_index, nkb + torch.arange(plan.max_kv))
        assert bool((ids.diff(dim=-1) > 0).all()), "entries ascending, each key block once"
        k_sizes = plan.k_offsets.diff().double()
        q_sizes = plan.q_offsets.diff().double()
        cost = torch.where(valid, k_sizes[plan.kv_index.clamp(min=0)], 0.0) / plan.kv_level.double()
        density = (cost.sum(-1) * q_sizes).sum(-1) / n**2  # [B, H]
        assert bool((density >= d * (1 - 1e-9)).all()), (d, density)
        assert bool((density <= d + block_k / n + 1e-9).all()), (d, density)
        assert plan.density() == pytest.approx(float(density.mean()))


@pytest.mark.parametrize("levels", [(1, 2), (2, 4), (8,)], ids=lambda l: "L" + "".join(map(str, l)))
def test_budget_levels_and_similarity_cap_are_respected(levels, seed):
    grid = (3, 5, 7)
    q, k, _ = random_qkv(1, 105, 2, 8, seed=seed)
    config = PSAConfig(mode="budget", density=0.2, block_q=16, block_k=16, budget_levels=levels)
    plan = plan_psa(q, k, grid, config)
    used = set(plan.kv_level[plan.kv_index >= 0].tolist())
    assert used <= set(levels) and used
    # The cap takes away levels per key block; the budget still holds.
    cap = {2: 1.0, 4: 1.0, 8: 1.0}  # denied at cosine <= 1: every pooled level
    capped = plan_psa(q, k, grid, config.replace(similarity_cap=cap))
    used = set(capped.kv_level[capped.kv_index >= 0].tolist())
    assert used <= ({1} & set(levels))
    if 1 in levels:
        assert capped.density() >= 0.2 * (1 - 1e-9)


def test_budget_plan_is_deterministic(seed):
    grid = (2, 9, 11)
    q, k, _ = random_qkv(2, 198, 2, 16, seed=seed)
    config = PSAConfig(mode="budget", density=0.2, block_q=32, block_k=32)
    a, b = plan_psa(q, k, grid, config), plan_psa(q.clone(), k.clone(), grid, config)
    assert torch.equal(a.kv_index, b.kv_index) and torch.equal(a.kv_level, b.kv_level)


# --- backends on budget plans -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_torch_backend_matches_reference_on_budget_plans(dtype, seed):
    grid = (2, 9, 11)
    n = math.prod(grid)
    inputs = random_qkv(2, n, 2, 16, dtype=dtype, seed=seed)
    # Keys alike within pool groups, so the plan pools: repeat every key 8 times, plus noise.
    g = torch.Generator().manual_seed(seed + 3)
    inputs[1] = (inputs[1][:, ::8].repeat_interleave(8, 1)[:, :n] + 0.05 * torch.randn(inputs[1].shape, generator=g)).to(dtype)
    extra_k, extra_v = (torch.randn(2, 5, 2, 16, generator=g).to(dtype) for _ in range(2))
    config = PSAConfig(mode="budget", density=0.3, block_q=32, block_k=24, reorder="none")
    grad_out = torch.randn(2, n, 2, 16, generator=g).to(dtype)
    results = {}
    for backend in ("reference", "torch"):
        q, k, v = (x.clone().requires_grad_(True) for x in inputs)
        out, plan = psa_attention(q, k, v, grid, config, extra_k=extra_k, extra_v=extra_v, backend=backend,
                                  return_plan=True)
        out.backward(grad_out)
        results[backend] = (out.detach(), q.grad, k.grad, v.grad, plan)
    ref, fast = results["reference"], results["torch"]
    levels = set(ref[4].kv_level[ref[4].kv_index >= 0].tolist())
    assert 8 in levels and 1 in levels, f"the plan should pool and keep blocks in full, got {levels}"
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast[:4], ref[:4]):
        scale = max(1.0, b.abs().max().item())
        assert_close(a / scale, b / scale, dtype, f"{name} (budget)")


def test_triton_backend_matches_reference_on_a_budget_plan(monkeypatch, seed):
    pytest.importorskip("triton", reason="the Triton kernels need the triton package")
    from tests.test_kernels import check

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    grid = (3, 5, 7)
    q, k, _ = random_qkv(1, 105, 2, 32, seed=seed)
    k = k[:, ::8].repeat_interleave(8, 1)[:, :105] + 0.05 * k
    plan = plan_psa(q, k, grid, PSAConfig(mode="budget", density=0.3, block_q=32, block_k=32))
    assert bool((plan.kv_level[plan.kv_index >= 0] > 1).any())
    check(plan, B=1, seed=seed + 7)


# --- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(density=0.0), ValueError, r"density must be a float in \(0, 1\], got 0.0"),
        (dict(density=1.5), ValueError, r"density must be a float in \(0, 1\], got 1.5"),
        (dict(density=True), ValueError, r"density must be a float in \(0, 1\], got True"),
        (dict(density="0.2"), ValueError, r"density must be a float"),
        (dict(budget_levels=()), ValueError, r"budget_levels must be a non-empty tuple of pool factors among \[1, 2, 4, 8\], got \(\)"),
        (dict(budget_levels=(3,)), ValueError, r"budget_levels must be .* got \(3,\)"),
        (dict(budget_levels=(True,)), ValueError, r"budget_levels must be"),
        (dict(budget_levels=5), ValueError, r"budget_levels must be"),
        (dict(mode="budget", importance="mean_pooled"), ValueError, r"needs importance='sampled'"),
        (dict(mode="budget", block_k=7), ValueError,
         r"at least 2 sampled keys per key block .* samples_per_block=None with block_k=7"),
        (dict(mode="budget", block_k=64, samples_per_block=1), ValueError, r"samples_per_block=1 with block_k=64"),
        (dict(mode="budget", block_k=8, samples_per_block=16), ValueError,
         r"samples_per_block <= block_k .* got samples_per_block=16 with block_k=8"),
        (dict(mode="budget", thresholds={1: 0.3}), ValueError,
         r"thresholds=\{1: 0.3\} applies to mode='threshold' only, but mode='budget'"),
        (dict(mode="threshold", density=0.3), ValueError, r"density=0.3 applies to mode='budget' only"),
        (dict(mode="quantile", min_full_fraction=0.2), ValueError, r"min_full_fraction=0.2 applies to mode='threshold'"),
        (dict(mode="threshold", fractions={1: 0.3}), ValueError, r"fractions=.* applies to mode='quantile' only"),
    ],
    ids=["density-0", "density-big", "density-bool", "density-str", "levels-empty", "levels-3", "levels-bool",
         "levels-int", "mean-pooled", "one-sample", "one-sample-given", "more-samples-than-keys", "thresholds-in-budget", "density-in-threshold",
         "min-full-in-quantile", "fractions-in-threshold"],
)
def test_budget_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        PSAConfig(**kwargs)


def test_budget_config_omegaconf_and_replace():
    structured = OmegaConf.structured(PSAConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(structured, {"mode": "budget", "density": 0.2, "budget_levels": [8, 1]}))
    assert isinstance(cfg, PSAConfig) and cfg.mode == "budget" and cfg.density == 0.2 and cfg.budget_levels == (1, 8)
    assert PSAConfig().replace(mode="budget", density=0.3).density == 0.3


# --- everywhere PSA is -------------------------------------------------------------------------
def test_processor_runs_budget_mode_at_its_density(seed):
    from vdiff_sparse import integration
    from vdiff_sparse.processors import PSAProcessor
    from vdiff_sparse.tiny_models import tiny_inputs, tiny_wan_transformer

    grid = (3, 8, 8)
    n = math.prod(grid)
    model = tiny_wan_transformer(seed=seed % 1000)
    inputs = tiny_inputs("wan", grid, seed=seed)
    proc = PSAProcessor(mode="budget", density=0.25, block_q=16, block_k=16, dense_steps=0, stats=True)
    integration.enable(model, proc)
    with torch.no_grad():
        model(**inputs)
    integration.disable(model)
    assert proc.config.mode == "budget" and proc.stats.records
    for record in proc.stats.records:
        assert 0.25 * (1 - 1e-9) <= record.density <= 0.25 + 16 / n + 1e-9


def test_settings_of_another_mode_than_the_presets_are_refused_or_reset():
    """Over a preset in budget mode, thresholds alone are an error (they would be ignored); a
    mode given with them starts that mode from its own defaults."""
    from vdiff_sparse.processors import PSAProcessor

    with pytest.raises(ValueError, match=r"thresholds=.* applies to mode='threshold' only, but mode='budget'"):
        PSAProcessor(preset="wan2.1-1.3b", thresholds={1: 0.3, 2: 0.4})
    switched = PSAProcessor(preset="wan2.1-1.3b", mode="threshold", thresholds={1: 0.3, 2: 0.4})
    assert switched.config.mode == "threshold" and switched.config.thresholds == {1: 0.3, 2: 0.4}
    assert switched.config.density == PSAConfig().density  # the preset's budget density cleared
    kept = PSAProcessor(preset="wan2.1-14b", mode="budget")
    assert kept.config.density == 0.12  # the same mode keeps the preset's own density
    replaced = kept.config.replace(mode="quantile", fractions={1: 0.2})
    assert replaced.mode == "quantile" and replaced.density == PSAConfig().density


def test_every_model_preset_names_a_budget_density():
    from vdiff_sparse.processors import PSAProcessor, available_presets

    for name in available_presets()["models"]:
        config = PSAProcessor(preset=name).config
        assert config.mode == "budget" and 0 < config.density < 1, name
    # The method preset keeps the released threshold mode.
    assert PSAProcessor().config.mode == "threshold"


def test_cli_overrides_reach_budget_mode(tmp_path):
    import json

    from vdiff_sparse.cli import main

    out = tmp_path / "run"
    assert main(["generate", "--attn", "psa", "--compare-dense", "--out", str(out), "--frames", "5", "--height", "32",
                 "--width", "48", "--steps", "1", "--no-warmup", "dense_steps=0", "block_q=16", "block_k=16",
                 "mode=budget", "density=0.3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "mode='budget'" in report["processor"] and "density=0.3" in report["processor"]
    assert 0.3 * (1 - 1e-9) <= report["density"] <= 0.3 + 16 / report["num_tokens"] + 1e-9


def test_finetune_options_take_budget_mode(tmp_path):
    from vdiff_sparse.pipelines import finetune as ft

    config = ft.load_config("tiny_wan_vmoba", [f"data.latents_dir={tmp_path}", "sparse.method=psa",
                                               "sparse.options.psa.mode=budget", "sparse.options.psa.density=0.2"])
    processor = ft.training_processor(config.sparse)
    assert processor.method == "psa" and processor.config.mode == "budget" and processor.config.density == 0.2
