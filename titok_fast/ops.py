"""The Triton kernels as ``torch.library`` custom ops, so ``torch.compile`` treats each launch as one opaque op
(with a shape-only fake implementation) and CUDA graphs capture it like any other kernel."""

from __future__ import annotations

import torch

from titok_fast.kernels._triton import launching as on_device_of  # (each op's launch: lock and GPU)
from titok_fast.kernels.fp8_quant import layer_norm_rows_fp8, quantize_rows_fp8
from titok_fast.kernels.fsq import FsqConstants, fsq_decoder_input, fsq_encoder_head
from titok_fast.kernels.gated_gelu import gated_gelu
from titok_fast.kernels.layer_norm import layer_norm
from titok_fast.kernels.mrope_attention import HEAD_DIM, mrope_attention


@torch.library.custom_op("titok_fast::mrope_attention", mutates_args=("qkv",))
def mrope_attention_op(
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor,
    q_norm_bias: torch.Tensor,
    k_norm_weight: torch.Tensor,
    k_norm_bias: torch.Tensor,
    cu_seqlens: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    q_cu_seqlens: torch.Tensor | None,
    q_starts: torch.Tensor | None,
    num_q_rows: int,
) -> torch.Tensor:
    """``mrope_attention`` with q/k normalised and rotated in place in ``qkv`` (a scratch buffer here)."""
    subset = {"q_cu_seqlens": q_cu_seqlens, "q_starts": q_starts, "num_q_rows": num_q_rows}
    if q_cu_seqlens is None:
        subset = {}
    with on_device_of(qkv):
        return mrope_attention(
            qkv, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, cu_seqlens, positions, cos, sin,
            num_q_heads, num_kv_heads, inplace=True, **subset,
        )  # fmt: skip


@mrope_attention_op.register_fake
def _(qkv, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, cu_seqlens, positions, cos, sin,
      num_q_heads, num_kv_heads, q_cu_seqlens, q_starts, num_q_rows):  # fmt: skip
    return qkv.new_empty(num_q_rows, num_q_heads * HEAD_DIM)


@torch.library.custom_op("titok_fast::fsq_encoder_head", mutates_args=())
def fsq_encoder_head_op(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    levels: torch.Tensor,
    half_l: torch.Tensor,
    offset: torch.Tensor,
    shift: torch.Tensor,
    half_width: torch.Tensor,
    basis: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    consts = FsqConstants(levels, half_l, offset, shift, half_width, basis)
    with on_device_of(x):
        return fsq_encoder_head(x, ln_weight, ln_bias, proj_weight, proj_bias, consts)


@fsq_encoder_head_op.register_fake
def _(x, ln_weight, ln_bias, proj_weight, proj_bias, levels, half_l, offset, shift, half_width, basis):
    rows, dims = x.shape[0], proj_weight.shape[0]
    return x.new_empty(rows, dims), x.new_empty(rows, dtype=torch.int32)


@torch.library.custom_op("titok_fast::fsq_decoder_input", mutates_args=())
def fsq_decoder_input_op(
    indices: torch.Tensor,
    table: torch.Tensor,
    mask_row: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_tokens: torch.Tensor,
    num_rows: int,
) -> torch.Tensor:
    with on_device_of(table):
        return fsq_decoder_input(indices, table, mask_row, cu_seqlens, cu_tokens, num_rows=num_rows)


@fsq_decoder_input_op.register_fake
def _(indices, table, mask_row, cu_seqlens, cu_tokens, num_rows):
    return table.new_empty(num_rows, table.shape[1])


@torch.library.custom_op("titok_fast::quantize_rows_fp8", mutates_args=())
def quantize_rows_fp8_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with on_device_of(x, fp8=True):
        return quantize_rows_fp8(x)


@quantize_rows_fp8_op.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[0], 1, dtype=torch.float32)


@torch.library.custom_op("titok_fast::layer_norm_rows_fp8", mutates_args=())
def layer_norm_rows_fp8_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    with on_device_of(x, fp8=True):
        return layer_norm_rows_fp8(x, weight, bias, eps)


@layer_norm_rows_fp8_op.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[0], 1, dtype=torch.float32)


@torch.library.custom_op("titok_fast::layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    with on_device_of(x):
        return layer_norm(x, weight, bias, eps)


@layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("titok_fast::gated_gelu", mutates_args=())
def gated_gelu_op(x: torch.Tensor) -> torch.Tensor:
    with on_device_of(x):
        return gated_gelu(x)


@gated_gelu_op.register_fake
def _(x):
    return x.new_empty(x.shape[0], x.shape[1] // 2)


@torch.library.custom_op("titok_fast::gated_gelu_fp8", mutates_args=())
def gated_gelu_fp8_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with on_device_of(x, fp8=True):
        return gated_gelu(x, fp8=True)


@gated_gelu_fp8_op.register_fake
def _(x):
    rows, inner = x.shape[0], x.shape[1] // 2
    return x.new_empty(rows, inner, dtype=torch.float8_e4m3fn), x.new_empty(rows, 1, dtype=torch.float32)


def attention(
    attn: torch.nn.Module,
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_cu_seqlens: torch.Tensor | None = None,
    q_starts: torch.Tensor | None = None,
    num_q_rows: int | None = None,
) -> torch.Tensor:
    """The fused attention of one layer (``attn``: its q/k norms and head counts); every row a query unless
    a query subset is given. qkv [rows, (Hq + 2 Hkv) * 64] is used as scratch."""
    rows = qkv.shape[0] if num_q_rows is None else num_q_rows
    return mrope_attention_op(
        qkv, attn.q_norm.weight, attn.q_norm.bias, attn.k_norm.weight, attn.k_norm.bias, cu_seqlens, positions,
        cos, sin, attn.q_heads, attn.kv_heads, q_cu_seqlens, q_starts, rows,
    )  # fmt: skip


def encoder_head(x, ln: torch.nn.LayerNorm, proj: torch.nn.Linear, consts: FsqConstants):
    """ln_post + proj_out + FSQ of latent rows [N, W] -> (codes [N, D], indices int32 [N])."""
    return fsq_encoder_head_op(
        x, ln.weight, ln.bias, proj.weight, proj.bias,
        consts.levels, consts.half_l, consts.offset, consts.shift, consts.half_width, consts.basis,
    )  # fmt: skip
