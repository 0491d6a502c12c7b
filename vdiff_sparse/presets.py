"""YAML presets: a method's defaults and the per-model settings of every method.

* ``configs/methods/<method>.yaml`` (or the file a registered method names): ``config:`` (fields
  of the method's config) and ``schedule:`` (fields of the processors' schedule) defaults.
* ``configs/models/<model>.yaml``: ``family:`` (the model family it is for, an adapter name
  such as ``wan``) and one section per method with ``config:`` / ``schedule:`` overriding the
  method's defaults for that model.

Files are read with OmegaConf's plain YAML loader: no tags, no code.
"""

from __future__ import annotations

import importlib.resources

from .methods.registry import get_method


def _config_dir(kind: str):
    return importlib.resources.files("vdiff_sparse.configs") / kind


def available_presets() -> dict[str, list[str]]:
    """Preset names: ``{"methods": [...], "models": [...]}``."""
    out = {}
    for kind in ("methods", "models"):
        d = _config_dir(kind)
        out[kind] = sorted(p.name[: -len(".yaml")] for p in d.iterdir() if p.name.endswith(".yaml"))
    return out


def read_yaml(path) -> dict:
    """A YAML file (a path or an ``importlib.resources`` traversable) as plain containers."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(path.read_text()), resolve=True)


def load_preset(method: str, name: str | None = None) -> dict:
    """The settings ``{"config": {...}, "schedule": {...}}`` of ``method`` under preset
    ``name``: the method's defaults updated with the model preset's ``<method>`` section
    (``configs/models/<name>.yaml``), or with the method preset ``name``.

    Raises:
        ValueError: an unknown method or preset, a model preset without a section for
            ``method``, or a section with keys other than ``config`` and ``schedule``.
    """
    spec = get_method(method)
    base = read_yaml(spec.defaults_file())
    settings = {"config": dict(base.get("config") or {}), "schedule": dict(base.get("schedule") or {})}
    if name is None or name == method:
        return settings
    presets = available_presets()
    if name in presets["models"]:
        section = read_yaml(_config_dir("models") / f"{name}.yaml").get(method)
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
    settings["config"] = spec.merge(settings["config"], section.get("config") or {})
    settings["schedule"].update(section.get("schedule") or {})
    return settings


def is_model_preset(name: str | None) -> bool:
    """Whether ``name`` is a model preset (``configs/models/<name>.yaml``)."""
    return name is not None and name in available_presets()["models"]


def preset_family(name: str | None) -> str | None:
    """The model family (adapter name, e.g. ``"wan"``) model preset ``name`` is for; ``None``
    for no preset or a method preset."""
    if not is_model_preset(name):
        return None
    return read_yaml(_config_dir("models") / f"{name}.yaml").get("family")


def model_presets_for(family: str) -> list[str]:
    """The model presets made for model family ``family``."""
    return [n for n in available_presets()["models"] if preset_family(n) == family]


__all__ = ["available_presets", "is_model_preset", "load_preset", "model_presets_for", "preset_family",
           "read_yaml"]
