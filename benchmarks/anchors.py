"""Attention anchors for the kernel benchmarks: what the machine's best libraries do with the same packed batch.

Each takes already normalised and rotated ``q [rows, Hq, 64]``, ``k, v [rows, Hkv, 64]`` and ``cu_seqlens`` int32
[B+1], prepares everything that does not change from call to call (the longest sequence and the bounds as Python
ints, expanded K/V, per-sequence views, the block mask) and returns ``(attend, packed)``: ``attend()`` runs the
attention alone (what is timed; within each sequence, non-causal, scale 1/8, grouped-query heads) and
``packed(attend())`` is its result as ``[rows, Hq, 64]`` (for checking, not timed):
- ``fa2``: FlashAttention-2 varlen (PyTorch's ``varlen_attn``), one launch for the whole batch;
- ``cudnn``: cuDNN's fused attention through SDPA, one call per sequence (SDPA has no varlen entry point), each
  output left where SDPA puts it;
- ``flex``: FlexAttention with a document mask over the whole packed batch (compiled on a GPU).
They run on the CPU too (``flex`` unfused there), which is how ``tests/test_anchors.py`` checks them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from baselines import varlen_attention

Prepared = tuple[Callable[[], object], Callable[[object], torch.Tensor]]  # (attend, packed): see the module header


def _unchanged(out: torch.Tensor) -> torch.Tensor:
    return out


def fa2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> Prepared:
    max_len = int(cu_seqlens.diff().max())
    return functools.partial(varlen_attention, q, k, v, cu_seqlens, max_len), _unchanged


def cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> Prepared:
    backend = SDPBackend.CUDNN_ATTENTION if q.is_cuda else SDPBackend.MATH
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    bounds = cu_seqlens.tolist()
    spans = zip(bounds[:-1], bounds[1:], strict=True)
    sequences = [tuple(t[s:e].transpose(0, 1)[None] for t in (q, k, v)) for s, e in spans]  # [1, H, length, 64]

    def attend() -> list[torch.Tensor]:
        with sdpa_kernel(backend):
            return [F.scaled_dot_product_attention(q_i, k_i, v_i) for q_i, k_i, v_i in sequences]

    def packed(outs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([o[0].transpose(0, 1) for o in outs])

    return attend, packed


def _document_mask(bounds: list[int], device: str):
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


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> Prepared:
    mask = _document_mask(cu_seqlens.tolist(), str(q.device))
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
    return functools.partial(_flex(), q, k, v, block_mask=mask, enable_gqa=True), _heads_last


def _heads_last(out: torch.Tensor) -> torch.Tensor:
    """[1, H, rows, 64] -> [rows, H, 64]."""
    return out[0].transpose(0, 1)


ANCHORS = {"fa2": fa2, "cudnn": cudnn, "flex": flex}
