"""Crafted MP4 files against the container checks made before libav reads a file (``titok_fast.containers``): sample
counts hidden where libav would find them, cuts the top-level walk cannot see, and nesting past any real depth."""

import os

import pytest

from titok_fast import containers


def _box(kind: bytes, payload: bytes = b"") -> bytes:
    return (8 + len(payload)).to_bytes(4, "big") + kind + payload


def _mp4(folder, name: str, *boxes: bytes) -> tuple[str, int]:
    """A file of an "ftyp" box and ``boxes``: its path and size."""
    data = _box(b"ftyp", b"isom" + bytes(4)) + b"".join(boxes)
    (folder / name).write_bytes(data)
    return str(folder / name), len(data)


def test_a_sample_count_in_a_box_of_size_zero_inside_a_moov_is_counted(tmp_path):
    """A "trak" of size 0 runs to its parent's end (as libav reads it): the sample count in it is counted, so a
    crafted file declaring millions of samples (24 bytes of libav's memory a sample) is refused."""
    stsz = _box(b"stsz", bytes(4) + (1).to_bytes(4, "big") + (10**6).to_bytes(4, "big"))
    trak = (0).to_bytes(4, "big") + b"trak" + _box(b"mdia", _box(b"minf", _box(b"stbl", stsz)))
    path, size = _mp4(tmp_path, "zero.mp4", _box(b"moov", trak))
    with pytest.raises(containers.TooManySamples, match="declares 1,000,000 samples"):
        containers.cut_short(path, size)


def test_a_cut_of_the_last_few_indexed_bytes_is_seen(tmp_path):
    """A file cut right before the last small box its segment index covers (where the top-level walk ends cleanly)
    is seen cut."""
    fragment = _box(b"moof", bytes(60)) + _box(b"mdat", bytes(500)) + _box(b"free")
    sidx = _box(b"sidx", bytes([0, 0, 0, 0]) + bytes(8) + bytes(4) + bytes(4) + bytes(2) + (2).to_bytes(2, "big")
                + b"".join(len(fragment).to_bytes(4, "big") + bytes(8) for _ in range(2)))  # fmt: skip
    path, size = _mp4(tmp_path, "indexed.mp4", _box(b"moov", bytes(100)), sidx, fragment * 2)
    assert containers.cut_short(path, size) is None
    os.truncate(path, keep := size - 8)
    assert containers.cut_short(path, keep) == (
        f"its 'sidx' segment index runs to byte {size:,} but the file ends at byte {keep:,}"
    )


def test_a_video_tracks_count_is_counted_whatever_its_time_table(tmp_path):
    """A video track whose time-to-sample table is one entry of duration 1 is counted: only a sound track is taken
    as chunk-indexed audio."""
    count = 10**6
    hdlr = _box(b"hdlr", bytes(4) + bytes(4) + b"vide" + bytes(12))
    stts = _box(b"stts", bytes(4) + (1).to_bytes(4, "big") + count.to_bytes(4, "big") + (1).to_bytes(4, "big"))
    stsz = _box(b"stsz", bytes(4) + (1).to_bytes(4, "big") + count.to_bytes(4, "big"))
    trak = _box(b"trak", _box(b"mdia", hdlr + _box(b"minf", _box(b"stbl", stts + stsz))))
    path, size = _mp4(tmp_path, "video.mp4", _box(b"moov", trak))
    with pytest.raises(containers.TooManySamples, match="declares 1,000,000 samples"):
        containers.cut_short(path, size)


def test_boxes_nested_past_any_real_depth_are_walked_without_a_recursion_error(tmp_path):
    """3,000 "stbl" boxes nested in a "moov" (24 KB) are walked to a bounded depth: no RecursionError, which the
    reader would not catch."""
    inner = b""
    for _ in range(3000):
        inner = _box(b"stbl", inner)
    assert containers.cut_short(*_mp4(tmp_path, "deep.mp4", _box(b"moov", inner))) is None
