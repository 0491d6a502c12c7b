"""Step counting inside diffusers pipelines: which pipeline and scheduler give the number of
steps (``enable`` on a transformer, one ``enable`` per Wan 2.2 expert, a scheduler swapped in
after ``enable``, ``strength < 1``), and the error before the scheduler is set up."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import vdiff_sparse.processors as P
from vdiff_sparse import integration
from vdiff_sparse.tiny_models import tiny_inputs, tiny_wan_pipeline

PIPE_KW = dict(prompt="a cat runs on the beach", negative_prompt="snow", height=32, width=64, num_frames=9,
               guidance_scale=2.0, output_type="pt")


@pytest.fixture(scope="module")
def pipes():
    return tiny_wan_pipeline(seed=1), tiny_wan_pipeline(two_experts=True, seed=2)


@pytest.fixture
def pipe(pipes):
    """The one-transformer pipeline, given back with the model's processors and a scheduler like
    its own (a new one: a test may need the old one freed)."""
    pipe = pipes[0]
    scheduler_cls, config = type(pipe.scheduler), pipe.scheduler.config
    yield pipe
    integration.disable(pipe)
    pipe.scheduler = scheduler_cls.from_config(config)


def _generate(pipe, steps):
    return pipe(**PIPE_KW, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).frames


def _schedule(proc, layer=0):
    """``(step, dense_reason)`` of each video attention call of ``layer``."""
    return [(r.step, r.dense_reason) for r in proc.stats.records if r.layer == layer]


def test_enable_transformer_then_run_pipeline(pipe):
    """``enable(pipe.transformer, ...)``: the pipeline running it gives the number of steps."""
    proc = P.DenseProcessor(dense_steps=0.5, stats=True)
    ctx = integration.enable(pipe.transformer, proc)
    _generate(pipe, 3)
    assert ctx.pipeline() is pipe and ctx.num_steps() == 3
    # ceil(0.5 * 3) = 2 warm-up steps, two CFG calls per step.
    assert _schedule(proc) == [(0, "warmup"), (0, "warmup"), (1, "warmup"), (1, "warmup"), (2, ""), (2, "")]


def test_wan22_one_enable_per_expert_shares_steps(pipes):
    """``enable(pipe.transformer, A); enable(pipe.transformer_2, B)``: the low-noise expert
    continues the step count of the high-noise one (no second warm-up), as with
    ``set_attn_processor`` or ``enable(pipe, ...)``."""
    pipe = pipes[1]
    high = P.DenseProcessor(dense_steps=2, stats=True)
    low = P.DenseProcessor(dense_steps=2, stats=True)
    integration.enable(pipe.transformer, high)
    integration.enable(pipe.transformer_2, low)
    _generate(pipe, 6)
    ctx = integration.get_context(pipe.transformer)
    shared = integration.get_context(pipe.transformer_2) is ctx
    integration.disable(pipe)
    assert shared and ctx.num_steps() == 6
    high_steps = sorted({s for s, _ in _schedule(high)})
    assert high_steps[:3] == [0, 1, 2] and _schedule(low), "each expert runs some of the 6 steps"
    assert {s for s, _ in _schedule(low)} == set(range(high_steps[-1] + 1, 6))
    assert all(reason == "" for _, reason in _schedule(low))


@pytest.mark.parametrize("keep_old", [True, False], ids=["old_scheduler_alive", "old_scheduler_freed"])
def test_scheduler_swapped_after_enable(pipe, keep_old):
    """``pipe.scheduler = X.from_config(pipe.scheduler.config)`` after ``enable``: the number of
    steps comes from the scheduler the pipeline runs with, not the one it had at ``enable``
    (whose 1000 training timesteps made every step a warm-up step)."""
    from diffusers import UniPCMultistepScheduler

    proc = P.DenseProcessor(dense_steps=0.5, stats=True)
    ctx = integration.enable(pipe, proc)
    old = pipe.scheduler
    pipe.scheduler = UniPCMultistepScheduler.from_config(old.config, prediction_type="flow_prediction",
                                                         use_flow_sigmas=True, flow_shift=3.0)
    if not keep_old:
        old_ref, old = weakref.ref(old), None
        gc.collect()
        assert old_ref() is None
    _generate(pipe, 4)
    assert ctx.num_steps() == 4
    assert [r for s, r in _schedule(proc)] == ["warmup"] * 4 + [""] * 4


def test_steps_unknown_before_set_timesteps(pipe):
    """Before the scheduler's ``set_timesteps`` its ``timesteps`` are the 1000 training ones:
    not a number of steps, so a fractional warm-up says the number is unknown instead of running
    every step dense."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    integration.enable(pipe, P.DenseProcessor(dense_steps=0.3))
    inputs = tiny_inputs("wan", (3, 4, 5), seed=0)
    unknown = r"number of steps is unknown.*before the pipeline's scheduler.set_timesteps"
    with pytest.raises(ValueError, match=unknown), torch.no_grad():
        pipe.transformer(**inputs)


def test_video_to_video_counts_the_steps_that_run(seed):
    """``strength=0.5`` of 10 scheduler steps runs 5: ``dense_steps=0.4`` warms up
    ceil(0.4 * 5) = 2 of them."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVideoToVideoPipeline
    from PIL import Image

    from vdiff_sparse.tiny_models import tiny_text_encoder, tiny_wan_transformer, tiny_wan_vae

    tokenizer, text_encoder = tiny_text_encoder(seed=0)
    pipe = WanVideoToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_wan_vae(seed=0),
                                   transformer=tiny_wan_transformer(seed=0),
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    g = torch.Generator().manual_seed(seed)
    video = [Image.fromarray((torch.rand(32, 64, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(9)]
    proc = P.DenseProcessor(dense_steps=0.4, stats=True)
    ctx = integration.enable(pipe, proc)
    embeds = torch.randn(1, 8, 32, generator=g)

    def run(steps, strength):
        proc.stats.records.clear()
        pipe(video=video, prompt_embeds=embeds, height=32, width=64, num_inference_steps=steps, strength=strength,
             guidance_scale=1.0, output_type="pt", generator=torch.Generator().manual_seed(0))

    run(10, 0.5)
    assert ctx.num_steps() == 5
    assert _schedule(proc) == [(0, "warmup"), (1, "warmup"), (2, ""), (3, ""), (4, "")]
    # A 1-step preview, then the same run: it starts below the preview's noise level, and is a
    # new generation all the same (the scheduler's set_timesteps made new timesteps).
    run(1, 1.0)
    run(10, 0.5)
    assert ctx.num_steps() == 5
    assert _schedule(proc) == [(0, "warmup"), (1, "warmup"), (2, ""), (3, ""), (4, "")]


class _Pipeline:
    """Just what a context reads from a pipeline: its scheduler."""

    def __init__(self, scheduler):
        self.scheduler = scheduler


@pytest.mark.parametrize("increases, dtype", [(False, torch.float32), (False, torch.bfloat16),
                                              (True, torch.float32), (True, torch.bfloat16)],
                         ids=["falling-fp32", "falling-bf16", "rising-fp32", "rising-bf16"])
def test_num_steps_from_the_first_timestep(increases, dtype):
    """A generation that starts at the scheduler's k-th timestep runs ``n - k`` steps, for
    falling timesteps and for rising ones (Mochi), also when the pipeline passes the timestep
    in bfloat16."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    n = 12
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, invert_sigmas=increases)
    pipe = _Pipeline(scheduler)
    scheduler.set_timesteps(n)
    ctx = integration.RunContext()
    ctx.follow_pipeline(pipe)
    for start in (0, 1, 5, n - 1):
        ctx.new_generation()
        for t in scheduler.timesteps[start:start + 2]:
            ctx.observe_timestep(float(t.to(dtype)), increases=increases)
        assert ctx.num_steps() == n - start, start
    scheduler.set_timesteps(n // 2)  # the next generation, with fewer steps
    ctx.observe_timestep(float(scheduler.timesteps[0]), increases=increases)
    assert ctx.num_steps() == n // 2
