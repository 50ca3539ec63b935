"""FSQ kernels (encoder head, decoder input) vs their references: interpreter on CPU, compiled on CUDA."""

from __future__ import annotations

import sys

import pytest
import torch
import triton
import triton.language as tl

import titok_fast.kernels.fsq as fsq
from titok_fast.kernels.fsq import (
    FsqConstants,
    fsq_decoder_input,
    fsq_decoder_input_ref,
    fsq_encoder_head,
    fsq_encoder_head_ref,
)

from triton_mode import triton_mode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LEVELS = [
    pytest.param([7, 7, 7, 5, 5], id="7-7-7-5-5"),
    pytest.param([8, 5, 5, 5], id="8-5-5-5"),
    pytest.param([7, 5, 5, 5, 5], id="7-5-5-5-5"),
    pytest.param([2, 3], id="2-3"),
    pytest.param([3] * 7 + [2] * 2, id="3x7-2x2"),  # more levels than the kernel took before (8; a config: 15)
    pytest.param([32, 32, 32], id="32-32-32"),  # levels past 25 where upstream's indices are exact: a config may have
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


@pytest.fixture(autouse=True, scope="module")
def _triton_backend():
    """Interpreter without CUDA, whatever TRITON_INTERPRET was when triton was first imported."""
    with triton_mode(not torch.cuda.is_available(), sys.modules[__name__]):
        yield


def _head_params(num_rows, width, levels, dtype):
    """Latent rows and ln_post/proj_out weights scaled so that z spans every level of every dimension."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(num_rows, width, generator=g) * 3 + 1
    params = [
        1 + 0.3 * torch.randn(width, generator=g),
        0.2 * torch.randn(width, generator=g),
        torch.randn(len(levels), width, generator=g) * 1.5 / width**0.5,
        0.3 * torch.randn(len(levels), generator=g),
    ]
    return [t.to(device=DEVICE, dtype=dtype) for t in [x, *params]]


# every level set in fp32 and bf16; fp16 (the same loads and stores as bf16, other rounding) for V1's levels
HEAD_CASES = [
    pytest.param(level.values[0], dtype.values[0], id=f"{level.id}-{dtype.id}")
    for level in LEVELS
    for dtype in DTYPES
    if dtype.id != "fp16" or level.id == "7-7-7-5-5"
]


@pytest.mark.parametrize("levels, dtype", HEAD_CASES)
def test_encoder_head_matches_ref(levels, dtype):
    consts = FsqConstants.of(levels, DEVICE)
    params = _head_params(2000, 200, levels, dtype)
    before = [t.clone() for t in params]
    codes, indices = fsq_encoder_head(*params, consts)
    ref_codes, ref_indices = fsq_encoder_head_ref(*params, consts)
    assert codes.dtype == dtype and indices.dtype == torch.int32
    same = indices == ref_indices
    assert same.float().mean() >= 0.999, f"{(~same).sum()} of {len(same)} indices differ"
    assert torch.equal(codes[same], ref_codes[same])
    assert len(indices.unique()) > 0.2 * min(consts.codebook_size, 2000)  # the levels are all exercised
    for t, b in zip(params, before, strict=True):
        assert torch.equal(t, b)


@pytest.mark.parametrize("num_rows, width", [(1, 1024), (5, 2048), (37, 77)], ids=["1x1024", "5x2048", "37x77"])
def test_encoder_head_shapes(num_rows, width):
    levels = [7, 7, 7, 5, 5]
    consts = FsqConstants.of(levels, DEVICE)
    params = _head_params(num_rows, width, levels, torch.float32)
    codes, indices = fsq_encoder_head(*params, consts)
    ref_codes, ref_indices = fsq_encoder_head_ref(*params, consts)
    assert torch.equal(indices, ref_indices) and torch.equal(codes, ref_codes)
    assert bool((indices >= 0).all())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # (the interpreter's NumPy, on NaN)
def test_encoder_head_gives_rows_of_nan_index_minus_one():
    """A row that overflowed (NaN or inf in it: NaN once normed) has no code: index -1 on every device, where the
    conversion of NaN to an integer would give INT_MIN on a CPU and 0 on a GPU; the other rows are unchanged."""
    levels = [7, 7, 7, 5, 5]
    consts = FsqConstants.of(levels, DEVICE)
    params = _head_params(37, 77, levels, torch.float32)
    clean = fsq_encoder_head(*params, consts)[1]
    params[0][3, 5], params[0][10, 0], params[0][36, 76] = torch.nan, torch.inf, -torch.inf
    codes, indices = fsq_encoder_head(*params, consts)
    ref_codes, ref_indices = fsq_encoder_head_ref(*params, consts)
    bad = torch.zeros(37, dtype=torch.bool, device=DEVICE)
    bad[[3, 10, 36]] = True
    assert torch.equal(indices, ref_indices) and indices[bad].tolist() == [-1, -1, -1]
    assert torch.equal(indices[~bad], clean[~bad]) and bool(codes[bad].isnan().all())


@triton.jit
def _bound_and_round_kernel(x_ptr, tanh_ptr, round_ptr, n, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    x = tl.load(x_ptr + o, mask=m)
    tl.store(tanh_ptr + o, fsq._tanh(x, PRECISE), mask=m)
    tl.store(round_ptr + o, fsq._round_half_even(x), mask=m)


def test_tanh_and_round_half_even():
    """tanh (exp-based in the interpreter, libdevice on a GPU) is within 2.5e-7 of torch.tanh; rounding equals
    torch.round, ties and near-ties."""
    ties = torch.arange(-20, 21) / 2
    near = torch.tensor([0.49999997, -0.49999997, 2.4999998, 2.5000002, -1.5000001, 3.4999998, 1e-30, -0.0])
    x = torch.cat([torch.randn(20000) * 3, ties, near, ties.nextafter(ties + 1), ties.nextafter(ties - 1)])
    x = x.to(DEVICE)
    out_tanh, out_round = torch.empty_like(x), torch.empty_like(x)
    _bound_and_round_kernel[(triton.cdiv(x.numel(), 1024),)](
        x, out_tanh, out_round, x.numel(), PRECISE=x.is_cuda, BLOCK=1024
    )
    assert (out_tanh.double() - torch.tanh(x.double())).abs().max() <= 2.5e-7
    assert torch.equal(out_round, torch.round(x))


def _decoder_batch(token_counts, seq_lens, width, dtype, index_dtype, pad_rows=0):
    num_codes = 50
    table = torch.randn(num_codes, width).to(device=DEVICE, dtype=dtype)
    mask_row = torch.randn(width).to(device=DEVICE, dtype=dtype)
    indices = torch.randint(0, num_codes, (sum(token_counts),), dtype=index_dtype, device=DEVICE)

    def cu(counts):
        return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)

    out = torch.full((sum(seq_lens) + pad_rows, width), float("nan"), dtype=dtype, device=DEVICE)
    args = dict(indices=indices, table=table, mask_row=mask_row, cu_seqlens=cu(seq_lens), cu_tokens=cu(token_counts))
    return args, out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize(
    "token_counts, seq_lens",
    [([1], [2]), ([3, 1, 0, 17, 5], [9, 2, 4, 217, 5]), ([2] * 40, [3] * 40)],
    ids=["token_count_1", "mixed", "many"],
)
def test_decoder_input_matches_ref(token_counts, seq_lens, index_dtype, dtype):
    args, out = _decoder_batch(token_counts, seq_lens, 300, dtype, index_dtype, pad_rows=11)
    before = {k: v.clone() for k, v in args.items()}
    result = fsq_decoder_input(**args, out=out)
    assert result is out
    expected = fsq_decoder_input_ref(**args, out=torch.full_like(out, float("nan")))
    torch.testing.assert_close(out, expected, atol=0, rtol=0, equal_nan=True)
    assert out[-11:].isnan().all() and not out[:-11].isnan().any()
    for name, t in before.items():
        assert torch.equal(args[name], t), f"{name} was modified"
    allocated = fsq_decoder_input(**args, num_rows=sum(seq_lens))
    torch.testing.assert_close(allocated, expected[:-11], atol=0, rtol=0)


def test_decoder_input_takes_strided_indices_table_and_output():
    """A strided view of indices (every other element of a larger tensor) gathers the codes it shows; a table and
    an output whose rows are further apart than their width are read and written where their rows are."""
    args, out = _decoder_batch([3, 1, 17], [9, 2, 217], 64, torch.float32, torch.int64)
    strided = torch.stack([args["indices"], torch.zeros_like(args["indices"])], 1).flatten()[::2]
    assert not strided.is_contiguous()
    expected = fsq_decoder_input_ref(**args, out=out.clone())
    torch.testing.assert_close(fsq_decoder_input(**{**args, "indices": strided}, out=out), expected, atol=0, rtol=0)
    table = torch.full((args["table"].shape[0], 100), 7.0, device=DEVICE)  # (7: no row's value)
    table[:, :64] = args["table"]
    wide_out = torch.full((out.shape[0], 90), 5.0, device=DEVICE)
    got = fsq_decoder_input(**{**args, "table": table[:, :64]}, out=wide_out[:, :64])
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert bool((wide_out[:, 64:] == 5.0).all())


def test_decoder_input_of_part_of_a_pack_leaves_the_rows_before_it():
    """cu_seqlens / cu_tokens that start past 0 (slices of a pack's): rows before the first sequence belong to no
    sequence and are left as they are (their tokens were read from before the start of indices)."""
    args, out = _decoder_batch([3, 1, 17, 5], [9, 2, 217, 5], 64, torch.float32, torch.int32)
    part = {**args, "cu_seqlens": args["cu_seqlens"][2:], "cu_tokens": args["cu_tokens"][2:]}  # sequences 2 and 3
    expected = fsq_decoder_input_ref(**part, out=out.clone())
    torch.testing.assert_close(fsq_decoder_input(**part, out=out), expected, atol=0, rtol=0, equal_nan=True)
    assert out[:11].isnan().all() and not out[11:].isnan().any()


def test_bad_arguments():
    consts = FsqConstants.of([7, 7, 7, 5, 5], DEVICE)
    x, *params = _head_params(4, 64, [7, 7, 7, 5, 5], torch.float32)
    with pytest.raises(ValueError, match="proj_weight"):
        fsq_encoder_head(x, params[0], params[1], params[2][:4], params[3], consts)
    with pytest.raises(TypeError, match="x dtype"):
        fsq_encoder_head(x.double(), *params, consts)
    args, out = _decoder_batch([2], [3], 8, torch.float32, torch.int32)
    with pytest.raises(ValueError, match="num_rows"):
        fsq_decoder_input(**args)
    with pytest.raises(ValueError, match="cu_tokens"):
        fsq_decoder_input(**{**args, "cu_tokens": args["cu_tokens"].long()}, out=out)
    with pytest.raises(TypeError, match="mask_row dtype"):
        fsq_decoder_input(**{**args, "mask_row": args["mask_row"].half()}, out=out)


@pytest.mark.gpu
def test_encoder_head_bf16_gpu():
    """bf16 on the GPU (V1 encoder width): indices agree with the reference on >= 99.9% of rows."""
    levels = [7, 7, 7, 5, 5]
    consts = FsqConstants.of(levels, DEVICE)
    params = _head_params(8192, 1024, levels, torch.bfloat16)
    codes, indices = fsq_encoder_head(*params, consts)
    ref_codes, ref_indices = fsq_encoder_head_ref(*params, consts)
    same = indices == ref_indices
    assert same.float().mean() >= 0.999
    assert torch.equal(codes[same], ref_codes[same])
