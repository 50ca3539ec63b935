"""The manifest of an encode job: a JSON Lines file in the output folder, one line per input, written as the job
goes (each line as soon as its input is settled), by the single-machine and the Ray command alike.

Each line: ``source`` (the input, as an absolute path: the token file records it so), ``tokens`` (its token file,
absolute), ``clips`` (clips encoded; 0 unless done), ``status`` ("done", "skipped": complete already, "failed", or
"not-encoded": the job stopped first), ``reason`` (one line; empty when done or skipped) and ``time`` (when the line
was written, UTC, ISO 8601). A done line whose token file replaced one made otherwise (from another source, by
other weights or with other settings) says how in ``replaced``; when it was made from another source (another video
of the same output name), a not-encoded line for that source follows, so its latest line no longer points at
tokens that are not its own (as after a failed line, when the token file there was moved aside). The Ray command
adds ``decoded_by`` and ``encoded_by`` ("host:pid" of the workers). Lines written before ``time`` was added lack
it, and may name paths as they were given.

Jobs append to the manifest, each line in one write to a file opened for appending, so jobs sharing an output
folder (one per GPU, on disjoint inputs) never cut each other's lines; an input's outcome is its latest line. A
resumed job lists an input it skips unless that input's latest line already says its token file is complete
(done or skipped, the same token file): resuming a finished job of a million inputs adds nothing, where a line
each would add a million every time. A job that encodes one shard of its inputs (``--shard K/N``) keeps a
manifest of the shard's own, ``manifest-K-of-N.jsonl``: shards run on several machines, and appends from several
machines to one file on a network filesystem (NFS) are not atomic.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import heapq
import itertools
import json
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import MAX_NAME_BYTES, absolute, file_entry, notice, same_entry

if TYPE_CHECKING:
    from .pipeline import Summary

MANIFEST_NAME = "manifest.jsonl"
_MANIFEST_FILE = re.compile(r"manifest(-[0-9]+-of-[0-9]+)?\.jsonl")  # a folder's, and each shard's
STATUSES = ("done", "skipped", "failed", "not-encoded")
OUTDATED_SUFFIX = ".outdated"  # a token file made otherwise whose input failed its redo is moved to <name><this>
_ASIDE_NUMBER_BYTES = 10  # ".<up to 9 digits>", the number of a later one set aside under the same name


def aside_stem(name: str) -> str:
    """What the token file ``name`` is set aside as, before ``.outdated[.N]``: ``name`` itself, or where that
    would make too long a name (a token file's name of over 235 bytes), a digest of it, still ``.safetensors``."""
    if len(os.fsencode(name)) + len(OUTDATED_SUFFIX) + _ASIDE_NUMBER_BYTES <= MAX_NAME_BYTES:
        return name
    return "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:40] + ".safetensors"


def is_manifest_name(name: str) -> bool:
    """Whether a file of the output folder named ``name`` is a manifest (the job's or a shard's)."""
    return _MANIFEST_FILE.fullmatch(name) is not None


def manifest_name(shard: tuple[int, int] | None = None) -> str:
    """The manifest's file name in the output folder, for a job over all its inputs or over ``shard`` (K, N)."""
    return MANIFEST_NAME if shard is None else f"manifest-{shard[0]}-of-{shard[1]}.jsonl"


class Manifest:
    """Records each input's outcome in a :class:`~titok_fast.pipeline.Summary` and as a manifest line.

    ``path`` is the manifest file (appended to; created if need be); ``None`` keeps the summary only.

    It also keeps an output folder from mixing token files made different ways, since every outcome of both
    commands passes here: a token file made otherwise (:meth:`outdated`) whose input then fails is moved aside
    to ``<name>.outdated`` (renamed, never deleted), and the failure's reason says so."""

    def __init__(self, path: str | os.PathLike | None, summary: Summary):
        self.summary = summary
        self.path = None if path is None else Path(path)
        self.lock = threading.RLock()  # each outcome is recorded whole (token files may be written on threads)
        self._fd: int | None = None
        # token file -> how it was made otherwise, the other source it was made from (if so), and which file it was
        # (files.file_entry, where it could be looked at), until its input settles
        self._outdated: dict[str, tuple[str, str | None, tuple[int, int, int, int] | None]] = {}
        # token file to write -> the file its name held when the job planned it (None: nothing), until it is written
        self._planned: dict[str, tuple[int, int, int, int] | None] = {}
        self._settled: dict[int, int | None] | None = None  # see skipped()
        self._listed: set[int] = set()  # see list_not_encoded(): inputs said not encoded already, as read at planning
        self._unlisted = False  # whether a list of inputs not encoded could not all be written (said once)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:  # (a link could have the run append to a file elsewhere)
                self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW,
                                   0o666)  # fmt: skip
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise ValueError(f"{self.path}: the manifest is a link; move it away") from None
                if e.errno == errno.EISDIR:
                    raise ValueError(f"{self.path}: the manifest is a folder; move it away") from None
                raise OSError(f"the manifest {self.path} cannot be opened ({e.strerror or e})") from None
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):  # a FIFO would block the run's writes for ever
                os.close(self._fd)
                self._fd = None
                raise ValueError(f"{self.path}: the manifest is not a regular file (a pipe or device); move it away")
            os.set_blocking(self._fd, True)
            size = os.fstat(self._fd).st_size
            if size and os.pread(self._fd, 1, size - 1) != b"\n":  # a line cut short (a full disk): end it there
                try:
                    os.write(self._fd, b"\n")
                except OSError as e:
                    os.close(self._fd)
                    self._fd = None
                    raise OSError(f"cannot write the manifest {self.path}: {e.strerror or e}") from None

    def outdated(
        self,
        source: str | os.PathLike,
        tokens: str | os.PathLike,
        why: str,
        other_source: str | None = None,
        entry: tuple[int, int, int, int] | None = None,
    ) -> None:
        """``tokens`` exists but was made otherwise (``why``, one line), from ``other_source`` if that is not
        ``source`` (another video of the same output name), and is to be redone. ``entry``: which file was judged
        (its :func:`~titok_fast.files.file_entry`, taken before it was read; else now): if its input fails, only
        that file is set aside, not one another run has put there since."""
        with self.lock:
            self._outdated[str(tokens)] = (why, other_source, entry if entry is not None else file_entry(tokens))

    def skipped(self, source: str | os.PathLike, tokens: str | os.PathLike) -> None:
        """``tokens`` is complete already; a line says so unless the folder's manifests already do."""
        with self.lock:
            self.summary.skipped.append(str(source))
            self.read_settled()
            if self._complete_as(source) != hash(absolute(tokens)):
                self._line(source, tokens, "skipped")

    def done_as_other(self, source: str | os.PathLike, tokens: str | os.PathLike) -> bool:
        """Whether the folder's manifests, as :meth:`read_settled` read them, say ``source`` is complete as another
        token file than ``tokens``: its inputs named otherwise since (a list names a file by its stem, a folder by
        its path under it)."""
        with self.lock:
            done = self._complete_as(source)
            return done is not None and done != hash(absolute(tokens))

    def _complete_as(self, source: str | os.PathLike) -> int | None:
        """The ``hash`` of the token file the folder's manifests, as :meth:`read_settled` read them, say ``source``
        is complete as; None if they do not (or were not read)."""
        return (self._settled or {}).get(hash(absolute(source)))

    def read_settled(self) -> None:
        """Read which inputs the folder's manifests already say are complete, once (seconds for a million lines;
        :meth:`skipped` does it if need be): a job about to check its outputs does it first, where an interrupt
        is not held."""
        if self._settled is None:
            self._settled, listed = _settled(self.path.parent) if self._fd is not None else ({}, set())
            self._listed |= listed

    def forget_settled(self) -> None:
        """Let go of what :meth:`read_settled` read (about 120 bytes per source), once the job has checked
        its outputs; a later :meth:`skipped` reads it again."""
        self._settled = None

    def done(self, source: str | os.PathLike, tokens: str | os.PathLike, clips: int, **extra: Any) -> None:
        with self.lock:
            self.summary.done.append(str(source))
            self.summary.clips += clips
            why, _, _ = self._outdated.pop(str(tokens), (None, None, None))
            if why is not None:
                self.summary.replaced += 1
                extra = {"replaced": why, **extra}
            self._line(source, tokens, "done", clips=clips, **extra)  # (another source it displaced: displacing)

    def planned(self, tokens: str | os.PathLike, entry: tuple[int, int, int, int] | None) -> None:
        """``tokens`` is to be written; its name held ``entry`` (:func:`~titok_fast.files.file_entry`; None:
        nothing) when the job looked (see :meth:`displacing`)."""
        with self.lock:
            self._planned[str(tokens)] = entry

    def displacing(
        self,
        source: str | os.PathLike,
        tokens: str | os.PathLike,
        other_of: Callable[[str | os.PathLike], str | None],
    ) -> None:
        """Before the token file ``tokens`` is written for ``source``: where it holds the tokens of another source
        (of the same output name), that source's latest line says they are no longer there, before they are gone
        (a SIGKILL between the file's rename and a line after it left a manifest whose latest lines gave both
        sources that token file). Called before every token file is written (write_recorded). A file put there
        since the job planned it (:meth:`planned`: another job writing into the folder at the same time) is the
        one that goes: ``other_of(tokens)`` says which other source it holds, if any."""
        with self.lock:
            self._check_there()  # (before the token file's folder is made again)
            _, other_source, _ = self._outdated.get(str(tokens), (None, None, None))
            if str(tokens) in self._planned:
                seen, now = self._planned.pop(str(tokens)), file_entry(tokens)
                if now is not None and (seen is None or not same_entry(now, seen)):
                    other_source = other_of(tokens)
            if other_source is not None:
                reason = f"its token file is made anew for {absolute(source)}, which has the same output name"
                self._line(other_source, tokens, "not-encoded", reason=reason)

    def failed(self, source: str | os.PathLike, tokens: str | os.PathLike, reason: str, **extra: Any) -> None:
        with self.lock:
            why, other_source, judged = self._outdated.pop(str(tokens), (None, None, None))
            aside = "" if why is None else _set_aside(Path(tokens), why, judged)
            if aside:
                reason = f"{reason}; {aside}"
            self.summary.failed.append((str(source), reason))
            self._line(source, tokens, "failed", reason=reason, **extra)
            if other_source is not None:  # its latest line must no longer say its tokens are there
                displaced = (
                    f"{absolute(source)}, which has the same output name, failed to replace them; {aside}"
                )
                self._line(other_source, tokens, "not-encoded", reason=displaced)

    def not_encoded(self, source: str | os.PathLike, tokens: str | os.PathLike, reason: str) -> None:
        """An input the job never settled (it stopped first); counted as failed in the summary. A token file made
        otherwise stays where it is: the job was stopped, not the input found at fault, and resuming redoes it."""
        with self.lock:
            self._left(source, tokens, reason)
            self._line(source, tokens, "not-encoded", reason=reason)

    def _left(self, source: str | os.PathLike, tokens: str | os.PathLike, reason: str) -> None:
        """``source`` left unsettled, for ``reason``: failed in the summary, its token file no longer to set aside."""
        with self.lock:
            self._outdated.pop(str(tokens), None)
            self.summary.failed.append((str(source), reason))
            self.summary.not_encoded += 1

    def list_not_encoded(
        self, inputs: Iterable[tuple[str | os.PathLike, str | os.PathLike]], reason: str, stopping: bool = True
    ) -> None:
        """:meth:`not_encoded` for each ``(source, tokens)`` of ``inputs``, the lines written LINES_AT_ONCE to a
        write; an input whose latest line said so already when the job planned (:meth:`read_settled`: a job
        stopped again before it came to it) gets no other (a million inputs left took 30 s and 265 MB of manifest
        at every stop). While the job stops for an error (``stopping``), a manifest that cannot take the lines (a
        full disk, often what stopped the job) ends the list with a notice, so that the error the job stops with
        is the one that stopped it, not this one."""
        lines: list[bytes] = []
        inputs = iter(inputs)
        try:
            for source, tokens in inputs:
                self._left(source, tokens, reason)
                if self._fd is None:
                    continue
                source, tokens = absolute(source), absolute(tokens)
                if _pair(source, tokens) not in self._listed:
                    lines.append(self._encoded(source, tokens, "not-encoded", reason=reason))
                if len(lines) >= LINES_AT_ONCE:
                    self._append(b"".join(lines))
                    lines = []
            if lines:
                self._append(b"".join(lines))
        except OSError as e:
            if not stopping:
                raise
            if not self._unlisted:  # (said once: a Ray job that stops lists what is left twice, its pass and the job)
                notice(f"{e}; the inputs left are not all listed there as not encoded")
            self._unlisted = True
            for source, tokens in inputs:  # (in the summary all the same)
                self._left(source, tokens, reason)

    def _check_there(self) -> None:
        """An OSError (the job stops, as on a full disk) where the manifest was removed since it was opened (its
        output folder deleted): the lines would go to a file no one can read, and the token files to a folder made
        anew without them."""
        if self._fd is not None and os.fstat(self._fd).st_nlink == 0:
            raise OSError(f"the manifest {self.path} was removed while the job ran (its folder deleted?); run the job "
                          "again to go on")  # fmt: skip

    def _line(self, source, tokens, status: str, clips: int = 0, reason: str = "", **extra: Any) -> None:
        if self._fd is not None:
            self._append(self._encoded(absolute(source), absolute(tokens), status, clips, reason, **extra))

    @staticmethod
    def _encoded(source: str, tokens: str, status: str, clips: int = 0, reason: str = "", **extra: Any) -> bytes:
        """A line of the manifest (``source`` and ``tokens`` made :func:`absolute` already)."""
        line = {"source": source, "tokens": tokens, "clips": clips, "status": status, "reason": reason}
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
        return (json.dumps({**line, **extra, "time": now}) + "\n").encode()

    def _append(self, data: bytes) -> None:
        """Append whole lines in one write (after whatever another job appended); on a full disk, those that fitted
        whole."""
        with self.lock:
            self._check_there()
            written = 0
            try:
                while written < len(data):
                    written += os.write(self._fd, data[written:])
            except OSError as e:  # a full disk: the run stops, and says where (the whole lines written are kept)
                self._take_back(data[data.rfind(b"\n", 0, written) + 1 : written])
                raise OSError(f"cannot write the manifest {self.path}: {e.strerror or e}") from None

    def _take_back(self, part: bytes) -> None:
        """Remove ``part``, the start of a line a failed write left at the manifest's end, if it is still its end
        (nothing appended since): a full disk leaves whole lines only."""
        with contextlib.suppress(OSError):
            size = os.fstat(self._fd).st_size
            if part and size >= len(part) and os.pread(self._fd, len(part), size - len(part)) == part:
                os.ftruncate(self._fd, size - len(part))

    def close(self) -> None:
        with self.lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _set_aside(tokens: Path, why: str, judged: tuple[int, int, int, int] | None = None) -> str:
    """Rename the token file ``tokens`` to the first free name of ``<name>.outdated``, ``<name>.outdated.2``, ...
    (an earlier one is never replaced); the clause saying what became of it. ``judged`` (a ``file_entry``): the
    file found outdated; another there now (a concurrent run's, completed since: a token file is renamed into
    place, a new file) is kept."""
    if judged is not None and (now := file_entry(tokens)) is not None and not same_entry(now, judged):
        return f"the token file there, {why}, had been replaced meanwhile (by another run): it is kept"
    stem = aside_stem(tokens.name)
    aside, n = tokens.with_name(stem + OUTDATED_SUFFIX), 1
    while os.path.lexists(aside):
        n += 1
        aside = tokens.with_name(f"{stem}{OUTDATED_SUFFIX}.{n}")
    try:
        os.rename(tokens, aside)
    except FileNotFoundError:
        return f"the token file there, {why}, had been removed meanwhile"
    except OSError as e:
        return f"the token file there, {why}, could not be moved aside ({e.strerror or e})"
    return f"the token file there, {why}, was moved to {aside.name}"


def read_manifest(path: str | os.PathLike, *, latest: bool = False) -> list[dict[str, Any]]:
    """The manifest's lines as dicts, in the order written (every job's, oldest first); with ``latest``, only each
    source's last line (its outcome), in the order of each source's first line. ``path`` may be an output folder:
    then its manifest and every shard's (``manifest-K-of-N.jsonl``) are read together, in the order of their
    ``time``, each file's in the order written (a file is appended to by one job at a time, on one machine: its
    order is the truth where another machine's clock ran ahead), the files' interleaved by time, the earliest
    next line first (a line without one, written by older versions, counts as earliest: it goes as soon as its file
    comes to it). Blank lines are passed over, and so are lines that are not JSON: a line cut short (a full disk, a
    write killed midway) is ended there by the next job (see :class:`Manifest`), and its input's outcome is in a
    later line or unknown (and lines longer than MAX_LINE, or nested deeper than JSON can be read, which no job
    writes). A JSON line that is not an object with a known status is a ValueError. With ``latest`` the files are
    read as they go: what is held is one line per source, not every line a resumed job repeated."""
    if not Path(path).is_dir():
        rows = _rows(Path(path))
        return list({row.get("source"): row for row in rows}.values()) if latest else list(rows)
    files = _manifests(Path(path))
    return _latest(files) if latest else list(_merged(files))


def _manifests(folder: Path) -> list[Path]:
    """The folder's manifest files in the order ties between their lines' times are broken: its own, then each
    shard's by name."""
    files = sorted(folder.glob("manifest*.jsonl"), key=lambda p: (p.name != MANIFEST_NAME, p.name))
    return [file for file in files if _MANIFEST_FILE.fullmatch(file.name)]


def _time(row: dict[str, Any]) -> str:
    return str(row.get("time", ""))


def _merged(files: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """The lines of ``files`` in :func:`read_manifest`'s order of a folder, read as they go: each file's in the
    order written, the files' merged by time (the file whose next line is earliest first; ties by file order).
    The first OPEN_AT_ONCE files are held open; any further ones are read BATCH_LINES lines at a time."""
    read = (_rows(file, None if i < OPEN_AT_ONCE else BATCH_LINES) for i, file in enumerate(files))
    return heapq.merge(*read, key=_time)


OPEN_AT_ONCE = 64  # manifest files held open while a folder's are merged (a shard's each)
BATCH_LINES = 64  # lines read at a time from each further one (a few hundred bytes each)


def _latest(files: Iterable[Path]) -> list[dict[str, Any]]:
    """Each source's latest line of ``files`` in :func:`read_manifest`'s order of a folder, in the order of their
    first lines, read as they go."""
    kept: dict[Any, dict[str, Any]] = {}  # source -> its latest line (a dict keeps the first lines' order)
    for row in _merged(files):
        kept[row.get("source")] = row
    return list(kept.values())


def _settled(folder: Path) -> tuple[dict[int, int | None], set[int]]:
    """For each source of the folder's manifests (by ``hash``: this process's own, never stored), the ``hash`` of
    the token file its latest line (as :func:`read_manifest` orders a folder's lines) says is complete, or None:
    what a resumed job need not say again. Held: two ints per source (about 120 bytes). Beside it, the
    (source, token file) pairs (:func:`_pair`) whose latest line says "not-encoded". A manifest that cannot be read
    says nothing: the job then lists every input it skips or leaves, as it always did."""
    kept: dict[int, int | None] = {}  # source's hash -> the hash of the token file its latest line says complete
    left: dict[int, int] = {}  # source's hash -> the pair of its latest line, where that says "not-encoded"
    try:
        for row in _merged(_manifests(folder)):
            source = hash(name := str(row.get("source")))
            status, tokens = row.get("status"), str(row.get("tokens"))
            kept[source] = hash(tokens) if status in ("done", "skipped") else None
            if status == "not-encoded":
                left[source] = _pair(name, tokens)
            else:
                left.pop(source, None)
    except (OSError, ValueError, UnicodeError):
        return {}, set()
    return kept, set(left.values())


def _pair(source: str, tokens: str) -> int:
    """A (source, token file) pair, as this process hashes it."""
    return hash((source, tokens))


LINES_AT_ONCE = 512  # not-encoded lines a write (a few hundred bytes each)
MAX_LINE = 1 << 20  # characters of a manifest line: one of ours is a few kB (two paths and a one-line reason)


def _lines(file) -> Iterator[str]:
    """The lines of the text ``file``; one longer than MAX_LINE is read past in pieces and given as a blank line
    (passed over), so that a line of gigabytes (a sparse file without a line end) is never held."""
    while line := file.readline(MAX_LINE):
        if len(line) == MAX_LINE and not line.endswith("\n"):
            while (rest := file.readline(MAX_LINE)) and not rest.endswith("\n"):
                pass
            line = "\n"
        yield line


def _rows(path: Path, batch: int | None = None) -> Iterator[dict[str, Any]]:
    """The manifest lines of ``path`` as dicts, read as they go; with ``batch``, that many lines at a time, the
    file closed in between (a folder's files are merged, read at once: a job of thousands of shards must not hold
    a descriptor for each, past the process's limit)."""
    if path.exists() and not path.is_file():  # a pipe would be waited on for ever
        raise ValueError(f"{path}: the manifest is not a regular file (a pipe, device or folder)")
    if batch is None:
        with open(path, encoding="utf-8", errors="replace", newline="") as lines:
            for number, text in enumerate(_lines(lines), start=1):
                if (row := _row(path, number, text)) is not None:
                    yield row
        return
    number, at = 0, 0
    while True:
        with open(path, encoding="utf-8", errors="replace", newline="") as lines:
            lines.seek(at)
            texts = list(itertools.islice(_lines(lines), batch))
            at = lines.tell()
        for text in texts:
            number += 1
            if (row := _row(path, number, text)) is not None:
                yield row
        if len(texts) < batch:
            return


def _row(path: Path, number: int, text: str) -> dict[str, Any] | None:
    """Line ``number`` of the manifest ``path`` as a dict, or None for a blank line or one that is not JSON."""
    if not text.strip():  # two jobs that opened the manifest at once both ended a cut line (see Manifest)
        return None
    try:
        row = json.loads(text)
    except (ValueError, RecursionError):  # a line cut short (or too long, or nested too deep to be ours)
        return None
    if not isinstance(row, dict) or row.get("status") not in STATUSES:
        raise ValueError(f"{path} line {number}: expected an object with status in {STATUSES}")
    if not isinstance(row.get("source"), str):  # (read_manifest keeps each source's last line by it)
        raise ValueError(f"{path} line {number}: expected its source as a string")
    return row
