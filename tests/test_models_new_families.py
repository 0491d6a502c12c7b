"""Processors in the newer diffusers video transformers (tiny random models built from each
model's own config class, float32, CPU): SkyReels-V2, Wan VACE, ChronoEdit, Wan-Animate,
HunyuanVideo 1.5, HunyuanVideo-FramePack, LTX-2 (2.0 and the 2.x options), Kandinsky 5, Cosmos.

For each: every processor at density 1 reproduces the model's own processors (relative error
<= 1e-5), through ``enable`` and through the plain diffusers call; a sparse setting changes the
output, stays finite and really runs sparse; ``disable`` restores the model's processors and its
output bit for bit; only video self-attention reaches the method. Every other video transformer
of the installed diffusers is refused by name on both paths (``tests/test_models_refused.py``).
"""

from __future__ import annotations

import math

import pytest
import test_processors_models as existing_families
import torch
from test_processors_models import dense_configs, sparse_configs

import vdiff_sparse.processors as P
import vdiff_sparse.tiny_models as tm
from vdiff_sparse import integration

REL_TOL = 1e-5


def _ltx2x(seed):
    """LTX-2.x options: perturbed attention (spatio-temporal guidance), per-head gates, split
    RoPE, prompt modulation."""
    return tm.tiny_ltx2_transformer(seed=seed, perturbed_attn=True, gated_attn=True, audio_gated_attn=True,
                                    cross_attn_mod=True, audio_cross_attn_mod=True, rope_type="split")


# (id, input kind, builder, extra forward inputs). Ragged grids: not multiples of the blocks used.
MODELS = [
    ("skyreels_v2", "skyreels_v2", lambda s: tm.tiny_skyreels_v2_transformer(seed=s), {}),
    ("wan_vace", "wan_vace", lambda s: tm.tiny_wan_vace_transformer(seed=s), {}),
    ("chronoedit", "chronoedit", lambda s: tm.tiny_chronoedit_transformer(seed=s), {}),
    ("wan_animate", "wan_animate", lambda s: tm.tiny_wan_animate_transformer(seed=s), {}),
    ("hunyuan_video15", "hunyuan_video15", lambda s: tm.tiny_hunyuan_video15_transformer(seed=s), {}),
    ("hunyuan_video15_i2v", "hunyuan_video15", lambda s: tm.tiny_hunyuan_video15_transformer(seed=s, task_type="i2v"),
     {"image_embeds": torch.ones(2, 3, 12)}),
    ("framepack", "hunyuan_video_framepack", lambda s: tm.tiny_hunyuan_video_framepack_transformer(seed=s), {}),
    ("ltx2", "ltx2", lambda s: tm.tiny_ltx2_transformer(seed=s), {}),
    ("ltx2x_stg", "ltx2", _ltx2x, {"spatio_temporal_guidance_blocks": [1], "perturbation_mask": torch.tensor([0.0, 1.0])}),
    ("kandinsky5", "kandinsky5", lambda s: tm.tiny_kandinsky5_transformer(seed=s), {}),
    ("cosmos", "cosmos", lambda s: tm.tiny_cosmos_transformer(seed=s), {}),
]
GRIDS = {"skyreels_v2": (3, 3, 5), "wan_vace": (2, 3, 5), "chronoedit": (2, 3, 4), "wan_animate": (3, 3, 4),
         "hunyuan_video15": (3, 3, 5), "hunyuan_video15_i2v": (2, 4, 5), "framepack": (3, 3, 4), "ltx2": (3, 4, 5),
         "ltx2x_stg": (2, 4, 5), "kandinsky5": (3, 3, 5), "cosmos": (3, 4, 4)}


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def _set_plainly(model, processor):
    """The plain diffusers way: ``set_attn_processor``, or the processor on every attention
    module for models without it (HunyuanVideo-FramePack, Cosmos)."""
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(processor)
        return
    for module in model.modules():
        if hasattr(module, "set_processor") and hasattr(module, "processor"):
            module.set_processor(processor)


def _rel_err(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(params=MODELS, ids=[m[0] for m in MODELS])
def model_case(request, seed):
    name, kind, build, extra = request.param
    model = build(seed % 1000)
    inputs = {**tm.tiny_video_inputs(kind, GRIDS[name], batch=2, seed=seed), **extra}
    return name, model, inputs


def test_density_one_matches_default(model_case):
    name, model, inputs = model_case
    ref = _run(model, inputs)
    for form in ("enable", "plain"):
        for label, proc in dense_configs(GRIDS[name]).items():
            if form == "enable":
                integration.enable(model, proc)
            else:
                _set_plainly(model, proc)
            out = _run(model, inputs)
            integration.disable(model)
            err = _rel_err(out, ref)
            assert err <= REL_TOL, f"{name} {label} ({form}): relative error {err:.3g} > {REL_TOL}"


def test_sparse_differs_and_disable_restores(model_case):
    """As for the other families (each sparse setting runs sparse, changes the output, and
    ``disable`` restores it bit for bit), and: the sparse output is finite, the modules have
    their own processor classes back."""
    name, model, inputs = model_case
    own = {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
    existing_families.test_sparse_differs_and_disable_restores(model_case)
    for label, proc in sparse_configs().items():
        integration.enable(model, proc)
        out = _run(model, inputs)
        integration.disable(model)
        assert torch.isfinite(out).all(), f"{name} {label}: non-finite output"
    assert {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")} == own


class CountingProcessor(P.DenseProcessor):
    """Dense, recording the layer index and the query / extra key counts of every video call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def attend_layer(self, q, k, v, extra_k=None, extra_v=None, extra_mask=None, **kwargs):
        self.calls.append((kwargs["binding"].index, q.shape[1], 0 if extra_k is None else extra_k.shape[1]))
        return super().attend_layer(q, k, v, extra_k, extra_v, extra_mask, **kwargs)


def test_only_video_self_attention_is_routed(model_case):
    """Cross-attention, text refiners and encoders, audio and cross-modal attention, the face
    adapter keep the model's processor: one video call per video self-attention layer, with
    the grid's tokens as queries."""
    name, model, inputs = model_case
    proc = CountingProcessor()
    integration.enable(model, proc)
    _run(model, inputs)
    bindings = [integration.binding_of(m) for m in model.modules() if integration.binding_of(m) is not None]
    integration.disable(model)
    n_video = sum(b.index is not None for b in bindings)
    assert n_video >= 2 and n_video < len(bindings), f"{name}: {n_video} of {len(bindings)} modules are video"
    assert sorted(layer for layer, _, _ in proc.calls) == list(range(n_video)), f"{name}: {proc.calls}"
    assert {n for _, n, _ in proc.calls} == {math.prod(GRIDS[name])}
    assert all(not isinstance(b.dense_processor, P.SparseProcessor) for b in bindings)


def test_wan_vace_control_blocks_are_sparse(seed):
    """VACE's control blocks attend over the same grid: numbered after the main blocks."""
    model = tm.tiny_wan_vace_transformer(seed=seed % 1000)
    integration.enable(model, P.DenseProcessor())
    index = {n: integration.binding_of(m).index for n, m in model.named_modules() if integration.binding_of(m)}
    integration.disable(model)
    assert [index[f"blocks.{i}.attn1"] for i in range(3)] == [0, 1, 2]
    assert [index[f"vace_blocks.{i}.attn1"] for i in range(2)] == [3, 4]
    assert index["blocks.0.attn2"] is None and index["vace_blocks.0.attn2"] is None


def test_framepack_history_tokens_are_extra_keys(seed):
    """FramePack: the grid is the noisy latents (the last tokens of the image stream); the
    packed history (1 clean frame, 2x and 4x compressed frames) and the text are extra keys of
    every video query, and the history reaches the sparse output."""
    model = tm.tiny_hunyuan_video_framepack_transformer(seed=seed % 1000)
    grid = (2, 3, 4)
    inputs = tm.tiny_video_inputs("hunyuan_video_framepack", grid, batch=1, seed=seed)
    proc = CountingProcessor()
    integration.enable(model, proc)
    _run(model, inputs)
    # History tokens after the patch embeddings: clean (1, 3, 4); 2x of (2, 6, 8) -> (1, 2, 2);
    # 4x of (4, 6, 8) padded to (4, 8, 8) -> (1, 1, 1). Text: 8 tokens + 4 image tokens.
    history, context_tokens = 12 + 4 + 1, tm.TEXT_LEN + 4
    assert {(n, extra) for _, n, extra in proc.calls} == {(math.prod(grid), history + context_tokens)}
    sparse = P.GNAProcessor(window=(1, 1, 2), stride=1)
    integration.enable(model, sparse)
    out = _run(model, inputs)
    changed = _run(model, {**inputs, "latents_history_4x": 3 * inputs["latents_history_4x"]})
    integration.disable(model)
    assert (out - changed).abs().max() > 1e-4, "the 4x history did not reach the output"


def test_ltx2_guidance_perturbation_on_the_sparse_path(seed):
    """LTX-2.x spatio-temporal guidance: in the perturbed block, perturbed samples take the
    values instead of attention whatever the method; the other samples attend sparsely."""
    model = _ltx2x(seed % 1000)
    inputs = tm.tiny_video_inputs("ltx2", (2, 4, 5), batch=2, seed=seed)
    stg = {**inputs, "spatio_temporal_guidance_blocks": [0, 1], "perturbation_mask": torch.tensor([0.0, 1.0])}
    ref = _run(model, stg)
    integration.enable(model, P.GNAProcessor(window=(1, 2, 2), stride=1))
    out = _run(model, stg)
    integration.disable(model)
    assert (out[0] - ref[0]).abs().max() <= 1e-5 * ref.abs().max(), "perturbed sample changed"
    assert (out[1] - ref[1]).abs().max() > 1e-4, "unperturbed sample was not sparse"


@pytest.mark.parametrize("case", ["skyreels_causal", "kandinsky_nabla"])
def test_refused_inputs_name_the_reason(case, seed):
    """Inputs a sparse method cannot honour are refused with the reason (SkyReels-V2's
    frame-block causal mask, Kandinsky 5's own NABLA attention); a dense layer runs the model's
    processor."""
    grid = (4, 2, 3)
    if case == "skyreels_causal":
        model = tm.tiny_skyreels_v2_transformer(seed=seed % 1000, num_frame_per_block=2)
        inputs = tm.tiny_video_inputs("skyreels_v2", grid, seed=seed)
        says = r"'blocks.0.attn1'.*attention_mask of shape \(1, 1, 24, 24\) \(SkyReels-V2's frame-block causal mask"
    else:
        model = tm.tiny_kandinsky5_transformer(seed=seed % 1000)
        inputs = tm.tiny_video_inputs("kandinsky5", grid, seed=seed)
        inputs["sparse_params"] = {"to_fractal": False, "sta_mask": torch.ones(1, 1, 1, 1, dtype=torch.bool), "P": 0.9}
        says = r"'visual_transformer_blocks.0.self_attention'.*sparse_params \(the model's own NABLA"
    integration.enable(model, P.GNAProcessor(window=2, stride=1))
    with pytest.raises(NotImplementedError, match=says):
        _run(model, inputs)
    if case == "skyreels_causal":  # NABLA needs FlexAttention's compiled kernels: not run here
        ref = _run(tm.tiny_skyreels_v2_transformer(seed=seed % 1000, num_frame_per_block=2), inputs)
        integration.enable(model, P.GNAProcessor(window=2, stride=1, dense_layers=[0, 1]))
        assert torch.equal(_run(model, inputs), ref)
    integration.disable(model)


@pytest.mark.parametrize("name", [m[0] for m in MODELS if m[0] in ("hunyuan_video15", "framepack", "ltx2", "kandinsky5",
                                                                    "cosmos", "wan_vace")])
def test_step_counting(name, seed):
    """The forward pre-hook reads each model's timestep: one step per distinct noise level."""
    _, kind, build, extra = next(m for m in MODELS if m[0] == name)
    model = build(seed % 1000)
    inputs = {**tm.tiny_video_inputs(kind, GRIDS[name], seed=seed), **extra}
    steps = []

    class StepSpy(P.DenseProcessor):
        def attend_layer(self, q, k, v, extra_k=None, extra_v=None, extra_mask=None, **kwargs):
            if kwargs["binding"].index == 0:
                steps.append(kwargs["binding"].context.step)
            return super().attend_layer(q, k, v, extra_k, extra_v, extra_mask, **kwargs)

    integration.enable(model, StepSpy())
    for t in (900.0, 900.0, 600.0, 300.0, 950.0):
        _run(model, {**inputs, "timestep": torch.full_like(inputs["timestep"], t)})
    integration.disable(model)
    assert steps == [0, 0, 1, 2, 0]


@pytest.mark.parametrize("preset, kind", [
    ("hunyuanvideo-1.5", "hunyuan_video15"), ("hunyuanvideo-framepack", "hunyuan_video_framepack"), ("ltx-2", "ltx2"),
    ("kandinsky-5-video", "kandinsky5"), ("cosmos-predict2", "cosmos"), ("skyreels-v2-540p", "skyreels_v2"),
])
def test_model_presets_of_the_new_families(preset, kind, seed):
    """Each new preset runs in its family's model (every method; GNA with a window that fits the
    tiny grid, which the preset's window would cover whole: an error, not dense attention) and
    is refused in another family's."""
    model = getattr(tm, f"tiny_{kind}_transformer")(seed=seed % 1000)
    inputs = tm.tiny_video_inputs(kind, (3, 4, 5), seed=seed)
    for proc in (P.PSAProcessor(preset=preset, dense_steps=0), P.VMoBAProcessor(preset=preset, dense_steps=0),
                 P.GNAProcessor(preset=preset, dense_steps=0, window=(2, 3, 3))):
        integration.enable(model, proc)
        assert torch.isfinite(_run(model, inputs)).all(), f"{preset} {type(proc).__name__}"
    integration.enable(model, P.GNAProcessor(preset=preset, dense_steps=0))
    with pytest.raises(ValueError, match="covers the whole latent grid"):
        _run(model, inputs)
    integration.disable(model)
    other = tm.tiny_cosmos_transformer(seed=0) if kind != "cosmos" else tm.tiny_ltx2_transformer(seed=0)
    with pytest.raises(ValueError, match=f"preset='{preset}'\\): that preset is for"):
        integration.enable(other, P.GNAProcessor(preset=preset))
