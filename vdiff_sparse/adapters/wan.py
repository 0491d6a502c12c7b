"""Wan 2.1 / 2.2 (``WanTransformer3DModel``: T2V, I2V, TI2V, both experts of Wan 2.2 A14B) and
the models built on Wan's attention code: SkyReels-V2 (``SkyReelsV2Transformer3DModel``), Wan
VACE (``WanVACETransformer3DModel``), ChronoEdit (``ChronoEditTransformer3DModel``) and
Wan-Animate (``WanAnimateTransformer3DModel``).

Self-attention (``blocks.i.attn1``; VACE's control blocks ``vace_blocks.j.attn1`` too, which
attend over the same grid) runs the processor's video attention; cross-attention (``attn2``, text
and the I2V image K/V) and Wan-Animate's face adapter (``face_adapter.k``, attention to the face
motion tokens) stay on the model's processor. q/k/v as ``WanAttnProcessor``: (fused) projections,
RMSNorm across heads before the head split, interleaved RoPE (ChronoEdit's two-frame temporal
positions come in the rotary embedding). Layers are numbered main blocks first, then VACE's
control blocks (which run before them), so a main block has the index it has in Wan.

SkyReels-V2's diffusion forcing with ``num_frame_per_block > 1`` passes a frame-block causal
``attention_mask`` to self-attention: those calls are refused on the sparse path (dense layers
run the model's processor).
"""

from __future__ import annotations

import torch

from .base import ModelAdapter, describe_mask, is_tensor_parallel, patched_grid, register_adapter


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
    transformer_classes = (
        "WanTransformer3DModel",
        "SkyReelsV2Transformer3DModel",
        "WanVACETransformer3DModel",
        "ChronoEditTransformer3DModel",
        "WanAnimateTransformer3DModel",
    )

    def grid(self, transformer, inputs):
        frames, height, width = inputs["hidden_states"].shape[2:]
        return patched_grid((frames, height, width), tuple(transformer.config.patch_size))

    def video_attention(self, transformer):
        main = [(f"blocks.{i}.attn1", block.attn1) for i, block in enumerate(transformer.blocks)]
        control = [(f"vace_blocks.{i}.attn1", b.attn1) for i, b in enumerate(getattr(transformer, "vace_blocks", ()))]
        return main + control

    def unsupported(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        if is_tensor_parallel(attn):
            return ("tensor-parallel q/k/v projections: Wan's q/k RMSNorm spans all heads, so the heads cannot "
                    "be split across ranks (diffusers has no tensor-parallel plan for Wan either); use "
                    "context parallelism")
        if encoder_hidden_states is not None:
            return "encoder_hidden_states (Wan's self-attention has no context tokens)"
        if attention_mask is not None:
            return (f"{describe_mask(attention_mask)} (SkyReels-V2's frame-block causal mask, "
                    f"num_frame_per_block > 1)")
        return None

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
