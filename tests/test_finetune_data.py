"""Fine-tuning data (pipelines/data.py): caption files, where videos may come from, which read
errors skip a clip, cached and precomputed latents."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from finetune_support import write_clip
from vdiff_sparse.pipelines import data as ft_data


@pytest.mark.parametrize("lines, named", [
    pytest.param(['{"video": "a.mp4", "caption": "x"}', "{not json"], "2", id="bad-json"),
    pytest.param(['{"video": "a.mp4"}', '{"video": "b.mp4", "caption": "ok"}', '{"caption": "y"}'], "1, 3",
                 id="missing-fields"),
    pytest.param(['{"video": "a.mp4", "caption": "x"}', '{"video": "a.mp4", "caption": "y"}'], "2", id="duplicate"),
    pytest.param(['{"file": "a.mp4", "text": "  "}'], "1", id="empty-caption"),
    pytest.param(['{"video": "a\\u0000.mp4", "caption": "x"}'], "1", id="nul-in-name"),
])
def test_malformed_caption_lines_are_named(tmp_path, lines, named):
    path = tmp_path / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ft_data.DataError, match=f"malformed caption lines {named}"):
        ft_data.read_captions(path)


def test_csv_captions_and_header_check(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text('path,prompt\nclip0.mp4,"a cat, running"\nclip1.mp4,a dog\n')
    entries = ft_data.read_captions(good)
    assert [(e.line, e.video, e.caption) for e in entries] == [(2, "clip0.mp4", "a cat, running"), (3, "clip1.mp4", "a dog")]
    bad = tmp_path / "bad.csv"
    bad.write_text("name,caption\nclip0.mp4,a cat\n")
    with pytest.raises(ValueError, match="needs a video column"):
        ft_data.read_captions(bad)


def test_missing_or_undecodable_caption_file_is_a_data_error(tmp_path):
    with pytest.raises(ft_data.DataError, match="does not exist"):
        ft_data.read_captions(tmp_path / "gone.jsonl")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"video": "a.mp4", "caption": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ft_data.DataError, match="cannot read the captions file"):
        ft_data.read_captions(latin1)


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory) -> Path:
    """``videos/clip.mp4`` and ``outside/secret.mp4`` side by side."""
    root = tmp_path_factory.mktemp("folders")
    for name in ("videos", "outside", "videos/sub"):
        (root / name).mkdir()
    write_clip(root / "videos" / "clip.mp4", seed=1)
    write_clip(root / "outside" / "secret.mp4", seed=2)
    return root


def _encoders(calls: list):
    def encode_video(frames):
        calls.append(frames.shape)
        return frames[0, :, ::4].mean(0, keepdim=True)

    return dict(encode_video=encode_video, encode_prompt=lambda c: torch.ones(3, 2), num_frames=5, height=16, width=32)


@pytest.mark.parametrize("name", ["../outside/secret.mp4", "sub/../../outside/secret.mp4", "{root}/outside/secret.mp4",
                                  "/etc/passwd"])
def test_caption_lines_naming_files_outside_the_video_folder_are_refused(clip_folders, tmp_path, name):
    name = name.format(root=clip_folders)
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"video": "clip.mp4", "caption": "a cat"}) + "\n"
                        + json.dumps({"video": name, "caption": "a secret"}) + "\n")
    calls = []
    with pytest.raises(ft_data.DataError, match=r"caption lines 2 name files outside data.video_dir.*"
                                                r"allow_outside_video_dir=true"):
        ft_data.build_cache(clip_folders / "videos", captions, tmp_path / "cache", **_encoders(calls))
    assert calls == [], "nothing may be read before the caption file is accepted"
    if name.endswith("secret.mp4"):  # the user's explicit opt-in
        report = ft_data.build_cache(clip_folders / "videos", captions, tmp_path / "cache", allow_outside=True,
                                     **_encoders(calls))
        assert len(report.files) == 2 and len(calls) == 2


def test_names_inside_the_video_folder_are_accepted(clip_folders, tmp_path):
    os.symlink(clip_folders / "videos" / "clip.mp4", clip_folders / "videos" / "sub" / "link.mp4")
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps({"video": v, "caption": "a cat"})
                                  for v in ["clip.mp4", "sub/../clip2.mp4", "sub/link.mp4", "./clip.mp4x"]) + "\n")
    present, missing = ft_data.match_videos(ft_data.read_captions(captions), clip_folders / "videos")
    assert [e.video for e in present] == ["clip.mp4", "sub/link.mp4"] and [e.line for e in missing] == [2, 4]


def test_missing_and_undecodable_videos_are_skipped_and_counted(tmp_path, clip_folders):
    (tmp_path / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    (tmp_path / "empty.mp4").write_bytes(b"")
    for i in range(2):
        os.symlink(clip_folders / "videos" / "clip.mp4", tmp_path / f"clip{i}.mp4")
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps({"video": v, "caption": "a cat"}) for v in
                                  ["clip0.mp4", "gone.mp4", "broken.mp4", "clip1.mp4", "empty.mp4"]) + "\n")
    calls = []
    kwargs = _encoders(calls)
    report = ft_data.build_cache(tmp_path, captions, tmp_path / "cache", **kwargs)
    assert [e.line for e in report.missing] == [2] and [e.line for e in report.unreadable] == [3, 5]
    assert report.summary() == "2 of 5 videos usable; 1 missing (lines 2); 2 unreadable (lines 3, 5)"
    assert calls == [(1, 3, 5, 16, 32)] * 2
    dataset = ft_data.LatentDataset(tmp_path / "cache")
    assert len(dataset) == 2 and dataset.latent_shape == (1, 2, 16, 32)
    ft_data.build_cache(tmp_path, captions, tmp_path / "cache", **kwargs)
    assert len(calls) == 2, "an unchanged cache must not be re-encoded"
    with pytest.raises(ft_data.UnreadableVideoError, match="cannot decode"):
        ft_data.read_video(tmp_path / "broken.mp4", 5, 16, 32)


@pytest.mark.parametrize("error", [RuntimeError("a bug in the reader"), MemoryError(), TypeError("bad argument")],
                         ids=lambda e: type(e).__name__)
def test_errors_other_than_an_unreadable_file_stop_the_caching(tmp_path, clip_folders, monkeypatch, error):
    """Only the decoder's "cannot read this file" skips a clip; a bug or running out of memory
    while reading one video propagates instead of being counted as unreadable."""
    for i in range(2):
        os.symlink(clip_folders / "videos" / "clip.mp4", tmp_path / f"clip{i}.mp4")
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps({"video": f"clip{i}.mp4", "caption": "a cat"}) for i in range(2)) + "\n")
    read_video = ft_data.read_video

    def fails_on_the_second(path, *args):
        if Path(path).name == "clip1.mp4":
            raise error
        return read_video(path, *args)

    monkeypatch.setattr(ft_data, "read_video", fails_on_the_second)
    with pytest.raises(type(error)):
        ft_data.build_cache(tmp_path, captions, tmp_path / "cache", **_encoders([]))


def write_sample(path: Path, latents=(16, 3, 6, 10), embeds=(16, 32), **extra: torch.Tensor) -> None:
    """A precomputed sample file (``embeds=None``: without prompt embeddings)."""
    from safetensors.torch import save_file

    tensors = {"latents": torch.zeros(latents), **extra}
    if embeds is not None:
        tensors["prompt_embeds"] = torch.zeros(embeds)
    save_file(tensors, str(path))


@pytest.mark.parametrize("bad, match", [
    pytest.param(dict(embeds=None), r"c.safetensors: no tensor\(s\) \['prompt_embeds'\]", id="missing-tensor"),
    pytest.param(dict(latents=(16, 5, 6, 10)), r"c.safetensors: shapes latents \(16, 5, 6, 10\).* differ from "
                                               r"a.safetensors", id="other-size"),
    pytest.param(None, "c.safetensors: unreadable", id="truncated"),
])
def test_precomputed_latents_are_checked_up_front(tmp_path, bad, match):
    for name in ("a", "b"):
        write_sample(tmp_path / f"{name}.safetensors", mask=torch.ones(2))  # extra tensors are ignored
    write_sample(tmp_path / "c.safetensors", **(bad or {}))
    if bad is None:
        (tmp_path / "c.safetensors").write_bytes((tmp_path / "c.safetensors").read_bytes()[:50])
    with pytest.raises(ft_data.DataError, match="1 of 3 latent files unusable.*" + match):
        ft_data.LatentDataset(tmp_path)
    (tmp_path / "c.safetensors").unlink()
    dataset = ft_data.LatentDataset(tmp_path)
    assert dataset.latent_shape == (16, 3, 6, 10) and dataset.batch([0, 1])["latents"].shape == (2, 16, 3, 6, 10)
    assert set(dataset[0]) == {"latents", "prompt_embeds"}
    with pytest.raises(ft_data.DataError, match=r"no tensor\(s\) \['condition'\]"):
        ft_data.LatentDataset(tmp_path, keys=("latents", "prompt_embeds", "condition"))
    assert [p.name for p in dataset.subset([1]).files] == ["b.safetensors"]


@pytest.mark.parametrize("frames, size, target", [
    pytest.param(10, (50, 70), (5, 32, 48), id="fewer-frames-ragged"),
    pytest.param(3, (40, 40), (9, 16, 32), id="repeat-frames-wide-crop"),
])
def test_read_video_samples_resizes_and_crops(tmp_path, seed, frames, size, target):
    path = tmp_path / "v.mp4"
    write_clip(path, seed, frames=frames, size=size)
    x = ft_data.read_video(path, *target)
    assert x.shape == (3, *target) and x.dtype == torch.float32
    assert -1 <= float(x.min()) < float(x.max()) <= 1
