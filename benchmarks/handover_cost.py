"""What a worker process spends to hand a source-size clip over through shared memory, against stacking it alone.

A decoding process stacks a clip's frames ([T, h, w, 3] uint8) and sends it; torch moves the clip into a new
shared-memory segment as it is sent. This times, on one thread, per clip: stacking alone; stacking and then
moving the result into shared memory (what is done now); stacking straight into a new shared segment (one copy
fewer). Whatever is left between the last two and the first is the cost of a new segment each clip (its pages
are allocated and zeroed), which reusing segments would save.

    python benchmarks/handover_cost.py --size 456x256 --frames 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="456x256", help="WIDTHxHEIGHT of the frames (default 456x256)")
    p.add_argument("--frames", type=int, default=20, help="frames per clip (default 20)")
    p.add_argument("--rounds", type=int, default=50, help="clips timed per way (default 50)")
    args = p.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    torch.set_num_threads(1)
    frames = [np.random.randint(0, 255, (height, width, 3), dtype=np.uint8) for _ in range(args.frames)]
    shape = (args.frames, height, width, 3)

    def alone() -> None:
        np.stack(frames)

    def moved() -> None:
        torch.from_numpy(np.stack(frames)).share_memory_()

    def into_shared() -> None:
        np.stack(frames, out=torch.empty(shape, dtype=torch.uint8).share_memory_().numpy())

    print(f"{args.size}, {args.frames} frames ({np.prod(shape) / 2**20:.1f} MiB a clip), CPU ms per clip:")
    for name, way in (("stack alone", alone), ("stack, then into shared memory", moved),
                      ("stack into new shared memory", into_shared)):  # fmt: skip
        way()
        cpu = time.process_time()
        for _ in range(args.rounds):
            way()
        print(f"  {name}: {1e3 * (time.process_time() - cpu) / args.rounds:.2f}")


if __name__ == "__main__":
    main()
