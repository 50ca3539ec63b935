"""PSNR and SSIM as `eval` computes them: frames SSIM's window cannot cross, inverted contrast, half-precision input."""

import pytest
import torch

from titok_fast.metrics import psnr, ssim


def test_ssim_refuses_frames_narrower_than_its_window():
    """SSIM's 11 x 11 window must fit across a frame both ways: a frame tall enough but too narrow (16 x 8) is
    refused in one line, as a frame too short is, rather than scored as NaN in eval's table."""
    with pytest.raises(ValueError, match="at least 11 x 11"):
        ssim(torch.zeros(3, 1, 16, 8), torch.zeros(3, 1, 16, 8))


def test_ssim_of_a_contrast_inverted_video_is_negative():
    """A reconstruction whose contrast is inverted (dark where the source is bright) is structurally opposite to
    its source: SSIM's structure term follows the sign of the covariance, so the score is below zero, not near
    the score of a faithful copy."""
    a = torch.rand(3, 2, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert ssim(a, -a) < 0
    assert ssim(a, -a) == pytest.approx(ssim(-a, a))


def test_psnr_of_half_precision_videos_is_that_of_their_values():
    """PSNR is computed in double precision whatever the videos' dtype: a bf16 reconstruction scores what its
    values score in float64, not a figure rounded in bf16 arithmetic."""
    generator = torch.Generator().manual_seed(0)
    a = (torch.rand(3, 4, 32, 32, generator=generator) * 2 - 1).bfloat16()
    b = (a.float() + torch.randn(3, 4, 32, 32, generator=generator) * 0.05).clamp(-1, 1).bfloat16()
    assert psnr(a, b) == pytest.approx(psnr(a.double(), b.double()), rel=1e-9)
