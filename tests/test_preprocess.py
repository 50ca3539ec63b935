import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from titok_fast import decoders
from titok_fast.decoders import DecoderUnavailable, NvdecFrame, yuv420_to_rgb
from titok_fast.preprocess import MAX_DEVICE_PIXELS, DevicePreprocessor, clip_pixels, normalize_pixels, placement
from titok_fast.video import ClipReader, read_clips

import videos

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


def test_clip_pixels_rejects_what_is_not_uint8_frames():
    with pytest.raises(ValueError, match=r"\[T, h, w, 3\] uint8"):
        clip_pixels(torch.zeros(2, 3, 8, 8), 4, 4)


@pytest.mark.parametrize(("requested", "device", "size", "expected"), [
    ("auto", "cpu", (720, 1280), "cpu"),
    ("auto", "cuda", (720, 1280), "device"),
    ("auto", "cuda", (256, 456), "device"),
    ("auto", "cuda", (4320, 7680), "cpu"),
    ("cpu", "cuda", (256, 456), "cpu"),
    ("device", "cpu", (256, 456), "device"),
])  # fmt: skip
def test_placement_rule(requested, device, size, expected):
    assert placement(requested, device, *size) == expected


def test_placement_rule_limit_and_bad_name():
    assert placement("auto", "cuda", 1, MAX_DEVICE_PIXELS) == "device"
    assert placement("auto", "cuda", 1, MAX_DEVICE_PIXELS + 1) == "cpu"
    with pytest.raises(ValueError, match="preprocess must be one of"):
        placement("gpu", "cuda", 1, 1)


def planes(frame: av.VideoFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Y, U, V planes of a yuv420p frame, without the line padding."""
    widths = (frame.width, (frame.width + 1) // 2, (frame.width + 1) // 2)
    return tuple(
        torch.from_numpy(np.frombuffer(p, np.uint8).reshape(p.height, -1)[:, :width].copy())
        for p, width in zip(frame.planes, widths, strict=True)
    )


@pytest.mark.parametrize("name", ["wide", "small", "tall"])
def test_yuv420_to_rgb_matches_pyav_within_rounding(files, name):
    """Measured on these H.264 frames: at most 2 levels from libswscale's rgb24, 0.6 on average (its fixed-point
    truncation); the bounds below leave no room for a wrong matrix, range or chroma placement (those are off by
    tens of levels)."""
    with av.open(files[name]) as container:
        for frame in container.decode(video=0):
            assert frame.format.name == "yuv420p"
            got = yuv420_to_rgb(*planes(frame), "bt601").int()
            diff = (got - torch.from_numpy(frame.to_ndarray(format="rgb24")).int()).abs()
            assert diff.max() <= 2 and diff.float().mean() < 1.0


def test_yuv420_to_rgb_checks_its_planes():
    y = torch.zeros(4, 6, dtype=torch.uint8)
    with pytest.raises(ValueError, match="matrix must be one of"):
        yuv420_to_rgb(y, y[:2, :3], y[:2, :3], "bt2020")
    with pytest.raises(ValueError, match="planes must be"):
        yuv420_to_rgb(y, y[:2, :2], y[:2, :2])


# ---------------------------------------------------------------------------------- NVDEC, with a fake decoder
def fake_nvdec(fail_after: int | None = None, unavailable: bool = False):
    """An NVDEC stand-in that decodes with PyAV on the CPU and hands out NV12 frames like PyNvVideoCodec; it can
    be unavailable, or fail after some frames."""
    calls = []

    def frames(path, stream):
        calls.append(path)
        if unavailable:
            raise DecoderUnavailable("no NVDEC here")
        with av.open(path) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if fail_after is not None and i == fail_after:
                    raise RuntimeError("CUDA_ERROR_INVALID_SOURCE")
                y, u, v = planes(frame)
                uv = torch.stack([u, v], dim=-1).reshape(u.shape[0], -1)[:, : y.shape[1]]
                nv12 = torch.cat([y, uv])
                yield NvdecFrame(nv12, frame.height, frame.pts, frame.time_base, frame.duration, "bt601")

    return frames, calls


def nvdec_clips(path: str, monkeypatch, **fake) -> tuple[ClipReader, list[torch.Tensor]]:
    frames, calls = fake_nvdec(**fake)
    monkeypatch.setattr(decoders, "nvdec_frames", frames)
    reader = ClipReader(path, frames=4, height=64, width=64, fps=24, decoder="nvdec", device="cpu", raw=True)
    clips = [normalize_pixels(clip_pixels(c, 64, 64) if c.dtype == torch.uint8 else c, torch.float32) for c in reader]
    assert calls == [path]
    return reader, clips


def test_nvdec_path_close_to_the_cpu_path(files, monkeypatch):
    cpu = read_clips(files["wide"], frames=4, height=64, width=64, fps=24).clips
    reader, clips = nvdec_clips(files["wide"], monkeypatch)
    assert reader.decoded_by == "nvdec" and reader.placement == "device"
    assert len(clips) == len(cpu)
    for a, b in zip(clips, cpu, strict=True):
        assert (a - b).abs().max() <= 2.5 * 2 / 255  # 2 levels of RGB, a little more after bicubic's overshoot


def test_nvdec_unavailable_decodes_on_the_cpu_with_one_notice(files, monkeypatch, capsys):
    cpu = read_clips(files["wide"], frames=4, height=64, width=64, fps=24).clips
    reader, clips = nvdec_clips(files["wide"], monkeypatch, unavailable=True)
    notices = capsys.readouterr().err.strip().splitlines()
    assert len(notices) == 1 and "decoding on the CPU: no NVDEC here" in notices[0] and files["wide"] in notices[0]
    assert reader.decoded_by == "cpu" and reader.placement == "cpu"  # the CPU decoder: auto's rule on a CPU model
    assert all(torch.equal(a, b) for a, b in zip(clips, cpu, strict=True)) and len(clips) == len(cpu)


def test_nvdec_failing_midway_is_finished_on_the_cpu(files, monkeypatch, capsys):
    cpu = read_clips(files["wide"], frames=4, height=64, width=64, fps=24).clips
    reader, clips = nvdec_clips(files["wide"], monkeypatch, fail_after=9)
    assert "NVDEC failed (CUDA_ERROR_INVALID_SOURCE); the rest on the CPU" in capsys.readouterr().err
    assert reader.decoded_by == "nvdec,cpu" and len(clips) == len(cpu) == 5
    assert not torch.equal(clips[0], cpu[0])  # NVDEC's frames: within rounding, not identical
    assert all(torch.equal(a, b) for a, b in zip(clips[3:], cpu[3:], strict=True))  # frames 12+: the CPU's


# ---------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_device_preprocessing_gives_the_tokens_of_the_cpu_path(files, tmp_path):
    from titok_fast.engine import Engine
    from titok_fast.loading import random_tokenizer
    from titok_fast.pipeline import ClipSettings, collect_inputs, encode_files
    from titok_fast.tokens import load_tokens

    model = random_tokenizer("tiny", seed=0, device="cuda", dtype=torch.float32)
    engine = Engine(model, max_clips=4)
    inputs = collect_inputs([files["wide"], files["odd"], files["small"]])
    tokens = {}
    for where in ("cpu", "device"):
        settings = ClipSettings(grid=(4, 64, 64), tokens=64, fps=24, preprocess=where)
        summary = encode_files(model, engine, inputs, tmp_path / where, settings, workers=2)
        assert not summary.failed and len(summary.done) == 3
        tokens[where] = torch.cat([load_tokens(tmp_path / where / f"{n}.safetensors").indices for _, n in inputs])
        assert load_tokens(tmp_path / where / "wide.safetensors").made_with["preprocessed_on"] == where
    assert (tokens["cpu"] == tokens["device"]).float().mean() >= 0.999


def test_nvdec_says_why_it_cannot_take_a_file(files):
    with av.open(files["odd"]) as container, pytest.raises(DecoderUnavailable, match="NVDEC does not decode ffv1"):
        next(decoders.nvdec_frames(files["odd"], container.streams.video[0]))


@pytest.mark.skipif(CUDA, reason="checks the machine without CUDA")
def test_nvdec_without_cuda_is_unavailable(files):
    with av.open(files["wide"]) as container, pytest.raises(DecoderUnavailable, match="no CUDA device"):
        next(decoders.nvdec_frames(files["wide"], container.streams.video[0]))
