"""Videos <-> patch rows (DESIGN.md section 3): the layout every path shares, the oracle included."""

from __future__ import annotations

import torch


def patchify(video: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[3, T, H, W] -> [gt*gh*gw, 3*pt*ph*pw]: rows t-major then h then w; features c, pt, ph, pw."""
    c, t, h, w = video.shape
    pt, ph, pw = patch
    x = video.reshape(c, t // pt, pt, h // ph, ph, w // pw, pw)
    return x.permute(1, 3, 5, 0, 2, 4, 6).reshape((t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(rows: torch.Tensor, shape: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: [G, 3*pt*ph*pw] -> [3, T, H, W] for pixel shape (T, H, W)."""
    t, h, w = shape
    pt, ph, pw = patch
    x = rows.reshape(t // pt, h // ph, w // pw, 3, pt, ph, pw)
    return x.permute(3, 0, 4, 1, 5, 2, 6).reshape(3, t, h, w)


def patch_grid(shape: tuple[int, int, int], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Pixel shape (T, H, W) -> patch grid (gt, gh, gw)."""
    return tuple(s // p for s, p in zip(shape, patch, strict=True))
