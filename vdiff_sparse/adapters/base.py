"""Model adapters: where each diffusers video transformer keeps its video self-attention.

An adapter knows one model family: which attention modules are video self-attention (and their
layer order), how to read the latent grid and the timestep from the transformer's forward
inputs, which processor the model uses by default, and how its default processor computes
q/k/v. Its :meth:`ModelAdapter.forward` repeats that computation exactly (projections, norms,
RoPE, fused projections, text streams) and hands the video part to ``attend``, the processor's
attention over video tokens; text queries and everything else stay on the dense path.

Adding a model: subclass :class:`ModelAdapter` in a new file of this package and decorate it
with :func:`register_adapter`; every module of the package is imported (so registered) the
first time the adapters are looked up.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..checks import Grid


class AttendFn(Protocol):
    """The processor's attention for one video self-attention layer.

    Called, it runs the layer's method on video tokens: ``q, k, v`` ``[B, N, heads, D]``
    (frame-major, ``N = T*H*W``); ``extra_k, extra_v`` ``[B, Ne, heads, D]`` keys every video
    query attends (text), with ``extra_mask`` ``[B, Ne]`` bool (False = padding). Returns
    ``[B, N, heads, D]``. :meth:`dense` is dense attention through diffusers' attention
    dispatcher on the backend set on the model (for text queries): ``q`` ``[B, Sq, heads, D]``,
    ``k, v`` ``[B, Sk, heads, D]``, ``key_mask`` ``[B, Sk]`` bool. ``grid``: the latent grid
    ``(T, H, W)`` of this call, for models whose attention runs over more tokens than the
    grid's (FramePack's history).
    """

    grid: Grid

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        extra_k: torch.Tensor | None = None,
        extra_v: torch.Tensor | None = None,
        extra_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def dense(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class AttentionCall:
    """The arguments an attention module gave its processor, read in the usual order
    ``(hidden_states, encoder_hidden_states, attention_mask, rotary_emb)`` by position or by
    name (the rotary embedding also as ``image_rotary_emb``). ``more_args``: positional
    arguments after those four (LTX-2's ``key_rotary_emb``); ``more_kwargs``: every other keyword
    given as something other than None (None is a processor's default)."""

    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor | None
    attention_mask: torch.Tensor | None
    rotary_emb: Any
    more_args: tuple
    more_kwargs: dict


def read_call(args: tuple, kwargs: dict) -> AttentionCall:
    """Read a processor call ``processor(attn, *args, **kwargs)`` (see :class:`AttentionCall`)."""
    values = list(args[:4]) + [None] * (4 - min(len(args), 4))
    rest = dict(kwargs)
    for i, names in enumerate((("hidden_states",), ("encoder_hidden_states",), ("attention_mask",),
                               ("rotary_emb", "image_rotary_emb"))):
        for name in names:
            if name in rest:
                values[i] = rest.pop(name)
    return AttentionCall(*values, tuple(args[4:]), {k: v for k, v in rest.items() if v is not None})


class ModelAdapter:
    """One model family. Subclasses set the class attributes and implement the methods."""

    #: short family name used in presets and messages
    name: str = ""
    #: class names of the transformers of this family
    transformer_classes: tuple[str, ...] = ()
    #: forward argument that carries the diffusion timestep
    timestep_arg: str = "timestep"
    #: whether the timestep grows as denoising proceeds (Mochi: ``1000 * (1 - sigma)``); the
    #: step counter needs the direction
    timestep_increases: bool = False
    #: keyword arguments of the model's attention call (other than the mask and the rotary
    #: embedding) that :meth:`forward` takes; a video self-attention call with any other (not
    #: None) keyword is one the adapter does not handle
    call_kwargs: tuple[str, ...] = ()

    def grid(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> Grid | None:
        """The latent grid ``(T, H, W)`` after patchify from the forward inputs (by name),
        or ``None`` if these inputs do not tell it."""
        raise NotImplementedError

    def video_attention(self, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """``(name, module)`` of every video self-attention module, in layer order."""
        raise NotImplementedError

    def default_processor(self, transformer: torch.nn.Module, name: str, module: torch.nn.Module):
        """A new instance of the processor ``transformer`` gives its attention ``module`` (named
        ``name``) by default."""
        cls = getattr(module, "_default_processor_cls", None)
        if cls is not None:
            return cls()
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0()

    def unsupported(self, attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs) -> str | None:
        """Why :meth:`forward` cannot handle this call of a video self-attention module (e.g.
        ``"an attention_mask of shape (1, 1, 60, 60)"``), or ``None`` when it can; ``kwargs``
        are those of :attr:`call_kwargs` the call gave. The processor then raises
        ``NotImplementedError`` (or runs the model's processor when the layer is scheduled
        dense)."""
        return None

    def forward(self, attn, attend: AttendFn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                **kwargs):
        """The default processor's computation with video attention done by ``attend``; ``kwargs``
        are those of :attr:`call_kwargs` the call gave."""
        raise NotImplementedError


_ADAPTERS: dict[str, ModelAdapter] = {}
_REFUSED: dict[str, str] = {}
_LOADED = False


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make ``cls`` the adapter of its ``transformer_classes``."""
    adapter = cls()
    for name in cls.transformer_classes:
        _ADAPTERS[name] = adapter
    return cls


def refuse_model(class_name: str, reason: str) -> None:
    """Record why transformer class ``class_name`` has no adapter; the refusal says it."""
    _REFUSED[class_name] = reason


def refusal_reason(transformer: torch.nn.Module) -> str | None:
    """Why ``transformer``'s class is refused, if :func:`refuse_model` said; ``None`` otherwise."""
    _load_package_adapters()
    return _REFUSED.get(type(transformer).__name__)


def _load_package_adapters() -> None:
    """Import every module of ``vdiff_sparse.adapters`` once: each registers its adapter."""
    global _LOADED
    if _LOADED:
        return
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__package__}.{info.name}")
    _LOADED = True


def supported_models() -> list[str]:
    """Class names of the transformers that have an adapter."""
    _load_package_adapters()
    return sorted(_ADAPTERS)


def model_families() -> list[str]:
    """The family names of the registered adapters (what a model preset's ``family:`` names)."""
    _load_package_adapters()
    return sorted({adapter.name for adapter in _ADAPTERS.values()})


def adapter_for(transformer: torch.nn.Module) -> ModelAdapter | None:
    """The adapter of ``transformer``'s class (or of a base class), or ``None``."""
    _load_package_adapters()
    for cls in type(transformer).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__]
    return None


def patched_grid(shape: tuple[int, int, int], patch: tuple[int, int, int]) -> Grid:
    """Latent ``(frames, height, width)`` -> token grid for a ``(p_t, p_h, p_w)`` patchify."""
    return tuple(n // p for n, p in zip(shape, patch))  # type: ignore[return-value]


def describe_mask(attention_mask: torch.Tensor | None) -> str | None:
    """``"an attention_mask of shape (...)"`` for messages, or ``None`` without a mask."""
    return None if attention_mask is None else f"an attention_mask of shape {tuple(attention_mask.shape)}"


def key_mask_from(attention_mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
    """A boolean key-padding mask ``[B, S]`` from a ``[B, S]`` or ``[B, 1, 1, S]`` mask, or
    ``None`` if it is absent; anything else (per-query masks) raises ``NotImplementedError``."""
    if attention_mask is None:
        return None
    mask = attention_mask
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0]
    if mask.dim() != 2 or mask.shape[1] != total:
        raise NotImplementedError(
            f"only key-padding masks [B, S] or [B, 1, 1, S] with S={total} are supported, "
            f"got {tuple(attention_mask.shape)}"
        )
    return mask if mask.dtype == torch.bool else mask > 0


def joint_attention(
    attend: AttendFn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    video: slice,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Attention over one joint sequence of video tokens (a contiguous ``video`` slice) and other
    tokens (text, FramePack's history) before and after it, ``[B, S, heads, D]``.

    Video queries go through ``attend`` with every other token as an always-attended extra key;
    the other queries attend every key densely (``attend.dense``: diffusers' dispatcher on the
    model's backend). ``key_mask`` ``[B, S]`` bool marks the
    real keys (text padding False). Returns ``[B, S, heads, D]`` in the input's token order.
    """
    start, stop, _ = video.indices(q.shape[1])
    before, after = slice(0, start), slice(stop, None)

    def others(x):
        return torch.cat([x[:, before], x[:, after]], dim=1)

    extra_mask = None if key_mask is None else others(key_mask)
    out_video = attend(q[:, video], k[:, video], v[:, video], others(k), others(v), extra_mask)
    out_others = attend.dense(others(q), k, v, key_mask)
    return torch.cat([out_others[:, :start], out_video, out_others[:, start:]], dim=1)


def head_dim(attn) -> int:
    """The head dimension of an attention module, from its configuration (not from a projection's
    output, which holds only this rank's heads under tensor parallelism)."""
    value = getattr(attn, "head_dim", None)
    if isinstance(value, int):
        return value
    return attn.inner_dim // attn.heads


def split_heads(x: torch.Tensor, attn) -> torch.Tensor:
    """``[B, N, heads * D]`` -> ``[B, N, heads, D]`` for however many heads ``x`` holds: all of
    them, or this rank's share under tensor parallelism (column-sharded projections)."""
    return x.unflatten(-1, (-1, head_dim(attn)))


def is_tensor_parallel(attn) -> bool:
    """Whether the module's q projection is sharded across ranks (``DTensor`` weights, as
    ``torch.distributed.tensor.parallel.parallelize_module`` leaves them)."""
    weight = getattr(getattr(attn, "to_q", None), "weight", None)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(weight, DTensor)


def qkv_heads(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, N, heads, D]`` of tokens ``x`` through the module's ``to_q``/``to_k``/``to_v``
    and its per-head ``norm_q``/``norm_k`` where it has them (any number of local heads)."""
    query, key, value = (split_heads(p(x), attn) for p in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def text_qkv(attn, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, L, heads, D]`` of the text tokens through a joint-attention module's added
    projections (``add_q_proj``, ...) and its added per-head norms where it has them."""
    eq, ek, ev = (split_heads(p(encoder_hidden_states), attn) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if attn.norm_added_q is not None:
        eq = attn.norm_added_q(eq)
    if attn.norm_added_k is not None:
        ek = attn.norm_added_k(ek)
    return eq, ek, ev


def check_grid_matches(grid: Grid, num_tokens: int, where: str) -> None:
    if math.prod(grid) != num_tokens:
        raise ValueError(
            f"the latent grid {tuple(grid)} has {math.prod(grid)} tokens but {where} has "
            f"{num_tokens} video tokens; the grid must be (T, H, W) after patchify with "
            f"T*H*W == number of video tokens (set it with vdiff_sparse.set_context(model, grid=...) "
            f"or let the transformer's forward pre-hook infer it)"
        )

