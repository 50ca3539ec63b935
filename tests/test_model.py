"""The lean model against the oracle, its API and its input checks."""

import re

import pytest
import torch

from titok_fast import TiTok, checks, reference

from helpers import agreement, distinct, make_model, make_reference, random_videos, rel_l2

MIXED = [(8, 32, 48), (4, 8, 8), (12, 24, 16), (4, 16, 40)]
MIXED_TOKENS = [16, 1, 64, 7]


@pytest.fixture(scope="module")
def tiny():
    model = make_model("tiny", "torch")
    return model, make_reference(model)


def test_torch_backend_matches_oracle_tiny(tiny):
    model, ref = tiny
    videos = random_videos(MIXED)
    codes, out = model.encode(videos, MIXED_TOKENS)
    ref_codes, ref_out = ref.encode(videos, MIXED_TOKENS)
    assert [len(i) for i in out["indices"]] == MIXED_TOKENS
    assert all(i.dtype == torch.int32 for i in out["indices"])
    assert isinstance(out["indices"], tuple)
    assert agreement(out["indices"], ref_out["indices"]) >= 0.999
    assert distinct(out["indices"]) >= 10  # the weights make tokens differ, so agreement means something
    assert codes.shape == (sum(MIXED_TOKENS), 5) and codes.dtype == torch.float32
    recon = model.decode_indices(out["indices"], MIXED)
    ref_recon = ref.decode_indices(out["indices"], MIXED)
    for r, rr, shape in zip(recon, ref_recon, MIXED, strict=True):
        assert r.shape == (3, *shape)
        assert rel_l2(r, rr) <= 1e-4


@pytest.mark.slow
def test_torch_backend_matches_oracle_v1_full_depth():
    model = make_model("v1", "torch")
    ref = make_reference(model)
    shapes, counts = [(8, 64, 64), (4, 32, 48), (8, 16, 16)], [128, 33, 1]
    videos = random_videos(shapes)
    _, out = model.encode(videos, counts)
    _, ref_out = ref.encode(videos, counts)
    assert agreement(out["indices"], ref_out["indices"]) >= 0.999
    for r, rr in zip(
        model.decode_indices(out["indices"], shapes), ref.decode_indices(out["indices"], shapes), strict=True
    ):
        assert rel_l2(r, rr) <= 1e-4


def test_clip_alone_equals_clip_in_mixed_batch(tiny):
    model, _ = tiny
    videos = random_videos(MIXED)
    _, batch = model.encode(videos, MIXED_TOKENS)
    for i, (video, n) in enumerate(zip(videos, MIXED_TOKENS, strict=True)):
        _, alone = model.encode([video], [n])
        assert torch.equal(alone["indices"][0], batch["indices"][i])


def test_decode_codes_equals_decode_indices_and_forward(tiny):
    model, _ = tiny
    videos = random_videos(MIXED[:2])
    codes, out = model.encode(videos, MIXED_TOKENS[:2])
    from_codes = model.decode(codes, MIXED_TOKENS[:2], MIXED[:2])
    from_indices = model.decode_indices(out["indices"], MIXED[:2])
    packed = model.decode_indices(torch.cat(out["indices"]), MIXED[:2], token_counts=MIXED_TOKENS[:2])
    decode_order = model.decode_indices(torch.cat(out["indices"]), MIXED_TOKENS[:2], MIXED[:2])  # a convenience
    assert all(torch.equal(a, b) for a, b in zip(decode_order, from_indices, strict=True))
    recon, fwd = model(videos, MIXED_TOKENS[:2])
    for a, b, c, d in zip(from_codes, from_indices, packed, recon, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c) and torch.equal(c, d)
    assert all(torch.equal(a, b) for a, b in zip(fwd["indices"], out["indices"], strict=True))


def test_decode_off_grid_codes_projects_them(tiny):
    model, ref = tiny
    codes = torch.rand(10, 5) * 2 - 1
    out = model.decode(codes, [10], [(4, 16, 8)])
    assert rel_l2(out[0], ref.decode(codes, [10], [(4, 16, 8)])[0]) <= 1e-4


def test_a_half_models_grid_codes_decode_as_their_indices_on_a_float32_model(tiny):
    """Codes a bf16 or fp16 model gives (its grid values rounded to its dtype: 1/3 is not float32's 1/3) are on the
    grid as compared in their own dtype: a float32 model decodes them as their indices, not projected."""
    model, _ = tiny
    indices = torch.randint(0, model.quantize.codebook_size, (8,), generator=torch.Generator().manual_seed(5))
    codes = model.quantize.indices_to_codes(indices)
    expected = model.decode_indices(indices[None], [(4, 16, 16)])[0]
    for dtype in (torch.bfloat16, torch.float16):
        assert not torch.equal(codes.to(dtype).float(), codes)  # (else the case proves nothing)
        assert torch.equal(model.decode(codes.to(dtype), [8], [(4, 16, 16)])[0], expected), dtype


@pytest.mark.parametrize("oracle", [True, False])
def test_bfloat16_runs_and_stays_near_float32(tiny, oracle):
    model, _ = tiny
    model16 = make_model("tiny", "torch").to(torch.bfloat16)
    model16 = make_reference(model16) if oracle else model16
    videos = random_videos(MIXED[:2])
    codes, out16 = model16.encode([v.bfloat16() for v in videos], MIXED_TOKENS[:2])  # the oracle takes them as given
    assert codes.dtype == torch.bfloat16
    _, out32 = model.encode(videos, MIXED_TOKENS[:2])
    assert agreement(out16["indices"], out32["indices"]) >= 0.9  # measured: about 0.97 (RESULTS.md)
    recon = model16.decode_indices(out16["indices"], MIXED[:2])
    assert recon[0].dtype == torch.bfloat16 and recon[0].shape == (3, *MIXED[0])


def test_bf16_torch_backend_not_below_oracle_noise_floor():
    """The bf16 oracle's agreement with the fp32 oracle is the floor; the torch backend stays within 1 point."""
    model32 = make_reference(make_model("tiny"))
    shapes, counts = [(12, 160, 160), (8, 128, 96), (4, 64, 64)], [256, 384, 128]  # 768 tokens: 1 point = 8
    videos = random_videos(shapes)
    _, truth = model32.encode(videos, counts)
    floors = {}
    model16 = make_model("tiny", "torch").to(torch.bfloat16)
    for backend, runner in (("reference", make_reference(model16)), ("torch", model16)):
        _, out = runner.encode([v.bfloat16() for v in videos], counts)
        floors[backend] = agreement(out["indices"], truth["indices"])
    assert floors["reference"] < 1.0  # bf16 does move some tokens: the floor is real
    assert floors["torch"] >= floors["reference"] - 0.01


def test_auto_backend_and_backend_validation():
    model = TiTok("tiny")
    assert model.backend == "auto" and model.active_backend.name == "torch"
    with pytest.raises(ValueError, match="backend 'cuda' is not one of"):
        TiTok("tiny", backend="cuda")


def test_inputs_move_to_model_dtype_and_are_not_modified(tiny):
    model, _ = tiny
    videos = [v.double() for v in random_videos(MIXED[:2])]
    before = [v.clone() for v in videos]
    codes, _ = model.encode(videos, MIXED_TOKENS[:2])
    assert codes.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(videos, before, strict=True))


def test_values_are_refused_where_the_cast_overflows_and_before():
    """float32 videos into a float16 model: 65520 casts to inf and is refused as such, as the model would index
    NaN; 65519 casts to 65504 (the largest float16), but the model overflows long before: values beyond
    65.504 are refused (test_a_float16_model_refuses_values_its_patch_embedding_would_overflow); 65.5 is taken."""
    from titok_fast.checks import check_videos

    video = torch.zeros(3, 4, 8, 8)
    video[0, 0, 0, 0] = 65.5
    assert check_videos([video], (4, 8, 8), dtype=torch.float16) == [(4, 8, 8)]
    video[0, 0, 0, 0] = 65519.0
    with pytest.raises(ValueError, match=r"video 0 holds 65519; expected values in \[-1, 1\] \(beyond 65.504"):
        check_videos([video], (4, 8, 8), dtype=torch.float16)
    video[0, 0, 0, 0] = 65520.0
    with pytest.raises(ValueError, match=r"video 0 holds 65520, beyond the model's torch.float16"):
        check_videos([video], (4, 8, 8), dtype=torch.float16)
    video[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="video 0 contains NaN or infinite values"):
        check_videos([video], (4, 8, 8), dtype=torch.float16)


def test_counts_and_grids_on_the_meta_device_are_refused_in_one_line(tiny):
    """Counts or grids as meta tensors (shapes, no values) crashed inside .item() / .tolist() with torch's own
    error; they are refused as a meta video is."""
    model, _ = tiny
    meta, indices = torch.device("meta"), torch.zeros(8, dtype=torch.int32)
    video, grid = torch.zeros(3, 4, 8, 8), torch.tensor([4, 8, 8])
    for call, what in [
        (lambda: model.encode([video], [torch.tensor(8, device=meta)]), "token count of video 0"),
        (lambda: model.encode([video], torch.tensor([8], device=meta)), "token_counts"),
        (lambda: model.decode_indices([indices], grid[None].to(meta)), "grids"),
        (lambda: model.decode_indices([indices], [grid.to(meta)]), "grid of video 0"),
        (lambda: model.decode_indices(indices, torch.tensor([8], device=meta), [(4, 8, 8)]), "grids"),
    ]:
        with pytest.raises(ValueError, match=f"^{what} is on the meta device"):
            call()


def _v(*shape):
    return torch.zeros(shape)


def test_a_float16_model_refuses_values_its_patch_embedding_would_overflow(tiny):
    """float16 holds up to 65504: pixels of 6e4 passed the check (finite in float16), the patch embedding
    overflowed, and the tokens were NaN cast to int32, which decode refuses. A 16-bit-range model takes values up
    to its largest / 1000 (65.504), as codes too; bfloat16 and float32 up to 1e9."""
    model, _ = tiny
    half = TiTok(model.config).to(torch.float16)
    video = torch.full((3, 4, 8, 8), 100.0)
    with pytest.raises(ValueError, match=r"video 0 holds -?\d+.*beyond 65.504 they are refused in torch.float16"):
        half.encode([video.half()], [1])
    codes = torch.full((1, len(model.config.fsq_levels)), 100.0, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"codes holds 100; .*beyond 65.504 "):
        half.decode(codes, [1], [(4, 8, 8)])
    assert checks.magnitude_limit(torch.bfloat16) == checks.magnitude_limit(torch.float32) == 1e9


@pytest.mark.parametrize(
    "videos, counts, error, message",
    [
        ([], [], ValueError, "empty batch"),
        (_v(3, 4, 8, 8), [1], TypeError, "wrap a single video in a list"),
        (_v(1, 1, 3, 4, 8, 8), [1], TypeError, r"or one \[videos, 3, T, H, W\] tensor, got one tensor of shape \[1, 1"),
        ([_v(3, 4, 8, 8), _v(4, 8, 8)], [1, 1], ValueError, r"video 1 has shape \[4, 8, 8\]"),
        ([_v(1, 4, 8, 8)], [1], ValueError, "video 0 has shape .*3 channels"),
        ([_v(3, 4, 8, 8), _v(3, 10, 64, 64)], [1, 1], ValueError, "video 1 .* T must be a positive multiple of 4"),
        ([_v(3, 4, 12, 8)], [1], ValueError, "H must be a positive multiple of 8"),
        ([_v(3, 4, 8, 8), _v(3, 4, 8, 8)], [1], ValueError, "got 1 token counts for 2 videos"),
        ([_v(3, 4, 8, 8)], [0], ValueError, "token count of video 0 is 0"),
        ([_v(3, 4, 8, 8)], [2.5], TypeError, "token count of video 0 is 2.5"),
        ([_v(3, 4, 8, 8)], 4, TypeError, "one integer per video"),
        ([_v(3, 4, 8, 8), _v(3, 4, 8, 8).double()], [1, 1], ValueError, "video 1 has dtype .* mixed dtypes"),
        ([torch.zeros(3, 4, 8, 8, dtype=torch.uint8)], [1], TypeError, "video 0 has dtype torch.uint8"),
        ([_v(3, 4, 8, 8), torch.full((3, 4, 8, 8), float("nan"))], [1, 1], ValueError, "video 1 contains NaN"),
        (["clip.mp4"], [1], TypeError, "video 0 is a str"),
        ([_v(3, 4, 8, 8)], [1 << 17], ValueError, r"token count of video 0 is 131072; .*\[1, 65536\]"),
        ([_v(3, 4, 8, 8)], [2**63], ValueError, "token count of video 0 is 9223372036854775808"),
        ([_v(3, 4, 8, 8).to("meta")], [1], ValueError, "video 0 is on the meta device"),
        # finite in float64, infinite in the model's float32: FSQ would index NaN
        ([_v(3, 4, 8, 8).double() + 1e300], [1], ValueError, "video 0 holds 1e[+]300, beyond .* torch.float32"),
        ([_v(3, 4, 8, 8).double() - 1e300], [1], ValueError, "video 0 holds -1e[+]300, beyond .* torch.float32"),
        # finite in float32, but the model's norms overflow near 1e20: refused well before
        ([_v(3, 4, 8, 8) + 1e30], [1], ValueError, r"video 0 holds 1e\+30; expected values in \[-1, 1\] \(beyond"),
        ([_v(3, 4, 8, 8), _v(3, 4, 8, 8) - 2e9], [1, 1], ValueError, "video 1 holds -2e[+]09; expected"),
        # no reductions for float8 on a CPU (the value check crashed inside), nor for sparse tensors
        ([_v(3, 4, 8, 8).to(torch.float8_e4m3fn)], [1], TypeError, "video 0 has dtype torch.float8_e4m3fn; expected"),
        ([_v(3, 4, 8, 8).to_sparse()], [1], TypeError, "video 0 has layout torch.sparse_coo; expected a dense"),
        # what decode refuses is not encoded: its tokens could never go back
        ([_v(3, 4, 8, 8200)], [1], ValueError, r"video 0 has shape \[3, 4, 8, 8200\]; W must be at most 8192"),
        ([torch.zeros(3, 1, 1, 1).expand(3, 20, 1088, 1920)], [1], ValueError, "T x H x W must be at most 33554432"),
        # the error names the extreme at fault (here the lowest: the highest is 0)
        ([torch.cat([_v(3, 2, 8, 8), _v(3, 2, 8, 8) - 1e30], 1)], [1], ValueError, r"video 0 holds -1e\+30; expected"),
        ([torch.cat([_v(3, 2, 8, 8), _v(3, 2, 8, 8)], 1).double().index_fill_(1, torch.tensor([3]), -1e300)], [1],
         ValueError, r"video 0 holds -1e\+300, beyond .* torch.float32"),
        # a count that is a tensor of more than one value: no count, said as the others
        ([_v(3, 4, 8, 8)], [torch.tensor([1, 2])], TypeError, r"token count of video 0 is tensor\(\[1, 2\]\); "),
    ],
)
def test_encode_rejects_bad_input(tiny, videos, counts, error, message):
    model, _ = tiny
    with pytest.raises(error, match=message):
        model.encode(videos, counts)


@pytest.mark.parametrize(
    "indices, grids, counts, error, message",
    [
        ((torch.tensor([0, 1]),), [(4, 8, 8)], None, None, None),
        ((torch.tensor([0, 1]),), torch.tensor([[4, 8, 8]]), None, None, None),  # a [videos, 3] tensor of grids
        (torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([[4, 8, 8]]), None, None),  # decode's order
        ((torch.tensor([0]),), torch.tensor([4, 8, 8]), None, ValueError, r"int64 tensor of shape \[3\]; expected"),
        ((torch.tensor([0]),), torch.tensor([[4.0, 8, 8]]), None, ValueError, "grids is a torch.float32 tensor"),
        (
            (torch.tensor([0, 4375]),),
            [(4, 8, 8)],
            None,
            ValueError,
            r"video 0 holds index 4375; .*\[0, 4375\)",
        ),
        ((torch.tensor([-1]),), [(4, 8, 8)], None, ValueError, "holds index -1"),
        ((torch.tensor([0.0]),), [(4, 8, 8)], None, TypeError,
         r"video 0 has dtype torch.float32; .*\(call .long\(\) on it\)$"),
        (torch.tensor([[0, 1], [2, 3]]), [(4, 8, 8)] * 2, None, None, None),  # [videos, n]: a row a video
        (torch.tensor([[0, 1], [2, 3]]), [(4, 8, 8)] * 2, [2, 2], None, None),
        (torch.tensor([[0, 1], [2, 3]]), [(4, 8, 8)] * 2, [1, 3], ValueError, "do not match the index lengths"),
        (torch.zeros(1, 2, 2, dtype=torch.long), [(4, 8, 8)], None, ValueError,
         r"shape \[1, 2, 2\]; expected one packed"),
        (torch.tensor([0, 1]), [(4, 8, 8)], None, ValueError, "no token_counts"),
        (torch.tensor([0, 1]), [(4, 8, 8)], [3], ValueError, "2 entries but token_counts sum to 3"),
        ((torch.tensor([0]), torch.tensor([1])), [(4, 8, 8)], None, ValueError, "got 1 grids for 2 videos"),
        (
            (torch.tensor([0]),),
            [(4, 8, 9)],
            None,
            ValueError,
            "grid of video 0 .* W must be a positive multiple",
        ),
        ((torch.tensor([0]),), [(4, 8)], None, ValueError, "grid of video 0 is .* three integers"),
        ((torch.tensor([], dtype=torch.long),), [(4, 8, 8)], None, ValueError, "indices of video 0 is empty"),
        ((torch.tensor([0, 1]),), [(4, 8, 8)], [3], ValueError, "do not match the index lengths"),
        ([], [], None, ValueError, "empty batch"),
        ((torch.tensor([0, 1], dtype=torch.uint16),), [(4, 8, 8)], None, TypeError, "has dtype torch.uint16; expected"),
        ((torch.tensor([0, 1], device="meta"),), [(4, 8, 8)], None, ValueError, "video 0 is on the meta device"),
        ((torch.tensor([0]),), [(8192, 8, 8)], None, ValueError, r"video 0 is \[8192, 8, 8\]; T must be at most"),
        ((torch.tensor([0, 1]).to_sparse(),), [(4, 8, 8)], None, TypeError, "video 0 has layout torch.sparse_coo"),
        # decode's order, told by the arguments' forms: grids as tensors too, a single count said as one
        (torch.tensor([0, 1]), [2], [torch.tensor([4, 8, 8])], None, None),
        (torch.tensor([0, 1]), 2, [(4, 8, 8)], TypeError, "token_counts must be a list with one integer per video"),
        ((torch.tensor([[0, 1]]),), [(4, 8, 8)], None, ValueError, r"video 0 has shape \[1, 2\]; expected a 1-D"),
        (torch.zeros(0, dtype=torch.long), [], [], ValueError, r"^empty batch: token_counts is empty$"),  # packed
    ],
)
def test_decode_indices_rejects_bad_input(tiny, indices, grids, counts, error, message):
    model, _ = tiny
    if error is None:
        assert model.decode_indices(indices, grids, counts)[0].shape == (3, 4, 8, 8)
        return
    with pytest.raises(error, match=message):
        model.decode_indices(indices, grids, counts)


def test_a_videos_by_tokens_tensor_decodes_as_its_rows(tiny):
    """A generative model's samples come as one [videos, n] tensor: each row is a video's indices, as the tuple of
    the rows gives (the model and the engine alike)."""
    from titok_fast.engine import Engine

    model, _ = tiny
    sampled = torch.randint(0, model.quantize.codebook_size, (3, 6), generator=torch.Generator().manual_seed(2))
    grids = [(4, 16, 16)] * 3
    want = model.decode_indices(tuple(sampled), grids)
    for runner in (model, Engine(model, mode="eager")):
        assert all(map(torch.equal, runner.decode_indices(sampled, grids), want))
        assert all(map(torch.equal, runner.decode_indices(sampled.int(), [6] * 3, grids), want))  # decode's order


@pytest.mark.parametrize(
    "codes, counts, error, message",
    [
        (torch.zeros(3, 4), [3], ValueError, r"codes has shape \[3, 4\]; expected \[sum\(token_counts\), 5\]"),
        (torch.zeros(3, 5), [2], ValueError, "codes has 3 rows but token_counts sum to 2"),
        (torch.zeros(3, 5, dtype=torch.long), [3], TypeError, "codes has dtype torch.int64"),
        (torch.full((3, 5), float("inf")), [3], ValueError, "codes contains NaN or infinite"),
        (torch.zeros(3, 5, device="meta"), [3], ValueError, "codes is on the meta device"),
        (torch.full((3, 5), 1e300, dtype=torch.float64), [3], ValueError, "codes holds 1e[+]300, beyond .*float32"),
        # finite, but the decoder gave a video of infinities: refused as videos are
        (torch.full((3, 5), 1e30), [3], ValueError, r"codes holds 1e\+30; expected values in \[-1, 1\] \(beyond"),
        (torch.zeros(3, 5).to(torch.float8_e5m2), [3], TypeError, "codes has dtype torch.float8_e5m2; expected one"),
        (torch.zeros(3, 5).to_sparse(), [3], TypeError, "codes has layout torch.sparse_coo; expected a dense"),
    ],
)
def test_decode_rejects_bad_codes(tiny, codes, counts, error, message):
    model, _ = tiny
    with pytest.raises(error, match=message):
        model.decode(codes, counts, [(4, 8, 8)])


def test_decoder_table_follows_weight_changes(tiny):
    model = make_model("tiny", "torch", seed=3)
    table, _ = model.decoder_table()
    with torch.no_grad():
        model.decoder.ln_pre.bias.add_(1.0)
    table2, _ = model.decoder_table()
    assert torch.allclose(table2, table + 1.0, atol=1e-5)


@pytest.mark.parametrize("precision", ["default", "fp8"])
def test_weights_changed_after_writes_through_data(precision):
    """Writes through ``parameter.data`` (EMA swaps, weight averaging) bypass the version counter that keys the
    decoder table and the FP8 weight copies; after ``weights_changed()`` the model and an engine built before the
    write give exactly what a model built with the new weights gives (and a new engine on it)."""
    from titok_fast.engine import Engine

    model = make_model("tiny", "torch", seed=3)
    model.precision = precision
    engine = Engine(model, mode="static", budgets=(256,))
    videos, shapes, counts = random_videos([(4, 16, 16)]), [(4, 16, 16)], [8]
    _, out = model.encode(videos, counts)
    engine.decode_indices(out["indices"], shapes)  # builds the table and the FP8 copies from the old weights
    new = make_model("tiny", "torch", seed=4)
    for p, q in zip(model.parameters(), new.parameters(), strict=True):
        p.data.copy_(q.data)
    new.precision = precision
    model.weights_changed()
    want = new.decode_indices(out["indices"], shapes)[0]
    assert torch.equal(model.decode_indices(out["indices"], shapes)[0], want)
    fresh = Engine(new, mode="static", budgets=(256,)).decode_indices(out["indices"], shapes)[0]
    assert torch.equal(engine.decode_indices(out["indices"], shapes)[0], fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.encode(videos, counts)[1]["indices"],
                                                 new.encode(videos, counts)[1]["indices"], strict=True))  # fmt: skip


@pytest.mark.parametrize("precision", ["default", "fp8"])
def test_a_model_built_under_inference_mode_gives_what_one_built_outside_gives(precision):
    """Inference tensors have no version counter, which keys the decoder table and the FP8 weight copies: a model
    built (or loaded) under ``torch.inference_mode()`` encodes and decodes as any other."""
    from titok_fast.engine import Engine

    videos, shapes, counts = random_videos([(4, 16, 16)]), [(4, 16, 16)], [8]
    model = make_model("tiny", "torch", seed=3)
    model.precision = precision
    _, want = model.encode(videos, counts)
    pixels = model.decode_indices(want["indices"], shapes)[0]
    with torch.inference_mode():
        inferred = make_model("tiny", "torch", seed=3)
        inferred.precision = precision
        _, got = inferred.encode(videos, counts)
        assert torch.equal(got["indices"][0], want["indices"][0])
        assert torch.equal(inferred.decode_indices(got["indices"], shapes)[0], pixels)
        engine = Engine(inferred, mode="static", budgets=(256,))
        assert torch.equal(engine.encode(videos, counts)[1]["indices"][0], want["indices"][0])

@pytest.mark.parametrize("mode", [None, "eager", "static", "compile"])
def test_an_enclosing_autocast_changes_nothing(mode, monkeypatch):
    """Inside ``torch.autocast`` (a generative model's training step) the model computes in its own dtype: every
    entry point gives what it gives outside, bit for bit, and the decoder table built there is the float32 one
    (a later call outside still runs). Before, an fp32 model's encode failed there with a dtype error deep in
    torch, and a decode there left the table in bf16, breaking every decode after it. Compiled graphs are not
    compiled again for it (the autocast state is among their guards); here compiled by Dynamo with an eager
    backend, whose guards are Inductor's."""
    from titok_fast import engine as engine_module
    from titok_fast.engine import Engine

    def eager_backend(graph, example_inputs):  # (counted as the engine's own backend counts)
        engine_module._GRAPHS_COMPILED.count = engine_module._compiled_here() + 1
        return graph.forward

    monkeypatch.setattr(engine_module, "_counting_inductor", eager_backend)
    shapes, counts = [(8, 16, 16), (4, 24, 8)], [6, 5]
    videos = random_videos(shapes)
    model = make_model("tiny", "torch", seed=4)
    runner = model if mode is None else Engine(model, mode=mode, budgets=(256,))
    codes, want = runner.encode(videos, counts)
    pixels = runner.decode_indices(want["indices"], shapes)
    compiled = getattr(runner, "compiles", 0)
    z = model.encoder(videos, counts)
    decoded = model.decode(codes, counts, shapes)
    model.weights_changed()  # (the table is built again, under autocast)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=mode != "compile"):  # (its cache setting: guarded
        # on by compiled graphs too)
        got_codes, got = runner.encode(videos, counts)
        got_pixels = runner.decode_indices(got["indices"], shapes)
        if mode is None:
            assert torch.equal(model.encoder(videos, counts), z)
            assert all(map(torch.equal, model.decode(codes, counts, shapes), decoded))
            assert all(map(torch.equal, model(videos, counts)[0], decoded))
    assert got_codes.dtype == torch.float32 and torch.equal(got_codes, codes)
    assert all(map(torch.equal, got["indices"], want["indices"]))
    assert all(map(torch.equal, got_pixels, pixels))
    assert all(map(torch.equal, runner.decode_indices(want["indices"], shapes), pixels))
    assert model.decoder_table()[0].dtype == torch.float32
    assert getattr(runner, "compiles", 0) == compiled == (2 if mode == "compile" else 0)



def test_encoder_submodule_as_upstream(tiny):
    """``model.encoder(videos, token_counts)``: the packed latents before FSQ, as the oracle computes them."""
    model, ref = tiny
    videos = random_videos(MIXED)
    z = model.encoder(videos, MIXED_TOKENS)
    ref_z = reference.encoder_latents(ref.config, ref.encoder, videos, MIXED_TOKENS)
    assert z.shape == (sum(MIXED_TOKENS), 5) and z.dtype == torch.float32
    assert rel_l2(z, ref_z) <= 1e-5
    codes, out = model.quantize(z)  # upstream's encode, spelled out: encoder, then quantize
    enc_codes, enc_out = model.encode(videos, MIXED_TOKENS)
    assert agreement(out["indices"].split(MIXED_TOKENS), enc_out["indices"]) >= 0.999
    assert torch.equal(out["indices"], model.quantize.codes_to_indices(codes))


def test_decoder_submodule_as_upstream(tiny):
    """``model.decoder(codes, token_counts, grids)`` with pixel shapes: the oracle's videos, on and off the grid."""
    model, ref = tiny
    codes = model.quantize.indices_to_codes(torch.randint(0, model.quantize.codebook_size, (sum(MIXED_TOKENS),)))
    for x in (codes, torch.rand(codes.shape) * 2 - 1):
        out = model.decoder(x, MIXED_TOKENS, MIXED)
        assert isinstance(out, list) and [tuple(v.shape) for v in out] == [(3, *s) for s in MIXED]
        for a, b in zip(out, ref.decode(x, MIXED_TOKENS, MIXED), strict=True):
            assert rel_l2(a, b) <= 1e-5


class _LoRA(torch.nn.Linear):
    """A Linear with a low-rank update of its own (as fine-tuning adds): what it computes is not its weight's alone."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__(base.in_features, base.out_features)
        self.load_state_dict(base.state_dict())
        self.lora_a = torch.nn.Parameter(torch.zeros(rank, base.in_features))
        self.lora_b = torch.nn.Parameter(torch.randn(base.out_features, rank))

    def forward(self, x):
        return super().forward(x) + x @ self.lora_a.t() @ self.lora_b.t()


class _Wrapped(torch.nn.Module):
    """A module around another, with no ``weight`` of its own."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 1.25


def _set_both(model, ref, path: str, make) -> None:
    """Replace the submodule at ``path`` in both models by ``make(the module there)``, with the same values."""
    *parents, leaf = path.split(".")
    made = []
    for m in (model, ref):
        parent = m.get_submodule(".".join(parents))
        torch.manual_seed(5)
        made.append(make(getattr(parent, leaf)))
        setattr(parent, leaf, made[-1])


def test_a_decoder_input_module_of_its_own_decodes_as_upstream():
    """A subclass at ``decoder.proj_in`` (a LoRA Linear), changed in place after a first decode, and a hook added to
    ``ln_pre`` later: each decode is what the oracle gives, which calls the modules as upstream does (the code table
    stands only for the plain modules). A hook on ``ln_pre`` sees upstream's packed sequence."""
    model = make_model("tiny", "torch", seed=4)
    ref = make_reference(model)
    _set_both(model, ref, "decoder.proj_in", _LoRA)
    indices = torch.randint(0, model.quantize.codebook_size, (sum(MIXED_TOKENS),))
    codes = model.quantize.indices_to_codes(indices)

    def check():
        want = ref.decode(codes, MIXED_TOKENS, MIXED)
        for got in (model.decode(codes, MIXED_TOKENS, MIXED), model.decode_indices(indices, MIXED, MIXED_TOKENS)):
            assert all(rel_l2(a, b) <= 1e-5 for a, b in zip(got, want, strict=True))

    check()
    with torch.no_grad():  # (zeros before: the update did nothing yet)
        for m in (model, ref):
            m.decoder.proj_in.lora_a.add_(0.5)
    check()
    seen = []
    for m in (model, ref):
        m.decoder.ln_pre.register_forward_hook(lambda module, args, out: out * 2.0)
    model.decoder.ln_pre.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    check()
    rows = sum(MIXED_TOKENS) + sum(t * h * w for t, h, w in MIXED) // 256  # (tiny's patch: 4x8x8)
    assert seen[-1] == (rows, model.decoder.width)


@pytest.mark.parametrize("path", ["encoder.proj_in", "decoder.proj_in", "decoder.ln_pre"])
def test_a_wrapped_input_module_runs_as_upstream(path):
    """A module without a ``weight`` of its own at ``proj_in`` or ``ln_pre``: encode and decode call it, as the
    oracle does."""
    model = make_model("tiny", "torch", seed=4)
    ref = make_reference(model)
    _set_both(model, ref, path, _Wrapped)
    videos = random_videos(MIXED)
    codes, out = model.encode(videos, MIXED_TOKENS)
    ref_codes, ref_out = ref.encode(videos, MIXED_TOKENS)
    assert agreement(out["indices"], ref_out["indices"]) >= 0.999
    want = ref.decode(ref_codes, MIXED_TOKENS, MIXED)
    assert all(rel_l2(a, b) <= 1e-5 for a, b in zip(model.decode(ref_codes, MIXED_TOKENS, MIXED), want, strict=True))
    assert model.dtype == torch.float32 and model.device.type == "cpu"


def test_hooks_on_the_encoder_quantizer_and_decoder_fire_as_upstreams_do():
    """Upstream's ``encode`` calls ``encoder`` then ``quantize``, ``decode`` and ``decode_indices`` call
    ``decoder``: hooks on them fire there, and what they return is what comes out."""
    model = make_model("tiny", "torch", seed=4)
    videos = random_videos(MIXED)
    plain_codes, plain_out = model.encode(videos, MIXED_TOKENS)
    fired = []
    handles = [
        model.encoder.register_forward_pre_hook(lambda m, args: fired.append("encoder-pre")),
        model.encoder.register_forward_hook(lambda m, args, out: fired.append("encoder")),
        model.quantize.register_forward_hook(lambda m, args, out: fired.append("quantize")),
        model.decoder.register_forward_hook(lambda m, args, out: fired.append("decoder")),
    ]
    codes, out = model.encode(videos, MIXED_TOKENS)
    assert fired == ["encoder-pre", "encoder", "quantize"]
    assert torch.equal(codes, plain_codes) and all(map(torch.equal, out["indices"], plain_out["indices"]))
    assert all(i.dtype == torch.int32 for i in out["indices"])
    fired.clear()
    model.decode_indices(out["indices"], MIXED)
    model(videos, MIXED_TOKENS)
    assert fired == ["decoder", "encoder-pre", "encoder", "quantize", "decoder"]
    for h in handles:
        h.remove()
    model.encoder.register_forward_pre_hook(lambda m, args: ([v * 0 for v in args[0]], args[1]))
    assert torch.equal(model.encode(videos, MIXED_TOKENS)[0], model.encode([v * 0 for v in videos], MIXED_TOKENS)[0])


def test_a_batch_tensor_encodes_as_its_list_of_videos(tiny):
    """One [videos, 3, T, H, W] tensor is a batch, as upstream iterates it."""
    model, _ = tiny
    batch = torch.stack(random_videos([(8, 32, 48)] * 3))
    codes, out = model.encode(batch, [4, 5, 6])
    want_codes, want = model.encode(list(batch), [4, 5, 6])
    assert torch.equal(codes, want_codes) and all(map(torch.equal, out["indices"], want["indices"]))
    recon, _ = model(batch, [4, 5, 6])
    assert [tuple(v.shape) for v in recon] == [(3, 8, 32, 48)] * 3


def test_inputs_that_require_grad_are_refused(tiny):
    model, _ = tiny
    video = random_videos(MIXED[:1])[0].requires_grad_()
    with pytest.raises(ValueError, match="video 0 requires grad; titok-fast is inference-only"):
        model.encode([video], [4])
    with pytest.raises(ValueError, match="video 0 requires grad"):
        model.encoder([video], [4])
    codes = torch.zeros(4, 5, requires_grad=True)
    with pytest.raises(ValueError, match="codes requires grad; titok-fast is inference-only"):
        model.decode(codes, [4], [MIXED[0]])
    with pytest.raises(ValueError, match="codes requires grad"):
        model.decoder(codes, [4], [MIXED[0]])
    codes, _ = model.encode([video.detach()], [4])
    assert not codes.requires_grad  # detached inputs run, and nothing is recorded for autograd


def test_the_weights_digest_is_dropped_when_the_weights_change():
    """Token files record ``weights_digest``: it named the loaded weights after they were replaced, so files made
    by other weights claimed these (and a resume skipped them). It is None again after any change of the weights
    (then worked out from them where needed), and kept through to() and a precision switch."""
    from titok_fast.loading import random_tokenizer

    model = random_tokenizer("tiny", seed=0)
    digest = model.weights_digest
    model.to(torch.float64)
    model.precision = "fp8"
    model.precision = "default"
    model.to(torch.float32)
    model.to(torch.bfloat16)
    assert model.weights_digest == digest
    other = random_tokenizer("tiny", seed=1).state_dict()
    changes = [
        lambda: model.load_state_dict(other),
        lambda: model.decoder.load_state_dict({k[len("decoder."):]: v for k, v in other.items()
                                               if k.startswith("decoder.")}, assign=True),  # fmt: skip
        lambda: (next(model.parameters()).data.mul_(2), model.weights_changed()),
    ]
    for change in changes:
        model.weights_digest = digest
        with torch.no_grad():
            change()
        assert model.weights_digest is None
    model.weights_digest = digest
    with torch.no_grad():
        model.encoder.proj_in.weight.add_(1)  # in place: its version counter
    assert model.weights_digest is None


def test_a_cast_back_up_drops_the_weights_digest():
    """``to(bfloat16)`` then ``to(float32)``: every weight is now rounded, and token files named the float32 weights
    that did not make them (a rerun with the named weights would skip them); likewise on a submodule, and on a copy
    made in between. A cast that rounds nothing (float32 to float64 and back; bfloat16 weights named as such, then
    float32) keeps it."""
    import copy

    from titok_fast.loading import random_tokenizer

    model = random_tokenizer("tiny", seed=0)
    digest = model.weights_digest
    for cast in (
        lambda m: m.to(torch.bfloat16).to(torch.float32),
        lambda m: m.half().float(),
        lambda m: (m.encoder.to(torch.bfloat16).float(), m)[1],
        lambda m: copy.deepcopy(m.bfloat16()).float(),
        lambda m: m.bfloat16().half(),  # rounded to both: neither's direct cast
    ):
        model = random_tokenizer("tiny", seed=0)
        assert cast(model).weights_digest is None
    model = random_tokenizer("tiny", seed=0)
    assert model.double().float().weights_digest == digest
    assert copy.deepcopy(model.bfloat16()).weights_digest == digest
    model.weights_digest = "bf16-named"
    assert model.float().weights_digest == "bf16-named"
    model.decoder.half()  # weights of two dtypes (a float16 decoder), followed per parameter
    model.weights_digest = "mixed"
    assert model.float().weights_digest == "mixed"  # the decoder's float16 values exactly, the encoder's untouched
    assert model.half().float().weights_digest is None  # the encoder's float32 weights rounded


def test_a_model_pickled_by_an_earlier_version_loads_with_its_digest():
    """A pickle of before kept the digest alone, and a runtime without the dtypes on record: loaded, the model
    raised AttributeError at its first cast (and its digest read as a missing attribute)."""
    import copy

    from titok_fast.loading import random_tokenizer

    copied = copy.deepcopy(random_tokenizer("tiny", seed=0))
    state = dict(copied.__dict__, _digest="earlier-digest")
    del copied._runtime.dtypes
    model = TiTok.__new__(TiTok)
    model.__setstate__(state)
    assert model.weights_digest == "earlier-digest"
    assert model.to(torch.bfloat16).weights_digest == "earlier-digest"
    assert model.to(torch.float32).weights_digest is None


def test_upstream_attributes_and_keyword_names():
    """What upstream code reads of the model beside its parameters: the first argument's name ``x``, the encoder's
    and decoder's sizes, each attention layer's and the config's upstream paths."""
    model = make_model("tiny")
    videos = random_videos(MIXED[:2])
    codes, out = model.encode(x=videos, token_counts=MIXED_TOKENS[:2])
    assert torch.equal(codes, model.encode(videos, MIXED_TOKENS[:2])[0])
    recon, _ = model(x=videos, token_counts=MIXED_TOKENS[:2])
    assert torch.equal(model.decode(x=codes, token_counts=MIXED_TOKENS[:2], grids=MIXED[:2])[0], recon[0])
    assert torch.equal(model.encoder(x=videos, token_counts=MIXED_TOKENS[:2]), model.encoder(videos, MIXED_TOKENS[:2]))
    assert len(model.decoder(x=codes, token_counts=MIXED_TOKENS[:2], grids=MIXED[:2])) == 2
    enc, dec = model.encoder, model.decoder  # tiny: base_thin-like sizes of its own, from the config's table
    size = model.config.encoder
    assert (enc.patch_size, enc.token_size, enc.in_channels) == ((4, 8, 8), 5, 3)
    assert (enc.width, enc.num_layers, enc.heads) == (size.width, size.layers, [size.q_heads, size.kv_heads])
    assert (dec.token_size, dec.out_channels, dec.width) == (5, 3, model.config.decoder.width)
    attn = enc.model_layers.attn_layer[0]
    assert (attn.dim, attn.head_dim, attn.gqa_dim) == (size.width, 64, 64 * size.kv_heads)
    assert attn.to_qkv.out_features == attn.dim + 2 * attn.gqa_dim  # upstream's split of to_qkv
    assert enc.model_layers.num_layer == size.layers
    assert list(model.config.tokenizer.model.patch_size) == [4, 8, 8]
    assert list(model.config.training.sampling.max_grid) == list(model.config.max_grid)
    assert model.config.tokenizer.model.encoder_size == model.config.encoder_size


def test_numpy_counts_and_grids_are_taken_as_lists(tiny):
    """Upstream's calls take NumPy arrays of counts and grids (torch.split and its grids loop do); they were refused
    with a misleading 'expected three integers' for a grid that was three integers."""
    import numpy as np

    model, _ = tiny
    videos = random_videos(MIXED)
    codes, out = model.encode(videos, np.array(MIXED_TOKENS))
    assert torch.equal(codes, model.encode(videos, MIXED_TOKENS)[0])
    one = model.encode(videos[:1], np.array(MIXED_TOKENS[0]))[0]  # a 0-d array: one count, as a 0-d tensor
    assert torch.equal(one, model.encode(videos[:1], torch.tensor(MIXED_TOKENS[0]))[0])
    want = model.decode_indices(out["indices"], MIXED)
    for grids in (np.array(MIXED), [np.array(g) for g in MIXED]):
        got = model.decode_indices(out["indices"], grids)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    got = model.decode_indices(torch.cat(out["indices"]), np.array(MIXED_TOKENS), np.array(MIXED))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with pytest.raises(ValueError, match=r"grid of video 0 is \[4.0, 8.0, 8.0\]; expected three integers"):
        model.decode_indices(out["indices"][:1], np.array([[4.0, 8.0, 8.0]]))


def test_per_video_indices_are_held_to_the_token_limit(tiny):
    """Every entry point refuses more than MAX_TOKENS tokens a clip; per-video index tensors went straight to the
    decoder."""
    from titok_fast import Engine

    model, _ = tiny
    too_many = torch.zeros(checks.MAX_TOKENS + 1, dtype=torch.int64)
    with pytest.raises(ValueError, match=f"^token count of the indices of video 0 is {checks.MAX_TOKENS + 1}; "):
        model.decode_indices((too_many,), [(4, 8, 8)])
    with pytest.raises(ValueError, match=f"^token count of clip 'a' is {checks.MAX_TOKENS + 1}; "):
        list(Engine(model, mode="eager").decode_stream([("a", too_many, (4, 8, 8))]))


def test_decode_on_meta_weights_is_refused_in_one_line():
    with torch.device("meta"):
        model = TiTok("tiny")
    for call in (lambda: model.decode(torch.zeros(1, 5), [1], [(4, 8, 8)]),
                 lambda: model.decoder(torch.full((1, 5), 0.3), [1], [(4, 8, 8)])):  # fmt: skip
        with pytest.raises(ValueError, match="^the model's weights are on the meta device"):
            call()


def test_the_code_table_follows_a_parameter_replaced_at_a_freed_address():
    """A new weight tensor may land where a freed one was, at version 0 like it: the decoder's code table, keyed
    by address and version alone, stayed the old weights' (seen after two loads with no decode between)."""
    from titok_fast import fp8

    weight = torch.randn(8, 8)  # another tensor object at the same address and version (here a view): not the same
    key = fp8.tensor_key(weight)
    assert key != fp8.tensor_key(weight.view_as(weight)) and key == fp8.tensor_key(weight)
    model = make_model("tiny")
    indices, grids = [torch.arange(16) * 37 % 8575], [(4, 32, 32)]
    linear = model.decoder.proj_in
    weight = linear.weight.detach().clone()

    def put(w):
        linear.load_state_dict({"weight": w, "bias": linear.bias.detach()}, assign=True)

    put(weight.clone())
    before = model.decode_indices(indices, grids)[0]
    for scale in (2, 3):
        put(weight * scale)
    fresh = make_model("tiny")
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(model.decode_indices(indices, grids)[0], fresh.decode_indices(indices, grids)[0])
    assert not torch.equal(model.decode_indices(indices, grids)[0], before)


def test_a_model_can_be_copied_and_saved_whole():
    """copy.deepcopy (EMA copies) and torch.save of the module failed on a lock; the copies give the same
    tokens and reconstructions. They leave out the decoder's code table, derived from the weights (made again at
    their first decode): they carried it, 68 MB for V1."""
    import copy
    import io
    import pickle

    model = make_model("tiny")
    videos = random_videos([(4, 32, 32), (4, 48, 32)])
    _, out = model.encode(videos, [8, 16])
    recon = model.decode_indices(out["indices"], [(4, 32, 32), (4, 48, 32)])
    buffer = io.BytesIO()
    model.weights_digest = "random-seed0-0123456789abcdef"  # (what token files record: kept by the copies)
    torch.save(model, buffer)
    buffer.seek(0)
    assert model.decoder._table is not None
    for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(model))):
        assert copied.weights_digest == model.weights_digest and copied.decoder._table is None
        with torch.no_grad():
            copied.decoder.proj_in.weight.mul_(2)
        assert copied.weights_digest is None and model.weights_digest is not None  # (the copy's own weights)
        copied.decoder.proj_in.weight.data.div_(2)  # (exactly as they were)
        _, again = copied.encode(videos, [8, 16])
        assert all(map(torch.equal, again["indices"], out["indices"]))
        assert all(map(torch.equal, copied.decode_indices(out["indices"], [(4, 32, 32), (4, 48, 32)]), recon))


def test_the_quantizer_refuses_inputs_that_require_grad():
    """model.quantize gave zero gradients silently: like the encoder and decoder it is inference only."""
    model = make_model("tiny")
    z = torch.randn(4, 5, requires_grad=True)
    for call in (model.quantize, model.quantize.quantize, model.quantize.bound):
        with pytest.raises(ValueError, match="z requires grad; titok-fast is inference-only"):
            call(z)


def test_a_nested_video_is_refused_before_its_values_are_looked_at():
    with pytest.warns(UserWarning, match="nested tensors is in prototype stage"):
        nested = torch.nested.nested_tensor([torch.zeros(4, 8, 8)] * 3)
    with pytest.raises(TypeError, match="video 0 has layout nested; expected a dense tensor"):
        TiTok("tiny").encode([nested], [3])


def test_the_decoder_table_follows_the_mask_token():
    """The code table holds ln_pre(mask_token) too: an edit of the mask token alone is decoded with."""
    model = make_model("tiny", seed=3)
    idx = (torch.arange(6) * 7,)
    before = model.decode_indices(idx, [(4, 16, 16)])[0]
    with torch.no_grad():
        model.decoder.mask_token.add_(0.5)
    _, mask_row = model.decoder_table()
    assert torch.allclose(mask_row, model.decoder.ln_pre(model.decoder.mask_token)[0])
    assert not torch.allclose(model.decode_indices(idx, [(4, 16, 16)])[0], before)


def test_a_hook_on_the_decoders_ln_pre_alone_is_called_by_decode():
    model = make_model("tiny", seed=3)
    idx = (torch.arange(6) * 7,)
    plain = model.decode_indices(idx, [(4, 16, 16)])[0]  # (the code table is built)
    model.decoder.ln_pre.register_forward_hook(lambda module, args, out: out * 2.0)
    assert not torch.allclose(model.decode_indices(idx, [(4, 16, 16)])[0], plain)


def test_limits_are_inclusive_and_a_zero_size_is_refused():
    from titok_fast import checks

    assert checks.check_token_counts([checks.MAX_TOKENS], 1) == [checks.MAX_TOKENS]
    for count in (True, torch.tensor(True), 1.0):  # (True is no count, though Python's bool is an int)
        with pytest.raises(TypeError, match=re.escape(f"token count of video 0 is {count!r}; expected an integer")):
            checks.check_token_counts([count], 1)
    assert checks.check_grids([(checks.MAX_GRID[0], 8, 8)], 1, (4, 8, 8)) == [(checks.MAX_GRID[0], 8, 8)]
    for grid in [(0, 8, 8), (4, 0, 8), (4, 8, 0)]:
        with pytest.raises(ValueError, match="must be a positive multiple"):
            checks.check_grids([grid], 1, (4, 8, 8))


def test_the_voxel_limit_is_inclusive():
    """T x H x W of exactly MAX_GRID_VOXELS is taken (as the other limits' bounds are), one patch more is not."""
    most = (512, 256, 256)  # 2**25 voxels
    assert checks.MAX_GRID_VOXELS == 512 * 256 * 256
    assert checks.check_grids([most], 1, (4, 8, 8)) == [most]
    with pytest.raises(ValueError, match=r"grid of video 0 is \[516, 256, 256\]; T x H x W must be at most 33554432"):
        checks.check_grids([(516, 256, 256)], 1, (4, 8, 8))
