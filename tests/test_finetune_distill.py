"""Objectives and the dense teacher: what each loss computes, that the LoRA teacher is the base
model with its own attention and no copy of the weights, and the held-out gap."""

from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path

import pytest
import torch

from finetune_support import LORA, TINY_CONFIG, run, write_dataset
from vdiff_sparse.pipelines import finetune as ft
from vdiff_sparse.pipelines.finetune.models import ModelTask

T2V = ModelTask("t2v", "transformer", (0.0, 1.0), False, 0.0, (1, 2, 2))


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("videos"))


def _student(method: str, lora: bool, seed: int = 0):
    """The tiny transformer as the trainer sets it up: a teacher, then adapters and processor."""
    from peft import LoraConfig

    from vdiff_sparse.integration import enable

    config = ft.load_config(TINY_CONFIG, ["data.latents_dir=unused", f"sparse.method={method}"])
    processor = ft.training_processor(config.sparse)
    model = ft.load_pipeline(ft.ModelConfig(), seed=seed).transformer
    teacher = None if lora else ft.DenseTeacher.frozen_copy(model, model, processor, torch.float32)
    if lora:
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=True, target_modules=["to_q", "to_k"]))
    enable(model, processor)
    return model, teacher or ft.DenseTeacher(model, processor), processor


def _batch(seed: int = 0, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(batch, 16, 3, 6, 10, generator=g), "prompt_embeds": torch.randn(batch, 16, 32, generator=g)}


def _inputs(seed: int = 0, batch: int = 2) -> ft.objectives.ModelInputs:
    draws = [ft.draw_sample(seed + i, (16, 3, 6, 10), ft.TrainConfig(), T2V) for i in range(batch)]
    return ft.model_inputs(_batch(seed, batch), draws, T2V, 1000, "cpu", torch.float32)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_distill_loss_is_zero_when_student_and_teacher_are_the_same_dense_model(lora):
    model, teacher, _ = _student("dense", lora)
    inputs = _inputs()
    student = ft.predict(model, inputs)
    loss, terms = ft.objective_loss(student, inputs, teacher(model, inputs), ft.TrainConfig(objective="distill"))
    assert loss.item() == 0.0 and set(terms) == {"distill"}
    # ... and not zero once the student is sparse.
    model, teacher, _ = _student("vmoba", lora)
    loss, _ = ft.objective_loss(ft.predict(model, inputs), inputs, teacher(model, inputs), ft.TrainConfig(objective="distill"))
    assert loss.item() > 1e-6


def test_objectives_compute_what_they_say():
    inputs = _inputs()
    prediction, teacher = torch.randn_like(inputs.target), torch.randn_like(inputs.target)
    fm = ((prediction - inputs.target) ** 2).mean()
    distill = ((prediction - teacher) ** 2).mean()
    cases = {"flow_matching": fm, "distill": distill, "mixed": 0.75 * fm + 0.25 * distill}
    for objective, expected in cases.items():
        train = ft.TrainConfig(objective=objective, distill_weight=0.25 if objective == "mixed" else None)
        loss, terms = ft.objective_loss(prediction, inputs, teacher, train)
        torch.testing.assert_close(loss, expected)
    assert set(terms) == {"flow_matching", "distill"}
    # The rectified-flow input: x_s = (1 - s) x_0 + s e at timestep 1000 s; the target e - x_0.
    batch = _batch()
    draws = [ft.draw_sample(i, (16, 3, 6, 10), ft.TrainConfig(), T2V) for i in range(2)]
    inputs = ft.model_inputs(batch, draws, T2V, 1000, "cpu", torch.float32)
    x0, e = batch["latents"], torch.stack([d.noise for d in draws])
    s = torch.tensor([d.sigma for d in draws]).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(inputs.kwargs["hidden_states"], (1 - s) * x0 + s * e)
    torch.testing.assert_close(inputs.kwargs["timestep"], 1000 * s.flatten())
    torch.testing.assert_close(inputs.target, e - x0)
    assert inputs.weight is None and 0 < min(d.sigma for d in draws)


def test_lora_teacher_is_the_base_model_with_its_own_attention_and_no_copy():
    """After the adapters have trained, the teacher still gives the base model's dense output
    (a fresh model with the model's own processors), through the same weight tensors."""
    model, teacher, processor = _student("vmoba", lora=True)
    adapters = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in adapters:
            p.add_(0.05 * torch.randn_like(p))
    base = ft.load_pipeline(ft.ModelConfig()).transformer
    inputs = _inputs()
    with torch.no_grad():
        expected = base(**inputs.kwargs, return_dict=False)[0]
        student = ft.predict(model, inputs)
    actual = teacher(model, inputs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert (student - expected).abs().max() > 1e-3, "the trained sparse student must differ from the teacher"
    # The student is back to sparse attention with its adapters after the teacher call.
    processor.stats.clear()
    torch.testing.assert_close(ft.predict(model, inputs), student)
    assert processor.stats.records, "the sparse processor must run the student again"
    assert teacher.frozen is None and teacher.extra_parameter_bytes == 0


def _live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every live tensor (parameters included)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance on every object touches deprecated module attributes
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in tensors:
        if tensor.device.type != "cpu":
            continue
        try:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except RuntimeError:  # fake/functional tensors left by earlier compile tests hold no memory
            continue
    return sum(storages.values())


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_teacher_memory(lora):
    """Measured on the live tensors: the LoRA teacher adds no weights; the full fine-tuning
    teacher adds one frozen copy of the model (parameters and buffers)."""
    model, _, processor = _student("vmoba", lora)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    weights = parameters + sum(b.numel() * b.element_size() for b in model.buffers())
    inputs = _inputs()
    before = _live_tensor_bytes()
    if lora:
        teacher = ft.DenseTeacher(model, processor)
    else:
        teacher = ft.DenseTeacher.frozen_copy(model, model, processor, torch.float32)
    prediction = teacher(model, inputs)
    added = _live_tensor_bytes() - before - prediction.untyped_storage().nbytes()
    if lora:
        assert abs(added) < 0.01 * weights, f"the LoRA teacher added {added} bytes (weights: {weights})"
    else:
        # One copy of the weights, plus bookkeeping scalars (the copy's layer-binding handles).
        assert abs(added - weights) <= 0.001 * weights + 4096, (added, weights)
        assert teacher.extra_parameter_bytes == parameters


def test_held_out_gap_and_distill_loss_are_zero_for_a_dense_student(videos, tmp_path):
    dense = run(videos, tmp_path / "dense", "sparse.method=dense", "train.max_steps=1", "train.objective=distill",
                *LORA)
    assert dense.evaluations[0]["teacher_gap"] == 0.0 and dense.evaluations[0]["heldout_density"] == 1.0
    rows = ft.read_metrics(tmp_path / "dense")
    assert rows[1]["distill_loss"] == 0.0 and rows[1]["loss"] == 0.0
    report = json.loads((tmp_path / "dense" / "final" / "report.json").read_text())
    assert report["teacher_gap_before"] == 0.0 and report["teacher"]["kind"] == "the student with LoRA adapters disabled"


@pytest.mark.parametrize("lora, lr", [(True, 1e-2), (False, 1e-3)], ids=["lora", "full"])
def test_distillation_brings_the_sparse_student_to_the_teacher(lora, lr):
    """On a fixed batch, distillation steps take the VMoBA student most of the way to the
    dense teacher (the held-out version of this is bench/finetune_gap_cpu.py)."""
    model, teacher, processor = _student("vmoba", lora)
    inputs = _inputs(batch=2)
    target = teacher(model, inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    train = ft.TrainConfig(objective="distill")

    def gap() -> float:
        with torch.no_grad():
            return float((ft.predict(model, inputs) - target).norm() / target.norm())

    before = gap()
    for _ in range(40):
        loss, _ = ft.objective_loss(ft.predict(model, inputs), inputs, teacher(model, inputs), train)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert before > 0.01 and gap() < 0.5 * before, (before, gap())
    torch.testing.assert_close(teacher(model, inputs), target)  # the teacher did not move


def test_sigmas_stay_in_the_expert_range_and_ti2v_inputs_give_the_first_frame():
    high = ModelTask("t2v", "transformer", (0.875, 1.0), False, 0.0, (1, 2, 2))
    sigmas = [ft.draw_sample(i, (16, 1, 2, 2), ft.TrainConfig(), high).sigma for i in range(200)]
    assert min(sigmas) >= 0.875 and max(sigmas) < 1.0
    with pytest.raises(ValueError, match=r"drew no sigma in the expert's range \[0.999999"):
        ft.draw_sample(0, (16, 1, 2, 2), ft.TrainConfig(timestep_sampling="uniform"),
                       ModelTask("t2v", "transformer", (0.999999, 0.9999991), False, 0.0, (1, 2, 2)))
    ti2v = ModelTask("ti2v", "transformer", (0.0, 1.0), False, 0.5, (1, 2, 2))
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, 48, 3, 4, 6, generator=g), "prompt_embeds": torch.randn(2, 8, 32, generator=g),
             "condition": torch.randn(2, 48, 1, 4, 6, generator=g)}
    draws = [ft.objectives.Draw(torch.randn(48, 3, 4, 6, generator=g), 0.6, image) for image in (True, False)]
    inputs = ft.model_inputs(batch, draws, ti2v, 1000, "cpu", torch.float32)
    hidden, timestep = inputs.kwargs["hidden_states"], inputs.kwargs["timestep"]
    assert torch.equal(hidden[0, :, :1], batch["condition"][0]) and not torch.equal(hidden[1, :, :1], batch["condition"][1])
    per_frame = 2 * 3
    assert timestep.shape == (2, 3 * per_frame)
    assert (timestep[0, :per_frame] == 0).all() and (timestep[0, per_frame:] == 600).all() and (timestep[1] == 600).all()
    assert inputs.weight[0, 0, :, 0, 0].tolist() == [0, 1, 1] and inputs.weight[1, 0, :, 0, 0].tolist() == [1, 1, 1]
    # The given frame is out of the loss: a prediction wrong only there costs nothing.
    prediction = inputs.target.clone()
    prediction[0, :, 0] += 5
    assert float(ft.masked_mse(prediction, inputs.target, inputs.weight)) == 0.0
