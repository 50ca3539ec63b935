"""Video files in, token files out (and back): the work behind the ``titok-fast`` commands.

A failing file is reported and skipped, the others go on; finished token files are never rewritten unless asked,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .engine import Engine
from .loading import weights_digest
from .model import TiTok
from .tokens import TokenFile, TokenFileError, is_complete, load_tokens, save_tokens
from .video import (
    ClipSet,
    VideoError,
    iter_videos,
    normalize_pixels,
    psnr,
    read_clips,
    side_by_side,
    ssim,
    write_video,
)

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".gif"}
LIST_EXTENSIONS = {".txt", ".lst", ".list"}


class InputError(ValueError):
    """A command-line input that names nothing usable."""


@dataclass
class Summary:
    """What a batch command did, file by file."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    clips: int = 0
    seconds: float = 0.0

    def report(self, verb: str) -> str:
        lines = [
            f"{verb} {len(self.done)} file(s), {self.clips} clip(s) in {self.seconds:.1f} s "
            f"({self.clips / max(self.seconds, 1e-9):.2f} clips/s); skipped {len(self.skipped)} already complete; "
            f"{len(self.failed)} failed"
        ]
        lines += [f"  FAILED {path}: {reason}" for path, reason in self.failed]
        return "\n".join(lines)


@dataclass(frozen=True)
class ClipSettings:
    """How videos become clips: pixel grid (T, H, W), latent tokens per clip, sampling fps, tail policy and
    frame sampling ("upstream" frame indices, or "time" for variable frame rate)."""

    grid: tuple[int, int, int]
    tokens: int
    fps: float = 8.0
    tail: str = "drop"
    sampling: str = "upstream"

    def read_kwargs(self) -> dict:
        """Arguments of ``read_clips`` / ``iter_videos`` for these settings (raw pixels: scaled in model dtype)."""
        t, h, w = self.grid
        return dict(frames=t, height=h, width=w, fps=self.fps, tail=self.tail, sampling=self.sampling, raw=True)


def collect_inputs(inputs: Sequence[str | os.PathLike], suffix: str = ".safetensors") -> list[tuple[Path, str]]:
    """Expand files, folders (recursively) and list files into ``(file, output name)`` pairs.

    Output names keep the folder structure under each input folder; two inputs that would write the same output
    are an error naming both."""
    found: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
            found += [(p, str(p.relative_to(path).with_suffix(""))) for p in files]
        elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
            listed = [line.strip() for line in path.read_text().splitlines()]
            found += collect_inputs([path.parent / line for line in listed if line and not line.startswith("#")])
        elif path.is_file():
            found.append((path, path.stem))
        else:
            raise InputError(f"input {str(item)!r} does not exist")
    owners: dict[str, Path] = {}
    for path, name in found:
        if name in owners and owners[name] != path:
            raise InputError(f"inputs {owners[name]} and {path} would both write {name}{suffix}; rename one")
        owners[name] = path
    return list(dict.fromkeys(found))


def _progress(total: int, unit: str) -> tqdm:
    return tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=None)


def encode_files(
    model: TiTok,
    engine: Engine,
    files: Sequence[tuple[Path, str]],
    outdir: str | os.PathLike,
    settings: ClipSettings,
    *,
    workers: int = 2,
    group_clips: int = 64,
    overwrite: bool = False,
) -> Summary:
    """Encode every video into ``outdir/<name>.safetensors``; finished outputs are skipped unless ``overwrite``."""
    outdir = Path(outdir)
    summary = Summary()
    start = time.perf_counter()
    if model.weights_digest is None:  # token files must name their weights
        model.weights_digest = weights_digest(model.state_dict())
    todo = []
    for path, name in files:
        out = outdir / f"{name}.safetensors"
        if not overwrite and _already_encoded(out, model, settings):
            summary.skipped.append(str(path))
        else:
            todo.append((path, out))
    outputs = {str(p): out for p, out in todo}
    reads = iter_videos([p for p, _ in todo], workers=workers, prefetch=2 * workers, **settings.read_kwargs())
    bar = _progress(len(todo), "file")
    for group in _groups(reads, group_clips, summary):
        for clip_set, indices in _encode_group(engine, group, settings.tokens, summary):
            out = outputs[str(clip_set.path)]
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                save_tokens(out, _token_file(model, clip_set, indices, settings))
            except (OSError, TokenFileError) as e:
                summary.failed.append((str(clip_set.path), f"cannot write {out}: {e}"))
                continue
            summary.done.append(str(clip_set.path))
            summary.clips += len(indices)
        bar.update(len(summary.done) + len(summary.failed) - bar.n)
        bar.set_postfix(clips_per_s=f"{summary.clips / (time.perf_counter() - start):.2f}")
    bar.close()
    summary.failed += [(str(p), "not read") for p, _ in todo if _unaccounted(p, summary)]
    summary.seconds = time.perf_counter() - start
    return summary


def _already_encoded(out: Path, model: TiTok, settings: ClipSettings) -> bool:
    """A complete token file made by the same weights with the same clip settings (else it is redone)."""
    if not is_complete(out, weights_digest=model.weights_digest):
        return False
    done = load_tokens(out)
    return (
        done.fps == settings.fps
        and done.tail == settings.tail
        and done.sampling == settings.sampling
        and bool((done.token_counts == settings.tokens).all())
        and bool((done.grids == torch.tensor(settings.grid, dtype=torch.int32)).all())
    )


def _unaccounted(path: Path, summary: Summary) -> bool:
    return str(path) not in summary.done and all(str(path) != f for f, _ in summary.failed)


def _groups(reads: Iterator, group_clips: int, summary: Summary) -> Iterator[list[ClipSet]]:
    """Whole files grouped until they hold ``group_clips`` clips; read failures go to the summary."""
    group: list[ClipSet] = []
    for path, result in reads:
        if isinstance(result, VideoError):
            summary.failed.append((str(path), str(result)))
            continue
        group.append(result)
        if sum(len(c.clips) for c in group) >= group_clips:
            yield group
            group = []
    if group:
        yield group


def _encode_group(engine: Engine, group: list[ClipSet], tokens: int, summary: Summary) -> Iterable:
    """(clip set, per-clip indices) for every file of the group; if the batch fails, files are retried one by
    one so that only the file at fault is lost."""
    try:
        return _encode_clip_sets(engine, group, tokens)
    except (ValueError, TypeError, RuntimeError) as e:
        if len(group) == 1:
            summary.failed.append((str(group[0].path), f"encoding failed: {e}"))
            return []
    results = []
    for clip_set in group:
        results += _encode_group(engine, [clip_set], tokens, summary)
    return results


def _encode_clip_sets(engine: Engine, group: list[ClipSet], tokens: int) -> list:
    clips = [normalize_pixels(clip, engine.model.dtype) for c in group for clip in c.clips]
    _, out = engine.encode(clips, [tokens] * len(clips))
    indices = iter(out["indices"])
    return [(c, [next(indices).cpu() for _ in c.clips]) for c in group]


def _token_file(model: TiTok, clip_set: ClipSet, indices: list, settings: ClipSettings) -> TokenFile:
    return TokenFile.from_chunks(
        indices,
        [settings.grid] * len(indices),
        clip_set.start_times,
        model_config=model.config.to_dict(),
        weights_digest=model.weights_digest,
        fps=clip_set.fps,
        source=os.path.abspath(clip_set.path),
        frames_per_chunk=clip_set.frames_per_clip,
        tail=clip_set.tail,
        last_chunk_frames=clip_set.last_clip_frames,
        codebook_size=model.config.codebook_size,
        weights_source=model.weights_source,
        sampling=settings.sampling,
    )


def decode_token_file(engine: Engine, token_file: TokenFile) -> torch.Tensor:
    """All chunks decoded, clamped to [-1, 1], joined in time, padded tail frames removed: [3, frames, H, W]."""
    grids = [tuple(g) for g in token_file.grids.tolist()]
    chunks = engine.decode_indices(token_file.all_indices(), grids)
    video = torch.cat([c.float().clamp(-1, 1).cpu() for c in chunks], dim=1)
    return video[:, : real_frames(token_file)]


def real_frames(token_file: TokenFile) -> int:
    chunks = token_file.token_counts.numel()
    return (chunks - 1) * token_file.frames_per_chunk + token_file.last_chunk_frames


def source_video(token_file: TokenFile) -> torch.Tensor:
    """The source re-read exactly as it was for encoding: [3, frames, H, W] in [-1, 1]."""
    t, h, w = token_file.grids[0].tolist()
    clips = read_clips(
        token_file.source, frames=t, height=h, width=w, fps=token_file.fps, tail=token_file.tail,
        sampling=token_file.sampling,
    )  # fmt: skip
    return torch.cat(clips.clips, dim=1)[:, : real_frames(token_file)]


def check_same_model(model: TiTok, token_file: TokenFile, path: str | os.PathLike) -> None:
    """A token file decodes only with the weights that made it."""
    if token_file.weights_digest != model.weights_digest:
        raise ValueError(
            f"{path} was made by weights {token_file.weights_digest}, the loaded model is {model.weights_digest}; "
            "pass the right --checkpoint, or --force to decode anyway"
        )


def decode_files(
    engine: Engine,
    paths: Sequence[str | os.PathLike],
    outdir: str | os.PathLike,
    *,
    with_source: bool = False,
    force: bool = False,
    overwrite: bool = False,
) -> Summary:
    """Token files -> ``outdir/<stem>.mp4`` (optionally the source beside the reconstruction)."""
    outdir = Path(outdir)
    stems: dict[str, str] = {}
    for path in paths:
        other = stems.setdefault(Path(path).stem, str(path))
        if other != str(path):
            raise InputError(f"token files {other} and {path} would both write {Path(path).stem}.mp4; rename one")
    summary = Summary()
    start = time.perf_counter()
    for path in tqdm(paths, unit="file", file=sys.stderr, disable=None):
        out = outdir / f"{Path(path).stem}.mp4"
        if out.exists() and not overwrite:
            summary.skipped.append(str(path))
            continue
        try:
            token_file = load_tokens(path)
            if not force:
                check_same_model(engine.model, token_file, path)
            video = decode_token_file(engine, token_file)
            if with_source:
                video = side_by_side(source_video(token_file), video)
            outdir.mkdir(parents=True, exist_ok=True)
            write_video(out, video, token_file.fps)
        except (ValueError, TypeError, RuntimeError, OSError) as e:
            summary.failed.append((str(path), str(e)))
            continue
        summary.done.append(str(path))
        summary.clips += token_file.token_counts.numel()
    summary.seconds = time.perf_counter() - start
    return summary


def evaluate(
    engine: Engine, files: Sequence[tuple[Path, str]], settings: ClipSettings, token_counts: Sequence[int]
) -> tuple[dict, Summary]:
    """Encode and decode every clip at each token count; mean PSNR (dB) and SSIM per token count."""
    summary = Summary()
    start = time.perf_counter()
    clips = []
    for path, result in iter_videos([p for p, _ in files], workers=2, prefetch=4, **settings.read_kwargs()):
        if isinstance(result, VideoError):
            summary.failed.append((str(path), str(result)))
        else:
            clips += result.clips
            summary.done.append(str(path))
    if not clips:
        raise InputError("no clips to evaluate: every input failed")
    table = {}
    inputs = [normalize_pixels(c, engine.model.dtype) for c in clips]
    targets = [normalize_pixels(c, torch.float32) for c in clips]
    for n in token_counts:
        _, out = engine.encode(inputs, [n] * len(clips))
        recon = engine.decode_indices(out["indices"], [settings.grid] * len(clips))
        pairs = [(r.float().clamp(-1, 1).cpu(), c) for r, c in zip(recon, targets, strict=True)]
        table[n] = {
            "psnr": sum(psnr(r, c) for r, c in pairs) / len(pairs),
            "ssim": sum(ssim(r, c) for r, c in pairs) / len(pairs),
            "clips": len(pairs),
        }
    summary.clips = len(clips) * len(token_counts)
    summary.seconds = time.perf_counter() - start
    return table, summary
