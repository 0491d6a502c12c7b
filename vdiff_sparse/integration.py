"""Putting processors into diffusers models: ``enable`` / ``disable`` and the run context.

* :func:`enable` attaches every transformer of a pipeline (Wan 2.2's ``transformer_2`` too,
  with one shared context) and sets the processor; :func:`disable` restores the model's own
  processors and removes everything. ``enable`` takes a bare transformer too, and a
  ``torch.compile``-d one (the hook and the bindings go on the module it compiles).
* :func:`get_context` / :func:`set_context` read or supply the grid, the step and the number of
  steps by hand.

How the context is followed (hooks, step counting, discovery): :mod:`vdiff_sparse.context`.
"""

from __future__ import annotations

import torch

from .checks import check_grid
from .context import (
    LayerBinding,
    RunContext,
    attach,
    attached_modules,
    binding_of,
    detach,
    discover,
    require_adapter,
    set_processor,
    shared_context,
    transformers_of,
)
from .processors.base import SparseProcessor


def enable(pipe, processor) -> RunContext:
    """Use ``processor`` in every transformer of ``pipe`` (a diffusers pipeline or a bare
    transformer, ``torch.compile``-d or not). Returns the shared :class:`RunContext`.

    The model's own processors are remembered; :func:`disable` restores them. Calling
    ``enable`` again with another processor replaces the processor and keeps the context.

    Raises:
        NotImplementedError: a transformer of ``pipe`` has no adapter.
        ValueError: ``processor`` has a model preset of another model family.
    """
    transformers = transformers_of(pipe)
    if isinstance(processor, SparseProcessor):
        for transformer in transformers:
            processor.check_model_family(require_adapter(transformer).name)
    context = shared_context(pipe)
    for transformer in transformers:
        # Not transformer.set_attn_processor: some models (Mochi) do not have it.
        for module in attached_modules(transformer):
            set_processor(module, processor)
    return context


def disable(pipe) -> None:
    """Back to the model's own processors: undo :func:`enable` (or a discovered attach)."""
    for transformer in transformers_of(pipe):
        detach(transformer)


def get_context(obj) -> RunContext:
    """The :class:`RunContext` of a pipeline, a transformer or a bound attention module
    (attaching the transformers first if needed)."""
    if isinstance(obj, torch.nn.Module) and binding_of(obj) is not None:
        return binding_of(obj).context
    return shared_context(obj)


def set_context(obj, *, grid=None, step: int | None = None, total_steps: int | None = None) -> RunContext:
    """Supply the grid, the step or the number of steps by hand (for calls that do not go
    through the transformer's forward, or models whose inputs do not tell them). The forward
    pre-hook overwrites ``grid`` and ``step`` on every transformer call when it can infer them."""
    ctx = get_context(obj)
    if grid is not None:
        ctx.grid = check_grid(grid)
    if step is not None:
        ctx.step = int(step)
    if total_steps is not None:
        ctx.total_steps = int(total_steps)
    return ctx


__all__ = [
    "LayerBinding",
    "RunContext",
    "attach",
    "detach",
    "disable",
    "discover",
    "enable",
    "get_context",
    "set_context",
]
