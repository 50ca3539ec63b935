"""The engine against the model, clip by clip, in every mode the machine can run."""

import collections
import contextlib
import gc
import random
import threading
import types
import weakref

import pytest
import torch
from torch import nn

from titok_fast import engine as engine_module
from titok_fast.engine import (
    AUTO_GRAPH_MAX_ROWS,
    IDLE,
    Engine,
    auto_mode,
    pack_greedily,
    padded_mode,
    pick_budget,
    plan_batches,
)
from titok_fast.kernels.mrope_attention import mrope_tables
from titok_fast.packing import PackingCache, make_packing, pair_positions

from graph_capture import CaptureError, FakeCUDAGraph, emulated_cuda_graphs, engine_for
from helpers import in_threads, make_model, random_videos, rel_l2

SHAPES = [(4, 16, 16), (8, 32, 24), (4, 8, 8), (12, 16, 32), (4, 24, 24), (8, 16, 16), (4, 8, 16)]
COUNTS = [5, 16, 1, 30, 9, 12, 3]


@pytest.fixture(scope="module")
def model():
    return make_model("tiny")


@pytest.fixture(scope="module")
def expected(model):
    videos = random_videos(SHAPES)
    codes, out = model.encode(videos, COUNTS)
    return videos, codes, out["indices"], model.decode_indices(out["indices"], SHAPES)


@pytest.fixture(scope="module")
def compiled(model):
    """One compile-mode engine for the tests that run inductor for real: its graphs (a CPU compile takes tens of
    seconds cold) are made once. Budgets of many engines: test_compile_mode_compiles_every_runner_of_many_engines."""
    return Engine(model, mode="compile", budgets=(512,), max_clips=3)


def shuffled(seed: int = 0) -> list[int]:
    order = list(range(len(SHAPES)))
    random.Random(seed).shuffle(order)
    return order


def test_plan_keeps_every_clip_once_in_order_within_budget():
    rng = random.Random(1)
    rows = [rng.randint(2, 900) for _ in range(200)]
    batches = plan_batches(rows, budgets=(512, 1024), max_clips=7)
    assert [i for b in batches for i in b] == list(range(200))
    assert all(sum(rows[i] for i in b) <= 1024 and len(b) <= 7 for b in batches)
    for a, b in zip(batches, batches[1:], strict=False):  # greedy: the next clip did not fit (or the batch was full)
        assert sum(rows[i] for i in a) + rows[b[0]] > 1024 or len(a) == 7
    assert pick_budget(600, (512, 1024, 2048)) == 1024
    assert pick_budget(512, (512, 1024, 2048)) == 512 and pick_budget(2048, (512, 1024, 2048)) == 2048  # filled
    with pytest.raises(
        ValueError, match=r"clip 1 needs 2000 packed rows \(tokens \+ patches\); the largest budget is 1024"
    ):
        plan_batches([10, 2000], budgets=(1024,), max_clips=4)


def test_max_clips_is_at_most_the_largest_budgets_rows(model):
    """A batch holds at most one clip per row: a larger max_clips (``--batch-size 10**9``) would size the
    fixed-shape modes' sequence buffers and attention grids by it, and change no batch."""
    assert Engine(model, mode="eager", budgets=(256, 512), max_clips=10**9).max_clips == 512
    assert Engine(model, mode="eager", budgets=(256, 512), max_clips=5).max_clips == 5


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_engine_equals_model_clip_by_clip(model, expected, mode, request):
    videos, codes, indices, recon = expected
    if mode == "compile":
        engine = request.getfixturevalue("compiled")
    else:
        engine = Engine(model, mode="eager", budgets=(512,), max_clips=3)
    order = shuffled()
    got_codes, got = engine.encode([videos[i] for i in order], [COUNTS[i] for i in order])
    for pos, i in enumerate(order):
        assert torch.equal(got["indices"][pos], indices[i]), f"clip {i}"
    starts = [sum(COUNTS[:i]) for i in range(len(COUNTS))]
    assert torch.equal(got_codes, torch.cat([codes[starts[i] : starts[i] + COUNTS[i]] for i in order]))
    got_recon = engine.decode_indices([indices[i] for i in order], [SHAPES[i] for i in order])
    for pos, i in enumerate(order):
        assert got_recon[pos].shape == recon[i].shape
        assert rel_l2(got_recon[pos], recon[i]) <= 1e-5, f"clip {i}"
    if mode == "compile":  # one graph per (stage, budget) seen, whatever the batch contents
        graphs = engine.compiles
        engine.encode([videos[i] for i in order[::-1]], [COUNTS[i] for i in order[::-1]])
        engine.decode_indices([indices[i] for i in order[::-1]], [SHAPES[i] for i in order[::-1]])
        assert engine.compiles == graphs == 2


def test_counts_and_grids_as_tensors_are_taken_by_the_streams_and_in_decode_order(model, expected):
    videos, _, indices, recon = expected
    engine = Engine(model, mode="eager", budgets=(512,))
    encoded = dict(engine.encode_stream((i, videos[i], torch.tensor([COUNTS[i]])) for i in range(2)))
    assert all(torch.equal(encoded[i][1], indices[i]) for i in range(2))
    decoded = dict(engine.decode_stream((i, indices[i], torch.tensor(SHAPES[i])) for i in range(2)))
    assert all(rel_l2(decoded[i], recon[i]) <= 1e-5 for i in range(2))
    packed = torch.cat(list(indices[:2]))  # decode_indices(packed, counts, grids), decode's order
    for counts in (COUNTS[:2], torch.tensor(COUNTS[:2])):
        out = model.decode_indices(packed, counts, SHAPES[:2])
        assert all(rel_l2(out[i], recon[i]) <= 1e-5 for i in range(2))


def test_padding_never_changes_a_clip(compiled, expected):
    videos, _, indices, recon = expected
    for i in (2, 3):  # alone in a 512-row buffer, mostly padding
        _, out = compiled.encode([videos[i]], [COUNTS[i]])
        assert torch.equal(out["indices"][0], indices[i])
        assert rel_l2(compiled.decode_indices([indices[i]], [SHAPES[i]])[0], recon[i]) <= 1e-5


def test_stream_yields_keys_in_input_order(model, expected):
    videos, _, indices, _ = expected
    engine = Engine(model, budgets=(128, 256), max_clips=2)
    items = [(f"clip-{i}", videos[i], COUNTS[i]) for i in range(len(SHAPES))]
    results = list(engine.encode_stream(iter(items)))
    assert [k for k, _ in results] == [k for k, _, _ in items]
    assert all(torch.equal(idx, indices[i]) for i, (_, (_, idx)) in enumerate(results))


def test_an_idle_item_runs_what_is_pending_before_the_source_is_asked_again(model, expected):
    """IDLE (the source has nothing ready: a file is slow or stuck) runs the batches held, so the clips before it
    come out before the source is asked for more; the results are those of a stream without it."""
    videos, _, indices, recon = expected
    engine = Engine(model, budgets=(4096,), max_clips=8)  # all 7 clips would fit one batch
    received, seen_by_source = [], []

    def items():
        for i in range(len(SHAPES)):
            if i in (3, 5):
                yield IDLE
                seen_by_source.append(len(received))  # what had come out when the source went on
            yield i, videos[i], COUNTS[i]

    for key, (_, idx) in engine.encode_stream(items()):
        received.append(key)
        assert torch.equal(idx, indices[key])
    assert received == list(range(len(SHAPES))) and seen_by_source == [3, 5]
    decoded = list(engine.decode_stream([IDLE, (0, indices[0], SHAPES[0]), IDLE, IDLE, (1, indices[1], SHAPES[1])]))
    assert [k for k, _ in decoded] == [0, 1] and rel_l2(decoded[1][1], recon[1]) <= 1e-5
    assert list(pack_greedily([IDLE, 1, 2, IDLE, 3], lambda r: r, largest=10, max_clips=5)) == [
        IDLE, [1, 2], IDLE, [3]
    ]  # fmt: skip


def test_out_of_memory_splits_the_batch_and_loses_nothing(model, expected, monkeypatch):
    videos, _, indices, _ = expected
    engine = Engine(model, budgets=(1024,), max_clips=8)
    real_encode, calls = model.encode_packed, []

    def encode_with_small_memory(patches, pack):
        calls.append(len(pack.token_counts))
        if len(pack.token_counts) > 2:
            raise torch.OutOfMemoryError("simulated")
        return real_encode(patches, pack)

    monkeypatch.setattr(model, "encode_packed", encode_with_small_memory)
    _, out = engine.encode(videos, COUNTS)
    assert all(torch.equal(a, b) for a, b in zip(out["indices"], indices, strict=True))
    assert max(calls) > 2 and calls.count(1) + calls.count(2) >= 4

    monkeypatch.setattr(model, "encode_packed", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(RuntimeError, match="out of memory on clip 0 alone"):
        engine.encode(videos[:1], COUNTS[:1])


def test_graphs_captured_while_an_out_of_memory_batch_is_split_replay(model, expected, monkeypatch):
    """The halves of a batch that ran out of memory run (and capture their graphs) while that error is handled."""
    videos, _, indices, _ = expected
    engine = engine_for(model, "cudagraph", monkeypatch, budgets=(512,), max_clips=4)
    run = engine._run_encode

    def small_memory(batch, staged):
        if len(batch) > 1:
            raise torch.OutOfMemoryError("simulated")  # before any graph is captured
        return run(batch, staged)

    monkeypatch.setattr(engine, "_run_encode", small_memory)
    _, out = engine.encode(videos[:4], COUNTS[:4])
    assert all(torch.equal(a, b) for a, b in zip(out["indices"], indices[:4], strict=True))
    assert engine.compiles == 1


def test_the_cpu_allocators_out_of_memory_error_splits_the_batch_too(model, expected, monkeypatch):
    """On the CPU, running out of memory is a plain RuntimeError from the allocator, not torch.OutOfMemoryError;
    any other RuntimeError is not split."""
    videos, _, indices, _ = expected
    engine = Engine(model, budgets=(1024,), max_clips=8)
    real_encode = model.encode_packed
    message = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to"

    def encode_with_small_memory(patches, pack):
        if len(pack.token_counts) > 2:
            raise RuntimeError(f"{message} allocate 1234567890 bytes. Error code 12 (Cannot allocate memory)")
        return real_encode(patches, pack)

    monkeypatch.setattr(model, "encode_packed", encode_with_small_memory)
    _, out = engine.encode(videos, COUNTS)
    assert all(torch.equal(a, b) for a, b in zip(out["indices"], indices, strict=True))
    monkeypatch.setattr(model, "encode_packed", lambda *a: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="^something else$"):
        engine.encode(videos, COUNTS)


def test_a_bad_clip_in_a_stream_is_raised_after_every_clip_before_it(model, expected):
    """A stream is checked clip by clip as it is read: the clips before a bad one (here in two batches, the second
    not yet full) still come back, then its error; likewise for a clip too large for every budget."""
    videos, _, indices, _ = expected
    engine = Engine(model, budgets=(512,), max_clips=2)
    good = [(i, videos[i], COUNTS[i]) for i in range(3)]
    for bad, error in (
        (("bad", torch.zeros(3, 5, 8, 8), 1), r"^clip 'bad' has shape \[3, 5, 8, 8\]"),
        (("big", torch.zeros(3, 4, 256, 128), 1), r"^clip 'big' needs 513 packed rows"),
    ):
        got = []
        with pytest.raises(ValueError, match=error):
            for key, (_, idx) in engine.encode_stream([*good, bad, (9, videos[0], COUNTS[0])]):
                got.append((key, idx))
        assert [key for key, _ in got] == [0, 1, 2]
        assert all(torch.equal(idx, indices[key]) for key, idx in got)


def order_as_on_cuda(monkeypatch):
    """A stream ordered as on CUDA, on the CPU: each clip's values are checked just before its batch runs, and
    with ``host=True`` a batch is handed over once the next one has run."""
    monkeypatch.setattr(Engine, "_checks_values_later", lambda self, video: True)
    monkeypatch.setattr(Engine, "_overlaps", lambda self: True)


def test_with_host_a_batch_is_handed_over_once_the_next_has_run(model, expected, monkeypatch):
    """``host=True`` on CUDA: batch k+1 is queued before batch k's results are handed over (the device never
    waits for the caller), and IDLE still hands over everything that has run before the source is asked again.
    Without ``host``, each batch is handed over as soon as it has run. The results are those of the model."""
    order_as_on_cuda(monkeypatch)
    videos, codes, indices, _ = expected
    starts = [sum(COUNTS[:i]) for i in range(len(COUNTS))]
    real_encode, events = model.encode_packed, []

    def encode(patches, pack):
        events.append(f"run {len(pack.token_counts)}")
        return real_encode(patches, pack)

    def items(idle_after=None):
        for i in range(5):
            yield i, videos[i], COUNTS[i]
            if i == idle_after:
                yield IDLE
                events.append("source asked again")

    monkeypatch.setattr(model, "encode_packed", encode)
    engine = Engine(model, budgets=(512,), max_clips=2)
    for host, idle_after, order in (
        (True, None, ["run 2", "run 2", 0, 1, "run 1", 2, 3, 4]),
        (False, None, ["run 2", 0, 1, "run 2", 2, 3, "run 1", 4]),
        (True, 2, ["run 2", "run 1", 0, 1, 2, "source asked again", "run 2", 3, 4]),
    ):
        events.clear()
        for key, (got_codes, got_indices) in engine.encode_stream(items(idle_after), host=host):
            events.append(key)
            assert got_indices.device.type == "cpu" and torch.equal(got_indices, indices[key])
            assert torch.equal(got_codes, codes[starts[key] : starts[key] + COUNTS[key]])
        assert events == order, (host, idle_after)


@pytest.mark.parametrize("later", [False, True])
def test_a_clip_with_bad_values_fails_after_every_clip_before_it(model, expected, monkeypatch, later):
    """Values are checked as a clip arrives, or (on CUDA) just before its batch runs: either way the clips before
    a bad one come back, in a batch cut short before it, then its error, the same words; through the pipeline's
    ``encode_resiliently`` it fails alone and the stream goes on."""
    from titok_fast.pipeline import encode_resiliently

    if later:
        order_as_on_cuda(monkeypatch)
    videos, _, indices, _ = expected
    engine = Engine(model, budgets=(512,), max_clips=2)
    good = [(i, videos[i], COUNTS[i]) for i in range(5)]
    for position, nan in ((3, float("nan")), (2, float("inf"))):  # last in its batch, first in its batch
        bad = ("bad", torch.full((3, 4, 8, 8), nan), 1)
        items = [*good[:position], bad, *good[position:]]
        for host in (False, True):
            got = []
            with pytest.raises(ValueError, match=r"^clip 'bad' contains NaN or infinite values$"):
                for key, (_, idx) in engine.encode_stream(items, host=host):
                    got.append(key)
                    assert torch.equal(idx.cpu(), indices[key])
            assert got == list(range(position)), (position, host)
            errors = {}
            out = dict(encode_resiliently(engine, items, errors.__setitem__, host=host))
            assert sorted(out) == list(range(5)) and list(errors) == ["bad"]
            assert all(torch.equal(idx, indices[key]) for key, (_, idx) in out.items())


def test_a_value_checked_late_is_held_to_a_float16_models_range(monkeypatch):
    """Checked just before its batch runs (as on CUDA), a clip's values are held to a float16 model's range
    (65.504), as when they are checked at once: beyond it the patch embedding overflows and the tokens are NaN."""
    order_as_on_cuda(monkeypatch)
    engine = Engine(make_model("tiny").to(torch.float16), budgets=(512,), max_clips=2)
    bad = ("bad", torch.full((3, 4, 8, 8), 100.0, dtype=torch.float16), 1)
    with pytest.raises(ValueError, match=r"^clip 'bad' holds 100; .*beyond 65.504 they are refused in torch.float16"):
        list(engine.encode_stream([bad]))


def test_host_copy_gives_each_result_back_unchanged_and_apart():
    from titok_fast.engine import _HostCopy

    int32 = torch.int32
    results = [(torch.randn(3, 6), torch.arange(3, dtype=int32)), (torch.randn(1, 6), torch.tensor([7], dtype=int32))]
    back = _HostCopy(results, stream=None).wait()
    assert len(back) == 2
    for (a, b), (c, d) in zip(results, back, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d) and (a.dtype, b.dtype) == (c.dtype, d.dtype)
    back[0][0].zero_()  # each its own tensor
    assert back[1][0].abs().sum() > 0 and results[0][0].abs().sum() > 0


def test_a_full_group_goes_out_before_the_next_item_is_asked_for():
    asked = []

    def items():
        for rows in (3, 3, 4, 2, 1):
            asked.append(rows)
            yield rows

    groups = pack_greedily(items(), lambda r: r, largest=10, max_clips=2)
    assert next(groups) == [3, 3] and asked == [3, 3]  # max_clips reached
    assert next(groups) == [4, 2] and asked == [3, 3, 4, 2]
    assert list(pack_greedily(iter([4, 6, 1]), lambda r: r, largest=10, max_clips=5)) == [[4, 6], [1]]  # rows full


def test_engine_rejects_bad_settings_and_clips(model):
    with pytest.raises(ValueError, match="mode 'fast' is not one of"):
        Engine(model, mode="fast")
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        Engine(model, mode="cudagraph")
    with pytest.raises(ValueError, match="budgets must be integers"):
        Engine(model, budgets=())
    for bad in (4096, "4096"):
        with pytest.raises(TypeError, match="budgets must be a sequence of integers >= 2"):
            Engine(model, budgets=bad)
    assert Engine(model, budgets=iter([512, 128])).budgets == (128, 512)  # an iterator is read once
    engine = Engine(model, budgets=(64,))
    video = torch.zeros(3, 4, 8, 8)
    for item, what in ((("a", video), "has 2 fields"), (video, "is a Tensor"), (None, "is a NoneType")):
        with pytest.raises(TypeError, match=rf"^an item of encode_stream {what}; expected a tuple \(key, video"):
            list(engine.encode_stream([item]))
        with pytest.raises(TypeError, match=rf"^an item of decode_stream {what}; expected a tuple \(key, indices"):
            list(engine.decode_stream([item]))
    with pytest.raises(TypeError, match=r"^clip 'l' is a list; expected a torch.Tensor \[3, T, H, W\]"):
        list(engine.encode_stream([("l", [0.0] * 3, 1)]))
    with pytest.raises(TypeError, match=r"^clip 's' has layout torch.sparse_coo; expected a dense tensor"):
        list(engine.encode_stream([("s", video.to_sparse(), 1)]))
    with pytest.raises(TypeError, match=r"^encode_stream takes an iterable of items \(key, video \[3, T, H, W\], n\); "
                       "got int$"):  # fmt: skip
        list(engine.encode_stream(5))
    with pytest.raises(ValueError, match=r"clip 0 needs 72 packed rows .*; the largest budget is 64"):
        engine.encode(random_videos([(4, 32, 16)]), [64])
    with pytest.raises(ValueError, match="video 0 has shape"):
        engine.encode([torch.zeros(3, 5, 8, 8)], [1])
    with pytest.raises(ValueError, match=r"clip 'big' needs 72 packed rows"):
        list(engine.encode_stream([("small", torch.zeros(3, 4, 8, 8), 1), ("big", torch.zeros(3, 4, 32, 16), 64)]))
    with pytest.raises(ValueError, match=r"^clip 'b' has shape \[3, 5, 8, 8\]"):
        list(engine.encode_stream([("a", torch.zeros(3, 4, 8, 8), 1), ("b", torch.zeros(3, 5, 8, 8), 1)]))
    with pytest.raises(ValueError, match=r"^token count of clip 'c' is 0"):
        list(engine.encode_stream([("c", torch.zeros(3, 4, 8, 8), 0)]))
    with pytest.raises(ValueError, match=r"^clip 'o' holds 1e[+]300, beyond the model's torch.float32"):
        list(engine.encode_stream([("o", torch.full((3, 4, 8, 8), 1e300, dtype=torch.float64), 1)]))
    with pytest.raises(ValueError, match=r"^video 0 holds 1e[+]300, beyond the model's torch.float32"):
        engine.encode([torch.full((3, 4, 8, 8), 1e300, dtype=torch.float64)], [1])
    with pytest.raises(ValueError, match="indices of clip 'x' holds index 4375"):
        list(engine.decode_stream([("x", torch.tensor([4375]), (4, 8, 8))]))
    with pytest.raises(ValueError, match="indices of clip 'e' is empty; expected at least one token"):
        list(engine.decode_stream([("e", torch.zeros(0, dtype=torch.long), (4, 8, 8))]))
    with pytest.raises(ValueError, match=r"^grid of clip 'g' is \[4, 8, 9\]"):
        list(engine.decode_stream([("g", torch.tensor([1]), (4, 8, 9))]))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"max_clips must be an integer >= 1, got {bad}"):
            Engine(model, max_clips=bad)
    numpy = pytest.importorskip("numpy")  # (NumPy integers are integers)
    taken = Engine(model, max_clips=numpy.int64(3), budgets=numpy.array([4096, 8192]))
    assert (taken.max_clips, taken.budgets) == (3, (4096, 8192)) and type(taken.max_clips) is int
    with pytest.warns(UserWarning, match="budgets above 16384 rows are dropped"):
        assert Engine(model, mode="static").budgets == (4096, 8192, 16384)


def test_graph_emulation_freezes_python_values_and_refuses_syncs(monkeypatch):
    """The CPU stand-in for CUDA graphs behaves as capture does: replay re-runs the recorded device work on new
    buffer contents, Python-side values stay as they were at capture, and a host sync cannot be captured."""
    emulated_cuda_graphs(monkeypatch)
    x, settings = torch.zeros(4), {"scale": 2.0}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x * settings["scale"] + 1
        first_half = y[: x.shape[0] // 2].sum()
    x.copy_(torch.arange(4.0))
    settings["scale"] = 5.0  # read at capture: the replay keeps 2.0
    graph.replay()
    assert torch.equal(y, torch.tensor([1.0, 3.0, 5.0, 7.0])) and first_half.item() == 4.0
    for sync in (lambda: x.sum().item(), lambda: x[x > 1], lambda: x.nonzero(), lambda: bool(x.any())):
        with pytest.raises(CaptureError, match="capturing"), torch.cuda.graph(FakeCUDAGraph()):
            sync()
    flags, rows, values = torch.zeros(4, dtype=torch.bool), torch.tensor([1, 3]), torch.tensor([True, True])
    with torch.cuda.graph(FakeCUDAGraph()):  # boolean values at integer positions: no sync, capturable
        flags.index_put_((rows,), values)
    assert flags.tolist() == [False, True, False, True]


def test_cudagraph_mode_on_emulated_graphs_equals_model(model, expected, monkeypatch):
    """The engine's cudagraph path itself (warm-up, capture in a shared pool, replay, copying outputs out before
    the next replay), on the CPU stand-in: one graph per (stage, budget), replayed with new contents."""
    videos, _, indices, recon = expected
    engine = engine_for(model, "cudagraph", monkeypatch, budgets=(32, 512), max_clips=3)
    for order in (shuffled(0), shuffled(1), [2]):  # [2] alone: 2 rows, the 32 budget
        _, got = engine.encode([videos[i] for i in order], [COUNTS[i] for i in order])
        assert all(torch.equal(got["indices"][p], indices[i]) for p, i in enumerate(order))
        out = engine.decode_indices([indices[i] for i in order], [SHAPES[i] for i in order])
        assert all(rel_l2(out[p], recon[i]) <= 1e-5 for p, i in enumerate(order))
    assert engine.compiles == 4 and len(engine._runners) == 4


def test_graphs_are_captured_in_thread_local_mode(model, expected, monkeypatch):
    """While the run's thread captures a graph, its decoding threads go on pinning memory (and NVDEC's run work on
    their own streams): a capture in CUDA's global mode would refuse those calls, and fail."""
    videos, _, indices, _ = expected
    engine = engine_for(model, "cudagraph", monkeypatch, budgets=(512,), max_clips=4)
    graphs = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: graphs.append(FakeCUDAGraph()) or graphs[-1])
    _, got = engine.encode(videos[:2], COUNTS[:2])
    assert all(torch.equal(got["indices"][i], indices[i]) for i in range(2))
    assert [graph.capture_error_mode for graph in graphs] == ["thread_local"]


@pytest.mark.gpu
def test_a_graph_is_captured_while_another_thread_pins_memory():
    """What the run's decoding threads do on CUDA while the engine captures its first graphs."""
    model = make_model("tiny").cuda()
    videos = [v.cuda() for v in random_videos(SHAPES)]
    _, out = model.encode(videos, COUNTS)
    stop, errors = threading.Event(), []

    def pin():  # as a decoding thread and the preprocessor do: pinned blocks that copies used, their events queried
        try:
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                while not stop.is_set():
                    torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True).fill_(1).to("cuda", non_blocking=True)
        except Exception as e:
            errors.append(e)

    pinning = threading.Thread(target=pin)
    pinning.start()
    try:
        engine = Engine(model, mode="cudagraph", budgets=(256, 512), max_clips=3)
        for order in (shuffled(0), shuffled(1)):
            _, got = engine.encode([videos[i] for i in order], [COUNTS[i] for i in order])
            assert all(torch.equal(got["indices"][p], out["indices"][i]) for p, i in enumerate(order))
    finally:
        stop.set()
        pinning.join()
    assert not errors and engine.compiles >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eager", "cudagraph", "layout"])
def test_cuda_engine_equals_model(mode, monkeypatch):
    model = make_model("tiny").cuda()
    videos = [v.cuda() for v in random_videos(SHAPES)]
    _, out = model.encode(videos, COUNTS)
    recon = model.decode_indices(out["indices"], SHAPES)
    engine = engine_for(model, mode, monkeypatch, budgets=(256, 512), max_clips=3)
    for order in (shuffled(0), shuffled(1)):  # the second pass replays graphs with new contents
        _, got = engine.encode([videos[i] for i in order], [COUNTS[i] for i in order])
        assert all(torch.equal(got["indices"][p], out["indices"][i]) for p, i in enumerate(order))
        got_recon = engine.decode_indices([out["indices"][i] for i in order], [SHAPES[i] for i in order])
        assert all(rel_l2(got_recon[p], recon[i]) <= 1e-4 for p, i in enumerate(order))
    if mode == "cudagraph":
        assert engine.compiles <= 4


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", ["cudagraph", "layout"])
def test_autocast_around_an_engine_that_captures_graphs_changes_nothing(mode, device, monkeypatch):
    """A generative model's training step runs under autocast: the engine's batches, and the graphs captured
    there, compute in the model's dtype, and their tokens and pixels are those outside it, bit for bit (on a CPU
    through the graph stand-ins, on a GPU with real graphs). The comparison is another engine's, whose graphs were
    captured outside autocast: the same engine's replays would repeat whatever its capture under autocast did."""
    model = make_model("tiny").to(device)
    videos = [v.to(device) for v in random_videos(SHAPES)]
    engine = engine_for(model, mode, monkeypatch, budgets=(256, 512), max_clips=3)
    with torch.autocast(device, dtype=torch.bfloat16):
        codes, got = engine.encode(videos, COUNTS)  # (graphs captured here, under autocast)
        recon = engine.decode_indices(got["indices"], SHAPES)
    fresh = engine_for(model, mode, monkeypatch, budgets=(256, 512), max_clips=3)
    want_codes, want = fresh.encode(videos, COUNTS)
    assert codes.dtype == torch.float32 and torch.equal(codes, want_codes)
    assert all(map(torch.equal, got["indices"], want["indices"]))
    assert all(map(torch.equal, recon, fresh.decode_indices(want["indices"], SHAPES)))


class _Graph:
    """A captured graph's stand-in: records when it is reset, and what _LIVE_GRAPHS said of its stream then."""

    def __init__(self, key, log):
        self.key, self.log = key, log

    def replay(self):
        pass

    def reset(self):
        self.log.append(("reset", self.key, engine_module._LIVE_GRAPHS[self.key]))


def test_an_engine_captures_on_a_stream_no_live_graph_was_captured_on(monkeypatch):
    """A graph's destruction frees its capture stream's cuBLAS workspace while other live graphs captured there
    still use it (PyTorch since PR 175276), and PyTorch's streams come round robin from a pool: an engine takes a
    pooled stream that no live graph was captured on; a graph counts as live until it has been reset."""
    drawn = []
    pool = [types.SimpleNamespace(device=types.SimpleNamespace(index=0), cuda_stream=1 + k % 32) for k in range(100)]
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: drawn.append(len(drawn)) or pool[drawn[-1]])
    monkeypatch.setattr(engine_module, "_LIVE_GRAPHS", collections.Counter())
    monkeypatch.setattr(engine_module, "_RELEASED", collections.deque())
    log = []
    held = [engine_module._Replay(_Graph((0, k), log), None, (0, k)) for k in (1, 2, 4)]

    def draw() -> int:
        stream, key = engine_module._free_capture_stream("cuda")
        assert key == (0, stream.cuda_stream)
        return stream.cuda_stream

    assert draw() == 3  # (drawn 1, 2, 3), and held from now on
    assert draw() == 5  # (4, then 5)
    del held[0]
    gc.collect()
    assert log == [("reset", (0, 1), 1)]  # reset while still counted
    assert (0, 1) not in engine_module._live_graphs()
    assert [draw(), draw()] == [6, 7]
    engine_module._RELEASED.append((0, 3))  # an engine lets stream 3 go
    assert [draw() for _ in range(25)] == [8, *range(9, 33)][:25] and draw() == 1 and draw() == 3  # (1 and 3 free)
    engine_module._LIVE_GRAPHS.update({(0, k): 1 for k in range(1, 33)})  # every pooled stream taken (more
    before = len(drawn)  # engines than streams): the last of 32 drawn
    assert engine_module._free_capture_stream("cuda")[0] is pool[drawn[-1]] and len(drawn) == before + 32


def test_an_engine_that_drops_its_graphs_takes_another_stream_for_the_next(monkeypatch, expected):
    """When the model changes so that an engine drops its graphs, it also lets its capture stream go: another
    engine may have captured on that stream since (its graphs hold the stream's workspace)."""
    videos, _, _, _ = expected
    model = make_model("tiny")
    engine = engine_for(model, "layout", monkeypatch, budgets=(128,), max_clips=4)
    engine.encode(videos[:2], COUNTS[:2])
    first = engine._capture_stream
    assert first is not None and engine_module._live_graphs()[(None, first.cuda_stream)] == 2  # held, one graph
    model.load_state_dict({k: v.clone() for k, v in make_model("tiny", seed=1).state_dict().items()}, assign=True)
    engine.encode(videos[:2], COUNTS[:2])
    gc.collect()
    assert engine._capture_stream is not first and (None, first.cuda_stream) not in engine_module._live_graphs()
    assert engine_module._live_graphs()[(None, engine._capture_stream.cuda_stream)] == 2
    second = engine._capture_stream.cuda_stream
    del engine
    gc.collect()
    assert (None, second) not in engine_module._live_graphs()  # an engine collected lets its stream go


def test_a_graph_that_failed_to_instantiate_goes_with_the_engines_others(monkeypatch, expected):
    """A capture that ended and then failed (cudaGraphInstantiate) leaves a graph whose reset would free the capture
    stream's cuBLAS workspace under the engine's other graphs: it is kept until the engine drops them all."""
    videos, _, _, _ = expected
    model = make_model("tiny")
    engine = engine_for(model, "layout", monkeypatch, budgets=(128,), max_clips=4)
    engine.encode(videos[:2], COUNTS[:2])  # one graph
    gc.collect()  # (earlier tests' engines, left in cycles, reset their graphs now, not into `resets`)
    resets, end = [], FakeCUDAGraph.capture_end
    monkeypatch.setattr(FakeCUDAGraph, "reset", lambda self: resets.append(self))

    def ended_then_failed(self):
        end(self)
        raise RuntimeError("CUDA error: invalid argument (cudaGraphInstantiate)")

    monkeypatch.setattr(FakeCUDAGraph, "capture_end", ended_then_failed)
    with pytest.raises(RuntimeError, match="could not capture a CUDA graph"):
        engine.encode(videos[2:4], COUNTS[2:4])  # another layout
    gc.collect()
    assert not resets and len(engine._failed_graphs) == 1
    monkeypatch.setattr(FakeCUDAGraph, "capture_end", end)
    model.load_state_dict({k: v.clone() for k, v in make_model("tiny", seed=1).state_dict().items()}, assign=True)
    engine.encode(videos[:2], COUNTS[:2])  # all dropped, then one captured anew
    gc.collect()
    assert len(resets) == 2 and not engine._failed_graphs


@pytest.mark.gpu
def test_v1_bf16_layout_graphs_on_the_gpu_are_the_eager_path_bit_for_bit():
    """The production case of auto's small batches: V1 in bf16 on the GPU, one and two 20x192x192 clips a batch.
    From a layout's second batch on (captured then, on real CUDA graphs), tokens and pixels equal an eager
    engine's exactly: the same kernels on the same shapes, cuBLAS included."""
    model = make_model("v1", "triton").to("cuda", torch.bfloat16)
    videos = [v.to("cuda", torch.bfloat16) for v in random_videos([(20, 192, 192)] * 3)]
    counts, shapes = [256, 128, 256], [(20, 192, 192)] * 3
    eager = Engine(model, mode="eager", max_clips=2)
    auto = Engine(model, mode="auto", max_clips=2)  # batches of 6144 and 3136 rows: small ones
    codes, want = eager.encode(videos, counts)
    pixels = eager.decode_indices(want["indices"], shapes)
    # eager against itself first: a difference below would then be the graphs', not the GPU's from run to run
    assert differences(eager.decode_indices(want["indices"], shapes), pixels) == "", "eager, run again"
    auto.encode(videos, counts)  # each layout's first batch: a padded graph (encode), eager (decode)
    auto.decode_indices(want["indices"], shapes)
    for k in range(2):  # captured, then replayed
        got_codes, got = auto.encode(videos, counts)
        got_pixels = auto.decode_indices(want["indices"], shapes)
        assert differences([got_codes], [codes]) == "", f"codes, round {k}"
        assert differences(got["indices"], want["indices"]) == "", f"indices, round {k}"
        assert differences(got_pixels, pixels) == "", f"pixels, round {k}"
    assert auto.modes_run["layout"] == 2 * 2 * 2 and len(auto._layouts) == 4  # 2 rounds, 2 stages, 2 batches


@pytest.mark.gpu
def test_gpu_an_engine_dropped_leaves_another_engines_graphs_exact(monkeypatch):
    """Two engines capture V1's layouts, the second when the stream pool's next stream is the first's: it takes
    another. The first is dropped (its graphs destroyed, which frees its capture stream's cuBLAS workspace) and its
    memory is reused: the second's graphs still give the eager path's tokens and pixels, bit for bit."""
    model = make_model("v1", "triton").to("cuda", torch.bfloat16)
    videos = [v.to("cuda", torch.bfloat16) for v in random_videos([(20, 192, 192)] * 2)]
    counts, shapes = [256, 128], [(20, 192, 192)] * 2
    eager = Engine(model, mode="eager", max_clips=2)
    codes, want = eager.encode(videos, counts)
    pixels = eager.decode_indices(want["indices"], shapes)
    first, second = (engine_for(model, "layout", monkeypatch, max_clips=2) for _ in range(2))
    first.encode(videos, counts)
    first.decode_indices(want["indices"], shapes)
    taken = first._capture_stream.cuda_stream
    drawn = [torch.cuda.Stream().cuda_stream for _ in range(engine_module.POOLED_STREAMS)]
    assert taken in drawn  # (the pool hands out its streams round robin)
    for _ in range(drawn.index(taken) + engine_module.POOLED_STREAMS - len(drawn)):  # the pool's next draw is
        torch.cuda.Stream()  # the first engine's stream: the second engine, drawing next, must pass it over
    second.encode(videos, counts)
    second.decode_indices(want["indices"], shapes)
    assert second._capture_stream.cuda_stream != taken
    gone, stream = weakref.ref(first), first._capture_stream
    del first
    gc.collect()
    with engine_module._LIVE_LOCK:  # its graphs reset and uncounted (else nothing below was freed)
        assert gone() is None and (stream.device.index, taken) not in engine_module._live_graphs()
    # the freed memory refilled: the caching allocator hands a freed block only to an allocation on its own stream,
    # and a graph's pool only to captures into that pool, so the cache is emptied and the NaNs are allocated on
    # the first engine's stream
    torch.cuda.empty_cache()
    with torch.cuda.stream(stream):
        litter = [torch.full((1 << 22,), float("nan"), device="cuda") for _ in range(16)]
    torch.cuda.synchronize()
    got_codes, got = second.encode(videos, counts)
    got_pixels = second.decode_indices(want["indices"], shapes)
    del litter
    assert differences([got_codes], [codes]) == "" and differences(got["indices"], want["indices"]) == ""
    assert differences(got_pixels, pixels) == ""


def differences(got: list[torch.Tensor], want: list[torch.Tensor]) -> str:
    """"" where each tensor equals its counterpart bit for bit; else, for each that does not, how many values
    differ and by how much at most (what a failure on the GPU should tell)."""
    said = []
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.shape != w.shape or not torch.equal(g, w):
            differ = (g != w) if g.shape == w.shape else torch.ones(1, dtype=torch.bool)
            gap = (g.double() - w.double()).abs().max().item() if g.shape == w.shape else float("nan")
            said.append(f"#{k}: {int(differ.sum())} of {w.numel()} values differ, by {gap:.3g} at most")
    return "; ".join(said)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eager", "cudagraph"])
def test_cuda_stream_with_host_results_and_values_checked_late_equals_model(mode):
    """On CUDA: clips made on a side stream (as the pipeline's preprocessing makes them), values checked just
    before their batch, results copied behind their batch and handed over one batch late: the model's indices,
    on the host, and a NaN clip's error after every clip before it."""
    from titok_fast.preprocess import DevicePreprocessor

    model = make_model("tiny").cuda()
    frames = [torch.randint(0, 256, (t, 48, 40, 3), dtype=torch.uint8) for t in (4, 8, 4, 12, 4, 8)]
    clips = [DevicePreprocessor("cuda", 32, 32, model.dtype)(f) for f in frames]
    counts = [5, 16, 1, 30, 9, 12]
    _, out = model.encode([c.clone() for c in clips], counts)
    want = [i.cpu() for i in out["indices"]]
    engine = Engine(model, mode=mode, budgets=(256, 512), max_clips=2)
    items = [(i, clip, n) for i, (clip, n) in enumerate(zip(clips, counts, strict=True))]
    for _ in range(2):  # the second pass replays graphs with new contents
        got = dict(engine.encode_stream(iter(items), host=True))
        assert sorted(got) == list(range(6))
        assert all(idx.device.type == "cpu" and torch.equal(idx, want[i]) for i, (_, idx) in got.items())
    items.insert(3, ("bad", torch.full_like(clips[0], float("nan")), 1))
    seen = []
    with pytest.raises(ValueError, match=r"^clip 'bad' contains NaN or infinite values$"):
        for key, (_, idx) in engine.encode_stream(items, host=True):
            seen.append(key)
            assert torch.equal(idx, want[key])
    assert seen == [0, 1, 2]


@pytest.mark.gpu
def test_cuda_engine_reads_a_callers_pinned_inputs_before_it_hands_results_over():
    """Results on the device come back before the batch has run: a caller that then refills its pinned input
    buffers (as a loader reusing them does) must not change what the batch computes."""
    model = make_model("tiny").cuda()
    videos = [v.pin_memory() for v in random_videos(SHAPES)]
    _, out = model.encode([v.cuda() for v in videos], COUNTS)
    engine = Engine(model, mode="eager", budgets=(512,), max_clips=3)
    for key, (_, idx) in engine.encode_stream((i, videos[i], COUNTS[i]) for i in range(len(SHAPES))):
        videos[key].fill_(0.5)  # its buffer refilled before its result is looked at (the device may not have run)
        assert torch.equal(idx, out["indices"][key]), key


@pytest.mark.parametrize("mode", ["static", "compile", "cudagraph", "layout"])
def test_fixed_shape_runners_follow_new_decoder_weights(expected, mode, monkeypatch):
    """Runners take the decoder table as an input (CUDA graphs read it by address): new weights must reach them."""
    model = make_model("tiny")
    engine = engine_for(model, mode, monkeypatch, budgets=(512,), max_clips=4)
    _, _, indices, _ = expected
    engine.decode_indices(list(indices[:2]), SHAPES[:2])  # builds the runner with the first table
    with torch.no_grad():
        model.decoder.proj_in.weight.mul_(1.5)
        model.decoder.ln_pre.bias.add_(0.1)
    now = model.decode_indices(indices[:2], SHAPES[:2])
    got = engine.decode_indices(list(indices[:2]), SHAPES[:2])
    assert all(rel_l2(g, n) <= 1e-4 for g, n in zip(got, now, strict=True))
    assert rel_l2(now[0], expected[3][0]) > 1e-2  # the change is visible


@pytest.mark.parametrize("mode", ["static", "cudagraph", "layout"])
def test_fixed_shape_state_follows_replaced_parameters_precision_and_dtype(expected, mode, monkeypatch):
    """The fixed-shape modes' runners read the parameters by address (CUDA graphs) and their buffers are made in
    the model's dtype: after ``load_state_dict(assign=True)``, a precision switch, or ``to(bfloat16)``, the
    engine gives exactly what an engine built on the changed model gives."""
    videos, _, indices, _ = expected
    model = make_model("tiny")
    settings = dict(budgets=(128,), max_clips=4)
    engine = engine_for(model, mode, monkeypatch, **settings)

    def same_as_a_new_engine():
        fresh = engine_for(model, mode, monkeypatch, **settings)
        _, got = engine.encode(videos[:3], COUNTS[:3])
        _, want = fresh.encode(videos[:3], COUNTS[:3])
        assert all(torch.equal(g, w) for g, w in zip(got["indices"], want["indices"], strict=True))
        out, ref = (e.decode_indices(list(indices[:3]), SHAPES[:3]) for e in (engine, fresh))
        assert all(torch.equal(o, r) for o, r in zip(out, ref, strict=True))
        return got["indices"]

    before = same_as_a_new_engine()
    model.load_state_dict({k: v.clone() for k, v in make_model("tiny", seed=1).state_dict().items()}, assign=True)
    after = same_as_a_new_engine()
    assert not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # new weights, new tokens
    model.precision = "fp8"
    same_as_a_new_engine()
    model.precision = "default"
    model.to(torch.bfloat16)
    same_as_a_new_engine()
    buffers = engine._buffers.values() if mode != "layout" else engine._layouts.values()
    assert {b.inputs.dtype for b in buffers} == {torch.bfloat16, torch.int32}


@pytest.mark.parametrize("mode", ["eager", "static", "cudagraph", "layout"])
def test_an_engine_first_run_in_inference_mode_runs_outside_it_and_back(expected, mode, monkeypatch):
    """What an engine keeps and updates in place (its fixed-shape buffers, its copy of the decoder table, the FP8
    weights) is made outside inference mode: made by a first batch run in ``torch.inference_mode()`` (a thread's
    mode of its own), it could not be updated by a later batch outside it, and the engine failed for good.
    (Compile mode fills the buffers of static mode, with the same code; compiling again for each mode is slow.)"""
    videos, _, indices, _ = expected
    model = make_model("tiny")
    engine = engine_for(model, mode, monkeypatch, budgets=(256,), max_clips=4)

    def new_weights():  # the decoder table and the FP8 weights are refilled in place
        with torch.no_grad():
            model.decoder.proj_in.weight.mul_(1.5)
            model.encoder.model_layers.attn_layer[0].to_qkv.weight.mul_(0.9)
            model.decoder.model_layers.attn_layer[0].to_qkv.weight.mul_(0.9)  # (an FP8 Linear once switched)

    steps = [(torch.inference_mode, None), (torch.no_grad, None), (contextlib.nullcontext, None),
             (torch.inference_mode, lambda: setattr(model, "precision", "fp8")),  # FP8 weights made in it
             (contextlib.nullcontext, new_weights), (torch.no_grad, None)]  # fmt: skip
    for step, (context, change) in enumerate(steps):
        if change is not None:
            change()
        with context():
            _, got = engine.encode(videos[:3], COUNTS[:3])
            decoded = engine.decode_indices(list(indices[:3]), SHAPES[:3])
        fresh = engine_for(model, mode, monkeypatch, budgets=(256,), max_clips=4)  # (FP8 rounds by shape)
        with torch.no_grad():
            _, want = fresh.encode(videos[:3], COUNTS[:3])
            recon = fresh.decode_indices(list(indices[:3]), SHAPES[:3])
        assert all(torch.equal(g, w) for g, w in zip(got["indices"], want["indices"], strict=True)), (mode, step)
        assert all(torch.equal(d, r) for d, r in zip(decoded, recon, strict=True)), (mode, step)
    assert rel_l2(decoded[0], expected[3][0]) > 1e-2  # (the new weights are in use)


@pytest.mark.parametrize("mode", ["cudagraph", "layout"])
def test_fixed_shape_state_follows_moves_seen_only_at_the_parameters_and_keeps_what_still_holds(
    expected, mode, monkeypatch
):
    """Parameters replaced through a submodule (``model.decoder.load_state_dict(..., assign=True)``) or moved by
    ``model.decoder.to(...)`` never pass through the model's own methods: the engine sees them where they live
    and captures again. A move that moves nothing (``model.to("cpu")`` on the CPU) and ``weights_changed()``
    after in-place writes keep the graphs (they read the same memory, which holds the new values)."""
    videos, _, indices, _ = expected
    model = make_model("tiny")
    engine = engine_for(model, mode, monkeypatch, budgets=(128,), max_clips=4)
    engine.encode(videos[:2], COUNTS[:2])
    engine.decode_indices(list(indices[:2]), SHAPES[:2])
    assert engine.compiles == 2
    with torch.no_grad():
        model.decoder.ln_pre.bias.data.add_(0.1)  # in place, unseen by the version counter
    model.weights_changed()
    model.to("cpu")
    out = engine.decode_indices(list(indices[:2]), SHAPES[:2])
    assert engine.compiles == 2  # no new capture
    now = model.decode_indices(indices[:2], SHAPES[:2])
    assert all(rel_l2(o, n) <= 1e-5 for o, n in zip(out, now, strict=True))
    assert rel_l2(now[0], expected[3][0]) > 1e-3  # the write is visible
    other = make_model("tiny", seed=1)
    model.decoder.load_state_dict({k: v.clone() for k, v in other.decoder.state_dict().items()}, assign=True)
    out = engine.decode_indices(list(indices[:2]), SHAPES[:2])
    assert engine.compiles == 3
    want = engine_for(model, mode, monkeypatch, budgets=(128,), max_clips=4).decode_indices(
        list(indices[:2]), SHAPES[:2]
    )
    assert all(torch.equal(o, w) for o, w in zip(out, want, strict=True))
    model.decoder.to(torch.float64).to(torch.float32)  # new memory, same dtype and device
    engine.decode_indices(list(indices[:2]), SHAPES[:2])
    assert engine.compiles == 4
    # submodules replaced by new ones (new parameters): the parameters are found where they are now
    model.decoder.proj_out = nn.Linear(model.decoder.proj_out.in_features, model.decoder.proj_out.out_features)
    model.encoder.ln_post = nn.LayerNorm(model.encoder.ln_post.normalized_shape)
    out = engine.decode_indices(list(indices[:2]), SHAPES[:2])
    _, got = engine.encode(videos[:2], COUNTS[:2])
    assert engine.compiles == 6
    fresh = engine_for(model, mode, monkeypatch, budgets=(128,), max_clips=4)
    want = fresh.decode_indices(list(indices[:2]), SHAPES[:2])
    assert all(torch.equal(o, w) for o, w in zip(out, want, strict=True))
    _, want = fresh.encode(videos[:2], COUNTS[:2])
    assert all(torch.equal(g, w) for g, w in zip(got["indices"], want["indices"], strict=True))


def test_a_backend_change_lowers_the_budgets_before_a_stream_is_batched(expected, monkeypatch):
    """The torch backend's fixed-shape path takes smaller budgets than the triton one: after ``model.backend`` is
    switched, the next call batches clips for the budgets usable now."""
    import titok_fast.engine as engine_module

    monkeypatch.setattr(engine_module, "TORCH_FIXED_SHAPE_MAX_BUDGET", 256)
    videos, _, indices, _ = expected
    model = make_model("tiny", backend="triton")
    engine = Engine(model, mode="static", budgets=(128, 1024), max_clips=8)
    assert engine.budgets == (128, 1024)
    model.backend = "torch"
    with pytest.warns(UserWarning, match="budgets above 256 rows are dropped") as warned:
        _, got = engine.encode(videos, COUNTS)
    assert [w.filename for w in warned] == [__file__]  # the caller's line, not the engine's
    assert engine.budgets == (128,)
    assert all(torch.equal(a, b) for a, b in zip(got["indices"], indices, strict=True))


def test_an_error_from_the_items_is_not_lost_to_a_batch_failing_meanwhile(model, expected, monkeypatch):
    """The items end in an error after a clip whose batch then fails: the items' error is what comes out (they
    cannot go on), through ``encode_stream`` and through the pipeline's retrying ``encode_resiliently``."""
    from titok_fast.pipeline import encode_resiliently

    videos, _, _, _ = expected
    engine = Engine(model, budgets=(512,), max_clips=3)  # "a" and "b" wait for a third clip: the error comes
    real_encode = model.encode_packed

    def items():
        yield "a", videos[0], COUNTS[0]
        yield "b", videos[1], COUNTS[1]
        raise OSError("the source broke")

    def encode(patches, pack):
        if len(pack.token_counts) == 2:
            raise RuntimeError("the batch of 'a' and 'b' failed")
        return real_encode(patches, pack)

    monkeypatch.setattr(model, "encode_packed", encode)
    with pytest.raises(OSError, match="the source broke"):
        list(engine.encode_stream(items()))
    with pytest.raises(OSError, match="the source broke"):
        list(encode_resiliently(engine, items(), lambda key, error: None))


def test_past_its_layouts_auto_pads_a_graph_batch_to_a_small_budget_only():
    """Once an engine keeps LAYOUT_GRAPHS layouts, a small batch of another layout is padded to a budget: only a
    small one (with budgets of 4k and 64k rows, 5000 rows would pad to 65536 rows, so that batch runs eager)."""
    assert padded_mode(3000, (4096, 65536), "encode") == "cudagraph"
    assert padded_mode(5000, (4096, 65536), "encode") == "eager"
    assert padded_mode(5000, (4096, 8192, 65536), "encode") == "cudagraph"
    assert padded_mode(70000, (4096, 65536), "encode") == "eager"
    # decode batches run eager: a padded graph never beat eager for the decoder on an H200 (RESULTS.md)
    assert padded_mode(3000, (4096, 65536), "decode") == "eager"


def test_pair_positions_match_the_pair_axis_index():
    from titok_fast.kernels.mrope_attention import pair_axis

    positions = torch.randint(0, 1000, (37, 3), dtype=torch.int32)
    assert torch.equal(pair_positions(positions), positions[:, pair_axis()].long())


def test_compile_mode_compiles_every_runner_of_many_engines(expected, monkeypatch):
    """torch.compile keys its cache and recompile limit (8) by code object: runners of many engines and budgets
    must each compile once and then stay compiled, not fall back to running uncompiled past the limit."""
    import torch._inductor.compile_fx as compile_fx

    monkeypatch.setattr(compile_fx, "compile_fx", lambda gm, example_inputs: gm.forward)  # trace only: fast
    model = make_model("tiny")
    videos, _, indices, recon = expected
    for _ in range(4):  # 4 engines x 2 budgets x 2 stages = 16 graphs, twice the limit
        engine = Engine(model, mode="compile", budgets=(128, 512), max_clips=7)
        for clips in ([0], list(range(7)), [2], list(range(7))):  # 9 rows: budget 128; 148 rows: 512; again
            _, got = engine.encode([videos[i] for i in clips], [COUNTS[i] for i in clips])
            assert all(torch.equal(got["indices"][p], indices[i]) for p, i in enumerate(clips))
            out = engine.decode_indices([indices[i] for i in clips], [SHAPES[i] for i in clips])
            assert all(rel_l2(out[p], recon[i]) <= 1e-5 for p, i in enumerate(clips))
        assert engine.compiles == 4  # (encode, decode) x (128, 512): once each, none again
    assert not any(name.startswith("__compiled_fn") for name in vars(engine_module))  # (kept by the runners)
    gc.disable()  # a dropped engine is freed at once, with its buffers: no cycle waits for the cyclic collector
    try:
        dropped = weakref.ref(engine)
        del engine
        assert dropped() is None
    finally:
        gc.enable()


def _meeting(seconds: float = 1.0):
    """A function that holds its first two callers until both have come (or ``seconds`` have passed)."""
    barrier = threading.Barrier(2, timeout=seconds)

    def meet():
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()

    return meet


@pytest.mark.parametrize("mode", ["static", "cudagraph", "auto as on CUDA", "layout"])
def test_threads_sharing_an_engine_each_get_their_own_clips(model, expected, mode, monkeypatch):
    """A fixed-shape engine refills one set of buffers per budget: two threads' batches must take turns, or one
    runs the other's clips. Each batch is held just before it runs until the other thread's comes (or a second has
    passed: an engine that keeps batches apart lets only one of them that far)."""
    videos, _, indices, recon = expected
    kind = {"static": "static", "layout": "layout"}.get(mode, "cudagraph")
    engine = engine_for(model, kind, monkeypatch, budgets=(512,), max_clips=4)
    if mode == "auto as on CUDA":  # the default mode on a GPU: a small batch's first layout runs padded (encode)
        rule = engine_module.auto_mode
        monkeypatch.setattr(engine_module, "auto_mode", lambda rows, _, b, s: rule(rows, torch.device("cuda"), b, s))
        engine.mode = "auto"
    halves = [0, 2, 4, 6], [1, 3, 5]
    engine.encode([videos[0]], [COUNTS[0]]), engine.decode_indices([indices[0]], [SHAPES[0]])  # captured here
    replay, layout = engine._replay, engine._layout
    for stage in ("encode", "decode"):
        meet = _meeting()
        monkeypatch.setattr(engine, "_replay", lambda *args, meet=meet: meet() or replay(*args))
        monkeypatch.setattr(engine, "_layout", lambda *args, meet=meet: meet() or layout(*args))
        if stage == "encode":
            calls = [lambda h=h: engine.encode([videos[i] for i in h], [COUNTS[i] for i in h])[1] for h in halves]
            got = [out["indices"] for out in in_threads(*calls)]
            assert all(torch.equal(g[p], indices[i]) for h, g in zip(halves, got, strict=True) for p, i in enumerate(h))
        else:
            calls = [lambda h=h: engine.decode_indices([indices[i] for i in h], [SHAPES[i] for i in h]) for h in halves]
            got = in_threads(*calls)
            assert all(rel_l2(g[p], recon[i]) < 1e-5 for h, g in zip(halves, got, strict=True) for p, i in enumerate(h))
    # one graph a stage, captured before the threads (auto: the encoder's alone, its decode batches run eager;
    # layout: one a layout, and each half is a layout of its own)
    assert engine.compiles == {"static": 0, "cudagraph": 2, "auto as on CUDA": 1, "layout": 2 + 4}[mode]


def test_threads_calling_one_fresh_model_at_once_get_what_they_would_alone(expected):
    """The model's own calls from two threads at once, on a model whose caches (packings, RoPE tables, FSQ
    constants, the decoder's table) are all built during those calls."""
    videos, _, indices, recon = expected
    model = make_model("tiny")  # the same seed as the module's model: the same weights
    halves = [0, 2, 4, 6], [1, 3, 5]
    calls = [lambda h=h: model.encode([videos[i] for i in h], [COUNTS[i] for i in h])[1]["indices"] for h in halves]
    calls += [lambda h=h: model.decode_indices([indices[i] for i in h], [SHAPES[i] for i in h]) for h in halves]
    *encoded, first, second = in_threads(*calls)
    assert all(torch.equal(g[p], indices[i]) for h, g in zip(halves, encoded, strict=True) for p, i in enumerate(h))
    for h, got in zip(halves, (first, second), strict=True):
        assert all(rel_l2(got[p], recon[i]) < 1e-5 for p, i in enumerate(h))


def test_engines_compiling_in_threads_at_once_count_their_own_graphs(expected, monkeypatch):
    """torch.compile compiles on the calling thread: an engine's ``compiles`` counts its own graphs, not those
    another thread's engine compiled meanwhile."""
    import torch._inductor.compile_fx as compile_fx

    meet = _meeting()
    monkeypatch.setattr(compile_fx, "compile_fx", lambda gm, example_inputs: meet() or gm.forward)  # trace only
    model = make_model("tiny")
    videos, _, indices, _ = expected
    engines = [Engine(model, mode="compile", budgets=(128,), max_clips=7) for _ in range(2)]
    got = in_threads(*(lambda e=e: e.encode([videos[0]], [COUNTS[0]]) for e in engines))
    assert all(torch.equal(out["indices"][0], indices[0]) for _, out in got)
    assert [e.compiles for e in engines] == [1, 1]


def test_the_rope_table_cache_gives_each_caller_a_table_as_long_as_it_asked_for():
    """Tables grow as positions need them, and threads share the cache: a caller gets the table it made, not the
    one stored last (here another caller's shorter table is stored right after it, as a thread switch could do)."""

    class Interleaved(dict):
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            if value[0].shape[0] > 256:
                super().__setitem__(key, mrope_tables(256, "cpu"))

    cache = PackingCache()
    cache._tables = Interleaved()
    cos, sin = cache.tables(300, "cpu")
    assert cos.shape[0] == sin.shape[0] == 512
    grown = PackingCache()
    assert grown.tables(10, "cpu")[0].shape[0] == 256 and grown.tables(300, "cpu")[0].shape[0] == 512  # (grown)


@pytest.mark.parametrize(("counts", "grids"), [
    ((200,), ((1, 1, 57),)), ((5, 128), ((2, 4, 4), (1, 8, 128))), ((1,), ((3, 2, 2),)),
])  # fmt: skip
def test_a_packings_rope_rows_are_its_positions_rows_of_the_table(counts, grids):
    """max_position is one past the largest position (at a power of two here: 256 needs a table of 512 rows), and
    each packed row's cos/sin are the table's rows of its positions (an index past the table would read others)."""
    pack = make_packing(counts, grids, "cpu")
    assert pack.max_position == int(pack.positions.max()) + 1
    cache = PackingCache()
    cos, sin = cache.row_rotations(pack, "cpu")
    table_cos, table_sin = mrope_tables(pack.max_position, "cpu")
    index = pair_positions(pack.positions)
    assert torch.equal(cos, table_cos.gather(0, index)) and torch.equal(sin, table_sin.gather(0, index))


def test_engine_uses_the_models_public_api_only():
    """No private model attribute is reached from the engine (``model._x`` / ``self.model._x``)."""
    import re
    from pathlib import Path

    import titok_fast.engine

    source = Path(titok_fast.engine.__file__).read_text()
    assert re.findall(r"model\._\w+", source) == []
    assert "model.pack_indices(" in source  # the pattern sees what the engine calls


def test_auto_mode_rule_is_shape_and_device_only():
    """auto: a graph of its layout for a small batch on CUDA (one V1 clip of 20x192x192: 2880 patches + 256
    tokens), encode or decode; eager for a large one and on any other device."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert auto_mode(3136, cuda) == auto_mode(AUTO_GRAPH_MAX_ROWS, cuda) == "layout"
    assert auto_mode(3136, cuda, stage="decode") == "layout"
    assert auto_mode(AUTO_GRAPH_MAX_ROWS + 1, cuda) == "eager" and auto_mode(8 * 3136, cuda, stage="decode") == "eager"
    assert auto_mode(10, cpu) == auto_mode(10, cpu, stage="decode") == "eager"


def test_auto_mode_mixes_graphs_and_eager_batches_and_equals_model(model, expected, monkeypatch):
    """On the CUDA-graph stand-in, with the rule's threshold lowered so that some batches of this stream are small
    and some large: each runs in its own mode, every clip equals the model's."""
    import titok_fast.engine as engine_module

    videos, _, indices, recon = expected
    engine = engine_for(model, "cudagraph", monkeypatch, budgets=(64, 256), max_clips=2)
    engine.mode = "auto"
    modes = []

    def rule(rows, device, budgets, stage):  # (decode batches too: the mechanics, not the rule)
        modes.append("cudagraph" if rows <= 40 else "eager")
        return modes[-1]

    monkeypatch.setattr(engine_module, "auto_mode", rule)
    _, got = engine.encode(videos, COUNTS)
    assert all(torch.equal(got["indices"][i], indices[i]) for i in range(len(SHAPES)))
    out = engine.decode_indices(list(indices), SHAPES)
    assert all(rel_l2(out[i], recon[i]) <= 1e-5 for i in range(len(SHAPES)))
    assert {"cudagraph", "eager"} <= set(modes) and engine.compiles == 2  # one graph per stage, budget 64


def test_layout_graphs_replay_the_eager_path_bit_for_bit_up_to_a_cap(model, expected, monkeypatch):
    """auto's graphs of a batch's own layout (on the CPU stand-in) replay the eager path's work: the codes, indices
    and pixels of an eager engine that batches alike, bit for bit, also with new contents. A layout's first batch
    runs padded (encode) or eager (decode), its second captures its graph, which later batches replay; past
    LAYOUT_GRAPHS layouts of a stage, its batches keep running padded or eager: the same clips again."""
    videos, _, indices, _ = expected
    monkeypatch.setattr(engine_module, "LAYOUT_GRAPHS", 2)
    settings = dict(budgets=(64, 256), max_clips=2)  # 7 clips: 4 batches, so 4 layouts per stage
    engine = engine_for(model, "layout", monkeypatch, **settings)
    monkeypatch.setattr(engine_module, "CAPTURE_AT_FIRST_BATCH", False)  # (the default: engine_for sets True)
    eager = Engine(model, mode="eager", **settings)
    order = shuffled(0)
    shapes = [SHAPES[i] for i in order]
    rounds, ran = [], []
    for contents in (videos, [-v.flip(-1) for v in videos], [v.flip(-2) for v in videos]):
        clips, counts = [contents[i] for i in order], [COUNTS[i] for i in order]
        before = engine.modes_run.copy()
        codes, got = engine.encode(clips, counts)
        want_codes, want = eager.encode(clips, counts)
        assert torch.equal(codes, want_codes)
        assert all(torch.equal(g, w) for g, w in zip(got["indices"], want["indices"], strict=True))
        out = engine.decode_indices(list(want["indices"]), shapes)
        rounds.append((got["indices"], want["indices"], out, eager.decode_indices(list(want["indices"]), shapes)))
        ran.append(dict(engine.modes_run - before))
    assert ran == [
        {"cudagraph": 4, "eager": 4},  # first batches: encode padded, decode eager
        {"layout": 4, "cudagraph": 2, "eager": 2},  # 2 layouts a stage captured, the other 2 as before
        {"layout": 4, "cudagraph": 2, "eager": 2},  # replayed
    ]
    assert sorted(stage for stage, _, _ in engine._layouts) == ["decode", "decode", "encode", "encode"]
    assert engine.compiles == 2 + 4  # the padded ones (budgets 64 and 256), then the layouts, in round 2 only
    for got, want, out, want_out in rounds:  # what a round got is its own: later replays wrote in their own memory
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        assert all(torch.equal(o, w) for o, w in zip(out, want_out, strict=True))
    assert not torch.equal(rounds[1][0][0], indices[order[0]])  # the later rounds' contents were new


def test_a_layout_graph_that_cannot_be_captured_is_an_error_that_names_the_way_out(model, expected, monkeypatch):
    """A capture CUDA refuses (here a host read in the packed path, which a capturing stream refuses) is an error
    naming the mode that captures nothing: PyTorch's allocator is not fit to go on after a failed capture, so the
    engine does not try another path."""
    videos, _, _, _ = expected
    engine = engine_for(model, "layout", monkeypatch, budgets=(64, 256), max_clips=2)
    latents = model.encoder.latents

    def reading_a_value(patches, pack, cache=None):
        patches.sum().item()
        return latents(patches, pack, cache)

    monkeypatch.setattr(model.encoder, "latents", reading_a_value)
    with pytest.raises(RuntimeError) as raised:
        engine.encode(videos, COUNTS)
    assert str(raised.value) == (
        "could not capture a CUDA graph of the layout of a batch to encode (CaptureError: aten._local_scalar_dense."
        "default syncs with the host: operation not permitted when stream is capturing); mode 'eager' (--mode "
        "eager) captures no graph"
    )
    assert not engine._layouts


def test_out_of_memory_during_a_capture_is_a_capture_error_not_a_split(model, expected, monkeypatch):
    """Out of memory in a graph's warm-ups splits the batch, as in eager; during the capture itself it is a failed
    capture (the allocator is not fit to retry after one), and says so with the way out, not retried in halves."""
    import graph_capture

    videos, _, _, _ = expected
    engine = engine_for(model, "layout", monkeypatch, budgets=(64, 256), max_clips=2)
    latents, calls = model.encoder.latents, []

    def short_of_memory_while_capturing(patches, pack, cache=None):
        calls.append(len(pack.token_counts))
        if getattr(graph_capture._capturing, "on", False):
            raise torch.OutOfMemoryError("simulated")
        return latents(patches, pack, cache)

    monkeypatch.setattr(model.encoder, "latents", short_of_memory_while_capturing)
    with pytest.raises(RuntimeError) as raised:
        engine.encode(videos[:2], COUNTS[:2])
    assert str(raised.value) == (
        "could not capture a CUDA graph of the layout of a batch to encode (RuntimeError: out of memory while "
        "capturing a CUDA graph (OutOfMemoryError)); mode 'eager' (--mode eager) captures no graph"
    )
    assert calls == [2, 2, 2] and not engine._layouts  # two warm-ups and the capture, of the batch of 2 alone


def test_a_batch_split_for_memory_is_counted_as_the_batches_that_ran(model, expected, monkeypatch):
    """``modes_run`` (what the benchmarks log) counts batches that ran: a batch that ran out of memory is its
    halves, not itself and its halves."""
    videos, _, _, _ = expected
    engine = Engine(model, budgets=(1024,), max_clips=4)
    real_encode = model.encode_packed

    def encode_with_small_memory(patches, pack):
        if len(pack.token_counts) > 2:
            raise torch.OutOfMemoryError("simulated")
        return real_encode(patches, pack)

    monkeypatch.setattr(model, "encode_packed", encode_with_small_memory)
    engine.encode(videos[:4], COUNTS[:4])
    assert engine.modes_run == {"eager": 2}


def test_padding_rows_hold_nan_and_never_reach_a_clip(model, expected, monkeypatch):
    """The fixed-shape path with its empty input rows filled with NaN instead of zeros gives the same clips: no
    padding row (nor a latent row's unused input) is ever read into a real one."""
    import titok_fast.engine as engine_module

    monkeypatch.setattr(engine_module, "PADDING", float("nan"))
    videos, _, indices, recon = expected
    engine = Engine(model, mode="static", budgets=(512,), max_clips=8)
    _, got = engine.encode(videos[:3], COUNTS[:3])
    assert all(torch.equal(got["indices"][i], indices[i]) for i in range(3))
    inputs = engine._buffers[("encode", 512)].inputs
    rows = sum(n + s[0] // 4 * s[1] // 8 * s[2] // 8 for n, s in zip(COUNTS[:3], SHAPES[:3], strict=True))
    assert bool(inputs[rows:].isnan().all())  # the NaN really was there


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_a_clip_filling_the_largest_budget_exactly_is_encoded_and_decoded(mode):
    """A batch that fills the largest budget exactly is what greedy packing makes: such a clip is run, in every mode."""
    model = make_model("tiny")
    video = random_videos([(4, 16, 16)])  # tiny: 4x8x8 patches -> 1*2*2 = 4 patch rows, + 5 tokens = 9 rows
    _, want = model.encode(video, [5])
    engine = Engine(model, mode=mode, budgets=(9,), max_clips=2)
    _, got = engine.encode(video, [5])
    assert torch.equal(got["indices"][0], want["indices"][0])
    assert torch.allclose(engine.decode_indices(list(got["indices"]), [(4, 16, 16)])[0],
                          model.decode_indices(want["indices"], [(4, 16, 16)])[0], atol=1e-4)
    assert list(pack_greedily([10, 4], lambda r: r, largest=10, max_clips=5)) == [[10], [4]]


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_an_engine_is_copied_and_pickled_as_a_fresh_engine_of_the_same_settings(model, expected, mode):
    """A Dataset holding an engine, sent to spawned (or forkserver) DataLoader workers, failed: its lock could not
    be pickled, nor deep-copied. A copy or pickle is a fresh engine of the same model, mode, budgets and max_clips
    (its buffers and graphs made again where it runs), and gives the same clips."""
    import copy
    import pickle

    videos, _, indices, recon = expected
    engine = Engine(model, mode=mode, budgets=(512, 1024), max_clips=3)
    engine.encode(videos[:2], COUNTS[:2])  # (buffers and runners made: not carried)
    for other in (copy.deepcopy(engine), pickle.loads(pickle.dumps(engine))):
        assert (other.mode, other.budgets, other.max_clips, other.compiles) == (mode, (512, 1024), 3, 0)
        assert other.model is not model and not other._buffers and not other._runners
        assert all(map(torch.equal, other.encode(videos, COUNTS)[1]["indices"], indices))
        assert all(rel_l2(a, b) < 1e-5 for a, b in zip(other.decode_indices(indices, SHAPES), recon, strict=True))


def test_the_packing_cache_keeps_devices_apart_and_holds_at_most_its_capacity():
    """A packing is made for a device: asked for on another (a model moved to the GPU), it is made there, not the
    first one's tensors handed back. Past its capacity the least recently used goes, or a long job of many clip
    counts would keep a packing (and its rows' RoPE tables, MBs for V1) of each for ever."""
    cache = PackingCache(capacity=2)
    cpu = cache.packing([4], [(1, 2, 2)], "cpu")
    meta = cache.packing([4], [(1, 2, 2)], "meta")
    assert meta is not cpu and meta.cu_seqlens.device.type == "meta" and cpu.cu_seqlens.device.type == "cpu"
    assert cache.packing([4], [(1, 2, 2)], "cpu") is cpu  # (now the most recent: the meta one goes next)
    cache.packing([5], [(1, 2, 2)], "cpu")
    assert len(cache._packings) == 2 and cache.packing([4], [(1, 2, 2)], "cpu") is cpu
    assert cache.packing([4], [(1, 2, 2)], "meta") is not meta  # (made again)
