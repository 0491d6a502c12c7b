"""Work efficiency of the Triton kernels per method, before and after the work-efficient kernels.

For each grid (16x32x32 = 16,384 tokens and 21x45x80 = 75,600) and each method at its default
settings, on real plans of video-like inputs (``video_attention_qkv``, 4 heads, D = 64 for the
selection; plans are made on the CPU), the query-key pairs the plan asks for (``useful``) and
the pairs of every tile the kernels compute (``executed``, masked lanes included), forward and
backward (``dq`` plus ``dk``/``dv``), at the tiles a Hopper GPU launches with for head dim 128:

* ``after``: ``TritonBackend().work(plan, 128)`` — the current kernels, counted from the tables
  their launches read (the tests check this count against the kernels' own);
* ``before``: the same counting applied to the launch scheme the kernels had before (commit
  f48841a, ``kernels/attention.py``): query-major for every plan, each query block walking
  every entry of its ``kv_index`` row whole (a pooled entry as its own ``BLOCK_N`` tiles; a
  routed plan's entry whenever any query of the ``BLOCK_M`` tile chose it; a window plan's
  entry as its whole key tile), ``dk``/``dv`` per key range over the query blocks listing it
  (skipping ``BLOCK_M`` chunks where no query chose it), at 64x64 tiles (an autotune choice of
  both old kernels).

GNA with stride 1 also reports the union bound: per tile, its queries times the keys in the
union of their windows, the least a tile kernel reads. Default methods: dense (128-token
blocks), GNA with the processors' preset (window 18x24x24, stride 16x8x8, fitted to the grid),
GNA with stride 1 and half of each axis as window (12.5% at 16K), PSA's threshold defaults at
``block_k`` 128 and 64 (float32 estimate: the same plan on every machine), VMoBA's top-k local
defaults in each of its 1D/2D/3D layers and its training setting (threshold 0.25, global) in a
3D layer.

    python bench/kernel_work.py          # writes bench/results/kernel_work.json (~3 minutes)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vdiff_sparse.benchmarks.meta import command_line, run_metadata, write_json

GRIDS = {16384: (16, 32, 32), 75600: (21, 45, 80)}
LEGACY_TILES = (64, 64)  # BLOCK_M, BLOCK_N of the old kernels, forward, dq and dk/dv


def plans(grid):
    import vdiff_sparse as vs
    from vdiff_sparse.methods.gna import GNAConfig, fit_to_grid
    from vdiff_sparse.video_attention_data import video_attention_qkv

    q, k, _ = video_attention_qkv(grid, heads=4, head_dim=64)
    fitted = fit_to_grid(GNAConfig(window=(18, 24, 24), stride=(16, 8, 8)), grid)
    window, stride, dilation = fitted.window, fitted.stride, fitted.dilation
    yield "dense", vs.dense_plan(q.shape[1], 128)
    yield "gna", vs.plan_gna(grid, window, stride, dilation)
    yield "gna_stride1", vs.plan_gna(grid, tuple(max(2, n // 2) for n in grid))
    yield "psa", vs.plan_psa(q, k, grid, vs.PSAConfig(importance_dtype="float32"))
    yield "psa_bk64", vs.plan_psa(q, k, grid, vs.PSAConfig(block_k=64, importance_dtype="float32"))
    for layer, name in enumerate(("vmoba_1d", "vmoba_2d", "vmoba_3d")):
        yield name, vs.plan_vmoba(q, k, grid, layer_index=layer)
    yield "vmoba_training_3d", vs.plan_vmoba(q, k, grid, vs.VMoBAConfig.training(), layer_index=2)


def _cdiv(a, b):
    return (a + b - 1) // b


def legacy_work(plan, block_m: int = LEGACY_TILES[0], block_n: int = LEGACY_TILES[1]) -> dict:
    """Pairs the kernels before this change computed for ``plan`` (see the module docstring),
    summed over the plan's batch and head entries."""
    from vdiff_sparse.kernels.pooling import pyramid_rows
    from vdiff_sparse.plan import plan_facts

    valid = plan.kv_index >= 0
    kb = plan.kv_index.clamp(min=0)
    li = torch.log2(torch.where(valid, plan.levels(), 1).double()).round().long()
    rows = pyramid_rows(plan.k_offsets, plan_facts(plan).levels, plan.num_tokens)
    k_pad = _cdiv(rows[li, kb, 1], block_n) * block_n * valid  # [B', H', nqb, max_kv]
    q_sizes = plan.q_offsets.diff()
    sub = _cdiv(int(q_sizes.max()), block_m)
    # Which BLOCK_M chunk of each query block uses each entry: all real chunks, or with per-token
    # routing the chunks where a query chose it.
    chunk_real = (torch.arange(sub)[None, :] * block_m < q_sizes[:, None])  # [nqb, sub]
    if plan.token_keep is None:
        used = chunk_real[None, None, :, :, None].expand(*valid.shape[:3], sub, valid.shape[-1])
    else:
        qb = plan.query_block_of_position()
        chunk = qb * sub + (torch.arange(plan.num_tokens) - plan.q_offsets[qb]) // block_m
        keep = plan.token_keep
        used = torch.zeros(*keep.shape[:2], plan.num_q_blocks * sub, keep.shape[-1], dtype=torch.bool)
        used.index_reduce_(2, chunk, keep, "amax", include_self=True)
        used = used.view(*keep.shape[:2], plan.num_q_blocks, sub, keep.shape[-1])
    pairs = (used * k_pad[:, :, :, None, :]).sum() * block_m
    forward = float(pairs)
    return {"forward": forward, "dq": forward, "dkdv": forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=sorted(GRIDS), choices=sorted(GRIDS))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernel_work.json"))
    args = parser.parse_args()

    from vdiff_sparse.backends.triton import TritonBackend

    backend = TritonBackend()
    results = []
    for n in args.tokens:
        grid = GRIDS[n]
        for name, plan in plans(grid):
            stats = plan.stats()
            after = backend.work(plan, args.head_dim)
            old = legacy_work(plan)
            entries = max(plan.kv_index.shape[0], 1 if plan.token_keep is None else plan.token_keep.shape[0]) * \
                max(plan.kv_index.shape[1], 1 if plan.token_keep is None else plan.token_keep.shape[1])
            useful = after["forward"]["useful"]
            before = {
                "forward": {"executed": old["forward"], "efficiency": useful / old["forward"]},
                "backward": {"executed": old["dq"] + old["dkdv"],
                             "efficiency": 2 * useful / (old["dq"] + old["dkdv"])},
            }
            row = {"tokens": n, "grid": grid, "method": name, "density": stats["density"],
                   "block_density": stats["block_density"], "plan_entries": entries, "after": after,
                   "before": before}
            results.append(row)
            line = (f"{n:6d} {name:18s} density {stats['density']:.3f} | forward {before['forward']['efficiency']:.3f}"
                    f" -> {after['forward']['efficiency']:.3f} | backward {before['backward']['efficiency']:.3f}"
                    f" -> {after['backward']['efficiency']:.3f}")
            if "union" in after["forward"]:
                line += f" | executed/union fwd {after['forward']['executed_over_union']:.3f}" \
                        f" bwd {after['backward']['executed_over_union']:.3f}"
            print(line, flush=True)
    report = {
        **run_metadata(command_line()),
        "what": "query-key pairs per method: useful (the plan's, pooled keys as pooled rows) vs executed "
                "(every computed tile, masked lanes included), summed over the plan's batch and head entries; "
                "backward = dq + dk/dv passes (useful counted once per pass)",
        "head_dim": args.head_dim,
        "gpu": "Hopper tiles (kernels/tiles.py GPU_TILES[9])",
        "legacy_tiles": {"block_m": LEGACY_TILES[0], "block_n": LEGACY_TILES[1]},
        "results": results,
    }
    print(f"wrote {write_json(args.out, report)}")


if __name__ == "__main__":
    main()
