"""End-to-end encode/decode throughput: the oracle vs titok-fast, clips/s and tokens/s.

CPU cases (the tiny config, 12x160x160 clips, 256 tokens, batch 4; V1 with one 8x64x64 clip and 128 tokens)
run anywhere. Run: ``python -m pytest benchmarks/bench_model.py --benchmark-only``.
"""

from __future__ import annotations

import platform

import pytest
import torch

from titok_fast import TiTok
from titok_fast.layers import perturb_norms
from titok_fast.reference import ReferenceTiTok

CPU_CASES = {
    "tiny-12x160x160-n256-b4": ("tiny", (12, 160, 160), 256, 4),
    "v1-8x64x64-n128-b1": ("v1", (8, 64, 64), 128, 1),
}
_MODELS: dict = {}


def cpu_model(config: str, provider: str):
    """One set of random weights per config, shared by every provider."""
    if config not in _MODELS:
        torch.manual_seed(0)
        model = TiTok(config, backend="torch").eval()
        perturb_norms(model)
        _MODELS[config] = model
    model = _MODELS[config]
    if provider == "reference":
        ref = ReferenceTiTok(model.config).eval()
        ref.load_state_dict(model.state_dict())
        return ref
    return model


def _record(benchmark, clips: int, tokens: int) -> None:
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        clips_per_s=clips / mean,
        tokens_per_s=tokens / mean,
        device=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )


@pytest.mark.parametrize("provider", ["reference", "torch"])
@pytest.mark.parametrize("case", list(CPU_CASES))
@pytest.mark.parametrize("stage", ["encode", "decode"])
def test_cpu_throughput(benchmark, stage, case, provider):
    config, shape, tokens, batch = CPU_CASES[case]
    model = cpu_model(config, provider)
    g = torch.Generator().manual_seed(0)
    videos = [torch.rand((3, *shape), generator=g) * 2 - 1 for _ in range(batch)]
    counts = [tokens] * batch
    benchmark.group = f"cpu-{stage}-{case}"
    if stage == "encode":
        benchmark.pedantic(model.encode, args=(videos, counts), rounds=3, warmup_rounds=1)
    else:
        _, out = model.encode(videos, counts)
        benchmark.pedantic(model.decode_indices, args=(out["indices"], [shape] * batch), rounds=3, warmup_rounds=1)
    _record(benchmark, batch, tokens * batch)
