"""Fidelity at matched compute: each method's output error against dense attention versus its
FLOP-equivalent density, on video-like attention (:mod:`vdiff_sparse.video_attention_data`):
one batch element per kind of scene (smooth, mixed, cellular, texture: sharp, textured,
high-frequency content beside smooth content) and heads from strongly local to global
(:data:`BENCH_HEADS`, some of them with sharp content-driven attention).

Every curve sweeps one knob of one method variant (:func:`curves`):

* GNA: neighborhood attention (stride 1) with windows growing on every axis; sliding tile
  attention (window = m tiles, stride = tile, perfectly block-sparse).
* PSA: threshold mode with all four levels (the released bounds pattern, ``c1`` swept) and with
  level 1 only; quantile mode with the released multi-level split scaled, with the split
  ``{1: 0.6, 2: 0.4, 4: 0.8}`` scaled, and with level 1 only ("binary block-sparse"); budget
  mode (:mod:`vdiff_sparse.methods.psa_budget`) at swept densities. Each multi-level point is
  also paired with binary block-sparse at the same density (as near as whole blocks allow),
  the comparison the PSA paper makes; a pair counts only if the two densities are within 2%.
  Budget mode is compared case by case (scene, density, head) in
  :mod:`vdiff_sparse.benchmarks.fidelity_psa`, and end to end on the tiny model (``--e2e``).
* VMoBA: top-k and threshold ``tau``, local and global selection, on the 3D partition; top-k
  local on the 1D and 2D partitions.

Errors: relative L2 ``||o - o_dense|| / ||o_dense||`` over the whole output, per head, per scene
and per (scene, head), and the mean cosine similarity of output token vectors. Density: ``plan.density()`` (pooled keys
count ``1/p``), and ``block_density`` (what a block-sparse kernel with the plan's tiles computes,
masked entries included: higher than the density for per-token windows and per-token routing).
The matched-density tables of the summary are *interpolated*: each curve's error, linear in
``log(density)`` between its two measured points around the density; the PSA pairs and the
budget-mode cases are measured points only. Plots: ``<out>.png`` against density, ``<out>_block_density.png`` against block
density.

    vdiff-sparse bench fidelity                    # grid (8, 16, 24), 4 scenes, 8 heads, D 64
    python bench/fidelity.py --grid 4 12 16 --heads 4 --no-e2e --out /tmp/f.json   # quick

The budget mode's error estimate was chosen on seed 0 (grid (8, 24, 32), blocks of 64 and
128); the benchmark runs seed 1 by default, data the estimate was not tuned on.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .fidelity_replan import replan_e2e
from .fidelity_psa import MATCH_TOLERANCE, SPLIT, binary_fraction_at, budget_cases, summarize_cases, tiny_model_e2e
from ..figures import save_figure
from .meta import command_line, run_metadata, write_json

DEFAULT_GRID = (8, 16, 24)
DEFAULT_PSA_BLOCK = 64
DEFAULT_OUT = Path("bench") / "results" / "fidelity_cpu.json"
DEFAULT_SEED = 1  # held out: the budget mode's estimate was chosen on seed 0
MATCHED_DENSITIES = (0.05, 0.1, 0.15, 0.2, 0.3)
PER_HEAD_DENSITIES = (0.1, 0.2)
BUDGET_DENSITIES = (0.1, 0.15, 0.2, 0.3)
E2E_DENSITIES = (0.1, 0.2, 0.3)
E2E_SEEDS = (0, 1)
# PSA's released quantile split (10% full, 5% at 2x, 20% at 8x), scaled by the knob.
PSA_QUANTILE_SPLIT = {1: 0.1, 2: 0.05, 8: 0.2}
# Heads from strongly local to global; the last two attend by content, sharply.
BENCH_HEADS = ("very_local", "local", "temporal", "mid", "wide", "global", "sharp_mid", "sharp_global")

NAMES = {"gna": "GNA", "psa": "PSA", "vmoba": "VMoBA"}

Run = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]


@dataclass
class Curve:
    """One method variant and the values of the knob it sweeps.

    Attributes:
        family: ``"gna"``, ``"psa"`` or ``"vmoba"``.
        name: the variant, e.g. ``"threshold, level 1 only"``.
        knob: what ``values`` are.
        values: knob settings, ascending in density.
        make: ``value -> run`` where ``run(q, k, v)`` returns ``(out, plan)``.
    """

    family: str
    name: str
    knob: str
    values: list
    make: Callable[[object], Run]


def _psa_thresholds(c1: float) -> dict[int, float]:
    """The released bounds pattern (0.5/0.6/0.7/0.8) moved to start at ``c1``."""
    step = min(0.1, (1 - c1) / 4)
    return {1: c1, 2: c1 + step, 4: c1 + 2 * step, 8: c1 + 3 * step}


def _psa_quantile_fractions(scale: float) -> dict[int, float]:
    return {p: f * scale for p, f in PSA_QUANTILE_SPLIT.items()}


def curves(grid: Sequence[int], *, vmoba_cube: Sequence[int] = (2, 8, 8), psa_block: int = DEFAULT_PSA_BLOCK,
           backend: str = "auto") -> list[Curve]:
    """The sweep of every method variant on ``grid`` (see the module docstring); VMoBA's 3D
    partition uses ``vmoba_cube``, PSA query and key blocks of ``psa_block`` tokens."""
    from .. import gna_attention, psa_attention, vmoba_attention

    grid = tuple(grid)
    cube = tuple(min(c, n) for c, n in zip(vmoba_cube, grid))

    def gna(fraction):
        window = tuple(min(n, max(2, round(fraction * n))) if n > 1 else 1 for n in grid)
        return lambda q, k, v: gna_attention(q, k, v, grid, window=window, backend=backend, return_plan=True)

    tile = tuple(-(-n // 4) for n in grid)  # four tiles per axis

    def sta(tiles):
        window = tuple(min(n, max(2, m * t)) if n > 1 else 1 for n, m, t in zip(grid, tiles, tile))
        stride = tuple(min(t, w) for t, w in zip(tile, window))
        return lambda q, k, v: gna_attention(q, k, v, grid, window=window, stride=stride, backend=backend, return_plan=True)

    def psa(**options):
        return lambda q, k, v: psa_attention(q, k, v, grid, block_q=psa_block, block_k=psa_block,
                                             backend=backend, return_plan=True, **options)

    def vmoba(layer, **options):
        return lambda q, k, v: vmoba_attention(q, k, v, grid, layer_index=layer, block_3d=cube, backend=backend,
                                               return_plan=True, **options)

    c1s = [0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.97]
    topks = [1, 2, 3, 4, 6, 8, 12, 16, 24]
    taus = [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
    return [
        Curve("gna", "neighborhood (stride 1)", "window / axis length",
              [0.25, 0.35, 0.45, 0.55, 0.65, 0.8, 1.0], gna),
        Curve("gna", f"sliding tile (stride = tile {tile})", "window in tiles (t, h, w)",
              [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 3), (2, 3, 3), (3, 3, 3), (4, 4, 4)], sta),
        Curve("psa", "threshold, multi-level", "c1 (c2, c4, c8 follow the released pattern)", c1s,
              lambda c: psa(thresholds=_psa_thresholds(c))),
        Curve("psa", "threshold, level 1 only", "c1", c1s + [1.0],
              lambda c: psa(thresholds={1: c})),
        Curve("psa", "quantile, multi-level", "scale of {1: 0.1, 2: 0.05, 8: 0.2}",
              [0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 1 / 0.35],
              lambda s: psa(mode="quantile", fractions=_psa_quantile_fractions(s))),
        Curve("psa", "quantile, multi-level split {1: .6, 2: .4, 4: .8}", "FLOP density of the split",
              [0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 1 / sum(SPLIT.values())],
              lambda d: psa(mode="quantile", fractions={p: f * d for p, f in SPLIT.items()})),
        Curve("psa", "budget, multi-level (error-aware)", "density",
              [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 1.0],
              lambda d: psa(mode="budget", density=d)),
        Curve("psa", "quantile, level 1 only (binary block-sparse)", "fraction of key blocks",
              [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 1.0],
              lambda f: psa(mode="quantile", fractions={1: f})),
        Curve("vmoba", "top-k, local, 3D", "k (blocks per token)", topks,
              lambda t: vmoba(2, mode="topk", scope="local", topk=t)),
        Curve("vmoba", "top-k, global, 3D", "k (blocks per token on average)", topks,
              lambda t: vmoba(2, mode="topk", scope="global", topk=t)),
        Curve("vmoba", "threshold, local, 3D", "tau", taus,
              lambda t: vmoba(2, mode="threshold", scope="local", tau=t)),
        Curve("vmoba", "threshold, global, 3D", "tau", taus,
              lambda t: vmoba(2, mode="threshold", scope="global", tau=t)),
        Curve("vmoba", "top-k, local, 2D", "k", [1, 2, 3, 4, 6, 8],
              lambda t: vmoba(1, mode="topk", scope="local", topk=t)),
        Curve("vmoba", "top-k, local, 1D", "k", [1, 2, 3, 4],
              lambda t: vmoba(0, mode="topk", scope="local", topk=t, block_1d=max(1, grid[0] // 4))),
    ]


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """``rel_l2`` (whole output), ``rel_l2_per_head`` (over the batch), ``rel_l2_per_scene``
    (batch element, over heads), ``rel_l2_per_scene_head`` (``[B][H]``) and ``cosine`` (mean
    over token vectors) of ``out`` against ``ref``, both ``[B, N, heads, D]``."""
    out, ref = out.double(), ref.double()
    diff = out - ref

    def rel(dims):
        return diff.square().sum(dims).sqrt() / ref.square().sum(dims).sqrt()

    return {
        "rel_l2": float(diff.norm() / ref.norm()),
        "rel_l2_per_head": rel((0, 1, 3)).tolist(),
        "rel_l2_per_scene": rel((1, 2, 3)).tolist(),
        "rel_l2_per_scene_head": rel((1, 3)).tolist(),
        "cosine": float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean()),
    }


def _json_value(value):
    return list(value) if isinstance(value, tuple) else value


def measure(run: Run, q, k, v, dense: torch.Tensor) -> dict:
    """Run one setting: its densities, errors and wall time (plan + attention)."""
    start = time.perf_counter()
    with torch.no_grad():
        out, plan = run(q, k, v)
    elapsed = time.perf_counter() - start
    stats = plan.stats()
    return {"density": stats["density"], "block_density": stats["block_density"],
            "level_fractions": stats["level_fractions"], **errors(out, dense), "time_s": elapsed}


def interpolate(points: list[dict], density: float, x: str = "density") -> float | None:
    """``rel_l2`` at ``density`` on a curve, linear in ``log(density)`` between the two nearest
    measured densities around it; ``None`` outside the measured range. ``x`` names the density
    of the points to use (``"density"`` or ``"block_density"``)."""
    pts = sorted((p[x], p["rel_l2"]) for p in points if p[x] > 0)
    for (d0, e0), (d1, e1) in zip(pts, pts[1:]):
        if d0 <= density <= d1:
            if d1 == d0:
                return min(e0, e1)
            w = (math.log(density) - math.log(d0)) / (math.log(d1) - math.log(d0))
            return e0 + w * (e1 - e0)
    return None


def psa_pairs(curve_results: list[dict], q, k, v, dense, grid, backend: str,
              psa_block: int = DEFAULT_PSA_BLOCK) -> list[dict]:
    """Every multi-level PSA point next to binary block-sparse (level 1 only, quantile) at the
    nearest density whole blocks allow (:func:`binary_fraction_at`), both measured; ``matched``
    when the two densities are within :data:`MATCH_TOLERANCE` (relative). Also the binary
    curve's error interpolated at exactly the multi-level density."""
    from .. import psa_attention

    binary_curve = next((c for c in curve_results if c["name"].startswith("quantile, level 1 only")), None)
    pairs = []
    for curve in curve_results:
        # Budget mode is compared case by case (fidelity_psa), at densities matched per head.
        if curve["family"] != "psa" or "multi-level" not in curve["name"] or curve["name"].startswith("budget"):
            continue
        for point in curve["points"]:
            if point["density"] >= 1:
                continue
            fraction = binary_fraction_at(q, k, grid, point["density"], psa_block)
            binary = measure(lambda q, k, v: psa_attention(
                q, k, v, grid, mode="quantile", fractions={1: fraction}, block_q=psa_block,
                block_k=psa_block, backend=backend, return_plan=True), q, k, v, dense)
            keys = ("density", "rel_l2", "rel_l2_per_scene_head", "cosine")
            pairs.append({
                "variant": curve["name"], "value": point["value"],
                "multi_level": {key: point[key] for key in (*keys, "level_fractions")},
                "binary": {key: binary[key] for key in (*keys, "block_density")},
                "matched": abs(binary["density"] - point["density"]) <= MATCH_TOLERANCE * point["density"],
                "binary_curve_at_multi_density": None if binary_curve is None
                else interpolate(binary_curve["points"], point["density"]),
                "multi_level_better": point["rel_l2"] < binary["rel_l2"],
            })
    return pairs


def summarize(curve_results: list[dict], pairs: list[dict]) -> dict:
    """Interpolated matched-density errors per curve (and per head), the best variant per family
    at each matched density, and the tally of the PSA multi-level vs binary pairs whose
    densities match (measured points)."""
    matched = {f"{c['family']}: {c['name']}": {str(d): interpolate(c["points"], d) for d in MATCHED_DENSITIES}
               for c in curve_results}
    per_head = {}
    for c in curve_results:
        heads = len(c["points"][0]["rel_l2_per_head"])
        per_head[f"{c['family']}: {c['name']}"] = {
            str(d): [interpolate([{"density": p["density"], "rel_l2": p["rel_l2_per_head"][h]}
                                  for p in c["points"]], d) for h in range(heads)]
            for d in PER_HEAD_DENSITIES}

    def best(x):
        out = {}
        for family in ("gna", "psa", "vmoba"):
            out[family] = {}
            for d in MATCHED_DENSITIES:
                options = [(e, f"{c['family']}: {c['name']}") for c in curve_results if c["family"] == family
                           for e in [interpolate(c["points"], d, x)] if e is not None]
                out[family][str(d)] = None if not options else dict(zip(("rel_l2", "variant"), min(options)))
        return out
    counted = [p for p in pairs if p["matched"]]
    tally = {}
    for variant in dict.fromkeys(p["variant"] for p in pairs):
        rows = [p for p in counted if p["variant"] == variant]
        ratios = sorted(p["multi_level"]["rel_l2"] / p["binary"]["rel_l2"] for p in rows if p["binary"]["rel_l2"] > 0)
        tally[variant] = {
            "pairs": sum(p["variant"] == variant for p in pairs), "pairs_matched": len(rows),
            "multi_level_wins": sum(p["multi_level_better"] for p in rows),
            "median_error_ratio_multi_over_binary": None if not ratios else ratios[len(ratios) // 2],
        }
    return {
        "interpolation": "matched_density_* and best_per_family*: each curve's rel_l2 interpolated "
                         "linearly in log(density) between the two measured points around the density",
        "matched_density_rel_l2": matched,
        "matched_density_rel_l2_per_head": per_head,
        "best_per_family": best("density"),
        "best_per_family_by_block_density": best("block_density"),
        "psa_multi_vs_binary": {
            "pairs": len(pairs), "pairs_matched": len(counted),
            "multi_level_wins": sum(p["multi_level_better"] for p in counted),
            "per_variant": tally,
        },
    }


def bench_qkv(grid: Sequence[int], heads: int, head_dim: int, seed: int, scenes: Sequence[str]):
    """q, k, v ``[len(scenes), N, heads, head_dim]``: batch element ``s`` is a video of kind
    ``scenes[s]`` (seeded by ``seed``), head ``h`` of kind ``BENCH_HEADS[h % 8]``; and the
    head kinds."""
    from ..video_attention_data import head_profile, video_attention_qkv

    kinds = [BENCH_HEADS[h % len(BENCH_HEADS)] for h in range(heads)]
    locality, content = head_profile(kinds)
    parts = [video_attention_qkv(grid, heads, head_dim, seed=seed, locality=locality, content=content, scene=scene)
             for scene in scenes]
    return [torch.cat(x) for x in zip(*parts)], kinds


def run_sweep(grid: Sequence[int], heads: int, head_dim: int, *, seed: int = DEFAULT_SEED,
              scenes: Sequence[str] = ("smooth", "mixed", "cellular", "texture"), backend: str = "auto",
              vmoba_cube: Sequence[int] = (2, 8, 8), psa_block: int = DEFAULT_PSA_BLOCK,
              only: Sequence[str] | None = None, budget_densities: Sequence[float] = BUDGET_DENSITIES,
              with_curves: bool = True, verbose: bool = True) -> dict:
    """Every curve of :func:`curves` (unless ``with_curves`` is false), the PSA pairs and the
    budget-mode cases on one synthetic problem; returns the report body (``problem``,
    ``curves``, ``psa_pairs``, ``psa_budget``, ``summary``)."""
    from ..attention import dense_attention

    grid = tuple(grid)
    (q, k, v), kinds = bench_qkv(grid, heads, head_dim, seed, scenes)
    with torch.no_grad():
        dense = dense_attention(q, k, v)
    results = []
    for curve in curves(grid, vmoba_cube=vmoba_cube, psa_block=psa_block, backend=backend):
        if (only and curve.family not in only) or not with_curves:
            continue
        points = []
        for value in curve.values:
            point = {"value": _json_value(value), **measure(curve.make(value), q, k, v, dense)}
            points.append(point)
            if verbose:
                print(f"{curve.family:>5} | {curve.name:<44} | {str(point['value']):>14} | density "
                      f"{point['density']:.3f} | rel L2 {point['rel_l2']:.4f} | cos {point['cosine']:.4f}",
                      flush=True)
        results.append({"family": curve.family, "name": curve.name, "knob": curve.knob, "points": points})
    pairs = psa_pairs(results, q, k, v, dense, grid, backend, psa_block)
    cases = []
    if not only or "psa" in only:
        with torch.no_grad():
            cases = budget_cases(q, k, v, dense, grid, scenes, kinds, budget_densities, psa_block, backend)
    return {
        "problem": {"grid": list(grid), "tokens": q.shape[1], "heads": heads, "head_dim": head_dim,
                    "head_kinds": kinds, "scenes": list(scenes), "seed": seed, "dtype": "float32",
                    "backend": backend, "vmoba_cube": [min(c, n) for c, n in zip(vmoba_cube, grid)],
                    "psa_block": psa_block,
                    "data": "vdiff_sparse.benchmarks.fidelity.bench_qkv (video_attention_qkv, one batch "
                            "element per scene)",
                    "held_out": "the budget mode's error estimate was chosen on seed 0 (grid 8x24x32, "
                                "blocks 64 and 128); seeds other than 0 are data it was not tuned on"},
        "metrics": "rel_l2 = ||out - dense|| / ||dense|| (float64); cosine = mean over token "
                   "vectors; density = plan.density() (FLOP-equivalent, pooled keys count 1/p); "
                   "time_s = plan + attention wall time on a shared machine (not a speed benchmark)",
        "curves": results,
        "psa_pairs": pairs,
        "psa_budget": {"cases": cases, "summary": summarize_cases(cases) if cases else None},
        "summary": summarize(results, pairs),
    }


PLOT_AXES = {
    "density": ("FLOP-equivalent density (plan.density())", "best_per_family"),
    "block_density": ("block density: work of a block-sparse kernel, masked entries included",
                      "best_per_family_by_block_density"),
}


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    return plt


def plot(report: dict, path: str | Path, x: str = "density") -> Path | None:
    """Error vs ``x`` (``"density"`` or ``"block_density"``), one panel per family and one with
    every family's best variant at each matched density; ``None`` (and a message) if matplotlib
    is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    colors = {"gna": "tab:green", "psa": "tab:blue", "vmoba": "tab:orange"}
    styles = ["-o", "--s", ":^", "-.v", "-D", "--x"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5), sharey=True)
    for ax, family in zip(axes.flat, ("gna", "psa", "vmoba")):
        for i, curve in enumerate(c for c in report["curves"] if c["family"] == family):
            pts = sorted((p[x], p["rel_l2"]) for p in curve["points"])
            ax.plot(*zip(*pts), styles[i % len(styles)], label=curve["name"], ms=4)
        if family == "psa" and report["psa_pairs"]:
            ax.plot([p["binary"][x] for p in report["psa_pairs"]],
                    [p["binary"]["rel_l2"] for p in report["psa_pairs"]], "k+", ms=9,
                    label="binary at each multi-level point's density")
        ax.set_title(NAMES[family])
    ax = axes.flat[3]
    for family, color in colors.items():
        best = report["summary"][PLOT_AXES[x][1]][family]
        pts = [(float(d), b["rel_l2"]) for d, b in best.items() if b is not None]
        if pts:
            ax.plot(*zip(*pts), "-o", color=color, label=f"{NAMES[family]} (best variant per density)")
    ax.set_title("best variant of each method at matched density")
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_xlabel(PLOT_AXES[x][0])
        ax.set_ylabel("relative L2 error vs dense")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    p = report["problem"]
    fig.suptitle(f"Sparse attention fidelity on synthetic video attention: grid {tuple(p['grid'])} = "
                 f"{p['tokens']} tokens, {p['heads']} heads ({', '.join(p['head_kinds'])}), D {p['head_dim']}")
    return save_figure(fig, path, dpi=110)


def plot_budget(report: dict, path: str | Path) -> Path | None:
    """Budget mode against binary block-sparse and the split, one point per matched case (error
    of each against the binary error of the case), one colour per scene; ``None`` without
    matplotlib or cases."""
    cases = report["psa_budget"]["cases"]
    plt = _pyplot() if cases else None
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharex=True, sharey=True)
    for ax, name in zip(axes, ("budget", "split")):
        for i, scene in enumerate(dict.fromkeys(c["scene"] for c in cases)):
            rows = [c for c in cases if c["scene"] == scene and c[f"{name}_matched"]]
            ax.scatter([c["binary"]["rel_l2"] for c in rows], [c[name]["rel_l2"] for c in rows], s=14,
                       color=f"C{i}", label=scene)
        lo = min(c["binary"]["rel_l2"] for c in cases) * 0.8
        hi = max(c["binary"]["rel_l2"] for c in cases) * 1.2
        for ratio, style in ((1.0, "k-"), (1.03, "k:"), (0.98, "k--")):
            ax.plot([lo, hi], [lo * ratio, hi * ratio], style, lw=0.8, label=f"{ratio} x binary")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("binary block-sparse: relative L2 error vs dense")
        ax.set_ylabel(f"{name}: relative L2 error vs dense")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("PSA budget mode vs binary at matched FLOP density (per scene, density, head)")
    axes[1].set_title(f"quantile split {SPLIT} x density vs binary")
    return save_figure(fig, path, dpi=110)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="vdiff-sparse bench fidelity", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, nargs=3, default=DEFAULT_GRID, metavar=("T", "H", "W"))
    parser.add_argument("--heads", type=int, default=len(BENCH_HEADS),
                        help=f"heads, of kinds {list(BENCH_HEADS)} in turn")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="data seed (the budget mode's estimate was chosen on seed 0)")
    parser.add_argument("--scenes", nargs="+", default=["smooth", "mixed", "cellular", "texture"],
                        choices=["smooth", "mixed", "cellular", "texture"], help="kinds of video, one batch element each")
    parser.add_argument("--vmoba-cube", type=int, nargs=3, default=(2, 8, 8), metavar=("CT", "CH", "CW"))
    parser.add_argument("--psa-block", type=int, default=DEFAULT_PSA_BLOCK, help="PSA query and key block size")
    parser.add_argument("--budget-densities", type=float, nargs="+", default=list(BUDGET_DENSITIES),
                        help="target densities of the budget-mode cases")
    parser.add_argument("--families", nargs="+", choices=["gna", "psa", "vmoba"], default=None,
                        help="only these methods (default all)")
    parser.add_argument("--curves", action=argparse.BooleanOptionalAction, default=True,
                        help="sweep every method's curves (--no-curves: the PSA budget-mode cases only)")
    parser.add_argument("--backend", default="auto", help="plan backend (errors do not depend on it)")
    parser.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True,
                        help="also compare budget mode and binary PSA end to end on the tiny model (PSNR vs dense)")
    parser.add_argument("--e2e-seeds", type=int, nargs="+", default=list(E2E_SEEDS))
    parser.add_argument("--replan", action=argparse.BooleanOptionalAction, default=True,
                        help="replan_every end to end on the tiny model (what plan reuse costs)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON path; the PNGs go next to it")
    parser.add_argument("--no-plot", action="store_true")
    return parser


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def run(args: argparse.Namespace) -> dict:
    body = run_sweep(args.grid, args.heads, args.head_dim, seed=args.seed, scenes=args.scenes, backend=args.backend,
                     vmoba_cube=args.vmoba_cube, psa_block=args.psa_block, only=args.families,
                     budget_densities=args.budget_densities, with_curves=args.curves)
    if args.e2e:
        rows = tiny_model_e2e(E2E_DENSITIES, args.e2e_seeds)
        body["psa_budget_e2e"] = {
            "what": "vdiff-sparse generate --compare-dense on the built-in tiny model (random weights, "
                    "configs/generate/tiny.yaml), PSA binary (quantile, level 1 only) vs budget mode at "
                    "the matched FLOP density of the sparse calls; PSNR / SSIM of each video vs dense",
            "runs": rows,
            "matched": sum(r["matched"] for r in rows),
            "budget_not_worse_of_matched": sum(r["matched"] and r["budget_not_worse"] for r in rows),
        }
    if args.replan:
        body["replan_e2e"] = replan_e2e(args.e2e_seeds)
    report = {"benchmark": "fidelity", **run_metadata(command_line()), **body}
    path = write_json(args.out, report)
    print("wrote", path)
    if not args.no_plot:
        out = Path(args.out)
        for x, png in (("density", out.with_suffix(".png")),
                       ("block_density", out.with_name(out.stem + "_block_density.png"))):
            if plot(report, png, x):
                print("wrote", png)
        png = plot_budget(report, out.with_name(out.stem + "_psa_budget.png"))
        if png:
            print("wrote", png)
    s = report["summary"]["psa_multi_vs_binary"]
    print(f"PSA multi-level vs binary, matched pairs: multi-level better in {s['multi_level_wins']} of "
          f"{s['pairs_matched']} ({s['pairs']} pairs)")
    if report["psa_budget"]["summary"]:
        b = report["psa_budget"]["summary"]["all"]

        print(f"PSA budget vs binary, {b['budget_vs_binary_counted']} of {b['cases']} cases matched: worse by > 3% "
              f"in {b['budget_worse_than_binary_by_over_3pct']}, better by >= 2% in "
              f"{b['budget_better_than_binary_by_2pct']}, worst ratio {_num(b['worst_budget_over_binary'])}; "
              f"mean ratio vs binary: budget {_num(b['mean_budget_over_binary_three_way'])}, split "
              f"{_num(b['mean_split_over_binary_three_way'])} ({b['three_way_counted']} cases)")
    if "psa_budget_e2e" in report:
        e = report["psa_budget_e2e"]
        print(f"tiny model end to end: budget PSNR >= binary in {e['budget_not_worse_of_matched']} of "
              f"{e['matched']} matched runs")
    if "replan_e2e" in report:
        for method, by_k in report["replan_e2e"]["summary"].items():
            drops = ", ".join(f"every {k}: {_num(v['median_psnr_drop_db'])} dB" for k, v in by_k.items() if k != 1)
            print(f"plan reuse, {method}: median PSNR drop vs selecting every step: {drops}")
    return report


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0
