"""LTX-2 (``LTX2VideoTransformer3DModel``): joint audio-video generation.

Each block has video self-attention (``transformer_blocks.i.attn1``), audio self-attention
(``audio_attn1``), text cross-attention for both streams (``attn2``, ``audio_attn2``) and
audio-to-video / video-to-audio cross-attention (``audio_to_video_attn``,
``video_to_audio_attn``). Only the video self-attention runs the processor's video attention:
the audio sequence is short (about 25 latent frames per second of audio against thousands of
video tokens per second), so audio self-attention and the cross-modal attention cost a few
percent of the video self-attention; sparsifying them would save little and would loosen the
audio-video alignment, so they keep the model's processor.

q/k/v as ``LTX2AudioVideoAttnProcessor`` (and ``LTX2PerturbedAttnProcessor`` of LTX-2.x
models built with ``perturbed_attn``): projections, RMSNorm across heads, RoPE before the head
split (interleaved or split, the module's ``rope_type``), optional per-head output gates
(``to_gate_logits``); spatio-temporal guidance's ``perturbation_mask`` / ``all_perturbed``
replace the attention output by the values for the perturbed samples, as the model does.

The grid comes from the forward's ``num_frames``, ``height``, ``width`` (latent sizes, divided
by the patch sizes as the model's RoPE does); with ``video_coords`` only it is unknown and must
be given with ``vdiff_sparse.set_context(transformer, grid=...)``. A ``video_self_attention_mask``
(IC-LoRA's reference tokens) is refused on the sparse path.
"""

from __future__ import annotations

import torch

from .base import ModelAdapter, describe_mask, register_adapter


@register_adapter
class LTX2Adapter(ModelAdapter):
    name = "ltx2"
    transformer_classes = ("LTX2VideoTransformer3DModel",)
    call_kwargs = ("perturbation_mask", "all_perturbed")

    def grid(self, transformer, inputs):
        sizes = [inputs.get(k) for k in ("num_frames", "height", "width")]
        if any(s is None for s in sizes):
            return None
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        return tuple(-(-int(s) // q) for s, q in zip(sizes, (p_t, p, p)))

    def video_attention(self, transformer):
        return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(transformer.transformer_blocks)]

    def default_processor(self, transformer, name, module):
        from diffusers.models.transformers.transformer_ltx2 import (
            LTX2AudioVideoAttnProcessor,
            LTX2PerturbedAttnProcessor,
        )

        return LTX2PerturbedAttnProcessor() if transformer.config.perturbed_attn else LTX2AudioVideoAttnProcessor()

    def unsupported(self, attn, hidden_states, encoder_hidden_states, attention_mask, **guidance):
        if encoder_hidden_states is not None:
            return "encoder_hidden_states (LTX-2's video self-attention has no context tokens)"
        return describe_mask(attention_mask)

    def forward(self, attn, attend, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                perturbation_mask=None, all_perturbed=None):
        from diffusers.models.transformers.transformer_ltx2 import (
            apply_interleaved_rotary_emb,
            apply_split_rotary_emb,
        )

        value = attn.to_v(hidden_states)
        if all_perturbed is None:
            all_perturbed = perturbation_mask is not None and bool(torch.all(perturbation_mask == 0))
        if all_perturbed:  # guidance's perturbed pass: the values instead of attention
            out = value
        else:
            query = attn.norm_q(attn.to_q(hidden_states))
            key = attn.norm_k(attn.to_k(hidden_states))
            if rotary_emb is not None:
                rope = apply_interleaved_rotary_emb if attn.rope_type == "interleaved" else apply_split_rotary_emb
                query, key = rope(query, rotary_emb), rope(key, rotary_emb)
            query, key, val = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
            out = attend(query, key, val).flatten(2, 3).to(query.dtype)
            if perturbation_mask is not None:
                out = torch.lerp(value, out, perturbation_mask)
        if attn.to_gate_logits is not None:
            gates = 2.0 * torch.sigmoid(attn.to_gate_logits(hidden_states))  # [B, N, heads]
            out = (out.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))
