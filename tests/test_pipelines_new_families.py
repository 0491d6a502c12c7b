"""The full diffusers pipelines of the newer video families, end to end on the CPU with a sparse
processor: SkyReels-V2, Wan VACE, ChronoEdit, Wan-Animate, Cosmos-Predict 2, HunyuanVideo 1.5,
HunyuanVideo-FramePack, Kandinsky 5, LTX-2 (tiny components built offline,
:mod:`vdiff_sparse.tiny_pipelines`; pipelines whose text encoders need a downloaded tokenizer
take prompt embeddings).

For each: ``enable`` on the pipeline, a generation runs sparse in every denoising step (the step
count follows the pipeline, classifier-free guidance included), gives a finite output that
differs from the dense one, and after ``disable`` the pipeline gives the dense output bit for bit.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import vdiff_sparse.processors as P
import vdiff_sparse.tiny_pipelines as tp
from vdiff_sparse import integration


def _image(height, width):
    return PIL.Image.fromarray((np.random.RandomState(0).rand(height, width, 3) * 255).astype("uint8"))


def _wan_prompt():
    return dict(prompt_embeds=tp.tiny_prompt_embeds("a cat runs on the beach"),
                negative_prompt_embeds=tp.tiny_prompt_embeds("snow"), guidance_scale=2.0)


def _wan_animate():
    # Segments of 77 frames (the pipeline's face frames assume them) at 16 x 16 pixels: a
    # 21 x 1 x 1 token grid, the video VAE being most of the cost.
    pose, face = PIL.Image.new("RGB", (16, 16), (0, 90, 0)), PIL.Image.new("RGB", (16, 16), (90, 0, 200))
    return dict(_wan_prompt(), image=_image(16, 16), pose_video=[pose] * 17, face_video=[face] * 17, height=16,
                width=16, segment_frame_length=77)


def _ltx2():
    return dict(tp.tiny_ltx2_prompt(seed=1), height=32, width=64, num_frames=17, frame_rate=25.0, guidance_scale=2.0,
                stg_scale=0.0, modality_scale=1.0, guidance_rescale=0.0, audio_guidance_scale=2.0, audio_stg_scale=0.0,
                audio_modality_scale=1.0, audio_guidance_rescale=0.0, spatio_temporal_guidance_blocks=None,
                use_cross_timestep=False, max_sequence_length=8)


# (id, builder, call arguments, denoising steps)
PIPELINES = [
    ("skyreels_v2", tp.tiny_skyreels_v2_pipeline, lambda: dict(_wan_prompt(), height=16, width=32, num_frames=5), 3),
    ("wan_vace", tp.tiny_wan_vace_pipeline, lambda: dict(_wan_prompt(), height=16, width=32, num_frames=5), 3),
    ("chronoedit", tp.tiny_chronoedit_pipeline,
     lambda: dict(_wan_prompt(), image=_image(16, 32), height=16, width=32, num_frames=5), 3),
    ("wan_animate", tp.tiny_wan_animate_pipeline, _wan_animate, 2),
    ("cosmos2", tp.tiny_cosmos2_video2world_pipeline,
     lambda: dict(_wan_prompt(), image=_image(16, 32), height=16, width=32, num_frames=5), 3),
    ("hunyuan_video15", tp.tiny_hunyuan_video15_pipeline,
     lambda: dict(tp.tiny_hunyuan_video15_prompt(seed=1), height=16, width=32, num_frames=5), 3),
    ("framepack", tp.tiny_hunyuan_video_framepack_pipeline,
     lambda: dict(tp.tiny_framepack_prompt(seed=1), image=_image(32, 64), height=32, width=64, num_frames=5,
                  latent_window_size=2), 3),
    ("kandinsky5", tp.tiny_kandinsky5_pipeline,
     lambda: dict(tp.tiny_kandinsky5_prompt(seed=1), height=32, width=64, num_frames=5, guidance_scale=2.0), 3),
    ("ltx2", tp.tiny_ltx2_pipeline, _ltx2, 3),
]


def _generate(pipe, kwargs, steps):
    generator = torch.Generator().manual_seed(0)
    return pipe(**kwargs, num_inference_steps=steps, output_type="pt", generator=generator).frames


@pytest.mark.slow  # a few seconds per pipeline on 2 CPU cores
@pytest.mark.parametrize("build, arguments, steps", [p[1:] for p in PIPELINES], ids=[p[0] for p in PIPELINES])
def test_pipeline_runs_sparse_end_to_end(build, arguments, steps):
    pipe = build(seed=0)
    pipe.set_progress_bar_config(disable=True)
    kwargs = arguments()
    ref = _generate(pipe, kwargs, steps)
    proc = P.GNAProcessor(window=(1, 2, 2), stride=1, stats=True)
    integration.enable(pipe, proc)
    out = _generate(pipe, kwargs, steps)
    integration.disable(pipe)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-4, "the sparse generation equals the dense one"
    records = proc.stats.records
    assert {r.step for r in records} == set(range(steps)), "steps counted per generation"
    assert {r.method for r in records} == {"gna"} and all(r.density < 1 for r in records)
    assert torch.equal(_generate(pipe, kwargs, steps), ref), "disable did not restore the dense pipeline"
