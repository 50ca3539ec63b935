"""bf16 parity: how many tokens keep the float32 oracle's index when run in bfloat16.

The oracle's own bf16 run (upstream's bf16 behaviour) is the noise floor; a backend should match it. Two floors:
``reference`` attends with an explicit float32 softmax; ``reference-sdpa`` through SDPA, whose fused kernels
(FlashAttention-2 on a GPU, and the CPU's flash kernel) round the softmax weights to bf16 before the product with
V, as upstream's flash-attn does.
With ``--decode``, the decoder too: the oracle's float32 tokens decoded by each path, its pixels against the
float32 oracle's decoding (PSNR over the [-1, 1] range, and the relative RMS error).
Usage: ``python benchmarks/bf16_parity.py [--config tiny] [--backends torch triton] [--device cpu] [--interpret]
[--fp8] [--decode] [--oracle-device cuda]`` (``--oracle-device``: where the float32 oracle runs, the CPU by
default; on a GPU with TF32 off it is float32 too, and far faster; ``--interpret``: the triton backend on a CPU,
its kernels in the Triton interpreter with the test harness's GPU rounding of bf16, ``tests/triton_mode.py``).
Each seed's result is printed (flushed) as soon as that seed is done, so a run cut short keeps what it measured;
the table of all seeds comes at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch

from titok_fast import TiTok
from titok_fast.fp8 import set_precision
from titok_fast.layers import perturb_norms
from titok_fast.reference import ReferenceTiTok

CLIPS = {
    "tiny": ([(12, 160, 160), (8, 128, 96), (12, 64, 64), (4, 160, 128)], [256, 128, 384, 64]),
    "v1": ([(8, 64, 64), (12, 64, 96), (4, 128, 64)], [128, 256, 96]),
}


def agreement(indices: tuple, truth: torch.Tensor) -> float:
    return (torch.cat(indices).cpu() == truth).float().mean().item()


def pixel_error(videos: list, truth: list) -> tuple[float, float]:
    """(squared error, squared reference) summed over every pixel of the decoded ``videos`` against ``truth``."""
    error = sum(((v.cpu().float() - t) ** 2).sum().item() for v, t in zip(videos, truth, strict=True))
    return error, sum((t**2).sum().item() for t in truth)


def psnr(error: float, count: int) -> float:
    """PSNR over the [-1, 1] range (peak-to-peak 2) of a summed squared ``error`` over ``count`` values."""
    return 10 * math.log10(4 / (error / count)) if error else math.inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", choices=sorted(CLIPS))
    parser.add_argument("--backends", nargs="+", default=["torch"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--oracle-device", default="cpu", help="where the float32 oracle runs (TF32 off)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--interpret", action="store_true", help="kernels in the Triton interpreter (a CPU run)")
    parser.add_argument(
        "--fp8", action="store_true",
        help="also each backend with FP8 linear layers (titok_fast.fp8: the decoder's; tokens as the backend's)",
    )  # fmt: skip
    parser.add_argument("--decode", action="store_true", help="also the decoded pixels against the float32 oracle's")
    args = parser.parse_args()
    for option, name in (("--device", args.device), ("--oracle-device", args.oracle_device)):
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise SystemExit(f"bf16_parity: {option} {name}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():  # before minutes of float32 oracle work
            raise SystemExit(f"bf16_parity: {option} {name}, but this PyTorch sees no CUDA device")
    with interpreter() if args.interpret else contextlib.nullcontext():
        run(args)


@contextlib.contextmanager
def float32_exactly():
    """float32 matrix products and convolutions on a GPU without TF32 (its 10-bit mantissa is no float32 oracle)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def interpreter():
    """The kernels in the Triton interpreter, bf16 rounded as on the GPU (the test harness's ``triton_mode``)."""
    import titok_fast.ops  # noqa: F401 - the kernels must be loaded before they are rebound

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from triton_mode import triton_mode

    return triton_mode(interpret=True)


def run(args: argparse.Namespace) -> None:
    shapes, counts = CLIPS[args.config]
    fp8 = [f"{b}+fp8" for b in args.backends] if args.fp8 else []
    names = ["reference", "reference-sdpa", *args.backends, *fp8]
    totals: dict[str, list[float]] = {name: [] for name in names}
    pixels: dict[str, list[tuple[float, float]]] = {name: [] for name in names}  # --decode: pixel_error per seed
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = TiTok(args.config).eval()
        perturb_norms(model)
        oracle = ReferenceTiTok(model.config).eval().to(args.oracle_device)
        oracle.load_state_dict(model.state_dict())
        g = torch.Generator().manual_seed(100 + seed)
        videos = [torch.rand((3, *s), generator=g) * 2 - 1 for s in shapes]
        with float32_exactly():
            _, out = oracle.encode([v.to(args.oracle_device) for v in videos], counts)
            truth = torch.cat(out["indices"]).cpu()
            codes = [i.to(args.device) for i in out["indices"]]
            decoded = [v.float().cpu() for v in oracle.decode_indices(out["indices"], shapes)] if args.decode else []

        def measure(name: str, runner, half: list, truth=truth, codes=codes, decoded=decoded) -> None:
            totals[name].append(agreement(runner.encode(half, counts)[1]["indices"], truth))
            if args.decode:
                pixels[name].append(pixel_error(runner.decode_indices(codes, shapes), decoded))

        model, oracle = model.to(args.device, torch.bfloat16), oracle.to(args.device, torch.bfloat16)
        half = [v.to(args.device, torch.bfloat16) for v in videos]
        measure("reference", oracle, half)
        for backend in args.backends:
            model.backend = backend
            measure(backend, model, half)
            if args.fp8:  # the decoder layers' Linears in FP8, bf16 elsewhere
                set_precision(model, "fp8")
                measure(f"{backend}+fp8", model, half)
                set_precision(model, "default")
        oracle.fused_attention = True
        measure("reference-sdpa", oracle, half)
        results = []  # this seed, as soon as it is done
        for name in names:
            result = f"{name} {100 * totals[name][-1]:.2f}%"
            if args.decode:
                result += f" {psnr(pixels[name][-1][0], sum(v.numel() for v in decoded)):.1f} dB"
            results.append(result)
        print(f"seed {seed}: " + ", ".join(results) + f" (of {sum(counts)} tokens)", flush=True)
    tokens = sum(counts) * args.seeds
    for backend, values in totals.items():
        mean = sum(values) / len(values)
        line = f"| {args.config} | {backend} | bf16 | {100 * mean:.2f}% of {tokens} tokens equal the fp32 oracle |"
        if args.decode:  # pixels: PSNR over the [-1, 1] range (peak-to-peak 2) and relative RMS error
            error, reference = map(sum, zip(*pixels[backend], strict=True))
            count = sum(v.numel() for v in decoded) * args.seeds
            rms = 100 * math.sqrt(error / reference)
            line += f" decoded: {psnr(error, count):.1f} dB PSNR, {rms:.3f}% relative RMS error |"
        print(line, flush=True)


if __name__ == "__main__":
    main()
