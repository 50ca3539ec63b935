"""Videos out: H.264 mp4 files written chunk by chunk and atomically (reconstructions, side-by-side comparisons)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from fractions import Fraction

import av
import torch
import torch.nn.functional as F

from .files import MIN_WRITE_FPS, AtomicFile
from .video import check_fps

WRITTEN_COLORSPACE = 6  # AVCOL_SPC_SMPTE170M: the BT.601 matrix (color_range 1: AVCOL_RANGE_MPEG, limited)


X264_THREADS = 4  # VideoWriter's, on every machine: x264's output depends on it


class VideoWriter:
    """An H.264 mp4 (libx264, yuv420p, quality `crf`) written chunk by chunk and atomically.

    ``write(frames)`` takes [3, T, H, W] in [-1, 1] (clamped), every chunk of one size; yuv420p needs even sizes,
    so an odd H or W gains one row or column copied from the last one: the file is (H + H % 2) x (W + W % 2).
    Frames go to a temporary file in the same folder, synced and renamed over `path` by ``close()``; leaving the
    ``with`` block by an exception (or ``abort()``) removes it, so `path` is only ever a complete video.
    ``comment``, if given, is stored as the container's comment tag (:func:`titok_fast.video.video_comment` reads
    it). The same frames make the same file, byte for byte, on any machine (with the same FFmpeg and x264).
    """

    def __init__(self, path: str | os.PathLike[str], fps: float, *, crf: int = 18, comment: str = ""):
        check_fps(fps)
        if fps < MIN_WRITE_FPS:
            raise ValueError(f"fps {fps:g}: an mp4 is written at {MIN_WRITE_FPS:g} fps at least")
        self.path, self.fps, self.crf, self.comment = os.fspath(path), fps, crf, comment
        self._file = AtomicFile(self.path)
        self._container = self._stream = None
        self._size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, frames: torch.Tensor) -> None:
        with self._said_of_path():
            self._write(frames)

    def _write(self, frames: torch.Tensor) -> None:
        if frames.ndim != 4 or frames.shape[0] != 3 or frames.shape[1] == 0:
            raise ValueError(f"frames must be [3, T, H, W] with T >= 1; got shape {list(frames.shape)}")
        height, width = frames.shape[-2:]
        if self._size is None:
            self._open(height + height % 2, width + width % 2)
            self._size = (height, width)
        elif self._size != (height, width):
            raise ValueError(f"frames are {height}x{width}; this video's are {self._size[0]}x{self._size[1]}")
        levels = (frames.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
        levels = F.pad(levels, (0, width % 2, 0, height % 2), mode="replicate")
        for image in levels.round().to(torch.uint8).permute(1, 2, 3, 0).numpy():  # [H', W', 3] each
            self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        self.frames += frames.shape[1]

    def _open(self, height: int, width: int) -> None:
        self._file.create()  # locked while written: a concurrent decode's cleanup leaves it alone
        self._container = av.open(self._file.temporary, mode="w", format="mp4")
        if self.comment:  # (the container's "comment" tag)
            self._container.metadata["comment"] = self.comment
        rate = Fraction(self.fps).limit_denominator(max(1001, math.ceil(1 / self.fps)))  # below 1/1001: not 0
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        # x264's macroblock tree (mbtree) reads memory it never wrote (seen at 192x192: the same frames made other
        # bytes from one run to the next), and its output depends on its thread count, by default the machine's
        # cores: without the one and with a fixed count, the same frames always make the same file
        self._stream.options = {"crf": str(self.crf), "threads": str(X264_THREADS), "x264-params": "mbtree=0"}
        # how the frames are converted (libswscale's default, BT.601 in limited range), said in the stream: a player
        # takes an unlabelled HD video for BT.709 and would shift its colours
        self._stream.codec_context.colorspace, self._stream.codec_context.color_range = WRITTEN_COLORSPACE, 1

    def close(self) -> None:
        """Finish the file and move it to `path`."""
        if self._container is None:
            raise ValueError(f"{self.path}: no frames were written")
        try:
            with self._said_of_path():
                self._container.mux(self._stream.encode())
                self._container.close()
                self._container = None
                self._file.commit()
        finally:
            self.abort()

    @contextlib.contextmanager
    def _said_of_path(self) -> Iterator[None]:
        """An I/O error writing the video (FFmpeg's name the temporary, or no file) said of `path`, the file asked
        for, with its errno (a full disk is told apart by it)."""
        try:
            yield
        except OSError as e:
            if e.filename not in (None, self._file.temporary) or e.errno is None:
                raise
            raise OSError(e.errno, e.strerror or str(e), self._file.path) from e

    def abort(self) -> None:
        """Drop what was written; `path` is left as it was."""
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
            self._container = None
        self._file.discard()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def write_video(
    path: str | os.PathLike[str], frames: torch.Tensor, fps: float, *, crf: int = 18, comment: str = ""
) -> None:
    """Write frames [3, T, H, W] in [-1, 1] (clamped) as an H.264 mp4, atomically (see :class:`VideoWriter`),
    with ``comment`` as its comment tag."""
    with VideoWriter(path, fps, crf=crf, comment=comment) as writer:
        writer.write(frames)


def side_by_side(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two videos [3, T, H, Wa] and [3, T, H, Wb] next to each other: [3, T, H, Wa + Wb]."""
    if a.ndim != 4 or a.shape[:3] != b.shape[:3]:
        raise ValueError(f"videos must be [3, T, H, W] with equal C, T, H; got {list(a.shape)} and {list(b.shape)}")
    return torch.cat([a, b], dim=-1)
