"""Attention processors for diffusers video transformers (Wan, HunyuanVideo, CogVideoX, LTX,
Mochi).

Usage (any of)::

    vdiff_sparse.enable(pipe, PSAProcessor(preset="wan2.1-1.3b"))   # pipeline or transformer
    pipe.transformer.set_attn_processor(GNAProcessor())              # plain diffusers call
    vdiff_sparse.disable(pipe)                                       # the model's own processors

See :mod:`vdiff_sparse.processors.base` (processors, schedules, stats, presets),
:mod:`vdiff_sparse.integration` (context hooks) and one adapter file per model family.
"""

from . import cogvideox, hunyuan_video, ltx, mochi, wan  # noqa: F401  (register the adapters)
from .adapters import ModelAdapter, adapter_for, register_adapter, supported_models
from .base import (
    CallStats,
    DenseConfig,
    DenseProcessor,
    GNAProcessor,
    PSAProcessor,
    ScheduleConfig,
    SparseProcessor,
    StatsLog,
    VMoBAProcessor,
    available_presets,
    fit_gna,
    load_preset,
)

__all__ = [
    "CallStats",
    "DenseConfig",
    "DenseProcessor",
    "GNAProcessor",
    "ModelAdapter",
    "PSAProcessor",
    "ScheduleConfig",
    "SparseProcessor",
    "StatsLog",
    "VMoBAProcessor",
    "adapter_for",
    "available_presets",
    "fit_gna",
    "load_preset",
    "register_adapter",
    "supported_models",
]
