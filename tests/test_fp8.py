"""FP8 linear layers: e4m3 codes with per-row / per-channel scales, checked against exact arithmetic; the model's
parameters and state_dict stay as they are; tokens stay near the float32 oracle."""

import torch
from torch import nn

from titok_fast.fp8 import FP8_MAX, Fp8Linear, fp8_matmul, quantize_rows, set_precision

from helpers import make_model, rel_l2

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_quantize_rows_maps_each_rows_peak_to_the_fp8_maximum():
    x = torch.randn(37, 200) * torch.logspace(-3, 3, 37)[:, None]
    x[5] = 0
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (37, 1)
    back = q.float() * scale
    peaks = q.float().abs().amax(dim=1)
    assert torch.equal(peaks[torch.arange(37) != 5], torch.full((36,), FP8_MAX))
    assert torch.equal(back[5], torch.zeros(200))
    # e4m3 keeps 3 mantissa bits: every value within half an ulp (2^-4 relative) of its row's scale grid
    assert bool(((back - x).abs() <= 2**-4 * x.abs() + scale * 2**-9).all())


def test_fp8_matmul_is_the_exact_product_of_the_codes():
    """float32 accumulation of exact fp8 x fp8 products, scales applied to the accumulator: against float64."""
    x, w = torch.randn(64, 512, device=DEVICE), torch.randn(96, 512, device=DEVICE)
    (x_q, sx), (w_q, sw) = quantize_rows(x), quantize_rows(w)
    exact = (x_q.double() @ w_q.double().t()) * sx.double() * sw.double().t()
    got = fp8_matmul(x_q, sx, w_q, sw, torch.float32)
    assert rel_l2(got.cpu(), exact.cpu()) <= 1e-6


def test_fp8_linear_shares_parameters_and_follows_weight_changes():
    model = make_model("tiny")
    keys = list(model.state_dict())
    weight = model.encoder.model_layers.attn_layer[0].to_qkv.weight
    set_precision(model, "fp8")
    assert list(model.state_dict()) == keys
    layer = model.encoder.model_layers.attn_layer[0].to_qkv
    assert isinstance(layer, Fp8Linear) and layer.weight is weight
    x = torch.randn(10, weight.shape[1])
    before = layer(x)
    with torch.no_grad():
        weight.mul_(2)
    assert rel_l2(layer(x), 2 * before) <= 1e-6  # requantised: a power of two scales exactly
    set_precision(model, "default")
    plain = model.encoder.model_layers.attn_layer[0].to_qkv
    assert type(plain) is nn.Linear and plain.weight is weight


def test_fp8_linear_error_is_fp8_quantisation_noise():
    torch.manual_seed(0)
    linear = nn.Linear(1024, 512, bias=False)
    x = torch.randn(300, 1024)
    error = rel_l2(Fp8Linear.of(linear)(x), linear(x))
    assert 1e-3 < error < 0.05, error  # quantised (not a float32 product), and at e4m3's precision
