"""What the installed distribution provides: the kernels live inside the package, never as a top-level ``kernels``
module (a PyPI package of that name, which ``transformers`` imports, would clash with it)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

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


def test_the_checkout_itself_imports_its_kernels(tmp_path):
    """A checkout's own ``titok_fast`` folder, imported as such (a script or ``python -m`` run in the checkout with
    a wheel installed, ``PYTHONPATH=.``), has no ``kernels`` folder: every model import failed, "No module named
    'titok_fast.kernels'". Here with no installed package to fall back on (no site folders: ``-S``)."""
    probe = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import importlib.util, titok_fast.kernels as k; "
             "print(k.__file__, importlib.util.find_spec('titok_fast.kernels.fsq').origin)")  # fmt: skip
    result = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(ROOT / "kernels" / "__init__.py"), str(ROOT / "kernels" / "fsq.py")]


IMPORT_NAMES = {"av": "av", "numpy": "numpy", "pyyaml": "yaml", "safetensors": "safetensors", "torch": "torch",
                "tqdm": "tqdm", "triton": "triton", "huggingface_hub": "huggingface_hub"}  # fmt: skip


def test_every_dependency_is_used():
    """Each requirement is imported by the package (no dependency that nothing uses), and the extras are the
    known ones (an extra nothing uses, such as the old ``flash``, fails)."""
    import importlib.metadata
    import re

    dist = importlib.metadata.distribution("titok-fast")
    names = [re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in dist.requires or [] if "extra ==" not in r]
    assert set(dist.metadata.get_all("Provides-Extra") or []) == {"test", "gpu", "plot", "ray", "bench"}
    sources = "\n".join(p.read_text() for d in ("titok_fast", "kernels") for p in (ROOT / d).glob("*.py"))
    for name in names:
        module = IMPORT_NAMES[name]  # a new requirement needs its import name here
        assert re.search(rf"^\s*(import|from) {module}\b", sources, re.M), f"{name} is required but never imported"


WITHOUT_TRITON = """
import hashlib, json, sys
sys.modules["triton"] = None  # as where Triton has no wheel (macOS, Windows): `import triton` fails
import torch
torch.set_num_threads(int(sys.argv[1]))  # the test's: a sum, a matmul may round otherwise with other threads
from titok_fast.kernels import fsq
from titok_fast.loading import random_tokenizer

said = {}
try:
    random_tokenizer("tiny", seed=0, backend="triton")
except ValueError as e:
    said["triton backend"] = str(e)
model = random_tokenizer("tiny", seed=0)
torch.manual_seed(0)
video = [torch.rand(3, 8, 32, 48) * 2 - 1]
_, out = model.encode(video, [16])
recon = model.decode_indices(out["indices"], [(8, 32, 48)])[0]
try:
    fsq._fsq_encoder_head_kernel[(1,)](video[0])
except RuntimeError as e:
    said["kernel"] = str(e)
digest = hashlib.sha256(recon.numpy().tobytes()).hexdigest()
print(json.dumps({"indices": out["indices"][0].tolist(), "recon": digest, "said": said}))
"""


def test_without_triton_the_pytorch_backend_runs_and_the_kernels_say_why_not(tmp_path):
    """Triton has no macOS or Windows wheels, so it is required on Linux only: elsewhere the package must import,
    and the PyTorch backend give the tokens it gives here; the Triton backend and a kernel launch each refuse
    in one line."""
    from titok_fast.loading import random_tokenizer

    threads = str(torch.get_num_threads())
    result = subprocess.run([sys.executable, "-c", WITHOUT_TRITON, threads], cwd=tmp_path, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    model = random_tokenizer("tiny", seed=0)
    torch.manual_seed(0)
    video = [torch.rand(3, 8, 32, 48) * 2 - 1]
    _, out = model.encode(video, [16])
    assert found["indices"] == out["indices"][0].tolist()
    recon = model.decode_indices(out["indices"], [(8, 32, 48)])[0]
    assert found["recon"] == hashlib.sha256(recon.numpy().tobytes()).hexdigest()
    assert found["said"]["triton backend"].startswith("backend 'triton' cannot run: Triton cannot be imported here")
    assert found["said"]["kernel"].startswith("kernel _fsq_encoder_head_kernel: Triton cannot be imported here")


def test_the_version_is_written_once_and_both_ways_of_running_say_it(tmp_path):
    """setup.py takes the version from the package; `titok-fast --version` and `python -m titok_fast --version`
    print the installed distribution's."""
    import importlib.metadata

    import titok_fast

    version = importlib.metadata.version("titok-fast")
    assert version == titok_fast.__version__
    for cmd in ([str(Path(sys.executable).with_name("titok-fast"))], [sys.executable, "-m", "titok_fast"]):
        done = subprocess.run([*cmd, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout) == (0, f"titok-fast {version}\n"), done.stderr
