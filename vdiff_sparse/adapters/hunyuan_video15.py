"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): dual-stream blocks only.

``transformer_blocks.i.attn`` attends over ``[video, context]``, the context being the image,
ByT5 and Qwen text tokens the model reorders valid-first. q/k/v as
``HunyuanVideo15AttnProcessor2_0``: as HunyuanVideo's dual-stream blocks (per-head RMSNorm, RoPE
on the video tokens, added text projections). Its mask differs: the context mask ``[B, L]``
(False for padding, and for the image tokens in text-to-video) masks those tokens as keys and as
queries (a padded query attends nothing and gives 0). Video queries use the processor's attention
with the real context keys as extra keys; real context queries attend everything densely. The
text refiner (``context_embedder``) keeps its own processor.
"""

from __future__ import annotations

import torch

from .base import register_adapter
from .hunyuan_video import HunyuanVideoAdapter


@register_adapter
class HunyuanVideo15Adapter(HunyuanVideoAdapter):
    name = "hunyuan_video15"
    transformer_classes = ("HunyuanVideo15Transformer3DModel",)
    zero_padded_text_queries = True

    def default_processor(self, transformer, name, module):
        from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

        if name.startswith("transformer_blocks."):
            return HunyuanVideo15AttnProcessor2_0()
        return super().default_processor(transformer, name, module)

    def key_mask(self, attention_mask, n_video, n_text):
        if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] != n_text:
            shape = None if attention_mask is None else tuple(attention_mask.shape)
            raise NotImplementedError(f"attention_mask {shape} (the processor needs the context mask [B, {n_text}])")
        text = attention_mask.bool()
        return torch.cat([text.new_ones(text.shape[0], n_video), text], dim=1)
