"""Generation: the pipeline wrapper, sizes, reports (PSNR / SSIM), plan pictures and the CLI
end to end on the built-in tiny model (small sizes, so the whole file stays fast)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from vdiff_sparse.cli import main
from vdiff_sparse.pipelines import GenerationResult, SparseVideoPipeline
from vdiff_sparse.pipelines.generate import SizeRules, fit_size, size_rules
from vdiff_sparse.pipelines.report import compare, psnr, report_markdown, ssim

# 5 frames x 32 x 48 px -> token grid 3 x 8 x 12 (ragged for every method's blocks).
# One step, no dense warm-up step, so that every method's sparse path runs.
SMALL = ["--frames", "5", "--height", "32", "--width", "48", "--steps", "1", "--no-warmup", "dense_steps=0"]
# The tiny model's GNA window (3 x 12 x 12 tokens) covers that whole grid; a smaller one is sparse.
SMALL_GNA_WINDOW = ["window=[3,4,4]", "stride=[1,4,4]", "tile=[1,4,4]"]


def read_video(path):
    import imageio.v2 as imageio

    with imageio.get_reader(path) as reader:  # its len() is inf, so no list(reader)
        return np.stack([frame for frame in reader.iter_data()])


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's tensors are far too small to gain from threads, and on a busy machine
    spinning OpenMP threads make its ops up to 10x slower (nothing here is timed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return SparseVideoPipeline.tiny(seed=0)


# --- SSIM / PSNR -------------------------------------------------------------------------------
def _naive_ssim(x: np.ndarray, y: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """SSIM of two [H, W] images, one window position at a time (the definition)."""
    r = np.arange(window) - (window - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - window + 1):
        for j in range(x.shape[1] - window + 1):
            a, b = x[i:i + window, j:j + window], y[i:i + window, j:j + window]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
            cov = (w * a * b).sum() - ma * mb
            values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def _video(rng, shape=(3, 19, 23, 3)):
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def test_ssim_matches_the_per_window_definition(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (17, 21)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 40, x.shape), 0, 255)
    got = ssim(x[None, :, :, None].astype(np.uint8), y[None, :, :, None].astype(np.uint8))
    want = _naive_ssim(x.astype(np.uint8).astype(np.float64), y.astype(np.uint8).astype(np.float64))
    assert got == pytest.approx(want, abs=1e-9)


def test_identical_videos_give_ssim_one_and_infinite_psnr(seed):
    x = _video(np.random.default_rng(seed))
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert psnr(x, x) == math.inf


def test_ssim_is_symmetric_at_most_one_and_falls_with_noise(seed):
    rng = np.random.default_rng(seed)
    x = _video(rng)
    scores = []
    for noise in (5, 20, 60):
        y = np.clip(x.astype(int) + rng.normal(0, noise, x.shape).round(), 0, 255).astype(np.uint8)
        assert ssim(x, y) == pytest.approx(ssim(y, x), abs=1e-12)
        scores.append(ssim(x, y))
    assert all(s < 1 for s in scores)
    assert scores[0] > scores[1] > scores[2]


def test_ssim_of_inverted_texture_is_negative(seed):
    x = _video(np.random.default_rng(seed))
    assert ssim(x, 255 - x) < 0


def test_psnr_of_a_constant_offset(seed):
    x = np.random.default_rng(seed).integers(0, 200, (2, 8, 9, 3)).astype(np.uint8)
    assert psnr(x, x + 10) == pytest.approx(20 * math.log10(255 / 10))


@pytest.mark.parametrize("shape", [(1, 5, 5, 3), (2, 4, 30, 1)], ids=["5x5", "4x30-gray"])
def test_ssim_takes_frames_smaller_than_the_window(shape, seed):
    x = _video(np.random.default_rng(seed), shape)
    assert ssim(x, x) == pytest.approx(1.0)
    assert ssim(x, 255 - x) < 0.5


@pytest.mark.parametrize("tflops, text", [(0.161, "161 GFLOP"), (13.6, "13.6 TFLOP"), (2e-6, "2 MFLOP"),
                                          (0.0, "0 FLOP")], ids=["giga", "tera", "mega", "zero"])
def test_report_writes_flops_in_the_unit_that_fits(tflops, text):
    from vdiff_sparse.pipelines.report import _flops

    assert _flops(tflops) == text


def test_fidelity_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        ssim(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 9, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[F, H, W, C\]"):
        psnr(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))


# --- sizes -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rules, given, want",
    [
        (SizeRules(4, 1, 16, 16, 16, 16), (81, 480, 832), (81, 480, 832)),
        (SizeRules(4, 1, 16, 16, 16, 16), (80, 470, 830), (81, 464, 832)),
        (SizeRules(4, 1, 16, 16, 16, 16), (2, 5, 9), (1, 16, 16)),
        (SizeRules(4, 2, 16, 16, 16, 16), (49, 64, 64), (53, 64, 64)),
        (SizeRules(2, 1, 16, 16, 4, 4), (6, 30, 50), (5, 32, 48)),
    ],
    ids=["wan-valid", "wan-round", "tiny-values", "patch_t-2", "light-vae"],
)
def test_fit_size_rounds_to_valid_sizes(rules, given, want):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fit_size(rules, *given)
    assert got == want
    assert rules.valid_frames(got[0]) and got[1] % rules.spatial_h == 0 and got[2] % rules.spatial_w == 0
    assert bool(caught) == (got != given)
    if caught:
        assert "rounded" in str(caught[0].message) and "frames = 1 + " in str(caught[0].message)


@pytest.mark.parametrize("bad", [(0, 32, 32), (5, -4, 32), (5, 32, 2.5)], ids=["frames0", "height-neg", "width-float"])
def test_fit_size_rejects_non_positive_sizes(bad):
    with pytest.raises(ValueError, match="positive integer"):
        fit_size(SizeRules(4, 1, 16, 16, 16, 16), *bad)


def test_size_rules_come_from_the_pipeline_config(tiny):
    from vdiff_sparse.tiny_models import tiny_wan_pipeline

    # Light VAE 2x, patch 2, but WanPipeline.check_inputs demands multiples of 16.
    assert size_rules(tiny.pipe) == SizeRules(2, 1, 16, 16, 4, 4)
    assert size_rules(tiny_wan_pipeline()) == SizeRules(4, 1, 16, 16, 16, 16)  # Wan's VAE 8x / 4x


def test_size_rules_of_mochi_read_its_own_attribute_names():
    """MochiPipeline names its VAE factors vae_spatial/temporal_scale_factor (8x / 6x)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

    from vdiff_sparse.tiny_models import tiny_mochi_transformer

    transformer = tiny_mochi_transformer()
    pipe = MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                         tokenizer=None, transformer=transformer)
    patch = transformer.config.patch_size
    assert size_rules(pipe) == SizeRules(6, 1, 8 * patch, 8 * patch, 8 * patch, 8 * patch)


# --- the Python API ----------------------------------------------------------------------------
def test_generation_results_and_their_comparison(tiny):
    size = dict(num_frames=5, height=32, width=48, num_inference_steps=1, seed=3)
    tiny.set_attn_processor(None)
    own = tiny("a dog runs in the snow", **size)
    tiny.set_attn_processor(tiny.make_processor("dense"))
    dense = tiny("a dog runs in the snow", **size)
    tiny.set_attn_processor("vmoba")
    sparse = tiny("a dog runs in the snow", **size)
    assert isinstance(own, GenerationResult) and own.frames.dtype == np.uint8
    assert own.frames.shape == sparse.frames.shape == (5, 32, 48, 3)
    # The dense processor is the model's own attention, computed the same way.
    assert "calls" not in own.stats and len(dense.stats["calls"]) == 1 * 2 * 3  # steps x CFG x layers
    assert np.abs(own.frames.astype(int) - dense.frames.astype(int)).max() <= 2
    report = compare(sparse, dense)
    assert report["speedup"] == pytest.approx(dense.latency_s / sparse.latency_s)
    assert 0 < report["density"] <= report["coverage"] < 1
    assert set(report["per_layer_density"]) == {0, 1, 2}
    md = report_markdown(report)
    assert "| end-to-end latency |" in md and "warm-up generation" not in md and "report.png" not in md
    other_seed = dataclasses.replace(dense, stats={**dense.stats, "settings": {**dense.stats["settings"], "seed": 4}})
    with pytest.raises(ValueError, match="seed"):
        compare(sparse, other_seed)
    with pytest.raises(ValueError, match="stats"):
        compare(own, dense)


def test_resolve_size_fills_defaults_and_rounds(tiny):
    assert tiny.resolve_size() == {"num_frames": 9, "height": 128, "width": 128, "num_inference_steps": 4}
    with pytest.warns(UserWarning, match="rounded num_frames 6 -> 5"):
        assert tiny.resolve_size(6, None, 64, 2) == {"num_frames": 5, "height": 128, "width": 64,
                                                     "num_inference_steps": 2}
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        tiny.resolve_size(num_inference_steps=0)


# GNA settings that are sparse on the small grids below: 3x3 spatial windows, one token per tile.
SMALL_GNA = {"window": [1, 3, 3], "stride": [1, 1, 1], "tile": [1, 1, 1], "dense_steps": 0}


def test_from_pipe_applies_the_processor_to_both_wan22_experts():
    from vdiff_sparse.tiny_models import tiny_wan_pipeline

    diffusers_pipe = tiny_wan_pipeline(two_experts=True)
    own = {name: {type(m.processor) for m in getattr(diffusers_pipe, name).modules() if hasattr(m, "processor")}
           for name in ("transformer", "transformer_2")}
    pipe = SparseVideoPipeline.from_pipe(diffusers_pipe)
    processor = pipe.make_processor("gna", overrides=SMALL_GNA)
    pipe.set_attn_processor(processor)
    for name in ("transformer", "transformer_2"):
        self_attention = [b.attn1 for b in getattr(diffusers_pipe, name).blocks]
        assert all(m.processor is processor for m in self_attention), name
    forward_calls = {"transformer": 0, "transformer_2": 0}
    for name in forward_calls:
        getattr(diffusers_pipe, name).register_forward_pre_hook(
            lambda module, args, name=name: forward_calls.__setitem__(name, forward_calls[name] + 1))
    result = pipe("a cat", num_frames=5, height=64, width=64, num_inference_steps=2)
    # boundary_ratio 0.5: step 0 (t = 1000) runs transformer, step 1 (t = 9) transformer_2, each
    # twice (CFG); every one of their self-attention calls went through the processor.
    assert forward_calls == {"transformer": 2, "transformer_2": 2}
    calls = result.stats["calls"]
    assert len(calls) == 2 * 2 * 2 and {c["step"] for c in calls} == {0, 1}  # steps x CFG x layers
    assert all(c["density"] < 1 for c in calls)
    pipe.set_attn_processor(None)
    for name in ("transformer", "transformer_2"):
        assert {type(m.processor) for m in getattr(diffusers_pipe, name).modules() if hasattr(m, "processor")} \
            == own[name]


def test_cli_generate_with_a_local_diffusers_folder(tmp_path, capsys):
    from vdiff_sparse.tiny_models import tiny_wan_pipeline

    folder = tmp_path / "tiny-wan2.2"
    tiny_wan_pipeline(two_experts=True).save_pretrained(folder)
    overrides = [f"{k}={json.dumps(v)}" for k, v in SMALL_GNA.items()]
    args = ["generate", "--model", str(folder), "--attn", "gna", "--compare-dense", "--frames", "5", "--height", "64",
            "--width", "64", "--steps", "2", "--no-warmup", "--out", str(tmp_path / "out"), *overrides]
    assert main(args) == 0
    assert str(folder) in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["model"] == str(folder) and report["grid"] == [2, 4, 4]
    assert report["attention_calls"] == 2 * 2 * 2 and set(report["per_step_density"]) == {"0", "1"}
    assert report["density"] < 1 and report["speedup"] > 0
    assert read_video(tmp_path / "out" / "gna.mp4").shape == (5, 64, 64, 3)


def _tiny_cogvideox_pipeline():
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    from vdiff_sparse.tiny_models import tiny_text_encoder

    tokenizer, _ = tiny_text_encoder()
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                           num_heads=2, relative_attention_num_buckets=8, pad_token_id=0,
                                           eos_token_id=1, decoder_start_token_id=0)).eval()
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4).eval()
    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                              out_channels=4, time_embed_dim=8, text_embed_dim=16, num_layers=2,
                                              sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=226,
                                              use_rotary_positional_embeddings=True).eval()
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())


def test_bfloat16_loading_keeps_only_the_wan_vae_in_float32(tmp_path):
    """Wan casts latents to its float32 VAE; CogVideoX decodes in the transformer's dtype, so its
    VAE follows it (a float32 VAE crashed the bfloat16 decode after all denoising)."""
    from vdiff_sparse.pipelines.generate import load_diffusers_pipeline
    from vdiff_sparse.tiny_models import tiny_wan_pipeline

    tiny_wan_pipeline().save_pretrained(tmp_path / "wan")
    _tiny_cogvideox_pipeline().save_pretrained(tmp_path / "cog")
    wan = load_diffusers_pipeline(str(tmp_path / "wan"), torch.bfloat16)
    assert wan.vae.dtype == torch.float32 and wan.transformer.dtype == torch.bfloat16
    cog = load_diffusers_pipeline(str(tmp_path / "cog"), torch.bfloat16)
    assert cog.vae.dtype == cog.transformer.dtype == torch.bfloat16
    args = ["generate", "--model", str(tmp_path / "cog"), "--attn", "gna", "--frames", "9", "--height", "64",
            "--width", "64", "--steps", "1", "--no-warmup", "--dtype", "bfloat16", "--out", str(tmp_path / "out"),
            "window=[2,2,2]"]
    assert main(args) == 0
    assert read_video(tmp_path / "out" / "gna.mp4").shape == (9, 64, 64, 3)
    # CogVideoX batches the two guidance branches into one call: its FLOPs count both samples.
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    n, inner = report["num_tokens"], 2 * 16
    assert report["attention_tflops_dense"] == pytest.approx(4 * n**2 * inner * 2 * report["attention_calls"] / 1e12)


# --- the CLI -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dense", "vmoba", "psa", "gna"])
def test_cli_generate_compare_dense(method, tmp_path, capsys):
    out = tmp_path / method
    extra = SMALL_GNA_WINDOW if method == "gna" else []
    assert main(["generate", "--attn", method, "--compare-dense", "--out", str(out), "--seed", "7", *SMALL,
                 *extra]) == 0
    printed = capsys.readouterr()
    assert "end-to-end latency" in printed.out and "PSNR / SSIM" in printed.out
    assert f"\r{method}:   0%|" in printed.err and "\rdense:   0%|" in printed.err  # denoising progress bars
    for name in (f"{method}.mp4", "dense.mp4"):
        video = read_video(out / name)
        assert video.shape == (5, 32, 48, 3)
    report = json.loads((out / "report.json").read_text())
    for key in ("latency_dense_s", "latency_sparse_s", "speedup", "density", "psnr_db", "ssim"):
        assert key in report
    assert report["speedup"] == pytest.approx(report["latency_dense_s"] / report["latency_sparse_s"])
    for side in ("dense", "sparse"):
        assert 0 < report[f"attention_{side}_s"] < report[f"latency_{side}_s"]
        assert report[f"attention_share_{side}"] == pytest.approx(report[f"attention_{side}_s"]
                                                                   / report[f"latency_{side}_s"])
    assert report["attention_speedup"] == pytest.approx(report["attention_dense_s"] / report["attention_sparse_s"])
    assert report["grid"] == [3, 8, 12] and report["num_tokens"] == 288
    assert -1 <= report["ssim"] <= 1 and 0 < report["density"] <= 1
    assert report["attention_calls"] == 1 * 2 * 3 and report["dense_calls"] == 0
    # Every layer runs the same number of calls, so the mean density is the mean of the layers'.
    assert set(report["per_layer_density"]) == {"0", "1", "2"} and set(report["per_step_density"]) == {"0"}
    assert report["density"] == pytest.approx(np.mean(list(report["per_layer_density"].values())))
    assert report["per_step_density"]["0"] == pytest.approx(report["density"])
    assert 0 < report["density"] <= report["coverage"]
    assert report["attention_tflops_dense"] == pytest.approx(4 * 288**2 * 64 * 6 / 1e12)  # 4 N^2 (heads x dim)
    assert report["attention_flops_saved"] == pytest.approx(
        1 - report["attention_tflops_sparse"] / report["attention_tflops_dense"])
    if method == "dense":
        assert report["density"] == 1.0 and report["identical"] and report["attention_flops_saved"] == 0
    else:
        assert report["density"] < 1 and report["attention_flops_saved"] > 0
    md = (out / "report.md").read_text()
    assert f"[{method}.mp4]({method}.mp4)" in md and "| layer | coverage | density |" in md and "| step | density |" in md
    assert "](report.png)" in md and (out / "report.png").stat().st_size > 1000
    assert "without warm-up" in md and "attention share of latency" in md and "attention FLOPs saved" in md


def test_cli_rounds_sizes_with_a_warning(tmp_path, capsys):
    args = ["generate", "--attn", "gna", "--out", str(tmp_path), "--frames", "6", "--height", "30", "--width", "50",
            "--steps", "1", "--no-warmup", *SMALL_GNA_WINDOW]
    with pytest.warns(UserWarning, match=r"rounded num_frames 6 -> 5, height 30 -> 32, width 50 -> 48"):
        assert main(args) == 0
    assert read_video(tmp_path / "gna.mp4").shape == (5, 32, 48, 3)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["speedup"] is None and report["latency_sparse_s"] > 0
    assert "window=(3, 4, 4)" in report["processor"]


def test_cli_config_file_and_overrides_in_order(tmp_path):
    config = tmp_path / "vmoba.yaml"
    config.write_text("config:\n  topk: 2\n  block_2d: [4, 4]\nschedule:\n  dense_steps: 0\n")
    assert main(["generate", "--attn", "vmoba", "--config", str(config), "block_2d=[8,4]", "--out", str(tmp_path),
                 *SMALL[:-1]]) == 0
    processor = json.loads((tmp_path / "report.json").read_text())["processor"]
    # File over the tiny defaults (topk 3), key=value over the file.
    assert "topk=2" in processor and "block_2d=(8, 4)" in processor and "block_3d=(2, 8, 8)" in processor


def test_cli_overrides_anywhere_among_the_options(tmp_path, capsys):
    """key=value overrides split by other options all apply; a stray option is still an error."""
    assert main(["generate", "--attn", "vmoba", "block_2d=[8,4]", "--out", str(tmp_path), *SMALL[:-1], "topk=2",
                 "--seed", "5", "dense_steps=0"]) == 0
    processor = json.loads((tmp_path / "report.json").read_text())["processor"]
    assert "topk=2" in processor and "block_2d=(8, 4)" in processor and "dense_steps=0" in processor
    with pytest.raises(SystemExit):
        main(["generate", "--attn", "vmoba", "topk=2", "--out", str(tmp_path), "--no-such-option", "dense_steps=0"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_cli_out_that_is_a_file_fails_before_generating(tmp_path, capsys, monkeypatch):
    import vdiff_sparse.cli as cli

    monkeypatch.setattr(cli, "_load_pipeline", lambda args: pytest.fail("the model was loaded"))
    not_a_dir = tmp_path / "report.txt"
    not_a_dir.write_text("")
    assert main(["generate", "--attn", "gna", "--out", str(not_a_dir), *SMALL]) == 2
    err = capsys.readouterr().err
    assert f"--out '{not_a_dir}' exists and is not a directory" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["topk_typo=3"], "unknown VMoBAProcessor option 'topk_typo'"),
        (["topk"], "overrides are key=value"),
        (["--frames", "0"], "num_frames must be a positive integer"),
        (["--height", "-8"], "height must be a positive integer"),
        (["dense_layers=3"], "dense_layers must be a list of ints, got 3"),
        (["--model", "./no/such/dir"], "not a diffusers model directory"),
        (["--config", "no_such.yaml"], "config file 'no_such.yaml' does not exist"),
        (["--preset", "psa"], "preset 'psa' is for method 'psa', not 'vmoba'"),
        (["--steps", "0"], "num_inference_steps must be a positive integer, got 0"),
        (["topk=abc"], "topk must be an int >= 1"),
        (["--device", "tpu9"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu9'"),
        (["--model", "x/y", "--tiny-layers", "4"], "--tiny-layers set the built-in tiny model"),
    ],
    ids=["preset", "override-key", "override-format", "frames", "height", "dense-layers-int", "missing-path", "config-file",
         "other-method-preset", "steps", "override-value", "device", "tiny-option-with-model"],
)
def test_cli_bad_options_are_one_line_errors(args, message, tmp_path, capsys):
    assert main(["generate", "--attn", "vmoba", "--out", str(tmp_path), "--steps", "1", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_bad_method_options_name_the_valid_ones(capsys):
    assert main(["generate", "--attn", "vmoba", "--preset", "no-such-preset"]) == 2
    assert "wan2.1-1.3b" in capsys.readouterr().err  # the presets there are
    assert main(["generate", "--attn", "vmoba", "topk_typo=3"]) == 2
    assert "'topk'" in capsys.readouterr().err  # the options there are


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cli_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert main(["generate", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--attn", "flash"], "invalid choice: 'flash'"),
        (["generate", "--tiny-heads", "0"], "--tiny-heads: expected a positive integer, got 0"),
        (["generate", "--fps", "x"], "--fps: expected a positive integer, got 'x'"),
        (["viz", "--head-dim", "-3"], "--head-dim: expected a positive integer, got -3"),
    ],
    ids=["attn", "tiny-heads", "fps", "head-dim"],
)
def test_cli_usage_errors_name_the_option(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_model_offline_says_what_to_download(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["generate", "--model", "no-such-org/no-such-model", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE=1" in err and "hf download no-such-org/no-such-model" in err


@pytest.mark.parametrize("method", ["vmoba", "psa", "gna"])
def test_cli_viz_draws_a_plan_on_random_data(method, tmp_path, capsys):
    out = tmp_path / "plan.png"
    window = ["window=[3,4,4]"] if method == "gna" else []  # the tiny defaults' window covers this grid
    assert main(["viz", "--attn", method, "--source", "random", "--grid", "3", "8", "12", "--layer", "2",
                 "--head", "1", "--out", str(out), *window]) == 0
    assert out.stat().st_size > 1000
    assert "density" in capsys.readouterr().out


@pytest.mark.parametrize("method, layer", [("vmoba", 1), ("psa", 2), ("gna", 0)])
def test_cli_viz_draws_a_plan_of_the_tiny_model(method, layer, tmp_path, capsys):
    out = tmp_path / "plan.png"
    assert main(["viz", "--attn", method, "--source", "tiny", "--layer", str(layer), "--head", "1", "--frames", "5",
                 "--height", "32", "--width", "64", "--steps", "1", "dense_steps=0", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert f"layer {layer}, grid (3, 8, 16)" in printed and "density" in printed


@pytest.mark.parametrize("source", ["random", "tiny"])
def test_cli_viz_follows_the_layer_schedule(source, tmp_path, capsys):
    """A layer with its own method draws that method's plan; a dense layer has none."""
    out = tmp_path / "plan.png"
    size = ["--frames", "5", "--height", "32", "--width", "64", "--steps", "1", "dense_steps=0"]
    vmoba_layer = "layers={1: {method: vmoba, block_2d: [4, 4], topk: 2}}"
    assert main(["viz", "--attn", "gna", "--source", source, "--layer", "1", vmoba_layer, "--out", str(out),
                 *size]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"vmoba ({source}), layer 1") and out.stat().st_size > 1000
    assert main(["viz", "--attn", "gna", "--source", source, "--layer", "1", "dense_layers=[1]", "--out", str(out),
                 *size]) == 2
    assert "layer 1" in capsys.readouterr().err
    assert main(["viz", "--attn", "gna", "--source", source, "--layer", "2", "layers={2: {method: dense}}",
                 "--out", str(out), *size]) == 2
    assert "layer 2 runs attn=dense" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source", "tiny", "--layer", "3"], "layer must be in [0, 2]"),
        (["--source", "random", "--grid", "2", "8", "8", "--layer", "-1"], "layer must be a non-negative integer"),
        (["--source", "random", "--head", "2"], "--head must be in [0, 1] for 2 heads, got 2"),
        (["--source", "tiny", "--head", "-1"], "--head must be in [0, 1] for 2 heads, got -1"),
        (["--source", "tiny", "--step", "1", "--steps", "1"], "step must be in [0, 0]"),
        (["--source", "random", "--grid", "0", "8", "8"], "grid"),
    ],
    ids=["layer-tiny", "layer-negative", "head-random", "head-tiny", "step", "grid"],
)
def test_cli_viz_bad_options(args, message, tmp_path, capsys):
    assert main(["viz", "--attn", "vmoba", "--out", str(tmp_path / "p.png"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_plan_levels_of_psa_and_a_plan_that_ran_dense():
    from vdiff_sparse.pipelines.generate import generation_processor, tiny_defaults
    from vdiff_sparse.pipelines.viz import capture_plan, plan_matrix

    proc = generation_processor("psa", defaults=tiny_defaults()["methods"]["psa"], stats=False)
    plan, grid = capture_plan(proc, source="random", layer=1, grid=(3, 8, 16))
    assert grid == (3, 8, 16)
    levels, shares = plan_matrix(plan, head=1)
    assert levels.shape == shares.shape == (plan.num_q_blocks, plan.num_k_blocks)
    assert set(np.unique(levels)) <= {0, 1, 2, 4, 8} and (levels > 0).any()
    assert set(np.unique(shares)) <= {0.0, 1.0} and ((levels > 0) == (shares > 0)).all()
    with pytest.raises(ValueError, match="ran dense"):
        capture_plan(generation_processor("psa", defaults={"dense_steps": 1}, stats=False), source="tiny", step=0,
                     size=dict(num_frames=1, height=16, width=16, num_inference_steps=1))


def test_passthrough_subcommand_without_its_module(monkeypatch, capsys):
    from vdiff_sparse import cli

    missing = cli._passthrough("vdiff_sparse.no_such_module", "main", "the benchmarks")
    monkeypatch.setitem(cli.PASSTHROUGH, "bench", missing)
    assert main(["bench", "--anything"]) == 2
    assert "the benchmarks is not available" in capsys.readouterr().err


def test_module_entry_point_and_console_script(tmp_path):
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "vdiff-sparse"]
    assert script.value == "vdiff_sparse.cli:main"
    out = tmp_path / "plan.png"
    run = subprocess.run([sys.executable, "-m", "vdiff_sparse", "viz", "--attn", "gna", "--source", "random",
                          "--grid", "2", "8", "8", "--out", str(out), "window=[2,4,4]"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert out.stat().st_size > 1000 and "density" in run.stdout


def test_help_explains_every_option_with_its_default():
    import argparse

    from vdiff_sparse.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"generate", "viz", "demo", "finetune", "bench"} <= set(subparsers.choices)
    for name in ("generate", "viz", "demo"):
        sub = subparsers.choices[name]
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest}: no help"
            text = formatter._get_help_string(action)
            if not isinstance(action, argparse._StoreConstAction):  # on/off flags: off by default
                assert "default" in text, f"{name} {action.dest}: help does not say the default: {text!r}"
        assert "default: 9" in sub.format_help() or name == "demo"  # the tiny model's frames


@pytest.mark.parametrize("layer", [0, 1, 2], ids=["1d", "2d", "3d"])
def test_plan_matrix_shares_add_up_to_the_plan_density(layer, seed):
    from vdiff_sparse.pipelines.generate import generation_processor, tiny_defaults
    from vdiff_sparse.pipelines.viz import capture_plan, plan_matrix

    proc = generation_processor("vmoba", defaults=tiny_defaults()["methods"]["vmoba"], stats=False)
    plan, _ = capture_plan(proc, source="random", layer=layer, grid=(3, 10, 13), heads=2, seed=seed)
    q_sizes = plan.q_offsets.diff().double().numpy()
    k_sizes = plan.k_offsets.diff().double().numpy()
    densities = []
    for head in range(2):
        _, shares = plan_matrix(plan, head=head)
        assert ((shares >= 0) & (shares <= 1)).all()
        densities.append((shares * q_sizes[:, None] * k_sizes[None, :]).sum() / plan.num_tokens**2)
    assert np.mean(densities) == pytest.approx(plan.density(), rel=1e-9)  # density averages the heads
