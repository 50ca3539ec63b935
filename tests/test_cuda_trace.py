"""What torch.compile traces of the model on CUDA, checked without a GPU: the fixed-shape encode and decode (the
engine's ``compile`` mode: ``fullgraph=True``, ``dynamic=False``) traced by Dynamo on fake CUDA tensors, through the
Triton backend's ops as a GPU runs them. A call Dynamo cannot trace in a branch taken on CUDA only would otherwise
show first on a GPU; run under the GPU machine's torch version (``make gpu-versions``), this is where a version
difference shows (torch 2.11's Dynamo refused the autocast check that 2.13's folds). Fake CUDA tensors need a CUDA
build of torch (it runs on a CPU): with the CPU build this file skips."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from titok_fast import fp8
from titok_fast.backends import TRITON
from titok_fast.engine import Engine
from titok_fast.model import TiTok

pytestmark = [pytest.mark.cuda_build, pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="needs a CUDA "
              "build of torch (fake CUDA tensors; no GPU needed): make gpu-versions")]  # fmt: skip


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test traces anew, as an engine's runners do (a code object each): not on what an earlier test's shapes
    made Dynamo guess was dynamic."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def fake_cuda_model(config: str, dtype: torch.dtype, precision: str, fake: FakeTensorMode) -> TiTok:
    """A model with fake weights on CUDA (shapes and dtypes only): built on meta, given fake CUDA storage."""
    with torch.device("meta"):
        model = TiTok(config, precision=precision).to(dtype)
    with fake:
        return model.to_empty(device="cuda")


@pytest.mark.parametrize(("config", "dtype", "precision"), [
    ("tiny", torch.float32, "default"), ("tiny", torch.bfloat16, "default"), ("v1", torch.bfloat16, "default"),
    ("v1", torch.bfloat16, "fp8"),
])  # fmt: skip
def test_the_fixed_shape_model_traces_whole_on_cuda(config, dtype, precision):
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    model = fake_cuda_model(config, dtype, precision, fake)
    with fake:
        assert model.device.type == "cuda" and model.encoder.runtime.runner(model.device) is TRITON
        budget, engine = 4096, Engine(model, mode="compile", max_clips=8)  # (the engine's own buffers)
        model.fsq_constants()  # (filled before tracing, as the engine does, and the FP8 weights made)
        fp8.refresh(model)
        encoding = engine._static_buffers("encode", budget)
        encode = torch.compile(model.encode_static, backend="eager", dynamic=False, fullgraph=True)
        codes, indices = encode(encoding.inputs, encoding.batch)
        assert codes.shape == (budget, len(model.config.fsq_levels)) and indices.shape == (budget,)
        decoding = engine._static_buffers("decode", budget)
        decode = torch.compile(model.decode_static, backend="eager", dynamic=False, fullgraph=True)
        rows = decode(decoding.inputs, decoding.batch, *engine._decoder_table())
        assert rows.shape == (budget, model.config.patch_dim) and rows.device.type == "cuda"


@pytest.mark.parametrize(("config", "precision"), [("tiny", "default"), ("v1", "default"), ("v1", "fp8")])
def test_the_packed_path_runs_on_cuda(config, precision):
    """The packed encode and decode (``eager`` mode, and what ``auto``'s layout graphs capture) run their CUDA
    branches, through the Triton backend's ops, on fake CUDA tensors: every op gets arguments it takes, and the
    shapes come out right."""
    from titok_fast.packing import PackingCache
    from titok_fast.patches import patch_grid

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    model = fake_cuda_model(config, torch.bfloat16, precision, fake)
    with fake:
        fp8.refresh(model)
        cache, counts, grids = PackingCache(), [16, 32, 1], [(8, 64, 96), (4, 48, 48), (8, 64, 96)]
        patches_of = [patch_grid(g, model.config.patch_size) for g in grids]
        pack = cache.packing(counts, patches_of, model.device)
        patch_rows = sum(t * h * w for t, h, w in patches_of)
        patches = torch.zeros(patch_rows, model.config.patch_dim, dtype=torch.bfloat16, device="cuda")
        codes, indices = model.encode_packed(patches, pack, cache)
        assert codes.shape == (sum(counts), len(model.config.fsq_levels)) and indices.shape == (sum(counts),)
        rows = model.decode_packed(indices, pack, cache, model.decoder_table())
        assert rows.shape == (patch_rows, model.config.patch_dim)
        videos = model.videos_from_rows(rows, pack, grids)
        assert [tuple(v.shape) for v in videos] == [(3, *g) for g in grids] and videos[0].device.type == "cuda"
