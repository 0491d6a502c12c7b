"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): T2V, I2V, TI2V, both experts of Wan 2.2 A14B.

Self-attention (``blocks.i.attn1``) runs the processor's video attention; cross-attention
(``attn2``, text and the I2V image K/V) stays on the model's processor. q/k/v as
``WanAttnProcessor``: (fused) projections, RMSNorm across heads before the head split,
interleaved RoPE.
"""

from __future__ import annotations

import torch

from .base import ModelAdapter, describe_mask, patched_grid, register_adapter


def apply_interleaved_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on ``[B, N, heads, D]`` with interleaved (even, odd) channel pairs."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


@register_adapter
class WanAdapter(ModelAdapter):
    name = "wan"
    transformer_classes = ("WanTransformer3DModel",)

    def grid(self, transformer, inputs):
        frames, height, width = inputs["hidden_states"].shape[2:]
        return patched_grid((frames, height, width), tuple(transformer.config.patch_size))

    def video_attention(self, transformer):
        return [(f"blocks.{i}.attn1", block.attn1) for i, block in enumerate(transformer.blocks)]

    def unsupported(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        if encoder_hidden_states is not None:
            return "encoder_hidden_states (Wan's self-attention has no context tokens)"
        return describe_mask(attention_mask)

    def forward(self, attn, attend, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_interleaved_rope(query, *rotary_emb)
            key = apply_interleaved_rope(key, *rotary_emb)
        out = attend(query, key, value).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
