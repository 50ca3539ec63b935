"""LayerNorm of rows in one pass: each row read once, normalised whole in registers, written once in its dtype.

x [M, K] (bf16 / fp16 / fp32, last dim contiguous, K <= MAX_ROW) with the module's affine -> y [M, K] in x's
dtype: float32 statistics (the mean, then the variance about it) by correctly rounded division and square root,
the result rounded to x's dtype once, as ``torch.nn.LayerNorm`` computes it in float32 and rounds it. Its float32
statistics may round apart from PyTorch's (whose kernels sum in another order, and on a GPU take an approximate
reciprocal square root): then a value moves by one step of x's dtype. The model's pre-attention and pre-FFN norms
(``titok_fast.backends``); the same arithmetic feeds the FSQ head and the FP8 quantising norms
(``_common._layer_norm_rows``).
"""

from __future__ import annotations

import torch

from ._common import _layer_norm_rows
from ._triton import tl, triton

MAX_ROW = 16384  # values a row at most: each row is normalised whole, in one block


@triton.jit
def _layer_norm_kernel(
    x_ptr,  # [M, K], row stride stride_x, last dim contiguous
    w_ptr, b_ptr,  # [K]: the LayerNorm's affine
    y_ptr,  # [M, K] in x's dtype, row stride stride_y
    num_rows, K, stride_x, stride_y, eps,
    BLOCK_K: tl.constexpr,  # a power of two >= K
    ROWS: tl.constexpr,
):  # fmt: skip
    o_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    mask = (o_r < num_rows)[:, None] & m_k[None, :]
    o_r = o_r.to(tl.int64)
    b_x = tl.load(x_ptr + o_r[:, None] * stride_x + o_k[None, :], mask=mask, other=0.0).to(tl.float32)
    b_y = _layer_norm_rows(b_x, m_k, w_ptr, b_ptr, o_k, K, eps, tl.float32)  # (rounded once, by the store)
    tl.store(y_ptr + o_r[:, None] * stride_y + o_k[None, :], b_y.to(y_ptr.dtype.element_ty), mask=mask)


def layer_norm_config(k: int) -> dict:
    """Block shape for rows of ``k`` values: the whole row in one block, about 4096 values per program."""
    block_k = triton.next_power_of_2(k)
    return dict(BLOCK_K=block_k, ROWS=max(1, 4096 // block_k), num_warps=4 if block_k <= 1024 else 8)


def rows_problem(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> str | None:
    """What the row kernels cannot read, in one line, or None: x not [M, K] bf16/fp16/fp32 with a contiguous last
    dim, rows past MAX_ROW values, and a LayerNorm affine (when given) not of K contiguous values on x's device
    (the kernels read it as contiguous: a strided one was read wrong)."""
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"x must be [M, K] bf16/fp16/fp32 with a contiguous last dim; got {x.dtype} {list(x.shape)}"
    if x.shape[1] > MAX_ROW:
        return f"rows of at most {MAX_ROW} values are read in one block; got {x.shape[1]}"
    if weight is None and bias is None:
        return None
    k = x.shape[1]
    if weight is None or bias is None:  # (the kernels read both)
        return f"LayerNorm weight and bias of [{k}] values, both; got {'bias' if weight is None else 'weight'} alone"
    if weight.shape != (k,) or bias.shape != (k,):
        return f"LayerNorm weight and bias of [{k}] values; got {list(weight.shape)}, {list(bias.shape)}"
    for name, t in (("weight", weight), ("bias", bias)):
        if t.stride(-1) != 1 or t.device != x.device:
            return f"LayerNorm {name} must be contiguous and on {x.device}; got stride {t.stride()} on {t.device}"
    return None


def check_rows(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
    """Refuse, in one line, rows the row kernels cannot read (:func:`rows_problem`)."""
    if (problem := rows_problem(x, weight, bias)) is not None:
        raise ValueError(problem)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x [M, K] -> its rows LayerNormed, [M, K] contiguous in x's dtype; weight, bias [K]."""
    check_rows(x, weight, bias)
    m, k = x.shape
    y = torch.empty((m, k), dtype=x.dtype, device=x.device)
    if m == 0 or k == 0:
        return y
    cfg = layer_norm_config(k)
    _layer_norm_kernel[(triton.cdiv(m, cfg["ROWS"]),)](x, weight, bias, y, m, k, x.stride(0), y.stride(0), eps,
                                                         **cfg)  # fmt: skip
    return y


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Plain PyTorch: ``F.layer_norm`` in float32, rounded to x's dtype (what the module computes)."""
    y = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps)
    return y.to(x.dtype)
