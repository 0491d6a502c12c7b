"""The work count of the Triton kernels (``TritonBackend().work``) against the tiles the
kernels actually compute, and the efficiency targets on real plans.

* Under the interpreter the kernels count the pairs of every tile they compute
  (``TritonBackend().count_work()``); :func:`test_count_matches_kernels` runs every method
  (dense; GNA with stride 1, tile strides, dilation, causal axes, block-aligned; PSA with x2/x4/x8
  at ``block_k`` 64 and 128; VMoBA per-token routing; text keys; a hand-built window) forward
  and backward and requires the count of each pass to equal ``work()`` at the interpreter's
  tiles, and the output to match the float64 reference.
* ``work()`` at the GPU tiles on real plans of video-like inputs (a 16x32x32 grid, 16K
  tokens) at each method's default settings: efficiency >= 0.85 forward and backward; GNA with stride 1
  within 1.15x of its tiles' union.
* The union of windows, against a brute-force count.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import random_qkv
from vdiff_sparse.backends import ExtraKeys
from vdiff_sparse.backends.reference import reference_attention
from vdiff_sparse.layout import token_coords, uniform_offsets
from vdiff_sparse.plan import AttentionPlan, TokenWindow, dense_plan, pack_block_selection

pytest.importorskip("triton", reason="the Triton kernels need the triton package")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def backend():
    from vdiff_sparse.backends.triton import TritonBackend

    return TritonBackend()


def interpreter_tiles():
    from vdiff_sparse.backends.triton import _kernels

    return _kernels("tiles").INTERPRETER_TILES


# --- plans of every method, small ---------------------------------------------------------------

def _gna(grid, **kw):
    from vdiff_sparse.methods.gna import plan_gna

    return plan_gna(grid, **kw)


def _psa(block_k, seed):
    """Quarters of each row's key blocks at x1, x2, x4, x8 (five or more key blocks, the last
    ragged)."""
    from vdiff_sparse.methods.psa import PSAConfig, plan_psa

    grid = (4, 8, 13) if block_k == 128 else (3, 10, 12)  # 3.25 blocks of 128; 5.6 of 64
    q, k, _ = random_qkv(1, grid[0] * grid[1] * grid[2], 2, 32, seed=seed)
    config = PSAConfig(block_q=128, block_k=block_k, mode="quantile", importance_dtype="float32",
                       fractions={1: 0.25, 2: 0.25, 4: 0.25, 8: 0.25})
    plan = plan_psa(q, k, grid, config)
    assert set(plan.kv_level[plan.kv_index >= 0].unique().tolist()) == {1, 2, 4, 8}
    return plan


def _vmoba(seed):
    from vdiff_sparse.methods.vmoba import VMoBAConfig, plan_vmoba

    q, k, _ = random_qkv(1, 4 * 6 * 8, 2, 32, seed=seed)
    plan = plan_vmoba(q, k, (4, 6, 8), layer_index=2, config=VMoBAConfig(topk=3, query_block=32, block_3d=(2, 3, 4)))
    assert plan.token_keep is not None
    return plan


def _hand_window():
    grid = (3, 5, 7)
    coords = token_coords(grid, None)
    reach = torch.tensor([1, 2, 2])
    window = TokenWindow(coords, coords - reach, coords + reach, (1, 1, 1))
    offsets = uniform_offsets(105, 35)
    kv_index, _ = pack_block_selection(torch.ones(1, 1, 3, 3, dtype=torch.bool))
    return AttentionPlan(None, offsets, offsets, kv_index, window=window, method="test")


CASES = {
    "dense": lambda seed: dense_plan(100, 48),
    "gna_stride1": lambda seed: _gna((3, 8, 10), window=(2, 4, 5)),
    "gna_tile_stride": lambda seed: _gna((4, 6, 6), window=(4, 4, 4), stride=(2, 3, 3)),
    "gna_block_aligned": lambda seed: _gna((4, 6, 8), window=(2, 3, 4), stride=(2, 3, 4), tile=(2, 3, 4)),
    "gna_dilated": lambda seed: _gna((3, 6, 8), window=(2, 3, 3), dilation=(1, 2, 2)),
    "gna_causal": lambda seed: _gna((4, 6, 8), window=(3, 3, 3), stride=(1, 2, 1), causal=(True, False, False)),
    "psa_bk128": lambda seed: _psa(128, seed),
    "psa_bk64": lambda seed: _psa(64, seed),
    "vmoba": _vmoba,
    "hand_window": lambda seed: _hand_window(),
}
TEXT = {"gna_stride1", "psa_bk64", "vmoba", "dense"}


@pytest.mark.parametrize("case", list(CASES))
def test_count_matches_kernels(case, seed):
    """The kernels' own tile count equals ``work()`` in every pass, and the output is right."""
    plan = CASES[case](seed).to(DEVICE)
    # Two batch entries for two plans shared over batch and heads: counts scale with them.
    B, H, D, n_text = (2 if case in ("dense", "gna_block_aligned") else 1), 2, 32, 7
    N = plan.num_tokens
    q, k, v = random_qkv(B, N, H, D, seed=seed + 1, device=DEVICE, requires_grad=True)
    extra = None
    if case in TEXT:
        gen = torch.Generator().manual_seed(seed)
        ek, ev = (t.to(DEVICE).requires_grad_(True) for t in torch.randn(2, B, n_text, H, D, generator=gen))
        extra = ExtraKeys(ek, ev, None)
    be = backend()
    with be.count_work(DEVICE) as counter:
        out = be.forward(q, k, v, plan, extra)
        forward = counter.totals()["forward"]
        out.backward(torch.randn_like(out))
    counted = counter.totals()
    expected = be.work(plan, D, batch=B, heads=H, text_keys=n_text if extra else 0, tiles=interpreter_tiles())
    assert forward == counted["forward"] and forward > 0
    assert counted["forward"] == expected["forward"]["executed"], "forward"
    assert counted["dq"] == expected["backward"]["dq"]["executed"], "dq"
    assert counted["dkdv"] == expected["backward"]["dkdv"]["executed"], "dk/dv"
    assert expected["forward"]["useful"] <= expected["forward"]["executed"]

    leaves = [t.detach().double() for t in (q, k, v)]
    ref_extra = None if extra is None else ExtraKeys(extra.k.detach().double(), extra.v.detach().double())
    ref = reference_attention(*leaves, plan, ref_extra)
    assert (out.detach().double() - ref).abs().max() < 1e-4


def test_useful_pairs_are_the_plans_density():
    """``useful`` is the plan's FLOP-equivalent pairs times batch and heads, plus text pairs."""
    plan = _gna((3, 8, 10), window=(2, 4, 5))
    got = backend().work(plan, 64, batch=3, heads=5, text_keys=11)
    n = plan.num_tokens
    assert got["forward"]["useful"] == pytest.approx(plan.density() * n * n * 15 + n * 11 * 15)
    assert got["backward"]["useful"] == pytest.approx(2 * got["forward"]["useful"])
    assert got["backward"]["executed"] == got["backward"]["dq"]["executed"] + got["backward"]["dkdv"]["executed"]


@pytest.mark.parametrize(
    "config",
    [dict(window=(2, 4, 5)), dict(window=(3, 3, 4), dilation=(1, 2, 2)),
     dict(window=(3, 4, 4), stride=(1, 2, 1), causal=(True, False, False))],
    ids=["stride1", "dilated", "causal"],
)
def test_union_is_exact(config):
    """The union ``work()`` reports equals, per tile, its real queries times the keys any of
    them allows (and per key tile, its keys times the queries that allow any of them)."""
    plan = _gna((4, 8, 10), **config)
    tiles = interpreter_tiles()
    got = backend().work(plan, 32, tiles=tiles)
    from vdiff_sparse.backends.triton import _kernels

    t, _ = _kernels("tables").plan_tables(plan, tiles)
    n = plan.num_tokens
    allowed = plan.window.allows(torch.arange(n), torch.arange(n))  # [query, key]
    forward = sum(count * int(allowed[start:start + count].any(0).sum())
                  for start, count in t.q_tiles[:, :2].tolist() if count)
    keys = sum(count * int(allowed[:, start:start + count].any(1).sum())
               for start, count in t.k_tiles[:, :2].tolist() if count)
    assert got["forward"]["union"] == forward
    assert got["backward"]["dkdv"]["union"] == keys
    assert got["forward"]["executed"] >= got["forward"]["union"] >= got["forward"]["useful"]


def test_box_tiles_cover_every_window_and_skip_the_test_only_when_safe():
    """Each query tile's box holds every key its queries allow; each key tile's query box every
    query that allows one of its keys. A config whose tiles share one window each (stride =
    tile) launches without the pair test; neighborhood attention (stride 1) with it."""
    from vdiff_sparse.backends.triton import _kernels

    tables = _kernels("tables")
    for config, masked in ((dict(window=(4, 6, 6), stride=(2, 3, 3)), False), (dict(window=(2, 4, 5)), True)):
        plan = _gna((4, 9, 10), **config)
        t, _ = tables.plan_tables(plan, interpreter_tiles())
        assert isinstance(t, tables.BoxTables)
        assert t.q_masked == masked
        n = plan.num_tokens
        allowed = plan.window.allows(torch.arange(n), torch.arange(n))
        coords = plan.window.coords

        def in_box(row, positions):
            lo, ext = row[2::2], row[3::2]
            c = coords[positions]
            return ((c >= lo) & (c < lo + ext)).all(-1)

        for row in t.q_tiles.tolist():
            start, count = row[:2]
            if count:
                seen = allowed[start:start + count].any(0).nonzero().squeeze(1)
                assert bool(in_box(torch.tensor(row), seen).all())
        for row in t.k_tiles.tolist():
            start, count = row[:2]
            if count:
                seeing = allowed[:, start:start + count].any(1).nonzero().squeeze(1)
                assert bool(in_box(torch.tensor(row), seeing).all())


# --- the targets on real plans ------------------------------------------------------------------

GRID = (16, 32, 32)


@pytest.fixture(scope="module")
def default_plans():
    """Each method at its default settings on video-like q, k (the processors' GNA preset
    fitted to the grid, PSA with a float32 estimate so the plan is the same on every machine)."""
    import vdiff_sparse as vs
    from vdiff_sparse.methods.gna import GNAConfig, fit_to_grid
    from vdiff_sparse.video_attention_data import video_attention_qkv

    q, k, _ = video_attention_qkv(GRID, heads=4, head_dim=64)

    fitted = fit_to_grid(GNAConfig(window=(18, 24, 24), stride=(16, 8, 8)), GRID)
    window, stride, dilation = fitted.window, fitted.stride, fitted.dilation
    return {
        "dense": vs.dense_plan(q.shape[1], 128),
        "gna": vs.plan_gna(GRID, window, stride, dilation),
        "psa": vs.plan_psa(q, k, GRID, vs.PSAConfig(importance_dtype="float32")),
        "psa_bk64": vs.plan_psa(q, k, GRID, vs.PSAConfig(block_k=64, importance_dtype="float32")),
        "vmoba_1d": vs.plan_vmoba(q, k, GRID, layer_index=0),
        "vmoba_2d": vs.plan_vmoba(q, k, GRID, layer_index=1),
        "vmoba_3d": vs.plan_vmoba(q, k, GRID, layer_index=2),
        "vmoba_training": vs.plan_vmoba(q, k, GRID, vs.VMoBAConfig.training(), layer_index=2),
    }


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [64, 128])
def test_efficiency_targets(default_plans, head_dim):
    failures = []
    for name, plan in default_plans.items():
        got = backend().work(plan, head_dim)
        for part in ("forward", "backward"):
            if got[part]["efficiency"] < 0.85:
                failures.append(f"{name} {part}: {got[part]['efficiency']:.3f}")
    assert not failures, failures


@pytest.mark.slow
def test_neighborhood_attention_within_its_union():
    """GNA with stride 1 (a 12.5% window): executed <= 1.15 x the union of each tile's windows."""
    import vdiff_sparse as vs

    plan = vs.plan_gna(GRID, window=(8, 16, 16))
    for head_dim in (64, 128):
        got = backend().work(plan, head_dim)
        for part in ("forward", "backward"):
            assert got[part]["executed_over_union"] <= 1.15, (head_dim, part, got[part])
