"""Triton for the kernel modules, or, where it is not installed (it has no macOS or Windows wheels), a stand-in
under which they still import: their plain-PyTorch references, constants and table builders serve the PyTorch
backend, and a kernel launched says in one line that it needs Triton."""

from __future__ import annotations

import threading

import torch

# Held by every launch of a kernel of ours (the model's, through titok_fast.ops; the YUV conversions of decoding
# threads): Triton's compile and kernel cache are not thread-safe, so a launch that compiles (the first of a
# configuration, per device) must not race another, and its interpreter keeps a launch's grid and its patched
# triton.language in module globals (two threads calling a model on the triton backend in the interpreter raised
# "y >= grid_dim[1]" or gave other indices). A launch on a GPU holds it for microseconds, but for a compile (or a
# load from Triton's cache) at a configuration's first launch; reentrant, for a launcher that launches another.
LAUNCH_LOCK = threading.RLock()


class Launch:
    """A context for one kernel launch: LAUNCH_LOCK held and, on CUDA, ``device`` made the current GPU (Triton
    launches on the current GPU and its stream, and a model on cuda:1 may be called from a thread whose current GPU
    is 0). A class, not a generator: it is entered at every launch (0.9 us on a 2-core CPU, against 2.0 us as a
    ``contextlib.contextmanager``)."""

    __slots__ = ("_device",)

    def __init__(self, device: torch.device):
        self._device = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self) -> None:
        LAUNCH_LOCK.acquire()
        try:
            if self._device is not None:
                self._device.__enter__()
        except BaseException:
            LAUNCH_LOCK.release()
            raise

    def __exit__(self, *exc) -> None:
        try:
            if self._device is not None:
                self._device.__exit__(*exc)
        finally:
            LAUNCH_LOCK.release()


# Whether the Triton interpreter computes bfloat16 and float8 as a GPU does. Its own does not (Triton 3.6 to 3.9:
# tl.dot multiplies bf16 values' bits as integers, float32 -> bf16 and -> float8 casts truncate): a bf16 model on
# the triton backend gave every token otherwise. True only while a harness makes it faithful (tests/triton_mode.py).
FAITHFUL_INTERPRETER = False


def launching(t: torch.Tensor, fp8: bool = False) -> Launch:
    """The context of a kernel launch on ``t``'s device (:class:`Launch`); ``fp8``: the kernel makes float8 codes.
    Off CUDA (the Triton interpreter), bfloat16 ``t`` or float8 output is refused unless FAITHFUL_INTERPRETER."""
    if t.device.type != "cuda" and (fp8 or t.dtype == torch.bfloat16) and not FAITHFUL_INTERPRETER:
        what = "float8 codes" if fp8 else "bfloat16"
        raise ValueError(f"the Triton interpreter computes {what} otherwise than a GPU (bf16 dots on raw bits, "
                         "casts truncated): off a GPU the triton backend runs float32 or float16; use backend "
                         "'torch' for bfloat16 or fp8 on a CPU")  # fmt: skip
    return Launch(t.device)

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    from triton.tools.tensor_descriptor import TensorDescriptor

    MISSING = ""
except ImportError as e:  # the stand-ins below
    MISSING = (f"Triton cannot be imported here ({e}; torch's CUDA builds for Linux bring it, and pip install "
               "'titok-fast[gpu]' adds it); the PyTorch backend runs without it")  # fmt: skip

    class _Absent:
        """Any name of an absent Triton module: using it raises."""

        def __init__(self, name: str):
            self._name = name

        def __getattr__(self, attr: str) -> _Absent:
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Absent(f"{self._name}.{attr}")

        def __call__(self, *args, **kwargs):
            raise RuntimeError(f"{self._name}: {MISSING}")

        __getitem__ = __call__  # a kernel's launch: kernel[grid](...)

    class _Triton(_Absent):
        def jit(self, fn=None, **options):  # @triton.jit, @triton.jit(...): the kernel's name, unlaunchable
            return _Absent(f"kernel {fn.__name__}") if fn is not None else self.jit

    class _Language(_Absent):
        @staticmethod
        def constexpr(value):  # module-level constants of the kernels
            return value

    triton, tl = _Triton("triton"), _Language("triton.language")
    libdevice, TensorDescriptor = tl.extra.libdevice, _Absent("triton.tools.tensor_descriptor.TensorDescriptor")

__all__ = [
    "FAITHFUL_INTERPRETER", "LAUNCH_LOCK", "MISSING", "Launch", "TensorDescriptor", "launching", "libdevice", "tl",
    "triton",
]  # fmt: skip
