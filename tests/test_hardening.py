"""Bad input gets a clear error that names the value and what would be valid; nothing is
silently wrong. One test per case found by a hostile review (each failed before its fix)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_qkv
from vdiff_sparse import (
    GNAProcessor,
    PSAConfig,
    PSAProcessor,
    VMoBAConfig,
    VMoBAProcessor,
    dense_attention,
    gna_attention,
    integration,
    plan_gna,
    psa_attention,
    vmoba_attention,
)
from vdiff_sparse.attention import run_plan
from vdiff_sparse.plan import dense_plan
from vdiff_sparse.processors import ScheduleConfig
from vdiff_sparse.tiny_models import tiny_inputs, tiny_wan_transformer

GRID = (2, 4, 6)
N = math.prod(GRID)


# --- silently wrong before ------------------------------------------------------------------------
def test_a_window_without_a_stride_means_neighbourhood_attention():
    # The method defaults have stride (16, 8, 8); a window of 3 frames made that an error.
    proc = GNAProcessor(window=(3, 9, 9))
    assert proc.config.window == (3, 9, 9) and proc.config.stride == 1
    assert GNAProcessor(window=(3, 9, 9), stride=(1, 3, 3)).config.stride == (1, 3, 3)
    preset = GNAProcessor(preset="wan2.1-1.3b", window=(3, 9, 9))
    assert preset.config.stride == 1
    # per-layer overrides follow the same rule over the processor's settings
    layered = GNAProcessor(window=(4, 8, 8), stride=(2, 4, 4), layers={1: {"window": (3, 5, 5)}})
    assert layered.config_for(1).stride == 1 and layered.config_for(0).stride == (2, 4, 4)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -0.1, 0.0])
@pytest.mark.parametrize("method", ["psa", "gna", "vmoba", "dense"])
def test_bad_scale_is_refused(method, scale):
    q, k, v = random_qkv(1, N, 2, 8)
    call = {
        "psa": lambda: psa_attention(q, k, v, GRID, block_q=8, block_k=8, scale=scale),
        "gna": lambda: gna_attention(q, k, v, GRID, window=2, scale=scale),
        "vmoba": lambda: vmoba_attention(q, k, v, GRID, block_3d=(1, 2, 2), scale=scale),
        "dense": lambda: dense_attention(q, k, v, scale=scale),
    }[method]
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0"):
        call()


@pytest.mark.parametrize("bad", ["extra_k", "extra_v"])
def test_non_finite_text_keys_are_refused(bad):
    q, k, v = random_qkv(1, N, 2, 8)
    ek, ev, _ = random_qkv(1, 3, 2, 8, seed=1)
    extras = {"extra_k": ek, "extra_v": ev}
    extras[bad] = extras[bad].clone()
    extras[bad][0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"{bad} contains 1 NaN/Inf"):
        gna_attention(q, k, v, GRID, window=2, **extras)
    with pytest.raises(ValueError, match=rf"{bad} contains 1 NaN/Inf"):
        run_plan(q, k, v, dense_plan(N, 8), **extras)
    with pytest.raises(ValueError, match=rf"{bad} contains 1 NaN/Inf"):
        dense_attention(q, k, v, **extras)


def test_run_plan_and_dense_attention_check_q_k_v():
    q, k, v = random_qkv(1, N, 2, 8)
    v = v.clone()
    v[0, 3, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="v contains 1 NaN/Inf"):
        run_plan(q, k, v, dense_plan(N, 8))
    with pytest.raises(ValueError, match="v contains 1 NaN/Inf"):
        dense_attention(q, k, v)


@pytest.mark.parametrize("schedule, match", [
    ({"dense_layers": [99]}, r"dense_layers \[99\]: the model has 2 video self-attention layers"),
    ({"dense_layers": [-3]}, r"dense_layers \[-3\]: the model has 2"),
    ({"layers": {50: {"window": 2}}}, r"layers keys \[50\]: the model has 2"),
])
def test_layers_the_model_does_not_have_are_refused(schedule, match):
    model = tiny_wan_transformer(seed=0)  # 2 layers
    integration.enable(model, GNAProcessor(window=2, **schedule))
    try:
        with pytest.raises(ValueError, match=match):
            with torch.no_grad():
                model(**tiny_inputs("wan", (2, 4, 6)), return_dict=False)
    finally:
        integration.disable(model)


def test_a_window_clipped_to_the_whole_grid_is_an_error_not_dense_attention():
    model = tiny_wan_transformer(seed=0)
    inputs = tiny_inputs("wan", (2, 4, 6))
    integration.enable(model, GNAProcessor(window=(18, 24, 24), stride=1))
    try:
        with pytest.raises(ValueError, match=r"GNA window \(18, 24, 24\) covers the whole latent grid \(2, 4, 6\)"):
            with torch.no_grad():
                model(**inputs, return_dict=False)
        # A window clipped on some axes only stays sparse; one equal to the grid is meant.
        integration.enable(model, GNAProcessor(window=(18, 2, 24), stride=1, stats=True))
        with torch.no_grad():
            model(**inputs, return_dict=False)
    finally:
        integration.disable(model)


def test_editing_a_returned_plan_does_not_change_later_calls():
    q, k, v = random_qkv(1, N, 2, 8)
    first, plan = gna_attention(q, k, v, GRID, window=2, return_plan=True)
    plan.kv_index.fill_(0)
    plan.info["dense"] = True
    plan_gna(GRID, 2).kv_index.fill_(-1)
    again = gna_attention(q, k, v, GRID, window=2)
    assert torch.equal(first, again)


@pytest.mark.parametrize("kwargs, match", [
    ({"causal": 2}, r"causal entries must be True or False"),
    ({"window": 2.5}, r"window entries must be ints"),
    ({"window": "3"}, r"window must be a int or a tuple"),
])
def test_per_axis_values_are_not_coerced(kwargs, match):
    q, k, v = random_qkv(1, N, 2, 8)
    with pytest.raises(ValueError, match=match):
        gna_attention(q, k, v, GRID, **{"window": 2, **kwargs})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1, 1.5, True, "2"])
def test_dense_steps_must_be_a_count_or_a_fraction(value):
    with pytest.raises(ValueError, match=r"dense_steps must be 0, an int >= 1 \(steps\) or a fraction in \(0, 1\)"):
        ScheduleConfig(dense_steps=value)


# --- obscure errors before ------------------------------------------------------------------------
def test_integer_empty_and_scattered_inputs_are_named():
    q, k, v = random_qkv(1, N, 2, 8)
    with pytest.raises(ValueError, match="q must be a floating-point tensor"):
        gna_attention(q.long(), k.long(), v.long(), GRID, window=2)
    empty = torch.zeros(0, N, 2, 8)
    with pytest.raises(ValueError, match=r"q has an empty dimension: shape \(0, 48, 2, 8\)"):
        psa_attention(empty, empty, empty, GRID)
    no_heads = torch.zeros(1, N, 0, 8)
    with pytest.raises(ValueError, match="empty dimension"):
        vmoba_attention(no_heads, no_heads, no_heads, GRID)
    meta = v.to("meta")
    with pytest.raises(ValueError, match="q, k, v must be on one device"):
        gna_attention(q, k, meta, GRID, window=2)


def test_configs_of_other_methods_and_mappings():
    q, k, v = random_qkv(1, N, 2, 8)
    out = psa_attention(q, k, v, GRID, config={"block_q": 8, "block_k": 8, "mode": "quantile",
                                                "fractions": {1: 0.5}})
    assert out.shape == q.shape
    with pytest.raises(ValueError, match=r"config must be a PSAConfig, a mapping of its fields or None, got VMoBAConfig"):
        psa_attention(q, k, v, GRID, config=VMoBAConfig())
    with pytest.raises(ValueError, match=r"config must be a VMoBAConfig.*got PSAConfig"):
        vmoba_attention(q, k, v, GRID, config=PSAConfig())


@pytest.mark.parametrize("value", [("a", 2, 2), (1.5, 2, 2), (0, 2, 2), (2, 2)])
def test_block_tuples_name_the_field(value):
    with pytest.raises(ValueError, match=r"block_3d must be a tuple of 3 positive ints"):
        VMoBAConfig(block_3d=value)


@pytest.mark.parametrize("layers", [{"a": {}}, {-1: {}}, {0: "dense"}, [0]])
def test_schedule_layers_must_map_indices_to_overrides(layers):
    with pytest.raises(ValueError, match=r"layers (must map layer indices|values must be mappings)"):
        ScheduleConfig(layers=layers)


@pytest.mark.parametrize("cls", [GNAProcessor, PSAProcessor, VMoBAProcessor])
def test_processor_backend_is_checked_when_made(cls):
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'reference', 'torch', 'triton'\], got 'cuda'"):
        cls(backend="cuda")
