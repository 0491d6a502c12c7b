"""Shared pieces of the fine-tuning tests (tests/test_finetune*.py): tiny clips with captions,
short runs of the tiny configs, and bit-for-bit comparison of runs.

The runs are tiny (clips of 9 frames at 48x80 -> a 3x3x5 token grid, VMoBA blocks small enough
that every partition has several blocks) so each step takes a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vdiff_sparse.pipelines import finetune as ft

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "finetune"
TINY_CONFIG = CONFIGS / "tiny_wan_vmoba.yaml"
CAPTIONS = ["a red cat runs on the beach", "a blue dog in snow", "the cat on a video", "a dog runs in the snow",
            "a red dog on the beach"]

# Full fine-tuning with a global batch of 2 (one process), gradient accumulation and EMA.
FULL = ("train.batch_size=2", "train.grad_accum=2", "train.ema_decay=0.9")
LORA = ("train.lora_rank=4", "train.lr=1e-2")


def write_clip(path: Path, seed: int, frames: int = 9, size=(48, 80)) -> None:
    import imageio

    rng = np.random.default_rng(seed)
    # Smooth moving gradients (not noise), so the codec keeps them recognisable.
    t, y, x = np.meshgrid(np.arange(frames), np.arange(size[0]), np.arange(size[1]), indexing="ij")
    phase = rng.uniform(0, 2 * np.pi, 3)
    video = np.stack([127 + 120 * np.sin(x / 9 + y / 13 + t / 3 + p) for p in phase], -1)
    imageio.mimwrite(str(path), video.astype(np.uint8), fps=8)


def write_dataset(root: Path) -> Path:
    """Five captioned clips (four train, one is held out) and ``captions.jsonl`` in ``root``."""
    lines = []
    for i, caption in enumerate(CAPTIONS):
        write_clip(root / f"clip{i}.mp4", seed=100 + i)
        lines.append(json.dumps({"video": f"clip{i}.mp4", "caption": caption}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def overrides(videos: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={output_dir}", f"data.video_dir={videos}", f"data.captions={videos / 'captions.jsonl'}",
        f"data.cache_dir={videos / 'cache'}", "train.max_steps=4", "train.checkpoint_every=2",
        "validation.every=0", *extra,
    ]


def run(videos: Path, output_dir: Path, *extra: str, config: Path | str = TINY_CONFIG) -> ft.RunResult:
    return ft.train(ft.load_config(config, overrides(videos, output_dir, *extra)))


def final_weights(result_dir: Path, component: str = "transformer") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    lora = result_dir / "final" / "pytorch_lora_weights.safetensors"
    full = result_dir / "final" / component / "diffusion_pytorch_model.safetensors"
    return load_file(str(lora if lora.exists() else full))


def assert_identical(expected, actual, where="state") -> None:
    """Nested dicts / lists of tensors and numbers are equal bit for bit (dtypes included)."""
    assert type(expected) is type(actual), f"{where}: {type(expected)} vs {type(actual)}"
    if isinstance(expected, torch.Tensor):
        assert expected.dtype == actual.dtype and torch.equal(expected, actual), where
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), f"{where}: keys {expected.keys() ^ actual.keys()}"
        for key in expected:
            assert_identical(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), where
        for i, (a, b) in enumerate(zip(expected, actual)):
            assert_identical(a, b, f"{where}[{i}]")
    else:
        assert expected == actual, f"{where}: {expected!r} vs {actual!r}"


def assert_same_run(reference: Path, run_dir: Path, component: str = "transformer") -> None:
    """Same final weights, the same last checkpoint (weights, optimizer, EMA, step, evaluations)
    and the same report."""
    assert [p.name for p in ft.checkpoints(run_dir)] == [p.name for p in ft.checkpoints(reference)]
    assert_identical(final_weights(reference, component), final_weights(run_dir, component), "final")
    assert_identical(ft.read_checkpoint(ft.checkpoints(reference)[-1]), ft.read_checkpoint(ft.checkpoints(run_dir)[-1]),
                     "checkpoint")
    expected, actual = (json.loads((d / "final" / "report.json").read_text()) for d in (reference, run_dir))
    assert_identical({k: v for k, v in expected.items() if k != "load"},
                     {k: v for k, v in actual.items() if k != "load"}, "report")


def tiny_inputs_of(transformer, seed: int = 0, batch: int = 1, text_len: int = 16) -> dict:
    """Forward kwargs for a tiny Wan T2V transformer on a 3x6x10 latent (3x3x5 tokens)."""
    g = torch.Generator().manual_seed(seed)
    channels = transformer.config.in_channels
    return {"hidden_states": torch.randn(batch, channels, 3, 6, 10, generator=g), "timestep": torch.tensor([500.0] * batch),
            "encoder_hidden_states": torch.randn(batch, text_len, 32, generator=g), "return_dict": False}
