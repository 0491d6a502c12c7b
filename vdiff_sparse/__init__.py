"""vdiff_sparse: sparse attention (VMoBA, PSA, GNA) for video diffusion transformers.

Importing the package is cheap: torch is imported, diffusers is not; public names are loaded
on first use.

Functional API (q, k, v are ``[B, N, heads, D]`` with ``N = T*H*W`` frame-major)::

    from vdiff_sparse import gna_attention, psa_attention, vmoba_attention
    out = gna_attention(q, k, v, grid=(T, H, W), window=(3, 7, 7))
    out = psa_attention(q, k, v, grid, PSAConfig(mode="quantile", fractions={1: 0.1, 2: 0.1}))

Every method takes ``(q, k, v, grid, config=None, **overrides)``; the registry
(:func:`method_names`, :func:`register_method`) lists them and adds new ones.

In a diffusers pipeline (video self-attention goes sparse, everything else stays the model's)::

    vdiff_sparse.enable(pipe, PSAProcessor(preset="wan2.1-1.3b"))
    vdiff_sparse.disable(pipe)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    # layouts and plans
    "VideoLayout": "layout",
    "BlockOrder": "layout",
    "tile_order": "layout",
    "hilbert_order": "layout",
    "AttentionPlan": "plan",
    "TokenWindow": "plan",
    "dense_plan": "plan",
    "run_plan": "attention",
    "dense_attention": "attention",
    # methods (each declared once in the registry)
    "Method": "methods.registry",
    "register_method": "methods.registry",
    "method_names": "methods.registry",
    "DenseConfig": "methods.dense",
    "GNAConfig": "methods.gna",
    "plan_gna": "methods.gna",
    "gna_attention": "methods.gna",
    "PSAConfig": "methods.psa",
    "plan_psa": "methods.psa",
    "psa_attention": "methods.psa",
    "VMoBAConfig": "methods.vmoba",
    "plan_vmoba": "methods.vmoba",
    "vmoba_attention": "methods.vmoba",
    # Processors and their attachment to diffusers models (these import diffusers lazily).
    "DenseProcessor": "processors",
    "GNAProcessor": "processors",
    "PSAProcessor": "processors",
    "VMoBAProcessor": "processors",
    "processor_class": "processors",
    "ScheduleConfig": "processors",
    "available_presets": "processors",
    "enable": "integration",
    "disable": "integration",
    "get_context": "integration",
    "set_context": "integration",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vdiff_sparse' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # pragma: no cover
    from .attention import dense_attention, run_plan
    from .layout import BlockOrder, VideoLayout, hilbert_order, tile_order
    from .methods.dense import DenseConfig
    from .methods.gna import GNAConfig, gna_attention, plan_gna
    from .methods.psa import PSAConfig, plan_psa, psa_attention
    from .methods.registry import Method, method_names, register_method
    from .methods.vmoba import VMoBAConfig, plan_vmoba, vmoba_attention
    from .plan import AttentionPlan, TokenWindow, dense_plan
