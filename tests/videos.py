"""Synthetic video files for tests, made with PyAV.

Patterns (frame i of n, [H, W, 3] uint8):
  "index"     uniform gray at level index_level(i): the frame's mean brightness encodes its index
  "moving"    gray diagonal waves shifting by 3 pixels per frame, under a slow left-to-right tint
  "gradient"  left-to-right ramp from 0 to 255, the same in every frame

H.264 in yuv420p needs even sizes, so odd sizes go to FFV1 (lossless, any size) in Matroska.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

INDEX_STEP = 4  # gray levels between consecutive frames of the "index" pattern: robust to H.264 rounding
VFR_TIME_BASE = Fraction(1, 1000)


def index_level(i: int) -> int:
    """Gray level of frame i in the "index" pattern (up to 60 frames)."""
    return 8 + INDEX_STEP * i


def level_to_index(mean_level: float) -> int:
    """Inverse of index_level for a measured mean gray level in [0, 255]."""
    return round((mean_level - 8) / INDEX_STEP)


def pattern_frame(pattern: str, i: int, height: int, width: int) -> np.ndarray:
    """Frame i of a pattern: [height, width, 3] uint8."""
    if pattern == "index":
        assert index_level(i) <= 255, f"the index pattern holds at most 62 frames, asked for frame {i}"
        return np.full((height, width, 3), index_level(i), np.uint8)
    if pattern == "gradient":
        ramp = np.linspace(0, 255, width).round().astype(np.uint8)
        return np.broadcast_to(ramp[None, :, None], (height, width, 3)).copy()
    if pattern == "moving":
        y, x = np.mgrid[:height, :width]
        luma = 128 + 80 * np.sin(2 * np.pi * (x + y + 3 * i) / 16)
        tints = [30 * np.cos(2 * np.pi * x / width + shift) for shift in (0, 2, 4)]  # slow: 4:2:0 keeps them
        return np.stack([luma + tint for tint in tints], axis=-1).round().astype(np.uint8)
    if pattern == "jumping":  # a red that jumps from frame to frame over ramps that move: no frame is like another
        y, x = np.mgrid[:height, :width]
        return np.stack([np.full((height, width), i * 37 % 256), (x * 4 + i) % 256, (y * 4 + 2 * i) % 256],
                        axis=-1).astype(np.uint8)  # fmt: skip
    if pattern == "noise":  # every value, frame i's own
        return np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
    raise ValueError(f"unknown pattern {pattern!r}; expected 'index', 'gradient', 'moving', 'jumping' or 'noise'")


def vfr_times(frames: int) -> list[Fraction]:
    """Presentation times (seconds) of a variable-frame-rate video: gaps cycle through 40, 250, 90, 125 ms."""
    gaps = [Fraction(40, 1000), Fraction(250, 1000), Fraction(90, 1000), Fraction(125, 1000)]
    times = [Fraction(0)]
    for i in range(frames - 1):
        times.append(times[-1] + gaps[i % len(gaps)])
    return times


def scheduling() -> tuple | None:
    """The calling thread's scheduling policy and parameters (None where the OS does not say)."""
    return (os.sched_getscheduler(0), os.sched_getparam(0)) if hasattr(os, "sched_getscheduler") else None


@contextlib.contextmanager
def scheduling_kept() -> Iterator[None]:
    """The calling thread's scheduling policy, put back after what runs within: SVT-AV1's encoder (libsvtav1), run
    as root, makes the thread that opens it real time (SCHED_FIFO, priority 99) and leaves it so. A test process
    left so, and every process it then starts, would take the CPUs from everything else on the machine (on 2 cores,
    a run of the suite was not done after 29 minutes, against 12 without, and a Python loop beside it ran 15 times
    slower)."""
    before = scheduling()
    try:
        yield
    finally:
        if before is not None and scheduling() != before:
            os.sched_setscheduler(0, *before)


def make_video(
    path: str | Path,
    frames: int,
    height: int,
    width: int,
    fps: float = 24.0,
    pattern: str = "moving",
    vfr: bool = False,
    piped: bool = False,
    x264: str = "",
    encoder: str = "libx264",
    options: dict[str, str] | None = None,
) -> Path:
    """Write a video of `frames` pattern frames; even sizes as H.264 (mp4), odd sizes as FFV1 (use .mkv).

    vfr: frame i is shown at vfr_times(frames)[i] instead of i / fps. piped: written as to a pipe (``ffmpeg ... -``),
    where the muxer cannot go back to fill in sizes. x264: more of x264's options (``"keyint=24:open-gop=1"``).
    encoder, options: another encoder of even sizes (``"libx265"``, ``"libvpx-vp9"``, ``"libsvtav1"``) and its
    options.
    """
    path = Path(path)
    odd = height % 2 or width % 2
    target = _Piped(path) if piped else str(path)
    muxer = MUXERS.get(path.suffix) if piped else None
    with scheduling_kept(), av.open(target, "w", format=muxer) as container:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream("ffv1" if odd else encoder, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv444p" if odd else "yuv420p"
        if not odd and encoder == "libx264":
            stream.options = {"crf": "10", **({"x264-params": x264} if x264 else {})}
        elif not odd:
            stream.options = options or {}
        time_base = VFR_TIME_BASE if vfr else 1 / rate
        stream.codec_context.time_base = time_base
        times = vfr_times(frames) if vfr else [i / rate for i in range(frames)]
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(pattern_frame(pattern, i, height, width), format="rgb24")
            frame.pts, frame.time_base = int(t / time_base), time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    if piped:
        target.file.close()
    return path


MUXERS = {".avi": "avi", ".mkv": "matroska", ".mp4": "mp4"}


class _Piped:
    """A file that cannot seek, as a pipe is to a muxer."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")  # noqa: SIM115 (closed by make_video)

    def write(self, data) -> int:
        return self.file.write(data)

    def seekable(self) -> bool:
        return False


def make_lossless(
    path: str | Path, frames: list[np.ndarray], rotation: float | None = None, hflip: bool = False, fps: int = 8
) -> Path:
    """An .mp4 of RGB H.264 at qp 0 (decoded back bit for bit) holding ``frames`` ([h, w, 3] uint8), with a
    display matrix turning them ``rotation`` degrees counterclockwise (and mirroring them with ``hflip``)."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        stream.options = {"qp": "0"}
        if rotation is not None:
            stream.set_display_rotation(rotation, hflip=hflip)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return Path(path)


def make_audio_only(path: str | Path, seconds: float = 0.5, cover: bool = False) -> Path:
    """A file (.mkv, or .mp4 with ``cover``) holding only an MP2 audio stream (a 440 Hz tone); with ``cover`` also
    a JPEG picture attached to it (cover art, as music files and downloads carry), a video stream to FFmpeg."""
    path = Path(path)
    rate = 44100
    with av.open(str(path), "w") as container:
        if cover:
            art = container.add_stream("mjpeg", rate=1)
            art.width, art.height, art.pix_fmt = 32, 32, "yuvj420p"
            art.disposition = av.stream.Disposition.attached_pic
        stream = container.add_stream("mp2", rate=rate)
        stream.layout = "mono"
        if cover:
            picture = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 200, np.uint8), format="rgb24")
            for packet in [*art.encode(picture), *art.encode()]:
                packet.pts = packet.dts = 0
                container.mux(packet)
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate) * 32767).astype(np.int16)
        for start in range(0, len(tone), 1152):
            frame = av.AudioFrame.from_ndarray(tone[None, start : start + 1152], format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def make_truncated(path: str | Path, source: str | Path, keep: float = 0.4) -> Path:
    """The first `keep` fraction of the bytes of `source` (an mp4 loses its index at the end)."""
    data = Path(source).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return Path(path)


def remux(
    path: str | Path,
    source: str | Path,
    options: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
    tag_encoding: str = "utf-8",
) -> Path:
    """``source``'s video stream, packets unchanged, in the container ``path``'s name says, with muxer ``options``
    (``{"movflags": "faststart"}``: an MP4 whose index is at the front; ``"frag_keyframe+empty_moov"``: a
    fragmented one) and metadata ``tags`` written in ``tag_encoding`` (``"latin-1"``: as older files have them;
    PyAV 19 writes UTF-8 only: each such value is written as a placeholder of its length, replaced in the bytes)."""
    placeholders = {key: f"{k:02d}".encode() + b"~" * (len(value.encode(tag_encoding)) - 2)
                    for k, (key, value) in enumerate((tags or {}).items())}  # fmt: skip
    with av.open(str(source)) as src, av.open(str(path), "w", options=options or {}) as out:
        out.metadata.update({key: placeholder.decode() for key, placeholder in placeholders.items()})
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    data = Path(path).read_bytes()
    for key, placeholder in placeholders.items():
        assert data.count(placeholder) == 1, f"the tag {key!r} is not written once as it was given"
        data = data.replace(placeholder, tags[key].encode(tag_encoding))
    Path(path).write_bytes(data)
    return Path(path)


def make_concealed(path: str | Path, source: str | Path) -> Path:
    """``source`` (H.264 in MP4) with one byte of a reference frame's slice header flipped where FFmpeg conceals the
    damage without an error (it paints that frame from the last one decoded); with ``err_detect=explode`` it is an
    error. The first such frame after the first."""
    with av.open(str(source)) as src:
        packets = [bytes(p) for p in src.demux(src.streams.video[0]) if p.dts is not None]
    for k, data in enumerate(packets):
        if k == 0 or not (data[4] >> 5) & 3 or len(data) <= 20:  # (nal_ref_idc 0: not a reference frame)
            continue
        with av.open(str(source)) as src, av.open(str(path), "w") as out:
            stream = out.add_stream_from_template(src.streams.video[0])
            for n, packet in enumerate(p for p in src.demux(src.streams.video[0]) if p.dts is not None):
                if n == k:
                    damaged = bytearray(data)
                    damaged[9] ^= 0xFF
                    copy = av.Packet(bytes(damaged))
                    copy.pts, copy.dts, copy.time_base, copy.is_keyframe = (packet.pts, packet.dts,
                                                                            packet.time_base, packet.is_keyframe)
                    packet = copy
                packet.stream = stream
                out.mux(packet)
        if _decodes(path, {}) and not _decodes(path, {"err_detect": "explode"}):
            return Path(path)
    raise AssertionError(f"no frame of {source} whose damage FFmpeg conceals")


def _decodes(path: str | Path, options: dict[str, str]) -> bool:
    with av.open(str(path)) as container:
        container.streams.video[0].codec_context.options = options
        try:
            for _ in container.decode(video=0):
                pass
        except av.FFmpegError:
            return False
    return True


def make_edit_listed(path: str | Path, source: str | Path, hidden: int = 10) -> Path:
    """``source`` (an MP4) with its first ``hidden`` frames before its edit list's start, as a stream copy cut at
    a frame that is not a keyframe makes: their packets are read (stamped below 0), their frames never shown."""
    with av.open(str(source)) as src, av.open(str(path), "w") as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        shift = None
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                shift = hidden * packet.duration if shift is None else shift
                packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, stream
                out.mux(packet)
    return Path(path)


def make_scrambled(path: str | Path, source: str | Path, start: int = 200) -> Path:
    """`source` with random bytes from offset `start` to its middle: the container opens, decoding fails."""
    data = bytearray(Path(source).read_bytes())
    data[start : len(data) // 2] = np.random.default_rng(0).bytes(len(data) // 2 - start)
    Path(path).write_bytes(bytes(data))
    return Path(path)


def make_unknown_codec(path: str | Path, source: str | Path) -> Path:
    """``source`` (an H.264 MP4) with its sample entry's codec named ``zzz1``: the container opens, its video stream
    has no decoder."""
    data = Path(source).read_bytes()
    at = data.index(b"avc1", data.index(b"stsd"))
    Path(path).write_bytes(data[:at] + b"zzz1" + data[at + 4 :])
    return Path(path)


def make_garbage(path: str | Path, size: int = 4096) -> Path:
    """Random bytes under a video file name."""
    Path(path).write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return Path(path)


def make_hanging(folder: Path) -> Path:
    """``folder/hangs.mp4``, a file whose read hangs as one on a hung network file system does: a concat playlist
    (FFmpeg finds it by its content) naming the named pipe ``folder/pipe.mp4``, which nothing writes to, so
    opening it blocks inside FFmpeg until :func:`release_hanging` lets it fail."""
    os.mkfifo(folder / "pipe.mp4")
    (folder / "hangs.mp4").write_text("ffconcat version 1.0\nfile 'pipe.mp4'\n")
    return folder / "hangs.mp4"


_HELD_PIPES: dict[Path, int] = {}  # folder -> the write end :func:`wait_for_a_reader_of_hanging` holds open


def wait_for_a_reader_of_hanging(folder: Path, timeout: float = 60) -> None:
    """Wait until something has opened :func:`make_hanging`'s pipe to read it (a pipe's write end opens, without
    waiting, only then), and keep the write end open: the reader then hangs in its first read instead, until
    :func:`release_hanging`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _HELD_PIPES[folder] = os.open(folder / "pipe.mp4", os.O_WRONLY | os.O_NONBLOCK)
            return
        except OSError:  # ENXIO: no reader yet
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing opened {folder / 'pipe.mp4'} within {timeout} s") from None
            time.sleep(0.01)


def release_hanging(folder: Path) -> None:
    """End the hang of :func:`make_hanging`'s file: whoever is opening or reading its pipe gets an empty stream."""
    if folder in _HELD_PIPES:
        os.close(_HELD_PIPES.pop(folder))
    try:
        os.close(os.open(folder / "pipe.mp4", os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: nobody is opening it (any more)
        pass


def make_empty(path: str | Path) -> Path:
    """A zero-byte file."""
    Path(path).write_bytes(b"")
    return Path(path)


def read_frames(path: str | Path) -> tuple[np.ndarray, list[float]]:
    """Every frame of a video as [N, H, W, 3] uint8 RGB and each frame's time in seconds."""
    with av.open(str(path)) as container:
        decoded = list(container.decode(video=0))
    return np.stack([f.to_ndarray(format="rgb24") for f in decoded]), [float(f.time) for f in decoded]
