"""Rate-distortion figures for ``titok-fast eval --plot``: PSNR and SSIM against the token count. Needs matplotlib,
the optional ``plot`` extra."""

from __future__ import annotations

import os
from typing import Any

from .files import AtomicFile, absolute

PLOT_EXTRA = "pip install 'titok-fast[plot]'"


def require_matplotlib() -> None:
    """Raise a one-line ValueError naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(f"--plot needs matplotlib: {PLOT_EXTRA}") from None


def rate_distortion_figure(series: dict[str, dict[int, dict[str, float]]], title: str = "") -> Any:
    """A matplotlib Figure with two axes, PSNR (dB) and SSIM against tokens per clip, one line per series.

    series: label (e.g. an input resolution "1280x720") -> {tokens: {"psnr": dB, "ssim": value}}."""
    require_matplotlib()
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    axes = figure.subplots(1, 2)
    for label, rows in series.items():
        counts = sorted(rows)
        for ax, metric in zip(axes, ("psnr", "ssim"), strict=True):
            ax.plot(counts, [rows[n][metric] for n in counts], marker="o", label=label)
    for ax, name in zip(axes, ("PSNR (dB)", "SSIM"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per clip")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[0].legend(title="input resolution")
    if title:
        figure.suptitle(title)
    return figure


def save_figure(figure: Any, path: str | os.PathLike[str]) -> None:
    """Write `figure` as a PNG to `path` (its folder made if need be), atomically."""
    os.makedirs(os.path.dirname(absolute(path)), exist_ok=True)
    with AtomicFile(path, tidy=True) as target:  # (what a killed run left of it goes)
        figure.savefig(target.temporary, format="png", dpi=120)
