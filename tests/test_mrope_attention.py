"""mrope_attention vs mrope_attention_ref: Triton interpreter on CPU, compiled on CUDA (fp32, fp16, bf16)."""

from __future__ import annotations

import pytest
import torch

from titok_fast.kernels.mrope_attention import (
    ATTENTION_BLOCKS,
    mrope_attention,
    mrope_attention_ref,
    mrope_tables,
    packed_positions,
    qk_norm_rope,
    qk_norm_rope_ref,
)

from triton_mode import triton_mode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [
    pytest.param(torch.float32, 2e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 4e-3, 4e-3, id="fp16"),
    pytest.param(torch.bfloat16, 3e-2, 1.6e-2, id="bf16"),
]
HEADS = [pytest.param(8, 2, id="8q2kv"), pytest.param(12, 4, id="12q4kv")]


@pytest.fixture(autouse=True, scope="module")
def _triton_backend():
    """Interpreter without CUDA, whatever TRITON_INTERPRET was when triton was first imported."""
    with triton_mode(interpret=not torch.cuda.is_available()):
        yield


def _batch(
    lengths=None, num_q_heads=8, num_kv_heads=2, dtype=torch.float32, *, pad_rows=0, videos=None, pad=float("nan"),
    spread=2.0,
):
    """Packed qkv [R, ...] of sequences with the given lengths (random positions), or of videos
    ``[(n, (gt, gh, gw)), ...]`` (real M-RoPE positions), values of standard deviation ``spread`` around 0.5;
    ``pad_rows`` rows of ``pad`` past the real ones."""
    if videos is not None:
        positions = packed_positions([n for n, _ in videos], [g for _, g in videos])
        lengths = [n + gt * gh * gw for n, (gt, gh, gw) in videos]
    else:
        positions = torch.randint(0, 300, (sum(lengths), 3), dtype=torch.int32)
    positions = torch.cat([positions, torch.zeros(pad_rows, 3, dtype=torch.int32)])
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    qkv = torch.randn(positions.shape[0], (num_q_heads + 2 * num_kv_heads) * 64) * spread + 0.5
    qkv[cu_seqlens[-1] :] = pad
    cos, sin = mrope_tables(int(positions.max()) + 1)
    norm = [torch.randn(64) * 0.3 + 1, torch.randn(64) * 0.2, torch.randn(64) * 0.3 + 1, torch.randn(64) * 0.2]
    to = {"device": DEVICE}
    return dict(
        qkv=qkv.to(dtype=dtype, **to),
        q_norm_weight=norm[0].to(dtype=dtype, **to),
        q_norm_bias=norm[1].to(dtype=dtype, **to),
        k_norm_weight=norm[2].to(dtype=dtype, **to),
        k_norm_bias=norm[3].to(dtype=dtype, **to),
        cu_seqlens=cu_seqlens.to(**to),
        positions=positions.to(**to),
        cos=cos.to(**to),
        sin=sin.to(**to),
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
    )


def _nan_like(shape, like):
    return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)


def _assert_close(actual, expected, atol, rtol):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


CASES = {
    "lengths_1_17_217": dict(lengths=[1, 17, 217]),
    "many_short": dict(lengths=[3, 1, 2, 9, 1, 5, 33, 2, 1, 7, 4, 6]),
    "videos": dict(videos=[(1, (1, 1, 1)), (4, (1, 2, 3)), (9, (2, 3, 5))]),  # token count 1, single patch
}


@pytest.mark.parametrize("dtype, atol, rtol", CPU_DTYPES)
@pytest.mark.parametrize("num_q_heads, num_kv_heads", HEADS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_ref(case, num_q_heads, num_kv_heads, dtype, atol, rtol):
    args = _batch(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, dtype=dtype, **CASES[case])
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    out = _nan_like((args["qkv"].shape[0], num_q_heads * 64), args["qkv"])
    result = mrope_attention(**args, out=out)
    assert result is out and out.dtype == dtype
    _assert_close(out, mrope_attention_ref(**args), atol, rtol)
    for name, tensor in before.items():
        torch.testing.assert_close(args[name], tensor, equal_nan=True, atol=0, rtol=0, msg=f"{name} was modified")


def test_rows_of_little_variance_keep_the_norms_eps():
    """q/k rows whose variance is near the LayerNorm's eps (a spread of 0.003): the eps counts, as in the
    reference (the other tests' rows have a variance of about 4, where it does not show)."""
    args = _batch(lengths=[9, 40], spread=0.003)
    _assert_close(mrope_attention(**args), mrope_attention_ref(**args), 2e-5, 1e-5)


def _distinct_tiles() -> list[str]:
    """One ATTENTION_BLOCKS name per (BLOCK_M, BLOCK_N, TMA, fold_q, pipeline) other than the default's: warps,
    stages and register caps change nothing the interpreter computes (every one is compiled for sm_90 by
    test_sm90_compile.py)."""
    seen, names = set(), []
    for name, b in ATTENTION_BLOCKS.items():
        if (b.block_m, b.block_n, b.tma, b.fold_q, b.pipeline) not in seen:
            seen.add((b.block_m, b.block_n, b.tma, b.fold_q, b.pipeline))
            names.append(name)
    return names[1:]  # the first is the default's


@pytest.mark.parametrize("blocks", _distinct_tiles())
def test_every_block_shape_matches_ref(blocks):
    """The tile shapes a GPU benchmark compares (the default is tested above) compute the same attention:
    sequences shorter and longer than their tiles, a group of 3 that does not divide BLOCK_M, a query subset."""
    args = _batch([1, 70, 200], 12, 4, torch.float16, pad_rows=5)  # every tail tile reaches the NaN padding
    _assert_close(mrope_attention(**args, blocks=blocks)[:271], mrope_attention_ref(**args)[:271], 4e-3, 4e-3)
    args = _batch([5, 130], 6, 2, torch.float16)
    query = dict(
        q_cu_seqlens=torch.tensor([0, 3, 103], dtype=torch.int32, device=DEVICE),
        q_starts=torch.tensor([2, 30], dtype=torch.int32, device=DEVICE),
        num_q_rows=103,
    )
    _assert_close(
        mrope_attention(**args, **query, blocks=blocks), mrope_attention_ref(**args, **query), 4e-3, 4e-3
    )


PIPELINED = [name for name, b in ATTENTION_BLOCKS.items() if b.pipeline]


@pytest.mark.parametrize("blocks", PIPELINED)
def test_pipelined_blocks_are_the_same_arithmetic(blocks):
    """Asking for the next key block's scores before this block's softmax changes when the work is issued, not
    what is computed: bit for bit the output of the same tiles without it, for sequences of no full key block,
    of exactly one and two, and of several with a ragged tail (bf16, NaN padding after the last)."""
    b = ATTENTION_BLOCKS[blocks]
    plain = next(name for name, p in ATTENTION_BLOCKS.items()
                 if (p.block_m, p.block_n, p.tma, p.fold_q, p.pipeline) == (b.block_m, b.block_n, b.tma, b.fold_q,
                                                                            False))  # fmt: skip
    n = b.block_n
    lengths = [n - 1, n, 2 * n, 3 * n + 5, 1]
    args = _batch(lengths, 8, 2, torch.bfloat16, pad_rows=3)
    rows = sum(lengths)
    assert torch.equal(mrope_attention(**args, blocks=blocks)[:rows], mrope_attention(**args, blocks=plain)[:rows])


def test_block_shapes_are_checked():
    args = _batch([3, 4], 8, 2, torch.float16)
    with pytest.raises(ValueError, match="blocks must be one of"):
        mrope_attention(**args, blocks="m512n512")
    with pytest.raises(ValueError, match="fp32 has one configuration"):
        mrope_attention(**_batch([3, 4], 8, 2, torch.float32), blocks="m128n64w8s3")
    wide = torch.zeros(7, 12 * 64 + 1, dtype=torch.float16, device=DEVICE)  # rows of 1537 values: 3074 bytes
    args["qkv"] = wide[:, : 12 * 64]
    with pytest.raises(ValueError, match="TMA blocks need 16-byte aligned qkv rows"):
        mrope_attention(**args, blocks="m128n64w8s3-tma")


@pytest.mark.parametrize("dtype, atol, rtol", CPU_DTYPES)
def test_padded_buffer(dtype, atol, rtol):
    """R larger than cu_seqlens[-1] (token-budget buffer): NaN padding rows are never read, their output rows
    stay untouched."""
    args = _batch([17, 40, 1], 8, 2, dtype, pad_rows=23)
    real = int(args["cu_seqlens"][-1])
    out = mrope_attention(**args, out=_nan_like((args["qkv"].shape[0], 8 * 64), args["qkv"]))
    _assert_close(out[:real], mrope_attention_ref(**args)[:real], atol, rtol)
    assert out[real:].isnan().all()


def test_part_of_a_pack_leaves_the_rows_before_it():
    """cu_seqlens that start past 0 (a slice of a pack's): rows before the first sequence belong to no sequence,
    and their output rows are left as they are, with all queries and with a query subset."""
    args = _batch([117, 40, 9, 30], 4, 2)
    part = {**args, "cu_seqlens": args["cu_seqlens"][2:]}  # sequences 2 and 3: rows 157..196
    original = args["qkv"].clone()
    out = mrope_attention(**part, out=_nan_like((196, 4 * 64), original), inplace=True)  # q, k rotated in qkv
    _assert_close(out[157:], mrope_attention_ref(**{**part, "qkv": original})[157:], 1e-5, 1e-5)
    assert out[:157].isnan().all() and torch.equal(args["qkv"][:157], original[:157])  # rows before: untouched
    # query rows from 150 on (beyond the blocks of rows of the first program ids)
    query = dict(q_cu_seqlens=torch.tensor([150, 155, 158], dtype=torch.int32, device=DEVICE),
                 q_starts=torch.tensor([0, 2], dtype=torch.int32, device=DEVICE), num_q_rows=158)  # fmt: skip
    part = {**part, "qkv": original}
    out = mrope_attention(**part, **query, out=_nan_like((158, 4 * 64), original))
    _assert_close(out[150:], mrope_attention_ref(**part, **query)[150:], 1e-5, 1e-5)
    assert out[:150].isnan().all()


@pytest.mark.parametrize("dtype, atol, rtol", CPU_DTYPES)
@pytest.mark.parametrize("num_q_heads, num_kv_heads", HEADS)
@pytest.mark.parametrize("subset", ["latents", "patches"])
def test_query_subset(subset, num_q_heads, num_kv_heads, dtype, atol, rtol):
    videos = [(1, (1, 1, 1)), (20, (1, 3, 4)), (5, (2, 4, 5))]
    args = _batch(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, dtype=dtype, videos=videos, pad_rows=7)
    counts = [n if subset == "latents" else gt * gh * gw for n, (gt, gh, gw) in videos]
    starts = [0 if subset == "latents" else n for n, _ in videos]
    query = dict(
        q_cu_seqlens=torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE),
        q_starts=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        num_q_rows=sum(counts) + 5,  # a larger output buffer: its last 5 rows stay untouched
    )
    out = mrope_attention(**args, **query, out=_nan_like((sum(counts) + 5, num_q_heads * 64), args["qkv"]))
    expected = mrope_attention_ref(**args, **query)
    _assert_close(out[: sum(counts)], expected[: sum(counts)], atol, rtol)
    assert out[sum(counts) :].isnan().all()
    full = mrope_attention_ref(**args)
    begins = args["cu_seqlens"][:-1].tolist()
    rows = torch.cat([torch.arange(c) + s + b for c, s, b in zip(counts, starts, begins, strict=True)]).to(DEVICE)
    _assert_close(expected[: sum(counts)], full[rows], 0, 0)


FOLD_Q = next(name for name, b in ATTENTION_BLOCKS.items() if b.fold_q)


@pytest.mark.parametrize(
    "dtype, atol, rtol, blocks",
    [pytest.param(*d.values, None, id=d.id) for d in CPU_DTYPES]
    + [pytest.param(*CPU_DTYPES[-1].values, FOLD_Q, id=f"{CPU_DTYPES[-1].id}-{FOLD_Q}")],
)
@pytest.mark.parametrize("alias_out", [False, True], ids=["new_out", "out_in_q_columns"])
def test_inplace(alias_out, dtype, atol, rtol, blocks):
    """inplace=True rotates q/k inside qkv (v untouched); the output may then even overwrite qkv's q columns. Also
    with q normalised by the attention kernel as it loads it (the prologue then rotates k only)."""
    args = _batch([5, 217, 30], 12, 4, dtype, pad_rows=3, pad=7.0)  # (finite: a write there would show)
    expected = mrope_attention_ref(**args)
    qkv = args["qkv"]
    v_before, pad_before = qkv[:, 16 * 64 :].clone(), qkv[252:].clone()
    out = qkv[:, : 12 * 64] if alias_out else None
    result = mrope_attention(**args, inplace=True, out=out, blocks=blocks)
    _assert_close(result[:252], expected[:252], atol, rtol)
    torch.testing.assert_close(qkv[:, 16 * 64 :], v_before, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(qkv[252:], pad_before, equal_nan=True, atol=0, rtol=0)


def test_bad_arguments():
    args = _batch([4, 3], 8, 2, torch.float32)
    with pytest.raises(ValueError, match="num_q_heads"):
        mrope_attention(**{**args, "num_q_heads": 7})
    with pytest.raises(ValueError, match="qkv has shape"):
        mrope_attention(**{**args, "qkv": args["qkv"][:, :-64]})
    with pytest.raises(TypeError, match="qkv dtype"):
        mrope_attention(**{**args, "qkv": args["qkv"].double()})
    with pytest.raises(ValueError, match="cu_seqlens"):
        mrope_attention(**{**args, "cu_seqlens": args["cu_seqlens"].long()})
    with pytest.raises(ValueError, match="positions"):
        mrope_attention(**{**args, "positions": args["positions"][:-1]})
    with pytest.raises(TypeError, match="^positions is a list; expected a torch.Tensor$"):
        mrope_attention(**{**args, "positions": args["positions"].tolist()})
    with pytest.raises(ValueError, match="go together"):
        mrope_attention(**args, q_starts=args["cu_seqlens"][:-1])
    with pytest.raises(ValueError, match=r"cos is \[\d+, 32\] and sin \[2, 32\]; expected tables of the same shape"):
        mrope_attention(**{**args, "sin": args["sin"][:2].clone()})  # positions would read sin past its end
    with pytest.raises(ValueError, match="out is"):
        mrope_attention(**args, out=torch.empty(7, 8 * 64, dtype=torch.float16, device=DEVICE))
    # the kernel reads these as contiguous: the same values with other strides are refused, not misread
    column_major = args["positions"].t().contiguous().t()
    with pytest.raises(ValueError, match=r"positions is .* strides \(1, 7\); expected contiguous int32"):
        mrope_attention(**{**args, "positions": column_major})
    strided = torch.zeros(2 * args["cu_seqlens"].numel(), dtype=torch.int32, device=DEVICE)[::2]
    strided.copy_(args["cu_seqlens"])
    with pytest.raises(ValueError, match=r"cu_seqlens is .* strides \(2,\); expected contiguous"):
        mrope_attention(**{**args, "cu_seqlens": strided})


@pytest.mark.parametrize("num_q_heads, num_kv_heads", [(16, 4), (32, 8), (12, 4)])
def test_bf16_error_within_twice_its_own_rounding(num_q_heads, num_kv_heads):
    """bf16: error vs the float64 reference within 2x the error of the same math done in fp32 and rounded to bf16
    at the end (plus one bf16 ulp); V1-like sequence lengths on the GPU, short ones in the interpreter."""
    lengths = [1024 + 2880, 5, 1100, 2048] if DEVICE == "cuda" else [1, 17, 217, 40]
    args = _batch(lengths, num_q_heads, num_kv_heads, torch.bfloat16, pad_rows=64 if DEVICE == "cuda" else 7)
    real = int(args["cu_seqlens"][-1])
    out = mrope_attention(**args)
    expected = mrope_attention_ref(**args)
    ref32 = mrope_attention_ref(**{**args, "qkv": args["qkv"].float()})
    own_error = (ref32[:real] - expected[:real].float()).abs().max()
    assert (out[:real].float() - ref32[:real]).abs().max() <= 2 * own_error + 2**-7


@pytest.mark.parametrize("q_heads", [True, False], ids=["q-and-k", "k-only"])
@pytest.mark.parametrize("num_q_heads, num_kv_heads", [*HEADS, pytest.param(4, 1, id="4q1kv")])
def test_every_head_grouping_of_the_prologue_writes_the_same_bytes(num_q_heads, num_kv_heads, q_heads):
    """The prologue alone with 1, 2, 4 (the default) and 8 heads per program: the same bytes in the q/k columns
    (the same arithmetic per value, whichever program does it), nothing written elsewhere (rows past the real ones
    and, k only, the q columns keep their NaN), and the q/k heads LayerNormed and rotated as the reference does."""
    args = _batch([1, 17, 40], num_q_heads, num_kv_heads, torch.bfloat16, pad_rows=5)
    qkv, cu = args["qkv"], args["cu_seqlens"]
    norms = [args[k] for k in ("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias")]
    rest = (cu, args["positions"], args["cos"], args["sin"], num_q_heads, num_kv_heads)
    outs = []
    for heads in (1, 2, 4, 8):
        qk = _nan_like((qkv.shape[0], (num_q_heads + num_kv_heads) * 64), qkv)
        qk_norm_rope(qkv, qk, *norms, *rest, q_heads=q_heads, heads_per_program=heads)
        outs.append(qk)
    assert all(torch.equal(o.nan_to_num(7.0), outs[2].nan_to_num(7.0)) for o in outs)
    real = int(cu[-1])
    assert bool(outs[2][real:].isnan().all())
    first = 0 if q_heads else num_q_heads * 64
    assert bool(outs[2][:real, :first].isnan().all()) and not bool(outs[2][:real, first:].isnan().any())
    q, k = qk_norm_rope_ref(qkv[:real], *norms, args["positions"][:real], args["cos"], args["sin"], num_q_heads,
                            num_kv_heads)  # fmt: skip
    got = outs[2][:real].float().unflatten(1, (-1, 64))
    _assert_close(got[:, first // 64 :], torch.cat([q, k], 1)[:, first // 64 :], 1.6e-2, 1.6e-2)
