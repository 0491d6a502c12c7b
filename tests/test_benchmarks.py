"""The benchmark suite: the video-like attention generator, the fidelity sweep and the Wan
end-to-end script (smoke mode on the CPU)."""

from __future__ import annotations

import importlib.metadata
import json
import math

import pytest
import torch

from vdiff_sparse.benchmarks import attention_scripts, fidelity, main, wan_e2e
from vdiff_sparse.benchmarks import fidelity_psa
from vdiff_sparse.methods import method_names
from vdiff_sparse.video_attention_data import (
    HEAD_KINDS,
    MORE_HEAD_KINDS,
    SCENES,
    default_head_profile,
    head_profile,
    patch_features,
    rope_3d,
    video_attention_qkv,
    video_frames,
)

RAGGED_GRIDS = [(3, 5, 7), (2, 9, 11), (1, 6, 10)]


def _coords(grid):
    axes = torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij")
    return torch.stack(axes, -1).reshape(-1, 3)


def _attention_probs(q, k, head):
    logits = q[0, :, head].double() @ k[0, :, head].double().T / math.sqrt(q.shape[-1])
    return logits.softmax(-1)


# --- generator -----------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", RAGGED_GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_generator_is_deterministic_and_seed_dependent(grid, seed):
    seed %= 1000
    a = video_attention_qkv(grid, 3, 10, batch=2, seed=seed)
    b = video_attention_qkv(grid, 3, 10, batch=2, seed=seed)
    c = video_attention_qkv(grid, 3, 10, batch=2, seed=seed + 1)
    n = grid[0] * grid[1] * grid[2]
    for x, y, z in zip(a, b, c):
        assert x.shape == (2, n, 3, 10) and x.dtype == torch.float32
        assert torch.equal(x, y)
        assert not torch.allclose(x, z)
        assert torch.isfinite(x).all()
    # The two videos of a batch differ.
    assert not torch.allclose(a[2][0], a[2][1])


def test_generator_dtype_device_and_default_heads():
    q, k, v = video_attention_qkv((2, 4, 6), 5, 12, dtype=torch.float64)
    assert q.dtype == k.dtype == v.dtype == torch.float64
    locality, content, kinds = default_head_profile(5)
    assert kinds == [*HEAD_KINDS, "global"] and len(locality) == len(content) == 5


@pytest.mark.parametrize("scene", list(SCENES))
def test_every_scene_is_deterministic_and_its_own(scene, seed):
    grid = (3, 6, 8)
    a = video_frames(grid, seed=seed % 1000, scene=scene)
    assert torch.equal(a, video_frames(grid, seed=seed % 1000, scene=scene))
    others = [video_frames(grid, seed=seed % 1000, scene=s) for s in SCENES if s != scene]
    assert all(not torch.allclose(a, o) for o in others)
    assert torch.isfinite(a).all() and a.shape == (1, 3, 8, 12, 16)


def _neighbour_similarity(scene, seed):
    """Cosine similarity of horizontally adjacent token features."""
    grid = (3, 16, 20)
    f = torch.nn.functional.normalize(patch_features(video_frames(grid, seed=seed, scene=scene))[0], dim=-1)
    f = f.view(3, 16, 20, -1)
    return (f[:, :, 1:] * f[:, :, :-1]).sum(-1)


def test_textured_and_cellular_scenes_have_unlike_neighbours(seed):
    """The point of the sharp, textured scenes: adjacent tokens differ far more often than in
    the smooth one (pooling adjacent keys averages unlike things there)."""
    seed %= 1000
    smooth, texture, cellular = (_neighbour_similarity(s, seed) for s in ("smooth", "texture", "cellular"))
    assert float(smooth.mean()) > float(texture.mean()) + 0.15
    # Cells: flat inside (many identical neighbours), sharp edges (many unlike ones).
    unlike = {name: float((c < 0.3).float().mean()) for name, c in (("smooth", smooth), ("cellular", cellular))}
    assert unlike["cellular"] > 1.5 * unlike["smooth"], unlike
    assert float((cellular > 0.95).float().mean()) > 0.2


def test_head_profile_and_scene_errors():
    locality, content = head_profile(["global", "very_local", "sharp_global"])
    assert locality[1] == MORE_HEAD_KINDS["very_local"][0] and content[2] == MORE_HEAD_KINDS["sharp_global"][1]
    assert locality[0] == HEAD_KINDS["global"][0]
    with pytest.raises(ValueError, match=r"head kind must be one of .*got 'nope'"):
        head_profile(["nope"])
    with pytest.raises(ValueError, match=r"scene must be one of \['smooth', 'mixed', 'cellular', 'texture'\], got 'foam'"):
        video_attention_qkv((2, 4, 4), 1, 8, scene="foam")


def test_nearby_tokens_are_more_similar_than_far_ones(seed):
    grid = (4, 12, 16)
    features = patch_features(video_frames(grid, seed=seed % 1000))[0]
    f = torch.nn.functional.normalize(features, dim=-1)
    sim = f @ f.T
    c = _coords(grid)
    cheb = (c[:, None] - c[None]).abs().amax(-1)
    near, mid, far = (sim[cheb == d].mean().item() for d in (1, 3, 8))
    assert near > mid + 0.1 > far + 0.1, (near, mid, far)


def test_video_moves_between_frames(seed):
    frames = video_frames((5, 8, 8), seed=seed % 1000)[0]
    steps = [(frames[t + 1] - frames[t]).norm() / frames[t].norm() for t in range(4)]
    assert all(s > 0.05 for s in steps), steps
    # Consecutive frames are closer than the first and the last.
    assert (frames[1] - frames[0]).norm() < (frames[4] - frames[0]).norm()


def test_heads_differ_in_locality():
    grid = (4, 10, 12)
    q, k, _ = video_attention_qkv(grid, 4, 64, seed=3)
    c = _coords(grid)
    dist = (c[:, None] - c[None]).abs()
    near = dist.amax(-1) <= 1
    same_place = dist[..., 1:].amax(-1) == 0
    mass = {}
    for head, kind in enumerate(HEAD_KINDS):
        p = _attention_probs(q, k, head)
        mass[kind] = ((p * near).sum(-1).mean().item(), (p * same_place).sum(-1).mean().item())
    # Strongly local > mid > global in the 3x3x3 neighbourhood.
    assert mass["local"][0] > mass["mid"][0] + 0.15 > mass["global"][0] + 0.15, mass
    # The temporal head looks at its own (h, w) place in other frames more than any other head.
    assert mass["temporal"][1] > 1.5 * max(mass[k][1] for k in ("global", "mid")), mass


def test_rope_3d_is_relative_and_norm_preserving(seed):
    grid = (4, 5, 6)
    g = torch.Generator().manual_seed(seed)
    base_q, base_k = torch.randn(2, 1, 1, 1, 12, generator=g)
    n = math.prod(grid)
    q = rope_3d(base_q.expand(1, n, 1, 12), grid)
    k = rope_3d(base_k.expand(1, n, 1, 12), grid)
    assert torch.allclose(q.norm(dim=-1), base_q.norm().expand(1, n, 1), atol=1e-5)
    index = {tuple(x): i for i, x in enumerate(_coords(grid).tolist())}
    dots = [(q[0, index[a], 0] @ k[0, index[b], 0]).item()
            for a, b in (((0, 0, 0), (1, 2, 3)), ((2, 2, 1), (3, 4, 4)))]
    assert dots[0] == pytest.approx(dots[1], abs=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(head_dim=7), "head_dim"),
        (dict(heads=0), "heads"),
        (dict(locality=[1.0, 2.0]), "locality"),
        (dict(locality=[(1.0, 1.0), 0, 0]), "locality"),
        (dict(content=[1.0, -1.0, 1.0]), "content"),
        (dict(grid=(0, 4, 4)), "grid"),
    ],
    ids=["odd-head-dim", "no-heads", "locality-count", "locality-triple", "negative-content", "bad-grid"],
)
def test_generator_rejects_bad_arguments(kwargs, match):
    args = dict(grid=(2, 4, 4), heads=3, head_dim=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        video_attention_qkv(args.pop("grid"), **args)


# --- fidelity sweep ------------------------------------------------------------------------------
def test_interpolate_is_linear_in_log_density():
    points = [{"density": 0.1, "block_density": 0.2, "rel_l2": 0.4},
              {"density": 0.4, "block_density": 0.8, "rel_l2": 0.2},
              {"density": 1.0, "block_density": 1.0, "rel_l2": 0.0}]
    assert fidelity.interpolate(points, 0.2) == pytest.approx(0.3)
    assert fidelity.interpolate(points, 0.4) == pytest.approx(0.2)
    assert fidelity.interpolate(points, 0.05) is None
    assert fidelity.interpolate(points, 0.4, x="block_density") == pytest.approx(0.3)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity") / "fidelity.json"
    report = fidelity.run(fidelity.build_parser().parse_args(
        ["--grid", "2", "8", "12", "--heads", "2", "--head-dim", "16", "--vmoba-cube", "1", "4", "4",
         "--psa-block", "16", "--scenes", "smooth", "texture", "--budget-densities", "0.25", "0.5", "--no-e2e", "--no-replan",
         "--out", str(out)]))
    return out, report


def test_sweep_writes_json_and_png_with_metadata(tiny_sweep):
    out, report = tiny_sweep
    saved = json.loads(out.read_text())
    for key in ("date", "command", "machine", "versions", "git_commit", "problem", "curves", "summary"):
        assert key in saved
    assert saved["versions"]["torch"] == importlib.metadata.version("torch")
    assert saved["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert saved["problem"]["tokens"] == 2 * 8 * 12
    assert {c["family"] for c in saved["curves"]} == {"gna", "psa", "vmoba"}
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert out.with_name("fidelity_block_density.png").stat().st_size > 10_000
    assert out.with_name("fidelity_psa_budget.png").stat().st_size > 10_000
    assert saved["problem"]["scenes"] == ["smooth", "texture"] and saved["problem"]["seed"] == fidelity.DEFAULT_SEED
    assert saved["problem"]["head_kinds"] == list(fidelity.BENCH_HEADS[:2])
    for key in ("best_per_family", "best_per_family_by_block_density"):
        assert set(saved["summary"][key]) == {"gna", "psa", "vmoba"}


def test_sweep_errors_are_sensible(tiny_sweep):
    _, report = tiny_sweep
    for curve in report["curves"]:
        pts = sorted(curve["points"], key=lambda p: p["density"])
        name = f"{curve['family']}: {curve['name']}"
        for p in pts:
            assert 0 < p["density"] <= 1 + 1e-9, name
            assert 0 <= p["rel_l2"] < 1.5 and -1 <= p["cosine"] <= 1 + 1e-9, name
            assert len(p["rel_l2_per_head"]) == 2 and len(p["rel_l2_per_scene"]) == 2
            assert [len(row) for row in p["rel_l2_per_scene_head"]] == [2, 2]
            if p["density"] >= 1 - 1e-9:
                assert p["rel_l2"] < 1e-5 and p["cosine"] > 1 - 1e-9, (name, p)
        # Monotone-ish: more density never costs much more error, and the densest point of a
        # curve beats its sparsest.
        for a, b in zip(pts, pts[1:]):
            assert b["rel_l2"] <= a["rel_l2"] * 1.3 + 1e-6, (name, a, b)
        if pts[-1]["density"] > pts[0]["density"] + 1e-6:
            assert pts[-1]["rel_l2"] < pts[0]["rel_l2"], name


def test_psa_pairs_are_at_equal_density(tiny_sweep):
    _, report = tiny_sweep
    assert report["psa_pairs"], "no multi-level PSA point below density 1"
    for pair in report["psa_pairs"]:
        ml, binary = pair["multi_level"], pair["binary"]
        # Binary keeps whole blocks (ceil of the target's count per row): one block of slack.
        assert abs(binary["density"] - ml["density"]) <= 16 / 192 + 1e-9, pair
        assert pair["matched"] == (abs(binary["density"] - ml["density"]) <= 0.02 * ml["density"])
        assert pair["multi_level_better"] == (ml["rel_l2"] < binary["rel_l2"])
        assert not pair["variant"].startswith("budget")
    summary = report["summary"]["psa_multi_vs_binary"]
    assert summary["pairs"] == len(report["psa_pairs"])
    assert summary["pairs_matched"] == sum(p["matched"] for p in report["psa_pairs"])
    assert summary["multi_level_wins"] == sum(p["matched"] and p["multi_level_better"] for p in report["psa_pairs"])


def test_budget_cases_are_per_scene_density_head_and_matched(tiny_sweep):
    _, report = tiny_sweep
    cases = report["psa_budget"]["cases"]
    assert len(cases) == 2 * 2 * 2  # scenes x densities x heads
    assert {(c["scene"], c["head"], c["target_density"]) for c in cases} == {
        (s, h, d) for s in ("smooth", "texture") for h in fidelity.BENCH_HEADS[:2] for d in (0.25, 0.5)}
    for c in cases:
        d_b = c["binary"]["density"]
        for name in ("budget", "split"):
            assert c[f"{name}_matched"] == (abs(c[name]["density"] - d_b) <= 0.02 * d_b)
            assert c[f"{name}_over_binary"] == pytest.approx(c[name]["rel_l2"] / c["binary"]["rel_l2"])
    tally = report["psa_budget"]["summary"]["all"]
    counted = [c["budget_over_binary"] for c in cases if c["budget_matched"]]
    assert tally["budget_vs_binary_counted"] == len(counted)
    assert tally["budget_worse_than_binary_by_over_3pct"] == sum(r > 1.03 for r in counted)
    assert tally["budget_better_than_binary_by_2pct"] == sum(r <= 0.98 for r in counted)
    assert set(report["psa_budget"]["summary"]["per_scene"]) == {"smooth", "texture"}


def test_match_searches_from_below():
    calls = []

    def make(knob):
        calls.append(knob)
        return knob

    def density(knob):  # steps of 0.1: only multiples are reachable
        return math.ceil(knob * 10 - 1e-9) / 10

    knob, result = fidelity_psa._match(make, density, 0.3, 0.3, 6)
    assert density(result) == pytest.approx(0.3) and knob <= 0.3 + 1e-12
    knob, result = fidelity_psa._match(make, density, 0.25, 0.25, 6)
    assert density(result) <= 0.25  # 0.2: the largest reachable at most the target


def test_tiny_model_e2e_compares_binary_and_budget_at_matched_density():
    rows = fidelity_psa.tiny_model_e2e((0.4,), (0,), size={"num_frames": 5, "height": 32, "width": 48,
                                                          "num_inference_steps": 2})
    (row,) = rows
    assert row["grid"] == [3, 8, 12] and row["seed"] == 0
    for name in ("binary", "budget"):
        assert row[name]["ssim"] <= 1 and 0 < row[name]["flop_density_sparse_calls"] <= 1
    d_b = row["binary"]["flop_density_sparse_calls"]
    assert row["matched"] == (abs(row["budget"]["flop_density_sparse_calls"] - d_b) <= 0.02 * d_b)


def test_replan_e2e_selects_on_every_kth_sparse_step():
    from vdiff_sparse.benchmarks.fidelity_replan import replan_e2e

    result = replan_e2e((0,), replan_every=(1, 2), steps=5, size={"num_frames": 5, "height": 32, "width": 48})
    assert result["steps"] == 5 and len(result["runs"]) == 4
    for run in result["runs"]:
        # every k-th sparse step selects, the first one always
        assert run["selections"] == -(-run["sparse_steps"] // run["replan_every"]) and run["sparse_steps"] >= 3
        assert 0 < run["ssim"] <= 1 and 0 < run["density"] < 1
        if run["replan_every"] == 1:
            assert run["psnr_drop_db"] == 0
    assert set(result["summary"]) == {"psa", "vmoba"} and set(result["summary"]["psa"]) == {1, 2}


def test_bench_dispatch_runs_one_family(tmp_path):
    out = tmp_path / "gna.json"
    assert main(["fidelity", "--grid", "2", "6", "8", "--heads", "1", "--head-dim", "8",
                 "--families", "gna", "--no-plot", "--no-e2e", "--no-replan", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert {c["family"] for c in saved["curves"]} == {"gna"}
    assert saved["summary"]["best_per_family"]["vmoba"] == {str(d): None for d in fidelity.MATCHED_DENSITIES}
    assert saved["psa_budget"]["cases"] == []
    assert not list(tmp_path.glob("*.png"))


def test_attention_scripts_exist_in_the_checkout():
    scripts = attention_scripts(gpu=True)
    assert [s.name for s in scripts] == ["attention_cpu.py", "attention_gpu.py"]
    assert all(s.exists() for s in scripts)
    assert [s.name for s in attention_scripts(gpu=False)] == ["attention_cpu.py"]


# --- Wan end-to-end ------------------------------------------------------------------------------
def test_wan_config_is_the_1_3b_architecture():
    config = wan_e2e.model_config(smoke=False)
    assert (config["num_layers"], config["num_attention_heads"], config["attention_head_dim"]) == (30, 12, 128)
    assert (config["ffn_dim"], config["text_dim"]) == (8960, 4096)
    assert (config["in_channels"], config["out_channels"], config["patch_size"]) == (16, 16, (1, 2, 2))
    grid = [n // p for n, p in zip(wan_e2e.LATENT_480P, config["patch_size"])]
    assert math.prod(grid) == 32760


def test_wan_e2e_smoke_runs(tmp_path):
    out = tmp_path / "smoke.json"
    assert wan_e2e.main(["--smoke", "--steps", "1", "--warmup", "0", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["problem"]["smoke"] and saved["problem"]["config"]["num_layers"] == 2
    assert "command" in saved and "machine" in saved and saved["versions"]["diffusers"]
    rows = {r["method"]: r for r in saved["results"]}
    assert set(rows) == set(method_names())
    assert rows["dense"]["speedup_vs_dense"] == 1.0
    for method in ("gna", "psa", "vmoba"):
        # The smoke settings keep every method on its sparse path.
        assert 0 < rows[method]["density"] < 1, (method, rows[method])
        assert rows[method]["median_step_s"] > 0 and rows[method]["projected_generation_s"] > 0
    assert rows["psa"]["preset_dense_warmup_steps"] == 15  # the released 15 of 50 steps


@pytest.mark.slow
def test_wan_e2e_smoke_compiled(tmp_path):
    """``--compile``: each method eager, then compiled; the compiled rows have their own dense."""
    out = tmp_path / "smoke.json"
    assert wan_e2e.main(["--smoke", "--steps", "1", "--warmup", "1", "--methods", "dense", "gna", "--compile",
                         "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["method"], r["compiled"]) for r in rows] == [("dense", False), ("gna", False), ("dense", True),
                                                           ("gna", True)]
    assert rows[2]["speedup_vs_dense"] == 1.0 and 0 < rows[3]["density"] < 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_wan_e2e_without_gpu_says_so(capsys):
    assert wan_e2e.main([]) == 2
    assert "--smoke" in capsys.readouterr().out


def test_train_cpu_script_runs_small(tmp_path):
    """bench/train_cpu.py on a tiny grid (it is not imported by the package, so only running it
    shows that it still fits the fine-tuning API)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "train_cpu.py"
    out = tmp_path / "train.json"
    subprocess.run([sys.executable, str(script), "--grid", "2", "8", "8", "--layers", "1", "--repeats", "1",
                    "--out", str(out)], check=True, capture_output=True, text=True)
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "train_cpu" and saved["shape"]["tokens"] == 128
    assert saved["speedup"] > 0 and "machine" in saved


@pytest.mark.slow
def test_planning_script_times_every_mode_and_part(tmp_path):
    """bench/psa_planning.py, one repeat at 8K tokens: every mode and part timed, the
    importance's dtype recorded as resolved."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "psa_planning.py"
    out = tmp_path / "planning.json"
    done = subprocess.run([sys.executable, str(script), "--tokens", "8192", "--blocks", "128", "--repeats", "1",
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    saved = json.loads(out.read_text())
    assert saved["shape"]["importance_dtype"] in ("bfloat16", "float32")
    (row,) = saved["results"]
    assert all(row[mode]["wall_s"] > 0 for mode in ("quantile", "threshold", "budget"))
    assert set(row["parts_wall_s"]) == {"importance_estimate", "budget_estimate", "importance_estimate_eager",
                                        "budget_estimate_eager", "quantile_allocation", "budget_allocation",
                                        "budget_sort", "budget_sort_torch"}


@pytest.mark.slow
def test_planning_history_script_runs_old_and_new_code(tmp_path):
    """bench/psa_planning_history.py against HEAD's package, extracted (a smoke test: no older
    API is exercised): both workers plan, the old one from the extracted copy (its worker
    asserts where it imported plan_psa from)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "psa_planning_history.py"
    out = tmp_path / "history.json"
    done = subprocess.run([sys.executable, str(script), "--baseline", "HEAD", "--tokens", "8192", "--blocks", "128",
                           "--rounds", "1", "--repeats", "1", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    (row,) = json.loads(out.read_text())["results"]
    assert set(row["wall_s"]) == {"baseline:quantile", "baseline:threshold", "now:quantile", "now:threshold",
                                  "now:budget"}
    assert all(t > 0 for t in row["wall_s"].values()) and row["over_baseline_quantile"]["baseline:quantile"] == 1


def test_every_result_file_names_a_clean_commit():
    """A committed result was made from committed code: its ``git_commit`` is a commit of this
    repository, not a modified tree (``-dirty``) or none."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "bench" / "results").rglob("*.json"))
    assert files
    for path in files:
        commit = json.loads(path.read_text()).get("git_commit")
        assert commit and re.fullmatch(r"[0-9a-f]{40}", commit), f"{path.name}: git_commit {commit!r}"
        known = subprocess.run(["git", "-C", str(root), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
        if known.returncode != 0 and (root / ".git").exists() and not (root / ".git" / "shallow").exists():
            raise AssertionError(f"{path.name}: {commit} is not a commit of this repository")
