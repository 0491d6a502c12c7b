"""Cosmos (``CosmosTransformer3DModel``): Cosmos 1.0 and Cosmos-Predict 2 / 2.5 (also as the base
of Cosmos-Transfer's control blocks).

Self-attention (``transformer_blocks.i.attn1``) runs the processor's video attention;
cross-attention (``attn2``: text, and Predict 2.5's image context) keeps the model's processor.
q/k/v as ``CosmosAttnProcessor2_0``: projections, per-head RMSNorm, RoPE (real, unbound on the
second-to-last axis). The model has no ``set_attn_processor``: use ``vdiff_sparse.enable``.
"""

from __future__ import annotations

from .base import ModelAdapter, describe_mask, patched_grid, qkv_heads, register_adapter


@register_adapter
class CosmosAdapter(ModelAdapter):
    name = "cosmos"
    transformer_classes = ("CosmosTransformer3DModel",)

    def grid(self, transformer, inputs):
        frames, height, width = inputs["hidden_states"].shape[2:]
        return patched_grid((frames, height, width), tuple(transformer.config.patch_size))

    def video_attention(self, transformer):
        return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(transformer.transformer_blocks)]

    def default_processor(self, transformer, name, module):
        from diffusers.models.transformers.transformer_cosmos import (
            CosmosAttention,
            CosmosAttnProcessor2_0,
            CosmosAttnProcessor2_5,
        )

        return CosmosAttnProcessor2_5() if isinstance(module, CosmosAttention) else CosmosAttnProcessor2_0()

    def unsupported(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        if encoder_hidden_states is not None:
            return "encoder_hidden_states (Cosmos' self-attention has no context tokens)"
        return describe_mask(attention_mask)

    def forward(self, attn, attend, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
        from diffusers.models.embeddings import apply_rotary_emb

        query, key, value = qkv_heads(attn, hidden_states)
        if rotary_emb is not None:
            # The model's RoPE works on [B, heads, N, D].
            query, key = (
                apply_rotary_emb(t.transpose(1, 2), rotary_emb, use_real=True, use_real_unbind_dim=-2).transpose(1, 2)
                for t in (query, key)
            )
        out = attend(query, key, value).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
