"""torch.compile: every method on every model family is captured whole (``fullgraph=True``), by
regional and by whole-model compilation, with outputs equal to eager and a number of graphs that
does not grow with the depth or the steps; plan reuse across steps; no host reads in planning.

The graphs are traced with the ``eager`` backend (dynamo's capture is what is under test; it is
also what inductor receives); one test compiles with inductor end to end."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import vdiff_sparse.processors as P
import vdiff_sparse.tiny_models as tm
from test_models_new_families import GRIDS as NEW_GRIDS
from test_models_new_families import MODELS as NEW_MODELS
from test_processors_models import GRIDS as OLD_GRIDS
from test_processors_models import MODELS as OLD_MODELS
from vdiff_sparse import integration

CASES = {name: (family, build, {}, OLD_GRIDS[name], tm.tiny_inputs) for name, family, build in OLD_MODELS}
CASES.update({name: (family, build, extra, NEW_GRIDS[name], tm.tiny_video_inputs)
              for name, family, build, extra in NEW_MODELS})
# Models that diffusers 0.42 itself cannot capture whole (test_models_that_cannot_be_captured_whole
# shows it without any vdiff_sparse processor): HunyuanVideo 1.5 branches on a tensor
# (``if is_t2v``), LTX-2.x's perturbed (STG) processor on the perturbation mask.
NOT_WHOLE = {"hunyuan_video15", "hunyuan_video15_i2v", "ltx2x_stg"}
NOT_REGIONAL = {"ltx2x_stg"}

METHODS = {
    "gna": lambda: P.GNAProcessor(window=(2, 2, 3), stride=1, stats=True),
    # the first step dense: the warm-up and the sparse steps run through one graph
    "psa": lambda: P.PSAProcessor(mode="quantile", fractions={1: 0.3, 2: 0.2}, block_q=8, block_k=8, dense_steps=1,
                                  stats=True),
    "vmoba": lambda: P.VMoBAProcessor(topk=1, block_1d=1, block_2d=(2, 2), block_3d=(1, 2, 2), query_block=16,
                                      stats=True),
    "dense": lambda: P.DenseProcessor(),
}
TIMESTEPS = (900.0, 600.0, 300.0)


def _inputs(name, seed=1, model=None):
    family, build, extra, grid, make = CASES[name]
    kwargs = {"model": model} if make is tm.tiny_inputs else {}
    return {**make(family, grid, batch=2, seed=seed, **kwargs), **extra}


def _steps(model) -> tuple[float, ...]:
    """Three denoising steps in the model's direction (Mochi's timesteps rise)."""
    from vdiff_sparse.adapters import adapter_for

    return tuple(sorted(TIMESTEPS, reverse=not adapter_for(model).timestep_increases))


def _forward(call, inputs, t):
    out = call(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t)})
    return out.sample if hasattr(out, "sample") else out[0]


def _compare(name, method, mode):
    """Eager and compiled outputs over three steps, and the number of graphs dynamo made."""
    family, build, *_ = CASES[name]
    torch._dynamo.reset()
    counters.clear()
    model = build(0)
    inputs = _inputs(name, model=model)
    proc = METHODS[method]()
    integration.enable(model, proc)
    try:
        steps = _steps(model)
        with torch.no_grad():
            eager = [_forward(model, inputs, t) for t in steps]
            # the compiled run is a new generation (Mochi's rising timesteps would continue it)
            integration.get_context(model).new_generation()
            if mode == "regional":
                model.compile_repeated_blocks(fullgraph=True, backend="eager")
                call = model
            else:
                call = torch.compile(model, fullgraph=True, backend="eager")
            compiled = [_forward(call, inputs, t) for t in steps]
    finally:
        integration.disable(model)
    for step, (a, b) in enumerate(zip(eager, compiled)):
        assert torch.equal(a, b), f"{name} {method} {mode}: step {step} differs by {(a - b).abs().max():.3g}"
    return counters["stats"]["unique_graphs"], proc


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", sorted(set(CASES) - NOT_WHOLE))
def test_whole_model_fullgraph(name, method):
    graphs, proc = _compare(name, method, "whole")
    assert graphs <= 2, f"{name} {method}: {graphs} graphs"
    if proc.stats.enabled and method != "dense":
        methods = [r.method for r in proc.stats.records]
        assert method in methods, "the sparse path ran inside the compiled graph"
        if method == "psa":
            assert "dense" in methods, "the warm-up step ran dense inside the same graph"


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", sorted(n for n in set(CASES) - NOT_REGIONAL
                                        if getattr(CASES[n][1](0), "_repeated_blocks", None)))
def test_regional_fullgraph(name, method):
    graphs, _ = _compare(name, method, "regional")
    assert graphs <= 5, f"{name} {method}: {graphs} graphs"


@pytest.mark.parametrize("name", sorted(NOT_WHOLE))
def test_models_that_cannot_be_captured_whole(name):
    """These fail in diffusers itself, without any vdiff_sparse processor; if one starts to pass,
    move it into the whole-model tests."""
    family, build, *_ = CASES[name]
    torch._dynamo.reset()
    model = build(0)
    with pytest.raises(Exception, match="Data-dependent branching"):
        with torch.no_grad():
            torch.compile(model, fullgraph=True, backend="eager")(**_inputs(name, model=model))


DEPTH = {  # builders taking a layer count
    "wan": (lambda n: tm.tiny_wan_transformer(seed=0, num_layers=n), "wan", (2, 4, 6)),
    "hunyuan_video": (lambda n: tm.tiny_hunyuan_video_transformer(seed=0, num_layers=n, num_single_layers=n),
                      "hunyuan_video", (2, 4, 6)),
    "ltx": (lambda n: tm.tiny_ltx_transformer(seed=0, num_layers=n), "ltx", (2, 4, 6)),
    "cogvideox": (lambda n: tm.tiny_cogvideox_transformer(seed=0, num_layers=n), "cogvideox", (2, 4, 6)),
}


def _graphs(build, family, grid, layers, mode):
    torch._dynamo.reset()
    counters.clear()
    model = build(layers)
    inputs = tm.tiny_inputs(family, grid, batch=2, seed=1, model=model)
    integration.enable(model, P.VMoBAProcessor(topk=1, block_1d=1, block_2d=(2, 2), block_3d=(1, 2, 2),
                                               query_block=16, dense_steps=1, dense_layers=[-1]))
    if mode == "regional":
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        call = model
    else:
        call = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        for t in TIMESTEPS:
            _forward(call, inputs, t)
    integration.disable(model)
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["regional", "whole"])
@pytest.mark.parametrize("family", sorted(DEPTH))
def test_graph_count_does_not_grow_with_depth(family, mode):
    """VMoBA's partition cycles 1D/2D/3D with the layer, the last layer is dense and the first
    step is a dense warm-up: none of it may become a guard."""
    build, kind, grid = DEPTH[family]
    if mode == "regional" and not getattr(build(2), "_repeated_blocks", None):
        pytest.skip(f"{family} has no repeated blocks for regional compilation (covered by the whole-model case)")
    assert _graphs(build, kind, grid, 2, mode) == _graphs(build, kind, grid, 4, mode)


def test_graph_count_does_not_grow_with_processors_set_in_turn():
    """Processors of one method set on a compiled model one after another (a user trying
    settings) reuse the graph: the processor reaches the op as a tensor, not a guarded int."""
    torch._dynamo.reset()
    counters.clear()
    model = tm.tiny_wan_transformer(seed=0)
    inputs = tm.tiny_inputs("wan", (2, 4, 6), batch=2, seed=1, model=model)
    model.compile_repeated_blocks(fullgraph=True, backend="eager")
    graphs = []
    with torch.no_grad():
        for window in ((2, 2, 3), (2, 3, 3), (2, 4, 4), (2, 3, 5)):
            integration.enable(model, P.GNAProcessor(window=window, stride=1))
            _forward(model, inputs, TIMESTEPS[0])
            graphs.append(counters["stats"]["unique_graphs"])
    integration.disable(model)
    assert graphs[1:] == graphs[:1] * 3, graphs


@pytest.mark.slow
def test_inductor_end_to_end():
    torch._dynamo.reset()
    model = tm.tiny_wan_transformer(seed=0)
    inputs = tm.tiny_inputs("wan", (2, 4, 6), batch=2, seed=1, model=model)
    integration.enable(model, P.GNAProcessor(window=(2, 3, 3), stride=1, dense_steps=1))
    with torch.no_grad():
        eager = [_forward(model, inputs, t) for t in TIMESTEPS[:2]]
        model.compile_repeated_blocks(fullgraph=True)
        compiled = [_forward(model, inputs, t) for t in TIMESTEPS[:2]]
    integration.disable(model)
    for a, b in zip(eager, compiled):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


@pytest.mark.parametrize("method", ["vmoba", "psa", "gna"])
def test_gradients_through_the_compiled_op(method):
    """Training a compiled model: the op's backward (recomputing the eager attention) gives
    eager's gradients, for methods built of autograd Functions (VMoBA's routed backend) and of
    plain torch ops alike."""
    def grads(compile_it: bool):
        torch._dynamo.reset()
        model = tm.tiny_wan_transformer(seed=0).train()
        inputs = tm.tiny_inputs("wan", (2, 4, 6), batch=2, seed=1, model=model)
        processor = {
            "vmoba": lambda: P.VMoBAProcessor(topk=1, block_1d=1, block_2d=(2, 2), block_3d=(1, 2, 2), query_block=16),
            "psa": lambda: P.PSAProcessor(mode="quantile", fractions={1: 0.3, 2: 0.2}, block_q=8, block_k=8,
                                          dense_steps=0),
            "gna": lambda: P.GNAProcessor(window=(2, 2, 3), stride=1),
        }[method]()
        integration.enable(model, processor)
        call = torch.compile(model, fullgraph=True, backend="aot_eager") if compile_it else model
        call(**inputs).sample.square().mean().backward()
        integration.disable(model)
        return [p.grad for p in model.parameters() if p.grad is not None]

    eager, compiled = grads(False), grads(True)
    assert len(eager) == len(compiled) > 0
    assert max((a - b).abs().max().item() for a, b in zip(eager, compiled)) <= 1e-6


def test_a_processor_set_without_enable_must_be_bound_before_compiling():
    torch._dynamo.reset()
    model = tm.tiny_wan_transformer(seed=0)
    model.set_attn_processor(P.GNAProcessor(window=(2, 3, 3), stride=1))
    with pytest.raises(Exception, match="set the processor with vdiff_sparse.enable"):
        with torch.no_grad():
            torch.compile(model, fullgraph=True, backend="eager")(**tm.tiny_inputs("wan", (2, 4, 6), seed=1))


# --- plan reuse ---------------------------------------------------------------------------------
@pytest.mark.parametrize("every", [1, 2, 3])
def test_replan_every_reuses_plans_between_selections(every, monkeypatch):
    """Selection runs on sparse steps 0, k, 2k, ...: once per layer and guidance branch; the other
    steps run the layer's last plan. With k = 1 nothing is reused."""
    from vdiff_sparse.methods import psa

    selections = []
    original = psa.plan_psa

    def counting(*args, **kwargs):
        selections.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(psa, "plan_psa", counting)
    model = tm.tiny_wan_transformer(seed=0)  # 2 layers
    inputs = tm.tiny_inputs("wan", (2, 4, 6), seed=1, model=model)
    settings = dict(mode="quantile", fractions={1: 0.3, 2: 0.2}, block_q=8, block_k=8, dense_steps=1)
    reusing = P.PSAProcessor(**settings, replan_every=every)
    fresh = P.PSAProcessor(**settings)
    steps = (990.0, 900.0, 800.0, 700.0, 600.0, 500.0, 400.0)  # 1 warm-up + 6 sparse steps
    outputs = {}
    for label, proc in (("reusing", reusing), ("fresh", fresh)):
        integration.enable(model, proc)
        selections.clear()
        with torch.no_grad():
            # two calls per step: Wan's guidance branches, each with its own plan
            outputs[label] = [[_forward(model, {**inputs, "encoder_hidden_states": e}, t) for e in
                               (inputs["encoder_hidden_states"], inputs["encoder_hidden_states"].flip(1))]
                              for t in steps]
        integration.disable(model)
        if label == "reusing":
            sparse_steps = len(steps) - 1
            assert len(selections) == 2 * 2 * -(-sparse_steps // every)  # layers x branches x selections
    for step, (a, b) in enumerate(zip(outputs["reusing"], outputs["fresh"])):
        replanned = step == 0 or (step - 1) % every == 0
        same = all(torch.equal(x, y) for x, y in zip(a, b))
        assert same == replanned or every == 1, f"step {step}: reused plan gave {'the same' if same else 'another'} output"


def test_replan_every_is_checked():
    with pytest.raises(ValueError, match=r"replan_every must be an int >= 1"):
        P.PSAProcessor(replan_every=0)
    with pytest.raises(ValueError, match=r"replan_every=2 has nothing to reuse: the plans of \['gna'\] depend on the grid"):
        P.GNAProcessor(window=(2, 3, 3), replan_every=2)
    # A grid-only method with a layer of a selecting one: that layer reuses.
    assert P.GNAProcessor(window=(2, 3, 3), replan_every=2, layers={1: {"method": "psa"}}).schedule.replan_every == 2


def test_plan_reuse_keeps_one_plan_per_layer_and_call_and_not_with_gradients():
    """Repeated calls at one noise level (one step, outside a pipeline) keep at most
    REUSED_CALLS_PER_STEP plans per layer and select afresh after that; a new generation drops
    the old plans; with gradients on nothing is kept (each call differentiates its own plan)."""
    from vdiff_sparse.processors.base import REUSED_CALLS_PER_STEP

    model = tm.tiny_wan_transformer(seed=0)  # 2 layers
    inputs = tm.tiny_inputs("wan", (2, 4, 6), seed=1, model=model)
    proc = P.PSAProcessor(mode="quantile", fractions={1: 0.3}, block_q=8, block_k=8, replan_every=4, dense_steps=0)
    integration.enable(model, proc)
    with torch.no_grad():
        for _ in range(REUSED_CALLS_PER_STEP + 3):
            _forward(model, inputs, 900.0)
        assert len(proc._plans) == 2 * REUSED_CALLS_PER_STEP
        _forward(model, inputs, 999.0)  # noisier: a new generation
        assert len(proc._plans) == 2
    proc._plans.clear()
    _forward(model, inputs, 800.0)
    assert not proc._plans
    integration.disable(model)


# --- no host reads in planning ----------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("mode, scope", [("topk", "local"), ("topk", "global"), ("threshold", "local"),
                                         ("threshold", "global")])
def test_planning_reads_nothing_back_from_the_device(mode, scope, layer):
    """Planning on the ``meta`` device, which holds no data: any read of a value on the host
    (``.item()``, ``int()``, a data-dependent shape, a branch on a tensor) fails there. This is
    the CPU check of what a GPU needs: no synchronisation per attention call."""
    from vdiff_sparse.attention import run_plan  # noqa: F401  (imported for the same module state)
    from vdiff_sparse.methods.gna import plan_gna
    from vdiff_sparse.methods.vmoba import plan_vmoba

    q = torch.empty(2, 5 * 8 * 8, 4, 32, device="meta")
    gna = plan_gna((5, 8, 8), (3, 4, 4), 1, device="meta")
    assert gna.kv_index.device.type == "meta" and gna.num_tokens == 320
    plan = plan_vmoba(q, q, (5, 8, 8), dict(mode=mode, scope=scope, block_1d=1, block_2d=(4, 4),
                                            block_3d=(2, 4, 4), topk=2), layer_index=layer)
    assert plan.kv_index.device.type == "meta" and plan.num_tokens == 320
    assert plan.kv_index.shape[-1] == plan.num_k_blocks  # a bound, not the largest row count


@pytest.mark.parametrize("settings", [dict(mode="threshold"), dict(mode="quantile"), dict(mode="budget", density=0.3),
                                      dict(mode="budget", density=0.3, similarity_cap={8: 0.5}),
                                      dict(mode="threshold", importance="mean_pooled", similarity_cap={2: 0.5})],
                         ids=["threshold", "quantile", "budget", "budget-capped", "mean-pooled-capped"])
@pytest.mark.parametrize("reorder", ["hilbert", "tile", "none"])
def test_psa_planning_reads_nothing_back_from_the_device(settings, reorder):
    """PSA's importance estimate and level allocation on ``meta`` (see above), ragged blocks."""
    from vdiff_sparse.methods.psa import PSAConfig, plan_psa

    q = torch.empty(2, 5 * 8 * 9, 4, 32, device="meta")
    config = PSAConfig(block_q=48, block_k=40, reorder=reorder, importance_dtype="float32", **settings)
    plan = plan_psa(q, q, (5, 8, 9), config)
    assert plan.kv_index.device.type == "meta" and plan.kv_index.shape == (2, 4, 8, plan.num_k_blocks)


@pytest.mark.slow
def test_cli_generate_compiled(tmp_path, capsys):
    """``generate --compile``: the warm-up generation compiles, the timed one runs compiled and
    matches the eager video of the same seed; the report says how it was compiled."""
    import json

    import numpy as np

    from test_generate import read_video
    from vdiff_sparse.cli import main

    torch._dynamo.reset()
    args = ["generate", "--attn", "gna", "--frames", "5", "--height", "32", "--width", "48", "--steps", "2",
            "--seed", "3", "window=[2,4,4]", "stride=[1,2,2]"]
    assert main([*args, "--no-warmup", "--out", str(tmp_path / "eager")]) == 0
    assert main([*args, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    assert "torch.compile (regional, fullgraph)" in capsys.readouterr().out
    report = json.loads((tmp_path / "compiled" / "report.json").read_text())
    assert report["compiled"] == "regional" and report["warmup"] is True
    eager, compiled = read_video(tmp_path / "eager" / "gna.mp4"), read_video(tmp_path / "compiled" / "gna.mp4")
    # inductor rounds float32 differently; through the VAE and H.264 coding a pixel moves by a few levels
    mse = np.mean((eager.astype(float) - compiled) ** 2)
    assert mse == 0 or 10 * np.log10(255**2 / mse) > 40


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync debugging needs a CUDA GPU")
@pytest.mark.parametrize("method", ["gna", "psa", "psa_torch_estimate", "vmoba"])
def test_steady_state_steps_do_not_synchronise_on_a_gpu(method, monkeypatch):
    """On a GPU, a denoising step after the first (plans for the grid made, kernels compiled)
    reads nothing back to the host: ``torch.cuda.set_sync_debug_mode("error")`` raises on any
    synchronising call; PSA's estimate on its Triton kernel and on torch matmuls (where the
    kernel declines, e.g. head dims that are not powers of two). The CPU check of the same logic
    is planning on ``meta`` above and the fullgraph captures."""
    if method == "psa_torch_estimate":
        from vdiff_sparse.methods import psa_budget

        monkeypatch.setattr(psa_budget, "estimate_on_kernel", lambda *args: False)
        method = "psa"
    family, build, _, grid, make = CASES["wan_t2v"]
    model = build(0).cuda().to(torch.bfloat16)
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in make(family, grid, batch=2, seed=1).items()}
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in inputs.items()}
    processor = {  # without statistics, which read densities back by design
        "gna": lambda: P.GNAProcessor(window=(2, 2, 3), stride=1),
        "psa": lambda: P.PSAProcessor(mode="budget", density=0.3, block_q=8, block_k=8),
        "vmoba": lambda: P.VMoBAProcessor(topk=1, block_1d=1, block_2d=(2, 2), block_3d=(1, 2, 2), query_block=16),
    }[method]()
    integration.enable(model, processor)
    with torch.no_grad():
        _forward(model, inputs, TIMESTEPS[0])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _forward(model, inputs, TIMESTEPS[1])
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_a_compiled_training_step_reuses_no_plan():
    """Inside the compiled op grad mode is always off: the caller's mode travels with the call,
    so a differentiated step selects afresh (its gradient is that of its own plan)."""
    torch._dynamo.reset()
    model = tm.tiny_wan_transformer(seed=0).train()
    inputs = tm.tiny_inputs("wan", (2, 4, 6), batch=2, seed=1, model=model)
    proc = P.PSAProcessor(mode="quantile", fractions={1: 0.3}, block_q=8, block_k=8, replan_every=2, dense_steps=0)
    integration.enable(model, proc)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for t in (900.0, 800.0):
        _forward(compiled, inputs, t).square().mean().backward()
    assert not proc._plans
    with torch.no_grad():
        _forward(compiled, inputs, 700.0)
    assert len(proc._plans) == 2  # without gradients the layers keep their plans
    integration.disable(model)
