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
    tiny_hunyuan_video_framepack_transformer,
    tiny_kandinsky5_transformer,
    tiny_ltx2_transformer,
    tiny_skyreels_v2_transformer,
    tiny_text_encoder,
    tiny_wan_light_vae,
    tiny_wan_animate_transformer,
    tiny_wan_vace_transformer,
    tiny_wan_vae,
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


def _tiny_clip_image_encoder(seed: int):
    """A tiny CLIP vision encoder (width 16) and image processor (32-pixel crops) built from
    configs, the image conditioning of Wan's image-to-video models."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, projection_dim=16, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        intermediate_size=16, patch_size=8)).eval()
    return encoder, CLIPImageProcessor(crop_size=32, size=32)


def tiny_wan_animate_pipeline(*, seed: int = 0):
    """A ``WanAnimatePipeline`` (character animation from pose and face videos): :func:`tiny_wan_vae`
    (the pipeline's face frames assume Wan's 4x temporal compression), the tiny CLIP image
    encoder, a tiny Wan-Animate transformer (16 latent channels, 16-pixel faces). Its segments
    are 77 frames long."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanAnimatePipeline

    tokenizer, text_encoder = tiny_text_encoder(seed=seed)
    image_encoder, image_processor = _tiny_clip_image_encoder(seed)
    return WanAnimatePipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_wan_vae(seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=tiny_wan_animate_transformer(seed=seed, in_channels=36, latent_channels=16, out_channels=16),
    )


def tiny_chronoedit_pipeline(*, seed: int = 0):
    """A ``ChronoEditPipeline`` (image editing as a short video): the tiny CLIP image encoder;
    the transformer takes 16 noise, 2 mask
    (:func:`tiny_wan_light_vae`'s temporal compression) and 16 image-condition channels."""
    from diffusers import ChronoEditPipeline, FlowMatchEulerDiscreteScheduler

    tokenizer, text_encoder = tiny_text_encoder(seed=seed)
    image_encoder, image_processor = _tiny_clip_image_encoder(seed)
    return ChronoEditPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, image_encoder=image_encoder,
        image_processor=image_processor, vae=tiny_wan_light_vae(seed=seed),
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


def tiny_hunyuan_video_vae(*, seed: int = 0):
    """A tiny ``AutoencoderKLHunyuanVideo`` (16 latent channels, 8x spatial and 4x temporal
    compression), the VAE of Kandinsky 5 and HunyuanVideo-FramePack."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    return AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=16, act_fn="silu", block_out_channels=[8, 8, 8],
        down_block_types=["HunyuanVideoDownBlock3D"] * 3, up_block_types=["HunyuanVideoUpBlock3D"] * 3,
        layers_per_block=1, mid_block_add_attention=False, norm_num_groups=4, scaling_factor=0.476986,
        spatial_compression_ratio=8, temporal_compression_ratio=4).eval()


def tiny_kandinsky5_pipeline(*, seed: int = 0):
    """A ``Kandinsky5T2VPipeline``: :func:`tiny_hunyuan_video_vae` and a tiny Kandinsky 5
    transformer (Qwen width 16, CLIP width 8). Its text encoders (Qwen2.5-VL, CLIP) need
    downloaded tokenizers: run it with :func:`tiny_kandinsky5_prompt` embeddings."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5T2VPipeline

    return Kandinsky5T2VPipeline(
        transformer=tiny_kandinsky5_transformer(seed=seed, in_visual_dim=16, out_visual_dim=16),
        vae=tiny_hunyuan_video_vae(seed=seed), text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def tiny_kandinsky5_prompt(*, seed: int = 0) -> dict:
    """Random prompt (8 tokens) and negative-prompt (5 tokens) embeddings for
    :func:`tiny_kandinsky5_pipeline`, with their cumulative sequence lengths."""
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds_qwen=torch.randn(1, 8, 16, generator=g), prompt_embeds_clip=torch.randn(1, 8, generator=g),
                prompt_cu_seqlens=torch.tensor([0, 8], dtype=torch.int32),
                negative_prompt_embeds_qwen=torch.randn(1, 5, 16, generator=g),
                negative_prompt_embeds_clip=torch.randn(1, 8, generator=g),
                negative_prompt_cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


def tiny_hunyuan_video_framepack_pipeline(*, seed: int = 0):
    """A ``HunyuanVideoFramepackPipeline`` (image-to-video by sections, with packed history):
    :func:`tiny_hunyuan_video_vae`, a tiny SigLIP image encoder and processor (32-pixel images)
    built from configs, a tiny FramePack transformer. Its text encoders (Llama, CLIP) need
    downloaded tokenizers: run it with :func:`tiny_framepack_prompt` embeddings."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    image_encoder = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8)).eval()
    return HunyuanVideoFramepackPipeline(
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=tiny_hunyuan_video_framepack_transformer(seed=seed, in_channels=16, out_channels=16),
        vae=tiny_hunyuan_video_vae(seed=seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_encoder=image_encoder, feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}))


def tiny_framepack_prompt(*, seed: int = 0) -> dict:
    """Random prompt embeddings (8 tokens, the last 2 padding) and pooled embeddings for
    :func:`tiny_hunyuan_video_framepack_pipeline`."""
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(1, 8, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                prompt_attention_mask=torch.tensor([[1] * 6 + [0] * 2]))


def tiny_ltx2_pipeline(*, seed: int = 0):
    """An ``LTX2Pipeline`` (joint video and audio): tiny text connectors, video VAE,
    audio VAE and vocoder built from their configs, a tiny LTX-2 transformer with split RoPE. Its
    text encoder (Gemma 3) needs a downloaded tokenizer: run it with :func:`tiny_ltx2_prompt`
    embeddings (the text encoder's 3 hidden states of width 16, stacked)."""
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler, LTX2Pipeline
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    torch.manual_seed(seed)
    connectors = LTX2TextConnectors(
        caption_channels=16, text_proj_in_factor=3, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_theta=10000.0,
        rope_double_precision=False, causal_temporal_positioning=False, rope_type="split").eval()
    vae = AutoencoderKLLTX2Video(  # 8x spatial and temporal compression, as LTX-2's 32x / 8x is too much here
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * 3,
        decoder_block_out_channels=(8,) * 3, layers_per_block=(1,) * 3, decoder_layers_per_block=(1,) * 4,
        spatio_temporal_scaling=(True,) * 3, decoder_spatio_temporal_scaling=(True,) * 3,
        decoder_inject_noise=(False,) * 4, downsample_type=("spatiotemporal",) * 3, upsample_residual=(False,) * 3,
        upsample_factor=(1,) * 3, timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True,
        decoder_causal=False).eval()
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8).eval()
    vocoder = LTX2Vocoder(
        in_channels=16, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
        resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000).eval()
    transformer = tiny_ltx2_transformer(seed=seed, rope_type="split", audio_in_channels=4, audio_out_channels=4)
    return LTX2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae, text_encoder=None,
                        tokenizer=None, connectors=connectors, transformer=transformer, vocoder=vocoder)


def tiny_ltx2_prompt(*, seed: int = 0) -> dict:
    """Random prompt and negative-prompt embeddings (8 tokens; the negative's first 3 are
    left padding, as Gemma pads) for :func:`tiny_ltx2_pipeline`."""
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(1, 8, 48, generator=g), prompt_attention_mask=torch.ones(1, 8),
                negative_prompt_embeds=torch.randn(1, 8, 48, generator=g),
                negative_prompt_attention_mask=torch.tensor([[0.0] * 3 + [1.0] * 5]))
