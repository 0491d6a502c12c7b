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
import importlib.util
import linecache
import math
import sys
from pathlib import Path

import torch

from .benchmarks.meta import median_time
from .methods.registry import method_names
from .pipelines.generate import ModelNotAvailableError


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
        t_dense = median_time(lambda: dense_attention(q, k, v), args.repeats)
        rows = [("dense SDPA", 1.0, 0.0, 1.0, t_dense)]
        for name, fn in demo_methods(grid).items():
            out, plan = fn(q, k, v)
            err = ((out - dense).norm() / dense.norm()).item()
            cos = torch.nn.functional.cosine_similarity(out.flatten(), dense.flatten(), dim=0).item()
            t = median_time(lambda: fn(q, k, v), args.repeats)
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


def _positive_int(text: str) -> int:
    """argparse type of counts (heads, fps, layers): an int >= 1, else a usage error naming it."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _finite_float(text: str) -> float:
    """argparse type of real-valued settings: a finite number (``nan``/``inf`` refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _tiny_head_dim(text: str) -> int:
    """``--tiny-head-dim``: Wan's rotary embedding splits the head dim into even (t, h, w)
    parts, so an even number >= 6."""
    value = _positive_int(text)
    if value % 2 or value < 6:
        raise argparse.ArgumentTypeError(
            f"the Wan rotary embedding needs an even head dimension >= 6 (it splits it into even t, h, w "
            f"parts), got {value}")
    return value


def _dtype(name: str):
    return None if name == "auto" else getattr(torch, name)


def _device(name: str) -> torch.device | None:
    """``--device``: ``None`` for auto, else a device this machine has."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CLIError(f"--device {name}: this machine has no CUDA GPU that torch can use; use --device cpu")
        if device.index is not None and device.index >= count:
            raise CLIError(f"--device {name}: there are {count} CUDA GPUs (cuda:0 .. cuda:{count - 1})")
    return device


TINY_OPTIONS = (("tiny_layers", "num_layers"), ("tiny_heads", "num_attention_heads"),
                ("tiny_head_dim", "attention_head_dim"))  # --tiny-* option -> model setting


def _load_pipeline(args):
    from .pipelines import SparseVideoPipeline

    device, dtype = _device(args.device), _dtype(args.dtype)
    given_tiny = [f"--{opt.replace('_', '-')}" for opt, _ in TINY_OPTIONS if getattr(args, opt) is not None]
    if args.model is not None:
        if given_tiny:
            raise CLIError(f"{', '.join(given_tiny)} set the built-in tiny model, not --model {args.model}")
        return SparseVideoPipeline.from_pretrained(args.model, torch_dtype=dtype, device=device)
    size = {setting: getattr(args, opt) for opt, setting in TINY_OPTIONS if getattr(args, opt) is not None}
    pipe = SparseVideoPipeline.tiny(seed=args.model_seed, **size)
    if device is not None or dtype is not None:
        pipe.pipe.to(device or "cpu", dtype or torch.float32)
        pipe.pipe.vae.to(torch.float32)  # as from_pretrained loads it: the Wan VAE is meant for float32
    return pipe


def _sizes(args) -> dict:
    """The size options given (``None`` for those left out: the model's defaults)."""
    return {"num_frames": args.frames, "height": args.height, "width": args.width, "num_inference_steps": args.steps}


def _method_processor(method: str, args, *, stats: bool = True):
    """The processor the options describe, built before any model is loaded (so bad presets,
    files and keys fail in a second, not after minutes of loading); without --preset the
    built-in model's settings (configs/generate/tiny.yaml) apply unless --model is given."""
    from .pipelines.generate import generation_processor, tiny_defaults

    on_tiny = getattr(args, "model", None) is None
    return generation_processor(method, preset=args.preset, config_file=args.config,
                          overrides=parse_overrides(args.overrides),
                          defaults=tiny_defaults()["methods"].get(method) if on_tiny else None,
                          stats=stats, backend=args.backend)


def _output_dir(path: str) -> Path:
    """``path`` as an existing directory (made if missing), or a :class:`CLIError` saying why not."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {path!r} exists and is not a directory; give a directory for the videos and reports")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"--out {path!r} cannot be made ({err.strerror})") from None
    return out


def _output_file(path: str) -> Path:
    """``path`` as a file that can be written (its folder made if missing), or a
    :class:`CLIError` saying why not; checked before any work is done."""
    out = Path(path)
    if out.is_dir():
        raise CLIError(f"--out {path!r} is a directory; give a file name such as plan.png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "ab"):
            pass
    except OSError as err:
        raise CLIError(f"--out {path!r} cannot be written ({err.strerror})") from None
    return out


def _start_context_parallel(args) -> int:
    """Join the torchrun processes for ``--context-parallel N``; returns this process's rank."""
    if args.context_parallel == 1:
        return 0
    from .parallel import init_distributed

    rank, world = init_distributed()
    if world != args.context_parallel:
        raise CLIError(
            f"--context-parallel {args.context_parallel} needs {args.context_parallel} processes: run "
            f"torchrun --nproc_per_node {args.context_parallel} -m vdiff_sparse generate ... (this run has {world})"
        )
    return rank


def run_generate(args) -> int:
    import json

    from .pipelines.generate import generation_processor, save_video
    from .pipelines.report import compare, plot_report, report_markdown, report_table

    if args.compile and not args.warmup:
        raise CLIError("--compile needs the warm-up generation (it compiles, so that the timed generations run "
                       "compiled): drop --no-warmup")
    rank = _start_context_parallel(args)
    sparse_proc = _method_processor(args.attn, args)
    out = _output_dir(args.out)  # before the model loads and the videos are made
    pipe = _load_pipeline(args)
    if args.context_parallel > 1:
        from .context import transformers_of
        from .parallel import enable_context_parallel

        for transformer in transformers_of(pipe.pipe):
            enable_context_parallel(transformer, args.context_parallel)
    if args.compile:
        pipe.compile()
    # Round the sizes once (one warning), so every run below uses the same valid sizes.
    call = dict(pipe.resolve_size(**_sizes(args)), seed=args.seed, negative_prompt=args.negative_prompt)
    if args.guidance_scale is not None:
        call["guidance_scale"] = args.guidance_scale
    grid = pipe.latent_grid(call["num_frames"], call["height"], call["width"])
    steps = call["num_inference_steps"]
    layout = "" if args.context_parallel == 1 else f", context parallel (Ulysses) over {args.context_parallel} processes"
    layout += f", torch.compile ({pipe.compiled}, fullgraph)" if pipe.compiled else ""
    if rank == 0:
        print(f"{pipe.model}: {call['num_frames']} frames x {call['height']} x {call['width']}, {steps} steps, "
              f"token grid {grid} = {grid[0] * grid[1] * grid[2]:,} video tokens, {pipe.device}{layout}", flush=True)
    runs = [(generation_processor("dense"), "dense")] if args.compare_dense else []
    runs.append((sparse_proc, args.attn))
    if args.warmup:
        # First calls pay for allocator growth, oneDNN / Triton kernel builds and plan caches;
        # two steps so that a fractional dense warm-up still reaches the sparse path.
        for proc, name in runs:
            pipe.set_attn_processor(proc)
            pipe.pipe.set_progress_bar_config(desc=f"warm-up {name}", leave=False)
            pipe(args.prompt, **{**call, "num_inference_steps": min(steps, 2)})
    results = []
    for proc, name in runs:
        pipe.set_attn_processor(proc)
        pipe.pipe.set_progress_bar_config(desc=name, leave=False)
        results.append(pipe(args.prompt, **call))
    dense, sparse = results if args.compare_dense else (None, results[0])
    if rank != 0:  # every process generated the same video; the first one writes it
        return 0
    video = save_video(sparse.frames, out / f"{args.attn}.mp4", fps=args.fps)
    if dense is not None:
        save_video(dense.frames, out / "dense.mp4", fps=args.fps)
    report = compare(sparse, dense)
    report.update(video=video.name, warmup=args.warmup,
                  parallel={"context_parallel": args.context_parallel, "mode": "ulysses" if args.context_parallel > 1
                            else "none", "processes": args.context_parallel})
    plot = plot_report(report, out / "report.png")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report, video=video.name, plot=plot and plot.name))
    print()
    print(report_table(report))
    print(f"\nwrote {out / 'report.md'}, {out / 'report.json'}, {video}"
          + (f", {plot}" if plot else "; no plot (pip install matplotlib)"))
    return 0


def run_viz(args) -> int:
    from .pipelines.viz import capture_plan, plot_plan

    out = _output_file(args.out)
    heads = args.heads if args.source == "random" else _tiny_model_defaults()["num_attention_heads"]
    if not 0 <= args.head < heads:
        raise CLIError(f"--head must be in [0, {heads - 1}] for {heads} heads, got {args.head}")
    proc = _method_processor(args.attn, args, stats=False)
    plan, grid = capture_plan(proc, source=args.source, layer=args.layer, step=args.step, size=_sizes(args),
                              grid=tuple(args.grid), heads=args.heads, head_dim=args.head_dim, seed=args.seed)
    method = proc.method_for(args.layer)  # a layer may run another method (schedule ``layers``)
    title = f"{method} ({args.source}), layer {args.layer}, grid {tuple(grid)}"
    path = plot_plan(plan, out, head=args.head, title=title)
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


def _add_method_options(p: argparse.ArgumentParser, methods, default: str, *, with_model: bool) -> None:
    p.add_argument("--attn", choices=methods, default=default,
                   help="attention method for video self-attention")
    preset_default = "the built-in tiny model's settings (configs/generate/tiny.yaml)"
    if with_model:
        preset_default += ", with --model the method's defaults (configs/methods)"
    p.add_argument("--preset", default=None,
                   help=f"method or model preset (configs/methods, configs/models, e.g. wan2.1-1.3b); "
                        f"default: {preset_default}")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="method settings: config:/schedule: sections or their fields at top level; "
                        "they override the preset; default: none")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="method or schedule fields, YAML values (topk=4 window=[3,8,8] dense_steps=0.3); "
                        "they override --preset and --config; default: none")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "reference"),
                   help="plan backend of the sparse methods")


def _add_size_options(p: argparse.ArgumentParser, *, with_model: bool, applies_to: str = "") -> None:
    from .pipelines.generate import SparseVideoPipeline, tiny_defaults

    tiny = tiny_defaults()["size"]
    real = SparseVideoPipeline.REAL_MODEL_SIZE

    def default(key: str) -> str:
        return f"default: {tiny[key]}" + (f" (with --model: {real[key]})" if with_model else "")

    p.add_argument("--frames", type=int, default=None,
                   help=f"{applies_to}frames; {default('num_frames')}; counts the model cannot take are rounded to "
                        f"the nearest valid one with a warning (so are height and width)")
    p.add_argument("--height", type=int, default=None, help=f"{applies_to}frame height in pixels; {default('height')}")
    p.add_argument("--width", type=int, default=None, help=f"{applies_to}frame width in pixels; {default('width')}")
    p.add_argument("--steps", type=int, default=None,
                   help=f"{applies_to}denoising steps; {default('num_inference_steps')}")


def _tiny_model_defaults() -> dict:
    """The built-in tiny model's settings (``num_layers``, ``num_attention_heads``, ...)."""
    import inspect

    from .tiny_models import tiny_wan_generation_pipeline

    return {k: v.default for k, v in inspect.signature(tiny_wan_generation_pipeline).parameters.items()}


def _add_tiny_model_options(p: argparse.ArgumentParser) -> None:
    defaults = _tiny_model_defaults()
    for option, setting in TINY_OPTIONS:
        what = {"num_layers": "transformer blocks", "num_attention_heads": "attention heads",
                "attention_head_dim": "head dimension"}[setting]
        p.add_argument(f"--{option.replace('_', '-')}", type=_tiny_head_dim if option == "tiny_head_dim" else _positive_int,
                       default=None,
                       help=f"built-in tiny model: {what}; default: {defaults[setting]}")
    p.add_argument("--model-seed", type=int, default=0, help="built-in tiny model: seed of its random weights")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except where there is none to show (the help text says what
    happens then) and for on/off flags (their default is "off")."""

    def _get_help_string(self, action):
        # store_true / store_false are store-const actions
        if action.default is None or action.default == [] or isinstance(action, argparse._StoreConstAction):
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
                    "(with matplotlib) to --out; with --compare-dense also dense.mp4 and the speedup.")
    _add_method_options(gen, method_names(), "gna", with_model=True)
    gen.add_argument("--seed", type=int, default=0, help="seed of the initial noise (the dense run uses the same)")
    gen.add_argument("--prompt", default=DEFAULT_PROMPT, help="text prompt")
    gen.add_argument("--negative-prompt", default=None, help="negative prompt; default: the pipeline's")
    _add_size_options(gen, with_model=True)
    gen.add_argument("--guidance-scale", type=_finite_float, default=None,
                     help="classifier-free guidance; default: the pipeline's")
    gen.add_argument("--out", default="vdiff_sparse_output", help="output directory")
    gen.add_argument("--model", default=None, metavar="ID_OR_PATH",
                     help="diffusers checkpoint: Hugging Face id or local directory (save_pretrained / "
                          "`hf download --local-dir`); default: the built-in tiny model. With "
                          "HF_HUB_OFFLINE=1 only the local Hugging Face cache is used")
    gen.add_argument("--compare-dense", action="store_true",
                     help="also generate with dense attention (same seed) and report speedup and PSNR/SSIM")
    gen.add_argument("--device", default="auto",
                     help="cuda, cuda:1, cpu; auto: the GPU if there is one with --model, the CPU for the "
                          "built-in tiny model")
    gen.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                     help="model dtype (the VAE stays float32); auto: bfloat16 on GPU, float32 on CPU, "
                          "float32 for the tiny model")
    gen.add_argument("--fps", type=_positive_int, default=16, help="frame rate of the mp4")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the transformer (whole graphs: regional where the model has repeated "
                          "blocks); the warm-up generation compiles, the timed ones run compiled")
    gen.add_argument("--context-parallel", type=_positive_int, default=1, metavar="N",
                     help="split the video tokens over N processes (Ulysses context parallelism; run under "
                          "torchrun --nproc_per_node N); the first process writes the video and report")
    gen.add_argument("--no-warmup", dest="warmup", action="store_false",
                     help="skip the short untimed warm-up generation of each method (timings then "
                          "include first-call costs)")
    _add_tiny_model_options(gen)
    gen.set_defaults(func=run_generate)

    viz = sub.add_parser(
        "viz", formatter_class=fmt, help="draw a method's plan for one layer and head as a PNG",
        description="Draw which key blocks each query block attends (and at which pool level) for one "
                    "layer and head, from a generation with the built-in tiny model (--source tiny) or "
                    "from synthetic moving-video attention (--source random).")
    _add_method_options(viz, [m for m in method_names() if m != "dense"], "psa", with_model=False)
    viz.add_argument("--seed", type=int, default=0, help="seed of the tiny model and its noise, or of the random q/k/v")
    viz.add_argument("--source", choices=("tiny", "random"), default="tiny",
                     help="q/k from the tiny model's generation or synthetic moving-video q/k/v")
    viz.add_argument("--layer", type=int, default=0, help="video self-attention layer (tiny model: 0, 1 or 2)")
    viz.add_argument("--head", type=int, default=0, help="attention head")
    viz.add_argument("--step", type=int, default=None, help="--source tiny: denoising step; default: the last")
    _add_size_options(viz, with_model=False, applies_to="--source tiny: ")
    viz.add_argument("--grid", type=int, nargs=3, default=(5, 32, 32), metavar=("T", "H", "W"),
                     help="--source random: token grid")
    viz.add_argument("--heads", type=_positive_int, default=2, help="--source random: attention heads")
    viz.add_argument("--head-dim", type=_positive_int, default=32, help="--source random: head dimension")
    viz.add_argument("--out", default="plan.png", help="PNG path")
    viz.set_defaults(func=run_viz)

    demo = sub.add_parser("demo", help="the three methods vs dense SDPA on synthetic video attention",
                          formatter_class=fmt,
                          description="VMoBA, PSA and GNA against dense SDPA on one synthetic video-attention "
                                      "problem (float32, CPU): density, relative error, cosine similarity and "
                                      "median time.")
    demo.add_argument("--grid", type=_positive_int, nargs=3, default=(8, 32, 32), metavar=("T", "H", "W"),
                      help="latent token grid")
    demo.add_argument("--heads", type=_positive_int, default=4, help="attention heads")
    demo.add_argument("--head-dim", type=_positive_int, default=64, help="head dimension")
    demo.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per method (median)")
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
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        # argparse fills the key=value positional from one run of arguments only, so overrides
        # after another option (``--attn gna window=[3,9,9] --steps 1 dense_steps=0.2``) are left
        # over: they are overrides all the same.
        if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
            args.overrides = [*args.overrides, *rest]
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args.func(args)
    except CLIError as err:
        print(f"vdiff-sparse {command}: error: {err}", file=sys.stderr)
        return 2
    except ModelNotAvailableError as err:
        print(f"vdiff-sparse {command}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, NotImplementedError) as err:
        # Bad settings (unknown preset or option, bad value, bad size) are user errors: one
        # line, no traceback. The same exception types raised anywhere else (a bug, a failure
        # inside torch or diffusers) keep their traceback.
        if not raised_by_a_check(err):
            raise
        print(f"vdiff-sparse {command}: error: {err}", file=sys.stderr)
        return 2


def raised_by_a_check(err: BaseException) -> bool:
    """Whether ``err`` was raised on purpose by vdiff_sparse's own code: by a ``raise``
    statement in a file of this package (argument checks, config validation), not by Python
    or a library underneath (``int("x")``, a torch error)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    ours = any(path.is_relative_to(root) for root in _PACKAGE_ROOTS)
    line = linecache.getline(str(path), tb.tb_lineno).strip()
    return ours and line.startswith("raise ")


def _package_roots() -> tuple[Path, ...]:
    """Folders of this package's code (the kernels and pipelines folders are installed as
    subpackages but sit beside the package in a source checkout)."""
    roots = []
    for name in ("vdiff_sparse", "vdiff_sparse.kernels", "vdiff_sparse.pipelines"):
        spec = importlib.util.find_spec(name)
        roots += [Path(p).resolve() for p in spec.submodule_search_locations or ()]
    return tuple(roots)


_PACKAGE_ROOTS = _package_roots()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
