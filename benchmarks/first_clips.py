"""The first K clips of a long video (``--clips-per-video K``): read through the file's packet index (pruned
decoding: the index reads every packet of the file) or decoded from the file's start without it, and which of
the two the rule in ``ClipReader`` (video.LIMITED_SHARE) takes.

For each K: CPU seconds (this process, all threads) and bytes read (``rchar`` of /proc/self/io: what the process
asked the kernel for, cached or not) to read K clips each way, best of ``--rounds``.

    python benchmarks/first_clips.py SOURCE.mp4 --clips 1,4,16,48 --grid 20x192x192 --fps 8
"""

from __future__ import annotations

import argparse
import math
import time

from titok_fast import video


def _read_bytes() -> int:
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))


def measure(path: str, clips: int, way: str, grid: tuple[int, int, int], fps: float, rounds: int) -> tuple[float, int]:
    """(CPU seconds, bytes read) of reading ``clips`` clips of ``path`` the ``way`` asked ("index": pruned, through
    the packet index; "start": from the start, unpruned; "rule": as the reader decides), best of ``rounds``."""
    t, h, w = grid
    best = (float("inf"), 0)
    for _ in range(rounds):
        share = video.LIMITED_SHARE
        video.LIMITED_SHARE = math.inf if way == "index" else share  # (no limit is then short: the index)
        try:
            reader = video.ClipReader(path, frames=t, height=h, width=w, fps=fps, clips_per_video=clips,
                                      prune=way != "start")  # fmt: skip
            cpu, read = time.process_time(), _read_bytes()
            got = sum(1 for _ in reader)
            cpu, read = time.process_time() - cpu, _read_bytes() - read
        finally:
            video.LIMITED_SHARE = share
        assert got == clips, (got, clips)
        best = min(best, (cpu, read))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a long video file")
    p.add_argument("--clips", default="1,4,16,48", help="values of K, comma-separated (default 1,4,16,48)")
    p.add_argument("--grid", default="20x192x192", help="TxHxW (default 20x192x192)")
    p.add_argument("--fps", type=float, default=8.0, help="sampling fps (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per case, best taken (default 3)")
    args = p.parse_args()
    grid = tuple(int(v) for v in args.grid.split("x"))
    print("| K | through the index: CPU s | MB read | from the start: CPU s | MB read | the rule takes |")
    print("|---|---|---|---|---|---|")
    for clips in (int(v) for v in args.clips.split(",")):
        index = measure(args.source, clips, "index", grid, args.fps, args.rounds)
        start = measure(args.source, clips, "start", grid, args.fps, args.rounds)
        reader = video.ClipReader(args.source, frames=grid[0], height=grid[1], width=grid[2], fps=args.fps,
                                  clips_per_video=clips)  # fmt: skip
        list(reader)
        taken = "the index" if reader.pruned else "the start"
        print(f"| {clips} | {index[0]:.2f} | {index[1] / 1e6:.1f} | {start[0]:.2f} | {start[1] / 1e6:.1f} | {taken} |")


if __name__ == "__main__":
    main()
