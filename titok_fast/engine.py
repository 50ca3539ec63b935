"""Throughput engine: many clips of mixed sizes -> few, full, fixed-shape launches.

Clips are packed greedily, in input order, into batches whose packed row count (sum of n_i + G_i) fits the
largest token budget; each batch then runs at the smallest budget that holds it. Results come back per clip,
in input order, exactly as ``model.encode`` / ``model.decode_indices`` would give them.

Modes:
- ``eager``: each batch runs through the model's packed path at its exact size (no padding: dynamic shapes
  cost nothing in eager mode, padding would).
- ``static``: the fixed-shape path below, run as plain PyTorch (what ``compile`` and ``cudagraph`` capture; for
  checking them, and for backends that cannot be captured, such as the Triton interpreter).
- ``compile``: ``torch.compile`` of the fixed-shape path, one graph per (stage, budget); the batch is padded to
  the budget and its layout lives in persistent buffers refilled per batch, so batches never recompile.
- ``cudagraph``: one CUDA graph per (stage, budget), captured after a warm-up and replayed with refilled buffers.

An out-of-memory error during a batch splits it in two and retries; a single clip that does not fit is an error
naming it. Nothing is lost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .checks import check_grids, check_token_counts, check_videos
from .model import TiTok
from .packing import Packing, StaticBatch
from .reference import patch_grid, patchify, unpatchify

DEFAULT_BUDGETS = (4096, 8192, 16384, 32768, 65536)
MODES = ("eager", "static", "compile", "cudagraph")


def pack_greedily(items: Iterable, rows_of: Callable[[object], int], largest: int, max_clips: int) -> Iterator[list]:
    """Group items, in order, so each group's rows fit ``largest`` and it holds at most ``max_clips`` items.

    Streams: a group is yielded as soon as the next item does not fit it."""
    current: list = []
    used = 0
    for position, item in enumerate(items):
        r = rows_of(item)
        if r > largest:
            raise ValueError(
                f"clip {position} needs {r} packed rows (tokens + patches); the largest budget is {largest}"
            )
        if current and (used + r > largest or len(current) == max_clips):
            yield current
            current, used = [], 0
        current.append(item)
        used += r
    if current:
        yield current


def plan_batches(rows: Sequence[int], budgets: Sequence[int], max_clips: int) -> list[list[int]]:
    """Clip positions grouped greedily, in order, so each group's rows fit the largest budget."""
    return list(pack_greedily(range(len(rows)), rows.__getitem__, max(budgets), max_clips))


def pick_budget(rows: int, budgets: Sequence[int]) -> int:
    """The smallest budget that holds ``rows``."""
    return min(b for b in budgets if b >= rows)


@dataclass
class _Buffers:
    """Persistent device buffers of one (stage, budget): refilled per batch, shapes never change."""

    inputs: torch.Tensor  # encode: patch rows [budget, 768]; decode: indices [budget]
    batch: StaticBatch


class Engine:
    """Batch many clips through a :class:`TiTok` model.

    Args:
        model: the model (its device, dtype and backend are used as they are).
        mode: ``"eager"``, ``"static"``, ``"compile"`` or ``"cudagraph"`` (CUDA only).
        budgets: packed-row budgets, e.g. 4k..64k rows.
        max_clips: most clips in one batch (sizes the sequence buffers of the fixed-shape modes).
    """

    def __init__(
        self, model: TiTok, mode: str = "eager", budgets: Sequence[int] = DEFAULT_BUDGETS, max_clips: int = 64
    ):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if mode == "cudagraph" and model.device.type != "cuda":
            raise ValueError(f"mode 'cudagraph' needs the model on a CUDA device, it is on {model.device}")
        if not budgets or any(not isinstance(b, int) or b < 2 for b in budgets):
            raise ValueError(f"budgets must be integers >= 2 (packed rows), got {list(budgets)}")
        if max_clips < 1:
            raise ValueError(f"max_clips must be >= 1, got {max_clips}")
        self.model, self.mode = model, mode
        self.budgets = tuple(sorted(set(budgets)))
        self.max_clips = max_clips
        self.compiles = 0  # graphs compiled by torch.compile (mode "compile") or captured (mode "cudagraph")
        self._buffers: dict[tuple[str, int], _Buffers] = {}
        self._runners: dict[tuple[str, int], Callable[[], torch.Tensor | tuple]] = {}
        self._copy_stream = None  # CUDA side stream for host-to-device copies of the next batch

    # --------------------------------------------------------------------------------------------- public API
    def encode(self, videos: list[torch.Tensor], token_counts: list[int]) -> tuple[torch.Tensor, dict]:
        """Like ``model.encode``: ``(codes [sum n, D], {"indices": tuple of int32 [n_i]})`` in input order."""
        check_videos(videos, self.model.config.patch_size)
        counts = check_token_counts(token_counts, len(videos))
        results = [r for _, r in self.encode_stream(zip(range(len(videos)), videos, counts, strict=True))]
        codes = torch.cat([c for c, _ in results])
        return codes, {"indices": tuple(i for _, i in results)}

    def decode_indices(self, indices, grids: list, token_counts: list[int] | None = None) -> list[torch.Tensor]:
        """Like ``model.decode_indices``: one [3, T, H, W] per clip, in input order."""
        packed, counts = self.model._pack_indices(indices, token_counts)
        shapes = check_grids(grids, len(counts), self.model.config.patch_size)
        per_clip = packed.split(counts)
        items = zip(range(len(counts)), per_clip, shapes, strict=True)
        return [video for _, video in self.decode_stream(items)]

    def encode_stream(
        self, items: Iterable[tuple[object, torch.Tensor, int]]
    ) -> Iterator[tuple[object, tuple[torch.Tensor, torch.Tensor]]]:
        """``(key, video [3, T, H, W], n)`` items -> ``(key, (codes [n, D], indices int32 [n]))`` in input order.

        Batches are formed as items arrive; the next batch is staged (copied to the device) on a worker thread
        while the current one runs."""
        cfg = self.model.config

        def rows_of(item) -> int:
            _, video, n = item
            return n + math.prod(patch_grid(tuple(video.shape[1:]), cfg.patch_size))

        yield from self._stream(items, rows_of, self._stage_videos, self._run_encode)

    def decode_stream(
        self, items: Iterable[tuple[object, torch.Tensor, tuple[int, int, int]]]
    ) -> Iterator[tuple[object, torch.Tensor]]:
        """``(key, indices [n], pixel shape (T, H, W))`` items -> ``(key, video [3, T, H, W])`` in input order."""
        cfg = self.model.config

        def rows_of(item) -> int:
            _, idx, shape = item
            return idx.numel() + math.prod(patch_grid(tuple(shape), cfg.patch_size))

        yield from self._stream(items, rows_of, self._stage_indices, self._run_decode)

    # ------------------------------------------------------------------------------------------- batching
    def _stream(self, items, rows_of, stage, run) -> Iterator:
        """Batch items greedily; stage batch k+1 on a worker thread while batch k runs."""
        with ThreadPoolExecutor(max_workers=1) as stager:
            pending = None  # (batch, future of its staged inputs)
            for batch in pack_greedily(items, rows_of, self.budgets[-1], self.max_clips):
                staged = (batch, stager.submit(stage, batch))
                if pending is not None:
                    yield from self._finish(pending, run)
                pending = staged
            if pending is not None:
                yield from self._finish(pending, run)

    def _finish(self, pending, run) -> Iterator:
        batch, staged = pending
        tensors, copied = staged.result()
        if copied is not None:  # the compute stream waits for the side-stream copies, and owns their memory
            stream = torch.cuda.current_stream(self.model.device)
            stream.wait_event(copied)
            for t in tensors:
                t.record_stream(stream)
        results = self._run_splitting(run, batch, tensors)
        yield from zip((item[0] for item in batch), results, strict=True)

    def _run_splitting(self, run, batch: list, staged: list) -> list:
        """Run a batch; on out-of-memory split it in two and retry, down to single clips."""
        try:
            return run(batch, staged)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise RuntimeError(f"out of memory on clip {batch[0][0]!r} alone; use a smaller clip") from None
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(batch) // 2
            return self._run_splitting(run, batch[:half], staged[:half]) + self._run_splitting(
                run, batch[half:], staged[half:]
            )

    def _stage(self, tensors: list[torch.Tensor], dtype: torch.dtype | None) -> tuple[list[torch.Tensor], object]:
        """Copy a batch's inputs to the model's device. On CUDA: from pinned memory on a side stream, so the copy
        overlaps the batch running now; returns the tensors and the event that marks the copies done."""
        device = self.model.device
        if device.type != "cuda":
            return [t.to(device=device, dtype=dtype or t.dtype) for t in tensors], None
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._copy_stream):
            out = [
                t.pin_memory().to(device=device, dtype=dtype or t.dtype, non_blocking=True) if t.device.type == "cpu"
                else t.to(dtype=dtype or t.dtype)
                for t in tensors
            ]  # fmt: skip
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        return out, copied

    def _stage_videos(self, batch: list) -> tuple[list[torch.Tensor], object]:
        return self._stage([video for _, video, _ in batch], self.model.dtype)

    def _stage_indices(self, batch: list) -> tuple[list[torch.Tensor], object]:
        return self._stage([idx for _, idx, _ in batch], None)

    # ----------------------------------------------------------------------------------------------- encode
    def _run_encode(self, batch: list, videos: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        counts = [n for _, _, n in batch]
        if self.mode == "eager":
            codes, out = self.model.encode(videos, counts)
            return list(zip(codes.split(counts), out["indices"], strict=True))
        cfg = self.model.config
        grids = [patch_grid(tuple(v.shape[1:]), cfg.patch_size) for v in videos]
        rows = [n + math.prod(g) for n, g in zip(counts, grids, strict=True)]
        budget = pick_budget(sum(rows), self.budgets)
        buffers = self._static_buffers("encode", budget)
        pack = self._fill_layout(buffers.batch, counts, grids)
        buffers.inputs.zero_()
        buffers.inputs[pack.patch_rows] = torch.cat([patchify(v, cfg.patch_size) for v in videos])
        codes, indices = self._replay("encode", budget)
        codes, indices = codes[pack.latent_rows], indices[pack.latent_rows]
        return [(c.clone(), i.clone()) for c, i in zip(codes.split(counts), indices.split(counts), strict=True)]

    # ----------------------------------------------------------------------------------------------- decode
    def _run_decode(self, batch: list, indices: list[torch.Tensor]) -> list[torch.Tensor]:
        shapes = [tuple(shape) for _, _, shape in batch]
        counts = [idx.numel() for idx in indices]
        if self.mode == "eager":
            return self.model.decode_indices(list(indices), shapes)
        cfg = self.model.config
        grids = [patch_grid(s, cfg.patch_size) for s in shapes]
        budget = pick_budget(sum(n + math.prod(g) for n, g in zip(counts, grids, strict=True)), self.budgets)
        buffers = self._static_buffers("decode", budget)
        pack = self._fill_layout(buffers.batch, counts, grids)
        buffers.inputs.zero_()
        buffers.inputs[pack.latent_rows] = torch.cat(indices).to(buffers.inputs.dtype)
        patches = self._replay("decode", budget)[pack.patch_rows].split([math.prod(g) for g in grids])
        return [unpatchify(p, s, cfg.patch_size).clone() for p, s in zip(patches, shapes, strict=True)]

    # ------------------------------------------------------------------------------------ fixed-shape path
    def _static_buffers(self, stage: str, budget: int) -> _Buffers:
        key = (stage, budget)
        if key not in self._buffers:
            device, model = self.model.device, self.model
            cos, sin = model._packings.tables(budget, device)
            batch = StaticBatch(
                cu_seqlens=torch.zeros(self.max_clips + 1, dtype=torch.int32, device=device),
                positions=torch.zeros(budget, 3, dtype=torch.int32, device=device),
                is_latent=torch.zeros(budget, dtype=torch.bool, device=device),
                cos=cos,
                sin=sin,
            )
            if stage == "encode":
                inputs = torch.zeros(budget, model.config.patch_dim, dtype=model.dtype, device=device)
            else:
                inputs = torch.zeros(budget, dtype=torch.int32, device=device)
            self._buffers[key] = _Buffers(inputs, batch)
        return self._buffers[key]

    def _fill_layout(self, batch: StaticBatch, counts: list[int], grids: list) -> Packing:
        """Refill the layout buffers in place for these clips; returns their (unpadded) packing."""
        pack = self.model.packing(counts, grids)
        total = pack.rows
        cu = torch.full_like(batch.cu_seqlens, total)
        cu[: len(counts) + 1] = pack.cu_seqlens
        batch.cu_seqlens.copy_(cu)
        batch.positions.zero_()
        batch.positions[:total] = pack.positions
        batch.is_latent.zero_()
        batch.is_latent[pack.latent_rows] = True
        return pack

    def _replay(self, stage: str, budget: int):
        key = (stage, budget)
        if key not in self._runners:
            self._runners[key] = self._build_runner(stage, budget)
        return self._runners[key]()

    def _build_runner(self, stage: str, budget: int) -> Callable:
        model, buffers = self.model, self._buffers[(stage, budget)]
        if stage == "encode":
            fn, extra = model.encode_static, ()
        else:  # the decoder table is an input, so the graph holds no Python-side cache lookups
            fn, extra = model.decode_static, model.decoder_table()
        args = (buffers.inputs, buffers.batch, *extra)
        if self.mode == "static":
            return lambda: fn(*args)
        if self.mode == "compile":
            compiled = torch.compile(fn, backend=self._counting_inductor, dynamic=False)
            return lambda: compiled(*args)
        # cudagraph: warm up on a side stream (Triton autotuning, allocator), then capture once
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*args)
        self.compiles += 1

        def replay():
            graph.replay()
            return out

        return replay

    def _counting_inductor(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        return compile_fx(gm, example_inputs)
