"""Processors in every supported model family (tiny random models, float32, CPU).

For each family: a density-1 configuration of every processor reproduces the model's own
processors (max abs diff <= 1e-5); a sparse configuration changes the output, really runs the
sparse path (stats density < 1) and ``disable`` restores bit-identical dense output.
"""

from __future__ import annotations

import pytest
import torch

import vdiff_sparse.processors as P
from vdiff_sparse import context, integration
from vdiff_sparse.tiny_models import (
    tiny_cogvideox_transformer,
    tiny_hunyuan_video_transformer,
    tiny_inputs,
    tiny_ltx_transformer,
    tiny_mochi_transformer,
    tiny_wan_transformer,
)

TOL = 1e-5

# (id, input family, builder); Wan T2V/I2V/fused, CogVideoX with/without RoPE and patch_size_t.
MODELS = [
    ("wan_t2v", "wan", lambda s: tiny_wan_transformer(seed=s)),
    ("wan_i2v", "wan_i2v", lambda s: tiny_wan_transformer(i2v=True, seed=s)),
    ("wan_fused", "wan", lambda s: _fused(tiny_wan_transformer(seed=s))),
    ("hunyuan_video", "hunyuan_video", lambda s: tiny_hunyuan_video_transformer(seed=s)),
    ("cogvideox_rope", "cogvideox", lambda s: tiny_cogvideox_transformer(seed=s)),
    ("cogvideox_norope", "cogvideox", lambda s: tiny_cogvideox_transformer(rope=False, seed=s)),
    ("cogvideox_pt2", "cogvideox", lambda s: tiny_cogvideox_transformer(patch_size_t=2, seed=s)),
    ("ltx", "ltx", lambda s: tiny_ltx_transformer(seed=s)),
    ("mochi", "mochi", lambda s: tiny_mochi_transformer(seed=s)),
]

# Ragged grids: not multiples of any block size used below.
GRIDS = {"wan_t2v": (3, 5, 7), "wan_i2v": (2, 3, 5), "wan_fused": (3, 4, 5), "hunyuan_video": (3, 3, 5),
         "cogvideox_rope": (2, 3, 5), "cogvideox_norope": (3, 4, 4), "cogvideox_pt2": (2, 3, 4),
         "ltx": (3, 5, 6), "mochi": (2, 5, 5)}


def _fused(model):
    model.fuse_qkv_projections()
    return model


def dense_configs(grid):
    """Density-1 configurations of every processor (each exercising its plan path) on ``grid``."""
    return {
        "dense_sdpa": P.DenseProcessor(),
        "dense_plan": P.DenseProcessor(backend="torch", block=16),
        "vmoba": P.VMoBAProcessor(topk=1000, block_1d=1, block_2d=(2, 3), block_3d=(2, 2, 3), query_block=16),
        "psa": P.PSAProcessor(mode="quantile", fractions={1: 1.0}, block_q=16, block_k=8, dense_steps=0),
        "gna": P.GNAProcessor(window=grid, stride=1, backend="torch"),
    }


def sparse_configs():
    return {
        "vmoba": P.VMoBAProcessor(topk=1, block_1d=1, block_2d=(2, 2), block_3d=(1, 2, 2), query_block=16, stats=True),
        "psa": P.PSAProcessor(mode="quantile", fractions={1: 0.3, 2: 0.2}, block_q=8, block_k=8, reorder="tile",
                              dense_steps=0, stats=True),
        "gna": P.GNAProcessor(window=(2, 2, 3), stride=1, stats=True),
    }


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


@pytest.fixture(params=MODELS, ids=[m[0] for m in MODELS])
def model_case(request, seed):
    name, family, build = request.param
    model = build(seed % 1000)
    inputs = tiny_inputs(family, GRIDS[name], batch=2, seed=seed, model=model)
    return name, model, inputs


def test_density_one_matches_default(model_case):
    name, model, inputs = model_case
    # Both ways in where diffusers offers both; Mochi's transformer has no set_attn_processor.
    forms = ["enable"] + (["set_attn_processor"] if hasattr(model, "set_attn_processor") else [])
    ref = _run(model, inputs)
    for form in forms:
        for label, proc in dense_configs(GRIDS[name]).items():
            if form == "enable":
                integration.enable(model, proc)
            else:
                model.set_attn_processor(proc)
            out = _run(model, inputs)
            integration.disable(model)
            err = (out - ref).abs().max().item()
            assert err <= TOL, f"{name} {label} ({form}): max abs diff {err:.3g} > {TOL}"


def test_sparse_differs_and_disable_restores(model_case):
    name, model, inputs = model_case
    ref = _run(model, inputs)
    for label, proc in sparse_configs().items():
        integration.enable(model, proc)
        out = _run(model, inputs)
        integration.disable(model)
        summary = proc.stats.summary()
        assert summary["calls"] > 0, f"{name} {label}: the sparse path did not run"
        assert summary["density"] < 1.0, f"{name} {label}: density {summary['density']}"
        assert {r.method for r in proc.stats.records} == {label}
        assert (out - ref).abs().max().item() > 1e-4, f"{name} {label}: sparse output equals dense"
        assert torch.equal(_run(model, inputs), ref), f"{name} {label}: disable did not restore dense"
        assert all(not hasattr(m, context._BINDING) for m in model.modules())


class CountingProcessor(P.DenseProcessor):
    """Dense, recording which layer indices reach the video attention."""

    def __init__(self):
        super().__init__()
        self.layers = []

    def attention(self, q, k, v, grid, layer, **kwargs):
        self.layers.append(layer)
        return super().attention(q, k, v, grid, layer, **kwargs)


def test_only_video_self_attention_is_routed(model_case):
    """Cross-attention, text refiners and I2V image K/V keep the model's processor: exactly one
    video attention call per video self-attention layer, indices 0..L-1."""
    name, model, inputs = model_case
    proc = CountingProcessor()
    integration.enable(model, proc)
    _run(model, inputs)
    bindings = [integration.binding_of(m) for m in model.modules() if integration.binding_of(m) is not None]
    n_video = sum(b.index is not None for b in bindings)
    integration.disable(model)
    assert n_video >= 2
    assert proc.layers == list(range(n_video)), f"{name}: video calls {proc.layers}"
    assert all(not isinstance(b.dense_processor, P.SparseProcessor) for b in bindings)


@pytest.mark.parametrize("name", ["hunyuan_video", "mochi"])
def test_padded_text_keys_are_masked(name, seed):
    """HunyuanVideo and Mochi pad the text: with each sparse processor, the values of the padded
    text tokens (mask False, second sample) do not reach the video output, while the same
    change with those tokens unmasked does."""
    family, build = next((f, b) for n, f, b in MODELS if n == name)
    model = build(seed % 1000)
    inputs = tiny_inputs(family, GRIDS[name], batch=2, seed=seed, model=model)
    mask = inputs["encoder_attention_mask"].bool()
    assert not mask[1].all() and mask[0].all()
    changed = inputs["encoder_hidden_states"].clone()
    changed[~mask] = 10 * torch.randn_like(changed[~mask])
    for label, proc in sparse_configs().items():
        integration.enable(model, proc)
        out = _run(model, inputs)
        out_changed = _run(model, {**inputs, "encoder_hidden_states": changed})
        if label == "gna":  # control, once: unmasked, the same change reaches the video
            unmasked = {**inputs, "encoder_attention_mask": torch.ones_like(inputs["encoder_attention_mask"])}
            diff = _run(model, {**unmasked, "encoder_hidden_states": changed}) - _run(model, unmasked)
            assert diff[1].abs().max().item() > 1e-3, f"{name}: the padded tokens never mattered"
        integration.disable(model)
        assert proc.stats.summary()["density"] < 1.0, f"{name} {label}: the sparse path did not run"
        err = (out_changed - out).abs().max().item()
        assert err <= TOL, f"{name} {label}: padded text keys changed the video by {err:.3g}"
