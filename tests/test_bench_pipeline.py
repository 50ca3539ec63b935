"""benchmarks/bench_pipeline.py's stand-in for the model: it takes the clips as the engine does and gives tokens."""

import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_pipeline import StandIn, main  # noqa: E402

from titok_fast.engine import IDLE, Engine
from titok_fast.loading import random_tokenizer


def test_the_stand_in_runs_batches_as_the_engine_takes_them(monkeypatch):
    """Batches of at most ``batch`` clips, one cut short where the stream is idle (the engine runs what it holds),
    each a sleep of its clips at the rate; every clip's tokens come back, zeros of its count, in order."""
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    stand_in = StandIn(Engine(random_tokenizer("tiny", seed=0)), rate=100.0, batch=3)
    items = [(k, None, 8) for k in range(5)]
    results = list(stand_in.encode_stream([*items[:2], IDLE, IDLE, *items[2:]], host=True))
    assert [key for key, _ in results] == list(range(5))
    assert all(torch.equal(indices, torch.zeros(8, dtype=torch.int64)) for _, (_, indices) in results)
    assert slept == pytest.approx([0.02, 0.03])  # 2 clips (idle), then 3 (full)


def test_the_run_goes_on_taking_clips_while_the_stand_in_runs_a_batch(monkeypatch):
    """As the engine on a GPU queues the next batch while one runs, the stand-in's batch runs on a thread of its own:
    slept on the run's thread, taking clips and the model's time added up instead of overlapping."""
    taken_meanwhile, next_taken = [], threading.Event()
    monkeypatch.setattr(time, "sleep", lambda seconds: taken_meanwhile.append(next_taken.wait(10)))

    def items():
        for k in range(4):
            if k == 3:  # the first of the second batch: taken while the first batch runs
                next_taken.set()
            yield k, None, 8

    stand_in = StandIn(Engine(random_tokenizer("tiny", seed=0)), rate=100.0, batch=3)
    assert [key for key, _ in stand_in.encode_stream(items())] == [0, 1, 2, 3]
    assert taken_meanwhile[0] is True


def test_a_stand_in_row_runs_the_whole_path(tmp_path, capsys):
    """--stand-in through the run itself (encode_files), files in and token files out: one row of the table."""
    main(["--videos", str(tmp_path / "videos"), "--sources", "256p8", "--seconds", "2", "--files", "2", "--grid", "4",
          "32", "32", "--tokens", "8", "--batch-size", "4", "--device", "cpu", "--workers", "1", "--stand-in",
          "50"])  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "256p8" in line]
    assert len(rows) == 1 and "| 50.00 |" in rows[0], rows
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    busy = cells[cells.index("50.00") - 1]  # (the model-busy column: the stand-in's sleeps over the wall time)
    assert busy.endswith("%") and 0 < float(busy[:-1]) <= 100, rows


def test_the_stand_in_and_the_reading_side_alone_are_one_or_the_other(tmp_path):
    with pytest.raises(SystemExit, match="--stand-in and --input-only: choose one"):
        main(["--videos", str(tmp_path), "--sources", "256p8", "--seconds", "1", "--input-only", "--stand-in", "50",
              "--device", "cpu"])  # fmt: skip


def test_sources_too_short_for_a_frame_are_refused_before_any_is_written(tmp_path):
    with pytest.raises(SystemExit, match=r"^--seconds 0.1 gives 256p8 no frame at 8 fps; give at least one frame's"):
        main(["--videos", str(tmp_path / "v"), "--sources", "256p8", "--seconds", "0.1", "--input-only"])
    assert not (tmp_path / "v").exists()


def test_logged_rows_name_the_session_that_ran_them(tmp_path, monkeypatch):
    """gpu_session.sh sets $TITOK_BENCH_SESSION for every row it logs (targets.py judges a log's latest session
    alone); a row logged by hand has none."""
    import json

    from bench_pipeline import _log

    log = tmp_path / "pipeline.jsonl"
    monkeypatch.delenv("TITOK_BENCH_SESSION", raising=False)
    _log({"source": "by hand"}, str(log))
    monkeypatch.setenv("TITOK_BENCH_SESSION", "20261206T190000Z-42")
    _log({"source": "after 256p8"}, str(log))
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        {"source": "by hand"}, {"source": "after 256p8", "session": "20261206T190000Z-42"}]
