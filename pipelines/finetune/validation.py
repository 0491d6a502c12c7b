"""Validation videos: the sparse student's and the dense teacher's of the same seed, written
as mp4 and compared (PSNR, SSIM)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from .config import FinetuneConfig, SetupError
from .models import ModelTask
from .schedule import VALIDATION_STREAM, seed_of


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """``[F, H, W, 3]`` floats in [0, 1] to an mp4."""
    import imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(str(path), (np.clip(frames, 0, 1) * 255).round().astype(np.uint8), fps=fps)


def validation_images(config: FinetuneConfig, task: ModelTask) -> Optional[list]:
    """The images of ``validation.images`` (RGB), or ``None`` when the videos are generated from
    text alone.

    Raises:
        SetupError: an image-to-video model validated without images, or an unreadable image.
    """
    v = config.validation
    if not (v.every and v.prompts):
        return None
    if not v.images:
        if task.kind == "i2v":
            raise SetupError("validation.images: an image-to-video model needs one image per validation prompt "
                             f"({len(v.prompts)} prompts)")
        return None
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in v.images:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise SetupError(f"validation.images: cannot read {path!r} ({e})") from None
    return images


def generate(pipe, config: FinetuneConfig, images: Optional[list], device, autocast) -> List[np.ndarray]:
    """One video ``[F, H, W, 3]`` in [0, 1] per validation prompt, with the pipeline's current
    transformers and processors; prompt ``i`` uses the seed ``(seed, i)`` every time."""
    from diffusers import WanImageToVideoPipeline

    from .encoders import text_pipeline

    v = config.validation
    generator_pipe = pipe
    if images is not None and not isinstance(pipe, WanImageToVideoPipeline):
        generator_pipe = WanImageToVideoPipeline.from_pipe(pipe)  # Wan 2.2 TI2V from an image
    text = text_pipeline(pipe)
    transformers = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
    modes = [m.training for m in transformers]
    for module in (pipe.vae, pipe.text_encoder, getattr(pipe, "image_encoder", None), *transformers):
        if module is not None:
            module.to(device).eval()
    videos = []
    try:
        for i, prompt in enumerate(v.prompts):
            generator = torch.Generator("cpu").manual_seed(seed_of(config.seed, VALIDATION_STREAM, i))
            with torch.no_grad():
                positive, negative = text.encode_prompt(prompt, do_classifier_free_guidance=v.guidance_scale > 1,
                                                        max_sequence_length=config.data.max_text_len, device=device)
                kwargs = {} if images is None else {"image": images[i]}
                with autocast():
                    out = generator_pipe(
                        prompt_embeds=positive, negative_prompt_embeds=negative,
                        num_frames=v.num_frames or config.data.num_frames, height=v.height or config.data.height,
                        width=v.width or config.data.width, num_inference_steps=v.steps,
                        guidance_scale=v.guidance_scale, generator=generator, output_type="np", **kwargs,
                    )
            videos.append(np.asarray(out.frames[0], dtype=np.float32))
    finally:
        for module, training in zip(transformers, modes):
            module.train(training)
    return videos


def compare_videos(student: List[np.ndarray], teacher: List[np.ndarray]) -> dict:
    """Mean PSNR (dB) and SSIM of the student's videos against the teacher's (same seeds)."""
    from vdiff_sparse.pipelines.report import psnr, ssim

    pairs = [(np.round(s * 255), np.round(t * 255)) for s, t in zip(student, teacher)]
    return {"psnr_db": float(np.mean([psnr(s, t) for s, t in pairs])),
            "ssim": float(np.mean([ssim(s, t) for s, t in pairs]))}


def save_videos(output_dir: Path, name: str, videos: List[np.ndarray], fps: int) -> List[Path]:
    """``<output_dir>/validation/<name>-<i>.mp4`` for each video."""
    paths = [Path(output_dir) / "validation" / f"{name}-{i}.mp4" for i in range(len(videos))]
    for path, video in zip(paths, videos):
        write_video(path, video, fps)
    return paths


__all__ = ["compare_videos", "generate", "save_videos", "validation_images", "write_video"]
