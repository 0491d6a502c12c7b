"""Sparse-aware fine-tuning of a video transformer, launched with accelerate.

::

    accelerate launch -m vdiff_sparse.pipelines.finetune --config configs/finetune/tiny_wan_vmoba.yaml \\
        train.max_steps=200 sparse.options.vmoba.tau=0.3
    accelerate launch -m vdiff_sparse.pipelines.finetune --config ... --resume latest
    vdiff-sparse finetune --config ...                  # the same, one process

What runs: the model's self-attention goes through a vdiff_sparse processor (VMoBA by default
with its training settings: threshold selection, global scope, tau = 0.25; PSA, GNA and dense
selectable) for the whole run; the objective is the model's own (rectified flow matching for
Wan: ``x_t = (1 - s) x_0 + s e``, target ``e - x_0``, timestep ``1000 s``); full fine-tuning or
LoRA (peft through diffusers' ``add_adapter``).

Reproducibility and exact resume: nothing depends on hidden RNG state. The data order is a
permutation per epoch seeded by ``(seed, epoch)``; the noise and timestep of every sample are
drawn from a generator seeded by ``(seed, optimizer step, micro-batch, position in the global
batch)``; the learning rate is a function of the step. A run resumed from a checkpoint (saved
with ``accelerator.save_state``: model, optimizer, EMA, step; for LoRA only the adapters of the
model, the frozen base being rebuilt from ``model``) therefore takes exactly the steps the
uninterrupted run takes, and a run on P processes with per-process batch b sees the same
samples and noise as one process with batch P*b.

A run without ``resume`` starts fresh and refuses an ``output_dir`` that already holds
checkpoints; ``resume`` takes ``latest`` or a checkpoint folder ``<output_dir>/checkpoints/step-N``.
``sparse.options`` has one section per method (``sparse.options.vmoba.tau=0.3``); only that of
``sparse.method`` is used, and every section given is checked when the config is loaded.

Outputs under ``output_dir``: ``config.yaml``, ``cache/`` (latents), ``checkpoints/step-N``,
``logs/metrics.csv`` (and tensorboard events when tensorboard is installed),
``validation/step-N-i.mp4``, ``final/`` (``transformer/`` for full fine-tuning, or
``pytorch_lora_weights.safetensors`` loadable with ``pipe.load_lora_weights``).
"""

from __future__ import annotations

import argparse
import csv
import functools
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from vdiff_sparse.methods.registry import get_method, method_names
from vdiff_sparse.pipelines.data import LatentDataset, build_cache
from vdiff_sparse.presets import is_model_preset

logger = logging.getLogger("vdiff_sparse.finetune")

TINY_MODEL = "tiny-wan"
_CHECKPOINT_PREFIX = "step-"
_METRICS = ("step", "loss", "lr", "grad_norm", "density", "step_time_s", "tokens_per_s")


# --- configuration -----------------------------------------------------------------------------
def _check(condition: bool, name: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclass
class ModelConfig:
    """The model to fine-tune.

    Attributes:
        name: ``"tiny-wan"`` (the tiny random Wan of :mod:`vdiff_sparse.tiny_models`, offline) or
            a diffusers Wan T2V checkpoint (a local folder or a Hub id, loaded with
            ``WanPipeline.from_pretrained``).
        revision: Hub revision of ``name``.
    """

    name: str = TINY_MODEL
    revision: Optional[str] = None


@dataclass
class DataConfig:
    """Training data: videos + captions (encoded once into ``cache_dir``) or ready latents.

    Attributes:
        video_dir: folder of videos; with ``captions`` (``.jsonl`` or ``.csv``, see
            :mod:`vdiff_sparse.pipelines.data`).
        captions: caption file.
        latents_dir: folder of precomputed ``*.safetensors`` samples (``latents`` ``[C, T, h, w]``
            normalised as the denoiser sees them, ``prompt_embeds`` ``[L, D]``); replaces
            ``video_dir``/``captions``.
        cache_dir: where encoded samples go; default ``<output_dir>/cache``.
        num_frames: frames per clip (Wan's VAE wants ``4k + 1``).
        height, width: frame size (multiples of 16 for Wan).
        max_text_len: prompt tokens (Wan: 512).
    """

    video_dir: Optional[str] = None
    captions: Optional[str] = None
    latents_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    num_frames: int = 81
    height: int = 480
    width: int = 832
    max_text_len: int = 512

    def __post_init__(self) -> None:
        _check(self.num_frames >= 1 and (self.num_frames - 1) % 4 == 0, "data.num_frames", self.num_frames,
               "4k + 1 (Wan's VAE compresses time 4x after the first frame)")
        for name in ("height", "width"):
            value = getattr(self, name)
            _check(value >= 16 and value % 16 == 0, f"data.{name}", value, "a positive multiple of 16")
        _check(self.max_text_len >= 1, "data.max_text_len", self.max_text_len, ">= 1")

    def check_source(self) -> None:
        """Raise ``ValueError`` unless there is data: ``latents_dir``, or ``video_dir`` and
        ``captions``."""
        if not self.latents_dir and not (self.video_dir and self.captions):
            raise ValueError(
                f"no training data: set data.latents_dir, or data.video_dir and data.captions "
                f"(got video_dir={self.video_dir!r}, captions={self.captions!r})"
            )


@dataclass
class SparseConfig:
    """The attention method active while training.

    Attributes:
        method: a registered method: ``vmoba`` (default), ``psa``, ``gna``, ``dense`` (the
            baseline), or one registered by a plug-in.
        preset: a model or method preset of ``configs/`` (``None``: the method's defaults).
        options: processor options per method, ``options.<method>``; only the section of
            ``method`` is used, so one YAML can hold settings for every method and
            ``sparse.method=psa`` switches between them. Each section holds fields of the
            method's config and optionally the schedule's per-layer overrides ``layers``; they
            apply over the preset and the method's training defaults (VMoBA:
            ``mode=threshold, scope=global, tau=0.25``). Dense layers are
            ``sparse.dense_layers`` (every method); ``dense_steps`` is always 0 while training.
        dense_layers: self-attention layers that stay dense, whatever the method (replaces the
            preset's ``dense_layers``).
        backend: ``auto`` (Triton on CUDA, else torch), ``torch``, ``triton`` or ``reference``.
    """

    method: str = "vmoba"
    preset: Optional[str] = None
    options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    dense_layers: List[int] = field(default_factory=list)
    backend: str = "auto"

    def __post_init__(self) -> None:
        from vdiff_sparse.backends import BACKENDS

        methods = method_names()
        _check(self.method in methods, "sparse.method", self.method, f"one of {list(methods)}")
        _check(isinstance(self.options, Mapping) and all(isinstance(v, Mapping) for v in self.options.values()),
               "sparse.options", self.options,
               f"a mapping with one section per method {list(methods)} (e.g. {{'vmoba': {{'tau': 0.3}}}})")
        unknown = sorted(set(self.options) - set(methods))
        _check(not unknown, "sparse.options", self.options,
               f"sections named after methods {list(methods)}; unknown {unknown}")
        backends = ("auto", *BACKENDS)
        _check(self.backend in backends, "sparse.backend", self.backend, f"one of {backends}")


@dataclass
class TrainConfig:
    """Optimisation.

    Attributes:
        max_steps: optimizer steps of the whole run.
        batch_size: samples per process per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr, lr_scheduler, lr_warmup_steps: peak learning rate; ``constant``, ``linear`` (decay to
            0) or ``cosine``, after a linear warm-up.
        weight_decay, adam_beta1, adam_beta2, adam_eps: AdamW.
        max_grad_norm: gradient clipping (0: off).
        mixed_precision: ``no``, ``fp16``, ``bf16``, or ``None`` for accelerate's setting.
        gradient_checkpointing: recompute each block in the backward pass.
        lora_rank: 0 for full fine-tuning, else the LoRA rank.
        lora_alpha: LoRA alpha (default: the rank).
        lora_targets: module names that get LoRA layers.
        ema_decay: 0 (off) or the EMA decay of the trained weights (saved as the final weights).
        timestep_sampling: ``logit_normal`` (u = sigmoid(N(logit_mean, logit_std))) or
            ``uniform``; the flow sigma is ``shift u / (1 + (shift - 1) u)``.
        checkpoint_every: save a checkpoint every so many steps (and at the end).
        checkpoints_keep: checkpoints kept, the one just written included (older ones are
            deleted; 0 keeps all). Checkpoints of later steps than the one written (left by
            the run this one resumed from an earlier checkpoint) are always deleted.
        log_every: log metrics every so many steps.
        stop_after: end this invocation after so many steps *without saving*, as a killed or
            preempted job would (0: off); a later ``resume=latest`` continues from the last
            checkpoint.
        cpu: run on CPU even if CUDA is available.
    """

    max_steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-5
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: Optional[str] = None
    gradient_checkpointing: bool = False
    lora_rank: int = 0
    lora_alpha: Optional[float] = None
    lora_targets: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    ema_decay: float = 0.0
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0
    checkpoint_every: int = 500
    checkpoints_keep: int = 2
    log_every: int = 1
    stop_after: int = 0
    cpu: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            _check(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "an int >= 1")
        for name in ("lr_warmup_steps", "checkpoints_keep", "stop_after", "lora_rank"):
            _check(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "an int >= 0")
        _check(self.lr > 0, "train.lr", self.lr, "> 0")
        _check(self.lr_scheduler in ("constant", "linear", "cosine"), "train.lr_scheduler", self.lr_scheduler,
               "constant, linear or cosine")
        _check(self.mixed_precision in (None, "no", "fp16", "bf16"), "train.mixed_precision",
               self.mixed_precision, "no, fp16, bf16 or null")
        _check(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "in [0, 1)")
        _check(self.timestep_sampling in ("logit_normal", "uniform"), "train.timestep_sampling",
               self.timestep_sampling, "logit_normal or uniform")
        _check(self.shift > 0, "train.shift", self.shift, "> 0")


@dataclass
class ValidationConfig:
    """Sample videos during training (main process; skipped when the weights are sharded:
    FSDP, DeepSpeed ZeRO-3).

    Attributes:
        every: every so many steps, and at the end (0: never).
        prompts: one video per prompt.
        num_frames, height, width: video size (``None``: the training size).
        steps: denoising steps.
        guidance_scale: classifier-free guidance.
        fps: of the written mp4.
    """

    every: int = 0
    prompts: List[str] = field(default_factory=list)
    num_frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    steps: int = 30
    guidance_scale: float = 5.0
    fps: int = 16


@dataclass
class FinetuneConfig:
    """A fine-tuning run (``OmegaConf.structured``: unknown keys in a YAML file fail).

    Attributes:
        output_dir: checkpoints, logs, cache, samples and the final weights.
        seed: seeds the model's random init (tiny model), data order, noise and timesteps.
        resume: ``None`` (a fresh run: refused if ``output_dir`` already holds checkpoints),
            ``"latest"`` (the newest checkpoint in ``output_dir``, if any) or a checkpoint
            folder ``<output_dir>/checkpoints/step-N`` (see :func:`resolve_resume`).
    """

    output_dir: str = "runs/finetune"
    seed: int = 0
    resume: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


def config_path(name: str | os.PathLike) -> Path:
    """A YAML file, or the name of one shipped in ``configs/finetune`` (``"tiny_wan_vmoba"``).

    Raises:
        ValueError: neither exists.
    """
    import importlib.resources

    path = Path(name)
    if path.is_file():
        return path
    file_name = path.name if path.name.endswith(".yaml") else f"{path.name}.yaml"
    shipped = importlib.resources.files("vdiff_sparse.configs") / "finetune" / file_name
    if path.parent == Path(".") and shipped.is_file():
        return Path(str(shipped))
    available = sorted(p.name for p in (importlib.resources.files("vdiff_sparse.configs") / "finetune").iterdir()
                       if p.name.endswith(".yaml"))
    raise ValueError(f"config {str(name)!r} is neither a file nor a shipped config ({available})")


def load_config(path: str | os.PathLike | None = None, overrides: List[str] | None = None) -> FinetuneConfig:
    """The defaults, updated by the YAML file ``path`` (see :func:`config_path`) and
    ``key=value`` ``overrides``.

    Raises:
        ValueError: an unknown key, a value of the wrong type or an invalid setting (the
            ``sparse`` section is checked by building its processor, see :func:`check_sparse`).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.structured(FinetuneConfig)
        if path is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(config_path(path)))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ValueError(f"overrides must be key=value, got {bad}")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        hint = ""
        if str(getattr(e, "full_key", "")).count(".") == 2 and e.full_key.startswith("sparse.options."):
            hint = (f"\nsparse.options has one section per method, {', '.join(method_names())}; e.g. "
                    f"sparse.options.vmoba.tau=0.3")
        raise ValueError(f"fine-tuning config: {e}{hint}") from None
    config.data.check_source()
    check_sparse(config.sparse)
    return config


# --- model -------------------------------------------------------------------------------------
def load_pipeline(model: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                  transformer_dtype: torch.dtype = torch.float32):
    """A diffusers ``WanPipeline`` with the components to train and to encode data: the
    transformer at ``transformer_dtype``, the VAE in float32 (as Wan's own scripts keep it), the
    text encoder at ``dtype``."""
    if model.name == TINY_MODEL:
        from vdiff_sparse.tiny_models import tiny_wan_pipeline

        return tiny_wan_pipeline(seed=seed)
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    kwargs = dict(revision=model.revision)
    transformer = WanTransformer3DModel.from_pretrained(model.name, subfolder="transformer",
                                                        torch_dtype=transformer_dtype, **kwargs)
    vae = AutoencoderKLWan.from_pretrained(model.name, subfolder="vae", torch_dtype=torch.float32, **kwargs)
    return WanPipeline.from_pretrained(model.name, transformer=transformer, vae=vae, torch_dtype=dtype, **kwargs)


def check_trainable_model(pipe) -> None:
    """Refuse the Wan variants whose objective this trainer does not implement.

    Trained: text-to-video Wan transformers (Wan 2.1 T2V 1.3B / 14B; Wan 2.2 TI2V-5B as a
    text-to-video model, whose per-token timesteps all equal the sample's when no image is
    given). Refused: Wan 2.2 A14B, whose two experts (``transformer`` for high noise,
    ``transformer_2`` below ``boundary_ratio``) each train on their own timestep range, and
    image-to-video transformers, which take the image latents and mask as extra input channels
    (and CLIP image embeddings for Wan 2.1 I2V) that the data cache does not hold.

    Raises:
        NotImplementedError: one of the refused variants.
    """
    if getattr(pipe, "transformer_2", None) is not None:
        raise NotImplementedError(
            "Wan 2.2 A14B (two experts, transformer and transformer_2, split at boundary_ratio "
            f"{pipe.config.boundary_ratio}) is not supported: each expert would need its own timestep range"
        )
    config = pipe.transformer.config
    if config.in_channels != config.out_channels or config.image_dim is not None:
        raise NotImplementedError(
            f"image-to-video Wan transformers (in_channels {config.in_channels} vs out_channels "
            f"{config.out_channels}, image_dim {config.image_dim}) are not supported: the image condition is not "
            "cached nor fed to the model; fine-tune a text-to-video checkpoint"
        )


def training_processor(sparse: SparseConfig, method: str | None = None):
    """The processor of ``method`` (default: ``sparse.method``) with training settings and
    statistics on: ``sparse.preset``, then the training defaults, then
    ``sparse.options.<method>``; ``sparse.dense_layers`` dense; no dense warm-up.

    Raises:
        ValueError: an option of that section (or the preset, or a dense layer) is invalid;
            the message names ``sparse.options.<method>``.
    """
    from vdiff_sparse.processors import build_processor

    method = method or sparse.method
    section = f"sparse.options.{method}"
    options = dict(sparse.options.get(method) or {})
    if "dense_layers" in options:
        raise ValueError(f"{section}.dense_layers={options['dense_layers']!r}: give dense layers as "
                         "sparse.dense_layers (they apply to every method)")
    # Training sees random timesteps, so step-based dense warm-up has no meaning here.
    if options.get("dense_steps", 0) != 0:
        raise ValueError(f"{section}.dense_steps must be 0 (training draws a random timestep per sample, "
                         f"there are no denoising steps to warm up on), got {options['dense_steps']!r}")
    options.update(dense_steps=0, dense_layers=list(sparse.dense_layers))
    try:
        return build_processor(method, preset=sparse.preset, backend=sparse.backend, stats=True,
                               settings={**get_method(method).training, **options})
    except ValueError as e:
        raise ValueError(f"{section} (with sparse.preset={sparse.preset!r}, "
                         f"sparse.dense_layers={list(sparse.dense_layers)}): {e}") from None


def check_sparse(sparse: SparseConfig) -> None:
    """Build the processor of ``sparse.method`` and of every other method that has options, so
    that a bad option fails when the config is loaded (not after the data is encoded), even
    in a section not in use.

    Raises:
        ValueError: see :func:`training_processor`.
    """
    for method in method_names():
        if method == sparse.method:
            training_processor(sparse, method)
        elif sparse.options.get(method):
            # A method preset (preset=vmoba) belongs to its own method only; a model preset
            # has a section for every method.
            preset = sparse.preset if is_model_preset(sparse.preset) else None
            training_processor(replace(sparse, preset=preset), method)


def latent_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's per-channel latent mean and std, ``[1, C, 1, 1, 1]``."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    return torch.tensor(vae.config.latents_mean).view(shape), torch.tensor(vae.config.latents_std).view(shape)


def wan_encoders(pipe, max_text_len: int, device: torch.device):
    """``(encode_video, encode_prompt)`` for :func:`build_cache`: VAE mode latents normalised
    as ``WanPipeline`` expects (``(z - mean) / std``), and UMT5 prompt embeddings."""
    mean, std = latent_stats(pipe.vae)

    def encode_video(frames: torch.Tensor) -> torch.Tensor:
        z = pipe.vae.encode(frames.to(device, pipe.vae.dtype)).latent_dist.mode().float().cpu()
        return ((z - mean) / std)[0]

    def encode_prompt(caption: str) -> torch.Tensor:
        embeds, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False,
                                       max_sequence_length=max_text_len, device=device)
        return embeds[0].float().cpu()

    return encode_video, encode_prompt


# --- deterministic randomness ------------------------------------------------------------------
def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (independent streams for different tuples)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


_EPOCH_STREAM, _NOISE_STREAM = 0, 1


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_samples: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed_of(seed, _EPOCH_STREAM, epoch))
    return tuple(torch.randperm(num_samples, generator=g).tolist())


def global_batch(num_samples: int, global_size: int, seed: int, index: int) -> list[int]:
    """Sample indices of global micro-batch ``index`` (``global_size`` samples: all processes
    together). Each epoch is a fresh seeded permutation; the incomplete tail is dropped.

    Raises:
        ValueError: fewer samples than one global micro-batch.
    """
    per_epoch = num_samples // global_size
    if per_epoch == 0:
        raise ValueError(
            f"{num_samples} samples cannot fill one global batch of {global_size} "
            f"(train.batch_size x processes); lower train.batch_size or add data"
        )
    epoch, position = divmod(index, per_epoch)
    return list(_epoch_permutation(num_samples, seed, epoch)[position * global_size:(position + 1) * global_size])


def lr_factor(config: TrainConfig, step: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based)."""
    if step < config.lr_warmup_steps:
        return (step + 1) / config.lr_warmup_steps
    span = max(1, config.max_steps - config.lr_warmup_steps)
    progress = min(1.0, (step - config.lr_warmup_steps) / span)
    if config.lr_scheduler == "linear":
        return 1.0 - progress
    if config.lr_scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def flow_matching_loss(model, latents: torch.Tensor, prompt_embeds: torch.Tensor, seeds: List[int],
                       config: TrainConfig, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Rectified-flow loss of a Wan transformer on a batch.

    Args:
        model: the (wrapped) transformer.
        latents: ``[B, C, T, h, w]`` normalised clean latents.
        prompt_embeds: ``[B, L, D]``.
        seeds: one per sample; sample ``i``'s noise and timestep come from ``seeds[i]`` only.
        config: timestep sampling settings.

    Returns:
        The mean squared error between the prediction and ``noise - latents`` (fp32 scalar).
    """
    noise, u = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        noise.append(torch.randn(latents.shape[1:], generator=g))
        if config.timestep_sampling == "uniform":
            u.append(torch.rand((), generator=g))
        else:
            u.append(torch.sigmoid(config.logit_mean + config.logit_std * torch.randn((), generator=g)))
    noise = torch.stack(noise).to(latents.device)
    u = torch.stack(u).to(latents.device)
    sigma = config.shift * u / (1 + (config.shift - 1) * u)
    s = sigma.view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    pred = model(hidden_states=noisy, timestep=sigma * num_train_timesteps,
                 encoder_hidden_states=prompt_embeds, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())


# --- checkpoints and logs ----------------------------------------------------------------------
@dataclass
class Progress:
    """Checkpointed training position (``accelerator.register_for_checkpointing``)."""

    step: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(_CHECKPOINT_PREFIX):])


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob(f"{_CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(_CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=_step_of)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint folder written by :func:`train`: it holds the saved
    training step (accelerate's ``custom_checkpoint_*.pkl``), whatever the distributed setup."""
    return any(Path(path).glob("custom_checkpoint_*.pkl"))


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder to resume from (``None``: start fresh).

    Args:
        resume: ``None`` (start fresh), ``"latest"`` (the newest checkpoint of ``output_dir``;
            none yet: start fresh) or a checkpoint folder ``<a run's output_dir>/checkpoints/step-N``.
        output_dir: the folder the run writes to.

    Raises:
        ValueError: a fresh start in an ``output_dir`` that already holds checkpoints (its
            pruning and ``"latest"`` would mix the two runs), or ``resume`` is not a checkpoint
            folder (a run's ``output_dir`` is named as such, with its checkpoints).
    """
    if resume in (None, "", "none"):
        existing = checkpoints(output_dir)
        if existing:
            raise ValueError(
                f"output_dir {str(output_dir)!r} already holds checkpoints of an earlier run "
                f"({', '.join(p.name for p in existing)}): continue that run with --resume latest "
                f"(resume=latest), or start a new run in another output_dir (or delete "
                f"{Path(output_dir) / 'checkpoints'} to start over in this one)"
            )
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"resume must be 'latest' or a checkpoint folder, got {resume!r} (not a folder)")
    if is_checkpoint(path):
        return path
    run_dir = path.parent if path.name == "checkpoints" else path
    found = checkpoints(run_dir)
    if found:
        raise ValueError(
            f"resume={resume!r} is a run's folder, not a checkpoint: resume from one of its checkpoints, "
            f"e.g. the newest, resume={str(found[-1])!r} (all: {', '.join(p.name for p in found)}), or "
            f"set output_dir={str(run_dir)!r} with resume=latest"
        )
    raise ValueError(
        f"resume={resume!r} is not a checkpoint folder (no custom_checkpoint_*.pkl in it, nor checkpoints "
        f"under {str(run_dir / 'checkpoints')!r}): give 'latest' or a folder <output_dir>/checkpoints/step-N"
    )


class MetricsLog:
    """Metrics per step to ``<dir>/metrics.csv``, and to tensorboard when it is installed.

    Args:
        directory: where the files go.
        enabled: write anything (the main process).
        restart: begin a new ``metrics.csv`` (a run starting at step 0, so rows already there
            are of a run that left no checkpoint) instead of appending to it (a resumed run).
    """

    def __init__(self, directory: Path, enabled: bool, restart: bool):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "metrics.csv"
        if restart or not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(_METRICS)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(directory))
        except ImportError:
            pass

    def log(self, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([values.get(k, "") for k in _METRICS])
        if self.writer is not None:
            for k in _METRICS[1:]:
                if values.get(k) is not None:
                    self.writer.add_scalar(f"train/{k}", values[k], values["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's ``logs/metrics.csv`` (values as floats; the last row of a step wins)."""
    rows = {}
    with open(Path(output_dir) / "logs" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            values = {k: float(v) for k, v in row.items() if v != ""}
            rows[int(values["step"])] = values
    return [rows[s] for s in sorted(rows)]


# --- validation --------------------------------------------------------------------------------
def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """``[F, H, W, 3]`` floats in [0, 1] to an mp4."""
    import imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(str(path), (np.clip(frames, 0, 1) * 255).round().astype(np.uint8), fps=fps)


def sample_videos(pipe, config: FinetuneConfig, step: int, device, autocast) -> list[Path]:
    """One mp4 per validation prompt with the current weights (processor active)."""
    v = config.validation
    transformer = pipe.transformer
    transformer.eval()
    pipe.vae.to(device)
    pipe.text_encoder.to(device)
    paths = []
    try:
        for i, prompt in enumerate(v.prompts):
            generator = torch.Generator("cpu").manual_seed(seed_of(config.seed, 2, i))
            with torch.no_grad(), autocast():
                out = pipe(
                    prompt=prompt, num_frames=v.num_frames or config.data.num_frames,
                    height=v.height or config.data.height, width=v.width or config.data.width,
                    num_inference_steps=v.steps, guidance_scale=v.guidance_scale, generator=generator,
                    output_type="np", max_sequence_length=config.data.max_text_len,
                )
            path = Path(config.output_dir) / "validation" / f"step-{step:08d}-{i}.mp4"
            write_video(path, np.asarray(out.frames[0], dtype=np.float32), v.fps)
            paths.append(path)
    finally:
        transformer.train()
    return paths


# --- training ----------------------------------------------------------------------------------
def _build_dataset(config: FinetuneConfig, pipe, accelerator) -> LatentDataset:
    data = config.data
    if data.latents_dir:
        return LatentDataset(data.latents_dir)
    cache_dir = data.cache_dir or os.path.join(config.output_dir, "cache")
    device = accelerator.device
    pipe.vae.to(device)
    pipe.text_encoder.to(device)
    encode_video, encode_prompt = wan_encoders(pipe, data.max_text_len, device)
    report = build_cache(
        data.video_dir, data.captions, cache_dir, encode_video=encode_video, encode_prompt=encode_prompt,
        num_frames=data.num_frames, height=data.height, width=data.width,
        # The tiny model's VAE and text encoder are random: their seed is part of what they encode.
        settings={"model": config.model.name, "revision": config.model.revision, "max_text_len": data.max_text_len,
                  "seed": config.seed if config.model.name == TINY_MODEL else None},
        rank=accelerator.process_index, world_size=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
    )
    pipe.vae.to("cpu")
    pipe.text_encoder.to("cpu")
    if accelerator.is_main_process:
        logger.info("data: %s", report.summary())
        for entry in report.missing + report.unreadable:
            logger.warning("skipped %s (captions line %d)", entry.video, entry.line)
    return LatentDataset(report.files)


def _trainable_setup(transformer, config: TrainConfig) -> list[torch.nn.Parameter]:
    if config.lora_rank == 0:
        transformer.requires_grad_(True)
    else:
        from peft import LoraConfig

        transformer.requires_grad_(False)
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


def _save_final(accelerator, model, config: FinetuneConfig, ema, params) -> Path:
    from safetensors.torch import save_file

    final = Path(config.output_dir) / "final"
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if config.train.lora_rank:
            from diffusers import WanPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(unwrapped, state_dict=state))
            # The adapter config travels in the file's metadata: without it load_lora_weights
            # takes lora_alpha = rank, a wrong scale whenever train.lora_alpha differs.
            WanPipeline.save_lora_weights(str(final), transformer_lora_layers=lora,
                                          transformer_lora_adapter_metadata=unwrapped.peft_config["default"].to_dict())
        else:
            target = final / "transformer"
            target.mkdir(parents=True, exist_ok=True)
            unwrapped.save_config(str(target))
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      str(target / "diffusion_pytorch_model.safetensors"))
    if ema is not None:
        ema.restore(params)
    accelerator.wait_for_everyone()
    return final


ADAPTER_CHECKPOINT = "trainable_weights.safetensors"


def _checkpoint_adapters_only(accelerator, model, config: FinetuneConfig) -> None:
    """Make LoRA checkpoints hold the trained parameters (the adapters) instead of the whole
    model; optimizer, EMA and step are saved by accelerate as before.

    The frozen base weights are rebuilt by :func:`load_pipeline` on resume, so the checkpoint
    records what they were built from (model name, revision, the tiny model's seed, the LoRA
    settings) and loading refuses a checkpoint of another base. Names are those of the bare
    model, so a checkpoint does not depend on the number of processes.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    bare = accelerator.unwrap_model(model)
    trainable = {n: p for n, p in bare.named_parameters() if p.requires_grad}
    t = config.train
    identity = {
        "model": config.model.name, "revision": str(config.model.revision),
        "seed": str(config.seed) if config.model.name == TINY_MODEL else "",
        "lora": f"rank={t.lora_rank} alpha={t.lora_alpha or t.lora_rank} targets={sorted(t.lora_targets)}",
    }

    def index_of_model(models) -> int:
        # accelerate lists the model wrapped (DDP on GPUs) or bare (DDP on CPU).
        return next(i for i, m in enumerate(models) if accelerator.unwrap_model(m) is bare)

    def save(models, weights, output_dir):
        weights.pop(index_of_model(models))  # so that accelerate does not write the whole model
        if accelerator.is_main_process:
            save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()},
                      os.path.join(output_dir, ADAPTER_CHECKPOINT), metadata=identity)

    def load(models, input_dir):
        models.pop(index_of_model(models))  # accelerate would expect the whole model
        path = os.path.join(input_dir, ADAPTER_CHECKPOINT)
        if not os.path.isfile(path):
            raise ValueError(f"{input_dir} holds no {ADAPTER_CHECKPOINT}: not a checkpoint of a LoRA run")
        with safe_open(path, "pt") as f:
            saved = f.metadata() or {}
            state = {n: f.get_tensor(n) for n in f.keys()}
        differs = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
        if differs:
            raise ValueError(f"{input_dir} was trained on another base or LoRA setting (saved, now): {differs}")
        if state.keys() != trainable.keys():
            raise ValueError(f"{path}: adapter names differ from this model's "
                             f"({sorted(state.keys() ^ trainable.keys())[:5]})")
        with torch.no_grad():
            for name, value in state.items():
                trainable[name].copy_(value)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _save_checkpoint(accelerator, config: FinetuneConfig, step: int) -> Path:
    root = Path(config.output_dir) / "checkpoints"
    final = root / f"{_CHECKPOINT_PREFIX}{step:08d}"
    partial = root / f".partial-{step:08d}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    # Only whole checkpoints carry the step-N name, so "latest" never picks a torn one.
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        found = checkpoints(config.output_dir)
        # Later steps are of the run this one left by resuming from an earlier checkpoint: gone,
        # so that "latest" is this run's newest.
        later = [p for p in found if _step_of(p) > step]
        if later:
            logger.warning("removing checkpoints %s, later than step %d of this run",
                           [p.name for p in later], step)
        keep = config.train.checkpoints_keep
        earlier = [p for p in found if _step_of(p) < step]
        for old in later + (earlier[:max(0, len(earlier) - keep + 1)] if keep else []):
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


@dataclass
class RunResult:
    """What :func:`train` did."""

    step: int
    stopped_early: bool
    output_dir: Path
    last_checkpoint: Optional[Path]
    final_dir: Optional[Path]
    losses: List[float]
    validation_videos: List[Path]


# What `accelerate launch` exports for an FSDP or DeepSpeed config, and the setup it should give.
_REQUESTED_BACKENDS = (("FSDP", "ACCELERATE_USE_FSDP", "FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED", "DEEPSPEED"))


def check_distributed_type(distributed, environ=os.environ) -> None:
    """Refuse a launch whose accelerate config asks for FSDP or DeepSpeed but which accelerate
    set up otherwise.

    accelerate (1.15) selects FSDP only on top of an accelerator process group (CUDA, XPU, ...)
    and DeepSpeed only with ``cpu=False``; on a machine without GPUs it runs such a config as
    plain DDP over gloo without a word, so a run believed sharded would not be.

    Raises:
        NotImplementedError: the requested backend is not the one running.
    """
    for name, variable, wanted in _REQUESTED_BACKENDS:
        if environ.get(variable, "false").lower() == "true" and distributed.value != wanted:
            raise NotImplementedError(
                f"the accelerate config asks for {name}, but accelerate set up {distributed.value}: it runs "
                f"{name} on GPUs only (see configs/finetune/README.md); on CPU use "
                f"configs/finetune/accelerate/cpu_ddp.yaml"
            )


def train(config: FinetuneConfig) -> RunResult:
    """Run (or resume) the fine-tuning described by ``config`` in the current process group
    (one process, or every process of an ``accelerate launch``)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from vdiff_sparse.integration import enable

    t = config.train
    config.data.check_source()
    # Settings and the output folder are checked before the model loads and the data is encoded.
    processor = training_processor(config.sparse)
    output_dir = Path(config.output_dir)
    resume_from = resolve_resume(config.resume, output_dir)
    accelerator = Accelerator(cpu=t.cpu or not torch.cuda.is_available(), mixed_precision=t.mixed_precision,
                              gradient_accumulation_steps=t.grad_accum)
    distributed = accelerator.distributed_type
    check_distributed_type(distributed)
    fsdp = distributed == DistributedType.FSDP
    deepspeed = distributed == DistributedType.DEEPSPEED
    if t.ema_decay and (fsdp or deepspeed):
        raise NotImplementedError("train.ema_decay with FSDP or DeepSpeed (sharded weights) is not supported")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if accelerator.is_main_process:
        from omegaconf import OmegaConf

        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(config), output_dir / "config.yaml")

    # Full fine-tuning keeps fp32 master weights; LoRA trains fp32 adapters on frozen weights
    # stored at the mixed-precision dtype.
    pipe = load_pipeline(config.model, seed=config.seed, dtype=weight_dtype,
                         transformer_dtype=weight_dtype if t.lora_rank else torch.float32)
    check_trainable_model(pipe)
    dataset = _build_dataset(config, pipe, accelerator)
    transformer = pipe.transformer
    params = _trainable_setup(transformer, t)
    enable(pipe, processor)
    model_dtype = next(transformer.parameters()).dtype

    def make_optimizer(parameters):
        return torch.optim.AdamW(parameters, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                 weight_decay=t.weight_decay)

    if deepspeed:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.batch_size
    if fsdp:  # FSDP flattens the parameters: the optimizer must see the wrapped ones
        model = accelerator.prepare(transformer)
        optimizer = accelerator.prepare(make_optimizer([p for p in model.parameters() if p.requires_grad]))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        model, optimizer = accelerator.prepare(transformer, make_optimizer(params))
        if t.lora_rank and not deepspeed:  # DeepSpeed writes its own (full) checkpoints
            _checkpoint_adapters_only(accelerator, model, config)

    ema = None
    if t.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=t.ema_decay)
        accelerator.register_for_checkpointing(ema)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)

    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        if accelerator.is_main_process:
            logger.info("resumed from %s at step %d", resume_from, progress.step)
    elif config.resume == "latest" and accelerator.is_main_process:
        logger.info("resume=latest: no checkpoint in %s, starting at step 0", output_dir)

    world = accelerator.num_processes
    rank = accelerator.process_index
    global_size = t.batch_size * world
    patch = tuple(transformer.config.patch_size)
    c, tt, h, w = dataset.latent_shape
    tokens_per_sample = (tt // patch[0]) * (h // patch[1]) * (w // patch[2])
    log = MetricsLog(output_dir / "logs", accelerator.is_main_process, restart=progress.step == 0)
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps
    # Sampling runs the bare model on the main process: impossible when the weights are sharded.
    sharded = fsdp or (deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3)
    validate = bool(config.validation.every and config.validation.prompts) and not sharded and accelerator.is_main_process

    losses: list[float] = []
    videos: list[Path] = []
    last_checkpoint = resume_from
    started = progress.step
    stopped_early = False
    if accelerator.is_main_process:
        logger.info(
            "training %s (%s) with %s from step %d to %d: %d samples, %d tokens/sample, %d process(es) x "
            "batch %d x accumulation %d", config.model.name, "LoRA r=%d" % t.lora_rank if t.lora_rank else "full",
            config.sparse.method, started, t.max_steps, len(dataset), tokens_per_sample, world, t.batch_size,
            t.grad_accum,
        )
    while progress.step < t.max_steps:
        if t.stop_after and progress.step - started >= t.stop_after:
            stopped_early = True
            break
        step = progress.step
        for group in optimizer.param_groups:
            group["lr"] = t.lr * lr_factor(t, step)
        start = time.perf_counter()
        step_loss = torch.zeros((), device=accelerator.device)
        grad_norm = None
        for micro in range(t.grad_accum):
            indices = global_batch(len(dataset), global_size, config.seed, step * t.grad_accum + micro)
            positions = range(rank * t.batch_size, (rank + 1) * t.batch_size)
            batch = dataset.batch([indices[i] for i in positions])
            seeds = [seed_of(config.seed, _NOISE_STREAM, step, micro, i) for i in positions]
            with accelerator.accumulate(model):
                loss = flow_matching_loss(
                    model, batch["latents"].to(accelerator.device, model_dtype),
                    batch["prompt_embeds"].to(accelerator.device, model_dtype), seeds, t, num_train_timesteps,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / t.grad_accum
        if ema is not None:
            ema.step(params)
        progress.step = step + 1
        elapsed = time.perf_counter() - start
        mean_loss = float(accelerator.reduce(step_loss, reduction="mean"))
        losses.append(mean_loss)
        records = processor.stats.records
        density = sum(r.density for r in records) / len(records) if records else float("nan")
        processor.stats.clear()
        if progress.step % t.log_every == 0 or progress.step == t.max_steps:
            log.log({
                "step": progress.step, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": None if grad_norm is None else float(grad_norm), "density": density,
                "step_time_s": elapsed, "tokens_per_s": global_size * t.grad_accum * tokens_per_sample / elapsed,
            })
            if accelerator.is_main_process:
                logger.info("step %d loss %.4f density %.3f %.2fs/step", progress.step, mean_loss, density, elapsed)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"loss is {mean_loss} at step {progress.step}")
        if progress.step % t.checkpoint_every == 0 or progress.step == t.max_steps:
            last_checkpoint = _save_checkpoint(accelerator, config, progress.step)
        if validate and (progress.step % config.validation.every == 0 or progress.step == t.max_steps):
            videos += sample_videos(pipe, config, progress.step, accelerator.device, accelerator.autocast)
            processor.stats.clear()
        accelerator.wait_for_everyone()
    final_dir = None
    if not stopped_early:
        final_dir = _save_final(accelerator, model, config, ema, params)
    log.close()
    accelerator.end_training()
    return RunResult(progress.step, stopped_early, output_dir, last_checkpoint, final_dir, losses, videos)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``[--config FILE] [--resume latest|DIR] [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="vdiff-sparse finetune",
        description="Sparse-aware fine-tuning (run under `accelerate launch -m vdiff_sparse.pipelines.finetune` "
                    "for several processes). Overrides are OmegaConf dot-keys, e.g. train.max_steps=100.",
    )
    parser.add_argument("--config", help="training YAML, or the name of one in configs/finetune/ (tiny_wan_vmoba, "
                                         "wan2.1-1.3b_vmoba, wan2.1-1.3b_vmoba_lora)")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder OUTPUT_DIR/checkpoints/step-N (same as "
                                         "resume=...); without it, output_dir must hold no checkpoints")
    parser.add_argument("overrides", nargs="*", help="key=value settings")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides) + ([f"resume={args.resume}"] if args.resume else [])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, overrides)
    except ValueError as e:
        parser.error(str(e))
    result = train(config)
    if result.stopped_early:
        logger.info("stopped after step %d (train.stop_after); resume with resume=latest", result.step)
    return 0


__all__ = [
    "DataConfig",
    "FinetuneConfig",
    "ModelConfig",
    "RunResult",
    "SparseConfig",
    "TrainConfig",
    "ValidationConfig",
    "check_distributed_type",
    "check_sparse",
    "check_trainable_model",
    "checkpoints",
    "config_path",
    "flow_matching_loss",
    "global_batch",
    "is_checkpoint",
    "load_config",
    "main",
    "training_processor",
    "read_metrics",
    "resolve_resume",
    "train",
]

if __name__ == "__main__":
    raise SystemExit(main())
