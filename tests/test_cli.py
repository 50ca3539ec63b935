"""The titok-fast command line end to end, on videos made here, with random weights."""

import argparse
import dataclasses
import datetime
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time

import av
import numpy as np
import pytest
import torch

from titok_fast.cli import _by_resolution, build_parser, main
from titok_fast.manifest import MANIFEST_NAME, read_manifest
from titok_fast.pipeline import select_shard
from titok_fast.tokens import load_tokens, save_tokens

from helpers import benchmark_json
from videos import (
    make_hanging,
    make_lossless,
    make_scrambled,
    make_video,
    pattern_frame,
    read_frames,
    release_hanging,
    wait_for_a_reader_of_hanging,
)

GRID = ["--grid", "4x32x32", "--tokens", "8", "--fps", "8"]
RANDOM = ["--random-weights", "0", "--config", "tiny", "--device", "cpu"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Good videos of several kinds, in nested folders, plus one corrupted file."""
    root = tmp_path_factory.mktemp("videos")
    (root / "sub").mkdir()
    make_video(root / "moving.mp4", frames=30, height=48, width=64, fps=24)  # 1.25 s -> 10 frames -> 2 clips
    make_video(root / "sub" / "odd.mkv", frames=12, height=37, width=53, fps=12)  # odd size, 1 s -> 2 clips
    make_video(root / "sub" / "vfr.mp4", frames=20, height=32, width=32, vfr=True)
    make_video(root / "single.mp4", frames=1, height=32, width=48, fps=8)  # one frame: padded clip
    make_scrambled(root / "broken.mp4", root / "moving.mp4")
    return root


def run(*args, capsys=None) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def test_the_batch_size_defaults_to_8_with_the_model_on_the_cpu_and_32_on_a_gpu(folder, tmp_path, monkeypatch):
    """Batches of 32 on a CPU held 2 to 2.4 times the memory of 4 to 8 for no more clips/s."""
    from titok_fast import cli, engine

    made = []
    init = engine.Engine.__init__
    monkeypatch.setattr(engine.Engine, "__init__", lambda self, *a, **k: made.append(k["max_clips"]) or
                        init(self, *a, **k))  # fmt: skip
    for asked in ([], ["--batch-size", "3"]):
        assert run("encode", folder / "moving.mp4", "-o", tmp_path / str(len(asked)), *GRID, *RANDOM, *asked)[0] == 0
    assert made == [8, 3]
    assert cli._batch_size(argparse.Namespace(batch_size=None), "cuda") == 32


def test_windows_is_refused_in_one_line(tmp_path):
    """On Windows the pipeline's imports failed ("No module named 'fcntl'"): the command says what it runs on
    (here with the POSIX modules Windows lacks made unimportable, before anything is imported)."""
    script = ("import runpy, sys\nfor name in ('fcntl', 'resource', 'termios'):\n    sys.modules[name] = None\n"
              "sys.platform = 'win32'\nrunpy.run_module('titok_fast', run_name='__main__')\n")  # fmt: skip
    ran = subprocess.run([sys.executable, "-c", script, "encode", "a.mp4", "-o", "out"], cwd=tmp_path,
                         capture_output=True, text=True)  # fmt: skip
    assert ran.returncode == 2 and "Traceback" not in ran.stderr, ran.stderr
    assert ran.stderr.strip().endswith("not on Windows: run it under WSL"), ran.stderr


def test_clips_per_video_encodes_the_first_clips_decodes_them_beside_their_source_and_resumes(folder, tmp_path,
                                                                                              capsys):  # fmt: skip
    """--clips-per-video 2: a video of 3 clips gives the first 2 (the tokens of a run without it), decoded beside its
    source as 8 frames; a rerun with 3 redoes that one alone (one of 1 clip had all its clips), saying why."""
    out, whole = tmp_path / "tokens", tmp_path / "whole"
    files = [folder / "moving.mp4", folder / "single.mp4"]
    code, _, _ = run("encode", *files, "-o", whole, *GRID, "--tail", "pad", *RANDOM, capsys=capsys)
    code, stdout, _ = run("encode", *files, "-o", out, *GRID, "--tail", "pad", "--clips-per-video", "2", *RANDOM,
                          capsys=capsys)  # fmt: skip
    assert code == 0 and "encoded 2 file(s), 3 clip(s)" in stdout, stdout
    moving, all_of_it = load_tokens(out / "moving.safetensors"), load_tokens(whole / "moving.safetensors")
    assert moving.start_times.tolist() == [0.0, 0.5] and moving.made_with["clips_per_video"] == "2"
    assert torch.equal(moving.indices, all_of_it.indices[: 2 * 8]) and all_of_it.token_counts.numel() == 3
    code, _, _ = run("decode", out, "-o", tmp_path / "videos", "--side-by-side", capsys=capsys)
    with av.open(str(tmp_path / "videos" / "moving.mp4")) as c:
        assert code == 0 and len(list(c.decode(video=0))) == 8
    code, stdout, _ = run("encode", *files, "-o", out, *GRID, "--tail", "pad", "--clips-per-video", "3", *RANDOM,
                          capsys=capsys)  # fmt: skip
    assert code == 0 and "encoded 1 file(s), 3 clip(s)" in stdout and "skipped 1 already complete" in stdout, stdout
    assert "made another way (clips_per_video 2, now 3)" in (out / "manifest.jsonl").read_text()


def test_encode_folder_reports_the_broken_file_and_encodes_the_rest(folder, tmp_path, capsys):
    out = tmp_path / "tokens"
    code, stdout, stderr = run("encode", folder, "-o", out, *GRID, "--tail", "pad", *RANDOM, capsys=capsys)
    assert code == 1  # one file failed
    assert "FAILED" in stdout and "broken.mp4" in stdout and "encoded 4 file(s)" in stdout
    assert "RANDOM weights" in stderr
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors"))
    assert names == ["moving.safetensors", "single.safetensors", "sub/odd.safetensors", "sub/vfr.safetensors"]
    moving = load_tokens(out / "moving.safetensors")
    assert moving.token_counts.tolist() == [8, 8, 8]  # 10 frames at 8 fps in chunks of 4, the tail padded
    assert moving.grids.tolist() == [[4, 32, 32]] * 3
    assert moving.start_times.tolist() == [0.0, 0.5, 1.0]
    assert (moving.tail, moving.last_chunk_frames, moving.fps) == ("pad", 2, 8.0)
    assert moving.model_config["tokenizer"]["model"]["encoder_size"] == "tiny_thin"
    assert moving.weights_digest.startswith("random-seed0-")
    assert load_tokens(out / "single.safetensors").last_chunk_frames == 1

    code, stdout, _ = run("encode", folder, "-o", out, *GRID, "--tail", "pad", *RANDOM, capsys=capsys)
    assert "encoded 0 file(s)" in stdout and "skipped 4 already complete" in stdout and code == 1

    decoded = tmp_path / "videos"
    code, stdout, _ = run("decode", *sorted(out.rglob("*.safetensors")), "-o", decoded, "--side-by-side", capsys=capsys)
    assert code == 0, stdout
    with av.open(str(decoded / "moving.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 10 and frames[0].shape == (32, 64, 3)  # real frames only; source | reconstruction
    with av.open(str(decoded / "single.mp4")) as c:
        assert len(list(c.decode(video=0))) == 1


def test_tokens_match_the_model_directly(folder, tmp_path, capsys):
    """What the CLI writes is what model.encode gives for the same clips."""
    from titok_fast.loading import random_tokenizer
    from titok_fast.video import read_clips

    run("encode", folder / "moving.mp4", "-o", tmp_path, *GRID, *RANDOM, capsys=capsys)
    clips = read_clips(folder / "moving.mp4", frames=4, height=32, width=32, fps=8).clips
    _, out = random_tokenizer("tiny", seed=0).encode(clips, [8] * len(clips))
    stored = load_tokens(tmp_path / "moving.safetensors").all_indices()
    assert all(torch.equal(a.long(), b) for a, b in zip(out["indices"], stored, strict=True))


def test_auto_workers_read_the_first_inputs_header_once_and_the_run_decodes_as_decided(folder, tmp_path, capsys,
                                                                                          monkeypatch):
    """With 8 workers ``auto`` reads the first input's header to choose threads or processes: once a run (before,
    the CLI and encode_files each read it), and encode_files reads with the kind the CLI chose (and started a
    process server for)."""
    from titok_fast import pipeline, video

    probed, kinds, started = [], [], []
    monkeypatch.setattr(video, "frame_pixels", lambda path, seconds=10.0: probed.append(path) or 8000 * 8000)
    monkeypatch.setattr(video, "start_process_server", lambda: started.append(True))
    encode_files = pipeline.encode_files
    monkeypatch.setattr(pipeline, "encode_files", lambda *a, **kw: kinds.append(kw["worker_kind"]) or encode_files(
        *a, **kw))  # fmt: skip
    code, _, _ = run("encode", folder / "moving.mp4", "-o", tmp_path, *GRID, *RANDOM, "--workers", "8", capsys=capsys)
    assert code == 0 and (tmp_path / "moving.safetensors").is_file()
    assert list(map(str, probed)) == [str(folder / "moving.mp4")]
    assert kinds == ["thread"] and not started  # (a large frame: threads)


def test_decode_refuses_tokens_from_other_weights(folder, tmp_path, capsys):
    run("encode", folder / "moving.mp4", "-o", tmp_path, *GRID, *RANDOM, capsys=capsys)
    tokens = tmp_path / "moving.safetensors"
    other = ["--random-weights", "1", "--config", "tiny"]
    code, stdout, _ = run("decode", tokens, "-o", tmp_path / "v", *other, capsys=capsys)
    assert code == 1 and "made by weights random-seed0-" in stdout
    assert "pass --random-weights 0 (and its --config), or --force to decode anyway" in stdout
    code, stdout, _ = run("decode", tokens, "-o", tmp_path / "v", "--random-weights", "0", "--config", "v1",
                          capsys=capsys)  # fmt: skip
    assert code == 1 and ("pass --random-weights 0 with the right --config: it was made by those random weights with "
                          "another config") in stdout  # fmt: skip
    code, _, _ = run("decode", tokens, "-o", tmp_path / "v", *other, "--force", capsys=capsys)
    assert code == 0 and (tmp_path / "v" / "moving.mp4").exists()
    code, _, err = run("decode", tokens, "-o", tmp_path / "w", "--config", "v1", capsys=capsys)  # (not used)
    assert code == 2 and "--config goes with --checkpoint or --random-weights: without them the token files" in err
    code, _, err = run("decode", tokens, "-o", tmp_path / "w", *other, "--checkpoint", "x.ckpt", capsys=capsys)
    assert code == 2 and "--checkpoint and --random-weights each name the weights: pass one of them" in err


def test_eval_prints_a_table_and_writes_json(folder, tmp_path, capsys):
    report = tmp_path / "new" / "eval.json"  # its folder is made when the report is written
    code, stdout, _ = run(
        "eval", folder / "moving.mp4", "--tokens", "4,16", "--grid", "4x32x32", *RANDOM, "--json", report,
        capsys=capsys,
    )  # fmt: skip
    assert code == 0
    assert "PSNR" in stdout and "SSIM" in stdout
    assert "evaluated 1 file(s)" in stdout and "already complete" not in stdout  # (eval skips nothing)
    results = json.loads(report.read_text())["results"]
    assert set(results) == {"4", "16"} and all(r["clips"] == 2 for r in results.values())
    assert all(0 < r["psnr"] < 60 and -1 <= r["ssim"] <= 1 for r in results.values())
    code, _, _ = run("eval", folder / "moving.mp4", "--tokens", "4", "--grid", "4x32x32", *RANDOM, "--json", report,
                     capsys=capsys)  # fmt: skip
    assert code == 0 and set(json.loads(report.read_text())["results"]) == {"4"}  # an earlier report: replaced
    (tmp_path / "other").mkdir()  # two videos of one name: eval writes no token file for them to collide in
    shutil.copy(folder / "moving.mp4", tmp_path / "other" / "moving.mp4")
    code, stdout, _ = run("eval", folder / "moving.mp4", tmp_path / "other", "--tokens", "4", "--grid", "4x32x32",
                          *RANDOM, "--json", report, capsys=capsys)  # fmt: skip
    assert code == 0 and "evaluated 2 file(s)" in stdout
    assert json.loads(report.read_text())["results"]["4"]["clips"] == 4
    (tmp_path / "empty.mp4").write_bytes(b"")  # a file that fails: the report says which, and how clips were made
    code, _, _ = run("eval", folder / "moving.mp4", tmp_path / "empty.mp4", "--tokens", "4", "--grid", "4x32x32",
                     *RANDOM, "--json", report, capsys=capsys)  # fmt: skip
    written = json.loads(report.read_text())
    assert code == 1 and [f["source"] for f in written["failed"]] == [str(tmp_path / "empty.mp4")]
    assert written["settings"] == {"grid": [4, 32, 32], "fps": 8.0, "tail": "drop", "sampling": "upstream",
                                   "rotation": "stored", "clips_per_video": None, "dtype": "float32",
                                   "precision": "default"}  # fmt: skip
    assert written["left_out"] == []
    shard = tmp_path / "shards" / "cut.tar"  # an archive cut short: its files past the cut were not evaluated
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name in ("a.mp4", "b.mp4"):
            tar.add(folder / "moving.mp4", arcname=name)
    with tarfile.open(shard) as tar:
        cut = tar.getmember("b.mp4").offset_data + 1000
    shard.write_bytes(shard.read_bytes()[:cut])
    code, stdout, err = run("eval", shard.parent, "--tokens", "4", "--grid", "4x32x32", *RANDOM, "--json", report,
                          capsys=capsys)  # fmt: skip
    written = json.loads(report.read_text())
    assert code == 1 and f"LEFT OUT {shard}: cut short" in stdout, (stdout, err)
    assert [f["source"] for f in written["failed"]] == [f"{shard}/b.mp4"]  # (the member the cut cuts)
    assert [f["input"] for f in written["left_out"]] == [str(shard)] and "cut short" in written["left_out"][0]["reason"]
    (tmp_path / "none").mkdir()  # no video: said before the weights load (a download, by default)
    code, _, err = run("eval", tmp_path / "none", "--checkpoint", tmp_path / "missing.safetensors", capsys=capsys)
    assert code == 2 and f"error: no video files found in {tmp_path / 'none'}" in err, err


def test_eval_says_which_report_a_full_disk_kept_it_from_writing(folder, tmp_path, capsys, monkeypatch):
    """The figure, written after the JSON report, on a disk that filled up meanwhile: one line naming it, as
    --json's, not a bare errno line naming nothing."""
    import errno

    from titok_fast import plots

    def full(figure, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plots, "save_figure", full)
    report, figure = tmp_path / "eval.json", tmp_path / "eval.png"
    code, _, err = run("eval", folder / "moving.mp4", "--tokens", "4", "--grid", "4x32x32", *RANDOM, "--json", report,
                       "--plot", figure, capsys=capsys)  # fmt: skip
    assert code == 2 and err.endswith(f"\ntitok-fast: error: --plot {figure}: cannot be written (No space left on "
                                      "device)\n"), err  # fmt: skip
    assert json.loads(report.read_text())["results"]


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    code, _, err = run("encode", tmp_path / "missing.mp4", "-o", tmp_path, *RANDOM, capsys=capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = run("encode", tmp_path, "-o", tmp_path / "o", capsys=capsys)
    assert code == 2 and "no video files found" in err
    (tmp_path / "a.mp4").write_bytes(b"")
    absent = tmp_path / "absent.ckpt"
    code, _, err = run("encode", tmp_path, "-o", tmp_path / "o", "--checkpoint", absent, capsys=capsys)
    assert code == 2 and "absent.ckpt does not exist" in err and not (tmp_path / "o").exists()
    (tmp_path / "t.safetensors").write_bytes(b"")
    for command, inputs in (("encode", tmp_path / "a.mp4"), ("decode", tmp_path / "t.safetensors")):
        for out, reason in (("/proc/absent/o", " (No such file or directory"),
                            (tmp_path / "a.mp4" / "o", f": {tmp_path / 'a.mp4'} is not a folder")):  # fmt: skip
            # before the model loads (the checkpoint is never opened): not after it, hours into a job
            code, _, err = run(command, inputs, "-o", out, "--checkpoint", absent, capsys=capsys)
            assert code == 2 and f"titok-fast: error: -o {out}: cannot be made{reason}" in err, err
    code, _, err = run("eval", tmp_path / "typo.mp4", "--checkpoint", absent, capsys=capsys)  # before the weights
    assert code == 2 and err == f"titok-fast: error: input {str(tmp_path / 'typo.mp4')!r} does not exist\n", err
    code, _, err = run("convert", absent, "/proc/absent/x.safetensors", capsys=capsys)  # before reading the source
    assert code == 2 and "error: output /proc/absent/x.safetensors: its folder /proc/absent: cannot be made" in err
    code, _, err = run("convert", absent, tmp_path / "new" / "x.safetensors", capsys=capsys)
    assert code == 2 and "absent.ckpt does not exist" in err and not (tmp_path / "new").exists()  # nothing left
    with socket.socket() as s:  # a port where nothing listens: Ray would retry it for minutes, saying only its own
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    code, _, err = run("encode", tmp_path / "a.mp4", "-o", tmp_path / "o", "--ray", address, "--checkpoint", absent,
                       capsys=capsys)  # fmt: skip
    assert code == 2 and f"error: --ray {address}: no Ray cluster answers there (Connection refused)" in err, err
    assert not (tmp_path / "o").exists()
    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)  # a web server where a cluster is looked for
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for address, said in ((f"127.0.0.1:{server.server_port}", "something other than a Ray cluster answers "
                               "there ('<!DOCTYPE HTML>': a web server, say; the dashboard's port is 8265"),
                              ("127.0.0.1:99999", "port 99999 is not a TCP port (0 to 65535)")):  # fmt: skip
            code, _, err = run("encode", tmp_path / "a.mp4", "-o", tmp_path / "o", "--ray", address, "--checkpoint",
                               absent, capsys=capsys)  # fmt: skip
            assert code == 2 and f"error: --ray {address}: {said}" in err and len(err.splitlines()) == 1, err
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(SystemExit) as e:
        main(["encode", str(tmp_path), "-o", "x", "--grid", "20x192"])
    assert e.value.code == 2 and "must look like 20x192x192" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # FP8 runs in the decoder only: encode has no --precision
        main(["encode", str(tmp_path), "-o", "x", "--precision", "fp8"])
    assert e.value.code == 2 and "unrecognized arguments: --precision fp8" in capsys.readouterr().err
    code, _, err = run("decode", tmp_path, "-o", tmp_path / "o", *RANDOM, "--precision", "fp8", capsys=capsys)
    assert code == 2 and "precision fp8 needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1


def test_debug_shows_where_an_unforeseen_failure_of_one_file_came_from(folder, tmp_path, capsys, monkeypatch):
    """A failure no check foresaw fails its file alone, in one line; with --debug, its traceback comes too (for a
    bug report), for reading and for decoding, and --debug is over when the command is."""
    from titok_fast import pipeline, video

    real = video.ClipReader._clip

    def broken(self, images):
        if self.path.endswith("moving.mp4"):
            raise IndexError("list index out of range")
        return real(self, images)

    monkeypatch.setattr(video.ClipReader, "_clip", broken)
    for debug in ([], ["--debug"]):
        code, stdout, err = run("encode", folder, "-o", tmp_path / f"o{len(debug)}", *GRID, *RANDOM, *debug,
                                capsys=capsys)  # fmt: skip
        assert code == 1 and "moving.mp4: cannot be read (IndexError: list index out of range)" in stdout
        shown = f"titok-fast: --debug: {folder / 'moving.mp4'} failed here:\nTraceback (most recent call last):"
        assert (shown in err and "in broken\n" in err) == bool(debug), err
        assert "TITOK_FAST_DEBUG" not in os.environ
    monkeypatch.setenv("TITOK_FAST_DEBUG", "0")  # (set otherwise, not by --debug: no traceback; kept as it was)
    for debug in ([], ["--debug"]):
        code, stdout, err = run("encode", folder / "moving.mp4", "-o", tmp_path / f"e{len(debug)}", *GRID, *RANDOM,
                                *debug, capsys=capsys)  # fmt: skip
        assert code == 1 and ("failed here:" in err) == bool(debug) and os.environ["TITOK_FAST_DEBUG"] == "0"
    monkeypatch.delenv("TITOK_FAST_DEBUG")
    monkeypatch.setattr(video.ClipReader, "_clip", real)

    def preprocess_breaks(self, frames):
        raise IndexError("list index out of range")

    monkeypatch.setattr(pipeline.DevicePreprocessor, "__call__", preprocess_breaks)  # on the model's device
    code, stdout, err = run("encode", folder / "moving.mp4", "-o", tmp_path / "p", *GRID, *RANDOM, "--preprocess",
                            "device", "--debug", capsys=capsys)  # fmt: skip
    assert code == 1 and "preprocessing clip 0 on cpu failed (IndexError" in stdout and "in preprocess_breaks\n" in err
    tokens = next((tmp_path / "o0").rglob("*.safetensors"))
    monkeypatch.setattr(pipeline, "decoded_chunks", lambda engine, token_file: iter([None]))  # (a bug)
    code, stdout, err = run("decode", tokens, "-o", tmp_path / "v", "--debug", capsys=capsys)
    assert code == 1 and f"titok-fast: --debug: {tokens} failed here:\nTraceback" in err


def test_a_warning_is_one_line_as_every_other_message(folder, tmp_path, capsys):
    options = ["--mode", "compile", "--grid", "4x32x32", "--tokens", "20000"]  # (refused after the engine warned)
    code, _, err = run("encode", folder / "moving.mp4", "-o", tmp_path / "o", *RANDOM, *options, capsys=capsys)
    assert code == 2 and "titok-fast: warning: the torch backend's fixed-shape path attends with a dense" in err
    assert "UserWarning" not in err and len(err.strip().splitlines()) == 3, err  # (and the random weights line)


def test_bf16_on_a_cpu_without_bf16_matrix_instructions_is_said_to_be_slow(folder, tmp_path, capsys, monkeypatch):
    """bf16 on an x86-64 CPU without AVX512-BF16 or AMX falls back to slow matrix products: the run says so in
    one line, and goes on. A CPU with one of them, float32 or float16, another architecture, a torch that cannot
    tell, or a Ray cluster (whose CPUs are other machines'): nothing is said."""
    from titok_fast import cli

    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    for name in cli.BF16_INSTRUCTIONS.values():
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    encode = ["encode", folder / "moving.mp4", *GRID, *RANDOM, "--dtype", "bf16"]
    code, _, err = run(*encode, "-o", tmp_path / "a", capsys=capsys)
    said = [line for line in err.splitlines() if "matrix instructions" in line]
    assert code == 0 and len(said) == 1 and said[0].startswith("titok-fast: --dtype bf16 on this CPU"), err
    assert (tmp_path / "a" / "moving.safetensors").exists()
    monkeypatch.setattr(cli, "cpu_flags", lambda: {"avx2", "avx512_fp16"})
    assert all(cli.slow_dtype_on_this_cpu(other) is None for other in ("fp32", "fp16", None))
    for name in cli.BF16_INSTRUCTIONS.values():  # either is enough
        with monkeypatch.context() as m:
            m.setattr(torch.cpu, name, lambda: True)
            assert cli.slow_dtype_on_this_cpu("bf16") is None
    with monkeypatch.context() as m:
        m.delattr(torch.cpu, "_is_amx_tile_supported")
        assert cli.slow_dtype_on_this_cpu("bf16") is None  # (a torch without the checks does not tell)
    with monkeypatch.context() as m:
        m.setattr("platform.machine", lambda: "aarch64")
        assert cli.slow_dtype_on_this_cpu("bf16") is None
    assert cli.slow_dtype_on_this_cpu("bf16") is not None
    for ray, notices in ((None, 1), ("auto", 0)):  # (the driver's copy of the model, on a cluster)
        cli._model(argparse.Namespace(device="cpu", dtype="bf16", ray=ray, checkpoint=None, random_weights=0,
                                      config="tiny"))  # fmt: skip
        assert capsys.readouterr().err.count("matrix instructions") == notices, ray

    # a cluster started here (--ray local) encodes on this machine's CPUs: said once (the driver's copy is silent)
    from titok_fast import distributed

    def started(*args, **kwargs):
        raise ValueError("the cluster would start here")

    monkeypatch.setattr(distributed, "encode_dataset", started)
    for ray, notices in (("local", 1), ("auto", 0)):
        code, _, err = run(*encode, "--ray", ray, "-o", tmp_path / "r", capsys=capsys)
        assert code == 2 and "the cluster would start here" in err and err.count("matrix instructions") == notices

    # a refusal stays the only line; the demo, whose default weights cannot be had here, says it once
    code, _, err = run(*encode, "--checkpoint", tmp_path / "w.safetensors", "-o", tmp_path / "b", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "each name the weights" in err, err
    from titok_fast import hub

    def offline(ref, quick=False):
        raise hub.WeightsUnavailable(f"weights {ref} are not to be had in this test")

    monkeypatch.setattr(hub, "download", offline)
    code, _, err = run("demo", "-o", tmp_path / "demo", "--config", "tiny", "--device", "cpu", "--grid", "4x32x32",
                       "--tokens", "8", "--dtype", "bf16", capsys=capsys)  # fmt: skip
    assert code == 0 and err.count("matrix instructions") == 1, err


def test_fp16_on_a_cpu_without_fp16_matrix_instructions_is_said_to_be_slow(folder, tmp_path, capsys, monkeypatch):
    """float16 on an x86-64 CPU without AVX512-FP16 (or AMX-FP16) is as slow as bf16 without its instructions;
    torch cannot tell, Linux's CPU flags can. Either flag silences it, and so does a machine without the flags to
    read, or another architecture."""
    from titok_fast import cli

    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(cli, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    code, _, err = run("encode", folder / "moving.mp4", *GRID, *RANDOM, "--dtype", "fp16", "-o", tmp_path / "a",
                       capsys=capsys)  # fmt: skip
    said = [line for line in err.splitlines() if "matrix instructions" in line]
    assert code == 0 and said == ["titok-fast: --dtype fp16 on this CPU, which has no fp16 matrix instructions "
                                  "(AVX512-FP16 or AMX-FP16): expect it to run slower than fp32, the CPU default"], err
    assert (tmp_path / "a" / "moving.safetensors").exists()
    for flag in cli.FP16_FLAGS.values():
        monkeypatch.setattr(cli, "cpu_flags", lambda flag=flag: {"avx2", flag})
        assert cli.slow_dtype_on_this_cpu("fp16") is None
    monkeypatch.setattr(cli, "cpu_flags", lambda: None)
    assert cli.slow_dtype_on_this_cpu("fp16") is None
    monkeypatch.setattr(cli, "cpu_flags", lambda: {"avx2"})
    assert cli.slow_dtype_on_this_cpu("fp16") is not None
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert cli.slow_dtype_on_this_cpu("fp16") is None


@pytest.mark.filterwarnings("ignore:the torch backend's fixed-shape path attends with a dense")
def test_contradictory_or_unusable_options_are_refused_before_any_work(folder, tmp_path, capsys):
    """Options that no clip or cluster could use: one line naming the option, exit 2, nothing written."""
    out = tmp_path / "o"
    cases = [
        (["--grid", "5x32x32"], "--grid 5x32x32: T must be a positive multiple of 4 (patch [4, 8, 8])"),
        (["--ray-actors", "3", "--ray-retries", "1"], "--ray-actors, --ray-retries apply only with --ray"),
        (["--ray-gpus-per-actor", "1"], "--ray-gpus-per-actor applies only with --ray"),
        (["--grid", "4x32x32", "--tokens", "100000"], "--grid 4x32x32 --tokens 100000: a clip would need 100016 "
         "packed rows (tokens + patches); the engine takes at most 65536 per clip"),
        (["--mode", "compile", "--grid", "4x32x32", "--tokens", "20000"], "--grid 4x32x32 --tokens 20000: a clip "
         "would need 20016 packed rows (tokens + patches); the engine takes at most 16384 per clip"),  # CPU compile
        (["--mode", "compile", "--grid", "4x32x32", "--tokens", "20000", "--ray", "local", "--device", "cpu"],
         "--grid 4x32x32 --tokens 20000: a clip would need 20016 packed rows (tokens + patches); the engine takes at "
         "most 16384 per clip"),  # the CPU encode actors' engines: no cluster is started
        (["--decoder", "nvdec", "--worker-kind", "process"], "--decoder nvdec leaves frames on the GPU, which worker "
         "processes cannot hand over: use --worker-kind thread"),
        (["--decoder", "nvdec", "--ray", "local", "--device", "cpu"], "with Ray, frames are decoded and resized by the "
         "CPU decode tasks: --decoder nvdec and --preprocess device do not apply"),  # no cluster is started
        (["--ray", "local", "--workers", "4"], "--workers and --worker-kind apply without --ray: on a cluster, each "
         "decode task reads with --ray-cpus-per-decode CPUs"),
        (["--ray", "local", "--worker-kind", "process"], "--workers and --worker-kind apply without --ray: on a "
         "cluster, each decode task reads with --ray-cpus-per-decode CPUs"),
        (["--ray", "local", "--worker-kind", "thread"], "--workers and --worker-kind apply without --ray: on a "
         "cluster, each decode task reads with --ray-cpus-per-decode CPUs"),
        (["--ray", "garbage"], "--ray garbage: expected local, auto, HOST:PORT or ray://HOST:PORT"),
        (["--ray", "http://127.0.0.1:8265"], "--ray http://127.0.0.1:8265: an HTTP address (a dashboard's or a job "
         "server's) is not a cluster's; expected local, auto, HOST:PORT or ray://HOST:PORT (the address `ray start "
         "--head` prints)"),
    ]  # fmt: skip
    for options, message in cases:
        code, _, err = run("encode", folder / "moving.mp4", "-o", out, *RANDOM, *options, capsys=capsys)
        assert code == 2 and f"titok-fast: error: {message}\n" in err and "Traceback" not in err, err
    fifo, a_file, report = tmp_path / "fifo.json", tmp_path / "a-file", tmp_path / "report.json"
    os.mkfifo(fifo)
    a_file.write_text("x")
    report.write_text('{"results": {}}')
    for options, message in [  # eval: its outputs are checked before hours of work, not after
        (["--json", str(tmp_path)], f"--json {tmp_path}: is a folder; expected the path of a file to write"),
        (["--json", str(folder / "moving.mp4")], f"--json {folder / 'moving.mp4'}: is there already and is not a "
         "JSON file; it would be replaced: remove it or choose another path"),  # (an input, given by mistake)
        (["--json", str(fifo)], f"--json {fifo}: is a FIFO (where its links lead); expected the path of a JSON file "
         "to write"),  # (as root, /dev/null was replaced by a file)
        (["--plot", str(report.with_suffix(".png"))], None),  # (made below: a JSON file named .png)
        (["--json", str(a_file / "x.json")], f"--json {a_file / 'x.json'}: its folder {a_file}: is not a folder"),
        (["--json", str(a_file / "y" / "x.json")], f"its folder {a_file / 'y'}: cannot be made: {a_file} is not a "
         "folder"),
        (["--plot", "/proc/absent/x.png"], "--plot /proc/absent/x.png: its folder /proc/absent: cannot be made"),
        (["--plot", "x.jpg"], "--plot x.jpg: expected a .png path (the plot is written as a PNG)"),
        (["--json", str(tmp_path / "r.png"), "--plot", str(tmp_path / "r.png")], f"--json and --plot both name "
         f"{tmp_path / 'r.png'}; the plot would replace the report: give two paths"),
        (["--grid", "4x8x16"], "--grid 4x8x16: eval's SSIM needs frames of at least 11 x 11"),
        (["--grid", "4x32x32", "--tokens", "8,70000"], "--tokens 70000: a clip would need 70016 packed rows"),
    ]:
        if message is None:
            report.with_suffix(".png").write_text("{}")
            message = f"--plot {report.with_suffix('.png')}: is there already and is not a PNG file"
        code, stdout, err = run("eval", folder / "moving.mp4", *RANDOM, *options, capsys=capsys)
        assert code == 2 and message in err and "Traceback" not in err and stdout == "", err
    for options, message in [
        (["--shard", "2/2"], "argument --shard: '2/2' is not K/N with 0 <= K < N <= 9999999, e.g. 0/8 (shards count "
         "from 0)"),
        (["--shard", "1"], "argument --shard: '1' is not K/N with 0 <= K < N"),
        (["--device", "meta"], "argument --device: 'meta' is not a device titok-fast runs on: cpu or cuda"),
        (["--device", "cuda:02"], "argument --device: 'cuda:02': choose that GPU with CUDA_VISIBLE_DEVICES=2 and "
         "--device cuda (the run's decoding threads would work on GPU 0 too)"),
        (["--shard", "0/1" + "0" * 300], "argument --shard: '0/100"),
        (["--shard", "\uff10/2"], "argument --shard: '\uff10/2' is not K/N"),
        (["--shard=-1/4"], "argument --shard: '-1/4' is not K/N"),
        (["--ray-gpus-per-actor", "0"], "argument --ray-gpus-per-actor: 0 must be a number > 0, not infinite"),
        (["--ray-cpus-per-decode", "nan"], "argument --ray-cpus-per-decode: nan must be a number > 0"),
        (["--ray-cpus-per-decode", "1e-9"], "argument --ray-cpus-per-decode: 1e-9 must be at least 0.0001 (Ray's "
         "finest share)"),  # (Ray refused it once its cluster was up, every input listed as not encoded)
        (["--ray-cpus-per-actor", "inf"], "argument --ray-cpus-per-actor: inf must be a number > 0, not infinite"),
        (["--ray-retries", "-1"], "argument --ray-retries: -1 must be in [0, 1000]"),
        (["--ray-actor-restarts", "9" * 20], f"argument --ray-actor-restarts: {'9' * 20} must be in [0, 1000]"),
        (["--fps", "0"], "argument --fps: 0 must be in (0, 1000]"),
        (["--fps", "nan"], "argument --fps: nan must be in (0, 1000]"),
        (["--fps", "1e-320"], "argument --fps: 1e-320 must be at least 0.0001 (a clip of frames this far apart could "
         "not be decoded to a video)"),
        (["--random-weights", "-5"], "argument --random-weights: -5 must be in [0, 999999999999999999]"),
        (["--random-weights", "1" + "0" * 18], "argument --random-weights: 1000000000000000000 must be in [0, "),
        (["--workers", "100000"], "argument --workers: 100000 must be in [1, 1024]"),
        (["--clips-per-video", "0"], "argument --clips-per-video: 0 must be in [1, 2147483647]"),
        (["--clips-per-video", str(2**63)], f"argument --clips-per-video: {2**63} must be in [1, 2147483647]"),
        (["--ray", ""], "argument --ray: must not be empty"),
        (["-o", ""], "argument -o/--output: must not be empty"),
        (["-o", str(folder / "moving.mp4")], f"argument -o/--output: {folder / 'moving.mp4'} exists and is not a "
         "folder"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["encode", str(folder / "moving.mp4"), "-o", str(out), "--ray", "local", *options])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_empty_values_long_names_and_where_the_weights_came_from_are_said_in_one_line(folder, tmp_path, capsys,
                                                                                         monkeypatch):
    """An empty input ('') searched the current folder (decode began on every token file below it); empty
    --checkpoint/--config/--json/--plot were taken as not given; an over-long --json name failed once the work was
    done; the demo made its sample in memory for any --fps (125 GB at 0.0001) and looked at -o after the weights;
    a path with a newline broke a summary line; $TITOK_FAST_CHECKPOINT's garbage was not said to come from it; a
    video given as --checkpoint was first said to record no config."""
    import titok_fast.cli as cli
    from titok_fast.loading import random_tokenizer

    out = tmp_path / "out"
    for command in (["encode", "", "-o", out, *RANDOM], ["decode", "", "-o", out], ["eval", "", *RANDOM]):
        code, stdout, err = run(*command, capsys=capsys)
        assert code == 2 and err == "titok-fast: error: an input is empty (''): expected a path (the current folder " \
                                    "is '.')\n" and stdout == "", err  # fmt: skip
    for command, option in ((["encode", "-o", out, "--checkpoint", ""], "--checkpoint"),
                            (["encode", "-o", out, "--config", ""], "--config"), (["eval", "--json", ""], "--json"),
                            (["eval", "--plot", ""], "--plot"), (["convert", "", "x.safetensors"], "checkpoint"),
                            (["bench", "--json", ""], "--json")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main([command[0], str(folder / "moving.mp4"), *map(str, command[1:])] if command[0] != "convert" and
                 command[0] != "bench" else [*map(str, command)])  # fmt: skip
        assert e.value.code == 2 and f"argument {option}: must not be empty" in capsys.readouterr().err
    long = tmp_path / ("p" * 300 + ".json")
    monkeypatch.setattr(cli, "_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    code, _, err = run("eval", folder / "moving.mp4", *RANDOM, "--json", long, capsys=capsys)
    assert code == 2 and f"--json {long}: its name is 305 bytes; a file name has at most 255" in err, err
    code, _, err = run("convert", folder / "moving.mp4", tmp_path / ("c" * 300 + ".safetensors"), capsys=capsys)
    assert code == 2 and "its name is 312 bytes; a file name has at most 255" in err, err
    (tmp_path / "afile").write_text("")
    code, _, err = run("demo", "-o", tmp_path / "afile" / "demo", capsys=capsys)
    assert code == 2 and f"-o {tmp_path / 'afile' / 'demo'}: cannot be made" in err, err
    monkeypatch.setattr(cli, "_model", lambda *a, **k: random_tokenizer("tiny", seed=0))
    code, _, err = run("demo", "-o", tmp_path / "demo", "--fps", "0.0001", "--grid", "4x32x32", "--tokens", "8",
                       "--device", "cpu", capsys=capsys)  # fmt: skip
    assert code == 2 and "--grid 4x32x32 at --fps 0.0001: a clip spans 40000 s, and the demo's sample video is at " \
                         "most 60 s" in err, err  # fmt: skip
    assert not (tmp_path / "demo").exists()
    monkeypatch.undo()
    monkeypatch.setenv("TITOK_FAST_CHECKPOINT", str(tmp_path / "garbage"))
    code, _, err = run("encode", folder / "moving.mp4", "-o", out, capsys=capsys)
    assert code == 2 and err.startswith(f"weights: {tmp_path / 'garbage'} ($TITOK_FAST_CHECKPOINT)\n"), err
    code, _, err = run("encode", folder / "moving.mp4", "-o", out, "--checkpoint", folder / "moving.mp4",
                       capsys=capsys)  # fmt: skip
    assert code == 2 and "records no model config" not in err and len(err.splitlines()) == 1, err


def test_ray_not_installed_is_said_before_the_weights_load(folder, tmp_path, capsys, monkeypatch):
    """Loading V1's weights and hashing them takes a while: --ray without Ray installed is refused first, in one
    line, with nothing written."""
    import titok_fast.cli as cli

    out = tmp_path / "out"
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` fails, find_spec finds none
    monkeypatch.setattr(cli, "_model", lambda args: pytest.fail("the weights were loaded"))
    code = main(["encode", str(folder / "moving.mp4"), "-o", str(out), "--ray", "local", *RANDOM])
    said = capsys.readouterr().err
    assert code == 2 and said == "titok-fast: error: --ray needs Ray Data: pip install 'titok-fast[ray]'\n"
    assert not out.exists()


def test_bench_without_pytest_benchmark_says_which_extra_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytest_benchmark", None)  # as if not installed
    assert main(["bench", "-k", "nothing"]) == 2
    said = capsys.readouterr().err
    assert said.endswith("error: the benchmark suite needs pytest and pytest-benchmark: pip install -e '.[bench]'\n")
    assert len(said.splitlines()) == 1


def test_eval_measures_a_token_count_given_twice_once():
    from titok_fast.cli import _counts

    assert _counts("8,4,8") == [8, 4]  # summed twice, its PSNR and SSIM came out doubled


@pytest.mark.parametrize("command", ["encode", "decode", "eval", "convert", "bench", "demo"])
def test_every_command_has_complete_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.help != "==SUPPRESS==" and action.dest != "help":
            assert action.help, f"{command}: option {action.dest} has no help"
            assert (action.option_strings[0] if action.option_strings else action.metavar or action.dest) in text
        _, said, stated = (action.help or "").rpartition("(default")
        if said and action.default not in (None, False, "==SUPPRESS=="):  # the default said is the one used
            value = f"{action.default:g}" if isinstance(action.default, float) else str(action.default)
            assert stated.lstrip(": ").startswith(value), f"{command} {action.dest}: {action.help!r} vs {value!r}"


def test_help_and_argument_errors_come_without_importing_torch():
    """Importing torch takes seconds: the command line imports it only for a command's work, so --help and a
    mistyped option answer at once, and a Ctrl-C during that import is the command's (one line). The package's
    names still resolve, imported when first used."""
    script = """if True:
        import sys
        import titok_fast, titok_fast.cli
        for argv in (["--help"], ["encode", "--help"], ["encode", "in.mp4"], ["decode", "--nope"]):
            try:
                titok_fast.cli.main(argv)
            except SystemExit as e:
                assert e.code in (0, 2), e.code
        assert "torch" not in sys.modules, "torch imported"
        from titok_fast import PRESETS, Engine, TiTok, TiTokConfig, load_tokenizer
        assert "torch" in sys.modules and TiTok.__name__ == "TiTok" and "v1" in PRESETS
        assert titok_fast.engine.Engine is Engine and titok_fast.reference.ReferenceTiTok  # submodules, as before
        assert set(titok_fast.__all__) <= set(dir(titok_fast))
        try:
            titok_fast.Nothing
        except AttributeError as e:
            assert "has no attribute 'Nothing'" in str(e)
        else:
            raise AssertionError("no AttributeError")
    """
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_option_value_check_imports_torch(tmp_path):
    """argparse checks option values before the command's signal handlers are in: a check that imported torch (as
    --fps's once did, through the video module) left SIGTERM unhandled and Ctrl-C a traceback for the seconds of
    that import. Every option's check of every command, on valid and invalid values, imports no torch."""
    script = """if True:
        import argparse, sys
        import titok_fast.cli
        checked = 0
        for command, sub in titok_fast.cli.build_parser()._subparsers._group_actions[0].choices.items():
            for action in sub._actions:
                if callable(action.type):
                    for text in ("8", "0.5", "1/2", "cpu", "cuda", "20x192x192", "128,256", "out", "", "x"):
                        try:
                            action.type(text)
                        except (argparse.ArgumentTypeError, ValueError, TypeError):
                            pass
                    checked += 1
                    assert "torch" not in sys.modules, f"{command} {action.option_strings}: torch imported"
        assert checked >= 20, checked
    """
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


# the command as a terminal's foreground job runs it, Ctrl-C included: a test run started in the background (by a
# shell without job control, or nohup) ignores SIGINT, which its children would inherit, and the command then
# leaves Ctrl-C alone (not for it)
FOREGROUND = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "runpy.run_module('titok_fast.cli', run_name='__main__', alter_sys=True)")  # fmt: skip


def encode_until_the_first_file(tmp_path, *options, inputs=(), files=1, env=None):
    """A command encoding 6 videos (then ``inputs``), started in a session of its own and left running once its
    first token file (its first ``files``) is written, however fast the machine: (the process, the output folder,
    the command). The sixth video is long (100 clips; the others 4): the first five files are written within a
    few tenths of a second on 2 cores, and a test stopping the run at its first file must find it still running."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        make_video(src / f"clip{i}.mp4", frames=48 if i < 5 else 1200, height=64, width=64, fps=24)
    out = tmp_path / "tokens"
    cmd = [sys.executable, "-c", FOREGROUND, "encode", str(src), *map(str, inputs), "-o", str(out),
           "--grid", "4x64x64", "--tokens", "64", "--batch-size", "1", "--workers", "1", *options, *RANDOM]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("*.safetensors"))) < files:
        time.sleep(0.01)
    return proc, out, cmd


def test_a_run_whose_output_nobody_reads_ends_as_its_work_did(folder, tmp_path):
    """``titok-fast encode ... | head -1``: the summary finds the pipe closed. The run still ends with its work's
    status (0 here: every file encoded), not with "Broken pipe" and status 2."""
    cmd = [sys.executable, "-m", "titok_fast.cli", "encode", str(folder / "moving.mp4"), "-o", str(tmp_path / "t"),
           *GRID, *RANDOM]  # fmt: skip
    reading, writing = os.pipe()
    os.close(reading)  # (nobody reads: the first write fails with EPIPE)
    try:
        done = subprocess.run(cmd, stdout=writing, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(writing)
    assert done.returncode == 0 and "Broken pipe" not in done.stderr, done.stderr
    load_tokens(tmp_path / "t" / "moving.safetensors")  # (complete)
    assert [r["status"] for r in read_manifest(tmp_path / "t" / MANIFEST_NAME)] == ["done"]


def test_killed_run_resumes(tmp_path):
    proc, out, cmd = encode_until_the_first_file(tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = sorted(p.name for p in out.glob("*.safetensors"))
    assert 1 <= len(first) < 6, "the run was not interrupted midway; make the clips longer"
    for name in first:  # whatever was written under its final name is complete
        load_tokens(out / name)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"skipped {len(first)} already complete" in done.stdout
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"clip{i}.safetensors" for i in range(6)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


@pytest.mark.parametrize("how", [
    (signal.SIGTERM, "thread", "terminated (SIGTERM)", os.kill),
    (signal.SIGINT, "process", "interrupted", os.killpg),  # a terminal's Ctrl-C goes to the whole group
    (signal.SIGTERM, "process", "terminated (SIGTERM)", os.killpg),  # as a scheduler's may (Slurm's scancel)
], ids=["sigterm", "ctrl-c-process-workers", "sigterm-group-process-workers"])  # fmt: skip
def test_a_stopped_run_says_so_in_one_line_and_lists_what_it_did_not_encode(how, tmp_path):
    """SIGTERM (a scheduler stopping the job) is handled as Ctrl-C; a Ctrl-C reaches the whole process group, worker
    processes included, and only the main process answers it: no traceback, the manifest lists the rest, and a
    token file and its manifest line are written both or neither."""
    sig, kind, said, kill = how
    temp = tmp_path / "tmp"  # where the worker processes make their folders
    temp.mkdir()
    # the signal comes as the first token file lands, before its manifest line is written: the line still is
    # (without interrupts_held, 7 runs in 8 lost it)
    proc, out, _ = encode_until_the_first_file(tmp_path, "--worker-kind", kind, env={**os.environ, "TMPDIR": str(temp)})
    kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert not list(temp.glob("pymp-*"))  # the workers ended as the run stopped them, removing their folders
    assert proc.returncode == 128 + sig, err
    assert err.rstrip().endswith(f"titok-fast: {said}") and "Traceback" not in err, err
    rows = read_manifest(out / MANIFEST_NAME, latest=True)
    done = sorted(p.name for p in out.glob("*.safetensors"))
    assert 1 <= len(done) < 6, "the run was not stopped midway; make the clips longer"
    assert sorted(os.path.basename(r["tokens"]) for r in rows if r["status"] == "done") == done
    stopped = [r for r in rows if r["status"] == "not-encoded"]
    by = "signal SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    assert len(stopped) == 6 - len(done) and all(r["reason"] == f"not encoded: the run was interrupted ({by})"
                                                 for r in stopped)  # fmt: skip


def test_a_sigterm_that_ray_hands_back_as_a_plain_interrupt_still_says_terminated(monkeypatch, capsys):
    """Ray turns an interrupt raised while the main thread waits in it (ray.get, ray.wait) into a plain
    KeyboardInterrupt; the command still says it was terminated and exits 143, not 130 ("interrupted")."""

    def waits_in_ray(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        except KeyboardInterrupt:
            raise KeyboardInterrupt() from None  # as Ray's check_signals does
        raise AssertionError("the SIGTERM handler did not raise")

    parser = build_parser()
    monkeypatch.setattr("titok_fast.cli.build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: argparse.Namespace(command="x", run=waits_in_ray))
    before = signal.getsignal(signal.SIGTERM)
    assert main([]) == 143
    assert capsys.readouterr().err == "titok-fast: terminated (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) is before  # the command's handler is gone again


@pytest.mark.parametrize(("sig", "code", "said"), [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                  (signal.SIGINT, 130, "interrupted")])  # fmt: skip
def test_a_signal_while_torch_is_imported_stops_the_command_once_it_is_in(
    monkeypatch, capsys, tmp_path, sig, code, said
):
    """torch's C code imports numpy and drops what a signal handler raises in it: a SIGTERM or Ctrl-C in the first
    second of a run was lost (the run went on), or left numpy half made and every file failed. The command's first
    imports (HELD_IMPORTS) now hold the signal until they are in; then the command stops before it runs. A module
    standing for torch sends the signal and drops what is raised, as torch's C code does."""
    (tmp_path / "stands_for_torch.py").write_text(
        "import os, signal, time\n"
        f"try:\n    os.kill(os.getpid(), {int(sig)})\n    time.sleep(0.2)\nexcept BaseException:\n    pass\n"
        "IN = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "stands_for_torch", raising=False)
    monkeypatch.setattr("titok_fast.cli.HELD_IMPORTS", ("stands_for_torch",))
    ran = []
    parser = build_parser()
    monkeypatch.setattr("titok_fast.cli.build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: argparse.Namespace(command="x", run=ran.append))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (as in a terminal: not ignored)
    try:
        assert main([]) == code
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err == f"titok-fast: {said}\n"
    assert sys.modules["stands_for_torch"].IN and not ran  # imported whole; the command did not run


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_stop_does_not_wait_for_a_decoder_stuck_in_a_read(kind, tmp_path):
    """A scheduler's SIGTERM (to the main process only, as Kubernetes sends it) while a worker is stuck in a read
    that never returns (--stall-timeout 0: wait for ever): the run still stops, lists what it did not encode, and
    exits; it used to wait for the stuck read for ever (for the stall limit when one is set)."""
    hangs = make_hanging(tmp_path)
    proc, out, _ = encode_until_the_first_file(tmp_path, "--worker-kind", kind, "--workers", "2", "--stall-timeout",
                                               "0", inputs=[hangs], files=6)  # fmt: skip
    try:  # every file but the stuck one is written (the engine runs a batch held for want of clips after a second)
        assert len(list(out.glob("*.safetensors"))) == 6 and proc.poll() is None
        wait_for_a_reader_of_hanging(tmp_path)  # the second worker is in the stuck file
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=90)  # a stuck run would never end
    finally:
        release_hanging(tmp_path)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143 and err.rstrip().endswith("titok-fast: terminated (SIGTERM)"), err
    latest = {os.path.basename(r["source"]): r["status"] for r in read_manifest(out / MANIFEST_NAME, latest=True)}
    assert latest["hangs.mp4"] == "not-encoded" and len(latest) == 7, latest


def two_videos_encoded(tmp_path, capsys):
    """videos a.mp4 and b.mp4 encoded once: (their folder, the output folder, the command)."""
    videos, out = tmp_path / "videos", tmp_path / "tokens"
    videos.mkdir()
    for name in ("a", "b"):
        make_video(videos / f"{name}.mp4", frames=30, height=48, width=64, fps=24)
    command = ("encode", videos, "-o", out, *GRID, *RANDOM)
    assert run(*command, capsys=capsys)[0] == 0
    return videos, out, command


def test_a_resume_redoes_a_changed_source_and_names_only_the_input_really_displaced(tmp_path, capsys):
    videos, out, command = two_videos_encoded(tmp_path, capsys)
    clips = load_tokens(out / "a.safetensors").token_counts.numel()
    make_video(videos / "a.mp4", frames=60, height=48, width=64, fps=24)  # replaced by a longer one (a download ended)
    assert run(*command, capsys=capsys)[0] == 0
    latest = {os.path.basename(r["source"]): r for r in read_manifest(out, latest=True)}
    assert latest["a.mp4"]["status"] == "done" and "its source changed since" in latest["a.mp4"]["replaced"]
    assert latest["b.mp4"]["status"] == "done" and load_tokens(out / "a.safetensors").token_counts.numel() > clips
    shutil.copy(out / "b.safetensors", out / "a.safetensors")  # b's tokens under a's name
    assert run(*command, capsys=capsys)[0] == 0
    latest = {os.path.basename(r["source"]): r for r in read_manifest(out, latest=True)}
    assert latest["a.mp4"]["status"] == "done" and "made from another source" in latest["a.mp4"]["replaced"]
    assert latest["b.mp4"]["status"] == "done"  # b has its own token file: it was not displaced


def test_resuming_a_finished_job_adds_no_manifest_lines_and_one_settled_otherwise_adds_one(tmp_path, capsys):
    """A resumed job does not repeat, for every input, that it is complete: a job of a million inputs resumed
    ten times would add ten million lines. It still says so of an input whose latest line does not."""
    videos, out, command = two_videos_encoded(tmp_path, capsys)
    manifest = out / MANIFEST_NAME
    lines = manifest.read_text()
    for _ in range(2):
        code, stdout, _ = run(*command, capsys=capsys)
        assert code == 0 and "skipped 2 already complete" in stdout and manifest.read_text() == lines
    a, now = str(videos.resolve() / "a.mp4"), lambda: datetime.datetime.now(datetime.UTC).isoformat()
    with open(manifest, "a") as file:  # as if a job since had stopped before a's token file, then another wrote it
        file.write(json.dumps({"source": a, "tokens": str(out.resolve() / "a.safetensors"), "clips": 0,
                               "status": "not-encoded", "reason": "stopped", "time": now()}) + "\n")
    assert run(*command, capsys=capsys)[0] == 0
    added = [json.loads(line) for line in manifest.read_text().splitlines()[len(lines.splitlines()) + 1 :]]
    assert [(row["source"], row["status"]) for row in added] == [(a, "skipped")]


def test_decode_takes_folders_and_keeps_their_structure(folder, tmp_path, capsys):
    """Token files named alike in two folders (as encode keeps a dataset's structure) decode side by side."""
    tokens = tmp_path / "tokens"
    run("encode", folder / "moving.mp4", "-o", tokens, *GRID, *RANDOM, capsys=capsys)
    run("encode", folder / "moving.mp4", "-o", tokens / "sub", *GRID, *RANDOM, capsys=capsys)
    (tokens / "sub" / "notes.txt").write_text("not a token file")
    code, stdout, _ = run("decode", tokens, tokens / "moving.safetensors", "-o", tmp_path / "v", capsys=capsys)
    assert code == 0 and "decoded 2 file(s)" in stdout, stdout  # the file named twice: once
    assert sorted(str(p.relative_to(tmp_path / "v")) for p in (tmp_path / "v").rglob("*")) == [
        "moving.mp4", "sub", "sub/moving.mp4"
    ]
    code, _, err = run("decode", tmp_path / "v", "-o", tmp_path / "w", capsys=capsys)
    assert code == 2 and f"error: no token files found in {tmp_path / 'v'} (files ending in .safetensors, as " in err
    linked = tmp_path / "linked"  # a dataset of links to folders: followed, as encode follows them
    linked.mkdir()
    (linked / "sub").symlink_to(tokens / "sub")
    code, stdout, _ = run("decode", linked, "-o", tmp_path / "x", capsys=capsys)
    assert code == 0 and "decoded 1 file(s)" in stdout and (tmp_path / "x" / "sub" / "moving.mp4").is_file()


def test_decode_takes_lists_and_shards(folder, tmp_path, capsys):
    """A million token files are split over GPUs as encode splits videos: ``--shard K/N`` (the same output names
    give the same shards) and list files of token files (a list was read as a token file and failed)."""
    tokens = tmp_path / "tokens"
    run("encode", folder, "-o", tokens, *GRID, *RANDOM, capsys=capsys)
    for i in range(6):  # more names to split (each a copy of one token file: decoded as its own)
        shutil.copy(tokens / "moving.safetensors", tokens / f"copy{i}.safetensors")
    made = sorted(str(p.relative_to(tokens).with_suffix("")) for p in tokens.rglob("*.safetensors"))
    assert len(made) == 9
    listing = tmp_path / "lists" / "tokens.txt"  # relative entries, from the list's folder
    listing.parent.mkdir()
    top = [name for name in made if "/" not in name][:2]
    listing.write_text("# the dataset\n" + "".join(f"../tokens/{n}.safetensors\n" for n in top) + "../tokens/sub\n")
    code, _, _ = run("decode", listing, "-o", tmp_path / "listed", capsys=capsys)
    decoded = sorted(p.stem for p in (tmp_path / "listed").rglob("*.mp4"))
    assert code == 0 and decoded == sorted(top + [n.removeprefix("sub/") for n in made if n.startswith("sub/")])
    shards = []
    for k in range(2):
        code, stdout, err = run("decode", tokens, "-o", tmp_path / "sharded", "--shard", f"{k}/2", capsys=capsys)
        shards.append(sorted(str(p.relative_to(tmp_path / "sharded").with_suffix(""))
                             for p in (tmp_path / "sharded").rglob("*.mp4")))  # fmt: skip
        assert code == 0 and f"shard {k}/2: " in err
    assert shards[1] == made and 0 < len(shards[0]) < len(made)  # each shard added its own files, none twice
    assert [n for _, n in select_shard([(None, n) for n in made], 0, 2)] == shards[0]
    empty = next(k for k in range(64) if not select_shard([(None, "moving")], k, 64))
    code, stdout, err = run("decode", tokens / "moving.safetensors", "-o", tmp_path / "e", "--shard", f"{empty}/64",
                            capsys=capsys)  # fmt: skip
    assert code == 0 and f"shard {empty}/64: 0 of 1 inputs" in err and "decoded 0 file(s)" in stdout  # (no model
    # to look for: a job of a shard given no file is not failed)


def test_decode_never_opens_a_checkpoint_a_token_file_names(folder, tmp_path, capsys, monkeypatch):
    """A token file is a stranger's: the local weights path it records is not opened; --checkpoint is asked for,
    or $TITOK_FAST_CHECKPOINT (the user's own default weights) is used where its weights are the recorded ones."""
    from titok_fast.loading import random_tokenizer, save_safetensors

    weights, others = tmp_path / "w.safetensors", tmp_path / "others.safetensors"
    save_safetensors(random_tokenizer("tiny", seed=5), weights)
    save_safetensors(random_tokenizer("tiny", seed=6), others)
    code, _, _ = run("encode", folder / "moving.mp4", "-o", tmp_path, *GRID, "--checkpoint", weights, capsys=capsys)
    assert code == 0
    token_file = load_tokens(tmp_path / "moving.safetensors")
    assert token_file.weights_source == str(weights.resolve()) and not token_file.weights_digest.startswith("random")
    code, _, err = run("decode", tmp_path / "moving.safetensors", "-o", tmp_path / "v", capsys=capsys)
    assert code == 2 and "not trusted to name local files: pass --checkpoint" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "v").exists()
    code, stdout, _ = run("decode", tmp_path / "moving.safetensors", "-o", tmp_path / "v", "--checkpoint", weights,
                          capsys=capsys)  # fmt: skip
    assert code == 0 and "decoded 1 file(s)" in stdout
    monkeypatch.setenv("TITOK_FAST_CHECKPOINT", str(tmp_path / "gone.safetensors"))
    code, _, err = run("decode", tmp_path / "moving.safetensors", "-o", tmp_path / "e", capsys=capsys)
    assert code == 2 and f"$TITOK_FAST_CHECKPOINT ({tmp_path / 'gone.safetensors'}) cannot be loaded (checkpoint" in err
    assert err.rstrip().endswith(": pass --checkpoint") and len(err.splitlines()) == 1
    monkeypatch.setenv("TITOK_FAST_CHECKPOINT", str(others))
    code, _, err = run("decode", tmp_path / "moving.safetensors", "-o", tmp_path / "e", capsys=capsys)
    assert code == 2 and f"$TITOK_FAST_CHECKPOINT ({others}) has weights" in err and len(err.splitlines()) == 1
    monkeypatch.setenv("TITOK_FAST_CHECKPOINT", str(weights))
    code, stdout, err = run("decode", tmp_path / "moving.safetensors", "-o", tmp_path / "e", capsys=capsys)
    assert code == 0 and "decoded 1 file(s)" in stdout and f"weights: $TITOK_FAST_CHECKPOINT ({weights})" in err
    assert np.array_equal(read_frames(tmp_path / "e" / "moving.mp4")[0], read_frames(tmp_path / "v" / "moving.mp4")[0])


def test_decode_rebuilds_random_weights_only_within_limits(folder, tmp_path, capsys):
    """A token file claiming random weights rebuilds them from its config, which must respect the size limits."""
    from titok_fast.tokens import save_tokens

    run("encode", folder / "moving.mp4", "-o", tmp_path, *GRID, *RANDOM, capsys=capsys)
    code, stdout, _ = run("decode", tmp_path / "moving.safetensors", "-o", tmp_path / "v", capsys=capsys)
    assert code == 0 and "decoded 1 file(s)" in stdout
    token_file = load_tokens(tmp_path / "moving.safetensors")
    config = json.loads(json.dumps(token_file.model_config))
    config["tokenizer"]["model"]["fsq_levels"] = [1000] * 5  # same weight shapes, a 1e15-entry decoder table
    save_tokens(tmp_path / "big.safetensors", dataclasses.replace(token_file, model_config=config))
    code, _, err = run("decode", tmp_path / "big.safetensors", "-o", tmp_path / "w", capsys=capsys)
    assert code == 2 and "fsq_levels [1000, 1000, 1000, 1000, 1000]: upstream computes the indices of level(s) [1000]" \
        in err


def test_decode_builds_no_random_model_larger_than_the_largest_preset_for_a_token_file(folder, tmp_path, capsys,
                                                                                        monkeypatch):
    """A 1 KB token file naming random weights of the largest model the size limits allow (557M parameters) had
    decode build it, GBs, before any digest was compared; and a failure to build it (no memory) stopped the run
    instead of failing that file alone. Now it is refused unbuilt, and the next file's weights are tried."""
    from titok_fast import loading
    from titok_fast.tokens import save_tokens

    run("encode", folder / "moving.mp4", "-o", tmp_path, *GRID, *RANDOM, capsys=capsys)
    token_file = load_tokens(tmp_path / "moving.safetensors")
    config = json.loads(json.dumps(token_file.model_config))
    config["tokenizer"]["model"].update(encoder_size="large", decoder_size="large")
    big = tmp_path / "big" / "0big.safetensors"
    big.parent.mkdir()
    save_tokens(big, dataclasses.replace(token_file, model_config=config))
    built, random_tokenizer = [], loading.random_tokenizer
    monkeypatch.setattr(loading, "random_tokenizer", lambda config, **kw: built.append(config) or
                        random_tokenizer(config, **kw))  # fmt: skip
    code, _, err = run("decode", big, "-o", tmp_path / "v", capsys=capsys)
    assert code == 2 and not built and len(err.splitlines()) == 1
    assert re.search(r"random weights \(seed 0\) of a model of [\d,]+ parameters, more than the largest preset's "
                     r"269,577,733: pass --random-weights 0 with its --config$", err)  # fmt: skip

    def no_memory(config, **kw):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    first = dataclasses.replace(token_file, weights_digest="random-seed1-" + token_file.weights_digest[-16:])
    save_tokens(tmp_path / "0first.safetensors", first)
    monkeypatch.setattr(loading, "random_tokenizer", lambda config, seed, **kw: (no_memory if seed == 1 else
                        random_tokenizer)(config, seed=seed, **kw))  # fmt: skip
    files = [tmp_path / "0first.safetensors", tmp_path / "moving.safetensors"]
    code, stdout, _ = run("decode", *files, "-o", tmp_path / "w", capsys=capsys)
    assert code == 1 and "decoded 1 file(s)" in stdout
    assert f"FAILED {files[0]}: made by weights random-seed1" in stdout


def test_decode_takes_the_model_most_token_files_name_and_checks_a_random_digest(folder, tmp_path, capsys):
    """The first token file in order chose the model for all: a stranger's file sorting first, with the genuine
    digest and another config of the same weight shapes (or a made-up random-weights digest, never checked), had
    every genuine file fail. Now the weights and config most files name are tried first, and random weights must
    give the digest recorded."""
    from titok_fast.tokens import save_tokens

    run("encode", folder / "moving.mp4", "-o", tmp_path / "t", *GRID, *RANDOM, capsys=capsys)
    genuine = load_tokens(tmp_path / "t" / "moving.safetensors")
    for name in ("a", "b"):
        shutil.copy(tmp_path / "t" / "moving.safetensors", tmp_path / "t" / f"{name}.safetensors")
    config = json.loads(json.dumps(genuine.model_config))
    levels = config["tokenizer"]["model"]["fsq_levels"]
    config["tokenizer"]["model"]["fsq_levels"] = levels[1:] + levels[:1]  # other codes, the same weights
    save_tokens(tmp_path / "t" / "0other.safetensors", dataclasses.replace(genuine, model_config=config))
    code, stdout, _ = run("decode", tmp_path / "t", "-o", tmp_path / "v", capsys=capsys)
    assert code == 1 and "decoded 3 file(s)" in stdout and "made by another model config" in stdout, stdout
    made_up = dataclasses.replace(genuine, weights_digest="random-seed7-0000000000000000")
    save_tokens(tmp_path / "made-up.safetensors", made_up)
    code, _, err = run("decode", tmp_path / "made-up.safetensors", "-o", tmp_path / "w", capsys=capsys)
    assert code == 2 and "the token files name random weights random-seed7-0000000000000000, but seed 7 gives " in err


def test_changed_clip_settings_re_encode_instead_of_skipping(folder, tmp_path, capsys):
    run("encode", folder / "moving.mp4", "-o", tmp_path, *GRID, *RANDOM, capsys=capsys)
    code, stdout, _ = run("encode", folder / "moving.mp4", "-o", tmp_path, *GRID, *RANDOM, capsys=capsys)
    assert "skipped 1 already complete" in stdout
    more = ["--grid", "4x32x32", "--tokens", "16", "--fps", "8"]
    code, stdout, _ = run("encode", folder / "moving.mp4", "-o", tmp_path, *more, *RANDOM, capsys=capsys)
    assert code == 0 and "encoded 1 file(s)" in stdout and "skipped 0" in stdout
    assert load_tokens(tmp_path / "moving.safetensors").token_counts.tolist() == [16, 16]


def test_decode_survives_an_unreadable_first_token_file(folder, tmp_path, capsys):
    run("encode", folder / "moving.mp4", "-o", tmp_path, *GRID, *RANDOM, capsys=capsys)
    (tmp_path / "0broken.safetensors").write_bytes(b"garbage")
    files = [tmp_path / "0broken.safetensors", tmp_path / "moving.safetensors"]
    code, stdout, _ = run("decode", *files, "-o", tmp_path / "v", capsys=capsys)
    assert code == 1 and "decoded 1 file(s)" in stdout and "FAILED" in stdout and "0broken" in stdout
    code, _, err = run("decode", files[0], "-o", tmp_path / "v", capsys=capsys)  # no token file at all: the reason
    assert code == 2 and err.startswith(f"titok-fast: error: none of the 1 file(s) given is a readable token file "
                                        f"({files[0]}: not a readable safetensors file (")  # fmt: skip
    code, _, err = run("decode", folder / "moving.mp4", "-o", tmp_path / "v", capsys=capsys)  # a video: said
    assert code == 2 and err == (f"titok-fast: error: none of the 1 file(s) given is a readable token file "
                                 f"({folder / 'moving.mp4'}: a video file, not a token file: `titok-fast encode` "
                                 "makes token files from videos)\n")  # fmt: skip
    code, stdout, _ = run("decode", folder / "moving.mp4", "-o", tmp_path / "v", *RANDOM, capsys=capsys)  # a model
    assert code == 1 and f"FAILED {folder / 'moving.mp4'}: a video file, not a token file: `titok-fast encode` " \
        "makes token files from videos" in stdout, stdout  # fmt: skip
    code, _, err = run("decode", tmp_path / "typo.safetensors", files[1], "-o", tmp_path / "v", capsys=capsys)
    assert code == 2 and err == f"titok-fast: error: input {str(tmp_path / 'typo.safetensors')!r} does not exist\n"
    good = load_tokens(files[1])  # a readable file whose model config no model may have does not name the model
    config = json.loads(json.dumps(good.model_config))
    config["training"]["sampling"]["max_grid"] = [100000, 100000, 100000]
    save_tokens(tmp_path / "0huge.safetensors", dataclasses.replace(good, model_config=config))
    code, stdout, _ = run("decode", tmp_path / "0huge.safetensors", files[1], "-o", tmp_path / "h", capsys=capsys)
    assert code == 0 and "decoded 2 file(s)" in stdout, stdout  # the next file does; the first has its weights
    # a first file naming weights that cannot be had (a local file): the next file's weights decode the others
    evil = dataclasses.replace(good, weights_digest="0123456789abcdef", weights_source="/etc/passwd")
    save_tokens(tmp_path / "0evil.safetensors", evil)
    code, stdout, _ = run("decode", tmp_path / "0evil.safetensors", files[1], "-o", tmp_path / "e", capsys=capsys)
    assert code == 1 and "decoded 1 file(s)" in stdout, stdout
    assert f"FAILED {tmp_path / '0evil.safetensors'}: made by weights 0123456789abcdef" in stdout
    save_tokens(tmp_path / "0long.safetensors", dataclasses.replace(evil, weights_digest="d" * 900_000))
    code, stdout, _ = run("decode", tmp_path / "0long.safetensors", files[1], "-o", tmp_path / "l", capsys=capsys)
    assert code == 1 and f"0long.safetensors: made by weights {'d' * 61}..., the loaded model by " in stdout
    assert max(map(len, stdout.splitlines())) < 400  # (a stranger's MiB of metadata is not one line of output)
    code, _, err = run("decode", tmp_path / "0long.safetensors", "-o", tmp_path / "l", capsys=capsys)
    assert code == 2 and f"name weights {'d' * 61}... from '/etc/passwd'; token files are not trusted" in err
    code, _, err = run("decode", tmp_path / "0evil.safetensors", "-o", tmp_path / "f", capsys=capsys)
    assert code == 2 and "token files are not trusted to name local files: pass --checkpoint" in err
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "moving.safetensors").write_bytes((tmp_path / "moving.safetensors").read_bytes())
    code, _, err = run("decode", files[1], tmp_path / "x" / "moving.safetensors", "-o", tmp_path / "w", capsys=capsys)
    assert code == 2 and "would both write moving.mp4" in err
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "0evil.safetensors").write_bytes((tmp_path / "0evil.safetensors").read_bytes())
    code, _, err = run("decode", tmp_path / "0evil.safetensors", tmp_path / "y", "-o", tmp_path / "w", capsys=capsys)
    assert code == 2 and "would both write 0evil.mp4" in err  # said before any weights are looked for


def test_decode_looks_for_usable_weights_in_a_bounded_number_of_token_files(folder, tmp_path, capsys, monkeypatch):
    """Token files that all name weights that cannot be had (a local file): decode says so after reading a few of
    them, not the whole dataset."""
    from titok_fast import cli, pipeline
    from titok_fast.tokens import save_tokens

    run("encode", folder / "moving.mp4", "-o", tmp_path, *GRID, *RANDOM, capsys=capsys)
    local = dataclasses.replace(load_tokens(tmp_path / "moving.safetensors"), weights_digest="0123456789abcdef",
                                weights_source="/weights/model.ckpt")  # fmt: skip
    save_tokens(tmp_path / "local.safetensors", local)
    reads, real = [], pipeline.load_tokens  # (what pipeline.token_file_at reads them with)
    monkeypatch.setattr(pipeline, "load_tokens", lambda path, data=None: reads.append(path) or real(path, data))
    files = [(tmp_path / "local.safetensors", f"v{i}") for i in range(1000)]
    with pytest.raises(ValueError, match=r"not trusted to name local files: pass --checkpoint$"):
        cli._model_of_some_tokens(cli._naming_a_model(files), "cpu", torch.float32)
    assert len(reads) == 1 + cli.MAX_FILES_WITHOUT_NEW_WEIGHTS
    (tmp_path / "damaged.safetensors").write_bytes(b"garbage")  # until a file names a model, every file is read
    files = [(tmp_path / "damaged.safetensors", f"d{i}") for i in range(cli.MAX_FILES_FOR_WEIGHTS + 10)]
    named = cli._naming_a_model([*files, (tmp_path / "moving.safetensors", "moving")])
    assert [n.weights_digest for n in named] == [load_tokens(tmp_path / "moving.safetensors").weights_digest]


def test_decode_keys_the_weights_search_on_the_config_as_read(folder, tmp_path, capsys):
    """Fields a model config does not have (a stranger's file may hold a MB of them, each file other ones) neither
    make a model of their own nor are kept while the files are decoded."""
    from titok_fast import cli
    from titok_fast.tokens import save_tokens

    run("encode", folder / "moving.mp4", "-o", tmp_path, *GRID, *RANDOM, capsys=capsys)
    made = load_tokens(tmp_path / "moving.safetensors")
    for i in range(3):
        junk = dataclasses.replace(made, model_config={**made.model_config, f"junk{i}": [[]] * 1000})
        save_tokens(tmp_path / f"junk{i}.safetensors", junk)
    files = [(tmp_path / f"junk{i}.safetensors", f"j{i}") for i in range(3)]
    named = cli._naming_a_model([*files, (tmp_path / "moving.safetensors", "moving")])
    assert len(named) == 1 and named[0].model_config == made.model_config and "junk" not in repr(named)


def test_decode_lets_go_of_each_model_it_tried_before_it_tries_the_next(folder, tmp_path, capsys, monkeypatch):
    """Token files naming random weights their seed does not make (a stranger's): each model built to check them
    is freed before the next is built, not held by the error kept from it."""
    import gc
    import weakref

    from titok_fast import cli, loading
    from titok_fast.tokens import save_tokens

    run("encode", folder / "moving.mp4", "-o", tmp_path, *GRID, *RANDOM, capsys=capsys)
    made = load_tokens(tmp_path / "moving.safetensors")
    for seed in range(4):
        save_tokens(tmp_path / f"wrong{seed}.safetensors",
                    dataclasses.replace(made, weights_digest=f"random-seed{seed}-0123456789abcdef"))  # fmt: skip
    built, real, alive = [], loading.random_tokenizer, []
    monkeypatch.setattr(loading, "random_tokenizer", lambda *a, **k: built.append(weakref.ref(m := real(*a, **k))) or m)

    def counting(*args):
        gc.collect()
        alive.append(sum(ref() is not None for ref in built))
        return real_of_tokens(*args)

    real_of_tokens = cli._model_of_tokens
    monkeypatch.setattr(cli, "_model_of_tokens", counting)
    files = [(tmp_path / f"wrong{seed}.safetensors", f"w{seed}") for seed in range(4)]
    with pytest.raises(ValueError, match=r"\(nor those of 3 other token files\)$"):
        cli._model_of_some_tokens(cli._naming_a_model(files), "cpu", torch.float32)
    assert len(built) == 4 and alive == [0, 0, 0, 0]


def test_encode_and_decode_name_the_files_of_a_list_by_their_path_below_it_if_asked(folder, tmp_path, capsys):
    """A list of a dataset whose folders repeat file names: refused by stem (the default), saying what to pass;
    with --list-names relative each is named by its path below the list's folder. Decode reads a list of the
    token files so too."""
    for part in ("a", "b"):
        (tmp_path / "ds" / part).mkdir(parents=True)
        shutil.copy(folder / "moving.mp4", tmp_path / "ds" / part / "x.mp4")
    (tmp_path / "ds" / "list.txt").write_text("a/x.mp4\nb/x.mp4\n")
    code, _, err = run("encode", tmp_path / "ds" / "list.txt", "-o", tmp_path / "t", *GRID, *RANDOM, capsys=capsys)
    assert code == 2 and "would both write x.safetensors" in err and "--list-names relative" in err
    code, out, err = run("encode", tmp_path / "ds" / "list.txt", "-o", tmp_path / "t", "--list-names", "relative",
                         *GRID, *RANDOM, capsys=capsys)  # fmt: skip
    assert code == 0, err
    a, b = (load_tokens(tmp_path / "t" / p / "x.safetensors") for p in ("a", "b"))
    assert torch.equal(a.indices, b.indices) and a.source != b.source
    (tmp_path / "t" / "list.txt").write_text("a/x.safetensors\nb/x.safetensors\n")  # decode reads lists so too
    code, _, err = run("decode", tmp_path / "t" / "list.txt", "-o", tmp_path / "r", capsys=capsys)
    assert code == 2 and "would both write x.mp4" in err and "--list-names relative" in err
    code, out, err = run("decode", tmp_path / "t" / "list.txt", "-o", tmp_path / "r", "--list-names", "relative",
                         capsys=capsys)  # fmt: skip
    assert code == 0 and "decoded 2 file(s)" in out, err
    assert sorted(p.relative_to(tmp_path / "r").as_posix() for p in (tmp_path / "r").rglob("*.mp4")) == ["a/x.mp4",
                                                                                                        "b/x.mp4"]


def test_debug_flag_after_the_command_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        main(["encode", str(tmp_path / "missing.mp4"), "-o", str(tmp_path), "--debug"])


def test_time_sampling_is_recorded_and_reused(folder, tmp_path, capsys):
    code, _, _ = run("encode", folder / "sub" / "vfr.mp4", "-o", tmp_path, *GRID, "--sampling", "time", *RANDOM,
                     capsys=capsys)  # fmt: skip
    assert code == 0
    assert load_tokens(tmp_path / "vfr.safetensors").sampling == "time"
    code, stdout, _ = run("decode", tmp_path / "vfr.safetensors", "-o", tmp_path / "v", "--side-by-side",
                          capsys=capsys)  # fmt: skip
    assert code == 0 and "decoded 1 file(s)" in stdout  # the source was re-read with the same sampling


def test_eval_plot_draws_a_line_per_input_resolution(folder, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib", reason="the optional plot extra")
    import titok_fast.plots

    figures, save = [], titok_fast.plots.save_figure

    def keep(figure, path):
        figures.append(figure)
        save(figure, path)

    monkeypatch.setattr(titok_fast.plots, "save_figure", keep)
    inputs = [folder / "moving.mp4", folder / "sub" / "odd.mkv", folder / "single.mp4"]  # 64x48, 53x37, 48x32
    plot = tmp_path / "new" / "rd.png"  # its folder is made when the plot is written
    code, stdout, _ = run("eval", *inputs, "--tokens", "4,16", "--grid", "4x32x32", "--tail", "pad", *RANDOM,
                          "--plot", plot, capsys=capsys)  # fmt: skip
    assert code == 0 and f"wrote {plot}" in stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    psnr_axis, ssim_axis = figures[0].axes
    for axis in (psnr_axis, ssim_axis):
        assert sorted(line.get_label() for line in axis.get_lines()) == ["48x32", "53x37", "64x48"]
        assert all(list(line.get_xdata()) == [4, 16] for line in axis.get_lines())
    assert all(-1 <= y <= 1 for line in ssim_axis.get_lines() for y in line.get_ydata())


def test_eval_plot_without_matplotlib_names_the_extra(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, _, err = run("eval", folder / "moving.mp4", "--grid", "4x32x32", *RANDOM, "--plot", tmp_path / "rd.png",
                       capsys=capsys)  # fmt: skip
    assert code == 2 and "pip install 'titok-fast[plot]'" in err and "RANDOM" not in err  # refused before any work


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_a_sub_folder_that_cannot_be_listed_is_said_and_fails_the_run(folder, tmp_path, monkeypatch, capsys, command):
    """A sub-folder that cannot be listed (no read permission, an NFS root squash) is left out with a notice: its
    files are unknown, so none is in the manifest, and the run ended "0 failed", status 0. It is now said again
    under the summary, and the status is 1; the rest is done."""
    import os

    source = tmp_path / "in"
    if command == "encode":
        (source / "locked").mkdir(parents=True)
        shutil.copy(folder / "moving.mp4", source / "moving.mp4")
        shutil.copy(folder / "moving.mp4", source / "locked" / "hidden.mp4")
    else:
        assert run("encode", folder / "moving.mp4", "-o", source, *GRID, *RANDOM, capsys=capsys)[0] == 0
        (source / "locked").mkdir()
        shutil.copy(source / "moving.safetensors", source / "locked" / "hidden.safetensors")
    (source / "lost+found").mkdir()  # (a file system's own, root's alone: never said, nor counted)
    scandir, ismount = os.scandir, os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: str(path) == str(source) or ismount(path))

    def refused(path):
        if str(path) in (str(source / "locked"), str(source / "lost+found")):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refused)
    options = [*GRID, *RANDOM] if command == "encode" else []
    code, stdout, stderr = run(command, source, "-o", tmp_path / "out", *options, capsys=capsys)
    verb = f"{command}d"
    assert code == 1 and f"{verb} 1 file(s)" in stdout and "0 failed" in stdout
    left_out = f"  LEFT OUT {source / 'locked'}: cannot be listed (Permission denied); the files in it were not {verb}"
    assert stdout.splitlines()[-1] == left_out
    assert f"{source / 'locked'}: cannot be listed (Permission denied); left out" in stderr


def test_bench_prints_the_table_of_its_results(tmp_path, monkeypatch, capsys):
    """``bench`` runs the suite, then prints the results file as a table (the report module, imported); an
    earlier results file is replaced."""
    results = tmp_path / "new" / "r.json"
    record = {"group": "cpu-encode", "extra_info": {"provider": "torch", "device": "cpu", "clips_per_s": 3.0}}

    def fake_pytest(cmd):
        assert benchmark_json(cmd).parent == results.parent and cmd[-2:] == ["-k", "cpu"]
        benchmark_json(cmd).write_text(json.dumps({"benchmarks": [record]}))
        return 0

    monkeypatch.setattr(subprocess, "call", fake_pytest)
    code, out, _ = run("bench", "--json", results, "-k", "cpu", capsys=capsys)
    assert code == 0 and "| torch | 3.00 | 1.00x |" in out
    record["extra_info"]["clips_per_s"] = 4.0
    code, out, _ = run("bench", "--json", results, "-k", "cpu", capsys=capsys)
    assert code == 0 and "| torch | 4.00 | 1.00x |" in out and os.listdir(results.parent) == ["r.json"]


@pytest.mark.parametrize("earlier", [False, True], ids=["no-earlier-file", "earlier-file"])
def test_bench_that_ran_no_benchmark_says_so_and_leaves_an_earlier_file_as_it_was(tmp_path, monkeypatch, capsys,
                                                                                  earlier):  # fmt: skip
    """Every selected benchmark skipped (``-k gpu`` on a CPU): pytest-benchmark leaves an empty results file, which
    is removed; an earlier run's results stay as they were, and the run says that no benchmark ran (not that the
    file is not JSON)."""
    results = tmp_path / "r.json"
    if earlier:
        results.write_text('{"benchmarks": []}')

    def fake_pytest(cmd):
        benchmark_json(cmd).write_text("")  # (truncated as pytest-benchmark does)
        return 0

    monkeypatch.setattr(subprocess, "call", fake_pytest)
    code, out, err = run("bench", "--json", results, "-k", "gpu", capsys=capsys)
    left = ["r.json"] if earlier else []
    assert code == 0 and out == "" and os.listdir(tmp_path) == left
    assert err.splitlines()[-1].startswith("titok-fast: no benchmark ran: each one selected was skipped")
    assert ("is an earlier run's: this run wrote no results" in err) == earlier
    monkeypatch.setattr(subprocess, "call", lambda cmd: fake_pytest(cmd) + 1)  # every benchmark errored, say
    code, out, err = run("bench", "--json", results, "-k", "gpu", capsys=capsys)
    assert code == 1 and os.listdir(tmp_path) == left and "skipped" not in err  # (pytest's output says why)
    if earlier:
        assert results.read_text() == '{"benchmarks": []}'


def test_bench_refuses_to_write_its_results_over_a_file_of_another_kind(tmp_path, monkeypatch, capsys):
    """``--json`` naming a video (or any file that is not JSON) is refused before the suite runs, as ``eval``'s."""
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    monkeypatch.setattr(subprocess, "call", lambda cmd: pytest.fail("the suite ran"))
    code, _, err = run("bench", "--json", video, capsys=capsys)
    assert code == 2 and video.read_bytes() == b"\x00\x00\x00\x18ftypmp42"
    assert err.strip().endswith(f"--json {video}: is there already and is not a JSON file; it would be replaced: "
                                "remove it or choose another path")  # fmt: skip


@pytest.mark.parametrize("options", [[], ["--workers", "2"]], ids=["default", "given"])
def test_demo_reads_with_the_workers_it_is_given(tmp_path, monkeypatch, capsys, options):
    """The demo's --workers (default 1: it reads one short video) reaches its encode run."""
    from titok_fast import hub, pipeline

    def offline(ref, quick=False):  # (the demo's V1 weights, not to be had: it falls back to random weights)
        raise hub.WeightsUnavailable(f"weights {ref} are not to be had in this test")

    monkeypatch.setattr(hub, "download", offline)
    given, encode_files = [], pipeline.encode_files

    def recorded(*args, **kwargs):
        given.append(kwargs.get("workers"))
        return encode_files(*args, **kwargs)

    monkeypatch.setattr(pipeline, "encode_files", recorded)
    code, out, _ = run("demo", "-o", tmp_path / "demo", "--config", "tiny", "--device", "cpu", "--grid", "4x32x32",
                       "--tokens", "8", *options, capsys=capsys)  # fmt: skip
    assert code == 0 and "PSNR" in out
    assert given == [2 if options else 1]


def test_the_demo_runs_again_without_setting_its_own_token_file_aside_and_fits_its_sample_to_the_clip(
    tmp_path, monkeypatch, capsys
):
    """The demo writes its sample anew each run: its last token file is not one "made otherwise" to replace or,
    on a failure, to set aside as .outdated (one more each run). Its sample is long enough for a clip of the grid's
    frames at the --fps given; an --fps above the sample's own is refused before anything is written."""
    from titok_fast import hub

    def offline(ref, quick=False):
        raise hub.WeightsUnavailable(f"weights {ref} are not to be had in this test")

    monkeypatch.setattr(hub, "download", offline)
    demo = ["-o", tmp_path / "d", "--config", "tiny", "--device", "cpu"]
    code, _, err = run("demo", *demo, "--fps", "100", capsys=capsys)
    assert code == 2 and err.endswith("--fps 100: the demo's sample video has 8 frames a second; sample it at 8 or "
                                      "fewer\n") and not (tmp_path / "d").exists()  # fmt: skip
    for options in ([], [], ["--grid", "32x64x96", "--tokens", "64"], ["--fps", "1"]):  # (sample: 3 s, 4 s, 8 s)
        code, out, err = run("demo", *demo, *options, capsys=capsys)
        assert code == 0 and "0 failed" in out and "replaced" not in out, out + err
        assert sorted(os.listdir(tmp_path / "d" / "tokens")) == ["manifest.jsonl", "sample.safetensors"]


def test_the_demo_keeps_a_users_files_at_its_output_names(tmp_path, monkeypatch, capsys):
    """A user's video, notes, FIFO or file under a name the demo writes (sample.mp4, tokens/sample.safetensors,
    recon/sample.mp4, the folder recon), also in a folder the demo wrote before, is kept, the demo refused in one
    line; the demo's own folder (also through a link, or moved), and an earlier version's (its sample unmarked, the
    file its token file was made from), are run again."""
    from titok_fast import hub
    from titok_fast.writing import write_video

    def offline(ref, quick=False):
        raise hub.WeightsUnavailable(f"weights {ref} are not to be had in this test")

    monkeypatch.setattr(hub, "download", offline)
    demo = ["--config", "tiny", "--device", "cpu", "--grid", "4x32x32", "--tokens", "8"]
    code, out, err = run("demo", "-o", tmp_path / "d", *demo, capsys=capsys)
    assert code == 0, err
    code, out, err = run("demo", "-o", tmp_path / "d", *demo, capsys=capsys)  # its own folder: run again
    assert code == 0 and "PSNR" in out, err
    (tmp_path / "link").symlink_to(tmp_path / "d")  # its folder through a link, or moved
    assert run("demo", "-o", tmp_path / "link", *demo, capsys=capsys)[0] == 0
    (tmp_path / "d").rename(tmp_path / "moved")
    assert run("demo", "-o", tmp_path / "moved", *demo, capsys=capsys)[0] == 0
    old = tmp_path / "old"  # an earlier version's folder: its sample unmarked, the file its token file was made from
    shutil.copytree(tmp_path / "moved", old)
    write_video(old / "sample.mp4", torch.zeros(3, 8, 32, 32), fps=8)
    assert run("encode", old / "sample.mp4", "-o", old / "tokens", *GRID, *RANDOM, capsys=capsys)[0] == 0
    assert run("demo", "-o", old, *demo, capsys=capsys)[0] == 0
    for name, kind in (("sample.mp4", "video"), ("tokens/sample.safetensors", "notes"), ("recon/sample.mp4", "video"),
                       ("sample.mp4", "fifo"), ("recon", "notes"), ("recon/sample.mp4", "nested")):  # fmt: skip
        folder = tmp_path / f"{kind}-{name.replace('/', '_')}"
        for there in ("sample.mp4", "tokens/sample.safetensors", "recon/sample.mp4"):  # a demo's folder first
            (folder / there).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "moved" / there, folder / there)
        (folder / name).unlink() if (folder / name).is_file() else shutil.rmtree(folder / name)
        if kind == "fifo":
            os.mkfifo(folder / name)
        elif kind == "notes":
            (folder / name).write_bytes(b"my notes")
        else:  # ("nested": a record as decode's begins, nested past json's recursion limit)
            from titok_fast.pipeline import DECODE_RECORD

            comment = DECODE_RECORD + "[" * 100_000 if kind == "nested" else ""
            write_video(folder / name, torch.zeros(3, 8, 32, 32), fps=8, comment=comment)
        before = (folder / name).read_bytes() if kind != "fifo" else b""
        code, _, err = run("demo", "-o", folder, *demo, capsys=capsys)
        assert code == 2 and f"{folder / name} is there and not known to be the demo's: kept" in err, err
        assert kind == "fifo" or (folder / name).read_bytes() == before


NVDEC_MISSING = ("titok-fast: --decoder nvdec: NVDEC cannot decode here (no CUDA device); every file is decoded on "
                 "the CPU, and its token file says so")


def test_encode_input_options_give_the_same_tokens_and_are_recorded(folder, tmp_path, capsys):
    """--worker-kind process, --preprocess device and --decoder nvdec (no GPU here: one notice, then the CPU
    decoder, which the token files record: a later run that has NVDEC redoes them) all give the default run's
    tokens; each token file says how it was made."""
    inputs = [folder / "moving.mp4", folder / "sub" / "odd.mkv"]
    runs = {
        "default": [],
        "process": ["--worker-kind", "process", "--workers", "2", "--preprocess", "device"],
        "nvdec": ["--decoder", "nvdec", "--workers", "1"],
    }
    for name, options in runs.items():
        code, stdout, stderr = run("encode", *inputs, "-o", tmp_path / name, *GRID, *RANDOM, *options, capsys=capsys)
        assert code == 0 and "encoded 2 file(s)" in stdout
        notices = [line for line in stderr.splitlines() if "on the CPU" in line]
        assert notices == ([NVDEC_MISSING] if name == "nvdec" else [])
    for stem in ("moving", "odd"):
        made = {name: load_tokens(tmp_path / name / f"{stem}.safetensors") for name in runs}
        assert all(torch.equal(made["default"].indices, t.indices) for t in made.values())
        assert made["default"].made_with["preprocessed_on"] == "cpu"  # auto, on a CPU model
        assert made["process"].made_with["preprocessed_on"] == "device"
        assert (made["nvdec"].made_with["decoder"], made["nvdec"].made_with["decoded_by"]) == ("cpu", "cpu")
    args = build_parser().parse_args(["encode", "x.mp4", "-o", "out"])
    assert (args.workers, args.worker_kind, args.decoder, args.preprocess) == (None, None, "cpu", "auto")  # thread


def test_encode_starts_the_server_worker_processes_come_from_before_it_loads_the_model(folder, tmp_path, capsys,
                                                                                         monkeypatch):
    """Decoding processes are forked from a server that imports torch and PyAV (2.5 CPU-s): encode starts it before
    it loads the model, so that the two overlap; a run of threads starts none."""
    from multiprocessing import forkserver

    from titok_fast import cli

    model, running = cli._model, []

    def loading(*args, **kwargs):
        running.append(forkserver._forkserver._forkserver_pid is not None)
        return model(*args, **kwargs)

    monkeypatch.setattr(cli, "_model", loading)
    for kind in ("thread", "process"):
        forkserver._forkserver._stop()
        code, stdout, _ = run("encode", folder / "moving.mp4", "-o", tmp_path / kind, *GRID, *RANDOM, "--workers", "2",
                              "--worker-kind", kind, capsys=capsys)  # fmt: skip
        assert code == 0 and "encoded 1 file(s)" in stdout
    assert running == [False, True]


def test_rotation_display_gives_the_tokens_of_the_turned_frames_is_recorded_and_resumes_apart(tmp_path, capsys):
    """--rotation display: a phone-style file (frames stored sideways, a display matrix of -90 degrees) gives the
    tokens of a file storing them upright; the token file records it, so a run with the other rotation redoes the
    file instead of keeping it, and decoding shows the source turned beside the reconstruction; eval's plot and
    NVDEC's fallback to the CPU turn it too."""
    from titok_fast.pipeline import source_chunks

    frames = [pattern_frame("moving", i, 48, 64) for i in range(8)]
    phone = make_lossless(tmp_path / "phone.mp4", frames, rotation=-90)
    upright = make_lossless(tmp_path / "upright.mp4", [np.ascontiguousarray(np.rot90(f, -1)) for f in frames])
    out = tmp_path / "out"
    assert run("encode", phone, "-o", out, *GRID, *RANDOM, capsys=capsys)[0] == 0
    assert "rotation" not in load_tokens(out / "phone.safetensors").made_with  # the default, as upstream reads
    code, stdout, _ = run("encode", phone, upright, "-o", out, *GRID, *RANDOM, "--rotation", "display", capsys=capsys)
    assert code == 0 and "encoded 2 file(s)" in stdout and "skipped 0" in stdout  # phone's file: made otherwise
    redone = [r for r in read_manifest(out / MANIFEST_NAME) if r.get("replaced")]
    assert [r["replaced"] for r in redone] == ["made another way (rotation stored, now display)"]
    turned, want = load_tokens(out / "phone.safetensors"), load_tokens(out / "upright.safetensors")
    assert turned.made_with["rotation"] == "display" and torch.equal(turned.indices, want.indices)
    code, stdout, _ = run("encode", phone, "-o", out, *GRID, *RANDOM, "--rotation", "display", capsys=capsys)
    assert code == 0 and "skipped 1 already complete" in stdout
    shown = list(source_chunks(turned))
    assert all(torch.equal(a, b) for a, b in zip(shown, source_chunks(want), strict=True))
    rows = {8: {"psnr": 20.0, "ssim": 0.5, "clips": 2}}  # eval --plot: a line per resolution, as frames were read
    assert list(_by_resolution({str(phone): rows, str(upright): rows}, "display")) == ["48x64"]
    assert list(_by_resolution({str(phone): rows, str(upright): rows})) == ["48x64", "64x48"]
    gone = tmp_path / "gone.mp4"  # scored, then removed before the plot: left out of it, not the end of the run
    capsys.readouterr()
    assert list(_by_resolution({str(gone): rows, str(upright): rows}, "display")) == ["48x64"]
    assert capsys.readouterr().err == (f"titok-fast: {gone}: left out of the plot: cannot be opened again to tell its "
                                       "resolution (No such file or directory)\n")  # fmt: skip
    code, _, stderr = run("encode", phone, "-o", tmp_path / "nvdec", *GRID, *RANDOM, "--rotation", "display",
                          "--decoder", "nvdec", capsys=capsys)  # fmt: skip
    assert code == 0 and NVDEC_MISSING in stderr  # no GPU here: the CPU decoder, turned all the same
    assert torch.equal(load_tokens(tmp_path / "nvdec" / "phone.safetensors").indices, want.indices)


def test_a_file_whose_read_hangs_fails_alone_after_the_stall_timeout(folder, tmp_path, capsys):
    hangs = make_hanging(tmp_path)
    try:  # (3 s: the thread started after the stall has as long for the next file, which it must open and decode)
        code, stdout, _ = run("encode", hangs, folder / "moving.mp4", "-o", tmp_path / "tok", *GRID, *RANDOM,
                              "--workers", "1", "--stall-timeout", "3", capsys=capsys)  # fmt: skip
        assert code == 1 and "encoded 1 file(s)" in stdout and "1 failed" in stdout
        assert f"FAILED {hangs}: no clip decoded for 3 s; given up" in stdout
        code, stdout, _ = run("eval", hangs, folder / "moving.mp4", "--tokens", "4", "--grid", "4x32x32", *RANDOM,
                              "--workers", "1", "--stall-timeout", "3", capsys=capsys)  # fmt: skip
        assert code == 1 and f"FAILED {hangs}: no clip decoded for 3 s; given up" in stdout
        assert stdout.splitlines()[1].split()[-1] == "2"  # moving.mp4's two clips scored
    finally:
        release_hanging(tmp_path)
    parse = build_parser().parse_args
    assert parse(["encode", "x.mp4", "-o", "o"]).stall_timeout == 300
    assert parse(["encode", "x.mp4", "-o", "o", "--stall-timeout", "0"]).stall_timeout is None  # never
    with pytest.raises(SystemExit):
        parse(["encode", "x.mp4", "-o", "o", "--stall-timeout", "-5"])
    assert "--stall-timeout: '-5' is not a number of seconds > 0, or 0 for never" in capsys.readouterr().err


def test_a_missing_file_in_a_list_fails_alone(folder, tmp_path, capsys):
    """A list of a large dataset may name a file deleted since: that file fails, named, the others are encoded."""
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'moving.mp4'}\ndeleted_since.mp4\n")
    code, stdout, _ = run("encode", listing, "-o", tmp_path / "tok", *GRID, *RANDOM, capsys=capsys)
    assert code == 1 and "encoded 1 file(s)" in stdout and "1 failed" in stdout
    assert f"FAILED {tmp_path / 'deleted_since.mp4'}: no such file" in stdout
    assert sorted(p.name for p in (tmp_path / "tok").glob("*.safetensors")) == ["moving.safetensors"]


def test_shards_split_the_inputs_without_overlap_into_the_token_files_of_one_run(folder, tmp_path, capsys):
    """Three runs with --shard K/3 into one output folder (as three GPUs would run them) write exactly the token
    files of one unsharded run, each input once, each shard's manifest its own; each run resumes its own shard."""
    whole, shards = tmp_path / "whole", tmp_path / "shards"
    options = [*GRID, "--tail", "pad", *RANDOM]
    code, _, _ = run("encode", folder, "-o", whole, *options, capsys=capsys)
    assert code == 1  # broken.mp4 alone fails
    taken, codes = [], []
    for k in range(3):
        code, stdout, err = run("encode", folder, "-o", shards, *options, "--shard", f"{k}/3", capsys=capsys)
        taken.append(int(re.search(r"titok-fast: shard \d/3: (\d+) of 5 inputs\n", err)[1]))
        assert f"encoded {taken[-1] - code} file(s)" in stdout  # the shard holding broken.mp4 exits 1
        codes.append(code)
    assert sum(taken) == 5 and sum(codes) == 1 and max(taken) < 5  # each input in one shard; they do split
    names = sorted(str(p.relative_to(whole)) for p in whole.rglob("*.safetensors"))
    assert sorted(str(p.relative_to(shards)) for p in shards.rglob("*.safetensors")) == names
    for name in names:
        a, b = load_tokens(whole / name), load_tokens(shards / name)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.token_counts, b.token_counts)
    assert sorted(p.name for p in shards.glob("manifest*")) == [f"manifest-{k}-of-3.jsonl" for k in range(3)]
    shard_sources = [[line["source"] for line in read_manifest(shards / f"manifest-{k}-of-3.jsonl")] for k in range(3)]
    assert [len(sources) for sources in shard_sources] == taken  # a line for each input of the shard
    whole_sources = sorted(line["source"] for line in read_manifest(whole / MANIFEST_NAME))
    assert sorted(sum(shard_sources, [])) == whole_sources
    k = taken.index(max(taken))
    code, stdout, _ = run("encode", folder, "-o", shards, *options, "--shard", f"{k}/3", capsys=capsys)
    assert "encoded 0 file(s)" in stdout and f"skipped {taken[k] - codes[k]} already complete" in stdout


def test_awkward_file_names_and_special_files_fail_alone_or_are_said(tmp_path, capsys):
    """A dataset of a million files has odd ones: each fails alone (or is passed over with a notice), never the
    whole run. Names of 218 bytes or more (whose temporary name would pass the 255-byte limit), a name whose token
    file name is too long, a list naming such a file, a newline in a name, a named pipe among the videos."""
    videos = tmp_path / "v"
    videos.mkdir()
    make_video(videos / "a.mp4", frames=8, height=32, width=32, fps=8)
    for name in ("L" * 240 + ".mp4", "T" * 251 + ".mp4"):
        (videos / name).write_bytes((videos / "a.mp4").read_bytes())
    (videos / "x\n  FAILED forged.mp4").write_bytes(b"not a video")  # its failure must not print a line of its own
    os.mkfifo(videos / "pipe.mp4")
    os.mkfifo(videos / "p\n  FAILED forged pipe.mp4")  # its notice must not print a line of its own either
    listing = tmp_path / "list.txt"
    listing.write_text(f"v/a.mp4\nv/{'Q' * 300}.mp4\n")
    out = tmp_path / "o"
    code, stdout, err = run("encode", videos, listing, "-o", out, *GRID, *RANDOM, capsys=capsys)
    assert code == 1 and f"{videos / 'pipe.mp4'}: not a regular file (a pipe or device); left out" in err
    assert "/p\\n  FAILED forged pipe.mp4: not a regular file" in err and "\n  FAILED" not in err
    assert "encoded 2 file(s)" in stdout and "3 failed" in stdout, stdout  # a and L...
    failed = [line for line in stdout.splitlines() if line.startswith("  FAILED")]
    assert len(failed) == 3 and sum("File name too long" in line for line in failed) == 2, failed
    assert any("/x\\n  FAILED forged.mp4: " in line for line in failed)  # the newline written as \n
    assert sorted(p.name[:3] for p in out.glob("*.safetensors")) == ["LLL", "a.s"]
    code, stdout, _ = run("encode", videos, "-o", out, *GRID, *RANDOM, capsys=capsys)  # resumed: all kept
    assert "skipped 2 already complete; 2 failed" in stdout


def test_a_manifest_that_is_a_pipe_is_refused_and_a_full_disk_stops_the_run(tmp_path, monkeypatch, capsys):
    import errno

    from titok_fast import pipeline

    videos = tmp_path / "v"
    videos.mkdir()
    for name in ("a", "b", "c"):
        make_video(videos / f"{name}.mp4", frames=8, height=32, width=32, fps=8)
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / MANIFEST_NAME)  # writes to it would block the run for ever
    code, _, err = run("encode", videos, "-o", tmp_path / "fifo", *GRID, *RANDOM, capsys=capsys)
    assert code == 2 and "manifest.jsonl: the manifest is not a regular file (a pipe or device)" in err, err
    (tmp_path / "linked").mkdir()
    (tmp_path / "elsewhere.txt").write_text("not the run's")
    (tmp_path / "linked" / MANIFEST_NAME).symlink_to(tmp_path / "elsewhere.txt")  # lines would be appended there
    code, _, err = run("encode", videos, "-o", tmp_path / "linked", *GRID, *RANDOM, capsys=capsys)
    assert code == 2 and "manifest.jsonl: the manifest is a link; move it away" in err, err
    assert (tmp_path / "elsewhere.txt").read_text() == "not the run's"
    (tmp_path / "folder" / MANIFEST_NAME).mkdir(parents=True)
    code, _, err = run("encode", videos, "-o", tmp_path / "folder", *GRID, *RANDOM, capsys=capsys)
    assert code == 2 and "manifest.jsonl: the manifest is a folder; move it away" in err and "Errno" not in err, err

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    def gone(look):  # the output's file system went away (an NFS mount): every look fails, and the run stops
        def failing(path, *args, **kwargs):
            if os.fspath(path).endswith("b.safetensors"):
                raise OSError(errno.EIO, "Input/output error")
            return look(path, *args, **kwargs)

        return failing

    with monkeypatch.context() as patched:
        patched.setattr(os, "stat", gone(os.stat))
        patched.setattr(os, "lstat", gone(os.lstat))
        code, _, err = run("encode", videos, "-o", tmp_path / "eio", *GRID, *RANDOM, capsys=capsys)
    assert code == 2 and "Input/output error" in err and not list((tmp_path / "eio").glob("*.safetensors")), err
    monkeypatch.setattr(pipeline, "save_tokens", full)  # every token file would fail: the run stops at the first
    code, _, err = run("encode", videos, "-o", tmp_path / "o", *GRID, *RANDOM, "--workers", "1", capsys=capsys)
    assert code == 2 and "a.safetensors (No space left on device): the run stops" in err, err
    rows = read_manifest(tmp_path / "o" / MANIFEST_NAME)
    assert [r["status"] for r in rows] == ["not-encoded"] * 3
    monkeypatch.undo()  # a run that stops says, before its error, what it did and where the rest is listed
    assert run("encode", videos / "a.mp4", "-o", tmp_path / "o", *GRID, *RANDOM, capsys=capsys)[0] == 0
    (tmp_path / "o" / "c.safetensors").write_bytes(b"a user's file")  # its input fails while the run plans
    monkeypatch.setattr(pipeline, "save_tokens", full)
    code, _, err = run("encode", videos, "-o", tmp_path / "o", *GRID, *RANDOM, "--workers", "1", capsys=capsys)
    assert code == 2 and err.endswith(
        f"titok-fast: the run stopped: 0 file(s) encoded, 1 failed, 1 not encoded (listed in "
        f"{tmp_path / 'o' / MANIFEST_NAME}) and 1 complete already; the same command goes on from there\n"
        f"titok-fast: error: cannot write {tmp_path / 'o' / 'b.safetensors'} (No space left on device): the run "
        "stops\n"), err  # fmt: skip


def test_decode_redoes_what_is_at_an_output_name_unless_it_is_a_written_file(folder, tmp_path, capsys):
    tokens = tmp_path / "t"
    assert run("encode", folder / "moving.mp4", "-o", tokens, *GRID, *RANDOM, capsys=capsys)[0] == 0
    out = tmp_path / "r"
    out.mkdir()
    (out / "moving.mp4").write_bytes(b"")  # an empty file (not one decode wrote: those are written whole)
    code, stdout, _ = run("decode", tokens, "-o", out, *RANDOM, capsys=capsys)
    assert code == 0 and "decoded 1 file(s)" in stdout and (out / "moving.mp4").stat().st_size > 0
    code, stdout, _ = run("decode", tokens, "-o", out, *RANDOM, capsys=capsys)
    assert code == 0 and "skipped 1 already complete" in stdout
