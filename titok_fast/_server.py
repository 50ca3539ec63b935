"""The preload of the server that decoding processes are forked from (:func:`titok_fast.video.start_process_server`).

It imports what the processes need (:mod:`titok_fast.video`: torch, PyAV, NumPy), and it cleans up after a run that
was killed (SIGKILL, the OOM killer): the server ends when its run does, and if the run left its multiprocessing
folder behind (where the server's socket is), the server removes it on its way out. Worker processes do the same
when they end (``video._exit_now``), but a run killed before its first worker started has none."""

from __future__ import annotations

import os

# the run: this server's parent, read before the imports below (torch: seconds, on a loaded machine), during which
# the run may be killed and this server adopted (by init, pid 1, usually)
RUN = os.getppid()

import atexit  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from titok_fast import video  # noqa: E402

# Set by the run for its process server alone (video._our_import_path), which puts back the variables the run
# changed to start it: the processes forked from the server, and theirs, have the run's. None elsewhere (imported by a
# test, or by a server started otherwise).
STARTED_BY_RUN = os.environ.pop(video.SERVER_ENVIRONMENT, None)
if STARTED_BY_RUN is not None:
    video.restore_environment(json.loads(STARTED_BY_RUN))

MULTIPROCESSING_PREFIX = "pymp-"  # multiprocessing's folders (util.get_temp_dir): no other folder is ever removed
# How long the server, at its exit, waits for its run to read as ended. The server ends when the run's end of its
# "alive" pipe closes, and the kernel closes a killed process's files a moment before the process reads as ended (a
# zombie): a server quick to look saw it still running, and left its folder. Nothing else ends the server while
# the run lives (its workers close their copies of the pipe), so the wait ends at once in practice.
RUN_END_SECONDS = 2.0


def listening_folder() -> str | None:
    """The folder of this process's listening Unix socket, if it has one (the server's own: the one through which
    its run asks for processes, in the run's multiprocessing folder). Linux only (/proc); elsewhere None."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in names:
        with contextlib.suppress(OSError, ValueError):
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(name))) as sock:
                if sock.family == socket.AF_UNIX and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    address = sock.getsockname()
                    if isinstance(address, str) and address:
                        return os.path.dirname(address)
    return None


def _remove_folder_of_killed_run(server: int, run: int, folder: str | None, wait: float = RUN_END_SECONDS) -> None:
    """At the server's exit: ``folder`` removed if the ``run`` has ended (or does within ``wait`` seconds), from the
    server itself only (its worker processes inherit this handler, and end with os._exit, but a handler must not
    count on that)."""
    if os.getpid() != server or folder is None or not os.path.basename(folder).startswith(MULTIPROCESSING_PREFIX):
        return
    if run == 1 or _ends(run, wait):  # (pid 1: the run had ended before it was read; a run that ended normally has
        # removed its folder already)
        shutil.rmtree(folder, ignore_errors=True)


def _ends(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` has ended, or does within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not video._ended(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def in_process_server() -> bool:
    """Whether this process is the process server of a run (:func:`titok_fast.video.start_process_server`), which
    is importing its preloads now."""
    return STARTED_BY_RUN is not None and "multiprocessing.forkserver" in sys.modules


if in_process_server():  # (imported elsewhere, by a test: nothing registered)
    atexit.register(_remove_folder_of_killed_run, os.getpid(), RUN, listening_folder())
