"""FSQ in PyTorch (DESIGN.md section 7): the torch backend's quantiser and the model's ``quantize`` module.

:class:`FSQ` has upstream's interface: calling it on ``z`` returns ``(codes, {"indices": ...})``, and it has
``bound``, ``quantize``, ``codes_to_indices``, ``indices_to_codes``, ``indices_to_level_indices``,
``implicit_codebook``, ``codebook_size``, ``codebook_dim``. It holds no parameters and no buffers (so a model's
``state_dict`` keys stay upstream's, and a model built on the ``meta`` device loads like any other): its constants
are made per device, once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from titok_fast.checks import check_no_grad
from titok_fast.kernels.fsq import FsqConstants

EPS = 1e-3  # the bound's margin: half_l = (L - 1) * (1 + EPS) / 2
# The index of a latent that holds NaN (an overflow, NaN weights): its codes are NaN, and a float-to-int conversion
# would make it INT_MIN on a CPU and a valid-looking index on a GPU (whose conversion makes NaN 0). An infinite
# latent is bounded by tanh, as upstream bounds it, and gets a code.
NAN_INDEX = -1


def fsq_quantize(z: torch.Tensor, consts: FsqConstants) -> tuple[torch.Tensor, torch.Tensor]:
    """z [..., D] any float dtype -> (codes float32 [..., D] on the grid in [-1, 1], indices int32 [...]).

    In float32: tanh bound, round half to even, divide by the half width; the index is the exact integer
    ``sum_d level_d * basis_d``, and -1 for a latent that holds NaN (:data:`NAN_INDEX`)."""
    bounded = torch.tanh(z.float() + consts.shift) * consts.half_l - consts.offset
    q = torch.round(bounded)
    indices = ((q.to(torch.int32) + consts.half_width) * consts.basis).sum(-1, dtype=torch.int32)
    return q / consts.half_width, torch.where(q.isnan().any(-1), NAN_INDEX, indices)


def grid_indices(codes: torch.Tensor, consts: FsqConstants) -> torch.Tensor | None:
    """codes [N, D] -> int32 indices [N] when every code lies exactly on the FSQ grid (compared in the codes'
    dtype), else None."""
    q = torch.round(codes.float() * consts.half_width)
    level = q + consts.half_width
    on_grid = (level >= 0) & (level < consts.levels) & ((q / consts.half_width).to(codes.dtype) == codes)
    if not bool(on_grid.all()):
        return None
    return (level.long() * consts.basis).sum(-1).to(torch.int32)


INDEX_MAX = 2**31 - 1  # indices are int32


class FSQ(nn.Module):
    """Finite scalar quantisation on the implicit codebook of ``levels`` (upstream's ``model.quantize``).

    Args:
        levels: levels per code dimension, e.g. ``(7, 7, 7, 5, 5)``.
    """

    def __init__(self, levels: Sequence[int]):
        super().__init__()
        self.levels = tuple(int(n) for n in levels)
        self.codebook_dim = len(self.levels)
        self.dim = self.codebook_dim
        self.codebook_size = 1
        for n in self.levels:
            self.codebook_size *= n
        if not self.levels or min(self.levels) < 2 or self.codebook_size > INDEX_MAX:
            raise ValueError(
                f"fsq_levels {list(self.levels)}: expected levels >= 2 (a level of 1 bounds to 0 and divides by it) "
                f"making at most {INDEX_MAX} codes (indices are int32); they make {self.codebook_size}"
            )
        self._constants: dict[str, FsqConstants] = {}
        # where implicit_codebook lives: follows .to()/.cuda() like a buffer would, without being one (a buffer
        # would be left on `meta` when a model built there is filled with load_state_dict(assign=True))
        default = torch.empty(0).device
        self._device = torch.device("cpu") if default.type == "meta" else default

    def _apply(self, fn, recurse: bool = True):
        try:
            self._device = fn(torch.empty(0, device=self._device)).device
        except (NotImplementedError, RuntimeError):  # a conversion that has no meaning for an empty probe
            pass
        return super()._apply(fn, recurse)

    def constants(self, device: torch.device | str) -> FsqConstants:
        """The per-dimension constants on ``device`` (made once per device)."""
        key = str(device)
        if key not in self._constants:
            self._constants[key] = FsqConstants.of(self.levels, device)
        return self._constants[key]

    def bound(self, z: torch.Tensor, eps: float = EPS) -> torch.Tensor:
        """``tanh(z + shift) * half_l - offset``: z [..., D] bounded per dimension, before rounding."""
        check_no_grad(z, "z")
        c = self.constants(z.device)
        half_l = c.half_l if eps == EPS else (c.levels - 1) * (1 + eps) / 2
        shift = c.shift if eps == EPS else (c.offset / half_l).atanh()
        return (z + shift).tanh() * half_l - c.offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., D] -> codes [..., D] on the grid in [-1, 1] (``round(bound(z)) / half_width``)."""
        return torch.round(self.bound(z)) / self.constants(z.device).half_width

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., D] on the grid, any float dtype -> int32 indices [...]. Each dimension's level is rounded
        in float32, then summed in integers: upstream's arithmetic (in the codes' own dtype, truncated) gives the
        same indices for float32 codes, and wrong ones for a bf16 or fp16 model's codes (bf16 holds integers
        exactly only up to 256: index 257 came back as 256). A code holding NaN gives -1, as in ``forward``."""
        c = self.constants(codes.device)
        level = torch.round(codes.float() * c.half_width) + c.half_width
        indices = (level.long() * c.basis).sum(dim=-1).to(torch.int32)  # (NaN wraps to anything: -1 below)
        return torch.where(level.isnan().any(-1), NAN_INDEX, indices)

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [...] -> the level of each dimension [..., D], in ``[0, L_d)`` (integer dtype of the input,
        widened to int32 at least)."""
        c = self.constants(indices.device)
        return (indices[..., None] // c.basis) % c.levels

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [...] -> codes float32 [..., D]: ``(level - half_width) / half_width``."""
        c = self.constants(indices.device)
        return (self.indices_to_level_indices(indices) - c.half_width) / c.half_width

    @property
    def implicit_codebook(self) -> torch.Tensor:
        """Every code, float32 [codebook_size, D], row k the code of index k."""
        return self.indices_to_codes(torch.arange(self.codebook_size, device=self._device))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """z [N, D] -> ``(codes [N, D] in z's dtype, {"indices": int32 [N]})``, computed in float32."""
        check_no_grad(z, "z")
        codes, indices = fsq_quantize(z, self.constants(z.device))
        return codes.to(z.dtype), {"indices": indices}

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}"
