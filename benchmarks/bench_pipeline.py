"""Files in, token files out: the whole ``encode`` path, measured on realistic H.264 sources.

The sources are written here with PyAV (libx264, preset medium, crf 23, default GOP and B-frames) from a moving,
textured pattern, so a 720p30 source carries a few Mbit/s like real footage: 1280x720 and 1920x1080 at 30 fps and
456x256 at 8 fps (the layout of upstream's training set); each file's bitrate is measured and printed (``--codec``
writes HEVC, VP9 or AV1 instead, each with its encoder's usual settings: ``CODECS``). Each source
is encoded by ``encode_files`` (video files in, token files out) and the run reports:

- clips/s and source frames spanned per second (the source frames the clips cover, ``src fr spanned/s``: not the
  frames decoded, which pruning makes fewer), end to end;
- CPU-seconds per clip by stage: decode, RGB conversion, resize/crop/scale, host-to-device, token-file write
  (each from the stage clock, ``titok_fast.stages``, which threads and worker processes report into), and "model +
  rest": the process's whole CPU time (worker processes included) less the stages above. A stage's time is its
  thread's own: where a stage runs torch on the CPU (the resize, with ``--preprocess cpu``), torch's intra-op helper
  threads share its work and their CPU time falls into "model + rest" (on 2 cores, about half the resize's:
  ``OMP_NUM_THREADS=1`` keeps it in its stage);
- model busy: the fraction of the wall time the model needs for these clips at its own pace (clips / model-only
  clips/s / wall time), and model-only clips/s measured in the same run (same commit, mode and batch size: the
  first file's clips, repeated in turn up to ``--batch-size``, already preprocessed and on the device, after
  untimed warm-up calls); the batch it used is logged (``model_only_batch``);
- the run's process CPU per clip, and how busy its thread was (the one that takes the clips, hands them to the
  device and drives the model: CPU time over wall time; near 100%, it is what limits the run), and the share of
  the wall time that thread waited for decoded clips (``feeder waits``: the model starved of input);
- what the decoding workers waited for, each as a share of the workers' wall time (workers x wall): a file to
  read, the run to take their clips, room for a source-size clip, a free shared-memory segment (``wait_*`` of the
  stage clock; where the workers are not all busy, this says why). A worker process's wait after its last file
  is not counted; a thread's is, until the stream closes.

Before any source is timed, the engine encodes one batch of ``--batch-size`` clips of the same shape, so lazy CUDA
and cuBLAS start-up, graph capture and Triton compilation fall outside every timing.

``--input-only`` measures the reading side alone (decoding, sampling and preprocessing, no model). ``--stand-in
RATE`` runs the whole path with the model's engine replaced by a stand-in that takes a batch's clips, sleeps as long
as a model of RATE clips/s would run them (the GIL free, as a GPU's work leaves it) and gives tokens of zeros: what
the input pipeline gives a model of that speed, whatever the machine's own model does; its model-only clips/s is
RATE, declared, not measured. ``--tar`` reads the ``--files`` copies of each source as the members of one tar
archive (a WebDataset shard), in place, instead of as files.
As a script it prints a table (``python benchmarks/bench_pipeline.py --help``); ``titok-fast bench`` runs the
small pytest cases below. With TITOK_BENCH_LOG set, each case is also appended to that file as a JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
import unittest.mock
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from titok_fast import video
from titok_fast.engine import Engine
from titok_fast.loading import random_tokenizer
from titok_fast.pipeline import ClipSettings, encode_files
from titok_fast.tokens import try_load_tokens
from titok_fast.video import normalize_pixels, read_clips, stream_videos

try:  # the stage clock; absent at commits before it existed (their rows have totals only)
    from titok_fast import stages
except ImportError:
    stages = None
try:  # how encode_files takes the files' clips; absent at commits before it existed
    from titok_fast.video import interleaved_videos as _interleaved_videos
except ImportError:
    _interleaved_videos = None

SOURCES = {  # name -> (width, height, fps)
    "720p30": (1280, 720, 30),
    "1080p30": (1920, 1080, 30),
    "256p8": (456, 256, 8),
}
STAGE_NAMES = ("decode", "rgb", "resize", "upload", "write")
WAIT_NAMES = getattr(stages, "WAITS", ())  # what decoding workers wait for (none at commits that do not count it)
# --codec -> (encoder, its options): each encoder's usual settings (default key frame spacing, B-frames or hidden
# frames; x265's default open groups of pictures; VP9 and AV1 at a speed setting that keeps writing them short)
CODECS = {
    "h264": ("libx264", {"preset": "medium", "crf": "23"}),
    "hevc": ("libx265", {"preset": "medium", "crf": "28", "x265-params": "log-level=error"}),
    "vp9": ("libvpx-vp9", {"crf": "31", "b": "0", "cpu-used": "4", "row-mt": "1"}),
    "av1": ("libsvtav1", {"preset": "8", "crf": "35"}),
}


def make_source(path: Path, width: int, height: int, fps: int, seconds: float, codec: str = "h264") -> float:
    """Write an mp4 (H.264: x264 preset medium, crf 23; or another of CODECS) of a textured pattern in motion;
    returns its Mbit/s."""
    rng = np.random.default_rng(0)
    # texture at several scales, larger than the frame so it can pan; plus fine noise that changes every frame
    big = (height + 256, width + 256)
    texture = (
        sum(
            np.kron(rng.integers(0, 256, (big[0] // s + 1, big[1] // s + 1, 3)), np.ones((s, s, 1)))[: big[0], : big[1]]
            for s in (3, 12, 48)
        )
        / 3
    )
    frames = int(seconds * fps)
    with _scheduling_kept(), av.open(str(path), "w") as container:
        encoder, options = CODECS[codec]
        stream = container.add_stream(encoder, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options
        for i in range(frames):
            dy, dx = int(64 + 60 * np.sin(i / 40)), (3 * i) % 256
            image = texture[dy : dy + height, dx : dx + width]
            shade = 40 * np.sin(2 * np.pi * (np.arange(width) / width + i / 90))[None, :, None]
            noise = rng.integers(-6, 7, (height, width, 1))
            image = np.clip(image + shade + noise, 0, 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path.stat().st_size * 8 / (frames / fps) / 1e6


def _scheduling_kept():
    """tests/videos.py's ``scheduling_kept()``: SVT-AV1 (``--codec av1``), run as root, leaves the thread that
    encoded real time, which would take the CPUs from the decoding workers this process then starts."""
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import videos

    return videos.scheduling_kept()


def sources(folder: Path, names: list[str], seconds: float, codec: str = "h264") -> dict[str, tuple[Path, float]]:
    """The named sources in `folder` (made once per name, length and codec): name -> (path, Mbit/s)."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for name in names:
        width, height, fps = SOURCES[name]
        path = folder / f"{name}-{seconds:g}s{'' if codec == 'h264' else '-' + codec}.mp4"
        if not path.exists():
            partial = path.with_suffix(".partial.mp4")
            make_source(partial, width, height, fps, seconds, codec)
            partial.rename(path)
        made[name] = (path, path.stat().st_size * 8 / seconds / 1e6)
    return made


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children, user + system; and of the server decoding processes are
    forked from (its imports) and its finished children (the worker processes, which are its children)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return _own_cpu_seconds() + children.ru_utime + children.ru_stime + _process_server_cpu()


def _own_cpu_seconds() -> float:
    """CPU time of this process alone (its threads: with worker processes, the run's side of the hand-over, the
    model and what drives it), user + system."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _process_server_cpu() -> float:
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    try:
        with open(f"/proc/{pid}/stat") as f:  # utime, stime, cutime, cstime: fields 14-17
            ticks = f.read().rsplit(")", 1)[1].split()[11:15]
    except OSError:  # no server (yet), or no /proc
        return 0.0
    return sum(int(t) for t in ticks) / os.sysconf("SC_CLK_TCK")


def _upload(upload: str | None):
    """Within it, runs hand the CPU decoder's frames to a "device" placement as ``upload`` says ("rgb" or "i420";
    None: as the run decides, by the model's device), in this process and in worker processes (which are given
    the run's reading arguments)."""
    if upload is None:
        return contextlib.nullcontext()
    read_kwargs = ClipSettings.read_kwargs
    return unittest.mock.patch.object(ClipSettings, "read_kwargs",
                                      lambda self, *args, **kwargs: {**read_kwargs(self, *args, **kwargs),
                                                                     "upload": upload})  # fmt: skip


def _supported(function, options: dict) -> dict:
    """The options `function` takes (older commits lack the newer ones)."""
    names = inspect.signature(function).parameters
    return {k: v for k, v in options.items() if k in names}


def _settings(grid, tokens: int, options: dict) -> ClipSettings:
    fields = {f.name for f in dataclasses.fields(ClipSettings)}
    return ClipSettings(grid=grid, tokens=tokens, **{k: v for k, v in options.items() if k in fields})


def _source_frames(path: Path, clips: int, grid, fps: float) -> int:
    """Source frames spanned by `clips` clips (upstream sampling: int(T * source_fps / fps) per clip), whether or
    not each is decoded."""
    with av.open(str(path)) as container:
        rate = float(container.streams.video[0].average_rate)
    return clips * int(grid[0] * rate / fps)


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def warm_up(engine: Engine, model, grid, tokens: int, batch: int) -> None:
    """Encode batches of `batch`, 2 and 1 clips of the run's shape, untimed: lazy CUDA/cuBLAS start-up, graph
    capture (``auto`` graphs small batches, such as a run's last), Triton compilation and the allocator's first
    growth, before anything is timed."""
    g = torch.Generator().manual_seed(0)
    videos = [(torch.rand((3, *grid), generator=g) * 2 - 1).to(model.device, model.dtype) for _ in range(batch)]
    for size in sorted({batch, min(batch, 2), 1}, reverse=True):
        engine.encode(videos[:size], [tokens] * size)
    if model.device.type == "cuda":
        warm_up_yuv_kernels(model.device, *grid[1:], model.dtype)
    _sync(model)


def warm_up_yuv_kernels(device, height: int, width: int, dtype: torch.dtype) -> None:
    """The YUV to RGB kernels, compiled at their first call: a clip of I420 through the device-side preprocessing
    (to clips of ``height`` x ``width`` in ``dtype``), and an NVDEC surface, of 2 x 2 black frames on ``device``
    (nothing at a commit without them, or without Triton)."""
    try:
        from titok_fast.kernels import _triton, nv12_rgb
        from titok_fast.preprocess import DevicePreprocessor, I420Clip
    except ImportError:
        return
    if _triton.MISSING:
        return
    black = torch.tensor([16, 16, 16, 16, 128, 128], dtype=torch.uint8).view(1, 3, 2)  # Y rows, then U, V
    DevicePreprocessor(device, height, width, dtype)(I420Clip(black, "bt601"))
    nv12_rgb.nv12_rgb(black[0].to(device), 2)


class StandIn:
    """An engine's ``encode_stream`` without the model: batches of up to ``batch`` clips (fewer where the stream
    says it is idle, as the engine runs what it holds), each run by a thread of its own as a sleep of ``clips /
    rate`` seconds, then each clip's tokens as zeros. As the engine on a GPU queues a batch while the one before
    runs, the run's thread goes on taking clips meanwhile: it waits only with two batches in flight. Clips
    preprocessed on the device are left to their stream (a GPU's queued work goes on)."""

    def __init__(self, engine: Engine, rate: float, batch: int):
        self.mode, self.model, self.rate, self.batch = engine.mode, engine.model, rate, batch
        self.budgets = engine.budgets  # (what the run checks its clips against, as the engine's)

    def encode_stream(self, items, *, host: bool = False):
        import collections
        import concurrent.futures

        from titok_fast.engine import IDLE

        held, running = [], collections.deque()
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stand-in") as model:
            for item in items:
                if item is not IDLE:
                    held.append(item)
                if held and (item is IDLE or len(held) == self.batch):
                    running.append(model.submit(self._run, held))
                    held = []
                while running and (len(running) > 1 or running[0].done()):  # (two in flight: the first's end)
                    yield from running.popleft().result()
            if held:
                running.append(model.submit(self._run, held))
            while running:
                yield from running.popleft().result()

    def _run(self, held):
        time.sleep(len(held) / self.rate)
        return [(key, (None, torch.zeros(tokens, dtype=torch.int64))) for key, _, tokens in held]


def model_batch(path: Path, settings: ClipSettings, batch: int, model) -> list[torch.Tensor]:
    """`batch` clips of this file (its clips repeated in turn when it has fewer), preprocessed, on the device."""
    t, h, w = settings.grid
    clips = read_clips(path, frames=t, height=h, width=w, fps=settings.fps, raw=True).clips
    if not clips:
        raise RuntimeError(f"{path}: no clip of {t} frames at {settings.fps:g} fps")
    videos = [normalize_pixels(c, model.dtype).to(model.device) for c in clips[:batch]]
    return [videos[i % len(videos)] for i in range(batch)]


def model_only(
    engine: Engine, model, path: Path, settings: ClipSettings, batch: int, rounds: int = 3
) -> tuple[float, int]:
    """(clips/s of ``engine.encode`` alone on a batch of `batch` of this file's clips (see :func:`model_batch`),
    the clips in that batch)."""
    videos = model_batch(path, settings, batch, model)
    counts = [settings.tokens] * len(videos)
    for _ in range(2):  # untimed warm-up: compilation, graphs, allocator
        engine.encode(videos, counts)
    _sync(model)
    start = time.perf_counter()
    for _ in range(rounds):
        engine.encode(videos, counts)
    _sync(model)
    return rounds * len(videos) / (time.perf_counter() - start), len(videos)


def run_case(path: Path, args: argparse.Namespace, model, engine) -> dict:
    """One source through the encode path (or the reading side alone): the row of the table."""
    grid = tuple(args.grid)
    options = {"preprocess": args.preprocess, "decoder": args.decoder, "prune": not args.no_prune}
    settings = _settings(grid, args.tokens, options)
    with tempfile.TemporaryDirectory() as scratch, _upload(args.upload):
        copies = []  # the source under `files` names: a dataset of that many videos
        for i in range(args.files):
            copies.append(Path(scratch) / f"{path.stem}-{i}{path.suffix}")
            copies[-1].symlink_to(path.resolve())
        if args.tar:  # the same videos as the members of one tar archive, read in place (made before the clocks)
            with tarfile.open(Path(scratch) / "shard.tar", "w") as archive:
                for copy in copies:
                    archive.add(copy.resolve(), arcname=copy.name)
            copies = [Path(scratch) / "shard.tar" / copy.name for copy in copies]
        kind = _worker_kind(args, path)
        if kind == "process":
            _ready_process_server()
        if stages is not None:
            stages.CLOCK.enable()
        cpu, own, start = _cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
        driving = time.thread_time()  # this thread's: it drives the model (and takes the clips, hands them over)
        feeder_waited = None  # seconds the model's feeder waited for clips (encode_files' Summary.waited)
        if args.input_only:
            # (clips resized in the workers come scaled in the model's dtype, as encode_files reads them)
            device = _supported(settings.read_kwargs, {"device": model.device.type, "dtype": model.dtype})
            workers = {"worker_kind": kind} if kind != "thread" else {}
            if _interleaved_videos is not None:  # as encode_files takes the files' clips
                files_read = _interleaved_videos(copies, workers=args.workers, **workers,
                                                 **settings.read_kwargs(**device))  # fmt: skip
                with contextlib.closing(files_read):
                    clips = sum(1 for _, kind, _ in files_read if kind == "clip")
            else:  # a commit from before FeedInterleaver: one file at a time, in order
                feeds = stream_videos(copies, workers=args.workers, prefetch=2 * args.workers, **workers,
                                      **settings.read_kwargs(**device))  # fmt: skip
                clips = sum(1 for _, feed in feeds for _ in feed)
        else:
            run_options = _supported(encode_files, {"worker_kind": kind})
            summary = encode_files(
                model, engine, [(p, p.stem) for p in copies], Path(scratch) / "tokens", settings,
                workers=args.workers, read_ahead=args.batch_size, overwrite=True, **run_options,
            )  # fmt: skip
            if summary.failed:
                raise RuntimeError(f"{path}: {summary.failed}")
            clips = summary.clips
            feeder_waited = getattr(summary, "waited", None)  # (None at commits without it)
        wall, driving = time.perf_counter() - start, time.thread_time() - driving
        for child in multiprocessing.active_children():  # RUSAGE_CHILDREN counts only the children waited for:
            child.join(timeout=30)  # a worker process still ending (its run waits 5 s at most) would be left out
        cpu, own = _cpu_seconds() - cpu, _own_cpu_seconds() - own
        if not args.input_only:  # (outside the times and CPU counts above: the run does not read its files back)
            # what decoded each file (NVDEC falls back to the CPU file by file, with a notice): a row asked for
            # NVDEC whose files were decoded on the CPU does not measure NVDEC
            made = [try_load_tokens(f) for f in sorted((Path(scratch) / "tokens").glob("*.safetensors"))]
            used = sorted({(t.made_with.get("decoded_by", "") if t else "") or "unknown" for t in made})
    spent = stages.CLOCK.take() if stages is not None else {}
    row = {
        "clips": clips,
        "wall_s": wall,
        "clips_per_s": clips / wall,
        "source_frames_per_s": _source_frames(path, clips, grid, args.fps) / wall,
        "cpu_s_per_clip": cpu / clips,
        "run_cpu_s_per_clip": own / clips,
        "run_thread_busy": driving / wall,
        "worker_kind": kind,
        **({} if args.input_only else {"decoded_by": ",".join(used)}),
        **{f"{name}_cpu_s": spent[name] / clips for name in STAGE_NAMES if name in spent},
    }
    if any(f"wait_{name}" in spent for name in WAIT_NAMES):
        row["worker_waits"] = {name: spent.get(f"wait_{name}", 0.0) / (args.workers * wall) for name in WAIT_NAMES}
    if feeder_waited is not None:
        row["feeder_waits"] = feeder_waited / wall
    if spent:
        row["model_rest_cpu_s"] = (cpu - sum(spent.get(n, 0.0) for n in STAGE_NAMES)) / clips
    if args.stand_in:
        row["model_only_clips_per_s"], row["model_only_batch"] = args.stand_in, args.batch_size  # (declared)
        row["stand_in"] = True
    elif not args.input_only:
        row["model_only_clips_per_s"], row["model_only_batch"] = model_only(engine, model, path, settings,
                                                                             args.batch_size)  # fmt: skip
    if not args.input_only:  # (the stand-in's: its sleeps, clips / rate, over the wall time)
        row["model_busy"] = clips / row["model_only_clips_per_s"] / wall
    return row


def _ready_process_server() -> None:
    """The server decoding processes are forked from, started and done with its imports (2.5 CPU-s, once a run)
    before a row is timed: encode starts it while it loads the model, which the rows leave out too. Nothing at a
    commit without it (each spawned process imported torch itself, within the row)."""
    start = getattr(video, "start_process_server", None)
    if start is None:
        return
    start()
    ready = video._process_context().Process(target=os.getpid)  # (its fork waits for the server's imports)
    left_out = getattr(video, "_main_left_out", contextlib.nullcontext)  # (not given the calling script: see there)
    with left_out():
        ready.start()
    ready.join()


def _worker_kind(args: argparse.Namespace, path: Path) -> str:
    """The worker kind the run decodes ``path`` with: ``--worker-kind``, or "auto" as this commit resolves it
    (thread at a commit without "auto")."""
    if args.worker_kind != "auto":
        return args.worker_kind
    auto_worker_kind = getattr(video, "auto_worker_kind", None)
    return auto_worker_kind(args.workers, args.decoder, [path]) if auto_worker_kind is not None else "thread"


def environment(args: argparse.Namespace) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _lscpu() if line.startswith("Model name")), "")
    try:  # a GPU machine may have no git (and the copy no .git): $COMMIT says which commit then
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()  # (this checkout's, not the cwd's)
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "",
        "torch": torch.__version__,
        "av": av.__version__,
        "python": platform.python_version(),
        "commit": os.environ.get("COMMIT", commit),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _lscpu() -> list[str]:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return []


def _log(record: dict, path: str | None) -> None:
    """``record`` appended to the log at ``path``, as ``titok_fast.benchreport.append_row`` does (written out here:
    this script also measures commits from before it, as the guarded imports above do)."""
    if path:
        session = {"session": s} if (s := os.environ.get("TITOK_BENCH_SESSION")) else {}
        with open(path, "a") as log:
            log.write(json.dumps({**record, **session}) + "\n")


COLUMNS = [  # key, header, format
    ("source", "source", "{}"),
    ("mbit_s", "Mbit/s", "{:.1f}"),
    ("clips", "clips", "{}"),
    ("clips_per_s", "clips/s", "{:.2f}"),
    ("source_frames_per_s", "src fr spanned/s", "{:.0f}"),  # frames the clips cover, not frames decoded
    ("cpu_s_per_clip", "CPU-s/clip", "{:.3f}"),
    *[(f"{n}_cpu_s", n, "{:.3f}") for n in STAGE_NAMES],
    ("model_rest_cpu_s", "model+rest", "{:.3f}"),
    ("model_busy", "model busy", "{:.0%}"),
    ("model_only_clips_per_s", "model-only clips/s", "{:.2f}"),
    ("model_only_batch", "model-only batch", "{}"),
    ("run_cpu_s_per_clip", "run's process CPU-s/clip", "{:.4f}"),  # with threads: all of CPU-s/clip
    # the CPU time of the thread that takes the clips and drives the model, over the wall time: near 100%, that
    # thread is what limits the run (more decoding workers cannot help)
    ("run_thread_busy", "run's thread busy", "{:.0%}"),
    ("feeder_waits", "feeder waits", "{:.0%}"),
    # shares of the workers' wall time spent waiting: for a file / for the run to take clips / room / a segment
    ("worker_waits", "worker waits (file/taken/room/segment)", "waits"),
]


def format_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_cell(row[key], fmt) if key in row else "-" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value, fmt: str) -> str:
    if fmt == "waits":  # {name: share}, in WAIT_NAMES' order
        return "/".join(f"{100 * value.get(name, 0.0):.0f}" for name in WAIT_NAMES) + "%"
    return fmt.format(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sources", default="720p30,1080p30,256p8", help=f"comma-separated, of {', '.join(SOURCES)}")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each source (default 20)")
    p.add_argument("--codec", default="h264", choices=tuple(CODECS), help="the sources' codec (default h264)")
    p.add_argument("--videos", default="bench-videos", help="folder for the sources (made once, then reused)")
    p.add_argument("--config", default="tiny", help="model preset (default tiny)")
    p.add_argument("--grid", type=int, nargs=3, default=(20, 192, 192), metavar=("T", "H", "W"))
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--fps", type=float, default=8.0, help="sampling rate, as encode --fps (default 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="default: bf16 on cuda, else fp32")
    p.add_argument(
        "--mode", default="auto", choices=("auto", "eager", "compile", "cudagraph"), help="as encode (default auto)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--files", type=int, default=1, help="encode each source as this many files (default 1)")
    p.add_argument("--workers", type=int, default=2, help="decoding workers (default 2)")
    p.add_argument("--worker-kind", default="auto", choices=("auto", "thread", "process"),
                   help="as encode (default auto: at commits without it, thread)")
    p.add_argument("--preprocess", default="auto", choices=("auto", "cpu", "device"))
    p.add_argument("--decoder", default="cpu", choices=("cpu", "nvdec"))
    p.add_argument("--no-prune", action="store_true", help="decode every frame, also those no clip uses")
    p.add_argument("--upload", choices=("rgb", "i420"), default=None,
                   help="how CPU-decoded frames go to the model's device with placement 'device' (default: the "
                        "run's: i420 on CUDA where it gives the same bytes, else rgb)")
    p.add_argument("--input-only", action="store_true", help="the reading side alone: no model")
    p.add_argument("--tar", action="store_true", help="read the files as the members of a tar archive (a "
                   "WebDataset shard), in place")  # fmt: skip
    p.add_argument("--stand-in", type=float, default=None, metavar="RATE",
                   help="end to end with a stand-in for the model that runs RATE clips/s (a sleep per batch)")
    p.add_argument("--sources-only", action="store_true", help="make the source videos (if missing), nothing else")
    p.add_argument("--label", default="", help="a name for this configuration in the table and the log")
    p.add_argument("--log", default=os.environ.get("TITOK_BENCH_LOG"), help="append each row here as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.stand_in and args.input_only:
        raise SystemExit("--stand-in and --input-only: choose one")
    names = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise SystemExit(f"unknown sources {unknown}; expected some of {list(SOURCES)}")
    short = [n for n in names if int(args.seconds * SOURCES[n][2]) < 1]
    if short:  # (no frame would be written: a source of nothing)
        raise SystemExit(f"--seconds {args.seconds:g} gives {short[0]} no frame at {SOURCES[short[0]][2]} fps; "
                         "give at least one frame's time")  # fmt: skip
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    ]
    made = sources(Path(args.videos), names, args.seconds, args.codec)
    if args.sources_only:
        return
    env = environment(args)
    print(json.dumps(env), file=sys.stderr)
    model = random_tokenizer(args.config, seed=0, device=args.device, dtype=dtype)
    engine = Engine(model, mode=args.mode, max_clips=args.batch_size)
    if args.stand_in:
        engine = StandIn(engine, args.stand_in, args.batch_size)
        if model.device.type == "cuda":
            warm_up_yuv_kernels(model.device, *args.grid[1:], model.dtype)
    elif not args.input_only:
        warm_up(engine, model, args.grid, args.tokens, args.batch_size)
    rows = []
    for name, (path, mbit) in made.items():
        print(f"{name}: {path} ({mbit:.1f} Mbit/s)", file=sys.stderr)
        row = {"source": f"{args.label} {name}".strip(), "mbit_s": mbit, **run_case(path, args, model, engine)}
        _log({**row, "args": vars(args), **env}, args.log)
        rows.append(row)
        print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr)
    print(format_table(rows))


# ------------------------------------------------------------------------------ pytest (titok-fast bench)
@pytest.fixture(scope="module")
def short_sources(tmp_path_factory) -> dict:
    return sources(tmp_path_factory.mktemp("pipeline"), ["720p30", "256p8"], seconds=3.0)


@pytest.mark.benchmark(group="pipeline: files in, token files out (tiny, cpu, fp32)")
@pytest.mark.parametrize("source", ["720p30", "256p8"])
@pytest.mark.parametrize("input_only", [False, True], ids=["encode", "input_only"])
def test_cpu_pipeline(benchmark, short_sources, source, input_only):
    args = parse_args(["--device", "cpu", "--batch-size", "4", *(["--input-only"] if input_only else [])])
    model = random_tokenizer("tiny", seed=0)
    engine = Engine(model, max_clips=args.batch_size)
    if not input_only:
        warm_up(engine, model, args.grid, args.tokens, args.batch_size)
    path, mbit = short_sources[source]
    row = benchmark.pedantic(run_case, args=(path, args, model, engine), rounds=1, iterations=1)
    assert row["clips"] > 0
    assert input_only or row["model_only_batch"] == args.batch_size  # a 3 s source has fewer clips: repeated
    provider = f"{source} {'input only' if input_only else 'encode'}"
    benchmark.extra_info.update({"provider": provider, "device": "cpu", "mbit_s": mbit, **row, **environment(args)})
    _log({"source": source, **row}, args.log)


if __name__ == "__main__":
    main()
