"""Token files: one safetensors file per video holding the codebook indices of its chunks.

Tensors:
  indices       int16   [total]       all chunks' indices concatenated (codebooks of up to 32768 entries)
  token_counts  int32   [chunks]      tokens of each chunk
  grids         int32   [chunks, 3]   pixel (T, H, W) of each chunk
  offsets       int64   [chunks + 1]  start of each chunk's indices in `indices`; the last is `total`
  start_times   float64 [chunks]      start of each chunk, seconds
Metadata: the key "titok_fast" holds JSON {"version": 1, "model_config": {...}, "weights_digest": str,
"fps": number in (0, MAX_FPS], "source": str, "chunking": {"frames_per_chunk": int, "tail": str,
"last_chunk_frames": int, "sampling": str}, "codebook_size": int, "weights_source": str}, and optionally
"made_with": {str: str} (see MADE_WITH_KEY), "digest": "sha256:<hex>" (see DIGEST_KEY) and, in "chunking",
"chunk_seconds": number > 0 (the source time a chunk spans) and "source_fps": number > 0 (the source's average
frame rate, which upstream's sampling divides into chunks).
weights_source is a local path (recorded, never opened on behalf of the file) or "hf://owner/name@<commit>:<file>"
for Hub weights. Readers ignore fields they do not know, so new optional fields keep the format version and older
files keep loading.

Files are written to a temporary name in the target folder, synced, then renamed, so a file under its final
name is complete; load_tokens checks everything it reads and raises TokenFileError naming the file and problem,
a file damaged since it was written (a flipped bit in a token, a value of its metadata) included where the file
records a digest, as every file written since it was added does.
A file holds at least one chunk (a video too short for one is an error, never an empty file), its metadata JSON
is at most MAX_METADATA_CHARS characters, checked before it is parsed, its header at most MAX_HEADER_BYTES and the
whole file at most MAX_FILE_BYTES, checked before they are read.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import re
import reprlib
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .archives import member_bytes
from .checks import MAX_GRID, MAX_GRID_VOXELS
from .files import FORMAT_VERSION, METADATA_KEY, write_atomically
from .video import MAX_FPS, SAMPLINGS, TAIL_POLICIES, chunk_length, chunk_picks

MAX_CODEBOOK_SIZE = 1 << 15  # int16 holds indices up to 32767
MAX_INT32 = (1 << 31) - 1
MAX_METADATA_CHARS = 1 << 20  # a token file's metadata JSON is a few hundred characters; a stranger's may be huge
# A token file is read whole and its tensors copied (a file of this size raised a process's peak memory by 628 MiB,
# with the checks' temporaries): 128M tokens, weeks of video. Its
# safetensors header (five tensors' entries and the metadata) is checked to be at most MAX_HEADER_BYTES before it is
# parsed; a stranger's file may hold anything.
MAX_FILE_BYTES = 1 << 28
MAX_HEADER_BYTES = 4 * MAX_METADATA_CHARS
# The most chunks a token file holds, and chunks x frames_per_chunk: all_indices() makes a tensor of each chunk (about
# 1.1 KB apiece: 290 MB for MAX_CHUNKS) and source_frames() an int64 of each frame (128 MiB for MAX_FILE_FRAMES).
# Bounded by MAX_FILE_BYTES alone, a stranger's 250 MB file of 7.7M one-token chunks took 5.3 GB in all_indices().
MAX_CHUNKS = 1 << 18
MAX_FILE_FRAMES = 1 << 24
TENSORS = {  # name -> (dtype, dimensions)
    "indices": (torch.int16, 1),
    "token_counts": (torch.int32, 1),
    "grids": (torch.int32, 2),
    "offsets": (torch.int64, 1),
    "start_times": (torch.float64, 1),
}
CHUNK_BYTES = 32  # a chunk's entries in TENSORS besides its indices: token count, grid, offset and start time
FIELDS = {  # metadata field -> accepted types, as stored in JSON and held by TokenFile
    "model_config": (dict,),
    "weights_digest": (str,),
    "fps": (int, float),
    "source": (str,),
    "codebook_size": (int,),
    "weights_source": (str,),
}
CHUNKING_FIELDS = {"frames_per_chunk": (int,), "tail": (str,), "last_chunk_frames": (int,), "sampling": (str,)}
# Optional in "chunking" (files without it load with None): the source time one chunk's frames span, which is what a
# decoded video of one chunk is played at (a video's chunks' start times say it where there are two or more).
CHUNK_SECONDS_KEY = "chunk_seconds"
# Optional in "chunking" too (files without it load with None): the source's average frame rate as the reader took it,
# from which a chunk's source frames follow with sampling "upstream" (TokenFile.source_frames).
SOURCE_FPS_KEY = "source_fps"

# How the tokens were made: an optional object {name: str} under "made_with" (files without it load with {}).
# Written by the encode pipeline: decoder / decoded_by (asked for, used), preprocess / preprocessed_on (asked for,
# used), device, dtype, backend, mode, and rotation, time_sampling, nvdec_rgb and clips_per_video where they apply
# (precision in files an earlier version made with an FP8 encoder, which resumes redo). Resumed runs compare what
# was asked for (pipeline.RESUME_KEYS), so files made different ways never mix: the same request on the same
# device gives the same placement for a source, and a decoder the machine lacks is recorded as the one used
# (pipeline.decoder_here); not decoded_by and preprocessed_on (what a file got, for the record), source_stamp
# (checked against the source), reader (the day of the reader's latest fix, video.READER: a resume counts the files
# an earlier reader made) nor made_by (titok-fast's version, for the record).
MADE_WITH_KEY = "made_with"
# A digest of everything else the file holds: every tensor (name, shape and bytes, in TENSORS' order) and the other
# metadata fields (as canonical JSON), so that it does not depend on how either is laid out in the file. A damaged
# token file whose values still pass every check (a token that became another valid token) fails to load, and a
# resumed run redoes it. Files without one (written before it was added) load as before.
DIGEST_KEY = "digest"
DIGEST_PREFIX = "sha256:"


def most_chunks(tokens: int, frames: int) -> int:
    """The most chunks of ``tokens`` tokens and ``frames`` frames a token file may hold: one of more could not be
    loaded (MAX_FILE_BYTES, MAX_CHUNKS, MAX_FILE_FRAMES). 256 tokens: 262,144 chunks, 182 hours of 20 frames at 8
    fps."""
    return min(_most_by_size(tokens), MAX_CHUNKS, MAX_FILE_FRAMES // frames)


def _most_by_size(tokens: int) -> int:
    return (MAX_FILE_BYTES - MAX_HEADER_BYTES) // (2 * tokens + CHUNK_BYTES)


def too_many_chunks(tokens: int, frames: int) -> str:
    """Why a video of more than :func:`most_chunks` clips fails (once it has that many: nothing more is held)."""
    most = most_chunks(tokens, frames)
    if most == _most_by_size(tokens):
        return (
            f"more than {most:,} clips of {tokens} tokens: its token file would pass the {MAX_FILE_BYTES:,} bytes a "
            "token file may have; cut the video into parts"
        )
    return (f"more than {most:,} clips of {frames} frames: a token file holds at most {MAX_CHUNKS:,} clips and "
            f"{MAX_FILE_FRAMES:,} frames; cut the video into parts")  # fmt: skip


class TokenFileError(ValueError):
    """A token file (or the TokenFile for one) that is unreadable or inconsistent; the message says what."""


@dataclass(frozen=True, eq=False)
class TokenFile:
    """The tokens of one video; construction checks that every field is consistent.

    indices: [total] int16, all chunks' indices concatenated, each in [0, codebook_size)
    token_counts: [chunks] int32, tokens of each chunk (>= 1); at least one chunk
    grids: [chunks, 3] int32, pixel (T, H, W) of each chunk (> 0; T is frames_per_chunk, a last chunk padded)
    start_times: [chunks] float64, start of each chunk in seconds (finite, >= 0, non-decreasing)
    model_config: JSON-serialisable dict describing the model (tuples come back from a file as lists)
    weights_digest: identifies the weights that produced the indices
    fps: frame rate the video was sampled at, in (0, MAX_FPS]
    source: the source video's path
    frames_per_chunk, tail, last_chunk_frames: the chunking policy and the real frames of the last chunk
    sampling: how frames were picked ("upstream": the notebook's frame indices, "time": presentation times)
    codebook_size: number of codes, at most 32768
    weights_source: where the weights came from: a checkpoint path, "hf://owner/name@<commit>:<file>" for Hub
        weights, "" if unknown or random
    made_with: how the tokens were made (decoder, preprocessing, device, dtype, backend, mode; rotation when not
        the default; time_sampling with sampling "time"; nvdec_rgb with decoder "nvdec"; clips_per_video when
        given; reader, source_stamp, made_by); {} if unknown
    chunk_seconds: the source time one chunk spans (finite, > 0: upstream's sampling takes int(T x source fps /
        fps) source frames a chunk), None if unknown
    source_fps: the source's average frame rate, as the reader took it (finite, > 0), None if unknown
    """

    indices: torch.Tensor
    token_counts: torch.Tensor
    grids: torch.Tensor
    start_times: torch.Tensor
    model_config: dict[str, Any]
    weights_digest: str
    fps: float
    source: str
    frames_per_chunk: int
    tail: str
    last_chunk_frames: int
    codebook_size: int
    weights_source: str = ""
    sampling: str = "upstream"
    made_with: dict[str, str] = field(default_factory=dict)
    chunk_seconds: float | None = None
    source_fps: float | None = None

    def __post_init__(self) -> None:
        _check_token_file(self)

    @classmethod
    def from_chunks(
        cls,
        chunk_indices: Sequence[torch.Tensor],
        grids: Sequence[Sequence[int]],
        start_times: Sequence[float],
        *,
        model_config: dict[str, Any],
        weights_digest: str,
        fps: float,
        source: str,
        frames_per_chunk: int,
        tail: str,
        last_chunk_frames: int,
        codebook_size: int,
        weights_source: str = "",
        sampling: str = "upstream",
        made_with: dict[str, str] | None = None,
        chunk_seconds: float | None = None,
        source_fps: float | None = None,
    ) -> TokenFile:
        """Build from per-chunk indices (each [n_i], any integer dtype), grids (T, H, W) and start times.

        Values that are not integers (float indices, a grid of 2.5 frames) are refused, never truncated."""
        for chunk, part in enumerate(chunk_indices):
            if not isinstance(part, torch.Tensor):
                raise TokenFileError(f"chunk {chunk}'s indices must be a torch tensor; got {type(part).__name__}")
            if part.is_floating_point() or part.is_complex() or part.dtype == torch.bool:
                raise TokenFileError(f"chunk {chunk}'s indices must be integers; got dtype {part.dtype}")
        grids = [_integer_grid(chunk, grid) for chunk, grid in enumerate(grids)]
        flat = torch.cat([i.reshape(-1).long() for i in chunk_indices] or [torch.zeros(0, dtype=torch.int64)])
        _check_indices(flat, codebook_size)  # before narrowing to int16, which would wrap large values
        return cls(
            indices=flat.to(torch.int16),
            token_counts=torch.tensor([i.numel() for i in chunk_indices], dtype=torch.int32),
            grids=torch.tensor(grids, dtype=torch.int32).reshape(-1, 3),
            start_times=torch.tensor(list(start_times), dtype=torch.float64),
            model_config=model_config,
            weights_digest=weights_digest,
            fps=fps,
            source=source,
            frames_per_chunk=frames_per_chunk,
            tail=tail,
            last_chunk_frames=last_chunk_frames,
            codebook_size=codebook_size,
            weights_source=weights_source,
            sampling=sampling,
            made_with=dict(made_with or {}),
            chunk_seconds=chunk_seconds,
            source_fps=source_fps,
        )

    @cached_property
    def offsets(self) -> torch.Tensor:
        """[chunks + 1] int64: chunk i's indices are indices[offsets[i]:offsets[i + 1]]."""
        return torch.cat([torch.zeros(1, dtype=torch.int64), self.token_counts.long().cumsum(0)])

    def clip_indices(self, i: int) -> torch.Tensor:
        """Indices of chunk i: [token_counts[i]] int64."""
        if not 0 <= i < self.token_counts.numel():
            raise IndexError(f"chunk {i} out of range for {self.token_counts.numel()} chunks")
        return self.indices[self.offsets[i] : self.offsets[i + 1]].long()

    def all_indices(self) -> list[torch.Tensor]:
        """Indices of every chunk: list of [token_counts[i]] int64, each a tensor of its own (not a view of one
        tensor of the file's: a DataLoader worker returning a chunk sent the whole file's indices with it)."""
        return [chunk.long() for chunk in self.indices.split(self.token_counts.tolist())]

    def source_frames(self) -> torch.Tensor:
        """[chunks, frames_per_chunk] int64: the source frames each chunk's frames are, numbered from the video's
        first decoded frame (0), with sampling "upstream": chunk c spans source frames [c * L, (c + 1) * L), L =
        int(frames_per_chunk * (source_fps / fps)), and picks numpy.linspace(c * L, c * L + L - 1,
        frames_per_chunk, dtype=int); in a padded last chunk the picks past its first last_chunk_frames (past the
        video's end) are the last of those, which the padding repeats. ValueError where the file does not say:
        sampling "time" (a chunk's frames are those shown at start_times[c] + k / fps), or no source_fps (written
        before it was recorded)."""
        if self.sampling != "upstream":
            raise ValueError(f"sampling {self.sampling!r} picks frames by their times, not by their numbers: chunk c's "
                             "frame k is the one shown at start_times[c] + k / fps")  # fmt: skip
        if self.source_fps is None:
            raise ValueError("this file does not record its source's frame rate (written before it was recorded)")
        span = self.frames_per_chunk * (self.source_fps / self.fps)
        if not 1 <= span < 2**53:  # (as a reader refuses such a rate)
            raise ValueError(f"its {self.frames_per_chunk} frames at {self.fps:g} fps from {self.source_fps:g} fps "
                             f"make chunks of {span:.3g} source frames")  # fmt: skip
        length = chunk_length(self.frames_per_chunk, self.source_fps, self.fps)
        chunks = np.arange(self.token_counts.numel())
        picks = chunk_picks(chunks, self.frames_per_chunk, length).astype(np.int64)
        if len(picks) and 0 < self.last_chunk_frames < self.frames_per_chunk:  # (the padding: the last real frame)
            picks[-1, self.last_chunk_frames :] = picks[-1, self.last_chunk_frames - 1]
        return torch.from_numpy(picks)


def save_tokens(path: str | os.PathLike[str], token_file: TokenFile) -> None:
    """Write a token file atomically: a temporary file in the same folder, fsync, then rename over `path`."""
    metadata = {
        "version": FORMAT_VERSION,
        **{name: getattr(token_file, name) for name in FIELDS},
        "chunking": {name: getattr(token_file, name) for name in CHUNKING_FIELDS},
    }
    if token_file.chunk_seconds is not None:
        metadata["chunking"][CHUNK_SECONDS_KEY] = token_file.chunk_seconds
    if token_file.source_fps is not None:
        metadata["chunking"][SOURCE_FPS_KEY] = token_file.source_fps
    if token_file.made_with:
        metadata[MADE_WITH_KEY] = token_file.made_with
    tensors = {name: getattr(token_file, name).contiguous() for name in TENSORS}
    parts = ((name, list(t.shape), t.detach().cpu().view(torch.uint8).numpy()) for name, t in tensors.items())
    metadata[DIGEST_KEY] = _digest(json.loads(json.dumps(metadata)), parts)  # (as a reader will see it: keys str)
    text = json.dumps(metadata)
    if len(text) > MAX_METADATA_CHARS:  # it would not load
        raise TokenFileError(f"metadata is {len(text)} characters; at most {MAX_METADATA_CHARS} are allowed")
    data = save(tensors, metadata={METADATA_KEY: text})
    if len(data) > MAX_FILE_BYTES:  # it would not load
        raise TokenFileError(f"would be {len(data):,} bytes; a token file may have at most {MAX_FILE_BYTES:,}")
    write_atomically(path, data)


def load_tokens(path: str | os.PathLike[str], data: bytes | None = None) -> TokenFile:
    """Read and validate a token file; raises TokenFileError naming the file and the first problem found.

    The file is read in one call (at most MAX_FILE_BYTES) and parsed from memory: a resumed job reads every token
    file of its dataset before it starts, so this is what it waits for. ``data``: its bytes, read already by
    :func:`read_token_bytes` (a resume reads files ahead in threads and parses them as it comes to them)."""
    path = os.fspath(path)
    if data is None:
        data = read_token_bytes(path)
    elif isinstance(data, (bytearray, memoryview)):  # (a buffer of them: a memory map, a framework's sample)
        data = bytes(data)
    elif not isinstance(data, bytes):
        raise TypeError(f"{path}: data must be a token file's bytes; got {type(data).__name__}")
    try:
        header_bytes = int.from_bytes(data[:8], "little")
        if header_bytes > len(data) - 8:  # (not said: another kind of file's first 8 bytes, read as a number)
            raise ValueError("its first 8 bytes do not give the length of a header within the file")
        if header_bytes > MAX_HEADER_BYTES:
            raise ValueError(f"its header is {header_bytes} bytes; a token file's is at most {MAX_HEADER_BYTES}")
        loaded = load(data)  # checks the header, the dtypes, shapes and offsets against the buffer's size
        entries = json.loads(data[8 : 8 + header_bytes])  # a header load has checked
        header = entries.get("__metadata__") or {}
    except Exception as exc:  # a stranger's file may break the parser in ways no check here foresees
        if len(data) < 8:  # (a copy or download that never got its bytes)
            size = "empty" if not data else f"{len(data)} bytes"
            raise TokenFileError(f"{path}: not a readable safetensors file ({size}, where a token file begins with "
                                 "the 8-byte length of its header: cut short?)") from exc  # fmt: skip
        declared = _declared_size(data)
        if declared is not None and declared > len(data):
            raise TokenFileError(f"{path}: cut short: {len(data)} bytes, where its header says {declared}") from exc
        if declared is not None and declared < len(data):  # (overwritten in place by a shorter file, not truncated)
            raise TokenFileError(f"{path}: {len(data)} bytes, where its header says {declared}: bytes past its end "
                                 "(overwritten in place by a shorter file?)") from exc  # fmt: skip
        raise _unreadable(path, exc) from exc
    try:
        metadata = _parse_metadata(header)
        tensors = {name: loaded[name] for name in TENSORS if name in loaded}
        _check_tensors(tensors)
        token_file = TokenFile(
            indices=tensors["indices"],
            token_counts=tensors["token_counts"],
            grids=tensors["grids"],
            start_times=tensors["start_times"],
            **{name: metadata[name] for name in FIELDS},
            **{name: metadata["chunking"][name] for name in CHUNKING_FIELDS},
            made_with=metadata.get(MADE_WITH_KEY, {}),
            chunk_seconds=metadata["chunking"].get(CHUNK_SECONDS_KEY),
            source_fps=metadata["chunking"].get(SOURCE_FPS_KEY),
        )
        stored = memoryview(data)[8 + header_bytes :]  # each tensor's bytes as the file holds them
        parts = ((name, entries[name]["shape"], stored[slice(*entries[name]["data_offsets"])]) for name in TENSORS)
        _check_digest(metadata, parts)  # last: a value no file could hold is said as such
        return token_file
    except TokenFileError as exc:
        raise TokenFileError(f"{path}: {exc}") from None
    except (ArithmeticError, LookupError, TypeError, ValueError, RuntimeError) as exc:  # values no check foresaw
        raise TokenFileError(f"{path}: not a valid token file ({type(exc).__name__}: {exc})") from exc


def recorded_digest(data: bytes) -> str | None:
    """The digest the token file of bytes ``data`` records (``"sha256:<hex>"``), read from its header alone, or
    None where it records none or its header cannot be read: what the file holds, unchecked (load_tokens checks
    it)."""
    try:
        text = _header(data)["__metadata__"][METADATA_KEY]  # (None: a TypeError)
        digest = json.loads(text).get(DIGEST_KEY) if len(text) <= MAX_METADATA_CHARS else None
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None
    return digest if isinstance(digest, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", digest) else None


def _declared_size(data: bytes) -> int | None:
    """The size a safetensors file's header says the file has (its length, the header, the tensors' bytes), or
    None where the header does not say (too short to hold its length, past MAX_HEADER_BYTES, not JSON)."""
    if (header_bytes := _header_bytes(data)) is None:
        return None
    if 8 + header_bytes > len(data):
        return 8 + header_bytes
    try:
        ends = [int(entry["data_offsets"][1]) for name, entry in _header(data).items() if name != "__metadata__"]
    except Exception:  # not a header of that form: said as it is
        return None
    return 8 + header_bytes + max(ends, default=0)


def _header_bytes(data: bytes) -> int | None:
    """The length of the header a safetensors file's first 8 bytes give, or None where they cannot be read or
    give more than MAX_HEADER_BYTES."""
    if len(data) < 8 or (header_bytes := int.from_bytes(data[:8], "little")) > MAX_HEADER_BYTES:
        return None
    return header_bytes


def _header(data: bytes) -> Any:
    """A safetensors file's header, parsed from its JSON, unchecked; None where it is not within ``data`` (or
    longer than MAX_HEADER_BYTES). ValueError (or RecursionError) where it is not JSON."""
    if (header_bytes := _header_bytes(data)) is None or 8 + header_bytes > len(data):
        return None
    return json.loads(data[8 : 8 + header_bytes])


def read_token_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the token file at ``path``, unchecked, for :func:`load_tokens`; TokenFileError when it cannot
    be read or is not a regular file of at most MAX_FILE_BYTES."""
    path = os.fspath(path)
    try:
        return read_at_most(path, MAX_FILE_BYTES)
    except Exception as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: str, exc: Exception) -> TokenFileError:
    detail = str(exc) if isinstance(exc, (SafetensorError, OSError, ValueError)) else f"{type(exc).__name__}: {exc}"
    return TokenFileError(f"{path}: not a readable safetensors file ({detail})")


def read_at_most(path: str, limit: int, kind: str = "a token file") -> bytes:
    """The bytes of the regular file at ``path``, if at most ``limit`` (else a ValueError saying ``kind`` holds at
    most that); a named pipe neither blocks the opening (O_NONBLOCK) nor is read, nor is a device. A member of a tar
    archive (``shards/00000.tar/clip.safetensors``) is read from its span of the archive."""
    if (data := member_bytes(path, limit, kind)) is not None:
        return data
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise ValueError("not a regular file")
        if status.st_size > limit:
            raise ValueError(f"{status.st_size} bytes; {kind} holds at most {limit}")
        with open(descriptor, "rb", closefd=False) as file:
            return file.read(status.st_size)
    finally:
        os.close(descriptor)


def try_load_tokens(path: str | os.PathLike[str]) -> TokenFile | None:
    """The token file at `path`, or None when there is no regular file there or it is not a valid token file."""
    if not os.path.isfile(path):  # (a plain file: an archive's member is no output encode could write)
        return None
    try:
        return load_tokens(path)
    except TokenFileError:
        return None


def is_complete(path: str | os.PathLike[str], *, weights_digest: str | None = None) -> bool:
    """Whether `path` holds a valid token file (made with `weights_digest`, if given): resumable runs skip it."""
    token_file = try_load_tokens(path)
    return token_file is not None and (weights_digest is None or token_file.weights_digest == weights_digest)


def _parse_metadata(header: dict[str, str]) -> dict[str, Any]:
    if METADATA_KEY not in header:
        raise TokenFileError(f"metadata has no {METADATA_KEY!r} key")
    text = header[METADATA_KEY]
    if len(text) > MAX_METADATA_CHARS:
        raise TokenFileError(f"metadata {METADATA_KEY!r} is {len(text)} characters; at most {MAX_METADATA_CHARS}")
    try:
        metadata = json.loads(text)
    except RecursionError:
        raise TokenFileError(f"metadata {METADATA_KEY!r} is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of too many digits
        raise TokenFileError(f"metadata {METADATA_KEY!r} is not valid JSON ({exc})") from None
    if not isinstance(metadata, dict):
        raise TokenFileError(f"metadata {METADATA_KEY!r} must be a JSON object; got {type(metadata).__name__}")
    _check_fields("metadata", metadata, {"version": (int,)})  # first: other versions may have other fields
    if metadata["version"] != FORMAT_VERSION:
        raise TokenFileError(f"unsupported format version {metadata['version']} (supported: {FORMAT_VERSION})")
    _check_fields("metadata", metadata, {**FIELDS, "chunking": (dict,)})
    _check_fields("metadata chunking", metadata["chunking"], CHUNKING_FIELDS)
    return metadata


def _digest(metadata: dict[str, Any], parts: Iterable[tuple[str, list[int], Any]]) -> str:
    """The digest (DIGEST_KEY) of a token file's ``metadata`` (its fields but the digest) and tensors: ``parts``,
    (name, shape, little-endian bytes) of each tensor in TENSORS' order."""
    fields = {name: value for name, value in metadata.items() if name != DIGEST_KEY}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    for name, shape, stored in parts:
        digest.update(f"\0{name}{list(shape)}\0".encode())
        digest.update(stored)
    return DIGEST_PREFIX + digest.hexdigest()


def _check_digest(metadata: dict[str, Any], parts: Iterable[tuple[str, list[int], Any]]) -> None:
    """The digest a token file records (if it records one) against what it holds (``parts``, see _digest)."""
    if DIGEST_KEY not in metadata:  # written before digests were (its values are checked all the same)
        return
    recorded = metadata[DIGEST_KEY]
    _check_type(DIGEST_KEY, recorded, (str,))
    if recorded != _digest(metadata, parts):
        raise TokenFileError(
            "damaged: what it holds does not match the digest it records (changed since it was written)"
        )


def _check_fields(where: str, values: dict[str, Any], fields: dict[str, tuple[type, ...]]) -> None:
    for name, types in fields.items():
        if name not in values:
            raise TokenFileError(f"{where} is missing field {name!r}")
        _check_type(name, values[name], types)


def _check_type(name: str, value: Any, types: tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in types)
        raise TokenFileError(f"field {name!r} must be {expected}; got {type(value).__name__} {reprlib.repr(value)}")


def _check_made_with(made_with: Any) -> None:
    _check_type(MADE_WITH_KEY, made_with, (dict,))
    for name, value in made_with.items():
        if not isinstance(value, str):
            raise TokenFileError(
                f"{MADE_WITH_KEY} field {reprlib.repr(name)} must be str; got {type(value).__name__} "
                f"{reprlib.repr(value)}"
            )


def _check_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """Presence, dtype and rank of every tensor, and the stored offsets against token_counts."""
    missing = [name for name in TENSORS if name not in tensors]
    if missing:
        raise TokenFileError(f"missing tensors {missing}")
    for name, tensor in tensors.items():
        _check_tensor(name, tensor)
    offsets, counts, indices = tensors["offsets"], tensors["token_counts"], tensors["indices"]
    if offsets.numel() != counts.numel() + 1:
        raise TokenFileError(f"offsets has {offsets.numel()} entries; expected chunks + 1 = {counts.numel() + 1}")
    steps = offsets.diff()  # few operations, each read back once: resuming a large job checks every file
    if int(offsets[0]) != 0:
        raise TokenFileError(f"offsets must start at 0; got {int(offsets[0])}")
    if steps.numel() and int(steps.min()) < 0:
        raise TokenFileError(f"offsets must be non-decreasing; got {_short(offsets)}")
    if int(offsets[-1]) != indices.numel():
        raise TokenFileError(f"offsets must end at len(indices) = {indices.numel()}; got {int(offsets[-1])}")
    if not torch.equal(steps, counts.long()):
        chunk = _first(steps != counts.long())
        raise TokenFileError(
            f"offsets disagree with token_counts at chunk {chunk}: {int(steps[chunk])} against {int(counts[chunk])}"
        )


def _check_tensor(name: str, tensor: torch.Tensor) -> None:
    dtype, dims = TENSORS[name]
    if tensor.dtype != dtype or tensor.ndim != dims:
        raise TokenFileError(f"tensor {name!r} must be {dims}-d {dtype}; got {tensor.dtype} {list(tensor.shape)}")


def _check_indices(indices: torch.Tensor, codebook_size: int) -> None:
    if not 1 <= codebook_size <= MAX_CODEBOOK_SIZE:
        raise TokenFileError(f"codebook_size must be in [1, {MAX_CODEBOOK_SIZE}] to fit int16; got {codebook_size}")
    if indices.numel():
        low, high = (int(v) for v in torch.aminmax(indices))
        if low < 0 or high >= codebook_size:
            raise TokenFileError(f"indices must lie in [0, {codebook_size}); found values in [{low}, {high}]")


def _check_token_file(tf: TokenFile) -> None:
    """Every field of a TokenFile: types, dtypes, shapes, ranges and the chunking policy."""
    for name, types in {**FIELDS, **CHUNKING_FIELDS}.items():
        _check_type(name, getattr(tf, name), types)
    for name in ("indices", "token_counts", "grids", "start_times"):
        _check_tensor(name, getattr(tf, name))
    _check_made_with(tf.made_with)
    try:  # (written as JSON, read back as JSON: standard JSON, so NaN and infinities are not)
        json.dumps(tf.model_config, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise TokenFileError(f"model_config must hold only JSON values (finite numbers); {str(e)[:200]}") from None
    chunks = tf.token_counts.numel()
    if chunks < 1:
        raise TokenFileError("a token file holds at least one chunk; got 0")
    if chunks > MAX_CHUNKS:  # (before any check that works on every chunk)
        raise TokenFileError(f"{chunks:,} chunks; a token file holds at most {MAX_CHUNKS:,}")
    if tf.grids.shape != (chunks, 3) or tf.start_times.shape != (chunks,):
        shapes = f"grids {list(tf.grids.shape)}, start_times {list(tf.start_times.shape)}"
        raise TokenFileError(
            f"expected grids [{chunks}, 3] and start_times [{chunks}] for {chunks} chunks; got {shapes}"
        )
    if int(tf.token_counts.min()) < 1:
        chunk = _first(tf.token_counts < 1)
        raise TokenFileError(f"token_counts must be >= 1; chunk {chunk} has {int(tf.token_counts[chunk])}")
    total = int(tf.token_counts.sum(dtype=torch.int64))
    if total != tf.indices.numel():
        raise TokenFileError(f"token_counts sum to {total}, indices has {tf.indices.numel()}")
    if int(tf.grids.min()) < 1:
        chunk = _first((tf.grids < 1).any(1))
        raise TokenFileError(f"grids must be positive; chunk {chunk} has {tf.grids[chunk].tolist()}")
    if not 1 <= tf.frames_per_chunk <= MAX_INT32:  # (grids are int32: a T past it matches none, nor compares)
        raise TokenFileError(f"frames_per_chunk must be in [1, {MAX_INT32}]; got {reprlib.repr(tf.frames_per_chunk)}")
    if bool((tf.grids[:, 0] != tf.frames_per_chunk).any()):  # every chunk has T frames; a short last one is padded
        chunk = _first(tf.grids[:, 0] != tf.frames_per_chunk)
        raise TokenFileError(
            f"chunk {chunk} has grid {tf.grids[chunk].tolist()}; every chunk's T must be frames_per_chunk = "
            f"{tf.frames_per_chunk}"
        )
    grids = tf.grids.long()  # (clamped, the product of any three fits int64: one past a limit is flagged by it)
    over = (grids > torch.tensor(MAX_GRID)).any(1) | (grids.clamp(max=max(MAX_GRID)).prod(1) > MAX_GRID_VOXELS)
    if bool(over.any()):  # (no clip past them is encoded or decoded: checks.MAX_GRID)
        chunk = _first(over)
        raise TokenFileError(f"chunk {chunk} has grid {tf.grids[chunk].tolist()}; a clip is at most "
                             f"{list(MAX_GRID)} (T, H, W) and {MAX_GRID_VOXELS:,} pixels in all")  # fmt: skip
    if chunks * tf.frames_per_chunk > MAX_FILE_FRAMES:
        raise TokenFileError(f"{chunks:,} chunks of {tf.frames_per_chunk} frames; a token file holds at most "
                             f"{MAX_CHUNKS:,} chunks and {MAX_FILE_FRAMES:,} frames in all")  # fmt: skip
    _check_indices(tf.indices, tf.codebook_size)
    if not 0 < tf.fps <= MAX_FPS:  # also refuses NaN and infinity
        raise TokenFileError(f"fps must be in (0, {MAX_FPS:g}]; got {reprlib.repr(tf.fps)}")
    if tf.tail not in TAIL_POLICIES:
        raise TokenFileError(f"tail must be one of {TAIL_POLICIES}; got {reprlib.repr(tf.tail)}")
    if not 1 <= tf.last_chunk_frames <= tf.frames_per_chunk:
        raise TokenFileError(
            f"last_chunk_frames must be in [1, frames_per_chunk = {tf.frames_per_chunk}]; got "
            f"{reprlib.repr(tf.last_chunk_frames)}"
        )
    if tf.sampling not in SAMPLINGS:
        raise TokenFileError(f"sampling must be one of {SAMPLINGS}; got {reprlib.repr(tf.sampling)}")
    for name in (CHUNK_SECONDS_KEY, SOURCE_FPS_KEY):
        value = getattr(tf, name)
        if value is not None:
            _check_type(name, value, (int, float))
            if not 0 < value < math.inf:  # also refuses NaN
                raise TokenFileError(f"{name} must be finite and > 0; got {reprlib.repr(value)}")
    times = tf.start_times
    if not bool(times.isfinite().all()) or float(times.min()) < 0 or bool((times.diff() < 0).any()):
        raise TokenFileError(f"start_times must be finite, >= 0 and non-decreasing; got {_short(times)}")


def _integer_grid(chunk: int, grid: Sequence[int]) -> list[int]:
    """One chunk's (T, H, W) as three Python ints in int32's range; anything else is a TokenFileError."""
    try:
        values = [operator.index(v) for v in (grid.tolist() if isinstance(grid, torch.Tensor) else grid)]
    except TypeError:  # a float, a string, a grid that is not a sequence
        values = []
    if len(values) != 3 or not all(abs(v) <= MAX_INT32 for v in values):
        raise TokenFileError(f"chunk {chunk}'s grid must be three integers (T, H, W); got {reprlib.repr(grid)}")
    return values


def _first(mask: torch.Tensor) -> int:
    """The position of the first true entry of a 1-d mask (there is one)."""
    return int(mask.int().argmax())


def _short(values: torch.Tensor) -> str:
    """A 1-d tensor's values for an error message: the first few (a stranger's file may hold millions)."""
    return reprlib.repr(values[:7].tolist())  # reprlib shows six and "..." for more
