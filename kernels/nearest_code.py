"""Nearest-codebook search (the argmin of a learned VQ codebook) without the N x K distance matrix.

Fused: one program per block of query rows streams the codebook in tiles, computes the distances of a tile
with one ``tl.dot`` plus the code norms, and keeps a running (min, argmin) in registers.
Metrics: ``"l2"`` squared Euclidean distance ``|x|^2 + |c|^2 - 2 x.c`` (clamped at 0), ``"cosine"``
``1 - x.c / (|x| |c|)`` (norms clamped at 1e-12). Ties go to the lowest code index, within and across tiles.

Limits: bf16/fp16/fp32 (x and codebook of one dtype; fp32 dots run as "tf32x3", ~fp32 accurate on tensor
cores, and exactly under the interpreter); 1 <= D <= 256; K <= MAX_CODES (tested to 2**18). Norms and dot
products are float32: rows and codes of norm between about 1e-18 and 1e18 (squares within float32's range);
beyond, the scores overflow to inf/NaN or underflow to 0 and the argmin is arbitrary (a learned codebook is O(1)).
"""

from __future__ import annotations

import torch

from ._triton import tl, triton

METRICS = ("l2", "cosine")
NEAREST_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_CODE_DIM = 256
MAX_CODES = 2**31 - 64  # the kernel's int32 code counter steps past K by up to 64 (BLOCK_K) before it stops
NORM_EPS = 1e-12


@triton.jit
def _load_chunk(p_rows, m_rows, d0, dim, BLOCK_DC: tl.constexpr):
    """Columns [d0, d0 + BLOCK_DC) of a block of rows (p_rows: [R, 1] row pointers), zero outside."""
    o_d = d0 + tl.arange(0, BLOCK_DC)
    return tl.load(p_rows + o_d[None, :], mask=m_rows[:, None] & (o_d < dim)[None, :], other=0.0)


@triton.jit
def _nearest_code_kernel(
    x_ptr,  # [N, D] row stride stride_x, last dim contiguous
    c_ptr,  # [K, D] row stride stride_c, last dim contiguous
    indices_ptr,  # int64 [N]
    dist_ptr,  # fp32 [N]
    num_rows, num_codes, dim, stride_x, stride_c, eps,
    COSINE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= max(D, 16)
    BLOCK_DC: tl.constexpr,  # D chunk per dot: BLOCK_D (x stays in registers), or 64 for fp32 (reloaded)
    PRECISION: tl.constexpr,
):
    ONE_CHUNK: tl.constexpr = BLOCK_DC == BLOCK_D
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < num_rows
    p_x = x_ptr + o_n.to(tl.int64)[:, None] * stride_x
    x_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in tl.static_range(0, BLOCK_D, BLOCK_DC):
        b_x = _load_chunk(p_x, m_n, d0, dim, BLOCK_DC)
        x_sq += tl.sum(b_x.to(tl.float32) * b_x.to(tl.float32), 1)

    # minimise score: |c|^2 - 2 x.c (l2) or -x.c / |c| (cosine); the per-row terms are added at the end
    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_k = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, num_codes, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < num_codes
        p_c = c_ptr + o_k.to(tl.int64)[:, None] * stride_c
        c_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        b_xc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in tl.static_range(0, BLOCK_D, BLOCK_DC):
            if not ONE_CHUNK:
                b_x = _load_chunk(p_x, m_n, d0, dim, BLOCK_DC)
            b_c = _load_chunk(p_c, m_k, d0, dim, BLOCK_DC)
            c_sq += tl.sum(b_c.to(tl.float32) * b_c.to(tl.float32), 1)
            b_xc = tl.dot(b_x, tl.trans(b_c), b_xc, input_precision=PRECISION)
        if COSINE:
            b_score = -b_xc / tl.maximum(tl.sqrt(c_sq), eps)[None, :]
        else:
            b_score = c_sq[None, :] - 2.0 * b_xc
        b_score = tl.where(m_k[None, :], b_score, float("inf"))
        tile_best, tile_k = tl.min(b_score, 1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best < best  # strict: an earlier tile keeps a tie
        best = tl.where(better, tile_best, best)
        best_k = tl.where(better, k0 + tile_k, best_k)
    if COSINE:
        dist = 1.0 + best / tl.maximum(tl.sqrt(x_sq), eps)
    else:
        dist = tl.maximum(x_sq + best, 0.0)
    tl.store(indices_ptr + o_n, best_k.to(tl.int64), mask=m_n)
    tl.store(dist_ptr + o_n, dist, mask=m_n)


def nearest_code_config(dtype: torch.dtype, dim: int) -> dict:
    """16-bit: 64 rows x 64 codes per step, 4 warps (one wgmma warpgroup), x kept in registers; 3 stages while a
    code row is <= 256 bytes, else 2. fp32 runs "tf32x3" dots (each operand split into two tf32 halves), which
    need far more registers and shared memory: 32 codes per step (16 once D > 128) and D in chunks of 64 (a whole
    256-wide fp32 row spills registers and overflows shared memory; with 32 codes per step, D = 256 spills under
    Triton 3.6: 255 registers and 80 bytes of stack; 216 registers under 3.9)."""
    block_d = max(16, triton.next_power_of_2(dim))
    fp32 = dtype == torch.float32
    block_k = (16 if block_d > 128 else 32) if fp32 else 64
    return dict(
        BLOCK_N=64, BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_DC=min(block_d, 64) if fp32 else block_d,
        num_warps=4, num_stages=3 if block_d * dtype.itemsize <= 256 else 2, PRECISION="tf32x3" if fp32 else "tf32",
    )


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook row of every row of x.

    x: [N, D]; codebook: [K, D] of x's dtype and device (bf16/fp16/fp32, last dims contiguous), D <= 256.
    metric: "l2" (squared Euclidean distance) or "cosine" (1 - cosine similarity).
    Returns (indices int64 [N], distances float32 [N]); ties go to the lowest index.
    """
    if metric not in METRICS:
        raise ValueError(f"metric is {metric!r}; expected one of {METRICS}")
    for name, t in (("x", x), ("codebook", codebook)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.stride(-1) != 1:
            raise ValueError(f"{name} has shape {list(t.shape)}; expected a 2-D tensor with a contiguous last dim")
    if x.dtype not in NEAREST_DTYPES or codebook.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype}, codebook {codebook.dtype}: need one dtype of {NEAREST_DTYPES}")
    if codebook.device != x.device:
        raise ValueError(f"codebook is on {codebook.device}, x on {x.device}")
    (num_rows, dim), num_codes = x.shape, codebook.shape[0]
    if codebook.shape[1] != dim or not 1 <= dim <= MAX_CODE_DIM or not 1 <= num_codes <= MAX_CODES:
        raise ValueError(
            f"x is {list(x.shape)}, codebook {list(codebook.shape)}: need the same D in 1..{MAX_CODE_DIM}, "
            f"K in 1..{MAX_CODES}"
        )
    indices = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    distances = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return indices, distances
    cfg = nearest_code_config(x.dtype, dim)
    _nearest_code_kernel[(triton.cdiv(num_rows, cfg["BLOCK_N"]),)](
        x, codebook, indices, distances, num_rows, num_codes, dim, x.stride(0), codebook.stride(0), NORM_EPS,
        COSINE=metric == "cosine", **cfg,
    )
    return indices, distances


def nearest_code_ref(
    x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force in float64 over the full [N, K] distance matrix (same metrics, lowest index on ties).

    x: [N, D], codebook: [K, D] any float dtype -> (indices int64 [N], distances float32 [N]).
    """
    x, c = x.double(), codebook.double()
    if metric == "cosine":
        xn = x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        cn = c / c.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        dist = 1.0 - xn @ cn.T
    elif metric == "l2":
        dist = (x * x).sum(1, keepdim=True) + (c * c).sum(1) - 2.0 * x @ c.T
    else:
        raise ValueError(f"metric is {metric!r}; expected one of {METRICS}")
    best, indices = dist.min(1)  # torch.min returns the first index of the minimum
    return indices, best.float()
