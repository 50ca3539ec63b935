"""Fused q/k LayerNorm + M-RoPE + variable-length grouped-query attention.

Host-side helpers (importable without a GPU):
- ``mrope_tables``: cos/sin of every (position, rotary pair), computed in float64, stored float32.
- ``packed_positions``: the (t, h, w) position of every row of a packed batch (SPEC 6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

HEAD_DIM = 64
AXIS_PAIRS = (12, 10, 10)  # rotary pairs driven by the t, h and w position (axis dims 24, 20, 20)


def pair_frequencies() -> torch.Tensor:
    """float64 [32]: f_p = (pi/2) * 10000 ** (p / (P-1)) for each axis' P pairs, t pairs first."""
    parts = [(math.pi / 2) * 10000.0 ** (torch.arange(p, dtype=torch.float64) / (p - 1)) for p in AXIS_PAIRS]
    return torch.cat(parts)


def pair_axis() -> torch.Tensor:
    """int64 [32]: which position axis (0=t, 1=h, 2=w) drives each rotary pair."""
    return torch.repeat_interleave(torch.arange(3), torch.tensor(AXIS_PAIRS))


def mrope_tables(num_positions: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: float32 [num_positions, 32], entry [pos, p] = cos/sin(pos * f_p) computed in float64.

    Angles reach ~1.6e7 rad, where float32 has no phase precision: never derive them in float32.
    """
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * pair_frequencies()[None, :]
    return angles.cos().float().to(device), angles.sin().float().to(device)


def packed_positions(
    token_counts: Sequence[int], grids: Sequence[Sequence[int]], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """int32 [sum(n_i + G_i), 3]: latent token j -> (j, j, j); patch (a, b, c) -> (a + n, b + n, c + n).

    ``grids`` are patch grids ``(gt, gh, gw)``; rows are packed per video, latents first, patches t-major.
    """
    parts = []
    for n, (gt, gh, gw) in zip(token_counts, grids, strict=True):
        latent = torch.arange(n, dtype=torch.int32)[:, None].expand(n, 3)
        grid = torch.stack(
            torch.meshgrid(
                torch.arange(gt, dtype=torch.int32),
                torch.arange(gh, dtype=torch.int32),
                torch.arange(gw, dtype=torch.int32),
                indexing="ij",
            ),
            dim=-1,
        ).reshape(-1, 3)
        parts += [latent, grid + n]
    return torch.cat(parts).to(device)
