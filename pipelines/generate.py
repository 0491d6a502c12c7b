"""Video generation with a sparse attention processor: :class:`SparseVideoPipeline`.

Wraps any diffusers video pipeline whose transformer vdiff_sparse has an adapter for (Wan 2.1 /
2.2, HunyuanVideo, CogVideoX, LTX, Mochi). Three ways to get one::

    SparseVideoPipeline.tiny()                          # built-in random tiny Wan, no download
    SparseVideoPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    SparseVideoPipeline.from_pipe(diffusers_pipe)

then ``set_attn_processor(PSAProcessor(stats=True))`` and call it. Sizes the model cannot take
are rounded to the nearest valid ones (with a warning), using the pipeline's own VAE
compression factors and the transformer's patch size, never constants.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

TINY_MODEL = "tiny"  # the model name of the built-in tiny pipeline in reports


class ModelNotAvailableError(OSError):
    """The model's weights are not on this machine and cannot (or may not) be downloaded."""


@dataclass
class GenerationResult:
    """One generated video.

    Attributes:
        frames: ``[F, H, W, 3]`` uint8 RGB frames.
        latency_s: wall time of the pipeline call (text encoding, denoising, VAE decoding),
            device synchronised.
        stats: ``method``, ``settings`` (prompt, sizes, steps, seed, model), ``grid`` (latent
            token grid after patchify), ``num_tokens``, ``inner_dim`` (heads x head dim of the
            transformer) and, when the processor collects stats, ``calls`` (one dict per video
            self-attention call: layer, step, method, num_tokens, coverage, density,
            time_ms, dense_reason) and ``attention_s`` (their total time).
    """

    frames: np.ndarray
    latency_s: float
    stats: dict = field(default_factory=dict)


# --- processors --------------------------------------------------------------------------------
def tiny_defaults() -> dict:
    """``configs/generate/tiny.yaml``: the tiny model's default size and per-method settings."""
    from omegaconf import OmegaConf

    text = (importlib.resources.files("vdiff_sparse.configs") / "generate" / "tiny.yaml").read_text()
    return OmegaConf.to_container(OmegaConf.create(text), resolve=True)


def read_settings_file(path: str | os.PathLike) -> dict:
    """Method settings from a YAML file: ``config:`` and/or ``schedule:`` sections, or the
    fields of either at top level. Returns one flat ``{field: value}`` mapping."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ValueError(f"config file {str(path)!r} is not plain YAML ({str(err).splitlines()[0]}); "
                         f"tags such as !!python/... are not read") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    if set(data) & {"config", "schedule"}:
        extra = sorted(set(data) - {"config", "schedule"})
        if extra:
            raise ValueError(f"config file {str(path)!r}: keys {extra} beside config/schedule sections")
        return {**(data.get("config") or {}), **(data.get("schedule") or {})}
    return data


def generation_processor(method: str, *, preset: str | None = None,
                         config_file: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None,
                         defaults: Mapping[str, Any] | None = None, stats: bool = True, backend: str = "auto"):
    """A processor for registered method ``method`` (``dense``, ``gna``, ``psa``, ``vmoba``, ...).

    Settings, later ones winning: the method's defaults, the preset ``preset`` (else
    ``defaults``, e.g. the tiny model's), the YAML ``config_file``, ``overrides``.

    Raises:
        ValueError: unknown method, preset, option name or a bad value.
    """
    from ..methods import get_method
    from ..processors import build_processor

    spec = get_method(method)
    settings: dict = {} if preset is not None else dict(defaults or {})
    if config_file is not None:
        settings = spec.merge(settings, read_settings_file(config_file))
    settings = spec.merge(settings, overrides or {})
    return build_processor(method, preset=preset, settings=settings, stats=stats, backend=backend)


# --- sizes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SizeRules:
    """What frame counts and frame sizes a pipeline takes.

    ``num_frames = 1 + temporal * k`` with the latent frame count ``k + 1`` a multiple of
    ``patch_t``; ``height`` and ``width`` multiples of ``spatial_h`` / ``spatial_w``. One video
    token covers ``token_h`` x ``token_w`` pixels (VAE compression x patch size; the spatial
    multiples can be larger where the pipeline demands it).
    """

    temporal: int
    patch_t: int
    spatial_h: int
    spatial_w: int
    token_h: int
    token_w: int

    def valid_frames(self, n: int) -> bool:
        return n >= 1 and (n - 1) % self.temporal == 0 and ((n - 1) // self.temporal + 1) % self.patch_t == 0

    def nearest_frames(self, n: int) -> int:
        step = self.temporal * self.patch_t
        first = 1 + self.temporal * (self.patch_t - 1)  # smallest valid count
        k = max(0, round((n - first) / step))
        return first + step * k

    def describe(self) -> str:
        frames = f"1 + {self.temporal}k" if self.patch_t == 1 else (
            f"1 + {self.temporal}k with k + 1 a multiple of {self.patch_t}")
        return f"frames = {frames}; height a multiple of {self.spatial_h}; width a multiple of {self.spatial_w}"


def _patch(transformer) -> tuple[int, int, int]:
    cfg = transformer.config
    p = getattr(cfg, "patch_size", 1)
    if isinstance(p, (tuple, list)):
        return tuple(int(x) for x in p) if len(p) == 3 else (1, int(p[0]), int(p[1]))
    pt = getattr(cfg, "patch_size_t", None)
    return (int(pt) if pt else 1, int(p or 1), int(p or 1))


# Frame-size multiples that diffusers pipelines' ``check_inputs`` hard-code beside their VAE
# and patch sizes (diffusers 0.42), by pipeline module.
_PIPELINE_PIXEL_MULTIPLE = {"wan": 16, "hunyuan_video": 16, "cogvideo": 8, "ltx": 32, "mochi": 8}


def size_rules(pipe) -> SizeRules:
    """The :class:`SizeRules` of a diffusers video pipeline, from its VAE compression factors
    (``vae_scale_factor_spatial/temporal``, LTX's ``vae_spatial/temporal_compression_ratio`` or
    Mochi's ``vae_spatial/temporal_scale_factor``), its transformer's patch size and the multiple
    its ``check_inputs`` demands."""
    def first_attribute(*names):
        return next((getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None), None)

    spatial = first_attribute("vae_scale_factor_spatial", "vae_spatial_compression_ratio", "vae_spatial_scale_factor")
    temporal = first_attribute("vae_scale_factor_temporal", "vae_temporal_compression_ratio",
                               "vae_temporal_scale_factor")
    if spatial is None or temporal is None:
        raise NotImplementedError(
            f"{type(pipe).__name__} does not say its VAE compression (vae_scale_factor_spatial/temporal "
            "or the LTX / Mochi names of them)"
        )
    pt, ph, pw = _patch(pipe.transformer)
    family = type(pipe).__module__.split(".")[-2] if type(pipe).__module__.count(".") >= 2 else ""
    extra = _PIPELINE_PIXEL_MULTIPLE.get(family, 1)
    th, tw = int(spatial) * ph, int(spatial) * pw
    return SizeRules(int(temporal), pt, math.lcm(th, extra), math.lcm(tw, extra), th, tw)


def fit_size(rules: SizeRules, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """``(num_frames, height, width)`` rounded to the nearest sizes ``rules`` allow, with a
    warning naming every change.

    Raises:
        ValueError: a size is not a positive integer.
    """
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r} ({rules.describe()})")
    fitted = (
        num_frames if rules.valid_frames(num_frames) else rules.nearest_frames(num_frames),
        max(rules.spatial_h, round(height / rules.spatial_h) * rules.spatial_h),
        max(rules.spatial_w, round(width / rules.spatial_w) * rules.spatial_w),
    )
    changes = [f"{n} {a} -> {b}" for n, a, b in zip(("num_frames", "height", "width"),
                                                    (num_frames, height, width), fitted) if a != b]
    if changes:
        warnings.warn(f"the model takes {rules.describe()}: rounded {', '.join(changes)}", UserWarning, stacklevel=3)
    return fitted


# --- loading -----------------------------------------------------------------------------------
def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or env.upper() in {"1", "ON", "YES", "TRUE"}


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def load_diffusers_pipeline(model: str, torch_dtype: torch.dtype):
    """``DiffusionPipeline.from_pretrained`` that never hangs on a missing model: a local
    directory, else the Hugging Face cache, else (unless ``HF_HUB_OFFLINE=1``) a download.
    Every component takes ``torch_dtype`` but a Wan pipeline's VAE, which stays float32 (the
    Wan model cards load it so, and WanPipeline casts latents to the VAE's dtype; CogVideoX's
    and others' pipelines decode latents in the transformer's dtype, so their VAE must match).

    Raises:
        ModelNotAvailableError: the directory does not exist, the model is not cached while
            offline, or it could not be downloaded; the message says what to download where.
    """
    # diffusers >= 0.36 renames torch_dtype to dtype (FutureWarning); the old name works in
    # every version this package supports.
    warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
    # The VAE is read in float32 (its weights as stored) and cast afterwards where the pipeline
    # needs it in the transformer's dtype: the class is only known once loaded.
    dtype = torch_dtype if torch_dtype == torch.float32 else {"default": torch_dtype, "vae": torch.float32}
    pipe = _from_pretrained(model, dtype)
    if not type(pipe).__name__.startswith("Wan") and getattr(pipe, "vae", None) is not None:
        pipe.vae.to(torch_dtype)
    return pipe


def _from_pretrained(model: str, dtype):
    from diffusers import DiffusionPipeline

    path = Path(model).expanduser()
    if path.exists() or _looks_like_path(model):
        if not (path / "model_index.json").is_file():
            raise ModelNotAvailableError(
                f"{model!r} is not a diffusers model directory (no {path / 'model_index.json'}). Give a "
                f"directory saved by save_pretrained / downloaded with `hf download <repo> --local-dir "
                f"DIR`, or a Hugging Face model id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers."
            )
        return DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype)
    from huggingface_hub import constants

    try:
        return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as cached_error:
        how = (f"download it where there is network access: `hf download {model}` (fills the cache "
               f"{constants.HF_HUB_CACHE}; set HF_HOME to move it) or `hf download {model} --local-dir DIR` "
               f"and pass --model DIR")
        if _offline():
            raise ModelNotAvailableError(
                f"model {model!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                f"HF_HUB_OFFLINE=1 forbids downloading it; {how}."
            ) from cached_error
    try:
        return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    except _download_errors() as error:  # network, authentication, unknown repo: one clear message
        raise ModelNotAvailableError(f"could not download model {model!r} ({type(error).__name__}: "
                                     f"{str(error).splitlines()[0] if str(error) else ''}); {how}.") from error


def _download_errors() -> tuple[type[BaseException], ...]:
    """What a failed download raises: OSError (HTTP, connection, missing file and offline errors
    of huggingface_hub are OSErrors) and the hub's own not-found error; anything else (a bug,
    a broken checkpoint) keeps its traceback."""
    from huggingface_hub.errors import EntryNotFoundError

    errors: tuple = (OSError, EntryNotFoundError)
    try:
        import httpx

        errors += (httpx.HTTPError,)
    except ImportError:
        pass
    return errors


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the pipeline ------------------------------------------------------------------------------
class SparseVideoPipeline:
    """A diffusers video pipeline whose video self-attention runs a vdiff_sparse processor.

    Args:
        pipe: the diffusers pipeline (its transformers need a vdiff_sparse adapter).
        model: a name for reports (model id, path, or ``"tiny"``).
        default_size: ``num_frames``, ``height``, ``width``, ``num_inference_steps`` used when
            the caller gives none (the CLI's defaults).
        method_defaults: per-method settings applied when no preset is named
            (``{method: {field: value}}``; the tiny model's, sized for its small grid).
    """

    REAL_MODEL_SIZE = {"num_frames": 81, "height": 480, "width": 832, "num_inference_steps": 50}

    def __init__(self, pipe, *, model: str = "", default_size: Mapping[str, int] | None = None,
                 method_defaults: Mapping[str, Mapping[str, Any]] | None = None):
        if not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
            raise TypeError(f"expected a diffusers video pipeline with a transformer, got {type(pipe).__name__}")
        self.pipe = pipe
        self.model = model or type(pipe).__name__
        self.default_size = dict(default_size or self.REAL_MODEL_SIZE)
        self.method_defaults = {k: dict(v) for k, v in (method_defaults or {}).items()}
        self.rules = size_rules(pipe)
        self.processor = None
        self.compiled: str | None = None

    # constructors
    @classmethod
    def tiny(cls, seed: int = 0, **size) -> "SparseVideoPipeline":
        """The built-in model: a random tiny Wan pipeline built in code (no download), see
        :func:`vdiff_sparse.tiny_models.tiny_wan_generation_pipeline`. ``size`` are its model
        settings: ``num_layers`` (3), ``num_attention_heads`` (2), ``attention_head_dim`` (32).
        Default generation size and method settings: ``configs/generate/tiny.yaml``."""
        from ..tiny_models import tiny_wan_generation_pipeline

        defaults = tiny_defaults()
        return cls(tiny_wan_generation_pipeline(seed=seed, **size), model=TINY_MODEL,
                   default_size=defaults["size"], method_defaults=defaults["methods"])

    @classmethod
    def from_pretrained(cls, model_id_or_path: str, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> "SparseVideoPipeline":
        """Load a diffusers checkpoint (Hub id or local directory). Defaults: the GPU in
        bfloat16 when there is one, else the CPU in float32 (the VAE stays float32).

        Raises:
            ModelNotAvailableError: see :func:`load_diffusers_pipeline`.
        """
        device = _default_device() if device is None else torch.device(device)
        if torch_dtype is None:
            torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        pipe = load_diffusers_pipeline(model_id_or_path, torch_dtype).to(device)
        return cls(pipe, model=str(model_id_or_path))

    @classmethod
    def from_pipe(cls, pipe, *, model: str = "") -> "SparseVideoPipeline":
        """Wrap an existing diffusers pipeline (not copied)."""
        return cls(pipe, model=model)

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    def make_processor(self, method: str, *, preset: str | None = None, config_file=None,
                       overrides: Mapping[str, Any] | None = None, stats: bool = True, backend: str = "auto"):
        """:func:`generation_processor` with this model's per-method defaults."""
        return generation_processor(method, preset=preset, config_file=config_file, overrides=overrides,
                                    defaults=self.method_defaults.get(method), stats=stats, backend=backend)

    def set_attn_processor(self, processor) -> None:
        """Use ``processor`` for video self-attention in every transformer (cross-attention and
        other modules keep the model's own); ``None`` or ``"dense"`` restores the model's own
        processors; a method name builds that method's processor with this model's defaults."""
        from ..integration import disable, enable

        if processor is None or processor == "dense":
            disable(self.pipe)
            self.processor = None
            return
        if isinstance(processor, str):
            processor = self.make_processor(processor)
        enable(self.pipe, processor)
        self.processor = processor

    def compile(self) -> str:
        """``torch.compile`` every transformer of the pipeline, whole graphs (``fullgraph=True``):
        regionally (``compile_repeated_blocks``, one graph for all blocks) where the model
        declares repeated blocks, else the whole model. The first calls compile (the CLI's
        warm-up generation pays for it); processors may be set before or after. Returns how
        (``"regional"`` or ``"whole model"``)."""
        from ..context import transformers_of

        how = []
        for transformer in transformers_of(self.pipe):
            if getattr(transformer, "_repeated_blocks", None):
                transformer.compile_repeated_blocks(fullgraph=True)
                how.append("regional")
            else:
                transformer.compile(fullgraph=True)
                how.append("whole model")
        self.compiled = " + ".join(sorted(set(how)))
        return self.compiled

    def fit_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Sizes rounded to what the model takes (see :func:`fit_size`)."""
        return fit_size(self.rules, num_frames, height, width)

    def latent_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The video token grid ``(T, H, W)`` after the VAE and patchify, for valid sizes."""
        r = self.rules
        return ((num_frames - 1) // r.temporal + 1) // r.patch_t, height // r.token_h, width // r.token_w

    def resolve_size(self, num_frames: int | None = None, height: int | None = None, width: int | None = None,
                     num_inference_steps: int | None = None) -> dict[str, int]:
        """The sizes a call will use: those left out (``None``) take :attr:`default_size`,
        invalid ones are rounded to what the model takes (one warning, see :func:`fit_size`).
        Returns ``{num_frames, height, width, num_inference_steps}``.

        Raises:
            ValueError: a size or the step count is not a positive integer.
        """
        given = {"num_frames": num_frames, "height": height, "width": width,
                 "num_inference_steps": num_inference_steps}
        size = {k: self.default_size[k] if v is None else v for k, v in given.items()}
        steps = size["num_inference_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}")
        size["num_frames"], size["height"], size["width"] = self.fit_size(
            size["num_frames"], size["height"], size["width"])
        return size

    def __call__(self, prompt: str, *, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int | None = None, seed: int = 0,
                 negative_prompt: str | None = None, **pipe_kwargs) -> GenerationResult:
        """Generate one video. Sizes left out take :attr:`default_size`; invalid sizes are
        rounded (warning), see :meth:`resolve_size`. ``pipe_kwargs`` go to the diffusers
        pipeline (e.g. ``guidance_scale``). The noise comes from a CPU generator seeded with
        ``seed``, so dense and sparse runs of one seed start from the same latents on any
        device."""
        size = self.resolve_size(num_frames, height, width, num_inference_steps)
        num_frames, height, width, steps = (size[k] for k in ("num_frames", "height", "width", "num_inference_steps"))
        stats_log = getattr(self.processor, "stats", None)
        if stats_log is not None:
            stats_log.clear()
        generator = torch.Generator("cpu").manual_seed(seed)
        device = self.device
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe(prompt, negative_prompt=negative_prompt, num_frames=num_frames, height=height,
                            width=width, num_inference_steps=steps, generator=generator, output_type="np",
                            **pipe_kwargs)
        _sync(device)
        latency = time.perf_counter() - start
        frames = np.asarray(out.frames[0])
        if frames.dtype != np.uint8:
            frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        grid = self.latent_grid(num_frames, height, width)
        cfg = self.pipe.transformer.config
        stats: dict[str, Any] = {
            "method": getattr(self.processor, "method", "model default"),
            "settings": {"model": self.model, "prompt": prompt, "negative_prompt": negative_prompt,
                         "num_frames": num_frames, "height": height, "width": width,
                         "num_inference_steps": steps, "seed": seed, "device": str(device),
                         "dtype": str(self.pipe.transformer.dtype).replace("torch.", "")},
            "grid": list(grid),
            "num_tokens": math.prod(grid),
            "inner_dim": int(cfg.num_attention_heads * cfg.attention_head_dim),
        }
        if self.processor is not None:
            stats["processor"] = repr(self.processor)
        if self.compiled is not None:
            stats["compiled"] = self.compiled
        if stats_log is not None and stats_log.enabled:
            stats["calls"] = [dataclasses.asdict(r) for r in stats_log.records]
            stats["attention_s"] = sum(r.time_ms for r in stats_log.records) / 1e3
        return GenerationResult(frames, latency, stats)


def save_video(frames: np.ndarray, path: str | os.PathLike, fps: int = 16) -> Path:
    """Write ``[F, H, W, 3]`` uint8 frames as an H.264 mp4 (imageio-ffmpeg)."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # macro_block_size=1: keep the exact frame size (sizes are multiples of 4 at least; yuv420p
    # needs even ones).
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1, quality=8,
                            ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


__all__ = [
    "GenerationResult",
    "ModelNotAvailableError",
    "SizeRules",
    "SparseVideoPipeline",
    "fit_size",
    "load_diffusers_pipeline",
    "generation_processor",
    "read_settings_file",
    "save_video",
    "size_rules",
    "tiny_defaults",
]
