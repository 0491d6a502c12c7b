"""The Triton path as the custom op ``vdiff_sparse::plan_attention``, and tables built without
reading the device.

Under ``TRITON_INTERPRET=1`` on CPU tensors (tiny grids, head dim 32: the interpreter costs ~1 ms
per tile pair):

* ``torch.library.opcheck`` of the op (schema, autograd registration, fake implementation
  against the real one, AOT dispatch with dynamic shapes, forward and backward) for a plan of
  every kernel family and feature: dense blocks with masked text keys, PSA levels, a
  hand-built window (the block kernels' pair test), GNA boxes, VMoBA routing;
* ``torch.compile(fullgraph=True, backend="aot_eager")`` of the backend's forward (tables,
  pooling, op; plan-order tensors) with gradients, equal to eager. Not ``run_plan``: on the CPU
  its input check reads the device (free there), and in Python < 3.12 the inverse permutation's
  ``functools.cached_property`` takes a lock dynamo does not trace;
* tables, pooling and the op's fake implementation on the ``meta`` device, which holds no data,
  so any read of a value on the host fails there: the CPU check of what a GPU needs (nothing
  reads back from the device per call) for each family, from the planners' host facts;
* pool levels the facts allow but no entry uses: no tile computed, outputs and gradients right;
* the facts: carried by copies, read off a CPU plan moving to another device, refused when
  the tensors contradict them; the op survives a reload of the kernel modules, and importing the
  library loads neither triton nor a kernel module.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from tests.conftest import random_qkv
from vdiff_sparse.backends import ExtraKeys
from vdiff_sparse.layout import token_coords, uniform_offsets
from vdiff_sparse.plan import AttentionPlan, PlanFacts, TokenWindow, dense_plan, pack_block_selection, read_facts

pytest.importorskip("triton", reason="the Triton kernels need the triton package")
if torch.cuda.is_available():
    pytest.skip("the interpreter checks run on CPU tensors (tests/test_kernels.py covers the GPU)",
                allow_module_level=True)

GRID = (2, 4, 6)
N = GRID[0] * GRID[1] * GRID[2]
H, D = 2, 32


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def kernels(name="ops"):
    from vdiff_sparse.backends.triton import _kernels

    return _kernels(name)


def _qk(seed=0, n=N):
    q, k, _ = random_qkv(1, n, H, D, seed=seed)
    return q, k


def _psa(device="cpu"):
    from vdiff_sparse.methods.psa import PSAConfig, plan_psa

    q, k = _qk()
    config = PSAConfig(block_q=16, block_k=16, mode="quantile", reorder="none", importance_dtype="float32",
                       fractions={1: 0.3, 2: 0.3, 4: 0.2})
    return plan_psa(q.to(device), k.to(device), GRID, config)


def _vmoba(device="cpu"):
    from vdiff_sparse.methods.vmoba import VMoBAConfig, plan_vmoba

    q, k = _qk()
    config = VMoBAConfig(topk=2, query_block=16, block_3d=(1, 2, 3))
    return plan_vmoba(q.to(device), k.to(device), GRID, config, layer_index=2)


def _gna(device="cpu"):
    from vdiff_sparse.methods.gna import plan_gna

    return plan_gna(GRID, window=(2, 3, 3), stride=1, device=device)


def _hand_window():
    """A window without a grid: the block kernels test it per pair (facts: its extent)."""
    coords = token_coords(GRID, None)
    reach = torch.tensor([0, 1, 2])
    window = TokenWindow(coords, coords - reach, coords + reach, (1, 1, 1))
    offsets = uniform_offsets(N, 16)
    kv_index, _ = pack_block_selection(torch.ones(1, 1, 3, 3, dtype=torch.bool))
    plan = AttentionPlan(None, offsets, offsets, kv_index, window=window, method="test", tokens=N)
    return dataclasses.replace(plan, facts=read_facts(plan))


PLANS = {"dense_text": lambda: dense_plan(N, 16), "psa": _psa, "hand_window": _hand_window, "gna": _gna,
         "vmoba": _vmoba}
FAMILY = {"dense_text": "BlockTables", "psa": "BlockTables", "hand_window": "BlockTables", "gna": "BoxTables",
          "vmoba": "RoutedTables"}


def _text(seed=3, masked=True):
    g = torch.Generator().manual_seed(seed)
    ek, ev = torch.randn(2, 1, 5, H, D, generator=g)
    mask = torch.tensor([[True, True, False, True, False]]) if masked else None
    return ExtraKeys(ek, ev, mask)


@pytest.mark.parametrize("case", list(PLANS))
def test_opcheck(case):
    """The op's schema, fake implementation, autograd registration and AOT dispatch (forward
    and backward, dynamic shapes) against its real kernels."""
    plan = PLANS[case]()
    q, k, v = random_qkv(1, N, H, D, seed=1)
    args = kernels().op_arguments(q, k, v, plan, _text() if case in ("dense_text", "vmoba") else None)
    tables = kernels("tables")
    assert isinstance(tables.unflatten(args[8], args[6], args[7]), getattr(tables, FAMILY[case]))
    leaves = [None if x is None else x.detach().requires_grad_(x.is_floating_point()) for x in args[:6]]
    torch.library.opcheck(torch.ops.vdiff_sparse.plan_attention.default, (*leaves, *args[6:]))


def _run(q, k, v, ek, ev, plan, mask):
    from vdiff_sparse.backends.triton import TritonBackend

    extra = None if ek is None else ExtraKeys(ek, ev, mask)
    return TritonBackend().forward(q, k, v, plan, extra)


@pytest.mark.parametrize("case", ["dense_text", "psa", "gna", "vmoba"])
def test_compiled_fullgraph_equals_eager(case):
    """The backend's forward (tables, pooling, the op) traced whole by dynamo and AOT autograd;
    outputs and gradients equal to eager."""
    torch._dynamo.reset()
    plan = PLANS[case]()
    text = _text() if case in ("dense_text", "vmoba") else None
    leaves = list(random_qkv(1, N, H, D, seed=2))
    if text is not None:
        leaves += [text.k, text.v]
    mask = None if text is None else text.mask
    g = torch.randn(1, N, H, D, generator=torch.Generator().manual_seed(4))
    results = []
    for fn in (_run, torch.compile(_run, fullgraph=True, backend="aot_eager")):
        inputs = [x.clone().requires_grad_(True) for x in leaves]
        ek, ev = inputs[3:] if text is not None else (None, None)
        out = fn(*inputs[:3], ek, ev, plan, mask)
        results.append((out, torch.autograd.grad(out, inputs, g)))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(PLANS))
def test_tables_on_meta_read_nothing(case):
    """Tables, the pyramid and the op's shapes for a plan on ``meta`` (planned there, or
    moved there from the CPU with its facts): nothing reads a value back."""
    meta = torch.device("meta")
    if case in ("psa", "vmoba", "gna"):
        plan = PLANS[case](meta)
    else:
        plan = PLANS[case]().to(meta)
    assert plan.kv_index.device == meta and plan.facts is not None
    q, k, v = (torch.empty(1, N, H, D, device=meta) for _ in range(3))
    text = None
    if case in ("dense_text", "vmoba"):
        text = ExtraKeys(*(torch.empty(1, 5, H, D, device=meta) for _ in range(2)),
                         torch.ones(1, 5, dtype=torch.bool, device=meta))
    args = kernels().op_arguments(q, k, v, plan, text)
    tables = kernels("tables")
    assert isinstance(tables.unflatten(args[8], args[6], args[7]), getattr(tables, FAMILY[case]))
    assert all(t.device == meta for t in args[6])
    out, lse = torch.ops.vdiff_sparse.plan_attention(*args)
    assert out.shape == (1, N, H, D) and lse.shape == (1, H, N) and lse.dtype == torch.float32


def test_levels_the_facts_allow_but_no_entry_uses_cost_no_tile():
    """Facts may name more pool levels than the entries use (PSA's come from its config): the
    unused ones are pooled and launched, compute no tile, and the result is the reference's."""
    from vdiff_sparse.backends.reference import reference_attention
    from vdiff_sparse.backends.triton import TritonBackend

    offsets = uniform_offsets(N, 16)
    selected = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    kv_index, kv_level = pack_block_selection(selected, torch.tensor([1, 2, 1])[None, None, None].expand(1, 1, 3, 3))
    plan = AttentionPlan(None, offsets, offsets, kv_index, kv_level, tokens=N,
                         facts=PlanFacts.uniform(N, 16, 16, (1, 2, 4, 8)))
    q, k, v = random_qkv(1, N, H, D, seed=6, requires_grad=True)
    backend = TritonBackend()
    with backend.count_work() as counter:
        out = backend.forward(q, k, v, plan)
        out.backward(torch.ones_like(out))
    work = backend.work(plan, D, batch=1, heads=H, tiles=kernels("tiles").INTERPRETER_TILES)
    assert counter.totals() == {"forward": work["forward"]["executed"], "dq": work["backward"]["dq"]["executed"],
                                "dkdv": work["backward"]["dkdv"]["executed"]}
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref = reference_attention(*leaves, plan)
    ref.backward(torch.ones_like(ref))
    assert (out.detach().double() - ref).abs().max() < 1e-4
    for got, want in zip((q, k, v), leaves):
        assert (got.grad.double() - want.grad).abs().max() < 1e-4 * max(1.0, want.grad.abs().max().item())


def test_routed_rounds_on_the_gpu_path_are_the_planners_count():
    """Off the CPU a routed plan's rounds come from its facts (local top-k: exactly ``topk``),
    else from ``max_kv``, a bound; on the CPU they are counted."""
    tables, tiles = kernels("tables"), kernels("tiles").INTERPRETER_TILES
    on_meta, _ = tables.plan_tables(_vmoba(torch.device("meta")), tiles)
    assert on_meta.rounds == 2
    plan = _vmoba()
    on_cpu, _ = tables.plan_tables(plan, tiles)
    assert on_cpu.rounds == read_facts(plan).keep_max <= 2
    unknown = dataclasses.replace(plan, facts=dataclasses.replace(plan.facts, keep_max=None)).to("meta")
    assert tables.plan_tables(unknown, tiles)[0].rounds == plan.max_kv


def test_box_facts_keep_the_unmasked_launch():
    """GNA tiles sharing one window skip the pair test on any device: the facts carry which
    tile sizes need none."""
    from vdiff_sparse.methods.gna import plan_gna

    tables, tiles = kernels("tables"), kernels("tiles").INTERPRETER_TILES
    for config, masked in ((dict(window=(4, 4, 4), stride=(2, 3, 3)), False), (dict(window=(2, 4, 5)), True)):
        plan = plan_gna((4, 6, 6), **config)
        cpu, _ = tables.plan_tables(plan, tiles)
        meta, _ = tables.plan_tables(plan.to("meta"), tiles)
        assert cpu.q_masked == meta.q_masked == masked
        assert cpu.k_masked == meta.k_masked


def test_facts_travel_and_are_checked():
    plan = dense_plan(40, 16)
    assert plan.facts == read_facts(plan) == PlanFacts(16, 16, (1,), (40,))
    assert plan.clone().facts is plan.facts and plan.to("meta").facts is plan.facts
    hand = AttentionPlan(None, plan.q_offsets, plan.k_offsets, plan.kv_index)
    assert hand.facts is None and hand.to("meta").facts == read_facts(hand)
    with pytest.raises(ValueError, match="contradict its tensors .*k_block_max"):
        dataclasses.replace(plan, facts=PlanFacts(16, 8, (1,), (40,)))
    levels = torch.full_like(plan.kv_index, 4)
    with pytest.raises(ValueError, match="levels"):
        dataclasses.replace(plan, kv_level=levels)
    assert dataclasses.replace(plan, kv_level=levels, facts=PlanFacts.uniform(40, 16, 16, (4,))).facts.rows_of() == {
        1: 40, 4: 10}
    # A value outside the pool factors is read too (the usual ones are counted without a sort).
    odd = levels.clone()
    odd[0, 0, 1, 0] = 3
    assert read_facts(dataclasses.replace(hand, kv_level=odd)).levels == (1, 3, 4)
    with pytest.raises(ValueError, match="levels"):
        dataclasses.replace(plan, kv_level=odd, facts=PlanFacts.uniform(40, 16, 16, (4,)))


def test_psa_facts_cover_every_level_a_config_can_give():
    from vdiff_sparse.methods.psa import PSAConfig, _possible_levels

    assert _possible_levels(PSAConfig(mode="quantile", fractions={2: 0.3, 8: 0.2})) == (1, 2, 8)
    assert _possible_levels(PSAConfig(thresholds={4: 0.5, 8: 0.9}, similarity_cap={8: 0.5})) == (1, 4, 8)
    assert _possible_levels(PSAConfig(thresholds={2: 0.5, 8: 0.9}, similarity_cap={8: 0.5})) == (1, 2, 4, 8)
    assert _possible_levels(PSAConfig(mode="budget", budget_levels=(2,))) == (1, 2)


def test_the_op_survives_a_reload_of_the_kernel_modules():
    """``_kernels`` reloads the kernel modules when ``TRITON_INTERPRET`` changes; the op
    stays defined and runs the reloaded code."""
    ops = kernels()
    for _ in range(2):
        importlib.reload(ops)
    q, k, v = random_qkv(1, 32, 1, D, seed=5)
    out = ops.plan_attention(q, k, v, dense_plan(32, 16))
    want = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_importing_the_library_loads_no_kernel():
    """The op is defined when the kernels load, never on import of the library, its planners
    or the Triton backend's adapter."""
    import subprocess
    import sys

    code = ("import sys, vdiff_sparse, vdiff_sparse.backends.triton, vdiff_sparse.methods.gna, "
            "vdiff_sparse.methods.psa, vdiff_sparse.methods.vmoba, vdiff_sparse.window_tiles\n"
            "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('vdiff_sparse.kernels.')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
