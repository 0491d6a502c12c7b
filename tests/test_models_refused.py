"""Every video transformer of the installed diffusers without an adapter is refused by name.

Both ways in: ``vdiff_sparse.enable`` and the plain diffusers call (``set_attn_processor``, or
the processor on every attention module for models without it), whose processor refuses on its
first call. The error names the class, the reason where one is known (no softmax attention, ...)
and the supported classes, and its advice names functions that exist. Tiny random models built
from each model's own config class.
"""

from __future__ import annotations

import re

import pytest
import torch

import vdiff_sparse
import vdiff_sparse.processors as P
from vdiff_sparse import integration
from vdiff_sparse.adapters import supported_models


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


# class name -> (tiny config, forward inputs). Inputs None: the model's forward takes elaborate
# inputs (KV caches, packed multi-modal layouts, camera rays), and the plain path is driven by
# one of its own attention modules called from inside the model's call (a forward pre-hook),
# which is where a real forward reaches the processor first.
REFUSED = {
    "AllegroTransformer3DModel": (
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
             cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8),
        lambda: dict(hidden_states=_randn(1, 4, 2, 8, 8), encoder_hidden_states=_randn(1, 6, 8),
                     timestep=torch.tensor([500]))),
    "AnyFlowTransformer3DModel": (
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True, rope_max_seq_len=32,
             gate_value=0.25, deltatime_type="r"),
        lambda: dict(hidden_states=_randn(1, 2, 4, 8, 8), timestep=torch.full((1, 2), 500.0),
                     r_timestep=torch.full((1, 2), 250.0), encoder_hidden_states=_randn(1, 6, 16))),
    "AnyFlowFARTransformer3DModel": (
        dict(patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=3, num_attention_heads=2,
             attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
             num_layers=1, cross_attn_norm=True, rope_max_seq_len=32, gate_value=0.25, deltatime_type="r"),
        None),
    "ConsisIDTransformer3DModel": (
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
             text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
             temporal_compression_ratio=4, max_text_seq_length=8, cross_attn_interval=1, is_kps=False,
             is_train_face=True, cross_attn_dim_head=1, cross_attn_num_heads=1, LFE_id_dim=2, LFE_vit_dim=2,
             LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=1, LFE_num_querie=1,
             LFE_output_dim=10, LFE_ff_mult=1, LFE_num_scale=1),
        lambda: dict(hidden_states=_randn(1, 1, 4, 8, 8), encoder_hidden_states=_randn(1, 8, 8),
                     timestep=torch.tensor([500]), id_vit_hidden=[torch.ones(1, 2, 2)], id_cond=torch.ones(1, 2))),
    "Cosmos3OmniTransformer": (
        dict(head_dim=6, hidden_act="relu2", hidden_size=12, intermediate_size=24, latent_channel=2,
             latent_patch_size=1, num_attention_heads=2, num_hidden_layers=1, num_key_value_heads=1,
             patch_latent_dim=2, qk_norm_for_text=False, rms_norm_eps=1e-5, rope_axes_dim=[1, 1, 1],
             rope_theta=1e8, vocab_size=32),
        None),
    "EasyAnimateTransformer3DModel": (
        dict(attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=1, num_layers=1,
             out_channels=4, patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16, time_embed_dim=8,
             time_position_encoding_type="3d_rope", timestep_activation_fn="silu"),
        lambda: dict(hidden_states=_randn(1, 4, 2, 8, 8), timestep=torch.tensor([500]),
                     encoder_hidden_states=_randn(1, 6, 16))),
    "HeliosTransformer3DModel": (
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", rope_dim=(4, 4, 4), has_multi_term_memory_patch=True,
             guidance_cross_attn=True, zero_history_timestep=True, is_amplify_history=False),
        lambda: dict(hidden_states=_randn(1, 4, 2, 8, 8), timestep=torch.tensor([500]),
                     encoder_hidden_states=_randn(1, 6, 16), indices_hidden_states=torch.ones(1, 2),
                     indices_latents_history_short=torch.ones(1, 1), indices_latents_history_mid=torch.ones(1, 1),
                     indices_latents_history_long=torch.ones(1, 4), latents_history_short=_randn(1, 4, 1, 8, 8),
                     latents_history_mid=_randn(1, 4, 1, 8, 8), latents_history_long=_randn(1, 4, 4, 8, 8))),
    "JoyImageEditTransformer3DModel": (
        dict(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=1,
             rope_dim_list=[4, 6, 6], theta=256),
        lambda: dict(hidden_states=_randn(1, 16, 1, 4, 4), encoder_hidden_states=_randn(1, 6, 16),
                     timestep=torch.tensor([1.0]))),
    "JoyImageEditPlusTransformer3DModel": (
        dict(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=1,
             rope_dim_list=[4, 6, 6], theta=256),
        lambda: dict(hidden_states=_randn(1, 2, 16, 1, 2, 2), encoder_hidden_states=_randn(1, 6, 16),
                     timestep=torch.tensor([1.0]), shape_list=[[(1, 1, 1), (1, 1, 1)]])),
    "Kandinsky6Transformer3DModel": (
        dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, model_dim=32,
             ff_dim=32, num_text_blocks=1, num_visual_blocks=1, axes_dims=(4, 6, 6)),
        None),
    "Kandinsky6SRTransformer3DModel": (
        dict(in_visual_dim=4, out_visual_dim=4, time_dim=16, model_dim=32, ff_dim=32, num_visual_blocks=1,
             axes_dims=(4, 6, 6)),
        None),
    "LatteTransformer3DModel": (
        dict(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=4, num_attention_heads=2,
             caption_channels=8, in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True,
             activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
             norm_elementwise_affine=False, norm_eps=1e-6),
        lambda: dict(hidden_states=_randn(1, 4, 2, 8, 8), encoder_hidden_states=_randn(1, 6, 8),
                     timestep=torch.tensor([500]))),
    "MiniMaxH3Transformer3DModel": (
        dict(num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=1, num_refiner_layers=1,
             ffn_dim=32, in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=8, freq_dim=8,
             time_embed_hidden_dim=24, time_embed_dim=16, rope_freq_dim=2),
        None),
    "MotifVideoTransformer3DModel": (
        dict(in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=1,
             num_single_layers=1, num_decoder_layers=0, patch_size=1, patch_size_t=1, text_embed_dim=32,
             image_embed_dim=4, rope_axes_dim=(4, 4, 4)),
        lambda: dict(hidden_states=_randn(1, 33, 3, 4, 4), encoder_hidden_states=_randn(1, 6, 32),
                     timestep=torch.tensor([500]))),
    "SanaVideoTransformer3DModel": (
        dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=1,
             num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
             mlp_ratio=2.5, attention_bias=False, sample_size=8, patch_size=(1, 2, 2),
             norm_elementwise_affine=False, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        lambda: dict(hidden_states=_randn(1, 16, 2, 8, 8), encoder_hidden_states=_randn(1, 6, 16),
                     timestep=torch.tensor([500]))),
    "SanaWMTransformer3DModel": (
        dict(in_channels=4, num_layers=4, hidden_size=32, num_attention_heads=2, linear_head_dim=16,
             chunk_plucker_post_attn_blocks=4, caption_channels=16, image_size=64),
        None),
    "SanaWMLTX2RefinerTransformer3DModel": (
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
             audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8,
             audio_cross_attention_dim=16, num_layers=1, caption_channels=16, rope_double_precision=False),
        None),
    "TransformerTemporalModel": (
        dict(num_attention_heads=2, attention_head_dim=4, in_channels=4, num_layers=1, norm_num_groups=1),
        lambda: dict(hidden_states=_randn(2, 4, 4, 4), num_frames=2)),
    "WanAnimate2Transformer3DModel": (
        dict(patch_size=(1, 2, 2), text_len=16, in_dim=8, dim=32, ffn_dim=64, freq_dim=32, text_dim=16, out_dim=4,
             num_heads=2, num_layers=1),
        None),
}


def _build(name):
    import diffusers

    torch.manual_seed(0)
    return getattr(diffusers, name)(**REFUSED[name][0]).eval()


def _video_transformer_classes():
    """The video transformer classes diffusers exports: the ``...Transformer3DModel`` s, Cosmos 3
    Omni (a world model) and the temporal transformer of UNet video models."""
    import diffusers.models.transformers as transformers

    names = [n for n in dir(transformers) if n.endswith("Transformer3DModel")]
    return sorted(names) + ["Cosmos3OmniTransformer", "TransformerTemporalModel"]


def _refusal(name):
    return re.escape(f"unsupported model {name}: ")


def test_every_video_transformer_is_supported_or_listed_here():
    """A new video transformer in diffusers shows up here: supported, or refused by a case above."""
    classes = set(_video_transformer_classes())
    supported = set(supported_models())
    assert supported <= classes
    assert classes - supported == set(REFUSED), sorted((classes - supported) ^ set(REFUSED))
    assert len(supported) >= 14


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_enable_refuses_by_name(name):
    model = _build(name)
    proc = P.GNAProcessor(window=2, stride=1)
    with pytest.raises(NotImplementedError) as info:
        integration.enable(model, proc)
    message = str(info.value)
    assert re.match(_refusal(name), message)
    assert str(supported_models()) in message
    assert "vdiff_sparse.adapters.register_adapter" in message
    assert callable(vdiff_sparse.adapters.register_adapter)
    assert all(not hasattr(m, "_vdiff_sparse_binding") for m in model.modules())


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_plain_call_refuses_by_name(name):
    """The processor set the plain diffusers way refuses on its first call, naming the model,
    instead of a TypeError (models passing more positional arguments: Helios) or an error that
    cannot name a model without ``set_attn_processor`` (Allegro, Latte, EasyAnimate, ...)."""
    model = _build(name)
    proc = P.GNAProcessor(window=2, stride=1)
    attention = [m for m in model.modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]
    assert attention, f"{name} has no attention modules"
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(proc)
    else:
        for module in attention:
            module.set_processor(proc)
    make_inputs = REFUSED[name][1]
    if make_inputs is None:
        first = attention[0]
        model.register_forward_pre_hook(lambda module, args: first.processor(first, _randn(1, 4, 8)))
        inputs = {}
    else:
        inputs = make_inputs()
    with pytest.raises(NotImplementedError, match=_refusal(name) + ".*Supported models"):
        with torch.no_grad():
            model(**inputs)


@pytest.mark.parametrize("name, reason", [
    ("SanaVideoTransformer3DModel", "ReLU linear attention"),
    ("SanaWMTransformer3DModel", "linear attention"),
    ("WanAnimate2Transformer3DModel", "block-sparse FlexAttention mask"),
    ("LatteTransformer3DModel", "factorised"),
    ("HeliosTransformer3DModel", "vdiff_sparse has no adapter for it"),
])
def test_refusal_says_why(name, reason):
    with pytest.raises(NotImplementedError, match=_refusal(name) + ".*" + re.escape(reason)):
        integration.enable(_build(name), P.DenseProcessor())
