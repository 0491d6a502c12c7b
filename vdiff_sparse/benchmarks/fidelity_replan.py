"""What plan reuse across denoising steps costs: ``replan_every`` end to end on the tiny model.

Selection runs on every ``replan_every``-th sparse step and the layer's plan is reused in
between (:class:`~vdiff_sparse.processors.schedule.Schedule`). Per method whose plan depends
on q/k (PSA, VMoBA; GNA's and dense's depend on the grid only), seed and ``replan_every``:
the video of ``vdiff-sparse generate --compare-dense`` against the dense video of the same seed
(PSNR, SSIM), with ``replan_every = 1`` (select every step) as the baseline of each seed.
More steps than the tiny model's default 4, so that plans are reused more than once.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

from .fidelity_psa import E2E_PROMPT

REPLAN_EVERY = (1, 2, 4)
REPLAN_METHODS = ("psa", "vmoba")
REPLAN_STEPS = 8


def replan_e2e(seeds: Sequence[int], *, replan_every: Sequence[int] = REPLAN_EVERY,
               methods: Sequence[str] = REPLAN_METHODS, steps: int = REPLAN_STEPS,
               size: dict | None = None) -> dict:
    """Runs and summary: ``{"what", "steps", "runs": [...], "summary": {method: {k: ...}}}``;
    each run has ``method``, ``seed``, ``replan_every``, ``selections`` (sparse steps that ran
    selection), ``psnr_db`` / ``ssim`` vs dense and ``psnr_drop_db`` against
    ``replan_every = 1`` of the same seed; the summary gives per method and ``k`` the median
    PSNR drop and the worst one."""
    from ..pipelines.generate import SparseVideoPipeline
    from ..pipelines.report import compare

    pipe = SparseVideoPipeline.tiny()
    call = pipe.resolve_size(**{"num_inference_steps": steps, **(size or {})})
    runs = []
    for seed in seeds:
        pipe.set_attn_processor(pipe.make_processor("dense"))
        dense = pipe(E2E_PROMPT, **call, seed=seed)
        for method in methods:
            baseline = None
            for k in replan_every:
                processor = pipe.make_processor(method, overrides={"replan_every": k})
                pipe.set_attn_processor(processor)
                report = compare(pipe(E2E_PROMPT, **call, seed=seed), dense)
                schedule = processor.schedule
                warmup = schedule.warmup_steps(call["num_inference_steps"])
                selections = sum(schedule.replans(s, call["num_inference_steps"])
                                 for s in range(warmup, call["num_inference_steps"]))
                psnr = report["psnr_db"] if report["psnr_db"] is not None else math.inf
                baseline = psnr if k == 1 else baseline
                runs.append({"method": method, "seed": seed, "replan_every": k, "selections": selections,
                             "sparse_steps": call["num_inference_steps"] - warmup, "psnr_db": report["psnr_db"],
                             "ssim": report["ssim"], "density": report["density"],
                             "psnr_drop_db": None if baseline is None else baseline - psnr})
    summary = {}
    for method in methods:
        summary[method] = {}
        for k in replan_every:
            drops = sorted(r["psnr_drop_db"] for r in runs
                           if r["method"] == method and r["replan_every"] == k and r["psnr_drop_db"] is not None)
            summary[method][k] = {"median_psnr_drop_db": statistics.median(drops) if drops else None,
                                  "worst_psnr_drop_db": drops[-1] if drops else None}
    return {
        "what": "vdiff-sparse generate --compare-dense on the built-in tiny model (random weights) with "
                f"{steps} steps; PSNR / SSIM of each sparse video vs the dense one of the same seed, and the "
                "PSNR drop against selecting on every step (replan_every=1)",
        "steps": call["num_inference_steps"], "runs": runs, "summary": summary,
    }


__all__ = ["REPLAN_EVERY", "REPLAN_METHODS", "REPLAN_STEPS", "replan_e2e"]
