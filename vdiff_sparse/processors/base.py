"""Attention processors for diffusers video transformers: the shared machinery.

A processor is one object for the whole model (``transformer.set_attn_processor(proc)`` hands
the same instance to every attention module). Per call it looks up the module's
:class:`~vdiff_sparse.integration.LayerBinding` (layer index, model adapter, shared run context,
the model's own processor), then

* modules that are not video self-attention (cross-attention, text refiners, I2V image K/V,
  unknown modules) run the model's own processor;
* video self-attention runs the adapter's copy of the model's q/k/v computation, with video
  queries attending through the sparse method (text keys as always-attended extra keys) and
  text queries densely; the schedule (dense warm-up steps, dense layers, a per-layer method)
  can send a call to dense attention or to another method instead;
* a video self-attention call with inputs the adapter does not handle (e.g. an unexpected
  ``attention_mask``) raises ``NotImplementedError`` naming the module, unless the layer is
  scheduled dense: a sparse method is never replaced by dense attention silently.

Settings come from a YAML preset (``configs/methods/<method>.yaml`` is the default, a model
preset ``configs/models/<name>.yaml`` overrides it per method), a config object, and keyword
overrides, in that order.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..attention import dense_attention, run_plan
from ..plan import AttentionPlan, dense_plan
from .adapters import check_grid_matches


# --- schedule ----------------------------------------------------------------------------------
@dataclass
class ScheduleConfig:
    """When the sparse method runs (``OmegaConf.structured``-compatible).

    Attributes:
        dense_steps: dense warm-up. ``0`` none; an integer ``>= 1`` is a number of denoising
            steps; a value in ``(0, 1)`` a fraction of the steps the generation runs (rounded
            up; with ``strength < 1`` fewer than the scheduler's), which needs their number:
            known when a diffusers pipeline calls the transformer, else
            ``set_context(total_steps=N)``.
        dense_layers: video self-attention layer indices that always run dense; negative
            indices count from the last layer.
        layers: per-layer overrides, ``{layer index: {field: value}}``: fields of the method
            config (e.g. a larger window in the first layer), and optionally ``method``, one of
            ``"dense"``, ``"gna"``, ``"psa"``, ``"vmoba"``, to run another method on that layer
            with that method's settings from the processor's model preset (or the method's
            defaults) updated with the other fields, e.g.
            ``{0: {"method": "dense"}, 1: {"method": "vmoba", "topk": 4}}`` on a
            :class:`GNAProcessor` (layer indices keep their meaning: VMoBA's 1D/2D/3D cycle
            follows them). ``method: dense`` is the same as listing the layer in
            ``dense_layers``.
    """

    dense_steps: float = 0
    dense_layers: list[int] = field(default_factory=list)
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        d = self.dense_steps
        if isinstance(d, bool) or not isinstance(d, (int, float)) or d < 0 or (d >= 1 and int(d) != d):
            raise ValueError(
                f"dense_steps must be 0, an int >= 1 (steps) or a fraction in (0, 1), got {d!r}"
            )
        try:
            if isinstance(self.dense_layers, (str, int)):
                raise TypeError("a single value, not a list")
            self.dense_layers = [int(i) for i in self.dense_layers]
        except (TypeError, ValueError):
            raise ValueError(f"dense_layers must be a list of ints, got {self.dense_layers!r}") from None
        if any(int(i) < 0 for i in self.layers):
            raise ValueError(f"layers keys must be layer indices >= 0, got {sorted(self.layers)}")
        self.layers = {int(i): dict(o) for i, o in self.layers.items()}
        methods = sorted(processor_classes())
        for i, overrides in self.layers.items():
            if "method" in overrides and overrides["method"] not in methods:
                raise ValueError(
                    f"layers[{i}]: unknown method {overrides['method']!r}; choose one of {methods}"
                )

    def layer_method(self, layer: int) -> str | None:
        """The method named for ``layer`` in :attr:`layers`, or ``None``."""
        return self.layers.get(layer, {}).get("method")

    def layer_is_dense(self, layer: int, num_layers: int) -> bool:
        """Whether ``layer`` always runs dense (``dense_layers`` or ``method: dense``)."""
        if self.layer_method(layer) == "dense":
            return True
        return any(layer == (i if i >= 0 else num_layers + i) for i in self.dense_layers)

    def warmup_steps(self, total_steps: int | None) -> int:
        """Number of dense warm-up steps."""
        d = self.dense_steps
        if d == 0 or d >= 1:
            return int(d)
        if total_steps is None:
            raise ValueError(
                f"dense_steps={d} is a fraction of the denoising steps but the number of steps is "
                f"unknown (the transformer was not called by a diffusers pipeline, or was called "
                f"before the pipeline's scheduler.set_timesteps): run it in its pipeline, call "
                f"vdiff_sparse.set_context(transformer, total_steps=N), or give dense_steps as a "
                f"number of steps"
            )
        return math.ceil(d * total_steps - 1e-9)

    def dense_reason(self, step: int, total_steps: int | None, layer: int, num_layers: int) -> str:
        """``"warmup"``, ``"layer"`` or ``""`` (sparse) for this call."""
        if step < self.warmup_steps(total_steps):
            return "warmup"
        if self.layer_is_dense(layer, num_layers):
            return "layer"
        return ""


# --- stats -------------------------------------------------------------------------------------
@dataclass
class CallStats:
    """One video self-attention call.

    Attributes:
        layer, step: layer index and denoising step.
        method: the method that ran on this layer (``"dense"`` when the schedule chose dense).
        num_tokens: video tokens.
        density: share of (query, key) video pairs attended, pooled keys counted fully.
        flop_density: FLOP-equivalent density (a key pooled ``p`` times counts ``1/p``).
        time_ms: wall time of the attention (device synchronised).
        dense_reason: ``"warmup"``/``"layer"`` when the schedule chose dense, else ``""``.
        batch: samples in the call (2 where a pipeline batches classifier-free guidance).
    """

    layer: int
    step: int
    method: str
    num_tokens: int
    density: float
    flop_density: float
    time_ms: float
    dense_reason: str = ""
    batch: int = 1


def plan_densities(plan: AttentionPlan | None) -> tuple[float, float]:
    """``(density, flop_density)`` of a plan (``None`` = dense)."""
    if plan is None:
        return 1.0, 1.0
    flop = plan.density()
    if plan.kv_level is None or bool((plan.kv_level == 1).all()):
        return flop, flop
    # Pooled entries count as the key tokens they summarise.
    sizes = plan.k_offsets.diff().to(torch.float64)
    q_sizes = plan.q_offsets.diff().to(torch.float64)
    valid = plan.kv_index >= 0
    keys = torch.where(valid, sizes[plan.kv_index.clamp(min=0)], 0.0).sum(-1)
    n = plan.num_tokens
    return float((keys * q_sizes).sum(-1).mean() / (n * n)), flop


class StatsLog:
    """Per-call statistics of a processor; off unless ``enabled`` (then every video attention
    call is timed with a device synchronisation)."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.records: list[CallStats] = []

    def clear(self) -> None:
        self.records.clear()

    def summary(self) -> dict:
        """Totals: calls, mean density / FLOP density (over calls), total time, and the same
        per layer."""
        def agg(recs):
            n = len(recs)
            return {
                "calls": n,
                "density": sum(r.density for r in recs) / n if n else float("nan"),
                "flop_density": sum(r.flop_density for r in recs) / n if n else float("nan"),
                "time_ms": sum(r.time_ms for r in recs),
            }

        layers = sorted({r.layer for r in self.records})
        return {**agg(self.records), "per_layer": {i: agg([r for r in self.records if r.layer == i]) for i in layers}}


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


# --- presets -----------------------------------------------------------------------------------
def _config_dir(kind: str):
    return importlib.resources.files("vdiff_sparse.configs") / kind


def available_presets() -> dict[str, list[str]]:
    """Preset names: ``{"methods": [...], "models": [...]}``."""
    out = {}
    for kind in ("methods", "models"):
        d = _config_dir(kind)
        out[kind] = sorted(p.name[: -len(".yaml")] for p in d.iterdir() if p.name.endswith(".yaml"))
    return out


def _read_yaml(path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(path.read_text()), resolve=True)


def load_preset(method: str, name: str | None = None) -> dict:
    """The settings ``{"config": {...}, "schedule": {...}}`` of ``method`` under preset
    ``name``: the method's defaults (``configs/methods/<method>.yaml``) updated with the model
    preset's ``<method>`` section (``configs/models/<name>.yaml``), or with the method preset
    ``name``."""
    base = _read_yaml(_config_dir("methods") / f"{method}.yaml")
    settings = {"config": dict(base.get("config") or {}), "schedule": dict(base.get("schedule") or {})}
    if name is None or name == method:
        return settings
    presets = available_presets()
    if name in presets["models"]:
        section = _read_yaml(_config_dir("models") / f"{name}.yaml").get(method)
        if section is None:
            raise ValueError(f"model preset {name!r} has no settings for method {method!r}")
    elif name in presets["methods"]:
        raise ValueError(f"preset {name!r} is for method {name!r}, not {method!r}")
    else:
        raise ValueError(
            f"unknown preset {name!r}; model presets: {presets['models']}, "
            f"method presets: {presets['methods']}"
        )
    unknown = sorted(set(section) - {"config", "schedule"})
    if unknown:
        raise ValueError(f"preset {name!r}, section {method!r}: unknown keys {unknown}; allowed: config, schedule")
    settings["config"].update(section.get("config") or {})
    settings["schedule"].update(section.get("schedule") or {})
    return settings


def preset_family(name: str | None) -> str | None:
    """The model family (adapter name, e.g. ``"wan"``) model preset ``name`` is for; ``None``
    for no preset or a method preset."""
    if name is None or name not in available_presets()["models"]:
        return None
    return _read_yaml(_config_dir("models") / f"{name}.yaml").get("family")


def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def build_dataclass(cls, values: Mapping[str, Any], what: str):
    """``cls(**values)`` with YAML lists turned into tuples and unknown names reported."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; valid options are {names}")
    # dense_layers stays as given: ScheduleConfig checks it (a bare int is an error there).
    return cls(**{k: _tuples(v) if k != "dense_layers" else v for k, v in values.items()})


# --- processors --------------------------------------------------------------------------------
class SparseProcessor:
    """Base of the vdiff_sparse attention processors (see the module docstring).

    Args:
        config: the method's config object (or a mapping of its fields); replaces the
            preset's method settings.
        preset: a model preset (``"wan2.1-1.3b"``, ...) or a method preset name. A model
            preset is for one model family (its ``family:``); running the processor in a model
            of another family raises ``ValueError``.
        schedule: a :class:`ScheduleConfig` (or mapping); replaces the preset's schedule.
        backend: plan backend, ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``.
        stats: collect :class:`CallStats` in ``self.stats`` (off by default).
        **overrides: fields of the method config or of :class:`ScheduleConfig`.
    """

    method: str = ""
    config_cls: type | None = None

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
        schedule_names = {f.name for f in dataclasses.fields(ScheduleConfig)}
        config_names = {f.name for f in dataclasses.fields(self.config_cls)}
        for key, value in overrides.items():
            if key in schedule_names:
                settings["schedule"][key] = value
            elif key in config_names:
                settings["config"][key] = value
            else:
                raise ValueError(
                    f"unknown {type(self).__name__} option {key!r}; method options: "
                    f"{sorted(config_names)}, schedule options: {sorted(schedule_names)}"
                )
        self.config = build_dataclass(self.config_cls, settings["config"], self.method)
        self.schedule = build_dataclass(ScheduleConfig, settings["schedule"], "schedule")
        self.backend = backend
        self.preset = preset
        self.preset_family = preset_family(preset)
        self.stats = StatsLog(stats)
        # Per-layer overrides: a config of this method, or a processor of another method
        # (its settings from the same model preset) whose attention() this one calls.
        self._layer_configs, self._layer_processors = {}, {}
        model_preset = preset if preset in available_presets()["models"] else None
        for i, overrides in self.schedule.layers.items():
            method = overrides.get("method", self.method)
            fields = {k: v for k, v in overrides.items() if k != "method"}
            if method == self.method:
                self._layer_configs[i] = build_dataclass(
                    self.config_cls, {**dataclasses.asdict(self.config), **fields}, self.method)
            else:
                cls = processor_classes()[method]
                base = load_preset(method, model_preset)["config"]
                self._layer_processors[i] = cls({**base, **fields}, backend=backend)

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
        fitting = [n for n in available_presets()["models"] if preset_family(n) == family]
        raise ValueError(
            f"{type(self).__name__}(preset={self.preset!r}): that preset is for {self.preset_family} "
            f"models, but the processor is used in a {family} model; model presets for {family}: "
            f"{fitting}, or give no preset (the method's defaults)"
        )

    def method_for(self, layer: int) -> str:
        """The method video self-attention layer ``layer`` runs after any warm-up."""
        return self.schedule.layer_method(layer) or self.method

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        from ..integration import binding_of, discover

        binding = binding_of(attn) or discover(attn)
        if binding is None:
            raise RuntimeError(
                f"{type(self).__name__} was called by a {type(attn).__name__} that is not inside a "
                f"transformer it can find, so it knows neither the latent grid nor the denoising "
                f"step. Use vdiff_sparse.enable(pipe_or_transformer, processor), or "
                f"vdiff_sparse.attach(transformer) and vdiff_sparse.set_context(transformer, "
                f"grid=(T, H, W), step=...)."
            )
        adapter = binding.adapter
        self.check_model_family(adapter.name)
        if binding.index is None:  # cross-attention, text refiner, unknown module: dense
            return self._model_processor(binding, attn, hidden_states, encoder_hidden_states,
                                         attention_mask, image_rotary_emb, kwargs)
        problem = adapter.unsupported(attn, hidden_states, encoder_hidden_states, attention_mask)
        if problem is None and kwargs:
            problem = f"keyword arguments {sorted(kwargs)}"
        if problem is not None:
            layer_dense = self.schedule.layer_is_dense(binding.index, binding.num_layers)
            if layer_dense or self.method_for(binding.index) == "dense":
                return self._model_processor(binding, attn, hidden_states, encoder_hidden_states,
                                             attention_mask, image_rotary_emb, kwargs)
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
        reason = self._dense_reason(binding)
        attend = functools.partial(self._attend, binding=binding, grid=ctx.grid, reason=reason)
        return adapter.forward(attn, attend, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    @staticmethod
    def _model_processor(binding, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, kwargs):
        """The model's own processor for this module (the dense path)."""
        if binding.dense_rotary_arg is not None:
            kwargs[binding.dense_rotary_arg] = rotary_emb
        return binding.dense_processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                       attention_mask=attention_mask, **kwargs)

    @torch.compiler.disable
    def _dense_reason(self, binding) -> str:
        ctx = binding.context
        try:
            return self.schedule.dense_reason(ctx.step, ctx.num_steps(), binding.index, binding.num_layers)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__} in {binding.name!r}: {e}") from None

    def _attend(self, q, k, v, extra_k=None, extra_v=None, extra_mask=None, *, binding, grid, reason):
        check_grid_matches(grid, q.shape[1], f"layer {binding.name}")
        extras = dict(extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask)
        layer = binding.index
        runner = self.layer_runner(layer)
        if not self.stats.enabled or torch._C._current_graph_task_id() != -1:
            if reason:
                return dense_attention(q, k, v, **extras)
            return runner.attention(q, k, v, grid, layer, return_plan=False, **extras)
        _sync(q)
        start = time.perf_counter()
        if reason:
            out, plan = dense_attention(q, k, v, **extras), None
        else:
            out, plan = runner.attention(q, k, v, grid, layer, return_plan=True, **extras)
        _sync(out)
        elapsed = (time.perf_counter() - start) * 1e3
        density, flop = plan_densities(plan)
        self.stats.records.append(CallStats(
            layer, binding.context.step, "dense" if reason else self.method_for(layer),
            q.shape[1], density, flop, elapsed, reason, q.shape[0],
        ))
        return out

    def attention(self, q, k, v, grid, layer, *, return_plan, extra_k=None, extra_v=None, extra_mask=None):
        """The method on ``[B, N, heads, D]`` video tokens of layer ``layer``; returns the output
        (and the plan, ``None`` for dense SDPA, if ``return_plan``)."""
        raise NotImplementedError


@dataclass
class DenseConfig:
    """Settings of :class:`DenseProcessor`.

    Attributes:
        block: block size of the dense plan when a plan backend is named.
    """

    block: int = 128

    def __post_init__(self) -> None:
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"block must be an int >= 1, got {self.block!r}")


class DenseProcessor(SparseProcessor):
    """Dense attention through the processor machinery: the baseline of every comparison.

    With ``backend="auto"`` video attention is SDPA; with a plan backend name (``"torch"``,
    ``"reference"``, ...) it runs a density-1 plan on that backend.
    """

    method = "dense"
    config_cls = DenseConfig

    def attention(self, q, k, v, grid, layer, *, return_plan, **extras):
        if self.backend == "auto":
            out, plan = dense_attention(q, k, v, **extras), None
        else:
            plan = dense_plan(q.shape[1], self.config_for(layer).block, device=q.device)
            out = run_plan(q, k, v, plan, backend=self.backend, **extras)
        return (out, plan) if return_plan else out


class VMoBAProcessor(SparseProcessor):
    """VMoBA (DESIGN §4.1): the 1D/2D/3D partition follows the layer index."""

    method = "vmoba"

    @property
    def config_cls(self):  # type: ignore[override]
        from ..methods.vmoba import VMoBAConfig

        return VMoBAConfig

    def attention(self, q, k, v, grid, layer, *, return_plan, **extras):
        from ..methods.vmoba import vmoba_attention

        return vmoba_attention(q, k, v, grid, layer, self.config_for(layer), backend=self.backend,
                               return_plan=return_plan, **extras)


class PSAProcessor(SparseProcessor):
    """PSA, pyramid sparse attention (DESIGN §4.2)."""

    method = "psa"

    @property
    def config_cls(self):  # type: ignore[override]
        from ..methods.psa import PSAConfig

        return PSAConfig

    def attention(self, q, k, v, grid, layer, *, return_plan, **extras):
        from ..methods.psa import psa_attention

        return psa_attention(q, k, v, grid, self.config_for(layer), backend=self.backend,
                             return_plan=return_plan, **extras)


def fit_gna(grid, window, stride, dilation) -> tuple[tuple, tuple, tuple]:
    """Shrink a GNA neighbourhood to a grid: window at most the axis length (at least 2),
    stride at most the window, dilation at most ``n // window``. A preset made for 720p then
    runs on any latent size; a window covering a whole axis is dense along it."""
    from ..checks import check_per_axis

    window = check_per_axis("window", window, minimum=1)
    stride = check_per_axis("stride", stride, minimum=1)
    dilation = check_per_axis("dilation", dilation, minimum=1)
    w, s, d = [], [], []
    for n, k, st, dl in zip(grid, window, stride, dilation):
        k = max(2, min(k, n)) if n > 1 else 1
        w.append(k)
        s.append(min(st, k))
        d.append(max(1, min(dl, n // k)))
    return tuple(w), tuple(s), tuple(d)


class GNAProcessor(SparseProcessor):
    """GNA, generalized neighborhood attention (DESIGN §4.3). Windows larger than the latent
    grid are clipped to it (see :func:`fit_gna`)."""

    method = "gna"

    @property
    def config_cls(self):  # type: ignore[override]
        from ..methods.gna import GNAConfig

        return GNAConfig

    def attention(self, q, k, v, grid, layer, *, return_plan, **extras):
        from ..methods.gna import gna_attention

        cfg = self.config_for(layer)
        window, stride, dilation = fit_gna(grid, cfg.window, cfg.stride, cfg.dilation)
        tile = None if cfg.tile is None else tuple(min(t, n) for t, n in zip(_per_axis(cfg.tile), grid))
        return gna_attention(q, k, v, grid, window, stride, dilation, cfg.causal, tile=tile,
                             backend=self.backend, return_plan=return_plan, **extras)


def processor_classes() -> dict[str, type[SparseProcessor]]:
    """``{method name: processor class}`` of the built-in processors."""
    return {cls.method: cls for cls in (DenseProcessor, GNAProcessor, PSAProcessor, VMoBAProcessor)}


def _per_axis(value) -> tuple:
    from ..checks import check_per_axis

    return check_per_axis("tile", value, minimum=1)


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
    "fit_gna",
    "load_preset",
    "preset_family",
    "processor_classes",
]
