"""benchmarks/nvdec_scaling.py tells a ``Decode`` that holds the GIL from one that lets it go (run against its
stand-in for PyNvVideoCodec: the real one needs a GPU)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import nvdec_scaling  # noqa: E402


@pytest.mark.parametrize("fake", ["hold", "release"])
def test_the_probe_tells_a_decode_that_holds_the_gil_from_one_that_releases_it(fake, capsys):
    found = nvdec_scaling.main(["--fake", fake, "--threads", "1,4", "--case-seconds", "0.5"])
    rows = {row["case"]: row for row in found}
    assert rows["raw x1"]["frames"] > 0 and rows["raw x4"]["frames"] > 0
    if fake == "hold":  # a loop beside it never runs inside a Decode call
        assert rows["gil"]["gil"].startswith("held") and rows["gil"]["inside"] < 0.1 * rows["gil"]["busy"]
    else:
        assert rows["gil"]["gil"] == "released while decoding"
    assert "| gil | " in capsys.readouterr().out


def test_kept_decoders_are_made_once_a_thread_and_raw_ones_once_a_pass():
    rows = {row["case"]: row for row in nvdec_scaling.main(["--fake", "release", "--threads", "1,3", "--case-seconds",
                                                             "0.5"])}  # fmt: skip
    for threads in (1, 3):
        kept, raw = rows[f"kept x{threads}"], rows[f"raw x{threads}"]
        assert kept["decoders"] == threads and kept["frames"] > threads * nvdec_scaling.FAKE_PACKETS  # passes > 1
        assert raw["decoders"] * nvdec_scaling.FAKE_PACKETS == raw["frames"]  # one for each whole pass
