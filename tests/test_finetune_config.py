"""Fine-tuning settings: every bad value a clear error naming the option and the valid range,
shipped YAML files, the sparse section, accelerate configs and distributed set-ups."""

from __future__ import annotations

import pytest

from finetune_support import CONFIGS, TINY_CONFIG
from vdiff_sparse.methods import method_names
from vdiff_sparse.pipelines import finetune as ft


@pytest.mark.parametrize("extra, match", [
    pytest.param(["train.max_stepz=3"], "max_stepz", id="typo"),
    pytest.param(["sparse.method=flash"], "sparse.method", id="method"),
    pytest.param(["data.num_frames=8"], "4k", id="frames"),
    pytest.param(["data.video_dir=null"], "no training data", id="no-data"),
    pytest.param(["train.lr"], "key=value", id="not-key-value"),
    pytest.param(["sparse.options.psa.block_1d=3"], r"sparse.options.psa.*unknown PSAProcessor option 'block_1d'",
                 id="option-of-another-method"),
    pytest.param(["sparse.options.gna.stride=4"], r"sparse.options.gna.*stride must be in 1..window",
                 id="bad-option-of-an-unused-method"),
    pytest.param(["sparse.options.tau=0.3"], "one section per method.*sparse.options.vmoba.tau", id="flat-options"),
    pytest.param(["sparse.options.vmoba.dense_layers=[0]"], r"give dense layers as sparse.dense_layers",
                 id="dense-layers-in-options"),
    pytest.param(["sparse.options.vmoba.dense_steps=2"], "dense_steps must be 0", id="dense-steps"),
    pytest.param(["train.lora_rank=0", "train.lora_alpha=16"], r"train.lora_alpha must be null with train.lora_rank=0",
                 id="lora-alpha-without-lora"),
    pytest.param(["train.timestep_sampling=uniform", "train.logit_std=2"],
                 r"train.logit_std must be its default 1.0 with train.timestep_sampling=uniform", id="logit-std-unused"),
    pytest.param(["train.max_steps=10", "train.lr_warmup_steps=20"], r"train.lr_warmup_steps must be at most "
                 r"train.max_steps=10", id="warmup-longer-than-run"),
    pytest.param(["sparse.options.psa.replan_every=2"], r"sparse.options.psa.replan_every must be 1", id="replan-every"),
    pytest.param(["sparse.preset=wan9"], r"sparse.options.vmoba \(with sparse.preset='wan9'.*unknown preset",
                 id="preset"),
    pytest.param(["sparse.backend=cuda"], "sparse.backend must be one of", id="backend"),
    pytest.param(["train.objective=teacher"], r"train.objective must be one of \('flow_matching', 'distill', 'mixed'\)",
                 id="objective"),
    pytest.param(["train.objective=mixed"], r"train.distill_weight must be set for objective=mixed", id="mixed-no-weight"),
    pytest.param(["train.distill_weight=0.5"], r"train.distill_weight must be null unless train.objective=mixed",
                 id="weight-without-mixed"),
    pytest.param(["model.expert=middle"], r"model.expert must be null or one of \('high_noise', 'low_noise'\)",
                 id="expert"),
    pytest.param(["validation.prompts=[a]", "validation.images=[a.png,b.png]"], "one image per prompt",
                 id="images-per-prompt"),
])
def test_config_errors(tmp_path, extra, match):
    base = [f"data.video_dir={tmp_path}", f"data.captions={tmp_path}/c.jsonl"]
    with pytest.raises(ValueError, match=match):
        ft.load_config(TINY_CONFIG, base + extra)


# Every numeric option out of its range: the error names the option and the interval.
OUT_OF_RANGE = [
    ("train.weight_decay", "-1", r"\[0, inf\)"),
    ("train.max_grad_norm", "-1", r"\[0, inf\)"),
    ("train.lr", "0", r"\(0, inf\)"),
    ("train.lr", "inf", r"\(0, inf\)"),
    ("train.lr", "nan", r"\(0, inf\)"),
    ("train.adam_beta1", "1.0", r"\[0, 1\)"),
    ("train.adam_beta2", "-0.1", r"\[0, 1\)"),
    ("train.adam_eps", "0", r"\(0, inf\)"),
    ("train.ema_decay", "1.0", r"\[0, 1\)"),
    ("train.logit_std", "0", r"\(0, inf\)"),
    ("train.logit_mean", "nan", r"\(-inf, inf\)"),
    ("train.shift", "-3", r"\(0, inf\)"),
    ("train.lora_alpha", "0", r"\(0, inf\)"),
    ("train.i2v_fraction", "1.5", r"\[0, 1\]"),
    ("train.max_steps", "0", r"an int >= 1"),
    ("train.checkpoints_keep", "-1", r"an int >= 0"),
    ("eval.holdout", "-1", r"an int >= 0"),
    ("eval.num_sigmas", "0", r"an int >= 1"),
    ("validation.steps", "0", r"an int >= 1"),
    ("validation.guidance_scale", "nan", r"\[0, inf\)"),
    ("validation.fps", "0", r"an int >= 1"),
    ("validation.every", "-2", r"an int >= 0"),
    ("validation.num_frames", "8", r"4k \+ 1 \(Wan.s VAE.*\)"),
    ("seed", "-1", r"an int >= 0"),
]


@pytest.mark.parametrize("name, value, interval", OUT_OF_RANGE, ids=[f"{n}={v}" for n, v, _ in OUT_OF_RANGE])
def test_numeric_options_out_of_range_are_refused(tmp_path, name, value, interval):
    with pytest.raises(ValueError, match=rf"{name} must be .*{interval}, got"):
        ft.load_config(TINY_CONFIG, [f"data.latents_dir={tmp_path}", f"{name}={value}"])


def test_distill_weight_bounds_and_mixed(tmp_path):
    for weight in ("0", "1", "-0.5"):
        with pytest.raises(ValueError, match=r"train.distill_weight must be a finite number in \(0, 1\)"):
            ft.load_config(TINY_CONFIG, [f"data.latents_dir={tmp_path}", "train.objective=mixed",
                                         f"train.distill_weight={weight}"])
    config = ft.load_config(TINY_CONFIG, [f"data.latents_dir={tmp_path}", "train.objective=mixed",
                                          "train.distill_weight=0.25"])
    assert config.train.uses_teacher and config.train.distill_weight == 0.25


def test_python_tags_in_a_config_file_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("output_dir: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ValueError, match="not plain YAML"):
        ft.load_config(path)


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_shipped_training_configs_load_with_every_method(name, method, tmp_path):
    # load_config builds the processor, so a method whose options the YAML gets wrong fails here.
    config = ft.load_config(name, [f"data.latents_dir={tmp_path}", f"sparse.method={method}"])
    assert config.train.max_steps >= 1
    processor = ft.training_processor(config.sparse)
    assert processor.method == method and processor.schedule.dense_steps == 0


@pytest.mark.parametrize("method", ["vmoba", "psa", "gna"])
def test_a_method_preset_does_not_reach_the_other_methods_sections(method, tmp_path):
    """sparse.preset=<method> with the tiny config's sections for all three methods loads: the
    method preset applies to its own method only (a model preset has a section for each)."""
    config = ft.load_config("tiny_wan_vmoba", [f"data.latents_dir={tmp_path}", f"sparse.method={method}",
                                               f"sparse.preset={method}"])
    assert ft.training_processor(config.sparse).method == method
    config = ft.load_config("tiny_wan_vmoba", [f"data.latents_dir={tmp_path}", "sparse.preset=wan2.1-1.3b"])
    assert ft.training_processor(config.sparse).method == "vmoba"


def test_flat_options_in_python_name_the_per_method_sections():
    with pytest.raises(ValueError, match=r"sparse.options must be a mapping with one section per method.*'vmoba': \{'tau'"):
        ft.SparseConfig(options={"block_1d": 2})
    processor = ft.training_processor(ft.SparseConfig(options={"vmoba": {"block_1d": 2}}))
    assert processor.config.block_1d == 2 and processor.config.mode == "threshold"


@pytest.mark.parametrize("method", method_names())
def test_dense_layers_reach_the_processor_of_every_method(tmp_path, method):
    config = ft.load_config(TINY_CONFIG, [f"data.latents_dir={tmp_path}", f"sparse.method={method}",
                                          "sparse.dense_layers=[0]"])
    schedule = ft.training_processor(config.sparse).schedule
    assert schedule.layer_is_dense(0, 2) and not schedule.layer_is_dense(1, 2)


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 2 and config.distributed_type in ("MULTI_GPU", "FSDP")


@pytest.mark.parametrize("variable, running, match", [
    pytest.param("ACCELERATE_USE_FSDP", "MULTI_CPU", "on GPUs only.*cpu_ddp.yaml", id="fsdp-config-on-cpu"),
    pytest.param("ACCELERATE_USE_DEEPSPEED", "MULTI_CPU", "DeepSpeed is not supported.*pickle", id="deepspeed-config"),
    pytest.param(None, "DEEPSPEED", "DeepSpeed is not supported", id="deepspeed"),
    pytest.param("ACCELERATE_USE_FSDP", "FSDP", None, id="fsdp"),
    pytest.param(None, "MULTI_CPU", None, id="cpu-ddp"),
])
def test_distributed_setups_that_would_not_run_as_asked_are_refused(variable, running, match):
    from accelerate.utils import DistributedType

    environ = {variable: "true"} if variable else {}
    if match:
        with pytest.raises(NotImplementedError, match=match):
            ft.check_distributed_type(DistributedType[running], environ)
    else:
        ft.check_distributed_type(DistributedType[running], environ)
