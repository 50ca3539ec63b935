"""The benchmarks' baselines compute what they claim: ``upstream-packed`` (upstream's packed inference path) equals
the oracle, and, given a checkout of upstream (``TITOK_UPSTREAM``), upstream's own code equals both."""

import sys
from pathlib import Path

import pytest
import torch

from helpers import agreement, distinct, make_model, make_reference, random_videos, rel_l2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from baselines import UpstreamPacked, load_upstream, upstream_checkout  # noqa: E402

SHAPES = [(8, 32, 24), (4, 8, 8), (12, 40, 16)]
COUNTS = [16, 1, 33]


@pytest.fixture(scope="module")
def models():
    model = make_model("tiny")
    packed = UpstreamPacked(model.config).eval()
    packed.load_state_dict(model.state_dict())
    return packed, make_reference(model)


def test_upstream_packed_equals_the_oracle(models):
    """fp32: the same indices and reconstructions as the per-video oracle, for a mixed batch in one packed pass."""
    packed, ref = models
    videos = random_videos(SHAPES)
    codes, out = packed.encode(videos, COUNTS)
    ref_codes, ref_out = ref.encode(videos, COUNTS)
    assert [len(i) for i in out["indices"]] == COUNTS
    assert agreement(out["indices"], ref_out["indices"]) >= 0.999 and distinct(ref_out["indices"]) >= 5
    assert codes.shape == ref_codes.shape
    for r, rr in zip(packed.decode_indices(ref_out["indices"], SHAPES), ref.decode_indices(ref_out["indices"], SHAPES),
                     strict=True):  # fmt: skip
        assert r.shape == rr.shape and rel_l2(r, rr) <= 1e-5


def test_upstream_packed_batch_equals_clips_alone(models):
    """Packing is a layout, not an approximation: each clip's tokens are the same alone and in the batch."""
    packed, _ = models
    videos = random_videos(SHAPES)
    _, batch = packed.encode(videos, COUNTS)
    for video, n, together in zip(videos, COUNTS, batch["indices"], strict=True):
        _, alone = packed.encode([video], [n])
        assert torch.equal(alone["indices"][0], together)


@pytest.mark.skipif(upstream_checkout() is None, reason="TITOK_UPSTREAM names no checkout of upstream")
def test_upstream_itself_equals_upstream_packed(models):
    """Upstream's own code (flash-attn or its stand-in), fp32: the oracle's tokens and reconstructions."""
    packed, ref = models
    upstream = load_upstream(ref.state_dict(), ref.config)
    videos = random_videos(SHAPES)
    _, out = upstream.encode(videos, COUNTS)
    _, ref_out = ref.encode(videos, COUNTS)
    assert agreement(out["indices"], ref_out["indices"]) >= 0.999
    for r, rr in zip(upstream.decode_indices(ref_out["indices"], SHAPES),
                     packed.decode_indices(ref_out["indices"], SHAPES), strict=True):  # fmt: skip
        assert rel_l2(r, rr) <= 1e-5
