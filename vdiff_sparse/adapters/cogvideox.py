"""CogVideoX (``CogVideoXTransformer3DModel``): joint attention with the text first.

``transformer_blocks.i.attn1`` attends over ``[text, video]``; q/k/v as
``CogVideoXAttnProcessor2_0``: projections, per-head LayerNorm, RoPE on the video part when the
model has it (5B, 1.5) and none otherwise (2B). Video queries use the processor's attention with
the text keys as extra keys; text queries attend everything densely. Both ``patch_size_t``
variants (1.0: per frame, 1.5: 2 frames per patch).
"""

from __future__ import annotations

import torch

from .base import ModelAdapter, describe_mask, joint_attention, patched_grid, register_adapter, split_heads


@register_adapter
class CogVideoXAdapter(ModelAdapter):
    name = "cogvideox"
    transformer_classes = ("CogVideoXTransformer3DModel",)

    def grid(self, transformer, inputs):
        _, frames, _, height, width = inputs["hidden_states"].shape
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t or 1
        return patched_grid((frames, height, width), (p_t, p, p))

    def video_attention(self, transformer):
        return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(transformer.transformer_blocks)]

    def default_processor(self, transformer, name, module):
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

        return CogVideoXAttnProcessor2_0()

    def unsupported(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        if encoder_hidden_states is None:
            return "no encoder_hidden_states (CogVideoX's joint attention needs the text tokens)"
        return describe_mask(attention_mask)

    def forward(self, attn, attend, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        # Any number of heads: all, or this rank's under tensor parallelism (per-head norms).
        query, key, value = (split_heads(p(x), attn).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if rotary_emb is not None:
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = joint_attention(attend, q, k, v, slice(text_len, None), None)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3)))
        return out[:, text_len:], out[:, :text_len]

