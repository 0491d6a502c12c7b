"""HunyuanVideo (``HunyuanVideoTransformer3DModel``, also its I2V token-replace blocks).

Dual-stream blocks (``transformer_blocks.i.attn``: video stream plus text through the added
projections) and single-stream blocks (``single_transformer_blocks.i.attn``: one stream, text
after the video) are video self-attention layers, numbered dual first. q/k/v as
``HunyuanVideoAttnProcessor2_0``: projections, per-head RMSNorm, RoPE on the video tokens; the
text padding mask ``[B, 1, 1, S]`` masks text keys for every query. Video queries use the
processor's attention with the (masked) text keys as extra keys; text queries attend densely.
The text refiner (``context_embedder``) keeps its own processor.

:class:`HunyuanVideoAdapter` is also the base of the adapters of the models built on these
blocks (HunyuanVideo 1.5, HunyuanVideo-FramePack), which differ in the text mask and in which
image-stream tokens form the grid.
"""

from __future__ import annotations

import torch

from .base import ModelAdapter, joint_attention, key_mask_from, patched_grid, qkv_heads, register_adapter, text_qkv


@register_adapter
class HunyuanVideoAdapter(ModelAdapter):
    name = "hunyuan_video"
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    #: padded text queries give 0 (their mask row is all False) instead of attending the real keys
    zero_padded_text_queries = False

    def grid(self, transformer, inputs):
        frames, height, width = inputs["hidden_states"].shape[2:]
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        return patched_grid((frames, height, width), (p_t, p, p))

    def video_attention(self, transformer):
        dual = [(f"transformer_blocks.{i}.attn", b.attn) for i, b in enumerate(transformer.transformer_blocks)]
        single = [
            (f"single_transformer_blocks.{i}.attn", b.attn)
            for i, b in enumerate(getattr(transformer, "single_transformer_blocks", ()))
        ]
        return dual + single

    def default_processor(self, transformer, name, module):
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

        if name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            return HunyuanVideoAttnProcessor2_0()
        return super().default_processor(transformer, name, module)

    def key_mask(self, attention_mask, n_video: int, n_text: int) -> torch.Tensor | None:
        """The ``[B, n_video + n_text]`` bool mask of real keys from the call's ``attention_mask``
        (``NotImplementedError`` for masks of other forms)."""
        return key_mask_from(attention_mask, n_video + n_text)

    def video_slice(self, num_tokens: int, attend) -> slice:
        """Which of the ``num_tokens`` image-stream tokens of a call form the grid: all of them."""
        return slice(0, num_tokens)

    def unsupported(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        if encoder_hidden_states is None:
            return f"no encoder_hidden_states (the {self.name} joint attention needs the text tokens)"
        try:
            self.key_mask(attention_mask, hidden_states.shape[1], encoder_hidden_states.shape[1])
        except NotImplementedError as e:
            return str(e)
        return None

    def forward(self, attn, attend, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
        from diffusers.models.embeddings import apply_rotary_emb

        n_video, n_text = hidden_states.shape[1], encoder_hidden_states.shape[1]
        single = attn.add_q_proj is None
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1) if single else hidden_states
        query, key, value = qkv_heads(attn, x)
        if rotary_emb is not None:
            if single:
                query = torch.cat([apply_rotary_emb(query[:, :-n_text], rotary_emb, sequence_dim=1), query[:, -n_text:]], 1)
                key = torch.cat([apply_rotary_emb(key[:, :-n_text], rotary_emb, sequence_dim=1), key[:, -n_text:]], 1)
            else:
                query = apply_rotary_emb(query, rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, rotary_emb, sequence_dim=1)
        if not single:
            eq, ek, ev = text_qkv(attn, encoder_hidden_states)
            query, key, value = torch.cat([query, eq], 1), torch.cat([key, ek], 1), torch.cat([value, ev], 1)
        mask = self.key_mask(attention_mask, n_video, n_text)
        out = joint_attention(attend, query, key, value, self.video_slice(n_video, attend), mask)
        if self.zero_padded_text_queries and mask is not None:
            out = out * mask[:, :, None, None].to(out.dtype)
        out = out.flatten(2, 3).to(query.dtype)
        video, text = out[:, :n_video], out[:, n_video:]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return video, text
