"""The attention processor a run trains with, built from the ``sparse`` section."""

from __future__ import annotations

from dataclasses import replace

from vdiff_sparse.methods.registry import get_method, method_names
from vdiff_sparse.presets import is_model_preset

from .config import SparseConfig


def training_processor(sparse: SparseConfig, method: str | None = None):
    """The processor of ``method`` (default: ``sparse.method``) with training settings and
    statistics on: ``sparse.preset``, then the training defaults, then
    ``sparse.options.<method>``; ``sparse.dense_layers`` dense; no dense warm-up.

    Raises:
        ValueError: an option of that section (or the preset, or a dense layer) is invalid;
            the message names ``sparse.options.<method>``.
    """
    from vdiff_sparse.processors import build_processor

    method = method or sparse.method
    section = f"sparse.options.{method}"
    options = dict(sparse.options.get(method) or {})
    if "dense_layers" in options:
        raise ValueError(f"{section}.dense_layers={options['dense_layers']!r}: give dense layers as "
                         "sparse.dense_layers (they apply to every method)")
    # Training sees random timesteps, so step-based dense warm-up has no meaning here.
    if options.get("dense_steps", 0) != 0:
        raise ValueError(f"{section}.dense_steps must be 0 (training draws a random timestep per sample, "
                         f"there are no denoising steps to warm up on), got {options['dense_steps']!r}")
    # Neighbouring samples share no q/k, so a plan kept from one step is wrong for the next.
    if options.get("replan_every", 1) != 1:
        raise ValueError(f"{section}.replan_every must be 1 (training draws new samples and timesteps every "
                         f"step, so no plan can be reused), got {options['replan_every']!r}")
    options.update(dense_steps=0, dense_layers=list(sparse.dense_layers))
    try:
        return build_processor(method, preset=sparse.preset, backend=sparse.backend, stats=True,
                               settings={**get_method(method).training, **options})
    except ValueError as e:
        raise ValueError(f"{section} (with sparse.preset={sparse.preset!r}, "
                         f"sparse.dense_layers={list(sparse.dense_layers)}): {e}") from None


def check_sparse(sparse: SparseConfig) -> None:
    """Build the processor of ``sparse.method`` and of every other method that has options, so
    that a bad option fails when the config is loaded (not after the data is encoded), even
    in a section not in use.

    Raises:
        ValueError: see :func:`training_processor`.
    """
    for method in method_names():
        if method == sparse.method:
            training_processor(sparse, method)
        elif sparse.options.get(method):
            # A method preset (preset=vmoba) belongs to its own method only; a model preset
            # has a section for every method.
            preset = sparse.preset if is_model_preset(sparse.preset) else None
            training_processor(replace(sparse, preset=preset), method)


__all__ = ["check_sparse", "training_processor"]
