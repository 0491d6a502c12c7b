"""PSA planning time now against PSA's planning time at an earlier commit, side by side.

``bench/psa_planning.py`` compares the modes of one checkout. This script answers a different
question: is PSA's planning, in any mode, slower than it was before a change (by default the
commit before budget mode, ``f48841a``, when the issue that asked for it was filed)? It
extracts that commit's package (``git archive``) into a temporary folder and runs two worker
processes, one importing the old code and one this checkout, on the same ``video_attention_qkv``
inputs (saved once as plain tensors). They take turns, a few calls each per round, so a shared
machine's load hits both alike; only one works at a time. Reported per block size: the median
``plan_psa`` wall time of every (code, mode), and ratios to the old quantile mode.

    python bench/psa_planning_history.py                 # writes bench/results/psa_planning_history_cpu.json
    python bench/psa_planning_history.py --baseline f48841a --tokens 8192 --rounds 3 --out /tmp/h.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from vdiff_sparse.benchmarks.meta import command_line, run_metadata, write_json

ROOT = Path(__file__).resolve().parents[1]
GRIDS = {8192: (8, 32, 32), 16384: (16, 32, 32), 32768: (32, 32, 32)}
MODES = {
    "quantile": dict(mode="quantile", fractions={1: 0.125}),
    "threshold": {},
    "budget": dict(mode="budget", density=0.125),
}

# One worker: imports vdiff_sparse from the folder it is given (with ``isolate``, never the
# editable install of this checkout), warms every (block, mode) up, then per line "go" on stdin times each of them
# `repeats` times and prints their wall seconds as one JSON line.
WORKER = r"""
import json, sys, time
root, inputs, modes, blocks, repeats, isolate = sys.argv[1:3] + [json.loads(a) for a in sys.argv[3:]]
if isolate:  # the extracted copy, not this checkout's editable install
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path.insert(0, root)
import torch
from vdiff_sparse.methods.psa import PSAConfig, plan_psa
import vdiff_sparse.methods.psa as psa_module
assert psa_module.__file__.startswith(root), psa_module.__file__
saved = torch.load(inputs, weights_only=True)
q, k, grid = saved["q"], saved["k"], tuple(saved["grid"].tolist())
def options(o):
    return {key: ({int(p): f for p, f in v.items()} if key == "fractions" else v) for key, v in o.items()}
configs = {(b, m): PSAConfig(block_q=b, block_k=b, **options(o)) for b in blocks for m, o in modes.items()}
for c in configs.values():
    plan_psa(q, k, grid, c)
print("ready", flush=True)
for line in sys.stdin:
    times = {}
    for (b, m), c in configs.items():
        t = []
        for _ in range(repeats):
            start = time.perf_counter()
            plan_psa(q, k, grid, c)
            t.append(time.perf_counter() - start)
        times[f"{b}/{m}"] = t
    print(json.dumps(times), flush=True)
"""


def extract(commit: str, into: Path) -> Path:
    """The package of ``commit`` laid out as installed (``kernels``, ``pipelines`` and
    ``configs`` inside ``vdiff_sparse``, as ``pyproject.toml``'s package-dir maps them)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "vdiff_sparse", "kernels", "pipelines",
                              "configs"], capture_output=True, check=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    for name in ("kernels", "pipelines", "configs"):
        if (into / name).exists():
            shutil.move(str(into / name), str(into / "vdiff_sparse" / name))
    return into


def start_worker(root: Path, inputs: Path, modes: dict, blocks: list[int], repeats: int,
                 isolate: bool) -> subprocess.Popen:
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(root), str(inputs), json.dumps(modes), json.dumps(blocks), str(repeats),
         json.dumps(isolate)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)
    if worker.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the worker for {root} did not start")
    return worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="f48841a", help="the earlier commit (default: before budget mode)")
    parser.add_argument("--tokens", type=int, default=16384, choices=sorted(GRIDS))
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=3, help="calls per (block, mode) per round")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "psa_planning_history_cpu.json"))
    args = parser.parse_args()
    baseline = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.baseline], capture_output=True, text=True,
                              check=True).stdout.strip()
    from vdiff_sparse.methods.psa import PSAConfig
    from vdiff_sparse.methods.psa_importance import importance_matmul_dtype
    from vdiff_sparse.video_attention_data import video_attention_qkv

    grid = GRIDS[args.tokens]
    q, k, _ = video_attention_qkv(grid, heads=4, head_dim=64)
    old_modes = {m: o for m, o in MODES.items() if m != "budget"}  # the baseline has no budget mode
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "qk.pt"
        torch.save({"q": q, "k": k, "grid": torch.tensor(grid)}, inputs)
        workers = {"baseline": start_worker(extract(baseline, Path(tmp) / "baseline"), inputs, old_modes,
                                            args.blocks, args.repeats, isolate=True),
                   "now": start_worker(ROOT, inputs, MODES, args.blocks, args.repeats, isolate=False)}
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for code, worker in workers.items():  # one at a time: the other waits on its stdin
                worker.stdin.write("go\n")
                worker.stdin.flush()
                for key, t in json.loads(worker.stdout.readline()).items():
                    times.setdefault(f"{code}:{key}", []).extend(t)
        for worker in workers.values():
            worker.stdin.close()
            worker.wait(timeout=60)
    results = []
    for block in args.blocks:
        medians = {}
        for key, t in times.items():  # "code:block/mode"
            code, rest = key.split(":")
            size, mode = rest.split("/")
            if int(size) == block:
                medians[f"{code}:{mode}"] = statistics.median(t)
        base = medians["baseline:quantile"]
        row = {"block": block, "wall_s": medians,
               "over_baseline_quantile": {key: t / base for key, t in medians.items()}}
        results.append(row)
        print(f"block {block}: " + ", ".join(f"{key} {t * 1e3:.1f} ms ({t / base:.2f}x)" for key, t in medians.items()),
              flush=True)
    write_json(args.out, {
        "benchmark": "psa_planning_history",
        **run_metadata(command_line()),
        "baseline_commit": baseline,
        "shape": {"grid": list(grid), "tokens": args.tokens, "heads": 4, "head_dim": 64, "dtype": "float32",
                  "device": "cpu", "data": "video_attention_qkv(seed=0)",
                  # Each code resolves "auto" itself; this is what the checkout's does.
                  "importance_dtype": {"config": "auto", "now": str(importance_matmul_dtype(PSAConfig(), q))
                                       .removeprefix("torch.")}},
        "modes": MODES,
        "timing": f"{args.rounds} rounds, each {args.repeats} calls per (code, block, mode), the two codes' workers "
                  "taking turns; medians of all calls",
        "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
