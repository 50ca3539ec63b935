"""Limited-range YUV 4:2:0 (NVDEC's NV12 surfaces) -> uint8 RGB, byte for byte as libswscale converts it (PyAV's
``rgb24``, the CPU decoder's RGB), in one pass: the conversion of ``--decoder nvdec``'s frames on their GPU.

libswscale's unscaled YUV 4:2:0 -> RGB converter (the x86 SIMD one that PyAV's x86-64 wheels run; an Arm build has
converters of its own, not checked) works in 16-bit fixed point: each sample is scaled by 8 and offset (Y by 16 * 8,
U and V by 128 * 8), multiplied by a coefficient keeping the high 16 bits of the 32-bit product (rounded down), the
terms added, and the sum clamped to 0..255. The coefficients are its tables' (16.16 fixed point, limited range) in
13 bits. Done the same way here, in integers, the bytes are libswscale's: checked against PyAV's ``rgb24`` on every
frame of H.264 streams of many sizes, on noise, BT.601 and BT.709, under PyAV 18 and 19 (tests/test_nv12_rgb.py,
tests/test_preprocess.py). Since H.264 and HEVC decoding is exact, NVDEC's frames then give the CPU decoder's
pixels, and tokens.

In PyTorch the conversion is some twenty kernels a frame, each with a copy of the frame; a decoding thread
launching them holds Python's lock (the GIL) for much of each launch, which every other decoding thread then
waits for. Here a clip's frames are one launch (:func:`nv12_rgb` of their surfaces stacked), each read once and
written once.

The same conversion takes I420 clips (:func:`i420_rgb`): the CPU decoder's planes, frame after frame, which a run
on a GPU uploads instead of RGB (half the bytes) and converts there, a clip in one launch.
"""

from __future__ import annotations

import torch

from ._triton import launching, tl, triton

# libswscale's tables for the two matrices: (Cr -> R, Cb -> B, Cb -> G, Cr -> G) in 16.16 fixed point, the chroma
# gain of limited range (255 / 224) included; G's are subtracted
MATRICES = {"bt601": (104597, 132201, 25675, 53279), "bt709": (117489, 138438, 13975, 34925)}
LUMA_GAIN = (1 << 16) * 255 // 219  # limited range: Y in [16, 235] -> [0, 255], 16.16 fixed point, rounded down
Y_OFFSET, C_OFFSET = 16 * 8, 128 * 8  # subtracted from the samples scaled by 8
BLOCK_W = 512  # picture columns per program; one program per row and block of columns
NUM_WARPS = 4


def _q13(value: int) -> int:
    """A 16.16 fixed-point value in 13 fractional bits, rounded as libswscale rounds it (to nearest, halves up)."""
    return (value * (1 << 13) + (1 << 15)) >> 16


def coefficients(matrix: str) -> tuple[int, int, int, int, int]:
    """(Y gain, R from Cr, B from Cb, G from Cb, G from Cr) of ``matrix``, one of :data:`MATRICES`, as 16-bit
    multipliers: R = Y' + hi(Cr' r_cr), G = Y' + hi(Cb' g_cb) + hi(Cr' g_cr), B = Y' + hi(Cb' b_cb), with
    Y' = hi((8 Y - Y_OFFSET) y_gain), C' = 8 C - C_OFFSET and hi(p) = p >> 16."""
    if matrix not in MATRICES:
        raise ValueError(f"matrix must be one of {sorted(MATRICES)}; got {matrix!r}")
    r_cr, b_cb, g_cb, g_cr = MATRICES[matrix]
    return _q13(LUMA_GAIN), _q13(r_cr), _q13(b_cb), _q13(-g_cb), _q13(-g_cr)


def yuv420_to_rgb_ref(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, matrix: str = "bt601") -> torch.Tensor:
    """Limited-range YUV 4:2:0 -> RGB as libswscale's unscaled conversion does it (see the module's header): PyAV's
    ``rgb24`` of the same planes, byte for byte.

    y: [h, w] uint8; u, v: [ceil(h / 2), ceil(w / 2)] uint8; matrix: "bt601" or "bt709". Each chroma sample covers
    its 2 x 2 luma block (the unscaled conversion does not interpolate chroma). Returns [h, w, 3] uint8 on y's
    device.
    """
    y_gain, r_cr, b_cb, g_cb, g_cr = coefficients(matrix)
    if y.ndim != 2 or u.shape != v.shape or u.shape != ((y.shape[0] + 1) // 2, (y.shape[1] + 1) // 2):
        raise ValueError(f"planes must be y [h, w] and u, v [h/2, w/2]; got {list(y.shape)}, {list(u.shape)}")
    h, w = y.shape
    chroma = torch.stack([u, v]).int().repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :h, :w] * 8 - C_OFFSET
    luma = (y.int() * 8 - Y_OFFSET) * y_gain >> 16
    cb, cr = chroma[0], chroma[1]
    r = luma + (cr * r_cr >> 16)
    g = luma + ((cb * g_cb >> 16) + (cr * g_cr >> 16))
    b = luma + (cb * b_cb >> 16)
    return torch.stack([r, g, b], dim=-1).clamp(0, 255).to(torch.uint8)


def nv12_planes(nv12: torch.Tensor, height: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Y, U, V planes of a picture ``height`` rows high in an NV12 surface [rows * 3 / 2, w] (luma rows first,
    then rows of interleaved U, V; the surface may hold padding rows below the picture)."""
    luma_rows = nv12.shape[0] * 2 // 3
    uv = nv12[luma_rows : luma_rows + (height + 1) // 2]
    return nv12[:height], uv[:, 0::2], uv[:, 1::2]


def nv12_surface(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The NV12 surface NVDEC writes for a picture of planes y [h, w], u and v [ceil(h / 2), ceil(w / 2)] (uint8):
    [h + ceil(h / 2), w], the inverse of :func:`nv12_planes` (no padding rows)."""
    uv = torch.stack([u, v], dim=-1).reshape(u.shape[0], -1)[:, : y.shape[1]]
    return torch.cat([y, uv])


def nv12_rgb_ref(nv12: torch.Tensor, height: int, matrix: str = "bt601") -> torch.Tensor:
    """Plain PyTorch: the picture ``height`` rows high in the NV12 surface ``nv12`` as [height, w, 3] uint8 RGB; a
    clip's surfaces [T, rows * 3 / 2, w] as [T, height, w, 3]."""
    if nv12.dim() == 3:
        return torch.stack([yuv420_to_rgb_ref(*nv12_planes(surface, height), matrix) for surface in nv12])
    return yuv420_to_rgb_ref(*nv12_planes(nv12, height), matrix)


@triton.jit
def _store_rgb(out, y, cb, cr, mask, y_gain, r_cr, b_cb, g_cb, g_cr, Y_OFFSET: tl.constexpr, C_OFFSET: tl.constexpr):
    """Samples (uint8 Y, Cb, Cr of each pixel) -> RGB bytes at ``out`` (3 per pixel), as :func:`yuv420_to_rgb_ref`."""
    cb = cb.to(tl.int32) * 8 - C_OFFSET
    cr = cr.to(tl.int32) * 8 - C_OFFSET
    luma = (y.to(tl.int32) * 8 - Y_OFFSET) * y_gain >> 16  # (>> of a signed integer: rounded down, as the reference's)
    r = luma + (cr * r_cr >> 16)
    g = luma + ((cb * g_cb >> 16) + (cr * g_cr >> 16))
    b = luma + (cb * b_cb >> 16)
    tl.store(out, tl.minimum(tl.maximum(r, 0), 255).to(tl.uint8), mask=mask)
    tl.store(out + 1, tl.minimum(tl.maximum(g, 0), 255).to(tl.uint8), mask=mask)
    tl.store(out + 2, tl.minimum(tl.maximum(b, 0), 255).to(tl.uint8), mask=mask)


@triton.jit(do_not_specialize=["height", "width", "luma_rows", "stride_row", "stride_frame"])
def _nv12_rgb_kernel(
    nv12_ptr,  # uint8 [frames, rows * 3 / 2, >= width], strides stride_frame, stride_row, 1: luma rows, then
    # interleaved U, V rows
    out_ptr,  # uint8 [frames, height, width, 3], contiguous
    height, width, luma_rows, stride_row, stride_frame,
    y_gain, r_cr, b_cb, g_cb, g_cr,  # int32: coefficients()
    Y_OFFSET: tl.constexpr, C_OFFSET: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    frame = tl.program_id(2).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = cols < width
    pair = (cols // 2) * 2  # a chroma sample covers two columns and two rows
    base = nv12_ptr + frame * stride_frame
    uv = base + (luma_rows + row // 2) * stride_row + pair
    y = tl.load(base + row * stride_row + cols, mask=mask, other=0)
    cb = tl.load(uv, mask=mask, other=0)
    cr = tl.load(uv + 1, mask=mask, other=0)
    out = out_ptr + ((frame * height + row) * width + cols) * 3
    _store_rgb(out, y, cb, cr, mask, y_gain, r_cr, b_cb, g_cb, g_cr, Y_OFFSET, C_OFFSET)


@triton.jit(do_not_specialize=["height", "width"])
def _i420_rgb_kernel(
    i420_ptr,  # uint8 [frames, height * 3 / 2, width], contiguous: each frame's Y, then U, then V plane
    out_ptr,  # uint8 [frames, height, width, 3], contiguous
    height, width,
    y_gain, r_cr, b_cb, g_cb, g_cr,  # int32: coefficients()
    Y_OFFSET: tl.constexpr, C_OFFSET: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    frame = tl.program_id(2).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = cols < width
    pixels = height.to(tl.int64) * width
    base = i420_ptr + frame * (pixels + pixels // 2)
    u = base + pixels + (row // 2) * (width // 2) + cols // 2  # a chroma sample covers two columns and two rows
    y = tl.load(base + row * width + cols, mask=mask, other=0)
    cb = tl.load(u, mask=mask, other=0)
    cr = tl.load(u + pixels // 4, mask=mask, other=0)
    out = out_ptr + ((frame * height + row) * width + cols) * 3
    _store_rgb(out, y, cb, cr, mask, y_gain, r_cr, b_cb, g_cb, g_cr, Y_OFFSET, C_OFFSET)


def nv12_rgb(nv12: torch.Tensor, height: int, matrix: str = "bt601") -> torch.Tensor:
    """:func:`nv12_rgb_ref` in one kernel: the same bytes. ``nv12``: uint8 [rows * 3 / 2, w] (one frame) or a clip
    of such surfaces [T, rows * 3 / 2, w], one launch either way; rows and frames any stride apart, the last
    dimension contiguous, ``w`` even (an odd width's last chroma sample would lie past the row), ``height`` <=
    rows."""
    coefs = coefficients(matrix)
    if nv12.dtype != torch.uint8 or nv12.dim() not in (2, 3) or nv12.stride(-1) != 1:
        raise ValueError(f"nv12 must be uint8 [rows * 3 / 2, w] or [T, rows * 3 / 2, w], rows contiguous; got "
                         f"{nv12.dtype} {list(nv12.shape)}")  # fmt: skip
    clip = nv12 if nv12.dim() == 3 else nv12[None]
    frames, luma_rows, width = clip.shape[0], clip.shape[1] * 2 // 3, clip.shape[2]
    if width % 2 or not 0 < height <= luma_rows or luma_rows + (height + 1) // 2 > clip.shape[1]:
        raise ValueError(f"a picture {height} rows high of even width in an NV12 surface; got {list(nv12.shape)}")
    if not 0 < frames <= 65535:
        raise ValueError(f"a clip of 1..65535 NV12 surfaces; got {frames}")
    out = torch.empty((frames, height, width, 3), dtype=torch.uint8, device=nv12.device)
    grid = (height, triton.cdiv(width, BLOCK_W), frames)
    with launching(nv12):  # (its GPU's)
        _nv12_rgb_kernel[grid](clip, out, height, width, luma_rows, clip.stride(1), clip.stride(0), *coefs,
                               Y_OFFSET=Y_OFFSET, C_OFFSET=C_OFFSET, BLOCK_W=BLOCK_W, num_warps=NUM_WARPS)  # fmt: skip
    return out if nv12.dim() == 3 else out[0]


def i420_planes(frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Y [h, w], U and V [h / 2, w / 2] planes of one I420 frame [h * 3 / 2, w] (uint8, contiguous: the planes'
    bytes one after another, h and w even)."""
    h, w = frame.shape[0] * 2 // 3, frame.shape[1]
    flat, pixels = frame.reshape(-1), h * w
    chroma = (h // 2, w // 2)
    return flat[:pixels].view(h, w), flat[pixels : pixels * 5 // 4].view(chroma), flat[pixels * 5 // 4 :].view(chroma)


def i420_rgb_ref(i420: torch.Tensor, matrix: str = "bt601") -> torch.Tensor:
    """Plain PyTorch: I420 frames [T, h * 3 / 2, w] (uint8; see :func:`i420_planes`) -> [T, h, w, 3] uint8 RGB."""
    _check_i420(i420)
    return torch.stack([yuv420_to_rgb_ref(*i420_planes(frame), matrix) for frame in i420])


def i420_rgb(i420: torch.Tensor, matrix: str = "bt601") -> torch.Tensor:
    """:func:`i420_rgb_ref` in one kernel, one launch a clip: the same bytes."""
    coefs = coefficients(matrix)
    _check_i420(i420)
    frames, height, width = i420.shape[0], i420.shape[1] * 2 // 3, i420.shape[2]
    out = torch.empty((frames, height, width, 3), dtype=torch.uint8, device=i420.device)
    grid = (height, triton.cdiv(width, BLOCK_W), frames)
    with launching(i420):
        _i420_rgb_kernel[grid](i420, out, height, width, *coefs, Y_OFFSET=Y_OFFSET, C_OFFSET=C_OFFSET,
                               BLOCK_W=BLOCK_W, num_warps=NUM_WARPS)  # fmt: skip
    return out


def _check_i420(i420: torch.Tensor) -> None:
    if i420.dtype != torch.uint8 or i420.dim() != 3 or not i420.is_contiguous() or not 0 < i420.shape[0] <= 65535:
        raise ValueError(f"i420 must be uint8 [1..65535 frames, h * 3 / 2, w], contiguous; got {i420.dtype} "
                         f"{list(i420.shape)}")  # fmt: skip
    rows, width = i420.shape[1:]
    if rows % 3 or rows < 3 or width % 2 or width < 2:
        raise ValueError(f"I420 frames of even height and width are [h * 3 / 2, w]; got {rows} rows of {width}")
