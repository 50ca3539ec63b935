import collections
import itertools
import re
import sys
import tarfile
import types
from fractions import Fraction

import av
import pytest
import torch
import torch.nn.functional as F

from titok_fast import decoders, preprocess, video
from titok_fast.archives import member_of
from titok_fast.decoders import DecoderUnavailable
from titok_fast.kernels.nv12_rgb import nv12_planes, nv12_surface
from titok_fast.kernels.nv12_rgb import yuv420_to_rgb_ref as yuv420_to_rgb
from titok_fast.preprocess import (
    MAX_DEVICE_ASPECT,
    MAX_DEVICE_CLIP_BYTES,
    MAX_DEVICE_PIXELS,
    DevicePreprocessor,
    I420Clip,
    clip_pixels,
    i420_rgb,
    normalize_pixels,
    placement,
    resize_crop,
    resized_size,
)
from titok_fast.video import ClipReader, read_clips

import videos
from helpers import in_threads

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("preprocess")
    made = {
        "wide": videos.make_video(folder / "wide.mp4", 20, 144, 256, fps=24, pattern="moving"),
        "odd": videos.make_video(folder / "odd.mkv", 12, 97, 131, fps=24, pattern="moving"),
        "small": videos.make_video(folder / "small.mp4", 12, 48, 64, fps=24, pattern="moving"),  # upscaled
        "tall": videos.make_video(folder / "tall.mp4", 12, 160, 90, fps=24, pattern="moving"),
    }
    return {name: str(path) for name, path in made.items()}


def todays_frame(frame: av.VideoFrame, height: int, width: int) -> torch.Tensor:
    """The per-frame path as the encoder had it: [3, height, width] float32 raw pixels (an independent oracle)."""
    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).float()
    h, w = rgb.shape[-2:]
    side = max(height, width)
    size = (int(side * h / w), side) if w <= h else (side, int(side * w / h))
    if size != (h, w):
        rgb = F.interpolate(rgb[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    top, left = int(round((size[0] - height) / 2.0)), int(round((size[1] - width) / 2.0))
    return rgb[:, top : top + height, left : left + width]


@pytest.mark.parametrize(("name", "grid"), [
    ("wide", (4, 64, 64)), ("wide", (4, 48, 80)), ("odd", (4, 64, 64)), ("odd", (3, 33, 17)),
    ("small", (4, 96, 96)), ("tall", (4, 64, 48)),
])  # fmt: skip
def test_batched_on_device_path_equals_per_frame_path(files, name, grid):
    """Clips of source-size uint8 frames, resized per clip by the device-side preprocessor (device = cpu here),
    equal the per-frame path identically: the one the reader runs in its workers, and the one of before."""
    t, h, w = grid
    kwargs = dict(frames=t, height=h, width=w, fps=24, raw=True)
    per_frame = read_clips(files[name], preprocess="cpu", **kwargs).clips
    reader = ClipReader(files[name], preprocess="device", device="cpu", **kwargs)
    source_size = list(reader)
    assert reader.placement == "device" and source_size[0].dtype == torch.uint8 and source_size[0].shape[0] == t
    on_device = DevicePreprocessor("cpu", h, w, torch.float32)
    with av.open(files[name]) as container:
        frames = [todays_frame(f, h, w) for f in container.decode(video=0)][: t * len(per_frame)]
    assert len(per_frame) == len(source_size) >= 2
    for i, (a, raw) in enumerate(zip(per_frame, source_size, strict=True)):
        before = torch.stack(frames[i * t : (i + 1) * t], dim=1)
        assert torch.equal(a, before)
        assert torch.equal(on_device(raw), normalize_pixels(a, torch.float32))


@pytest.mark.parametrize(("name", "grid", "i420"), [
    ("wide", (4, 64, 64), True), ("tall", (4, 64, 48), True), ("small", (4, 96, 96), True),
    ("odd", (4, 64, 64), False),  # 131x97: an odd size is converted on the CPU (libswscale interpolates its chroma)
])  # fmt: skip
def test_i420_clips_are_the_rgb_clips_in_half_the_bytes(files, name, grid, i420):
    """upload "i420": the CPU decoder's clips come as their YUV planes (where the device's conversion gives
    libswscale's bytes), which become, on the device, the RGB clips of upload "rgb", byte for byte, and the same
    model input."""
    t, h, w = grid
    kwargs = dict(frames=t, height=h, width=w, fps=24, raw=True, preprocess="device", device="cpu")
    rgb = read_clips(files[name], **kwargs).clips
    reader = ClipReader(files[name], upload="i420", **kwargs)
    got = list(reader)
    assert reader.placement == "device" and len(got) == len(rgb) >= 2
    assert all(isinstance(clip, I420Clip) for clip in got) == i420
    on_device = DevicePreprocessor("cpu", h, w, torch.float32)
    for a, b in zip(rgb, got, strict=True):
        if i420:
            assert b.matrix == "bt601" and b.frames.shape == (t, a.shape[1] * 3 // 2, a.shape[2])
            assert b.frames.nbytes * 2 == a.nbytes and torch.equal(i420_rgb(b), a)
        assert torch.equal(on_device(b), on_device(a))


def test_a_clip_with_frames_the_device_would_not_convert_comes_as_rgb(files, monkeypatch):
    """A frame whose conversion on the device would not be libswscale's (here: said so of every third frame) comes
    as RGB, and its clip with it: each clip is the RGB clip of upload "rgb", byte for byte."""
    kwargs = dict(frames=4, height=64, width=64, fps=24, raw=True, preprocess="device", device="cpu")
    rgb = read_clips(files["wide"], **kwargs).clips
    matrix_of, seen = decoders.frame_i420_matrix, itertools.count()
    monkeypatch.setattr("titok_fast.video.frame_i420_matrix", lambda f: None if next(seen) % 3 == 2 else matrix_of(f))
    got = read_clips(files["wide"], upload="i420", **kwargs).clips
    assert len(got) == len(rgb) == 5 and not any(isinstance(clip, I420Clip) for clip in got)
    assert all(torch.equal(a, b) for a, b in zip(rgb, got, strict=True))


def test_i420_clips_of_a_source_whose_size_changes(tmp_path):
    """The clips of each size come as I420, the one with both sizes resized (as placement "cpu" makes it)."""
    path = make_size_change(tmp_path / "switch.ts")
    kwargs = dict(frames=4, height=24, width=24, fps=8, raw=True)
    cpu = read_clips(path, preprocess="cpu", **kwargs).clips
    clips = read_clips(path, preprocess="device", device="cuda", upload="i420", **kwargs).clips
    assert [type(c).__name__ for c in clips] == ["I420Clip"] * 3 + ["Tensor"] + ["I420Clip"] * 3
    for a, b in zip(clips, cpu, strict=True):
        assert torch.equal(clip_pixels(i420_rgb(a), 24, 24) if isinstance(a, I420Clip) else a, b)


@pytest.mark.parametrize("rotation", [90, 0])
def test_frames_turned_for_display_come_as_rgb(tmp_path, rotation):
    """rotation "display": a frame that is turned comes as RGB (turned where it was decoded); one that is not, as
    I420. The clips are those of upload "rgb"."""
    path = phone_video(tmp_path / "phone.mp4", rotation)
    kwargs = dict(frames=4, height=32, width=32, fps=24, preprocess="device", device="cuda", rotation="display")
    rgb = read_clips(path, **kwargs).clips
    got = read_clips(path, upload="i420", **kwargs).clips
    assert len(got) == len(rgb) == 2 and all(isinstance(c, I420Clip) == (rotation == 0) for c in got)
    assert all(torch.equal(i420_rgb(b) if rotation == 0 else b, a) for a, b in zip(rgb, got, strict=True))


def test_i420_matrix_takes_what_the_nvdec_conversion_takes(tmp_path, monkeypatch):
    """The streams whose frames go up as I420: those whose conversion NVDEC's frames take too (8-bit 4:2:0,
    BT.601/709, progressive, even size, limited range), as yuv420p; and none on a machine where libswscale is not
    the x86 converter the kernel copies."""
    taken = {
        "bt601": write_stream(tmp_path / "plain.mkv"),
        "bt709": write_stream(tmp_path / "709.mkv", colorspace=1),
        None: write_stream(tmp_path / "2020.mkv", colorspace=9),
        "": write_stream(tmp_path / "10bit.mkv", pix_fmt="yuv420p10le"),
    }
    for want, path in taken.items():
        with av.open(path) as container:
            assert decoders.i420_matrix(container.streams.video[0]) == (want or None)
    monkeypatch.setattr(decoders, "I420_EXACT", False)
    with av.open(taken["bt601"]) as container:
        assert decoders.i420_matrix(container.streams.video[0]) is None


def test_read_kwargs_ask_for_i420_on_cuda_only():
    from titok_fast.pipeline import ClipSettings

    settings = ClipSettings(grid=(4, 32, 32), tokens=64)
    assert settings.read_kwargs("cuda")["upload"] == "i420" and settings.read_kwargs("cpu")["upload"] == "rgb"
    with pytest.raises(ValueError, match=r"upload must be one of \('rgb', 'i420'\); got 'yuv'"):
        ClipReader("x.mp4", frames=4, height=32, width=32, upload="yuv")


def test_encode_files_takes_i420_clips(files, tmp_path, monkeypatch):
    """The run preprocesses I420 clips as it does RGB ones: the tokens of placement "cpu"."""
    from titok_fast.engine import Engine
    from titok_fast.loading import random_tokenizer
    from titok_fast.pipeline import ClipSettings

    model = random_tokenizer("tiny", seed=0)
    engine = Engine(model, mode="eager", max_clips=4)
    kinds = []
    read_kwargs, preprocess = ClipSettings.read_kwargs, DevicePreprocessor.__call__

    def seen(self, frames):
        kinds.append(type(frames).__name__)
        return preprocess(self, frames)

    monkeypatch.setattr(ClipSettings, "read_kwargs", lambda self, *args, **kw: {**read_kwargs(self, *args, **kw),
                                                                                "upload": "i420"})  # fmt: skip
    monkeypatch.setattr(DevicePreprocessor, "__call__", seen)
    made = encoded_both_ways(model, engine, [files["wide"], files["tall"]], tmp_path, grid=(4, 64, 64), tokens=64,
                             fps=24)  # fmt: skip
    assert kinds and set(kinds) == {"I420Clip"}
    assert torch.equal(made["cpu"][0], made["device"][0])


def make_size_change(path, parts=((14, 32, 48), (16, 64, 64)), fps=8) -> str:
    """An MPEG-TS whose H.264 stream changes size midway: (frames, height, width) of each part, "moving" frames at
    ``fps``; the parts are encoded alone and their elementary streams joined, as a broadcast switching formats."""
    elementary = b""
    for frames, height, width in parts:
        part = path.with_suffix(f".{height}x{width}.h264")
        with av.open(str(part), "w", format="h264") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": "10", "bf": "0"}  # no B-frames: decoding order is presentation order
            for i in range(frames):
                image = videos.pattern_frame("moving", i, height, width)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())
        elementary += part.read_bytes()
    joined = path.with_suffix(".h264")
    joined.write_bytes(elementary)
    tick = Fraction(1, 90000)
    with av.open(str(joined)) as source, av.open(str(path), "w", format="mpegts") as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for i, packet in enumerate(p for p in source.demux(video=0) if p.size):
            packet.pts = packet.dts = int(i / fps / tick)
            packet.time_base, packet.stream = tick, stream
            out.mux(packet)
    return str(path)


@pytest.mark.parametrize("sampling", ["upstream", "time"])
def test_device_placement_reads_a_source_whose_size_changes(tmp_path, sampling):
    """A clip whose frames differ in size comes resized as placement "cpu" makes it; the others at source size."""
    path = make_size_change(tmp_path / "switch.ts")
    kwargs = dict(frames=4, height=24, width=24, fps=8, raw=True, sampling=sampling)
    cpu = read_clips(path, preprocess="cpu", **kwargs).clips
    reader = ClipReader(path, preprocess="device", device="cpu", **kwargs)
    clips = list(reader)
    assert reader.placement == "device" and len(clips) == len(cpu) == 7
    assert [c.dtype for c in clips] == [torch.uint8] * 3 + [torch.float32] + [torch.uint8] * 3  # frames 12..15
    assert [tuple(c.shape[1:3]) for c in clips if c.dtype == torch.uint8] == [(32, 48)] * 3 + [(64, 64)] * 3
    for a, b in zip(clips, cpu, strict=True):
        assert torch.equal(clip_pixels(a, 24, 24) if a.dtype == torch.uint8 else a, b)


def encoded_both_ways(model, engine, paths: list[str], folder, workers: int = 2, **options) -> dict:
    """``paths`` encoded with placement "cpu", then "device" (``options``: the others of ClipSettings), none
    failing: {placement: (every file's tokens, one after another; the token files)}."""
    from titok_fast.pipeline import ClipSettings, collect_inputs, encode_files
    from titok_fast.tokens import load_tokens

    inputs, made = collect_inputs(paths), {}
    for where in ("cpu", "device"):
        settings = ClipSettings(preprocess=where, **options)
        summary = encode_files(model, engine, inputs, folder / where, settings, workers=workers)
        assert not summary.failed and len(summary.done) == len(inputs)
        files = [load_tokens(folder / where / f"{name}.safetensors") for _, name in inputs]
        made[where] = (torch.cat([f.indices for f in files]), files)
    return made


def test_device_placement_gives_the_cpu_placements_tokens_for_a_source_whose_size_changes(tmp_path):
    from titok_fast.engine import Engine
    from titok_fast.loading import random_tokenizer

    model = random_tokenizer("tiny", seed=0)
    engine = Engine(model, mode="eager", max_clips=4)
    made = encoded_both_ways(model, engine, [make_size_change(tmp_path / "switch.ts")], tmp_path, workers=1,
                             grid=(4, 32, 32), tokens=64, fps=8)  # fmt: skip
    assert len(made["cpu"][0]) == 7 * 64 and torch.equal(made["cpu"][0], made["device"][0])  # 7 clips of 64 tokens


def test_clip_pixels_rejects_what_is_not_uint8_frames():
    with pytest.raises(ValueError, match=r"\[T, h, w, 3\] uint8"):
        clip_pixels(torch.zeros(2, 3, 8, 8), 4, 4)
    with pytest.raises(ValueError, match=r"\[T, h, w, 3\] uint8; got torch.float32"):  # frames of 0..1 floats
        clip_pixels(torch.zeros(2, 8, 8, 3), 4, 4)  # (would scale as 0..255: every pixel near -1)


@pytest.mark.parametrize(("requested", "device", "size", "clip", "expected"), [
    ("auto", "cpu", (720, 1280), (256, 256), "cpu"),
    ("auto", "cuda", (720, 1280), (256, 256), "device"),
    ("auto", "cuda", (256, 456), (256, 256), "device"),
    ("auto", "cuda", (2160, 3840), (256, 256), "device"),
    ("auto", "cuda", (3840, 2160), (160, 160), "device"),  # portrait 4K
    ("auto", "cuda", (1080, 3840), (256, 256), "device"),  # 32:9
    ("auto", "cuda", (48, 64), (256, 256), "device"),  # a small source, upscaled
    ("auto", "cuda", (32, 48), (32, 32), "device"),
    ("auto", "cuda", (4320, 7680), (256, 256), "cpu"),
    ("auto", "cuda", (2, 8192), (160, 160), "cpu"),  # a strip: resized to 160 x 655360 before the crop
    ("auto", "cuda", (8192, 2), (160, 160), "cpu"),
    ("auto", "cuda", (100, 1000), (16, 16), "cpu"),  # 10:1, though its resize is small
    ("auto", "cuda", (0, 0), (256, 256), "cpu"),  # size unknown
    ("cpu", "cuda", (256, 456), (256, 256), "cpu"),
    ("device", "cpu", (256, 456), (256, 256), "device"),
    ("device", "cuda", (2, 8192), (160, 160), "device"),  # asked for: obeyed
])  # fmt: skip
def test_placement_rule(requested, device, size, clip, expected):
    assert placement(requested, device, *size, *clip) == expected


def test_placement_rule_limits_and_bad_name():
    assert placement("auto", "cuda", 2160, MAX_DEVICE_PIXELS // 2160, 64, 64) == "device"
    assert placement("auto", "cuda", 2160, MAX_DEVICE_PIXELS // 2160 + 1, 64, 64) == "cpu"  # pixels
    assert placement("auto", "cuda", 100, 100 * MAX_DEVICE_ASPECT, 64, 64) == "device"
    assert placement("auto", "cuda", 100, 100 * MAX_DEVICE_ASPECT + 1, 64, 64) == "cpu"  # aspect ratio
    assert placement("auto", "cuda", 900, 7200, 1018, 1018) == "device"  # resized to 1018 x 8144 before the crop
    assert placement("auto", "cuda", 900, 7200, 1019, 1019) == "cpu"  # 1019 x 8152: over MAX_DEVICE_PIXELS
    assert resized_size((900, 7200), 1019, 1019) == (1019, 8152) and 1019 * 8152 > MAX_DEVICE_PIXELS >= 1018 * 8144
    most = MAX_DEVICE_CLIP_BYTES // (1080 * 1920 * 3)  # frames of 1080p a clip may have (172)
    assert placement("auto", "cuda", 1080, 1920, 192, 192, most) == "device"
    assert placement("auto", "cuda", 1080, 1920, 192, 192, most + 1) == "cpu"  # the clip's bytes at source size
    with pytest.raises(ValueError, match="preprocess must be one of"):
        placement("gpu", "cuda", 1, 1, 1, 1)


@pytest.mark.parametrize(("size", "device", "expected"), [((1080, 1920), "cuda", "device"), ((2, 4096), "cuda", "cpu")])
def test_the_reader_places_by_the_rule(tmp_path, size, device, expected):
    path = videos.make_video(tmp_path / "v.mp4", 4, *size, fps=8)
    reader = ClipReader(path, frames=4, height=64, width=64, fps=8, preprocess="auto", device=device, raw=True)
    clips = list(reader)
    assert reader.placement == expected and len(clips) == 1
    assert clips[0].dtype == (torch.uint8 if expected == "device" else torch.float32)


def test_the_reader_places_a_long_clip_of_large_frames_on_the_cpu(tmp_path, monkeypatch):
    """A clip whose frames at source size would exceed MAX_DEVICE_CLIP_BYTES is resized on the CPU, a frame at a
    time (with the real limit: 173 frames of 1080p); a shorter clip of the same file is resized on the device. The
    first frame's placement (an MP4 opened without FFmpeg's probe) is the same: the file is not opened again."""
    path = videos.make_video(tmp_path / "v.mp4", 8, 48, 64, fps=8)
    monkeypatch.setattr(preprocess, "MAX_DEVICE_CLIP_BYTES", 4 * 48 * 64 * 3)
    for frames, expected in ((4, "device"), (8, "cpu")):
        reader = ClipReader(path, frames=frames, height=32, width=32, fps=8, preprocess="auto", device="cuda", raw=True)
        clips = list(reader)
        assert reader.placement == expected and reader._unprobed
        assert clips[0].dtype == (torch.uint8 if expected == "device" else torch.float32)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")])])  # fmt: skip
@pytest.mark.parametrize("chunk_frames", [1, 3])
def test_a_clip_resized_in_chunks_is_the_clip_resized_at_once(monkeypatch, chunk_frames, device):
    """clip_pixels makes its float32 copy of a long clip RESIZE_CHUNK_BYTES at a time: the same values."""
    frames = torch.randint(0, 256, (7, 37, 53, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    frames = frames.to(device)
    at_once = clip_pixels(frames, 24, 16)
    assert clip_pixels(frames[:0], 24, 16).shape == (3, 0, 24, 16)
    calls = []
    monkeypatch.setattr(preprocess, "RESIZE_CHUNK_BYTES", chunk_frames * 37 * 53 * 3 * 4)
    monkeypatch.setattr(preprocess, "resize_crop", lambda p, h, w: calls.append(len(p)) or resize_crop(p, h, w))
    assert torch.equal(clip_pixels(frames, 24, 16), at_once)
    assert calls == [chunk_frames] * (7 // chunk_frames) + [7 % chunk_frames] * (7 % chunk_frames > 0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")])])  # fmt: skip
@pytest.mark.parametrize("i420", [False, True])
def test_a_long_clip_goes_to_the_device_a_chunk_at_a_time_with_the_values_of_one_go(monkeypatch, device, i420):
    """DevicePreprocessor uploads, converts (I420) and resizes a long clip RESIZE_CHUNK_BYTES of float32 frames at a
    time, so the device never holds the clip's frames at source size whole: the same model input as in one go."""
    g = torch.Generator().manual_seed(0)
    if i420:  # any bytes are YUV: 7 frames of 38x54
        clip = I420Clip(torch.randint(0, 256, (7, 38 * 3 // 2, 54), dtype=torch.uint8, generator=g), "bt709")
    else:
        clip = torch.randint(0, 256, (7, 38, 54, 3), dtype=torch.uint8, generator=g)
    on_device = DevicePreprocessor(device, 24, 16, torch.float32)
    at_once = on_device(clip)
    assert at_once.shape == (3, 7, 24, 16) and at_once.device.type == device
    seen = collections.defaultdict(list)  # frames a call, and where they were, of each step

    def spy(name, real):
        def step(*args):
            part = args[-1] if name == "_upload" else args[0]
            part = part.frames if isinstance(part, I420Clip) else part
            seen[name].append((len(part), part.device.type))
            return real(*args)

        return step

    monkeypatch.setattr(preprocess, "RESIZE_CHUNK_BYTES", 3 * 38 * 54 * 3 * 4)  # 3 frames a chunk
    for name, owner in (("clip_pixels", preprocess), ("i420_rgb", preprocess), ("_upload", DevicePreprocessor)):
        monkeypatch.setattr(owner, name, spy(name, getattr(owner, name)))
    assert torch.equal(on_device(clip), at_once)
    chunks = [(3, device), (3, device), (1, device)]  # (off CUDA an I420 chunk is made RGB before it is moved)
    assert seen["_upload"] == [(3, "cpu"), (3, "cpu"), (1, "cpu")] and seen["clip_pixels"] == chunks
    assert seen["i420_rgb"] == (chunks if i420 else [])


planes = decoders.yuv420p_planes


@pytest.mark.parametrize("name", ["wide", "small", "tall"])
def test_yuv420_to_rgb_gives_pyavs_rgb24(files, name):
    """libswscale's fixed-point arithmetic, done the same way: the CPU decoder's RGB bytes, every frame ("tall" is
    90 pixels wide: a chroma plane of odd width)."""
    rgb = decoders.pyav_rgb()
    with av.open(files[name]) as container:
        for frame in container.decode(video=0):
            assert torch.equal(yuv420_to_rgb(*planes(frame), "bt601"), rgb(frame))


@pytest.mark.parametrize(("colorspace", "matrix"), [(None, "bt601"), (1, "bt709"), (5, "bt601"), (6, "bt601")])
def test_yuv420_to_rgb_gives_pyavs_rgb24_on_noise_in_each_matrix(tmp_path, colorspace, matrix):
    """Noise takes sample values from end to end and each channel's clamps at 0 and 255; the matrix is the one
    NVDEC's frames of that stream are converted with (BT.709 where the stream says so, else BT.601)."""
    path = write_stream(tmp_path / "noise.mp4", colorspace=colorspace, pattern="noise", height=48, width=86)
    rgb, ends = decoders.pyav_rgb(), set()
    with av.open(path) as container:
        assert decoders._matrix(container.streams.video[0]) == matrix
        for frame in container.decode(video=0):
            want = rgb(frame)
            assert torch.equal(yuv420_to_rgb(*planes(frame), matrix), want)
            ends |= {(c, v) for c in range(3) for v in (0, 255) if (want[..., c] == v).any()}
    assert len(ends) == 6, ends


def test_yuv420_to_rgb_checks_its_planes():
    y = torch.zeros(4, 6, dtype=torch.uint8)
    with pytest.raises(ValueError, match="matrix must be one of"):
        yuv420_to_rgb(y, y[:2, :3], y[:2, :3], "bt2020")
    with pytest.raises(ValueError, match="planes must be"):
        yuv420_to_rgb(y, y[:2, :2], y[:2, :2])


# ---------------------------------------------------------------------------------- NVDEC, with a fake decoder
class FakePyNvVideoCodec(types.ModuleType):
    """PyNvVideoCodec as :func:`decoders.nvdec_frames` uses it, on the CPU: its demuxer hands out PyAV's decoded
    frames as packets (then the empty one that flushes), its decoder turns each into an NV12 frame that DLPack
    reads, with ``getPTS``, in one output surface that the next call overwrites. It can refuse the file, fail at a
    frame, or give no frame. With ``lag``, a decoder gives each frame ``lag`` packets after its own (then the rest
    on the empty packet), as a real one holds frames it may reorder: one left midway still holds its file's last
    frames. ``made`` counts the decoders made."""

    def __init__(self, fail_at: int | None = None, refuse: bool = False, empty: bool = False, device: str = "cpu",
                 lag: int = 0):  # fmt: skip
        super().__init__("PyNvVideoCodec")
        self.calls, self.fail_at, self.refuse, self.empty, self.lag = [], fail_at, refuse, empty, lag
        self.device = device  # where its surfaces are
        self.made = 0

    def CreateDemuxer(self, filename):  # noqa: N802 (the package's names)
        self.calls.append(filename)
        fake = self

        class Demuxer:
            def GetNvCodecId(self):  # noqa: N802
                return 4

            def __iter__(self):
                if not fake.empty:
                    with av.open(filename) as container:
                        yield from container.decode(video=0)
                yield None

        return Demuxer()

    def CreateDecoder(self, **kwargs):  # noqa: N802
        if self.refuse:
            raise RuntimeError("no NVDEC here")
        self.made += 1
        decoded = [itertools.count()]  # packets since the last flush (a file's)
        held, lag, fake = collections.deque(), self.lag, self

        surface = [torch.empty(0)]  # the decoder's output surface: every Decode call writes its frame there
        device = self.device

        class Frame:
            def __init__(self, frame, shared: bool = True):  # shared: in the output surface (one a call)
                nv12 = nv12_surface(*planes(frame)).to(device)
                if shared and surface[0].shape != nv12.shape:
                    surface[0] = torch.empty_like(nv12)
                self.nv12, self.pts = surface[0].copy_(nv12) if shared else nv12, frame.pts

            def __dlpack__(self, **kwargs):
                return self.nv12.__dlpack__(**kwargs)

            def __dlpack_device__(self):
                return self.nv12.__dlpack_device__()

            def getPTS(self):  # noqa: N802
                return self.pts

        class Decoder:
            def Decode(self, packet):  # noqa: N802
                if packet is None:
                    out = list(held)
                    held.clear()
                    decoded[0] = itertools.count()
                    return [Frame(frame, shared=False) for frame in out]
                if next(decoded[0]) == fake.fail_at:
                    raise RuntimeError("CUDA_ERROR_INVALID_SOURCE")
                held.append(packet)
                return [Frame(held.popleft())] if len(held) > lag else []

        return Decoder()


def fake_nvdec(monkeypatch, **fake) -> FakePyNvVideoCodec:
    """The real :func:`decoders.nvdec_frames` on a CUDA-less machine: the package is the fake, CUDA is said to be
    there (the frames stay on the CPU)."""
    module = FakePyNvVideoCodec(**fake)
    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return module


def nvdec_clips(path: str, monkeypatch, **fake) -> tuple[ClipReader, list[torch.Tensor]]:
    calls = fake_nvdec(monkeypatch, **fake).calls
    reader = ClipReader(path, frames=4, height=64, width=64, fps=24, decoder="nvdec", device="cpu", raw=True)
    clips = [normalize_pixels(clip_pixels(c, 64, 64) if c.dtype == torch.uint8 else c, torch.float32) for c in reader]
    assert calls == [path]
    return reader, clips


def test_nvdec_path_gives_the_cpu_paths_clips(files, monkeypatch):
    cpu = read_clips(files["wide"], frames=4, height=64, width=64, fps=24).clips
    reader, clips = nvdec_clips(files["wide"], monkeypatch)
    assert reader.decoded_by == "nvdec" and reader.placement == "device"
    assert len(clips) == len(cpu)
    for a, b in zip(clips, cpu, strict=True):
        assert torch.equal(a, b)


def test_nvdec_reads_an_archives_member_as_the_span_of_the_archive_it_is(files, monkeypatch, tmp_path):
    """NVDEC's demuxer (FFmpeg's) is handed the member's span of the archive, as libav is, and gives the CPU path's
    clips of the file unpacked."""
    archive = tmp_path / "shard.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(files["wide"], arcname="v/wide.mp4")
    member = archive / "v" / "wide.mp4"
    cpu = read_clips(files["wide"], frames=4, height=64, width=64, fps=24).clips
    calls = fake_nvdec(monkeypatch).calls
    reader = ClipReader(str(member), frames=4, height=64, width=64, fps=24, decoder="nvdec", device="cpu", raw=True)
    clips = [normalize_pixels(clip_pixels(c, 64, 64) if c.dtype == torch.uint8 else c, torch.float32) for c in reader]
    assert reader.decoded_by == "nvdec" and calls == [member_of(member).libav_url]
    assert calls[0].startswith("subfile,,start,") and calls[0].endswith(f",,:file:{archive}")
    assert len(clips) == len(cpu) and all(map(torch.equal, clips, cpu))


def test_nvdec_frames_are_made_rgb_a_clip_at_a_time(files, monkeypatch):
    """A clip's NVDEC surfaces are stacked and converted in one call (one launch on a GPU), not a frame at a time;
    a clip that NVDEC began and the CPU finished (NVDEC failed midway) converts its surfaces one by one."""
    calls = []

    def counted(surfaces, height, matrix):
        calls.append(surfaces.shape[0])
        return decoders.nv12_clip_rgb(surfaces, height, matrix)

    monkeypatch.setattr(video, "nv12_clip_rgb", counted)
    cpu = read_clips(files["wide"], frames=4, height=64, width=64, fps=24).clips
    _, clips = nvdec_clips(files["wide"], monkeypatch)
    assert calls == [4] * len(cpu) and all(torch.equal(a, b) for a, b in zip(clips, cpu, strict=True))
    calls.clear()
    reader, clips = nvdec_clips(files["wide"], monkeypatch, fail_at=9)  # frames 0-8 NVDEC's: clip 2 is mixed
    assert reader.decoded_by == "nvdec,cpu" and calls == [4, 4, 1]
    assert all(torch.equal(a, b) for a, b in zip(clips, cpu, strict=True)) and len(clips) == len(cpu)


def test_nvdec_unavailable_decodes_on_the_cpu_with_one_notice(files, monkeypatch, capsys):
    cpu = read_clips(files["wide"], frames=4, height=64, width=64, fps=24).clips
    reader, clips = nvdec_clips(files["wide"], monkeypatch, refuse=True)
    notices = capsys.readouterr().err.strip().splitlines()
    assert len(notices) == 1 and files["wide"] in notices[0]
    assert "decoding on the CPU: NVDEC cannot open it (RuntimeError: no NVDEC here)" in notices[0]
    assert reader.decoded_by == "cpu" and reader.placement == "cpu"  # the CPU decoder: auto's rule on a CPU model
    assert all(torch.equal(a, b) for a, b in zip(clips, cpu, strict=True)) and len(clips) == len(cpu)


def test_nvdec_failing_midway_is_finished_on_the_cpu(files, monkeypatch, capsys):
    cpu = read_clips(files["wide"], frames=4, height=64, width=64, fps=24).clips
    reader, clips = nvdec_clips(files["wide"], monkeypatch, fail_at=9)
    assert "NVDEC failed (CUDA_ERROR_INVALID_SOURCE); the rest on the CPU" in capsys.readouterr().err
    assert reader.decoded_by == "nvdec,cpu" and len(clips) == len(cpu) == 5
    # NVDEC's first frames, then the CPU's from where it stopped: none lost or given twice
    assert all(torch.equal(a, b) for a, b in zip(clips, cpu, strict=True))


def test_nvdec_giving_no_frame_decodes_on_the_cpu(files, monkeypatch, capsys):
    cpu = read_clips(files["wide"], frames=4, height=64, width=64, fps=24).clips
    reader, clips = nvdec_clips(files["wide"], monkeypatch, empty=True)
    assert "decoding on the CPU: NVDEC gave no frame" in capsys.readouterr().err
    assert reader.decoded_by == "cpu" and all(torch.equal(a, b) for a, b in zip(clips, cpu, strict=True))


def test_nvdec_with_a_picture_size_that_changes_goes_on_on_the_cpu(tmp_path, monkeypatch, capsys):
    """NVDEC's surfaces are read at the stream's size: a picture that grows midway is the CPU's from there on."""
    path = make_size_change(tmp_path / "switch.ts")  # 14 frames of 32x48, then 64x64
    kwargs = dict(frames=4, height=24, width=24, fps=8)
    cpu = read_clips(path, **kwargs).clips
    fake_nvdec(monkeypatch)
    reader = ClipReader(path, decoder="nvdec", device="cpu", raw=True, **kwargs)
    clips = [normalize_pixels(clip_pixels(c, 24, 24) if c.dtype == torch.uint8 else c, torch.float32) for c in reader]
    assert "NVDEC failed (the NV12 surface changed from (48, 48) to (96, 64)); the rest on the CPU" in (
        capsys.readouterr().err
    )
    assert reader.decoded_by == "nvdec,cpu" and len(clips) == len(cpu) == 7
    for a, b in zip(clips, cpu, strict=True):  # (a picture read at the first size would not be)
        assert torch.equal(a, b)


def nvdec_read(path: str, **kwargs) -> tuple[ClipReader, list[torch.Tensor]]:
    """``path``'s clips through the NVDEC path (whichever PyNvVideoCodec is installed), as nvdec_clips reads them."""
    reader = ClipReader(path, frames=4, height=64, width=64, fps=24, decoder="nvdec", device="cpu", raw=True, **kwargs)
    return reader, [normalize_pixels(clip_pixels(c, 64, 64) if c.dtype == torch.uint8 else c, torch.float32)
                    for c in reader]  # fmt: skip


def cpu_read(path: str) -> list[torch.Tensor]:
    return read_clips(path, frames=4, height=64, width=64, fps=24).clips


def same_clips(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def lookalikes(tmp_path_factory, files) -> dict[str, str]:
    """Files of "wide"'s size and codec with other pictures (the same parameter sets), one that starts with an IDR
    picture and goes on in open groups of pictures, and the same cut at its second key picture (not an IDR
    picture: frames shown before it refer to frames before it); files of its size with other parameter sets; one
    in VP9."""
    folder = tmp_path_factory.mktemp("lookalikes")
    made = {
        "noise": videos.make_video(folder / "noise.mp4", 20, 144, 256, fps=24, pattern="noise"),
        "open": videos.make_video(folder / "open.mp4", 60, 144, 256, fps=24, x264=f"{KEYINT}:open-gop=1"),
        # the same picture size, other parameter sets: one reference frame (another DPB), and pictures coded as
        # field pairs (a coded size of 144x256 in 160 rows, not 144)
        "one-ref": videos.make_video(folder / "one-ref.mp4", 20, 144, 256, fps=24, x264="ref=1:bframes=0"),
        "fields": videos.make_video(folder / "fields.mp4", 20, 144, 256, fps=24, x264="fake-interlaced=1"),
        "vp9": videos.make_video(folder / "vp9.mp4", 20, 144, 256, fps=24, encoder="libvpx-vp9"),
    }
    with av.open(str(made["open"])) as source, av.open(str(folder / "cut.mp4"), "w") as out:
        stream, keys = out.add_stream_from_template(source.streams.video[0]), 0
        for packet in source.demux(source.streams.video[0]):
            keys += packet.is_keyframe
            if packet.dts is not None and keys >= 2:
                packet.stream = stream
                out.mux(packet)
    return {**{name: str(path) for name, path in made.items()}, "cut": str(folder / "cut.mp4")}


KEYINT = "keyint=24:min-keyint=24:scenecut=0"


def test_a_threads_nvdec_decoder_decodes_its_next_file_of_the_same_kind(files, lookalikes, monkeypatch):
    """Making an NVDEC decoder costs more than decoding a short file: a thread keeps its decoder, flushed at the end
    of a file, for its next file of the same codec, size, pixel format and parameter sets. The clips are the CPU
    decoder's; a file of another size, or of its size with other parameter sets, gets a decoder of its own, and is
    the one kept after it (one a thread). A VP9 decoder is not kept; nor one let go."""
    fake = fake_nvdec(monkeypatch, lag=2)  # (a decoder holding two frames: one reused wrongly would show them)
    for path in (files["wide"], lookalikes["noise"], files["wide"]):
        reader, clips = nvdec_read(path)
        assert reader.decoded_by == "nvdec" and same_clips(clips, cpu_read(path)), path
    assert fake.made == 1
    for path, made in ((files["small"], 2), (files["wide"], 3), (lookalikes["noise"], 3), (lookalikes["one-ref"], 4),
                       (lookalikes["fields"], 5), (files["wide"], 6), (lookalikes["vp9"], 7), (files["wide"], 8),
                       (files["wide"], 8)):  # fmt: skip
        assert same_clips(nvdec_read(path)[1], cpu_read(path)) and fake.made == made, path
    decoders.release_kept_decoder()
    assert same_clips(nvdec_read(files["wide"])[1], cpu_read(files["wide"])) and fake.made == 9


def test_an_nvdec_decoder_left_midway_or_failed_is_never_used_again(files, lookalikes, monkeypatch):
    """A decoder whose file was not read to its end (the reader stopped, or NVDEC failed) may still hold that
    file's frames: the next file gets a new one, and its clips are the CPU decoder's."""
    fake = fake_nvdec(monkeypatch, lag=2)
    reader = iter(ClipReader(files["wide"], frames=4, height=64, width=64, fps=24, decoder="nvdec", device="cpu"))
    next(reader)
    reader.close()  # stopped after a clip
    assert same_clips(nvdec_read(lookalikes["noise"])[1], cpu_read(lookalikes["noise"])) and fake.made == 2
    fake.fail_at = 9  # (the kept decoder fails at this file's frame 9)
    failed, clips = nvdec_read(files["wide"])
    assert failed.decoded_by == "nvdec,cpu" and same_clips(clips, cpu_read(files["wide"])) and fake.made == 2
    fake.fail_at = None
    assert same_clips(nvdec_read(lookalikes["noise"])[1], cpu_read(lookalikes["noise"])) and fake.made == 3


def test_a_file_that_may_refer_to_earlier_pictures_gets_a_new_nvdec_decoder(files, lookalikes, monkeypatch):
    """A file whose first picture is not an IDR picture (here an open group of pictures cut at its second key
    picture) could have its first frames made from the last file's: it gets a decoder of its own. So does a file
    read on another thread."""
    assert decoders._clean_start(lookalikes["open"], "h264") and not decoders._clean_start(lookalikes["cut"], "h264")
    fake = fake_nvdec(monkeypatch, lag=2)
    for path, made in ((lookalikes["open"], 1), (lookalikes["cut"], 2), (files["wide"], 2)):  # (the cut file's
        assert same_clips(nvdec_read(path)[1], cpu_read(path)) and fake.made == made, path  # decoder, flushed)
    other = in_threads(lambda: same_clips(nvdec_read(files["wide"])[1], cpu_read(files["wide"])))
    assert other == [True] and fake.made == 3


@pytest.mark.parametrize("fps", [8, 16, 24])
def test_nvdec_time_sampling_gives_the_cpu_decoders_frames(tmp_path, monkeypatch, fps):
    """Sampling faster than the source repeats its last frame until its end (its packet's duration, as PyAV's
    frame has it): NVDEC's frames, which carry no duration, give the CPU decoder's clip count; and a frame held
    while the next ones are decoded is not overwritten by them (a decoder may reuse its output surfaces)."""
    path = str(videos.make_video(tmp_path / "eight.mp4", 16, 64, 64, fps=8, pattern="moving"))
    kwargs = dict(frames=4, height=32, width=32, fps=fps, sampling="time", tail="drop")
    cpu = read_clips(path, **kwargs).clips
    fake_nvdec(monkeypatch)
    reader = ClipReader(path, decoder="nvdec", device="cpu", raw=True, **kwargs)
    clips = [normalize_pixels(clip_pixels(c, 32, 32), torch.float32) for c in reader]
    assert len(clips) == len(cpu) == 16 * fps // 8 // 4 and reader.decoded_by == "nvdec"
    for a, b in zip(clips, cpu, strict=True):  # a frame held while the next is decoded keeps its own pixels
        assert torch.equal(a, b)


def test_a_file_nvdec_fails_on_midway_is_not_split_after_clips_were_given(tmp_path, monkeypatch):
    """A reader that may split its file decides when it first opens it: the CPU's retry after NVDEC failed
    midway reads on from where NVDEC stopped, whole, as it would have without splitting."""
    path = str(videos.make_video(tmp_path / "gops.mp4", 150, 48, 64, fps=24, x264="keyint=24:min-keyint=24"))
    fake_nvdec(monkeypatch, fail_at=100)
    reader, segments = ClipReader(path, frames=1, height=32, width=32, fps=24, decoder="nvdec", device="cpu"), []
    reader.split_into, reader.on_split = 4, segments.extend
    assert sum(1 for _ in reader) == reader.clips_read == 150 and reader.decoded_by == "nvdec,cpu"
    assert not segments


def phone_video(path, rotation: int) -> str:
    """Eight 64x96 H.264 frames at 24 fps that the display matrix turns ``rotation`` degrees (0: none)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(videos.pattern_frame("moving", i, 64, 96), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


@pytest.mark.parametrize("rotation", [90, -90])
def test_nvdec_frames_are_turned_as_the_first_frame_says(tmp_path, monkeypatch, rotation):
    """NVDEC's frames carry no display matrix: with rotation "display" they are turned as the first frame's
    matrix (read by PyAV) says, and come out as the CPU decoder's turned frames do."""
    path = phone_video(tmp_path / "phone.mp4", rotation)
    kwargs = dict(frames=4, height=64, width=64, fps=24, rotation="display")
    cpu = read_clips(path, **kwargs).clips
    upright = read_clips(path, **{**kwargs, "rotation": "stored"}).clips
    calls = fake_nvdec(monkeypatch).calls
    reader = ClipReader(path, decoder="nvdec", device="cpu", raw=True, **kwargs)
    got = list(reader)
    assert calls == [path] and reader.decoded_by == "nvdec" and got[0].shape == (4, 96, 64, 3)  # turned
    clips = [normalize_pixels(clip_pixels(c, 64, 64), torch.float32) for c in got]
    assert len(clips) == len(cpu) == 2
    for a, b, c in zip(clips, cpu, upright, strict=True):
        assert torch.equal(a, b) and (a - c).abs().max() > 0.1


def nvdec_planes_are_pyavs(path: str, threads: int) -> int:
    """Decodes ``path`` with :func:`decoders.nvdec_frames` on ``threads`` threads at once, and checks that every
    thread's frames have PyAV's timestamps, in PyAV's order, PyAV's planes, bit for bit, and, converted by
    :func:`decoders.nvdec_rgb`, the CPU decoder's RGB bytes. Returns the frame count."""
    rgb = decoders.pyav_rgb()
    with av.open(path) as container:
        want = [(frame.pts, planes(frame), rgb(frame)) for frame in container.decode(video=0)]

    def decode() -> list:
        with av.open(path) as container:
            frames = decoders.nvdec_frames(path, container.streams.video[0])
            return [(f.pts, tuple(p.cpu() for p in nv12_planes(f.nv12, f.height)), decoders.nvdec_rgb(f).cpu())
                    for f in frames]  # fmt: skip

    got = in_threads(*[decode] * threads)
    for frames in got:
        assert [pts for pts, _, _ in frames] == [pts for pts, _, _ in want]
        for (_, planes_got, rgb_got), (_, planes_want, rgb_want) in zip(frames, want, strict=True):
            assert all(map(torch.equal, planes_got, planes_want)) and torch.equal(rgb_got, rgb_want)
    return len(want)


@pytest.mark.parametrize("threads", [1, 3])
def test_nvdec_planes_check_on_the_fake_decoder(tmp_path, monkeypatch, threads):
    """The check the GPU test below makes, here on the fake decoder (PyAV's planes, in a surface each Decode call
    overwrites): it passes, and fails where frames are not copied out of the surface."""
    path = str(videos.make_video(tmp_path / "b.mp4", 12, 48, 64, fps=24, pattern="moving"))
    fake_nvdec(monkeypatch)
    assert nvdec_planes_are_pyavs(path, threads) == 12
    monkeypatch.setattr(torch.Tensor, "clone", lambda self, **kwargs: self)  # (the surface, not a copy of it)
    with pytest.raises(AssertionError):
        nvdec_planes_are_pyavs(path, threads)


def kept_decoders_give_pyavs_planes(nvc, files: dict, lookalikes: dict, monkeypatch, counts: bool = True) -> None:
    """Decodes a sequence of files with :func:`decoders.nvdec_frames` on this thread (PyNvVideoCodec ``nvc``) and
    checks each file's frames as nvdec_planes_are_pyavs does, and (``counts``) which files were given a new
    decoder: files of one size with other pictures, one that goes on in open groups of pictures, one of another
    size, one that does not start with an IDR picture, and files after one left midway."""
    made, create = [], nvc.CreateDecoder
    monkeypatch.setattr(nvc, "CreateDecoder", lambda **kwargs: made.append(create(**kwargs)) or made[-1])
    rgb = decoders.pyav_rgb()
    decoders.release_kept_decoder()  # (one an earlier test left on this thread)

    def check(path: str, stop: int | None = None) -> None:
        with av.open(path) as container:
            want = [(frame.pts, planes(frame), rgb(frame)) for frame in container.decode(video=0)][:stop]
        with av.open(path) as container:
            frames = decoders.nvdec_frames(path, container.streams.video[0])
            got = [(f.pts, tuple(p.cpu() for p in nv12_planes(f.nv12, f.height)), decoders.nvdec_rgb(f).cpu())
                   for f in itertools.islice(frames, stop)]  # fmt: skip
            frames.close()
        assert [pts for pts, _, _ in got] == [pts for pts, _, _ in want] and got, path
        for (_, planes_got, rgb_got), (_, planes_want, rgb_want) in zip(got, want, strict=True):
            assert all(map(torch.equal, planes_got, planes_want)) and torch.equal(rgb_got, rgb_want), path

    sequence = [(files["wide"], 1), (lookalikes["noise"], 1), (lookalikes["open"], 1), (files["wide"], 1),
                (files["small"], 2), (files["wide"], 3), (lookalikes["cut"], 4), (files["wide"], 4),
                (lookalikes["one-ref"], 5), (lookalikes["fields"], 6), (files["wide"], 7), (lookalikes["noise"], 7)]
    for path, count in sequence:  # fmt: skip
        check(path)
        assert len(made) == count or not counts, path
    check(files["wide"], stop=5)  # left midway: its decoder is not used again
    check(lookalikes["noise"])
    assert len(made) == 8 or not counts


def test_the_kept_decoders_check_on_the_fake_decoder(files, lookalikes, monkeypatch):
    """The check the GPU test below makes, on the fake decoder holding two frames: it passes, and its planes fail
    where every file is given the last decoder made, a decoder left midway included."""
    kept_decoders_give_pyavs_planes(fake_nvdec(monkeypatch, lag=2), files, lookalikes, monkeypatch)
    fake = fake_nvdec(monkeypatch, lag=2)
    made, create = [], fake.CreateDecoder
    monkeypatch.setattr(fake, "CreateDecoder", lambda **kwargs: made.append(create(**kwargs)) or made[-1])
    monkeypatch.setattr(decoders, "_kept_decoder", lambda key, path, codec: made[-1] if made else None)
    with pytest.raises(AssertionError, match="noise"):
        kept_decoders_give_pyavs_planes(fake, files, lookalikes, monkeypatch, counts=False)


# ---------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize(("encoder", "height", "width"), [
    ("libx264", 360, 640),  # coded 368 rows high: padding rows in NVDEC's surface
    ("libx264", 270, 480),
    ("libx265", 360, 640),
])  # fmt: skip
def test_gpu_nvdec_gives_pyavs_planes_bit_for_bit(tmp_path, encoder, height, width, threads):
    """H.264 and HEVC decoding is exact, so NVDEC's planes are PyAV's, for every frame of a stream with B-frames
    (frames shown in another order than decoded), on one thread and on several at once as the run decodes; then
    the kernel's RGB is the CPU decoder's, and so are the tokens. A surface read before NVDEC finished writing it,
    or after a later frame overwrote it, would show here."""
    pytest.importorskip("PyNvVideoCodec")
    path = str(videos.make_video(tmp_path / "b.mp4", 48, height, width, fps=24, pattern="moving", encoder=encoder))
    assert nvdec_planes_are_pyavs(path, threads) == 48


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_kept_nvdec_decoders_give_pyavs_planes_file_after_file(files, lookalikes, monkeypatch):
    """NVDEC decoders kept from file to file on one thread give PyAV's planes for every file (the check of
    kept_decoders_give_pyavs_planes)."""
    kept_decoders_give_pyavs_planes(pytest.importorskip("PyNvVideoCodec"), files, lookalikes, monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("case", [None, 9, "real"], ids=["fake", "fake-failing-at-frame-9", "real"])
def test_gpu_nvdec_clips_are_the_cpu_decoders(files, monkeypatch, case):
    """On a GPU the reader's NVDEC clips (surfaces converted a clip at a time by the kernel) are the CPU decoder's
    clips, byte for byte: from NVDEC itself where PyNvVideoCodec is installed (else that case skips, saying so), and
    from surfaces on the GPU made of PyAV's planes, a clip that NVDEC began and the CPU finished included (its
    frames from both, stacked on the GPU; the fake decoder fails at frame 9, in clip 2)."""
    kwargs = dict(frames=4, height=64, width=64, fps=24, preprocess="device", device="cuda")
    cpu = read_clips(files["wide"], **kwargs).clips
    if case == "real":
        pytest.importorskip("PyNvVideoCodec")
    else:
        fake_nvdec(monkeypatch, fail_at=case, device="cuda")
    reader = ClipReader(files["wide"], decoder="nvdec", **kwargs)
    clips = list(reader)
    monkeypatch.undo()
    assert reader.decoded_by == ("nvdec,cpu" if case == 9 else "nvdec") and len(clips) == len(cpu) >= 3
    for k, (a, b) in enumerate(zip(clips, cpu, strict=True)):  # (after NVDEC failed, clips the CPU decoded alone
        assert a.is_cuda == (case != 9 or k <= 2) and torch.equal(a.cpu(), b), k  # are the CPU's)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_nvdec_reads_an_archives_member_in_place(files, tmp_path):
    """PyNvVideoCodec's demuxer opens a member's span of its tar archive (FFmpeg's subfile protocol) and NVDEC gives
    the clips of the file itself; where the demuxer cannot open such a span, this fails, naming what decoded it."""
    pytest.importorskip("PyNvVideoCodec")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        tar.add(files["wide"], arcname="wide.mp4")
    kwargs = dict(frames=4, height=64, width=64, fps=24, preprocess="device", device="cuda")
    cpu = read_clips(files["wide"], **kwargs).clips
    reader = ClipReader(str(tmp_path / "shard.tar" / "wide.mp4"), decoder="nvdec", **kwargs)
    clips = list(reader)
    assert reader.decoded_by == "nvdec" and len(clips) == len(cpu) >= 3
    assert all(torch.equal(a.cpu(), b) for a, b in zip(clips, cpu, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_device_preprocessing_gives_the_tokens_of_the_cpu_path(files, tmp_path):
    from titok_fast.engine import Engine
    from titok_fast.loading import random_tokenizer

    model = random_tokenizer("tiny", seed=0, device="cuda", dtype=torch.float32)
    engine = Engine(model, max_clips=4)
    made = encoded_both_ways(model, engine, [files["wide"], files["odd"], files["small"]], tmp_path, grid=(4, 64, 64),
                             tokens=64, fps=24)  # fmt: skip
    for where, (_, token_files) in made.items():
        assert token_files[0].made_with["preprocessed_on"] == where
    assert (made["cpu"][0] == made["device"][0]).float().mean() >= 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_i420_clips_give_the_rgb_clips_model_input(files):
    """Uploaded as I420 and converted on the GPU, the clips are the model input of RGB clips, bit for bit."""
    kwargs = dict(frames=4, height=64, width=48, fps=24, raw=True, preprocess="device", device="cuda")
    for name in ("wide", "tall"):
        rgb = read_clips(files[name], **kwargs).clips
        got = read_clips(files[name], upload="i420", **kwargs).clips
        on_device = DevicePreprocessor("cuda", 64, 48, torch.float32)
        assert len(got) == len(rgb) >= 2
        for a, b in zip(rgb, got, strict=True):
            assert isinstance(b, I420Clip) and torch.equal(on_device(b), on_device(a))


def test_nvdec_says_why_it_cannot_take_a_file(files):
    with av.open(files["odd"]) as container, pytest.raises(DecoderUnavailable, match="NVDEC does not decode ffv1"):
        next(decoders.nvdec_frames(files["odd"], container.streams.video[0]))


@pytest.mark.parametrize(("pix_fmt", "changes", "said"), [
    ("yuv420p10le", {}, "pixel format yuv420p10le: only 8-bit 4:2:0"),  # 10-bit HDR, as phones record
    ("yuv444p", {}, "pixel format yuv444p: only 8-bit 4:2:0"),
    ("yuv422p", {}, "pixel format yuv422p: only 8-bit 4:2:0"),
    ("yuv420p", {"colorspace": 9}, "YUV matrix bt2020: only BT.601 and BT.709"),  # libswscale uses BT.2020's
    # libswscale converts each field of an interlaced picture apart (up to 23 levels off), and interpolates the
    # chroma of an odd-height one (up to 58 levels off at colour edges)
    ("yuv420p", {"options": {"x264-params": "interlaced=1:tff=1"}}, "interlaced: libswscale converts each field"),
    ("yuv420p", {"codec": "libvpx-vp9", "height": 47}, "odd picture height (47): only even heights"),
    ("yuv420p", {"codec": "libvpx-vp9", "width": 63}, "odd picture width (63): only even widths"),
])  # fmt: skip
def test_nvdec_leaves_to_the_cpu_what_its_conversion_does_not_take(tmp_path, pix_fmt, changes, said):
    """Streams the GPU conversion (8-bit NV12, BT.601/709, progressive, even size) would get wrong are the CPU
    decoder's, before CUDA is asked for; the streams it takes give the CPU decoder's bytes
    (test_nvdec_path_gives_the_cpu_paths_clips)."""
    path = write_stream(tmp_path / f"{pix_fmt}.mkv", pix_fmt=pix_fmt, **changes)
    with av.open(path) as container, pytest.raises(DecoderUnavailable, match=f"^{re.escape(said)}"):
        next(decoders.nvdec_frames(path, container.streams.video[0]))


def write_stream(path, codec="libx264", pix_fmt="yuv420p", height=48, colorspace=None, options=None, width=64,
                 pattern="moving") -> str:  # fmt: skip
    """Two frames of ``pattern`` encoded as asked."""
    with videos.scheduling_kept(), av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = options or {}
        if colorspace is not None:
            stream.codec_context.colorspace = colorspace
        for i in range(2):
            frame = av.VideoFrame.from_ndarray(videos.pattern_frame(pattern, i, height, width), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


def test_nvdec_leaves_a_file_of_several_video_streams_to_the_cpu(tmp_path):
    """The CPU path reads the first video stream (as torchvision's reader does); NVDEC's demuxer would choose its
    own (FFmpeg's "best"), maybe another one: other frames, other tokens."""
    path = str(tmp_path / "two.mkv")
    with av.open(path, "w") as container:
        streams = [container.add_stream("libx264", rate=8) for _ in range(2)]
        for stream, height in zip(streams, (32, 48), strict=True):
            stream.width, stream.height, stream.pix_fmt = 64, height, "yuv420p"
        for stream, height in zip(streams, (32, 48), strict=True):
            for i in range(2):
                frame = av.VideoFrame.from_ndarray(videos.pattern_frame("moving", i, height, 64), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
    with av.open(path) as container, pytest.raises(DecoderUnavailable, match="^several video streams"):
        next(decoders.nvdec_frames(path, container.streams.video[0]))


@pytest.mark.skipif(CUDA, reason="checks the machine without CUDA")
def test_nvdec_knows_a_codec_by_its_format_not_its_decoder(tmp_path):
    """AV1 is decoded here by libdav1d, a decoder's name: the check goes on past the codec (to the GPU)."""
    encoders = [name for name in ("libsvtav1", "libaom-av1") if name in av.codecs_available]
    if not encoders:
        pytest.skip("this PyAV has no AV1 encoder")
    path = write_stream(tmp_path / "av1.mkv", codec=encoders[0])
    with av.open(path) as container, pytest.raises(DecoderUnavailable, match="^no CUDA device"):
        next(decoders.nvdec_frames(path, container.streams.video[0]))


@pytest.mark.skipif(CUDA, reason="checks the machine without CUDA")
def test_nvdec_without_cuda_is_unavailable(files):
    with av.open(files["wide"]) as container, pytest.raises(DecoderUnavailable, match="no CUDA device"):
        next(decoders.nvdec_frames(files["wide"], container.streams.video[0]))


def test_nvdec_rejecting_a_file_on_its_first_frame_with_any_error_decodes_on_the_cpu(tmp_path):
    """The fall-back is to any error NVDEC raises before its first frame (an unsupported profile), not only to its
    absence."""
    from titok_fast import decoders

    path = str(videos.make_video(tmp_path / "a.mp4", frames=8, height=32, width=32))

    def rejecting(path, stream):
        raise RuntimeError("CUVID: unsupported")
        yield  # (a generator)

    said = []
    with decoders.open_input(path) as container:
        with decoders.open_frames(path, container, "nvdec", nvdec=rejecting, notice=said.append) as source:
            assert source.decoder == "cpu" and len(list(source.frames)) == 8
    assert said and "decoding on the CPU: CUVID: unsupported" in said[0]
