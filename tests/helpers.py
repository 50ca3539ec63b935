"""Shared builders for tests: random-weight models with non-trivial LayerNorm affines, random clips; calls in threads
at once."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from titok_fast import TiTok
from titok_fast.layers import perturb_norms
from titok_fast.reference import ReferenceTiTok


def make_model(config: str = "tiny", backend: str = "torch", seed: int = 0) -> TiTok:
    """Random weights with perturbed LayerNorm affines and sharpened attention (see ``perturb_norms``)."""
    torch.manual_seed(seed)
    model = TiTok(config, backend=backend).eval()
    perturb_norms(model)
    return model


def make_reference(model: TiTok) -> ReferenceTiTok:
    """The oracle with ``model``'s weights, dtype and config (on the CPU)."""
    ref = ReferenceTiTok(model.config).eval()
    ref.load_state_dict(model.state_dict())
    return ref.to(model.dtype)


def random_videos(shapes: list[tuple[int, int, int]], seed: int = 1, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand((3, *s), generator=g) * 2 - 1).to(dtype) for s in shapes]


def distinct(indices: tuple | list) -> int:
    return len(set(torch.cat(list(indices)).tolist()))


def agreement(a: tuple | list, b: tuple | list) -> float:
    """Fraction of tokens whose indices agree."""
    return (torch.cat(list(a)).long() == torch.cat(list(b)).long()).float().mean().item()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def in_threads(*calls):
    """Run each call in a thread of its own; their results, in order (a call's exception is raised here)."""
    results, errors = [None] * len(calls), []

    def run(k, call):
        try:
            results[k] = call()
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k, call)) for k, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def spaced_rows(x: torch.Tensor) -> torch.Tensor:
    """x's values as a view whose rows are 40 values apart more than their width (the kernels take any row
    stride), the values between them large enough to change a row's peak if they were read."""
    wide = torch.full((x.shape[0], x.shape[1] + 40), 3e4, dtype=x.dtype, device=x.device)
    wide[:, : x.shape[1]] = x
    return wide[:, : x.shape[1]]


def norm_rows(k: int, rows: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, weight, bias) for the LayerNorm kernels' tests: ``rows`` rows of ``k`` values whose scales spread over
    six decades, with offsets, as a view of rows a stride apart (:func:`spaced_rows`), and a perturbed affine."""
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(rows, k, generator=g) * 3 + 1) * torch.logspace(-3, 3, rows)[:, None]
    weight, bias = 1 + 0.3 * torch.randn(k, generator=g), 0.3 * torch.randn(k, generator=g)
    x, weight, bias = (t.to(device, dtype) for t in (x, weight, bias))
    return spaced_rows(x), weight, bias


def benchmark_json(cmd: list[str]) -> Path:
    """Where a ``titok-fast bench`` command line has pytest-benchmark write its results."""
    (path,) = [Path(a.split("=", 1)[1]) for a in cmd if a.startswith("--benchmark-json=")]
    return path
