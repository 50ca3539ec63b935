"""``triton_mode``: run the kernels through the Triton interpreter or the compiler in one test process."""

import contextlib
import dataclasses
import functools
import inspect
import sys
import types
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton._C.libtriton import ir
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


@contextlib.contextmanager
def triton_mode(interpret: bool, *extra_modules: types.ModuleType) -> Iterator[None]:
    """Rebind every @triton.jit function of triton.language, of the loaded ``titok_fast.kernels.*`` modules and of
    ``extra_modules`` to the interpreter (``interpret=True``) or the compiler, restoring them on exit.

    Triton fixes the mode when a function is decorated, i.e. at import, from TRITON_INTERPRET, and that
    includes triton.language's own jit functions (tl.sum, tl.max, ...). Tests use this so that interpreter
    runs on a CPU and sm_90 compiles work in one process, in any test order. Not thread-safe. The interpreter's
    bfloat16 is made faithful to the GPU's while it is on (see _faithful_bf16).
    """
    if interpret:
        _check_interpreter()
    with contextlib.suppress(ImportError):  # imported lazily by the launcher; it wraps tl's jit functions
        import triton.experimental.gluon  # noqa: F401
    wanted, other = (InterpretedFunction, JITFunction) if interpret else (JITFunction, InterpretedFunction)
    knob = triton.knobs.runtime.interpret
    triton.knobs.runtime.interpret = interpret
    modules = [tl, sys.modules["triton.language.standard"], *extra_modules]
    modules += [m for name, m in list(sys.modules.items()) if name.startswith("titok_fast.kernels")]
    saved = []
    try:
        for module in modules:
            for name, obj in list(vars(module).items()):
                if isinstance(obj, other):
                    saved.append((module, name, obj))
                    setattr(module, name, wanted(obj.fn))
        with _faithful_bf16() if interpret else contextlib.nullcontext(), _quick_patching(interpret):
            yield
    finally:
        for module, name, obj in reversed(saved):
            setattr(module, name, obj)
        triton.knobs.runtime.interpret = knob


@contextlib.contextmanager
def _faithful_bf16() -> Iterator[None]:
    """Make the interpreter's bfloat16 arithmetic what the GPU does, so bf16 kernels can be checked on a CPU.

    The interpreter keeps bf16 values as raw uint16 bits and (Triton 3.6 to 3.9) gets two things wrong: ``tl.dot``
    multiplies those bits as integers (triton issue 11584), and float32 -> bf16 casts truncate, where the GPU
    rounds to nearest even. Here bf16 dot operands are widened to float32 exactly (products of bf16 values are
    exact in float32 and accumulate in float32, as on tensor cores), and float32 <-> bf16 casts go through torch,
    which rounds to nearest even. float32 -> float8 e4m3 casts truncate too (1.1875 -> 1.125, 440 -> 416); they
    also go through torch, saturating at +-448 as the GPU's cvt.rn.satfinite does. Every other op in the kernels
    works on bf16 only by loading, storing, selecting or casting it; arithmetic or comparisons on bf16 values
    would use the raw bits, so they raise here instead of giving wrong numbers silently."""
    builder = interpreter.InterpreterBuilder
    real = {name: getattr(builder, name) for name in ("create_dot", "cast_impl", "create_fp_to_fp", "binary_op")}

    def widened(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def to_e4m3(handle):  # what sm_89+ does (cvt.rn.satfinite): nearest even; the kernels clamp to +-448 first
        values = torch.from_numpy(np.ascontiguousarray(handle.data, dtype=np.float32))
        bits = values.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return interpreter.TensorHandle(bits, tl.float8e4nv)

    def rounded(handle):
        values = torch.from_numpy(np.ascontiguousarray(handle.data, dtype=np.float32))
        bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return interpreter.TensorHandle(bits, tl.bfloat16)

    def cast_impl(self, src, dst_type):
        pair = (src.dtype.scalar, dst_type.scalar)
        if pair == (tl.bfloat16, tl.float32):
            return widened(src)
        if pair == (tl.float32, tl.bfloat16):
            return rounded(src)
        return real["cast_impl"](self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        nearest = rounding_mode in (None, ir.ROUNDING_MODE.RTNE)
        if {src.dtype.scalar, dst_type.scalar} == {tl.bfloat16, tl.float32} and nearest:
            return cast_impl(self, src, dst_type)
        if (src.dtype.scalar, dst_type.scalar) == (tl.float32, tl.float8e4nv) and nearest:
            return to_e4m3(src)
        return real["create_fp_to_fp"](self, src, dst_type, rounding_mode)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return real["create_dot"](self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    def binary_op(self, lhs, rhs, op):
        if tl.bfloat16 in (lhs.dtype.scalar, rhs.dtype.scalar):
            raise NotImplementedError(
                f"{op.__name__} on bfloat16 values in the Triton interpreter works on their raw bits: convert to "
                "float32 first (tests/triton_mode.py)"
            )
        return real["binary_op"](self, lhs, rhs, op)

    from titok_fast.kernels import _triton

    patched = dict(create_dot=create_dot, cast_impl=cast_impl, create_fp_to_fp=create_fp_to_fp, binary_op=binary_op)
    for name, fn in patched.items():
        setattr(builder, name, fn)
    faithful, _triton.FAITHFUL_INTERPRETER = _triton.FAITHFUL_INTERPRETER, True  # (launches of bf16 and fp8 allowed)
    try:
        yield
    finally:
        _triton.FAITHFUL_INTERPRETER = faithful
        for name, fn in real.items():
            setattr(builder, name, fn)


@contextlib.contextmanager
def _quick_patching(interpret: bool) -> Iterator[None]:
    """The interpreter re-patches triton.language at every call of a jit helper inside a kernel (a tile loop calls
    them thousands of times), each time listing every member of each module with ``inspect.getmembers``; that
    listing is a third of the interpreter's time. Here each module's builtin names are listed once and only those
    still unpatched are patched: the same patches, as the set of builtins of a module never changes.

    The interpreter's integer overflow sanitizer is turned off too: for every integer add, sub and mul it builds
    the check in int64 (two casts, the op again, two comparisons) and hands it to ``device_assert``, which drops
    it because the interpreter's options have ``debug`` off, with no way to turn it on. That dropped check was
    about 45% of a whole-model run's interpreter time; results and errors stay what they were."""
    real = getattr(interpreter, "_patch_builtin", None)
    if not interpret or real is None or not hasattr(interpreter, "_patch_attr"):  # other Triton versions: as they are
        yield
        return
    names: dict[int, list[str]] = {}

    def patch_builtin(pkg, builder, scope):
        if id(pkg) not in names:
            names[id(pkg)] = [n for n, m in inspect.getmembers(pkg) if tl.core.is_builtin(m)]
        for name in names[id(pkg)]:
            member = getattr(pkg, name)
            if tl.core.is_builtin(member):
                interpreter._patch_attr(pkg, name, member, builder, scope)

    interpreter._patch_builtin = patch_builtin
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if getattr(options, "debug", True) is False and getattr(options, "sanitize_overflow", False):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
    try:
        yield
    finally:
        interpreter._patch_builtin = real
        if options is not None:
            builder.options = options


@triton.jit
def _count_kernel(out_ptr, n):
    total = 0
    for _ in range(n):  # a loop over a runtime int, as the kernels' binary searches and tile loops do
        total += 1
    tl.store(out_ptr, total)


@functools.cache
def _interpreter_problem() -> str | None:
    out = torch.zeros(1, dtype=torch.int32)
    try:
        InterpretedFunction(_count_kernel.fn)[(1,)](out, 3)
    except Exception as e:  # noqa: BLE001 - any failure means the interpreter cannot check the kernels
        return f"{type(e).__name__}: {e}"
    return None if out.item() == 3 else f"a 3-iteration loop counted {out.item()}"


def _check_interpreter() -> None:
    """Fail with the cause, not with the kernels' first loop: Triton 3.6's interpreter passes scalars as 1-element
    arrays and NumPy 2.4 no longer turns those into ints, so no kernel runs in it."""
    problem = _interpreter_problem()
    if problem:
        pytest.fail(
            f"the Triton {triton.__version__} interpreter cannot run a loop over a runtime int with NumPy "
            f"{np.__version__} ({problem}); install numpy<2.4 or a newer triton to run the kernel tests on a CPU",
            pytrace=False,
        )
