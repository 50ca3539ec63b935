"""encode_files streams clips from many files through one engine stream: per-file results, failures, memory."""

import dataclasses
import datetime
import errno
import json
import math
import os
import re
import shutil
import threading
import time
import types
import weakref
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest
import torch
from safetensors import safe_open

from titok_fast import Engine, TiTok, __version__, pipeline, video
from titok_fast.files import write_atomically
from titok_fast.loading import random_tokenizer
from titok_fast.metrics import psnr, ssim
from titok_fast.pipeline import ClipSettings, decode_files, encode_files, encode_resiliently, evaluate
from titok_fast.tokens import TokenFileError, load_tokens
from titok_fast.video import READER, read_clips, video_comment
from titok_fast.writing import VideoWriter, write_video

from graph_capture import FakeCUDAGraph, engine_for
from videos import level_to_index, make_hanging, make_scrambled, make_video, release_hanging

SETTINGS = ClipSettings(grid=(4, 32, 32), tokens=8, fps=8.0, tail="pad")


@pytest.fixture(scope="module")
def model():
    return random_tokenizer("tiny", seed=0)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    made = {
        "long": make_video(root / "long.mp4", frames=72, height=40, width=48, fps=24),  # 24 frames -> 6 clips
        "short": make_video(root / "short.mp4", frames=12, height=32, width=32, fps=24),  # 4 frames -> 1 clip
        "odd": make_video(root / "odd.mkv", frames=30, height=37, width=53, fps=12),  # 20 frames -> 5 clips
    }
    size = made["long"].stat().st_size
    made["broken"] = make_scrambled(root / "broken.mp4", made["long"], start=size * 3 // 10)  # fails after clip 0
    black = root / "black.mp4"
    write_video(black, torch.full((3, 16, 32, 32), -1.0), fps=8)
    made["black"] = black
    return made


def direct_indices(model, path) -> list[torch.Tensor]:
    t, h, w = SETTINGS.grid
    clips = read_clips(path, frames=t, height=h, width=w, fps=SETTINGS.fps, tail=SETTINGS.tail).clips
    _, out = model.encode(clips, [SETTINGS.tokens] * len(clips))
    return [i.long() for i in out["indices"]]


def encode(model, files, outdir, mode="eager", monkeypatch=None, **kwargs):
    """encode_files through an engine of that mode (cudagraph: on the CPU stand-in, patched with monkeypatch)."""
    engine = engine_for(model, mode, monkeypatch, budgets=(128, 256), max_clips=kwargs.pop("max_clips", 3))
    return encode_files(model, engine, [(p, p.stem) for p in files], outdir, SETTINGS, **kwargs)


@pytest.mark.parametrize("change, message", [
    (dict(grid=(4, 32, 36)), r"^grid of the clip settings is \[4, 32, 36\]; W must be a positive multiple of 8"),
    (dict(tokens=16.0), r"^token count of the clip settings is 16\.0; expected an integer >= 1$"),
    (dict(tokens=0), r"^token count of the clip settings is 0; expected an integer in \[1, "),
    (dict(grid=(4, 128, 128)), r"^grid \[4, 128, 128\] with 8 tokens: a clip would need 264 packed rows \(tokens \+ "
                             r"patches\); the engine takes at most 256 per clip$"),
], ids=["grid", "float-tokens", "no-tokens", "rows"])  # fmt: skip
def test_settings_no_clip_could_run_with_are_refused_before_any_file_is_opened(model, sources, tmp_path, change,
                                                                               message):  # fmt: skip
    """From Python as from the command line: one error up front, not each file failing alone (32 in a row stop
    the run) with a manifest line apiece."""
    engine = engine_for(model, "eager", None, budgets=(128, 256), max_clips=3)
    settings = dataclasses.replace(SETTINGS, **change)
    files = [(sources["short"], "short")]
    error = TypeError if change.get("tokens") == 16.0 else ValueError
    with pytest.raises(error, match=message):
        encode_files(model, engine, files, tmp_path / "t", settings, workers=1)
    assert not (tmp_path / "t").exists()
    with pytest.raises(error, match=message):
        evaluate(engine, files, dataclasses.replace(settings, tokens=8), [settings.tokens], workers=1)


def test_paths_given_alone_are_named_by_their_stems_and_a_clash_is_refused(model, sources, tmp_path):
    """encode_files takes paths as decode_files does (each named by its stem); two of one name are an error naming
    both, not two videos written into one token file."""
    engine = engine_for(model, "eager", None, budgets=(128, 256), max_clips=3)
    summary = encode_files(model, engine, [sources["short"], str(sources["odd"])], tmp_path / "a", SETTINGS, workers=1)
    assert not summary.failed and sorted(p.name for p in (tmp_path / "a").glob("*.safetensors")) == [
        "odd.safetensors", "short.safetensors"]  # fmt: skip
    same = tmp_path / "other" / "short.mkv"
    same.parent.mkdir()
    shutil.copy(sources["odd"], same)
    with pytest.raises(pipeline.InputError, match=r"would both write short\.safetensors"):
        encode_files(model, engine, [sources["short"], same], tmp_path / "b", SETTINGS, workers=1)
    table, _ = evaluate(engine, [sources["short"], same], SETTINGS, [SETTINGS.tokens], workers=1)  # (writes nothing)
    assert table[SETTINGS.tokens]["clips"] == 1 + 5


def test_files_spanning_batches_get_the_tokens_of_their_own_clips(model, sources, tmp_path):
    files = [sources["long"], sources["short"], sources["odd"]]
    summary = encode(model, files, tmp_path, workers=2, read_ahead=1, max_clips=4)  # batches mix files
    assert summary.done == [str(p) for p in files] and not summary.failed and summary.clips == 12
    assert summary.limited_by.split(" (")[0] in ("decode-bound", "model-bound")
    assert f"\n  {summary.limited_by}" in summary.report("encoded")
    many = encode(model, files, tmp_path / "many", workers=64, worker_kind="thread", max_clips=4)  # 3 files: 3 start
    assert re.search(r", [123] decoding threads?\)", many.limited_by), many.limited_by
    for path in files:
        stored = load_tokens(tmp_path / f"{path.stem}.safetensors")
        expected = direct_indices(model, path)
        assert all(torch.equal(a.long(), b) for a, b in zip(stored.all_indices(), expected, strict=True))
    odd = load_tokens(tmp_path / "odd.safetensors")
    assert odd.start_times.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0] and odd.last_chunk_frames == 4


def test_a_file_failing_midway_loses_nothing_else(model, sources, tmp_path, monkeypatch):
    """... and the run keeps nothing of a file once it has ended (about 1 KB each: a gigabyte per million files
    when it kept them all), even when clips of a failed file come back from the engine after it ended."""
    jobs, late = [], []

    class Job(pipeline._EncodeJob):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            jobs.append(self)

        def add(self, key, indices):
            late.append(key[0] not in self.files)
            super().add(key, indices)

    monkeypatch.setattr(pipeline, "_EncodeJob", Job)
    files = [sources["short"], sources["broken"], sources["odd"]]
    summary = encode(model, files, tmp_path, workers=1, read_ahead=2)
    assert len(jobs) == 1 and jobs[0].files == {} and any(late)
    assert [p for p, _ in summary.failed] == [str(sources["broken"])]
    assert "broken.mp4: decoding failed" in summary.failed[0][1]
    assert summary.done == [str(sources["short"]), str(sources["odd"])]
    assert not (tmp_path / "broken.safetensors").exists()
    stored = load_tokens(tmp_path / "odd.safetensors").all_indices()
    assert all(torch.equal(a.long(), b) for a, b in zip(stored, direct_indices(model, sources["odd"]), strict=True))


def test_a_video_of_more_clips_than_a_token_file_holds_fails_alone_once_it_has_them(model, sources, tmp_path,
                                                                                     monkeypatch):
    """Its token file would not load (MAX_FILE_BYTES): it was written all the same, and every clip was held until
    then. Here a token file holds 5 clips: long.mp4 (6) fails at its 6th, and odd.mp4 (5) is written."""
    from titok_fast import tokens

    most = 5
    monkeypatch.setattr(tokens, "MAX_FILE_BYTES", tokens.MAX_HEADER_BYTES + most * (2 * 8 + tokens.CHUNK_BYTES))
    assert tokens.most_chunks(SETTINGS.tokens, SETTINGS.grid[0]) == most
    summary = encode(model, [sources["long"], sources["short"], sources["odd"]], tmp_path, workers=1, read_ahead=2)
    assert summary.done == [str(sources["short"]), str(sources["odd"])]
    assert summary.failed == [(str(sources["long"]), f"{sources['long']}: more than 5 clips of 8 tokens: its token "
                               "file would pass the 4,194,544 bytes a token file may have; cut the video into parts")]
    assert not (tmp_path / "long.safetensors").exists() and len(load_tokens(tmp_path / "odd.safetensors").grids) == 5


def test_files_before_a_stuck_file_are_written_without_waiting_for_it(model, sources, tmp_path):
    """The engine held the last clips read before a file that gives none (until the stall limit, 300 s by
    default), so the files before it waited unwritten; now a wait of IDLE_SECONDS runs them."""
    import threading

    hangs, out = make_hanging(tmp_path), tmp_path / "out"
    done: list = []
    run = threading.Thread(target=lambda: done.append(
        encode(model, [sources["short"], sources["odd"], hangs], out, workers=1, stall_seconds=120)
    ))  # fmt: skip
    run.start()
    try:
        deadline = time.monotonic() + 60
        while not (out / "odd.safetensors").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / "odd.safetensors").exists() and (out / "short.safetensors").exists() and run.is_alive()
    finally:
        release_hanging(tmp_path)
        run.join(timeout=120)
    assert done[0].done == [str(sources["short"]), str(sources["odd"])] and [f for f, _ in done[0].failed] == [
        str(hangs)
    ]  # fmt: skip
    stored = load_tokens(out / "odd.safetensors").all_indices()
    assert all(torch.equal(a.long(), b) for a, b in zip(stored, direct_indices(model, sources["odd"]), strict=True))


def test_a_file_whose_read_hangs_fails_alone_and_the_others_are_encoded(model, sources, tmp_path):
    """One decoding thread, stuck for good in the second file: it is given up after the stall limit and another
    thread reads the third."""
    hangs = make_hanging(tmp_path)
    try:
        summary = encode(model, [sources["short"], hangs, sources["odd"]], tmp_path / "out", workers=1,
                         stall_seconds=3.0)  # fmt: skip
    finally:
        release_hanging(tmp_path)
    assert summary.done == [str(sources["short"]), str(sources["odd"])]
    assert summary.failed == [(str(hangs), f"{hangs}: no clip decoded for 3 s; given up (a read that hangs, or a "
                                           "file the decoder cannot get through)")]  # fmt: skip
    stored = load_tokens(tmp_path / "out" / "odd.safetensors").all_indices()
    assert all(torch.equal(a.long(), b) for a, b in zip(stored, direct_indices(model, sources["odd"]), strict=True))


def poison_black_clips(monkeypatch):
    """Batches holding an all-black clip fail, as a clip the device cannot take would."""
    real = Engine._run_encode

    def run_encode(self, batch, videos):
        if any(bool((video <= -0.99).all()) for _, video, _ in batch):
            raise RuntimeError("device fault")
        return real(self, batch, videos)

    monkeypatch.setattr(Engine, "_run_encode", run_encode)


@pytest.mark.parametrize("worker_kind", ["thread", "process"])
def test_many_files_ending_in_any_order_are_each_written_once_or_failed_once(model, sources, tmp_path, monkeypatch,
                                                                              worker_kind):  # fmt: skip
    """Files of every kind (whole, failing midway in reading, failing in encoding, odd sizes), several workers,
    clips of many files taken as they come: each good file's token file is written once with its own tokens, each
    bad one fails once, the manifest has one line per input, and the summary lists them in the inputs' order."""
    poison_black_clips(monkeypatch)
    kinds = ["long", "broken", "short", "black", "odd", "long", "broken", "black", "odd", "short", "long", "odd"]
    files = []
    for i, kind in enumerate(kinds):
        files.append(tmp_path / "in" / f"{i:02d}-{kind}{sources[kind].suffix}")
        files[-1].parent.mkdir(exist_ok=True)
        files[-1].symlink_to(sources[kind])
    writes, real_write = [], pipeline.write_token_file

    def write(model, settings, out, *rest):
        writes.append(out)
        return real_write(model, settings, out, *rest)

    monkeypatch.setattr(pipeline, "write_token_file", write)
    summary = encode(model, files, tmp_path / "out", workers=3, read_ahead=1, max_clips=4, worker_kind=worker_kind)
    good = [p for p, kind in zip(files, kinds, strict=True) if kind not in ("broken", "black")]
    assert summary.done == [str(p) for p in good]
    assert [p for p, _ in summary.failed] == [str(p) for p, kind in zip(files, kinds, strict=True) if p not in good]
    assert sorted(writes) == sorted(tmp_path / "out" / f"{p.stem}.safetensors" for p in good)
    for path in good:
        stored = load_tokens(tmp_path / "out" / f"{path.stem}.safetensors").all_indices()
        assert all(torch.equal(a.long(), b) for a, b in zip(stored, direct_indices(model, path), strict=True))
    lines = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(line["source"] for line in lines) == sorted(str(p) for p in files)


@pytest.mark.parametrize("mode", ["eager", "cudagraph"])
def test_a_batch_failure_costs_only_the_file_at_fault(model, sources, tmp_path, monkeypatch, mode):
    poison_black_clips(monkeypatch)
    files = [sources["long"], sources["black"], sources["odd"]]
    replays = FakeCUDAGraph.replays
    summary = encode(model, files, tmp_path, mode, monkeypatch, max_clips=4)  # the black clips share batches
    assert (FakeCUDAGraph.replays > replays) == (mode == "cudagraph")  # batches and retries alone replayed graphs
    assert [p for p, _ in summary.failed] == [str(sources["black"])]
    assert "encoding failed on clip 0: device fault" in summary.failed[0][1]
    assert summary.done == [str(sources["long"]), str(sources["odd"])]
    for path in (sources["long"], sources["odd"]):
        stored = load_tokens(tmp_path / f"{path.stem}.safetensors").all_indices()
        assert all(torch.equal(a.long(), b) for a, b in zip(stored, direct_indices(model, path), strict=True))


def test_encode_resiliently_retries_alone_and_goes_on(model, monkeypatch):
    poison_black_clips(monkeypatch)
    g = torch.Generator().manual_seed(1)
    videos = [torch.rand(3, 4, 32, 32, generator=g) * 2 - 1 for _ in range(7)]
    videos[2] = torch.full((3, 4, 32, 32), -1.0)
    errors = []
    engine = Engine(model, budgets=(128,), max_clips=2)
    items = ((f"clip{i}", v, 8) for i, v in enumerate(videos))
    results = dict(encode_resiliently(engine, items, lambda key, e: errors.append((key, str(e)))))
    assert errors == [("clip2", "device fault")]
    assert sorted(results) == [f"clip{i}" for i in range(7) if i != 2]
    good = [v for i, v in enumerate(videos) if i != 2]
    _, out = model.encode(good, [8] * len(good))
    assert all(torch.equal(results[k][1], i) for k, i in zip(sorted(results), out["indices"], strict=True))


def test_scattered_failures_are_not_failures_in_a_row(model, monkeypatch):
    """A clip that fails alone stops the run only after ``give_up_after`` such clips in a row: bad clips with good
    ones between them (a dataset's scattered damaged files) never add up to that."""
    poison_black_clips(monkeypatch)
    g = torch.Generator().manual_seed(2)
    videos = [torch.rand(3, 4, 32, 32, generator=g) * 2 - 1 for _ in range(12)]
    for i in (1, 4, 7, 10):
        videos[i] = torch.full((3, 4, 32, 32), -1.0)
    errors = []
    engine = Engine(model, budgets=(128,), max_clips=1)
    items = ((f"clip{i}", v, 8) for i, v in enumerate(videos))
    results = dict(encode_resiliently(engine, items, lambda key, e: errors.append(key), give_up_after=3))
    assert errors == ["clip1", "clip4", "clip7", "clip10"] and len(results) == 8


def test_a_long_video_is_never_held_whole(model, tmp_path, monkeypatch):
    """Clips prepared for the model and not yet encoded never exceed the engine's two batches, the clip that
    closed the second, ``read_ahead`` more queued and the one its worker holds: 7 of the video's 20 clips here.
    (The decoding worker prepares them: scaled in the model's dtype where they are read.)"""
    from titok_fast import video

    path = make_video(tmp_path / "ten_seconds.mp4", frames=240, height=32, width=32, fps=24)  # 20 clips
    alive, peak = [0], [0]
    real_normalize = video.normalize_pixels

    def tracking(clip, dtype):
        out = real_normalize(clip, dtype)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(out, lambda: alive.__setitem__(0, alive[0] - 1))
        return out

    monkeypatch.setattr(video, "normalize_pixels", tracking)
    summary = encode(model, [path], tmp_path / "out", workers=1, worker_kind="thread", read_ahead=1, max_clips=2)
    assert summary.done == [str(path)] and summary.clips == 20
    assert 0 < peak[0] <= 2 * 2 + 1 + 1 + 1  # a batch running, the next staged, the clip that closed it, one queued
    # and one being read


def test_eval_streams_in_groups_and_skips_a_file_failing_midway(model, sources):
    files = [(sources["long"], "long"), (sources["broken"], "broken"), (sources["odd"], "odd")]
    engine = Engine(model, budgets=(256,), max_clips=4)
    table, summary = evaluate(engine, files, SETTINGS, [4, 8], workers=1, group=3)
    assert [p for p, _ in summary.failed] == [str(sources["broken"])] and len(summary.done) == 2
    t, h, w = SETTINGS.grid
    read = {"frames": t, "height": h, "width": w, "fps": SETTINGS.fps, "tail": SETTINGS.tail}
    clips = [c for p in (sources["long"], sources["odd"]) for c in read_clips(p, **read).clips]
    for n in (4, 8):
        _, out = model.encode(clips, [n] * len(clips))
        recon = [r.clamp(-1, 1) for r in model.decode_indices(out["indices"], [SETTINGS.grid] * len(clips))]
        assert table[n]["clips"] == len(clips) == 11
        assert table[n]["psnr"] == pytest.approx(sum(map(psnr, recon, clips)) / 11, rel=1e-9)
        assert table[n]["ssim"] == pytest.approx(sum(map(ssim, recon, clips)) / 11, rel=1e-9)
    same, _ = evaluate(engine, files, SETTINGS, [4, 8], workers=2, group=32)
    assert all(same[n] == pytest.approx(table[n], rel=1e-12) for n in (4, 8))
    with pytest.raises(pipeline.InputError, match=r"every input failed \(.*broken\.mp4: .*; and 1 more\)$"):
        evaluate(engine, [files[1], (sources["long"].with_name("gone.mp4"), "gone")], SETTINGS, [4], workers=1)


def test_eval_scores_only_the_real_frames_of_a_padded_last_clip(model, tmp_path, monkeypatch):
    """With tail="pad" a video's last clip repeats its last frame; those repeats are not the source's, so eval
    scores only the clip's real frames (as decode trims them from what it writes), and counts clips once, not
    once per token count. The source clip is scored clamped to [-1, 1], as the reconstruction is."""
    path = make_video(tmp_path / "tail.mp4", frames=15, height=32, width=32, fps=24)  # 1 whole clip + 1 of 1 frame
    t, h, w = SETTINGS.grid
    read = read_clips(path, frames=t, height=h, width=w, fps=SETTINGS.fps, tail="pad")
    assert len(read.clips) == 2 and 0 < read.last_clip_frames < t
    engine = Engine(model)
    table, summary = evaluate(engine, [(path, "tail")], SETTINGS, [4, 8], workers=1)
    real = [t, read.last_clip_frames]
    for n in (4, 8):
        _, out = model.encode(read.clips, [n, n])
        recon = [r.clamp(-1, 1) for r in model.decode_indices(out["indices"], [SETTINGS.grid] * 2)]
        expected = [psnr(r[:, :k], c[:, :k].clamp(-1, 1)) for r, c, k in zip(recon, read.clips, real, strict=True)]
        assert table[n]["psnr"] == pytest.approx(sum(expected) / 2, rel=1e-9)
        assert table[n]["psnr"] != pytest.approx(sum(map(psnr, recon, read.clips)) / 2, rel=1e-9)  # (not all 4)
    assert summary.clips == 2
    scored = []  # the parts of a file split across workers come interleaved: the last clip is the furthest one

    def interleaved(paths, **kwargs):
        feed = types.SimpleNamespace(reader=types.SimpleNamespace(last_clip_frames=read.last_clip_frames))
        events = [(0, "open", (paths[0], feed)), (0, "clip", (1, read.clips[1])), (0, "clip", (0, read.clips[0])),
                  (0, "end", None)]  # fmt: skip
        return (event for event in events)

    monkeypatch.setattr(pipeline, "interleaved_videos", interleaved)
    monkeypatch.setattr(pipeline, "psnr", lambda r, c: scored.append(c) or 0.0)
    evaluate(engine, [(path, "tail")], SETTINGS, [4], workers=1)
    targets = [pipeline.normalize_pixels(c, torch.float32).clamp(-1, 1) for c in read.clips]
    assert [c.shape[1] for c in scored] == [t, read.last_clip_frames]
    assert torch.equal(scored[0], targets[0]) and torch.equal(scored[1], targets[1][:, : read.last_clip_frames])


def test_an_exact_clip_does_not_make_eval_scores_infinite(model, tmp_path, monkeypatch):
    """An exact reconstruction has an infinite PSNR (a black clip, where the decoder's output is clamped to -1):
    it made the mean over every clip inf, and eval --json wrote Infinity, which JSON readers refuse. A clip scores
    at most PSNR_CAP_DB."""
    path = make_video(tmp_path / "clip.mp4", frames=15, height=32, width=32, fps=24)
    monkeypatch.setattr(pipeline, "psnr", lambda recon, source: math.inf)
    table, _ = evaluate(Engine(model), [(path, "clip")], SETTINGS, [4], workers=1)
    assert table[4]["psnr"] == pipeline.PSNR_CAP_DB


def test_a_decoded_video_records_a_precision_other_than_the_default(model, tmp_path):
    """FP8 decoding gives other pixels (36 dB from float32's, bf16 50): a video decoded in FP8 was taken for one
    decoded in the default precision, and the reverse. The default records nothing new: videos decoded before
    are still found complete."""
    engine = Engine(model)
    default = pipeline.decode_records(engine, False)(tmp_path)
    model.precision = "fp8"
    try:
        fp8 = pipeline.decode_records(engine, False)(tmp_path)
    finally:
        model.precision = "default"
    assert "precision" not in default and fp8 == {**default, "precision": "fp8"}


def test_decode_writes_chunk_by_chunk_and_only_complete_files(model, sources, tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    encode(model, [sources["long"], sources["odd"]], tokens)
    writes = []
    real_write = VideoWriter.write

    def write(self, frames):
        writes.append(tuple(frames.shape))
        real_write(self, frames)

    monkeypatch.setattr(VideoWriter, "write", write)
    engine = Engine(model, budgets=(256,), max_clips=2)
    paths = [tokens / "long.safetensors", tokens / "odd.safetensors"]
    summary = decode_files(engine, paths, tmp_path / "mp4", with_source=True)
    assert summary.done == [str(p) for p in paths] and not summary.failed
    assert writes == [(3, 4, 32, 64)] * (6 + 5)  # one chunk per write, source | reconstruction
    with av.open(str(tmp_path / "mp4" / "long.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 24

    real_stream = Engine.decode_stream

    def failing(self, items):
        for k, result in enumerate(real_stream(self, items)):
            if k == 3:
                raise RuntimeError("device fault")
            yield result

    monkeypatch.setattr(Engine, "decode_stream", failing)
    summary = decode_files(engine, paths[:1], tmp_path / "failed")
    assert summary.failed == [(str(paths[0]), "device fault")]
    assert list((tmp_path / "failed").iterdir()) == []  # neither a partial mp4 nor a temporary file

    monkeypatch.setattr(Engine, "decode_stream", real_stream)
    again = tmp_path / "again"
    again.mkdir()
    unique = "0123abcd" * 4  # (an AtomicFile's uuid)
    (again / f".long.mp4.{unique}.tmp").write_bytes(b"left by a killed run")
    (again / f".other.mp4.{unique}.tmp").write_bytes(b"another file's: kept")
    (again / ".long.mp4.notes.tmp").write_bytes(b"a user's file, named alike but for the id: kept")
    (again / ".long.mp4.beef.tmp").write_bytes(b"a user's file with a short hex part: kept")
    summary = decode_files(engine, [paths[0], str(paths[0])], again)  # the same file twice: decoded once
    assert summary.done == [str(paths[0])] and not summary.skipped
    assert sorted(p.name for p in again.iterdir()) == [
        ".long.mp4.beef.tmp", ".long.mp4.notes.tmp", f".other.mp4.{unique}.tmp", "long.mp4"]  # fmt: skip


def test_a_video_in_the_output_folder_whose_record_nests_deeply_is_decoded_over(model, sources, tmp_path):
    """An mp4 already in the output folder whose comment begins as decode's record and then nests deeply (anybody's
    dataset may ship its videos so) made json's parser raise RecursionError, caught nowhere: its token file failed
    with a line naming neither the mp4 nor what was wrong, --overwrite or not, and 32 such files stopped the run.
    A record that cannot be parsed is none: the video is decoded again over it."""
    tokens, out = tmp_path / "tokens", tmp_path / "mp4"
    encode(model, [sources["short"]], tokens)
    out.mkdir()
    with VideoWriter(out / "short.mp4", 8.0, comment=pipeline.DECODE_RECORD + "[" * 100_000) as writer:
        writer.write(torch.zeros(3, 4, 32, 32))
    token_file = tokens / "short.safetensors"
    summary = decode_files(Engine(model), [token_file], out)
    assert summary.done == [str(token_file)] and not summary.failed
    assert video_comment(out / "short.mp4").startswith(pipeline.DECODE_RECORD + "{")
    assert decode_files(Engine(model), [token_file], out).skipped == [str(token_file)]


def test_an_output_folder_that_is_a_link_leading_nowhere_fails_its_inputs_before_they_are_read(model, sources,
                                                                                               tmp_path):
    """An output sub-folder linked to a disk not mounted looked like a folder with nothing in it: its inputs were
    decoded and encoded in full, then failed with "File exists", at every rerun."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(tmp_path / "not-mounted" / "sub")
    elsewhere = out / "new" / "deeper" / "long"  # (a folder not there yet: made)
    files = [(sources["short"], "sub/short"), (sources["odd"], "odd"), (sources["black"], "sub/deeper/black"),
             (sources["long"], "new/deeper/long")]  # fmt: skip
    summary = encode_files(model, Engine(model), files, out, SETTINGS, workers=1)
    clips = sum(load_tokens(p).token_counts.numel() for p in (out / "odd.safetensors", f"{elsewhere}.safetensors"))
    assert summary.done == [str(sources["odd"]), str(sources["long"])] and summary.clips == clips  # (the others
    # not read: no clip of them)
    sub, gone = out / "sub", tmp_path / "not-mounted" / "sub"
    nowhere = f"{sub} is a link that leads nowhere ({gone})"
    deeper = sub / "deeper" / "black.safetensors"
    assert summary.failed == [(str(sources["short"]), f"cannot write {sub / 'short.safetensors'}: {nowhere}"),
                              (str(sources["black"]), f"cannot write {deeper}: {nowhere}")]


@pytest.mark.parametrize("given_as", ["its token file", "the manifest", "a temporary", "a token file set aside"])
def test_an_input_that_is_a_file_the_run_writes_is_refused_up_front(model, sources, tmp_path, given_as):
    """A video given as x.safetensors with -o its folder was replaced by its own tokens, one given as
    manifest.jsonl had manifest lines appended, one named as a temporary was removed as a killed run's left-over:
    such an input is refused before anything is written, moved or removed."""
    out = tmp_path / "out"
    out.mkdir()
    name = {"its token file": "x.safetensors", "the manifest": "manifest.jsonl",
            "a temporary": f".short.safetensors.{'ab' * 16}.tmp", "a token file set aside": "x.safetensors.outdated"}
    given = out / name[given_as]  # fmt: skip
    shutil.copy(sources["short"], given)
    before = given.read_bytes()
    with pytest.raises(pipeline.InputError, match="the run would write over, move or remove it"):
        encode(model, [sources["short"], given], out)
    assert given.read_bytes() == before and sorted(p.name for p in out.iterdir()) == [given.name]


def test_a_source_gone_fails_alone_and_leaves_its_token_file(model, sources, tmp_path):
    """A list naming a video deleted since its token file was made: the input fails alone ("no such file"), and
    its complete token file stays under its name (it was moved aside as if its source had changed)."""
    source = tmp_path / "short.mp4"
    shutil.copy(sources["short"], source)
    out = tmp_path / "out"
    encode(model, [source], out)
    tokens = (out / "short.safetensors").read_bytes()
    source.unlink()
    summary = encode(model, [source], out)
    assert [p for p, _ in summary.failed] == [str(source)] and not summary.replaced
    assert (out / "short.safetensors").read_bytes() == tokens and not list(out.glob("*.outdated*"))
    summary = encode(random_tokenizer("tiny", seed=1), [source], out)  # made by other weights: set aside on failing,
    assert [p for p, _ in summary.failed] == [str(source)]  # never left among this run's files
    assert not (out / "short.safetensors").exists() and (out / "short.safetensors.outdated").read_bytes() == tokens


def test_a_file_that_is_not_a_token_file_at_an_outputs_name_is_kept(model, sources, tmp_path):
    """A user's file (other weights, here) or a FIFO where a token file would go was replaced without a word but
    for a manifest field: the input fails alone, the file stays; --overwrite replaces a file (not a FIFO). A
    token file damaged since (cut short) is still made again."""
    from safetensors.torch import save_file

    out = tmp_path / "out"
    out.mkdir()
    save_file({"w": torch.zeros(3)}, out / "short.safetensors")
    before = (out / "short.safetensors").read_bytes()
    summary = encode(model, [sources["short"]], out)
    assert summary.failed == [(str(sources["short"]), f"{out / 'short.safetensors'} is there and is not a token "
                                                      "file: it is kept; move it away, or --overwrite replaces it")]
    assert (out / "short.safetensors").read_bytes() == before
    assert encode(model, [sources["short"]], out, overwrite=True).done == [str(sources["short"])]
    whole = (out / "short.safetensors").read_bytes()
    for cut in (len(whole) // 2, 20, 0):  # ours, cut short (into its header, to nothing): made again
        (out / "short.safetensors").write_bytes(whole[:cut])
        summary = encode(model, [sources["short"]], out)
        assert summary.done == [str(sources["short"])] and (out / "short.safetensors").read_bytes() == whole
    # shorter than a header's length: a note ("todo", "hi"), or ours cut into its length: nothing tells them apart,
    # so each is kept (ours is redone with --overwrite)
    for short in (b"todo\n", b"hi\n", whole[:5]):
        (out / "short.safetensors").write_bytes(short)
        failed = encode(model, [sources["short"]], out).failed
        assert failed[0][1].endswith("is there and is not a token file: it is kept; move it away, or --overwrite "
                                     "replaces it")
        assert (out / "short.safetensors").read_bytes() == short
    (out / "short.safetensors").unlink()
    os.mkfifo(out / "short.safetensors")
    summary = encode(model, [sources["short"]], out, overwrite=True)
    assert summary.failed == [(str(sources["short"]), f"{out / 'short.safetensors'} is a FIFO, not a token file: "
                                                      "move it away")]  # fmt: skip


def test_token_files_name_the_weights_that_made_them_after_the_weights_change(sources, tmp_path):
    """Loading other weights into a model: its next run's token files named the first weights, and a resume
    skipped the files those made. They now name the weights as they are, and the earlier files are redone."""
    from titok_fast.loading import weights_digest

    model = random_tokenizer("tiny", seed=0)
    first = encode(model, [sources["short"]], tmp_path)
    model.load_state_dict(random_tokenizer("tiny", seed=1).state_dict())
    again = encode(model, [sources["short"]], tmp_path)
    assert first.done == again.done == [str(sources["short"])] and again.replaced == 1
    recorded = load_tokens(tmp_path / "short.safetensors").weights_digest
    assert recorded == weights_digest(model.state_dict()) == model.weights_digest


def test_a_run_takes_what_its_token_files_say_of_the_model_once(model):
    """ModelFacts: the config, the weights' digest and their source, as the model names them when the run starts
    (the model works its digest out anew at each ask); a model whose weights have no digest is refused (token
    files must name their weights: encode_files names them first)."""
    from titok_fast.pipeline import ModelFacts

    facts = ModelFacts.of(model)
    assert (facts.config, facts.weights_digest, facts.weights_source) == (
        model.config, model.weights_digest, model.weights_source)  # fmt: skip
    unnamed = random_tokenizer("tiny", seed=0)
    unnamed.weights_digest = None
    with pytest.raises(ValueError, match="no digest"):
        ModelFacts.of(unnamed)


@pytest.mark.parametrize("other_model", ["other weights", "other fsq levels"])
def test_a_folder_of_token_files_of_two_models_is_finished_by_one_run_of_each(model, sources, tmp_path, other_model):
    """Each run loads one model: a video another run decoded with the model its token file records is complete,
    not a failure of this run (every rerun failed it again); --force still decodes it with this run's model. The
    same weights with other FSQ levels (which have no weights: the same digest) are another model too."""
    if other_model == "other weights":
        other = random_tokenizer("tiny", seed=1)
    else:
        config = model.config.to_dict()
        config["tokenizer"]["model"]["fsq_levels"] = list(reversed(model.config.fsq_levels))
        other = random_tokenizer(config, seed=0)
        assert other.weights_digest == model.weights_digest
    first, second = tmp_path / "a" / "short.safetensors", tmp_path / "b" / "short.safetensors"
    encode(model, [sources["short"]], first.parent)
    encode(other, [sources["short"]], second.parent)
    pairs, out = [(first, "a"), (second, "b")], tmp_path / "decoded"
    summary = decode_files(Engine(model), pairs, out)
    assert (summary.done, [p for p, _ in summary.failed]) == ([str(first)], [str(second)])
    summary = decode_files(Engine(other), pairs, out)
    assert (summary.done, summary.skipped, summary.failed) == ([str(second)], [str(first)], [])
    summary = decode_files(Engine(model), pairs, out)
    assert (summary.done, summary.skipped, summary.failed) == ([], [str(first), str(second)], [])
    assert decode_files(Engine(other), pairs, out, force=True).done == [str(first)]
    summary = decode_files(Engine(model), pairs, out)  # first's video is the other model's now: decoded again
    assert (summary.done, summary.skipped, summary.failed) == ([str(first)], [str(second)], [])


def test_decode_never_replaces_its_token_file_and_redoes_a_damaged_video(model, sources, tmp_path):
    """A token file named .mp4 (renamed by hand), decoded into its own folder, would be its own output: it fails
    alone, even with --overwrite, and is left as it was. An mp4 at an output name that cannot be read but begins
    as an MP4 does (a decoded video cut short since) is decoded again; a file of another kind there is kept."""
    folder = tmp_path / "tokens"
    encode(model, [sources["short"]], folder)
    renamed = folder / "short.mp4"
    (folder / "short.safetensors").rename(renamed)
    before, engine = renamed.read_bytes(), Engine(model)
    for overwrite in (False, True):
        summary = decode_files(engine, [renamed], folder, overwrite=overwrite)
        assert summary.failed == [(str(renamed), f"{renamed} is the token file itself: decoding there would replace "
                                                 "it; choose another output folder")]  # fmt: skip
        assert renamed.read_bytes() == before
    out = tmp_path / "decoded"
    assert decode_files(engine, [renamed], out).done == [str(renamed)]
    whole = (out / "short.mp4").read_bytes()
    (out / "short.mp4").write_bytes(whole[: len(whole) // 3])  # cut short: no longer opens as a video
    assert decode_files(engine, [renamed], out).done == [str(renamed)]
    assert (out / "short.mp4").read_bytes() == whole
    (out / "short.mp4").write_bytes(whole[:-100])  # cut in its index at the end: libav opens it, with no comment
    assert video_comment(out / "short.mp4") is None  # (what decode recorded is gone with the cut)
    assert decode_files(engine, [renamed], out).done == [str(renamed)]
    assert (out / "short.mp4").read_bytes() == whole
    (out / "short.mp4").write_bytes(b"not a video, a user's file of that name")
    assert decode_files(engine, [renamed], out).done == []  # kept
    assert (out / "short.mp4").read_bytes() == b"not a video, a user's file of that name"
    (out / "short.mp4").unlink()
    for make, kind in [(os.mkfifo, "a FIFO"), (os.mkdir, "a folder")]:  # kept, even with --overwrite: that file fails
        make(out / "short.mp4")
        summary = decode_files(engine, [renamed], out, overwrite=True)
        assert summary.failed == [(str(renamed), f"{out / 'short.mp4'} is {kind} (where its links lead), not a video: "
                                                 "kept; remove it or choose another output folder")]  # fmt: skip
        (os.rmdir if kind == "a folder" else os.unlink)(out / "short.mp4")
    source = tmp_path / "sources" / "short.mp4"  # a damaged source under the output's name: never replaced
    source.parent.mkdir()
    shutil.copy(sources["short"], source)
    encode(model, [source], tmp_path / "t2")
    damaged = source.read_bytes()[: source.stat().st_size // 3]  # (its index at the end: it no longer opens)
    source.write_bytes(damaged)
    summary = decode_files(engine, [tmp_path / "t2" / "short.safetensors"], source.parent)
    assert [p for p, _ in summary.failed] == [str(tmp_path / "t2" / "short.safetensors")]
    assert "is the source video of" in summary.failed[0][1] and source.read_bytes() == damaged


def test_decode_never_replaces_a_source_or_another_video_and_redoes_one_made_otherwise(model, sources, tmp_path,
                                                                                       capsys):  # fmt: skip
    """Token files written beside their sources, decoded into that folder, would name their own sources: never
    replaced, even with --overwrite; nor, in a copy of that folder, a video of the size its source had: with or
    without --overwrite, that file fails, saying so. An mp4 that records no decode (an earlier version's, or not
    decode's) is kept, and said, unless --overwrite. A video
    decode
    wrote is skipped when it records what it would write now, and decoded again when its token file was made again
    or it is decoded another way (the source beside it). A source changed since is not shown."""
    folder = tmp_path / "videos"
    folder.mkdir()
    source = folder / "short.mp4"
    shutil.copy(sources["short"], source)
    encode(model, [source], folder)
    tokens, before, engine = folder / "short.safetensors", source.read_bytes(), Engine(model)
    for overwrite in (False, True):  # (never said "kept": a rerun with --overwrite could not decode it either)
        summary = decode_files(engine, [tokens], folder, overwrite=overwrite)
        assert summary.failed == [(str(tokens), f"{source} is the source video of {tokens}: decoding there would "
                                                "replace it; choose another output folder")]  # fmt: skip
    assert source.read_bytes() == before
    copied = tmp_path / "copied"  # the folder copied (a new time, or kept: cp -a, rsync): its tokens name the first
    copied.mkdir()
    for f in (source, tokens):
        shutil.copy(f, copied)
    for overwrite in (False, True):
        summary = decode_files(engine, [copied / tokens.name], copied, overwrite=overwrite)
        assert summary.failed == [(str(copied / tokens.name), f"{copied / source.name} has the size of the source "
                                   f"video {copied / tokens.name} was made from (a copy of it): decoding there would "
                                   "replace it; choose another output folder")]  # fmt: skip
    assert (copied / source.name).read_bytes() == before
    out = tmp_path / "decoded"
    out.mkdir()
    shutil.copy(sources["long"], out / "short.mp4")  # another video under the output's name (or an earlier
    capsys.readouterr()  # version's decoding): kept, and said
    assert decode_files(engine, [tokens], out).skipped == []
    assert (out / "short.mp4").read_bytes() == sources["long"].read_bytes()
    said = capsys.readouterr().err
    assert "1 mp4 file(s) there record no decode (written by a version before" in said
    assert f"and were kept: {out / 'short.mp4'}; --overwrite decodes them again" in said
    assert decode_files(engine, [tokens], out, overwrite=True).done == [str(tokens)]
    assert decode_files(engine, [tokens], out).skipped == [str(tokens)]
    assert decode_files(engine, [tokens], out, with_source=True).done == [str(tokens)]  # now with the source
    assert decode_files(engine, [tokens], out, with_source=True).skipped == [str(tokens)]
    side_by_side_bytes = (out / "short.mp4").read_bytes()
    time.sleep(0.01)
    encode(model, [source], folder, overwrite=True)  # the token file made again
    assert decode_files(engine, [tokens], out, with_source=True).done == [str(tokens)]
    assert (out / "short.mp4").read_bytes() != side_by_side_bytes  # (its record names the new token file)
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the source is not the file it was
    assert decode_files(engine, [tokens], out, with_source=True, overwrite=True).failed == [(str(tokens), (
        f"the source {str(source)!r} the token file names is not the file its tokens were made from (its size and "
        "modification time differ, or it is not there)"))]  # fmt: skip
    again = out / "short.safetensors"  # a video decode wrote, encoded in turn, decoded over itself: never, and said
    encode(model, [out / "short.mp4"], out)  # so (not "--overwrite replaces it", which would fail the same)
    assert decode_files(engine, [again], out).failed == [(str(again), f"{out / 'short.mp4'} is the source video of "
                                                          f"{again}: decoding there would replace it; choose another "
                                                          "output folder")]  # fmt: skip


def test_decode_keeps_a_video_decoded_from_the_tokens_of_another_source(model, sources, tmp_path):
    """Two token folders with a file of one name each (train/clip, val/clip), decoded into one folder: the second
    replaced the first's video without a word (and a rerun of the first swapped it back), as its record named the
    token file by size and time only. It now fails alone, the video kept, unless --overwrite; the same source
    reached through a link is the same source, and a source gone since tells nothing (decoded again)."""
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    shutil.copy(sources["short"], tmp_path / "train" / "clip.mp4")
    shutil.copy(sources["long"], tmp_path / "val" / "clip.mp4")
    for split in ("train", "val"):
        encode(model, [tmp_path / split / "clip.mp4"], tmp_path / "tok" / split)
    engine, out = Engine(model), tmp_path / "recon"
    train, val = (tmp_path / "tok" / split / "clip.safetensors" for split in ("train", "val"))
    assert decode_files(engine, [train], out).done == [str(train)]
    first = (out / "clip.mp4").read_bytes()
    assert decode_files(engine, [val], out).failed == [(str(val), (
        f"{out / 'clip.mp4'} was decoded from the tokens of another video ({tmp_path / 'train' / 'clip.mp4'}): kept; "
        "--overwrite replaces it, or choose another output folder"))]  # fmt: skip
    assert (out / "clip.mp4").read_bytes() == first
    assert decode_files(engine, [train], out).skipped == [str(train)]
    assert decode_files(engine, [val], out, overwrite=True).done == [str(val)]
    assert decode_files(engine, [val], out).skipped == [str(val)]
    (tmp_path / "link").symlink_to(tmp_path / "val")
    time.sleep(0.01)
    encode(model, [tmp_path / "link" / "clip.mp4"], tmp_path / "tok" / "val", overwrite=True)  # made again
    assert decode_files(engine, [val], out).done == [str(val)]
    (tmp_path / "val").rename(tmp_path / "moved")  # the dataset moved, its tokens made again from there:
    time.sleep(0.01)  # nothing says the video recorded is another's (it is gone), so decoded again, as before
    encode(model, [tmp_path / "moved" / "clip.mp4"], tmp_path / "tok" / "val", overwrite=True)
    assert decode_files(engine, [val], out).done == [str(val)]


def test_a_resume_through_a_link_to_the_inputs_folder_skips_what_is_complete(model, sources, tmp_path):
    """The same source reached by another path (a link to its folder, as a cluster's /home may lead to its /gpfs)
    is the same source: its complete token file is kept, and no line says another video displaced it."""
    folder, link, out = tmp_path / "videos", tmp_path / "link", tmp_path / "tokens"
    folder.mkdir()
    shutil.copy(sources["short"], folder / "short.mp4")
    link.symlink_to(folder)
    assert encode(model, [folder / "short.mp4"], out).done
    summary = encode(model, [link / "short.mp4"], out)
    assert summary.skipped == [str(link / "short.mp4")] and not summary.done and not summary.replaced
    (tmp_path / "other").mkdir()
    shutil.copy(sources["short"], tmp_path / "other" / "short.mp4")  # a copy is another source
    assert encode(model, [tmp_path / "other" / "short.mp4"], out).replaced == 1


def test_encode_resiliently_raises_a_failure_that_no_clip_caused(model, monkeypatch):
    def broken(self, items, **options):
        raise RuntimeError("no device")
        yield

    monkeypatch.setattr(Engine, "encode_stream", broken)
    items = iter([("a", torch.zeros(3, 4, 32, 32), 8)])
    with pytest.raises(RuntimeError, match="no device"):
        list(encode_resiliently(Engine(model), items, lambda key, e: None))


def test_encode_resiliently_does_not_mistake_an_items_error_for_a_batch_failure(model):
    def items():
        yield "a", torch.zeros(3, 4, 32, 32), 8
        raise RuntimeError("cannot allocate memory")  # from the clip source, not the engine

    with pytest.raises(RuntimeError, match="cannot allocate memory"):
        list(encode_resiliently(Engine(model, max_clips=1), items(), lambda key, e: None))


@pytest.mark.parametrize(
    ("fault", "give_up_after", "raised", "blamed"),
    [
        ("device fault", 3, "giving up after 3 clip.s. in a row failed alone: device fault", [0, 1]),
        ("CUDA error: an illegal memory access", 32, "CUDA error: an illegal memory access", []),  # not retried
    ],
    ids=["every-clip-fails", "device-error"],
)
def test_encode_resiliently_gives_up_on_a_fault_no_clip_explains(model, monkeypatch, fault, give_up_after, raised,
                                                                 blamed):  # fmt: skip
    def run_encode(self, batch, videos):
        raise RuntimeError(fault)

    monkeypatch.setattr(Engine, "_run_encode", run_encode)
    errors = []
    items = ((i, torch.zeros(3, 4, 32, 32), 8) for i in range(20))
    with pytest.raises(RuntimeError, match=f"^{raised}$"):
        list(encode_resiliently(Engine(model, max_clips=4), items, lambda key, e: errors.append(key),
                                give_up_after=give_up_after))  # fmt: skip
    assert errors == blamed


def breaks_at_clip(monkeypatch, count: int) -> None:
    """The run's source of clips (the files' interleaver, on the run's thread) raises "cannot allocate memory" as
    it gives its ``count``-th clip: no file's fault."""
    from titok_fast import video

    real, clips = video.FeedInterleaver._next_ready, []

    def flaky(self):
        event = real(self)
        if event is not None and event[1] == "clip":
            clips.append(1)
            if len(clips) == count:
                raise RuntimeError("cannot allocate memory")
        return event

    monkeypatch.setattr(video.FeedInterleaver, "_next_ready", flaky)


def test_encode_files_stops_loudly_when_the_clip_source_breaks(model, sources, tmp_path, monkeypatch):
    breaks_at_clip(monkeypatch, 6)  # the first file's clip is back by then
    with pytest.raises(RuntimeError, match="cannot allocate memory"):
        encode(model, [sources["short"], sources["odd"], sources["long"]], tmp_path, max_clips=1)
    assert (tmp_path / "short.safetensors").exists()  # what was finished before stays


def test_worker_processes_give_the_tokens_of_threads(model, sources, tmp_path, monkeypatch):
    """Threads and processes give the same tokens and failures; "auto" (the default) decodes in threads below
    PROCESS_WORKERS_FROM workers and in processes from there on (here lowered to 2, to start only two)."""
    from titok_fast import video

    started = []

    class Counted(video._DecoderProcess):
        def __init__(self, *args, **kwargs):
            started.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(video, "_DecoderProcess", Counted)
    files = [sources["long"], sources["broken"], sources["odd"]]
    threads = encode(model, files, tmp_path / "threads", workers=2)  # (auto, below the default 8 workers)
    assert not started
    monkeypatch.setattr(video, "PROCESS_WORKERS_FROM", 2)
    processes = encode(model, files, tmp_path / "processes", workers=2)
    assert len(started) == 2
    assert processes.done == threads.done == [str(sources["long"]), str(sources["odd"])]
    assert processes.failed == threads.failed and [p for p, _ in processes.failed] == [str(sources["broken"])]
    for path in (sources["long"], sources["odd"]):
        a, b = (load_tokens(tmp_path / run / f"{path.stem}.safetensors") for run in ("threads", "processes"))
        assert torch.equal(a.indices, b.indices) and torch.equal(a.start_times, b.start_times)


def test_a_long_file_split_across_workers_gets_the_tokens_of_one_read(model, sources, tmp_path, monkeypatch):
    """A file split into segments decoded at once gives its clips in any order: its token file holds each
    clip's tokens in its place, with the start times and tail of the whole file, as one read makes it."""
    from titok_fast import video

    long = make_video(tmp_path / "split.mp4", frames=225, height=40, width=48, fps=24,
                      x264="keyint=24:min-keyint=24:scenecut=0")  # 18 clips and a padded one; an IDR every second
    monkeypatch.setattr(video, "SEGMENT_CLIPS", 4)
    splits, split = [], video.ClipFeed.split
    monkeypatch.setattr(video.ClipFeed, "split", lambda feed, parts: splits.append(parts) or split(feed, parts))
    files = [sources["short"], long]  # the last file: split 3 ways
    summary = encode(model, files, tmp_path / "out", workers=3, read_ahead=1, max_clips=4)
    assert summary.done == [str(p) for p in files] and summary.clips == 20
    assert [[s.first for s in segments] for segments in splits] == [[6, 12]]
    stored = load_tokens(tmp_path / "out" / "split.safetensors")
    expected = direct_indices(model, long)
    assert len(expected) == 19 and all(torch.equal(a.long(), b) for a, b in zip(stored.all_indices(), expected,
                                                                               strict=True))  # fmt: skip
    t, h, w = SETTINGS.grid
    whole = read_clips(long, frames=t, height=h, width=w, fps=SETTINGS.fps, tail=SETTINGS.tail)
    assert stored.start_times.tolist() == whole.start_times and stored.last_chunk_frames == whole.last_clip_frames < t


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_clips_per_video_encodes_the_first_clips_split_or_not_and_resumes_what_it_can_keep(model, sources, kind,
                                                                                           tmp_path, monkeypatch):
    """``clips_per_video`` K: each token file holds the tokens of its video's first K clips, those of a run
    without it, read whole or split across threads (the parts sharing those K clips) or read by worker processes,
    and records K. A resume keeps a file whose video had fewer clips than both the limit it was made with and the one
    asked for now, and redoes one the limit cut (or would cut), saying why."""
    from titok_fast import video

    long = make_video(tmp_path / "split.mp4", frames=225, height=40, width=48, fps=24,
                      x264="keyint=24:min-keyint=24:scenecut=0")  # 18 clips and a padded one; an IDR every second
    monkeypatch.setattr(video, "SEGMENT_CLIPS", 4)
    splits, split = [], video.ClipFeed.split
    monkeypatch.setattr(video.ClipFeed, "split", lambda feed, parts: splits.append(parts) or split(feed, parts))
    files = [(sources["short"], "short"), (long, "long")]  # 1 clip; 19
    engine = Engine(model, max_clips=4)

    def run(limit, **kwargs):
        settings = dataclasses.replace(SETTINGS, clips_per_video=limit)
        return encode_files(model, engine, files, tmp_path / "out", settings, workers=3, worker_kind=kind,
                            read_ahead=1, **kwargs)  # fmt: skip

    summary = run(10)
    assert sorted(summary.done) == sorted(str(path) for path, _ in files) and summary.clips == 11
    assert [[s.first for s in segments] for segments in splits] == ([[5]] if kind == "thread" else [])  # (10 clips:
    # two parts of 4 or more; a worker process splits by its own SEGMENT_CLIPS, unpatched, 16)
    stored = load_tokens(tmp_path / "out" / "long.safetensors")
    expected = direct_indices(model, long)
    assert len(expected) == 19 and len(stored.all_indices()) == 10
    assert all(torch.equal(a.long(), b) for a, b in zip(stored.all_indices(), expected[:10], strict=False))
    assert stored.last_chunk_frames == SETTINGS.grid[0] and stored.made_with["clips_per_video"] == "10"
    short = load_tokens(tmp_path / "out" / "short.safetensors")
    assert torch.equal(short.indices.long(), torch.cat(direct_indices(model, sources["short"])))
    assert run(10).skipped and run(1).skipped == [str(sources["short"])]  # 1 clip < 10 and <= 1: kept
    assert load_tokens(tmp_path / "out" / "long.safetensors").token_counts.numel() == 1  # (cut at 1: redone)
    again = run(None)  # no limit: the short one (1 clip, made with limit 10 then kept) is kept; the long one redone
    assert again.skipped == [str(sources["short"])] and again.done == [str(long)]
    assert "clips_per_video" not in load_tokens(tmp_path / "out" / "long.safetensors").made_with
    wanted = pipeline._wanted(model, engine.mode, dataclasses.replace(SETTINGS, clips_per_video=18))
    assert pipeline._redo_because(tmp_path / "out" / "long.safetensors", long, wanted) == (
        "made another way (clips_per_video all, now 18)"
    )
    wanted = pipeline._wanted(model, engine.mode, dataclasses.replace(SETTINGS, clips_per_video=19))
    assert pipeline._redo_because(tmp_path / "out" / "long.safetensors", long, wanted) == ""  # (19 clips in all)


def test_preprocessing_on_the_device_gives_the_same_tokens_and_says_so(model, sources, tmp_path):
    files = [(sources["long"], "long"), (sources["odd"], "odd")]
    engine = Engine(model, max_clips=3)
    for where in ("cpu", "device"):
        settings = ClipSettings(grid=(4, 32, 32), tokens=8, fps=8.0, tail="pad", preprocess=where)
        assert not encode_files(model, engine, files, tmp_path / where, settings, workers=1).failed
    for _, name in files:
        a, b = (load_tokens(tmp_path / where / f"{name}.safetensors") for where in ("cpu", "device"))
        assert torch.equal(a.indices, b.indices)
        assert (a.made_with["preprocessed_on"], b.made_with["preprocessed_on"]) == ("cpu", "device")
        assert b.made_with.pop("source_stamp")  # the source's size and mtime, as it was opened
        assert b.made_with.pop("made_by") == f"titok-fast {__version__}"
        assert b.made_with.pop("reader") == READER  # the reader's latest fix, for the record
        assert b.made_with == {
            "decoder": "cpu", "decoded_by": "cpu", "preprocess": "device", "preprocessed_on": "device",
            "device": "cpu", "dtype": "float32", "backend": "torch", "mode": "auto",
        }  # fmt: skip


def test_resume_redoes_files_made_another_way_and_loads_files_without_provenance(model, sources, tmp_path):
    files = [(sources["short"], "short")]
    engine = Engine(model, max_clips=3)
    out = tmp_path / "short.safetensors"

    def run(**changes):
        settings = ClipSettings(grid=(4, 32, 32), tokens=8, fps=8.0, tail="pad", **changes)
        return encode_files(model, engine, files, tmp_path, settings, workers=1)

    assert run().done and run().skipped  # made the same way: kept
    for mode, preprocess in (("eager", "auto"), ("auto", "cpu"), ("eager", "cpu")):  # what "auto" runs on a CPU
        wanted = pipeline._wanted(model, mode, dataclasses.replace(SETTINGS, preprocess=preprocess))
        assert pipeline._redo_because(out, sources["short"], wanted) == ""
    assert pipeline._as_run({"device": "cuda", "mode": "auto", "preprocess": "auto"})["mode"] == "auto"  # (picks)
    assert run(preprocess="device").done  # another placement asked for: redone, and says so
    assert load_tokens(out).made_with["preprocess"] == "device"
    assert run(preprocess="device").skipped
    mode, engine.mode = engine.mode, "cudagraph"  # another mode (only the key is read: nothing is encoded in it)
    on_device = dataclasses.replace(SETTINGS, preprocess="device")
    assert pipeline._redo_because(out, sources["short"], pipeline._wanted(model, engine.mode, on_device)) == (
        "made another way (mode auto, now cudagraph)"
    )
    engine.mode = mode
    assert pipeline._redo_because(out, sources["short"], pipeline._wanted(model, engine.mode, on_device)) == ""
    # a file of the current format written without the new fields, as the code before them wrote it
    old = load_tokens(out)
    pipeline.save_tokens(out, dataclasses.replace(old, made_with={}))
    header = json.loads(safe_open(str(out), framework="pt").metadata()["titok_fast"])
    assert "made_with" not in header and header["version"] == 1
    assert load_tokens(out).made_with == {} and torch.equal(load_tokens(out).indices, old.indices)
    assert run(preprocess="device").done  # loads, but cannot say how it was made: redone, never mixed


def test_a_resume_says_how_many_kept_token_files_an_earlier_reader_made(model, sources, tmp_path, capsys):
    """A reader's fix (damage concealed otherwise, a file cut short failed, a chunk's picks) gives some files other
    clips; it is not part of the resume key, which would redo every file of every dataset. A resume keeps the files
    an earlier reader made (or that record none) and says how many, once, with what redoes them; files this
    reader made, or a later one, say nothing."""
    files = [(sources["short"], "short"), (sources["odd"], "odd")]
    settings = ClipSettings(grid=(4, 32, 32), tokens=8, fps=8.0, tail="pad")

    def run():
        return encode_files(model, Engine(model, max_clips=3), files, tmp_path, settings, workers=1)

    assert len(run().done) == 2
    notice = "made by a reader earlier than this version's"
    assert len(run().skipped) == 2 and notice not in capsys.readouterr().err
    before = {name: load_tokens(tmp_path / f"{name}.safetensors") for _, name in files}
    for readers, said in (((None, "2026-12-02"), 2), ((READER, "2999-01-01"), 0), ((None, "9999"), 1)):
        for (name, old), reader in zip(before.items(), readers, strict=True):
            made = {k: v for k, v in old.made_with.items() if k != "reader"} | ({"reader": reader} if reader else {})
            pipeline.save_tokens(tmp_path / f"{name}.safetensors", dataclasses.replace(old, made_with=made))
        summary, err = run(), capsys.readouterr().err
        assert len(summary.skipped) == 2 and not summary.done  # kept
        assert (f"{said} token file(s) kept (such as " in err) == (said > 0) and err.count(notice) == (said > 0)
        assert not said or f"({READER}), whose fixes since" in err and "--overwrite redoes the files it is given" in err
    # a file set aside (its input failed a redo) and put back as made as wanted is a file kept, and counted
    (tmp_path / "short.safetensors").rename(tmp_path / "short.safetensors.outdated")
    summary, err = run(), capsys.readouterr().err
    assert len(summary.skipped) == 2 and "put back from short.safetensors.outdated" in err
    assert "1 token file(s) kept (such as " in err and err.count(notice) == 1


def test_a_resume_redoes_a_token_file_damaged_since_it_was_written(model, sources, tmp_path):
    """A token that became another valid token passes every check of a value: the digest the file records tells,
    so a resume redoes the file (saying why) instead of keeping wrong tokens as complete."""
    from titok_fast.manifest import read_manifest

    engine, out = Engine(model, max_clips=3), tmp_path / "long.safetensors"

    def run():
        return encode_files(model, engine, [(sources["long"], "long")], tmp_path, SETTINGS, workers=1)

    assert run().done
    made = out.read_bytes()
    header = int.from_bytes(made[:8], "little")
    start = 8 + header + json.loads(made[8 : 8 + header])["indices"]["data_offsets"][0]
    token = int.from_bytes(made[start : start + 2], "little")
    damaged = bytearray(made)
    damaged[start : start + 2] = (token ^ 1).to_bytes(2, "little")  # (another code, as the assert checks)
    out.write_bytes(damaged)
    assert token ^ 1 < model.quantize.codebook_size and run().done and out.read_bytes() == made
    assert read_manifest(tmp_path)[-1]["replaced"] == "not readable as a complete token file"
    assert run().skipped


def test_a_resume_redoes_files_made_with_another_tail_token_count_or_sampling(model, tmp_path):
    """Each clip setting a token file records is part of the resume key: a file made with ``--tail drop`` is redone
    under ``pad`` (its last partial clip was never encoded), and so for another token count or sampling."""
    from titok_fast.manifest import read_manifest

    source = make_video(tmp_path / "v.mp4", frames=14, height=32, width=32, fps=24)  # 12 frames a clip: 1 and a bit
    engine, out = Engine(model, max_clips=3), tmp_path / "out"
    made = out / "v.safetensors"

    def run(settings, chunks: int, replaced: str):
        summary = encode_files(model, engine, [(source, "v")], out, settings, workers=1)
        assert summary.done and len(load_tokens(made).grids) == chunks
        assert read_manifest(out, latest=True)[0].get("replaced") == replaced
        assert encode_files(model, engine, [(source, "v")], out, settings, workers=1).skipped  # and made as asked

    drop = dataclasses.replace(SETTINGS, tail="drop")
    run(drop, 1, None)
    run(SETTINGS, 2, "made another way (tail drop, now pad)")
    run(dataclasses.replace(SETTINGS, tokens=16), 2, "made another way (tokens 8, now 16)")
    run(dataclasses.replace(SETTINGS, tokens=16, sampling="time"), 2,
        "made another way (time_sampling unrecorded, now ms-stamps; sampling upstream, now time)")  # fmt: skip


def a_recorded_rule_is_kept_apart(model, source: str, folder: Path, settings, key: str, value: str):
    """Files made with ``settings`` record ``made_with[key] == value`` and resume; files made with SETTINGS record
    no ``key``; a file without it (as the code before the rule wrote it) is redone. Returns that file as made, and
    the reason its changed copy is redone for a given ``made_with``."""
    engine, out = Engine(model, max_clips=3), folder / "short.safetensors"

    def run(settings):
        return encode_files(model, engine, [(source, "short")], folder, settings, workers=1)

    assert run(SETTINGS).done and key not in load_tokens(out).made_with
    assert run(settings).done and load_tokens(out).made_with[key] == value
    assert run(settings).skipped
    made = load_tokens(out)

    def redone_because(made_with: dict) -> str:
        pipeline.save_tokens(out, dataclasses.replace(made, made_with=made_with))
        return pipeline._redo_because(out, source, pipeline._wanted(model, engine.mode, settings))

    unrecorded = {k: v for k, v in made.made_with.items() if k != key}
    assert redone_because(unrecorded) == f"made another way ({key} unrecorded, now {value})"
    assert run(settings).done and load_tokens(out).made_with[key] == value
    return made, redone_because


def test_time_sampled_files_record_their_timestamp_rule_and_files_made_before_it_are_redone(model, sources, tmp_path):
    """Sampling "time" takes a frame stamped up to half a millisecond after an instant as shown there (video._due);
    files it made before that rule was recorded may hold other picks, so a rerun redoes them. Upstream sampling
    records nothing new: its files resume as before."""
    timed = dataclasses.replace(SETTINGS, sampling="time")
    old, redone_because = a_recorded_rule_is_kept_apart(model, sources["short"], tmp_path, timed, "time_sampling",
                                                        "ms-stamps")  # fmt: skip
    exact = {**old.made_with, "time_sampling": "exact"}
    assert redone_because(exact) == "made another way (time_sampling exact, now ms-stamps)"
    with pytest.raises(ValueError, match="made by an earlier rule of sampling 'time': its source cannot be re-read"):
        next(pipeline.source_chunks(load_tokens(tmp_path / "short.safetensors")))  # it would show other frames
    assert len(list(pipeline.source_chunks(old))) == len(old.grids)  # made with the rule: re-read as encoded
    # the rule before (a finer clock's whole-millisecond stamps had half a tick of slack, not half a millisecond)
    # picks the same frames where the output frames fall on whole milliseconds: kept at 8 fps, redone at 12
    assert redone_because({**old.made_with, "time_sampling": "ms-rounding"}) == ""
    assert len(list(pipeline.source_chunks(load_tokens(tmp_path / "short.safetensors")))) == len(old.grids)
    at_12 = dataclasses.replace(timed, fps=12.0)
    made_at_12 = dataclasses.replace(old, fps=12.0, made_with={**old.made_with, "time_sampling": "ms-rounding"})
    pipeline.save_tokens(tmp_path / "short.safetensors", made_at_12)
    wanted = pipeline._wanted(model, old.made_with["mode"], at_12)
    assert pipeline._redo_because(tmp_path / "short.safetensors", sources["short"], wanted) == (
        "made another way (time_sampling ms-rounding, now ms-stamps)")  # fmt: skip
    with pytest.raises(ValueError, match="made by an earlier rule of sampling 'time'"):
        next(pipeline.source_chunks(made_at_12))


def test_the_source_of_a_file_whose_reader_picked_other_frames_is_not_shown_beside_it(model, tmp_path):
    """Before 2026-12-05 (video.PICKS_FIXED) a chunk's picks were the first chunk's moved by c * L; for some T and L
    they are other frames (36 frames of chunks of 86: the 22nd pick of chunk 1, 136 against 137), and a resume keeps
    such files. decode --side-by-side showed the new rule's frames beside their tokens; it now refuses where the
    rules differ for the file, and shows the source where they agree (T = 4 of 12 frames)."""
    source = make_video(tmp_path / "v.mp4", frames=180, height=32, width=32, fps=24)
    engine = Engine(model)
    for grid, fps, differ in (((36, 32, 32), 10.0, True), ((4, 32, 32), 8.0, False)):
        settings = dataclasses.replace(SETTINGS, grid=grid, fps=fps, tail="drop")
        assert encode_files(model, engine, [(source, "v")], tmp_path / "t", settings, overwrite=True).done
        made = load_tokens(tmp_path / "t" / "v.safetensors")
        length = video.chunk_length(grid[0], made.source_fps, fps)
        assert video.earlier_picks_differ(len(made.grids), grid[0], length) == differ
        shown = len(list(pipeline.source_chunks(made)))
        for reader in ("2026-12-04", None):  # (None: made before readers were recorded)
            kept = {k: v for k, v in made.made_with.items() if k != "reader"}
            older = dataclasses.replace(made, made_with={**kept, **({"reader": reader} if reader else {})})
            if differ:
                with pytest.raises(ValueError, match="made by a reader before 2026-12-05, which picked other frames"):
                    next(pipeline.source_chunks(older))
            else:
                assert len(list(pipeline.source_chunks(older))) == shown == len(made.grids)
        assert len(list(pipeline.source_chunks(dataclasses.replace(made, made_with={**made.made_with, "reader":
                                                                                    video.PICKS_FIXED})))) == shown
    # a padded last chunk: only its real frames' picks count (126 frames: chunk 1 holds 17, and pick 21 differs)
    assert video.earlier_picks_differ(2, 36, 86) and video.earlier_picks_differ(2, 36, 86, 22)
    assert not video.earlier_picks_differ(2, 36, 86, 17) and not video.earlier_picks_differ(1, 36, 86)
    short = make_video(tmp_path / "short.mp4", frames=126, height=32, width=32, fps=24)
    settings = dataclasses.replace(SETTINGS, grid=(36, 32, 32), fps=10.0, tail="pad")
    assert encode_files(model, engine, [(short, "short")], tmp_path / "t", settings).done
    made = load_tokens(tmp_path / "t" / "short.safetensors")
    assert made.last_chunk_frames == 17 and len(made.grids) == 2
    older = dataclasses.replace(made, made_with={**made.made_with, "reader": "2026-12-04"})
    assert len(list(pipeline.source_chunks(older))) == 2


def test_nvdec_files_record_their_rgb_conversion_and_files_made_before_it_are_redone(model, sources, tmp_path,
                                                                                     monkeypatch):
    """--decoder nvdec's frames become RGB by libswscale's arithmetic since that was recorded (nvdec_rgb); files
    that the float conversion of before made hold other tokens, so a rerun redoes them. The CPU decoder's files
    record nothing new. (No GPU here: the run is told NVDEC is here, each file falls back to the CPU alone, and
    records what was asked for.)"""
    monkeypatch.setattr(pipeline, "nvdec_unavailable", lambda: None)
    nvdec = dataclasses.replace(SETTINGS, decoder="nvdec")
    a_recorded_rule_is_kept_apart(model, sources["short"], tmp_path, nvdec, "nvdec_rgb", "libswscale")


def test_a_run_without_nvdec_records_the_cpu_decoder_and_a_run_with_it_redoes_its_files(model, sources, tmp_path,
                                                                                        monkeypatch, capsys):
    """--decoder nvdec where NVDEC cannot decode anything (no CUDA device here) is the CPU decoder: said once for
    the run, not once a file, and recorded as "cpu", so that a later run that has NVDEC does not keep those files
    beside its own (they recorded "nvdec", and were kept)."""
    nvdec = dataclasses.replace(SETTINGS, decoder="nvdec")
    inputs = [(sources["short"], "short"), (sources["long"], "long")]

    def run():
        return encode_files(model, Engine(model, max_clips=3), inputs, tmp_path, nvdec, workers=1)

    capsys.readouterr()
    assert len(run().done) == 2
    assert capsys.readouterr().err.count("NVDEC cannot decode here (no CUDA device)") == 1
    assert {load_tokens(tmp_path / f"{name}.safetensors").made_with["decoder"] for _, name in inputs} == {"cpu"}
    assert len(run().skipped) == 2  # still none here: made as asked
    monkeypatch.setattr(pipeline, "nvdec_unavailable", lambda: None)  # (NVDEC here: each file falls back alone)
    summary = run()
    assert len(summary.done) == 2 and summary.replaced == 2
    assert load_tokens(tmp_path / "short.safetensors").made_with["decoder"] == "nvdec"


def test_the_same_weights_with_other_fsq_levels_are_another_model(model, sources, tmp_path):
    """FSQ levels have no weights: a config with the levels reordered has the same weights digest and reads other
    codes from the same indices. A rerun with it redoes the files, and decode refuses them (unless forced)."""
    config = model.config.to_dict()
    levels = list(reversed(model.config.fsq_levels))
    config["tokenizer"]["model"]["fsq_levels"] = levels
    other = random_tokenizer(config, seed=0)
    assert other.weights_digest == model.weights_digest and levels != list(model.config.fsq_levels)
    out, short = tmp_path / "short.safetensors", [(sources["short"], "short")]

    def run(m):
        return encode_files(m, Engine(m, max_clips=3), short, tmp_path, SETTINGS, workers=1)

    assert run(model).done
    assert pipeline._redo_because(out, sources["short"], pipeline._wanted(other, "auto", SETTINGS)) == (
        f"made by another model (fsq_levels {list(model.config.fsq_levels)}, now {levels})"
    )
    summary = decode_files(Engine(other), [out], tmp_path / "mp4")
    assert summary.failed == [(str(out), f"{out}: made by another model config than the loaded one (fsq_levels "
                               f"{list(model.config.fsq_levels)}, now {levels}); decode it with its --config beside "
                               "--checkpoint or --random-weights, or --force to decode anyway")]  # fmt: skip
    assert decode_files(Engine(other), [out], tmp_path / "mp4", force=True).done
    assert run(other).done and load_tokens(out).model_config == config  # redone
    assert run(other).skipped
    unreadable = dataclasses.replace(load_tokens(out), model_config={"tokenizer": {}})
    pipeline.save_tokens(out, unreadable)
    assert pipeline._redo_because(out, sources["short"], pipeline._wanted(other, "auto", SETTINGS)).startswith(
        "made by another model (its model config cannot be read: "
    )


def test_decode_checks_every_chunks_grid_before_it_decodes_or_reads_the_source(model, sources, tmp_path, monkeypatch):
    """A token file of a few bytes may ask for any grid: a grid the engine would refuse, or chunks of other frame
    sizes than each other (one mp4 cannot hold them), are refused for the whole file before the source is read at
    that size (side by side) or a chunk is decoded."""
    encode(model, [sources["long"]], tmp_path)
    good = load_tokens(tmp_path / "long.safetensors")
    engine = Engine(model, budgets=(1024,))
    for grid in ((4, 12000, 12000), (4, 4096, 4096)):  # past what any model takes: no such token file is written
        with pytest.raises(TokenFileError, match=rf"^chunk 0 has grid \[4, {grid[1]}, {grid[2]}\]; a clip is at most"):
            pipeline.save_tokens(tmp_path / "x.safetensors", dataclasses.replace(good, grids=good.grids.clone().copy_(
                torch.tensor(grid))))  # (nor loaded: tests/test_tokens.py)
    cases = {
        "ragged": ((4, 30, 32), r"chunk 0 of .*ragged\.safetensors is \[4, 30, 32\]; H must be a positive multiple"),
        "rows": ((4, 256, 256), r"chunk 0 of .*rows\.safetensors \(grid \[4, 256, 256\], 8 tokens\) needs 1032 "
                                r"packed rows \(tokens \+ patches\); the largest budget is 1024$"),
        "mixed": ((4, 64, 64), r"chunk 3 of .*mixed\.safetensors has grid \[4, 64, 64\], chunk 0 \[4, 32, 32\]: the "
                               r"chunks of a token file decoded into one video share one frame size \(H x W\)$"),
    }  # fmt: skip
    paths = []
    for name, (grid, _) in cases.items():
        grids = good.grids.clone()
        grids[3 if name == "mixed" else slice(None)] = torch.tensor(grid)  # (a chunk alone: "mixed" sizes)
        paths.append(tmp_path / f"{name}.safetensors")
        pipeline.save_tokens(paths[-1], dataclasses.replace(good, grids=grids))

    def no_source(token_file):
        raise AssertionError("the source was read")

    monkeypatch.setattr(pipeline, "source_chunks", no_source)
    summary = decode_files(engine, paths, tmp_path / "mp4", with_source=True)
    assert [path for path, _ in summary.failed] == [str(p) for p in paths]
    for (_, error), (_, pattern) in zip(summary.failed, cases.values(), strict=True):
        assert re.search(pattern, error), error
    assert not (tmp_path / "mp4").exists() or not list((tmp_path / "mp4").iterdir())


def test_a_token_file_sampled_slower_than_an_mp4_is_written_decodes_at_the_slowest_rate(model, sources, tmp_path):
    """``encode --fps 1e-9`` is allowed (fps in (0, 1000]), so decode writes such a file's frames at
    MIN_WRITE_FPS, the slowest rate an mp4 takes, rather than failing it."""
    from titok_fast.writing import MIN_WRITE_FPS

    encode(model, [sources["short"]], tmp_path)
    slow = tmp_path / "slow.safetensors"
    made = load_tokens(tmp_path / "short.safetensors")
    pipeline.save_tokens(slow, dataclasses.replace(made, fps=1e-9, chunk_seconds=SETTINGS.grid[0] / 1e-9))
    assert decode_files(Engine(model), [slow], tmp_path / "mp4").done == [str(slow)]
    with av.open(str(tmp_path / "mp4" / "slow.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == Fraction(MIN_WRITE_FPS).limit_denominator(10**4)
        assert sum(1 for _ in container.decode(stream)) == SETTINGS.grid[0]


def test_a_decoded_video_keeps_to_its_sources_time(model, tmp_path):
    """Upstream's sampling spans int(T x source fps / fps) source frames a chunk (14 of a 29.97 fps source for 4
    frames at 8 fps: 0.467 s, not 0.5); written at 8 fps, the decoded video drifted from its source by 7% here
    (1.2% at 20 frames). Each chunk's first frame now shows at its start time in the source."""
    source = make_video(tmp_path / "ntsc.mp4", frames=75, height=32, width=32, fps=30000 / 1001)
    encode(model, [source], tmp_path / "tok")
    token_file = load_tokens(tmp_path / "tok" / "ntsc.safetensors")
    starts = (token_file.start_times - token_file.start_times[0]).tolist()
    assert len(starts) >= 4 and starts[1] == pytest.approx(14 * 1001 / 30000)
    assert decode_files(Engine(model), [tmp_path / "tok" / "ntsc.safetensors"], tmp_path / "mp4").done
    with av.open(str(tmp_path / "mp4" / "ntsc.mp4")) as container:
        times = [float(frame.pts * frame.time_base) for frame in container.decode(video=0)]
    first = [times[k * SETTINGS.grid[0]] - times[0] for k in range(len(starts))]
    assert first == pytest.approx(starts, abs=1e-3)
    assert token_file.chunk_seconds == pytest.approx(14 * 1001 / 30000)


@pytest.mark.parametrize("workers", [(1, "thread"), (2, "process")])
def test_a_token_file_says_which_source_frames_each_chunk_is(model, tmp_path, workers):
    """A trainer lines tokens up with the source (captions, audio, frames taken again): the file records the
    source's rate, and source_frames() gives each chunk's picks, here those of frames that show their own number.
    13 source frames a chunk (4 at 7 fps from 24), the last chunk padded after 3 real frames."""
    source = make_video(tmp_path / "index.mp4", frames=48, height=32, width=32, fps=24, pattern="index")
    settings = ClipSettings(grid=(4, 32, 32), tokens=8, fps=7.0, tail="pad")
    count, kind = workers
    encode_files(model, Engine(model), [(source, "index")], tmp_path / "tok", settings, workers=count,
                 worker_kind=kind)  # fmt: skip
    token_file = load_tokens(tmp_path / "tok" / "index.safetensors")
    assert token_file.source_fps == 24 and token_file.last_chunk_frames == 3
    picks = token_file.source_frames()
    assert picks.tolist() == [[0, 4, 8, 12], [13, 17, 21, 25], [26, 30, 34, 38], [39, 43, 47, 47]]  # (48 frames:
    # the padded frame is the last real one again)
    read = read_clips(str(source), frames=4, height=32, width=32, fps=7.0, tail="pad")
    shown = [level_to_index((frame.mean().item() + 1) * 127.5) for clip in read.clips for frame in clip.unbind(1)]
    assert shown == picks.flatten().tolist()
    timed = dataclasses.replace(token_file, sampling="time")
    with pytest.raises(ValueError, match="picks frames by their times"):
        timed.source_frames()


def test_the_readmes_example_of_reading_token_files_runs_as_written(model, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("Reading the token files that `encode` wrote")[1].split("```python\n", 1)[1].split("```")[0]
    source = make_video(tmp_path / "clip.mp4", frames=30, height=32, width=32, fps=24)  # 10 frames: 3 chunks, padded
    engine = Engine(model)
    encode_files(model, engine, [(source, "clip")], tmp_path / "tokens", SETTINGS)
    monkeypatch.chdir(tmp_path)
    names = {"model": model, "engine": engine}
    exec(compile(block, "README.md", "exec"), names)
    assert len(names["videos"]) == len(names["chunks"]) == len(names["frames"]) == 3
    assert [v.shape[1] for v in names["videos"]] == [4, 4, 2] and names["tf"].last_chunk_frames == 2
    with pytest.raises(ValueError, match="^clip: made by weights"):  # (another model's weights)
        pipeline.check_same_model(random_tokenizer("tiny", seed=1), names["tf"], "clip")
    with pytest.raises(ValueError, match=r"^clip: made by weights random-seed0-\w+, the loaded model by \w+; pass "):
        pipeline.check_same_model(TiTok("tiny"), names["tf"], "clip")  # (other weights, with no digest of their own)
    same = TiTok("tiny")  # the same weights loaded into a model: the file's (they had no digest, so were refused)
    same.load_state_dict(model.state_dict())
    assert same.weights_digest is None
    pipeline.check_same_model(same, names["tf"], "clip")
    assert same.weights_digest == model.weights_digest.split("-", 2)[2]  # (worked out once)


def test_encode_files_refuses_before_any_work_an_engine_of_another_model_and_settings_no_reader_takes(model, sources,
                                                                                                    tmp_path):
    """An engine of another model wrote that model's tokens under the given model's digest and dtype, and a resume
    with the right engine kept them; settings a reader refuses were found once the manifest named every input
    not encoded (and said the same command would go on)."""
    other = random_tokenizer("tiny", seed=1)
    with pytest.raises(ValueError, match=r"^the engine runs another model than the one given"):
        encode_files(model, Engine(other), [(sources["short"], "short")], tmp_path / "a", SETTINGS)
    for change, said in (({"fps": "8"}, r"fps must be a number in \(0, 1000\]; got '8'"), ({"fps": 0}, "fps must be"),
                         ({"tail": "Pad"}, "tail must be one of"), ({"sampling": "x"}, "sampling must be one of"),
                         ({"clips_per_video": 0}, "clips_per_video must be"), ({"rotation": "up"}, "rotation must be"),
                         ({"decoder": "gpu"}, "decoder must be one of")):  # fmt: skip
        with pytest.raises(ValueError, match=said):
            encode_files(model, Engine(model), [(sources["short"], "short")], tmp_path / "a",
                         dataclasses.replace(SETTINGS, **change))  # fmt: skip
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("workers", [(1, "thread"), (2, "process")])
def test_a_decoded_video_of_one_chunk_is_played_at_the_rate_its_chunk_spans(model, tmp_path, workers):
    """With one chunk there are no start times to tell its rate: a short clip (one chunk) was written at the
    sampling rate, 7% slow here, where two chunks of the same source kept to its time. The token file records the
    time a chunk spans; a file without it (made before) is still written at the sampling rate."""
    source = make_video(tmp_path / "short.mp4", frames=14, height=32, width=32, fps=30000 / 1001)
    count, kind = workers
    encode_files(model, Engine(model), [(source, "short")], tmp_path / "tok", SETTINGS, workers=count,
                 worker_kind=kind)  # fmt: skip
    token_file = load_tokens(tmp_path / "tok" / "short.safetensors")
    assert token_file.start_times.numel() == 1 and token_file.chunk_seconds == pytest.approx(14 * 1001 / 30000)
    assert pipeline.playback_rate(token_file) == pytest.approx(4 * 30000 / (14 * 1001))
    assert decode_files(Engine(model), [tmp_path / "tok" / "short.safetensors"], tmp_path / "mp4").done
    with av.open(str(tmp_path / "mp4" / "short.mp4")) as container:
        assert float(container.streams.video[0].average_rate) == pytest.approx(8.5629, abs=1e-3)
    before = dataclasses.replace(token_file, chunk_seconds=None)
    pipeline.save_tokens(tmp_path / "before.safetensors", before)
    assert pipeline.playback_rate(load_tokens(tmp_path / "before.safetensors")) == SETTINGS.fps


def test_decoding_takes_each_chunks_indices_as_it_goes(model, sources, tmp_path):
    """The chunks of a token file are handed to the engine one at a time (a file may hold millions), each with its
    own indices and grid."""
    encode(model, [sources["long"]], tmp_path)
    token_file = load_tokens(tmp_path / "long.safetensors")
    items = pipeline._chunk_items(token_file)
    first = next(items)
    assert first[0] == 0 and torch.equal(first[1], token_file.clip_indices(0)) and first[2] == SETTINGS.grid
    rest = list(items)
    assert [i for i, _, _ in rest] == list(range(1, 6))
    assert all(torch.equal(idx, token_file.clip_indices(i)) for i, idx, _ in rest)


def test_fp8_leaves_the_tokens_alone_and_files_an_fp8_encoder_made_are_redone(sources, tmp_path):
    """FP8 runs in the decoder only (titok_fast/fp8.py): a model in precision fp8 makes the default precision's
    tokens, so its files resume the default's and say nothing of it; a file whose made_with says "fp8" (an earlier
    titok-fast's FP8 encoder) is redone."""
    model = random_tokenizer("tiny", seed=0)
    engine, out = Engine(model, max_clips=3), tmp_path / "short.safetensors"

    def run(overwrite=False):
        return encode_files(model, engine, [(sources["short"], "short")], tmp_path, SETTINGS, workers=1,
                            overwrite=overwrite)  # fmt: skip

    assert run().done and "precision" not in (default := load_tokens(out)).made_with
    model.precision = "fp8"
    assert run().skipped and run(overwrite=True).done
    made = load_tokens(out)
    assert "precision" not in made.made_with and torch.equal(made.indices, default.indices)
    pipeline.save_tokens(out, dataclasses.replace(made, made_with={**made.made_with, "precision": "fp8"}))
    assert run().done and "precision" not in load_tokens(out).made_with  # redone
    assert run().skipped


def test_progress_says_what_limits_the_run(monkeypatch):
    monkeypatch.setattr(pipeline, "default_workers", lambda: 16)
    limits = pipeline.Limits(start=0.0, decoder="cpu", device_type="cuda")
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: 10.0)
    limits.clips, limits.workers, limits.waited = 50, 2, 7.0
    said = "5.00 clips/s, decode-bound (waits 70%, 2 decoding threads): try --workers 16 or --decoder nvdec"
    assert limits.describe() == said
    limits.waited = 2.0
    assert limits.describe() == "5.00 clips/s, model-bound (waits 20%, 2 decoding threads)"
    limits.waited, limits.workers = 9.0, 16
    said = "5.00 clips/s, decode-bound (waits 90%, 16 decoding threads): try --worker-kind process or --decoder nvdec"
    assert limits.describe() == said
    limits.worker_kind, limits.decoder = "process", "nvdec"
    assert limits.describe() == "5.00 clips/s, decode-bound (waits 90%, 16 decoding processes)"
    limits.workers = 1
    assert limits.describe() == "5.00 clips/s, decode-bound (waits 90%, 1 decoding process): try --workers 16"
    assert list(limits.waiting(iter([1, 2]))) == [1, 2]
    on_cpu = pipeline.Limits(start=0.0, decoder="cpu", device_type="cpu")  # (decoding shares the model's cores)
    on_cpu.workers, on_cpu.waited = 16, 9.0
    assert on_cpu.describe() == "0.00 clips/s, no clip encoded yet (waits 90%, 16 decoding threads)"
    on_cpu.clips = 50
    assert on_cpu.describe() == "5.00 clips/s, decode-bound (waits 90%, 16 decoding threads)"


def test_each_item_is_timed_with_its_clock_the_final_call_too():
    """stages.each_timed, behind the progress's waits (wall time) and the stage clock (thread CPU time)."""
    from titok_fast.stages import StageClock, each_timed

    ticks, spans = iter(range(0, 100, 5)), []  # each clock reading is 5 after the one before
    assert list(each_timed(["a", "b"], lambda: next(ticks), spans.append)) == ["a", "b"]
    assert spans == [5, 5, 5]  # a, b and the call that ends the iteration
    clock = StageClock()
    assert list(clock.timed(iter([1, 2]), "decode")) == [1, 2] and clock.take() == {}  # off: nothing counted
    clock.enable()
    assert list(clock.timed(iter([1, 2]), "decode")) == [1, 2]
    clock.stop("rgb", clock.start())
    assert set(clock.take()) == {"decode", "rgb"} and clock.take() == {}
    thread_time = iter([10.0, 10.25, 20.0, 20.5])  # (the thread's CPU clock: a stage's is the time between)
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(time, "thread_time", lambda: next(thread_time))
        clock.stop("rgb", clock.start())
        clock.stop("rgb", clock.start())
    assert clock.take() == {"rgb": 0.75}
    clock.add_all({"decode": 1.0})
    clock.enable()  # (counting starts again from zero)
    assert clock.take() == {}


def test_side_by_side_opens_only_the_file_a_token_file_was_made_from(model, sources, tmp_path):
    """A token file from a stranger may name any path as its source: --side-by-side reads it only if it is the file
    the tokens were made from, by the size and modification time the token file records (never another video,
    which it would show, nor a device or a FIFO, which could block or never end); each such file fails alone."""
    import os

    from titok_fast.files import brief
    from titok_fast.tokens import save_tokens

    encode(model, [sources["short"], sources["long"]], tmp_path / "tok")
    good = load_tokens(tmp_path / "tok" / "short.safetensors")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    named = {"fifo": str(fifo), "other": str(sources["odd"]), "gone": str(tmp_path / "gone.mp4"),
             "nul": f"{tmp_path}/a\0b.mp4", "huge": "s" * 900_000}  # fmt: skip
    paths = []
    for name, source in named.items():
        paths.append(tmp_path / "tok" / f"{name}.safetensors")
        save_tokens(paths[-1], dataclasses.replace(good, source=source))
    unstamped = dict(good.made_with)
    del unstamped["source_stamp"]
    paths.append(tmp_path / "tok" / "unstamped.safetensors")
    save_tokens(paths[-1], dataclasses.replace(good, made_with=unstamped))
    paths.append(tmp_path / "tok" / "long.safetensors")
    summary = decode_files(Engine(model), paths, tmp_path / "out", with_source=True)
    assert summary.failed == [(str(paths[k]), f"the source {brief(source)!r} the token file names is not the file "
                               "its tokens were made from (its size and modification time differ, or it is not there)")
                              for k, source in enumerate(named.values())] + [(str(paths[5]), (
        "the token file records no size and modification time of its source (made by an earlier version): encode it "
        "again to show its source beside it"))]  # fmt: skip
    assert summary.done == [str(paths[6])] and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["long.mp4"]


@pytest.mark.parametrize("there", ["nothing", "an-outdated-file"])
def test_a_token_file_another_job_puts_there_meanwhile_is_said_displaced(model, tmp_path, monkeypatch, there):
    """Two jobs at once on one output folder, their videos of the same output names: a token file the other job
    writes after this one looked (planned) and before it writes its own is replaced, and that other source's
    latest line says so (both sources' latest lines said "done" for one file). Also where this job had judged a
    token file of its own source made otherwise there, to redo: the other job's, renamed over it (a new file, not
    the one judged), is the one replaced."""
    from titok_fast.manifest import Manifest, read_manifest
    from titok_fast.pipeline import Summary

    for batch in ("a", "b"):
        (tmp_path / batch).mkdir()
    first = make_video(tmp_path / "a" / "clip.mp4", frames=12, height=32, width=32, fps=8)
    second = make_video(tmp_path / "b" / "clip.mp4", frames=24, height=48, width=64, fps=8)
    engine, out = Engine(model, max_clips=3), tmp_path / "tokens"
    encode_files(model, engine, [(first, "clip")], tmp_path / "other", SETTINGS, workers=1)
    if there == "an-outdated-file":  # this source's file, made otherwise: to redo, judged as the job plans
        assert encode_files(model, engine, [(second, "clip")], out, dataclasses.replace(SETTINGS, fps=4.0),
                            workers=1).done  # fmt: skip
    plan = pipeline.plan_outputs

    def meanwhile(*args, **kwargs):  # the other job renames its file into place right after this one looked
        todo = plan(*args, **kwargs)
        out.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "other" / "clip.safetensors", out / "clip.safetensors.new")
        os.replace(out / "clip.safetensors.new", out / "clip.safetensors")
        with Manifest(out / "manifest.jsonl", Summary()) as other:
            other.done(first, out / "clip.safetensors", 2)
        return todo

    monkeypatch.setattr(pipeline, "plan_outputs", meanwhile)
    summary = encode_files(model, engine, [(second, "clip")], out, SETTINGS, workers=1)
    assert summary.done == [str(second)] and load_tokens(out / "clip.safetensors").source == str(second.resolve())
    latest = {r["source"]: r for r in read_manifest(out, latest=True)}
    assert latest[str(first.resolve())]["status"] == "not-encoded" and latest[str(second.resolve())]["status"] == "done"
    assert there != "nothing" or latest[str(first.resolve())]["reason"] == (
        f"its token file is made anew for {second.resolve()}, which has the same output name"
    )


def test_a_job_whose_output_folder_is_deleted_stops(model, sources, tmp_path, monkeypatch):
    """The output folder removed while the job runs (a job thought dead, cleaned up): its manifest lines went to
    the removed file, its token files to a folder made anew without them, and it ended "0 failed". It stops, as on
    a full disk, and writes nothing more."""
    from titok_fast.manifest import Manifest

    out, done = tmp_path / "tokens", Manifest.done

    def then_deleted(self, source, tokens, clips, **extra):
        done(self, source, tokens, clips, **extra)
        shutil.rmtree(out)

    monkeypatch.setattr(Manifest, "done", then_deleted)
    files = [(sources[name], name) for name in ("short", "long", "odd")]
    with pytest.raises(OSError, match=rf"^the manifest {out / 'manifest.jsonl'} was removed while the job ran "):
        encode_files(model, Engine(model), files, out, SETTINGS, workers=1)
    assert not out.exists()


def test_resume_redoes_a_token_file_made_from_another_source_and_says_so(model, tmp_path):
    """Two videos with the same output name, encoded into one folder by two runs: the second is not "complete"
    because a token file of its name exists; it replaces it, and the summary and manifest say so."""
    from titok_fast.manifest import MANIFEST_NAME, read_manifest

    (tmp_path / "batch1").mkdir()
    (tmp_path / "batch2").mkdir()
    first = make_video(tmp_path / "batch1" / "clip.mp4", frames=12, height=32, width=32, fps=8)
    second = make_video(tmp_path / "batch2" / "clip.mp4", frames=24, height=48, width=64, fps=8)
    engine, out = Engine(model, max_clips=3), tmp_path / "tokens"

    def run(video):
        return encode_files(model, engine, [(video, "clip")], out, SETTINGS, workers=1)

    assert run(first).done
    at_rename, replace = [], os.replace

    def replacing(a, b):  # the first video's latest line when its token file is replaced: says so already
        if str(b).endswith("clip.safetensors"):  # (a process killed right after the rename leaves that line)
            at_rename.append({r["source"]: r["status"] for r in read_manifest(out, latest=True)}[str(first.resolve())])
        return replace(a, b)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", replacing)
        summary = run(second)
    assert at_rename == ["not-encoded"]
    assert summary.done == [str(second)] and not summary.skipped and summary.replaced == 1
    assert "1 token file(s) made otherwise or unreadable replaced" in summary.report("encoded")
    assert load_tokens(out / "clip.safetensors").source == str(second.resolve())
    displaced, row = read_manifest(out / MANIFEST_NAME)[-2:]  # (the displaced source first: see displacing)
    assert row["status"] == "done" and row["replaced"] == f"made from another source ({str(first.resolve())!r})"
    assert (displaced["source"], displaced["status"], displaced["tokens"]) == (
        str(first.resolve()), "not-encoded", str((out / "clip.safetensors").resolve())
    )  # the first video's latest line no longer says its tokens are there
    assert displaced["reason"] == (
        f"its token file is made anew for {second.resolve()}, which has the same output name"
    )
    assert [r["status"] for r in read_manifest(out, latest=True)] == ["not-encoded", "done"]
    again = run(second)
    assert again.skipped == [str(second)] and not again.done and not again.replaced
    (tmp_path / "batch3").mkdir()
    broken = tmp_path / "batch3" / "clip.mp4"
    broken.write_bytes(b"not a video")
    failed = run(broken)  # fails: the second video's tokens are moved aside, and its latest line says so
    assert [p for p, _ in failed.failed] == [str(broken)] and (out / "clip.safetensors.outdated").exists()
    latest = {r["source"]: r for r in read_manifest(out, latest=True)}
    assert latest[str(second.resolve())]["status"] == "not-encoded"
    assert latest[str(second.resolve())]["reason"] == (
        f"{broken.resolve()}, which has the same output name, failed to replace them; the token file there, made "
        f"from another source ({str(second.resolve())!r}), was moved to clip.safetensors.outdated"
    )


def test_a_run_stopped_while_checking_outputs_lists_what_it_found_to_do(model, sources, tmp_path, monkeypatch):
    """Checking a large dataset's outputs takes minutes: an interrupt then lists the inputs found to do as not
    encoded; those not checked yet keep the latest line they had (their token files may be complete)."""
    from titok_fast.manifest import read_manifest

    files = [(sources[name], name) for name in ("short", "long", "odd", "black")]
    engine = Engine(model, max_clips=3)
    assert encode_files(model, engine, [files[0], files[3]], tmp_path, SETTINGS, workers=1).done
    remove_temporaries, calls = pipeline._remove_temporaries, []

    def stopped_at_the_third(*args):  # the last step of checking an output, on the run's thread
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return remove_temporaries(*args)

    monkeypatch.setattr(pipeline, "_remove_temporaries", stopped_at_the_third)
    monkeypatch.setattr(pipeline, "network_file_system", lambda path: "nfs4")  # read ahead in threads, too
    with pytest.raises(KeyboardInterrupt):
        encode_files(model, engine, files, tmp_path, SETTINGS, workers=1)
    rows = {Path(r["source"]).name: r for r in read_manifest(tmp_path, latest=True)}
    assert {name: r["status"] for name, r in rows.items()} == {
        "short.mp4": "done", "long.mp4": "not-encoded", "odd.mkv": "not-encoded", "black.mp4": "done",
    }  # fmt: skip  (short: skipped, said done already; black: not checked, read ahead or not)
    assert rows["long.mp4"]["reason"] == "not encoded: the run was interrupted while checking outputs (Ctrl-C)"
    assert not [t for t in threading.enumerate() if t.name.startswith("titok-fast-ahead")]  # none left reading


def _calls_recorded(monkeypatch, name: str, label: Callable, modules=(pipeline,),
                    meet: threading.Barrier | None = None) -> list[tuple[Any, str]]:  # fmt: skip
    """(``label`` of its arguments, calling thread's name) of every call of function ``name`` (as ``modules`` hold
    it; the first module's is the real one) from now on; with ``meet``, the first calls wait there for one
    another."""
    real, calls = getattr(modules[0], name), []

    def call(*args):
        calls.append((label(*args), threading.current_thread().name))
        if meet is not None and len(calls) <= meet.parties:
            meet.wait()
        return real(*args)

    for module in modules:
        monkeypatch.setattr(module, name, call)
    return calls


def _reads_recorded(monkeypatch, meet: threading.Barrier | None = None) -> list[tuple[str, str]]:
    """(token file name, reading thread's name) of every token file read from now on."""
    from titok_fast import tokens

    return _calls_recorded(monkeypatch, "read_token_bytes", lambda path: Path(path).name, (tokens, pipeline), meet)


def test_a_resume_on_a_network_file_system_reads_token_files_ahead_in_threads(model, sources, tmp_path, monkeypatch):
    """Checking a token file there waits on round trips: threads read them ahead (here two at once, or the reads
    would wait for each other in vain), and the run decides as it would one by one. On a local file system the
    run's thread reads them itself."""
    from titok_fast.manifest import Manifest

    files = [(sources[name], name) for name in ("short", "long", "black", "odd")]
    assert encode_files(model, Engine(model, max_clips=3), [files[0], files[2]], tmp_path, SETTINGS, workers=1).done
    monkeypatch.setattr(pipeline, "FETCH_CHUNK", 1)  # a thread per file
    monkeypatch.setattr(pipeline, "network_file_system", lambda path: "nfs4" if path == tmp_path else None)
    reads = _reads_recorded(monkeypatch, threading.Barrier(2, timeout=30))
    manifest = Manifest(None, pipeline.Summary())
    todo = pipeline.plan_outputs(model, "auto", files, tmp_path, SETTINGS, manifest)
    assert todo == [(sources[name], tmp_path / f"{name}.safetensors") for name in ("long", "odd")]
    assert manifest.summary.skipped == [str(sources["short"]), str(sources["black"])]
    assert sorted(name for name, _ in reads) == ["black.safetensors", "short.safetensors"]
    assert all(thread.startswith("titok-fast-ahead") for _, thread in reads), reads
    assert not [t for t in threading.enumerate() if t.name.startswith("titok-fast-ahead")]

    monkeypatch.setattr(pipeline, "network_file_system", lambda path: None)
    reads = _reads_recorded(monkeypatch)
    manifest = Manifest(None, pipeline.Summary())
    assert pipeline.plan_outputs(model, "auto", files, tmp_path, SETTINGS, manifest) == todo
    assert manifest.summary.skipped == [str(sources["short"]), str(sources["black"])]
    assert reads == [(name, threading.current_thread().name) for name in ("short.safetensors", "black.safetensors")]


def test_reading_ahead_holds_at_most_a_chunks_budget_of_bytes(model, sources, tmp_path, monkeypatch):
    """What is read ahead waits in memory until the run comes to it: a chunk reads at most FETCH_CHUNK_BYTES of
    token files, and the run's thread reads the rest of it itself (the same decisions)."""
    from titok_fast.manifest import Manifest

    files = [(sources[name], name) for name in ("short", "black")]
    assert encode_files(model, Engine(model, max_clips=3), files, tmp_path, SETTINGS, workers=1).done
    monkeypatch.setattr(pipeline, "FETCH_CHUNK_BYTES", (tmp_path / "short.safetensors").stat().st_size)
    monkeypatch.setattr(pipeline, "network_file_system", lambda path: "fuse.sshfs")
    reads = _reads_recorded(monkeypatch)
    manifest = Manifest(None, pipeline.Summary())
    assert pipeline.plan_outputs(model, "auto", files, tmp_path, SETTINGS, manifest) == []
    assert manifest.summary.skipped == [str(sources["short"]), str(sources["black"])]
    assert [name for name, _ in reads] == ["short.safetensors", "black.safetensors"]
    assert reads[0][1].startswith("titok-fast-ahead") and reads[1][1] == threading.current_thread().name


def test_network_file_systems_are_told_from_the_mount_table(tmp_path):
    from titok_fast.files import network_file_system

    table = tmp_path / "mountinfo"
    table.write_text(
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        "27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
        "40 27 0:50 / /data rw,relatime shared:1 - nfs4 server:/export rw,vers=4.2\n"
        "41 40 8:17 / /data/local\\040disk rw - ext4 /dev/sdb1 rw\n"
        "42 27 0:52 / /home/u/remote rw - fuse.sshfs u@h:/ rw\n"
        "43 27 8:33 / /mnt/usb rw - fuseblk /dev/sdc1 rw\n"
        "44 27 8:49 / /mnt/share rw - ext4 /dev/sdd1 rw\n"
        "45 44 0:55 / /mnt/share rw - cifs //server/share rw\n"
        "46 27 0:56 / /home/u/.local/share/containers/x/merged rw - fuse.fuse-overlayfs fuse-overlayfs rw\n"
    )
    kinds = {
        "/data": "nfs4", "/data/videos/a.mp4": "nfs4", "/data/local disk/a": None, "/datax/a": None,
        "/home/u/remote/tokens": "fuse.sshfs", "/mnt/usb/a": None, "/mnt/share/not/made/yet": "cifs", "/srv": None,
        "/home/u/.local/share/containers/x/merged/tokens": None,  # a rootless container's root: a local disk
    }  # fmt: skip
    assert {path: network_file_system(path, str(table)) for path in kinds} == kinds
    assert network_file_system("/data/a", str(tmp_path / "none")) is None  # no such table: taken as local


def _writes_recorded(monkeypatch, meet: threading.Barrier | None = None) -> list[tuple[str, str]]:
    """(token file name, writing thread's name) of every token file written from now on."""
    return _calls_recorded(monkeypatch, "write_token_file", lambda *args: Path(args[2]).name, meet=meet)


def _latest(folder: Path) -> dict[str, str]:
    from titok_fast.manifest import read_manifest

    return {Path(r["source"]).stem: r["status"] for r in read_manifest(folder, latest=True)}


def test_on_a_network_file_system_token_files_are_written_on_threads(model, sources, tmp_path, monkeypatch):
    """There a token file's write is many round trips and a sync on the server: threads write them (here two at
    once, or the writes would wait for each other in vain) while the run goes on, and the token files and manifest
    lines are those of a run that writes on its own thread."""
    names = ("short", "long", "black")
    files, engine = [(sources[name], name) for name in names], Engine(model, max_clips=3)
    here = encode_files(model, engine, files, tmp_path / "here", SETTINGS, workers=1)
    monkeypatch.setattr(pipeline, "network_file_system", lambda path: "nfs4" if "there" in str(path) else None)
    writes = _writes_recorded(monkeypatch, threading.Barrier(2, timeout=30))
    there = encode_files(model, engine, files, tmp_path / "there", SETTINGS, workers=1)
    assert sorted(there.done) == sorted(here.done) == sorted(str(sources[name]) for name in names)
    assert there.clips == here.clips and not there.failed
    assert sorted(name for name, _ in writes) == sorted(f"{name}.safetensors" for name in names)
    assert all(thread.startswith("titok-fast-write") for _, thread in writes), writes
    for name in names:
        assert (tmp_path / "there" / f"{name}.safetensors").read_bytes() == (
            tmp_path / "here" / f"{name}.safetensors"
        ).read_bytes()
    assert _latest(tmp_path / "there") == _latest(tmp_path / "here") == dict.fromkeys(names, "done")
    assert not [t for t in threading.enumerate() if t.name.startswith("titok-fast-write")]


def test_on_a_local_disk_one_thread_writes_the_token_files(model, sources, tmp_path, monkeypatch):
    """Each write's two syncs are wall time the run's thread, which drives the model, would wait through: one
    writing thread writes every token file and its manifest line, and is gone when the run ends."""
    names = ("short", "long", "black")
    monkeypatch.setattr(pipeline, "network_file_system", lambda path: None)
    writes = _writes_recorded(monkeypatch)
    summary = encode_files(model, Engine(model, max_clips=3), [(sources[n], n) for n in names], tmp_path, SETTINGS,
                           workers=1)  # fmt: skip
    assert sorted(summary.done) == sorted(str(sources[n]) for n in names) and not summary.failed
    assert sorted(name for name, _ in writes) == sorted(f"{n}.safetensors" for n in names)
    assert {thread for _, thread in writes} == {"titok-fast-write_0"}, writes
    assert _latest(tmp_path) == dict.fromkeys(names, "done")
    assert not [t for t in threading.enumerate() if t.name.startswith("titok-fast-write")]


def test_a_manifest_line_a_full_disk_cuts_is_taken_back(tmp_path, monkeypatch):
    """A write that fills the disk midway through a line: the run stops, and the manifest ends with whole lines
    (the part written is taken back, as nothing came after it)."""
    import errno

    from titok_fast import manifest as manifest_module
    from titok_fast.manifest import Manifest

    path = tmp_path / "manifest.jsonl"
    with Manifest(path, pipeline.Summary()) as manifest:
        manifest.done("/v/a.mp4", tmp_path / "a.safetensors", 1)
        before, real = path.read_bytes(), os.write

        def fills_up(fd, data):
            if fd != manifest._fd:
                return real(fd, data)
            if len(data) > 20:
                return real(fd, data[:20])  # room for 20 bytes
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(manifest_module.os, "write", fills_up)
        with pytest.raises(OSError, match=r"cannot write the manifest .*manifest.jsonl: No space left on device"):
            manifest.done("/v/b.mp4", tmp_path / "b.safetensors", 1)
        monkeypatch.setattr(manifest_module.os, "write", real)
    assert path.read_bytes() == before


def test_a_full_disk_met_by_a_writing_thread_stops_the_run_with_every_input_listed(model, sources, tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    import errno

    names = ("short", "long", "black")
    monkeypatch.setattr(pipeline, "network_file_system", lambda path: "nfs4")
    real = pipeline.save_tokens

    def full(path, token_file):
        if Path(path).name == "long.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, token_file)

    monkeypatch.setattr(pipeline, "save_tokens", full)
    with pytest.raises(OSError, match=r"long\.safetensors \(No space left on device\): the run stops"):
        encode_files(model, Engine(model, max_clips=3), [(sources[n], n) for n in names], tmp_path, SETTINGS,
                     workers=1)  # fmt: skip
    rows = _latest(tmp_path)
    assert sorted(rows) == sorted(names) and rows["short"] == "done" and rows["long"] == "not-encoded"
    assert rows["black"] in ("done", "not-encoded")  # handed over before the error came back, or not
    assert {n for n in names if (tmp_path / f"{n}.safetensors").exists()} == {n for n in names if rows[n] == "done"}


def test_a_disk_too_full_for_the_manifest_too_stops_with_the_token_files_error(model, sources, tmp_path, monkeypatch,
                                                                               capsys):  # fmt: skip
    """The disk fills up at a token file, and the manifest cannot take the list of inputs not encoded either: the
    run stops with the token file's error, not the manifest's (which named no token file), and says the list is
    short."""
    import errno

    from titok_fast import manifest as manifest_module

    names = ("short", "long", "black")
    real_save, real_write, full = pipeline.save_tokens, manifest_module.os.write, []

    def save(path, token_file):
        if Path(path).name == "long.safetensors":
            full.append(path)
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, token_file)

    def write(fd, data):
        if full and b'"not-encoded"' in data:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(pipeline, "save_tokens", save)
    monkeypatch.setattr(manifest_module.os, "write", write)
    with pytest.raises(OSError, match=r"long\.safetensors \(No space left on device\): the run stops$"):
        encode_files(model, Engine(model, max_clips=3), [(sources[n], n) for n in names], tmp_path, SETTINGS,
                     workers=1)  # fmt: skip
    assert re.search(r"cannot write the manifest .*: No space left on device; the inputs left are not all listed "
                     "there as not encoded", capsys.readouterr().err)  # fmt: skip
    assert _latest(tmp_path).get("short") == "done" and (tmp_path / "short.safetensors").exists()


@pytest.mark.parametrize("threads", [0, 1])
def test_token_files_that_cannot_be_written_stop_the_run_only_in_a_row(model, sources, tmp_path, monkeypatch,
                                                                        threads):  # fmt: skip
    """A write error other than a full disk's (a failing disk, permissions taken away) failed each file alone, so a
    job of a million files decoded and encoded every one to fail it at its write. GIVE_UP_AFTER such files in a
    row (here 3) now stop the run, said of the last one; a file written between them starts the count again, and a
    file failed for what it holds (NaN latents) neither counts nor starts it again."""
    import errno

    names = ("short", "long", "black", "odd")
    order = [(sources[n], n) for n in names]
    monkeypatch.setattr(pipeline, "GIVE_UP_AFTER", 3)
    monkeypatch.setattr(pipeline, "write_threads_for", lambda outdir: threads)
    real, failing = pipeline.save_tokens, set()

    def save(path, token_file):
        if Path(path).stem in failing:
            raise OSError(errno.EIO, "Input/output error")
        return real(path, token_file)

    monkeypatch.setattr(pipeline, "save_tokens", save)
    failing |= {"short", "long", "odd"}  # two, one written, then one: the run goes on
    summary = encode_files(model, Engine(model, max_clips=3), order, tmp_path / "a", SETTINGS, workers=1)
    assert summary.done == [str(sources["black"])]
    assert [reason for _, reason in summary.failed] == [
        f"cannot write {tmp_path / 'a' / n}.safetensors: Input/output error" for n in ("short", "long", "odd")]
    failing |= {"black"}  # every write fails: the third stops the run, the fourth input is listed not encoded
    with pytest.raises(OSError, match=r"black\.safetensors: Input/output error; 3 token files in a row could not be "
                                      r"written: the run stops$"):  # fmt: skip
        encode_files(model, Engine(model, max_clips=3), order, tmp_path / "b", SETTINGS, workers=1)
    assert _latest(tmp_path / "b") == {"short": "failed", "long": "failed", "black": "failed", "odd": "not-encoded"}
    writes = pipeline.Writes(threads)
    for error in ("chunk 0 gave the model NaN latents", pipeline.CannotWrite("x"), pipeline.CannotWrite("y"),
                  "chunk 1 gave the model NaN latents", None, pipeline.CannotWrite("z")):  # fmt: skip
        writes(lambda error=error: error)
    writes.close()
    assert writes.unwritten_in_a_row == 1


def test_decode_stops_after_videos_that_cannot_be_written_in_a_row(model, sources, tmp_path, monkeypatch):
    """decode likewise: GIVE_UP_AFTER videos in a row that cannot be written (an I/O error syncing them, which
    names no file) stop it, each said of the video, not of the token file it decodes."""
    import errno

    from titok_fast import files as files_module

    encode(model, [sources[n] for n in ("short", "long", "black", "odd")], tmp_path / "t")
    engine = Engine(model, max_clips=3)
    tokens = sorted((tmp_path / "t").glob("*.safetensors"))
    monkeypatch.setattr(pipeline, "GIVE_UP_AFTER", 3)
    real = files_module.os.fsync

    def failing(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(files_module.os, "fsync", failing)
    with pytest.raises(OSError, match=rf"cannot write {re.escape(str(tmp_path / 'r' / tokens[2].stem))}\.mp4: "
                                      r"Input/output error; 3 videos in a row could not be written: the run stops$"):
        decode_files(engine, tokens, tmp_path / "r")
    summary = decode_files(engine, tokens[:2], tmp_path / "r2")  # (two: below the count)
    assert [reason for _, reason in summary.failed] == [
        f"cannot write {tmp_path / 'r2' / p.stem}.mp4: Input/output error" for p in tokens[:2]]
    assert not list((tmp_path / "r").iterdir()) and not list((tmp_path / "r2").iterdir())


def test_a_list_of_inputs_not_encoded_that_a_full_disk_cuts_short_is_said_once(tmp_path, monkeypatch, capsys):
    """A Ray job that stops lists what is left twice (at its pass's end, then the job's): on a full disk the notice
    that the list is short was said twice."""
    from titok_fast import manifest as manifest_module
    from titok_fast.manifest import Manifest

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with Manifest(tmp_path / "manifest.jsonl", pipeline.Summary()) as manifest:
        monkeypatch.setattr(manifest_module.os, "write", full)
        for _ in range(2):
            manifest.list_not_encoded([("/v/a.mp4", tmp_path / "a.safetensors")], "not encoded: the run stopped")
        monkeypatch.undo()
    assert capsys.readouterr().err.count("; the inputs left are not all listed there as not encoded\n") == 1


def test_an_interrupted_run_writes_and_lists_what_it_handed_to_the_writing_threads(model, sources, tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    """Ctrl-C while a token file is being written on a thread (a server slow to answer): the run waits for it and
    its manifest line before it lists the rest as not encoded, so a file and its line are there both or neither."""
    names = ("short", "long", "black")
    monkeypatch.setattr(pipeline, "network_file_system", lambda path: "nfs4")
    answer, real = threading.Event(), pipeline.write_token_file

    def slow(*args):
        answer.wait(30)
        return real(*args)

    monkeypatch.setattr(pipeline, "write_token_file", slow)
    add = pipeline._EncodeJob.add

    def add_then_stop(job, key, indices):
        add(job, key, indices)
        if job.writes.pending:  # a token file handed over, not written yet
            threading.Timer(0.5, answer.set).start()
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline._EncodeJob, "add", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        encode_files(model, Engine(model, max_clips=3), [(sources[n], n) for n in names], tmp_path, SETTINGS,
                     workers=1)  # fmt: skip
    rows = _latest(tmp_path)
    assert rows == {"short": "done", "long": "not-encoded", "black": "not-encoded"}
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["short.safetensors"]


def test_a_failed_redo_moves_the_outdated_token_file_aside(model, tmp_path):
    """Other settings redo every file; one that now fails keeps no token file made the old way under its name:
    it is renamed (never deleted, an earlier one never replaced), and the failure says where to."""
    from titok_fast.manifest import MANIFEST_NAME, read_manifest

    (tmp_path / "v").mkdir()
    short = make_video(tmp_path / "v" / "short.mp4", frames=12, height=32, width=32, fps=8)  # 1.5 s
    long = make_video(tmp_path / "v" / "long.mp4", frames=40, height=32, width=32, fps=8)  # 5 s
    engine, out = Engine(model, max_clips=3), tmp_path / "tok"
    before, after = ClipSettings(grid=(4, 32, 32), tokens=8), ClipSettings(grid=(12, 32, 32), tokens=8, fps=4.0)

    def run(settings):
        return encode_files(model, engine, [(short, "short"), (long, "long")], out, settings, workers=1)

    assert len(run(before).done) == 2
    old_short = (out / "short.safetensors").read_bytes()
    summary = run(after)  # short.mp4: is shorter than one chunk of 12 frames at 4 fps
    assert summary.done == [str(long)] and summary.replaced == 1 and [p for p, _ in summary.failed] == [str(short)]
    reason = summary.failed[0][1]
    assert "shorter than one chunk" in reason and "\n" not in reason
    assert reason.endswith(
        "; the token file there, made another way (fps 8.0, now 4.0; grid 4x32x32, now 12x32x32), was moved to "
        "short.safetensors.outdated"
    )
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["long.safetensors"]
    assert (out / "short.safetensors.outdated").read_bytes() == old_short
    assert load_tokens(out / "long.safetensors").grids.tolist() == [[12, 32, 32]]  # 20 frames at 4 fps
    line = {r["source"]: r for r in read_manifest(out / MANIFEST_NAME, latest=True)}[str(short)]
    assert datetime.datetime.fromisoformat(line.pop("time")).tzinfo == datetime.UTC
    assert line == {
        "source": str(short), "tokens": str(out / "short.safetensors"), "clips": 0, "status": "failed",
        "reason": reason,
    }  # fmt: skip

    summary = run(after)  # nothing under the name now: nothing to move, and the failure says nothing of it
    assert summary.failed[0][1].endswith("(--tail pad, tail='pad' in Python, pads it)")
    assert not (out / "short.safetensors.outdated.2").exists()
    other = ClipSettings(grid=(4, 32, 32), tokens=4)
    summary = run(other)  # the one set aside was made otherwise: left there
    assert summary.done == [str(short), str(long)] and (out / "short.safetensors.outdated").exists()
    other_short = (out / "short.safetensors").read_bytes()
    summary = run(after)
    assert summary.failed[0][1].endswith("was moved to short.safetensors.outdated.2")
    assert (out / "short.safetensors.outdated").read_bytes() == old_short  # the first one kept
    assert not (out / "short.safetensors").exists()
    (out / "short.safetensors.outdated.\u00b2").write_bytes(b"x")  # no number of ours (int() would take it)
    (out / "short.safetensors.outdated.1").symlink_to(out / "short.safetensors.outdated")  # a link: never put back
    summary = run(before)  # the settings that made the first one again (those of the failed runs were a slip)
    assert summary.skipped == [str(short)] and summary.done == [str(long)]  # put back, not encoded again
    assert (out / "short.safetensors").read_bytes() == old_short and not (out / "short.safetensors.outdated").exists()
    assert (out / "short.safetensors.outdated.2").read_bytes() == other_short
    assert run(after).failed and (out / "short.safetensors.outdated").read_bytes() == old_short  # aside again
    make_video(tmp_path / "v" / "new.mp4", frames=20, height=32, width=32, fps=8)  # 2.5 s: 5 chunks
    os.replace(tmp_path / "v" / "new.mp4", short)  # the source changed since: its old tokens are not put back
    summary = run(before)
    assert summary.done == [str(short), str(long)] and len(load_tokens(out / "short.safetensors").grids) == 5


def test_a_file_that_cannot_be_written_is_named_in_its_failure_not_its_temporary(model, sources, tmp_path, monkeypatch):
    """A folder the run may not write in: the failure names the video (or token file) asked for, not the hidden
    temporary name it is written under first."""
    encode(model, [sources["short"]], tmp_path / "tok")
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):
        if os.fspath(path).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    tokens = tmp_path / "tok" / "short.safetensors"
    summary = decode_files(Engine(model, max_clips=2), [tokens], tmp_path / "mp4")
    assert summary.failed == [(str(tokens), f"cannot write {tmp_path / 'mp4' / 'short.mp4'}: Permission denied")]
    summary = encode(model, [sources["long"]], tmp_path / "tok")
    assert summary.failed == [
        (str(sources["long"]), f"cannot write {tmp_path / 'tok' / 'long.safetensors'}: Permission denied")
    ]


def test_a_failed_redo_keeps_a_token_file_another_run_completed_since_it_was_judged(model, tmp_path, monkeypatch):
    """Two runs over one output folder: this one finds a token file outdated, another run then completes it (a
    new file renamed into place), and this run's redo fails. Only the file it judged may be set aside: the other
    run's is kept under its name, and the failure says so."""
    (tmp_path / "v").mkdir()
    short = make_video(tmp_path / "v" / "short.mp4", frames=12, height=32, width=32, fps=8)  # 1.5 s
    engine, out = Engine(model, max_clips=3), tmp_path / "tok"
    before, after = ClipSettings(grid=(4, 32, 32), tokens=8), ClipSettings(grid=(12, 32, 32), tokens=8, fps=4.0)
    assert encode_files(model, engine, [(short, "short")], out, before, workers=1).done
    other_runs = (out / "short.safetensors").read_bytes()  # what the other run completes (its settings' file)
    planned = pipeline.plan_outputs

    def plan_then_another_run_completes(*args, **kwargs):
        todo = planned(*args, **kwargs)
        write_atomically(out / "short.safetensors", other_runs)
        return todo

    monkeypatch.setattr(pipeline, "plan_outputs", plan_then_another_run_completes)
    summary = encode_files(model, engine, [(short, "short")], out, after, workers=1)  # shorter than one chunk
    assert [p for p, _ in summary.failed] == [str(short)] and summary.failed[0][1].endswith(
        "; the token file there, made another way (fps 8.0, now 4.0; grid 4x32x32, now 12x32x32), had been "
        "replaced meanwhile (by another run): it is kept"
    )
    assert (out / "short.safetensors").read_bytes() == other_runs and not list(out.glob("*.outdated*"))
    monkeypatch.setattr(pipeline, "plan_outputs", planned)
    parsed = pipeline._parsed

    def read_then_another_run_completes(path, found):  # (the file is judged from what was read before)
        done = parsed(path, found)
        write_atomically(out / "short.safetensors", other_runs)
        return done

    monkeypatch.setattr(pipeline, "_parsed", read_then_another_run_completes)
    summary = encode_files(model, engine, [(short, "short")], out, after, workers=1)
    assert summary.failed[0][1].endswith("had been replaced meanwhile (by another run): it is kept")
    monkeypatch.setattr(pipeline, "_parsed", parsed)  # the file judged is still there: set aside, as before
    summary = encode_files(model, engine, [(short, "short")], out, after, workers=1)
    assert summary.failed[0][1].endswith("was moved to short.safetensors.outdated")


def test_a_file_set_aside_is_known_by_its_size_and_time_where_inode_numbers_change(tmp_path, monkeypatch):
    """A file system that does not keep inode numbers (CIFS with noserverino, some FUSE mounts): the file judged
    is still known by its size and modification time, and set aside; a file written since is not."""
    from titok_fast import files, manifest

    tokens = tmp_path / "a.safetensors"
    tokens.write_bytes(b"made another way")
    judged = files.file_entry(tokens)

    def renumbered(path):  # each look at a file gives another inode number
        device, inode, size, mtime = files.file_entry(path)
        renumbered.calls += 1
        return device, inode + renumbered.calls, size, mtime

    renumbered.calls = 0
    monkeypatch.setattr(manifest, "file_entry", renumbered)
    assert manifest._set_aside(tokens, "made another way", judged).endswith("was moved to a.safetensors.outdated")
    tokens.write_bytes(b"made since by another run")
    os.utime(tokens, ns=(judged[3] + 10**9, judged[3] + 10**9))
    assert manifest._set_aside(tokens, "made another way", judged).endswith("it is kept")


def test_a_third_file_set_aside_replaces_neither_earlier_one(tmp_path):
    """Token files set aside before are never replaced: the next goes to the first free number."""
    from titok_fast import manifest

    tokens = tmp_path / "a.safetensors"
    for k in range(3):
        tokens.write_bytes(b"made another way %d" % k)
        assert manifest._set_aside(tokens, "made another way").endswith(
            "was moved to a.safetensors.outdated" + (f".{k + 1}" if k else ""))  # fmt: skip
    assert sorted(p.read_bytes() for p in tmp_path.iterdir()) == [b"made another way %d" % k for k in range(3)]


def test_a_token_file_with_a_name_too_long_for_the_suffix_is_set_aside_and_put_back(model, tmp_path):
    """A name of 252 bytes has no room for ".outdated": it is set aside under a digest of its name instead (the
    rename failed, and the token file made the old way stayed among those made the new way)."""
    from titok_fast.manifest import aside_stem

    name = "s" * 240
    short = make_video(tmp_path / f"{name}.mp4", frames=12, height=32, width=32, fps=8)
    engine, out = Engine(model, max_clips=3), tmp_path / "tok"
    before, after = ClipSettings(grid=(4, 32, 32), tokens=8), ClipSettings(grid=(12, 32, 32), tokens=8, fps=4.0)

    def run(settings):
        return encode_files(model, engine, [(short, name)], out, settings, workers=1)

    assert len(run(before).done) == 1
    made = (out / f"{name}.safetensors").read_bytes()
    summary = run(after)  # shorter than one chunk now
    assert not (out / f"{name}.safetensors").exists(), summary.failed
    stem = aside_stem(f"{name}.safetensors")
    assert stem != f"{name}.safetensors" and len(stem) + len(".outdated.123456789") <= 255
    assert summary.failed[0][1].endswith(f"was moved to {stem}.outdated")
    assert sorted(os.listdir(out)) == sorted(["manifest.jsonl", f"{stem}.outdated"])
    assert (out / f"{stem}.outdated").read_bytes() == made
    summary = run(before)  # those settings again: put back, not encoded again
    assert summary.skipped == [str(short)] and (out / f"{name}.safetensors").read_bytes() == made
    assert aside_stem("short.safetensors") == "short.safetensors"


def test_plan_outputs_lists_each_output_folder_once_and_removes_the_temporaries_there(model, tmp_path, monkeypatch):
    """A resume removes what a killed run left in the output folders (beside the token files, and of outputs it
    does not have), listing each output folder once (not once per file: a half-finished dataset of a million files
    would take hours)."""
    import os

    from titok_fast.files import ABANDONED_UNLOCKED_SECONDS
    from titok_fast.manifest import Manifest

    (tmp_path / "sub").mkdir()
    hex_ = "0123456789abcdef0123456789abcdef"
    left = [".a.safetensors.{}.tmp", ".b.safetensors.{}.tmp", "sub/.c.safetensors.{}.tmp", ".kept.safetensors.{}.tmp",
            ".a.safetensors.x.safetensors.{}.tmp", "sub/.a.safetensors.{}.tmp"]  # fmt: skip
    old = time.time() - ABANDONED_UNLOCKED_SECONDS - 60  # (a killed run's of another output: gone once this old)
    for name in left:
        (tmp_path / name.format(hex_)).touch()
        os.utime(tmp_path / name.format(hex_), (old, old))
    listed = []
    real = os.scandir

    def scandir(path="."):
        listed.append(os.path.abspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", lambda path=".": [e.name for e in scandir(path)])
    files = [(tmp_path / f"{n}.mp4", n) for n in ("a", "b", "sub/c", "d", "sub/e")]
    todo = pipeline.plan_outputs(model, "eager", files, tmp_path, SETTINGS, Manifest(None, pipeline.Summary()))
    assert [out for _, out in todo] == [tmp_path / f"{n}.safetensors" for _, n in files]
    assert sorted(listed) == sorted({str(tmp_path), str(tmp_path / "sub")})  # once each
    assert not list(tmp_path.rglob("*.tmp"))  # (a killed run's of other outputs too: no lock holds them)


def test_a_resume_removes_a_killed_runs_temporary_beside_a_complete_file(model, sources, tmp_path):
    """A killed --overwrite run leaves a temporary beside a token file (and decode beside an mp4) that is complete;
    the next run skips the file and removes the temporary."""
    encode(model, [sources["short"]], tmp_path)
    stale = tmp_path / f".short.safetensors.{'0123abcd' * 4}.tmp"
    stale.write_bytes(b"left by a killed --overwrite run")
    summary = encode(model, [sources["short"]], tmp_path)
    assert summary.skipped == [str(sources["short"])] and not stale.exists()
    engine, tokens, decoded = Engine(model), tmp_path / "short.safetensors", tmp_path / "decoded"
    decode_files(engine, [tokens], decoded)
    stale = decoded / f".short.mp4.{'0123abcd' * 4}.tmp"
    stale.write_bytes(b"left by a killed --overwrite run")
    summary = decode_files(engine, [tokens], decoded)
    assert summary.skipped == [str(tokens)] and not stale.exists()


def test_a_run_removes_a_killed_runs_temporaries_of_outputs_it_does_not_have(model, sources, tmp_path):
    """A killed run's temporaries of outputs this run does not have (its input since renamed, another shard's)
    go too, once every output of the folder has been passed and once unchanged for an hour; one another run is
    writing stays (locked here; new, from another machine where locks are not shared), and so do files set aside
    and a user's files."""
    from titok_fast.files import ABANDONED_UNLOCKED_SECONDS, AtomicFile

    for folder, suffix in ((tmp_path / "tok", "safetensors"), (tmp_path / "mp4", "mp4")):
        folder.mkdir()
        killed = [folder / f".renamed.{suffix}.{'0123abcd' * 4}.tmp", folder / f".~{'ab' * 20}.{'1' * 32}.tmp"]
        kept = [folder / "renamed.safetensors.outdated", folder / f".notes.{suffix}.tmp", folder / "user.txt",
                folder / f".elsewhere.{suffix}.{'2' * 32}.tmp"]  # fmt: skip
        for path in killed + kept:
            path.write_bytes(b"left")
        old = time.time() - ABANDONED_UNLOCKED_SECONDS - 60
        for path in killed + kept[:-1]:
            os.utime(path, (old, old))
        writing = AtomicFile(folder / f"other.{suffix}").__enter__()  # (another run's, locked while written)
        os.utime(writing.temporary, (old, old))
        try:
            if suffix == "safetensors":
                assert encode(model, [sources["short"]], folder).done
            else:
                assert decode_files(Engine(model), [tmp_path / "tok" / "short.safetensors"], folder).done
            assert not any(path.exists() for path in killed) and all(path.exists() for path in kept)
            assert os.path.exists(writing.temporary)
        finally:
            writing.discard()


def test_a_resume_leaves_a_fifo_or_a_link_named_as_a_temporary_where_it_is(model, sources, tmp_path):
    """Only regular files are a killed run's temporaries: a FIFO of that name (opening it would wait for a writer
    for ever) and a link (what it leads to is not the run's) are left, and the run goes on."""
    out, kept = tmp_path / "out", tmp_path / "kept.txt"
    out.mkdir()
    kept.write_text("not the run's")
    fifo, link = out / f".short.safetensors.{'0' * 32}.tmp", out / f".short.safetensors.{'1' * 32}.tmp"
    os.mkfifo(fifo)
    link.symlink_to(kept)
    done = []
    run = threading.Thread(target=lambda: done.append(encode(model, [sources["short"]], out)), daemon=True)
    run.start()
    run.join(timeout=120)
    assert done and done[0].done == [str(sources["short"])]
    assert fifo.exists() and link.is_symlink() and kept.read_text() == "not the run's"


def test_a_resume_leaves_a_temporary_another_run_is_writing_and_removes_a_killed_ones(model, tmp_path):
    """Two runs on one folder (a requeued job beside the one it replaces): the second's clean-up must not remove the
    temporary the first is writing, but a killed run's (its lock gone with its process) goes."""
    import subprocess
    import sys

    from titok_fast.files import AtomicFile
    from titok_fast.manifest import Manifest

    writing = AtomicFile(tmp_path / "a.safetensors").__enter__()  # held (locked) by this process while it writes
    script = "import sys; from titok_fast.files import AtomicFile; print(AtomicFile(sys.argv[1]).__enter__().temporary)"
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "b.safetensors")], capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    files = [(tmp_path / f"{n}.mp4", n) for n in ("a", "b")]
    pipeline.plan_outputs(model, "eager", files, tmp_path, SETTINGS, Manifest(None, pipeline.Summary()))
    assert os.path.exists(writing.temporary) and not os.path.exists(killed)
    with open(writing.temporary, "wb") as file:
        file.write(b"complete")
    writing.commit()  # the first run finishes its file as if nothing had happened
    assert (tmp_path / "a.safetensors").read_bytes() == b"complete"


def test_a_file_written_alone_removes_what_a_killed_writer_of_it_left(tmp_path):
    """A report, a figure or converted weights are written alone, in a folder no run cleans up: a writer killed
    midway (an eval --json on a slow disk) left its temporary there for good. Written with ``tidy`` (as those
    are), a file removes the temporaries of its own name that no live writer holds; another file's, and one a
    writer holds now, stay."""
    import subprocess
    import sys

    from titok_fast.files import AtomicFile

    script = "import sys; from titok_fast.files import AtomicFile; print(AtomicFile(sys.argv[1]).__enter__().temporary)"

    def killed(name):  # the temporary of a writer that died while writing it (its lock gone with it)
        return subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip

    left, other = killed("eval.json"), killed("other.json")
    write_atomically(tmp_path / "eval.json", b"{}")  # (the token files' way: their run cleans their folder)
    assert os.path.exists(left)
    writing = AtomicFile(tmp_path / "eval.json").__enter__()  # a live writer of the same file
    lookalike = tmp_path / ".eval.json.not-a-temporary.tmp"
    lookalike.write_bytes(b"a user's")
    write_atomically(tmp_path / "eval.json", b"{1}", tidy=True)
    assert (tmp_path / "eval.json").read_bytes() == b"{1}"
    assert not os.path.exists(left) and os.path.exists(other) and os.path.exists(writing.temporary)
    assert lookalike.read_bytes() == b"a user's"
    writing.discard()


def test_an_error_committing_a_file_is_said_of_the_file_not_its_temporary(tmp_path, monkeypatch):
    """A sync's error names no file, a rename's the temporary: either is said of the file asked for (decode and
    encode tell a write's failure by it), with its errno; the temporary is gone."""
    from titok_fast import files
    from titok_fast.files import AtomicFile

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files.os, "fsync", failing)
    for write in (lambda: write_atomically(tmp_path / "a.json", b"{}"),
                  lambda: AtomicFile(tmp_path / "a.json").__enter__().commit()):  # fmt: skip
        with pytest.raises(OSError) as raised:
            write()
        assert (raised.value.errno, raised.value.filename) == (errno.EIO, str(tmp_path / "a.json"))
    assert not list(tmp_path.iterdir())


def test_a_temporary_another_process_locked_first_is_given_up_for_a_new_one(tmp_path, monkeypatch):
    """Another run's clean-up may open and lock a new temporary between its creation and its writer's lock (it
    then removes it): the writer held no lock but took it for its own, and its commit failed. It now starts again
    under a new name (where the file system has no locks at all, a temporary is kept unlocked, as before)."""
    import errno

    from titok_fast import files

    real, names = files.fcntl.flock, []

    def first_taken(fd, operation):
        names.append(os.readlink(f"/proc/self/fd/{fd}"))
        if len(names) == 1:
            raise OSError(errno.EWOULDBLOCK, "Resource temporarily unavailable")
        return real(fd, operation)

    monkeypatch.setattr(files.fcntl, "flock", first_taken)
    with files.AtomicFile(tmp_path / "a.safetensors") as target:
        assert target.temporary == names[-1] != names[0] and not os.path.exists(names[0])
        with open(target.temporary, "wb") as file:
            file.write(b"complete")
    assert (tmp_path / "a.safetensors").read_bytes() == b"complete"
    monkeypatch.setattr(files.fcntl, "flock", lambda fd, operation: (_ for _ in ()).throw(OSError(errno.ENOLCK, "")))
    with files.AtomicFile(tmp_path / "b.safetensors") as target:  # no locks here: written unlocked
        with open(target.temporary, "wb") as file:
            file.write(b"written")
    assert (tmp_path / "b.safetensors").read_bytes() == b"written"


def test_a_temporary_removed_before_it_was_locked_is_made_again_and_held(tmp_path, monkeypatch):
    """A cleanup that removes a new temporary between its creation and its lock: the writer would hold a lock on
    a file no longer there and write, unlocked, to a file of that name made anew, which the next cleanup removes
    while it is written. It makes one under a new name and holds the lock on the file its name holds."""
    from titok_fast import files

    real, calls = files.fcntl.flock, []

    def removed_first(fd, operation):
        calls.append(fd)
        if len(calls) == 1:
            os.unlink(os.readlink(f"/proc/self/fd/{fd}"))  # (a cleanup came first)
        return real(fd, operation)

    monkeypatch.setattr(files.fcntl, "flock", removed_first)
    target = files.AtomicFile(tmp_path / "a.safetensors")
    target.create()
    try:
        assert len(calls) == 2 and os.stat(target.temporary).st_ino == os.fstat(target._lock).st_ino
    finally:
        target.discard()


def test_where_locks_are_not_kept_only_an_old_temporary_is_taken_as_abandoned(tmp_path, monkeypatch):
    """On a file system without locks (NFS mounted without them), a temporary cannot be told in use by its lock:
    one changed within ABANDONED_UNLOCKED_SECONDS (another machine's run writing it) is kept, an older one goes."""
    from titok_fast import files
    from titok_fast.files import ABANDONED_UNLOCKED_SECONDS, remove_abandoned

    monkeypatch.setattr(files.fcntl, "flock", lambda fd, operation: (_ for _ in ()).throw(OSError(errno.ENOLCK, "")))
    fresh, old = tmp_path / f".a.safetensors.{'0' * 32}.tmp", tmp_path / f".b.safetensors.{'1' * 32}.tmp"
    fresh.write_bytes(b"being written")
    old.write_bytes(b"left by a killed run")
    then = time.time() - ABANDONED_UNLOCKED_SECONDS - 60
    os.utime(old, (then, then))
    remove_abandoned(fresh)
    remove_abandoned(old)
    assert fresh.exists() and not old.exists()


def test_on_a_network_file_system_a_resume_removes_only_old_temporaries_of_its_outputs(model, tmp_path, monkeypatch):
    """Locks may not be seen across machines there (NFS mounted without them, or with local_lock=flock): a
    temporary of one of this job's outputs goes only once unchanged for an hour, as those of other outputs did
    (another machine may be writing it now)."""
    from titok_fast import files as files_module
    from titok_fast.files import ABANDONED_UNLOCKED_SECONDS
    from titok_fast.manifest import Manifest

    new, old = tmp_path / f".a.safetensors.{'0' * 32}.tmp", tmp_path / f".b.safetensors.{'1' * 32}.tmp"
    for path in (new, old):
        path.write_bytes(b"left")
    then = time.time() - ABANDONED_UNLOCKED_SECONDS - 60
    os.utime(old, (then, then))
    monkeypatch.setattr(files_module, "network_file_system", lambda path: "nfs4")
    files = [(tmp_path / f"{n}.mp4", n) for n in ("a", "b")]
    pipeline.plan_outputs(model, "eager", files, tmp_path, SETTINGS, Manifest(None, pipeline.Summary()))
    assert new.exists() and not old.exists()
    monkeypatch.setattr(files_module, "network_file_system", lambda path: None)  # a local disk: the lock tells
    pipeline.plan_outputs(model, "eager", files, tmp_path, SETTINGS, Manifest(None, pipeline.Summary()))
    assert not new.exists()


def test_a_run_killed_as_it_replaces_another_sources_token_file_leaves_that_source_not_encoded(model, tmp_path,
                                                                                             monkeypatch):
    """A token file another source's tokens made (the same output name) is replaced: that source's line saying
    they are gone is written before they are, so a SIGKILL after the file's rename and before the done line no
    longer leaves both sources' latest lines giving that token file (the first one's said done)."""
    from titok_fast.manifest import MANIFEST_NAME, Manifest, read_manifest

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = make_video(tmp_path / "one" / "clip.mp4", frames=12, height=32, width=32, fps=8)
    second = make_video(tmp_path / "two" / "clip.mp4", frames=12, height=32, width=32, fps=8)
    out = tmp_path / "tokens"
    assert encode_files(model, Engine(model), [(first, "clip")], out, SETTINGS, workers=1).done

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")  # (the process ends here: no line after the token file)

    monkeypatch.setattr(Manifest, "done", killed)
    with pytest.raises(KeyboardInterrupt):
        encode_files(model, Engine(model), [(second, "clip")], out, SETTINGS, workers=1)
    assert load_tokens(out / "clip.safetensors").source == str(second.resolve())
    latest = {row["source"]: row["status"] for row in read_manifest(out / MANIFEST_NAME, latest=True)}
    assert latest[str(first.resolve())] == "not-encoded"


def test_a_run_that_stops_lists_exactly_the_files_it_did_not_settle(model, sources, tmp_path, monkeypatch):
    """The files done or failed before the run stopped keep their lines; every other one is "not-encoded", once."""
    from titok_fast.manifest import MANIFEST_NAME, read_manifest

    breaks_at_clip(monkeypatch, 12)  # short (1 clip), broken (fails after 1) and odd (5) are settled by then
    files = [sources["short"], sources["broken"], sources["odd"], sources["long"], sources["black"]]
    with pytest.raises(RuntimeError, match="cannot allocate memory"):
        encode(model, files, tmp_path, workers=1, max_clips=1)
    rows = read_manifest(tmp_path / MANIFEST_NAME)
    assert sorted((r["source"], r["status"]) for r in rows) == sorted([
        (str(sources["short"]), "done"), (str(sources["broken"]), "failed"), (str(sources["odd"]), "done"),
        (str(sources["long"]), "not-encoded"), (str(sources["black"]), "not-encoded"),
    ])  # fmt: skip


def test_decode_fails_only_the_token_file_that_breaks_it_whatever_the_error(model, sources, tmp_path, monkeypatch):
    """A stranger's token file may break decoding in ways nobody foresaw (OverflowError, IndexError, a zero-chunk
    file built around the checks): that file fails, named, in one line; the others are decoded. An interrupt
    still ends the run."""
    import copy

    encode(model, [sources["short"]], tmp_path / "tok")
    good = tmp_path / "tok" / "short.safetensors"
    real = load_tokens(good)
    empty = copy.copy(real)  # no chunks: the checks of a TokenFile's construction are not run by a copy
    object.__setattr__(empty, "token_counts", torch.zeros(0, dtype=torch.int32))
    object.__setattr__(empty, "grids", torch.zeros(0, 3, dtype=torch.int32))
    errors = {"overflow": OverflowError("cannot convert float infinity to integer"), "index": IndexError()}

    def fake_load(path, data=None):
        name = pipeline.Path(path).stem
        if name in errors:
            raise errors[name]
        return empty if name == "empty" else real

    monkeypatch.setattr(pipeline, "load_tokens", fake_load)
    paths = [tmp_path / f"{n}.safetensors" for n in ("overflow", "index", "empty", "short")]
    scores = []
    summary = decode_files(Engine(model), paths, tmp_path / "out", with_source=True, scores=scores)
    assert summary.failed == [
        (str(paths[0]), "OverflowError: cannot convert float infinity to integer"),
        (str(paths[1]), "IndexError"),
        (str(paths[2]), f"{paths[2]} holds no chunks: nothing to decode"),
    ]
    assert summary.done == [str(paths[3])] and len(scores) == 1  # the good file's one chunk
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["short.mp4"]
    with pytest.raises(ValueError, match="holds no chunks"):
        next(pipeline.source_chunks(empty))

    errors["short"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        decode_files(Engine(model), paths[3:], tmp_path / "again")


def test_decode_stops_on_a_fault_no_token_file_explains(model, sources, tmp_path, monkeypatch):
    """A CUDA error leaves the device unusable: decode went on and failed every later file, one line each, where
    encode stops. It now stops on it, and after GIVE_UP_AFTER unforeseen failures in a row; foreseen ones (a file
    of other weights, a damaged one) fail alone however many, and a success starts the count again."""
    encode(model, [sources["short"]], tmp_path / "tok")
    real, fault = load_tokens(tmp_path / "tok" / "short.safetensors"), {"error": None}
    monkeypatch.setattr(pipeline, "GIVE_UP_AFTER", 3)

    def fake_load(path, data=None):
        name = pipeline.Path(path).stem
        if name.startswith("bad"):
            raise ValueError(f"{path}: not a token file")
        if name.startswith("broken") or (fault["error"] and name.startswith("late")):
            raise fault["error"] or IndexError()
        return real

    monkeypatch.setattr(pipeline, "load_tokens", fake_load)
    names = ["bad0", "bad1", "bad2", "bad3", "broken0", "broken1", "ok0", "broken2", "broken3", "ok1"]
    paths = [tmp_path / f"{n}.safetensors" for n in names]
    summary = decode_files(Engine(model), paths, tmp_path / "out")
    assert summary.done == [str(tmp_path / "ok0.safetensors"), str(tmp_path / "ok1.safetensors")]
    assert len(summary.failed) == 8
    with pytest.raises(RuntimeError, match=r"^giving up after 3 token files in a row failed alone: IndexError"):
        decode_files(Engine(model), [tmp_path / f"broken{i}.safetensors" for i in range(4)], tmp_path / "out2")
    fault["error"] = RuntimeError("CUDA error: an illegal memory access was encountered")
    late = [tmp_path / "ok2.safetensors", tmp_path / "late0.safetensors", tmp_path / "late1.safetensors"]
    with pytest.raises(RuntimeError, match="^CUDA error: an illegal memory access"):
        decode_files(Engine(model), late, tmp_path / "out3")
    assert [p.name for p in (tmp_path / "out3").iterdir()] == ["ok2.mp4"]  # what was finished stays


def test_a_missing_listed_file_fails_alone_and_links_to_folders_are_followed_once(tmp_path, capsys):
    from titok_fast.pipeline import InputError, collect_inputs

    (tmp_path / "v").mkdir()
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)
    for name in ("v/a.mp4", "elsewhere/b.mp4", "elsewhere/deeper/c.mkv"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "v" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "v" / "twice").symlink_to(tmp_path / "elsewhere")  # a second way into the same folder
    (tmp_path / "elsewhere" / "deeper" / "up").symlink_to(tmp_path / "v")  # a cycle
    found = collect_inputs([tmp_path / "v"])
    assert [(str(p.relative_to(tmp_path)), n) for p, n in found] == [
        ("v/a.mp4", "a"), ("v/linked/b.mp4", "linked/b"), ("v/linked/deeper/c.mkv", "linked/deeper/c"),
    ]  # fmt: skip
    notices = capsys.readouterr().err.splitlines()
    assert sorted(notices) == sorted(
        f"titok-fast: {tmp_path / 'v' / p}: the same folder as {tmp_path / 'v' / first}, listed already (a link leads "
        "to one of them)"
        for p, first in (("twice", "linked"), ("linked/deeper/up", ""))
    )

    (tmp_path / "elsewhere" / "deeper" / "up").unlink()
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'v' / 'a.mp4'}\n# a comment\n\ngone.mp4\n{tmp_path / 'elsewhere'}\n")
    assert collect_inputs([listing]) == [
        (tmp_path / "v" / "a.mp4", "a"), (tmp_path / "gone.mp4", "gone"), (tmp_path / "elsewhere" / "b.mp4", "b"),
        (tmp_path / "elsewhere" / "deeper" / "c.mkv", "deeper/c"),
    ]  # fmt: skip
    with pytest.raises(InputError, match="input '.*gone.mp4' does not exist"):  # typed: stops the run up front
        collect_inputs([tmp_path / "gone.mp4"])


def test_inputs_that_would_write_one_token_file_are_refused_all_at_once(tmp_path):
    """a.mp4 and a.mkv, b.mp4 and b.mkv, ...: refused up front, naming the first pair and how many more (each found
    one run at a time before); where outputs are not written (eval), all are kept."""
    from titok_fast.pipeline import InputError, collect_inputs

    for stem in "abc":
        for suffix in (".mp4", ".mkv"):
            (tmp_path / f"{stem}{suffix}").write_bytes(b"x")
    a, b = (re.escape(str(tmp_path / name)) for name in ("a", "b"))
    with pytest.raises(InputError, match=(
        f"^inputs {a}.mkv and {a}.mp4 would both write a.safetensors; rename one \\(and 2 more such pair\\(s\\), the "
        f"next: inputs {b}.mkv and {b}.mp4 would both write b.safetensors\\)$"
    )):  # fmt: skip
        collect_inputs([tmp_path])
    with pytest.raises(InputError, match=r"rename one$"):  # one pair, though a file of it is given twice
        collect_inputs([tmp_path / "a.mp4", tmp_path / "a.mkv", tmp_path / "a.mkv"])
    assert len(collect_inputs([tmp_path], outputs=False)) == 6


def test_an_output_in_a_folder_that_another_output_or_the_manifest_would_be_is_refused_up_front(tmp_path):
    """An input folder holding clip.mp4 and a subfolder clip.safetensors/ of videos: clip.safetensors would be both
    a token file and a folder of them, and a subfolder manifest.jsonl/ the manifest's folder. Found when the run
    wrote the second, after encoding it; now refused before any work, naming both. Decoding checks its mp4 names
    the same way; where outputs are not written (eval), both are kept."""
    from titok_fast.pipeline import InputError, collect_inputs, collect_token_files

    for name in ("v/clip.mp4", "v/clip.safetensors/deeper/a.mp4", "v/b.mp4"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    first, second = tmp_path / "v" / "clip.mp4", tmp_path / "v" / "clip.safetensors" / "deeper" / "a.mp4"
    with pytest.raises(InputError, match=(
        f"^inputs {re.escape(str(first))} and {re.escape(str(second))} clash: {re.escape(str(second))} would write "
        f"clip.safetensors/deeper/a.safetensors in a folder clip.safetensors, which is {re.escape(str(first))}'s "
        "output file; rename one$"
    )):  # fmt: skip
        collect_inputs([tmp_path / "v"])
    assert len(collect_inputs([tmp_path / "v"], outputs=False)) == 3
    (tmp_path / "v" / "clip.safetensors").rename(tmp_path / "v" / "manifest-0-of-2.jsonl")
    with pytest.raises(InputError, match=(
        rf"^input {re.escape(str(tmp_path / 'v' / 'manifest-0-of-2.jsonl' / 'deeper' / 'a.mp4'))} would write "
        "manifest-0-of-2.jsonl/deeper/a.safetensors in a folder manifest-0-of-2.jsonl, which is the output folder's "
        "own file; rename its folder$"
    )):  # fmt: skip
        collect_inputs([tmp_path / "v"])
    (tmp_path / "v" / "manifest-0-of-2.jsonl").rename(tmp_path / "v" / "manifest.jsonl.d")
    assert [n for _, n in collect_inputs([tmp_path / "v"])] == ["b", "clip", "manifest.jsonl.d/deeper/a"]

    for name in ("t/x.safetensors", "t/x.mp4/y.safetensors"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(InputError, match=r"^token files .*x\.safetensors and .*y\.safetensors clash: .* would "
                       r"write x\.mp4/y\.mp4 in a folder x\.mp4, which is .*x\.safetensors's output file"):
        collect_token_files([tmp_path / "t"])


def test_a_list_on_a_network_file_system_has_its_entries_looked_at_ahead_in_threads(tmp_path, monkeypatch):
    """Each entry of a list is looked at (a folder, another list, or a file to encode?): a round trip per entry on
    a network file system, so threads look ahead there (here two entries at once, or the looks would wait for each
    other in vain); the inputs are the same, in the same order, as when the run's thread looks at each itself."""
    from titok_fast.pipeline import collect_inputs

    (tmp_path / "v" / "sub").mkdir(parents=True)
    for name in ("a.mp4", "sub/b.mkv", "c.webm"):
        (tmp_path / "v" / name).write_bytes(b"x")
    (tmp_path / "more.lst").write_text("v/c.webm\n")
    (tmp_path / "list.txt").write_text("v/a.mp4\nv/sub\ngone.mp4\nmore.lst\nv/c.webm\nv/a.mp4/x.mp4\n")
    local = collect_inputs([tmp_path / "list.txt"])
    assert local == [(tmp_path / "v" / "a.mp4", "a"), (tmp_path / "v" / "sub" / "b.mkv", "b"),
                     (tmp_path / "gone.mp4", "gone"), (tmp_path / "v" / "c.webm", "c"),
                     (tmp_path / "v" / "a.mp4" / "x.mp4", "x")]  # fmt: skip

    looks = _calls_recorded(monkeypatch, "_lists_more", len, meet=threading.Barrier(2, timeout=30))
    monkeypatch.setattr(pipeline, "FETCH_CHUNK", 1)
    monkeypatch.setattr(pipeline, "network_file_system", lambda path: "nfs")
    assert collect_inputs([tmp_path / "list.txt"]) == local
    assert len(looks) == 7 and all(name.startswith("titok-fast-ahead") for _, name in looks), looks


def test_a_folder_gives_its_video_files_by_extension_in_any_case(tmp_path):
    from titok_fast.pipeline import collect_inputs

    names = ["a.MP4", "b.3gp", "c.m2ts", "d.mts", "e.ogv", "f.mxf", "g.vob", "h.Mkv", "notes.txt", "meta.json", "x"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert [n for _, n in collect_inputs([tmp_path])] == list("abcdefgh")
    assert collect_inputs([tmp_path / "x"]) == [(tmp_path / "x", "x")]  # named: read whatever its name


def test_lists_that_name_one_another_again_and_again_are_read_once_and_bounded(tmp_path, monkeypatch):
    """A stranger's lists of a few kilobytes naming one another a thousand times each would name a billion files:
    each list and folder is read once under the list given, the files named are bounded (MAX_REACHED) and so is
    the nesting (MAX_LIST_DEPTH), each in one line naming the list."""
    from titok_fast import pipeline
    from titok_fast.pipeline import InputError, collect_inputs

    for name in ("x.mp4", "d/y.mp4", "d/z.mp4"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "l0.txt").write_text("l1.txt\n" * 30)
    (tmp_path / "l1.txt").write_text("l2.txt\nd\n" * 30)
    (tmp_path / "l2.txt").write_text("x.mp4\n" * 30)
    read = []
    listed = pipeline._listed
    monkeypatch.setattr(pipeline, "_listed", lambda path: read.append(path.name) or listed(path))
    found = collect_inputs([tmp_path / "l0.txt"])
    assert found == [(tmp_path / "x.mp4", "x"), (tmp_path / "d" / "y.mp4", "y"), (tmp_path / "d" / "z.mp4", "z")]
    assert read == ["l0.txt", "l1.txt", "l2.txt"]
    monkeypatch.setattr(pipeline, "MAX_REACHED", 31)  # l2.txt names 30, the folder 2 more
    with pytest.raises(InputError, match=rf"^the inputs name more than 31 files \(passed in '{tmp_path / 'd'}', "):
        collect_inputs([tmp_path / "l0.txt"])
    chain = [tmp_path / f"c{i}.txt" for i in range(pipeline.MAX_LIST_DEPTH + 1)]
    for here, below in zip(chain, [*chain[1:], tmp_path / "x.mp4"], strict=True):
        here.write_text(f"{below}\n")
    assert collect_inputs([chain[1]]) == [(tmp_path / "x.mp4", "x")]  # (MAX_LIST_DEPTH lists)
    with pytest.raises(InputError, match=rf"^list '{chain[-1]}' is nested more than 64 lists deep \(a list"):
        collect_inputs([chain[0]])


def test_only_a_file_systems_own_lost_and_found_is_passed_over(tmp_path, monkeypatch):
    """``lost+found`` at the root of a mounted file system is fsck's, not listed; a dataset's folder of that name
    elsewhere is listed as any other (its videos were dropped without a word)."""
    from titok_fast.pipeline import collect_inputs

    for name in ("a.mp4", "lost+found/rescued.mp4"):
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_bytes(b"x")
    data = tmp_path / "data"
    rescued = (data / "lost+found" / "rescued.mp4", "lost+found/rescued")
    assert collect_inputs([data]) == [(data / "a.mp4", "a"), rescued]
    ismount = os.path.ismount  # (False for a link, even to a mount point)
    monkeypatch.setattr(os.path, "ismount", lambda path: str(path) == str(data) or ismount(path))
    assert collect_inputs([data]) == [(data / "a.mp4", "a")]
    (tmp_path / "link").symlink_to(data)  # a disk reached through a link, as an input or inside a dataset
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "disk").symlink_to(data)
    assert collect_inputs([tmp_path / "link"]) == [(tmp_path / "link" / "a.mp4", "a")]
    assert collect_inputs([tmp_path / "ds"]) == [(tmp_path / "ds" / "disk" / "a.mp4", "disk/a")]


def test_a_file_reached_twice_is_one_input_and_lists_are_read_once_as_bytes(tmp_path, capsys):
    """A file reached through a folder and its sub-folder, a link (under the same name), or a path with '..' is
    encoded once, under the first name, but a link under another name is an input of its own; a list naming itself
    (directly or through another) is read once; a list saved with a byte order mark and CRLF endings, naming a file
    whose name is not UTF-8, reads as any other."""
    from titok_fast.pipeline import InputError, collect_inputs

    v = tmp_path / "v"
    (v / "sub").mkdir(parents=True)
    for name in ("a.mp4", "sub/c.mp4"):
        (v / name).write_bytes(b"x")
    (tmp_path / "link").symlink_to(v)
    found = collect_inputs([v, v / "sub", tmp_path / "link", v / "sub" / ".." / "a.mp4"])
    assert found == [(v / "a.mp4", "a"), (v / "sub" / "c.mp4", "sub/c")]
    notice = f"titok-fast: {v / 'sub' / 'c.mp4'}: reached again (as c); encoded once, as sub/c\n"
    assert capsys.readouterr().err == notice
    for n in range(5):
        (v / "sub" / f"m{n}.mp4").write_bytes(b"x")
    assert len(collect_inputs([v, v / "sub"])) == 7  # 6 reached again as sub/...: 3 said, then a count
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 4 and said[-1] == ("titok-fast: ... and 3 more input(s) reached again under another name; "
                                           "each encoded once, as first named")  # fmt: skip
    for n in range(5):
        (v / "sub" / f"m{n}.mp4").unlink()
    (v / "split").mkdir()
    (v / "split" / "c.mp4").symlink_to(v / "sub" / "c.mp4")  # a split made of links: a token file of its own
    split = collect_inputs([v])
    assert split == [(v / "a.mp4", "a"), (v / "split" / "c.mp4", "split/c"), (v / "sub" / "c.mp4", "sub/c")]
    (v / "split" / "c.mp4").unlink()

    odd = os.fsencode(v) + b"/\xff.mp4"
    with open(odd, "wb") as f:
        f.write(b"x")
    (tmp_path / "self.txt").write_bytes(b"\xef\xbb\xbfv/a.mp4\r\nself.txt\r\nother.txt\r\n v/\xff.mp4\r\n")
    (tmp_path / "other.txt").write_text("self.txt\nv/sub\n")
    odd = (Path(os.fsdecode(odd)), os.fsdecode(b"\xff"))
    assert collect_inputs([tmp_path / "self.txt"]) == [(v / "a.mp4", "a"), (v / "sub" / "c.mp4", "c"), odd]
    notice = f"titok-fast: {tmp_path / 'self.txt'}: a list that names itself, directly or through another; not read"
    assert capsys.readouterr().err.splitlines() == [f"{notice} again"] * 2
    (tmp_path / "w").mkdir()  # names beginning with '#' or a space: listed after ./ (the spaces around a path go)
    for name in ("#hash.mp4", " lead.mp4"):
        (tmp_path / "w" / name).write_bytes(b"x")
    (tmp_path / "w" / "odd.txt").write_text("#hash.mp4\n ./#hash.mp4 \n./ lead.mp4\n")
    assert collect_inputs([tmp_path / "w" / "odd.txt"]) == [(tmp_path / "w" / n, n[:-4]) for n in ("#hash.mp4",
                                                                                                 " lead.mp4")]
    ds = tmp_path / "ds"  # a list of a dataset whose folders repeat file names
    for name in ("a/0001.mp4", "b/0001.mp4", "b/c/0002.mkv"):
        (ds / name).parent.mkdir(parents=True, exist_ok=True)
        (ds / name).write_bytes(b"x")
    (ds / "all.txt").write_text("a/0001.mp4\n./b/0001.mp4\nb/c/../c/0002.mkv\n")
    with pytest.raises(InputError, match=r"would both write 0001\.safetensors; rename one \(or name the files of a "
                                         r"list by their path below its folder: --list-names relative\)$"):  # fmt: skip
        collect_inputs([ds / "all.txt"])
    assert [name for _, name in collect_inputs([ds / "all.txt"], list_names="relative")] == ["a/0001", "b/0001",
                                                                                            "b/c/0002"]  # fmt: skip
    (ds / "out.txt").write_text(f"a/0001.mp4\n{tmp_path / 'w' / '#hash.mp4'}\n")
    with pytest.raises(InputError, match=r"names '.*#hash\.mp4', outside the list's folder: --list-names relative"):
        collect_inputs([ds / "out.txt"], list_names="relative")
    (ds / "link").symlink_to(tmp_path / "w")  # link/../x is the x beside the link's target: outside the folder
    (ds / "dotdot.txt").write_text("a/0001.mp4\nlink/../w/#hash.mp4\n")
    with pytest.raises(InputError, match=r"names '.*link/\.\./w/#hash\.mp4', outside the list's folder"):
        collect_inputs([ds / "dotdot.txt"], list_names="relative")
    (ds / "folders.txt").write_text("a\nb\n")  # folders named in a list: each keeps its structure below itself...
    with pytest.raises(InputError, match=r"would both write 0001\.safetensors; rename one \(or name the files of a "
                                         r"list by their path below its folder: --list-names relative\)$"):  # fmt: skip
        collect_inputs([ds / "folders.txt"])
    relative = [(ds / n, n[:-4]) for n in ("a/0001.mp4", "b/0001.mp4", "b/c/0002.mkv")]  # ...or below the list's
    assert collect_inputs([ds / "folders.txt"], list_names="relative") == relative
    for name in ("a", "b"):  # lists named in a list: their files below the folder of the list given
        (ds / name / "list.txt").write_text("".join(f"{p.relative_to(ds / name)}\n" for p, _ in relative
                                                    if p.is_relative_to(ds / name)))  # fmt: skip
    (ds / "lists.txt").write_text("a/list.txt\nb/list.txt\n")
    assert collect_inputs([ds / "lists.txt"], list_names="relative") == relative
    assert [n for _, n in collect_inputs([ds / "b" / "list.txt"], list_names="relative")] == ["0001", "c/0002"]
    (ds / "b" / "list.txt").write_text(f"0001.mp4\n{tmp_path / 'w'}\n")  # a folder outside the given list's
    with pytest.raises(InputError, match=rf"^list '{ds / 'lists.txt'}' names '{tmp_path / 'w'}/ lead\.mp4' \(through "
                                         rf"'{tmp_path / 'w'}'\), outside the list's folder"):  # fmt: skip
        collect_inputs([ds / "lists.txt"], list_names="relative")

    (v / "gone.mp4").symlink_to(tmp_path / "nothing.mp4")  # a video of the dataset gone: an input, to fail alone
    (v / "loop.mp4").symlink_to(v / "loop.mp4")
    expected = [(v / "a.mp4", "a"), (v / "gone.mp4", "gone"), (v / "loop.mp4", "loop"), (v / "sub" / "c.mp4", "sub/c")]
    assert collect_inputs([v]) == [*expected, odd] and capsys.readouterr().err == ""
    with pytest.raises(InputError, match="input '/dev/null' is not a regular file or a folder"):
        collect_inputs(["/dev/null"])
    (tmp_path / "mac.txt").write_bytes(b"v/a.mp4\rv/sub/c.mp4\r")  # lines ended by a bare CR
    assert collect_inputs([tmp_path / "mac.txt"]) == [(v / "a.mp4", "a"), (v / "sub" / "c.mp4", "c")]
    endless = tmp_path / "endless.txt"  # (a sparse file of gigabytes without a line end was once read whole)
    endless.write_bytes(b"v/a.mp4\n" + b"x" * 20000)
    with pytest.raises(InputError, match=r"^list '.*endless.txt': line 2 is longer than 8192 bytes; expected one path "
                                         r"a line$"):  # fmt: skip
        collect_inputs([endless])
    (tmp_path / "binary.txt").write_bytes(b"v/a.mp4\nv/b\x00.mp4\n")  # (os.stat would raise a ValueError)
    with pytest.raises(InputError, match=r"^list '.*binary.txt': line 2 holds a NUL byte; expected one path a line$"):
        collect_inputs([tmp_path / "binary.txt"])


def _preprocessing_fails(monkeypatch, error, on=lambda frames: True):
    from titok_fast.preprocess import DevicePreprocessor

    real = DevicePreprocessor.__call__

    def call(self, frames):
        if on(frames):
            raise error
        return real(self, frames)

    monkeypatch.setattr(DevicePreprocessor, "__call__", call)


def test_an_error_preprocessing_on_the_device_fails_that_file_alone(model, sources, tmp_path, monkeypatch):
    """As with preprocessing in the decoding workers: the file whose clip could not be preprocessed fails (named,
    one line), the others are encoded; a fault of the device itself, or every file failing so, stops the run."""
    on_device = dataclasses.replace(SETTINGS, preprocess="device")
    files = [(sources[n], n) for n in ("long", "odd", "short")]
    engine = Engine(model, max_clips=2)
    _preprocessing_fails(monkeypatch, RuntimeError("can't allocate\nmemory"), on=lambda f: f.shape[1:3] == (37, 53))
    summary = encode_files(model, engine, files, tmp_path / "one", on_device, workers=1)
    assert summary.done == [str(sources["long"]), str(sources["short"])]
    assert summary.failed == [
        (str(sources["odd"]), f"{sources['odd']}: preprocessing clip 0 on cpu failed (RuntimeError: can't allocate "
                              "memory)")
    ]  # fmt: skip
    assert not (tmp_path / "one" / "odd.safetensors").exists()

    _preprocessing_fails(monkeypatch, RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="^CUDA error: an illegal memory access"):
        encode_files(model, engine, files, tmp_path / "fault", on_device, workers=1)

    monkeypatch.setattr(pipeline, "GIVE_UP_AFTER", 2)
    _preprocessing_fails(monkeypatch, ValueError("bad frames"))
    with pytest.raises(RuntimeError, match=r"^giving up after 2 file\(s\) in a row failed preprocessing on cpu"):
        encode_files(model, engine, files, tmp_path / "all", on_device, workers=1)


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_a_clip_whose_latents_are_nan_fails_its_file_alone(model, sources, tmp_path, monkeypatch, mode):
    """An overflow (here: the black video's patches made NaN as they enter the encoder) gives NaN latents, which
    have no tokens: that file fails in one line, and the others, batched with it, get the tokens they get alone
    (the fixed-shape path attends over a dense mask, where a zero weight times a NaN value would be NaN)."""
    def overflow(module, args, out):
        return torch.where((args[0] <= -0.99).all(-1, keepdim=True), torch.nan, out)

    handle = model.encoder.proj_in.register_forward_hook(overflow)
    try:
        files = [sources["long"], sources["black"], sources["short"]]
        summary = encode(model, files, tmp_path, mode=mode, monkeypatch=monkeypatch)
    finally:
        handle.remove()
    assert summary.done == [str(sources["long"]), str(sources["short"])]
    assert summary.failed == [(str(sources["black"]), "chunk 0 (at 0.00 s) gave the model NaN latents, which have no "
                               "tokens: its activations overflowed (float16 overflows where bfloat16 and float32 do "
                               "not) or its weights hold NaN")]  # fmt: skip
    assert not (tmp_path / "black.safetensors").exists()
    for name in ("long", "short"):
        stored = load_tokens(tmp_path / f"{name}.safetensors").all_indices()
        assert all(torch.equal(a.long(), b) for a, b in zip(stored, direct_indices(model, sources[name]), strict=True))


def test_runs_sharing_an_output_folder_append_whole_lines_to_one_manifest(tmp_path, monkeypatch):
    """Two runs at once (one per GPU, disjoint inputs) and a later one: every line of each stays whole, and
    read_manifest reads them all, or each input's latest."""
    from titok_fast.manifest import Manifest, read_manifest

    path = tmp_path / "manifest.jsonl"
    gpu0, gpu1 = Manifest(path, pipeline.Summary()), Manifest(path, pipeline.Summary())
    for i in range(3):
        gpu0.done(f"/v/shard0/{i}.mp4", tmp_path / f"shard0_{i}.safetensors", 12)
        gpu1.failed(f"/v/shard1/{i}.mp4", tmp_path / f"shard1_{i}.safetensors", "x " * 5000)  # longer than a buffer
    gpu0.close()
    gpu1.close()
    rows = read_manifest(path)
    assert [(r["source"], r["status"]) for r in rows] == [
        (f"/v/shard{s}/{i}.mp4", "done" if s == 0 else "failed") for i in range(3) for s in (0, 1)
    ]
    with Manifest(path, pipeline.Summary()) as later:  # a resumed run, which finds these token files complete
        later.skipped("/v/shard0/0.mp4", tmp_path / "shard0_0.safetensors")  # said done already: no line
        later.skipped("/v/shard1/0.mp4", tmp_path / "shard1_0.safetensors")  # said failed: a line says it is complete
        later.skipped("/v/shard0/1.mp4", tmp_path / "elsewhere.safetensors")  # done, into another token file
    assert later.summary.skipped == ["/v/shard0/0.mp4", "/v/shard1/0.mp4", "/v/shard0/1.mp4"]
    rows = read_manifest(path)
    assert [(r["source"], r["status"]) for r in rows[6:]] == [
        ("/v/shard1/0.mp4", "skipped"), ("/v/shard0/1.mp4", "skipped")
    ]  # fmt: skip
    latest = read_manifest(path, latest=True)
    assert [(r["source"], r["status"]) for r in latest[:3]] == [
        ("/v/shard0/0.mp4", "done"), ("/v/shard1/0.mp4", "skipped"), ("/v/shard0/1.mp4", "skipped")
    ]  # fmt: skip
    assert len(latest) == 6

    with open(path, "a") as file:
        file.write('{"source": "/v/cut.mp4", "tok')  # a line cut short (a full disk)
    with Manifest(path, pipeline.Summary()) as next_run:
        next_run.done("/v/next.mp4", tmp_path / "next.safetensors", 1)
    lines = path.read_text().splitlines()
    assert lines[-2] == '{"source": "/v/cut.mp4", "tok' and json.loads(lines[-1])["source"] == "/v/next.mp4"
    before = path.read_bytes()
    with open(path, "a") as file:
        file.write('{"source": "/v/cut.mp4", "tok')  # cut short again, on a disk still full at the next start
    from titok_fast import manifest as manifest_module

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left")

    real = manifest_module.os.write
    monkeypatch.setattr(manifest_module.os, "write", full)
    with pytest.raises(OSError, match=rf"^cannot write the manifest {re.escape(str(path))}: No space left$"):
        Manifest(path, pipeline.Summary()).__enter__()
    monkeypatch.setattr(manifest_module.os, "write", real)
    path.write_bytes(before)
    rows = read_manifest(path)  # the damage stays that line's: the others are all read
    assert len(rows) == 9 and rows[-1]["source"] == "/v/next.mp4" and "/v/cut.mp4" not in {r["source"] for r in rows}

    hostile = tmp_path / "hostile" / "manifest.jsonl"  # lines no job writes: passed over as a cut line is
    hostile.parent.mkdir()
    hostile.write_text("[" * 100_000 + "\n" + '{"n": ' + "9" * 5000 + "}\n" + "x" * (3 * manifest_module.MAX_LINE)
                       + "\n" + lines[-1] + "\n" + "y" * (manifest_module.MAX_LINE + 5))  # fmt: skip
    assert [r["source"] for r in read_manifest(hostile)] == ["/v/next.mp4"]
    assert len(manifest_module._settled(hostile.parent)[0]) == 1
    monkeypatch.setattr(manifest_module, "MAX_LINE", len(lines[-1]))  # a line of its length, line end included, is
    assert read_manifest(hostile) == []  # longer: never held whole, passed over
    with open(path, "a") as file:
        file.write('{"source": "/v/odd.mp4", "status": "lost"}\n')  # whole, but not a manifest line
    with pytest.raises(ValueError, match=r"line 11: expected an object with status in"):
        read_manifest(path)
    path.write_text('{"source": ["/v/a.mp4"], "status": "done"}\n')  # a source no job writes: no TypeError
    for latest in (False, True):
        with pytest.raises(ValueError, match=r"line 1: expected its source as a string"):
            read_manifest(path, latest=latest)


def test_a_folders_latest_lines_read_as_they_go_are_those_of_all_its_lines_in_order(tmp_path):
    """read_manifest(folder, latest=True) holds one line per source, not every line; it must give what taking the
    latest line of each source from all the folder's lines (in time order, stable) gives: clocks of machines
    disagree, lines of older versions have no time, and times tie."""
    import random

    from titok_fast.manifest import manifest_name, read_manifest

    rng = random.Random(0)
    for shard in (None, (0, 3), (1, 3), (2, 3)):
        with open(tmp_path / manifest_name(shard), "w") as file:
            for i in range(200):
                row = {"source": f"/v/{rng.randrange(30)}.mp4", "status": rng.choice(["done", "failed"]), "n": i}
                if rng.random() < 0.9:
                    row["time"] = f"2026-12-0{rng.randrange(1, 4)}T00:00:0{rng.randrange(3)}"
                file.write(json.dumps(row) + "\n")
    rows = read_manifest(tmp_path)
    assert len(rows) == 800
    assert read_manifest(tmp_path, latest=True) == list({row["source"]: row for row in rows}.values())


def test_a_manifests_own_lines_keep_the_order_they_were_written_in_whatever_the_clocks(tmp_path):
    """A shard requeued on another machine appends to the manifest its first run wrote on a machine whose clock ran
    minutes ahead: the lines of one file are in the order they were written, which sorting by time undid (an input
    done since read as not encoded, and every resume listed it again). The files are merged by time: the file whose
    next line is earliest goes first."""
    from titok_fast.manifest import _settled, manifest_name, read_manifest

    def line(source, status, time):
        return json.dumps({"source": source, "tokens": source + ".safetensors", "status": status, "time": time}) + "\n"

    (tmp_path / manifest_name((0, 2))).write_text(line("/v/a", "not-encoded", "10:05") + line("/v/a", "done", "10:00"))
    (tmp_path / manifest_name((1, 2))).write_text(line("/v/b", "done", "10:01"))
    (tmp_path / manifest_name()).write_text(line("/v/b", "failed", "10:03"))  # after b's done: its outcome
    said = [(r["source"], r["status"]) for r in read_manifest(tmp_path)]
    assert said == [("/v/b", "done"), ("/v/b", "failed"), ("/v/a", "not-encoded"), ("/v/a", "done")]
    latest = [(r["source"], r["status"]) for r in read_manifest(tmp_path, latest=True)]
    assert latest == [("/v/b", "failed"), ("/v/a", "done")]
    kept, left = _settled(tmp_path)
    assert kept[hash("/v/a")] == hash("/v/a.safetensors") and kept[hash("/v/b")] is None and not left


def test_a_folder_of_more_shard_manifests_than_open_files_allowed_is_read_whole(tmp_path):
    """A folder's manifests are merged, read at once: one descriptor held per shard's failed past the process's
    open-file limit (a job of 1,100 shards under the usual 1,024), and a resume then knew nothing of what was done.
    Past OPEN_AT_ONCE files, each is read a batch of lines at a time, closed in between: the same lines, in the
    same order, whatever the batch."""
    import subprocess
    import sys

    from titok_fast import manifest

    shards = 200
    for k in range(shards):
        rows = [{"source": f"/in/{k}.mp4", "status": status, "tokens": f"/out/{k}.safetensors",
                 "time": f"2026-01-01T00:{k % 60:02d}:{i:02d}"} for i, status in enumerate(["failed", "done"] * 70)]
        lines = [json.dumps(row) for row in rows]
        lines[3] = lines[3][:20]  # a line cut short, and a blank one: passed over
        (tmp_path / manifest.manifest_name((k, shards))).write_text("\n".join(lines) + "\n\n")  # fmt: skip
    one = tmp_path / manifest.manifest_name((7, shards))
    assert [*manifest._rows(one, 3)] == [*manifest._rows(one, 64)] == [*manifest._rows(one)]
    script = f"""if True:
        import resource
        from pathlib import Path
        from titok_fast import manifest
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        folder = Path({str(tmp_path)!r})
        rows = manifest.read_manifest(folder)
        latest = manifest.read_manifest(folder, latest=True)
        kept, left = manifest._settled(folder)
        print(len(rows), len(latest), {{row["status"] for row in latest}}, len(kept))
    """
    said = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert said.stdout.split("\n")[0] == f"{shards * 139} {shards} {{'done'}} {shards}", said.stderr[-2000:]


def test_a_folders_manifests_read_together_in_the_order_written_with_absolute_paths(tmp_path, monkeypatch):
    """Shards keep manifests of their own; read_manifest(folder) merges them (and the unsharded one) by each line's
    time, so an input's latest line is its outcome whichever run wrote it. Paths are recorded absolute, so runs
    started from different folders name an input alike."""
    from titok_fast.manifest import Manifest, manifest_name, read_manifest

    monkeypatch.chdir(tmp_path)
    (tmp_path / "v").mkdir()
    (tmp_path / "manifest-notes.jsonl").write_text("not a manifest\n")  # not one of ours: not read
    with Manifest(tmp_path / manifest_name((0, 2)), pipeline.Summary()) as shard0:
        shard0.failed("v/a.mp4", "a.safetensors", "no such file")
    with Manifest(tmp_path / manifest_name((1, 2)), pipeline.Summary()) as shard1:
        shard1.done("v/../v/b.mp4", "b.safetensors", 2)
    with Manifest(tmp_path / manifest_name(), pipeline.Summary()) as again:  # unsharded, after both
        again.done(tmp_path / "v" / "a.mp4", tmp_path / "a.safetensors", 3)
    with Manifest(tmp_path / manifest_name((0, 2)), pipeline.Summary()) as later:
        later.skipped("v/b.mp4", "b.safetensors")  # said done in shard 1's manifest: no line
        later.not_encoded("v/b.mp4", "b.safetensors", "stopped")
    rows = read_manifest(tmp_path)
    a, b = str(tmp_path / "v" / "a.mp4"), str(tmp_path / "v" / "b.mp4")
    assert [(r["source"], r["status"]) for r in rows] == [(a, "failed"), (b, "done"), (a, "done"), (b, "not-encoded")]
    assert rows[1]["tokens"] == str(tmp_path / "b.safetensors")
    latest = read_manifest(tmp_path, latest=True)
    assert [(r["source"], r["status"]) for r in latest] == [(a, "done"), (b, "not-encoded")]
    assert [r["status"] for r in read_manifest(tmp_path / manifest_name((0, 2)))] == ["failed", "not-encoded"]


def test_inputs_complete_under_other_names_are_said_once_when_encoded_again(model, sources, tmp_path, capsys):
    """A folder's job names its files by their paths under it, a list's by their stems: resumed over a list of the
    files a folder's run encoded, a job encoded them all again under new names without a word."""
    files = [sources["short"], sources["odd"]]
    engine = Engine(model)
    assert encode_files(model, engine, [(p, f"d/{p.stem}") for p in files], tmp_path, SETTINGS).done
    capsys.readouterr()
    again = encode_files(model, engine, [(p, p.stem) for p in files], tmp_path, SETTINGS)
    assert len(again.done) == 2
    said = [line for line in capsys.readouterr().err.splitlines() if "encoded as other token files" in line]
    assert said == [f"titok-fast: 2 input(s) this folder's manifest says were encoded as other token files (such as "
                    f"{files[0]}) are encoded again under the names given now: a list names a file by its stem, a "
                    "folder by its path under it; give the inputs as before to keep those token files"]  # fmt: skip
    assert encode_files(model, engine, [(p, f"d/{p.stem}") for p in files], tmp_path, SETTINGS).skipped
    assert "encoded as other token files" not in capsys.readouterr().err  # (the latest lines name the new files,
    # but those are complete too: nothing is encoded)


def test_an_input_whose_token_file_was_removed_is_not_said_complete_under_another_name(model, sources, tmp_path,
                                                                                        capsys):  # fmt: skip
    """Encoded again under the same name because its token file is gone, an input is not one the manifest says
    was encoded as another token file: that notice (give the inputs as before) would send the user looking for
    a renaming that never was."""
    files = [(sources["short"], "short")]
    engine = Engine(model)
    assert encode_files(model, engine, files, tmp_path, SETTINGS).done
    (tmp_path / "short.safetensors").unlink()
    capsys.readouterr()
    assert encode_files(model, engine, files, tmp_path, SETTINGS).done
    assert "encoded as other token files" not in capsys.readouterr().err


def test_a_job_stopped_again_says_not_encoded_once_per_input(tmp_path, monkeypatch):
    """A job over a million inputs stopped (preempted) again and again listed each input it never came to every
    time, a line apiece: 30 s and 265 MB of manifest a stop. An input whose latest line, as the job read it when
    it planned, says "not-encoded" for the same token file gets no other; the lines go LINES_AT_ONCE a write,
    whole; the summary counts every input left."""
    from titok_fast import manifest as manifest_module
    from titok_fast.manifest import Manifest, read_manifest

    path = tmp_path / "manifest.jsonl"
    inputs = [(f"/v/{n}.mp4", tmp_path / f"{n}.safetensors") for n in range(1200)]
    writes = []
    real_write = os.write
    monkeypatch.setattr(manifest_module.os, "write", lambda fd, data: writes.append(len(data)) or real_write(fd, data))
    with Manifest(path, pipeline.Summary()) as first:
        first.read_settled()
        first.forget_settled()
        first.list_not_encoded(inputs, "not encoded: the run was interrupted (SIGTERM)")
    assert len(writes) == 3 and len(read_manifest(path)) == 1200  # (512 + 512 + 176 lines)
    summary = pipeline.Summary()
    with Manifest(path, summary) as second:
        second.read_settled()
        second.forget_settled()
        second.done(*inputs[0], 1)
        left = [*inputs[1:], ("/v/5.mp4", tmp_path / "other.safetensors"), ("/v/new.mp4", tmp_path / "new.safetensors")]
        second.list_not_encoded(left, "not encoded: the run was interrupted (SIGTERM)")
    assert len(summary.failed) == 1201 and summary.done == ["/v/0.mp4"]
    rows = read_manifest(path)
    assert [(r["source"], r["status"]) for r in rows[1200:]] == [
        ("/v/0.mp4", "done"), ("/v/5.mp4", "not-encoded"), ("/v/new.mp4", "not-encoded"),
    ]  # fmt: skip
    with Manifest(path, pipeline.Summary()) as overwriting:  # (one that read nothing lists them all)
        overwriting.list_not_encoded(inputs[1:3], "stopped")
    assert len(read_manifest(path)) == 1205
    full = tmp_path / "full.jsonl"
    room = [1000]  # bytes the disk has left: the lines that fit whole are kept, the one cut short taken back

    def short_write(fd, data):
        if not room[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = real_write(fd, data[: room[0]])
        room[0] -= written
        return written

    monkeypatch.setattr(manifest_module.os, "write", short_write)
    with Manifest(full, pipeline.Summary()) as on_a_full_disk:
        on_a_full_disk.list_not_encoded(inputs, "stopped")  # (notice: not all listed; the job stops for its error)
    kept = full.read_bytes()
    lines = kept.splitlines()
    assert kept.endswith(b"\n") and len(read_manifest(full)) == len(lines) >= 3
    assert 1000 - len(kept) <= len(lines[-1]) + 2  # (no room for another whole line)


def test_shards_partition_the_inputs_by_output_name_whatever_their_order():
    from titok_fast.pipeline import select_shard

    files = [(Path(f"/data/{i % 7}/clip{i}.mp4"), f"{i % 7}/clip{i}") for i in range(2000)]
    shards = [select_shard(files, k, 8) for k in range(8)]
    assert sorted(f for shard in shards for f in shard) == sorted(files)  # disjoint, and together all of them
    assert all(180 < len(shard) < 320 for shard in shards)  # a hash spreads them (250 each on average)
    shuffled = files[::-1][:1500]  # another order, and fewer inputs: the others keep their shards
    kept = set(shuffled)
    expected = [[f for f in shard if f in kept][::-1] for shard in shards]
    assert [select_shard(shuffled, k, 8) for k in range(8)] == expected
    assert select_shard(files, 0, 1) == files
    with pytest.raises(ValueError, match="shard 8/8: expected 0 <= index < count"):
        select_shard(files, 8, 8)


def test_a_token_file_set_aside_is_put_back_only_where_nothing_is_there(tmp_path, monkeypatch):
    """Another run on the folder may make the token file, or put it back, between the look and the move: what is
    there is never replaced, and an aside gone meanwhile is no error; without hard links, a rename after a look."""
    aside, out = tmp_path / "a.safetensors.outdated", tmp_path / "a.safetensors"
    aside.write_bytes(b"old")
    out.write_bytes(b"made meanwhile")
    assert not pipeline._put_back(aside, out) and out.read_bytes() == b"made meanwhile" and aside.exists()
    out.unlink()
    assert pipeline._put_back(aside, out) and out.read_bytes() == b"old" and not aside.exists()
    assert not pipeline._put_back(aside, tmp_path / "b.safetensors")  # gone meanwhile

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    out.rename(aside)
    assert pipeline._put_back(aside, out) and out.read_bytes() == b"old"
    (tmp_path / "c.safetensors").write_bytes(b"there")
    out.rename(aside)
    assert not pipeline._put_back(aside, tmp_path / "c.safetensors") and aside.exists()


def test_what_a_token_file_records_per_chunk_is_compared_as_its_distinct_values_in_order():
    """A resume compares a token file's grids and token counts by their distinct values, in the order they first
    come, taken in torch (a list of a stranger's millions of chunks would take some 20 times the file)."""
    assert pipeline._distinct(torch.tensor([16, 8, 16, 4, 8], dtype=torch.int32)) == [16, 8, 4]
    grids = torch.tensor([[4, 32, 32], [8, 32, 32], [4, 32, 32]], dtype=torch.int32)
    assert pipeline._distinct(grids) == [[4, 32, 32], [8, 32, 32]]
    assert pipeline._recorded([8]) == 8 and pipeline._recorded([16, 8, 4]) == "16/8/4"
    assert pipeline._distinct(torch.arange(100, 0, -1), most=3) == [100, 99, 98, "..."]


def test_damaged_manifests_and_list_files_are_read_or_refused_in_one_line(tmp_path):
    """2000 manifests of job lines damaged from a fixed seed (bytes changed, fields of any JSON type, lines cut or
    ended by CR): read_manifest reads them or names a line (ValueError), a resume's look at them never fails
    (_settled), a job appends whole lines after them, and the same bytes as a list file are read or refused as
    an InputError."""
    import random

    from titok_fast import manifest as manifest_module
    from titok_fast.manifest import Manifest, read_manifest
    from titok_fast.pipeline import InputError, collect_inputs

    lines = [json.dumps({"source": f"/v/{n}.mp4", "tokens": f"/t/{n}.safetensors", "clips": n, "status": status,
                         "reason": "", "time": f"2026-01-0{n + 1}T00:00:00+00:00"})
             for n, status in enumerate(("done", "skipped", "failed", "not-encoded"))]  # fmt: skip
    values = [None, 1, -1, 1e308, "", [], {}, True, 2**70, "\x00", "done", ["/v/0.mp4"]]
    rng, folder = random.Random(0), tmp_path / "out"
    folder.mkdir()
    path, listing, outcomes = folder / manifest_module.MANIFEST_NAME, tmp_path / "list.txt", {"read": 0, "named": 0}
    for _ in range(2000):
        chosen = []
        for _ in range(rng.randint(0, 6)):
            line = rng.choice(lines)
            if rng.random() < 0.3:
                row = json.loads(line)
                row[rng.choice(sorted(row))] = rng.choice(values)
                line = json.dumps(row)
            elif rng.random() < 0.3:
                data = bytearray(line.encode())
                data[rng.randrange(len(data))] = rng.randrange(256)
                line = data.decode("latin-1")
            chosen.append(line)
        data = rng.choice(["\n", "\r\n", "\r"]).join(chosen).encode("utf-8", "surrogateescape")
        data += b"\n" if rng.random() < 0.7 else b""
        path.write_bytes(data)
        try:
            read_manifest(folder, latest=True)
            read_manifest(path)
            outcomes["read"] += 1
        except ValueError as e:
            assert re.search(r"line \d+: expected (an object with status in|its source as a string)", str(e)), e
            outcomes["named"] += 1
        manifest_module._settled(folder)  # (never raises)
        with Manifest(path, pipeline.Summary()) as manifest:
            manifest.done("/v/new.mp4", tmp_path / "new.safetensors", 1)
        written = path.read_bytes()
        assert written.endswith(b"\n") and json.loads(written.split(b"\n")[-2])["source"] == "/v/new.mp4"
        listing.write_bytes(data)
        try:
            collect_inputs([listing])
        except InputError:
            pass
    assert min(outcomes.values()) > 300, outcomes


def test_a_failure_names_its_file_once_whatever_its_name_holds():
    """A failure's reason, made one line, holds its file's name with the whitespace squashed (a newline in a name
    becomes a space): it is still the name it starts with, not said a second time."""
    assert pipeline._naming("d/a\nb.mp4", "d/a b.mp4: cannot be read") == "d/a b.mp4: cannot be read"
    assert pipeline._naming("d/a b.mp4", "d/a b.mp4 is a folder") == "d/a b.mp4 is a folder"
    assert pipeline._naming("d/x.mp4", "stalled") == "d/x.mp4: stalled"


def test_the_time_spent_checking_outputs_is_said_and_left_out_of_clips_per_second(model, sources, tmp_path,
                                                                                monkeypatch):
    """A resumed job checks every token file first (minutes for a million), silently: that time then counted as
    encoding time, in clips/s and in the share of the time the model waited, so a decode-bound run was reported
    model-bound. Here checking "takes" 100 s of a clock moved on by hand."""
    ahead, perf_counter, plan_outputs = [0.0], time.perf_counter, pipeline.plan_outputs

    def slow_plan(*args, **kwargs):
        ahead[0] += 100.0
        return plan_outputs(*args, **kwargs)

    monkeypatch.setattr(time, "perf_counter", lambda: perf_counter() + ahead[0])
    monkeypatch.setattr(pipeline, "plan_outputs", slow_plan)
    summary = encode(model, [sources["short"]], tmp_path, workers=1)
    assert summary.checking >= 100 and summary.seconds < 100
    assert re.search(r"clip\(s\) in [\d.]+ s \([\d.]+ clips/s\) after 10\d\.\d s checking outputs; ", summary.report(
        "encoded"))  # fmt: skip
    assert "checking outputs" not in dataclasses.replace(summary, checking=1.0).report("encoded")


def test_progress_in_a_log_is_a_line_a_minute(model, sources, tmp_path, monkeypatch, capsys):
    """Where stderr is not a terminal (a batch job's log) the bar drew nothing: a job of hours showed nothing until
    its summary. There a line is written every LOG_SECONDS (here: at every update), with what limits the run; a run
    shorter than that writes none."""
    files = [sources["long"], sources["short"], sources["odd"]]
    encode(model, files, tmp_path / "quiet", workers=1)
    assert "files done in" not in capsys.readouterr().err  # (under a minute)
    monkeypatch.setattr(pipeline, "LOG_SECONDS", 0.0)
    encode(model, files, tmp_path / "logged", workers=1)
    lines = [line for line in capsys.readouterr().err.splitlines() if "files done in" in line]
    assert lines and all("\r" not in line for line in lines)
    assert re.fullmatch(r"3/3 files done in 00:0\d, about 00:00 left, [\d.]+ clips/s, (model|decode)-bound \(waits "
                        r"\d+%, 1 decoding thread\).*", lines[-1])  # fmt: skip
    encode(model, files, tmp_path / "logged", workers=1)  # a resume: its outputs checked (minutes for a million)
    err = capsys.readouterr().err
    assert "clips/s" not in err  # (nothing left to encode: no rate, no decoder, nothing said to limit it)
    checking = [line for line in err.splitlines() if line.startswith("checking outputs: ")]
    assert checking and re.fullmatch(r"checking outputs: 3/3 files done in 00:0\d, about 00:00 left", checking[-1])
    assert decode_files(Engine(model), [tmp_path / "logged" / "short.safetensors"], tmp_path / "mp4").done
    assert "1/1 files done in" in capsys.readouterr().err


def test_progress_is_shown_between_batches_never_within_one(model, sources, tmp_path, monkeypatch):
    """A batch's results come back together: a line shown as they were added counted part of the batch (a log
    said 0 files and 1 clip done where 32 were: on a CPU a V1 batch takes minutes). What the bar shows is now
    counted between batches: each count of clips it shows is a sum of whole batches."""
    batches, shown = [0], []
    run_batch, describe = Engine._run_batch, pipeline.Limits.describe
    monkeypatch.setattr(Engine, "_run_batch", lambda self, batch, *a: batches.append(batches[-1] + len(batch))
                        or run_batch(self, batch, *a))  # fmt: skip
    monkeypatch.setattr(pipeline.Limits, "describe", lambda self: shown.append(self.clips) or describe(self))
    monkeypatch.setattr(pipeline, "Every", lambda *_: lambda: True)  # (due at every clip: the test is short)
    summary = encode(model, [sources["long"], sources["short"], sources["odd"]], tmp_path, workers=1)
    assert summary.clips == 12 and batches[-1] == 12 and len(batches) >= 5  # (3 clips a batch at most)
    assert shown and set(shown) <= set(batches), (shown, batches)


def test_the_time_left_in_a_log_goes_by_the_rate_since_the_start(monkeypatch, capsys):
    """Files end in bursts (a batch's clips come back together): 32 files every 0.16 s, 200 files/s. The time left
    each line says is the true one within a tenth, where a moving average of the gaps (tqdm's default) said ten
    times too much or too little."""
    monkeypatch.setattr(pipeline, "LOG_SECONDS", 0.0)
    bar, clock = pipeline._progress(6400, "file"), [1000.0]
    bar._time, bar.start_t, bar.last_print_t = (lambda: clock[0]), clock[0], clock[0]
    said = []
    for _ in range(200):
        clock[0] += 0.16
        for _ in range(32):
            clock[0] += 0.0001
            bar.update(1)
            said.append((bar.n, capsys.readouterr().err.splitlines()[-1]))
    bar.close()
    for n, line in said[640:-320]:  # (after a few seconds; before the last one)
        minutes, seconds = re.search(r"about (\d+):(\d+) left", line).groups()
        true = (6400 - n) / 200
        assert abs(int(minutes) * 60 + int(seconds) - true) <= max(1.0, 0.1 * true), (n, line)


def test_an_input_through_a_link_and_dotdot_is_the_file_the_system_reads(model, sources, tmp_path):
    """``link/../x.mp4`` with link leading to real/sub is real/x.mp4, as the shell and the kernel take it, not
    x.mp4 beside link (os.path.abspath drops ``link/..`` by its text): the token file and the manifest name the file
    whose clips it holds, and a resume finds it complete."""
    from titok_fast.manifest import MANIFEST_NAME, read_manifest

    (tmp_path / "real" / "sub").mkdir(parents=True)
    os.symlink(tmp_path / "real" / "sub", tmp_path / "link")
    shutil.copy(sources["long"], tmp_path / "real" / "x.mp4")  # 6 clips
    shutil.copy(sources["short"], tmp_path / "x.mp4")  # 1 clip: what the text would name
    given = f"{tmp_path}/link/../x.mp4"
    engine, out = Engine(model), tmp_path / "tokens"
    summary = encode_files(model, engine, [(given, "x")], out, SETTINGS, workers=1)
    made = load_tokens(out / "x.safetensors")
    assert summary.clips == 6 and len(made.grids) == 6 and made.source == str(tmp_path / "real" / "x.mp4")
    assert [r["source"] for r in read_manifest(out / MANIFEST_NAME)] == [made.source]
    assert encode_files(model, engine, [(given, "x")], out, SETTINGS, workers=1).skipped == [given]
    assert len(read_manifest(out / MANIFEST_NAME)) == 1  # (its latest line says so already)
    # a token file from a stranger may record any source: one with a NUL and a ".." is named as written, and its
    # input is redone (before, resolving it stopped the run with "embedded null byte")
    pipeline.save_tokens(out / "x.safetensors", dataclasses.replace(made, source="/data/a\x00b/../x.mp4"))
    summary = encode_files(model, engine, [(given, "x")], out, SETTINGS, workers=1)
    assert summary.done == [given] and not summary.failed
    assert pipeline.absolute("/data/a\x00b/../x.mp4") == "/data/x.mp4"
    (tmp_path / "a").mkdir()  # two ".."s, a link between them: each where the path before it leads
    assert pipeline.absolute(f"{tmp_path}/a/../link/../x.mp4") == str(tmp_path / "real" / "x.mp4")


def _manifest_with(tmp_path, rows):
    from titok_fast.manifest import MANIFEST_NAME, Manifest


    path = tmp_path / MANIFEST_NAME
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, Manifest(path, pipeline.Summary())


def test_a_resume_adds_no_line_for_an_input_whose_latest_line_is_skipped(tmp_path):
    src, tok = str(tmp_path / "a.mp4"), str(tmp_path / "a.safetensors")
    row = {"source": src, "tokens": tok, "clips": 0, "status": "skipped", "reason": "", "time": "2026-01-01T00:00:00"}
    path, manifest = _manifest_with(tmp_path, [row])
    with manifest:
        manifest.skipped(src, tok)
    assert len(path.read_text().splitlines()) == 1


def test_untimed_lines_settle_by_the_latest_not_the_first(tmp_path):
    src, tok = str(tmp_path / "a.mp4"), str(tmp_path / "a.safetensors")
    done = {"source": src, "tokens": tok, "clips": 1, "status": "done", "reason": ""}  # (older versions: no time)
    gone = {**done, "clips": 0, "status": "not-encoded", "reason": "its token file is made anew for another"}
    path, manifest = _manifest_with(tmp_path, [done, gone])
    with manifest:
        manifest.skipped(src, tok)  # complete again: its latest line must say so
    assert json.loads(path.read_text().splitlines()[-1])["status"] == "skipped"


def test_an_untimed_done_line_settles_its_input(tmp_path):
    src, tok = str(tmp_path / "a.mp4"), str(tmp_path / "a.safetensors")
    done = {"source": src, "tokens": tok, "clips": 1, "status": "done", "reason": ""}  # (older versions: no time)
    path, manifest = _manifest_with(tmp_path, [done])
    with manifest:
        manifest.skipped(src, tok)
    assert len(path.read_text().splitlines()) == 1


def test_an_input_done_since_it_was_said_not_encoded_is_said_so_again_when_left(tmp_path):
    """Said not encoded by a stopped job, then done by the next, then to redo (its token file removed or made
    otherwise) by a job stopped before it: its latest line must say not-encoded again, not stay "done" (the
    earlier not-encoded line is not its latest)."""
    from titok_fast.manifest import read_manifest

    src, tok = str(tmp_path / "a.mp4"), str(tmp_path / "a.safetensors")
    left = {"source": src, "tokens": tok, "clips": 0, "status": "not-encoded", "reason": "stopped",
            "time": "2026-01-01T00:00:00"}  # fmt: skip
    done = {**left, "clips": 1, "status": "done", "reason": "", "time": "2026-01-02T00:00:00"}
    path, manifest = _manifest_with(tmp_path, [left, done])
    with manifest:
        manifest.read_settled()
        manifest.forget_settled()
        manifest.list_not_encoded([(src, tok)], "not encoded: the run was interrupted (SIGTERM)")
    assert [r["status"] for r in read_manifest(path, latest=True)] == ["not-encoded"]


def test_decoded_chunks_are_clamped_and_the_padded_tail_trimmed(tmp_path):
    """decoded_chunks clamps (decode's side-by-side PSNR scores what it gives, as eval does) and trims the padding."""
    from titok_fast.pipeline import decoded_chunks

    model = random_tokenizer("tiny", seed=0)
    with torch.no_grad():
        model.decoder.proj_out.bias.add_(3.0)  # outputs far beyond [-1, 1]
    src = make_video(tmp_path / "v.mp4", frames=18, height=32, width=32, fps=24)  # 6 frames at 8 fps: 4 + 2 padded
    settings = ClipSettings(grid=(4, 32, 32), tokens=8, fps=8.0, tail="pad")
    engine = Engine(model, mode="eager", budgets=(256,), max_clips=3)
    assert encode_files(model, engine, [(src, "v")], tmp_path / "tok", settings, workers=1).done
    token_file = load_tokens(tmp_path / "tok" / "v.safetensors")
    assert token_file.last_chunk_frames == 2
    chunks = list(decoded_chunks(engine, token_file))
    assert [c.shape[1] for c in chunks] == [4, 2]
    assert all(float(c.abs().max()) <= 1.0 for c in chunks)


def test_clips_preprocessed_on_the_device_are_read_ahead_fewer_at_a_time(tmp_path, monkeypatch):
    model = random_tokenizer("tiny", seed=0)
    src = make_video(tmp_path / "v.mp4", frames=12, height=32, width=32, fps=24)
    real, seen = pipeline.interleaved_videos, {}

    def spy(*args, **kwargs):
        seen[kwargs["preprocess"]] = kwargs["capacity"]
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "interleaved_videos", spy)
    engine = Engine(model, mode="eager", budgets=(256,), max_clips=3)
    for where in ("cpu", "device"):
        settings = ClipSettings(grid=(4, 32, 32), tokens=8, fps=8.0, tail="pad", preprocess=where)
        assert encode_files(model, engine, [(src, "v")], tmp_path / where, settings, workers=1, read_ahead=8).done
    assert seen == {"cpu": 8, "device": pipeline.SOURCE_SIZE_READ_AHEAD}


def test_brief_cuts_long_text_to_its_limit():
    from titok_fast import files

    assert files.brief("x" * 10, 10) == "x" * 10
    assert files.brief("x" * 11, 10) == "x" * 7 + "..."
    assert len(files.brief("y" * 5000)) == 1024
