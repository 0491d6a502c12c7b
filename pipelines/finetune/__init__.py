"""Sparse-aware fine-tuning of a Wan video transformer, launched with accelerate.

::

    accelerate launch -m vdiff_sparse.pipelines.finetune --config configs/finetune/tiny_wan_vmoba.yaml \\
        train.max_steps=200 train.objective=distill sparse.options.vmoba.tau=0.3
    accelerate launch -m vdiff_sparse.pipelines.finetune --config ... --resume latest
    vdiff-sparse finetune --config ...                  # the same, one process

What runs: the trained transformer's self-attention goes through a vdiff_sparse processor
(VMoBA by default with its training settings: threshold selection, global scope, tau = 0.25;
any registered method selectable) for the whole run. The objective (``train.objective``) is
the model's own flow matching on the data, distillation from the dense teacher (the base model
with its own attention: with LoRA the adapters disabled, no second copy of the weights; with
full fine-tuning a frozen copy), or a weighted sum. How far the sparse student is from that
teacher is measured on a fixed held-out set at the start, at every validation and at the end
(``teacher_gap``), with PSNR / SSIM of validation videos against the teacher's of the same seed,
logged to ``logs/metrics.csv`` / tensorboard and written to ``final/report.json``.

Models: Wan 2.1 T2V and I2V, Wan 2.2 TI2V-5B, Wan 2.2 A14B (one expert per run over its own
noise levels), and tiny random stand-ins for each (:mod:`.models`).

Reproducibility and exact resume: nothing depends on hidden RNG state. The data order is a
permutation per epoch seeded by ``(seed, epoch)``; the noise and timestep of every sample are
drawn from a generator seeded by ``(seed, optimizer step, micro-batch, position in the global
batch)``; the learning rate is a function of the step. A run resumed from a checkpoint (JSON and
safetensors only, never a pickle: :mod:`.checkpointing`) therefore takes exactly the steps the
uninterrupted run takes, and a run on P processes with per-process batch b sees the same
samples and noise as one process with batch P*b.

Outputs under ``output_dir``: ``config.yaml``, ``cache/`` (latents), ``checkpoints/step-N``,
``logs/metrics.csv`` (and tensorboard events when tensorboard is installed),
``validation/{teacher,step-N}-i.mp4``, ``final/`` (``transformer/`` (``transformer_2/`` for Wan
2.2's low-noise expert) for full fine-tuning, or ``pytorch_lora_weights.safetensors`` loadable
with ``pipe.load_lora_weights``; ``report.json``).

The package by concern: :mod:`.config` (settings), :mod:`.loading` (YAML and overrides), :mod:`.sparse` (the processor),
:mod:`.models` (which Wan variants and what they take), :mod:`.encoders` (caching clips),
:mod:`.schedule` (seeds, data order, learning rate), :mod:`.objectives` (losses, the dense
teacher), :mod:`.metrics` (logs, held-out gap, report), :mod:`.validation` (videos),
:mod:`.checkpointing` (save, resume, final weights), :mod:`.loop` (:func:`train`), :mod:`.cli`.
"""

from .checkpointing import checkpoints, is_checkpoint, read_checkpoint, resolve_resume
from .cli import main
from .config import (
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    ModelConfig,
    SetupError,
    SparseConfig,
    TrainConfig,
    ValidationConfig,
)
from .loading import config_path, load_config
from .loop import RunResult, check_distributed_type, train
from .metrics import read_metrics
from .models import ModelTask, describe_model, load_pipeline
from .objectives import DenseTeacher, draw_sample, masked_mse, model_inputs, objective_loss, predict
from .schedule import global_batch
from .sparse import check_sparse, training_processor

__all__ = [
    "DataConfig",
    "DenseTeacher",
    "EvalConfig",
    "FinetuneConfig",
    "ModelConfig",
    "ModelTask",
    "RunResult",
    "SetupError",
    "SparseConfig",
    "TrainConfig",
    "ValidationConfig",
    "check_distributed_type",
    "check_sparse",
    "checkpoints",
    "config_path",
    "describe_model",
    "draw_sample",
    "global_batch",
    "is_checkpoint",
    "load_config",
    "load_pipeline",
    "main",
    "masked_mse",
    "model_inputs",
    "objective_loss",
    "predict",
    "read_checkpoint",
    "read_metrics",
    "resolve_resume",
    "train",
    "training_processor",
]
