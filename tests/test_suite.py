"""The suite's own settings (pyproject.toml): a test that hangs ends its process, naming where it hung."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

HANGS = """
import time

def test_passes():
    pass

def test_hangs_here():
    time.sleep(120)
"""


@pytest.mark.skipif(int(pytest.__version__.split(".")[0]) < 9, reason="pytest < 9 has no faulthandler_exit_on_timeout "
                    "(the test extra installs 9 or later)")  # fmt: skip
def test_a_hanging_test_ends_its_process_with_every_threads_stack(tmp_path):
    """Under the project's settings (its timeout cut to 2 s), a test that hangs ends pytest within seconds, with the
    stack of the line it hung on; under the settings as shipped, that limit is minutes, far above any test's time
    (the longest takes about two minutes on 2 cores)."""
    shipped = re.search(r"^faulthandler_timeout = (\d+)$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert shipped and 300 <= int(shipped.group(1)) <= 900
    (tmp_path / "test_hangs.py").write_text(HANGS)
    cmd = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
           "-p", "no:cacheprovider", "-o", "faulthandler_timeout=2", "-q", str(tmp_path / "test_hangs.py")]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "Timeout" in done.stderr and 'test_hangs.py", line 8 in test_hangs_here' in done.stderr, done.stderr
