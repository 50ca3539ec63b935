"""What the installed distribution provides: the kernels live inside the package, never as a top-level ``kernels``
module (a PyPI package of that name, which ``transformers`` imports, would clash with it)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import importlib.metadata, importlib.util, json
import titok_fast.kernels.fsq, titok_fast.kernels.mrope_attention, titok_fast.kernels.nearest_code
spec = importlib.util.find_spec("kernels")
top = importlib.metadata.distribution("titok-fast").read_text("top_level.txt")
print(json.dumps({"kernels": spec and spec.origin, "top_level": top.split(),
                  "fsq": titok_fast.kernels.fsq.__file__}))
"""


def test_no_top_level_kernels_module(tmp_path):
    """Run from outside the checkout, as a user would: the kernels import as ``titok_fast.kernels`` (from the
    repository's ``kernels/`` folder) and nothing named ``kernels`` comes from this distribution."""
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, check=True)
    found = json.loads(result.stdout)
    assert found["top_level"] == ["titok_fast"]
    assert found["kernels"] is None or not Path(found["kernels"]).resolve().is_relative_to(ROOT)
    assert Path(found["fsq"]).resolve() == ROOT / "kernels" / "fsq.py"
