"""Backend resolution: per device at call time, one implementation per name."""

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from titok_fast import TiTok
from titok_fast.backends import TORCH, TRITON, check_backend, constant_to_compile, resolve_backend


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


def test_triton_backend_adds_the_residual_in_the_gemm_of_a_16_bit_model():
    """``add_linear`` in bf16: one addmm, the sum rounded once, so nearer the exact sum than ``x + linear(h)``
    (which rounds the product first); x written over only where the caller says it owns it and autograd is off.
    fp32, a bias or autocast: the plain expression, bit for bit. The bound of 99% leaves room for the float32
    accumulation order of the CPU's kernel, which may tip a value rounded to bf16."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=False).bfloat16()
    x, h = torch.randn(200, 128).bfloat16(), torch.randn(200, 256).bfloat16()
    exact = (x.double() + h.double() @ linear.weight.double().t()).bfloat16()
    kept = x.clone()
    got = TRITON.add_linear(x, linear, h, own_x=False)
    assert torch.equal(x, kept) and got.data_ptr() != x.data_ptr()
    assert (got == exact).float().mean() >= 0.99 > 0.9 > (x + linear(h) == exact).float().mean()
    mine = x.clone()
    with torch.no_grad():  # (as the model runs)
        assert TRITON.add_linear(mine, linear, h, own_x=True).data_ptr() == mine.data_ptr()
    assert torch.equal(mine, got)
    mine = x.clone()
    assert TRITON.add_linear(mine, linear, h, own_x=True).data_ptr() != mine.data_ptr() and torch.equal(x, mine)
    assert torch.equal(TORCH.add_linear(x, linear, h, own_x=True), x + linear(h)) and torch.equal(x, kept)
    biased = nn.Linear(256, 128).bfloat16()
    assert torch.equal(TRITON.add_linear(x, biased, h, own_x=True), x + biased(h)) and torch.equal(x, kept)
    x32, h32, linear32 = x.float(), h.float(), nn.Linear(256, 128, bias=False)  # (module.float() is in place)
    linear32.weight.data = linear.weight.float()
    assert torch.equal(TRITON.add_linear(x32, linear32, h32, own_x=True), x32 + linear32(h32))
    assert torch.equal(x32, kept.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(TRITON.add_linear(x32, linear32, h32, own_x=True), x32 + linear32(h32))
    seen = []  # a forward hook (activations captured, say) is honoured: the Linear is called
    linear.register_forward_hook(lambda module, args, out: seen.append(out))
    assert torch.equal(TRITON.add_linear(x, linear, h, own_x=True), x + linear(h)) and len(seen) == 2


def test_triton_backend_norms_in_its_kernel_only_a_plain_norm_of_its_rows():
    """The LayerNorm kernel takes a LayerNorm of the rows' width, dtype and device with no hooks (its own or global
    ones); anything else, a subclass included, is the module's call."""
    from titok_fast.backends import _norm_in_kernel

    ln, x = nn.LayerNorm(64).bfloat16(), torch.randn(10, 64).bfloat16()
    assert _norm_in_kernel(ln, x)
    assert not _norm_in_kernel(ln, x.float()) and not _norm_in_kernel(ln, x[:, :32])
    assert not _norm_in_kernel(ln, x.t().contiguous().t()) and not _norm_in_kernel(ln, x[None])
    assert not _norm_in_kernel(nn.LayerNorm(64, elementwise_affine=False).bfloat16(), x)
    with torch.device("meta"):
        assert not _norm_in_kernel(ln, torch.empty(10, 64, dtype=torch.bfloat16))
    class Scaled(nn.LayerNorm):  # a norm of its own making
        def forward(self, x):
            return 2 * super().forward(x)

    assert not _norm_in_kernel(Scaled(64).bfloat16(), x)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        assert not _norm_in_kernel(ln, x)
    finally:
        handle.remove()
    assert _norm_in_kernel(ln, x)
    ln.register_forward_pre_hook(lambda module, args: None)
    assert not _norm_in_kernel(ln, x)


@pytest.mark.parametrize("queries", ["all", "latent"])
@pytest.mark.parametrize("layers", [1, 2])
def test_the_layers_never_write_over_their_input(layers, queries):
    """The residual adds run in place once the stream is the layers' own: never on the rows they were given (the
    last layer's query rows may be a view of them), in the packed and the fixed-shape paths."""
    from titok_fast.config import StackSize
    from titok_fast.layers import Layers, perturb_norms
    from titok_fast.model import run_layers, run_layers_static
    from titok_fast.packing import PackingCache, StaticBatch

    from triton_mode import triton_mode

    torch.manual_seed(0)
    size = StackSize("small", layers, 2, 1, 2.0)
    stack = Layers(size).bfloat16()
    perturb_norms(stack)
    cache = PackingCache()
    pack = cache.packing([3, 2], [(2, 2, 2), (1, 1, 1)], torch.device("cpu"))
    x = torch.randn(pack.rows, size.width).bfloat16()
    kept = x.clone()
    with triton_mode(interpret=True), torch.no_grad():  # (as the model runs them)
        out = run_layers(stack, x, pack, queries, TRITON, cache)
        assert torch.equal(x, kept) and out.shape == (pack.num_tokens if queries == "latent" else pack.rows, 128)
        if queries == "all":
            cos, sin = cache.tables(pack.max_position, x.device)
            rows = torch.zeros(pack.rows, dtype=torch.bool)
            batch = StaticBatch(pack.cu_seqlens, pack.positions, rows, cos, sin)
            assert torch.equal(run_layers_static(stack, x, batch, TRITON), out) and torch.equal(x, kept)


def test_the_compile_constant_mark_is_torchs_and_no_run_imports_dynamo_before_it_compiles():
    """constant_to_compile marks a function as torch.compiler.assume_constant_result does, without importing
    torch._dynamo, which took 2 s of every run's start (a CPU-s of a 10-clip encode) and only torch.compile needs."""
    def ours():
        return 1

    def theirs():
        return 1

    assert constant_to_compile(ours) is ours and torch.compiler.assume_constant_result(theirs) is theirs
    assert vars(ours) == vars(theirs) == {"_dynamo_marked_constant": True}
    imported = "import sys, titok_fast.cli, titok_fast.pipeline, titok_fast.engine; print('torch._dynamo' in " \
               "sys.modules)"  # fmt: skip
    said = subprocess.run([sys.executable, "-c", imported], capture_output=True, text=True, check=True).stdout
    assert said == "False\n"


@pytest.mark.parametrize("where", ["key", "value"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_key_or_value_in_one_clip_of_a_fixed_shape_batch_stays_in_that_clip(where, bad):
    """The fixed-shape path attends over the whole batch under a mask, where a masked weight (0, or -inf before
    the softmax) meets another clip's NaN or inf as NaN: one clip's bad values made every clip of its batch NaN,
    which the packed path's per-clip kernels never do. The other clips get what they get without them, to the
    bit; the bad clip is NaN all over, as a varlen kernel leaves it."""
    from titok_fast.config import StackSize
    from titok_fast.layers import Layers, perturb_norms
    from titok_fast.packing import PackingCache, StaticBatch

    torch.manual_seed(0)
    stack = Layers(StackSize("small", 1, 2, 1, 2.0))
    perturb_norms(stack)
    attn = stack.attn_layer[0]
    cache = PackingCache()
    pack = cache.packing([3, 2, 2], [(2, 2, 2), (1, 2, 2), (1, 1, 1)], torch.device("cpu"))
    cos, sin = cache.tables(pack.max_position, "cpu")
    batch = StaticBatch(pack.cu_seqlens, pack.positions, torch.zeros(pack.rows, dtype=torch.bool), cos, sin)
    qkv = torch.randn(pack.rows, 4 * 64)  # 2 query heads, then 1 key head and 1 value head of 64
    with torch.no_grad():
        clean = TORCH.attention_static(attn, qkv, batch)
        (s0, e0), (s1, e1), (s2, e2) = pack.seq_bounds
        qkv[s1 + 1, (2 if where == "key" else 3) * 64 + 5] = bad  # one value of a row of clip 1
        got = TORCH.attention_static(attn, qkv, batch)
    assert torch.equal(got[s0:e0], clean[s0:e0]) and torch.equal(got[s2:e2], clean[s2:e2])
    assert got[s1:e1].isnan().all() and not clean.isnan().any()
