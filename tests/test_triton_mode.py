"""bfloat16 in the kernels' test harness behaves as on the GPU: casts round to nearest even, dots are exact products
accumulated in float32. On a CPU this checks the interpreter as ``triton_mode`` sets it up; on a GPU, the compiled
code (the behaviour the CPU runs must reproduce)."""

import dataclasses
import sys

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.errors import InterpreterError

from triton_mode import triton_mode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _triton_backend():
    with triton_mode(not torch.cuda.is_available(), sys.modules[__name__]):
        yield


@triton.jit
def _round_trip_kernel(x_ptr, rounded_ptr, widened_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    b_bf16 = tl.load(x_ptr + o).to(tl.bfloat16)
    tl.store(rounded_ptr + o, b_bf16)
    tl.store(widened_ptr + o, b_bf16.to(tl.float32) * 2.0)  # arithmetic on the widened value


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, p_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    o_m, o_k, o_n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    b_a = tl.load(a_ptr + o_m[:, None] * K + o_k[None, :])
    b_b = tl.load(b_ptr + o_k[:, None] * N + o_n[None, :])
    b_c = tl.dot(b_a, b_b)  # float32 accumulator
    tl.store(c_ptr + o_m[:, None] * N + o_n[None, :], b_c)
    b_p = tl.dot(b_c.to(tl.bfloat16), tl.trans(b_c.to(tl.bfloat16)))  # rounded, then multiplied again
    tl.store(p_ptr + o_m[:, None] * M + o_m[None, :], b_p)


def test_bf16_casts_round_to_nearest_even():
    one = 1.0
    ties_and_carries = [
        one + 2**-8,  # halfway between 1 and 1 + 2**-7: to even, 1
        one + 3 * 2**-8,  # halfway: to even, 1 + 2**-6
        one + 2**-8 + 2**-20,  # just above halfway: up
        1.9999999,  # rounds up into the next binade: 2
        -(one + 3 * 2**-8),
        3.4e38,  # above the midpoint between bf16's largest finite value and 2**128: inf
        1e-40,  # float32 subnormal
        0.0,
    ]
    x = torch.cat([torch.tensor(ties_and_carries), torch.randn(120) * 100]).to(DEVICE)
    rounded = torch.empty(128, dtype=torch.bfloat16, device=DEVICE)
    widened = torch.empty(128, dtype=torch.float32, device=DEVICE)
    _round_trip_kernel[(1,)](x, rounded, widened, N=128)
    expected = x.to(torch.bfloat16)
    assert torch.equal(rounded.view(torch.int16), expected.view(torch.int16))
    assert torch.equal(widened, expected.float() * 2)
    assert rounded[0].item() == 1.0 and rounded[1].item() == 1 + 2**-6 and rounded[3].item() == 2.0


def test_bf16_dot_multiplies_values_in_float32():
    a = torch.randn(16, 32, device=DEVICE).bfloat16()
    b = torch.randn(32, 16, device=DEVICE).bfloat16()
    c = torch.empty(16, 16, device=DEVICE)
    p = torch.empty(16, 16, device=DEVICE)
    _dot_kernel[(1,)](a, b, c, p, M=16, K=32, N=16)
    expected = a.double() @ b.double()
    torch.testing.assert_close(c.double(), expected, rtol=1e-5, atol=1e-5)
    again = c.bfloat16().double()
    torch.testing.assert_close(p.double(), again @ again.T, rtol=1e-5, atol=1e-4)


@triton.jit
def _bf16_add_kernel(x_ptr, y_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    b_x = tl.load(x_ptr + o)
    tl.store(y_ptr + o, b_x + b_x)  # arithmetic in bf16 itself


def test_bf16_arithmetic_works_on_the_gpu_and_is_refused_by_the_interpreter():
    """bf16 arithmetic that the harness cannot make faithful must not give wrong numbers silently on a CPU."""
    x = torch.tensor([-3.0, 1.5, -0.5, 2.0] * 4, device=DEVICE).bfloat16()
    y = torch.empty_like(x)
    if DEVICE == "cuda":
        _bf16_add_kernel[(1,)](x, y, N=16)
        assert torch.equal(y, x + x)
    else:
        with pytest.raises((NotImplementedError, InterpreterError), match="raw bits"):  # wrapped by the interpreter
            _bf16_add_kernel[(1,)](x, y, N=16)


@triton.jit
def _int32_wrap_kernel(x_ptr, y_ptr, out_ptr, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(out_ptr + o, tl.load(x_ptr + o) * 3 + tl.load(y_ptr + o))


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's own options: a CPU run")
def test_the_interpreter_without_its_dropped_overflow_check_computes_the_same():
    """The harness turns the interpreter's overflow sanitizer off (its check goes to a device_assert that the
    interpreter drops): int32 arithmetic that wraps gives the same values, and no error, with it on or off, and
    the interpreter's options are given back when the harness ends."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    harness = builder.options
    assert harness.sanitize_overflow is False and harness.debug is False
    x = torch.tensor([2**31 - 1, -(2**31), 5, 1 << 30], dtype=torch.int32).repeat(4)
    y = torch.tensor([1, -1, 7, 1 << 30], dtype=torch.int32).repeat(4)
    outs = []
    for sanitize in (False, True):
        builder.options = dataclasses.replace(harness, sanitize_overflow=sanitize)
        try:
            out = torch.empty_like(x)
            _int32_wrap_kernel[(1,)](x, y, out, N=16)
            outs.append(out)
        finally:
            builder.options = harness
    wrapped = ((x.long() * 3 + y.long() + 2**31) % 2**32 - 2**31).int()
    assert torch.equal(outs[0], wrapped) and torch.equal(outs[1], wrapped)
    builder.options = original = dataclasses.replace(harness, sanitize_overflow=True)  # as Triton makes it
    try:
        with triton_mode(True):
            assert builder.options.sanitize_overflow is False
        assert builder.options is original
    finally:
        builder.options = harness
