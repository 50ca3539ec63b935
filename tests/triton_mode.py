"""``triton_mode``: run the kernels through the Triton interpreter or the compiler in one test process."""

import contextlib
import sys
import types
from collections.abc import Iterator

import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


@contextlib.contextmanager
def triton_mode(interpret: bool, *extra_modules: types.ModuleType) -> Iterator[None]:
    """Rebind every @triton.jit function of triton.language, of the loaded ``kernels.*`` modules and of
    ``extra_modules`` to the interpreter (``interpret=True``) or the compiler, restoring them on exit.

    Triton fixes the mode when a function is decorated, i.e. at import, from TRITON_INTERPRET, and that
    includes triton.language's own jit functions (tl.sum, tl.max, ...). Tests use this so that interpreter
    runs on a CPU and sm_90 compiles work in one process, in any test order. Not thread-safe.
    """
    with contextlib.suppress(ImportError):  # imported lazily by the launcher; it wraps tl's jit functions
        import triton.experimental.gluon  # noqa: F401
    wanted, other = (InterpretedFunction, JITFunction) if interpret else (JITFunction, InterpretedFunction)
    knob = triton.knobs.runtime.interpret
    triton.knobs.runtime.interpret = interpret
    modules = [tl, sys.modules["triton.language.standard"], *extra_modules]
    modules += [m for name, m in list(sys.modules.items()) if name == "kernels" or name.startswith("kernels.")]
    saved = []
    try:
        for module in modules:
            for name, obj in list(vars(module).items()):
                if isinstance(obj, other):
                    saved.append((module, name, obj))
                    setattr(module, name, wanted(obj.fn))
        yield
    finally:
        for module, name, obj in reversed(saved):
            setattr(module, name, obj)
        triton.knobs.runtime.interpret = knob
