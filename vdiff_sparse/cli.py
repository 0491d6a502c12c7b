"""The ``vdiff-sparse`` command line (also ``python -m vdiff_sparse``).

Subcommands:
    generate  generate a video with sparse attention (the built-in tiny model by default, or
              --model ID_OR_PATH); with --compare-dense also dense with the same seed, and a
              report of speedup, attention density and PSNR/SSIM against dense.
    viz       draw a method's plan (key blocks and pool levels per query block) for one layer
              and head, on the tiny model or on synthetic video attention.
    demo      the three methods on a synthetic video-attention problem: density, error and
              speed against dense SDPA.
    finetune  sparse fine-tuning (vdiff_sparse.pipelines.finetune; `finetune --help`).
    bench     benchmarks (vdiff_sparse.benchmarks; `bench --help`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from .pipelines.generate import METHODS, ModelNotAvailableError


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: plan caches, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def demo_methods(grid):
    """The demo's method settings, each at roughly 5-20% density on the default grid."""
    from . import gna_attention, psa_attention, vmoba_attention

    # Sliding tile attention (GNA with stride = tile, window = 3 tiles in h and w): perfectly
    # block-sparse, so no per-token mask work.
    tile = tuple(min(4, n) for n in grid)
    window = (tile[0], min(3 * tile[1], grid[1]), min(3 * tile[2], grid[2]))
    cube = tuple(min(c, n) for c, n in zip((2, 8, 8), grid))
    return {
        f"gna window={window} stride={tile}": lambda q, k, v: gna_attention(
            q, k, v, grid, window=window, stride=tile, tile=tile, return_plan=True
        ),
        "psa threshold (default)": lambda q, k, v: psa_attention(q, k, v, grid, return_plan=True),
        f"vmoba top-6 local, cubes {cube}": lambda q, k, v: vmoba_attention(
            q, k, v, grid, layer_index=2, block_3d=cube, topk=6, return_plan=True
        ),
    }


def run_demo(args) -> int:
    from .attention import dense_attention
    from .synthetic import video_qkv

    torch.manual_seed(0)
    grid = tuple(args.grid)
    q, k, v = video_qkv(grid, args.heads, args.head_dim, seed=args.seed)
    n = q.shape[1]
    print(f"synthetic video attention: grid {grid} = {n} tokens, {args.heads} heads x "
          f"{args.head_dim}, float32, {torch.get_num_threads()} CPU threads")
    with torch.no_grad():
        dense = dense_attention(q, k, v)
        t_dense = _median_time(lambda: dense_attention(q, k, v), args.repeats)
        rows = [("dense SDPA", 1.0, 0.0, 1.0, t_dense)]
        for name, fn in demo_methods(grid).items():
            out, plan = fn(q, k, v)
            err = ((out - dense).norm() / dense.norm()).item()
            cos = torch.nn.functional.cosine_similarity(out.flatten(), dense.flatten(), dim=0).item()
            t = _median_time(lambda: fn(q, k, v), args.repeats)
            rows.append((name, plan.density(), err, cos, t))
    print(f"\n| {'method':<36} | density | rel L2 err | cosine | time (ms) | speedup |")
    print(f"|{'-' * 38}|---------|------------|--------|-----------|---------|")
    for name, density, err, cos, t in rows:
        print(f"| {name:<36} | {density:7.3f} | {err:10.4f} | {cos:6.4f} | {t * 1e3:9.1f} | "
              f"{t_dense / t:6.2f}x |")
    print("\nTimes are medians of", args.repeats, "runs, selection (planning) included.")
    return 0


# --- generate / viz ----------------------------------------------------------------------------
DEFAULT_PROMPT = "a red cat runs on the beach in the snow"


class CLIError(Exception):
    """A bad option found after parsing: printed as ``vdiff-sparse <cmd>: error: ...``, exit 2."""


def parse_overrides(items: list[str]) -> dict:
    """``["topk=4", "window=[3,8,8]"]`` -> ``{"topk": 4, "window": [3, 8, 8]}`` (YAML values)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"overrides are key=value (e.g. topk=4, window=[3,8,8]), got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise CLIError(f"override {item!r}: value is not valid YAML ({err.problem})") from None
    return out


def _dtype(name: str):
    return None if name == "auto" else getattr(torch, name)


def _load_pipeline(args):
    from .pipelines import SparseVideoPipeline

    if args.model is None:
        size = {k: v for k, v in (("num_layers", args.tiny_layers), ("num_attention_heads", args.tiny_heads),
                                  ("attention_head_dim", args.tiny_head_dim)) if v is not None}
        pipe = SparseVideoPipeline.tiny(seed=args.model_seed, **size)
        device = args.device if args.device != "auto" else None
        if device is not None or _dtype(args.dtype) is not None:
            pipe.pipe.to(device or "cpu", _dtype(args.dtype) or torch.float32)
        return pipe
    return SparseVideoPipeline.from_pretrained(args.model, torch_dtype=_dtype(args.dtype),
                                               device=None if args.device == "auto" else args.device)


def _sizes(args) -> dict:
    given = {"num_frames": args.frames, "height": args.height, "width": args.width,
             "num_inference_steps": args.steps}
    return {k: v for k, v in given.items() if v is not None}


def _processor(pipe, method: str, args):
    return pipe.make_processor(method, preset=args.preset, config_file=args.config,
                               overrides=parse_overrides(args.overrides), backend=args.backend)


def _check_method_options(args) -> None:
    # Catch bad presets / config / override keys before loading a model (minutes for a real one).
    from .pipelines.generate import make_processor

    make_processor(args.attn, preset=args.preset, config_file=args.config,
                   overrides=parse_overrides(args.overrides), backend=args.backend)


def run_generate(args) -> int:
    import json
    import warnings

    from .pipelines.generate import save_video
    from .pipelines.report import compare, plot_report, report_markdown, report_table

    warnings.simplefilter("always", UserWarning)  # size rounding must show every time
    if args.preset is not None or args.config is not None or args.overrides:
        _check_method_options(args)
    pipe = _load_pipeline(args)
    sparse_proc = _processor(pipe, args.attn, args)
    dense_proc = pipe.make_processor("dense", backend="auto") if args.compare_dense else None
    call = dict(_sizes(args), seed=args.seed, negative_prompt=args.negative_prompt)
    if args.guidance_scale is not None:
        call["guidance_scale"] = args.guidance_scale
    # Round the sizes once (one warning), so every run below uses the same valid sizes.
    d = pipe.default_size
    call["num_frames"], call["height"], call["width"] = pipe.fit_size(
        call.get("num_frames", d["num_frames"]), call.get("height", d["height"]), call.get("width", d["width"]))
    steps = call.get("num_inference_steps", d["num_inference_steps"])
    grid = pipe.latent_grid(call["num_frames"], call["height"], call["width"])
    print(f"{pipe.model}: {call['num_frames']} frames x {call['height']} x {call['width']}, {steps} steps, "
          f"token grid {grid} = {grid[0] * grid[1] * grid[2]:,} video tokens, {pipe.device}", flush=True)
    runs = [(dense_proc, "dense")] if dense_proc is not None else []
    runs.append((sparse_proc, args.attn))
    if args.warmup:
        # First calls pay for allocator growth, oneDNN / Triton kernel builds and plan caches;
        # two steps so that a fractional dense warm-up still reaches the sparse path.
        for proc, name in runs:
            pipe.set_attn_processor(proc)
            pipe.pipe.set_progress_bar_config(desc=f"warm-up {name}", leave=False)
            pipe(args.prompt, **{**call, "num_inference_steps": min(steps, 2)})
    results = {}
    for proc, name in runs:
        pipe.set_attn_processor(proc)
        pipe.pipe.set_progress_bar_config(desc=name, leave=False)
        results[name if proc is sparse_proc else "dense_baseline"] = pipe(args.prompt, **call)
    sparse = results[args.attn]
    dense = results.get("dense_baseline")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    video = save_video(sparse.frames, out / f"{args.attn}.mp4", fps=args.fps)
    if dense is not None:
        save_video(dense.frames, out / "dense.mp4", fps=args.fps)
    report = compare(sparse, dense)
    report["video"] = video.name
    plot = plot_report(report, out / "report.png")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report, video=video.name, plot=plot and plot.name))
    print()
    print(report_table(report))
    print(f"\nwrote {out / 'report.md'}, {out / 'report.json'}, {video}"
          + (f", {plot}" if plot else "; no plot (pip install matplotlib)"))
    return 0


def run_viz(args) -> int:
    from .pipelines.generate import make_processor, tiny_defaults
    from .pipelines.viz import capture_plan, plot_plan

    method_defaults = tiny_defaults()["methods"].get(args.attn)
    proc = make_processor(args.attn, preset=args.preset, config_file=args.config,
                          overrides=parse_overrides(args.overrides), defaults=method_defaults, stats=False,
                          backend=args.backend)
    plan, grid = capture_plan(proc, source=args.source, layer=args.layer, step=args.step, size=_sizes(args),
                              grid=tuple(args.grid), heads=args.heads, head_dim=args.head_dim, seed=args.seed)
    heads = plan.kv_index.shape[1]  # 1 when all heads share the plan (GNA)
    if args.head < 0 or (heads > 1 and args.head >= heads):
        raise CLIError(f"--head must be in [0, {heads - 1}], got {args.head}")
    title = f"{args.attn} ({args.source}), layer {args.layer}, grid {tuple(grid)}"
    path = plot_plan(plan, args.out, head=args.head, title=title)
    print(f"{title}: density {plan.density():.3f}, {plan.num_q_blocks} query x {plan.num_k_blocks} key "
          f"blocks; wrote {path}")
    return 0


def _passthrough(module: str, function: str, what: str):
    def run(argv: list[str]) -> int:
        import importlib

        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if not (err.name and module.startswith(err.name)):
                raise
            raise CLIError(f"{what} is not available in this installation ({module} is missing)") from None
        return getattr(mod, function)(argv) or 0

    return run


PASSTHROUGH = {
    "finetune": _passthrough("vdiff_sparse.pipelines.finetune", "main", "sparse fine-tuning"),
    "bench": _passthrough("vdiff_sparse.benchmarks", "main", "the benchmarks"),
}


def _add_method_options(p: argparse.ArgumentParser, methods, default: str) -> None:
    p.add_argument("--attn", choices=methods, default=default,
                   help="attention method for video self-attention")
    p.add_argument("--preset", default=None,
                   help="method or model preset (configs/methods, configs/models, e.g. wan2.1-1.3b); "
                        "default: the built-in model's settings (configs/generate/tiny.yaml), "
                        "the method's defaults (configs/methods) with --model")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="method settings: config:/schedule: sections or their fields at top level; "
                        "they override the preset")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="method or schedule fields, YAML values (topk=4 window=[3,8,8] dense_steps=0.3); "
                        "they override --preset and --config")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "reference"),
                   help="plan backend of the sparse methods")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the noise (dense runs use the same) and of viz's random q/k/v")


def _add_size_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=None,
                   help="frames; default: the model's (tiny: 9, --model: 81); invalid counts are "
                        "rounded to the nearest valid one with a warning")
    p.add_argument("--height", type=int, default=None, help="frame height in pixels; default: tiny 128, --model 480")
    p.add_argument("--width", type=int, default=None, help="frame width in pixels; default: tiny 128, --model 832")
    p.add_argument("--steps", type=int, default=None, help="denoising steps; default: tiny 4, --model 50")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none to show (the text says what happens)."""

    def _get_help_string(self, action):
        # store_false flags: their default (True) describes the opposite of the flag.
        if action.default is None or action.default == [] or isinstance(action, argparse._StoreFalseAction):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdiff-sparse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = _HelpFormatter

    gen = sub.add_parser(
        "generate", formatter_class=fmt, help="generate a video with sparse attention (and compare with dense)",
        description="Generate a video with sparse video self-attention. Without --model the built-in "
                    "tiny random Wan model is used (no download; noise-like videos, meant for speed "
                    "and density numbers). Writes <attn>.mp4, report.json, report.md and report.png "
                    "(with matplotlib) to --out.")
    _add_method_options(gen, METHODS, "gna")
    gen.add_argument("--prompt", default=DEFAULT_PROMPT, help="text prompt")
    gen.add_argument("--negative-prompt", default=None, help="negative prompt (the pipeline's default if unset)")
    _add_size_options(gen)
    gen.add_argument("--guidance-scale", type=float, default=None,
                     help="classifier-free guidance; default: the pipeline's")
    gen.add_argument("--out", default="vdiff_sparse_output", help="output directory")
    gen.add_argument("--model", default=None, metavar="ID_OR_PATH",
                     help="diffusers checkpoint: Hugging Face id or local directory; default: the built-in tiny "
                          "model. Offline (HF_HUB_OFFLINE=1) only the local cache is used")
    gen.add_argument("--compare-dense", action="store_true",
                     help="also generate with dense attention (same seed) and report speedup and PSNR/SSIM")
    gen.add_argument("--device", default="auto",
                     help="cuda, cuda:1, cpu; auto: the GPU if there is one (the tiny model: cpu)")
    gen.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                     help="model dtype; auto: bfloat16 on GPU, float32 on CPU (tiny model: float32)")
    gen.add_argument("--fps", type=int, default=16, help="frame rate of the mp4")
    gen.add_argument("--no-warmup", dest="warmup", action="store_false",
                     help="skip the short untimed warm-up generation of each method")
    gen.add_argument("--tiny-layers", type=int, default=None, help="tiny model: transformer blocks (default 3)")
    gen.add_argument("--tiny-heads", type=int, default=None, help="tiny model: attention heads (default 2)")
    gen.add_argument("--tiny-head-dim", type=int, default=None, help="tiny model: head dimension (default 32)")
    gen.add_argument("--model-seed", type=int, default=0, help="tiny model: seed of its random weights")
    gen.set_defaults(func=run_generate)

    viz = sub.add_parser(
        "viz", formatter_class=fmt, help="draw a method's plan for one layer and head as a PNG",
        description="Draw which key blocks each query block attends (and at which pool level) for one "
                    "layer and head, from a tiny-model generation or synthetic video attention.")
    _add_method_options(viz, [m for m in METHODS if m != "dense"], "psa")
    viz.add_argument("--source", choices=("tiny", "random"), default="tiny",
                     help="q/k from the tiny model's generation or synthetic moving-video q/k/v")
    viz.add_argument("--layer", type=int, default=0, help="video self-attention layer")
    viz.add_argument("--head", type=int, default=0, help="attention head")
    viz.add_argument("--step", type=int, default=None, help="tiny: denoising step (default: the last)")
    _add_size_options(viz)
    viz.add_argument("--grid", type=int, nargs=3, default=(5, 32, 32), metavar=("T", "H", "W"),
                     help="random: token grid")
    viz.add_argument("--heads", type=int, default=2, help="random: attention heads")
    viz.add_argument("--head-dim", type=int, default=32, help="random: head dimension")
    viz.add_argument("--out", default="plan.png", help="PNG path")
    viz.set_defaults(func=run_viz)

    demo = sub.add_parser("demo", help="the three methods vs dense SDPA on synthetic video attention",
                          formatter_class=fmt)
    demo.add_argument("--grid", type=int, nargs=3, default=(8, 32, 32), metavar=("T", "H", "W"),
                      help="latent token grid")
    demo.add_argument("--heads", type=int, default=4, help="attention heads")
    demo.add_argument("--head-dim", type=int, default=64, help="head dimension")
    demo.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic video")
    demo.set_defaults(func=run_demo)

    for name, what in (("finetune", "sparse fine-tuning; arguments go to vdiff_sparse.pipelines.finetune"),
                       ("bench", "benchmarks; arguments go to vdiff_sparse.benchmarks")):
        p = sub.add_parser(name, help=what, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    try:
        if command in PASSTHROUGH:
            return PASSTHROUGH[command](argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except CLIError as err:
        print(f"vdiff-sparse {command}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, NotImplementedError, ModelNotAvailableError) as err:
        # Bad settings (unknown preset or option, bad value, bad size) and missing models are
        # user errors: one line, no traceback.
        print(f"vdiff-sparse {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
