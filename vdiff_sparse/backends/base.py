"""The interface every backend implements (the always-attended extra keys, :class:`ExtraKeys`,
are part of the problem and live with the plan)."""

from __future__ import annotations

import torch

from ..plan import AttentionPlan, ExtraKeys


class Backend:
    """Executes an :class:`AttentionPlan`.

    Subclasses set ``name`` and implement :meth:`why_not` (``None`` if the backend can run this
    problem, q and v ``[B, N, heads, D|Dv]``, else a sentence saying why not) and :meth:`forward` (q, k, v ``[B, N, heads, D]``
    in plan order -> output ``[B, N, heads, Dv]`` in plan order, same dtype as q).
    """

    name: str = ""

    def why_not(self, q: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> str | None:
        raise NotImplementedError

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: AttentionPlan,
        extra: ExtraKeys | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward_original_order(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: AttentionPlan,
        extra: ExtraKeys | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` with q, k, v and the output ``[B, N, heads, D]`` in the original
        token order. This default permutes copies; a backend that can apply ``plan.perm``
        inside its own gathers overrides it and saves four token-sized copies."""
        return plan.unpermute(self.forward(plan.permute(q), plan.permute(k), plan.permute(v), plan, extra, scale))
