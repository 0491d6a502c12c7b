"""The stack walks of ``vdiff_sparse.stack`` against the torch and diffusers running here: if a
torch release renames ``Module._call_impl`` or its locals, or pipelines stop holding their
transformers as components, these tests fail before any processor silently loses its context."""

from __future__ import annotations

import sys

import torch

from vdiff_sparse.stack import MODULE_CALL_FRAME, calling_modules, running_pipeline


class Inner(torch.nn.Module):
    def forward(self, x):
        self.seen = list(calling_modules(self, sys._getframe()))
        return x


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x, *, scale=1.0):
        return self.inner(x * scale)


def test_module_calls_are_found_with_their_arguments():
    outer = Outer()
    x = torch.ones(2)
    outer(x, scale=3.0)
    modules = [call.module for call in outer.inner.seen]
    assert modules == [outer.inner, outer], f"torch's module call frame is no longer {MODULE_CALL_FRAME!r}"
    call = outer.inner.seen[1]
    assert call.args[0] is x and call.kwargs == {"scale": 3.0}
    frame, names = call.caller, []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    assert "test_module_calls_are_found_with_their_arguments" in names[:3]


def test_a_module_that_does_not_contain_the_inner_one_is_skipped():
    other = Outer()
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.extend(calling_modules(other.inner, sys._getframe()))
            return x

    Probe()(torch.ones(1))
    assert seen == []


def test_running_pipeline_finds_the_pipeline_holding_the_transformer():
    from vdiff_sparse.tiny_models import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    found = []

    def hook(module, args, kwargs):
        found.append(running_pipeline(sys._getframe(1), module))

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(prompt="a cat", num_frames=5, height=32, width=48, num_inference_steps=1, output_type="latent")
    finally:
        handle.remove()
    assert found and all(p is pipe for p in found)
    assert running_pipeline(sys._getframe(), pipe.transformer) is None  # not called from a pipeline
