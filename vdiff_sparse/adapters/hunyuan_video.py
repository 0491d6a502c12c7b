"""HunyuanVideo (``HunyuanVideoTransformer3DModel``, also its I2V token-replace blocks).

Dual-stream blocks (``transformer_blocks.i.attn``: video stream plus text through the added
projections) and single-stream blocks (``single_transformer_blocks.i.attn``: one stream, text
after the video) are video self-attention layers, numbered dual first. q/k/v as
``HunyuanVideoAttnProcessor2_0``: projections, per-head RMSNorm, RoPE on the video tokens; the
text padding mask ``[B, 1, 1, S]`` masks text keys for every query. Video queries use the
processor's attention with the (masked) text keys as extra keys; text queries attend densely.
The text refiner (``context_embedder``) keeps its own processor.
"""

from __future__ import annotations

import torch

from .base import ModelAdapter, joint_attention, key_mask_from, patched_grid, register_adapter


@register_adapter
class HunyuanVideoAdapter(ModelAdapter):
    name = "hunyuan_video"
    transformer_classes = ("HunyuanVideoTransformer3DModel",)

    def grid(self, transformer, inputs):
        frames, height, width = inputs["hidden_states"].shape[2:]
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        return patched_grid((frames, height, width), (p_t, p, p))

    def video_attention(self, transformer):
        dual = [(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(transformer.transformer_blocks)]
        single = [
            (f"single_transformer_blocks.{i}.attn", b.attn)
            for i, b in enumerate(transformer.single_transformer_blocks)
        ]
        return dual + single

    def default_processor(self, name, module):
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

        if name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            return HunyuanVideoAttnProcessor2_0()
        return super().default_processor(name, module)

    def unsupported(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        if encoder_hidden_states is None:
            return "no encoder_hidden_states (HunyuanVideo's joint attention needs the text tokens)"
        try:
            key_mask_from(attention_mask, hidden_states.shape[1] + encoder_hidden_states.shape[1])
        except NotImplementedError as e:
            return str(e)
        return None

    def forward(self, attn, attend, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
        from diffusers.models.embeddings import apply_rotary_emb

        n_video, n_text = hidden_states.shape[1], encoder_hidden_states.shape[1]
        single = attn.add_q_proj is None
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single else hidden_states
        query = attn.to_q(x).unflatten(2, (attn.heads, -1))
        key = attn.to_k(x).unflatten(2, (attn.heads, -1))
        value = attn.to_v(x).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if rotary_emb is not None:
            if single:
                query = torch.cat([apply_rotary_emb(query[:, :-n_text], rotary_emb, sequence_dim=1), query[:, -n_text:]], 1)
                key = torch.cat([apply_rotary_emb(key[:, :-n_text], rotary_emb, sequence_dim=1), key[:, -n_text:]], 1)
            else:
                query = apply_rotary_emb(query, rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, rotary_emb, sequence_dim=1)
        if not single:
            eq = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ek = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([query, eq], 1), torch.cat([key, ek], 1), torch.cat([value, ev], 1)
        mask = key_mask_from(attention_mask, n_video + n_text)
        out = joint_attention(attend, query, key, value, slice(0, n_video), slice(n_video, None), mask)
        out = out.flatten(2, 3).to(query.dtype)
        video, text = out[:, :n_video], out[:, n_video:]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text
