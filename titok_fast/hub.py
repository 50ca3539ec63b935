"""Weights by name: Hugging Face Hub repository ids, fetched through ``huggingface_hub`` (its cache, offline mode,
token handling), and titok-fast's own cache of converted weights.

How a ``--checkpoint`` string is read (:func:`parse_hub_ref`):
- ``hf://owner/name[@revision][:file]`` is always a Hub reference;
- otherwise an existing local path wins;
- otherwise ``owner/name[@revision][:file]`` is a Hub reference, unless the name ends like a weights file
  (``.ckpt``, ``.safetensors``, ``.pt``, ``.pth``: ``checkpoints/model.ckpt`` is a local path, absent).
The file defaults to ``model.ckpt`` and the revision to the repository's default branch; what was loaded is
recorded as ``hf://owner/name@<commit>:<file>``, the commit being the exact snapshot the file came from.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .files import kind_of

V1_REPO = "NilanE/TiTok-Video-VariableComp-V1"
DEFAULT_FILE = "model.ckpt"
KNOWN_CONFIGS = {V1_REPO: "v1"}  # the released checkpoints carry no config: known ids map to their preset
CHECKPOINT_ENV = "TITOK_FAST_CHECKPOINT"  # overrides the default weights
CACHE_ENV = "TITOK_FAST_CACHE"  # where converted weights are kept
QUICK_TIMEOUT_S = 3.0  # how long the demo waits for the Hub before falling back to random weights
HUB_SCHEME = "hf://"

_REPO = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_REVISION = re.compile(r"[\w./-]{1,255}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LOCAL_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth")


class WeightsUnavailable(ValueError):
    """The Hub cannot be reached (offline, no network) and the file is not in the cache."""


@dataclass(frozen=True)
class HubRef:
    """A file in a Hub model repository: `repo_id` ("owner/name"), `revision` (branch, tag or commit; None: the
    default branch) and `filename` inside the repository."""

    repo_id: str
    revision: str | None = None
    filename: str = DEFAULT_FILE

    def __str__(self) -> str:
        return f"{HUB_SCHEME}{self.repo_id}{f'@{self.revision}' if self.revision else ''}:{self.filename}"


def default_checkpoint() -> str:
    """The weights used when none are named: ``$TITOK_FAST_CHECKPOINT``, else the V1 release."""
    return os.environ.get(CHECKPOINT_ENV) or V1_REPO


def parse_hub_ref(text: str | os.PathLike[str]) -> HubRef | None:
    """The Hub reference `text` names, or None for a local path (see the module docstring for the rules)."""
    if not isinstance(text, str):
        return None
    explicit = text.startswith(HUB_SCHEME)
    head, _, filename = text.removeprefix(HUB_SCHEME).partition(":")
    repo_id, _, revision = head.partition("@")
    if not explicit and (os.path.exists(text) or repo_id.lower().endswith(_LOCAL_SUFFIXES)):
        return None
    valid = (
        _REPO.fullmatch(repo_id)
        and (not revision or _valid_revision(revision))
        and (not filename or _valid_filename(filename))
    )
    if not valid:
        if explicit:
            raise ValueError(f"{text!r} is not a Hub reference; expected hf://owner/name[@revision][:file]")
        return None
    return HubRef(repo_id, revision or None, filename or DEFAULT_FILE)


def why_not_a_reference(text: str) -> str:
    """Why ``text``, which reads as owner/name@revision, is not a Hub reference ("" otherwise): for the message
    about the local path it is then taken for."""
    head = text.partition(":")[0]
    repo_id, at, revision = head.partition("@")
    if at and _REPO.fullmatch(repo_id) and not _valid_revision(revision) and not text.lower().endswith(_LOCAL_SUFFIXES):
        return f" (nor a Hub id: its revision {revision!r} is not a git ref name, no part of which starts with a dot)"
    return ""


def local_look_alike(text: str) -> str:
    """For ``text``, taken as a Hub id (``owner/name``, no ``hf://``): that it names no local file either, and the
    local weights file it may have meant (its name with a weights suffix), as words to add to an error ("" for an
    explicit ``hf://`` reference)."""
    if text.startswith(HUB_SCHEME):
        return ""
    near = [text + suffix for suffix in _LOCAL_SUFFIXES if os.path.isfile(text + suffix)]
    return f" ({text} is no local file either{f'; did you mean {near[0]}?' if near else ''})"


def _valid_revision(revision: str) -> bool:
    """A branch, tag or commit name as git allows it (``git check-ref-format``: no part that starts with a dot, so no
    ``..``, no empty part): huggingface_hub reads a branch's commit from the file ``refs/<revision>`` of its cache,
    so a revision such as ``../../x`` would open a file outside it."""
    parts = revision.split("/")
    return bool(_REVISION.fullmatch(revision)) and all(part and not part.startswith(".") for part in parts)


def is_pinned(text: str) -> bool:
    """Whether ``text`` is a Hub reference pinned to a commit (``hf://owner/name@<40 hex digits>:<file>``), as
    titok-fast records the weights it loaded from the Hub."""
    try:
        ref = parse_hub_ref(text) if text.startswith(HUB_SCHEME) else None
    except ValueError:
        return False
    return ref is not None and bool(_COMMIT.fullmatch(ref.revision or ""))


def _valid_filename(filename: str) -> bool:
    parts = PurePosixPath(filename).parts
    return bool(_REVISION.fullmatch(filename)) and not filename.startswith("/") and ".." not in parts


def download(ref: HubRef, *, quick: bool = False) -> tuple[Path, HubRef]:
    """The local copy of `ref` (downloaded into the Hugging Face cache if needed) and `ref` pinned to the commit
    it came from. `quick`: wait at most ``QUICK_TIMEOUT_S`` for the Hub before using the cache.

    Raises WeightsUnavailable (offline or unreachable, not cached) or ValueError (no such repository, revision or
    file), each one line."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    _check_small_files_read(ref)
    timeout = QUICK_TIMEOUT_S if quick else constants.DEFAULT_ETAG_TIMEOUT
    # huggingface_hub retries an unreachable Hub for half a minute before using its cache: ask once, briefly
    cached_only = not constants.HF_HUB_OFFLINE and not _reachable(constants.ENDPOINT, timeout)
    try:
        local = hf_hub_download(
            ref.repo_id, ref.filename, revision=ref.revision, library_name="titok-fast", etag_timeout=timeout,
            local_files_only=cached_only,
        )  # fmt: skip
    except LocalEntryNotFoundError:
        raise WeightsUnavailable(
            f"weights {ref} are not in the Hugging Face cache and the Hub cannot be reached: run "
            f"`hf download {ref.repo_id} {ref.filename}{f' --revision {ref.revision}' if ref.revision else ''}` "
            "on a connected machine (then copy its cache here, or set HF_HOME), or pass the path of a local weights "
            "file instead (--checkpoint PATH)"
        ) from None
    except (EntryNotFoundError, HfHubHTTPError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"weights {ref} cannot be fetched from the Hub: {reason}") from None
    local = Path(local)
    depth = len(PurePosixPath(ref.filename).parts)
    snapshot = local.parents[depth - 1].name  # <repository's folder>/snapshots/<commit>/<filename>
    if not _COMMIT.fullmatch(snapshot):  # token files record the commit: one that is not is of no use to decode
        raise ValueError(
            f"weights {ref}: the Hugging Face cache gives {local}, in a snapshot folder {snapshot[:80]!r} that is not "
            "a commit (40 hex digits): its refs are damaged; download the file again"
        )
    repository = local.parents[depth + 1]
    real = Path(os.path.realpath(local))
    if not real.is_relative_to(os.path.realpath(repository)):  # a snapshot's file links to one of its blobs
        raise ValueError(
            f"weights {ref}: the Hugging Face cache's {local} leads to {real}, outside the repository's folder "
            f"{repository}: not loaded (the cache is damaged or was made elsewhere); download the file again"
        )
    return local, HubRef(ref.repo_id, snapshot, ref.filename)


# The small files huggingface_hub reads whole, unchecked, to fetch a Hub file: the ref naming a branch's commit in
# the cache, the token of the logged-in user and its stored tokens. A sparse refs/main of 3 GB took all of a 24 GB
# machine's memory; a token file that is a FIFO hung the run. A ref holds 40 hex digits; a token, a few dozen bytes.
REF_BYTES, TOKEN_BYTES = 1 << 10, 1 << 20


def _check_small_files_read(ref: HubRef) -> None:
    """Refuse, in one line naming it, a file huggingface_hub would read whole for ``ref`` (see REF_BYTES) where it
    is not a regular file of at most that many bytes (a link is judged by what it leads to; a missing file is
    fine), or is the cache's ref and leads out of its repository's folder."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    files = [(Path(constants.HF_TOKEN_PATH), "token file", TOKEN_BYTES),
             (Path(constants.HF_STORED_TOKENS_PATH), "stored tokens file", TOKEN_BYTES)]  # fmt: skip
    if not _COMMIT.fullmatch(ref.revision or ""):
        folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=ref.repo_id, repo_type="model")
        ref_file = folder / "refs" / (ref.revision or "main")
        files.append((ref_file, "cache's ref", REF_BYTES))
        real = os.path.realpath(ref_file)  # (a cache copied from elsewhere may link anywhere: not read there)
        if os.path.lexists(ref_file) and not Path(real).is_relative_to(os.path.realpath(folder)):
            raise ValueError(f"the Hugging Face cache's ref {ref_file} leads to {real}, outside the repository's "
                             f"folder {folder}: not read (the cache is damaged or was made elsewhere)")  # fmt: skip
    for path, what, most in files:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as e:  # (a folder above it that is a file, $HF_HOME say: the library's own read fails too)
            raise ValueError(f"the Hugging Face {what} {path} cannot be looked at ({e.strerror or e})") from None
        if not stat.S_ISREG(st.st_mode) or st.st_size > most:
            kind = kind_of(st.st_mode) if not stat.S_ISREG(st.st_mode) else f"a file of {st.st_size:,} bytes"
            raise ValueError(f"the Hugging Face {what} {path} is {kind}, where its links lead; expected a regular "
                             f"file of at most {most:,} bytes: move it away")  # fmt: skip


def _reachable(endpoint: str, timeout: float) -> bool:
    """Whether `endpoint` answers an HTTP request within `timeout` seconds (any status; proxies as configured)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


def cache_dir() -> Path:
    """titok-fast's cache of converted weights: ``$TITOK_FAST_CACHE``, else ``$XDG_CACHE_HOME/titok-fast``
    (``~/.cache/titok-fast``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "titok-fast"


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22, *, trust_blob_name: bool = True) -> str:
    """sha256 of a file's bytes (hex). A file in the Hugging Face cache resolves to a blob named by that very sha256
    (the LFS object id), so for those the name is used instead of reading gigabytes on every run (unless not
    `trust_blob_name`: whoever can write to the cache can put any bytes under any name); anything else is read in
    chunks of `chunk` bytes. Only a regular file is hashed (see :func:`open_regular`): a link to /dev/zero would be
    read for ever, a FIFO would block."""
    real = os.path.realpath(path)
    _check_regular(path, os.stat(real).st_mode)
    blob = os.path.basename(real)
    if trust_blob_name and _SHA256.fullmatch(blob) and os.path.basename(os.path.dirname(real)) == "blobs":
        return blob
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """`path` opened for reading, where its links lead to a regular file: checked before it is opened and again on
    what was opened (opened without waiting for a writer, so a FIFO swapped in meanwhile is refused, not waited on).
    Otherwise a one-line ValueError naming the file and what it is (a folder, a FIFO, a device such as /dev/zero)."""
    _check_regular(path, os.stat(path).st_mode)
    file = open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    try:
        _check_regular(path, os.fstat(file.fileno()).st_mode)
    except BaseException:
        file.close()
        raise
    return file


def _check_regular(path: str | os.PathLike[str], mode: int) -> None:
    """Refuse a file whose `mode` (``st_mode``) is not a regular file's, naming `path` and what it is."""
    if not stat.S_ISREG(mode):
        raise ValueError(
            f"{path} is not a regular file (it is {kind_of(mode)}, where its links lead); expected a weights file"
        )
