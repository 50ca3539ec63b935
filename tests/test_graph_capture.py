"""The CPU stand-in for CUDA graph capture (tests/graph_capture.py): host syncs are refused wherever they happen,
inside custom ops too, and what is captured replays on new buffer contents."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from graph_capture import CaptureError, FakeCUDAGraph, fake_graph
from triton_mode import triton_mode


@torch.library.custom_op("graph_capture_test::scale_by_sum", mutates_args=())
def scale_by_sum(x: torch.Tensor) -> torch.Tensor:
    return x * x.sum().item()  # the value goes to the host: a sync on a GPU


@torch.library.custom_op("graph_capture_test::nested_sync", mutates_args=())
def nested_sync(x: torch.Tensor) -> torch.Tensor:
    return scale_by_sum(x) + 1  # the sync is one custom op further down


def read_on_host(x: torch.Tensor, how: str) -> None:
    """Each way of getting values (or sizes that depend on them) to the host."""
    reads = {
        "tolist": lambda: x.tolist(), "numpy": lambda: x.numpy(), "asarray": lambda: np.asarray(x),
        "cpu": lambda: x.cpu(), "bool": lambda: bool(x[0]), "int": lambda: int(x[0]), "mask": lambda: x[x > 1],
        "nonzero": lambda: x.nonzero(), "unique": lambda: x.unique(), "repeat": lambda: x.repeat_interleave(x.long()),
        "cov": lambda: torch.cov(x, fweights=x.long()),  # a composite op whose parts check values
    }  # fmt: skip
    reads[how]()


@torch.library.custom_op("graph_capture_test::host_read", mutates_args=())
def host_read(x: torch.Tensor, how: str) -> torch.Tensor:
    read_on_host(x, how)
    return x.clone()


@torch.library.custom_op("graph_capture_test::affine", mutates_args=())
def affine(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * w + 1


@torch.library.custom_op("graph_capture_test::accumulate", mutates_args=("total",))
def accumulate(x: torch.Tensor, total: torch.Tensor) -> None:
    total.add_(affine(x, x))


@triton.jit
def _add_one_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(y_ptr + o, tl.load(x_ptr + o, mask=o < n) + 1.0, mask=o < n)


READS = ["tolist", "numpy", "asarray", "cpu", "bool", "int", "mask", "nonzero", "unique", "repeat", "cov"]


def _refused(fn, match: str) -> None:
    with pytest.raises(CaptureError, match=match), fake_graph(FakeCUDAGraph()):
        fn()


def test_item_inside_a_custom_op_is_refused():
    """A custom op calling .item() runs eagerly, and cannot be captured, directly or from another custom op."""
    x = torch.arange(4.0)
    assert torch.equal(nested_sync(x), x * 6 + 1)
    for op in (scale_by_sum, nested_sync):
        _refused(lambda op=op: op(x), r"aten\.(_local_scalar_dense|item)\.default syncs with the host")


@pytest.mark.parametrize("how", READS)
def test_host_reads_are_refused_inside_custom_ops_and_out(how):
    x = torch.arange(4.0)
    host_read(x, how)  # eager: fine
    _refused(lambda: host_read(x, how), "capturing")
    _refused(lambda: read_on_host(x, how), "capturing")  # the same reads outside any custom op
    with torch.inference_mode():  # no autograd keys: composite ops such as item reach the checks as themselves
        _refused(lambda: read_on_host(x, how), "capturing")
    host_read(x, how)  # the checks end with the capture


def test_other_threads_are_not_checked():
    """A stream captures its own work: another thread may read tensors meanwhile (the engine's staging thread)."""
    x, seen = torch.arange(3.0), []
    with fake_graph(FakeCUDAGraph()):
        reader = threading.Thread(target=lambda: seen.append((x.tolist(), x.numpy().sum(), x.sum().item())))
        reader.start()
        reader.join()
    assert seen == [([0.0, 1.0, 2.0], 3.0, 3.0)]


def test_custom_ops_without_syncs_capture_and_replay():
    """Recorded as one op each (the Python inside runs again at replay), on the buffers captured."""
    x, w, total = torch.zeros(4), torch.full((4,), 2.0), torch.zeros(4)
    graph = FakeCUDAGraph()
    with fake_graph(graph):
        y = affine(x, w)
        accumulate(x, total)
    assert [func.name() for func, *_ in graph.tape] == ["graph_capture_test::affine", "graph_capture_test::accumulate"]
    assert torch.equal(y, torch.ones(4)) and torch.equal(total, torch.ones(4))
    x.copy_(torch.arange(4.0))
    graph.replay()
    graph.replay()
    assert torch.equal(y, torch.arange(4.0) * 2 + 1)
    assert torch.equal(total, 1 + 2 * (torch.arange(4.0) ** 2 + 1))


def test_triton_launch_is_recorded_as_one_op():
    """A kernel launched outside a custom op is replayed as a launch (not as the interpreter's host copies)."""
    x, y = torch.zeros(5), torch.zeros(5)
    graph = FakeCUDAGraph()
    with triton_mode(True, sys.modules[__name__]), fake_graph(graph):
        _add_one_kernel[(1,)](x, y, 5, BLOCK=8)
    assert len(graph.tape) == 1 and torch.equal(y, torch.ones(5))
    x.copy_(torch.arange(5.0))
    with triton_mode(True, sys.modules[__name__]):
        graph.replay()
    assert torch.equal(y, torch.arange(5.0) + 1)
