"""@triton.jit device functions shared by the kernels of this package."""

from __future__ import annotations

from ._triton import tl, triton


@triton.jit
def _find_segment(p_cu, num_segments, target, num_iters, DIV: tl.constexpr, SLACK: tl.constexpr):
    """Largest i in [0, num_segments) with key(i) = cu[i] // DIV + i * SLACK <= target.

    p_cu: int32 [num_segments + 1], nondecreasing, so key is nondecreasing too (strictly when SLACK > 0). A
    target below key(0) (cu[0] > 0: part of a pack) gives 0 too: callers leave such targets out. ``target`` may
    be a scalar or a block; ``num_iters`` >= ceil(log2(num_segments)) bisection steps (the host passes
    ``num_segments.bit_length()``). With DIV = 1, SLACK = 0 this is the segment that
    holds packed row ``target``; an empty segment never wins over the nonempty one after it.
    """
    lo = target * 0
    hi = lo + num_segments
    for _ in range(num_iters):
        mid = (lo + hi) // 2
        key = tl.load(p_cu + mid) // DIV + mid * SLACK
        go_right = key <= target
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit
def _layer_norm_rows(b_x, m_w, w_ptr, b_ptr, o_w, width, eps, DTYPE: tl.constexpr):
    """Rows ``b_x`` (float32 [ROWS, BLOCK_W], columns past ``width`` masked by ``m_w`` and 0) LayerNormed with the
    affine at ``w_ptr``/``b_ptr`` (columns ``o_w``): float32 statistics by correctly rounded division and square
    root (the GPU's default approximate ones differ from torch's), the result rounded to DTYPE as the module
    rounds it, returned in float32 (0 in masked columns)."""
    n = tl.cast(width, tl.float32)  # (a width of 1 comes as a constant: the launcher specialises it)
    mean = tl.div_rn(tl.sum(b_x, 1), n)
    b_xc = tl.where(m_w[None, :], b_x - mean[:, None], 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(b_xc * b_xc, 1), n) + eps))
    b_w = tl.load(w_ptr + o_w, mask=m_w, other=0.0).to(tl.float32)
    b_b = tl.load(b_ptr + o_w, mask=m_w, other=0.0).to(tl.float32)
    return (b_xc * rstd[:, None] * b_w[None, :] + b_b[None, :]).to(DTYPE).to(tl.float32)
