"""The whole model with backend="triton" against the oracle; on a CPU the kernels run in the Triton interpreter."""

import contextlib
import threading

import pytest
import torch

from titok_fast.engine import Engine

from graph_capture import engine_for
from helpers import agreement, distinct, make_model, make_reference, random_videos, rel_l2
from triton_mode import triton_mode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(8, 32, 24), (4, 8, 8), (4, 16, 32)]
COUNTS = [16, 1, 9]


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    with triton_mode(interpret=DEVICE == "cpu"):
        yield


@pytest.fixture(scope="module")
def models():
    model = make_model("tiny", "triton")
    return model.to(DEVICE), make_reference(model).cpu()


def test_triton_backend_matches_oracle_fp32(models):
    model, ref = models
    videos = random_videos(SHAPES)
    codes, out = model.encode([v.to(DEVICE) for v in videos], COUNTS)
    ref_codes, ref_out = ref.encode(videos, COUNTS)
    assert agreement([i.cpu() for i in out["indices"]], ref_out["indices"]) >= 0.999
    assert distinct(ref_out["indices"]) >= 5
    assert codes.dtype == torch.float32 and codes.shape == ref_codes.shape
    recon = model.decode_indices(out["indices"], SHAPES)
    for r, rr in zip(recon, ref.decode_indices(ref_out["indices"], SHAPES), strict=True):
        assert rel_l2(r.cpu(), rr) <= 1e-4


@pytest.mark.parametrize("mode", ["static", "compile", "cudagraph", "layout"])
def test_fixed_shape_path_matches_packed_path(models, mode, monkeypatch):
    """Token budget, device-side cu_seqlens, padding rows: the same tokens and the same videos. ``compile``
    checks the kernels' custom ops under torch.compile (fake shapes, declared mutation): one graph per stage.
    ``cudagraph`` captures real CUDA graphs on a GPU and runs on the CPU stand-in for them elsewhere; so does
    ``layout`` (auto's graphs of a batch's own layout: the packed path captured), one graph per layout."""
    model, _ = models
    videos = [v.to(DEVICE) for v in random_videos(SHAPES)]
    _, out = model.encode(videos, COUNTS)
    recon = model.decode_indices(out["indices"], SHAPES)
    engine = engine_for(model, mode, monkeypatch, budgets=(64,))
    _, got = engine.encode(videos, COUNTS)
    assert all(torch.equal(a, b) for a, b in zip(got["indices"], out["indices"], strict=True))
    for r, rr in zip(engine.decode_indices(out["indices"], SHAPES), recon, strict=True):
        assert rel_l2(r, rr) <= 1e-5
    if mode in ("compile", "cudagraph", "layout"):
        _, again = engine.encode(videos[::-1], COUNTS[::-1])  # new contents, same budget: no new graph
        assert all(torch.equal(a, b) for a, b in zip(again["indices"], out["indices"][::-1], strict=True))
        assert engine.compiles == (2 if mode != "layout" else 3)  # (a new layout: its graph)


def test_bf16_not_below_oracle_noise_floor():
    """bf16, compiled on a GPU or in the interpreter with GPU rounding (triton_mode): tokens within one point of
    the bf16 oracle's own agreement with the fp32 oracle, and reconstructions (of the last two clips) no further
    from the fp32 oracle's than the bf16 oracle's are (within 20%)."""
    model32 = make_reference(make_model("tiny"))
    shapes, counts = [(4, 96, 96), (8, 64, 96), (4, 64, 64)], [256, 384, 128]  # 768 tokens; rows kept few (interpreter)
    videos = random_videos(shapes)
    _, truth = model32.encode(videos, counts)
    floor_model = make_reference(make_model("tiny").to(torch.bfloat16))
    _, floor_out = floor_model.encode([v.bfloat16() for v in videos], counts)
    fast = make_model("tiny", "triton").to(DEVICE, torch.bfloat16)
    _, out = fast.encode([v.to(DEVICE, torch.bfloat16) for v in videos], counts)
    floor = agreement(floor_out["indices"], truth["indices"])
    assert agreement([i.cpu() for i in out["indices"]], truth["indices"]) >= floor - 0.01
    indices, shapes = truth["indices"][1:], shapes[1:]  # two clips decoded are enough (interpreter time)
    recon32 = model32.decode_indices(indices, shapes)
    floor_recon = floor_model.decode_indices(indices, shapes)
    recon = fast.decode_indices([i.to(DEVICE) for i in indices], shapes)
    for r, f, t in zip(recon, floor_recon, recon32, strict=True):
        assert r.dtype == torch.bfloat16 and rel_l2(r.float().cpu(), t) <= 1.2 * rel_l2(f.float(), t)


@pytest.mark.skipif(DEVICE == "cuda", reason="the Triton interpreter's own bf16 and fp8, off a GPU")
def test_bf16_and_fp8_are_refused_in_the_interpreters_own_arithmetic(monkeypatch):
    """The interpreter multiplies bf16 values' raw bits as integers and truncates casts: a bf16 model on the
    triton backend gave every token otherwise, silently. Outside a harness that makes it faithful (triton_mode),
    such a launch is refused in one line; float32 and float16 run."""
    from titok_fast.kernels import _triton

    monkeypatch.setattr(_triton, "FAITHFUL_INTERPRETER", False)  # (the interpreter as Triton ships it)
    videos, counts = random_videos([(4, 8, 8)]), [4]
    model = make_model("tiny", "triton")
    half = make_model("tiny", "triton").half()
    assert len(half.encode([v.half() for v in videos], counts)[1]["indices"][0]) == 4
    with pytest.raises(ValueError, match=r"^the Triton interpreter computes bfloat16 otherwise than a GPU .* use "
                                         r"backend 'torch' for bfloat16 or fp8 on a CPU$"):  # fmt: skip
        model.to(torch.bfloat16).encode([v.bfloat16() for v in videos], counts)
    with pytest.raises(ValueError, match=r"^the Triton interpreter computes float8 codes otherwise than a GPU"):
        half.precision = "fp8"
        half.decode_indices(half.encode([v.half() for v in videos], counts)[1]["indices"], [(4, 8, 8)])


def test_bf16_cudagraph_engine_gives_the_models_tokens(monkeypatch):
    """The production configuration (bf16, triton kernels, CUDA graphs) against ``model.encode`` / ``decode``.

    What holds in bf16: the padded fixed-shape path does the same arithmetic per row as the exact-sized one, but
    its matmuls have other row counts, and a bf16 matmul may round differently with the shape (cuBLAS on a GPU
    picks other kernels; CPUs with bf16 matrix units, such as AMX, block differently). So tokens may flip where
    two codes are within bf16 rounding of each other (at most one of the 26 here), and the decoded videos differ
    by less than bf16's own rounding noise: the distance between this model's bf16 and fp32 reconstructions of
    the same tokens. Exact equality is an fp32 guarantee (``test_fixed_shape_path_matches_packed_path``)."""
    model = make_model("tiny", "triton").to(DEVICE, torch.bfloat16)
    videos = [v.to(DEVICE, torch.bfloat16) for v in random_videos(SHAPES)]
    _, out = model.encode(videos, COUNTS)
    recon = model.decode_indices(out["indices"], SHAPES)
    recon32 = make_model("tiny", "triton").to(DEVICE).decode_indices(out["indices"], SHAPES)
    engine = engine_for(model, "cudagraph", monkeypatch, budgets=(64,))
    _, got = engine.encode(videos, COUNTS)
    flipped = sum(int((a.cpu() != b.cpu()).sum()) for a, b in zip(got["indices"], out["indices"], strict=True))
    assert flipped <= 1
    decoded = engine.decode_indices(out["indices"], SHAPES)
    for r, rr, r32 in zip(decoded, recon, recon32, strict=True):
        noise = rel_l2(rr.float(), r32)
        assert 0 < noise < 2e-2  # the floor is real and of bf16's size
        assert r.dtype == torch.bfloat16 and rel_l2(r.float(), rr.float()) <= noise


def test_bf16_layout_graphs_are_the_eager_engines_tokens_and_pixels_exactly(monkeypatch):
    """auto's graphs of a batch's own layout run the eager path's kernels on its shapes: in bf16 too, where a
    padded graph may round otherwise (above), the tokens and pixels of an eager engine batching alike, exactly."""
    model = make_model("tiny", "triton").to(DEVICE, torch.bfloat16)
    videos = [v.to(DEVICE, torch.bfloat16) for v in random_videos(SHAPES)]
    eager = Engine(model, mode="eager", budgets=(48,))  # two batches: clips 0 and 1, then clip 2
    layout = engine_for(model, "layout", monkeypatch, budgets=(48,))
    (codes, want), (got_codes, got) = (e.encode(videos, COUNTS) for e in (eager, layout))
    assert torch.equal(got_codes, codes)
    assert all(torch.equal(a, b) for a, b in zip(got["indices"], want["indices"], strict=True))
    pixels = [e.decode_indices(want["indices"], SHAPES) for e in (eager, layout)]
    assert all(torch.equal(a, b) for a, b in zip(*pixels, strict=True))
    assert layout.compiles == 4 and all(p.dtype == torch.bfloat16 for p in pixels[1])


def test_packed_indices_of_any_integer_dtype_and_stride_decode_alike(models):
    """Token files store int16, and a packed tensor may be a strided view: both must decode as the contiguous int64
    tensor does (the gather kernel reads element i at offset i, int32/int64 only), on the model and the engine."""
    model, _ = models
    _, out = model.encode([v.to(DEVICE) for v in random_videos(SHAPES)], COUNTS)
    packed = torch.cat(out["indices"]).long()
    want = model.decode_indices(packed, SHAPES, COUNTS)
    strided = torch.stack([packed, torch.zeros_like(packed)], 1).flatten()[::2]  # the same values, stride 2
    assert not strided.is_contiguous() and torch.equal(strided, packed)
    for got in (
        model.decode_indices(packed.short(), SHAPES, COUNTS),
        model.decode_indices(strided, SHAPES, COUNTS),
        [v for _, v in Engine(model, mode="eager").decode_stream(
            (k, i.short(), s) for k, (i, s) in enumerate(zip(out["indices"], SHAPES, strict=True)))],
    ):  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_every_kernel_launches_on_the_gpu_of_its_tensors(models, monkeypatch):
    """Triton launches on the current GPU: each custom op makes its tensors' GPU current (a model on cuda:1 called
    from a thread whose current GPU is 0), here recorded on the CPU, where the guard does nothing."""
    from titok_fast import ops

    model, _ = models
    guarded, guard = [], ops.on_device_of
    monkeypatch.setattr(ops, "on_device_of", lambda t: guarded.append(t.device) or guard(t))
    _, out = model.encode([v.to(DEVICE) for v in random_videos(SHAPES[:1])], COUNTS[:1])
    encoded = len(guarded)
    model.decode_indices(out["indices"], SHAPES[:1])
    depth = len(model.encoder.model_layers.attn_layer)
    assert encoded == 4 * depth + 1  # each layer's two LayerNorms, attention and gated GELU, then the FSQ head
    assert len(guarded) == encoded + 1 + 4 * depth  # the decoder's input rows, then each layer's four
    assert set(guarded) == {torch.device(DEVICE) if DEVICE == "cpu" else model.device}
    fake, current = type("Tensor", (), {"device": torch.device("cuda", 1)})(), []
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext(current.append(device)))
    with guard(fake):
        assert current == [torch.device("cuda", 1)]


def test_threads_calling_the_model_at_once_get_its_tokens(models):
    """The model may be called from several threads at once: every kernel launch holds one lock (Triton's compile
    and cache are not thread-safe, and its interpreter keeps a launch's grid in module globals: without the lock,
    two threads here raised "y >= grid_dim[1]" or got other indices)."""
    model, _ = models
    videos = [v.to(DEVICE) for v in random_videos(SHAPES[:2])]
    want = model.encode(videos, COUNTS[:2])[1]["indices"]
    barrier, got, failed = threading.Barrier(2), [], []

    def call():
        barrier.wait()
        for _ in range(2):
            try:
                got.append(model.encode(videos, COUNTS[:2])[1]["indices"])
            except Exception as e:  # (said below, with the others)
                failed.append(repr(e))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failed and len(got) == 4
    assert all(torch.equal(a, b) for indices in got for a, b in zip(indices, want, strict=True))
