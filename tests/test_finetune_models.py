"""Wan image-to-video, Wan 2.2 TI2V and Wan 2.2 A14B (one expert per run) on their tiny
configs: the image condition is encoded as the pipelines encode it, each config trains, resumes
exactly, and its weights load back into the diffusers pipeline and generate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from finetune_support import CONFIGS, assert_same_run, final_weights, run, write_dataset
from vdiff_sparse.pipelines import data as ft_data
from vdiff_sparse.pipelines import finetune as ft
from vdiff_sparse.pipelines.finetune.encoders import condition_encoder, first_frame_image

SHORT = ("train.max_steps=2", "train.checkpoint_every=1")


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("image") / "first.png"
    y, x = np.mgrid[0:48, 0:80]
    Image.fromarray(np.stack([x * 3, y * 5, (x + y) * 2], -1).astype(np.uint8)).save(path)
    return path


def _task(name: str, *extra: str):
    config = ft.load_config(CONFIGS / f"{name}.yaml", ["data.latents_dir=unused", *extra])
    pipe = ft.load_pipeline(config.model, seed=config.seed)
    return pipe, ft.describe_model(pipe, config), config


def test_i2v_condition_is_encoded_as_the_pipeline_encodes_it(videos):
    pipe, task, _ = _task("tiny_wan_i2v")
    assert task.kind == "i2v" and task.image_tokens and task.sample_keys[-2:] == ("condition", "image_embeds")
    frames = ft_data.read_video(videos / "clip0.mp4", 9, 48, 80)[None]
    encoded = condition_encoder(pipe, task, "cpu")(frames)
    with torch.no_grad():
        _, condition = pipe.prepare_latents(frames[:, :, 0], 1, 16, 48, 80, 9, torch.float32, "cpu",
                                            torch.Generator().manual_seed(0))
        image_embeds = pipe.encode_image(first_frame_image(frames), "cpu")
    assert encoded["condition"].shape == (20, 3, 6, 10)
    torch.testing.assert_close(encoded["condition"], condition[0])
    torch.testing.assert_close(encoded["image_embeds"], image_embeds[0])


def test_ti2v_condition_is_encoded_as_the_pipeline_encodes_it(videos):
    from diffusers import WanImageToVideoPipeline

    pipe, task, _ = _task("tiny_wan2.2_ti2v")
    assert task.kind == "ti2v" and task.i2v_fraction == 0.5 and not task.image_tokens
    frames = ft_data.read_video(videos / "clip0.mp4", 9, 96, 160)[None]
    encoded = condition_encoder(pipe, task, "cpu")(frames)
    with torch.no_grad():
        _, condition, mask = WanImageToVideoPipeline.from_pipe(pipe).prepare_latents(
            frames[:, :, 0], 1, 48, 96, 160, 9, torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert encoded["condition"].shape == (48, 1, 6, 10) and mask[0, 0, :, 0, 0].tolist() == [0, 1, 1]
    torch.testing.assert_close(encoded["condition"], condition[0])


@pytest.mark.parametrize("name, extra, match", [
    pytest.param("tiny_wan2.2_a14b", ["model.expert=null"], "two experts.*model.expert=high_noise", id="no-expert"),
    pytest.param("tiny_wan_vmoba", ["model.expert=low_noise"], "has one transformer", id="expert-of-one"),
    pytest.param("tiny_wan_i2v", ["data.max_text_len=16"], "exactly 512 text tokens", id="i2v-text-length"),
    pytest.param("tiny_wan_vmoba", ["train.i2v_fraction=0.5"], "t2v model, which trains only with i2v_fraction=0.0",
                 id="t2v-fraction"),
    pytest.param("tiny_wan_i2v", ["train.i2v_fraction=0"], "i2v model, which trains only with i2v_fraction=1.0",
                 id="i2v-fraction"),
    pytest.param("tiny_wan2.2_ti2v", ["data.height=48", "data.width=80"], r"48 x 80: this model needs multiples of 32 x 32",
                 id="ti2v-size"),
])
def test_settings_that_do_not_fit_the_model_are_refused(name, extra, match):
    with pytest.raises(ft.SetupError, match=match):
        _task(name, *extra)


def test_variants_without_an_objective_are_refused():
    from vdiff_sparse.tiny_models import tiny_wan_pipeline, tiny_wan_transformer

    pipe = tiny_wan_pipeline()
    pipe.transformer = tiny_wan_transformer(in_channels=20)
    with pytest.raises(NotImplementedError, match="in_channels 20, out_channels 16"):
        ft.describe_model(pipe, ft.load_config("tiny_wan_vmoba", ["data.latents_dir=unused"]))


def _generate(pipe, image_path: Path | None = None, num_inference_steps: int = 4, **kwargs) -> np.ndarray:
    from PIL import Image

    from vdiff_sparse.pipelines.finetune.encoders import text_pipeline

    positive, _ = text_pipeline(pipe).encode_prompt("a red cat", do_classifier_free_guidance=False,
                                                   max_sequence_length=kwargs.pop("max_text_len"), device="cpu")
    if image_path is not None:
        kwargs["image"] = Image.open(image_path).convert("RGB")
    with torch.no_grad():
        out = pipe(prompt_embeds=positive, guidance_scale=1.0, output_type="np",
                   num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(0), **kwargs)
    return np.asarray(out.frames[0])


def _resumes_exactly(videos: Path, tmp_path: Path, name: str, *extra: str, component: str = "transformer") -> Path:
    config = CONFIGS / f"{name}.yaml"
    reference = tmp_path / "reference"
    run(videos, reference, *SHORT, *extra, config=config)
    stopped = run(videos, tmp_path / "run", *SHORT, *extra, "train.stop_after=1", config=config)
    assert stopped.stopped_early and stopped.step == 1
    resumed = run(videos, tmp_path / "run", *SHORT, *extra, "resume=latest", config=config)
    assert resumed.step == 2 and [e["step"] for e in resumed.evaluations][0] == 0
    assert_same_run(reference, tmp_path / "run", component)
    return reference


def test_i2v_trains_resumes_and_loads_into_its_pipeline(videos, tmp_path, image):
    from diffusers import WanTransformer3DModel

    out = _resumes_exactly(videos, tmp_path, "tiny_wan_i2v", "validation.every=2", "validation.steps=2",
                           "validation.prompts=[a red cat]", f"validation.images=[{image}]")
    assert (out / "validation" / "teacher-0.mp4").is_file()
    pipe, base = ft.load_pipeline(ft.ModelConfig(name="tiny-wan-i2v")), ft.load_pipeline(ft.ModelConfig(name="tiny-wan-i2v"))
    pipe.transformer = WanTransformer3DModel.from_pretrained(str(out / "final" / "transformer"))
    size = dict(num_frames=9, height=48, width=80, max_text_len=512)
    trained, untrained = _generate(pipe, image, **size), _generate(base, image, **size)
    assert trained.shape == (9, 48, 80, 3) and np.abs(trained - untrained).max() > 1e-4


def test_ti2v_trains_resumes_and_loads_into_its_pipelines(videos, tmp_path, image):
    from diffusers import WanImageToVideoPipeline

    out = _resumes_exactly(videos, tmp_path, "tiny_wan2.2_ti2v", "train.lora_rank=4", "train.lr=1e-2",
                           "validation.every=2", "validation.steps=2", f"validation.images=[{image}]")
    pipe, base = ft.load_pipeline(ft.ModelConfig(name="tiny-wan2.2-ti2v")), ft.load_pipeline(ft.ModelConfig(name="tiny-wan2.2-ti2v"))
    pipe.load_lora_weights(str(out / "final"))
    size = dict(num_frames=9, height=96, width=160, max_text_len=16)
    assert np.abs(_generate(pipe, **size) - _generate(base, **size)).max() > 1e-4
    from_image = _generate(WanImageToVideoPipeline.from_pipe(pipe), image, **size)
    assert from_image.shape == (9, 96, 160, 3)


def test_a14b_experts_train_on_their_own_noise_levels_and_generate_together(videos, tmp_path):
    """The high-noise expert (LoRA) and the low-noise one (full weights) are trained in two runs
    and loaded into one pipeline, which then generates with both trained experts."""
    from diffusers import WanTransformer3DModel

    high = _resumes_exactly(videos, tmp_path / "high", "tiny_wan2.2_a14b", "train.lr=1e-2", "validation.every=2",
                            "validation.steps=4")
    low = tmp_path / "low"
    run(videos, low, *SHORT, "model.expert=low_noise", "train.lora_rank=0", config=CONFIGS / "tiny_wan2.2_a14b.yaml")
    for folder, expected in ((high, [0.5, 1.0]), (low, [0.0, 0.5])):
        import json

        report = json.loads((folder / "final" / "report.json").read_text())
        assert report["model"]["sigma_range"] == expected
        assert all(expected[0] <= s < expected[1] for s in report["heldout"]["sigmas"])
    assert (low / "final" / "transformer_2" / "config.json").is_file()
    pipe = ft.load_pipeline(ft.ModelConfig(name="tiny-wan2.2-a14b"))
    pipe.load_lora_weights(str(high / "final"))
    pipe.transformer_2 = WanTransformer3DModel.from_pretrained(str(low / "final" / "transformer_2"))
    trained_low = final_weights(low, "transformer_2")
    assert all(torch.equal(trained_low[k], v) for k, v in pipe.transformer_2.state_dict().items())
    # 8 steps: the last ones fall below the boundary (timestep 500), where transformer_2 denoises.
    size = dict(num_frames=9, height=48, width=80, max_text_len=16, num_inference_steps=8)
    both = _generate(pipe, **size)
    base = ft.load_pipeline(ft.ModelConfig(name="tiny-wan2.2-a14b"))
    only_high = ft.load_pipeline(ft.ModelConfig(name="tiny-wan2.2-a14b"))
    only_high.load_lora_weights(str(high / "final"))
    untrained, high_only = _generate(base, **size), _generate(only_high, **size)
    # Same seed, float32: without the adapters the videos would be equal to the last bit; the
    # high-noise steps' change is small by the end of denoising, so any difference counts.
    assert np.abs(both - high_only).max() > 1e-4 and np.abs(high_only - untrained).max() > 1e-6
