"""Row-wise float8 e4m3 quantisation of activations, for the FP8 linear layers (``titok_fast.fp8``), in one pass.

x [M, K] (bf16 / fp16 / fp32, last dim contiguous) -> (x_q float8_e4m3fn [M, K], scale float32 [M, 1]) with
``scale = amax(|row|) / 448`` (1 for an all-zero row) and ``x_q = clamp(x * (448 / amax), -448, 448)`` rounded to
the nearest e4m3 value, ties to even: exactly :func:`quantize_rows_fp8_ref`. A row's two divisions are correctly
rounded (``tl.div_rn``, as PyTorch's float32 division), each value's product is (a multiply, never fused into an
add), and the cast rounds to nearest even, as PyTorch's does. Multiplying by the row's reciprocal rather than
dividing each value by its scale (as Transformer Engine and torchao scale too) saves a correctly rounded
division a value, which made the FP8 gated GELU kernel bound by instructions rather than by memory (sm_90 code:
some ten instructions and a slow-path branch each). The two forms differ by one e4m3 step where the exact
quotient lies on a tie between two codes (neither is nearer): a few hundred codes a million in bf16 rows, whose
short values make such ties common, some 40 in fp16, well under one in fp32.

In PyTorch the same takes six passes over the activations, three of them writing float32 copies; here each row
is read once and written once as one byte per value.
"""

from __future__ import annotations

import torch

from ._common import _layer_norm_rows
from ._triton import tl, triton
from .layer_norm import check_rows
from .layer_norm import layer_norm_config as quantize_rows_config  # (the whole row in one block)

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
_FP8_MAX = tl.constexpr(FP8_MAX)  # the same, for the kernel
# the least peak a row is scaled by: 448 / 2^-119 = 1.75 * 2^127 is float32's, where 448 / a smaller peak would
# overflow. A row of smaller values (all below 1.5e-36) keeps scale and codes consistent (x ~= x_q * scale), its
# peak's code below 448.
TINY_PEAK = 2.0**-119
_TINY_PEAK = tl.constexpr(TINY_PEAK)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,  # [M, K], row stride stride_x, last dim contiguous
    q_ptr,  # float8e4nv [M, K], row stride stride_q
    scale_ptr,  # float32 [M]
    num_rows, K, stride_x, stride_q,
    BLOCK_K: tl.constexpr,  # a power of two >= K: each row is reduced whole
    ROWS: tl.constexpr,
):
    o_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    o_k = tl.arange(0, BLOCK_K)
    m_r = o_r < num_rows
    mask = m_r[:, None] & (o_k < K)[None, :]
    o_r = o_r.to(tl.int64)
    b_x = tl.load(x_ptr + o_r[:, None] * stride_x + o_k[None, :], mask=mask, other=0.0).to(tl.float32)
    _quantize_block(b_x, q_ptr, scale_ptr, o_r, m_r, o_k, mask, stride_q)


@triton.jit
def _quantize_block(b_y, q_ptr, scale_ptr, o_r, m_r, o_k, mask, stride_q):
    """Rows ``b_y`` (fp32 [ROWS, BLOCK], masked values 0) -> codes at q_ptr, scales at scale_ptr: as
    :func:`quantize_rows_fp8_ref`."""
    amax = tl.max(tl.abs(b_y), 1)
    scale, inverse = _row_scales(amax)
    tl.store(scale_ptr + o_r, scale, mask=m_r)
    _store_codes(b_y, inverse, q_ptr, o_r, o_k, mask, stride_q)


@triton.jit
def _row_scales(amax):
    """Rows' peaks (NaN left out, >= 0) -> (scale, its inverse): ``peak / 448`` and ``448 / peak`` correctly
    rounded, with ``peak = max(amax, TINY_PEAK)``; both 1 for an all-zero row."""
    peak = tl.maximum(amax, _TINY_PEAK)
    scale = tl.where(amax > 0, tl.div_rn(peak, _FP8_MAX), 1.0)
    inverse = tl.where(amax > 0, tl.div_rn(_FP8_MAX, peak), 1.0)
    return scale, inverse


@triton.jit
def _store_codes(b_y, inverse, q_ptr, o_r, o_k, mask, stride_q):
    """Rows ``b_y`` (fp32 [ROWS, BLOCK]) times their ``inverse`` scale [ROWS], clamped to e4m3's range (NaN kept),
    stored as codes at q_ptr."""
    b_q = b_y * inverse[:, None]
    b_q = tl.minimum(tl.maximum(b_q, -_FP8_MAX, propagate_nan=tl.PropagateNan.ALL), _FP8_MAX,
                     propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
    tl.store(q_ptr + o_r[:, None] * stride_q + o_k[None, :], b_q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_rows_kernel(
    x_ptr,  # [M, K], row stride stride_x, last dim contiguous
    w_ptr, b_ptr,  # [K]: the LayerNorm's affine
    q_ptr,  # float8e4nv [M, K], row stride stride_q
    scale_ptr,  # float32 [M]
    num_rows, K, stride_x, stride_q, eps,
    BLOCK_K: tl.constexpr,  # a power of two >= K: each row is normalised and reduced whole
    ROWS: tl.constexpr,
):  # fmt: skip
    o_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    o_k = tl.arange(0, BLOCK_K)
    m_r = o_r < num_rows
    m_k = o_k < K
    mask = m_r[:, None] & m_k[None, :]
    o_r = o_r.to(tl.int64)
    b_x = tl.load(x_ptr + o_r[:, None] * stride_x + o_k[None, :], mask=mask, other=0.0).to(tl.float32)
    b_y = _layer_norm_rows(b_x, m_k, w_ptr, b_ptr, o_k, K, eps, x_ptr.dtype.element_ty)  # (the FSQ head's)
    _quantize_block(b_y, q_ptr, scale_ptr, o_r, m_r, o_k, mask, stride_q)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (last dim contiguous, K <= MAX_ROW) -> (x_q float8_e4m3fn [M, K], scale float32 [M, 1])."""
    check_rows(x)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, scale.fill_(1.0)
    cfg = quantize_rows_config(k)
    _quantize_rows_kernel[(triton.cdiv(m, cfg["ROWS"]),)](x, q, scale, m, k, x.stride(0), q.stride(0), **cfg)
    return q, scale


def layer_norm_rows_fp8(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows_fp8`` of ``x``'s rows LayerNormed (float32 statistics, the result rounded to x's dtype, as
    the module rounds it) in one pass: the normalised rows never go to memory in 16 bits. x [M, K] as
    :func:`quantize_rows_fp8` takes it; weight, bias [K]."""
    check_rows(x, weight, bias)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, scale.fill_(1.0)
    cfg = quantize_rows_config(k)
    _layer_norm_rows_kernel[(triton.cdiv(m, cfg["ROWS"]),)](x, weight, bias, q, scale, m, k, x.stride(0),
                                                              q.stride(0), eps, **cfg)  # fmt: skip
    return q, scale


def layer_norm_rows_fp8_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: ``quantize_rows_fp8_ref`` of ``F.layer_norm(x)`` (float32, rounded to x's dtype)."""
    y = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)
    return quantize_rows_fp8_ref(y)


def quantize_rows_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: x [M, K] -> (x_q float8_e4m3fn [M, K], scale float32 [M, 1]) with x ~= x_q * scale; each
    row's largest magnitude maps to 448 (its values are multiplied by ``448 / amax``; a row whose values are all
    below TINY_PEAK by ``448 / TINY_PEAK``), an all-zero row gets scale 1 (its codes are zeros). A NaN is left out
    of its row's largest magnitude, as the kernel's max leaves it out."""
    magnitude = x.abs()
    amax = torch.where(magnitude.isnan(), 0, magnitude).amax(dim=1, keepdim=True).float()
    peak, ones = amax.clamp(min=TINY_PEAK), torch.ones_like(amax)
    scale = torch.where(amax > 0, peak / FP8_MAX, ones)
    inverse = torch.where(amax > 0, torch.full_like(peak, FP8_MAX) / peak, ones)  # (not ``FP8_MAX / peak``, which
    # PyTorch computes as peak's reciprocal times 448: not correctly rounded)
    return (x.float() * inverse).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
