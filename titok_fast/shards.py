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

import contextlib
import functools
import io
import os
import posixpath
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .archives import ArchiveError, is_archive, is_file, list_archive, member_of, split_member
from .files import MAX_PER_SHARD, PER_SHARD, absolute, brief, escaped, open_atomically
from .pipeline import FETCH_CHUNK_BYTES, _ahead, _naming, _one_line, _threads_for
from .tokens import MAX_FILE_BYTES, TokenFile, TokenFileError, load_tokens, read_at_most, read_token_bytes
from .video import source_stamp

SUFFIX = ".safetensors"
READ_BUFFER = 1 << 20  # bytes read_shard reads at a time
MAX_BESIDE_BYTES = 1 << 26  # a file packed beside tokens (a caption, a JSON record: a few KB) is read whole
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
    collect_token_files` gives them): sorted by name, ``per_shard`` a shard, named ``00000``, ``00001``, ... (five
    digits, more where there are more shards), each member named by the file's output name; or, with ``per_shard``
    None, one shard for each folder of names, named by that folder, each member by its name in it (``a/b/c`` ->
    shard ``a/b``, member ``c.safetensors``), where a name in no folder is a ValueError."""
    if per_shard is None:
        folders: dict[str, list[tuple[str, str]]] = {}
        for path, name in files:
            folder, _, base = name.rpartition("/")
            if not folder:
                raise ValueError(f"{path}: a token file in no folder below its input (named {name!r}), where each "
                                 "folder's token files make a shard of its name: pack by count instead")  # fmt: skip
            folders.setdefault(folder, []).append((os.fspath(path), base + SUFFIX))
        return [Shard(folder, tuple(sorted(items, key=_member_name))) for folder, items in sorted(folders.items())]
    if not 1 <= per_shard <= MAX_PER_SHARD:
        raise ValueError(f"per_shard must be from 1 to {MAX_PER_SHARD:,}; got {per_shard}")
    ordered = sorted(((os.fspath(path), name + SUFFIX) for path, name in files), key=_member_name)
    count = -(-len(ordered) // per_shard)
    digits = max(5, len(str(count - 1)))
    return [Shard(f"{k:0{digits}d}", tuple(ordered[k * per_shard : (k + 1) * per_shard])) for k in range(count)]


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
    clips: int = 0
    seconds: float = 0.0

    def report(self, outdir: str | os.PathLike) -> str:
        lines = [f"packed {len(self.done):,} token file(s), {self.clips:,} chunk(s), into {len(self.written):,} "
                 f"shard(s) in {outdir} in {self.seconds:.1f} s"]  # fmt: skip
        if self.kept:
            lines.append(f"kept {len(self.kept):,} shard(s) already complete ({len(self.skipped):,} token file(s))")
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
    reads it, each at most MAX_BESIDE_BYTES; a token file whose source or file beside it cannot be read so fails
    alone. ``progress`` is called with the number of token files passed, as they are."""
    start = time.perf_counter()
    outdir = Path(absolute(outdir))
    shards = plan_shards(files, per_shard)
    _check_apart(files, outdir)
    _check_no_others(outdir, {str(outdir / f"{shard.name}.tar") for shard in shards})
    threads = _threads_for(outdir, files[0][0]) if files else 0  # (a network file system: read ahead)
    packed = Packed()
    for shard in shards:
        path = outdir / f"{shard.name}.tar"
        failed: list[tuple[str, str]] = []
        if not overwrite and _complete(path, _token_files(shard, accept, beside, threads), failed):
            packed.kept.append(str(path))
            failing = {source for source, _ in failed}
            packed.skipped += [source for source, _ in shard.files if source not in failing]
        else:
            failed = []
            packed.clips += _write(path, _token_files(shard, accept, beside, threads), failed, packed.done)
            packed.written.append(str(path))
        packed.failed += failed
        if progress is not None:
            progress(len(shard.files))
    packed.seconds = time.perf_counter() - start
    return packed


class _Read(NamedTuple):
    """A token file read for packing: its members ((name, bytes): the token file's, then the files beside its
    source), what it holds and its modification time (whole seconds)."""

    members: tuple[tuple[str, bytes], ...]
    token_file: TokenFile
    mtime: int


def _read(source: str, member: str, accept: Accept | None, beside: Sequence[str]) -> _Read | Exception:
    """The token file ``source``, to be the shard's ``member``, read and validated, with the files ``beside`` its
    source; or the TokenFileError (or OSError) naming it that says why it cannot be packed: it cannot be read, is
    not a token file, ``accept`` refuses it or a file beside its source cannot be read."""
    try:
        data = read_token_bytes(source)
        token_file = load_tokens(source, data)
        if accept is not None and (why := accept(source, token_file)):
            raise TokenFileError(f"{source}: {why}")
        members = ((member, data), *_beside_source(source, member, token_file, beside))
        found = member_of(source)  # (the modification time of an archive's member: its archive's)
        mtime_ns = os.stat(source).st_mtime_ns if found is None else found.mtime_ns
    except (TokenFileError, OSError) as e:
        return e
    return _Read(members, token_file, mtime_ns // 1_000_000_000)


def _beside_source(source: str, member: str, token_file: TokenFile, extensions: Sequence[str]) -> list:
    """(member name, bytes) of the files of ``extensions`` beside the token file's source video, of its stem;
    TokenFileError naming the token file ``source`` where its source is not the file its tokens were made from (a
    stranger's token file cannot have another file read) or a file beside it cannot be read."""
    if not extensions:
        return []
    video, recorded = token_file.source, token_file.made_with.get("source_stamp")
    if not recorded:
        raise TokenFileError(f"{source}: records no size and modification time of its source (made by an earlier "
                             "version): the files beside it cannot be known to be its source's")  # fmt: skip
    if recorded != source_stamp(video) or not is_file(video):
        raise TokenFileError(f"{source}: its source {brief(video)!r} is not the file its tokens were made from (its "
                             "size and modification time differ, or it is not there): the files beside it cannot be "
                             "packed")  # fmt: skip
    stem, key = posixpath.splitext(video)[0], member.removesuffix(SUFFIX)
    found = []
    for extension in extensions:
        try:
            found.append((f"{key}.{extension}", read_at_most(f"{stem}.{extension}", MAX_BESIDE_BYTES, "a file")))
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise TokenFileError(f"{source}: {brief(stem)}.{extension}, beside its source, cannot be packed "
                                 f"({reason})") from None  # fmt: skip
    return found


def _read_chunk(chunk: Sequence[tuple[str, str]], accept: Accept | None, beside: Sequence[str]) -> list:
    """:func:`_read` of each of ``chunk``'s token files, in a thread reading ahead: None for those past
    FETCH_CHUNK_BYTES read (the consumer reads them when it comes to them)."""
    found: list[_Read | Exception | None] = []
    budget = FETCH_CHUNK_BYTES
    for source, member in chunk:
        found.append(_read(source, member, accept, beside) if budget > 0 else None)
        budget -= sum(len(data) for _, data in found[-1].members) if isinstance(found[-1], _Read) else 0
    return found


def _token_files(shard: Shard, accept: Accept | None, beside: Sequence[str], threads: int) -> Iterator:
    """(token file, :func:`_read`'s result) for each of ``shard``'s files, in order, read ``threads`` at a time
    ahead (0: each as it comes)."""
    fetched = _ahead(functools.partial(_read_chunk, accept=accept, beside=beside), shard.files, threads)
    try:
        for (source, member), read in zip(shard.files, fetched, strict=True):
            yield source, _read(source, member, accept, beside) if read is None else read
    finally:
        fetched.close()


def _complete(path: Path, read: Iterator, failed: list[tuple[str, str]]) -> bool:
    """Whether the shard at ``path`` holds exactly the token files of a shard that can be packed now (``read``:
    :func:`_token_files`), in order and byte for byte (those that cannot go to ``failed``); False where there is
    none or it cannot be read."""
    try:
        listing = list_archive(os.fspath(path))
    except (OSError, ValueError):  # (none there, a folder, not an archive: written again over it)
        return False
    if listing.cut or listing.left_out:
        return False
    names, at = list(listing.members), 0
    with open(path, "rb") as archive, contextlib.closing(read):
        for source, got in read:
            if isinstance(got, Exception):
                failed.append((source, _one_line(got)))
                continue
            for member, data in got.members:
                if at >= len(names) or names[at] != member:
                    return False
                offset, size = listing.members[member]
                if size != len(data) or os.pread(archive.fileno(), size, offset) != data:
                    return False
                at += 1
    return at == len(names)


def _write(path: Path, read: Iterator, failed: list[tuple[str, str]], done: list[str]) -> int:
    """Write the token files ``read`` gives (:func:`_token_files`) to the shard ``path`` (atomically), those that
    fail to ``failed`` and those packed to ``done``; the number of chunks packed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = 0
    with (open_atomically(path, tidy=True, buffering=WRITE_BUFFER) as file, contextlib.closing(read),
          tarfile.open(fileobj=file, mode="w", format=PAX) as tar):  # fmt: skip
        for source, got in read:
            if isinstance(got, Exception):
                failed.append((source, _one_line(got)))
                continue
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
    real_out = os.path.realpath(outdir).rstrip(os.sep) + os.sep
    inside: dict[str, bool] = {}
    for path, _ in files:
        split = split_member(path)
        holder = os.path.dirname(absolute(path)) if split is None else absolute(split[0])
        if holder not in inside:
            inside[holder] = (os.path.realpath(holder) + os.sep).startswith(real_out)
        if inside[holder]:
            raise ValueError(f"{path} lies in the output folder {outdir}: packing would write over its inputs; "
                             "choose another output folder")  # fmt: skip


def _check_no_others(outdir: Path, planned: set[str]) -> None:
    """A ValueError where ``outdir`` holds a tar archive that is not one of the ``planned`` shards."""
    others = []
    for folder, _, names in os.walk(outdir):
        others += [os.path.join(folder, name) for name in names if is_archive(name)]
    others = sorted(set(others) - planned)
    if others:
        more = f" and {len(others) - 1:,} more" if len(others) > 1 else ""
        raise ValueError(f"{others[0]}{more}: a tar archive in the output folder that is not one of the shards this "
                         "run writes (another run's, with another --per-shard or other token files?): a reader of "
                         "the folder would read both; remove it or choose another output folder")  # fmt: skip


def read_shard(path: str | os.PathLike) -> Iterator[tuple[str, TokenFile, dict[str, bytes]]]:
    """The token files in the shard (tar archive) at ``path``, in the order it holds them, as (member name without
    ``.safetensors``, its TokenFile, validated, and the members beside it: ``{extension: bytes}`` of the members
    named as it is but for the extension, ``000000001.txt`` and ``000000001.json`` beside
    ``000000001.safetensors``, as ``pack --with`` writes them). The shard is read front to back through one file
    handle, READ_BUFFER bytes a read (on a network file system, a round trip per MiB, not four per token file).
    ArchiveError where it is not an archive or is cut short, TokenFileError naming the member that is not a valid
    token file."""
    path = absolute(path)
    listing = list_archive(path)
    if listing.cut:
        raise ArchiveError(f"{path}: cut short: {listing.cut}")
    others: dict[str, list[tuple[str, str]]] = {}  # a name before one of its base name's dots -> (extension, member)
    for member in listing.members:
        if not member.endswith(SUFFIX):
            folder, base = posixpath.split(member)
            for at in (k for k, c in enumerate(base) if c == "."):
                others.setdefault(posixpath.join(folder, base[:at]), []).append((base[at + 1 :], member))
    with open(path, "rb", buffering=READ_BUFFER) as archive:

        def read(member: str, limit: int = MAX_BESIDE_BYTES) -> bytes:
            offset, size = listing.members[member]
            if size > limit:
                raise TokenFileError(f"{path}/{member}: {size:,} bytes; read_shard reads at most {limit:,}")
            archive.seek(offset)  # (within the buffer: no system call)
            if len(data := archive.read(size)) < size:
                raise ArchiveError(f"{path}: cut short: {member!r} ends past the archive's end")
            return data

        for member in listing.members:
            if not member.endswith(SUFFIX):
                continue
            name = member.removesuffix(SUFFIX)
            token_file = load_tokens(f"{path}/{member}", read(member, MAX_FILE_BYTES))
            yield name, token_file, {extension: read(other) for extension, other in others.get(name, ())}
