import os
import random

import numpy as np
import pytest
import torch

import videos

# Under pytest-xdist (the README runs the suite with -n 2), each worker process gets its share of the cores for
# torch's own threads: two workers each running a core's worth of threads on every core would spin against each
# other. Tests that set a thread count of their own still do. The processes a test starts (a command, a script)
# get the same share: with a core's worth each under the suite's load, a command's clip once took 25 times as long.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _SHARE = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_SHARE)
    os.environ["OMP_NUM_THREADS"] = str(_SHARE)


SCHEDULING = videos.scheduling()  # this process's, as it started


def _check_scheduling(when: str) -> None:
    if (now := videos.scheduling()) != SCHEDULING:
        os.sched_setscheduler(0, *SCHEDULING)
        pytest.fail(f"the test process was made real time ({now}) by the {when}: an encoder (SVT-AV1) run outside "
                    "tests/videos.py's scheduling_kept()")  # fmt: skip


@pytest.fixture(autouse=True)
def _not_real_time():
    """No test runs in a process its fixtures made real time, nor leaves it so (an encoder's doing: SVT-AV1 as root,
    tests/videos.py's scheduling_kept): a real-time test process and the processes it starts take the CPUs from
    everything else. The policy is put back, and the test fails saying so."""
    _check_scheduling("test's fixtures")
    yield
    _check_scheduling("test")


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
