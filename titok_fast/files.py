"""What every file titok-fast writes shares: the metadata key, the format version, and atomic writing.

A file appears under its final name only complete: it is written to a unique temporary name in the same folder,
flushed to disk (fsync), renamed over the target, and the folder is synced so the rename itself survives a crash.
Several processes writing the same target at once each rename a complete file; the last rename wins.
A temporary is locked (``flock``) while it is written: a run cleaning up what a killed run left
(:func:`remove_abandoned`) leaves another live run's temporaries alone.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import stat
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows: the command refuses it in one line (cli.main), after this module's import
    fcntl = None

METADATA_KEY = "titok_fast"  # the safetensors metadata key holding our JSON, in token files and weights files
FORMAT_VERSION = 1  # of that JSON; readers accept files of this version, whatever extra fields they carry
MAX_SEED = 10**18 - 1  # of random weights: token files record the seed in at most 18 digits (loading.random_seed)
# A video whose decoder gives no clip for this long has stalled (a read that hangs on a network file system, a file
# the decoder cannot get through): it fails alone and its worker is replaced. No sound clip takes minutes to decode.
STALL_SECONDS = 300.0
RAY_LEAST_RESOURCE = 0.0001  # the finest share of a CPU or GPU Ray takes ("precision ... cannot go beyond 0.0001")
MAX_RAY_RETRIES = 1000  # a decode task's retries, an encode actor's restarts: past any real need, within Ray's ints
# here, not in video or writing (which import torch), as the command line checks --fps before its signal handlers
MAX_FPS = 1000.0  # the highest sampling (and writing) frame rate: token files record it, readers check it
MIN_WRITE_FPS = 1e-4  # the slowest rate a video is written at (libav refuses far slower ones; 0 meant 24 fps)
PER_SHARD = 10_000  # token files a shard by default (shards.pack_tokens): video2dataset's videos a shard
MAX_PER_SHARD = 10_000_000
MAX_CLIPS_PER_VIDEO = 2**31 - 1  # --clips-per-video (more than a token file holds: as many as "all")


def escaped(text: str) -> str:
    """``text`` on one line: a file name may hold a newline (which could print a line of its own) or another
    control character; those are written as escapes."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def notice(message: str) -> None:
    """A one-line notice on stderr (file names in it escaped)."""
    print(f"titok-fast: {escaped(message)}", file=sys.stderr)


DEBUG_ENV = "TITOK_FAST_DEBUG"  # set by the command's --debug: worker processes inherit it


def show_traceback(error: BaseException, path: str | os.PathLike) -> None:
    """With --debug, the traceback of an unforeseen failure that fails one file alone (the run goes on, and says
    it in one line): where it came from, for a bug report."""
    if os.environ.get(DEBUG_ENV) == "1":
        lines = traceback.format_exception(type(error), error, error.__traceback__)
        print(f"titok-fast: --debug: {escaped(str(path))} failed here:\n{''.join(lines)}", end="", file=sys.stderr)


def kind_of(mode: int) -> str:
    """What a file of ``mode`` (``st_mode``) is, in words: "a regular file", "a folder", "a FIFO", ..."""
    kinds = {stat.S_ISREG: "a regular file", stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO",
             stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}  # fmt: skip
    return next((name for test, name in kinds.items() if test(mode)), "a special file")


def lies_in(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``folder`` or lies below it, as the system resolves both (links followed)."""
    folder = os.path.realpath(folder)
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


def brief(text: str, limit: int = 1024) -> str:
    """``text`` for a message, cut to ``limit`` characters: what a token file records may be a MiB long."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def absolute(path: str | os.PathLike[str]) -> str:
    """``path`` made absolute as the system reads it: ``os.path.abspath``, except that a ``..`` is taken where the
    path before it leads (through links), as the kernel takes it, not by dropping the name before it: ``link/..``
    is the folder above link's target, not the folder link is in. No system call for a path without ``..`` (a
    million inputs add no start-up time); the names after the last ``..`` are kept as they are (a file reached
    through a link keeps its name)."""
    path = os.fsdecode(os.fspath(path))
    parts = path.split(os.sep)
    if ".." not in parts:
        return os.path.abspath(path)
    last = len(parts) - 1 - parts[::-1].index("..")
    head = os.sep.join(parts[: last + 1]) or os.sep
    try:
        return os.path.abspath(os.path.join(os.path.realpath(head), *parts[last + 1 :]))
    except (OSError, ValueError):  # (a path the system cannot look at, as one with a NUL a stranger's token file
        # may record: as written)
        return os.path.abspath(path)


def file_head(path: str | os.PathLike[str], size: int) -> bytes | None:
    """The first ``size`` bytes of the regular file at ``path`` (where its links lead; fewer where it is shorter),
    or None where it is not a regular file or cannot be read. A FIFO is never waited on (opened without blocking)."""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
            return file.read(size) if stat.S_ISREG(os.fstat(file.fileno()).st_mode) else None
    except OSError:
        return None


def file_entry(path: str | os.PathLike[str]) -> tuple[int, int, int, int] | None:
    """Which file the name ``path`` holds (a link itself, not where it leads): its device, inode, size and
    modification time; None where nothing is there or it cannot be looked at. See :func:`same_entry`."""
    try:
        return entry_of(os.lstat(path))
    except OSError:
        return None


def entry_of(st: os.stat_result) -> tuple[int, int, int, int]:
    """The :func:`file_entry` of what ``os.lstat`` gave."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def same_entry(first: tuple[int, int, int, int], second: tuple[int, int, int, int]) -> bool:
    """Whether two :func:`file_entry` are one file: the same inode, or where a file system does not keep inode
    numbers (CIFS with ``noserverino``, some FUSE mounts) the same size and modification time. A file renamed
    into place since has another inode and was written later."""
    return first[:2] == second[:2] or first[2:] == second[2:]


MAX_NAME_BYTES = 255  # of a file name, on the usual file systems


def temporary_stem(name: str) -> str:
    """What an :class:`AtomicFile`'s temporary file for ``name`` is named after: ``name`` itself, or where that
    would make the temporary's name too long (a name of over 217 bytes), a digest of it."""
    if len(os.fsencode(name)) + 38 <= MAX_NAME_BYTES:  # "." + name + "." + 32 hex + ".tmp"
        return name
    return "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:40]


def temporary_target(name: str) -> str | None:
    """What the temporary file ``name`` (``.<stem>.<32 hex>.tmp``, see :class:`AtomicFile`) was to become (its
    ``temporary_stem``), or None for any other name (a user's ``.x.mp4.notes.tmp``)."""
    found = re.fullmatch(r"\.(.+)\.[0-9a-f]{32}\.tmp", name, re.DOTALL)
    return None if found is None else found.group(1)


class AtomicFile:
    """A temporary path (`temporary`) next to `path`: ``commit()`` moves what was written there onto `path` durably,
    ``discard()`` removes it and leaves `path` as it was. As a context manager: commit on a normal exit, else
    discard."""

    def __init__(self, path: str | os.PathLike[str], tidy: bool = False):
        self.path = absolute(path)
        folder, name = os.path.split(self.path)
        self._stem = os.path.join(folder, f".{temporary_stem(name)}")
        self.temporary = f"{self._stem}.{uuid.uuid4().hex}.tmp"
        self._lock: int | None = None  # the temporary, created now and locked until it is committed or discarded
        self._tidy = tidy

    def create(self) -> None:
        """Create the temporary and hold a lock on it (``flock``), so that another process cleaning up what a
        killed run left (:func:`remove_abandoned`) leaves it alone while it is written. Writers then open it by
        name for writing (truncating it). With ``tidy``, the temporaries that killed writers of this path left are
        removed first (for a file written alone, a report, a figure, whose folder no run cleans up: a token file's
        run cleans its folder once for all its files). Only for a file whose writers write the temporary itself
        (its lock is on that file): one a library replaces with a file of its own is unlocked while written."""
        if self._lock is not None:
            return
        if self._tidy:
            self._remove_left()
        while True:
            try:
                fd = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except OSError as e:  # (a folder that cannot be written): said of the file asked for, not its temporary
                raise said_of(e, self.path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except OSError as e:  # a file system without locks: not held (an unlocked one is removed by a cleanup
                # only once it is old); held by another process (a cleanup that opened it first): not ours to write
                locked = e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN)
            try:  # removed by another process between its creation and the lock: again under a new name
                if locked and os.stat(self.temporary).st_ino == os.fstat(fd).st_ino:
                    self._lock = fd
                    return
                if not locked:  # (the cleanup holding it removes it too, if it has not yet)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.temporary)
            except FileNotFoundError:
                pass
            os.close(fd)
            self.temporary = f"{self._stem}.{uuid.uuid4().hex}.tmp"

    def _remove_left(self) -> None:
        """Remove the temporaries of this path that killed writers left (:func:`remove_left`)."""
        folder, name = os.path.split(self.path)
        try:
            names = os.listdir(folder)
        except OSError:
            return
        stem = temporary_stem(name)
        remove_left(folder, [n for n in names if temporary_target(n) == stem])

    def commit(self) -> None:
        """Sync the temporary, rename it onto ``path``, sync the folder. An error says ``path`` (a sync's names no
        file, a rename's the temporary): the file asked for is what could not be written."""
        try:
            try:
                with open(self.temporary, "rb") as written:
                    os.fsync(written.fileno())
                os.replace(self.temporary, self.path)
            finally:
                self.discard()
            descriptor = os.open(os.path.dirname(self.path), os.O_RDONLY)
            try:
                os.fsync(descriptor)  # make the rename itself durable
            finally:
                os.close(descriptor)
        except OSError as e:
            raise said_of(e, self.path) from None

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.temporary)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> AtomicFile:
        self.create()
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def write_atomically(path: str | os.PathLike[str], data: bytes, tidy: bool = False) -> None:
    """Write `data` to `path` through an :class:`AtomicFile` (``tidy``: see there)."""
    with open_atomically(path, tidy) as file:
        file.write(data)


@contextlib.contextmanager
def open_atomically(path: str | os.PathLike[str], tidy: bool = False, buffering: int = -1) -> Iterator[BinaryIO]:
    """The temporary of an :class:`AtomicFile` of `path` (``tidy``: see there) opened for writing (``buffering``:
    as ``open``'s): what the block writes replaces `path` when it ends, or is dropped if it raises. An I/O error is
    said of `path` (:func:`said_of`)."""
    try:
        with AtomicFile(path, tidy) as target, open(target.temporary, "wb", buffering) as file:  # (truncated: its
            # lock kept)
            yield file
    except OSError as e:
        raise said_of(e, path) from None


def said_of(error: OSError, path: str | os.PathLike[str]) -> OSError:
    """``error``, met writing the file ``path`` (through its temporary), as an error of ``path`` itself: the file
    asked for is what could not be written, where a write or sync names no file and a rename the temporary. One
    with no errno is given back as it is."""
    return error if error.errno is None else type(error)(error.errno, error.strerror, absolute(path))


ABANDONED_UNLOCKED_SECONDS = 3600.0  # a temporary that cannot be locked is taken as abandoned once this old


def remove_abandoned(path: str | os.PathLike[str], *, unchanged_for: float = 0.0) -> None:
    """Remove the temporary file ``path`` if no process is writing it (an :class:`AtomicFile` holds a lock on it
    until it is committed) and it has not changed for ``unchanged_for`` seconds (a write under way changes it:
    where locks are not seen across machines, as on NFS mounted without them, the age tells); errors are ignored
    (writing there will say what is wrong). Only a regular file, not a link (what it leads to is not the run's), is
    removed: a FIFO or device of that name is left where it is, and opening it never waits."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or time.time() - os.fstat(fd).st_mtime < unchanged_for:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):  # being written by another process
                return
            if time.time() - os.fstat(fd).st_mtime < ABANDONED_UNLOCKED_SECONDS:  # no locks here: keep recent ones
                return
        with contextlib.suppress(OSError):
            os.unlink(path)
    finally:
        os.close(fd)


_held = threading.local()  # per thread: how deep in ``interrupts_held`` blocks, and an interrupt waiting for their end


@contextlib.contextmanager
def interrupts_held():
    """Within the block, an interrupt that ``interrupt`` is given (the command's Ctrl-C and SIGTERM handlers) waits
    for the block's end: a token file and its manifest line are written together, or neither is."""
    _held.depth = getattr(_held, "depth", 0) + 1
    try:
        yield
    finally:
        _held.depth -= 1
        pending = getattr(_held, "pending", None)
        if not _held.depth and pending is not None:
            _held.pending = None
            raise pending


_interrupts_given: list[BaseException] = []  # since the command began, in order (interrupt_name, sigterm_came)


class Terminated(KeyboardInterrupt):
    """SIGTERM, as a scheduler (Slurm, Kubernetes) stops a job: handled as Ctrl-C is, so what was finished stays
    and the manifest lists the inputs not encoded."""


def interrupt(error: BaseException) -> None:
    """Raise ``error`` (a signal handler's, in the main thread) now, or at the end of the ``interrupts_held`` block
    the main thread is in; a second one while the first waits is dropped."""
    _interrupts_given.append(error)
    if getattr(_held, "depth", 0):
        _held.pending = getattr(_held, "pending", None) or error
        return
    raise error


# File systems whose every request is a round trip to another machine or process (FUSE: sshfs, s3fs, gcsfuse, ...;
# not fuseblk, a local disk's NTFS or exFAT): there, a job that reads many small files reads them ahead in threads.
NETWORK_FILE_SYSTEMS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "virtiofs", "afs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
    "panfs", "wekafs", "orangefs", "pvfs2", "davfs", "fuse",
}  # fmt: skip
LOCAL_FUSE = {"fuse-overlayfs", "squashfuse", "squashfuse_ll", "lxcfs", "portal", "bindfs", "mergerfs"}  # fuse.<these>
MOUNTS = "/proc/self/mountinfo"


def remove_left(folder: str | os.PathLike[str], names: Iterable[str]) -> None:
    """Remove the temporaries ``names`` in ``folder`` that killed writers left: not one another run is writing
    now (it is locked); on a network file system, where locks may not be seen across machines (mounted without
    them, or local_lock=flock), only one also unchanged for ABANDONED_UNLOCKED_SECONDS."""
    names = list(names)
    unchanged_for = ABANDONED_UNLOCKED_SECONDS if names and network_file_system(folder) else 0.0
    for name in names:
        remove_abandoned(os.path.join(folder, name), unchanged_for=unchanged_for)


def network_file_system(path: str | os.PathLike[str], mounts: str = MOUNTS) -> str | None:
    """The type of the network (or FUSE) file system ``path`` lies on, from ``mounts`` (Linux's mountinfo), else
    None: a local one, or a system that has no such table. A path not made yet counts as its nearest folder."""
    try:
        with open(mounts, encoding="utf-8", errors="surrogateescape") as table:
            text = table.read(1 << 24)
    except OSError:
        return None
    path = os.path.realpath(path)
    found, depth = None, -1
    for point, kind in _mount_points(text):
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= depth:
            found, depth = kind, len(point)  # the deepest mount holding path; of those, the last mounted
    if found is None:
        return None
    kind, _, program = found.partition(".")  # fuse.sshfs -> fuse, sshfs
    return found if kind in NETWORK_FILE_SYSTEMS and program not in LOCAL_FUSE else None


@functools.lru_cache(maxsize=4)
def _mount_points(text: str) -> tuple[tuple[str, str], ...]:
    """(mount point, file system type) of each line of a mountinfo table, in its order: parsed once per table
    (a run asks of every list it reads, and tables rarely change)."""
    points = []
    for line in text.splitlines():
        fields, _, rest = line.partition(" - ")
        fields, rest = fields.split(), rest.split()
        if len(fields) >= 5 and rest:  # (\040 in a mount point: a space)
            points.append((re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]), rest[0]))
    return tuple(points)


def interrupt_name(error: KeyboardInterrupt) -> str:
    """What stopped a run that ``error`` ended: its message (a SIGTERM's says so), else that of the last interrupt
    the command's handlers gave (Ray may hand one back as a plain KeyboardInterrupt), else Ctrl-C."""
    return str(error) or (str(_interrupts_given[-1]) if _interrupts_given else "") or "Ctrl-C"


def sigterm_came() -> bool:
    """Whether the command's handlers were given a SIGTERM (one held behind a Ctrl-C included)."""
    return any(isinstance(error, Terminated) for error in _interrupts_given)


def forget_interrupts() -> None:
    """A new command: no interrupt came yet."""
    _interrupts_given.clear()
