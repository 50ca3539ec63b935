"""Resuming a large job: the time ``encode`` spends before its first clip deciding which token files are done.

A resumed run reads every existing token file (``plan_outputs``: is it complete, from the same source, by the same
weights, made the same way?) before the decoders start, so for a dataset of a million videos that is nearly done
this check is what the user waits for. It parses them on one core; on a network file system threads read them
ahead. This writes ``--files`` token files of ``--chunks`` chunks of
``--tokens`` tokens each (a 30 s video at 8 fps in 20-frame chunks has 12; the defaults are a longer one), made by
the tiny config with random weights, then times, each ``--repeats`` times (median and spread printed):

- ``load_tokens`` alone, per file;
- ``plan_outputs`` over all of them, per file, every file complete (all skipped: the resumed run's case).

The files stay in ``--folder`` (made once, then reused) and are read from the page cache after the first pass: a
network file system adds its own latency per file on top of this. To measure that, put ``--folder`` on one, or on
``slow_fs.py``'s stand-in (a FUSE mount that adds a fixed delay to every request).
As a script it prints one line per measure (``python benchmarks/bench_resume.py --help``); ``titok-fast bench``
runs the small pytest case below. With TITOK_BENCH_LOG set, each line is also appended to that file as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from titok_fast.loading import random_tokenizer
from titok_fast.manifest import Manifest
from titok_fast.pipeline import ClipSettings, Summary, made_with, plan_outputs, write_token_file
from titok_fast.tokens import load_tokens

GRID = (20, 192, 192)


def make_files(folder: Path, files: int, chunks: int, tokens: int):
    """``files`` (source, name) inputs under ``folder/videos`` (empty placeholder files: only their paths are
    read) and a complete token file for each under ``folder/tokens``; the model and settings that made them."""
    model = random_tokenizer("tiny", seed=0)
    settings = ClipSettings(grid=GRID, tokens=tokens)
    made = made_with(model, "auto", settings)
    # a folder of token files for each kind (one run's are not another's: a run with other --chunks or --tokens
    # measured the files of the first, under its own numbers)
    videos, out = folder / "videos", folder / f"tokens-{chunks}-chunks-{tokens}-tokens"
    videos.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for i in range(files):
        source = videos / f"{i:07d}.mp4"
        source.touch()
        inputs.append((source, source.stem))
        path = out / f"{source.stem}.safetensors"
        if not path.exists():  # made once; the digest of seed 0's weights is the same on every run
            indices = [torch.randint(0, model.config.codebook_size, (tokens,), generator=generator)] * chunks
            error = write_token_file(model, settings, path, source, indices, [2.5 * c for c in range(chunks)], 20, made)
            if error:
                raise SystemExit(error)
    return model, settings, inputs, out


def measure(folder: Path, files: int, chunks: int, tokens: int, repeats: int) -> list[dict]:
    model, settings, inputs, out = make_files(folder, files, chunks, tokens)
    paths = [out / f"{name}.safetensors" for _, name in inputs]
    for path in paths:  # into the page cache, as after the first pass
        path.read_bytes()
    load, plan = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            load_tokens(path)
        load.append((time.perf_counter() - start) / files)
        start = time.perf_counter()
        with Manifest(None, Summary()) as manifest:
            todo = plan_outputs(model, "auto", inputs, out, settings, manifest)
        plan.append((time.perf_counter() - start) / files)
        if todo:
            raise RuntimeError(f"{len(todo)} of {files} complete token files were not recognised as done")
    size = paths[0].stat().st_size
    return [
        _row(what, seconds, files, chunks, tokens, size)
        for what, seconds in (("load_tokens", load), ("plan_outputs", plan))
    ]


def _row(what: str, seconds: list[float], files: int, chunks: int, tokens: int, size: int) -> dict:
    us = [s * 1e6 for s in seconds]
    return {
        "measure": what, "files": files, "chunks": chunks, "tokens": tokens, "file_bytes": size,
        "us_per_file": statistics.median(us), "min_us": min(us), "max_us": max(us),
        "minutes_per_million_files": statistics.median(seconds) * 1e6 / 60,
    }  # fmt: skip


def format_row(row: dict) -> str:
    return (
        f"{row['measure']:>12}: {row['us_per_file']:.0f} us/file (min {row['min_us']:.0f}, max {row['max_us']:.0f}; "
        f"{row['files']} files of {row['file_bytes']} bytes) = {row['minutes_per_million_files']:.1f} min per "
        "million files"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=5000)
    p.add_argument("--chunks", type=int, default=48, help="chunks per token file (default 48: a 2-minute video)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "titok-fast-bench-resume"))
    p.add_argument("--log", default=os.environ.get("TITOK_BENCH_LOG"), help="append each line here as JSON")
    args = p.parse_args(argv)
    for name in ("files", "chunks", "tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1; got {getattr(args, name)}")
    emit(measure(Path(args.folder), args.files, args.chunks, args.tokens, args.repeats), format_row, args.log)


def emit(rows: list[dict], format_row, log: str | None) -> None:
    """Print each row (as ``format_row`` writes it) and, where ``log`` names a file, append it there as JSON."""
    for row in rows:
        print(format_row(row))
        if log:
            with open(log, "a") as file:
                file.write(json.dumps(row) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------ pytest (titok-fast bench)
@pytest.mark.benchmark(group="resume: deciding which token files are done (tiny, cpu)")
def test_resume_check(benchmark, tmp_path):
    rows = benchmark.pedantic(measure, args=(tmp_path, 200, 48, 256, 3), rounds=1, iterations=1)
    benchmark.extra_info.update({"provider": "plan_outputs", "device": "cpu", "torch": torch.__version__, **rows[1]})


if __name__ == "__main__":
    main()
