"""Mochi (``MochiTransformer3DModel``): joint attention with the text after the video.

``transformer_blocks.i.attn1`` as ``MochiAttnProcessor2_0``: video and text projections,
per-head RMSNorm, interleaved RoPE on the video tokens. The model drops padded text tokens per
sample (``encoder_attention_mask [B, L]``): video queries attend the real text keys as extra
keys (masked), real text queries attend everything densely, padded text queries give 0 as in the
model.
"""

from __future__ import annotations

import torch

from .base import ModelAdapter, joint_attention, patched_grid, qkv_heads, register_adapter, text_qkv


def _rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    x_even, x_odd = x[..., 0::2].float(), x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


@register_adapter
class MochiAdapter(ModelAdapter):
    name = "mochi"
    transformer_classes = ("MochiTransformer3DModel",)
    timestep_increases = True  # the pipeline passes 1000 * (1 - sigma) (inverted sigmas)

    def grid(self, transformer, inputs):
        frames, height, width = inputs["hidden_states"].shape[2:]
        p = transformer.config.patch_size
        return patched_grid((frames, height, width), (1, p, p))

    def video_attention(self, transformer):
        return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(transformer.transformer_blocks)]

    def default_processor(self, transformer, name, module):
        from diffusers.models.attention_processor import MochiAttnProcessor2_0

        return MochiAttnProcessor2_0()

    def unsupported(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        if encoder_hidden_states is None:
            return "no encoder_hidden_states (Mochi's joint attention needs the text tokens)"
        if attention_mask is None or attention_mask.dim() != 2:
            shape = None if attention_mask is None else tuple(attention_mask.shape)
            return f"attention_mask {shape} (Mochi's processor needs the text mask [B, L])"
        return None

    def forward(self, attn, attend, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
        n_video = hidden_states.shape[1]
        query, key, value = qkv_heads(attn, hidden_states)
        eq, ek, ev = text_qkv(attn, encoder_hidden_states)
        if rotary_emb is not None:
            query, key = _rope(query, *rotary_emb), _rope(key, *rotary_emb)
        text_mask = attention_mask.bool()
        mask = torch.cat([text_mask.new_ones(text_mask.shape[0], n_video), text_mask], dim=1)
        q, k, v = torch.cat([query, eq], 1), torch.cat([key, ek], 1), torch.cat([value, ev], 1)
        out = joint_attention(attend, q, k, v, slice(0, n_video), mask)
        out = out * mask[:, :, None, None].to(out.dtype)  # padded text queries give 0
        out = out.flatten(2, 3)
        video, text = out[:, :n_video], out[:, n_video:]
        video = attn.to_out[1](attn.to_out[0](video))
        if hasattr(attn, "to_add_out"):
            text = attn.to_add_out(text)
        return video, text
