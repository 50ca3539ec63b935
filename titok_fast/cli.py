"""The ``titok-fast`` command line: encode, decode, eval, convert, bench, demo.

Errors are one readable line on stderr (``--debug`` shows the traceback); a batch command exits 1 when any file
failed, after finishing all the others.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from . import __version__
from .archives import ARCHIVE_CUT
from .files import (
    DEBUG_ENV,
    MAX_CLIPS_PER_VIDEO,
    MAX_FPS,
    MAX_NAME_BYTES,
    MAX_PER_SHARD,
    MAX_RAY_RETRIES,
    MAX_SEED,
    MIN_WRITE_FPS,
    PER_SHARD,
    RAY_LEAST_RESOURCE,
    STALL_SECONDS,
    Terminated,
    absolute,
    brief,
    escaped,
    file_head,
    forget_interrupts,
    interrupt,
    interrupts_held,
    kind_of,
    lies_in,
    notice,
    temporary_stem,
    write_atomically,
)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# imported by a command (but bench) before it runs, with Ctrl-C and SIGTERM held until they are in: torch's C code
# imports numpy and drops what a signal handler raises there, so a signal in the first second of a run was lost, or
# left numpy half made (every file then failed "cannot be read")
HELD_IMPORTS = ("torch",)
MAX_WEIGHTS_TRIED = 8  # decode: the weights of this many token files are tried before it gives up
MAX_FILES_WITHOUT_NEW_WEIGHTS = 64  # ... and it reads this many more files for other weights after the last new ones
MAX_FILES_FOR_WEIGHTS = 1024  # ... and this many files in all once one has named a model


def _grid(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"grid {text!r} must look like 20x192x192 (frames x height x width)")
    return tuple(int(g) for g in m.groups())


def _counts(text: str) -> list[int]:
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"token counts {text!r} must be integers like 128,256,1024") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"token counts {text!r} must be integers >= 1")
    return list(dict.fromkeys(counts))  # each once: a count given twice is measured once


def _fps(text: str) -> float:
    """A sampling rate: in (0, MAX_FPS], and not below the slowest rate a video is written at (decode writes the clips
    at it; far below, a clip's seconds overflow)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= MAX_FPS:  # also NaN
        raise argparse.ArgumentTypeError(f"{text} must be in (0, {MAX_FPS:g}]")
    if value < MIN_WRITE_FPS:
        raise argparse.ArgumentTypeError(f"{text} must be at least {MIN_WRITE_FPS:g} (a clip of frames this far "
                                         "apart could not be decoded to a video)")  # fmt: skip
    return value


def _folder(text: str) -> str:
    """An output folder: given (not ""), and not something else that exists (it is made if need be)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (the current folder is '.')")
    if os.path.lexists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return text


def _per_shard(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_PER_SHARD:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_PER_SHARD:,}; got {text!r}")
    return value


def _extensions(text: str) -> tuple[str, ...]:
    """File extensions, comma-separated, without their dots: letters, digits, ``_``, ``-`` and inner dots."""
    found = tuple(text.split(","))
    for extension in found:
        if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", extension, re.ASCII) or extension == "safetensors":
            raise argparse.ArgumentTypeError(f"expected extensions without their dots, comma-separated (json,txt), "
                                             f"other than safetensors; got {extension!r}")  # fmt: skip
    if len(set(found)) < len(found):
        raise argparse.ArgumentTypeError(f"an extension given twice in {text!r}")
    return found


def _non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _int_between(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``least`` (and <= ``most``, if given)."""

    def parse(text: str) -> int:
        value = int(text)
        if most is None and value < least:
            raise argparse.ArgumentTypeError(f"{text} must be >= {least}")
        if most is not None and not least <= value <= most:
            raise argparse.ArgumentTypeError(f"{text} must be in [{least}, {most}]")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value"
    return parse


_positive = _int_between(1)
MAX_WORKERS = 1024  # decoding threads or processes: more than any machine's cores


# --ray-* options: None when not given (they apply only with --ray), these values when --ray is used
RAY_DEFAULTS = {"ray_actors": None, "ray_gpus_per_actor": 1.0, "ray_cpus_per_actor": 1.0, "ray_cpus_per_decode": 1.0,
                "ray_retries": 2, "ray_actor_restarts": 8}  # fmt: skip


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a number > 0, not infinite")
    return value


def _ray_resource(text: str) -> float:
    """A count of CPUs or GPUs a Ray task or actor asks for: Ray takes none finer than RAY_LEAST_RESOURCE."""
    value = _positive_float(text)
    if value < RAY_LEAST_RESOURCE:
        raise argparse.ArgumentTypeError(f"{text} must be at least {RAY_LEAST_RESOURCE:g} (Ray's finest share)")
    return value


def _shard(text: str) -> tuple[int, int]:
    """--shard K/N: 0 <= K < N, N at most 7 digits."""
    m = re.fullmatch(r"([0-9]{1,7})/([0-9]{1,7})", text.strip())
    if not m or not int(m[1]) < int(m[2]):
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N with 0 <= K < N <= 9999999, e.g. 0/8 (shards count "
                                         "from 0)")  # fmt: skip
    return int(m[1]), int(m[2])


def _device_name(text: str) -> str:
    """--device: cpu, cuda or cuda:0 (the devices titok-fast runs on). Another GPU is chosen with
    CUDA_VISIBLE_DEVICES: a run's other threads (decoding, pinning memory, NVDEC) work on the current GPU, which a
    device index set in one thread leaves at GPU 0 in the others, opening a context there too."""
    if m := re.fullmatch(r"cuda:0*([1-9][0-9]{0,2})", text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: choose that GPU with CUDA_VISIBLE_DEVICES={m[1]} and --device cuda (the run's decoding "
            "threads would work on GPU 0 too)"
        )
    if not re.fullmatch(r"cpu|cuda(:0{1,3})?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device titok-fast runs on: cpu or cuda")
    return text


def _stall_seconds(text: str) -> float | None:
    """--stall-timeout: seconds, or 0 for never (None)."""
    try:
        return None if float(text) == 0 else _positive_float(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0, or 0 for never") from None


def _device_dtype(args: argparse.Namespace):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    return device, getattr(torch, DTYPES[dtype])


# x86-64 CPUs' bf16 matrix instructions, by torch's names for the checks (``torch.cpu``): without either, bf16
# matrix products fall back to slow code. Measured on V1 (RESULTS.md): bf16 2.7x as fast as float32 on an Intel
# Xeon with AMX, files in and token files out, and 4x slower with AMX and AVX-512 masked off (as on a CPU of AVX2
# alone); level with float32 with AVX512-BF16 alone (a call of the model). float16 is as slow (0.10 clips/s against
# 0.41) without AVX512-FP16, and level with float32 with it; torch has no check for it, so Linux's CPU flags say.
BF16_INSTRUCTIONS = {"AVX512-BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
FP16_FLAGS = {"AVX512-FP16": "avx512_fp16", "AMX-FP16": "amx_fp16"}  # (/proc/cpuinfo's names)


def cpu_flags() -> set[str] | None:
    """The first CPU's flags in Linux's ``/proc/cpuinfo`` (x86), or None where there are none to read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def slow_dtype_on_this_cpu(dtype: str | None) -> str | None:
    """A one-line notice when ``dtype`` (a --dtype name) will run slower than float32 on this machine's CPU: bf16
    on an x86-64 CPU without bf16 matrix instructions, fp16 on one without fp16 ones. None otherwise, and where
    it cannot be told (another architecture, such as an ARM CPU with bf16 instructions; a torch without the bf16
    checks; no /proc/cpuinfo for fp16)."""
    import platform

    import torch

    if dtype not in ("bf16", "fp16") or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if dtype == "bf16":
        checks = [getattr(torch.cpu, name, None) for name in BF16_INSTRUCTIONS.values()]
        if None in checks or any(check() for check in checks):
            return None
        names = BF16_INSTRUCTIONS
    else:
        flags = cpu_flags()
        if flags is None or flags & set(FP16_FLAGS.values()):
            return None
        names = FP16_FLAGS
    return (f"--dtype {dtype} on this CPU, which has no {dtype} matrix instructions ({' or '.join(names)}): expect "
            f"it to run slower than fp32, the CPU default")  # fmt: skip


def _model(args: argparse.Namespace, token_metas=None, quick: bool = False):
    """The model named by --checkpoint / --random-weights, else by ``token_metas`` (token files, the weights named
    by most of them first: see :func:`_naming_a_model`), the first whose weights can be had, else the default
    weights (``$TITOK_FAST_CHECKPOINT`` or the V1 release from the Hub). A token file never makes us open a local
    path: only random weights (rebuilt from the recorded seed, up to the largest preset's size) or Hub weights,
    each checked against the digest recorded."""
    from .hub import CHECKPOINT_ENV, default_checkpoint, parse_hub_ref
    from .loading import load_tokenizer, random_tokenizer

    device, dtype = _device_dtype(args)
    precision = getattr(args, "precision", "default")  # (encode has none: FP8 runs in the decoder only)
    if precision == "fp8":
        from .fp8 import check_fp8_runs

        check_fp8_runs(device, dtype)
    checkpoint, seed = args.checkpoint, getattr(args, "random_weights", None)
    if checkpoint is not None and seed is not None:
        raise ValueError("--checkpoint and --random-weights each name the weights: pass one of them")
    if checkpoint is None and seed is None and token_metas is not None:
        if args.config is not None:
            raise ValueError("--config goes with --checkpoint or --random-weights: without them the token files name "
                             "their model, config included")  # fmt: skip
        model = _model_of_some_tokens(token_metas, device, dtype)
    elif seed is not None:
        print(f"using RANDOM weights (seed {seed}): tokens and reconstructions are not meaningful", file=sys.stderr)
        model = random_tokenizer(args.config or "tiny", seed=seed, device=device, dtype=dtype)
    else:
        named = "" if checkpoint is not None or not os.environ.get(CHECKPOINT_ENV) else f"${CHECKPOINT_ENV}"
        checkpoint = checkpoint or default_checkpoint()
        where = ", ".join(w for w in ("Hugging Face Hub" if parse_hub_ref(checkpoint) is not None else "", named) if w)
        if where:  # (an error about the weights then names what named them)
            print(f"weights: {escaped(checkpoint)} ({where})", file=sys.stderr)
        model = load_tokenizer(checkpoint, config=args.config, device=device, dtype=dtype, quick=quick)
    model.precision = precision
    if device == "cpu" and not getattr(args, "ray", None) and (slow := slow_dtype_on_this_cpu(args.dtype)):
        notice(slow)  # (once the model is had: a refusal stays the only line; on Ray: _encode_on_ray)
    return model


def _model_of_some_tokens(token_metas, device, dtype):
    """The model of the first token file whose weights can be had (the files of others then fail alone, as made
    by other weights); if none, the first one's reason."""
    problems = []
    for token_meta in token_metas:
        try:
            return _model_of_tokens(token_meta, device, dtype)
        except Exception as e:  # refused, not to be had (a Hub file gone), or not built (no memory for it): a
            # stranger's file fails alone, and the next file's weights are tried, if any. Its message alone is kept:
            # the error's traceback holds the model just built (8 tries of V1 held 8.9 GB at once)
            problems.append(str(e) or type(e).__name__)
        if len(problems) == MAX_WEIGHTS_TRIED:
            break
    others = f" (nor those of {len(problems) - 1} other token files)" if len(problems) > 1 else ""
    raise ValueError(f"{problems[0]}{others}")


def _model_of_tokens(token_meta, device, dtype):
    """The weights a token file records: random ones from their seed, or Hub ones pinned to a commit; where it
    names a local file (never opened on its word), ``$TITOK_FAST_CHECKPOINT`` if set and its digest is the one
    recorded."""
    from .hub import CHECKPOINT_ENV, HUB_SCHEME, is_pinned
    from .loading import load_tokenizer, random_seed, random_tokenizer

    seed = random_seed(token_meta.weights_digest)
    if seed is not None:
        if (size := _random_model_size(token_meta.model_config)) > (most := _largest_preset_size()):
            raise ValueError(  # (1 KB of a stranger's token file would have us build GBs of weights)
                f"the token files name random weights (seed {seed}) of a model of {size:,} parameters, more than "
                f"the largest preset's {most:,}: pass --random-weights {seed} with its --config"
            )
        model = random_tokenizer(token_meta.model_config, seed=seed, device=device, dtype=dtype)
        if model.weights_digest != token_meta.weights_digest:  # (a digest of that form is no proof of anything)
            raise ValueError(
                f"the token files name random weights {brief(token_meta.weights_digest, 64)}, but seed {seed} gives "
                f"{model.weights_digest} with their config: pass --checkpoint, or --random-weights with its --config"
            )
        print(f"using RANDOM weights (seed {seed}), as the token files record", file=sys.stderr)
        return model
    source = token_meta.weights_source
    if source.startswith(HUB_SCHEME) and not is_pinned(source):
        raise ValueError(
            f"the token files name weights {brief(source)!r}, not a Hub file pinned to a commit "
            f"({HUB_SCHEME}owner/name@<commit>:<file>, as titok-fast records them): pass --checkpoint"
        )
    if source.startswith(HUB_SCHEME):
        model = load_tokenizer(source, config=token_meta.model_config, device=device, dtype=dtype)
        if model.weights_digest != token_meta.weights_digest:
            raise ValueError(
                f"{source} now has weights {model.weights_digest}, the token files were made by "
                f"{brief(token_meta.weights_digest, 64)}: pass --checkpoint with the weights that made them"
            )
        return model
    digest = brief(token_meta.weights_digest, 64)
    named = f"the token files name weights {digest} from {brief(source) or 'an unknown file'!r}"
    if not (mine := os.environ.get(CHECKPOINT_ENV)):
        raise ValueError(f"{named}; token files are not trusted to name local files: pass --checkpoint")
    try:
        model = load_tokenizer(mine, config=token_meta.model_config, device=device, dtype=dtype)  # (the digest decides)
    except (ValueError, OSError) as e:
        raise ValueError(f"{named}; ${CHECKPOINT_ENV} ({mine}) cannot be loaded ({e}): pass --checkpoint") from e
    if model.weights_digest != token_meta.weights_digest:
        raise ValueError(f"{named}; ${CHECKPOINT_ENV} ({mine}) has weights {model.weights_digest}: pass --checkpoint")
    print(f"weights: ${CHECKPOINT_ENV} ({mine}), as the token files record", file=sys.stderr)
    return model


def _random_model_size(config) -> int:
    """The parameters of a model of ``config`` (counted on the meta device: nothing allocated)."""
    import torch

    from .config import TiTokConfig
    from .loading import check_config
    from .model import TiTok

    config = TiTokConfig.from_any(config)
    check_config(config)  # (before any table is sized from it)
    with torch.device("meta"):
        return sum(p.numel() for p in TiTok(config).parameters())


@functools.cache
def _largest_preset_size() -> int:
    """(Worked out once a process: each token file whose random weights are tried asks.)"""
    from .config import PRESETS

    return max(_random_model_size(config) for config in PRESETS.values())


def _engine(args: argparse.Namespace, model):
    from .engine import Engine

    return Engine(model, mode=args.mode, max_clips=_batch_size(args, model.device.type))


CPU_BATCH_SIZE = 8  # --batch-size's default with the model on the CPU (32 on a GPU): measured on 2 cores, batches of
# 32 held 1.7 to 2.4 times the memory of batches of 8 (1.72-1.78 GB against 0.95-1.03, tiny config, 256p8 sources;
# V1 in float32: 4.0 GB at 16 clips, 2.8 at 8) and took 5-17% more CPU a clip, for no more clips/s (4.35-4.59
# against 5.11-5.25); and a line of progress comes a batch at a time


def _batch_size(args: argparse.Namespace, device: str) -> int:
    """--batch-size, or its default for a model on ``device`` (a type or a name)."""
    return args.batch_size or (CPU_BATCH_SIZE if str(device).startswith("cpu") else 32)


def _settings(args: argparse.Namespace, model, tokens: int | None = None, engine=None):
    """The clip settings the options ask for, refused up front when no clip could run: ``engine``'s budgets (those
    of the engines the Ray actors build, when None) bound a clip's packed rows."""
    from .checks import check_grids
    from .engine import DEFAULT_BUDGETS
    from .pipeline import ClipSettings, clip_rows_problem

    tokens = args.tokens if tokens is None else tokens
    grid = args.grid or model.config.max_grid
    try:  # before any work: every clip would fail alone
        check_grids([grid], 1, model.config.patch_size)
    except ValueError as e:
        raise ValueError(f"--grid {'x'.join(map(str, grid))}: {str(e).split('; ', 1)[-1]}") from None
    budgets = DEFAULT_BUDGETS if engine is None else engine.budgets
    if problem := clip_rows_problem(grid, tokens, model.config.patch_size, budgets):
        raise ValueError(f"--grid {'x'.join(map(str, grid))} --tokens {tokens}: {problem}")
    return ClipSettings(
        grid=grid, tokens=tokens, fps=args.fps, tail=args.tail, sampling=args.sampling,
        decoder=getattr(args, "decoder", "cpu"), preprocess=getattr(args, "preprocess", "auto"),
        rotation=args.rotation, clips_per_video=args.clips_per_video,
    )  # fmt: skip


def _finish(summary, verb: str, inputs=None) -> int:
    """The summary, and the input sub-folders that could not be listed (their files unknown, left out): either
    makes the exit status 1."""
    unlisted = getattr(inputs, "unlisted", [])
    print(summary.report(verb))
    _say_left_out(unlisted, verb)
    return 1 if summary.failed or unlisted else 0


def _say_left_out(unlisted: list[tuple[str, str]], verb: str) -> None:
    """The input sub-folders and archives that could not be listed (or not all: cut short), each on a line."""
    for folder, reason in unlisted:
        which = "past the cut" if reason.startswith(ARCHIVE_CUT) else "in it"
        print(f"  LEFT OUT {escaped(folder)}: {reason}; the files {which} were not {verb}")


def _none_found(what: str, inputs: Sequence[str]) -> str:
    """The error of a run whose inputs hold no file of ``what``, naming them (the first three) on one line."""
    more = f" and {len(inputs) - 3:,} more" if len(inputs) > 3 else ""
    return f"no {what} found in {', '.join(escaped(str(i)) for i in inputs[:3])}{more}"


TOKEN_FILES_ARE = " (files ending in .safetensors, as `titok-fast encode` makes them from videos)"


def cmd_encode(args: argparse.Namespace) -> int:
    from .pipeline import collect_inputs, encode_files

    given = [f"--{k.replace('_', '-')}" for k in RAY_DEFAULTS if getattr(args, k, None) is not None]
    if given and not args.ray:
        raise ValueError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} only with --ray")
    files = collect_inputs(args.inputs, list_names=args.list_names)
    if not files:
        raise ValueError(_none_found("video files", args.inputs))
    _check_output_folder("-o", args.output)
    if args.ray:
        return _finish(_encode_on_ray(args, files), "encoded", files)
    if args.decoder == "nvdec" and args.worker_kind == "process":
        raise ValueError("--decoder nvdec leaves frames on the GPU, which worker processes cannot hand over: use "
                         "--worker-kind thread")  # fmt: skip
    worker_kind = _worker_kind(args, files)
    if worker_kind == "process":
        from .video import start_process_server

        start_process_server()  # its imports overlap the model's loading
    model = _model(args)
    engine = _engine(args, model)
    summary = encode_files(
        model, engine, files, args.output, _settings(args, model, engine=engine),
        workers=args.workers, worker_kind=worker_kind, read_ahead=_batch_size(args, model.device.type),
        overwrite=args.overwrite,
        stall_seconds=args.stall_timeout, shard=args.shard,
    )  # fmt: skip
    return _finish(summary, "encoded", files)


def _worker_kind(args: argparse.Namespace, files) -> str:
    """encode's decoding workers, "thread" or "process": --worker-kind, or for "auto" what encode_files would
    decide by the first input's frame size, decided here once (its header read once a run), before the model
    loads (a process server is started then)."""
    from .video import auto_worker_kind, default_workers

    kind = args.worker_kind or "auto"
    return kind if kind != "auto" else auto_worker_kind(args.workers or default_workers(), args.decoder, [files[0][0]])


def _encode_on_ray(args: argparse.Namespace, files):
    from .distributed import check_ray_address, check_reading_on_ray, encode_dataset

    check_reading_on_ray(args.decoder, args.preprocess)  # before the model loads
    if args.workers is not None or args.worker_kind is not None:
        raise ValueError("--workers and --worker-kind apply without --ray: on a cluster, each decode task reads with "
                         "--ray-cpus-per-decode CPUs")  # fmt: skip
    check_ray_address(args.ray)
    device = args.device or "cuda"  # the encode actors' device; the driver's copy of the model stays on its CPU
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    args = argparse.Namespace(**{**vars(args), **{k: v for k, v in RAY_DEFAULTS.items() if getattr(args, k) is None}})
    model = _model(argparse.Namespace(**{**vars(args), "device": "cpu", "dtype": dtype}))
    if device == "cpu" and args.ray == "local" and (slow := slow_dtype_on_this_cpu(args.dtype)):
        notice(slow)  # (a cluster started here encodes on this machine's CPUs; another cluster's CPUs are not known)
    # CPU actors' engines have its budgets (cudagraph on CPU actors: encode_dataset says why it is refused)
    engine = _engine(args, model) if device == "cpu" and args.mode != "cudagraph" else None
    return encode_dataset(
        model, files, args.output, _settings(args, model, engine=engine), ray_address=args.ray, device=device,
        mode=args.mode,
        batch_size=_batch_size(args, device), actors=args.ray_actors, gpus_per_actor=args.ray_gpus_per_actor,
        cpus_per_actor=args.ray_cpus_per_actor, cpus_per_decode=args.ray_cpus_per_decode,
        decode_retries=args.ray_retries, actor_restarts=args.ray_actor_restarts, overwrite=args.overwrite,
        stall_seconds=args.stall_timeout, shard=args.shard,
    )  # fmt: skip


def cmd_decode(args: argparse.Namespace) -> int:
    from .pipeline import Inputs, Summary, collect_token_files, decode_files, take_shard

    files = collect_token_files(args.tokens, list_names=args.list_names)
    if not files:
        raise ValueError(_none_found("token files", args.tokens) + TOKEN_FILES_ARE)
    files = Inputs(take_shard(files, args.shard), files.unlisted)
    _check_output_folder("-o", args.output)
    token_metas = None
    if not (args.checkpoint or args.random_weights is not None):  # the token files name the model
        if not files:  # a shard given none (a small dataset over many jobs): nothing to decode, no model to find
            return _finish(Summary(), "decoded", files)
        token_metas = _naming_a_model(files)
    model = _model(args, token_metas=token_metas)
    summary = decode_files(
        _engine(args, model), files, args.output,
        with_source=args.side_by_side, force=args.force, overwrite=args.overwrite,
    )  # fmt: skip
    return _finish(summary, "decoded", files)


def cmd_pack(args: argparse.Namespace) -> int:
    from .pipeline import _progress, collect_token_files
    from .shards import pack_tokens

    files = collect_token_files(args.tokens, list_names=args.list_names, written=(".safetensors", "packed"))
    if not files:
        raise ValueError(_none_found("token files", args.tokens) + TOKEN_FILES_ARE)
    _check_output_folder("-o", args.output)
    _check_not_within(args.output, files.folders)
    accept = None
    if not args.force:  # one model's tokens: those most of the files read first name (decode's rule)
        naming = _naming_a_model(files, _recorded_config)[0]
        accept = functools.partial(_made_by, naming)
    with _progress(total=len(files), unit="file") as bar:
        packed = pack_tokens(
            files, args.output, per_shard=None if args.per_folder else args.per_shard, overwrite=args.overwrite,
            accept=accept, beside=args.beside, progress=bar.update,
        )  # fmt: skip
    print(packed.report(args.output))
    _say_left_out(files.unlisted, "packed")
    return 1 if packed.failed or files.unlisted else 0


def _check_not_within(output: str, folders) -> None:
    """A ValueError where the output folder lies in one of ``folders``, the input folders (given, or named in
    lists): a rerun would read the shards as inputs."""
    for folder in folders:
        if lies_in(output, folder):
            raise ValueError(f"-o {output} lies in the input folder {folder}: a rerun would read the shards as "
                             "inputs; choose an output folder outside it")  # fmt: skip


def _recorded_config(token_file) -> tuple[dict, str]:
    """The model config ``token_file`` records, as recorded (pack moves tokens: it builds no model)."""
    return token_file.model_config, ""


def _made_by(naming: _Naming, path: str, token_file) -> str:
    """"" where ``token_file`` was made by the weights and model config ``naming`` says, else why it is refused."""
    if token_file.weights_digest != naming.weights_digest:
        return (f"made by other weights ({_weights(token_file.weights_digest, token_file.weights_source)}) than most "
                f"of the token files ({_weights(naming.weights_digest, naming.weights_source)}): not packed with "
                "them (--force packs it)")  # fmt: skip
    if token_file.model_config != naming.model_config:
        return ("made by the same weights with another model config (FSQ levels, sizes) than most of the token "
                "files: not packed with them (--force packs it)")  # fmt: skip
    return ""


def _weights(digest: str, source: str) -> str:
    """Weights as a message names them: their digest, and where they came from where a file records it."""
    return f"{brief(digest, 24)}{f', {brief(source, 200)}' if source else ''}"


class _Naming(NamedTuple):
    """What a token file says of the model that made it."""

    weights_digest: str
    weights_source: str
    model_config: dict


def _naming_a_model(files, config_of=None) -> list[_Naming]:
    """The readable token files among ``files`` whose model config is one a model may be built from, one per
    weights and config, those named by more of the files read first (ties: in the order read), so that a stranger's
    file among a dataset's does not choose the model the others are decoded with. Files are read until
    MAX_FILES_WITHOUT_NEW_WEIGHTS in a row name none other (a dataset's files usually all name the same), at most
    MAX_FILES_FOR_WEIGHTS once one has (every file until then); if none names a model, a ValueError saying so, with
    the first reason (where none is a token file, that: a video given to decode is said to be one). ``config_of``: a
    token file -> (its config, "") or (None, why not), default :func:`_model_config_of`."""
    from .pipeline import _one_line, token_file_at
    from .tokens import TokenFileError

    unusable, named = "", {}  # the first file read whose model could not be built (decode_files fails them alone)
    since_new = 0  # files read since the last new weights and config
    loaded = False  # whether any file read is a token file
    for read, (path, _) in enumerate(files):
        if named and (since_new == MAX_FILES_WITHOUT_NEW_WEIGHTS or read >= MAX_FILES_FOR_WEIGHTS):  # (until one
            break  # names a model, every file is read)
        since_new += 1
        try:
            token_file = token_file_at(path)
        except (TokenFileError, OSError) as e:  # (its message names the file)
            unusable = unusable or f" ({_one_line(e)})"
            continue
        loaded = True
        config, problem = (config_of or _model_config_of)(token_file)
        if not problem:  # (the config as read: fields it does not know, which a stranger's file may hold a MB of,
            key = (token_file.weights_digest, token_file.weights_source, repr(config))  # are left out)
            if key in named:
                named[key][0] += 1
            else:  # (what names the model, not the file's tokens: a token file may be 256 MB)
                named[key] = [1, _Naming(token_file.weights_digest, token_file.weights_source, config)]
                since_new = 0
        unusable = unusable or (f" ({path}: {problem})" if problem else "")
    if not loaded:
        raise ValueError(f"none of the {len(files):,} file(s) given is a readable token file{unusable}")
    if not named:
        raise ValueError(f"none of the token files can be read and name a model{unusable}: pass --checkpoint (or "
                         "--random-weights SEED for files made with random weights)")  # fmt: skip
    return [naming for _, naming in sorted(named.values(), key=lambda entry: -entry[0])]  # (a stable sort)


def _model_config_of(token_file) -> tuple[dict | None, str]:
    """The model config ``token_file`` records, as read (``TiTokConfig.to_dict``), and "", or None and why it is
    not one a model may be built from (outside the limits any model is held to)."""
    from .config import TiTokConfig
    from .loading import check_config

    try:
        config = TiTokConfig.from_any(token_file.model_config)
        check_config(config)
    except (ValueError, TypeError, KeyError) as e:
        return None, str(e) or type(e).__name__
    return config.to_dict(), ""


def cmd_eval(args: argparse.Namespace) -> int:
    from .pipeline import collect_inputs, evaluate

    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise ValueError(f"--plot {args.plot}: expected a .png path (the plot is written as a PNG)")
    if args.plot:
        from .plots import require_matplotlib

        require_matplotlib()  # before any work
    for option, path, what in (("--json", args.json, "JSON"), ("--plot", args.plot, "PNG")):
        if path:
            _check_file_to_write(option, path, what)
    if args.json and args.plot and os.path.realpath(args.json) == os.path.realpath(args.plot):
        raise ValueError(f"--json and --plot both name {args.plot}; the plot would replace the report: give two paths")
    if args.grid:
        _check_ssim_grid(f"--grid {'x'.join(map(str, args.grid))}", args.grid)
    inputs = collect_inputs(args.inputs, outputs=False)  # a mistyped input is said before the weights load
    if not inputs:  # (as is a folder of none: the weights may be a download)
        raise ValueError(_none_found("video files", args.inputs))
    model = _model(args)
    engine = _engine(args, model)
    _settings(args, model, tokens=max(args.counts), engine=engine)  # checked before any work, at the most tokens
    settings = _settings(args, model, tokens=args.counts[0])  # each count of --tokens is run in turn
    _check_ssim_grid(f"the model's grid {'x'.join(map(str, settings.grid))}", settings.grid)  # when not given
    per_file: dict = {}
    table, summary = evaluate(
        engine, inputs, settings, args.counts, workers=args.workers,
        group=_batch_size(args, model.device.type), per_file=per_file, stall_seconds=args.stall_timeout,
    )  # fmt: skip
    print(f"{'tokens':>8} {'PSNR dB':>9} {'SSIM':>7} {'clips':>6}")
    for n, row in table.items():
        print(f"{n:>8} {row['psnr']:>9.2f} {row['ssim']:>7.4f} {row['clips']:>6}")
    if args.json:
        report = json.dumps({
            "weights": model.weights_digest, "results": table,
            "settings": {"grid": list(settings.grid), "fps": settings.fps, "tail": settings.tail,
                         "sampling": settings.sampling, "rotation": settings.rotation,
                         "clips_per_video": settings.clips_per_video,
                         "dtype": str(model.dtype).removeprefix("torch."), "precision": model.precision},
            "failed": [{"source": source, "reason": reason} for source, reason in summary.failed],
            "left_out": [{"input": folder, "reason": reason} for folder, reason in inputs.unlisted],
        }, indent=2, allow_nan=False).encode()  # fmt: skip
        try:
            os.makedirs(os.path.dirname(absolute(args.json)), exist_ok=True)
            write_atomically(args.json, report, tidy=True)  # (what a killed run left of it goes)
        except OSError as e:  # its folder gone meanwhile, a full disk: named as asked for, not by its temporary
            raise ValueError(f"--json {args.json}: cannot be written ({e.strerror or e})") from None
        print(f"wrote {escaped(args.json)}")
    if args.plot:
        from .plots import rate_distortion_figure, save_figure

        title = f"clips of {'x'.join(map(str, settings.grid))}, weights {model.weights_digest}"
        figure = rate_distortion_figure(_by_resolution(per_file, settings.rotation), title=title)
        try:
            save_figure(figure, args.plot)
        except OSError as e:  # (as --json)
            raise ValueError(f"--plot {args.plot}: cannot be written ({e.strerror or e})") from None
        print(f"wrote {escaped(args.plot)}")
    return _finish(summary, "evaluated", inputs)


def _check_ssim_grid(what: str, grid) -> None:
    from .metrics import SSIM_MIN_SIDE

    if min(grid[1:]) < SSIM_MIN_SIDE:
        raise ValueError(f"{what}: eval's SSIM needs frames of at least {SSIM_MIN_SIDE} x {SSIM_MIN_SIDE}")


def _check_output_folder(option: str, folder: str) -> None:
    """Before the model loads: the output folder exists or can be made (tried, and what was made is removed again:
    a command refused later leaves nothing behind), and takes files."""
    missing, nearest = [], Path(folder).absolute()
    while not os.path.lexists(nearest):
        missing.append(nearest)
        nearest = nearest.parent
    if not nearest.is_dir():  # a file (or a link to one) where a folder is needed
        where = "" if not missing else f"cannot be made: {nearest} "
        raise ValueError(f"{option} {folder}: {where}is not a folder")
    made = []
    try:
        for path in reversed(missing):
            try:
                path.mkdir()
                made.append(path)
            except FileExistsError:  # made meanwhile (shards started at once): theirs, not ours to remove
                if not path.is_dir():
                    raise
    except OSError as e:
        raise ValueError(f"{option} {folder}: cannot be made ({e.strerror or e})") from None
    finally:
        for path in reversed(made):
            with contextlib.suppress(OSError):  # another run may be writing there by now
                path.rmdir()
    if not os.access(folder if not missing else missing[-1].parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {folder}: is not writable")


def _check_file_to_write(option: str, path: str, what: str) -> None:
    """Before the work whose result goes to the file ``path``: its folder exists or can be made (it is made when
    the file is written), and what is there already may be replaced: nothing, or a regular file of the kind
    written (``what``: a key of FILE_KINDS), so that an input or any other file given by mistake is never written
    over, nor a device (``--json /dev/null`` as root would replace the device itself)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there, or a link that leads nowhere: replaced by the file
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise ValueError(f"{option} {path}: is a folder; expected the path of a file to write")
    if mode is not None and not stat.S_ISREG(mode):
        raise ValueError(f"{option} {path}: is {kind_of(mode)} (where its links lead); expected the path of a "
                         f"{what} file to write")  # fmt: skip
    if mode is not None and not _is_kind(path, what):
        raise ValueError(f"{option} {path}: is there already and is not a {what} file; it would be replaced: "
                         "remove it or choose another path")  # fmt: skip
    if (length := len(os.fsencode(os.path.basename(path)))) > MAX_NAME_BYTES:  # (else said once the work is done)
        raise ValueError(f"{option} {path}: its name is {length} bytes; a file name has at most {MAX_NAME_BYTES}")
    _check_output_folder(f"{option} {path}: its folder", os.path.dirname(absolute(path)))


FILE_KINDS = {  # how the files a command writes begin: what an existing file must look like to be replaced
    "JSON": lambda head: head.lstrip().startswith(b"{"),
    "PNG": lambda head: head.startswith(b"\x89PNG\r\n\x1a\n"),
    "safetensors": lambda head: len(head) > 8 and head[8:9] == b"{",  # (an 8-byte header size, then its JSON)
}


def _is_kind(path: str, what: str) -> bool:
    """Whether the regular file ``path`` is empty or begins as a file of kind ``what`` (FILE_KINDS)."""
    head = file_head(path, 4096)
    return not head or FILE_KINDS[what](head)  # (None: it cannot be read: writing will say what is wrong)


def _by_resolution(per_file: dict, rotation: str = "stored") -> dict[str, dict[int, dict[str, float]]]:
    """Per-file sums from ``evaluate`` averaged over the files of each source resolution ("WxH", as the frames
    were read: turned a quarter for rotation "display" when the first frame's display matrix says so). A file that
    cannot be opened again (removed or changed since it was read) is left out of the plot, with a notice."""
    import av

    from .decoders import open_input, video_stream
    from .video import VideoError, first_frame_turns

    groups: dict[str, dict[int, dict[str, float]]] = {}
    for path, rows in per_file.items():
        try:
            with open_input(path) as container:  # evaluate read it to the end: it opened then
                stream = video_stream(container)
                if stream is None:
                    raise VideoError("has no video stream any more")
                width, height = stream.width, stream.height
        except (OSError, av.FFmpegError, VideoError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            notice(f"{path}: left out of the plot: cannot be opened again to tell its resolution ({why})")
            continue
        if rotation == "display":
            with contextlib.suppress(VideoError, OSError, av.FFmpegError):
                if first_frame_turns(path) % 2:
                    width, height = height, width
        label = f"{width}x{height}"
        group = groups.setdefault(label, {n: {"psnr": 0.0, "ssim": 0.0, "clips": 0} for n in rows})
        for n, row in rows.items():
            for key in ("psnr", "ssim", "clips"):
                group[n][key] += row[key]
    return {
        label: {n: {m: row[m] / row["clips"] for m in ("psnr", "ssim")} for n, row in rows.items()}
        for label, rows in sorted(groups.items(), key=lambda item: [int(v) for v in item[0].split("x")])
        if all(row["clips"] for row in rows.values())  # files that gave no clip draw nothing
    }


def cmd_convert(args: argparse.Namespace) -> int:
    from .loading import convert

    # before a checkpoint of a gigabyte is read; leaves no folder behind
    _check_file_to_write("output", args.output, "safetensors")
    digest = convert(args.checkpoint, args.output, config=args.config, use_ema=not args.no_ema)
    print(f"wrote {escaped(args.output)} (weights digest {digest})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    suite = Path(__file__).resolve().parent.parent / "benchmarks"
    if not suite.is_dir():
        raise ValueError(
            f"the benchmark suite is not installed here (expected {suite}): it runs from a source checkout installed "
            "with pip install -e '.[bench]'"
        )
    if any(importlib.util.find_spec(name) is None for name in ("pytest", "pytest_benchmark")):
        raise ValueError("the benchmark suite needs pytest and pytest-benchmark: pip install -e '.[bench]'")
    _check_file_to_write("--json", args.json, "JSON")  # an input named there by mistake is refused, not replaced
    results = Path(args.json)
    results.parent.mkdir(parents=True, exist_ok=True)
    # pytest-benchmark truncates its file first and leaves it empty when no benchmark ran: it writes beside the
    # results, which it replaces only once it has written some (an earlier run's file is kept otherwise)
    partial = results.with_name(f".{temporary_stem(results.name)}.{os.getpid()}.partial")  # (a name of 255: too long)
    files = [str(suite / f"bench_{name}.py") for name in ("model", "kernels", "pipeline", "resume", "shards")]
    cmd = [sys.executable, "-m", "pytest", *files, "--benchmark-only", "-q", f"--benchmark-json={partial}"]
    cmd += ["-k", args.select] if args.select else []
    print("+", " ".join(cmd), file=sys.stderr)
    try:
        code = subprocess.call(cmd)
        written = partial.is_file() and partial.stat().st_size > 0
        if written:
            os.replace(partial, results)
    finally:
        partial.unlink(missing_ok=True)
    if written:
        from .benchreport import table

        print(table(str(results)))
    elif results.exists():
        print(f"{escaped(str(results))} is an earlier run's: this run wrote no results", file=sys.stderr)
    if code == 5:  # pytest's "no tests collected"
        notice(f"no benchmark matches -k {args.select!r}" if args.select else "no benchmark was collected")
    elif not written and code == 0:  # (with errors or failures, pytest's own output says what went wrong)
        notice("no benchmark ran: each one selected was skipped on this machine (pytest -rs says why; the gpu ones "
               "need CUDA)")  # fmt: skip
    return code


DEMO_REAL = ((16, 192, 192), 256)  # grid and tokens inside what V1 was trained on (144-192 px, 8-20 frames)
DEMO_RANDOM = ((8, 64, 96), 128)  # the tiny config's


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .hub import WeightsUnavailable, default_checkpoint
    from .pipeline import collect_inputs, decode_files, encode_files
    from .writing import write_video

    out = Path(args.output)
    sample, token_path = out / "sample.mp4", out / "tokens" / "sample.safetensors"
    if (theirs := _not_the_demos(out)) is not None:
        raise ValueError(f"{theirs} is there and not known to be the demo's: kept; choose another output folder "
                         "(the demo writes sample.mp4, tokens/sample.safetensors and recon/sample.mp4, and appends to "
                         "tokens/manifest.jsonl)")  # fmt: skip
    _check_output_folder("-o", args.output)  # (before the weights load)
    try:  # only the default weights fall back; named ones that fail are an error
        args.random_weights, model = None, _model(args, quick=args.checkpoint is None)
    except WeightsUnavailable as e:
        if args.checkpoint is not None:
            raise
        print(f"{e}\nthe demo falls back to RANDOM weights ({default_checkpoint()} not available)", file=sys.stderr)
        args.random_weights = 0
        model = _model(args)
    grid, tokens = DEMO_RANDOM if args.random_weights is not None else DEMO_REAL
    args.grid, args.tokens = args.grid or grid, args.tokens or tokens
    if args.fps > DEMO_FPS:  # (its frames sampled faster than it has them: every clip would fail)
        raise ValueError(f"--fps {args.fps:g}: the demo's sample video has {DEMO_FPS} frames a second; sample it at "
                         f"{DEMO_FPS} or fewer")  # fmt: skip
    engine = _engine(args, model)
    settings = _settings(args, model)
    seconds = max(3.0, settings.grid[0] / settings.fps)  # (at least one clip, whatever the grid's frames and fps)
    if seconds > DEMO_MOST_SECONDS:  # (its frames are made in memory: --fps 0.0001 asked for 125 GB)
        raise ValueError(f"--grid {'x'.join(map(str, settings.grid))} at --fps {settings.fps:g}: a clip spans "
                         f"{seconds:g} s, and the demo's sample video is at most {DEMO_MOST_SECONDS} s: sample more "
                         "frames a second or fewer frames a clip")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)  # once every option is known to work: a refused demo writes nothing
    # (the sample is made anew: the demo's token file of the last one, if there, is no file of this one to set aside)
    token_path.unlink(missing_ok=True)
    frames = math.ceil(seconds * DEMO_FPS)
    write_video(sample, _moving_pattern(frames=frames, height=192, width=256), fps=DEMO_FPS, comment=DEMO_SAMPLE)
    start = time.perf_counter()
    enc = encode_files(model, engine, collect_inputs([sample]), out / "tokens", settings, workers=args.workers,
                       overwrite=True)  # fmt: skip
    if enc.failed:
        return _finish(enc, "encoded")
    scores: list[float] = []  # each chunk's PSNR, from the side-by-side pass itself
    dec = decode_files(engine, [token_path], out / "recon", with_source=True, overwrite=True, scores=scores)
    seconds = time.perf_counter() - start
    if dec.failed:
        return _finish(dec, "decoded")
    print(enc.report("encoded"))
    print(dec.report("decoded"))
    print(f"sample video:    {escaped(str(sample))}\ntoken file:      {escaped(str(token_path))}")
    print(f"side by side:    {escaped(str(out / 'recon' / 'sample.mp4'))} (source | reconstruction)")
    mean_psnr = sum(scores) / len(scores)
    print(f"PSNR:            {mean_psnr:.2f} dB over {len(scores)} clip(s) (weights {model.weights_digest})")
    print(f"encode + decode: {enc.clips} clip(s) of {'x'.join(map(str, settings.grid))}, {settings.tokens} tokens, "
          f"{seconds:.2f} s on {model.device} ({torch.get_num_threads()} threads)")  # fmt: skip
    return 0


DEMO_SAMPLE = "titok-fast demo sample"  # the comment tag of the sample video the demo writes
DEMO_FPS = 8  # its frame rate, as upstream's training videos'
DEMO_MOST_SECONDS = 60  # its longest: 480 frames of 192x256, made in memory (71 MB)


def _not_the_demos(out: Path) -> Path | None:
    """The first of the demo's outputs in ``out`` (sample.mp4, tokens/sample.safetensors, recon/sample.mp4, and the
    folders tokens and recon) that is there and not known to be the demo's, which replaces them: a user's video or
    file of that name, or anything but a regular file (a FIFO would hang the demo); None if all are. A token file
    and a decoded video are the demo's where made from a sample.mp4 (the folder may have been moved or reached
    through a link); the sample, where marked by the demo, or (an earlier version's, unmarked) where it is the file
    the token file there was made from (its size and modification time)."""
    from .pipeline import DECODE_RECORD, _decoded_from, _record_of
    from .tokens import try_load_tokens
    from .video import source_stamp, video_comment

    sample, tokens, recon = out / "sample.mp4", out / "tokens" / "sample.safetensors", out / "recon" / "sample.mp4"
    for path, kind in ((out / "tokens", os.path.isdir), (out / "recon", os.path.isdir), (sample, os.path.isfile),
                       (tokens, os.path.isfile), (recon, os.path.isfile)):  # fmt: skip
        if os.path.lexists(path) and not kind(path):
            return path
    made = try_load_tokens(tokens) if os.path.lexists(tokens) else None
    if os.path.lexists(tokens) and (made is None or os.path.basename(made.source) != "sample.mp4"):
        return tokens
    if os.path.lexists(sample) and video_comment(sample) != DEMO_SAMPLE and (
        made is None or made.made_with.get("source_stamp") != source_stamp(sample)
    ):
        return sample
    if os.path.lexists(recon):  # (decode's record of it names the source video beside it)
        record = video_comment(recon) or ""
        source = _decoded_from(_record_of(record)) if record.startswith(DECODE_RECORD) else None
        if os.path.basename(source or "") != "sample.mp4":
            return recon
    return None


def _moving_pattern(frames: int, height: int, width: int):
    """A colourful pattern drifting to the right: [3, frames, height, width] in [-1, 1]."""
    import torch

    t = torch.arange(frames, dtype=torch.float32)[:, None, None]
    y = torch.linspace(0, 1, height)[None, :, None]
    x = torch.linspace(0, 1, width)[None, None, :]
    phase = 6.283 * (x * 2 - t / frames)
    channels = [torch.sin(phase + 4 * y), torch.cos(phase * 1.5 + 0 * y), torch.sin(2 * phase - 3 * y)]
    return torch.stack([c.expand(frames, height, width) for c in channels]) * 0.8


def _add_model_args(
    p: argparse.ArgumentParser, random_default: bool = False, recorded: bool = False, decodes: bool = True
) -> None:
    default = (  # (decode: the token files name their weights)
        "the weights the token files record: random ones by their seed, Hub ones at their commit, a local file "
        "as $TITOK_FAST_CHECKPOINT if its weights are the recorded ones"
        if recorded
        else "$TITOK_FAST_CHECKPOINT, else NilanE/TiTok-Video-VariableComp-V1"
    )
    p.add_argument(
        "--checkpoint",
        type=_non_empty,
        help="upstream model.ckpt, converted .safetensors, or a Hub id owner/name[@revision][:file] "
        f"(default: {default})",
    )
    p.add_argument(
        "--config",
        default=None,
        type=_non_empty,
        help="preset (v1, tiny) or upstream YAML; default: the config stored in a .safetensors, the preset of a known "
        "Hub id, v1 for a .ckpt, tiny for random weights",
    )
    if not random_default:
        p.add_argument(
            "--random-weights", type=_int_between(0, MAX_SEED), metavar="SEED",
            help="use random weights (to try the pipeline)",
        )  # fmt: skip
    p.add_argument("--device", type=_device_name, default=None,
                   help="cuda or cpu (default: cuda when available; another GPU: CUDA_VISIBLE_DEVICES=N)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument(
        "--mode",
        choices=("auto", "eager", "compile", "cudagraph"),
        default="auto",
        help="auto: per batch, a CUDA graph of the batch's own layout for small batches on CUDA and eager otherwise "
        "(a fixed rule on shape and device); eager: batches at their exact size; compile: torch.compile per token "
        "budget; cudagraph: a CUDA graph per token budget, batches padded to it (default auto)",
    )
    if decodes:  # (FP8 runs in the decoder only: titok_fast/fp8.py)
        p.add_argument(
            "--precision",
            choices=("default", "fp8"),
            default="default",
            help="fp8: the decoder's transformer matmuls in float8 with row-wise scales (CUDA GPUs of compute "
            "capability 8.9+, bf16); tokens are made as in the default. On an H200 at batch 32: decoding 1.19x, "
            "decoded pixels 36 dB PSNR from float32 decoding against bf16's 50 (random weights, "
            "benchmarks/RESULTS.md) (default: default)",
        )
    p.add_argument("--batch-size", type=_positive, default=None,
                   help=f"most clips per batch (default 32 with the model on a GPU, {CPU_BATCH_SIZE} on the CPU)")


def _add_clip_args(p: argparse.ArgumentParser, tokens: bool = True) -> None:
    p.add_argument(
        "--grid", type=_grid, default=None, help="clip size TxHxW (default: the config's max_grid, 20x192x192 for v1)"
    )
    if tokens:
        p.add_argument("--tokens", type=_positive, default=256, help="latent tokens per clip (default 256)")
    p.add_argument("--fps", type=_fps, default=8.0, help="frames per second sampled from the video (default 8)")
    p.add_argument(
        "--tail",
        choices=("drop", "pad"),
        default="drop",
        help="a last chunk shorter than T frames: drop it, or pad it by repeating its last frame (default drop)",
    )
    p.add_argument(
        "--clips-per-video", type=_int_between(1, MAX_CLIPS_PER_VIDEO), default=None, metavar="K",
        help="at most the first K clips of each video, decoding stopped after them (default: all)",
    )  # fmt: skip
    p.add_argument(
        "--sampling",
        choices=("upstream", "time"),
        default="upstream",
        help="upstream: the frames upstream's notebook picks (same tokens); time: by presentation time, for "
        "variable frame rate videos (default upstream)",
    )
    p.add_argument(
        "--rotation",
        choices=("stored", "display"),
        default="stored",
        help="stored: frames as the file stores them, as upstream reads them (same tokens); display: turned as the "
        "container says to show them (phone videos are often stored sideways), by quarter turns; a file whose "
        "display matrix mirrors or turns by another angle fails (default stored)",
    )
    p.add_argument(
        "--workers", type=_int_between(1, MAX_WORKERS), default=None,
        help="video decoding workers (default: one per CPU core)",
    )  # fmt: skip


def _add_stall_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stall-timeout",
        type=_stall_seconds,
        default=STALL_SECONDS,
        metavar="SECONDS",
        help=f"a file whose decoder gives no clip for this long (a read that hangs, a file the decoder cannot get "
        f"through) fails alone and its worker is replaced; 0: wait for ever (default {STALL_SECONDS:g})",
    )


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--worker-kind",
        choices=("auto", "thread", "process"),
        default=None,  # (auto; None: not given, which --ray needs)
        help="decode in threads, or in worker processes (frames come back through shared memory), which go on "
        "scaling with cores where threads stop; auto: processes from 8 workers on for sources (as the first input, "
        "done or not) with frames of at most 307,200 pixels (640x480), threads otherwise and with --decoder nvdec "
        "(default auto)",
    )
    p.add_argument(
        "--decoder",
        choices=("cpu", "nvdec"),
        default="cpu",
        help="cpu: PyAV/FFmpeg, the exact path; nvdec: the GPU's hardware decoder (PyNvVideoCodec), frames stay on "
        "the GPU; what NVDEC cannot decode falls back to the CPU with a notice (default cpu)",
    )
    _add_stall_arg(p)
    p.add_argument(
        "--preprocess",
        choices=("auto", "cpu", "device"),
        default="auto",
        help="where frames are resized, cropped and scaled: in the decoding workers (cpu), or per clip on the "
        "model's device (device); auto: device on CUDA for sources of at most 3840x2160 pixels (resized too; not of "
        "extreme aspect ratios) whose clip at source size is at most 1 GiB of RGB, else cpu (default auto)",
    )


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    ray = p.add_argument_group("Ray cluster (pip install 'titok-fast[ray]'; inputs and outputs on a shared filesystem)")
    ray.add_argument(
        "--ray", metavar="CLUSTER", type=_non_empty,
        help="encode on a Ray cluster: local (start one here), auto (join the running one) or its ADDRESS; decoding "
        "runs on CPU workers, the model on --ray-actors actors (on GPUs unless --device cpu)",
    )  # fmt: skip
    ray.add_argument("--ray-actors", type=_positive, help="encode actors (default: one per --ray-gpus-per-actor GPUs)")
    ray.add_argument("--ray-gpus-per-actor", type=_ray_resource, help="GPUs per encode actor (default 1)")
    ray.add_argument("--ray-cpus-per-actor", type=_ray_resource, help="CPUs per encode actor (default 1)")
    ray.add_argument("--ray-cpus-per-decode", type=_ray_resource, help="CPUs per decode task (default 1)")
    ray.add_argument(
        "--ray-retries", type=_int_between(0, MAX_RAY_RETRIES),
        help="times a decode task whose worker died is retried (default 2)",
    )
    ray.add_argument(
        "--ray-actor-restarts", type=_int_between(0, MAX_RAY_RETRIES),
        help="times an encode actor is restarted after its process died, e.g. on a device fault (default 8)",
    )  # fmt: skip


def _add_list_names_arg(p: argparse.ArgumentParser, given: str, written: str) -> None:
    p.add_argument(
        "--list-names", choices=("stem", "relative"), default="stem",
        help=f"how a file named in a .txt list is named: its stem (a/0001.{given} -> 0001.{written}), or its path "
        f"below the folder of the list given (-> a/0001.{written}, as a folder input keeps its structure; so are the "
        "files of folders and lists that list names; a file outside that folder is refused) (default stem)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="titok-fast",
        description="Fast, exact runtime for the TiTok-Video tokenizer. With no command, runs the demo.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"titok-fast {__version__}")
    debug = argparse.ArgumentParser(add_help=False)  # --debug after the command too; absent: keep the top level's
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, parents=[debug])

    p = sub.add_parser("encode", help="video files -> token files (.safetensors), resumable")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="video files, folders (recursive) or .txt path lists")
    p.add_argument("-o", "--output", type=_folder, required=True, help="output folder for token files")
    p.add_argument("--overwrite", action="store_true", help="re-encode files whose token file is already complete")
    p.add_argument(
        "--shard", type=_shard, metavar="K/N", help="encode only shard K of N (0 <= K < N) of the inputs, chosen by "
        "a hash of each output name: N runs given the same inputs, one per GPU or machine, split them without overlap",
    )  # fmt: skip
    _add_list_names_arg(p, "mp4", "safetensors")
    _add_model_args(p, decodes=False)
    _add_clip_args(p)
    _add_input_args(p)
    _add_ray_args(p)
    p.set_defaults(run=cmd_encode)

    p = sub.add_parser("decode", help="token files -> mp4 reconstructions")
    p.add_argument(
        "tokens", nargs="+", metavar="TOKENS",
        help="token files written by encode, folders of them (recursive; the folder structure is kept), tar shards "
        "of them (pack's: each a folder of its name) or .txt path lists",
    )  # fmt: skip
    p.add_argument("-o", "--output", type=_folder, required=True, help="output folder for mp4 files")
    p.add_argument("--shard", type=_shard, metavar="K/N", help="decode only shard K of N (0 <= K < N) of the token "
                   "files, chosen by a hash of each output name, as encode's --shard")  # fmt: skip
    p.add_argument("--side-by-side", action="store_true", help="put the source video left of the reconstruction")
    _add_list_names_arg(p, "safetensors", "mp4")
    p.add_argument(
        "--force", action="store_true", help="decode even if the token file came from other weights or model config"
    )
    p.add_argument("--overwrite", action="store_true", help="decode again mp4 files that are complete, and replace "
                   "mp4 files that record no decode (never a token file's own source video)")
    _add_model_args(p, recorded=True)
    p.set_defaults(run=cmd_decode)

    p = sub.add_parser("pack", help="token files -> tar shards (WebDataset's layout) for training, resumable")
    p.add_argument(
        "tokens", nargs="+", metavar="TOKENS",
        help="token files written by encode, folders of them (recursive), tar shards of them or .txt path lists",
    )  # fmt: skip
    p.add_argument("-o", "--output", type=_folder, required=True, help="output folder for the shards")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--per-shard", type=_per_shard, default=PER_SHARD, metavar="N",
                       help="token files a shard, in the order of their names: 00000.tar, 00001.tar, ... "
                       f"(default {PER_SHARD:,})")  # fmt: skip
    group.add_argument("--per-folder", action="store_true", help="one shard for each folder of token files, named "
                       "by it (tokens/00000/*.safetensors -> 00000.tar: the shards of the videos they were made from)")
    p.add_argument("--with", dest="beside", type=_extensions, default=(), metavar="EXT[,EXT...]",
                   help="also pack the files of these extensions beside each token file's source video, of its stem "
                   "(--with json,txt: 000000001.json and .txt beside 000000001.mp4, in its folder or tar archive), "
                   "under its key (one not there is left out, and counted): its source must be the very file its "
                   "tokens were made from")  # fmt: skip
    _add_list_names_arg(p, "safetensors", "safetensors")
    p.add_argument("--force", action="store_true", help="pack token files of any weights and model config (by "
                   "default those of the model most of the files read first name, as decode takes)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="write again shards that are complete, and replace a "
                   "file under a shard's name that is no tar archive")  # fmt: skip
    p.set_defaults(run=cmd_pack)

    p = sub.add_parser("eval", help="encode + decode, PSNR and SSIM per token count")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="video files, folders or .txt path lists")
    p.add_argument("--tokens", dest="counts", type=_counts, default="128,256,1024",  # (a string: parsed by type)
                   help="token counts to measure, comma-separated (default 128,256,1024)")
    p.add_argument("--json", type=_non_empty, help="also write the table as JSON here")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        type=_non_empty,
        help="also draw PSNR and SSIM against tokens, a line per input resolution "
        "(needs the plot extra: pip install 'titok-fast[plot]')",
    )
    _add_model_args(p)
    _add_clip_args(p, tokens=False)
    _add_stall_arg(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("convert", help="upstream Lightning .ckpt -> .safetensors with the config inside")
    p.add_argument("checkpoint", type=_non_empty, help="upstream model.ckpt, or a Hub id owner/name[@revision][:file]")
    p.add_argument("output", type=_non_empty, help="output .safetensors path")
    p.add_argument("--config", default=None, type=_non_empty,
                   help="preset name (v1, tiny) or upstream YAML path (default: the config a .safetensors stores, "
                   "a known Hub id's preset, v1 for a local .ckpt; other Hub ids need it)")  # fmt: skip
    p.add_argument("--no-ema", action="store_true", help="take the raw model weights, not the EMA weights")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("bench", help="run the benchmark suite (pytest-benchmark) and print the results table")
    p.add_argument("--json", default="benchmark-results.json", type=_non_empty,
                   help="where to keep the raw results (default benchmark-results.json)")  # fmt: skip
    p.add_argument("-k", dest="select", help="only benchmarks matching this pytest expression, e.g. gpu or cpu")
    p.set_defaults(run=cmd_bench, held_imports=())  # (pytest runs in a process of its own)

    p = sub.add_parser(
        "demo",
        help="sample video -> tokens -> side-by-side mp4 and PSNR; V1 weights (16x192x192, 256 tokens), or random "
        "weights on the tiny config (8x64x96, 128 tokens) when V1 is not cached and the Hub cannot be reached",
    )
    p.add_argument(
        "-o", "--output", type=_folder, default="titok-fast-demo", help="output folder (default titok-fast-demo)"
    )
    _add_model_args(p, random_default=True)
    _add_clip_args(p)
    p.set_defaults(run=cmd_demo, tokens=None, workers=1)
    (real_grid, real_tokens), (random_grid, random_tokens) = DEMO_REAL, DEMO_RANDOM
    for option, default in (
        ("--grid", f"{'x'.join(map(str, real_grid))}, or {'x'.join(map(str, random_grid))} on random weights"),
        ("--tokens", f"{real_tokens}, or {random_tokens} on random weights"),
        ("--workers", "1: the demo reads one short video"),
    ):
        action = p._option_string_actions[option]
        action.help = f"{action.help.rsplit(' (default', 1)[0]} (default {default})"
    return parser


@contextlib.contextmanager
def _interrupts_handled():
    """Ctrl-C and SIGTERM during a command: raised as KeyboardInterrupt / Terminated, but not between a token file
    and its manifest line (``files.interrupts_held``); a second SIGTERM is ignored (it would cut the cleanup
    short). Handlers set outside Python (getsignal gives None), or a command run off the main thread, are left as
    they are. Yields the set of signals received."""
    received: set[int] = set()
    forget_interrupts()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield received
        return

    def interrupted(signum, frame):
        interrupt(KeyboardInterrupt())

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        received.add(signum)
        interrupt(Terminated(f"signal {signal.Signals(signum).name}"))

    ours = {signal.SIGINT: interrupted, signal.SIGTERM: terminated}
    previous = {signum: signal.getsignal(signum) for signum in ours}
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background: Ctrl-C is not for us
        del ours[signal.SIGINT], previous[signal.SIGINT]
    try:
        for signum, handler in ours.items():
            if previous[signum] is not None:
                signal.signal(signum, handler)
        yield received
    finally:
        forget_interrupts()  # (a later command in this process, or a caller's own interrupt, is not this one's)
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    notice(f"warning: {' '.join(str(message).split())}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if sys.platform == "win32":  # (its file locks and resource limits are POSIX modules' that Windows lacks)
        parser.error("titok-fast runs on Linux and other POSIX systems, not on Windows: run it under WSL")
    if args.command is None:
        args = parser.parse_args(["demo", *(["--debug"] if args.debug else [])])
    with _debug_env(getattr(args, "debug", False)), _output_dropped_once_unread():
        return _run(args)


class _UnreadOutput:
    """``sys.stdout`` for a command: once what reads it has gone (``| head`` closed the pipe), the rest is dropped,
    so that the command ends as its work did (its files and manifest are written) rather than with an error."""

    def __init__(self, stream):
        self._stream, self.gone = stream, False

    def write(self, text: str) -> int:
        self._quietly(self._stream.write, text)
        return len(text)

    def flush(self) -> None:
        self._quietly(self._stream.flush)

    def _quietly(self, call, *args) -> None:
        if self.gone:
            return
        try:
            call(*args)
        except BrokenPipeError:
            self.gone = True
            with contextlib.suppress(OSError, ValueError):  # (Python's flush at exit writes there too)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self._stream.fileno())
                os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _output_dropped_once_unread():
    stream = sys.stdout
    if stream is None:
        yield
        return
    sys.stdout = _UnreadOutput(stream)
    try:
        yield
    finally:
        if isinstance(sys.stdout, _UnreadOutput):
            sys.stdout = stream


@contextlib.contextmanager
def _debug_env(debug: bool):
    """With --debug, $TITOK_FAST_DEBUG set for the command (its worker processes inherit it): an unforeseen failure
    of one file shows its traceback."""
    if not debug:
        yield
        return
    before = os.environ.get(DEBUG_ENV)
    os.environ[DEBUG_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = before


def _run(args: argparse.Namespace) -> int:
    received: set[int] = set()
    try:
        with _interrupts_handled() as received, warnings.catch_warnings():
            if not getattr(args, "debug", False):  # a warning as one line, as every other message (--debug: where
                # it comes from)
                warnings.showwarning = _one_line_warning
            with interrupts_held():
                for name in getattr(args, "held_imports", HELD_IMPORTS):
                    importlib.import_module(name)
            return args.run(args)
    except KeyboardInterrupt as e:
        # an interrupt raised while the main thread waits in Ray (ray.get, ray.wait) comes out of it as a plain
        # KeyboardInterrupt (its check_signals): the handler's record says which signal it was
        terminated = isinstance(e, Terminated) or signal.SIGTERM in received
        print(f"titok-fast: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except Exception as e:  # one readable line; --debug shows the traceback
        if args.debug:
            raise
        expected = isinstance(e, (ValueError, TypeError, OSError))
        notice(f"error: {e if expected else f'{type(e).__name__}: {e} (--debug shows where)'}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
