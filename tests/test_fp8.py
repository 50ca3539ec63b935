"""FP8 linear layers: e4m3 codes with per-row / per-channel scales, checked against exact arithmetic; the model's
parameters and state_dict stay as they are; FP8 runs in the decoder only, so tokens are the default precision's."""

import contextlib
import copy
import threading

import pytest
import torch
from torch import nn

from titok_fast import fp8 as fp8_module
from titok_fast.fp8 import Fp8Linear, check_fp8_runs, fp8_matmul, quantize_rows, set_precision
from titok_fast.kernels.fp8_quant import (
    FP8_MAX,
    layer_norm_rows_fp8,
    layer_norm_rows_fp8_ref,
    quantize_rows_config,
    quantize_rows_fp8,
    quantize_rows_fp8_ref,
)
from titok_fast.model import TiTok

from graph_capture import engine_for
from helpers import make_model, norm_rows, random_videos, rel_l2, spaced_rows
from triton_mode import triton_mode


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


def test_rows_of_tiny_values_keep_codes_and_scale_consistent():
    """Values are multiplied by 448 / peak: for a row whose peak is below 2^-119 that would overflow float32, so such
    a row is scaled as if its peak were 2^-119 (its codes smaller, scale and codes still consistent); the kernel
    does the same, bit for bit. (Dividing each value by its scale, as before, held down to about 1e-42.)"""
    g = torch.Generator().manual_seed(3)
    peaks = torch.tensor([1e-30, 2.0**-119, 1e-37, 1e-40, 1e-45, 1.0])
    x = torch.randn(6, 64, generator=g)
    x = x / x.abs().amax(dim=1, keepdim=True) * peaks[:, None]
    q, scale = quantize_rows_fp8_ref(x)
    back = q.float() * scale
    assert q.float().abs().amax(dim=1)[[0, 1, 5]].tolist() == [FP8_MAX] * 3 and not q.float().isnan().any()
    assert bool(((back - x).abs() <= 2**-4 * x.abs() + scale * 2**-10).all())
    with triton_mode(interpret=True):
        got_q, got_scale = quantize_rows_fp8(x)
    assert torch.equal(got_q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(got_scale, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [64, 1376, 2752])
def test_quantize_kernel_gives_the_bits_of_the_reference(dtype, k):
    """The fused quantisation kernel (compiled on a GPU, else in the Triton interpreter with the GPU's rounding,
    tests/triton_mode.py) against its PyTorch reference: the same codes and scales, bit for bit. Rows of widely
    different ranges, a zero row, values on e4m3 rounding ties, a NaN, and a row count that does not fill the
    last program."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = 2 * quantize_rows_config(k)["ROWS"] + 1
    g = torch.Generator().manual_seed(k)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-4, 4, rows)[:, None]
    x[1] = 0
    x[2] *= 400 / x[2].abs().max()
    x[2, :6] = torch.tensor([448.0, 1.0625, 1.1875, 9.5, 424.0, -11.0])  # scale 1: ties round to even codes
    x[-1, 7] = float("nan")  # left out of the row's peak by both (the GPU's max leaves NaN out)
    x = spaced_rows(x.to(device, dtype))
    with triton_mode(interpret=device == "cpu"):
        q, scale = quantize_rows_fp8(x)
    want_q, want_scale = quantize_rows_fp8_ref(x.cpu())
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (rows, 1)
    assert torch.equal(scale.cpu(), want_scale)
    assert torch.equal(q.cpu().view(torch.uint8), want_q.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [64, 1000, 2048])
def test_layer_norm_kernel_quantises_the_modules_rows(dtype, k):
    """LayerNorm and quantisation in one pass (an FP8 Linear after a norm): the codes and scales of quantising
    PyTorch's LayerNorm of the rows, but where the two LayerNorms' float32 statistics round apart and move a value
    by one step of x's dtype (float32: a few ulps): then a code by one e4m3 step at most, a scale as its row
    peak."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = 2 * quantize_rows_config(k)["ROWS"] + 97
    x, weight, bias = norm_rows(k, rows, dtype, device)
    with triton_mode(interpret=device == "cpu"):
        q, scale = layer_norm_rows_fp8(x, weight, bias)
    want_q, want_scale = layer_norm_rows_fp8_ref(x.cpu(), weight.cpu(), bias.cpu())
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (rows, 1)
    step = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-20}[dtype]
    assert ((scale.cpu() - want_scale).abs() <= want_scale * step).all()
    codes, want_codes = q.cpu().view(torch.uint8).int(), want_q.view(torch.uint8).int()
    differ = codes != want_codes
    assert differ.float().mean() < 1e-4 and ((codes - want_codes).abs()[differ] == 1).all()  # (same sign: a
    # neighbouring e4m3 value)


def test_layer_norm_kernel_refuses_a_norm_of_another_width_or_layout():
    """The kernel reads the norm's weight and bias as contiguous values on x's device: a strided one was read
    wrong (246 of 256 codes differed), so it is refused."""
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match=r"weight and bias of \[8\] values"), triton_mode(interpret=True):
        layer_norm_rows_fp8(x, torch.ones(7), torch.zeros(7))
    with pytest.raises(ValueError, match="x must be"), triton_mode(interpret=True):
        layer_norm_rows_fp8(x.t(), torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="LayerNorm weight must be contiguous"), triton_mode(interpret=True):
        layer_norm_rows_fp8(x, torch.ones(16)[::2], torch.zeros(8))


def test_fp8_matmul_is_the_exact_product_of_the_codes():
    """float32 accumulation of exact fp8 x fp8 products, scales applied to the accumulator: against float64 (the
    CPU's emulation; the GPU's torch._scaled_mm is held to it below)."""
    x, w = torch.randn(64, 512), torch.randn(96, 512)
    (x_q, sx), (w_q, sw) = quantize_rows(x), quantize_rows(w)
    exact = (x_q.double() @ w_q.double().t()) * sx.double() * sw.double().t()
    got = fp8_matmul(x_q, sx, w_q, sw, torch.float32)
    assert rel_l2(got, exact) <= 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scaled_mm_on_the_gpu_is_the_emulated_product():
    """The GPU's row-wise scaled FP8 GEMM (bf16 out) against the CPU's emulation of it, on the same codes: equal up
    to bf16 rounding of the result (one ulp, 2^-8 relative) and the accumulation's own error, bounded by the sum of
    the products' magnitudes (Hopper's FP8 MMA keeps fewer bits than float32 between its promotions to float32: on
    an H100 a bound of 2^-8 of the result alone failed where products cancel)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9+")
    x, w = torch.randn(300, 1024) * torch.logspace(-2, 2, 300)[:, None], torch.randn(1376, 1024)
    (x_q, sx), (w_q, sw) = quantize_rows(x), quantize_rows(w)
    want = fp8_matmul(x_q, sx, w_q, sw, torch.float32)
    got = fp8_matmul(x_q.cuda(), sx.cuda(), w_q.cuda(), sw.cuda(), torch.bfloat16).float().cpu()
    magnitude = (x_q.float().abs() @ w_q.float().abs().t()) * sx * sw.t()  # sum of |products|, scaled
    assert bool(((got - want).abs() <= 2**-8 * want.abs() + 2**-10 * magnitude).all())
    assert fp8_matmul(x_q.cuda(), sx.cuda(), w_q.cuda(), sw.cuda(), torch.float32).dtype == torch.float32


def test_fp8_linear_shares_parameters_and_follows_weight_changes():
    model = make_model("tiny")
    keys = list(model.state_dict())
    weight = model.decoder.model_layers.attn_layer[0].to_qkv.weight
    set_precision(model, "fp8")
    assert list(model.state_dict()) == keys
    layer = model.decoder.model_layers.attn_layer[0].to_qkv
    assert isinstance(layer, Fp8Linear) and layer.weight is weight
    x = torch.randn(10, weight.shape[1])
    before = layer(x)
    with torch.no_grad():
        weight.mul_(2)
    assert rel_l2(layer(x), 2 * before) <= 1e-6  # requantised: a power of two scales exactly
    set_precision(model, "default")
    plain = model.decoder.model_layers.attn_layer[0].to_qkv
    assert type(plain) is nn.Linear and plain.weight is weight


def test_threads_quantising_a_layer_at_once_share_one_fp8_weight(monkeypatch):
    """Two threads that find a layer's FP8 weight missing at once: one quantises, and both get the tensors kept,
    the ones a graph captured meanwhile reads and a weight change later requantises into. Each quantisation is
    held until the other thread's begins (or a second has passed: only one thread quantises)."""
    layer = Fp8Linear.of(nn.Linear(64, 32, bias=False))
    barrier, quantize = threading.Barrier(2, timeout=1.0), fp8_module.quantize_rows

    def held(w):
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()
        return quantize(w)

    monkeypatch.setattr(fp8_module, "quantize_rows", held)
    got = []
    threads = [threading.Thread(target=lambda: got.append(layer.fp8_weight())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 2 and all(a is b for a, b in zip(got[0], got[1], strict=True))
    assert all(a is b for a, b in zip(got[0], layer._fp8_weight[1:], strict=True))


def test_an_fp8_model_that_has_run_is_pickled_without_its_fp8_weights():
    """Pickling an FP8 model that had decoded failed (torch's plain pickling of float8 tensors does: Ray's
    cloudpickle, spawned DataLoader workers): its FP8 weights, derived from the weights, are left out and made
    again at the copy's first use; it decodes the same pixels."""
    import copy
    import pickle

    model = make_model("tiny")
    set_precision(model, "fp8")
    indices = [torch.randint(0, model.config.codebook_size, (16,), generator=torch.Generator().manual_seed(0))]
    pixels = model.decode_indices(indices, [(4, 32, 32)])[0]
    assert model._fp8_linears[0]._fp8_weight is not None
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert all(linear._fp8_weight is None for linear in other._fp8_linears)
        assert torch.equal(other.decode_indices(indices, [(4, 32, 32)])[0], pixels)


def test_fp8_linear_error_is_fp8_quantisation_noise():
    torch.manual_seed(0)
    linear = nn.Linear(1024, 512, bias=False)
    x = torch.randn(300, 1024)
    error = rel_l2(Fp8Linear.of(linear)(x), linear(x))
    assert 1e-3 < error < 0.05, error  # quantised (not a float32 product), and at e4m3's precision


def test_precision_is_a_model_setting_that_keeps_the_parameters():
    model = make_model("tiny")
    state = model.state_dict(keep_vars=True)
    model.precision = "fp8"
    assert model.precision == "fp8" and isinstance(model.decoder.model_layers.ffd_layer[1][4], Fp8Linear)
    assert not any(isinstance(m, Fp8Linear) for m in model.encoder.modules())  # the decoder's alone
    assert list(model.state_dict(keep_vars=True).items()) == list(state.items())  # the very same parameters
    assert TiTok("tiny", precision="fp8").precision == "fp8"
    model.precision = "default"
    assert model.precision == "default" and type(model.decoder.model_layers.attn_layer[1].out_proj) is nn.Linear


def test_fp8_makes_the_default_tokens_and_decodes_in_fp8():
    """FP8 runs in the decoder only (titok_fast/fp8.py): the same tokens, bit for bit, and decoded pixels at
    FP8's distance from the default precision's (moved, and by e4m3's few percent at most)."""
    model = make_model("tiny")
    videos = random_videos(SHAPES)
    _, want = model.encode(videos, COUNTS)
    pixels = model.decode_indices(want["indices"], SHAPES)
    model.precision = "fp8"
    _, got = model.encode(videos, COUNTS)
    assert all(torch.equal(a, b) for a, b in zip(got["indices"], want["indices"], strict=True))
    fp8_pixels = model.decode_indices(want["indices"], SHAPES)
    assert all(0 < rel_l2(a, b) < 0.1 for a, b in zip(fp8_pixels, pixels, strict=True))
    with pytest.raises(ValueError, match="precision 'fp4' is not one of"):
        model.precision = "fp4"


def test_fp8_decoding_through_the_triton_kernels_is_the_torch_backends():
    """The triton backend makes an FP8 Linear's input codes in the kernel that makes the input (a LayerNorm's, the
    gated GELU's; run here in the interpreter): its decoded pixels are the torch backend's FP8 pixels within
    float32 rounding and the odd e4m3 code one step apart, a hundred times closer than FP8 is to the default
    precision."""
    model, kernels = make_model("tiny"), make_model("tiny", "triton")
    kernels.load_state_dict(model.state_dict())
    _, tokens = model.encode(random_videos(SHAPES), COUNTS)
    default = model.decode_indices(tokens["indices"], SHAPES)
    model.precision = kernels.precision = "fp8"
    want = model.decode_indices(tokens["indices"], SHAPES)
    with triton_mode(interpret=True):
        got = kernels.decode_indices(tokens["indices"], SHAPES)
    for a, b, c in zip(got, want, default, strict=True):
        assert rel_l2(a, b) < 0.01 * rel_l2(b, c)


def test_fp8_runs_natively_only_on_a_cuda_gpu_with_fp8_and_bf16():
    with pytest.raises(ValueError, match="precision fp8 needs a CUDA GPU .* the model is on cpu$"):
        check_fp8_runs("cpu", torch.bfloat16)


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0)], ids=lambda c: f"{c[0]}.{c[1]}")
def test_fp8_runs_natively_from_compute_capability_8_9_and_in_bf16_only(monkeypatch, capability):
    """FP8 GEMMs are native from Ada (8.9) on; an A100 (8.0) or an RTX 30 (8.6) only emulates them, slower than the
    default precision, and the FP8 kernels take bf16 activations only. The GPU's capability is as CUDA reports it
    (here made up: no GPU is needed to ask)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    if capability < (8, 9):
        with pytest.raises(ValueError, match=rf"^precision fp8 needs a CUDA GPU of compute capability 8\.9 or newer; "
                                             rf"cuda:1 has {capability[0]}\.{capability[1]}$"):  # fmt: skip
            check_fp8_runs("cuda:1", torch.bfloat16)
    else:
        check_fp8_runs("cuda:1", torch.bfloat16)
        for dtype in (torch.float16, torch.float32):
            with pytest.raises(ValueError, match=rf"^precision fp8 runs with bf16 activations .* model is {dtype}$"):
                check_fp8_runs("cuda:1", dtype)
    assert asked and all(device == torch.device("cuda", 1) for device in asked)  # the model's GPU, not another


SHAPES = [(4, 16, 16), (8, 32, 24), (4, 8, 8)]
COUNTS = [5, 16, 3]


@pytest.mark.parametrize("mode", ["static", "compile", "cudagraph", "layout"])
def test_fixed_shape_runners_use_the_fp8_weights_and_follow_new_ones(mode, monkeypatch):
    """Graphs read the FP8 weight cache: the engine requantises it in place before each run, so weights changed
    after a graph was built reach it. Each round, the runners built in the first decode exactly what a new plain
    fixed-shape engine decodes (same shapes, same arithmetic; compile: traced with fullgraph, run as traced; a
    graph of a batch's layout: what a new eager engine decodes), and the decoded pixels are FP8's (not the default
    precision's, which a stale or missing cache would give)."""
    if mode == "compile":
        import torch._inductor.compile_fx as compile_fx

        monkeypatch.setattr(compile_fx, "compile_fx", lambda gm, example_inputs: gm.forward)  # trace only: fast
    model = make_model("tiny")
    model.precision = "fp8"
    videos = random_videos(SHAPES)
    engine = engine_for(model, mode, monkeypatch, budgets=(256,), max_clips=4)
    rounds, built = [], []
    for _ in range(2):
        fresh = engine_for(model, "eager" if mode == "layout" else "static", monkeypatch, budgets=(256,), max_clips=4)
        _, want = fresh.encode(videos, COUNTS)
        _, got = engine.encode(videos, COUNTS)
        assert all(torch.equal(a, b) for a, b in zip(got["indices"], want["indices"], strict=True))
        recon = engine.decode_indices(want["indices"], SHAPES)
        want_recon = fresh.decode_indices(want["indices"], SHAPES)
        assert all(torch.equal(r, w) for r, w in zip(recon, want_recon, strict=True))
        plain_model = copy.deepcopy(model)  # (setting this model's precision would make its runners anew)
        plain_model.precision = "default"
        plain = engine_for(plain_model, "static", monkeypatch, budgets=(256,), max_clips=4).decode_indices(
            want["indices"], SHAPES
        )
        assert all(0 < rel_l2(r, p) < 0.1 for r, p in zip(recon, plain, strict=True))
        rounds.append(torch.cat([r.flatten() for r in recon]))
        built.append((dict(engine._runners), dict(engine._layouts)))
        with torch.no_grad():  # the second round runs the graphs built in the first on new weights
            for layers in (model.encoder.model_layers, model.decoder.model_layers):
                layers.attn_layer[0].to_qkv.weight.mul_(-1.5)
                layers.ffd_layer[1][4].weight.add_(0.05)
    assert rel_l2(rounds[0], rounds[1]) > 0.05  # the new weights change the pixels
    assert built[0] == built[1] and built[0] != ({}, {})  # ... through the first round's runners and graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["cudagraph", "compile"])
def test_fp8_on_the_gpu_in_graphs_is_the_plain_fixed_shape_path(mode, monkeypatch):
    """bf16 + FP8 decoder Linears with the triton kernels. Tokens are the bf16 encoder's, FP8 or not. A CUDA graph
    replays the plain fixed-shape path's kernels on the same shapes: the same pixels. torch.compile may fuse the
    ops between the GEMMs (norms, GELU) differently; a bf16 rounding moved there can move a requantised value by
    an fp8 step now and then: its pixels must stay closer to the plain path's than bf16's are (FP8's own effect,
    measured in the same run, not nil)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9+")
    model = make_model("tiny", "triton").to("cuda", torch.bfloat16)
    videos = [v.to("cuda", torch.bfloat16) for v in random_videos(SHAPES)]
    _, tokens = model.encode(videos, COUNTS)
    bf16 = model.decode_indices(tokens["indices"], SHAPES)
    model.precision = "fp8"
    check_fp8_runs(model.device, model.dtype)
    _, again = model.encode(videos, COUNTS)
    assert all(torch.equal(a, b) for a, b in zip(again["indices"], tokens["indices"], strict=True))
    want = engine_for(model, "static", monkeypatch, budgets=(256,), max_clips=4).decode_indices(
        tokens["indices"], SHAPES
    )
    got = engine_for(model, mode, monkeypatch, budgets=(256,), max_clips=4).decode_indices(tokens["indices"], SHAPES)
    assert all(r.dtype == torch.bfloat16 and bool(r.isfinite().all()) for r in got)
    bf16, want, got = (torch.cat([r.float().flatten() for r in out]).cpu() for out in (bf16, want, got))
    fp8_effect = rel_l2(want, bf16)
    assert fp8_effect > 0
    assert torch.equal(got, want) if mode == "cudagraph" else rel_l2(got, want) < fp8_effect
