"""benchmarks/targets.py reads a GPU session's logs into the targets table: met, missed, or not measured."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import pytest  # noqa: E402
from targets import main, report  # noqa: E402


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(text: str) -> dict[str, tuple[str, str]]:
    cells = [line.strip("|").split(" | ") for line in text.splitlines()[2:] if line.startswith("| ")]
    return {c[0].strip(): (c[1].strip(), c[2].strip()) for c in cells}


def test_targets_are_met_missed_or_not_measured(tmp_path):
    case = "kernel-attention-encoder-16q4kv"
    _write(tmp_path / "kernels.jsonl", [
        {"case": case, "provider": "fa2_alone", "tflops_per_s": 300.0},
        {"case": case, "provider": "titok", "tflops_per_s": 400.0},
        {"case": case, "provider": "titok", "tflops_per_s": 460.0},  # a later run of the case replaces the first
    ])  # fmt: skip

    def clips(stage, batch, provider, value):
        return {"case": f"gpu-{stage}-v1-20x192x192-n256-b{batch}", "provider": provider, "clips_per_s": value}

    _write(tmp_path / "encode.jsonl", [
        clips("encode", 1, "upstream-packed", 100.0), clips("encode", 1, "auto", 290.0),
        clips("encode", 1, "eager", 200.0), clips("encode", 32, "auto", 860.0),
    ])  # fmt: skip
    _write(tmp_path / "fp8.jsonl", [clips("decode", 32, "auto", 900.0), clips("decode", 32, "fp8", 1200.0)])
    (tmp_path / "parity.txt").write_text(
        "| v1 | reference | bf16 | 97.50% of 7680 tokens equal the fp32 oracle |\n"
        "| v1 | triton+fp8 | bf16 | 96.00% of 7680 tokens equal the fp32 oracle |\n"
    )
    _write(tmp_path / "pipeline.jsonl", [
        {"source": "before 720p30", "cpu_s_per_clip": 0.50, "clips_per_s": 20.0},
        {"source": "after 720p30", "cpu_s_per_clip": 0.25, "clips_per_s": 35.0},
        {"source": "after 256p8", "clips_per_s": 50.0, "model_only_clips_per_s": 100.0},
    ])  # fmt: skip
    rows = _rows(report(tmp_path))
    assert rows["attention (encoder) >= 450 TFLOP/s"] == ("460.00 TFLOP/s", "**met**")
    assert rows["attention (encoder) >= 1.3x FlashAttention-2 alone"] == ("1.53x", "**met**")
    assert rows["attention (decoder) >= 450 TFLOP/s"] == ("not measured", "-")
    assert rows["encode b1 >= 3.0x upstream-packed"] == ("2.90x", "**missed**")
    assert rows["auto >= 1.3x eager, encode b1"] == ("1.45x", "**met**")
    assert rows["auto >= 1.0x eager, encode b32"] == ("not measured", "-")  # no eager row at b32
    assert rows["encode b32, 256 tokens >= 850 clips/s (H200)"] == ("860.00 clips/s", "**met**")
    assert rows["fp8 >= 1.3x bf16 (auto), decode b32"] == ("1.33x", "**met**")
    assert "fp8 >= 1.3x bf16 (auto), encode b32" not in rows  # FP8 runs in the decoder only
    assert rows["fp8 tokens within 1 point of the bf16 floor"] == ("96.00% vs 97.50% (-1.50 points)", "**missed**")
    assert rows["720p30: CPU-s per clip <= 0.6x before"] == ("0.250 vs 0.500 (0.50x)", "**met**")
    assert rows["256p8 end to end >= 60% of model-only clips/s"] == ("50%", "**missed**")
    assert rows["NVDEC 720p30 end to end >= 2x before"] == ("not measured", "-")


def test_an_empty_folder_measures_nothing(tmp_path):
    assert {verdict for _, verdict in _rows(report(tmp_path)).values()} == {"-"}


def _clips(stage, batch, provider, value, **more):
    return {"case": f"gpu-{stage}-v1-20x192x192-n256-b{batch}", "provider": provider, "clips_per_s": value, **more}


def test_ratios_never_mix_runs(tmp_path):
    """The fp8 run's auto row (another process) must not stand in for the encode run's: each ratio within one log."""
    _write(tmp_path / "encode.jsonl", [_clips("encode", 32, "auto", 700.0), _clips("encode", 32, "eager", 720.0),
                                       _clips("encode", 32, "upstream-packed", 300.0)])  # fmt: skip
    _write(tmp_path / "fp8.jsonl", [_clips("encode", 32, "auto", 900.0), _clips("decode", 32, "auto", 900.0),
                                    _clips("decode", 32, "fp8", 1000.0)])  # fmt: skip
    rows = _rows(report(tmp_path))
    assert rows["encode b32 >= 2.5x upstream-packed"] == ("2.33x", "**missed**")
    assert rows["encode b32, 256 tokens >= 850 clips/s (H200)"] == ("700.00 clips/s", "**missed**")
    assert rows["auto >= 1.0x eager, encode b32"] == ("0.97x", "**missed**")
    assert rows["fp8 >= 1.3x bf16 (auto), decode b32"] == ("1.11x", "**missed**")  # against fp8.jsonl's own auto
    for card, verdict in (("NVIDIA H100 80GB HBM3", "not judged (an H200 target; measured on NVIDIA H100 80GB HBM3)"),
                          ("NVIDIA H200", "**missed**")):  # fmt: skip
        _write(tmp_path / "encode.jsonl", [_clips("encode", 32, "auto", 700.0, device=card)])
        assert _rows(report(tmp_path))["encode b32, 256 tokens >= 850 clips/s (H200)"] == ("700.00 clips/s", verdict)


def test_auto_below_eager_on_eagers_own_path_within_the_rounds_spread_is_met(tmp_path):
    """Where auto ran every batch eager (the bench's ``ran``: the same code), a ratio below 1 is the rounds' noise:
    met when the two rows' timed rounds overlap; judged by the number when they do not, or when auto ran another
    path."""
    _write(tmp_path / "encode.jsonl", [
        _clips("encode", 32, "eager", 700.0, ms_min=45.3, ms_max=47.2, ran="eager"),
        _clips("encode", 32, "auto", 680.0, ms_min=47.1, ms_max=47.9, ran="eager"),
        _clips("encode", 8, "eager", 700.0, ms_min=11.0, ms_max=11.2, ran="eager"),
        _clips("encode", 8, "auto", 650.0, ms_min=12.0, ms_max=12.3, ran="eager"),  # apart: the number
    ])  # fmt: skip
    _write(tmp_path / "decode.jsonl", [
        _clips("decode", 1, "eager", 176.0, ms_min=5.5, ms_max=5.9, ran="eager"),
        _clips("decode", 1, "auto", 170.0, ms_min=5.7, ms_max=6.1, ran="layout"),  # another path: the number
    ])  # fmt: skip
    rows = _rows(report(tmp_path))
    assert rows["auto >= 1.0x eager, encode b32"] == (
        "0.97x (auto ran eager's path; rounds 47.10-47.90 vs 45.30-47.20 ms)",
        "**met** (same path, within the rounds' spread)",
    )
    assert rows["auto >= 1.0x eager, encode b8"] == ("0.93x", "**missed**")
    assert rows["auto >= 1.0x eager, decode b1"] == ("0.97x", "**missed**")


def test_a_ratio_takes_both_numbers_from_the_latest_run_that_measured_both(tmp_path):
    _write(tmp_path / "encode.jsonl", [
        _clips("encode", 32, "upstream-packed", 300.0, run="a"), _clips("encode", 32, "auto", 780.0, run="a"),
        _clips("encode", 32, "upstream-packed", 250.0, run="b"), _clips("encode", 32, "auto", 900.0, run="b"),
        _clips("encode", 32, "upstream-packed", 400.0, run="c"),  # cut short before auto ran
    ])  # fmt: skip
    _write(tmp_path / "decode.jsonl", [_clips("decode", 32, "upstream-packed", 100.0, run="a"),
                                       _clips("decode", 32, "auto", 300.0, run="b")])  # fmt: skip
    rows = _rows(report(tmp_path))
    assert rows["encode b32 >= 2.5x upstream-packed"] == ("3.60x", "**met**")  # run b: 900 / 250
    assert rows["decode b32 >= 2.0x upstream-packed"] == ("not measured", "-")  # no run measured both


def test_fp8_agreement_prints_the_signed_difference_to_the_floor(tmp_path):
    def parity(fp8):
        (tmp_path / "parity.txt").write_text(
            "| v1 | reference | bf16 | 97.50% of 7680 tokens equal the fp32 oracle |\n"
            f"| v1 | triton+fp8 | bf16 | {fp8:.2f}% of 7680 tokens equal the fp32 oracle |\n"
        )
        return _rows(report(tmp_path))["fp8 tokens within 1 point of the bf16 floor"]

    assert parity(96.60) == ("96.60% vs 97.50% (-0.90 points)", "**met**")
    assert parity(97.80) == ("97.80% vs 97.50% (+0.30 points)", "**met**")
    assert parity(96.40) == ("96.40% vs 97.50% (-1.10 points)", "**missed**")


def test_what_a_step_cut_off_by_its_time_limit_left_still_counts(tmp_path, capsys):
    """A step killed mid-write leaves a partial last line (left out, with a note) and, for the parity script, its
    seed lines without the table (their mean stands in)."""
    path = tmp_path / "encode.jsonl"
    _write(path, [_clips("encode", 32, "upstream-packed", 300.0), _clips("encode", 32, "auto", 780.0)])
    path.write_text(path.read_text() + '{"case": "gpu-encode-v1-20x192x192-n256-b32", "provider": "eag')
    (tmp_path / "parity.txt").write_text(
        "seed 0: reference 97.00% 49.0 dB, reference-sdpa 96.90% 49.0 dB, triton 96.80% 49.0 dB, triton+fp8 80.00% "
        "36.0 dB (of 480 tokens)\n"
        "seed 1: reference 98.00% 49.0 dB, reference-sdpa 97.90% 49.0 dB, triton 97.80% 49.0 dB, triton+fp8 82.00% "
        "36.0 dB (of 480 tokens)\nseed 2: refer"
    )
    rows = _rows(report(tmp_path))
    assert rows["encode b32 >= 2.5x upstream-packed"] == ("2.60x", "**met**")
    assert rows["fp8 tokens within 1 point of the bf16 floor"] == ("81.00% vs 97.50% (-16.50 points)", "**missed**")
    assert f"{path}:3: not a JSON object (cut off?), left out" in capsys.readouterr().err


def test_an_nvdec_row_decoded_on_the_cpu_does_not_measure_nvdec(tmp_path):
    def nvdec(decoded_by):
        _write(tmp_path / "pipeline.jsonl", [
            {"source": "before 720p30", "cpu_s_per_clip": 0.50, "clips_per_s": 20.0, "decoded_by": "cpu"},
            {"source": "nvdec 720p30", "clips_per_s": 45.0, "decoded_by": decoded_by},
        ])  # fmt: skip
        return _rows(report(tmp_path))["NVDEC 720p30 end to end >= 2x before"]

    assert nvdec("nvdec") == ("2.25x", "**met**")
    assert nvdec("cpu") == ("not measured (decoded by cpu)", "-")  # every file fell back: PyAV's speed, not NVDEC's
    assert nvdec("cpu,nvdec") == ("not measured (decoded by cpu,nvdec)", "-")


def test_the_256p8_aim_is_judged_for_the_default_decoder_and_for_nvdec(tmp_path):
    def rows(decoded_by):
        _write(tmp_path / "pipeline.jsonl", [
            {"source": "after 256p8", "clips_per_s": 120.0, "model_only_clips_per_s": 700.0, "decoded_by": "cpu"},
            {"source": "nvdec 256p8", "clips_per_s": 490.0, "model_only_clips_per_s": 700.0,
             "decoded_by": decoded_by},
        ])  # fmt: skip
        got = _rows(report(tmp_path))
        return got["256p8 end to end >= 60% of model-only clips/s"], got[
            "256p8 end to end, --decoder nvdec >= 60% of model-only clips/s"
        ]

    assert rows("nvdec") == (("17%", "**missed**"), ("70%", "**met**"))
    assert rows("cpu") == (("17%", "**missed**"), ("not measured (decoded by cpu)", "-"))


def test_a_log_of_several_sessions_is_judged_on_its_latest_session_alone(tmp_path):
    """gpu_session.sh without $OUT appends every session to gpu-results/: a session whose "before" row was cut off
    must not be divided by an earlier session's (another card's), and the table says where its rows came from."""
    _write(tmp_path / "pipeline.jsonl", [
        {"source": "before 720p30", "cpu_s_per_clip": 0.90, "clips_per_s": 5.0, "session": "s1", "gpu": "H200"},
        {"source": "after 720p30", "cpu_s_per_clip": 0.40, "clips_per_s": 40.0, "session": "s1", "gpu": "H200"},
        {"source": "after 720p30", "cpu_s_per_clip": 0.30, "clips_per_s": 50.0, "session": "s2", "gpu": "H100",
         "commit": "abc1234"},
        {"source": "nvdec 720p30", "clips_per_s": 30.0, "decoded_by": "nvdec", "session": "s2", "gpu": "H100",
         "commit": "abc1234"},
    ])  # fmt: skip
    text = report(tmp_path)
    rows = _rows(text)
    assert rows["720p30: CPU-s per clip <= 0.6x before"] == ("not measured", "-")  # s1's "before" is not s2's
    assert rows["NVDEC 720p30 end to end >= 2x before"] == ("not measured", "-")
    assert "- pipeline: 2 rows of session s2 (H100, commit abc1234)" in text.splitlines()
    _write(tmp_path / "pipeline.jsonl", [  # rows of a benchmark run by hand (no session): one session of their own
        {"source": "before 720p30", "cpu_s_per_clip": 0.50, "clips_per_s": 20.0},
        {"source": "after 720p30", "cpu_s_per_clip": 0.25, "clips_per_s": 35.0},
    ])  # fmt: skip
    assert _rows(report(tmp_path))["720p30: CPU-s per clip <= 0.6x before"] == ("0.250 vs 0.500 (0.50x)", "**met**")


def test_the_attention_rate_comes_from_the_run_of_its_ratio(tmp_path):
    case = "kernel-attention-encoder-16q4kv"
    _write(tmp_path / "kernels.jsonl", [
        {"case": case, "provider": "fa2_alone", "tflops_per_s": 200.0, "run": "a"},
        {"case": case, "provider": "titok", "tflops_per_s": 300.0, "run": "a"},
        {"case": case, "provider": "titok", "tflops_per_s": 460.0, "run": "b"},  # its FA2 row cut off
    ])  # fmt: skip
    rows = _rows(report(tmp_path))
    assert rows["attention (encoder) >= 450 TFLOP/s"] == ("300.00 TFLOP/s", "**missed**")
    assert rows["attention (encoder) >= 1.3x FlashAttention-2 alone"] == ("1.50x", "**met**")
    _write(tmp_path / "kernels.jsonl", [{"case": case, "provider": "titok", "tflops_per_s": 460.0, "run": "b"}])
    assert _rows(report(tmp_path))["attention (encoder) >= 450 TFLOP/s"] == ("460.00 TFLOP/s", "**met**")


def test_a_miss_is_never_shown_as_its_goal(tmp_path):
    _write(tmp_path / "encode.jsonl", [_clips("encode", 1, "upstream-packed", 100.0),
                                       _clips("encode", 1, "auto", 299.6), _clips("encode", 1, "eager", 230.0)])
    _write(tmp_path / "pipeline.jsonl", [
        {"source": "before 720p30", "cpu_s_per_clip": 0.5, "clips_per_s": 20.0},
        {"source": "after 720p30", "cpu_s_per_clip": 0.3002, "clips_per_s": 35.0},
        {"source": "after 256p8", "clips_per_s": 59.6, "model_only_clips_per_s": 100.0},
    ])  # fmt: skip
    rows = _rows(report(tmp_path))
    assert rows["encode b1 >= 3.0x upstream-packed"] == ("2.996x", "**missed**")
    assert rows["auto >= 1.3x eager, encode b1"] == ("1.303x", "**met**")  # (1.3026: a digit more, as for a miss)
    assert rows["720p30: CPU-s per clip <= 0.6x before"] == ("0.300 vs 0.500 (0.6004x)", "**missed**")
    assert rows["256p8 end to end >= 60% of model-only clips/s"] == ("59.6%", "**missed**")


def test_fp8_in_the_decoder_alone_meets_the_token_aim_trivially_and_reports_its_pixels(tmp_path):
    """FP8 runs in the decoder only: its tokens are the bf16 path's, so the token aim says nothing of FP8 and the
    table says so; what FP8 changes, the decoded pixels, is reported beside bf16's."""
    (tmp_path / "parity.txt").write_text(
        "| v1 | reference | bf16 | 96.15% of 1920 tokens equal the fp32 oracle | decoded: 49.5 dB PSNR, 0.1% |\n"
        "| v1 | triton | bf16 | 96.20% of 1920 tokens equal the fp32 oracle | decoded: 49.5 dB PSNR, 0.1% |\n"
        "| v1 | triton+fp8 | bf16 | 96.20% of 1920 tokens equal the fp32 oracle | decoded: 36.2 dB PSNR, 1.0% |\n"
    )
    rows = _rows(report(tmp_path))
    assert rows["fp8 tokens within 1 point of the bf16 floor"] == (
        "96.20% vs 96.15% (+0.05 points)", "met, trivially: FP8 is in the decoder only, its tokens are the bf16 path's")
    assert rows["fp8 decoded pixels against the float32 oracle's (no goal stated)"] == (
        "36.2 dB PSNR vs bf16's 49.5 dB", "reported")


def test_only_the_rows_at_the_end_of_a_log_of_the_last_rows_session_are_judged(tmp_path):
    """Rows without a session (a benchmark run by hand, or written before sessions were logged) count as one session
    only while they follow one another: an old session-less row before another session is not this one's, and the
    table names every card it judged."""
    _write(tmp_path / "pipeline.jsonl", [
        {"source": "before 720p30", "cpu_s_per_clip": 0.90, "clips_per_s": 5.0, "gpu": "H200"},  # old, no session
        {"source": "after 720p30", "cpu_s_per_clip": 0.40, "clips_per_s": 40.0, "session": "s2", "gpu": "H100"},
        {"source": "after 720p30", "cpu_s_per_clip": 0.30, "clips_per_s": 50.0, "gpu": "H100"},  # by hand
    ])  # fmt: skip
    text = report(tmp_path)
    assert _rows(text)["720p30: CPU-s per clip <= 0.6x before"] == ("not measured", "-")
    assert "- pipeline: 1 row of session unnamed (H100)" in text.splitlines()
    _write(tmp_path / "pipeline.jsonl", [
        {"source": "before 720p30", "cpu_s_per_clip": 0.90, "clips_per_s": 5.0, "gpu": "H200"},
        {"source": "after 720p30", "cpu_s_per_clip": 0.30, "clips_per_s": 50.0, "gpu": "H100"},
    ])  # fmt: skip
    text = report(tmp_path)  # (both session-less and together: judged together, and both cards said)
    assert "- pipeline: 2 rows of session unnamed (H100/H200)" in text.splitlines()


def test_fp8_tokens_below_the_floor_by_the_bf16_path_itself_are_a_miss(tmp_path):
    (tmp_path / "parity.txt").write_text(
        "| v1 | reference | bf16 | 96.15% of 1920 tokens equal the fp32 oracle |\n"
        "| v1 | triton | bf16 | 93.00% of 1920 tokens equal the fp32 oracle |\n"
        "| v1 | triton+fp8 | bf16 | 93.00% of 1920 tokens equal the fp32 oracle |\n"
    )
    assert _rows(report(tmp_path))["fp8 tokens within 1 point of the bf16 floor"] == (
        "93.00% vs 96.15% (-3.15 points)",
        "**missed** (by the bf16 path itself): FP8 is in the decoder only, its tokens are the bf16 path's")


def test_the_attention_part_alone_is_judged_and_a_missing_folder_is_refused(tmp_path, capsys):
    """A call of the parts attention and profile (no kernels.jsonl) had its attention rows measured and called "not
    measured"; kernels.jsonl, where it has a side's rows, is judged for that side. A folder that is not there was
    judged as one that measured nothing (exit 0), and ``--help`` was taken for a folder."""

    def rows(titok, fa2, side="encoder"):
        case = f"kernel-attention-{side}-16q4kv"
        return [{"case": case, "provider": "fa2_alone", "tflops_per_s": fa2},
                {"case": case, "provider": "titok", "tflops_per_s": titok}]  # fmt: skip

    _write(tmp_path / "attention.jsonl", rows(455.0, 350.0) + rows(300.0, 290.0, "decoder"))
    judged = _rows(report(tmp_path))
    assert judged["attention (encoder) >= 450 TFLOP/s"] == ("455.00 TFLOP/s", "**met**")
    assert judged["attention (decoder) >= 1.3x FlashAttention-2 alone"] == ("1.03x", "**missed**")
    _write(tmp_path / "kernels.jsonl", rows(400.0, 300.0))  # (the encoder's rows only)
    judged = _rows(report(tmp_path))
    assert judged["attention (encoder) >= 450 TFLOP/s"] == ("400.00 TFLOP/s", "**missed**")
    assert judged["attention (decoder) >= 450 TFLOP/s"] == ("300.00 TFLOP/s", "**missed**")
    for argv in (["--help"], [str(tmp_path / "none")]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == (0 if argv == ["--help"] else 2)
    assert "no folder" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 0 and "| attention (encoder) >= 450 TFLOP/s | 400.00" in capsys.readouterr().out


def test_gpu_session_refuses_an_unknown_part_before_any_part_runs(tmp_path):
    """A misspelled part came to light only when the script reached it, after the parts before it had used the
    machine's time (and ``--help`` ran the installs first); the parts it knows are the ones ``part`` runs."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_session.sh"
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path), "PYTHON": "false"}
    ran = subprocess.run(["bash", str(script), "attention", "fusion"], env=env, capture_output=True, text=True)
    assert ran.returncode == 2 and ran.stdout == "", ran
    assert ran.stderr.startswith("unknown part 'fusion': one of tests gpu-tests kernels attention ")
    assert list(tmp_path.iterdir()) == []  # nothing prepared, nothing written
    shown = subprocess.run(["bash", str(script), "--help"], env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.startswith("Everything that needs a GPU") and not shown.stderr
    assert "bash benchmarks/gpu_session.sh targets-model" in shown.stdout and list(tmp_path.iterdir()) == []
    text = script.read_text()
    known = set(re.search(r'PARTS=" ([^"]*) "', text, re.S).group(1).replace("\\\n", "").split())
    labels = re.findall(r"^        ([a-z0-9-]+(?: \| [a-z0-9-]+)*)\)", text, re.M)
    assert known == {name for label in labels for name in label.split(" | ")} - {"-h", "--help"}
