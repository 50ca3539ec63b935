"""The FLOPs behind the benchmarks' TFLOP/s and MFU: what each path executes (``StackSize.packed_flops`` for the
packed path, whose last layer works only on the rows that come out; ``flops`` for every row through every layer)."""

import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from titok_fast.backends import TORCH
from titok_fast.config import PRESETS
from titok_fast.engine import DEFAULT_BUDGETS, Engine
from titok_fast.loading import random_tokenizer
from titok_fast.model import run_layers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_model  # noqa: E402

TINY = PRESETS["tiny"]  # tiny_thin both sides: 2 layers, 8 q heads, 2 kv heads, width 512, FFN inner 704


def test_packed_flops_by_hand():
    """One 4x8x8 clip (a single patch) with 2 tokens: 3 rows, through the 2 layers of the tiny config."""
    qkv, out, ffn = 2 * 512 * (8 + 2 * 2) * 64, 2 * 512 * 512, 2 * 512 * 3 * 704  # per row
    assert TINY.encoder.ffn_inner == 704
    every_row = 3 * (qkv + out + ffn) + 4 * 3 * 3 * 8 * 64  # a layer: 3 rows, 3 x 3 attention pairs
    assert every_row == 10_438_656
    assert TINY.encoder.flops([3]) == 2 * every_row == 20_877_312
    # the last layer: q/k/v of every row; attention (2 queries x 3 keys), out_proj and FFN of the output rows only
    encoder_last = 3 * qkv + 2 * (out + ffn) + 4 * 2 * 3 * 8 * 64  # 2 latent rows come out
    decoder_last = 3 * qkv + 1 * (out + ffn) + 4 * 1 * 3 * 8 * 64  # 1 patch row comes out
    assert TINY.encoder.packed_flops([3], [2]) == every_row + encoder_last == 18_184_192
    assert TINY.decoder.packed_flops([3], [1]) == every_row + decoder_last == 15_491_072
    assert bench_model.clip_flops(TINY, "encode", [(4, 8, 8)], [2], "eager") == 18_184_192
    assert bench_model.clip_flops(TINY, "decode", [(4, 8, 8)], [2], "eager") == 15_491_072
    assert bench_model.clip_flops(TINY, "encode", [(4, 8, 8)], [2], "fixed") == 20_877_312  # padding not counted


def test_packed_flops_are_what_the_packed_path_runs():
    """The torch backend's packed path under PyTorch's FLOP counter (attention through SDPA's math path, whose
    matmuls it counts): the same number, encoder and decoder."""
    model = random_tokenizer("tiny", seed=0)
    counts, grids = [3, 2], [(2, 2, 2), (1, 1, 1)]
    rows = [3 + 8, 2 + 1]
    for side, queries, outputs in (("encoder", "latent", counts), ("decoder", "patch", [8, 1])):
        part = getattr(model, side)
        pack = part.runtime.packings.packing(counts, grids, torch.device("cpu"))
        x = torch.randn(pack.rows, part.size.width)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            run_layers(part.model_layers, x, pack, queries, TORCH, part.runtime.packings)
        assert counter.get_total_flops() == getattr(TINY, side).packed_flops(rows, outputs)


def test_each_provider_counts_the_path_it_runs():
    model = random_tokenizer("tiny", seed=0)
    shapes, counts = [(8, 16, 16), (4, 8, 8)], [3, 2]
    rows = [3 + 8, 2 + 1]
    packed, every_row = TINY.encoder.packed_flops(rows, counts), TINY.encoder.flops(rows)

    def executed(runner):
        return bench_model.executed_flops(runner, TINY, "encode", shapes, counts)

    assert executed(model) == (packed, bench_model.FLOP_COUNTS["eager"])  # the lean model: packed path
    assert executed(Engine(model, mode="eager"))[0] == packed
    assert executed(Engine(model, mode="auto"))[0] == packed  # auto is eager off a GPU
    assert executed(Engine(model, mode="static", budgets=(4096,))) == (every_row, bench_model.FLOP_COUNTS["fixed"])
    assert executed(object()) == (every_row, bench_model.FLOP_COUNTS["model"])  # upstream's paths, the oracle


def test_auto_counts_each_batch_by_the_mode_it_picks():
    """On a GPU auto runs a small batch as a graph of its own layout (the eager path's work) from the layout's second
    batch on: its first runs padded (encode) or eager (decode), and so do the batches of layouts past
    LAYOUT_GRAPHS; a large batch runs eagerly. A benchmark's timed round comes after its warm-ups."""
    cuda = torch.device("cuda")
    rows = [3136 + 256] * 21  # 19 clips fill the largest budget; the last 2 (8192 rows at most): a small batch
    for stage, first in (("encode", "cudagraph"), ("decode", "eager")):
        once = bench_model.engine_modes(rows, "auto", cuda, DEFAULT_BUDGETS, 32, stage)
        assert [(len(batch), mode) for batch, mode in once] == [(19, "eager"), (2, first)]
        timed = bench_model.engine_modes(rows, "auto", cuda, DEFAULT_BUDGETS, 32, stage, passes=3)
        assert [mode for _, mode in timed] == ["eager", "layout"]
        paths = bench_model.engine_paths(rows, "auto", cuda, DEFAULT_BUDGETS, 32, stage, passes=3)
        assert [path for _, path in paths] == ["eager", "eager"]  # a layout's graph runs the eager path's work
    assert bench_model.engine_paths(rows, "auto", cuda, DEFAULT_BUDGETS, 32)[1][1] == "fixed"  # (the padded one)
    cpu = bench_model.engine_modes(rows, "auto", torch.device("cpu"), DEFAULT_BUDGETS, 32, passes=3)
    assert {mode for _, mode in cpu} == {"eager"}
    many = [100 + i for i in range(bench_model.engine_module.LAYOUT_GRAPHS + 2)]  # a clip a batch, a layout each
    layouts = [((4, 8, 8 * (i + 1)), 99) for i in range(len(many))]
    for stage, padded in (("encode", "cudagraph"), ("decode", "eager")):
        modes = bench_model.engine_modes(many, "auto", cuda, DEFAULT_BUDGETS, 1, stage, layouts, passes=2)
        assert [m for _, m in modes] == ["layout"] * bench_model.engine_module.LAYOUT_GRAPHS + [padded] * 2


def test_the_unfused_provider_undoes_the_layer_norm_kernel_and_the_residual_in_the_gemm():
    """``auto-unfused`` (the same run's "before" of both fusions): inside ``unfused`` the triton backend adds after
    the GEMM, ``x + linear(h)``, and normalises with PyTorch's module; after it, as before it."""
    from titok_fast import backends
    from titok_fast.backends import TRITON

    torch.manual_seed(0)
    linear, ln = torch.nn.Linear(64, 32, bias=False).bfloat16(), torch.nn.LayerNorm(64).bfloat16()
    x, h = torch.randn(100, 32).bfloat16(), torch.randn(100, 64).bfloat16()
    plain, fused = x + linear(h), torch.addmm(x, h, linear.weight.t())
    assert not torch.equal(plain, fused) and backends._norm_in_kernel(ln, h)
    for apart in (True, False):
        with bench_model.unfused(apart):
            assert torch.equal(TRITON.add_linear(x, linear, h, own_x=False), plain if apart else fused)
            assert backends._norm_in_kernel(ln, h) is not apart
    assert torch.equal(TRITON.add_linear(x, linear, h, own_x=False), fused) and backends._norm_in_kernel(ln, h)
