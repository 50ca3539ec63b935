"""Token files packed into tar shards, as WebDataset reads a dataset: ``00000.tar`` holding ``clip.safetensors``, ...

A training job that reads a million token files of a few KB each from a network file system spends its time on
opening files; shards of 10,000 read as a few large sequential files. ``pack`` writes them from the token files
``encode`` wrote, either by count (consecutive names, sorted) or one shard per folder (``tokens/00000/`` ->
``00000.tar``: the shards of tokens then mirror the shards of videos they were made from). Each shard is written
to a temporary name, synced and renamed, so a shard under its name is complete; a rerun keeps a shard whose
members are already the token files it would hold, byte for byte, and writes the others again. Every token file is
validated before it is packed (:func:`titok_fast.tokens.load_tokens`), and all must be of one model (weights and
config), as ``decode`` asks. The files beside a token file's source video of its stem (video2dataset's
``000000001.json`` and ``.txt`` caption) may be packed beside it under its key, so that a shard holds what a model
trains on.

The shards are plain uncompressed tar archives (pax format where a name needs it), members in name order, their
modification time the token file's: ``tar -x`` unpacks them, WebDataset reads them (its key is a member's name up
to the first dot of its base name), and titok-fast reads them in place (``load_tokens("shards/00000.tar/clip
.safetensors")``, :func:`read_shard`, ``decode shards/``).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import math
import os
import stat
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .archives import ArchiveError, NoSuchMember, is_archive, member_of, open_listed, split_member, split_suffix
from .files import (
    MAX_PER_SHARD,
    PER_SHARD,
    absolute,
    brief,
    escaped,
    kind_of,
    lies_in,
    notice,
    open_atomically,
    remove_left,
    temporary_target,
)
from .pipeline import (
    FETCH_CHUNK_BYTES,
    NO_ROOM,
    _ahead,
    _check_name,
    _naming,
    _one_line,
    _threads_for,
    folders_above,
    token_file_at,
)
from .tokens import MAX_FILE_BYTES, TokenFile, TokenFileError, load_tokens, read_at_most, read_token_bytes
from .video import is_recorded_source

SUFFIX = ".safetensors"
READ_BUFFER = 1 << 20  # bytes read_shard reads at a time
MAX_BESIDE_BYTES = 1 << 26  # a file packed beside tokens (a caption, a JSON record: a few KB) is read whole
MAX_BESIDE_MEMBERS = 64  # members read_shard gives beside one token file
BESIDE_KIND = "a file beside a source, as pack --with reads it,"
WRITE_BUFFER = 1 << 20  # bytes a shard is written a time (a network file system: a round trip each)
PAX = tarfile.PAX_FORMAT  # (a ustar header where a name fits one, a pax header before it where not)


@dataclass(frozen=True)
class Shard:
    """One shard to write: ``name`` (its path below the output folder, without ``.tar``) and its ``files``, (token
    file, member name) pairs in the order they are packed."""

    name: str
    files: tuple[tuple[str, str], ...]


Files = Sequence[tuple[str | os.PathLike, str]]  # (token file, output name) pairs


def plan_shards(files: Files, per_shard: int | None = PER_SHARD) -> list[Shard]:
    """The shards that hold ``files`` ((token file, output name) pairs, as :func:`titok_fast.pipeline.
    collect_token_files` gives them): sorted by name, ``per_shard`` a shard, named ``00000``, ``00001``, ... (at
    least five digits: ``100000`` follows ``99999``, so more files never rename the shards before), each member named
    by the file's output name; or, with ``per_shard`` None, one shard for each folder of names, named by that folder,
    each member by its name in it (``a/b/c`` -> shard ``a/b``, member ``c.safetensors``); a name in no folder is then
    in none (:func:`strays`)."""
    if per_shard is None:
        folders: dict[str, list[tuple[str, str]]] = {}
        for path, name in files:
            folder, _, base = name.rpartition("/")
            if folder:
                folders.setdefault(folder, []).append((os.fspath(path), base + SUFFIX))
        return [Shard(folder, tuple(sorted(items, key=_member_name))) for folder, items in sorted(folders.items())]
    if not 1 <= per_shard <= MAX_PER_SHARD:
        raise ValueError(f"per_shard must be from 1 to {MAX_PER_SHARD:,}; got {per_shard}")
    ordered = sorted(((os.fspath(path), name + SUFFIX) for path, name in files), key=_member_name)
    count = -(-len(ordered) // per_shard)
    return [Shard(f"{k:05d}", tuple(ordered[k * per_shard : (k + 1) * per_shard])) for k in range(count)]


def strays(files: Files) -> list[tuple[str, str]]:
    """The token files of ``files`` in no folder below their input, which ``--per-folder`` packs into no shard, as
    (path, reason) failures."""
    return [(os.fspath(path), f"a token file in no folder below its input (named {name!r}): --per-folder packs "
             "each folder's token files into a shard of its name (pack its folder's parent, or by count)")
            for path, name in files if "/" not in name]  # fmt: skip


def _member_name(pair: tuple[str, str]) -> str:
    return pair[1]


@dataclass
class Packed:
    """What :func:`pack_tokens` did: token files packed into the shards written (``done``), those in shards found
    complete (``skipped``) and those that failed, as ``(path, one-line reason)``; the shards ``written`` and
    ``kept`` (paths), the chunks packed and the seconds it took."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    without: collections.Counter = field(default_factory=collections.Counter)  # extension -> token files packed
    # (or kept) without a file of it beside their source, where there is none
    clips: int = 0
    seconds: float = 0.0

    def report(self, outdir: str | os.PathLike) -> str:
        lines = [f"packed {len(self.done):,} token file(s), {self.clips:,} chunk(s), into {len(self.written):,} "
                 f"shard(s) in {escaped(os.fspath(outdir))} in {self.seconds:.1f} s"]  # fmt: skip
        if self.kept:
            lines.append(f"kept {len(self.kept):,} shard(s) already complete ({len(self.skipped):,} token file(s))")
        lines += [f"{count:,} token file(s) in them without a .{extension} (none beside their source)"
                  for extension, count in sorted(self.without.items())]  # fmt: skip
        if self.failed:
            lines.append(f"failed {len(self.failed):,} token file(s), not packed:")
            lines += [f"  FAILED {escaped(_naming(path, reason))}" for path, reason in self.failed]
        return "\n".join(lines)


Accept = Callable[[str, TokenFile], str]  # a token file's path and contents -> "" to pack it, else why not


def pack_tokens(
    files: Files,
    outdir: str | os.PathLike,
    *,
    per_shard: int | None = PER_SHARD,
    overwrite: bool = False,
    accept: Accept | None = None,
    beside: Sequence[str] = (),
    progress: Callable[[int], object] | None = None,
) -> Packed:
    """Pack ``files`` ((token file, output name) pairs) into the shards :func:`plan_shards` plans, under
    ``outdir``. A token file that cannot be read, is not valid or that ``accept`` refuses is that file's failure:
    it is left out of its shard, the others are packed. A shard already there whose members are the token files it
    would hold, byte for byte, is kept (unless ``overwrite``); any other is written again. Refused up front (a
    ValueError): a token file inside ``outdir`` (a shard written would change an input), or a ``.tar`` file under
    ``outdir`` that is not one of the planned shards (another run's, by another count: a reader of the folder would
    read both). ``beside``: extensions (``"json"``, ``"txt"``) of files beside each token file's source video,
    of its stem (``000000001.json`` beside ``000000001.mp4``, in its folder or archive), packed beside its tokens
    under its member's name (``000000001.json``) in that order: read only where the source is the very file the
    tokens were made from (the size and modification time the token file records), as ``decode --side-by-side``
    reads it, each at most MAX_BESIDE_BYTES; one that is not there is left out (``Packed.without`` counts them),
    and a token file whose source, or a file beside it that is there, cannot be read so fails alone.
    ``progress`` is called with the number of token files passed, as they are."""
    start = time.perf_counter()
    outdir = Path(absolute(outdir))
    for path, name in files:  # (a caller's pairs: none leads out of the output folder)
        _check_name(path, name, ".safetensors")
    shards = plan_shards(files, per_shard)
    _check_apart(files, outdir)
    _check_outputs(outdir, shards, overwrite)
    threads = _threads_for(outdir, files[0][0]) if files else 0  # (a network file system: read ahead)
    packed = Packed(failed=strays(files) if per_shard is None else [])
    for shard in shards:
        path = outdir / f"{shard.name}.tar"
        failed: list[tuple[str, str]] = []
        without: collections.Counter = collections.Counter()
        try:
            if not overwrite and _complete(path, _token_files(shard, accept, beside, threads, failed, without)):
                packed.kept.append(str(path))
                failing = {source for source, _ in failed}
                packed.skipped += [source for source, _ in shard.files if source not in failing]
            else:
                failed, done, without = [], [], collections.Counter()
                packed.clips += _write(path, _token_files(shard, accept, beside, threads, failed, without), done)
                packed.written.append(str(path))
                packed.done += done
            packed.without += without
        except OSError as e:  # (its folder or file cannot be made: a name too long, no permission) that shard's
            if e.errno in NO_ROOM:  # files fail alone; a full disk fails every shard after it: the run stops
                raise OSError(e.errno, f"cannot write {path} ({e.strerror}): the run stops") from None
            failing = {source for source, _ in failed}
            failed += [(source, f"cannot write its shard {path}: {e.strerror or e}") for source, _ in shard.files
                       if source not in failing]  # fmt: skip
        packed.failed += failed
        if progress is not None:
            progress(len(shard.files))
    packed.seconds = time.perf_counter() - start
    return packed


class _Read(NamedTuple):
    """A token file read for packing: its members ((name, bytes): the token file's, then the files beside its
    source), what it holds, its modification time (whole seconds) and the extensions asked for beside its source
    that are not there."""

    members: tuple[tuple[str, bytes], ...]
    token_file: TokenFile
    mtime: int
    missing: tuple[str, ...] = ()


def _read(source: str, member: str, accept: Accept | None, beside: Sequence[str],
          budget: float = math.inf) -> _Read | Exception | None:  # fmt: skip
    """The token file ``source``, to be the shard's ``member``, read and validated, with the files ``beside`` its
    source; or the TokenFileError (or OSError) naming it that says why it cannot be packed: it cannot be read, is
    not a token file, ``accept`` refuses it or a file beside its source cannot be read; or None where they hold
    more than ``budget`` bytes (read ahead: left to the consumer)."""
    try:
        if budget < math.inf and _size(source) > budget:  # (a look more: only where a thread reads ahead)
            return None
        data = read_token_bytes(source)
        token_file = token_file_at(source, data)
        if accept is not None and (why := accept(source, token_file)):
            raise TokenFileError(f"{source}: {why}")
        missing: list[str] = []
        members = ((member, data), *_beside_source(source, member, token_file, beside, budget - len(data), missing))
        found = member_of(source)  # (the modification time of an archive's member: its archive's)
        mtime_ns = os.stat(source).st_mtime_ns if found is None else found.mtime_ns
    except _OverBudget:
        return None
    except (TokenFileError, OSError) as e:
        return e
    return _Read(members, token_file, mtime_ns // 1_000_000_000, tuple(missing))


class _OverBudget(Exception):
    """Files beside a source that a thread reading ahead leaves to the consumer: more bytes than it may hold."""


def _size(path: str) -> int:
    """The size of the file (or archive member) ``path``; 0 where it cannot be looked at (reading it says why)."""
    try:
        member = member_of(path)
        return os.stat(path).st_size if member is None else member.size
    except (OSError, ValueError):
        return 0


def _beside_source(source: str, member: str, token_file: TokenFile, extensions: Sequence[str],
                   budget: float = math.inf, missing: list[str] | None = None) -> list:  # fmt: skip
    """(member name, bytes) of the files of ``extensions`` beside the token file's source video, of its stem, the
    extensions of those not there appended to ``missing`` (a video with no caption: its tokens are packed without
    one); TokenFileError naming the token file ``source`` where its source is not the file its tokens were made from
    (a stranger's token file cannot have another file read) or a file beside it cannot be read; _OverBudget where
    they hold more than ``budget`` bytes."""
    if not extensions:
        return []
    video, recorded = token_file.source, token_file.made_with.get("source_stamp")
    if not recorded:
        raise TokenFileError(f"{source}: records no size and modification time of its source (made by an earlier "
                             "version): the files beside it cannot be known to be its source's")  # fmt: skip
    if not is_recorded_source(video, recorded):
        raise TokenFileError(f"{source}: its source {brief(video)!r} is not the file its tokens were made from (its "
                             "size and modification time differ, or it is not there): the files beside it cannot be "
                             "packed")  # fmt: skip
    stem, key = split_suffix(video)[0], member.removesuffix(SUFFIX)
    found, together = [], 0
    for extension in extensions:
        path = f"{stem}.{extension}"
        if budget < math.inf and (budget := budget - min(_size(path), MAX_BESIDE_BYTES)) < 0:
            raise _OverBudget
        try:
            found.append((f"{key}.{extension}", read_at_most(path, MAX_BESIDE_BYTES, BESIDE_KIND)))
        except (FileNotFoundError, NoSuchMember):
            if missing is not None:
                missing.append(extension)
            continue
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise TokenFileError(f"{source}: {brief(stem)}.{extension}, beside its source, cannot be packed "
                                 f"({reason})") from None  # fmt: skip
        if (together := together + len(found[-1][1])) > MAX_BESIDE_BYTES:  # (what read_shard reads beside one)
            raise TokenFileError(f"{source}: the files beside its source hold {together:,} bytes or more together; "
                                 f"at most {MAX_BESIDE_BYTES:,} are packed beside a token file")  # fmt: skip
    return found


def _read_chunk(chunk: Sequence[tuple[str, str]], accept: Accept | None, beside: Sequence[str]) -> list:
    """:func:`_read` of each of ``chunk``'s token files, in a thread reading ahead, at most FETCH_CHUNK_BYTES of
    them: None for the others (the consumer reads them when it comes to them)."""
    found: list[_Read | Exception | None] = []
    budget = FETCH_CHUNK_BYTES
    for source, member in chunk:
        found.append(_read(source, member, accept, beside, budget))
        budget -= sum(len(data) for _, data in found[-1].members) if isinstance(found[-1], _Read) else 0
    return found


def _token_files(shard: Shard, accept: Accept | None, beside: Sequence[str], threads: int,
                 failed: list[tuple[str, str]], without: collections.Counter,
                 ) -> Iterator[tuple[str, _Read]]:  # fmt: skip
    """(token file, :func:`_read`'s result) for each of ``shard``'s files that can be packed, in order, read
    ``threads`` at a time ahead (0: each as it comes); those that cannot go to ``failed``, with why; the extensions
    missing beside the sources of those given are counted in ``without``."""
    fetched = _ahead(functools.partial(_read_chunk, accept=accept, beside=beside), shard.files, threads)
    try:
        for (source, member), read in zip(shard.files, fetched, strict=True):
            got = _read(source, member, accept, beside) if read is None else read
            if isinstance(got, Exception):
                failed.append((source, _one_line(got)))
            else:
                without.update(got.missing)
                yield source, got
    finally:
        fetched.close()


def _complete(path: Path, read: Iterator[tuple[str, _Read]]) -> bool:
    """Whether the shard at ``path`` holds exactly the token files ``read`` gives (:func:`_token_files`: those of a
    shard that can be packed now), in order and byte for byte; False where there is none or it cannot be read."""
    try:
        archive, listing = open_listed(path)
    except (OSError, ValueError):  # (none there, not an archive: written again over it)
        return False
    if listing.cut or listing.left_out:
        archive.close()
        return False
    names, at = list(listing.members), 0
    with archive, contextlib.closing(read):
        for _, got in read:
            for member, data in got.members:
                if at >= len(names) or names[at] != member:
                    return False
                offset, size = listing.members[member]
                if size != len(data) or os.pread(archive.fileno(), size, offset) != data:
                    return False
                at += 1
    return at == len(names)


def _write(path: Path, read: Iterator[tuple[str, _Read]], done: list[str]) -> int:
    """Write the token files ``read`` gives (:func:`_token_files`) to the shard ``path`` (atomically), those
    packed to ``done``; the number of chunks packed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = 0  # (not tidy: the temporaries killed runs left were swept once, by _check_outputs, not once a shard)
    with (open_atomically(path, buffering=WRITE_BUFFER) as file, contextlib.closing(read),
          tarfile.open(fileobj=file, mode="w", format=PAX) as tar):  # fmt: skip
        for source, got in read:
            for member, data in got.members:
                info = tarfile.TarInfo(member)
                info.size, info.mtime, info.mode = len(data), got.mtime, 0o644
                tar.addfile(info, io.BytesIO(data))
            done.append(source)
            chunks += got.token_file.token_counts.numel()
    return chunks


def _check_apart(files: Files, outdir: Path) -> None:
    """A ValueError where a token file (or the archive holding it: itself, where its links lead) lies in
    ``outdir``, as the system resolves both: a shard written there would change an input. Each folder and archive is
    resolved once."""
    inside: dict[str, bool] = {}
    for path, _ in files:
        split = split_member(path)
        holder = os.path.dirname(absolute(path)) if split is None else absolute(split[0])
        if holder not in inside:
            inside[holder] = lies_in(holder, outdir)
        if inside[holder]:
            raise ValueError(f"{path} lies in the output folder {outdir}: packing would write over its inputs; "
                             "choose another output folder")  # fmt: skip


def _check_outputs(outdir: Path, shards: list[Shard], overwrite: bool) -> None:
    """A ValueError where the planned ``shards`` cannot be written as planned: ``outdir`` holds a tar archive that
    is not one of them (another run's, by another count: a reader of the folder would read both), something other
    than a regular file under one's name (a folder, a FIFO), a file there that is no tar archive (a user's, kept
    unless ``overwrite``), or one shard's name is a folder another needs (``x.tar`` and ``x.tar/y.tar``). The
    temporaries killed runs left for shards there are removed (not one another run is writing)."""
    planned = {str(outdir / f"{shard.name}.tar") for shard in shards}
    others, temporaries = [], []
    for folder, _, names in os.walk(outdir):
        others += [os.path.join(folder, name) for name in names if is_archive(name)]
        temporaries += [(folder, name) for name in names if is_archive(temporary_target(name) or "")]
    for folder, name in temporaries:
        remove_left(folder, [name])
    if others := sorted(set(others) - planned):
        more = f" and {len(others) - 1:,} more" if len(others) > 1 else ""
        raise ValueError(f"{others[0]}{more}: a tar archive in the output folder that is not one of the shards this "
                         "run writes (another run's, with another --per-shard or other token files?): a reader of "
                         "the folder would read both; remove it or choose another output folder")  # fmt: skip
    for shard in shards:
        for folder in folders_above(shard.name):
            if str(outdir / folder) in planned:
                raise ValueError(f"shard {shard.name} would be written in a folder {outdir / folder}, which is "
                                 "another shard's file; rename one of their folders")  # fmt: skip
        path = outdir / f"{shard.name}.tar"
        try:
            there = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISREG(there.st_mode):
            raise ValueError(f"{path} is {kind_of(there.st_mode)}, where a shard is to be written: kept; remove it or "
                             "choose another output folder")  # fmt: skip
        if not overwrite and not _looks_like_tar(path):
            raise ValueError(f"{path} is no tar archive (not a shard pack wrote): kept; --overwrite replaces it, or "
                             "choose another output folder")  # fmt: skip


def _looks_like_tar(path: Path) -> bool:
    """Whether the file ``path`` begins as a tar archive does (a header whose checksum holds, or the zero blocks of
    an empty one), or as a shard cut short within its first block may (empty, or its ustar magic there)."""
    try:
        with open(path, "rb") as file:
            head = file.read(tarfile.BLOCKSIZE)
        if len(head) < tarfile.BLOCKSIZE:
            return not head or head[257:262] == b"ustar"
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.EOFHeaderError:  # (an empty archive's first block is zeros)
        return True
    except (OSError, tarfile.HeaderError):
        return False
    return True


def read_shard(path: str | os.PathLike, *, skip_invalid: bool = False) -> Iterator[tuple[str, TokenFile, dict]]:
    """The token files in the shard (tar archive) at ``path``, in the order it holds them, as (member name without
    ``.safetensors``, its TokenFile, validated, and the members beside it: ``{extension: bytes}`` of the members
    next to it named as it is but for the extension, ``000000001.json`` and ``000000001.txt`` beside
    ``000000001.safetensors``, as ``pack --with`` writes them: before or after it, with no other token file between;
    at most MAX_BESIDE_MEMBERS of them, MAX_BESIDE_BYTES together). The shard is read front to back through one
    file handle, READ_BUFFER bytes a read (on a network file system, a round trip per MiB, not four per token file),
    from the file it was listed from. ArchiveError where it is not an archive or is cut short; TokenFileError naming
    the member that is not a valid token file, or, with ``skip_invalid``, a notice, and the shard read on. Members
    the listing leaves out (links, devices) are said in a notice."""
    path = absolute(path)
    archive, listing = open_listed(path, READ_BUFFER)
    with archive:
        if listing.cut:
            raise ArchiveError(f"{path}: cut short: {listing.cut}")
        for _, why in listing.left_out:
            notice(f"{path}: {why}")

        def read(member: str) -> bytes:
            offset, size = listing.members[member]
            archive.seek(offset)  # (within the buffer: no system call)
            if len(data := archive.read(size)) < size:
                raise ArchiveError(f"{path}: cut short: {member!r} ends past the archive's end")
            return data

        for name, token, beside in _samples(list(listing.members)):
            try:
                if (size := listing.members[token][1]) > MAX_FILE_BYTES:
                    raise TokenFileError(f"{path}/{token}: {size:,} bytes; a token file holds at most "
                                         f"{MAX_FILE_BYTES:,}")  # fmt: skip
                token_file = load_tokens(f"{path}/{token}", read(token))
                together = sum(listing.members[member][1] for _, member in beside)
                if len(beside) > MAX_BESIDE_MEMBERS or together > MAX_BESIDE_BYTES:
                    raise TokenFileError(f"{path}/{token}: {len(beside):,} members beside it, {together:,} bytes; "
                                         f"read_shard reads at most {MAX_BESIDE_MEMBERS} members, "
                                         f"{MAX_BESIDE_BYTES:,} bytes beside a token file")  # fmt: skip
                fields = {extension: read(member) for extension, member in beside}
            except TokenFileError as e:
                if not skip_invalid:
                    raise
                notice(f"{e}; passed over")
                continue
            yield name, token_file, fields


def _samples(members: list[str]) -> Iterator[tuple[str, str, list[tuple[str, str]]]]:
    """(name, its token file's member, [(extension, member), ...] beside it) for each token file of ``members``
    (in archive order): the members named ``name.<extension>`` (no ``/`` in the extension) next to it, before or
    after, with no other token file between; a member between two token files that both name goes to the longer
    name (``clip.v2.json``: to ``clip.v2``, not ``clip``). Each member is looked at twice at most: time in
    proportion to the names' length, whatever they are."""
    tokens = [at for at, member in enumerate(members) if member.endswith(SUFFIX)]
    names = [members[at].removesuffix(SUFFIX) for at in tokens]
    beside: list[list[tuple[str, str]]] = [[] for _ in tokens]
    for k in range(len(tokens) + 1):  # the members between token file k - 1 and token file k
        start, end = tokens[k - 1] + 1 if k else 0, tokens[k] if k < len(tokens) else len(members)
        for member in members[start:end]:
            after = _extension(member, names[k - 1]) if k else ""  # (beside the token file before it)
            before = _extension(member, names[k]) if k < len(tokens) else ""  # (beside the one after it)
            if before and (not after or len(names[k]) > len(names[k - 1])):
                beside[k].append((before, member))
            elif after:
                beside[k - 1].append((after, member))
    for k, at in enumerate(tokens):
        yield names[k], members[at], beside[k]


def _extension(member: str, name: str) -> str:
    """The extension of ``member`` where it is named ``name.<extension>`` (no ``/`` in it), else ""."""
    if not member.startswith(name) or member[len(name) : len(name) + 1] != ".":
        return ""
    extension = member[len(name) + 1 :]
    return "" if "/" in extension else extension
