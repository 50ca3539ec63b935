"""The FFN's gated GELU, ``a * gelu(g)`` over the two halves of each row, in one pass; optionally straight to the
FP8 codes and row scales that the next (FP8) Linear reads.

x [M, 2I] (bf16 / fp16 / fp32, last dim contiguous; ``a`` its first I columns, ``g`` the last I) -> y [M, I] in x's
dtype, as upstream's module computes it: ``gelu(g)`` in float32 (exact erf GELU, ``g * 0.5 * (1 + erf(g / sqrt
2))``) rounded to x's dtype, then the product in float32 rounded to x's dtype. In PyTorch that is two kernels and
five passes of I values a row (GELU reads g and writes it, the product reads both and writes y); here three, read
once and written once. With ``fp8=True`` the rounded y is quantised as ``kernels/fp8_quant.py`` does (its row's
peak to 448, correctly rounded divisions, nearest-even codes), so the product never goes to memory in 16 bits.

The erf is the device's: on a GPU Triton's libdevice ``erff``, in PyTorch's expression; in the Triton interpreter
Python's ``math.erf`` (correctly rounded), which :func:`gated_gelu_ref` also uses. PyTorch's own erf differs from
both: its CPU GELU has an erf of its own, and on an H100 (torch 2.11+cu130, Triton 3.6) Triton's libdevice erff
differed from the erff of PyTorch's CUDA build on 13% of float32 inputs, so that 0.5% of bf16 outputs were the
next bf16 value of PyTorch's GatedGelu (RESULTS.md; a ``gpu`` test holds it to one ulp).
"""

from __future__ import annotations

import torch

from ._triton import tl, triton
from .fp8_quant import MAX_ROW, _quantize_block, quantize_rows_fp8_ref

SQRT1_2 = 0.7071067811865476  # 1 / sqrt(2), float32 in the kernel as in PyTorch's (M_SQRT1_2 as its opmath type)
_SQRT1_2 = tl.constexpr(SQRT1_2)
MAX_INNER = MAX_ROW  # the FP8 form reduces a whole row in one block
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _gated_gelu_kernel(
    x_ptr,  # [M, 2 * inner], row stride stride_x, last dim contiguous
    y_ptr,  # [M, inner] in x's dtype, or float8e4nv codes (FP8), row stride stride_y
    scale_ptr,  # float32 [M] (FP8 only)
    num_rows, inner, stride_x, stride_y,
    BLOCK: tl.constexpr,  # columns per program (FP8: a power of two >= inner, the whole row)
    ROWS: tl.constexpr,
    FP8: tl.constexpr,
):  # fmt: skip
    o_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    o_c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m_r = o_r < num_rows
    mask = m_r[:, None] & (o_c < inner)[None, :]
    o_r = o_r.to(tl.int64)
    p_a = x_ptr + o_r[:, None] * stride_x + o_c[None, :]
    b_a = tl.load(p_a, mask=mask, other=0.0).to(tl.float32)
    b_g = tl.load(p_a + inner, mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    b_gelu = b_g * 0.5 * (1.0 + tl.math.erf(b_g * _SQRT1_2))
    b_y = (b_a * b_gelu.to(dtype).to(tl.float32)).to(dtype)
    if FP8:  # (one block of columns: the whole row) masked columns hold 0, no part of a row's peak
        _quantize_block(b_y.to(tl.float32), y_ptr, scale_ptr, o_r, m_r, o_c, mask, stride_y)
    else:
        tl.store(y_ptr + o_r[:, None] * stride_y + o_c[None, :], b_y, mask=mask)


def gated_gelu_config(inner: int, fp8: bool) -> dict:
    """Block shape for rows of ``inner`` outputs: about 4096 values a program; FP8 takes whole rows (their peak),
    else columns come in blocks of at most 1024 (a second grid axis)."""
    block = triton.next_power_of_2(max(inner, 1))
    if not fp8:
        block = min(block, 1024)
    return dict(BLOCK=block, ROWS=max(1, 4096 // block), num_warps=4 if block <= 1024 else 8, FP8=fp8)


def _check(x: torch.Tensor, fp8: bool) -> None:
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype not in DTYPES or x.shape[1] % 2:
        raise ValueError(f"x must be [M, 2 * I] bf16/fp16/fp32 with a contiguous last dim; got {x.dtype} "
                         f"{list(x.shape)}")  # fmt: skip
    if fp8 and x.shape[1] // 2 > MAX_INNER:
        raise ValueError(f"rows of at most {MAX_INNER} outputs are quantised in one block; got {x.shape[1] // 2}")


def gated_gelu(x: torch.Tensor, fp8: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [M, 2I] -> ``a * gelu(g)`` [M, I] in x's dtype; ``fp8=True``: its (codes float8_e4m3fn [M, I], scales
    float32 [M, 1]) instead. One launch; :func:`gated_gelu_ref`'s bytes."""
    _check(x, fp8)
    m, inner = x.shape[0], x.shape[1] // 2
    y = torch.empty((m, inner), dtype=torch.float8_e4m3fn if fp8 else x.dtype, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m and inner:
        cfg = gated_gelu_config(inner, fp8)
        grid = (triton.cdiv(m, cfg["ROWS"]), triton.cdiv(inner, cfg["BLOCK"]))
        _gated_gelu_kernel[grid](x, y, scale, m, inner, x.stride(0), y.stride(0), **cfg)
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
