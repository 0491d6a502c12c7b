"""Model adapters: one file per diffusers video transformer family (Wan and the models on its
attention code, HunyuanVideo, HunyuanVideo 1.5, HunyuanVideo-FramePack, CogVideoX, LTX-Video,
LTX-2, Mochi, Kandinsky 5, Cosmos), each declaring where the family keeps its video
self-attention and how its own processor computes q/k/v; :mod:`.refused` says why some other
video transformers are refused. See :mod:`.base` for the interface and how to add a model.
"""

from .base import (
    AttendFn,
    ModelAdapter,
    adapter_for,
    model_families,
    refusal_reason,
    refuse_model,
    register_adapter,
    supported_models,
)

__all__ = ["AttendFn", "ModelAdapter", "adapter_for", "model_families", "refusal_reason", "refuse_model",
           "register_adapter", "supported_models"]
