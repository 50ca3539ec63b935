"""How much of a decoding worker's CPU time holds Python's global lock (GIL): what limits decoding threads.

A decoding thread runs FFmpeg's decoder and swscale with the GIL released, and Python, PyAV's and torch's glue
with it held. If it holds the GIL for a share ``f`` of its CPU time, threads in one process together give at most
about ``1 / f`` cores' worth of decoding, however many the machine has. This reads one source as a worker does
for placement "device" (the GPU path: frames decoded, converted to RGB, or with ``--upload i420`` copied as their
YUV planes, and stacked at source size; nothing resized), on one thread, under ``perf record`` with call stacks,
and sorts the samples:

- released: in libavcodec or libswscale (called by PyAV inside ``nogil`` blocks), or NumPy's array copy
  (``raw_array_assign_array``, which releases it for plain data);
- kernel: the kernel's own (page faults of fresh buffers, reads), either way;
- held: everything else (the interpreter, PyAV's and torch's Python glue, allocation).

    python benchmarks/gil_share.py --sources 256p8,720p30

Needs Linux ``perf`` (``perf_event_paranoid`` <= 2 for one's own processes). Sources are made as
``bench_pipeline.py`` makes them, in ``--videos``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLES_PER_SECOND = 1000
RELEASED = ("avcodec_send_packet", "avcodec_receive_frame", "sws_scale", "ff_sws_", "sws_frame")
SAMPLE_LINE = re.compile(r"\s+\w+\s+(\S+)\s+\((\S+)\)")


def read(path: str, seconds: float, upload: str) -> None:
    """The worker's part for ``path``, read again until ``seconds`` of CPU time are spent, on this thread; prints
    its CPU time per clip."""
    import torch

    from titok_fast.video import ClipReader

    torch.set_num_threads(1)
    control = os.environ.get("GIL_SHARE_PERF_CONTROL")  # perf's control fifo: sampling starts after the imports
    if control:
        with open(control, "w") as fifo:
            fifo.write("enable\n")
    clips, cpu = 0, time.process_time()
    while not clips or time.process_time() - cpu < seconds:
        for _clip in ClipReader(path, frames=20, height=192, width=192, fps=8, preprocess="device", upload=upload):
            clips += 1
    print(f"{1e3 * (time.process_time() - cpu) / clips:.1f} {clips}", flush=True)
    os._exit(0)  # (the interpreter's final collection would be sampled too)


def kind(stack: list[tuple[str, str]]) -> str:
    """'released', 'kernel' or 'held' for one sample's stack (innermost first): (symbol, object file)."""
    symbols = " ".join(symbol for symbol, _ in stack)
    top_symbol, top_object = stack[0] if stack else ("", "")
    if any(name in symbols for name in RELEASED) or top_object.startswith(("libavcodec", "libswscale")):
        return "released"
    if ("memcpy" in top_symbol or "memmove" in top_symbol) and "raw_array_assign_array" in symbols:
        return "released"
    return "kernel" if top_object.startswith("[kernel") else "held"


def shares(script: str) -> collections.Counter:
    """Samples by :func:`kind` in ``perf script`` output."""
    counts: collections.Counter = collections.Counter()
    for sample in script.split("\n\n"):
        lines = sample.strip().split("\n")
        if len(lines) < 2:
            continue
        stack = []
        for line in lines[1:]:
            if match := SAMPLE_LINE.search(line):
                stack.append((match.group(1).split("+")[0], match.group(2).split("/")[-1]))
        counts[kind(stack)] += 1
    return counts


def measure(path: Path, seconds: float, upload: str) -> dict:
    """One source's shares: its reading under ``perf record``, sampled once the reader has imported what it needs."""
    with tempfile.TemporaryDirectory() as scratch:
        data, control = os.path.join(scratch, "perf.data"), os.path.join(scratch, "control")
        os.mkfifo(control)
        reader = [sys.executable, __file__, "--read", str(path), "--read-seconds", str(seconds), "--upload", upload]
        record = ["perf", "record", "--call-graph", "dwarf,16384", "-F", str(SAMPLES_PER_SECOND), "-D", "-1",
                  "--control", f"fifo:{control}", "-o", data]  # fmt: skip
        env = {**os.environ, "GIL_SHARE_PERF_CONTROL": control}
        out = subprocess.run(record + ["--"] + reader, capture_output=True, text=True, check=True, env=env).stdout
        script = subprocess.run(["perf", "script", "-i", data], capture_output=True, text=True).stdout
    counts = shares(script)
    total = sum(counts.values())
    return {"samples": total, **{k: counts[k] / total for k in ("released", "kernel", "held")},
            "cpu_ms_per_clip": float(out.split()[0]), "clips": int(out.split()[1])}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", default="256p8,720p30", help="of bench_pipeline.py's (default 256p8,720p30)")
    p.add_argument("--seconds", type=float, default=20, help="each source's length (default 20)")
    p.add_argument("--videos", default="bench-videos", help="where the sources are (made if missing)")
    p.add_argument(
        "--read-seconds",
        type=float,
        default=4.0,
        help="CPU seconds of reading sampled per source, whole reads of the file (default 4)",
    )
    p.add_argument("--upload", default="rgb", choices=("rgb", "i420"), help="how frames are handed over (default rgb)")
    p.add_argument("--read", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.read:
        return read(args.read, args.read_seconds, args.upload)
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_pipeline

    made = bench_pipeline.sources(Path(args.videos), args.sources.split(","), args.seconds)
    print("| source | clips read | CPU ms/clip | GIL released | kernel | GIL held | samples |")
    print("|---|---|---|---|---|---|---|")
    for name, (path, _) in made.items():
        row = measure(path, args.read_seconds, args.upload)
        print(f"| {name} | {row['clips']} | {row['cpu_ms_per_clip']:.1f} | {row['released']:.1%} | "
              f"{row['kernel']:.1%} | {row['held']:.1%} | {row['samples']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
