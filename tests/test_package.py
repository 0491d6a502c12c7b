"""The package as users meet it: a cheap import, the CLI's main job."""

from __future__ import annotations

import subprocess
import sys


def test_import_does_not_pull_diffusers():
    code = "import sys, vdiff_sparse; vdiff_sparse.AttentionPlan; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_attribute_is_an_attribute_error():
    import vdiff_sparse

    try:
        vdiff_sparse.does_not_exist
    except AttributeError as err:
        assert "does_not_exist" in str(err)
    else:
        raise AssertionError("expected AttributeError")


def test_demo_runs_and_prints_every_method(capsys):
    from vdiff_sparse.cli import main

    assert main(["demo", "--grid", "2", "8", "12", "--heads", "2", "--head-dim", "16", "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    for name in ("dense SDPA", "gna", "psa", "vmoba"):
        assert name in table
    assert "speedup" in table
