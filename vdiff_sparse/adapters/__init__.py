"""Model adapters: one file per diffusers video transformer family (Wan, HunyuanVideo,
CogVideoX, LTX-Video, Mochi), each declaring where the family keeps its video self-attention and
how its own processor computes q/k/v. See :mod:`.base` for the interface and how to add a model.
"""

from .base import (
    AttendFn,
    ModelAdapter,
    adapter_for,
    refusal_reason,
    refuse_model,
    register_adapter,
    supported_models,
)

__all__ = ["AttendFn", "ModelAdapter", "adapter_for", "refusal_reason", "refuse_model", "register_adapter",
           "supported_models"]
