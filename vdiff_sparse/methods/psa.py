"""PSA: pyramid sparse attention — every (query block, key block) pair gets a pool level.

Semantics, per batch and head:

1. Tokens are optionally reordered (``reorder``: ``"none"``, ``"tile"`` cubes or a 3D
   ``"hilbert"`` curve), then cut into query blocks of ``block_q`` and key blocks of ``block_k``
   consecutive plan positions (the last block of each may be shorter).
2. Importance of each (query block, key block), ``[n_q_blocks, n_k_blocks]`` per head:

   * ``"sampled"`` (default): ``s`` evenly spaced tokens of every block (``s = block / 4``
     unless ``samples_per_block`` is set; fixed positions, so the same inputs always give the
     same plan). Logits of the sampled queries against the sampled keys (scale ``D**-0.5``),
     the max over each key block's samples, ``exp(blockmax - rowmax)`` per sampled query, the
     max over the query block's samples, then each row normalised to sum 1. With ``s``
     samples per block of ``b`` tokens this costs ``(s / b)**2`` of the dense ``q kᵀ``
     (1/16 at the default ``s = b / 4``), so its matmul runs in ``importance_dtype``:
     bfloat16 by default where the hardware multiplies it fast (see :class:`PSAConfig`).
   * ``"mean_pooled"``: softmax over key blocks of ``mean(q_block) . mean(k_block) * scale``;
     ``(1 / (b_q b_k))`` of the dense cost.

3. Level allocation per row (:func:`allocate_levels`), ``0`` = skipped:

   * ``"threshold"``: rank the row descending; a block's *share before* is the cumulative
     importance of the blocks ranked above it. It gets the finest pool factor ``p`` whose
     threshold ``thresholds[p]`` its share before has not reached yet (so the block crossing
     each threshold is included in that level), or is skipped if it has reached every
     threshold. The top ``max(1, ceil(min_full_fraction * n_k_blocks))`` blocks are at ``p = 1``
     whatever the thresholds.
   * ``"quantile"``: fixed fractions of the row's blocks per level, by rank: the first
     ``ceil(fractions[1] * n)`` blocks at ``p = 1``, up to ``ceil((fractions[1] + fractions[2])
     * n)`` at ``p = 2``, and so on; the rest are skipped. ``fractions={1: 1.0}`` is dense,
     ``fractions={2: 1.0}`` puts every pair at ``p = 2`` (density 1/2).
   * ``"budget"``: each row spends a FLOP-equivalent ``density`` where an estimate of the
     output error says it helps most, from the importance of step 2 and the logits of the
     same sampled tokens (the spread of each key block's logits within pool groups, and how
     alike a head's keys are within groups): see
     :mod:`vdiff_sparse.methods.psa_budget`. Where pooling cannot help it is binary
     block-sparse attention at the same density.

4. Optional ``similarity_cap``: key block ``j`` may be seen at factor ``p`` only if the mean
   cosine similarity between the first and last key of its pool groups of ``p`` (adjacent keys
   for ``p = 2``) is above ``similarity_cap[p]``; otherwise it gets the largest lower factor
   that is allowed (``p = 1`` always is). In budget mode the denied levels are not offered to
   the allocator, so the budget still holds.
5. Attention (any backend): a pooled key's logit gets ``+ ln(count)``, all entries of a query
   share one softmax, plus the always-attended extra (text) keys.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Optional

import torch

from ..attention import run_plan
from ..checks import check_choice, check_finite, check_positive_int, check_qkv
from ..layout import BlockOrder, Grid, hilbert_order, sequence_order, tile_order, uniform_offsets
from ..plan import LEVELS, AttentionPlan, PlanFacts, pack_block_selection
from .psa_budget import (
    LEVELS_COARSE_FIRST,
    allocate_budget,
    head_variation_ratio,
    sampled_estimates,
)
from .psa_importance import (
    block_similarity,
    importance_matmul_dtype,
    mean_pooled_importance,
    sampled_importance,
)
from .registry import Method, build_config, get_method, register_method

MODES = ("threshold", "quantile", "budget")
# The fields each mode reads (the rest of the config applies to every mode).
MODE_FIELDS = {"threshold": ("thresholds", "min_full_fraction"), "quantile": ("fractions",),
               "budget": ("density", "budget_levels")}
REORDERS = ("none", "tile", "hilbert")
IMPORTANCES = ("sampled", "mean_pooled")
IMPORTANCE_DTYPES = ("auto", "bfloat16", "float32", "float64")


def _level_dict(
    name: str, value, keys: tuple[int, ...], lo: float, hi: float, lo_open: bool
) -> dict[int, float]:
    """``value`` as ``{level: float}`` sorted by level, keys among ``keys``, values in range."""
    try:
        items = dict(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be a dict {{level: float}} with levels among {list(keys)}, got {value!r}"
        ) from None
    if any(isinstance(key, bool) or key not in keys for key in items):
        raise ValueError(f"{name} keys must be pool levels among {list(keys)}, got {list(items)}")
    interval = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
    out = {}
    for key in sorted(items):
        val = items[key]
        if (
            isinstance(val, bool)
            or not isinstance(val, (int, float))
            or not (lo < val <= hi if lo_open else lo <= val <= hi)
        ):
            raise ValueError(f"{name}[{key}] must be a float in {interval}, got {val!r}")
        out[int(key)] = float(val)
    return out


@dataclass
class PSAConfig:
    """PSA settings (``OmegaConf.structured``-compatible).

    Defaults follow the released presets of the PSA authors (``configs/attention_config.yaml``
    of ziplab/Pyramid-Sparse-Attention): the Wan 2.1 1.3B ``psa_balanced`` preset uses
    128 / 128 blocks and cumulative-share bounds 0.5 / 0.6 / 0.7 / 0.8 for p = 1 / 2 / 4 / 8
    (``thresholdbound`` mode), ``min_full_attn_ratio = 0.06``, a 3D Gilbert (Hilbert-like)
    reorder and cosine caps 0.7 / 0.65 / 0.6 for p = 2 / 4 / 8 when the similarity mask is on.
    The quantile fractions are the repository's default ``topk`` split (10% full, 5% at 2x,
    20% at 8x, the rest skipped).

    Attributes:
        block_q: query block size (plan positions).
        block_k: key block size; every pool level pools within these blocks.
        mode: ``"threshold"`` (cumulative importance share), ``"quantile"`` (fixed
            fractions of blocks by rank) or ``"budget"`` (``density`` spent where it lowers
            the estimated error most; :mod:`vdiff_sparse.methods.psa_budget`).
        thresholds: threshold mode, ``{p: cumulative share}`` for p among 1, 2, 4, 8, each in
            (0, 1], strictly increasing with ``p``. A level left out is never used.
        fractions: quantile mode, ``{p: fraction of key blocks}``, each in [0, 1], summing to
            at most 1 (and more than 0).
        min_full_fraction: threshold mode, at least ``ceil(min_full_fraction * n_k_blocks)``
            (and at least one) blocks per row at p = 1, in [0, 1].
        density: budget mode, the FLOP-equivalent density of the plan, in (0, 1]: every
            query block spends ``density * N`` keys (pooled keys count ``1/p``; at most one
            key block more).
        budget_levels: budget mode, the pool factors it may use (a non-empty subset of
            1, 2, 4, 8); ``(1,)`` is binary block-sparse attention at the budget.
        similarity_cap: ``{p: cosine}`` for p among 2, 4, 8, each in [-1, 1], or ``None``
            (no cap). See the module docstring; in budget mode a capped level is not offered
            to the allocator, so the budget still holds.
        reorder: ``"none"``, ``"tile"`` (``tile``-shaped cubes, ragged at the edges) or
            ``"hilbert"`` (3D Hilbert curve).
        tile: ``(c_t, c_h, c_w)`` cube of ``reorder="tile"``.
        samples_per_block: tokens sampled per block for the importance estimate; ``None`` is
            a quarter of the block (at least one).
        importance: ``"sampled"`` or ``"mean_pooled"`` (not in budget mode, whose error
            estimate weighs the sampled importance and reads its spread off the same samples).
        importance_dtype: operand dtype of the sampled importance matmul: ``"bfloat16"``,
            ``"float32"``, ``"float64"`` or ``"auto"``: float64 for float64 inputs, else
            bfloat16 on CUDA GPUs of compute capability 8.0 or more and on CPUs with
            AVX512-BF16 or AMX, else float32 (other CPUs emulate bfloat16 slowly). The matmul
            is most of the estimate's cost; ``bench/psa_importance.py`` measures its speed and
            how much of the plan and of the output error a bfloat16 estimate changes. The
            logits keep the operands' dtype (in bfloat16 a logit is off by up to about
            ``|logit| * 2**-8``); the rest of the estimate runs in float32 or better. With
            ``"auto"`` the plan may differ between machines (with or without fast bfloat16);
            an explicit dtype pins it.
    """

    block_q: int = 128
    block_k: int = 128
    mode: str = "threshold"
    thresholds: dict[int, float] = field(default_factory=lambda: {1: 0.5, 2: 0.6, 4: 0.7, 8: 0.8})
    fractions: dict[int, float] = field(default_factory=lambda: {1: 0.1, 2: 0.05, 8: 0.2})
    min_full_fraction: float = 0.06
    density: float = 0.15
    budget_levels: tuple[int, ...] = (1, 2, 4, 8)
    similarity_cap: Optional[dict[int, float]] = None
    reorder: str = "hilbert"
    tile: tuple[int, int, int] = (2, 4, 4)
    samples_per_block: Optional[int] = None
    importance: str = "sampled"
    importance_dtype: str = "auto"

    def __post_init__(self) -> None:
        self.block_q = check_positive_int("block_q", self.block_q)
        self.block_k = check_positive_int("block_k", self.block_k)
        check_choice("mode", self.mode, MODES)
        check_choice("reorder", self.reorder, REORDERS)
        check_choice("importance", self.importance, IMPORTANCES)
        check_choice("importance_dtype", self.importance_dtype, IMPORTANCE_DTYPES)
        self.thresholds = _level_dict("thresholds", self.thresholds, LEVELS, 0.0, 1.0, lo_open=True)
        if not self.thresholds:
            raise ValueError("thresholds must name at least one level among [1, 2, 4, 8], got {}")
        values = list(self.thresholds.values())
        if any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(
                f"thresholds must increase strictly with the pool level (coarser levels cover "
                f"less important blocks), got {self.thresholds}"
            )
        self.fractions = _level_dict("fractions", self.fractions, LEVELS, 0.0, 1.0, lo_open=False)
        total = sum(self.fractions.values())
        if not 0 < total <= 1 + 1e-9:
            raise ValueError(f"fractions must sum to a value in (0, 1], got {self.fractions} (sum {total:g})")
        if (
            isinstance(self.min_full_fraction, bool)
            or not isinstance(self.min_full_fraction, (int, float))
            or not 0 <= self.min_full_fraction <= 1
        ):
            raise ValueError(f"min_full_fraction must be a float in [0, 1], got {self.min_full_fraction!r}")
        self.min_full_fraction = float(self.min_full_fraction)
        if (
            isinstance(self.density, bool)
            or not isinstance(self.density, (int, float))
            or not 0 < self.density <= 1
        ):
            raise ValueError(f"density must be a float in (0, 1], got {self.density!r}")
        self.density = float(self.density)
        try:
            budget_levels = list(self.budget_levels)
        except TypeError:
            budget_levels = []
        if not budget_levels or any(
            isinstance(p, bool) or not isinstance(p, int) or p not in LEVELS for p in budget_levels
        ):
            raise ValueError(
                f"budget_levels must be a non-empty tuple of pool factors among {list(LEVELS)}, "
                f"got {self.budget_levels!r}"
            )
        self.budget_levels = tuple(sorted(set(budget_levels)))
        if self.mode == "budget" and self.importance != "sampled":
            raise ValueError(
                f"mode='budget' weighs the sampled importance and reads its spread off the same samples: it needs "
                f"importance='sampled', got importance={self.importance!r}"
            )
        if self.similarity_cap is not None:
            self.similarity_cap = _level_dict(
                "similarity_cap", self.similarity_cap, LEVELS[1:], -1.0, 1.0, lo_open=False
            )
        try:
            tile = tuple(self.tile)
        except TypeError:
            tile = ()
        if len(tile) != 3 or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tile):
            raise ValueError(f"tile must be a tuple of 3 positive ints (c_t, c_h, c_w), got {self.tile!r}")
        self.tile = tile
        if self.samples_per_block is not None:
            self.samples_per_block = check_positive_int("samples_per_block", self.samples_per_block)
        key_samples = self.samples_per_block or max(1, self.block_k // 4)
        if self.mode == "budget" and key_samples < 2:
            # One sample per key block shows no spread: the estimate would call pooling free.
            raise ValueError(
                f"mode='budget' needs at least 2 sampled keys per key block to estimate what pooling "
                f"loses, got samples_per_block={self.samples_per_block!r} with block_k={self.block_k} "
                f"(give samples_per_block >= 2, or block_k >= 8)"
            )
        if self.mode == "budget" and key_samples > self.block_k:
            # More samples than keys repeat positions: a full block's pairs would all be one key
            # twice, show no spread, and the estimate would call pooling free.
            raise ValueError(
                f"mode='budget' needs samples_per_block <= block_k so that a key block's sampled pairs are "
                f"distinct keys, got samples_per_block={self.samples_per_block!r} with block_k={self.block_k}"
            )
        self._check_mode_fields()

    def _check_mode_fields(self) -> None:
        """A field of another mode than ``mode`` left at its default, so that no setting is
        silently ignored (e.g. thresholds given with a preset in budget mode)."""
        defaults = _field_defaults()
        for mode, names in MODE_FIELDS.items():
            if mode == self.mode:
                continue
            for name in names:
                if getattr(self, name) != defaults[name]:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} applies to mode={mode!r} only, but mode={self.mode!r}: "
                        f"set mode={mode!r} or leave {name} at its default {defaults[name]!r}"
                    )

    def replace(self, **overrides) -> "PSAConfig":
        """A copy with ``overrides`` applied (validated); unknown names raise ``ValueError``. A
        new ``mode`` resets the fields of the other modes, as over a preset."""
        settings = get_method("psa").merge({f.name: getattr(self, f.name) for f in fields(self)}, overrides)
        return build_config(PSAConfig, settings, {}, "PSA")


def _field_defaults() -> dict:
    return {f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(PSAConfig)}


# --- level allocation ----------------------------------------------------------------------
def allocate_levels(importance: torch.Tensor, config: PSAConfig) -> torch.Tensor:
    """Pool factor of every key block of every row.

    Args:
        importance: ``[..., n_k_blocks]`` non-negative importance rows (need not sum to 1).
        config: mode, thresholds / fractions and ``min_full_fraction`` are used.

    Returns:
        ``[..., n_k_blocks]`` int64, ``p`` in {1, 2, 4, 8} or ``0`` for skipped blocks.
    """
    nk = importance.shape[-1]
    # Stable sort: tied blocks are ranked by block id, so ties never make a plan vary.
    ranked, order = importance.double().sort(dim=-1, descending=True, stable=True)
    level_of_rank = torch.zeros_like(order)
    if config.mode == "budget":
        raise ValueError("allocate_levels runs the threshold and quantile modes; budget mode allocates with "
                         "psa_budget.allocate_budget (plan_psa chooses)")
    if config.mode == "threshold":
        running = ranked.cumsum(-1)
        # The total is the same running sum's end, so a threshold of 1 stops exactly at the
        # last non-zero block instead of wherever rounding of a separate sum() would put it.
        total = running[..., -1:]
        before = torch.cat([torch.zeros_like(total), running[..., :-1]], -1)
        # Coarsest level first: a finer level whose (smaller) threshold is not reached yet wins.
        for p in sorted(config.thresholds, reverse=True):
            level_of_rank = torch.where(before < config.thresholds[p] * total, p, level_of_rank)
        n_full = max(1, math.ceil(config.min_full_fraction * nk - 1e-9))
        level_of_rank[..., :n_full] = 1
    else:
        rank = torch.arange(nk, device=importance.device)
        # Coarsest level first, as above; each level ends at the cumulative fraction of the
        # levels up to it (rounded up, so a non-zero fraction always gets a block).
        for p in sorted(config.fractions, reverse=True):
            cumulative = sum(f for q, f in config.fractions.items() if q <= p)
            end = min(nk, math.ceil(cumulative * nk - 1e-9))
            level_of_rank = torch.where(rank < end, p, level_of_rank)
    return torch.zeros_like(order).scatter_(-1, order, level_of_rank)


# --- level caps ---------------------------------------------------------------------------
def _cap_levels(
    levels: torch.Tensor, kp: torch.Tensor, k_offsets: torch.Tensor, cap: dict[int, float]
) -> torch.Tensor:
    """Lower ``levels`` ``[R, nqb, nkb]`` where a key block's keys are too dissimilar."""
    for p in (8, 4, 2):  # coarse first, so a demoted block is checked again one level down
        if p not in cap:
            continue
        denied = block_similarity(kp, k_offsets, p) <= cap[p]  # [R, nkb]
        levels = torch.where((levels == p) & denied[:, None, :], p // 2, levels)
    return levels


def _budget_levels(
    importance: torch.Tensor, spread: torch.Tensor, variance: torch.Tensor, kp: torch.Tensor | None,
    k_offsets: torch.Tensor, config: PSAConfig, n: int,
) -> torch.Tensor:
    """Budget mode's ``[R, nqb, nkb]`` levels: :func:`allocate_budget` over the pool factors
    ``config.budget_levels`` allows, minus those the similarity cap denies a key block."""
    R, nqb, nkb = importance.shape
    rho = head_variation_ratio(importance, spread, variance)
    allowed = torch.tensor([p in config.budget_levels for p in LEVELS_COARSE_FIRST], device=importance.device)
    if config.similarity_cap:
        allowed = allowed.expand(R, 1, nkb, len(LEVELS_COARSE_FIRST)).clone()
        for p, cap in config.similarity_cap.items():
            denied = block_similarity(kp, k_offsets, p) <= cap  # [R, nkb]
            allowed[..., LEVELS_COARSE_FIRST.index(p)] &= ~denied[:, None, :]
    return allocate_budget(importance, spread, rho, k_offsets.diff(), config.density * n, allowed,
                           k_block_max=config.block_k)


# --- plan ----------------------------------------------------------------------------------
def _possible_levels(config: PSAConfig) -> tuple[int, ...]:
    """The pool factors a plan of ``config`` may give an entry (1 always), known before
    planning: the plan's facts, so that running it reads no level back from the device."""
    if config.mode == "budget":
        return tuple(sorted({1, *config.budget_levels}))  # a capped level is only not offered
    levels = {1, *(config.thresholds if config.mode == "threshold" else config.fractions)}
    for p in (8, 4, 2):  # the cap demotes p to p // 2, coarse first (_cap_levels)
        if p in levels and p in (config.similarity_cap or {}):
            levels.add(p // 2)
    return tuple(sorted(levels))


def _order(grid: Grid, n: int, config: PSAConfig, device) -> BlockOrder:
    if config.reorder == "tile":
        return tile_order(grid, config.tile, device=device)
    if config.reorder == "hilbert":
        return hilbert_order(grid, config.block_q, device=device)
    return sequence_order(n, config.block_q, device=device)


def plan_psa(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: Grid,
    config: PSAConfig | None = None,
    *,
    scale: float | None = None,
) -> AttentionPlan:
    """Give every (query block, key block) pair of every batch and head a pool level.

    Args:
        q, k: ``[B, N, heads, D]`` video tokens, ``N = T*H*W`` frame-major row-major.
        grid: latent grid ``(T, H, W)``.
        config: :class:`PSAConfig`; ``None`` for the defaults.
        scale: logit scale of the importance estimate, ``D ** -0.5`` if ``None`` (pass the
            attention's own scale when it differs).

    Returns:
        An :class:`AttentionPlan` (``method="psa"``) with ``perm`` the reorder, uniform query
        blocks of ``block_q`` and key blocks of ``block_k`` plan positions, ``kv_index`` /
        ``kv_level`` ``[B, H, n_q_blocks, max_kv]`` in ascending key block order, and ``info``
        holding the config (:func:`level_histogram` counts the pairs per pool factor).
    """
    config = PSAConfig() if config is None else config
    grid = check_qkv(q, k, k, grid)
    check_finite(q=q, k=k)
    B, n, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    order = _order(grid, n, config, q.device)
    q_offsets = uniform_offsets(n, config.block_q).to(q.device)
    k_offsets = uniform_offsets(n, config.block_k).to(q.device)
    nqb, nkb = q_offsets.numel() - 1, k_offsets.numel() - 1

    work_dtype = torch.promote_types(q.dtype, torch.float32)

    def plan_order(x):  # [B*H, N, D] in plan order: every row is one (batch, head)
        return order.permute(x.detach(), 1).transpose(1, 2).reshape(B * H, n, D).to(work_dtype)

    with torch.no_grad():
        sq = config.samples_per_block or max(1, config.block_q // 4)
        sk = config.samples_per_block or max(1, config.block_k // 4)
        matmul_dtype = importance_matmul_dtype(config, q)
        sampled = (q.detach(), k.detach(), order, q_offsets, k_offsets, sq, sk, scale, matmul_dtype)
        if config.mode == "budget":  # always sampled: the spread is read off the same logits
            importance, spread, variance = sampled_estimates(*sampled)
            kp = plan_order(k) if config.similarity_cap else None
            levels = _budget_levels(importance, spread, variance, kp, k_offsets, config, n)
        else:
            kp = None  # k in plan order, made once if the mean-pooled estimate or the cap needs it
            if config.importance == "sampled":
                importance = sampled_importance(*sampled)
            else:
                kp = plan_order(k)
                importance = mean_pooled_importance(plan_order(q), kp, q_offsets, k_offsets, scale)
            levels = allocate_levels(importance, config)
            if config.similarity_cap:
                kp = plan_order(k) if kp is None else kp
                levels = _cap_levels(levels, kp, k_offsets, config.similarity_cap)
        levels = levels.view(B, H, nqb, nkb)
        kv_index, kv_level = pack_block_selection(levels > 0, levels)

    return AttentionPlan(
        perm=order.perm,
        q_offsets=q_offsets,
        k_offsets=k_offsets,
        kv_index=kv_index,
        kv_level=kv_level,
        method="psa",
        tokens=n,
        facts=PlanFacts.uniform(n, config.block_q, config.block_k, _possible_levels(config)),
        info={
            "config": config,
            "num_q_blocks": nqb,
            "num_k_blocks": nkb,
        },
    )


def level_histogram(plan: AttentionPlan) -> dict[int, int]:
    """Number of (batch, head, query block, key block) pairs of a PSA plan at each pool factor
    (``0``: skipped). Reads the plan back to the host; planning itself never does."""
    selected = plan.kv_index >= 0
    levels = plan.kv_level[selected]
    pairs = plan.kv_index.shape[0] * plan.kv_index.shape[1] * plan.num_q_blocks * plan.num_k_blocks
    counts = {p: int((levels == p).sum()) for p in LEVELS}
    return {0: pairs - int(selected.sum()), **counts}


def psa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Grid,
    config: PSAConfig | None = None,
    *,
    layer_index: int = 0,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_plan: bool = False,
    **overrides,
):
    """Pyramid sparse attention of video tokens (plus always-attended extra keys).

    Args:
        q, k, v: ``[B, N, heads, D]`` video tokens, ``N = T*H*W`` frame-major row-major.
        grid: latent grid ``(T, H, W)``.
        config: :class:`PSAConfig`, a mapping of its fields, or ``None`` for the defaults.
        layer_index: unused (PSA selects the same way on every layer).
        extra_k, extra_v: ``[B, Ne, heads, D]`` keys every query attends (text), or ``None``.
        extra_mask: ``[B, Ne]`` bool, False for padding among the extra keys.
        scale: logit scale, ``D ** -0.5`` if ``None`` (also used by the importance estimate).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``.
        return_plan: also return the :class:`AttentionPlan`.
        **overrides: :class:`PSAConfig` fields replacing those of ``config``
            (e.g. ``mode="quantile", fractions={1: 0.2}``); unknown names raise ``ValueError``.

    Returns:
        ``[B, N, heads, D]`` in the original token order, or ``(out, plan)``.
    """
    config = get_method("psa").make_config(config, **overrides)
    check_qkv(q, k, v, grid)
    check_finite(v=v)  # q and k: plan_psa
    plan = plan_psa(q, k, grid, config, scale=scale)
    out = run_plan(
        q, k, v, plan,
        extra_k=extra_k, extra_v=extra_v, extra_mask=extra_mask, scale=scale, backend=backend,
    )
    return (out, plan) if return_plan else out


def _plan_for_layer(q: torch.Tensor, k: torch.Tensor, grid: Grid, config: PSAConfig | None = None, *,
                    layer_index: int = 0, scale: float | None = None) -> AttentionPlan:
    """:func:`plan_psa` in the methods' planner convention (PSA ignores the layer index)."""
    return plan_psa(q, k, grid, get_method("psa").make_config(config), scale=scale)


register_method(Method(
    name="psa",
    config_cls=PSAConfig,
    attention=psa_attention,
    plan=_plan_for_layer,
    summary="every key block at a level: full, mean-pooled x2/x4/x8, or skipped",
    # A mode given over settings of another mode clears that mode's fields (a preset's budget
    # density does not stop a user from asking for mode="threshold").
    resets={"mode": lambda mode: {name: _field_defaults()[name] for other, names in MODE_FIELDS.items()
                                  if other != mode for name in names}},
    processor_name="PSAProcessor",
))

__all__ = [
    "PSAConfig", "allocate_levels", "block_similarity", "importance_matmul_dtype", "level_histogram", "plan_psa",
    "psa_attention",
]
