"""Limited-range YUV 4:2:0 (NVDEC's NV12 surfaces) -> uint8 RGB, as libswscale's default conversion does it, in one
pass: the conversion of ``--decoder nvdec``'s frames on their GPU.

In PyTorch the conversion is some twenty kernels a frame, each with a float32 copy of the frame; a decoding thread
launching them holds Python's lock (the GIL) for much of each launch, which every other decoding thread then
waits for. Here a frame is one launch, read once and written once.

The arithmetic is :func:`yuv420_to_rgb_ref`'s, operation for operation in float32 with the same constants, and the
kernel is compiled without fusing a multiply and an add into one rounding (``enable_fp_fusion=False``), as
PyTorch's separate kernels round them: the same bytes (tests/test_nv12_rgb.py).
"""

from __future__ import annotations

import contextlib
import threading

import torch

from ._triton import tl, triton

# (Kr, Kb) of Y = Kr R + (1 - Kr - Kb) G + Kb B, by the stream's colour matrix
MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}
LUMA_GAIN = 255 / 219  # limited range: Y in [16, 235], U and V in [16, 240] around 128
CHROMA_GAIN = 255 / 224
BLOCK_W = 512  # picture columns per program; one program per row and block of columns
NUM_WARPS = 4


def coefficients(matrix: str) -> tuple[float, float, float, float]:
    """(R from Cr, G from Cb, G from Cr, B from Cb) of ``matrix``, one of :data:`MATRICES`:
    R = Y + a Cr, G = Y - (b Cb + c Cr), B = Y + d Cb."""
    if matrix not in MATRICES:
        raise ValueError(f"matrix must be one of {sorted(MATRICES)}; got {matrix!r}")
    kr, kb = MATRICES[matrix]
    kg = 1 - kr - kb
    return 2 * (1 - kr), 2 * kb * (1 - kb) / kg, 2 * kr * (1 - kr) / kg, 2 * (1 - kb)


def yuv420_to_rgb_ref(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, matrix: str = "bt601") -> torch.Tensor:
    """Limited-range YUV 4:2:0 -> RGB as libswscale's default (unscaled) conversion does it, within rounding.

    y: [h, w] uint8; u, v: [ceil(h / 2), ceil(w / 2)] uint8; matrix: "bt601" or "bt709". Each chroma sample
    covers its 2 x 2 luma block (libswscale's unscaled path does not interpolate chroma) and values are truncated
    as its fixed-point arithmetic does: on H.264 frames the result is within 2 levels of PyAV's ``rgb24`` (0.6 on
    average, tests/test_preprocess.py). Returns [h, w, 3] uint8 on y's device.
    """
    r_cr, g_cb, g_cr, b_cb = coefficients(matrix)
    if y.ndim != 2 or u.shape != v.shape or u.shape != ((y.shape[0] + 1) // 2, (y.shape[1] + 1) // 2):
        raise ValueError(f"planes must be y [h, w] and u, v [h/2, w/2]; got {list(y.shape)}, {list(u.shape)}")
    h, w = y.shape
    chroma = torch.stack([u, v]).float().repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :h, :w] - 128
    luma = (y.float() - 16) * LUMA_GAIN
    cb, cr = chroma[0] * CHROMA_GAIN, chroma[1] * CHROMA_GAIN
    r = luma + cr * r_cr
    g = luma - (cb * g_cb + cr * g_cr)
    b = luma + cb * b_cb
    return torch.stack([r, g, b], dim=-1).floor().clamp(0, 255).to(torch.uint8)


def nv12_planes(nv12: torch.Tensor, height: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Y, U, V planes of a picture ``height`` rows high in an NV12 surface [rows * 3 / 2, w] (luma rows first,
    then rows of interleaved U, V; the surface may hold padding rows below the picture)."""
    luma_rows = nv12.shape[0] * 2 // 3
    uv = nv12[luma_rows : luma_rows + (height + 1) // 2]
    return nv12[:height], uv[:, 0::2], uv[:, 1::2]


def nv12_rgb_ref(nv12: torch.Tensor, height: int, matrix: str = "bt601") -> torch.Tensor:
    """Plain PyTorch: the picture ``height`` rows high in the NV12 surface ``nv12`` as [height, w, 3] uint8 RGB."""
    return yuv420_to_rgb_ref(*nv12_planes(nv12, height), matrix)


@triton.jit(do_not_specialize=["height", "width", "luma_rows", "stride_row"])
def _nv12_rgb_kernel(
    nv12_ptr,  # uint8 [rows * 3 / 2, >= width], row stride stride_row: luma rows, then interleaved U, V rows
    out_ptr,  # uint8 [height, width, 3], contiguous
    height, width, luma_rows, stride_row,
    luma_gain, chroma_gain, r_cr, g_cb, g_cr, b_cb,  # float32: LUMA_GAIN, CHROMA_GAIN, coefficients()
    BLOCK_W: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = cols < width
    pair = (cols // 2) * 2  # a chroma sample covers two columns and two rows
    uv = nv12_ptr + (luma_rows + row // 2) * stride_row + pair
    y = tl.load(nv12_ptr + row * stride_row + cols, mask=mask, other=0).to(tl.float32)
    u = tl.load(uv, mask=mask, other=0).to(tl.float32) - 128.0
    v = tl.load(uv + 1, mask=mask, other=0).to(tl.float32) - 128.0
    luma = (y - 16.0) * luma_gain
    cb = u * chroma_gain
    cr = v * chroma_gain
    r = luma + cr * r_cr
    g = luma - (cb * g_cb + cr * g_cr)
    b = luma + cb * b_cb
    out = out_ptr + (row * width + cols) * 3
    tl.store(out, tl.minimum(tl.maximum(tl.floor(r), 0.0), 255.0).to(tl.uint8), mask=mask)
    tl.store(out + 1, tl.minimum(tl.maximum(tl.floor(g), 0.0), 255.0).to(tl.uint8), mask=mask)
    tl.store(out + 2, tl.minimum(tl.maximum(tl.floor(b), 0.0), 255.0).to(tl.uint8), mask=mask)


# Decoding threads launch it at once; a launch that compiles (the first, per device) must not race another
# (Triton's compile and its kernel cache are not thread-safe). A launch holds it for microseconds.
_LAUNCHING = threading.Lock()


def nv12_rgb(nv12: torch.Tensor, height: int, matrix: str = "bt601") -> torch.Tensor:
    """:func:`nv12_rgb_ref` in one kernel: the same bytes. ``nv12``: uint8 [rows * 3 / 2, w] with a contiguous
    last dimension, ``w`` even (an odd width's last chroma sample would lie past the row), ``height`` <= rows."""
    coefs = coefficients(matrix)
    if nv12.dtype != torch.uint8 or nv12.dim() != 2 or nv12.stride(1) != 1:
        raise ValueError(f"nv12 must be uint8 [rows * 3 / 2, w], rows contiguous; got {nv12.dtype} {list(nv12.shape)}")
    luma_rows, width = nv12.shape[0] * 2 // 3, nv12.shape[1]
    if width % 2 or not 0 < height <= luma_rows or luma_rows + (height + 1) // 2 > nv12.shape[0]:
        raise ValueError(f"a picture {height} rows high of even width in an NV12 surface; got {list(nv12.shape)}")
    out = torch.empty((height, width, 3), dtype=torch.uint8, device=nv12.device)
    grid = (height, triton.cdiv(width, BLOCK_W))
    with _LAUNCHING, torch.cuda.device(nv12.device) if nv12.is_cuda else contextlib.nullcontext():  # (its GPU's)
        _nv12_rgb_kernel[grid](nv12, out, height, width, luma_rows, nv12.stride(0), LUMA_GAIN, CHROMA_GAIN, *coefs,
                               BLOCK_W=BLOCK_W, num_warps=NUM_WARPS, enable_fp_fusion=False)  # fmt: skip
    return out
