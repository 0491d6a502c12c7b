"""What a run draws and when, as functions of the seed and the step (no hidden RNG state):
seeds of independent streams, the data order, the held-out split and the learning rate."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from vdiff_sparse.pipelines.data import DataError

from .config import TrainConfig

# Independent random streams, one per use.
EPOCH_STREAM, NOISE_STREAM, VALIDATION_STREAM, HOLDOUT_STREAM, HELDOUT_NOISE_STREAM, ADAPTER_STREAM = range(6)


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers (independent streams for different tuples)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@functools.lru_cache(maxsize=4)
def _permutation(num_samples: int, seed: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randperm(num_samples, generator=g).tolist())


def holdout_split(num_samples: int, holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """``(training, held_out)`` sample indices: the first ``holdout`` of a seeded permutation
    are held out; both lists are in ascending order.

    Raises:
        DataError: nothing would be left to train on.
    """
    if holdout >= num_samples:
        raise DataError(f"eval.holdout={holdout} leaves none of the {num_samples} samples to train on: "
                         f"lower eval.holdout (0 turns the held-out gap off) or add data")
    held = sorted(_permutation(num_samples, seed_of(seed, HOLDOUT_STREAM))[:holdout])
    return sorted(set(range(num_samples)) - set(held)), held


def global_batch(num_samples: int, global_size: int, seed: int, index: int) -> list[int]:
    """Sample indices of global micro-batch ``index`` (``global_size`` samples: all processes
    together). Each epoch is a fresh seeded permutation; the incomplete tail is dropped.

    Raises:
        DataError: fewer samples than one global micro-batch.
    """
    per_epoch = num_samples // global_size
    if per_epoch == 0:
        raise DataError(
            f"{num_samples} training samples cannot fill one global batch of {global_size} "
            f"(train.batch_size x processes); lower train.batch_size or eval.holdout, or add data"
        )
    epoch, position = divmod(index, per_epoch)
    order = _permutation(num_samples, seed_of(seed, EPOCH_STREAM, epoch))
    return list(order[position * global_size:(position + 1) * global_size])


def lr_factor(config: TrainConfig, step: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based)."""
    if step < config.lr_warmup_steps:
        return (step + 1) / config.lr_warmup_steps
    span = max(1, config.max_steps - config.lr_warmup_steps)
    progress = min(1.0, (step - config.lr_warmup_steps) / span)
    if config.lr_scheduler == "linear":
        return 1.0 - progress
    if config.lr_scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


__all__ = ["global_batch", "holdout_split", "lr_factor", "seed_of"]
