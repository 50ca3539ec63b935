"""The FFN's gated GELU, ``a * gelu(g)`` over the two halves of each row, in one pass; optionally straight to the
FP8 codes and row scales that the next (FP8) Linear reads.

x [M, 2I] (bf16 / fp16 / fp32, last dim contiguous; ``a`` its first I columns, ``g`` the last I) -> y [M, I] in x's
dtype, as upstream's module computes it: ``gelu(g)`` in float32 (exact erf GELU, ``g * 0.5 * (1 + erf(g / sqrt
2))``) rounded to x's dtype, then the product in float32 rounded to x's dtype. In PyTorch that is two kernels and
five passes of I values a row (GELU reads g and writes it, the product reads both and writes y); here three, read
once and written once. With ``fp8=True`` the rounded y is quantised as ``kernels/fp8_quant.py`` does (its row's
peak to 448, times the row's correctly rounded inverse scale, nearest-even codes), so the product never goes to
memory in 16 bits; a program then holds whole rows (their peak comes before their codes), as up to four tiles.

The erf is the device's: on a GPU Triton's libdevice ``erff``, in PyTorch's expression; in the Triton interpreter
Python's ``math.erf`` (correctly rounded), which :func:`gated_gelu_ref` also uses. PyTorch's own erf differs from
both: its CPU GELU has an erf of its own, and on an H100 (torch 2.11+cu130, Triton 3.6) Triton's libdevice erff
differed from the erff of PyTorch's CUDA build on 13% of float32 inputs, so that 0.5% of bf16 outputs were the
next bf16 value of PyTorch's GatedGelu (RESULTS.md; a ``gpu`` test holds it to one ulp).
"""

from __future__ import annotations

import torch

from ._triton import tl, triton
from .fp8_quant import _row_scales, _store_codes, quantize_rows_fp8_ref
from .layer_norm import MAX_ROW

SQRT1_2 = 0.7071067811865476  # 1 / sqrt(2), float32 in the kernel as in PyTorch's (M_SQRT1_2 as its opmath type)
_SQRT1_2 = tl.constexpr(SQRT1_2)
MAX_INNER = MAX_ROW  # the FP8 form reduces a whole row in one block
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _gated_gelu_kernel(
    x_ptr,  # [M, 2 * inner], row stride stride_x, last dim contiguous
    y_ptr,  # [M, inner] in x's dtype, row stride stride_y
    num_rows, inner, stride_x, stride_y,
    BLOCK: tl.constexpr,  # columns per program
    ROWS: tl.constexpr,
):  # fmt: skip
    o_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    m_r = o_r < num_rows
    o_r = o_r.to(tl.int64)
    b_y, o_c, mask = _gated_gelu_block(x_ptr, o_r, m_r, tl.program_id(1) * BLOCK, inner, stride_x, BLOCK)
    tl.store(y_ptr + o_r[:, None] * stride_y + o_c[None, :], b_y, mask=mask)


@triton.jit
def _gated_gelu_fp8_kernel(
    x_ptr,  # [M, 2 * inner], row stride stride_x, last dim contiguous
    q_ptr,  # float8e4nv [M, inner]: the codes, row stride stride_q
    scale_ptr,  # float32 [M]
    num_rows, inner, stride_x, stride_q,
    TILE: tl.constexpr,  # a row is TILES tiles of TILE columns (TILES * TILE >= inner), held at once for its peak
    TILES: tl.constexpr,  # 1 to 4
    ROWS: tl.constexpr,
):  # fmt: skip
    o_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    m_r = o_r < num_rows
    o_r = o_r.to(tl.int64)
    y0, c0, k0 = _gated_gelu_block(x_ptr, o_r, m_r, 0, inner, stride_x, TILE)
    amax = tl.max(tl.abs(y0.to(tl.float32)), 1)  # (masked columns hold 0: no part of a row's peak)
    if TILES > 1:
        y1, c1, k1 = _gated_gelu_block(x_ptr, o_r, m_r, TILE, inner, stride_x, TILE)
        amax = tl.maximum(amax, tl.max(tl.abs(y1.to(tl.float32)), 1))
    if TILES > 2:
        y2, c2, k2 = _gated_gelu_block(x_ptr, o_r, m_r, 2 * TILE, inner, stride_x, TILE)
        amax = tl.maximum(amax, tl.max(tl.abs(y2.to(tl.float32)), 1))
    if TILES > 3:
        y3, c3, k3 = _gated_gelu_block(x_ptr, o_r, m_r, 3 * TILE, inner, stride_x, TILE)
        amax = tl.maximum(amax, tl.max(tl.abs(y3.to(tl.float32)), 1))
    scale, inverse = _row_scales(amax)
    tl.store(scale_ptr + o_r, scale, mask=m_r)
    _store_codes(y0.to(tl.float32), inverse, q_ptr, o_r, c0, k0, stride_q)
    if TILES > 1:
        _store_codes(y1.to(tl.float32), inverse, q_ptr, o_r, c1, k1, stride_q)
    if TILES > 2:
        _store_codes(y2.to(tl.float32), inverse, q_ptr, o_r, c2, k2, stride_q)
    if TILES > 3:
        _store_codes(y3.to(tl.float32), inverse, q_ptr, o_r, c3, k3, stride_q)


@triton.jit
def _gated_gelu_block(x_ptr, o_r, m_r, first, inner, stride_x, BLOCK: tl.constexpr):
    """``a * gelu(g)`` of rows ``o_r`` (int64; ``m_r`` those that exist), columns ``first`` to ``first + BLOCK``
    (those past ``inner``: 0), in x's dtype; and the columns and the mask."""
    o_c = first + tl.arange(0, BLOCK)
    mask = m_r[:, None] & (o_c < inner)[None, :]
    p_a = x_ptr + o_r[:, None] * stride_x + o_c[None, :]
    b_a = tl.load(p_a, mask=mask, other=0.0).to(tl.float32)
    b_g = tl.load(p_a + inner, mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    b_gelu = b_g * 0.5 * (1.0 + tl.math.erf(b_g * _SQRT1_2))
    return (b_a * b_gelu.to(dtype).to(tl.float32)).to(dtype), o_c, mask


MAX_TILES = 4  # tiles a row in the FP8 kernel: its values are held at once (its peak comes before its codes)
MIN_TILE, MAX_TILE = 16, 4096


def gated_gelu_config(inner: int, fp8: bool, values_per_thread: int = 16) -> dict:
    """Block shape for rows of ``inner`` outputs. bf16/fp16/fp32 out: about 4096 values a program, columns in
    blocks of at most 1024 (a second grid axis). FP8: a program holds whole rows, as TILES tiles of TILE columns,
    the tile size that pads the row least (ties: the larger tile), not one power of two >= inner: at V1's
    decoder width (2752) one block of 4096 left a third of the lanes computing padding, in a kernel bound by
    instructions; 3 tiles of 1024 leave a tenth. ``values_per_thread`` of a tile a thread: 16 (the default)
    gives 16-byte stores of codes at 80 registers (V1's decoder, sm_90), 8 half the registers and twice the
    occupancy with 8-byte stores (for benchmarks: which is faster is for a GPU to say)."""
    if not fp8:
        block = min(triton.next_power_of_2(max(inner, 1)), 1024)
        return dict(BLOCK=block, ROWS=max(1, 4096 // block), num_warps=4 if block <= 1024 else 8)
    tiles = [(MIN_TILE << k) for k in range((MAX_TILE // MIN_TILE).bit_length())]
    tiles = [t for t in tiles if -(-max(inner, 1) // t) <= MAX_TILES]
    tile = min(tiles, key=lambda t: (-(-max(inner, 1) // t) * t, -t))
    rows = max(1, 128 * values_per_thread // tile)  # (4 warps, at least)
    return dict(TILE=tile, TILES=-(-max(inner, 1) // tile), ROWS=rows,
                num_warps=max(1, rows * tile // (32 * values_per_thread)))  # fmt: skip


def _check(x: torch.Tensor, fp8: bool) -> None:
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype not in DTYPES or x.shape[1] % 2:
        raise ValueError(f"x must be [M, 2 * I] bf16/fp16/fp32 with a contiguous last dim; got {x.dtype} "
                         f"{list(x.shape)}")  # fmt: skip
    if fp8 and x.shape[1] // 2 > MAX_INNER:
        raise ValueError(f"rows of at most {MAX_INNER} outputs are quantised, each held whole; got {x.shape[1] // 2}")


def gated_gelu(
    x: torch.Tensor, fp8: bool = False, values_per_thread: int = 16
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [M, 2I] -> ``a * gelu(g)`` [M, I] in x's dtype; ``fp8=True``: its (codes float8_e4m3fn [M, I], scales
    float32 [M, 1]) instead. One launch; :func:`gated_gelu_ref`'s bytes. ``values_per_thread``: see
    :func:`gated_gelu_config` (FP8 only; for benchmarks)."""
    _check(x, fp8)
    m, inner = x.shape[0], x.shape[1] // 2
    y = torch.empty((m, inner), dtype=torch.float8_e4m3fn if fp8 else x.dtype, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m and inner:
        cfg = gated_gelu_config(inner, fp8, values_per_thread)
        if fp8:
            _gated_gelu_fp8_kernel[(triton.cdiv(m, cfg["ROWS"]),)](x, y, scale, m, inner, x.stride(0), y.stride(0),
                                                                   **cfg)  # fmt: skip
        else:
            grid = (triton.cdiv(m, cfg["ROWS"]), triton.cdiv(inner, cfg["BLOCK"]))
            _gated_gelu_kernel[grid](x, y, m, inner, x.stride(0), y.stride(0), **cfg)
    elif fp8:
        scale.fill_(1.0)
    return (y, scale) if fp8 else y


def gated_gelu_ref(x: torch.Tensor, fp8: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, the kernel's arithmetic with a correctly rounded erf (the interpreter's): ``gelu(g)`` in
    float32 rounded to x's dtype, times ``a`` in float32 rounded to x's dtype; ``fp8``: then
    ``quantize_rows_fp8_ref``."""
    _check(x, fp8)
    a, g = x.float().chunk(2, dim=-1)
    erf = torch.erf((g * torch.tensor(SQRT1_2, dtype=torch.float32)).double()).float()
    y = (a * (g * 0.5 * (1.0 + erf)).to(x.dtype).float()).to(x.dtype)
    return quantize_rows_fp8_ref(y) if fp8 else y
