"""FSQ (finite scalar quantisation) on the implicit codebook of a levels list (DESIGN.md section 7).

Two fused kernels:
- ``fsq_encoder_head``: encoder ``ln_post`` (LayerNorm, fp32 statistics) -> ``proj_out`` (W -> D, fp32
  accumulation, one row reduction per output) -> FSQ (tanh bound, round half to even, codes and int32
  indices), one pass over the latent rows. Intermediates are rounded to the model dtype exactly where
  upstream's bf16 modules round them (normalised x, then z).
- ``fsq_decoder_input``: the decoder's first rows: per sequence, ``table[index]`` for each latent token
  (``table`` = precomputed ``ln_pre(proj_in(code))`` of every code) followed by the normalised mask token for
  each patch row, written straight into the packed [R, W] buffer.

Limits: bf16/fp16/fp32; W <= 8192 (the encoder head holds a whole row in registers); 1 <= D <= 15 levels (MAX_LEVELS);
``cu_seqlens`` / ``cu_tokens`` are never read on the host.

Host-side helpers (importable without a GPU): ``FsqConstants`` and the plain-PyTorch references.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._common import _find_segment, _layer_norm_rows
from ._triton import libdevice, tl, triton


@dataclass(frozen=True)
class FsqConstants:
    """Per-dimension float32/int constants of FSQ, computed exactly as upstream does."""

    levels: torch.Tensor  # int32 [D]
    half_l: torch.Tensor  # float32 [D]: (L - 1) * (1 + 1e-3) / 2
    offset: torch.Tensor  # float32 [D]: 0.5 for even L, else 0
    shift: torch.Tensor  # float32 [D]: atanh(offset / half_l)
    half_width: torch.Tensor  # int32 [D]: L // 2
    basis: torch.Tensor  # int32 [D]: cumprod([1, L_0, L_1, ...])[:D]

    @classmethod
    def of(cls, levels: Sequence[int], device: torch.device | str = "cpu") -> FsqConstants:
        lv = torch.tensor(list(levels), dtype=torch.int32, device=device)
        half_l = (lv - 1) * (1 + 1e-3) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0).to(device=device, dtype=torch.float32)
        shift = (offset / half_l).atanh()
        basis = torch.tensor([math.prod(levels[:d]) for d in range(len(levels))], dtype=torch.int32, device=device)
        return cls(lv, half_l.float(), offset, shift.float(), lv // 2, basis)

    @property
    def codebook_size(self) -> int:
        return int(torch.prod(self.levels.long()))

    def to(self, device: torch.device | str) -> FsqConstants:
        return FsqConstants(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def fsq_quantize_ref(z: torch.Tensor, consts: FsqConstants) -> tuple[torch.Tensor, torch.Tensor]:
    """z: [N, D] any float dtype -> (codes float32 [N, D] in [-1, 1], indices int32 [N]).

    Runs in float32: bound with tanh, round half to even, then an exact integer index; -1 for a row holding NaN.
    """
    bounded = torch.tanh(z.float() + consts.shift) * consts.half_l - consts.offset
    q = torch.round(bounded)
    codes = q / consts.half_width
    indices = ((q.to(torch.int32) + consts.half_width) * consts.basis).sum(-1, dtype=torch.int32)
    return codes, torch.where(q.isnan().any(-1), -1, indices)


def fsq_indices_to_codes_ref(indices: torch.Tensor, consts: FsqConstants) -> torch.Tensor:
    """indices: [N] integer -> codes float32 [N, D]."""
    level = (indices.long()[:, None] // consts.basis) % consts.levels
    return (level - consts.half_width).float() / consts.half_width


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
FSQ_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_LEVELS = 15  # as a config may have (titok_fast.config.MAX_FSQ_LEVELS: codebooks of at most 2**15 codes)
MAX_HEAD_WIDTH = 8192


@triton.jit
def _tanh(x, PRECISE: tl.constexpr):
    """tanh: libdevice's (as torch's tanhf, within 2 ulp) when compiled; from exp under the interpreter, which
    has no libdevice (absolute error ~1e-7)."""
    if PRECISE:
        return libdevice.tanh(x)
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _round_half_even(x):
    """torch.round: nearest integer, ties to even. Exact: floor(x) and x - floor(x) are exact in fp32."""
    r = tl.floor(x)
    frac = x - r
    r_is_odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & r_is_odd), r + 1.0, r)


@triton.jit
def _fsq_encoder_head_kernel(
    x_ptr,  # [N, W] row stride stride_x, last dim contiguous
    ln_w_ptr, ln_b_ptr,  # [W]
    proj_w_ptr,  # [D, W] row stride stride_w, last dim contiguous
    proj_b_ptr,  # [D]
    half_l_ptr, offset_ptr, shift_ptr,  # fp32 [D]
    half_width_ptr, basis_ptr,  # int32 [D]
    codes_ptr,  # [N, D] contiguous, x's dtype
    indices_ptr,  # int32 [N]
    num_rows, width, stride_x, stride_w, eps,
    DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
    PRECISE: tl.constexpr,  # compiled for a GPU: libdevice tanh (the interpreter has none)
):
    o_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    m_r = o_r < num_rows
    o_w = tl.arange(0, BLOCK_W)
    m_w = o_w < width
    m_x = m_r[:, None] & m_w[None, :]
    row = o_r.to(tl.int64)  # (row * DIM, like row * stride_x, passes 2**31 from 429M rows of 5 levels)
    b_x = tl.load(x_ptr + row[:, None] * stride_x + o_w[None, :], mask=m_x, other=0.0).to(tl.float32)
    b_xn = _layer_norm_rows(b_x, m_w, ln_w_ptr, ln_b_ptr, o_w, width, eps, x_ptr.dtype.element_ty)

    index = tl.zeros([ROWS], dtype=tl.int32)
    nan = tl.zeros([ROWS], dtype=tl.int1)  # a row holding NaN gets index -1 (a GPU's conversion makes NaN 0)
    for d in tl.static_range(DIM):
        b_pw = tl.load(proj_w_ptr + d * stride_w + o_w, mask=m_w, other=0.0).to(tl.float32)
        z = tl.sum(b_xn * b_pw[None, :], 1) + tl.load(proj_b_ptr + d).to(tl.float32)
        z = z.to(x_ptr.dtype.element_ty).to(tl.float32)
        bounded = _tanh(z + tl.load(shift_ptr + d), PRECISE) * tl.load(half_l_ptr + d) - tl.load(offset_ptr + d)
        level = _round_half_even(bounded)
        half_width = tl.load(half_width_ptr + d)
        code = tl.div_rn(level, half_width.to(tl.float32))  # exactly torch's q / half_width
        tl.store(codes_ptr + row * DIM + d, code.to(codes_ptr.dtype.element_ty), mask=m_r)
        index += (level.to(tl.int32) + half_width) * tl.load(basis_ptr + d)
        nan = nan | (z != z)
    tl.store(indices_ptr + o_r, tl.where(nan, -1, index), mask=m_r)


@triton.jit
def _fsq_decoder_input_kernel(
    indices_ptr,  # int32/int64 [N] codebook index of every latent token, packed
    table_ptr,  # [K, W] row stride stride_t, last dim contiguous
    mask_row_ptr,  # [W]
    cu_seqlens_ptr,  # int32 [B + 1] packed rows per sequence
    cu_tokens_ptr,  # int32 [B + 1] latent tokens per sequence
    out_ptr,  # [R, W] row stride stride_o, last dim contiguous
    num_rows, num_seqs, search_iters, width, stride_t, stride_o,
    ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
):
    o_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    m_r = (o_r < num_rows) & (o_r >= tl.load(cu_seqlens_ptr)) & (o_r < tl.load(cu_seqlens_ptr + num_seqs))
    seq = _find_segment(cu_seqlens_ptr, num_seqs, o_r, search_iters, 1, 0)
    token0 = tl.load(cu_tokens_ptr + seq)
    j = o_r - tl.load(cu_seqlens_ptr + seq)
    m_token = m_r & (j < tl.load(cu_tokens_ptr + seq + 1) - token0)
    code = tl.load(indices_ptr + token0 + j, mask=m_token, other=0).to(tl.int64)
    p_out = out_ptr + o_r.to(tl.int64)[:, None] * stride_o
    for w0 in range(0, width, BLOCK_W):
        o_w = w0 + tl.arange(0, BLOCK_W)
        m_w = o_w < width
        b_t = tl.load(table_ptr + code[:, None] * stride_t + o_w[None, :], mask=m_token[:, None] & m_w[None, :])
        b_m = tl.load(mask_row_ptr + o_w, mask=m_w)
        b_o = tl.where(m_token[:, None], b_t, b_m[None, :])
        tl.store(p_out + o_w[None, :], b_o, mask=m_r[:, None] & m_w[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def encoder_head_config(width: int) -> dict:
    """Rows per program so that a program holds ~4096 fp32 values of x (W <= 2048 -> >= 2 rows, 4 warps).

    FMA contraction is off so that ``tanh * half_l - offset`` rounds as torch rounds it (two roundings).
    """
    block_w = triton.next_power_of_2(width)
    return dict(
        BLOCK_W=block_w, ROWS=max(1, 4096 // block_w), num_warps=4 if block_w <= 2048 else 8, enable_fp_fusion=False
    )


DECODER_INPUT_CONFIG = dict(ROWS=8, BLOCK_W=256, num_warps=4)


def _check_param(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape or t.device != device or t.stride(-1) != 1:
        raise ValueError(f"{name} has shape {list(t.shape)} on {t.device}; expected {list(shape)} on {device}")


def fsq_encoder_head(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    consts: FsqConstants,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm -> Linear(W -> D) -> FSQ in one kernel.

    x: [N, W] bf16/fp16/fp32 latent rows (last dim contiguous); ln_weight, ln_bias: [W]; proj_weight: [D, W];
    proj_bias: [D]; consts: FSQ constants of D levels on x's device.
    Returns codes [N, D] in x's dtype (values q / half_width) and indices int32 [N], as ``fsq_encoder_head_ref``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError("x must be a 2-D tensor [N, W] with a contiguous last dim")
    if x.dtype not in FSQ_DTYPES:
        raise TypeError(f"x dtype is {x.dtype}; expected one of {FSQ_DTYPES}")
    num_rows, width = x.shape
    dim = consts.levels.numel()
    if not 1 <= dim <= MAX_LEVELS or not 1 <= width <= MAX_HEAD_WIDTH:
        raise ValueError(f"{dim} levels and width {width}: need 1..{MAX_LEVELS} levels, width 1..{MAX_HEAD_WIDTH}")
    for name, t, shape in (
        ("ln_weight", ln_weight, (width,)), ("ln_bias", ln_bias, (width,)),
        ("proj_weight", proj_weight, (dim, width)), ("proj_bias", proj_bias, (dim,)),
    ):
        _check_param(name, t, shape, x.device)
    if consts.levels.device != x.device:
        raise ValueError(f"consts live on {consts.levels.device}; x on {x.device} (use consts.to(device))")
    codes = torch.empty((num_rows, dim), dtype=x.dtype, device=x.device)
    indices = torch.empty(num_rows, dtype=torch.int32, device=x.device)
    if num_rows == 0:
        return codes, indices
    cfg = encoder_head_config(width)
    _fsq_encoder_head_kernel[(triton.cdiv(num_rows, cfg["ROWS"]),)](
        x, ln_weight, ln_bias, proj_weight, proj_bias, consts.half_l, consts.offset, consts.shift,
        consts.half_width, consts.basis, codes, indices, num_rows, width, x.stride(0), proj_weight.stride(0), eps,
        DIM=dim, PRECISE=x.is_cuda, **cfg,
    )
    return codes, indices


def fsq_decoder_input(
    indices: torch.Tensor,
    table: torch.Tensor,
    mask_row: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_tokens: torch.Tensor,
    *,
    num_rows: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather the decoder's input rows of packed sequences.

    indices: [N] int32/int64 code indices of all videos packed; table: [K, W] (row of code k); mask_row: [W];
    cu_seqlens: int32 [B + 1] packed rows; cu_tokens: int32 [B + 1] latent tokens (n_i <= S_i).
    Sequence i fills rows cu_seqlens[i] .. cu_seqlens[i + 1]: first table[indices[cu_tokens[i] + j]] for its
    n_i tokens, then mask_row. out: [R, W] in table's dtype (or give num_rows = R to allocate it); rows past
    cu_seqlens[-1] are left untouched. Returns out.
    """
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.stride(-1) != 1:
        raise ValueError("table must be a 2-D tensor [K, W] with a contiguous last dim")
    device, dtype, width = table.device, table.dtype, table.shape[1]
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise TypeError("indices must be a 1-D int32/int64 tensor")
    indices = indices.contiguous()  # the kernel reads element i at offset i
    _check_param("mask_row", mask_row, (width,), device)
    if mask_row.dtype != dtype:
        raise TypeError(f"mask_row dtype is {mask_row.dtype}; table is {dtype}")
    for name, t in (("indices", indices), ("cu_seqlens", cu_seqlens), ("cu_tokens", cu_tokens)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}; table on {device}")
    num_seqs = cu_seqlens.numel() - 1
    for name, t in (("cu_seqlens", cu_seqlens), ("cu_tokens", cu_tokens)):
        if t.dtype != torch.int32 or t.shape != (num_seqs + 1,) or not t.is_contiguous():
            raise ValueError(f"{name} is {t.dtype} {list(t.shape)}; expected contiguous int32 [B + 1]")
    if out is None:
        if num_rows is None:
            raise ValueError("give out= or num_rows= (the host-side row count R)")
        out = torch.empty((num_rows, width), dtype=dtype, device=device)
    elif out.dim() != 2 or out.shape[1] != width or out.dtype != dtype or out.device != device or out.stride(1) != 1:
        raise ValueError(f"out is {out.dtype} {list(out.shape)}; expected {dtype} [R, {width}] on {device}")
    if out.shape[0] == 0 or num_seqs < 1:
        return out
    cfg = DECODER_INPUT_CONFIG
    _fsq_decoder_input_kernel[(triton.cdiv(out.shape[0], cfg["ROWS"]),)](
        indices, table, mask_row, cu_seqlens, cu_tokens, out, out.shape[0], num_seqs, num_seqs.bit_length(),
        width, table.stride(0), out.stride(0), **cfg,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------
def fsq_encoder_head_ref(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    consts: FsqConstants,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch ``fsq_encoder_head``: LayerNorm in fp32 rounded to x's dtype, Linear accumulated in
    float64 rounded to x's dtype, then ``fsq_quantize_ref``. Returns (codes [N, D] x.dtype, indices int32 [N])."""
    xn = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], ln_weight.float(), ln_bias.float(), eps)
    z = (xn.to(x.dtype).double() @ proj_weight.double().T + proj_bias.double()).to(x.dtype)
    codes, indices = fsq_quantize_ref(z, consts)
    return codes.to(x.dtype), indices


def fsq_decoder_input_ref(
    indices: torch.Tensor,
    table: torch.Tensor,
    mask_row: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_tokens: torch.Tensor,
    *,
    num_rows: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch ``fsq_decoder_input`` (same arguments and result)."""
    if out is None:
        out = torch.zeros((num_rows, table.shape[1]), dtype=table.dtype, device=table.device)
    cu, tok = cu_seqlens.tolist(), cu_tokens.tolist()
    for i in range(len(cu) - 1):
        n = tok[i + 1] - tok[i]
        out[cu[i] : cu[i] + n] = table[indices[tok[i] : tok[i + 1]].long()]
        out[cu[i] + n : cu[i + 1]] = mask_row
    return out
