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
    scaling = rows["raw x4"]["frames_per_s"] / rows["raw x1"]["frames_per_s"]
    if fake == "hold":  # a loop beside it never runs inside a Decode call, and 4 threads decode as fast as 1
        assert rows["gil"]["gil"].startswith("held") and rows["gil"]["inside"] < 0.1 * rows["gil"]["busy"]
        assert scaling < 1.6
    else:
        assert rows["gil"]["gil"] == "released while decoding" and scaling > 2
    assert "| gil | " in capsys.readouterr().out
