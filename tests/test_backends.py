"""Backend resolution: per device at call time, one implementation per name."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from titok_fast import TiTok
from titok_fast.backends import TORCH, TRITON, check_backend, resolve_backend


def test_auto_resolves_by_device_at_call_time():
    assert resolve_backend("auto", "cpu") is TORCH
    assert resolve_backend("auto", torch.device("cuda", 1)) is TRITON
    assert resolve_backend("auto", "meta") is TORCH
    assert resolve_backend("torch", "cuda") is TORCH and resolve_backend("triton", "cpu") is TRITON


def test_model_built_on_meta_follows_its_weights_between_devices():
    """Built on meta, then moved: the backend follows the weights. CUDA without a GPU: fake tensors report it."""
    with torch.device("meta"):
        model = TiTok("tiny")
    assert model.active_backend is TORCH
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cuda")
        assert model.device.type == "cuda" and model.active_backend is TRITON
    with torch.device("meta"):
        model = TiTok("tiny")
    model.to_empty(device="cpu")
    assert model.active_backend is TORCH
    model.backend = "triton"
    assert model.active_backend is TRITON  # forced: the interpreter on a CPU


def test_reference_backend_is_gone_with_a_pointer():
    with pytest.raises(ValueError, match="ReferenceTiTok"):
        TiTok("tiny", backend="reference")
    with pytest.raises(ValueError, match="not one of"):
        check_backend("cuda")
    model = TiTok("tiny", backend="torch")
    model.backend = "triton"
    assert model.active_backend is TRITON and model.backend == "triton"
    with pytest.raises(ValueError, match="ReferenceTiTok"):
        model.backend = "reference"


def test_a_call_that_cannot_run_on_its_weights_is_refused_in_one_line(monkeypatch):
    """A model on meta gave meta tensors back (no values; they failed later, elsewhere), and the Triton kernels on a
    CPU outside the interpreter failed inside Triton ("0 active drivers"); resolving the backend still works."""
    import triton

    from titok_fast import Engine

    video = torch.rand(3, 4, 8, 8) * 2 - 1
    with torch.device("meta"):
        shell = TiTok("tiny")
    assert shell.active_backend is TORCH
    for call in (lambda: shell.encode([video], [3]), lambda: Engine(shell).encode([video], [3]),
                 lambda: shell.decode_indices((torch.tensor([1, 2, 3]),), [(4, 8, 8)])):  # fmt: skip
        with pytest.raises(ValueError, match=r"^the model's weights are on the meta device \(shapes only\); give"):
            call()
    model = TiTok("tiny", backend="triton")
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    assert model.active_backend is TRITON
    with pytest.raises(ValueError, match="^backend 'triton' runs on CUDA, or on a CPU in the Triton interpreter"):
        model.encode([video], [3])
    with pytest.raises(TypeError, match="model is a str; expected a TiTok"):
        Engine("tiny")

