"""Processor integration: step counting, schedules, stats, presets, errors, pipelines,
gradient checkpointing, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch

import vdiff_sparse.processors as P
from vdiff_sparse.adapters import model_families
from vdiff_sparse import integration
from vdiff_sparse.methods import get_method
from vdiff_sparse.methods.vmoba import vmoba_block_ids
from vdiff_sparse.processors import ScheduleConfig
from vdiff_sparse.tiny_models import (
    tiny_cogvideox_transformer,
    tiny_hunyuan_video_transformer,
    tiny_inputs,
    tiny_ltx_transformer,
    tiny_mochi_transformer,
    tiny_wan_pipeline,
    tiny_wan_transformer,
)

GRID = (3, 4, 5)
SPARSE = dict(topk=1, block_1d=1, block_2d=(2, 2), block_3d=(1, 2, 2), query_block=16)


class Recorder(P.DenseProcessor):
    """Dense processor that records (layer, step, dense_reason) of every video call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def attend_layer(self, q, k, v, extra_k=None, extra_v=None, extra_mask=None, *, binding, **kwargs):
        self.calls.append((binding.index, binding.context.step, self._dense_reason(binding)))
        return super().attend_layer(q, k, v, extra_k, extra_v, extra_mask, binding=binding, **kwargs)


def _forward(model, inputs, t):
    with torch.no_grad():
        return model(**dict(inputs, timestep=torch.full_like(inputs["timestep"], t))).sample


@pytest.fixture
def wan(seed):
    model = tiny_wan_transformer(seed=seed % 1000)
    return model, tiny_inputs("wan", GRID, seed=seed)


# --- step counting and schedules ---------------------------------------------------------------
def test_step_counter_cfg_and_new_generation(wan):
    model, inputs = wan
    rec = Recorder()
    model.set_attn_processor(rec)  # plain diffusers call: the processor attaches itself
    # CFG: two calls per step with the same timestep; then a new generation (timestep goes up).
    for t in (900, 900, 600, 600, 300, 300, 950, 500):
        _forward(model, inputs, t)
    steps = [s for layer, s, _ in rec.calls if layer == 0]
    assert steps == [0, 0, 1, 1, 2, 2, 0, 1]
    assert integration.get_context(model).grid == GRID
    integration.disable(model)


@pytest.mark.parametrize(
    "schedule, total, expected",
    [
        (dict(dense_steps=2), None, {0: "warmup", 1: "warmup", 2: "", 3: ""}),
        (dict(dense_steps=0.3), 4, {0: "warmup", 1: "warmup", 2: "", 3: ""}),  # ceil(1.2) = 2
        (dict(dense_steps=0.25), 4, {0: "warmup", 1: "", 2: "", 3: ""}),
        (dict(dense_steps=0), None, {0: "", 1: "", 2: "", 3: ""}),
    ],
    ids=["count2", "fraction0.3", "fraction0.25", "none"],
)
def test_warmup_schedule(wan, schedule, total, expected):
    model, inputs = wan
    rec = Recorder(schedule=schedule)
    integration.enable(model, rec)
    if total is not None:
        integration.set_context(model, total_steps=total)
    for t in (900, 700, 500, 300):
        _forward(model, inputs, t)
    got = {s: r for layer, s, r in rec.calls if layer == 0}
    integration.disable(model)
    assert got == expected


def test_fractional_warmup_needs_total_steps(wan):
    model, inputs = wan
    integration.enable(model, P.DenseProcessor(dense_steps=0.5))
    with pytest.raises(ValueError, match=r"'blocks.0.attn1'.*number of steps is unknown.*set_context"):
        _forward(model, inputs, 900)
    integration.set_context(model, total_steps=4)  # the way the message names
    _forward(model, inputs, 900)
    integration.disable(model)


# (id, builder, input family, calls per denoising step, timesteps of three steps).
# Wan / HunyuanVideo pipelines call the transformer twice per step (cond, uncond) at one
# timestep; CogVideoX / LTX / Mochi batch both into one call (B=2). Mochi's timesteps increase.
CFG_FAMILIES = [
    ("wan", tiny_wan_transformer, "wan", 2, (900, 600, 300)),
    ("hunyuan_video", tiny_hunyuan_video_transformer, "hunyuan_video", 2, (900, 600, 300)),
    ("cogvideox", tiny_cogvideox_transformer, "cogvideox", 1, (900, 600, 300)),
    ("ltx", tiny_ltx_transformer, "ltx", 1, (900, 600, 300)),
    ("mochi", tiny_mochi_transformer, "mochi", 1, (100, 400, 700)),
]


@pytest.mark.parametrize("build, family, calls, timesteps", [c[1:] for c in CFG_FAMILIES],
                         ids=[c[0] for c in CFG_FAMILIES])
def test_cfg_step_counting_per_family(seed, build, family, calls, timesteps):
    """One step per denoising step whether CFG makes two calls or one batched call, and a new
    generation (the first timestep again) restarts at step 0."""
    model = build(seed=seed % 1000)
    inputs = tiny_inputs(family, GRID, batch=3 - calls, seed=seed, model=model)
    rec = Recorder()
    integration.enable(model, rec)
    for t in (*timesteps, timesteps[0]):
        for _ in range(calls):
            _forward(model, inputs, t)
    integration.disable(model)
    steps = [s for layer, s, _ in rec.calls if layer == 0]
    assert steps == [s for s in (0, 1, 2, 0) for _ in range(calls)]


def test_dense_layers_and_per_layer_overrides(wan):
    model, inputs = wan
    rec = Recorder(dense_layers=[-1])
    integration.enable(model, rec)
    _forward(model, inputs, 900)
    assert [(layer, r) for layer, _, r in rec.calls] == [(0, ""), (1, "layer")]
    proc = P.VMoBAProcessor(**SPARSE, layers={1: {"topk": 100}}, stats=True)
    integration.enable(model, proc)
    _forward(model, inputs, 900)
    integration.disable(model)
    dens = {r.layer: r.density for r in proc.stats.records}
    assert dens[0] < 1.0 and dens[1] == pytest.approx(1.0)
    assert proc.config_for(1).topk == 100 and proc.config_for(0).topk == 1


def test_schedule_config_validation():
    with pytest.raises(ValueError, match="dense_steps"):
        ScheduleConfig(dense_steps=2.5)
    with pytest.raises(ValueError, match="dense_steps"):
        ScheduleConfig(dense_steps=-1)
    with pytest.raises(ValueError, match="layers must map layer indices"):
        ScheduleConfig(layers={-1: {}})
    with pytest.raises(ValueError, match=r"layers\[1\]: unknown method 'sta'; choose one of \['dense', 'gna'"):
        ScheduleConfig(layers={1: {"method": "sta"}})
    with pytest.raises(ValueError, match="unknown vmoba option"):
        P.GNAProcessor(layers={1: {"method": "vmoba", "window": 3}})


def test_per_layer_method_choice(seed):
    """One shared GNA processor running dense on layer 0, VMoBA on layer 1 and GNA on layer 2
    gives exactly what three separate processors give, and the stats name each layer's
    method."""
    model = tiny_wan_transformer(num_layers=3, seed=seed % 1000)
    inputs = tiny_inputs("wan", GRID, seed=seed)
    gna = dict(window=2, stride=1)
    proc = P.GNAProcessor(**gna, layers={0: {"method": "dense"}, 1: {"method": "vmoba", **SPARSE}}, stats=True)
    assert [proc.method_for(i) for i in range(3)] == ["dense", "vmoba", "gna"]
    assert proc.config_for(1).topk == 1 and proc.config_for(2).window == 2
    integration.enable(model, proc)
    mixed = _forward(model, inputs, 900)
    integration.disable(model)
    assert [(r.layer, r.method, r.dense_reason) for r in proc.stats.records] == [
        (0, "dense", "layer"), (1, "vmoba", ""), (2, "gna", "")]
    assert proc.stats.records[0].density == 1.0
    assert all(r.density < 1.0 for r in proc.stats.records[1:])

    per_module = {name: P.DenseProcessor() for name in model.attn_processors}
    per_module["blocks.1.attn1.processor"] = P.VMoBAProcessor(**SPARSE)
    per_module["blocks.2.attn1.processor"] = P.GNAProcessor(**gna)
    model.set_attn_processor(per_module)
    separate = _forward(model, inputs, 900)
    integration.disable(model)
    assert torch.equal(mixed, separate)
    assert (mixed - _forward(model, inputs, 900)).abs().max() > 1e-4, "sparse layers changed nothing"


def test_vmoba_partition_follows_layer_index(seed):
    """One shared VMoBA instance: each layer plans with its own 1D/2D/3D partition."""
    model = tiny_wan_transformer(num_layers=3, seed=seed % 1000)
    inputs = tiny_inputs("wan", GRID, seed=seed)
    partitions = {}

    class Spy(P.VMoBAProcessor):
        def attention(self, q, k, v, grid, layer, *, return_plan, **extras):
            out, plan = super().attention(q, k, v, grid, layer, return_plan=True, **extras)
            partitions[layer] = plan.info["partition"]
            return (out, plan) if return_plan else out

    integration.enable(model, Spy(**SPARSE))
    _forward(model, inputs, 900)
    integration.disable(model)
    assert partitions == {0: "1d", 1: "2d", 2: "3d"}


# --- stats -------------------------------------------------------------------------------------
def test_stats_off_by_default_and_records_when_on(wan):
    model, inputs = wan
    quiet = P.GNAProcessor(window=2, stride=1)
    integration.enable(model, quiet)
    _forward(model, inputs, 900)
    assert quiet.stats.records == []
    loud = P.GNAProcessor(window=2, stride=1, stats=True)
    integration.enable(model, loud)
    _forward(model, inputs, 900)
    _forward(model, inputs, 800)
    integration.disable(model)
    recs = loud.stats.records
    assert [(r.layer, r.step) for r in recs] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    n = GRID[0] * GRID[1] * GRID[2]
    assert all(r.num_tokens == n and 0 < r.density < 1 and r.time_ms > 0 for r in recs)
    # window 2 per axis with borders shifted inward: exactly 8 keys per query
    assert recs[0].density == pytest.approx(8 / n)
    summary = loud.stats.summary()
    assert summary["calls"] == 4 and set(summary["per_layer"]) == {0, 1}
    loud.stats.clear()
    assert loud.stats.records == []


def test_psa_coverage_counts_pooled_keys_fully_and_density_by_flops(wan):
    model, inputs = wan
    proc = P.PSAProcessor(mode="quantile", fractions={2: 1.0}, block_q=8, block_k=8, dense_steps=0, stats=True)
    integration.enable(model, proc)
    _forward(model, inputs, 900)
    integration.disable(model)
    rec = proc.stats.records[0]
    assert rec.coverage == pytest.approx(1.0)
    assert rec.density == pytest.approx(0.5)


# --- presets and configuration -----------------------------------------------------------------
@pytest.mark.parametrize("cls", [P.VMoBAProcessor, P.PSAProcessor, P.GNAProcessor, P.DenseProcessor],
                         ids=lambda c: c.__name__)
def test_every_preset_loads(cls):
    presets = P.available_presets()
    assert {"wan2.1-1.3b", "wan2.2-a14b", "hunyuanvideo", "cogvideox-5b", "ltx-video", "mochi-1"} <= set(presets["models"])
    for name in [None, *presets["models"]]:
        proc = cls(preset=name)
        assert isinstance(proc.config, proc.config_cls)


def test_config_sources_in_order():
    from vdiff_sparse.methods.gna import GNAConfig

    assert P.GNAProcessor(preset="wan2.1-1.3b").config.window == (9, 16, 24)
    assert P.PSAProcessor(preset="wan2.1-1.3b").schedule.dense_steps == 0.3
    obj = P.GNAProcessor(GNAConfig(window=(3, 5, 5), stride=2), preset="wan2.1-1.3b", dense_steps=3)
    assert obj.config.window == (3, 5, 5) and obj.schedule.dense_steps == 3
    assert P.GNAProcessor({"window": 4}, stride=2).config.stride == 2
    assert P.VMoBAProcessor(schedule=ScheduleConfig(dense_layers=[0])).schedule.dense_layers == [0]


def test_model_preset_of_another_family_refused(seed):
    """A model preset is for one model family (its ``family:``): ``enable`` refuses a model of
    another family, and so does the first call after a plain ``set_attn_processor``; method
    presets and presets of the model's family run."""
    hunyuan = tiny_hunyuan_video_transformer(seed=seed % 1000)
    inputs = tiny_inputs("hunyuan_video", GRID, seed=seed)
    refused = (r"PSAProcessor\(preset='wan2.1-1.3b'\): that preset is for wan models, but the processor is "
               r"used in a hunyuan_video model; model presets for hunyuan_video: \['hunyuanvideo'\]")
    with pytest.raises(ValueError, match=refused):
        integration.enable(hunyuan, P.PSAProcessor(preset="wan2.1-1.3b"))
    hunyuan.set_attn_processor(P.PSAProcessor(preset="wan2.1-1.3b"))
    with pytest.raises(ValueError, match=refused):
        _forward(hunyuan, inputs, 900)
    integration.disable(hunyuan)
    for preset in ("hunyuanvideo", "gna"):
        integration.enable(hunyuan, P.GNAProcessor(preset=preset, window=2, stride=1))
        assert torch.isfinite(_forward(hunyuan, inputs, 900)).all()
    integration.disable(hunyuan)
    from vdiff_sparse.presets import preset_family

    families = set(model_families())
    assert {preset_family(name) for name in P.available_presets()["models"]} <= families


def test_config_errors():
    with pytest.raises(ValueError, match="unknown preset 'wan9'"):
        P.PSAProcessor(preset="wan9")
    with pytest.raises(ValueError, match="is for method 'gna'"):
        P.PSAProcessor(preset="gna")
    with pytest.raises(ValueError, match="unknown PSAProcessor option 'treshold'"):
        P.PSAProcessor(treshold=0.5)
    with pytest.raises(ValueError, match="unknown vmoba option"):
        P.VMoBAProcessor({"top_k": 3})


# --- errors ------------------------------------------------------------------------------------
def test_grid_mismatch_error(wan):
    model, inputs = wan
    proc = P.DenseProcessor()
    integration.enable(model, proc)
    attn = model.blocks[0].attn1
    integration.set_context(model, grid=(2, 3, 3))
    x = torch.randn(1, 20, attn.inner_dim)
    with pytest.raises(ValueError, match=r"grid \(2, 3, 3\) has 18 tokens .* 20 video tokens"):
        attn(x)
    integration.disable(model)


def test_unsupported_model_and_no_context_errors():
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=16, heads=2, dim_head=8)
    attn.set_processor(P.PSAProcessor())
    with pytest.raises(RuntimeError, match="vdiff_sparse.enable"):
        attn(torch.randn(1, 6, 16))

    class Other(torch.nn.Module):  # an unsupported diffusers-like model
        def __init__(self):
            super().__init__()
            self.attn = attn

        def set_attn_processor(self, p):
            self.attn.set_processor(p)

        def forward(self, x):
            return self.attn(x)

    with pytest.raises(NotImplementedError, match="unsupported model Other"):
        Other()(torch.randn(1, 6, 16))
    with pytest.raises(NotImplementedError, match="unsupported model Other"):
        integration.enable(Other(), P.PSAProcessor())


def test_unhandled_input_raises_instead_of_going_dense(wan):
    """An attention_mask on Wan's self-attention: a sparse processor refuses (naming the module),
    a dense one or a dense-scheduled layer runs the model's processor, as does cross-attention."""
    model, _ = wan
    attn, cross = model.blocks[0].attn1, model.blocks[0].attn2
    x, text = torch.randn(1, 60, attn.inner_dim), torch.randn(1, 8, cross.inner_dim)
    mask = torch.ones(1, 1, 60, 60, dtype=torch.bool)
    with torch.no_grad():
        ref, ref_cross = attn(x, attention_mask=mask), cross(x, text)
        integration.enable(model, P.GNAProcessor(window=2, stride=1))
        integration.set_context(model, grid=GRID)
        with pytest.raises(NotImplementedError, match=r"'blocks.0.attn1'.*attention_mask of shape \(1, 1, 60, 60\)"):
            attn(x, attention_mask=mask)
        assert torch.equal(cross(x, text), ref_cross)
        dense_here = (P.DenseProcessor(), P.GNAProcessor(dense_layers=[0]), P.GNAProcessor(layers={0: {"method": "dense"}}))
        for proc in dense_here:
            integration.enable(model, proc)
            assert torch.equal(attn(x, attention_mask=mask), ref), proc
    integration.disable(model)


def test_attention_modules_added_after_setup(seed):
    """Modules put into an attached transformer later are bound on their first call: a new
    self-attention module by its layer index (still sparse), a new cross-attention module on the
    dense path; disable gives them the model's processors."""
    model = tiny_wan_transformer(seed=seed % 1000)
    inputs = tiny_inputs("wan", GRID, seed=seed)
    proc = P.GNAProcessor(window=2, stride=1, stats=True)
    integration.enable(model, proc)
    before = _forward(model, inputs, 900)
    twin = tiny_wan_transformer(seed=seed % 1000)  # same weights, never attached
    model.blocks[1].attn1, model.blocks[0].attn2 = twin.blocks[1].attn1, twin.blocks[0].attn2
    model.set_attn_processor(proc)
    proc.stats.clear()
    after = _forward(model, inputs, 900)
    assert integration.binding_of(model.blocks[1].attn1).index == 1
    assert integration.binding_of(model.blocks[0].attn2).index is None
    assert torch.equal(after, before)
    assert [(r.layer, r.method) for r in proc.stats.records] == [(0, "gna"), (1, "gna")]
    assert all(r.density < 1 for r in proc.stats.records)
    integration.disable(model)
    assert not isinstance(model.blocks[0].attn2.processor, P.SparseProcessor)
    assert torch.equal(_forward(model, inputs, 900), _forward(twin, inputs, 900))


def test_ltx_without_grid_kwargs_says_how(seed):
    from vdiff_sparse.tiny_models import tiny_ltx_transformer

    model = tiny_ltx_transformer(seed=seed % 1000)
    inputs = tiny_inputs("ltx", GRID, seed=seed)
    integration.enable(model, P.DenseProcessor())
    inputs = {k: v for k, v in inputs.items() if k not in ("num_frames", "height", "width")}
    inputs["video_coords"] = torch.zeros(1, 3, 60)
    with pytest.raises(RuntimeError, match="set_context"):
        with torch.no_grad():
            model(**inputs)
    integration.disable(model)


def test_ltx_grid_kwargs_are_the_token_grid(seed):
    """LTX's ``num_frames/height/width`` are the token grid (diffusers' RoPE makes one position
    per token), also with ``patch_size=2``: the grid is taken as given, not divided again."""
    model = tiny_ltx_transformer(patch_size=2, patch_size_t=1, in_channels=32, out_channels=32, seed=seed % 1000)
    inputs = tiny_inputs("ltx", GRID, seed=seed)
    inputs["hidden_states"] = torch.randn(1, GRID[0] * GRID[1] * GRID[2], 32, generator=torch.Generator().manual_seed(seed))
    ref = _forward(model, inputs, 900)
    integration.enable(model, P.DenseProcessor())
    out = _forward(model, inputs, 900)
    grid = integration.get_context(model).grid
    integration.disable(model)
    assert grid == GRID
    assert (out - ref).abs().max() <= 1e-5


# --- pipelines ---------------------------------------------------------------------------------
PIPE_KW = dict(prompt="a cat runs on the beach", negative_prompt="snow", height=32, width=64, num_frames=9,
               num_inference_steps=3, guidance_scale=2.0, output_type="pt")


@pytest.fixture(scope="module")
def pipes():
    return tiny_wan_pipeline(seed=1), tiny_wan_pipeline(two_experts=True, seed=2)


def _generate(pipe):
    return pipe(**PIPE_KW, generator=torch.Generator().manual_seed(0)).frames


@pytest.mark.parametrize("make", [
    lambda: P.DenseProcessor(),
    lambda: P.VMoBAProcessor(**SPARSE, stats=True),
    lambda: P.PSAProcessor(block_q=8, block_k=8, mode="quantile", fractions={1: 0.4, 4: 0.3}, dense_steps=1, stats=True),
    lambda: P.GNAProcessor(window=(2, 2, 3), stride=1, stats=True),
], ids=["dense", "vmoba", "psa", "gna"])
def test_wan_pipeline_generates(pipes, make):
    pipe = pipes[0]
    ref = _generate(pipe)
    proc = make()
    context = integration.enable(pipe, proc)
    out = _generate(pipe)
    integration.disable(pipe)
    assert out.shape == ref.shape == (1, 9, 3, 32, 64) and torch.isfinite(out).all()
    if proc.method == "dense":
        assert (out - ref).abs().max() <= 1e-5
    else:
        steps = {r.step for r in proc.stats.records}
        assert steps == {0, 1, 2}, "steps counted per generation with CFG"
        sparse = [r for r in proc.stats.records if not r.dense_reason]
        assert sparse and (out - ref).abs().max() > 1e-4, "the sparse method must change the video"
        # Each sparse call ran the method's own plan for the pipeline's grid: its density is
        # the plan's (content-independent for GNA and quantile PSA; with VMoBA top-1 a token
        # attends exactly its own block, so a layer's density is sum(block size^2) / N^2).
        grid = context.grid
        n = math.prod(grid)
        q = torch.randn(1, n, 2, 16, generator=torch.Generator().manual_seed(0))
        if proc.method == "vmoba":
            for r in sparse:
                sizes = torch.bincount(torch.tensor(vmoba_block_ids(grid, proc.config, layer_index=r.layer)))
                assert r.density == pytest.approx(float((sizes.double() ** 2).sum()) / n**2), r
        else:
            expected = get_method(proc.method).plan(q, q, grid, proc.config).density()
            assert all(r.density == pytest.approx(expected) for r in sparse), (expected, sparse)
    assert torch.equal(_generate(pipe), ref)
    assert "set_timesteps" not in vars(pipe.scheduler)


def test_wan22_set_attn_processor_without_enable(pipes):
    """``pipe.transformer.set_attn_processor(P)`` (and on ``transformer_2``), no enable: the
    processor finds the running pipeline, both experts share one step count and the number of
    steps comes from its scheduler, so a fractional warm-up works."""
    pipe = pipes[1]
    rec = Recorder(dense_steps=0.5)
    pipe.transformer.set_attn_processor(rec)
    pipe.transformer_2.set_attn_processor(rec)
    _generate(pipe)
    ctx = integration.get_context(pipe.transformer)
    assert integration.get_context(pipe.transformer_2) is ctx and ctx.num_steps() == 3
    assert [(s, r) for layer, s, r in rec.calls if layer == 0] == [
        (0, "warmup"), (0, "warmup"), (1, "warmup"), (1, "warmup"), (2, ""), (2, "")]
    _generate(pipe)  # a new generation restarts at step 0
    assert [s for layer, s, _ in rec.calls if layer == 0][6:] == [0, 0, 1, 1, 2, 2]
    integration.disable(pipe)
    # A transformer called on its own (no pipeline anywhere): the number of steps is unknown,
    # and the fractional warm-up says how to give it.
    inputs = tiny_inputs("wan", (3, 2, 4), seed=0)
    bare = tiny_wan_transformer(seed=0)
    bare.set_attn_processor(P.PSAProcessor(block_q=8, block_k=8))
    says_how = (r"PSAProcessor in 'blocks.0.attn1'.*number of steps is unknown.*"
                r"run it in its pipeline.*set_context\(transformer, total_steps=N\)")
    with pytest.raises(ValueError, match=says_how):
        _forward(bare, inputs, 900)
    integration.set_context(bare, total_steps=10)
    assert torch.isfinite(_forward(bare, inputs, 900)).all()


def test_wan22_two_experts_share_steps(pipes):
    pipe = pipes[1]
    ref = _generate(pipe)
    rec = Recorder(dense_steps=0.5)
    ctx = integration.enable(pipe, rec)
    out = _generate(pipe)
    assert integration.get_context(pipe.transformer_2) is ctx and ctx.num_steps() == 3
    # 3 steps x 2 CFG calls x 2 layers, over both experts; ceil(0.5 * 3) = 2 warm-up steps.
    assert [(s, r) for layer, s, r in rec.calls if layer == 0] == [
        (0, "warmup"), (0, "warmup"), (1, "warmup"), (1, "warmup"), (2, ""), (2, "")]
    _generate(pipe)  # a second generation starts again at step 0
    assert [s for layer, s, _ in rec.calls if layer == 0][6:] == [0, 0, 1, 1, 2, 2]
    integration.disable(pipe)
    assert (out - ref).abs().max() <= 1e-5
    assert torch.equal(_generate(pipe), ref)


# --- training and compilation ------------------------------------------------------------------
def test_gradient_checkpointing_and_batch(seed):
    model = tiny_wan_transformer(seed=seed % 1000)
    inputs = tiny_inputs("wan", GRID, batch=2, seed=seed)

    def grads(proc):
        model.zero_grad()
        if proc is not None:
            integration.enable(model, proc)
        out = model(**inputs).sample
        out.square().mean().backward()
        integration.disable(model)
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    ref = grads(None)
    model.enable_gradient_checkpointing()
    dense = grads(P.VMoBAProcessor(topk=1000, stats=True))
    assert max((a - b).abs().max().item() for a, b in zip(dense, ref)) <= 1e-5
    proc = P.VMoBAProcessor(**SPARSE, stats=True)
    sparse = grads(proc)
    assert len(sparse) == len(ref) and all(torch.isfinite(g).all() for g in sparse)
    assert max((a - b).abs().max().item() for a, b in zip(sparse, ref)) > 1e-6
    # recomputation in backward does not log the calls twice
    assert len(proc.stats.records) == 2


def test_torch_compile(wan):
    """torch.compile (aot_eager: AOTAutograd tracing, cheap on CPU) with a dense warm-up step
    then sparse steps: same output as eager, and the sparse path ran in the compiled model."""
    model, inputs = wan
    proc = P.GNAProcessor(window=2, stride=1, dense_steps=1, stats=True)
    integration.enable(model, proc)
    eager = [_forward(model, inputs, t) for t in (900, 600)]
    proc.stats.clear()
    compiled = torch.compile(model, backend="aot_eager")
    got = [_forward(compiled, inputs, t) for t in (900, 600)]
    integration.disable(model)
    for a, b in zip(got, eager):
        assert (a - b).abs().max() <= 1e-5
    assert (eager[1] - _forward(model, inputs, 600)).abs().max() > 1e-4, "step 1 was not sparse"
    recs = [(r.step, r.method, r.density < 1) for r in proc.stats.records]
    assert recs == [(0, "dense", False)] * 2 + [(1, "gna", True)] * 2


def test_enable_compiled_transformer(pipes):
    """``pipe.transformer = torch.compile(pipe.transformer)`` (the usual diffusers recipe), then
    ``enable`` on the pipeline or on the compiled transformer: the hook and the bindings go on
    the module it compiles, and ``disable`` takes them off again."""
    pipe = pipes[0]
    original = pipe.transformer
    pipe.transformer = torch.compile(original, backend="aot_eager")
    try:
        for target in (pipe, pipe.transformer):
            proc = P.DenseProcessor()
            ctx = integration.enable(target, proc)
            assert integration.get_context(original) is ctx
            assert all(block.attn1.processor is proc for block in original.blocks)
            integration.disable(target)
            assert integration.binding_of(original.blocks[0].attn1) is None
            assert not isinstance(original.blocks[0].attn1.processor, P.SparseProcessor)
    finally:
        pipe.transformer = original


@pytest.mark.slow  # compiles the transformer (about 8 s on 2 cores)
def test_set_attn_processor_then_compile(seed):
    """``set_attn_processor`` then ``torch.compile`` with no eager call first: the processor
    attaches itself from inside the compiled model (the stack walk runs eagerly) and gives what
    the eager model gives."""
    model = tiny_wan_transformer(seed=seed % 1000)
    twin = tiny_wan_transformer(seed=seed % 1000)  # same weights
    inputs = tiny_inputs("wan", GRID, seed=seed)
    proc = P.GNAProcessor(window=2, stride=1, stats=True)
    model.set_attn_processor(proc)
    compiled = _forward(torch.compile(model, backend="aot_eager"), inputs, 900)
    twin.set_attn_processor(P.GNAProcessor(window=2, stride=1))
    eager = _forward(twin, inputs, 900)
    assert integration.get_context(model).grid == GRID
    assert [(r.layer, r.method) for r in proc.stats.records] == [(0, "gna"), (1, "gna")]
    assert (compiled - eager).abs().max() <= 1e-5
    integration.disable(model)
    integration.disable(twin)
