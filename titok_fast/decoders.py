"""Video decoders behind one interface: PyAV on the CPU (the default, exact path) and NVDEC on the GPU (opt in).

A decoder opens a file as a :class:`FrameSource`: its average frame rate, the decoded frames in order with their
indices (each frame with ``pts``, ``time_base`` and ``duration`` in the container's terms) and ``rgb(frame)``,
the frame as uint8 RGB [h, w, 3] where it was decoded (host memory for PyAV, GPU memory for NVDEC).

Pruning (the CPU decoder, H.264): a reader that says which frames it needs (by index in presentation order) gets
those, and the decoder skips the non-reference frames it does not need. Such a frame is, by the standard
(nal_ref_idc 0), never a reference for another, so skipping it changes no other frame: the frames given out are
bit for bit those of decoding everything. Indices come from a first pass over the packets (their timestamps,
no decoding). Each frame that comes out is checked against them; if a needed frame is missing or out of order
:class:`PruneMismatch` is raised, and the reader decodes that file again in full. The same pass finds where
decoding may start afresh (:class:`StreamIndex`'s cuts), so that workers may decode parts of a long file at once;
HEVC, VP9 and AV1 files get such an index too, only to be split by: each part decodes every frame from its cut.

I420 hand-over (the CPU decoder, frames preprocessed on a GPU): a frame's YUV 4:2:0 planes as they were decoded
(:func:`i420_bytes`), half the bytes of its RGB, which the consumer converts on the GPU (``kernels/nv12_rgb.py``)
where the conversion there gives libswscale's bytes (:func:`i420_matrix`, :func:`frame_i420_matrix`); others
come as RGB.

NVDEC comes from PyNvVideoCodec, imported only when asked for. Its frames are NV12 on the GPU; the YUV to RGB
conversion runs there in one kernel a frame (``kernels/nv12_rgb.py``: BT.601 or BT.709 as the stream says, limited
range), in libswscale's fixed-point arithmetic: PyAV's RGB bytes of the same planes (tests/test_preprocess.py). H.264
and HEVC decoding being exact, NVDEC's planes are PyAV's (a GPU test checks it), so its frames are the CPU decoder's.
What NVDEC cannot take (the package or a GPU missing, a codec it lacks, a file it rejects) is decoded on the CPU
instead, with a one-line notice; :func:`open_frames` does that choosing.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import functools
import itertools
import platform
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from .archives import is_file, libav_path
from .files import notice
from .stages import CLOCK

DECODERS = ("cpu", "nvdec")
# how NVDEC's frames become RGB (kernels/nv12_rgb.py): libswscale's fixed-point arithmetic, the CPU decoder's bytes.
# Token files made with --decoder nvdec record it; those made by the float conversion of before (within 2 levels)
# have none, and a rerun redoes them.
NVDEC_RGB = "libswscale"
NVDEC_CODECS = ("h264", "hevc", "av1", "vp9", "vp8", "mpeg2video", "mpeg4", "mjpeg")
# what the GPU conversion takes: 8-bit 4:2:0 (NVDEC hands it over as the NV12 that nvdec_rgb reads; deeper or
# fuller formats come in other layouts), and the streams whose matrix libswscale reads as one of kernels/nv12_rgb.py's
# MATRICES (AVColorSpace: BT.709, unspecified, BT.470BG, SMPTE 170M), progressive and of even height and width. Other
# streams (10-bit HDR from phones, BT.2020, 4:2:2, 4:4:4, interlaced, odd sizes) are decoded on the CPU.
NVDEC_PIXEL_FORMATS = ("yuv420p", "nv12")
NVDEC_COLORSPACES = {1: "bt709", 2: "bt601", 5: "bt601", 6: "bt601"}
FIELD_ORDERS_PROGRESSIVE = (0, 1)  # AVFieldOrder: unknown, progressive; the others are interlaced orders
# whether the GPU conversion's bytes are this machine's libswscale's: its x86 converter's arithmetic is the one
# kernels/nv12_rgb.py does (checked on x86-64 only; an Arm build converts in its own way). Elsewhere the CPU decoder's
# frames go to the GPU as RGB converted here.
I420_EXACT = platform.machine().lower() in ("x86_64", "amd64")
# codecs whose non-reference frames the CPU decoder may skip: in H.264 a picture with nal_ref_idc 0 is never a
# reference. (Not HEVC: FFmpeg skips its sub-layer non-reference pictures, which higher sub-layers may use.)
PRUNED_CODECS = ("h264",)
# codecs (FFmpeg's names) whose files may be split where decoding starts afresh (see stream_index); those not in
# PRUNED_CODECS are decoded whole from each cut, and split only in SPLIT_CONTAINERS
SPLIT_CODECS = ("h264", "hevc", "vp9", "av1")
# containers whose packets carry presentation timestamps (FFmpeg's demuxer names). Others may stamp packets in decode
# order (AVI: a B-frame stream's frames come out labelled 1, 2, 4, 3, ...), so frames could not be told apart by
# timestamp until after wrong ones had been handed out: those files decode every frame.
PRUNED_CONTAINERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "mpegts", "flv")
# containers where a codec not pruned may be split. Not FLV: there FFmpeg gives VP9 and AV1 frames no duration when
# read from the start and one after a seek, and sampling by time reads the last frame's: a segment would end the file
# a clip later than one read.
SPLIT_CONTAINERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "mpegts")
MAX_PRUNED_FRAMES = 2_000_000  # longer videos (18 hours at 30 fps) decode every frame: their index stays small
# what a reader needs: (timestamps of all frames in presentation order, time base) -> needed[index] (bool)
Needs = Callable[[np.ndarray, Fraction], np.ndarray]
ATTACHED_PIC = 0x400  # AV_DISPOSITION_ATTACHED_PIC: a picture attached to the file (cover art), not its video


class DecoderUnavailable(RuntimeError):
    """A decoder that cannot be used for this file or on this machine; the message says why."""


class PruneMismatch(Exception):
    """Pruned decoding gave out frames that decoding everything would not (one missing, or out of order)."""


@dataclass
class FrameSource:
    """An opened video. ``frames`` iterates (index, frame) in presentation order, the index counting every frame
    of the video (with pruning, frames the reader does not need may be missing); their decoding counts as the
    "decode" stage. ``rgb(frame)`` is one frame as [h, w, 3] uint8 on the decoder's device ("rgb" stage)."""

    source_fps: float  # the container's average frame rate, 0.0 if unknown
    frames: Iterator[tuple[int, Any]]
    convert: Callable[[Any], torch.Tensor]
    decoder: str  # "cpu" or "nvdec"
    pruned: bool = False  # frames not needed may be skipped

    def rgb(self, frame: Any) -> torch.Tensor:
        started = CLOCK.start()
        image = self.convert(frame)
        CLOCK.stop("rgb", started)
        return image


def open_input(path: str) -> av.container.InputContainer:
    """The media file at ``path``, opened to read: its metadata tags (titles, comments) decoded as UTF-8 with
    undecodable bytes replaced, so that a tag in another encoding (Latin-1, as older files have) does not make
    the video unreadable (PyAV's default before version 19 is to fail the opening; version 19 has no such
    argument)."""
    return av.open(libav_path(path), **OPEN_ARGUMENTS)


def open_tags(path: str) -> av.container.InputContainer:
    """The media file at ``path``, opened to read its metadata tags, as :func:`open_input` opens it but with no
    frame decoded by FFmpeg's probe (a decoder told to skip every frame): a rerun of ``decode`` reads the comment
    tag of every video it wrote: with the probe, 3.4 ms for a 1-minute 160x320 mp4 of its own, without it 1.1 ms
    (``video_comment``, on a 2-core AMD EPYC)."""
    return av.open(libav_path(path), options={"skip_frame": "all"}, **OPEN_ARGUMENTS)


def open_packets(path: str) -> av.container.InputContainer:
    """The media file at ``path``, opened to read its packets, not to decode them: where the container's own index
    gives every packet's timestamp (UNPROBED_CONTAINERS), no frame is decoded while it is opened. FFmpeg's probing
    decodes the first frames of an H.264 stream to guess how far its frames are reordered, which costs more than
    reading the packets of a short file (456x256, 20 s: 6 of the 7 CPU-ms that :func:`stream_index` took); a
    decoder told to skip every frame decodes none. Other containers (MPEG-TS, FLV) may be given timestamps that
    FFmpeg works out from that guess: they are opened as :func:`open_input` does, so that their packets carry the
    timestamps the decoding pass sees."""
    container = av.open(libav_path(path), options={"skip_frame": "all"}, **OPEN_ARGUMENTS)
    if container.format.name in UNPROBED_CONTAINERS:
        return container
    container.close()
    return open_input(path)


def open_unprobed(path: str) -> tuple[av.container.InputContainer, bool]:
    """The media file at ``path``, opened to be decoded, and whether FFmpeg's probing decode was left out: for the
    ISO BMFF family (MP4, MOV; UNPROBED_DECODING) it opens as :func:`open_packets` does, no frame decoded (about
    5 CPU-ms a file at 456x256, a twentieth of reading a 10 s file); other files are opened as :func:`open_input`
    does. What the probe finds out only by decoding (the stream's pixel format, picture size and YUV matrix; the
    size until then is the MP4 sample entry's) is then known at its first frame, and the reader takes it from there
    (``ClipReader._placed_alike``, :func:`i420_matrix`); whether such an opening decodes as a probed one does is
    :func:`decodes_unprobed`'s to say."""
    container = av.open(libav_path(path), options={"skip_frame": "all"}, **OPEN_ARGUMENTS)
    if container.format.name in UNPROBED_DECODING:
        return container, True
    container.close()
    return open_input(path), False


def decodes_unprobed(stream, index: StreamIndex | None) -> bool:
    """Whether ``stream``, opened by :func:`open_unprobed` without the probe and with ``index`` (its
    :class:`StreamIndex`), gives the frames of a probed opening when :func:`pruned_frames` decodes it: an H.264
    stream whose every frame is in the sample tables of the file's "moov" box (the stream's frame count is its
    packets': no movie fragments). Two things could differ, and neither does there. The frame rate: the demuxer
    sets it from those tables, and FFmpeg's probe estimates one only where none is set. The frames' reordering
    delay, which the probe may raise after decoding the first frames: the demuxer sets it from the composition
    offsets of every frame (FFmpeg's ``mov_guess_video_delay``), which the probe can only match; a delay too short
    would give a frame early and drop one, and :func:`pruned_frames` raises :class:`PruneMismatch` on that, after
    which the reader opens the file with the probe."""
    context = stream.codec_context
    return (
        index is not None and index.prunable and context is not None and context.codec.canonical_name == "h264"
        and 0 < stream.frames == len(index.order)
    )  # fmt: skip


# the containers that open_unprobed opens without FFmpeg's probing decode: ISO BMFF, whose sample tables give each
# frame's timestamp, the stream's frame rate and (for H.264) its reordering delay (see decodes_unprobed)
UNPROBED_DECODING = ("mov,mp4,m4a,3gp,3g2,mj2",)


# containers whose packets take their timestamps from the file's own tables (MP4's sample tables, Matroska's
# blocks), whatever FFmpeg's probing guessed about the stream (see open_packets)
UNPROBED_CONTAINERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")


# PyAV 18 fails to open a file whose metadata is not UTF-8 unless told to replace what does not decode; PyAV 19
# dropped the argument (an unknown keyword is a TypeError there) and decodes such bytes as surrogates (see tag).
OPEN_ARGUMENTS = {"metadata_errors": "replace"} if int(av.__version__.split(".")[0]) < 19 else {}


def tag(container: av.container.InputContainer, name: str) -> str:
    """The container's metadata tag ``name`` ("" without one), bytes that are not UTF-8 replaced by U+FFFD under
    every PyAV version (19 gives them as surrogates, which cannot be printed or written as UTF-8)."""
    text = str(container.metadata.get(name, ""))
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # (a surrogate that stands for no byte)
        return text.encode("utf-8", "replace").decode("utf-8")


def video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream | None:
    """The container's video: its first video stream that is not a picture attached to the file (cover art, as
    music and downloaded videos carry; FFmpeg's own choice of stream passes over it too), or None."""
    return next(_videos(container), None)


def _videos(container: av.container.InputContainer) -> Iterator[av.video.stream.VideoStream]:
    return (stream for stream in container.streams.video if not stream.disposition & ATTACHED_PIC)


@contextlib.contextmanager
def cpu_frames(
    container: av.container.InputContainer,
    threads: int,
    path: str | None = None,
    needs: Needs | None = None,
    index: StreamIndex | None = None,
    start: int = 0,
) -> Iterator[FrameSource]:
    """PyAV's decoding of the container's first video stream (frame threading with ``threads`` threads). With
    ``needs`` (and ``path``, read once more for the timestamps, or their ``index`` when the caller has it),
    pruned where the stream allows it (see the module header), from frame ``start`` (a clean cut of ``index``; an
    index of a codec not in PRUNED_CODECS, given to split the file, decodes every frame from that cut)."""
    stream = video_stream(container)
    stream.thread_type = "FRAME"
    stream.thread_count = threads
    started = CLOCK.start()
    if needs is not None and index is None and path is not None:
        index = stream_index(path)
    order = index.order if needs is not None and index is not None else None
    CLOCK.stop("decode", started)
    if order is None:
        frames = enumerate(container.decode(stream))
    else:
        frames = pruned_frames(container, stream, order, lambda: needs(order, stream.time_base), start, index.prunable)
    rate = float(stream.average_rate or 0)
    yield FrameSource(rate, CLOCK.timed(frames, "decode"), pyav_rgb(threads), "cpu", pruned=order is not None)


@dataclass(frozen=True)
class StreamIndex:
    """What one pass over a video's packets (read, not decoded) tells: ``order``, the timestamps of its frames in
    presentation order; ``cuts``, the indices (in that order) of the frames where decoding may start afresh and
    give the frames from there on bit for bit as decoding from the start does (see :func:`stream_index`); and
    ``prunable``, whether the decoder may skip the non-reference frames not needed (PRUNED_CODECS)."""

    order: np.ndarray
    cuts: np.ndarray
    prunable: bool


def stream_index(path: str, split: bool = False) -> StreamIndex | None:
    """The file's :class:`StreamIndex`, or None where it cannot be trusted to keep every frame's index: a codec
    not in PRUNED_CODECS (with ``split``, one not in SPLIT_CODECS: an index only to split the file by), a
    container not in PRUNED_CONTAINERS (SPLIT_CONTAINERS for a codec not pruned), a packet without a timestamp,
    two packets with one, a packet whose frame is dropped (an edit list's), or a first packet that is not a
    keyframe shown first (and None for more than MAX_PRUNED_FRAMES frames, a file that is not a regular file, or
    one that cannot be read to the end: decoding every frame then reports what is wrong with it).

    Its cuts are the frames whose packet starts afresh by its codec's rules (:func:`_fresh_start`: an H.264 IDR
    picture, an HEVC IRAP picture, a VP9 or AV1 key frame shown at once; no frame shown after one refers to a
    frame before it) and that every packet before shows earlier and every packet after shows later, so that the
    frames from the cut on are the packets from it on. HEVC's IRAP pictures may have leading pictures: packets
    after it shown before it (RASL pictures, which refer to frames before the IRAP picture, and which decoding
    from it leaves out; RADL pictures, which it decodes). Those frames belong to the part of the file before the
    cut, and decoding from the cut passes them over (:func:`pruned_frames`)."""
    if not is_file(path):  # a FIFO or device could not be read twice
        return None
    stamps, fresh = array.array("q"), array.array("q")  # fresh: packets (in decoding order) that start afresh
    try:
        with open_packets(path) as container:
            stream = video_stream(container)
            known = stream is not None and stream.codec_context is not None  # (no decoder: the reader says so)
            codec = stream.codec_context.codec.canonical_name if known else None
            if codec not in (SPLIT_CODECS if split else PRUNED_CODECS):
                return None
            if container.format.name not in (PRUNED_CONTAINERS if codec in PRUNED_CODECS else SPLIT_CONTAINERS):
                return None
            starts_afresh = _fresh_start(codec, stream.codec_context.extradata)
            for packet in container.demux(stream):
                if packet.size == 0:  # the empty packet at the end
                    continue
                if packet.pts is None or not (stamps or packet.is_keyframe) or len(stamps) == MAX_PRUNED_FRAMES:
                    return None
                if packet.is_discard:  # (before an MP4 edit list's start) decoded, but its frame never comes out
                    return None
                if packet.is_keyframe and starts_afresh(bytes(packet)):
                    fresh.append(len(stamps))
                stamps.append(packet.pts)
    except (av.FFmpegError, OSError, IndexError):
        return None
    decoded = np.frombuffer(stamps, dtype=np.int64)
    order = np.sort(decoded)
    if not stamps or order[0] != stamps[0] or (np.diff(order) == 0).any():
        return None
    at = np.frombuffer(fresh, dtype=np.int64)
    before = np.maximum.accumulate(np.concatenate([[np.iinfo(np.int64).min], decoded[:-1]]))  # shown latest so far
    after = np.minimum.accumulate(decoded[::-1])[::-1]  # shown earliest from here on
    clean = at[(before[at] < decoded[at]) & ((after[at] == decoded[at]) | (codec == "hevc"))]
    return StreamIndex(order, np.searchsorted(order, decoded[clean]), codec in PRUNED_CODECS)


def _fresh_start(codec: str, extradata: bytes | None) -> Callable[[bytes], bool]:
    """Whether a packet of the stream (``codec``, SPLIT_CODECS; its ``extradata``) starts afresh: it holds an H.264
    IDR picture (nal_unit_type 5; not an open group of pictures' I picture, whose frames may refer to frames before
    it) or an HEVC IRAP picture (16 to 21: BLA, IDR, CRA), or it is a VP9 or AV1 key frame shown at once (its first
    frame header: VP9's frame_type 0 with show_frame 1; AV1's KEY_FRAME with show_frame 1 and not
    show_existing_frame)."""
    if codec == "vp9":
        return _vp9_key
    if codec == "av1":
        return _av1_key
    hevc = codec == "hevc"
    size = _nal_length_size(extradata, hevc)
    return functools.partial(_holds_nal, types=tuple(range(16, 22)) if hevc else (5,), hevc=hevc, length_size=size)


def _nal_length_size(extradata: bytes | None, hevc: bool = False) -> int | None:
    """Bytes of the length before each NAL unit of the stream's packets (an avcC or hvcC record: MP4, Matroska,
    FLV), or None for start codes (Annex B: MPEG-TS)."""
    if hevc and extradata and len(extradata) >= 23 and extradata[0] == 1:  # hvcC: configurationVersion 1
        return (extradata[21] & 3) + 1
    if not hevc and extradata and len(extradata) >= 5 and extradata[0] == 1:  # avcC: configurationVersion 1
        return (extradata[4] & 3) + 1
    return None


def _holds_nal(data: bytes, types: tuple[int, ...], hevc: bool, length_size: int | None) -> bool:
    """Whether an H.264 (``hevc`` False) or HEVC packet holds a NAL unit of one of ``types``."""

    def kind(header: int) -> int:
        return (header >> 1) & 0x3F if hevc else header & 0x1F

    if length_size is None:  # Annex B: each NAL unit follows 00 00 01
        at = data.find(b"\x00\x00\x01")
        while at >= 0 and at + 3 < len(data):
            if kind(data[at + 3]) in types:
                return True
            at = data.find(b"\x00\x00\x01", at + 3)
        return False
    at = 0
    while at + length_size < len(data):
        if kind(data[at + length_size]) in types:
            return True
        at += length_size + int.from_bytes(data[at : at + length_size], "big")
    return False


def _vp9_key(data: bytes) -> bool:
    """Whether a VP9 packet's (first) frame is a key frame shown at once: its uncompressed header's frame_marker
    2, then profile (a reserved bit in profile 3), show_existing_frame 0, frame_type 0, show_frame 1."""
    if not data or data[0] >> 6 != 2:
        return False
    bits = (data[0] << 8 | (data[1] if len(data) > 1 else 0)) << 2 & 0xFFFF  # after frame_marker
    profile = (bits >> 15 & 1) | (bits >> 13 & 2)  # profile_low_bit, then profile_high_bit
    bits = bits << (3 if profile == 3 else 2) & 0xFFFF
    return bits >> 13 == 0b001  # show_existing_frame 0, frame_type 0 (KEY_FRAME), show_frame 1


def _av1_key(data: bytes) -> bool:
    """Whether an AV1 temporal unit's first frame header (in an OBU_FRAME_HEADER or OBU_FRAME, each OBU with its
    size, as MP4 and Matroska carry them) is a KEY_FRAME shown at once: show_existing_frame 0, frame_type 0,
    show_frame 1 (a multi-frame stream never has the reduced still-picture header)."""
    at = 0
    while at < len(data):
        header = data[at]
        kind, extension, sized = header >> 3 & 0xF, header >> 2 & 1, header >> 1 & 1
        at += 1 + extension
        size, shift = len(data) - at, 0
        if sized:  # leb128
            size = 0
            while at < len(data):
                byte = data[at]
                at, size, shift = at + 1, size | (byte & 0x7F) << shift, shift + 7
                if not byte & 0x80:
                    break
        if kind in (3, 6):  # OBU_FRAME_HEADER, OBU_FRAME
            return at < len(data) and data[at] >> 4 == 0b0001  # show_existing_frame 0, frame_type 0, show_frame 1
        at += size
    return False


def pruned_frames(
    container: av.container.InputContainer,
    stream,
    order: np.ndarray,
    needs: Callable[[], np.ndarray],
    start: int = 0,
    skip: bool = True,
) -> Iterator[tuple[int, av.VideoFrame]]:
    """(index, frame) in presentation order: every frame ``needs()`` marks, and the reference frames decoded on
    the way; non-reference frames not needed are skipped (with ``skip``, for PRUNED_CODECS; without, every frame
    is decoded), and decoding stops after the last needed frame. With ``start`` (a clean cut,
    :class:`StreamIndex`), decoding starts at that frame, none needed before it. Raises
    PruneMismatch when a frame comes out that decoding everything would not give at that index (or when the
    cut's packet cannot be found by seeking); without ``skip``, also when a packet gives no frame, since decoding
    from the start numbers frames by their count, the index by packets."""
    needed = np.asarray(needs(), dtype=bool)
    marked = np.flatnonzero(needed)
    last = int(marked[-1]) if len(marked) else -1
    context, previous = stream.codec_context, start - 1
    if skip:  # damage that the decoder would conceal stops it instead: concealment paints from the last picture
        # decoded, which a skipped frame changes (a damaged slice header: clips 0-1 differed by up to 255)
        context.options = {**context.options, "err_detect": "explode"}
    packets = _from_cut(container, stream, order, start) if start else container.demux(stream)

    def index_of(pts: int | None) -> int:
        at = int(np.searchsorted(order, pts)) if pts is not None else len(order)
        if at == len(order) or order[at] != pts:
            raise PruneMismatch(f"a frame with timestamp {pts}, not among the packets'")
        return at

    for packet in packets:
        if packet.size and skip:  # (the empty packet at the end flushes the decoder)
            context.skip_frame = "DEFAULT" if needed[index_of(packet.pts)] else "NONREF"
        for frame in _decoded(packet, skip):
            index = index_of(frame.pts)
            if index < start:  # a leading picture of the cut (HEVC's RADL): the part before the cut's frame
                continue
            if index <= previous or needed[previous + 1 : index].any() or (not skip and index > previous + 1):
                raise PruneMismatch(f"frame {index} came out after frame {previous}")  # (one a packet did not give)
            previous = index
            yield index, frame
            if index == last:
                return
    if previous < last:
        raise PruneMismatch(f"the stream ended at frame {previous}, before needed frame {last}")


def _decoded(packet: av.Packet, skip: bool) -> list[av.VideoFrame]:
    """The frames that decoding ``packet`` gives; where frames are skipped, damage the decoder finds is a
    PruneMismatch (decoding every frame conceals it, as decoding everything does, or fails the file)."""
    try:
        return packet.decode()
    except av.FFmpegError as e:
        if skip:
            raise PruneMismatch(f"the decoder found damage ({e})") from e
        raise


def _from_cut(container: av.container.InputContainer, stream, order: np.ndarray, cut: int) -> Iterator[av.Packet]:
    """The stream's packets from the keyframe of clean cut ``cut`` (an index into ``order``) on: seeked to, then
    read, not decoded, up to it. Where the seek lands after it (MPEG-TS seeks by bytes, and lands a little past
    its target), the seek goes to a frame further back (1, 2, 4, ... frames, then the first): every packet before
    a cut in decoding order is shown before it, so one shown after it is past it, and so is the stream's end (after
    the last cut, maybe only its leading pictures, shown before it)."""
    stamp, back = int(order[cut]), 0
    while True:
        container.seek(int(order[max(cut - back, 0)]), stream=stream, backward=True, any_frame=False)
        packets = container.demux(stream)
        for packet in packets:
            if packet.pts is None:  # (the empty packet at the end)
                continue
            if packet.pts == stamp and packet.is_keyframe:
                yield packet
                yield from packets
                return
            if packet.pts > stamp:  # past the cut
                break
        if back >= cut:
            raise PruneMismatch(f"seeking to the first frame lands past the keyframe stamped {stamp}")
        back = max(1, 2 * back)


def pyav_rgb(threads: int = 1) -> Callable[[av.VideoFrame], torch.Tensor]:
    """A converter of frames to [h, w, 3] uint8 RGB, exactly ``frame.to_ndarray(format="rgb24")``, for one video.

    It reuses one ``VideoReformatter`` (an swscale context, rebuilt only when a frame's size or format changes),
    where ``to_ndarray`` gives every frame a reformatter of its own, whose setup costs more than converting a small
    frame (benchmarks/RESULTS.md: 0.99 -> 0.32 ms per 456x256 frame on a Xeon core). It converts with ``threads``
    threads, as many as the decoder has (one by default: the pipeline runs one decoding worker per core), where
    ``to_ndarray`` hands every frame to swscale's slice threads, one per core of the machine: one worker per core
    then wakes cores x cores threads, and the work they do is lost to the "rgb" stage clock (RESULTS.md, "One
    swscale thread per decoding worker"). Slices give the same bytes. Not thread-safe: one per opened video."""
    reformatter = VideoReformatter()

    def rgb(frame: av.VideoFrame) -> torch.Tensor:
        return torch.from_numpy(reformatter.reformat(frame, format="rgb24", threads=threads).to_ndarray())

    return rgb


@dataclass
class NvdecFrame:
    """A frame NVDEC decoded: NV12 planes on the GPU and its timing in the container's time base."""

    nv12: torch.Tensor  # [rows * 3 / 2, w] uint8: Y rows (the picture's h first), then interleaved U, V rows
    height: int
    pts: int | None
    time_base: Fraction
    known_duration: int | None
    matrix: str
    duration_of: Callable[[int], int | None] | None = None  # pts -> its packet's duration, read when asked

    @property
    def duration(self) -> int | None:
        """As PyAV's frame has it (its packet's): only the last frame's is ever read (how long it shows)."""
        if self.known_duration is None and self.duration_of is not None and self.pts is not None:
            return self.duration_of(self.pts)
        return self.known_duration


def yuv420p_planes(frame: av.VideoFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Y, U, V planes of a yuv420p frame as uint8 tensors [h, w], [ceil(h / 2), ceil(w / 2)] (twice), without
    the line padding."""
    if frame.format.name != "yuv420p":
        raise ValueError(f"a yuv420p frame was expected; got {frame.format.name}")
    return tuple(torch.from_numpy(plane.copy()) for plane in _plane_views(frame))


def _plane_views(frame: av.VideoFrame) -> list[np.ndarray]:
    """A yuv420p frame's Y, U and V planes as uint8 arrays [h, w], [ceil(h / 2), ceil(w / 2)] (twice) viewing its
    data without the line padding (no copy)."""
    widths = (frame.width, (frame.width + 1) // 2, (frame.width + 1) // 2)
    planes = zip(frame.planes, widths, strict=True)
    return [np.frombuffer(p, np.uint8).reshape(p.height, -1)[:, :width] for p, width in planes]


def packet_duration(path: str, index: int, pts: int) -> int | None:
    """The duration of the packet of stream ``index`` of ``path`` stamped ``pts`` (None if none is found): its
    packets are read (not decoded) from the keyframe before it, or from the start where seeking finds it not."""
    for seek in (True, False):
        with contextlib.suppress(av.FFmpegError, OSError), open_input(path) as container:
            stream = container.streams[index]
            if seek:
                container.seek(pts, stream=stream, backward=True)
            for packet in container.demux(stream):
                if packet.size and packet.pts == pts:
                    return packet.duration or None
    return None


def nvdec_unavailable() -> str | None:
    """Why NVDEC cannot decode anything on this machine (no CUDA device, PyNvVideoCodec not installed), or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import PyNvVideoCodec  # noqa: F401
    except ImportError as exc:
        return f"PyNvVideoCodec is not installed ({exc})"
    return None


def nvdec_frames(path: str, stream: av.video.stream.VideoStream, gpu: int = 0) -> Iterator[NvdecFrame]:
    """Decode ``path`` with PyNvVideoCodec on GPU ``gpu``, in presentation order; raises DecoderUnavailable when
    the package, the GPU or the codec is missing, or the stream is one :func:`nvdec_rgb` would convert wrongly
    (NVDEC_PIXEL_FORMATS, NVDEC_COLORSPACES, limited range), before any frame; and when the picture's size is not
    the stream's, or changes midway (the reader then goes on on the CPU, which handles both). The decoder is the
    one this thread kept from its last file where that is safe (:func:`_kept_decoder`), else a new one."""
    context = stream.codec_context
    codec = context.codec.canonical_name  # the format: "av1", where the decoder is libdav1d
    if codec not in NVDEC_CODECS:
        raise DecoderUnavailable(f"NVDEC does not decode {codec}")
    if (refusal := _not_converted(stream, NVDEC_PIXEL_FORMATS)) is not None:
        raise DecoderUnavailable(refusal)
    if sum(1 for _ in _videos(stream.container)) > 1:  # the CPU path reads the first
        raise DecoderUnavailable("several video streams: NVDEC's demuxer chooses one of its own")
    if (missing := nvdec_unavailable()) is not None:
        raise DecoderUnavailable(missing)
    import PyNvVideoCodec as nvc
    try:
        demuxer = nvc.CreateDemuxer(filename=libav_path(path))  # (a member: if its demuxer cannot, the CPU reads it)
        key = (nvc, gpu, demuxer.GetNvCodecId(), context.width, context.height, context.pix_fmt,
               bytes(context.extradata or b""))  # fmt: skip
        decoder = _kept_decoder(key, path, codec)
        if decoder is None:
            decoder = nvc.CreateDecoder(gpuid=gpu, codec=key[2], cudacontext=0, cudastream=0, usedevicememory=True)
    except Exception as exc:  # the package's own error types vary by version
        raise DecoderUnavailable(f"NVDEC cannot open it ({type(exc).__name__}: {exc})") from None
    height, width, time_base = context.height, context.width, stream.time_base
    matrix, surface = _matrix(stream), None
    duration_of = functools.cache(functools.partial(packet_duration, path, stream.index))
    for packet in CLOCK.timed(demuxer, "decode"):  # the last packet is empty: it flushes the decoder
        started = CLOCK.start()
        frames = decoder.Decode(packet)
        CLOCK.stop("decode", started)
        for decoded in frames:
            # copied out: a reader holds a frame across later Decode calls (until the next one is shown), and the
            # decoder's output surfaces may be reused by them (device to device, 1.4 MB for a 720p frame)
            nv12 = torch.from_dlpack(decoded)
            nv12 = nv12.reshape(-1, nv12.shape[-1]).clone()
            if surface is None and (nv12.shape[1] != width or nv12.shape[0] < height * 3 // 2):
                raise DecoderUnavailable(f"a {width}x{height} stream gave a {tuple(nv12.shape)} NV12 surface")
            if surface is not None and nv12.shape != surface:  # its picture size changed: the CPU reads it right
                raise DecoderUnavailable(f"the NV12 surface changed from {tuple(surface)} to {tuple(nv12.shape)}")
            surface = nv12.shape
            yield NvdecFrame(nv12, height, decoded.getPTS(), time_base, None, matrix, duration_of)
    if codec in KEPT_CODECS and key[-1]:  # flushed to its last frame: the next file of this thread may decode on it
        _KEPT.decoder = (key, decoder)


# NVDEC decoders kept for the next file, one per thread (a reader's files are read on one thread): making one costs
# far more than decoding a short file (at 456x256, 8 fps, 10 s: 288 frames/s made per file, 2,351 kept; RESULTS.md)
_KEPT = threading.local()
KEPT_CODECS = ("h264", "hevc")  # whose parameter sets the container holds (extradata), and whose IDR pictures can
# be told apart


def _kept_decoder(key: tuple, path: str, codec: str) -> Any:
    """The decoder this thread kept from its last file, if ``key`` is the one it was made for: the same package,
    GPU, codec, picture size, pixel format and the same parameter sets, byte for byte (the container's extradata:
    SPS and PPS, with the coded size, level and reference frames the decoder was set up for, which it would
    otherwise reconfigure to, or fail on, or scale a smaller picture into), and ``path`` starts with an IDR picture
    (:func:`_clean_start`), so that nothing of the last file can reach this one's frames; else None (and the kept
    one is let go). A decoder is kept only once a file was decoded to its end, flushed: one left midway (the reader
    stopped, or it failed) may hold that file's frames, and is never used again."""
    kept = getattr(_KEPT, "decoder", None)
    _KEPT.decoder = None
    if kept is None or kept[0] != key or codec not in KEPT_CODECS or not _clean_start(path, codec):
        return None
    return kept[1]


def release_kept_decoder() -> None:
    """Let go of the decoder this thread kept, if any (a decoding thread does when it ends, the main thread at exit:
    while CUDA is still there)."""
    _KEPT.decoder = None


atexit.register(release_kept_decoder)  # (run on the main thread)


def _clean_start(path: str, codec: str) -> bool:
    """Whether the first packet of ``path``'s video stream (``codec`` H.264 or HEVC) holds an IDR picture, which
    refers to no earlier picture and after which nothing refers to one before it (not an HEVC CRA or BLA picture,
    whose leading pictures a decoder leaves out only where it knows the stream begins there)."""
    try:
        with open_packets(path) as container:
            stream = video_stream(container)
            if stream is None or stream.codec_context is None:
                return False
            first = next((p for p in container.demux(stream) if p.size), None)
            if first is None or not first.is_keyframe:
                return False
            hevc = codec == "hevc"
            size = _nal_length_size(stream.codec_context.extradata, hevc)
            return _holds_nal(bytes(first), (19, 20) if hevc else (5,), hevc, size)
    except (av.FFmpegError, OSError):
        return False


def _not_converted(stream: av.video.stream.VideoStream, formats: tuple[str, ...], unprobed: bool = False) -> str | None:
    """Why the GPU conversion would not give libswscale's bytes for ``stream``'s frames (None: it would), for
    decoded frames of pixel formats ``formats``; ``unprobed`` (:func:`open_unprobed`): the size, pixel format and
    YUV matrix, known from the first frame (the frames are checked one by one, :func:`frame_i420_matrix`), are not
    looked at."""
    context = stream.codec_context
    sized = not unprobed  # (unprobed, the size is the MP4 sample entry's, which the stream's may contradict)
    if sized and context.height % 2:  # libswscale interpolates the chroma of an odd-height picture: the GPU's does not
        return f"odd picture height ({context.height}): only even heights are converted on the GPU"
    if sized and context.width % 2:  # (its last chroma pair would lie past the surface's row)
        return f"odd picture width ({context.width}): only even widths are converted on the GPU"
    if context.field_order not in FIELD_ORDERS_PROGRESSIVE:
        return "interlaced: libswscale converts each field apart, the GPU the whole frame"
    if context.color_range == 2:  # AVCOL_RANGE_JPEG
        return "full-range YUV: only limited range is converted on the GPU"
    if unprobed:
        return None
    if context.pix_fmt not in formats:
        return f"pixel format {context.pix_fmt}: only 8-bit 4:2:0 is converted on the GPU"
    if context.colorspace not in NVDEC_COLORSPACES:
        return f"YUV matrix {_colorspace_name(stream)}: only BT.601 and BT.709 are converted on the GPU"
    return None


def i420_matrix(stream: av.video.stream.VideoStream, unprobed: bool = False) -> str | None:
    """The YUV matrix (one of NVDEC_COLORSPACES' names) by which the GPU converts ``stream``'s CPU-decoded frames
    to libswscale's RGB bytes, or None where it would not: not on x86-64 (I420_EXACT), or the stream's size, scan,
    range, pixel format or matrix is one the conversion does not take (as for NVDEC's frames). Each frame is
    checked again (:func:`frame_i420_matrix`): a stream may change midway. An ``unprobed`` stream
    (:func:`open_unprobed`) knows its pixel format and matrix from its first frame: MATRIX_OF_FIRST_FRAME, where
    the rest allows it."""
    if not I420_EXACT or _not_converted(stream, ("yuv420p",), unprobed) is not None:
        return None
    return MATRIX_OF_FIRST_FRAME if unprobed else _matrix(stream)


MATRIX_OF_FIRST_FRAME = "the first frame's"  # i420_matrix of an unprobed stream: frame_i420_matrix of its first frame


def frame_i420_matrix(frame: av.VideoFrame) -> str | None:
    """The matrix libswscale converts this decoded frame by, where the GPU conversion gives its bytes: yuv420p,
    even size, progressive, limited range, a colorspace of NVDEC_COLORSPACES (PyAV converts by the frame's own);
    else None."""
    if (
        frame.format.name != "yuv420p" or frame.width % 2 or frame.height % 2 or frame.interlaced_frame
        or frame.color_range == 2 or frame.colorspace not in NVDEC_COLORSPACES
    ):  # fmt: skip
        return None
    return NVDEC_COLORSPACES[frame.colorspace]


def i420_bytes(frame: av.VideoFrame) -> torch.Tensor:
    """A yuv420p frame of even size as I420: its Y, U and V planes one after another without line padding, uint8
    [h * 3 / 2, w] (``kernels/nv12_rgb.py``'s ``i420_planes``), in one copy (NumPy's: without the GIL)."""
    h, w = frame.height, frame.width
    out = np.empty(h * w * 3 // 2, dtype=np.uint8)
    start = 0
    for plane in _plane_views(frame):
        out[start : start + plane.size].reshape(plane.shape)[:] = plane
        start += plane.size
    return torch.from_numpy(out.reshape(h * 3 // 2, w))


def _matrix(stream: av.video.stream.VideoStream) -> str:
    """The stream's YUV matrix, one of NVDEC_COLORSPACES: BT.709 when it says so, else BT.601 (what libswscale
    assumes when unsaid)."""
    return NVDEC_COLORSPACES.get(stream.codec_context.colorspace, "bt601")


def _colorspace_name(stream: av.video.stream.VideoStream) -> str:
    """The stream's AVColorSpace by PyAV's name where it has one (e.g. "bt2020"), else by its number."""
    value = stream.codec_context.colorspace
    with contextlib.suppress(Exception):
        from av.video.reformatter import Colorspace

        return Colorspace(value).name.lower()
    return f"AVColorSpace {value}"


def nvdec_rgb(frame: NvdecFrame) -> torch.Tensor:
    """An NVDEC frame as [h, w, 3] uint8 RGB on its GPU (:func:`nv12_clip_rgb` of its surface alone)."""
    return nv12_clip_rgb(frame.nv12[None], frame.height, frame.matrix)[0]


def nv12_clip_rgb(surfaces: torch.Tensor, height: int, matrix: str) -> torch.Tensor:
    """A clip of NVDEC's NV12 surfaces [T, rows * 3 / 2, w] (pictures ``height`` rows high, YUV ``matrix``) as
    [T, height, w, 3] uint8 RGB where they are: one Triton kernel (``kernels/nv12_rgb.py``), or its PyTorch
    reference where Triton is missing or the surfaces are not on a GPU (a test's fake decoder): the same bytes."""
    from .kernels import _triton, nv12_rgb  # (imports Triton: only where NVDEC decodes)

    if surfaces.is_cuda and not _triton.MISSING:
        return nv12_rgb.nv12_rgb(surfaces, height, matrix)
    return nv12_rgb.nv12_rgb_ref(surfaces, height, matrix)


@contextlib.contextmanager
def open_frames(
    path: str,
    container: av.container.InputContainer,
    decoder: str = "cpu",
    *,
    threads: int = 1,
    needs: Needs | None = None,
    index: StreamIndex | None = None,
    start: int = 0,
    nvdec: Callable[[str, Any], Iterator[Any]] | None = None,
    nvdec_convert: Callable[[Any], torch.Tensor] | None = None,
    notice: Callable[[str], None] = notice,
) -> Iterator[FrameSource]:
    """The file's frames from ``decoder`` ("cpu" or "nvdec"); NVDEC that cannot take this file (its first frame
    fails, or it gives none) falls back to the CPU with a one-line ``notice``. ``needs``: the frames the reader
    needs, for the CPU decoder to prune (see the module header; None decodes every frame), with the file's
    ``index`` when the reader has it and from frame ``start`` (one of its cuts). ``nvdec`` /
    ``nvdec_convert`` replace :func:`nvdec_frames` / :func:`nvdec_rgb` (default: those of this module, looked up at
    the call)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}; got {decoder!r}")
    stream = video_stream(container)
    if decoder == "nvdec":
        nvdec_convert = nvdec_convert or nvdec_rgb
        frames = (nvdec or nvdec_frames)(path, stream)
        try:
            first = next(frames, None)
            if first is None:
                raise DecoderUnavailable("NVDEC gave no frame")
        except Exception as exc:  # DecoderUnavailable, or the file rejected on its first frame
            notice(f"{path}: decoding on the CPU: {exc}")
        else:
            yield FrameSource(float(stream.average_rate or 0), enumerate(itertools.chain([first], frames)),
                              nvdec_convert, "nvdec")  # fmt: skip
            return
    with cpu_frames(container, threads, path, needs, index, start) as source:
        yield source
