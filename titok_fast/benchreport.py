"""A pytest-benchmark JSON file as markdown tables, with the speed-up over the baseline per case (the tables of
``benchmarks/RESULTS.md``; printed by ``titok-fast bench`` and ``python benchmarks/report.py``)."""

from __future__ import annotations

import json
import os
from collections import defaultdict

# what the ratio column divides by, the first one present: upstream's packed path, else older tables' baselines,
# else the row its benchmark marks ``baseline`` (a sweep's default configuration); the column names it. A group with
# none of them (rows of different sources, the compile parts' eager-only rows) has no ratio column.
BASELINES = ("upstream-packed", "reference", "fa2_alone", "torch_flash", "torch")
COLUMNS = [  # header, key, format (given the value and, by name, the row's other fields)
    ("ms", "ms", "{:.3f}"),
    ("ms p20", "ms_p20", "{:.3f}"),
    ("ms p80", "ms_p80", "{:.3f}"),
    ("clips/s", "clips_per_s", "{:.2f}"),
    ("ms min-max (sd)", "ms_min", "{:.2f}-{ms_max:.2f} ({ms_stddev:.2f})"),  # end to end: the timed rounds' spread
    ("tokens/s", "tokens_per_s", "{:.0f}"),
    ("TFLOP/s", "tflops_per_s", "{:.1f}"),
    ("GB/s", "gb_per_s", "{:.0f}"),
    ("MFU", "mfu", "{:.1%}"),
    ("peak GiB", "peak_mem_gib", "{:.1f}"),
    ("us/file", "us_per_file", "{:.0f}"),
    ("host us/call", "host_us_per_call", "{:.1f}"),
]


def table(path: str) -> str:
    """The benchmarks of the JSON file at ``path``, one markdown table per group, one row per provider."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
    benches = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(benches, list) or not all(
        isinstance(b, dict) and isinstance(b.get("extra_info"), dict) for b in benches
    ):
        raise ValueError(f"{path}: not a pytest-benchmark JSON file (expected a list of benchmarks with extra_info)")
    groups = defaultdict(list)
    for bench in benches:
        groups[bench.get("group")].append(bench)
    lines = []
    for group, benches in groups.items():
        info = [b["extra_info"] for b in benches]
        used = [c for c in COLUMNS if any(c[1] in i for i in info)]
        speed = next((k for k in ("clips_per_s", "tflops_per_s", "gb_per_s") if k in info[0]), None)  # higher: faster
        by_provider = {i.get("provider"): i for i in info}
        baseline = next((by_provider[p] for p in BASELINES if p in by_provider),
                        next((i for i in info if i.get("baseline") is True), None))  # fmt: skip
        base = baseline.get(speed) if baseline is not None else None
        lines += [f"\n**{group}** ({info[0].get('device', '?')}, torch {info[0].get('torch', '?')})", ""]
        versus = [f"vs {baseline.get('provider', '?')}"] if base else []
        lines.append("| " + " | ".join(["provider", *(c[0] for c in used), *versus]) + " |")
        lines.append("|---" * (len(used) + 1 + len(versus)) + "|")
        for i in info:
            cells = [fmt.format(i[key], **i) if key in i else "" for _, key, fmt in used]
            cells += [f"{i[speed] / base:.2f}x" if speed in i else ""] if base else []
            lines.append("| " + " | ".join([i.get("provider", "?"), *cells]) + " |")
    return "\n".join(lines)


def append_row(path: str | os.PathLike, record: dict) -> None:
    """``record`` appended to the benchmark log at ``path`` as a JSON line, as soon as it is measured (a run cut
    short keeps what it measured), with the ``gpu_session.sh`` session that runs it (``$TITOK_BENCH_SESSION``:
    benchmarks/targets.py judges a log's latest session alone)."""
    session = {"session": s} if (s := os.environ.get("TITOK_BENCH_SESSION")) else {}
    with open(path, "a") as log:
        log.write(json.dumps({**record, **session}) + "\n")
