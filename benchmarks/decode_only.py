"""Decode one source as the encoder's reader does, pruned or not, and nothing else (no RGB conversion, no
resize): the decoding cost alone, for counting instructions with callgrind, which repeat where CPU seconds do
not (RESULTS.md, "decoding only the frames that are used"):

    valgrind --tool=callgrind python benchmarks/decode_only.py SOURCE            # pruned
    valgrind --tool=callgrind python benchmarks/decode_only.py SOURCE --no-prune  # every frame
    valgrind --tool=callgrind python benchmarks/decode_only.py SOURCE --imports-only  # the constant to subtract
"""

from __future__ import annotations

import argparse

from titok_fast import decoders
from titok_fast.video import ClipReader, _open, chunk_length


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("--frames", type=int, default=20, help="frames per clip (default 20)")
    p.add_argument("--fps", type=float, default=8.0, help="sampling rate (default 8)")
    p.add_argument("--no-prune", action="store_true", help="decode every frame")
    p.add_argument("--imports-only", action="store_true", help="stop after the imports and arguments")
    args = p.parse_args()
    if args.imports_only:
        return
    reader = ClipReader(args.source, frames=args.frames, height=1, width=1, fps=args.fps)
    with _open(args.source) as container:
        rate = float(container.streams.video[0].average_rate or 0)
        reader._chunk_length = chunk_length(args.frames, rate, args.fps)  # as the reader sets it
        needs = None if args.no_prune else reader._needs
        with decoders.open_frames(args.source, container, "cpu", needs=needs) as source:
            count = sum(1 for _ in source.frames)
    print(f"{args.source}: {count} frames came out, pruned: {source.pruned}")


if __name__ == "__main__":
    main()
