"""Sparse attention under diffusers' context parallelism (Ulysses), and the set-up that enables it.

With ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))`` the
model's ``_cp_plan`` splits the video tokens into ``P`` contiguous chunks, one per rank, so a
processor sees ``[B, N / P, heads, D]``. A sparse plan needs the whole latent grid, so the
processors exchange q, k and v by all-to-all (:func:`sequence_to_heads`): each rank then holds
all ``N`` tokens of ``heads / P`` heads, plans and runs the method on those heads, and
exchanges the output back (:func:`heads_to_sequence`). Every method selects per head (no
selection reduces over heads), so each head's plan is the one a single process makes.
Always-attended extra keys (text) come whole to every rank (no ``_cp_plan`` of diffusers splits
them) and are cut to the rank's heads (:func:`local_heads`). Dense parts (warm-up steps, dense
layers, text queries, cross-attention) go through diffusers' ``dispatch_attention_fn``, which
does its own Ulysses exchange.

Supported: Ulysses (``ulysses_degree > 1``, ``ring_degree == 1``) with token counts that divide
evenly (diffusers' own sharder requires it) and head counts divisible by the degree. Refused
with a clear error: ring attention and ``ulysses_anything`` on sparse layers.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def context_parallel_config(parallel_config: Any):
    """The ``ContextParallelConfig`` inside a diffusers ``ParallelConfig`` (or the config
    itself), or ``None`` when context parallelism is off."""
    if parallel_config is None:
        return None
    return getattr(parallel_config, "context_parallel_config", parallel_config)


def check_ulysses(cp_config: Any, heads: int, where: str) -> int:
    """The Ulysses degree of ``cp_config`` for a sparse layer of ``heads`` heads.

    Raises:
        NotImplementedError: ring attention (``ring_degree > 1``) or ``ulysses_anything``.
        ValueError: ``heads`` is not divisible by the degree.
    """
    if cp_config.ring_degree > 1:
        raise NotImplementedError(
            f"{where}: context parallelism with ring_degree={cp_config.ring_degree} is not supported by the sparse "
            f"processors; use Ulysses (ContextParallelConfig(ulysses_degree=N), ring_degree=1)"
        )
    if getattr(cp_config, "ulysses_anything", False):
        raise NotImplementedError(
            f"{where}: ulysses_anything (uneven token splits) is not supported by the sparse processors; use a "
            f"latent size whose token count divides by ulysses_degree={cp_config.ulysses_degree}"
        )
    degree = cp_config.ulysses_degree
    if heads % degree:
        raise ValueError(
            f"{where}: {heads} attention heads cannot be split over ulysses_degree={degree} ranks; use a degree "
            f"that divides the head count ({[d for d in range(1, heads + 1) if heads % d == 0]})"
        )
    return degree


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """All-to-all of dim 0 (one slice per rank), differentiable."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    out = all_to_all_single_autograd(x.contiguous().flatten(), None, None, group)
    if hasattr(out, "wait"):
        out = out.wait()
    return out.view(x.shape)


def sequence_to_heads(x: torch.Tensor, cp_config: Any) -> torch.Tensor:
    """``[B, N / P, H, D]`` (this rank's tokens, all heads) -> ``[B, N, H / P, D]`` (all tokens in
    order, this rank's heads)."""
    group = cp_config._ulysses_mesh.get_group()
    degree = cp_config.ulysses_degree
    B, n_local, H, D = x.shape
    chunks = x.reshape(B, n_local, degree, H // degree, D).permute(2, 0, 1, 3, 4)  # [P, B, n, H/P, D]
    gathered = _all_to_all(chunks, group)  # [P (source rank = token chunk), B, n, H/P, D]
    return gathered.permute(1, 0, 2, 3, 4).reshape(B, degree * n_local, H // degree, D)


def heads_to_sequence(x: torch.Tensor, cp_config: Any) -> torch.Tensor:
    """Inverse of :func:`sequence_to_heads`: ``[B, N, H / P, D]`` -> ``[B, N / P, H, D]``."""
    group = cp_config._ulysses_mesh.get_group()
    degree = cp_config.ulysses_degree
    B, n, h_local, D = x.shape
    chunks = x.reshape(B, degree, n // degree, h_local, D).permute(1, 0, 2, 3, 4)  # [P (token chunk), B, n/P, H/P, D]
    gathered = _all_to_all(chunks, group)  # [P (source rank = head group), B, n/P, H/P, D]
    return gathered.permute(1, 2, 0, 3, 4).reshape(B, n // degree, degree * h_local, D)


def local_heads(x: torch.Tensor | None, cp_config: Any) -> torch.Tensor | None:
    """This rank's heads of a tensor every rank holds whole, ``[B, Ne, H, D]`` -> ``[B, Ne, H / P, D]``."""
    if x is None:
        return None
    degree = cp_config.ulysses_degree
    rank = cp_config._ulysses_mesh.get_local_rank()
    h_local = x.shape[2] // degree
    return x[:, :, rank * h_local:(rank + 1) * h_local]


def enable_context_parallel(transformer: torch.nn.Module, ulysses_degree: int):
    """``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=...))`` that
    also runs on CPU processes (gloo): diffusers 0.42 picks the rank's device with
    ``rank % torch.accelerator.device_count()``, which divides by zero without an accelerator;
    on CPU this does the same steps (config set-up on a ``cpu`` mesh, the processors'
    ``_parallel_config``, the model's ``_cp_plan`` hooks) itself. ``torch.distributed`` must be
    initialised. Returns the ``ParallelConfig``.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: the model has no ``_cp_plan`` (diffusers has no context parallelism for it)
            or the degree does not divide the world size.
    """
    from diffusers import ContextParallelConfig
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ParallelConfig

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised (e.g. run under torchrun) for context parallelism")
    if getattr(transformer, "_cp_plan", None) is None:
        raise ValueError(
            f"{type(transformer).__name__} has no context-parallel plan (_cp_plan) in diffusers; context parallelism "
            f"needs one (Wan, LTX-Video and their variants have it)"
        )
    world = dist.get_world_size()
    if world % ulysses_degree:
        raise ValueError(f"ulysses_degree={ulysses_degree} must divide the world size {world}")
    cp = ContextParallelConfig(ulysses_degree=ulysses_degree)
    if torch.accelerator.is_available() and torch.accelerator.device_count() > 0:
        transformer.enable_parallelism(config=cp)
        return transformer._parallel_config
    config = ParallelConfig(context_parallel_config=cp)
    mesh = dist.device_mesh.init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    config.setup(dist.get_rank(), world, torch.device("cpu"), mesh=mesh)
    transformer._parallel_config = config
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(transformer, cp, transformer._cp_plan)
    return config


def init_distributed() -> tuple[int, int]:
    """Initialise ``torch.distributed`` from torchrun's environment (``nccl`` on CUDA, ``gloo``
    on CPU) if it is not yet; returns ``(rank, world_size)`` (``(0, 1)`` outside torchrun)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    return dist.get_rank(), dist.get_world_size()


__all__ = [
    "check_ulysses",
    "context_parallel_config",
    "enable_context_parallel",
    "heads_to_sequence",
    "init_distributed",
    "local_heads",
    "sequence_to_heads",
]
