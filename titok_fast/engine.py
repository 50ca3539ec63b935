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
- ``auto``: per batch, by a fixed rule on its stage, shape and the device (never by timing, see
  :func:`auto_mode`): on CUDA a small batch, where launch overhead dominates, runs as a CUDA graph of its own
  layout: the eager path captured for that batch's clip shapes and token counts, so nothing is padded, and the
  last layer's shortcut and the decoder's table input are kept. A layout's graph is captured at its second batch
  (a layout seen once never pays a capture), for :data:`LAYOUT_GRAPHS` layouts per stage; any other small batch
  runs as :func:`padded_mode` says (encode: ``cudagraph``, decode: ``eager``), and a large batch ``eager``, which
  never pays for padding.

An out-of-memory error during a batch splits it in two and retries; a single clip that does not fit is an error
naming it. Nothing is lost.

Threads: an engine runs one batch at a time, so threads may share one (in every mode: the fixed-shape modes refill
one set of buffers per budget); their batches take turns and each clip comes out as it would alone. On CUDA a
batch is also queued after the previous one's work, whichever stream each thread queues on. Threads that want to
compute in parallel use an engine each. A CUDA graph is captured (an engine's first batch of a budget in
``cudagraph``, or ``auto`` on CUDA) in thread-local mode (:data:`CAPTURE_MODE`), as torch.compile's CUDA graphs
are: other threads may allocate, pin memory and launch work on their own streams meanwhile (the decoding threads
of a run do); work that waits on the whole device (``torch.cuda.synchronize``) would still break the capture.
One capture at a time runs in the process (:data:`_CAPTURE_LOCK`).
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import math
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from . import fp8
from .checks import (
    PendingValueCheck,
    check_clip_indices,
    check_grids,
    check_token_counts,
    check_videos,
    is_integer,
)
from .model import TiTok, own_dtype, upstream_argument_order
from .packing import Packing, PackingCache, StaticBatch
from .patches import patch_grid, patchify, unpatchify

DEFAULT_BUDGETS = (4096, 8192, 16384, 32768, 65536)
CAPTURE_MODE = "thread_local"  # a capture refuses unsafe CUDA calls of its own thread only (module header)
MODES = ("auto", "eager", "static", "compile", "cudagraph")
# auto: the largest batch (packed rows) that runs as a CUDA graph. Measured on an H200 (benchmarks/RESULTS.md) with
# graphs padded to a budget: they won for encode at batch 1 (3136-3904 rows: 1.34-1.63x eager, then 2.70x) and lost
# at batch 8 and up (25k+ rows: 0.78-0.96x, the padding costing more than the launches saved); for decode, which
# also lost its table input and last-layer shortcut in them, ~1.0x, then 0.95x at batch 1. A graph of the batch's
# own layout (LAYOUT_GRAPHS) pads nothing and keeps both, so it does the eager path's device work without its
# launches: decode batches of this size take one too, and a padded one never (eager instead).
AUTO_GRAPH_MAX_ROWS = 8192
LAYOUT_GRAPHS = 16  # auto: the layouts (clip shapes and token counts of a batch) an engine keeps a graph of, per stage
LAYOUTS_SEEN = 256  # auto: the layouts an engine remembers having run once, without a graph (the oldest forgotten)
CAPTURE_AT_FIRST_BATCH = False  # auto: a layout's graph at its first batch, not its second (tests)
PADDING = 0.0  # what the fixed-shape path's input rows hold where no patch is
TORCH_FIXED_SHAPE_MAX_BUDGET = 16384  # dense-mask attention of the torch backend's fixed-shape path: 256 Mi pairs


class _Idle:
    def __repr__(self) -> str:
        return "IDLE"


IDLE = _Idle()  # an item of encode_stream / decode_stream: the source has nothing ready now, run what is pending


def _checked(items: Iterable, check: Callable, kind: str, fields: str) -> Iterator:
    """``check(*item)`` for each item as it comes (it raises for a bad one, or one that is not three ``fields``);
    :data:`IDLE` passes as it is."""
    try:
        items = iter(items)
    except TypeError:
        raise TypeError(f"{kind} takes an iterable of items {fields}; got {type(items).__name__}") from None
    for item in items:
        yield item if item is IDLE else check(*_item(kind, item, fields))


def _until_bad(batch: list, pending: collections.deque | None) -> tuple[list, ValueError | None]:
    """The batch up to its first item whose pending value check fails, and that error (None: all are good).
    Takes the batch's entries from ``pending`` (waiting, on CUDA, for their checks only)."""
    if pending is None:
        return batch, None
    checks = [pending.popleft() for _ in batch]
    for position, value_check in enumerate(checks):
        if value_check is not None and (error := value_check.error()) is not None:
            return batch[:position], error
    return batch, None


class _HostCopy:
    """A batch's results (tuples of tensors, one per clip) copied to pinned host memory behind the batch on the CUDA
    ``stream``, one copy per tuple position; :meth:`wait` waits for those copies only and gives the results back
    as ordinary CPU tensors (the pinned buffers go back to their cache). ``stream`` None: copied at once."""

    def __init__(self, results: list[tuple[torch.Tensor, ...]], stream):
        self.shapes = [[t.shape for t in result] for result in results]
        self.host = []
        for column in zip(*results, strict=True):
            flat = torch.cat([t.reshape(-1) for t in column])
            pinned = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=stream is not None)
            self.host.append(pinned.copy_(flat, non_blocking=stream is not None))
        self.done = None
        if stream is not None:
            self.done = torch.cuda.Event(blocking=True)  # the waiting thread sleeps: the decoders want the cores
            self.done.record(stream)

    def wait(self) -> list[tuple[torch.Tensor, ...]]:
        if self.done is not None:
            self.done.synchronize()
        columns = []
        for buffer, shapes in zip(self.host, zip(*self.shapes, strict=True), strict=True):
            parts = buffer.split([shape.numel() for shape in shapes])
            columns.append([part.view(shape).clone() for part, shape in zip(parts, shapes, strict=True)])
        self.host = []
        return list(zip(*columns, strict=True))


def pack_greedily(
    items: Iterable,
    rows_of: Callable[[object], int],
    largest: int,
    max_clips: int,
    name_of: Callable[[int, object], object] = lambda position, item: position,
) -> Iterator[list]:
    """Group items, in order, so each group's rows fit ``largest`` and it holds at most ``max_clips`` items.

    Streams: a group is yielded as soon as it is full or the next item does not fit it, and at an :data:`IDLE` item,
    which is passed on after the group. An item too large for ``largest`` is a ValueError naming it by
    ``name_of(position, item)``, raised after the group of the items before it."""
    current: list = []
    used = 0
    for position, item in enumerate(items):
        if item is IDLE:
            if current:
                yield current
                current, used = [], 0
            yield IDLE
            continue
        r = rows_of(item)
        if r > largest:
            if current:
                yield current
            raise ValueError(
                f"clip {name_of(position, item)!r} needs {r} packed rows (tokens + patches); the largest budget is "
                f"{largest}"
            )
        if current and used + r > largest:
            yield current
            current, used = [], 0
        current.append(item)
        used += r
        if len(current) == max_clips or used == largest:  # full: out now, not when the next item comes
            yield current
            current, used = [], 0
    if current:
        yield current


def plan_batches(rows: Sequence[int], budgets: Sequence[int], max_clips: int) -> list[list[int]]:
    """Clip positions grouped greedily, in order, so each group's rows fit the largest budget."""
    return list(pack_greedily(range(len(rows)), rows.__getitem__, max(budgets), max_clips))


def auto_mode(rows: int, device: torch.device, budgets: Sequence[int] = DEFAULT_BUDGETS, stage: str = "encode") -> str:
    """The mode ``auto`` runs a ``stage`` ("encode" or "decode") batch of ``rows`` packed rows in on ``device``:
    ``"layout"`` (a CUDA graph of the batch's own layout) for a batch of at most ``AUTO_GRAPH_MAX_ROWS`` rows on
    CUDA, else ``"eager"``. The engine runs a layout's first batch, and a batch of any layout once it holds
    :data:`LAYOUT_GRAPHS` of the stage, as :func:`padded_mode` says."""
    return "layout" if device.type == "cuda" and rows <= AUTO_GRAPH_MAX_ROWS else "eager"


def padded_mode(rows: int, budgets: Sequence[int], stage: str) -> str:
    """What ``auto`` runs a small batch in without a graph of its layout: ``"cudagraph"`` for an encode
    batch whose budget (the smallest of ``budgets`` that holds it) is at most ``AUTO_GRAPH_MAX_ROWS`` rows, else
    ``"eager"`` (a decode batch always: a padded graph never beat eager for the decoder)."""
    if stage != "encode" or rows > max(budgets):
        return "eager"
    return "cudagraph" if pick_budget(rows, budgets) <= AUTO_GRAPH_MAX_ROWS else "eager"


def _budgets(budgets: object) -> tuple[int, ...]:
    """The packed-row budgets as a tuple (an iterator is read once), each an integer >= 2."""
    if isinstance(budgets, (str, bytes)) or not isinstance(budgets, Iterable):
        raise TypeError(f"budgets must be a sequence of integers >= 2 (packed rows), got {budgets!r}")
    values = tuple(budgets)
    if not values or any(not is_integer(b) or b < 2 for b in values):
        raise ValueError(f"budgets must be integers >= 2 (packed rows), got {list(values)}")
    return tuple(int(b) for b in values)  # (NumPy integers, as a NumPy array's, taken as ints)


def _item(kind: str, item: object, fields: str) -> tuple:
    """A stream's item as its three fields; anything else is a TypeError saying what an item is."""
    if not isinstance(item, (tuple, list)) or len(item) != 3:
        got = f"has {len(item)} fields" if isinstance(item, (tuple, list)) else f"is a {type(item).__name__}"
        raise TypeError(f"an item of {kind} {got}; expected a tuple {fields}")
    return tuple(item)


def _clip_named(key: object) -> Callable[[int], str]:
    """Names a stream's clip in the checks' errors (which name the i-th video of a batch otherwise)."""
    return lambda _: f"clip {key!r}"


def pick_budget(rows: int, budgets: Sequence[int]) -> int:
    """The smallest budget that holds ``rows``."""
    return min(b for b in budgets if b >= rows)


@dataclass
class _Layout:
    """A CUDA graph of the eager path for one layout: its input buffer (encode: patch rows [sum G, 768]; decode:
    indices int32 [sum n]), refilled per batch, and the packing and RoPE tables the graph reads, held with it."""

    inputs: torch.Tensor
    pack: Packing
    cache: PackingCache
    replay: Callable[[], torch.Tensor | tuple]


@dataclass
class _Buffers:
    """Persistent device buffers of one (stage, budget): refilled per batch, shapes never change."""

    inputs: torch.Tensor  # encode: patch rows [budget, 768]; decode: indices [budget]
    batch: StaticBatch


class Engine:
    """Batch many clips through a :class:`TiTok` model.

    Args:
        model: the model (its device, dtype and backend are used as they are).
        mode: ``"auto"`` (default), ``"eager"``, ``"static"``, ``"compile"`` or ``"cudagraph"`` (CUDA only).
        budgets: packed-row budgets, e.g. 4k..64k rows.
        max_clips: most clips in one batch (sizes the sequence buffers of the fixed-shape modes).
    """

    def __init__(
        self, model: TiTok, mode: str = "auto", budgets: Sequence[int] = DEFAULT_BUDGETS, max_clips: int = 64
    ):
        if not isinstance(model, TiTok):
            raise TypeError(f"model is a {type(model).__name__}; expected a TiTok (e.g. load_tokenizer(...) or "
                            "TiTok('tiny'))")  # fmt: skip
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if mode == "cudagraph" and model.device.type != "cuda":
            raise ValueError(f"mode 'cudagraph' needs the model on a CUDA device, it is on {model.device}")
        budgets = _budgets(budgets)
        if not is_integer(max_clips) or max_clips < 1:
            raise ValueError(f"max_clips must be an integer >= 1, got {max_clips!r}")
        max_clips = int(max_clips)
        self.model, self.mode = model, mode
        self._requested_budgets = tuple(sorted(set(budgets)))
        self.budgets = self._usable_budgets(stacklevel=3)
        # a clip takes at least one row of a batch, so no batch holds more clips than the largest budget has rows
        # (a larger max_clips would only size the fixed-shape modes' sequence buffers and attention grids by it)
        self.max_clips = min(max_clips, self.budgets[-1])
        self.compiles = 0  # graphs compiled by torch.compile (mode "compile") or captured ("cudagraph", "auto")
        self.modes_run: collections.Counter = collections.Counter()  # batches run, by the mode each ran in
        self._planned_mode = ""  # the mode of the batch running now (_plan), counted once it has run
        self._buffers: dict[tuple[str, int], _Buffers] = {}
        self._runners: dict[tuple[str, int], Callable[[], torch.Tensor | tuple]] = {}
        self._layouts: dict[tuple[str, tuple, tuple], _Layout] = {}  # (stage, token counts, grids) -> its graph
        self._seen: collections.OrderedDict = collections.OrderedDict()  # layouts run once (keys), LAYOUTS_SEEN
        self._copy_stream = None  # CUDA side stream for the copies of a batch's inputs in host memory
        # one batch at a time: threads sharing this engine would refill one another's buffers (module header)
        self._batch_lock = threading.RLock()
        self._last_batch = None  # on CUDA: an event after the last batch's work, on the stream it was queued on
        self._graph_pool = None  # one memory pool for every captured graph: they never run at the same time
        self._capture_stream = None  # the stream every graph is captured on (made with the pool, on the device)
        self._stream_claim: Callable[[], object] = lambda: None  # lets the stream go (see _free_capture_stream)
        self._failed_graphs: list[_Replay] = []  # captures ended but not instantiated: dropped with the others
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # see _decoder_table
        self._table_source: torch.Tensor | None = None
        self._built_for = self._model_state()  # what the buffers, runners and table above were built for

    def __getstate__(self) -> dict:
        """What a copy or a pickle keeps (a Dataset holding an engine, sent to spawned DataLoader workers): the
        model, mode, budgets and max_clips. Its buffers, graphs, compiled functions, streams and lock are rebuilt
        as a fresh engine's are, where it runs; its counts start again."""
        return {"model": self.model, "mode": self.mode, "budgets": self._requested_budgets,
                "max_clips": self.max_clips}  # fmt: skip

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _usable_budgets(self, stacklevel: int) -> tuple[int, ...]:
        """The budgets asked for, less those the torch backend's fixed-shape path cannot take."""
        budgets = self._requested_budgets
        if self.mode == "eager" or self.model.active_backend.name != "torch":
            return budgets
        kept = tuple(b for b in budgets if b <= TORCH_FIXED_SHAPE_MAX_BUDGET)
        if kept != budgets and self.mode != "auto":  # auto pads to at most AUTO_GRAPH_MAX_ROWS
            warnings.warn(
                f"the torch backend's fixed-shape path attends with a dense [budget, budget] mask; budgets above "
                f"{TORCH_FIXED_SHAPE_MAX_BUDGET} rows are dropped (the triton backend on a GPU takes larger ones)",
                stacklevel=stacklevel,
            )
            return kept or (TORCH_FIXED_SHAPE_MAX_BUDGET,)
        return budgets

    def _model_state(self) -> tuple:
        """What the fixed-shape state depends on besides the weights' values (which it follows in place): where the
        parameters live, their dtype and device, the modules (``model.generation``), precision and backend."""
        model = self.model
        return (model.dtype, model.device, model.generation, model.precision, model.active_backend.name,
                model.parameter_addresses())  # fmt: skip

    def _follow_model(self) -> None:
        """At the start of a call: if the model changed in a way the built state cannot follow in place, drop that
        state (it is built again as needed), take the budgets usable now, and check the mode against the model's
        device."""
        state = self._model_state()
        if state == self._built_for:
            return
        if self.mode == "cudagraph" and state[1] != self._built_for[1] and state[1].type != "cuda":
            raise ValueError(f"mode 'cudagraph' needs the model on a CUDA device, it was moved to {state[1]}")
        self._buffers.clear()
        self._runners.clear()
        self._layouts.clear()
        self._seen.clear()
        self._table = self._table_source = None
        self._failed_graphs.clear()
        self._graph_pool = self._capture_stream = None  # (its graphs are gone: the next capture takes a stream no
        # live graph was captured on, on the graphs' device, see _free_capture_stream)
        self._stream_claim()
        self.budgets = self._usable_budgets(stacklevel=5)
        self._built_for = state

    # --------------------------------------------------------------------------------------------- public API
    def encode(self, videos: list[torch.Tensor], token_counts: list[int]) -> tuple[torch.Tensor, dict]:
        """Like ``model.encode``: ``(codes [sum n, D], {"indices": tuple of int32 [n_i]})`` in input order."""
        check_videos(videos, self.model.config.patch_size, dtype=self.model.dtype)
        counts = check_token_counts(token_counts, len(videos))
        items = zip(range(len(videos)), videos, counts, strict=True)  # checked above: straight to the batching
        results = []  # a loop, not a comprehension: warnings' stacklevel counts the frames to the caller
        for _, result in self._stream(items, self._encode_rows, self._stage_videos, self._run_encode):
            results.append(result)
        codes = torch.cat([c for c, _ in results])
        return codes, {"indices": tuple(i for _, i in results)}

    def decode_indices(self, indices, grids: list, token_counts: list[int] | None = None) -> list[torch.Tensor]:
        """Like ``model.decode_indices`` (either argument order): one [3, T, H, W] per clip, in input order."""
        grids, token_counts = upstream_argument_order(grids, token_counts)
        packed, counts = self.model.pack_indices(indices, token_counts)
        shapes = check_grids(grids, len(counts), self.model.config.patch_size)
        items = zip(range(len(counts)), packed.split(counts), shapes, strict=True)
        videos = []  # a loop, as in encode
        for _, video in self._stream(items, self._decode_rows, self._stage_indices, self._run_decode):
            videos.append(video)
        return videos

    def encode_stream(
        self, items: Iterable[tuple[object, torch.Tensor, int]], *, host: bool = False
    ) -> Iterator[tuple[object, tuple[torch.Tensor, torch.Tensor]]]:
        """``(key, video [3, T, H, W], n)`` items -> ``(key, (codes [n, D], indices int32 [n]))`` in input order.

        Batches are formed as items arrive, and each runs as soon as it is formed. Each clip is checked as it
        arrives; on CUDA its values are checked without a host sync (:class:`~titok_fast.checks.PendingValueCheck`),
        before its batch runs. An :data:`IDLE` item (the source has nothing ready now: a file is slow or stuck) hands
        over what has run, so the clips before it come out without waiting for more.

        ``host=True``: the results come as CPU tensors. On CUDA they are copied to the host behind their batch, and
        handed over once the next batch has been queued on the device, so the device never waits for the caller
        to take them (nor for the next batch to be gathered)."""
        patch = self.model.config.patch_size
        pending = collections.deque()  # the value checks of the items taken and not yet run, in order

        def check(key, video, n):
            name, later = _clip_named(key), self._checks_values_later(video)
            check_videos([video], patch, name, dtype=self.model.dtype, values=not later)
            pending.append(PendingValueCheck(video, name(0), self.model.dtype) if later else None)
            return key, video, check_token_counts([n], 1, name=name)[0]  # an int, as batching wants

        items = _checked(items, check, "encode_stream", "(key, video [3, T, H, W], n)")
        yield from self._stream(items, self._encode_rows, self._stage_videos, self._run_encode, pending, host)

    def _encode_rows(self, item) -> int:
        _, video, n = item
        return n + math.prod(patch_grid(tuple(video.shape[1:]), self.model.config.patch_size))

    def decode_stream(
        self, items: Iterable[tuple[object, torch.Tensor, tuple[int, int, int]]]
    ) -> Iterator[tuple[object, torch.Tensor]]:
        """``(key, indices [n], pixel shape (T, H, W))`` items -> ``(key, video [3, T, H, W])`` in input order.

        Each clip's indices are checked (an index outside the codebook would be a device-side fault); :data:`IDLE`
        as for :meth:`encode_stream`."""
        codebook, patch = self.model.config.codebook_size, self.model.config.patch_size

        def check(key, idx, shape):
            check_clip_indices(idx, codebook, f"indices of clip {key!r}")
            check_token_counts([idx.numel()], 1, name=_clip_named(key))  # at most MAX_TOKENS, as everywhere
            return key, idx, check_grids([shape], 1, patch, _clip_named(key))[0]

        items = _checked(items, check, "decode_stream", "(key, indices [n], (T, H, W))")
        yield from self._stream(items, self._decode_rows, self._stage_indices, self._run_decode)

    def _decode_rows(self, item) -> int:
        _, idx, shape = item
        return idx.numel() + math.prod(patch_grid(tuple(shape), self.model.config.patch_size))

    # ------------------------------------------------------------------------------------------- batching
    def _stream(self, items, rows_of, stage, run, pending: collections.deque | None = None, host=False) -> Iterator:
        """Batch items greedily and run each batch as soon as it is formed. ``pending``: one entry per item taken,
        its :class:`PendingValueCheck` or None (checked already); a batch runs up to its first bad item, whose error
        is raised once the clips before it are out. With ``host`` on CUDA, batch k is handed over after batch k+1
        is queued (see :meth:`encode_stream`).

        A bad item, or an error from ``items``, is raised once every item before it has been yielded; an error from
        ``items`` is never lost to a batch that fails meanwhile (it is raised instead: the items cannot go on)."""
        if self.mode != "eager":  # once per call (the model may change between calls), before the largest budget is
            with self._batch_lock:  # read: a change of backend can lower it
                self._follow_model()
        source_errors: list[Exception] = []

        def source():
            try:
                yield from items
            except Exception as e:
                source_errors.append(e)

        batches = pack_greedily(source(), rows_of, self.budgets[-1], self.max_clips, lambda _, item: item[0])
        lags = host and self._overlaps()
        bad_item = None
        ran = None  # (batch, results) run and not yet handed over
        try:
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except ValueError as e:  # a clip too large for every budget, after the batch before it
                    bad_item = e
                    break
                if batch is IDLE:  # nothing more for now: what has run is handed over
                    if ran is not None:
                        yield from self._handed_over(*ran)
                    ran = None
                    continue
                try:
                    batch, bad = _until_bad(batch, pending)
                    running = (batch, self._run_batch(batch, stage, run, host)) if batch else None
                except Exception:
                    if ran is not None:  # the batch before it is out first
                        yield from self._handed_over(*ran)
                    raise
                if ran is not None:
                    yield from self._handed_over(*ran)
                ran = running
                if ran is not None and (not lags or bad is not None):
                    yield from self._handed_over(*ran)
                    ran = None
                if bad is not None:
                    raise bad
            if ran is not None:
                yield from self._handed_over(*ran)
        except Exception:
            if source_errors:
                raise source_errors[0]  # noqa: B904 (the batch's failure stays attached as its context)
            raise
        if source_errors or bad_item is not None:
            raise source_errors[0] if source_errors else bad_item

    def _checks_values_later(self, video: torch.Tensor) -> bool:
        """Whether a stream checks a clip's values just before its batch runs rather than as it arrives: on CUDA,
        where checking at once would wait for the batches queued before it."""
        return isinstance(video, torch.Tensor) and video.device.type == "cuda"  # (check_videos refuses the rest)

    def _overlaps(self) -> bool:
        """Whether a batch runs asynchronously to the host (on CUDA), so that handing results over one batch late
        keeps the device busy."""
        return self.model.device.type == "cuda"

    def _run_batch(self, batch: list, stage, run, host: bool) -> list:
        """Stage a batch's inputs on the device and run it (queue it, on CUDA); with ``host``, its results are
        copied to the host behind it (a :class:`_HostCopy`)."""
        on_cuda = self.model.device.type == "cuda"
        stream = torch.cuda.current_stream(self.model.device) if on_cuda else None  # the batch's compute stream
        tensors, copied = stage(batch)
        if copied is not None:  # the compute stream waits for the side-stream copies, and owns their memory
            stream.wait_event(copied)
            for t in tensors:
                t.record_stream(stream)
        with self._batch_lock:  # filled, run and copied out before another thread's batch refills the buffers
            if on_cuda and self._last_batch is not None:  # queued on the device after it too (another stream)
                stream.wait_event(self._last_batch)
            try:
                results = self._run_splitting(run, batch, tensors)
                if host and self.model.device.type != "cpu":
                    results = _HostCopy(results, stream)
            finally:  # a batch that failed midway may have left work queued on the buffers: the next waits for it
                if on_cuda:
                    self._last_batch = torch.cuda.Event()
                    self._last_batch.record(stream)
        return results

    def _handed_over(self, batch: list, results) -> Iterator:
        if isinstance(results, _HostCopy):
            results = results.wait()
        yield from zip((item[0] for item in batch), results, strict=True)

    def _run_splitting(self, run, batch: list, staged: list) -> list:
        """Run a batch; on out-of-memory split it in two and retry, down to single clips. A batch is counted in
        ``modes_run`` once it has run (a split one as its halves)."""
        try:
            results = run(batch, staged)
        except RuntimeError as e:
            if not _out_of_memory(e):
                raise
            if len(batch) == 1:
                raise RuntimeError(f"out of memory on clip {batch[0][0]!r} alone; use a smaller clip") from None
            if self.model.device.type == "cuda":
                with _CAPTURE_LOCK:  # (it waits on the device, which would break another engine's capture)
                    torch.cuda.empty_cache()
            half = len(batch) // 2
            return self._run_splitting(run, batch[:half], staged[:half]) + self._run_splitting(
                run, batch[half:], staged[half:]
            )
        self.modes_run[self._planned_mode] += 1
        return results

    def _stage(self, tensors: list[torch.Tensor], dtype: torch.dtype | None) -> tuple[list[torch.Tensor], object]:
        """A batch's inputs on the model's device, in ``dtype``. On CUDA, inputs in host memory are copied from
        pinned memory on a side stream (they wait for nothing on the device, so the copies overlap the batches
        queued before; an input pinned by the caller is copied before this returns); inputs on the GPU are
        converted, if at all, and moved there from another GPU, on the caller's stream, behind the work that made
        them. Returns the tensors and the event that marks the copies done (None: no copy)."""
        device = self.model.device
        if device.type != "cuda":
            return [t.to(device=device, dtype=dtype or t.dtype) for t in tensors], None
        out = [t if t.device.type == "cpu" else t.to(device=device, dtype=dtype or t.dtype) for t in tensors]
        on_host = [i for i, t in enumerate(tensors) if t.device.type == "cpu"]
        if not on_host:
            return out, None
        side = self._copy_stream
        if side is None or side.device != device:  # made for the model's device now
            side = self._copy_stream = torch.cuda.Stream(device)
        with torch.cuda.stream(side):
            for i in on_host:
                t = tensors[i]
                # the caller's own pinned memory is read before this returns (the caller may refill it once the
                # results are out, which on CUDA can be before an asynchronous copy has run); a pinned copy of
                # ours is read later, and kept by the pinned-memory cache until then
                mine = not t.is_pinned()
                out[i] = (t.pin_memory() if mine else t).to(device=device, dtype=dtype or t.dtype, non_blocking=mine)
            copied = torch.cuda.Event()
            copied.record(side)
        return out, copied

    def _stage_videos(self, batch: list) -> tuple[list[torch.Tensor], object]:
        return self._stage([video for _, video, _ in batch], self.model.dtype)

    def _stage_indices(self, batch: list) -> tuple[list[torch.Tensor], object]:
        return self._stage([idx for _, idx, _ in batch], None)

    # ----------------------------------------------------------------------------------------------- encode
    def _run_encode(self, batch: list, videos: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Inputs were checked on entry: eager batches go straight to the packed path, no re-validation."""
        model, cfg = self.model, self.model.config
        counts = [n for _, _, n in batch]
        grids = [patch_grid(tuple(v.shape[1:]), cfg.patch_size) for v in videos]
        patches = [patchify(v, cfg.patch_size) for v in videos]
        mode, budget = self._plan(counts, grids, "encode")
        if mode == "eager":
            codes, indices = model.encode_packed(torch.cat(patches), model.packing(counts, grids))
        elif mode == "layout":
            layout = self._layout("encode", counts, grids)
            torch.cat(patches, out=layout.inputs)
            codes, indices = layout.replay()
        else:
            patches = torch.cat(patches)
            buffers = self._static_buffers("encode", budget)
            pack = self._fill_layout(buffers.batch, counts, grids)
            buffers.inputs.fill_(PADDING)  # latent and padding rows: never read into a clip (tested with NaN)
            buffers.inputs[pack.patch_rows] = patches
            codes, indices = self._replay("encode", budget, mode)
            codes, indices = codes[pack.latent_rows], indices[pack.latent_rows]
        return [(c.clone(), i.clone()) for c, i in zip(codes.split(counts), indices.split(counts), strict=True)]

    # ----------------------------------------------------------------------------------------------- decode
    def _run_decode(self, batch: list, indices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Inputs were checked on entry (decode_indices / decode_stream)."""
        model, cfg = self.model, self.model.config
        shapes = [tuple(shape) for _, _, shape in batch]
        counts = [idx.numel() for idx in indices]
        grids = [patch_grid(s, cfg.patch_size) for s in shapes]
        mode, budget = self._plan(counts, grids, "decode")
        if mode == "eager":
            pack = model.packing(counts, grids)
            return model.videos_from_rows(model.decode_packed(torch.cat(indices), pack), pack, shapes)
        if mode == "layout":
            layout = self._layout("decode", counts, grids)
            torch.cat([i.to(torch.int32) for i in indices], out=layout.inputs)
            self._decoder_table()  # refreshed in place if the weights changed since the graph was captured
            rows = layout.replay()
            return [_own(v, rows) for v in model.videos_from_rows(rows, layout.pack, shapes)]
        buffers = self._static_buffers("decode", budget)
        pack = self._fill_layout(buffers.batch, counts, grids)
        buffers.inputs.zero_()
        buffers.inputs[pack.latent_rows] = torch.cat(indices).to(buffers.inputs.dtype)
        self._decoder_table()  # refreshed in place if the weights changed since the runner was built
        patches = self._replay("decode", budget, mode)[pack.patch_rows].split([math.prod(g) for g in grids])
        return [unpatchify(p, s, cfg.patch_size).clone() for p, s in zip(patches, shapes, strict=True)]

    # ------------------------------------------------------------------------------------ fixed-shape path
    def _plan(self, counts: list[int], grids: list, stage: str) -> tuple[str, int]:
        """(mode, token budget) of a ``stage`` batch, counted in ``modes_run`` once it has run
        (:meth:`_run_splitting`): ``auto`` picks per batch (:func:`auto_mode`; a layout's graph from its second
        batch on, see the module header), the others are fixed."""
        mode, budget = self._planned(counts, grids, stage)
        self._planned_mode = mode
        return mode, budget

    def _planned(self, counts: list[int], grids: list, stage: str) -> tuple[str, int]:
        rows = sum(n + math.prod(g) for n, g in zip(counts, grids, strict=True))
        mode = auto_mode(rows, self.model.device, self.budgets, stage) if self.mode == "auto" else self.mode
        if mode == "layout":
            key = (stage, tuple(counts), tuple(grids))
            if key in self._layouts:
                return mode, 0
            again = self._seen.pop(key, None) is not None or CAPTURE_AT_FIRST_BATCH
            if again and sum(k[0] == stage for k in self._layouts) < LAYOUT_GRAPHS:
                return mode, 0
            self._seen[key] = True  # (again last: the oldest layout seen is forgotten first)
            if len(self._seen) > LAYOUTS_SEEN:
                self._seen.popitem(last=False)
            mode = padded_mode(rows, self.budgets, stage)
        if mode == "eager":
            return mode, 0
        if rows > self.budgets[-1]:
            raise ValueError(
                f"a batch of {rows} packed rows exceeds the largest budget now usable, {self.budgets[-1]}: the model's "
                "backend changed during this call"
            )
        return mode, pick_budget(rows, self.budgets)

    def _static_buffers(self, stage: str, budget: int) -> _Buffers:
        key = (stage, budget)
        if key not in self._buffers:
            with fp8.outside_inference_mode():  # refilled in place by every batch, in whatever mode it runs
                self._buffers[key] = self._new_buffers(stage, budget)
        return self._buffers[key]

    def _new_buffers(self, stage: str, budget: int) -> _Buffers:
        device, model = self.model.device, self.model
        cos, sin = model.rope_tables(budget)
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
        return _Buffers(inputs, batch)

    def _decoder_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's decoder table in buffers owned by the engine, which fixed-shape runners take as inputs and
        CUDA graphs read by address: when the model rebuilds its table (new weights), the buffers are refilled."""
        table, mask_row = self.model.decoder_table()
        if self._table is None:
            with fp8.outside_inference_mode():  # refilled in place, in whatever mode a later batch runs
                self._table = (table.clone(), mask_row.clone())
        elif self._table_source is not table:
            self._table[0].copy_(table)
            self._table[1].copy_(mask_row)
        self._table_source = table
        return self._table

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

    def _layout(self, stage: str, counts: list[int], grids: list) -> _Layout:
        """The graph of this layout, captured at its first use. It runs the model's packed path on a packing and
        RoPE tables of its own cache (nothing another call does to the model's caches frees what it reads) and,
        for decode, on the engine's copy of the code table (refilled in place when the weights change). A capture
        CUDA refuses is an error that says so (no fallback: after a failed capture PyTorch's allocator may not be
        fit to go on), naming the mode that captures nothing."""
        fp8.refresh(self.model)  # graphs read the FP8 weights by address: requantised in place if weights changed
        key = (stage, tuple(counts), tuple(grids))
        if key not in self._layouts:
            model, device, cache = self.model, self.model.device, PackingCache()
            pack = cache.packing(counts, grids, device)
            with fp8.outside_inference_mode():  # refilled in place by every batch, in whatever mode it runs
                if stage == "encode":
                    inputs = torch.zeros(pack.num_patches, model.config.patch_dim, dtype=model.dtype, device=device)
                else:
                    inputs = torch.zeros(pack.num_tokens, dtype=torch.int32, device=device)
            if stage == "encode":
                model.fsq_constants()  # made now, not during the capture

                def run():
                    return model.encode_packed(inputs, pack, cache)
            else:
                table = self._decoder_table()

                def run():
                    return model.decode_packed(inputs, pack, cache, table)

            try:
                replay = self._captured(run)
            except RuntimeError as error:
                if _out_of_memory(error):  # (the batch is split)
                    raise
                raise RuntimeError(
                    f"could not capture a CUDA graph of the layout of a batch to {stage} ({type(error).__name__}: "
                    f"{str(error)[:300]}); mode 'eager' (--mode eager) captures no graph"
                ) from error
            self._layouts[key] = _Layout(inputs, pack, cache, replay)
        return self._layouts[key]

    def _replay(self, stage: str, budget: int, mode: str):
        fp8.refresh(self.model)  # graphs read the FP8 weights by address: requantised in place if weights changed
        key = (stage, budget)
        if key not in self._runners:
            self._runners[key] = self._build_runner(stage, budget, mode)
        return self._runners[key]()

    def _build_runner(self, stage: str, budget: int, mode: str) -> Callable:
        model, buffers = self.model, self._buffers[(stage, budget)]
        if stage == "encode":
            fn, extra = model.encode_static, ()
        else:  # the decoder table is an input, so the graph holds no Python-side cache lookups
            fn, extra = model.decode_static, self._decoder_table()
        args = (buffers.inputs, buffers.batch, *extra)
        if mode == "static":
            return lambda: fn(*args)
        if mode == "compile":
            if stage == "encode":
                model.fsq_constants()  # filled now, not while tracing (a cache filled by the trace fails its guard)
            # each runner gets a code object of its own: torch.compile keys its cache, and its recompile limit, by
            # code object, and every method model.inference decorates shares one (past 8 graphs it would run uncompiled)
            own = _with_own_code(fn, f"titok_fast_{stage}_{budget}")
            compiled = torch.compile(own, backend=_counting_inductor, dynamic=False, fullgraph=True)
            engine = weakref.ref(self)  # (not self: the engine holds run, and a cycle would keep its buffers until
            # the cyclic collector runs)

            def run():
                before = _compiled_here()
                with own_dtype(model.device):  # (the autocast state is part of the graph's guards: a call under
                    out = compiled(*args)  # autocast would compile every graph again, though it computes the same)
                if (me := engine()) is not None:
                    me.compiles += _compiled_here() - before
                return out

            return run
        return self._captured(lambda: fn(*args))

    def _captured(self, fn: Callable[[], torch.Tensor | tuple]) -> Callable[[], torch.Tensor | tuple]:
        """A CUDA graph of ``fn()``'s device work, as a function that replays it and returns its outputs.

        Warmed up on a side stream (Triton autotuning, allocator, caches filled), then captured once on it. By
        hand, not with torch.cuda.graph: entering that syncs the device and empties the device and pinned-memory
        caches (a run's decoding threads would pin all theirs again), and its default stream is made on whichever
        GPU was current at the process's first capture. Every capture of an engine uses one stream, as its pool is
        shared: one no live graph was captured on (_free_capture_stream), taken anew once its graphs are dropped."""
        device = self.model.device
        with torch.cuda.device(device):
            if self._capture_stream is None:
                self._capture_stream, key = _free_capture_stream(device)
                self._stream_claim = weakref.finalize(self, _RELEASED.append, key)  # (run at most once: when the
                # engine drops its graphs, or is itself collected)
                self._graph_pool = torch.cuda.graph_pool_handle()
            stream = self._capture_stream
            key = (stream.device.index, stream.cuda_stream)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
                graph = torch.cuda.CUDAGraph()
                with _CAPTURE_LOCK:  # one capture at a time in the process
                    graph.capture_begin(pool=self._graph_pool, capture_error_mode=CAPTURE_MODE)
                    try:
                        try:
                            out = fn()
                        except BaseException as error:  # what broke the capture is the error: ending it fails too
                            with contextlib.suppress(RuntimeError):
                                graph.capture_end()
                            if isinstance(error, RuntimeError) and _out_of_memory(error):  # not split and retried
                                # (as in the warm-ups): the allocator is not fit to go on after a failed capture
                                raise RuntimeError(
                                    f"out of memory while capturing a CUDA graph ({type(error).__name__})"
                                ) from error
                            raise
                        graph.capture_end()
                    except BaseException:  # a graph whose capture may have ended (then failed to instantiate):
                        # dropping it would free the stream's cuBLAS workspace under the engine's other graphs; it
                        # goes when they do
                        self._failed_graphs.append(_Replay(graph, None, key))
                        raise
                    finally:  # (the warm-ups' work comes first, whatever happens)
                        torch.cuda.current_stream(device).wait_stream(stream)
        self.compiles += 1
        return _Replay(graph, out, key)


def _own(tensor: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy of it where it views ``source``'s memory (a graph's output, rewritten by its next
    replay)."""
    return tensor.clone() if tensor.untyped_storage().data_ptr() == source.untyped_storage().data_ptr() else tensor


def _out_of_memory(error: RuntimeError) -> bool:
    """A device's out-of-memory error (``torch.OutOfMemoryError``), or the CPU allocator's, which is a plain
    RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(error)


# .count: the graphs _counting_inductor compiled in this thread. torch.compile compiles on the calling thread, so an
# engine counts its own graphs, not those another thread's engine compiled meanwhile.
_GRAPHS_COMPILED = threading.local()

_CAPTURE_LOCK = threading.Lock()  # held while any engine captures a CUDA graph: one capture at a time

# Live graphs by (device index, raw stream) they were captured on. PyTorch (since its PR 175276, 2026) frees the
# cuBLAS workspace of a graph's capture stream when the graph is destroyed, while other live graphs captured on that
# stream still use it (their GEMMs then write into freed memory, pytorch/pytorch#193402); and torch.cuda.Stream()
# hands out its streams round robin from a pool of POOLED_STREAMS, so two engines can get the same one. An engine
# therefore captures on a stream no live graph of any engine was captured on, and drops all its graphs at once.
# A stream counts from when an engine draws it until the engine lets it go, and each graph captured on it until the
# graph has been reset. Releases only append to _RELEASED (finalizers may run in the middle of anything, a section
# holding _LIVE_LOCK included); the counts take them in under the lock (_live_graphs).
_LIVE_GRAPHS: collections.Counter = collections.Counter()
_RELEASED: collections.deque = collections.deque()
_LIVE_LOCK = threading.Lock()
POOLED_STREAMS = 32  # PyTorch's streams a device and priority (kStreamsPerPool)


def _live_graphs() -> collections.Counter:
    """_LIVE_GRAPHS with the releases since taken in (call with _LIVE_LOCK held)."""
    while _RELEASED:
        key = _RELEASED.popleft()
        _LIVE_GRAPHS[key] -= 1
        if _LIVE_GRAPHS[key] <= 0:
            del _LIVE_GRAPHS[key]
    return _LIVE_GRAPHS


def _free_capture_stream(device: torch.device) -> tuple[torch.cuda.Stream, tuple[int, int]]:
    """A stream of PyTorch's pool on ``device`` that no engine holds and no live graph was captured on (if all are
    taken, by more engines with graphs than the pool has streams, the last drawn), counted as held; and its key.
    The caller lets it go by appending the key to _RELEASED."""
    for _ in range(POOLED_STREAMS):
        stream = torch.cuda.Stream(device)
        key = (stream.device.index, stream.cuda_stream)
        with _LIVE_LOCK:
            if not _live_graphs()[key]:
                break
    with _LIVE_LOCK:
        _live_graphs()[key] += 1
    return stream, key


class _Replay:
    """A captured graph as a function that replays it and returns its outputs (they live in the engine's pool:
    callers copy what they keep before the next replay). Counted in _LIVE_GRAPHS, under ``key`` (its capture
    stream), until it is dropped; then its graph is reset (its memory and its stream's cuBLAS workspace freed)
    before it stops counting, so no later capture takes the stream while this graph holds that workspace."""

    def __init__(self, graph, out, key: tuple[int, int]):
        self.graph, self.out = graph, out
        with _LIVE_LOCK:
            _live_graphs()[key] += 1
        weakref.finalize(self, _release_graph, graph, key).atexit = False  # (at exit PyTorch destroys it as ever)

    def __call__(self):
        self.graph.replay()
        return self.out


def _release_graph(graph, key: tuple[int, int]) -> None:
    try:
        graph.reset()
    finally:
        _RELEASED.append(key)


def _counting_inductor(gm, example_inputs):
    """Inductor, counting compilations; one function for every engine (a backend that differs per engine would
    itself force recompiles)."""
    from torch._inductor.compile_fx import compile_fx

    _GRAPHS_COMPILED.count = _compiled_here() + 1
    return compile_fx(gm, example_inputs)


def _compiled_here() -> int:
    return getattr(_GRAPHS_COMPILED, "count", 0)


def _with_own_code(fn: Callable, name: str) -> Callable:
    """A function that calls ``fn``, with a new code object named ``name`` and globals of its own: torch.compile
    keeps each graph it makes for a function (``__compiled_fn_*``) in that function's globals, which would be
    this module's, kept for ever: freed here with the function (the runner, its engine)."""

    def call(*args):
        return fn(*args)

    code = call.__code__.replace(co_name=name)
    return types.FunctionType(code, {"__builtins__": builtins}, name, None, call.__closure__)
