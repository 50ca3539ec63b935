"""What every file titok-fast writes shares: the metadata key, the format version, and atomic writing.

A file appears under its final name only complete: it is written to a unique temporary name in the same folder,
flushed to disk (fsync), renamed over the target, and the folder is synced so the rename itself survives a crash.
Several processes writing the same target at once each rename a complete file; the last rename wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import uuid

METADATA_KEY = "titok_fast"  # the safetensors metadata key holding our JSON, in token files and weights files
FORMAT_VERSION = 1  # of that JSON; readers accept files of this version, whatever extra fields they carry
MAX_SEED = 10**18 - 1  # of random weights: token files record the seed in at most 18 digits (loading.random_seed)
# A video whose decoder gives no clip for this long has stalled (a read that hangs on a network file system, a file
# the decoder cannot get through): it fails alone and its worker is replaced. No sound clip takes minutes to decode.
STALL_SECONDS = 300.0


def escaped(text: str) -> str:
    """``text`` on one line: a file name may hold a newline (which could print a line of its own) or another
    control character; those are written as escapes."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def notice(message: str) -> None:
    """A one-line notice on stderr (file names in it escaped)."""
    print(f"titok-fast: {escaped(message)}", file=sys.stderr)


MAX_NAME_BYTES = 255  # of a file name, on the usual file systems


def temporary_stem(name: str) -> str:
    """What an :class:`AtomicFile`'s temporary file for ``name`` is named after: ``name`` itself, or where that
    would make the temporary's name too long (a name of over 217 bytes), a digest of it."""
    if len(os.fsencode(name)) + 38 <= MAX_NAME_BYTES:  # "." + name + "." + 32 hex + ".tmp"
        return name
    return "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:40]


class AtomicFile:
    """A temporary path (`temporary`) next to `path`: ``commit()`` moves what was written there onto `path` durably,
    ``discard()`` removes it and leaves `path` as it was. As a context manager: commit on a normal exit, else
    discard."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.path.abspath(os.fspath(path))
        folder, name = os.path.split(self.path)
        self.temporary = os.path.join(folder, f".{temporary_stem(name)}.{uuid.uuid4().hex}.tmp")

    def commit(self) -> None:
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

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.temporary)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` through an :class:`AtomicFile`."""
    with AtomicFile(path) as target, open(target.temporary, "xb") as file:
        file.write(data)


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


def interrupt(error: BaseException) -> None:
    """Raise ``error`` (a signal handler's, in the main thread) now, or at the end of the ``interrupts_held`` block
    the main thread is in; a second one while the first waits is dropped."""
    if getattr(_held, "depth", 0):
        _held.pending = getattr(_held, "pending", None) or error
        return
    raise error
