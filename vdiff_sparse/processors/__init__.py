"""Attention processors for diffusers video transformers.

Usage (any of)::

    vdiff_sparse.enable(pipe, PSAProcessor(preset="wan2.1-1.3b"))   # pipeline or transformer
    pipe.transformer.set_attn_processor(GNAProcessor())              # plain diffusers call
    vdiff_sparse.disable(pipe)                                       # the model's own processors

:mod:`.base` holds the machinery every method shares, :mod:`.methods` the built-in processors,
:mod:`.schedule` dense warm-up and per-layer schedules, :mod:`.stats` per-call statistics. The
model families are adapters (:mod:`vdiff_sparse.adapters`), the run context is
:mod:`vdiff_sparse.context`, presets are :mod:`vdiff_sparse.presets`.
"""

from ..methods.dense import DenseConfig
from ..presets import available_presets, load_preset
from .base import SparseProcessor, processor_class
from .methods import DenseProcessor, GNAProcessor, PSAProcessor, VMoBAProcessor, build_processor
from .schedule import ScheduleConfig
from .stats import CallStats, StatsLog

__all__ = [
    "CallStats",
    "DenseConfig",
    "DenseProcessor",
    "GNAProcessor",
    "PSAProcessor",
    "ScheduleConfig",
    "SparseProcessor",
    "StatsLog",
    "VMoBAProcessor",
    "available_presets",
    "build_processor",
    "load_preset",
    "processor_class",
]
