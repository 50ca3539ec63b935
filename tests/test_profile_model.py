"""benchmarks/profile_model.py: kernels sorted into kinds, the device's busy time counted once, and a run on the CPU
(the GPU's trace is parsed from a made-up one of the same form)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import profile_model  # noqa: E402


@pytest.mark.parametrize(
    "name, kind",
    [
        ("_attention_kernel", "attention (fused)"),
        ("_qk_norm_rope_kernel", "q/k norm + M-RoPE"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention (other)"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "GEMM"),
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopB_NTN", "GEMM"),
        ("_layer_norm_rows_kernel", "FP8 quantisation"),
        ("_gated_gelu_kernel", "gated GELU"),
        ("_gated_gelu_fp8_kernel", "gated GELU"),
        ("_fsq_encoder_head_kernel", "FSQ"),
        ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "LayerNorm"),
        ("Memcpy HtoD (Pinned -> Device)", "copies"),
        ("void at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)", "copies"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctorOnSelf_add<float>>",
            "elementwise and other",
        ),
        ("aten::mm", "GEMM"),
        ("aten::mul", "elementwise and other"),
        ("aten::cat", "copies"),
    ],
)
def test_kernels_and_ops_are_sorted_into_kinds(name, kind):
    assert profile_model.kind_of(name) == kind


def test_only_the_devices_events_are_read_from_a_trace_and_overlaps_count_once():
    trace = {"traceEvents": [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 1, "dur": 5},
        {"ph": "X", "cat": "kernel", "name": "_attention_kernel", "ts": 10, "dur": 20},
        {"ph": "X", "cat": "kernel", "name": "nvjet_hsh", "ts": 25, "dur": 10},  # overlaps the one before by 5
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 50, "dur": 4},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset", "ts": 52, "dur": 1},  # within the copy
        {"ph": "f", "cat": "ac2g", "name": "flow", "ts": 3},
    ]}  # fmt: skip
    events = profile_model.device_events(trace)
    assert [e[0] for e in events] == ["_attention_kernel", "nvjet_hsh", "Memcpy HtoD", "Memset"]
    assert profile_model.busy_us(events) == 20 + 5 + 4
    kinds = profile_model.breakdown(profile_model.per_kernel([(n, d, 1) for n, _, d in events], steps=2))
    assert kinds["copies"]["ms"] == pytest.approx((4 + 1) / 1e3 / 2) and kinds["copies"]["launches"] == 1
    assert kinds["GEMM"]["top"] == "nvjet_hsh"


def test_a_cpu_run_accounts_for_its_time_by_kind(tmp_path):
    args = "--config tiny --device cpu --dtype float32 --shape 4x32x32 --tokens 32 --batches 1,2 --steps 2 --out"
    cases = profile_model.main([*args.split(), str(tmp_path)])
    assert [(c["stage"], c["batch"]) for c in cases] == [("encode", 1), ("encode", 2), ("decode", 1), ("decode", 2)]
    for case in cases:
        kinds = case["kinds"]
        assert kinds["GEMM"]["ms"] > 0 and kinds["GEMM"]["launches"] >= 2 * 2  # tiny: two layers, a Linear or more
        assert sum(k["ms"] for k in kinds.values()) == pytest.approx(case["busy_ms"])
        assert case["wall_ms"] > 0 and case["modes_run"] == ["eager"]
    logged = [json.loads(line) for line in (tmp_path / "profile.jsonl").read_text().splitlines()]
    assert [c["busy_ms"] for c in logged] == [c["busy_ms"] for c in cases]
    assert (tmp_path / "profile.md").read_text().count("| GEMM |") == 4
