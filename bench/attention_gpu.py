"""Triton kernels vs dense SDPA, FlexAttention and the torch backend, on one GPU.

For each method (gna, psa, vmoba) and N in {16K, 32K, 75K} (12 heads, D = 128, bf16):

1. correctness on hardware: the Triton backend against the torch backend on the same plan
   (forward at every size, dq/dk/dv at the smallest), max abs error;
2. median times (``triton.testing.do_bench``) of forward and forward+backward for dense SDPA
   (flash backend), FlexAttention compiled with the plan's mask (block mask from the plan's
   lists, plus the per-token window/routing as a mask function; PSA's pooled entries are run
   at full resolution there, as FlexAttention cannot pool), the torch backend and the Triton
   kernels, on q/k/v already in plan order (selection and permutation are not timed);
3. TFLOP/s from the plan's FLOP-equivalent density (``4·B·H·N²·D·density`` forward, 2.5× that
   for backward, FlashAttention's convention).

Writes one JSON file (GPU name, versions, date, exact command, every number) to
``bench/results/``.

    python bench/attention_gpu.py                                  # full sweep
    python bench/attention_gpu.py --sizes 16384 --methods gna --no-backward   # quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

GRIDS = {16384: (16, 32, 32), 32760: (21, 30, 52), 75600: (21, 45, 80)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(GRIDS), choices=list(GRIDS),
                    help="token counts (each maps to a Wan-like latent grid)")
    ap.add_argument("--methods", nargs="+", default=["gna", "psa", "vmoba"], choices=["gna", "psa", "vmoba"])
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch backend timings")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per case (ms)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/attention_gpu_<date>.json)")
    return ap.parse_args(argv)


def make_plan(method: str, q, k, grid):
    """The method's plan at its default (inference) settings."""
    import vdiff_sparse as vs

    if method == "gna":
        # Half of each axis around every query: ~12% density, like the HunyuanVideo presets.
        window = tuple(max(2, n // 2) for n in grid)
        return vs.plan_gna(grid, window=window, stride=(1, 4, 4), device=q.device)
    if method == "psa":
        return vs.plan_psa(q, k, grid, vs.PSAConfig())
    return vs.plan_vmoba(q, k, grid, layer_index=2, config=vs.VMoBAConfig())


def flex_mask_mod(plan, B, H):
    """A FlexAttention mask function with the plan's pairs (pooled entries at full resolution)."""
    import torch

    dev = plan.kv_index.device
    q_block = plan.query_block_of_position()
    k_block = torch.repeat_interleave(torch.arange(plan.num_k_blocks, device=dev), plan.k_offsets.diff())
    Bp, Hp = plan.kv_index.shape[:2]
    slot = torch.full((Bp, Hp, plan.num_q_blocks, plan.num_k_blocks + 1), -1, dtype=torch.int64, device=dev)
    entries = torch.arange(plan.max_kv, device=dev).expand_as(plan.kv_index)
    target = torch.where(plan.kv_index >= 0, plan.kv_index, plan.num_k_blocks)
    slot.scatter_(-1, target, entries)
    slot = slot[..., :-1]
    keep, window = plan.token_keep, plan.window

    def mask_mod(b, h, q_idx, kv_idx):
        pb = b if Bp > 1 else 0
        ph = h if Hp > 1 else 0
        s = slot[pb, ph, q_block[q_idx], k_block[kv_idx]]
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


def bench(fn, backward: bool, leaves, rep_ms: int) -> float:
    """Median ms of ``fn()`` (and its backward with a fixed output gradient)."""
    import torch
    import triton

    if not backward:
        with torch.no_grad():
            return triton.testing.do_bench(fn, rep=rep_ms, return_mode="median")
    out = fn()
    grad = torch.randn_like(out)

    def step():
        fn().backward(grad)

    return triton.testing.do_bench(step, rep=rep_ms, grad_to_none=leaves, return_mode="median")


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vdiff_sparse.backends import get_backend

    if not torch.cuda.is_available():
        sys.exit("attention_gpu.py needs a CUDA GPU (use bench/attention_cpu.py on the CPU)")
    dev = "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    B, H, D = args.batch, args.heads, args.head_dim
    triton_be, torch_be = get_backend("triton"), get_backend("torch")
    results = []
    for n in args.sizes:
        grid = GRIDS[n]
        g = torch.Generator(device=dev).manual_seed(n)
        q, k, v = (torch.randn(B, n, H, D, device=dev, dtype=dtype, generator=g) for _ in range(3))
        leaves = [t.requires_grad_(True) for t in (q, k, v)]
        full_flops = 4.0 * B * H * n * n * D

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

        dense = {"forward_ms": bench(sdpa, False, leaves, args.rep_ms)}
        if not args.no_backward:
            dense["fwd_bwd_ms"] = bench(sdpa, True, leaves, args.rep_ms)
        results.append({"N": n, "grid": grid, "impl": "dense_sdpa_flash", "density": 1.0, **dense,
                        "tflops_forward": full_flops / dense["forward_ms"] / 1e9})
        print(results[-1], flush=True)

        for method in args.methods:
            with torch.no_grad():
                plan = make_plan(method, q, k, grid)
            density = plan.density()
            qp, kp, vp = (plan.permute(t.detach()).requires_grad_(True) for t in (q, k, v))
            sparse_leaves = [qp, kp, vp]
            record = {"N": n, "grid": grid, "method": method, "density": density, "stats": {
                key: val for key, val in plan.stats().items() if key != "method"}}

            # Correctness on hardware: triton vs torch backend on the same plan.
            out_t = triton_be.forward(qp, kp, vp, plan)
            out_r = torch_be.forward(qp, kp, vp, plan)
            record["max_abs_err_vs_torch"] = (out_t.float() - out_r.float()).abs().max().item()
            if n == min(args.sizes) and not args.no_backward:
                gout = torch.randn_like(out_t)
                gt = torch.autograd.grad(out_t, sparse_leaves, gout)
                gr = torch.autograd.grad(out_r, sparse_leaves, gout)
                record["grad_max_abs_err_vs_torch"] = {
                    name: (a.float() - b.float()).abs().max().item() for name, a, b in zip("qkv", gt, gr)}
            del out_t, out_r

            impls = {"triton": lambda: triton_be.forward(qp, kp, vp, plan)}
            if not args.no_torch:
                impls["torch"] = lambda: torch_be.forward(qp, kp, vp, plan)
            if not args.no_flex:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention

                block_mask = create_block_mask(flex_mask_mod(plan, B, H), B, H, n, n, device=dev, BLOCK_SIZE=128)
                flex = torch.compile(flex_attention)
                record["flex_block_density"] = 1.0 - block_mask.sparsity() / 100.0
                impls["flex"] = lambda: flex(
                    qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), block_mask=block_mask
                ).transpose(1, 2)
            for name, fn in impls.items():
                row = dict(record, impl=name, forward_ms=bench(fn, False, sparse_leaves, args.rep_ms))
                row["tflops_forward"] = full_flops * density / row["forward_ms"] / 1e9
                row["speedup_forward_vs_dense"] = dense["forward_ms"] / row["forward_ms"]
                if not args.no_backward:
                    row["fwd_bwd_ms"] = bench(fn, True, sparse_leaves, args.rep_ms)
                    row["tflops_fwd_bwd"] = 3.5 * full_flops * density / row["fwd_bwd_ms"] / 1e9
                    row["speedup_fwd_bwd_vs_dense"] = dense["fwd_bwd_ms"] / row["fwd_bwd_ms"]
                results.append(row)
                print({k: v for k, v in row.items() if k != "stats"}, flush=True)
            torch.cuda.empty_cache()

    now = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "script": "bench/attention_gpu.py",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": now.isoformat(timespec="seconds"),
        "machine": {"gpu": torch.cuda.get_device_name(), "host": platform.node(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda},
        "shape": {"batch": B, "heads": H, "head_dim": D, "dtype": args.dtype},
        "flops_convention": "forward 4*B*H*N^2*D*density; fwd+bwd 3.5x forward",
        "results": results,
    }
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"attention_gpu_{now.strftime('%Y%m%d_%H%M%S')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
