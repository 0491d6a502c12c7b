"""Does sparse-aware fine-tuning bring the sparse model back to the dense one? The tiny Wan on
the CPU, through the fine-tuning pipeline itself (``vdiff_sparse.pipelines.finetune.train``).

Per seed of ``--seeds`` (its own clips, base and runs): the base model is the tiny Wan 2.1 T2V
of ``configs/finetune/tiny_wan_vmoba.yaml`` (random weights of that seed), first trained densely
with flow matching for ``--pretrain-steps`` on the bench's clips (a random network's attention
is nearly uniform, which no sparse pattern can reproduce; a trained one's is not), then saved as
a diffusers folder and loaded from there like any checkpoint. That dense base is the teacher.
The data are ``--clips`` synthetic clips (moving colour gradients of random frequency, direction
and phase, 9 frames at 48x80, a 3x3x5 token grid), ``--holdout`` of them kept out of training
for the held-out gap.

For each sparse method (VMoBA with its training selection, GNA) and each fine-tuning (LoRA rank
8 on the attention projections, full), ``train.objective=distill`` and
``train.objective=flow_matching`` run ``--steps`` steps with the same seed, data order and
noise. Recorded per run from ``final/report.json``: the held-out ``teacher_gap`` (relative L2
between the sparse student's and the dense teacher's predictions on the held-out clips at 4
fixed noise levels, uniform in sigma; training draws sigma uniformly too) at the start, every
``--eval-every`` steps and at the end, its ratio
after/before, both models' held-out flow-matching loss, the student's attention density, and
the wall time (indicative only: a shared 2-core machine).

With ``--diagnostics`` it looks for what keeps the distilled student above half the gap: GNA
with full fine-tuning and ``distill`` only, once as above (``baseline``) and once per variant:
the held-out pair replaced by copies of two training clips (``training_clips_held_out``: is the
student memorising its clips?), effective batch 16 by gradient accumulation (gradient noise?), a
3x higher learning rate and twice the steps (under-trained?), two wider windows (less to
recover?), a 4-layer base (too few layers to route around the window?) and a base trained
``--long-pretrain-steps`` (an under-trained teacher?). Each row keeps the gap per held-out noise
level (``teacher_gap_by_sigma`` of ``report.json``).

    python bench/finetune_gap_cpu.py                         # seeds 0-2 -> bench/results/finetune_gap_cpu.json
    python bench/finetune_gap_cpu.py --steps 20 --pretrain-steps 20 --seeds 0 --out /tmp/gap.json   # quick
    python bench/finetune_gap_cpu.py --layers 4 --methods gna --out bench/results/finetune_gap_4layers_cpu.json
    python bench/finetune_gap_cpu.py --diagnostics --seeds 1 \
        --out bench/results/finetune_gap_diagnostics_seed1_cpu.json   # the seed the gap is not halved on
    python bench/finetune_gap_cpu.py --diagnostics --steps 300 --pretrain-steps 300 --eval-every 50 \
        --long-pretrain-steps 1500 --seeds 0   # finetune_gap_diagnostics_cpu.json (1e148b9, before lr_x3, steps_x2)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from vdiff_sparse.benchmarks.meta import command_line, run_metadata, write_json

METHODS = ("vmoba", "gna")
FINE_TUNING = {"lora": ["train.lora_rank=8"], "full": []}
OBJECTIVES = ("distill", "flow_matching")
WORDS = "a the cat dog runs on beach in snow red blue video of".split()


def write_clips(root: Path, count: int, seed: int) -> Path:
    """``count`` clips of moving colour gradients and ``captions.jsonl`` in ``root``."""
    import imageio

    rng = np.random.default_rng(seed)
    t, y, x = np.meshgrid(np.arange(9), np.arange(48), np.arange(80), indexing="ij")
    lines = []
    for i in range(count):
        fy, fx, ft_ = rng.uniform(0.05, 0.3, 3)
        channels = [127 + 120 * np.sin(fx * x * rng.choice([-1, 1]) + fy * y + ft_ * t * (c + 1) + rng.uniform(0, 6.3))
                    for c in range(3)]
        imageio.mimwrite(str(root / f"clip{i}.mp4"), np.stack(channels, -1).astype(np.uint8), fps=8)
        caption = " ".join(rng.choice(WORDS, size=5))
        lines.append(json.dumps({"video": f"clip{i}.mp4", "caption": caption}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def common(args, clips: Path, output_dir: Path, cache: Path) -> list[str]:
    return [f"output_dir={output_dir}", f"data.video_dir={clips}", f"data.captions={clips / 'captions.jsonl'}",
            f"data.cache_dir={cache}", f"seed={args.seed}",
            f"eval.holdout={args.holdout}", "validation.prompts=[]", f"train.batch_size={args.batch}",
            "train.log_every=1000", "train.checkpoint_every=100000", f"train.lr_warmup_steps={args.warmup}",
            # Noise levels drawn uniformly, as the held-out gap weighs them (its levels are the
            # midpoints of equal slices of sigma).
            "train.timestep_sampling=uniform", "train.shift=1.0"]


def pretrained_base(args, clips: Path, work: Path, steps: int | None = None, layers: int | None = None) -> Path:
    """The tiny Wan (``layers`` transformer blocks: the tiny config's 2 if ``None``) trained
    densely with flow matching for ``steps`` (``--pretrain-steps`` if ``None``), saved as a
    diffusers pipeline folder."""
    from diffusers import WanTransformer3DModel

    from vdiff_sparse.pipelines import finetune as ft
    from vdiff_sparse.tiny_models import tiny_wan_transformer

    steps = args.pretrain_steps if steps is None else steps
    name = f"base-{steps}-{layers or 2}"
    start = []
    if layers is not None:  # the random start as a folder the pipeline loads like any checkpoint
        pipe = ft.load_pipeline(ft.ModelConfig(), seed=args.seed)
        pipe.transformer = tiny_wan_transformer(seed=args.seed, num_layers=layers)
        pipe.save_pretrained(str(work / f"{name}-init"))
        start = [f"model.name={work / f'{name}-init'}"]
    out = work / f"pretrain-{name}"
    config = ft.load_config("tiny_wan_vmoba", common(args, clips, out, work / f"cache-{name}") + start + [
        "sparse.method=dense", "train.objective=flow_matching", f"train.max_steps={steps}",
        f"train.lr={args.pretrain_lr}", "train.lr_scheduler=cosine", "validation.every=0", "eval.holdout=0"])
    ft.train(config)
    pipe = ft.load_pipeline(ft.ModelConfig(), seed=args.seed)
    pipe.transformer = WanTransformer3DModel.from_pretrained(str(out / "final" / "transformer"))
    base = work / name
    pipe.save_pretrained(str(base))
    return base


def training_clips_held_out(clips: Path, dest: Path, count: int, holdout: int, seed: int) -> Path:
    """``clips`` copied to ``dest`` with each clip the run holds out replaced by a copy (video
    and caption) of a training clip: the held-out gap is then measured on clips it trains on."""
    import shutil

    from vdiff_sparse.pipelines.finetune.schedule import holdout_split

    train, held = holdout_split(count, holdout, seed)
    dest.mkdir()
    lines = (clips / "captions.jsonl").read_text().splitlines()
    for i in range(count):
        shutil.copy(clips / f"clip{i}.mp4", dest / f"clip{i}.mp4")
    for held_index, train_index in zip(held, train):
        shutil.copy(clips / f"clip{train_index}.mp4", dest / f"clip{held_index}.mp4")
        caption = json.loads(lines[train_index])["caption"]
        lines[held_index] = json.dumps({"video": f"clip{held_index}.mp4", "caption": caption})
    (dest / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return dest


def run(args, clips: Path, work: Path, base: Path | None, method: str, fine_tuning: str, objective: str,
        extra: tuple[str, ...] = (), name: str = "") -> dict:
    from vdiff_sparse.pipelines import finetune as ft

    out = work / f"{method}-{fine_tuning}-{objective}{'-' + name if name else ''}"
    lr = args.lora_lr if fine_tuning == "lora" else args.full_lr
    settings = [f"sparse.method={method}", f"train.objective={objective}", f"train.max_steps={args.steps}",
                f"train.lr={lr}", "train.lr_scheduler=cosine", f"validation.every={args.eval_every}",
                *FINE_TUNING[fine_tuning], *extra]
    if base is not None:
        settings.append(f"model.name={base}")
    start = time.perf_counter()
    result = ft.train(ft.load_config("tiny_wan_vmoba", common(args, clips, out, work / f"cache-{clips.name}") + settings))
    wall = time.perf_counter() - start
    report = json.loads(result.report.read_text())
    row = {
        "method": method, "fine_tuning": fine_tuning, "objective": objective, "lr": lr, "steps": args.steps,
        "settings": settings, "teacher_gap_before": report["teacher_gap_before"],
        "teacher_gap_after": report["teacher_gap_after"], "teacher_gap_ratio": report["teacher_gap_ratio"],
        "gap_by_step": {e["step"]: e["teacher_gap"] for e in report["evaluations"]},
        "gap_by_sigma_before": report["evaluations"][0]["teacher_gap_by_sigma"],
        "gap_by_sigma_after": report["evaluations"][-1]["teacher_gap_by_sigma"],
        "student_heldout_loss_before": report["student_heldout_loss_before"],
        "student_heldout_loss_after": report["student_heldout_loss_after"],
        "teacher_heldout_loss": report["teacher_heldout_loss_after"],
        "heldout_density": report["heldout_density_after"], "teacher": report["teacher"], "wall_s": wall,
    }
    print(f"  {method:<5} {fine_tuning:<4} {objective:<13} gap {row['teacher_gap_before']:.4f} -> "
          f"{row['teacher_gap_after']:.4f} (x{row['teacher_gap_ratio']:.2f}), held-out loss "
          f"{row['student_heldout_loss_before']:.4f} -> {row['student_heldout_loss_after']:.4f} "
          f"(teacher {row['teacher_heldout_loss']:.4f}), density {row['heldout_density']:.3f}, {wall:.0f} s", flush=True)
    return row


def diagnostics(args, clips: Path, work: Path, base: Path) -> list[dict]:
    """GNA, full fine-tuning, ``distill``: the baseline and one run per variant (module docstring)."""
    copies = training_clips_held_out(clips, work / "clips-copies", args.clips, args.holdout, args.seed)
    variants = [  # name, what it tests, clips, base, extra settings
        ("baseline", "as in the main grid", clips, base, ()),
        ("training_clips_held_out", "memorising the training clips", copies, base, ()),
        ("effective_batch_16", "gradient noise", clips, base, ("train.grad_accum=4",)),
        ("lr_x3", "optimisation: a 3x higher learning rate", clips, base, (f"train.lr={3 * args.full_lr}",)),
        ("steps_x2", "optimisation: twice the steps", clips, base, (f"train.max_steps={2 * args.steps}",)),
        ("window_2x3x3", "density", clips, base, ("sparse.options.gna.window=[2,3,3]",)),
        ("window_3x3x4", "density", clips, base, ("sparse.options.gna.window=[3,3,4]",)),
        ("4_layers", "depth", clips, lambda: pretrained_base(args, clips, work, layers=4), ()),
        (f"teacher_{args.long_pretrain_steps}_steps", "the teacher's training", clips,
         lambda: pretrained_base(args, clips, work, steps=args.long_pretrain_steps), ()),
    ]
    rows = []
    for name, tests, variant_clips, variant_base, extra in variants:
        print(f"{name}: {tests}", flush=True)
        variant_base = variant_base() if callable(variant_base) else variant_base
        rows.append({"variant": name, "tests": tests, **run(args, variant_clips, work, variant_base, "gna", "full",
                                                               "distill", extra, name)})
    return rows


def summary(rows: list[dict]) -> dict:
    """Per (method, fine-tuning, objective): the gap ratio after/before of every seed, their
    median, and on how many seeds the gap was at least halved."""
    out = {}
    for row in rows:
        key = f"{row['method']} {row['fine_tuning']} {row['objective']}"
        out.setdefault(key, {"ratio_by_seed": {}})["ratio_by_seed"][str(row["seed"])] = row["teacher_gap_ratio"]
    for entry in out.values():
        ratios = sorted(entry["ratio_by_seed"].values())
        entry["median_ratio"] = float(np.median(ratios))
        entry["seeds_halved"] = sum(r <= 0.5 for r in ratios)
        entry["seeds"] = len(ratios)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--pretrain-steps", type=int, default=3000, help="dense flow-matching steps of the base (0: random)")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--lora-lr", type=float, default=3e-3)
    parser.add_argument("--full-lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=20, help="learning-rate warm-up steps")
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--holdout", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one base, data and set of runs per seed (--diagnostics: the first only)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks of the base (default: the tiny "
                        "config's 2)")
    parser.add_argument("--diagnostics", action="store_true",
                        help="GNA full distill under the variants of the module docstring instead of the grid")
    parser.add_argument("--long-pretrain-steps", type=int, default=6000, help="--diagnostics: the longer-trained base")
    parser.add_argument("--out", default=None,
                        help="JSON path (default results/finetune_gap_cpu.json, or finetune_gap_diagnostics_cpu.json)")
    args = parser.parse_args()
    if args.layers and not args.pretrain_steps:
        parser.error("--layers sets the trained base's depth: give --pretrain-steps > 0")
    if args.diagnostics and not args.pretrain_steps:
        parser.error("--diagnostics needs a trained base: give --pretrain-steps > 0")
    name = "finetune_gap_diagnostics_cpu" if args.diagnostics else "finetune_gap_cpu"
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", f"{name}.json")
    rows = []
    for seed in args.seeds[:1] if args.diagnostics else args.seeds:
        args.seed = seed
        print(f"seed {seed}", flush=True)
        with tempfile.TemporaryDirectory(prefix="finetune-gap-") as tmp:
            work = Path(tmp)
            (work / "clips").mkdir()
            clips = write_clips(work / "clips", args.clips, seed)
            base = pretrained_base(args, clips, work, layers=args.layers) if args.pretrain_steps else None
            if args.diagnostics:
                rows = diagnostics(args, clips, work, base)
            else:
                for method in args.methods:
                    for fine_tuning in FINE_TUNING:
                        for objective in OBJECTIVES:
                            rows.append({"seed": seed, **run(args, clips, work, base, method, fine_tuning, objective)})
    report = {
        "benchmark": name,
        **run_metadata(command_line()),
        "model": f"tiny Wan 2.1 T2V (configs/finetune/tiny_wan_vmoba.yaml: {args.layers or 2} layers, 2 heads x 32, "
                 "a 3x3x5 token grid)" + (f", trained densely with flow matching for {args.pretrain_steps} steps first" if
                             args.pretrain_steps else ", random weights"),
        "data": f"{args.clips} synthetic clips, {args.holdout} held out; held-out gap on them at 4 noise levels",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "seed")},
        "runs": rows,
    }
    if not args.diagnostics:
        report["summary"] = summary(rows)
    print("wrote", write_json(args.out, report))


if __name__ == "__main__":
    main()
