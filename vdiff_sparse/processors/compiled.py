"""The processors' video attention as one PyTorch custom op, for code ``torch.compile`` traces.

Inside a compiled graph a processor's per-layer work (the schedule's dense or sparse decision for
this step and layer, the layer's method and settings, selection, the backend, statistics) runs
as the op ``vdiff_sparse::video_attention``: the graph holds one opaque node per attention call,
whose output shape the op's fake implementation gives, so the graph is captured whole
(``fullgraph=True``) and does not depend on the layer or the step. The layer reaches the op as a
CPU int64 scalar (its binding's ``handle``) and the processor as another (its id): dynamo
guards neither value, so one graph serves every layer of a repeated block, every processor set
on the model in turn, and the warm-up steps and the sparse steps alike. Outside compiled code the processors call the same eager function directly.

Gradients: the op's backward runs the eager attention again with autograd on and
differentiates it (the forward is computed twice when training a compiled model).
"""

from __future__ import annotations

import contextlib
import itertools
import weakref

import torch

from ..context import binding_from_handle

_PROCESSORS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_IDS = itertools.count()


def register_processor(processor) -> torch.Tensor:
    """A CPU int64 scalar that names ``processor`` to the op (made when the processor is, never
    in traced code)."""
    ident = next(_IDS)
    _PROCESSORS[ident] = processor
    return torch.tensor(ident, dtype=torch.int64)


def _run(q, k, v, extra_k, extra_v, extra_mask, handle, processor, record: bool, training: bool):
    found = _PROCESSORS.get(int(processor))
    if found is None:
        raise RuntimeError(f"the processor (id {int(processor)}) of this compiled graph no longer exists")
    binding = binding_from_handle(int(handle))
    return found.attend_layer(q, k, v, extra_k, extra_v, extra_mask, binding=binding, record=record,
                              training=training)


@torch.library.custom_op("vdiff_sparse::video_attention", mutates_args=())
def video_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_k: torch.Tensor | None,
                    extra_v: torch.Tensor | None, extra_mask: torch.Tensor | None, handle: torch.Tensor,
                    processor: torch.Tensor, token: torch.Tensor, training: bool) -> torch.Tensor:
    """Video self-attention of one layer: ``q, k, v`` ``[B, N, heads, D|Dv]``, always-attended
    ``extra_k/extra_v`` ``[B, Ne, heads, D|Dv]`` with ``extra_mask`` ``[B, Ne]`` bool, the
    layer's binding ``handle`` and the processor's id -> ``[B, N, heads, Dv]``. ``token`` is
    not read: as an input it orders the op after the pre-hook's context update. ``training``:
    the caller's grad mode (inside the op it is always off), so no plan is reused for a step
    whose output is differentiated."""
    out = _run(q, k, v, extra_k, extra_v, extra_mask, handle, processor, record=True, training=training)
    # A custom op's output may not alias its inputs; only a method that returns a view of v
    # (none does today) pays for a copy.
    inputs = {x.untyped_storage().data_ptr() for x in (q, k, v, extra_k, extra_v) if x is not None}
    return out.clone() if out.untyped_storage().data_ptr() in inputs else out


@video_attention.register_fake
def _(q, k, v, extra_k, extra_v, extra_mask, handle, processor, token, training):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@contextlib.contextmanager
def _recording_autograd():
    """Grad mode on, with autograd's dispatch keys back in. A custom op's implementation runs
    below autograd (those keys excluded), where plain torch ops record no graph whatever the
    grad mode; only ``autograd.Function`` s would, so without this the recomputation of a method
    built of plain ops (PSA's, GNA's) would have nothing to differentiate."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView"):
        exclude = exclude.remove(getattr(torch._C.DispatchKey, name))
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


@torch.library.custom_op("vdiff_sparse::video_attention_backward", mutates_args=())
def video_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             extra_k: torch.Tensor | None, extra_v: torch.Tensor | None,
                             extra_mask: torch.Tensor | None, handle: torch.Tensor,
                             processor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor]:
    """Gradients of :func:`video_attention` for ``q, k, v, extra_k, extra_v`` (an empty tensor
    for absent extra keys): the eager attention run again with autograd on."""
    leaves = [None if x is None else x.detach().requires_grad_(True) for x in (q, k, v, extra_k, extra_v)]
    with _recording_autograd():
        out = _run(*leaves, extra_mask, handle, processor, record=False, training=True)
        present = [x for x in leaves if x is not None]
        grads = iter(torch.autograd.grad(out, present, grad_out, allow_unused=True))
    result = []
    for x in leaves:
        if x is None:
            result.append(q.new_empty(0))
            continue
        g = next(grads)
        result.append(torch.zeros_like(x) if g is None else g)
    return tuple(result)


@video_attention_backward.register_fake
def _(grad_out, q, k, v, extra_k, extra_v, extra_mask, handle, processor):
    return tuple(q.new_empty(0) if x is None else torch.empty_like(x) for x in (q, k, v, extra_k, extra_v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, extra_k, extra_v, extra_mask, handle, processor, _token, _training = inputs
    ctx.save_for_backward(q, k, v, extra_k, extra_v, extra_mask, handle, processor)
    ctx.has_extra = extra_k is not None


def _backward(ctx, grad_out):
    q, k, v, extra_k, extra_v, extra_mask, handle, processor = ctx.saved_tensors
    dq, dk, dv, dek, dev = video_attention_backward(grad_out, q, k, v, extra_k, extra_v, extra_mask, handle,
                                                    processor)
    if not ctx.has_extra:
        dek = dev = None
    return dq, dk, dv, dek, dev, None, None, None, None, None


video_attention.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["register_processor", "video_attention", "video_attention_backward"]
