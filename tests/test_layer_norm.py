"""The LayerNorm kernel (``kernels/layer_norm.py``) against the module's arithmetic, and where the model uses it."""

import pytest
import torch

from titok_fast.kernels.layer_norm import MAX_ROW, layer_norm, layer_norm_config, layer_norm_ref

from helpers import norm_rows
from triton_mode import triton_mode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ULP = {torch.bfloat16: 2**-7, torch.float16: 2**-10}  # a unit in the last place, at most, of a value's scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [64, 1000, 1024, 2048])
def test_kernel_is_the_modules_norm(dtype, k):
    """Compiled on a GPU, else in the Triton interpreter with the GPU's rounding (tests/triton_mode.py): rows of
    widely spread scales and offsets, rows a stride apart with values between them that would move a row's
    statistics if read. Against the exact norm (float64), the kernel errs no more than twice as much as the module
    does (its float32 statistics summed in another order: float32's own noise, some 100 units in the last place of
    a row of large offset); in bf16 and fp16 each value is the module's, or where the two float32 statistics round
    apart and tip the rounding, one unit in the last place away, for few values."""
    x, weight, bias = norm_rows(k, 2 * layer_norm_config(k)["ROWS"] + 97, dtype, DEVICE)
    with triton_mode(interpret=DEVICE == "cpu"):
        y = layer_norm(x, weight, bias)
    want = layer_norm_ref(x, weight, bias)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    exact = torch.nn.functional.layer_norm(x.double(), (k,), weight.double(), bias.double(), 1e-5)
    scale = (exact - bias.double()).abs() + bias.double().abs()  # (the terms of the sum that is rounded)
    err, module_err = ((t.double() - exact).abs() / scale for t in (y, want))
    assert err.max() <= 2 * module_err.max()
    if dtype in ULP:
        assert ((y.double() - want.double()).abs() <= ULP[dtype] * scale).all()
        assert (y != want).float().mean() <= 1e-3


def test_kernel_takes_no_rows_and_refuses_what_it_cannot_read():
    x = torch.zeros(4, 8)
    with triton_mode(interpret=True):
        assert layer_norm(x[:0], torch.ones(8), torch.zeros(8)).shape == (0, 8)
        with pytest.raises(ValueError, match=r"weight and bias of \[8\] values"):
            layer_norm(x, torch.ones(7), torch.zeros(7))
        with pytest.raises(ValueError, match=r"^LayerNorm weight and bias of \[8\] values, both; got bias alone$"):
            layer_norm(x, None, torch.zeros(8))
        with pytest.raises(ValueError, match="x must be"):
            layer_norm(x.t(), torch.ones(4), torch.zeros(4))
        with pytest.raises(ValueError, match="LayerNorm weight must be contiguous"):
            layer_norm(x, torch.ones(16)[::2], torch.zeros(8))
        with pytest.raises(ValueError, match=f"rows of at most {MAX_ROW} values"):
            layer_norm(torch.zeros(1, MAX_ROW + 1), torch.ones(MAX_ROW + 1), torch.zeros(MAX_ROW + 1))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("k", [1024, 2048])
def test_gpu_kernel_is_the_cuda_modules_norm(k):
    """Compiled, against PyTorch's own CUDA LayerNorm in bf16 at V1's widths (the module the kernel replaces; it
    takes an approximate reciprocal square root): each value the module's, or one bf16 step away where the two
    float32 statistics tip the rounding, for at most 1% of values."""
    g = torch.Generator().manual_seed(k)
    x = ((torch.randn(4099, k, generator=g) * 3 + 1) * torch.logspace(-2, 2, 4099)[:, None]).cuda().bfloat16()
    module = torch.nn.LayerNorm(k, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        module.weight.copy_(1 + 0.3 * torch.randn(k, generator=g))
        module.bias.copy_(0.3 * torch.randn(k, generator=g))
        want = module(x)
    y = layer_norm(x, module.weight, module.bias, module.eps)
    exact = torch.nn.functional.layer_norm(x.double(), (k,), module.weight.double(), module.bias.double(), 1e-5)
    scale = (exact - module.bias.double()).abs() + module.bias.double().abs()
    assert ((y.double() - want.double()).abs() <= ULP[torch.bfloat16] * scale).all()
    assert (y != want).float().mean() <= 0.01
