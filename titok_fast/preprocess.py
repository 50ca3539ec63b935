"""Decoded frames -> model input: upstream's resize, center crop and scaling, per frame or per clip, on any device.

The math is upstream's (DESIGN.md section 8): float32 pixels, short side resized to max(H, W) with the long side
truncated, bicubic with antialiasing and no clamping (torchvision's Resize), torchvision's CenterCrop rounding,
then ``(pixels / 255) * 2 - 1`` in the model's dtype. Resizing a clip's T frames in one call gives the same
values as resizing them one by one (the kernel treats each image alone), so the batched path is exact.

Where it runs is decided per file by :func:`placement`, a fixed rule on the source size, the clip size and the
model's device (never on timings): ``"cpu"`` resizes in the decoding workers, ``"device"`` uploads the clip's
uint8 RGB frames (pinned memory, a side stream on CUDA) and resizes them where the model runs. With ``"device"`` on
CUDA, the CPU decoder's frames go up as their YUV planes instead (:class:`I420Clip`, half the bytes) and become RGB
there, byte for byte as libswscale converts them on the CPU (``kernels/nv12_rgb.py``), where that holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .stages import CLOCK

PLACEMENTS = ("auto", "cpu", "device")
# how the CPU decoder's frames go to a "device" placement: as uint8 RGB, or as I420Clip where the device's conversion
# gives the same bytes (frames that it would not come as RGB all the same)
UPLOADS = ("rgb", "i420")
MAX_DEVICE_PIXELS = 3840 * 2160  # larger frames, at source size or resized, are resized on the CPU: a clip of
# them would be GBs on the device, where the CPU holds one frame at a time
MAX_DEVICE_ASPECT = 8  # sources whose long side is more than this many times their short side: resized on the CPU
# clips whose frames at source size, uint8 RGB, are larger (a long clip of HD frames: 4096 frames of 1080p are 25 GB)
# are resized on the CPU, a frame at a time: the device would hold them whole, and pinned host memory too
MAX_DEVICE_CLIP_BYTES = 1 << 30
# the float32 copy that a resize on the device makes of a clip's frames is made this many bytes at a time at most
# (21 frames of 1080p in one go, 5 of 2160p), so a long clip does not need four times its uint8 bytes on the device
RESIZE_CHUNK_BYTES = 512 << 20


def placement(
    requested: str, device_type: str, source_height: int, source_width: int, height: int, width: int, frames: int = 1
) -> str:
    """Where a file's frames are preprocessed, for clips of ``frames`` x (height, width): ``"cpu"`` or ``"device"``.

    ``requested`` "cpu" or "device" is obeyed. "auto": "device" when the model runs on CUDA and the source is
    ordinary: a source frame has at most MAX_DEVICE_PIXELS pixels, its long side is at most MAX_DEVICE_ASPECT
    times its short side, resized (short side to max(height, width), before the crop) it has at most
    MAX_DEVICE_PIXELS pixels too, and a clip's frames at source size (uint8 RGB) take at most
    MAX_DEVICE_CLIP_BYTES (uploading uint8 RGB costs the bus far less than the CPU resize costs the host,
    see benchmarks/RESULTS.md). Else "cpu": on a CPU model, resizing in the decoding workers keeps it parallel to
    the model instead of on the thread that drives the model; a degenerate source (a strip of a few rows, whose
    resize is far larger than the source and than the clip) is resized a frame at a time instead of a clip at a
    time; a source of unknown size (0) takes the exact path. The same sizes always give the same answer.
    """
    if requested not in PLACEMENTS:
        raise ValueError(f"preprocess must be one of {PLACEMENTS}; got {requested!r}")
    if requested != "auto":
        return requested
    if device_type != "cuda" or min(source_height, source_width) < 1:
        return "cpu"
    resized = resized_size((source_height, source_width), height, width)
    ordinary = (
        source_height * source_width <= MAX_DEVICE_PIXELS
        and max(source_height, source_width) <= MAX_DEVICE_ASPECT * min(source_height, source_width)
        and resized[0] * resized[1] <= MAX_DEVICE_PIXELS
        and frames * source_height * source_width * 3 <= MAX_DEVICE_CLIP_BYTES
    )
    return "device" if ordinary else "cpu"


def resized_size(source: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """torchvision's Resize(max(height, width)) of a (h, w) source: short side to that size, long side truncated."""
    h, w = source
    side = max(height, width)
    return (int(side * h / w), side) if w <= h else (side, int(side * w / h))


def resize_crop(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """pixels [N, 3, h, w] float32 (0..255) -> [N, 3, height, width] float32: resized as upstream, center-cropped."""
    size = resized_size(tuple(pixels.shape[-2:]), height, width)
    if size != tuple(pixels.shape[-2:]):
        pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False)
    top, left = int(round((size[0] - height) / 2.0)), int(round((size[1] - width) / 2.0))
    return pixels[..., top : top + height, left : left + width]


def clip_pixels(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A clip's frames [T, h, w, 3] uint8 RGB (any device) -> raw pixels [3, T, height, width] float32, 0..255
    scale, computed where ``frames`` are: all T frames in one call, or RESIZE_CHUNK_BYTES of float32 frames a call
    (each frame is resized alone, so the values are the same)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be [T, h, w, 3] uint8; got {frames.dtype} {list(frames.shape)}")
    started = CLOCK.start()
    pixels = _in_chunks(frames, frames[0].numel() if len(frames) else 0, (height, width), frames.device,
                        lambda part: resize_crop(_planar_float(part), height, width).transpose(0, 1))  # fmt: skip
    CLOCK.stop("resize", started)
    return pixels


def _in_chunks(
    frames: torch.Tensor, rgb_bytes: int, size: tuple[int, int], device: torch.device, piece: Callable
) -> torch.Tensor:
    """``piece(frames[t : t + k])`` -> [3, k, *size] float32 on ``device``, over chunks of RESIZE_CHUNK_BYTES of
    float32 frames (``rgb_bytes``: one frame's bytes as uint8 RGB), put together as [3, T, *size]; one call where
    the clip fits in one chunk. Each frame is converted and resized alone, so chunks give the values of one call."""
    step = max(1, RESIZE_CHUNK_BYTES // max(1, rgb_bytes * 4))  # frames a call
    if len(frames) <= step:
        return piece(frames)
    pixels = torch.empty((3, len(frames), *size), dtype=torch.float32, device=device)
    for t in range(0, len(frames), step):
        pixels[:, t : t + step] = piece(frames[t : t + step])
    return pixels


def _planar_float(frames: torch.Tensor) -> torch.Tensor:
    """[T, h, w, 3] uint8 -> [T, 3, h, w] float32 in one pass: the interpolation's planar kernel, as the per-frame
    path always had (the channels-last one gives the same values but was slower on the CPU, and so was stacking
    its outputs)."""
    return frames.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)


class I420Clip(NamedTuple):
    """A clip's frames at source size as the CPU decoder gave them, for placement "device": I420 ``frames`` [T,
    h * 3 / 2, w] uint8 (each frame's Y, U and V planes one after another: ``kernels/nv12_rgb.py``'s
    ``i420_planes``), and the YUV ``matrix`` ("bt601" or "bt709") that libswscale converts them by. Half the bytes
    of the same frames in RGB."""

    frames: torch.Tensor
    matrix: str


def i420_rgb(clip: I420Clip) -> torch.Tensor:
    """An I420 clip -> [T, h, w, 3] uint8 RGB where its frames are: libswscale's bytes, one kernel on CUDA (its
    PyTorch reference elsewhere, or where Triton is missing)."""
    from .kernels import _triton, nv12_rgb  # (imports Triton: only where I420 clips are made)

    started = CLOCK.start()
    if clip.frames.is_cuda and not _triton.MISSING:
        rgb = nv12_rgb.i420_rgb(clip.frames, clip.matrix)
    else:
        rgb = nv12_rgb.i420_rgb_ref(clip.frames, clip.matrix)
    CLOCK.stop("rgb", started)
    return rgb


def normalize_pixels(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Raw resized pixels (0..255 scale) -> model input in [-1, 1], computed in ``dtype`` as upstream does:
    cast first, then ``/ 255``, ``* 2``, ``- 1``."""
    return (pixels.to(dtype) / 255) * 2 - 1


class DevicePreprocessor:
    """Clips of uint8 frames (RGB [T, h, w, 3], or an :class:`I420Clip`) -> model input on ``device``, batched per
    clip.

    On CUDA the frames go up from pinned memory on a side stream, are converted to RGB (I420) and resized there, and
    the caller's stream waits for that work on the device (not on the host), so the upload and resize of one clip
    overlap the model running the clips before it. A long clip goes up RESIZE_CHUNK_BYTES of float32 frames at a
    time (the device holds its output and a chunk of its host frames, not all of them at source size; frames
    decoded on the GPU, NVDEC's, are there whole already). Returns [3, T, height, width] in ``dtype`` on
    ``device``. Frames in pinned memory are read after this returns (the copy is asynchronous): they must not be
    changed before the clip's work is done (the pipeline gives each clip memory of its own).
    """

    def __init__(self, device: torch.device | str, height: int, width: int, dtype: torch.dtype):
        self.device, self.height, self.width, self.dtype = torch.device(device), height, width, dtype
        self._stream = None

    def __call__(self, frames: torch.Tensor | I420Clip) -> torch.Tensor:
        i420 = frames if isinstance(frames, I420Clip) else None
        frames = i420.frames if i420 is not None else frames
        matrix = i420.matrix if i420 is not None else None
        if self.device.type != "cuda":
            return normalize_pixels(self._pixels(frames, matrix), self.dtype)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        caller = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            if frames.device.type != "cpu":  # decoded on the GPU (NVDEC) by work queued before this call, on the
                # caller's stream or on the default stream of the decoding thread, which made them: read here after
                # both, and their memory kept from another use until this stream is done with it, whichever frees it
                self._stream.wait_stream(caller)
                self._stream.wait_stream(torch.cuda.default_stream(self.device))
                frames.record_stream(self._stream)
            clip = normalize_pixels(self._pixels(frames, matrix), self.dtype)
        caller.wait_stream(self._stream)
        clip.record_stream(caller)
        return clip

    def _upload(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames -> this device: on CUDA from pinned memory, on the current (side) stream."""
        if self.device.type != "cuda":
            return frames.to(self.device)
        if frames.device.type != "cpu":
            return frames
        started = CLOCK.start()
        frames = frames if frames.is_pinned() else frames.pin_memory()
        frames = frames.to(self.device, non_blocking=True)
        CLOCK.stop("upload", started)
        return frames

    def _pixels(self, frames: torch.Tensor, matrix: str | None) -> torch.Tensor:
        """A clip's uint8 frames (RGB, or I420 in ``matrix``) -> [3, T, height, width] float32 on the device, uploaded,
        converted and resized RESIZE_CHUNK_BYTES of float32 frames at a time (as clip_pixels resizes), so a long clip
        needs on the device its output and a chunk, not all its frames at source size (each frame is converted and
        resized alone: the values are those of one call)."""
        rgb_bytes = frames[0].numel() * (2 if matrix is not None else 1) if len(frames) else 0  # an RGB frame's
        rgb_first = matrix is not None and self.device.type != "cuda"  # (off CUDA made RGB where the frames are)

        def piece(part: torch.Tensor) -> torch.Tensor:
            part = self._upload(i420_rgb(I420Clip(part, matrix)) if rgb_first else part)
            if matrix is not None and not rgb_first:
                part = i420_rgb(I420Clip(part, matrix))
            return clip_pixels(part, self.height, self.width)

        return _in_chunks(frames, rgb_bytes, (self.height, self.width), self.device, piece)
