import contextlib
import gc
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import weakref
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from titok_fast import containers, decoders, stages, video, writing
from titok_fast.metrics import psnr, ssim
from titok_fast.preprocess import I420Clip, i420_rgb
from titok_fast.video import VideoError, iter_videos, normalize_pixels, read_clips
from titok_fast.writing import side_by_side, write_video

import videos


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Name -> path of every synthetic video the tests read, made once."""
    folder = tmp_path_factory.mktemp("videos")
    made = {
        "index24": videos.make_video(folder / "index24.mp4", 48, 32, 32, fps=24, pattern="index"),
        "index30": videos.make_video(folder / "index30.mp4", 30, 32, 32, fps=30, pattern="index"),
        "index5": videos.make_video(folder / "index5.mp4", 5, 32, 32, fps=5, pattern="index"),
        "vfr": videos.make_video(folder / "vfr.mp4", 16, 32, 32, pattern="index", vfr=True),
        "one": videos.make_video(folder / "one.mp4", 1, 32, 32, pattern="moving"),
        "odd": videos.make_video(folder / "odd.mkv", 6, 97, 130, pattern="moving"),
        "gradient": videos.make_video(folder / "gradient.mkv", 2, 64, 160, pattern="gradient"),
        "square": videos.make_video(folder / "square.mkv", 2, 64, 64, pattern="gradient"),
        "moving": videos.make_video(folder / "moving.mp4", 24, 48, 64, pattern="moving"),
        "audio": videos.make_audio_only(folder / "audio.mkv"),
        "cover": videos.make_audio_only(folder / "cover.mp4", cover=True),
        "empty": videos.make_empty(folder / "empty.mp4"),
        "garbage": videos.make_garbage(folder / "garbage.mp4"),
        "missing": folder / "missing.mp4",
        "folder": folder,
    }
    made["truncated"] = videos.make_truncated(folder / "truncated.mp4", made["moving"])
    made["scrambled"] = videos.make_scrambled(folder / "scrambled.mp4", made["moving"])
    made["unknown-codec"] = videos.make_unknown_codec(folder / "unknown-codec.mp4", made["moving"])
    return {name: str(path) for name, path in made.items()}


def sampled_indices(clips: video.ClipSet) -> list[int]:
    """Source frame index of every sampled frame of an "index" pattern video, from its mean brightness."""
    frames = torch.cat(clips.clips, dim=1)  # [3, frames, H, W]
    return [videos.level_to_index((frame.mean().item() + 1) * 127.5) for frame in frames.unbind(1)]


@pytest.mark.parametrize(
    ("frames", "tail", "clips", "last_clip_frames"),
    [(4, "drop", 4, 4), (5, "drop", 3, 5), (5, "pad", 4, 1), (16, "drop", 1, 16), (17, "pad", 1, 16)],
    ids=["T4-drop", "T5-drop", "T5-pad", "T16-exact", "T17-pad-short"],
)
def test_clip_count_and_shapes(files, frames, tail, clips, last_clip_frames):
    result = read_clips(files["index24"], frames=frames, height=16, width=24, tail=tail)  # 2 s -> 16 frames at 8 fps
    assert len(result.clips) == clips
    assert result.last_clip_frames == last_clip_frames
    assert result.start_times == pytest.approx([i * frames / 8 for i in range(clips)])
    assert (result.fps, result.source_fps, result.frames_per_clip, result.tail) == (8.0, 24.0, frames, tail)
    assert result.path == files["index24"]
    for clip in result.clips:
        assert clip.shape == (3, frames, 16, 24) and clip.dtype == torch.float32
        assert clip.min() >= -1 and clip.max() <= 1
    padded = result.clips[-1][:, last_clip_frames - 1 :]
    assert torch.equal(padded, padded[:, :1].expand_as(padded))


@pytest.mark.parametrize(
    ("name", "source_fps", "fps"),
    [("index24", 24, 8), ("index24", 24, 6), ("index30", 30, 8), ("index5", 5, 8), ("index24", 24, 24)],
    ids=["24-to-8", "24-to-6", "30-to-8", "5-to-8-upsample", "24-to-24"],
)
def test_sampling_picks_last_frame_at_or_before(files, name, source_fps, fps):
    result = read_clips(files[name], frames=1, height=16, width=16, fps=fps, sampling="time")
    source_frames = {"index24": 48, "index30": 30, "index5": 5}[name]
    samples = math.ceil(Fraction(source_frames * fps, source_fps))  # every k / fps before the end of the video
    assert sampled_indices(result) == [k * source_fps // fps for k in range(samples)]



def test_a_chunk_is_upstreams_product_of_frames_and_the_rate_ratio():
    """``int(T * (source_fps / fps))``, the ratio taken first as upstream's notebook does: 44 frames at 11 of 30 fps
    are 119 source frames (120 with the product taken first)."""
    assert video.chunk_length(44, 30.0, 11.0) == int(44 * (30.0 / 11.0)) == 119 != int(44 * 30.0 / 11.0)

@pytest.mark.parametrize(
    ("name", "source_fps", "fps", "frames"),
    [("index30", 30, 8, 4), ("index24", 24, 6, 3), ("index24", 24, 8, 5), ("index5", 5, 8, 2)],
    ids=["30-to-8-T4", "24-to-6-T3", "24-to-8-T5", "5-to-8-T2-repeats"],
)
def test_upstream_sampling_picks_the_notebooks_frames(files, name, source_fps, fps, frames):
    """As the upstream notebook: chunks of int(T * (source_fps / fps)) source frames, linspace picks inside."""
    result = read_clips(files[name], frames=frames, height=16, width=16, fps=fps)
    source_frames = {"index24": 48, "index30": 30, "index5": 5}[name]
    length = int(frames * (source_fps / fps))
    expected = [
        int(i)
        for c in range(source_frames // length)
        for i in np.linspace(c * length, c * length + length - 1, frames, dtype=int)
    ]
    assert sampled_indices(result) == expected
    assert result.start_times == pytest.approx([c * length / source_fps for c in range(len(result.clips))])


@pytest.mark.parametrize("prune", [True, False], ids=["pruned", "every-frame"])
def test_each_chunks_picks_are_those_of_its_own_linspace(tmp_path, prune):
    """The notebook picks chunk c's frames with numpy.linspace(c * L, c * L + L - 1, T, dtype=int). The first
    chunk's picks moved by c * L are not those: the floats round otherwise. 24 fps sampled at 10, T = 36: L = 86,
    and the 22nd pick of chunks 1 and 2 was the frame before upstream's (136, not 137)."""
    path = videos.make_video(tmp_path / "long24.mp4", 3 * 86 + 5, 32, 32, fps=24, pattern="moving")
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    result = read_clips(path, frames=36, height=32, width=32, fps=10, raw=True, prune=prune)
    assert len(result.clips) == 3
    for c, clip in enumerate(result.clips):
        picks = np.linspace(c * 86, c * 86 + 85, 36, dtype=int)
        assert torch.equal(clip, torch.from_numpy(np.stack([frames[i] for i in picks])).permute(3, 0, 1, 2).float())


def test_chunk_picks_are_numpys_linspace_of_each_chunk():
    """:func:`video.chunk_picks` works out many chunks' picks in one call: each row is that chunk's own call."""
    from titok_fast.video import chunk_picks

    for frames in (1, 2, 3, 5, 20, 36, 64):
        for length in (1, 2, 7, 20, 86, 97, 300, 12345):
            chunks = np.array([0, 1, 2, 3, 49, 10**6 + 3])
            rows = chunk_picks(chunks, frames, length)
            for c, row in zip(chunks.tolist(), rows, strict=True):
                assert np.array_equal(row, np.linspace(c * length, c * length + length - 1, frames, dtype=int))


def test_raw_clips_scale_as_upstream(files):
    raw = read_clips(files["moving"], frames=4, height=32, width=32, raw=True).clips[0]
    scaled = read_clips(files["moving"], frames=4, height=32, width=32).clips[0]
    assert torch.equal(scaled, (raw / 255) * 2 - 1)
    assert torch.equal(normalize_pixels(raw, torch.bfloat16), (raw.bfloat16() / 255) * 2 - 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_clips_scaled_where_they_are_read_are_those_the_model_would_scale(files, dtype):
    """The encode pipeline has its decoding workers scale the clips they resize, in the model's dtype (the thread
    driving the model scaled 8.8 MB of float32 per 20x192x192 clip before): the same values as scaling raw clips."""
    kwargs = dict(frames=4, height=32, width=32, fps=8, tail="pad")
    raw = list(video.ClipReader(files["moving"], raw=True, **kwargs))
    scaled = list(video.ClipReader(files["moving"], dtype=dtype, **kwargs))
    assert len(scaled) == len(raw) > 1
    for s, r in zip(scaled, raw, strict=True):
        assert s.dtype == dtype and torch.equal(s, normalize_pixels(r, dtype))
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype; got torch.uint8"):
        video.ClipReader(files["moving"], dtype=torch.uint8, **kwargs)


def test_variable_frame_rate_uses_timestamps(files):
    times = videos.vfr_times(16)
    result = read_clips(files["vfr"], frames=1, height=16, width=16, fps=8, sampling="time")
    expected = [max(i for i, t in enumerate(times) if t <= Fraction(k, 8)) for k in range(int(times[-1] * 8) + 1)]
    found = sampled_indices(result)
    assert found[: len(expected)] == expected
    assert found[len(expected) :] == [15] * (len(found) - len(expected))  # the last frame, until it ends
    assert len(found) - len(expected) <= 1


@pytest.mark.parametrize(("source_fps", "fps"), [(24, 12), (30, 15), (30, 10), (24, 24)])
@pytest.mark.parametrize("prune", [True, False], ids=["pruned", "every-frame"])
def test_time_sampling_takes_millisecond_stamps_half_a_millisecond_late_as_on_time(tmp_path, source_fps, fps, prune):
    """Matroska stamps whole milliseconds: frame 2 of 30 fps, exactly on the instant 1/15 s (66.67 ms), is stamped
    67 ms, after it. It is still the frame shown there, as in an MP4 of the same frames, and as in an MP4 remuxed
    from the Matroska file (``ffmpeg -c copy``: its clock is finer, 1/16000 s, its stamps still Matroska's; at 12
    fps such a file's picks were 0, 2, 3, 6, 8, 9, ...)."""
    mkv = videos.make_video(tmp_path / "index.mkv", source_fps, 32, 32, fps=source_fps, pattern="index",
                            x264="bframes=0")  # (Matroska gives B-frames' packets no DTS, which remux passes over)
    remuxed = videos.remux(tmp_path / "remuxed.mp4", mkv)
    with av.open(str(remuxed)) as container:
        time_base = container.streams.video[0].time_base
        stamps = [frame.pts * time_base for frame in container.decode(video=0)]
    assert len(stamps) == source_fps and time_base < Fraction(1, 1000)  # (what it tests: a finer clock, and
    assert all((t * 1000).denominator == 1 for t in stamps)  # stamps on whole milliseconds)
    made = videos.make_video(tmp_path / "index.mp4", source_fps, 32, 32, fps=source_fps, pattern="index")
    for path in (mkv, made, remuxed):
        result = read_clips(str(path), frames=1, height=16, width=16, fps=fps, sampling="time", prune=prune)
        assert sampled_indices(result) == [k * source_fps // fps for k in range(fps)], path.name


def test_a_slide_show_too_slow_for_upstreams_chunks_is_told_to_sample_by_time(tmp_path):
    """At 0.5 fps upstream's chunks of 4 frames at 8 fps hold no source frame: one line that says so and names
    the sampling that reads such a file, which does (one frame every 2 s, each shown 16 times)."""
    path = videos.make_video(tmp_path / "slides.mp4", 6, 32, 32, fps=0.5, pattern="index")
    with pytest.raises(VideoError, match=r"slides.mp4: 0.5 fps .* too low to sample 4 frames at 8 fps by frame "
                                         r"count .*read with --sampling time \(sampling='time' in Python\)$"):
        read_clips(str(path), frames=4, height=16, width=16, fps=8)
    result = read_clips(str(path), frames=4, height=16, width=16, fps=8, sampling="time")
    assert sampled_indices(result) == [i for i in range(6) for _ in range(16)]


@pytest.mark.parametrize("fps", [10, 50])
def test_time_sampling_on_a_clock_of_frame_periods_shows_no_frame_early(tmp_path, fps):
    """An AVI stamps frame i as tick i of a 1/25 s clock, exactly: frame 3 (120 ms) is not shown at 100 ms, and at
    50 fps each frame is shown twice, from its own time on."""
    path = tmp_path / "index.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv444p"
        for i in range(25):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(videos.pattern_frame("index", i, 32, 32), "rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        assert container.streams.video[0].time_base == Fraction(1, 25)
    result = read_clips(str(path), frames=1, height=16, width=16, fps=fps, sampling="time")
    assert sampled_indices(result) == [k * 25 // fps for k in range(fps)]


@pytest.mark.parametrize("suffix", [".avi", ".mp4"])
def test_time_sampling_puts_stamps_given_in_decode_order_in_presentation_order(tmp_path, suffix):
    """AVI stamps a B-frame stream's frames in decode order (they come out labelled 1, 3, 4, 2, ...): at the source's
    own rate, sampling "time" still shows every frame once, in order, as it does in an MP4 of the same frames (it
    showed 39 of 40 wrong)."""
    path = tmp_path / f"index{suffix}"
    with av.open(str(path), "w") as container:  # (frames without stamps: the muxer's own, as a camera's)
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"bf": "2", "b-adapt": "0", "crf": "10"}
        for i in range(24):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(videos.pattern_frame("index", i, 64, 96), "rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        stamps = [frame.pts for frame in container.decode(video=0)]
    assert (stamps == sorted(stamps)) == (suffix == ".mp4")  # (what the container gives)
    result = read_clips(str(path), frames=8, height=16, width=16, fps=24, sampling="time")
    assert sampled_indices(result) == list(range(24))


def test_time_sampling_fails_a_file_whose_timestamps_start_again(tmp_path):
    """Two recordings joined (``cat a.ts b.ts``) stamp the second from 0 again: the frames after that have no time
    on the first one's clock, so the file fails in one line (it gave the first recording's clips alone, and
    "done")."""
    recording = videos.make_video(tmp_path / "one.ts", 40, 32, 32, fps=8, pattern="index")
    joined = tmp_path / "joined.ts"
    joined.write_bytes(recording.read_bytes() * 2)
    assert len(read_clips(str(joined), frames=4, height=16, width=16, fps=8).clips) == 20  # upstream: frame count
    with pytest.raises(VideoError, match=r"joined.ts: its timestamps go back, to 0.000 s after 4.875 s, and stay "
                                         r"behind to its end \(recordings joined\?\): sampling 'time' cannot place "
                                         r"the frames after it; encode it with --sampling upstream$"):  # fmt: skip
        read_clips(str(joined), frames=4, height=16, width=16, fps=8, sampling="time")


def test_time_sampling_says_when_short_joined_recordings_start_again(capsys):
    """Recordings of 2 s or less joined: the second's frames lie within a second of the first's last, so none
    counted as behind, and the whole second recording was dropped without a word. Frames that do not advance,
    one after another, over a second of their own, are a clock started again, however far behind they start."""
    short = [i * 3600 for i in range(38)]  # 1.5 s at 25 fps
    with pytest.raises(VideoError, match=r"^joined.ts: its timestamps go back, to 0.000 s after 1.480 s, and stay "):
        list(video._resample("joined.ts", _stream(short + short), 8.0, lambda f: f.i))
    longer = [i * 3600 for i in range(75)]  # then 3 s
    shown = list(video._resample("joined.ts", _stream(short + longer), 8.0, lambda f: f.i))
    assert shown[-1] == 38 + 71 and "joined.ts: its timestamps went back, to 0.000 s after 1.480 s" in (
        capsys.readouterr().err)
    jitter = [pts - 3600 if i % 10 == 5 else pts for i, pts in enumerate(longer)]  # lone frames a little back
    list(video._resample("jitter.ts", _stream(jitter), 8.0, lambda f: f.i))
    assert capsys.readouterr().err == ""


def test_time_sampling_of_frames_without_stamps_says_what_to_use():
    frames = _stream([0, 3600])
    frames[1][1].pts = None  # (a raw .h264 stream's frames have none)
    with pytest.raises(VideoError, match=r"^raw.h264: a video frame has no presentation timestamp \(a raw stream\?\); "
                                         r"--sampling upstream reads frames by count$"):  # fmt: skip
        list(video._resample("raw.h264", frames, 8.0, lambda f: f.i))


def _stream(stamps: list[int]) -> list:
    """(index, frame) pairs of frames stamped so on a 90 kHz clock, each frame's ``i`` its index."""
    base = Fraction(1, 90000)
    return [(i, types.SimpleNamespace(pts=pts, time_base=base, duration=3600, i=i)) for i, pts in enumerate(stamps)]


def test_time_sampling_skips_a_lone_frame_stamped_wrong(capsys):
    """A capture's lone frame stamped 5 s back (a transmission error) is skipped, the file read on. So is one
    stamped ahead, 3 s or 30 minutes, with a notice: it held the frame before it until its time (30 minutes of one
    frame encoded, 3600 clips here), and the frames it jumped ahead of were then skipped as joined recordings, or
    failed the file where they stayed behind to its end. A frame after a real pause (the clock goes on from it) is
    shown at its time, as is a last frame, which may be a pause's end: one far after a regular stream's frames
    is said (it may make thousands of clips of the frame before it), a screen recording's last change after a still
    minute looks alike."""
    regular = [i * 3600 for i in range(250)]  # 10 s at 25 fps
    want = [frame for frame in video._resample("capture.ts", _stream(regular), 8.0, lambda f: f.i)]
    back = [pts - 5 * 90000 if i == 200 else pts for i, pts in enumerate(regular)]
    shown = [frame for frame in video._resample("capture.ts", _stream(back), 8.0, lambda f: f.i)]
    assert len(shown) == 80 and 200 not in shown and capsys.readouterr().err == ""
    for seconds in (3, 1800):
        ahead = [pts + seconds * 90000 if i == 100 else pts for i, pts in enumerate(regular)]
        shown = [frame for frame in video._resample("capture.ts", _stream(ahead), 8.0, lambda f: f.i)]
        assert shown == [99 if f == 100 else f for f in want]  # (frame 100 was due at 4 s)
        assert (f"capture.ts: its frame stamped {4 + seconds:.3f} s, {seconds + 0.04:.3f} s after the one before it, "
                "was stamped ahead of the frames around it: sampling 'time' skipped it") in capsys.readouterr().err
    paused = [pts + 60 * 90000 if i >= 100 else pts for i, pts in enumerate(regular)]  # a minute's pause
    shown = [frame for frame in video._resample("capture.ts", _stream(paused), 8.0, lambda f: f.i)]
    assert len(shown) == 80 + 8 * 60 and shown[32 : 32 + 8 * 60] == [99] * (8 * 60)
    again = paused[:101] + [paused[100]] + paused[101:]  # the first frame after the pause stamped twice: the
    shown = [frame for frame in video._resample("capture.ts", _stream(again), 8.0, lambda f: f.i)]  # second skipped
    assert len(shown) == 80 + 8 * 60 and 100 in shown and capsys.readouterr().err == ""
    last = regular[:-1] + [regular[-1] + 60 * 90000]
    shown = [frame for frame in video._resample("capture.ts", _stream(last), 8.0, lambda f: f.i)]
    assert len(shown) == 8 * 70 and shown.count(248) == 8 * 60  # (held from 9.92 s to the last frame's 69.96 s)
    assert ("capture.ts: its last frame is stamped 60.040 s after the one before it, over 100 times its frames' "
            "usual interval, and the frame before it is shown that long") in capsys.readouterr().err


def _stamped(path: Path, stamps_ms: list[int], last_ms: int = 0) -> Path:
    """Frames of the "index" pattern at these times (milliseconds), the last one lasting ``last_ms`` if given."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv444p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, stamp in enumerate(stamps_ms):
            frame = av.VideoFrame.from_ndarray(videos.pattern_frame("index", i, 32, 32), "rgb24")
            frame.pts, frame.time_base = stamp, Fraction(1, 1000)
            for packet in stream.encode(frame):
                packet.duration = last_ms if i == len(stamps_ms) - 1 and last_ms else packet.duration
                container.mux(packet)
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("ahead", [{100: 1804.0}, {60: 1800.0, 180: 1800.0 + 1 / 24}], ids=["one", "two"])
def test_a_file_with_a_frame_stamped_far_ahead_reads_alike_whole_and_split(tmp_path, ahead):
    """A 10 s capture (H.264 in MPEG-TS) whose frame 100 alone (or frames 60 and 180, each alone) is stamped 30
    minutes late: its presentation stamps span half an hour, so the split plan cut it into parts promising
    thousands of clips, which the parts, skipping those frames, never gave (the file failed with 2 workers and read
    with 1). A file with a gap of over a second between its stamps is not split; read whole, it gives the capture's
    20 clips, those frames skipped."""
    path = tmp_path / "glitch.ts"
    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"x264-params": "bframes=0:keyint=24"}
        packets = []
        for i in range(240):
            frame = av.VideoFrame.from_ndarray(videos.pattern_frame("moving", i, 32, 32), "rgb24")
            frame.pts = i
            packets += stream.encode(frame)
        packets += stream.encode()
        for i, packet in enumerate(packets):
            packet.time_base, packet.dts = Fraction(1, 90000), i * 3750
            packet.pts = round(ahead[i] * 90000) if i in ahead else packet.dts  # (seconds: where each is stamped)
            container.mux(packet)
    kwargs = dict(frames=4, height=16, width=16, fps=8, sampling="time")
    assert video.ClipReader(str(path), **kwargs).plan(2) == []
    assert len(read_clips(str(path), **kwargs).clips) == 20


def test_time_sampling_refuses_a_frame_held_past_the_limit(tmp_path, monkeypatch):
    """A broken timestamp days ahead would make a few frames millions of clips: a frame shown longer than
    MAX_FRAME_SECONDS (between its time and the next frame's, or the last one's duration) fails the file; a long
    pause within the limit reads, the frame repeated."""
    monkeypatch.setattr(video, "MAX_FRAME_SECONDS", 10)
    paused = _stamped(tmp_path / "paused.mkv", [0, 500, 1000, 6000, 6500])  # 5 s on frame 2
    result = read_clips(str(paused), frames=1, height=16, width=16, fps=2, sampling="time")
    assert sampled_indices(result)[:14] == [0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 4]
    broken = _stamped(tmp_path / "broken.mkv", [0, 500, 1000, 21000, 21500])  # 20 s on frame 2
    with pytest.raises(VideoError, match=r"broken.mkv: its frame at 1.000 s would fill 40 frames at 2 fps, 20 s "
                                         r"\(sampling 'time' holds a frame for at most 10 s"):  # fmt: skip
        read_clips(str(broken), frames=1, height=16, width=16, fps=2, sampling="time")
    last = _stamped(tmp_path / "last.mkv", [0, 500, 1000], last_ms=30000)  # the last frame lasts 30 s
    with pytest.raises(VideoError, match=r"last.mkv: its last frame at 1.000 s would fill 60 frames at 2 fps"):
        read_clips(str(last), frames=1, height=16, width=16, fps=2, sampling="time")
    # H.264 with B-frames, a frame every 6 s sampled every 24 s: the pruned decoder leaves out frames no output
    # frame shows, so decoded frames lie up to 12 s apart; what each shows is the same, and within the limit
    sparse = videos.make_video(tmp_path / "sparse.mp4", 98, 48, 64, fps=Fraction(1, 6))
    kwargs = dict(frames=1, height=16, width=16, fps=1 / 24, sampling="time")
    pruned, whole = video.ClipReader(str(sparse), **kwargs), video.ClipReader(str(sparse), prune=False, **kwargs)
    a, b = list(pruned), list(whole)
    assert pruned.pruned and len(a) == len(b) == 25 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_stamp_past_what_an_index_can_count_is_said_as_a_frame_held_too_long():
    """A time base of whole seconds and a stamp 2**61 s on (crafted Matroska) made the pruned decoder's and the
    planner's frame index overflow int64: 'cannot be read (OverflowError: ...)', not what was wrong."""
    reader = video.ClipReader("far.mkv", frames=4, height=16, width=16, fps=8, sampling="time")
    assert reader._dues(np.array([0, 1, 2]), Fraction(1)).tolist() == [0, 8, 16]
    with pytest.raises(VideoError, match=r"^far.mkv: its frame at 1.000 s would fill 18446744073709551608 frames at 8 "
                       r"fps, 2305843009213693952 s \(sampling 'time' holds a frame for at most 3600 s"):  # fmt: skip
        reader._dues(np.array([0, 1, 2**61, 2**61 + 1]), Fraction(1))


def test_one_frame_video(files):
    result = read_clips(files["one"], frames=4, height=16, width=16, tail="pad")
    assert len(result.clips) == 1 and result.last_clip_frames == 1
    clip = result.clips[0]
    assert torch.equal(clip, clip[:, :1].expand_as(clip))
    with pytest.raises(VideoError, match=r"one\.mp4: is shorter than one chunk of 4 frames at 8 fps"):
        read_clips(files["one"], frames=4, height=16, width=16)


def test_too_short_for_one_chunk(files):
    with pytest.raises(VideoError, match=r"index24\.mp4: is shorter than one chunk of 17 frames at 8 fps"):
        read_clips(files["index24"], frames=17, height=16, width=16)


@pytest.mark.parametrize("prune", [True, False], ids=["pruned", "every-frame"])
def test_a_chunk_longer_than_any_video_is_sampled_without_a_table_of_its_frames(files, prune):
    """fps 1e-9 from 24 fps makes chunks of 9.6e10 source frames: sampled as upstream (the first frame, padded),
    not by a table as long as the chunk (768 GB); past 2**53 frames the error says why."""
    result = read_clips(files["index24"], frames=4, height=16, width=16, fps=1e-9, tail="pad", prune=prune)
    assert sampled_indices(result) == [0, 0, 0, 0] and result.last_clip_frames == 1
    with pytest.raises(VideoError, match=r"index24\.mp4: is shorter than one chunk of 4 frames at 1e-09 fps"):
        read_clips(files["index24"], frames=4, height=16, width=16, fps=1e-9, prune=prune)
    too_long = r"index24\.mp4: sampling 4 frames at 1e-300 fps from its 24 fps makes chunks of 9.6e\+301 source"
    with pytest.raises(VideoError, match=too_long):
        read_clips(files["index24"], frames=4, height=16, width=16, fps=1e-300, tail="pad", prune=prune)


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 40), (40, 24), (97, 130)], ids=str)
def test_odd_source_size(files, height, width):
    result = read_clips(files["odd"], frames=2, height=height, width=width)  # source 97 x 130, FFV1
    assert [c.shape for c in result.clips] == [(3, 2, height, width)]


@pytest.mark.parametrize("late", [1, 4, video.STAMP_REORDER])
def test_presentation_stamps_put_a_stamp_given_up_to_the_reorder_window_late_in_place(late):
    """Stamps in decode order (an AVI's): a reference frame's stamp comes after the B-frames shown before it. One
    ``late`` places late (4 B-frames between references, up to STAMP_REORDER) is put back in order."""
    frames = [types.SimpleNamespace(pts=pts) for pts in [0, *range(2, late + 2), 1, late + 2]]
    assert [frame.pts for _, frame in video._presentation_stamps("x", enumerate(frames))] == list(range(late + 3))


def test_the_largest_source_size_is_exact():
    """MAX_SOURCE_SIDE squared pixels are read; one more row or column is refused."""
    side = video.MAX_SOURCE_SIDE
    video._check_frame_size("x", side, side, (32, 32))
    for width, height in ((side + 1, side), (side, side + 1), (2 * side, side)):
        with pytest.raises(VideoError, match=rf"x: frames of {width}x{height} pixels; at most {side}x{side}"):
            video._check_frame_size("x", width, height, (32, 32))


@pytest.mark.parametrize("rotation", ["stored", "display"])
def test_frames_beyond_the_largest_source_size_fail_their_file(files, tmp_path, monkeypatch, rotation):
    """A file that declares, or grows midway to, frames beyond MAX_SOURCE_SIDE squared (scaled down here) fails
    alone in one line, before such a frame is converted (a 16384 x 16384 one would take some 4 GB per worker)."""
    from test_preprocess import make_size_change

    monkeypatch.setattr(video, "MAX_SOURCE_SIDE", 40)
    kwargs = dict(frames=4, height=24, width=24, fps=8, rotation=rotation)
    with pytest.raises(VideoError, match=r"odd.mkv: frames of 130x97 pixels; at most 40x40 pixels' worth are read"):
        read_clips(files["odd"], **kwargs)
    grows = make_size_change(tmp_path / "grows.ts")  # 14 frames of 48x32 (under 40x40's 1600), then 64x64
    reader = video.ClipReader(grows, **kwargs)
    with pytest.raises(VideoError, match=r"grows.ts: frames of 64x64 pixels; at most 40x40"):
        for _ in reader:
            pass
    assert reader.clips_read == 3  # the clips before it came out


def test_strips_that_resize_past_the_largest_frame_fail_their_file(tmp_path, monkeypatch):
    """A strip of a few rows resizes far past its own size (short side to the clip's side): 8192 x 2 for 192 x 192
    clips would be 786432 x 192, 1.8 GB in float32 per frame. A file whose frames, declared or grown to midway,
    would resize to more than MAX_SOURCE_SIDE squared (scaled down here) fails alone in one line; the same file
    read for smaller clips is read."""
    from test_preprocess import make_size_change

    monkeypatch.setattr(video, "MAX_SOURCE_SIDE", 40)  # 1600 pixels
    strip = videos.make_video(tmp_path / "strip.mp4", 8, 4, 64)  # 256 pixels: read; for 24 x 24 clips, 384 x 24
    said = r"strip.mp4: frames of 64x4 pixels resize to 384x24 for 24x24 clips \(short side to 24, then the crop\)"
    with pytest.raises(VideoError, match=said + r"; at most 40x40 pixels' worth are resized"):
        read_clips(strip, frames=4, height=24, width=24, fps=24)
    small = read_clips(strip, frames=4, height=4, width=4, fps=24)  # 64 x 4 for 4 x 4 clips: read as it is
    assert [tuple(c.shape) for c in small.clips] == [(3, 4, 4, 4)] * 2
    grows = make_size_change(tmp_path / "grows.ts", parts=((14, 32, 48), (16, 4, 64)))  # 24 x 36, then 384 x 24
    reader = video.ClipReader(grows, frames=4, height=24, width=24, fps=8)
    with pytest.raises(VideoError, match=r"grows.ts: frames of 64x4 pixels resize to 384x24"):
        for _ in reader:
            pass
    assert reader.clips_read == 3  # the clips before it came out


def test_a_resized_frame_is_kept_as_its_crop(files):
    """The per-frame path keeps each sampled frame's crop alone, not a view of the whole resized frame (a wide
    source's would hold many times the crop's memory until the clip is stacked)."""
    reader = video.ClipReader(files["gradient"], frames=1, height=32, width=32, fps=24, raw=True)
    image = torch.zeros(64, 160, 3, dtype=torch.uint8)  # resized to 32 x 80 before the crop
    kept = reader._resized_image(image)
    assert kept.shape == (3, 32, 32) and kept.untyped_storage().nbytes() == 3 * 32 * 32 * 4


def test_resize_and_crop_keep_the_center(files):
    # 64 x 160 left-to-right ramp: short side 64 -> 32, width 160 -> 80, center crop keeps source columns 48..111
    clip = read_clips(files["gradient"], frames=1, height=32, width=32, fps=24).clips[0]
    columns = clip.mean(dim=(0, 1, 2))
    assert (columns.diff() > 0).all()
    assert float(columns[0] + columns[-1]) / 2 == pytest.approx(0, abs=0.02)  # centered
    ramp = torch.linspace(0, 255, 160) / 127.5 - 1
    assert float(columns[0]) == pytest.approx(float(ramp[48:50].mean()), abs=0.03)
    assert float(columns[-1]) == pytest.approx(float(ramp[110:112].mean()), abs=0.03)


def test_same_size_is_decoded_frame_scaled(files):
    clip = read_clips(files["square"], frames=2, height=64, width=64, fps=24).clips[0]
    decoded, _ = videos.read_frames(files["square"])
    expected = torch.from_numpy(decoded).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert torch.equal(clip, expected)


def test_one_converter_per_video_gives_each_frame_its_own_conversion(files):
    """The reader's RGB conversion reuses one swscale context; fed frames of other sizes and formats in turn
    (yuv420p H.264 at two sizes, yuv444p FFV1 at an odd size), it gives what each frame's own conversion gives,
    with one swscale thread (the default) or several."""
    from titok_fast.decoders import pyav_rgb

    frames = []
    for name in ("moving", "odd", "square", "moving"):
        with av.open(files[name]) as container:
            frames += list(container.decode(video=0))[:3]
    assert {(f.format.name, f.width) for f in frames} == {("yuv420p", 64), ("yuv444p", 130)}
    for convert in (pyav_rgb(), pyav_rgb(threads=3)):
        for frame in frames:
            got = convert(frame)
            assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), frame.to_ndarray(format="rgb24"))


def test_clips_stacked_on_the_decoding_thread_are_torch_stack():
    """The reader stacks a clip's frames with one copy on its own thread: the bytes of torch.stack, for frames that
    are views with row padding (as PyAV hands them out), along either dimension, and into a given buffer."""
    padded = torch.randint(0, 256, (5, 6, 9, 3), dtype=torch.uint8)
    frames = [padded[i, :, :7] for i in range(5)]  # [6, 7, 3] views, rows 27 bytes apart
    assert not frames[0].is_contiguous()
    assert torch.equal(video.stack_here(frames), torch.stack(frames))
    planar = [torch.rand(3, 6, 7) * 255 for _ in range(4)]
    assert torch.equal(video.stack_here(planar, dim=1), torch.stack(planar, dim=1))
    out = torch.empty(5, 6, 7, 3, dtype=torch.uint8)
    assert video.stack_here(frames, out=out) is out and torch.equal(out, torch.stack(frames))


def test_decoder_threads_do_not_change_frames(files):
    one = read_clips(files["moving"], frames=4, height=32, width=32, threads=1)
    three = read_clips(files["moving"], frames=4, height=32, width=32, threads=3)
    assert all(torch.equal(a, b) for a, b in zip(one.clips, three.clips, strict=True))


# ------------------------------------------------------------------ display rotation
@pytest.mark.parametrize("rotation", [90, -90, 180])
@pytest.mark.parametrize("preprocess", ["cpu", "device"])
def test_display_rotation_turns_frames_as_the_container_says(tmp_path, rotation, preprocess):
    """A file whose display matrix turns its frames is read, with rotation "display", as a file storing them
    turned (lossless files: decoded bit for bit) is read as stored: the same clips, resized where they would be.
    Counterclockwise, as FFmpeg reads the matrix: a phone's portrait video records -90 (a clockwise turn)."""
    frames = [videos.pattern_frame("moving", i, 48, 64) for i in range(8)]
    turned = videos.make_lossless(tmp_path / "turned.mp4", frames, rotation=rotation)
    upright = [np.ascontiguousarray(np.rot90(f, rotation // 90)) for f in frames]
    stored = videos.make_lossless(tmp_path / "stored.mp4", upright)
    kwargs = dict(frames=4, height=32, width=32, fps=8, preprocess=preprocess)
    shown = video.ClipReader(turned, rotation="display", **kwargs)
    got, want = list(shown), list(video.ClipReader(stored, **kwargs))
    assert shown.placement == preprocess and len(got) == len(want) == 2
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    as_stored = list(video.ClipReader(turned, **kwargs))  # the default: upstream's reading
    assert not any(torch.equal(a, b) for a, b in zip(as_stored, want, strict=True))
    if preprocess == "device":  # source-size frames: turned (portrait for a quarter turn)
        assert got[0].shape == (4, *upright[0].shape)


def test_display_rotation_refuses_what_it_cannot_show_and_leaves_files_without_a_matrix_as_they_are(tmp_path, files):
    frames = [videos.pattern_frame("moving", i, 32, 32) for i in range(4)]
    kwargs = dict(frames=4, height=32, width=32, fps=8, rotation="display")
    for name, angle, hflip in (("mirrored", 90, True), ("tilted", 91.5, False)):  # FFmpeg: a free rotation
        path = videos.make_lossless(tmp_path / f"{name}.mp4", frames, rotation=angle, hflip=hflip)
        said = "mirrors the picture" if hflip else "turns the picture by 91.5 degrees, not a quarter turn"
        stored = r"read it with --rotation stored \(rotation='stored' in Python\)"
        with pytest.raises(VideoError, match=rf"^{path}: its display matrix .*{said}; {stored}$"):
            read_clips(path, **kwargs)
    plain = dict(frames=4, height=32, width=32)
    assert all(torch.equal(a, b) for a, b in zip(
        read_clips(files["moving"], rotation="display", **plain).clips, read_clips(files["moving"], **plain).clips,
        strict=True))  # fmt: skip
    with pytest.raises(ValueError, match=r"rotation must be one of \('stored', 'display'\); got 'auto'"):
        video.ClipReader("x.mp4", rotation="auto", **plain)


# ------------------------------------------------------------------ pruned decoding: skipping unneeded frames
@pytest.fixture(scope="module")
def long_moving(tmp_path_factory) -> str:
    """Four seconds of H.264 with motion at 24 fps: x264's default B-frames, some of them non-reference."""
    return str(videos.make_video(tmp_path_factory.mktemp("prune") / "long.mp4", 98, 48, 64, fps=24))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("sampling", "tail", "fps"), [
    ("upstream", "drop", 8), ("upstream", "pad", 8), ("upstream", "drop", 5), ("time", "drop", 8), ("time", "pad", 7),
])  # fmt: skip
def test_pruned_decoding_gives_the_clips_of_decoding_every_frame(long_moving, threads, sampling, tail, fps):
    kwargs = dict(frames=6, height=32, width=32, fps=fps, sampling=sampling, tail=tail, threads=threads)
    every = video.ClipReader(long_moving, prune=False, **kwargs)
    pruned = video.ClipReader(long_moving, **kwargs)
    a, b = list(every), list(pruned)
    assert pruned.pruned and not every.pruned
    assert len(a) == len(b) >= 2 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert (pruned.clips_read, pruned.last_clip_frames, pruned.start_times()) == (
        every.clips_read, every.last_clip_frames, every.start_times()
    )  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2])
def test_damage_the_decoder_conceals_is_concealed_as_decoding_every_frame_does(tmp_path, threads):
    """A damaged slice header that FFmpeg conceals without an error (it paints the frame from the last one decoded,
    which a skipped frame changes: every clip differed): the pruned reader decodes the file again in full and gives
    its clips. (With frame threads FFmpeg's concealment varies from one decoding to the next, full or not: there
    the reader is held to falling back only.)"""
    source = videos.make_video(tmp_path / "source.mp4", 96, 32, 48, fps=24, pattern="jumping")
    damaged = str(videos.make_concealed(tmp_path / "damaged.mp4", source))
    kwargs = dict(frames=6, height=32, width=32, threads=threads)
    every, pruned = video.ClipReader(damaged, prune=False, **kwargs), video.ClipReader(damaged, **kwargs)
    a, b = list(every), list(pruned)
    assert len(a) == len(b) == 5 and not pruned.pruned
    assert threads > 1 or all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    clean = video.ClipReader(str(source), **kwargs)
    assert not all(torch.equal(x, y) for x, y in zip(a, clean, strict=True)) and clean.pruned  # (damage shows)


def test_pruned_decoding_of_variable_frame_rate(files):
    kwargs = dict(frames=4, height=16, width=16, fps=6, sampling="time", tail="pad")
    every, pruned = (read_clips(files["vfr"], prune=prune, **kwargs).clips for prune in (False, True))
    assert len(every) == len(pruned) and all(torch.equal(x, y) for x, y in zip(every, pruned, strict=True))


def decode_all(path: str) -> list[np.ndarray]:
    with av.open(path) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.parametrize(("tail", "clips"), [("drop", 24), ("pad", 25)])
@pytest.mark.parametrize("prune", [True, False])
def test_one_frame_clips_come_from_whole_chunks_only(long_moving, tail, clips, prune):
    """With one frame per clip the pick is a chunk's first frame: a last, partial chunk (the last 2 of 98 frames,
    in chunks of 4) gives a clip only with tail "pad", decoding every frame or not."""
    reader = video.ClipReader(long_moving, frames=1, height=16, width=16, fps=6, tail=tail, prune=prune)
    got = list(reader)
    assert len(got) == clips and reader.pruned == prune and reader.last_clip_frames == 1
    every = video.ClipReader(long_moving, frames=1, height=16, width=16, fps=6, tail=tail, prune=False)
    assert all(torch.equal(a, b) for a, b in zip(got, every, strict=True))


def test_pruned_frames_skip_non_reference_frames_and_stop_after_the_last_needed(long_moving):
    from titok_fast import decoders

    order = decoders.stream_index(long_moving).order
    assert order is not None and len(order) == 98 and (np.diff(order) > 0).all()
    needed = np.zeros(len(order), dtype=bool)
    needed[1:80:3] = True
    with av.open(long_moving) as container:
        out = list(decoders.pruned_frames(container, container.streams.video[0], order, lambda: needed))
    indices = [i for i, _ in out]
    assert set(np.flatnonzero(needed)) <= set(indices) and indices == sorted(indices) and indices[-1] == 79
    assert len(out) < 79  # non-reference frames were skipped, not only the ones after frame 79
    every = decode_all(long_moving)
    assert all(np.array_equal(frame.to_ndarray(format="rgb24"), every[i]) for i, frame in out)


def test_pruned_frames_notice_a_needed_frame_that_does_not_come_out(long_moving):
    from titok_fast import decoders

    real = decoders.stream_index(long_moving).order
    order = np.insert(real, 10, real[9] + 1)  # a frame between frames 9 and 10 that the stream does not have
    needed = np.zeros(len(order), dtype=bool)
    needed[[4, 10, 20]] = True
    with av.open(long_moving) as container, pytest.raises(decoders.PruneMismatch, match="came out after frame"):
        list(decoders.pruned_frames(container, container.streams.video[0], order, lambda: needed))


def test_pruned_frames_notice_a_needed_frame_past_the_streams_end(long_moving):
    """An index with a last packet whose frame never comes out (a stream cut short after it was indexed): the frames
    before it all come out in order, so only the end of the stream can tell that the needed last frame is missing;
    it is a mismatch (the reader then decodes every frame), not a clip quietly a frame short."""
    from titok_fast import decoders

    real = decoders.stream_index(long_moving).order
    order = np.append(real, real[-1] + 1)
    needed = np.zeros(len(order), dtype=bool)
    needed[[3, len(real) - 1, len(real)]] = True
    with av.open(long_moving) as container, pytest.raises(
        decoders.PruneMismatch, match=f"^the stream ended at frame {len(real) - 1}, before needed frame {len(real)}$"
    ):
        list(decoders.pruned_frames(container, container.streams.video[0], order, lambda: needed))


def test_interlaced_frames_get_no_i420_matrix(tmp_path):
    """libswscale converts each field of an interlaced picture apart, which the GPU's I420 conversion does not: such
    a frame goes up as RGB converted here (its stream may say nothing of it: each frame is checked), where the same
    pictures encoded progressive go up as I420."""
    from titok_fast.decoders import frame_i420_matrix

    for name, x264, matrix in (("progressive", "", "bt601"), ("interlaced", "interlaced=1:tff=1", None)):
        path = videos.make_video(tmp_path / f"{name}.mp4", 4, 48, 64, fps=8, x264=x264)
        with av.open(str(path)) as container:
            frames = list(container.decode(video=0))
        assert len(frames) == 4 and all(frame.interlaced_frame == (matrix is None) for frame in frames)
        assert [frame_i420_matrix(frame) for frame in frames] == [matrix] * 4


def test_a_segment_decoding_every_frame_notices_a_packet_that_gave_no_frame(gops):
    """Decoding from the start numbers frames by their count, a segment from a cut by its packets' index: where a
    packet gives no frame the two disagree from there on, so decoding every frame from the cut, a frame missing
    even where no clip needs it is a mismatch (the reader then decodes the file from its start)."""
    from titok_fast import decoders

    index = decoders.stream_index(gops, split=True)
    cut = int(index.cuts[1])
    order = np.insert(index.order, cut + 5, index.order[cut + 4] + 1)  # a packet whose frame never comes out
    needed = np.zeros(len(order), dtype=bool)
    needed[cut + 20] = True
    with av.open(gops) as container, pytest.raises(decoders.PruneMismatch, match=f"frame {cut + 6} came out after"):
        list(decoders.pruned_frames(container, container.streams.video[0], order, lambda: needed, cut, False))
    with av.open(gops) as container:  # the real index: every frame from the cut to the needed one
        got = [i for i, _ in decoders.pruned_frames(container, container.streams.video[0], index.order,
                                                    lambda: needed, cut, False)]  # fmt: skip
    assert got == list(range(cut, cut + 21))


def test_streams_that_are_not_pruned(files, long_moving, monkeypatch):
    from titok_fast import decoders

    assert decoders.stream_index(files["odd"]) is None  # FFV1: not in PRUNED_CODECS
    reader = video.ClipReader(files["odd"], frames=2, height=16, width=16, fps=24)
    assert len(list(reader)) == 3 and not reader.pruned
    assert decoders.stream_index(files["moving"]) is not None
    assert decoders.stream_index(files["truncated"]) is None  # full decoding says what is wrong
    assert decoders.stream_index(files["folder"]) is None
    monkeypatch.setattr(decoders, "MAX_PRUNED_FRAMES", 97)  # a video longer than that keeps no index
    assert decoders.stream_index(long_moving) is None
    reader = video.ClipReader(long_moving, frames=6, height=32, width=32, fps=8)
    assert len(list(reader)) == 5 and not reader.pruned  # 98 // 18 whole chunks


def test_an_avi_with_b_frames_is_not_pruned_and_gives_the_clips_of_decoding_every_frame(tmp_path):
    """AVI stamps a B-frame stream's packets in decoding order, so its frames come out labelled 1, 2, 4, 3, ...:
    pruned by those labels, clip 0 once held frames in the wrong places (44 of 128 tokens changed)."""
    path = tmp_path / "b-frames.avi"
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"bf": "3", "g": "12"}
        for i in range(77):
            image = np.zeros((64, 96, 3), np.uint8)
            image[..., 0] = i * 3
            image[32 + i % 8 * 4 : 36 + i % 8 * 4, :, 1] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:  # the premise: frames come out with timestamps out of order
        stamps = [frame.pts for frame in container.decode(video=0)]
    assert stamps != sorted(stamps)
    kwargs = dict(frames=8, height=64, width=96, fps=8)
    reader, every = video.ClipReader(path, **kwargs), video.ClipReader(path, prune=False, **kwargs)
    pruned_clips, every_clips = list(reader), list(every)
    assert not reader.pruned and len(pruned_clips) == len(every_clips) == 3
    assert all(torch.equal(a, b) for a, b in zip(pruned_clips, every_clips, strict=True))


def _losing_a_frame(monkeypatch, lost_by: tuple[str, ...]) -> list[str]:
    """Pruned decoding made to lose the 30th frame that comes out, as a broken stream might (a reordering delay too
    short gives a frame early and drops one), on the passes ``lost_by`` names ("unprobed", "probed"); returns the
    passes made, as they are made."""
    real, seen = decoders.pruned_frames, []

    def losing(container, stream, *args):
        seen.append("unprobed" if stream.codec_context.format is None else "probed")
        for count, item in enumerate(real(container, stream, *args)):
            if count == 30 and seen[-1] in lost_by:
                raise decoders.PruneMismatch("frame 31 came out after frame 32")
            yield item

    monkeypatch.setattr(decoders, "pruned_frames", losing)
    return seen


@pytest.mark.parametrize(("lost_by", "passes", "pruned"), [
    (("unprobed", "probed"), ["unprobed", "probed", "every frame"], False),
    (("unprobed",), ["unprobed", "probed"], True),
])  # fmt: skip
def test_a_pruning_mismatch_decodes_the_file_again(long_moving, monkeypatch, lost_by, passes, pruned):
    """Whatever pruned decoding gave out before it went wrong, the clips are those of decoding every frame. Where
    it went wrong on a file opened without FFmpeg's probe (a reordering delay too short gives a frame early and
    drops one), the file is opened again with the probe and decoded pruned; where it went wrong on a probed
    opening, every frame is decoded."""
    kwargs = dict(frames=6, height=32, width=32, fps=8)
    every = read_clips(long_moving, prune=False, **kwargs).clips
    seen = _losing_a_frame(monkeypatch, lost_by)
    reader = video.ClipReader(long_moving, **kwargs)
    clips = list(reader)
    assert seen + ["every frame"] * (not reader.pruned) == passes and reader.pruned == pruned
    assert len(clips) == len(every) >= 2 and all(torch.equal(x, y) for x, y in zip(clips, every, strict=True))


KEYINT = "keyint=24:min-keyint=24:scenecut=0"  # an IDR picture every 24 frames, x264's B-frames between


@pytest.fixture(scope="module")
def gops(tmp_path_factory) -> str:
    """Six and a quarter seconds of H.264 at 24 fps with an IDR picture every second: a file that can be split."""
    return str(videos.make_video(tmp_path_factory.mktemp("split") / "gops.mp4", 150, 48, 64, fps=24, x264=KEYINT))


def test_the_stream_index_cuts_at_idr_pictures_in_every_container(gops, tmp_path):
    """IDR pictures are found in MP4's, Matroska's and FLV's length-prefixed packets and in MPEG-TS's start
    codes; an open group of pictures' keyframes are not IDR pictures (frames before them in showing order come
    after them in decoding order, and may refer to the group before), so such a file has no cut but the first."""
    from titok_fast import decoders

    cuts = list(range(0, 150, 24))
    for suffix in ("mp4", "mkv", "flv", "ts"):
        source = gops if suffix == "mp4" else videos.remux(tmp_path / f"gops.{suffix}", gops)
        index = decoders.stream_index(str(source))
        assert index.cuts.tolist() == cuts and len(index.order) == 150, suffix
    opened = videos.make_video(tmp_path / "open.mp4", 150, 48, 64, fps=24, x264=f"{KEYINT}:open-gop=1")
    assert decoders.stream_index(str(opened)).cuts.tolist() == [0]
    for source in (opened, videos.remux(tmp_path / "open.ts", opened)):  # length-prefixed, then start codes
        with av.open(str(source)) as container:
            stream = container.streams.video[0]
            size = decoders._nal_length_size(stream.codec_context.extradata)
            fresh = decoders._fresh_start("h264", stream.codec_context.extradata)
            idr = [fresh(bytes(p)) for p in container.demux(stream) if p.is_keyframe]
        assert idr == [True] + [False] * (len(cuts) - 1) and size == (4 if source == opened else None)


def _split(path: str, parts: int, monkeypatch, **kwargs) -> tuple[list[torch.Tensor], list[video.Segment], list]:
    """The clips of reading ``path`` split into up to ``parts`` segments of 2 clips or more, each segment read
    by a reader of its own, in order; the segments; the keyframes seeked to."""
    from titok_fast import decoders

    monkeypatch.setattr(video, "SEGMENT_CLIPS", 2)
    seeks, seek = [], decoders._from_cut
    monkeypatch.setattr(decoders, "_from_cut", lambda c, s, order, cut: seeks.append(cut) or seek(c, s, order, cut))
    head, segments = video.ClipReader(path, **kwargs), []
    head.split_into, head.on_split = parts, segments.extend
    clips = list(head)
    assert not segments or head.pruned == segments[0].prunable  # (an index only to split by: decoded whole)
    for segment in segments:
        reader = video.ClipReader(path, segment=segment, **kwargs)
        clips += list(reader)
        assert reader.pruned
    return clips, segments, seeks


@pytest.mark.parametrize(("sampling", "tail", "fps"), [
    ("upstream", "drop", 8), ("upstream", "pad", 5), ("time", "pad", 7), ("time", "drop", 24),
])  # fmt: skip
def test_a_file_read_in_segments_gives_the_clips_of_one_read(gops, monkeypatch, sampling, tail, fps):
    """Each segment decodes from its own IDR picture (seeked to) only what its clips need; together they give
    the clips of decoding every frame from the start."""
    kwargs = dict(frames=3, height=32, width=32, fps=fps, sampling=sampling, tail=tail)
    every = list(video.ClipReader(gops, prune=False, **kwargs))
    clips, segments, seeks = _split(gops, 3, monkeypatch, **kwargs)
    assert len(segments) == 2 and 0 < segments[0].cut < segments[1].cut and segments[1].clips is None
    assert seeks == [segment.cut for segment in segments]
    assert len(clips) == len(every) and all(torch.equal(a, b) for a, b in zip(clips, every, strict=True))


@pytest.mark.parametrize(("sampling", "tail", "fps"), [
    ("upstream", "pad", 5), ("time", "pad", 7), ("time", "drop", 24),
])  # fmt: skip
def test_clips_per_video_gives_the_first_clips_of_one_read_whole_or_split(gops, monkeypatch, sampling, tail, fps):
    """``clips_per_video`` K gives the first K clips of reading the whole file, bit for bit (all of them where it
    has no more, the padded tail included), with their start times; read split, the parts share those K clips
    and give the same; the decoder stops within a clip of the last frame they use."""
    kwargs = dict(frames=3, height=32, width=32, fps=fps, sampling=sampling, tail=tail)
    whole = video.ClipReader(gops, prune=False, **kwargs)
    every = list(whole)
    real_open, decoded = video.open_frames, []

    @contextlib.contextmanager
    def counted(*args, **kw):
        with real_open(*args, **kw) as source:
            frames = source.frames
            source.frames = (decoded.append(i) or (i, frame) for i, frame in frames)
            yield source

    monkeypatch.setattr(video, "open_frames", counted)
    for k in (1, 7, len(every) - 1, len(every), len(every) + 3):
        n = min(k, len(every))
        decoded.clear()
        reader = video.ClipReader(gops, clips_per_video=k, **kwargs)
        clips = list(reader)
        assert len(clips) == n and all(torch.equal(a, b) for a, b in zip(clips, every, strict=False)), k
        assert reader.start_times() == whole.start_times()[:n]
        assert reader.last_clip_frames == (whole.last_clip_frames if n == len(every) else 3)
        if k < len(every) - 1:  # a second of frames (24) a clip at most: decoding stopped after them
            assert max(decoded) < (k + 1) * 24, (k, max(decoded))
        split, segments, _ = _split(gops, 3, monkeypatch, clips_per_video=k, **kwargs)
        assert all(segment.first < k for segment in segments)
        assert len(split) == n and all(torch.equal(a, b) for a, b in zip(split, every, strict=False)), k
    for wrong in (0, 2**31):
        with pytest.raises(ValueError, match=rf"^clips_per_video must be None or an integer in \[1, 2147483647\]; "
                                             rf"got {wrong}$"):  # fmt: skip
            video.ClipReader(gops, clips_per_video=wrong, **kwargs)
    assert len(list(video.ClipReader(gops, clips_per_video=2**31 - 1, **kwargs))) == len(every)


def test_a_few_clips_of_a_long_file_are_read_without_its_index_and_a_pause_after_them_is_said_of_no_frame(
    tmp_path, capsys
):
    """Clips spanning less than a quarter of a video (as its container says) are decoded from its start, without
    the index of the whole file (which reads every packet); more of them are read pruned, through it. Those ending
    in a pause (sampling "time") stop at the frame after the pause, pruned: not the file's last frame, so no notice
    says it is stamped far after the one before it; the clips are the first of a whole read either way."""
    path = tmp_path / "paused.mp4"  # 10 s at 30 fps, a pause of 5 s, 5 s more: 20 s; no B-frames
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"x264-params": "keyint=30:min-keyint=30:scenecut=0", "preset": "ultrafast"}
        stream.codec_context.time_base = Fraction(1, 90000)
        for i, stamp in enumerate([3000 * k for k in range(300)] + [1350000 + 3000 * k for k in range(150)]):
            frame = av.VideoFrame.from_ndarray(videos.pattern_frame("moving", i, 32, 32), "rgb24")
            frame.pts, frame.time_base = stamp, Fraction(1, 90000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    kwargs = dict(frames=3, height=32, width=32, fps=8, sampling="time")
    every = list(video.ClipReader(str(path), prune=False, **kwargs))
    assert len(every) == 53 and capsys.readouterr().err == ""
    indexed, stream_index = [], video.stream_index
    video_index = lambda *args, **kw: indexed.append(args) or stream_index(*args, **kw)  # noqa: E731
    for k, pruned in ((3, False), (28, True)):  # 1.1 s and 10.5 s of 20 s: below and above a quarter
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(video, "stream_index", video_index)
            reader = video.ClipReader(str(path), clips_per_video=k, **kwargs)
            clips = list(reader)
        assert len(clips) == k and all(torch.equal(a, b) for a, b in zip(clips, every, strict=False))
        assert reader.pruned == pruned and bool(indexed) == pruned and capsys.readouterr().err == "", k
        indexed.clear()
        with pytest.MonkeyPatch.context() as patch:  # (a Ray job's plan: the same rule)
            patch.setattr(video, "stream_index", video_index)
            video.ClipReader(str(path), clips_per_video=k, **kwargs).plan(4)
        assert bool(indexed) == pruned
        indexed.clear()


# a key frame every 24 frames from each encoder, with its B-frames (x265), hidden alternate reference frames (libvpx)
# or hidden frames shown later (SVT-AV1's random access) between them
KEYFRAMES = {
    "libx265": {"crf": "20", "x265-params": "log-level=error:keyint=24:min-keyint=24:scenecut=0:open-gop=0"},
    "libvpx-vp9": {"g": "24", "crf": "30", "b": "0", "cpu-used": "8"},
    "libsvtav1": {"g": "24", "preset": "12"},
}


def test_encoding_av1_leaves_the_test_process_as_it_was(tmp_path):
    """SVT-AV1 run as root makes the thread that opens it real time (SCHED_FIFO 99) and leaves it so; the videos
    this suite makes leave no test process so (tests/conftest.py fails a test that does)."""
    if "libsvtav1" not in av.codecs_available:
        pytest.skip("this PyAV has no SVT-AV1")
    before = videos.scheduling()
    videos.make_video(tmp_path / "av1.mkv", 2, 48, 64, encoder="libsvtav1", options={"preset": "12"})
    assert videos.scheduling() == before


@pytest.fixture(scope="module")
def coded(tmp_path_factory) -> dict[str, str]:
    """The six and a quarter seconds of ``gops``, in HEVC (MP4), VP9 (WebM) and AV1 (MP4)."""
    folder = tmp_path_factory.mktemp("codecs")
    made = {}
    for encoder, suffix in (("libx265", "mp4"), ("libvpx-vp9", "webm"), ("libsvtav1", "mp4")):
        made[encoder] = str(videos.make_video(folder / f"{encoder}.{suffix}", 150, 48, 64, fps=24, encoder=encoder,
                                              options=KEYFRAMES[encoder]))  # fmt: skip
    return made


def test_the_stream_index_reads_packets_without_decoding_frames_and_is_what_a_probed_opening_gives(
    files, gops, coded, tmp_path, monkeypatch
):
    """Opening a file to read its packets decodes no frame where the container's tables give the timestamps (MP4,
    Matroska: FFmpeg's probing decoded the first frames of an H.264 stream, most of the index's cost on a short
    file); MPEG-TS and FLV are opened as before. Either way the index is the one a probed opening gives."""
    from titok_fast import decoders

    sources = {suffix: gops if suffix == "mp4" else str(videos.remux(tmp_path / f"gops.{suffix}", gops))
               for suffix in ("mp4", "mkv", "flv", "ts")}  # fmt: skip
    sources |= {"vfr": files["vfr"], "moving": files["moving"], **coded}
    opened = videos.make_video(tmp_path / "open.mp4", 150, 48, 64, fps=24, x264=f"{KEYINT}:open-gop=1")
    sources["open-gop"] = str(opened)
    probed = set()
    for name, source in sources.items():
        with decoders.open_packets(source) as container:  # H.264's pixel format is known from a decoded frame only
            context = container.streams.video[0].codec_context
            if context.codec.canonical_name == "h264" and context.format is not None:
                probed.add(name)
    assert probed == {"flv", "ts"}
    cheap = {name: (decoders.stream_index(s), decoders.stream_index(s, split=True)) for name, s in sources.items()}
    monkeypatch.setattr(decoders, "open_packets", decoders.open_input)
    for name, source in sources.items():
        probed = (decoders.stream_index(source), decoders.stream_index(source, split=True))
        for got, expected in zip(cheap[name], probed, strict=True):
            assert (got is None) == (expected is None), name
            if got is not None:
                assert np.array_equal(got.order, expected.order) and np.array_equal(got.cuts, expected.cuts), name
                assert got.prunable == expected.prunable, name
    assert cheap["mp4"][0] is not None and cheap["libx265"][1] is not None  # (the comparison compared indices)


@pytest.mark.parametrize("sampling", ["upstream", "time"])
def test_h264_in_mp4_is_decoded_without_ffmpegs_probe_into_a_probed_openings_clips(
    files, gops, coded, long_moving, tmp_path, monkeypatch, sampling
):
    """An H.264 stream whose frames are all in an MP4's sample tables is decoded as opened without FFmpeg's probing
    decode (open_unprobed); a Matroska file, a fragmented MP4 and HEVC are opened again with it. The clips, the
    I420 hand-over's matrix (the first frame's there: the stream's pixel format and matrix are unknown before it)
    and the pruning are those of a probed opening."""
    bt709 = videos.make_video(tmp_path / "bt709.mp4", 40, 48, 64, fps=24, x264="colormatrix=bt709:colorprim=bt709")
    fragmented = videos.remux(tmp_path / "frag.mp4", gops, {"movflags": "frag_keyframe+empty_moov"})
    sources = {"b-frames": long_moving, "vfr": files["vfr"], "idr": gops, "bt709": str(bt709),
               "mkv": str(videos.remux(tmp_path / "gops.mkv", gops)), "hevc": coded["libx265"],
               "fragmented": str(fragmented)}  # fmt: skip
    kwargs = dict(frames=4, height=32, width=32, fps=8, sampling=sampling, tail="pad", preprocess="device")
    kwargs["upload"] = "i420"

    def read(source: str) -> tuple[list, dict]:
        reader = video.ClipReader(source, **kwargs)
        clips = list(reader)
        return clips, {"unprobed": reader._unprobed, "pruned": reader.pruned, "i420": reader._i420}

    unprobed = {name: read(source) for name, source in sources.items()}
    monkeypatch.setattr(video, "open_unprobed", lambda path: (decoders.open_input(path), False))
    for name, source in sources.items():
        clips, how = read(source)
        assert unprobed[name][1]["unprobed"] == (name not in ("mkv", "hevc", "fragmented")), name
        assert {**unprobed[name][1], "unprobed": False} == how, name
        assert len(clips) == len(unprobed[name][0]) > 0, name
        assert all(same_clip(a, b) for a, b in zip(clips, unprobed[name][0], strict=True)), name
    assert unprobed["bt709"][1]["i420"] == "bt709" and unprobed["b-frames"][1]["i420"] == "bt601"
    assert unprobed["b-frames"][1]["pruned"]


def test_a_retry_keeps_the_i420_matrix_its_first_pass_took(tmp_path, monkeypatch):
    """The I420 matrix is decided once a reading: an unprobed pass takes its first frame's (here the stream's own,
    BT.601), where a probed opening's would be the container's (its "colr" box says BT.709). A chunk that a retry
    finishes holds frames of both passes: converted by one matrix, the right one, its RGB is a probed reading's."""
    source = videos.make_video(tmp_path / "601.mp4", 96, 32, 48, fps=24, x264="colormatrix=smpte170m")
    path = tmp_path / "colr709.mp4"
    with av.open(str(source)) as src, av.open(str(path), "w") as out:
        stream = out.add_stream_from_template(src.streams.video[0])
        stream.codec_context.colorspace = stream.codec_context.color_primaries = stream.codec_context.color_trc = 1
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    kwargs = dict(frames=4, height=32, width=32, fps=24, preprocess="device", upload="i420", raw=True)

    def rgb(clip):
        return i420_rgb(clip) if isinstance(clip, I420Clip) else clip

    probed = [rgb(clip) for clip in video.ClipReader(str(path), prune=False, **kwargs)]
    seen = _losing_a_frame(monkeypatch, ("unprobed",))  # (mid-chunk)
    clips = [rgb(clip) for clip in video.ClipReader(str(path), **kwargs)]
    assert seen == ["unprobed", "probed"] and len(clips) == len(probed) > 8
    assert all(torch.equal(a, b) for a, b in zip(clips, probed, strict=True))


@pytest.mark.parametrize(("width", "height", "again"), [(9000, 9000, True), (16, 4000, True), (33, 17, False),
                                                      (64, 64, False)])  # fmt: skip
def test_an_mp4_whose_sample_entry_contradicts_its_streams_size_is_read_as_a_probed_opening_reads_it(
    long_moving, tmp_path, monkeypatch, width, height, again
):
    """Opened without the probe, a file's picture size is its MP4 sample entry's until a frame is decoded; the
    probe takes the stream's. Where the entry's would place the frames otherwise (too large a size to resize on the
    device, a strip kept on the host) the file is opened ``again`` with the probe once the first frame shows it;
    an entry that says an odd size, or the coded size (64 rows for 48, as 1088 for 1080), is placed alike and
    read as it was opened. Either way the clips, their placement and their I420 matrix are a probed opening's."""
    import struct

    data = bytearray(Path(long_moving).read_bytes())
    entry = data.index(b"avc1", data.index(b"stsd")) - 4
    struct.pack_into(">HH", data, entry + 32, width, height)  # (VisualSampleEntry: width, height)
    path = tmp_path / "entry.mp4"
    path.write_bytes(data)
    kwargs = dict(frames=4, height=32, width=32, fps=8, preprocess="auto", device="cuda", upload="i420", raw=True)
    monkeypatch.setattr(video.torch.cuda, "is_available", lambda: True)

    def read() -> tuple[list, tuple, bool]:
        reader = video.ClipReader(str(path), **kwargs)
        return list(reader), (reader.placement, reader._i420, reader.pruned), reader._unprobed

    unprobed = read()
    monkeypatch.setattr(video, "open_unprobed", lambda p: (decoders.open_input(p), False))
    probed = read()
    assert unprobed[1] == probed[1] == ("device", "bt601", True) and unprobed[2] != again
    assert len(unprobed[0]) == len(probed[0]) > 0
    assert all(same_clip(a, b) for a, b in zip(unprobed[0], probed[0], strict=True))


@pytest.mark.parametrize(("encoder", "suffix"), [
    ("libx265", "mp4"), ("libx265", "mkv"), ("libx265", "ts"), ("libvpx-vp9", "webm"), ("libvpx-vp9", "mp4"),
    ("libsvtav1", "mp4"), ("libsvtav1", "mkv"),
])  # fmt: skip
def test_hevc_vp9_and_av1_files_are_cut_at_their_key_frames(coded, tmp_path, encoder, suffix):
    """HEVC IDR pictures (length-prefixed and after start codes), VP9 key frames and AV1 key frames shown at once
    are cuts; the index is only to split by (their non-reference frames are not skipped), so pruning gets none.
    (x265's B-frames, libvpx's hidden alternate reference frames, SVT-AV1's frames shown again later.)"""
    from titok_fast import decoders

    source = coded[encoder]
    if not source.endswith(suffix):  # (encoded again: PyAV copies a stream by its decoder's name, AV1's libdav1d)
        source = str(videos.make_video(tmp_path / f"v.{suffix}", 150, 48, 64, fps=24, encoder=encoder,
                                       options=KEYFRAMES[encoder]))  # fmt: skip
    index = decoders.stream_index(source, split=True)
    assert index.cuts.tolist() == list(range(0, 150, 24)) and len(index.order) == 150 and not index.prunable
    assert decoders.stream_index(source) is None
    if encoder == "libx265":  # an hvcC record's 4-byte lengths, or start codes
        with av.open(source) as container:
            size = decoders._nal_length_size(container.streams.video[0].codec_context.extradata, hevc=True)
        assert size == (None if suffix == "ts" else 4)


@pytest.mark.parametrize("leading", ["open-gop=1", "open-gop=0:radl=2"], ids=["cra-rasl", "idr-radl"])
def test_hevcs_leading_pictures_belong_to_the_segment_before_their_cut(tmp_path, monkeypatch, leading):
    """HEVC's IRAP pictures are cuts even with leading pictures (decoded after one, shown before it): a CRA
    picture's RASL pictures (an open group of pictures, x265's default), which refer to the group before and
    which decoding from the CRA picture leaves out, or an IDR picture's RADL pictures, which it decodes. Either
    way they are the segment before's, which decodes on past the cut to give them."""
    from titok_fast import decoders

    options = {"x265-params": f"log-level=error:keyint=24:min-keyint=24:scenecut=0:{leading}"}
    source = str(videos.make_video(tmp_path / "leading.mp4", 150, 48, 64, encoder="libx265", options=options))
    with av.open(source) as container:
        packets = [(p.pts, p.is_keyframe) for p in container.demux(video=0) if p.size]
    keys = [k for k, (_, key) in enumerate(packets) if key]
    assert len(keys) == 7 and all(min(pts for pts, _ in packets[k:]) < packets[k][0] for k in keys[1:])
    assert decoders.stream_index(source, split=True).cuts.tolist() == list(range(0, 150, 24))
    for sampling, tail, fps in (("upstream", "drop", 8), ("time", "pad", 7)):
        kwargs = dict(frames=3, height=32, width=32, fps=fps, sampling=sampling, tail=tail)
        every = list(video.ClipReader(source, prune=False, **kwargs))
        clips, segments, seeks = _split(source, 3, monkeypatch, **kwargs)
        assert len(segments) == 2 and seeks[-2:] == [segment.cut for segment in segments]
        assert len(clips) == len(every) and all(torch.equal(a, b) for a, b in zip(clips, every, strict=True))


@pytest.mark.parametrize("encoder", ["libvpx-vp9", "libsvtav1"])
def test_vp9_and_av1_in_flv_are_read_whole(tmp_path, monkeypatch, encoder):
    """In FLV, FFmpeg gives VP9 and AV1 frames a duration after a seek and none from the start, so sampled by
    time, a segment from a cut would show the file's last frame longer than one read: such a file is not split."""
    from titok_fast import decoders

    source = str(videos.make_video(tmp_path / "v.flv", 145, 64, 64, fps=30, encoder=encoder,
                                   options=KEYFRAMES[encoder]))  # fmt: skip
    assert decoders.stream_index(source, split=True) is None
    kwargs = dict(frames=1, height=16, width=16, fps=11, sampling="time", tail="drop")
    every = list(video.ClipReader(source, prune=False, **kwargs))
    clips, segments, _ = _split(source, 3, monkeypatch, **kwargs)
    assert not segments and len(clips) == len(every)
    assert all(torch.equal(a, b) for a, b in zip(clips, every, strict=True))


def test_seeking_finds_a_last_cut_followed_only_by_its_leading_pictures(tmp_path):
    """In MPEG-TS, where a seek lands a little past its target, a seek past the last cut of this file meets the
    stream's end (only the cut's leading pictures follow it, shown before it): it goes further back, as one that
    meets a frame shown after the cut does."""
    from titok_fast import decoders

    options = {"x265-params": "log-level=error:keyint=24:min-keyint=24:scenecut=0:open-gop=1"}
    source = str(videos.make_video(tmp_path / "tail.ts", 145, 48, 64, encoder="libx265", options=options))
    index = decoders.stream_index(source, split=True)
    assert index.cuts.tolist() == list(range(0, 145, 24))
    for cut in index.cuts[1:]:
        with av.open(source) as container:
            first = next(decoders._from_cut(container, container.streams.video[0], index.order, int(cut)))
        assert first.pts == index.order[cut] and first.is_keyframe


def test_vp9_and_av1_key_frames_are_read_from_their_headers():
    """VP9: frame_marker, profile (profile 3 with a reserved bit), show_existing_frame, frame_type, show_frame.
    AV1: the first frame header's show_existing_frame, frame_type and show_frame, after the OBUs before it (a
    temporal delimiter, a sequence header; an OBU with an extension byte), each with its leb128 size."""
    from titok_fast import decoders

    vp9 = {0x82: True, 0xA2: True, 0x92: True, 0xB1: True, 0x86: False, 0x88: False, 0x80: False, 0x42: False}
    for byte, key in vp9.items():  # profiles 0, 1, 2, 3 keys; an inter frame, a frame shown again, hidden, no marker
        assert decoders._vp9_key(bytes([byte, 0])) == key, hex(byte)
    delimiter, sequence = b"\x12\x00", b"\x0a\x81\x01" + bytes(129)  # a 129-byte sequence header: a 2-byte size
    for header, key in ((0x10, True), (0x30, False), (0x80, False), (0x00, False), (0x50, False)):
        for obus in (delimiter, delimiter + sequence):
            for frame in (b"\x32\x02", b"\x1a\x02", b"\x36\x08\x02"):  # OBU_FRAME, _FRAME_HEADER, extended
                assert decoders._av1_key(obus + frame + bytes([header, 0])) == key, (header, obus, frame)
    assert not decoders._av1_key(delimiter) and not decoders._av1_key(b"")


@pytest.mark.parametrize(("encoder", "sampling", "tail", "fps"), [
    ("libx265", "upstream", "drop", 8), ("libvpx-vp9", "time", "pad", 7), ("libsvtav1", "upstream", "pad", 5),
])  # fmt: skip
def test_an_hevc_vp9_or_av1_file_read_in_segments_gives_the_clips_of_one_read(coded, monkeypatch, encoder,
                                                                                sampling, tail, fps):  # fmt: skip
    """Each segment after the first decodes every frame from its own key frame (seeked to) up to its last clip's;
    the first decodes from the start; together they give the clips of one read."""
    from titok_fast import decoders

    kwargs = dict(frames=3, height=32, width=32, fps=fps, sampling=sampling, tail=tail)
    every = list(video.ClipReader(coded[encoder], prune=False, **kwargs))
    skips, pruned = [], decoders.pruned_frames
    monkeypatch.setattr(decoders, "pruned_frames", lambda *args: skips.append(args[-1]) or pruned(*args))
    clips, segments, seeks = _split(coded[encoder], 3, monkeypatch, **kwargs)
    assert skips == [False, False]  # each segment after the first decodes every frame from its cut
    assert len(segments) == 2 and 0 < segments[0].cut < segments[1].cut and not segments[0].prunable
    assert seeks == [segment.cut for segment in segments]
    assert len(clips) == len(every) and all(torch.equal(a, b) for a, b in zip(clips, every, strict=True))


def test_a_plan_gives_the_segments_a_splitting_reader_cuts_and_a_reader_of_each_reads_its_clips(gops, monkeypatch):
    """``plan(n)`` gives the segments a reader splitting the file among n readers cuts it into (6 asked for, 4
    made: two of the clips chosen to start one have the same IDR picture before them, one has none but the
    first's), with the file's source stamp; a reader given each reads its clips. Where the file is not split
    (here: not pruned, so read without its index) the plan is empty."""
    monkeypatch.setattr(video, "SEGMENT_CLIPS", 2)
    kwargs = dict(frames=3, height=32, width=32, fps=8)
    every = list(video.ClipReader(gops, prune=False, **kwargs))
    planner = video.ClipReader(gops, **kwargs)
    segments = planner.plan(6)
    head, cut = video.ClipReader(gops, **kwargs), []
    head.split_into, head.on_split = 6, cut.extend
    head_clips = list(head)
    assert [(s.first, s.clips, s.cut) for s in segments] == [(s.first, s.clips, s.cut) for s in [head._own, *cut]]
    assert [(s.first, s.clips) for s in segments] == [(0, 5), (5, 3), (8, 5), (13, None)]
    assert planner.source_stamp == head.source_stamp != ""
    got = []
    for segment in segments:
        reader = video.ClipReader(gops, segment=segment, **kwargs)
        clips = list(reader)
        got.append((reader.first_clip, len(clips)))
        assert all(torch.equal(a, b) for a, b in zip(clips, every[reader.first_clip :], strict=False))
    assert got == [(0, 5), (5, 3), (8, 5), (13, 3)] and len(head_clips) == 5
    assert video.ClipReader(gops, prune=False, **kwargs).plan(6) == []


def test_an_index_only_to_split_by_skips_no_frame(gops):
    """Decoding from an index of a codec that is not pruned gives every frame up to the last one needed."""
    from titok_fast import decoders

    order = decoders.stream_index(gops).order
    needed = np.zeros(len(order), dtype=bool)
    needed[[30, 60]] = True
    for skip, frames in ((False, list(range(61))), (True, None)):
        with av.open(gops) as container:
            got = [i for i, _ in decoders.pruned_frames(container, container.streams.video[0], order, lambda: needed,
                                                        skip=skip)]  # fmt: skip
        assert got == frames if frames else (30 in got and 60 in got and len(got) < 61)


@pytest.mark.parametrize("suffix", ["mp4", "ts", "flv"])
@pytest.mark.parametrize("fps", [8, 24])
def test_a_variable_frame_rate_file_read_in_segments_gives_the_clips_of_one_read(tmp_path, monkeypatch, suffix,
                                                                                 fps):  # fmt: skip
    """Sampled by time, a segment's last frame shows until the next frame's time, which the segment decodes too:
    MPEG-TS and FLV give frames no duration, and MP4's is the gap in decoding order."""
    made = videos.make_video(tmp_path / "vfr.mp4", 150, 48, 64, vfr=True, x264=KEYINT)
    source = str(made if suffix == "mp4" else videos.remux(tmp_path / f"vfr.{suffix}", made))
    kwargs = dict(frames=3, height=32, width=32, fps=fps, sampling="time", tail="pad")
    every = list(video.ClipReader(source, prune=False, **kwargs))
    clips, segments, _ = _split(source, 3, monkeypatch, **kwargs)
    assert len(segments) == 2 and len(clips) == len(every)
    assert all(torch.equal(a, b) for a, b in zip(clips, every, strict=True))


@pytest.mark.parametrize("sampling", ["upstream", "time"])
def test_an_edit_listed_file_is_neither_pruned_nor_split(gops, tmp_path, monkeypatch, sampling):
    """Frames before an MP4 edit list's start are read as packets but never shown: the packets' index would
    count them, so such a file keeps no index, and is decoded whole, as one read gives it."""
    from titok_fast import decoders

    source = str(videos.make_edit_listed(tmp_path / "edit.mp4", gops))
    assert decoders.stream_index(source) is None
    kwargs = dict(frames=3, height=32, width=32, fps=8, sampling=sampling)
    every = list(video.ClipReader(source, prune=False, **kwargs))
    clips, segments, _ = _split(source, 3, monkeypatch, **kwargs)
    assert not segments and len(clips) == len(every) >= 10
    assert all(torch.equal(a, b) for a, b in zip(clips, every, strict=True))


def test_a_segment_seeking_cannot_place_decodes_from_the_start(gops, monkeypatch):
    """Where seeking does not land on the cut's keyframe, the segment decodes every frame from the file's start:
    the same clips, only slower."""
    from titok_fast import decoders

    def lost(container, stream, order, cut):
        raise decoders.PruneMismatch("seeking found no keyframe")
        yield

    kwargs = dict(frames=3, height=32, width=32, fps=8)
    every = list(video.ClipReader(gops, prune=False, **kwargs))
    head, segments = video.ClipReader(gops, **kwargs), []
    head.split_into, head.on_split = 2, segments.extend
    monkeypatch.setattr(video, "SEGMENT_CLIPS", 2)
    clips = list(head)
    monkeypatch.setattr(decoders, "_from_cut", lost)
    reader = video.ClipReader(gops, segment=segments[0], **kwargs)
    clips += list(reader)
    assert not reader.pruned and all(torch.equal(a, b) for a, b in zip(clips, every, strict=True))
    assert len(clips) == len(every)


def test_a_segment_its_file_cannot_fill_fails(gops):
    """A segment whose clips the file no longer holds (it changed, or is damaged) fails, not short."""
    from titok_fast import decoders

    order = decoders.stream_index(gops).order
    reader = video.ClipReader(gops, frames=3, height=32, width=32, fps=8, segment=video.Segment(4, 30, 24, order, True))
    with pytest.raises(VideoError, match=r"gops.mp4: decoding ended after clip 16; its packets make at least 34$"):
        list(reader)


@pytest.mark.parametrize(("worker_kind", "codec"), [("thread", "h264"), ("process", "h264"), ("process", "hevc")])
def test_a_long_file_is_decoded_by_every_worker_and_its_clips_all_come(gops, coded, tmp_path, worker_kind, codec):
    """A file of 150 one-frame clips, the last of the run, and 3 workers: it is split in 3 segments, one per
    worker (each at least SEGMENT_CLIPS clips), whose clips come as they are decoded, each numbered; every number
    comes once, with the clip of one read, and the reader says what the whole file gave. The file before it, of
    as few clips, is read whole. (HEVC: segments decoded whole from their cuts, in worker processes too.)"""
    gops = gops if codec == "h264" else coded["libx265"]
    kwargs = dict(frames=1, height=32, width=32, fps=24)
    every = list(video.ClipReader(gops, **kwargs))
    short = videos.make_video(tmp_path / "short.mp4", 12, 32, 32, fps=24)
    events = video.interleaved_videos([short, gops], workers=3, worker_kind=worker_kind, **kwargs)
    got, feeds = {1: {}, 0: {}}, {}
    for number, kind, value in events:
        if kind == "open":
            feeds[number] = value[1]
        elif kind == "clip":
            assert value[0] not in got[number]
            got[number][value[0]] = value[1]
        else:
            assert kind == "end", value
    assert len(feeds[1].followers) == 2 and not feeds[0].followers
    assert sorted(got[1]) == list(range(150)) and all(torch.equal(got[1][i], c) for i, c in enumerate(every))
    assert sorted(got[0]) == list(range(12))
    assert feeds[1].reader.clips_read == 150 and feeds[1].reader.start_times()[-1] == pytest.approx(149 / 24)


def test_a_segment_that_stalls_fails_its_file_alone(gops, tmp_path, monkeypatch):
    """A segment whose worker gives nothing for the stall limit, while the others of its file go on, fails the
    file as a stalled file (the worker replaced); the file after it is read whole."""
    monkeypatch.setattr(video, "SEGMENT_CLIPS", 2)
    real, release = video.ClipReader._clip, threading.Event()

    def stalling(self, images):
        if self.segment is not None and self.segment.first and self.clips_read == 1:
            release.wait(timeout=30)
        return real(self, images)

    monkeypatch.setattr(video.ClipReader, "_clip", stalling)
    later = videos.make_video(tmp_path / "later.mp4", 12, 32, 32, fps=24)
    events = video.interleaved_videos([gops, later], workers=3, stall_seconds=2.0, frames=3, height=32, width=32,
                                      fps=8)  # fmt: skip
    try:
        ends, feeds = [], {}
        for number, kind, value in events:
            if kind == "open":
                feeds[number] = value[1]
            elif kind != "clip":
                ends.append((number, kind, str(value)))
    finally:
        release.set()
    assert sorted(ends) == [(0, "error", str(video.stall_error(gops, 2.0))), (1, "end", "None")]
    assert feeds[0].followers and feeds[0].stalled


def test_files_are_split_only_where_fewer_are_left_than_workers():
    """Each file may be split into up to ceil(workers / files left) segments: none of a long run's but the last
    ones', which the workers would otherwise wait beside; and only where clips are taken as they come."""
    paths = [f"missing-{i}.mp4" for i in range(6)]
    with contextlib.closing(video.stream_videos(paths, workers=4, prefetch=6, close_each=False, frames=1,
                                                height=1, width=1)) as stream:  # fmt: skip
        assert [feed.reader.split_into for _, feed in stream] == [1, 1, 1, 2, 2, 4]
    with contextlib.closing(video.stream_videos(paths, workers=4, prefetch=6, frames=1, height=1, width=1)) as stream:
        assert {feed.reader.split_into for _, feed in stream} == {1}


def test_the_segments_of_a_file_are_decoded_before_later_files():
    """Workers take the stream's files in order, a file's segments, queued once its first worker has split it,
    before the files after it; the stop before everything."""
    tasks = video._Tasks()
    for number in range(3):
        tasks.put(f"file {number}", (number, 0))
    assert tasks.get() == "file 0"
    video._submit(tasks, 0, "file 0, segment 2", 2)
    video._submit(tasks, 0, "file 0, segment 1", 1)
    assert [tasks.get() for _ in range(3)] == ["file 0, segment 1", "file 0, segment 2", "file 1"]
    tasks.put(None)
    assert tasks.get() is None and tasks.get() == "file 2"


def test_a_segment_that_fails_fails_its_file_alone(gops, tmp_path, monkeypatch):
    """A failure in a segment other than the first is its file's error, and no other file's."""
    monkeypatch.setattr(video, "SEGMENT_CLIPS", 2)
    real = video.ClipReader._clip

    def failing(self, images):
        if self.segment is not None and self.segment.first and self.clips_read == 1:
            raise VideoError(f"{self.path}: decoding failed (broken)")
        return real(self, images)

    monkeypatch.setattr(video.ClipReader, "_clip", failing)
    short = videos.make_video(tmp_path / "short.mp4", 12, 32, 32, fps=24)
    events = video.interleaved_videos([short, gops], workers=2, frames=3, height=32, width=32, fps=8)
    ends = [(number, kind, str(value)) for number, kind, value in events if kind in ("end", "error")]
    assert sorted(ends) == [(0, "end", "None"), (1, "error", f"{gops}: decoding failed (broken)")]


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("missing", "no such file"),
        ("folder", "is a directory"),
        ("empty", "file is empty"),
        ("garbage", "cannot open as a media file"),
        ("truncated", r"is cut short \(an unfinished download or copy\?\): its 'mdat' box runs to byte"),
        ("scrambled", "decoding failed"),
        ("audio", "has no video stream$"),
        ("cover", r"has no video stream \(only cover art\)$"),  # a picture, not a video: not read as one
        ("unknown-codec", r"its video stream has a codec FFmpeg cannot decode \(an unknown codec\)$"),
    ],
)
def test_bad_file_gives_video_error(files, name, problem):
    with pytest.raises(VideoError, match=problem) as info:
        read_clips(files[name], frames=4, height=16, width=16)
    assert str(info.value).startswith(files[name])
    if name in ("garbage", "scrambled"):
        assert isinstance(info.value.__cause__, av.FFmpegError)  # chained, not hidden


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_metadata_tags_in_another_encoding_do_not_make_a_video_unreadable(files, tmp_path, container):
    """Tags written in Latin-1 (as older files have them), which PyAV before version 19 by default refuses to
    open: the clips are those of the same video without them, and the tag reads with the bytes it cannot decode
    replaced."""
    tagged = videos.remux(tmp_path / f"latin.{container}", files["moving"], tags={"title": "café"},
                          tag_encoding="latin-1")  # fmt: skip
    if decoders.OPEN_ARGUMENTS:  # (PyAV 18)
        with pytest.raises(UnicodeDecodeError):
            av.open(str(tagged)).close()
    expected = read_clips(files["moving"], frames=4, height=16, width=16).clips
    clips = read_clips(tagged, frames=4, height=16, width=16).clips
    assert len(clips) == len(expected) == 2 and all(torch.equal(a, b) for a, b in zip(clips, expected, strict=True))
    with decoders.open_input(str(tagged)) as container:
        assert decoders.tag(container, "title") == "caf\ufffd" and decoders.tag(container, "artist") == ""


@pytest.mark.parametrize(
    ("container", "options"),
    [
        ("mp4", {"movflags": "faststart"}),  # the index at the front: libav reads up to the cut without a word
        ("mp4", {"movflags": "frag_keyframe+empty_moov"}),
        ("mov", {}),
        ("mkv", {}),
        ("mp4", None),  # the media box's size in 64 bits, as a file past 4 GiB has it
    ],
    ids=["mp4-index-first", "mp4-fragmented", "mov", "mkv", "mp4-64-bit-size"],
)
def test_a_cut_off_download_fails_instead_of_giving_the_clips_before_the_cut(files, tmp_path, container, options):
    whole = videos.remux(tmp_path / f"whole.{container}", files["moving"], options or {})
    if options is None:  # the 8-byte "free" box the muxer leaves before "mdat" becomes its 64-bit size
        data = whole.read_bytes()
        at = data.index(b"\x00\x00\x00\x08free") + 8
        assert data[at + 4 : at + 8] == b"mdat"
        size = int.from_bytes(data[at : at + 4], "big") + 8
        header = (1).to_bytes(4, "big") + b"mdat" + size.to_bytes(8, "big")
        whole.write_bytes(data[: at - 8] + header + data[at + 8 :])
    expected = read_clips(files["moving"], frames=4, height=16, width=16).clips
    clips = read_clips(whole, frames=4, height=16, width=16).clips  # the whole file: read as before
    assert len(clips) == len(expected) == 2 and all(torch.equal(a, b) for a, b in zip(clips, expected, strict=True))
    data = whole.read_bytes()
    for keep in (len(data) // 2, len(data) * 9 // 10):
        declared = r"its '(mdat|moov)' box" if container != "mkv" else "its Matroska segment"
        _fails_as_cut_short(tmp_path / f"cut.{container}", data[:keep], declared)


@pytest.mark.parametrize(
    ("container", "options", "box"),
    [
        ("mp4", {}, b"stsz"),
        ("mp4", {"movflags": "faststart"}, b"stsz"),
        ("mp4", {"movflags": "frag_keyframe+empty_moov"}, b"trun"),
        ("mov", {}, b"stsz"),
    ],
    ids=["mp4", "mp4-index-first", "mp4-fragmented", "mov"],
)
@pytest.mark.parametrize(
    "window", [containers.BOX_WINDOW, 64], ids=["boxes-read-whole", "boxes-read-a-header-at-a-time"]
)
def test_an_mp4_whose_index_declares_more_samples_than_it_has_bytes_is_refused_before_libav_opens_it(
    files, tmp_path, monkeypatch, container, options, box, window
):
    """libav makes a 24-byte entry per declared sample as it opens the file: 2 KB declaring 85 million samples
    (a constant sample size, or a run whose fields are left to defaults, so nothing bounds the count) took 3 GB.
    One sample more than the file has bytes is refused, naming the file, before libav opens it; as many as it has
    bytes pass the check (the 24 frames' counts are in one box: the one changed here)."""
    data = bytearray(videos.remux(tmp_path / f"whole.{container}", files["moving"], options).read_bytes())
    count = data.index(box) + (12 if box == b"stsz" else 8)  # after the version, flags (and the sample size)
    assert int.from_bytes(data[count : count + 4], "big") == 24
    monkeypatch.setattr(containers, "BOX_WINDOW", window)  # (64: a "moov" or "moof" larger is not read whole)
    opened = []
    monkeypatch.setattr(video, "open_input", lambda *args: opened.append(args) or decoders.open_input(*args))
    for samples in (len(data), len(data) + 1):
        data[count : count + 4] = samples.to_bytes(4, "big")
        path = tmp_path / f"declared{samples}.{container}"
        path.write_bytes(data)
        if samples > len(data):
            with pytest.raises(VideoError, match=(
                rf"^{re.escape(str(path))}: its index declares {samples:,} samples in a file of {len(data):,} bytes "
                r"\(each sample takes one byte at least: a damaged or crafted index\)$"
            )):  # fmt: skip
                video.ClipReader(path, frames=4, height=16, width=16).plan(2)
            assert video.video_comment(path) is None and not opened
        else:
            with contextlib.suppress(VideoError):  # (libav's own verdict on that index: not this check's)
                video.ClipReader(path, frames=4, height=16, width=16).plan(2)
            assert len(opened) == 1
            opened.clear()


@pytest.mark.parametrize(
    "window", [containers.BOX_WINDOW, 64], ids=["boxes-read-whole", "boxes-read-a-header-at-a-time"]
)
def test_audio_that_libav_indexes_by_chunk_is_not_counted_by_the_sample_check(tmp_path, monkeypatch, window):
    """Old QuickTime files store PCM (and IMA4) audio as one "sample" per audio sample, a count that may pass the
    file's bytes (IMA4: 64 in 34 bytes); libav indexes such a track by chunk (one time-to-sample entry of duration
    1), so its count costs no memory and is left out. With another duration libav indexes it by sample: counted."""
    path = tmp_path / "pcm.mov"
    with av.open(str(path), "w") as container:
        picture = container.add_stream("libx264", rate=24)
        picture.width, picture.height, picture.pix_fmt = 64, 48, "yuv420p"
        sound = container.add_stream("pcm_s16be", rate=8000, layout="mono")
        for i in range(24):
            container.mux(picture.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), i, np.uint8), "rgb24")))
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16p", layout="mono")
        samples.sample_rate, samples.pts = 8000, 0
        container.mux(sound.encode(samples))
        container.mux([*picture.encode(), *sound.encode()])
    monkeypatch.setattr(containers, "BOX_WINDOW", window)
    data = bytearray(path.read_bytes())
    audio = data.index(b"stsz\x00\x00\x00\x00\x00\x00\x00\x02") + 12  # the audio track's: 2 bytes a sample
    assert int.from_bytes(data[audio : audio + 4], "big") == 8000
    data[audio : audio + 4] = (10 * len(data)).to_bytes(4, "big")
    path.write_bytes(data)
    assert containers.cut_short(str(path), len(data)) is None
    stts = data.index(b"stts\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x1f\x40")  # one entry: 8000 of duration 1
    data[stts + 16 : stts + 20] = (2).to_bytes(4, "big")
    path.write_bytes(data)
    declared = f"^its index declares {10 * len(data) + 24:,} samples in a file of"
    with pytest.raises(containers.TooManySamples, match=declared):
        containers.cut_short(str(path), len(data))


@pytest.mark.parametrize("index", [b"moov", b"moof"])
@pytest.mark.parametrize("media", [0, 2 << 20], ids=["more-boxes-than-its-size-allows", "a-size-that-allows-them"])
def test_a_sample_count_behind_many_tiny_boxes_is_refused_before_libav_opens_it(tmp_path, monkeypatch, index, media):
    """MAX_BOXES_WALKED empty boxes (512 KB), then an index declaring 100 million samples: the walk stopped short
    of the index, so its count went unread and libav opened the file. A file's top-level boxes are walked to its
    end, one per ISO_BOX_BYTES bytes of it at most: a file of more is refused; one large enough for them (a media
    box after the index) is walked to the index, whose count is refused."""
    count = (100_000_000).to_bytes(4, "big")
    table = _box(b"trak", _box(b"mdia", _box(b"minf", _box(b"stbl", _box(b"stsz", bytes(8) + count)))))
    boxes = {b"moov": _box(b"moov", table), b"moof": _box(b"moof", _box(b"traf", _box(b"trun", bytes(4) + count)))}
    data = _box(b"ftyp", b"isom" + bytes(4)) + _box(b"free") * containers.MAX_BOXES_WALKED + boxes[index]
    data += _box(b"mdat", bytes(media)) if media else b""
    path = tmp_path / "padded.mp4"
    path.write_bytes(data)
    monkeypatch.setattr(video, "open_input", lambda *args: pytest.fail("libav opened the file"))
    found = (
        rf"its {len(data):,} bytes hold more than {containers.MAX_BOXES_WALKED:,} top-level boxes, under "
        rf"{containers.ISO_BOX_BYTES} bytes a box \(no muxer writes boxes that small: a damaged or crafted file\)$"
    )
    if media:
        found = rf"its index declares 100,000,000 samples in a file of {len(data):,} bytes \(each sample"
    with pytest.raises(VideoError, match=f"^{re.escape(str(path))}: {found}"):
        video.ClipReader(path, frames=4, height=16, width=16).plan(2)
    assert video.video_comment(path) is None


def _fails_as_cut_short(path: Path, data: bytes, declared: str, end: int | None = None) -> None:
    """``data``, written to ``path``, fails to read as cut short: ``declared`` runs to byte ``end`` (any if None)."""
    path.write_bytes(data)
    runs_to = r"[\d,]+" if end is None else f"{end:,}"
    with pytest.raises(VideoError, match=(
        rf"^{path}: is cut short \(an unfinished download or copy\?\): {declared} runs to byte {runs_to} but the file "
        rf"ends at byte {len(data):,}$"
    )):  # fmt: skip
        read_clips(path, frames=4, height=16, width=16)


def _box(kind: bytes, payload: bytes = b"") -> bytes:
    return (8 + len(payload)).to_bytes(4, "big") + kind + payload


@pytest.mark.parametrize(
    ("where", "cut"),
    [
        ("inside the second fragment's 'prft' box", "its 'prft' box runs to byte"),  # the fragments after it lost
        ("inside the second fragment's 64-bit 'mdat' size", "its 'mdat' box header is cut at byte"),
        ("6 bytes into the second fragment's 'moof' header", None),  # too little to tell from trailing bytes
        ("at the second fragment's 'moof'", None),  # a cut between fragments: not seen in the sizes
        ("inside the trailing 'mfra' box", None),  # no video lost
    ],
)
def test_the_cut_short_check_sees_a_cut_between_a_fragmented_mp4s_media_boxes(tmp_path, where, cut):
    ftyp, moov = _box(b"ftyp", b"isom" + bytes(4) + b"isomiso6"), _box(b"moov", bytes(100))
    first = _box(b"prft", bytes(24)) + _box(b"moof", bytes(60)) + _box(b"mdat", bytes(500))
    prft, moof = _box(b"prft", bytes(24)), _box(b"moof", bytes(60))
    mdat = (1).to_bytes(4, "big") + b"mdat" + (516).to_bytes(8, "big") + bytes(500)
    data = ftyp + moov + first + prft + moof + mdat + _box(b"mfra", bytes(40))
    at = {"prft": len(ftyp + moov + first), "moof": len(ftyp + moov + first + prft)}
    at["mdat"], at["mfra"] = at["moof"] + len(moof), len(data) - 48
    keep = {
        "inside the second fragment's 'prft' box": at["prft"] + 16,
        "inside the second fragment's 64-bit 'mdat' size": at["mdat"] + 12,
        "6 bytes into the second fragment's 'moof' header": at["moof"] + 6,
        "at the second fragment's 'moof'": at["moof"],
        "inside the trailing 'mfra' box": at["mfra"] + 20,
    }[where]
    path = tmp_path / "cut.mp4"
    path.write_bytes(data)
    assert containers.cut_short(str(path), len(data)) is None  # the whole file
    path.write_bytes(data[:keep])
    found = containers.cut_short(str(path), keep)
    assert found is None if cut is None else found.startswith(cut), found


def test_a_fragmented_mp4_cut_between_fragments_fails_where_its_segment_index_says_so(files, tmp_path):
    """A segment index at the front (DASH, `-movflags global_sidx`) gives the fragments' sizes, so a cut between two
    of them is seen; one index per fragment (`-movflags dash`) says nothing of the fragments after it."""
    whole = videos.remux(tmp_path / "whole.mp4", files["moving"], {"movflags": "dash+frag_every_frame+global_sidx"})
    expected = read_clips(files["moving"], frames=4, height=16, width=16).clips
    clips = read_clips(whole, frames=4, height=16, width=16).clips  # the whole file: read as before
    assert len(clips) == len(expected) == 2 and all(torch.equal(a, b) for a, b in zip(clips, expected, strict=True))
    data = whole.read_bytes()
    fragments = [at - 4 for at in range(len(data)) if data[at : at + 4] == b"moof"]
    indexed = data.rindex(b"mfra") - 4  # the fragments end where the trailing random-access box begins
    assert len(fragments) == 24 and data.count(b"sidx") == 1
    cut = tmp_path / "cut.mp4"
    for keep in (fragments[12], fragments[-1]):
        _fails_as_cut_short(cut, data[:keep], "its 'sidx' segment index", indexed)
    cut.write_bytes(data[: indexed + 8])  # inside the random-access box: no video lost
    assert containers.cut_short(str(cut), indexed + 8) is None


def _sidx(version: int, first_offset: int, entries: list[tuple[int, int]], large: bool = False) -> bytes:
    """A segment index box: ``entries`` of (reference type, referenced size)."""
    wide = 8 if version else 4
    payload = bytes([version, 0, 0, 0]) + bytes(8) + bytes(wide) + first_offset.to_bytes(wide, "big")
    payload += bytes(2) + len(entries).to_bytes(2, "big")
    payload += b"".join(((kind << 31) | size).to_bytes(4, "big") + bytes(8) for kind, size in entries)
    if large:
        return (1).to_bytes(4, "big") + b"sidx" + (16 + len(payload)).to_bytes(8, "big") + payload
    return _box(b"sidx", payload)


@pytest.mark.parametrize("layout", ["version 0", "version 1, 64-bit size", "an index of indexes", "one a fragment"])
def test_the_cut_short_check_adds_up_a_segment_index(tmp_path, layout):
    ftyp, moov = _box(b"ftyp", b"isom" + bytes(4) + b"iso6dash"), _box(b"moov", bytes(100))
    fragment = _box(b"moof", bytes(60)) + _box(b"mdat", bytes(500))
    gap = _box(b"free", bytes(12))  # the index's first offset skips it
    if layout == "one a fragment":  # each index covers the fragment after it: nothing past it is known
        data = ftyp + moov + (_sidx(0, 0, [(0, len(fragment))]) + fragment) * 3
        ends = []
    elif layout == "an index of indexes":  # the top index counts each sub-index with the fragments it covers
        sub = _sidx(1, 0, [(0, len(fragment))] * 2) + fragment * 2
        data = ftyp + moov + _sidx(1, 0, [(1, len(sub))] * 2) + sub * 2
        ends = [len(data) - len(sub) - len(fragment), len(data) - len(fragment)]
    else:
        sidx = _sidx(*((0, len(gap)) if layout == "version 0" else (1, len(gap))), [(0, len(fragment))] * 3,
                     large=layout != "version 0")  # fmt: skip
        data = ftyp + moov + sidx + gap + fragment * 3
        ends = [len(data) - 2 * len(fragment), len(data) - len(fragment)]
    path = tmp_path / "indexed.mp4"
    path.write_bytes(data + _box(b"mfra", bytes(40)))
    assert containers.cut_short(str(path), len(data) + 48) is None  # the whole file
    for keep in ends:
        path.write_bytes(data[:keep])
        assert containers.cut_short(str(path), keep) == (
            f"its 'sidx' segment index runs to byte {len(data):,} but the file ends at byte {keep:,}"
        )
    if not ends:  # a cut between two fragments of per-fragment indexes
        keep = len(data) - len(fragment) - len(_sidx(0, 0, [(0, 1)]))
        path.write_bytes(data[:keep])
        assert containers.cut_short(str(path), keep) is None


def test_segment_indexes_are_read_within_a_budget_per_file(tmp_path, monkeypatch):
    """A stranger's file of many large indexes costs a bounded read: past the budget they are not read."""
    ftyp, moov = _box(b"ftyp", b"isom" + bytes(4) + b"iso6dash"), _box(b"moov", bytes(100))
    fragment = _box(b"moof", bytes(60)) + _box(b"mdat", bytes(500))
    small, large = _sidx(0, 0, [(0, len(fragment))] * 2), _sidx(0, 0, [(0, len(fragment))] * 3)
    data = ftyp + moov + small + large + fragment * 2  # the larger index claims a third fragment
    path = tmp_path / "indexed.mp4"
    path.write_bytes(data)
    reads, pread = [], os.pread
    monkeypatch.setattr(video.os, "pread", lambda fd, n, at: reads.append(n) or pread(fd, n, at))
    assert containers.cut_short(str(path), len(data)).startswith("its 'sidx' segment index runs to byte")
    monkeypatch.setattr(containers, "SIDX_BUDGET", len(small) + len(large) - 1)
    reads.clear()
    assert containers.cut_short(str(path), len(data)) is None  # the second index is past the budget: not read
    assert len(small) in reads and len(large) not in reads


def test_a_cut_off_avi_download_fails_instead_of_giving_the_clips_before_the_cut(tmp_path):
    """libav reads a cut AVI as far as it goes: 6 or 7 of its 8 clips here, as if that were all."""
    whole = videos.make_video(tmp_path / "whole.avi", 96, 48, 64)
    assert len(read_clips(whole, frames=4, height=16, width=16).clips) == 8
    data = whole.read_bytes()
    assert data[:4] == b"RIFF" and int.from_bytes(data[4:8], "little") + 8 == len(data)
    for keep in (len(data) * 83 // 100, len(data) * 86 // 100):
        _fails_as_cut_short(tmp_path / "cut.avi", data[:keep], "its RIFF 'AVI ' chunk", len(data))


def test_the_cut_short_check_walks_an_opendml_avis_riff_chunks(tmp_path):
    """An AVI past 1 GiB (OpenDML) goes on in "AVIX" chunks; sizes are padded to even; other bytes end the walk."""

    def riff(form: bytes, payload: bytes) -> bytes:
        return b"RIFF" + (4 + len(payload)).to_bytes(4, "little") + form + payload + bytes(len(payload) % 2)

    first, second = riff(b"AVI ", bytes(101)), riff(b"AVIX", bytes(300))  # the first padded by a byte
    path = tmp_path / "large.avi"
    for data, cut in [
        (first + second, None),
        (first + second + b"JUNK" + bytes(8), None),  # trailing bytes of another kind: libav judges them
        (first + second[:200], f"its RIFF 'AVIX' chunk runs to byte {len(first + second):,}"),
        (first[:50], f"its RIFF 'AVI ' chunk runs to byte {len(first) - 1:,}"),
    ]:
        path.write_bytes(data)
        found = containers.cut_short(str(path), len(data))
        assert found == (None if cut is None else f"{cut} but the file ends at byte {len(data):,}")
    (tmp_path / "sound.wav").write_bytes(riff(b"WAVE", bytes(100))[:60])  # a RIFF file of another kind
    assert containers.cut_short(str(tmp_path / "sound.wav"), 60) is None


def test_an_avi_written_to_a_pipe_is_read_whole(tmp_path):
    """A muxer that cannot seek back leaves the RIFF size it starts with, all ones: unknown, not cut short."""
    piped = videos.make_video(tmp_path / "piped.avi", 96, 48, 64, piped=True)
    data = piped.read_bytes()
    assert data[4:8] == b"\xff" * 4
    assert len(read_clips(piped, frames=4, height=16, width=16).clips) == 8


def test_the_cut_short_check_reads_few_times_and_refuses_a_strangers_endless_boxes(tmp_path, monkeypatch):
    """Box headers are read a window at a time; a file of endless tiny boxes is walked as far as its size allows
    (one box per ISO_BOX_BYTES bytes, MAX_BOXES_WALKED at least) and refused there, and one large enough for
    them is walked to its end."""
    reads, pread = [], os.pread
    monkeypatch.setattr(video.os, "pread", lambda fd, n, at: reads.append(at) or pread(fd, n, at))
    path = tmp_path / "boxes.mp4"
    boxes = _box(b"ftyp", b"isom" + bytes(4)) + _box(b"free") * (2 * containers.MAX_BOXES_WALKED)
    path.write_bytes(boxes + (1000).to_bytes(4, "big") + b"mdat")  # a media box cut short, after them
    with pytest.raises(containers.TooManyBoxes, match=(
        rf"^its {len(boxes) + 8:,} bytes hold more than {containers.MAX_BOXES_WALKED:,} top-level boxes, under "
        rf"{containers.ISO_BOX_BYTES} bytes a box \(no muxer writes boxes that small: a damaged or crafted file\)$"
    )):  # fmt: skip
        containers.cut_short(str(path), path.stat().st_size)
    assert len(reads) <= containers.MAX_BOXES_WALKED * 8 // (containers.BOX_WINDOW - 16) + 2
    # as many boxes as it allows, the media box too
    size = containers.ISO_BOX_BYTES * (2 * containers.MAX_BOXES_WALKED + 2)
    path.write_bytes(boxes + (size - len(boxes) + 1000).to_bytes(4, "big") + b"mdat" + bytes(size - len(boxes) - 8))
    reads.clear()
    assert containers.cut_short(str(path), size) == (
        f"its 'mdat' box runs to byte {size + 1000:,} but the file ends at byte {size:,}"
    )
    assert len(reads) <= 2 * containers.MAX_BOXES_WALKED * 8 // (containers.BOX_WINDOW - 16) + 2


@pytest.mark.parametrize("media", [0, 8 << 20], ids=["more-boxes-than-its-size-allows", "a-size-that-allows-them"])
def test_a_moov_of_endless_tiny_children_is_walked_a_window_at_a_time_and_refused_past_what_its_size_allows(
    tmp_path, monkeypatch, media
):
    """A "moov" of 200,000 empty child boxes before its track: walked a header a system call, 100 MB of them took a
    minute of CPU. The children are read a window at a time and counted, as the top-level boxes are, against what
    the file's size allows: refused past it; in a file large enough for them, walked to the track, whose sample
    count is read."""
    reads, pread = [], os.pread
    monkeypatch.setattr(video.os, "pread", lambda fd, n, at: reads.append(n) or pread(fd, n, at))
    count = (100_000_000).to_bytes(4, "big")
    table = _box(b"trak", _box(b"mdia", _box(b"minf", _box(b"stbl", _box(b"stsz", bytes(8) + count)))))
    children = 200_000
    data = _box(b"ftyp", b"isom" + bytes(4)) + _box(b"moov", _box(b"free") * children + table)
    path = tmp_path / "children.mp4"
    with open(path, "wb") as f:  # (sparse: the media is never written)
        f.write(data + (media + 8).to_bytes(4, "big") + b"mdat")
        f.truncate(len(data) + 8 + media)
    size = path.stat().st_size
    if media:
        found = f"^its index declares 100,000,000 samples in a file of {size:,} bytes"
        with pytest.raises(containers.TooManySamples, match=found):
            containers.cut_short(str(path), size)
    else:
        most = max(containers.MAX_BOXES_WALKED, size // containers.ISO_BOX_BYTES)
        assert children > most
        with pytest.raises(containers.TooManyBoxes, match=(
            rf"^its {size:,} bytes hold more than {most:,} boxes in 'moov' and 'moof', under "
            rf"{containers.ISO_BOX_BYTES} bytes a box \(no muxer writes boxes that small: a damaged or crafted file\)$"
        )):  # fmt: skip
            containers.cut_short(str(path), size)
    assert len(reads) <= len(data) // (containers.BOX_WINDOW - 16) + 4


def test_the_walk_past_large_fragments_reads_a_few_kb_a_fragment_and_stops_after_max_boxes_walked_reads(
    tmp_path, monkeypatch
):
    """A fragmented file of large fragments (a "moof", then 100 KB of media): each hop reads BOX_HOP_WINDOW bytes
    (the "moof" and the next header), not a 64 KB window of media; after MAX_BOXES_WALKED reads the walk gives no
    verdict (a large file's size allows as many samples as it could declare there)."""
    path = tmp_path / "fragments.mp4"
    with open(path, "wb") as f:  # (sparse: the media is never written)
        f.write(_box(b"ftyp", b"isom" + bytes(4)))
        for _ in range(300):
            f.write(_box(b"moof", _box(b"mfhd", bytes(8))) + (100_008).to_bytes(4, "big") + b"mdat")
            f.seek(100_000, os.SEEK_CUR)
        f.write((1000).to_bytes(4, "big") + b"mdat")  # the last fragment cut short
    size = path.stat().st_size
    reads, pread = [], os.pread
    monkeypatch.setattr(video.os, "pread", lambda fd, n, at: reads.append(n) or pread(fd, n, at))
    cut = f"its 'mdat' box runs to byte {size - 8 + 1000:,} but the file ends at byte {size:,}"
    assert containers.cut_short(str(path), size) == cut
    # (the first read, of 12 bytes, tells the kind of container; the walk's first reads a full window)
    assert len(reads) == 302 and reads[0] == 12 and max(reads[2:]) == containers.BOX_HOP_WINDOW
    monkeypatch.setattr(containers, "MAX_BOXES_WALKED", 100)
    reads.clear()
    assert containers.cut_short(str(path), size) is None and len(reads) == 101


def test_a_fragmented_mp4_of_more_boxes_than_max_boxes_walked_is_walked_to_its_end_and_read(tmp_path):
    """FFmpeg's densest fragments: a 16 x 16 frame each, with its segment index and producer time ("sidx", "prft",
    "moof", "mdat": 56 bytes a box), 16,400 of them (one group of pictures, encoded once, muxed again and again):
    more top-level boxes than MAX_BOXES_WALKED, walked to the end (a cut in the last fragment is seen) and read,
    not refused."""
    path = tmp_path / "fragments.mp4"
    with av.open(str(path), "w", options={"movflags": "dash+frag_every_frame", "write_prft": "pts"}) as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        stream.options = {"preset": "ultrafast", "x264-params": "keyint=256"}
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), "rgb24")
        group = [packet for _ in range(256) for packet in stream.encode(frame)] + list(stream.encode())
        for i in range(16_400):
            packet = av.Packet(bytes(group[i % 256]))
            packet.stream, packet.time_base, packet.pts, packet.dts = stream, group[0].time_base, i, i
            packet.is_keyframe = i % 256 == 0
            container.mux(packet)
    data = path.read_bytes()
    kinds, at = [], 0
    while at < len(data):
        kinds.append(data[at + 4 : at + 8])
        at += int.from_bytes(data[at : at + 4], "big")
    assert len(kinds) > containers.MAX_BOXES_WALKED and len(data) < len(kinds) * 2 * containers.ISO_BOX_BYTES
    assert kinds.count(b"moof") == kinds.count(b"sidx") == kinds.count(b"prft") == 16_400
    last = data.rindex(b"mdat") - 4
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: last + 12])
    assert containers.cut_short(str(cut), last + 12) == (
        f"its 'mdat' box runs to byte {last + int.from_bytes(data[last : last + 4], 'big'):,} but the file ends at "
        f"byte {last + 12:,}"
    )
    clip = next(iter(video.ClipReader(path, frames=4, height=16, width=16)))
    assert clip.shape == (3, 4, 16, 16) and torch.allclose(clip, torch.full_like(clip, -1.0), atol=0.05)


def test_a_cut_the_container_does_not_show_is_left_to_libav(files, tmp_path):
    """A cut box that holds no video (a trailing "free" box) does not make a file cut short: it is read as libav
    reads it."""
    expected = read_clips(files["moving"], frames=4, height=16, width=16).clips
    padded = tmp_path / "padded.mp4"
    padded.write_bytes(Path(files["moving"]).read_bytes() + (4096).to_bytes(4, "big") + b"free" + bytes(100))
    clips = read_clips(padded, frames=4, height=16, width=16).clips
    assert len(clips) == len(expected) and all(torch.equal(a, b) for a, b in zip(clips, expected, strict=True))


def test_a_live_matroska_recording_is_judged_by_its_clusters(files, tmp_path):
    """A Matroska segment of unknown size (FFmpeg's `live`, or a file written to a pipe) says nothing of where the
    file ends, but its clusters declare their sizes: a cut inside one is cut short; a cut between two, or inside
    an element that holds no video, is read as far as it goes."""
    expected = read_clips(files["moving"], frames=4, height=16, width=16).clips
    live = videos.remux(tmp_path / "live.mkv", files["moving"], {"live": "1", "cluster_time_limit": "100"})
    clips = read_clips(live, frames=4, height=16, width=16).clips  # the whole file: read as before
    assert len(clips) == len(expected) == 2 and all(torch.equal(a, b) for a, b in zip(clips, expected, strict=True))
    data = live.read_bytes()
    at = data.index(containers.SEGMENT_ID) + 4
    assert data[at : at + 8] == b"\x01" + b"\xff" * 7  # "unknown"
    clusters, at = [], at + 8
    with containers._bytes_of(str(live)) as f:
        while (element := containers._ebml_element(f, at)) is not None:
            if element[0] == containers.CLUSTER_ID:
                clusters.append((at, at + element[1] + element[2]))
            at += element[1] + element[2]
    assert at == len(data) and len(clusters) >= 3
    start, end = clusters[-2]
    _fails_as_cut_short(tmp_path / "cut.mkv", data[: (start + end) // 2], "its Matroska cluster", end)
    cut = tmp_path / "between.mkv"
    cut.write_bytes(data[: clusters[-1][0]])  # between the last two clusters
    clips = read_clips(cut, frames=4, height=16, width=16).clips
    assert len(clips) == 1 and torch.equal(clips[0], expected[0])
    cues = b"\x1c\x53\xbb\x6b" + b"\x40\x64" + bytes(10)  # an index of 100 bytes, 10 there: no video lost
    cut.write_bytes(data + cues)
    assert containers.cut_short(str(cut), len(data + cues)) is None


def test_a_device_or_named_pipe_is_not_a_video_file(tmp_path):
    pipe = tmp_path / "pipe.mp4"
    os.mkfifo(pipe)
    for path in ("/dev/zero", str(pipe)):
        with pytest.raises(VideoError, match=rf"^{path}: not a regular file \(a device, pipe or socket\)"):
            read_clips(path, frames=4, height=16, width=16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tail": "loop"}, "tail must be one of"),
        ({"fps": 0}, r"fps must be a number in \(0, 1000\]"),
        ({"fps": float("inf")}, r"fps must be a number in \(0, 1000\]; got inf"),
        ({"fps": float("nan")}, r"fps must be a number in \(0, 1000\]; got nan"),
        ({"fps": 1e30}, r"fps must be a number in \(0, 1000\]"),
        ({"frames": 0}, ">= 1"),
    ],
    ids=["tail", "fps", "fps-inf", "fps-nan", "fps-huge", "frames"],
)
def test_bad_arguments(files, kwargs, message):
    with pytest.raises(ValueError, match=message):
        read_clips(files["moving"], **{"frames": 4, "height": 16, "width": 16, **kwargs})


@pytest.mark.parametrize(("name", "value"), [("height", 64.5), ("frames", 8.0), ("threads", True)])
def test_sizes_must_be_integers(files, name, value):
    """Checked when the reader is made, not as a TypeError from inside the decoding of every file."""
    with pytest.raises(TypeError, match=f"{name} must be an integer; got {value!r}"):
        video.ClipReader(files["moving"], **{"frames": 4, "height": 16, "width": 16, name: value})
    reader = video.ClipReader(files["moving"], frames=np.int64(4), height=np.int32(16), width=16)  # NumPy's are
    assert (reader.frames, reader.height) == (4, 16) and type(reader.frames) is int


def test_a_reader_read_twice_describes_its_second_reading(files):
    """Each iteration reads the file anew: clips_read, start times and the clip set are those of that reading."""
    reader = video.ClipReader(files["moving"], frames=4, height=16, width=16, tail="pad")
    first = list(reader)
    summary = (reader.clips_read, reader.start_times(), reader.last_clip_frames)
    second = list(reader)
    assert (reader.clips_read, reader.start_times(), reader.last_clip_frames) == summary
    assert len(first) == summary[0] >= 2
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_iter_videos_keeps_order_and_reports_errors(files):
    paths = [files["moving"], files["empty"], files["index24"], files["missing"], files["one"]]
    results = list(iter_videos(paths, workers=3, prefetch=2, frames=4, height=16, width=16))
    assert [path for path, _ in results] == paths
    assert [type(r).__name__ for _, r in results] == ["ClipSet", "VideoError", "ClipSet", "VideoError", "VideoError"]
    assert "empty.mp4: file is empty" in str(results[1][1])
    assert "one.mp4: is shorter than one chunk" in str(results[4][1])
    direct = read_clips(files["index24"], frames=4, height=16, width=16)
    assert all(torch.equal(a, b) for a, b in zip(results[2][1].clips, direct.clips, strict=True))


def _fake_clips(monkeypatch, clips_per_file: int, fail=lambda path: None) -> dict[str, int]:
    """Replace decoding: file ``p`` yields ``clips_per_file`` clips whose single value is p; counts clips made."""
    made: dict[str, int] = {}

    def fake_iter(self):
        made[self.path] = 0
        for _ in range(clips_per_file):
            fail(self.path)
            made[self.path] += 1
            self.clips_read += 1
            yield torch.full((1, 1, 1, 1), float(self.path))

    monkeypatch.setattr(video.ClipReader, "__iter__", fake_iter)
    return made


def test_stream_videos_bounds_files_and_clips_ahead(monkeypatch):
    made = _fake_clips(monkeypatch, clips_per_file=12)
    stream = video.stream_videos([str(i) for i in range(20)], workers=3, prefetch=3, capacity=2, frames=1,
                                 height=1, width=1)  # fmt: skip
    taken = 0
    for path, feed in stream:
        for clip in feed:
            assert clip.item() == float(path)
            taken += 1
            time.sleep(0.002)  # a slow consumer: the readers run ahead as far as they may
            assert len(made) <= int(path) + 3  # files opened: the one consumed and two ahead
            # each file holds at most `capacity` clips in its queue plus the one its worker is putting
            assert sum(made.values()) - taken <= 3 * 3
        if path == "5":
            break
    stream.close()
    assert taken == 6 * 12 and len(made) <= 8


def test_stream_videos_starts_workers_as_files_come_up_to_the_count_asked(monkeypatch):
    """--workers 200 over 3 files starts 3 decoding threads (a resume with a few files left started 200 processes:
    5.7 s, 38 s with 1000); over 20 files it starts all it may, and every clip comes, in order."""
    _fake_clips(monkeypatch, clips_per_file=3, fail=lambda path: time.sleep(0.05))  # (files a worker is busy with)
    started, real = [], video._decode_feeds

    def counted(*args):
        started.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(video, "_decode_feeds", counted)
    for files, workers, most in ((3, 200, 3), (20, 4, 4)):
        started.clear()
        got = [(path, [clip.item() for clip in feed])
               for path, feed in video.stream_videos([str(i) for i in range(files)], workers=workers, prefetch=workers
                                                     + 1, frames=1, height=1, width=1)]  # fmt: skip
        assert got == [(str(i), [float(i)] * 3) for i in range(files)]
        assert 1 <= len(set(started)) <= most and (files < workers or len(set(started)) == workers)


def test_stream_videos_gives_a_files_error_after_its_good_clips(monkeypatch):
    def fail(path):
        if path == "1" and made[path] == 2:
            raise MemoryError("decoder ran out of memory")

    made = _fake_clips(monkeypatch, clips_per_file=4, fail=fail)
    results = []
    for path, feed in video.stream_videos(["0", "1", "2"], workers=2, prefetch=2, frames=1, height=1, width=1):
        clips = []
        with contextlib.suppress(VideoError):
            for clip in feed:
                clips.append(clip.item())
        results.append((path, clips, feed.reader.clips_read))
    assert results == [("0", [0.0] * 4, 4), ("1", [1.0] * 2, 2), ("2", [2.0] * 4, 4)]


def test_stream_videos_moves_past_a_feed_left_unread(monkeypatch):
    made = _fake_clips(monkeypatch, clips_per_file=50)
    seen = []
    for path, feed in video.stream_videos(["0", "1", "2"], workers=1, prefetch=1, capacity=1, frames=1, height=1,
                                          width=1):  # fmt: skip
        if path != "1":  # file 1 is skipped: its worker must give up, or file 2 never gets the only thread
            seen.append(sum(1 for _ in feed))
    assert seen == [50, 50] and made.get("1", 0) < 50
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        next(video.stream_videos(["0"], workers=1, prefetch=1, capacity=0, frames=1, height=1, width=1))


def _stalling(monkeypatch, stalls_after: int):
    """Fake clips (see _fake_clips, 4 per file) where file "1" hangs after ``stalls_after`` clips, as a read on a
    hung network file system does, until the returned event is set; ``threads`` records who decoded each file."""
    release, threads = threading.Event(), {}

    def fail(path):
        threads.setdefault(path, threading.current_thread())
        if path == "1" and made[path] == stalls_after:
            release.wait()

    made = _fake_clips(monkeypatch, clips_per_file=4, fail=fail)
    return release, threads


def test_a_file_that_stalls_fails_alone_and_its_stuck_thread_is_replaced(monkeypatch):
    """With one worker thread, file 2 is read at all only if the thread stuck in file 1 is replaced; once its
    read comes back, the stuck thread takes no more files (one thread decodes, as asked)."""
    release, threads = _stalling(monkeypatch, stalls_after=1)
    before, results = set(threading.enumerate()), []
    try:
        stream = video.stream_videos(["0", "1", "2", "3"], workers=1, prefetch=2, stall_seconds=1.5, frames=1,
                                     height=1, width=1)  # fmt: skip
        for path, feed in stream:
            clips, error = [], ""
            try:
                for clip in feed:
                    clips.append(clip.item())
            except VideoError as e:
                error = str(e)
                release.set()  # the hung read comes back
            results.append((path, clips, error, feed.stalled))
    finally:
        release.set()
    assert results == [
        ("0", [0.0] * 4, "", False),
        ("1", [1.0], "1: no clip decoded for 1.5 s; given up (a read that hangs, or a file the decoder cannot get "
         "through)", True),
        ("2", [2.0] * 4, "", False),
        ("3", [3.0] * 4, "", False),
    ]  # fmt: skip
    assert threads["0"] is threads["1"] and threads["2"] is threads["3"] is not threads["1"]
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_a_thread_that_comes_late_to_a_file_gives_it_the_whole_stall_limit(monkeypatch):
    """The only thread is still finishing a slow clip of a file the consumer left: the next file's clock starts
    when the thread comes to it, not when the consumer began to wait."""

    def slow(path):  # file 0's first clip at once, its next in 1 s; each of file 1's in 1.2 s
        time.sleep((1.0 if made[path] else 0.0) if path == "0" else 1.2)

    # the thread comes to file 1 well within the limit (1 s of 2: no thread is added for it); its first clip comes
    # 2.2 s after the consumer began to wait, 1.2 s after the thread came to the file
    made = _fake_clips(monkeypatch, clips_per_file=3, fail=slow)
    got = []
    for path, feed in video.stream_videos(["0", "1"], workers=1, prefetch=1, stall_seconds=2.0, frames=1, height=1,
                                          width=1):  # fmt: skip
        for clip in feed:
            got.append(clip.item())
            if path == "0":
                break  # as encode_files leaves a file whose clip failed preprocessing
    assert got == [0.0, 1.0, 1.0, 1.0]


def test_a_file_that_no_thread_comes_to_waits_for_a_new_one_instead_of_failing(monkeypatch):
    """File 1 is passed over unread, but its only thread is stuck in it for good: file 2, which no thread comes to,
    is not at fault; a thread is added for it after the stall limit and it is read whole."""
    release, _ = _stalling(monkeypatch, stalls_after=0)
    results = []
    try:
        for path, feed in video.stream_videos(["0", "1", "2"], workers=1, prefetch=1, stall_seconds=1.5, frames=1,
                                              height=1, width=1):  # fmt: skip
            if path != "1":
                results.append((path, [clip.item() for clip in feed], feed.stalled))
            else:
                while feed.worker is None:  # its thread has taken it
                    time.sleep(0.01)
    finally:
        release.set()
    assert results == [("0", [0.0] * 4, False), ("2", [2.0] * 4, False)]


def test_the_stall_limit_counts_only_the_wait_for_the_decoder(monkeypatch):
    _fake_clips(monkeypatch, clips_per_file=3)
    for _, feed in video.stream_videos(["0"], workers=1, prefetch=1, stall_seconds=0.5, frames=1, height=1, width=1):
        for _ in feed:
            time.sleep(1.0)  # the consumer is slow (the model): its clips were decoded long before it asks
    assert not feed.stalled
    ages = video.stream_videos(["0"], workers=1, prefetch=1, stall_seconds=1e10, frames=1, height=1, width=1)
    assert [sum(1 for _ in feed) for _, feed in ages] == [3]  # no timeout too long for the platform's clock


def _interleaved(paths, **kwargs) -> list[tuple[int, str, object]]:
    """Every event of ``video.interleaved_videos`` (a clip as (its number in the file, its value)), the stream
    closed after."""
    events = []
    files = video.interleaved_videos(paths, frames=1, height=1, width=1, **kwargs)
    with contextlib.closing(files):
        for number, kind, value in files:
            events.append((number, kind, (value[0], value[1].item()) if kind == "clip" else value))
    return events


@pytest.mark.parametrize("worker_kind", ["thread", "process"])
def test_a_files_reader_is_freed_once_it_has_ended_without_the_cycle_collector(files, monkeypatch, worker_kind):
    """A file's reader and feed must not be a reference cycle: the cycle collector's full passes come rarely in a
    long job, and finished readers (each with its file's index, 8 bytes a frame) piled up in between. With the
    collector off, every reader but the last few held is freed as the files end (the feed's split callback held
    the feed from its reader: none was freed)."""
    made, init = [], video.ClipReader.__init__

    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(video.ClipReader, "__init__", recorded)
    paths = [files["index24"]] * 12
    gc.collect()
    gc.disable()
    try:
        events = video.interleaved_videos(paths, workers=2, worker_kind=worker_kind, frames=4, height=16, width=16,
                                          fps=24)  # fmt: skip
        with contextlib.closing(events):
            ended = 0
            for _, kind, _ in events:
                ended += kind == "end"
                if ended == len(paths) - 3:  # files still held or read: at most the last few
                    alive = sum(ref() is not None for ref in made)
                    break
    finally:
        gc.enable()
    assert ended == len(paths) - 3 and len(made) >= len(paths) - 3 and alive <= 6


def test_a_split_files_feeds_are_freed_without_the_cycle_collector(gops, monkeypatch):
    """The feeds of a file's segments tell the file's feed when they have a clip: held strongly, that callback and
    the file's list of them made a reference cycle, and a split file's feeds and readers stayed until a full pass
    of the cycle collector."""
    monkeypatch.setattr(video, "SEGMENT_CLIPS", 2)
    made, init = [], video.ClipFeed.__init__

    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(video.ClipFeed, "__init__", recorded)
    gc.collect()
    gc.disable()
    try:
        events = video.interleaved_videos([gops], workers=3, frames=3, height=32, width=32, fps=8)
        with contextlib.closing(events):
            clips = sum(kind == "clip" for _, kind, _ in events)
        del events
        alive = sum(ref() is not None for ref in made)
    finally:
        gc.enable()
    assert clips == 16 and len(made) == 3 and alive == 0


def test_interleaved_files_keep_every_worker_decoding(monkeypatch):
    """File 0's worker waits, before its last clip, until file 1 has made more clips than its read-ahead holds:
    taking the files one at a time, in order, file 1's worker would stop at its read-ahead and the wait would
    time out. Taken from whichever file has one ready, every clip comes, each file's in order."""
    ahead, capacity = threading.Event(), 2

    def fail(path):
        if path == "1" and made[path] == capacity + 3:
            ahead.set()
        if path == "0" and made[path] == 11:
            assert ahead.wait(timeout=10), "file 1 was not decoded while file 0 was"

    made = _fake_clips(monkeypatch, clips_per_file=12, fail=fail)
    events = _interleaved(["0", "1", "2"], workers=2, capacity=capacity)
    assert ahead.is_set()
    for number in range(3):
        mine = [(kind, value) for n, kind, value in events if n == number]
        assert mine[0] == ("open", (str(number), mine[0][1][1])) and mine[-1] == ("end", None)
        assert mine[1:-1] == [("clip", (i, float(number))) for i in range(12)]
    assert [n for n, kind, _ in events if kind == "open"] == [0, 1, 2]


def test_interleaved_files_read_through_are_taken_before_a_long_file(monkeypatch):
    """A long file whose clips come faster than they are taken (any file, on a CPU) held back every file behind it,
    read long before, and their workers, which had nothing more to read: their token files waited for the long
    file's end. A file read through (its end queued) is taken first; each file's clips still come in order."""
    _fake_clips(monkeypatch, clips_per_file=1)
    long_clips = 100
    real_iter = video.ClipReader.__iter__

    def long_file(self):
        if self.path != "0":
            yield from real_iter(self)
            return
        for _ in range(long_clips):
            self.clips_read += 1
            yield torch.zeros((1, 1, 1, 1))

    monkeypatch.setattr(video.ClipReader, "__iter__", long_file)
    events = []
    files = video.interleaved_videos(["0", "1", "2"], workers=2, capacity=2, frames=1, height=1, width=1)
    with contextlib.closing(files):
        for number, kind, _ in files:
            events.append((number, kind))
            time.sleep(0.01)  # a slow consumer: file 0 always has a clip ready
    ends = {number: events.index((number, "end")) for number in range(3)}
    long_taken = [i for i, (number, kind) in enumerate(events) if (number, kind) == (0, "clip")]
    assert len(long_taken) == long_clips and ends[1] < long_taken[long_clips // 2] and ends[2] < ends[0]


def test_interleaved_files_fail_alone_and_hold_a_bounded_number_open(monkeypatch):
    """A file's error comes after its good clips and ends it alone; a dropped file's worker gives up; at most
    workers + 1 files are held and workers - 1 more read ahead."""
    def fail(path):
        if path == "1" and made[path] == 2:
            raise MemoryError("decoder ran out of memory")

    made = _fake_clips(monkeypatch, clips_per_file=6, fail=fail)
    files = video.interleaved_videos([str(i) for i in range(8)], workers=2, capacity=1, frames=1, height=1, width=1)
    events, held, ended, most = [], set(), 0, 0
    with contextlib.closing(files):
        for number, kind, _ in files:
            events.append((number, kind))
            if kind == "open":
                held.add(number)
            if kind in ("end", "error") or (kind == "clip" and number == 3):
                if number == 3:
                    files.drop(number)  # as encode_files drops a file that failed elsewhere
                held.discard(number)
                ended += 1
            most = max(most, len(held))
            assert len(made) <= ended + len(held) + 1  # files a worker came to: ended, held, or read ahead (1)
    assert most == 3
    errors = [(n, kind) for n, kind in events if kind == "error"]
    assert errors == [(1, "error")] and [k for n, k in events if n == 1] == ["open", "clip", "clip", "error"]
    assert [k for n, k in events if n == 3] == ["open", "clip"] and made["3"] < 6
    assert all([k for n, k in events if n == f] == ["open", *["clip"] * 6, "end"] for f in (0, 2, 4, 5, 6, 7))


def test_an_interleaved_file_that_stalls_fails_alone_while_the_others_go_on(monkeypatch):
    release, threads = _stalling(monkeypatch, stalls_after=1)
    try:
        events = _interleaved(["0", "1", "2", "3"], workers=2, stall_seconds=1.5, idle_seconds=0.2)
    finally:
        release.set()
    assert [(n, value) for n, kind, value in events if kind == "clip"].count((1, (0, 1.0))) == 1
    error = [value for n, kind, value in events if kind == "error"]
    assert [str(e) for e in error] == ["1: no clip decoded for 1.5 s; given up (a read that hangs, or a file the "
                                       "decoder cannot get through)"]  # fmt: skip
    assert all([k for n, k, _ in events if n == f].count("clip") == 4 for f in (0, 2, 3))
    assert any(kind == "idle" for _, kind, _ in events)  # nothing came while file 1 hung alone
    assert threads["2"] is not threads["1"] and threads["3"] is not threads["1"]


def test_interleaved_files_that_no_thread_comes_to_get_a_new_one(monkeypatch):
    """The only thread is stuck for good in file 1, which was dropped: file 2, which no thread comes to, is not at
    fault; once nothing has come for the stall limit, a thread is added for it and it is read whole."""
    release, _ = _stalling(monkeypatch, stalls_after=0)
    files = video.interleaved_videos(["0", "1", "2"], workers=1, stall_seconds=1.5, frames=1, height=1, width=1)
    got = []
    try:
        with contextlib.closing(files):
            for number, kind, value in files:
                if number == 1 and kind == "open":
                    feed = value[1]
                    while feed.worker is None:  # its thread has taken it
                        time.sleep(0.01)
                    files.drop(1)
                if kind == "clip":
                    got.append((number, value[1].item()))
    finally:
        release.set()
    assert got == [(0, 0.0)] * 4 + [(2, 2.0)] * 4


def test_a_stream_that_hands_its_feeds_over_closes_them_all_when_it_ends(monkeypatch):
    """With close_each=False the consumer holds the feeds it was given; asking past the last one ends the stream,
    which closes them all, so that the workers blocked on their full queues end too."""
    _fake_clips(monkeypatch, clips_per_file=50)
    before = set(threading.enumerate())
    stream = video.stream_videos(["0", "1", "2"], workers=2, prefetch=2, capacity=1, close_each=False, frames=1,
                                 height=1, width=1)  # fmt: skip
    feeds = [feed for _, feed in itertools.islice(stream, 3)]
    while sum(feed._queue.full() for feed in feeds) < 2:  # both workers blocked on a full queue
        time.sleep(0.01)
    assert next(stream, None) is None
    assert all(feed._closed.is_set() for feed in feeds)
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_interleaved_files_close_their_stream_at_the_end_and_do_not_count_the_consumers_time(monkeypatch):
    """The run is slow with a file's clip (the model) while the only thread finishes a slow read in a file that
    was dropped: that time is not the interleaver's wait, so no thread is added for the next file. Once every file
    has ended, the workers end without a close."""
    def slow(path):
        threads.add(threading.current_thread())
        if path == "1" and made[path] == 1:
            time.sleep(2.0)  # a slow read, not a stuck one

    threads = set()
    made = _fake_clips(monkeypatch, clips_per_file=3, fail=slow)
    before = set(threading.enumerate())
    events = []
    files = video.interleaved_videos(["0", "1", "2"], workers=1, capacity=1, stall_seconds=1.0, frames=1, height=1,
                                     width=1)  # fmt: skip
    for number, kind, _ in files:
        events.append((number, kind))
        if (number, kind) == (1, "clip"):
            files.drop(1)
            time.sleep(1.8)  # the consumer's own time, longer than the stall limit
    assert (1, "clip") in events and len(threads) == 1
    assert [k for n, k in events if n == 2] == ["open", "clip", "clip", "clip", "end"]
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_watched_clips_give_up_on_a_reader_that_stalls(monkeypatch):
    """The Ray decode tasks' guard: the reader runs in a thread of its own, left behind when it hangs."""
    release, _ = _stalling(monkeypatch, stalls_after=2)
    try:
        reader = video.ClipReader("1", frames=1, height=1, width=1)
        clips = video.watched_clips(reader, stall_seconds=1.0)
        assert [next(clips).item() for _ in range(2)] == [1.0, 1.0]
        with pytest.raises(VideoError, match="1: no clip decoded for 1 s"):
            next(clips)
    finally:
        release.set()
    assert [c.item() for c in video.watched_clips(video.ClipReader("2", frames=1, height=1, width=1))] == [2.0] * 4


def test_clip_reader_streams_the_same_clips_as_read_clips(files):
    reader = video.ClipReader(files["index24"], frames=4, height=16, width=16, tail="pad")
    streamed = list(reader)
    whole = read_clips(files["index24"], frames=4, height=16, width=16, tail="pad")
    assert all(torch.equal(a, b) for a, b in zip(streamed, whole.clips, strict=True))
    assert reader.start_times() == whole.start_times and reader.last_clip_frames == whole.last_clip_frames
    with pytest.raises(ValueError, match="tail must be one of"):
        video.ClipReader(files["index24"], frames=4, height=16, width=16, tail="loop")


def test_damage_midway_fails_after_the_clips_before_it(tmp_path):
    source = videos.make_video(tmp_path / "long.mp4", frames=72, height=40, width=48, fps=24)
    damaged = videos.make_scrambled(tmp_path / "damaged.mp4", source, start=source.stat().st_size * 3 // 10)
    reader = video.ClipReader(damaged, frames=4, height=32, width=32)
    clips = []
    with pytest.raises(VideoError, match="damaged.mp4: decoding failed"):
        for clip in reader:
            clips.append(clip)
    assert reader.clips_read == len(clips) >= 1
    whole = read_clips(source, frames=4, height=32, width=32).clips
    assert torch.equal(clips[0], whole[0])


def test_write_video_round_trip(tmp_path):
    images = [videos.pattern_frame("moving", i, 32, 48) for i in range(8)]
    frames = torch.from_numpy(np.stack(images)).permute(3, 0, 1, 2).float() / 127.5 - 1  # [3, 8, 32, 48]
    path = tmp_path / "out.mp4"
    write_video(path, frames * 1.5, fps=8)  # values out of [-1, 1] are clamped
    decoded, times = videos.read_frames(path)
    assert decoded.shape == (8, 32, 48, 3)
    assert times == pytest.approx([i / 8 for i in range(8)])
    back = torch.from_numpy(decoded).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert psnr(back, (frames * 1.5).clamp(-1, 1)) > 30
    assert os.listdir(tmp_path) == ["out.mp4"]
    with av.open(str(path)) as container:  # it says how its pixels were converted: BT.601 in limited range
        context = container.streams.video[0].codec_context
        assert (context.colorspace, context.color_range) == (writing.WRITTEN_COLORSPACE, 1)


def test_written_levels_are_rounded_and_a_video_keeps_its_frame_size(tmp_path):
    """A value becomes the nearest of the 256 levels, not the one below (a flat gray frame comes back exactly:
    truncating made every reconstruction half a level darker, within any PSNR bound); a chunk of another frame
    size, a chunk of no frames and a video of none are refused in one line each."""
    for level in (100.4, 100.6, 200.7):
        write_video(tmp_path / "flat.mp4", torch.full((3, 2, 32, 48), level / 127.5 - 1), fps=8)
        decoded, _ = videos.read_frames(tmp_path / "flat.mp4")
        assert (decoded == round(level)).all(), (level, decoded.min(), decoded.max())
    with writing.VideoWriter(tmp_path / "sizes.mp4", 8) as writer:
        writer.write(torch.zeros(3, 1, 32, 32))
        with pytest.raises(ValueError, match="frames are 16x16; this video's are 32x32"):
            writer.write(torch.zeros(3, 1, 16, 16))
        with pytest.raises(ValueError, match=r"with T >= 1; got shape \[3, 0, 32, 32\]"):
            writer.write(torch.zeros(3, 0, 32, 32))
    with pytest.raises(ValueError, match="no frames were written"):
        writing.VideoWriter(tmp_path / "none.mp4", 8).close()
    assert not (tmp_path / "none.mp4").exists()



def test_an_error_writing_a_video_is_said_of_the_video_not_its_temporary(tmp_path, monkeypatch):
    """FFmpeg's errors name the temporary a video is written to, and a sync's no file: either is said of the video
    asked for, with its errno (a full disk stops a decode by it); the temporary is gone."""
    import errno

    def refused(path, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", path)

    monkeypatch.setattr(writing.av, "open", refused)
    with pytest.raises(OSError) as raised:
        write_video(tmp_path / "v.mp4", torch.zeros(3, 2, 32, 32), fps=8)
    assert (raised.value.errno, raised.value.filename) == (errno.EIO, str(tmp_path / "v.mp4"))
    monkeypatch.undo()
    monkeypatch.setattr(writing.AtomicFile, "commit", lambda self: os.fsync(2**30))  # EBADF, naming no file
    with pytest.raises(OSError) as raised:
        write_video(tmp_path / "v.mp4", torch.zeros(3, 2, 32, 32), fps=8)
    assert (raised.value.errno, raised.value.filename) == (errno.EBADF, str(tmp_path / "v.mp4"))
    assert not list(tmp_path.iterdir())

WRITE_PATTERN = """
import os, sys
if {one_core}:
    os.sched_setaffinity(0, {{0}})
sys.path.insert(0, {tests!r})
import numpy as np, torch, videos
from titok_fast.writing import write_video
images = [videos.pattern_frame("moving", i, 192, 192) for i in range(16)]
write_video({path!r}, torch.from_numpy(np.stack(images)).permute(3, 0, 1, 2).float() / 127.5 - 1, fps=8)
"""


def test_write_video_makes_the_same_file_whatever_memory_held_before_and_whatever_the_cores(tmp_path):
    """The same frames make the same mp4, byte for byte: here in processes whose freshly allocated memory holds
    other bytes (glibc's MALLOC_PERTURB_), and on one core or on every core. x264's macroblock tree read such
    memory (192x192 clips came out otherwise from one run to the next), and its output depends on its thread
    count, by default the cores it may run on."""
    made = []
    for perturb, one_core in (("165", False), ("77", False), ("165", True)):
        path = tmp_path / f"{perturb}-{one_core}.mp4"
        code = WRITE_PATTERN.format(tests=str(Path(__file__).parent), path=str(path), one_core=one_core)
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "MALLOC_PERTURB_": perturb})
        made.append(path.read_bytes())
    assert made[1] == made[0] and made[2] == made[0]


def test_write_video_pads_odd_sizes(tmp_path):
    frames = torch.rand(3, 3, 31, 45) * 2 - 1
    frames[..., -1, :] = 0.5
    frames[..., :, -1] = -0.5
    write_video(tmp_path / "odd.mp4", frames, fps=24)
    decoded, _ = videos.read_frames(tmp_path / "odd.mp4")
    assert decoded.shape == (3, 32, 46, 3)
    assert abs(decoded[:, -1, 8:40].astype(float).mean() - 191) < 8  # copied bottom row (0.5 -> 191)
    assert abs(decoded[:, 8:24, -1].astype(float).mean() - 64) < 8  # copied right column (-0.5 -> 64)


@pytest.mark.parametrize("fps", [0, -8, float("inf"), float("nan"), 1e30])
def test_write_video_refuses_an_fps_out_of_range(tmp_path, fps):
    with pytest.raises(ValueError, match=r"fps must be a number in \(0, 1000\]"):
        write_video(tmp_path / "out.mp4", torch.zeros(3, 2, 16, 16), fps=fps)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fps", [1e-4, 4e-4, 0.01])
def test_write_video_keeps_a_slow_rate(tmp_path, fps):
    """Rates below 1/1001 fps used to round to 0, which libav wrote as 24 fps."""
    write_video(tmp_path / "slow.mp4", torch.zeros(3, 2, 16, 16), fps=fps)
    with av.open(str(tmp_path / "slow.mp4")) as container:
        assert container.streams.video[0].average_rate == Fraction(fps).limit_denominator(10**4)
    with pytest.raises(ValueError, match=r"fps 5e-05: an mp4 is written at 0.0001 fps at least"):
        write_video(tmp_path / "slower.mp4", torch.zeros(3, 2, 16, 16), fps=5e-5)


def test_side_by_side():
    a, b = torch.zeros(3, 2, 8, 5), torch.ones(3, 2, 8, 7)
    both = side_by_side(a, b)
    assert both.shape == (3, 2, 8, 12)
    assert torch.equal(both[..., :5], a) and torch.equal(both[..., 5:], b)
    with pytest.raises(ValueError, match="equal C, T, H"):
        side_by_side(a, torch.ones(3, 2, 9, 5))


def test_psnr_known_values():
    a = torch.rand(3, 4, 16, 16) - 0.5
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 0.1) == pytest.approx(10 * math.log10(4 / 0.01))  # 0.1 on [-1, 1] is 0.05 on [0, 1]
    noise = torch.randn(3, 8, 64, 64) * 0.2
    assert psnr(a.repeat(1, 2, 4, 4), a.repeat(1, 2, 4, 4) + noise) == pytest.approx(10 * math.log10(100), abs=0.05)


def test_ssim_properties():
    a = torch.rand(3, 2, 32, 32) * 2 - 1
    assert ssim(a, a) == pytest.approx(1, abs=1e-12)
    scores = [ssim(a, (a + torch.randn_like(a) * s).clamp(-1, 1)) for s in (0.05, 0.1, 0.2, 0.4)]
    assert scores == sorted(scores, reverse=True) and scores[0] < 1
    b = a + torch.randn_like(a) * 0.1
    assert ssim(a, b) == pytest.approx(ssim(b, a))


def test_ssim_equals_its_definition_with_the_full_window():
    """SSIM blurs with the 11 x 11 window as two 1-D passes: the same means as the window itself, computed here
    position by position (non-square frames, a window that fits once across)."""
    a = torch.rand(3, 2, 11, 14, dtype=torch.float64) * 2 - 1
    b = (a + torch.randn_like(a) * 0.3).clamp(-1, 1)
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    window = torch.outer(g, g) / g.sum() ** 2
    x, y = (a + 1) / 2, (b + 1) / 2
    scores = []
    for c, t, j in itertools.product(range(3), range(2), range(14 - 10)):
        px, py = x[c, t, :, j : j + 11], y[c, t, :, j : j + 11]
        mx, my = (window * px).sum(), (window * py).sum()
        vx, vy = (window * px * px).sum() - mx**2, (window * py * py).sum() - my**2
        cov = (window * px * py).sum() - mx * my
        scores.append((2 * mx * my + 1e-4) * (2 * cov + 9e-4) / ((mx**2 + my**2 + 1e-4) * (vx + vy + 9e-4)))
    assert ssim(a, b) == pytest.approx(torch.stack(scores).mean().item(), rel=1e-12)


def test_ssim_of_flat_frames_is_the_luminance_term():
    x, y = 0.25, 0.75  # [0, 1] scale; no variance, so SSIM = (2 x y + C1) / (x^2 + y^2 + C1)
    a, b = torch.full((3, 2, 16, 16), 2 * x - 1), torch.full((3, 2, 16, 16), 2 * y - 1)
    assert ssim(a, b) == pytest.approx((2 * x * y + 1e-4) / (x * x + y * y + 1e-4), rel=1e-9)


def test_metric_shape_checks():
    with pytest.raises(ValueError, match="of one shape"):
        psnr(torch.zeros(3, 1, 16, 16), torch.zeros(3, 2, 16, 16))
    with pytest.raises(ValueError, match="at least 11 x 11"):
        ssim(torch.zeros(3, 1, 8, 16), torch.zeros(3, 1, 8, 16))


def test_iter_videos_turns_any_failure_into_that_files_error(tmp_path, monkeypatch):
    good = videos.make_video(tmp_path / "good.mp4", frames=16, height=32, width=32, fps=8)
    real = video.ClipReader.__iter__

    def flaky(self):
        if "bad" in self.path:
            raise MemoryError("decoder ran out of memory")
        return real(self)

    monkeypatch.setattr(video.ClipReader, "__iter__", flaky)
    results = list(iter_videos([tmp_path / "bad.mp4", good], workers=2, prefetch=2, frames=8, height=16, width=16))
    assert isinstance(results[0][1], VideoError) and "MemoryError" in str(results[0][1])
    assert "bad.mp4" in str(results[0][1])
    assert not isinstance(results[1][1], VideoError) and len(results[1][1].clips) == 2


def test_worker_processes_lose_no_clip_keep_order_and_fail_only_the_failing_file(files):
    """Decoding in worker processes gives what threads give, file by file: the same clips in order, the same
    metadata, and each bad file's own error (the files after it still read)."""
    paths = [files["moving"], files["garbage"], files["index24"], files["scrambled"], files["odd"], files["missing"]]
    kwargs = dict(frames=4, height=16, width=16, tail="pad", prefetch=4)
    threads = list(iter_videos(paths, workers=2, **kwargs))
    processes = list(iter_videos(paths, workers=2, worker_kind="process", **kwargs))
    assert [p for p, _ in processes] == paths
    assert [type(r).__name__ for _, r in processes] == [type(r).__name__ for _, r in threads]
    assert [type(r).__name__ for _, r in processes][:3] == ["ClipSet", "VideoError", "ClipSet"]
    for (_, a), (_, b) in zip(threads, processes, strict=True):
        if isinstance(a, VideoError):
            assert str(a) == str(b)
            continue
        assert len(a.clips) == len(b.clips) > 0
        assert all(torch.equal(x, y) for x, y in zip(a.clips, b.clips, strict=True))
        assert (a.start_times, a.source_fps, a.last_clip_frames) == (b.start_times, b.source_fps, b.last_clip_frames)


def test_worker_processes_hand_over_i420_clips_as_threads_do(files):
    """Source-size clips (placement "device") as I420 from worker processes, through their reused shared-memory
    segments: the threads' clips, with their matrix; a file of odd size gives RGB clips."""
    paths = [files["moving"], files["odd"], files["index24"]]
    kwargs = dict(frames=4, height=16, width=16, tail="pad", prefetch=4, preprocess="device", upload="i420")
    threads = list(iter_videos(paths, workers=2, **kwargs))
    processes = list(iter_videos(paths, workers=2, worker_kind="process", **kwargs))
    assert [type(r.clips[0]).__name__ for _, r in processes] == ["I420Clip", "Tensor", "I420Clip"]
    for (_, a), (_, b) in zip(threads, processes, strict=True):
        assert len(a.clips) == len(b.clips) > 0
        assert all(same_clip(x, y) for x, y in zip(a.clips, b.clips, strict=True))


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_decoding_workers_say_what_they_waited_for(files, kind):
    """With the stage clock on, the workers' waits reach the run, by what they waited for (a worker process's with
    its messages): a file to read, room for a source-size clip and, behind a consumer slower than decoding, the
    run taking their clips (a process asks the run for room, which answers once it has queued the clip before: a
    full queue shows there). Each is wall time, within the read's; off, nothing is counted."""
    paths = [files["moving"], files["index24"], files["moving"]]
    kwargs = dict(workers=1, prefetch=1, capacity=1, worker_kind=kind, frames=4, height=16, width=16,
                  preprocess="device", upload="i420")  # fmt: skip
    video.CLOCK.enable()
    try:
        started = time.perf_counter()
        for _, feed in video.stream_videos(paths, **kwargs):
            for _ in feed:
                time.sleep(0.08)  # a consumer far slower than decoding (a loaded machine decodes slower)
        wall = time.perf_counter() - started
        spent = video.CLOCK.take()
        video.CLOCK.enable(False)
        list(video.stream_videos(paths[:1], **kwargs))
        assert video.CLOCK.take() == {}
    finally:
        video.CLOCK.enable(False)
    waits = {name: spent.get(f"wait_{name}") for name in stages.WAITS}
    assert waits["file"] is not None and waits["room"] is not None, waits
    assert all(0 <= seconds <= wall for seconds in waits.values() if seconds is not None), (waits, wall)
    behind = waits["taken"] or 0.0 if kind == "thread" else (waits["taken"] or 0.0) + waits["room"]
    assert behind > 0.02, waits  # (three files' clips, each taken 0.08 s after the one before)
    assert spent["decode"] > 0  # (the stages as before)


def same_clip(a, b) -> bool:
    """Whether two clips are the same bytes, of the same kind (tensors, or I420 clips with the same matrix)."""
    if isinstance(a, I420Clip) or isinstance(b, I420Clip):
        return type(a) is type(b) and a.matrix == b.matrix and torch.equal(a.frames, b.frames)
    return torch.equal(a, b)


@pytest.mark.parametrize("upload", ["rgb", "i420", "scaled in bf16"])
def test_clips_that_find_no_room_in_shared_memory_come_through_the_pipe(files, capfd, upload):
    """Where shared memory is too small for a clip (a container's /dev/shm is 64 MB unless raised), the worker
    process sends it through its pipe instead: the same clips as threads give, no file failed, one notice a run,
    no shared memory name left. Clips scaled in bf16 by the worker (encode's, for a bf16 model) too: NumPy, which
    the pipe's clips went through, has no bfloat16, and every file failed. (Here the workers are started under a
    file size limit below a clip's size, which fails their shared memory as a full /dev/shm does: the server they
    are forked from is started under it.)"""
    import resource
    from multiprocessing import forkserver

    paths = [files["moving"], files["index24"], files["odd"]]
    kwargs = dict(frames=4, height=64, width=64, tail="pad", prefetch=2)  # a clip: 196,608 bytes
    if upload == "i420":  # source-size clips, in segments of shared memory reused: those of 48x64 and 32x32 frames
        # as I420 (18,432 and 6,144 bytes, the limit below at 16,384 bytes), the odd-sized file's as RGB
        kwargs |= dict(preprocess="device", upload="i420")
    if upload == "scaled in bf16":  # 98,304 bytes a clip
        kwargs |= dict(dtype=torch.bfloat16)
    threads = list(iter_videos(paths, workers=2, **kwargs))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    before = set(multiprocessing.active_children())  # (one an earlier test's stream is still ending)
    stream = iter_videos(paths, workers=2, worker_kind="process", **kwargs)
    forkserver._forkserver._stop()
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << (14 if upload == "i420" else 16), hard))
    try:
        first = next(stream)  # the server and its workers have started (under the limit, which they keep)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    try:
        workers = {f"torch_{child.pid}_" for child in set(multiprocessing.active_children()) - before}
        assert len(workers) == 2
        processes = [first, *stream]
    finally:
        stream.close()
        forkserver._forkserver._stop()  # (later workers: from a server without the limit)
    assert [p for p, _ in processes] == paths
    for (_, a), (_, b) in zip(threads, processes, strict=True):
        assert isinstance(b, video.ClipSet) and len(a.clips) == len(b.clips) > 0
        assert all(same_clip(x, y) for x, y in zip(a.clips, b.clips, strict=True))
    assert [type(r.clips[0]).__name__ for _, r in processes] == (
        ["I420Clip", "I420Clip", "Tensor"] if upload == "i420" else ["Tensor"] * 3)
    assert {getattr(r.clips[0], "frames", r.clips[0]).dtype for _, r in processes} == (
        {torch.bfloat16} if upload == "scaled in bf16" else {torch.uint8} if upload == "i420" else {torch.float32})
    err = capfd.readouterr().err
    assert err.count("found no room in shared memory") == 1 and "--worker-kind thread" in err, err
    assert not [n for n in os.listdir(video.SHARED_MEMORY) if n.startswith(tuple(workers))]


@pytest.fixture
def short_tmp():
    """A folder of /tmp short enough for a worker's sockets (video.SOCKET_PATH_MAX) whatever $TMPDIR is: under a
    longer tmp_path (a CI's $TMPDIR) the worker's multiprocessing folder is made in /tmp instead, not there."""
    folder = Path(tempfile.mkdtemp(prefix="tf-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_worker_processes_are_forked_from_a_server_that_has_imported_torch_and_keep_the_runs_environment(
    files, short_tmp, monkeypatch
):
    """A spawned worker imported torch itself (2.5 CPU-s each, 40 for 16 workers); forked from a server that has
    imported it, it starts ready. It has the run's environment when it was started, not the server's: its
    multiprocessing folder is made in the run's $TMPDIR of then."""
    from multiprocessing import forkserver

    tmp_path = short_tmp
    video.start_process_server()  # (under the $TMPDIR of before)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    before = set(multiprocessing.active_children())  # (one an earlier test's stream is still ending)
    stream = video.stream_videos([files["index24"]], workers=1, prefetch=1, capacity=1, worker_kind="process",
                                 frames=1, height=8, width=8, fps=24)  # fmt: skip
    _, feed = next(stream)
    next(iter(feed))
    (child,) = set(multiprocessing.active_children()) - before
    server = forkserver._forkserver._forkserver_pid
    with open(f"/proc/{child.pid}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[1]) == server  # its parent
    with open(f"/proc/{server}/maps") as f:
        assert "libtorch_cpu" in f.read()
    assert len(list(tmp_path.glob("pymp-*"))) == 1
    stream.close()


def test_worker_process_moves_past_a_feed_left_unread(files):
    paths = [files["index24"], files["index24"], files["index30"]]
    seen = []
    stream = video.stream_videos(paths, workers=1, prefetch=1, capacity=1, worker_kind="process", frames=1,
                                 height=8, width=8, fps=24)  # fmt: skip
    for number, (_, feed) in enumerate(stream):
        if number == 1:
            next(iter(feed))  # one clip taken, the rest abandoned: the process must drop the file, not block
            continue
        seen.append(sum(1 for _ in feed))
    assert seen == [48, 30]


def test_a_worker_process_stuck_in_a_file_fails_it_alone_and_is_replaced(files, tmp_path):
    """A decoding process whose read hangs fails that file after the stall limit and is killed; a new process
    reads the next file. Starting a process (seconds of imports, twice here) is not counted as a stall."""
    paths = [str(videos.make_hanging(tmp_path)), files["index30"]]
    before = set(multiprocessing.active_children())  # (one an earlier test's stream is still ending)
    stream = video.stream_videos(paths, workers=1, prefetch=1, capacity=1, worker_kind="process", stall_seconds=3.0,
                                 frames=1, height=8, width=8, fps=24)  # fmt: skip
    _, feed = next(stream)
    (child,) = set(multiprocessing.active_children()) - before
    with pytest.raises(VideoError, match=r"hangs.mp4: no clip decoded for 3 s; given up"):
        next(iter(feed))
    _, feed = next(stream)
    assert sum(1 for _ in feed) == 30
    stream.close()
    child.join(timeout=5)
    assert child.exitcode == -signal.SIGKILL


def test_default_workers_is_the_cores_this_process_may_use():
    assert video.default_workers() == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="worker_kind must be one of"):
        next(video.stream_videos(["0"], workers=1, prefetch=1, worker_kind="fiber", frames=1, height=1, width=1))


def test_auto_takes_processes_only_for_many_workers_on_small_frames(files, tmp_path):
    small, large = 456 * 256, 1280 * 720
    kinds = {(w, d, p): video.worker_kind_for(w, d, p) for w in (1, 7, 8, 64) for d in ("cpu", "nvdec")
             for p in (small, large, None)}  # fmt: skip
    processes = {(w, "cpu", p) for w in (8, 64) for p in (small, None)}  # (a size not known: by the workers)
    assert {k for k, v in kinds.items() if v == "process"} == processes
    (tmp_path / "text.mp4").write_text("not a video")
    assert [video.frame_pixels(p) for p in (tmp_path / "absent.mp4", tmp_path / "text.mp4", tmp_path)] == [None] * 3
    wide = videos.make_video(tmp_path / "wide.mp4", 2, 480, 656)  # just over PROCESS_FRAME_PIXELS
    assert video.frame_pixels(files["index24"]) == 32 * 32 and video.frame_pixels(wide) == 480 * 656
    # the first file tells
    assert video.auto_worker_kind(8, "cpu", [files["index24"], wide]) == "process"
    assert video.auto_worker_kind(8, "cpu", [wide, files["index24"]]) == "thread"
    assert video.auto_worker_kind(8, "nvdec", [files["index24"]]) == "thread"
    assert video.auto_worker_kind(7, "cpu", [files["index24"]]) == "thread"
    assert video.auto_worker_kind(8, "cpu", iter([files["index24"]])) == "process"  # (not a sequence: by workers)
    from titok_fast import cli

    encode = cli.build_parser()._subparsers._group_actions[0].choices["encode"]
    help_text = " ".join(encode.format_help().split())  # what the CLI says "auto" does
    assert f"from {video.PROCESS_WORKERS_FROM} workers on" in help_text
    assert f"frames of at most {video.PROCESS_FRAME_PIXELS:,} pixels" in help_text


def test_auto_decides_without_a_first_file_whose_read_hangs_and_an_interrupt_reaches_the_run(tmp_path):
    """With 8 workers or more "auto" opens the first file to see its frame size, on the run's thread, before any
    stall timeout: a first file whose read hung (a stuck network file system) hung the run for good, and a Ctrl-C
    or SIGTERM meanwhile was taken by FFmpeg's open and became an error of the file (a frame size of None), the run
    going on as if never stopped."""
    hanging = videos.make_hanging(tmp_path)
    try:
        started = time.monotonic()
        assert video.frame_pixels(hanging, seconds=0.5) is None  # (unknown: the workers' count decides)
        assert time.monotonic() - started < 30
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (a suite started in the background
        try:  # has Ctrl-C ignored)
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                video.frame_pixels(hanging, seconds=60)
            timer.join()
        finally:
            signal.signal(signal.SIGINT, previous)
    finally:
        videos.release_hanging(tmp_path)


def _script(
    tmp_path: Path, body: str, temp: Path | None = None, top: str = "", guard: bool = True, **popen
) -> subprocess.Popen:
    """``body`` run as a script (the main module) in a Python process of its own, under an ``if __name__ ==
    "__main__":`` guard (or none) after ``top`` (unguarded), with this checkout importable (and $TMPDIR ``temp``);
    its stdout piped (``popen``: more of Popen's options)."""
    script = tmp_path / "script.py"
    body = textwrap.dedent(body)
    if guard:
        body = "if __name__ == '__main__':\n" + textwrap.indent(body, "    ")
    script.write_text("import multiprocessing, os, signal, sys, time\nfrom titok_fast import video\n" + top + body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(video.__file__).parents[1]), *sys.path])}
    if temp is not None:
        env["TMPDIR"] = str(temp)
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env, **popen)


@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "unguarded"])
def test_decoding_processes_do_not_run_the_script_that_started_them(files, tmp_path, guard):
    """A process started by the forkserver (or spawn) method runs the script of its run again before its target.
    Decoding processes need nothing of it: a script without a main guard started its whole job again in each one,
    where it died (every file failed, "the decoding process died"); a guarded one had its imports made again in
    each process. The script's top level runs once, in the run, and every clip comes back."""
    marks = tmp_path / "runs"
    top = f"with open({str(marks)!r}, 'a') as f:\n    print(os.getpid(), file=f)\n"  # (guarded or not)
    run = _script(tmp_path, f"""
        stream = video.stream_videos([{files['index24']!r}, {files['index30']!r}], workers=2, prefetch=2,
                                     worker_kind="process", frames=4, height=8, width=8, fps=24)
        print(sum(1 for _, feed in stream for _ in feed), flush=True)
    """, top=top, guard=guard)  # fmt: skip
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 0
    expected = sum(len(read_clips(files[name], frames=4, height=8, width=8, fps=24).clips) for name in ("index24",
                                                                                                     "index30"))
    assert out.strip() == str(expected)
    assert marks.read_text().split() == [str(run.pid)]


def test_processes_other_code_starts_are_given_the_main_module(tmp_path, monkeypatch):
    """Only a decoding process, started by the thread that starts it, is started without the run's main module:
    one another thread starts meanwhile, or any started after, is given it as multiprocessing gives it."""
    from multiprocessing import spawn

    main = types.ModuleType("__main__")
    main.__file__, main.__spec__ = str(tmp_path / "job.py"), None
    monkeypatch.setitem(sys.modules, "__main__", main)
    meanwhile = []
    with video._main_left_out():
        ours = spawn.get_preparation_data("ours")
        other = threading.Thread(target=lambda: meanwhile.append(spawn.get_preparation_data("theirs")))
        other.start()
        other.join()
    after = spawn.get_preparation_data("theirs")
    assert "init_main_from_path" not in ours and "init_main_from_name" not in ours
    assert ours["sys_path"] == after["sys_path"]  # (the rest as it was)
    assert meanwhile[0]["init_main_from_path"] == after["init_main_from_path"] == main.__file__


def test_worker_processes_end_when_the_run_that_started_them_is_killed(files, tmp_path):
    """SIGKILL (or the OOM killer) gives a run no chance to stop its decoding processes: they end themselves,
    leaving no multiprocessing folder in the temporary folder."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    run = _script(tmp_path, f"""
        stream = video.stream_videos([{files['index24']!r}], workers=1, prefetch=1, capacity=1,
                                     worker_kind='process', frames=1, height=8, width=8, fps=24)
        _, feed = next(stream)
        next(iter(feed))
        print(*[c.pid for c in multiprocessing.active_children()], flush=True)
        time.sleep(600)
    """, temp)  # fmt: skip
    try:
        workers = [int(pid) for pid in run.stdout.readline().split()]
    finally:
        run.kill()
        run.wait()
    assert workers
    deadline = time.monotonic() + 30 * video.PARENT_CHECK_SECONDS
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(pid) for pid in workers)
    assert not list(temp.glob("pymp-*"))


def test_a_worker_stuck_in_a_read_ends_when_the_run_is_killed_and_so_does_its_server(tmp_path):
    """A worker blocked in a read that never returns (an ffconcat list naming a named pipe no one writes) watches
    its parent, the server it was forked from; the server ends when every copy of its "alive" pipe is closed, and
    the worker held one: both outlived the killed run, and its folders were left."""
    os.mkfifo(tmp_path / "pipe.mp4")
    (tmp_path / "hangs.mp4").write_text("ffconcat version 1.0\nfile 'pipe.mp4'\n")
    temp = tmp_path / "tmp"
    temp.mkdir()
    run = _script(tmp_path, f"""
        from multiprocessing import forkserver
        stream = video.stream_videos([{str(tmp_path / "hangs.mp4")!r}], workers=1, prefetch=1, capacity=1,
                                     worker_kind="process", frames=1, height=8, width=8, fps=24)
        _, feed = next(stream)
        time.sleep(1)  # (the worker has started, and is stuck opening the pipe)
        print(*[c.pid for c in multiprocessing.active_children()], forkserver._forkserver._forkserver_pid, flush=True)
        time.sleep(600)
    """, temp)  # fmt: skip
    try:
        pids = [int(pid) for pid in run.stdout.readline().split()]
    finally:
        run.kill()
        run.wait()
    assert len(pids) == 2
    try:
        deadline = time.monotonic() + 30 * video.PARENT_CHECK_SECONDS
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(pid) for pid in pids)
        assert not list(temp.glob("pymp-*"))
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_library_call_leaves_no_process_server_behind_for_other_codes_processes(files, tmp_path):
    """encode_files with worker processes started multiprocessing's fork server with SIGINT blocked and this
    package preloaded, and left it running: every process the caller forked afterwards (a DataLoader's workers with
    forkserver, Python 3.14's default start method on Linux) ignored Ctrl-C and had the server's preloads
    imported. The server is stopped when the last stream of worker processes ends, and multiprocessing's preloads
    put back: after encode_files, after stream_videos, after two encode_files in threads where the second
    outlives the first (its stuck worker replaced after it: the first call's stop left the second's new server
    behind), and in a process forked while a stream ran (it counts its own streams). One started before (as the
    command starts it, early) is left running."""
    os.mkfifo(tmp_path / "pipe.mp4")
    (tmp_path / "hangs.mp4").write_text("ffconcat version 1.0\nfile 'pipe.mp4'\n")  # (a read that never returns)
    top = textwrap.dedent("""
        def report(queue):
            with open("/proc/self/status") as f:
                blocked = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
            queue.put((bool(blocked & 1 << (signal.SIGINT - 1)), "titok_fast._server" in sys.modules))
    """)
    run = _script(tmp_path, f"""
        import threading
        from multiprocessing import forkserver
        from titok_fast import Engine, TiTok
        from titok_fast.pipeline import ClipSettings, encode_files
        model = TiTok("tiny").eval()

        def encode(paths, out, stall=None, workers=2):
            return encode_files(model, Engine(model, mode="eager"), paths, {str(tmp_path)!r} + out,
                                ClipSettings(grid=(4, 32, 32), tokens=16), workers=workers, worker_kind="process",
                                overwrite=True, stall_seconds=stall)

        def in_threads():
            first = threading.Thread(target=encode, args=([{files["index24"]!r}], "/a"))
            first.start()
            while forkserver._forkserver._forkserver_pid is None:  # (the second comes once the server runs)
                time.sleep(0.01)
            second = threading.Thread(target=encode, args=([{str(tmp_path / "hangs.mp4")!r}, {files["index24"]!r}],
                                                           "/b", 3, 1))  # (its one worker stuck, then replaced)
            second.start()
            first.join()
            second.join()

        def stream():
            for _, feed in video.stream_videos([{files["index24"]!r}], workers=2, prefetch=2, worker_kind="process",
                                               frames=4, height=32, width=32, fps=8):
                list(feed)

        def forked_while_streaming():  # (a DataLoader's worker forked while the run streams: its own stream's
            running = video.stream_videos([{files["index24"]!r}], workers=1, prefetch=1,  # server ends with it)
                                          worker_kind="process", frames=4, height=32, width=32, fps=8)
            next(running)
            child = multiprocessing.get_context("fork").Process(
                target=lambda: stream() or print("child", forkserver._forkserver._forkserver_pid, flush=True))
            child.start()
            child.join()
            running.close()

        for name, call in [("encode", lambda: encode([{files["index24"]!r}], "/c")), ("stream", stream),
                           ("threads", in_threads), ("fork", forked_while_streaming),
                           ("started before", lambda: encode([{files["index24"]!r}], "/d"))]:
            if name == "started before":
                video.start_process_server()
            call()
            context = multiprocessing.get_context("forkserver")
            queue = context.SimpleQueue()
            process = context.Process(target=report, args=(queue,))
            process.start()
            print(name, forkserver._forkserver._preload_modules, *queue.get(), flush=True)
            process.join()
            forkserver._forkserver._stop()  # (the server that process came from is other code's: gone)
    """, top=top)  # fmt: skip
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out
    assert out.splitlines() == [  # (the preloads as the process was started: before it started its own server)
        "encode ['__main__'] False False", "stream ['__main__'] False False", "threads ['__main__'] False False",
        "child None", "fork ['__main__'] False False",
        "started before ['titok_fast._server'] True True",  # the command's: kept
    ], out


def test_a_script_that_leaves_a_stream_of_worker_processes_open_exits(files, tmp_path):
    """A stream left open at exit (a script's loop that raised, or stopped early) is closed while Python shuts down:
    its server's stop then waited for ever, in 2 of 5 runs, on a lock a frozen daemon thread held, or on a thread
    that could not start. At exit nothing is stopped: the server ends with the process."""
    paths = [files[name] for name in ("index24", "moving", "index30", "moving")] * 2
    for ending in ("raise RuntimeError('a bug in the loop')", "print(len(list(feed)))"):
        _ends(_script(tmp_path, f"""
            stream = video.stream_videos({[str(p) for p in paths]!r}, workers=4, prefetch=4, worker_kind="process",
                                         frames=4, height=32, width=32, fps=8)
            path, feed = next(stream)
            {ending}
        """, stderr=subprocess.DEVNULL), ending)  # fmt: skip


def _ends(run: subprocess.Popen, ending: str) -> None:
    """``run`` (a script whose last line is ``ending``) ends within a minute, as that line has it end."""
    try:
        run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == (1 if ending.startswith("raise") else 0), ending


def test_a_stream_left_open_at_exit_leaves_no_folder_of_its_workers(files, tmp_path, short_tmp):
    """At exit multiprocessing ends a stream's worker processes with a SIGTERM, which leaves a busy worker no time to
    remove its multiprocessing folder (its sockets), left in $TMPDIR (in 2 of 3 runs of this test). The run removes
    the folder of each worker that has ended, once multiprocessing has ended them all."""
    long = videos.make_video(tmp_path / "long.mp4", 480, 64, 64, fps=24, pattern="moving")
    paths = [str(files["index24"]), str(long), str(long)]
    for ending in ("raise RuntimeError('a bug in the loop')", "print(next(iter(feed)).shape)"):
        _ends(_script(tmp_path, f"""
            stream = video.stream_videos({paths!r}, workers=1, prefetch=2, worker_kind="process", frames=4,
                                         height=32, width=32, fps=8)
            path, feed = next(stream)
            list(feed)  # the worker is ready and has served a file
            path, feed = next(stream)  # it reads the long one
            {ending}
        """, short_tmp, stderr=subprocess.DEVNULL), ending)  # fmt: skip
        assert not os.listdir(short_tmp), (ending, os.listdir(short_tmp))


@pytest.mark.parametrize("when", ["while-the-server-starts", "once-it-has-started"])
def test_a_run_killed_before_its_first_worker_leaves_no_folder_and_its_server_ends(tmp_path, when):
    """The process server starts before the run's first file (while the model loads): a run killed then has no
    worker to remove its multiprocessing folder (the server's socket) on the way out. The server does it, also
    when the run was killed while the server was still importing (it was adopted by then)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    started = ""
    if when == "once-it-has-started":  # a process from it: its imports are done (no decoding worker, which would
        started = "multiprocessing.get_context('forkserver').Process(target=os.getpid).start()"  # remove it too)
    run = _script(tmp_path, f"""
        from multiprocessing import forkserver
        folder = video.start_process_server()
        {started}
        print(forkserver._forkserver._forkserver_pid, folder, flush=True)
        time.sleep(600)
    """, temp)  # fmt: skip
    try:
        server, folder = run.stdout.readline().split()
    finally:
        run.kill()
        run.wait()
    assert os.path.basename(folder).startswith("pymp-")  # (in $TMPDIR, or in /tmp where that path is too long)
    deadline = time.monotonic() + 30
    while (_running(int(server)) or os.path.exists(folder)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(int(server))
    assert not os.path.exists(folder) and not list(temp.glob("pymp-*"))


def test_worker_processes_import_the_runs_titok_fast_whatever_folder_the_run_is_started_in(files, tmp_path):
    """The process server is a ``python -c`` process, whose path begins with the current folder: a run started in
    a folder holding another ``titok_fast`` (a checkout of another version) had its server import that one (here a
    decoy, which leaves a mark), and decoding processes run its code. Nor does the server start with the run's
    script folder on its path, where Python would import modules of that folder while it starts (here a
    ``sitecustomize``: a folder holding a file named ``nt.py`` made the server fail to import torch)."""
    folder = tmp_path / "elsewhere"
    (folder / "titok_fast").mkdir(parents=True)
    mark, startup = tmp_path / "decoy-imported", tmp_path / "startup-imported"
    (folder / "titok_fast" / "__init__.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    (tmp_path / "sitecustomize.py").write_text(f"open({str(startup)!r}, 'w').close()\n")  # (the script's folder)
    run = _script(tmp_path, f"""
        stream = video.stream_videos([{files['index24']!r}], workers=1, prefetch=1, worker_kind='process',
                                     frames=4, height=8, width=8, fps=24)
        print(sum(1 for _, feed in stream for _ in feed), flush=True)
    """, cwd=folder)  # fmt: skip
    out = run.communicate(timeout=120)[0]
    assert run.returncode == 0 and out.split() == ["12"] and not mark.exists() and not startup.exists()


def test_a_process_server_started_again_imports_the_runs_titok_fast_too(files, tmp_path):
    """A server that died is started again for the next process, in the same way as the first: before, without the
    import path that keeps another ``titok_fast`` in the current folder from being imported (here a decoy)."""
    folder = tmp_path / "elsewhere"
    (folder / "titok_fast").mkdir(parents=True)
    mark = tmp_path / "decoy-imported"
    (folder / "titok_fast" / "__init__.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    run = _script(tmp_path, f"""
        from multiprocessing import forkserver
        video.start_process_server()
        first = forkserver._forkserver._forkserver_pid
        os.kill(first, signal.SIGKILL)
        while not video._ended(first):
            time.sleep(0.01)
        stream = video.stream_videos([{files['index24']!r}], workers=1, prefetch=1, worker_kind='process',
                                     frames=4, height=8, width=8, fps=24)
        print(sum(1 for _, feed in stream for _ in feed), forkserver._forkserver._forkserver_pid != first, flush=True)
    """, cwd=folder)  # fmt: skip
    out = run.communicate(timeout=120)[0]
    assert run.returncode == 0 and out.split() == ["12", "True"] and not mark.exists()


def test_processes_forked_from_the_process_server_have_the_runs_environment(tmp_path):
    """The run changes PYTHONSAFEPATH and PYTHONPATH to start its process server (:func:`video._our_import_path`);
    the server puts them back, so that a process other code has it fork (multiprocessing's forkserver context,
    Python 3.14's default), and the Python scripts such a process runs, have the run's (with PYTHONSAFEPATH=1 a
    script could not import the modules beside it). Threads starting the server at once leave the run's own
    environment as it was."""
    result = tmp_path / "child.json"
    top = textwrap.dedent(f"""
        import json, threading
        names = ("PYTHONPATH", "PYTHONSAFEPATH")
        def child():  # (at the top: the script is run again in the child, as __mp_main__, to find it)
            with open({str(result)!r}, "w") as f:
                json.dump({{name: os.environ.get(name) for name in names}}, f)
    """)  # fmt: skip
    run = _script(tmp_path, """
        before = {name: os.environ.get(name) for name in names}
        starting = [threading.Thread(target=video.start_process_server) for _ in range(3)]
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join()
        after = {name: os.environ.get(name) for name in names}
        process = multiprocessing.get_context("forkserver").Process(target=child)
        process.start()
        process.join()
        print(json.dumps([before, after]), flush=True)
    """, top=top)  # fmt: skip
    out = run.communicate(timeout=120)[0]
    assert run.returncode == 0
    before, after = json.loads(out)
    assert after == before and json.loads(result.read_text()) == before and before["PYTHONSAFEPATH"] is None


def test_the_process_server_is_started_without_the_runs_main_module(tmp_path, monkeypatch):
    """multiprocessing's server preloads "__main__" by default, and Python 3.14's would run the run's script in it:
    the server is started without it, also from a folder holding another ``titok_fast``."""
    from multiprocessing import forkserver

    (tmp_path / "titok_fast").mkdir()
    (tmp_path / "titok_fast" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    video.start_process_server()
    assert video._process_context()._name == "forkserver"
    assert "__main__" not in forkserver._forkserver._preload_modules


def test_the_process_server_finds_its_socket_and_removes_only_a_folder_of_its_ended_run(short_tmp):
    """``titok_fast._server``'s parts: the folder of the process's listening Unix socket (none where it has none);
    a folder removed only from the server itself, only if the run has ended, and only a multiprocessing one."""
    from titok_fast import _server

    tmp_path = short_tmp  # (a socket's path holds 107 bytes at most)

    found = _script(tmp_path, f"""
        import socket
        from titok_fast import _server
        with socket.socket(socket.AF_UNIX) as sock:
            print(_server.listening_folder())
            sock.bind({str(tmp_path / "listener")!r})
            print(_server.listening_folder())  # (not listening yet)
            sock.listen()
            print(_server.listening_folder(), flush=True)
    """).communicate(timeout=60)[0]  # fmt: skip
    assert found.splitlines() == ["None", "None", str(tmp_path)]  # (a $TMPDIR may hold spaces)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    folders = {name: tmp_path / name for name in ("pymp-a", "pymp-b", "pymp-c", "other")}
    for folder in folders.values():
        folder.mkdir()
    _server._remove_folder_of_killed_run(os.getpid(), os.getpid(), str(folders["pymp-a"]), 0.2)  # the run lives
    _server._remove_folder_of_killed_run(os.getpid() + 1, ended.pid, str(folders["pymp-b"]))  # not the server
    _server._remove_folder_of_killed_run(os.getpid(), ended.pid, str(folders["other"]))  # not multiprocessing's
    _server._remove_folder_of_killed_run(os.getpid(), ended.pid, str(folders["pymp-c"]))
    _server._remove_folder_of_killed_run(os.getpid(), 1, str(folders["pymp-b"]))  # (adopted before it looked)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["other", "pymp-a"]


def test_the_process_server_waits_a_moment_for_its_killed_run_to_read_as_ended(tmp_path):
    """The server ends when its run's end of the "alive" pipe closes, which the kernel does as it tears a killed
    run down, a moment before the run reads as ended: the server waits for that, and then removes the folder
    (it looked at once, found the run still running, and left it; seen on a loaded 2-core machine)."""
    from titok_fast import _server

    folder = tmp_path / "pymp-run"
    folder.mkdir()
    ending = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    try:
        # it is running when looked at; the wait is longer than the default, which an interpreter's start (counted
        # here, not for a killed run) may take much of on a loaded machine
        _server._remove_folder_of_killed_run(os.getpid(), ending.pid, str(folder), wait=10.0)
        assert not folder.exists() and ending.poll() is not None
    finally:
        ending.kill()
        ending.wait()


@pytest.mark.parametrize("case", ["forked-from-a-run", "another-server-first"])
def test_worker_processes_start_in_a_process_forked_from_a_run_and_beside_another_fork_server(files, tmp_path, case):
    """A process forked from a run that started its fork server (a data loader's worker) has a copy of the run's
    state for a server that is not its child: it starts one of its own (it failed with ChildProcessError). Where
    other code started a fork server first (without this module preloaded, nor SIGINT blocked), processes are
    spawned instead, as before, so that a Ctrl-C reaching the group while one starts does not kill it."""
    path = files["index24"]
    read = (f"[type(v).__name__ for _, v in video.iter_videos([{str(path)!r}], workers=1, prefetch=1, "
            "worker_kind='process', frames=1, height=8, width=8, fps=24)]")  # fmt: skip
    if case == "forked-from-a-run":
        body = f"""
            from multiprocessing import forkserver
            video.start_process_server()  # (kept running, as the command's: a stream's own ends with it)
            print({read}, flush=True)
            ours = forkserver._forkserver._forkserver_pid

            def read_in_child():
                video.start_process_server()
                print({read}, forkserver._forkserver._forkserver_pid not in (None, ours), flush=True)

            child = multiprocessing.get_context("fork").Process(target=read_in_child)
            child.start()
            child.join()
            print(child.exitcode, flush=True)
            from titok_fast._server import RUN_END_SECONDS
            time.sleep(RUN_END_SECONDS + 0.5)  # (by then the child's server has ended: it removed the run's folder)
            print(os.path.isdir(multiprocessing.util.get_temp_dir()), {read}, flush=True)
        """
    else:
        body = f"""
            theirs = multiprocessing.get_context("forkserver").Process(target=os.getpid)
            theirs.start()
            theirs.join()
            stream = video.stream_videos([{str(path)!r}], workers=1, prefetch=1, capacity=1, worker_kind="process",
                                         frames=1, height=8, width=8, fps=24)
            _, feed = next(stream)
            (worker,) = multiprocessing.active_children()
            time.sleep(0.3)
            os.kill(worker.pid, signal.SIGINT)  # (while it starts: imports torch)
            print(sum(1 for _ in feed), flush=True)
            stream.close()
        """
    run = _script(tmp_path, body)
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 0
    if case == "forked-from-a-run":
        # (True: from a server of its own, which made a folder of its own too: the run's, copied by the fork, was
        # removed with it when the child ended, and the run's next stream failed)
        assert out.split("\n")[:4] == ["['ClipSet']", "['ClipSet'] True", "0", "True ['ClipSet']"]
    else:
        assert out.strip() == str(len(read_clips(path, frames=1, height=8, width=8, fps=24).clips))


def test_shared_memory_that_killed_workers_were_naming_is_removed_by_the_next_run(files, tmp_path, monkeypatch):
    """torch names each clip's shared memory /dev/shm/torch_<pid>_... and removes the name at once: a SIGKILL of
    the whole group in between leaves it. A run with worker processes removes those of its earlier workers (each
    marked while it runs) that are gone, made over ORPHAN_SECONDS ago; no other (a live process's, a recent one,
    another program's, whose names torch's file_system strategy keeps while they are used), and no mark of its own
    workers is left once they end."""
    folder = tmp_path / "shm"
    folder.mkdir()
    ours, theirs = [subprocess.Popen([sys.executable, "-c", ""]) for _ in range(2)]
    for process in (ours, theirs):
        process.wait()
    old = time.time() - 2 * video.ORPHAN_SECONDS
    names = {"orphan": f"torch_{ours.pid}_123_0", "recent": f"torch_{ours.pid}_123_1",
             "alive": f"torch_{os.getpid()}_123_0", "theirs": f"torch_{theirs.pid}_123_0",
             "other": f"sem.torch_{ours.pid}_1"}  # fmt: skip
    for kind, name in names.items():
        (folder / name).write_bytes(b"x")
        if kind != "recent":
            os.utime(folder / name, (old, old))
    for pid in (ours.pid, os.getpid()):
        (folder / f"{video.WORKER_MARK}{pid}").touch()  # (this process: marked, but not gone)
    monkeypatch.setattr(video, "SHARED_MEMORY", str(folder))
    stream = video.stream_videos([files["index24"]], workers=1, prefetch=1, capacity=1, worker_kind="process",
                                 frames=1, height=8, width=8, fps=24)  # fmt: skip
    assert [sum(1 for _ in feed) for _, feed in stream] == [48]
    kept = [n for k, n in names.items() if k != "orphan"] + [f"{video.WORKER_MARK}{os.getpid()}"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="named semaphores live in /dev/shm on Linux only")
def test_worker_processes_leave_nothing_in_shared_memory_when_the_whole_group_is_killed(files, tmp_path):
    """A scheduler's SIGKILL of the whole process group kills multiprocessing's resource tracker too, the only
    one that removes named semaphores (its queues' and events'): the run and its workers talk through pipes."""
    tag = f"titok-test-{os.getpid()}-{time.monotonic_ns()}"
    run = _script(tmp_path, f"""
        multiprocessing.current_process()._config['semprefix'] = '/{tag}'  # the names of any it makes
        stream = video.stream_videos([{files['index24']!r}] * 3, workers=2, prefetch=2, capacity=1,
                                     worker_kind='process', frames=1, height=8, width=8, fps=24)
        _, feed = next(stream)
        next(iter(feed))
        print(len(multiprocessing.active_children()), flush=True)
        time.sleep(600)
    """, tmp_path, start_new_session=True)  # fmt: skip
    try:
        assert run.stdout.readline().strip() == "2"
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    assert not list(Path("/dev/shm").glob(f"sem.{tag}*"))


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (an exited one nobody reaps is a zombie)."""
    return not video._ended(pid)


def test_a_worker_process_that_dies_fails_its_file_only(files, short_tmp, monkeypatch):
    """... and the run removes the dead one's multiprocessing folder, its own (a worker process is given the
    run's folder if the run has one, which must stay: removing it lost every later clip of that worker)."""
    tmp_path = short_tmp
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the workers' (given the run's environment: they read it anew)
    own = multiprocessing.util.get_temp_dir()  # the run has a folder of its own
    before = set(multiprocessing.active_children())  # (one an earlier test's stream is still ending)
    stream = video.stream_videos([files["index24"], files["index30"]], workers=1, prefetch=1, capacity=1,
                                 worker_kind="process", frames=1, height=8, width=8, fps=24)  # fmt: skip
    _, feed = next(stream)
    clips = iter(feed)
    next(clips)
    (child,) = set(multiprocessing.active_children()) - before
    child.kill()
    with pytest.raises(VideoError, match=r"index24.mp4: the decoding process (died|failed)"):
        sum(1 for _ in clips)
    _, feed = next(stream)
    assert sum(1 for _ in feed) == 30  # a new process reads the next file
    assert len(list(tmp_path.glob("pymp-*"))) == 1  # the dead one's multiprocessing folder is gone, not left
    assert os.path.isdir(own)
    stream.close()


def test_worker_processes_share_clips_under_a_long_temporary_folder(files, tmp_path, monkeypatch):
    """The socket through which a worker process shares its clips lives in its multiprocessing folder, and a
    socket's path may not pass 107 bytes: under a long $TMPDIR (a scheduler's per-job folder) every file failed
    with "AF_UNIX path too long"."""
    long = tmp_path / ("t" * 100)
    long.mkdir()
    monkeypatch.setenv("TMPDIR", str(long))  # the workers' (given the run's environment: they read it anew)
    kwargs = dict(frames=4, height=16, width=16, fps=8)
    ((_, threads),) = iter_videos([files["index24"]], workers=1, prefetch=1, **kwargs)
    ((_, processes),) = iter_videos([files["index24"]], workers=1, prefetch=1, worker_kind="process", **kwargs)
    assert not isinstance(processes, VideoError), processes
    assert len(processes.clips) == len(threads.clips) == 4
    assert all(torch.equal(a, b) for a, b in zip(processes.clips, threads.clips, strict=True))


def test_a_worker_process_that_cannot_be_started_again_fails_files_not_the_run(files, monkeypatch):
    """Out of memory or of processes, a dead worker cannot be replaced: each file it was to read fails, where the
    run waited for it for ever, and the next file tries again."""
    start, refuse = video._DecoderProcess._start, [False]

    def starting(self):
        if refuse[0]:
            raise OSError(11, "Resource temporarily unavailable")
        start(self)

    monkeypatch.setattr(video._DecoderProcess, "_start", starting)
    paths = [files["index24"], files["index30"], files["index24"]]
    before = set(multiprocessing.active_children())  # (one an earlier test's stream is still ending)
    stream = video.stream_videos(paths, workers=1, prefetch=1, capacity=1, worker_kind="process", frames=1,
                                 height=8, width=8, fps=24)  # fmt: skip
    _, feed = next(stream)
    clips = iter(feed)
    next(clips)
    refuse[0] = True
    (child,) = set(multiprocessing.active_children()) - before
    child.kill()
    with pytest.raises(VideoError, match=r"index24.mp4: the decoding process (died|failed)"):
        sum(1 for _ in clips)
    _, feed = next(stream)

    def waited(*_):
        raise TimeoutError("the run waits for a file no process will read")

    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(60)
    try:
        with pytest.raises(VideoError, match=r"index30.mp4: no decoding process \(BlockingIOError: .*Resource tempor"):
            sum(1 for _ in feed)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    refuse[0] = False
    _, feed = next(stream)
    assert sum(1 for _ in feed) == 48  # a process started again
    stream.close()


def test_a_failure_in_the_run_while_a_worker_process_reads_a_file_fails_that_file_only(files, monkeypatch):
    """A failure on the run's side of a worker process's file (here: copying a clip out of shared memory) fails
    that file, and the process, which may be waiting for an answer about it that will never come, is replaced:
    the next file's clips all come. It used to be given the next file while still in the last one, and the run
    waited for ever."""
    copied, failed = video._copied, []

    def failing_once(clip, pin_memory):
        if not failed:
            failed.append(True)
            raise RuntimeError("a copy that failed")
        return copied(clip, pin_memory)

    monkeypatch.setattr(video, "_copied", failing_once)
    kwargs = dict(frames=4, height=16, width=16, fps=24, preprocess="device")
    stream = video.stream_videos([files["index24"], files["index30"]], workers=1, prefetch=1, worker_kind="process",
                                 **kwargs)  # fmt: skip

    def waited(*_):
        raise TimeoutError("the run waits for a file its process will never read")

    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(60)
    try:
        _, feed = next(stream)
        with pytest.raises(VideoError, match=r"index24.mp4: reading it through a decoding process failed \(Runtime"):
            sum(1 for _ in feed)
        _, feed = next(stream)
        got, expected = list(feed), list(video.ClipReader(files["index30"], **kwargs))
        assert len(got) == len(expected) > 0 and all(map(torch.equal, got, expected))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        stream.close()


def test_worker_processes_raise_the_limit_of_open_files(files, tmp_path):
    """Each clip a worker process has sent and the run still holds is an open file in the run: with many workers,
    the usual limit of 1024 made files fail ("Too many open files"); the run raises its own limit to the most it
    may."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit of open files here is {hard}")
    script = (
        "import resource\n"
        "from titok_fast import video\n"
        "if __name__ == '__main__':\n"
        "    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        f"    stream = video.stream_videos([{files['index24']!r}], workers=1, prefetch=1, worker_kind='process',\n"
        "                                 frames=1, height=8, width=8, fps=24)\n"
        "    _, feed = next(stream)\n"
        "    print(sum(1 for _ in feed), *resource.getrlimit(resource.RLIMIT_NOFILE))\n"
        "    stream.close()\n"
    )
    (tmp_path / "limit.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(video.__file__).parents[1]), *sys.path])}
    done = subprocess.run([sys.executable, str(tmp_path / "limit.py")], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    clips, soft, hard = map(int, done.stdout.split())
    assert clips == 48 and soft == (hard if hard != resource.RLIM_INFINITY else video.MAX_OPEN_FILES) > 256


def test_clips_lost_between_a_worker_process_and_the_run_fail_the_file():
    """A clip the worker's queue cannot send is printed there and dropped; the file's end says how many clips
    it read, so the file fails instead of being written without them."""
    worker = object.__new__(video._DecoderProcess)
    worker.stall_seconds, worker.stopping, worker.ready, worker.files = None, threading.Event(), True, 0
    worker.started = True
    worker.pipe, theirs = multiprocessing.Pipe()
    worker.process, worker.temp_dir = types.SimpleNamespace(is_alive=lambda: True, kill=lambda: None,
                                                            join=lambda timeout: None, exitcode=None), None  # fmt: skip
    worker.stopping.set()  # no process is started again
    reader = video.ClipReader("lost.mp4", frames=1, height=8, width=8, fps=24)
    feed = video.ClipFeed(reader, capacity=4)
    state = {name: getattr(reader, name) for name in video._READER_STATE}
    for message in [("clip", torch.zeros(3, 1, 8, 8)), ("end", {**state, "clips_read": 2})]:
        theirs.send((*message, {}))
    worker._read(feed)
    assert theirs.recv() == ("task", 1, "lost.mp4", video.CLOCK.enabled, None, 1) and theirs.recv() == ("credit", 1)
    with pytest.raises(VideoError, match=r"^lost.mp4: 1 clip\(s\) lost between the decoding process and the run$"):
        list(feed)


PLAN_A_BROKEN_FILE = """
import os, resource, types
from fractions import Fraction
import numpy as np
from titok_fast import containers, decoders, stages, video, writing
mapped = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
room = mapped + (4 << 30)  # 4 GB more than what is mapped now (the table of every clip's would take 40 GB)
resource.setrlimit(resource.RLIMIT_AS, (room, room))
order = np.concatenate([np.arange(0, 48_000, 1000), [10 * 365 * 86_400 * 1000]])  # ms: 48 frames, then one
index = decoders.StreamIndex(order, np.array([0, 24]), True)  # ten years later; cuts at frames 0 and 24
reader = video.ClipReader("x.mp4", frames=4, height=32, width=32, fps=8, sampling="time")
reader.split_into = 4
print([(s.first, s.cut) for s in reader._plan(index, types.SimpleNamespace(time_base=Fraction(1, 1000)))])
"""


def test_planning_segments_of_a_file_whose_last_stamp_is_years_ahead_takes_no_table_of_its_clips():
    """A broken stamp ten years ahead (sampling "time", 8 fps: 630 million clips of 4 frames) once made a table of
    every clip's first frame, gigabytes, before the reading failed the file. A file with a gap of over a second
    between its stamps is not split now (its times may promise clips it has not); planning it stays within 4 GB
    more address space."""
    done = subprocess.run([sys.executable, "-c", PLAN_A_BROKEN_FILE], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def _corrupted(rng: random.Random, data: bytes) -> bytes:
    """``data`` with one to six bytes or runs changed, mostly in the container's structures (the first and last
    4 KB), as a bad disk, a cut copy or a stranger might leave a video."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if len(data) < 64:
            break
        region, near = rng.random(), rng.randrange(min(len(data), 4096))
        at = near if region < 0.4 else len(data) - 1 - near if region < 0.7 else rng.randrange(len(data))
        how = rng.random()
        if how < 0.5:
            data[at] = rng.randrange(256)
        elif how < 0.7:
            data[at : at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x00\x00\x01"])
        elif how < 0.85:
            del data[at : at + rng.randint(1, 64)]
        else:
            source = rng.randrange(len(data))
            data[at:at] = data[source : source + rng.randint(1, 64)]
    return bytes(data)


def test_corrupted_videos_give_their_clips_or_one_video_error(tmp_path):
    """300 videos (H.264 MP4, FFV1 Matroska, AVI, VP9 MP4) corrupted from a fixed seed, read with every sampling:
    each gives a bounded number of clips or a VideoError, never another exception (Latin-1 tags, a codec of no
    decoder and timestamps days apart were found so)."""
    made = [videos.make_video(tmp_path / "a.mp4", 30, 48, 64, x264="keyint=8:bframes=2"),
            videos.make_video(tmp_path / "b.mkv", 30, 47, 63), videos.make_video(tmp_path / "c.avi", 30, 48, 64),
            videos.make_video(tmp_path / "d.mp4", 30, 48, 64, encoder="libvpx-vp9")]  # fmt: skip
    sources = [(path.suffix, path.read_bytes()) for path in made]
    rng, outcomes = random.Random(0), {"clips": 0, "error": 0}
    for n in range(300):
        suffix, data = rng.choice(sources)
        path = tmp_path / f"corrupt{n}{suffix}"
        path.write_bytes(_corrupted(rng, data))
        kwargs = rng.choice([{}, {"sampling": "time"}, {"prune": False}, {"tail": "pad"}])
        try:
            clips = sum(1 for _ in video.ClipReader(str(path), frames=4, height=32, width=32, fps=8, **kwargs))
        except VideoError:
            outcomes["error"] += 1
        else:
            assert clips <= 60, (path, kwargs, clips)  # (30 source frames: a few clips; 60 with a shifted stamp)
            outcomes["clips"] += 1
        path.unlink()
    assert min(outcomes.values()) > 30, outcomes


def test_held_bytes_admits_in_order_up_to_its_limit_and_a_feed_with_nothing_queued_at_once():
    held = video.HeldBytes(10)
    queued = {"first": True, "second": True, "third": False}  # whether each one's feed has a clip queued
    big = held.reserve(25, alone=lambda: True)  # its feed has nothing queued: it goes on, whatever the limit
    order = []

    def take(name, nbytes):
        reservation = held.reserve(nbytes, alone=lambda: not queued[name])
        order.append(name)
        return reservation

    def until(done):
        deadline = time.monotonic() + 10
        while not done() and time.monotonic() < deadline:
            time.sleep(0.01)

    # each asks before the next: first and second wait (second behind first), third goes on
    for name, nbytes, waiting in (("first", 4, 1), ("second", 1, 2), ("third", 100, 2)):
        threading.Thread(target=take, args=(name, nbytes), daemon=True).start()
        until(lambda: len(held._waiting) == waiting and (name != "third" or "third" in order))  # noqa: B023
    assert order == ["third"] and held.bytes == 125
    big.release()
    big.release()  # once only
    time.sleep(0.3)
    assert order == ["third"] and held.bytes == 100  # 100 + 4 > 10 still
    queued["first"] = False  # the consumer took first's queued clip
    until(lambda: "first" in order)
    assert order[:2] == ["third", "first"]  # (second then fits, or is alone: either way it goes next)
    queued["second"] = False
    until(lambda: len(order) == 3)
    assert order == ["third", "first", "second"] and held.bytes == 105 and held.most == 125
    stop = threading.Event()
    stop.set()
    held.reserve(100, stop).release()  # an unwanted clip (its feed closed) does not wait, and is not counted
    assert held.bytes == 105
    with pytest.raises(ValueError, match="limit must be >= 1 byte"):
        video.HeldBytes(0)


@pytest.mark.parametrize("worker_kind", ["thread", "process"])
def test_source_size_clips_read_ahead_are_bounded_in_bytes_and_all_come_in_order(gops, tmp_path, worker_kind):
    """Clips kept at source size for the device (a 20-frame 4K clip is 498 MB) that workers read ahead are held,
    across every file, to the bound, and beyond it to one per feed with nothing queued: with a bound below one
    clip and files taken in order, at most one clip per open file. Every clip still comes, the same as without the
    bound (read ahead, unbounded, the second file would queue all its 10), and nothing waits for ever; the bytes
    come back as clips are taken or their files closed."""
    kwargs = dict(frames=4, height=32, width=32, fps=24, preprocess="device")
    paths = [videos.make_video(tmp_path / f"{n}.mp4", 40, 48, 64, fps=24) for n in "ab"]
    expected = [list(video.ClipReader(p, **kwargs)) for p in paths]
    clip_bytes = expected[0][0].nbytes
    assert expected[0][0].dtype == torch.uint8 and clip_bytes == 4 * 48 * 64 * 3 and len(expected[1]) == 10
    for limit, most in ((clip_bytes - 1, 2 * clip_bytes), (1 << 40, None)):
        held = video.HeldBytes(limit)
        stream = video.stream_videos(paths, workers=2, prefetch=2, worker_kind=worker_kind, held=held, **kwargs)
        with contextlib.closing(stream):
            for number, (_, feed) in enumerate(stream):
                got = []
                for clip in feed:
                    got.append(clip)
                    time.sleep(0.05)  # a slow consumer: the file after it is read ahead meanwhile
                assert len(got) == len(expected[number]) and all(map(torch.equal, got, expected[number]))
        if most is not None:
            assert clip_bytes <= held.most <= most and held.bytes == 0
        else:
            assert held.most >= 8 * clip_bytes  # (the feed's capacity: what the bound cuts)
    held = video.HeldBytes(1 << 40)  # a file closed with clips queued and one gathered gives their bytes back
    stream = video.stream_videos([paths[1]], workers=1, prefetch=1, worker_kind=worker_kind, held=held, **kwargs)
    with contextlib.closing(stream):
        _, feed = next(stream)
        next(iter(feed))
        deadline = time.monotonic() + 30
        while held.bytes < 3 * clip_bytes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert held.bytes >= 3 * clip_bytes
    assert held.bytes == 0


def test_a_worker_process_stacks_its_clips_into_a_few_shared_segments_it_reuses(monkeypatch):
    """A new shared-memory segment per clip costs a worker process more than stacking the clip: it stacks each
    into one of at most COUNT segments of the clip's shape, made once, taken again once the run gives it back
    (a segment of an old shape is dropped then); with no room in shared memory, or the clip no longer wanted,
    none (the clip gets a tensor of its own)."""
    segments, sent, waits = video._Segments(), [], []

    def run_answers() -> bool:  # the run copies out the oldest clip sent and gives its segment back
        waits.append(len(sent))
        segments.give_back(sent.pop(0))
        return True

    shape, made = (3, 8, 10, 3), set()
    for _ in range(6):
        segment = segments.take(shape, run_answers)
        assert segment.is_shared() and segment.shape == shape and segment.dtype == torch.uint8
        made.add(segment.data_ptr())
        sent.append(segments.number_of(segment))
    assert len(made) == video._Segments.COUNT == 2 and waits == [2, 2, 2, 2]
    assert segments.number_of(torch.empty(shape, dtype=torch.uint8)) is None
    old = sent.pop(0)  # given back only after clips of a new shape began
    new = segments.take((3, 4, 4, 3), run_answers)
    segments.give_back(old)
    assert new.shape == (3, 4, 4, 3) and segments.take((3, 4, 4, 3), run_answers).data_ptr() != new.data_ptr()
    assert all(t.shape == (3, 4, 4, 3) for n, t in segments.made.items() if n != sent[0])  # the old free one: gone
    assert segments.take((3, 4, 4, 3), lambda: False) is None  # two of that shape out, and the clip not wanted
    late = [sent[0], segments.number_of(new)]  # an old one comes back first while it waits: not taken, dropped

    def in_order() -> bool:
        segments.give_back(late.pop(0))
        return True

    assert segments.take((3, 4, 4, 3), in_order) is new and not late and len(segments.made) == 2

    def no_room(self):
        raise RuntimeError("unable to write to file </torch_1_2_3>: No space left on device (28)")

    monkeypatch.setattr(torch.Tensor, "share_memory_", no_room)
    assert segments.take((1, 2, 2, 3), run_answers) is None


def test_the_run_and_a_worker_process_agree_on_which_segments_the_run_holds():
    """A worker process sends a segment the run holds mapped as its number alone: both ends keep the account by
    ``_still_mapped``, the run with the tensors, the process with their shapes. Here a segment of an old shape
    comes back to the process only after the run dropped it (clips of a new shape came between) and is taken
    again for a clip of that shape: it must go with its tensor, not as a number the run no longer holds."""
    segments, in_flight, sent = video._Segments(), [], []
    run_mapped = {}

    def send(shape) -> None:
        nonlocal run_mapped
        segment = segments.take(shape, lambda: False)
        kept = segments.number_of(segment)
        known = kept in segments.mapped
        sent.append((kept, known))
        shared = run_mapped.get(kept) if known else segment  # the run's side: a number alone must be one it holds
        assert shared is not None
        run_mapped = video._still_mapped(run_mapped, kept, shared)
        segments.mapped = video._still_mapped(segments.mapped, kept, tuple(segment.shape))
        in_flight.append(kept)

    a, b = (2, 4, 4, 3), (2, 6, 6, 3)
    send(a), send(a)  # segments 0, 1
    segments.give_back(in_flight.pop(0))  # 0 back: 1 still with the run
    send(a)  # 0 again, mapped: its number alone
    send(b)  # 2, a new shape: the run drops 0 and 1; the process drops 0 (free, old shape) at the next take
    segments.give_back(in_flight.pop(0))  # 1 comes back late, of the old shape
    send(a)  # 1 taken again for a clip of its shape: the run no longer holds it
    assert sent == [(0, False), (1, False), (0, True), (2, False), (1, False)]
    assert set(run_mapped) == set(segments.mapped) == {1}


def test_a_worker_process_sends_a_segment_the_run_holds_as_its_number_alone(tmp_path, monkeypatch):
    """Handing a shared tensor over again costs a connection to the worker process and a handshake each time
    (torch sends its file descriptor anew): a segment the run has mapped comes as its number, its clip copied out
    of the mapping the run kept. Across files of two sizes, each clip is the reader's."""
    kwargs = dict(frames=4, height=32, width=32, fps=24, preprocess="device")
    paths = [videos.make_video(tmp_path / "a.mp4", 40, 48, 64, fps=24),
             videos.make_video(tmp_path / "b.mp4", 40, 64, 80, fps=24),
             videos.make_video(tmp_path / "c.mp4", 40, 48, 64, fps=24)]  # fmt: skip
    expected = [list(video.ClipReader(p, **kwargs)) for p in paths]
    came, get = [], video._DecoderProcess._get

    def recorded(self, timeout):
        message = get(self, timeout)
        if message[0] == "shared":
            came.append((message[1][0], video._frames_of(message[1][1]) is not None))
        return message

    monkeypatch.setattr(video._DecoderProcess, "_get", recorded)
    stream = video.stream_videos(paths, workers=1, prefetch=1, worker_kind="process", **kwargs)
    got = [list(feed) for _, feed in stream]
    assert [len(g) for g in got] == [len(e) for e in expected] == [10, 10, 10]
    assert all(torch.equal(x, y) for g, e in zip(got, expected, strict=True) for x, y in zip(g, e, strict=True))
    assert len(came) == 30
    firsts = {}
    for number, with_tensor in came:  # a segment's first clip brings its tensor, every later one its number
        assert with_tensor == (number not in firsts), came
        firsts.setdefault(number, with_tensor)
    assert len(firsts) <= 6 < len(came)  # two segments a shape, made again for the third file at most


@pytest.mark.gpu
def test_worker_processes_hand_source_size_clips_over_in_pinned_memory_on_cuda(files):
    """For a CUDA model, threads stack source-size clips into pinned memory; a process's clips are copied there
    as they come: the same clips, ready for an upload that does not wait."""
    kwargs = dict(frames=4, height=16, width=16, fps=24, preprocess="device", device="cuda")
    got = {}
    for kind in ("thread", "process"):
        stream = video.stream_videos([files["index24"]], workers=1, prefetch=1, worker_kind=kind, **kwargs)
        got[kind] = [clip for _, feed in stream for clip in feed]
    assert len(got["process"]) == len(got["thread"]) == 12
    assert all(clip.is_pinned() and clip.dtype == torch.uint8 for clips in got.values() for clip in clips)
    assert all(map(torch.equal, got["process"], got["thread"]))


def test_a_worker_process_counts_its_source_size_clips_from_their_first_frame(tmp_path, monkeypatch):
    """A worker process asks the run for a source-size clip's room at its first frame and waits for it, as a
    thread does: with a bound below one clip and a consumer holding back, it has sent the clip queued and waits at
    the next one's first frame; it used to read up to three clips more (sent, or decoded and waiting to be sent),
    counted only once they had come back. Every clip still comes, and every byte is given back."""
    kwargs = dict(frames=4, height=32, width=32, fps=24, preprocess="device")
    path = videos.make_video(tmp_path / "a.mp4", 40, 48, 64, fps=24)
    expected = list(video.ClipReader(path, **kwargs))
    clip_bytes = expected[0].nbytes
    came, get = [], video._DecoderProcess._get

    def recorded(self, timeout):
        message = get(self, timeout)
        came.append(message[0])
        return message

    monkeypatch.setattr(video._DecoderProcess, "_get", recorded)
    held = video.HeldBytes(clip_bytes - 1)
    stream = video.stream_videos([path], workers=1, prefetch=1, worker_kind="process", held=held, **kwargs)
    with contextlib.closing(stream):
        _, feed = next(stream)
        clips = iter(feed)
        got = [next(clips)]  # the second clip is read meanwhile (its feed had nothing queued), then the third waits
        deadline = time.monotonic() + 30
        sent = lambda: came.count("clip") + came.count("shared")  # noqa: E731 (in a segment of its own or reused)
        while came.count("room") < 3 and sent() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # (a process reading on would have sent more by now)
        assert (came.count("room"), sent()) == (3, 2) and held.bytes == clip_bytes
        got += list(clips)
    assert len(got) == 10 and all(map(torch.equal, got, expected))
    assert held.bytes == 0 and held.most <= 2 * clip_bytes


def test_a_worker_process_stuck_in_a_read_gives_its_room_back_when_its_file_is_closed(tmp_path, monkeypatch):
    """The room a worker process was given for the clip it gathers comes back as soon as its file is closed, as a
    thread's does, not only once the process answers (one stuck in a read may never): here the process is stopped
    (SIGSTOP) while it holds room, and the consumer moves on to the next file."""
    kwargs = dict(frames=4, height=32, width=32, fps=24, preprocess="device")
    paths = [videos.make_video(tmp_path / "a.mp4", 200, 480, 640, fps=24),
             videos.make_video(tmp_path / "b.mp4", 40, 48, 64, fps=24)]  # fmt: skip
    started, init = [], video._DecoderProcess.__init__
    monkeypatch.setattr(video._DecoderProcess, "__init__",
                        lambda self, *args, **kw: started.append(self) or init(self, *args, **kw))  # fmt: skip
    held = video.HeldBytes(1 << 30)
    stream = video.stream_videos(paths, workers=1, prefetch=1, worker_kind="process", held=held, **kwargs)
    with contextlib.closing(stream):
        _, feed = next(stream)
        clips = iter(feed)
        next(clips)
        process = started[0].process
        try:
            for _ in range(40):  # stopped while it gathers a clip it was given room for
                os.kill(process.pid, signal.SIGSTOP)
                time.sleep(0.2)
                if started[0].room is not None and started[0].room.nbytes:
                    break
                os.kill(process.pid, signal.SIGCONT)
                next(clips)
            assert started[0].room is not None and started[0].room.nbytes > 0
            next(stream)  # file a's feed is closed; the process, stopped, cannot answer
            deadline = time.monotonic() + 10
            while held.bytes and time.monotonic() < deadline:
                time.sleep(0.05)
            assert held.bytes == 0  # (file b waits for the stopped process)
        finally:
            os.kill(process.pid, signal.SIGCONT)


def test_video_writer_counts_frames(tmp_path):
    from titok_fast import writing

    with writing.VideoWriter(tmp_path / "v.mp4", 24) as writer:
        writer.write(torch.zeros(3, 3, 16, 16))
        writer.write(torch.zeros(3, 2, 16, 16))
        assert writer.frames == 5
