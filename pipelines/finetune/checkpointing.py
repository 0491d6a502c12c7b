"""Checkpoints in safetensors and JSON only: nothing in a checkpoint folder is unpickled, so a
folder from elsewhere cannot run code when resumed from.

A checkpoint ``<output_dir>/checkpoints/step-N`` holds

* ``training_state.json``: the format, the step, what the frozen base was built from (model,
  revision, tiny model seed, expert, LoRA settings; a resume with other settings is refused),
  the evaluations so far, the optimizer's hyper-parameters and scalar state, EMA and
  gradient-scaler scalars;
* ``trainable_weights.safetensors``: the trained parameters (every weight with full
  fine-tuning, the adapters with LoRA) under the bare model's names;
* ``optimizer.safetensors``: the optimizer's tensor state (``<parameter name>/<key>``);
* ``ema.safetensors``: the EMA weights, when EMA is on.

Model and optimizer states go through ``torch.distributed.checkpoint.state_dict``
(full, CPU-offloaded, trainable parameters only), which names them the same way with one
process, DDP or FSDP, so a checkpoint does not depend on the number of processes. Random
number generators are not saved: training draws nothing from global generators (every draw is
seeded by the run's seed and the step).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .config import FinetuneConfig, SetupError
from .models import is_tiny

FORMAT = "vdiff_sparse-finetune-checkpoint-v2"
PREFIX = "step-"
STATE_FILE = "training_state.json"
WEIGHTS_FILE = "trainable_weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
EMA_FILE = "ema.safetensors"


def run_identity(config: FinetuneConfig) -> Dict[str, str]:
    """What the frozen part of the model is rebuilt from on resume; a checkpoint records it."""
    t = config.train
    return {
        "model": config.model.name, "revision": str(config.model.revision), "expert": str(config.model.expert),
        "seed": str(config.seed) if is_tiny(config.model.name) else "",
        "lora": f"rank={t.lora_rank} alpha={t.lora_alpha or t.lora_rank} targets={sorted(t.lora_targets)}"
        if t.lora_rank else "full",
    }


# --- finding checkpoints -------------------------------------------------------------------------
def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(PREFIX):])


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=step_of)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint folder of this trainer (it holds ``training_state.json``)."""
    return (Path(path) / STATE_FILE).is_file()


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder to resume from (``None``: start fresh).

    Args:
        resume: ``None`` (start fresh), ``"latest"`` (the newest checkpoint of ``output_dir``;
            none yet: start fresh) or a checkpoint folder ``<a run's output_dir>/checkpoints/step-N``.
        output_dir: the folder the run writes to.

    Raises:
        SetupError: a fresh start in an ``output_dir`` that already holds checkpoints (its
            pruning and ``"latest"`` would mix the two runs), or ``resume`` is not a checkpoint
            folder of this trainer (a run's ``output_dir`` is named as such, with its
            checkpoints; a folder of pickle files is refused, never loaded).
    """
    if resume in (None, "", "none"):
        existing = checkpoints(output_dir)
        if existing:
            raise SetupError(
                f"output_dir {str(output_dir)!r} already holds checkpoints of an earlier run "
                f"({', '.join(p.name for p in existing)}): continue that run with --resume latest "
                f"(resume=latest), or start a new run in another output_dir (or delete "
                f"{Path(output_dir) / 'checkpoints'} to start over in this one)"
            )
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        if found and not is_checkpoint(found[-1]):
            _refuse_foreign(found[-1])
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise SetupError(f"resume must be 'latest' or a checkpoint folder, got {resume!r} (not a folder)")
    if is_checkpoint(path):
        return path
    if any(path.glob("*.pkl")) or any(path.glob("*.bin")):
        _refuse_foreign(path)
    run_dir = path.parent if path.name == "checkpoints" else path
    found = checkpoints(run_dir)
    if found:
        raise SetupError(
            f"resume={resume!r} is a run's folder, not a checkpoint: resume from one of its checkpoints, "
            f"e.g. the newest, resume={str(found[-1])!r} (all: {', '.join(p.name for p in found)}), or "
            f"set output_dir={str(run_dir)!r} with resume=latest"
        )
    raise SetupError(
        f"resume={resume!r} is not a checkpoint folder (no {STATE_FILE} in it, nor checkpoints "
        f"under {str(run_dir / 'checkpoints')!r}): give 'latest' or a folder <output_dir>/checkpoints/step-N"
    )


def _refuse_foreign(path: Path) -> None:
    raise SetupError(
        f"{str(path)!r} has no {STATE_FILE}: it is not a checkpoint of this trainer (pickle files such as those "
        f"of accelerate's save_state, which earlier versions of this trainer wrote, are never loaded: unpickling "
        f"can run code). Start a new run, or resume from a checkpoint written by this version"
    )


# --- writing -------------------------------------------------------------------------------------
_STATE_OPTIONS = dict(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def _split_optimizer(state: dict) -> tuple[Dict[str, torch.Tensor], dict]:
    """Tensors under ``<parameter>/<key>`` and everything else (JSON-able) of a full optimizer
    state dict keyed by parameter names."""
    tensors, scalars = {}, {}
    for name, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def write_checkpoint(folder: Path, weights: Dict[str, torch.Tensor], optimizer: Dict[str, torch.Tensor],
                     ema: Optional[Dict[str, torch.Tensor]], state: dict) -> None:
    """Write the files of a checkpoint into ``folder`` (``state`` is the JSON part)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(folder / WEIGHTS_FILE))
    save_file(optimizer, str(folder / OPTIMIZER_FILE))
    if ema is not None:
        save_file(ema, str(folder / EMA_FILE))
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")


def save_checkpoint(accelerator, config: FinetuneConfig, step: int, model, optimizer, ema, extra: dict) -> Path:
    """Write checkpoint ``step`` (every process takes part; the main process writes), then prune
    older ones (``train.checkpoints_keep``) and any of later steps.

    ``extra`` goes into ``training_state.json`` (the evaluations so far)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    root = Path(config.output_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:08d}"
    partial = root / f".partial-{step:08d}"
    weights, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(**_STATE_OPTIONS))
    if accelerator.is_main_process:
        if partial.exists():
            shutil.rmtree(partial)
        optim_tensors, optim_json = _split_optimizer(optim_state)
        ema_tensors, ema_json = None, None
        if ema is not None:
            ema_state = ema.state_dict()
            names = [n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
            ema_tensors = {n: t.detach().cpu().contiguous() for n, t in zip(names, ema_state.pop("shadow_params"))}
            ema_json = ema_state
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        state = {"format": FORMAT, "step": step, "identity": run_identity(config), "optimizer": optim_json,
                 "ema": ema_json, "scaler": scaler, **extra}
        write_checkpoint(partial, weights, optim_tensors, ema_tensors, state)
        # Only whole checkpoints carry the step-N name, so "latest" never picks a torn one.
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _prune(config, step)
    accelerator.wait_for_everyone()
    return final


def _prune(config: FinetuneConfig, step: int) -> None:
    import logging

    found = checkpoints(config.output_dir)
    # Later steps are of the run this one left by resuming from an earlier checkpoint: gone, so
    # that "latest" is this run's newest.
    later = [p for p in found if step_of(p) > step]
    if later:
        logging.getLogger(__name__).warning("removing checkpoints %s, later than step %d of this run",
                                            [p.name for p in later], step)
    keep = config.train.checkpoints_keep
    earlier = [p for p in found if step_of(p) < step]
    for old in later + (earlier[:max(0, len(earlier) - keep + 1)] if keep else []):
        shutil.rmtree(old)


# --- reading -------------------------------------------------------------------------------------
def read_checkpoint(folder: str | os.PathLike) -> Dict[str, Any]:
    """Everything a checkpoint holds: ``state`` (the JSON), ``weights``, ``optimizer`` and
    ``ema`` (tensors by name; ``None`` without EMA). Reads safetensors and JSON only.

    Raises:
        SetupError: not a checkpoint of this trainer, of another format, or a file missing.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_checkpoint(folder):
        _refuse_foreign(folder)
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise SetupError(f"{folder / STATE_FILE} is unreadable: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SetupError(f"{folder} is a checkpoint of format {state.get('format') if isinstance(state, dict) else None!r}, "
                         f"this trainer reads {FORMAT!r}")
    files = {"weights": WEIGHTS_FILE, "optimizer": OPTIMIZER_FILE}
    if state.get("ema") is not None:
        files["ema"] = EMA_FILE
    out: Dict[str, Any] = {"state": state, "ema": None}
    for key, name in files.items():
        try:
            out[key] = load_file(str(folder / name))
        except (OSError, RuntimeError, ValueError) as e:  # missing or not a safetensors file
            raise SetupError(f"{folder / name} is missing or unreadable ({e}): the checkpoint is incomplete") from None
    return out


def load_checkpoint(folder: Path, accelerator, config: FinetuneConfig, model, optimizer, ema) -> dict:
    """Restore model, optimizer, EMA and gradient scaler from ``folder``; returns the JSON state
    (``step``, the evaluations so far).

    Raises:
        SetupError: the checkpoint was trained on another base or LoRA setting, or its tensors
            do not match this model's trainable parameters.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    saved = read_checkpoint(folder)
    state = saved["state"]
    identity = run_identity(config)
    differs = {k: (state.get("identity", {}).get(k), v) for k, v in identity.items()
               if state.get("identity", {}).get(k) != v}
    if differs:
        raise SetupError(f"{folder} was trained on another base or LoRA setting (saved, now): {differs}")
    bare = accelerator.unwrap_model(model)
    trainable = [n for n, p in bare.named_parameters() if p.requires_grad]
    if set(saved["weights"]) != set(trainable):
        raise SetupError(f"{folder / WEIGHTS_FILE}: parameter names differ from this model's trainable ones "
                         f"({sorted(set(saved['weights']) ^ set(trainable))[:5]})")
    optim_state = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    for key, tensor in saved["optimizer"].items():
        name, field = key.rsplit("/", 1)
        optim_state["state"].setdefault(name, {})[field] = tensor
    for name, scalars in state["optimizer"]["scalars"].items():
        optim_state["state"].setdefault(name, {}).update(scalars)
    for group, current in zip(optim_state["param_groups"], optimizer.param_groups):
        for key, value in current.items():  # JSON turned tuples (betas) into lists
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
    set_state_dict(model, optimizer, model_state_dict=saved["weights"], optim_state_dict=optim_state,
                   options=StateDictOptions(**{**_STATE_OPTIONS, "strict": False}))
    if ema is not None:
        if saved["ema"] is None:
            raise SetupError(f"{folder} holds no EMA weights but train.ema_decay is set")
        ema.load_state_dict({**state["ema"], "shadow_params": [saved["ema"][n] for n in trainable]})
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    return state


# --- the final weights ---------------------------------------------------------------------------
def save_final(accelerator, model, config: FinetuneConfig, component: str, ema, params) -> tuple[Path, str]:
    """The trained weights in diffusers' formats, EMA weights if EMA is on: LoRA adapters as
    ``final/pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights``), full weights as
    ``final/<component>/`` (``WanTransformer3DModel.from_pretrained``). Returns the folder and
    how to load the weights into the base pipeline ``pipe``."""
    from safetensors.torch import save_file

    final = Path(config.output_dir) / "final"
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    state = accelerator.get_state_dict(model)
    if config.train.lora_rank:
        into = ", load_into_transformer_2=True" if component == "transformer_2" else ""
        how = f"pipe.load_lora_weights({str(final)!r}{into})"
    else:
        how = f"pipe.{component} = WanTransformer3DModel.from_pretrained({str(final / component)!r})"
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if config.train.lora_rank:
            from diffusers import WanPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(unwrapped, state_dict=state))
            # The adapter config travels in the file's metadata: without it load_lora_weights
            # takes lora_alpha = rank, a wrong scale whenever train.lora_alpha differs.
            WanPipeline.save_lora_weights(str(final), transformer_lora_layers=lora,
                                          transformer_lora_adapter_metadata=unwrapped.peft_config["default"].to_dict())
        else:
            target = final / component
            target.mkdir(parents=True, exist_ok=True)
            unwrapped.save_config(str(target))
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      str(target / "diffusion_pytorch_model.safetensors"))
    if ema is not None:
        ema.restore(params)
    accelerator.wait_for_everyone()
    return final, how


__all__ = ["checkpoints", "is_checkpoint", "load_checkpoint", "read_checkpoint", "resolve_resume", "run_identity",
           "save_checkpoint", "save_final", "step_of", "write_checkpoint"]
