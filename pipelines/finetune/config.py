"""The settings of a fine-tuning run: documented dataclasses loaded with
``OmegaConf.structured`` (an unknown key or a value of the wrong type fails), each checked
where it is defined (a value out of range names the option and the valid range)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from vdiff_sparse.methods.registry import method_names

OBJECTIVES = ("flow_matching", "distill", "mixed")
EXPERTS = ("high_noise", "low_noise")


class SetupError(ValueError):
    """A run that cannot start as configured (paths, resume folder, model settings); the
    message says what to change. The command line prints it without a traceback."""


def _check(condition: bool, name: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
    right = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
    return f"{left}, {right}"


def check_number(name: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` and the interval unless ``value`` is a finite number
    in it (``None`` bounds are open infinities; NaN and infinities are refused)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    _check(ok, name, value, f"a finite number in {_interval(low, high, low_open, high_open)}")


def _check_frames(name: str, value: int) -> None:
    _check(value >= 1 and (value - 1) % 4 == 0, name, value, "4k + 1 (Wan's VAE compresses time 4x after the first frame)")


def _check_size(name: str, value: int) -> None:
    _check(value >= 16 and value % 16 == 0, name, value, "a positive multiple of 16")


@dataclass
class ModelConfig:
    """The model to fine-tune.

    Attributes:
        name: a tiny random model built offline (``tiny-wan`` Wan 2.1 T2V, ``tiny-wan-i2v``
            Wan 2.1 I2V, ``tiny-wan2.2-ti2v`` Wan 2.2 TI2V, ``tiny-wan2.2-a14b`` Wan 2.2 A14B
            with two experts; see :mod:`vdiff_sparse.pipelines.finetune.models`) or a diffusers
            Wan checkpoint (a local folder or a Hub id): Wan 2.1 T2V / I2V, Wan 2.2 TI2V-5B,
            Wan 2.2 T2V / I2V A14B.
        revision: Hub revision of ``name``.
        expert: for two-expert models (Wan 2.2 A14B), the expert this run trains:
            ``high_noise`` (the pipeline's ``transformer``, timesteps at or above
            ``boundary_ratio``) or ``low_noise`` (``transformer_2``, below it).
    """

    name: str = "tiny-wan"
    revision: Optional[str] = None
    expert: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.expert in (None, *EXPERTS), "model.expert", self.expert, f"null or one of {EXPERTS}")


@dataclass
class DataConfig:
    """Training data: videos + captions (encoded once into ``cache_dir``) or ready latents.

    Attributes:
        video_dir: folder of videos; with ``captions`` (``.jsonl`` or ``.csv``, see
            :mod:`vdiff_sparse.pipelines.data`).
        captions: caption file. Its lines name videos relative to ``video_dir``.
        allow_outside_video_dir: accept caption lines naming files outside ``video_dir`` (an
            absolute path or one climbing out with ``..``); off, such lines are refused with
            their line numbers.
        latents_dir: folder of precomputed ``*.safetensors`` samples (``latents`` ``[C, T, h, w]``
            normalised as the denoiser sees them, ``prompt_embeds`` ``[L, D]``, and for
            image-conditioned models ``condition`` and, for Wan 2.1 I2V, ``image_embeds``);
            replaces ``video_dir``/``captions``.
        cache_dir: where encoded samples go; default ``<output_dir>/cache``.
        num_frames: frames per clip (Wan's VAE wants ``4k + 1``).
        height, width: frame size (multiples of 16; of 32 for Wan 2.2 TI2V's VAE).
        max_text_len: prompt tokens (Wan: 512; image-to-video Wan 2.1 needs 512).
    """

    video_dir: Optional[str] = None
    captions: Optional[str] = None
    allow_outside_video_dir: bool = False
    latents_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    num_frames: int = 81
    height: int = 480
    width: int = 832
    max_text_len: int = 512

    def __post_init__(self) -> None:
        _check_frames("data.num_frames", self.num_frames)
        _check_size("data.height", self.height)
        _check_size("data.width", self.width)
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
        method: a registered method (:func:`vdiff_sparse.methods.method_names`: ``vmoba``
            (default), ``psa``, ``gna``, ``dense`` (the baseline), or one registered by a plug-in).
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
    """Optimisation and objective.

    Attributes:
        objective: ``flow_matching`` (the model's own loss on the data: predict
            ``noise - latents``), ``distill`` (match the dense teacher's prediction on the same
            noisy input, timestep, text and image), or ``mixed``
            (``(1 - distill_weight) * flow_matching + distill_weight * distill``). The teacher
            is the base model with its own dense attention: with LoRA the same weights with
            the adapters off (no copy), with full fine-tuning a frozen copy.
        distill_weight: the weight of the distillation term, ``mixed`` only, in (0, 1).
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
            ``uniform``; the flow sigma is ``shift u / (1 + (shift - 1) u)``, redrawn until it
            falls in the trained expert's range (two-expert models).
        i2v_fraction: the share of samples trained image-to-video (the first frame given) for
            models that do both (Wan 2.2 TI2V); ``None``: 0.5 for those, 1 for image-to-video
            models, 0 for text-to-video ones (the only values those accept).
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

    objective: str = "flow_matching"
    distill_weight: Optional[float] = None
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
    i2v_fraction: Optional[float] = None
    checkpoint_every: int = 500
    checkpoints_keep: int = 2
    log_every: int = 1
    stop_after: int = 0
    cpu: bool = False

    def __post_init__(self) -> None:
        _check(self.objective in OBJECTIVES, "train.objective", self.objective, f"one of {OBJECTIVES}")
        if self.objective == "mixed":
            _check(self.distill_weight is not None, "train.distill_weight", self.distill_weight,
                   "set for objective=mixed (the weight of the distillation term, in (0, 1))")
            check_number("train.distill_weight", self.distill_weight, 0, 1, low_open=True, high_open=True)
        else:
            _check(self.distill_weight is None, "train.distill_weight", self.distill_weight,
                   f"null unless train.objective=mixed (objective is {self.objective!r})")
        for name in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            _check(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "an int >= 1")
        for name in ("lr_warmup_steps", "checkpoints_keep", "stop_after", "lora_rank"):
            _check(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "an int >= 0")
        check_number("train.lr", self.lr, 0, low_open=True)
        check_number("train.weight_decay", self.weight_decay, 0)
        check_number("train.adam_beta1", self.adam_beta1, 0, 1, high_open=True)
        check_number("train.adam_beta2", self.adam_beta2, 0, 1, high_open=True)
        check_number("train.adam_eps", self.adam_eps, 0, low_open=True)
        check_number("train.max_grad_norm", self.max_grad_norm, 0)
        if self.lora_alpha is not None:
            check_number("train.lora_alpha", self.lora_alpha, 0, low_open=True)
        _check(bool(self.lora_targets) or not self.lora_rank, "train.lora_targets", self.lora_targets,
               "a non-empty list of module names when train.lora_rank > 0")
        _check(self.lr_scheduler in ("constant", "linear", "cosine"), "train.lr_scheduler", self.lr_scheduler,
               "constant, linear or cosine")
        _check(self.mixed_precision in (None, "no", "fp16", "bf16"), "train.mixed_precision",
               self.mixed_precision, "no, fp16, bf16 or null")
        check_number("train.ema_decay", self.ema_decay, 0, 1, high_open=True)
        _check(self.timestep_sampling in ("logit_normal", "uniform"), "train.timestep_sampling",
               self.timestep_sampling, "logit_normal or uniform")
        check_number("train.logit_mean", self.logit_mean)
        check_number("train.logit_std", self.logit_std, 0, low_open=True)
        check_number("train.shift", self.shift, 0, low_open=True)
        if self.i2v_fraction is not None:
            check_number("train.i2v_fraction", self.i2v_fraction, 0, 1)
        # Settings that another one makes inert are refused, not ignored.
        _check(self.lora_alpha is None or self.lora_rank > 0, "train.lora_alpha", self.lora_alpha,
               "null with train.lora_rank=0 (full fine-tuning has no adapters to scale)")
        if self.timestep_sampling == "uniform":
            for name, default in (("logit_mean", 0.0), ("logit_std", 1.0)):
                _check(getattr(self, name) == default, f"train.{name}", getattr(self, name),
                       f"its default {default} with train.timestep_sampling=uniform (it shapes logit_normal only)")
        _check(self.lr_warmup_steps <= self.max_steps, "train.lr_warmup_steps", self.lr_warmup_steps,
               f"at most train.max_steps={self.max_steps} (a longer warm-up never reaches train.lr)")

    @property
    def uses_teacher(self) -> bool:
        """Whether the objective needs the dense teacher's prediction at every step."""
        return self.objective != "flow_matching"


@dataclass
class EvalConfig:
    """The held-out measurement of how far the sparse student is from the dense teacher.

    The first ``holdout`` samples of a seeded permutation of the data are kept out of training;
    each is noised at ``num_sigmas`` fixed noise levels (the midpoints of equal slices of the
    trained sigma range) with fixed noise. At the start, at every validation step and at the
    end, the student's predictions on these inputs are compared with the dense teacher's
    (computed once, with the base weights): ``teacher_gap = ||student - teacher|| / ||teacher||``
    over all of them, plus each model's flow-matching loss on them.

    Attributes:
        holdout: samples held out (0: no gap measurement).
        num_sigmas: noise levels per held-out sample.
    """

    holdout: int = 1
    num_sigmas: int = 4

    def __post_init__(self) -> None:
        _check(self.holdout >= 0, "eval.holdout", self.holdout, "an int >= 0")
        _check(self.num_sigmas >= 1, "eval.num_sigmas", self.num_sigmas, "an int >= 1")


@dataclass
class ValidationConfig:
    """Sample videos during training (main process; skipped when the weights are sharded:
    FSDP), compared with the dense teacher's videos of the same seed (PSNR, SSIM).

    Attributes:
        every: every so many steps, at the start and at the end (0: never). The held-out gap
            (:class:`EvalConfig`) is measured at the same steps.
        prompts: one video per prompt.
        images: for image-conditioned models, one image file per prompt (the first frame).
        num_frames, height, width: video size (``None``: the training size).
        steps: denoising steps.
        guidance_scale: classifier-free guidance (at most 1: off).
        fps: of the written mp4.
    """

    every: int = 0
    prompts: List[str] = field(default_factory=list)
    images: List[str] = field(default_factory=list)
    num_frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    steps: int = 30
    guidance_scale: float = 5.0
    fps: int = 16

    def __post_init__(self) -> None:
        _check(self.every >= 0, "validation.every", self.every, "an int >= 0")
        _check(self.steps >= 1, "validation.steps", self.steps, "an int >= 1")
        _check(self.fps >= 1, "validation.fps", self.fps, "an int >= 1")
        check_number("validation.guidance_scale", self.guidance_scale, 0)
        if self.num_frames is not None:
            _check_frames("validation.num_frames", self.num_frames)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                _check_size(f"validation.{name}", getattr(self, name))
        _check(not self.images or len(self.images) == len(self.prompts), "validation.images", self.images,
               f"one image per prompt ({len(self.prompts)} prompts) or empty")


@dataclass
class FinetuneConfig:
    """A fine-tuning run (``OmegaConf.structured``: unknown keys in a YAML file fail).

    Attributes:
        output_dir: checkpoints, logs, cache, samples, the final weights and report.
        seed: seeds the model's random init (tiny models), data order, held-out split, noise
            and timesteps.
        resume: ``None`` (a fresh run: refused if ``output_dir`` already holds checkpoints),
            ``"latest"`` (the newest checkpoint in ``output_dir``, if any) or a checkpoint
            folder ``<output_dir>/checkpoints/step-N``.
    """

    output_dir: str = "runs/finetune"
    seed: int = 0
    resume: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "seed", self.seed, "an int >= 0")


__all__ = [
    "DataConfig",
    "EvalConfig",
    "FinetuneConfig",
    "ModelConfig",
    "SetupError",
    "SparseConfig",
    "TrainConfig",
    "ValidationConfig",
    "check_number",
]
