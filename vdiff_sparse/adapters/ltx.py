"""LTX-Video (``LTXVideoTransformer3DModel``): the grid comes as forward kwargs.

The transformer takes packed tokens ``[B, N, C]`` with ``num_frames``, ``height``, ``width`` as
keyword arguments: the token grid, after patchify (diffusers' LTX RoPE makes one position per
``num_frames * height * width`` token and scales them by the patch size itself; LTX-Video's
patch size is 1, where the two grids agree). Without them (``video_coords`` only) the grid is
unknown and must be given with ``vdiff_sparse.set_context(transformer, grid=...)``.
Self-attention (``transformer_blocks.i.attn1``) uses the processor's attention; cross-attention
(``attn2``) stays dense. q/k/v as ``LTXVideoAttnProcessor``: projections, RMSNorm across heads,
RoPE before the head split.
"""

from __future__ import annotations

from .base import ModelAdapter, describe_mask, is_tensor_parallel, register_adapter


@register_adapter
class LTXAdapter(ModelAdapter):
    name = "ltx"
    transformer_classes = ("LTXVideoTransformer3DModel",)

    def grid(self, transformer, inputs):
        sizes = [inputs.get(k) for k in ("num_frames", "height", "width")]
        if any(s is None for s in sizes):
            return None
        return tuple(int(s) for s in sizes)  # already the token grid (module docstring)

    def video_attention(self, transformer):
        return [(f"transformer_blocks.{i}.attn1", b.attn1) for i, b in enumerate(transformer.transformer_blocks)]

    def unsupported(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        if is_tensor_parallel(attn):
            return ("tensor-parallel q/k/v projections: LTX's q/k RMSNorm spans all heads, so the heads cannot "
                    "be split across ranks (diffusers has no tensor-parallel plan for LTX either); use "
                    "context parallelism")
        if encoder_hidden_states is not None:
            return "encoder_hidden_states (LTX's self-attention has no context tokens)"
        return describe_mask(attention_mask)

    def forward(self, attn, attend, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if rotary_emb is not None:
            query = apply_rotary_emb(query, rotary_emb)
            key = apply_rotary_emb(key, rotary_emb)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        out = attend(query, key, value).flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))
