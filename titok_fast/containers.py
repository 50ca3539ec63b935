"""Whether a video file is shorter than its container says: an unfinished download or copy, which libav would read
up to the cut without a word (MP4/MOV, Matroska/WebM, AVI). Read before libav opens a file; nothing here decodes.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Iterator

from .archives import member_of


def is_iso_bmff(path: str) -> bool:
    """Whether the regular file at ``path`` begins as an ISO BMFF file (MP4, MOV) does: one of ISO_FIRST_BOXES
    first (asked of a file :func:`titok_fast.video._opened` has looked at: a pipe's open would wait for a writer)."""
    try:
        with _bytes_of(path) as f:
            return f.pread(8, 0)[4:8] in ISO_FIRST_BOXES
    except OSError:  # (opening it says what is wrong)
        return False


class _Span:
    """``pread(count, at)``: up to ``count`` bytes from byte ``at`` of a file (open as ``fd``), or of the span of it
    from byte ``base`` to ``end`` (an archive's member), never past the span's end."""

    def __init__(self, fd: int, base: int = 0, end: int | None = None):
        self.fd, self.base, self.end = fd, base, end

    def pread(self, count: int, at: int) -> bytes:
        if self.end is not None:
            count = max(0, min(count, self.end - self.base - at))
        return os.pread(self.fd, count, self.base + at)


@contextlib.contextmanager
def _bytes_of(path: str) -> Iterator[_Span]:
    """The bytes of the file at ``path``, or of the archive member it names (:mod:`titok_fast.archives`)."""
    member = member_of(path)
    with open(path if member is None else member.archive, "rb", buffering=0) as f:
        yield _Span(f.fileno()) if member is None else _Span(f.fileno(), member.offset, member.offset + member.size)


# A file shorter than its container says it is: an MP4 (ISO BMFF) whose media box, or a Matroska/WebM file whose
# Segment (where its size is unknown, as a live recording's is: whose Cluster), or an AVI file whose RIFF chunk,
# declares bytes past the file's end; or a fragmented MP4 whose segment index ("sidx", as DASH streams and
# `-movflags global_sidx` have at the front) indexes fragments past it. libav reads such a file up to the cut
# without a word, so a cut-off download whose index is at the front would give the clips before the cut and count
# as done.
#
# Boxes whose missing bytes are the video's (not "free", "udta", "mfra", ...): the media boxes, and those that come
# only before a fragment's "moof" (segment type and index, producer time, event message): a cut in one of them loses
# the fragments after it.
CUT_SHORT_BOXES = (b"mdat", b"moov", b"moof", b"styp", b"sidx", b"ssix", b"prft", b"emsg")
ISO_FIRST_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")  # (QuickTime files may have no "ftyp")
ISO_SAMPLE_PARENTS = (b"trak", b"mdia", b"minf", b"stbl", b"traf")  # boxes on the way to a sample count
MAX_BOXES_WALKED = 1 << 16  # RIFF chunks, Matroska elements walked; past this many, no verdict (MP4: see below)
# An MP4's top-level boxes are walked to its end, so that no sample count hides past the walk: as many as one per
# this many bytes of the file (MAX_BOXES_WALKED at least), and as many boxes inside its "moov" and "moof" boxes; a
# file of more is refused. FFmpeg's fragments average 56 bytes a top-level box at the fewest, and 44 bytes a box
# inside them: a 16 x 16 frame each, with its segment index and producer time ("sidx", "prft", "moof", "mdat": 202
# bytes). (8-byte boxes up to that many: 3 s per 100 MB at the top level; inside a "moov", 13 s on a busy core.)
ISO_BOX_BYTES = 32
BOX_HEADER = struct.Struct(">I4s")  # a box's 32-bit size and type
BOX_WINDOW = 1 << 16  # box headers are read this many bytes at a time (small fragments: many headers a read)
# After a box larger than the window (a fragment's media), the next headers are read this many bytes at a time: a
# fragment's "moof" and the next "mdat" header in one read, not 64 KB of media. At most MAX_BOXES_WALKED reads are
# made: past them, no verdict (a file that takes that many is 256 MB at least, whose size allows as many samples).
BOX_HOP_WINDOW = 1 << 12
SIDX_BUDGET = 2 << 20  # bytes of segment indexes read per file (one holds at most 65,535 entries: 786 KB)
EBML_ID, SEGMENT_ID, CLUSTER_ID = b"\x1a\x45\xdf\xa3", b"\x18\x53\x80\x67", b"\x1f\x43\xb6\x75"
AVI_FORMS = (b"AVI ", b"AVIX")  # an AVI file's first RIFF chunk, and those an OpenDML file past 1 GiB adds
UNWRITTEN_RIFF_SIZE = 0xFFFFFFFF  # what FFmpeg writes first, and fills in at the end where it can seek back


def cut_short(path: str, size: int) -> str | None:
    """What shows ``path`` (``size`` bytes) cut short, or None: a container of another kind, or one that does not
    say (an AVI whose size was never written, a Matroska cluster of unknown size), is left to libav."""
    try:
        with _bytes_of(path) as f:
            head = f.pread(12, 0)
            if head[4:8] in ISO_FIRST_BOXES:
                return _iso_cut_short(f, size)
            if head[:4] == EBML_ID:
                return _matroska_cut_short(f, size)
            if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
                return _avi_cut_short(f, size)
    except OSError:  # unreadable: opening it says so
        return None
    return None


def _iso_cut_short(f, size: int) -> str | None:
    """The top-level boxes of an ISO BMFF file, walked by their sizes (a box runs to the file's end at size 0);
    raises TooManySamples where the samples "moov" and "moof" boxes declare are past the file's size, and
    TooManyBoxes where it has more boxes than its size allows (one per ISO_BOX_BYTES bytes, MAX_BOXES_WALKED at
    least): the walk is bounded by the file's size, and a count behind padding is read or the file refused."""
    at, window, window_at, window_end, indexed, budget, samples = 0, b"", 0, -1, 0, SIDX_BUDGET, 0
    boxes, children, reads = _BoxCount(size, "top-level boxes"), _BoxCount(size, "boxes in 'moov' and 'moof'"), 0
    while True:
        if not window_at <= at <= window_end:  # the header is not all in hand: read on from it (to the size looked at)
            if reads == MAX_BOXES_WALKED:
                return None
            hopped = at > window_at + len(window)  # (past a box larger than the window: few headers nearby)
            window, window_at = f.pread(min(BOX_HOP_WINDOW if hopped else BOX_WINDOW, size - at), at), at
            window_end, reads = at + len(window) - 16, reads + 1
            if len(window) < 8:  # the end, or a few bytes too few to tell a cut header from trailing ones
                break
        boxes.one_more()
        length, kind = BOX_HEADER.unpack_from(window, at - window_at)
        fields = 8
        if length == 1:  # a 64-bit size follows the type
            if at + 16 > window_at + len(window):
                return f"its '{kind.decode()}' box header is cut at byte {size:,}" if kind in CUT_SHORT_BOXES else None
            length, fields = int.from_bytes(window[at - window_at + 8 : at - window_at + 16], "big"), 16
        if length < 8:  # to the end of the file (0), or not a box: libav judges the rest
            return None
        if at + length > size:
            if kind not in CUT_SHORT_BOXES:
                return None
            return f"its '{kind.decode()}' box runs to byte {at + length:,} but the file ends at byte {size:,}"
        if kind == b"sidx" and length <= budget:  # past the budget, indexes are not read: no verdict from them
            indexed, budget = max(indexed, _sidx_end(f.pread(length, at), at, fields)), budget - length
        if kind in (b"moov", b"moof"):  # (its children from the window in hand, or a window read at them)
            samples += _iso_samples(_Window(f, window, window_at), at + fields, at + length, children)
            if samples > size:
                raise TooManySamples(f"its index declares {samples:,} samples in a file of {size:,} bytes (each "
                                     "sample takes one byte at least: a damaged or crafted index)")  # fmt: skip
        at += length
    if indexed > size:
        return f"its 'sidx' segment index runs to byte {indexed:,} but the file ends at byte {size:,}"
    return None


class _Window:
    """``read(at, count)``: ``count`` bytes of ``span`` (an open file's) from byte ``at``, from the bytes in hand
    (``data``, the span's from byte ``base``) where they hold them, else read from ``at`` on: BOX_WINDOW bytes where
    the walk goes on past them (small boxes: many headers a read, not a system call each), BOX_HOP_WINDOW where it
    hopped (past a large box, as a sample table: few headers nearby)."""

    def __init__(self, span: _Span, data: bytes = b"", base: int = 0):
        self.span, self.data, self.base = span, data, base

    def __call__(self, at: int, count: int) -> bytes:
        if not self.base <= at <= at + count <= self.base + len(self.data):
            hopped = not self.base <= at <= self.base + len(self.data)
            self.data, self.base = self.span.pread(BOX_HOP_WINDOW if hopped else BOX_WINDOW, at), at
        return self.data[at - self.base : at - self.base + count]


class _BoxCount:
    """The ``boxes`` walked in an ISO BMFF file of ``size`` bytes (its top-level ones, or those inside its "moov"
    and "moof" boxes): as many as its size allows (one per ISO_BOX_BYTES bytes, MAX_BOXES_WALKED at least), then
    TooManyBoxes. The walk's time is bounded by the file's size, however its boxes nest."""

    def __init__(self, size: int, boxes: str):
        self.size, self.boxes, self.most, self.walked = size, boxes, max(MAX_BOXES_WALKED, size // ISO_BOX_BYTES), 0

    def one_more(self) -> None:
        self.walked += 1
        if self.walked > self.most:
            raise TooManyBoxes(f"its {self.size:,} bytes hold more than {self.most:,} {self.boxes}, under "
                               f"{ISO_BOX_BYTES} bytes a box (no muxer writes boxes that small: a damaged or crafted "
                               "file)")  # fmt: skip


class TooManySamples(Exception):
    """An MP4 whose index declares more samples than its bytes could hold: libav builds an entry of 24 bytes per
    sample as it opens the file, so 2 KB that declare 85 million samples took 3 GB before any frame was read."""


class TooManyBoxes(TooManySamples):
    """An MP4 with more boxes than its size allows (one per ISO_BOX_BYTES bytes): a sample count past those walked
    would go unread (512 KB of empty boxes before an index that declares 100 million samples), so it is refused as
    one that declares too many samples is; and the walk's time stays bounded by the file's size (100 MB of 8-byte
    boxes inside a "moov" took a minute of CPU to walk)."""


def _iso_samples(read: Callable[[int, int], bytes], at: int, end: int, boxes: _BoxCount, depth: int = 0) -> int:
    """The samples the sample-size boxes ("stsz", "stz2": a track's count) and track runs ("trun": a fragment's)
    in a "moov" or "moof" box declare, its child boxes in bytes [at, end) of ``read(position, count)`` (ISO/IEC
    14496-12, 8.7.3 and 8.8.8). A count there is not bounded by the box's size (a constant sample size, or run
    fields left to defaults). Not counted: a track libav indexes by chunk (bounded by the chunk table), as old
    QuickTime files store PCM and IMA4 audio, whose count of audio samples may pass the file's bytes. Every box
    looked at counts in ``boxes``."""
    samples = 0
    for start, length, kind, fields in _iso_children(read, at, end, boxes):
        if kind == b"trak" and _chunk_indexed(read, start + fields, start + length, boxes):
            continue
        if kind in ISO_SAMPLE_PARENTS and depth < len(ISO_SAMPLE_PARENTS):  # (no deeper than they nest)
            samples += _iso_samples(read, start + fields, start + length, boxes, depth + 1)
        elif kind in (b"stsz", b"stz2", b"trun"):  # the count: after version, flags (and the sample size)
            samples += _iso_field(read, start + fields + (4 if kind == b"trun" else 8), start + length)
    return samples


def _iso_children(
    read: Callable[[int, int], bytes], at: int, end: int, boxes: _BoxCount
) -> Iterator[tuple[int, int, bytes, int]]:
    """(start, length, kind, header length) of the boxes in bytes [at, end) of ``read``, walked by their sizes
    (every box takes 8 bytes at least: bounded by the parent's size), up to one that does not fit (libav judges
    it); each counted in ``boxes``."""
    while at + 8 <= end:
        boxes.one_more()
        header = read(at, 16)
        length, kind, fields = int.from_bytes(header[:4], "big"), bytes(header[4:8]), 8
        if length == 1 and at + 16 <= end:
            length, fields = int.from_bytes(header[8:16], "big"), 16
        elif length == 0:  # to the end of its parent
            length = end - at
        if length < fields or at + length > end:
            return
        yield at, length, kind, fields
        at += length


def _iso_field(read: Callable[[int, int], bytes], at: int, end: int) -> int:
    """The 32-bit field at byte ``at`` of ``read``; 0 where it is not all before ``end``."""
    return int.from_bytes(read(at, 4), "big") if at + 4 <= end else 0


def _iso_child(
    read: Callable[[int, int], bytes], at: int, end: int, path: tuple[bytes, ...], boxes: _BoxCount
) -> tuple[int, int]:
    """Where the box down ``path`` (the first of each kind) from the children in [at, end) has its fields: (its
    first field, its end); (0, 0) where there is none."""
    for kind in path:
        at, end = next(((s + f, s + n) for s, n, k, f in _iso_children(read, at, end, boxes) if k == kind), (0, 0))
        if not end:
            break
    return at, end


def _chunk_indexed(read: Callable[[int, int], bytes], at: int, end: int, boxes: _BoxCount) -> bool:
    """Whether libav indexes the track whose children lie in [at, end) by chunk, not by sample: audio ("soun")
    whose time-to-sample table holds one entry of duration 1 (mov_build_index's rule)."""
    handler, handler_end = _iso_child(read, at, end, (b"mdia", b"hdlr"), boxes)
    stts, stts_end = _iso_child(read, at, end, (b"mdia", b"minf", b"stbl", b"stts"), boxes)
    if not handler_end or not stts_end or handler + 12 > handler_end or read(handler + 8, 4) != b"soun":
        return False
    entries, duration = _iso_field(read, stts + 4, stts_end), _iso_field(read, stts + 12, stts_end)  # (the first's)
    return entries == 1 and duration == 1


def _sidx_end(box: bytes, at: int, fields: int) -> int:
    """Where the fragments a segment index box (ISO/IEC 14496-12, 8.16.3) at byte ``at`` indexes end, its fields
    from byte ``fields`` of ``box`` on; 0 when it does not parse. They begin right after the box, plus its first
    offset, and lie one after another: the sum of their sizes (an entry that indexes an index counts the bytes it
    indexes too)."""
    wide = box[fields : fields + 1] == b"\x01"  # version 1: 64-bit time and offset
    offset = fields + 12 + (8 if wide else 4)  # version and flags, reference ID, timescale, earliest time
    start = offset + (8 if wide else 4) + 4  # first offset, reserved, entry count
    if len(box) < start:
        return 0
    count = int.from_bytes(box[start - 2 : start], "big")
    entries = box[start : start + 12 * count]
    if len(entries) != 12 * count:
        return 0
    sizes = sum(int.from_bytes(entries[k : k + 4], "big") & 0x7FFFFFFF for k in range(0, len(entries), 12))
    return at + len(box) + int.from_bytes(box[offset : start - 4], "big") + sizes


def _avi_cut_short(f, size: int) -> str | None:
    """The RIFF chunks of an AVI file, walked by their sizes (padded to even): "AVI ", then any "AVIX"."""
    at = 0
    for _ in range(MAX_BOXES_WALKED):
        header = f.pread(12, at)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] not in AVI_FORMS:  # the end, or other bytes
            return None
        length = int.from_bytes(header[4:8], "little")
        if length == UNWRITTEN_RIFF_SIZE:  # written to a pipe (whole), or still being written: unknown
            return None
        if at + 8 + length > size:
            form = header[8:12].decode()
            return f"its RIFF '{form}' chunk runs to byte {at + 8 + length:,} but the file ends at byte {size:,}"
        at += 8 + length + (length & 1)
    return None


def _matroska_cut_short(f, size: int) -> str | None:
    """The Segment's declared size, after the EBML header. Where that size is unknown (a live recording's, or one
    written to a pipe), the sizes of the Segment's elements as far as they go: a Cluster (the video) that runs past
    the file's end is cut; a cut between two, or an element of unknown size, says nothing."""
    ebml = _ebml_element(f, 0)
    if ebml is None or ebml[1] < 0:
        return None
    at = ebml[2] + ebml[1]
    if (segment := _ebml_element(f, at)) is None or segment[0] != SEGMENT_ID:
        return None
    _, length, header = segment
    if length >= 0:
        end = at + header + length
        return f"its Matroska segment runs to byte {end:,} but the file ends at byte {size:,}" if end > size else None
    at += header
    for _ in range(MAX_BOXES_WALKED):
        if (element := _ebml_element(f, at)) is None or element[1] < 0:  # the end, other bytes, or an unknown size
            return None
        kind, length, header = element
        if at + header + length > size:
            if kind != CLUSTER_ID:
                return None
            return f"its Matroska cluster runs to byte {at + header + length:,} but the file ends at byte {size:,}"
        at += header + length
    return None


def _ebml_element(f, at: int) -> tuple[bytes, int, int] | None:
    """(ID, size, header length) of the EBML element at byte ``at`` of ``f``, its size -1 where it is "unknown" (all
    ones); None where no whole element header is there."""
    data = f.pread(12, at)
    if not data or data[0] < 0x10:  # an ID is 1 to 4 bytes, its first byte saying how many
        return None
    id_length = 9 - data[0].bit_length()
    if len(data) <= id_length or data[id_length] == 0:  # a size is 1 to 8 bytes, its first byte saying how many
        return None
    length = 9 - data[id_length].bit_length()
    field = data[id_length : id_length + length]
    if len(field) != length:
        return None
    value = int.from_bytes(bytes([field[0] & (0xFF >> length)]) + field[1:], "big")
    return data[:id_length], -1 if value == (1 << (7 * length)) - 1 else value, id_length + length
