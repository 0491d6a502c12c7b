"""A fourth method needs one method file and its YAML, nothing else: a toy method registered here
(a 1D band of key blocks around each query block) appears in the CLI's ``--attn`` choices,
fine-tuning's ``sparse.method``, the processors and per-layer schedules, and runs in a model."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from conftest import assert_close, random_qkv
from vdiff_sparse import integration
from vdiff_sparse.attention import run_plan
from vdiff_sparse.checks import check_positive_int, check_qkv
from vdiff_sparse.layout import uniform_offsets
from vdiff_sparse.methods import get_method, method_names, register_method, unregister_method
from vdiff_sparse.methods.registry import Method
from vdiff_sparse.plan import AttentionPlan, pack_block_selection
from vdiff_sparse.processors import GNAProcessor, processor_class
from vdiff_sparse.tiny_models import tiny_inputs, tiny_wan_transformer


# --- the toy method: everything a method file holds ---------------------------------------------
@dataclass
class BandConfig:
    """Each query block attends the key blocks within ``reach`` blocks of it (frame-major order).

    Attributes:
        block: tokens per block.
        reach: blocks on each side.
    """

    block: int = 16
    reach: int = 1

    def __post_init__(self) -> None:
        check_positive_int("block", self.block)
        if isinstance(self.reach, bool) or not isinstance(self.reach, int) or self.reach < 0:
            raise ValueError(f"reach must be an int >= 0, got {self.reach!r}")


def plan_band(q, k, grid, config=None, *, layer_index=0, scale=None) -> AttentionPlan:
    config = get_method("band").make_config(config)
    check_qkv(q, k, k, grid)
    offsets = uniform_offsets(q.shape[1], config.block).to(q.device)
    n = offsets.numel() - 1
    i = torch.arange(n, device=q.device)
    kv_index, _ = pack_block_selection(((i[:, None] - i[None, :]).abs() <= config.reach)[None, None])
    return AttentionPlan(None, offsets, offsets, kv_index, method="band")


def band_attention(q, k, v, grid, config=None, *, layer_index=0, extra_k=None, extra_v=None, extra_mask=None,
                   scale=None, backend="auto", return_plan=False, **overrides):
    config = get_method("band").make_config(config, **overrides)
    plan = plan_band(q, k, grid, config)
    out = run_plan(q, k, v, plan, extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask, scale=scale,
                   backend=backend)
    return (out, plan) if return_plan else out


def band_mask(n: int, config: BandConfig) -> torch.Tensor:
    """The definition: token ``i`` attends ``j`` iff their blocks are at most ``reach`` apart."""
    blocks = torch.arange(n) // config.block
    return (blocks[:, None] - blocks[None, :]).abs() <= config.reach


@pytest.fixture
def band(tmp_path):
    defaults = tmp_path / "band.yaml"
    defaults.write_text("config:\n  block: 8\n  reach: 1\nschedule:\n  dense_steps: 0\n  dense_layers: []\n")
    method = register_method(Method(name="band", config_cls=BandConfig, attention=band_attention, plan=plan_band,
                                    summary="the key blocks near its own block", defaults=defaults,
                                    processor_name="BandProcessor"))
    yield method
    unregister_method("band")


# --- where it shows up --------------------------------------------------------------------------
def test_registered_method_is_listed_and_named_errors_list_it(band):
    assert "band" in method_names()
    with pytest.raises(ValueError, match=r"unknown attention method 'bnad'.*'band'"):
        get_method("bnad")
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method(name="band", config_cls=BandConfig, attention=band_attention, plan=plan_band,
                               summary="another band"))


def test_functional_call_matches_its_definition(band):
    q, k, v = random_qkv(2, 60, 2, 8, dtype=torch.float64)
    out = band_attention(q, k, v, (3, 4, 5), block=8, reach=1, backend="torch")
    from vdiff_sparse.backends.reference import masked_attention

    assert_close(out, masked_attention(q, k, v, band_mask(60, BandConfig(8, 1))), torch.float64)


def test_processor_runs_in_a_model_and_reproduces_it_at_full_reach(band):
    cls = processor_class("band")
    assert cls.__name__ == "BandProcessor" and cls.method == "band"
    model = tiny_wan_transformer(seed=0)
    inputs = tiny_inputs("wan", (3, 4, 5), seed=0)
    with torch.no_grad():
        reference = model(**inputs, return_dict=False)[0]
        proc = cls(reach=1000, stats=True)  # every block: dense
        integration.enable(model, proc)
        full = model(**inputs, return_dict=False)[0]
        sparse_proc = cls(stats=True)  # the YAML defaults: block 8, reach 1
        integration.enable(model, sparse_proc)
        sparse = model(**inputs, return_dict=False)[0]
        integration.disable(model)
    assert sparse_proc.config == BandConfig(8, 1)
    assert_close(full, reference, torch.float32, "reach covering everything")
    assert proc.stats.records and all(r.method == "band" and r.density == 1.0 for r in proc.stats.records)
    assert all(r.density < 1 for r in sparse_proc.stats.records)
    assert not torch.allclose(sparse, reference) and torch.isfinite(sparse).all()


def test_another_processor_can_run_it_on_one_layer(band):
    proc = GNAProcessor(window=2, stride=1, layers={1: {"method": "band", "reach": 0}}, stats=True)
    model = tiny_wan_transformer(seed=0)
    integration.enable(model, proc)
    with torch.no_grad():
        model(**tiny_inputs("wan", (3, 4, 5), seed=0), return_dict=False)
    integration.disable(model)
    assert {r.layer: r.method for r in proc.stats.records} == {0: "gna", 1: "band"}
    assert proc.config_for(1) == BandConfig(8, 0)


def test_cli_offers_and_runs_it(band, tmp_path, capsys):
    from vdiff_sparse.cli import build_parser, main

    attn = next(a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
                if a.dest == "attn")
    assert "band" in attn.choices
    out = tmp_path / "band"
    assert main(["generate", "--attn", "band", "--out", str(out), "--frames", "5", "--height", "32", "--width", "48",
                 "--steps", "1", "--no-warmup", "reach=0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "band" and 0 < report["density"] < 1


def test_fine_tuning_accepts_it(band, tmp_path):
    from vdiff_sparse.pipelines import finetune as ft

    data = f"data.latents_dir={tmp_path}"
    config = ft.load_config("tiny_wan_vmoba", [data, "sparse.method=band", "sparse.options.band.reach=2"])
    processor = ft.training_processor(config.sparse)
    assert processor.method == "band" and processor.config == BandConfig(8, 2)
    with pytest.raises(ValueError, match="sparse.options.band"):
        ft.load_config("tiny_wan_vmoba", [data, "sparse.method=band", "sparse.options.band.reach=-1"])
