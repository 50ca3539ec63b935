"""titok_fast.benchreport turns pytest-benchmark JSON into the tables of RESULTS.md."""

import json
import re

import pytest

from titok_fast.benchreport import append_row, table

from helpers import benchmark_json


def rendered(tmp_path, data: dict) -> str:
    """The table of pytest-benchmark JSON ``data``, written to a file as the benchmarks write it."""
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    return table(str(path))


def test_table_has_a_row_per_provider_and_the_ratio_to_the_baseline(tmp_path):
    def bench(group, provider, **info):
        return {"group": group, "extra_info": {"provider": provider, "device": "card", "torch": "x", **info}}

    data = {
        "benchmarks": [
            bench("gpu-encode", "reference", clips_per_s=2.0, tokens_per_s=512.0),
            bench("gpu-encode", "cudagraph", clips_per_s=7.0, tokens_per_s=1792.0, mfu=0.61, peak_mem_gib=3.5),
            bench("attention", "titok", tflops_per_s=410.0),
            bench("attention", "torch_flash", tflops_per_s=300.0),
        ]
    }
    text = rendered(tmp_path, data)
    assert "| cudagraph | 7.00 | 1792 | 61.0% | 3.5 | 3.50x |" in text
    assert "| reference | 2.00 | 512 |  |  | 1.00x |" in text
    assert "| titok | 410.0 | 1.37x |" in text


def test_ratios_divide_rates_by_upstream_packed_never_times(tmp_path):
    """upstream-packed is the baseline wherever it ran; kernel rows carry per-call times (lower is better) beside
    the rate, and the ratio is the rate's."""

    def bench(group, provider, **info):
        return {"group": group, "extra_info": {"provider": provider, **info}}

    data = {
        "benchmarks": [
            bench("cpu-encode", "reference", clips_per_s=1.0),
            bench("cpu-encode", "upstream-packed", clips_per_s=2.0),
            bench("cpu-encode", "torch", clips_per_s=3.0),
            bench("attention", "fa2_alone", ms=0.2, ms_p20=0.19, ms_p80=0.21, tflops_per_s=300.0),
            bench("attention", "titok", ms=0.1, ms_p20=0.09, ms_p80=0.11, tflops_per_s=600.0),
        ]
    }
    text = rendered(tmp_path, data)
    assert "| torch | 3.00 | 1.50x |" in text and "| reference | 1.00 | 0.50x |" in text
    assert "| titok | 0.100 | 0.090 | 0.110 | 600.0 | 2.00x |" in text


def test_a_sweep_divides_by_the_row_its_benchmark_marks_as_the_default_and_says_which(tmp_path):
    """A sweep (bench_kernels.py: block shapes, prologue heads per program) marks its default ``baseline``, wherever
    it comes in the group; the ratio column names the row it divides by."""
    rows = [("titok_prologue[1 heads]", 1000.0, False), ("titok_prologue[4 heads]", 2000.0, True),
            ("titok_prologue[8 heads]", 1800.0, False)]  # fmt: skip
    data = {"benchmarks": [{"group": "heads", "extra_info": {"provider": p, "gb_per_s": g, "baseline": b}}
                           for p, g, b in rows]}  # fmt: skip
    text = rendered(tmp_path, data)
    assert "| provider | GB/s | vs titok_prologue[4 heads] |" in text
    assert "| titok_prologue[1 heads] | 1000 | 0.50x |" in text and "| titok_prologue[4 heads] | 2000 | 1.00x |" in text
    assert "| titok_prologue[8 heads] | 1800 | 0.90x |" in text


def test_a_group_without_a_baseline_has_no_ratio_column(tmp_path):
    """Rows of different work (the pipeline's sources, the compile parts' eager and compile rows) are not divided
    by whichever came first."""
    rows = [("720p30 encode", 4.0), ("256p8 encode", 12.0), ("256p8 input only", 30.0)]
    data = {"benchmarks": [{"group": "pipeline", "extra_info": {"provider": p, "clips_per_s": c}} for p, c in rows]}
    text = rendered(tmp_path, data)
    assert "| provider | clips/s |" in text and "| 256p8 encode | 12.00 |" in text and "x |" not in text


def test_end_to_end_rows_show_the_spread_of_their_timed_rounds(tmp_path):
    """bench_model.py logs the min, max and standard deviation of the timed rounds beside the rates (from the mean)."""

    def bench(provider, clips_per_s, **spread):
        return {"group": "gpu-encode", "extra_info": {"provider": provider, "clips_per_s": clips_per_s, **spread}}

    data = {
        "benchmarks": [
            bench("upstream-packed", 100.0, ms_min=315.2, ms_max=330.9, ms_stddev=6.25),
            bench("auto", 250.0, ms_min=126.0, ms_max=129.5, ms_stddev=1.5),
            bench("older", 50.0),  # a row from before the spread was logged
        ]
    }
    text = rendered(tmp_path, data)
    assert "| provider | clips/s | ms min-max (sd) | vs upstream-packed |" in text
    assert "| upstream-packed | 100.00 | 315.20-330.90 (6.25) | 1.00x |" in text
    assert "| auto | 250.00 | 126.00-129.50 (1.50) | 2.50x |" in text
    assert "| older | 50.00 |  | 0.50x |" in text


def test_a_file_that_is_not_benchmark_json_is_one_error_naming_it(tmp_path):
    path = tmp_path / "r.json"
    for text in ('{"benchmarks": 5}', "[]", '{"benchmarks": [{"group": "g"}]}', "not json"):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: not"):
            table(str(path))


def test_bench_prints_only_the_results_its_own_run_wrote(tmp_path, monkeypatch, capsys):
    from titok_fast import cli

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmarks": [{"group": "LAST-WEEK", "extra_info": {"provider": "x"}}]}))
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: 5)  # a run that selects nothing writes nothing
    assert cli.main(["bench", "-k", "nothing", "--json", str(path)]) == 5
    out, err = capsys.readouterr()
    assert "LAST-WEEK" not in out and f"{path} is an earlier run's: this run wrote no results" in err
    assert err.endswith("titok-fast: no benchmark matches -k 'nothing'\n")

    def writes(cmd):
        today = {"group": "TODAY", "extra_info": {"provider": "x"}}
        benchmark_json(cmd).write_text(json.dumps({"benchmarks": [today]}))
        return 0

    monkeypatch.setattr(cli.subprocess, "call", writes)
    assert cli.main(["bench", "--json", str(path)]) == 0
    assert "TODAY" in capsys.readouterr().out


def test_logged_rows_name_the_session_that_ran_them(tmp_path, monkeypatch):
    """The kernel and model benchmarks append each case as a line; gpu_session.sh's $TITOK_BENCH_SESSION is in
    every line it ran (targets.py judges a log's latest session alone), and a case run by hand has none."""
    log = tmp_path / "kernels.jsonl"
    monkeypatch.delenv("TITOK_BENCH_SESSION", raising=False)
    append_row(log, {"case": "by hand"})
    monkeypatch.setenv("TITOK_BENCH_SESSION", "20261206T190000Z-42")
    append_row(log, {"case": "attention", "run": "r"})
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        {"case": "by hand"}, {"case": "attention", "run": "r", "session": "20261206T190000Z-42"}]
