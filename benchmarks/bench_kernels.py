"""Kernel benchmarks (pytest-benchmark; CUDA only, skipped cleanly without it).

    python -m pytest benchmarks/bench_kernels.py --benchmark-json out.json && python benchmarks/report.py out.json

The figures to report are those of ``extra_info`` (see the end of this header), which ``benchmarks/report.py``
prints: ``ms``, ``ms p20``, ``ms p80`` and the rate (TFLOP/s or GB/s) with its ratio to the group's baseline.

Attention: TFLOP/s (4 * rows_q * rows_k * Hq * 64 per sequence) at V1 shapes (encoder 16/4 heads, decoder
32/8 heads, mixed sequence lengths 1152..3904), providers
- ``titok``: the fused Triton kernels (q/k norm + M-RoPE prologue, GQA flash attention);
- ``titok_prologue``: that prologue alone (its share of ``titok``'s time; GB/s of the q/k columns read and
  written, no TFLOP/s); ``test_prologue_heads`` times it with 1, 2, 4 (the default) and 8 heads per program;
- ``torch_flash``: q/k LayerNorm + M-RoPE in PyTorch (fp32 math), then PyTorch's varlen flash attention (GQA);
- ``upstream``: as upstream: norms in bf16, rotation in complex128, then the same flash attention;
  ``upstream_prologue``: those norms and rotations alone (the H100 timed ``upstream`` at 15.9 ms a decoder call
  against 1.1 ms an encoder call, for twice the work: this says whether the prologue is where the time goes);
- anchors, attention alone on already normalised and rotated q/k (``anchors.py``; what does not change between
  calls, such as bounds, expanded K/V and masks, is prepared before timing): ``fa2_alone`` (FlashAttention-2
  varlen), ``cudnn_alone`` (cuDNN through SDPA, per sequence), ``flex_alone`` (FlexAttention with a document mask,
  compiled).
FSQ: GB/s of the fused encoder head and decoder-input gather against unfused PyTorch (``torch``).
Gated GELU (the FFN's ``a * gelu(g)``, V1 batch 32: the encoder's 1376 values a row, the decoder's 2752, and the
decoder's into its FP8 Linears as codes and scales): GB/s of the input read and the output written, the kernel
against PyTorch's module (and ``quantize_rows_fp8`` after it for FP8).
LayerNorm (the layers' pre-attention and pre-FFN norms, V1 batch 32: 1024 values a row in the encoder, 2048 in the
decoder): GB/s of the rows read and written, the kernel (``titok``) against PyTorch's module (``torch``).
NV12 -> RGB (``--decoder nvdec``'s conversion of a frame): GB/s and the host CPU time of a call (``host us/call``:
what a decoding thread spends launching it, much of it holding the GIL), the kernel against PyTorch (``torch``).

With TITOK_BENCH_LOG set, each case is also appended to that file as a JSON line the moment it is measured.
Every time is per call, from ``triton.testing.do_bench`` (CUDA events, warm-up and autotuning outside the timed
calls): the median and the 20%/80% quantiles go into ``extra_info`` (``ms``, ``ms_p20``, ``ms_p80``) and every
rate is computed from the median. pytest-benchmark's own columns (mean, stddev, rounds, ...) time one
synchronised call and are not the figures to report.
"""

from __future__ import annotations

import math
import os
import platform
import time

import pytest
import torch
import triton

from titok_fast.benchreport import append_row
from titok_fast.kernels.fp8_quant import quantize_rows_fp8
from titok_fast.kernels.fsq import FsqConstants, fsq_decoder_input, fsq_encoder_head, fsq_quantize_ref
from titok_fast.kernels.gated_gelu import gated_gelu
from titok_fast.kernels.layer_norm import layer_norm
from titok_fast.kernels.mrope_attention import (
    ATTENTION_BLOCKS,
    NORM_CONFIG,
    mrope_attention,
    mrope_tables,
    packed_positions,
    pair_axis,
    qk_norm_rope,
)
from titok_fast.kernels.nv12_rgb import nv12_rgb, nv12_rgb_ref

from anchors import ANCHORS
from baselines import varlen_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA device")
RUN = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"  # this process's rows in the log


@pytest.fixture(autouse=True)
def _log_case(request):
    """With TITOK_BENCH_LOG set, each measured case is appended to that file as a JSON line as soon as it ends (as
    bench_model does): a run cut short keeps what it measured (pytest-benchmark's JSON is written at the end)."""
    yield
    log, benchmark = os.environ.get("TITOK_BENCH_LOG"), request.node.funcargs.get("benchmark")
    if log and benchmark is not None and benchmark.extra_info:
        append_row(log, {"case": benchmark.group, "run": RUN, **benchmark.extra_info})

# (latent tokens, patch grid): sequence lengths 3904, 3136, 1792, 1152
VIDEOS = [(1024, (5, 24, 24)), (256, (5, 24, 24)), (512, (5, 16, 16)), (128, (4, 16, 16))]
# the block sweep also times one clip of the targets (20x192x192, 256 tokens: 3136 rows), a batch of one (encode
# or decode): a grid of a few hundred programs, where the tiles' count against the SMs' slots matters as much as
# their speed
MIXES = {"v1-mix": VIDEOS, "one-clip": [(256, (5, 24, 24))]}
SIDES = {"encoder": (16, 4), "decoder": (32, 8)}


def _extra_info(benchmark, provider: str) -> None:
    benchmark.extra_info.update(
        provider=provider,
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
    )


def _timed(benchmark, fn) -> float:
    """Median seconds per call of ``fn`` by ``do_bench``; quantiles into ``extra_info`` (see the module header)."""
    median, p20, p80 = triton.testing.do_bench(fn, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])

    def call():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=1, iterations=1)  # registers the case; its wall time is not reported
    benchmark.extra_info.update(ms=median, ms_p20=p20, ms_p80=p80)
    return median / 1e3


def _attention_inputs(num_q_heads: int, num_kv_heads: int, videos=VIDEOS):
    device, dtype = "cuda", torch.bfloat16
    lengths = [n + gt * gh * gw for n, (gt, gh, gw) in videos]
    positions = packed_positions([n for n, _ in videos], [g for _, g in videos], device)
    cos, sin = mrope_tables(int(positions.max()) + 1, device)
    qkv = torch.randn(sum(lengths), (num_q_heads + 2 * num_kv_heads) * 64, device=device, dtype=dtype)
    norms = [torch.ones(64, device=device, dtype=dtype), torch.zeros(64, device=device, dtype=dtype)] * 2
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    flops = sum(4 * n * n * num_q_heads * 64 for n in lengths)
    return dict(qkv=qkv, norms=norms, cu=cu, positions=positions, cos=cos, sin=sin, max_len=max(lengths)), flops


def _torch_norm_rope(x, cos, sin, positions, upstream: bool):
    """x: [rows, H, 64] bf16 -> LayerNorm (no affine: weights are 1/0 here) + M-RoPE, bf16."""
    pos, pair = positions.long()[:, pair_axis().to(x.device)], torch.arange(32, device=x.device)
    c, s = cos[pos, pair][:, None], sin[pos, pair][:, None]  # [rows, 1, 32]
    if upstream:
        x = torch.nn.functional.layer_norm(x, (64,))  # bf16 module
        rot = torch.view_as_complex(x.double().unflatten(-1, (32, 2)).contiguous())
        rot = rot * torch.complex(c.double(), s.double())
        return torch.view_as_real(rot).flatten(-2).to(x.dtype)
    x = torch.nn.functional.layer_norm(x.float(), (64,))
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), -1).flatten(-2).bfloat16()


PROVIDERS = ["titok", "titok_prologue", "torch_flash", "upstream", "upstream_prologue",
             *(f"{a}_alone" for a in ANCHORS)]  # fmt: skip


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("side", list(SIDES))
def test_attention(benchmark, side, provider):
    benchmark.group = f"kernel-attention-{side}-{SIDES[side][0]}q{SIDES[side][1]}kv"
    hq, hkv = SIDES[side]
    inputs, flops = _attention_inputs(hq, hkv)
    qkv, cu, max_len = inputs["qkv"], inputs["cu"], inputs["max_len"]
    if provider in ("titok_prologue", "upstream_prologue"):
        qk = torch.empty(qkv.shape[0], (hq + hkv) * 64, dtype=qkv.dtype, device=qkv.device)
        args = (qkv, qk, *inputs["norms"], cu, inputs["positions"], inputs["cos"], inputs["sin"], hq, hkv)
        heads, tables = qkv.unflatten(1, (hq + 2 * hkv, 64)), (inputs["cos"], inputs["sin"], inputs["positions"], True)
        mean = _timed(benchmark, lambda: qk_norm_rope(*args) if provider == "titok_prologue" else
                      (_torch_norm_rope(heads[:, :hq], *tables), _torch_norm_rope(heads[:, hq : hq + hkv], *tables)))
        _extra_info(benchmark, provider)
        moved = 2 * qk.numel() * qk.element_size()  # the q/k columns read, then written
        benchmark.extra_info.update(gb_per_s=moved / mean / 1e9, heads=f"{hq}/{hkv}", rows=int(cu[-1]))
        return
    if provider == "titok":

        def fn():
            return mrope_attention(
                qkv, *inputs["norms"], cu, inputs["positions"], inputs["cos"], inputs["sin"], hq, hkv
            )
    elif provider.endswith("_alone"):
        heads = qkv.unflatten(1, (hq + 2 * hkv, 64))
        q, k, v = (heads[:, a:b].contiguous() for a, b in ((0, hq), (hq, hq + hkv), (hq + hkv, hq + 2 * hkv)))
        fn, _ = ANCHORS[provider.removesuffix("_alone")](q, k, v, cu)  # prepared here: fn is the attention alone
    else:

        def fn():
            heads = qkv.unflatten(1, (hq + 2 * hkv, 64))
            args = (inputs["cos"], inputs["sin"], inputs["positions"], provider == "upstream")
            q = _torch_norm_rope(heads[:, :hq], *args)
            k = _torch_norm_rope(heads[:, hq : hq + hkv], *args)
            return varlen_attention(q, k, heads[:, hq + hkv :], cu, max_len).flatten(1)  # FA2, GQA, scale 1/8

    mean = _timed(benchmark, fn)
    _extra_info(benchmark, provider)
    benchmark.extra_info.update(tflops_per_s=flops / mean / 1e12, heads=f"{hq}/{hkv}", rows=int(cu[-1]))


@pytest.mark.parametrize("blocks", list(ATTENTION_BLOCKS))
@pytest.mark.parametrize("side", list(SIDES))
@pytest.mark.parametrize("mix", list(MIXES))
def test_attention_blocks(benchmark, mix, side, blocks):
    """The fused attention with each candidate block shape (``ATTENTION_BLOCKS``; the first is the default), on
    the same inputs as ``test_attention`` (``v1-mix``) and on one clip (``one-clip``, a batch of one): the
    measurement that picks the default, and says whether a batch of one wants another."""
    benchmark.group = f"kernel-attention-blocks-{mix}-{side}-{SIDES[side][0]}q{SIDES[side][1]}kv"
    hq, hkv = SIDES[side]
    inputs, flops = _attention_inputs(hq, hkv, MIXES[mix])
    args = (inputs["qkv"], *inputs["norms"], inputs["cu"], inputs["positions"], inputs["cos"], inputs["sin"])
    mean = _timed(benchmark, lambda: mrope_attention(*args, hq, hkv, blocks=blocks))
    _extra_info(benchmark, f"titok[{blocks}]")
    benchmark.extra_info.update(tflops_per_s=flops / mean / 1e12, heads=f"{hq}/{hkv}", rows=int(inputs["cu"][-1]),
                                baseline=blocks == next(iter(ATTENTION_BLOCKS)))  # (the default: the table's ratios)


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
@pytest.mark.parametrize("side", list(SIDES))
def test_prologue_heads(benchmark, side, heads):
    """The q/k norm + M-RoPE prologue alone with each number of heads per program (``NORM_CONFIG["HEADS"]``, the
    default, 4; a second grid axis runs the head groups), on ``test_attention``'s inputs: GB/s of the q/k columns
    read and written."""
    benchmark.group = f"kernel-prologue-heads-{side}-{SIDES[side][0]}q{SIDES[side][1]}kv"
    hq, hkv = SIDES[side]
    inputs, _ = _attention_inputs(hq, hkv)
    qkv, cu = inputs["qkv"], inputs["cu"]
    qk = torch.empty(qkv.shape[0], (hq + hkv) * 64, dtype=qkv.dtype, device=qkv.device)
    args = (qkv, qk, *inputs["norms"], cu, inputs["positions"], inputs["cos"], inputs["sin"], hq, hkv)
    mean = _timed(benchmark, lambda: qk_norm_rope(*args, heads_per_program=heads))
    _extra_info(benchmark, f"titok_prologue[{heads} heads]")
    moved = 2 * qk.numel() * qk.element_size()  # the q/k columns read, then written
    benchmark.extra_info.update(gb_per_s=moved / mean / 1e9, heads=f"{hq}/{hkv}", rows=int(cu[-1]),
                                baseline=heads == NORM_CONFIG["HEADS"])  # (the default: the table's ratios)


@pytest.mark.parametrize("provider", ["titok", "torch"])
def test_fsq_encoder_head(benchmark, provider):
    """Fused ln_post + proj_out + FSQ against the same three steps unfused in PyTorch (bf16, FSQ in float32)."""
    benchmark.group = "kernel-fsq-encoder-head"
    width, num_rows, levels = 1024, 8 * 1024, [7, 7, 7, 5, 5]
    consts = FsqConstants.of(levels, "cuda")
    x = torch.randn(num_rows, width, device="cuda", dtype=torch.bfloat16)
    params = [
        torch.ones(width, device="cuda", dtype=torch.bfloat16),
        torch.zeros(width, device="cuda", dtype=torch.bfloat16),
        torch.randn(len(levels), width, device="cuda", dtype=torch.bfloat16) / math.sqrt(width),
        torch.zeros(len(levels), device="cuda", dtype=torch.bfloat16),
    ]
    def unfused(x, ln_weight, ln_bias, proj_weight, proj_bias, consts):
        z = torch.nn.functional.linear(torch.nn.functional.layer_norm(x, (width,), ln_weight, ln_bias), proj_weight,
                                       proj_bias)  # fmt: skip
        codes, indices = fsq_quantize_ref(z, consts)
        return codes.to(x.dtype), indices

    op = fsq_encoder_head if provider == "titok" else unfused
    mean = _timed(benchmark, lambda: op(x, *params, consts))
    _extra_info(benchmark, provider)
    benchmark.extra_info.update(gb_per_s=(x.numel() * 2 + num_rows * (len(levels) * 2 + 4)) / mean / 1e9)


@pytest.mark.parametrize("provider", ["titok", "torch"])
def test_fsq_decoder_input(benchmark, provider):
    """The decoder input gather against PyTorch's indexing with the latent rows precomputed (as the torch
    backend does it)."""
    benchmark.group = "kernel-fsq-decoder-input"
    width, num_codes = 2048, 8575
    counts = [n for n, _ in VIDEOS]
    lengths = [n + gt * gh * gw for n, (gt, gh, gw) in VIDEOS]
    table = torch.randn(num_codes, width, device="cuda", dtype=torch.bfloat16)
    mask_row = torch.randn(width, device="cuda", dtype=torch.bfloat16)
    indices = torch.randint(0, num_codes, (sum(counts),), device="cuda", dtype=torch.int32)

    def cumulative(values):
        return torch.tensor([0, *torch.tensor(values).cumsum(0).tolist()], dtype=torch.int32, device="cuda")

    out = torch.empty(sum(lengths), width, device="cuda", dtype=torch.bfloat16)
    args = (indices, table, mask_row, cumulative(lengths), cumulative(counts))
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    latent_rows = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts, strict=True)]).cuda()

    def indexed(indices, table, mask_row, cu_seqlens, cu_tokens, out):
        out.copy_(mask_row.expand_as(out))
        out[latent_rows] = table[indices.long()]
        return out

    op = fsq_decoder_input if provider == "titok" else indexed
    mean = _timed(benchmark, lambda: op(*args, out=out))
    _extra_info(benchmark, provider)
    benchmark.extra_info.update(gb_per_s=(out.numel() + sum(counts) * width) * 2 / mean / 1e9)


@pytest.mark.parametrize("size", ["720p", "256p"])
@pytest.mark.parametrize("provider", ["titok", "torch"])
def test_nv12_rgb(benchmark, provider, size):
    """One NVDEC frame (an NV12 surface) to RGB: GPU time by do_bench, and the host's CPU time per call over calls
    made back to back (thread time, no synchronisation inside), as a decoding thread makes them."""
    benchmark.group = f"kernel-nv12-rgb-{size}"
    height, width = {"720p": (720, 1280), "256p": (256, 456)}[size]
    nv12 = torch.randint(0, 256, (height * 3 // 2, width), dtype=torch.uint8, device="cuda")
    op = nv12_rgb if provider == "titok" else nv12_rgb_ref
    mean = _timed(benchmark, lambda: op(nv12, height, "bt709"))
    torch.cuda.synchronize()
    calls, started = 200, time.thread_time()
    for _ in range(calls):
        op(nv12, height, "bt709")
    host = (time.thread_time() - started) / calls
    torch.cuda.synchronize()
    _extra_info(benchmark, provider)
    benchmark.extra_info.update(gb_per_s=(nv12.numel() + height * width * 3) / mean / 1e9, host_us_per_call=host * 1e6)


@pytest.mark.parametrize("case", ["encoder", "decoder", "decoder-fp8"])
@pytest.mark.parametrize("provider", ["titok", "titok-8", "torch"])
def test_gated_gelu(benchmark, provider, case):
    """The FFN's gated GELU of a V1 batch of 32 clips (3136 rows each): the kernel against PyTorch's two (and the
    FP8 quantisation after them, for the decoder's FP8 Linears). ``titok-8``: the FP8 kernel with 8 values of a
    tile a thread (half the registers, 8-byte stores) instead of 16."""
    from titok_fast.layers import GatedGelu

    benchmark.group = f"kernel-gated-gelu-{case}"
    inner, fp8 = (1376 if case == "encoder" else 2752), case.endswith("fp8")
    if provider == "titok-8" and not fp8:
        pytest.skip("the FP8 kernel's option")
    x = torch.randn(32 * 3136, 2 * inner, device="cuda", dtype=torch.bfloat16)
    module = GatedGelu()
    if provider.startswith("titok"):
        per_thread = 8 if provider == "titok-8" else 16
        mean = _timed(benchmark, lambda: gated_gelu(x, fp8=fp8, values_per_thread=per_thread))
    else:
        mean = _timed(benchmark, lambda: quantize_rows_fp8(module(x)) if fp8 else module(x))
    _extra_info(benchmark, provider)
    written = x.shape[0] * (inner * (1 if fp8 else 2) + (4 if fp8 else 0))
    benchmark.extra_info.update(gb_per_s=(x.numel() * 2 + written) / mean / 1e9)


@pytest.mark.parametrize("side", ["encoder", "decoder"])
@pytest.mark.parametrize("provider", ["titok", "torch"])
def test_layer_norm(benchmark, provider, side):
    """A layer's LayerNorm of a V1 batch of 32 clips (3136 rows each), bf16 with a perturbed affine: the kernel
    against PyTorch's module."""
    benchmark.group = f"kernel-layer-norm-{side}"
    width = 1024 if side == "encoder" else 2048
    x = torch.randn(32 * 3136, width, device="cuda", dtype=torch.bfloat16)
    module = torch.nn.LayerNorm(width, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        module.weight.normal_(1, 0.3)
        module.bias.normal_(0, 0.3)
    if provider == "titok":
        mean = _timed(benchmark, lambda: layer_norm(x, module.weight, module.bias, module.eps))
    else:
        mean = _timed(benchmark, lambda: module(x))
    _extra_info(benchmark, provider)
    benchmark.extra_info.update(gb_per_s=x.numel() * 2 * 2 / mean / 1e9)
