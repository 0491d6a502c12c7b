"""Encoding training clips once, as the Wan pipelines encode their inputs: VAE latents
normalised as the denoiser sees them, UMT5 prompt embeddings, and for image-conditioned models
the encoded first frame (and Wan 2.1 I2V's CLIP image tokens)."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .models import ModelTask

Frames = torch.Tensor  # [1, 3, F, H, W] in [-1, 1]


def latent_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's per-channel latent mean and std, ``[1, C, 1, 1, 1]``."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    return torch.tensor(vae.config.latents_mean).view(shape), torch.tensor(vae.config.latents_std).view(shape)


def text_pipeline(pipe):
    """A ``WanPipeline`` sharing ``pipe``'s tokenizer and text encoder: its ``encode_prompt``
    (unlike the image-to-video pipeline's, in diffusers 0.42) works without ``ftfy``."""
    from diffusers import WanPipeline

    return pipe if isinstance(pipe, WanPipeline) else WanPipeline(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, scheduler=pipe.scheduler,
        transformer=pipe.transformer, transformer_2=getattr(pipe, "transformer_2", None),
        boundary_ratio=pipe.config.get("boundary_ratio"),
    )


def _vae_latents(pipe, frames: Frames, device) -> torch.Tensor:
    """Normalised VAE mode latents ``[C, T, h, w]`` of ``frames`` (``(z - mean) / std``)."""
    mean, std = latent_stats(pipe.vae)
    z = pipe.vae.encode(frames.to(device, pipe.vae.dtype)).latent_dist.mode().float().cpu()
    return ((z - mean) / std)[0]


def first_frame_mask(num_frames: int, latent_hw: tuple[int, int], temporal: int) -> torch.Tensor:
    """The image-to-video mask channels ``[temporal, T, h, w]`` of ``WanImageToVideoPipeline``:
    ones on the first frame's slots, zeros after (the first frame is repeated ``temporal``
    times so that the ``num_frames`` pixel frames fill whole latent frames)."""
    h, w = latent_hw
    mask = torch.zeros(1, 1, num_frames, h, w)
    mask[:, :, 0] = 1
    mask = torch.cat([mask[:, :, :1].repeat_interleave(temporal, dim=2), mask[:, :, 1:]], dim=2)
    return mask.view(1, -1, temporal, h, w).transpose(1, 2)[0]


def first_frame_image(frames: Frames):
    """The first frame of ``frames`` as an ``[H, W, 3]`` uint8 array (what a user's image is)."""
    return ((frames[0, :, 0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def condition_encoder(pipe, task: ModelTask, device) -> Optional[Callable[[Frames], Dict[str, torch.Tensor]]]:
    """For image-conditioned models, frames -> ``{"condition": ..., "image_embeds": ...}``:

    * ``i2v``: ``condition`` ``[4 + C, T, h, w]``, the mask of :func:`first_frame_mask` and the
      normalised latents of the first frame followed by black frames; ``image_embeds``
      ``[tokens, image_dim]`` (Wan 2.1), CLIP's second-to-last hidden states of the first frame.
    * ``ti2v``: ``condition`` ``[C, 1, h, w]``, the normalised latents of the first frame alone.

    ``None`` for text-to-video models.
    """
    if task.kind == "t2v":
        return None

    def encode(frames: Frames) -> Dict[str, torch.Tensor]:
        first = frames[:, :, :1]
        if task.kind == "ti2v":
            return {"condition": _vae_latents(pipe, first, device)}
        video = torch.cat([first, first.new_zeros(*first.shape[:2], frames.shape[2] - 1, *first.shape[3:])], dim=2)
        latents = _vae_latents(pipe, video, device)
        mask = first_frame_mask(frames.shape[2], latents.shape[-2:], pipe.vae_scale_factor_temporal)
        out = {"condition": torch.cat([mask, latents], dim=0)}
        if task.image_tokens:
            image = pipe.image_processor(images=first_frame_image(frames), return_tensors="pt")
            encoder = pipe.image_encoder
            hidden = encoder(pixel_values=image.pixel_values.to(device, encoder.dtype), output_hidden_states=True)
            out["image_embeds"] = hidden.hidden_states[-2][0].float().cpu()
        return out

    return encode


def clip_encoders(pipe, task: ModelTask, max_text_len: int, device):
    """``(encode_video, encode_prompt, encode_condition)`` for
    :func:`~vdiff_sparse.pipelines.data.build_cache`: latents ``[C, T, h, w]``, prompt
    embeddings ``[L, D]``, and :func:`condition_encoder`."""
    text = text_pipeline(pipe)

    def encode_video(frames: Frames) -> torch.Tensor:
        return _vae_latents(pipe, frames, device)

    def encode_prompt(caption: str) -> torch.Tensor:
        embeds, _ = text.encode_prompt(caption, do_classifier_free_guidance=False,
                                       max_sequence_length=max_text_len, device=device)
        return embeds[0].float().cpu()

    return encode_video, encode_prompt, condition_encoder(pipe, task, device)


__all__ = ["clip_encoders", "condition_encoder", "first_frame_image", "first_frame_mask", "latent_stats",
           "text_pipeline"]
