"""The manifest of an encode job: a JSON Lines file in the output folder, one line per input, written as the job
goes (each line is flushed as soon as its input is settled), by the single-machine and the Ray command alike.

Each line: ``source`` (the input as given), ``tokens`` (its token file), ``clips`` (clips encoded; 0 unless done),
``status`` ("done", "skipped": complete already, "failed", or "not-encoded": the job stopped first) and
``reason`` (one line; empty when done or skipped). The Ray command adds ``decoded_by`` and ``encoded_by``
("host:pid" of the workers). A job rewrites the manifest from its start: a resumed job lists the inputs it skips.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pipeline import Summary

MANIFEST_NAME = "manifest.jsonl"
STATUSES = ("done", "skipped", "failed", "not-encoded")


class Manifest:
    """Records each input's outcome in a :class:`~titok_fast.pipeline.Summary` and as a manifest line.

    ``path`` is the manifest file (truncated when opened); ``None`` keeps the summary only."""

    def __init__(self, path: str | os.PathLike | None, summary: Summary):
        self.summary = summary
        self.path = None if path is None else Path(path)
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def skipped(self, source: str | os.PathLike, tokens: str | os.PathLike) -> None:
        self.summary.skipped.append(str(source))
        self._line(source, tokens, "skipped")

    def done(self, source: str | os.PathLike, tokens: str | os.PathLike, clips: int, **extra: Any) -> None:
        self.summary.done.append(str(source))
        self.summary.clips += clips
        self._line(source, tokens, "done", clips=clips, **extra)

    def failed(self, source: str | os.PathLike, tokens: str | os.PathLike, reason: str, **extra: Any) -> None:
        self.summary.failed.append((str(source), reason))
        self._line(source, tokens, "failed", reason=reason, **extra)

    def not_encoded(self, source: str | os.PathLike, tokens: str | os.PathLike, reason: str) -> None:
        """An input the job never settled (it stopped first); counted as failed in the summary."""
        self.summary.failed.append((str(source), reason))
        self._line(source, tokens, "not-encoded", reason=reason)

    def _line(self, source, tokens, status: str, clips: int = 0, reason: str = "", **extra: Any) -> None:
        if self._file is None:
            return
        line = {"source": str(source), "tokens": str(tokens), "clips": clips, "status": status, "reason": reason}
        self._file.write(json.dumps({**line, **extra}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The manifest's lines as dicts; a line that is not a JSON object with a known status is a ValueError."""
    rows = []
    for number, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number}: not JSON ({e})") from None
        if not isinstance(row, dict) or row.get("status") not in STATUSES:
            raise ValueError(f"{path} line {number}: expected an object with status in {STATUSES}")
        rows.append(row)
    return rows
