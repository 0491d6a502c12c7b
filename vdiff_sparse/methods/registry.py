"""The method registry: every attention method is declared once, in its own module.

A method module ends with ``register_method(Method(...))``: its name, config dataclass, planner,
functional attention, one-line summary and fine-tuning defaults. Every list of methods in the
library (the processors, the CLI's ``--attn`` choices, fine-tuning's ``sparse.method``, the
benchmarks) is derived from this registry, so a new method is one new file in
``vdiff_sparse/methods/`` plus its defaults YAML (``configs/methods/<name>.yaml``), nothing else.
Modules of this package are imported (and so registered) the first time the registry is read.

The calling convention every method follows::

    attention(q, k, v, grid, config=None, *, layer_index=0, extra_k=None, extra_v=None,
              extra_mask=None, scale=None, backend="auto", return_plan=False, **overrides)
    plan(q, k, grid, config, *, layer_index=0, scale=None) -> AttentionPlan

``q, k, v`` are ``[B, N, heads, D]`` video tokens (``N = T*H*W`` frame-major); ``config`` is the
method's config object, a mapping of its fields or ``None`` (the dataclass defaults);
``overrides`` are config fields replacing those of ``config``; ``layer_index`` is the index of
the self-attention layer (methods whose selection does not depend on it ignore it).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import pkgutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

# Modules of this package that are not methods.
_NOT_METHODS = frozenset({"registry"})


@dataclass(frozen=True)
class Method:
    """One attention method, as the rest of the library sees it.

    Attributes:
        name: short name used in presets, processors, the CLI and configs (``"gna"``).
        config_cls: the settings dataclass; its ``__post_init__`` validates every field.
        attention: the functional API (see the module docstring for its signature).
        plan: the planner (see the module docstring), or ``None`` for a method without plans.
        summary: one line saying what each query attends (CLI help, error messages).
        training: config fields that fine-tuning applies over the defaults (e.g. VMoBA trains
            with threshold selection); the user's settings override them.
        defaults: the YAML file of default ``config:`` and ``schedule:`` settings, or ``None``
            for ``configs/methods/<name>.yaml`` of the installed package.
        fit: ``fit(config, grid) -> config``: adapts settings made for another resolution to
            this latent grid before a processor runs them (GNA clips windows), or ``None``.
        resets: ``{field: {companion: value}}`` (or ``{field: value -> {companion: value}}``):
            when settings laid over others (a preset over
            the defaults, overrides over a preset, a layer's overrides over the processor's)
            give ``field`` without ``companion``, the companion takes ``value`` instead of the
            one underneath (GNA: a window given alone means stride 1, neighbourhood attention,
            not the preset's stride made for another window). See :meth:`merge`.
        plans_from_qk: whether the plan depends on q and k (``False``: on the grid and the
            settings only, as GNA's and dense attention's; a processor's ``replan_every`` then
            has nothing to reuse).
        processor_name: class name of the method's diffusers processor (built by
            :func:`vdiff_sparse.processors.processor_class` when no class is registered).
    """

    name: str
    config_cls: type
    attention: Callable[..., Any]
    plan: Callable[..., Any] | None
    summary: str
    training: Mapping[str, Any] = field(default_factory=dict)
    defaults: Path | None = None
    fit: Callable[[Any, tuple[int, int, int]], Any] | None = None
    resets: Mapping[str, Mapping[str, Any] | Callable[[Any], Mapping[str, Any]]] = field(default_factory=dict)
    plans_from_qk: bool = True
    processor_name: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"a method name must be a lower-case identifier, got {self.name!r}")
        if not dataclasses.is_dataclass(self.config_cls):
            raise ValueError(f"method {self.name!r}: config_cls must be a dataclass, got {self.config_cls!r}")
        unknown = sorted(set(self.training) - set(self.field_names()))
        if unknown:
            raise ValueError(f"method {self.name!r}: training settings name unknown fields {unknown}")

    def field_names(self) -> list[str]:
        """The fields of :attr:`config_cls`."""
        return [f.name for f in dataclasses.fields(self.config_cls)]

    def defaults_file(self):
        """The defaults YAML (a path or an ``importlib.resources`` traversable)."""
        if self.defaults is not None:
            return Path(self.defaults)
        return importlib.resources.files("vdiff_sparse.configs") / "methods" / f"{self.name}.yaml"

    def merge(self, base: Mapping[str, Any], top: Mapping[str, Any]) -> dict:
        """``base`` settings updated with ``top``, applying :attr:`resets` (a field given in
        ``top`` without its companions resets them). Keys other than config fields (schedule
        settings) pass through."""
        merged = {**base, **top}
        for key, companions in self.resets.items():
            if key in top:
                if callable(companions):
                    companions = companions(top[key])
                for companion, value in companions.items():
                    if companion not in top:
                        merged[companion] = value
        return merged

    def make_config(self, config=None, **overrides):
        """The config object of ``config`` (an instance, a mapping of fields or ``None`` for the
        dataclass defaults) with ``overrides`` applied, validated.

        Raises:
            ValueError: an unknown field name, a missing required field or a bad value.
        """
        return build_config(self.config_cls, config, overrides, self.config_cls.__name__.removesuffix("Config"))


def build_config(cls: type, config, overrides: Mapping[str, Any], what: str):
    """``cls(**fields)`` from ``config`` (an instance of ``cls``, a mapping or ``None``) updated
    with ``overrides``; YAML lists become tuples. Errors name ``what`` and the valid fields."""
    if config is None:
        values: dict = {}
    elif isinstance(config, cls):
        if not overrides:
            return config
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}
    elif isinstance(config, Mapping):
        values = dict(config)
    else:
        raise ValueError(
            f"config must be a {cls.__name__}, a mapping of its fields or None, got "
            f"{type(config).__name__}"
        )
    values.update(overrides)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names), key=str)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; valid options are {names}")
    required = [
        f.name for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in values]
    if missing:
        raise ValueError(f"{what} needs {missing} (no default); valid options are {names}")
    return cls(**{key: as_tuples(value) for key, value in values.items()})


def as_tuples(value):
    """YAML/OmegaConf lists (nested too) as tuples, so configs compare and hash as written."""
    if isinstance(value, list):
        return tuple(as_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: as_tuples(v) for k, v in value.items()}
    return value


_REGISTRY: dict[str, Method] = {}
_LOADED = False
_LOCK = threading.Lock()


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (at the end of its module). Returns it.

    Raises:
        ValueError: another method of that name is registered (unless ``replace``).
    """
    existing = _REGISTRY.get(method.name)
    if existing is not None and not replace and existing is not method:
        raise ValueError(f"a method named {method.name!r} is already registered ({existing.summary})")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method registered by :func:`register_method` (for plug-ins and tests)."""
    _load_package_methods()
    _REGISTRY.pop(name, None)


def _load_package_methods() -> None:
    """Import every module of ``vdiff_sparse.methods`` once: each registers its method."""
    global _LOADED
    if _LOADED:
        return
    with _LOCK:
        if _LOADED:
            return
        package = importlib.import_module(__package__)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_") and info.name not in _NOT_METHODS:
                importlib.import_module(f"{__package__}.{info.name}")
        _LOADED = True


def method_names() -> tuple[str, ...]:
    """Names of every registered method, sorted (``"dense"`` included)."""
    _load_package_methods()
    return tuple(sorted(_REGISTRY))


def get_method(name: str) -> Method:
    """The registered method ``name``.

    Raises:
        ValueError: no such method; the message lists the registered ones.
    """
    _load_package_methods()
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention method {name!r}; choose one of {list(method_names())}")
    return _REGISTRY[name]


__all__ = ["Method", "as_tuples", "build_config", "get_method", "method_names", "register_method",
           "unregister_method"]
