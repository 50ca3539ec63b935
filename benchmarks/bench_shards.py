"""Reading a tokenized dataset for training: token files one by one, or the same files packed into tar shards.

A training job reads every token file of its dataset each epoch. This writes ``--files`` token files of
``--chunks`` chunks of ``--tokens`` tokens (the tiny config's random weights; ``bench_resume.make_files``) in
``--folder``, packs them into shards of ``--per-shard`` (``titok_fast.shards.pack_tokens``, timed once), then
times, each ``--repeats`` times (median and spread per token file printed) (``--no-read-ahead``: pack reads one
token file at a time even on a network file system, to compare):

- ``files``: ``load_tokens`` of each token file, as a loader over the folder reads them;
- ``shards``: ``read_shard`` of each shard, front to back (WebDataset's access pattern);
- ``members``: ``load_tokens`` of each token file by its path through its shard, in a shuffled order (random
  access into the shards).

Every file is read once before the timing, so a local folder is read from the page cache: the numbers are the
CPU's cost per file. On a network file system every open, stat and read is a round trip to the server on top of
it; to measure that, put ``--folder`` on one, or on ``slow_fs.py``'s stand-in (a FUSE mount that adds a fixed
delay to every request), where the kernel keeps no page cache between opens.
As a script it prints one line per measure (``python benchmarks/bench_shards.py --help``); ``titok-fast bench``
runs the small pytest case below. With TITOK_BENCH_LOG set, each line is also appended to that file as JSON.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import unittest.mock
from pathlib import Path

import pytest
import torch
from bench_resume import emit, make_files

from titok_fast import shards
from titok_fast.shards import pack_tokens, plan_shards, read_shard
from titok_fast.tokens import load_tokens


def measure(folder: Path, files: int, chunks: int, tokens: int, per_shard: int, repeats: int,
            read_ahead: bool = True) -> list[dict]:  # fmt: skip
    _, _, inputs, out = make_files(folder, files, chunks, tokens)
    pairs = [(out / f"{name}.safetensors", name) for _, name in inputs]
    paths = [path for path, _ in pairs]
    shards_dir = folder / f"shards-{out.name}-{files}-files-{per_shard}"
    start = time.perf_counter()
    with unittest.mock.patch.object(shards, "_threads_for", shards._threads_for if read_ahead else lambda *_: 0):
        packed = pack_tokens(pairs, shards_dir, per_shard=per_shard, overwrite=True)
    pack_seconds = time.perf_counter() - start
    if packed.failed or len(packed.done) != files:
        raise RuntimeError(f"packing failed: {packed.failed[:3]}")
    written = [Path(s) for s in packed.written]
    members = [f"{shards_dir}/{shard.name}.tar/{member}" for shard in plan_shards(pairs, per_shard)
               for _, member in shard.files]  # fmt: skip
    random.Random(0).shuffle(members)
    for path in [*paths, *written]:  # into the page cache, as after a first epoch
        Path(path).read_bytes()
    timed: dict[str, list[float]] = {"files": [], "shards": [], "members": []}
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            load_tokens(path)
        timed["files"].append((time.perf_counter() - start) / files)
        start = time.perf_counter()
        read = sum(1 for shard in written for _ in read_shard(shard))
        timed["shards"].append((time.perf_counter() - start) / files)
        start = time.perf_counter()
        for member in members:
            load_tokens(member)
        timed["members"].append((time.perf_counter() - start) / files)
        if read != files:
            raise RuntimeError(f"read {read} token files from the shards, where {files} were packed")
    size = paths[0].stat().st_size
    rows = [_row("pack" if read_ahead else "pack (no read-ahead)", [pack_seconds / files], files, chunks, tokens,
                 size, per_shard)]  # fmt: skip
    return rows + [_row(what, seconds, files, chunks, tokens, size, per_shard) for what, seconds in timed.items()]


def _row(what: str, seconds: list[float], files: int, chunks: int, tokens: int, size: int, per_shard: int) -> dict:
    us = [s * 1e6 for s in seconds]
    return {
        "measure": what, "files": files, "chunks": chunks, "tokens": tokens, "file_bytes": size,
        "per_shard": per_shard, "us_per_file": statistics.median(us), "min_us": min(us), "max_us": max(us),
        "files_per_s": 1 / statistics.median(seconds),
    }  # fmt: skip


def format_row(row: dict) -> str:
    return (
        f"{row['measure']:>8}: {row['us_per_file']:.0f} us/file (min {row['min_us']:.0f}, max {row['max_us']:.0f}) "
        f"= {row['files_per_s']:,.0f} files/s ({row['files']} files of {row['file_bytes']} bytes, shards of "
        f"{row['per_shard']})"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=5000)
    p.add_argument("--chunks", type=int, default=8, help="chunks per token file (default 8: a 20 s video)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-read-ahead", action="store_true", help="pack reading one token file at a time, also where "
                   "the folder is on a network file system (where pack reads 16 at a time)")  # fmt: skip
    p.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "titok-fast-bench-shards"))
    p.add_argument("--log", default=os.environ.get("TITOK_BENCH_LOG"), help="append each line here as JSON")
    args = p.parse_args(argv)
    for name in ("files", "chunks", "tokens", "per_shard", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    rows = measure(Path(args.folder), args.files, args.chunks, args.tokens, args.per_shard, args.repeats,
                   read_ahead=not args.no_read_ahead)  # fmt: skip
    emit(rows, format_row, args.log)


# ------------------------------------------------------------------------------ pytest (titok-fast bench)
@pytest.mark.benchmark(group="reading token files: one by one, or from tar shards (tiny, cpu)")
def test_reading_shards(benchmark, tmp_path):
    rows = benchmark.pedantic(measure, args=(tmp_path, 200, 8, 256, 50, 3), rounds=1, iterations=1)
    benchmark.extra_info.update({"provider": "read_shard", "device": "cpu", "torch": torch.__version__, **rows[2]})


if __name__ == "__main__":
    main()
