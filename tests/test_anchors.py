"""The kernel benchmarks' attention anchors attend as the fused kernel does (within each packed sequence, GQA,
scale 1/8): each equals the reference attention on the CPU, fp32."""

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from anchors import ANCHORS  # noqa: E402


def reference(q, k, v, cu_seqlens):
    out = torch.empty_like(q, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        q_i, k_i, v_i = q[s:e].double(), k[s:e].double(), v[s:e].double()
        k_i, v_i = k_i.repeat_interleave(group, 1), v_i.repeat_interleave(group, 1)
        weights = (torch.einsum("qhd,khd->hqk", q_i, k_i) / math.sqrt(64)).softmax(-1)
        out[s:e] = torch.einsum("hqk,khd->qhd", weights, v_i)
    return out


@pytest.mark.parametrize("name", list(ANCHORS))
@pytest.mark.parametrize("heads", [(4, 2), (8, 2)], ids=["4q2kv", "8q2kv"])
def test_anchor_attends_within_each_sequence(name, heads):
    hq, hkv = heads
    lengths = [217, 1, 17, 130]
    rows = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = torch.randn(rows, hq, 64), torch.randn(rows, hkv, 64), torch.randn(rows, hkv, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention unfused on the CPU says so
        attend, packed = ANCHORS[name](q, k, v, cu)
        out = packed(attend())
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, k, v, cu), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(ANCHORS))
def test_the_timed_call_is_the_attention_alone(name, monkeypatch):
    """Bounds, the longest sequence, expanded K/V and block masks are prepared once: the call that is timed neither
    reads a tensor back to the host (``tolist``, ``item``, ``int``) nor expands K/V."""
    import anchors

    lengths = [37, 1, 20]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = torch.randn(sum(lengths), 4, 64), torch.randn(sum(lengths), 2, 64), torch.randn(sum(lengths), 2, 64)
    handed = []  # fa2: off a GPU, varlen FlashAttention's stand-in reads the bounds itself; what fa2 hands it counts
    monkeypatch.setattr(anchors, "varlen_attention", lambda *args: handed.append(args) or q)

    def refused(*args, **kwargs):
        raise AssertionError("inside the timed call")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attend, packed = ANCHORS[name](q, k, v, cu)
        with monkeypatch.context() as timed:
            for method in ("tolist", "item", "__int__", "__index__"):
                timed.setattr(torch.Tensor, method, refused)
            if name != "flex":  # FlexAttention's unfused CPU path expands K/V inside the library (fused on a GPU)
                timed.setattr(torch.Tensor, "repeat_interleave", refused)
                timed.setattr(torch, "repeat_interleave", refused)
            out = attend()
    if name == "fa2":
        assert type(handed[0][-1]) is int and handed[0][-1] == 37
    else:
        torch.testing.assert_close(packed(out).double(), reference(q, k, v, cu), atol=1e-5, rtol=1e-5)
