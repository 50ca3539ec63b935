"""End-to-end encode/decode throughput: upstream's path vs titok-fast, clips/s, tokens/s, peak memory, MFU.

Baselines (``baselines.py``): ``upstream-packed`` (upstream's inference path, the whole batch in one packed
varlen pass, FlashAttention-2 varlen on a GPU: what every ratio divides by), ``upstream`` (upstream's own code,
only with ``--upstream PATH`` or ``TITOK_UPSTREAM``), and ``reference`` (the per-video oracle: no user's path,
kept as a label for the older tables).
- CPU (any machine): the tiny config (12x160x160 clips, 256 tokens, batch 4) and V1 (one 8x64x64 clip, 128
  tokens); titok-fast providers ``torch`` (the lean model) and ``engine`` (eager engine).
- GPU (skipped without CUDA): V1 in bf16 at 20x192x192 with 256 and 1024 tokens, batches 1, 8, 32, and a mixed
  batch (144-192p, 8-20 frames, 128-1024 tokens); titok-fast providers ``eager``, ``compile``, ``cudagraph``,
  ``auto`` (the engine's modes, triton backend), ``fp8`` (``auto`` with the decoder layers' Linears in FP8) and
  ``auto-unfused`` (``auto`` with the layers' LayerNorms in PyTorch and each residual added by a kernel of its own
  after its GEMM, as before 071e2a1: what the LayerNorm kernel and the residual in the GEMM's epilogue gain,
  measured in the same run).

TFLOP/s and MFU count the FLOPs each provider executes (:func:`executed_flops`; the row's ``flops_counted`` says
which): upstream's paths and the oracle every row through every layer (model FLOPs); the packed path (the lean
model, ``eager``, and ``auto`` where it picks eager) skips the last layer's work on rows that do not come out; the
fixed-shape modes every real row through every layer (their padding rows run too, uncounted). The time is the mean
of the timed rounds; each row also carries their spread (``ms_min``, ``ms_max``, ``ms_stddev``).

``titok-fast bench`` runs this file and prints the table; ``python benchmarks/report.py out.json`` does too.
With TITOK_BENCH_LOG set, each case is also appended to that file as a JSON line the moment it is measured
(``run`` names the process that measured it: a ratio takes both numbers from one run).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import platform
import random
import time
from collections.abc import Iterator

import pytest
import torch

from titok_fast import backends
from titok_fast import engine as engine_module
from titok_fast.backends import TRITON, Backend
from titok_fast.benchreport import append_row
from titok_fast.config import TiTokConfig
from titok_fast.engine import Engine, auto_mode, padded_mode, plan_batches
from titok_fast.loading import random_tokenizer
from titok_fast.model import TiTok
from titok_fast.patches import patch_grid
from titok_fast.reference import ReferenceTiTok

from baselines import UpstreamPacked, load_upstream, upstream_checkout

CUDA = torch.cuda.is_available()
H100_DENSE_BF16 = 989e12  # FLOP/s, the card's dense bf16 peak, for MFU (of the FLOPs executed: executed_flops)
RUN = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"  # this process's rows in the log
_MODELS: dict = {}
WARM_UPS = 2  # calls of a case before its timed rounds (an auto engine captures a small batch's layout at the second)
FLOP_COUNTS = {  # what a FLOP count counts, by the path that runs (the logged row's ``flops_counted``)
    "model": "model FLOPs: every row through every layer",
    "eager": "packed path: every row through every layer but the last, whose attention, out_proj and FFN run "
    "for the output rows only",
    "fixed": "fixed shape: every real row through every layer (padding rows run too, not counted)",
}


def _patches(config: TiTokConfig, shapes: list) -> list[int]:
    """Patches of each clip; a clip's packed rows are its tokens plus these."""
    return [math.prod(patch_grid(s, config.patch_size)) for s in shapes]


def clip_flops(config: TiTokConfig, stage: str, shapes: list, counts: list, path: str = "model") -> float:
    """FLOPs of one pass of ``stage`` over the clips as ``path`` (a key of ``FLOP_COUNTS``) runs it."""
    grids = _patches(config, shapes)
    rows = [n + g for n, g in zip(counts, grids, strict=True)]
    stack = config.encoder if stage == "encode" else config.decoder
    if path == "eager":  # the last layer's output rows: latent rows out of the encoder, patch rows out of the decoder
        return stack.packed_flops(rows, list(counts) if stage == "encode" else grids)
    return stack.flops(rows)  # "fixed" counts the same: the real rows only, the padding up to the budget is not


def engine_modes(
    rows: list[int], mode: str, device: torch.device, budgets, max_clips: int, stage: str = "encode", layouts=None,
    passes: int = 1,
) -> list[tuple[list, str]]:
    """The batches an engine in ``mode`` runs ``stage`` clips of ``rows`` packed rows in (clip positions), each
    with the mode it runs in (``auto`` picks ``"layout"``, ``"cudagraph"`` or ``"eager"``), in the last of
    ``passes`` passes of a fresh engine over the clips: batched and picked as ``Engine`` does. ``layouts``: each
    clip's (shape, token count), which tell a layout's first batch (padded or eager), its graph from its second,
    and the layouts past ``LAYOUT_GRAPHS`` (padded or eager); without them all batches are of one layout."""
    kept, seen = set(), set()
    for _ in range(passes):
        out = []
        for batch in plan_batches(rows, budgets, max_clips):
            total = sum(rows[i] for i in batch)
            picked = auto_mode(total, device, budgets, stage) if mode == "auto" else mode
            key = None if layouts is None else tuple(layouts[i] for i in batch)
            if picked == "layout" and key not in kept:
                again = key in seen or engine_module.CAPTURE_AT_FIRST_BATCH
                if again and len(kept) < engine_module.LAYOUT_GRAPHS:
                    kept.add(key)
                else:
                    seen.add(key)
                    picked = padded_mode(total, budgets, stage)
            out.append((batch, picked))
    return out


def engine_paths(*args, **kwargs) -> list[tuple[list, str]]:
    """:func:`engine_modes`' batches, each with the path its mode takes: ``"eager"`` (the packed path, also what a
    graph of a batch's own layout replays) or ``"fixed"`` (padded to a budget)."""
    return [(batch, "eager" if m in ("eager", "layout") else "fixed") for batch, m in engine_modes(*args, **kwargs)]


def executed_flops(runner, config: TiTokConfig, stage: str, shapes: list, counts: list) -> tuple[float, str]:
    """(FLOPs ``runner`` executes in one pass over the clips, what they count): an engine per batch by the path it
    runs in a timed round (after the warm-ups), the lean model its packed path, upstream's paths and the oracle
    every row through every layer."""
    if isinstance(runner, Engine):
        rows = [n + g for n, g in zip(counts, _patches(config, shapes), strict=True)]
        paths = engine_paths(rows, runner.mode, runner.model.device, runner.budgets, runner.max_clips, stage,
                             list(zip(shapes, counts, strict=True)), passes=WARM_UPS + 1)  # fmt: skip
        flops = sum(clip_flops(config, stage, [shapes[i] for i in b], [counts[i] for i in b], p) for b, p in paths)
        return flops, "; ".join(FLOP_COUNTS[p] for p in sorted({p for _, p in paths}))
    path = "eager" if isinstance(runner, TiTok) else "model"
    return clip_flops(config, stage, shapes, counts, path), FLOP_COUNTS[path]


def model_for(config: str, provider: str, device: str, dtype: torch.dtype):
    """One set of random weights per (config, device, dtype), shared by every provider (``fp8``: a copy of its own
    in that precision, the same weights)."""
    key = (config, device, dtype)
    if key not in _MODELS:
        _MODELS[key] = random_tokenizer(config, seed=0, device=device, dtype=dtype)
    model = _MODELS[key]
    if provider == "auto-unfused":  # (the same engine; run_case undoes the fusions around it)
        provider = "auto"
    if provider == "fp8":
        if (*key, "fp8") not in _MODELS:
            _MODELS[(*key, "fp8")] = random_tokenizer(config, seed=0, device=device, dtype=dtype, precision="fp8")
        model, provider = _MODELS[(*key, "fp8")], "auto"
    if provider == "upstream":
        if upstream_checkout() is None:
            pytest.skip("provider upstream needs --upstream PATH (or TITOK_UPSTREAM): a checkout of old-variableComp")
        return load_upstream(model.state_dict(), model.config, device=device, dtype=dtype)
    if provider in ("upstream-packed", "reference"):
        if provider == "upstream-packed":
            ref = UpstreamPacked(model.config)
        else:
            ref = ReferenceTiTok(model.config, fused_attention=device == "cuda")
        ref.load_state_dict(model.state_dict())
        return ref.to(device=device, dtype=dtype).eval()
    model.backend = "torch" if device == "cpu" else "triton"
    if provider in ("torch",):
        return model
    mode = "eager" if provider == "engine" else provider
    return Engine(model, mode=mode, max_clips=32)


def clips(shapes: list, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand((3, *s), generator=g) * 2 - 1).to(device=device, dtype=dtype) for s in shapes]


def _storages(modules) -> dict[int, int]:
    """The distinct storages of the modules' parameters and buffers: their address -> bytes."""
    found = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


def _module_of(runner) -> torch.nn.Module:
    """The model a runner computes with (an Engine's, upstream's module, or the runner itself)."""
    return runner.model if isinstance(runner, Engine) else getattr(runner, "module", runner)


@contextlib.contextmanager
def unfused(apart: bool) -> Iterator[None]:
    """With ``apart``, the triton backend runs the layers' LayerNorms as PyTorch's module and adds each residual
    after its GEMM, in a kernel of its own (the base backend's ``x + linear(h)``), as it did before both fusions."""
    if not apart:
        yield
        return
    TRITON.add_linear = functools.partial(Backend.add_linear, TRITON)
    norm_in_kernel, backends._norm_in_kernel = backends._norm_in_kernel, lambda ln, x: False
    try:
        yield
    finally:
        del TRITON.add_linear
        backends._norm_in_kernel = norm_in_kernel


def run_case(benchmark, stage, config, provider, shapes, counts, device, dtype, rounds):
    with unfused(provider == "auto-unfused"):
        _run_case(benchmark, stage, config, provider, shapes, counts, device, dtype, rounds)


def _run_case(benchmark, stage, config, provider, shapes, counts, device, dtype, rounds):
    if device == "cuda":  # drop what earlier cases left behind, so peak memory is this case's
        for model in _MODELS.values():  # (what is derived from the weights, the decoder's table and FP8 copies,
            model.weights_changed()  # kept as attributes: rebuilt by the case that uses it, inside its count)
        gc.collect()
        torch.cuda.empty_cache()
        cached = _storages(_MODELS.values())  # weights kept for other cases: counted only where this runner uses them
        allocated = torch.cuda.memory_allocated()
    runner = model_for(config, provider, device, dtype)
    if device == "cuda":  # this case's memory: what it allocates, and the cached weights it runs on; not weights
        # cached now for other providers (upstream-packed builds a copy of its own from the shared model)
        own = _storages([_module_of(runner)])
        allocated -= sum(n for p, n in own.items() if p in cached)
        allocated += sum(n for p, n in _storages(_MODELS.values()).items() if p not in cached and p not in own)
    videos = clips(shapes, device, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if stage == "encode":

        def step():
            out = runner.encode(videos, counts)
            sync()
            return out
    else:  # the indices to decode come from the plain model: a compile runner would compile the encoder too
        _, out = _MODELS[(config, device, dtype)].encode(videos, counts)
        indices = out["indices"]

        def step():
            recon = runner.decode_indices(indices, shapes)
            sync()
            return recon

    for _ in range(WARM_UPS):  # outside the timed rounds: compilation, autotuning, graph capture
        step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    modes_before = runner.modes_run.copy() if isinstance(runner, Engine) else None
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=0)
    stats = benchmark.stats.stats
    mean = stats.mean
    flops, counted = executed_flops(runner, TiTokConfig.from_any(config), stage, shapes, counts)
    benchmark.extra_info.update(
        stage=stage,
        provider=provider,
        clips_per_s=len(shapes) / mean,
        tokens_per_s=sum(counts) / mean,
        ms_min=stats.min * 1e3,  # the spread of the timed rounds (the rates above are from their mean)
        ms_max=stats.max * 1e3,
        ms_stddev=stats.stddev * 1e3,
        rounds=stats.rounds,
        tflops_per_s=flops / mean / 1e12,
        flops_counted=counted,
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    if isinstance(runner, Engine):  # graphs: compiled or captured; ran: the modes its timed batches ran in
        ran = ",".join(sorted(runner.modes_run - modes_before))
        benchmark.extra_info.update(mode=runner.mode, graphs=runner.compiles, ran=ran)
    if device == "cuda":
        benchmark.extra_info.update(
            peak_mem_gib=(torch.cuda.max_memory_allocated() - allocated) / 2**30, mfu=flops / mean / H100_DENSE_BF16
        )
    log = os.environ.get("TITOK_BENCH_LOG")
    if log:  # one line per case as soon as it is measured: a run cut short keeps what it measured
        append_row(log, {"case": benchmark.group, "run": RUN, "mean_s": mean, **benchmark.extra_info})


CPU_CASES = {
    "tiny-12x160x160-n256-b4": ("tiny", [(12, 160, 160)] * 4, [256] * 4),
    "v1-8x64x64-n128-b1": ("v1", [(8, 64, 64)], [128]),
}


@pytest.mark.parametrize("provider", ["upstream-packed", "upstream", "reference", "torch", "engine"])
@pytest.mark.parametrize("case", list(CPU_CASES))
@pytest.mark.parametrize("stage", ["encode", "decode"])
def test_cpu(benchmark, stage, case, provider):
    config, shapes, counts = CPU_CASES[case]
    benchmark.group = f"cpu-{stage}-{case}"
    run_case(benchmark, stage, config, provider, shapes, counts, "cpu", torch.float32, rounds=3)


def mixed_batch(size: int = 32, seed: int = 0) -> tuple[list, list]:
    rng = random.Random(seed)
    shapes = [(rng.choice([8, 12, 16, 20]), rng.choice([144, 160, 176, 192]), rng.choice([144, 160, 176, 192]))
              for _ in range(size)]  # fmt: skip
    return shapes, [rng.randint(128, 1024) for _ in range(size)]


GPU_CASES = {
    **{f"v1-20x192x192-n{n}-b{b}": ([(20, 192, 192)] * b, [n] * b) for n in (256, 1024) for b in (1, 8, 32)},
    "v1-mixed-b32": mixed_batch(),
}


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize(
    "provider", ["upstream-packed", "upstream", "eager", "compile", "cudagraph", "auto", "fp8", "auto-unfused"]
)
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("stage", ["encode", "decode"])
def test_gpu(benchmark, stage, case, provider):
    if (stage, provider) == ("encode", "fp8"):
        pytest.skip("FP8 runs in the decoder only: encoding in precision fp8 is auto's")
    shapes, counts = GPU_CASES[case]
    benchmark.group = f"gpu-{stage}-{case}"
    run_case(benchmark, stage, "v1", provider, shapes, counts, "cuda", torch.bfloat16, rounds=5)
