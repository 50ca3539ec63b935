"""Video files in: clips for the tokenizer (writing videos: :mod:`titok_fast.writing`; PSNR and SSIM:
:mod:`titok_fast.metrics`).

Reading reproduces the upstream notebook (DESIGN.md section 8) exactly, so the same tokens come out:
- sampling="upstream" (default): a chunk is int(T * (source_fps / fps)) consecutive source frames (source_fps:
  the container's average rate), and its T frames are the source frames numpy.linspace(first, last, T, int)
  picks; whole chunks only, like upstream (tail="pad" keeps the last partial chunk, padded).
- sampling="time": the stream is resampled by presentation time instead (output frame k is the last source
  frame shown at or before k / fps, a frame stamped up to half a millisecond after it included: Matroska and FLV
  round stamps to milliseconds), which is right for variable frame rate, then cut into chunks of T frames.
Each sampled frame is resized in float32, as torchvision's Resize(max(H, W), bicubic, antialias) does on the
float tensor upstream builds (short side to max(H, W), long side truncated, no clamping), center-cropped as
torchvision's CenterCrop, then scaled as upstream: (pixels / 255) * 2 - 1, in the model's dtype (``dtype``: the
encode pipeline's decoding workers scale so), or later by ``normalize_pixels`` given raw clips (``raw=True``: eval
and the Ray decode tasks).

Decoding streams: only the latest decoded frame is held at source resolution, sampled frames at (H, W). The CPU
decoder skips the H.264 frames the sampling does not need and no other frame refers to (``prune``; exact, see
:mod:`titok_fast.decoders`). A long H.264, HEVC, VP9 or AV1 video read by several workers (:func:`stream_videos`)
may be split into segments (:class:`Segment`), each decoded by a worker of its own from a key frame where
decoding starts afresh (a clean cut: the same frames as decoding from the start), the clips of each handed over as
they come, numbered in the file.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import heapq
import itertools
import json
import math
import multiprocessing.resource_tracker
import multiprocessing.util
import numbers
import os
import queue
import re
import resource
import shutil
import signal
import stat
import statistics
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from fractions import Fraction
from typing import TypeVar

import av
import numpy as np
import torch

from .archives import ArchiveError, is_file, member_of, split_member
from .containers import TooManySamples, cut_short, is_iso_bmff
from .decoders import (
    DECODERS,
    MATRIX_OF_FIRST_FRAME,
    PRUNED_CONTAINERS,
    NvdecFrame,
    PruneMismatch,
    StreamIndex,
    decodes_unprobed,
    frame_i420_matrix,
    i420_bytes,
    i420_matrix,
    nv12_clip_rgb,
    open_frames,
    open_input,
    open_tags,
    open_unprobed,
    release_kept_decoder,
    stream_index,
    tag,
    video_stream,
)
from .files import MAX_CLIPS_PER_VIDEO, MAX_FPS, STALL_SECONDS, notice, show_traceback
from .preprocess import UPLOADS, I420Clip, clip_pixels, i420_rgb, normalize_pixels, placement, resized_size
from .stages import CLOCK

T = TypeVar("T")
TAIL_POLICIES = ("drop", "pad")
SAMPLINGS = ("upstream", "time")
ROTATIONS = ("stored", "display")  # frames as stored (upstream), or turned as the container says to show them
# the largest source frame read, and the largest frame resized (short side to the clip's larger side, before the
# crop), in pixels of a square of this side (8192 x 8192, beyond 8K): a 16384 x 16384 frame would take some 4 GB
# per decoding worker once converted and resized (RGB, float32); a file that declares or grows to more fails alone
MAX_SOURCE_SIDE = 8192
# a video is split across decoding workers only into segments of at least this many clips: each segment opens
# the file, seeks and decodes the frames from its cut (a key frame) to its first clip, up to about one group of
# pictures, a clip's worth of decoding or so at 30 fps (x264 and x265 put a key frame at least every 250 frames):
# a few percent of a segment's work
SEGMENT_CLIPS = 16
# clips_per_video's clips spanning less than 1 / LIMITED_SHARE of a video's duration are decoded from its start,
# without the index of the whole file that pruning and splitting read: the index reads every byte of the file (36 MB
# for one clip of a minute of 720p, against 1.6 MB from the start), where pruning saves about a sixth of the
# decoding of the clips read and nothing else (RESULTS.md, "the first clips of long videos")
LIMITED_SHARE = 4


def check_fps(fps: float) -> None:
    """A ValueError unless ``fps`` is a frame rate to sample or write at: in (0, MAX_FPS] (not NaN or infinite)."""
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not 0 < fps <= MAX_FPS:
        raise ValueError(f"fps must be a number in (0, {MAX_FPS:g}]; got {fps!r}")


def check_clips_per_video(clips: int | None) -> int | None:
    """``clips`` (a ClipReader's ``clips_per_video``) as an int, or None; a ValueError unless it is None or an
    integer in [1, MAX_CLIPS_PER_VIDEO]."""
    if clips is None:
        return None
    if not isinstance(clips, numbers.Integral) or isinstance(clips, bool) or not 1 <= clips <= MAX_CLIPS_PER_VIDEO:
        raise ValueError(f"clips_per_video must be None or an integer in [1, {MAX_CLIPS_PER_VIDEO}]; got {clips!r}")
    return int(clips)


class VideoError(ValueError):
    """A file that cannot be read as clips; the message names the file and what was wrong."""


class _NvdecFailed(Exception):
    """NVDEC failed on a file midway (its cause says how): the reader goes on with the CPU decoder."""


@dataclass(frozen=True)
class ClipSet:
    """The clips of one video.

    clips: consecutive chunks of the resampled stream, each [3, T, H, W] float32 in [-1, 1]
    start_times: start of each clip, seconds after the first video frame
    source_fps: the source's average frame rate as the container reports it (0.0 if unknown)
    fps: the frame rate the stream was resampled to
    frames_per_clip: T
    last_clip_frames: real frames in the last clip; fewer than T only when tail == "pad"
    tail: "drop" or "pad", what was done with a tail shorter than T
    path: the source file
    """

    path: str
    clips: list[torch.Tensor]
    start_times: list[float]
    source_fps: float
    fps: float
    frames_per_clip: int
    last_clip_frames: int
    tail: str


@dataclass(frozen=True)
class Segment:
    """Part of a video read by a worker of its own: clips ``first`` to ``first + clips - 1`` (``clips`` None: to
    the end, tail included), decoded from frame ``cut``, a clean cut of the file's :class:`StreamIndex` (whose
    ``order`` it carries, so that no worker reads the packets' timestamps again)."""

    first: int
    clips: int | None
    cut: int
    order: np.ndarray
    prunable: bool  # the index's: whether non-reference frames not needed may be skipped


class ClipReader:
    """One video's clips, decoded lazily: iterating yields each clip [3, frames, height, width] as soon as its
    frames are decoded, so a long video never has to fit in memory.

    Clips hold `frames` frames sampled at `fps`, with values in [-1, 1] scaled in ``dtype`` (float32 by default;
    the model's, as ``normalize_pixels`` scales them, exactly as upstream does, casting first), or with ``raw=True``
    the resized pixel values (0..255 scale, unclamped) for ``normalize_pixels`` to scale later. ``sampling``:
    "upstream" (the notebook's frame indices) or "time" (presentation times; for variable frame rate), see the
    module header. tail="drop" drops a last chunk shorter than `frames` (a video shorter than one
    chunk is a VideoError); tail="pad" keeps it, repeating its last frame. `threads` decoder threads use frame
    threading. The arguments are checked here; the file is opened when iteration starts.

    ``decoder``: "cpu" (PyAV) or "nvdec" (see :mod:`titok_fast.decoders`; falls back to the CPU). ``prune``: the
    CPU decoder skips the H.264 frames that are not sampled and that no other frame refers to; the clips are the
    same bit for bit (``pruned`` says whether this file was; False decodes every frame). ``preprocess``
    ("auto", "cpu", "device") and ``device`` (the model's device type) decide per file, by
    :func:`titok_fast.preprocess.placement`, where frames are resized: with placement "device" (always so for
    NVDEC's frames) the clips are the sampled frames at source size, [frames, h, w, 3] uint8 RGB, for
    :class:`titok_fast.preprocess.DevicePreprocessor`, except a clip whose frames differ in size (the source's
    resolution changes within it): its frames are resized one by one where they were decoded, as placement "cpu"
    does, and it comes as that placement's clips do (scaled in ``dtype``, or raw float32); ``placement`` and
    ``decoded_by`` say what this file got.
    ``upload="i420"`` (what a run on CUDA asks for): the CPU decoder's clips of such frames come as
    :class:`titok_fast.preprocess.I420Clip` instead, their YUV planes (half the bytes), where the device's
    conversion gives the RGB bytes of this machine's libswscale (:func:`titok_fast.decoders.i420_matrix`); a clip
    with a frame that would not (a stream that changes midway, a frame turned by ``rotation``) comes as RGB.

    ``segment``: read only that :class:`Segment` of the file (:class:`ClipFeed` makes them). A reader with
    ``split_into`` > 1 and ``on_split`` set (:func:`stream_videos` sets them) that finds its video long (H.264,
    HEVC, VP9 or AV1; 2 x SEGMENT_CLIPS clips or more, with clean cuts where it would cut), before its first clip,
    cuts it into up to ``split_into`` segments of SEGMENT_CLIPS clips or more, keeps the first and hands the others
    to ``on_split(segments)``; ``clips_read`` then counts its own. :meth:`plan` gives those segments alone (a Ray
    job plans a file once, and each of its decode tasks reads one segment).

    ``clips_per_video``: read at most the file's first that many clips (None: all); decoding stops after the
    last frame they use, and a file split among readers is split within them.

    ``rotation``: "stored" (default) takes frames as they are stored, as upstream's reader does; "display" turns
    each one as the container's display matrix says to show it (phone videos are stored sideways), in quarter
    turns before it is resized (:func:`display_turns`; NVDEC's frames, which carry no matrix, as the first frame
    says).

    Iteration raises VideoError for a missing, empty, unreadable, corrupt, audio-only or too short file (possibly
    after some clips). Once it has ended, ``source_fps``, ``clips_read``, ``last_clip_frames`` and ``start_times()``
    describe what was read.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        frames: int,
        height: int,
        width: int,
        fps: float = 8.0,
        tail: str = "drop",
        threads: int = 1,
        sampling: str = "upstream",
        raw: bool = False,
        decoder: str = "cpu",
        preprocess: str = "cpu",
        device: str = "cpu",
        prune: bool = True,
        rotation: str = "stored",
        segment: Segment | None = None,
        upload: str = "rgb",
        dtype: torch.dtype = torch.float32,
        clips_per_video: int | None = None,
    ):
        sizes = {"frames": frames, "height": height, "width": width, "threads": threads}
        wrong = next((k for k, v in sizes.items() if not isinstance(v, numbers.Integral) or isinstance(v, bool)), None)
        if wrong is not None:
            raise TypeError(f"{wrong} must be an integer; got {sizes[wrong]!r}")
        frames, height, width, threads = (int(v) for v in sizes.values())  # NumPy's integers too
        if min(frames, height, width, threads) < 1:
            raise ValueError(
                f"frames, height, width and threads must be >= 1; got {frames}, {height}, {width}, {threads}"
            )
        check_fps(fps)
        if tail not in TAIL_POLICIES:
            raise ValueError(f"tail must be one of {TAIL_POLICIES}; got {tail!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}; got {sampling!r}")
        self.path = os.fspath(path)
        self.frames, self.height, self.width, self.fps = frames, height, width, fps
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}; got {decoder!r}")
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}; got {rotation!r}")
        placement(preprocess, device, 1, 1, 1, 1)  # checks the name
        if upload not in UPLOADS:
            raise ValueError(f"upload must be one of {UPLOADS}; got {upload!r}")
        self.upload = upload
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype; got {dtype!r}")
        self.dtype = dtype
        self.clips_per_video = check_clips_per_video(clips_per_video)
        self.tail, self.threads, self.sampling, self.raw = tail, threads, sampling, raw
        self.decoder, self.preprocess, self.device, self.prune = decoder, preprocess, device, prune
        self.rotation, self.segment = rotation, segment
        self.split_into = 1  # segments this reader may split its file into (see above; set by stream_videos)
        self.on_split: Callable[[list[Segment]], None] | None = None
        self.pin_memory = False  # placement "device": host clips in pinned memory (CUDA only; set by stream_videos)
        # placement "device" in a worker process: where to stack a clip of a given shape (a shared-memory segment
        # reused from clip to clip, _Segments; None: a new tensor)
        self.clip_out: Callable[[tuple[int, ...]], torch.Tensor | None] | None = None
        self.held: HeldBytes | None = None  # placement "device": the bound on source-size clips (set by stream_videos)
        self.stop: threading.Event | None = None  # set when the reader's clips are no longer wanted (its feed closed)
        self.nothing_queued: Callable[[], bool] | None = None  # whether its feed's queue is empty (set with held)
        self._reservation: _Reservation | None = None  # the bytes reserved for the clip being gathered
        self.handed: _Reservation | None = None  # those of the clip just given, for its feed to queue with it
        # (order, time base, _dues of them), the last worked out: kept across readings, and by the copies that read
        # a split file's other segments (the same order), which need not work it out again
        self._due_of: tuple[np.ndarray, Fraction, np.ndarray] | None = None
        self._reset()

    def _reset(self) -> None:
        """What a reading finds out, as before any: each iteration reads the file anew."""
        self.pruned = False  # whether the CPU decoder skipped frames this file does not need, set as it is read
        self.placement = ""  # where this file's frames are preprocessed, "cpu" or "device", set when it is opened
        self.decoded_by = ""  # "cpu" or "nvdec", or "nvdec,cpu" when NVDEC failed midway, set as it is read
        self.source_fps = 0.0  # the container's average frame rate (0.0 if unknown), set when the file is opened
        self.clips_read = 0
        self.last_clip_frames = self.frames  # real frames in the last clip; fewer only when tail == "pad"
        self._chunk_length = 0  # source frames per chunk (sampling "upstream")
        self.source_stamp = ""  # "<size>:<mtime_ns>" of the file when it was opened (source_stamp), set then
        self._i420: str | None = None  # the YUV matrix of this file's I420 clips ("": none; see upload), set when it
        # is first opened (a retry's frames are the same, and keep it)
        self._unprobed = False  # whether the file is being decoded as opened without FFmpeg's probe (_images)
        self._nv12: tuple[int, str] | None = None  # (picture height, YUV matrix) of NVDEC's surfaces, once one came
        self._planned = False  # whether it has opened the file (it may split it only then, once per reading)
        self._own: Segment | None = None  # the first segment, when it split the file

    def __iter__(self) -> Iterator[torch.Tensor]:
        try:
            yield from self._clips()
        finally:  # (ended, failed or closed while gathering a clip)
            self.drop_reservation()

    def drop_reservation(self) -> None:
        """Give back the bytes reserved for the clip being gathered (its feed is closed, or the reading ended)."""
        reservation, self._reservation = self._reservation, None
        if reservation is not None:
            reservation.release()

    def _clips(self) -> Iterator[torch.Tensor]:
        path, frames = self.path, self.frames
        self._reset()
        chunk: list[torch.Tensor] = []
        for image in self._all_images():
            if not chunk and self.held is not None and image.dtype == torch.uint8:  # a source-size clip begins
                nv12 = self._nv12 is not None and image.ndim == 2  # an NVDEC surface, made RGB by _clip
                nbytes = self._nv12[0] * image.shape[1] * 3 if nv12 else image.nbytes
                with CLOCK.waiting("room"):  # (a worker process's: its wait for the run's answer)
                    self._reservation = self.held.reserve(frames * nbytes, self.stop, self.nothing_queued)
            chunk.append(image)
            if len(chunk) == frames:
                yield self._clip(chunk)
                chunk = []
        segment = self._segment()
        if segment is not None and (segment.clips is not None or segment.first):
            promised = 1 if segment.clips is None else segment.clips  # (the last segment: one clip at least)
            if self.clips_read < promised:  # its packets were counted: the file changed, or is damaged
                raise VideoError(f"{path}: decoding ended after clip {segment.first + self.clips_read}; its packets "
                                 f"make at least {segment.first + promised}")  # fmt: skip
            if segment.clips is not None:
                return
        elif self.clips_read == 0 and not chunk:
            raise VideoError(f"{path}: no decodable video frames")
        elif self.clips_read == 0 and self.tail == "drop":
            raise VideoError(
                f"{path}: is shorter than one chunk of {frames} frames at {self.fps:g} fps (--tail pad, tail='pad' in "
                "Python, pads it)"
            )
        if chunk and self.tail == "pad":
            clip = self._clip(chunk + chunk[-1:] * (frames - len(chunk)))
            self.last_clip_frames = len(chunk)
            yield clip

    def _all_images(self) -> Iterator[torch.Tensor]:
        """The sampled frames; after the last one given out, from the CPU decoder if NVDEC fails midway, from a
        probed opening if pruned decoding of an unprobed one goes wrong (:func:`titok_fast.decoders.open_unprobed`),
        and from every frame decoded if pruned decoding of a probed one goes wrong."""
        given, decoder, prune, probe = 0, self.decoder, self.prune, False
        while True:
            try:
                for image in self._images(decoder, prune, skip=given, probe=probe):
                    given += 1
                    yield image
                return
            except _NvdecFailed as failed:
                self.decoded_by += ",cpu"
                notice(f"{self.path}: NVDEC failed ({failed.__cause__}); the rest on the CPU")
                decoder = "cpu"
            except PruneMismatch:
                if not self._unprobed:
                    self.pruned, prune = False, False
                elif not given:  # (its placement, and so its I420 matrix, by the container's size: _placed_alike)
                    self.placement, self._i420, probe = "", None, True
                else:
                    probe = True

    def _images(self, decoder: str, prune: bool, skip: int, probe: bool = True) -> Iterator[torch.Tensor]:
        """The sampled frames after the first ``skip``: [3, height, width] raw pixels (placement "cpu") or
        [h, w, 3] uint8 RGB at source size (placement "device"); ``prune``: let the CPU decoder skip frames;
        without ``probe``, the file is decoded as opened without FFmpeg's probing decode where that gives the same
        frames (:func:`titok_fast.decoders.decodes_unprobed`; ``_unprobed`` says whether it was)."""
        path = self.path
        # a file is split, if at all, when first opened: not on a retry (NVDEC failed, or pruning went wrong)
        # after clips were given. Its segments are planned on a probed opening (as ClipReader.plan does).
        may_split = not self._planned and self.split_into > 1 and self.on_split is not None
        self._planned = True
        if decoder == "cpu" and prune and not probe and not may_split:
            (container, self._unprobed), stamp = _open_unprobed(path)
        else:
            (container, stamp), self._unprobed = _open(path), False
        with contextlib.ExitStack() as opened:
            opened.enter_context(container)
            self.source_stamp = self.source_stamp or stamp
            if (stream := video_stream(container)) is None:
                art = " (only cover art)" if container.streams.video else ""
                raise VideoError(f"{path}: has no video stream{art}")
            if (context := stream.codec_context) is None:
                raise VideoError(f"{path}: its video stream has a codec FFmpeg cannot decode (an unknown codec)")
            if (prune or may_split) and self._segment() is None and self._limit_is_short(stream):  # (decoded from its
                prune = may_split = False  # start to the limit's clips: no index of the whole file, no split)
            index, segment = None, self._segment()
            needs = self._segment_needs if prune else None
            if decoder == "cpu" and prune and segment is not None:  # the cut is known: no cuts needed
                index = StreamIndex(segment.order, np.zeros(0, dtype=np.int64), segment.prunable)
            elif may_split:  # (a probed opening) the size checked before another worker is given a part
                _check_frame_size(path, context.width, context.height, (self.height, self.width))
                started = CLOCK.start()
                split = self._split(stream)  # (decoder and prune are this reader's own on a first open)
                CLOCK.stop("decode", started)
                segments = []
                if split is not None:
                    index, segments = split  # the decoder is given the index
                    if index is None:  # pruning cannot be trusted here (the decoder would find it so again)
                        needs = None
                if segments:
                    self._own = segments[0]
                    self.on_split(segments[1:])
                segment = self._segment()
            if decoder == "cpu" and needs is not None and index is None:  # (else looked up by cpu_frames)
                started = CLOCK.start()
                index = stream_index(path)
                CLOCK.stop("decode", started)
                needs = None if index is None else needs  # (not pruned: not looked up again)
            if index is not None and not index.prunable and not (segment is not None and segment.cut):
                index, needs = None, None  # decoded whole from the start (the first segment: up to its last clip)
            if self._unprobed and not (needs is not None and decodes_unprobed(stream, index)):
                container.close()  # (opened again, with the probe)
                container, self._unprobed = opened.enter_context(_open(path)[0]), False
                stream = video_stream(container)
            context = stream.codec_context
            if not self._unprobed:  # (unprobed, the size is the sample entry's until the first frame: see below)
                _check_frame_size(path, context.width, context.height, (self.height, self.width))
            start = segment.cut if segment is not None and index is not None else 0
            with open_frames(path, container, decoder, threads=self.threads, needs=needs, index=index,
                             start=start) as source:  # fmt: skip
                self.decoded_by, self.pruned = self.decoded_by or source.decoder, source.pruned
                self.source_fps = source.source_fps
                if not self.placement:  # decided once per file: a CPU retry after NVDEC keeps NVDEC's
                    on = placement(self.preprocess, self.device, context.height, context.width, self.height,
                                   self.width, self.frames)  # fmt: skip
                    self.placement = "device" if source.decoder == "nvdec" else on
                rgb = functools.partial(_sized_rgb, path, (self.height, self.width), source.rgb)
                nvdec_turns = 0
                if self.rotation == "display" and source.decoder == "nvdec":  # no display matrix on its frames:
                    nvdec_turns = first_frame_turns(path)  # the first frame's, from PyAV
                    rgb = functools.partial(_turned, rgb, lambda _: nvdec_turns)
                elif self.rotation == "display":
                    rgb = functools.partial(_turned, rgb, functools.partial(display_turns, path))
                image = rgb if self.placement == "device" else functools.partial(self._resized, rgb)
                if source.decoder == "nvdec" and not nvdec_turns:
                    image = self._surface  # converted a clip at a time (_clip): one launch a clip, not one a frame
                if self.upload == "i420" and self.placement == "device" and self.decoded_by == "cpu":  # (not after
                    # NVDEC failed midway: its frames are on the GPU)
                    if self._i420 is None:
                        self._i420 = i420_matrix(stream, self._unprobed) or ""
                else:
                    self._i420 = ""
                if self._i420:
                    turns = functools.partial(display_turns, path) if self.rotation == "display" else None
                    image = functools.partial(self._i420_or_rgb, turns, rgb)
                if self.sampling == "upstream":
                    self._set_chunk_length(self.source_fps)
                frames, first_clip = source.frames, self.first_clip
                if self._unprobed:
                    frames = self._placed_alike(frames)
                if self.sampling == "upstream":
                    if first_clip:  # the frames between the cut and the segment's first chunk: the chunk before's
                        frames = ((i, frame) for i, frame in frames if i >= first_clip * self._chunk_length)
                    images = _sample_indices(frames, self.frames, self._chunk_length, image, self.tail == "pad")
                else:
                    zero = int(segment.order[0]) if segment is not None else None  # the file's first frame's time
                    if container.format.name not in PRUNED_CONTAINERS:  # (stamps that may come in decode order)
                        frames = _presentation_stamps(path, frames)
                    to_the_end = (segment is None or segment.clips is None) and not self._cut_before_the_end(index,
                                                                                                         stream)
                    images = _resample(path, frames, self.fps, image, zero, first_clip * self.frames, to_the_end)
                if (end := self._end_clip()) is not None:
                    images = itertools.islice(images, max(0, end - first_clip) * self.frames)
                try:
                    yield from itertools.islice(images, skip, None)
                except av.FFmpegError as exc:
                    raise VideoError(f"{path}: decoding failed ({exc})") from exc
                except Exception as exc:
                    if source.decoder != "nvdec":
                        raise
                    raise _NvdecFailed() from exc

    def _set_chunk_length(self, source_fps: float) -> None:
        """The source frames of a chunk (sampling "upstream") at ``source_fps``, or a VideoError saying why none."""
        path = self.path
        if source_fps <= 0:
            raise VideoError(f"{path}: the container reports no frame rate; use --sampling time (sampling='time' in "
                             "Python)")  # fmt: skip
        span = self.frames * (source_fps / self.fps)
        if not span < 2**53:  # a chunk longer than any video: said, not an overflow
            raise VideoError(
                f"{path}: sampling {self.frames} frames at {self.fps:g} fps from its {source_fps:g} fps makes chunks "
                f"of {span:.3g} source frames"
            )
        self._chunk_length = chunk_length(self.frames, source_fps, self.fps)
        if self._chunk_length < 1:
            raise VideoError(f"{path}: {source_fps:g} fps (its container's average frame rate: a broken timestamp?) "
                             f"is too low to sample {self.frames} frames at {self.fps:g} fps by frame count "
                             "(upstream's chunks would hold no frame); a slide show is read with --sampling time "
                             "(sampling='time' in Python)")  # fmt: skip

    def _needs(self, order: np.ndarray, time_base: Fraction) -> np.ndarray:
        """needed[i]: whether the sampling uses frame i of a video whose frames have timestamps ``order``."""
        count = len(order)
        if self.sampling == "upstream":
            length = self._chunk_length
            needed = np.zeros(count, dtype=bool)
            needed[length - 1 :: length] = True  # each chunk's last frame (see _sample_indices)
            chunks = -(-count // length)
            for first in range(0, chunks, NEEDS_BLOCK):  # (a block of chunks at a time: bounded memory)
                picks = chunk_picks(np.arange(first, min(first + NEEDS_BLOCK, chunks)), self.frames, length).ravel()
                needed[picks[picks < count]] = True
            if self.tail == "drop" and count >= length:  # a last partial chunk is dropped: none of its frames
                needed[count // length * length :] = False
            return needed
        # _resample: frame i shows output frames _due(t_i) .. _due(t_(i+1)) - 1; the last always shows
        due = self._dues(order, time_base)
        return np.append(due[:-1] < due[1:], True)

    def _dues(self, order: np.ndarray, time_base: Fraction) -> np.ndarray:
        """due[i]: the first output frame that frame i shows (sampling "time"; :func:`_due`)."""
        if self._due_of is not None and self._due_of[0] is order and self._due_of[1] == time_base:
            return self._due_of[2]  # (asked for by needs, plan and the segment's needs)
        rate, slack = _clock(self.fps, time_base)
        first = int(order[0])
        dues = [_due(int(pts) - first, rate, slack) for pts in order]
        if dues and max(dues) > np.iinfo(np.int64).max:  # (2**61 s in whole seconds: broken), said as _resample says
            most = _most_held(self.fps)
            i = next((i for i in range(len(dues) - 1) if dues[i + 1] - dues[i] > most), len(dues) - 2)
            _too_long(self.path, (int(order[i]) - first) * time_base, dues[i + 1] - dues[i], self.fps)
        due = np.array(dues, dtype=np.int64)
        self._due_of = (order, time_base, due)
        return due

    def _segment(self) -> Segment | None:
        """The part of the file this reader reads: its ``segment``, the first one once it split the file, or None
        (all of it)."""
        return self.segment or self._own

    def _limit_is_short(self, stream: av.video.stream.VideoStream) -> bool:
        """Whether ``clips_per_video``'s clips span less than 1 / LIMITED_SHARE of the video's duration (as its
        container says; False where it does not say): then the file's index, which reads every byte of the file,
        would cost more than pruning saves on those clips, and the file is decoded from its start to them."""
        if self.clips_per_video is None:
            return False
        seconds = 0.0
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        elif stream.container.duration:
            seconds = stream.container.duration / av.time_base
        return self.clips_per_video * self.frames / self.fps * LIMITED_SHARE < seconds

    def _cut_before_the_end(self, index: StreamIndex | None, stream: av.video.stream.VideoStream) -> bool:
        """Whether ``clips_per_video`` ends the reading (sampling "time") before the file's last frame: a pruned
        decoder then stops at the frame after its clips, which is not the file's last (False where not pruned: the
        decoder reads on to the frame that ends the last one's showing)."""
        if self.clips_per_video is None or index is None:
            return False
        return int(self._dues(index.order, stream.time_base)[-1]) // self.frames >= self.clips_per_video

    def _end_clip(self) -> int | None:
        """The number in the file of the clip after the last this reader may give (its segment's end, or
        ``clips_per_video``, whichever comes first); None: to the file's end."""
        segment = self._segment()
        ends = [segment.first + segment.clips] if segment is not None and segment.clips is not None else []
        ends += [self.clips_per_video] if self.clips_per_video is not None else []
        return min(ends, default=None)

    def _segment_needs(self, order: np.ndarray, time_base: Fraction) -> np.ndarray:
        """:meth:`_needs` within this reader's segment and ``clips_per_video``."""
        needed, first, end = self._needs(order, time_base), self.first_clip, self._end_clip()  # (clips)
        if not first and end is None:
            return needed
        if self.sampling == "upstream":
            needed[: first * self._chunk_length] = False
            if end is not None:
                needed[end * self._chunk_length :] = False
            return needed
        due = self._dues(order, time_base)
        shown_until = np.append(due[1:], np.iinfo(np.int64).max)  # output frames [due, shown_until) show frame i
        needed &= shown_until > first * self.frames
        if end is not None:
            after = np.flatnonzero(due >= end * self.frames)
            needed &= due < end * self.frames
            if len(after):  # the frame after the segment's last: its time ends the last one's showing (a frame's
                needed[after[0]] = True  # own duration may be unknown, or another frame's gap)
        return needed

    def plan(self, split_into: int) -> list[Segment]:
        """The segments a reader splitting this file among ``split_into`` readers would cut it into (only the CPU
        decoder, pruning allowed, splits), [] where it would not; ``source_stamp`` is the file's as it was read. A
        file that cannot be opened raises its VideoError."""
        container, self.source_stamp = _open(self.path)
        with container:
            stream = video_stream(container)
            if stream is None or stream.codec_context is None:
                return []
            self.split_into = split_into
            split = self._split(stream)
            return split[1] if split is not None else []

    def _split(self, stream: av.video.stream.VideoStream) -> tuple[StreamIndex | None, list[Segment]] | None:
        """How this reader splits the file whose video ``stream`` it has open, the one rule for :meth:`plan` and
        for a reader splitting the file as it reads it: None where it does not (only the CPU decoder, pruning
        allowed, splits, nor a file whose clips_per_video are a small share of it: _limit_is_short); else the file's
        index (None where its pruning cannot be trusted) and its segments ([]: not split)."""
        if self.decoder != "cpu" or not self.prune or self._limit_is_short(stream):
            return None
        index = stream_index(self.path, split=True)
        return index, (self._plan(index, stream) if index is not None else [])

    def _plan(self, index: StreamIndex, stream: av.video.stream.VideoStream) -> list[Segment]:
        """The segments of the file (its ``index``, its CPU-decoded ``stream``), first to last: up to
        ``split_into`` of SEGMENT_CLIPS clips or more, each from a clean cut after the one before; [] where it is
        not split (too short, or no cut where one is needed). The same file and settings give the same ones."""
        if len(index.cuts) < 2:
            return []
        if self.sampling == "upstream":
            self._set_chunk_length(float(stream.average_rate or 0))  # (the CPU decoder's rate: see cpu_frames)
            clips = len(index.order) // self._chunk_length  # whole chunks

            def first(clip: int) -> int:  # a clip's first frame
                return clip * self._chunk_length
        else:
            order = index.order  # a gap of over a second: frames stamped ahead, maybe each alone (skipped where
            if len(order) > 1 and np.diff(order).max() * stream.time_base > 1:  # decoded: _resample), whose times
                return []  # would promise the parts clips the file has not; such a file is read whole
            due = self._dues(order, stream.time_base)
            clips = int(due[-1]) // self.frames  # output frames before the last frame's are there whatever its length

            def first(clip: int) -> int:  # the frame a clip shows first (asked of a few clips only: a broken stamp
                return int(np.searchsorted(due, clip * self.frames, side="right")) - 1  # may make billions)
        if self.clips_per_video is not None:  # (only those are read: the parts share them)
            clips = min(clips, self.clips_per_video)
        parts = min(self.split_into, clips // SEGMENT_CLIPS)
        bounds: list[tuple[int, int]] = [(0, 0)]  # (first clip, cut) of each segment
        for k in range(1, parts):
            clip = k * clips // parts
            at = int(np.searchsorted(index.cuts, first(clip), side="right")) - 1  # the last cut at or before it
            cut = int(index.cuts[at]) if at >= 0 else 0
            if cut > bounds[-1][1]:  # a cut of its own, after the last segment's
                bounds.append((clip, cut))
        if len(bounds) < 2:
            return []
        ends = [clip for clip, _ in bounds[1:]] + [None]
        return [Segment(clip, None if end is None else end - clip, cut, index.order, index.prunable)
                for (clip, cut), end in zip(bounds, ends, strict=True)]  # fmt: skip

    def _resized(self, rgb: Callable[[object], torch.Tensor], frame) -> torch.Tensor:
        """One decoded frame as upstream prepares it (the per-frame path): raw pixels [3, height, width] float32."""
        return self._resized_image(rgb(frame))

    def _resized_image(self, image: torch.Tensor) -> torch.Tensor:
        """[h, w, 3] uint8 RGB -> raw pixels [3, height, width] float32, as upstream prepares a frame; a copy of
        the crop, so that a clip's frames do not each hold their whole resized frame until they are stacked."""
        return clip_pixels(image[None], self.height, self.width)[:, 0].contiguous()

    def _surface(self, frame: NvdecFrame) -> torch.Tensor:
        """An NVDEC frame's NV12 surface, for :meth:`_clip` to convert with the clip's other frames."""
        self._nv12 = (frame.height, frame.matrix)
        return frame.nv12

    def _nv12_rgb(self, surfaces: torch.Tensor) -> torch.Tensor:
        """This file's NVDEC surfaces [T, rows * 3 / 2, w] as [T, h, w, 3] uint8 RGB, in one launch."""
        started = CLOCK.start()
        rgb = nv12_clip_rgb(surfaces, *self._nv12)
        CLOCK.stop("rgb", started)
        return rgb

    def _placed_alike(self, frames: Iterator[tuple[int, av.VideoFrame]]) -> Iterator[tuple[int, av.VideoFrame]]:
        """``frames`` (index, frame) of a file opened without FFmpeg's probe, whose placement was decided by its MP4
        sample entry's picture size (a probed opening's is the first frame's; the sizes are checked frame by frame
        either way): the first one checked to be placed alike, else PruneMismatch (opened again with the probe).
        An entry may give the coded size (1920x1088 for 1080 rows) and still be placed alike."""
        first = next(frames, None)
        if first is None:
            return
        frame = first[1]
        placed = placement(
            self.preprocess, self.device, frame.height, frame.width, self.height, self.width, self.frames
        )
        if placed != self.placement:
            size = f"{frame.width}x{frame.height}"
            raise PruneMismatch(f"the first frame ({size}) is placed {placed}, not {self.placement}")
        yield first
        yield from frames

    def _i420_or_rgb(self, turns: Callable[[object], int] | None, rgb: Callable, frame) -> torch.Tensor:
        """A decoded frame as I420 [h * 3 / 2, w] uint8 where the device's conversion gives its RGB bytes (its
        format and matrix are the file's, ``_i420``, see :func:`titok_fast.decoders.frame_i420_matrix`, and it is
        not turned); else ``rgb(frame)``. The file's are its first frame's where it was opened unprobed."""
        if self._i420 == MATRIX_OF_FIRST_FRAME:
            self._i420 = frame_i420_matrix(frame) or ""
        if not self._i420 or frame_i420_matrix(frame) != self._i420 or turns is not None and turns(frame):
            return rgb(frame)
        _check_frame_size(self.path, frame.width, frame.height, (self.height, self.width))
        started = CLOCK.start()
        image = i420_bytes(frame)
        CLOCK.stop("rgb", started)  # (the stage that hands frames over as the clip wants them)
        return image

    def _clip(self, images: list[torch.Tensor]) -> torch.Tensor | I420Clip:
        self.clips_read += 1
        if self._nv12 is not None and any(image.ndim == 2 for image in images):  # NVDEC's (not I420: CPU-decoded)
            if all(image.ndim == 2 and image.shape == images[0].shape for image in images):
                return self._holding(self._nv12_rgb(stack_here(images)))  # the clip's surfaces in one launch
            # the CPU decoder finished what NVDEC began (it failed midway): RGB frames on NVDEC's device
            device = next(image.device for image in images if image.ndim == 2)
            images = [self._nv12_rgb(image[None])[0] if image.ndim == 2 else image.to(device) for image in images]
        if self.placement == "device" and any(image.ndim == 2 for image in images):  # (I420 frames: _i420_or_rgb)
            if any(image.shape != images[0].shape for image in images):  # a clip of RGB and I420, or two sizes:
                # RGB, converted here (libswscale's bytes)
                images = [i420_rgb(I420Clip(image[None], self._i420))[0] if image.ndim == 2 else image
                          for image in images]  # fmt: skip
        if self.placement == "device" and any(image.shape != images[0].shape for image in images):
            images = [self._resized_image(image) for image in images]  # as "cpu" does
        elif self.placement == "device":  # [T, h, w, 3] uint8 (or I420), resized by the consumer (DevicePreprocessor)
            if self.pin_memory and images[0].device.type == "cpu":
                pinned = torch.empty((len(images), *images[0].shape), dtype=torch.uint8, pin_memory=True)
                clip = stack_here(images, out=pinned)
            else:
                out = self.clip_out((len(images), *images[0].shape)) if self.clip_out is not None else None
                clip = stack_here(images, out=out)
            return self._holding(I420Clip(clip, self._i420) if clip.ndim == 3 else clip)
        self.drop_reservation()  # a small clip now
        clip = stack_here(images, dim=1)
        if self.raw:
            return clip
        started = CLOCK.start()
        clip = normalize_pixels(clip, self.dtype)  # (here: where it was decoded, beside the model's thread)
        CLOCK.stop("resize", started)
        return clip

    def _holding(self, clip: torch.Tensor | I420Clip) -> torch.Tensor | I420Clip:
        """``clip``, whose reserved bytes are now ``handed``: its feed gives them back when the consumer takes it."""
        self.handed, self._reservation = self._reservation, None
        return clip

    @property
    def first_clip(self) -> int:
        """The number in the file of the first clip this reader gives (its segment's first; 0: the file's)."""
        return segment.first if (segment := self._segment()) is not None else 0

    @property
    def chunk_length(self) -> int:
        """Source frames per chunk with upstream's sampling, int(T x source fps / fps); 0 before the source's rate is
        known."""
        return self._chunk_length

    @property
    def chunk_seconds(self) -> float | None:
        """The source time one clip spans (upstream's sampling: its int(T x source fps / fps) source frames); None
        before the source's rate is known."""
        if self.sampling != "upstream":
            return self.frames / self.fps
        return self._chunk_length / self.source_fps if self._chunk_length and self.source_fps > 0 else None

    def start_times(self) -> list[float]:
        """Start of each clip read so far, seconds after the first video frame (a segment's clips from its first);
        with upstream's sampling, which counts frames, its first frame's number over the average frame rate (its
        time where the rate is constant)."""
        first = self.first_clip
        if self.sampling == "upstream":
            return [i * self._chunk_length / self.source_fps for i in range(first, first + self.clips_read)]
        return [i * self.frames / self.fps for i in range(first, first + self.clips_read)]

    def clip_set(self, clips: list[torch.Tensor]) -> ClipSet:
        """The ClipSet of these clips (all this reader's clips, read to the end)."""
        return ClipSet(
            path=self.path,
            clips=clips,
            start_times=self.start_times(),
            source_fps=self.source_fps,
            fps=self.fps,
            frames_per_clip=self.frames,
            last_clip_frames=self.last_clip_frames,
            tail=self.tail,
        )


def stack_here(images: list[torch.Tensor], dim: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.stack(images, dim, out=out)``, the same bytes; on the CPU as one copy on the calling thread (NumPy's,
    without the GIL). Decoding workers stack their clips: torch's copy would hand each one to an OpenMP team of
    its own, one thread per core, for every worker at once, and with every core already decoding, a team's
    barrier waits on threads that are not running (RESULTS.md, "Stacking a clip on the decoding thread")."""
    if images[0].device.type != "cpu":
        return torch.stack(images, dim, out=out)
    arrays = [image.numpy() for image in images]
    if out is None:
        return torch.from_numpy(np.stack(arrays, axis=dim))
    np.stack(arrays, axis=dim, out=out.numpy())
    return out


def _side_data(frame: av.VideoFrame) -> Iterator[object]:
    """The frame's side data entries: iterating ``frame.side_data`` gives them in PyAV 18, their types (the
    mapping's keys) in PyAV 19."""
    for item in frame.side_data:
        yield item if hasattr(item, "type") else frame.side_data[item]


def display_turns(path: str, frame: av.VideoFrame) -> int:
    """Counterclockwise quarter turns that show ``frame`` as its display matrix says (0 without one), as FFmpeg's
    own autorotation takes the matrix: its rotation angle (``av_display_rotation_get``: counterclockwise, from the
    matrix's first column and row), rounded to whole degrees, is a multiple of 90. A matrix that mirrors the
    picture, or turns it by another angle (FFmpeg would rotate it freely), is a VideoError."""
    matrix = next((d for d in _side_data(frame) if str(d.type).endswith("DISPLAYMATRIX")), None)
    if matrix is None:
        return 0
    data = bytes(matrix)  # 3x3 int32, as FFmpeg checks it on reading; a stranger's file may say otherwise
    m = np.frombuffer(data, dtype=np.int32).astype(np.int64) if len(data) == 36 else np.zeros(9, np.int64)
    det = m[0] * m[4] - m[1] * m[3]  # negative: a mirror; zero: no picture (or not 3x3)
    if det <= 0:
        what = "mirrors the picture" if det < 0 else "is degenerate"
        raise VideoError(
            f"{path}: its display matrix {m.tolist()} {what}; read it with --rotation stored (rotation='stored' in "
            "Python)"
        )
    angle = -math.degrees(math.atan2(m[1] / math.hypot(m[1], m[4]), m[0] / math.hypot(m[0], m[3])))
    if round(angle) % 90:
        raise VideoError(
            f"{path}: its display matrix turns the picture by {angle:.1f} degrees, not a quarter turn; read it "
            "with --rotation stored (rotation='stored' in Python)"
        )
    return round(angle) // 90 % 4


def first_frame_turns(path: str) -> int:
    """:func:`display_turns` of the video's first frame (decoded on the CPU; 0 if it has none)."""
    with _open(path)[0] as container:
        try:
            stream = video_stream(container)
            frame = None if stream is None else next(container.decode(stream), None)
        except av.FFmpegError as exc:
            raise VideoError(f"{path}: decoding failed ({exc})") from exc
    return 0 if frame is None else display_turns(path, frame)


def _turned(rgb: Callable[[object], torch.Tensor], turns: Callable[[object], int], frame) -> torch.Tensor:
    """``rgb(frame)`` ([h, w, 3] uint8) turned ``turns(frame)`` quarter turns counterclockwise."""
    image = rgb(frame)
    k = turns(frame)
    if not k:
        return image
    started = CLOCK.start()  # counted with the conversion to RGB
    image = torch.rot90(image, k, dims=(0, 1)).contiguous()
    CLOCK.stop("rgb", started)
    return image


def read_clips(path: str | os.PathLike[str], **kwargs) -> ClipSet:
    """A whole video's clips at once: :class:`ClipReader` ``(path, **kwargs)`` read to the end (every clip is held
    in memory; iterate a ClipReader, or use :func:`stream_videos`, for one clip at a time)."""
    reader = ClipReader(path, **kwargs)
    return reader.clip_set(list(reader))


class ClipFeed:
    """The clips of one video as a worker thread decodes them, through a queue of at most ``capacity`` clips.

    Iterate it (once) for the clips in order; a failure on the file is raised as its VideoError, after the clips
    that came before it. ``reader`` (a :class:`ClipReader`) holds the file's metadata once iteration has ended.
    With ``stall_seconds``, waiting that long for one clip gives up on the file: a VideoError, the feed closed and
    ``stalled`` set. Either way ``on_stall(worker)`` is called: the thread decoding the file, which may be stuck
    for good, or None when no thread has come to it at all (they are all stuck elsewhere; the feed then waits
    on); ``stream_videos`` starts another thread. Feeds of worker processes leave ``stall_seconds`` None: their
    process is timed where it is served, without its start-up (``_DecoderProcess``).

    When the reader splits its file (:class:`Segment`), :meth:`split` makes a feed for each other segment, its
    ``followers``, queued for other workers through ``submit``; :meth:`poll` takes the clips of all of them as
    they come, each with its number in the file, and their workers' stalls and failures as the file's.
    """

    def __init__(self, reader: ClipReader, capacity: int, stall_seconds: float | None = None, on_stall=None):
        self.reader = reader
        self.stall_seconds, self.on_stall = stall_seconds, on_stall
        self.stalled = False
        self.worker: threading.Thread | None = None  # the thread decoding it, once one has started
        self._started = 0.0  # when it started (time.monotonic())
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)
        self._closed = threading.Event()
        self._waiting_since: float | None = None  # when the consumer began waiting for the next item
        self.on_ready: Callable[[], None] | None = None  # called after each item the worker puts (FeedInterleaver)
        self.followers: list[ClipFeed] = []  # the file's other segments, in order, once the reader split it
        self.submit: Callable[[ClipFeed, int], None] | None = None  # queue follower k (from 1) for a worker
        self._taken = 0  # clips the consumer took (with poll)
        self._ended = False  # its end taken (with poll)
        self.read_through = False  # its worker has queued its last item (its end or error)
        self._queued_bytes: deque[tuple[torch.Tensor, _Reservation]] = deque()  # source-size clips queued (HeldBytes)

    def close(self) -> None:
        """Stop decoding: the worker gives up at its next clip (the consumer has moved on or gone); what it queued
        is dropped, and the bytes reserved for the clip it gathers are given back now (a worker stuck in a read may
        never come back)."""
        self._closed.set()
        self.reader.drop_reservation()
        with contextlib.suppress(queue.Empty):  # what was queued is dropped now, not when the feed is
            while True:
                self._queue.get_nowait()
        while self._queued_bytes:
            self._queued_bytes.popleft()[1].release()
        for follower in self.followers:
            follower.close()

    def split(self, segments: list[Segment]) -> None:
        """The reader keeps the first segment of its file: a follower feed for each of these, queued through
        ``submit``. Called by the worker before the feed's first clip."""
        followers = []
        for segment in segments:
            reader = copy.copy(self.reader)
            reader.segment, reader.split_into, reader.on_split = segment, 1, None
            reader._reservation = reader.handed = None
            reader._reset()
            follower = ClipFeed(reader, self._queue.maxsize, self.stall_seconds, self.on_stall)
            reader.stop, reader.nothing_queued = follower._closed, follower._queue.empty
            follower.on_ready = _weakly(self._notify)  # (held strongly, it made a cycle with self.followers)
            followers.append(follower)
        self.followers = followers
        if self._closed.is_set():  # closed meanwhile: none is decoded
            self.close()
            return
        for number, follower in enumerate(followers, 1):
            self.submit(follower, number)

    def _notify(self) -> None:
        """An item was put (in this feed or a follower): tell the consumer, if it asked."""
        if self.on_ready is not None:
            self.on_ready()

    def _parts(self) -> tuple[ClipFeed, ...]:
        """This feed and its followers: the file's parts, in order."""
        return (self, *self.followers)

    @property
    def path(self) -> str:
        return self.reader.path

    def _produce(self) -> None:
        """Worker side: decode the file into the queue; any failure becomes this file's VideoError."""
        if self._closed.is_set():
            return
        self.worker, self._started = threading.current_thread(), time.monotonic()
        try:
            for clip in self.reader:
                reservation, self.reader.handed = self.reader.handed, None
                with CLOCK.waiting("taken"):  # (for room in the queue)
                    if not self._put_clip(clip, reservation):
                        return
            self._put(("end", None))
        except VideoError as exc:
            self._put(("error", exc))
        except Exception as exc:  # an unforeseen failure on one file must not stop the others
            error = VideoError(unforeseen(self.path, exc))
            error.__cause__ = exc
            self._put(("error", error))

    def _put_clip(self, clip: torch.Tensor, reservation: _Reservation | None) -> bool:
        """Queue a clip with the bytes reserved for it, given back when the consumer takes it (or the feed closes)."""
        if reservation is not None:
            self._queued_bytes.append((clip, reservation))
        if self._put(("clip", clip)):
            return True
        if reservation is not None:
            reservation.release()
        return False

    def _took(self, item: tuple) -> tuple:
        """``item``, taken off the queue by the consumer: a clip's reserved bytes are given back."""
        if item[0] == "clip" and self._queued_bytes and self._queued_bytes[0][0] is item[1]:  # (one reserved for)
            self._queued_bytes.popleft()[1].release()
        return item

    def _put(self, item: tuple) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.05)
            except queue.Full:
                continue
            self.read_through = self.read_through or item[0] != "clip"
            self._notify()
            return True
        return False

    def queued_whole(self) -> bool:
        """Whether every part of the file has been read through: all that is left of it is queued."""
        return all(part.read_through for part in self._parts())

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.clips()

    def clips(self, idle_seconds: float | None = None) -> Iterator[torch.Tensor | None]:
        """The clips, as iterating the feed gives them; with ``idle_seconds``, also None each time that long passes
        with no clip, so that the consumer can use the wait (the wait goes on after: the stall limit counts from
        its start)."""
        while True:
            kind, value = self._take(idle_seconds)
            if kind == "clip":
                yield value
            elif kind == "idle":
                yield None
            elif kind == "end":
                return
            else:
                raise value

    def _take(self, idle_seconds: float | None = None) -> tuple[str, object]:
        """The worker's next item, or ("idle", None) after ``idle_seconds`` of this call's wait; with
        ``stall_seconds``, the stall limit applies to the whole wait for the item (see above)."""
        if self.followers:
            raise RuntimeError(f"{self.path}: the file was split; its clips are taken with poll()")
        called = time.monotonic()
        if self._waiting_since is None:  # the consumer's own time between clips is not the decoder's
            self._waiting_since = called
        while True:
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
            else:
                self._waiting_since = None
                return self._took(item)
            if self._closed.is_set():
                raise RuntimeError(f"{self.path}: this feed was closed (the stream moved past it)")
            now = time.monotonic()
            if idle_seconds is not None and now - called >= idle_seconds:
                return "idle", None
            if not self._over_stall_limit(now):
                continue
            worker = self.worker
            if worker is None:  # not this file's fault: a thread is added for it
                if self.on_stall is not None:
                    self.on_stall(None)
                self._waiting_since = time.monotonic()
                continue
            raise self._give_up(worker)

    def poll(self) -> tuple[str, object] | None:
        """The next item if one is ready now, else None: ("clip", (its number in the file, clip)), ("end", None)
        or ("error", VideoError). A split file's parts are taken at once, the clips of each in order, and it ends
        when every part has. A part whose thread has given nothing for ``stall_seconds`` since the consumer found
        it empty (or since the thread came to it) is given up as in :meth:`clips`: the file's error item, the feed
        closed and ``stalled`` set. A part no thread has come to yet is not timed here (see
        :class:`FeedInterleaver`)."""
        now = None
        for part in self._parts():
            if part._ended:
                continue
            try:
                kind, value = part._took(part._queue.get_nowait())
            except queue.Empty:
                now = now or time.monotonic()
                if part._waiting_since is None:
                    part._waiting_since = now
                if part.worker is not None and part._over_stall_limit(now):
                    return "error", self._give_up(part.worker)
                continue
            part._waiting_since = None
            if kind == "clip":
                part._taken += 1
                return kind, (part.reader.first_clip + part._taken - 1, value)
            if kind == "error":
                self.stalled = self.stalled or part.stalled
                return kind, value
            part._ended = True
            if all(other._ended for other in self._parts()):
                return self._ended_reading()
        return None

    def unserved(self) -> bool:
        """Whether a part of the file that has not ended has no thread yet."""
        return any(part.worker is None and not part._ended for part in self._parts())

    def _ended_reading(self) -> tuple[str, object]:
        """The file's end, with its parts' reading put together in its reader."""
        reader, parts = self.reader, [follower.reader for follower in self.followers]
        if any(part.source_stamp != reader.source_stamp for part in parts):
            return "error", VideoError(f"{self.path}: changed while it was read (its size or modification time)")
        if parts:
            reader.clips_read += sum(part.clips_read for part in parts)
            reader.last_clip_frames = parts[-1].last_clip_frames
            reader.pruned = reader.pruned and all(part.pruned for part in parts)
        return "end", None

    def _over_stall_limit(self, now: float) -> bool:
        """Whether the consumer has waited ``stall_seconds`` for the next item, counted from when its thread came
        to the file if that was later."""
        return self.stall_seconds is not None and now - max(self._waiting_since, self._started) >= self.stall_seconds

    def _give_up(self, worker: threading.Thread) -> VideoError:
        """The file stalled in ``worker``: the thread is replaced (``on_stall``), the feed closed and marked
        ``stalled``; returns the file's error."""
        if self.on_stall is not None:
            self.on_stall(worker)
        self.stalled = True
        self.close()
        return stall_error(self.path, self.stall_seconds)


class FeedInterleaver:
    """The clips of many files, taken from whichever held file has one ready (a file read through first, so that it
    ends and its worker takes the next file; then the oldest), so that every decoding worker keeps decoding.
    Taking the files one at a time, in order, leaves all workers but the one decoding the file being taken waiting
    on full queues as soon as files are longer than their read-ahead (``capacity`` clips): with long videos,
    decoding would not scale with workers at all (benchmarks/RESULTS.md).

    Iterating gives ``(number, kind, value)`` events, ``number`` being the file's place in the stream:
    ``"open"`` (value: ``(path, feed)``) before any other event of that file; ``"clip"`` (value: ``(its number in
    the file, clip)``: a file's clips in order, but for a file split across workers, whose parts come at once,
    each in order); ``"end"`` (every clip of the file has come); ``"error"`` (value: its VideoError, after the clips
    before it); and ``(-1, "idle", None)`` each time ``idle_seconds`` pass with no clip. At most ``hold`` files are
    held at once, from "open" to their "end", "error" or :meth:`drop`, and opened in the stream's order as others
    end. ``feeds`` is :func:`stream_videos` with ``close_each=False``, of ``files`` files: it is not asked past the
    last one (a stream that ends closes every feed it gave).

    When this waits for the stall limit (its own waits since the last item, not the consumer's time) while the
    oldest held file has no thread (the threads are all stuck in files given up), a thread is added for that file,
    as :class:`ClipFeed` does. The stream of feeds is closed with the last file's end, or by :meth:`close`.
    """

    def __init__(self, feeds: Iterator[tuple[str | os.PathLike[str], ClipFeed]], files: int, hold: int,
                 idle_seconds: float | None = None):  # fmt: skip
        if hold < 1:
            raise ValueError(f"hold must be >= 1; got {hold}")
        self.files, self.hold, self.idle_seconds = files, hold, idle_seconds
        self._feeds = feeds
        self._held: dict[int, ClipFeed] = {}  # in the stream's order
        self._opened = 0
        self._ready = threading.Event()  # set by the workers after each item they put

    def drop(self, number: int) -> None:
        """Stop taking the file's clips (it failed elsewhere): its worker gives up at its next clip."""
        feed = self._held.pop(number, None)
        if feed is not None:
            feed.close()

    def close(self) -> None:
        """Close every file held (what was not taken is dropped), then the stream of feeds."""
        for feed in self._held.values():
            feed.close()
        self._held.clear()
        if (close := getattr(self._feeds, "close", None)) is not None:
            close()

    def __iter__(self) -> Iterator[tuple[int, str, object]]:
        try:
            yield from self._events()
        finally:  # the end, an error, or the consumer gone
            self.close()

    def _events(self) -> Iterator[tuple[int, str, object]]:
        last_idle = time.monotonic()
        quiet = 0.0  # seconds spent here waiting since the last item (the consumer's own time is not counted)
        while True:
            while len(self._held) < self.hold and self._opened < self.files:
                path, feed = next(self._feeds)
                number, self._opened = self._opened, self._opened + 1
                feed.on_ready = self._ready.set
                self._held[number] = feed
                self._ready.set()  # its first items may have come before the hook was set
                yield number, "open", (path, feed)
            if not self._held:
                return
            self._ready.clear()
            event = self._next_ready()
            now = time.monotonic()
            if event is not None:
                last_idle, quiet = now, 0.0
                yield event
                continue
            if self.idle_seconds is not None and now - last_idle >= self.idle_seconds:
                last_idle = now
                yield -1, "idle", None
                continue
            oldest = next(iter(self._held.values()))
            if oldest.unserved() and oldest.stall_seconds is not None and quiet >= oldest.stall_seconds:
                if oldest.on_stall is not None:
                    oldest.on_stall(None)  # every thread is stuck elsewhere: one more for this file
                quiet = 0.0
            self._ready.wait(0.05)
            quiet += time.monotonic() - now

    def _next_ready(self) -> tuple[int, str, object] | None:
        """The next item of the oldest held file read through (all that is left of it queued), else of the oldest
        held file with one ready, if any; a file that ends or fails is no longer held. Taking the files read
        through first, their token files are written as soon as they can be: taken oldest first, a long file whose
        clips come faster than the model takes them (any file, on a CPU) held back every file behind it, read long
        before, and their workers, which had nothing more to read."""
        for number, feed in sorted(self._held.items(), key=lambda held: not held[1].queued_whole()):  # (stable)
            item = feed.poll()
            if item is None:
                continue
            kind, value = item
            if kind != "clip":
                del self._held[number]
                feed.close()  # ended: nothing more comes (and the stream lets go of it)
            return number, kind, value
        return None


def interleaved_videos(
    paths: Iterable[str | os.PathLike[str]], *, workers: int, idle_seconds: float | None = None, **stream_kwargs
) -> FeedInterleaver:
    """:func:`stream_videos` (``stream_kwargs``: its arguments but ``prefetch``) taken by a :class:`FeedInterleaver`:
    ``workers + 1`` files held and ``workers - 1`` read ahead, ``2 * workers`` open, as taking them in order with
    ``prefetch=2 * workers`` had. It closes itself once every file has ended; close it (``contextlib.closing``) to
    stop early."""
    paths = list(paths)
    feeds = stream_videos(paths, workers=workers, prefetch=workers, close_each=False, **stream_kwargs)
    return FeedInterleaver(feeds, len(paths), hold=workers + 1, idle_seconds=idle_seconds)


def stall_error(path: str, seconds: float) -> VideoError:
    return VideoError(
        f"{path}: no clip decoded for {seconds:g} s; given up (a read that hangs, or a file the decoder cannot get "
        "through)"
    )


def watched_clips(reader: ClipReader, stall_seconds: float | None = STALL_SECONDS) -> Iterator[torch.Tensor]:
    """``reader``'s clips, decoded in a thread of their own so that a file that stalls (see ClipFeed) is given up
    after ``stall_seconds`` with a VideoError; the stuck thread is left behind (a daemon: it holds no lock)."""
    feed = ClipFeed(reader, 1, stall_seconds)
    threading.Thread(target=feed._produce, daemon=True).start()
    try:
        yield from feed
    finally:
        feed.close()


def worker_kind_for(workers: int, decoder: str = "cpu", frame_pixels: int | None = None) -> str:
    """What worker kind "auto" means for ``workers`` decoding workers, ``decoder`` and sources of ``frame_pixels``
    pixels a frame (None: not known): threads for NVDEC (its frames stay on the GPU, which a process cannot hand
    over), below PROCESS_WORKERS_FROM workers and for frames larger than PROCESS_FRAME_PIXELS; processes
    otherwise. A decoding thread holds the GIL for part of each frame's work (Python, PyAV's and torch's glue: an
    eighth of a 456x256 H.264 clip's CPU time, 5% of a 720p one's), as does the thread feeding the model, so
    threads reading small sources stop scaling at a few cores, whatever the machine has. A process has a GIL of
    its own but costs a start (importing torch, about 2.5 CPU-seconds) and the hand-over of each clip through
    shared memory (three tenths more CPU per clip at 456x256 and at 720p alike, as measured before a process
    reused its segments: _Segments), which large frames, whose threads scale, do not repay
    (benchmarks/RESULTS.md, "Decoding threads and the GIL")."""
    if decoder == "nvdec" or workers < PROCESS_WORKERS_FROM:
        return "thread"
    return "thread" if frame_pixels is not None and frame_pixels > PROCESS_FRAME_PIXELS else "process"


PROBE_SECONDS = 10.0  # "auto" waits this long for the first file's frame size, then decides without it


def auto_worker_kind(workers: int, decoder: str, paths: Iterable[str | os.PathLike[str]]) -> str:
    """:func:`worker_kind_for` for reading ``paths``, with the frame size of the first of them (where ``paths``
    is a sequence and the number of workers makes it matter; see :func:`frame_pixels`)."""
    kind = worker_kind_for(workers, decoder)  # (threads whatever the size: no file is opened to ask)
    if kind == "thread" or not isinstance(paths, Sequence) or not paths:
        return kind
    return worker_kind_for(workers, decoder, frame_pixels(paths[0]))


def frame_pixels(path: str | os.PathLike[str], seconds: float = PROBE_SECONDS) -> int | None:
    """Width x height of the video of ``path`` as its header says; None where there is none to tell (not a
    regular file, no video stream, a file FFmpeg cannot open) or its header has not been read in ``seconds``.

    Read on a thread of its own (a daemon, left behind if the read hangs), which the caller waits for: a hung
    read (a stuck network file system) does not hang the run before it starts, and an interrupt (Ctrl-C, a
    scheduler's SIGTERM) reaches the caller instead of being taken by FFmpeg's open, which its callback ends
    and PyAV raises as an error of the file."""
    found: list[int | None] = []

    def read() -> None:
        try:
            container, _ = _open(os.fspath(path))
            with container:
                stream = video_stream(container)
                context = stream.codec_context if stream is not None else None
                found.append(context.width * context.height if context is not None and context.width else None)
        except (VideoError, av.FFmpegError, OSError, ValueError):
            found.append(None)

    reader = threading.Thread(target=read, name="titok-frame-size", daemon=True)
    reader.start()
    reader.join(seconds)
    return found[0] if found else None


def default_workers() -> int:
    """Decoding workers by default: one per CPU core this process may run on."""
    count = getattr(os, "process_cpu_count", None)  # Python 3.13+
    if count is not None:
        return count() or 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def source_size_bytes() -> int:
    """The default bound on the bytes of source-size clips a stream's workers read ahead (see :class:`HeldBytes`):
    SOURCE_SIZE_BYTES, or an eighth of the machine's memory where that is less."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not known here
        return SOURCE_SIZE_BYTES
    return max(1, min(SOURCE_SIZE_BYTES, memory // 8))


# Clips kept at source size for preprocessing on the device are large (a 20-frame clip of 1080p is 124 MB, of 4K
# 498 MB), and every decoding worker reads ahead: 16 workers on 4K sources could hold some 40 GB of them (much of it
# pinned). 4 GiB is dozens of 720p or 1080p clips, far more than the model waits for.
SOURCE_SIZE_BYTES = 4 << 30


class _Reservation:
    """Bytes reserved in a :class:`HeldBytes`; :meth:`release` gives them back, once whoever calls it."""

    def __init__(self, held: HeldBytes, nbytes: int):
        self.held, self.nbytes = held, nbytes

    def release(self) -> None:
        with self.held._changed:
            if self.nbytes:
                self.held.bytes -= self.nbytes
                self.nbytes = 0
                self.held._changed.notify_all()


class HeldBytes:
    """A bound on the bytes of source-size clips that the decoding workers of one stream have read ahead: being
    gathered, or queued and not yet taken by the consumer (what the consumer takes is its own).

    A worker reserves a clip's bytes at its first frame and waits while they would pass ``limit``, in the order
    the workers asked, unless its own feed has nothing queued: then it goes on at once, so the consumer never waits
    for a file whose worker waits for room that clips of other files hold (a consumer taking the files in order
    would wait for ever). So at most ``limit`` bytes, and beyond them one clip per feed with nothing else queued.
    The bytes come back when the consumer takes the clip, or its feed is closed. A worker process asks its serving
    thread for the room at its clip's first frame and waits for the answer (:class:`_RoomOfRun`): its clips are
    counted as a thread's are, from their first frame, not from when they come back."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"limit must be >= 1 byte; got {limit}")
        self.limit, self.bytes, self.most = limit, 0, 0  # most: the most held at once
        self._changed = threading.Condition()
        self._waiting: deque[object] = deque()

    def reserve(
        self, nbytes: int, stop: threading.Event | None = None, alone: Callable[[], bool] | None = None
    ) -> _Reservation:
        """Wait until ``nbytes`` fit, or ``alone()`` (the feed has nothing queued), or ``stop`` is set: then the
        clip is not wanted and nothing is reserved (its feed, closed, may never hear of it again: a read that
        hangs)."""
        turn = object()
        with self._changed:
            self._waiting.append(turn)
            try:
                while not (
                    (self._waiting[0] is turn and self.bytes + nbytes <= self.limit)
                    or (alone is not None and alone())
                    or (stop is not None and stop.is_set())
                ):
                    self._changed.wait(0.05)  # (the consumer's takes and stops are seen within this)
            finally:
                self._waiting.remove(turn)
                self._changed.notify_all()
            if stop is not None and stop.is_set():
                return _Reservation(self, 0)
            self.bytes += nbytes
            self.most = max(self.most, self.bytes)
        return _Reservation(self, nbytes)


def _weakly(method: Callable) -> Callable:
    """Bound ``method``, called through a weak reference to its object (a call once the object is gone does
    nothing): a reader's callback into its feed. Held strongly, it made the feed and its reader a reference cycle,
    freed only by the cycle collector's full passes, which come rarely in a long job: finished readers, each with
    its file's index (8 bytes a frame), piled up in between (about one for every four files here)."""
    ref = weakref.WeakMethod(method)

    def call(*args):
        bound = ref()
        return None if bound is None else bound(*args)

    return call


def stream_videos(
    paths: Iterable[str | os.PathLike[str]],
    *,
    workers: int,
    prefetch: int,
    capacity: int = 8,
    worker_kind: str = "thread",
    stall_seconds: float | None = None,
    close_each: bool = True,
    held: HeldBytes | None = None,
    on_start: Callable[[int], None] | None = None,
    **read_kwargs,
) -> Iterator[tuple[str | os.PathLike[str], ClipFeed]]:
    """Read many videos with `workers` threads or processes (``worker_kind``; "auto": :func:`worker_kind_for`),
    ahead of the consumer; yield (path, ClipFeed) in order.

    At most `prefetch` files are open at a time, the one the consumer takes and those read ahead, each holding at
    most `capacity` decoded clips that the consumer has not taken, so memory stays bounded whatever the videos'
    lengths; clips kept at source size (placement "device") read ahead are also bounded in bytes across all files
    by ``held`` (:class:`HeldBytes`; default :func:`source_size_bytes`). Asking for the next feed closes the
    previous one (what was not taken of it is dropped); with
    ``close_each=False`` the consumer holds the feeds it was given until it closes them (as
    :class:`FeedInterleaver` does), and `prefetch` - 1 more are read ahead; closing the stream closes them all.
    With ``close_each=False`` the consumer takes the clips with :meth:`ClipFeed.poll`, and where ``paths`` has a
    length, a long video may be split into segments decoded at once (:class:`Segment`; each holds at most
    `capacity` clips too), the segments of a file taken by the workers before any later file: into up to
    ``ceil(workers / files left)`` (itself and those after it), so that files split only where there are fewer
    of them left than workers (a run of a few long videos, or the last files of a run), where a worker would
    otherwise have none; a run of many files keeps each whole, as splitting one costs a little. `read_kwargs` go to
    :class:`ClipReader`; bad ones raise here. Worker processes (forked from a server that has imported this module:
    :func:`start_process_server`) decode where the GIL or
    per-frame Python work would stop threads from scaling; their clips come back through shared memory, their
    failures (a crash included) are the failing file's VideoError alone, and a crashed worker is replaced.
    With ``stall_seconds``, a file that gives no clip for that long fails alone (see :class:`ClipFeed`) and the
    worker stuck in it is replaced: a process is killed and started again, a thread is left to its fate (a daemon)
    and another one started. Workers start as files come, each where a file waits and none is free, up to
    ``workers``; ``on_start`` is told how many have started, each time one does.
    """
    if workers < 1 or prefetch < 1 or capacity < 1:
        raise ValueError(f"workers, prefetch and capacity must be >= 1; got {workers}, {prefetch} and {capacity}")
    if worker_kind not in WORKER_KINDS:
        raise ValueError(f"worker_kind must be one of {WORKER_KINDS}; got {worker_kind!r}")
    decoder = ClipReader("", **read_kwargs).decoder  # bad arguments raise here
    if decoder == "nvdec" and worker_kind == "process":
        raise ValueError("decoder 'nvdec' leaves frames on the GPU: decode with worker_kind='thread'")
    worker_kind = auto_worker_kind(workers, decoder, paths) if worker_kind == "auto" else worker_kind
    files = len(paths) if isinstance(paths, Sized) else None
    remaining = enumerate(paths)
    pending: deque[tuple[str | os.PathLike[str], ClipFeed]] = deque()
    current: ClipFeed | None = None
    # daemon threads: a stream abandoned without being closed must not keep the process from exiting
    threads_decode = worker_kind == "thread"
    held = held or HeldBytes(source_size_bytes())
    abandoned: list[threading.Thread] = []
    threads: list[threading.Thread] = []
    stopping = threading.Event()  # set once the stream closes: workers give up their file, none is started again
    if not threads_decode:
        _allow_open_files()
        remove_orphaned_shared_memory()  # what an earlier run's killed workers left
        piped = threading.Lock()  # taken, for good, by the run's notice that clips come through the pipes
    pool = threading.Lock()

    def grow() -> None:
        """A feed waits and no worker is free: one more starts, up to ``workers`` (they start as files come, so a
        run of 8 short files with --workers 200 starts 8, where it started 200 processes: 38 s for 1000)."""
        with pool:
            if len(threads) >= workers or stopping.is_set():
                return
            if threads_decode:
                thread = threading.Thread(target=_decode_feeds, args=(tasks, abandoned), daemon=True)
            else:
                decoder = _DecoderProcess(read_kwargs, stall_seconds, stopping, held, piped)
                thread = threading.Thread(target=decoder.serve, args=(tasks,), daemon=True)
            threads.append(thread)
            thread.start()
            if on_start is not None:
                on_start(len(threads))

    tasks = _Tasks(grow)
    feed_stall = stall_seconds if threads_decode else None  # a process is timed where it is served

    def replace(worker: threading.Thread | None) -> None:
        """A feed waited ``stall_seconds`` for ``worker`` (stuck, maybe for good: if its read ever comes back, it
        takes no more files), or for any thread to come (None): another thread joins the pool."""
        with pool:
            if worker in threads:
                threads.remove(worker)
                abandoned.append(worker)
            threads.append(threading.Thread(target=_decode_feeds, args=(tasks, abandoned), daemon=True))
            threads[-1].start()

    given: list[ClipFeed] = []  # with close_each=False: the feeds handed out, closed when the stream closes
    server = contextlib.nullcontext() if threads_decode else process_server_stopped_after()  # (a library call's
    server.__enter__()  # own server ends with its stream)
    try:
        while True:
            if current is not None and close_each:
                current.close()  # its worker, if still decoding, frees its thread for the files ahead
            for number, path in remaining:
                feed = ClipFeed(ClipReader(path, **read_kwargs), capacity, feed_stall, replace)
                # threads stack source-size clips straight into pinned memory, ready for a CUDA device's upload; a
                # process's are copied there as they come (_DecoderProcess)
                feed.reader.pin_memory = read_kwargs.get("device") == "cuda"
                if threads_decode:  # (a process's clips are held to it as they come: _DecoderProcess)
                    reader = feed.reader
                    reader.held, reader.stop, reader.nothing_queued = held, feed._closed, feed._queue.empty
                if not close_each and files is not None:  # clips taken as they come: files may be split
                    feed.reader.split_into = -(-workers // (files - number))  # (see above)
                    feed.submit = functools.partial(_submit, tasks, number)
                    if threads_decode:  # (a process sends its segments: _DecoderProcess)
                        feed.reader.on_split = _weakly(feed.split)
                tasks.put(feed, (number, 0))  # taken in order, so the feed consumed now always has a worker
                pending.append((path, feed))
                if len(pending) >= prefetch:
                    break
            if not pending:
                return
            path, current = pending.popleft()
            if not close_each:
                given = [feed for feed in given if not feed._closed.is_set()]
                given.append(current)
            yield path, current
    finally:
        try:
            with pool:  # (no worker starts after this)
                stopping.set()
            for feed in [current, *given, *(f for _, f in pending)]:
                if feed is not None:
                    feed.close()  # workers blocked on a full queue give up, feeds not started are skipped
            for _ in [*threads, *abandoned]:  # an abandoned thread back in time to wait for a file stops too
                tasks.put(None)
            if not sys.is_finalizing():  # a stream dropped at exit: its daemon threads die with the process
                # each ends its clip; one still in a file after SHUTDOWN_SECONDS is taken as stuck (a hung read):
                # it is a daemon, and an interrupted run must not wait the stall limit for it (a scheduler kills it
                # first)
                deadline = time.monotonic() + min(stall_seconds or SHUTDOWN_SECONDS, SHUTDOWN_SECONDS)
                for thread in threads:
                    thread.join(max(0.0, deadline - time.monotonic()))
        finally:
            server.__exit__(None, None, None)


def _allow_open_files() -> None:
    """Raise this process's limit of open files to the most it may: each clip a worker process has sent and the
    run still holds is an open file here (how torch shares memory), up to ``capacity`` per file read ahead, and
    many workers under the usual limit of 1024 made files fail ("Too many open files")."""
    with contextlib.suppress(ValueError, OSError):  # not raised where it cannot be
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        most = hard if hard != resource.RLIM_INFINITY else MAX_OPEN_FILES
        if soft != resource.RLIM_INFINITY and soft < most:
            resource.setrlimit(resource.RLIMIT_NOFILE, (most, hard))


MAX_OPEN_FILES = 1 << 20  # Linux's default ceiling (fs.nr_open), where the hard limit is "unlimited"

SHARED_MEMORY = "/dev/shm"
ORPHAN_SECONDS = 60.0  # a name this old of a worker gone is no hand-over in progress
WORKER_MARK = "titok-fast-worker-"  # + pid: a worker process of ours, in SHARED_MEMORY while it may name memory


def remove_orphaned_shared_memory() -> int:
    """Remove the shared memory that our worker processes were killed while naming: torch creates each clip's
    ``/dev/shm/torch_<pid>_...`` and removes the name at once (the memory then travels as a file descriptor), so a
    SIGKILL of the whole process group (a scheduler's) between the two leaves it, a clip's size each time. Only
    the names of a worker process marked ours (:func:`_mark_worker`) that is gone, made over ORPHAN_SECONDS ago:
    another program's (torch's file_system strategy keeps its names while they are used, also after their maker
    ended) are never looked at. How many were removed."""
    names: list[str] = []
    with contextlib.suppress(OSError), os.scandir(SHARED_MEMORY) as entries:
        names = [entry.name for entry in entries]
    marked = {int(n[len(WORKER_MARK) :]) for n in names if re.fullmatch(rf"{WORKER_MARK}[0-9]{{1,9}}", n)}
    return _forget_workers({pid for pid in marked if not _alive(pid)}, older_than=ORPHAN_SECONDS)


def _mark_path(pid: int) -> str:
    return os.path.join(SHARED_MEMORY, f"{WORKER_MARK}{pid}")


def _mark_worker(pid: int) -> None:
    """Mark worker process ``pid`` as ours (see :func:`remove_orphaned_shared_memory`), where that can be done."""
    with contextlib.suppress(OSError):
        os.close(os.open(_mark_path(pid), os.O_CREAT | os.O_WRONLY, 0o600))


def _forget_workers(pids: set[int], older_than: float = 0.0, unmark: bool = True) -> int:
    """Worker processes ``pids`` have ended: the shared memory names they made (over ``older_than`` seconds ago),
    in one look at the folder, and their marks (unless not ``unmark``) go. How many names were removed."""
    if not pids:
        return 0
    removed, now = 0, time.time()
    with contextlib.suppress(OSError), os.scandir(SHARED_MEMORY) as entries:
        for entry in entries:
            maker = re.match(r"torch_([0-9]{1,9})_", entry.name)
            if maker is not None and int(maker.group(1)) in pids:
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and now - st.st_mtime >= older_than:
                        os.unlink(entry.path)
                        removed += 1
    for pid in pids if unmark else ():
        with contextlib.suppress(OSError):
            os.unlink(_mark_path(pid))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's
        return True
    except (ProcessLookupError, OverflowError):  # gone, or no pid at all
        return False
    return True


class _Tasks:
    """The feeds waiting for a worker: the stream's files in order, each file's segments (see :class:`Segment`)
    before the files after it, so that a file's parts are decoded together; None (stop) before all of them."""

    def __init__(self, grow: Callable[[], None] | None = None):
        self._heap: list[tuple[tuple[int, int], int, ClipFeed | None]] = []
        self._count = itertools.count()  # ties in order of coming
        self._ready = threading.Condition()
        self._idle = 0  # workers waiting in get (counted with the heap, under one lock: no feed is left unseen)
        self._grow = grow  # called where a feed is put and no worker is waiting for it (the pool may start one)

    def put(self, feed: ClipFeed | None, place: tuple[int, int] = (-1, 0)) -> None:
        """``place``: (the file's number in the stream, its part: 0 the file's feed, k its follower k)."""
        with self._ready:
            heapq.heappush(self._heap, (place, next(self._count), feed))
            self._ready.notify()
            wanted = feed is not None and self._grow is not None and len(self._heap) > self._idle
        if wanted:
            self._grow()

    def get(self) -> ClipFeed | None:
        with self._ready:
            self._idle += 1
            while not self._heap:
                self._ready.wait()
            self._idle -= 1
            return heapq.heappop(self._heap)[2]


def _submit(tasks: _Tasks, number: int, follower: ClipFeed, part: int) -> None:
    tasks.put(follower, (number, part))


def _decode_feeds(tasks: _Tasks, abandoned: Sequence[threading.Thread]) -> None:
    """A worker thread: decode the feeds it takes until told to stop (None), or until it is found ``abandoned``
    (stuck in a file long enough to be replaced: the pool has another thread in its place)."""
    try:
        while True:
            with CLOCK.waiting("file"):
                feed = tasks.get()
            if feed is None:
                break
            feed._produce()
            if threading.current_thread() in abandoned:
                return
    finally:
        release_kept_decoder()  # (NVDEC's, kept from file to file)


WORKER_KINDS = ("auto", "thread", "process")
# "auto" decodes in worker processes from this many workers on and for frames of at most this many pixels, in
# threads otherwise (worker_kind_for)
PROCESS_WORKERS_FROM = 8
PROCESS_FRAME_PIXELS = 640 * 480
SHUTDOWN_SECONDS = 5.0  # a closing stream waits this long for its workers to end their clip
_READER_STATE = ("source_fps", "clips_read", "last_clip_frames", "_chunk_length", "placement", "decoded_by", "pruned",
                 "source_stamp")  # fmt: skip


class _DecoderProcess:
    """One decoding worker process and the thread that serves it: the thread takes feeds from the stream's task
    queue, has the process read each file, and puts the clips (shared-memory tensors) into the feed's queue.

    Each file ends with one message from the process: "end" (with the reader's state), "error" (a VideoError's
    text) or "cancelled" (the feed was closed); a reader that splits its file sends "split" (the other segments,
    for :meth:`ClipFeed.split`) before its first clip. A process that dies fails its file and is started again,
    as does one that, once started ("ready"), sends nothing for ``stall_seconds`` while a file waits for it
    (stuck).

    The two talk through one pipe, and nothing else: multiprocessing's queues and events are named semaphores,
    which only its resource tracker removes, and a SIGKILL of the whole process group (a scheduler's) kills the
    tracker too, leaving them in /dev/shm. This side sends ("task", number, path, timed, segment, split_into),
    ("credit", number), ("room", number) and ("cancel", number), or None to stop; a file may have at most CREDITS
    clips sent and not yet taken, and the process ignores a message for another file than the one it reads (one
    that came late). A source-size clip's bytes are reserved here, in the stream's :class:`HeldBytes`, when the
    process asks for them ("room", with the byte count) at the clip's first frame; the process waits for the
    answer before it reads on, and the clip that comes next holds the reservation."""

    CREDITS = 2

    held: HeldBytes | None = None  # source-size clips wait here for room before they are queued
    room: _Reservation | None = None  # reserved for the clip the process gathers (it asked at its first frame)

    def __init__(
        self,
        read_kwargs: dict,
        stall_seconds: float | None = None,
        stopping: threading.Event | None = None,
        held: HeldBytes | None = None,
        piped: threading.Lock | None = None,
    ):
        self.read_kwargs, self.stall_seconds = read_kwargs, stall_seconds
        self.held = held  # (and the process is given credit for the next one only once one is queued)
        self.piped = piped or threading.Lock()  # taken by the first clip that came through a pipe (the run is told)
        self.stopping = stopping or threading.Event()  # the stream is closing: no process is started again
        self.files = 0  # files given to the process: the number of the one it reads
        self.mapped: dict[int, torch.Tensor] = {}  # the process's reused segments, as mapped here (_Segments)
        self._start()

    def _start(self) -> None:
        self.started = False  # until the process is: a start that fails is tried again for the next file
        self.ready = False  # until the process says so: its start-up (imports) is not a file's stall
        self.temp_dir: str | None = None  # the process's multiprocessing folder, which it says when ready
        run = (os.getpid(), start_process_server())
        self._mp = _process_context()
        self.pipe, theirs = self._mp.Pipe()
        self.process = self._mp.Process(
            target=_serve_files, args=(theirs, self.read_kwargs, _environment(), run), daemon=True
        )  # fmt: skip
        # started with SIGINT blocked, which it keeps: a Ctrl-C reaches the whole process group, and is this
        # process's to handle (it stops the workers); in a worker it would only print a traceback. (A SIGTERM ends
        # it: at exit, multiprocessing stops its daemon processes so, and waits for them.)
        try:
            with _sigint_blocked(), _main_left_out():
                self.process.start()
                self.started = True
                _mark_worker(self.process.pid)
        finally:
            theirs.close()  # the process has its own: with this one closed, its death reads as the pipe's end

    def _get(self, timeout: float):
        if not self.pipe.poll(timeout):
            raise queue.Empty
        return self.pipe.recv()

    def _send(self, message) -> None:
        with contextlib.suppress(OSError):  # a process that died: found out by reading
            self.pipe.send(message)

    def serve(self, tasks: _Tasks) -> None:
        try:
            while (feed := tasks.get()) is not None:
                if feed._closed.is_set():
                    continue
                try:
                    if not self.started:  # its last start failed: tried again for this file
                        self._restart()
                    self._read(feed)
                except Exception as exc:  # a process that cannot be started (out of memory, of processes), or a
                    # failure here while it read the file: the file fails, where the run would have waited for it for
                    # ever, and a process that was reading it is replaced (it may be waiting on an answer for this
                    # file that will never come: the next file is given to a fresh one)
                    what = "reading it through a decoding process failed" if self.started else "no decoding process"
                    self._kill()
                    feed._put(("error", VideoError(f"{feed.path}: {what} ({type(exc).__name__}: {exc})")))
        finally:
            self._send(None)
            if self.started and not sys.is_finalizing():
                self.process.join(timeout=5)
                if self.process.exitcode is not None:  # ended: one killed while idle (a SIGTERM) left its folder
                    self._kill()

    def _read(self, feed: ClipFeed) -> None:
        try:
            self._read_file(feed)
        finally:  # the file ended, failed or was cancelled while the process gathered a clip: its room is free
            self._drop_room()

    def _drop_room(self) -> None:
        """Give back the room reserved for the clip the process gathers, if any."""
        room, self.room = self.room, None
        if room is not None:
            room.release()

    def _read_file(self, feed: ClipFeed) -> None:
        self.files += 1
        number = self.files
        reader = feed.reader
        self._send(("task", number, feed.path, CLOCK.enabled, reader.segment, reader.split_into))
        heard = time.monotonic()  # from the process, about this file
        received = 0  # clips
        closing = None  # when the stream began closing while this file was read
        cancelled = False
        while True:
            if feed._closed.is_set():
                if not cancelled:
                    self._send(("cancel", number))
                    cancelled = True
                self._drop_room()  # not wanted: given back now, as a thread's closed feed does (the process may be
                # stuck in a read)
                if self.stopping.is_set():
                    closing = closing or time.monotonic()
                    if time.monotonic() - closing >= SHUTDOWN_SECONDS / 2:  # stuck in a read: not waited for
                        self._kill()
                        return
            try:
                kind, value, spent = self._get(timeout=0.05)
            except queue.Empty:
                stuck = self.ready and self.stall_seconds is not None and time.monotonic() - heard >= self.stall_seconds
                if stuck:  # killed and replaced, not waited for
                    feed.stalled = True
                    feed._put(("error", stall_error(feed.path, self.stall_seconds)))
                    self._restart()
                    return
                if self.process.is_alive():
                    continue
                failure = f"the decoding process died (exit code {self.process.exitcode})"
            except (EOFError, ConnectionResetError):  # the process is gone (reset: it left messages unread)
                self.process.join(timeout=1)
                failure = f"the decoding process died (exit code {self.process.exitcode})"
            except Exception as exc:  # a message cut off by a dying process
                failure = f"the decoding process failed ({type(exc).__name__}: {exc})"
            else:
                heard = time.monotonic()
                CLOCK.add_all(spent)
                if kind == "ready":
                    self.ready, self.temp_dir = True, value
                    self._left_at_exit = multiprocessing.util.Finalize(
                        None, _remove_folder_of_ended, args=(self.process.pid, value), exitpriority=-50
                    )  # (a stream left open at exit: multiprocessing ends the worker with a SIGTERM, then this runs)
                    continue
                if kind == "split":
                    feed.split(value)
                    continue
                if kind == "room":  # a source-size clip begins: its bytes, reserved before the process reads on
                    self._drop_room()  # (a clip it began and did not send)
                    if self.held is not None:
                        self.room = self.held.reserve(value, feed._closed, feed._queue.empty)
                    self._send(("room", number))
                    heard = time.monotonic()  # the wait for room was not the process's
                    continue
                if kind == "shared":  # a clip in one of the process's reused segments: copied out, and given back
                    kept, clip = value  # (its frames: the segment, or None for one mapped here already)
                    shared = self.mapped.get(kept) if _frames_of(clip) is None else _frames_of(clip)
                    if shared is None:  # (none should be: the two ends keep the same account)
                        feed._put(("error", VideoError(f"{feed.path}: the decoding process sent a clip in its shared "
                                                       f"segment {kept}, which the run does not hold")))  # fmt: skip
                        self._restart()
                        return
                    self.mapped = _still_mapped(self.mapped, kept, shared)
                    value, kind = _with_frames(clip, _copied(shared, feed.reader.pin_memory)), "clip"
                    self._send(("freed", number, kept))
                if kind == "piped":  # a clip that found no room in shared memory
                    value, why, bf16 = value
                    frames = torch.from_numpy(_frames_of(value))
                    value, kind = _with_frames(value, frames.view(torch.bfloat16) if bf16 else frames), "clip"
                    if self.piped.acquire(blocking=False):  # said once a run, whichever process's clip comes first
                        notice(f"clips found no room in shared memory ({why}); worker processes send them through "
                               f"their pipes instead (slower): give {SHARED_MEMORY} more room (a container's "
                               "--shm-size) or decode in threads (--worker-kind thread)")  # fmt: skip
                if kind == "clip":
                    reservation, self.room = self.room, None  # a clip at source size holds the room asked for it
                    if reservation is not None and _frames_of(value).dtype != torch.uint8:  # resized (sizes changed)
                        reservation.release()
                        reservation = None
                    feed._put_clip(value, reservation)  # gives up at once when the feed is closed
                    self._send(("credit", number))  # taken: the process may send one more
                    heard, received = time.monotonic(), received + 1  # the consumer's time was not the process's
                    continue
                if kind == "end":
                    if (lost := value["clips_read"] - received) != 0:  # none should be: a last check
                        feed._put(("error", VideoError(f"{feed.path}: {lost} clip(s) lost between the decoding "
                                                       "process and the run")))  # fmt: skip
                        self._restart()
                        return
                    for name, state in value.items():
                        setattr(feed.reader, name, state)
                    feed._put(("end", None))
                elif kind == "error":
                    feed._put(("error", VideoError(value)))
                return  # "cancelled" too: the process is ready for the next file
            feed._put(("error", VideoError(f"{feed.path}: {failure}")))
            self._restart()
            return

    def _kill(self) -> None:
        """Kill the process and remove its multiprocessing folder (the socket through which it shares tensors),
        which a killed process cannot: one would be left in the temporary folder per file that stalled."""
        self.mapped = {}  # (its segments: unmapped here too)
        if self.started:
            self.process.kill()
            self.process.join(timeout=0.5)  # not longer: one stuck in a read dies only once the read returns
            if self.process.exitcode is not None:  # (one still stuck: the next run's, once it is gone)
                _forget_workers({self.process.pid})
        self.started = False
        self.pipe.close()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self._left_at_exit.cancel()

    def _restart(self) -> None:
        self._kill()
        if not self.stopping.is_set():  # a process started while the run stops would only be killed at exit
            self._start()


PARENT_CHECK_SECONDS = 1.0  # how often a worker process looks whether its parent is gone


def _serve_files(pipe, read_kwargs: dict, environ: dict[str, str], run: tuple[int, str | None]) -> None:
    """A worker process: read each file it is given, sending its clips, then one final message (see
    :class:`_DecoderProcess`). It ends itself once its parent is gone (the server it was forked from, which ends
    when the run does): a killed run (SIGKILL, the OOM killer) cannot stop it; waiting on the pipe, it sees the
    pipe's end; decoding, a thread looks every PARENT_CHECK_SECONDS. ``environ``: the run's environment when it
    started the process (forked from a server started earlier, the process has the server's), $TMPDIR among it.
    ``run``: the run's pid and its multiprocessing folder (the server's socket), removed on the way out if the
    run has ended without removing it (killed)."""
    global _RUN
    _RUN, parent = run, os.getppid()  # (were the parent gone already, so is the run, and the pipe says so)
    _let_the_server_go()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # (as the server's processes have it already)
    if environ != os.environ:
        os.environ.clear()
        os.environ.update(environ)
        tempfile.tempdir = None  # read anew from $TMPDIR
    threading.Thread(target=_end_with, args=(parent,), daemon=True).start()
    torch.set_num_threads(1)
    run = _RunPipe(pipe)
    segments = _Segments()
    try:
        run.send(("ready", _own_temp_dir(), {}))
        idle = time.perf_counter()  # since the process last had a file to read
        while (task := run.recv()) is not None:
            if task[0] == "freed":
                segments.give_back(task[2])
            elif task[0] == "task":
                if _serve_file(run, *task[1:], read_kwargs, segments, time.perf_counter() - idle):
                    break
                idle = time.perf_counter()
    except _RunGone:
        _exit_now()


def _process_context():
    """The multiprocessing context decoding processes are started in: "forkserver" where this process's own server
    runs (:func:`start_process_server`), whose processes start with torch, PyAV and NumPy imported; "spawn" where
    a server other code started runs, without them (each process then imports them itself: 2.5 CPU-s)."""
    import torch.multiprocessing as mp  # (its pickling of shared-memory tensors)

    return mp.get_context("forkserver" if _own_server() else "spawn")


_STARTING = threading.local()  # .ours: this thread is starting a decoding process (:func:`_main_left_out`)
_PREPARATION_LOCK = threading.Lock()


@contextlib.contextmanager
def _main_left_out():
    """A process started within (by this thread) is not given the run's main module. A process started by the
    forkserver or spawn method runs the run's script (or ``-m`` module) again, as ``__mp_main__``, before its
    target, so that what it is handed may name things defined there. A decoding process runs this module's code on
    plain values and needs none of it: a script without an ``if __name__ == "__main__":`` guard started its whole
    job again in each one, which multiprocessing refuses there (the process dies, and every file failed), and a
    guarded one had its imports made again by every process (0.36 s for ``benchmarks/bench_pipeline.py``'s).
    Other processes, started by other threads or after, are given it as multiprocessing gives it."""
    from multiprocessing import spawn

    with _PREPARATION_LOCK:
        if not getattr(spawn.get_preparation_data, "_titok_fast_main_left_out", False):
            spawn.get_preparation_data = _without_main(spawn.get_preparation_data)
    _STARTING.ours = True
    try:
        yield
    finally:
        _STARTING.ours = False


def _without_main(prepared: Callable[[str], dict]) -> Callable[[str], dict]:
    """``multiprocessing.spawn.get_preparation_data`` (``prepared``), with the main module left out of its data
    where the calling thread is starting a decoding process (:func:`_main_left_out`); as it was otherwise."""

    @functools.wraps(prepared)
    def preparation_data(name: str) -> dict:
        data = prepared(name)
        if getattr(_STARTING, "ours", False):
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    preparation_data._titok_fast_main_left_out = True
    return preparation_data


_SERVER_OWNER: int | None = None  # the process that started the fork server (:func:`start_process_server`)
_PRELOAD_BEFORE: list[str] | None = None  # multiprocessing's server preloads before this module's were set


def _own_server() -> bool:
    """Whether the fork server is this process's own, or none runs. A process forked from one that started it
    has a copy of its state, for a server that is not its child: dropped, so that it starts one of its own."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if server._forkserver_pid is not None and _SERVER_OWNER not in (None, os.getpid()):
        _close_alive_pipe(server)
        server._forkserver_pid = server._forkserver_address = None
    return server._forkserver_pid is None or _SERVER_OWNER == os.getpid()


def start_process_server() -> str | None:
    """Start the server that decoding processes are forked from, preloading this module (torch, PyAV), if it is not
    running (or started again, the same way, if it died): its imports then overlap what the run does before its
    first file (loading the model). Started with SIGINT blocked, which the processes forked from it keep, and
    without the run's main module; it removes this run's multiprocessing folder if the run is killed
    (``titok_fast._server``). Returns the folder of the socket through which the server is asked for a process,
    where it has one: the run's multiprocessing folder. Nothing where a server other code started runs:
    processes are spawned instead (:func:`_process_context`). One thread at a time: the environment is changed
    while the server starts."""
    global _SERVER_OWNER, _PRELOAD_BEFORE
    from multiprocessing import forkserver

    with _SERVER_LOCK:
        if not _own_server():
            return None
        server = forkserver._forkserver
        if server._forkserver_pid is None or _ended(server._forkserver_pid):
            if _SERVER_OWNER != os.getpid():  # (not a restart of this process's own: what it had set is kept)
                _PRELOAD_BEFORE = list(server._preload_modules or [])
            # (titok_fast._server first: it reads its parent's pid before the others' imports; it imports this
            # module. Not "__main__", the default: a server given the run's script runs it, as Python 3.14's does)
            unwanted = ("titok_fast._server", "__main__")
            others = [name for name in server._preload_modules or [] if name not in unwanted]
            server.set_forkserver_preload(["titok_fast._server", *others])
            if _inherited_temp_dir():  # (a process forked from a run: the server would remove the run's at its end)
                multiprocessing.current_process()._config.pop("tempdir", None)
            _socket_folder()  # (the server's socket is made there)
            with _sigint_blocked(), _our_import_path(), _main_left_out():
                server.ensure_running()
            _SERVER_OWNER = os.getpid()
        else:
            server.ensure_running()  # (as multiprocessing starts it, if it died since the look above)
    address = server._forkserver_address
    return os.path.dirname(address) if isinstance(address, str) and not address.startswith("\0") else None


def own_process_server() -> bool:
    """Whether this process has started a process server (:func:`start_process_server`) that may still run."""
    from multiprocessing import forkserver

    with _SERVER_LOCK:
        return _SERVER_OWNER == os.getpid() and forkserver._forkserver._forkserver_pid is not None


def stop_process_server() -> None:
    """Stop the process server this process started, if it did, and put back multiprocessing's preloads: the
    processes other code forks afterwards come from a server of their own, not from one started with SIGINT blocked
    and this module imported (on Python 3.14, forkserver is the default start method on Linux). Its decoding
    processes, which end when it does, should have ended. Not waited for: the server ends once every copy of its
    "alive" pipe is closed, and a process other code forked from it holds one; it is reaped when it ends."""
    global _SERVER_OWNER
    from multiprocessing import forkserver

    with _SERVER_LOCK:
        server = forkserver._forkserver
        if _SERVER_OWNER != os.getpid():
            return
        with server._lock:  # (multiprocessing's, which its own start and stop take)
            pid, address = server._forkserver_pid, server._forkserver_address
            _close_alive_pipe(server)
            server._forkserver_pid = server._forkserver_address = None
            server._preload_modules = _PRELOAD_BEFORE if _PRELOAD_BEFORE is not None else server._preload_modules
        _SERVER_OWNER = None
    if isinstance(address, str) and not address.startswith("\0"):  # (a path: its socket, as multiprocessing's own
        with contextlib.suppress(OSError):  # stop removes it)
            os.unlink(address)
    if pid is not None and not sys.is_finalizing():  # (at exit no thread starts, and none is needed)
        with contextlib.suppress(RuntimeError):  # ("can't create new thread at interpreter shutdown")
            threading.Thread(target=_reap, args=(pid,), name="titok-fast server reaper", daemon=True).start()


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # (reaped by other code already)
        os.waitpid(pid, 0)


_CALLS = 0  # streams of worker processes within process_server_stopped_after now
_STOP_AT_END = False  # whether the first of them found no server of this process's running
_CALLS_LOCK = threading.RLock()  # (a stream the garbage collector closes within it, in the same thread)


def _no_calls_in_a_fork() -> None:
    """A forked process (a DataLoader's worker forked while a stream ran) has none of its parent's streams."""
    global _CALLS, _CALLS_LOCK
    _CALLS, _CALLS_LOCK = 0, threading.RLock()


os.register_at_fork(after_in_child=_no_calls_in_a_fork)


@contextlib.contextmanager
def process_server_stopped_after():
    """Within (a stream of worker processes: :func:`stream_videos`): a process server started while any such
    stream runs is stopped when the last one ends (:func:`stop_process_server`), so that a library call leaves
    none behind; one this process had started before (the command starts its own early, to overlap its imports
    with the model's loading) is left running. Streams in several threads at once: counted, the server stopped
    with the last (a stream's worker replaced late may start it again)."""
    global _CALLS, _STOP_AT_END
    with _CALLS_LOCK:
        if _CALLS == 0:
            _STOP_AT_END = not own_process_server()
        _CALLS += 1
    try:
        yield
    finally:
        if not sys.is_finalizing():  # (a stream dropped at exit: a daemon thread frozen there may hold the locks
            # for good; the server ends by itself when this process's end closes its pipe)
            with _CALLS_LOCK:
                _CALLS -= 1
                if _CALLS == 0 and _STOP_AT_END:
                    stop_process_server()


@contextlib.contextmanager
def _our_import_path():
    """The process server, started within, imports ``titok_fast`` from where this process did. It is a ``python
    -c`` process, whose path begins with the current folder (multiprocessing hands it this process's path but does
    not apply it, CPython 3.10 to 3.13): a run started in a folder holding another ``titok_fast`` (a checkout of
    another version) had its decoding processes import that one. The server is started with PYTHONSAFEPATH (the
    current folder kept off its path) and, where this ``titok_fast`` is not in a site-packages folder (a
    checkout), the folder it is in first on PYTHONPATH. Not this process's whole path: a folder on PYTHONPATH is
    searched while Python starts, and the folder of a script (on this process's path only once it had started) may
    hold files named as modules Python imports then. The server puts both variables back as they were here
    (SERVER_ENVIRONMENT, read by ``titok_fast._server``), so that the processes forked from it, and theirs, do not
    have them."""
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "PYTHONSAFEPATH")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ[SERVER_ENVIRONMENT] = json.dumps(saved)
    os.environ["PYTHONSAFEPATH"] = "1"
    if root not in {os.path.abspath(folder) for folder in _site_folders()}:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, saved["PYTHONPATH"]]))
    try:
        yield
    finally:
        os.environ.pop(SERVER_ENVIRONMENT, None)
        restore_environment(saved)


SERVER_ENVIRONMENT = "TITOK_FAST_SERVER_ENVIRONMENT"  # (set for the process server alone: :func:`_our_import_path`)
_SERVER_LOCK = threading.Lock()  # held while the process server starts, and the environment is changed for it


def restore_environment(saved: dict[str, str | None]) -> None:
    """The variables of ``saved`` set to its values in ``os.environ``, those of None removed."""
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _environment() -> dict[str, str]:
    """A copy of this process's environment, not taken while the process server starts (:func:`_our_import_path`
    changes it then)."""
    with _SERVER_LOCK:
        return dict(os.environ)


def _site_folders() -> list[str]:
    """The site-packages folders of this Python (a new one searches them whatever its PYTHONPATH)."""
    import site

    folders = list(getattr(site, "getsitepackages", list)())
    with contextlib.suppress(Exception):
        folders.append(site.getusersitepackages())
    return folders


@contextlib.contextmanager
def _sigint_blocked():
    """SIGINT blocked in this thread, for a process started within (it keeps the mask). Starting a process starts
    multiprocessing's resource tracker if it is not running, and that unblocks SIGINT: so it is started first."""
    multiprocessing.resource_tracker.ensure_running()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # read first: a change runs pending handlers, which
    try:  # may raise (a Ctrl-C that had just arrived) after SIGINT is blocked: it is unblocked whatever comes
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class _Segments:
    """A worker process's shared-memory segments for source-size clips, reused from clip to clip: a new one for
    each clip costs four times the clip's stacking (its pages are allocated and zeroed: benchmarks/
    handover_cost.py), so the run copies each clip out as it comes, then gives its segment back ("freed"). At
    most COUNT of the current clip shape; a segment of another shape is dropped when it comes back."""

    COUNT = 2  # one on its way to the run while the next clip is stacked

    def __init__(self):
        self.made: dict[int, torch.Tensor] = {}  # number -> segment (of any shape: those of another are on their way)
        self.free: list[int] = []
        self.next = 0  # (numbers are never used twice)
        self.mapped: dict[int, tuple[int, ...]] = {}  # number -> shape: the segments the run holds mapped

    def take(self, shape: tuple[int, ...], wait: Callable[[], bool]) -> torch.Tensor | None:
        """A free segment of ``shape``, made if fewer than COUNT of that shape exist, else waited for (``wait``:
        takes the run's next message; False once the clip is no longer wanted); None where none can be had (no
        room in shared memory, or not wanted)."""
        while True:
            for k in [k for k in self.free if self.made[k].shape != shape]:  # of another shape: dropped
                self.free.remove(k)
                del self.made[k]
            if self.free:
                return self.made[self.free.pop()]
            if sum(t.shape == shape for t in self.made.values()) < self.COUNT:
                try:
                    segment = torch.empty(shape, dtype=torch.uint8).share_memory_()
                except Exception:  # no room in /dev/shm: a tensor of its own, which then goes through the pipe
                    _forget_workers({os.getpid()}, unmark=False)  # the name torch made for it, and nothing else
                    return None
                self.made[self.next], self.next = segment, self.next + 1
                return segment
            if not wait():
                return None

    def number_of(self, clip: torch.Tensor) -> int | None:
        """Which segment ``clip`` is, if one."""
        return next((k for k, t in self.made.items() if t is clip), None)

    def give_back(self, number: int) -> None:
        """Segment ``number`` is free again: the run has copied its clip out."""
        if number in self.made and number not in self.free:
            self.free.append(number)


def _still_mapped(mapped: dict, number: int, segment) -> dict:
    """The segments of a worker process that the run holds mapped once segment ``number`` came in a clip: it,
    and those of its shape (of another: dropped, as the process drops them). ``mapped`` holds the segments as
    the run maps them (tensors) or as the process knows them (shapes); both ends apply this rule to the same
    messages, in order, so the process knows which segments it may send as their number alone."""

    def shape(v) -> tuple[int, ...]:
        return tuple(v.shape) if isinstance(v, torch.Tensor) else v

    return {k: v for k, v in mapped.items() if shape(v) == shape(segment)} | {number: segment}


def _remove_folder_of_ended(pid: int, folder: str) -> None:
    """At exit (a multiprocessing finalizer, run after multiprocessing has ended the daemon processes): remove the
    multiprocessing folder of worker ``pid`` if it has ended. A stream left open at exit stops nothing (that could
    hang), and its workers, ended by multiprocessing's SIGTERM, cannot remove their own."""
    if _ended(pid):
        shutil.rmtree(folder, ignore_errors=True)


def _own_temp_dir() -> str:
    """This worker's multiprocessing folder, made now, which the run removes when it kills the worker. The worker
    was given the run's own folder if the run had one, which must stay."""
    multiprocessing.current_process()._config.pop("tempdir", None)
    return _socket_folder()


def _inherited_temp_dir() -> bool:
    """Whether this process's multiprocessing folder is another process's, copied by a fork (a DataLoader's worker
    forked from a run): a folder this process made has a finalizer of this process that removes it at exit."""
    from multiprocessing import util

    folder = multiprocessing.current_process()._config.get("tempdir")
    if folder is None:
        return False
    mine = (f for f in list(util._finalizer_registry.values()) if getattr(f, "_pid", None) == os.getpid())
    return not any(folder in (getattr(f, "_args", None) or ()) for f in mine)


def _socket_folder() -> str:
    """This process's multiprocessing folder, made now if it has none. Sockets live there (through which a worker
    shares tensors, and the run asks the process server for a worker), and a socket's path may not pass 107
    bytes: under a temporary folder too long for that, the folder is made in /tmp (a run's that was made under it
    already is replaced, and still removed at exit)."""
    config = multiprocessing.current_process()._config
    folder = config.get("tempdir") or os.path.join(tempfile.gettempdir(), "pymp-01234567")  # (made so, if not yet)
    if len(os.path.join(folder, "listener-01234567")) <= SOCKET_PATH_MAX:
        return multiprocessing.util.get_temp_dir()
    folder = config["tempdir"] = tempfile.mkdtemp(prefix="pymp-", dir="/tmp")
    multiprocessing.util.Finalize(None, shutil.rmtree, args=(folder, True), exitpriority=-100)  # as get_temp_dir's
    return folder


SOCKET_PATH_MAX = 107  # bytes of a Unix socket's path on Linux (sun_path, less its closing NUL)


class _RunGone(BaseException):
    """The run's end of the pipe is closed: nothing this process does is wanted any more."""


class _RunPipe:
    """A worker process's end of its pipe, whose failures (the run is gone) raise :class:`_RunGone`: not an
    Exception, so that a file's own failures (OSErrors among them) are never taken for it."""

    def __init__(self, pipe):
        self.pipe = pipe

    def _call(self, method, *args):
        try:
            return method(*args)
        except (EOFError, BrokenPipeError, ConnectionResetError):
            raise _RunGone from None

    def send(self, message) -> None:
        self._call(self.pipe.send, message)

    def recv(self):
        return self._call(self.pipe.recv)

    def poll(self) -> bool:
        return self._call(self.pipe.poll)


class _RoomOfRun:
    """A worker process's stand-in for the stream's :class:`HeldBytes`, which lives in the run: ``reserve`` asks
    the process's serving thread for the room (``ask``: it waits for the answer, or for the file's cancel); the
    reservation is the serving thread's to give back (the clip that comes next holds it)."""

    def __init__(self, ask: Callable[[int], None]):
        self.ask = ask

    def reserve(self, nbytes: int, stop=None, alone=None) -> _RoomOfRun:
        self.ask(nbytes)
        return self

    def release(self) -> None:
        """(Nothing here: the bytes are counted, and given back, in the run.)"""


def _serve_file(
    run: _RunPipe,
    number: int,
    path: str,
    timed: bool,
    segment: Segment | None,
    split_into: int,
    read_kwargs: dict,
    segments: _Segments,
    waited: float,
) -> bool:
    """Read file ``number`` of this process, sending a clip only while it has a credit (see
    :class:`_DecoderProcess`), then the file's final message; True when the run said to stop meanwhile.
    Source-size clips are stacked into ``segments``. ``waited``: the seconds the process waited for the file
    (counted, with its other waits, where the run times stages: ``timed``)."""
    credits, cancelled, stop, room = _DecoderProcess.CREDITS, False, False, False

    def take(message) -> None:
        nonlocal credits, cancelled, stop, room
        if message is None:  # the run stops
            cancelled = stop = True
        elif message[0] == "freed":  # (whichever file's clip it held)
            segments.give_back(message[2])
        elif message[1] == number:  # others are late: for a file that has ended
            credits, cancelled = credits + (message[0] == "credit"), cancelled or message[0] == "cancel"
            room = room or message[0] == "room"

    def ask_room(nbytes: int) -> None:
        nonlocal room
        run.send(("room", nbytes, CLOCK.take()))
        room = False
        while not room and not cancelled:
            take(run.recv())

    CLOCK.enable(timed)
    CLOCK.add_all({"wait_file": waited})
    reader = ClipReader(path, segment=segment, **read_kwargs)
    reader.held = _RoomOfRun(ask_room)
    reader.split_into = split_into
    reader.on_split = lambda parts: run.send(("split", parts, CLOCK.take()))  # before the first clip

    def wait_for_segment() -> bool:
        with CLOCK.waiting("segment"):
            take(run.recv())
        return not cancelled

    reader.clip_out = lambda shape: segments.take(shape, wait_for_segment)
    try:
        for clip in reader:
            while run.poll():
                take(run.recv())
            with CLOCK.waiting("taken"):
                while not credits and not cancelled:
                    take(run.recv())
            if cancelled:
                run.send(("cancelled", None, CLOCK.take()))
                return stop
            spent = CLOCK.take()
            try:
                frames = _frames_of(clip)
                kept = segments.number_of(frames)
                if kept is None:
                    run.send(("clip", clip, spent))
                else:  # a segment the run has mapped goes as its number alone: sending the tensor again would
                    # hand its file descriptor over anew (a connection to this process and a handshake each clip)
                    known = kept in segments.mapped
                    run.send(("shared", (kept, _with_frames(clip, None) if known else clip), spent))
                    segments.mapped = _still_mapped(segments.mapped, kept, tuple(frames.shape))  # (once sent)
            except Exception as exc:  # no room in shared memory (a container's /dev/shm is 64 MB unless raised):
                # nothing of the message was sent (it failed while being pickled); the clip goes through the pipe
                _forget_workers({os.getpid()}, unmark=False)  # the name torch made for it, and nothing else
                if kept is not None:  # (not sent: the run will not give it back)
                    segments.give_back(kept)
                frames, why = _frames_of(clip), f"{type(exc).__name__}: {exc}"
                bf16 = frames.dtype == torch.bfloat16  # (NumPy has no bfloat16: its bits go, as int16)
                array = (frames.view(torch.int16) if bf16 else frames).numpy()
                run.send(("piped", (_with_frames(clip, array), why, bf16), spent))
            credits -= 1
        run.send(("end", {name: getattr(reader, name) for name in _READER_STATE}, CLOCK.take()))
    except VideoError as exc:
        run.send(("error", str(exc), CLOCK.take()))
    except Exception as exc:  # an unforeseen failure on one file must not stop the others
        run.send(("error", unforeseen(path, exc), CLOCK.take()))
    return stop


def _frames_of(clip):
    """A clip's frames: the tensor (or array) itself, or an I420Clip's."""
    return clip.frames if isinstance(clip, I420Clip) else clip


def _with_frames(clip, frames):
    """``clip`` with ``frames`` for its frames (an I420Clip keeps its matrix)."""
    return clip._replace(frames=frames) if isinstance(clip, I420Clip) else frames


def _copied(clip: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    """A copy of ``clip`` of the run's own (in pinned memory with ``pin_memory``): one copy, without the GIL."""
    out = torch.empty(clip.shape, dtype=clip.dtype, pin_memory=pin_memory)
    np.copyto(out.numpy(), clip.numpy())
    return out


def _end_with(parent: int) -> None:
    """Exit this process as soon as ``parent`` is no longer its parent (it died, and this one was adopted)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    _exit_now()


def _let_the_server_go() -> None:
    """Close this worker's copy of the fork server's "alive" pipe (a worker starts no process): the server ends when
    every copy is closed, and a worker ends when the server does, so a worker holding one (stuck in a hung read)
    kept both alive after the run was killed. (A spawned worker has none.)"""
    from multiprocessing import forkserver

    _close_alive_pipe(forkserver._forkserver)


def _close_alive_pipe(server) -> None:
    """Close this process's copy of ``server``'s (multiprocessing's ForkServer) "alive" pipe, if it has one."""
    if server._forkserver_alive_fd is not None:
        with contextlib.suppress(OSError):
            os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None


def _exit_now() -> None:
    shutil.rmtree(multiprocessing.util.get_temp_dir(), ignore_errors=True)  # its own; os._exit skips the finalizer
    if _RUN is not None and _RUN[1] is not None and _ended(_RUN[0]):  # (while the run lives, the folder is its own
        shutil.rmtree(_RUN[1], ignore_errors=True)  # to remove: removed under it, its exit would print an error)
    os._exit(1)


_RUN: tuple[int, str | None] | None = None  # in a worker process: the run's pid and multiprocessing folder


def _ended(pid: int) -> bool:
    """Whether process ``pid`` has ended: gone, or a zombie its parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:  # no /proc here
        return not _alive(pid)


def iter_videos(
    paths: Iterable[str | os.PathLike[str]], *, workers: int, prefetch: int, **read_kwargs
) -> Iterator[tuple[str | os.PathLike[str], ClipSet | VideoError]]:
    """Whole videos: like :func:`stream_videos`, but yields (path, ClipSet or VideoError), every clip in memory."""
    for path, feed in stream_videos(paths, workers=workers, prefetch=prefetch, **read_kwargs):
        try:
            clips = list(feed)
        except VideoError as exc:
            yield path, exc
        else:
            yield path, feed.reader.clip_set(clips)


def _check_frame_size(path: str, width: int, height: int, clip: tuple[int, int]) -> None:
    """A VideoError unless a frame of ``width`` x ``height``, and the same frame resized for clips of ``clip``
    (height, width) before the crop, each hold at most MAX_SOURCE_SIDE squared pixels: a strip of a few rows is
    resized far past its own size (8192 x 2 for 192 x 192 clips: 786432 x 192, 1.8 GB in float32 per frame)."""
    side = MAX_SOURCE_SIDE
    if width * height > side**2:
        raise VideoError(f"{path}: frames of {width}x{height} pixels; at most {side}x{side} pixels' worth are read")
    if width >= 1 and height >= 1:
        resized_h, resized_w = resized_size((height, width), *clip)
        if resized_h * resized_w > side**2:
            raise VideoError(
                f"{path}: frames of {width}x{height} pixels resize to {resized_w}x{resized_h} for {clip[1]}x{clip[0]}"
                f" clips (short side to {max(clip)}, then the crop); at most {side}x{side} pixels' worth are resized"
            )


def _sized_rgb(path: str, clip: tuple[int, int], rgb: Callable, frame) -> torch.Tensor:
    """``rgb(frame)`` of a frame within the sizes :func:`_check_frame_size` allows for clips of ``clip`` (height,
    width) (a stream may grow midway past what it declared)."""
    if isinstance(frame, av.VideoFrame):  # (NVDEC's keep the stream's first size, checked at the start)
        _check_frame_size(path, frame.width, frame.height, clip)
    return rgb(frame)


def unforeseen(path: str | os.PathLike[str], error: Exception) -> str:
    """The one line for a failure no check foresaw while reading ``path``, which fails that file alone (its
    traceback shown with --debug)."""
    show_traceback(error, path)
    return f"{path}: cannot be read ({type(error).__name__}: {error})"


def video_comment(path: str | os.PathLike[str]) -> str | None:
    """The comment tag of the video at ``path`` (:class:`titok_fast.writing.VideoWriter`'s ``comment``): "" without
    one, None where it cannot be opened as a media file or is shorter than its container says (cut short: libav may
    open it)."""
    try:
        if cut_short(os.fspath(path), os.stat(path).st_size) is not None:  # (looked at before libav opens it)
            return None
        with open_tags(os.fspath(path)) as container:
            return tag(container, "comment")
    except (av.FFmpegError, OSError, TooManySamples):
        return None


def source_stamp(path: str | os.PathLike[str]) -> str:
    """``"<size>:<mtime_ns>"`` of the file at ``path`` ("" if it cannot be looked at): token files record it, so
    that a resume notices a source replaced or grown since (a download finished, a file re-exported)."""
    try:
        member = member_of(path)
        return _stamp(os.stat(path)) if member is None else member.stamp
    except (OSError, ValueError):  # (ValueError: a path with a NUL, as a stranger's token file may name)
        return ""


def is_recorded_source(path: str | os.PathLike[str], recorded: str | None) -> bool:
    """Whether ``path`` is a file whose :func:`source_stamp` is ``recorded``, as a token file recorded it. A
    stranger's token file may name any path: nothing is opened before its ``os.stat`` matches (an archive's member
    is known by its archive's listing, read from the archive, so the archive's modification time must match first:
    one of the wrong time is not listed)."""
    if not recorded:
        return False
    try:
        split = split_member(path)
        if split is not None and recorded.rpartition(":")[2] != str(os.stat(split[0]).st_mtime_ns):
            return False
    except (OSError, ValueError):
        return False
    return recorded == source_stamp(path) and is_file(path)


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}"


def _open(path: str) -> tuple[av.container.InputContainer, str]:
    """The opened file and its source stamp, from the one look that also checks it is a non-empty file."""
    return _opened(path, open_input)


def _open_unprobed(path: str) -> tuple[tuple[av.container.InputContainer, bool], str]:
    """:func:`_open` by :func:`titok_fast.decoders.open_unprobed` where the file begins as an ISO BMFF file does
    (others are opened with the probe at once): ((the opened file, whether its probe was left out), its source
    stamp)."""
    return _opened(path, lambda p: open_unprobed(p) if is_iso_bmff(p) else (open_input(p), False))


def _opened(path: str, opener: Callable[[str], T]) -> tuple[T, str]:
    try:
        member = member_of(path)
    except ArchiveError as e:  # (one it goes through that cannot be listed, or no such member in it)
        raise VideoError(f"{path}: {e}") from None
    except OSError as e:  # (its archive, gone or unreadable since it was found)
        raise VideoError(f"{path}: cannot be looked at ({e.strerror or e})") from None
    if member is not None:
        if member.size == 0:
            raise VideoError(f"{path}: file is empty")
        if member.offset + member.size > member.archive_size:
            raise VideoError(f"{path}: is cut short (an unfinished download or copy?): its archive ends at byte "
                             f"{member.archive_size:,}, inside it")  # fmt: skip
        return _checked_open(path, member.size, opener), member.stamp
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoError(f"{path}: no such file") from None
    except OSError as e:  # a folder that cannot be searched, a name too long
        raise VideoError(f"{path}: cannot be looked at ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise VideoError(f"{path}: is a directory, not a video file")
    if not stat.S_ISREG(st.st_mode):  # a device or a named pipe: never waited on, nor read for ever
        raise VideoError(f"{path}: not a regular file (a device, pipe or socket), not a video file")
    if st.st_size == 0:
        raise VideoError(f"{path}: file is empty")
    return _checked_open(path, st.st_size, opener), _stamp(st)


def _checked_open(path: str, size: int, opener: Callable[[str], T]) -> T:
    """``opener(path)`` for a non-empty file of ``size`` bytes, once it is known not to be cut short."""
    try:
        cut = cut_short(path, size)
    except TooManySamples as e:
        raise VideoError(f"{path}: {e}") from None
    if cut is not None:
        raise VideoError(f"{path}: is cut short (an unfinished download or copy?): {cut}")
    try:
        return opener(path)
    except (av.FFmpegError, OSError) as exc:  # (FFmpeg's words, without its error number and the path again)
        raise VideoError(f"{path}: cannot open as a media file ({exc.strerror or exc})") from exc


NO_STAMP = "a video frame has no presentation timestamp (a raw stream?); --sampling upstream reads frames by count"


def _resample(
    path: str,
    decoded: Iterable,
    fps: float,
    image: Callable,
    first: int | None = None,
    start: int = 0,
    to_the_end: bool = True,
) -> Iterator[torch.Tensor]:
    """Frame k of the output, ``image(frame)``, is the last decoded frame at or before k / fps (see the header),
    as :func:`_due` reads stamps. ``decoded``: (index, frame) pairs; frames a pruned decoder left out show no output
    frame, so they change nothing.

    Times are counted in the stream's time base from the first frame (or from ``first``, the first frame's
    timestamp, when ``decoded`` starts later); a frame whose time does not advance is skipped. Frames stamped
    before the frame held, one after another, over more than a second of their own, are timestamps that start
    again (recordings joined): where they stay behind to the file's end they fail it (no time can be given to them),
    where they catch up a notice says what was skipped. A frame stamped over a second after the one held waits
    for the next: where that one is stamped before it, it alone was stamped ahead (a broken timestamp) and is
    skipped, with a notice, rather than holding the frame before it for that long; a last frame so stamped is
    shown (the end of a pause, or not: a notice says so where the gap is over LONE_GAP_RATIO times the file's
    usual interval; ``to_the_end`` False: ``decoded`` stops before the file's end, a segment's). Output frames
    before ``start`` are left out.
    """
    emitted = start  # output frames so far
    most = _most_held(fps)
    held = held_ticks = rate = slack = None
    behind: tuple[int, int] | None = None  # (first, last) stamps of the frames since the held one, not after it
    ahead: tuple[object, int] | None = None  # a frame stamped over 1 s after the held one, and its time
    steps: deque[int] = deque(maxlen=LONE_GAP_STEPS)  # the last intervals between frames held, in ticks
    skipped: list[tuple[int, int, Fraction]] = []  # frames skipped as stamped ahead: (its time, the held's, time base)

    def show(frame, ticks: int) -> Iterator[torch.Tensor]:  # the frames due before ``frame`` show the held one
        nonlocal emitted, held, held_ticks, behind
        if held is not None:
            if said := _went_back(behind, held_ticks, frame.time_base):
                notice(f"{path}: its timestamps went back, {said}; sampling 'time' skipped the frames stamped before "
                       "the latest time (recordings joined? --sampling upstream reads every frame)")  # fmt: skip
            behind = None
            stop = _due(ticks, rate, slack)
            if stop - emitted > most:  # (counted in output frames: frames a pruned decoder leaves out show none)
                _too_long(path, held_ticks * frame.time_base, stop - emitted, fps)
            if stop > emitted:
                yield from _repeat(held, stop - emitted, image)
                emitted = stop
            steps.append(ticks - held_ticks)
        held, held_ticks = frame, ticks

    for _, frame in decoded:
        if frame.pts is None:
            raise VideoError(f"{path}: {NO_STAMP}")
        if rate is None:
            first, (rate, slack) = frame.pts if first is None else first, _clock(fps, frame.time_base)
        ticks = frame.pts - first
        if ahead is not None:
            if ticks < ahead[1]:  # the clock went on from before it: it alone was stamped ahead
                skipped.append((ahead[1], held_ticks, frame.time_base))
            else:
                yield from show(*ahead)
            ahead = None
        if held is not None:
            if ticks <= held_ticks:  # (frames that do not advance, one after another: over a second of their
                behind = (behind[0] if behind else ticks, ticks)  # own is a clock started again, _went_back)
                continue
            if (ticks - held_ticks) * frame.time_base > 1:
                ahead = (frame, ticks)  # (the next frame says whether its time is real)
                continue
        yield from show(frame, ticks)
    if ahead is not None:  # a last frame so stamped: shown (it may be a pause's end), said where it looks wrong
        if to_the_end and _lone_last(gap := ahead[1] - held_ticks, steps):
            notice(f"{path}: its last frame is stamped {float(gap * ahead[0].time_base):.3f} s after the one before "
                   f"it, over {LONE_GAP_RATIO} times its frames' usual interval, and the frame before it is shown that "
                   "long (a broken timestamp? --sampling upstream reads frames by count)")  # fmt: skip
        yield from show(*ahead)
    if skipped:
        at, before, base = skipped[0]
        more = f" (and {len(skipped) - 1} more such frame(s))" if len(skipped) > 1 else ""
        notice(f"{path}: its frame stamped {float(at * base):.3f} s, {float((at - before) * base):.3f} s after the one "
               f"before it, was stamped ahead of the frames around it: sampling 'time' skipped it as a broken "
               f"timestamp{more}")  # fmt: skip
    if held is not None and (said := _went_back(behind, held_ticks, held.time_base)):
        raise VideoError(
            f"{path}: its timestamps go back, {said}, and stay behind to its end (recordings joined?): sampling 'time' "
            "cannot place the frames after it; encode it with --sampling upstream"
        )
    if held is not None:
        # the last frame shows until its end (as if the next frame were stamped there), or, when its duration is
        # unknown (or shorter than twice its slack), at an instant within the slack of its own time (as if the next
        # frame came twice that slack after it)
        within = _slack(held_ticks, slack)
        if (held.duration or 0) > 2 * within:
            stop = _due(held_ticks + held.duration, rate, slack)
        else:
            stop = _due_within(held_ticks + 2 * within, rate, within)
        if (count := stop - emitted) > most:
            _too_long(path, held_ticks * held.time_base, count, fps, "last ")
        yield from _repeat(held, count, image)


# A last frame stamped over a second after the one before it, with no frame after it to tell whether its time is
# real, is said to look stamped wrong where that gap is over LONE_GAP_RATIO times the median of the file's last
# LONE_GAP_STEPS intervals (at least LONE_GAP_MIN_STEPS of them): a frame 30 minutes after a 24 fps stream's last.
# It is shown all the same: a screen recording's last change after a still minute looks alike.
LONE_GAP_RATIO = 100
LONE_GAP_STEPS = 64
LONE_GAP_MIN_STEPS = 8


def _lone_last(gap: int, steps: deque[int]) -> bool:
    return len(steps) >= LONE_GAP_MIN_STEPS and gap > LONE_GAP_RATIO * statistics.median(steps)


def _went_back(behind: tuple[int, int] | None, held_ticks: int, time_base: Fraction) -> str:
    """"to X s after Y s" where the frames skipped since the one held at ``held_ticks`` (``behind``: the first and
    last of those stamped at or before it) span over a second of their own: timestamps that start again; else ""."""
    if behind is None or (behind[1] - behind[0]) * time_base <= 1:
        return ""
    return f"to {float(behind[0] * time_base):.3f} s after {float(held_ticks * time_base):.3f} s"


STAMP_REORDER = 16  # frames a decoder may hold back before it gives a frame (H.264's largest reorder depth)


def _presentation_stamps(path: str, decoded: Iterable) -> Iterator:
    """``decoded`` ((index, frame) pairs, in presentation order), each frame restamped with the smallest stamp not
    yet given of itself and the STAMP_REORDER frames after it: containers without presentation timestamps (AVI,
    ASF) stamp a B-frame stream's frames in decode order (they come out labelled 1, 3, 4, 2, ...), and this puts
    the same stamps in presentation order. Stamps that already are (every container's but for reordering) come
    through unchanged."""
    held, stamps = deque(), []
    for pair in decoded:
        if pair[1].pts is None:
            raise VideoError(f"{path}: {NO_STAMP}")
        heapq.heappush(stamps, pair[1].pts)
        held.append(pair)
        if len(held) > STAMP_REORDER:
            yield _restamped(held.popleft(), heapq.heappop(stamps))
    while held:
        yield _restamped(held.popleft(), heapq.heappop(stamps))


def _restamped(pair: tuple, pts: int) -> tuple:
    pair[1].pts = pts
    return pair


# With sampling "time", a frame shows until the next one (the last one for its duration): a broken timestamp days
# ahead would make a few frames millions of clips. A frame may show for at most this long (a recording paused for
# an hour still reads).
MAX_FRAME_SECONDS = 3600


def _most_held(fps: float) -> int:
    """The output frames one frame may show (the instants in MAX_FRAME_SECONDS)."""
    return math.floor(MAX_FRAME_SECONDS * fps) + 1


def _too_long(path: str, at: Fraction, frames: int, fps: float, which: str = "") -> None:
    raise VideoError(
        f"{path}: its {which}frame at {float(at):.3f} s would fill {frames} frames at {fps:g} fps, {frames / fps:.0f} "
        f"s (sampling 'time' holds a frame for at most {MAX_FRAME_SECONDS} s: a broken timestamp?)"
    )


# the rule _due follows: token files made with sampling "time" record it, so that a resume redoes files made by an
# earlier rule. (Not changed when stamps given in decode order came to be put in presentation order,
# _presentation_stamps, nor when a lone frame stamped ahead came to be skipped, _resample: each changed the picks of
# a few broken or unusual files alone, and a new rule would have redone every time-sampled file; the README says to
# re-encode those with --overwrite.) "ms-stamps": a whole-millisecond stamp on a clock finer than a millisecond
# gets half a millisecond of slack too (an MP4 remuxed from Matroska keeps Matroska's rounded stamps); files of
# the rule before, "ms-rounding", are kept where the output frames fall on whole milliseconds (--fps 8, the
# default: 1000 / fps a whole number), for which both rules pick the same frames (same_time_sampling).
TIME_SAMPLING = "ms-stamps"
_EARLIER_TIME_SAMPLING = "ms-rounding"

# The day of the latest change to how files become clips that gives some files other clips (a reader that erred on
# them): token files record it (``made_with["reader"]``). 2026-12-07: damage the H.264 decoder conceals is concealed
# in pruned decoding as full decoding conceals it; 2026-12-05: each chunk's picks are numpy.linspace of that chunk,
# as upstream's; 2026-12-02: a file shorter than its container declares fails as cut short. Not part of the resume
# key (each change touched a few damaged or unusual files, and a new key would redo every file of every dataset):
# a resume says how many of the token files it keeps an earlier reader made, and --overwrite redoes them. Changed
# with any such change.
READER = "2026-12-07"
PICKS_FIXED = "2026-12-05"  # the reader of each chunk's own linspace (files of an earlier one: earlier_picks_differ)


def earlier_picks_differ(chunks: int, frames: int, chunk_length: int, last_frames: int | None = None) -> bool:
    """Whether a reader before PICKS_FIXED, which moved the first chunk's picks by c * L, picked other source frames
    than :func:`chunk_picks` in any of the first ``chunks`` chunks of ``frames`` frames of ``chunk_length``, the
    last of them ``last_frames`` real frames (a padded chunk: its picks past the video's end were never read)."""
    now = chunk_picks(np.arange(chunks), frames, chunk_length)
    differ = now != now[:1] + np.arange(chunks)[:, None] * chunk_length
    differ[-1, frames if last_frames is None else last_frames :] = False
    return bool(differ.any())


def same_time_sampling(recorded: object, fps: float) -> bool:
    """Whether sampling "time" by the rule a token file ``recorded`` (its ``time_sampling``), at ``fps``, picks
    the frames the current rule picks: the current rule, or the one before at an fps whose output frames all fall
    on whole milliseconds (whole-millisecond stamps, the only ones the rules treat otherwise, then lie a whole
    millisecond or more after an output frame's instant, or on it: no slack of half a millisecond or less moves
    them)."""
    if recorded == TIME_SAMPLING:
        return True
    on_ms = isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0 and (1000 / Fraction(fps)).denominator == 1
    return recorded == _EARLIER_TIME_SAMPLING and on_ms


def _clock(fps: float, time_base: Fraction) -> tuple[Fraction, tuple]:
    """(output frames per tick, slack) of a stream with this time base, for :func:`_due`: the slack is half a
    millisecond, or half a tick on a clock finer than a millisecond (a stamp is off by at most that), with the
    ticks of a millisecond (a whole-millisecond stamp on such a clock may be rounded too: :func:`_due`)."""
    ms = Fraction(1, 1000) / time_base  # (Matroska and FLV stamp whole milliseconds, off by up to half of one)
    tick_slack = min(Fraction(1, 2), ms / 2)
    return Fraction(fps) * time_base, (tick_slack, ms / 2 if tick_slack < ms / 2 else None, ms)


def _due(ticks: int | Fraction, rate: Fraction, slack: tuple) -> int:
    """The first output frame that a frame ``ticks`` time-base units after the first one shows (``rate``, ``slack``:
    :func:`_clock`). Output frame k, due at k / fps, shows the last frame stamped at or before that instant, a
    frame stamped up to the slack after it included: Matroska and FLV stamp whole milliseconds, so a frame exactly
    on an instant (24 fps sampled at 12 fps) is often stamped up to half a millisecond after it. A clock coarser
    than a millisecond (AVI's 1/25 s) stamps frames exactly and keeps the half-millisecond slack. A finer clock
    gets half a tick, except for a stamp on a whole millisecond (after the first frame), which may have been
    rounded to it (an MP4 or TS remuxed from Matroska: its stamps are Matroska's, on a clock of 1/16000 s, say)
    and gets half a millisecond."""
    return _due_within(ticks, rate, _slack(ticks, slack))


def _slack(ticks: int | Fraction, slack: tuple) -> Fraction:
    """The slack, in ticks, of a frame stamped ``ticks`` after the first (:func:`_due`; ``slack``: :func:`_clock`'s,
    half a tick, half a millisecond where that is more, and the ticks of a millisecond)."""
    tick_slack, half_ms, ms = slack
    if half_ms is None:  # (a clock of a millisecond or coarser: half a millisecond for every stamp)
        return tick_slack
    if isinstance(ticks, int) and ms.denominator == 1:  # (integers: a stamp each frame, on a clock of whole ticks)
        return half_ms if ticks % ms.numerator == 0 else tick_slack
    return half_ms if (ticks / ms).denominator == 1 else tick_slack


def _due_within(ticks: int | Fraction, rate: Fraction, slack: Fraction) -> int:
    return max(0, math.ceil((ticks - slack) * rate))


def _repeat(frame, count: int, image: Callable) -> Iterator[torch.Tensor]:
    if count > 0:
        converted = image(frame)
        for _ in range(count):
            yield converted


NEEDS_BLOCK = 65536  # chunks whose picks ClipReader._needs works out at once


def chunk_length(frames: int, source_fps: float, fps: float) -> int:
    """Source frames per chunk in upstream's sampling: ``frames`` sampled at ``fps`` from ``source_fps``."""
    return int(frames * (source_fps / fps))


def chunk_picks(chunks: np.ndarray, frames: int, chunk_length: int) -> np.ndarray:
    """[len(chunks), frames]: the source frames upstream's sampling picks in each chunk c of ``chunks``,
    numpy.linspace(c * L, c * L + L - 1, frames, dtype=int) as upstream computes it, chunk by chunk. Not the first
    chunk's picks moved by c * L: the floats round otherwise (L = 86, 36 frames: the 22nd pick of every chunk but
    the first, 137 against 136 in chunk 1). numpy computes each row as that chunk's own call would (tested)."""
    starts = np.asarray(chunks, dtype=np.int64).reshape(-1) * chunk_length
    return np.linspace(starts, starts + (chunk_length - 1), frames, dtype=int, axis=1).reshape(len(starts), frames)


def _chunk_counts(chunk: int, frames: int, chunk_length: int) -> dict[int, int]:
    """How often each source frame of ``chunk`` is sampled (:func:`chunk_picks`): at most ``frames`` entries,
    however long the chunk (a low fps, or a source that declares a very high one, makes it billions of frames)."""
    indices, counts = np.unique(chunk_picks(np.array([chunk]), frames, chunk_length)[0], return_counts=True)
    return dict(zip(indices.tolist(), counts.tolist(), strict=True))


def _sample_indices(
    decoded: Iterable, frames: int, chunk_length: int, image: Callable, partial: bool = True
) -> Iterator[torch.Tensor]:
    """Upstream's sampling: chunk c is source frames [c * L, (c + 1) * L), and its frames are those that
    numpy.linspace(c * L, c * L + L - 1, frames, dtype=int) picks (repeats when L < frames), each ``image(frame)``.
    A last partial chunk yields the picks that exist, if ``partial``. ``decoded``: (index, frame) pairs in order.

    The picks end with the chunk's last frame, so a partial chunk never gives a whole clip, except with one frame
    per clip (the pick is the chunk's first frame): then each image waits for its chunk's last frame (or a later
    one), and a partial chunk's is given only if ``partial``."""
    chunk, counts, last = -1, {}, -1
    held: list[torch.Tensor] = []
    whole_at = 0  # the index whose frame makes the held images' chunk whole
    for index, frame in decoded:
        if held and index >= whole_at:
            yield from held
            held = []
        if index // chunk_length != chunk:
            chunk = index // chunk_length
            counts, last = _chunk_counts(chunk, frames, chunk_length), chunk * chunk_length + chunk_length - 1
        repeat = counts.get(index, 0)
        if repeat and last not in counts:  # (the picks wait for the chunk's last frame)
            held, whole_at = list(_repeat(frame, repeat, image)), last
        elif repeat:
            yield from _repeat(frame, repeat, image)
        if held and index >= whole_at:
            yield from held
            held = []
    if partial:
        yield from held
