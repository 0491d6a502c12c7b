"""A short LoRA distillation run of the Wan 2.1 T2V 1.3B architecture (random weights, bf16) at
480p / 81 frames on one GPU: step time and peak memory.

One step is the fine-tuning pipeline's own step (``vdiff_sparse.pipelines.finetune``): noise and
timestep drawn per sample, the dense teacher's prediction (the same weights with the LoRA
adapters off and the model's own attention: no copy), the student's forward with VMoBA
(training selection: threshold, global, tau 0.25, ``wan2.1-1.3b`` block shapes) and rank-64
LoRA on the attention projections, the distillation loss, backward with gradient
checkpointing, AdamW. Beside it, the same LoRA step under flow matching with VMoBA (no teacher)
and with the model's dense attention: what the teacher costs and what sparse attention saves.
Latents ``[1, 16, 21, 60, 104]`` (a 21x30x52 token grid, 32,760 tokens), 512 text tokens.

Per configuration: median step time over ``--steps`` steps after ``--warmup`` (Triton compiles
there), peak GPU memory, mean VMoBA density, the teacher's extra parameter bytes.

    python bench/finetune_gpu.py                         # GPU -> results/finetune_gpu.json
    python bench/finetune_gpu.py --smoke --out /tmp/ft_smoke.json   # CPU check in seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from vdiff_sparse.benchmarks.meta import command_line, run_metadata, write_json
from vdiff_sparse.benchmarks.wan_e2e import (
    LATENT_480P, SMOKE_LATENT, SMOKE_METHOD_OVERRIDES, SMOKE_TEXT_TOKENS, TEXT_TOKENS, build_transformer, model_config,
)

RUNS = (("dense", "flow_matching"), ("vmoba", "flow_matching"), ("vmoba", "distill"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_configuration(method: str, objective: str, args, device: torch.device) -> dict:
    from vdiff_sparse.integration import enable
    from vdiff_sparse.pipelines import finetune as ft
    from vdiff_sparse.pipelines.finetune.loop import _trainable_setup
    from vdiff_sparse.pipelines.finetune.models import ModelTask

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    config = model_config(args.smoke)
    model = build_transformer(config, device, dtype)
    # The smoke grid needs smaller blocks; training selection is threshold-based (no top-k).
    options = {"vmoba": {k: v for k, v in SMOKE_METHOD_OVERRIDES["vmoba"].items() if k != "topk"}} if args.smoke else {}
    sparse = ft.SparseConfig(method=method, preset=None if args.smoke else "wan2.1-1.3b", options=options)
    train = ft.TrainConfig(objective=objective, lora_rank=args.lora_rank, lr=1e-4, gradient_checkpointing=not args.smoke,
                           mixed_precision=None if args.smoke else "bf16")
    processor = ft.training_processor(sparse)
    params = _trainable_setup(model, train, seed=0)
    enable(model, processor)
    teacher = ft.DenseTeacher(model, processor) if train.uses_teacher else None
    optimizer = torch.optim.AdamW(params, lr=train.lr)
    latent = SMOKE_LATENT if args.smoke else LATENT_480P
    text = SMOKE_TEXT_TOKENS if args.smoke else TEXT_TOKENS
    task = ModelTask("t2v", "transformer", (0.0, 1.0), False, 0.0, tuple(config["patch_size"]))
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(1, 16, *latent, generator=g),
             "prompt_embeds": torch.randn(1, text, config["text_dim"], generator=g)}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    times, densities = [], []
    for step in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        draws = [ft.draw_sample(step, batch["latents"].shape[1:], train, task)]
        inputs = ft.model_inputs(batch, draws, task, 1000, device, dtype)
        with autocast:
            teacher_prediction = teacher(model, inputs) if teacher is not None else None
            loss, _ = ft.objective_loss(ft.predict(model, inputs), inputs, teacher_prediction, train)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        records = processor.stats.records
        if records and method != "dense":
            densities.append(sum(r.density for r in records) / len(records))
        processor.stats.clear()
    row = {
        "method": method, "objective": objective, "lora_rank": args.lora_rank, "step_s": statistics.median(times),
        "all_s": times, "loss": loss.item(), "mean_density": statistics.mean(densities) if densities else 1.0,
        "teacher_extra_parameter_bytes": teacher.extra_parameter_bytes if teacher is not None else None,
        "trainable_parameters": sum(p.numel() for p in params),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    print(f"  {method:<6} {objective:<13} {row['step_s']:.3f} s/step  density {row['mean_density']:.3f}"
          + (f"  peak {row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else ""), flush=True)
    del model, optimizer, teacher, processor
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="CPU, a 2-layer narrow model on a small grid")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "finetune_gpu.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no CUDA GPU: run with --smoke for a CPU check")
    rows = [run_configuration(method, objective, args, device) for method, objective in RUNS]
    dense = rows[0]["step_s"]
    report = {
        "benchmark": "finetune_gpu",
        **run_metadata(command_line()),
        "smoke": args.smoke,
        "shape": {"latent": list(SMOKE_LATENT if args.smoke else LATENT_480P),
                  "text_tokens": SMOKE_TEXT_TOKENS if args.smoke else TEXT_TOKENS,
                  "model": "Wan 2.1 T2V 1.3B architecture, random weights" if not args.smoke else "smoke",
                  "dtype": "float32" if args.smoke else "bf16 weights, bf16 autocast, fp32 LoRA adapters"},
        "timing": f"median of {args.steps} steps after {args.warmup}; teacher forward + student forward + backward + "
                  f"AdamW, gradient checkpointing (not in --smoke)",
        "runs": rows,
        "step_time_vs_dense_flow_matching": {f"{r['method']}/{r['objective']}": r["step_s"] / dense for r in rows},
    }
    print("wrote", write_json(args.out, report))


if __name__ == "__main__":
    main()
