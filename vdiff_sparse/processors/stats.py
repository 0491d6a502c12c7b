"""Per-call statistics of the processors (density, time), which the speedup report reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import AttentionPlan


@dataclass
class CallStats:
    """One video self-attention call.

    Attributes:
        layer, step: layer index and denoising step.
        method: the method that ran on this layer (``"dense"`` when the schedule chose dense).
        num_tokens: video tokens.
        coverage: share of (query, key) video pairs attended, a pooled key counted as every key
            it averages.
        density: FLOP-equivalent density, as :meth:`AttentionPlan.density` (a key pooled ``p``
            times counts ``1/p``).
        time_ms: wall time of the attention (device synchronised).
        dense_reason: ``"warmup"``/``"layer"`` when the schedule chose dense, else ``""``.
        batch: samples in the call (2 where a pipeline batches classifier-free guidance).
    """

    layer: int
    step: int
    method: str
    num_tokens: int
    coverage: float
    density: float
    time_ms: float
    dense_reason: str = ""
    batch: int = 1


def plan_coverage(plan: AttentionPlan | None) -> tuple[float, float]:
    """``(coverage, density)`` of a plan (``None`` = dense); see :class:`CallStats`."""
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
        """Totals: calls, mean coverage / density (over calls), total time, and the same per
        layer."""
        def agg(recs):
            n = len(recs)
            return {
                "calls": n,
                "coverage": sum(r.coverage for r in recs) / n if n else float("nan"),
                "density": sum(r.density for r in recs) / n if n else float("nan"),
                "time_ms": sum(r.time_ms for r in recs),
            }

        layers = sorted({r.layer for r in self.records})
        return {**agg(self.records), "per_layer": {i: agg([r for r in self.records if r.layer == i]) for i in layers}}


def sync(x: torch.Tensor) -> None:
    """Wait for ``x``'s device (timing)."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


__all__ = ["CallStats", "StatsLog", "plan_coverage", "sync"]
