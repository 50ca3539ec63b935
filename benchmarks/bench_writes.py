"""Writing token files: how many per second ``encode`` can write into a folder, and how long its own thread is held.

A run writes each video's token file (atomically: a temporary file, synced, renamed, the folder synced) with its
manifest line as soon as the video's last clip is back. On a network file system that is many round trips and
a sync on the server per file; written on the run's thread it would leave the model waiting, so there the run
hands them to threads (``pipeline.Writes``). This writes ``--files`` token files of ``--chunks`` chunks of 256
tokens into ``--folder`` the way the run does, on the run's thread (``--threads 0``) or on threads, and prints
files per second and the run's thread's wall and CPU time per file (handing over, or writing), for the
``--config`` model's token files (default v1: what the run checks of the model it names is per parameter).

    python benchmarks/bench_writes.py --folder F --files 300 --threads 0
    python benchmarks/bench_writes.py --folder F --files 300              # as the run decides for F

``slow_fs.py`` makes a stand-in for a network file system to point ``--folder`` at.

``--run-work HELD,RELEASED`` stands in for the rest of the run's thread's work per file: HELD ms of Python (the
GIL held), then RELEASED ms with the GIL released (as in the device's calls and waits), before each file is handed
over; the run's thread's wall time per file then says how much writing adds to its pace (a writing thread needs the
GIL for its own Python, and takes it while the run's thread has let it go).

    python benchmarks/bench_writes.py --folder F --files 300 --threads 1 --run-work 4,4
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch

from titok_fast import pipeline
from titok_fast.loading import random_tokenizer
from titok_fast.manifest import Manifest
from titok_fast.pipeline import ClipSettings, Summary, Writes, made_with, write_token_file

try:  # what a token file says of the model, taken once a run; absent at commits before it (the model itself)
    from titok_fast.pipeline import ModelFacts
except ImportError:
    ModelFacts = None


def _python_for(seconds: float) -> None:
    """Hold the GIL for ``seconds``: Python work (a loop that never blocks)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def measure(folder: Path, files: int, chunks: int, threads: int, config: str = "v1",
            run_work: tuple[float, float] = (0.0, 0.0)) -> dict:  # fmt: skip
    model = random_tokenizer(config, seed=0)
    named = ModelFacts.of(model) if ModelFacts is not None else model
    settings = ClipSettings(grid=(20, 192, 192), tokens=256)
    made = made_with(model, "auto", settings)
    indices = [torch.randint(0, model.config.codebook_size, (256,), generator=torch.Generator().manual_seed(0))]
    folder.mkdir(parents=True, exist_ok=True)
    with Manifest(folder / "manifest.jsonl", Summary()) as manifest:

        def write(number: int) -> None:
            out, source = folder / f"{number:07d}.safetensors", folder / f"{number:07d}.mp4"
            error = write_token_file(named, settings, out, source, indices * chunks, [2.5 * c for c in range(chunks)],
                                     20, made)  # fmt: skip
            if error:
                raise SystemExit(error)
            manifest.done(source, out, chunks)

        writes, held = Writes(threads), 0.0
        start, cpu = time.perf_counter(), time.thread_time()
        for number in range(files):
            if run_work != (0.0, 0.0):  # (not counted as held: the run's own work)
                _python_for(run_work[0] / 1e3)
                time.sleep(run_work[1] / 1e3)
            handed = time.perf_counter()
            writes(functools.partial(write, number))
            held += time.perf_counter() - handed
        cpu = time.thread_time() - cpu
        writes.close()
        seconds = time.perf_counter() - start
    return {"folder": str(folder), "files": files, "chunks": chunks, "threads": threads, "config": config,
            "files_per_s": files / seconds, "held_ms_per_file": held / files * 1e3,
            "cpu_ms_per_file": cpu / files * 1e3, "run_work_ms": list(run_work),
            "run_ms_per_file": seconds / files * 1e3}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", required=True)
    p.add_argument("--files", type=int, default=300)
    p.add_argument("--chunks", type=int, default=3, help="chunks per token file (default 3: a 7.5 s video)")
    p.add_argument("--threads", type=int, help="0: write on the run's thread (default: as a run decides)")
    p.add_argument("--config", default="v1", help="the model preset whose token files are written (default v1)")
    p.add_argument("--run-work", default="0,0", metavar="HELD,RELEASED",
                   help="ms of the run's other work per file: the GIL held, then released (see above)")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    # as the run decides (at a commit before write_threads_for: the run's thread on a local disk)
    threads_for = getattr(pipeline, "write_threads_for", pipeline._threads_for)
    threads = threads_for(folder) if args.threads is None else args.threads
    held, released = (float(v) for v in args.run_work.split(","))
    row = measure(folder, args.files, args.chunks, threads, args.config, (held, released))
    print(
        f"{row['folder']}: {row['files']} {row['config']} token files of {row['chunks']} chunks, {row['threads']} "
        f"writing threads: {row['files_per_s']:.0f} files/s; the run's thread held {row['held_ms_per_file']:.2f} ms "
        f"per file, {row['cpu_ms_per_file']:.2f} CPU-ms"
        + (f"; with its other work ({args.run_work} ms), {row['run_ms_per_file']:.2f} ms per file" if held or released
           else "")
    )


if __name__ == "__main__":
    main()
