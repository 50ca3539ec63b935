"""The speed targets of a GPU session, met or missed, from what ``gpu_session.sh`` wrote (its ``targets`` part, or
the parts kernels, encode, decode, fp8, parity and pipeline).

Usage: ``python benchmarks/targets.py gpu-results`` prints a markdown table: target, measured, verdict. A target
whose numbers are not in the folder (a part cut short, a provider skipped) says "not measured"; nothing is
estimated. The end-to-end ratios divide by ``upstream-packed`` (upstream's packed path, the baseline) and use the
CLI's default mode ``auto``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

SIDES = ("encoder", "decoder")


def read_jsonl(folder: Path, *names: str) -> list[dict]:
    rows = []
    for name in names:
        path = folder / f"{name}.jsonl"
        if path.is_file():
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def _rate(rows: list[dict], case: str, provider: str, key: str) -> float | None:
    """The last measurement of ``provider`` in ``case`` (a later run of the same case replaces an earlier one)."""
    found = [r[key] for r in rows if r.get("case") == case and r.get("provider") == provider and key in r]
    return found[-1] if found else None


def _verdict(value: float | None, goal: float, unit: str, measured: str = "") -> tuple[str, str]:
    if value is None:
        return "not measured", "-"
    return measured or f"{value:.2f}{unit}", "**met**" if value >= goal else "**missed**"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def model_targets(rows: list[dict]) -> list[tuple[str, str, str]]:
    """Targets of the fused attention and the end-to-end model (GPU speed, round two)."""
    out = []
    for side in SIDES:
        case = next((r["case"] for r in rows if r.get("case", "").startswith(f"kernel-attention-{side}-")), "")
        titok, fa2 = _rate(rows, case, "titok", "tflops_per_s"), _rate(rows, case, "fa2_alone", "tflops_per_s")
        out.append((f"attention ({side}) >= 450 TFLOP/s", *_verdict(titok, 450, " TFLOP/s")))
        out.append((f"attention ({side}) >= 1.3x FlashAttention-2 alone", *_verdict(_ratio(titok, fa2), 1.3, "x")))

    def clips(stage: str, batch: int, provider: str) -> float | None:
        return _rate(rows, f"gpu-{stage}-v1-20x192x192-n256-b{batch}", provider, "clips_per_s")

    for stage, batch, goal in (("encode", 1, 3.0), ("encode", 32, 2.5), ("decode", 32, 2.0)):
        ratio = _ratio(clips(stage, batch, "auto"), clips(stage, batch, "upstream-packed"))
        out.append((f"{stage} b{batch} >= {goal}x upstream-packed", *_verdict(ratio, goal, "x")))
    out.append(("encode b32, 256 tokens >= 850 clips/s", *_verdict(clips("encode", 32, "auto"), 850, " clips/s")))
    for stage in ("encode", "decode"):
        for batch in (1, 8, 32):
            ratio = _ratio(clips(stage, batch, "auto"), clips(stage, batch, "eager"))
            goal = 1.3 if (stage, batch) == ("encode", 1) else 1.0
            out.append((f"auto >= {goal}x eager, {stage} b{batch}", *_verdict(ratio, goal, "x")))
    for stage in ("encode", "decode"):
        ratio = _ratio(clips(stage, 32, "fp8"), clips(stage, 32, "auto"))
        out.append((f"fp8 >= 1.3x bf16 (auto), {stage} b32", *_verdict(ratio, 1.3, "x")))
    return out


def parity_target(text: str) -> list[tuple[str, str, str]]:
    """FP8 token agreement within one point of the bf16 floor (the oracle in bf16), from bf16_parity.py's table."""
    shares = {m[1]: float(m[2]) for m in re.finditer(r"^\| \w+ \| ([\w+-]+) \| bf16 \| ([\d.]+)% of", text, re.M)}
    floor, fp8 = shares.get("reference"), next((v for k, v in shares.items() if k.endswith("+fp8")), None)
    if floor is None or fp8 is None:
        return [("fp8 tokens within 1 point of the bf16 floor", "not measured", "-")]
    gap = floor - fp8
    return [("fp8 tokens within 1 point of the bf16 floor", f"{fp8:.2f}% vs {floor:.2f}% ({gap:+.2f} points)",
             "**met**" if gap <= 1.0 else "**missed**")]  # fmt: skip


def pipeline_targets(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The input pipeline's aims, each against the "before" row of the same run."""
    by = {r.get("source"): r for r in rows}  # the last row of each label and source

    def get(label: str, key: str) -> float | None:
        return by.get(label, {}).get(key)

    before = get("before 720p30", "cpu_s_per_clip")
    after = get("after 720p30", "cpu_s_per_clip")
    share = _ratio(before, after)  # before / after >= 1 / 0.6
    out = [("720p30: CPU-s per clip <= 0.6x before",
            *_verdict(share, 1 / 0.6, "", f"{after:.3f} vs {before:.3f} ({after / before:.2f}x)" if share else ""))]
    busy = _ratio(get("after 256p8", "clips_per_s"), get("after 256p8", "model_only_clips_per_s"))
    out.append(("256p8 end to end >= 60% of model-only clips/s",
                *_verdict(busy, 0.6, "", f"{100 * busy:.0f}%" if busy is not None else "")))
    nvdec = _ratio(get("nvdec 720p30", "clips_per_s"), get("before 720p30", "clips_per_s"))
    out.append(("NVDEC 720p30 end to end >= 2x before", *_verdict(nvdec, 2.0, "x")))  # fmt: skip
    return out


def report(folder: Path) -> str:
    rows = model_targets(read_jsonl(folder, "kernels", "encode", "decode", "fp8"))
    parity = folder / "parity.txt"
    rows += parity_target(parity.read_text() if parity.is_file() else "")
    rows += pipeline_targets(read_jsonl(folder, "pipeline"))
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    return "\n".join(lines + [f"| {t} | {m} | {v} |" for t, m, v in rows])


if __name__ == "__main__":
    print(report(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-results")))
