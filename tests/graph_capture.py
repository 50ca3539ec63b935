"""A CPU stand-in for CUDA graph capture and replay, so the engine's ``cudagraph`` path runs without a GPU.

It keeps what makes CUDA graphs differ from eager execution:
- capture records the device work of one call (every aten op and custom op, with the very tensors it read and
  wrote); replay re-runs exactly that work on the same tensors, writing into the outputs captured, so whatever
  the Python code around those ops computed at capture (sizes, cache lookups, which tensor it read) is frozen.
  A custom op is recorded as one op: the Python inside it runs again at every replay;
- the device-to-host syncs listed in SYNCING, and boolean-mask indexing, raise, as capture does on a GPU. Not
  everything a capturing stream refuses can be seen on a CPU: copies between host and device, for one.
The tests on a GPU (``gpu``-marked, and the cudagraph cases of the kernel and engine tests) capture real graphs.

``emulated_cuda_graphs(monkeypatch)`` swaps the ``torch.cuda`` calls the engine makes around capture
(device, streams, memory pool, ``CUDAGraph``, ``graph``) for these stand-ins.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
SYNCING = (aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal)
BOOLEAN_INDEXING = (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_)


class CaptureError(RuntimeError):
    """What a capturing CUDA stream reports: the operation is not permitted while capturing."""


class _Recorder(TorchDispatchMode):
    def __init__(self, tape: list):
        super().__init__()
        self.tape = tape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in SYNCING:
            raise CaptureError(f"{func} syncs with the host: operation not permitted when stream is capturing")
        if packet in BOOLEAN_INDEXING and any(t is not None and t.dtype == torch.bool for t in args[1]):
            raise CaptureError(f"{func} with a boolean mask syncs with the host (nonzero) while capturing")
        out = func(*args, **kwargs)
        self.tape.append((func, args, kwargs, out))
        return out


class FakeCUDAGraph:
    """``torch.cuda.CUDAGraph`` on the CPU: ``replay()`` re-runs the captured ops into the captured outputs."""

    replays = 0  # by every instance, for tests that check graphs were used

    def __init__(self):
        self.tape: list = []
        self.captured = False

    def replay(self):
        if not self.captured:
            raise RuntimeError("replay of a graph that was never captured")
        with torch.no_grad():  # a graph replays device work only: no autograd
            self._rerun()
        FakeCUDAGraph.replays += 1

    def _rerun(self):
        for func, args, kwargs, out in self.tape:
            fresh = func(*args, **kwargs)
            for new, old in zip(tree_flatten(fresh)[0], tree_flatten(out)[0], strict=True):
                if not isinstance(old, torch.Tensor) or new is old:
                    continue
                if new.shape != old.shape:
                    raise RuntimeError(f"{func} gave shape {tuple(new.shape)} on replay, {tuple(old.shape)} at capture")
                if (new.data_ptr(), new.stride()) != (old.data_ptr(), old.stride()):  # not a view of the same memory
                    old.copy_(new)


@contextlib.contextmanager
def fake_graph(graph: FakeCUDAGraph, pool=None, **_):
    if graph.captured:
        raise RuntimeError("a graph is captured once")
    with _Recorder(graph.tape):
        yield
    graph.captured = True


class _FakeStream:
    def wait_stream(self, other):
        pass


def emulated_cuda_graphs(monkeypatch) -> None:
    """Patch the ``torch.cuda`` calls made around graph capture with CPU stand-ins."""
    stream = _FakeStream()
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeCUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)


def engine_for(model, mode: str, monkeypatch, **settings):
    """``Engine(model, mode, **settings)``; mode ``cudagraph`` with the model off CUDA captures and replays through
    the stand-ins above (on a GPU it captures real graphs)."""
    from titok_fast.engine import Engine

    if mode != "cudagraph" or model.device.type == "cuda":
        return Engine(model, mode=mode, **settings)
    emulated_cuda_graphs(monkeypatch)
    engine = Engine(model, mode="static", **settings)  # the constructor refuses cudagraph off CUDA
    engine.mode = "cudagraph"
    return engine
