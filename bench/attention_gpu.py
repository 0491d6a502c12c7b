"""Triton kernels vs dense SDPA, FlexAttention and the torch backend, on one GPU.

For each method (``dense`` = a density-1 plan, ``gna``, ``psa``, ``vmoba``) and N in
{16K, 32K, 75K} (12 heads, D = 128, bf16):

1. correctness on hardware, at a small grid (``--check-grid``) before anything is timed: the
   Triton backend against the float64 reference (forward, dq/dk/dv), FlexAttention with the
   plan's block mask against the reference on the plan seen at full resolution (forward), and
   the plan's block mask against ``create_block_mask`` of the same mask function; then at every
   timed size the Triton forward against the torch backend;
2. the selection (building the plan from q and k) timed on its own, median of a few runs, with
   its most expensive operators from the profiler (``--profile-selection``);
3. median times of forward and forward+backward (``triton.testing.do_bench``; warm-up, Triton
   autotuning and ``torch.compile`` happen before timing) for dense SDPA (flash backend),
   FlexAttention compiled with the plan's block mask (PSA's pooled entries at full resolution:
   FlexAttention cannot pool, so it does more work there), the torch backend and the Triton
   kernels, on q/k/v already in plan order;
4. beside every Triton time, its work efficiency (``TritonBackend.work``: the share of the
   query-key pairs its tiles compute that the plan asks for, forward and backward, at this
   GPU's tiles);
5. TFLOP/s from the plan's FLOP-equivalent density (forward ``4·B·H·N²·D·density``, backward
   2.5x that) and the targets: density 1 at >= 70% of SDPA throughput, sparse time <=
   1.25·density·dense + selection, faster than FlexAttention, selection <= 5% of attention.

Writes one JSON file (device, versions, date, exact command, every number), rewritten after
every case so a run cut short keeps what it measured. The script only reads the GPU's settings
(never clocks, power or MIG). Exit status 1 if any correctness check failed.

A full sweep takes more than one 10-minute device call (Triton autotuning and FlexAttention
compilation alone take minutes); run one size per call, the checks in the first only
(``--budget-s`` stops starting new cases in time, and the JSON keeps what was measured):

    python bench/attention_gpu.py --sizes 16384 --profile-selection --out $OUT/gpu_16k.json
    python bench/attention_gpu.py --sizes 32760 --no-check --profile-selection --out $OUT/gpu_32k.json
    python bench/attention_gpu.py --sizes 75600 --no-check --impls dense triton flex --out $OUT/gpu_75k.json
    python bench/attention_gpu.py --sizes 75600 --no-check --impls dense torch --methods psa vmoba

``--smoke`` runs the whole script on the CPU (Triton interpreter, a 96-token grid, 2 heads,
D = 64, eager FlexAttention forward only, which ignores the tile lists: the block mask is
checked against ``create_block_mask`` there); its times mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time

#: Token count -> a Wan-like latent grid (T, H, W).
GRIDS = {16384: (16, 32, 32), 32760: (21, 30, 52), 75600: (21, 45, 80)}
METHODS = ("dense", "gna", "psa", "vmoba")
IMPLS = ("dense", "flex", "torch", "triton")
# Max abs forward error / relative gradient error vs float64, per dtype (as tests/test_kernels.py).
FWD_TOL = {"fp32": 1e-4, "fp16": 4e-3, "bf16": 3e-2}
BWD_TOL = {"fp32": 2e-4, "fp16": 1e-2, "bf16": 6e-2}
# --smoke: timed grid, reference-check grid, and FlexAttention tiles small enough that the plans'
# blocks straddle several of them.
SMOKE_GRID = (2, 6, 8)
SMOKE_CHECK_GRID = (3, 8, 12)
SMOKE_FLEX_BLOCK = 32


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(GRIDS), choices=list(GRIDS),
                    help="token counts (each maps to a Wan-like latent grid)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS,
                    help="what to time (dense = SDPA flash, the baseline of every ratio)")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    ap.add_argument("--check-grid", type=int, nargs=3, default=(4, 16, 16),
                    help="latent grid of the correctness checks against the float64 reference")
    ap.add_argument("--no-check", action="store_true", help="skip the reference checks")
    ap.add_argument("--profile-selection", action="store_true",
                    help="record the selection's most expensive operators (torch profiler)")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per case (ms)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no new (size, method) case after this many seconds")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU under TRITON_INTERPRET=1: tiny grid, 2 heads, D 64, eager "
                         "FlexAttention forward only; proves the script end to end")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/attention_gpu_<date>.json)")
    return ap.parse_args(argv)


# --- plans and masks ----------------------------------------------------------------------------

def make_plan(method: str, q, k, grid, smoke: bool = False):
    """The method's plan at its inference settings (smaller blocks for the smoke grid)."""
    import vdiff_sparse as vs

    if method == "dense":
        return vs.dense_plan(q.shape[1], 128 if not smoke else 32, device=q.device)
    if method == "gna":
        # Half of each axis around every query: ~12% density, like the HunyuanVideo presets.
        window = tuple(max(2, n // 2) for n in grid)
        return vs.plan_gna(grid, window=window, stride=(1, 4, 4) if not smoke else (1, 2, 2), device=q.device)
    if method == "psa":
        config = vs.PSAConfig() if not smoke else vs.PSAConfig(block_q=32, block_k=32, mode="quantile")
        return vs.plan_psa(q, k, grid, config)
    config = vs.VMoBAConfig() if not smoke else vs.VMoBAConfig(topk=3, query_block=32, block_3d=(2, 3, 4))
    return vs.plan_vmoba(q, k, grid, layer_index=2, config=config)


def full_resolution(plan):
    """The plan with every pooled entry seen at full resolution (what FlexAttention runs)."""
    from vdiff_sparse.plan import AttentionPlan

    return AttentionPlan(plan.perm, plan.q_offsets, plan.k_offsets, plan.kv_index, None,
                         plan.token_keep, plan.window, method=plan.method)


def flex_mask_mod(plan):
    """A FlexAttention mask function with the plan's pairs (pooled entries at full resolution)."""
    import torch

    dev = plan.kv_index.device
    q_block = plan.query_block_of_position()
    k_block = torch.repeat_interleave(torch.arange(plan.num_k_blocks, device=dev), plan.k_offsets.diff())
    Bp, Hp = plan.kv_index.shape[:2]
    # slot[b, h, qb, kb]: the entry of key block kb in query block qb's list, -1 if absent.
    slot = torch.full((Bp, Hp, plan.num_q_blocks, plan.num_k_blocks + 1), -1, dtype=torch.int64, device=dev)
    entries = torch.arange(plan.max_kv, device=dev).expand_as(plan.kv_index)
    slot.scatter_(-1, torch.where(plan.kv_index >= 0, plan.kv_index, plan.num_k_blocks), entries)
    slot = slot[..., :-1].contiguous()
    keep, window = plan.token_keep, plan.window

    def mask_mod(b, h, q_idx, kv_idx):
        s = slot[b if Bp > 1 else 0, h if Hp > 1 else 0, q_block[q_idx], k_block[kv_idx]]
        ok = s >= 0
        if keep is not None:
            ok = ok & keep[b if keep.shape[0] > 1 else 0, h if keep.shape[1] > 1 else 0, q_idx, s.clamp(min=0)]
        if window is not None:
            for axis in range(3):
                x = window.coords[kv_idx, axis]
                lo, hi = window.lo[q_idx, axis], window.hi[q_idx, axis]
                ok = ok & (x >= lo) & (x <= hi) & ((x - lo) % window.dilation[axis] == 0)
        return ok

    return mask_mod


def flex_block_mask(plan, block: int = 128):
    """FlexAttention ``BlockMask`` of ``plan`` built from its block lists (never an N x N mask).

    A ``block``-square tile is computed when any plan (query block, key block) pair overlapping
    it is listed; it skips the mask function (a "full" tile) when every overlapping pair is
    listed, the plan has no per-token routing or window, and the tile is not cut by N.
    """
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    dev = plan.kv_index.device
    n, nqb, nkb = plan.num_tokens, plan.num_q_blocks, plan.num_k_blocks
    listed = torch.zeros(*plan.kv_index.shape[:2], nqb, nkb + 1, dtype=torch.int64, device=dev)
    listed.scatter_(-1, torch.where(plan.kv_index >= 0, plan.kv_index, nkb), 1)
    # 2D prefix sums: listed pairs inside any rectangle of (query block, key block) in O(1).
    prefix = torch.nn.functional.pad(listed[..., :nkb].cumsum(-2).cumsum(-1), (1, 0, 1, 0))

    n_tiles = -(-n // block)
    first = torch.arange(n_tiles, device=dev) * block
    last = torch.clamp(first + block, max=n) - 1

    def span(offsets):
        return (torch.searchsorted(offsets, first, right=True) - 1,
                torch.searchsorted(offsets, last, right=True) - 1)

    q0, q1 = span(plan.q_offsets)
    k0, k1 = span(plan.k_offsets)
    i0, i1, j0, j1 = q0[:, None], q1[:, None] + 1, k0[None, :], k1[None, :] + 1
    count = prefix[..., i1, j1] - prefix[..., i0, j1] - prefix[..., i1, j0] + prefix[..., i0, j0]
    area = (i1 - i0) * (j1 - j0)
    whole = (last - first + 1) == block
    full = (count == area) & whole[:, None] & whole[None, :]
    if plan.token_keep is not None or plan.window is not None:
        full = torch.zeros_like(full)
    partial = (count > 0) & ~full

    def lists(tiles):
        num = tiles.sum(-1).to(torch.int32)
        idx = (~tiles).to(torch.int8).argsort(dim=-1, stable=True).to(torch.int32)
        return num.contiguous(), idx.contiguous()

    return BlockMask.from_kv_blocks(*lists(partial), *lists(full), BLOCK_SIZE=block,
                                    mask_mod=flex_mask_mod(plan), seq_lengths=(n, n))


def full_tiles(block_mask):
    """``[B, H, q tiles, k tiles]`` bool: the tiles a ``BlockMask`` computes without its mask."""
    import torch

    num, idx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    if idx is None:
        return torch.zeros_like(block_mask.to_dense(), dtype=torch.bool)
    out = torch.zeros(*idx.shape[:-1], idx.shape[-1] + 1, dtype=torch.bool, device=idx.device)
    used = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    out.scatter_(-1, torch.where(used, idx.long(), idx.shape[-1]), True)
    return out[..., :-1]


@functools.cache
def flex_function(device: str):
    """FlexAttention compiled once for the GPU (recompiling per call costs minutes per run);
    eager on the CPU."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if device == "cuda" else flex_attention


# --- timing -------------------------------------------------------------------------------------

def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, rep_ms: int, cpu_reps: int = 1) -> float:
    """Median wall time of ``fn()`` in ms (``do_bench`` on the GPU; on the CPU, where only
    ``--smoke`` runs and the interpreter's times mean nothing, ``cpu_reps`` calls)."""
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, rep=rep_ms, return_mode="median")
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_impl(fn, backward: bool, leaves, device: str, rep_ms: int) -> float:
    """Median ms of ``fn()``, or of ``fn()`` and its backward with a fixed output gradient.
    One untimed call first (compilation, autotuning)."""
    import torch

    if not backward:
        with torch.no_grad():
            fn()
            sync(device)
            return median_ms(fn, device, rep_ms)
    grad = torch.randn_like(fn())

    def step():
        for t in leaves:
            t.grad = None
        fn().backward(grad)

    step()
    sync(device)
    return median_ms(step, device, rep_ms)


def selection(method, q, k, grid, device, smoke, profile: bool):
    """Median ms of building the plan (and the profiler's top operators when ``profile``)."""
    import torch

    def build():
        with torch.no_grad():
            plan = make_plan(method, q, k, grid, smoke)
        sync(device)
        return plan

    plan = build()
    times = []
    for _ in range(3 if device == "cuda" else 1):
        t0 = time.perf_counter()
        build()
        times.append((time.perf_counter() - t0) * 1e3)
    out = {"selection_ms": statistics.median(times)}
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            build()
        attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        top = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)[:8]
        out["selection_top_ops_ms"] = {e.key: round(getattr(e, attr) / 1e3, 4) for e in top}
    return plan, out


# --- correctness --------------------------------------------------------------------------------

def rel_err(got, want) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1.0)).item()


def check_method(method, grid, args, device, dtype) -> dict:
    """Triton and FlexAttention against the float64 reference at a small grid."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    from vdiff_sparse.backends import get_backend
    from vdiff_sparse.backends.reference import reference_attention

    n = grid[0] * grid[1] * grid[2]
    B, H, D = args.batch, args.heads, args.head_dim
    g = torch.Generator(device="cpu").manual_seed(n + 1)
    q, k, v = (torch.randn(B, n, H, D, generator=g).to(device, dtype) for _ in range(3))
    plan = make_plan(method, q, k, grid, args.smoke)
    qp, kp, vp = (plan.permute(t).requires_grad_(True) for t in (q, k, v))
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (qp, kp, vp)]
    out = get_backend("triton").forward(qp, kp, vp, plan)
    ref = reference_attention(*ref_leaves, plan)
    dout = torch.randn(out.shape, generator=g).to(device)
    grads = torch.autograd.grad(out, (qp, kp, vp), dout.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    rec = {"grid": grid, "triton_fwd_max_abs_err": (out.double() - ref).abs().max().item(),
           "triton_grad_rel_err": {name: rel_err(a, b) for name, a, b in zip("qkv", grads, ref_grads)}}
    ok = rec["triton_fwd_max_abs_err"] <= FWD_TOL[args.dtype] and all(
        e <= BWD_TOL[args.dtype] for e in rec["triton_grad_rel_err"].values())

    full = full_resolution(plan)
    block = SMOKE_FLEX_BLOCK if args.smoke else 128
    block_mask = flex_block_mask(full, block)
    exact = create_block_mask(flex_mask_mod(full), B if full.kv_index.shape[0] > 1 else 1,
                              H if full.kv_index.shape[1] > 1 else 1, n, n, device=device, BLOCK_SIZE=block)
    ours, theirs = block_mask.to_dense().bool(), exact.to_dense().bool()
    # Ours may compute tiles whose listed pairs the routing/window masks out entirely, but must
    # compute every tile with an allowed pair, and skip the mask only where all pairs are allowed.
    # (Eager FlexAttention on the CPU ignores the tile lists, so only these checks cover them there.)
    rec["flex_block_mask_covers_exact"] = bool((ours | ~theirs).all())
    rec["flex_full_tiles_are_full"] = bool((~full_tiles(block_mask) | full_tiles(exact)).all())
    rec["flex_block_density"] = ours.float().mean().item()
    flex = flex_function(device)
    with torch.no_grad():
        fout = flex(*(t.detach().transpose(1, 2) for t in (qp, kp, vp)), block_mask=block_mask).transpose(1, 2)
        fref = reference_attention(*(t.detach().double() for t in (qp, kp, vp)), full)
    rec["flex_fwd_max_abs_err"] = (fout.double() - fref).abs().max().item()
    rec["ok"] = (ok and rec["flex_block_mask_covers_exact"] and rec["flex_full_tiles_are_full"]
                 and rec["flex_fwd_max_abs_err"] <= FWD_TOL[args.dtype])
    return rec


# --- main ---------------------------------------------------------------------------------------

class Report:
    """The JSON document, rewritten after every case."""

    def __init__(self, args, device: str):
        import torch
        import triton

        now = datetime.datetime.now(datetime.timezone.utc)
        default = f"attention_gpu_{'smoke_' if args.smoke else ''}{now.strftime('%Y%m%d_%H%M%S')}.json"
        self.path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", default)
        machine = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(), "python": platform.python_version()}
        if device == "cuda":
            machine["gpu"] = torch.cuda.get_device_name()
            machine["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        self.doc = {
            "script": "bench/attention_gpu.py",
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "env": {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")},
            "date": now.isoformat(timespec="seconds"),
            "device": device,
            "machine": machine,
            "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
            "shape": {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "dtype": args.dtype},
            "flops_convention": "forward 4*B*H*N^2*D*density; fwd+bwd 3.5x forward",
            "checks": [],
            "results": [],
            "skipped": [],
        }

    def write(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=2, default=str)
        os.replace(tmp, self.path)


def targets(row: dict, dense: dict, flex: dict | None) -> dict:
    """The issue's targets for one Triton row (``None`` where a number is missing)."""
    out = {}
    for phase in ("forward_ms", "fwd_bwd_ms"):
        if phase not in row or phase not in dense:
            continue
        tag = phase[:-3]
        if row["method"] == "dense":
            out[f"{tag}_throughput_vs_sdpa"] = dense[phase] / row[phase]
            out[f"{tag}_meets_70pct"] = out[f"{tag}_throughput_vs_sdpa"] >= 0.7
            continue
        bound = 1.25 * row["density"] * dense[phase] + row["selection_ms"]
        out[f"{tag}_bound_ms"] = bound
        out[f"{tag}_meets_bound"] = row[phase] <= bound
        if flex is not None and phase in flex:
            out[f"{tag}_faster_than_flex"] = row[phase] < flex[phase]
    if row["method"] != "dense":
        out["selection_share_of_forward"] = row["selection_ms"] / row["forward_ms"]
        out["selection_meets_5pct"] = out["selection_share_of_forward"] <= 0.05
    return out


def time_dense(q, k, v, n, grid, args, device) -> dict:
    """Dense SDPA (flash backend) on ``[B, N, heads, D]`` q, k, v: the baseline of every ratio."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    flops = 4.0 * q.shape[0] * q.shape[2] * n * n * q.shape[3]
    row = {"N": n, "grid": grid, "impl": "dense_sdpa_flash", "density": 1.0}
    row["forward_ms"] = time_impl(sdpa, False, [q, k, v], device, args.rep_ms)
    row["tflops_forward"] = flops / row["forward_ms"] / 1e9
    if not args.no_backward:
        row["fwd_bwd_ms"] = time_impl(sdpa, True, [q, k, v], device, args.rep_ms)
        row["tflops_fwd_bwd"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9
    return row


def triton_work(backend, plan, q, device: str) -> dict:
    """``TritonBackend.work`` for this call: the tiles of this GPU's generation (the
    interpreter's under ``--smoke``), pairs summed over the call's batch and heads."""
    tiles = None
    gpu = 9
    if device == "cuda":
        import torch

        gpu = torch.cuda.get_device_capability()[0]
    else:
        from vdiff_sparse.kernels.tiles import INTERPRETER_TILES as tiles
    return backend.work(plan, q.shape[-1], batch=q.shape[0], heads=q.shape[2], gpu=gpu, tiles=tiles)


def time_method(method, q, k, v, n, grid, args, device, dense: dict) -> list[dict]:
    """Selection, the Triton-vs-torch check and the timings of one method at one size."""
    import torch

    from vdiff_sparse.backends import get_backend

    plan, sel = selection(method, q.detach(), k.detach(), grid, device, args.smoke, args.profile_selection)
    record = {"N": n, "grid": grid, "method": method, "density": plan.density(), **sel,
              "stats": {key: val for key, val in plan.stats().items() if key != "method"}}
    leaves = [plan.permute(t.detach()).requires_grad_(True) for t in (q, k, v)]
    triton_be, torch_be = get_backend("triton"), get_backend("torch")
    work = triton_work(triton_be, plan, q, device)
    with torch.no_grad():
        out_t = triton_be.forward(*leaves, plan)
        try:  # the torch backend is the slow one: running out of memory is no kernel error
            err = (out_t.float() - torch_be.forward(*leaves, plan).float()).abs().max().item()
            record["triton_vs_torch_max_abs_err"] = err
            record["triton_vs_torch_ok"] = err <= 2 * FWD_TOL[args.dtype]
        except torch.cuda.OutOfMemoryError as oom:
            record["triton_vs_torch_error"] = f"OutOfMemoryError: {oom}"
    del out_t

    impls = {}
    if "triton" in args.impls:
        impls["triton"] = lambda: triton_be.forward(*leaves, plan)
    if "torch" in args.impls:
        impls["torch"] = lambda: torch_be.forward(*leaves, plan)
    if "flex" in args.impls:
        full = full_resolution(plan)
        block_mask = flex_block_mask(full, SMOKE_FLEX_BLOCK if args.smoke else 128)
        record["flex_density"] = full.density()
        record["flex_block_density"] = block_mask.to_dense().bool().float().mean().item()
        flex = flex_function(device)
        # No FlexAttention autograd on the CPU: detached inputs there (forward only).
        fq, fk, fv = (t.transpose(1, 2) if device == "cuda" else t.detach().transpose(1, 2) for t in leaves)
        impls["flex"] = lambda: flex(fq, fk, fv, block_mask=block_mask).transpose(1, 2)

    flops = 4.0 * q.shape[0] * q.shape[2] * n * n * q.shape[3] * plan.density()
    rows = {}
    for name, fn in impls.items():
        row = dict(record, impl=name)
        if name == "triton":
            # Beside every Triton time: the share of the pairs its tiles compute that the plan asks for.
            row["work_efficiency_forward"] = work["forward"]["efficiency"]
            row["work_efficiency_backward"] = work["backward"]["efficiency"]
            row["work"] = work
        try:
            row["forward_ms"] = time_impl(fn, False, leaves, device, args.rep_ms)
            row["tflops_forward"] = flops / row["forward_ms"] / 1e9
            if dense:
                row["speedup_forward_vs_dense"] = dense["forward_ms"] / row["forward_ms"]
            if not args.no_backward and not (name == "flex" and device != "cuda"):
                row["fwd_bwd_ms"] = time_impl(fn, True, leaves, device, args.rep_ms)
                row["tflops_fwd_bwd"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e9
                if dense:
                    row["speedup_fwd_bwd_vs_dense"] = dense["fwd_bwd_ms"] / row["fwd_bwd_ms"]
        except Exception as err:  # recorded, and the run goes on: it is unattended
            row["error"] = f"{type(err).__name__}: {err}"
        rows[name] = row
    if "triton" in rows and dense and "error" not in rows["triton"]:
        rows["triton"]["targets"] = targets(rows["triton"], dense, rows.get("flex"))
    return list(rows.values()) or [record]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        # Before triton is imported: the kernels run under the interpreter on CPU tensors.
        os.environ["TRITON_INTERPRET"] = "1"
        args.heads, args.head_dim = 2, 64
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("attention_gpu.py needs a CUDA GPU (or --smoke, which runs on the CPU)")
    device = "cpu" if args.smoke else "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    B, H, D = args.batch, args.heads, args.head_dim
    report = Report(args, device)
    t_start = time.perf_counter()
    failed = False

    if not args.no_check:
        check_grid = SMOKE_CHECK_GRID if args.smoke else tuple(args.check_grid)
        for method in args.methods:
            if time.perf_counter() - t_start > args.budget_s:
                report.doc["skipped"].append({"check": method, "reason": f"--budget-s {args.budget_s} spent"})
                continue
            try:
                rec = {"method": method, **check_method(method, check_grid, args, device, dtype)}
            except Exception as err:
                rec = {"method": method, "ok": False, "error": f"{type(err).__name__}: {err}"}
            failed |= not rec["ok"]
            report.doc["checks"].append(rec)
            report.write()
            print("check", rec, flush=True)

    cases = [SMOKE_GRID] if args.smoke else [GRIDS[n] for n in args.sizes]
    for grid in cases:
        n = grid[0] * grid[1] * grid[2]
        g = torch.Generator(device="cpu").manual_seed(n)
        q, k, v = (torch.randn(B, n, H, D, generator=g).to(device, dtype).requires_grad_(True) for _ in range(3))
        dense = {}
        if "dense" in args.impls:
            dense = time_dense(q, k, v, n, grid, args, device)
            report.doc["results"].append(dense)
            report.write()
            print(dense, flush=True)
        for method in args.methods:
            if time.perf_counter() - t_start > args.budget_s:
                report.doc["skipped"].append(
                    {"N": n, "method": method, "reason": f"--budget-s {args.budget_s} spent"})
                report.write()
                continue
            try:
                rows = time_method(method, q, k, v, n, grid, args, device, dense)
            except Exception as err:
                rows = [{"N": n, "grid": grid, "method": method, "error": f"{type(err).__name__}: {err}"}]
            for row in rows:
                # Correctness fails the run; a baseline that cannot run (e.g. out of memory) does not.
                kernel_error = "error" in row and row.get("impl", "triton") == "triton"
                failed |= kernel_error or not row.get("triton_vs_torch_ok", True)
                report.doc["results"].append(row)
                print({key: val for key, val in row.items() if key not in ("stats", "selection_top_ops_ms", "work")},
                      flush=True)
            report.write()
            if device == "cuda":
                torch.cuda.empty_cache()

    report.doc["wall_s"] = round(time.perf_counter() - t_start, 1)
    report.doc["all_checks_ok"] = not failed
    report.write()
    print(f"wrote {report.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
