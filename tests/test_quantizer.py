"""``model.quantize``: upstream's FSQ interface, against the oracle's FSQ and the FSQ definition."""

import itertools
import math

import pytest
import torch

from titok_fast import TiTok
from titok_fast.quantizer import FSQ, grid_indices
from titok_fast.reference import fsq_indices_to_codes, fsq_quantize

LEVELS = (7, 5, 5, 5, 5)


@pytest.fixture(scope="module")
def fsq():
    return FSQ(LEVELS)


def test_call_matches_oracle_and_keeps_dtype(fsq):
    z = torch.randn(4000, 5, generator=torch.Generator().manual_seed(0)) * 3
    codes, out = fsq(z)
    ref_codes, ref_indices = fsq_quantize(z, LEVELS)
    assert set(out) == {"indices"} and out["indices"].dtype == torch.int32 and out["indices"].shape == (4000,)
    assert torch.equal(out["indices"], ref_indices) and torch.equal(codes, ref_codes)
    codes16, out16 = fsq(z.bfloat16())
    assert codes16.dtype == torch.bfloat16
    assert torch.equal(out16["indices"], fsq_quantize(z.bfloat16(), LEVELS)[1])


def test_latents_on_a_tie_round_half_to_even_as_the_oracle(fsq):
    """Latents whose bounded value is exactly a half level (found by scanning float32 neighbours of the tie) round
    half to even, as upstream's torch.round: random latents never land there."""
    consts = fsq.constants("cpu")
    ties = []
    for d, levels in enumerate(LEVELS):
        for h in torch.arange(-levels / 2, levels / 2, 1.0):  # every half level (tanh reaches those within the bound)
            if not abs(h + consts.offset[d]) < consts.half_l[d]:
                continue
            z0 = torch.atanh((h + consts.offset[d]) / consts.half_l[d]) - consts.shift[d]
            z = torch.full((401, 5), 0.3)
            z[:, d] = z0.float() + torch.arange(-200, 201) * torch.finfo(torch.float32).eps * max(1.0, abs(z0.item()))
            ties += [row for row in z[fsq.bound(z)[:, d] == h]]
    z = torch.stack(ties)
    assert len(z) >= 10 and bool(((fsq.bound(z) % 1) == 0.5).any(1).all())
    bounded = fsq.bound(z)
    assert not torch.equal(torch.round(bounded), torch.floor(bounded + 0.5))  # (ties that round half up would miss)
    codes, out = fsq(z)
    ref_codes, ref_indices = fsq_quantize(z, LEVELS)
    assert torch.equal(out["indices"], ref_indices) and torch.equal(codes, ref_codes)


def test_a_latent_holding_nan_has_index_minus_one(fsq):
    """NaN (an overflow) has no code: index -1, on every device (a GPU's float-to-int conversion would make it a
    valid-looking index); an infinite latent is bounded by tanh, as upstream bounds it, and keeps its code."""
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    z[1, 2], z[4, 0], z[5, 4] = torch.nan, torch.inf, -torch.inf
    codes, out = fsq(z)
    ref_codes, ref_indices = fsq_quantize(z, LEVELS)
    assert out["indices"][1] == -1 and bool(codes[1, 2].isnan())
    keep = torch.tensor([0, 2, 3, 4, 5])
    assert torch.equal(out["indices"][keep], ref_indices[keep]) and bool((out["indices"][keep] >= 0).all())
    assert torch.equal(codes[keep], ref_codes[keep])
    assert torch.equal(fsq.codes_to_indices(codes), out["indices"])  # (NaN converted to an integer wraps to anything)


def test_bound_is_the_value_before_rounding(fsq):
    z = torch.randn(500, 5, generator=torch.Generator().manual_seed(1)) * 4
    bounded = fsq.bound(z)
    lv = torch.tensor(LEVELS)
    half_l = (lv - 1) * (1 + 1e-3) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0)
    assert torch.equal(bounded, torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset)
    assert torch.equal(fsq.quantize(z), torch.round(bounded) / (lv // 2))
    assert torch.equal(fsq.quantize(z), fsq(z)[0])
    assert not torch.equal(fsq.bound(z, eps=1e-2), bounded)


def test_codebook_and_index_conversions(fsq):
    size = 7 * 5**4
    assert fsq.codebook_size == size and fsq.codebook_dim == 5
    book = fsq.implicit_codebook
    assert book.shape == (size, 5) and book.dtype == torch.float32
    assert torch.equal(book, fsq_indices_to_codes(torch.arange(size), LEVELS))
    assert len({tuple(r) for r in book.tolist()}) == size  # every code distinct
    everything = torch.arange(size)
    assert torch.equal(fsq.codes_to_indices(book), everything.int())
    assert torch.equal(fsq.indices_to_codes(everything), book)
    levels = fsq.indices_to_level_indices(everything)
    assert levels.shape == (size, 5)
    expected = torch.tensor(list(itertools.product(*(range(n) for n in reversed(LEVELS)))))  # first dim fastest
    assert torch.equal(levels, expected.flip(1))
    assert torch.equal(fsq.indices_to_codes(torch.tensor([[0, 1], [2, 3]])), book[torch.tensor([[0, 1], [2, 3]])])


@pytest.mark.parametrize("levels", [LEVELS, (7, 7, 7, 5, 5), (8, 6, 5, 4, 2), (25, 25, 25), (32, 32, 32)])
def test_codes_to_indices_in_every_dtype(levels):
    """A bf16 or fp16 model's codes (its grid values, rounded to its dtype) give its indices back; float32 codes
    give what upstream's arithmetic gives (in the codes' dtype, truncated), which a half dtype gets wrong."""
    fsq = FSQ(levels)
    everything = torch.arange(fsq.codebook_size)
    book = fsq.implicit_codebook
    basis = torch.tensor([math.prod(levels[:d]) for d in range(len(levels))])
    half = torch.tensor(levels) // 2
    assert torch.equal(((book * half + half) * basis).sum(-1).int(), everything.int())  # upstream's, in float32
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(fsq.codes_to_indices(book.to(dtype)), everything.int()), dtype
        assert torch.equal(fsq.codes_to_indices(book.to(dtype).float()), everything.int()), dtype
    if fsq.codebook_size > 256:  # what upstream's arithmetic did to bf16 codes
        assert not torch.equal(((book.bfloat16() * half + half) * basis).sum(-1).int(), everything.int())
    z = torch.randn(3000, len(levels), generator=torch.Generator().manual_seed(2)) * 3
    codes, out = fsq(z.bfloat16())  # a bf16 model's codes and indices
    assert codes.dtype == torch.bfloat16 and torch.equal(fsq.codes_to_indices(codes), out["indices"])


def test_grid_indices_only_for_codes_on_the_grid(fsq):
    book = fsq.implicit_codebook
    consts = fsq.constants("cpu")
    assert torch.equal(grid_indices(book, consts), torch.arange(len(book), dtype=torch.int32))
    for dtype in (torch.bfloat16, torch.float16):  # a half model's codes: grid values rounded to its dtype (1/3 is
        # not 1/3 there), on the grid when compared in that dtype
        assert torch.equal(grid_indices(book.to(dtype), consts), torch.arange(len(book), dtype=torch.int32))
    assert grid_indices(book + 1e-3, consts) is None
    past_top = book[-1:].clone()
    past_top[0, 0] += 1 / (LEVELS[0] // 2)  # one level past the top of its dimension: a code off the grid
    assert grid_indices(past_top, consts) is None and grid_indices(-past_top, consts) is None


def test_model_quantize_adds_no_state_and_follows_the_model(fsq):
    model = TiTok("tiny")
    assert isinstance(model.quantize, FSQ) and model.quantize.levels == model.config.fsq_levels
    assert not any(k.startswith("quantize") for k in model.state_dict())
    assert model.quantize.implicit_codebook.device.type == "cpu"
    with torch.device("meta"):
        shell = TiTok("tiny")
    assert shell.quantize.implicit_codebook.device.type == "cpu"  # never left on meta
    moved = TiTok("tiny").to("meta")
    assert moved.quantize.implicit_codebook.device.type == "meta"


def test_levels_making_more_codes_than_int32_indices_hold_are_refused():
    assert FSQ([46340, 46340]).codebook_size == 46340**2  # the largest square that fits
    with pytest.raises(ValueError, match=r"fsq_levels \[46341, 46341\]: .* at most 2147483647 codes"):
        FSQ([46341, 46341])  # its indices wrapped to negative values
    for levels in ([8, 0], [8, 1]):
        with pytest.raises(ValueError, match=r"fsq_levels \[8, [01]\]: expected levels >= 2"):
            FSQ(levels)


def test_bound_with_another_eps_is_upstreams():
    levels = torch.tensor([8, 5, 5, 5])
    fsq = FSQ(levels.tolist())
    z = torch.randn(64, 4)
    eps = 1e-2
    half_l = (levels - 1) * (1 + eps) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    shift = (offset / half_l).atanh()
    assert torch.allclose(fsq.bound(z, eps=eps), (z + shift).tanh() * half_l - offset, atol=1e-6)
