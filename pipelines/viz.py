"""Pictures of attention plans: which key blocks each query block attends, at which pool level.

:func:`capture_plan` gets the plan of one layer, either from a generation with the tiny model
(the plan of a chosen layer at a chosen denoising step) or from synthetic video q/k/v
(:func:`vdiff_sparse.synthetic.video_qkv`); :func:`plot_plan` draws one head of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..figures import save_figure
from ..plan import LEVELS, AttentionPlan


def plan_matrix(plan: AttentionPlan, head: int = 0, batch: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two ``[n_q_blocks, n_k_blocks]`` arrays for one head: the pool level (1, 2, 4, 8) at
    which each query block attends each key block (0: skipped), and the share of the query
    block's tokens that use it (1 for block-level plans; per-token routing, VMoBA's
    ``token_keep``, gives shares below 1)."""

    def pick(t: torch.Tensor) -> torch.Tensor:  # batch / head dims may be broadcast (size 1)
        return t[min(batch, t.shape[0] - 1), min(head, t.shape[1] - 1)].cpu()

    index = pick(plan.kv_index)
    level = torch.ones_like(index) if plan.kv_level is None else pick(plan.kv_level)
    share = (index >= 0).to(torch.float64)
    if plan.token_keep is not None:
        qb = plan.query_block_of_position().cpu()
        users = torch.zeros(index.shape, dtype=torch.float64).index_add_(0, qb, pick(plan.token_keep).to(torch.float64))
        share = share * users / plan.q_offsets.diff().cpu().to(torch.float64)[:, None]
    rows, cols = torch.nonzero(share > 0, as_tuple=True)
    levels = np.zeros((plan.num_q_blocks, plan.num_k_blocks), dtype=np.int64)
    shares = np.zeros(levels.shape, dtype=np.float64)
    levels[rows.numpy(), index[rows, cols].numpy()] = level[rows, cols].numpy()
    shares[rows.numpy(), index[rows, cols].numpy()] = share[rows, cols].numpy()
    return levels, shares


def _recording_processor(processor, layer: int, step: int, context_of):
    """Make ``processor`` keep the plan of ``layer`` at denoising ``step`` (first call, the
    conditional pass). The instance's ``attention`` is wrapped, the class is untouched."""
    captured: dict = {}
    original = processor.attention

    def attention(q, k, v, grid, index, *, return_plan, **extras):
        out, plan = original(q, k, v, grid, index, return_plan=True, **extras)
        if index == layer and context_of().step == step and "plan" not in captured:
            captured.update(plan=plan, grid=grid)
        return (out, plan) if return_plan else out

    processor.attention = attention
    return captured


def capture_plan(processor, *, source: str = "tiny", layer: int = 0, step: int | None = None,
                 size: dict | None = None, grid: tuple[int, int, int] = (5, 32, 32), heads: int = 2,
                 head_dim: int = 32, seed: int = 0,
                 prompt: str = "a red cat runs on the beach") -> tuple[AttentionPlan, tuple]:
    """The plan ``processor`` makes for video self-attention layer ``layer``.

    ``source="tiny"``: generate with the built-in tiny model (``size``: ``num_frames``,
    ``height``, ``width``, ``num_inference_steps``; its defaults when left out or ``None``,
    invalid sizes rounded as in :meth:`SparseVideoPipeline.resolve_size`) and keep the plan of
    ``step`` (default: the last step). ``source="random"``: synthetic moving-video q/k/v
    ``[1, T*H*W, heads, head_dim]`` on ``grid``. Returns ``(plan, grid)``.

    Raises:
        ValueError: dense processors have no plan; the layer or step is out of range or ran
            dense (schedule).
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be a non-negative integer, got {layer!r}")
    if processor.method_for(layer) == "dense":
        raise ValueError(f"layer {layer} runs attn=dense, which has no plan to draw; choose vmoba, psa or gna"
                         + (" for it" if processor.method != "dense" else ""))
    # A layer with its own settings (schedule ``layers``) runs its own processor.
    runner = processor.layer_runner(layer)
    if source == "random":
        from ..checks import check_grid
        from ..synthetic import video_qkv

        if any(layer == i for i in processor.schedule.dense_layers):
            raise ValueError(f"layer {layer} is in dense_layers {list(processor.schedule.dense_layers)}: "
                             f"it runs dense and has no plan to draw")
        grid = check_grid(grid)
        q, k, v = video_qkv(grid, heads, head_dim, seed=seed)
        with torch.no_grad():
            _, plan = runner.attention(q, k, v, grid, layer, return_plan=True)
        return plan, grid
    if source != "tiny":
        raise ValueError(f"source must be 'tiny' or 'random', got {source!r}")
    from ..integration import get_context
    from .generate import SparseVideoPipeline

    pipe = SparseVideoPipeline.tiny(seed=seed)
    size = pipe.resolve_size(**(size or {}))
    steps = size["num_inference_steps"]
    step = steps - 1 if step is None else step
    if not 0 <= step < steps:
        raise ValueError(f"step must be in [0, {steps - 1}] for {steps} denoising steps, got {step}")
    num_layers = len(pipe.pipe.transformer.blocks)
    if layer >= num_layers:
        raise ValueError(f"layer must be in [0, {num_layers - 1}] for the tiny model's {num_layers} layers, "
                         f"got {layer}")
    pipe.set_attn_processor(processor)
    captured = _recording_processor(runner, layer, step, lambda: get_context(pipe.pipe))
    pipe(prompt, seed=seed, **size)
    if "plan" not in captured:
        raise ValueError(f"layer {layer} at step {step} ran dense: the schedule {processor.schedule} sends "
                         f"warm-up steps and dense_layers to dense")
    return captured["plan"], captured["grid"]


def plot_plan(plan: AttentionPlan, path: str | Path, *, head: int = 0, title: str = "") -> Path:
    """Draw head ``head`` of ``plan`` (see :func:`plan_matrix`) as a PNG at ``path``.

    Raises:
        ImportError: matplotlib is not installed (``pip install matplotlib``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    levels, shares = plan_matrix(plan, head)
    fig, ax = plt.subplots(figsize=(6.5, 6.5 * min(1.5, max(0.4, levels.shape[0] / max(levels.shape[1], 1)))))
    if plan.token_keep is not None:
        image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        fig.colorbar(image, ax=ax, fraction=0.046, label="share of the query block's tokens using the key block")
    else:
        code = np.zeros_like(levels)
        for i, p in enumerate(LEVELS, start=1):
            code[levels == p] = i
        cmap = ListedColormap(["#f2f2f2", "#08306b", "#2171b5", "#6baed6", "#c6dbef"])
        image = ax.imshow(code, cmap=cmap, norm=BoundaryNorm(np.arange(-0.5, 5.5), cmap.N), interpolation="nearest",
                          aspect="auto")
        bar = fig.colorbar(image, ax=ax, ticks=range(5), fraction=0.046)
        bar.ax.set_yticklabels(["skipped"] + [f"p={p}" for p in LEVELS])
    window = ", token windows inside blocks" if plan.window is not None else ""
    ax.set(xlabel=f"key block ({plan.num_k_blocks})", ylabel=f"query block ({plan.num_q_blocks})",
           title=f"{title}, head {head}\ndensity {plan.density():.3f} (mean of all heads){window}")
    return save_figure(fig, path)


__all__ = ["capture_plan", "plan_matrix", "plot_plan"]
