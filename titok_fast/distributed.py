"""Encode a dataset on a Ray cluster with Ray Data: video decoding spread over CPU workers, the model in a pool of
(GPU) actors, token files written by the driver. Ray is imported only when a job runs.

    driver: resume check  ->  decode tasks (flat_map, CPU)  ->  encode actors (map_batches)  ->  driver: token files
                              one file -> its clip rows         each loads the weights once       small index rows

- A decode task reads one file clip by clip (``ClipReader(raw=True)``: resized, cropped float32 pixels, as
  upstream), or one segment of it where a job has fewer files than the cluster has room for decode tasks, and
  emits each clip as the raw pixels cast to the model's dtype, which ``normalize_pixels`` leaves
  exact (it casts first, then scales), so the scaling runs on the actor and a bf16 clip costs half the bytes of
  float32. A file that cannot be read becomes an ``error`` row with the one-line reason; its clips then an
  ``end`` row with what the token file needs (start times, real frames of the last clip).
- An encode actor (:class:`ClipEncoder`, a plain class that also runs without Ray) turns clip rows into index
  rows through ``encode_resiliently``: a clip failing alone becomes a ``failed`` row. A device fault ends the actor
  process so Ray restarts it (finite ``max_restarts`` / ``max_task_retries``) and retries the batch; a
  :class:`FaultLedger` shared by the actors remembers the clips of a batch that faulted, the retry runs them alone,
  and a clip that faults the device twice fails its file instead of killing actor after actor.
- The driver iterates the small index rows (never a shuffle of pixels), writes each file's token file with the
  atomic ``save_tokens`` once all its clips are back, and ignores (counts) results of retried work that come back
  twice, so every input ends with exactly one complete token file or a reason. Each outcome is a manifest line.

Inputs and outputs must be on a filesystem every node sees (the same POSIX paths).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib.util
import json
import logging
import math
import os
import pickle
import queue
import re
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .engine import DEFAULT_BUDGETS, Engine
from .files import MAX_RAY_RETRIES, RAY_LEAST_RESOURCE, STALL_SECONDS, absolute, interrupts_held, notice, sigterm_came
from .manifest import Manifest, manifest_name
from .model import TiTok
from .pipeline import (
    GIVE_UP_AFTER,
    ClipSettings,
    Every,
    ModelFacts,
    Summary,
    Writes,
    _device_fault,
    _device_fault_in,
    _progress,
    check_clip_settings,
    check_inputs_apart,
    encode_resiliently,
    input_pairs,
    made_with,
    plan_outputs,
    say_stopped,
    stop_reason,
    take_shard,
    write_recorded,
    write_threads_for,
    write_token_file,
)
from .tokens import most_chunks, too_many_chunks
from .video import ClipReader, Segment, VideoError, normalize_pixels, source_stamp, unforeseen, watched_clips

# kind: the decode stage emits clip, end and error rows; the encode stage turns clip rows into tokens or failed
COLUMNS = ("file", "clip", "kind", "data", "info", "decoded_by", "encoded_by")
FAULTS_TO_FAIL = 2  # a clip that faulted the device this many times fails its file
FAILED_FILES_KEPT = 10_000  # an encode actor's record of files failed (their later clips are not encoded)
MAX_DECODE_TASKS = 100_000  # more files than this share decode tasks (a few per task)
# decode tasks of one file at most (its segments are planned once, by a task that reads the file's packets: under
# 1% of the CPU time decoding the whole file takes, benchmarks/RESULTS.md)
MAX_PARTS = 16
PLAN_SECONDS = 60.0  # the longest a job waits for its files' plans (or the stall limit): a file not planned by then,
# one whose read hangs among them, is read whole by one task
WATCH_SECONDS = 30.0  # the driver looks at the encode actors when no result row came for this long
PING_SECONDS = 10.0  # an encode actor that does not answer within this is taken as alive (busy or restarting)
MODEL_BOUND = 0.8  # a job whose encode actors were busy this share of the time or more is limited by the model
STORE_BATCHES = 3  # batches per encode actor an object store should hold (:func:`_check_object_store`)
DECODE_BUSY = 0.5  # clips too slow for the actors while decode tasks computed this share of their time: decode-bound
LIMIT_SECONDS = 10.0  # what limits a job is said once its passes have had rows back for this long in all
QUEUED_ROWS = 1024  # result rows read ahead of the driver
STOP_GRACE_SECONDS = 10.0  # how long a reader may take to close Ray Data's iterator itself when the driver stops
STOP_SECONDS = 30.0  # the longest the driver waits for its reader thread to leave Ray Data once stopped there
_END = object()


class DeviceFault(RuntimeError):
    """The device faulted while encoding a batch; its process must end (the device context is unusable)."""


def worker_name() -> str:
    """This process as ``host:pid``, as the manifest names the workers that handled a file."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _row(file: int, clip: int, kind: str, data: bytes = b"", info: str = "", decoded_by: str = "", encoded_by=""):
    return dict(file=file, clip=clip, kind=kind, data=data, info=info, decoded_by=decoded_by, encoded_by=encoded_by)


def clip_bytes(settings: ClipSettings, dtype: torch.dtype) -> int:
    """Bytes of one clip as it crosses the network: 3 x T x H x W values of the model's dtype."""
    return 3 * math.prod(settings.grid) * torch.empty((), dtype=dtype).element_size()


def decode_rows(row: dict[str, Any], *, ledger=None, **kwargs) -> Iterator[dict[str, Any]]:
    """:func:`file_rows` (its keyword arguments ``kwargs``); once it has given every row, the task tells the job's
    ``ledger`` (a :class:`FaultLedger` actor's handle), where the driver finds which files' rows an encode actor
    that died for good took with it."""
    yield from file_rows(row, **kwargs)
    if ledger is not None:
        import ray

        ray.get(ledger.decoded.remote(int(row["file"]), int(row.get("part", 0)), int(row.get("parts", 1))))


def file_rows(
    row: dict[str, Any],
    *,
    settings: ClipSettings,
    dtype: torch.dtype,
    threads: int = 1,
    stall_seconds: float | None = None,
    exit_on: str = "",
    exit_log: str = "",
) -> Iterator[dict[str, Any]]:
    """The decode stage (a Ray Data ``flat_map`` function): one file row ``{"file": number, "path": str}``, or one
    of its :func:`part_rows` (one segment of it) -> a ``clip`` row per clip as it is decoded (``clip``: its number
    in the file; ``data``: [3, T, H, W] raw pixels in ``dtype``, as bytes), then an ``end`` row (``info``: JSON of
    its clips, first clip, start_times, chunk_seconds, source_fps, last_clip_frames, part, parts, the source stamp it
    read and the one its segment was planned on, and the CPU and wall seconds it took) or, when it cannot be
    read, an ``error`` row with the one-line reason, also when no clip comes for ``stall_seconds`` (the file is
    decoded in a thread of its own then, see :func:`~titok_fast.video.watched_clips`). ``exit_on`` (tests only):
    the worker process dies on paths containing it, leaving a file in the folder ``exit_log`` each time."""
    number, path, me = int(row["file"]), str(row["path"]), worker_name()
    part, parts, planned = int(row.get("part", 0)), int(row.get("parts", 1)), row.get("planned")
    if exit_on and exit_on in path:
        if exit_log:
            Path(exit_log, f"decode-exit-{uuid.uuid4().hex}").touch()
        os._exit(1)
    count, cpu, wall = 0, time.process_time(), time.perf_counter()  # (a worker process runs one task at a time:
    # its CPU, decoding threads too; between its rows the task waits for Ray Data to take them)
    try:
        segment = _unpacked(row["segment"]) if row.get("segment") else None
        reader = ClipReader(path, threads=threads, segment=segment, **settings.read_kwargs())
        for clip in reader if stall_seconds is None else watched_clips(reader, stall_seconds):
            yield _row(number, reader.first_clip + count, "clip",
                       clip.to(dtype).contiguous().view(torch.uint8).numpy().tobytes(), decoded_by=me)  # fmt: skip
            count += 1
    except VideoError as e:
        if planned and (now := source_stamp(path)) != planned:
            # the file changed since it was planned (cut short: its segment's clips are not all there): this part
            # ends, and the driver, finding that the parts disagree, has the file read again whole
            changed = {"clips": count, "first": segment.first, "source_stamp": now, "part": part, "parts": parts,
                       "planned": planned, **_spent(cpu, wall)}  # fmt: skip
            yield _row(number, segment.first + count, "end", info=json.dumps(changed), decoded_by=me)
            return
        yield _row(number, count, "error", info=str(e), decoded_by=me)
        return
    except Exception as e:  # an unforeseen failure on one file must not stop the others (with --debug, its
        # traceback goes to the worker's log, where $TITOK_FAST_DEBUG reaches the Ray workers)
        yield _row(number, count, "error", info=unforeseen(path, e), decoded_by=me)
        return
    end = {"clips": count, "first": reader.first_clip, "start_times": reader.start_times(),
           "chunk_seconds": reader.chunk_seconds, "source_fps": reader.source_fps,
           "last_clip_frames": reader.last_clip_frames,
           "decoder": reader.decoded_by, "placement": reader.placement, "source_stamp": reader.source_stamp,
           "part": part, "parts": parts, "planned": planned, **_spent(cpu, wall)}  # fmt: skip
    yield _row(number, reader.first_clip + count, "end", info=json.dumps(end), decoded_by=me)


def _spent(cpu: float, wall: float) -> dict[str, float]:
    """A decode task's CPU seconds and wall seconds since ``cpu`` (time.process_time) and ``wall``
    (time.perf_counter), as its end row says them."""
    return {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}


def plan_segments(path: str, settings: ClipSettings, parts: int, exit_on: str = "") -> tuple[list[bytes], str]:
    """The segments ``path`` splits into for ``parts`` decode tasks (:func:`_packed`: as rows carry them), and
    its source stamp as it was read: a Ray task a file, so that its packets are read once, not once a task. ([],
    "") where it is not split, or cannot be read: one task then reads it whole and says what is wrong with it.
    ``exit_on`` (tests only): the worker process dies on paths containing it."""
    if exit_on and exit_on in path:
        os._exit(1)
    reader = ClipReader(path, **settings.read_kwargs())
    try:
        return [_packed(segment) for segment in reader.plan(parts)], reader.source_stamp
    except Exception:  # (a VideoError, or one unforeseen: the task that reads it whole reports it)
        return [], ""


def part_rows(number: int, path: str, segments: list[bytes], stamp: str) -> list[dict[str, Any]]:
    """The decode rows of file ``number``: one per segment it was planned into (:func:`plan_segments`), with the
    stamp it was planned on, or one for the whole file where it has fewer than two."""
    if len(segments) < 2:
        return [{"file": number, "path": path, "part": 0, "parts": 1}]
    return [{"file": number, "path": path, "part": k, "parts": len(segments), "segment": segment, "planned": stamp}
            for k, segment in enumerate(segments)]  # fmt: skip


def _packed(segment: Segment) -> bytes:
    """``segment`` as a plan task gives it back and a row carries it: the file's frame order (8 bytes a frame: 864
    KB for an hour at 30 fps, in every row of the file) as differences, which compress to a few KB."""
    return zlib.compress(pickle.dumps(replace(segment, order=np.diff(segment.order, prepend=0))), 1)


def _unpacked(data: bytes) -> Segment:
    """The segment :func:`_packed` made (in a plan task of this job's)."""
    segment = pickle.loads(zlib.decompress(data))
    return replace(segment, order=np.cumsum(segment.order))  # (exact: int64 wraps back alike)


class FaultLedger:
    """Device faults per clip key, shared by the encode actors (a Ray actor in a job; a plain object without Ray);
    in a job also the encode actors themselves, which enlist once their model is loaded, and the decode tasks that
    ran to their end (:func:`decode_rows`): a file whose rows did not all come back although its decode tasks did,
    lost them with an encode actor that died for good, and is read again."""

    def __init__(self) -> None:
        self._faults: dict[tuple[int, int], tuple[int, str]] = {}
        self._encoders: dict[str, Any] = {}
        self._whole = bytearray()  # per file number read whole (one part): 1 once its decode task ran to its end
        self._split: dict[int, tuple[int, set[int]]] = {}  # a file read in parts: (parts, those that ran to their end)
        self._born = uuid.uuid4().hex  # this start of the ledger's (a ledger started again has lost its records)

    def born(self) -> str:
        """Which start of the ledger this is: another once its process died and it was started again."""
        return self._born

    def decoded(self, file: int, part: int, parts: int) -> None:
        """Part ``part`` of ``parts`` of file ``file`` ran to its end (its rows all given to Ray Data)."""
        if parts > 1:  # (split files: few, each a set of its parts)
            self._split.setdefault(file, (parts, set()))[1].add(part)
            return
        if file >= len(self._whole):  # (a byte a file, grown as numbers come)
            self._whole.extend(bytes(max(file + 1, 2 * len(self._whole)) - len(self._whole)))
        self._whole[file] = 1

    def decoded_of(self, files: Sequence[int]) -> list[int]:
        """Those of ``files`` whose every part's decode task ran to its end."""
        n = len(self._whole)

        def ran(f: int) -> bool:
            if f in self._split:
                parts, done = self._split[f]
                return len(done) == parts
            return f < n and self._whole[f] == 1

        return [f for f in files if ran(f)]

    def enlist(self, actor_id: str, actor) -> None:
        self._encoders[actor_id] = actor  # a restarted actor keeps its id

    def encoders(self) -> dict[str, Any]:
        """The actors enlisted, by id."""
        return dict(self._encoders)

    def faults(
        self, keys: Sequence[tuple[int, int]], enlisting: tuple[str, Any] | None = None
    ) -> dict[tuple[int, int], tuple[int, str]]:
        """``{key: (faults, last error)}`` for the keys that faulted the device before. ``enlisting``: the asking
        actor's (id, handle), enlisted again (a ledger started again has lost its list)."""
        if enlisting is not None:
            self.enlist(*enlisting)
        return {k: self._faults[k] for k in keys if k in self._faults}

    def add(self, keys: Sequence[tuple[int, int]], error: str) -> None:
        for key in keys:
            self._faults[key] = (self._faults.get(key, (0, ""))[0] + 1, error)


class ClipEncoder:
    """The encode stage's body: loads the weights once (``load_model(device=device)``) and turns a batch of rows
    (columns :data:`COLUMNS`, as Ray Data's numpy batches) into rows: each ``clip`` row becomes a ``tokens`` row
    (``data``: its int32 indices [tokens] as bytes) or a ``failed`` row (``info``: the reason); other rows pass
    through without their data; a ``stop`` row (``info``: the error) ends the batch's rows where a fault no clip
    explains stops the job. Runs without Ray.

    A device fault records the batch's clips in ``ledger`` and raises :class:`DeviceFault`; when the batch comes
    back (Ray retries it on the restarted actor), its clips that faulted once run alone, and a clip that faulted
    twice becomes a ``failed`` row without running. A fault no clip explains becomes a ``stop`` row, on which the
    driver stops the job as a run on one machine stops (an exception would only lose the batch: a job tolerates
    failed blocks): an error while preparing clips, or GIVE_UP_AFTER clips in a row, across batches, each failing
    alone (a worker that cannot build its kernels would otherwise fail every file of the job).

    ``dtype``: the job's (the driver's copy's), which its clips come cast to and its token files record: a model
    loaded in another is refused, as other weights are. (Not the backend: "auto" resolves on each machine, and a
    driver without Triton records "torch" for CUDA actors that run Triton: refusing that would stop jobs whose
    tokens are right, within bf16 rounding; the record may be off there, see the README.)"""

    def __init__(
        self,
        load_model: Callable[..., TiTok],
        settings: ClipSettings,
        *,
        device: str = "cpu",
        mode: str = "auto",
        batch_size: int = 32,
        weights_digest: str | None = None,
        dtype: torch.dtype | None = None,
        ledger: FaultLedger | None = None,
    ):
        self.model = load_model(device=device)
        if weights_digest is not None and self.model.weights_digest != weights_digest:
            raise ValueError(
                f"the encode worker loaded weights {self.model.weights_digest}, the job expects {weights_digest}: "
                "the checkpoint must be the same file on every node"
            )
        if dtype is not None and self.model.dtype != dtype:  # (its clips, read as another dtype, are other pixels)
            got, want = (str(d).removeprefix("torch.") for d in (self.model.dtype, dtype))
            raise ValueError(
                f"the encode worker's model differs from what the job's token files record: dtype {got} (the job's: "
                f"{want})"
            )
        self.engine = Engine(self.model, mode=mode, max_clips=batch_size)
        self.shape, self.tokens = (3, *settings.grid), settings.tokens
        self.ledger = FaultLedger() if ledger is None else ledger
        self.name = worker_name()
        self.failed_in_a_row = 0  # clips that failed alone one after another, across batches (a file counted once)
        self.failed_files: dict[int, str] = {}  # file -> why its first clip to fail alone failed (the latest few)
        self.busy, self.first = 0.0, None  # seconds spent on batches; when the first began (time.perf_counter)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        began = time.perf_counter()
        self.first = began if self.first is None else self.first
        try:
            return self._rows(batch)
        finally:
            self.busy += time.perf_counter() - began

    def _rows(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [dict(zip(COLUMNS, values, strict=True)) for values in zip(*(batch[c] for c in COLUMNS), strict=True)]
        clips = {(int(r["file"]), int(r["clip"])): r for r in rows if r["kind"] == "clip"}
        out = [{**r, "data": b""} for r in rows if r["kind"] != "clip"]
        for key in [k for k in clips if k[0] in self.failed_files]:  # its file failed: not encoded (as one machine
            out.append(self._failed(clips.pop(key), self.failed_files[key[0]]))  # drops a failed file's clips)
        faults = self.ledger.faults(list(clips))
        for key, (count, error) in faults.items():
            if count >= FAULTS_TO_FAIL:
                out.append(self._failed(clips.pop(key), f"the device faulted {count} times on it ({error})"))
        try:
            for key in [k for k in clips if k in faults]:  # faulted once, in some batch: alone now
                out += self._encode({key: clips.pop(key)})
            out += self._encode(clips)
        except _Unexplained as e:
            out += [*e.reported, self._stop(rows[0], str(e))]
        return _columns(out)

    def _encode(self, clips: dict[tuple[int, int], dict]) -> list[dict]:
        if not clips:
            return []
        dtype, failed, results = self.model.dtype, {}, {}
        items = ((key, normalize_pixels(self._pixels(row), dtype), self.tokens) for key, row in clips.items())

        def failed_alone(key, error: Exception) -> None:
            reason = f"encoding failed on clip {key[1]}: {error}"
            if key[0] not in self.failed_files:  # a file's failures count once, as on one machine
                self.failed_in_a_row += 1
                if self.failed_in_a_row >= GIVE_UP_AFTER:  # (this clip's file is not failed by it: not encoded)
                    raise RuntimeError(f"giving up after {self.failed_in_a_row} clip(s) in a row failed alone: {error}")
                self.failed_files[key[0]] = reason
                while len(self.failed_files) > FAILED_FILES_KEPT:
                    del self.failed_files[next(iter(self.failed_files))]
            failed[key] = reason

        try:
            for key, result in encode_resiliently(self.engine, items, failed_alone):
                results[key] = result
                self.failed_in_a_row = 0
            # to the host here: a device fault shows at the first sync after it, which must be this one
            results = {key: indices.to("cpu", torch.int32).contiguous() for key, (_, indices) in results.items()}
        except Exception as e:  # (any kind: Triton's OutOfResources is an Exception only, which Ray Data would drop
            # with its block, to fail every file of it as encoded by no actor)
            if not _device_fault_in(e):
                # no clip could be blamed: the clips that failed alone before it are reported, as on one machine
                reported = [self._failed(clips[k], reason) for k, reason in failed.items()]
                raise _Unexplained(f"{type(e).__name__}: {e}", reported) from e
            self.ledger.add(list(clips), str(e))
            raise DeviceFault(f"{self.name}: {e}") from e
        out = []
        for key, row in clips.items():
            if key in failed:
                out.append(self._failed(row, failed[key]))
            else:
                data = results[key].numpy().tobytes()
                out.append({**row, "kind": "tokens", "data": data, "encoded_by": self.name})
        return out

    def _pixels(self, row: dict) -> torch.Tensor:
        return torch.frombuffer(bytearray(row["data"]), dtype=self.model.dtype).view(self.shape)

    def _failed(self, row: dict, reason: str) -> dict:
        return {**row, "kind": "failed", "data": b"", "info": reason, "encoded_by": self.name}

    def _stop(self, row: dict, error: str) -> dict:
        return {**row, "kind": "stop", "data": b"", "info": error, "encoded_by": self.name}


def _columns(rows: list[dict]) -> dict[str, list]:
    """``rows`` as a batch: a list per column of COLUMNS."""
    return {c: [r[c] for r in rows] for c in COLUMNS}


def _recorded_state(actor) -> str | None:
    """The actor's state in Ray's own records (its GCS: "ALIVE", "RESTARTING", "DEAD", ...; asked without the
    dashboard), or None where they cannot be asked (another version of Ray)."""
    try:
        from ray._private import state

        return state.actors(actor_id=actor._actor_id.hex()).get("State")
    except Exception:
        return None


class _Stopped(RuntimeError):
    """An encode worker's ``stop`` row: its ``info`` (the worker's error, ``Name: message``) stops the job."""


class _Unexplained(Exception):
    """A fault of an encode worker that no clip explains: the job stops with it (a ``stop`` row), after the
    ``reported`` rows (of clips that failed alone before it)."""

    def __init__(self, error: str, reported: list[dict]):
        super().__init__(error)
        self.reported = reported


class _RemoteLedger:
    """A :class:`FaultLedger` Ray actor behind the plain ledger's methods; ``me``: the asking encode actor's (id,
    handle), enlisted again at each ask (a ledger started again has lost its list)."""

    def __init__(self, handle, me: tuple[str, Any] | None = None):
        self.handle, self.me = handle, me

    def faults(self, keys):
        import ray

        return ray.get(self.handle.faults.remote(keys, self.me))

    def add(self, keys, error: str) -> None:
        import ray

        ray.get(self.handle.add.remote(keys, error))


class _RayClipEncoder(ClipEncoder):
    """:class:`ClipEncoder` as a Ray actor: a device fault ends the process, so Ray restarts the actor with a fresh
    device context. It enlists in the ledger, where the driver finds it. An actor that cannot load the model (a
    checkpoint its node cannot read, other weights or dtype) answers its first batch with a ``stop`` row saying why,
    where Ray would restart it over and over to the same end, each time with a traceback. ``exit_once`` (tests only):
    a marker path; the first actor to claim it (writing its name there) dies on its 2nd batch; ``exit_always``: every
    batch. Its rows of a batch end with a ``busy`` row (``info``: its seconds spent on batches so far, and since its
    first began), from which the driver tells what limits the job (:class:`EncodersBusy`): in the rows, it comes in
    their order, and costs no call of its own."""

    def __init__(self, *args, ledger_handle, exit_once: str = "", exit_always: bool = False, **kwargs):
        import ray

        self.exit_once, self.exit_always, self.batches = exit_once, exit_always, 0
        self.unloaded, self.name = "", worker_name()  # why the model could not be loaded here
        context = ray.get_runtime_context()
        me = (context.get_actor_id(), context.current_actor)
        try:
            super().__init__(*args, ledger=_RemoteLedger(ledger_handle, me), **kwargs)
        except Exception as e:
            if _device_fault(e):  # (a fresh process may do better)
                raise
            self.unloaded = f"{type(e).__name__}: {e} (the encode worker {self.name} could not load the model)"
            return
        ray.get(ledger_handle.enlist.remote(*me))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        if self.unloaded:
            return _columns([self._stop({c: batch[c][0] for c in COLUMNS}, self.unloaded)])
        self.batches += 1
        if self.exit_always or (self.exit_once and self.batches == 2 and _claim(self.exit_once)):
            os._exit(1)
        try:
            columns = super().__call__(batch)
        except DeviceFault as e:
            logging.getLogger(__name__).error("%s; ending this actor so that Ray restarts it", e)
            os._exit(1)
        said = json.dumps({"busy": self.busy, "span": time.perf_counter() - self.first})
        busy = {"file": -1, "clip": -1, "kind": "busy", "data": b"", "info": said, "decoded_by": "",
                "encoded_by": self.name}  # fmt: skip
        for column in COLUMNS:
            columns[column].append(busy[column])
        return columns


def _raise_in(thread: threading.Thread, exception: type[BaseException] | None) -> None:
    """Raise ``exception`` in ``thread`` (a live one) as soon as it runs Python code, or clear the one pending
    (None)."""
    pending = None if exception is None else ctypes.py_object(exception)  # None: NULL, which clears
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), pending)


def _claim(marker: str) -> bool:
    try:
        with open(marker, "x") as claimed:
            claimed.write(worker_name())
            return True
    except FileExistsError:
        return False


@dataclass
class _Pending:
    """A file on its way: the indices back so far, and what the ``end`` rows of its parts said."""

    number: int  # in the job's list
    path: Path
    out: Path
    indices: dict[int, torch.Tensor] = field(default_factory=dict)
    ends: dict[int, dict] = field(default_factory=dict)  # by part
    decoded_by: str = ""  # the decode workers, in the order their end rows came, comma-separated
    encoded_by: set[str] = field(default_factory=set)

    def add_decoder(self, worker: str) -> None:
        """``worker`` (an end or error row's) among those that decoded the file."""
        self.decoded_by = ",".join(dict.fromkeys([*filter(None, self.decoded_by.split(",")), worker]))

    @property
    def decoded(self) -> bool:
        """Whether every part's end row is back (a file not split is one part)."""
        return bool(self.ends) and len(self.ends) == next(iter(self.ends.values())).get("parts", 1)

    def parts_disagree(self) -> str:
        """Why the parts of a decoded file do not make one reading of it, or "": they read it at other sizes or
        modification times than each other or than its plan, or their clips do not follow one another."""
        ends, path = [self.ends[part] for part in sorted(self.ends)], self.path
        stamps = {end.get("source_stamp", "") for end in ends} | {end["planned"] for end in ends if end.get("planned")}
        if len(stamps) > 1:  # (each part read the file as it was when its segments were planned)
            return f"{path}: changed while it was read (its size or modification time)"
        at = 0
        for end in ends:
            if end["clips"] and end.get("first", 0) != at:
                return f"{path}: a decode task's clips start at clip {end.get('first', 0)}, not {at}"
            at += end["clips"]
        return "" if at else f"{path}: no clip came from its decode tasks"


# how a file ended (_Assembly.ended): written, so results that come again are duplicates of retried work; or failed
# (its decoding, or a clip), so its rows still to come are passed over, not counted (a batch gives the results of
# a file's other clips after one that failed, and a retried task's rows are no duplicates of a file never written);
# or, for this pass, as its parts did not make one reading (it is read again whole in a pass of its own: the rows
# still to come of this one are passed over)
_ENDED_WRITTEN, _ENDED_FAILED, _ENDED_AGAIN = 1, 2, 3


class EncodersBusy:
    """What limits a Ray job, for its bar and its summary: the encode actors' seconds on batches (their ``busy``
    rows) against what the pool could have given, its size times the pass's time since its first row came back, or
    since an actor's first batch began if that was earlier (a first batch holds an actor's one-time setup, as graph
    capture or compilation), summed over the passes. A pool busy MODEL_BOUND of that or more is limited by the model.
    Less: where the thread reading the rows from Ray Data waited for room in the driver's queue (QUEUED_ROWS) half
    its time or more (from its first row to its last), the driver held the pipeline back (Ray Data stops feeding
    actors whose results are not taken); else clips came too slowly for the actors: decode-bound (more CPUs for the
    decode tasks, or nodes) where the decode tasks computed DECODE_BUSY of their time or more (the CPU seconds over
    the wall seconds their end rows say), held back by Ray Data where less (they waited too: Ray Data did not take
    their clips, as when its object store is small for the batches). Said once the passes have had rows back for
    LIMIT_SECONDS: a shorter job is mostly its start and its end."""

    def __init__(self, start: float):
        self.start, self.due = start, Every(1.0, start)  # due: whether the bar is due to be shown again
        self.clips = 0  # encoded, as the driver took them
        # of the passes that ended: busy seconds, the pools' seconds, seconds with rows, the reader's seconds
        # waiting for room and its seconds reading
        self.ended = (0.0, 0.0, 0.0, 0.0, 0.0)
        self.decode_cpu = self.decode_wall = 0.0  # the decode tasks' CPU and wall seconds, as their end rows said
        self.pass_started(0)

    def pass_started(self, actors: int, reader: Callable[[], tuple[float, float]] = lambda: (0.0, 0.0)) -> None:
        """Of the pass running: its pool's size, its first row's time (time.perf_counter), each actor's seconds on
        batches (the latest said), and its reader's seconds waiting and reading."""
        self.actors, self.first, self.busy, self.reader = actors, None, {}, reader

    def decoded(self, end: dict) -> None:
        """Take an ``end`` row's info: the CPU and wall seconds its decode task took (an earlier version's end rows
        say neither)."""
        self.decode_cpu += max(float(end.get("cpu", 0.0)), 0.0)
        self.decode_wall += max(float(end.get("wall", 0.0)), 0.0)

    def row(self, row: dict) -> bool:
        """Take a row: whether it was a ``busy`` row (nothing else to do with it)."""
        if self.first is None:
            self.first = time.perf_counter()
        if row["kind"] != "busy":
            return False
        said, worker = json.loads(row["info"]), str(row["encoded_by"])
        self.busy[worker] = max(self.busy.get(worker, 0.0), said["busy"])  # (a batch retried says it again)
        self.first = min(self.first, time.perf_counter() - said["span"])  # (durations: the actors' clocks are theirs)
        return True

    def totals(self) -> tuple[float, ...]:
        """Busy seconds, the pools' seconds, seconds with rows, the reader's seconds waiting for room and reading,
        of every pass so far."""
        seconds = 0.0 if self.first is None else time.perf_counter() - self.first
        running = (sum(self.busy.values()), self.actors * seconds, seconds, *self.reader())
        return tuple(a + b for a, b in zip(self.ended, running, strict=True))

    def pass_ended(self) -> None:
        self.ended = self.totals()
        self.pass_started(0)

    def describe(self) -> str:
        """E.g. "412.31 clips/s, decode-bound (encode actors busy 23%): more CPUs for the decode tasks, or nodes"."""
        text = f"{self.clips / max(time.perf_counter() - self.start, 1e-9):.2f} clips/s"
        busy, pools, seconds, waited, reading = self.totals()
        if seconds < LIMIT_SECONDS or not pools:
            return text
        share = min(busy / pools, 1.0)
        said = f"encode actors busy {share:.0%}"
        if share >= MODEL_BOUND:
            return f"{text}, model-bound ({said})"
        if reading and waited / reading >= 0.5:
            held = f"results waited {min(waited / reading, 1.0):.0%} of the time for the driver"
            return f"{text}, driver-bound ({said}, {held}): its CPU or its token file writes"
        if not self.decode_wall:  # (no decode task has ended yet)
            return f"{text}, decode-bound ({said}): more CPUs for the decode tasks, or nodes"
        decoding = f"decode tasks computing {min(self.decode_cpu / self.decode_wall, 1.0):.0%} of their time"
        if self.decode_cpu / self.decode_wall >= DECODE_BUSY:
            return f"{text}, decode-bound ({said}, {decoding}): more CPUs for the decode tasks, or nodes"
        return (f"{text}, held back by Ray Data ({said}, {decoding}): clips waited between the stages, as when the "
                "object store is small for the batches: a smaller --batch-size, or more object store memory")

    def limited_by(self) -> str:
        """The summary's line: what limited the job, or "" (nothing encoded, or too short to tell)."""
        text = self.describe()
        return text.split(", ", 1)[1] if self.clips and ", " in text else ""


class _Assembly:
    """The driver's side: rows in any order -> one token file per input, manifest lines, duplicates counted."""

    def __init__(self, model: TiTok, mode: str, device: str, settings: ClipSettings, todo, manifest: Manifest, bar,
                 writes: Writes | None = None):  # fmt: skip
        self.model, self.settings, self.manifest, self.bar = model, settings, manifest, bar
        self.facts = ModelFacts.of(model)  # what its token files say of the model, taken once
        self.writes = Writes(0) if writes is None else writes  # token files are written by these
        self.mode, self.device = mode, device
        self.todo = todo
        self.open: dict[int, _Pending] = {}  # files with rows back and not yet ended: a state is made when needed
        self.ended = bytearray(len(todo))  # per file: 0 (not ended), _ENDED_WRITTEN, _ENDED_FAILED or _ENDED_AGAIN
        self.again: list[int] = []  # split files to be read again whole (_read_again)
        self.limits = EncodersBusy(time.perf_counter())

    def take(self, row: dict) -> None:
        number, kind, clip = int(row["file"]), row["kind"], int(row["clip"])
        if kind == "stop":  # an encode worker's fault no clip explains (ClipEncoder): as on one machine, it stops
            raise _Stopped(row["info"])  # the job (its files not yet ended are listed as not encoded)
        if self.limits.row(row):
            return
        if self.ended[number]:
            if self.ended[number] == _ENDED_WRITTEN and kind in ("tokens", "end"):
                self.manifest.summary.duplicates += 1  # a written file's results came back again
            return
        state = self._state(number)
        if kind == "tokens":
            if clip in state.indices:
                self.manifest.summary.duplicates += 1
                return
            shape = (self.settings.tokens, self.settings.grid[0])
            if clip >= most_chunks(*shape):  # a token file of more would not load: nothing more held
                self._fail(state, f"{state.path}: {too_many_chunks(*shape)}")
                return
            state.indices[clip] = torch.frombuffer(bytearray(row["data"]), dtype=torch.int32)
            state.encoded_by.add(row["encoded_by"])
            self.limits.clips += 1
        elif kind == "end":
            end = json.loads(row["info"])
            self.limits.decoded(end)
            if end.get("part", 0) in state.ends:
                self.manifest.summary.duplicates += 1
                return
            state.ends[end.get("part", 0)] = end
            state.add_decoder(row["decoded_by"])
            if state.decoded and (why := state.parts_disagree()):
                if end.get("parts", 1) > 1:  # read again by one task, in a pass of its own
                    self._read_again(state, why)
                    return
                self._fail(state, why)
                return
        else:  # "error" (decoding) or "failed" (encoding)
            state.add_decoder(row["decoded_by"])
            self._fail(state, row["info"])
            return
        if state.decoded and len(state.indices) == (clips := sum(end["clips"] for end in state.ends.values())):
            if any(clip not in state.indices for clip in range(clips)):  # (retried work that read it otherwise)
                self._fail(state, f"{state.path}: its clips came back numbered otherwise than 0 to {clips - 1}")
            else:
                self._write(state)

    def _write(self, state: _Pending) -> None:
        ends = [state.ends[part] for part in sorted(state.ends) if state.ends[part]["clips"]]  # (parts_disagree: 1+)
        indices = [state.indices[i] for i in range(len(state.indices))]
        end, start_times = ends[0], [time for end in ends for time in end["start_times"]]
        made = made_with(self.model, self.mode, self.settings, device=self.device, decoded_by=end["decoder"],
                         preprocessed_on=end["placement"], source_stamp=end.get("source_stamp", ""))  # fmt: skip
        write = functools.partial(write_token_file, self.facts, self.settings, state.out, state.path, indices,
                                  start_times, ends[-1]["last_clip_frames"], made,
                                  end.get("chunk_seconds"), end.get("source_fps"))  # fmt: skip
        workers = {"decoded_by": state.decoded_by, "encoded_by": sorted(state.encoded_by)}
        self._close(state, _ENDED_WRITTEN)
        self.writes(functools.partial(write_recorded, self.manifest, state.path, state.out, len(indices), write,
                                      done=workers, failed={"decoded_by": state.decoded_by}))  # fmt: skip

    def _read_again(self, state: _Pending, why: str) -> None:
        """Leave a split file whose parts do not make one reading of it (one task's read of its index failed, or
        it changed while they read it) to be read whole by one task, its rows until then passed over."""
        notice(f"{why}; it will be read again by one decode task")
        self.ended[state.number] = _ENDED_AGAIN
        self.open.pop(state.number, None)
        self.again.append(state.number)

    def reopen_again(self) -> list[int]:
        """The files left to be read again (:meth:`_read_again`), taken as not ended: their pass is next."""
        again, self.again = self.again, []
        for number in again:
            self.ended[number] = 0
        return again

    def _fail(self, state: _Pending, reason: str) -> None:
        self.manifest.failed(state.path, state.out, reason, decoded_by=state.decoded_by)
        self._close(state, _ENDED_FAILED)

    def _close(self, state: _Pending, how: int) -> None:
        self.ended[state.number] = how
        self.open.pop(state.number, None)  # nothing of an ended file is kept: its byte in ended
        self.bar.update(1)

    def _state(self, number: int) -> _Pending:
        if (state := self.open.get(number)) is None:
            state = self.open[number] = _Pending(number, *self.todo[number])
        return state

    def forget(self, numbers: Sequence[int]) -> None:
        """Drop what came back of files ``numbers`` (not ended): they are read again from the start."""
        for number in numbers:
            self.open.pop(number, None)

    def unsettled_numbers(self) -> list[int]:
        return [number for number, ended in enumerate(self.ended) if not ended]

    def unsettled(self) -> Iterator[_Pending]:
        """The files not ended yet, each ended or left as it comes: a file with no rows back is given a state of
        its own here, not kept (a job stopped early has millions of them)."""
        for number in self.unsettled_numbers():
            yield self.open.get(number) or _Pending(number, *self.todo[number])


def encode_dataset(
    model: TiTok,
    files: Sequence[tuple[Path, str]],
    outdir: str | os.PathLike,
    settings: ClipSettings,
    *,
    load_model: Callable[..., TiTok] | None = None,
    ray_address: str = "local",
    device: str = "cuda",
    mode: str = "auto",
    batch_size: int = 32,
    actors: int | None = None,
    gpus_per_actor: float = 1.0,
    cpus_per_actor: float = 1.0,
    cpus_per_decode: float = 1.0,
    decode_retries: int = 2,
    actor_restarts: int = 8,
    parts: int | None = None,
    overwrite: bool = False,
    stall_seconds: float | None = STALL_SECONDS,
    shard: tuple[int, int] | None = None,
    _test_hooks: dict[str, str] | None = None,
) -> Summary:
    """Encode every ``(video, output name)`` of ``files`` into ``outdir/<name>.safetensors`` on a Ray cluster, like
    :func:`titok_fast.pipeline.encode_files` (same token files, manifest and summary, resumable).

    ``model`` is the driver's copy (the CPU will do): its config and weights digest go into the token files, its
    dtype is the actors'. Each actor builds its own with ``load_model(device=device)``, a picklable callable
    (default: :func:`model_loader`, from the model's weights file or random seed), and checks the digest.
    ``ray_address``: "local" (start a local cluster: no dashboard, no usage stats), "auto" (join the running one)
    or an address; when Ray is already initialized in this process, that cluster is used. ``actors`` encode
    actors (default: one per ``gpus_per_actor`` GPUs, or 1 on the CPU), each with ``cpus_per_actor`` CPUs;
    decode tasks take ``cpus_per_decode`` CPUs each and are tried ``decode_retries + 1`` times when their
    process dies; an actor is restarted at most ``actor_restarts`` times and a batch retried as often. A file
    whose decoding gives no clip for ``stall_seconds`` (None: wait for ever) fails alone. ``parts``: decode tasks
    per file, each reading one segment of it (see :class:`~titok_fast.video.ClipReader`; default: where the job
    has fewer files than the cluster has room for decode tasks, as many as fill it, else 1).
    """
    least = {"batch_size": 1, "actors": 1, "decode_retries": 0, "actor_restarts": 0, "parts": 1}
    given = {"batch_size": batch_size, "actors": 1 if actors is None else actors, "decode_retries": decode_retries,
             "actor_restarts": actor_restarts, "parts": 1 if parts is None else parts}  # fmt: skip
    for name, value in given.items():
        if not isinstance(value, int) or value < least[name]:
            raise ValueError(f"{name} must be an integer >= {least[name]}; got {value!r}")
    resources = {"gpus_per_actor": gpus_per_actor, "cpus_per_actor": cpus_per_actor, "cpus_per_decode": cpus_per_decode}
    for name, value in resources.items():  # (Ray refuses a finer one once its cluster is up, in its own words)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not RAY_LEAST_RESOURCE <= value < math.inf:
            raise ValueError(f"{name} must be a number >= {RAY_LEAST_RESOURCE:g}, not infinite; got {value!r}")
    for name in ("decode_retries", "actor_restarts"):  # (Ray's own counts overflow far past it, once started)
        if given[name] > MAX_RAY_RETRIES:
            raise ValueError(f"{name} must be at most {MAX_RAY_RETRIES}; got {given[name]}")
    check_reading_on_ray(settings.decoder, settings.preprocess)
    settings = settings_on_ray(settings, device)
    check_clip_settings(settings, model, DEFAULT_BUDGETS)  # (the actors' engines': Engine's default budgets)
    check_ray_address(ray_address)
    if mode == "cudagraph" and not str(device).startswith("cuda"):  # each actor's Engine would refuse it, alone
        raise ValueError(f"mode 'cudagraph' needs CUDA devices; the encode actors run on {device}")
    hooks = _test_hooks or {}
    outdir = Path(outdir)
    start = time.perf_counter()
    # absolute: the decode tasks run in the folder the cluster was started in, or on other machines
    files = [(Path(absolute(path)), name) for path, name in take_shard(input_pairs(files), shard)]
    check_inputs_apart(files, outdir, shard)
    summary = Summary()
    with Manifest(outdir / manifest_name(shard), summary) as manifest:
        todo = plan_outputs(model, mode, files, outdir, settings, manifest, overwrite=overwrite, device=device)
        encoding = time.perf_counter()  # (clips/s: from here, as on one machine)
        summary.checking = encoding - start
        writes = Writes(write_threads_for(outdir))  # the driver writes every token file, on threads
        try:
            if todo:
                load_model = model_loader(model) if load_model is None else load_model
                _run_job(ray_address, load_model, model, settings, todo, manifest, writes, device=device, mode=mode,
                         batch_size=batch_size, actors=actors, gpus_per_actor=gpus_per_actor,
                         cpus_per_actor=cpus_per_actor, cpus_per_decode=cpus_per_decode,
                         decode_retries=decode_retries, actor_restarts=actor_restarts, stall_seconds=stall_seconds,
                         hooks=hooks, parts=parts)  # fmt: skip
            writes.close()
        except BaseException as e:  # stopped before the job (starting Ray, a cluster too small) or during it
            stopped = stop_reason(e)
            with interrupts_held():  # a second interrupt waits for the list to be complete
                with contextlib.suppress(Exception):  # (the run stops for e already)
                    writes.close()  # what was handed over is written, and said, before the rest is listed
                settled = {*summary.done, *(path for path, _ in summary.failed)}
                manifest.list_not_encoded(((path, out) for path, out in todo if str(path) not in settled), stopped)
            if isinstance(e, Exception) and not isinstance(e, (ValueError, TypeError)):  # (an interrupt is said in
                say_stopped(summary, manifest.path)  # one line, the command's; a setting refused, before any work)
            raise
    summary.in_order_of(files)  # files end in any order: said in the inputs' order, as on one machine
    summary.seconds = time.perf_counter() - encoding
    return summary


def _run_job(ray_address, load_model, model, settings, todo, manifest, writes, *, device, mode, batch_size, actors,
             gpus_per_actor, cpus_per_actor, cpus_per_decode, decode_retries, actor_restarts, stall_seconds,
             hooks, parts=None) -> None:  # fmt: skip
    """The Ray part of :func:`encode_dataset`: its files ``todo`` encoded, each outcome in ``manifest``."""
    gpus_per_actor = gpus_per_actor if device != "cpu" else 0
    session = _ray_session(ray_address)
    with session as ray, _data_context(settings, model.dtype):
        nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
        if device != "cpu" and not sum(n.get("GPU", 0) for n in nodes):
            raise ValueError("the Ray cluster has no GPU: pass --device cpu to encode on CPU workers")
        actors = actors or (1 if device == "cpu" else max(1, _gpu_slots(nodes, gpus_per_actor)))
        _check_resources(nodes, session.started, actors, cpus_per_actor, gpus_per_actor, cpus_per_decode)
        _check_object_store(nodes, actors, batch_size, clip_bytes(settings, model.dtype))
        parts = parts or _parts_per_file(nodes, len(todo), actors * cpus_per_actor, cpus_per_decode)
        job = functools.partial(
            _dataset, ray, load_model, model, settings, todo, device=device, mode=mode, batch_size=batch_size,
            actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor,
            cpus_per_decode=cpus_per_decode, decode_retries=decode_retries, actor_restarts=actor_restarts,
            stall_seconds=stall_seconds, hooks=hooks, parts=parts,
        )  # fmt: skip
        assembly = _Assembly(model, mode, device, settings, todo, manifest, _progress(len(todo), "file"), writes)
        with assembly.bar:
            with job() as run:
                _collect(run, assembly, decode_retries, actor_restarts, again=True)
            lost = assembly.unsettled_numbers()
            if lost:  # files whose rows an encode actor that died for good took with it, or whose decode task of
                # several files failed for good: each is tried alone now, from the start (planned anew: it may be cut
                assembly.forget(lost)  # otherwise, or read whole)
                with job(numbers=lost) as run:
                    _collect(run, assembly, decode_retries, actor_restarts)
            again = assembly.reopen_again()
            if again:  # split files whose parts disagreed: each read whole by one task
                with job(numbers=again, parts=1) as run:
                    _collect(run, assembly, decode_retries, actor_restarts)
        manifest.summary.limited_by = assembly.limits.limited_by()


def _parts_per_file(nodes: list[dict], files: int, actor_cpus: float, cpus_per_decode: float) -> int:
    """Decode tasks per file: where the job has fewer files than the live ``nodes`` have room for decode tasks
    beside the encode actors (``actor_cpus`` in all), ceil(room / files) up to MAX_PARTS, each reading one segment
    of its file (a file too short or without cuts to split that far is planned into fewer: :func:`_plans`); else
    1."""
    room = int((sum(n.get("CPU", 0) for n in nodes) - actor_cpus) / cpus_per_decode + 1e-9)
    return min(-(-room // files), MAX_PARTS) if 0 < files < room else 1


def _check_resources(nodes: list[dict], started: bool, actors: int, cpus_per_actor: float, gpus_per_actor: float,
                     cpus_per_decode: float) -> None:  # fmt: skip
    """The job's actors and one decode task fit the live ``nodes`` (their resources; checked as Ray counts, to
    1e-4): on a cluster this job ``started`` (``--ray local``), which will not grow, anything else is a ValueError
    (Ray would wait for ever); on one it joined, a one-line warning (an autoscaling cluster may grow)."""
    cpus = sum(n.get("CPU", 0) for n in nodes)
    node_cpus = max((n.get("CPU", 0) for n in nodes), default=0)
    problem = ""
    if _more(cpus_per_decode, node_cpus):
        problem = (
            f"a decode task asks for {cpus_per_decode:g} CPUs (--ray-cpus-per-decode); no node has more than "
            f"{node_cpus:g}"
        )
    elif not any(not _more(cpus_per_actor, n.get("CPU", 0)) and _gpu_slots([n], gpus_per_actor) for n in nodes):
        problem = (
            f"an encode actor asks for {cpus_per_actor:g} CPUs and {gpus_per_actor:g} GPUs (--ray-cpus-per-actor, "
            "--ray-gpus-per-actor); no node has both"
        )
    elif actors > (slots := _gpu_slots(nodes, gpus_per_actor)):
        problem = (
            f"{actors} encode actors of {gpus_per_actor:g} GPUs do not fit the cluster's GPUs (room for {slots}; "
            "--ray-actors, --ray-gpus-per-actor)"
        )
    elif _more(actors * cpus_per_actor + cpus_per_decode, cpus):
        problem = (
            f"{actors} encode actors of {cpus_per_actor:g} CPUs leave no room for a decode task of "
            f"{cpus_per_decode:g} on the cluster's {cpus:g} CPUs (--ray-actors, --ray-cpus-per-actor, "
            "--ray-cpus-per-decode)"
        )
    if problem and started:
        raise ValueError(f"{problem}: the job could never run")
    if problem:
        notice(f"{problem}; the job waits until the cluster has room")


def _check_object_store(nodes: list[dict], actors: int, batch_size: int, clip: int) -> None:
    """Say in one line where the live ``nodes``' object store holds fewer than STORE_BATCHES batches of
    ``batch_size`` clips of ``clip`` bytes per encode actor: Ray Data then holds clips back between the stages, and
    the job runs several times slower (on 2 CPUs, batches of 30 MB for one actor: 5x slower with an 80 MB store
    than with 100 MB), decode tasks and actors both waiting."""
    store = sum(n.get("object_store_memory", 0) for n in nodes)
    batch = batch_size * clip
    if store and store < STORE_BATCHES * actors * batch:
        notice(f"the cluster's object store ({store / 2**20:,.0f} MiB) holds fewer than {STORE_BATCHES} batches "
               f"per encode actor ({actors} taking batches of {batch_size} clips, {batch / 2**20:,.1f} MiB): clips "
               "will wait between the stages; a smaller --batch-size, or a cluster with more object store memory "
               "(ray start --object-store-memory)")  # fmt: skip


def _more(asked: float, has: float) -> bool:
    """Whether ``asked`` exceeds ``has`` as Ray counts resources (in units of 1e-4)."""
    return round(asked * 10_000) > round(has * 10_000)


def _gpu_slots(nodes: list[dict], gpus_per_actor: float) -> int:
    """How many actors of ``gpus_per_actor`` GPUs the nodes hold: a fraction of a GPU shares one GPU (so 0.6 of
    one fits once per GPU), whole GPUs come from one node; with no GPUs asked for, any number."""
    if not gpus_per_actor:
        return sys.maxsize
    if gpus_per_actor < 1:
        per_gpu = 10_000 // round(gpus_per_actor * 10_000)
        return sum(int(n.get("GPU", 0)) * per_gpu for n in nodes)
    return sum(int(round(n.get("GPU", 0) * 10_000) // round(gpus_per_actor * 10_000)) for n in nodes)


def model_loader(model: TiTok) -> Callable[..., TiTok]:
    """A picklable ``load(device=...)`` rebuilding ``model`` (its config, dtype, backend and precision) on a worker:
    random weights from the seed their digest records, else the file (or reference) ``model.weights_source`` names,
    which every node must be able to read."""
    from .loading import load_tokenizer, random_seed, random_tokenizer

    config, seed = model.config.to_dict(), random_seed(model.weights_digest)
    if seed is not None:
        return functools.partial(random_tokenizer, config, seed=seed, dtype=model.dtype, backend=model.backend,
                                 precision=model.precision)  # fmt: skip
    if not model.weights_source:
        raise ValueError("the model names no weights file (weights_source) for the Ray workers: pass load_model")
    return functools.partial(
        load_tokenizer, model.weights_source, config=config, dtype=model.dtype, backend=model.backend,
        precision=model.precision,
    )


def _collect(run: _Run, job: _Assembly, decode_retries: int, actor_restarts: int, again: bool = False) -> None:
    """Take every row; then settle the files whose rows never all came back: their decode task failed for good, or
    an encode actor died for good with their rows (their decode tasks ran to their end: the ledger's record). With
    ``again`` (a pass of their own follows, each file read alone from the start), leave unsettled those an encode
    actor lost and, where decode tasks held several files (one's failure failed the others), those whose decoding
    did not finish. The job stops, its unsettled files not encoded, when every encode actor has died for good
    while rows are due."""
    stopped = None
    job.limits.pass_started(run.actors, run.reader_seconds)
    try:
        for row in run.rows():
            job.take(row)
            if job.limits.due():
                job.bar.set_postfix_str(job.limits.describe())
        job.limits.pass_ended()
        job.bar.set_postfix_str(job.limits.describe(), refresh=False)
    except Exception as e:
        said = str(e) if isinstance(e, _Stopped) else _one_line(e)
        stopped = f"not encoded: the job stopped ({said})"
        if type(e) is OSError:  # (a token file that cannot be written: its line says what, as on one machine; not Ray's
            raise OSError(f"the Ray job stopped: {e}") from e  # errors that are OSErrors, whose text is a traceback)
        raise RuntimeError(f"the Ray job stopped: {said}") from e
    except BaseException as e:
        stopped = stop_reason(e)
        raise
    finally:
        left = [] if stopped else job.unsettled_numbers()  # (few: a job that stops may leave millions, not asked)
        ran = run.decoded(left) if left else set()
        if stopped:  # (the job stops for an error: a manifest that cannot take the list does not hide it)
            job.manifest.list_not_encoded(((state.path, state.out) for state in job.unsettled()), stopped)
        for state in [] if stopped else job.unsettled():
            lost = state.decoded or state.number in ran  # (its end rows came back, or its decode tasks ended)
            if again and (lost or (run.shared and not state.decoded)):
                continue  # read again, alone
            if lost:
                why = (f"encoding did not finish: an encode actor died for good with its rows (each restarted up to "
                       f"{actor_restarts} times)")  # fmt: skip
            else:
                why = f"decoding did not finish: its decode task failed for good (tried {decode_retries + 1} times)"
            job._fail(state, f"{why}; see the Ray worker logs")


def _one_line(error: BaseException) -> str:
    """The line that says what went wrong: Ray errors wrap the worker's traceback, whose last ``...Error: ...``
    line names the exception the worker raised."""
    chain, found = [], ""
    while error is not None and len(chain) < 8:
        chain.append(error)
        error = error.__cause__
    for link in chain:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(link).splitlines()]
        raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Fault): \S", line)]
        found = raised[-1] if raised else found
    first = next((t for t in str(chain[0]).splitlines() if t.strip()), "")
    return found or f"{type(chain[0]).__name__}: {first}"


@contextlib.contextmanager
def _data_context(settings: ClipSettings, dtype: torch.dtype):
    """Ray Data's settings for one job, and the caller's back afterwards (they are global to the process)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    job = {
        "enable_progress_bars": False,  # the driver shows one bar, for files
        "print_on_execution_start": False,
        "max_errored_blocks": -1,  # a task that fails for good loses its files only; they are reported
        "target_max_block_size": max(2 * clip_bytes(settings, dtype), 1 << 20),  # clips stream in small blocks
    }
    saved = {name: getattr(context, name) for name in job}
    try:
        for name, value in job.items():
            setattr(context, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(context, name, value)


def _dataset(ray, load_model, model: TiTok, settings: ClipSettings, todo, *, device: str, mode: str, batch_size: int,
             actors: int, gpus_per_actor: float, cpus_per_actor: float, cpus_per_decode: float, decode_retries: int,
             actor_restarts: int, stall_seconds: float | None, hooks: dict[str, str], parts: int = 1,
             numbers: Sequence[int] | None = None) -> _Run:  # fmt: skip
    """The Ray Data pipeline: file rows (``parts`` a file: each of its decode tasks reads one of the segments it
    splits into) -> decode tasks (one per row, or a few rows per task past MAX_DECODE_TASKS) -> encode actors ->
    small result rows, as a :class:`_Run`. ``numbers``: only these files of ``todo``, one row per task (files
    whose shared task failed, tried alone). Run within :func:`_data_context`."""
    from ray.data import ActorPoolStrategy
    from ray.util.annotations import RayDeprecationWarning

    retry, numbers = numbers is not None, range(len(todo)) if numbers is None else numbers
    paths = {n: str(todo[n][0]) for n in numbers}
    plans = {}
    if parts > 1:
        plans = _plans(ray, paths, settings, parts, cpus_per_decode, stall_seconds, hooks.get("plan_exit_on", ""))
    items = [row for n, path in paths.items() for row in part_rows(n, path, *plans.get(n, ([], "")))]
    ledger = _ledger(ray)
    decode = functools.partial(
        decode_rows, settings=settings, dtype=model.dtype, threads=max(1, round(cpus_per_decode)),
        stall_seconds=stall_seconds, exit_on=hooks.get("decode_exit_on", ""), exit_log=hooks.get("decode_exit_log", ""),
        ledger=ledger,
    )  # fmt: skip
    with warnings.catch_warnings():  # Ray 2.60 has no named parameters for these retry limits yet
        warnings.simplefilter("ignore", RayDeprecationWarning)
        blocks = len(items) if retry else min(len(items), MAX_DECODE_TASKS)
        clips = ray.data.from_items(items, override_num_blocks=blocks).flat_map(
            decode, num_cpus=cpus_per_decode, max_retries=decode_retries, retry_exceptions=False
        )
        results = clips.map_batches(
            _RayClipEncoder,
            fn_constructor_args=(load_model, settings),
            fn_constructor_kwargs=dict(
                device=device, mode=mode, batch_size=batch_size, weights_digest=model.weights_digest,
                dtype=model.dtype, ledger_handle=ledger,
                exit_once=hooks.get("actor_exit_once", ""), exit_always=bool(hooks.get("actor_exit_always")),
            ),
            batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, max_restarts=actor_restarts,
            max_task_retries=actor_restarts,
        )  # fmt: skip
    executors: list = []
    return _Run(ray, _rows_of(results, executors), ledger, actors, actor_restarts, shared=len(items) > MAX_DECODE_TASKS,
                born=ray.get(ledger.born.remote()), executors=executors)  # fmt: skip


def _rows_of(dataset, executors: list) -> Iterable[dict]:
    """``dataset.iter_rows()``, whose Ray Data execution, once started, is added to ``executors``: a reader waiting
    inside Ray Data for a row that never comes (every encode actor dead) waits on a queue without a timeout, where
    an exception raised in its thread does not land, and the execution goes on (holding its actors) until the
    process ends. Shutting the execution down ends the wait. Where Ray Data does not start its execution as Ray
    2.60-2.63 do, nothing is added (leaving a pass then stops what it can, as before)."""
    iterator = dataset.iterator()
    start = getattr(iterator, "_to_ref_bundle_iterator", None)
    if start is None:
        return dataset.iter_rows()

    def started(*args, **kwargs):
        begun = start(*args, **kwargs)
        parts = begun if isinstance(begun, tuple) else ()
        executors.extend(x for x in parts if type(x).__name__ == "StreamingExecutor" and hasattr(x, "shutdown"))
        return begun

    iterator._to_ref_bundle_iterator = started
    return iterator.iter_rows()


def _ledger(ray):
    """The pass's :class:`FaultLedger` actor, on the driver's node where it can be (a node lost with the driver's
    ends the job anyway), started again if its process dies (its records of faults lost: a clip may then fault the
    device more often before it fails), its calls retried meanwhile: every encode actor asks it at each batch, and a
    ledger gone for good failed every batch after it, each file blamed on its decoding."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, scheduling_strategy=here)(FaultLedger).remote()


def _plans(ray, paths: dict[int, str], settings: ClipSettings, parts: int, cpus: float, stall_seconds: float | None,
           exit_on: str) -> dict[int, tuple[list[bytes], str]]:  # fmt: skip
    """The segments of each file of ``paths`` (by number; :func:`plan_segments`), planned at once in Ray tasks of
    ``cpus`` CPUs; a file whose task died, or did not end within PLAN_SECONDS (or ``stall_seconds``, if less), is
    left out (read whole)."""
    from ray.exceptions import RayError

    plan = ray.remote(num_cpus=cpus, max_retries=0)(plan_segments)
    refs = {plan.remote(path, settings, parts, exit_on): number for number, path in paths.items()}
    wait = PLAN_SECONDS if stall_seconds is None else min(stall_seconds, PLAN_SECONDS)
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=wait)
    for ref in late:
        ray.cancel(ref, force=True)
    plans = {}
    for ref in ready:
        with contextlib.suppress(RayError):  # its worker died: read whole, by a task that says why
            plans[refs[ref]] = ray.get(ref)
    return plans


class _Stop(BaseException):
    """Raised in the thread that reads a pass's rows, to end it: Ray Data shuts its execution down as on Ctrl-C."""


class _Run:
    """One pass of the pipeline as the driver sees it (a context manager). Its result rows are read by a thread, so
    that when none comes for ``WATCH_SECONDS`` the driver can look at the encode actors: once every one has died
    for good, Ray Data can wait for ever (a fixed-size pool does not replace dead actors), so when two checks in
    a row find them all dead the job stops instead. On leaving, a reader still in Ray Data is stopped there (so
    that it ends before Ray does: Ray Data would start a new cluster from it), at once on Ctrl-C, and the pass's
    ledger is killed."""

    def __init__(self, ray, rows, ledger, actors: int, actor_restarts: int, shared: bool = False,
                 born: str | None = None, executors: list | None = None):  # fmt: skip
        self.ray, self.results, self.ledger, self.actor_restarts = ray, rows, ledger, actor_restarts
        self.executors = [] if executors is None else executors  # Ray Data's execution of the rows, once started
        self.born = born  # which start of the ledger the pass began with (FaultLedger.born)
        self.shared = shared  # whether decode tasks hold several rows
        self.actors = actors  # the pool's size
        # the encode actors the ledger has named, by id: kept here too, as a ledger started again has lost its list
        # (each actor enlists again at its next batch, but one dead for good never does)
        self.enlisted: dict[str, Any] = {}
        self.asked = time.monotonic()  # when the ledger was last asked for them
        self.stop, self.lock, self.reading, self.reader = threading.Event(), threading.Lock(), False, None
        self.waited = 0.0  # seconds the reader waited for room for its rows (the driver was behind)
        self.read_from, self.read_to = None, None  # when it read its first row and its last (time.perf_counter)

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.stop.set()
        try:
            try:  # a reader between rows sees ``stop`` within a second and closes Ray Data's iterator itself
                if self.reader is not None and not isinstance(error, KeyboardInterrupt):
                    self.reader.join(timeout=STOP_GRACE_SECONDS)
            finally:  # even when a second Ctrl-C cuts that wait short
                with self.lock:
                    stuck = self.reading
                    if stuck:  # still in Ray Data, which may never answer
                        _raise_in(self.reader, _Stop)
                if stuck:  # where it waits without a timeout, only the execution's end wakes it
                    for executor in self.executors:
                        with contextlib.suppress(Exception):
                            executor.shutdown(force=True)
            if self.reader is not None:
                self.reader.join(timeout=STOP_SECONDS)
        finally:
            self.ray.kill(self.ledger)

    def rows(self) -> Iterator[dict]:
        queued: queue.Queue = queue.Queue(maxsize=QUEUED_ROWS)
        self.reader = threading.Thread(target=self._read, args=(queued,), name="titok-fast-results", daemon=True)
        self.reading = True
        self.reader.start()
        seen, away, busy = 0, 0, 0  # checks in a row that found every encode actor dead; one away; one busy
        while True:
            try:
                item = queued.get(timeout=WATCH_SECONDS)
            except queue.Empty:
                census = self.census()
                lost = self.encoders_lost(census)
                seen = seen + 1 if lost else 0
                if seen == 2:  # twice: not the moment Ray Data releases the actors of a pass that is ending
                    raise RuntimeError(lost) from None
                away = away + 1 if census["away"] else 0
                busy = busy + 1 if census["busy"] and not census["away"] else 0
                if away == 2:  # (said once an episode: an actor away at two checks in a row, no row meanwhile)
                    notice(
                        f"no result for {2 * WATCH_SECONDS:.0f} s: {census['away']} of {self.actors} encode actor(s) "
                        "restarting or not answering (Ray may be waiting for room on the cluster to start them "
                        "again, as after a node was lost); the job waits for them"
                    )  # fmt: skip
                if busy == 2:  # (alive, as Ray's own records say, and on a batch: a long one, or a device that hangs)
                    notice(
                        f"no result for {2 * WATCH_SECONDS:.0f} s: {census['busy']} of {self.actors} encode actor(s) "
                        "alive and busy on a batch all that time (a first batch that compiles, a slow CPU actor; a "
                        "device that hangs looks the same); the job waits for them"
                    )  # fmt: skip
                continue
            seen, away, busy = 0, 0, 0
            if time.monotonic() - self.asked >= WATCH_SECONDS:  # (while rows come: the checks are for when none do)
                self._note_encoders()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _read(self, queued: queue.Queue) -> None:
        """The reader thread: rows into ``queued``, then the end or the error. A :class:`_Stop` sent while
        ``reading`` (one at most) ends it wherever it lands; one still pending when it is done is cleared."""
        pumped = False
        try:
            while True:
                try:
                    if not pumped:
                        pumped = True
                        self._pump(queued)
                    self._done_reading()
                    return
                except _Stop:
                    continue
        finally:  # however it ends (an error from closing Ray Data's iterator too): no stop is sent to it after
            self._done_reading()

    def _done_reading(self) -> None:
        with self.lock:
            self.reading = False
            _raise_in(threading.current_thread(), None)

    def _pump(self, queued: queue.Queue) -> None:
        rows = iter(self.results)
        try:
            for row in rows:
                if self.read_from is None:
                    self.read_from = time.perf_counter()
                if not self._put(queued, row):
                    return
            self._put(queued, _END)
        except _Stop:
            raise
        except BaseException as e:  # handed to the driver's thread
            self._put(queued, e)
        finally:
            if self.read_from is not None:  # its reading ends, however it ends
                self.read_to = time.perf_counter()
            close = getattr(rows, "close", None)
            if close is not None and self.stop.is_set():
                close()  # the driver has stopped: so does Ray Data's execution

    def _put(self, queued: queue.Queue, item) -> bool:
        began = time.perf_counter()
        try:
            while not self.stop.is_set():
                try:
                    queued.put(item, timeout=1.0)
                    return True
                except queue.Full:
                    continue
            return False
        finally:
            self.waited += time.perf_counter() - began  # (microseconds where there is room)

    def reader_seconds(self) -> tuple[float, float]:
        """The reader's seconds waiting for room for its rows, and from its first row to its last (or now)."""
        if self.read_from is None:
            return 0.0, 0.0
        return self.waited, (time.perf_counter() if self.read_to is None else self.read_to) - self.read_from

    def census(self) -> dict[str, int]:
        """The encode actors that have enlisted, by state: "alive" (answered within PING_SECONDS), "busy" (did not
        answer, as an actor on a batch does not, while Ray's records of actors say it is alive), "dead" (died for
        good) and "away" (restarting, or not answering: Ray may be waiting for room to start one again)."""
        from ray.exceptions import ActorDiedError

        counts = {"alive": 0, "busy": 0, "dead": 0, "away": 0}
        self.enlisted.update(self.ray.get(self.ledger.encoders.remote()))
        actors = list(self.enlisted.values())
        pings = [actor.__ray_ready__.remote() for actor in actors]
        done, _ = self.ray.wait(pings, num_returns=len(pings), timeout=PING_SECONDS) if pings else ([], [])
        answered = set(done)
        for actor, ping in zip(actors, pings, strict=True):
            if ping not in answered:
                counts["busy" if _recorded_state(actor) == "ALIVE" else "away"] += 1
                continue
            try:
                self.ray.get(ping)
                counts["alive"] += 1
            except ActorDiedError:
                counts["dead"] += 1
            except Exception:  # unavailable for now (restarting): not known to be dead
                counts["away"] += 1
        return counts

    def _note_encoders(self) -> None:
        """Keep the encode actors the ledger names now (it is given PING_SECONDS: one starting again is not waited
        for)."""
        self.asked = time.monotonic()
        with contextlib.suppress(Exception):
            self.enlisted.update(self.ray.get(self.ledger.encoders.remote(), timeout=PING_SECONDS))

    def decoded(self, files: Sequence[int]) -> set[int]:
        """Those of ``files`` whose decode tasks all ran to their end (the ledger's record); all of them where the
        ledger was started again during the pass (``born`` is not its start now: it lost its records), or cannot
        be asked: each is then read again rather than failed for what may have been an encode actor's loss."""
        try:
            if self.born is not None and self.ray.get(self.ledger.born.remote()) != self.born:
                return set(files)
            return set(self.ray.get(self.ledger.decoded_of.remote(list(files))))
        except Exception:
            return set(files)

    def encoders_lost(self, census: dict[str, int] | None = None) -> str:
        """Why no clip can be encoded any more, or "": every actor of the pool has enlisted and died for good (one
        not enlisted yet, alive, restarting or not answering within PING_SECONDS: "")."""
        census = self.census() if census is None else census
        if census["dead"] < self.actors:  # one may still be starting (loading its model, waiting for a GPU)
            return ""
        return (
            f"every encode actor died for good ({census['dead']}, each restarted up to {self.actor_restarts} times): "
            "no clip can be encoded; see the Ray worker logs"
        )


def settings_on_ray(settings: ClipSettings, device: str) -> ClipSettings:
    """``settings`` as a Ray job applies them, and records them in its token files: its decode tasks resize every
    frame on the CPU, so for CUDA actors preprocessing "auto" is "cpu". (On one machine, "auto" on CUDA resizes
    ordinary sources on the GPU, whose tokens differ a little: with the same record, a resume of either run would
    keep the other's files.)"""
    if settings.preprocess == "auto" and torch.device(device).type == "cuda":
        return replace(settings, preprocess="cpu")
    return settings


def check_reading_on_ray(decoder: str, preprocess: str) -> None:
    if decoder != "cpu" or preprocess == "device":
        raise ValueError(
            "with Ray, frames are decoded and resized by the CPU decode tasks: --decoder nvdec and --preprocess device "
            "do not apply"
        )


RAY_CONNECT_SECONDS = 10.0


RAY_MISSING = "--ray needs Ray Data: pip install 'titok-fast[ray]'"


def check_ray_address(address: str) -> None:
    """Ray Data must be installed (looked up, not imported), and a cluster's address (``HOST:PORT`` or
    ``ray://HOST:PORT``) must answer, before the job loads its weights: Ray itself retries an address where nothing
    listens for minutes, printing only its own warnings. The address is not checked when Ray is already initialized
    in this process (that cluster is used), nor for "local", "auto" and other forms."""
    if any(importlib.util.find_spec(name) is None for name in ("ray", "pyarrow")):  # pyarrow: Ray Data's
        raise ValueError(RAY_MISSING)
    ray = sys.modules.get("ray")  # (never imported: not initialized)
    if address in ("local", "auto") or (ray is not None and ray.is_initialized()):
        return
    if address.lower().startswith(("http://", "https://")):  # (Ray's own error blames a RAY_ADDRESS, in lines)
        raise ValueError(f"--ray {address}: an HTTP address (a dashboard's or a job server's) is not a cluster's; "
                         "expected local, auto, HOST:PORT or ray://HOST:PORT (the address `ray start --head` prints)")
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if "://" in host or ("://" in address and not address.startswith("ray://")):
        return  # other schemes (a client module's) are Ray's to resolve
    if not (colon and host and port.isdecimal()):
        raise ValueError(f"--ray {address}: expected local, auto, HOST:PORT or ray://HOST:PORT")
    if int(port) >= 2**16:  # (Ray would try it for minutes)
        raise ValueError(f"--ray {address}: port {port} is not a TCP port (0 to 65535)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_SECONDS) as connection:
            answer = _answer(connection)
    except OSError as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ValueError(
            f"--ray {address}: no Ray cluster answers there ({reason}); start one with `ray start --head` and pass "
            "the address it prints, or pass --ray local"
        ) from None
    if answer[3:4] == HTTP2_SETTINGS and answer[5:9] == bytes(4):  # a gRPC server's first frame: Ray's GCS
        return
    if _ray_uses_tls() and not _text(answer):  # (a cluster's TLS server drops a preface sent in the clear, or
        return  # answers it with an alert: left to Ray, which speaks TLS to it)
    cluster_port = "the cluster's is the one `ray start --head` prints, 6379 unless --port said otherwise"
    if _text(answer) and (lines := _text(answer).strip().splitlines()):
        said = f"something other than a Ray cluster answers there ({lines[0]!r}: a web server, say; the dashboard's "
        raise ValueError(f"--ray {address}: {said}port is 8265, {cluster_port})")
    if not answer:
        said = (f"nothing answered there in {PROBE_SECONDS:g} s, or the connection was closed (a port forward with "
                "nothing behind it, say)")  # fmt: skip
    else:
        said = f"something other than a Ray cluster answers there (another protocol: {answer[:8].hex(' ')}, TLS, say)"
    raise ValueError(f"--ray {address}: {said}; {cluster_port}")


# HTTP/2's client connection preface and an empty SETTINGS frame (RFC 9113, 3.4): a Ray cluster's GCS (gRPC) answers
# with a SETTINGS frame of its own (type 4, stream 0), at once; a server of a text protocol (HTTP/1.x: the dashboard,
# a proxy) with text, an error page; anything else (a TLS server's alert, silence, a connection closed at once) is no
# cluster either, which Ray would retry for minutes
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
HTTP2_SETTINGS = b"\x04"  # a frame header's type byte (its fourth)
PROBE_SECONDS, PROBE_BYTES = 5.0, 40


def _ray_uses_tls() -> bool:
    """Whether Ray speaks TLS to its clusters (RAY_USE_TLS, as Ray reads it)."""
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def _text(data: bytes) -> str | None:
    return data.decode() if data and all(32 <= b < 127 or b in b"\r\n\t" for b in data) else None


def _answer(connection: socket.socket) -> bytes:
    """What the server on ``connection`` answers HTTP/2's preface with, within PROBE_SECONDS: its first frame's
    header (9 bytes), or a line of text, or the bytes it sent before it closed or fell silent (none: nothing)."""
    answer = b""
    try:
        connection.settimeout(PROBE_SECONDS)
        connection.sendall(HTTP2_PREFACE)
        while len(answer) < PROBE_BYTES and (more := connection.recv(PROBE_BYTES - len(answer))):
            answer += more
            if len(answer) >= 9 and _text(answer) is None or b"\n" in answer:  # decided: read no more
                break
    except OSError:  # (silence, or a reset after some bytes: judged on those)
        pass
    return answer


class _ray_session:
    """Connect to (or start) the cluster for one job, and leave it as it was: a cluster this job started is shut
    down, one it joined is disconnected from, one the caller had connected to stays connected."""

    def __init__(self, address: str):
        self.address = address
        self.connected = False
        self.started = False  # whether this job started the cluster (``local``): it will not grow
        self.data_log_level: int | None = None  # ray.data's logger level before the job quieted it

    def __enter__(self):
        try:
            import ray
        except ImportError:
            raise ValueError(RAY_MISSING) from None
        import ray.data  # noqa: F401 (configures its loggers, quieted below)

        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reporting
            local = dict(include_dashboard=False) if self.address == "local" else {}
            handler = signal.getsignal(signal.SIGTERM)  # ray.init puts its own (sys.exit); the caller's is kept
            main = threading.current_thread() is threading.main_thread()
            try:
                # a local cluster's start forks processes: an interrupt raised by a handler in Python's at-fork hooks
                # is lost there and leaves logging's lock held, on which Ray Data's threads then wait for ever; so
                # the command's Ctrl-C and SIGTERM wait for the start's end (a few seconds)
                with interrupts_held() if self.address == "local" else contextlib.nullcontext():
                    ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING, **local)
            except BaseException as e:
                if main and handler is not None:  # first: a SIGTERM during the shutdown is the caller's (which, once
                    # one came and was held here, ignores the next)
                    signal.signal(signal.SIGTERM, signal.SIG_IGN if sigterm_came() else handler)
                if ray.is_initialized():  # started, then the held interrupt
                    ray.shutdown()
                if isinstance(e, ConnectionError) and self.address == "auto":  # Ray's text names its own flags
                    raise ValueError(
                        "--ray auto: no running Ray cluster found from this machine; start one with `ray start "
                        "--head`, or pass --ray local"
                    ) from e
                if isinstance(e, ConnectionError) and self.address != "local" and not _token_auth_on():
                    # something answered (check_ray_address): most often a cluster that wants a token, which Ray
                    # sends only to a cluster it found itself (auto), never to an address it was given
                    raise ValueError(
                        f"--ray {self.address}: {e}; a cluster that requires token authentication needs "
                        "RAY_AUTH_MODE=token in this command's environment (the token in RAY_AUTH_TOKEN or "
                        "~/.ray/auth_token), or --ray auto on its head node"
                    ) from e
                if isinstance(e, SystemExit):  # Ray's handler took a SIGTERM during start-up: do what the caller's does
                    ray.shutdown()
                    if main and e.code == signal.SIGTERM and callable(handler):
                        handler(signal.SIGTERM, None)  # raises (the command's); it may leave SIGTERM ignored
                raise
            if handler is not None and main:
                signal.signal(signal.SIGTERM, handler)
            self.connected = True
            self.started = self.address == "local"
        data_log = logging.getLogger("ray.data")
        self.data_log_level = data_log.level
        data_log.setLevel(logging.CRITICAL)  # failures are reported as rows, once
        return ray

    def __exit__(self, *exc) -> None:
        try:
            if self.connected:
                import ray

                # the command's Ctrl-C or SIGTERM again meanwhile waits for the end: a shutdown cut short left a
                # local cluster's agents running, and Ray's own at exit was cut short in turn (a traceback, status 1)
                with interrupts_held():
                    _let_ray_data_threads_end()
                    ray.shutdown()
        finally:  # (once Ray Data's threads of the job are done: their last words stay quiet)
            if self.data_log_level is not None:  # the caller's Ray Data work after the job is logged as before it
                logging.getLogger("ray.data").setLevel(self.data_log_level)
                self.data_log_level = None


def _token_auth_on() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


# Ray Data's threads that may still call into Ray once a job's iterator is closed: its executors' loops, and the
# workers of its batch iterator ("iter_threaded"), which see the iterator closed within 0.1 s and, ending, drop
# the object references they held (each a call into Ray)
RAY_DATA_THREADS = ("StreamingExecutor-", "iter_threaded")


def _let_ray_data_threads_end(seconds: float = 10.0) -> None:
    """Wait (a while at most) for Ray Data's threads to end, then collect garbage: a job cut short (Ctrl-C,
    SIGTERM) closes its iterator, but those threads may still be calling into Ray or about to drop object
    references; such a call during or after ``ray.shutdown`` ends the whole process (Ray's core worker exits,
    status 1) before the command can report, and without a word on stderr in the last moments of the shutdown
    (Ray logs that at warning level, to its log file only)."""
    deadline = time.monotonic() + seconds
    for thread in threading.enumerate():
        if thread.name.startswith(RAY_DATA_THREADS) and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
    gc.collect()  # references held in reference cycles are dropped now, while the core worker is up
