"""Tiny random diffusers pipelines of the newer video families, built offline from configs.

For tests and demos: each builder seeds torch and assembles the family's own diffusers pipeline
on CPU in float32 from tiny components (the transformers of :mod:`vdiff_sparse.tiny_models`,
VAEs and encoders from their config classes) and downloads nothing. Pipelines whose text
encoders need a downloaded tokenizer are run with prompt embeddings (:func:`tiny_prompt_embeds`
and the like) instead.
"""

from __future__ import annotations

import torch

from .tiny_models import (
    tiny_chronoedit_transformer,
    tiny_cosmos_transformer,
    tiny_hunyuan_video15_transformer,
    tiny_skyreels_v2_transformer,
    tiny_text_encoder,
    tiny_wan_light_vae,
    tiny_wan_vace_transformer,
)


def tiny_prompt_embeds(prompt: str, *, length: int = 16, seed: int = 0) -> torch.Tensor:
    """UMT5 embeddings ``[1, length, 32]`` of ``prompt`` from :func:`tiny_text_encoder`, for
    pipelines whose own prompt cleaning needs ``ftfy`` (not a dependency here)."""
    tokenizer, text_encoder = tiny_text_encoder(seed=seed)
    tokens = tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return text_encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state


def tiny_skyreels_v2_pipeline(*, seed: int = 0):
    """A ``SkyReelsV2Pipeline`` (text-to-video): :func:`tiny_wan_light_vae`, the tiny UMT5, a tiny
    SkyReels-V2 transformer, the flow UniPC scheduler of the released models."""
    from diffusers import SkyReelsV2Pipeline, UniPCMultistepScheduler

    tokenizer, text_encoder = tiny_text_encoder(seed=seed)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    return SkyReelsV2Pipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_wan_light_vae(seed=seed),
                              scheduler=scheduler, transformer=tiny_skyreels_v2_transformer(seed=seed))


def tiny_wan_vace_pipeline(*, seed: int = 0):
    """A ``WanVACEPipeline``: the control channels are 2 x 16 latent channels and the 2 x 2 mask
    pixels of :func:`tiny_wan_light_vae`'s spatial compression."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline

    tokenizer, text_encoder = tiny_text_encoder(seed=seed)
    return WanVACEPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_wan_light_vae(seed=seed),
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                           transformer=tiny_wan_vace_transformer(seed=seed, vace_in_channels=36))


def tiny_chronoedit_pipeline(*, seed: int = 0):
    """A ``ChronoEditPipeline`` (image editing as a short video): a tiny CLIP vision encoder and
    image processor (32-pixel crops) built from configs; the transformer takes 16 noise, 2 mask
    (:func:`tiny_wan_light_vae`'s temporal compression) and 16 image-condition channels."""
    from diffusers import ChronoEditPipeline, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    tokenizer, text_encoder = tiny_text_encoder(seed=seed)
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, projection_dim=16, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        intermediate_size=16, patch_size=8)).eval()
    return ChronoEditPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, image_encoder=image_encoder,
        image_processor=CLIPImageProcessor(crop_size=32, size=32), vae=tiny_wan_light_vae(seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=tiny_chronoedit_transformer(seed=seed, in_channels=34, added_kv_proj_dim=None),
    )


class PassThroughSafetyChecker(torch.nn.Module):
    """Stands in for Cosmos' guardrail (``cosmos_guardrail``, large models), which Cosmos
    pipelines require: every prompt passes, every video is returned as it is."""

    def __init__(self):
        super().__init__()
        self.register_buffer("_where", torch.zeros(1), persistent=False)  # pipelines read .device, .dtype

    @property
    def device(self) -> torch.device:
        return self._where.device

    @property
    def dtype(self) -> torch.dtype:
        return self._where.dtype

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames):
        return frames


def tiny_cosmos2_video2world_pipeline(*, seed: int = 0):
    """A ``Cosmos2VideoToWorldPipeline`` (Cosmos-Predict 2): :func:`tiny_wan_light_vae`, a tiny Cosmos
    transformer taking the condition-mask channel (text_embed_dim 32, the tiny UMT5's width), the
    pass-through safety checker. Run it with prompt embeddings."""
    from diffusers import Cosmos2VideoToWorldPipeline, FlowMatchEulerDiscreteScheduler

    tokenizer, text_encoder = tiny_text_encoder(seed=seed)
    return Cosmos2VideoToWorldPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, vae=tiny_wan_light_vae(seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
        transformer=tiny_cosmos_transformer(seed=seed, in_channels=17, out_channels=16, text_embed_dim=32),
        safety_checker=PassThroughSafetyChecker(),
    )


def tiny_hunyuan_video15_pipeline(*, seed: int = 0):
    """A ``HunyuanVideo15Pipeline`` (text-to-video): a tiny ``AutoencoderKLHunyuanVideo15`` (4x
    spatial, 2x temporal compression), a tiny HunyuanVideo 1.5 transformer taking the latents,
    the image-condition latents and the mask (9 channels), classifier-free guidance. Its text
    encoders (Qwen2.5-VL, ByT5) need downloaded tokenizers: run it with
    :func:`tiny_hunyuan_video15_prompt` embeddings."""
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from diffusers.guiders import ClassifierFreeGuidance

    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        spatial_compression_ratio=4, temporal_compression_ratio=2, downsample_match_channel=False,
        upsample_match_channel=False).eval()
    return HunyuanVideo15Pipeline(
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), guider=ClassifierFreeGuidance(guidance_scale=2.0),
        transformer=tiny_hunyuan_video15_transformer(seed=seed, in_channels=9),
    )


def tiny_hunyuan_video15_prompt(*, seed: int = 0) -> dict:
    """Random prompt and negative-prompt embeddings for :func:`tiny_hunyuan_video15_pipeline`
    (Qwen text 8 tokens, ByT5 text 4 tokens; the negative prompt's last Qwen tokens are
    padding)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, 8)
    return dict(prompt_embeds=torch.randn(1, 8, 16, generator=g), prompt_embeds_mask=mask,
                prompt_embeds_2=torch.randn(1, 4, 8, generator=g), prompt_embeds_mask_2=torch.ones(1, 4),
                negative_prompt_embeds=torch.randn(1, 8, 16, generator=g),
                negative_prompt_embeds_mask=torch.tensor([[1.0] * 5 + [0.0] * 3]),
                negative_prompt_embeds_2=torch.randn(1, 4, 8, generator=g), negative_prompt_embeds_mask_2=mask[:, :4])
