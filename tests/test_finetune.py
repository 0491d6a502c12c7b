"""Sparse-aware fine-tuning runs (vdiff_sparse.pipelines.finetune) on the tiny Wan, on CPU:
outputs, exact resume, checkpoints that cannot run code, set-up errors.

Exact resume is checked bit for bit: the final weights, the report and every tensor and value
of the last checkpoint (weights or LoRA adapters, optimizer state, EMA, step, evaluations)
equal those of an uninterrupted run. The ``slow`` tests start processes: two-process runs
(``accelerate launch`` with ``configs/finetune/accelerate/cpu_ddp.yaml``), one of them killed
with SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune_support import (
    CONFIGS, FULL, LORA, TINY_CONFIG, assert_same_run, final_weights, overrides, run, tiny_inputs_of, write_dataset,
)
from vdiff_sparse.pipelines import finetune as ft


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def reference_full(videos, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run (FULL), evaluated (held-out gap, a validation video) at
    steps 0, 2 and 4."""
    out = tmp_path_factory.mktemp("reference_full")
    result = run(videos, out, *FULL, "validation.every=2", "validation.steps=2")
    assert result.step == 4 and not result.stopped_early
    return out


def test_global_batches_cover_each_epoch_once(seed):
    n, size = 7, 2
    batches = [ft.global_batch(n, size, seed, i) for i in range(6)]  # 3 per epoch, 1 sample dropped
    for epoch in (batches[:3], batches[3:]):
        flat = [i for b in epoch for i in b]
        assert len(set(flat)) == 6 and set(flat) <= set(range(n))
    assert batches[:3] != batches[3:]
    assert batches == [ft.global_batch(n, size, seed, i) for i in range(6)]
    # Data errors (the command line prints them in one line, without a traceback)
    from vdiff_sparse.pipelines.data import DataError
    from vdiff_sparse.pipelines.finetune.schedule import holdout_split

    with pytest.raises(DataError, match="cannot fill one global batch"):
        ft.global_batch(1, 2, seed, 0)
    with pytest.raises(DataError, match="eval.holdout=1 leaves none of the 1 samples to train on"):
        holdout_split(1, 1, seed)


def test_uninterrupted_run_writes_checkpoints_logs_samples_and_report(reference_full):
    assert [p.name for p in ft.checkpoints(reference_full)] == ["step-00000002", "step-00000004"]
    rows = ft.read_metrics(reference_full)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for row in rows[1:]:
        assert np.isfinite(row["loss"]) and 0 < row["density"] < 0.9 and row["tokens_per_s"] > 0
    # 2 samples x 2 micro-batches of 45 tokens per step.
    assert rows[1]["tokens_per_s"] == pytest.approx(180 / rows[1]["step_time_s"], rel=1e-6)
    evaluated = [int(r["step"]) for r in rows if "teacher_gap" in r]
    assert evaluated == [0, 2, 4] and all(0 < rows[s]["teacher_gap"] < 1 and rows[s]["psnr_db"] > 0 for s in evaluated)
    names = sorted(v.name for v in (reference_full / "validation").glob("*.mp4"))
    assert names == ["step-00000000-0.mp4", "step-00000002-0.mp4", "step-00000004-0.mp4", "teacher-0.mp4"]
    import imageio.v3 as iio

    assert iio.imread(reference_full / "validation" / "teacher-0.mp4", index=None).shape == (9, 48, 80, 3)
    report = json.loads((reference_full / "final" / "report.json").read_text())
    assert report["objective"] == "flow_matching" and report["steps"] == 4 and report["fine_tuning"] == "full"
    assert [e["step"] for e in report["evaluations"]] == [0, 2, 4]
    assert report["teacher_gap_before"] == rows[0]["teacher_gap"] and report["teacher_gap_after"] == rows[4]["teacher_gap"]
    assert report["heldout"] == {"samples": 1, "sigmas": [0.125, 0.375, 0.625, 0.875], "inputs": 4}
    for evaluation in report["evaluations"]:  # the gap per noise level brackets the overall one
        by_sigma = evaluation["teacher_gap_by_sigma"]
        assert list(by_sigma) == ["0.1250", "0.3750", "0.6250", "0.8750"]
        assert min(by_sigma.values()) <= evaluation["teacher_gap"] <= max(by_sigma.values())
        assert max(by_sigma.values()) > min(by_sigma.values())  # measured per level, not copied
    assert report["teacher"]["extra_parameter_bytes"] == 0  # flow matching needs no teacher in memory


def test_full_weights_load_with_plain_diffusers(reference_full):
    from diffusers import WanTransformer3DModel

    loaded = WanTransformer3DModel.from_pretrained(str(reference_full / "final" / "transformer"))
    base = ft.load_pipeline(ft.ModelConfig()).transformer
    inputs = tiny_inputs_of(base)
    with torch.no_grad():
        assert (loaded(**inputs)[0] - base(**inputs)[0]).abs().max() > 1e-4, "trained weights must differ from the base"
    assert {k: v for k, v in loaded.state_dict().items()}.keys() == base.state_dict().keys()


@pytest.mark.parametrize("settings", [
    pytest.param(FULL, id="full-accum-ema-flow_matching"),
    pytest.param(LORA + ("train.objective=distill",), id="lora-distill"),
    pytest.param(("train.objective=mixed", "train.distill_weight=0.3", "train.lr=1e-4"), id="full-mixed"),
])
def test_stopped_run_resumes_exactly(videos, tmp_path, reference_full, settings):
    evaluated = ("validation.every=2", "validation.steps=2")
    reference = reference_full
    if settings is not FULL:
        reference = tmp_path / "reference"
        run(videos, reference, *settings, *evaluated)
    # "Killed" after step 3: the last checkpoint is step 2, so step 3 is done again.
    killed = run(videos, tmp_path / "run", *settings, *evaluated, "train.stop_after=3")
    assert killed.stopped_early and killed.step == 3 and killed.final_dir is None
    resumed = run(videos, tmp_path / "run", *settings, *evaluated, "resume=latest")
    assert resumed.step == 4 and len(resumed.losses) == 2 and [e["step"] for e in resumed.evaluations] == [0, 2, 4]
    assert [r["step"] for r in ft.read_metrics(tmp_path / "run")] == [0, 1, 2, 3, 4]
    assert_same_run(reference, tmp_path / "run")
    saved = ft.read_checkpoint(ft.checkpoints(tmp_path / "run")[-1])
    assert saved["state"]["step"] == 4 and len(saved["optimizer"]) > 0
    if "train.lora_rank=4" in settings:
        # Adapters only (plus optimizer and step): the frozen base is rebuilt on resume.
        assert saved["weights"] and all("lora_A" in k or "lora_B" in k for k in saved["weights"])
        assert all("lora" in k for k in final_weights(tmp_path / "run"))
        with pytest.raises(ft.SetupError, match="another base or LoRA setting.*rank=2"):
            run(videos, tmp_path / "run", *settings, "train.lora_rank=2", "train.max_steps=5", "resume=latest")
    else:
        assert saved["weights"].keys() == ft.load_pipeline(ft.ModelConfig()).transformer.state_dict().keys()


class _Payload:
    """Unpickling it creates the file ``marker`` (any code could run instead)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _plant(folder: Path, marker: Path) -> None:
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl"):
        with open(folder / name, "wb") as f:
            pickle.dump(_Payload(marker), f)
    torch.save({"state": _Payload(marker)}, folder / "optimizer.bin")


def test_planted_pickles_in_a_checkpoint_are_never_loaded(videos, tmp_path, monkeypatch):
    """A checkpoint folder with pickle files planted beside its own files resumes without
    unpickling anything; nothing is read with torch.load or pickle at all."""
    run(videos, tmp_path, *LORA, "train.max_steps=2")
    marker = tmp_path / "code-ran"
    _plant(ft.checkpoints(tmp_path)[-1], marker)

    def refuse(*args, **kwargs):
        raise AssertionError("resume must not unpickle anything")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    resumed = run(videos, tmp_path, *LORA, "train.max_steps=3", "resume=latest")
    assert resumed.step == 3 and not marker.exists()


@pytest.mark.parametrize("resume", ["latest", "{folder}"])
def test_a_folder_of_pickles_is_refused_as_a_checkpoint(videos, tmp_path, resume):
    folder = tmp_path / "run" / "checkpoints" / "step-00000002"
    folder.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    _plant(folder, marker)
    with pytest.raises(ft.SetupError, match=r"not a checkpoint of this trainer \(pickle files .* are never loaded"):
        run(videos, tmp_path / "run", f"resume={resume.format(folder=folder)}")
    assert not marker.exists()


def test_tiny_config_trains_with_every_method(videos, tmp_path):
    # The tiny YAML's options for VMoBA must not reach the other methods.
    for method in ("psa", "gna", "dense"):
        run(videos, tmp_path / method, f"sparse.method={method}", "train.max_steps=1", "eval.holdout=0")
        rows = ft.read_metrics(tmp_path / method)
        assert [r["step"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])
        if method == "dense":
            assert rows[0]["density"] == 1.0
        else:
            assert 0 < rows[0]["density"] < 0.9, f"{method} must actually be sparse on the tiny grid"


def test_lora_adapters_start_from_the_run_seed():
    """The adapters' random start depends on the run's seed only, not on what the process drew
    before (two runs in one process, e.g. a benchmark's, start alike), and leaves the process's
    random stream where it was."""
    from vdiff_sparse.pipelines.finetune.config import TrainConfig
    from vdiff_sparse.pipelines.finetune.loop import _trainable_setup
    from vdiff_sparse.tiny_models import tiny_wan_transformer

    def adapters(seed, earlier_draws):
        model = tiny_wan_transformer(seed=0)
        torch.manual_seed(7)
        torch.rand(earlier_draws)
        _trainable_setup(model, TrainConfig(lora_rank=4), seed)
        after = torch.rand(1)
        torch.manual_seed(7)
        torch.rand(earlier_draws)
        assert torch.equal(after, torch.rand(1)), "the global stream moved"
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    a, b, c = adapters(3, 1), adapters(3, 5), adapters(4, 1)
    assert a and a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_lora_with_alpha_other_than_rank_loads_at_the_trained_scale(videos, tmp_path):
    # The final adapters loaded with pipe.load_lora_weights give the trained model's outputs:
    # lora_alpha is saved with them (a loader assuming alpha = rank scales them by 1/4 here).
    from peft import LoraConfig

    run(videos, tmp_path, *LORA, "train.lora_alpha=16", "train.max_steps=2", "eval.holdout=0")
    trained = ft.load_pipeline(ft.ModelConfig()).transformer
    trained.add_adapter(LoraConfig(r=4, lora_alpha=16, init_lora_weights=True,
                                   target_modules=ft.TrainConfig().lora_targets))
    adapters = ft.read_checkpoint(ft.checkpoints(tmp_path)[-1])["weights"]
    parameters = dict(trained.named_parameters())
    with torch.no_grad():
        for name, value in adapters.items():
            parameters[name].copy_(value)
    loaded = ft.load_pipeline(ft.ModelConfig())
    loaded.load_lora_weights(str(tmp_path / "final"))
    base = ft.load_pipeline(ft.ModelConfig()).transformer
    inputs = tiny_inputs_of(base)
    with torch.no_grad():
        expected, actual, untrained = (m(**inputs)[0] for m in (trained, loaded.transformer, base))
    assert (expected - untrained).abs().max() > 1e-2, "the adapters must change the output for this test to mean anything"
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_fresh_run_in_a_folder_with_checkpoints_is_refused(videos, tmp_path):
    run(videos, tmp_path, "train.max_steps=2", "eval.holdout=0")
    metrics = (tmp_path / "logs" / "metrics.csv").read_text()
    with pytest.raises(ft.SetupError, match=r"already holds checkpoints of an earlier run \(step-00000002\).*--resume latest"):
        run(videos, tmp_path, "train.max_steps=4")
    assert [p.name for p in ft.checkpoints(tmp_path)] == ["step-00000002"]
    assert (tmp_path / "logs" / "metrics.csv").read_text() == metrics
    resumed = run(videos, tmp_path, "train.max_steps=3", "resume=latest", "eval.holdout=0")
    assert resumed.step == 3 and len(resumed.losses) == 1


def test_run_starting_at_step_0_begins_a_new_metrics_log(videos, tmp_path):
    # The first run stops before its first checkpoint: its rows are of no run that continues.
    run(videos, tmp_path, "train.stop_after=1", "eval.holdout=0")
    assert not ft.checkpoints(tmp_path)
    run(videos, tmp_path, "train.max_steps=2", "resume=latest", "eval.holdout=0")
    lines = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["step", "1", "2"]


def test_resumed_run_keeps_its_new_checkpoint_and_drops_later_ones(videos, tmp_path):
    # Resumed from step 2 of a run that reached step 4: with checkpoints_keep=1 the checkpoint
    # kept is the one just written (step 3), and step 4 of the abandoned run is not "latest".
    run(videos, tmp_path, "eval.holdout=0")
    assert [p.name for p in ft.checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]
    run(videos, tmp_path, "train.max_steps=3", "train.checkpoint_every=1", "train.checkpoints_keep=1",
        f"resume={ft.checkpoints(tmp_path)[0]}", "eval.holdout=0")
    assert [p.name for p in ft.checkpoints(tmp_path)] == ["step-00000003"]


def make_checkpoint(run_dir: Path, step: int) -> Path:
    """An empty stand-in of a checkpoint folder (what :func:`ft.is_checkpoint` looks for)."""
    folder = run_dir / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "training_state.json").write_text("{}")
    return folder


@pytest.mark.parametrize("resume, match", [
    pytest.param("{run}", r"is a run's folder, not a checkpoint.*resume='{run}/checkpoints/step-00000004'"
                          r".*step-00000002, step-00000004.*output_dir='{run}' with resume=latest", id="output-dir"),
    pytest.param("{run}/checkpoints", r"is a run's folder, not a checkpoint.*step-00000004", id="checkpoints-dir"),
    pytest.param("{empty}", r"'{empty}' is not a checkpoint folder.*checkpoints/step-N", id="empty-dir"),
    pytest.param("{run}/gone", "not a folder", id="missing"),
    pytest.param(None, r"output_dir '{run}' already holds checkpoints.*--resume latest", id="fresh-start"),
])
def test_resume_that_is_not_a_checkpoint_says_where_the_checkpoints_are(tmp_path, resume, match):
    run_dir, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    make_checkpoint(run_dir, 2)
    make_checkpoint(run_dir, 4)
    names = {"run": run_dir, "empty": empty}
    with pytest.raises(ft.SetupError, match=match.format(**{k: re.escape(str(v)) for k, v in names.items()})):
        ft.resolve_resume(resume and resume.format(**names), run_dir)


def test_resume_finds_checkpoints(tmp_path):
    assert ft.resolve_resume(None, tmp_path) is None and ft.resolve_resume("latest", tmp_path) is None
    newest = make_checkpoint(tmp_path, 4)
    make_checkpoint(tmp_path, 2)
    assert ft.resolve_resume("latest", tmp_path) == newest
    assert ft.resolve_resume(str(newest), tmp_path / "elsewhere") == newest


def test_interrupted_checkpoint_write_keeps_the_last_checkpoint(videos, tmp_path, reference_full, monkeypatch):
    from vdiff_sparse.pipelines.finetune import checkpointing as ckpt

    write = ckpt.write_checkpoint

    def dies_while_writing_step_4(folder, *args, **kwargs):
        write(folder, *args, **kwargs)
        if folder.name.endswith("00000004"):
            optimizer = folder / ckpt.OPTIMIZER_FILE
            optimizer.write_bytes(optimizer.read_bytes()[:100])  # torn file, then the process dies
            raise KeyboardInterrupt("killed while writing the step-4 checkpoint")

    monkeypatch.setattr(ckpt, "write_checkpoint", dies_while_writing_step_4)
    evaluated = ("validation.every=2", "validation.steps=2")
    with pytest.raises(KeyboardInterrupt):
        run(videos, tmp_path, *FULL, *evaluated)
    assert [p.name for p in ft.checkpoints(tmp_path)] == ["step-00000002"]
    monkeypatch.undo()
    resumed = run(videos, tmp_path, *FULL, *evaluated, "resume=latest")
    assert resumed.step == 4 and len(resumed.losses) == 2
    assert not list((tmp_path / "checkpoints").glob(".partial*"))
    assert_same_run(reference_full, tmp_path)


# --- set-up errors: one line, before anything is encoded ----------------------------------------
@pytest.mark.parametrize("setting, match", [
    pytest.param("output_dir={file}/run", r"output_dir '{file}/run' cannot be written", id="output-dir-under-a-file"),
    pytest.param("data.captions={videos}/gone.jsonl", r"data.captions '{videos}/gone.jsonl' does not exist",
                 id="missing-captions"),
    pytest.param("data.video_dir={videos}/gone", r"data.video_dir '{videos}/gone' is not a folder", id="missing-videos"),
    pytest.param("data.cache_dir={file}/cache", r"data.cache_dir '{file}/cache' cannot be written", id="cache-under-a-file"),
])
def test_setup_errors_are_one_line_before_the_data_is_encoded(videos, tmp_path, monkeypatch, capsys, setting, match):
    from vdiff_sparse.pipelines.finetune import loop

    def no_encoding(*args, **kwargs):
        raise AssertionError("nothing may be encoded before the set-up is checked")

    monkeypatch.setattr(loop, "build_cache", no_encoding)
    monkeypatch.setattr(loop, "load_pipeline", no_encoding)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    names = {"file": blocker, "videos": videos}
    argv = ["--config", str(TINY_CONFIG), *overrides(videos, tmp_path / "out"), setting.format(**names)]
    assert ft.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match.format(**{k: re.escape(str(v)) for k, v in names.items()}), err[0]), err


def test_data_errors_are_one_line(videos, tmp_path, capsys):
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"video": "../secret.mp4", "caption": "x"}) + "\n")
    argv = ["--config", str(TINY_CONFIG), *overrides(videos, tmp_path / "out"), f"data.captions={captions}"]
    assert ft.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "caption lines 1 name files outside data.video_dir" in err[0]


# --- several processes ---------------------------------------------------------------------------
def _launch(videos: Path, output_dir: Path, *extra: str, kill_after_first_checkpoint: bool = False) -> None:
    """The tiny config on 2 CPU processes (``cpu_ddp.yaml``); with ``kill_after_first_checkpoint``
    the launcher and both workers get SIGKILL, as a preempted job, as soon as the first
    checkpoint is complete (that is, early in the next step)."""
    import signal
    import time

    import psutil

    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CONFIGS / "accelerate" / "cpu_ddp.yaml"),
        "--main_process_port", "0",
        "-m", "vdiff_sparse.pipelines.finetune", "--config", str(TINY_CONFIG),
        *overrides(videos, output_dir, *extra),
    ]
    log = output_dir.with_name(output_dir.name + "-launch.log")
    with open(log, "w") as sink:
        launcher = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
    family = [psutil.Process(launcher.pid)]
    try:
        if kill_after_first_checkpoint:
            deadline = time.monotonic() + 240
            while not ft.checkpoints(output_dir) and launcher.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert launcher.poll() is None, "the run ended before it could be killed:\n" + log.read_text()[-3000:]
            family += family[0].children(recursive=True)  # the workers run in sessions of their own
            for process in family:
                process.send_signal(signal.SIGKILL)
        try:
            returncode = launcher.wait(timeout=240)
        except subprocess.TimeoutExpired:
            family += family[0].children(recursive=True)  # killed below, workers included
            raise AssertionError("the 2-process run did not end within 240 s:\n" + log.read_text()[-6000:]) from None
    finally:
        for process in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(family, timeout=30)
    assert returncode == (-signal.SIGKILL if kill_after_first_checkpoint else 0), log.read_text()[-6000:]


@pytest.mark.slow
def test_two_processes_killed_resume_and_match_one_process(videos, tmp_path, reference_full):
    # Per-process batch 1 on 2 processes = the reference's global batch 2 (same samples, same
    # noise), gradients averaged by DDP instead of within the batch: equal up to rounding.
    out, cache = tmp_path / "ddp", f"data.cache_dir={tmp_path / 'cache'}"
    per_process = ("train.batch_size=1", "train.grad_accum=2", "train.ema_decay=0.9", "validation.every=2",
                   "validation.steps=2")
    _launch(videos, out, *per_process, cache, kill_after_first_checkpoint=True)
    assert ft.checkpoints(out)[0].name == "step-00000002" and not (out / "final").exists()
    _launch(videos, out, *per_process, "--resume", "latest", cache)
    assert [p.name for p in ft.checkpoints(out)] == ["step-00000002", "step-00000004"]
    rows, reference_rows = ft.read_metrics(out), ft.read_metrics(reference_full)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in rows[1:]], [r["loss"] for r in reference_rows[1:]], rtol=1e-4)
    np.testing.assert_allclose([r["teacher_gap"] for r in rows if "teacher_gap" in r],
                               [r["teacher_gap"] for r in reference_rows if "teacher_gap" in r], rtol=1e-4)
    expected, actual = final_weights(reference_full), final_weights(out)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_lora_distill_checkpoint_of_two_processes_resumes_on_one(videos, tmp_path):
    # LoRA distillation checkpoints are written by a 2-process run (per-process batch 1, stopped
    # after step 3; the teacher runs through the DDP-wrapped model with its adapters off) and
    # resumed by one process with batch 2: the same global batches, so the same run as one
    # uninterrupted process up to the rounding of DDP's gradient averaging.
    out, cache = tmp_path / "ddp", f"data.cache_dir={tmp_path / 'cache'}"
    settings = (*LORA, "train.objective=distill")
    _launch(videos, out, *settings, "train.stop_after=3", cache)
    saved = ft.read_checkpoint(ft.checkpoints(out)[-1])
    assert saved["weights"] and all("lora" in k for k in saved["weights"])
    resumed = run(videos, out, *settings, "train.batch_size=2", "resume=latest", cache)
    assert resumed.step == 4 and len(resumed.losses) == 2
    reference = tmp_path / "reference"
    run(videos, reference, *settings, "train.batch_size=2", cache)
    np.testing.assert_allclose([r["loss"] for r in ft.read_metrics(out)[1:]],
                               [r["loss"] for r in ft.read_metrics(reference)[1:]], rtol=1e-3)
    # Adam turns rounding-level differences of near-zero gradients (adapters whose B starts at 0)
    # into steps of up to lr.
    expected, actual = final_weights(reference), final_weights(out)
    assert expected.keys() == actual.keys() and len(expected) > 0
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=2e-4, msg=name)
