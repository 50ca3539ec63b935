"""Stand-in for the flash-attn package, so upstream's code imports where flash-attn is not installed.

Only the call upstream makes is provided: ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k,
max_seqlen_q, max_seqlen_k)`` for non-causal self-attention with scale 1/sqrt(head_dim); it runs PyTorch's
FlashAttention-2 varlen kernel on a GPU (``benchmarks/baselines.py``). Anything else is refused.
"""

from baselines import varlen_attention


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options):
    if options or cu_seqlens_q is not cu_seqlens_k and not bool((cu_seqlens_q == cu_seqlens_k).all()):
        raise NotImplementedError(f"the flash_attn stand-in runs only upstream's self-attention call, not {options}")
    return varlen_attention(q, k, v, cu_seqlens_q, int(max_seqlen_q))
