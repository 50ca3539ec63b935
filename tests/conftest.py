import os
import random

import numpy as np
import pytest
import torch

# Under pytest-xdist (the README runs the suite with -n 2), each worker process gets its share of the cores for
# torch's own threads: two workers each running a core's worth of threads on every core would spin against each
# other. Tests that set a thread count of their own still do.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


# The longest files first (by their serial time on 2 cores): with -n 2 --dist loadfile the workers take whole
# files in this order, so that no long file starts when the other worker is nearly done.
LONGEST_FIRST = ("test_distributed.py", "test_engine.py", "test_triton_backend.py", "test_video.py", "test_cli.py",
                 "test_hub.py", "test_mrope_attention.py", "test_fsq.py", "test_pipeline.py")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: each file's order is kept)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
