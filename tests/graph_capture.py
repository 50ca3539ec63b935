"""A CPU stand-in for CUDA graph capture and replay, so the engine's ``cudagraph`` path runs without a GPU.

It keeps what makes CUDA graphs differ from eager execution:
- capture records the device work of one call (every aten op and custom op, with the very tensors it read and
  wrote); replay re-runs exactly that work on the same tensors, writing into the outputs captured, so whatever
  the Python code around those ops computed at capture (sizes, cache lookups, which tensor it read) is frozen.
  A custom op is recorded as one op: the Python inside it runs again at every replay; so is a Triton kernel
  launched through the interpreter outside a custom op;
- host syncs raise, as capture does on a GPU, also inside custom ops (whose implementations run with the checks
  still on): the ops in SYNCING (reading a value, ops whose output size depends on values), boolean-mask
  indexing, and the tensor methods in HOST_READS, which read values without passing through the dispatcher.
Not everything a capturing stream refuses can be seen on a CPU, where every tensor is on the host: copies between
host and device (``.to(device)``, ``torch.tensor(..., device=...)``), and values read inside an aten kernel's own
C++ code other than those listed. The work of a Triton launch is not checked: on a GPU it is one kernel, and the
interpreter's copies to and from the host stand in for device memory. The checks apply in the capturing thread,
as a stream captures only its own work.
The tests on a GPU (``gpu``-marked, and the cudagraph cases of the kernel and engine tests) capture real graphs.

``emulated_cuda_graphs(monkeypatch)`` swaps the ``torch.cuda`` calls the engine makes around capture
(device, streams, memory pool, ``CUDAGraph``, ``graph``) for these stand-ins.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from triton.runtime.interpreter import InterpretedFunction

aten = torch.ops.aten
SYNCING = (
    aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.allclose,  # a value to the host
    aten.nonzero, aten.masked_select, aten.bincount,  # output sizes that depend on values
    aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive,
)  # fmt: skip
REPEAT_BY_TENSOR = (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor)  # sync unless output_size
BOOLEAN_INDEXING = (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_)
HOST_READS = ("tolist", "numpy", "__array__", "cpu")  # tensor methods that bypass the dispatcher
BUILTIN_NAMESPACES = ("aten", "prims")
_capturing = threading.local()  # .on: the host-read checks apply in this thread now


class CaptureError(RuntimeError):
    """What a capturing CUDA stream reports: the operation is not permitted while capturing."""


def _refuse_syncs(func, args, kwargs) -> None:
    """Raise CaptureError if the dispatched op ``func`` would sync with the host on a GPU."""
    packet = func.overloadpacket
    if packet in SYNCING or (func in REPEAT_BY_TENSOR and kwargs.get("output_size") is None):
        raise CaptureError(f"{func} syncs with the host: operation not permitted when stream is capturing")
    if packet in BOOLEAN_INDEXING and any(t is not None and t.dtype == torch.bool for t in args[1]):
        raise CaptureError(f"{func} with a boolean mask syncs with the host (nonzero) while capturing")


def _refusing(method):
    @functools.wraps(method)
    def refused(self, *args, **kwargs):
        if getattr(_capturing, "on", False):
            raise CaptureError(f"Tensor.{method.__name__} reads a tensor on the host: not permitted while capturing")
        return method(self, *args, **kwargs)

    return refused


@contextlib.contextmanager
def _host_reads_refused():
    """The HOST_READS methods raise CaptureError in this thread, wherever they are called from."""
    saved = {name: vars(torch.Tensor).get(name) for name in HOST_READS}
    for name in HOST_READS:
        setattr(torch.Tensor, name, _refusing(getattr(torch.Tensor, name)))
    _capturing.on = True
    try:
        yield
    finally:
        _capturing.on = False
        for name, method in saved.items():
            if method is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, method)


@contextlib.contextmanager
def _unchecked():
    """Neither recorded nor checked (the host work of the Triton interpreter)."""
    was, _capturing.on = getattr(_capturing, "on", False), False
    try:
        with _disable_current_modes():
            yield
    finally:
        _capturing.on = was


class _Recorder(TorchDispatchMode):
    """Checks every op for host syncs and records the outermost ones (those not run inside a custom op)."""

    def __init__(self, tape: list):
        super().__init__()
        self.tape = tape
        self.depth = 0  # > 0 while a custom op's implementation runs: checked, not recorded

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        _refuse_syncs(func, args, kwargs)
        if func.namespace not in BUILTIN_NAMESPACES:
            out = self._run_inside(func, args, kwargs)
        elif torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:  # below autograd (in a custom op, in inference mode) composite ops come whole: run their parts
                return func.decompose(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        self.record(func, args, kwargs, out)
        return out

    def _run_inside(self, func, args, kwargs):
        """Run a custom op's implementation with this mode on: ``func(...)`` here would run it with this mode popped,
        so it is redispatched past the Python key instead."""
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                keys = keys | torch._C._dispatch_keys(t)
        keys = keys & torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)
        self.depth += 1
        try:
            with self:
                return func.redispatch(keys, *args, **kwargs)
        finally:
            self.depth -= 1

    def record(self, func, args, kwargs, out) -> None:
        if not self.depth:
            self.tape.append((func, args, kwargs, out))


class FakeCUDAGraph:
    """``torch.cuda.CUDAGraph`` on the CPU: ``replay()`` re-runs the captured ops into the captured outputs."""

    replays = 0  # by every instance, for tests that check graphs were used

    def __init__(self):
        self.tape: list = []
        self.captured = False
        self.capture_error_mode = None  # as capture_begin was asked

    def capture_begin(self, pool=None, capture_error_mode: str = "global") -> None:
        """Begin capturing this thread's work, as :func:`fake_graph` does (``capture_end`` ends it)."""
        self.capture_error_mode = capture_error_mode
        self._capture = fake_graph(self, pool)
        self._capture.__enter__()

    def capture_end(self) -> None:
        capture, self._capture = self._capture, None
        capture.__exit__(None, None, None)  # as CUDA's, whatever exception is being handled around it

    def reset(self):
        """As CUDA's: the graph is gone (a replay after it fails)."""
        self.tape, self.captured = [], False

    def replay(self):
        if not self.captured:
            raise RuntimeError("replay of a graph that was never captured")
        # a graph replays device work only, as captured: no autograd, whatever mode the tensors it writes were made
        # in and whatever mode the caller is in, and no autocast, whatever the caller's (the ops re-run here would
        # otherwise be dispatched through it again)
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
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
    recorder, capturing = _Recorder(graph.tape), threading.get_ident()
    launch = InterpretedFunction.run

    def one_device_op(kernel, *args, **kwargs):
        if threading.get_ident() != capturing:
            return launch(kernel, *args, **kwargs)
        with _unchecked():
            launch(kernel, *args, **kwargs)
        recorder.record(functools.partial(launch, kernel), args, kwargs, None)

    InterpretedFunction.run = one_device_op
    try:
        with _host_reads_refused(), recorder:
            yield
    finally:
        InterpretedFunction.run = launch
    graph.captured = True


class _FakeStream:
    """A stream of a pool of POOLED_STREAMS handed out round robin, as PyTorch's are."""

    drawn = itertools.count()

    def __init__(self):
        from titok_fast.engine import POOLED_STREAMS

        self.device = types.SimpleNamespace(index=None, type="cpu")
        self.cuda_stream = 1 + next(_FakeStream.drawn) % POOLED_STREAMS

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
    the stand-ins above (on a GPU it captures real graphs). Mode ``layout``: an ``auto`` engine whose every batch
    is a graph of its own layout, captured at its first batch (on a CPU through the stand-ins too)."""
    from titok_fast import engine as engine_module
    from titok_fast.engine import Engine

    if mode == "layout":
        monkeypatch.setattr(engine_module, "auto_mode", lambda rows, device, budgets, stage: "layout")
        monkeypatch.setattr(engine_module, "CAPTURE_AT_FIRST_BATCH", True)
        if model.device.type != "cuda":
            emulated_cuda_graphs(monkeypatch)
        return Engine(model, mode="auto", **settings)
    if mode != "cudagraph" or model.device.type == "cuda":
        return Engine(model, mode=mode, **settings)
    emulated_cuda_graphs(monkeypatch)
    engine = Engine(model, mode="static", **settings)  # the constructor refuses cudagraph off CUDA
    engine.mode = "cudagraph"
    return engine
