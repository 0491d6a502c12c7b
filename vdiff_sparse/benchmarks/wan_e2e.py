"""End-to-end speed on the real Wan 2.1 T2V 1.3B architecture (random weights).

Builds ``WanTransformer3DModel`` with the 1.3B config (30 layers, 12 heads x 128, ffn 8960,
in/out 16 channels, text dim 4096, patch (1, 2, 2)) in bf16 on the GPU and times one denoising
step (one transformer forward: latents ``[1, 16, 21, 60, 104]`` for 480x832 / 81 frames, i.e. a
21x30x52 token grid = 32,760 tokens, and 512 text tokens) with the model's own dense attention
and with each vdiff_sparse processor at its ``wan2.1-1.3b`` preset. The processors run every
timed step sparse (their dense warm-up is applied afterwards, in the projected generation time).

Per method: median step time over ``--steps`` forwards after ``--warmup`` forwards (Triton
compiles and autotunes there), speedup vs dense, peak GPU memory, the mean FLOP-equivalent
density of the sparse layers (from one extra forward with stats on), and the projected
transformer time of a 50-step generation with classifier-free guidance (2 forwards per step)
under the preset's schedule. Random weights: speed only, not quality (text encoder and VAE not
included).

``--smoke`` runs the same code path on the CPU in float32 with a 2-layer narrow model and a
small grid, in seconds, so the script is known to work without a GPU.

    python bench/wan_e2e_gpu.py                  # GPU, writes bench/results/wan_e2e_gpu.json
    python bench/wan_e2e_gpu.py --smoke --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from ..methods.registry import method_names
from .meta import command_line, run_metadata, write_json

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
# Same code path, a model that runs on the CPU in seconds.
SMOKE_OVERRIDES = dict(num_attention_heads=2, attention_head_dim=32, text_dim=32, freq_dim=32,
                       ffn_dim=64, num_layers=2, rope_max_seq_len=32)
LATENT_480P = (21, 60, 104)  # 81 frames, 480x832: VAE /4 in time (+1), /8 in space
SMOKE_LATENT = (4, 16, 24)
TEXT_TOKENS, SMOKE_TEXT_TOKENS = 512, 8
GENERATION_STEPS = 50
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_config(smoke: bool) -> dict:
    return {**WAN_1_3B, **(SMOKE_OVERRIDES if smoke else {})}


# The presets are made for 480p-720p grids and cover the whole smoke grid (dense); these keep
# the smoke run on the sparse code path.
SMOKE_METHOD_OVERRIDES = {
    "gna": dict(window=(3, 4, 6), stride=(1, 2, 2)),
    "psa": dict(block_q=64, block_k=64),
    "vmoba": dict(block_1d=1, block_2d=(4, 4), block_3d=(2, 4, 4), topk=3),
}


def build_transformer(config: dict, device: torch.device, dtype: torch.dtype):
    """A randomly initialised ``WanTransformer3DModel`` built on ``device``, in ``dtype`` except
    the modules diffusers keeps in float32 (as ``from_pretrained(torch_dtype=...)`` does)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not any(k in name.split(".") for k in keep):
            tensor.data = tensor.data.to(dtype)
    return model.eval().requires_grad_(False)


def benchmark_processor(method: str, preset: str, backend: str, *, stats: bool = False, smoke: bool = False):
    """The processor of ``method`` at ``preset``, every step sparse; ``None`` for the model's own
    dense attention."""
    from ..processors import build_processor

    if method == "dense":
        return None
    overrides = SMOKE_METHOD_OVERRIDES.get(method, {}) if smoke else {}
    return build_processor(method, preset=preset, backend=backend, stats=stats,
                           settings={"dense_steps": 0, **overrides})


def preset_warmup_steps(method: str, preset: str, total: int = GENERATION_STEPS) -> int:
    """Dense warm-up steps of ``method``'s preset schedule in a ``total``-step generation."""
    from ..processors import ScheduleConfig, load_preset

    if method == "dense":
        return total
    return ScheduleConfig(**load_preset(method, preset)["schedule"]).warmup_steps(total)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, inputs: dict, warmup: int, steps: int, device: torch.device) -> list[float]:
    """Wall times (s) of ``steps`` forwards at decreasing timesteps, after ``warmup`` forwards."""
    times = []
    for i in range(warmup + steps):
        t = torch.full_like(inputs["timestep"], 999.0 - 20.0 * i)
        _sync(device)
        start = time.perf_counter()
        model(**{**inputs, "timestep": t}, return_dict=False)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def benchmark(methods, *, smoke: bool, device: torch.device, dtype: torch.dtype, latent, text_tokens: int,
              steps: int, warmup: int, backend: str, preset: str = "wan2.1-1.3b", verbose: bool = True,
              compile_modes: tuple[bool, ...] = (False,)) -> dict:
    """Time every method on one model and one set of inputs; returns the report body. With
    ``compile_modes=(False, True)`` every method runs eager, then all again with the blocks
    compiled (``compile_repeated_blocks(fullgraph=True)``; the warm-up forwards compile)."""
    from ..integration import disable, enable

    config = model_config(smoke)
    model = build_transformer(config, device, dtype)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, config["in_channels"], *latent, generator=g).to(device, dtype),
        timestep=torch.tensor([999.0], device=device),
        encoder_hidden_states=torch.randn(1, text_tokens, config["text_dim"], generator=g).to(device, dtype),
    )
    p = config["patch_size"]
    grid = tuple(n // s for n, s in zip(latent, p))
    rows = []
    runs = [(compiled, method) for compiled in compile_modes for method in methods]
    for compiled, method in runs:
        if compiled:
            if not getattr(model, "_vdiff_bench_compiled", False):  # once, after every eager run
                model.compile_repeated_blocks(fullgraph=True)
                model._vdiff_bench_compiled = True
            torch._dynamo.reset()  # a fresh cache per processor: no recompile limit across methods
        proc = benchmark_processor(method, preset, backend, smoke=smoke)
        if proc is not None:
            enable(model, proc)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            times = time_steps(model, inputs, warmup, steps, device)
            density = None
            if proc is not None:
                counted = benchmark_processor(method, preset, backend, stats=True, smoke=smoke)
                enable(model, counted)
                model(**inputs, return_dict=False)
                sparse = [r.density for r in counted.stats.records if r.method == method]
                density = sum(sparse) / len(sparse) if sparse else None
        if proc is not None:
            disable(model)
        row = {
            "method": method,
            "compiled": compiled,
            "processor": None if proc is None else repr(proc),
            "step_times_s": times,
            "median_step_s": statistics.median(times),
            "density": 1.0 if proc is None else density,
            "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
            "preset_dense_warmup_steps": preset_warmup_steps(method, preset),
        }
        rows.append(row)
        if verbose:
            print(f"{method:>6}{' compiled' if compiled else ''}: median step {row['median_step_s'] * 1e3:9.1f} ms  "
                  "density "
                  f"{row['density'] if row['density'] is None else round(row['density'], 3)}",
                  flush=True)
    for row in rows:
        dense = next((r for r in rows if r["method"] == "dense" and r["compiled"] == row["compiled"]), None)
        if dense is None:
            continue
        row["speedup_vs_dense"] = dense["median_step_s"] / row["median_step_s"]
        warm = row["preset_dense_warmup_steps"]
        t = 2 * (warm * dense["median_step_s"] + (GENERATION_STEPS - warm) * row["median_step_s"])
        row["projected_generation_s"] = t
        row["projected_generation_speedup"] = 2 * GENERATION_STEPS * dense["median_step_s"] / t
    return {
        "problem": {
            "model": "WanTransformer3DModel, Wan 2.1 T2V 1.3B config" + (" (smoke: narrowed)" if smoke else ""),
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
            "latent": [1, config["in_channels"], *latent], "token_grid": list(grid),
            "tokens": math.prod(grid), "text_tokens": text_tokens, "dtype": str(dtype).replace("torch.", ""),
            "device": str(device), "backend": backend, "preset": preset, "smoke": smoke,
            "timing": f"median of {steps} forwards after {warmup} warm-up forwards, synchronised wall time",
            "projection": f"{GENERATION_STEPS} steps x 2 forwards (CFG); the preset's dense warm-up "
                          "steps at the dense step time",
            "weights": "random (speed only)",
        },
        "results": rows,
    }


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="bench/wan_e2e_gpu.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="2-layer narrow model, small grid, CPU, float32")
    parser.add_argument("--methods", nargs="+", choices=method_names(), default=list(method_names()))
    parser.add_argument("--latent", type=int, nargs=3, default=None, metavar=("T", "H", "W"),
                        help=f"latent size (default {LATENT_480P}, smoke {SMOKE_LATENT})")
    parser.add_argument("--steps", type=int, default=None, help="timed forwards (default 5, smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed forwards first (default 2, smoke 1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model and input dtype (default bf16 on the GPU, fp32 with --smoke)")
    parser.add_argument("--backend", default="auto", help="processor backend: auto, triton, torch")
    parser.add_argument("--preset", default="wan2.1-1.3b")
    parser.add_argument("--compile", action="store_true",
                        help="also time every method with the blocks compiled (fullgraph), after the eager runs")
    parser.add_argument("--out", default=None,
                        help="JSON path (default bench/results/wan_e2e_gpu.json, smoke wan_e2e_smoke.json)")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.smoke:
        device, dtype = torch.device("cpu"), DTYPES[args.dtype or "fp32"]
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), DTYPES[args.dtype or "bf16"]
    else:
        print("no CUDA GPU: the Wan 2.1 1.3B benchmark needs one (use --smoke to check the script on the CPU)")
        return 2
    body = benchmark(
        args.methods, smoke=args.smoke, device=device, dtype=dtype,
        latent=tuple(args.latent or (SMOKE_LATENT if args.smoke else LATENT_480P)),
        text_tokens=SMOKE_TEXT_TOKENS if args.smoke else TEXT_TOKENS,
        steps=args.steps or (2 if args.smoke else 5),
        warmup=args.warmup if args.warmup is not None else (1 if args.smoke else 2),
        backend=args.backend, preset=args.preset, compile_modes=(False, True) if args.compile else (False,),
    )
    out = args.out or str(Path("bench") / "results" / ("wan_e2e_smoke.json" if args.smoke else "wan_e2e_gpu.json"))
    path = write_json(out, {"benchmark": "wan_e2e", **run_metadata(command_line()), **body})
    print("wrote", path)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
