"""Generation: the pipeline wrapper, sizes, reports (PSNR / SSIM), plan pictures and the CLI
end to end on the built-in tiny model (small sizes, so the whole file stays fast)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

from vdiff_sparse.cli import main
from vdiff_sparse.pipelines import GenerationResult, SparseVideoPipeline
from vdiff_sparse.pipelines.generate import SizeRules, fit_size, size_rules
from vdiff_sparse.pipelines.report import compare, psnr, ssim

# 5 frames x 32 x 48 px -> token grid 3 x 8 x 12 (ragged for every method's blocks).
# One step, no dense warm-up step, so that every method's sparse path runs.
SMALL = ["--frames", "5", "--height", "32", "--width", "48", "--steps", "1", "--no-warmup", "dense_steps=0"]


def read_video(path):
    import imageio.v2 as imageio

    with imageio.get_reader(path) as reader:  # its len() is inf, so no list(reader)
        return np.stack([frame for frame in reader.iter_data()])


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
    assert 0 < report["flop_density"] <= report["density"] < 1
    assert set(report["per_layer_density"]) == {0, 1, 2}
    other_seed = dataclasses.replace(dense, stats={**dense.stats, "settings": {**dense.stats["settings"], "seed": 4}})
    with pytest.raises(ValueError, match="seed"):
        compare(sparse, other_seed)
    with pytest.raises(ValueError, match="stats"):
        compare(own, dense)


# --- the CLI -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dense", "vmoba", "psa", "gna"])
def test_cli_generate_compare_dense(method, tmp_path, capsys):
    out = tmp_path / method
    assert main(["generate", "--attn", method, "--compare-dense", "--out", str(out), "--seed", "7", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "end-to-end latency" in printed and "PSNR / SSIM" in printed
    for name in (f"{method}.mp4", "dense.mp4"):
        video = read_video(out / name)
        assert video.shape == (5, 32, 48, 3)
    report = json.loads((out / "report.json").read_text())
    for key in ("latency_dense_s", "latency_sparse_s", "speedup", "density", "psnr_db", "ssim"):
        assert key in report
    assert report["speedup"] == pytest.approx(report["latency_dense_s"] / report["latency_sparse_s"])
    assert report["grid"] == [3, 8, 12] and report["num_tokens"] == 288
    assert -1 <= report["ssim"] <= 1 and 0 < report["density"] <= 1
    assert report["attention_calls"] == 1 * 2 * 3 and report["dense_calls"] == 0
    if method == "dense":
        assert report["density"] == 1.0 and report["identical"]
    md = (out / "report.md").read_text()
    assert f"[{method}.mp4]({method}.mp4)" in md and "| layer | density |" in md
    assert (out / "report.png").stat().st_size > 1000 and "report.png" in md


def test_cli_rounds_sizes_with_a_warning(tmp_path, capsys):
    args = ["generate", "--attn", "gna", "--out", str(tmp_path), "--frames", "6", "--height", "30", "--width", "50",
            "--steps", "1", "--no-warmup", "window=[2,4,4]", "stride=[1,4,4]", "tile=[1,4,4]"]
    with pytest.warns(UserWarning, match=r"rounded num_frames 6 -> 5, height 30 -> 32, width 50 -> 48"):
        assert main(args) == 0
    assert read_video(tmp_path / "gna.mp4").shape == (5, 32, 48, 3)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["speedup"] is None and report["latency_sparse_s"] > 0
    assert "window=(2, 4, 4)" in report["processor"]


def test_cli_config_file_and_overrides_in_order(tmp_path):
    config = tmp_path / "vmoba.yaml"
    config.write_text("config:\n  topk: 2\n  block_2d: [4, 4]\nschedule:\n  dense_steps: 0\n")
    assert main(["generate", "--attn", "vmoba", "--config", str(config), "block_2d=[8,4]", "--out", str(tmp_path),
                 *SMALL[:-1]]) == 0
    processor = json.loads((tmp_path / "report.json").read_text())["processor"]
    # File over the tiny defaults (topk 3), key=value over the file.
    assert "topk=2" in processor and "block_2d=(8, 4)" in processor and "block_3d=(2, 8, 8)" in processor


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["topk_typo=3"], "unknown VMoBAProcessor option 'topk_typo'"),
        (["topk"], "overrides are key=value"),
        (["--frames", "0"], "num_frames must be a positive integer"),
        (["--height", "-8"], "height must be a positive integer"),
        (["--model", "./no/such/dir"], "not a diffusers model directory"),
        (["--config", "no_such.yaml"], "config file 'no_such.yaml' does not exist"),
        (["--preset", "psa"], "preset 'psa' is for method 'psa', not 'vmoba'"),
    ],
    ids=["preset", "override-key", "override-format", "frames", "height", "missing-path", "config-file",
         "other-method-preset"],
)
def test_cli_bad_options_are_one_line_errors(args, message, tmp_path, capsys):
    assert main(["generate", "--attn", "vmoba", "--out", str(tmp_path), "--steps", "1", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_unknown_attn_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--attn", "flash"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'flash'" in capsys.readouterr().err


def test_missing_model_offline_says_what_to_download(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["generate", "--model", "no-such-org/no-such-model", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE=1" in err and "hf download no-such-org/no-such-model" in err


@pytest.mark.parametrize("method", ["vmoba", "psa", "gna"])
def test_cli_viz_draws_a_plan_on_random_data(method, tmp_path, capsys):
    out = tmp_path / "plan.png"
    assert main(["viz", "--attn", method, "--source", "random", "--grid", "3", "8", "12", "--layer", "2",
                 "--head", "1", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert "density" in capsys.readouterr().out


def test_viz_on_the_tiny_model_and_plan_levels(tmp_path):
    from vdiff_sparse.pipelines.generate import make_processor, tiny_defaults
    from vdiff_sparse.pipelines.viz import capture_plan, plan_matrix

    proc = make_processor("psa", defaults=tiny_defaults()["methods"]["psa"], overrides={"dense_steps": 0}, stats=False)
    plan, grid = capture_plan(proc, source="tiny", layer=1, size=dict(num_frames=5, height=32, width=64,
                                                                      num_inference_steps=1), step=0)
    assert grid == (3, 8, 16)
    levels, shares = plan_matrix(plan, head=1)
    assert levels.shape == shares.shape == (plan.num_q_blocks, plan.num_k_blocks)
    assert set(np.unique(levels)) <= {0, 1, 2, 4, 8} and (levels > 0).any()
    assert set(np.unique(shares)) <= {0.0, 1.0} and ((levels > 0) == (shares > 0)).all()
    with pytest.raises(ValueError, match="ran dense"):
        capture_plan(make_processor("psa", defaults={"dense_steps": 1}, stats=False), source="tiny", step=0,
                     size=dict(num_frames=5, height=32, width=32, num_inference_steps=1))


def test_passthrough_subcommand_without_its_module(monkeypatch, capsys):
    from vdiff_sparse import cli

    missing = cli._passthrough("vdiff_sparse.no_such_module", "main", "the benchmarks")
    monkeypatch.setitem(cli.PASSTHROUGH, "bench", missing)
    assert main(["bench", "--anything"]) == 2
    assert "the benchmarks is not available" in capsys.readouterr().err


def test_module_entry_point_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "vdiff_sparse", "--help"], capture_output=True, text=True, check=True)
    for name in ("generate", "viz", "demo", "finetune", "bench"):
        assert name in out.stdout


@pytest.mark.parametrize("layer", [0, 1, 2], ids=["1d", "2d", "3d"])
def test_plan_matrix_shares_add_up_to_the_plan_density(layer, seed):
    from vdiff_sparse.pipelines.generate import make_processor, tiny_defaults
    from vdiff_sparse.pipelines.viz import capture_plan, plan_matrix

    proc = make_processor("vmoba", defaults=tiny_defaults()["methods"]["vmoba"], stats=False)
    plan, _ = capture_plan(proc, source="random", layer=layer, grid=(3, 10, 13), heads=2, seed=seed)
    q_sizes = plan.q_offsets.diff().double().numpy()
    k_sizes = plan.k_offsets.diff().double().numpy()
    densities = []
    for head in range(2):
        _, shares = plan_matrix(plan, head=head)
        assert ((shares >= 0) & (shares <= 1)).all()
        densities.append((shares * q_sizes[:, None] * k_sizes[None, :]).sum() / plan.num_tokens**2)
    assert np.mean(densities) == pytest.approx(plan.density(), rel=1e-9)  # density averages the heads
