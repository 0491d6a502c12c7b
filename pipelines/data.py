"""Fine-tuning data: videos with captions, encoded once into a cache of latents.

A dataset is a folder of videos plus a caption file naming them:

* ``captions.jsonl``: one JSON object per line, ``{"video": "clip.mp4", "caption": "..."}``
  (``file``/``path`` and ``text``/``prompt`` are accepted as the key names);
* ``captions.csv``: a header row with the same column names.

:func:`build_cache` samples ``num_frames`` frames evenly over each clip, resizes (shorter side,
then a centre crop) to ``height x width``, encodes the frames with the VAE and the caption with
the text encoder, and writes one safetensors file per clip (``latents`` ``[C, T, h, w]``,
``prompt_embeds`` ``[L, D]``). A file whose source (path, size, mtime, caption, settings) is
unchanged is reused, so an interrupted caching run resumes, and training reads only latents.
A folder of such files made elsewhere is accepted directly (:class:`LatentDataset`).

Bad input: a caption file with malformed lines (bad JSON, missing fields, empty captions,
a video named twice), lines naming a file outside ``video_dir`` (an absolute path, or one that
climbs out with ``..``; allowed only with ``allow_outside``), or lines that name no video of the
folder is a :class:`DataError` naming the lines. Videos that are missing, or that the decoder
cannot read (:class:`UnreadableVideoError`: corrupt, truncated, not a video), are reported,
counted and skipped; any other exception while reading or encoding a clip (a bug, running out of
memory) stops the run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

VIDEO_KEYS = ("video", "file", "path")
CAPTION_KEYS = ("caption", "text", "prompt")
CACHE_FORMAT = "vdiff_sparse-latents-v1"


class DataError(ValueError):
    """Training data that cannot be used as given (caption file, videos, latent files); the
    message names the file, the lines and what to do."""


class UnreadableVideoError(DataError):
    """The video decoder could not read a file (corrupt, truncated, empty, not a video)."""


@dataclass(frozen=True)
class CaptionEntry:
    """One line of a caption file: ``line`` is 1-based (the header of a CSV is line 1)."""

    line: int
    video: str
    caption: str


def _lines(numbers: Sequence[int], limit: int = 20) -> str:
    shown = ", ".join(str(n) for n in numbers[:limit])
    return shown + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")


def _field(row: dict, keys: tuple[str, ...]):
    return next((row[k] for k in keys if k in row and row[k] is not None), None)


def read_captions(path: str | os.PathLike) -> list[CaptionEntry]:
    """Parse a ``.jsonl`` or ``.csv`` caption file.

    Raises:
        DataError: not a readable file, unknown suffix, a CSV header without a video and a
            caption column, or malformed lines (named by line number and reason).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise DataError(f"captions must be a .jsonl or .csv file, got {str(path)!r}")
    if not path.is_file():
        raise DataError(f"captions file {str(path)!r} does not exist (or is not a file)")
    try:
        rows = _caption_rows(path, suffix)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the captions file {str(path)!r}: {e}") from None
    return _entries(path, rows)


def _caption_rows(path: Path, suffix: str) -> list[tuple[int, object]]:
    rows: list[tuple[int, object]] = []
    with open(path, newline="", encoding="utf-8") as f:
        if suffix == ".jsonl":
            for number, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    rows.append((number, json.loads(text)))
                except json.JSONDecodeError as e:
                    rows.append((number, f"invalid JSON ({e.msg})"))
        else:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if not set(columns) & set(VIDEO_KEYS) or not set(columns) & set(CAPTION_KEYS):
                raise DataError(
                    f"{path}: the CSV header {columns} needs a video column (one of {VIDEO_KEYS}) "
                    f"and a caption column (one of {CAPTION_KEYS})"
                )
            rows = [(reader.line_num, row) for row in reader]
    return rows


def _entries(path: Path, rows: list[tuple[int, object]]) -> list[CaptionEntry]:
    entries, problems, first_line = [], {}, {}
    for number, row in rows:
        if isinstance(row, str):
            problems[number] = row
            continue
        if not isinstance(row, dict):
            problems[number] = "not a JSON object"
            continue
        video, caption = _field(row, VIDEO_KEYS), _field(row, CAPTION_KEYS)
        if not isinstance(video, str) or not video.strip():
            problems[number] = f"no video name (one of {VIDEO_KEYS})"
        elif "\x00" in video:
            problems[number] = "a NUL character in the video name"
        elif not isinstance(caption, str) or not caption.strip():
            problems[number] = f"no caption (one of {CAPTION_KEYS})"
        elif video in first_line:
            problems[number] = f"{video!r} already captioned on line {first_line[video]}"
        else:
            first_line[video] = number
            entries.append(CaptionEntry(number, video.strip(), caption.strip()))
    if problems:
        detail = "; ".join(f"line {n}: {why}" for n, why in list(problems.items())[:10])
        raise DataError(f"{path}: malformed caption lines {_lines(list(problems))}: {detail}")
    if not entries:
        raise DataError(f"{path}: no captions")
    return entries


def escapes_folder(name: str) -> bool:
    """Whether the caption file's video name ``name`` points outside the video folder: an
    absolute path, or a relative one that climbs out with ``..`` (judged on the text, so
    symbolic links inside the folder, which its owner put there, are followed)."""
    if os.path.isabs(name) or Path(name).anchor:
        return True
    return os.path.normpath(name).split(os.sep)[0] == os.pardir


def match_videos(entries: list[CaptionEntry], video_dir: str | os.PathLike, *,
                 allow_outside: bool = False) -> tuple[list[CaptionEntry], list[CaptionEntry]]:
    """Split ``entries`` into those whose video exists under ``video_dir`` and the missing ones.

    Args:
        allow_outside: accept names outside ``video_dir`` (see :func:`escapes_folder`).

    Raises:
        DataError: lines name files outside ``video_dir`` (unless ``allow_outside``), or no line
            names an existing video (the caption file does not belong to the folder); the
            message names the lines and a few names.
    """
    video_dir = Path(video_dir)
    outside = [e for e in entries if escapes_folder(e.video)]
    if outside and not allow_outside:
        raise DataError(
            f"caption lines {_lines([e.line for e in outside])} name files outside data.video_dir "
            f"{str(video_dir)!r} (e.g. {[e.video for e in outside[:3]]}): name videos relative to that folder, "
            f"or set data.allow_outside_video_dir=true if the caption file is trusted to name any file"
        )
    present = [e for e in entries if (video_dir / e.video).is_file()]
    missing = [e for e in entries if not (video_dir / e.video).is_file()]
    if not present:
        on_disk = sorted(p.name for p in video_dir.iterdir())[:5] if video_dir.is_dir() else []
        raise DataError(
            f"the caption file does not match the videos in {str(video_dir)!r}: lines "
            f"{_lines([e.line for e in missing])} name files that do not exist there "
            f"(e.g. {[e.video for e in missing[:3]]}; the folder holds {on_disk})"
        )
    return present, missing


def read_video(path: str | os.PathLike, num_frames: int, height: int, width: int) -> torch.Tensor:
    """``num_frames`` frames sampled evenly over the clip (repeated if it is shorter),
    resized so the shorter side fits and centre-cropped to ``height x width``.

    Returns:
        ``[3, num_frames, height, width]`` float32 in ``[-1, 1]``.

    Raises:
        UnreadableVideoError: the decoder cannot read the file (imageio reports those as
            ``OSError``), or it decodes to something other than RGB(A) frames.
    """
    import imageio.v3 as iio

    try:
        frames = np.asarray(iio.imread(path, index=None))
    except OSError as e:
        raise UnreadableVideoError(f"cannot decode {str(path)!r}: {str(e).splitlines()[0] if str(e) else e!r}") from e
    if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] not in (3, 4):
        raise UnreadableVideoError(f"{str(path)!r} is not an RGB video: decoded shape {frames.shape}")
    frames = frames[..., :3]
    index = np.round(np.linspace(0, frames.shape[0] - 1, num_frames)).astype(np.int64)
    x = torch.from_numpy(frames[index]).permute(0, 3, 1, 2).float()  # [F, 3, H, W]
    scale = max(height / x.shape[-2], width / x.shape[-1])
    size = (max(height, round(x.shape[-2] * scale)), max(width, round(x.shape[-1] * scale)))
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[..., top: top + height, left: left + width]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


def _source_key(entry: CaptionEntry, video: Path, settings: dict) -> str:
    stat = video.stat()
    blob = json.dumps([entry.video, entry.caption, stat.st_size, stat.st_mtime_ns, settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_file(cache_dir: Path, entry: CaptionEntry) -> Path:
    stem = hashlib.sha1(entry.video.encode()).hexdigest()[:16]
    return cache_dir / f"{stem}.safetensors"


def _cached_key(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("source_key")
    except Exception:  # a truncated file from an interrupted run is re-encoded
        return None


@dataclass
class CacheReport:
    """What :func:`build_cache` did: the files of the usable samples (caption file order) and
    the captions skipped because their video was missing or could not be decoded."""

    files: list[Path]
    missing: list[CaptionEntry]
    unreadable: list[CaptionEntry]

    def summary(self) -> str:
        total = len(self.files) + len(self.missing) + len(self.unreadable)
        text = f"{len(self.files)} of {total} videos usable"
        if self.missing:
            text += f"; {len(self.missing)} missing (lines {_lines([e.line for e in self.missing])})"
        if self.unreadable:
            text += f"; {len(self.unreadable)} unreadable (lines {_lines([e.line for e in self.unreadable])})"
        return text


def build_cache(
    video_dir: str | os.PathLike,
    captions: str | os.PathLike,
    cache_dir: str | os.PathLike,
    *,
    encode_video: Callable[[torch.Tensor], torch.Tensor],
    encode_prompt: Callable[[str], torch.Tensor],
    num_frames: int,
    height: int,
    width: int,
    encode_condition: Callable[[torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
    settings: dict | None = None,
    allow_outside: bool = False,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> CacheReport:
    """Encode every captioned video of ``video_dir`` into ``cache_dir`` (once).

    Args:
        encode_video: ``[1, 3, F, H, W]`` frames in ``[-1, 1]`` -> ``[C, T, h, w]`` latents.
        encode_prompt: caption -> ``[L, D]`` prompt embeddings.
        num_frames, height, width: what :func:`read_video` produces.
        encode_condition: for image-conditioned models, the same frames -> named tensors saved
            beside the latents (e.g. the encoded first frame).
        settings: anything else the cached tensors depend on (model name, text length); a
            change re-encodes.
        allow_outside: accept caption lines naming files outside ``video_dir``.
        rank, world_size, barrier: process ``rank`` encodes every ``world_size``-th video, then
            all processes meet at ``barrier`` and read the same list of files.

    Raises:
        DataError: from :func:`read_captions` / :func:`match_videos`, or no usable video.
    """
    from safetensors.torch import save_file

    video_dir, cache_dir = Path(video_dir), Path(cache_dir)
    entries = read_captions(captions)
    present, missing = match_videos(entries, video_dir, allow_outside=allow_outside)
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = {"format": CACHE_FORMAT, "num_frames": num_frames, "height": height, "width": width, **(settings or {})}
    keys = {e: _source_key(e, video_dir / e.video, settings) for e in present}
    for i, entry in enumerate(present):
        target = _cache_file(cache_dir, entry)
        if i % world_size != rank or (target.is_file() and _cached_key(target) == keys[entry]):
            continue
        try:
            frames = read_video(video_dir / entry.video, num_frames, height, width)
        except UnreadableVideoError as e:
            logger.warning("skipping %s (captions line %d): %s", entry.video, entry.line, e)
            target.unlink(missing_ok=True)
            continue
        with torch.no_grad():
            tensors = {"latents": encode_video(frames[None]), "prompt_embeds": encode_prompt(entry.caption)}
            if encode_condition is not None:
                tensors.update(encode_condition(frames[None]))
        tmp = target.with_suffix(f".tmp{rank}")
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"source_key": keys[entry], "video": entry.video, "caption": entry.caption})
        os.replace(tmp, target)
    barrier()
    files, unreadable = [], []
    for entry in present:
        target = _cache_file(cache_dir, entry)
        (files if target.is_file() and _cached_key(target) == keys[entry] else unreadable).append(entry)
    report = CacheReport([_cache_file(cache_dir, e) for e in files], missing, unreadable)
    if not report.files:
        raise DataError(f"no usable videos in {str(video_dir)!r}: {report.summary()}")
    return report


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors of a safetensors file, from its header only."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


SAMPLE_KEYS = ("latents", "prompt_embeds")


class LatentDataset(torch.utils.data.Dataset):
    """Cached samples: safetensors files with ``latents`` ``[C, T, h, w]``, ``prompt_embeds``
    ``[L, D]`` and any further tensors named in ``keys`` (what :func:`build_cache` writes;
    precomputed ones work too; other tensors in the files are ignored).

    Every file's header is checked up front, so a bad file stops the run before training
    rather than at the step that first draws it.

    Args:
        files: the files, or a folder whose ``*.safetensors`` are used (sorted by name).
        keys: the tensors every sample must hold.

    Raises:
        DataError: not a folder, no files, or files that cannot be read, lack one of the
            tensors or differ in shape from the first file (named, up to 5 of them).
    """

    def __init__(self, files: Sequence[str | os.PathLike] | str | os.PathLike, keys: Sequence[str] = SAMPLE_KEYS):
        if isinstance(files, (str, os.PathLike)):
            folder = Path(files)
            if not folder.is_dir():
                raise DataError(f"latents_dir {str(folder)!r} is not a folder")
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise DataError(f"latents_dir {str(folder)!r} holds no .safetensors files")
        self.files = [Path(f) for f in files]
        self.keys = tuple(keys)
        expected, problems = None, []
        for path in self.files:
            try:
                shapes = _tensor_shapes(path)
            except Exception as e:  # a truncated or foreign file, whatever the reader says
                problems.append(f"{path.name}: unreadable ({e})")
                continue
            missing = set(self.keys) - set(shapes)
            if missing:
                problems.append(f"{path.name}: no tensor(s) {sorted(missing)} (has {sorted(shapes)})")
                continue
            shapes = {k: shapes[k] for k in self.keys}
            expected = expected or (path.name, shapes)
            if shapes != expected[1]:
                problems.append(f"{path.name}: shapes {_shapes_text(shapes)} differ from {expected[0]}'s "
                                f"{_shapes_text(expected[1])}")
        if problems:
            raise DataError(f"{len(problems)} of {len(self.files)} latent files unusable (all samples must hold "
                            f"{' and '.join(self.keys)} of one size): " + "; ".join(problems[:5]))
        self.shapes = expected[1]
        self.latent_shape, self.embed_shape = self.shapes["latents"], self.shapes["prompt_embeds"]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.files[index]), "pt") as f:
            return {k: f.get_tensor(k) for k in self.keys}

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The samples ``indices`` stacked along a new batch dimension."""
        samples = [self[int(i)] for i in indices]
        return {k: torch.stack([s[k] for s in samples]) for k in self.keys}

    def subset(self, indices: Sequence[int]) -> "LatentDataset":
        """The samples ``indices``, in that order (already checked, not read again)."""
        part = object.__new__(LatentDataset)
        part.files, part.keys, part.shapes = [self.files[int(i)] for i in indices], self.keys, self.shapes
        part.latent_shape, part.embed_shape = self.latent_shape, self.embed_shape
        return part


def _shapes_text(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {v}" for k, v in shapes.items())


__all__ = [
    "CacheReport",
    "CaptionEntry",
    "DataError",
    "LatentDataset",
    "SAMPLE_KEYS",
    "UnreadableVideoError",
    "build_cache",
    "escapes_folder",
    "match_videos",
    "read_captions",
    "read_video",
]
