"""Video files in, token files out (and back): the work behind the ``titok-fast`` commands.

A failing file is reported and skipped, the others go on; finished token files are never rewritten unless asked,
so an interrupted run resumes where it stopped. A token file made otherwise (from another source, by other
weights or with other settings) is redone, and moved aside if its redo fails, so an output folder never mixes
token files made different ways.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import functools
import hashlib
import io
import itertools
import json
import math
import os
import posixpath
import re
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import __version__
from .archives import (
    ARCHIVE_CUT,
    ARCHIVE_EXTENSIONS,
    ArchiveError,
    is_archive,
    list_archive,
    member_of,
    split_member,
    split_suffix,
)
from .backends import resolve_backend
from .checks import MAX_GRID, MAX_GRID_VOXELS, check_grids, check_token_counts
from .config import MODEL_FIELDS, TiTokConfig, _plain
from .decoders import NVDEC_RGB, nvdec_unavailable
from .engine import IDLE, Engine
from .files import (
    ABANDONED_UNLOCKED_SECONDS,
    METADATA_KEY,
    STALL_SECONDS,
    absolute,
    brief,
    entry_of,
    escaped,
    file_entry,
    file_head,
    interrupt_name,
    interrupts_held,
    kind_of,
    network_file_system,
    notice,
    remove_abandoned,
    remove_left,
    show_traceback,
    temporary_stem,
    temporary_target,
)
from .loading import random_seed, read_safetensors_metadata, weights_digest
from .manifest import OUTDATED_SUFFIX, Manifest, aside_stem, is_manifest_name, manifest_name
from .metrics import psnr, ssim
from .model import TiTok
from .patches import patch_grid
from .preprocess import DevicePreprocessor, I420Clip
from .quantizer import NAN_INDEX
from .stages import CLOCK, each_timed
from .tokens import (
    TokenFile,
    TokenFileError,
    load_tokens,
    most_chunks,
    read_token_bytes,
    recorded_digest,
    save_tokens,
    too_many_chunks,
    try_load_tokens,
)
from .video import (
    MAX_FPS,
    PICKS_FIXED,
    READER,
    TIME_SAMPLING,
    ClipReader,
    FeedInterleaver,
    auto_worker_kind,
    default_workers,
    earlier_picks_differ,
    interleaved_videos,
    is_recorded_source,
    normalize_pixels,
    same_time_sampling,
    source_stamp,
    video_comment,
)
from .writing import MIN_WRITE_FPS, VideoWriter, side_by_side

# what a folder's files must end in (any case) to be inputs; a file named on the command line or in a list is read
# whatever its name
VIDEO_EXTENSIONS = {
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".vob", ".ts", ".m2ts", ".mts", ".flv", ".wmv",
    ".ogv", ".3gp", ".3g2", ".mxf", ".gif",
}  # fmt: skip
LIST_EXTENSIONS = {".txt", ".lst", ".list"}
SOURCE_SIZE_READ_AHEAD = 2  # clips a file may hold decoded ahead when they are kept at source size (uint8 RGB)
# a file gives no clip for this long (slow, or stuck until the stall limit): the clips the engine holds are run,
# so the files before it are written instead of waiting for it
IDLE_SECONDS = 1.0
GIVE_UP_AFTER = 32  # failures in a row, each blamed on its own clip or file, that say the fault is no file's


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
    limited_by: str = ""  # encode: what limited the run (see Limits.describe), "" if nothing was encoded
    waited: float = 0.0  # encode: the seconds the model's feeder waited for decoded clips (Limits.waited)
    duplicates: int = 0  # results that came back more than once (retried work) and were dropped
    replaced: int = 0  # encode: token files made otherwise (another source, weights or settings) that were redone
    checking: float = 0.0  # encode: the seconds spent checking outputs before encoding (not in ``seconds``)
    not_encoded: int = 0  # encode: of ``failed``, the inputs a run that stopped left not encoded

    def in_order_of(self, files: Sequence[tuple[Path, str]]) -> None:
        """Sort ``done`` and ``failed`` into the order of ``files`` (what is not among them first)."""
        rank = {str(path): i for i, (path, _) in enumerate(files)}
        self.done.sort(key=lambda path: rank.get(path, -1))
        self.failed.sort(key=lambda failure: rank.get(failure[0], -1))

    def report(self, verb: str) -> str:
        lines = [
            f"{verb} {len(self.done)} file(s), {self.clips} clip(s) in {self.seconds:.1f} s "
            f"({self.clips / max(self.seconds, 1e-9):.2f} clips/s)"
            + (f" after {self.checking:.1f} s checking outputs" if self.checking >= CHECKING_SHOWN_AFTER else "")
            + "; "
            + (f"skipped {len(self.skipped)} already complete; " if verb != "evaluated" else "")  # (eval skips none)
            + f"{len(self.failed)} failed"
            + (f"; {self.replaced} token file(s) made otherwise or unreadable replaced (see the manifest)"
               if self.replaced else "")  # fmt: skip
            + (f"; {self.duplicates} duplicate result(s) of retried work dropped" if self.duplicates else "")
        ]
        lines += [f"  {self.limited_by}"] if self.limited_by else []
        lines += [f"  FAILED {escaped(_naming(path, reason))}" for path, reason in self.failed]
        return "\n".join(lines)


def say_stopped(summary: Summary, manifest: Path) -> None:
    """The line a run stopped by an error (not an interrupt) says before it, once every input it did not settle
    is in ``summary`` as not encoded: the files it encoded, failed and left not encoded, and where those are
    listed."""
    notice(f"the run stopped: {len(summary.done):,} file(s) encoded, {len(summary.failed) - summary.not_encoded:,} "
           f"failed, {summary.not_encoded:,} not encoded (listed in {manifest}) and {len(summary.skipped):,} "
           "complete already; the same command goes on from there")  # fmt: skip


def _named(error: BaseException) -> str:
    """``Type: message``, or ``Type`` alone for an error without one (an interrupt)."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def stop_reason(error: BaseException, when: str = "") -> str:
    """The manifest's reason for the inputs a run stopped by ``error`` did not encode: an interrupt as what it was
    (Ctrl-C; SIGTERM: the command's Terminated says so), anything else as its one line."""
    if isinstance(error, KeyboardInterrupt):
        return f"not encoded: the run was interrupted{when} ({interrupt_name(error)})"
    return f"not encoded: the run stopped{when} ({_named(error)})"


def _naming(path: str, reason: str) -> str:
    """``path: reason``, once: most reasons start with their file's name already (``path: ...`` or ``path is
    ...``), as written or with its whitespace squashed (a reason made one line: :func:`_one_line`)."""
    starts = tuple(f"{name}{sep}" for name in {path, " ".join(path.split())} for sep in (": ", " "))
    return reason if reason.startswith(starts) else f"{path}: {reason}"


@dataclass(frozen=True)
class ClipSettings:
    """How videos become clips: pixel grid (T, H, W), latent tokens per clip, sampling fps, tail policy and
    frame sampling ("upstream" frame indices, or "time" for variable frame rate), frame orientation ("stored",
    or "display": turned as the container says to show them), ``clips_per_video``: at most a video's first that
    many clips (None: all). ``prune``: the CPU decoder skips frames no clip uses where that is exact
    (``ClipReader``); False decodes every frame, to measure the gain."""

    grid: tuple[int, int, int]
    tokens: int
    fps: float = 8.0
    tail: str = "drop"
    sampling: str = "upstream"
    decoder: str = "cpu"
    preprocess: str = "auto"
    prune: bool = True
    rotation: str = "stored"
    clips_per_video: int | None = None

    def read_kwargs(self, device: str = "cpu", dtype: torch.dtype | None = None) -> dict:
        """Arguments of ``ClipReader`` / ``stream_videos`` for these settings and a model on ``device`` ("cpu",
        "cuda"): frames preprocessed where ``preprocess`` places them, and on CUDA handed over as I420 where that
        gives the same bytes (``ClipReader``'s ``upload``); clips resized where they are read come scaled in the
        model's ``dtype`` (by the decoding worker, in parallel: not on the thread that drives the model, which
        scaled 8.8 MB of float32 a 20x192x192 clip), or as raw pixels without it."""
        t, h, w = self.grid
        scaled = {"raw": True} if dtype is None else {"raw": False, "dtype": dtype}
        return dict(
            frames=t, height=h, width=w, fps=self.fps, tail=self.tail, sampling=self.sampling, **scaled,
            decoder=self.decoder, preprocess=self.preprocess, device=device, prune=self.prune, rotation=self.rotation,
            upload="i420" if device == "cuda" else "rgb", clips_per_video=self.clips_per_video,
        )  # fmt: skip


def input_pairs(files: Sequence, outputs: bool = True) -> Sequence[tuple[Path, str]]:
    """``files`` as ``(path, output name)`` pairs (:func:`collect_inputs`' result is that already): a path given alone
    is named by its stem, and where any is, two paths of one output name are an error naming both (with
    ``outputs`` False, inputs that write nothing, both are kept)."""
    if all(isinstance(f, tuple) for f in files):
        for path, name in files:
            _check_name(path, name, ".safetensors")
        return files
    pairs = [(Path(f[0]), f[1]) if isinstance(f, tuple) else (Path(f), Path(f).stem) for f in files]
    return _one_per_output(pairs, "inputs", ".safetensors", "encoded", outputs, is_manifest_name)


def check_clip_settings(settings: ClipSettings, model: TiTok, budgets: Sequence[int], token_counts=None) -> None:
    """Refuse, before any file is opened, settings with which no clip could run (each would fail alone): a grid
    that is not a multiple of ``model``'s patch, a token count that is not an integer in range (``token_counts``:
    those a run takes instead of ``settings.tokens``), a clip of more packed rows than the largest of ``budgets``
    (an engine's) holds, or a reading setting (fps, tail, sampling, ...) ``ClipReader`` refuses."""
    def named(i: int) -> str:  # (one clip's settings: no video number to name)
        return "the clip settings"

    ClipReader("", **settings.read_kwargs(model.device.type))  # (opens nothing: its arguments are checked)
    (grid,) = check_grids([settings.grid], 1, model.config.patch_size, named)
    counts = [settings.tokens] if token_counts is None else list(token_counts)
    for tokens in check_token_counts(counts, None, name=named):
        if problem := clip_rows_problem(grid, tokens, model.config.patch_size, budgets):
            raise ValueError(f"grid {list(grid)} with {tokens} tokens: {problem}")


def clip_rows_problem(grid: Sequence[int], tokens: int, patch: Sequence[int], budgets: Sequence[int]) -> str | None:
    """What is wrong with a clip of ``grid`` and ``tokens`` for an engine of ``budgets`` (None: nothing)."""
    rows = tokens + math.prod(patch_grid(tuple(grid), tuple(patch)))
    largest = max(budgets)
    if rows > largest:
        return f"a clip would need {rows} packed rows (tokens + patches); the engine takes at most {largest} per clip"
    return None


class Inputs(list):
    """``(file, output name)`` pairs, and ``unlisted``: ``(folder, reason)`` for each sub-folder of an input folder
    that could not be listed (its files, unknown, are left out: a command counts it as failed)."""

    def __init__(self, pairs: Iterable[tuple[Path, str]], unlisted: list[tuple[str, str]],
                 folders: Sequence[str] = ()):  # fmt: skip
        super().__init__(pairs)
        self.unlisted = unlisted
        self.folders = folders  # the folders the inputs named (given, or in lists), absolute: their files were read


LIST_NAMES = ("stem", "relative")  # how a file named in a list is named: its stem, or its path below the list's folder


def collect_inputs(
    inputs: Sequence[str | os.PathLike], suffix: str = ".safetensors", outputs: bool = True, list_names: str = "stem"
) -> Inputs:
    """Expand files, folders (recursively, following links to folders) and list files into ``(file, output name)``
    pairs.

    Output names keep the folder structure under each input folder; two files that would write the same output are
    an error naming both. A path reached more than once (spelled two ways, or from a folder and a sub-folder of it
    also given) is one input, under the first name it was reached by (a notice says so when the names differ), as is
    one file reached through a link under the same name; a file linked under another name (a dataset's split made of
    links) is an input of its own. A path given here that does not exist is an error (it was typed: a typo should
    stop the run before any work), but a missing file named in a list file is kept as an input, to fail alone ("no
    such file") while the others are encoded: a list of a large dataset may name files deleted since. Relative
    entries of a list are read from the list's own folder; a list that names itself, directly or through another, is
    read once (with a notice). With ``outputs`` False (inputs that write nothing, as eval's), two files of one
    output name are both kept. An output that would lie in a folder named as another output, or as the output
    folder's manifest, is an error too, naming both. A sub-folder that cannot be listed is left out with a notice,
    and said in the result's ``unlisted``. A file named in a list is named by its stem, or with ``list_names``
    "relative" by its path below the list's folder (one outside it is an error), as are then the files of the
    folders and lists it names, below the folder of the list given: a list of a dataset whose folders repeat file
    names (``a/0001.mp4``, ``b/0001.mp4``) keeps them apart, as a folder input does."""
    return _collect(inputs, VIDEO_EXTENSIONS, list_names, ("inputs", suffix, "encoded", outputs, is_manifest_name))


def _collect(
    inputs: Sequence[str | os.PathLike], extensions: frozenset[str] | set[str], list_names: str, outputs: tuple
) -> Inputs:
    """``inputs`` expanded (files of ``extensions`` in folders) and checked one per output (``outputs``: the
    arguments of ``_one_per_output`` after the pairs); where a list's files named by their stems clash and
    ``list_names`` "relative" would tell them apart, the error says so."""
    if list_names not in LIST_NAMES:
        raise ValueError(f"list_names must be one of {LIST_NAMES}; got {list_names!r}")
    unlisted: list[tuple[str, str]] = []
    reach = _Reach()
    pairs = _expand(inputs, (), unlisted, extensions, list_names, reach=reach)
    try:
        return Inputs(_one_per_output(pairs, *outputs), unlisted, sorted(set(reach.folders)))
    except InputError as e:
        if list_names != "stem" or "would both write" not in str(e) or not _relative_helps(inputs, extensions,
                                                                                           outputs):  # fmt: skip
            raise
        raise InputError(f"{e} (or name the files of a list by their path below its folder: --list-names "
                         "relative)") from None  # fmt: skip


def _relative_helps(inputs: Sequence[str | os.PathLike], extensions: frozenset[str] | set[str], outputs: tuple) -> bool:
    """Whether ``inputs``, whose files clash by name, clash no more with ``list_names`` "relative" (looked at
    again, only where they clash: a list's entries are read twice)."""
    if not any(Path(i).suffix.lower() in LIST_EXTENSIONS for i in inputs):
        return False
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # (its notices were said the first time)
            _one_per_output(_expand(inputs, (), [], extensions, "relative", reach=_Reach()), *outputs)
    except InputError:
        return False
    return True


RENAMED_SAID = 3  # inputs reached again under another name, each said in a line of its own; the rest counted


def _check_name(path: object, name: str, suffix: str) -> None:
    """An InputError where the output name ``name`` of ``path`` leads out of the output folder (absolute, or
    through a ``..``): whatever a list names or a caller gives, nothing is written, moved or removed elsewhere."""
    full = name + suffix  # (a file "...mp4" is named "..": its "...safetensors" is in the folder)
    if full.startswith("/") or (".." in full and ".." in full.split("/")):
        raise InputError(f"{path}: its output name {full!r} leads out of the output folder; expected a path "
                         "below it")  # fmt: skip


def _one_per_output(
    pairs: Iterable[tuple[Any, str]],
    what: str,
    suffix: str,
    verb: str,
    outputs: bool = True,
    own_file: Callable[[str], bool] = lambda name: False,
) -> list[tuple[Any, str]]:
    """``(path, output name)`` pairs, each path and each output once: a path seen again (by its absolute
    spelling, no system call: a million inputs add no start-up time) keeps its first name, with a notice when the
    names differ, and the same file reached through a link under the same name is dropped too; two files for one
    output are an InputError naming both (``what`` they are; with ``outputs`` False, both are kept); ``verb`` says
    what is done with each once. With ``outputs``, an output in a folder that another output, or a file of the
    output folder's own (``own_file``: its name at the top, as the manifest), would be is an InputError too, as is a
    name that leads out of the output folder (absolute, or through a ``..``)."""
    owners: dict[str, Any] = {}  # output name -> its file
    names: dict[str, str] = {}  # a path, absolute -> its output name
    kept, clashes, first_clashes, renamed = [], 0, [], 0
    for path, name in pairs:
        _check_name(path, name, suffix)
        spelled = absolute(path)
        if spelled in names:
            if names[spelled] != name:
                renamed += 1
                if renamed <= RENAMED_SAID:
                    notice(f"{path}: reached again (as {name}); {verb} once, as {names[spelled]}")
            continue
        if name in owners:
            if os.path.realpath(owners[name]) == os.path.realpath(path):  # one file, through a link, one name
                continue
            if outputs:
                clashes += 1
                if len(first_clashes) < 2:
                    first_clashes.append(f"{what} {owners[name]} and {path} would both write {name}{suffix}")
                names[spelled] = name  # (reached again: not a clash again)
                continue
        names[spelled] = name
        owners.setdefault(name, path)
        kept.append((path, name))
    if renamed > RENAMED_SAID:  # (a folder given with its sub-folder, of a million files: a line, not a million)
        notice(f"... and {renamed - RENAMED_SAID:,} more input(s) reached again under another name; each {verb} once, "
               "as first named")  # fmt: skip
    if clashes:  # all of them at once: a dataset of many such pairs is not found out one run at a time
        more = f" (and {clashes - 1} more such pair(s), the next: {first_clashes[1]})" if clashes > 1 else ""
        raise InputError(f"{first_clashes[0]}; rename one{more}")
    if outputs:
        _check_folders(kept, {name + suffix: path for name, path in owners.items()}, what, suffix, own_file)
    return kept


def _check_folders(
    kept: list[tuple[Any, str]], files: dict[str, Any], what: str, suffix: str, own_file: Callable[[str], bool]
) -> None:
    """An InputError where an output of ``kept`` would lie in a folder that is a file: another's output (``files``:
    output file name -> its input) or the output folder's own (``own_file``). Otherwise the clash fails at write
    time, after the run has encoded the input."""
    for path, name in kept:
        parts = name.split("/")
        for folder in folders_above(name):
            if folder in files:
                raise InputError(f"{what} {files[folder]} and {path} clash: {path} would write {name}{suffix} in a "
                                 f"folder {folder}, which is {files[folder]}'s output file; rename one")  # fmt: skip
        if len(parts) > 1 and own_file(parts[0]):
            raise InputError(f"{what.rstrip('s')} {path} would write {name}{suffix} in a folder {parts[0]}, which is "
                             "the output folder's own file; rename its folder")  # fmt: skip


def folders_above(name: str) -> Iterator[str]:
    """The folders above the output name ``name`` (``a/b/c``: ``a``, ``a/b``), each made from the one before (a
    name a million folders deep is read once, not once a folder)."""
    folder = ""
    for part in name.split("/")[:-1]:
        folder = f"{folder}/{part}" if folder else part
        yield folder


MAX_REACHED = 10_000_000  # files the inputs of one run may name, each time a list or folder names one
MAX_LIST_DEPTH = 64  # lists naming lists: how deep


class _Reach:
    """What :func:`_expand` has done so far in one expansion: the lists and folders it read (each is read once: a
    second reach, by the same spelling under the same list given, would add the same pairs again), and how many
    files they named. A stranger's lists of a few kilobytes that name one another a thousand times each would
    otherwise name a billion files."""

    def __init__(self):
        self.read: set[tuple[str, Path | None]] = set()
        self.folders: list[str] = []  # the folders read, absolute
        self.count = 0

    def first(self, path: Path, top: Path | None, folder: bool = False) -> bool:
        """Whether ``path`` (a list or folder: ``folder``) is reached here for the first time under ``top``."""
        key = (absolute(path), top)
        if key in self.read:
            return False
        self.read.add(key)
        self.folders += [key[0]] if folder else []
        return True

    def add(self, found: list, pairs: list, where: Path) -> None:
        """``pairs`` added to ``found``, within :data:`MAX_REACHED`."""
        self.count += len(pairs)
        if self.count > MAX_REACHED:
            raise InputError(f"the inputs name more than {MAX_REACHED:,} files (passed in {str(where)!r}, counting "
                             "each time a list or folder names one); split them into several runs")  # fmt: skip
        found += pairs


def _expand(inputs: Iterable[str | os.PathLike], lists: tuple[str, ...], unlisted: list[tuple[str, str]],
            extensions: frozenset[str] | set[str] = VIDEO_EXTENSIONS, list_names: str = "stem",
            top: Path | None = None, *, reach: _Reach) -> list[tuple[Path, str]]:  # fmt: skip
    """``collect_inputs``' pairs, every reach of a file included but a list or folder read once; ``lists``: the
    list files being read (real paths), which a list must not name again; sub-folders that cannot be listed go to
    ``unlisted``; in folders, the files of ``extensions`` are the inputs; ``list_names``: see ``collect_inputs``;
    ``top``: the list given as an input that ``inputs`` were named in (directly or through other lists), whose
    folder ``list_names`` "relative" names them from; ``reach``: the expansion's bounds (:class:`_Reach`)."""
    found: list[tuple[Path, str]] = []
    relative = list_names == "relative" and top is not None
    for item in inputs:
        if (split := split_member(item)) is not None and not split[1].strip("/"):  # an archive named with a "/"
            item = split[0]  # after it: the archive itself
        elif split is not None:  # a file inside an archive (a video, a token file), named by its path through it
            member = Path(item)
            if top is None:  # given on the command line: one that is not there stops the run, as a missing file does
                try:
                    member_of(member)
                except OSError as e:
                    raise InputError(f"input {str(item)!r}: {e}") from None
            reach.add(found, [(member, _below(member, top, member) if relative else member.stem)], member)
            continue
        path = _input_path(item)
        if path.is_dir():
            if reach.first(path, top, folder=True):
                pairs = []
                for p in _files_below(path, extensions | ARCHIVE_EXTENSIONS, unlisted):
                    name = _below(p, top, path) if relative else str(p.relative_to(path).with_suffix(""))
                    if is_archive(p):
                        pairs += _archive_pairs(p, name, extensions, unlisted, found=True)
                    else:
                        pairs.append((p, name))
                reach.add(found, pairs, path)
        elif path.is_file() and is_archive(path):
            if reach.first(path, top):
                name = _below(path, top, path) if relative else path.stem
                reach.add(found, _archive_pairs(path, name, extensions, unlisted, given=top is None), path)
        elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
            real = os.path.realpath(path)
            if real in lists:
                notice(f"{path}: a list that names itself, directly or through another; not read again")
                continue
            if len(lists) >= MAX_LIST_DEPTH:
                raise InputError(f"list {str(path)!r} is nested more than {MAX_LIST_DEPTH} lists deep (a list that "
                                 f"names a list that names ...); expected at most {MAX_LIST_DEPTH}")  # fmt: skip
            if not reach.first(path, top):
                continue
            entries = _listed(path)
            threads = _threads_for(path, entries[0]) if entries else 0
            for entry, listed in zip(entries, _ahead(_lists_more, entries, threads), strict=True):
                if listed:
                    found += _expand([entry], (*lists, real), unlisted, extensions, list_names, top or path,
                                     reach=reach)  # fmt: skip
                elif list_names == "stem":
                    reach.add(found, [(entry, entry.stem)], path)
                else:
                    reach.add(found, [(entry, _below(entry, top or path, path))], path)
        elif path.is_file():
            reach.add(found, [(path, path.stem)], path)
        elif path.exists():  # a device, a named pipe, a socket
            raise InputError(f"input {str(item)!r} is not a regular file or a folder")
        else:
            raise InputError(f"input {str(item)!r} does not exist")
    return found


def _archive_pairs(archive: Path, name: str, extensions: frozenset[str] | set[str], unlisted: list[tuple[str, str]],
                   given: bool = False, found: bool = False) -> list[tuple[Path, str]]:  # fmt: skip
    """The files of ``extensions`` in the tar archive ``archive``, as (their path through it, ``name``/their name in
    it without its suffix) pairs: an archive stands for a folder of its name without the suffix. One that cannot be
    listed (compressed, not an archive, unreadable) is an InputError where it was ``given`` on the command line,
    else put in ``unlisted`` with the reason; one cut short (an unfinished write or copy) gives the files before
    the cut, and is put in ``unlisted`` (a rerun reads the rest). Members that are not regular files, or are named
    outside the archive, are left out with a notice. Token files: an archive ``found`` in a folder (beside token
    files, a folder may hold archives of videos or backups) that cannot be listed, holds none or is cut short before
    any, is passed over with a notice, not put in ``unlisted``."""
    lenient = found and VIDEO_EXTENSIONS.isdisjoint(extensions)
    try:
        listing = list_archive(os.fspath(archive))
    except OSError as e:
        reason = str(e) if isinstance(e, ArchiveError) else f"cannot be read ({e.strerror or e})"
        if given:
            raise InputError(f"input {str(archive)!r}: {reason}") from None
        notice(f"{archive}: {reason}; {'passed over' if lenient else 'left out'}")
        unlisted += [] if lenient else [(str(archive), reason)]
        return []
    for member, why in listing.left_out:
        if split_suffix(member)[1].lower() in extensions:
            notice(f"{archive}: {why}")
    pairs = []
    for member in listing.members:
        stem, suffix = split_suffix(member)
        if suffix.lower() in extensions:
            pairs.append((archive / member, f"{name}/{stem}"))
    if listing.cut and lenient and not pairs:
        notice(f"{archive}: {ARCHIVE_CUT}: {listing.cut}, before any token file; passed over")
    elif lenient and not pairs:  # (a shard of videos, a backup of other files)
        notice(f"{archive}: no token file in it; passed over")
    elif listing.cut:
        notice(f"{archive}: {ARCHIVE_CUT}: {listing.cut}; the files before the cut are read")
        unlisted.append((str(archive), f"{ARCHIVE_CUT}: {listing.cut}"))
    return pairs


def _below(entry: Path, top: Path, through: Path) -> str:
    """The output name of ``entry``, reached from the list ``top`` (given as an input) through ``through`` (that
    list, another list it names or a folder), by its path below ``top``'s folder (as written; where it holds
    ``..``, as the system reads it: ``link/../x.mp4`` is the ``x.mp4`` beside the link's target), its suffix
    dropped; an archive's member by its archive's such name (its folder), then its own."""
    via = "" if through == top else f" (through {str(through)!r})"
    if (split := split_member(entry)) is not None:
        member = posixpath.normpath(split[1].lstrip("/"))  # (as archives.member_of reads it)
        if member == ".." or member.startswith("../"):  # (a member of no archive: one named so is left out)
            raise InputError(f"list {str(top)!r} names {str(entry)!r}{via}, a path out of the archive {split[0]!r}; "
                             "expected the path of a file inside it")  # fmt: skip
        return f"{_below(Path(split[0]), top, through)}/{split_suffix(member)[0]}"
    below = os.path.relpath(entry, top.parent)
    if ".." in entry.parts:  # (files.absolute: the path up to its last .. resolved, as the file is read)
        below = os.path.relpath(absolute(entry), os.path.realpath(top.parent))
    if below == ".." or below.startswith(("../", "/")):
        raise InputError(f"list {str(top)!r} names {str(entry)!r}{via}, outside the list's folder: --list-names "
                         "relative names a file by its path below it (put the list at the dataset's top)")  # fmt: skip
    return str(Path(below).with_suffix(""))


def _lists_more(entries: Sequence[Path]) -> list[bool]:
    """Whether each entry of a list file is a folder or another list (else a file to encode: one that is missing,
    has a name too long or lies in a folder that cannot be searched fails alone, and reading it says why)."""
    kinds = []
    for entry in entries:
        try:
            mode = os.stat(entry).st_mode
        except OSError:
            mode = 0
        kinds.append(stat.S_ISDIR(mode) or (stat.S_ISREG(mode) and (entry.suffix.lower() in LIST_EXTENSIONS
                                                                  or is_archive(entry))))  # fmt: skip
    return kinds


def _listed(listing: Path) -> list[Path]:
    """The entries of a list file, one path a line, relative ones from the list's folder; blank lines and lines
    starting with # are passed over. Paths are bytes on Linux: a line that is not UTF-8 is kept as the bytes it
    holds (as ``os.fsdecode`` does), and a UTF-8 byte order mark (a list saved by Windows Notepad) is dropped."""
    entries = []
    try:
        with open(listing, "rb") as file:  # line by line: a file of one endless line holds no path
            for number, line in enumerate(iter(functools.partial(file.readline, MAX_LIST_LINE + 1), b""), 1):
                if len(line) > MAX_LIST_LINE:
                    raise InputError(f"list {str(listing)!r}: line {number} is longer than {MAX_LIST_LINE} bytes; "
                                     "expected one path a line")  # fmt: skip
                if b"\0" in line:  # in no path: not a list of paths (a binary file named .txt)
                    raise InputError(f"list {str(listing)!r}: line {number} holds a NUL byte; expected one path a line")
                line = line.removeprefix(b"\xef\xbb\xbf") if number == 1 else line
                for part in line.splitlines():  # (a bare CR ends a line too)
                    text = os.fsdecode(part.strip())
                    if text and not text.startswith("#"):
                        entries.append(listing.parent / text)
    except OSError as e:
        raise InputError(f"list {str(listing)!r} cannot be read: {e.strerror or e}") from None
    return entries


MAX_LIST_LINE = 8192  # bytes, line end included: a path is at most 4096 (PATH_MAX), and its line a little more


def select_shard(files: Sequence[tuple[Path, str]], index: int, count: int) -> list[tuple[Path, str]]:
    """The inputs of shard ``index`` of ``count`` (0-based): those whose output name hashes (SHA-256) to
    ``index`` modulo ``count``. The shards of one input list are disjoint and cover it, and an input's shard
    depends on its output name alone, not on the other inputs or their order, so separate runs (one per GPU or
    machine, each given the same inputs) split a dataset without talking to each other, and an input added later
    goes to one shard only."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: expected 0 <= index < count")

    def shard(name: str) -> int:
        return int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()[:8], "big") % count

    return [(path, name) for path, name in files if shard(name) == index]


def take_shard(files: Sequence[tuple[Path, str]], shard: tuple[int, int] | None) -> list[tuple[Path, str]]:
    """The inputs a job encodes: those of ``shard`` ``(index, count)`` (:func:`select_shard`), saying on stderr
    how many of all they are, or all of them for None."""
    if shard is None:
        return list(files)
    mine = select_shard(files, *shard)
    notice(f"shard {shard[0]}/{shard[1]}: {len(mine)} of {len(files)} inputs")
    return mine


TOKEN_EXTENSIONS = frozenset({".safetensors"})
FSCK_FOLDER = "lost+found"  # a file system's own folder at its root (a mount point), never a dataset's: not listed


def _files_below(folder: Path, extensions: frozenset[str] | set[str], unlisted: list[tuple[str, str]]) -> list[Path]:
    """The files under ``folder`` whose names end (in any case) in one of ``extensions``, sorted. Links to folders
    are followed (a dataset is often assembled from links), each folder once: a link to a folder already listed (a
    cycle, or a second way in) is passed over with a notice, as is a sub-folder that cannot be listed (also put in
    ``unlisted``, with the reason); a file system's own ``lost+found``, at its root, is not listed. A link with
    such a name that leads nowhere (or cannot be followed) is one of them: reading it fails it alone, counted with
    the run's failures."""
    files, seen, stack = [], {}, [folder]  # seen: (device, inode) -> the path the folder was listed by
    while stack:
        current = stack.pop()
        try:
            st = current.stat()
            if (first := seen.get((st.st_dev, st.st_ino))) is not None:
                notice(f"{current}: the same folder as {first}, listed already (a link leads to one of them)")
                continue
            seen[(st.st_dev, st.st_ino)] = current
            entries = sorted(os.scandir(current), key=lambda e: e.name, reverse=True)  # so popped in name order
        except OSError as e:
            if current == folder:
                raise InputError(f"input folder {str(folder)!r} cannot be listed: {e.strerror or e}") from None
            notice(f"{current}: cannot be listed ({e.strerror or e}); left out")
            unlisted.append((str(current), f"cannot be listed ({e.strerror or e})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir():  # False, like is_file, for a link that leads nowhere
                    if entry.name != FSCK_FOLDER or not os.path.ismount(os.path.realpath(current)):  # (a file
                        stack.append(path)  # system's own, at its root (also through a link to it), is root's
                        # alone: counted unlisted, it failed every run)
                elif entry.is_file() and path.suffix.lower() in extensions:
                    files.append(path)
                elif entry.is_symlink() and path.suffix.lower() in extensions and not path.exists():
                    files.append(path)  # a video of the dataset gone: it fails alone, counted, when read
                elif path.suffix.lower() in extensions:  # a named pipe, a device, a socket
                    notice(f"{path}: not a regular file (a pipe or device); left out")
            except OSError:  # a link whose target may not be looked at (a loop of links, a folder not searchable)
                if path.suffix.lower() in extensions:
                    files.append(path)  # (as a link that leads nowhere)
    return sorted(files)


LOG_SECONDS = 60.0  # where stderr is not a terminal (a batch job's log): a progress line this often, none before


class _LogLines(tqdm):
    """Progress as a line every LOG_SECONDS, for a stderr that is not a terminal (a batch job's log), where a bar
    is not drawn at all: a job of hours showed nothing until its summary. A run shorter than that writes none."""

    def __init__(self, *args, **kwargs):
        self._logged = time.monotonic()
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        now = time.monotonic()
        if msg == "" or now - self._logged < LOG_SECONDS:  # ("": the bar cleared at its end; the log keeps lines)
            return False
        self._logged = now
        self.fp.write((self.format_meter(**self.format_dict) if msg is None else msg) + "\n")
        self.fp.flush()
        return True


def _progress(total: int | None = None, unit: str = "file", iterable: Iterable | None = None, doing: str = "",
              delay: float = 0.0) -> tqdm:  # fmt: skip
    """The progress of a command over ``total`` items (or ``iterable``'s), ``doing`` what (a stage before the work,
    as "checking outputs"): a bar on a terminal (shown once ``delay`` seconds have passed), else a line a minute
    (:class:`_LogLines`)."""
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, desc=doing or None,
                    delay=delay)  # fmt: skip
    # the rate since the start (smoothing 0): files end in bursts (a batch's clips come back together), and a moving
    # average of the gaps within and between bursts said "about 1:10:33 left", then "01:39", for 7 minutes left
    return _LogLines(iterable, total=total, unit=unit, file=sys.stderr, leave=False, mininterval=0,  # (its own)
                     smoothing=0, desc=doing, bar_format=f"{'{desc}: ' if doing else ''}{{n_fmt}}/{{total_fmt}} "
                     "{unit}s done in {elapsed}, about {remaining} left{postfix}")  # fmt: skip


def decoder_here(settings: ClipSettings) -> ClipSettings:
    """``settings`` with the decoder this machine has: ``--decoder nvdec`` where NVDEC cannot decode anything here
    (no CUDA device, no PyNvVideoCodec) is the CPU decoder, said once, and recorded so in the token files (a file
    NVDEC cannot take, by its codec or format, still falls back alone, recorded as made with NVDEC asked for). Else
    a run without NVDEC recorded "nvdec" on every file, and a later run that has NVDEC kept those CPU-decoded files
    beside its own."""
    if settings.decoder == "nvdec" and (missing := nvdec_unavailable()) is not None:
        notice(f"--decoder nvdec: NVDEC cannot decode here ({missing}); every file is decoded on the CPU, and its "
               "token file says so")  # fmt: skip
        return replace(settings, decoder="cpu")
    return settings


def encode_files(
    model: TiTok,
    engine: Engine,
    files: Sequence[tuple[Path, str] | str | os.PathLike],
    outdir: str | os.PathLike,
    settings: ClipSettings,
    *,
    workers: int | None = None,
    worker_kind: str = "auto",
    read_ahead: int = 8,
    overwrite: bool = False,
    stall_seconds: float | None = STALL_SECONDS,
    shard: tuple[int, int] | None = None,
) -> Summary:
    """Encode every video into ``outdir/<name>.safetensors``; finished outputs are skipped unless ``overwrite``.
    ``files``: :func:`collect_inputs`' pairs, or paths (each named by its stem). With ``shard`` ``(index, count)``,
    only the inputs of that shard (:func:`select_shard`), listed in a manifest of the shard's own
    (:func:`~titok_fast.manifest.manifest_name`).

    Clips stream from the video decoders (``workers`` threads or processes, ``worker_kind``, by default one per
    core, and "auto": :func:`~titok_fast.video.worker_kind_for` by the first file's frame size; taken from whichever
    file has one ready, :func:`~titok_fast.video.interleaved_videos`: up to ``2 * workers`` files open, each at most
    ``read_ahead`` decoded clips ahead, fewer for clips kept at source size) through ``engine.encode_stream``, so
    memory does not grow with a video's length and the GPU never waits for a whole file. Frames are preprocessed
    where ``settings.preprocess`` places them (on the model's device: batched per clip, overlapped with the model).
    A file's token file is written as soon as all its clips are back; a file that fails (reading, or encoding after
    retrying its clips one by one) is reported, the rest go on, as does one whose decoder gives no clip for
    ``stall_seconds`` (None: wait for ever; its stuck worker is replaced). The progress bar shows clips/s and
    whether decoding or the model limits the run.
    """
    if engine.model is not model:  # (the tokens are the engine's model's; the records, resume included, model's)
        raise ValueError("the engine runs another model than the one given: encode_files(model, Engine(model), ...)")
    check_clip_settings(settings, model, engine.budgets)
    workers = workers or default_workers()
    outdir = Path(outdir)
    files = take_shard(input_pairs(files), shard)
    check_inputs_apart(files, outdir, shard)
    settings = decoder_here(settings)
    summary = Summary()
    start = time.perf_counter()
    with Manifest(outdir / manifest_name(shard), summary) as manifest:
        todo = plan_outputs(model, engine.mode, files, outdir, settings, manifest, overwrite=overwrite)
        if worker_kind == "auto":  # (by the first file to read)
            worker_kind = auto_worker_kind(workers, settings.decoder, [p for p, _ in todo[:1]])
        encoding = time.perf_counter()  # (clips/s and what limits the run: from here, not from checking outputs)
        summary.checking = encoding - start
        writes = Writes(write_threads_for(outdir))
        job = _EncodeJob(model, engine.mode, settings, manifest, _progress(len(todo), "file"), encoding, writes)
        job.limits.workers, job.limits.worker_kind = workers, worker_kind
        on_cuda = model.device.type == "cuda"  # clips that may hold source-size frames are held fewer at a time
        source_size = settings.decoder == "nvdec" or settings.preprocess == "device" or on_cuda
        files_read = interleaved_videos(
            [p for p, _ in todo], workers=workers, idle_seconds=IDLE_SECONDS, worker_kind=worker_kind,
            stall_seconds=stall_seconds, on_start=job.limits.started,
            capacity=min(read_ahead, SOURCE_SIZE_READ_AHEAD) if source_size else read_ahead,
            **settings.read_kwargs(model.device.type, model.dtype),
        )  # fmt: skip
        stopped, error = "not encoded", None
        try:
            with contextlib.closing(files_read), job.bar:
                items = job.clips(files_read, dict(todo))
                for key, (_, indices) in encode_resiliently(engine, items, job.clip_failed, host=True):
                    job.add(key, indices)
                if job.unshown or job.limits.clips:  # (a run with nothing left to do started no decoder)
                    job.show()
                writes.close()
        except BaseException as e:
            stopped, error = stop_reason(e), e
            with contextlib.suppress(Exception):  # (the run stops for e already)
                writes.close()  # what was handed over is written, and said, before the rest is listed
            raise
        finally:
            settled = {*summary.done, *(path for path, _ in summary.failed)}  # a set: a lookup per file to do
            with interrupts_held():  # a second Ctrl-C (or SIGTERM after one) waits for the list to be complete
                left = ((path, out) for path, out in todo if str(path) not in settled)
                manifest.list_not_encoded(left, stopped, stopping=error is not None)
            if isinstance(error, Exception):  # (an interrupt is said in one line: the command's)
                say_stopped(summary, manifest.path)
    summary.in_order_of(files)  # files end in any order: said in the inputs' order
    summary.seconds = time.perf_counter() - encoding
    summary.limited_by = job.limits.describe().split(", ", 1)[1] if job.limits.clips else ""
    summary.waited = job.limits.waited
    return summary


def plan_outputs(
    model: TiTok,
    mode: str,
    files: Sequence[tuple[Path, str]],
    outdir: Path,
    settings: ClipSettings,
    manifest: Manifest,
    *,
    overwrite: bool = False,
    device: str | None = None,
) -> list[tuple[Path, Path]]:
    """``(file, token file)`` for every input still to encode; those already complete from the same source for
    these weights, settings and way of making them (engine ``mode``, the model's device or ``device``) go to the
    manifest as skipped (unless ``overwrite``). A token file to redo that was made otherwise goes to the manifest
    as outdated, with what differs: replacing it, or moving it aside if its input fails, is said. Temporary files
    that a killed run left beside a token file are removed. Gives the model its weights digest if unset.
    Stopped midway (checking a large dataset's outputs takes minutes), it lists the inputs it found to do as not
    encoded before it lets the interrupt go on, as the run does with those it has not settled; those it had not
    checked yet keep the latest line they had (their token files may be complete)."""
    if model.weights_digest is None:  # token files must name their weights
        model.weights_digest = weights_digest(model.state_dict())
    todo, wanted = [], _wanted(model, mode, settings, device)
    renamed: list | None = None  # inputs complete under another output name, and the first of them
    earlier: list | None = None  # token files kept that an earlier reader made, and the first of them
    temporaries: dict[Path, dict[str, list[str]]] = {}  # output folder -> its temporaries and files set aside
    inputs: dict[str, Path] | None = None  # this job's inputs (absolute) -> token files, made when first needed
    if not overwrite:
        manifest.read_settled()
    outputs = [(path, outdir / f"{name}.safetensors") for path, name in files]
    folders: dict[Path, str] = {}  # output folder -> why nothing can be written there ("" if nothing is known)
    fetched = _ahead(functools.partial(_fetch_chunk, folders=folders), outputs,
                     _threads_for(outdir, outputs[0][0]) if outputs else 0)  # fmt: skip
    bar = _progress(len(outputs), "file", doing="checking outputs", delay=CHECKING_SHOWN_AFTER)  # (a resumed
    # large job's: minutes of nothing else)
    try:
        for (path, out), found in zip(outputs, fetched, strict=True):
            bar.update(1)
            try:
                # which file it is, taken before it is read (not looked at where nothing is there)
                entry = found.entry if found.data is not None else None if found.absent else file_entry(out)
                done = None if found.absent else _parsed(out, found)
                stamp = found.source_stamp  # the source's, taken once for the token file and for its absence
                if stamp is None and done is not None:
                    stamp = source_stamp(path)
                why = None if found.absent else _redo_reason(done, out, path, wanted, stamp)
                if why is None and not overwrite and (restored := _restore_aside(temporaries, out, path, wanted)):
                    why, done = "", restored
            except OSError as e:
                if e.errno not in THIS_PATH_ONLY:  # a file system gone (EIO, ESTALE): no input's fault, the run stops
                    raise
                with interrupts_held():
                    manifest.failed(path, out, f"cannot check its token file {out}: {e.strerror or e}")
                continue
            if found.unwritable:
                with interrupts_held():  # (before its video is read and encoded for nothing)
                    manifest.failed(path, out, f"cannot write {out}: {found.unwritable}")
                continue
            with interrupts_held():  # an input is listed as skipped or is to do, never both nor neither
                if why == NOT_A_TOKEN_FILE and (refused := _not_a_token_file(out, overwrite)):  # (a user's file is
                    manifest.failed(path, out, refused)  # never replaced without being asked)
                    continue
                gone = why == "" and (stamp if stamp is not None else source_stamp(path)) == ""
                if why == "" and not overwrite and not gone:  # (a source gone fails alone, its token file kept)
                    manifest.skipped(path, out)
                    if done is not None and _earlier_reader(done):
                        earlier = earlier or [0, out]
                        earlier[0] += 1
                else:
                    todo.append((path, out))
                    manifest.planned(out, entry)
                    if why is None and manifest.done_as_other(path, out):  # (nothing there: named otherwise now)
                        renamed = renamed or [0, path]
                        renamed[0] += 1
                    if why:  # a token file of another video of this output name: its source is displaced
                        other = done.source if done is not None and _other_source(done.source, path) else None
                        if other is not None:  # unless it is an input of this job with a token file of its own
                            if inputs is None:
                                inputs = {absolute(p): outdir / f"{n}.safetensors" for p, n in files}
                            if inputs.get(other, out) != out:
                                other = None
                        manifest.outdated(path, out, why, other, entry)
            _remove_temporaries(temporaries, out)  # beside a complete one too (a killed --overwrite run's)
        _remove_other_temporaries(temporaries)
        if renamed:  # (a job resumed over a list of the files a folder's run encoded: all of them again)
            notice(f"{renamed[0]} input(s) this folder's manifest says were encoded as other token files (such as "
                   f"{renamed[1]}) are encoded again under the names given now: a list names a file by its stem, a "
                   "folder by its path under it; give the inputs as before to keep those token files")  # fmt: skip
        if earlier:
            notice(f"{earlier[0]} token file(s) kept (such as {earlier[1]}) were made by a reader earlier than this "
                   f"version's ({READER}), whose fixes since give other clips for some damaged, cut-short or "
                   "resampled files (README, Clips); --overwrite redoes the files it is given, these among "
                   "them")  # fmt: skip
    except BaseException as e:
        with interrupts_held():  # a second interrupt waits for the list to be complete
            manifest.list_not_encoded(todo, stop_reason(e, " while checking outputs"))
        raise
    finally:
        fetched.close()
        bar.close()
        manifest.forget_settled()
    return todo


def _earlier_reader(done: TokenFile) -> bool:
    """Whether ``done`` was made by a reader earlier than this version's (video.READER; files made before readers
    were recorded included), so that a fix since may give its source other clips."""
    reader = done.made_with.get("reader")
    return not isinstance(reader, str) or reader < READER  # (days as YYYY-MM-DD: their order is the strings')


CHECKING_SHOWN_AFTER = 2.0  # seconds: checking the outputs of a run that takes less shows no bar


def _unwritable_folder(folder: Path, known: dict[Path, str]) -> str:
    """Why no token file can be written in ``folder``: it, or the folder above it that is to be made with it, is a
    link that leads nowhere (a disk not mounted), which making the folders would fail on with a bare "File exists";
    "" where nothing is known against it. Each path is looked at once (``known``: shared by the threads reading
    ahead, which may look at one twice): a folder that is there costs one look, one to be made two, and one of a
    run's last looks none."""
    chain, path = [], folder
    while path not in known:
        if os.path.isdir(path):  # (where its links lead)
            known[path] = ""
        elif os.path.islink(path):
            known[path] = "" if os.path.exists(path) else f"{path} is a link that leads nowhere ({os.readlink(path)})"
        elif path.parent != path:
            chain.append(path)  # to be made: as the folder above it is
            path = path.parent
            continue
        else:
            known[path] = ""
    for below in chain:
        known[below] = known[path]
    return known[path]


# A resume reads every token file of the job (plan_outputs), and a list file's entries are looked at one by one
# (collect_inputs). On a network file system each such look waits on round trips to the server (open, read, stat):
# milliseconds per file, an hour or more for a million files one at a time. There threads look ahead, FETCH_CHUNK
# files at a time, and the run's thread uses what they found (parsing token files holds the GIL) as it comes to it.
# On a local one the run's thread looks itself: there the threads' wake-ups and the GIL's hand-overs would cost
# more than they save (RESULTS.md, "resuming a large job").
FETCH_THREADS = 16
FETCH_CHUNK = 16  # files a thread reads in a row
FETCH_AHEAD = 2 * FETCH_THREADS  # chunks read or being read ahead of the one the run is at
FETCH_CHUNK_BYTES = 4 << 20  # token files read ahead per chunk; the rest of a chunk is read when the run comes to it


class Writes:
    """Token files written (each with its manifest line) as their last clip comes back, by ``threads`` threads
    (:func:`write_threads_for`: many where the output folder is on a network file system, where each file's write
    is many round trips and a sync on the server, tens of milliseconds, which would leave the model waiting; one
    on a local disk, whose syncs would too), or by the run's thread (``threads`` 0).

    At most 2 x ``threads`` writes are under way or waiting: handing over one more first waits for the oldest. A
    write that raises (a full disk: the run stops) is raised on the run's thread when it is the oldest at a
    hand-over, or at :meth:`close`, which waits for every write handed over (an interrupted run's too: those files
    are written, and their manifest lines say so)."""

    def __init__(self, threads: int):
        self.pool = None if not threads else concurrent.futures.ThreadPoolExecutor(threads, "titok-fast-write")
        self.most = 2 * threads
        self.pending: collections.deque[concurrent.futures.Future] = collections.deque()
        self.lock = threading.Lock()
        self.unwritten_in_a_row = 0  # token files that could not be written (CannotWrite), with none written since

    def __call__(self, write: Callable[[], str | None]) -> None:
        """Hand over ``write`` (:func:`write_recorded`, bound): it returns its file's reason for failing, or None."""
        if self.pool is None:
            self._counted(write)
            return
        while self.pending and (self.pending[0].done() or len(self.pending) >= self.most):
            oldest = self.pending[0]
            try:
                oldest.result()  # its error, or an interrupt while waiting (then close waits for it)
            finally:
                if oldest.done():
                    self.pending.popleft()
        self.pending.append(self.pool.submit(self._counted, write))

    def _counted(self, write: Callable[[], str | None]) -> None:
        """Run ``write``; GIVE_UP_AFTER token files in a row that could not be written (an I/O error, permissions
        taken away) say the fault is the output folder's, not each file's: the run stops (a full disk stops it at
        the first, :func:`write_token_file`)."""
        error = write()
        if error is None or isinstance(error, CannotWrite):
            with self.lock:
                self.unwritten_in_a_row = self.unwritten_in_a_row + 1 if error else 0
                if self.unwritten_in_a_row >= GIVE_UP_AFTER:
                    raise OSError(f"{error}; {self.unwritten_in_a_row} token files in a row could not be written: "
                                  "the run stops")  # fmt: skip

    def close(self) -> None:
        """Wait for every write handed over; raise the first error among them. Closing again does nothing."""
        if self.pool is None:
            return
        error = None
        try:
            with interrupts_held():  # what was handed over is written whole, manifest lines included
                while self.pending:
                    try:
                        self.pending.popleft().result()
                    except Exception as e:
                        error = error or e
        finally:
            self.pool.shutdown()  # (an interrupt that was not held: the writes under way still end first)
            self.pool = None
        if error is not None:
            raise error


@dataclass
class _Fetched:
    """What reading ahead found of one token file: ``absent`` (nothing under its name; ``unwritable``: why none can
    be written there, or ""), else its bytes (None: to be read and looked at when the run comes to it) and its
    source's stamp (None: not looked at)."""

    absent: bool = False
    unwritable: str = ""
    data: bytes | None = None
    source_stamp: str | None = None
    entry: tuple[int, int, int, int] | None = None  # which file ``data`` was read from (taken before reading it)


def _ahead(work: Callable[[Sequence], list], items: Sequence, threads: int) -> Iterator:
    """``work(chunk)``'s results for each FETCH_CHUNK ``items`` in a row, in order, worked out by ``threads``
    threads at most FETCH_AHEAD chunks ahead of the consumer (0: by the consumer, an item at a time as it comes to
    each). Closing it drops the chunks not begun and waits for those under way."""
    if not threads:
        for item in items:
            yield from work([item])
        return
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    chunks = (items[start : start + FETCH_CHUNK] for start in range(0, len(items), FETCH_CHUNK))
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="titok-fast-ahead") as pool:
        try:
            while True:
                for chunk in itertools.islice(chunks, FETCH_AHEAD - len(pending)):
                    pending.append(pool.submit(work, chunk))
                if not pending:
                    return
                yield from pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _threads_for(*paths: str | os.PathLike) -> int:
    """Threads to look at files ahead with: FETCH_THREADS where one of ``paths`` lies on a network file system."""
    return FETCH_THREADS if any(network_file_system(path) for path in paths) else 0


def write_threads_for(outdir: str | os.PathLike) -> int:
    """Threads to write token files into ``outdir`` with (:class:`Writes`): FETCH_THREADS on a network file
    system, LOCAL_WRITE_THREADS elsewhere."""
    return _threads_for(outdir) or LOCAL_WRITE_THREADS


# On a local disk one thread writes the token files: each write's two syncs (the file's, then its folder's, for the
# rename) are wall time the run's thread, which drives the model, would otherwise wait through (1.5-3 ms a file on
# an AMD EPYC's disk), and a write's own Python (1 CPU-ms a V1 file) takes the GIL while the run's thread has let it
# go (benchmarks/RESULTS.md, "writing token files")
LOCAL_WRITE_THREADS = 1


def _fetch_chunk(chunk: Sequence[tuple[Path, Path]], folders: dict[Path, str]) -> list[_Fetched]:
    """What reading ``chunk``'s token files finds (:class:`_Fetched`): an error (or a chunk's FETCH_CHUNK_BYTES
    spent) leaves a file to the run's thread, which reads it again and says what is wrong. ``folders``: what is
    known of output folders (:func:`_unwritable_folder`), shared by the threads reading ahead."""
    found, budget = [], FETCH_CHUNK_BYTES
    for source, out in chunk:
        try:
            st = os.lstat(out)  # (which file it is, before it is read; its size where it is not a link)
            size = (os.stat(out) if stat.S_ISLNK(st.st_mode) else st).st_size
            data = read_token_bytes(out) if size <= budget else None
        except FileNotFoundError:
            try:
                unwritable = _unwritable_folder(out.parent, folders)
            except OSError:  # (said when the run writes there, if it cannot)
                unwritable = ""
            found.append(_Fetched(absent=True, unwritable=unwritable))
            continue
        except (OSError, TokenFileError):
            data = None
        if data is None:
            found.append(_Fetched())
        else:
            budget -= len(data)
            found.append(_Fetched(data=data, source_stamp=source_stamp(source), entry=entry_of(st)))
    return found


def _parsed(out: Path, found: _Fetched) -> TokenFile | None:
    """The token file at ``out`` from what was read ahead of it (:func:`try_load_tokens` if nothing was)."""
    if found.data is None:
        return try_load_tokens(out)
    try:
        return load_tokens(out, found.data)
    except TokenFileError:
        return None


# errors of one path (its name, its folders' permissions or kinds), not of the file system: that input fails alone
THIS_PATH_ONLY = (errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP)


def _input_path(item: str | os.PathLike) -> Path:
    """An input given on the command line, once looked at: a name too long or a folder that cannot be searched is
    said as it is (not taken for a missing path), and an empty one is refused (Path("") is the current folder)."""
    if not os.fspath(item):
        raise InputError("an input is empty (''): expected a path (the current folder is '.')")
    try:
        _look_at(Path(item))
    except OSError as e:
        raise InputError(f"input {str(item)!r} cannot be looked at: {e.strerror or e}") from None
    return Path(item)


def _look_at(path: Path) -> os.stat_result | None:
    """``os.stat(path)`` (where its links lead), None where nothing is there; raises the OSError that looking at it
    gives, but for its absence (``Path.is_file`` says False for every error on newer Pythons)."""
    with contextlib.suppress(FileNotFoundError):
        return os.stat(path)
    return None


def _remove_temporaries(listed: dict[Path, dict[str, list[str]]], out: Path) -> None:
    """Remove what a killed run left to become ``out`` (its temporary files); ``listed`` keeps each folder's
    temporaries, listed once (a listing per file would be quadratic in a resume)."""
    remove_left(out.parent, _folder_files(listed, out.parent).pop(temporary_stem(out.name), ()))


def _remove_other_temporaries(listed: dict[Path, dict[str, list[str]]]) -> None:
    """Remove the temporaries left in the folders ``listed`` (once every output there has been passed) that were
    to become files not among this job's outputs: a killed run's, whose inputs this job does not have (a file
    since renamed or removed, another shard's), or an ``eval --json`` or plot's. One a live run is writing is left
    alone: it is locked, and it is new (another shard's run on another machine may write it where locks are not
    shared: only one unchanged for ABANDONED_UNLOCKED_SECONDS goes). Files set aside (``.outdated``) are kept."""
    for folder, found in listed.items():
        for target, names in found.items():
            if not target.startswith("/"):
                for name in names:
                    remove_abandoned(folder / name, unchanged_for=ABANDONED_UNLOCKED_SECONDS)


def _folder_files(listed: dict[Path, dict[str, list[str]]], folder: Path) -> dict[str, list[str]]:
    """``folder``'s temporaries and token files set aside (:func:`_temporaries`), listed once."""
    if folder not in listed:
        listed[folder] = _temporaries(folder)
    return listed[folder]


def _temporaries(folder: Path) -> dict[str, list[str]]:
    """The temporary files in ``folder`` (``.<name>.<hex>.tmp``, see ``files.AtomicFile``) by the name they
    were to be renamed to (its ``temporary_stem``); and the token files set aside (``<name>.outdated``,
    ``<name>.outdated.2``, ..., see :class:`~titok_fast.manifest.Manifest`) by ``"/" + <name>`` (its
    :func:`~titok_fast.manifest.aside_stem`), by number."""
    found: dict[str, list[str]] = {}
    try:
        with os.scandir(folder) as entries:  # names one at a time: a folder may hold a million token files
            for entry in entries:
                if (target := temporary_target(entry.name)) is not None:
                    found.setdefault(target, []).append(entry.name)
                elif (aside := _aside_of(entry.name)) is not None:
                    found.setdefault("/" + aside[0], []).append(entry.name)  # ("/": in no file's name)
    except OSError:  # none, not a folder, not readable: nothing to remove (writing there will say what is wrong)
        pass
    for key in found:
        if key.startswith("/"):
            found[key].sort(key=lambda name: _aside_of(name)[1])
    return found


def check_inputs_apart(files: Sequence[tuple[Path, str]], outdir: Path, shard: tuple[int, int] | None = None) -> None:
    """Refuse up front an input that is a file the run writes, appends to, moves or removes: its own token file,
    the run's manifest, or a temporary or set-aside token file in an output folder (a video given under such a
    name was replaced by its tokens, appended to, or removed). Only inputs with such names are looked at."""
    manifest, folders = outdir / manifest_name(shard), None
    for path, name in files:
        base = os.path.basename(path)
        temporary = temporary_target(base) is not None or _aside_of(base) is not None
        if not (temporary or base.endswith((".safetensors", ".jsonl"))):
            continue
        try:
            st = os.stat(path)
        except OSError:  # (it fails alone when read)
            continue
        what = None
        for candidate, kind in ((outdir / f"{name}.safetensors", "its own token file"), (manifest, "the manifest")):
            with contextlib.suppress(OSError):
                if os.path.samestat(st, os.lstat(candidate)):
                    what = f"{kind} ({candidate})"
        if what is None and temporary:
            if folders is None:
                folders = {os.path.dirname(os.path.realpath(outdir / f"{n}.safetensors")) for _, n in files}
            if os.path.dirname(os.path.realpath(path)) in folders:
                what = "named as a temporary or set-aside token file in an output folder"
        if what is not None:
            raise InputError(f"input {str(path)!r} is {what}: the run would write over, move or remove it; move it "
                             f"or choose another output folder than {str(outdir)!r}")  # fmt: skip


def _aside_of(name: str) -> tuple[str, int] | None:
    """(the token file's name, its number) for a token file set aside as ``name``, or None."""
    found = re.fullmatch(rf"(.+\.safetensors){re.escape(OUTDATED_SUFFIX)}(?:\.([0-9]{{1,9}}))?", name)  # (ASCII digits)
    return None if found is None else (found.group(1), int(found.group(2) or 1))


def _restore_aside(
    listed: dict[Path, dict[str, list[str]]], out: Path, source: Path, wanted: dict[str, Any]
) -> TokenFile | None:
    """Put back under its name the first token file of ``out`` set aside (its input failed a redo, as one made
    otherwise) that was made as ``wanted`` from ``source`` after all (the settings of the failed run were a slip):
    the one put back, if any."""
    for name in _folder_files(listed, out.parent).pop("/" + aside_stem(out.name), ()):
        aside = out.parent / name
        if aside.is_symlink():  # (a link would be put back as a link: only a file the run set aside)
            continue
        kept = try_load_tokens(aside)
        if _redo_reason(kept, aside, source, wanted) == "" and _put_back(aside, out):
            notice(f"{out}: put back from {name}, made as this run makes it")
            return kept
    return None


def _put_back(aside: Path, out: Path) -> bool:
    """Move ``aside`` to ``out`` unless something is there (another run on the folder may have made it, or put
    it back, meanwhile): whether it was moved. A hard link, then the old name removed, never replaces a file; where
    the file system has none, a rename after a look."""
    try:
        os.link(aside, out, follow_symlinks=False)
    except (FileExistsError, FileNotFoundError):
        return False
    except OSError:  # no hard links here
        if os.path.lexists(out):
            return False
        try:
            os.rename(aside, out)
        except FileNotFoundError:
            return False
        return True
    with contextlib.suppress(FileNotFoundError):
        os.unlink(aside)
    return True


def encode_resiliently(
    engine: Engine,
    items: Iterable[tuple],
    on_error: Callable[[object, Exception], None],
    *,
    give_up_after: int = GIVE_UP_AFTER,
    host: bool = False,
) -> Iterator[tuple[object, tuple[torch.Tensor, torch.Tensor]]]:
    """``engine.encode_stream(items, host=host)`` (:data:`~titok_fast.engine.IDLE` items included), but a failing
    batch does not end the stream: every clip taken and not yet returned is retried alone, a clip that fails alone
    goes to ``on_error(key, error)``, and the stream goes on. With ``host``, every result comes as CPU tensors.

    What no clip can be blamed for is raised instead: an error from ``items`` itself, a fault the device reports
    (its errors cannot be retried away), a failure before any clip was taken, and ``give_up_after`` clips in a row
    that each fail alone."""
    taken: dict[object, tuple[torch.Tensor, int]] = {}

    def tracked():
        source = iter(items)
        while True:
            try:
                item = next(source)
            except StopIteration:
                return
            except Exception as e:  # not the engine's: must not be mistaken for a batch failure
                raise _ItemsError(e) from e
            if item is not IDLE:
                key, video, n = item
                taken[key] = (video, n)
            yield item

    stream, failed_in_a_row = tracked(), 0
    while True:
        try:
            for key, result in engine.encode_stream(stream, host=host):
                del taken[key]
                failed_in_a_row = 0
                yield key, result
            return
        except _ItemsError as e:
            raise e.error from None
        except (ValueError, TypeError, RuntimeError) as e:
            if not taken or _device_fault(e):
                raise
        retry = list(taken.items())
        taken.clear()
        for key, (video, n) in retry:
            try:
                codes, out = engine.encode([video], [n])
                indices = out["indices"][0]
                if host:
                    codes, indices = codes.cpu(), indices.cpu()
            except (ValueError, TypeError, RuntimeError) as e:
                failed_in_a_row += 1
                if _device_fault(e) or failed_in_a_row >= give_up_after:
                    raise RuntimeError(f"giving up after {failed_in_a_row} clip(s) in a row failed alone: {e}") from e
                on_error(key, e)
            else:
                failed_in_a_row = 0
                yield key, (codes, indices)


class _ItemsError(Exception):
    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _device_fault(error: BaseException) -> bool:
    """A fault of the device rather than of a clip (a CUDA error leaves the context unusable)."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    text = str(error)
    return isinstance(error, accelerator_error) or text.startswith("CUDA error") or "Triton Error [CUDA]" in text


def _device_fault_in(error: BaseException) -> bool:
    """:func:`_device_fault` of ``error`` or of the error it was raised from."""
    return _device_fault(error) or (error.__cause__ is not None and _device_fault(error.__cause__))


PLURALS = {"thread": "threads", "process": "processes"}


class Every:
    """Called: whether ``seconds`` have passed since it last said so (or since ``start``, a time.perf_counter)."""

    def __init__(self, seconds: float, start: float):
        self.seconds, self._last = seconds, start

    def __call__(self) -> bool:
        now = time.perf_counter()
        if now - self._last < self.seconds:
            return False
        self._last = now
        return True


class Limits:
    """What limits an encode run, for its progress bar: clips/s, and the share of the wall time the model's feeder
    spent waiting for decoded clips (over half: decoding is the bottleneck, and the hint says what to try)."""

    def __init__(self, start: float, decoder: str, device_type: str, every: float = 1.0):
        self.start, self.decoder, self.device_type = start, decoder, device_type
        self.due = Every(every, start)  # whether the description is due to be shown again
        self.workers, self.worker_kind = 1, "thread"
        self.running = 0  # decoding workers started so far (they start as files come: see started)
        self.clips = 0
        self.waited = 0.0  # seconds spent waiting for the next clip (or file) from the decoders

    def waiting(self, items: Iterable) -> Iterator:
        """``items``, with the wall time spent waiting for each counted."""

        def count(spent: float) -> None:
            self.waited += spent

        return each_timed(items, time.perf_counter, count)

    def started(self, workers: int) -> None:
        """``workers`` decoding workers have started (of ``self.workers`` at most: a run of few files starts
        fewer)."""
        self.running = max(self.running, workers)

    def describe(self) -> str:
        """E.g. "12.3 clips/s, decode-bound (waits 71%, 4 decoding threads): try --workers 16 or --decoder nvdec"."""
        wall = max(time.perf_counter() - self.start, 1e-9)
        share = min(self.waited / wall, 1.0)
        text = f"{self.clips / wall:.2f} clips/s, "
        running = min(self.running or self.workers, self.workers)
        kind = self.worker_kind if running == 1 else PLURALS[self.worker_kind]
        said = f"waits {share:.0%}, {running} decoding {kind}"  # (what --worker-kind auto chose, too)
        if not self.clips:  # (every file so far failed, or none has given a clip yet: nothing bounds the model)
            return text + f"no clip encoded yet ({said})"
        if share <= 0.5:
            return text + f"model-bound ({said})"
        if self.workers < default_workers():
            hints = [f"--workers {default_workers()}"]
        elif self.device_type == "cpu":  # (decoding and the model share the cores: processes bring none, and
            hints = []  # cost more CPU a clip than threads)
        else:
            hints = ["--worker-kind process"] if self.worker_kind == "thread" else []
        hints += ["--decoder nvdec"] if self.decoder == "cpu" and self.device_type == "cuda" else []
        return text + f"decode-bound ({said})" + (f": try {' or '.join(hints)}" if hints else "")


@dataclass
class _FileState:
    number: int  # in the run's stream of files
    path: Path
    out: Path
    reader: ClipReader
    indices: dict[int, torch.Tensor] = field(default_factory=dict)
    taken: int = 0  # clips read from the file so far
    clips: int | None = None  # known once the whole file has been read
    ended: bool = False  # written or failed


class _EncodeJob:
    """The files of one ``encode_files`` run: their clips go out as one stream, their indices come back in any
    grouping, and a file's token file is written when its last clip is back."""

    def __init__(self, model: TiTok, mode: str, settings: ClipSettings, manifest: Manifest, bar: tqdm, start: float,
                 writes: Writes):  # fmt: skip
        self.model, self.mode, self.settings, self.manifest, self.bar = model, mode, settings, manifest, bar
        self.writes = writes
        self.summary = manifest.summary
        self.files: dict[int, _FileState] = {}  # the files read and not yet ended (written or failed)
        _, height, width = settings.grid
        self.on_device = DevicePreprocessor(model.device, height, width, model.dtype)
        self.facts = ModelFacts.of(model)  # (once: see there)
        self.preprocess_failed_in_a_row = 0
        self.limits = Limits(start, settings.decoder, model.device.type)
        self.show_due = False  # whether what limits the run is due to be shown
        self.unshown = 0  # files ended since the bar last moved

    def clips(self, files_read: FeedInterleaver, outputs: dict) -> Iterator[tuple[tuple[int, int], torch.Tensor, int]]:
        """``((file number, clip number), clip in the model dtype, tokens)`` for every clip of every file, taken
        from whichever file (or part of a file split across workers) has one ready."""
        tokens = self.settings.tokens
        most = most_chunks(tokens, self.settings.grid[0])
        for number, kind, value in self.limits.waiting(files_read):
            if self.show_due or self.unshown:  # (a batch's results have all been added by the time the engine takes
                self.show()  # another clip: a line shown as they were added counted part of the batch, a whole
                # batch behind on a CPU, where a V1 batch takes minutes)
            if kind == "idle":  # no clip ready for a while (slow or stuck files): the engine runs what it holds
                yield IDLE
                continue
            if kind == "open":
                path, feed = value
                self.files[number] = _FileState(number, path, outputs[path], feed.reader)
                continue
            state = self.files.get(number)
            if state is None:  # ended already: a clip of it failed encoding
                files_read.drop(number)
            elif kind == "error":
                self._fail(state, str(value))
            elif kind == "end":
                state.clips = state.taken
                self._write_if_complete(state)
            elif state.taken == most:  # a token file of more would not load: failed before more is held
                self._fail(state, f"{state.path}: {too_many_chunks(tokens, self.settings.grid[0])}")
                files_read.drop(number)
            else:
                place, clip = value  # (a file split across workers gives its parts' clips as they come)
                if isinstance(clip, I420Clip) or clip.dtype == torch.uint8:  # frames at source size: preprocessed
                    # here, on the model's device
                    clip = self._preprocess(state, place, clip)
                    if clip is None:  # the file failed
                        files_read.drop(number)
                        continue
                # else resized and scaled in the model's dtype already, by the decoding worker
                yield (number, place), clip, tokens
                state.taken += 1

    def _preprocess(self, state: _FileState, number: int, frames: torch.Tensor) -> torch.Tensor | None:
        """One clip's frames preprocessed on the model's device; None if that failed, failing its file alone, as
        the same error in the decoding worker (placement "cpu") would. A fault of the device itself, or
        GIVE_UP_AFTER files in a row failing here, is no file's: it is raised and stops the run."""
        try:
            clip = self.on_device(frames)
        except Exception as e:
            if _device_fault(e):
                raise
            self.preprocess_failed_in_a_row += 1
            show_traceback(e, state.path)
            where, error = self.on_device.device.type, f"{type(e).__name__}: {' '.join(str(e).split())}"
            if self.preprocess_failed_in_a_row >= GIVE_UP_AFTER:
                raise RuntimeError(
                    f"giving up after {self.preprocess_failed_in_a_row} file(s) in a row failed preprocessing on "
                    f"{where}: {error}"
                ) from e
            self._fail(state, f"{state.path}: preprocessing clip {number} on {where} failed ({error})")
            return None
        self.preprocess_failed_in_a_row = 0
        return clip

    def show(self) -> None:
        """The bar moved by the files ended since it last moved, with what limits the run."""
        self.show_due, ended, self.unshown = False, self.unshown, 0
        self.bar.set_postfix_str(self.limits.describe(), refresh=False)
        if ended:
            self.bar.update(ended)
        else:
            self.bar.refresh()

    def add(self, key: tuple[int, int], indices: torch.Tensor) -> None:
        state = self.files.get(key[0])  # None: its file has ended (failed) already
        self.limits.clips += 1
        if self.limits.due():  # (shown once the batch's other clips are counted too: see clips)
            self.show_due = True
        if state is not None:
            state.indices[key[1]] = indices  # on the host already (encode_resiliently's host=True)
            self._write_if_complete(state)

    def clip_failed(self, key: tuple[int, int], error: Exception) -> None:
        if (state := self.files.get(key[0])) is not None:
            self._fail(state, f"encoding failed on clip {key[1]}: {error}")

    def _fail(self, state: _FileState, reason: str) -> None:
        if not state.ended:
            self.manifest.failed(state.path, state.out, reason)
            self._end(state)

    def _write_if_complete(self, state: _FileState) -> None:
        if state.ended or state.clips is None or len(state.indices) < state.clips:
            return
        reader = state.reader
        indices = [state.indices[i] for i in range(state.clips)]
        made = made_with(self.model, self.mode, self.settings, decoded_by=reader.decoded_by,
                         preprocessed_on=reader.placement, source_stamp=reader.source_stamp)  # fmt: skip
        write = functools.partial(write_token_file, self.facts, self.settings, state.out, reader.path, indices,
                                  reader.start_times(), reader.last_clip_frames, made,
                                  reader.chunk_seconds, reader.source_fps)  # fmt: skip
        self._end(state)
        self.writes(functools.partial(write_recorded, self.manifest, state.path, state.out, len(indices), write))

    def _end(self, state: _FileState) -> None:
        state.ended = True
        state.indices = {}
        del self.files[state.number]  # nothing of an ended file is kept: a run of a million files holds no more
        self.unshown += 1  # (the bar moves with the batch's other clips and files: see clips)


def _wanted(model: TiTok, mode: str, settings: ClipSettings, device: str | None = None) -> dict[str, Any]:
    """What a token file must record to be kept: the weights and model config, how it was made (:func:`made_with`,
    RESUME_KEYS) and the clip settings, as :func:`_redo_because` compares them (worked out once per job, not per
    file; "configs" keeps how each recorded model config compares, as it reads them)."""
    grid = "x".join(map(str, settings.grid))
    clips = dict(fps=settings.fps, tail=settings.tail, sampling=settings.sampling, tokens=settings.tokens, grid=grid)
    made = made_with(model, mode, settings, device=device)
    return {"weights": model.weights_digest, "config": model.config, "configs": {}, "made_with": made, "clips": clips}


def _redo_because(out: Path, source: str | os.PathLike, wanted: dict[str, Any]) -> str | None:
    """Why the token file at ``out`` is to be redone: None when there is none, "" when it is to be kept (complete,
    made from ``source`` by the same weights with the same clip settings, decoder, preprocessing, device, dtype,
    backend and mode: ``wanted``, from :func:`_wanted`), else one line saying what differs. Files made before
    these were recorded are redone too.

    The source is compared as the token file records it, an absolute path: another video that maps to the same
    output name (the same name in another input folder, from another run) is not this one."""
    return _redo_reason(try_load_tokens(out), out, source, wanted)


def _redo_reason(
    done: TokenFile | None, out: Path, source: str | os.PathLike, wanted: dict[str, Any], stamp: str | None = None
) -> str | None:
    """:func:`_redo_because` for the token file ``done`` read from ``out`` (None: none readable there); ``stamp``:
    the source's :func:`source_stamp`, if taken already."""
    if done is None:
        _look_at(out)  # (its errors other than absence: a name too long, a folder that cannot be searched)
        if not os.path.lexists(out) or os.path.islink(out) and not os.path.exists(out):
            return None  # (a link that leads nowhere: replaced by the token file, as nothing there would be)
        return "not readable as a complete token file" if _token_file_kind(out) else NOT_A_TOKEN_FILE
    if _other_source(done.source, source):  # first: whatever else differs, it is another video's
        return f"made from another source ({brief(done.source)!r})"
    recorded = done.made_with.get("source_stamp")  # (files made before it was recorded are kept; one whose source
    now = source_stamp(source) if stamp is None else stamp  # is gone is kept if made as wanted: the source fails)
    if recorded and now and recorded != now:
        return f"its source changed since it was made (size:mtime_ns {brief(recorded, 64)}, now {now})"
    if done.weights_digest != wanted["weights"]:
        return f"made by other weights ({brief(done.weights_digest)})"
    seen = wanted["configs"]  # recorded config -> how it differs: a dataset's files record one or a few
    key = repr(done.model_config)
    differ = seen.get(key)
    if differ is None:
        differ = config_difference(done.model_config, wanted["config"])
        if len(seen) < MAX_CONFIGS_KEPT and len(key) <= MAX_CONFIG_KEY:  # a stranger's files may each have another
            seen[key] = differ
    if differ:
        return f"made by another model ({differ})"
    recorded, asked = done.made_with, wanted["made_with"]
    keys = [k for k in RESUME_KEYS if k in recorded or k in asked]
    was = {k: recorded.get(k, UNRECORDED_DEFAULTS.get(k, "unrecorded")) for k in keys}
    now = {k: asked.get(k, UNRECORDED_DEFAULTS.get(k, "unrecorded")) for k in keys}
    if "time_sampling" in now and same_time_sampling(was.get("time_sampling"), done.fps):
        was["time_sampling"] = now["time_sampling"]  # (an earlier rule that picks the same frames at this fps)
    if "clips_per_video" in now and same_clips(was["clips_per_video"], now["clips_per_video"], len(done.token_counts)):
        was["clips_per_video"] = now["clips_per_video"]  # (a video that had fewer: all of them, as now)
    grids = [g if g == "..." else "x".join(map(str, g)) for g in _distinct(done.grids)]
    was.update(fps=done.fps, tail=done.tail, sampling=done.sampling, tokens=_recorded(_distinct(done.token_counts)),
               grid=_recorded(grids))  # fmt: skip
    now.update(wanted["clips"])
    ran, runs = _as_run(was), _as_run(now)
    differ = [f"{k} {brief(str(was[k]), 200)}, now {now[k]}" for k in was if ran[k] != runs[k]]
    return f"made another way ({'; '.join(differ)})" if differ else ""


def same_clips(was: str, now: str, clips: int) -> bool:
    """Whether a token file of ``clips`` clips, made with ``clips_per_video`` ``was`` (as recorded: a number, or
    "all"), holds what one made with ``now`` would: the same limit, or a video that ended before ``was`` (so it
    has ``clips`` clips in all) whose clips ``now`` takes all of."""
    if was == now:
        return True
    try:
        limits = [math.inf if limit == "all" else int(limit) for limit in (was, now)]
    except (TypeError, ValueError):  # (a stranger's file may record anything: made another way)
        return False
    return clips < limits[0] and clips <= limits[1]


def _as_run(made: dict[str, Any]) -> dict[str, Any]:
    """``made`` (how a file was or is to be made) with "auto" as it runs on a model that is not on CUDA: mode
    "eager" and preprocess "cpu" (``engine.auto_mode``, ``preprocess.placement``), so that naming those with
    ``--mode`` or ``--preprocess`` does not redo a CPU dataset's files made by the defaults (a million files for
    nothing)."""
    if made.get("device") in ("cuda", None):
        return made
    auto = {"mode": "eager", "preprocess": "cpu"}
    return {k: auto[k] if v == "auto" and k in auto else v for k, v in made.items()}


NOT_A_TOKEN_FILE = "not a token file"  # what is at a token file's name is another kind of file: kept (plan_outputs)


def _not_a_token_file(out: Path, overwrite: bool) -> str:
    """Why an input fails whose token file's name ``out`` holds something that is not a token file; "" where
    ``overwrite`` replaces it (a regular file)."""
    try:
        mode = os.stat(out).st_mode
    except OSError as e:
        return f"{out} cannot be looked at ({e.strerror or e})"
    if stat.S_ISREG(mode):
        kept = f"{out} is there and is not a token file: it is kept; move it away, or --overwrite replaces it"
        return "" if overwrite else kept
    return f"{out} is {kind_of(mode)}, not a token file: move it away"


def _token_file_kind(path: Path) -> bool:
    """Whether the file at ``path`` (where its links lead) is a regular file that begins as a token file does (a
    safetensors header naming a token file's tensors and titok-fast's metadata): one made by titok-fast and damaged
    since, not a file of another kind (a user's weights, a video, a FIFO) that happens to have its name."""
    start = file_head(path, 8 + len(TOKEN_FILE_HEADER))
    if start is None or any(start[3:8]):  # its header's length, at most MAX_HEADER_BYTES: high bytes zero
        return False  # (a user's short note at that name, "todo!", was taken for a token file cut short)
    if 0 < len(start) < 8:  # part of a header's length, which nothing tells from a user's "hi\n": kept (a token file
        return False  # is written whole under its name; one cut short to nothing is empty, and replaced)
    head = start[8:]  # (a weights file's metadata begins with its format_version); a file cut short, even to nothing:
    return head == TOKEN_FILE_HEADER or len(start) < 8 + len(TOKEN_FILE_HEADER) and TOKEN_FILE_HEADER.startswith(head)


TOKEN_FILE_HEADER = ('{"__metadata__":{"' + METADATA_KEY + '":"{\\"version\\": ').encode()  # how save_tokens begins


def _recorded_other(tokens: str | os.PathLike, source: str | os.PathLike) -> str | None:
    """The source the token file ``tokens`` records, where it is another than ``source`` (None: ``source``, or
    not a token file that says)."""
    try:
        recorded = read_safetensors_metadata(tokens).get("source")
    except Exception:  # (anything there: a user's file, one cut short)
        return None
    return recorded if isinstance(recorded, str) and _other_source(recorded, source) else None


def _other_source(recorded: str, source: str | os.PathLike) -> bool:
    """Whether the source a token file records is not ``source``: another path, unless it leads to the same file
    (through a link to it or to a folder above it, as a cluster's /home may lead to its /gpfs)."""
    if recorded == absolute(source):
        return False
    try:
        if (ours := split_member(source)) is not None:  # an archive's member: the same member of the same archive
            theirs = split_member(recorded) if os.path.isabs(recorded) else None
            return not (theirs is not None and posixpath.normpath(theirs[1]) == posixpath.normpath(ours[1])
                        and os.path.samefile(theirs[0], ours[0]))  # fmt: skip
        return not (os.path.isabs(recorded) and os.path.samefile(recorded, source))
    except (OSError, ValueError):  # (gone, or a path with a NUL byte from a stranger's file)
        return True


MAX_CONFIGS_KEPT, MAX_CONFIG_KEY = 64, 4096  # _redo_because keeps how this many recorded configs compare, if short


def _distinct(values: torch.Tensor, most: int = 8) -> list:
    """The distinct values (rows) of ``values``, in the order they first come, the first ``most`` of them and then
    ``...`` if there are more: computed in torch, since a list of every chunk's would take some 20 times a token
    file's size (a stranger's may hold millions of chunks, each of its own grid)."""
    rows = values.reshape(len(values), -1)
    found, seen = [], torch.zeros(len(rows), dtype=torch.bool)  # seen: rows equal to one found
    while len(found) < most and not bool(seen.all()):
        row = rows[int((~seen).int().argmax())]  # the first row not seen
        found.append(row)
        seen |= (rows == row).all(1)
    return [row.tolist() if values.dim() > 1 else row.item() for row in found] + ["..."] * (not bool(seen.all()))


def _recorded(distinct: list):
    """The value every chunk records, or all of them ("8/16") when they differ: ``distinct``, those it records."""
    return distinct[0] if len(distinct) == 1 else "/".join(map(str, distinct))


@dataclass(frozen=True)
class ModelFacts:
    """What a token file says of the model that made it, taken once a run (:meth:`of`): its config, the digest of
    its weights and where they came from. The model works its digest out anew each time it is asked (it checks
    that the weights are still those it names: 0.6 ms for V1 alone in a loop; asked for each token file, half of
    the CPU that writing a 10 s video's cost the run's thread: benchmarks/RESULTS.md), so a run takes it once, as
    its resume decisions take it: its token files name the weights it started with."""

    config: TiTokConfig
    weights_digest: str
    weights_source: str

    @classmethod
    def of(cls, model: TiTok) -> ModelFacts:
        if model.weights_digest is None:  # (plan_outputs names them before a run)
            raise ValueError("the model's weights have no digest: token files must name their weights")
        return cls(model.config, model.weights_digest, model.weights_source)


def write_token_file(
    model: ModelFacts,
    settings: ClipSettings,
    out: Path,
    source: str | os.PathLike,
    indices: list[torch.Tensor],
    start_times: list[float],
    last_chunk_frames: int,
    made: dict[str, str],
    chunk_seconds: float | None = None,
    source_fps: float | None = None,
) -> str | None:
    """Write one video's token file atomically (``save_tokens``) from its clips' indices (each [tokens]), the
    model that made them (its :class:`ModelFacts`) and how (:func:`made_with`); returns None, or the one-line
    reason it could not be written."""
    nan = next((k for k, idx in enumerate(indices) if bool((idx == NAN_INDEX).any())), None)
    if nan is not None:
        return (f"chunk {nan} (at {start_times[nan]:.2f} s) gave the model NaN latents, which have no tokens: its "
                "activations overflowed (float16 overflows where bfloat16 and float32 do not) or its weights hold NaN")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_tokens(out, _token_file(model, settings, source, indices, start_times, last_chunk_frames, made,
                                     chunk_seconds, source_fps))  # fmt: skip
    except OSError as e:
        if e.errno in NO_ROOM:  # no other token file could be written there either: the run stops
            raise OSError(f"cannot write {out} ({e.strerror}): the run stops") from None
        return CannotWrite(f"cannot write {out}: {e.strerror or e}")
    except TokenFileError as e:
        return f"cannot write {out}: {e}"
    return None


NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a full disk, a full quota, a read-only file system


class CannotWrite(str):
    """The reason a token file failed that is where it goes, not what it holds (an I/O error): :class:`Writes`
    counts these in a row."""


def write_recorded(
    manifest: Manifest,
    path: str | os.PathLike,
    out: Path,
    clips: int,
    write: Callable[[], str | None],
    done: dict[str, Any] | None = None,
    failed: dict[str, Any] | None = None,
) -> str | None:
    """One input's token file, by ``write`` (:func:`write_token_file` bound to it), and its manifest line, with no
    interrupt between them (on the run's thread, or a writing thread of :class:`Writes`); ``done`` / ``failed``:
    more fields of the line of each outcome. Returns the reason it failed, or None."""
    started = CLOCK.start()
    with interrupts_held():
        manifest.displacing(path, out, functools.partial(_recorded_other, source=path))
        error = write()
        CLOCK.stop("write", started)
        if error:
            manifest.failed(path, out, error, **(failed or {}))
        else:
            manifest.done(path, out, clips, **(done or {}))
    return error


def _token_file(
    model: ModelFacts,
    settings: ClipSettings,
    source,
    indices: list,
    start_times: list[float],
    last_chunk_frames: int,
    made: dict[str, str],
    chunk_seconds: float | None = None,
    source_fps: float | None = None,
) -> TokenFile:
    return TokenFile.from_chunks(
        indices,
        [settings.grid] * len(indices),
        start_times,
        model_config=model.config.to_dict(),
        weights_digest=model.weights_digest,
        fps=settings.fps,
        source=absolute(source),
        frames_per_chunk=settings.grid[0],
        tail=settings.tail,
        last_chunk_frames=last_chunk_frames,
        codebook_size=model.config.codebook_size,
        weights_source=model.weights_source,
        sampling=settings.sampling,
        made_with=made,
        chunk_seconds=chunk_seconds,
        source_fps=source_fps or None,  # (0.0: the container reports no rate)
    )


RESUME_KEYS = ("decoder", "preprocess", "device", "dtype", "backend", "mode", "precision", "rotation", "time_sampling",
               "nvdec_rgb", "clips_per_video")  # fmt: skip
# made_with leaves these out when default. "precision" is no longer written: FP8 runs in the decoder only
# (titok_fast/fp8.py), so every model encodes in the default precision; files that an earlier titok-fast made with
# an FP8 encoder say "fp8" and are redone.
UNRECORDED_DEFAULTS = {"precision": "default", "rotation": "stored", "clips_per_video": "all"}


def made_with(
    model: TiTok,
    mode: str,
    settings: ClipSettings,
    *,
    device: str | None = None,
    decoded_by: str | None = None,
    preprocessed_on: str | None = None,
    source_stamp: str = "",
) -> dict[str, str]:
    """How tokens are made (the token file's ``made_with``): what was asked for (RESUME_KEYS) by a model on
    ``device`` (default: where ``model`` is; the Ray path's actors run elsewhere than its driver's copy), and once
    a file has been read, what it got (``decoded_by``, ``preprocessed_on``) and the source's ``source_stamp``
    (size and mtime as it was opened; a resume redoes a source changed since), and ``made_by``, titok-fast's
    version (not compared: a new version resumes an old one's files). ``rotation`` is there only when it is not
    the default, so files made before it was recorded still resume (``precision`` never: see UNRECORDED_DEFAULTS),
    and so is ``clips_per_video``;
    ``time_sampling`` (how sampling "time" reads timestamps) only with that sampling, so files it made before the
    rule was recorded are redone (their picks may differ); ``nvdec_rgb`` (how NVDEC's frames become RGB) only with
    ``--decoder nvdec``, likewise."""
    device = device or model.device.type
    made = {
        "decoder": settings.decoder,
        "preprocess": settings.preprocess,
        "device": torch.device(device).type,
        "dtype": str(model.dtype).removeprefix("torch."),
        "backend": resolve_backend(model.backend, device).name,
        "mode": mode,
    }
    if settings.rotation != UNRECORDED_DEFAULTS["rotation"]:
        made["rotation"] = settings.rotation
    if settings.clips_per_video is not None:
        made["clips_per_video"] = str(settings.clips_per_video)
    if settings.sampling == "time":
        made["time_sampling"] = TIME_SAMPLING
    if settings.decoder == "nvdec":
        made["nvdec_rgb"] = NVDEC_RGB
    if decoded_by is not None:
        made.update(decoded_by=decoded_by, preprocessed_on=preprocessed_on)
    if source_stamp:
        made["source_stamp"] = source_stamp
    made["reader"] = READER  # not compared on resume: a resume says how many files an earlier reader made
    made["made_by"] = f"titok-fast {__version__}"  # for the record: not compared on resume
    return made


def decoded_chunks(engine: Engine, token_file: TokenFile) -> Iterator[torch.Tensor]:
    """The token file's chunks decoded one by one, in order, as ``engine.decode_stream`` returns them: each
    [3, T, H, W] clamped to [-1, 1] on the CPU, the padded tail frames of the last chunk removed. Each chunk's
    indices and grid are taken as the engine asks for them (a file may hold millions of chunks)."""
    last = token_file.token_counts.numel() - 1
    for i, chunk in engine.decode_stream(_chunk_items(token_file)):
        chunk = chunk.float().clamp(-1, 1).cpu()
        yield chunk[:, : token_file.last_chunk_frames] if i == last else chunk


def _chunk_items(token_file: TokenFile) -> Iterator[tuple[int, torch.Tensor, tuple[int, int, int]]]:
    """``(chunk number, indices, grid)`` of every chunk, one at a time."""
    offsets, grids = token_file.offsets.numpy(), token_file.grids.numpy()
    for i in range(len(grids)):
        yield i, token_file.indices[offsets[i] : offsets[i + 1]].long(), tuple(grids[i].tolist())


def check_decodable(engine: Engine, token_file: TokenFile, path: str | os.PathLike) -> None:
    """Every chunk of ``token_file`` is one ``engine`` decodes: its grid a multiple of the patch within
    :data:`~titok_fast.checks.MAX_GRID`, its packed rows (tokens + patches) within the engine's largest budget.
    Checked for the whole file at once, before any chunk is decoded or its source read at that size (a stranger's
    file of a few bytes may ask for any grid). Its chunks share one frame size: they are decoded into one video."""
    patch = torch.tensor(engine.model.config.patch_size)
    grids = token_file.grids.long()
    other_size = (grids[:, 1:] != grids[0, 1:]).any(1)
    if bool(other_size.any()):  # (the API's files may mix sizes: decoded_chunks decodes them; an mp4 cannot hold them)
        chunk = int(other_size.int().argmax())
        raise ValueError(
            f"chunk {chunk} of {path} has grid {grids[chunk].tolist()}, chunk 0 {grids[0].tolist()}: the chunks of a "
            "token file decoded into one video share one frame size (H x W)"
        )
    bad = ((grids % patch) != 0).any(1) | (grids > torch.tensor(MAX_GRID)).any(1)
    bad |= grids.prod(1) > MAX_GRID_VOXELS  # (a product past int64 has an axis past MAX_GRID: bad already)
    if bool(bad.any()):
        chunk = int(bad.int().argmax())
        check_grids([grids[chunk].tolist()], 1, tuple(patch.tolist()), lambda _: f"chunk {chunk} of {path}")
    rows = token_file.token_counts.long() + (grids // patch).prod(1)
    largest = engine.budgets[-1]
    if int(rows.max()) > largest:
        chunk = int((rows > largest).int().argmax())
        raise ValueError(
            f"chunk {chunk} of {path} (grid {grids[chunk].tolist()}, {int(token_file.token_counts[chunk])} tokens) "
            f"needs {int(rows[chunk])} packed rows (tokens + patches); the largest budget is {largest}"
        )


def source_chunks(token_file: TokenFile) -> Iterator[torch.Tensor]:
    """The source re-read exactly as it was for encoding, chunk by chunk like :func:`decoded_chunks` ([-1, 1]);
    a source that is not the file the tokens were made from (by the size and modification time the token file
    records), or now gives fewer chunks than the token file holds, is a ValueError."""
    wanted = token_file.token_counts.numel()
    if not wanted:
        raise ValueError("the token file holds no chunks: no source chunk to show beside them")
    t, h, w = token_file.grids[0].tolist()
    if token_file.sampling == "time" and not same_time_sampling(token_file.made_with.get("time_sampling"),
                                                                token_file.fps):  # fmt: skip
        raise ValueError(
            "the token file was made by an earlier rule of sampling 'time': its source cannot be re-read as it was "
            "(decode it without the source, or encode it again)"
        )
    # a path from the file, read only where it is the very file the tokens were made from: a stranger's token file
    # cannot have another file read (nor learn whether it exists), nor a device, FIFO or folder
    recorded = token_file.made_with.get("source_stamp")
    if not recorded:
        raise ValueError("the token file records no size and modification time of its source (made by an earlier "
                         "version): encode it again to show its source beside it")  # fmt: skip
    if not is_recorded_source(token_file.source, recorded):
        raise ValueError(f"the source {brief(token_file.source)!r} the token file names is not the file its tokens "
                         "were made from (its size and modification time differ, or it is not there)")  # fmt: skip
    reader = ClipReader(
        token_file.source, frames=t, height=h, width=w, fps=token_file.fps, tail=token_file.tail,
        sampling=token_file.sampling, rotation=token_file.made_with.get("rotation", UNRECORDED_DEFAULTS["rotation"]),
    )  # fmt: skip
    made_by = token_file.made_with.get("reader")  # (files made before readers were recorded: earlier)
    earlier_picks = token_file.sampling == "upstream" and not (isinstance(made_by, str) and made_by >= PICKS_FIXED)
    clips = iter(reader)
    try:
        for got, clip in enumerate(clips, start=1):
            if got == 1 and earlier_picks and earlier_picks_differ(wanted, t, reader.chunk_length,
                                                                          token_file.last_chunk_frames):
                raise ValueError(f"the token file was made by a reader before {PICKS_FIXED}, which picked other frames "
                                 "of this source for its chunks: its source cannot be re-read as it was (decode it "
                                 "without the source, or encode it again)")  # fmt: skip
            yield clip[:, : token_file.last_chunk_frames] if got == wanted else clip
            if got == wanted:
                return
    finally:
        clips.close()
    raise ValueError(f"source {brief(token_file.source)} now gives {reader.clips_read} chunks; the token file has "
                     f"{wanted}")  # fmt: skip


PSNR_CAP_DB = 100.0  # a clip's PSNR in eval and decode's scores: an exact clip (inf) would make any mean inf


def scored_psnr(recon: torch.Tensor, source: torch.Tensor) -> float:
    """A clip's PSNR as eval and decode score it: against its source clamped to [-1, 1], as the reconstruction
    is and as both are shown (the resize overshoots the range at sharp edges: up to 1.19 on a stripe pattern,
    which no reconstruction could match), at most PSNR_CAP_DB."""
    return min(psnr(recon, source.clamp(-1, 1)), PSNR_CAP_DB)


def _beside_source(token_file: TokenFile, chunks: Iterator[torch.Tensor], scores: list[float] | None):
    """Each decoded chunk with its source chunk on the left; its PSNR appended to ``scores`` if given."""
    for source, recon in zip(source_chunks(token_file), chunks, strict=True):
        if scores is not None:
            scores.append(scored_psnr(recon, source))
        yield side_by_side(source, recon)


def check_same_model(model: TiTok, token_file: TokenFile, path: str | os.PathLike) -> None:
    """A token file decodes only with the weights and the model config that made it (the FSQ levels have no
    weights: the same weights with other levels read other codes from the same indices)."""
    if model.weights_digest is None:  # (weights loaded into a model, or made here: named as encode_files names them)
        model.weights_digest = weights_digest(model.state_dict())
    if token_file.weights_digest != model.weights_digest and not _same_weights_loaded(token_file, model):
        seed = random_seed(token_file.weights_digest)
        right = "the right --checkpoint" if seed is None else f"--random-weights {seed} (and its --config)"
        if seed is not None and seed == random_seed(model.weights_digest):  # (the digest covers the config too)
            right = f"--random-weights {seed} with the right --config: it was made by those random weights with " \
                    "another config"  # fmt: skip
        raise ValueError(
            f"{path}: made by weights {brief(token_file.weights_digest, 64)}, the loaded model by "
            f"{model.weights_digest}; pass {right}, or --force to decode anyway"
        )
    differ = config_difference(token_file.model_config, model.config)
    if differ:
        raise ValueError(
            f"{path}: made by another model config than the loaded one ({differ}); decode it with its --config "
            "beside --checkpoint or --random-weights, or --force to decode anyway"
        )


def _same_weights_loaded(token_file: TokenFile, model: TiTok) -> bool:
    """Whether the file names random weights (``random-seed<N>-<their digest>``) that ``model`` holds, loaded into
    it (named by their digest alone, as ``encode_files`` names weights it works the digest of out)."""
    recorded, held = token_file.weights_digest, model.weights_digest
    return random_seed(recorded) is not None and random_seed(held) is None and recorded.endswith(f"-{held}")


def config_difference(recorded: dict[str, Any], config: TiTokConfig) -> str:
    """"" when the model config a token file records is ``config`` in what makes tokens (MODEL_FIELDS: patch,
    FSQ levels, stack sizes), else one line saying what differs (or that it cannot be read)."""
    try:
        made_by = TiTokConfig.from_any(recorded)
    except (ValueError, TypeError, KeyError) as e:
        return f"its model config cannot be read: {brief(_one_line(e))}"
    differ = [(k, getattr(made_by, k), getattr(config, k)) for k in MODEL_FIELDS]
    return "; ".join(f"{k} {_plain(a)}, now {_plain(b)}" for k, a, b in differ if a != b)


def collect_token_files(inputs: Sequence[str | os.PathLike], list_names: str = "stem",
                        written: tuple[str, str] = (".mp4", "decoded")) -> Inputs:  # fmt: skip
    """Token files given as files, folders (every ``*.safetensors`` below, the folder structure kept in the
    names, as encode wrote them), tar archives (shards: ``pack``'s; each stands for a folder of its name, given or
    found in a folder, and its members are named by their paths through it) or list files (``.txt``, ...: as for
    :func:`collect_inputs`, ``list_names`` included), as ``(token file, output name)`` pairs; a file given is
    taken as a token file, to fail alone if it is not one. A path given that does not exist is an error (it was
    typed), as are two token files for one output name (before any model is loaded); a file reached twice is
    taken once; sub-folders that cannot be listed are in the result's ``unlisted``. ``written``: what each token
    file's output name is given (its suffix) and what is done with it, for the messages (decode's, by default)."""
    return _collect(inputs, TOKEN_EXTENSIONS, list_names, ("token files", *written))


def decode_files(
    engine: Engine,
    paths: Sequence[str | os.PathLike | tuple[str | os.PathLike, str]],
    outdir: str | os.PathLike,
    *,
    with_source: bool = False,
    force: bool = False,
    overwrite: bool = False,
    scores: list[float] | None = None,
) -> Summary:
    """Token files -> ``outdir/<stem>.mp4`` (optionally the source beside the reconstruction), written chunk by
    chunk; an mp4 appears under its name only when complete. ``paths`` may also hold ``(token file, output
    name)`` pairs (:func:`collect_token_files`): the mp4 is then ``outdir/<name>.mp4``. With the source,
    ``scores`` (if given) receives each chunk's PSNR (dB) against it, for the files decoded completely.

    Whatever goes wrong with one token file (a stranger's may hold anything) is that file's failure, one line
    naming the error, and the others go on; only an interrupt (KeyboardInterrupt, SystemExit) ends the run."""
    outdir = Path(outdir)
    pairs = [(os.fspath(p[0]), p[1]) if isinstance(p, tuple) else (os.fspath(p), Path(p).stem) for p in paths]
    todo = _one_per_output(pairs, "token files", ".mp4", "decoded")  # a file given twice: once, under its first name
    summary = Summary()
    start = time.perf_counter()
    stale: dict[Path, dict[str, list[str]]] = {}  # per folder: what a killed run left, removed as it is passed
    unrecorded, first_unrecorded = 0, []  # mp4 files kept that record no decode (said once, at the end)
    record_of = decode_records(engine, with_source)
    unforeseen_in_a_row = 0  # failures no check foresaw, one after another: GIVE_UP_AFTER of them say it is no file's
    unwritten_in_a_row = 0  # videos that could not be written (an I/O error), with none written since: likewise
    for path, name in _progress(unit="file", iterable=todo):
        out = outdir / f"{name}.mp4"
        file_scores: list[float] | None = None if scores is None else []
        try:  # (a name too long or a folder that cannot be read fails this file alone)
            if (there_now := _look_at(out)) is not None and not stat.S_ISREG(there_now.st_mode):  # a FIFO, a folder
                raise ValueError(f"{out} is {kind_of(there_now.st_mode)} (where its links lead), not a video: kept; "
                                 "remove it or choose another output folder")  # fmt: skip
            _remove_temporaries(stale, out)  # beside a complete one too (a killed --overwrite run's)
            data = _member_bytes(path)  # (a shard's member: read once, for its record and to decode it)
            now, exists = record_of(path, data), there_now is not None and there_now.st_size > 0
            if exists and split_member(path) is None and os.path.samefile(out, path):  # a token file named .mp4,
                # decoded into its own folder (a member of an archive is none: the archive is named .tar)
                raise ValueError(f"{out} is the token file itself: decoding there would replace it; choose another "
                                 "output folder")  # fmt: skip
            there = video_comment(out) if exists else None  # (None: no video there, or one that cannot be read)
            ours = there is not None and there.startswith(DECODE_RECORD)
            then = _record_of(there) if ours else None  # (parsed once: a dict from here)
            damaged = exists and there is None and _damaged_mp4(out)  # (a copy cut short): decoded again over it
            # an mp4 written whole (atomically) from this token file this way: complete; one that records no decode:
            # kept, said once below
            if exists and not damaged and not overwrite and (not ours or _same_decode(then, now)):
                if ours:
                    summary.skipped.append(str(path))
                else:  # (its source video, or a copy of it, is no earlier output: that file fails, saying so)
                    _not_its_source(out, path, token_file_at(path, data), there_now)
                    unrecorded += 1
                    first_unrecorded += [out] if unrecorded <= 3 else []
                continue
            token_file = token_file_at(path, data)
            if exists:  # (first: --overwrite, which the messages below suggest, would not decode over these)
                _not_its_source(out, path, token_file, there_now, ours)
            if exists and ours and not overwrite and not force and _decoded_by_own_weights(then, now, token_file):
                summary.skipped.append(str(path))  # (a folder of token files of several weights: one run each)
                continue
            if exists and ours and not overwrite and not _same_source(other := _decoded_from(then), token_file.source):
                raise ValueError(f"{out} was decoded from the tokens of another video ({other}): kept; --overwrite "
                                 "replaces it, or choose another output folder")  # fmt: skip
            record = DECODE_RECORD + json.dumps({**now, "source": token_file.source}, sort_keys=True)
            if not force:
                check_same_model(engine.model, token_file, path)
            if not token_file.token_counts.numel():
                raise ValueError(f"{path} holds no chunks: nothing to decode")
            check_decodable(engine, token_file, path)
            out.parent.mkdir(parents=True, exist_ok=True)
            chunks = decoded_chunks(engine, token_file)  # one chunk at a time: any length fits in memory
            if with_source:
                chunks = _beside_source(token_file, chunks, file_scores)
            fps = max(playback_rate(token_file), MIN_WRITE_FPS)  # a slower one is not written
            with VideoWriter(out, fps, comment=record) as writer:
                for chunk in chunks:
                    writer.write(chunk)
        except Exception as e:  # not only the errors foreseen: one file must never end the run, but a full disk
            if getattr(e, "errno", None) in NO_ROOM:  # (quota, read-only file system) fails every one after it
                raise OSError(f"cannot write {out} ({e.strerror}): the run stops") from None
            if _device_fault_in(e):
                raise  # (a CUDA error leaves the device unusable: every file after it would fail), as encode stops
            if not isinstance(e, (ValueError, OSError)):  # (the foreseen ones say all in their line)
                show_traceback(e, path)
                unforeseen_in_a_row += 1
                if unforeseen_in_a_row >= GIVE_UP_AFTER:
                    raise RuntimeError(f"giving up after {unforeseen_in_a_row} token files in a row failed alone: "
                                       f"{_one_line(e)}") from e  # fmt: skip
            writing = isinstance(e, OSError) and e.filename == absolute(out)  # (said as encode says it)
            summary.failed.append((str(path), f"cannot write {out}: {e.strerror or e}" if writing else _one_line(e)))
            unwritten_in_a_row += writing
            if unwritten_in_a_row >= GIVE_UP_AFTER:  # (a failing disk, permissions taken away: as encode stops)
                raise OSError(f"cannot write {out}: {e.strerror or e}; {unwritten_in_a_row} videos in a row could not "
                              "be written: the run stops") from None  # fmt: skip
            continue
        unforeseen_in_a_row = unwritten_in_a_row = 0
        if scores is not None:
            scores.extend(file_scores)
        summary.done.append(str(path))
        summary.clips += token_file.token_counts.numel()
    _remove_other_temporaries(stale)
    if unrecorded:
        named = ", ".join(map(str, first_unrecorded)) + (f" and {unrecorded - 3:,} more" if unrecorded > 3 else "")
        notice(f"{unrecorded:,} mp4 file(s) there record no decode (written by a version before decode recorded "
               f"what it decoded, or not by decode) and were kept: {named}; --overwrite decodes them again (never "
               "over a token file's own source video)")  # fmt: skip
    summary.seconds = time.perf_counter() - start
    return summary


def _decoded_by_own_weights(then: dict | None, now: dict, token_file: TokenFile) -> bool:
    """Whether the video whose record is ``then`` (:func:`_record_of`) was decoded from the token file as it is now,
    the same way (the source beside it or not), by the weights that made it, where this run's (``now``) are others:
    complete, although this run would have decoded it otherwise (it could not without --force). The same weights
    with another config (FSQ levels have no weights) count as others where that config is the token file's."""
    if then is None or then.get("weights") != token_file.weights_digest:
        return False
    same = all(then.get(key) == now[key] for key in ("tokens", "beside_source"))
    if then["weights"] != now["weights"]:
        return same
    try:  # (a stranger's config, which no model may have, has decoded nothing)
        own = config_digest(TiTokConfig.from_any(token_file.model_config))
    except (ValueError, TypeError, KeyError):
        return False
    return same and then.get("config") == own != now["config"]


def playback_rate(token_file: TokenFile) -> float:
    """The frame rate a decoded video is written at: its chunks' frames over the source time they span, so that it
    lasts as long as the part of the source its chunks cover. Upstream's sampling takes int(T x source fps / fps)
    source frames a chunk: 74 of a 29.97 fps source for 20 frames at 8 fps, 2.469 s, not 2.5, and a video written
    at 8 fps drifted 1.2% from its source (43 s an hour). The sampling rate where the chunks' start times say
    nothing (one chunk) and the file records no chunk's span (made before it did), or where the rate would be past
    the bounds."""
    starts, chunks = token_file.start_times, token_file.start_times.numel()
    span = float(starts[-1] - starts[0]) if chunks > 1 else 0.0
    if span > 0:
        rate = token_file.frames_per_chunk * (chunks - 1) / span
    elif token_file.chunk_seconds is not None:  # one chunk: the time it spans
        rate = token_file.frames_per_chunk / token_file.chunk_seconds
    else:
        rate = token_file.fps
    return rate if MIN_WRITE_FPS <= rate <= MAX_FPS else token_file.fps


def _record_of(text: str) -> dict | None:
    """A video's decode record (its comment tag, beginning DECODE_RECORD) as a dict; None where it is not one (a
    video already in the output folder may be anybody's: its tag is read, never trusted)."""
    try:
        found = json.loads(text[len(DECODE_RECORD) :])
    except (ValueError, RecursionError):  # (deep nesting: json's parser recurses)
        return None
    return found if isinstance(found, dict) else None


def _same_decode(then: dict | None, now: dict) -> bool:
    """Whether a video's record ``then`` is the decode ``now`` says, whatever source video it names (``now`` is made
    before the token file is read)."""
    return then is not None and {k: v for k, v in then.items() if k != "source"} == now


def _decoded_from(then: dict | None) -> str | None:
    """The source video whose tokens the video recording ``then`` was decoded from (None: not recorded)."""
    source = (then or {}).get("source")
    return source if isinstance(source, str) else None


def _same_source(recorded: str | None, source: str) -> bool:
    """Whether a video recording ``recorded`` (None: an earlier version's record) may have been decoded from tokens
    of the video at ``source``: the same path, the same file reached by another (a link to its folder), or either
    gone, so that nothing tells (a dataset moved, its tokens made again from there: decoded again, as before)."""
    if recorded is None or recorded == source:
        return True
    try:
        return os.path.samefile(recorded, source)
    except (OSError, ValueError):  # (gone; a NUL in a stranger's record)
        return True


def _damaged_mp4(path: Path) -> bool:
    """Whether ``path``, which cannot be opened as a video, begins as an MP4 does (an ``ftyp`` box): a video
    damaged since it was written (cut short, overwritten in part), not some other file of that name."""
    head = file_head(path, 8)
    return head is not None and head[4:8] == b"ftyp"


def token_file_at(path: str | os.PathLike, data: bytes | None = None) -> TokenFile:
    """:func:`load_tokens` of a token file given to decode or pack (``data``: its bytes, read already); one that
    cannot be read and is named as a video is said to be one (a video given where token files go: ``encode`` makes
    them)."""
    try:
        return load_tokens(path, data)
    except TokenFileError:
        if split_suffix(os.fspath(path))[1].lower() not in VIDEO_EXTENSIONS:
            raise
        raise TokenFileError(f"{path}: a video file, not a token file: `titok-fast encode` makes token files from "
                             "videos") from None


DECODE_RECORD = "titok-fast decode "  # the comment tag of the videos decode writes begins so (decode_records)


def _not_its_source(out: Path, path, token_file: TokenFile, there: os.stat_result, ours: bool = False) -> None:
    """Refuse to decode the token file ``path`` over ``out`` (``there``: its stat) where ``out`` is the token
    file's source video, or (not a video decode wrote: ``ours`` False) one of its size, a copy of it (a dataset
    copied or moved with its tokens): a ValueError that fails that file alone."""
    if os.path.isfile(token_file.source) and os.path.samefile(out, token_file.source):
        raise ValueError(f"{out} is the source video of {path}: decoding there would replace it; choose another "
                         "output folder")  # fmt: skip
    size = str(token_file.made_with.get("source_stamp", "")).partition(":")[0]
    if not ours and size == str(there.st_size):
        raise ValueError(f"{out} has the size of the source video {path} was made from (a copy of it): decoding "
                         "there would replace it; choose another output folder")  # fmt: skip


def decode_records(engine: Engine, with_source: bool) -> Callable[..., dict[str, Any]]:
    """What a video decoded from a token file (the function's arguments: its path, and for a shard's member its
    bytes where they were read already) records in its comment tag (after
    DECODE_RECORD, as JSON): the token
    file's size and modification time, the weights, model config, dtype and precision (where not the default: the
    records of before stay valid) that decoded it, and whether its source is beside it (all but the first the same
    for every file of a run: worked out once); the video written records the path of the token file's source video
    too, once the token file is read. A rerun skips a video that records what it would write
    (whatever source it names), decodes again one that records otherwise (its token file was made again since, or
    it is decoded another way), and keeps one decoded from the tokens of another source video (unless
    --overwrite)."""
    made = {"weights": engine.model.weights_digest, "config": config_digest(engine.model.config),
            "dtype": str(engine.model.dtype).removeprefix("torch."), "beside_source": with_source}  # fmt: skip
    if engine.model.precision != "default":  # (FP8 decoding: other pixels, 36 dB from float32's against bf16's 50)
        made["precision"] = engine.model.precision
    return lambda path, data=None: {**made, "tokens": _tokens_stamp(path, data)}


def _tokens_stamp(path: str | os.PathLike, data: bytes | None = None) -> str:
    """What a decoded video records of the token file it was decoded from: its size and modification time, or for
    a token file in a shard its size and the digest it records (``<size>:sha256:<hex>``), so that a shard written
    again (a member of it made again, ``pack --overwrite``) has its other members' videos kept: the shard's time
    is every member's. ``data``: a member's bytes, read already (:func:`_member_bytes`)."""
    if split_member(path) is None:
        return source_stamp(path)
    data = _member_bytes(path) if data is None else data
    digest = recorded_digest(data) if data is not None else None
    return f"{len(data)}:{digest}" if digest else source_stamp(path)


def _member_bytes(path: str | os.PathLike) -> bytes | None:
    """The bytes of the token file ``path`` where it is a shard's member (its record and its decoding read them
    once); None for a plain file, or where it cannot be read (said when it is read to be decoded)."""
    if split_member(path) is None:
        return None
    try:
        return read_token_bytes(path)
    except TokenFileError:
        return None


def config_digest(config: TiTokConfig) -> str:
    """What a decoded video records of the model config that decoded it."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _one_line(error: BaseException) -> str:
    """An error as one line: its message for the errors foreseen, else its type and message (an IndexError's
    message alone would not say what went wrong)."""
    text = " ".join(str(error).split())
    if text and isinstance(error, (ValueError, TypeError, RuntimeError, OSError)):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def evaluate(
    engine: Engine,
    files: Sequence[tuple[Path, str] | str | os.PathLike],
    settings: ClipSettings,
    token_counts: Sequence[int],
    *,
    workers: int | None = None,
    group: int = 32,
    per_file: dict | None = None,
    stall_seconds: float | None = STALL_SECONDS,
) -> tuple[dict, Summary]:
    """Encode and decode every clip at each token count; mean PSNR (dB, :func:`scored_psnr`) and SSIM over clips
    per token count, each against the source clip clamped to [-1, 1].

    Clips stream from the files (``workers`` threads, default one per core) in groups of ``group`` (memory does
    not grow with the inputs); a file that fails to read, even midway, or stalls (no clip for ``stall_seconds``)
    is reported and none of its clips count.
    ``per_file``, if given, receives each complete file's own sums: {path: {n: {"psnr": sum, "ssim": sum,
    "clips": clips}}}."""
    check_clip_settings(settings, engine.model, engine.budgets, token_counts)
    files = input_pairs(files, outputs=False)
    workers = workers or default_workers()
    token_counts = list(dict.fromkeys(token_counts))  # a count given twice is measured once (not summed twice)
    summary = Summary()
    start = time.perf_counter()
    sums: dict[int, dict[int, list[float]]] = {}  # file number -> {n: [PSNR sum, SSIM sum]} over its scored clips
    scored: dict[int, int] = {}  # file number -> clips scored
    complete: list[int] = []  # files read to the end; only their clips count
    paths: dict[int, str] = {}
    readers: dict[int, Any] = {}  # file number -> its ClipReader (how many frames of its last clip are real)
    held: dict[int, tuple[int, torch.Tensor]] = {}  # each file's furthest clip so far (its number in the file, the
    # clip), scored once a later one or the file's end has come (the parts of a split file come interleaved)
    batch: list[tuple[int, torch.Tensor, int]] = []  # (file number, clip, its real frames: the padding not scored)

    def score_batch() -> None:
        inputs = [normalize_pixels(c, engine.model.dtype) for _, c, _ in batch]
        targets = [normalize_pixels(c, torch.float32) for _, c, _ in batch]
        for n in token_counts:
            _, out = engine.encode(inputs, [n] * len(batch))
            recon = engine.decode_indices(out["indices"], [settings.grid] * len(batch))
            for (number, _, real), r, target in zip(batch, recon, targets, strict=True):
                r, target = r.float().clamp(-1, 1).cpu()[:, :real], target[:, :real].clamp(-1, 1)
                sums[number][n][0] += scored_psnr(r, target)
                sums[number][n][1] += ssim(r, target)
        for number, _, _ in batch:
            scored[number] += 1
        batch.clear()

    def score(number: int, clip: torch.Tensor, real: int) -> None:
        batch.append((number, clip, real))
        if len(batch) == group:
            score_batch()

    reading = {**settings.read_kwargs(), "decoder": "cpu", "preprocess": "cpu"}  # eval's clips: the exact path
    files_read = interleaved_videos(
        [p for p, _ in files], workers=workers, capacity=group, stall_seconds=stall_seconds, **reading
    )  # clips taken from whichever file has one ready (see encode_files)
    with contextlib.closing(files_read):
        for number, kind, value in files_read:
            if kind == "open":
                paths[number], readers[number] = str(value[0]), value[1].reader
                sums[number], scored[number] = {n: [0.0, 0.0] for n in token_counts}, 0
            elif kind == "clip":
                clip = (value[0], value[1])
                if number in held and held[number][0] > clip[0]:
                    clip, held[number] = held[number], clip
                if number in held:  # not the last: every frame real
                    score(number, held[number][1], settings.grid[0])
                held[number] = clip
            elif kind == "error":
                summary.failed.append((paths[number], str(value)))
                held.pop(number, None)
                batch[:] = [item for item in batch if item[0] != number]
            else:  # "end": the last clip's frames past the video's end (tail="pad") are padding, as decode trims them
                if number in held:
                    score(number, held.pop(number)[1], readers[number].last_clip_frames)
                summary.done.append(paths[number])
                complete.append(number)
        if batch:
            score_batch()
    summary.in_order_of(files)  # files end in any order: said in the inputs' order
    if per_file is not None:
        for f in complete:
            per_file[paths[f]] = {n: {"psnr": p, "ssim": q, "clips": scored[f]} for n, (p, q) in sums[f].items()}
    clips = sum(scored[f] for f in complete)
    if not clips:
        if not summary.failed:
            raise InputError("no clips to evaluate: no inputs")
        more = len(summary.failed) - 1
        first = f"{summary.failed[0][1]}{f'; and {more} more' if more else ''}"
        raise InputError(f"no clips to evaluate: every input failed ({first})")
    table = {
        n: {
            "psnr": sum(sums[f][n][0] for f in complete) / clips,
            "ssim": sum(sums[f][n][1] for f in complete) / clips,
            "clips": clips,
        }
        for n in token_counts
    }
    summary.clips = clips  # (each scored at every token count)
    summary.seconds = time.perf_counter() - start
    return table, summary
