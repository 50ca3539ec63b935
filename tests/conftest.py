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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
