"""Putting processors into diffusers models: context hooks, ``enable`` / ``disable``.

Attention processors are called without the latent grid, the denoising step or their layer
index. This module supplies them:

* :func:`attach` puts a forward pre-hook on a transformer that reads the grid from the forward
  inputs (``hidden_states`` shape and the patch size; LTX's ``num_frames/height/width``) and
  the ``timestep``, and binds every attention module to a :class:`LayerBinding` (its layer
  index among the video self-attention layers, the model adapter, the shared
  :class:`RunContext`, and the model's own processor for the dense path). Per-layer facts live
  on the modules, so one processor instance can serve every layer.
* :func:`enable` attaches every transformer of a pipeline (Wan 2.2's ``transformer_2`` too,
  with one shared context) and sets the processor; :func:`disable` restores the model's own
  processors and removes everything.
* ``transformer.set_attn_processor(proc)`` without ``enable`` also works: on its first call the
  processor finds its transformer on the call stack and attaches it (see :func:`discover`).
  When a diffusers pipeline that owns the transformer is running further up the stack, every
  transformer of that pipeline shares one context (Wan 2.2's two experts count steps together)
  and the number of steps is read from the pipeline's scheduler.
* Attention modules added to an attached transformer later (``set_attn_processor`` again after
  model surgery) are bound on their first call: video self-attention by its layer index,
  anything else to the model's dense path.

Denoising step: the context counts distinct noise levels. A call at the same timestep as the
previous one is the same step (classifier-free guidance calls the transformer twice per step
with one timestep, Wan / HunyuanVideo; CogVideoX / LTX / Mochi batch both in one call); a lower
noise level is the next step; a higher one starts a new generation (step 0). Mochi's timesteps
run upwards (its adapter says so), the others' downwards. ``enable`` also resets the count when
the pipeline calls ``scheduler.set_timesteps`` (the start of every generation). The number of
steps, which fractional warm-up schedules need, comes from ``set_context(..., total_steps=N)``
if given, else from the scheduler of the pipeline (``enable`` or a pipeline found on the
stack); a bare transformer has none, and such a schedule raises an error that says how to give
it.
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .checks import Grid, check_grid
from .processors.adapters import ModelAdapter, adapter_for, supported_models

_BINDING = "_vdiff_sparse_binding"  # on attention modules
_ATTACHMENT = "_vdiff_sparse_attachment"  # on transformers
_SCHEDULER_WRAP = "_vdiff_sparse_set_timesteps"  # marker on the wrapped scheduler method


@dataclass
class RunContext:
    """What the processors of one model (or one pipeline's transformers) need per call.

    Attributes:
        grid: latent grid ``(T, H, W)`` of the current forward call, after patchify.
        step: denoising step index of the current call (0-based).
        total_steps: number of denoising steps of the generation, if known; when ``None``,
            :meth:`num_steps` asks the scheduler the context follows.
    """

    grid: Grid | None = None
    step: int = 0
    total_steps: int | None = None
    _last_timestep: float | None = field(default=None, repr=False)
    _scheduler: Any = field(default=None, repr=False)  # weakref to a pipeline's scheduler

    def new_generation(self, total_steps: int | None = None) -> None:
        self.step = 0
        self._last_timestep = None
        self.total_steps = total_steps

    def follow_scheduler(self, scheduler) -> None:
        """Read the number of steps from ``scheduler`` (a diffusers scheduler) when
        ``total_steps`` is not set."""
        self._scheduler = None if scheduler is None else weakref.ref(scheduler)

    def num_steps(self) -> int | None:
        """The number of denoising steps of the current generation, or ``None`` if unknown."""
        if self.total_steps is not None:
            return self.total_steps
        return _scheduler_steps(self._scheduler() if self._scheduler is not None else None)

    def observe_timestep(self, value: float) -> None:
        """Advance the step count for a transformer call at noise level ``value`` (higher =
        noisier)."""
        last = self._last_timestep
        if last is None or value > last:
            self.step = 0
        elif value < last:
            self.step += 1
        self._last_timestep = value


@dataclass(eq=False)
class LayerBinding:
    """Per attention module facts, stored on the module (not on the processor).

    Attributes:
        adapter: the model family's adapter.
        context: the shared :class:`RunContext`.
        index: layer index among the video self-attention layers, or ``None`` for modules that
            always run dense (cross-attention, text refiners, unknown modules).
        num_layers: number of video self-attention layers of the model.
        dense_processor: the model's own processor for this module.
        name: module name inside the transformer.
        dense_rotary_arg: the name under which ``dense_processor`` takes the rotary embedding.
    """

    adapter: ModelAdapter
    context: RunContext
    index: int | None
    num_layers: int
    dense_processor: Any
    name: str
    dense_rotary_arg: str | None = None


@dataclass(eq=False)
class _Attachment:
    adapter: ModelAdapter
    context: RunContext
    hook: Any
    modules: list  # (module, original processor or None)


def _scheduler_steps(scheduler) -> int | None:
    """Number of denoising steps a diffusers scheduler was set up for (``None`` before its
    ``set_timesteps``)."""
    if scheduler is None:
        return None
    total = getattr(scheduler, "num_inference_steps", None)
    if total is None and getattr(scheduler, "timesteps", None) is not None:
        total = len(scheduler.timesteps) // max(1, getattr(scheduler, "order", 1))
    return total


def _attention_modules(transformer: torch.nn.Module):
    return [(n, m) for n, m in transformer.named_modules() if callable(getattr(m, "processor", None))]


def _set_processor(module: torch.nn.Module, processor) -> None:
    # Some attention classes (Mochi's) have a processor attribute but no set_processor.
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor


def _is_ours(processor) -> bool:
    from .processors.base import SparseProcessor

    return isinstance(processor, SparseProcessor)


@functools.lru_cache(maxsize=16)
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _named_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    bound = _forward_signature(type(module)).bind_partial(module, *args, **kwargs)
    return dict(bound.arguments)


def _require_adapter(transformer: torch.nn.Module) -> ModelAdapter:
    adapter = adapter_for(transformer)
    if adapter is None:
        raise NotImplementedError(
            f"unsupported model {type(transformer).__name__}: vdiff_sparse has adapters for "
            f"{supported_models()}"
        )
    return adapter


@torch.compiler.disable
def _pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    attachment: _Attachment = getattr(module, _ATTACHMENT)
    _observe(module, attachment, _named_inputs(module, args, kwargs))


def _observe(module, attachment: _Attachment, inputs: dict) -> None:
    ctx = attachment.context
    grid = attachment.adapter.grid(module, inputs)
    if grid is not None:
        ctx.grid = check_grid(grid)
    t = inputs.get(attachment.adapter.timestep_arg)
    if t is None:
        return
    # Batched CFG passes one timestep per sample (all equal); max() reads it.
    value = float(t.detach().float().max()) if isinstance(t, torch.Tensor) else float(t)
    ctx.observe_timestep(-value if attachment.adapter.timestep_increases else value)


def _rotary_arg(processor) -> str | None:
    params = inspect.signature(processor.__call__).parameters
    return next((n for n in ("image_rotary_emb", "rotary_emb") if n in params), None)


def attach(transformer: torch.nn.Module, context: RunContext | None = None) -> RunContext:
    """Install the context hook on ``transformer`` and bind its attention modules.

    Idempotent: a transformer attached before keeps its context (unless ``context`` is given,
    which replaces it); attention modules added since are bound now. Processors that are not
    vdiff_sparse's are remembered and restored by :func:`detach`; the dense path of each module
    is that processor (or, when a vdiff_sparse processor is already set, the model's default
    one).

    Raises:
        NotImplementedError: the transformer's class has no adapter.
    """
    adapter = _require_adapter(transformer)
    existing: _Attachment | None = getattr(transformer, _ATTACHMENT, None)
    if existing is not None:
        if context is not None and context is not existing.context:
            existing.context = context
            for module, _ in existing.modules:
                getattr(module, _BINDING).context = context
        _bind_modules(transformer, existing)
        return existing.context
    context = RunContext() if context is None else context
    hook = transformer.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    attachment = _Attachment(adapter, context, hook, [])
    _bind_modules(transformer, attachment)
    setattr(transformer, _ATTACHMENT, attachment)
    return context


def _bind_modules(transformer: torch.nn.Module, attachment: _Attachment) -> None:
    """Bind every attention module of ``transformer`` that has no binding yet: video
    self-attention gets its layer index, any other module (cross-attention, text refiners,
    modules the adapter does not know) ``index=None``, i.e. the dense path."""
    adapter = attachment.adapter
    unbound = [(n, m) for n, m in _attention_modules(transformer) if binding_of(m) is None]
    if not unbound:
        return
    video = adapter.video_attention(transformer)
    index_of = {id(m): i for i, (_, m) in enumerate(video)}
    for name, module in unbound:
        original = None if _is_ours(module.processor) else module.processor
        dense = original if original is not None else adapter.default_processor(name, module)
        binding = LayerBinding(
            adapter, attachment.context, index_of.get(id(module)), len(video), dense, name, _rotary_arg(dense)
        )
        setattr(module, _BINDING, binding)
        attachment.modules.append((module, original))


def detach(transformer: torch.nn.Module) -> None:
    """Undo :func:`attach`: remove the hook and bindings and give every attention module back
    the processor it had before (the model's default where that was a vdiff_sparse one)."""
    attachment: _Attachment | None = getattr(transformer, _ATTACHMENT, None)
    if attachment is None:
        return
    attachment.hook.remove()
    for module, original in attachment.modules:
        binding: LayerBinding = getattr(module, _BINDING)
        _set_processor(module, original if original is not None else binding.dense_processor)
        delattr(module, _BINDING)
    delattr(transformer, _ATTACHMENT)


def binding_of(module: torch.nn.Module) -> LayerBinding | None:
    return getattr(module, _BINDING, None)


def discover(attn: torch.nn.Module) -> LayerBinding | None:
    """Find the transformer that is calling ``attn`` on the Python call stack, attach it and
    publish the context of the running forward call (its hook was not installed yet).

    This is what makes ``transformer.set_attn_processor(proc)`` work without :func:`enable`.
    If a diffusers pipeline holding the transformer is running further up the stack, all its
    transformers are attached with one shared context that follows the pipeline's scheduler
    (the number of steps; Wan 2.2's ``transformer_2`` continues the step count of
    ``transformer``). Returns ``None`` when no transformer on the stack owns ``attn``.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_call_impl":
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.nn.Module) and any(m is attn for m in owner.modules()):
                if adapter_for(owner) is not None or _looks_like_transformer(owner):
                    attach(owner)
                    pipe = _running_pipeline(frame.f_back, owner)
                    if pipe is not None:
                        _shared_context(_transformers(pipe)).follow_scheduler(getattr(pipe, "scheduler", None))
                    attachment = getattr(owner, _ATTACHMENT)
                    inputs = _named_inputs(owner, frame.f_locals.get("args", ()), frame.f_locals.get("kwargs", {}))
                    _observe(owner, attachment, inputs)
                    return binding_of(attn)
        frame = frame.f_back
    return None


def _running_pipeline(frame, transformer: torch.nn.Module):
    """The pipeline object (a non-module ``self`` whose ``components`` hold ``transformer``)
    of the nearest frame on the stack from ``frame`` up, or ``None``."""
    while frame is not None:
        obj = frame.f_locals.get("self")
        if obj is not None and not isinstance(obj, torch.nn.Module):
            components = getattr(obj, "components", None)
            if isinstance(components, dict) and any(c is transformer for c in components.values()):
                return obj
        frame = frame.f_back
    return None


def _looks_like_transformer(module: torch.nn.Module) -> bool:
    # The outermost diffusers model on the stack: reaching it means the model is unsupported.
    return hasattr(module, "set_attn_processor")


# --- pipelines ---------------------------------------------------------------------------------
def _transformers(obj) -> list[torch.nn.Module]:
    """The transformers of a pipeline (``transformer``, ``transformer_2``, ...) or ``[obj]``."""
    if isinstance(obj, torch.nn.Module):
        return [obj]
    components = getattr(obj, "components", None)
    if not isinstance(components, dict):
        raise TypeError(
            f"expected a diffusers pipeline or transformer, got {type(obj).__name__}"
        )
    found = [m for name, m in components.items() if name.startswith("transformer") and isinstance(m, torch.nn.Module)]
    if not found:
        raise ValueError(f"the pipeline {type(obj).__name__} has no transformer component")
    return found


def _wrap_set_timesteps(scheduler, context: RunContext) -> None:
    if scheduler is None or getattr(scheduler.set_timesteps, _SCHEDULER_WRAP, False):
        return
    original = scheduler.set_timesteps
    ref = weakref.ref(scheduler)

    @functools.wraps(original)
    def set_timesteps(*args, **kwargs):
        result = original(*args, **kwargs)
        context.new_generation(_scheduler_steps(ref()))
        return result

    setattr(set_timesteps, _SCHEDULER_WRAP, True)
    scheduler.set_timesteps = set_timesteps


def _shared_context(transformers: list[torch.nn.Module]) -> RunContext:
    """Attach every transformer with one context (the first existing one, else a new one)."""
    for transformer in transformers:
        _require_adapter(transformer)
    existing = [getattr(t, _ATTACHMENT).context for t in transformers if hasattr(t, _ATTACHMENT)]
    context = existing[0] if existing else RunContext()
    for transformer in transformers:
        attach(transformer, context)
    return context


def enable(pipe, processor) -> RunContext:
    """Use ``processor`` in every transformer of ``pipe`` (a diffusers pipeline or a bare
    transformer). Returns the shared :class:`RunContext`.

    The model's own processors are remembered; :func:`disable` restores them. Calling
    ``enable`` again with another processor replaces the processor and keeps the context.

    Raises:
        NotImplementedError: a transformer of ``pipe`` has no adapter.
    """
    transformers = _transformers(pipe)
    context = _shared_context(transformers)
    for transformer in transformers:
        # Not transformer.set_attn_processor: some models (Mochi) do not have it.
        for module, _ in getattr(transformer, _ATTACHMENT).modules:
            _set_processor(module, processor)
    if not isinstance(pipe, torch.nn.Module):
        scheduler = getattr(pipe, "scheduler", None)
        context.follow_scheduler(scheduler)
        _wrap_set_timesteps(scheduler, context)
    return context


def disable(pipe) -> None:
    """Back to the model's own processors: undo :func:`enable` (or a discovered attach)."""
    for transformer in _transformers(pipe):
        detach(transformer)
    scheduler = getattr(pipe, "scheduler", None) if not isinstance(pipe, torch.nn.Module) else None
    if scheduler is not None and getattr(scheduler.set_timesteps, _SCHEDULER_WRAP, False):
        del scheduler.set_timesteps


def get_context(obj) -> RunContext:
    """The :class:`RunContext` of a pipeline, a transformer or a bound attention module
    (attaching the transformers first if needed)."""
    if isinstance(obj, torch.nn.Module) and binding_of(obj) is not None:
        return binding_of(obj).context
    return _shared_context(_transformers(obj))


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
