"""Reading a run's settings: the defaults, a YAML file (a path or a shipped name) and
``key=value`` overrides, checked as a whole (the ``sparse`` section by building its processors)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

from vdiff_sparse.methods.registry import method_names

from .config import FinetuneConfig
from .sparse import check_sparse


def config_path(name: str | os.PathLike) -> Path:
    """A YAML file, or the name of one shipped in ``configs/finetune`` (``"tiny_wan_vmoba"``).

    Raises:
        ValueError: neither exists.
    """
    import importlib.resources

    path = Path(name)
    if path.is_file():
        return path
    file_name = path.name if path.name.endswith(".yaml") else f"{path.name}.yaml"
    shipped = importlib.resources.files("vdiff_sparse.configs") / "finetune" / file_name
    if path.parent == Path(".") and shipped.is_file():
        return Path(str(shipped))
    raise ValueError(f"config {str(name)!r} is neither a file nor a shipped config ({shipped_configs()})")


def shipped_configs() -> list[str]:
    """Names of the training YAML files in ``configs/finetune``."""
    import importlib.resources

    folder = importlib.resources.files("vdiff_sparse.configs") / "finetune"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config(path: str | os.PathLike | None = None, overrides: List[str] | None = None) -> FinetuneConfig:
    """The defaults, updated by the YAML file ``path`` (see :func:`config_path`) and
    ``key=value`` ``overrides``.

    Raises:
        ValueError: an unknown key, a value of the wrong type or out of range, or an invalid
            ``sparse`` section (checked by building its processor, see
            :func:`~vdiff_sparse.pipelines.finetune.sparse.check_sparse`).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    try:
        merged = OmegaConf.structured(FinetuneConfig)
        if path is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(config_path(path)))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ValueError(f"overrides must be key=value, got {bad}")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        hint = ""
        if str(getattr(e, "full_key", "")).count(".") == 2 and e.full_key.startswith("sparse.options."):
            hint = (f"\nsparse.options has one section per method, {', '.join(method_names())}; e.g. "
                    f"sparse.options.vmoba.tau=0.3")
        raise ValueError(f"fine-tuning config: {e}{hint}") from None
    except YAMLError as e:
        raise ValueError(f"fine-tuning config {str(path)!r} is not plain YAML: {e}") from None
    config.data.check_source()
    check_sparse(config.sparse)
    return config


__all__ = ["config_path", "load_config", "shipped_configs"]
