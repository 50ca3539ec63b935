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
