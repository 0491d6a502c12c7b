"""Sparse processors under diffusers' context parallelism (Ulysses) on 2 CPU processes (gloo), and
their dense parts through diffusers' attention dispatcher with the backend set on the model.

diffusers 0.42's ``enable_parallelism`` cannot run without an accelerator (it divides by
``torch.accelerator.device_count()``); :func:`vdiff_sparse.parallel.enable_context_parallel` runs
its remaining steps on a CPU mesh (config set-up, the processors' ``_parallel_config``, the model's
``_cp_plan`` hooks), the same path ``enable_parallelism`` takes after that line."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vdiff_sparse.processors as P
from vdiff_sparse import integration
from vdiff_sparse.tiny_models import tiny_inputs, tiny_ltx_transformer, tiny_wan_transformer

# Grids whose token counts split over 2 ranks; 2 heads, one per rank.
CASES = {"wan": ((2, 4, 6), tiny_wan_transformer), "ltx": ((2, 4, 4), tiny_ltx_transformer)}


def processors():
    return {
        "dense": lambda: P.DenseProcessor(),
        "gna": lambda: P.GNAProcessor(window=(2, 3, 3), stride=1, stats=True),
        "psa": lambda: P.PSAProcessor(mode="quantile", fractions={1: 0.4, 2: 0.3}, block_q=8, block_k=8,
                                      dense_steps=0, stats=True),
        "vmoba": lambda: P.VMoBAProcessor(topk=2, block_1d=1, block_2d=(2, 2), block_3d=(1, 2, 2), query_block=8,
                                          stats=True),
        # a dense warm-up step: the dense path under context parallelism
        "gna_warmup": lambda: P.GNAProcessor(window=(2, 3, 3), stride=1, dense_steps=1, stats=True),
    }


def _worker(rank: int, world: int, init: str, family: str, errors) -> None:
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        from vdiff_sparse.parallel import enable_context_parallel

        grid, build = CASES[family]
        results = {}
        for name, make in processors().items():
            model = build(seed=0)
            inputs = tiny_inputs(family, grid, seed=1, model=model)
            if family == "ltx":
                # diffusers 0.42's LTX cross-attention under context parallelism all-gathers a text
                # mask as if the text were split, and fails with its own processors too.
                inputs["encoder_attention_mask"] = None
            proc = make()
            integration.enable(model, proc)
            with torch.no_grad():
                single = model(**inputs, return_dict=False)[0]
            enable_context_parallel(model, 2)
            with torch.no_grad():
                parallel = model(**inputs, return_dict=False)[0]
            integration.disable(model)
            err = ((parallel - single).abs().max() / single.abs().max()).item()
            sparse_calls = [r for r in proc.stats.records if r.method != "dense"] if proc.stats.enabled else []
            results[name] = (err, len(sparse_calls))
        for name, (err, calls) in results.items():
            assert err <= 1e-5, f"rank {rank} {family} {name}: relative error {err:.3g}"
            if name not in ("dense", "gna_warmup"):
                assert calls >= 2, f"{family} {name}: the sparse path did not run ({calls} calls)"
        dist.barrier()
    except BaseException:  # reported to the test in the parent process
        errors.put(f"rank {rank}: {traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(CASES))
def test_ulysses_degree_2_equals_one_process(family, tmp_path):
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_worker, args=(2, init, family, errors), nprocs=2, start_method="spawn")
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, "\n".join(found)


TP_FAMILIES = {
    # (builder, grid, {module glob: sharding}); per-head q/k norms, so heads can be split
    "cogvideox": ("tiny_cogvideox_transformer", (2, 4, 6), "transformer_blocks",
                  {"attn1.to_q": "col", "attn1.to_k": "col", "attn1.to_v": "col", "attn1.to_out.0": "row"}),
    # the double-stream blocks sharded, the single-stream ones left whole: both run the processor
    "hunyuan_video": ("tiny_hunyuan_video_transformer", (2, 4, 6), "transformer_blocks",
                      {"attn.to_q": "col", "attn.to_k": "col", "attn.to_v": "col", "attn.add_q_proj": "col",
                       "attn.add_k_proj": "col", "attn.add_v_proj": "col", "attn.to_out.0": "row",
                       "attn.to_add_out": "row"}),
}


def _shard(model, blocks: str, plan: dict, mesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {name: ColwiseParallel() if how == "col" else RowwiseParallel() for name, how in plan.items()}
    for block in getattr(model, blocks):
        parallelize_module(block, mesh, styles)


def _tp_worker(rank: int, world: int, init: str, family: str, errors) -> None:
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        import vdiff_sparse.tiny_models as tm

        mesh = dist.device_mesh.init_device_mesh("cpu", (world,))
        if family == "wan":
            model = tm.tiny_wan_transformer(seed=0)
            inputs = tiny_inputs("wan", (2, 4, 6), seed=1, model=model)
            _shard(model, "blocks", {"attn1.to_q": "col", "attn1.to_k": "col", "attn1.to_v": "col",
                                     "attn1.to_out.0": "row"}, mesh)
            integration.enable(model, P.GNAProcessor(window=(2, 3, 3), stride=1))
            try:
                with torch.no_grad():
                    model(**inputs, return_dict=False)
            except NotImplementedError as err:
                assert "RMSNorm spans all heads" in str(err) and "context parallelism" in str(err), str(err)
            else:
                raise AssertionError("tensor-parallel Wan was not refused")
            return
        builder, grid, blocks, plan = TP_FAMILIES[family]
        for name, make in processors().items():
            model = getattr(tm, builder)(seed=0)
            inputs = tiny_inputs(family, grid, seed=1, model=model)
            proc = make()
            integration.enable(model, proc)
            with torch.no_grad():
                single = model(**inputs).sample
            _shard(model, blocks, plan, mesh)
            with torch.no_grad():
                parallel = model(**inputs).sample
            integration.disable(model)
            err = ((parallel - single).abs().max() / single.abs().max()).item()
            assert err <= 1e-5, f"rank {rank} {family} {name}: relative error {err:.3g}"
        dist.barrier()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("family", [*sorted(TP_FAMILIES), "wan"])
def test_tensor_parallel_degree_2_equals_one_process(family, tmp_path):
    """Each rank holds half the heads (q/k/v column-sharded, the output projection row-sharded by
    torch's ``parallelize_module``): the processors work on whatever heads they are given.
    Wan, whose q/k RMSNorm spans all heads, is refused."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    mp.start_processes(_tp_worker, args=(2, f"file://{tmp_path / 'rdzv'}", family, errors), nprocs=2,
                       start_method="spawn")
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, "\n".join(found)


def _refusal_worker(rank: int, world: int, init: str, errors) -> None:
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        from diffusers import ContextParallelConfig
        from diffusers.models._modeling_parallel import ParallelConfig

        model = tiny_wan_transformer(seed=0)
        inputs = tiny_inputs("wan", (2, 4, 6), seed=1, model=model)
        integration.enable(model, P.GNAProcessor(window=(2, 3, 3), stride=1))
        cp = ContextParallelConfig(ring_degree=2)
        config = ParallelConfig(context_parallel_config=cp)
        mesh = dist.device_mesh.init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
        config.setup(rank, world, torch.device("cpu"), mesh=mesh)
        for module in model.modules():
            if hasattr(getattr(module, "processor", None), "_parallel_config"):
                module.processor._parallel_config = config
        try:
            with torch.no_grad():
                model(**inputs, return_dict=False)
        except NotImplementedError as err:
            assert "ring_degree=2 is not supported" in str(err) and "Ulysses" in str(err), str(err)
        else:
            raise AssertionError("ring attention was not refused")
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ring_attention_is_refused_naming_ulysses(tmp_path):
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    mp.start_processes(_refusal_worker, args=(2, f"file://{tmp_path / 'rdzv'}", errors), nprocs=2,
                       start_method="spawn")
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, "\n".join(found)


def test_heads_not_divisible_by_the_degree_are_refused():
    from diffusers import ContextParallelConfig

    from vdiff_sparse.parallel import check_ulysses

    with pytest.raises(ValueError, match=r"3 attention heads cannot be split over ulysses_degree=2 ranks"):
        check_ulysses(ContextParallelConfig(ulysses_degree=2), 3, "layer blocks.0.attn1")


def test_context_parallel_needs_distributed_and_a_cp_plan():
    from vdiff_sparse.parallel import enable_context_parallel
    from vdiff_sparse.tiny_models import tiny_cogvideox_transformer

    with pytest.raises(RuntimeError, match="torch.distributed must be initialised"):
        enable_context_parallel(tiny_wan_transformer(seed=0), 2)


# --- dense parts through diffusers' dispatcher ----------------------------------------------------
@pytest.fixture
def recording_backend(monkeypatch):
    """diffusers' ``_native_math`` backend, recording each call's query shape."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    name = AttentionBackendName("_native_math")
    original = _AttentionBackendRegistry._backends[name]
    calls = []

    def recorded(**kwargs):
        calls.append(tuple(kwargs["query"].shape))
        return original(**kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, name, recorded)
    yield calls
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName("native"))


@pytest.mark.parametrize("order", ["backend_then_enable", "enable_then_backend"])
def test_dense_parts_use_the_backend_set_on_the_model(recording_backend, order):
    model = tiny_wan_transformer(seed=0)  # 2 layers: attn1 video self-attention, attn2 cross-attention
    inputs = tiny_inputs("wan", (2, 4, 6), seed=1, model=model)
    with torch.no_grad():
        reference = model(**inputs, return_dict=False)[0]
    proc = P.GNAProcessor(window=(2, 3, 3), stride=1, dense_layers=[1])
    if order == "backend_then_enable":
        model.set_attention_backend("_native_math")
        integration.enable(model, proc)
    else:
        integration.enable(model, proc)
        model.set_attention_backend("_native_math")
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    integration.disable(model)
    n = 2 * 4 * 6
    # the dense layer's video attention (48 queries) and both layers' cross-attention
    assert recording_backend.count((1, n, 2, 32)) == 3, recording_backend
    assert torch.isfinite(out).all() and not torch.allclose(out, reference)


def test_dense_processor_and_text_queries_go_through_the_dispatcher(recording_backend):
    from vdiff_sparse.tiny_models import tiny_cogvideox_transformer

    model = tiny_cogvideox_transformer(seed=0)  # joint text + video attention
    inputs = tiny_inputs("cogvideox", (2, 4, 6), seed=1, model=model)
    with torch.no_grad():
        reference = model(**inputs).sample
    model.set_attention_backend("_native_math")
    integration.enable(model, P.DenseProcessor())
    with torch.no_grad():
        out = model(**inputs).sample
    integration.disable(model)
    assert (out - reference).abs().max() <= 1e-5
    video_queries = [c for c in recording_backend if c[1] == 48]
    text_queries = [c for c in recording_backend if c[1] != 48]
    assert video_queries and text_queries, recording_backend


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers' and flash kernels need a CUDA GPU")
@pytest.mark.parametrize("backend", ["xformers", "flash"])
def test_gpu_dense_backends(backend):
    model = tiny_wan_transformer(seed=0).cuda().half()
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in tiny_inputs("wan", (2, 8, 8), seed=1).items()}
    inputs = {k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    if backend == "xformers":
        pytest.importorskip("xformers", reason="xformers is not installed")
        model.enable_xformers_memory_efficient_attention()
    else:
        model.set_attention_backend("flash")
    integration.enable(model, P.GNAProcessor(window=(2, 3, 3), stride=1, dense_layers=[1]))
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    integration.disable(model)
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_cli_generates_the_same_video_with_context_parallel_2(tmp_path):
    """``torchrun --nproc_per_node 2 -m vdiff_sparse generate --context-parallel 2`` on the tiny
    model writes the video one process writes, and the report names the layout."""
    import json

    import imageio.v2 as imageio
    import numpy as np

    args = ["generate", "--attn", "gna", "--frames", "5", "--height", "64", "--width", "64", "--steps", "2",
            "--no-warmup", "--seed", "3", "window=[2,4,4]", "stride=[1,2,2]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "vdiff_sparse", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "vdiff_sparse", *args, "--context-parallel", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "context parallel (Ulysses) over 2 processes" in two.stdout

    def frames(folder):
        with imageio.get_reader(folder / "gna.mp4") as reader:  # its len() is inf: iterate the data
            return np.stack(list(reader.iter_data()))

    assert np.array_equal(frames(tmp_path / "one"), frames(tmp_path / "two"))
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["parallel"] == {"context_parallel": 2, "mode": "ulysses", "processes": 2}
    assert "context parallel (ulysses) over 2 processes" in (tmp_path / "two" / "report.md").read_text()


def test_cli_refuses_a_degree_without_its_processes(tmp_path, capsys):
    from vdiff_sparse.cli import main

    assert main(["generate", "--context-parallel", "2", "--out", str(tmp_path)]) == 2
    assert "needs 2 processes: run torchrun --nproc_per_node 2" in capsys.readouterr().err
