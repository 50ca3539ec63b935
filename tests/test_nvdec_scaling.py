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
