"""One fine-tuning step, dense vs sparse attention, on the CPU.

A Wan transformer (3 layers, so each of VMoBA's 1D / 2D / 3D partitions appears once; 2 heads
x 64, width 128, random weights) trains on a latent video whose token grid is (8, 32, 32) =
8,192 tokens by default. One step = the fine-tuning pipeline's flow-matching step
(``vdiff_sparse.pipelines.finetune``: ``draw_sample``, ``model_inputs``, ``objective_loss``), its
backward and an AdamW update, as in ``vdiff-sparse finetune``. Dense = the model's own attention (SDPA); sparse = VMoBA with
its training selection (threshold, global, tau = 0.25) on the torch backend, selection
included. Writes the median step times, the speedup and VMoBA's measured density, then
times attention alone per partition (selection and backend separately, on video-like q/k/v)
to show where a step's time goes.

    python bench/train_cpu.py                                   # writes bench/results/train_cpu.json
    python bench/train_cpu.py --repeats 1 --out /tmp/train.json # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from vdiff_sparse.benchmarks.meta import command_line, median_time, run_metadata, write_json

# VMoBA blocks for the default grid: 4 temporal blocks of 2 frames, 16 tiles of 8x8, 64 cubes
# of 2x8x8 (the paper's 8 / 48 / 72 blocks at 55K tokens, scaled to 8K).
VMOBA_BLOCKS = {"block_1d": 2, "block_2d": (8, 8), "block_3d": (2, 8, 8)}


def build(grid, layers: int, heads: int, head_dim: int, method: str, seed: int):
    """The model (with ``method``'s processor, or none for dense) and its processor."""
    from vdiff_sparse.integration import enable
    from vdiff_sparse.pipelines.finetune import SparseConfig, training_processor
    from vdiff_sparse.tiny_models import tiny_wan_transformer

    model = tiny_wan_transformer(seed=seed, num_layers=layers, num_attention_heads=heads,
                                 attention_head_dim=head_dim, ffn_dim=2 * heads * head_dim,
                                 rope_max_seq_len=max(1024, 2 * max(grid))).train()
    processor = None
    if method != "dense":
        options = {"vmoba": dict(VMOBA_BLOCKS)}
        processor = training_processor(SparseConfig(method=method, options=options, backend="torch"))
        enable(model, processor)
    return model, processor


def step_times(model, latents, embeds, repeats: int) -> list[float]:
    from vdiff_sparse.pipelines import finetune as ft
    from vdiff_sparse.pipelines.finetune.models import ModelTask

    config = ft.TrainConfig()
    task = ModelTask("t2v", "transformer", (0.0, 1.0), False, 0.0, tuple(model.config.patch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = {"latents": latents, "prompt_embeds": embeds}
    times = []
    for i in range(repeats + 1):  # the first step warms up allocator and plan caches
        start = time.perf_counter()
        inputs = ft.model_inputs(batch, [ft.draw_sample(i, latents.shape[1:], config, task)], task, 1000, "cpu",
                                 torch.float32)
        loss, _ = ft.objective_loss(ft.predict(model, inputs), inputs, None, config)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[1:]


def attention_breakdown(grid, heads: int, head_dim: int, layers: int, repeats: int) -> list[dict]:
    """Attention alone, forward + backward, per VMoBA partition, on video-like q/k/v
    (``vdiff_sparse.synthetic.video_qkv``): selection time, backend time and densities."""
    from vdiff_sparse.attention import dense_attention, run_plan
    from vdiff_sparse.methods.vmoba import VMoBAConfig, plan_vmoba
    from vdiff_sparse.synthetic import video_qkv

    q, k, v = (x.requires_grad_() for x in video_qkv(grid, heads, head_dim, seed=0))
    config = VMoBAConfig.training(**VMOBA_BLOCKS)

    def timed(fn) -> float:
        return median_time(fn, repeats)

    dense_s = timed(lambda: dense_attention(q, k, v).sum().backward())
    rows = []
    for layer in range(min(layers, 3)):
        plan = plan_vmoba(q, k, grid, config, layer_index=layer)
        select_s = timed(lambda: plan_vmoba(q, k, grid, config, layer_index=layer))
        backend_s = timed(lambda: run_plan(q, k, v, plan, backend="torch").sum().backward())
        rows.append({
            "layer": layer, "partition": plan.info["partition"], "density": plan.density(),
            "block_density": plan.stats()["block_density"], "dense_fwd_bwd_s": dense_s,
            "select_s": select_s, "backend_fwd_bwd_s": backend_s,
        })
        print(f"  attention only, {plan.info['partition']}: density {plan.density():.3f} (query-tile union "
              f"{plan.stats()['block_density']:.3f}), select {select_s:.2f} s + torch backend fwd+bwd "
              f"{backend_s:.2f} s vs dense SDPA fwd+bwd {dense_s:.2f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, nargs=3, default=[8, 32, 32], help="token grid (T, H, W)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_cpu.json"))
    args = parser.parse_args()

    grid = tuple(args.grid)
    n = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(1, 16, grid[0], 2 * grid[1], 2 * grid[2], generator=g)
    embeds = torch.randn(1, 16, 32, generator=g)
    print(f"grid {grid} = {n} tokens, {args.layers} layers, {args.heads} heads x {args.head_dim}, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows = {}
    for method in ("dense", "vmoba"):
        model, processor = build(grid, args.layers, args.heads, args.head_dim, method, args.seed)
        times = step_times(model, latents, embeds, args.repeats)
        row = {"step_s": statistics.median(times), "all_s": times, "tokens_per_s": n / statistics.median(times)}
        if processor is not None:
            records = processor.stats.records
            row["density"] = sum(r.density for r in records) / len(records)
            row["density_per_layer"] = {
                str(i): v["density"] for i, v in processor.stats.summary()["per_layer"].items()
            }
            row["config"] = {k: str(v) for k, v in vars(processor.config).items()}
        rows[method] = row
        print(f"  {method:<6} {row['step_s']:.2f} s/step"
              + (f"  density {row['density']:.3f}" if "density" in row else ""), flush=True)
        del model, processor
    speedup = rows["dense"]["step_s"] / rows["vmoba"]["step_s"]
    print(f"  speedup {speedup:.2f}x", flush=True)
    breakdown = attention_breakdown(grid, args.heads, args.head_dim, args.layers, args.repeats)
    report = {
        "benchmark": "train_cpu",
        **run_metadata(command_line()),
        "shape": {"batch": 1, "grid": grid, "tokens": n, "layers": args.layers, "heads": args.heads,
                  "head_dim": args.head_dim, "dtype": "float32"},
        "timing": f"median of {args.repeats} steps after one warm-up; forward + backward + AdamW, "
                  f"selection included",
        "dense": rows["dense"],
        "vmoba": rows["vmoba"],
        "speedup": speedup,
        "attention_breakdown": breakdown,
    }
    print("wrote", write_json(args.out, report))


if __name__ == "__main__":
    main()
