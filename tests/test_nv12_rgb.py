"""The NV12 -> RGB kernel of ``--decoder nvdec`` (kernels/nv12_rgb.py) gives its PyTorch reference's bytes: in the
Triton interpreter here, compiled on a GPU where there is one."""

from __future__ import annotations

import itertools
from fractions import Fraction

import av
import pytest
import torch

from titok_fast.decoders import NvdecFrame, _matrix, i420_bytes, nvdec_rgb, pyav_rgb, yuv420p_planes
from titok_fast.kernels.nv12_rgb import (
    BLOCK_W,
    MATRICES,
    i420_planes,
    i420_rgb,
    i420_rgb_ref,
    nv12_planes,
    nv12_rgb,
    nv12_rgb_ref,
    nv12_surface,
    yuv420_to_rgb_ref,
)

import videos
from triton_mode import triton_mode

CUDA = torch.cuda.is_available()


def surface(height: int, width: int, pad_rows: int = 0, pitch: int = 0, seed: int = 0) -> torch.Tensor:
    """A random NV12 surface for a ``height`` x ``width`` picture: every byte value (the clamps to 0 and 255 are
    taken), ``pad_rows`` rows of padding below the picture's luma and chroma rows, and rows ``pitch`` bytes apart
    (as a decoder's surfaces are: wider than the picture)."""
    g = torch.Generator().manual_seed(seed)
    luma_rows = height + pad_rows
    rows = luma_rows + luma_rows // 2
    full = torch.randint(0, 256, (rows, max(pitch, width)), generator=g, dtype=torch.uint8)
    return full[:, :width]


@pytest.mark.parametrize(("height", "width", "pad_rows", "pitch"), [
    (6, 8, 0, 0),
    (144, 256, 0, 0),
    (34, BLOCK_W + 18, 6, 0),  # a second block of columns, partly filled; padding rows, as NVDEC's surfaces have
    (30, 62, 2, 128),  # rows further apart than the picture is wide
    (2, 2, 0, 0),
])  # fmt: skip
@pytest.mark.parametrize("matrix", sorted(MATRICES))
def test_kernel_gives_the_references_bytes(height, width, pad_rows, pitch, matrix):
    nv12 = surface(height, width, pad_rows, pitch, seed=height * width)
    want = nv12_rgb_ref(nv12, height, matrix)
    with triton_mode(interpret=True):
        got = nv12_rgb(nv12, height, matrix)
    assert got.shape == (height, width, 3) and got.dtype == torch.uint8 and got.is_contiguous()
    assert torch.equal(got, want)
    if height * width >= 256:
        assert (want == 0).any() and (want == 255).any()  # the clamps were taken, both ways


@pytest.mark.parametrize(("frames", "height", "width", "pad_rows", "pitch"), [
    (1, 6, 8, 0, 0),
    (3, 34, BLOCK_W + 18, 6, 0),
    (4, 30, 62, 2, 128),  # rows further apart than the picture is wide
])  # fmt: skip
@pytest.mark.parametrize("matrix", sorted(MATRICES))
def test_a_clip_of_surfaces_in_one_launch_gives_each_surfaces_bytes(frames, height, width, pad_rows, pitch, matrix):
    """A clip's NVDEC surfaces [T, rows * 3 / 2, w] in one launch: frame t's bytes are its surface's alone, with
    the surfaces apart by more than one surface (a slice of a larger stack, as strides may have them)."""
    stack = torch.stack([surface(height, width, pad_rows, pitch, seed=seed) for seed in range(2 * frames)])
    clip = stack[::2]  # every other surface: frames two surfaces apart, rows pitch apart
    assert clip.stride(0) == 2 * stack.stride(0)
    with triton_mode(interpret=True):
        got = nv12_rgb(clip, height, matrix)
    assert got.shape == (frames, height, width, 3) and got.is_contiguous()
    for t in range(frames):
        assert torch.equal(got[t], nv12_rgb_ref(clip[t], height, matrix))
    assert torch.equal(nv12_rgb_ref(clip, height, matrix), got)


@pytest.mark.parametrize(("x264", "matrix"), [("", "bt601"), ("colormatrix=bt709", "bt709")])
def test_kernel_gives_pyavs_rgb24_on_h264_frames(tmp_path, x264, matrix):
    """Real H.264 frames as NVDEC's surfaces hold them: the kernel's RGB is libswscale's, byte for byte."""
    path = videos.make_video(tmp_path / "clip.mp4", 3, 72, 136, fps=24, pattern="moving", x264=x264)
    with av.open(str(path)) as container:
        assert _matrix(container.streams.video[0]) == matrix
    rgb = pyav_rgb()
    with av.open(str(path)) as container, triton_mode(interpret=True):
        for frame in container.decode(video=0):
            assert torch.equal(nv12_rgb(nv12_surface(*yuv420p_planes(frame)), frame.height, matrix), rgb(frame))


@pytest.mark.parametrize(("frames", "height", "width"), [(1, 2, 2), (3, 6, 8), (2, 34, BLOCK_W + 18), (2, 144, 256)])
@pytest.mark.parametrize("matrix", sorted(MATRICES))
def test_i420_kernel_gives_the_references_bytes(frames, height, width, matrix):
    """A clip of I420 frames in one launch: each frame's bytes as its planes give them, whatever they hold."""
    g = torch.Generator().manual_seed(height * width)
    i420 = torch.randint(0, 256, (frames, height * 3 // 2, width), generator=g, dtype=torch.uint8)
    want = i420_rgb_ref(i420, matrix)
    with triton_mode(interpret=True):
        got = i420_rgb(i420, matrix)
    assert got.shape == (frames, height, width, 3) and got.dtype == torch.uint8 and torch.equal(got, want)
    for frame, rgb in zip(i420, want, strict=True):
        assert torch.equal(rgb, yuv420_to_rgb_ref(*i420_planes(frame), matrix))
    y, u, v = i420_planes(i420[-1])  # the planes one after another
    assert torch.equal(torch.cat([y.flatten(), u.flatten(), v.flatten()]), i420[-1].flatten())


@pytest.mark.parametrize(("x264", "matrix"), [("", "bt601"), ("colormatrix=bt709", "bt709")])
def test_i420_kernel_gives_pyavs_rgb24_on_h264_frames(tmp_path, x264, matrix):
    """The CPU decoder's frames as the run hands them over (decoders.i420_bytes), converted in one launch: PyAV's
    RGB of each, byte for byte."""
    path = videos.make_video(tmp_path / "clip.mp4", 3, 72, 136, fps=24, pattern="moving", x264=x264)
    rgb = pyav_rgb()
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
        want = torch.stack([rgb(frame) for frame in frames])
        i420 = torch.stack([i420_bytes(frame) for frame in frames])
    assert [p.numel() for p in i420_planes(i420[0])] == [72 * 136, 36 * 68, 36 * 68]
    with triton_mode(interpret=True):
        assert torch.equal(i420_rgb(i420, matrix), want)


@pytest.mark.parametrize(("x264", "matrix"), [("", "bt601"), ("colormatrix=bt709", "bt709")])
def test_i420_frames_of_tiny_pictures_give_pyavs_rgb24(tmp_path, x264, matrix):
    """Pictures narrower than libswscale's vector width take its other code paths: the same bytes there too."""
    from titok_fast.decoders import frame_i420_matrix, i420_matrix

    rgb = pyav_rgb()
    for width, height in itertools.product((2, 4, 6, 10, 18, 34), (2, 6, 18)):
        path = videos.make_video(tmp_path / f"{width}x{height}.mp4", 2, height, width, fps=8, pattern="noise",
                                 x264=x264)  # fmt: skip
        with av.open(str(path)) as container:
            assert i420_matrix(container.streams.video[0]) == matrix
            for frame in container.decode(video=0):
                assert frame_i420_matrix(frame) == matrix
                assert torch.equal(i420_rgb_ref(i420_bytes(frame)[None], matrix)[0], rgb(frame)), (width, height)


@pytest.mark.parametrize(("i420", "said"), [
    (torch.zeros(1, 9, 7, dtype=torch.uint8), "of even height and width"),
    (torch.zeros(1, 8, 8, dtype=torch.uint8), "of even height and width"),
    (torch.zeros(0, 9, 8, dtype=torch.uint8), "1..65535 frames"),
    (torch.zeros(1, 9, 8, dtype=torch.int16), "i420 must be uint8"),
    (torch.zeros(9, 8, dtype=torch.uint8), "i420 must be uint8"),
    (torch.zeros(1, 8, 9, dtype=torch.uint8).transpose(1, 2), "contiguous"),
])  # fmt: skip
def test_i420_launcher_refuses_what_the_kernel_would_read_wrong(i420, said):
    with pytest.raises(ValueError, match=said), triton_mode(interpret=True):
        i420_rgb(i420)
    with pytest.raises(ValueError, match=said):
        i420_rgb_ref(i420)


def test_planes_of_a_padded_surface():
    nv12 = surface(4, 6, pad_rows=2)  # 6 luma rows (2 of padding), then 3 chroma rows (1 of padding)
    y, u, v = nv12_planes(nv12, 4)
    assert torch.equal(y, nv12[:4]) and torch.equal(u, nv12[6:8, 0::2]) and torch.equal(v, nv12[6:8, 1::2])
    assert torch.equal(nv12_rgb_ref(nv12, 4), yuv420_to_rgb_ref(y, u, v))


@pytest.mark.parametrize(("nv12", "height", "said"), [
    (torch.zeros(9, 7, dtype=torch.uint8), 6, "of even width"),
    (torch.zeros(9, 8, dtype=torch.uint8), 7, "a picture 7 rows high"),
    (torch.zeros(9, 8, dtype=torch.uint8), 0, "a picture 0 rows high"),
    (torch.zeros(9, 8, dtype=torch.int16), 6, "nv12 must be uint8"),
    (torch.zeros(8, 9, dtype=torch.uint8).t(), 6, "rows contiguous"),
    (torch.zeros(9, 8, dtype=torch.uint8)[None].expand(65536, 9, 8), 6, "1..65535 NV12 surfaces"),
    (torch.zeros(0, 9, 8, dtype=torch.uint8), 6, "1..65535 NV12 surfaces"),
    (torch.zeros(1, 1, 9, 8, dtype=torch.uint8), 6, "nv12 must be uint8"),
])  # fmt: skip
def test_launcher_refuses_what_the_kernel_would_read_wrong(nv12, height, said):
    with pytest.raises(ValueError, match=said), triton_mode(interpret=True):
        nv12_rgb(nv12, height)
    with pytest.raises(ValueError, match="matrix must be one of"):
        nv12_rgb(torch.zeros(9, 8, dtype=torch.uint8), 6, "bt2020")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("matrix", sorted(MATRICES))
def test_gpu_kernel_gives_the_references_bytes(matrix):
    """Compiled: no multiply-add fused into one rounding, so the bytes are PyTorch's on the GPU and on the CPU; and
    it is what ``--decoder nvdec``'s frames go through."""
    nv12 = surface(720, 1280, pad_rows=16, pitch=1536, seed=7).cuda()
    got = nv12_rgb(nv12, 720, matrix)
    assert torch.equal(got, nv12_rgb_ref(nv12, 720, matrix))
    assert torch.equal(got.cpu(), nv12_rgb_ref(nv12.cpu(), 720, matrix))
    frame = NvdecFrame(nv12, 720, 0, Fraction(1, 30), None, matrix)
    assert torch.equal(nvdec_rgb(frame), got)
    clip = torch.stack([nv12, nv12.flip(1), nv12.flip(0)])  # a clip of surfaces, as the reader converts NVDEC's
    assert torch.equal(nv12_rgb(clip, 720, matrix).cpu(), nv12_rgb_ref(clip.cpu(), 720, matrix))
    i420 = torch.randint(0, 256, (4, 1080, 1280), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    got = i420_rgb(i420.cuda(), matrix)  # a 720p clip of 4 frames as the CPU decoder hands it over
    assert torch.equal(got.cpu(), i420_rgb_ref(i420, matrix))
