"""Register spills of the Triton kernels, compiled for sm_90 and sm_80 on this CPU machine.

Triton's CUDA backend compiles without a GPU and the ``cuobjdump`` in its wheel reads a cubin's
registers and local memory (:mod:`vdiff_sparse.kernels.resources`).

* The committed table (``bench/results/kernel_resources.json``, from
  ``bench/kernel_resources.py``: every variant the launches can use, ~770 compilations) must
  describe the kernels of this checkout (same code hash and Triton version), list every variant
  the launch rules give at head dims 64 and 128 in bf16 and fp16 for both GPUs, and show no
  spills.
* A few compilations here, at head dim 128 for each GPU: per kernel the variant with every
  switch on, at its largest tile and deepest pipeline, must not spill either.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="compiling the kernels needs the triton package")
TABLE = Path(__file__).resolve().parents[1] / "bench" / "results" / "kernel_resources.json"


@pytest.fixture
def resources(monkeypatch):
    """The kernel modules loaded for compilation (not the interpreter's)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from vdiff_sparse.backends.triton import _kernels

    module = _kernels("resources")
    reason = module.why_not_available()
    if reason:
        pytest.skip(f"cannot compile for a GPU here: {reason}")
    return module


def test_committed_table_is_current_and_spill_free(resources):
    import triton

    table = json.loads(TABLE.read_text())
    rerun = "rerun bench/kernel_resources.py"
    assert table["kernel_code_key"] == resources.code_key(), (
        f"the kernels or their tiles changed since bench/results/kernel_resources.json was made: {rerun}")
    assert table["versions"]["triton"] == triton.__version__, f"the table was made with another Triton: {rerun}"
    recorded = {(row["arch"], row["head_dim"], row["label"]): row for row in table["variants"]}
    for arch in (90, 80):
        for head_dim in (64, 128):
            for dtype in ("bf16", "fp16"):
                for variant in resources.variants(head_dim, dtype, arch // 10):
                    key = (f"sm_{arch}", head_dim, variant.label())
                    assert key in recorded, f"missing from the table: {key}"
    bad = [(row["arch"], row["head_dim"], row["label"], row.get("stack"), row.get("error"))
           for row in table["variants"] if row.get("spills") or "error" in row]
    assert not bad, bad


def _heaviest(resources, major):
    """Per kernel, the variant(s) with every switch on at the largest tile, deepest pipeline."""
    chosen = {}
    for variant in resources.variants(128, "bf16", major):
        c = variant.constexprs
        weight = (c["BLOCK_M"] * c["BLOCK_N"], int(c.get("WINDOW", 0)), bool(c.get("DILATED")),
                  bool(c.get("GATHER")), variant.num_stages, variant.num_warps)
        key = (variant.kernel, c.get("BACKWARD"))
        if key not in chosen or weight > chosen[key][0]:
            chosen[key] = (weight, variant)
    return [variant for _, variant in chosen.values()]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80], ids=["sm_90", "sm_80"])
def test_heaviest_variants_do_not_spill(resources, arch):
    for variant in _heaviest(resources, arch // 10):
        usage = resources.compile_variant(variant, arch)
        assert not usage["spills"], (variant.label(), usage)
        assert usage["registers"] <= 255


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80], ids=["sm_90", "sm_80"])
def test_importance_estimate_kernel_does_not_spill(resources, arch):
    """PSA's sampled-estimate kernel (:mod:`vdiff_sparse.kernels.estimate`) at head dims 64 and
    128, in bfloat16 and float32, with and without the budget mode's statistics."""
    for head_dim in (64, 128):
        for dtype in ("bf16", "fp32"):
            for variant in resources.estimate_variants(head_dim, dtype):
                usage = resources.compile_variant(variant, arch)
                assert not usage["spills"], (variant.label(), usage)
                assert usage["registers"] <= 255
