"""Tiny random diffusers video models, built offline from configs in code.

For tests, demos and the CLI's default model: every builder seeds torch, builds a model of a
few thousand parameters on CPU in float32 and downloads nothing. Shapes are the smallest
that keep each family's structure (Wan: patch (1, 2, 2), 2 heads x 32 dims, 2 layers). Latent
inputs for each transformer come from :func:`tiny_inputs`.
"""

from __future__ import annotations

import torch

TEXT_LEN = 8  # text tokens of the tiny inputs


def _seeded(seed: int):
    torch.manual_seed(seed)


def tiny_wan_transformer(*, i2v: bool = False, seed: int = 0, **overrides):
    """A ``WanTransformer3DModel``: T2V, or I2V (image K/V in cross-attention) if ``i2v``."""
    from diffusers import WanTransformer3DModel

    _seeded(seed)
    config = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    if i2v:
        config.update(image_dim=16, added_kv_proj_dim=64, in_channels=36)
    config.update(overrides)
    return WanTransformer3DModel(**config).eval()


def tiny_hunyuan_video_transformer(*, seed: int = 0, **overrides):
    """A ``HunyuanVideoTransformer3DModel`` with 2 dual-stream and 2 single-stream blocks."""
    from diffusers import HunyuanVideoTransformer3DModel

    _seeded(seed)
    config = dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    )
    config.update(overrides)
    return HunyuanVideoTransformer3DModel(**config).eval()


def tiny_cogvideox_transformer(*, rope: bool = True, patch_size_t: int | None = None, seed: int = 0, **overrides):
    """A ``CogVideoXTransformer3DModel`` (CogVideoX 1.0 with ``patch_size_t=None``, 1.5 with
    ``patch_size_t=2``); ``rope`` selects RoPE (5B) or learned-free sincos positions (2B)."""
    from diffusers import CogVideoXTransformer3DModel

    _seeded(seed)
    config = dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9,
        patch_size=2, patch_size_t=patch_size_t, temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN,
        use_rotary_positional_embeddings=rope,
    )
    config.update(overrides)
    return CogVideoXTransformer3DModel(**config).eval()


def tiny_ltx_transformer(*, seed: int = 0, **overrides):
    """An ``LTXVideoTransformer3DModel`` (patch 1; the grid is passed as forward kwargs)."""
    from diffusers import LTXVideoTransformer3DModel

    _seeded(seed)
    config = dict(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=16,
    )
    config.update(overrides)
    return LTXVideoTransformer3DModel(**config).eval()


def tiny_mochi_transformer(*, seed: int = 0, **overrides):
    """A ``MochiTransformer3DModel`` (text after the video, per-sample text masks)."""
    from diffusers import MochiTransformer3DModel

    _seeded(seed)
    config = dict(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        pooled_projection_dim=16, in_channels=4, out_channels=None, qk_norm="rms_norm",
        text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu", max_sequence_length=TEXT_LEN,
    )
    config.update(overrides)
    return MochiTransformer3DModel(**config).eval()


def _random_source(batch: int, seed: int, timestep: float, text_len: int):
    """What the tiny inputs draw from: a seeded ``randn(*shape)``, the timestep ``[batch]`` and a
    text mask ``[batch, text_len]`` that pads the last half of every sample but the first."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    text_mask = torch.ones(batch, text_len, dtype=torch.bool)
    text_mask[1:, text_len // 2:] = False
    return randn, torch.full((batch,), float(timestep)), text_mask


def tiny_inputs(family: str, grid: tuple[int, int, int], *, batch: int = 1, seed: int = 0,
                timestep: float = 500.0, text_len: int = TEXT_LEN, model=None) -> dict:
    """Random forward kwargs of a tiny transformer of ``family`` whose token grid after patchify
    is ``grid`` (``"wan"``, ``"wan_i2v"``, ``"hunyuan_video"``, ``"cogvideox"``, ``"ltx"``,
    ``"mochi"``). Text masks pad the last text tokens of every sample but the first."""
    randn, t, text_mask = _random_source(batch, seed, timestep, text_len)
    T, H, W = grid
    B = batch
    if family == "wan":
        return dict(hidden_states=randn(B, 16, T, 2 * H, 2 * W), timestep=t,
                    encoder_hidden_states=randn(B, text_len, 32))
    if family == "wan_i2v":
        # The model splits the context into image tokens and the last 512 text tokens.
        return dict(hidden_states=randn(B, 36, T, 2 * H, 2 * W), timestep=t,
                    encoder_hidden_states=randn(B, 512, 32), encoder_hidden_states_image=randn(B, 4, 16))
    if family == "hunyuan_video":
        return dict(hidden_states=randn(B, 4, T, 2 * H, 2 * W), timestep=t,
                    encoder_hidden_states=randn(B, text_len, 16), encoder_attention_mask=text_mask.long(),
                    pooled_projections=randn(B, 8), guidance=torch.full((B,), 1000.0))
    if family == "cogvideox":
        p_t = 1 if model is None or model.config.patch_size_t is None else model.config.patch_size_t
        return dict(hidden_states=randn(B, T * p_t, 4, 2 * H, 2 * W), timestep=t.long(),
                    encoder_hidden_states=randn(B, text_len, 16))
    if family == "ltx":
        return dict(hidden_states=randn(B, T * H * W, 8), timestep=t.long(),
                    encoder_hidden_states=randn(B, text_len, 16), encoder_attention_mask=text_mask.long(),
                    num_frames=T, height=H, width=W)
    if family == "mochi":
        return dict(hidden_states=randn(B, 4, T, 2 * H, 2 * W), timestep=t.long(),
                    encoder_hidden_states=randn(B, text_len, 16), encoder_attention_mask=text_mask)
    raise ValueError(f"family must be one of wan, wan_i2v, hunyuan_video, cogvideox, ltx, mochi; got {family!r}")


def tiny_text_encoder(*, seed: int = 0):
    """A tiny ``UMT5EncoderModel`` (d_model 32) and an in-process word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = ["<pad>", "</s>", "<unk>"] + "a the cat dog runs on beach in snow red blue video of".split()
    model = models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    _seeded(seed)
    config = UMT5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return tokenizer, UMT5EncoderModel(config).eval()


def tiny_wan_vae(*, seed: int = 0):
    """A tiny ``AutoencoderKLWan`` (16 latent channels, 8x spatial and 4x temporal compression)."""
    from diffusers import AutoencoderKLWan

    _seeded(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def tiny_wan_pipeline(*, two_experts: bool = False, seed: int = 0):
    """A full ``WanPipeline`` (tiny VAE, tiny UMT5 with an in-process tokenizer, tiny
    transformer; ``two_experts`` adds Wan 2.2's ``transformer_2`` with ``boundary_ratio=0.5``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    tokenizer, text_encoder = tiny_text_encoder(seed=seed)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_wan_vae(seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=tiny_wan_transformer(seed=seed),
        transformer_2=tiny_wan_transformer(seed=seed + 1) if two_experts else None,
        boundary_ratio=0.5 if two_experts else None,
    )


def tiny_clip_image_encoder(*, seed: int = 0):
    """A tiny ``CLIPVisionModel`` (hidden size 16, 32x32 input in 8x8 patches: 17 tokens) and
    its ``CLIPImageProcessor``, as Wan 2.1 image-to-video pipelines take them."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    _seeded(seed)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModel(config).eval(), processor


def tiny_wan_i2v_pipeline(*, seed: int = 0):
    """A Wan 2.1 image-to-video ``WanImageToVideoPipeline``: the tiny VAE, UMT5 and CLIP image
    encoder, and an I2V transformer (36 input channels: noise, a 4-channel first-frame mask and
    the encoded image; CLIP image tokens in cross-attention)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    tokenizer, text_encoder = tiny_text_encoder(seed=seed)
    image_encoder, image_processor = tiny_clip_image_encoder(seed=seed)
    return WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_wan_vae(seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=tiny_wan_transformer(i2v=True, seed=seed),
        image_encoder=image_encoder, image_processor=image_processor,
    )


def tiny_wan22_vae(*, seed: int = 0):
    """A tiny Wan 2.2 ``AutoencoderKLWan``: residual blocks, 2x2 pixel patches and 48 latent
    channels, 16x spatial and 4x temporal compression (the TI2V-5B VAE's structure)."""
    from diffusers import AutoencoderKLWan

    _seeded(seed)
    return AutoencoderKLWan(base_dim=4, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                            latents_mean=[0.0] * 48, latents_std=[1.0] * 48).eval()


def tiny_wan22_ti2v_pipeline(*, seed: int = 0):
    """A Wan 2.2 TI2V ``WanPipeline`` (``expand_timesteps``: one timestep per token, so the
    first frame can be given clean): the tiny Wan 2.2 VAE and a 48-channel tiny transformer.
    ``WanImageToVideoPipeline.from_pipe`` of it generates from an image."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    tokenizer, text_encoder = tiny_text_encoder(seed=seed)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_wan22_vae(seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=tiny_wan_transformer(seed=seed, in_channels=48, out_channels=48), expand_timesteps=True,
    )


def tiny_wan_light_vae(*, seed: int = 0):
    """A cheaper tiny ``AutoencoderKLWan`` for end-to-end generation on CPU: one down level,
    so 2x spatial and 2x temporal compression (``scale_factor_spatial/temporal`` in its config
    say so, and ``WanPipeline`` reads them). Decoding costs a quarter of :func:`tiny_wan_vae`'s
    per latent token, which keeps the transformer's attention the visible cost."""
    from diffusers import AutoencoderKLWan

    _seeded(seed)
    return AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                            scale_factor_spatial=2, scale_factor_temporal=2).eval()


def tiny_wan_generation_pipeline(*, seed: int = 0, num_layers: int = 3, num_attention_heads: int = 2,
                                 attention_head_dim: int = 32):
    """The CLI's built-in model: a ``WanPipeline`` with :func:`tiny_wan_light_vae`, the tiny
    UMT5 and a tiny Wan transformer of ``num_layers`` blocks (3 by default, so VMoBA's 1D / 2D /
    3D partitions each get a layer). Wider settings (more heads, larger head dim) make attention
    dominate at a given token count; ``rope_max_seq_len`` covers grids up to 1024 per axis."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    tokenizer, text_encoder = tiny_text_encoder(seed=seed)
    inner = num_attention_heads * attention_head_dim
    transformer = tiny_wan_transformer(
        seed=seed, num_layers=num_layers, num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim, ffn_dim=2 * inner, rope_max_seq_len=1024,
    )
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_wan_light_vae(seed=seed),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)



# --- Newer video transformers (SkyReels-V2, Wan VACE, ChronoEdit, Wan-Animate, ...) -------------
# Each builder takes the model's own config class arguments at the smallest sizes that keep its
# structure; :func:`tiny_video_inputs` gives their forward inputs for a token grid.

def _wan_like(cls_name: str, seed: int, overrides: dict, **config):
    """A tiny Wan-architecture transformer of diffusers class ``cls_name`` (2 heads x 32 dims,
    patch (1, 2, 2), 16 latent channels, text_dim 32)."""
    import diffusers

    _seeded(seed)
    base = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    base.update(config)
    base.update(overrides)
    return getattr(diffusers, cls_name)(**base).eval()


def tiny_skyreels_v2_transformer(*, seed: int = 0, **overrides):
    """A ``SkyReelsV2Transformer3DModel`` (Wan 2.1 architecture; ``num_frame_per_block > 1``
    makes diffusion forcing's frame-block causal self-attention)."""
    return _wan_like("SkyReelsV2Transformer3DModel", seed, overrides)


def tiny_wan_vace_transformer(*, seed: int = 0, **overrides):
    """A ``WanVACETransformer3DModel``: 3 main blocks, control blocks feeding blocks 0 and 2."""
    return _wan_like("WanVACETransformer3DModel", seed, overrides, num_layers=3, vace_layers=[0, 2],
                     vace_in_channels=48)


def tiny_chronoedit_transformer(*, seed: int = 0, **overrides):
    """A ``ChronoEditTransformer3DModel`` with image K/V in cross-attention (I2V-like)."""
    return _wan_like("ChronoEditTransformer3DModel", seed, overrides, image_dim=16, added_kv_proj_dim=64,
                     in_channels=36)


def tiny_wan_animate_transformer(*, seed: int = 0, **overrides):
    """A ``WanAnimateTransformer3DModel`` (4 latent channels, 16-pixel face images, a face
    adapter after every second block)."""
    return _wan_like(
        "WanAnimateTransformer3DModel", seed, overrides, in_channels=12, latent_channels=4, out_channels=4,
        image_dim=16, motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16,
        motion_style_dim=8, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
        face_encoder_num_heads=2, inject_face_latents_blocks=2,
    )


def tiny_hunyuan_video15_transformer(*, seed: int = 0, **overrides):
    """A ``HunyuanVideo15Transformer3DModel`` (patch 1, 2 heads x 16 dims, 2 blocks, a context of
    Qwen text, ByT5 text and image tokens)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    _seeded(seed)
    config = dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(4, 6, 6), target_size=16, task_type="t2v",
    )
    config.update(overrides)
    return HunyuanVideo15Transformer3DModel(**config).eval()


def tiny_hunyuan_video_framepack_transformer(*, seed: int = 0, **overrides):
    """A ``HunyuanVideoFramepackTransformer3DModel`` (1 dual-stream and 1 single-stream block,
    history embedders and image projection)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    _seeded(seed)
    config = dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), has_image_proj=True,
        image_proj_dim=16, has_clean_x_embedder=True,
    )
    config.update(overrides)
    return HunyuanVideoFramepackTransformer3DModel(**config).eval()


def tiny_ltx2_transformer(*, seed: int = 0, **overrides):
    """An ``LTX2VideoTransformer3DModel`` (LTX-2.0 layout; LTX-2.x options such as
    ``perturbed_attn``, ``gated_attn``, ``rope_type="split"`` as overrides)."""
    from diffusers import LTX2VideoTransformer3DModel

    _seeded(seed)
    config = dict(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=16,
        rope_double_precision=False,
    )
    config.update(overrides)
    return LTX2VideoTransformer3DModel(**config).eval()


def tiny_kandinsky5_transformer(*, seed: int = 0, **overrides):
    """A ``Kandinsky5Transformer3DModel`` (model_dim 32 = 2 heads x 16 dims, 1 text block, 2
    visual blocks, patch (1, 2, 2))."""
    from diffusers import Kandinsky5Transformer3DModel

    _seeded(seed)
    config = dict(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6),
    )
    config.update(overrides)
    model = Kandinsky5Transformer3DModel(**config).eval()
    # The model zero-initialises its modulations, which gates every attention output to 0; give
    # them random weights so that attention reaches the output.
    for module in model.modules():
        if type(module).__name__ == "Kandinsky5Modulation":
            torch.nn.init.normal_(module.out_layer.weight, std=0.2)
            torch.nn.init.normal_(module.out_layer.bias, std=0.2)
    return model


def tiny_cosmos_transformer(*, seed: int = 0, **overrides):
    """A ``CosmosTransformer3DModel`` (Cosmos-Predict 2 layout with learnable extra positions; 2
    heads x 16 dims, patch (1, 2, 2)). Without the padding-mask channel, whose resize needs
    torchvision (not a dependency here): the attention layers are the same."""
    from diffusers import CosmosTransformer3DModel

    _seeded(seed)
    config = dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(8, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable",
    )
    config.update(overrides)
    return CosmosTransformer3DModel(**config).eval()


#: the ``kind`` s of :func:`tiny_video_inputs`, one per builder above
TINY_VIDEO_KINDS = ("skyreels_v2", "wan_vace", "chronoedit", "wan_animate", "hunyuan_video15",
                    "hunyuan_video_framepack", "ltx2", "kandinsky5", "cosmos")


def tiny_video_inputs(kind: str, grid: tuple[int, int, int], *, batch: int = 1, seed: int = 0,
                      timestep: float = 500.0, text_len: int = TEXT_LEN) -> dict:
    """Random forward kwargs of the tiny transformer of ``kind`` (a builder's name without
    ``tiny_`` and ``_transformer``: ``"skyreels_v2"``, ``"wan_vace"``, ...) whose token grid after
    patchify is ``grid``. Text masks pad the last text tokens of every sample but the first."""
    T, H, W = grid
    B = batch
    if kind in ("skyreels_v2", "wan_vace", "chronoedit"):  # Wan's inputs (T2V; ChronoEdit as I2V)
        inputs = tiny_inputs("wan_i2v" if kind == "chronoedit" else "wan", grid, batch=batch, seed=seed,
                             timestep=timestep, text_len=text_len)
        if kind == "wan_vace":  # and the control video's latents
            inputs["control_hidden_states"] = _random_source(batch, seed + 1, timestep, text_len)[0](
                B, 48, T, 2 * H, 2 * W)
        return inputs
    randn, t, text_mask = _random_source(batch, seed, timestep, text_len)
    if kind == "wan_animate":
        # The face encoder halves the face frames twice (causally) and prepends one: 4 * (T - 2) + 1
        # face frames give T motion frames, one per latent frame (T >= 2; the first latent frame
        # is the reference image, the pose video has T - 1).
        return dict(hidden_states=randn(B, 12, T, 2 * H, 2 * W), timestep=t,
                    encoder_hidden_states=randn(B, text_len, 32), encoder_hidden_states_image=randn(B, 4, 16),
                    pose_hidden_states=randn(B, 4, T - 1, 2 * H, 2 * W),
                    face_pixel_values=randn(B, 3, 4 * (T - 2) + 1, 16, 16))
    if kind == "hunyuan_video15":
        # T2V (zero image embeddings: the model masks the image tokens); i2v=True in the model's
        # config is not needed for image embeddings, any non-zero ones make it I2V.
        return dict(hidden_states=randn(B, 4, T, H, W), timestep=t, encoder_hidden_states=randn(B, text_len, 16),
                    encoder_attention_mask=text_mask.long(), encoder_hidden_states_2=randn(B, 4, 8),
                    encoder_attention_mask_2=torch.ones(B, 4), image_embeds=torch.zeros(B, 3, 12))
    if kind == "hunyuan_video_framepack":
        # One clean frame, two 2x and four 4x history frames; the rotary positions of each come
        # from its frame indices (history before the window, which starts at frame 7).
        return dict(hidden_states=randn(B, 4, T, 2 * H, 2 * W), timestep=t,
                    encoder_hidden_states=randn(B, text_len, 16), encoder_attention_mask=text_mask.long(),
                    pooled_projections=randn(B, 8), image_embeds=randn(B, 4, 16),
                    indices_latents=torch.arange(7, 7 + T), guidance=torch.full((B,), 1000.0),
                    latents_clean=randn(B, 4, 1, 2 * H, 2 * W), indices_latents_clean=torch.tensor([0]),
                    latents_history_2x=randn(B, 4, 2, 2 * H, 2 * W), indices_latents_history_2x=torch.arange(1, 3),
                    latents_history_4x=randn(B, 4, 4, 2 * H, 2 * W), indices_latents_history_4x=torch.arange(3, 7))
    if kind == "ltx2":
        # Packed video tokens [B, T*H*W, C] (patch 1) and 5 audio latent frames.
        return dict(hidden_states=randn(B, T * H * W, 4), audio_hidden_states=randn(B, 5, 4),
                    encoder_hidden_states=randn(B, text_len, 16), audio_encoder_hidden_states=randn(B, text_len, 16),
                    timestep=t, sigma=t / 1000, encoder_attention_mask=text_mask.long(), num_frames=T, height=H,
                    width=W, audio_num_frames=5, fps=24.0)
    if kind == "kandinsky5":
        # Channel-last latents; rope positions are those of the token grid.
        return dict(hidden_states=randn(B, T, 2 * H, 2 * W, 4), encoder_hidden_states=randn(B, text_len, 16),
                    timestep=t, pooled_projections=randn(B, 8),
                    visual_rope_pos=[torch.arange(T), torch.arange(H), torch.arange(W)],
                    text_rope_pos=torch.arange(text_len), scale_factor=(1.0, 1.0, 1.0))
    if kind == "cosmos":
        return dict(hidden_states=randn(B, 4, T, 2 * H, 2 * W), timestep=t, encoder_hidden_states=randn(B, text_len, 16),
                    attention_mask=text_mask.float(), fps=24)
    raise ValueError(f"kind must be one of {list(TINY_VIDEO_KINDS)}; got {kind!r}")


__all__ = [
    "TINY_VIDEO_KINDS",
    "tiny_chronoedit_transformer",
    "tiny_cosmos_transformer",
    "tiny_hunyuan_video15_transformer",
    "tiny_hunyuan_video_framepack_transformer",
    "tiny_kandinsky5_transformer",
    "tiny_ltx2_transformer",
    "tiny_skyreels_v2_transformer",
    "tiny_video_inputs",
    "tiny_wan_animate_transformer",
    "tiny_wan_vace_transformer",
    "tiny_clip_image_encoder",
    "tiny_cogvideox_transformer",
    "tiny_hunyuan_video_transformer",
    "tiny_inputs",
    "tiny_ltx_transformer",
    "tiny_mochi_transformer",
    "tiny_text_encoder",
    "tiny_wan22_ti2v_pipeline",
    "tiny_wan22_vae",
    "tiny_wan_generation_pipeline",
    "tiny_wan_i2v_pipeline",
    "tiny_wan_light_vae",
    "tiny_wan_pipeline",
    "tiny_wan_transformer",
    "tiny_wan_vae",
]
