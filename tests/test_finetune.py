"""Sparse-aware fine-tuning (pipelines/finetune.py, pipelines/data.py) on the tiny Wan, on CPU.

The runs are tiny (4 clips of 9 frames at 48x80 -> a 3x3x5 token grid, VMoBA blocks small
enough that every partition has several blocks) so each run takes about a second. The ``slow``
tests start processes: two-process runs (``accelerate launch`` with
``configs/finetune/accelerate/cpu_ddp.yaml``), one of them killed with SIGKILL.

Exact resume is checked bit for bit: the final weights and every tensor of the last checkpoint
(weights or LoRA adapters, optimizer state, EMA, step) equal those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vdiff_sparse.methods import method_names
from vdiff_sparse.pipelines import data as ft_data
from vdiff_sparse.pipelines import finetune as ft

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "finetune" / "tiny_wan_vmoba.yaml"
CAPTIONS = ["a red cat runs on the beach", "a blue dog in snow", "the cat on a video", "a dog runs in the snow"]


def write_clip(path: Path, seed: int, frames: int = 9, size=(48, 80)) -> None:
    import imageio

    rng = np.random.default_rng(seed)
    # Smooth moving gradients (not noise), so the codec keeps them recognisable.
    t, y, x = np.meshgrid(np.arange(frames), np.arange(size[0]), np.arange(size[1]), indexing="ij")
    phase = rng.uniform(0, 2 * np.pi, 3)
    video = np.stack([127 + 120 * np.sin(x / 9 + y / 13 + t / 3 + p) for p in phase], -1)
    imageio.mimwrite(str(path), video.astype(np.uint8), fps=8)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    lines = []
    for i, caption in enumerate(CAPTIONS):
        write_clip(root / f"clip{i}.mp4", seed=100 + i)
        lines.append(json.dumps({"video": f"clip{i}.mp4", "caption": caption}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def overrides(videos: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={output_dir}", f"data.video_dir={videos}", f"data.captions={videos / 'captions.jsonl'}",
        f"data.cache_dir={videos / 'cache'}", "train.max_steps=4", "train.checkpoint_every=2",
        "validation.every=0", *extra,
    ]


def run(videos: Path, output_dir: Path, *extra: str) -> ft.RunResult:
    return ft.train(ft.load_config(TINY_CONFIG, overrides(videos, output_dir, *extra)))


def final_weights(result_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    lora = result_dir / "final" / "pytorch_lora_weights.safetensors"
    full = result_dir / "final" / "transformer" / "diffusion_pytorch_model.safetensors"
    return load_file(str(lora if lora.exists() else full))


def checkpoint_state(checkpoint: Path) -> dict:
    """Every file a checkpoint restores, loaded (tensors, optimizer, EMA, step), except
    accelerate's snapshot of the global RNGs: training draws no hidden random numbers, and the
    snapshot differs between runs made in one process."""
    from safetensors.torch import load_file

    return {f.name: load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, weights_only=False)
            for f in sorted(checkpoint.iterdir()) if not f.name.startswith("random_states")}


def assert_identical(expected, actual, where="state") -> None:
    """Nested dicts / lists of tensors and numbers are equal bit for bit (dtypes included)."""
    assert type(expected) is type(actual), f"{where}: {type(expected)} vs {type(actual)}"
    if isinstance(expected, torch.Tensor):
        assert expected.dtype == actual.dtype and torch.equal(expected, actual), where
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), f"{where}: keys {expected.keys() ^ actual.keys()}"
        for key in expected:
            assert_identical(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for i, (a, b) in enumerate(zip(expected, actual)):
            assert_identical(a, b, f"{where}[{i}]")
    else:
        assert expected == actual, f"{where}: {expected!r} vs {actual!r}"


def assert_same_run(reference: Path, run_dir: Path) -> None:
    """Same final weights and the same last checkpoint (weights, optimizer, EMA, step)."""
    assert [p.name for p in ft.checkpoints(run_dir)] == [p.name for p in ft.checkpoints(reference)]
    assert_identical(final_weights(reference), final_weights(run_dir), "final")
    assert_identical(checkpoint_state(ft.checkpoints(reference)[-1]), checkpoint_state(ft.checkpoints(run_dir)[-1]),
                     "checkpoint")


# Full fine-tuning with a global batch of 2 (one process), gradient accumulation and EMA.
FULL = ("train.batch_size=2", "train.grad_accum=2", "train.ema_decay=0.9")
LORA = ("train.lora_rank=4", "train.lr=1e-2")


@pytest.fixture(scope="module")
def reference_full(videos, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run (FULL), with a validation video at the end."""
    out = tmp_path_factory.mktemp("reference_full")
    result = run(videos, out, *FULL, "validation.every=4", "validation.steps=2")
    assert result.step == 4 and not result.stopped_early
    return out


# --- data ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lines, named", [
    pytest.param(['{"video": "a.mp4", "caption": "x"}', "{not json"], "2", id="bad-json"),
    pytest.param(['{"video": "a.mp4"}', '{"video": "b.mp4", "caption": "ok"}', '{"caption": "y"}'], "1, 3",
                 id="missing-fields"),
    pytest.param(['{"video": "a.mp4", "caption": "x"}', '{"video": "a.mp4", "caption": "y"}'], "2", id="duplicate"),
    pytest.param(['{"file": "a.mp4", "text": "  "}'], "1", id="empty-caption"),
])
def test_malformed_caption_lines_are_named(tmp_path, lines, named):
    path = tmp_path / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"malformed caption lines {named}"):
        ft_data.read_captions(path)


def test_csv_captions_and_header_check(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text('path,prompt\nclip0.mp4,"a cat, running"\nclip1.mp4,a dog\n')
    entries = ft_data.read_captions(good)
    assert [(e.line, e.video, e.caption) for e in entries] == [(2, "clip0.mp4", "a cat, running"), (3, "clip1.mp4", "a dog")]
    bad = tmp_path / "bad.csv"
    bad.write_text("name,caption\nclip0.mp4,a cat\n")
    with pytest.raises(ValueError, match="needs a video column"):
        ft_data.read_captions(bad)


def test_caption_file_of_another_folder_is_an_error(videos, tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text('{"video": "x.mp4", "caption": "a"}\n\n{"video": "y.mp4", "caption": "b"}\n')
    with pytest.raises(ValueError, match=r"does not match the videos .* lines 1, 3"):
        ft_data.match_videos(ft_data.read_captions(path), videos)


def test_missing_and_unreadable_videos_are_skipped_and_counted(videos, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    for i in range(2):
        os.symlink(videos / f"clip{i}.mp4", tmp_path / f"clip{i}.mp4")
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps({"video": v, "caption": "a cat"}) for v in
                                  ["clip0.mp4", "gone.mp4", "broken.mp4", "clip1.mp4"]) + "\n")
    calls = []

    def encode_video(frames):
        calls.append(frames.shape)
        return frames[0, :, ::4].mean(0, keepdim=True)

    kwargs = dict(encode_video=encode_video, encode_prompt=lambda c: torch.ones(3, 2),
                  num_frames=5, height=16, width=32)
    report = ft_data.build_cache(tmp_path, captions, tmp_path / "cache", **kwargs)
    assert [e.line for e in report.missing] == [2] and [e.line for e in report.unreadable] == [3]
    assert len(report.files) == 2 and "2 of 4 videos usable; 1 missing (lines 2); 1 unreadable (lines 3)" == report.summary()
    assert calls == [(1, 3, 5, 16, 32)] * 2
    dataset = ft_data.LatentDataset(tmp_path / "cache")
    assert len(dataset) == 2 and dataset.latent_shape == (1, 2, 16, 32)
    ft_data.build_cache(tmp_path, captions, tmp_path / "cache", **kwargs)
    assert len(calls) == 2, "an unchanged cache must not be re-encoded"


def write_sample(path: Path, latents=(16, 3, 6, 10), embeds=(16, 32), **extra: torch.Tensor) -> None:
    """A precomputed sample file (``embeds=None``: without prompt embeddings)."""
    from safetensors.torch import save_file

    tensors = {"latents": torch.zeros(latents), **extra}
    if embeds is not None:
        tensors["prompt_embeds"] = torch.zeros(embeds)
    save_file(tensors, str(path))


@pytest.mark.parametrize("bad, match", [
    pytest.param(dict(embeds=None), r"c.safetensors: no tensor\(s\) \['prompt_embeds'\]", id="missing-tensor"),
    pytest.param(dict(latents=(16, 5, 6, 10)), r"c.safetensors: latents .* \(16, 5, 6, 10\) .* differ from a.safetensors",
                 id="other-size"),
    pytest.param(None, "c.safetensors: unreadable", id="truncated"),
])
def test_precomputed_latents_are_checked_up_front(tmp_path, bad, match):
    for name in ("a", "b"):
        write_sample(tmp_path / f"{name}.safetensors", mask=torch.ones(2))  # extra tensors are ignored
    write_sample(tmp_path / "c.safetensors", **(bad or {}))
    if bad is None:
        (tmp_path / "c.safetensors").write_bytes((tmp_path / "c.safetensors").read_bytes()[:50])
    with pytest.raises(ValueError, match="1 of 3 latent files unusable.*" + match):
        ft_data.LatentDataset(tmp_path)
    (tmp_path / "c.safetensors").unlink()
    dataset = ft_data.LatentDataset(tmp_path)
    assert dataset.latent_shape == (16, 3, 6, 10) and dataset.batch([0, 1])["latents"].shape == (2, 16, 3, 6, 10)
    assert set(dataset[0]) == {"latents", "prompt_embeds"}


@pytest.mark.parametrize("frames, size, target", [
    pytest.param(10, (50, 70), (5, 32, 48), id="fewer-frames-ragged"),
    pytest.param(3, (40, 40), (9, 16, 32), id="repeat-frames-wide-crop"),
])
def test_read_video_samples_resizes_and_crops(tmp_path, seed, frames, size, target):
    path = tmp_path / "v.mp4"
    write_clip(path, seed, frames=frames, size=size)
    x = ft_data.read_video(path, *target)
    assert x.shape == (3, *target) and x.dtype == torch.float32
    assert -1 <= float(x.min()) < float(x.max()) <= 1


def test_global_batches_cover_each_epoch_once(seed):
    n, size = 7, 2
    batches = [ft.global_batch(n, size, seed, i) for i in range(6)]  # 3 per epoch, 1 sample dropped
    for epoch in (batches[:3], batches[3:]):
        flat = [i for b in epoch for i in b]
        assert len(set(flat)) == 6 and set(flat) <= set(range(n))
    assert batches[:3] != batches[3:]
    assert batches == [ft.global_batch(n, size, seed, i) for i in range(6)]
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        ft.global_batch(1, 2, seed, 0)


# --- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, match", [
    pytest.param(["train.max_stepz=3"], "max_stepz", id="typo"),
    pytest.param(["sparse.method=flash"], "sparse.method", id="method"),
    pytest.param(["data.num_frames=8"], "4k", id="frames"),
    pytest.param(["data.video_dir=null"], "no training data", id="no-data"),
    pytest.param(["train.lr"], "key=value", id="not-key-value"),
    pytest.param(["sparse.options.psa.block_1d=3"], r"sparse.options.psa.*unknown PSAProcessor option 'block_1d'",
                 id="option-of-another-method"),
    pytest.param(["sparse.options.gna.stride=4"], r"sparse.options.gna.*stride must be in 1..window",
                 id="bad-option-of-an-unused-method"),
    pytest.param(["sparse.options.tau=0.3"], "one section per method.*sparse.options.vmoba.tau", id="flat-options"),
    pytest.param(["sparse.options.vmoba.dense_layers=[0]"], r"give dense layers as sparse.dense_layers",
                 id="dense-layers-in-options"),
    pytest.param(["sparse.options.vmoba.dense_steps=2"], "dense_steps must be 0", id="dense-steps"),
    pytest.param(["sparse.preset=wan9"], r"sparse.options.vmoba \(with sparse.preset='wan9'.*unknown preset",
                 id="preset"),
    pytest.param(["sparse.backend=cuda"], "sparse.backend must be one of", id="backend"),
])
def test_config_errors(tmp_path, extra, match):
    base = [f"data.video_dir={tmp_path}", f"data.captions={tmp_path}/c.jsonl"]
    with pytest.raises(ValueError, match=match):
        ft.load_config(TINY_CONFIG, base + extra)


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs" / "finetune").glob("*.yaml")))
def test_shipped_training_configs_load_with_every_method(name, method, tmp_path):
    # load_config builds the processor, so a method whose options the YAML gets wrong fails here.
    config = ft.load_config(name, [f"data.latents_dir={tmp_path}", f"sparse.method={method}"])
    assert config.train.max_steps >= 1
    processor = ft.training_processor(config.sparse)
    assert processor.method == method and processor.schedule.dense_steps == 0


@pytest.mark.parametrize("method", ["vmoba", "psa", "gna"])
def test_a_method_preset_does_not_reach_the_other_methods_sections(method, tmp_path):
    """sparse.preset=<method> with the tiny config's sections for all three methods loads: the
    method preset applies to its own method only (a model preset has a section for each)."""
    config = ft.load_config("tiny_wan_vmoba", [f"data.latents_dir={tmp_path}", f"sparse.method={method}",
                                               f"sparse.preset={method}"])
    assert ft.training_processor(config.sparse).method == method
    config = ft.load_config("tiny_wan_vmoba", [f"data.latents_dir={tmp_path}", "sparse.preset=wan2.1-1.3b"])
    assert ft.training_processor(config.sparse).method == "vmoba"


def test_flat_options_in_python_name_the_per_method_sections():
    with pytest.raises(ValueError, match=r"sparse.options must be a mapping with one section per method.*'vmoba': \{'tau'"):
        ft.SparseConfig(options={"block_1d": 2})
    processor = ft.training_processor(ft.SparseConfig(options={"vmoba": {"block_1d": 2}}))
    assert processor.config.block_1d == 2 and processor.config.mode == "threshold"


@pytest.mark.parametrize("method", method_names())
def test_dense_layers_reach_the_processor_of_every_method(tmp_path, method):
    config = ft.load_config(TINY_CONFIG, [f"data.latents_dir={tmp_path}", f"sparse.method={method}",
                                          "sparse.dense_layers=[0]"])
    schedule = ft.training_processor(config.sparse).schedule
    assert schedule.layer_is_dense(0, 2) and not schedule.layer_is_dense(1, 2)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "finetune" / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 2 and config.distributed_type in ("MULTI_GPU", "FSDP", "DEEPSPEED")


@pytest.mark.parametrize("variable, running, refused", [
    pytest.param("ACCELERATE_USE_FSDP", "MULTI_CPU", True, id="fsdp-config-on-cpu"),
    pytest.param("ACCELERATE_USE_DEEPSPEED", "MULTI_CPU", True, id="deepspeed-config-on-cpu"),
    pytest.param("ACCELERATE_USE_FSDP", "FSDP", False, id="fsdp"),
    pytest.param("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED", False, id="deepspeed"),
    pytest.param(None, "MULTI_CPU", False, id="cpu-ddp"),
])
def test_fsdp_or_deepspeed_config_that_accelerate_did_not_apply_is_refused(variable, running, refused):
    from accelerate.utils import DistributedType

    environ = {variable: "true"} if variable else {}
    if refused:
        with pytest.raises(NotImplementedError, match="on GPUs only.*cpu_ddp.yaml"):
            ft.check_distributed_type(DistributedType[running], environ)
    else:
        ft.check_distributed_type(DistributedType[running], environ)


@pytest.mark.parametrize("variant, match", [
    pytest.param("wan2.2-a14b", "two experts", id="wan2.2-a14b"),
    pytest.param("i2v", "image-to-video", id="i2v"),
    pytest.param("t2v", None, id="t2v"),
])
def test_wan_variants_without_their_objective_are_refused(variant, match):
    from vdiff_sparse.tiny_models import tiny_wan_pipeline, tiny_wan_transformer

    pipe = tiny_wan_pipeline(two_experts=variant == "wan2.2-a14b")
    if variant == "i2v":
        pipe.transformer = tiny_wan_transformer(i2v=True)
    if match is None:
        ft.check_trainable_model(pipe)
    else:
        with pytest.raises(NotImplementedError, match=match):
            ft.check_trainable_model(pipe)


# --- training ------------------------------------------------------------------------------------
def test_loss_decreases_on_a_fixed_batch(seed):
    from vdiff_sparse.integration import enable
    from vdiff_sparse.tiny_models import tiny_wan_transformer

    config = ft.load_config(TINY_CONFIG, ["data.latents_dir=unused"])
    model = tiny_wan_transformer(seed=seed % 1000).train()
    processor = ft.training_processor(config.sparse)
    enable(model, processor)
    g = torch.Generator().manual_seed(seed)
    latents, embeds = torch.randn(2, 16, 3, 6, 10, generator=g), torch.randn(2, 16, 32, generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = ft.flow_matching_loss(model, latents, embeds, [seed, seed + 1], config.train)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.75 * losses[0]
    densities = [r.density for r in processor.stats.records]
    assert densities and max(densities) < 0.9, "VMoBA must actually be sparse on this grid"


def test_uninterrupted_run_writes_checkpoints_logs_and_samples(reference_full):
    names = [p.name for p in ft.checkpoints(reference_full)]
    assert names == ["step-00000002", "step-00000004"]
    rows = ft.read_metrics(reference_full)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert np.isfinite(row["loss"]) and 0 < row["density"] < 0.9 and row["tokens_per_s"] > 0
    # 2 samples x 2 micro-batches of 45 tokens per step.
    assert rows[0]["tokens_per_s"] == pytest.approx(180 / rows[0]["step_time_s"], rel=1e-6)
    videos = list((reference_full / "validation").glob("*.mp4"))
    assert [v.name for v in videos] == ["step-00000004-0.mp4"]
    import imageio.v3 as iio

    assert iio.imread(videos[0], index=None).shape == (9, 48, 80, 3)


@pytest.mark.parametrize("settings", [pytest.param(FULL, id="full-accum-ema"), pytest.param(LORA, id="lora")])
def test_killed_run_resumes_exactly(videos, tmp_path, reference_full, settings):
    reference = reference_full
    if settings is LORA:
        reference = tmp_path / "reference"
        run(videos, reference, *settings)
    # "Killed" after step 3: the last checkpoint is step 2, so step 3 is done again.
    killed = run(videos, tmp_path / "run", *settings, "train.stop_after=3")
    assert killed.stopped_early and killed.step == 3 and killed.final_dir is None
    resumed = run(videos, tmp_path / "run", *settings, "resume=latest")
    assert resumed.step == 4 and len(resumed.losses) == 2
    assert [r["step"] for r in ft.read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert_same_run(reference, tmp_path / "run")
    state = checkpoint_state(ft.checkpoints(tmp_path / "run")[-1])
    assert {"step": 4} in [v for k, v in state.items() if k.startswith("custom_checkpoint")]
    assert len(state["optimizer.bin"]["state"]) > 0
    if settings is LORA:
        # Adapters only (plus optimizer and step): the frozen base is rebuilt on resume.
        assert "model.safetensors" not in state
        adapters = state[ft.ADAPTER_CHECKPOINT]
        assert adapters and all("lora_A" in k or "lora_B" in k for k in adapters)
        assert all("lora" in k for k in final_weights(tmp_path / "run"))
        with pytest.raises(ValueError, match="another base or LoRA setting.*rank=2"):
            run(videos, tmp_path / "run", *settings, "train.lora_rank=2", "train.max_steps=5", "resume=latest")
    else:
        assert state["model.safetensors"].keys() == ft.load_pipeline(ft.ModelConfig()).transformer.state_dict().keys()


@pytest.mark.parametrize("method", ["psa", "gna", "dense"])
def test_tiny_config_trains_with_every_method(videos, tmp_path, method):
    # The tiny YAML's options for VMoBA must not reach the other methods.
    result = run(videos, tmp_path, f"sparse.method={method}", "train.max_steps=1")
    rows = ft.read_metrics(tmp_path)
    assert result.step == 1 and np.isfinite(rows[0]["loss"])
    if method == "dense":
        assert rows[0]["density"] == 1.0
    else:
        assert 0 < rows[0]["density"] < 0.9, f"{method} must actually be sparse on the tiny grid"


def test_lora_with_alpha_other_than_rank_loads_at_the_trained_scale(videos, tmp_path):
    # The final adapters loaded with pipe.load_lora_weights give the trained model's outputs:
    # lora_alpha is saved with them (a loader assuming alpha = rank scales them by 1/4 here).
    from peft import LoraConfig
    from safetensors.torch import load_file

    run(videos, tmp_path, *LORA, "train.lora_alpha=16", "train.max_steps=2")
    trained = ft.load_pipeline(ft.ModelConfig()).transformer
    trained.add_adapter(LoraConfig(r=4, lora_alpha=16, init_lora_weights=True,
                                   target_modules=ft.TrainConfig().lora_targets))
    adapters = load_file(str(ft.checkpoints(tmp_path)[-1] / ft.ADAPTER_CHECKPOINT))
    parameters = dict(trained.named_parameters())
    with torch.no_grad():
        for name, value in adapters.items():
            parameters[name].copy_(value)
    loaded = ft.load_pipeline(ft.ModelConfig())
    loaded.load_lora_weights(str(tmp_path / "final"))
    base = ft.load_pipeline(ft.ModelConfig()).transformer
    g = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 16, 3, 6, 10, generator=g), "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": torch.randn(1, 16, 32, generator=g), "return_dict": False}
    with torch.no_grad():
        expected, actual, untrained = (m(**inputs)[0] for m in (trained, loaded.transformer, base))
    assert (expected - untrained).abs().max() > 1e-2, "the adapters must change the output for this test to mean anything"
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_fresh_run_in_a_folder_with_checkpoints_is_refused(videos, tmp_path):
    run(videos, tmp_path, "train.max_steps=2")
    metrics = (tmp_path / "logs" / "metrics.csv").read_text()
    with pytest.raises(ValueError, match=r"already holds checkpoints of an earlier run \(step-00000002\).*--resume latest"):
        run(videos, tmp_path, "train.max_steps=4")
    assert [p.name for p in ft.checkpoints(tmp_path)] == ["step-00000002"]
    assert (tmp_path / "logs" / "metrics.csv").read_text() == metrics
    resumed = run(videos, tmp_path, "train.max_steps=3", "resume=latest")
    assert resumed.step == 3 and len(resumed.losses) == 1


def test_run_starting_at_step_0_begins_a_new_metrics_log(videos, tmp_path):
    # The first run stops before its first checkpoint: its rows are of no run that continues.
    run(videos, tmp_path, "train.stop_after=1")
    assert not ft.checkpoints(tmp_path)
    run(videos, tmp_path, "train.max_steps=2", "resume=latest")
    lines = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["step", "1", "2"]


def test_resumed_run_keeps_its_new_checkpoint_and_drops_later_ones(videos, tmp_path):
    # Resumed from step 2 of a run that reached step 4: with checkpoints_keep=1 the checkpoint
    # kept is the one just written (step 3), and step 4 of the abandoned run is not "latest".
    run(videos, tmp_path)
    assert [p.name for p in ft.checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]
    run(videos, tmp_path, "train.max_steps=3", "train.checkpoint_every=1", "train.checkpoints_keep=1",
        f"resume={ft.checkpoints(tmp_path)[0]}")
    assert [p.name for p in ft.checkpoints(tmp_path)] == ["step-00000003"]


def make_checkpoint(run_dir: Path, step: int) -> Path:
    """An empty stand-in of a checkpoint folder (what :func:`ft.is_checkpoint` looks for)."""
    folder = run_dir / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "custom_checkpoint_0.pkl").write_bytes(b"")
    return folder


@pytest.mark.parametrize("resume, match", [
    pytest.param("{run}", r"is a run's folder, not a checkpoint.*resume='{run}/checkpoints/step-00000004'"
                          r".*step-00000002, step-00000004.*output_dir='{run}' with resume=latest", id="output-dir"),
    pytest.param("{run}/checkpoints", r"is a run's folder, not a checkpoint.*step-00000004", id="checkpoints-dir"),
    pytest.param("{empty}", r"'{empty}' is not a checkpoint folder.*checkpoints/step-N", id="empty-dir"),
    pytest.param("{run}/gone", "not a folder", id="missing"),
    pytest.param(None, r"output_dir '{run}' already holds checkpoints.*--resume latest", id="fresh-start"),
])
def test_resume_that_is_not_a_checkpoint_says_where_the_checkpoints_are(tmp_path, resume, match):
    run_dir, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    make_checkpoint(run_dir, 2)
    make_checkpoint(run_dir, 4)
    names = {"run": run_dir, "empty": empty}
    with pytest.raises(ValueError, match=match.format(**{k: re.escape(str(v)) for k, v in names.items()})):
        ft.resolve_resume(resume and resume.format(**names), run_dir)


def test_resume_finds_checkpoints(tmp_path):
    assert ft.resolve_resume(None, tmp_path) is None and ft.resolve_resume("latest", tmp_path) is None
    newest = make_checkpoint(tmp_path, 4)
    make_checkpoint(tmp_path, 2)
    assert ft.resolve_resume("latest", tmp_path) == newest
    assert ft.resolve_resume(str(newest), tmp_path / "elsewhere") == newest


def test_interrupted_checkpoint_write_keeps_the_last_checkpoint(videos, tmp_path, reference_full, monkeypatch):
    from accelerate import Accelerator

    save_state = Accelerator.save_state

    def dies_while_writing_step_4(self, output_dir, **kwargs):
        location = save_state(self, output_dir, **kwargs)
        if output_dir.endswith("00000004"):
            optimizer = Path(output_dir) / "optimizer.bin"
            optimizer.write_bytes(optimizer.read_bytes()[:100])  # torn file, then the process dies
            raise KeyboardInterrupt("killed while writing the step-4 checkpoint")
        return location

    monkeypatch.setattr(Accelerator, "save_state", dies_while_writing_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(videos, tmp_path, *FULL)
    assert [p.name for p in ft.checkpoints(tmp_path)] == ["step-00000002"]
    monkeypatch.undo()
    resumed = run(videos, tmp_path, *FULL, "resume=latest")
    assert resumed.step == 4 and len(resumed.losses) == 2
    assert not list((tmp_path / "checkpoints").glob(".partial*"))
    assert_same_run(reference_full, tmp_path)


def _launch(videos: Path, output_dir: Path, *extra: str, kill_after_first_checkpoint: bool = False) -> None:
    """The tiny config on 2 CPU processes (``cpu_ddp.yaml``); with ``kill_after_first_checkpoint``
    the launcher and both workers get SIGKILL, as a preempted job, as soon as the first
    checkpoint is complete (that is, early in the next step)."""
    import signal
    import time

    import psutil

    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configs" / "finetune" / "accelerate" / "cpu_ddp.yaml"),
        "--main_process_port", "0",
        "-m", "vdiff_sparse.pipelines.finetune", "--config", str(TINY_CONFIG),
        *overrides(videos, output_dir, *extra),
    ]
    log = output_dir.with_name(output_dir.name + "-launch.log")
    with open(log, "w") as sink:
        launcher = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
    family = [psutil.Process(launcher.pid)]
    try:
        if kill_after_first_checkpoint:
            deadline = time.monotonic() + 240
            while not ft.checkpoints(output_dir) and launcher.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert launcher.poll() is None, "the run ended before it could be killed:\n" + log.read_text()[-3000:]
            family += family[0].children(recursive=True)  # the workers run in sessions of their own
            for process in family:
                process.send_signal(signal.SIGKILL)
        returncode = launcher.wait(timeout=240)
    finally:
        for process in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(family, timeout=30)
    assert returncode == (-signal.SIGKILL if kill_after_first_checkpoint else 0), log.read_text()[-6000:]


@pytest.mark.slow
def test_two_processes_killed_resume_and_match_one_process(videos, tmp_path, reference_full):
    # Per-process batch 1 on 2 processes = the reference's global batch 2 (same samples, same
    # noise), gradients averaged by DDP instead of within the batch: equal up to rounding.
    out, cache = tmp_path / "ddp", f"data.cache_dir={tmp_path / 'cache'}"
    per_process = ("train.batch_size=1", "train.grad_accum=2", "train.ema_decay=0.9")
    _launch(videos, out, *per_process, cache, kill_after_first_checkpoint=True)
    assert ft.checkpoints(out)[0].name == "step-00000002" and not (out / "final").exists()
    _launch(videos, out, *per_process, "--resume", "latest", cache)
    assert [p.name for p in ft.checkpoints(out)] == ["step-00000002", "step-00000004"]
    rows = ft.read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    reference_rows = ft.read_metrics(reference_full)
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in reference_rows], rtol=1e-4)
    expected, actual = final_weights(reference_full), final_weights(out)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_lora_checkpoint_of_two_processes_resumes_on_one(videos, tmp_path):
    # LoRA checkpoints are written by a 2-process run (per-process batch 1, killed after step 3)
    # and resumed by one process with batch 2: the same global batches, so the same run as one
    # uninterrupted process up to the rounding of DDP's gradient averaging.
    out, cache = tmp_path / "ddp", f"data.cache_dir={tmp_path / 'cache'}"
    _launch(videos, out, *LORA, "train.stop_after=3", cache)
    state = checkpoint_state(ft.checkpoints(out)[-1])
    assert "model.safetensors" not in state and all("lora" in k for k in state[ft.ADAPTER_CHECKPOINT])
    resumed = run(videos, out, *LORA, "train.batch_size=2", "resume=latest", cache)
    assert resumed.step == 4 and len(resumed.losses) == 2
    reference = tmp_path / "reference"
    run(videos, reference, *LORA, "train.batch_size=2", cache)
    np.testing.assert_allclose([r["loss"] for r in ft.read_metrics(out)],
                               [r["loss"] for r in ft.read_metrics(reference)], rtol=1e-4)
    # Adam turns rounding-level differences of near-zero gradients (adapters whose B starts at 0)
    # into steps of up to lr: seen 3e-5 here, against >= 9e-3 in every tensor for one step less.
    expected, actual = final_weights(reference), final_weights(out)
    assert expected.keys() == actual.keys() and len(expected) > 0
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=2e-4, msg=name)
