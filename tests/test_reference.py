"""The oracle itself: parameter layout against DESIGN.md section 2, FSQ against brute force, geometry round trips."""

import itertools
import math

import pytest
import torch

from titok_fast import TiTok
from titok_fast.patches import patchify, unpatchify
from titok_fast.reference import fsq_indices_to_codes, fsq_quantize, mrope_angles, rotate


def spec_keys(prefix: str, layers: int, w: int, hq: int, hkv: int, inner: int, d: int) -> dict:
    keys = {f"{prefix}.mask_token": (1, w)}
    if prefix == "encoder":
        keys |= {"encoder.proj_in.weight": (w, 768), "encoder.proj_in.bias": (w,)}
    else:
        keys |= {"decoder.proj_in.weight": (w, d), "decoder.proj_in.bias": (w,)}
        keys |= {"decoder.ln_pre.weight": (w,), "decoder.ln_pre.bias": (w,)}
    for i in range(layers):
        a = f"{prefix}.model_layers.attn_layer.{i}"
        keys |= {f"{a}.pre_ln.weight": (w,), f"{a}.pre_ln.bias": (w,)}
        keys |= {f"{a}.to_qkv.weight": ((hq + 2 * hkv) * 64, w), f"{a}.out_proj.weight": (w, w)}
        for n in ("q_norm", "k_norm"):
            keys |= {f"{a}.{n}.weight": (64,), f"{a}.{n}.bias": (64,)}
        f = f"{prefix}.model_layers.ffd_layer.{i}"
        keys |= {
            f"{f}.0.weight": (w,),
            f"{f}.0.bias": (w,),
            f"{f}.1.weight": (2 * inner, w),
            f"{f}.4.weight": (w, inner),
        }
    if prefix == "encoder":
        keys |= {"encoder.ln_post.weight": (w,), "encoder.ln_post.bias": (w,)}
        keys |= {"encoder.proj_out.weight": (d, w), "encoder.proj_out.bias": (d,)}
    else:
        keys |= {"decoder.proj_out.weight": (768, w), "decoder.proj_out.bias": (768,)}
    return keys


def test_v1_state_dict_is_upstreams():
    with torch.device("meta"):
        model = TiTok("v1")
    expected = spec_keys("encoder", 7, 1024, 16, 4, 1376, 5) | spec_keys("decoder", 8, 2048, 32, 8, 2752, 5)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(got) == 194
    assert got == expected
    assert sum(math.prod(s) for s in got.values()) == pytest.approx(269.58e6, rel=1e-4)


@pytest.mark.parametrize("levels", [(7, 7, 7, 5, 5), (8, 5, 5, 5), (2, 3), (7, 5, 5, 5, 5)], ids=str)
def test_fsq_rounding_is_the_nearest_code(levels):
    z = torch.randn(4000, len(levels)) * 1.5
    codes, indices = fsq_quantize(z, levels)
    lv = torch.tensor(levels)
    half_l = (lv - 1) * (1 + 1e-3) / 2
    offset = (lv % 2 == 0).float() * 0.5
    bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
    book = fsq_indices_to_codes(torch.arange(math.prod(levels)), levels)
    target = bounded / (lv // 2)
    nearest = torch.cdist(target.double(), book.double()).argmin(dim=1)
    assert torch.equal(nearest.int(), indices)
    assert torch.equal(fsq_indices_to_codes(indices, levels), codes)
    assert indices.dtype == torch.int32 and int(indices.min()) >= 0 and int(indices.max()) < math.prod(levels)


def test_fsq_indices_enumerate_the_codebook():
    levels = (7, 5, 5, 5, 5)
    every = torch.arange(math.prod(levels))
    codes = fsq_indices_to_codes(every, levels)
    assert len({tuple(c.tolist()) for c in codes}) == len(every)
    _, back = fsq_quantize(
        torch.atanh(codes * (torch.tensor(levels) // 2) / ((torch.tensor(levels) - 1) * 1.001 / 2)), levels
    )
    assert torch.equal(back.long(), every)


@pytest.mark.parametrize("shape", [(4, 8, 8), (8, 16, 24), (12, 40, 8)])
def test_patchify_order_and_inverse(shape):
    video = torch.randn(3, *shape)
    rows = patchify(video, (4, 8, 8))
    gt, gh, gw = shape[0] // 4, shape[1] // 8, shape[2] // 8
    assert rows.shape == (gt * gh * gw, 768)
    a, b, c = gt - 1, gh - 1, gw - 1  # last patch: t-major, then h, then w; features c, pt, ph, pw
    assert torch.equal(rows[-1].view(3, 4, 8, 8), video[:, 4 * a : 4 * a + 4, 8 * b : 8 * b + 8, 8 * c : 8 * c + 8])
    assert torch.equal(unpatchify(rows, shape, (4, 8, 8)), video)


def test_mrope_positions_and_frequencies():
    angles = mrope_angles(3, (2, 1, 2))
    assert angles.dtype == torch.float64 and angles.shape == (3 + 4, 32)
    assert torch.equal(angles[0], torch.zeros(32))
    f0 = math.pi / 2
    assert angles[1, 0].item() == pytest.approx(f0) and angles[1, 12].item() == pytest.approx(f0)
    assert angles[2, 11].item() == pytest.approx(2 * f0 * 10000)  # last t pair reaches (pi/2) * 10000
    # patch (a, b, c) = (1, 0, 1) of a video with 3 tokens sits at (4, 3, 4); it is row 3 + (1*1*2 + 0 + 1) = 6
    assert angles[6, 0].item() == pytest.approx(4 * f0)
    assert angles[6, 12].item() == pytest.approx(3 * f0)
    assert angles[6, 22].item() == pytest.approx(4 * f0)


def test_rotation_is_adjacent_pair_complex_multiplication():
    x = torch.randn(5, 2, 64)
    angles = torch.rand(5, 32, dtype=torch.float64) * 1e4
    out = rotate(x, angles)
    for r, h, p in itertools.product(range(5), range(2), (0, 13, 31)):
        z = complex(x[r, h, 2 * p], x[r, h, 2 * p + 1]) * complex(math.cos(angles[r, p]), math.sin(angles[r, p]))
        assert out[r, h, 2 * p].item() == pytest.approx(z.real, abs=1e-5)
        assert out[r, h, 2 * p + 1].item() == pytest.approx(z.imag, abs=1e-5)


def test_fused_attention_reference_matches_explicit():
    from titok_fast.reference import ReferenceTiTok

    from helpers import make_model, random_videos, rel_l2

    model = make_model("tiny")
    explicit, fused = ReferenceTiTok("tiny"), ReferenceTiTok("tiny", fused_attention=True)
    explicit.load_state_dict(model.state_dict())
    fused.load_state_dict(model.state_dict())
    videos = random_videos([(4, 16, 24), (8, 8, 8)])
    (_, a), (_, b) = explicit.encode(videos, [7, 3]), fused.encode(videos, [7, 3])
    assert all(torch.equal(x, y) for x, y in zip(a["indices"], b["indices"], strict=True))
    for x, y in zip(explicit.decode_indices(a["indices"], [(4, 16, 24), (8, 8, 8)]),
                    fused.decode_indices(a["indices"], [(4, 16, 24), (8, 8, 8)]), strict=True):  # fmt: skip
        assert rel_l2(x, y) <= 1e-5
