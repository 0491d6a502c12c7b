"""What a training step minimises.

Rectified flow (Wan): a clean sample ``x_0`` (normalised latents ``[B, C, T, h, w]``) and noise
``e`` at flow sigma ``s`` give the input ``x_s = (1 - s) x_0 + s e`` at timestep ``1000 s``,
and the model predicts the velocity ``e - x_0``.

* ``flow_matching``: mean squared error between the student's prediction and ``e - x_0``.
* ``distill``: mean squared error between the student's prediction and the dense teacher's on
  the same input, timestep, text and image (the teacher is the base model with the model's own
  dense attention: :class:`DenseTeacher`).
* ``mixed``: ``(1 - w) * flow_matching + w * distill``.

Frames given as the image condition (Wan 2.2 TI2V image-to-video: the first latent frame, clean,
at timestep 0) are left out of every loss.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .config import TrainConfig
from .models import ModelTask

_MAX_SIGMA_DRAWS = 10_000


@dataclass
class Draw:
    """The random part of one training sample: ``noise`` ``[C, T, h, w]``, flow ``sigma`` and
    whether the sample is trained image-to-video (``image``; TI2V models)."""

    noise: torch.Tensor
    sigma: float
    image: bool


def _sigma(train: TrainConfig, g: torch.Generator) -> torch.Tensor:
    if train.timestep_sampling == "uniform":
        u = torch.rand((), generator=g)
    else:
        u = torch.sigmoid(train.logit_mean + train.logit_std * torch.randn((), generator=g))
    return train.shift * u / (1 + (train.shift - 1) * u)


def draw_sample(seed: int, latent_shape: Sequence[int], train: TrainConfig, task: ModelTask) -> Draw:
    """Noise, sigma and task of one sample, from a generator seeded with ``seed`` only. Sigmas
    outside the trained expert's range are drawn again (the timestep distribution restricted
    to the range).

    Raises:
        ValueError: the sampling settings put (almost) no mass in the expert's range.
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(tuple(latent_shape), generator=g)
    low, high = task.sigma_range
    for _ in range(_MAX_SIGMA_DRAWS):
        sigma = float(_sigma(train, g))
        if low <= sigma < high:
            break
    else:
        raise ValueError(f"train.timestep_sampling={train.timestep_sampling!r} (shift {train.shift}, logit mean "
                         f"{train.logit_mean}, std {train.logit_std}) drew no sigma in the expert's range "
                         f"[{low}, {high}) in {_MAX_SIGMA_DRAWS} draws")
    fraction = task.i2v_fraction
    image = fraction == 1.0 or (0.0 < fraction and float(torch.rand((), generator=g)) < fraction)
    return Draw(noise, sigma, image)


@dataclass
class ModelInputs:
    """One batch as the transformer takes it.

    Attributes:
        kwargs: the forward's keyword arguments (``hidden_states``, ``timestep``,
            ``encoder_hidden_states``, ``encoder_hidden_states_image`` for Wan 2.1 I2V).
        target: the flow-matching target ``noise - latents`` ``[B, C, T, h, w]`` (float32).
        weight: ``[B, 1, T, 1, 1]``, 1 on frames the loss counts and 0 on given frames, or
            ``None`` when every frame counts.
    """

    kwargs: Dict[str, torch.Tensor]
    target: torch.Tensor
    weight: Optional[torch.Tensor]


def model_inputs(batch: Dict[str, torch.Tensor], draws: List[Draw], task: ModelTask, num_train_timesteps: int,
                 device, dtype: torch.dtype) -> ModelInputs:
    """The noisy inputs of ``batch`` (stacked samples with the keys of ``task.sample_keys``)
    under ``draws`` (one per sample)."""
    latents = batch["latents"].to(device, torch.float32)
    noise = torch.stack([d.noise for d in draws]).to(device)
    sigma = torch.tensor([d.sigma for d in draws], device=device)
    s = sigma.view(-1, 1, 1, 1, 1)
    hidden = (1 - s) * latents + s * noise
    timestep = sigma * num_train_timesteps
    weight = None
    if task.kind == "i2v":
        hidden = torch.cat([hidden, batch["condition"].to(device, torch.float32)], dim=1)
    elif task.kind == "ti2v":
        given = torch.tensor([d.image for d in draws], device=device)
        hidden[given, :, :1] = batch["condition"].to(device, torch.float32)[given]
        # One timestep per token, frame-major: 0 on the tokens of a given first frame.
        _, _, frames, h, w = latents.shape
        per_frame = (h // task.patch[1]) * (w // task.patch[2])
        timestep = timestep[:, None].repeat(1, frames * per_frame)
        timestep[given, :per_frame] = 0
        weight = torch.ones(len(draws), 1, frames, 1, 1, device=device)
        weight[given, :, 0] = 0
    kwargs = {"hidden_states": hidden.to(dtype), "timestep": timestep,
              "encoder_hidden_states": batch["prompt_embeds"].to(device, dtype)}
    if task.image_tokens:
        kwargs["encoder_hidden_states_image"] = batch["image_embeds"].to(device, dtype)
    return ModelInputs(kwargs, noise - latents, weight)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean squared error over the elements ``weight`` counts (all when ``None``), in float32."""
    diff2 = (prediction.float() - target.float()) ** 2
    if weight is None:
        return diff2.mean()
    weight = weight.expand_as(diff2)
    return (diff2 * weight).sum() / weight.sum()


def objective_loss(prediction: torch.Tensor, inputs: ModelInputs, teacher_prediction: Optional[torch.Tensor],
                   train: TrainConfig) -> tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The loss of ``train.objective`` and its terms (``flow_matching``, ``distill``)."""
    terms = {}
    if train.objective in ("flow_matching", "mixed"):
        terms["flow_matching"] = masked_mse(prediction, inputs.target, inputs.weight)
    if train.objective in ("distill", "mixed"):
        terms["distill"] = masked_mse(prediction, teacher_prediction, inputs.weight)
    if train.objective == "mixed":
        w = train.distill_weight
        return (1 - w) * terms["flow_matching"] + w * terms["distill"], terms
    return next(iter(terms.values())), terms


def predict(model: torch.nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """The transformer's prediction ``[B, C, T, h, w]``."""
    return model(**inputs.kwargs, return_dict=False)[0]


class DenseTeacher:
    """The base model with the model's own dense attention, for distillation.

    With LoRA the teacher is the student's own module with the adapters disabled and the
    vdiff_sparse processor detached for the call (``vdiff_sparse.disable`` / ``enable``): the
    same weight tensors, no second copy. With full fine-tuning the trained weights move away
    from the base, so the teacher is a frozen copy of the base taken before training, at the
    weights' storage dtype (its memory is :attr:`extra_parameter_bytes`).

    Args:
        student: the bare (unwrapped) transformer being trained.
        processor: the student's processor, put back after each teacher call.
        frozen: the frozen copy (full fine-tuning), or ``None`` (LoRA).
        autocast: the mixed-precision context of the run (for the frozen copy, whose forward
            accelerate has not wrapped).
    """

    def __init__(self, student: torch.nn.Module, processor, frozen: Optional[torch.nn.Module] = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.student = student
        self.processor = processor
        self.frozen = frozen
        self.autocast = autocast

    @classmethod
    def frozen_copy(cls, base: torch.nn.Module, student: torch.nn.Module, processor, dtype: torch.dtype,
                    autocast=contextlib.nullcontext) -> "DenseTeacher":
        """A teacher holding a frozen copy of ``base`` (taken before any training step and
        before a processor is attached, so it runs the model's own attention)."""
        frozen = copy.deepcopy(base).requires_grad_(False).eval()
        if next(frozen.parameters()).dtype != dtype:
            frozen.to(dtype=dtype)
        return cls(student, processor, frozen, autocast)

    @property
    def extra_parameter_bytes(self) -> int:
        """Bytes of weights the teacher holds beyond the student's (0 with LoRA)."""
        if self.frozen is None:
            return 0
        return sum(p.numel() * p.element_size() for p in self.frozen.parameters())

    @contextlib.contextmanager
    def _base_weights_dense(self):
        from vdiff_sparse.integration import disable, enable

        disable(self.student)
        self.student.disable_adapters()
        try:
            yield
        finally:
            self.student.enable_adapters()
            enable(self.student, self.processor)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, inputs: ModelInputs) -> torch.Tensor:
        """The teacher's prediction on ``inputs``; ``model`` is the student as the run calls
        it (wrapped by DDP / FSDP), through which the LoRA teacher runs."""
        if self.frozen is not None:
            with self.autocast():
                return predict(self.frozen, inputs)
        with self._base_weights_dense():
            return predict(model, inputs)


__all__ = ["DenseTeacher", "Draw", "ModelInputs", "draw_sample", "masked_mse", "model_inputs",
           "objective_loss", "predict"]
