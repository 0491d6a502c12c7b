"""Sparse against dense: speed, attention density and fidelity of two generations of one seed.

:func:`compare` turns two :class:`~vdiff_sparse.pipelines.GenerationResult` into the report
(a JSON-ready dict); :func:`report_markdown` renders it, :func:`plot_report` draws per-layer
density and the time breakdown. :func:`psnr` and :func:`ssim` compare uint8 videos.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..figures import save_figure


# --- fidelity ----------------------------------------------------------------------------------
def _as_video(x: np.ndarray, name: str) -> torch.Tensor:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{name} must be [F, H, W, C] (or [H, W, C]) frames with C in (1, 3), got shape {x.shape}")
    return torch.from_numpy(x.astype(np.float64))


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_video(a, "a"), _as_video(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two videos ``[F, H, W, C]`` (mean squared error over
    every pixel of every frame). ``inf`` for identical videos."""
    x, y = _check_pair(a, b)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004) of two videos ``[F, H, W, C]``: the mean SSIM
    map over valid positions of a ``window`` x ``window`` Gaussian window (``sigma``), per
    channel and frame, then averaged. Constants ``K1 = 0.01``, ``K2 = 0.03``. Frames smaller
    than the window use a window of their size (odd). 1 for identical videos, symmetric,
    at most 1."""
    x, y = _check_pair(a, b)
    f, h, w, c = x.shape
    size = min(window, h, w)
    size -= 1 - size % 2  # odd
    g = _gaussian_window(size, sigma * size / window)
    x = x.permute(0, 3, 1, 2).reshape(f * c, 1, h, w)
    y = y.permute(0, 3, 1, 2).reshape(f * c, 1, h, w)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid positions only
        t = F.conv2d(t, g.view(1, 1, -1, 1))
        return F.conv2d(t, g.view(1, 1, 1, -1))

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(m.mean())


# --- the report --------------------------------------------------------------------------------
def _calls(result) -> list[dict]:
    calls = result.stats.get("calls")
    if calls is None:
        raise ValueError(
            f"the {result.stats.get('method', '?')} result has no attention stats: generate with a "
            f"processor made with stats=True (SparseVideoPipeline.make_processor does so)"
        )
    return calls


def _mean_by(calls: list[dict], key: str, value: str) -> dict[int, float]:
    groups: dict[int, list[float]] = {}
    for c in calls:
        groups.setdefault(c[key], []).append(c[value])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def _attention_tflops(calls: list[dict], inner_dim: int, weight: str | None) -> float:
    # Q K^T and P V: 2 matmuls x 2 FLOPs per multiply-add, for every sample of every call, so
    # that guidance run as two calls (Wan) and as one call of two samples (CogVideoX) count alike.
    return sum(4 * c["num_tokens"] ** 2 * inner_dim * c["batch"] * (c[weight] if weight else 1.0)
               for c in calls) / 1e12


def summarize(result) -> dict:
    """The one-run part of a report: latency, attention time and densities of ``result``
    (generated with a stats-collecting processor). Keys as in :func:`compare` without the
    dense side (``latency_s``, ``attention_s``, ``attention_share`` for this run)."""
    calls = _calls(result)
    inner = result.stats["inner_dim"]
    n = max(len(calls), 1)
    tf_dense = _attention_tflops(calls, inner, None)
    tf_sparse = _attention_tflops(calls, inner, "density")
    return {
        "method": result.stats["method"],
        "settings": result.stats["settings"],
        "grid": result.stats["grid"],
        "num_tokens": result.stats["num_tokens"],
        "latency_s": result.latency_s,
        "attention_s": result.stats["attention_s"],
        "attention_share": result.stats["attention_s"] / result.latency_s,
        "coverage": sum(c["coverage"] for c in calls) / n,
        "density": sum(c["density"] for c in calls) / n,
        "attention_tflops_dense": tf_dense,
        "attention_tflops_sparse": tf_sparse,
        "attention_flops_saved": 1.0 - tf_sparse / tf_dense if tf_dense else 0.0,
        "per_layer_coverage": _mean_by(calls, "layer", "coverage"),
        "per_layer_density": _mean_by(calls, "layer", "density"),
        "per_step_density": _mean_by(calls, "step", "density"),
        "attention_calls": len(calls),
        "dense_calls": sum(1 for c in calls if c["dense_reason"]),
        "processor": result.stats.get("processor", ""),
        "compiled": result.stats.get("compiled"),
    }


def compare(sparse, dense=None) -> dict:
    """The report of a sparse generation against a dense one of the same seed and settings.

    Keys (times in seconds, densities as shares of the dense (query, key) pairs of video
    self-attention, averaged over every call; calls the schedule runs dense count as 1):

    * ``latency_dense_s``, ``latency_sparse_s``, ``speedup`` (= dense / sparse latency);
    * ``attention_dense_s``, ``attention_sparse_s``, ``attention_share_dense``,
      ``attention_share_sparse`` (share of the latency), ``attention_speedup``;
    * ``coverage`` (pairs attended, a pooled key counted as every key it averages), ``density``
      (FLOP-equivalent: a key pooled ``p`` times counts ``1/p``), ``attention_tflops_dense``,
      ``attention_tflops_sparse``,
      ``attention_flops_saved`` (share), for the whole generation of the one video (every call,
      both classifier-free guidance branches);
    * ``per_layer_coverage``, ``per_layer_density``, ``per_step_density``
      (``{index: value}``), ``attention_calls``, ``dense_calls`` (calls the schedule sent
      to dense);
    * ``psnr_db`` (``None`` when the videos are identical), ``ssim``, ``identical``;
    * ``method``, ``settings``, ``grid``, ``num_tokens``, ``processor``, ``compiled`` (how
      ``torch.compile`` ran the transformer, or ``None``).

    With ``dense=None`` the dense-side keys, ``speedup``, ``psnr_db`` and ``ssim`` are ``None``.

    Raises:
        ValueError: the two generations differ in settings or lack attention stats.
    """
    one = summarize(sparse)
    report = {k: v for k, v in one.items() if k not in ("latency_s", "attention_s", "attention_share")}
    report.update(latency_sparse_s=one["latency_s"], attention_sparse_s=one["attention_s"],
                  attention_share_sparse=one["attention_share"], latency_dense_s=None, attention_dense_s=None,
                  attention_share_dense=None, speedup=None, attention_speedup=None, psnr_db=None, ssim=None,
                  identical=None)
    if dense is None:
        return report
    s_set, d_set = sparse.stats["settings"], dense.stats["settings"]
    differ = sorted(k for k in s_set if s_set.get(k) != d_set.get(k))
    if differ or sparse.frames.shape != dense.frames.shape:
        raise ValueError(f"sparse and dense generations differ in {differ or 'frame shape'}; compare runs of "
                         f"the same prompt, sizes, steps and seed")
    _calls(dense)  # its attention time is part of the report
    att_s, att_d = one["attention_s"], dense.stats["attention_s"]
    p = psnr(sparse.frames, dense.frames)
    report.update(
        latency_dense_s=dense.latency_s,
        speedup=dense.latency_s / sparse.latency_s,
        attention_dense_s=att_d,
        attention_share_dense=att_d / dense.latency_s,
        attention_speedup=att_d / att_s if att_s > 0 else None,
        psnr_db=None if math.isinf(p) else p,
        ssim=ssim(sparse.frames, dense.frames),
        identical=math.isinf(p),
    )
    return report


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _flops(tflops: float) -> str:
    """``0.161`` (TFLOPs) -> ``"161 GFLOP"``: three significant digits in the unit that fits."""
    value = tflops * 1e12
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} FLOP"


def report_table(report: dict) -> str:
    """The headline table (markdown) of a :func:`compare` report."""
    r = report
    if r["identical"] is None:
        fidelity = "-"
    else:
        fidelity = f"{'identical' if r['identical'] else _fmt(r['psnr_db'], '.2f') + ' dB'} / {r['ssim']:.4f}"
    speedup = _fmt(r["speedup"], ".2f")
    rows = [
        ("end-to-end latency", _fmt(r["latency_dense_s"], ".2f") + " s", f"{r['latency_sparse_s']:.2f} s",
         f"**{speedup}x**" if r["speedup"] is not None else ""),
        ("attention time", _fmt(r["attention_dense_s"], ".2f") + " s", f"{r['attention_sparse_s']:.2f} s",
         _fmt(r["attention_speedup"], ".2f") + "x" if r["attention_speedup"] is not None else ""),
        ("attention share of latency", _fmt(r["attention_share_dense"], ".0%"),
         f"{r['attention_share_sparse']:.0%}", ""),
        ("coverage (pairs attended, pooled keys in full)", "1.000", f"{r['coverage']:.3f}", ""),
        ("density (FLOP-equivalent)", "1.000", f"{r['density']:.3f}",
         f"{r['attention_flops_saved']:.0%} attention FLOPs saved"),
        ("attention FLOPs (whole generation)", _flops(r["attention_tflops_dense"]), _flops(r["attention_tflops_sparse"]),
         ""),
        ("PSNR / SSIM vs dense", "", fidelity, ""),
    ]
    lines = [f"| | dense | {r['method']} | speedup |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def _compiled(how: str | None) -> str:
    return f"; torch.compile ({how}, fullgraph)" if how else ""


def _layout(parallel: dict | None) -> str:
    if not parallel or parallel.get("context_parallel", 1) == 1:
        return ""
    return (f"; context parallel ({parallel['mode']}) over {parallel['context_parallel']} processes, "
            f"times and calls of the first")


def report_markdown(report: dict, *, video: str | None = None, plot: str | None = None) -> str:
    """``report.md``: settings, the headline table, per-layer and per-step density, links to
    the video and the plot (paths relative to the report). An optional ``warmup`` key (bool)
    says whether the timed runs followed a warm-up generation, an optional ``parallel`` key
    (``{"context_parallel": N, "mode": ...}``) the parallel layout."""
    r, s = report, report["settings"]
    grid = " x ".join(str(g) for g in r["grid"])
    warmup = {True: " after an untimed warm-up generation", False: " without warm-up (first-call costs included)",
              None: ""}[r.get("warmup")]
    out = [
        f"# {r['method']}{'' if r['speedup'] is None else ' vs dense'}: {s['model']}",
        "",
        f"Prompt \"{s['prompt']}\", {s['num_frames']} frames x {s['height']} x {s['width']}, "
        f"{s['num_inference_steps']} steps, seed {s['seed']}, {s['device']} {s['dtype']}; "
        f"video token grid {grid} = {r['num_tokens']:,} tokens; "
        f"{r['attention_calls']} video self-attention calls ({r['dense_calls']} dense by the schedule)"
        + _layout(r.get("parallel")) + _compiled(r.get("compiled")) + ".",
        "",
        report_table(r),
        "",
        f"Latency is one pipeline call (text encoder, denoising, VAE decode){warmup}; attention time "
        "is the video self-attention calls, selection included. Densities are averages over all "
        "calls, the calls the schedule runs dense (warm-up steps, dense layers) counting 1.",
        "",
        "## Density per layer and per step",
        "",
        "| layer | coverage | density |",
        "|---|---|---|",
    ]
    out += [f"| {i} | {c:.3f} | {r['per_layer_density'][i]:.3f} |" for i, c in r["per_layer_coverage"].items()]
    out += ["", "| step | density |", "|---|---|"]
    out += [f"| {i} | {d:.3f} |" for i, d in r["per_step_density"].items()]
    if plot:
        out += ["", f"![per-layer density and time breakdown]({plot})"]
    if video:
        out += ["", f"Video: [{video}]({video})"]
    out += ["", "Processor: `" + r["processor"] + "`", ""]
    return "\n".join(out)


def plot_report(report: dict, path: str | Path) -> Path | None:
    """Per-layer density (bars) and the time breakdown (attention vs the rest, dense and
    sparse) as a PNG. Returns ``None`` (and draws nothing) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    r = report
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    layers = list(r["per_layer_density"])
    ax1.bar([str(i) for i in layers], [r["per_layer_coverage"][i] for i in layers], label="coverage", color="tab:blue")
    ax1.bar([str(i) for i in layers], [r["per_layer_density"][i] for i in layers], width=0.4,
            label="density (FLOP-equivalent)", color="tab:orange")
    ax1.set(xlabel="layer", ylabel="share of dense", ylim=(0, 1.05), title=f"{r['method']}: density per layer")
    ax1.legend(fontsize=8)
    names = ["dense", r["method"]]
    pairs = [(r["attention_dense_s"], r["latency_dense_s"]), (r["attention_sparse_s"], r["latency_sparse_s"])]
    if r["latency_dense_s"] is None:
        names, pairs = names[1:], pairs[1:]
    attention = [a for a, _ in pairs]
    rest = [t - a for a, t in pairs]
    ax2.barh(names, attention, label="video self-attention", color="tab:red")
    ax2.barh(names, rest, left=attention, label="everything else", color="tab:gray")
    title = "time" if r["speedup"] is None else f"time: {r['speedup']:.2f}x end to end"
    ax2.set(xlabel="seconds", title=title)
    ax2.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


__all__ = ["compare", "plot_report", "psnr", "report_markdown", "report_table", "ssim", "summarize"]
