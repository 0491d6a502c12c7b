"""The run context of attached transformers: what processors need and are not given.

Attention processors are called without the latent grid, the denoising step or their layer
index. This module supplies them, below the processors (which read it) and the public
``enable``/``disable`` (:mod:`vdiff_sparse.integration`, which use it):

* :func:`attach` puts a forward pre-hook on a transformer that reads the grid from the forward
  inputs (``hidden_states`` shape and the patch size; LTX's ``num_frames/height/width``) and
  the ``timestep``, and binds every attention module to a :class:`LayerBinding` (its layer
  index among the video self-attention layers, the model adapter, the shared
  :class:`RunContext`, and the model's own processor for the dense path). Per-layer facts live
  on the modules, so one processor instance can serve every layer.
* ``transformer.set_attn_processor(proc)`` without ``enable`` also works: on its first call the
  processor finds its transformer on the call stack and attaches it (:func:`discover`, through
  :mod:`vdiff_sparse.stack`).
* On every call the hook looks for a diffusers pipeline holding the transformer further up the
  call stack (:func:`vdiff_sparse.stack.running_pipeline`). When it finds one, every
  transformer of that pipeline shares one context (Wan 2.2's two experts count steps together,
  also after one ``enable`` per expert) and the number of steps is read from that pipeline's
  scheduler, also when ``enable`` was given a transformer.
* Attention modules added to an attached transformer later (``set_attn_processor`` again after
  model surgery) are bound on their first call: video self-attention by its layer index,
  anything else to the model's dense path.

Denoising step: the context counts distinct noise levels. A call at the same timestep as the
previous one is the same step (classifier-free guidance calls the transformer twice per step
with one timestep, Wan / HunyuanVideo; CogVideoX / LTX / Mochi batch both in one call); a lower
noise level is the next step; a higher one starts a new generation (step 0), and so does a
new ``scheduler.timesteps`` tensor of the pipeline being followed (its ``set_timesteps`` ran,
for runs that start at or below the last level seen). Mochi's timesteps run upwards (its
adapter says so), the others' downwards.

Number of steps, which fractional warm-up schedules need: ``set_context(..., total_steps=N)``
if given, else the scheduler the pipeline holds when the count is needed (so a scheduler
swapped in after ``enable`` counts), counting only the scheduler's timesteps at or below the
first one of the generation (video-to-video with ``strength < 1`` skips the noisiest ones). A
transformer never called inside a pipeline, or called before the pipeline's
``scheduler.set_timesteps``, has none, and such a schedule raises an error that says how to give
it (one called on its own after a pipeline run keeps following that pipeline's scheduler).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters import ModelAdapter, adapter_for, refusal_reason, supported_models
from .checks import Grid, check_grid
from .stack import calling_modules, running_pipeline

_BINDING = "_vdiff_sparse_binding"  # on attention modules
_ATTACHMENT = "_vdiff_sparse_attachment"  # on transformers


class BoundProcessor:
    """Base of the processors that read their layer facts from :class:`LayerBinding` s (the
    vdiff_sparse processors). :func:`attach` does not remember such a processor as a module's
    own: the module's dense path is then the model's default processor."""


@dataclass
class RunContext:
    """What the processors of one model (or one pipeline's transformers) need per call.

    Attributes:
        grid: latent grid ``(T, H, W)`` of the current forward call, after patchify.
        step: denoising step index of the current call (0-based).
        total_steps: number of denoising steps of the generation, given by hand
            (``set_context``); when ``None``, :meth:`num_steps` asks the scheduler of the
            pipeline the context follows.
        call_in_step: transformer calls before this one in the current step (guidance
            branches run as separate calls are 0 and 1).
        generation: number of generations started (a new one restarts the step count).
    """

    grid: Grid | None = None
    step: int = 0
    total_steps: int | None = None
    call_in_step: int = 0
    generation: int = 0
    # Noise levels (the timestep, negated where timesteps increase): of the last call, and of
    # the first call of this generation.
    _last_level: float | None = field(default=None, repr=False)
    _first_level: float | None = field(default=None, repr=False)
    _timestep_increases: bool = field(default=False, repr=False)
    _pipeline: Any = field(default=None, repr=False)  # weakref to the pipeline followed
    # weakref to the scheduler's timesteps tensor of the last call: set_timesteps makes a new
    # one at the start of every run of the pipeline.
    _timesteps_seen: Any = field(default=None, repr=False)
    # ((scheduler id, its num_inference_steps, first level), number of steps): counting the
    # scheduler's timesteps reads a device tensor, so it is done once per generation.
    _steps_cache: tuple | None = field(default=None, repr=False)

    def new_generation(self) -> None:
        """Restart the step count: the next call is step 0 of a new generation."""
        self.step = 0
        self.call_in_step = 0
        self.generation += 1
        self._last_level = None
        self._first_level = None

    def follow_pipeline(self, pipe) -> None:
        """Read the number of steps from the scheduler ``pipe`` (a diffusers pipeline) holds at
        the time it is needed, when ``total_steps`` is not set."""
        self._pipeline = weakref.ref(pipe)

    def pipeline(self):
        """The pipeline this context follows, or ``None``."""
        return None if self._pipeline is None else self._pipeline()

    def observe_schedule(self, timesteps) -> None:
        """Start a new generation when the followed pipeline's scheduler holds another
        ``timesteps`` tensor than at the last call (its ``set_timesteps`` ran: a new run). This
        catches runs that start at or below the last noise level seen, which the timestep
        alone cannot tell from a next step (a 1-step preview then a ``strength < 1`` run)."""
        if not isinstance(timesteps, torch.Tensor):
            return
        if self._timesteps_seen is None:  # the first call this context sees
            self._timesteps_seen = weakref.ref(timesteps)
        elif self._timesteps_seen() is not timesteps:  # replaced (the old one may be freed)
            self.new_generation()
            self._timesteps_seen = weakref.ref(timesteps)

    def num_steps(self) -> int | None:
        """The number of denoising steps of the current generation, or ``None`` if unknown."""
        if self.total_steps is not None:
            return self.total_steps
        scheduler = getattr(self.pipeline(), "scheduler", None)
        key = (id(scheduler), getattr(scheduler, "num_inference_steps", None), self._first_level)
        if self._steps_cache is None or self._steps_cache[0] != key:
            steps = _scheduler_steps(scheduler, self._first_level, self._timestep_increases)
            self._steps_cache = (key, steps)
        return self._steps_cache[1]

    def observe_timestep(self, timestep: float, *, increases: bool = False) -> None:
        """Advance the step count for a transformer call at ``timestep``; ``increases``: the
        model's timesteps grow as denoising proceeds (Mochi), else they fall."""
        level = -timestep if increases else timestep  # higher = noisier
        last = self._last_level
        if last is None or level > last:
            self.new_generation()
            self._first_level = level
        elif level < last:
            self.step += 1
            self.call_in_step = 0
        else:
            self.call_in_step += 1
        self._last_level = level
        self._timestep_increases = increases


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
        video: whether the module is video self-attention (``index`` is not ``None``); code that
            ``torch.compile`` traces reads this flag, the same for every layer, never ``index``,
            which would make a graph per layer.
        handle: a CPU int64 scalar naming this binding (:func:`binding_from_handle`): compiled
            code hands it to the attention op as a tensor, whose value dynamo does not guard.
        token: the transformer's call token, which the compiled pre-hook's op updates; the
            attention op takes it as an input, so a compiled graph runs that update (the step
            and grid of the call) before any layer's attention.
    """

    adapter: ModelAdapter
    context: RunContext
    index: int | None
    num_layers: int
    dense_processor: Any
    name: str
    token: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64), repr=False)
    video: bool = field(init=False)
    handle: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.video = self.index is not None
        self.handle = torch.tensor(_register(self), dtype=torch.int64)


_BINDINGS: "weakref.WeakValueDictionary[int, LayerBinding]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


def _next_handle() -> int:
    return next(_HANDLES)


def _register(binding: "LayerBinding") -> int:
    handle = _next_handle()
    _BINDINGS[handle] = binding
    return handle


def binding_from_handle(handle: int) -> LayerBinding:
    """The :class:`LayerBinding` whose ``handle`` holds ``handle``.

    Raises:
        RuntimeError: the binding is gone (its transformer was detached and freed).
    """
    binding = _BINDINGS.get(int(handle))
    if binding is None:
        raise RuntimeError(f"no attention module is bound to handle {int(handle)} any more (detached)")
    return binding


@dataclass(eq=False)
class _Attachment:
    adapter: ModelAdapter
    context: RunContext
    hook: Any
    modules: list  # (module, original processor or None)
    # forward's parameter names after self, to name positional inputs without inspect (traced)
    parameters: tuple = ()
    transformer: Any = None  # weakref to the attached transformer
    handle: int = -1  # names the attachment to the compiled hook's op
    # mutated by the compiled hook's op so that no compiler drops the op as unused
    token: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))


def _scheduler_steps(scheduler, first_level: float | None = None, increases: bool = False) -> int | None:
    """Number of denoising steps a diffusers scheduler runs in the current generation, ``None``
    before its ``set_timesteps`` (its ``timesteps`` then are the training ones, not steps).

    ``first_level``: noise level of the generation's first transformer call (the timestep,
    negated when the model's timesteps ``increase``). A pipeline that starts part-way
    (video-to-video with ``strength < 1``) skips the scheduler's noisiest timesteps; only those
    at or below the first level run.
    """
    total = getattr(scheduler, "num_inference_steps", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if total is None or timesteps is None or first_level is None:
        return total
    levels = torch.as_tensor(timesteps).detach().float()
    levels = -levels if increases else levels
    first = levels[(levels - first_level).abs().argmin()]
    # The scheduler's level the call was at; pipelines may pass the timestep in the latents'
    # dtype (Mochi), and bfloat16 rounds by at most 2**-8 of it.
    if abs(float(first) - first_level) > abs(first_level) * 2**-8 + 1e-6:
        return total  # the transformer's timesteps are not on the scheduler's scale
    # Distinct levels, as the step counter counts them (Heun repeats each timestep).
    return min(total, torch.unique(levels[levels <= first]).numel())


def _attention_modules(transformer: torch.nn.Module):
    return [(n, m) for n, m in transformer.named_modules() if callable(getattr(m, "processor", None))]


def set_processor(module: torch.nn.Module, processor) -> None:
    # Some attention classes (Mochi's) have a processor attribute but no set_processor.
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor


def _is_ours(processor) -> bool:
    return isinstance(processor, BoundProcessor)


@functools.lru_cache(maxsize=16)
def _forward_parameters(cls: type) -> tuple[str, ...]:
    """The names of ``cls.forward``'s parameters after ``self``."""
    return tuple(inspect.signature(cls.forward).parameters)[1:]


def _named_inputs(parameters: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """A forward call's inputs by name (positional ones named by ``parameters``); plain tuple and
    dict work that ``torch.compile`` traces."""
    return {**dict(zip(parameters, args)), **kwargs}


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile`` wrapped (``pipe.transformer = torch.compile(...)``), else
    ``module``: hooks and bindings go on the compiled module's own modules."""
    return getattr(module, "_orig_mod", module)


def require_adapter(transformer: torch.nn.Module) -> ModelAdapter:
    """The adapter of ``transformer``'s class.

    Raises:
        NotImplementedError: the class has none; the message names it, says why when the
            reason is known (e.g. no softmax attention) and lists the supported classes.
    """
    adapter = adapter_for(transformer)
    if adapter is None:
        reason = refusal_reason(transformer) or "vdiff_sparse has no adapter for it"
        raise NotImplementedError(
            f"unsupported model {type(transformer).__name__}: {reason}. Supported models: "
            f"{supported_models()}. Run this model with its own attention processors; a new model "
            f"needs a vdiff_sparse.adapters.ModelAdapter subclass decorated with "
            f"vdiff_sparse.adapters.register_adapter"
        )
    return adapter


def _pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    attachment: _Attachment = getattr(module, _ATTACHMENT)
    inputs = _named_inputs(attachment.parameters, args, kwargs)
    if torch.compiler.is_compiling():
        # Traced into a compiled whole-model graph: the grid from the input shapes (static to
        # the graph) and the timestep handed to an op that updates the context when it runs.
        grid = attachment.adapter.grid(module, inputs) or (0, 0, 0)
        t = inputs.get(attachment.adapter.timestep_arg)
        timestep = t if isinstance(t, torch.Tensor) else torch.tensor(-1.0 if t is None else float(t))
        torch.ops.vdiff_sparse.observe_call(attachment.token, timestep, attachment.handle, *grid, t is not None)
        return
    _on_forward(module, inputs, sys._getframe(1))


_ATTACHMENTS: "weakref.WeakValueDictionary[int, _Attachment]" = weakref.WeakValueDictionary()


@torch.library.custom_op("vdiff_sparse::observe_call", mutates_args=("token",))
def _observe_call(token: torch.Tensor, timestep: torch.Tensor, attachment: int, t: int, h: int, w: int,
                  has_timestep: bool) -> None:
    """A transformer call inside a compiled graph: what the eager hook does, at run time (the
    pipeline is found on the stack of the running graph)."""
    token += 1
    found = _ATTACHMENTS.get(attachment)
    if found is None:
        return
    pipe = running_pipeline(sys._getframe(1), found.transformer())
    if pipe is not None and found.context.pipeline() is not pipe:
        shared_context(pipe)
    if pipe is not None:
        found.context.observe_schedule(getattr(getattr(pipe, "scheduler", None), "timesteps", None))
    if t > 0:
        found.context.grid = check_grid((t, h, w))
    if has_timestep:
        found.context.observe_timestep(float(timestep.detach().float().max()),
                                       increases=found.adapter.timestep_increases)


@_observe_call.register_fake
def _(token, timestep, attachment, t, h, w, has_timestep) -> None:
    return None


def _on_forward(transformer: torch.nn.Module, inputs: dict, frame) -> None:
    """Publish the context of a forward call of an attached ``transformer``: join the pipeline
    running on the stack from ``frame`` up (if any), then read the grid and the timestep."""
    pipe = running_pipeline(frame, transformer)
    attachment: _Attachment = getattr(transformer, _ATTACHMENT)
    if pipe is not None and attachment.context.pipeline() is not pipe:
        # enable(pipe.transformer, ...), one enable per expert, or the transformers moved to
        # another pipeline: one context for all of this pipeline's transformers, following it.
        shared_context(pipe)
    if pipe is not None:
        attachment.context.observe_schedule(getattr(getattr(pipe, "scheduler", None), "timesteps", None))
    _observe(transformer, attachment, inputs)


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
    ctx.observe_timestep(value, increases=attachment.adapter.timestep_increases)


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
    transformer = unwrap(transformer)
    adapter = require_adapter(transformer)
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
    attachment = _Attachment(adapter, context, hook, [], _forward_parameters(type(transformer)),
                             weakref.ref(transformer), _next_handle())
    _ATTACHMENTS[attachment.handle] = attachment
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
        dense = original if original is not None else adapter.default_processor(transformer, name, module)
        binding = LayerBinding(
            adapter, attachment.context, index_of.get(id(module)), len(video), dense, name, attachment.token
        )
        setattr(module, _BINDING, binding)
        attachment.modules.append((module, original))


def attached_modules(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules bound by :func:`attach` (none if ``transformer`` is not attached)."""
    attachment: _Attachment | None = getattr(unwrap(transformer), _ATTACHMENT, None)
    return [] if attachment is None else [module for module, _ in attachment.modules]


def detach(transformer: torch.nn.Module) -> None:
    """Undo :func:`attach`: remove the hook and bindings and give every attention module back
    the processor it had before (the model's default where that was a vdiff_sparse one)."""
    transformer = unwrap(transformer)
    attachment: _Attachment | None = getattr(transformer, _ATTACHMENT, None)
    if attachment is None:
        return
    attachment.hook.remove()
    for module, original in attachment.modules:
        binding: LayerBinding = getattr(module, _BINDING)
        set_processor(module, original if original is not None else binding.dense_processor)
        delattr(module, _BINDING)
    delattr(transformer, _ATTACHMENT)


def binding_of(module: torch.nn.Module) -> LayerBinding | None:
    return getattr(module, _BINDING, None)


@torch.compiler.disable  # walks the Python stack: compiled models call it eagerly
def discover(attn: torch.nn.Module) -> LayerBinding | None:
    """Find the transformer that is calling ``attn`` on the Python call stack, attach it and
    publish the context of the running forward call (its hook was not installed yet).

    This is what makes ``transformer.set_attn_processor(proc)`` work without :func:`enable`.
    If a diffusers pipeline holding the transformer is running further up the stack, all its
    transformers are attached with one shared context that follows the pipeline (its scheduler
    gives the number of steps; Wan 2.2's ``transformer_2`` continues the step count of
    ``transformer``). Returns ``None`` when no transformer on the stack owns ``attn``.

    Raises:
        NotImplementedError: the diffusers model calling ``attn`` has no adapter (the message
            names it, see :func:`require_adapter`).
    """
    unsupported = None
    for call in calling_modules(attn, sys._getframe(1)):
        if adapter_for(call.module) is not None:
            attach(call.module)
            parameters = getattr(call.module, _ATTACHMENT).parameters
            _on_forward(call.module, _named_inputs(parameters, call.args, call.kwargs), call.caller)
            return binding_of(attn)
        if _is_diffusers_model(call.module):
            unsupported = call.module
    if unsupported is not None:  # the outermost diffusers model calling attn has no adapter
        require_adapter(unsupported)
    return None


def _is_diffusers_model(module: torch.nn.Module) -> bool:
    # A model with set_attn_processor, or diffusers' ModelMixin (told by name, so that this module
    # does not import diffusers): models without set_attn_processor (Cosmos, Allegro, ...) too.
    return hasattr(module, "set_attn_processor") or any(c.__name__ == "ModelMixin" for c in type(module).__mro__)


def transformers_of(obj) -> list[torch.nn.Module]:
    """The transformers of a pipeline (``transformer``, ``transformer_2``, ...) or ``[obj]``,
    unwrapped from ``torch.compile``."""
    if isinstance(obj, torch.nn.Module):
        return [unwrap(obj)]
    components = getattr(obj, "components", None)
    if not isinstance(components, dict):
        raise TypeError(
            f"expected a diffusers pipeline or transformer, got {type(obj).__name__}"
        )
    found = [unwrap(m) for name, m in components.items() if name.startswith("transformer") and isinstance(m, torch.nn.Module)]
    if not found:
        raise ValueError(f"the pipeline {type(obj).__name__} has no transformer component")
    return found


def shared_context(obj) -> RunContext:
    """Attach every transformer of ``obj`` (a pipeline or a transformer) with one context (the
    first existing one, else a new one); a pipeline's context follows it."""
    transformers = transformers_of(obj)
    for transformer in transformers:
        require_adapter(transformer)
    existing = [getattr(t, _ATTACHMENT).context for t in transformers if hasattr(t, _ATTACHMENT)]
    context = existing[0] if existing else RunContext()
    for transformer in transformers:
        attach(transformer, context)
    if not isinstance(obj, torch.nn.Module):
        context.follow_pipeline(obj)
    return context


__all__ = ["BoundProcessor", "LayerBinding", "RunContext", "attach", "attached_modules", "binding_of", "detach",
           "discover", "require_adapter", "set_processor", "shared_context", "transformers_of", "unwrap"]
