"""The command line: bad options fail with one clear line, while bugs (an error the package did not
raise on purpose) keep their traceback."""

from __future__ import annotations

import pytest

from vdiff_sparse.cli import main, raised_by_a_check
from vdiff_sparse.pipelines import generate

SMALL = ["--frames", "5", "--height", "32", "--width", "48", "--steps", "1", "--no-warmup"]


@pytest.mark.parametrize("argv, match", [
    (["generate", "--guidance-scale", "nan"], "expected a finite number, got 'nan'"),
    (["generate", "--tiny-head-dim", "5"], "even head dimension >= 6"),
    (["demo", "--grid", "0", "8", "8"], "expected a positive integer, got 0"),
])
def test_bad_option_values_are_usage_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err


def test_a_config_file_with_python_tags_is_refused_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("config:\n  window: !!python/tuple [1, 2, 3]\n")
    assert main(["generate", "--attn", "gna", "--config", str(bad), "--out", str(tmp_path / "o"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "is not plain YAML" in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["under_a_file", "a_directory"])
def test_viz_output_that_cannot_be_written_is_refused_first(tmp_path, capsys, where):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "plan.png" if where == "under_a_file" else tmp_path
    assert main(["viz", "--attn", "gna", "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        return int("not a number")  # a ValueError no check raised

    monkeypatch.setattr(generate, "generation_processor", broken)
    with pytest.raises(ValueError, match="invalid literal for int"):
        main(["generate", "--out", str(tmp_path / "o"), *SMALL])


def test_deliberate_errors_are_told_apart_from_bugs():
    from vdiff_sparse.processors import GNAProcessor

    with pytest.raises(ValueError) as deliberate:
        GNAProcessor(backend="cuda")
    assert raised_by_a_check(deliberate.value)
    with pytest.raises(ValueError) as bug:
        int("x")
    assert not raised_by_a_check(bug.value)


def test_only_download_failures_read_as_a_missing_model(monkeypatch):
    from diffusers import DiffusionPipeline

    def broken(*args, **kwargs):
        raise KeyError("a bug while loading")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", broken)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(KeyError, match="a bug while loading"):
        generate.load_diffusers_pipeline("someone/some-model", None)

    def offline(*args, **kwargs):
        raise OSError("no connection")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", offline)
    with pytest.raises(generate.ModelNotAvailableError, match="could not download model 'someone/some-model'"):
        generate.load_diffusers_pipeline("someone/some-model", None)


def test_compile_without_the_warm_up_is_refused(tmp_path, capsys):
    """The warm-up generation is where compilation happens; without it the timed run would
    measure the compiler."""
    assert main(["generate", "--attn", "gna", "--compile", "--out", str(tmp_path / "o"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "--compile needs the warm-up generation" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
