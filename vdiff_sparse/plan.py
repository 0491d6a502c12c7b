"""The plan: which keys each query attends, in one format for every method and backend.

A method (VMoBA, PSA, GNA) turns q/k into an :class:`AttentionPlan`; a backend (reference,
torch, triton) executes any plan. Semantics, for query token ``i`` at plan position ``i`` in
query block ``qb`` (``q_offsets``), per batch ``b`` and head ``h``:

* ``kv_index[b, h, qb, j] >= 0`` names a key block (``k_offsets``), ``-1`` pads the row;
* ``kv_level[b, h, qb, j] = p`` in {1, 2, 4, 8} says the block is seen through its keys and
  values mean-pooled in groups of ``p`` consecutive plan positions, starting at the block start
  (the last group of a block may be shorter); a pooled key's logit gets ``+ ln(count)`` where
  ``count`` is the number of tokens it averages;
* ``token_keep[b, h, i, j]`` (optional) says whether query ``i`` itself uses entry ``j`` of its
  block's list (per-token routing, VMoBA);
* ``window`` (optional, level-1 entries only) further restricts query ``i`` to keys inside its
  per-axis coordinate window (GNA);
* always-attended extra keys (text) are passed to the backend beside the plan.

A plan may carry :class:`PlanFacts`, what its maker knows on the host about its tensors (block
sizes, pool levels), so that a backend running it on a GPU reads nothing back from the device.

All kept keys of a query share one softmax. A query with no key at all gets output 0.
Batch and head dims of ``kv_index``/``kv_level``/``token_keep`` may be 1 (broadcast), which is
how a plan shared by all heads (GNA) is stored once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .layout import BlockOrder

LEVELS = (1, 2, 4, 8)


@dataclass(frozen=True, eq=False)
class TokenWindow:
    """Per-query coordinate windows (GNA): a key is allowed iff on every axis
    ``lo <= x <= hi`` and ``(x - lo) % dilation == 0``.

    Attributes:
        coords: ``[N, 3]`` int64 ``(t, h, w)`` of every plan position (queries and keys).
        lo, hi: ``[N, 3]`` int64 inclusive window bounds of every query (plan order).
        dilation: per-axis dilation.
        grid: ``(T, H, W)`` when ``coords`` are the positions of a whole grid whose token
            ``(t * H + h) * W + w`` sits at plan position ``p`` with ``perm[p]`` that token, and
            the plan's key blocks hold every key of every query's window (GNA plans): a backend
            may then take a query block's keys straight from the box bounding its windows.
            ``None`` (any window plan) promises nothing of the kind.
    """

    coords: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    dilation: tuple[int, int, int]
    grid: tuple[int, int, int] | None = None

    def allows(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Bool mask of shape ``q_pos.shape + k_pos.shape`` for plan positions ``q_pos``, ``k_pos``."""
        lo = self.lo[q_pos]  # [..q, 3]
        hi = self.hi[q_pos]
        kc = self.coords[k_pos]  # [..k, 3]
        q_extra = k_pos.dim()
        lo = lo.reshape(*lo.shape[:-1], *([1] * q_extra), 3)
        hi = hi.reshape(*hi.shape[:-1], *([1] * q_extra), 3)
        inside = (kc >= lo) & (kc <= hi)
        d = torch.tensor(self.dilation, device=kc.device)
        if any(x > 1 for x in self.dilation):
            inside &= torch.remainder(kc - lo, d) == 0
        return inside.all(dim=-1)

    def keys_per_query(self) -> torch.Tensor:
        """``[N]`` number of keys in each query's window."""
        d = torch.tensor(self.dilation, device=self.lo.device)
        # Clip each box to the grid; the first lattice point >= 0 starts the count.
        first = torch.where(self.lo < 0, torch.remainder(self.lo, d), self.lo)
        last = torch.minimum(self.hi, self.coords.max(dim=0).values)
        return ((last - first).div(d, rounding_mode="floor") + 1).clamp(min=0).prod(dim=-1)

    def to(self, device) -> "TokenWindow":
        return TokenWindow(self.coords.to(device), self.lo.to(device), self.hi.to(device), self.dilation,
                           self.grid)

    def clone(self) -> "TokenWindow":
        """A copy whose tensors share no memory with this one's."""
        return TokenWindow(self.coords.clone(), self.lo.clone(), self.hi.clone(), self.dilation, self.grid)


@dataclass(frozen=True)
class PlanFacts:
    """Facts about a plan's tensors known on the host. The Triton kernels' tables and launch
    shapes depend on them: given by the plan's maker (or read once off a CPU plan by
    :meth:`AttentionPlan.to`), they spare a GPU a host read per attention call.
    :func:`plan_facts` reads them off the tensors of a plan that has none.

    Attributes:
        q_block_max, k_block_max: tokens of the largest query / key block (exact).
        levels: pool factors the entries may use, ascending, 1 always (a superset is correct:
            an unused level costs its pooling and launches without work).
        level_rows: per entry of ``levels``, the rows of that level in a pyramid of pooled keys
            (``sum`` over key blocks of ``ceil(size / p)``; ``N`` for level 1).
        keep_max: the most entries one query keeps (per-token routing), or ``None`` if unknown
            (``max_kv`` bounds it).
        window_extent: per axis, ``coords.max() + 1`` of the plan's window, or ``None``.
        window_tiles: ``(query, key)`` tile sizes up to which tiles of a window plan over a grid
            need no per-pair window test (:func:`~vdiff_sparse.window_tiles.largest_unmasked_tiles`;
            ``(0, 0)``: every tile needs it).
    """

    q_block_max: int
    k_block_max: int
    levels: tuple[int, ...]
    level_rows: tuple[int, ...]
    keep_max: int | None = None
    window_extent: tuple[int, int, int] | None = None
    window_tiles: tuple[int, int] = (0, 0)

    @classmethod
    def uniform(cls, n: int, block_q: int, block_k: int, levels: tuple[int, ...] = (1,),
                keep_max: int | None = None) -> "PlanFacts":
        """Facts of a plan over ``uniform_offsets(n, block_q)`` / ``(n, block_k)`` blocks whose
        entries use pool factors among ``levels``."""
        levels = tuple(sorted({1, *levels}))
        full, rest = divmod(n, block_k)
        rows = tuple(full * -(-block_k // p) + -(-rest // p) for p in levels)
        return cls(min(block_q, n), min(block_k, n), levels, rows, keep_max)

    def rows_of(self) -> dict[int, int]:
        """``{pool factor: rows in the pyramid}`` of every level."""
        return dict(zip(self.levels, self.level_rows))


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """One attention call's sparsity, shared by every backend.

    Attributes:
        perm: ``[N]`` int64 reorder (plan position -> original token index) or ``None``.
            q, k, v are permuted with it before the backend runs and the output is inverted.
        q_offsets: ``[n_q_blocks + 1]`` int64 query block boundaries in plan order.
        k_offsets: ``[n_k_blocks + 1]`` int64 key block boundaries in plan order.
        kv_index: ``[B|1, H|1, n_q_blocks, max_kv]`` int64 key block ids, ``-1`` = unused slot.
        kv_level: same shape, int64 pool factor per entry, or ``None`` (all full resolution).
        token_keep: ``[B|1, H|1, N, max_kv]`` bool per-query use of each entry, or ``None``.
        window: per-query coordinate windows (GNA), or ``None``.
        method: name of the method that made the plan (for reports).
        info: free-form extra facts from the method (e.g. the VMoBA partition used).
        tokens: ``N`` when the maker knows it on the host (every planner does): then a plan on
            a GPU is checked by shapes only and nothing reads its tensors back to the host.
        facts: :class:`PlanFacts` when the maker knows them on the host (every planner does;
            :meth:`to` reads them off a CPU plan), else ``None``.
    """

    perm: torch.Tensor | None
    q_offsets: torch.Tensor
    k_offsets: torch.Tensor
    kv_index: torch.Tensor
    kv_level: torch.Tensor | None = None
    token_keep: torch.Tensor | None = None
    window: TokenWindow | None = None
    method: str = ""
    info: dict = field(default_factory=dict)
    tokens: int | None = None
    facts: PlanFacts | None = None

    def __post_init__(self) -> None:
        n_q = self.q_offsets.numel() - 1
        index_shape = tuple(self.kv_index.shape)
        if self.kv_index.dim() != 4 or index_shape[2] != n_q:
            raise ValueError(f"kv_index must be [B|1, H|1, n_q_blocks={n_q}, max_kv], got {index_shape}")
        # Values are checked where reading them is free (CPU) or nobody said what N is.
        read_values = self.tokens is None or self.q_offsets.device.type == "cpu"
        if read_values and int(self.q_offsets[-1]) != int(self.k_offsets[-1]):
            raise ValueError(
                f"q_offsets and k_offsets must cover the same N, got {int(self.q_offsets[-1])} and "
                f"{int(self.k_offsets[-1])}"
            )
        if self.kv_level is not None and tuple(self.kv_level.shape) != index_shape:
            raise ValueError(f"kv_level must have kv_index's shape {index_shape}, got {tuple(self.kv_level.shape)}")
        if self.token_keep is not None:
            keep_shape = tuple(self.token_keep.shape)
            if self.token_keep.dim() != 4 or keep_shape[2:] != (self.num_tokens, index_shape[3]):
                raise ValueError(
                    f"token_keep must be [B|1, H|1, N={self.num_tokens}, max_kv={index_shape[3]}], "
                    f"got {keep_shape}"
                )
        if read_values and self.tokens is not None and int(self.q_offsets[-1]) != self.tokens:
            raise ValueError(f"tokens={self.tokens} but the offsets cover N={int(self.q_offsets[-1])}")
        if (
            read_values
            and self.window is not None
            and self.kv_level is not None
            and not bool((self.kv_level == 1).all())
        ):
            raise ValueError("a coordinate window only applies to full-resolution entries (kv_level 1)")
        if read_values and self.facts is not None:
            self._check_facts()

    def _check_facts(self) -> None:
        """Refuse facts the tensors contradict (kernels trusting them would read wrong rows)."""
        read = read_facts(self, window_tiles=False)
        given = self.facts
        wrong = [name for name in ("q_block_max", "k_block_max") if getattr(given, name) != getattr(read, name)]
        if not set(read.levels) <= set(given.levels):
            wrong.append("levels")
        rows = given.rows_of()
        if any(rows.get(p, n) != n for p, n in read.rows_of().items()):
            wrong.append("level_rows")
        if given.keep_max is not None and read.keep_max is not None and read.keep_max > given.keep_max:
            wrong.append("keep_max")
        if wrong:
            raise ValueError(f"the plan's facts {given} contradict its tensors ({', '.join(wrong)}: {read})")

    # --- shape facts -------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """``N``, the tokens the plan covers."""
        return self.tokens if self.tokens is not None else int(self.q_offsets[-1])

    @property
    def num_q_blocks(self) -> int:
        return self.q_offsets.numel() - 1

    @property
    def num_k_blocks(self) -> int:
        return self.k_offsets.numel() - 1

    @property
    def max_kv(self) -> int:
        return self.kv_index.shape[3]

    @property
    def order(self) -> BlockOrder:
        """The reorder with the query blocks."""
        return BlockOrder(self.perm, self.q_offsets)

    def levels(self) -> torch.Tensor:
        """``kv_level`` with the all-ones default filled in."""
        if self.kv_level is not None:
            return self.kv_level
        return torch.ones_like(self.kv_index)

    def permute(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return self.order.permute(x, dim)

    def unpermute(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return self.order.unpermute(x, dim)

    def query_block_of_position(self) -> torch.Tensor:
        """``[N]`` query block of each plan position."""
        return BlockOrder(None, self.q_offsets).block_of_position(self.num_tokens)

    def to(self, device) -> "AttentionPlan":
        def mv(x):
            return None if x is None else x.to(device)

        return AttentionPlan(
            perm=mv(self.perm),
            q_offsets=self.q_offsets.to(device),
            k_offsets=self.k_offsets.to(device),
            kv_index=self.kv_index.to(device),
            kv_level=mv(self.kv_level),
            token_keep=mv(self.token_keep),
            window=None if self.window is None else self.window.to(device),
            method=self.method,
            info=self.info,
            tokens=self.num_tokens if self.tokens is None and self.q_offsets.device.type == "cpu" else self.tokens,
            facts=self._facts_for(torch.device(device)),
        )

    def _facts_for(self, device: torch.device) -> PlanFacts | None:
        """The facts a copy on ``device`` carries: read here off a CPU plan going elsewhere (free
        now, a host read per call there)."""
        if self.facts is None and self.q_offsets.device.type == "cpu" and device.type != "cpu":
            return read_facts(self)
        return self.facts

    def clone(self) -> "AttentionPlan":
        """A copy whose tensors (and ``info`` dict) share nothing with this one's, for plans
        handed to users from a cache: editing the copy cannot change later calls."""
        def cp(x):
            return None if x is None else x.clone()

        return AttentionPlan(
            perm=cp(self.perm),
            q_offsets=self.q_offsets.clone(),
            k_offsets=self.k_offsets.clone(),
            kv_index=self.kv_index.clone(),
            kv_level=cp(self.kv_level),
            token_keep=cp(self.token_keep),
            window=None if self.window is None else self.window.clone(),
            method=self.method,
            info=dict(self.info),
            tokens=self.tokens,
            facts=self.facts,
        )

    # --- statistics --------------------------------------------------------------------------
    @functools.cached_property
    def _stats(self) -> dict:
        n = self.num_tokens
        k_sizes = self.k_offsets.diff().to(torch.float64)
        q_sizes = self.q_offsets.diff().to(torch.float64)
        valid = self.kv_index >= 0
        idx = self.kv_index.clamp(min=0)
        level = self.levels().to(torch.float64)
        entry_keys = torch.where(valid, k_sizes[idx], 0.0)  # key tokens behind each entry
        entry_cost = entry_keys / level  # FLOP-equivalent keys (pooled keys count 1/p)

        # Block-level work a block-sparse kernel does: every query of the block times every
        # (pooled) key of every listed entry.
        block_work = (entry_cost.sum(-1) * q_sizes).sum((-1,)).mean()
        block_density = float(block_work / (n * n))

        if self.window is not None:
            # Every entry of a windowed plan is level 1; exact keys per query from the window.
            per_query = self.window.keys_per_query().to(torch.float64)
            if self.token_keep is not None:
                raise NotImplementedError("token_keep together with a window is not supported")
            flop = float(per_query.sum() / (n * n))
        elif self.token_keep is not None:
            qb = self.query_block_of_position()
            cost = entry_cost[:, :, qb, :]  # [B', H', N, max_kv]
            flop = float((cost * self.token_keep).sum((-1, -2)).mean() / (n * n))
        else:
            flop = block_density
        counts = {}
        for p in LEVELS:
            counts[p] = float(((level == p) & valid).to(torch.float64).sum() / valid.numel())
        return {
            "density": flop,
            "block_density": block_density,
            "level_fractions": counts,
        }

    def density(self) -> float:
        """FLOP-equivalent density: attended (pooled keys count 1/p) query-key pairs over N²,
        averaged over batch and heads. 1.0 is dense attention."""
        return self._stats["density"]

    def stats(self) -> dict:
        """``density`` (FLOP-equivalent), ``block_density`` (work a block-sparse kernel does,
        masked entries included), ``level_fractions`` (share of kv slots at each pool factor),
        plus shape facts."""
        return {
            "method": self.method,
            "num_tokens": self.num_tokens,
            "num_q_blocks": self.num_q_blocks,
            "num_k_blocks": self.num_k_blocks,
            "max_kv": self.max_kv,
            **self._stats,
        }


@dataclass(frozen=True)
class ExtraKeys:
    """Keys every query attends in the same softmax as its plan keys (text tokens).

    Attributes:
        k, v: ``[B, Ne, heads, D]``.
        mask: ``[B, Ne]`` bool, ``True`` where the key is real (e.g. HunyuanVideo's text
            padding mask), or ``None`` for all real.
    """

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None = None


def plan_facts(plan: AttentionPlan) -> PlanFacts:
    """``plan.facts``, or the facts read off its tensors (free on the CPU, a host read on a
    GPU: plans made there by hand carry no facts)."""
    return plan.facts if plan.facts is not None else read_facts(plan)


def _levels_present(levels: torch.Tensor, valid: torch.Tensor) -> set[int]:
    """The pool factors of the ``valid`` entries of ``levels``, and 1: a comparison per pool
    factor of :data:`LEVELS` rather than the sort inside ``unique``, which a plan with many
    entries (PSA's budget mode) paid for at every check; a sort only when an entry holds
    another value (which the plan's checks then refuse)."""
    present = levels.masked_fill(~valid, 1)
    at_level = {p: present == p for p in LEVELS}
    if not bool(functools.reduce(torch.logical_or, at_level.values()).all()):
        return {1, *(int(p) for p in present.unique().tolist())}
    return {1} | {p for p, at in at_level.items() if bool(at.any())}


def read_facts(plan: AttentionPlan, window_tiles: bool = True) -> PlanFacts:
    """The :class:`PlanFacts` of ``plan``'s tensors (reads them all; ``window_tiles=False``
    leaves out the window tiles, the costly part)."""
    from .window_tiles import largest_unmasked_tiles

    n = plan.num_tokens
    q_sizes, k_sizes = plan.q_offsets.diff(), plan.k_offsets.diff()
    q_block_max = int(q_sizes.max()) if q_sizes.numel() else 0
    k_block_max = int(k_sizes.max()) if k_sizes.numel() else 0
    valid = plan.kv_index >= 0
    levels = tuple(sorted(_levels_present(plan.levels(), valid)))
    rows = tuple(int(((k_sizes + p - 1) // p).sum()) for p in levels)
    keep_max = None
    if plan.token_keep is not None:
        kept = plan.token_keep & valid[:, :, plan.query_block_of_position()]
        keep_max = int(kept.sum(-1).max()) if kept.numel() else 0
    w = plan.window
    extent, tiles = None, (0, 0)
    if w is not None:
        extent = tuple(int(x) + 1 for x in w.coords.max(0).values.tolist())
        undilated = all(d == 1 for d in w.dilation)
        if window_tiles and w.grid is not None and plan.token_keep is None and undilated:
            tiles = largest_unmasked_tiles(w.coords.long(), w.lo, w.hi, w.grid, plan.q_offsets, plan.k_offsets, n,
                                           q_block_max, k_block_max)
    return PlanFacts(q_block_max, k_block_max, levels, rows, keep_max, extent, tiles)


def dense_plan(num_tokens: int, block: int = 128, device="cpu") -> AttentionPlan:
    """A plan keeping every key at full resolution (density 1)."""
    from .layout import uniform_offsets

    offsets = uniform_offsets(num_tokens, block).to(device)
    nb = offsets.numel() - 1
    kv_index = torch.arange(nb, device=device).expand(1, 1, nb, nb).contiguous()
    return AttentionPlan(None, offsets, offsets, kv_index, method="dense", tokens=num_tokens,
                         facts=PlanFacts.uniform(num_tokens, block, block))


def pack_block_selection(selected: torch.Tensor, levels: torch.Tensor | None = None):
    """Turn a boolean block map into ``kv_index`` (and ``kv_level``) lists.

    Args:
        selected: ``[B', H', n_q_blocks, n_k_blocks]`` bool, which key blocks each query
            block uses.
        levels: optional same-shape int64 pool factor per pair (ignored where not selected).

    Returns:
        ``(kv_index, kv_level)`` of shape ``[B', H', n_q_blocks, max_kv]``; unused slots are
        ``-1`` (level 1); entries in ascending key block order. ``max_kv`` is the largest row
        count on the CPU; on other devices it is ``n_k_blocks``, a bound known without reading
        the selection back to the host (kernels stop at each row's own count).
    """
    nk = selected.shape[-1]
    if selected.device.type == "cpu":
        max_kv = max(int(selected.sum(-1).max()), 1) if selected.numel() else 1
    else:
        max_kv = max(nk, 1)
    ids = torch.arange(nk, device=selected.device).expand_as(selected)
    # Selected ids sort first, in ascending order; the rest are pushed past the end.
    key = torch.where(selected, ids, ids + nk)
    order = key.argsort(dim=-1)[..., :max_kv]
    kv_index = torch.where(
        selected.gather(-1, order), order, torch.full_like(order, -1)
    )
    kv_level = None
    if levels is not None:
        kv_level = torch.where(kv_index >= 0, levels.gather(-1, order), torch.ones_like(order))
    return kv_index, kv_level
