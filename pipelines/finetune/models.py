"""The models a run can train, and what each takes as input.

Wan variants (all ``WanTransformer3DModel``; the task is read from the pipeline and the
transformer's channels, not from the name):

* text-to-video (``t2v``): Wan 2.1 T2V 1.3B / 14B, Wan 2.2 T2V A14B. Input: the noisy latents.
* image-to-video (``i2v``): Wan 2.1 I2V 14B, Wan 2.2 I2V A14B. Input: the noisy latents
  concatenated with a 4-channel mask marking the first frame and the VAE encoding of the first
  frame followed by black frames (``in_channels = 2 * out_channels + 4``); Wan 2.1 I2V also
  takes CLIP image tokens (``image_dim``) beside the text in cross-attention.
* text-image-to-video (``ti2v``): Wan 2.2 TI2V-5B (``expand_timesteps``: one timestep per
  token). Image-to-video puts the clean encoded first frame in place of the first latent frame,
  with timestep 0 on its tokens, and leaves it out of the loss; text-to-video is the plain case.
* two experts (Wan 2.2 A14B): ``transformer`` denoises timesteps at or above
  ``boundary_ratio * 1000`` and ``transformer_2`` those below; a run trains one
  (``model.expert``) on its own range of noise levels, the other stays frozen and dense.

Tiny random pipelines (offline, CPU, seconds) stand in for each of them in tests.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Tuple

import torch

from .config import FinetuneConfig, ModelConfig, SetupError


# name -> (builder in vdiff_sparse.tiny_models, its keyword arguments)
_TINY = {
    "tiny-wan": ("tiny_wan_pipeline", {}),
    "tiny-wan-i2v": ("tiny_wan_i2v_pipeline", {}),
    "tiny-wan2.2-ti2v": ("tiny_wan22_ti2v_pipeline", {}),
    "tiny-wan2.2-a14b": ("tiny_wan_pipeline", {"two_experts": True}),
}
TINY_MODELS = tuple(_TINY)


def is_tiny(name: str) -> bool:
    """Whether ``name`` is one of the tiny random models (whose weights come from the seed)."""
    return name in TINY_MODELS


def trained_component(model: ModelConfig) -> str:
    """The pipeline attribute holding the transformer a run trains."""
    return "transformer_2" if model.expert == "low_noise" else "transformer"


def load_pipeline(model: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                  transformer_dtype: torch.dtype = torch.float32):
    """A diffusers Wan pipeline with the components to train and to encode data: the trained
    transformer at ``transformer_dtype``, the VAE in float32 (as Wan's own scripts keep it),
    everything else (text and image encoders, the other expert) at ``dtype``.

    Raises:
        SetupError: the model cannot be loaded (not a diffusers folder, not downloadable).
    """
    if is_tiny(model.name):
        from vdiff_sparse import tiny_models

        builder, kwargs = _TINY[model.name]
        return getattr(tiny_models, builder)(seed=seed, **kwargs)
    from diffusers import DiffusionPipeline

    dtypes = {"default": dtype, "vae": torch.float32, trained_component(model): transformer_dtype}
    # diffusers >= 0.36 renames torch_dtype to dtype; the old name works in every supported version.
    warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
    try:
        return DiffusionPipeline.from_pretrained(model.name, revision=model.revision, torch_dtype=dtypes)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SetupError(
            f"model.name={model.name!r} could not be loaded ({first}): give a diffusers Wan folder, a Hub id "
            f"(downloaded beforehand with `hf download {model.name}` where there is network access), or one of "
            f"the tiny models {TINY_MODELS}"
        ) from e


@dataclass(frozen=True)
class ModelTask:
    """What the trained transformer takes and which noise levels it trains on.

    Attributes:
        kind: ``"t2v"``, ``"i2v"`` or ``"ti2v"`` (see the module docstring).
        component: ``"transformer"`` or ``"transformer_2"`` (the trained expert).
        sigma_range: ``(low, high)``: flow sigmas ``low <= sigma < high`` are trained.
        image_tokens: the transformer takes CLIP image tokens (Wan 2.1 I2V).
        i2v_fraction: share of samples trained with their first frame given.
        patch: the transformer's patch size ``(p_t, p_h, p_w)``.
    """

    kind: str
    component: str
    sigma_range: Tuple[float, float]
    image_tokens: bool
    i2v_fraction: float
    patch: Tuple[int, int, int]

    @property
    def sample_keys(self) -> tuple[str, ...]:
        """The tensors every cached sample holds for this model."""
        keys = ("latents", "prompt_embeds")
        if self.kind != "t2v":
            keys += ("condition",)
        if self.image_tokens:
            keys += ("image_embeds",)
        return keys


def describe_model(pipe, config: FinetuneConfig) -> ModelTask:
    """The :class:`ModelTask` of ``pipe`` as ``config`` trains it.

    Raises:
        NotImplementedError: a pipeline or transformer this trainer has no objective for.
        SetupError: settings that do not fit the model (an expert of a one-expert model or
            none of a two-expert one, an ``i2v_fraction`` the model cannot train, a text
            length or frame size the model cannot take).
    """
    name = type(pipe).__name__
    if name not in ("WanPipeline", "WanImageToVideoPipeline"):
        raise NotImplementedError(f"{name} is not supported for training: Wan text-to-video, image-to-video and "
                                  "TI2V pipelines (WanPipeline, WanImageToVideoPipeline) are")
    two_experts = getattr(pipe, "transformer_2", None) is not None
    expert = config.model.expert
    boundary = pipe.config.get("boundary_ratio")
    if two_experts and expert is None:
        raise SetupError(
            f"{config.model.name!r} has two experts (transformer above boundary_ratio {boundary}, transformer_2 "
            "below): set model.expert=high_noise or model.expert=low_noise (one expert per run)"
        )
    if not two_experts and expert is not None:
        raise SetupError(f"model.expert={expert!r} but {config.model.name!r} has one transformer: set model.expert=null")
    if two_experts and getattr(pipe, "transformer", None) is None:
        raise NotImplementedError("a two-expert pipeline without its high-noise transformer is not supported")
    component = "transformer_2" if expert == "low_noise" else "transformer"
    sigma_range = (0.0, 1.0)
    if two_experts:
        sigma_range = (float(boundary), 1.0) if expert == "high_noise" else (0.0, float(boundary))
    transformer = getattr(pipe, component)
    if type(transformer).__name__ != "WanTransformer3DModel":
        raise NotImplementedError(f"{type(transformer).__name__} is not supported for training (WanTransformer3DModel is)")
    tc = transformer.config
    expand = bool(pipe.config.get("expand_timesteps", False))
    if tc.in_channels == tc.out_channels:
        kind, natural, allowed = ("ti2v", 0.5, None) if expand else ("t2v", 0.0, 0.0)
    elif tc.in_channels == 2 * tc.out_channels + 4 and not expand:
        kind, natural, allowed = "i2v", 1.0, 1.0
    else:
        raise NotImplementedError(
            f"a Wan transformer with in_channels {tc.in_channels}, out_channels {tc.out_channels} and "
            f"expand_timesteps={expand} is not a text-to-video, image-to-video or TI2V model this trainer knows"
        )
    fraction = config.train.i2v_fraction
    if fraction is not None and allowed is not None and fraction != allowed:
        raise SetupError(f"train.i2v_fraction={fraction} but {config.model.name!r} is a {kind} model, which trains "
                         f"only with i2v_fraction={allowed} (or null)")
    image_tokens = tc.image_dim is not None
    if image_tokens and config.data.max_text_len != 512:
        raise SetupError(f"data.max_text_len={config.data.max_text_len}: Wan 2.1 image-to-video models take exactly "
                         "512 text tokens (the model splits its context 512 tokens from the end); set 512")
    if image_tokens and getattr(pipe, "image_encoder", None) is None and not config.data.latents_dir:
        raise SetupError(f"{config.model.name!r} takes CLIP image tokens but the pipeline has no image_encoder "
                         "to encode them: load a pipeline with one, or give data.latents_dir with image_embeds")
    patch = tuple(int(p) for p in tc.patch_size)
    if kind == "ti2v" and patch[0] != 1:
        raise NotImplementedError(f"a TI2V transformer with temporal patch {patch[0]}: per-token timesteps are "
                                  "implemented for temporal patch 1 (every Wan model)")
    _check_frame_size(pipe, patch, config)
    return ModelTask(kind, component, sigma_range, image_tokens, natural if fraction is None else float(fraction), patch)


def _check_frame_size(pipe, patch: tuple[int, int, int], config: FinetuneConfig) -> None:
    spatial = int(getattr(pipe, "vae_scale_factor_spatial", 8))
    step_h, step_w = spatial * patch[1], spatial * patch[2]
    sizes = [("data", config.data.height, config.data.width)]
    v = config.validation
    if v.prompts and v.every:
        sizes.append(("validation", v.height or config.data.height, v.width or config.data.width))
    for section, height, width in sizes:
        if height % step_h or width % step_w:
            raise SetupError(f"{section}.height x {section}.width = {height} x {width}: this model needs multiples "
                             f"of {step_h} x {step_w} (VAE {spatial}x, patch {patch[1]}x{patch[2]})")


__all__ = ["ModelTask", "TINY_MODELS", "describe_model", "is_tiny", "load_pipeline", "trained_component"]
