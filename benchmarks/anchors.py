"""Attention anchors for the kernel benchmarks: what the machine's best libraries do with the same packed batch.

Each takes already normalised and rotated ``q [rows, Hq, 64]``, ``k, v [rows, Hkv, 64]`` and ``cu_seqlens`` int32
[B+1], attends within each sequence (non-causal, scale 1/8, grouped-query heads) and returns ``[rows, Hq, 64]``:
- ``fa2``: FlashAttention-2 varlen (PyTorch's ``varlen_attn``), one launch for the whole batch;
- ``cudnn``: cuDNN's fused attention through SDPA, one call per sequence (SDPA has no varlen entry point);
- ``flex``: FlexAttention with a document mask over the whole packed batch (compiled on a GPU).
They run on the CPU too (``flex`` unfused there), which is how ``tests/test_anchors.py`` checks them.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from baselines import varlen_attention


def fa2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    lengths = cu_seqlens.diff()
    return varlen_attention(q, k, v, cu_seqlens, int(lengths.max()))


def cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    backend = SDPBackend.CUDNN_ATTENTION if q.is_cuda else SDPBackend.MATH
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # made once, outside the loop
    bounds = cu_seqlens.tolist()
    out = torch.empty_like(q)
    with sdpa_kernel(backend):
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            q_i, k_i, v_i = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
            out[s:e] = F.scaled_dot_product_attention(q_i, k_i, v_i)[0].transpose(0, 1)
    return out


@functools.lru_cache(maxsize=8)
def _document_mask(bounds: tuple[int, ...], device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = torch.tensor(bounds, device=device).diff()
    document = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)

    def same_document(b, h, q_idx, kv_idx):
        return document[q_idx] == document[kv_idx]

    rows = bounds[-1]
    return create_block_mask(same_document, None, None, rows, rows, device=device)


@functools.cache
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The block mask is built once per layout (cached): what is timed is the attention."""
    mask = _document_mask(tuple(cu_seqlens.tolist()), str(q.device))
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
    return _flex()(q, k, v, block_mask=mask, enable_gqa=True)[0].transpose(0, 1)


ANCHORS = {"fa2": fa2, "cudnn": cudnn, "flex": flex}
