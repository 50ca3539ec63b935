"""benchmarks/nvdec_parity.py: on the CPU, NVDEC's frames made from PyAV's planes give the CPU decoder's tokens."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import nvdec_parity  # noqa: E402


def test_nvdec_tokens_are_the_cpu_decoders(tmp_path, capsys):
    rows = nvdec_parity.main(["--sources", "256p8", "--seconds", "2.5", "--videos", str(tmp_path), "--grid", "8",
                              "64", "96", "--tokens", "32"])  # fmt: skip
    (row,) = rows
    assert row["clips"] == 2 and row["tokens"] == 64 and row["max_rgb_levels"] == 0
    assert row["fp32, nvdec"] == 1.0 and row["bf16, nvdec"] == row["bf16, cpu decoder"]
    assert "| 256p8 | 2 | 64 |" in capsys.readouterr().out
