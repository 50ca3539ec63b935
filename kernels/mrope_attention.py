"""Fused q/k LayerNorm + M-RoPE + variable-length grouped-query attention (DESIGN.md sections 5-6).

Fused: per-head LayerNorm of q and k, their M-RoPE rotation, and non-causal softmax attention within each
packed sequence (scale 1/8, grouped-query heads), written head-major as ``[rows, Hq * 64]`` for ``out_proj``.
Two launches: ``_qk_norm_rope_kernel`` normalises and rotates every q and k head once (a program per block of
rows and group of heads), then
``_attention_kernel`` (FlashAttention-2 style, fp32 online softmax in base 2) runs one program per block of
query rows and KV head, with the ``G = Hq / Hkv`` query heads of that KV head stacked along the M dimension of
one ``tl.dot`` so that each K/V tile load serves the whole group.

Limits: head_dim 64; bf16/fp16 (fp32 works too: exact-fp32 dots, slow) on CUDA, fp32/fp16 under
TRITON_INTERPRET=1; ``Hq % Hkv == 0`` with ``Hq / Hkv <= 64``; any number of sequences of any length (the
grid comes from host ints only, never from reading ``cu_seqlens``); ``qkv`` may have more rows than
``cu_seqlens[-1]`` (a fixed token budget): those rows are never read as queries or keys.

Host-side helpers (importable without a GPU):
- ``mrope_tables``: cos/sin of every (position, rotary pair), computed in float64, stored float32.
- ``packed_positions``: the (t, h, w) position of every row of a packed batch (DESIGN.md section 6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._common import _find_segment
from ._triton import TensorDescriptor, tl, triton

HEAD_DIM = 64
AXIS_PAIRS = (12, 10, 10)  # rotary pairs driven by the t, h and w position (axis dims 24, 20, 20)


def pair_frequencies() -> torch.Tensor:
    """float64 [32]: f_p = (pi/2) * 10000 ** (p / (P-1)) for each axis' P pairs, t pairs first.

    Computed exactly as upstream does (``10000 ** linspace(0, 1, P) * pi / 2`` in float64), so the tables match
    upstream's to the last bit (``p / (P-1)`` differs from linspace by one ulp for a few pairs)."""
    return torch.cat([10000.0 ** torch.linspace(0.0, 1.0, p, dtype=torch.float64) * math.pi / 2.0 for p in AXIS_PAIRS])


def pair_axis() -> torch.Tensor:
    """int64 [32]: which position axis (0=t, 1=h, 2=w) drives each rotary pair."""
    return torch.repeat_interleave(torch.arange(3), torch.tensor(AXIS_PAIRS))


def mrope_tables(num_positions: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: float32 [num_positions, 32], entry [pos, p] = cos/sin(pos * f_p) computed in float64.

    Angles reach ~1.6e7 rad, where float32 has no phase precision: never derive them in float32.
    """
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * pair_frequencies()[None, :]
    return angles.cos().float().to(device), angles.sin().float().to(device)


def packed_positions(
    token_counts: Sequence[int], grids: Sequence[Sequence[int]], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """int32 [sum(n_i + G_i), 3]: latent token j -> (j, j, j); patch (a, b, c) -> (a + n, b + n, c + n).

    ``grids`` are patch grids ``(gt, gh, gw)``; rows are packed per video, latents first, patches t-major.
    """
    parts = []
    for n, (gt, gh, gw) in zip(token_counts, grids, strict=True):
        latent = torch.arange(n, dtype=torch.int32)[:, None].expand(n, 3)
        grid = torch.stack(
            torch.meshgrid(
                torch.arange(gt, dtype=torch.int32),
                torch.arange(gh, dtype=torch.int32),
                torch.arange(gw, dtype=torch.int32),
                indexing="ij",
            ),
            dim=-1,
        ).reshape(-1, 3)
        parts += [latent, grid + n]
    return torch.cat(parts).to(device)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
LOG2E = 1.4426950408889634


@triton.jit
def _norm_rotate(b_x, b_w, b_b, b_cos, b_sin, eps, DTYPE: tl.constexpr, ROWS: tl.constexpr):
    """b_x [ROWS, 64] (any float dtype) -> LayerNorm per row (fp32, rounded to DTYPE as upstream does), then the
    adjacent pairs rotated, (x[2p] + i x[2p+1]) * (cos + i sin), in fp32: [ROWS, 64] in DTYPE.
    b_w/b_b: fp32 [64]; b_cos/b_sin: fp32 [ROWS, 32]."""
    b_x = b_x.to(tl.float32)
    mean = tl.sum(b_x, 1) / 64
    b_xc = b_x - mean[:, None]
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(b_xc * b_xc, 1) / 64 + eps))  # correctly rounded, as torch
    b_y = b_xc * rstd[:, None] * b_w[None, :] + b_b[None, :]
    b_y = b_y.to(DTYPE).to(tl.float32)
    b_even, b_odd = tl.split(tl.reshape(b_y, (ROWS, 32, 2)))
    b_rot = tl.join(b_even * b_cos - b_odd * b_sin, b_even * b_sin + b_odd * b_cos)
    return tl.reshape(b_rot, (ROWS, 64)).to(DTYPE)


@triton.jit
def _rotations(pos_ptr, stride_pos, cos_ptr, sin_ptr, o_r, m_r):
    """cos/sin fp32 [len(o_r), 32] of packed rows o_r (int64; masked rows get 0): pair p is driven by axis 0 (t)
    for p < 12, 1 (h) for p < 22, else 2 (w)."""
    o_p = tl.arange(0, 32)
    o_axis = (o_p >= 12).to(tl.int32) + (o_p >= 22).to(tl.int32)
    b_pos = tl.load(pos_ptr + o_r[:, None] * stride_pos + o_axis[None, :], mask=m_r[:, None], other=0)
    b_cos = tl.load(cos_ptr + b_pos * 32 + o_p[None, :], mask=m_r[:, None], other=0.0)
    b_sin = tl.load(sin_ptr + b_pos * 32 + o_p[None, :], mask=m_r[:, None], other=0.0)
    return b_cos, b_sin


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr,  # [R, (Hq + 2 Hkv) * 64], row stride stride_in, last dim contiguous
    qk_ptr,  # [R, (Hq + Hkv) * 64] output (may be qkv_ptr itself), row stride stride_out
    q_w_ptr, q_b_ptr, k_w_ptr, k_b_ptr,  # [64] each
    pos_ptr,  # int32 [R, 3], row stride stride_pos
    cos_ptr, sin_ptr,  # fp32 [P, 32] contiguous
    cu_seqlens_ptr,  # int32 [B + 1]
    num_rows, num_seqs, num_q_heads, num_kv_heads, stride_in, stride_out, stride_pos, eps,
    ROWS: tl.constexpr,
    HEADS: tl.constexpr,  # heads per program: program (i, g) takes rows block i, head group g
    Q_HEADS: tl.constexpr,  # False: the k heads only (the attention kernel normalises q as it loads it)
):
    """Head groups: the q heads in groups of HEADS (with Q_HEADS), then the k heads in groups of HEADS. A program
    loads its group's heads of its rows as one [HEADS * ROWS, 64] tile (line j: head j // ROWS, row j % ROWS;
    heads past its kind's last masked), so all of its loads are in flight at once, then normalises, rotates and
    stores it (qk may alias qkv: a store before a later head's load would keep the loads apart)."""
    o_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    start, stop = tl.load(cu_seqlens_ptr), tl.load(cu_seqlens_ptr + num_seqs)
    m_r = (o_r < num_rows) & (o_r >= start) & (o_r < stop)
    b_cos, b_sin = _rotations(pos_ptr, stride_pos, cos_ptr, sin_ptr, o_r.to(tl.int64), m_r)
    b_cos = tl.reshape(tl.broadcast_to(b_cos[None, :, :], (HEADS, ROWS, 32)), (HEADS * ROWS, 32))
    b_sin = tl.reshape(tl.broadcast_to(b_sin[None, :, :], (HEADS, ROWS, 32)), (HEADS * ROWS, 32))

    group = tl.program_id(1)
    q_groups = tl.cdiv(num_q_heads, HEADS) if Q_HEADS else 0
    o_d = tl.arange(0, 64)
    if group < q_groups:
        first, end = group * HEADS, num_q_heads
        b_w = tl.load(q_w_ptr + o_d).to(tl.float32)
        b_b = tl.load(q_b_ptr + o_d).to(tl.float32)
    else:
        first, end = num_q_heads + (group - q_groups) * HEADS, num_q_heads + num_kv_heads
        b_w = tl.load(k_w_ptr + o_d).to(tl.float32)
        b_b = tl.load(k_b_ptr + o_d).to(tl.float32)
    o_line = tl.arange(0, HEADS * ROWS)
    o_h = first + o_line // ROWS
    o_lr = tl.program_id(0) * ROWS + o_line % ROWS
    m = (o_lr < num_rows) & (o_lr >= start) & (o_lr < stop) & (o_h < end)
    o_lr = o_lr.to(tl.int64)
    b_x = tl.load(qkv_ptr + o_lr[:, None] * stride_in + o_h[:, None] * 64 + o_d[None, :], mask=m[:, None], other=0.0)
    b_rot = _norm_rotate(b_x, b_w, b_b, b_cos, b_sin, eps, qk_ptr.dtype.element_ty, HEADS * ROWS)
    tl.store(qk_ptr + o_lr[:, None] * stride_out + o_h[:, None] * 64 + o_d[None, :], b_rot, mask=m[:, None])


@triton.jit
def _kv_block_scores(
    b_q, k_src, stride_k, row0, col, start, kv_len,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    """Scores of keys [start, start + BLOCK_N) (unscaled): the first half of :func:`_attend_kv_block`."""
    o_n = start + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, 64)
    m_n = o_n < kv_len
    o_n = o_n.to(tl.int64)
    if TMA:
        b_k = k_src.load([row0 + start, col])
    elif MASKED:
        b_k = tl.load(k_src + o_n[:, None] * stride_k + o_d[None, :], mask=m_n[:, None], other=0.0)
    else:
        b_k = tl.load(k_src + o_n[:, None] * stride_k + o_d[None, :])
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
    if MASKED:
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    return b_s


@triton.jit
def _softmax_values(
    b_s, acc, m_i, l_i, v_src, stride_v, row0, col, start, kv_len, qk_scale,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    """The online-softmax step of keys [start, start + BLOCK_N) given their scores: the second half."""
    o_n = start + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, 64)
    m_n = o_n < kv_len
    o_n = o_n.to(tl.int64)
    # the scale is folded into the exponent: one FMA per score (s * scale - m) before the exp2, no separate multiply
    m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)
    b_p = tl.exp2(b_s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    acc = acc * alpha[:, None]
    if TMA:
        b_v = v_src.load([row0 + start, col])
        if MASKED:
            b_v = tl.where(m_n[:, None], b_v, 0.0)
    elif MASKED:
        b_v = tl.load(v_src + o_n[:, None] * stride_v + o_d[None, :], mask=m_n[:, None], other=0.0)
    else:
        b_v = tl.load(v_src + o_n[:, None] * stride_v + o_d[None, :])
    acc = tl.dot(b_p.to(b_v.dtype), b_v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_kv_block(
    b_q, acc, m_i, l_i, k_src, v_src, stride_k, stride_v, row0, col, start, kv_len, qk_scale,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    """One online-softmax step over keys [start, start + BLOCK_N) of the sequence (MASKED: the ragged tail).

    b_q: [BLOCK_M, 64]; acc: fp32 [BLOCK_M, 64]; m_i, l_i: fp32 [BLOCK_M] running max (base 2) and sum;
    k_src/v_src: pointers to column 0 of the head in the sequence's first row, or (TMA) tensor descriptors of
    all rows and KV heads, the head's tile at [row0 + key, col]. A TMA tile past the sequence holds other rows
    (another sequence's, or padding that may be NaN): their scores are masked and their V rows zeroed.
    """
    b_s = _kv_block_scores(b_q, k_src, stride_k, row0, col, start, kv_len, BLOCK_N, MASKED, PRECISION, TMA)
    return _softmax_values(b_s, acc, m_i, l_i, v_src, stride_v, row0, col, start, kv_len, qk_scale, BLOCK_N,
                           MASKED, PRECISION, TMA)  # fmt: skip


@triton.jit
def _attention_kernel(
    q_ptr,  # [R, >= Hq * 64] rotated q, head h at column h * 64, row stride stride_q
    k_ptr,  # [R, >= Hkv * 64] rotated k, head g at column g * 64, row stride stride_k
    v_ptr,  # [R, >= Hkv * 64] v, row stride stride_v
    o_ptr,  # [num_q_rows, Hq * 64] output, row stride stride_o
    cu_seqlens_ptr,  # int32 [B + 1] packed rows of each sequence
    q_cu_ptr,  # int32 [B + 1] cumulative query rows (cu_seqlens itself when every row is a query)
    q_starts_ptr,  # int32 [B] first query row inside each sequence (unused unless HAS_Q_STARTS)
    k_desc, v_desc,  # TMA: tensor descriptors of k_ptr's and v_ptr's [R, Hkv * 64] columns, [BLOCK_N, 64] tiles
    q_w_ptr, q_b_ptr, pos_ptr, cos_ptr, sin_ptr,  # NORM_Q: q's norm [64] each, positions [R, 3], tables [P, 32]
    num_seqs, search_iters, stride_q, stride_k, stride_v, stride_o, qk_scale, stride_pos, eps,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_M: tl.constexpr,  # (row, head) pairs per program: BLOCK_M // GROUP rows x GROUP heads
    BLOCK_N: tl.constexpr,  # keys per step
    HAS_Q_STARTS: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input_precision ("ieee" for fp32 operands)
    TMA: tl.constexpr,  # K/V tiles through tensor descriptors (the Hopper TMA unit) instead of pointers
    NORM_Q: tl.constexpr,  # q_ptr holds raw q: LayerNorm + M-RoPE it here, as the prologue would (the prologue
    # then does the k heads only, and q is read once instead of read, written and read again)
    PIPELINE: tl.constexpr,  # the next key block's QK^T asked of the tensor cores before this block's softmax,
    # which then runs while they work (FlashAttention-3's overlap within a warpgroup); the same arithmetic
):
    ROWS: tl.constexpr = BLOCK_M // GROUP
    # Program p of KV head kvh handles query block j of sequence i, where sequence i owns the program ids
    # [q_cu[i] // ROWS + i, ... + cdiv(n_i, ROWS)) (the +i slack makes these ranges disjoint); ids left over
    # (at most one per sequence, plus the tail of the grid) exit at once.
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = _find_segment(q_cu_ptr, num_seqs, pid, search_iters, ROWS, 1)
    q_begin = tl.load(q_cu_ptr + seq)
    num_q = tl.load(q_cu_ptr + seq + 1) - q_begin
    first = (pid - q_begin // ROWS - seq) * ROWS
    if (first < 0) | (first >= num_q):  # < 0: ids before the first sequence's, when q_cu[0] > 0 (rows of no sequence)
        return
    kv_begin = tl.load(cu_seqlens_ptr + seq)
    kv_len = tl.load(cu_seqlens_ptr + seq + 1) - kv_begin
    q_row0 = kv_begin + first
    if HAS_Q_STARTS:
        q_row0 += tl.load(q_starts_ptr + seq)

    # M index m -> (row m // GROUP, head kvh * GROUP + m % GROUP): a row's GROUP heads are adjacent columns
    o_m = tl.arange(0, BLOCK_M)
    o_row = o_m // GROUP
    o_head = kvh * GROUP + o_m % GROUP
    m_m = (o_m < ROWS * GROUP) & (first + o_row < num_q)
    o_d = tl.arange(0, 64)
    p_q = q_ptr + (q_row0 + o_row).to(tl.int64)[:, None] * stride_q + o_head[:, None] * 64 + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    if NORM_Q:
        o_q = (q_row0 + o_row).to(tl.int64)
        b_cos, b_sin = _rotations(pos_ptr, stride_pos, cos_ptr, sin_ptr, o_q, m_m)
        b_w = tl.load(q_w_ptr + o_d).to(tl.float32)
        b_b = tl.load(q_b_ptr + o_d).to(tl.float32)
        b_q = _norm_rotate(b_q, b_w, b_b, b_cos, b_sin, eps, q_ptr.dtype.element_ty, BLOCK_M)

    if TMA:
        k_src, v_src = k_desc, v_desc
    else:
        k_src = k_ptr + kv_begin.to(tl.int64) * stride_k + kvh * 64
        v_src = v_ptr + kv_begin.to(tl.int64) * stride_v + kvh * 64
    acc = tl.zeros([BLOCK_M, 64], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    kv_full = (kv_len // BLOCK_N) * BLOCK_N
    if PIPELINE:  # full blocks: block j + 1's scores are asked for, then block j's softmax and values are done
        if kv_full > 0:
            b_s = _kv_block_scores(b_q, k_src, stride_k, kv_begin, kvh * 64, 0, kv_len, BLOCK_N, False, PRECISION,
                                   TMA)  # fmt: skip
            for start in range(0, kv_full - BLOCK_N, BLOCK_N):
                b_s_next = _kv_block_scores(b_q, k_src, stride_k, kv_begin, kvh * 64, start + BLOCK_N, kv_len,
                                            BLOCK_N, False, PRECISION, TMA)  # fmt: skip
                acc, m_i, l_i = _softmax_values(b_s, acc, m_i, l_i, v_src, stride_v, kv_begin, kvh * 64, start,
                                                kv_len, qk_scale, BLOCK_N, False, PRECISION, TMA)  # fmt: skip
                b_s = b_s_next
            acc, m_i, l_i = _softmax_values(b_s, acc, m_i, l_i, v_src, stride_v, kv_begin, kvh * 64,
                                            kv_full - BLOCK_N, kv_len, qk_scale, BLOCK_N, False, PRECISION, TMA)
    else:
        for start in range(0, kv_full, BLOCK_N):
            acc, m_i, l_i = _attend_kv_block(
                b_q, acc, m_i, l_i, k_src, v_src, stride_k, stride_v, kv_begin, kvh * 64, start, kv_len, qk_scale,
                BLOCK_N, False, PRECISION, TMA,
            )
    if kv_full < kv_len:
        acc, m_i, l_i = _attend_kv_block(
            b_q, acc, m_i, l_i, k_src, v_src, stride_k, stride_v, kv_begin, kvh * 64, kv_full, kv_len, qk_scale,
            BLOCK_N, True, PRECISION, TMA,
        )
    acc = acc / l_i[:, None]

    o_out = (q_begin + first + o_row).to(tl.int64)
    p_o = o_ptr + o_out[:, None] * stride_o + o_head[:, None] * 64 + o_d[None, :]
    tl.store(p_o, acc.to(o_ptr.dtype.element_ty), mask=m_m[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------
ATTENTION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# prologue: 16 rows x 4 heads (HEADS) x 64 values per program, loaded as one tile (32 values per thread, all in
# flight together: sm_90 SASS issues the tile's loads before any arithmetic), 78 registers (Triton 3.6 and 3.9).
# Memory bound: what keeps it fed is bytes in flight. Each program gathers its rows' cos/sin once for its 4 heads;
# head groups are a second grid axis, so V1's encoder (16 q + 4 k heads) runs 5 programs per row block and its
# decoder (32 + 8) 10, none with a masked head. It looped over all the heads of a row block in one program
# before, a head at a time: 0.050 ms for the 9984-row V1 mix on an H200 (RESULTS.md), 1.0 TB/s, a fifth of the
# card's bandwidth. Not timed yet: bench_kernels.py::test_prologue_heads compares 1, 2, 4 and 8 heads.
NORM_CONFIG = dict(ROWS=16, HEADS=4, num_warps=4)


class Blocks(NamedTuple):
    """A 16-bit configuration of ``_attention_kernel``: tile sizes, launch options, and how K/V tiles arrive."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False  # K/V through tensor descriptors (TMA), host-side; needs 16-byte aligned rows
    fold_q: bool = False  # q's LayerNorm + M-RoPE in the attention kernel, as it loads q (the prologue: k only)
    pipeline: bool = False  # the next key block's QK^T in flight during this block's softmax (PIPELINE)
    maxnreg: int | None = None  # registers a thread at most (ptxas), for the CTAs per SM it buys


# 16-bit configurations for a GPU run to compare (``benchmarks/bench_kernels.py::test_attention_blocks``); each
# one compiles for sm_90 without spills and runs exactly in the interpreter (tests). The first is the default.
# sm_90 registers/thread under Triton 3.9 in the comments.
ATTENTION_BLOCKS = {
    "m128n64w8s3": Blocks(128, 64, 8, 3),  # 122: two CTAs per SM
    "m128n64w8s2": Blocks(128, 64, 8, 2),  # 127
    "m128n64w8s4": Blocks(128, 64, 8, 4),  # 122
    "m128n128w8s2": Blocks(128, 128, 8, 2),  # 189: one CTA per SM, half the softmax steps
    "m128n128w8s3": Blocks(128, 128, 8, 3),  # 173
    "m256n64w8s3": Blocks(256, 64, 8, 3),  # 222: each K/V tile serves 64 rows x 4 heads
    "m64n64w4s3": Blocks(64, 64, 4, 3),  # 120: small tiles, four CTAs of 4 warps per SM (short sequences)
    "m128n64w4s3": Blocks(128, 64, 4, 3),  # 215: one warpgroup per CTA
    "m128n64w8s3-tma": Blocks(128, 64, 8, 3, tma=True),  # 114: K/V tiles by the TMA unit, no address math
    "m128n128w8s2-tma": Blocks(128, 128, 8, 2, tma=True),  # 159
    # q's norm + M-RoPE in the attention kernel as it loads q: the prologue reads and writes the k heads only
    # (q: 80% of its traffic for V1's 16/4 heads), but the fold's registers cost occupancy (3.6: 146 for both)
    "m128n64w8s3-foldq": Blocks(128, 64, 8, 3, fold_q=True),  # 134: one CTA per SM
    "m64n64w4s3-foldq": Blocks(64, 64, 4, 3, fold_q=True),  # 146: three CTAs of 4 warps per SM
    # The next key block's QK^T issued before this block's softmax: the SASS interleaves the softmax's exp2s with
    # that wgmma, before its wait (tests/test_sm90_compile.py checks), where the others wait for it first and
    # overlap only another warpgroup's or CTA's work. One more fp32 score tile a thread costs occupancy
    # (3.6 / 3.9: 155 / 164 registers for m128n64 w8 s3, so one CTA per SM; capped at 128 it spills and ptxas
    # moves the exp2s back after the wait).
    "m128n64w8s3-pipe": Blocks(128, 64, 8, 3, pipeline=True),  # 164: one CTA per SM
    "m128n64w8s2-pipe": Blocks(128, 64, 8, 2, pipeline=True),  # 162
    "m64n64w4s3-pipe": Blocks(64, 64, 4, 3, pipeline=True),  # 164: three CTAs of 4 warps per SM
    "m128n64w8s3-tma-pipe": Blocks(128, 64, 8, 3, tma=True, pipeline=True),  # 153
    # 32 keys a step: half the score registers, so the pipelined loop keeps two CTAs per SM (3.6: 127) with every
    # exp2 of a step issued during the next QK^T; twice the steps (the rescale of acc each 32 keys, not 64)
    "m128n32w8s3": Blocks(128, 32, 8, 3),  # 82 (registers are given in eights: 88): two CTAs per SM
    "m128n32w8s3-pipe": Blocks(128, 32, 8, 3, pipeline=True),  # 124: two CTAs per SM
    # At most 80 registers (3.6: 79), no spills: three CTAs of 8 warps per SM (40 KiB shared memory each), 396 on
    # an H100 SXM's 132 SMs, where one clip's encoder attention (3136 rows: 98 row blocks and a spare program per
    # sequence, x 4 KV heads) is 396 programs: one wave, where the default's two CTAs per SM (264) take one and a
    # half. The price: ptxas serialises its wgmmas for want of registers (warning C7512), each k-step waited for
    # alone where the others issue a dot's steps together
    "m128n32w8s3-r80": Blocks(128, 32, 8, 3, maxnreg=80),  # 77
}
# Not offered: tl.range(warp_specialize=True) on the key loop compiles to the same SASS for sm_90 under
# Triton 3.6 and 3.9 (no producer/consumer split, no setmaxnreg), with or without TMA.


def attention_config(dtype: torch.dtype, blocks: str | None = None) -> dict:
    """Block sizes and launch options of ``_attention_kernel`` for a dtype (also used by the compile tests);
    ``blocks``: an ATTENTION_BLOCKS name for 16-bit dtypes (default its first entry).

    16-bit: 128 (row, head) pairs x 64 keys, 8 warps (two warpgroups, one m64 wgmma each), 3 stages:
    122 registers/thread and 64 KiB shared memory (sm_90 compile, Triton 3.6 and 3.9), so two CTAs fit on an SM
    and one CTA's softmax can overlap the other's wgmma (Triton does no intra-CTA ping-pong). 128 keys needs 171
    registers -> one CTA per SM. Chosen by this reasoning; timed on an H200 before the scale was folded into
    the exponent (which takes the softmax from 332 to 272 floating-point instructions in SASS, 108 -> 122
    registers). FP fusion is asked for explicitly: that fold needs it, and Triton's default is to change.
    fp32 (a parity path): 64 x 32 tiles, 4 warps, "tf32x3" dots (~fp32 accuracy on tensor cores; "ieee"
    FMA dots spilled to local memory at the tile sizes tried). The interpreter computes every dot exactly.
    """
    if dtype == torch.float32:
        if blocks is not None:
            raise ValueError("ATTENTION_BLOCKS are 16-bit block shapes; fp32 has one configuration")
        return dict(
            BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, PRECISION="tf32x3", enable_fp_fusion=True, TMA=False,
            NORM_Q=False, PIPELINE=False,
        )  # fmt: skip
    if blocks is not None and blocks not in ATTENTION_BLOCKS:
        raise ValueError(f"blocks must be one of {list(ATTENTION_BLOCKS)}; got {blocks!r}")
    b = ATTENTION_BLOCKS[blocks or next(iter(ATTENTION_BLOCKS))]
    cap = {} if b.maxnreg is None else {"maxnreg": b.maxnreg}
    return dict(
        BLOCK_M=b.block_m, BLOCK_N=b.block_n, num_warps=b.num_warps, num_stages=b.num_stages, PRECISION="tf32",
        enable_fp_fusion=True, TMA=b.tma, NORM_Q=b.fold_q, PIPELINE=b.pipeline, **cap,
    )  # fmt: skip


def _check_vector(name: str, t: torch.Tensor, length: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != (length,) or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(
            f"{name} is {t.dtype} {list(t.shape)} on {t.device}, strides {t.stride()}; expected contiguous {dtype} "
            f"[{length}] on {device}"
        )


def _check_attention_args(
    qkv, norm_params, cu_seqlens, positions, cos, sin, num_q_heads, num_kv_heads, q_cu_seqlens, q_starts, num_q_rows
) -> None:
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dtype not in ATTENTION_DTYPES:
        raise TypeError(f"qkv dtype is {qkv.dtype}; expected one of {ATTENTION_DTYPES}")
    if num_q_heads < 1 or num_kv_heads < 1 or num_q_heads % num_kv_heads or num_q_heads // num_kv_heads > 64:
        raise ValueError(
            f"num_q_heads={num_q_heads}, num_kv_heads={num_kv_heads}: need a multiple of the KV heads, "
            "at most 64 query heads per KV head"
        )
    width = (num_q_heads + 2 * num_kv_heads) * HEAD_DIM
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(
            f"qkv has shape {list(qkv.shape)}, strides {qkv.stride()}; expected [R, {width}], last dim contiguous"
        )
    device = qkv.device
    for name, t in norm_params.items():
        if not isinstance(t, torch.Tensor) or t.shape != (HEAD_DIM,) or t.device != device or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [{HEAD_DIM}] tensor on {device}")
    num_seqs = cu_seqlens.numel() - 1 if isinstance(cu_seqlens, torch.Tensor) else -1
    if num_seqs < 0 or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor [B + 1]")
    _check_vector("cu_seqlens", cu_seqlens, num_seqs + 1, torch.int32, device)
    for name, t in (("positions", positions), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} is a {type(t).__name__}; expected a torch.Tensor")
    if (
        positions.shape != (qkv.shape[0], 3) or positions.dtype != torch.int32 or positions.device != device
        or not positions.is_contiguous()
    ):  # fmt: skip
        raise ValueError(
            f"positions is {positions.dtype} {list(positions.shape)}, strides {positions.stride()}; expected "
            f"contiguous int32 [{qkv.shape[0]}, 3] on {device}"
        )
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[1] != 32 or t.dtype != torch.float32 or not t.is_contiguous() or t.device != device:
            raise ValueError(f"{name} is {t.dtype} {list(t.shape)}; expected contiguous float32 [P, 32] on {device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos is {list(cos.shape)} and sin {list(sin.shape)}; expected tables of the same shape")
    subset = (q_cu_seqlens is not None, q_starts is not None, num_q_rows is not None)
    if any(subset) and not all(subset):
        raise ValueError("q_cu_seqlens, q_starts and num_q_rows go together: give all three or none")
    if all(subset):
        _check_vector("q_cu_seqlens", q_cu_seqlens, num_seqs + 1, torch.int32, device)
        _check_vector("q_starts", q_starts, num_seqs, torch.int32, device)
        if not isinstance(num_q_rows, int) or num_q_rows < 0:
            raise TypeError(f"num_q_rows must be a host int >= 0, got {num_q_rows!r}")


def qk_norm_rope(
    qkv: torch.Tensor,
    qk: torch.Tensor,
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
    eps: float = 1e-5,
    q_heads: bool = True,
    heads_per_program: int | None = None,
) -> None:
    """``mrope_attention``'s prologue alone: the q and k heads (``q_heads=False``: the k heads only) of qkv's rows
    before ``cu_seqlens[-1]``, LayerNormed and rotated, into qk [R, (Hq + Hkv) * 64] of qkv's dtype (last dim
    contiguous; qk may be qkv itself). Arguments as ``mrope_attention``'s, which checks them; this does not (it is
    what the benchmarks time on its own). ``heads_per_program``: NORM_CONFIG's HEADS unless given (benchmarks)."""
    config = dict(NORM_CONFIG, HEADS=heads_per_program or NORM_CONFIG["HEADS"])
    heads = config["HEADS"]
    if not isinstance(heads, int) or heads < 1 or heads & (heads - 1):
        raise ValueError(f"heads_per_program must be a power of two, got {heads!r}")
    groups = (triton.cdiv(num_q_heads, heads) if q_heads else 0) + triton.cdiv(num_kv_heads, heads)
    _qk_norm_rope_kernel[(triton.cdiv(qkv.shape[0], config["ROWS"]), groups)](
        qkv, qk, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, positions, cos, sin, cu_seqlens,
        qkv.shape[0], cu_seqlens.numel() - 1, num_q_heads, num_kv_heads, qkv.stride(0), qk.stride(0),
        positions.stride(0), eps, Q_HEADS=q_heads, **config,
    )  # fmt: skip


def mrope_attention(
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
    *,
    q_cu_seqlens: torch.Tensor | None = None,
    q_starts: torch.Tensor | None = None,
    num_q_rows: int | None = None,
    eps: float = 1e-5,
    inplace: bool = False,
    out: torch.Tensor | None = None,
    blocks: str | None = None,
) -> torch.Tensor:
    """q/k LayerNorm + M-RoPE + varlen GQA attention of packed sequences.

    qkv: [R, (Hq + 2 Hkv) * 64] bf16/fp16/fp32 (``h @ to_qkv.weight.T``: q heads, k heads, v heads; last dim
    contiguous, any row stride); q/k norm weight, bias: [64]; cu_seqlens: int32 [B + 1] on the device
    (``cu_seqlens[-1] <= R``; rows past it are padding and never read); positions: int32 [R, 3] (t, h, w);
    cos, sin: float32 [P, 32] from ``mrope_tables`` with P > every position.

    Query subset (all three or none): q_cu_seqlens int32 [B + 1] cumulative query counts, q_starts int32 [B]
    offset of each sequence's first query row, num_q_rows host int >= q_cu_seqlens[-1]. Query j of sequence i is
    packed row ``cu_seqlens[i] + q_starts[i] + j`` and lands in output row ``q_cu_seqlens[i] + j``.

    inplace: write the normalised, rotated q and k back into qkv's q/k columns instead of a scratch buffer (k only
    with blocks that fold q's norm into the attention kernel; qkv is scratch either way).
    out: optional [num_q_rows or R, Hq * 64] in qkv's dtype, last dim contiguous (any row stride; it may alias
    qkv's q columns when every row is a query: only the program that owns a query row reads them). Output rows
    past the real queries are left untouched.
    blocks: the attention kernel's block shape, an ATTENTION_BLOCKS name (16-bit only; for benchmarks).

    Returns out: [num_q_rows or R, Hq * 64], heads flattened head-major, ready for ``out_proj``.
    """
    norm_params = {
        "q_norm_weight": q_norm_weight, "q_norm_bias": q_norm_bias,
        "k_norm_weight": k_norm_weight, "k_norm_bias": k_norm_bias,
    }
    _check_attention_args(
        qkv, norm_params, cu_seqlens, positions, cos, sin, num_q_heads, num_kv_heads, q_cu_seqlens, q_starts,
        num_q_rows,
    )
    cfg = attention_config(qkv.dtype, blocks)
    num_rows = qkv.shape[0]
    num_seqs = cu_seqlens.numel() - 1
    has_q_starts = q_cu_seqlens is not None
    if not has_q_starts:
        q_cu_seqlens, num_q_rows = cu_seqlens, num_rows
    out_shape = (num_q_rows, num_q_heads * HEAD_DIM)
    if out is None:
        out = torch.empty(out_shape, dtype=qkv.dtype, device=qkv.device)
    elif out.shape != out_shape or out.dtype != qkv.dtype or out.device != qkv.device or out.stride(1) != 1:
        raise ValueError(
            f"out is {out.dtype} {list(out.shape)} on {out.device}; expected {qkv.dtype} {list(out_shape)} "
            f"on {qkv.device}, last dim contiguous"
        )
    if num_rows == 0 or num_seqs == 0 or num_q_rows == 0:
        return out

    qk_cols = (num_q_heads + num_kv_heads) * HEAD_DIM
    qk = qkv if inplace else torch.empty((num_rows, qk_cols), dtype=qkv.dtype, device=qkv.device)
    fold_q = cfg["NORM_Q"]  # q normalised and rotated by the attention kernel as it loads it
    qk_norm_rope(
        qkv, qk, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, cu_seqlens, positions, cos, sin,
        num_q_heads, num_kv_heads, eps, q_heads=not fold_q,
    )  # fmt: skip
    q = qkv if fold_q else qk

    group = num_q_heads // num_kv_heads
    rows_per_block = cfg["BLOCK_M"] // group
    grid = (num_q_rows // rows_per_block + num_seqs, num_kv_heads)
    k, v = qk[:, num_q_heads * HEAD_DIM :], qkv[:, qk_cols:]
    descriptors = (None, None)
    if cfg["TMA"]:
        if any((t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16 for t in (k, v)):
            raise ValueError("TMA blocks need 16-byte aligned qkv rows; use the default blocks")
        descriptors = tuple(TensorDescriptor.from_tensor(t, [cfg["BLOCK_N"], HEAD_DIM]) for t in (k, v))
    _attention_kernel[grid](
        q, k, v, out, cu_seqlens, q_cu_seqlens, q_starts if has_q_starts else cu_seqlens, *descriptors,
        q_norm_weight, q_norm_bias, positions, cos, sin, num_seqs, num_seqs.bit_length(),
        q.stride(0), qk.stride(0), qkv.stride(0), out.stride(0), LOG2E / math.sqrt(HEAD_DIM), positions.stride(0),
        eps, GROUP=group, HAS_Q_STARTS=has_q_starts, **cfg,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------
def qk_norm_rope_ref(
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor,
    q_norm_bias: torch.Tensor,
    k_norm_weight: torch.Tensor,
    k_norm_bias: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch prologue of ``mrope_attention_ref`` (``qk_norm_rope``'s arithmetic): every row's q and k heads
    LayerNormed in fp32 and rounded to qkv's dtype (as upstream's q/k norms), then rotated in float64 and rounded to
    qkv's dtype (as upstream). Returns q [R, Hq, 64] and k [R, Hkv, 64], float64 holding values of qkv's dtype."""
    num_rows, dtype = qkv.shape[0], qkv.dtype
    hq, hkv = num_q_heads, num_kv_heads
    x = qkv.float().view(num_rows, hq + 2 * hkv, HEAD_DIM)

    axis = pair_axis().to(positions.device)
    pair = torch.arange(32, device=positions.device)
    pos = positions.long()[:, axis]  # [R, 32]
    c, s = cos.double()[pos, pair][:, None], sin.double()[pos, pair][:, None]  # [R, 1, 32]

    def norm_rotate(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        t = torch.nn.functional.layer_norm(t, (HEAD_DIM,), w.float(), b.float(), eps).to(dtype).double()
        even, odd = t[..., 0::2], t[..., 1::2]
        return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).to(dtype).double()

    return norm_rotate(x[:, :hq], q_norm_weight, q_norm_bias), norm_rotate(x[:, hq : hq + hkv], k_norm_weight,
                                                                           k_norm_bias)  # fmt: skip


def mrope_attention_ref(
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
    *,
    q_cu_seqlens: torch.Tensor | None = None,
    q_starts: torch.Tensor | None = None,
    num_q_rows: int | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Plain-PyTorch ``mrope_attention`` (same arguments and layout), one sequence at a time.

    LayerNorm in fp32 rounded to qkv's dtype (as upstream's q/k norms), rotation in float64 rounded to qkv's
    dtype (as upstream), attention in float64. Returns [num_q_rows or R, Hq * 64] in qkv's dtype; rows past
    the real queries are zero.
    """
    num_rows, dtype = qkv.shape[0], qkv.dtype
    hq, hkv = num_q_heads, num_kv_heads
    q, k = qk_norm_rope_ref(
        qkv, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, positions, cos, sin, hq, hkv, eps
    )  # fmt: skip
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = qkv.float().view(num_rows, hq + 2 * hkv, HEAD_DIM)[:, hq + hkv :].double().repeat_interleave(hq // hkv, dim=1)

    cu = cu_seqlens.tolist()
    if q_cu_seqlens is None:
        q_cu, starts, num_q_rows = cu, [0] * (len(cu) - 1), num_rows
    else:
        q_cu, starts = q_cu_seqlens.tolist(), q_starts.tolist()
    out = torch.zeros(num_q_rows, hq, HEAD_DIM, dtype=torch.float64, device=qkv.device)
    for i in range(len(cu) - 1):
        rows = slice(cu[i] + starts[i], cu[i] + starts[i] + q_cu[i + 1] - q_cu[i])
        keys = slice(cu[i], cu[i + 1])
        scores = torch.einsum("qhd,khd->hqk", q[rows], k[keys]) / math.sqrt(HEAD_DIM)
        out[q_cu[i] : q_cu[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[keys])
    return out.flatten(1).to(dtype)
