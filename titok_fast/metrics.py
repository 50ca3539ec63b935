"""How close a reconstruction is to its source: PSNR and SSIM of two videos [3, T, H, W] in [-1, 1]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos [3, T, H, W] in [-1, 1], measured on the [0, 1] scale (data range 1).

    Computed from the mean squared error over all pixels, channels and frames; inf for identical videos.
    """
    _check_pair(a, b)
    mse = ((a.double() - b.double()) / 2).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


SSIM_MIN_SIDE = 11  # the Gaussian window's


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of two videos [3, T, H, W] in [-1, 1] (Wang et al. 2004), frames at least 11 x 11.

    Per frame and per RGB channel on the [0, 1] scale: 11 x 11 Gaussian window with sigma 1.5, K1 = 0.01,
    K2 = 0.03, only windows that fit inside the frame; averaged over positions, channels and then frames.
    """
    _check_pair(a, b)
    if min(a.shape[-2:]) < SSIM_MIN_SIDE:
        raise ValueError(f"SSIM needs frames of at least {SSIM_MIN_SIDE} x {SSIM_MIN_SIDE}; got {list(a.shape[-2:])}")
    x, y = ((v.double().transpose(0, 1) + 1) / 2 for v in (a, b))  # [T, 3, H, W]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    v = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # [T, 15, H, W]: the five maps blurred in one pass
    for window in (g.view(1, 1, 11, 1), g.view(1, 1, 1, 11)):  # the 11 x 11 window is the product of its 1-D
        v = F.conv2d(v, window.expand(15, 1, -1, -1), groups=15)  # factors: two passes of 11 products, not 121
    mu_x, mu_y, xx, yy, xy = v.split(3, dim=1)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean().item()


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4 or a.shape[0] != 3:
        raise ValueError(f"videos must both be [3, T, H, W] of one shape; got {list(a.shape)} and {list(b.shape)}")
