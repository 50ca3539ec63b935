"""Videos inside uncompressed tar archives (WebDataset shards, as video2dataset writes them), read in place.

A member is named by a path that goes through its archive, ``/data/00001.tar/000010005.mp4``: no folder can be
named so (a regular file has no children), so the name is free, and it is what manifests, token files and Ray
tasks carry. A member's bytes lie in one span of the archive; libav reads that span through FFmpeg's ``subfile``
protocol and the container checks read it with ``pread``, so nothing is unpacked. The members of an archive are
listed once per process and archive (its size and modification time), from its headers alone.
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
import re
import stat
import sys
import tarfile
import threading
from dataclasses import dataclass
from pathlib import PurePosixPath

from .files import kind_of

ARCHIVE_EXTENSIONS = frozenset({".tar"})
COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
BLOCK = tarfile.BLOCKSIZE
ARCHIVE_CUT = "cut short"  # how the reason an archive is counted not all read begins, where its files before the cut
# are read (an unfinished write or copy)


class ArchiveError(OSError):
    """An archive that cannot be listed, or a member path that names nothing in one: its message is the reason (an
    OSError, as a file that cannot be read is)."""


class NoSuchMember(ArchiveError):
    """A member path that names nothing in its archive (as FileNotFoundError says of a plain path)."""


@dataclass(frozen=True)
class Member:
    """A regular file inside a tar archive: its bytes are ``size`` bytes of ``archive`` from byte ``offset``."""

    archive: str  # the archive's path, absolute
    name: str  # the member's name in the archive, normalised (no "..", no leading "/")
    offset: int
    size: int
    archive_size: int
    mtime_ns: int  # the archive's
    device: int = 0  # the archive's file, as it was listed (read_member reads from that file only)
    inode: int = 0

    @property
    def stamp(self) -> str:
        """Its source stamp (``titok_fast.video.source_stamp``): its own size and its archive's time."""
        return f"{self.size}:{self.mtime_ns}"

    @property
    def libav_url(self) -> str:
        """The member as FFmpeg opens it: its span of the archive, through the ``subfile`` protocol (``file:``:
        the archive's path read as a path, whatever characters it holds)."""
        return f"subfile,,start,{self.offset},end,{self.offset + self.size},,:file:{self.archive}"


@dataclass(frozen=True)
class Listing:
    """An archive's members (name -> (offset, size)), in the order they are in it, and why it ends early, if it
    does ("" for a whole archive)."""

    members: dict[str, tuple[int, int]]
    left_out: tuple[tuple[str, str], ...]  # (member name, why): links, sparse files, names outside the archive
    cut: str


def is_archive(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is named as a tar archive (ARCHIVE_EXTENSIONS, in any case)."""
    return os.path.splitext(os.fspath(path))[1].lower() in ARCHIVE_EXTENSIONS


def split_suffix(name: str) -> tuple[str, str]:
    """``name`` (a member's path, or a path through an archive) less its suffix, and the suffix, split where a
    plain file's name is (``Path.stem``, ``Path.suffix``): ``a/...mp4`` -> ``("a/..", ".mp4")``, as a file
    ``...mp4`` is a video named ``..``, where ``posixpath.splitext`` keeps a name's leading dots in it and sees no
    suffix."""
    suffix = PurePosixPath(posixpath.basename(name)).suffix
    return name[: len(name) - len(suffix)], suffix


def split_member(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """(archive, member name) where ``path`` goes through a regular file named as an archive (the first such, from
    the left), else None. No system call for a path with no archive's name in it."""
    found = _through_archive(path)
    return None if found is None else found[:2]


def _through_archive(path: str | os.PathLike[str]) -> tuple[str, str, os.stat_result] | None:
    """:func:`split_member`'s (archive, member name), and the archive's ``os.stat`` that found it a regular file."""
    text = os.fsdecode(os.fspath(path))
    lowered, at = text.lower(), 0
    while (at := lowered.find(".tar/", at)) != -1:
        archive, name = text[: at + 4], text[at + 5 :]
        at += 1
        try:
            st = os.stat(archive)
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(st.st_mode):
            return archive, name, st
    return None


def member_of(path: str | os.PathLike[str]) -> Member | None:
    """The archive member ``path`` names, None where it names no archive's member (a plain file); raises
    ArchiveError where it goes through an archive that cannot be listed, or names no regular file in it."""
    found = _through_archive(path)
    if found is None:
        return None
    archive, name, st = os.path.abspath(found[0]), found[1], found[2]
    try:
        listing = list_archive(archive, st)
    except ArchiveError as e:
        raise ArchiveError(f"{archive}: {e}") from None
    name = posixpath.normpath(name.lstrip("/")) if name.strip("/") else ""  # (a.tar//x is a.tar/x)
    span = listing.members.get(name)
    if span is None:
        why = dict(listing.left_out).get(name) if name else None
        if why:
            raise ArchiveError(f"{archive}: {why}")
        raise NoSuchMember(f"no file {found[1]!r} in the archive {archive}")
    return Member(archive, name, span[0], span[1], st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)


def is_file(path: str | os.PathLike[str]) -> bool:
    """``os.path.isfile``, an archive's member counting as a file."""
    if os.path.isfile(path):
        return True
    try:
        return member_of(path) is not None
    except (OSError, ValueError):
        return False


class ArchiveChanged(ArchiveError):
    """An archive replaced or changed between its listing and a read of it (a shard written again by rename)."""


def member_bytes(path: str | os.PathLike[str], limit: int, kind: str) -> bytes | None:
    """The bytes of the archive member ``path`` names (None where it names none: a plain file; no system call for
    a path without ".tar/" in it), if at most ``limit`` (else a ValueError saying ``kind`` holds at most that); an
    archive written again since it was listed is listed again, up to LISTING_TRIES times."""
    for _ in range(LISTING_TRIES):
        if (member := member_of(path)) is None:
            return None
        if member.size > limit:
            raise ValueError(f"{member.size} bytes; {kind} holds at most {limit}")
        try:
            return read_member(member)
        except ArchiveChanged:  # (written again since it was listed: where the member is now, listed again)
            continue
    raise ArchiveError(f"{path}: its archive was written again each time it was read ({LISTING_TRIES} times)")


def open_listed(path: str | os.PathLike[str], buffering: int = -1) -> tuple[io.BufferedReader, Listing]:
    """The archive at ``path`` opened, and the listing of that very file (written again by rename between the
    opening and the listing, it is opened and listed again); ArchiveError naming it where it is no regular file
    (a FIFO is not waited on) or no archive."""
    for _ in range(LISTING_TRIES):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG((st := os.fstat(fd)).st_mode):
                raise ArchiveError(f"{kind_of(st.st_mode)}, not a regular file")
            archive = open(fd, "rb", buffering=buffering)
        except BaseException as e:
            os.close(fd)
            raise ArchiveError(f"{path}: {e}") if isinstance(e, ArchiveError) else e from None
        try:
            return archive, list_archive(os.fspath(path), st, again=False)
        except BaseException as e:
            archive.close()
            if isinstance(e, ArchiveError) and not isinstance(e, ArchiveChanged):  # (what the file is instead)
                raise ArchiveError(f"{path}: {e}") from None
            if not isinstance(e, ArchiveChanged):
                raise
    raise ArchiveError(f"{path}: written again each time it was listed ({LISTING_TRIES} times)")


def read_member(member: Member) -> bytes:
    """The bytes of ``member``, read from its span of the very file it was listed from: ArchiveChanged where the
    file at the archive's path is another now (written again by rename, as pack writes a shard: a new listing says
    where the member is), ArchiveError where the archive ends before the span does (cut short since it was listed).
    The same file grown since (appended to, as a shard being written is) is read: what was listed is still there."""
    fd = os.open(member.archive, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (member.device, member.inode):
            raise ArchiveChanged(f"{member.archive}: written again since it was listed")
        data = os.pread(fd, member.size, member.offset)
    finally:
        os.close(fd)
    if len(data) < member.size:
        raise ArchiveError(f"{member.archive}: cut short: {member.name!r} ends at byte "
                           f"{member.offset + member.size:,}, past the archive's end")  # fmt: skip
    return data


def libav_path(path: str) -> str:
    """What libav is to open for ``path``: the path itself, or the span of the archive member it names."""
    member = member_of(path)
    return path if member is None else member.libav_url


def list_archive(archive: str, st: os.stat_result | None = None, again: bool = True) -> Listing:
    """The members of the tar archive at ``archive`` (its ``st`` if looked at already: then the listing is of that
    very file), listed from its headers; raises ArchiveError, its message what the file is instead (a compressed
    archive, not an archive), or an OSError where it cannot be read. Where the file at that path is another by the
    time it is opened (written again by rename), it is looked at and listed again, or with ``again`` False,
    ArchiveChanged is raised (a caller holding the file it was given ``st`` of opens it again)."""
    for _ in range(LISTING_TRIES):
        st = os.stat(archive) if st is None else st
        if not stat.S_ISREG(st.st_mode):  # (a FIFO would block its opening)
            raise ArchiveError(f"{kind_of(st.st_mode)}, not a regular file")
        try:
            return _listed(os.path.abspath(archive), *_identity(st))
        except ArchiveChanged:  # (replaced between its stat and its opening: listed again, as it is now)
            if not again:
                raise
            st = None
    raise ArchiveError(f"written again each time it was listed ({LISTING_TRIES} times)")


LISTING_TRIES = 3


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """Which file, as it is: what a listing is kept under, and what a read of a member checks."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


_LISTING_LOCK = threading.Lock()


@functools.lru_cache(maxsize=8)  # (a run's files come archive by archive)
def _listed(archive: str, device: int, inode: int, size: int, mtime_ns: int) -> Listing:
    with _LISTING_LOCK, open(archive, "rb") as f:
        opened = os.fstat(f.fileno())
        if (opened.st_dev, opened.st_ino) != (device, inode):  # (not cached: an exception; a file appended to since
            raise ArchiveChanged(f"{archive}: written again since it was looked at")  # is listed as it is now)
        head = f.read(BLOCK)
        for magic, kind in COMPRESSED:
            if head.startswith(magic):
                raise ArchiveError(f"a {kind}-compressed archive, which cannot be read in place; expected an "
                                   "uncompressed tar archive (decompress it first)")  # fmt: skip
        listing = _Listing()
        if _listed_fast(f.fileno(), size, listing):
            return listing.done()
        f.seek(0)
        bounded = _Bounded(f)
        try:
            tar = tarfile.open(fileobj=bounded, mode="r:")
        except (tarfile.TarError, ValueError, OverflowError) as e:  # (a base-256 size past any offset)
            raise ArchiveError(f"not a tar archive ({e})") from None
        except (IndexError, RecursionError) as e:  # (an old GNU sparse header's extension block cut short; extended
            raise ArchiveError(f"not a tar archive ({e})") from None  # headers chained past the recursion limit)
        listing = _Listing()
        try:
            while (info := tar.next()) is not None:
                tar.members.clear()  # (its list of every member: only ours is kept)
                if info.size < 0:  # (a header whose size field says so: the next would be read from before it)
                    listing.cut = _cut(size, info.offset, str(info.size))
                    return listing.done()
                if info.issparse():
                    listing.sparse(info.name)
                elif not info.isdir():
                    listing.add(info.name, info.isreg(), info.offset_data, info.size)
        except (tarfile.TarError, ValueError, OverflowError, IndexError, RecursionError) as e:  # (a size in base-256
            listing.cut = _cut(size, tar.offset, str(e))  # past any offset; see above)
        else:
            listing.cut = _cut(size, tar.offset, os.pread(f.fileno(), BLOCK, tar.offset))
    return listing.done()


class _Bounded:
    """The archive's file as tarfile reads it, but a read of more than MAX_EXTENDED_HEADER bytes at once (a pax or
    GNU long-name header's data: a crafted one may declare gigabytes, or more than any offset) is a ReadError, and
    so is a pax header's data of more than a block whose records do not parse, or that holds a long run of digits
    (Python's tarfile before 3.13 parses those in time, and for bad records memory, quadratic in their length)."""

    def __init__(self, f):
        self.f, self.header = f, b""

    def read(self, count: int = -1) -> bytes:
        if count is None or count < 0 or count > MAX_EXTENDED_HEADER:
            raise tarfile.ReadError(f"an extended header of {count:,} bytes (at most {MAX_EXTENDED_HEADER:,} read)")
        data = self.f.read(count)
        if count == BLOCK:
            self.header = data  # (a header, or the block after one: what a longer read is the data of)
        elif self.header[156:157] in (b"x", b"g", b"X") and (_records(data.rstrip(b"\0")) is None or
                                                            LONG_DIGITS.search(data)):  # fmt: skip
            raise tarfile.ReadError("a pax header whose records do not parse")
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)


class _Listing:
    """A listing as it is made (:class:`Listing`'s fields)."""

    def __init__(self):
        self.members: dict[str, tuple[int, int]] = {}
        self.left_out: list[tuple[str, str]] = []
        self.cut = ""

    def add(self, given: str, regular: bool, offset: int, size: int) -> None:
        """The member named ``given`` (not a folder), a regular file or not, its bytes ``size`` from ``offset``."""
        name = posixpath.normpath(given)
        self.members.pop(name, None)  # (a name written again: the later one, as tar extracts it, in its place)
        if name.startswith(("/", "../")) or name in ("..", "."):
            self.left_out.append((name, f"member {given!r} is named outside the archive; left out"))
        elif "\0" in name:  # (a pax path may hold one: no file can be named so)
            self.left_out.append((name, f"member {given!r} is named with a NUL byte; left out"))
        elif regular:
            self.members[name] = (offset, size)
        else:
            self.left_out.append((name, f"member {given!r} is not a regular file (a link or device); left out"))

    def sparse(self, given: str) -> None:
        """The member named ``given``, a sparse file: left out."""
        self.left_out.append((posixpath.normpath(given), f"member {given!r} is a sparse file, which cannot be read in "
                                                         "place; left out"))  # fmt: skip

    def done(self) -> Listing:
        return Listing(self.members, tuple(self.left_out), self.cut)


def _cut(size: int, end: int, after: bytes | str) -> str:
    """Why an archive of ``size`` bytes whose headers end at byte ``end`` is cut short ("" where it is not):
    ``after`` is what follows there (the bytes, or the error reading them gave)."""
    if end > size:
        return f"it ends at byte {size:,}, inside a member (an unfinished write or copy?)"
    if isinstance(after, bytes) and len(after) < BLOCK:
        return f"it ends at byte {size:,} without the end-of-archive block (an unfinished write or copy?)"
    if isinstance(after, bytes) and after.count(0) == BLOCK:
        return ""
    return f"bytes that are not a tar header follow its members at byte {end:,}"


# Header types the fast listing reads (as tarfile does): plain ones, pax extended headers (path, size, sparse files),
# GNU long names and old GNU sparse files; any other (pax global headers, vendor extensions), an extended header
# after another, or one that does not parse sends the archive to tarfile, which reads them all.
REGULAR_TYPES, DIRECTORY_TYPE, OTHER_TYPES = (b"0", b"\0", b"7"), b"5", (b"1", b"2", b"3", b"4", b"6")
EXTENDED_TYPES, GNU_SPARSE_TYPE = (b"x", b"L", b"K"), b"S"
KNOWN_TYPES = frozenset((*REGULAR_TYPES, DIRECTORY_TYPE, *OTHER_TYPES, *EXTENDED_TYPES, GNU_SPARSE_TYPE))
ENCODING = sys.getfilesystemencoding()
NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))  # mode, uid, gid, mtime,
# device numbers: fields the fast listing does not use, but that tarfile refuses a header for where not numbers
LISTING_WINDOW = 1 << 16  # bytes read at a time while listing: the headers of small members (JSON, text) together
LISTING_HOP_WINDOW = 1 << 12  # after a member larger than a window: its next headers, not 64 KB of the next video
MAX_EXTENDED_HEADER = 1 << 20  # bytes a pax or GNU long-name header may hold (tarfile reads one whole into memory)
LONG_DIGITS = re.compile(rb"[0-9]{64}")  # in pax data over a block: Python's tarfile before 3.13 parses such a run in
# time quadratic in its length, so the fast listing leaves it to tarfile, and _Bounded refuses it to tarfile


def _listed_fast(fd: int, size: int, listing: _Listing) -> bool:
    """The archive open as ``fd`` (``size`` bytes) listed into ``listing`` as tarfile lists it, from its headers
    without tarfile's objects (about four times as fast: benchmarks/RESULTS.md; a dataset's million members are
    listed in every process that reads them); False where a header is of a kind it does not read (KNOWN_TYPES), or
    bytes that are not a header follow (tarfile then lists it, and says how it ends)."""
    at, window, window_at, numbers_seen = 0, b"", 0, set()
    extended: dict | None = None  # what an extended header says of the header after it
    while True:
        if not window_at <= at <= window_at + len(window) - BLOCK:  # (headers of small members: many a read)
            hopped = at > window_at + len(window)  # past a large member (a video): few headers nearby
            window = os.pread(fd, LISTING_HOP_WINDOW if hopped else LISTING_WINDOW, at) if at <= size else b""
            window_at = at
        header = window[at - window_at : at - window_at + BLOCK]
        if at == 0 and len(header) < BLOCK:
            return False
        if at > size or len(header) < BLOCK or header.count(0) == BLOCK:
            if extended is not None:  # (an extended header with no header after it)
                return False
            listing.cut = _cut(size, at, header)
            return True
        kind = header[156:157]
        if kind not in KNOWN_TYPES or header[124] & 0x80:
            return False
        try:
            checksum, length = _octal(header[148:156]), _octal(header[124:136])
            for start, end in NUMBER_FIELDS:  # (tarfile reads them all: a header with one not a number ends its
                field = header[start:end]  # list; most fields repeat one of a few values, read once)
                if field not in numbers_seen and header[start] not in (0o200, 0o377):
                    _octal(field)
                    if len(numbers_seen) > 4096:  # (mtimes: one a second, or one a member)
                        numbers_seen.clear()
                    numbers_seen.add(field)
        except ValueError:
            return False
        if not _checksum_holds(header, checksum) or length < 0:  # (bytes that are not a header: tarfile says)
            return False
        data = at + BLOCK
        if kind in EXTENDED_TYPES:
            if extended is not None or length > MAX_EXTENDED_HEADER:
                return False
            if data + _blocks(length) <= window_at + len(window):  # (in the window read: as a pax header usually is)
                said = window[data - window_at : data - window_at + _blocks(length)]
            else:
                said = os.pread(fd, _blocks(length), data)  # (whole blocks, as tarfile reads them)
            if len(said) < _blocks(length) or (kind == b"x" and length > BLOCK and LONG_DIGITS.search(said)):
                return False  # (a long run of digits: tarfile is given it, _Bounded refuses it)
            extended = _pax(said.rstrip(b"\0")) if kind == b"x" else {"long": _text(said)} if kind == b"L" else {}
            if extended is None:
                return False
            at = data + _blocks(length)
            continue
        name, prefix = _text(header[0:100]), _text(header[345:500])
        directory = kind == DIRECTORY_TYPE or (kind == b"\0" and name.endswith("/"))
        name = name.rstrip("/") if directory else name
        name = f"{prefix}/{name}" if prefix and kind != GNU_SPARSE_TYPE else name  # (there, other fields)
        said, extended = extended or {}, None
        if "long" in said:
            name = said["long"].removesuffix("/") if directory else said["long"]
        name = said.get("path", name)
        if kind == GNU_SPARSE_TYPE:  # (its extension blocks, each saying whether another follows)
            more = header[482]
            if not _numbers(header, 386, 4) or not _numbers(header[483:495], 0, 0, 12) or header[483] == 0o377:
                return False  # (a negative size: tarfile's listing ends there)
            while more:
                block = os.pread(fd, BLOCK, data)
                if len(block) < BLOCK or not _numbers(block, 0, 21):
                    return False
                more, data = block[504], data + BLOCK
        if said.get("sparse") == "1.0" and not _sparse_map_parses(fd, data):
            return False  # (tarfile reads the map of GNU's sparse format 1.0 after the header, and stops at one bad)
        skips = (kind in REGULAR_TYPES and not directory) or kind == GNU_SPARSE_TYPE  # (a V7 folder skips nothing)
        at = data + (_blocks(said.get("size", length)) if skips else 0)
        if said.get("sparse") or kind == GNU_SPARSE_TYPE:
            listing.sparse(name)
        elif not directory:
            listing.add(name, kind in REGULAR_TYPES, data, said.get("size", length))


def _numbers(data: bytes, at: int, pairs: int, single: int = 0) -> bool:
    """Whether ``pairs`` sparse entries (two 12-byte numbers each) from byte ``at`` of ``data``, or a ``single``
    number of that many bytes there, read as numbers (tarfile refuses the header otherwise)."""
    fields = [data[at : at + single]] if single else [data[k : k + 12] for k in range(at, at + 24 * pairs, 12)]
    try:
        for field in fields:
            if field[:1] not in (b"\x80", b"\xff"):
                _octal(field)
    except ValueError:
        return False
    return True


def _blocks(count: int) -> int:
    """The bytes ``count`` bytes take in an archive: whole blocks."""
    return -(-count // BLOCK) * BLOCK


SPARSE_KEYS = (b"GNU.sparse.map", b"GNU.sparse.size")  # (or major 1, minor 0): GNU's sparse files in pax


def _records(said: bytes) -> dict[bytes, bytes] | None:
    """A pax header's records (key -> value, the last of a key), None where they do not parse as
    "<length> <key>=<value>\n" to its end."""
    records, at = {}, 0
    while at < len(said):
        space = said.find(b" ", at, at + 21)
        digits = said[at:space] if space > 0 else b""
        if not digits.isdigit() or int(digits) <= len(digits) + 1 or at + int(digits) > len(said):
            return None
        end = at + int(digits)
        key, equals, value = said[space + 1 : end - 1].partition(b"=")
        if said[end - 1 : end] != b"\n" or not equals or not key:
            return None
        records[key], at = value, end
    return records


def _pax(said: bytes) -> dict | None:
    """What a pax extended header says of the header after it, as tarfile reads it: its "path" (or a sparse file's
    name), "size", and "sparse"; None where its records do not parse as "<length> <key>=<value>\n" to its end, or
    say more than tarfile's reading of them is plain about (a charset, a sparse file with a size, two names)."""
    records = _records(said)
    if records is None:
        return None
    version_one = records.get(b"GNU.sparse.major") == b"1" and records.get(b"GNU.sparse.minor") == b"0"
    sparse = version_one or any(k in records for k in SPARSE_KEYS)
    gnu = [k for k in records if k.startswith(b"GNU.sparse.")]
    if b"hdrcharset=" in said or (gnu and not sparse) or (sparse and b"size" in records):
        return None  # (tarfile looks for a charset anywhere in the records, a value's text too)
    numbers = [records.get(k) for k in (b"GNU.sparse.size", b"GNU.sparse.realsize") if k in records]
    if b"GNU.sparse.map" in records:
        numbers += records[b"GNU.sparse.map"].split(b",")
    if not all(number.isdigit() for number in numbers):  # (tarfile's int() of them fails, or a size is negative)
        return None
    if b"path" in records and b"GNU.sparse.name" in records:
        return None
    plain = b"GNU.sparse.map" not in records and b"GNU.sparse.size" not in records
    found: dict = {"sparse": "1.0" if version_one and plain else sparse}
    if b"GNU.sparse.name" in records:
        found["path"] = records[b"GNU.sparse.name"].decode("utf-8", "surrogateescape")
    elif b"path" in records:
        try:  # (as tarfile decodes a pax path: UTF-8, else the file system's encoding)
            found["path"] = records[b"path"].decode("utf-8").rstrip("/")
        except UnicodeDecodeError:
            found["path"] = records[b"path"].decode(ENCODING, "surrogateescape").rstrip("/")
    if b"size" in records:
        if not records[b"size"].isdigit():
            return None
        found["size"] = int(records[b"size"])
    return found


def _sparse_map_parses(fd: int, at: int) -> bool | None:
    """Whether the map of a sparse file in GNU's format 1.0 from byte ``at`` (a count, then two numbers an entry,
    each ending with a newline) parses as tarfile reads it, a block at a time; None where it is longer than
    MAX_EXTENDED_HEADER (then tarfile reads it)."""
    buf, end = os.pread(fd, BLOCK, at), at + BLOCK
    try:
        fields, buf = buf.split(b"\n", 1)
        count, fields = 0, int(fields)
        while count < fields * 2:
            if b"\n" not in buf:
                if end - at >= MAX_EXTENDED_HEADER:
                    return None
                buf, end = buf + os.pread(fd, BLOCK, end), end + BLOCK
            number, buf = buf.split(b"\n", 1)
            int(number)
            count += 1
    except ValueError:
        return False
    return True


def _octal(field: bytes) -> int:
    """A header's number field as tarfile reads it (octal, up to a NUL, spaces around); a ValueError where it does
    not read it as a number."""
    return int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)


def _checksum_holds(header: bytes, checksum: int) -> bool:
    """Whether ``checksum`` is the header's, its bytes summed unsigned or (as some tars do) signed, its own field
    counted as spaces."""
    unsigned = sum(header) - sum(header[148:156]) + 256
    if checksum == unsigned:
        return True
    high = sum(1 for byte in header[:148] + header[156:] if byte >= 128)
    return checksum == unsigned - 256 * high


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode(ENCODING, "surrogateescape")
