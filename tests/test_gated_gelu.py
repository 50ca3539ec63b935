"""The FFN's gated GELU kernel (kernels/gated_gelu.py): its reference's bytes in the Triton interpreter, PyTorch's
module within the rounding of a different erf on the CPU, PyTorch's bytes on a GPU."""

from __future__ import annotations

import pytest
import torch

from titok_fast.kernels.gated_gelu import MAX_INNER, gated_gelu, gated_gelu_config, gated_gelu_ref
from titok_fast.layers import GatedGelu

from triton_mode import triton_mode

CUDA = torch.cuda.is_available()


def rows(m: int, inner: int, dtype: torch.dtype, seed: int = 0, stride: int = 0) -> torch.Tensor:
    """[m, 2 * inner] of values where erf is curved and flat (up to +-6), a zero row, rows ``stride`` apart."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, max(stride, 2 * inner), generator=g) * torch.linspace(0.1, 3, m)[:, None]
    x[m // 2] = 0
    return x.to(dtype)[:, : 2 * inner]


@pytest.mark.parametrize(("m", "inner", "stride"), [(5, 4, 0), (37, 100, 0), (9, 1030, 0), (12, 688, 1500)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fp8", [False, True])
def test_kernel_gives_the_references_bytes(m, inner, stride, dtype, fp8):
    """Rows of several column blocks (the last partly filled), row counts past a program's, rows further apart
    than they are wide; the FP8 form's codes and scales too."""
    x = rows(m, inner, dtype, seed=inner, stride=stride)
    if fp8 and dtype != torch.bfloat16:
        x = x.to(torch.bfloat16).to(dtype)  # (any dtype works; checked on bf16 values too)
    with triton_mode(interpret=True):
        got = gated_gelu(x, fp8=fp8)
    want = gated_gelu_ref(x, fp8=fp8)
    if fp8:
        assert got[0].dtype == torch.float8_e4m3fn and got[1].shape == (m, 1)
        assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])
        assert got[1][m // 2].item() == 1.0  # the zero row
    else:
        assert got.dtype == dtype and got.shape == (m, inner) and torch.equal(got, want)


@pytest.mark.parametrize("per_thread", [16, 8])
@pytest.mark.parametrize(("inner", "tiles"), [(100, 1), (2752, 3), (7000, 2), (14000, 4)])
def test_fp8_rows_held_as_one_to_four_tiles_give_the_references_codes(inner, tiles, per_thread):
    """The FP8 form holds a row as tiles (V1's decoder width 2752 as three of 1024): every tile count, the peak
    in any tile, the last tile partly filled; the default configuration and the benchmarks' other."""
    cfg = gated_gelu_config(inner, fp8=True, values_per_thread=per_thread)
    assert cfg["TILES"] == tiles and cfg["TILES"] * cfg["TILE"] >= inner > (cfg["TILES"] - 1) * cfg["TILE"]
    x = rows(max(2 * cfg["ROWS"] + 1, tiles), inner, torch.bfloat16, seed=inner)  # (a row at least a tile)
    for k in range(x.shape[0]):  # each row's peak in another tile
        x[k, k % tiles * cfg["TILE"]] = x[k, inner + k % tiles * cfg["TILE"]] = 9.0
    with triton_mode(interpret=True):
        codes, scales = gated_gelu(x, fp8=True, values_per_thread=per_thread)
    want_codes, want_scales = gated_gelu_ref(x, fp8=True)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8)) and torch.equal(scales, want_scales)


def test_several_column_blocks_are_read_where_they_are():
    """More outputs a row than one program's block: every block reads its own columns of a and g."""
    cfg = gated_gelu_config(3000, fp8=False)
    assert cfg["BLOCK"] < 3000  # (what this test needs of the configuration)
    x = rows(3, 3000, torch.float32)
    with triton_mode(interpret=True):
        got = gated_gelu(x)
    assert torch.equal(got, gated_gelu_ref(x))
    assert torch.equal(got[:, :5], gated_gelu_ref(torch.cat([x[:, :5], x[:, 3000:3005]], 1)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_is_the_module_but_for_the_cpus_erf(dtype):
    """PyTorch's module on the CPU computes the same expression with an erf of its own, a few float32 ulps off a
    correctly rounded one: in float32 that moves y by a few ulps of ``|a * g|`` (where ``1 + erf`` cancels, a
    large share of a small y), in bf16 it moves a few values by one rounding step."""
    x = rows(64, 1376, dtype, seed=3)
    got, want = gated_gelu_ref(x), GatedGelu()(x)
    a, g = x.float().chunk(2, dim=-1)
    size = (a * g).abs() + want.float().abs()
    step = 2**-21 if dtype == torch.float32 else 2**-7
    assert ((got.float() - want.float()).abs() <= step * size).all()
    if dtype == torch.bfloat16:
        assert (got != want).float().mean() < 0.01


@pytest.mark.parametrize(("x", "fp8", "said"), [
    (torch.zeros(4, 7), False, "x must be"),
    (torch.zeros(4, 8, dtype=torch.int32), False, "x must be"),
    (torch.zeros(2, 4, 8), False, "x must be"),
    (torch.zeros(8, 4).t(), False, "x must be"),
    (torch.zeros(1, 2 * MAX_INNER + 2), True, "at most"),
])  # fmt: skip
def test_launcher_refuses_what_the_kernel_would_read_wrong(x, fp8, said):
    with pytest.raises(ValueError, match=said), triton_mode(interpret=True):
        gated_gelu(x, fp8=fp8)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("inner", [1376, 2752])
def test_gpu_kernel_gives_pytorchs_values(inner):
    """Compiled: the module's bf16 values, but for Triton's libdevice erff, which on an H100 (torch 2.11+cu130)
    differed from the erff of PyTorch's CUDA build on 13% of float32 inputs: 0.5% of outputs were the next bf16
    value (this test held them byte for byte and failed there). Held as the CPU's erf is held against the module
    (:func:`test_reference_is_the_module_but_for_the_cpus_erf`): one bf16 step of gelu(g), carried through the
    product's rounding (up to two steps of a * gelu), and the tail where 1 + erf cancels, within 2^-7 of |a * g| +
    |y|; at most 1% of values differ. In FP8 the codes and scales of quantising the kernel's own bf16 values."""
    from titok_fast.kernels.fp8_quant import quantize_rows_fp8

    x = rows(4099, inner, torch.bfloat16, seed=1).cuda()
    want, got = GatedGelu()(x), gated_gelu(x)
    a, g = x.float().chunk(2, dim=-1)
    assert ((got.float() - want.float()).abs() <= 2**-7 * ((a * g).abs() + want.float().abs())).all()
    assert (got != want).float().mean().item() <= 0.01
    q, scale = gated_gelu(x, fp8=True)
    want_q, want_scale = quantize_rows_fp8(got)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scale, want_scale)


@pytest.mark.parametrize("precision", ["default", "fp8"])
def test_triton_backends_ffn_runs_the_kernels_and_hands_fp8_codes_on(precision, monkeypatch):
    """The triton backend's FFN and q/k/v projection are the modules' with the kernels: the LayerNorm's and the
    gated GELU's, and into an FP8 Linear (precision fp8: every Linear of a decoder layer) the codes and row scales
    of the kernel that makes its input (the gated GELU's, a LayerNorm's), which are what that Linear would make of
    the 16-bit rows itself (tests/test_fp8.py): no activation is quantised a second time."""
    from titok_fast import fp8
    from titok_fast.backends import TORCH, TRITON
    from titok_fast.config import SIZES, StackSize
    from titok_fast.fp8 import Fp8Linear
    from titok_fast.kernels.fp8_quant import layer_norm_rows_fp8
    from titok_fast.kernels.layer_norm import layer_norm
    from titok_fast.layers import Attention, feed_forward, perturb_norms

    torch.manual_seed(0)
    size = StackSize("tiny_thin", *SIZES["tiny_thin"])
    ffn, attn = feed_forward(size).to(torch.bfloat16), Attention(size).to(torch.bfloat16)
    perturb_norms(ffn)
    perturb_norms(attn)
    if precision == "fp8":
        for parent, name in [(ffn, "1"), (ffn, "4"), (attn, "to_qkv")]:
            setattr(parent, name, Fp8Linear.of(getattr(parent, name)))
            getattr(parent, name).fp8_weight()  # (its weights quantised now: below, nothing else may be)
    x = torch.randn(50, size.width).to(torch.bfloat16)
    with triton_mode(interpret=True), monkeypatch.context() as patched:
        patched.setattr(fp8, "quantize_rows", lambda x: pytest.fail("an activation was quantised again"))
        got, qkv = TRITON.feed_forward(ffn, x), TRITON.qkv(attn, x)

        def normed(ln, linear):
            if precision == "fp8":
                return linear.of_codes(*layer_norm_rows_fp8(x, ln.weight, ln.bias, ln.eps), x.dtype)
            return linear(layer_norm(x, ln.weight, ln.bias, ln.eps))

        h, want_qkv = normed(ffn[0], ffn[1]), normed(attn.pre_ln, attn.to_qkv)
    assert torch.equal(got, ffn[4](gated_gelu_ref(h))) and torch.equal(qkv, want_qkv)
    assert torch.equal(TORCH.feed_forward(ffn, x), ffn(x))
    assert torch.equal(TORCH.qkv(attn, x), attn.to_qkv(attn.pre_ln(x)))
