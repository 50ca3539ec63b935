"""Encoding on Ray Data (titok_fast.distributed) on a local cluster of 2 CPUs: the same token files and manifest as
the single-machine command, failures as rows, bounded restarts and retries, resumable; the encode actor's body
without Ray (and on a GPU where there is one)."""

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import types
import warnings
from pathlib import Path

import pytest
import torch

from titok_fast import distributed, video
from titok_fast.cli import main
from titok_fast.distributed import (
    ClipEncoder,
    DeviceFault,
    FaultLedger,
    _Assembly,
    _collect,
    _parts_per_file,
    clip_bytes,
    decode_rows,
    encode_dataset,
    model_loader,
    part_rows,
    plan_segments,
    settings_on_ray,
)
from titok_fast.engine import Engine
from titok_fast.loading import random_tokenizer
from titok_fast.manifest import MANIFEST_NAME, Manifest, read_manifest
from titok_fast.pipeline import ClipSettings, InputError, Summary, _progress, collect_inputs, encode_files, made_with
from titok_fast.tokens import load_tokens
from titok_fast.video import normalize_pixels
from titok_fast.writing import write_video

from videos import make_empty, make_hanging, make_scrambled, make_video, release_hanging

SETTINGS = ClipSettings(grid=(4, 32, 32), tokens=8, fps=8.0)
GRID = ["--grid", "4x32x32", "--tokens", "8", "--fps", "8"]
RANDOM = ["--random-weights", "0", "--config", "tiny", "--device", "cpu"]
LOAD = functools.partial(random_tokenizer, "tiny", seed=0)
GOOD = ["long", "odd", "short", "one", "two"]
BAD = {"corrupt": "decoding failed", "empty": "file is empty", "tooshort": "shorter than one chunk"}
WORKERS = ("decoded_by", "encoded_by")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local cluster for the module: 2 CPUs, no dashboard, no usage stats, a 100 MB object store whose
    spilling goes to a folder of its own (the tests check that it stays empty). Without Ray installed the tests
    that need a cluster skip; the encode actor's body runs without it."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is already initialized in this process")
    root = tmp_path_factory.mktemp("ray")
    spill = root / "spill"
    # Ray's sockets live in its temporary folder, and a socket's path may not pass 107 bytes: under pytest's own
    # (a long user name, pytest-xdist's popen-gwN) it did; so a short folder of its own, removed after
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    saved = {name: os.environ.get(name) for name in ("RAY_USAGE_STATS_ENABLED", CLUSTER_MARK)}
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ[CLUSTER_MARK] = temp  # inherited by every process of this cluster (and by the drivers tests start)
    spilling = {"type": "filesystem", "params": {"directory_path": str(spill)}}
    ray.init(
        num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, _temp_dir=temp,
        log_to_driver=False, _system_config={"object_spilling_config": json.dumps(spilling)},
    )  # fmt: skip
    yield {"address": ray.get_runtime_context().gcs_address, "spill": spill}
    ray.shutdown()
    stop_what_is_left(temp)
    shutil.rmtree(temp, ignore_errors=True)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name)
        else:
            os.environ[name] = value


CLUSTER_MARK = "TITOK_FAST_TEST_CLUSTER"  # its temporary folder, in the environment of the cluster's processes


def marked_processes(temp: str) -> dict[int, str]:
    """The processes other than this one whose environment marks them as the test cluster's of ``temp``, with the
    start of their command line."""
    mark, found = f"{CLUSTER_MARK}={temp}".encode(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as env, open(f"/proc/{entry}/cmdline", "rb") as cmd:
                if mark in env.read().split(b"\0"):
                    found[int(entry)] = cmd.read().replace(b"\0", b" ").decode(errors="replace")[:80]
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def stop_what_is_left(temp: str, grace: float = 10.0) -> None:
    """After ray.shutdown: wait ``grace`` seconds for this cluster's processes to end, then kill those left (a
    worker once outlived its cluster, its parent gone), with a warning naming them; no other process is touched."""
    deadline = time.monotonic() + grace
    while (left := marked_processes(temp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if left:
        warnings.warn(f"killed {len(left)} process(es) of the test cluster left after ray.shutdown: {left}",
                      stacklevel=1)  # fmt: skip


@contextlib.contextmanager
def failing_after(seconds: int, what: str):
    """A TimeoutError(what) in this (the main) thread if the block runs past ``seconds``: a test of something that
    could wait for ever fails instead of hanging the suite."""

    def expired(*_):
        raise TimeoutError(what)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_nothing_spilled(cluster):
    assert not cluster["spill"].exists() or not any(cluster["spill"].rglob("*")), "objects were spilled"


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    good, bad = root / "good", root / "all"
    good.mkdir()
    make_video(good / "long.mp4", frames=72, height=40, width=48, fps=24)  # 24 frames at 8 fps: 6 clips
    make_video(good / "odd.mkv", frames=30, height=37, width=53, fps=12)  # 20 frames: 5 clips
    for name in ("short", "one", "two"):
        make_video(good / f"{name}.mp4", frames=12, height=32, width=32, fps=24)  # 1 clip
    shutil.copytree(good, bad)
    size = (good / "long.mp4").stat().st_size
    make_scrambled(bad / "corrupt.mp4", good / "long.mp4", start=size * 3 // 10)  # fails after its first clip
    make_empty(bad / "empty.mp4")
    make_video(bad / "tooshort.mp4", frames=6, height=32, width=32, fps=24)  # 2 frames: less than a clip
    return {"good": good, "all": bad}


@pytest.fixture(scope="module")
def runs(cluster, videos, tmp_path_factory):
    """The same folder (good and bad files) through the single-machine command and the Ray command; and the good
    files alone on one machine, the reference of the other tests."""
    out = tmp_path_factory.mktemp("runs")
    model = LOAD()
    encode_files(model, Engine(model), collect_inputs([videos["good"]]), out / "good", SETTINGS)
    single = main(["encode", str(videos["all"]), "-o", str(out / "single"), *GRID, *RANDOM])
    ray_code = main(["encode", str(videos["all"]), "-o", str(out / "ray"), *GRID, *RANDOM, "--batch-size", "3",
                     "--ray", cluster["address"]])  # fmt: skip
    return {"single": out / "single", "ray": out / "ray", "good": out / "good", "codes": (single, ray_code)}


def token_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def manifest(folder, drop=(*WORKERS, "time")) -> dict[str, dict]:
    rows = read_manifest(folder / MANIFEST_NAME)
    rows = [{**r, "tokens": os.path.basename(r["tokens"])} for r in rows]  # the output folders differ
    by_source = {os.path.basename(r["source"]): {k: v for k, v in r.items() if k not in drop} for r in rows}
    assert len(by_source) == len(rows), "an input has more than one manifest line"
    return by_source


def test_one_identical_token_file_per_input_and_a_complete_manifest(runs, cluster):
    ray_files, single_files = token_bytes(runs["ray"]), token_bytes(runs["single"])
    assert sorted(ray_files) == [f"{n}.safetensors" for n in sorted(GOOD)]
    assert ray_files == single_files  # byte for byte, fp32 on the CPU
    assert not [p for p in runs["ray"].iterdir() if p.name.startswith(".")]  # no temporary files left
    rows = manifest(runs["ray"])
    assert rows == manifest(runs["single"])  # the same manifest, worker names aside
    assert sorted(rows) == sorted([*(f"{n}.mp4" for n in GOOD if n != "odd"), "odd.mkv", *(f"{b}.mp4" for b in BAD)])
    assert {r["status"] for n, r in rows.items() if n.split(".")[0] in GOOD} == {"done"}
    assert rows["long.mp4"]["clips"] == 6 and rows["odd.mkv"]["clips"] == 5
    assert_nothing_spilled(cluster)


def test_unreadable_files_are_reported_as_on_one_machine_and_exit_1(runs):
    assert runs["codes"] == (1, 1)
    rows, single = manifest(runs["ray"]), manifest(runs["single"])
    for name, message in BAD.items():
        row = rows[f"{name}.mp4"]
        assert row["status"] == "failed" and message in row["reason"] and "\n" not in row["reason"]
        assert row["reason"] == single[f"{name}.mp4"]["reason"]
        assert not (runs["ray"] / f"{name}.safetensors").exists()


def test_decode_and_encode_ran_in_different_processes(runs):
    rows = manifest(runs["ray"], drop=())
    me = f":{os.getpid()}"
    for name in ("long.mp4", "odd.mkv", "short.mp4"):
        decoder, encoders = rows[name]["decoded_by"], rows[name]["encoded_by"]
        assert decoder and encoders and decoder not in encoders
        assert not decoder.endswith(me) and not any(e.endswith(me) for e in encoders)


def cpus_free_again(ray, seconds: float = 30) -> float:
    """The test cluster's free CPUs, once both are free (what an earlier job held, as its actors end) or after
    ``seconds``."""
    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    return ray.available_resources().get("CPU", 0)


@pytest.fixture(scope="module")
def faulty_run(runs, videos, tmp_path_factory):
    """The good files through a job whose encode actor exits once (a test hook, on its second batch) and whose
    decode worker dies every time it is given odd.mkv (tried twice); its output folder taken for one on a network
    file system, where the driver writes token files on threads (the threads that wrote them are recorded)."""
    from titok_fast import distributed, pipeline

    out = tmp_path_factory.mktemp("faulty")
    hooks = {"actor_exit_once": str(out / "died"), "decode_exit_on": "odd.mkv", "decode_exit_log": str(out)}
    files = collect_inputs([videos["good"]])
    writers, write = [], distributed.write_token_file
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "network_file_system", lambda path: "nfs4" if "tokens" in str(path) else None)
        patch.setattr(distributed, "write_token_file",
                      lambda *args: writers.append(threading.current_thread().name) or write(*args))  # fmt: skip
        summary = encode_dataset(
            LOAD(), files, out / "tokens", SETTINGS, device="cpu", batch_size=2, decode_retries=1, _test_hooks=hooks
        )
    return {"out": out, "summary": summary, "files": files, "writers": writers}


def test_an_actor_that_dies_once_is_restarted_and_nothing_is_duplicated(faulty_run, runs, cluster):
    out, summary = faulty_run["out"], faulty_run["summary"]
    others = sorted(str(p) for p, _ in faulty_run["files"] if p.name != "odd.mkv")
    assert sorted(summary.done) == others
    good = token_bytes(runs["good"])
    assert token_bytes(out / "tokens") == {k: v for k, v in good.items() if k != "odd.safetensors"}
    rows = manifest(out / "tokens", drop=())
    assert len(rows) == len(GOOD)  # one line per input: none settled twice
    died = (out / "died").read_text()  # the actor that exited
    encoders = {e for row in rows.values() for e in row.get("encoded_by", [])}
    # its restart did work (the dead one's first batch too, where that batch's block was handed on before it died)
    assert died.rsplit(":", 1)[1].isdigit() and encoders - {died}
    assert len(faulty_run["writers"]) == len(GOOD) - 1
    assert all(name.startswith("titok-fast-write") for name in faulty_run["writers"]), faulty_run["writers"]
    assert_nothing_spilled(cluster)


def test_a_decode_worker_that_keeps_dying_is_retried_then_reported(faulty_run):
    out, summary = faulty_run["out"], faulty_run["summary"]
    assert len(list(out.glob("decode-exit-*"))) == 2  # tried once and retried once, then given up
    assert [os.path.basename(p) for p, _ in summary.failed] == ["odd.mkv"]
    reason = summary.failed[0][1]
    assert "decoding did not finish: its decode task failed for good (tried 2 times)" in reason and "\n" not in reason
    assert manifest(out / "tokens")["odd.mkv"] == {
        "source": str(faulty_run["files"][1][0]), "tokens": "odd.safetensors", "clips": 0, "status": "failed",
        "reason": reason,
    }  # fmt: skip


def test_past_max_decode_tasks_a_crashing_file_fails_alone(runs, videos, cluster, tmp_path, monkeypatch):
    """With more files than MAX_DECODE_TASKS a decode task holds several; one whose worker keeps dying on one file
    failed for good with all of them. Its files are then tried again one per task: only that file fails. The job
    leaves Ray Data's settings (global to the process) as it found them."""
    import ray.data

    from titok_fast import distributed

    monkeypatch.setattr(distributed, "MAX_DECODE_TASKS", 2)  # 3 files in 2 tasks: odd.mkv shares one
    context = ray.data.DataContext.get_current()
    before = (context.max_errored_blocks, context.target_max_block_size, context.enable_progress_bars)
    data_log = logging.getLogger("ray.data")
    monkeypatch.setattr(data_log, "level", logging.INFO)  # (the caller's: the job quiets it while it runs)
    hooks = {"decode_exit_on": "odd.mkv", "decode_exit_log": str(tmp_path)}
    files = [(p, n) for p, n in collect_inputs([videos["good"]]) if n in ("odd", "one", "two")]
    summary = encode_dataset(
        LOAD(), files, tmp_path / "tokens", SETTINGS, device="cpu", batch_size=2, decode_retries=0, _test_hooks=hooks
    )
    assert sorted(summary.done) == sorted(str(p) for p, _ in files if p.name != "odd.mkv")
    assert [os.path.basename(p) for p, _ in summary.failed] == ["odd.mkv"]
    assert "its decode task failed for good" in summary.failed[0][1]
    good = token_bytes(runs["good"])
    assert token_bytes(tmp_path / "tokens") == {k: good[k] for k in ("one.safetensors", "two.safetensors")}
    assert len(read_manifest(tmp_path / "tokens" / MANIFEST_NAME)) == 3  # one line per input
    assert len(list(tmp_path.glob("decode-exit-*"))) == 2  # its shared task, then its own
    assert (context.max_errored_blocks, context.target_max_block_size, context.enable_progress_bars) == before
    assert data_log.level == logging.INFO


def test_a_job_whose_encode_actors_all_died_for_good_stops_instead_of_waiting(videos, cluster, tmp_path, monkeypatch):
    """Once every actor of Ray Data's fixed-size pool has died for good with blocks still queued (10 files here),
    Ray Data waits for ever. The driver, given no row for WATCH_SECONDS and finding every encode actor dead at two
    checks in a row, stops the job: a one-line error, every input "not encoded" in the manifest, no thread left
    in Ray Data, and the actor's CPU free again (the ledger that held its handle is gone)."""
    import ray

    from titok_fast import distributed

    monkeypatch.setattr(distributed, "WATCH_SECONDS", 1.0)
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(10):
        shutil.copy(videos["good"] / "one.mp4", folder / f"v{i}.mp4")

    with failing_after(240, "the job did not stop"):
        with pytest.raises(RuntimeError, match=r"^the Ray job stopped: .*every encode actor died for good \(1, each"):
            encode_dataset(
                LOAD(), collect_inputs([folder]), tmp_path / "tokens", SETTINGS, device="cpu", batch_size=2,
                actor_restarts=0, _test_hooks={"actor_exit_always": "yes"},
            )  # fmt: skip
    rows = read_manifest(tmp_path / "tokens" / MANIFEST_NAME)
    assert len(rows) == 10 and {r["status"] for r in rows} == {"not-encoded"}
    assert all("every encode actor died for good" in r["reason"] and "\n" not in r["reason"] for r in rows)
    assert not list((tmp_path / "tokens").glob("*.safetensors"))
    assert "titok-fast-results" not in [t.name for t in threading.enumerate()]
    assert cpus_free_again(ray) == 2


def test_the_ledger_knows_which_files_decode_tasks_ran_to_their_end_however_many_parts():
    """Whole files a byte each; a file split into parts (any number: ``encode_dataset(parts=...)`` takes more than
    the default's 16) once every part has."""
    ledger = FaultLedger()
    ledger.decoded(5, 0, 1)
    for part in range(40):
        if part != 3:
            ledger.decoded(2, part, 40)
    assert ledger.decoded_of([0, 2, 5, 9, 10**6]) == [5]
    ledger.decoded(2, 3, 40)
    ledger.decoded(2, 3, 40)  # (a task run again)
    assert ledger.decoded_of([0, 2, 5, 9]) == [2, 5]


def join_executors(seconds: float = 30) -> list[str]:
    """Wait (``seconds`` in all at most) for Ray Data's executor threads left running: a stopped pass's executor
    ends in the background, not under ray.shutdown, and may meanwhile ask Ray to start again (its automatic init).
    The names of those still running."""
    deadline = time.monotonic() + seconds
    for thread in threading.enumerate():
        if thread.name.startswith("StreamingExecutor-"):
            thread.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in threading.enumerate() if t.name.startswith("StreamingExecutor-") and t.is_alive()]


def test_a_job_whose_ledger_is_started_again_ends_with_every_input_accounted_for(videos, cluster, tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    """The ledger's process dies once the only encode actor has enlisted, and is started again with an empty list;
    the actor then dies for good on its second batch. Each actor enlists again at each batch and the driver keeps
    those it was told of, so the job does not wait for ever: it ends, every input done (read again in a pass of its
    own) or listed as not encoded with the reason, and Ray Data's execution of the pass it left ends too."""
    import ray

    monkeypatch.setattr(distributed, "WATCH_SECONDS", 1.0)
    monkeypatch.setattr(distributed, "PING_SECONDS", 2.0)
    real, killers = distributed._ledger, []

    def killed_once_enlisted(ray_module):  # (the first pass's ledger; a second pass's lives)
        ledger = real(ray_module)

        def kill():
            with contextlib.suppress(Exception):
                while not ray.get(ledger.encoders.remote()):
                    time.sleep(0.05)
                ray.kill(ledger, no_restart=False)  # as its process dying would

        if not killers:
            killers.append(threading.Thread(target=kill, daemon=True))
            killers[0].start()
        return ledger

    monkeypatch.setattr(distributed, "_ledger", killed_once_enlisted)
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(4):
        shutil.copy(videos["good"] / "one.mp4", folder / f"v{i}.mp4")
    with failing_after(180, "the job did not end"):
        with contextlib.suppress(RuntimeError):  # ("every encode actor died for good": stopped, not waiting)
            encode_dataset(
                LOAD(), collect_inputs([folder]), tmp_path / "tokens", SETTINGS, device="cpu", batch_size=2,
                actors=1, actor_restarts=0, _test_hooks={"actor_exit_once": str(tmp_path / "died")},
            )  # fmt: skip
    killers[0].join(30)
    # the pass left while its reader waited in Ray Data for a row no actor would make: its execution is ended
    # (it went on, holding its actors, until the process ended)
    assert join_executors(15) == []
    assert not killers[0].is_alive() and (tmp_path / "died").exists()
    rows = read_manifest(tmp_path / "tokens" / MANIFEST_NAME)
    assert sorted(Path(r["source"]).name for r in rows) == [f"v{i}.mp4" for i in range(4)]
    assert all(r["status"] == "done" or "every encode actor died for good" in r["reason"] for r in rows), rows


def test_the_driver_keeps_the_encode_actors_a_ledger_started_again_forgot():
    """An actor enlists again when it asks the ledger for faults; one dead for good never asks again, so the
    driver's census still counts the actors the ledger named before it was started again (with an empty list)."""
    from ray.exceptions import ActorDiedError

    ledger = FaultLedger()
    assert ledger.faults([(0, 0)], ("a1", "handle")) == {} and ledger.encoders() == {"a1": "handle"}

    class Dead:  # the handle of an actor dead for good
        __ray_ready__ = types.SimpleNamespace(remote=lambda: "ping")

    class Ray:  # the ray module, as a census asks it
        def __init__(self, named):
            self.named = iter(named)

        def get(self, ref, timeout=None):
            if ref == "ping":
                raise ActorDiedError()
            return next(self.named)  # (the ledger's list)

        def wait(self, refs, num_returns, timeout):
            return refs, []

    remote = types.SimpleNamespace(encoders=types.SimpleNamespace(remote=lambda: "list"))
    run = distributed._Run(Ray([{"a1": Dead()}, {}, {}]), iter(()), remote, actors=1, actor_restarts=0)
    assert run.census() == {"alive": 0, "busy": 0, "dead": 1, "away": 0}
    assert run.census() == {"alive": 0, "busy": 0, "dead": 1, "away": 0}  # the ledger, started again, names none
    assert run.encoders_lost().startswith("every encode actor died for good (1, each restarted up to 0 times)")


def test_an_encode_actor_busy_on_a_long_batch_is_counted_busy_not_away(cluster):
    """An actor on a batch does not answer a ping (its calls run one at a time): a census took it for one
    restarting or lost, and a healthy job said "restarting or not answering (Ray may be waiting for room...)" at
    every batch over a minute (V1 on CPU actors, a first batch that compiles). Ray's own records say it is alive:
    it is counted busy; killed for good, dead."""
    import ray

    @ray.remote(max_restarts=0)
    class Encoder:
        def work(self, seconds):
            time.sleep(seconds)

    actor = Encoder.remote()
    ray.get(actor.__ray_ready__.remote())
    actor.work.remote(30)
    remote = types.SimpleNamespace(encoders=types.SimpleNamespace(remote=lambda: ray.put({"a1": actor})))
    run = distributed._Run(ray, iter(()), remote, actors=1, actor_restarts=0)
    try:
        assert run.census() == {"alive": 0, "busy": 1, "dead": 0, "away": 0}
    finally:
        ray.kill(actor)
    deadline = time.monotonic() + 30
    while distributed._recorded_state(actor) != "DEAD":
        assert time.monotonic() < deadline, "the killed actor is not recorded dead"
        time.sleep(0.1)
    assert run.census() == {"alive": 0, "busy": 0, "dead": 1, "away": 0}


def test_files_whose_rows_an_encode_actor_took_with_it_are_read_again(videos, cluster, tmp_path):
    """Two encode actors without restarts; one dies for good on its second batch, the other lives on. The rows it
    held are lost with it (a file's end row among them): those files' decode tasks ran to their end (the ledger
    says so), so they are read again, alone, and every file gets its token file; before, they failed as if their
    decoding had."""
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(6):
        shutil.copy(videos["good"] / "one.mp4", folder / f"v{i}.mp4")
    with failing_after(240, "the job did not end"):
        summary = encode_dataset(
            LOAD(), collect_inputs([folder]), tmp_path / "tokens", SETTINGS, device="cpu", batch_size=2, actors=2,
            cpus_per_actor=0.5, actor_restarts=0, _test_hooks={"actor_exit_once": str(tmp_path / "died")},
        )  # fmt: skip
    assert (tmp_path / "died").exists()  # (an actor died)
    assert not summary.failed and len(summary.done) == 6, summary.failed
    rows = read_manifest(tmp_path / "tokens" / MANIFEST_NAME)
    assert {r["status"] for r in rows} == {"done"} and len(rows) == 6
    one = load_tokens(next((tmp_path / "tokens").glob("v0.safetensors"))).all_indices()
    for i in range(1, 6):
        again = load_tokens(tmp_path / "tokens" / f"v{i}.safetensors").all_indices()
        assert len(again) == len(one) and all(torch.equal(a, b) for a, b in zip(again, one, strict=True))


@pytest.mark.parametrize("state", ["away", "busy"])
def test_a_pass_whose_encode_actors_stay_away_says_so_once_and_waits(monkeypatch, capsys, state):
    """An encode actor restarting for long, or not answering (Ray waits for room to start it again, as after its
    node was lost): no result comes, and the job said nothing. At two checks in a row that find one away, it says
    so in one line, once, and goes on waiting; the rows that come after are taken as ever. One alive and busy (a
    long batch) is said as such, not as one that may be lost."""
    monkeypatch.setattr(distributed, "WATCH_SECONDS", 0.05)

    def late_rows():
        time.sleep(0.6)  # (12 checks' worth)
        yield {"file": 0}

    class Stub:  # the ray module, as far as a pass's end asks it
        def kill(self, actor):
            pass

    run = distributed._Run(Stub(), late_rows(), ledger=None, actors=2, actor_restarts=8)
    census = {"alive": 1, "busy": 0, "dead": 0, "away": 0, state: 1}
    monkeypatch.setattr(run, "census", lambda: census)
    with run:
        assert list(run.rows()) == [{"file": 0}]
    err = capsys.readouterr().err
    said = {"away": "1 of 2 encode actor(s) restarting or not answering",
            "busy": "1 of 2 encode actor(s) alive and busy on a batch all that time"}[state]  # fmt: skip
    assert err.count(said) == 1, err
    assert err.count("\n") == 1 and "the job waits for them" in err
    assert state == "away" or "restarting" not in err


def test_the_fault_ledger_lives_on_the_drivers_node_and_outlives_a_crash(cluster):
    """Every encode actor asks the ledger at each batch: one gone for good failed every batch after it. It is
    started again when its process dies, and answers."""
    import ray

    ledger = distributed._ledger(ray)
    try:
        ray.get(ledger.add.remote([(0, 1)], "boom"))
        node = ray.get(ledger.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
        assert node == ray.get_runtime_context().get_node_id()
        pid = ray.get(ledger.__ray_call__.remote(lambda self: os.getpid()))
        ray.kill(ledger, no_restart=False)  # as its process dying would
        deadline = time.monotonic() + 60
        while ray.get(ledger.__ray_call__.remote(lambda self: os.getpid()), timeout=60) == pid:  # (the kill lands)
            assert time.monotonic() < deadline, "the ledger was not started again"
            time.sleep(0.1)
        assert ray.get(ledger.faults.remote([(0, 1)]), timeout=60) == {}  # (its records start again)
    finally:
        ray.kill(ledger)


@pytest.mark.parametrize("fault", ["every-clip", "unloadable", "other-kind"])
def test_a_job_whose_encode_worker_cannot_encode_stops_as_one_machine_does(videos, cluster, tmp_path, fault):
    """An encode actor on which every clip fails alone (kernels it cannot build, say) reaches GIVE_UP_AFTER files
    in a row across its batches of 4: the job stops with that error in one line, as a run on one machine does,
    instead of failing every file (Ray Data would only drop a batch that raised: a job tolerates failed blocks).
    One that cannot load the model (a checkpoint its node cannot read) stops the job at its first batch, where Ray
    would restart it over and over (each time with a traceback). So does an error of a kind no clip is retried
    for (Triton's OutOfResources, an Exception only): it was dropped with its block, and every file failed as if
    an actor had died for good."""
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(40):  # files of 1 clip (a file's failures count once)
        shutil.copy(videos["good"] / "one.mp4", folder / f"v{i:02d}.mp4")

    def broken(device="cpu"):  # (local functions: Ray's pickling carries them by value to the actor)
        model = LOAD(device=device)

        def no_compiler(module, args):
            raise RuntimeError("Failed to find C compiler")

        model.encoder.proj_in.register_forward_pre_hook(no_compiler)
        return model

    def unloadable(device="cpu"):
        raise FileNotFoundError(2, "No such file or directory", "/driver-only/v1.safetensors")

    def out_of_resources(device="cpu"):
        model = LOAD(device=device)

        class OutOfResources(Exception):  # as Triton's (an Exception, not a RuntimeError; local: carried by value)
            pass

        def no_room(module, args):
            raise OutOfResources("out of resource: shared memory, Required: 232448, Hardware limit: 232448")

        model.encoder.proj_in.register_forward_pre_hook(no_room)
        return model

    said = {
        "every-clip": r"RuntimeError: giving up after 32 clip\(s\) in a row failed alone: Failed to find C compiler",
        "unloadable": r"FileNotFoundError: \[Errno 2\] No such file or directory: '/driver-only/v1.safetensors' "
                      r"\(the encode worker \S+ could not load the model\)",
        "other-kind": r"OutOfResources: out of resource: shared memory, Required: 232448, Hardware limit: 232448",
    }[fault]  # fmt: skip
    load = {"every-clip": broken, "unloadable": unloadable, "other-kind": out_of_resources}[fault]
    stopped = pytest.raises(RuntimeError, match=f"^the Ray job stopped: {said}$")
    with failing_after(240, "the job did not stop"), stopped:
        encode_dataset(LOAD(), collect_inputs([folder]), tmp_path / "tokens", SETTINGS, device="cpu", batch_size=4,
                       load_model=load)  # fmt: skip
    rows = read_manifest(tmp_path / "tokens" / MANIFEST_NAME)
    assert len(rows) == 40 and not list((tmp_path / "tokens").glob("*.safet*"))
    statuses = {r["status"] for r in rows}
    assert statuses == ({"failed", "not-encoded"} if fault == "every-clip" else {"not-encoded"})


@pytest.mark.parametrize("interrupted", [False, True], ids=["error", "ctrl-c"])
def test_leaving_a_pass_stops_a_reader_stuck_in_ray_data(interrupted, monkeypatch):
    """Ray Data's iterator can wait for ever (it polls). Leaving a pass stops the reader inside it, so that Ray
    Data shuts down (here: the iterator's cleanup runs) before Ray does, and kills the pass's ledger; on Ctrl-C
    at once, without the grace a reader between rows gets (set here to longer than the test may take)."""
    from titok_fast import distributed

    cleaned, killed = [], []

    def stuck():
        try:
            yield {"file": 0}
            while True:
                time.sleep(0.01)
        finally:
            cleaned.append(True)

    class Ray:
        def kill(self, actor):
            killed.append(actor)

    monkeypatch.setattr(distributed, "STOP_GRACE_SECONDS", 600.0 if interrupted else 0.5)

    run = distributed._Run(Ray(), stuck(), "ledger", actors=1, actor_restarts=0)
    raised = KeyboardInterrupt if interrupted else RuntimeError
    with failing_after(60, "leaving the pass waited"), pytest.raises(raised):
        with run:
            assert next(run.rows()) == {"file": 0}
            raise KeyboardInterrupt if interrupted else RuntimeError("the driver failed")
    assert cleaned == [True] and killed == ["ledger"]
    assert not run.reading and not run.reader.is_alive()


def test_leaving_a_pass_ends_ray_datas_execution_where_its_reader_waits_without_a_timeout(monkeypatch):
    """Ray Data's reader can wait on a queue with no timeout (its prefetch thread's), where an exception raised in
    the thread does not land: only the end of the execution wakes it. Leaving a pass stuck so ends the execution,
    and the reader with it."""
    from titok_fast import distributed

    woken = threading.Event()

    class Execution:  # Ray Data's executor
        def shutdown(self, force):
            woken.set()

    def waiting():
        yield {"file": 0}
        woken.wait()  # (no timeout)
        yield {"file": 1}

    class Ray:
        def kill(self, actor):
            pass

    monkeypatch.setattr(distributed, "STOP_GRACE_SECONDS", 0.5)
    monkeypatch.setattr(distributed, "STOP_SECONDS", 5.0)
    run = distributed._Run(Ray(), waiting(), "ledger", actors=1, actor_restarts=0, executors=[Execution()])
    try:
        with failing_after(60, "leaving the pass waited"), pytest.raises(RuntimeError):
            with run:
                assert next(run.rows()) == {"file": 0}
                raise RuntimeError("every encode actor died for good")
        assert woken.is_set() and not run.reader.is_alive() and not run.reading
    finally:
        woken.set()  # (a reader left waiting, on a failure)


def test_settings_no_task_could_use_are_refused_before_the_job(videos, tmp_path):
    files = collect_inputs([videos["good"]])
    bad = ClipSettings(grid=(4, 32, 32), tokens=8, fps=0.0)
    with pytest.raises(ValueError, match=r"fps must be a number in \(0, 1000\]; got 0.0"):
        encode_dataset(LOAD(), files, tmp_path, bad, ray_address="no-cluster-is-started", device="cpu")
    with pytest.raises(ValueError, match="mode 'cudagraph' needs CUDA devices; the encode actors run on cpu"):
        encode_dataset(LOAD(), files, tmp_path, SETTINGS, ray_address="local", device="cpu", mode="cudagraph")
    with pytest.raises(ValueError, match=r"^cpus_per_decode must be a number >= 0.0001, not infinite; got 1e-05$"):
        encode_dataset(LOAD(), files, tmp_path, SETTINGS, ray_address="local", device="cpu", cpus_per_decode=1e-5)
    with pytest.raises(ValueError, match=r"^decode_retries must be at most 1000; got 100000000000000000000$"):
        encode_dataset(LOAD(), files, tmp_path, SETTINGS, ray_address="local", device="cpu", decode_retries=10**20)
    off_patch = ClipSettings(grid=(4, 32, 36), tokens=8)  # (every clip would fail alone, in its actor)
    with pytest.raises(ValueError, match=r"^grid of the clip settings is \[4, 32, 36\]; W must be a positive mult"):
        encode_dataset(LOAD(), files, tmp_path, off_patch, ray_address="no-cluster-is-started", device="cpu")
    with pytest.raises(InputError, match=r"its output name '\.\./out\.safetensors' leads out of the output folder"):
        encode_dataset(LOAD(), [(files[0][0], "../out")], tmp_path, SETTINGS, ray_address="local", device="cpu")
    assert not (tmp_path / MANIFEST_NAME).exists()  # nothing was started


def test_a_job_a_started_cluster_has_no_room_for_is_refused_with_its_inputs_listed(videos, cluster, tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    """Ray would wait for ever for CPUs that a cluster the job started (``--ray local``) never gets: refused in one
    line, each input listed as not encoded. (The module's cluster was started by the test, so the job is told it
    started it.)"""
    from titok_fast import distributed

    check = distributed._check_resources
    monkeypatch.setattr(distributed, "_check_resources", lambda nodes, started, *args: check(nodes, True, *args))
    files = collect_inputs([videos["good"]])
    cases = {
        "actors": (dict(actors=2), "2 encode actors of 1 CPUs leave no room for a decode task of 1 on the cluster's "
                                   "2 CPUs"),
        "decode": (dict(cpus_per_decode=100), "a decode task asks for 100 CPUs (--ray-cpus-per-decode); no node has "
                                              "more than 2"),
        "actor": (dict(cpus_per_actor=3), "an encode actor asks for 3 CPUs and 0 GPUs"),
    }  # fmt: skip
    for name, (kwargs, message) in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            encode_dataset(LOAD(), files, tmp_path / name, SETTINGS, device="cpu", **kwargs)
        rows = read_manifest(tmp_path / name / MANIFEST_NAME)
        assert len(rows) == len(GOOD) and {r["status"] for r in rows} == {"not-encoded"}
        assert rows[0]["reason"].startswith(f"not encoded: the run stopped (ValueError: {message}")


def test_room_on_a_cluster_is_counted_as_ray_counts_it(capsys):
    """A cluster the job joined may grow (an autoscaler adds nodes): it is told, not refused. Resources count in
    units of 1e-4 (no float rounding refuses a job that fits), a fraction of a GPU shares one GPU, and an actor's
    CPUs and GPUs come from one node."""
    from titok_fast import distributed

    two_cpus = [{"CPU": 2.0}]
    distributed._check_resources(two_cpus, False, 2, 1.0, 0.0, 1.0)
    assert capsys.readouterr().err == (
        "titok-fast: 2 encode actors of 1 CPUs leave no room for a decode task of 1 on the cluster's 2 CPUs "
        "(--ray-actors, --ray-cpus-per-actor, --ray-cpus-per-decode); the job waits until the cluster has room\n"
    )
    with pytest.raises(ValueError, match="leave no room for a decode task of 1 on the cluster's 2 CPUs .*: the job "
                                         "could never run$"):  # fmt: skip
        distributed._check_resources(two_cpus, True, 2, 1.0, 0.0, 1.0)
    distributed._check_resources([{"CPU": 3.0}], True, 14, 0.2, 0.0, 0.2)  # 3.0000000000000004 in floats: fits
    gpus = [{"CPU": 8.0, "GPU": 3.0}]
    assert distributed._gpu_slots(gpus, 0.6) == 3 and distributed._gpu_slots(gpus, 0.5) == 6
    assert distributed._gpu_slots(gpus + [{"CPU": 4.0, "GPU": 2.0}], 2) == 2
    with pytest.raises(ValueError, match=r"4 encode actors of 0.6 GPUs do not fit the cluster's GPUs \(room for 3;"):
        distributed._check_resources(gpus, True, 4, 1.0, 0.6, 1.0)
    with pytest.raises(ValueError, match="an encode actor asks for 1 CPUs and 1 GPUs .*no node has both"):
        distributed._check_resources([{"CPU": 0.0, "GPU": 1.0}, {"CPU": 8.0}], True, 1, 1.0, 1.0, 1.0)
    distributed._check_resources(gpus, True, 3, 1.0, 0.6, 1.0)  # room: nothing said
    assert capsys.readouterr().err == ""


def test_a_ray_job_that_stops_says_what_it_did_before_its_error(videos, tmp_path, monkeypatch, capsys):
    """As on one machine: a job stopped by an error (here before any file ended) says first how many files it
    encoded, failed and left not encoded, and where those are listed."""

    def stopped(ray_address, load_model, model, settings, todo, manifest, *args, **kwargs):
        manifest.list_not_encoded(todo[:1], "not encoded: the job stopped (x)")  # (as a pass that stops does)
        raise OSError("cannot write x.safetensors (No space left on device): the run stops")

    monkeypatch.setattr(distributed, "_run_job", stopped)
    files = collect_inputs([videos["good"]])
    with pytest.raises(OSError, match="the run stops$"):
        encode_dataset(LOAD(), files, tmp_path / "out", SETTINGS, device="cpu")
    assert capsys.readouterr().err.endswith(
        f"titok-fast: the run stopped: 0 file(s) encoded, 0 failed, {len(files)} not encoded (listed in "
        f"{tmp_path / 'out' / MANIFEST_NAME}) and 0 complete already; the same command goes on from there\n")
    assert {row["status"] for row in read_manifest(tmp_path / "out" / MANIFEST_NAME)} == {"not-encoded"}


def test_an_object_store_small_for_the_batches_is_said_before_the_job(capsys):
    """Batches of 8 clips of 3.7 MB for one actor on an 80 MB object store ran 5x slower than on 100 MB, and the
    job's summary blamed the decode CPUs: an object store holding fewer than STORE_BATCHES batches per actor (the
    live nodes' together) is said in one line before the job, which runs."""
    from titok_fast import distributed

    clip = clip_bytes(ClipSettings(grid=(12, 160, 160), tokens=128), torch.float32)
    assert clip == 3_686_400
    distributed._check_object_store([{"object_store_memory": 80e6}], 1, 8, clip)
    assert capsys.readouterr().err == (
        "titok-fast: the cluster's object store (76 MiB) holds fewer than 3 batches per encode actor (1 taking "
        "batches of 8 clips, 28.1 MiB): clips will wait between the stages; a smaller --batch-size, or a cluster "
        "with more object store memory (ray start --object-store-memory)\n"
    )
    distributed._check_object_store([{"object_store_memory": 50e6}, {"object_store_memory": 50e6}], 1, 8, clip)
    distributed._check_object_store([{"object_store_memory": 2e9}], 16, 8, clip)  # 16 x 3 x 29.5 MB < 2 GB
    distributed._check_object_store([{"CPU": 2.0}], 1, 8, clip)  # (not said: nothing known)
    assert capsys.readouterr().err == ""
    distributed._check_object_store([{"object_store_memory": 2e9}], 32, 8, clip)
    assert "holds fewer than 3 batches per encode actor (32 taking" in capsys.readouterr().err


def test_a_sigterm_while_ray_starts_is_the_commands_and_lists_every_input(videos, tmp_path, monkeypatch):
    """ray.init puts its own SIGTERM handler (sys.exit) in place while it starts: a SIGTERM then must still do what
    the command's handler does (here: raise Stopped), and leave every input listed as not encoded."""
    ray = pytest.importorskip("ray")

    class Stopped(Exception):
        pass

    def handler(signum, frame):  # as the command's: a second SIGTERM is ignored while it stops
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stopped

    def init(**kwargs):
        raise SystemExit(signal.SIGTERM)  # what Ray's handler does with a SIGTERM during start-up

    shutdowns = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))  # not the module's cluster
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(Stopped):
            encode_dataset(LOAD(), collect_inputs([videos["good"]]), tmp_path, SETTINGS, device="cpu")
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # as the handler left it
    finally:
        signal.signal(signal.SIGTERM, previous)
    rows = read_manifest(tmp_path / MANIFEST_NAME)
    assert len(rows) == len(GOOD) and {r["status"] for r in rows} == {"not-encoded"} and shutdowns


@pytest.mark.parametrize("signums", [[signal.SIGINT], [signal.SIGTERM], [signal.SIGINT, signal.SIGTERM]],
                         ids=["ctrl-c", "sigterm", "ctrl-c-then-sigterm"])  # fmt: skip
def test_an_interrupt_while_a_local_cluster_starts_waits_for_the_start_and_stops_the_job(videos, tmp_path, monkeypatch,
                                                                                        signums):  # fmt: skip
    """Starting a local cluster forks processes, and an interrupt raised in Python's at-fork hooks was lost (logging's
    lock left held: the job hung): the command's Ctrl-C or SIGTERM waits for ray.init's end, then stops the job,
    the cluster shut down (a second SIGTERM meanwhile ignored, as the command's handler left it) and every input
    listed as not encoded."""
    ray = pytest.importorskip("ray")
    from titok_fast.cli import _interrupts_handled

    started, shutdowns = [], []
    join_executors()  # (one left by a test before would call the init below, from its thread: not this job's)

    def init(**kwargs):
        if threading.current_thread() is not threading.main_thread():  # still: a stray executor's automatic start
            raise RuntimeError("not this job's start of Ray")
        for signum in signums:
            os.kill(os.getpid(), signum)  # the command's handler runs here, inside ray.init
        started.append(kwargs["address"])  # (not reached when the handler raises at once)

    monkeypatch.setattr(ray, "is_initialized", lambda: bool(started) and not shutdowns)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(signal.getsignal(signal.SIGTERM)))  # (not ours)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (as in a terminal: not ignored)
    try:
        with pytest.raises(KeyboardInterrupt), _interrupts_handled():
            encode_dataset(LOAD(), collect_inputs([videos["good"]]), tmp_path, SETTINGS, device="cpu")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert started == ["local"] and len(shutdowns) == 1
    assert (shutdowns[0] == signal.SIG_IGN) == (signal.SIGTERM in signums)  # (held behind a Ctrl-C too)
    rows = read_manifest(tmp_path / MANIFEST_NAME)
    assert len(rows) == len(GOOD) and {r["status"] for r in rows} == {"not-encoded"}
    by = "signal SIGTERM" if signums[-1] == signal.SIGTERM else "Ctrl-C"
    assert {r["reason"] for r in rows} == {f"not encoded: the run was interrupted ({by})"}


def test_a_ctrl_c_again_while_the_jobs_cluster_shuts_down_waits_for_the_shutdown(monkeypatch):
    """Ctrl-C pressed again and again: one that comes while the cluster the job started shuts down waits for the
    shutdown's end (cut short, it left Ray's agents running), then stops the command as the first did."""
    ray = pytest.importorskip("ray")
    from titok_fast.cli import _interrupts_handled

    up, steps = [], []
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(up))
    monkeypatch.setattr(ray, "init", lambda **kwargs: up.append(kwargs["address"]))

    def shutdown():
        os.kill(os.getpid(), signal.SIGINT)  # (the command's handler runs here)
        steps.append("shut down")
        up.clear()

    monkeypatch.setattr(ray, "shutdown", shutdown)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (as in a terminal: not ignored)
    try:
        with pytest.raises(KeyboardInterrupt), _interrupts_handled():
            with distributed._ray_session("local"):
                raise KeyboardInterrupt  # the first Ctrl-C, during the job
    finally:
        signal.signal(signal.SIGINT, previous)
    assert up == [] and steps == ["shut down"]


def test_ray_auto_without_a_cluster_is_one_line_naming_our_options(videos, tmp_path, monkeypatch):
    """Ray's own text for "auto" with no cluster names its flags (--address, RAY_ADDRESS), not the command's."""
    ray = pytest.importorskip("ray")

    def init(address, **kwargs):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to by "
                              "setting `--address` flag or `RAY_ADDRESS` environment variable.")  # fmt: skip

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(ValueError, match=r"^--ray auto: no running Ray cluster found from this machine; start one "
                       r"with `ray start --head`, or pass --ray local$"):  # fmt: skip
        encode_dataset(LOAD(), collect_inputs([videos["good"]]), tmp_path, SETTINGS, device="cpu", ray_address="auto")
    # an address given, where something answers: Ray's words, and what it takes to join a cluster that requires a
    # token (Ray sends one only to a cluster it finds by itself: it waits 20 s, then says only that it failed)
    monkeypatch.setattr("titok_fast.distributed.check_ray_address", lambda address: None)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(ValueError, match=r"^--ray 10.0.0.1:6379: Could not find .*; a cluster that requires token "
                       r"authentication needs RAY_AUTH_MODE=token in this command's environment"):  # fmt: skip
        encode_dataset(LOAD(), collect_inputs([videos["good"]]), tmp_path, SETTINGS, device="cpu",
                       ray_address="10.0.0.1:6379")  # fmt: skip
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # already so: Ray's words alone
    with pytest.raises(ConnectionError, match="^Could not find"):
        encode_dataset(LOAD(), collect_inputs([videos["good"]]), tmp_path, SETTINGS, device="cpu",
                       ray_address="10.0.0.1:6379")  # fmt: skip


def test_relative_inputs_are_read_from_the_folder_the_command_runs_in(videos, cluster, tmp_path, monkeypatch):
    """Ray's decode tasks run in the folder the cluster was started in (or on other machines): a path relative to
    the command's folder is sent to them absolute."""
    monkeypatch.chdir(videos["good"])
    assert os.path.realpath(os.getcwd()) != os.path.realpath(_task_folder())  # (else the test would show nothing)
    files = [(Path("short.mp4"), "short"), (Path("one.mp4"), "one")]
    summary = encode_dataset(LOAD(), files, tmp_path, SETTINGS, device="cpu")
    assert not summary.failed and summary.done == [str(videos["good"] / n) for n in ("short.mp4", "one.mp4")]


def _task_folder() -> str:
    import ray

    def folder():
        return os.getcwd()

    return ray.get(ray.remote(num_cpus=0)(folder).remote())


def test_shards_on_ray_and_on_one_machine_make_the_token_files_of_one_run(runs, videos, cluster, tmp_path, capsys):
    """--shard applies to --ray jobs too: shard 0 of 2 on the cluster and shard 1 on one machine, into one folder,
    write byte for byte the token files of one unsharded run, each shard listed in its own manifest."""
    out = tmp_path / "out"
    assert main(["encode", str(videos["good"]), "-o", str(out), *GRID, *RANDOM, "--shard", "0/2",
                 "--ray", cluster["address"]]) == 0  # fmt: skip
    assert main(["encode", str(videos["good"]), "-o", str(out), *GRID, *RANDOM, "--shard", "1/2"]) == 0
    taken = [int(n) for n in re.findall(r"titok-fast: shard \d/2: (\d+) of 5 inputs\n", capsys.readouterr().err)]
    assert len(taken) == 2 and sum(taken) == 5 and min(taken) > 0
    assert token_bytes(out) == token_bytes(runs["good"])
    sources = [read_manifest(out / f"manifest-{k}-of-2.jsonl") for k in range(2)]
    assert [len(rows) for rows in sources] == taken and not (out / MANIFEST_NAME).exists()
    assert sorted(os.path.basename(r["source"]) for r in sources[0] + sources[1]) == sorted(
        os.listdir(videos["good"])
    )
    assert {r["status"] for r in sources[0] + sources[1]} == {"done"} and WORKERS[0] in sources[0][0]


def test_an_archives_videos_on_ray_give_the_tokens_of_the_files_unpacked(runs, videos, cluster, tmp_path):
    """Ray's decode tasks read an archive's members in place, as one machine does: the tokens of the good files."""
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for path in sorted(videos["good"].iterdir()):
            tar.add(path, arcname=path.name)
    out = tmp_path / "out"
    assert main(["encode", str(tmp_path / "shard.tar"), "-o", str(out), *GRID, *RANDOM, "--batch-size", "3",
                 "--ray", cluster["address"]]) == 0  # fmt: skip
    made = sorted(out.rglob("*.safetensors"))
    assert [str(p.relative_to(out)) for p in made] == [f"shard/{n}.safetensors" for n in sorted(GOOD)]
    for path in made:
        found, unpacked = load_tokens(path), load_tokens(runs["good"] / path.name)
        assert found.source == str(tmp_path / "shard.tar" / f"{path.stem}{Path(unpacked.source).suffix}")
        assert all(map(torch.equal, found.all_indices(), unpacked.all_indices())), path.name


def test_resume_redoes_exactly_what_is_missing_damaged_or_made_otherwise(runs, videos, cluster, tmp_path):
    """A folder with one complete output, one missing, one corrupt, one made by other weights and one with other
    settings, and one of 200 clips not yet begun; a driver (joining the cluster by its address) killed midway; then
    the job again. (Killed when its first file is done: Ray hands the driver its rows in bursts, and the small files
    could all be done in one; the long file is still being encoded then.)"""
    extra = tmp_path / "extra"
    extra.mkdir()
    make_video(extra / "zlong.mp4", frames=2400, height=32, width=32, fps=24)  # 800 frames at 8 fps
    files = collect_inputs([videos["good"], extra])  # long, odd, one, short, two, zlong
    reference = LOAD()
    encode_files(reference, Engine(reference), files[5:], tmp_path / "zlong", SETTINGS)
    expected = {**token_bytes(runs["good"]), **token_bytes(tmp_path / "zlong")}
    out = tmp_path / "out"
    shutil.copytree(runs["good"], out)
    (out / MANIFEST_NAME).unlink()
    (out / "long.safetensors").unlink()
    (out / "odd.safetensors").write_bytes(expected["odd.safetensors"][:100])
    other = tmp_path / "other"
    for model, settings, todo in [
        (random_tokenizer("tiny", seed=1), SETTINGS, files[2:3]),
        (LOAD(), ClipSettings(grid=(4, 32, 32), tokens=16, fps=8.0), files[3:4]),
    ]:
        encode_files(model, Engine(model), todo, other, settings)
    for _, name in files[2:4]:
        shutil.copy(other / f"{name}.safetensors", out)

    cmd = [sys.executable, "-m", "titok_fast.cli", "encode", str(videos["good"]), str(extra), "-o", str(out), *GRID,
           *RANDOM, "--batch-size", "1", "--ray", cluster["address"]]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    log, deadline = out / MANIFEST_NAME, time.time() + 120
    while time.time() < deadline and proc.poll() is None and '"done"' not in (log.read_text() if log.exists() else ""):
        time.sleep(0.01)  # kill the driver as soon as it has written one token file
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    written = read_manifest(log)  # the killed job's manifest, as far as it got
    assert [os.path.basename(r["source"]) for r in written if r["status"] == "skipped"] == ["two.mp4"]
    logged = {os.path.basename(r["source"]) for r in written if r["status"] == "done"}
    redo = [*files[:4], files[5]]
    now = token_bytes(out)
    done = {p.name for p, name in redo if now.get(f"{name}.safetensors") == expected[f"{name}.safetensors"]}
    assert logged <= done and 1 <= len(done) < 5, f"the driver was not killed midway: {done} {err.decode()[-2000:]}"

    summary = encode_dataset(LOAD(), files, out, SETTINGS, device="cpu")
    assert sorted(os.path.basename(p) for p in summary.skipped) == sorted({"two.mp4", *done})
    assert sorted(os.path.basename(p) for p in summary.done) == sorted({p.name for p, _ in redo} - done)
    assert token_bytes(out) == expected and not summary.failed
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert_nothing_spilled(cluster)


def test_sigterm_stops_a_ray_job_with_its_manifest_complete(cluster, tmp_path):
    """ray.init puts a SIGTERM handler of its own (sys.exit); the command's is kept, so the manifest lists the inputs
    not encoded, as on one machine. The command then says so in one line and exits 143, unless Ray's own shutdown
    ends the process first (its core worker exits, status 1, when a thread of Ray's calls it after shutdown): a
    known limit of the Ray path (README), after everything is written.

    The signal is sent when the first file is done. Ray hands the driver its rows in bursts: files of a few clips
    could all be done in the same burst, before the signal comes. So three files here take 200 clips each (about
    2 s apart on 2 cores), and one takes a single clip."""
    source, out = tmp_path / "videos", tmp_path / "out"
    source.mkdir()
    make_video(source / "short.mp4", frames=12, height=32, width=32, fps=24)
    for i in range(3):
        make_video(source / f"long{i}.mp4", frames=2400, height=32, width=32, fps=24)  # 800 frames at 8 fps
    cmd = [sys.executable, "-m", "titok_fast.cli", "encode", str(source), "-o", str(out), *GRID, *RANDOM,
           "--batch-size", "1", "--ray", cluster["address"]]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log, deadline = out / MANIFEST_NAME, time.time() + 120
    while time.time() < deadline and proc.poll() is None and '"done"' not in (log.read_text() if log.exists() else ""):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    said = err.rstrip().endswith("titok-fast: terminated (SIGTERM)")
    ray_exit = "The core worker has already been shutdown" in err
    assert (proc.returncode, said) == (143, True) or (proc.returncode, ray_exit) == (1, True), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    rows = read_manifest(log, latest=True)
    done = [r for r in rows if r["status"] == "done"]
    assert 1 <= len(done) < 4 and len(rows) == 4, rows
    assert all(r["status"] == "not-encoded" for r in rows if r not in done), rows
    assert {r["reason"] for r in rows if r not in done} == {"not encoded: the run was interrupted (signal SIGTERM)"}


class FaultyDevice:
    """An engine whose device faults (as CUDA reports an illegal access) on any batch holding an all-black clip."""

    def __init__(self, engine):
        self.engine = engine

    @staticmethod
    def check(videos):
        if any(bool((v <= -0.99).all()) for v in videos):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def encode_stream(self, items, **options):
        items = list(items)
        self.check([v for _, v, _ in items])
        yield from self.engine.encode_stream(iter(items), **options)

    def encode(self, videos, counts):
        self.check(videos)
        return self.engine.encode(videos, counts)


def clip_batch(paths, settings, dtype) -> dict[str, list]:
    rows = [r for n, p in enumerate(paths) for r in decode_rows({"file": n, "path": str(p)}, settings=settings,
                                                                 dtype=dtype)]  # fmt: skip
    return {c: [r[c] for r in rows] for c in rows[0]}


def clips_of(batch, dtype) -> list[torch.Tensor]:
    rows = zip(batch["data"], batch["kind"], strict=True)
    return [torch.frombuffer(bytearray(d), dtype=dtype).view(3, *SETTINGS.grid) for d, k in rows if k == "clip"]


def tokens_of(out) -> list[torch.Tensor]:
    rows = zip(out["data"], out["kind"], strict=True)
    return [torch.frombuffer(bytearray(d), dtype=torch.int32) for d, k in rows if k == "tokens"]


class _Rows:
    """A pass as :func:`_collect` sees it (:class:`distributed._Run`), of ``rows``, from a pool of ``actors``."""

    def __init__(self, rows, actors: int = 1, shared: bool = False, decoded: set[int] = frozenset()):
        self._rows, self.actors, self.shared, self._decoded = rows, actors, shared, decoded

    def rows(self):
        yield from self._rows

    def decoded(self, files):
        return set(files) & set(self._decoded)

    def reader_seconds(self):
        return 0.0, 0.0


def test_the_driver_says_what_limited_the_job_from_how_busy_the_encode_actors_were(videos, tmp_path):
    """The actors' busy rows (their seconds on batches) against their pool's time since the pass's first row (or an
    actor's first batch, if that began earlier), over the passes: model-bound at MODEL_BOUND or more; else
    driver-bound where the thread reading the rows waited for room in the driver's queue half its time or more,
    decode-bound where not; nothing said before LIMIT_SECONDS of rows. A busy row is nothing else to the driver: the
    file's token file is the same."""
    encoder = ClipEncoder(LOAD, SETTINGS, batch_size=4)
    batch = encoder(clip_batch([videos["good"] / "long.mp4"], SETTINGS, torch.float32))
    assert encoder.busy > 0
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    said = json.dumps({"busy": 0.5, "span": 0.0})
    busy = {"file": -1, "clip": -1, "kind": "busy", "data": b"", "info": said, "decoded_by": "", "encoded_by": "a:1"}
    todo = [(videos["good"] / "long.mp4", tmp_path / "long.safetensors")]
    summary = Summary()
    with Manifest(tmp_path / MANIFEST_NAME, summary) as manifest:
        assembly = _Assembly(LOAD(), "auto", "cpu", SETTINGS, todo, manifest, _progress(len(todo), "file"))
        _collect(_Rows([busy, *rows[:3], busy, *rows[3:]], actors=2), assembly, decode_retries=2, actor_restarts=8)
    assert summary.done == [str(todo[0][0])] and not summary.failed and summary.duplicates == 0
    assert len(load_tokens(todo[0][1]).all_indices()) == 6
    limits = assembly.limits
    assert limits.clips == 6 and limits.ended[0] == 0.5 and limits.ended[1] == 2 * limits.ended[2]
    assert limits.ended[2] < distributed.LIMIT_SECONDS and limits.limited_by() == ""  # too short to tell

    def busy_row(worker, seconds, span=0.0):
        return {"kind": "busy", "encoded_by": worker, "info": json.dumps({"busy": seconds, "span": span})}

    limits = distributed.EncodersBusy(time.perf_counter())
    limits.clips = 1
    limits.pass_started(2)
    assert not limits.row({"kind": "tokens"})
    limits.first -= 20.0  # rows for 20 s
    for worker, seconds in [("a:1", 30.0), ("a:1", 20.0), ("a:2", 4.0)]:  # (a retried batch's row comes late)
        assert limits.row(busy_row(worker, seconds))
    assert limits.limited_by() == "model-bound (encode actors busy 85%)"  # 34 s of 2 x 20
    limits.row(busy_row("a:2", 4.0, span=60.0))  # a:2's first batch (its setup) began 60 s ago: 34 s of 2 x 60
    assert limits.limited_by() == "decode-bound (encode actors busy 28%): more CPUs for the decode tasks, or nodes"
    limits.first += 40.0  # (back to 20 s)
    limits.pass_ended()
    limits.pass_started(1)  # a second pass, of files tried again alone
    limits.row(busy_row("b:1", 1.0))
    limits.first -= 10.0
    assert limits.limited_by() == "decode-bound (encode actors busy 70%): more CPUs for the decode tasks, or nodes"
    limits.pass_ended()
    limits.pass_started(1, lambda: (38.0, 40.0))  # a third, whose reader waited 38 of its 40 s for room
    limits.row({"kind": "end"})
    limits.first -= 40.0
    assert limits.limited_by() == ("driver-bound (encode actors busy 39%, results waited 95% of the time for the "
                                   "driver): its CPU or its token file writes")  # 35 s of 90; 38 s of 40

    limits = distributed.EncodersBusy(time.perf_counter())  # the decode tasks' end rows say their CPU and wall time
    limits.clips = 1
    limits.pass_started(1)
    limits.row(busy_row("a:1", 1.0))
    limits.first -= 100.0
    limits.decoded({"cpu": 91.0, "wall": 100.0})  # a file decoded flat out
    limits.decoded({"cpu": 1.0, "wall": 2.0})  # and one that was short
    limits.decoded({"clips": 3})  # (an earlier version's end row: nothing)
    assert limits.limited_by() == ("decode-bound (encode actors busy 1%, decode tasks computing 90% of their time): "
                                   "more CPUs for the decode tasks, or nodes")  # 92 s of 102
    limits.decoded({"cpu": 8.0, "wall": 298.0})  # a file whose clips waited (a small object store): 100 s of 400
    assert limits.limited_by() == ("held back by Ray Data (encode actors busy 1%, decode tasks computing 25% of their "
                                   "time): clips waited between the stages, as when the object store is small for the "
                                   "batches: a smaller --batch-size, or more object store memory")  # fmt: skip


def test_the_driver_keeps_nothing_of_an_ended_file_and_counts_what_came_again(videos, tmp_path, monkeypatch):
    """The driver's side of a job, without Ray: rows in any order and some twice (retried work) -> the token
    files, duplicates counted, a file whose rows never came failed; and nothing kept of an ended file (about
    500 bytes each: half a gigabyte per million files when every file's state was made up front)."""
    names = ["long.mp4", "short.mp4", "one.mp4"]
    paths = [videos["good"] / n for n in names[:2]] + [videos["all"] / "corrupt.mp4", videos["good"] / names[2]]
    model, out = LOAD(), tmp_path / "out"
    rows = ClipEncoder(LOAD, SETTINGS, batch_size=4)(clip_batch(paths[:3], SETTINGS, torch.float32))
    rows = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
    of = {n: sorted((r for r in rows if r["file"] == n), key=lambda r: (r["kind"] != "tokens", r["clip"]))
          for n in range(3)}  # fmt: skip
    assert [r["kind"] for r in of[2]] == ["tokens", "error"]  # the corrupt file fails after its first clip
    # long's end first, a clip twice, short's rows twice (after it was written), the corrupt file's rows twice
    # (its task run again: not duplicates, it had failed before its end); file 3's rows never come
    order = [of[0][-1], *of[0][:-1], of[0][2], *of[1], *of[1], *of[2], *of[2]]
    todo = [(p, out / f"{p.stem}.safetensors") for p in paths]
    summary = Summary()
    with Manifest(out / MANIFEST_NAME, summary) as manifest:
        assembly = _Assembly(model, "auto", "cpu", SETTINGS, todo, manifest, _progress(len(todo), "file"))
        seen = []
        for row in order:
            assembly.take(row)
            seen.append(len(assembly.open))
        assert max(seen) == 1 and assembly.unsettled_numbers() == [3]
        _collect(_Rows([]), assembly, decode_retries=2, actor_restarts=8)
    assert assembly.open == {} and assembly.unsettled_numbers() == []
    assert summary.done == [str(p) for p in paths[:2]] and summary.duplicates == 1 + len(of[1])
    failed = dict(summary.failed)
    assert "decoding failed" in failed[str(paths[2])]
    assert failed[str(paths[3])].startswith("decoding did not finish: its decode task failed for good (tried 3")
    assert load_tokens(todo[0][1]).source_fps == 24  # (the decode stage's end row carries it)
    stored = load_tokens(todo[0][1]).all_indices()
    sent = [torch.frombuffer(bytearray(r["data"]), dtype=torch.int32) for r in of[0][:-1]]
    assert len(stored) == len(sent) == 6 and all(torch.equal(a.int(), b) for a, b in zip(stored, sent, strict=True))
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["long.safetensors", "short.safetensors"]

    def interrupted():  # a job stopped after one row: every file is listed, none kept but the one with a row
        yield of[0][0]
        raise KeyboardInterrupt

    summary = Summary()
    with Manifest(tmp_path / "stopped" / MANIFEST_NAME, summary) as manifest:
        assembly = _Assembly(model, "auto", "cpu", SETTINGS, todo, manifest, _progress(len(todo), "file"))
        with pytest.raises(KeyboardInterrupt):
            _collect(_Rows(interrupted()), assembly, decode_retries=2, actor_restarts=8)
    assert list(assembly.open) == [0] and [p for p, _ in summary.failed] == [str(p) for p in paths]
    assert {reason for _, reason in summary.failed} == {"not encoded: the run was interrupted (Ctrl-C)"}

    def full(path, token_file):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("titok_fast.pipeline.save_tokens", full)  # the run stops as one machine's does, in its words
    summary = Summary()
    with Manifest(tmp_path / "full" / MANIFEST_NAME, summary) as manifest:
        assembly = _Assembly(model, "auto", "cpu", SETTINGS, todo[:1], manifest, _progress(1, "file"))
        with pytest.raises(OSError, match=r"^the Ray job stopped: cannot write \S*long\.safetensors \(No space left on "
                                          r"device\): the run stops$"):  # fmt: skip
            _collect(_Rows(iter(of[0])), assembly, decode_retries=2, actor_restarts=8)


def test_on_ray_a_video_of_more_clips_than_a_token_file_holds_fails_at_the_first_clip_past_them(tmp_path,
                                                                                                  monkeypatch):
    """As on one machine (tests/test_pipeline.py): its clips are not held, its end is passed over, and the other
    file is written."""
    from titok_fast import tokens

    monkeypatch.setattr(tokens, "MAX_FILE_BYTES", tokens.MAX_HEADER_BYTES + 3 * (2 * 8 + tokens.CHUNK_BYTES))
    todo = [(tmp_path / f"{name}.mp4", tmp_path / "out" / f"{name}.safetensors") for name in ("long", "short")]

    def rows(file: int, clips: int):
        data = torch.arange(8, dtype=torch.int32).numpy().tobytes()
        yield from ({"file": file, "kind": "tokens", "clip": c, "data": data, "encoded_by": "a"} for c in range(clips))
        info = {"clips": clips, "start_times": [0.5 * c for c in range(clips)], "last_clip_frames": 4,
                "decoder": "cpu", "placement": "cpu"}  # fmt: skip
        yield {"file": file, "kind": "end", "clip": -1, "info": json.dumps(info), "decoded_by": "b"}

    summary = Summary()
    with Manifest(tmp_path / "out" / MANIFEST_NAME, summary) as manifest:
        assembly = _Assembly(LOAD(), "auto", "cpu", SETTINGS, todo, manifest, _progress(len(todo), "file"))
        for row in [*rows(0, 5), *rows(1, 3)]:
            assembly.take(row)
            assert all(len(state.indices) <= 3 for state in assembly.open.values())
        _collect(_Rows([]), assembly, decode_retries=2, actor_restarts=8)
    assert summary.done == [str(todo[1][0])] and [path for path, _ in summary.failed] == [str(todo[0][0])]
    assert summary.failed[0][1].endswith(": more than 3 clips of 8 tokens: its token file would pass the 4,194,448 "
                                         "bytes a token file may have; cut the video into parts")  # fmt: skip
    assert len(load_tokens(todo[1][1]).grids) == 3 and not todo[0][1].exists()


KEYINT = "keyint=24:min-keyint=24:scenecut=0"  # an IDR picture every 24 frames: a file that can be split


def _assembled(model, path: Path, out: Path, *passes, settings=SETTINGS) -> tuple[Summary, list[list[int]]]:
    """The decode rows of the one file ``path`` (clips encoded here) of each pass of a job, through the driver's
    side of it; and the files left to be read again after each pass."""
    summary, again = Summary(), []
    with Manifest(out / MANIFEST_NAME, summary) as manifest:
        assembly = _Assembly(model, "auto", "cpu", settings, [(path, out / "long.safetensors")], manifest,
                             _progress(1, "file"))  # fmt: skip
        for rows in passes:
            encoded = ClipEncoder(LOAD, settings, batch_size=4)({c: [r[c] for r in rows] for c in rows[0]})
            for values in zip(*encoded.values(), strict=True):
                assembly.take(dict(zip(encoded, values, strict=True)))
            _collect(_Rows([]), assembly, decode_retries=2, actor_restarts=8)
            again.append(assembly.reopen_again())
    return summary, again


def split_rows(path: Path, parts: int) -> list[list[dict]]:
    """The decode rows of ``path`` planned for ``parts`` decode tasks, as a job's tasks make them: those of each."""
    rows = part_rows(0, str(path), *plan_segments(str(path), SETTINGS, parts))
    return [list(decode_rows(row, settings=SETTINGS, dtype=torch.float32)) for row in rows]


def test_a_files_decode_tasks_each_read_a_segment_and_the_driver_joins_them(tmp_path, monkeypatch):
    """A file planned for 8 decode tasks (``parts``) once, into 6 segments (2 clips or more, from IDR pictures):
    6 tasks, each reading its own segment without reading the file's packets again, numbering its clips in the
    file. Their rows, in any order and one end row twice, make the token file of one task reading it all."""
    monkeypatch.setattr(video, "SEGMENT_CLIPS", 2)
    path = make_video(tmp_path / "long.mp4", frames=150, height=40, width=48, fps=24, x264=KEYINT)  # 12 clips
    whole = list(decode_rows({"file": 0, "path": str(path)}, settings=SETTINGS, dtype=torch.float32))
    indexed, stream_index = [], video.stream_index
    monkeypatch.setattr(video, "stream_index", lambda *args, **kw: indexed.append(args) or stream_index(*args, **kw))
    segments, stamp = plan_segments(str(path), SETTINGS, 8)
    rows = part_rows(0, str(path), segments, stamp)
    assert len(indexed) == 1 and len(rows) == 6 and stamp == whole_stamp(whole)
    parts = [list(decode_rows(row, settings=SETTINGS, dtype=torch.float32)) for row in rows]
    assert len(indexed) == 1  # the tasks were given the file's frame order with their segments
    ends = [json.loads(rows[-1]["info"]) for rows in parts]
    assert all(e["cpu"] > 0 and e["wall"] > 0 for e in ends)  # (what says a job decode-bound or held back)
    planned = [(2 * k, 2, 6, stamp) for k in range(6)]  # (first clip, clips, parts, the stamp planned on)
    assert [(e["first"], e["clips"], e["parts"], e["planned"]) for e in ends] == planned
    clips = {r["clip"]: r["data"] for rows in parts for r in rows if r["kind"] == "clip"}
    assert sum(e["clips"] for e in ends) == len(clips) == 12
    assert [clips[n] for n in range(12)] == [r["data"] for r in whole if r["kind"] == "clip"]
    joined = [t for e in ends for t in e["start_times"]]
    assert joined == json.loads(whole[-1]["info"])["start_times"]
    model = LOAD()
    rows = [r for k in (3, 0, 5, 1, 4, 2) for r in reversed(parts[k])] + [parts[4][-1]]
    split, again = _assembled(model, path, tmp_path / "split", rows)
    one, _ = _assembled(model, path, tmp_path / "one", whole)
    assert split.done == one.done == [str(path)] and split.duplicates == 1 and again == [[]]
    assert token_bytes(tmp_path / "split") == token_bytes(tmp_path / "one")


def test_a_file_split_for_decode_tasks_with_clips_per_video_is_split_within_them(tmp_path, monkeypatch):
    """With ``clips_per_video`` 7 a file of 12 clips is planned within its first 7 clips (3 segments of 2 or more),
    and its tasks' rows make the token file of one task reading those 7: the first 7 clips of reading it all."""
    monkeypatch.setattr(video, "SEGMENT_CLIPS", 2)
    settings = dataclasses.replace(SETTINGS, clips_per_video=7)
    path = make_video(tmp_path / "long.mp4", frames=150, height=40, width=48, fps=24, x264=KEYINT)  # 12 clips
    every = list(decode_rows({"file": 0, "path": str(path)}, settings=SETTINGS, dtype=torch.float32))
    whole = list(decode_rows({"file": 0, "path": str(path)}, settings=settings, dtype=torch.float32))
    segments, stamp = plan_segments(str(path), settings, 8)
    parts = [list(decode_rows(row, settings=settings, dtype=torch.float32)) for row in part_rows(0, str(path),
                                                                                                 segments, stamp)]
    ends = [json.loads(rows[-1]["info"]) for rows in parts]
    assert [(e["first"], e["clips"], e["parts"]) for e in ends] == [(0, 2, 3), (2, 2, 3), (4, 3, 3)]
    clips = {r["clip"]: r["data"] for rows in parts for r in rows if r["kind"] == "clip"}
    assert [clips[n] for n in range(7)] == [r["data"] for r in whole if r["kind"] == "clip"] == [
        r["data"] for r in every if r["kind"] == "clip"][:7] and len(clips) == 7  # fmt: skip
    model = LOAD()
    split, _ = _assembled(model, path, tmp_path / "split", [r for rows in parts for r in rows], settings=settings)
    one, _ = _assembled(model, path, tmp_path / "one", whole, settings=settings)
    assert split.done == one.done == [str(path)]
    assert token_bytes(tmp_path / "split") == token_bytes(tmp_path / "one")


def test_a_split_file_whose_last_clip_is_padded_records_the_last_parts_real_frames(tmp_path, monkeypatch):
    """With --tail pad a file's last clip holds fewer real frames (2 of 4 here): split across decode tasks, the
    token file takes that count from the last part, as one task reading it all records it."""
    monkeypatch.setattr(video, "SEGMENT_CLIPS", 2)
    settings = dataclasses.replace(SETTINGS, tail="pad")
    path = make_video(tmp_path / "long.mp4", frames=150, height=40, width=48, fps=24, x264=KEYINT)  # 50 frames
    whole = list(decode_rows({"file": 0, "path": str(path)}, settings=settings, dtype=torch.float32))
    segments, stamp = plan_segments(str(path), settings, 8)
    rows = [r for row in part_rows(0, str(path), segments, stamp)
            for r in decode_rows(row, settings=settings, dtype=torch.float32)]  # fmt: skip
    model = LOAD()
    split, _ = _assembled(model, path, tmp_path / "split", rows, settings=settings)
    one, _ = _assembled(model, path, tmp_path / "one", whole, settings=settings)
    assert split.done == one.done == [str(path)] and len(segments) > 1
    assert load_tokens(tmp_path / "split" / "long.safetensors").last_chunk_frames == 2
    assert token_bytes(tmp_path / "split") == token_bytes(tmp_path / "one")


def whole_stamp(rows: list[dict]) -> str:
    return json.loads(rows[-1]["info"])["source_stamp"]


def test_a_segment_travels_in_its_row_compressed_and_comes_back_exact():
    """A decode row carries the file's whole frame order: an hour at 30 fps (108,000 stamps, 864 KB) takes a few
    KB as differences, and comes back exact, stamps near the int64 limits too (their differences wrap)."""
    import numpy as np

    from titok_fast.distributed import _packed, _unpacked

    hour = np.arange(108_000, dtype=np.int64) * 512
    hour[1::3], hour[2::3] = hour[2::3].copy(), hour[1::3].copy()  # B-frames: stamps out of order
    edges = np.array([2**63 - 1, -(2**63), 0, 2**63 - 2, -5], dtype=np.int64)
    for order in (hour, edges):
        segment = video.Segment(3, None, 1, order, True)
        row = part_rows(0, "a.mp4", [_packed(segment)] * 2, "1:2")[1]
        back = _unpacked(row["segment"])
        assert back.order.dtype == np.int64 and np.array_equal(back.order, order)
        assert (back.first, back.clips, back.cut, back.prunable) == (3, None, 1, True)
    assert len(_packed(video.Segment(0, 1, 0, hour, True))) < 8 << 10


@pytest.mark.parametrize("field", ["source_stamp", "planned"])
def test_a_split_file_whose_parts_disagree_is_read_again_whole(tmp_path, monkeypatch, capsys, field):
    """A part that read the file at another size or time than the others, or than its plan saw (the file changed
    meanwhile), makes no token file: the file is left to a pass of its own, read whole by one task, the rows of
    its parts still to come passed over; that pass writes the token file of one read. A file read whole fails."""
    monkeypatch.setattr(video, "SEGMENT_CLIPS", 2)
    path = make_video(tmp_path / "long.mp4", frames=76, height=40, width=48, fps=24, x264=KEYINT)  # 6 clips
    whole = list(decode_rows({"file": 0, "path": str(path)}, settings=SETTINGS, dtype=torch.float32))
    parts = split_rows(path, 3)
    assert [json.loads(rows[-1]["info"])["clips"] for rows in parts] == [2, 2, 2]
    value, why = "1:2", "changed while it was read"
    changed = {**parts[0][-1], "info": json.dumps({**json.loads(parts[0][-1]["info"]), field: value})}
    first = [*parts[0][:-1], *parts[1], changed, *parts[2]]  # part 2's rows come after the file was left
    model = LOAD()
    summary, again = _assembled(model, path, tmp_path / "split", first, whole)
    one, _ = _assembled(model, path, tmp_path / "one", whole)
    assert again == [[0], []] and why in capsys.readouterr().err
    assert summary.done == [str(path)] and not summary.failed and summary.duplicates == 0
    assert token_bytes(tmp_path / "split") == token_bytes(tmp_path / "one")
    two = split_rows(path, 2)  # (the fewest parts a split file has)
    changed = {**two[0][-1], "info": json.dumps({**json.loads(two[0][-1]["info"]), field: value})}
    summary, again = _assembled(model, path, tmp_path / "two", [*two[0][:-1], changed, *two[1]], whole)
    assert again == [[0], []] and summary.done == [str(path)] and not summary.failed
    assert token_bytes(tmp_path / "two") == token_bytes(tmp_path / "one")
    changed = {**whole[-1], "info": json.dumps({**json.loads(whole[-1]["info"]), "clips": 0})}  # (no clip came)
    failed, again = _assembled(model, path, tmp_path / "whole", [changed])
    assert again == [[]] and "no clip came" in dict(failed.failed)[str(path)]


def test_a_split_file_cut_short_after_its_plan_is_read_again_whole(tmp_path, monkeypatch, capsys):
    """A file rewritten shorter between its plan and its decode tasks (its later segments' clips are not all
    there): those tasks end instead of failing the file, and the driver has it read again whole."""
    monkeypatch.setattr(video, "SEGMENT_CLIPS", 2)
    path = make_video(tmp_path / "long.mp4", frames=76, height=40, width=48, fps=24, x264=KEYINT)  # 6 clips
    rows = part_rows(0, str(path), *plan_segments(str(path), SETTINGS, 3))
    make_video(path, frames=40, height=40, width=48, fps=24, x264=KEYINT)  # 3 clips now
    parts = [list(decode_rows(row, settings=SETTINGS, dtype=torch.float32)) for row in rows]
    assert [rows[-1]["kind"] for rows in parts] == ["end"] * 3
    whole = list(decode_rows({"file": 0, "path": str(path)}, settings=SETTINGS, dtype=torch.float32))
    summary, again = _assembled(LOAD(), path, tmp_path / "split", [r for rows in parts for r in rows], whole)
    assert again == [[0], []] and "changed while it was read" in capsys.readouterr().err
    assert summary.done == [str(path)] and not summary.failed
    assert load_tokens(tmp_path / "split" / "long.safetensors").token_counts.numel() == 3


def test_a_file_whose_shared_decode_task_failed_is_read_again_from_the_start(tmp_path, monkeypatch):
    """A pass whose decode tasks hold several rows leaves a file whose task failed for good unsettled; the next
    pass reads it again from the start, planned anew (here: read whole, as when its plan fails), and what came
    back of the first read is dropped, not mixed with it: the token file of one read."""
    monkeypatch.setattr(video, "SEGMENT_CLIPS", 2)
    path = make_video(tmp_path / "long.mp4", frames=76, height=40, width=48, fps=24, x264=KEYINT)  # 6 clips
    first = list(decode_rows(part_rows(0, str(path), *plan_segments(str(path), SETTINGS, 3))[0], settings=SETTINGS,
                             dtype=torch.float32))  # only the first of its 3 parts came back  # fmt: skip
    whole = list(decode_rows({"file": 0, "path": str(path)}, settings=SETTINGS, dtype=torch.float32))
    model, summary = LOAD(), Summary()

    def encoded(rows):
        out = ClipEncoder(LOAD, SETTINGS, batch_size=4)({c: [r[c] for r in rows] for c in rows[0]})
        return [dict(zip(out, values, strict=True)) for values in zip(*out.values(), strict=True)]

    with Manifest(tmp_path / "split" / MANIFEST_NAME, summary) as manifest:
        assembly = _Assembly(model, "auto", "cpu", SETTINGS, [(path, tmp_path / "split" / "long.safetensors")],
                             manifest, _progress(1, "file"))  # fmt: skip
        for row in encoded(first):
            assembly.take(row)
        _collect(_Rows([], shared=True), assembly, decode_retries=2, actor_restarts=8, again=True)
        lost = assembly.unsettled_numbers()
        assert lost == [0]
        assembly.forget(lost)  # as the job does before its pass of lost files
        for row in encoded(whole):
            assembly.take(row)
        _collect(_Rows([]), assembly, decode_retries=2, actor_restarts=8)
    one, _ = _assembled(model, path, tmp_path / "one", whole)
    assert summary.done == one.done == [str(path)] and not summary.failed
    assert token_bytes(tmp_path / "split") == token_bytes(tmp_path / "one")


def test_plans_are_waited_for_a_bounded_time_and_a_hung_file_is_read_whole(cluster, tmp_path, monkeypatch):
    """A file whose read hangs (a hung network file system) holds up its job's start for PLAN_SECONDS at most: its
    plan task is cancelled and the file left to be read whole; the other files are planned."""
    import ray

    from titok_fast import distributed

    path = make_video(tmp_path / "long.mp4", frames=600, height=40, width=48, fps=24, x264=KEYINT)
    assert cpus_free_again(ray) == 2  # (an earlier test's actors may still be ending)
    # workers started (one per CPU of the test cluster: whichever takes the hung file, another is ready) and the
    # file planned first: on a slow machine (a worker's start and imports take seconds) the bound below measures
    # the hung file's wait, not a worker's start
    alone = distributed._plans(ray, {0: str(path), 1: str(path)}, SETTINGS, 3, 1, None, "")
    assert sorted(alone) == [0, 1] and alone[0] == alone[1] and len(alone[0][0]) == 3
    monkeypatch.setattr(distributed, "PLAN_SECONDS", 10.0)
    hangs = make_hanging(tmp_path)
    try:
        started = time.monotonic()
        with failing_after(120, "the plans were waited for without a bound"):
            plans = distributed._plans(ray, {0: str(path), 1: str(hangs)}, SETTINGS, 3, 1, None, "")
        waited = time.monotonic() - started
    finally:
        release_hanging(tmp_path)
    assert sorted(plans) == [0] and plans[0] == alone[0]
    assert 10.0 <= waited < 60


def test_a_file_is_read_by_as_many_decode_tasks_as_fill_the_cluster_where_files_are_fewer():
    """Fewer files than the cluster has room for decode tasks beside the encode actors: each file gets
    ceil(room / files) tasks, up to 16; as many files or more: one each."""
    nodes = [{"CPU": 16, "GPU": 1}, {"CPU": 8}]
    assert [_parts_per_file(nodes, files, 2, 1) for files in (1, 2, 3, 21, 22, 100)] == [16, 11, 8, 2, 1, 1]
    assert _parts_per_file(nodes, 2, 2, 4) == 3  # (24 - 2) // 4 = 5 tasks of 4 CPUs


def test_a_long_file_read_by_several_decode_tasks_on_ray_gets_the_token_file_of_one_read(cluster, tmp_path,
                                                                                          monkeypatch):
    """On the cluster, a file of 50 clips planned once and read by 3 decode tasks, a segment each (16 clips or
    more, from IDR pictures): the token file of one machine's read. Where its plan's worker dies, one task reads
    it whole: the same token file. The summary says what limited the job (from the first rows on, here)."""
    monkeypatch.setattr(distributed, "LIMIT_SECONDS", 0.0)
    path = make_video(tmp_path / "long.mp4", frames=600, height=40, width=48, fps=24, x264=KEYINT)
    from titok_fast.distributed import _unpacked

    segments = [_unpacked(s) for s in plan_segments(str(path), SETTINGS, 3)[0]]
    assert [(s.first, s.clips) for s in segments] == [(0, 16), (16, 17), (33, None)]
    model = LOAD()
    encode_files(model, Engine(model), [(path, "long")], tmp_path / "one", SETTINGS)
    summary = encode_dataset(model, [(path, "long")], tmp_path / "ray", SETTINGS, load_model=LOAD, device="cpu",
                             ray_address=cluster["address"], batch_size=8, parts=3)  # fmt: skip
    assert summary.done == [str(path)] and summary.duplicates == 0  # (each task read its own clips)
    # (a verdict is said; which one is the scheduler's: on the 2-CPU test cluster the 3 decode tasks share the CPUs
    # with the actor, and where they got under half their wall time to compute, Ray Data is said to hold them back)
    assert re.fullmatch(r"((model|decode)-bound|held back by Ray Data) \(encode actors busy \d+%[^)]*\)(: .+)?",
                        summary.limited_by)  # fmt: skip
    assert token_bytes(tmp_path / "ray") == token_bytes(tmp_path / "one")
    assert read_manifest(tmp_path / "ray" / MANIFEST_NAME)[0]["clips"] == 50
    assert_nothing_spilled(cluster)
    summary = encode_dataset(model, [(path, "long")], tmp_path / "again", SETTINGS, load_model=LOAD, device="cpu",
                             ray_address=cluster["address"], batch_size=8, parts=3,
                             _test_hooks={"plan_exit_on": "long"})  # fmt: skip
    assert summary.done == [str(path)] and not summary.failed  # read whole, by one task
    assert token_bytes(tmp_path / "again") == token_bytes(tmp_path / "one")
    assert "," not in read_manifest(tmp_path / "again" / MANIFEST_NAME)[0]["decoded_by"]


def test_a_decode_task_gives_up_on_a_file_whose_read_hangs(videos, tmp_path):
    """The decode stage reads each file in a thread of its own: a read that hangs becomes that file's error row,
    and the task goes on to its next file (its clips as without the guard)."""
    hangs = make_hanging(tmp_path)
    try:
        rows = list(decode_rows({"file": 0, "path": str(hangs)}, settings=SETTINGS, dtype=torch.float32,
                                stall_seconds=0.5))  # fmt: skip
    finally:
        release_hanging(tmp_path)
    assert [(r["kind"], r["info"]) for r in rows] == [("error", f"{hangs}: no clip decoded for 0.5 s; given up (a "
                                                       "read that hangs, or a file the decoder cannot get through)")]
    row = {"file": 1, "path": str(videos["good"] / "odd.mkv")}
    guarded = list(decode_rows(row, settings=SETTINGS, dtype=torch.float32, stall_seconds=30))
    assert [r["data"] for r in guarded] == [r["data"] for r in decode_rows(row, settings=SETTINGS, dtype=torch.float32)]
    assert [r["kind"] for r in guarded] == ["clip"] * 5 + ["end"]


def test_encoder_without_ray_fails_a_clip_that_faulted_the_device_twice(videos, tmp_path):
    black = tmp_path / "black.mp4"
    write_video(black, torch.full((3, 8, 32, 32), -1.0), fps=8)  # 2 clips
    batch = clip_batch([videos["good"] / "long.mp4", black], SETTINGS, torch.float32)
    assert clips_of(batch, torch.float32)[6].abs().max() < 1  # the black clips: raw pixels about 0
    ledger = FaultLedger()
    encoder = ClipEncoder(LOAD, SETTINGS, batch_size=4, ledger=ledger)
    encoder.engine = FaultyDevice(encoder.engine)
    with pytest.raises(DeviceFault):  # the whole batch faulted once
        encoder(batch)
    assert {k: n for k, (n, _) in ledger.faults([(0, i) for i in range(6)] + [(1, 0), (1, 1)]).items()} == {
        **{(0, i): 1 for i in range(6)}, (1, 0): 1, (1, 1): 1}  # fmt: skip
    with pytest.raises(DeviceFault):  # its clips alone: the first black clip faults again
        encoder(batch)
    with pytest.raises(DeviceFault):  # the second black one
        encoder(batch)
    out = encoder(batch)
    kinds = dict(zip(zip(out["file"], out["clip"], strict=True), out["kind"], strict=True))
    assert kinds == {**{(0, i): "tokens" for i in range(6)}, (1, 0): "failed", (1, 1): "failed", (0, 6): "end",
                     (1, 2): "end"}  # fmt: skip
    reasons = [i for i, k in zip(out["info"], out["kind"], strict=True) if k == "failed"]
    assert all("the device faulted 2 times on it (CUDA error" in r for r in reasons)
    long = clips_of(batch, torch.float32)[:6]
    _, direct = LOAD().encode([normalize_pixels(c, torch.float32) for c in long], [8] * 6)
    assert all(torch.equal(a, b.int()) for a, b in zip(tokens_of(out), direct["indices"], strict=True))


class _FaultSeenLate:
    """Indices on a device that faulted after their batch ran: CUDA reports it at the first sync, their copy."""

    def to(self, *args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_device_fault_seen_only_when_the_tokens_come_to_the_host_ends_the_actor(videos):
    """A kernel's fault surfaces at the next sync, which for a batch that ran whole is the copy of its tokens to the
    host: it must count as the device's fault (the actor ends and Ray restarts it), not as an unforeseen error."""
    batch = clip_batch([videos["good"] / "long.mp4"], SETTINGS, torch.float32)
    ledger = FaultLedger()
    encoder = ClipEncoder(LOAD, SETTINGS, batch_size=4, ledger=ledger)
    engine = encoder.engine

    class LateFault:
        def encode_stream(self, items, **options):
            for key, (codes, _) in engine.encode_stream(items, **options):
                yield key, (codes, _FaultSeenLate())

    encoder.engine = LateFault()
    with pytest.raises(DeviceFault, match="illegal memory access"):
        encoder(batch)
    assert sorted(ledger.faults([(0, i) for i in range(6)])) == [(0, i) for i in range(6)]
    encoder.engine = engine  # the clips run alone next, and come out
    out = encoder(batch)
    assert [k for k in out["kind"] if k != "end"] == ["tokens"] * 6


class _FailsEveryClip:
    """An engine on which every batch and every clip alone fails (not the device's fault: say, kernels that cannot
    be built on this worker), but clips whose first pixel is above ``passes_above``."""

    def __init__(self, engine, passes_above: float = 2.0):
        self.engine, self.passes_above = engine, passes_above

    def encode_stream(self, items, **options):
        if next(iter(items), None) is not None:
            raise RuntimeError("Failed to find C compiler")
        yield from ()

    def encode(self, videos, counts):
        if videos[0].flatten()[0] > self.passes_above:
            return self.engine.encode(videos, counts)
        raise RuntimeError("Failed to find C compiler")


def test_an_encode_worker_whose_clips_fail_alone_batch_after_batch_stops_the_job(videos, monkeypatch, tmp_path):
    """GIVE_UP_AFTER files in a row whose clips fail alone, counted across batches (a batch of 4 clips alone never
    reaches it), is a fault no clip explains: the batch's rows end with a ``stop`` row, and the driver stops the
    job with it, as one machine's run stops; a clip that runs in between starts the count again. A file counts
    once: its later clips are not encoded (one machine drops a failed file's clips), so one bad file of many clips
    fails alone. An error while preparing clips stops the job too."""
    monkeypatch.setattr(distributed, "GIVE_UP_AFTER", 5)
    batch = clip_batch([videos["good"] / "long.mp4"], SETTINGS, torch.float32)  # 6 clips and an end row
    clips = {c: v[:4] for c, v in batch.items()}

    def of(files, numbers=(0, 0, 0, 0)):  # the 4 clips, as clips ``numbers`` of ``files``
        return {**clips, "file": list(files), "clip": list(numbers)}

    encoder = ClipEncoder(LOAD, SETTINGS, batch_size=4)
    encoder.engine = _FailsEveryClip(encoder.engine)
    out = encoder(of([0, 1, 2, 3]))
    assert out["kind"] == ["failed"] * 4 and encoder.failed_in_a_row == 4
    assert encoder(of([4, 5, 6, 7]))["kind"] == ["stop"]  # the 5th in a row
    encoder.failed_in_a_row = 0
    assert encoder(of([9] * 4, range(4)))["kind"] == ["failed"] * 4 and encoder.failed_in_a_row == 1  # one file
    out = encoder(of([9] * 4, range(4, 8)))  # more of its clips: failed as it did, not encoded, not counted
    assert out["kind"] == ["failed"] * 4 and set(out["info"]) == {"encoding failed on clip 0: Failed to find C "
                                                                  "compiler"} and encoder.failed_in_a_row == 1
    encoder.failed_in_a_row = 3
    encoder.engine.passes_above = -2.0  # every clip runs alone now
    assert encoder(of([20, 21, 22, 23]))["kind"] == ["tokens"] * 4 and encoder.failed_in_a_row == 0
    broken = {**of([30, 31, 32, 33]), "data": [b"\0" * 3] + clips["data"][1:]}  # a clip not of the job's shape
    assert encoder(broken)["kind"] == ["stop"]

    encoder = ClipEncoder(LOAD, SETTINGS, batch_size=4)  # (files 0 and 1 not failed before)
    encoder.engine, encoder.failed_in_a_row = _FailsEveryClip(encoder.engine), 3
    out = encoder(of([0, 1, 0, 1], [0, 0, 1, 1]))  # file 0 fails (the 4th), file 1 (the 5th) stops the job
    assert out["kind"] == ["failed", "stop"] and out["file"][0] == 0
    out_dir = tmp_path / "out"
    todo = [(videos["good"] / "long.mp4", out_dir / "long.safetensors"), (videos["good"] / "one.mp4",
                                                                          out_dir / "one.safetensors")]  # fmt: skip
    rows = [dict(zip(out, values, strict=True)) for values in zip(*out.values(), strict=True)]
    summary = Summary()
    with Manifest(out_dir / MANIFEST_NAME, summary) as manifest:
        assembly = _Assembly(LOAD(), "auto", "cpu", SETTINGS, todo, manifest, _progress(len(todo), "file"))
        with pytest.raises(RuntimeError, match=r"^the Ray job stopped: RuntimeError: giving up after 5 clip\(s\)"):
            _collect(_Rows(rows), assembly, decode_retries=2, actor_restarts=8)
    lines = read_manifest(out_dir / MANIFEST_NAME)  # the file of the clip reported before the stop failed
    assert [(r["status"], r["reason"]) for r in lines[:1]] == [("failed", "encoding failed on clip 0: Failed to "
                                                                          "find C compiler")]  # fmt: skip
    assert lines[1]["status"] == "not-encoded"
    assert lines[1]["reason"].startswith("not encoded: the job stopped (RuntimeError: giving up after 5 clip(s)")


def test_an_encode_worker_refuses_a_model_other_than_the_job_records():
    """The clips come cast to the job's dtype, which the token files record: a worker whose model was loaded in
    another dtype would read other pixels (wrong tokens, nothing failed)."""
    job = torch.bfloat16  # (the driver's)
    ClipEncoder(functools.partial(LOAD, dtype=torch.bfloat16), SETTINGS, dtype=job)  # the same: loads
    with pytest.raises(ValueError, match=r"^the encode worker's model differs from what the job's token files "
                                         r"record: dtype float16 \(the job's: bfloat16\)$"):  # fmt: skip
        ClipEncoder(functools.partial(LOAD, dtype=torch.float16), SETTINGS, dtype=job)


def test_the_rows_after_a_clip_that_failed_are_no_duplicates(videos, tmp_path):
    """A batch gives its end rows first, then its clips' results: a file's other clips after one that failed are
    passed over, not counted as duplicates of retried work (nothing was retried)."""
    out = ClipEncoder(LOAD, SETTINGS, batch_size=8)(clip_batch([videos["good"] / "long.mp4"], SETTINGS, torch.float32))
    rows = [dict(zip(out, values, strict=True)) for values in zip(*out.values(), strict=True)]
    assert [r["kind"] for r in rows] == ["end"] + ["tokens"] * 6
    rows[2] = {**rows[2], "kind": "failed", "info": "encoding failed on clip 1: boom"}
    summary = Summary()
    todo = [(videos["good"] / "long.mp4", tmp_path / "long.safetensors")]
    with Manifest(tmp_path / MANIFEST_NAME, summary) as manifest:
        assembly = _Assembly(LOAD(), "auto", "cpu", SETTINGS, todo, manifest, _progress(1, "file"))
        _collect(_Rows(rows), assembly, decode_retries=2, actor_restarts=8)
    assert summary.failed == [(str(todo[0][0]), "encoding failed on clip 1: boom")] and summary.duplicates == 0


def test_a_ray_job_records_the_placement_its_decode_tasks_take(videos, tmp_path, monkeypatch):
    """Ray's decode tasks resize every frame on the CPU. For CUDA actors the token files say preprocessing "cpu",
    not the "auto" a run on one machine records, which resizes ordinary sources on the GPU (tokens a little
    different): each run's resume redoes the other's files. On CPU actors "auto" is "cpu" either way."""
    model = LOAD()
    on_one_machine = made_with(model, "auto", SETTINGS, device="cuda")
    on_ray = made_with(model, "auto", settings_on_ray(SETTINGS, "cuda"), device="cuda")
    assert SETTINGS.preprocess == "auto" and on_one_machine["preprocess"] == "auto" and on_ray["preprocess"] == "cpu"
    assert settings_on_ray(SETTINGS, "cpu") == SETTINGS
    forced = dataclasses.replace(SETTINGS, preprocess="cpu")
    assert settings_on_ray(forced, "cuda:0") == forced
    ran = []  # what a job for CUDA actors plans and runs with (the job itself stood in for: no GPU here)
    monkeypatch.setattr(distributed, "_run_job", lambda *args, **kwargs: ran.append(args[3]))
    encode_dataset(model, [(videos["good"] / "one.mp4", "one")], tmp_path / "out", SETTINGS, device="cuda")
    assert [settings.preprocess for settings in ran] == ["cpu"]


def test_a_jobs_summary_lists_files_in_the_inputs_order(videos, tmp_path, monkeypatch):
    """Files end in any order on a cluster; the summary says them in the inputs' order, as one machine's does."""
    files = [(videos["good"] / n, Path(n).stem) for n in ("one.mp4", "two.mp4", "long.mp4", "short.mp4")]

    def ended_backwards(ray_address, load_model, model, settings, todo, manifest, writes, **options):
        for i, (path, out) in reversed(list(enumerate(todo))):
            manifest.failed(path, out, "no") if i % 2 else manifest.done(path, out, 1)

    monkeypatch.setattr(distributed, "_run_job", ended_backwards)
    summary = encode_dataset(LOAD(), files, tmp_path / "out", SETTINGS, device="cpu")
    assert summary.done == [str(files[0][0]), str(files[2][0])]
    assert [path for path, _ in summary.failed] == [str(files[1][0]), str(files[3][0])]


def test_workers_rebuild_the_model_in_its_precision_and_backend():
    """A worker's model is the driver's, down to the backend the token files record (a "torch" model's workers
    ran the default, Triton on CUDA, under the driver's record of "torch")."""
    model = LOAD(backend="torch")
    model.precision = "fp8"
    rebuilt = model_loader(model)(device="cpu")
    assert rebuilt.precision == "fp8" and rebuilt.weights_digest == model.weights_digest
    assert rebuilt.backend == "torch" and model_loader(LOAD())(device="cpu").backend == "auto"
    # FP8 runs in the decoder only: an encode worker on a CPU encodes as in the default precision
    assert ClipEncoder(model_loader(model), SETTINGS).model.precision == "fp8"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_on_the_gpu_gives_the_engine_tokens(videos, dtype):
    load = functools.partial(random_tokenizer, "tiny", seed=0, dtype=dtype)
    batch = clip_batch([videos["good"] / "long.mp4", videos["good"] / "odd.mkv"], SETTINGS, dtype)
    out = ClipEncoder(load, SETTINGS, device="cuda", batch_size=16)(batch)
    engine = Engine(load(device="cuda"), max_clips=16)  # the same batches: the same tokens, in bf16 too
    items = ((k, normalize_pixels(c, dtype), 8) for k, c in enumerate(clips_of(batch, dtype)))
    expected = [indices for _, (_, indices) in engine.encode_stream(items)]
    tokens = tokens_of(out)
    assert len(tokens) == 11 and all(torch.equal(a, b.cpu().int()) for a, b in zip(tokens, expected, strict=True))


@pytest.mark.parametrize("server", ["silent", "closes", "tls", "http2", "ray", "tls-cluster"])
def test_a_ray_address_is_refused_unless_what_answers_there_speaks_grpc(server, monkeypatch, request):
    """A Ray cluster's GCS answers HTTP/2's preface with a SETTINGS frame at once. A listener that says nothing (a
    port forward with nothing behind it), one that closes at once, or a TLS server was left to Ray, which retried
    it for minutes: each is now refused in one line, without Ray. Where Ray speaks TLS (RAY_USE_TLS=1), a
    cluster's GCS is such a server: what answers the preface in the clear other than with text is left to Ray."""
    import socket

    ray = pytest.importorskip("ray")
    if server == "ray":
        address = request.getfixturevalue("cluster")["address"]
        monkeypatch.setattr(ray, "is_initialized", lambda: False)  # (else the address is not asked)
        distributed.check_ray_address(address)  # (a real cluster's GCS)
        return
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # (the module's cluster: the address is then not asked)
    monkeypatch.setattr(distributed, "PROBE_SECONDS", 0.5)
    if server == "tls-cluster":
        monkeypatch.setenv("RAY_USE_TLS", "1")
    answers = {"silent": None, "closes": b"", "tls": b"\x15\x03\x03\x00\x02\x02\x46",
               "tls-cluster": b"\x15\x03\x03\x00\x02\x02\x46",
               "http2": b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64"}  # fmt: skip
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve():
        connection, _ = listener.accept()
        with connection:
            if answers[server] is not None:
                connection.sendall(answers[server])
            if server != "closes":
                done.wait(10)

    threading.Thread(target=serve, daemon=True).start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    said = {"silent": r"nothing answered there in 0.5 s, or the connection was closed \(a port forward with nothing",
            "closes": r"nothing answered there in 0.5 s, or the connection was closed",
            "tls": r"something other than a Ray cluster answers there \(another protocol: 15 03 03 00 02 02 46, TLS"}
    try:
        if server in ("http2", "tls-cluster"):
            distributed.check_ray_address(address)  # (a gRPC server: left to Ray)
        else:
            with pytest.raises(ValueError, match=rf"^--ray {address}: {said[server]}.*; the cluster's is the one "
                                                 r"`ray start --head` prints, 6379 unless --port said otherwise$"):
                distributed.check_ray_address(address)
    finally:
        done.set()
        listener.close()


def test_an_input_through_a_link_and_dotdot_is_read_on_ray_as_on_one_machine(videos, cluster, tmp_path):
    """``link/../x.mp4`` (link leading to real/sub) is real/x.mp4 for the kernel: the Ray job read x.mp4 beside link
    instead (its path made absolute by its text, for the decode tasks), and wrote other tokens than one machine."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    os.symlink(tmp_path / "real" / "sub", tmp_path / "link")
    shutil.copy(videos["good"] / "long.mp4", tmp_path / "real" / "x.mp4")  # 6 clips
    shutil.copy(videos["good"] / "one.mp4", tmp_path / "x.mp4")  # 1 clip
    files = [(f"{tmp_path}/link/../x.mp4", "x")]
    model = LOAD()
    encode_files(model, Engine(model), files, tmp_path / "single", SETTINGS)
    with failing_after(120, "the job did not end"):
        summary = encode_dataset(LOAD(), files, tmp_path / "ray", SETTINGS, device="cpu")
    assert summary.clips == 6 and not summary.failed
    assert (tmp_path / "ray" / "x.safetensors").read_bytes() == (tmp_path / "single" / "x.safetensors").read_bytes()
