"""The speed targets of a GPU session, met or missed, from what ``gpu_session.sh`` wrote (its ``targets`` part, or
the parts kernels, encode, decode, fp8, parity and pipeline).

Usage: ``python benchmarks/targets.py gpu-results`` prints a markdown table: target, measured, verdict. A target
whose numbers are not in the folder (a part cut short, a provider skipped) says "not measured"; nothing is
estimated. The end-to-end ratios divide by ``upstream-packed`` (upstream's packed path, the baseline) and use the
CLI's default mode ``auto``. Every ratio takes both its numbers from one run, in one log: encode targets from
``encode.jsonl``, decode targets from ``decode.jsonl``, fp8 from ``fp8.jsonl`` (against the bf16 ``auto`` row of
that run), attention from ``kernels.jsonl`` (or, for a side it has no row of, ``attention.jsonl``: the part
attention); where a log holds several runs (rows with a ``run`` field), the latest run that measured both. A log
appended to by several sessions of ``gpu_session.sh`` (``gpu-results/`` without ``$OUT``: rows with a ``session``
field) is judged on its latest session's rows alone, so that no target divides a number of this session by one of an
earlier session, or of another card; the table says which session and card each log's rows came from. A number is
shown with as many digits as it takes to tell it from its goal (2.996 is not shown as 3.00 beside a miss).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

SIDES = ("encoder", "decoder")


def read_jsonl(folder: Path, *names: str) -> list[dict]:
    """The rows of ``<name>.jsonl``; a line that is not a JSON object (the last one of a part its time limit cut
    off mid-write) is left out, with a note on stderr."""
    rows = []
    for name in names:
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError:
                row = "unreadable"
            if isinstance(row, dict):
                rows.append(row)
            elif row is not None:
                print(f"targets: {path}:{number}: not a JSON object (cut off?), left out", file=sys.stderr)
    return rows


def latest_session(rows: list[dict]) -> list[dict]:
    """The rows of the session that wrote the last row, from the end of the log back to the first row of another
    (``session``: set by ``gpu_session.sh`` for every row of one invocation; rows without one, as a benchmark run
    by hand writes them, count as a session while they follow one another)."""
    first = len(rows)
    while first and rows[first - 1].get("session") == rows[-1].get("session"):
        first -= 1
    return rows[first:]


def provenance(name: str, rows: list[dict]) -> str:
    """Where a log's judged rows came from: their session, card and commit (those the rows say)."""
    if not rows:
        return f"{name}: no rows"
    cards = sorted({str(r.get("gpu") or r["device"]) for r in rows if r.get("gpu") or r.get("device")})
    cards = cards or ["card not logged"]
    commits = sorted({str(r["commit"]) for r in rows if r.get("commit")})
    session = rows[-1].get("session") or "unnamed"
    return (f"{name}: {len(rows)} row{'' if len(rows) == 1 else 's'} of session {session} ({'/'.join(cards)}"
            f"{', commit ' + '/'.join(commits) if commits else ''})")


def _rate(rows: list[dict], case: str, provider: str, key: str) -> float | None:
    """The last measurement of ``provider`` in ``case`` (a later run of the same case replaces an earlier one)."""
    found = [r[key] for r in rows if r.get("case") == case and r.get("provider") == provider and key in r]
    return found[-1] if found else None


def _rates(rows: list[dict], case: str, providers: tuple[str, str], key: str) -> tuple[float | None, ...]:
    """The last measurements of both ``providers`` in ``case`` from one run: the latest run that measured both
    (rows without a ``run`` field count as one run), else none."""
    runs = [r.get("run") for r in rows if r.get("case") == case and key in r]
    for run in reversed(dict.fromkeys(runs)):  # latest first, by each run's first row
        in_run = [r for r in rows if r.get("run") == run]
        found = tuple(_rate(in_run, case, p, key) for p in providers)
        if None not in found:
            return found
    return (None,) * len(providers)


def shown(value: float, goal: float, digits: int = 2) -> str:
    """``value`` to ``digits`` decimals, or more where it would read as ``goal`` without being it (at most 6)."""
    while digits < 6 and value != goal and f"{value:.{digits}f}" == f"{goal:.{digits}f}":
        digits += 1
    return f"{value:.{digits}f}"


def _verdict(value: float | None, goal: float, unit: str, measured: str = "") -> tuple[str, str]:
    if value is None:
        return "not measured", "-"
    return measured or f"{shown(value, goal)}{unit}", "**met**" if value >= goal else "**missed**"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _same_path(rows: list[dict], case: str, ratio: float) -> tuple[str, str] | None:
    """The verdict on ``auto`` below eager in ``case`` where ``auto`` ran eager's path itself (the bench's ``ran``:
    its batches all ran in mode eager, the same code): met if the two rows' timed rounds overlap (their min-max
    spreads), so the ratio is the rounds' noise; None otherwise (judged by the number)."""
    runs = [r.get("run") for r in rows if r.get("case") == case]
    for run in reversed(dict.fromkeys(runs)):  # the run the ratio came from: the latest that measured both
        auto, eager = ([r for r in rows if r.get("run") == run and r.get("case") == case and r.get("provider") == p
                        and "clips_per_s" in r] for p in ("auto", "eager"))  # fmt: skip
        if auto and eager:
            auto, eager = auto[-1], eager[-1]
            break
    else:
        return None
    spreads = [(r.get("ms_min"), r.get("ms_max")) for r in (auto, eager)]
    if auto.get("ran") != "eager" or None in (v for pair in spreads for v in pair):
        return None
    (a_min, a_max), (e_min, e_max) = spreads
    if a_min > e_max or e_min > a_max:
        return None
    return (f"{ratio:.2f}x (auto ran eager's path; rounds {a_min:.2f}-{a_max:.2f} vs {e_min:.2f}-{e_max:.2f} ms)",
            "**met** (same path, within the rounds' spread)")  # fmt: skip


def model_targets(logs: dict[str, list[dict]]) -> list[tuple[str, str, str]]:
    """Targets of the fused attention and the end-to-end model (RESULTS.md, Targets), from the logs by name
    (``kernels``, ``encode``, ``decode``, ``fp8``): each target from its own log only."""
    out = []
    for side in SIDES:
        prefix = f"kernel-attention-{side}-"
        # (from the part kernels' log, or targets-model's; where that has no row of this side, the part attention's)
        kernels = next((log for log in (logs.get("kernels", []), logs.get("attention", []))
                        if any(r.get("case", "").startswith(prefix) for r in log)), [])  # fmt: skip
        case = next((r["case"] for r in kernels if r.get("case", "").startswith(prefix)), "")
        pair = _rates(kernels, case, ("titok", "fa2_alone"), "tflops_per_s")
        # (the run of the ratio; else the last run that measured the kernel: FlashAttention-2's row cut off)
        titok = pair[0] if pair[0] is not None else _rate(kernels, case, "titok", "tflops_per_s")
        ratio = _ratio(*pair)
        out.append((f"attention ({side}) >= 450 TFLOP/s", *_verdict(titok, 450, " TFLOP/s")))
        out.append((f"attention ({side}) >= 1.3x FlashAttention-2 alone", *_verdict(ratio, 1.3, "x")))

    def case(stage: str, batch: int) -> str:
        return f"gpu-{stage}-v1-20x192x192-n256-b{batch}"

    def ratio(log: str, stage: str, batch: int, providers: tuple[str, str]) -> float | None:
        return _ratio(*_rates(logs.get(log, []), case(stage, batch), providers, "clips_per_s"))

    for stage, batch, goal in (("encode", 1, 3.0), ("encode", 32, 2.5), ("decode", 32, 2.0)):
        measured = ratio(stage, stage, batch, ("auto", "upstream-packed"))
        out.append((f"{stage} b{batch} >= {goal}x upstream-packed", *_verdict(measured, goal, "x")))
    encode_b32 = _rate(logs.get("encode", []), case("encode", 32), "auto", "clips_per_s")
    verdict = _verdict(encode_b32, 850, " clips/s")
    card = next((r.get("device", "") for r in reversed(logs.get("encode", [])) if r.get("case") == case("encode", 32)
                 and r.get("provider") == "auto"), "")  # fmt: skip
    if encode_b32 is not None and card and "H200" not in card:  # (a target stated for an H200)
        verdict = (verdict[0], f"not judged (an H200 target; measured on {card})")
    out.append(("encode b32, 256 tokens >= 850 clips/s (H200)", *verdict))
    for stage in ("encode", "decode"):
        for batch in (1, 8, 32):
            goal = 1.3 if (stage, batch) == ("encode", 1) else 1.0
            measured = ratio(stage, stage, batch, ("auto", "eager"))
            verdict = _verdict(measured, goal, "x")
            if goal == 1.0 and measured is not None and measured < goal:
                verdict = _same_path(logs.get(stage, []), case(stage, batch), measured) or verdict
            out.append((f"auto >= {goal}x eager, {stage} b{batch}", *verdict))
    measured = ratio("fp8", "decode", 32, ("fp8", "auto"))  # (FP8 runs in the decoder only: titok_fast/fp8.py)
    out.append(("fp8 >= 1.3x bf16 (auto), decode b32", *_verdict(measured, 1.3, "x")))
    return out


def parity_target(text: str) -> list[tuple[str, str, str]]:
    """FP8 token agreement within one point of the bf16 floor (the oracle in bf16), from bf16_parity.py's table."""
    shares = {m[1]: float(m[2]) for m in re.finditer(r"^\| \w+ \| ([\w+-]+) \| bf16 \| ([\d.]+)% of", text, re.M)}
    if not shares:  # cut off before its table: the mean of the seeds it printed (each seed has the same tokens)
        seeds: dict[str, list[float]] = {}
        for line in re.findall(r"^seed \d+: (.*) \(of \d+ tokens\)$", text, re.M):
            for name, share in re.findall(r"([\w+-]+) ([\d.]+)%", line):
                seeds.setdefault(name, []).append(float(share))
        shares = {name: sum(v) / len(v) for name, v in seeds.items()}
    floor = shares.get("reference")
    backend, fp8 = next(((k[: -len("+fp8")], v) for k, v in shares.items() if k.endswith("+fp8")), (None, None))
    if floor is None or fp8 is None:
        return [("fp8 tokens within 1 point of the bf16 floor", "not measured", "-")]
    difference = fp8 - floor  # below the floor: negative
    verdict = "**met**" if difference >= -1.0 else "**missed**"
    if fp8 == shares.get(backend):  # FP8 runs in the decoder only (titok_fast/fp8.py): the tokens are bf16's
        verdict = ("met, trivially" if difference >= -1.0 else "**missed** (by the bf16 path itself)") + \
            ": FP8 is in the decoder only, its tokens are the bf16 path's"
    out = [("fp8 tokens within 1 point of the bf16 floor", f"{fp8:.2f}% vs {floor:.2f}% ({difference:+.2f} points)",
            verdict)]  # fmt: skip
    # what FP8 does change, the decoded pixels (bf16_parity.py --decode): reported beside bf16's, no goal stated
    decoded = {m[1]: float(m[2]) for m in re.finditer(r"^\| \w+ \| ([\w+-]+) \| bf16 \|.* decoded: ([\d.]+) dB PSNR",
                                                     text, re.M)}  # fmt: skip
    if f"{backend}+fp8" in decoded and backend in decoded:
        out.append(("fp8 decoded pixels against the float32 oracle's (no goal stated)",
                    f"{decoded[backend + '+fp8']:.1f} dB PSNR vs bf16's {decoded[backend]:.1f} dB", "reported"))
    return out


def pipeline_targets(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The input pipeline's aims, each against the "before" row of the same run."""
    by = {r.get("source"): r for r in rows}  # the last row of each label and source

    def get(label: str, key: str) -> float | None:
        return by.get(label, {}).get(key)

    before = get("before 720p30", "cpu_s_per_clip")
    after = get("after 720p30", "cpu_s_per_clip")
    share = _ratio(before, after)  # before / after >= 1 / 0.6
    out = [("720p30: CPU-s per clip <= 0.6x before",
            *_verdict(share, 1 / 0.6, "", f"{after:.3f} vs {before:.3f} ({shown(after / before, 0.6)}x)"
                      if share else ""))]  # fmt: skip
    def unless_fallen_back(label: str, verdict: tuple[str, str]) -> tuple[str, str]:
        """``verdict``, unless ``label`` is an NVDEC row whose files NVDEC did not decode (it fell back to the CPU:
        not NVDEC's number)."""
        used = get(label, "decoded_by")
        if label.startswith("nvdec") and used is not None and used != "nvdec" and verdict[1] != "-":
            return f"not measured (decoded by {used})", "-"
        return verdict

    for label, name in (("after 256p8", "256p8 end to end"), ("nvdec 256p8", "256p8 end to end, --decoder nvdec")):
        busy = _ratio(get(label, "clips_per_s"), get(label, "model_only_clips_per_s"))
        verdict = _verdict(busy, 0.6, "", f"{shown(100 * busy, 60, 0)}%" if busy is not None else "")
        out.append((f"{name} >= 60% of model-only clips/s", *unless_fallen_back(label, verdict)))
    nvdec = _ratio(get("nvdec 720p30", "clips_per_s"), get("before 720p30", "clips_per_s"))
    out.append(("NVDEC 720p30 end to end >= 2x before", *unless_fallen_back("nvdec 720p30", _verdict(nvdec, 2.0, "x"))))
    return out


def report(folder: Path) -> str:
    names = ("kernels", "attention", "encode", "decode", "fp8", "pipeline")
    logs = {name: latest_session(read_jsonl(folder, name)) for name in names}
    rows = model_targets(logs)
    parity = folder / "parity.txt"
    rows += parity_target(parity.read_text() if parity.is_file() else "")
    rows += pipeline_targets(logs["pipeline"])
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in rows]
    return "\n".join(lines + ["", "Judged from:"] + [f"- {provenance(name, r)}" for name, r in logs.items()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default="gpu-results", help="what gpu_session.sh wrote (default "
                        "gpu-results; with $OUT set, the folder its results.tar.gz unpacks to)")  # fmt: skip
    folder = Path(parser.parse_args(argv).folder)
    if not folder.is_dir():
        parser.error(f"no folder {str(folder)!r}: name the folder of a GPU session's results")
    print(report(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
