"""The processor machinery shared by every method: :class:`SparseProcessor`.

A processor is one object for the whole model (``transformer.set_attn_processor(proc)`` hands
the same instance to every attention module). Per call it looks up the module's
:class:`~vdiff_sparse.context.LayerBinding` (layer index, model adapter, shared run context,
the model's own processor), then

* modules that are not video self-attention (cross-attention, text refiners, I2V image K/V,
  unknown modules) run the model's own processor;
* video self-attention runs the adapter's copy of the model's q/k/v computation, with video
  queries attending through the method (text keys as always-attended extra keys) and text
  queries densely; the schedule (dense warm-up steps, dense layers, a per-layer method) can
  send a call to dense attention or to another method instead;
* a video self-attention call with inputs the adapter does not handle (e.g. an unexpected
  ``attention_mask``) raises ``NotImplementedError`` naming the module, unless the layer is
  scheduled dense: a sparse method is never replaced by dense attention silently.

Settings come from a YAML preset (the method's defaults file, a model preset
``configs/models/<name>.yaml`` overriding it per method), a config object, and keyword
overrides, in that order.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import weakref

import torch

from ..adapters.base import check_grid_matches, read_call
from ..attention import make_extra, run_plan
from ..backends import BACKENDS
from ..context import BoundProcessor, binding_of, discover
from ..methods.registry import build_config, get_method
from ..parallel import check_ulysses, context_parallel_config, heads_to_sequence, local_heads, sequence_to_heads
from ..presets import is_model_preset, load_preset, model_presets_for, preset_family
from .compiled import register_processor, video_attention
from .schedule import ScheduleConfig
from .stats import CallStats, StatsLog, plan_coverage, sync

# replan_every: calls of one step that keep a plan each (guidance branches run as separate
# calls; a pipeline never makes more per step than a few).
REUSED_CALLS_PER_STEP = 4


def processor_class(method: str) -> type["SparseProcessor"]:
    """The processor class of registered method ``method``: a built-in class
    (:class:`~vdiff_sparse.processors.GNAProcessor`, ...) or one made for a method registered
    later (named by its ``processor_name``, or ``<Method>Processor``).

    Raises:
        ValueError: ``method`` is not registered.
    """
    spec = get_method(method)
    if method not in _PROCESSOR_CLASSES:
        name = spec.processor_name or f"{method.capitalize()}Processor"
        _PROCESSOR_CLASSES[method] = type(name, (SparseProcessor,), {
            "method": method, "__doc__": f"{spec.name}: {spec.summary}.", "__module__": __name__,
        })
    return _PROCESSOR_CLASSES[method]


def register_processor_class(cls: type["SparseProcessor"]) -> type["SparseProcessor"]:
    """Class decorator: use ``cls`` as the processor of its ``method`` (the built-in processors)."""
    _PROCESSOR_CLASSES[cls.method] = cls
    return cls


_PROCESSOR_CLASSES: dict[str, type] = {}


class SparseProcessor(BoundProcessor):
    """Base of the vdiff_sparse attention processors (see the module docstring). A subclass
    sets :attr:`method` to a registered method name; everything else follows from the
    method's registration (config class, functional attention, defaults YAML).

    Args:
        config: the method's config object (or a mapping of its fields); replaces the
            preset's method settings.
        preset: a model preset (``"wan2.1-1.3b"``, ...) or a method preset name. A model
            preset is for one model family (its ``family:``); running the processor in a model
            of another family raises ``ValueError``.
        schedule: a :class:`ScheduleConfig` (or mapping); replaces the preset's schedule.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"`` (for the dense method,
            ``"auto"`` is SDPA and a backend name runs a density-1 plan on that backend).
        stats: collect :class:`CallStats` in ``self.stats`` (off by default).
        **overrides: fields of the method config or of :class:`ScheduleConfig`.
    """

    method: str = ""
    # Set by diffusers on every installed processor: ``model.set_attention_backend(name)`` (and
    # ``enable_xformers_memory_efficient_attention``) and ``model.enable_parallelism(...)``.
    # The dense parts run on that backend; context parallelism exchanges q/k/v (see
    # :mod:`vdiff_sparse.parallel`).
    _attention_backend = None
    _parallel_config = None

    @property
    def config_cls(self) -> type:
        """The method's config dataclass."""
        return get_method(self.method).config_cls

    def __init__(self, config=None, *, preset: str | None = None, schedule=None, backend: str = "auto",
                 stats: bool = False, **overrides):
        settings = load_preset(self.method, preset)
        if config is not None:
            settings["config"] = (
                dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
            )
        if schedule is not None:
            settings["schedule"] = (
                dataclasses.asdict(schedule) if dataclasses.is_dataclass(schedule) else dict(schedule)
            )
        spec = get_method(self.method)
        schedule_names = {f.name for f in dataclasses.fields(ScheduleConfig)}
        config_names = {f.name for f in dataclasses.fields(self.config_cls)}
        config_overrides = {}
        for key, value in overrides.items():
            if key in schedule_names:
                settings["schedule"][key] = value
            elif key in config_names:
                config_overrides[key] = value
            else:
                raise ValueError(
                    f"unknown {type(self).__name__} option {key!r}; method options: "
                    f"{sorted(config_names)}, schedule options: {sorted(schedule_names)}"
                )
        settings["config"] = spec.merge(settings["config"], config_overrides)
        self.config = build_config(self.config_cls, settings["config"], {}, self.method)
        self.schedule = build_config(ScheduleConfig, settings["schedule"], {}, "schedule")
        backends = ("auto", *BACKENDS)
        if backend not in backends:
            raise ValueError(f"backend must be one of {list(backends)}, got {backend!r}")
        self.backend = backend
        self.preset = preset
        self.preset_family = preset_family(preset)
        self.stats = StatsLog(stats)
        self._op_id = register_processor(self)
        # replan_every > 1: the last plan per (layer, call of the step, shapes), of one generation
        self._plans: dict = {}
        self._plans_owner = None  # (weakref to the RunContext, its generation) the plans belong to
        # Per-layer overrides: a config of this method, or a processor of another method
        # (its settings from the same model preset) whose attention() this one calls.
        self._layer_configs, self._layer_processors = {}, {}
        model_preset = preset if is_model_preset(preset) else None
        for i, overrides in self.schedule.layers.items():
            method = overrides.get("method", self.method)
            fields = {k: v for k, v in overrides.items() if k != "method"}
            if method == self.method:
                layer_settings = spec.merge(dataclasses.asdict(self.config), fields)
                self._layer_configs[i] = build_config(self.config_cls, layer_settings, {}, self.method)
            else:
                base = load_preset(method, model_preset)["config"]
                layer_settings = get_method(method).merge(base, fields)
                self._layer_processors[i] = processor_class(method)(layer_settings, backend=backend)
        used = {self.method, *(o.get("method", self.method) for o in self.schedule.layers.values())}
        if self.schedule.replan_every > 1 and not any(get_method(m).plans_from_qk for m in used):
            raise ValueError(
                f"replan_every={self.schedule.replan_every} has nothing to reuse: the plans of "
                f"{sorted(used)} depend on the grid only and are built once per grid (use 1)"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(config={self.config}, schedule={self.schedule}, backend={self.backend!r})"

    def config_for(self, layer: int):
        """The method config of video self-attention layer ``layer`` (that of the layer's own
        method when :attr:`ScheduleConfig.layers` names another one)."""
        if layer in self._layer_processors:
            return self._layer_processors[layer].config
        return self._layer_configs.get(layer, self.config)

    def layer_runner(self, layer: int) -> "SparseProcessor":
        """The processor whose :meth:`attention` runs layer ``layer``: this one, or the layer's
        own when :attr:`ScheduleConfig.layers` names another method for it."""
        return self._layer_processors.get(layer, self)

    def check_model_family(self, family: str) -> None:
        """Refuse a model of another family than the model preset's.

        Args:
            family: the adapter name of the model the processor runs in (``"wan"``, ...).

        Raises:
            ValueError: the processor was built from a model preset for another family.
        """
        if self.preset_family is None or self.preset_family == family:
            return
        fitting = model_presets_for(family)
        raise ValueError(
            f"{type(self).__name__}(preset={self.preset!r}): that preset is for {self.preset_family} "
            f"models, but the processor is used in a {family} model; model presets for {family}: "
            f"{fitting}, or give no preset (the method's defaults)"
        )

    def method_for(self, layer: int) -> str:
        """The method video self-attention layer ``layer`` runs after any warm-up."""
        return self.schedule.layer_method(layer) or self.method

    def __call__(self, attn, *args, image_rotary_emb=None, perturbation_mask=None, all_perturbed=None, **kwargs):
        # Attention modules call processors in several conventions (more positional arguments:
        # LTX-2, Helios; the rotary embedding fourth: JoyImage Edit Plus; ``rotary_emb=``:
        # Kandinsky 5), and some pass only the keywords a processor names (the legacy Attention's
        # image_rotary_emb, LTX-2.x's guidance keywords). The model is found, or refused, before
        # the arguments are read; the model's own processor gets them as they were given.
        named = dict(image_rotary_emb=image_rotary_emb, perturbation_mask=perturbation_mask, all_perturbed=all_perturbed)
        kwargs.update({k: v for k, v in named.items() if v is not None})
        binding = binding_of(attn)
        if binding is None and torch.compiler.is_compiling():
            raise RuntimeError(
                f"{type(self).__name__} in a compiled {type(attn).__name__} that was never bound: under "
                f"torch.compile, set the processor with vdiff_sparse.enable(pipe_or_transformer, processor) "
                f"(or run one call uncompiled) before the compiled call"
            )
        binding = binding or discover(attn)
        if binding is None:
            raise RuntimeError(
                f"{type(self).__name__} was called by a {type(attn).__name__} that is not inside a "
                f"transformer it can find, so it knows neither the latent grid nor the denoising "
                f"step. Use vdiff_sparse.enable(pipe_or_transformer, processor), then "
                f"vdiff_sparse.set_context(transformer, grid=(T, H, W), step=...) for calls that "
                f"do not go through the transformer's forward."
            )
        adapter = binding.adapter
        self.check_model_family(adapter.name)
        if not binding.video:  # cross-attention, text refiner, unknown module: dense
            return self._model_processor(binding, attn, args, kwargs)
        call = read_call(args, kwargs)
        handled = {k: v for k, v in call.more_kwargs.items() if k in adapter.call_kwargs}
        problem = adapter.unsupported(attn, call.hidden_states, call.encoder_hidden_states, call.attention_mask,
                                      **handled)
        if problem is None and set(call.more_kwargs) - set(handled):
            problem = f"keyword arguments {sorted(set(call.more_kwargs) - set(handled))}"
        if problem is None and any(a is not None for a in call.more_args):
            problem = f"{len(call.more_args)} more positional arguments"
        if problem is not None:
            layer_dense = self.schedule.layer_is_dense(binding.index, binding.num_layers)
            if layer_dense or self.method_for(binding.index) == "dense":
                return self._model_processor(binding, attn, args, kwargs)
            raise NotImplementedError(
                f"{type(self).__name__}: video self-attention {binding.name!r} of the {adapter.name} "
                f"transformer was called with {problem}, which the "
                f"{self.method_for(binding.index)} path does not handle; run this layer dense "
                f"(dense_layers=[{binding.index}]) or use the model's own processor"
            )
        ctx = binding.context
        if ctx.grid is None:
            raise RuntimeError(
                f"no latent grid for {binding.name}: the forward inputs of the {adapter.name} "
                f"transformer did not give it; pass it with "
                f"vdiff_sparse.set_context(transformer, grid=(T, H, W))"
            )
        attend = Attend(self, binding, ctx.grid)
        return adapter.forward(attn, attend, call.hidden_states, call.encoder_hidden_states, call.attention_mask,
                               call.rotary_emb, **handled)

    def _model_processor(self, binding, attn, args, kwargs):
        """The model's own processor for this module (the dense path), called with the arguments
        as the module gave them, on the attention backend and parallel layout diffusers set on
        this processor."""
        for name in ("_attention_backend", "_parallel_config"):
            if getattr(self, name) is not None and hasattr(binding.dense_processor, name):
                setattr(binding.dense_processor, name, getattr(self, name))
        return binding.dense_processor(attn, *args, **kwargs)

    def _dense_reason(self, binding) -> str:
        ctx = binding.context
        try:
            self.schedule.check_layers(binding.num_layers)
            return self.schedule.dense_reason(ctx.step, ctx.num_steps(), binding.index, binding.num_layers)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__} in {binding.name!r}: {e}") from None

    def _attend(self, q, k, v, extra_k=None, extra_v=None, extra_mask=None, *, binding):
        """Video self-attention of layer ``binding.index``: ``[B, N, heads, D]`` (this rank's
        ``N / P`` tokens under context parallelism) -> the same shape. Under ``torch.compile``
        the layer's work is one custom op (see :mod:`.compiled`)."""
        cp = self._context_parallel(binding)
        if cp is not None:
            check_ulysses(cp, q.shape[2], f"{type(self).__name__} in {binding.name!r}")
            q, k, v = (sequence_to_heads(x, cp) for x in (q, k, v))
            extra_k, extra_v = local_heads(extra_k, cp), local_heads(extra_v, cp)
        # Decided here, where grad mode is that of the caller (inside the compiled op it is off).
        training = torch.is_grad_enabled()
        if torch.compiler.is_compiling():
            out = video_attention(q, k, v, extra_k, extra_v, extra_mask, binding.handle, self._op_id, binding.token,
                                  training)
        else:
            out = self.attend_layer(q, k, v, extra_k, extra_v, extra_mask, binding=binding, training=training)
        return out if cp is None else heads_to_sequence(out, cp)

    def attend_layer(self, q, k, v, extra_k=None, extra_v=None, extra_mask=None, *, binding, record=True,
                     training: bool | None = None):
        """One layer's video attention on whole sequences (after any context-parallel exchange):
        the schedule's decision for this step and layer, then dense attention or the layer's
        method, with statistics when enabled (and ``record``). ``training``: whether the
        caller differentiates the output (no plan reuse then); ``None`` reads the grad mode."""
        training = torch.is_grad_enabled() if training is None else training
        grid = binding.context.grid
        check_grid_matches(grid, q.shape[1], f"layer {binding.name}")
        reason = self._dense_reason(binding)
        extras = dict(extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask)
        layer = binding.index
        runner = self.layer_runner(layer)
        dense = functools.partial(self._dense_with_extras, binding=binding)
        timed = record and self.stats.enabled and torch._C._current_graph_task_id() == -1
        if timed:
            sync(q)
            start = time.perf_counter()
        plan = None
        if reason:
            out = dense(q, k, v, **extras)
        elif self.schedule.replan_every > 1:
            out, plan = self._attend_reusing_plans(runner, q, k, v, binding, dense, extras, training)
        elif timed:
            out, plan = runner.attention(q, k, v, grid, layer, return_plan=True, dense=dense, **extras)
        else:
            out = runner.attention(q, k, v, grid, layer, return_plan=False, dense=dense, **extras)
        if timed:
            sync(out)
            elapsed = (time.perf_counter() - start) * 1e3
            coverage, density = plan_coverage(plan)
            self.stats.records.append(CallStats(
                layer, binding.context.step, "dense" if reason else self.method_for(layer),
                q.shape[1], coverage, density, elapsed, reason, q.shape[0],
            ))
        return out

    def _attend_reusing_plans(self, runner, q, k, v, binding, dense, extras, training: bool):
        """The layer's method with selection on every ``replan_every``-th sparse step only: one
        plan per layer and per call of the step (both guidance branches), reused in between.

        Plans are not reused where reuse would be wrong or pointless: with gradients on (a
        training step, or the recompute of a checkpointed or compiled backward, must
        differentiate the plan of its own inputs), for methods whose plan depends on the grid
        only (GNA, dense: the method's own fast paths then stay in charge), and past the
        first :data:`REUSED_CALLS_PER_STEP` calls of a step (repeated calls at one noise level
        outside a pipeline), which keeps the cache at one plan per layer and call."""
        ctx = binding.context
        layer = binding.index
        if (training or not get_method(self.method_for(layer)).plans_from_qk
                or ctx.call_in_step >= REUSED_CALLS_PER_STEP):
            return runner.attention(q, k, v, ctx.grid, layer, return_plan=True, dense=dense, **extras)
        owner = self._plans_owner
        if owner is None or owner[0]() is not ctx or owner[1] != ctx.generation:  # another model or generation
            self._plans.clear()
            self._plans_owner = (weakref.ref(ctx), ctx.generation)
        key = (int(binding.handle), ctx.call_in_step, tuple(q.shape), v.shape[-1], q.device, q.dtype)
        cached = self._plans.get(key)
        if cached is None or self.schedule.replans(ctx.step, ctx.num_steps()):
            out, plan = runner.attention(q, k, v, ctx.grid, layer, return_plan=True, dense=dense, **extras)
            if plan is not None:
                self._plans[key] = plan
            return out, plan
        return runner.attention(q, k, v, ctx.grid, layer, return_plan=True, plan=cached, **extras)

    def _context_parallel(self, binding):
        """The Ulysses config of this call, or ``None``: the one diffusers set on this processor,
        else on the model's own processor (``enable_parallelism`` before ``enable``)."""
        config = self._parallel_config or getattr(binding.dense_processor, "_parallel_config", None)
        return context_parallel_config(config)

    def _backend(self, binding):
        return self._attention_backend or getattr(binding.dense_processor, "_attention_backend", None)

    def dense(self, q, k, v, key_mask=None, *, binding):
        """Dense attention through diffusers' ``dispatch_attention_fn`` on the backend set on the
        model (``set_attention_backend``), for whole sequences: ``q`` ``[B, Sq, heads, D]``,
        ``k``/``v`` ``[B, Sk, heads, D]``, ``key_mask`` ``[B, Sk]`` bool (False = padding)."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        mask = None if key_mask is None else key_mask[:, None, None, :]
        return dispatch_attention_fn(q, k, v, attn_mask=mask, backend=self._backend(binding))

    def _dense_with_extras(self, q, k, v, extra_k=None, extra_v=None, extra_mask=None, *, binding):
        """:meth:`dense` of video queries over video keys and the always-attended extra keys."""
        extra = make_extra(extra_k, extra_v, extra_mask, q, v)
        key_mask = None
        if extra is not None:
            k, v = torch.cat([k, extra.k], 1), torch.cat([v, extra.v], 1)
            if extra.mask is not None:
                real = torch.ones(q.shape[0], q.shape[1], dtype=torch.bool, device=q.device)
                key_mask = torch.cat([real, extra.mask], 1)
        return self.dense(q, k, v, key_mask, binding=binding)

    def attention(self, q, k, v, grid, layer, *, return_plan, extra_k=None, extra_v=None, extra_mask=None,
                  dense=None, plan=None):
        """The method on ``[B, N, heads, D]`` video tokens of layer ``layer``; returns the output
        (and the plan, ``None`` for dense attention, if ``return_plan``). Settings made for
        another resolution are first fitted to ``grid`` where the method says how (GNA windows).
        ``dense(q, k, v, extra_k=, extra_v=, extra_mask=)``, if given, is the dense attention of
        the model's backend, which the dense method with ``backend="auto"`` runs. ``plan``, if
        given, is run instead of selecting a new one (a plan of an earlier step)."""
        if plan is not None:
            out = run_plan(q, k, v, plan, extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask,
                           backend=self.backend)
            return (out, plan) if return_plan else out
        if self.method == "dense" and self.backend == "auto" and dense is not None:
            out = dense(q, k, v, extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask)
            return (out, None) if return_plan else out
        method = get_method(self.method)
        config = self.config_for(layer)
        if method.fit is not None:
            config = method.fit(config, grid)
        return method.attention(q, k, v, grid, config, layer_index=layer, extra_k=extra_k, extra_v=extra_v,
                                extra_mask=extra_mask, backend=self.backend, return_plan=return_plan)


class Attend:
    """What a model adapter calls for one video self-attention layer (see
    :class:`~vdiff_sparse.adapters.base.AttendFn`): ``attend(q, k, v, extra_k, extra_v,
    extra_mask)`` runs the layer's method on video queries, ``attend.dense(q, k, v, key_mask)``
    dense attention through diffusers' dispatcher (text queries); ``grid`` is the call's grid."""

    def __init__(self, processor: SparseProcessor, binding, grid):
        self.processor, self.binding, self.grid = processor, binding, grid

    def __call__(self, q, k, v, extra_k=None, extra_v=None, extra_mask=None):
        return self.processor._attend(q, k, v, extra_k, extra_v, extra_mask, binding=self.binding)

    def dense(self, q, k, v, key_mask=None):
        return self.processor.dense(q, k, v, key_mask, binding=self.binding)


__all__ = ["Attend", "SparseProcessor", "processor_class", "register_processor_class"]
