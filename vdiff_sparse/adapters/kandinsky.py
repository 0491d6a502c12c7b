"""Kandinsky 5 (``Kandinsky5Transformer3DModel``): text encoder blocks, then visual blocks.

The visual blocks' self-attention (``visual_transformer_blocks.i.self_attention``) runs the
processor's video attention; their cross-attention to the text and the text blocks' own
self-attention (``text_transformer_blocks.i.self_attention``) keep the model's processor. The
latents come channel-last, ``hidden_states`` ``[B, T, H, W, C]``, and are flattened frame-major
after patchify. q/k/v as ``Kandinsky5AttnProcessor``: projections, per-head RMSNorm in float32,
RoPE by 2x2 rotation matrices, whose result the model rounds through bfloat16 (kept here, so the
output matches the model's at density 1).

With ``sparse_params`` (the model's own NABLA sparse attention, ``attention_type="nabla"``) the
model reorders the tokens into 8x8 spatial tiles; such calls are refused on the sparse path.
"""

from __future__ import annotations

import torch

from .base import ModelAdapter, describe_mask, patched_grid, register_adapter


def apply_kandinsky_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Kandinsky 5's RoPE on ``[B, N, heads, D]``: channel pairs times ``rope``'s 2x2 rotations,
    rounded through bfloat16 as the model does."""
    pairs = x.reshape(*x.shape[:-1], -1, 1, 2).to(torch.float32)
    return (rope * pairs).sum(dim=-1).reshape(*x.shape).to(torch.bfloat16).type_as(x)


@register_adapter
class Kandinsky5Adapter(ModelAdapter):
    name = "kandinsky5"
    transformer_classes = ("Kandinsky5Transformer3DModel",)
    call_kwargs = ("sparse_params",)

    def grid(self, transformer, inputs):
        frames, height, width = inputs["hidden_states"].shape[1:4]
        return patched_grid((frames, height, width), tuple(transformer.config.patch_size))

    def video_attention(self, transformer):
        return [
            (f"visual_transformer_blocks.{i}.self_attention", b.self_attention)
            for i, b in enumerate(transformer.visual_transformer_blocks)
        ]

    def unsupported(self, attn, hidden_states, encoder_hidden_states, attention_mask, sparse_params=None):
        if sparse_params is not None:
            return "sparse_params (the model's own NABLA sparse attention over tokens in its tiled order)"
        if encoder_hidden_states is not None:
            return "encoder_hidden_states (Kandinsky 5's visual self-attention has no context tokens)"
        return describe_mask(attention_mask)

    def forward(self, attn, attend, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                sparse_params=None):
        query, key, value = (
            p(hidden_states).unflatten(2, (attn.num_heads, -1)) for p in (attn.to_query, attn.to_key, attn.to_value)
        )
        query = attn.query_norm(query.float()).type_as(query)
        key = attn.key_norm(key.float()).type_as(key)
        if rotary_emb is not None:
            query, key = apply_kandinsky_rope(query, rotary_emb), apply_kandinsky_rope(key, rotary_emb)
        return attn.out_layer(attend(query, key, value).flatten(-2, -1))
