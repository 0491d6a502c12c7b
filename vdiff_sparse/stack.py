"""Walks of the Python call stack (the only place the library reads frames).

Two questions are answered from the stack, both for processors set without
:func:`vdiff_sparse.enable` or transformers enabled without their pipeline:

* which ``torch.nn.Module`` calls are running above a frame, with their arguments
  (:func:`calling_modules`): this reads torch's own frames (``Module._call_impl`` with its
  locals ``self``, ``args``, ``kwargs``), an implementation detail of torch that
  ``tests/test_stack.py`` checks on every torch version the tests run on;
* which diffusers pipeline is running a transformer (:func:`running_pipeline`): a frame whose
  ``self`` is a non-module object with that transformer among its ``transformer*`` components.

``vdiff_sparse.enable(pipe, processor)`` never needs the first: the transformer is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import FrameType
from typing import Any, Iterator

import torch

#: The name of the torch frame that runs a module's forward with its hooks.
MODULE_CALL_FRAME = "_call_impl"


@dataclass(frozen=True)
class ModuleCall:
    """A running ``module(*args, **kwargs)`` found on the stack; ``caller`` is the frame that
    called it."""

    module: torch.nn.Module
    args: tuple
    kwargs: dict
    caller: FrameType | None


def calling_modules(inner: torch.nn.Module, frame: FrameType | None) -> Iterator[ModuleCall]:
    """The module calls running from ``frame`` up whose module contains ``inner``, innermost
    first."""
    while frame is not None:
        if frame.f_code.co_name == MODULE_CALL_FRAME:
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.nn.Module) and any(m is inner for m in owner.modules()):
                yield ModuleCall(owner, frame.f_locals.get("args", ()), frame.f_locals.get("kwargs", {}), frame.f_back)
        frame = frame.f_back


def running_pipeline(frame: FrameType | None, transformer: torch.nn.Module) -> Any:
    """The pipeline object (a non-module ``self`` with ``transformer`` among its
    ``transformer*`` components) of the nearest frame on the stack from ``frame`` up, or
    ``None``."""
    while frame is not None:
        obj = frame.f_locals.get("self")
        if obj is not None and not isinstance(obj, torch.nn.Module):
            components = getattr(obj, "components", None)
            if isinstance(components, dict) and any(
                name.startswith("transformer") and isinstance(c, torch.nn.Module) and getattr(c, "_orig_mod", c) is transformer
                for name, c in components.items()
            ):
                return obj
        frame = frame.f_back
    return None



__all__ = ["MODULE_CALL_FRAME", "ModuleCall", "calling_modules", "running_pipeline"]
