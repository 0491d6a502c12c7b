"""Fidelity at matched compute: each method's output error against dense attention versus its
FLOP-equivalent density, on video-like attention (:mod:`vdiff_sparse.video_attention_data`).

Every curve sweeps one knob of one method variant (:func:`curves`):

* GNA: neighborhood attention (stride 1) with windows growing on every axis; sliding tile
  attention (window = m tiles, stride = tile, perfectly block-sparse).
* PSA: threshold mode with all four levels (the released bounds pattern, ``c1`` swept) and with
  level 1 only; quantile mode with the released multi-level split scaled, and with level 1
  only ("binary block-sparse"). Each multi-level point is also paired with binary block-sparse
  at the same density (as near as whole blocks allow), the comparison the PSA paper makes.
* VMoBA: top-k and threshold ``tau``, local and global selection, on the 3D partition; top-k
  local on the 1D and 2D partitions.

Errors: relative L2 ``||o - o_dense|| / ||o_dense||`` over the whole output and per head, and
the mean cosine similarity of output token vectors. Density: ``plan.density()`` (pooled keys
count ``1/p``), and ``block_density`` (what a block-sparse kernel with the plan's tiles computes,
masked entries included: higher than the density for per-token windows and per-token routing).
Matched-compute summaries interpolate each curve's error (linear in ``log(density)``) at fixed
densities. Plots: ``<out>.png`` against density, ``<out>_block_density.png`` against block
density.

    vdiff-sparse bench fidelity                    # grid (8, 24, 32), 4 heads, D 64
    python bench/fidelity.py --grid 4 12 16 --out /tmp/f.json   # quick
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .meta import command_line, run_metadata, write_json

DEFAULT_GRID = (8, 24, 32)
DEFAULT_OUT = Path("bench") / "results" / "fidelity_cpu.json"
MATCHED_DENSITIES = (0.05, 0.1, 0.15, 0.2, 0.3)
PER_HEAD_DENSITIES = (0.1, 0.2)
# PSA's released quantile split (10% full, 5% at 2x, 20% at 8x), scaled by the knob.
PSA_QUANTILE_SPLIT = {1: 0.1, 2: 0.05, 8: 0.2}

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


def curves(grid: Sequence[int], *, vmoba_cube: Sequence[int] = (2, 8, 8), psa_block: int = 128,
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
    """``rel_l2`` (whole output), ``rel_l2_per_head`` and ``cosine`` (mean over token vectors)
    of ``out`` against ``ref``, both ``[B, N, heads, D]``."""
    out, ref = out.double(), ref.double()
    diff = out - ref
    per_head = diff.square().sum((0, 1, 3)).sqrt() / ref.square().sum((0, 1, 3)).sqrt()
    return {
        "rel_l2": float(diff.norm() / ref.norm()),
        "rel_l2_per_head": [float(x) for x in per_head],
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


def psa_pairs(curve_results: list[dict], q, k, v, dense, grid, backend: str, psa_block: int = 128) -> list[dict]:
    """Every multi-level PSA point next to binary block-sparse (level 1 only, quantile) at the
    nearest density whole blocks allow (:func:`binary_fraction_at`), and the binary curve's error
    interpolated at exactly the multi-level density."""
    from .. import psa_attention

    binary_curve = next((c for c in curve_results if c["name"].startswith("quantile, level 1 only")), None)
    pairs = []
    for curve in curve_results:
        if curve["family"] != "psa" or "multi-level" not in curve["name"]:
            continue
        for point in curve["points"]:
            if point["density"] >= 1:
                continue
            fraction = binary_fraction_at(q, k, grid, point["density"], psa_block)
            binary = measure(lambda q, k, v: psa_attention(
                q, k, v, grid, mode="quantile", fractions={1: fraction}, block_q=psa_block,
                block_k=psa_block, backend=backend, return_plan=True), q, k, v, dense)
            pairs.append({
                "variant": curve["name"], "value": point["value"],
                "multi_level": {key: point[key] for key in ("density", "rel_l2", "cosine", "level_fractions")},
                "binary": {key: binary[key] for key in ("density", "block_density", "rel_l2", "cosine")},
                "binary_curve_at_multi_density": None if binary_curve is None
                else interpolate(binary_curve["points"], point["density"]),
                "multi_level_better": point["rel_l2"] < binary["rel_l2"],
            })
    return pairs


def summarize(curve_results: list[dict], pairs: list[dict]) -> dict:
    """Matched-density errors per curve (and per head), the best variant per family at each
    matched density, and the PSA multi-level vs binary tally."""
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
    wins = sum(p["multi_level_better"] for p in pairs)
    ratios = [p["multi_level"]["rel_l2"] / p["binary"]["rel_l2"] for p in pairs if p["binary"]["rel_l2"] > 0]
    return {
        "matched_density_rel_l2": matched,
        "matched_density_rel_l2_per_head": per_head,
        "best_per_family": best("density"),
        "best_per_family_by_block_density": best("block_density"),
        "psa_multi_vs_binary": {
            "pairs": len(pairs), "multi_level_wins": wins,
            "median_error_ratio_multi_over_binary": None if not ratios else sorted(ratios)[len(ratios) // 2],
        },
    }


def run_sweep(grid: Sequence[int], heads: int, head_dim: int, *, seed: int = 0, backend: str = "auto",
              vmoba_cube: Sequence[int] = (2, 8, 8), psa_block: int = 128, only: Sequence[str] | None = None,
              verbose: bool = True) -> dict:
    """Every curve of :func:`curves` plus the PSA pairs on one synthetic problem; returns the
    report body (``problem``, ``curves``, ``psa_pairs``, ``summary``)."""
    from ..attention import dense_attention
    from ..video_attention_data import default_head_profile, video_attention_qkv

    grid = tuple(grid)
    q, k, v = video_attention_qkv(grid, heads, head_dim, seed=seed)
    with torch.no_grad():
        dense = dense_attention(q, k, v)
    results = []
    for curve in curves(grid, vmoba_cube=vmoba_cube, psa_block=psa_block, backend=backend):
        if only and curve.family not in only:
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
    _, _, kinds = default_head_profile(heads)
    return {
        "problem": {"grid": list(grid), "tokens": q.shape[1], "heads": heads, "head_dim": head_dim,
                    "head_kinds": kinds, "seed": seed, "dtype": "float32", "backend": backend,
                    "vmoba_cube": [min(c, n) for c, n in zip(vmoba_cube, grid)], "psa_block": psa_block,
                    "data": "vdiff_sparse.video_attention_data.video_attention_qkv"},
        "metrics": "rel_l2 = ||out - dense|| / ||dense|| (float64); cosine = mean over token "
                   "vectors; density = plan.density() (FLOP-equivalent, pooled keys count 1/p); "
                   "time_s = plan + attention wall time on a shared machine (not a speed benchmark)",
        "curves": results,
        "psa_pairs": pairs,
        "summary": summarize(results, pairs),
    }


PLOT_AXES = {
    "density": ("FLOP-equivalent density (plan.density())", "best_per_family"),
    "block_density": ("block density: work of a block-sparse kernel, masked entries included",
                      "best_per_family_by_block_density"),
}


def plot(report: dict, path: str | Path, x: str = "density") -> Path | None:
    """Error vs ``x`` (``"density"`` or ``"block_density"``), one panel per family and one with
    every family's best variant at each matched density; ``None`` (and a message) if matplotlib
    is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="vdiff-sparse bench fidelity", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, nargs=3, default=DEFAULT_GRID, metavar=("T", "H", "W"))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vmoba-cube", type=int, nargs=3, default=(2, 8, 8), metavar=("CT", "CH", "CW"))
    parser.add_argument("--psa-block", type=int, default=128, help="PSA query and key block size")
    parser.add_argument("--families", nargs="+", choices=["gna", "psa", "vmoba"], default=None,
                        help="only these methods (default all)")
    parser.add_argument("--backend", default="auto", help="plan backend (errors do not depend on it)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON path; the PNG goes next to it")
    parser.add_argument("--no-plot", action="store_true")
    return parser


def run(args: argparse.Namespace) -> dict:
    body = run_sweep(args.grid, args.heads, args.head_dim, seed=args.seed, backend=args.backend,
                     vmoba_cube=args.vmoba_cube, psa_block=args.psa_block, only=args.families)
    report = {"benchmark": "fidelity", **run_metadata(command_line()), **body}
    path = write_json(args.out, report)
    print("wrote", path)
    if not args.no_plot:
        out = Path(args.out)
        for x, png in (("density", out.with_suffix(".png")),
                       ("block_density", out.with_name(out.stem + "_block_density.png"))):
            if plot(report, png, x):
                print("wrote", png)
    s = report["summary"]["psa_multi_vs_binary"]
    print(f"PSA multi-level vs binary at equal density: multi-level better in {s['multi_level_wins']} "
          f"of {s['pairs']} pairs, median error ratio {s['median_error_ratio_multi_over_binary']}")
    return report


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0
