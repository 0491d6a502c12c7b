"""PSA's budget mode at matched FLOP density, case by case: against binary block-sparse (level 1
only) and against a fixed pyramid split, per (scene, density, head); and end to end on the
library's tiny model (PSNR of the video against dense attention).

Per case, measured points only (no interpolation):

* **binary**: quantile mode with level 1 only, the fraction of key blocks whose density is
  nearest the target (whole blocks per row), density ``d_b``;
* **budget**: ``mode="budget"``, its requested density searched (a few secant steps from
  ``d_b``) for the plan's density closest to ``d_b`` from below (it rounds up by at most one
  block per query block);
* **split**: quantile mode with fractions ``{1: 0.6 s, 2: 0.4 s, 4: 0.8 s}`` (FLOP density
  ``s`` before rounding), ``s`` searched the same way.

A case counts for a comparison only where the two densities are within
:data:`MATCH_TOLERANCE` (relative) of each other. Each (scene, head) is planned and run on its
own, so every head gets its own matched budget. Errors are relative L2 against dense attention
over the head's output.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

MATCH_TOLERANCE = 0.02
SPLIT = {1: 0.6, 2: 0.4, 4: 0.8}
_SEARCH_STEPS = 8

# The prompt of the end-to-end runs on the tiny model (random weights: any prompt does).
E2E_PROMPT = "a red fox running through fresh snow"


def _density(plan) -> float:
    return float(plan.density())


def _match(make, density_of, target: float, start: float, steps: int, cap: float = 1.0):
    """``(knob, result)`` whose density is at most ``target`` and the largest found: from
    ``start``, ``steps`` multiplicative secant steps ``knob *= target / density`` (densities
    grow with the knob; it stays at most ``cap``); the lowest-density try if none is at most
    ``target``."""
    knob, tries = min(start, cap), []
    for _ in range(steps):
        result = make(knob)
        density = density_of(result)
        tries.append((density, knob, result))
        if density == target:
            break
        knob = min(cap, knob * target / max(density, 1e-9) * (1 - 1e-3 if density > target else 1))
    below = [t for t in tries if t[0] <= target]
    density, knob, result = max(below, key=lambda t: t[0]) if below else min(tries, key=lambda t: t[0])
    return knob, result


def binary_fraction_at(q, k, grid, density: float, psa_block: int) -> float:
    """The ``fractions[1]`` of level-1-only quantile PSA whose plan density is nearest
    ``density`` (whole key blocks per row; ragged last blocks make counts and tokens differ)."""
    from ..methods.psa import PSAConfig, plan_psa

    nkb = -(-q.shape[1] // psa_block)

    def at(m):  # m blocks per row; the fraction sits mid-way so that ceil() gives m
        fraction = (m - 0.5) / nkb
        config = PSAConfig(block_q=psa_block, block_k=psa_block, mode="quantile", fractions={1: fraction})
        return fraction, plan_psa(q, k, grid, config).density()

    lo, hi = 1, nkb  # smallest m whose density reaches the target
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if at(mid)[1] < density else (lo, mid)
    candidates = [at(m) for m in {max(1, lo - 1), lo}]
    return min(candidates, key=lambda c: abs(c[1] - density))[0]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def budget_cases(q, k, v, dense, grid, scenes: Sequence[str], heads: Sequence[str],
                 densities: Sequence[float], block: int, backend: str = "auto") -> list[dict]:
    """One case per (scene = batch element, density, head) of ``q, k, v`` ``[S, N, H, D]``:
    the three plans' densities and errors (see the module docstring)."""
    from ..attention import run_plan
    from ..methods.psa import PSAConfig, plan_psa

    base = PSAConfig(block_q=block, block_k=block, importance_dtype="float32")
    cases = []
    for s, scene in enumerate(scenes):
        for h, head in enumerate(heads):
            qs, ks, vs, ref = (x[s : s + 1, :, h : h + 1] for x in (q, k, v, dense))

            def plan(**options):
                return plan_psa(qs, ks, grid, base.replace(**options))

            for target in densities:
                fraction = binary_fraction_at(qs, ks, grid, target, block)
                plans = {"binary": (fraction, plan(mode="quantile", fractions={1: fraction}))}
                d_b = _density(plans["binary"][1])
                plans["budget"] = _match(lambda r: plan(mode="budget", density=r), _density, d_b, d_b,
                                         _SEARCH_STEPS)
                plans["split"] = _match(
                    lambda x: plan(mode="quantile", fractions={p: f * x for p, f in SPLIT.items()}),
                    _density, d_b, d_b, _SEARCH_STEPS, cap=1 / sum(SPLIT.values()))
                case = {"scene": scene, "head": head, "target_density": target}
                for name, (knob, p) in plans.items():
                    out = run_plan(qs, ks, vs, p, backend=backend)
                    case[name] = {"knob": knob, "density": _density(p), "rel_l2": _rel_err(out, ref),
                                  "level_fractions": p.stats()["level_fractions"]}
                for name in ("budget", "split"):
                    gap = abs(case[name]["density"] - d_b) / d_b
                    case[f"{name}_matched"] = gap <= MATCH_TOLERANCE
                    case[f"{name}_over_binary"] = case[name]["rel_l2"] / case["binary"]["rel_l2"]
                case["budget_over_split"] = case["budget"]["rel_l2"] / case["split"]["rel_l2"]
                cases.append(case)
    return cases


def summarize_cases(cases: list[dict]) -> dict:
    """Tallies over the matched cases: budget vs binary (worse by more than 3%, better by 2% or
    more, ratios), budget vs split, and the same per scene and per head."""

    def tally(rows):
        vs_binary = [c["budget_over_binary"] for c in rows if c["budget_matched"]]
        both = [c for c in rows if c["budget_matched"] and c["split_matched"]]
        out = {
            "cases": len(rows),
            "budget_vs_binary_counted": len(vs_binary),
            "budget_worse_than_binary_by_over_3pct": sum(r > 1.03 for r in vs_binary),
            "budget_better_than_binary_by_2pct": sum(r <= 0.98 for r in vs_binary),
            "share_budget_better_by_2pct": None if not vs_binary else sum(r <= 0.98 for r in vs_binary) / len(vs_binary),
            "worst_budget_over_binary": max(vs_binary, default=None),
            "mean_budget_over_binary": None if not vs_binary else sum(vs_binary) / len(vs_binary),
            "geomean_budget_over_binary": None if not vs_binary
            else math.exp(sum(math.log(r) for r in vs_binary) / len(vs_binary)),
            "three_way_counted": len(both),
            "mean_budget_over_binary_three_way": None if not both
            else sum(c["budget_over_binary"] for c in both) / len(both),
            "mean_split_over_binary_three_way": None if not both
            else sum(c["split_over_binary"] for c in both) / len(both),
            "budget_better_than_split": sum(c["budget_over_split"] < 1 for c in both),
        }
        return out

    return {
        "all": tally(cases),
        "per_scene": {s: tally([c for c in cases if c["scene"] == s]) for s in dict.fromkeys(c["scene"] for c in cases)},
        "per_head": {h: tally([c for c in cases if c["head"] == h]) for h in dict.fromkeys(c["head"] for c in cases)},
    }


# --- end to end on the tiny model ----------------------------------------------------------------
def _sparse_flop_density(result) -> float:
    """Mean FLOP density of the calls that ran the sparse method (not the dense warm-up)."""
    calls = [c for c in result.stats["calls"] if not c["dense_reason"]]
    if not calls:
        raise ValueError("every attention call ran dense (the warm-up covers all steps): give more steps")
    return sum(c["density"] for c in calls) / len(calls)


def tiny_model_e2e(densities: Sequence[float], seeds: Sequence[int], *, size: dict | None = None) -> list[dict]:
    """``vdiff-sparse generate --compare-dense`` on the built-in tiny model, per seed and target
    density: binary block-sparse PSA (quantile, level 1 only) and budget mode at the matched
    density, each against the dense video of the same seed (PSNR, SSIM). PSA otherwise runs the
    tiny model's settings (``configs/generate/tiny.yaml``: 64-token blocks, first step dense)."""
    from ..pipelines.generate import SparseVideoPipeline
    from ..pipelines.report import compare

    pipe = SparseVideoPipeline.tiny()
    call = pipe.resolve_size(**(size or {}))
    grid = pipe.latent_grid(call["num_frames"], call["height"], call["width"])
    n = math.prod(grid)
    rows = []
    for seed in seeds:
        pipe.set_attn_processor(pipe.make_processor("dense"))
        dense = pipe(E2E_PROMPT, **call, seed=seed)
        for target in densities:
            block = pipe.make_processor("psa").config.block_k
            nkb = -(-n // block)
            blocks = max(1, round(target * nkb))
            binary = pipe.make_processor("psa", overrides={"mode": "quantile", "fractions": {1: (blocks - 0.5) / nkb}})
            pipe.set_attn_processor(binary)
            runs = {"binary": pipe(E2E_PROMPT, **call, seed=seed)}
            d_b = _sparse_flop_density(runs["binary"])

            def budget(r):
                pipe.set_attn_processor(pipe.make_processor("psa", overrides={"mode": "budget", "density": r}))
                return pipe(E2E_PROMPT, **call, seed=seed)

            requested, runs["budget"] = _match(budget, _sparse_flop_density, d_b, d_b, _SEARCH_STEPS // 2)
            row = {"seed": seed, "target_density": target, "grid": list(grid), "binary_fraction": (blocks - 0.5) / nkb}
            for name, result in runs.items():
                report = compare(result, dense)
                row[name] = {"flop_density_sparse_calls": _sparse_flop_density(result),
                             "flop_density_all_calls": report["density"],
                             "psnr_db": report["psnr_db"], "ssim": report["ssim"]}
            row["budget_density_requested"] = requested
            gap = abs(row["budget"]["flop_density_sparse_calls"] - d_b) / d_b
            row["matched"] = gap <= MATCH_TOLERANCE
            row["budget_not_worse"] = (row["budget"]["psnr_db"] or math.inf) >= (row["binary"]["psnr_db"] or math.inf)
            rows.append(row)
    return rows
