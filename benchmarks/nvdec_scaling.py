"""What limits ``--decoder nvdec``: NVDEC's frames per second against decoding threads, and whether
PyNvVideoCodec's ``Decode`` holds Python's global lock (GIL) while the hardware works.

On the H200 (RESULTS.md, the targets run) NVDEC read 720p30 at 18 clips/s with 16 decoding threads, 1,350 frames
a second: slower than the CPU path beside it, although the host spent a third of the CPU time per clip. If
``Decode`` keeps the GIL while it waits for the hardware, the threads take turns and one session's speed is the
ceiling, whatever the number of threads or of NVDEC engines. This measures, on one source:

- ``gil``: whether a pure-Python loop on a second thread runs while the first is inside ``Decode`` (Python runs
  only with the GIL): if so, ``Decode`` lets the GIL go while it waits; if never, it holds it, and decoding
  threads take turns.
- ``raw xN``: N threads, each with a demuxer and decoder of its own over the file, frames decoded a second (the
  surfaces are not copied or converted). Each pass over the file makes a new decoder, as the run does per file.
- ``kept xN``: the same, but each thread keeps its first decoder for every later pass (a new demuxer each time):
  set beside ``raw``, what making a decoder per file costs, which decides whether files of a few seconds are
  worth a decoder kept from one file to the next. Each row says how many decoders it made.
- ``titok xN``: the same through the run's path, ``decoders.nvdec_frames`` and ``nv12_clip_rgb`` (a thread's
  decoder kept from one file to the next, as the run keeps it; a copy of each surface, and every frame converted
  to RGB as if every frame were sampled: 20 surfaces stacked and converted in one launch, as the reader converts
  a clip); ``titok-frames xN``: the kernel launched a frame at a time (the
  reader's way before it converted clips); ``titok-torch xN``: each frame converted by the kernel's PyTorch
  reference instead (some twenty kernels a frame, as before the kernel).
- ``threaded xN``: PyNvVideoCodec's ``ThreadedDecoder``, which demuxes and decodes on a thread of its own outside
  Python; N of them, each read on a Python thread.

    python benchmarks/nvdec_scaling.py --threads 1,2,4,8,16

``--fake hold`` / ``--fake release`` run it on a CPU against a stand-in for PyNvVideoCodec whose ``Decode`` takes
a millisecond holding the GIL, or sleeping without it (the ``gil`` and ``raw`` rows only): what the probe reports
in either case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import types
from pathlib import Path

FAKE_PACKETS = 200
FAKE_DECODE_SECONDS = 1e-3
MADE, MADE_LOCK = [0], threading.Lock()  # decoders made so far (a row reports its own count)
MADE_BY = ("raw", "kept", "titok", "titok-frames", "titok-torch")  # the paths whose decoders are counted


def _fake_module(hold: bool) -> types.ModuleType:
    """A stand-in for PyNvVideoCodec: FAKE_PACKETS packets a file, each decoded into one frame in
    FAKE_DECODE_SECONDS, spent holding the GIL (``hold``) or asleep without it."""

    turns = max(1, round(FAKE_DECODE_SECONDS / _seconds_per_sum_turn()))

    def decode(packet):
        if hold:
            sum(range(turns))  # one call in C: no switch to another thread until it returns
        else:
            time.sleep(FAKE_DECODE_SECONDS)
        return [packet]

    module = types.ModuleType("PyNvVideoCodec")
    module.CreateDemuxer = lambda filename: iter(range(FAKE_PACKETS))
    module.CreateDecoder = lambda **kwargs: types.SimpleNamespace(Decode=decode)
    return module


def _seconds_per_sum_turn() -> float:
    start = time.perf_counter()
    sum(range(1_000_000))
    return (time.perf_counter() - start) / 1_000_000


def _nvc(fake: str | None):
    if fake:
        return _fake_module(fake == "hold")
    import PyNvVideoCodec

    return PyNvVideoCodec


def session(nvc, path: str, decoder=None):
    """A demuxer over ``path`` and a decoder for its codec (``decoder``, or a new one), of the calling thread's
    own."""
    demuxer = nvc.CreateDemuxer(filename=path)
    if decoder is None:
        codec = demuxer.GetNvCodecId() if hasattr(demuxer, "GetNvCodecId") else 0
        decoder = nvc.CreateDecoder(gpuid=0, codec=codec, cudacontext=0, cudastream=0, usedevicememory=True)
    return demuxer, decoder


def raw_frames(nvc, path: str) -> int:
    """Every frame of ``path`` decoded by a demuxer and decoder of this thread's own; how many."""
    demuxer, decoder = session(nvc, path)
    return sum(len(decoder.Decode(packet)) for packet in demuxer)


_kept = threading.local()


def kept_frames(nvc, path: str) -> int:
    """:func:`raw_frames` with the decoder this thread made on its first call (each pass ends with the flush, so
    the next begins on an empty decoder)."""
    demuxer, _kept.decoder = session(nvc, path, getattr(_kept, "decoder", None))
    return sum(len(_kept.decoder.Decode(packet)) for packet in demuxer)


def titok_frames(path: str, kernel: bool = True, clip: int = 20) -> int:
    """Every frame of ``path`` through the run's NVDEC path: the surface copied, then (as if every frame were
    sampled) the surfaces of each ``clip`` frames stacked and converted to RGB in one launch of the kernel, as the
    reader does (``clip=1``: a launch a frame, as it did before), or each frame by its PyTorch reference."""
    import av
    import torch

    from titok_fast import decoders
    from titok_fast.kernels.nv12_rgb import nv12_rgb_ref

    count, held = 0, []
    with av.open(path) as container:
        for frame in decoders.nvdec_frames(path, container.streams.video[0]):
            if not kernel:
                nv12_rgb_ref(frame.nv12, frame.height, frame.matrix)
            elif clip == 1:
                decoders.nvdec_rgb(frame)
            else:
                held.append(frame.nv12)
                if len(held) == clip:
                    decoders.nv12_clip_rgb(torch.stack(held), frame.height, frame.matrix)
                    held = []
            count += 1
    if held:
        decoders.nv12_clip_rgb(torch.stack(held), frame.height, frame.matrix)
    torch.cuda.synchronize()
    return count


def threaded_frames(nvc, path: str, batch: int = 8) -> int:
    """Every frame of ``path`` from PyNvVideoCodec's ThreadedDecoder, ``batch`` at a time."""
    from PyNvVideoCodec.decoders.ThreadedDecoder import ThreadedDecoder

    decoder, count = ThreadedDecoder(path, buffer_size=2 * batch, use_device_memory=True), 0
    try:
        total = len(decoder)  # (not asked past the stream's frames: what an empty buffer does then is not said)
        while count < total and (frames := decoder.get_batch_frames(min(batch, total - count))):
            count += len(frames)
    finally:
        decoder.end()
    return count


def on_threads(read, threads: int, seconds: float) -> dict:
    """``read()`` (frames decoded) again and again on each of ``threads`` threads for about ``seconds``: frames a
    second in all."""
    counts, errors, start = [0] * threads, [], time.perf_counter()

    def work(k: int) -> None:
        try:
            while time.perf_counter() - start < seconds:
                counts[k] += read()
        except Exception as exc:  # (reported in the row: the next case still runs)
            errors.append(f"{type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    return {"frames": sum(counts), "seconds": elapsed, "frames_per_s": sum(counts) / elapsed,
            **({"error": errors[0]} if errors else {})}  # fmt: skip


def _stamp_turns(done: threading.Event, stamps: list[float]) -> None:
    """A pure-Python loop until ``done``, noting the time every 64 turns (when it ran), and then letting the GIL go
    for a moment (``sleep(0)``)."""
    turns = 0
    while not done.is_set():
        turns += 1
        if not turns % 64:
            stamps.append(time.perf_counter())
            time.sleep(0)


def gil_probe(nvc, path: str, seconds: float, margin: float = 2e-6) -> dict:
    """Whether ``Decode`` lets the GIL go: one thread decodes ``path`` for about ``seconds``, noting when each
    ``Decode`` call begins and ends, while a pure-Python loop on another notes when it runs. Python bytecode runs
    only with the GIL, and the interpreter's switch interval is made longer than the probe, so the GIL changes
    hands only where a thread lets it go: the loop between its notes, and ``Decode`` if it does. So if ``Decode``
    holds it, the loop never runs inside a call (bar ``margin`` at its ends); if it lets it go, the loop runs
    inside the calls. ``inside``: the loop's share of turns inside the calls, against ``busy``, the calls' share
    of the time. Timing only orders events: a machine slowed by other work gives the same verdict."""
    import numpy as np

    calls, stamps, done = [], [], threading.Event()
    loop = threading.Thread(target=_stamp_turns, args=(done, stamps))
    switching = sys.getswitchinterval()
    sys.setswitchinterval(max(100.0, 10 * seconds))
    loop.start()
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            demuxer, decoder = session(nvc, path)
            for packet in demuxer:
                began = time.perf_counter()
                decoder.Decode(packet)
                calls.append((began, time.perf_counter()))
    finally:
        done.set()
        loop.join()
        sys.setswitchinterval(switching)
    elapsed = time.perf_counter() - start
    begins, ends = (np.array([c[k] for c in calls]) for k in (0, 1))
    long = ends - begins > 2 * margin  # (a call too short to tell is left out)
    begins, ends = begins[long] + margin, ends[long] - margin
    at = np.array([t for t in stamps if start <= t])
    within = np.searchsorted(begins, at, side="right") - 1  # the last call begun before each turn
    inside = float(np.mean((within >= 0) & (at < ends[np.maximum(within, 0)]))) if len(at) and len(begins) else 0.0
    busy = float(np.sum(ends - begins) / elapsed)
    released = busy > 0 and inside > 0.3 * busy
    verdict = "released while decoding" if released else "held while decoding: decoding threads take turns"
    return {"inside": inside, "busy": busy, "calls": len(calls), "turns_noted": len(at), "gil": verdict}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="720p30", help="of bench_pipeline.py's sources (default 720p30)")
    p.add_argument("--seconds", type=float, default=10, help="the source's length (default 10)")
    p.add_argument("--videos", default="bench-videos", help="where the source is (made if missing)")
    p.add_argument("--threads", default="1,2,4,8,16", help="thread counts (default 1,2,4,8,16)")
    p.add_argument("--case-seconds", type=float, default=3.0, help="how long each case decodes (default 3)")
    p.add_argument("--paths", default="raw,kept,titok,titok-frames,threaded",
                   help="which of raw, kept, titok, titok-frames, titok-torch, threaded (default all but "
                        "titok-torch)")  # fmt: skip
    p.add_argument("--fake", choices=("hold", "release"), help="a CPU stand-in for PyNvVideoCodec (see above)")
    p.add_argument("--log", help="append each row here as JSON")
    args = p.parse_args(argv)
    nvc = _nvc(args.fake)
    create = nvc.CreateDecoder  # every path's decoders are made here (the run's, in decoders.nvdec_frames, too)

    def counted(**kwargs):
        with MADE_LOCK:
            MADE[0] += 1
        return create(**kwargs)

    nvc.CreateDecoder = counted
    if args.fake:
        path, paths = "fake.mp4", ["raw", "kept"]
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_pipeline
        import torch

        path = str(bench_pipeline.sources(Path(args.videos), [args.source], args.seconds)[args.source][0])
        paths = args.paths.split(",")
        if any(name.startswith("titok") for name in paths):  # the RGB kernel's compilation, at its first call,
            # outside the timed cases
            bench_pipeline.warm_up_yuv_kernels("cuda", 2, 2, torch.float32)
    readers = {"raw": lambda: raw_frames(nvc, path), "kept": lambda: kept_frames(nvc, path),
               "titok": lambda: titok_frames(path),
               "titok-frames": lambda: titok_frames(path, clip=1),
               "titok-torch": lambda: titok_frames(path, kernel=False),
               "threaded": lambda: threaded_frames(nvc, path)}  # fmt: skip
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.log:
            with open(args.log, "a") as log:
                log.write(json.dumps({**row, "source": args.source, "fake": args.fake}) + "\n")

    readers["raw"]()  # (the first session's start-up: the driver, the CUDA context)
    report({"case": "gil", **gil_probe(nvc, path, args.case_seconds)})
    for name in paths:
        for threads in (int(n) for n in args.threads.split(",")):
            made = MADE[0]
            row = on_threads(readers[name], threads, args.case_seconds)
            report({"case": f"{name} x{threads}", **row, **({"decoders": MADE[0] - made} if name in MADE_BY else {})})
    print("| case | frames/s | decoders made | note |\n|---|---|---|---|")
    for row in rows:
        rate = f"{row['frames_per_s']:.0f}" if "frames_per_s" in row else "-"
        note = row.get("error") or (
            f"Decode calls {row['busy']:.0%} of the time, a Python loop beside them ran {row['inside']:.0%} of its "
            f"turns inside them: the GIL is {row['gil']}" if row["case"] == "gil" else ""
        )
        print(f"| {row['case']} | {rate} | {row.get('decoders', '-')} | {note} |")
    return rows


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
