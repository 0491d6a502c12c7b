"""Video transformers of diffusers that are refused for a reason other than a missing adapter.

Any transformer without an adapter is refused by ``vdiff_sparse.enable`` and, on its first
attention call, by a processor set without it; the error names the class and the supported
ones, and says the reason recorded here when there is one.
"""

from __future__ import annotations

from .base import refuse_model

refuse_model(
    "SanaVideoTransformer3DModel",
    "its video self-attention is ReLU linear attention (no softmax attention matrix to make sparse); its "
    "softmax attention is the cross-attention to the text only",
)
refuse_model(
    "SanaWMTransformer3DModel",
    "most of its layers are gated-delta-net linear attention over the temporal axis (no softmax attention "
    "to make sparse)",
)
refuse_model(
    "WanAnimate2Transformer3DModel",
    "its self-attention already runs a block-sparse FlexAttention mask over generation tokens and "
    "KV-cached reference tokens",
)
refuse_model(
    "LatteTransformer3DModel",
    "its attention is factorised: spatial blocks attend within one frame, temporal blocks across the frames "
    "of one position; there is no attention over the (T, H, W) grid",
)
refuse_model(
    "TransformerTemporalModel",
    "it is the temporal layer of UNet video models: attention across the frames of one position, not over "
    "the (T, H, W) grid",
)
