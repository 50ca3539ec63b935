"""The RGB conversion's cost with swscale's own slice threads (PyAV's default: one per core) against one thread,
while WORKERS decoding workers (Python threads) each convert frames of their own, as the pipeline's workers do:

    python benchmarks/rgb_threads.py SOURCE WORKERS

Prints the process's CPU time and the wall time per converted frame, median and range of 5 alternating rounds
(each round: every worker converts the source's first 40 frames 3 times to rgb24).
"""

from __future__ import annotations

import argparse
import itertools
import resource
import statistics
import threading
import time

import av
from av.video.reformatter import VideoReformatter


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_round(frames: list, workers: int, threads: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per converted frame, ``workers`` threads converting with ``threads`` swscale threads."""

    def work() -> None:
        reformatter = VideoReformatter()
        for _ in range(3):
            for frame in frames:
                reformatter.reformat(frame, format="rgb24", threads=threads).to_ndarray()

    pool = [threading.Thread(target=work) for _ in range(workers)]
    wall, cpu = time.perf_counter(), cpu_seconds()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    count = 3 * len(frames) * workers
    return (cpu_seconds() - cpu) / count * 1e3, (time.perf_counter() - wall) / count * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("workers", type=int)
    args = p.parse_args()
    with av.open(args.source) as container:
        frames = list(itertools.islice(container.decode(video=0), 40))
    rounds: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    for _ in range(5):
        for threads in rounds:
            rounds[threads].append(one_round(frames, args.workers, threads))
    for threads, times in rounds.items():
        cpu, wall = ([t[k] for t in times] for k in (0, 1))
        print(
            f"{args.source}: {args.workers} workers, swscale threads {threads or 'auto'}: "
            f"CPU {statistics.median(cpu):.3f} ({min(cpu):.3f}-{max(cpu):.3f}) ms/frame, "
            f"wall {statistics.median(wall):.3f} ({min(wall):.3f}-{max(wall):.3f}) ms/frame"
        )


if __name__ == "__main__":
    main()
