"""Every kernel configuration the launchers pick compiles for an H100 (sm_90) on this machine, without a GPU:
the attention kernel's dots lower to wgmma, and nothing spills to local memory (PTX, ptxas stack, SASS).

The compiles run in a child process with TRITON_INTERPRET unset: the interpreter used by the other kernel tests
patches triton.language while it runs, and a compile in the same process can see those patches."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import titok_fast.kernels.fp8_quant as fp8_quant
import titok_fast.kernels.fsq as fsq
import titok_fast.kernels.gated_gelu as gated_gelu
import titok_fast.kernels.layer_norm as layer_norm
import titok_fast.kernels.mrope_attention as mrope
import titok_fast.kernels.nearest_code as nearest
import titok_fast.kernels.nv12_rgb as nv12_rgb

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
LAUNCH_OPTIONS = {"num_warps", "num_stages", "enable_fp_fusion", "maxnreg"}
TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
FLOAT_ARGS = {"eps", "qk_scale"}


def _attention(dtype, group, has_q_starts, blocks=None):
    ptrs = dict.fromkeys(["q_ptr", "k_ptr", "v_ptr", "o_ptr"], TYPE[dtype])
    ptrs.update(dict.fromkeys(["cu_seqlens_ptr", "q_cu_ptr", "q_starts_ptr", "pos_ptr"], "i32"))
    ptrs.update(q_w_ptr=TYPE[dtype], q_b_ptr=TYPE[dtype], cos_ptr="fp32", sin_ptr="fp32")
    config = dict(mrope.attention_config(dtype, blocks), GROUP=group, HAS_Q_STARTS=has_q_starts)
    return "_attention_kernel", mrope, config, ptrs


def _norm_rope(dtype, q_heads=True, heads=None):
    ptrs = dict.fromkeys(["qkv_ptr", "qk_ptr", "q_w_ptr", "q_b_ptr", "k_w_ptr", "k_b_ptr"], TYPE[dtype])
    ptrs.update(pos_ptr="i32", cos_ptr="fp32", sin_ptr="fp32", cu_seqlens_ptr="i32")
    config = dict(mrope.NORM_CONFIG, Q_HEADS=q_heads)
    return "_qk_norm_rope_kernel", mrope, dict(config, HEADS=heads or config["HEADS"]), ptrs


def _encoder_head(dtype, width, dim):
    ptrs = dict.fromkeys(["x_ptr", "ln_w_ptr", "ln_b_ptr", "proj_w_ptr", "proj_b_ptr", "codes_ptr"], TYPE[dtype])
    ptrs.update(dict.fromkeys(["half_l_ptr", "offset_ptr", "shift_ptr"], "fp32"))
    ptrs.update(dict.fromkeys(["half_width_ptr", "basis_ptr", "indices_ptr"], "i32"))
    config = dict(fsq.encoder_head_config(width), DIM=dim, PRECISE=True)
    return "_fsq_encoder_head_kernel", fsq, config, ptrs, _sixteens(width=width)


def _decoder_input(dtype, index_type, width):
    ptrs = dict.fromkeys(["table_ptr", "mask_row_ptr", "out_ptr"], TYPE[dtype])
    ptrs.update(indices_ptr=index_type, cu_seqlens_ptr="i32", cu_tokens_ptr="i32")
    return "_fsq_decoder_input_kernel", fsq, fsq.DECODER_INPUT_CONFIG, ptrs, _sixteens(width=width)


def _nearest(dtype, dim, cosine):
    ptrs = dict(x_ptr=TYPE[dtype], c_ptr=TYPE[dtype], indices_ptr="i64", dist_ptr="fp32")
    return "_nearest_code_kernel", nearest, dict(nearest.nearest_code_config(dtype, dim), COSINE=cosine), ptrs


def _sixteens(**sizes: int) -> tuple[str, ...]:
    """The size arguments the launch passes that Triton specialises as multiples of 16 (as it does every integer
    argument that is one, unless told not to): the row widths of V1's shapes, which make the row kernels' loads
    and stores 16 bytes wide."""
    return tuple(name for name, value in sizes.items() if value % 16 == 0)


def _quantize(dtype, k):
    ptrs = dict(x_ptr=TYPE[dtype], q_ptr="fp8e4nv", scale_ptr="fp32")
    return "_quantize_rows_kernel", fp8_quant, fp8_quant.quantize_rows_config(k), ptrs, _sixteens(K=k)


def _gated_gelu(dtype, inner, fp8, values_per_thread=16):
    ptrs = dict(x_ptr=TYPE[dtype], y_ptr=TYPE[dtype], q_ptr="fp8e4nv", scale_ptr="fp32")
    name = "_gated_gelu_fp8_kernel" if fp8 else "_gated_gelu_kernel"
    config = gated_gelu.gated_gelu_config(inner, fp8, values_per_thread)
    return name, gated_gelu, config, ptrs, _sixteens(inner=inner)


def _layer_norm_fp8(dtype, k):
    ptrs = dict(x_ptr=TYPE[dtype], w_ptr=TYPE[dtype], b_ptr=TYPE[dtype], q_ptr="fp8e4nv", scale_ptr="fp32")
    return "_layer_norm_rows_kernel", fp8_quant, fp8_quant.quantize_rows_config(k), ptrs, _sixteens(K=k)


def _layer_norm(dtype, k):
    ptrs = dict.fromkeys(["x_ptr", "w_ptr", "b_ptr", "y_ptr"], TYPE[dtype])
    return "_layer_norm_kernel", layer_norm, layer_norm.layer_norm_config(k), ptrs, _sixteens(K=k)


def _one_value(spec):
    """A row kernel's case for rows of one value, K passed as the constant 1, as the launcher specialises it."""
    name, module, config, ptrs, _ = spec
    return name, module, dict(config, K=1), ptrs


def _nv12_rgb():
    config = dict(BLOCK_W=nv12_rgb.BLOCK_W, Y_OFFSET=nv12_rgb.Y_OFFSET, C_OFFSET=nv12_rgb.C_OFFSET,
                  num_warps=nv12_rgb.NUM_WARPS)  # fmt: skip
    return "_nv12_rgb_kernel", nv12_rgb, config, dict(nv12_ptr="u8", out_ptr="u8")


def _i420_rgb():
    _, module, config, _ = _nv12_rgb()
    return "_i420_rgb_kernel", module, config, dict(i420_ptr="u8", out_ptr="u8")


CASES = {
    "attention-bf16-group4": _attention(torch.bfloat16, 4, False),
    "attention-bf16-group3-subset": _attention(torch.bfloat16, 3, True),
    "attention-fp16-group2-subset": _attention(torch.float16, 2, True),
    "attention-fp32-group4": _attention(torch.float32, 4, False),
    "norm_rope-bf16": _norm_rope(torch.bfloat16),
    "norm_rope-fp16": _norm_rope(torch.float16),
    "norm_rope-fp32": _norm_rope(torch.float32),
    "norm_rope-bf16-k-only": _norm_rope(torch.bfloat16, q_heads=False),
    # the other heads per program a GPU benchmark compares (bench_kernels.py::test_prologue_heads)
    **{f"norm_rope-bf16-heads{h}": _norm_rope(torch.bfloat16, heads=h) for h in (1, 2, 8)},
    "encoder_head-bf16-W1024": _encoder_head(torch.bfloat16, 1024, 5),
    "encoder_head-bf16-W2048": _encoder_head(torch.bfloat16, 2048, 5),
    "encoder_head-fp16-W512-D4": _encoder_head(torch.float16, 512, 4),
    "decoder_input-bf16-i32": _decoder_input(torch.bfloat16, "i32", 2048),
    "decoder_input-fp16-i64": _decoder_input(torch.float16, "i64", 512),
    "nearest-bf16-D256-l2": _nearest(torch.bfloat16, 256, False),
    "nearest-fp16-D64-cosine": _nearest(torch.float16, 64, True),
    "nearest-fp32-D256-l2": _nearest(torch.float32, 256, False),
    "quantize-bf16-K1024": _quantize(torch.bfloat16, 1024),
    "quantize-bf16-K2752": _quantize(torch.bfloat16, 2752),
    "quantize-fp32-K1376": _quantize(torch.float32, 1376),
    "quantize-layer_norm-bf16-K2048": _layer_norm_fp8(torch.bfloat16, 2048),  # V1's decoder: its norms into FP8
    "quantize-layer_norm-fp32-K1024": _layer_norm_fp8(torch.float32, 1024),
    "layer_norm-bf16-K1024": _layer_norm(torch.bfloat16, 1024),  # V1's encoder and decoder norms
    "layer_norm-bf16-K2048": _layer_norm(torch.bfloat16, 2048),
    "layer_norm-fp32-K1024": _layer_norm(torch.float32, 1024),
    # rows of one value: the launcher passes an integer argument of 1 as a constant, which the kernels must take
    # (compiled only: a program holds 4096 such rows, each with its divisions)
    "layer_norm-bf16-K1": _one_value(_layer_norm(torch.bfloat16, 1)),
    "layer_norm_fp8-bf16-K1": _one_value(_layer_norm_fp8(torch.bfloat16, 1)),
    # V1's FFN: the encoder's 1376 inner values a row, the decoder's 2752 (its FP8 Linears read them as codes)
    "gated_gelu-bf16-I1376": _gated_gelu(torch.bfloat16, 1376, False),
    "gated_gelu-bf16-I2752": _gated_gelu(torch.bfloat16, 2752, False),
    "gated_gelu-bf16-I2752-fp8": _gated_gelu(torch.bfloat16, 2752, True),
    "gated_gelu-bf16-I1376-fp8": _gated_gelu(torch.bfloat16, 1376, True),
    "gated_gelu-bf16-I2752-fp8-8": _gated_gelu(torch.bfloat16, 2752, True, 8),  # (a benchmark's option)
    "gated_gelu-fp32-I1376": _gated_gelu(torch.float32, 1376, False),
    "nv12_rgb": _nv12_rgb(),
    "i420_rgb": _i420_rgb(),
    # the other block shapes a GPU benchmark compares (the first, the default, is compiled above)
    **{f"attention-bf16-group4-{name}": _attention(torch.bfloat16, 4, False, name) for name in
       list(mrope.ATTENTION_BLOCKS)[1:]},
    "attention-bf16-group3-subset-m128n64w8s3-foldq": _attention(torch.bfloat16, 3, True, "m128n64w8s3-foldq"),
}


def _compile(kernel_name, module, config, ptrs, sixteens=()):
    """triton.compile as the launcher's first call would: pointers, strides and the size arguments ``sixteens``
    specialised as 16-divisible."""
    fn = getattr(module, kernel_name)
    constexprs = {k: v for k, v in config.items() if k not in LAUNCH_OPTIONS}
    options = {k: v for k, v in config.items() if k in LAUNCH_OPTIONS}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + ptrs[name]
        elif name.endswith("_desc") and config.get("TMA"):  # a host-side TensorDescriptor of [BLOCK_N, 64] tiles
            signature[name] = f"tensordesc<{ptrs['k_ptr']}[{config['BLOCK_N']},64]>"
        elif name.endswith("_desc"):  # None without TMA: the launcher passes None
            signature[name], constexprs[name] = "constexpr", None
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if name.endswith("_ptr") or name.startswith("stride") or name in sixteens
    }
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=TARGET, options=options)


def compile_all(outdir: Path) -> None:
    """Compile every case into ``outdir/<case>/`` (ptx, cubin, meta.json); a failure is written as error.txt."""
    for case, spec in CASES.items():
        folder = outdir / case
        folder.mkdir(parents=True)
        try:
            kernel = _compile(*spec)
        except Exception as e:  # reported by the test of that case
            (folder / "error.txt").write_text(f"{type(e).__name__}: {e}")
            continue
        (folder / "kernel.ptx").write_text(kernel.asm["ptx"])
        (folder / "kernel.cubin").write_bytes(kernel.asm["cubin"])
        meta = {"shared": kernel.metadata.shared}
        (folder / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    subprocess.run([sys.executable, __file__, str(outdir)], env=env, check=True, timeout=900)
    return outdir


@pytest.mark.parametrize("case", list(CASES))
def test_compiles_for_sm90_without_spills(case, compiled):
    folder = compiled / case
    assert not (folder / "error.txt").exists(), (folder / "error.txt").read_text()
    ptx = (folder / "kernel.ptx").read_text()
    meta = json.loads((folder / "meta.json").read_text())
    assert ".target sm_90" in ptx
    assert ".local" not in ptx
    if case.startswith("attention"):
        assert "wgmma.mma_async" in ptx
        assert ("cp.async.bulk.tensor" in ptx) == ("-tma" in case)  # K/V tiles by the TMA unit, or not
    assert meta["shared"] <= 227 * 1024
    cubin = folder / "kernel.cubin"
    usage = subprocess.run([CUOBJDUMP, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    assert re.search(r"STACK:0 ", usage) and re.search(r"LOCAL:0 ", usage), usage
    if case.startswith("attention-bf16-group4"):  # the CTAs an SM holds, as the block shapes' comments say
        config = CASES[case][2]
        registers = int(re.search(r"REG:(\d+)", usage).group(1))
        assert registers <= config.get("maxnreg", 255)
        blocks = case.removeprefix("attention-bf16-group4").removeprefix("-") or next(iter(mrope.ATTENTION_BLOCKS))
        assert _ctas_per_sm(registers, config["num_warps"], meta["shared"]) == CTAS_PER_SM[blocks]
    sass = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    assert not re.search(r"\b(LDL|STL)\b", sass)
    if case.startswith(("attention-bf16", "attention-fp16")):  # a dot's k-steps (HGMMAs) issued together, one
        # wait (WARPGROUP.ARRIVE ... DEPBAR) for them all; a register cap can make ptxas serialise them (its
        # warning C7512), each waited for alone: the price of r80's third CTA, asserted so that it is seen
        arrives, steps = len(re.findall(r"WARPGROUP\.ARRIVE", sass)), len(re.findall(r"\bHGMMA\b", sass))
        assert arrives == steps if "maxnreg" in CASES[case][2] else 2 * arrives <= steps
    if len(CASES[case]) > 4 and CASES[case][4]:  # a row kernel at V1's widths: memory bound, 16-byte accesses
        assert "LDG.E.128" in sass
        if not case.startswith("encoder_head"):  # (which writes D codes a row, and reads D biases one by one)
            assert ("STG.E.64" if case.endswith("-8") else "STG.E.128") in sass and "LDG.E.U16" not in sass
    if case.startswith("quantize") or case.endswith("-fp8"):  # exactly the reference's arithmetic: IEEE divisions
        # (two a row, none a value: a value is multiplied by its row's inverse scale), casts to nearest even
        assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
        assert len(re.findall(r"\bFCHK\b", sass)) < 12  # (a division a value: 16 or more, the values a thread holds)
    if case in ("nv12_rgb", "i420_rgb"):  # the reference's integer arithmetic: no floating point, products' high
        # bits by an arithmetic shift (rounded down)
        assert "shr.s32" in ptx and not re.search(r"\.f(16|32|64)\b", ptx)
    if case.startswith("attention"):  # the softmax scale is folded into the exponent: an FMA feeds every exp2
        assert len(re.findall(r"\bFFMA\b", sass)) >= len(re.findall(r"\bMUFU\.EX2\b", sass)) > 0
    if case.endswith("-pipe") and (mrope.ATTENTION_BLOCKS[case.split("-", 3)[3]].num_warps == 8
                                   or triton.__version__.startswith("3.6.")):  # fmt: skip
        # what the candidate is for: softmax exp2s issued while the next block's QK^T runs on the tensor cores.
        # (Triton 3.9's ptxas puts m64n64 w4's exp2s before that wgmma, so there it only overlaps the PV wgmma;
        # 3.6's, the GPU machine's, interleaves them as for 8 warps.)
        assert _exp2s_during_scores(sass) >= 16


# CTAs per H100 SM of each bf16 attention block shape (group 4), under Triton 3.6 and 3.9 alike: what the comments
# of ATTENTION_BLOCKS say, from registers, warps and shared memory (_ctas_per_sm)
CTAS_PER_SM = {
    "m128n64w8s3": 2, "m128n64w8s2": 2, "m128n64w8s4": 2, "m128n128w8s2": 1, "m128n128w8s3": 1, "m256n64w8s3": 1,
    "m64n64w4s3": 4, "m128n64w4s3": 2, "m128n64w8s3-tma": 2, "m128n128w8s2-tma": 1, "m128n64w8s3-foldq": 1,
    "m64n64w4s3-foldq": 3, "m128n64w8s3-pipe": 1, "m128n64w8s2-pipe": 1, "m64n64w4s3-pipe": 3,
    "m128n64w8s3-tma-pipe": 1, "m128n32w8s3": 2, "m128n32w8s3-pipe": 2, "m128n32w8s3-r80": 3,
}  # fmt: skip


def _ctas_per_sm(registers: int, warps: int, shared: int) -> int:
    """CTAs of a kernel an H100 SM holds at once: 64K registers, given a warp in units of 256 (a thread's count
    rounded up to eight), 228 KiB of shared memory with 1 KiB kept per CTA, 64 warps."""
    by_registers = 65536 // (-(-registers // 8) * 8 * 32 * warps)
    return min(by_registers, 228 * 1024 // (shared + 1024), 64 // warps)


def _exp2s_during_scores(sass: str) -> int:
    """The MUFU.EX2s issued while a QK^T wgmma is in flight: after an HGMMA reading both operands from shared
    memory (the PV wgmma reads P from registers) and before the WARPGROUP.DEPBAR that waits for it."""
    in_flight, count = False, 0
    for line in sass.splitlines():
        if re.search(r"\bHGMMA\.\S+ R\d+, gdesc", line):
            in_flight = True
        elif "WARPGROUP.DEPBAR" in line:
            in_flight = False
        elif in_flight and "MUFU.EX2" in line:
            count += 1
    return count


if __name__ == "__main__":
    compile_all(Path(sys.argv[1]))
