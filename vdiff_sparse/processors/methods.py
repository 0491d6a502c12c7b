"""The built-in processors, one per registered method (a method registered later gets one from
:func:`~vdiff_sparse.processors.processor_class`), and :func:`build_processor`, the one way the
CLI, generation, fine-tuning and benchmarks make a processor from a method name and settings."""

from __future__ import annotations

from typing import Any, Mapping

from .base import SparseProcessor, processor_class, register_processor_class


@register_processor_class
class DenseProcessor(SparseProcessor):
    """Dense attention through the processor machinery: the baseline of every comparison.

    With ``backend="auto"`` video attention is SDPA; with a plan backend name (``"torch"``,
    ``"reference"``, ...) it runs a density-1 plan on that backend.
    """

    method = "dense"


@register_processor_class
class VMoBAProcessor(SparseProcessor):
    """VMoBA: per-token routing to key blocks; the 1D/2D/3D partition follows the layer index."""

    method = "vmoba"


@register_processor_class
class PSAProcessor(SparseProcessor):
    """PSA, pyramid sparse attention: every key block at a pool level or skipped."""

    method = "psa"


@register_processor_class
class GNAProcessor(SparseProcessor):
    """GNA, generalized neighborhood attention. Windows larger than the latent grid are clipped
    to it (:func:`vdiff_sparse.methods.gna.fit_to_grid`; clipped to the whole grid is an error,
    not dense attention). A ``window`` given without a ``stride`` means stride 1
    (neighbourhood attention), not the preset's stride."""

    method = "gna"


def build_processor(method: str, *, preset: str | None = None, settings: Mapping[str, Any] | None = None,
                    stats: bool = False, backend: str = "auto") -> SparseProcessor:
    """The processor of registered method ``method``.

    Args:
        method: a registered method name (``"dense"``, ``"gna"``, ``"psa"``, ``"vmoba"``, ...).
        preset: a model or method preset; its settings come first.
        settings: fields of the method's config or of the schedule, over the preset's.
        stats: record per-call statistics.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``.

    Raises:
        ValueError: unknown method, preset, option name or a bad value.
    """
    return processor_class(method)(preset=preset, stats=stats, backend=backend, **dict(settings or {}))


__all__ = ["DenseProcessor", "GNAProcessor", "PSAProcessor", "VMoBAProcessor", "build_processor"]
