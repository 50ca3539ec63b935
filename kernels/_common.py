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
