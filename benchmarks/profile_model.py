"""Where a batch's time goes: the model's device time by kind of kernel, beside the batch's wall time.

``bench_model.py`` says how fast a batch runs; this says why. For each stage and batch size it runs an engine
(random V1 weights, 20x192x192 clips, 256 tokens: the targets' case) and reports, per batch:

- wall ms: the mean of ``--steps`` batches timed without the profiler (CUDA events on a GPU, the clock on a CPU);
- device busy ms: the union of the kernels' (and copies') intervals in ``--steps`` batches under ``torch.profiler``,
  so ``idle`` = wall less busy is the time the GPU waited on the host (launches, Python, synchronisation);
- ms per batch by kind (``CATEGORIES``, from the kernel's name: the fused attention, its q/k prologue, GEMMs, FP8
  quantisation, the gated GELU, FSQ, LayerNorm, copies, the rest), with the kernels a batch launches of that kind
  and its longest-running kernel, and each kind's share of the wall time.

On a CPU (no device events) the kinds are the ops' own CPU time (``self`` time of ``aten::`` ops: an op's children
not counted twice), and ``busy`` is their sum; that run checks the script, the GPU's table is the one to read.

    python benchmarks/profile_model.py --stages encode,decode --batches 1,32 --mode eager --out profile
    python benchmarks/profile_model.py --config tiny --device cpu --dtype float32 --shape 8x64x64 --tokens 64

Writes ``profile.md`` (the tables) and ``profile.jsonl`` (one line per case, with the 15 kernels that took
longest) to ``--out``, each case as soon as it is measured.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from titok_fast.engine import Engine
from titok_fast.loading import random_tokenizer

# (kind, pattern on a kernel's or op's name), the first that matches wins
CATEGORIES = [
    ("attention (fused)", r"_attention_kernel"),
    ("q/k norm + M-RoPE", r"_qk_norm_rope_kernel"),
    ("attention (other)", r"flash|fmha|attn|sdpa|scaled_dot_product|cudnn"),
    ("FP8 quantisation", r"_quantize_rows_kernel|_layer_norm_rows_kernel"),
    ("gated GELU", r"_gated_gelu(_fp8)?_kernel"),
    ("FSQ", r"_fsq_|_nearest_code"),
    ("GEMM", r"gemm|xmma|cutlass|nvjet|cublas|splitKreduce|_scaled_mm|aten::(mm|addmm|bmm|matmul|linear)\b"),
    ("LayerNorm", r"layer_norm|LayerNorm"),
    ("copies", r"memcpy|memset|copy|CatArray|aten::(cat|index|gather|scatter|clone|contiguous|to|_to_copy)\b"),
]
OTHER = "elementwise and other"
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")  # torch.profiler's chrome trace: the device's events


def kind_of(name: str) -> str:
    for kind, pattern in CATEGORIES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return kind
    return OTHER


def device_events(trace: dict) -> list[tuple[str, float, float]]:
    """(name, start us, duration us) of each kernel, copy and memset in a chrome trace of ``torch.profiler``."""
    return [(e["name"], float(e["ts"]), float(e["dur"])) for e in trace.get("traceEvents", [])
            if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES and "dur" in e]  # fmt: skip


def busy_us(events: list[tuple[str, float, float]]) -> float:
    """The length of the union of the events' intervals (streams may overlap: time counted once)."""
    total, end = 0.0, float("-inf")
    for _, start, duration in sorted(events, key=lambda e: e[1]):
        stop = start + duration
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def per_kernel(named: list[tuple[str, float, int]], steps: int) -> list[dict]:
    """Each kernel (or op) of (name, us, launches) over ``steps`` batches: its ms and launches per batch and its
    kind, longest first."""
    total: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for name, us, launches in named:
        total[name][0] += us / 1e3 / steps
        total[name][1] += launches
    ranked = sorted(total.items(), key=lambda i: -i[1][0])
    return [{"name": n, "ms": ms, "launches": c / steps, "kind": kind_of(n)} for n, (ms, c) in ranked]


def breakdown(kernels: list[dict]) -> dict[str, dict]:
    """Per kind of :func:`per_kernel`'s kernels: ms and launches per batch, and its longest kernel."""
    kinds: dict[str, dict] = {}
    for kernel in kernels:  # (longest first: a kind's first is its longest)
        kind = kinds.setdefault(kernel["kind"], {"ms": 0.0, "launches": 0.0, "top": kernel["name"]})
        kind["ms"] += kernel["ms"]
        kind["launches"] += kernel["launches"]
    return kinds


def wall_ms(step, steps: int, device: torch.device) -> float:
    """Mean ms per call of ``step`` over ``steps`` calls, nothing else timed (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            step()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / steps
    began = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - began) * 1e3 / steps


def profile_case(step, steps: int, device: torch.device) -> tuple[list[tuple[str, float, int]], float, list]:
    """(name, us, launches) of what ran in ``steps`` calls of ``step``, the busy us, and the device events (none on
    a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    if device.type != "cuda":
        named = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages() if e.self_cpu_time_total > 0]
        return named, sum(us for _, us, _ in named), []
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = device_events(json.loads(Path(f.name).read_text()))
    return [(n, d, 1) for n, _, d in events], busy_us(events), events


def table(case: dict) -> str:
    lines = [
        f"### {case['stage']}, batch {case['batch']} ({case['mode']}, {case['device']}, {case['dtype']})",
        "",
        f"wall {case['wall_ms']:.3f} ms per batch ({case['clips_per_s']:.1f} clips/s); device busy "
        f"{case['busy_ms']:.3f} ms ({case['busy_ms'] / case['wall_ms']:.0%}), idle {case['idle_ms']:.3f} ms",
        "",
        *(
            ["no device events were recorded (a profiler without CUPTI?): the kinds below are empty", ""]
            if case["device"] != "cpu" and not case["device_events"]
            else []
        ),
        "| kind | ms per batch | share of wall | launches per batch | longest kernel |",
        "|---|---|---|---|---|",
    ]
    for kind, row in sorted(case["kinds"].items(), key=lambda i: -i[1]["ms"]):
        name = row["top"] if len(row["top"]) <= 60 else row["top"][:57] + "..."
        lines.append(f"| {kind} | {row['ms']:.3f} | {row['ms'] / case['wall_ms']:.1%} | {row['launches']:.0f} | "
                     f"`{name}` |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="v1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--stages", default="encode,decode")
    p.add_argument("--batches", default="1,32", help="batch sizes, comma-separated")
    p.add_argument("--mode", default="eager", help="the engine's mode (eager, auto, cudagraph, compile)")
    p.add_argument("--precision", default="default", choices=["default", "fp8"])
    p.add_argument("--shape", default="20x192x192", help="each clip's frames x height x width")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="batches timed, and batches profiled")
    p.add_argument("--out", type=Path, default=Path("profile"))
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = tuple(int(v) for v in args.shape.split("x"))
    if len(shape) != 3:
        p.error(f"--shape is frames x height x width, e.g. 20x192x192; got {args.shape!r}")
    model = random_tokenizer(args.config, seed=0, device=device, dtype=dtype, precision=args.precision)
    model.backend = "triton" if device.type == "cuda" else "torch"
    engine = Engine(model, mode=args.mode, max_clips=max(int(b) for b in args.batches.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.md").write_text(f"# Device time by kind of kernel ({args.config}, {args.shape}, "
                                         f"{args.tokens} tokens)\n\n")  # fmt: skip
    found = []
    for stage in args.stages.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            g = torch.Generator().manual_seed(batch)
            videos = [(torch.rand((3, *shape), generator=g) * 2 - 1).to(device=device, dtype=dtype)
                      for _ in range(batch)]  # fmt: skip
            counts = [args.tokens] * batch
            if stage == "encode":

                def step(videos=videos, counts=counts):
                    return engine.encode(videos, counts)
            else:
                indices = engine.encode(videos, counts)[1]["indices"]

                def step(indices=indices, shapes=[shape] * batch):
                    return engine.decode_indices(indices, shapes)

            for _ in range(2):  # warm-up: compilation, autotuning, a layout's graph (captured at its second batch)
                step()
            wall = wall_ms(step, args.steps, device)
            named, busy, events = profile_case(step, args.steps, device)
            kernels = per_kernel(named, args.steps)
            case = {
                "stage": stage, "batch": batch, "mode": args.mode, "precision": args.precision,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": args.dtype,
                "config": args.config, "shape": args.shape, "tokens": args.tokens, "steps": args.steps,
                "wall_ms": wall, "clips_per_s": batch / wall * 1e3, "busy_ms": busy / 1e3 / args.steps,
                "kinds": breakdown(kernels), "top": kernels[:15],
                "modes_run": sorted(engine.modes_run), "device_events": len(events),
            }  # fmt: skip
            case["idle_ms"] = max(case["wall_ms"] - case["busy_ms"], 0.0)
            found.append(case)
            with open(args.out / "profile.jsonl", "a") as f:
                f.write(json.dumps(case) + "\n")
            with open(args.out / "profile.md", "a") as f:
                f.write(table(case) + "\n")
            print(table(case), flush=True)
    return found


if __name__ == "__main__":
    main()
