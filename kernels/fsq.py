"""FSQ (finite scalar quantisation) on the implicit codebook of a levels list (SPEC 7).

Host-side helpers (importable without a GPU): ``FsqConstants`` and the plain-PyTorch references.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FsqConstants:
    """Per-dimension float32/int constants of FSQ, computed exactly as upstream does."""

    levels: torch.Tensor  # int32 [D]
    half_l: torch.Tensor  # float32 [D]: (L - 1) * (1 + 1e-3) / 2
    offset: torch.Tensor  # float32 [D]: 0.5 for even L, else 0
    shift: torch.Tensor  # float32 [D]: atanh(offset / half_l)
    half_width: torch.Tensor  # int32 [D]: L // 2
    basis: torch.Tensor  # int32 [D]: cumprod([1, L_0, L_1, ...])[:D]

    @classmethod
    def of(cls, levels: Sequence[int], device: torch.device | str = "cpu") -> FsqConstants:
        lv = torch.tensor(list(levels), dtype=torch.int32, device=device)
        half_l = (lv - 1) * (1 + 1e-3) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0).to(device=device, dtype=torch.float32)
        shift = (offset / half_l).atanh()
        basis = torch.tensor([math.prod(levels[:d]) for d in range(len(levels))], dtype=torch.int32, device=device)
        return cls(lv, half_l.float(), offset, shift.float(), lv // 2, basis)

    @property
    def codebook_size(self) -> int:
        return int(torch.prod(self.levels.long()))

    def to(self, device: torch.device | str) -> FsqConstants:
        return FsqConstants(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def fsq_quantize_ref(z: torch.Tensor, consts: FsqConstants) -> tuple[torch.Tensor, torch.Tensor]:
    """z: [N, D] any float dtype -> (codes float32 [N, D] in [-1, 1], indices int32 [N]).

    Runs in float32: bound with tanh, round half to even, then an exact integer index.
    """
    bounded = torch.tanh(z.float() + consts.shift) * consts.half_l - consts.offset
    q = torch.round(bounded)
    codes = q / consts.half_width
    indices = ((q.to(torch.int32) + consts.half_width) * consts.basis).sum(-1, dtype=torch.int32)
    return codes, indices


def fsq_indices_to_codes_ref(indices: torch.Tensor, consts: FsqConstants) -> torch.Tensor:
    """indices: [N] integer -> codes float32 [N, D]."""
    level = (indices.long()[:, None] // consts.basis) % consts.levels
    return (level - consts.half_width).float() / consts.half_width
