"""Packed variable-length batches: where each video's rows sit, their M-RoPE positions, cached per shape."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from itertools import accumulate

import torch

from titok_fast.kernels.mrope_attention import AXIS_PAIRS, mrope_tables, packed_positions


@dataclass(frozen=True)
class Packing:
    """Layout of a packed batch: sequence i = [n_i latent rows ; G_i patch rows], sequences concatenated.

    ``grids`` are patch grids (gt, gh, gw). Index tensors live on ``device``; ``*_bounds`` are host ints for
    per-sequence loops.
    """

    token_counts: tuple[int, ...]
    grids: tuple[tuple[int, int, int], ...]
    rows: int
    cu_seqlens: torch.Tensor  # int32 [B+1]
    cu_tokens: torch.Tensor  # int32 [B+1]
    cu_patches: torch.Tensor  # int32 [B+1]
    latent_starts: torch.Tensor  # int32 [B]: 0, queries of the latent rows start each sequence
    patch_starts: torch.Tensor  # int32 [B]: n_i, the patch rows follow the latents
    latent_rows: torch.Tensor  # int64 [sum n]
    patch_rows: torch.Tensor  # int64 [sum G]
    positions: torch.Tensor  # int32 [rows, 3]
    seq_bounds: tuple[tuple[int, int], ...]
    token_bounds: tuple[tuple[int, int], ...]
    patch_bounds: tuple[tuple[int, int], ...]

    @property
    def num_tokens(self) -> int:
        return self.token_bounds[-1][1]

    @property
    def num_patches(self) -> int:
        return self.patch_bounds[-1][1]

    @property
    def max_position(self) -> int:
        return max(n + max(g) for n, g in zip(self.token_counts, self.grids, strict=True))


def _bounds(sizes: list[int]) -> tuple[tuple[int, int], ...]:
    """(start, end) of consecutive blocks of the given sizes."""
    ends = list(accumulate(sizes))
    return tuple((end - size, end) for size, end in zip(sizes, ends, strict=True))


def make_packing(token_counts: tuple[int, ...], grids: tuple[tuple[int, int, int], ...], device) -> Packing:
    patches = [math.prod(g) for g in grids]
    seqlens = [n + g for n, g in zip(token_counts, patches, strict=True)]
    seq_bounds = _bounds(seqlens)

    def cumulative(sizes: list[int]) -> torch.Tensor:
        return torch.tensor([0, *accumulate(sizes)], dtype=torch.int32, device=device)

    latent_rows = torch.cat([torch.arange(s, s + n) for (s, _), n in zip(seq_bounds, token_counts, strict=True)])
    patch_rows = torch.cat([torch.arange(s + n, e) for (s, e), n in zip(seq_bounds, token_counts, strict=True)])
    return Packing(
        token_counts=tuple(token_counts),
        grids=tuple(grids),
        rows=sum(seqlens),
        cu_seqlens=cumulative(seqlens),
        cu_tokens=cumulative(list(token_counts)),
        cu_patches=cumulative(patches),
        latent_starts=torch.zeros(len(seqlens), dtype=torch.int32, device=device),
        patch_starts=torch.tensor(token_counts, dtype=torch.int32, device=device),
        latent_rows=latent_rows.to(device),
        patch_rows=patch_rows.to(device),
        positions=packed_positions(token_counts, grids, device),
        seq_bounds=seq_bounds,
        token_bounds=_bounds(list(token_counts)),
        patch_bounds=_bounds(patches),
    )


class PackingCache:
    """Packings, per-row RoPE cos/sin and the float32 tables, cached per (shapes, device); threads may share it."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._packings: OrderedDict = OrderedDict()
        self._tables: dict = {}
        self._lock = threading.RLock()  # each look-up, and what it stores, whole

    def __getstate__(self) -> dict:  # copied or pickled with its model: empty, with a lock of its own
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["capacity"])

    def packing(self, token_counts, grids, device) -> Packing:
        key = (tuple(token_counts), tuple(grids), str(device))
        with self._lock:
            if (pack := self._packings.get(key)) is not None:
                self._packings.move_to_end(key)
                return pack
            pack = make_packing(tuple(token_counts), tuple(grids), device)
            self._store(key, pack)
            return pack

    def tables(self, num_positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin float32 [P, 32] with P >= num_positions (grown by powers of two, computed in float64)."""
        key = str(device)
        with self._lock:
            found = self._tables.get(key)
            if found is None or found[0].shape[0] < num_positions:
                found = self._tables[key] = mrope_tables(max(256, 1 << (num_positions - 1).bit_length()), device)
            return found

    def row_rotations(self, pack: Packing, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin float32 [rows, 32] of every packed row, cached with the packing."""
        key = ("rows", pack.token_counts, pack.grids, str(device))
        with self._lock:
            if (found := self._packings.get(key)) is None:
                cos, sin = self.tables(pack.max_position, device)
                index = pair_positions(pack.positions)
                found = (cos.gather(0, index), sin.gather(0, index))
                self._store(key, found)
            return found

    def _store(self, key, value) -> None:
        self._packings[key] = value
        if len(self._packings) > self.capacity:
            self._packings.popitem(last=False)


@dataclass(frozen=True)
class StaticBatch:
    """A packed batch in fixed-size buffers (one shape per token budget, refilled per batch).

    Rows past ``cu_seqlens[-1]`` are padding; unused sequence slots repeat the last boundary (length 0). Every
    tensor lives on the model's device, so a compiled graph or a CUDA graph can be replayed with new contents.
    """

    cu_seqlens: torch.Tensor  # int32 [max_seqs + 1]
    positions: torch.Tensor  # int32 [rows, 3]
    is_latent: torch.Tensor  # bool [rows]
    cos: torch.Tensor  # float32 [P >= rows, 32]
    sin: torch.Tensor  # float32 [P >= rows, 32]

    @property
    def rows(self) -> int:
        return self.positions.shape[0]

    def real_rows(self) -> torch.Tensor:
        """bool [rows]: the rows of real sequences (before ``cu_seqlens[-1]``); the rest are padding."""
        rows = torch.arange(self.rows, device=self.cu_seqlens.device, dtype=torch.int32)
        return rows < self.cu_seqlens[-1]

    def segment_ids(self) -> torch.Tensor:
        """int64 [rows]: the sequence of every row; padding rows form one extra segment after the last."""
        rows = torch.arange(self.rows, device=self.cu_seqlens.device, dtype=torch.int32)
        return torch.searchsorted(self.cu_seqlens[1:], rows, right=True)


def pair_positions(positions: torch.Tensor) -> torch.Tensor:
    """[rows, 3] (t, h, w) positions -> int64 [rows, 32], the position that drives each rotary pair. Built from
    slices and expands only: no index tensor is copied from the host, so it can run inside a CUDA graph capture."""
    return torch.cat([positions[:, a : a + 1].expand(-1, n) for a, n in enumerate(AXIS_PAIRS)], dim=1).long()
