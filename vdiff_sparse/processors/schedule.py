"""When a processor runs its method: dense warm-up steps, dense layers, per-layer overrides."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..methods.registry import method_names


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
            a registered method name (``"dense"``, ``"gna"``, ``"psa"``, ``"vmoba"``, ...), to run
            another method on that layer
            with that method's settings from the processor's model preset (or the method's
            defaults) updated with the other fields, e.g.
            ``{0: {"method": "dense"}, 1: {"method": "vmoba", "topk": 4}}`` on a
            :class:`GNAProcessor` (layer indices keep their meaning: VMoBA's 1D/2D/3D cycle
            follows them). ``method: dense`` is the same as listing the layer in
            ``dense_layers``.
        replan_every: run selection on every ``k``-th sparse step only and reuse the layer's
            plan in between (neighbouring steps' q/k are close; one plan per layer and per call
            of the step, e.g. both guidance branches). ``1`` (default) selects on every step.
            Methods whose plan depends on the grid only (GNA, dense) have nothing to reuse (a
            processor of only those refuses ``k > 1``); with gradients on (training) every call
            selects.
    """

    dense_steps: float = 0
    dense_layers: list[int] = field(default_factory=list)
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)
    replan_every: int = 1

    def __post_init__(self) -> None:
        d = self.dense_steps
        if (
            isinstance(d, bool)
            or not isinstance(d, (int, float))
            or not math.isfinite(d)
            or d < 0
            or (d >= 1 and int(d) != d)
        ):
            raise ValueError(
                f"dense_steps must be 0, an int >= 1 (steps) or a fraction in (0, 1), got {d!r}"
            )
        if isinstance(self.dense_layers, (str, int)) or not all(_is_int(i) for i in _items(self.dense_layers)):
            raise ValueError(f"dense_layers must be a list of ints, got {self.dense_layers!r}")
        self.dense_layers = [int(i) for i in self.dense_layers]
        if not isinstance(self.layers, dict) or not all(_is_int(i) and int(i) >= 0 for i in self.layers):
            raise ValueError(
                f"layers must map layer indices (ints >= 0) to overrides, got keys "
                f"{list(self.layers) if isinstance(self.layers, dict) else self.layers!r}"
            )
        if not all(isinstance(o, dict) for o in self.layers.values()):
            raise ValueError(f"layers values must be mappings of fields to values, got {self.layers!r}")
        self.layers = {int(i): dict(o) for i, o in self.layers.items()}
        if not _is_int(self.replan_every) or self.replan_every < 1:
            raise ValueError(f"replan_every must be an int >= 1 (1 = select on every step), got {self.replan_every!r}")
        self.replan_every = int(self.replan_every)
        methods = list(method_names())
        for i, overrides in self.layers.items():
            if "method" in overrides and overrides["method"] not in methods:
                raise ValueError(
                    f"layers[{i}]: unknown method {overrides['method']!r}; choose one of {methods}"
                )

    def check_layers(self, num_layers: int) -> None:
        """Refuse layer indices the model does not have (they would be ignored silently).

        Raises:
            ValueError: a ``dense_layers`` entry outside ``-num_layers .. num_layers - 1`` or a
                ``layers`` key outside ``0 .. num_layers - 1``.
        """
        bad = [i for i in self.dense_layers if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(
                f"dense_layers {bad}: the model has {num_layers} video self-attention layers "
                f"(indices 0..{num_layers - 1}, or -{num_layers}..-1 from the last)"
            )
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise ValueError(
                f"layers keys {bad}: the model has {num_layers} video self-attention layers "
                f"(indices 0..{num_layers - 1})"
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

    def replans(self, step: int, total_steps: int | None) -> bool:
        """Whether selection runs at sparse step ``step`` (else the previous plan is reused): the
        first sparse step after the warm-up and every ``replan_every``-th one after it."""
        return (step - self.warmup_steps(total_steps)) % self.replan_every == 0

    def dense_reason(self, step: int, total_steps: int | None, layer: int, num_layers: int) -> str:
        """``"warmup"``, ``"layer"`` or ``""`` (sparse) for this call."""
        if step < self.warmup_steps(total_steps):
            return "warmup"
        if self.layer_is_dense(layer, num_layers):
            return "layer"
        return ""


def _items(value) -> list:
    try:
        return list(value)
    except TypeError:
        return [value]


def _is_int(value) -> bool:
    """An int (not a bool), or an integral float as YAML may give it."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


__all__ = ["ScheduleConfig"]
