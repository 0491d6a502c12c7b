"""The training loop: set-up checks, model and data, the dense teacher, the steps, the
evaluations against the teacher, checkpoints, and the final weights and report."""

from __future__ import annotations

import gc
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from vdiff_sparse.pipelines.data import LatentDataset, build_cache

from .checkpointing import load_checkpoint, resolve_resume, save_checkpoint, save_final
from .config import FinetuneConfig, SetupError, TrainConfig
from .encoders import clip_encoders
from .metrics import HeldOutGap, MetricsLog, write_report
from .models import ModelTask, describe_model, is_tiny, load_pipeline
from .objectives import DenseTeacher, draw_sample, model_inputs, objective_loss, predict
from .schedule import ADAPTER_STREAM, NOISE_STREAM, global_batch, holdout_split, lr_factor, seed_of
from .sparse import training_processor
from .validation import compare_videos, generate, save_videos, validation_images

logger = logging.getLogger("vdiff_sparse.finetune")


@dataclass
class RunResult:
    """What :func:`train` did: the step reached, whether it stopped early (``stop_after``),
    the folders written, the training losses of this invocation, the validation videos, every
    evaluation of the run (also those before a resume) and ``final/report.json``."""

    step: int
    stopped_early: bool
    output_dir: Path
    last_checkpoint: Optional[Path]
    final_dir: Optional[Path]
    losses: List[float]
    validation_videos: List[Path] = field(default_factory=list)
    evaluations: List[dict] = field(default_factory=list)
    report: Optional[Path] = None


def check_distributed_type(distributed, environ=os.environ) -> None:
    """Refuse DeepSpeed, and a launch whose accelerate config asks for FSDP but which
    accelerate set up otherwise.

    DeepSpeed keeps optimizer and weights in its own engine, checkpointed only in its own
    pickle-based files, which this trainer does not load. accelerate (1.15) selects FSDP only
    on top of an accelerator process group (CUDA, XPU, ...); on a machine without GPUs it runs
    such a config as plain DDP over gloo without a word, so a run believed sharded would not be.

    Raises:
        NotImplementedError: DeepSpeed, or FSDP requested but not running.
    """
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" or distributed.value == "DEEPSPEED":
        raise NotImplementedError(
            "DeepSpeed is not supported: its checkpoints are pickle files, which this trainer never loads; use DDP "
            "(configs/finetune/accelerate/ddp.yaml) or FSDP (fsdp.yaml)"
        )
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and distributed.value != "FSDP":
        raise NotImplementedError(
            f"the accelerate config asks for FSDP, but accelerate set up {distributed.value}: it runs FSDP on GPUs "
            f"only (see configs/finetune/README.md); on CPU use configs/finetune/accelerate/cpu_ddp.yaml"
        )


def _check_writable(path: Path, name: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise SetupError(f"{name} {str(path)!r} cannot be written ({e.strerror or e}): choose a folder this "
                         f"user can create and write to") from None


def check_paths(config: FinetuneConfig) -> None:
    """The data exists and the output folders can be written, before anything is loaded.

    Raises:
        SetupError: a missing data folder or caption file, or an unwritable folder.
    """
    data = config.data
    if data.latents_dir:
        if not Path(data.latents_dir).is_dir():
            raise SetupError(f"data.latents_dir {data.latents_dir!r} is not a folder")
    else:
        if not Path(data.video_dir).is_dir():
            raise SetupError(f"data.video_dir {data.video_dir!r} is not a folder")
        if not Path(data.captions).is_file():
            raise SetupError(f"data.captions {data.captions!r} does not exist (or is not a file)")
    _check_writable(Path(config.output_dir), "output_dir")
    if not data.latents_dir:
        _check_writable(Path(data.cache_dir or Path(config.output_dir) / "cache"), "data.cache_dir")


def _build_dataset(config: FinetuneConfig, pipe, task: ModelTask, accelerator) -> LatentDataset:
    data = config.data
    if data.latents_dir:
        return LatentDataset(data.latents_dir, task.sample_keys)
    device = accelerator.device
    encoders = [m for m in (pipe.vae, pipe.text_encoder, getattr(pipe, "image_encoder", None)) if m is not None]
    for module in encoders:
        module.to(device)
    encode_video, encode_prompt, encode_condition = clip_encoders(pipe, task, data.max_text_len, device)
    report = build_cache(
        data.video_dir, data.captions, data.cache_dir or os.path.join(config.output_dir, "cache"),
        encode_video=encode_video, encode_prompt=encode_prompt, encode_condition=encode_condition,
        num_frames=data.num_frames, height=data.height, width=data.width, allow_outside=data.allow_outside_video_dir,
        # The tiny models' encoders are random: their seed is part of what they encode.
        settings={"model": config.model.name, "revision": config.model.revision, "max_text_len": data.max_text_len,
                  "seed": config.seed if is_tiny(config.model.name) else None, "inputs": list(task.sample_keys)},
        rank=accelerator.process_index, world_size=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
    )
    for module in encoders:
        module.to("cpu")
    if accelerator.is_main_process:
        logger.info("data: %s", report.summary())
    return LatentDataset(report.files, task.sample_keys)


def _trainable_setup(transformer, config: TrainConfig, seed: int) -> list[torch.nn.Parameter]:
    if config.lora_rank == 0:
        transformer.requires_grad_(True)
    else:
        from peft import LoraConfig

        transformer.requires_grad_(False)
        # The adapters' random start comes from the run's seed, not from whatever the process
        # drew before (two runs in one process would otherwise start differently). Only the
        # generators of the CPU and of the model's device are seeded, and restored after.
        device = next(transformer.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            adapter_seed = seed_of(seed, ADAPTER_STREAM)
            torch.default_generator.manual_seed(adapter_seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(adapter_seed)
            transformer.add_adapter(LoraConfig(
                r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank, init_lora_weights=True,
                target_modules=list(config.lora_targets),
            ))
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # fp32 master copy of the adapter weights
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return [p for p in transformer.parameters() if p.requires_grad]


def _mean_density(processor) -> Optional[float]:
    records = processor.stats.records
    density = sum(r.density for r in records) / len(records) if records else None
    processor.stats.clear()
    return density


def train(config: FinetuneConfig) -> RunResult:
    """Run (or resume) the fine-tuning described by ``config`` in the current process group
    (one process, or every process of an ``accelerate launch``).

    Raises:
        SetupError, ValueError: settings, paths or data that cannot be used, before the model
            is trained (paths and the resume folder before anything is loaded or encoded).
        NotImplementedError: a model or distributed setup this trainer does not support.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from vdiff_sparse.integration import enable

    t = config.train
    config.data.check_source()
    processor = training_processor(config.sparse)
    output_dir = Path(config.output_dir)
    check_paths(config)
    resume_from = resolve_resume(config.resume, output_dir)
    accelerator = Accelerator(cpu=t.cpu or not torch.cuda.is_available(), mixed_precision=t.mixed_precision,
                              gradient_accumulation_steps=t.grad_accum)
    check_distributed_type(accelerator.distributed_type)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if t.ema_decay and fsdp:
        raise NotImplementedError("train.ema_decay with FSDP (sharded weights) is not supported")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    main = accelerator.is_main_process
    if main:
        from omegaconf import OmegaConf

        OmegaConf.save(OmegaConf.structured(config), output_dir / "config.yaml")

    # Full fine-tuning keeps fp32 master weights; LoRA trains fp32 adapters on frozen weights
    # stored at the mixed-precision dtype.
    pipe = load_pipeline(config.model, seed=config.seed, dtype=weight_dtype,
                         transformer_dtype=weight_dtype if t.lora_rank else torch.float32)
    task = describe_model(pipe, config)
    images = validation_images(config, task)
    dataset = _build_dataset(config, pipe, task, accelerator)
    train_indices, held_indices = (holdout_split(len(dataset), config.eval.holdout, config.seed)
                                   if config.eval.holdout else (list(range(len(dataset))), []))
    train_set = dataset.subset(train_indices)
    device = accelerator.device
    transformer = getattr(pipe, task.component)
    for name in ("transformer", "transformer_2"):  # the other expert stays frozen, with its own attention
        other = getattr(pipe, name, None)
        if other is not None and other is not transformer:
            other.requires_grad_(False)
    transformer.to(device)
    model_dtype = next(transformer.parameters()).dtype
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps

    # What the dense teacher gives, from the base weights before any training: held-out
    # predictions and validation videos never change, so they are computed once here.
    gap = None
    if held_indices:
        gap = HeldOutGap([dataset[i] for i in held_indices], task, config.eval, config.seed, num_train_timesteps,
                         device, model_dtype)
        with accelerator.autocast():
            gap.set_teacher(lambda inputs: predict(transformer, inputs))
    # Sampling runs the bare model on the main process: impossible when the weights are sharded.
    validate = bool(config.validation.every and config.validation.prompts) and not fsdp and main
    teacher_videos = generate(pipe, config, images, device, accelerator.autocast) if validate else None
    if teacher_videos is not None:
        save_videos(output_dir, "teacher", teacher_videos, config.validation.fps)
    teacher = None
    if t.uses_teacher and not t.lora_rank:
        teacher = DenseTeacher.frozen_copy(transformer, transformer, processor, weight_dtype, accelerator.autocast)
    params = _trainable_setup(transformer, t, config.seed)
    enable(transformer, processor)
    if t.uses_teacher and t.lora_rank:
        teacher = DenseTeacher(transformer, processor)

    def make_optimizer(parameters):
        return torch.optim.AdamW(parameters, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                 weight_decay=t.weight_decay)

    if fsdp:  # FSDP flattens the parameters: the optimizer must see the wrapped ones
        model = accelerator.prepare(transformer)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = accelerator.prepare(make_optimizer(params))
    else:
        model, optimizer = accelerator.prepare(transformer, make_optimizer(params))
    if teacher is not None and teacher.frozen is not None:
        teacher.frozen.to(device)
    ema = None
    if t.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=t.ema_decay)

    state = {"step": 0, "evaluations": []}
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator, config, model, optimizer, ema)
        if main:
            logger.info("resumed from %s at step %d", resume_from, state["step"])
    elif config.resume == "latest" and main:
        logger.info("resume=latest: no checkpoint in %s, starting at step 0", output_dir)
    step, evaluations = int(state["step"]), list(state["evaluations"])

    def evaluate(at_step: int) -> dict:
        """The held-out gap (every process) and the validation videos (main process)."""
        values = {"step": at_step}
        if gap is not None:
            model.eval()
            values.update(gap.measure(lambda inputs: predict(model, inputs)))
            values["heldout_density"] = _mean_density(processor)
            model.train()
        if validate:
            student = generate(pipe, config, images, device, accelerator.autocast)
            videos.extend(save_videos(output_dir, f"step-{at_step:08d}", student, config.validation.fps))
            values.update(compare_videos(student, teacher_videos))
        processor.stats.clear()
        accelerator.wait_for_everyone()
        if main:
            logger.info("evaluation at step %d: %s", at_step,
                        ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float)))
        return values

    world, rank = accelerator.num_processes, accelerator.process_index
    global_size = t.batch_size * world
    c, tt, h, w = train_set.latent_shape
    tokens_per_sample = (tt // task.patch[0]) * (h // task.patch[1]) * (w // task.patch[2])
    log = MetricsLog(output_dir / "logs", main, restart=step == 0)
    losses: list[float] = []
    videos: list[Path] = []
    last_checkpoint, started, stopped_early = resume_from, step, False
    if main:
        logger.info("training %s (%s, %s) with %s, objective %s, from step %d to %d: %d training samples, %d held "
                    "out, %d tokens/sample, %d process(es) x batch %d x accumulation %d", config.model.name, task.kind,
                    f"LoRA r={t.lora_rank}" if t.lora_rank else "full", config.sparse.method, t.objective, step,
                    t.max_steps, len(train_set), len(held_indices), tokens_per_sample, world, t.batch_size,
                    t.grad_accum)
    if step == 0 and (gap is not None or validate):
        evaluations.append(evaluate(0))
        log.log(evaluations[-1])
    every = config.validation.every
    while step < t.max_steps:
        if t.stop_after and step - started >= t.stop_after:
            stopped_early = True
            break
        for group in optimizer.param_groups:
            group["lr"] = t.lr * lr_factor(t, step)
        start = time.perf_counter()
        sums = {"loss": torch.zeros((), device=device)}
        grad_norm = None
        for micro in range(t.grad_accum):
            indices = global_batch(len(train_set), global_size, config.seed, step * t.grad_accum + micro)
            positions = range(rank * t.batch_size, (rank + 1) * t.batch_size)
            batch = train_set.batch([indices[i] for i in positions])
            draws = [draw_sample(seed_of(config.seed, NOISE_STREAM, step, micro, i), train_set.latent_shape, t, task)
                     for i in positions]
            inputs = model_inputs(batch, draws, task, num_train_timesteps, device, model_dtype)
            teacher_prediction = teacher(model, inputs) if teacher is not None else None
            with accelerator.accumulate(model):
                loss, terms = objective_loss(predict(model, inputs), inputs, teacher_prediction, t)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in {"loss": loss, **{f"{k}_loss": v for k, v in terms.items()}}.items():
                sums[key] = sums.get(key, 0) + value.detach() / t.grad_accum
        if ema is not None:
            ema.step(params)
        step += 1
        elapsed = time.perf_counter() - start
        means = {k: float(accelerator.reduce(v, reduction="mean")) for k, v in sums.items()}
        losses.append(means["loss"])
        density = _mean_density(processor)
        row = {"step": step, **means, "lr": optimizer.param_groups[0]["lr"],
               "grad_norm": None if grad_norm is None else float(grad_norm), "density": density,
               "step_time_s": elapsed, "tokens_per_s": global_size * t.grad_accum * tokens_per_sample / elapsed}
        if not math.isfinite(means["loss"]):
            log.log(row)
            raise FloatingPointError(f"loss is {means['loss']} at step {step}")
        evaluated = (gap is not None or validate) and ((every and step % every == 0) or step == t.max_steps)
        if evaluated:
            evaluations.append(evaluate(step))
            row.update(evaluations[-1])
        if evaluated or step % t.log_every == 0 or step == t.max_steps:
            log.log(row)
            if main:
                logger.info("step %d loss %.4g density %s %.2fs/step", step, means["loss"],
                            "-" if density is None else f"{density:.3f}", elapsed)
        if step % t.checkpoint_every == 0 or step == t.max_steps:
            last_checkpoint = save_checkpoint(accelerator, config, step, model, optimizer, ema,
                                              {"evaluations": evaluations})
    final_dir = report = None
    if not stopped_early:
        final_dir, how = save_final(accelerator, model, config, task.component, ema, params)
        if main:
            teacher_info = {
                "attention": "the model's own dense attention, base weights",
                "kind": ("frozen copy of the base" if teacher is not None and teacher.frozen is not None else
                         "the student with LoRA adapters disabled" if teacher is not None else
                         "not used in training (held-out predictions of the base, computed before training)"),
                "extra_parameter_bytes": teacher.extra_parameter_bytes if teacher is not None else 0,
            }
            heldout = {"samples": len(held_indices), "sigmas": gap.sigmas if gap else [],
                       "inputs": len(gap) if gap else 0}
            report = write_report(final_dir / "report.json", train=t, method=config.sparse.method, task=task,
                                  evaluations=evaluations, teacher=teacher_info, heldout=heldout, steps=step,
                                  load=how)
    log.close()
    # gloo frees a finished collective's tensors on its own worker thread, which takes the GIL
    # to do it. Were the DDP wrapper's reducer the last holder of the process group, freeing it
    # would join those threads while holding the GIL: with train.stop_after right after a
    # step's loss reduction, 1 run in 3 on 2 CPU processes deadlocked so as this function
    # returned. So the wrapper goes first (the group is still registered, so nothing joins),
    # after a barrier that leaves the threads time to finish; then end_training destroys the
    # group through its Python binding, which releases the GIL before joining.
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # the accelerator's own references to the wrapper
    del model, evaluate
    gc.collect()
    accelerator.end_training()
    return RunResult(step, stopped_early, output_dir, last_checkpoint, final_dir, losses, videos, evaluations, report)


__all__ = ["RunResult", "check_distributed_type", "check_paths", "train"]
