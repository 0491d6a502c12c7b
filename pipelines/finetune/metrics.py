"""What a run measures and where it goes: per-step metrics (``logs/metrics.csv``, tensorboard),
the held-out gap to the dense teacher, and the final ``report.json``."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .config import EvalConfig, TrainConfig
from .models import ModelTask
from .objectives import Draw, ModelInputs, masked_mse, model_inputs
from .schedule import HELDOUT_NOISE_STREAM, seed_of

METRICS = ("step", "loss", "flow_matching_loss", "distill_loss", "lr", "grad_norm", "density", "step_time_s",
           "tokens_per_s", "teacher_gap", "student_heldout_loss", "teacher_heldout_loss", "heldout_density", "psnr_db",
           "ssim")


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
                csv.writer(f).writerow(METRICS)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(directory))
        except ImportError:
            pass

    def log(self, values: dict) -> None:
        """One row; missing values are left empty."""
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(["" if values.get(k) is None else values[k] for k in METRICS])
        if self.writer is not None:
            for k in METRICS[1:]:
                if values.get(k) is not None:
                    group = "eval" if k in _EVALUATION_KEYS else "train"
                    self.writer.add_scalar(f"{group}/{k}", values[k], values["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


_EVALUATION_KEYS = ("teacher_gap", "student_heldout_loss", "teacher_heldout_loss", "heldout_density", "psnr_db", "ssim")


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run's ``logs/metrics.csv`` (values as floats, empty ones left out; the
    last row of a step wins)."""
    rows = {}
    with open(Path(output_dir) / "logs" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            values = {k: float(v) for k, v in row.items() if v != ""}
            rows[int(values["step"])] = values
    return [rows[s] for s in sorted(rows)]


def heldout_sigmas(task: ModelTask, count: int) -> list[float]:
    """``count`` noise levels: the midpoints of equal slices of the trained sigma range."""
    low, high = task.sigma_range
    return [low + (high - low) * (j + 0.5) / count for j in range(count)]


class HeldOutGap:
    """The held-out inputs (:class:`~vdiff_sparse.pipelines.finetune.config.EvalConfig`) and
    the dense teacher's predictions on them.

    Args:
        samples: the held-out samples (dicts of the model's sample tensors, unbatched).
        task: the trained model's task (inputs, sigma range).
        settings: the eval settings (noise levels per sample).
        seed: the run's seed; the noise of sample ``i`` at level ``j`` is seeded by
            ``(seed, i, j)``, so every evaluation sees the same inputs.
        num_train_timesteps: the scheduler's timestep scale.
        device, dtype: where and at which dtype the model takes its inputs.
    """

    def __init__(self, samples: List[Dict[str, torch.Tensor]], task: ModelTask, settings: EvalConfig, seed: int,
                 num_train_timesteps: int, device, dtype: torch.dtype):
        self.inputs: List[ModelInputs] = []
        sigmas = heldout_sigmas(task, settings.num_sigmas)
        for i, sample in enumerate(samples):
            for j, sigma in enumerate(sigmas):
                g = torch.Generator().manual_seed(seed_of(seed, HELDOUT_NOISE_STREAM, i, j))
                noise = torch.randn(tuple(sample["latents"].shape), generator=g)
                # TI2V trains both tasks: the held-out points alternate between them.
                image = task.i2v_fraction == 1.0 or (0.0 < task.i2v_fraction and j % 2 == 0)
                batch = {k: v[None] for k, v in sample.items()}
                self.inputs.append(model_inputs(batch, [Draw(noise, sigma, image)], task, num_train_timesteps,
                                                device, dtype))
        self.sigmas = sigmas
        self.teacher: List[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.inputs)

    @torch.no_grad()
    def predictions(self, forward: Callable[[ModelInputs], torch.Tensor]) -> List[torch.Tensor]:
        """``forward`` on every held-out input, in float32."""
        return [forward(inputs).float() for inputs in self.inputs]

    def set_teacher(self, forward: Callable[[ModelInputs], torch.Tensor]) -> None:
        """Compute and keep the dense teacher's predictions (they never change)."""
        self.teacher = self.predictions(forward)

    def measure(self, forward: Callable[[ModelInputs], torch.Tensor]) -> Dict[str, object]:
        """``teacher_gap`` = ``||student - teacher|| / ||teacher||`` over every held-out input
        (given frames left out), the same per noise level (``teacher_gap_by_sigma``: sigma
        ``"%.4f"`` -> gap; the overall gap lies between the smallest and largest of them), and
        the mean flow-matching loss of student and teacher."""
        student = self.predictions(forward)
        levels = len(self.sigmas)  # the inputs are sample-major: input i is at level i % levels
        diff, norm = [0.0] * levels, [0.0] * levels
        for i, (s, t, x) in enumerate(zip(student, self.teacher, self.inputs)):
            diff[i % levels] += _weighted_sq(s - t, x.weight)
            norm[i % levels] += _weighted_sq(t, x.weight)
        return {
            "teacher_gap": _ratio(sum(diff), sum(norm)),
            "teacher_gap_by_sigma": {f"{sigma:.4f}": _ratio(d, n) for sigma, d, n in zip(self.sigmas, diff, norm)},
            "student_heldout_loss": _mean_loss(student, self.inputs),
            "teacher_heldout_loss": _mean_loss(self.teacher, self.inputs),
        }


def _ratio(diff: float, norm: float) -> float:
    return math.sqrt(diff / norm) if norm > 0 else float("nan")


def _weighted_sq(x: torch.Tensor, weight: Optional[torch.Tensor]) -> float:
    x2 = x.double() ** 2
    return float(x2.sum() if weight is None else (x2 * weight.double()).sum())


def _mean_loss(predictions: List[torch.Tensor], inputs: List[ModelInputs]) -> float:
    return sum(float(masked_mse(p, x.target, x.weight)) for p, x in zip(predictions, inputs)) / len(inputs)


def gap_summary(evaluations: List[dict]) -> dict:
    """``*_before`` / ``*_after`` of each measured quantity: its value at the first and last
    evaluation that has it."""
    summary = {}
    for key in _EVALUATION_KEYS:
        values = [e[key] for e in evaluations if e.get(key) is not None]
        if values:
            summary[f"{key}_before"], summary[f"{key}_after"] = values[0], values[-1]
    return summary


def write_report(path: Path, *, train: TrainConfig, method: str, task: ModelTask, evaluations: List[dict],
                 teacher: dict, heldout: dict, steps: int, load: str) -> Path:
    """``report.json``: the objective, the teacher, the held-out set, every evaluation (step 0
    is before training) and ``teacher_gap_before`` / ``teacher_gap_after`` (and the same for
    the held-out losses, the student's attention density on the held-out inputs, and
    validation PSNR / SSIM against the teacher's videos), and how to load the weights."""
    summary = gap_summary(evaluations)
    before, after = summary.get("teacher_gap_before"), summary.get("teacher_gap_after")
    report = {
        "objective": train.objective, "distill_weight": train.distill_weight,
        "fine_tuning": f"LoRA rank {train.lora_rank}" if train.lora_rank else "full",
        "method": method, "steps": steps, "load": load,
        "model": {"kind": task.kind, "component": task.component, "sigma_range": list(task.sigma_range)},
        "teacher": teacher, "heldout": heldout,
        **summary,
        "teacher_gap_ratio": after / before if before and after is not None else None,
        "evaluations": evaluations,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    return path


__all__ = ["HeldOutGap", "METRICS", "MetricsLog", "gap_summary", "heldout_sigmas", "read_metrics", "write_report"]
