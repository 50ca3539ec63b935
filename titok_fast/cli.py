"""The ``titok-fast`` command line: encode, decode, eval, convert, bench, demo.

Errors are one readable line on stderr (``--debug`` shows the traceback); a batch command exits 1 when any file
failed, after finishing all the others.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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
    return counts


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def _device_dtype(args: argparse.Namespace):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    return device, getattr(torch, DTYPES[dtype])


def _model(args: argparse.Namespace, token_meta=None):
    """The model named by --checkpoint / --random-weights, or else by a token file's metadata."""
    from .loading import load_tokenizer, random_tokenizer

    device, dtype = _device_dtype(args)
    checkpoint, seed = args.checkpoint, getattr(args, "random_weights", None)
    if checkpoint is None and seed is None and token_meta is not None:
        random = re.match(r"random-seed(\d+)-", token_meta.weights_digest)
        if random:
            seed, args.config = int(random.group(1)), token_meta.model_config
        elif token_meta.weights_source and Path(token_meta.weights_source).is_file():
            checkpoint, args.config = token_meta.weights_source, args.config or token_meta.model_config
        else:
            raise ValueError(
                f"the token files name weights {token_meta.weights_digest} from "
                f"{token_meta.weights_source or 'an unknown file'!r}, which is not here: pass --checkpoint"
            )
    if checkpoint:
        return load_tokenizer(checkpoint, config=args.config, device=device, dtype=dtype)
    if seed is None:
        raise ValueError(
            "no weights: pass --checkpoint (an upstream model.ckpt or a converted .safetensors), "
            "or --random-weights SEED to try the pipeline with random weights"
        )
    print(f"using RANDOM weights (seed {seed}): tokens and reconstructions are not meaningful", file=sys.stderr)
    return random_tokenizer(args.config or "tiny", seed=seed, device=device, dtype=dtype)


def _engine(args: argparse.Namespace, model):
    from .engine import Engine

    return Engine(model, mode=args.mode, max_clips=args.batch_size)


def _settings(args: argparse.Namespace, model, tokens: int | None = None):
    from .pipeline import ClipSettings

    tokens = args.tokens if tokens is None else tokens
    grid = args.grid or model.config.max_grid
    return ClipSettings(
        grid=grid, tokens=tokens, fps=args.fps, tail=args.tail, sampling=args.sampling,
        decoder=getattr(args, "decoder", "cpu"), preprocess=getattr(args, "preprocess", "auto"),
    )  # fmt: skip


def _finish(summary, verb: str) -> int:
    print(summary.report(verb))
    return 1 if summary.failed else 0


def cmd_encode(args: argparse.Namespace) -> int:
    from .pipeline import collect_inputs, encode_files

    files = collect_inputs(args.inputs)
    if not files:
        raise ValueError(f"no video files found in {args.inputs}")
    model = _model(args)
    summary = encode_files(
        model, _engine(args, model), files, args.output, _settings(args, model),
        workers=args.workers, worker_kind=args.worker_kind, read_ahead=args.batch_size, overwrite=args.overwrite,
    )  # fmt: skip
    return _finish(summary, "encoded")


def cmd_decode(args: argparse.Namespace) -> int:
    from .pipeline import decode_files

    if not args.tokens:
        raise ValueError("no token files given")
    first = None
    if not (args.checkpoint or args.random_weights is not None):  # the first readable token file names the model
        first = next((t for t in map(_try_load_tokens, args.tokens) if t is not None), None)
        if first is None:
            raise ValueError("none of the token files can be read, so none names the model: pass --checkpoint")
    model = _model(args, token_meta=first)
    summary = decode_files(
        _engine(args, model), args.tokens, args.output,
        with_source=args.side_by_side, force=args.force, overwrite=args.overwrite,
    )  # fmt: skip
    return _finish(summary, "decoded")


def _try_load_tokens(path):
    from .tokens import TokenFileError, load_tokens

    try:
        return load_tokens(path)
    except TokenFileError:
        return None  # decode_files reports it, with the others


def cmd_eval(args: argparse.Namespace) -> int:
    from .pipeline import collect_inputs, evaluate

    model = _model(args)
    settings = _settings(args, model, tokens=args.counts[0])  # each count of --tokens is run in turn
    table, summary = evaluate(
        _engine(args, model), collect_inputs(args.inputs), settings, args.counts, workers=args.workers,
        group=args.batch_size,
    )  # fmt: skip
    print(f"{'tokens':>8} {'PSNR dB':>9} {'SSIM':>7} {'clips':>6}")
    for n, row in table.items():
        print(f"{n:>8} {row['psnr']:>9.2f} {row['ssim']:>7.4f} {row['clips']:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps({"weights": model.weights_digest, "results": table}, indent=2))
        print(f"wrote {args.json}")
    return _finish(summary, "evaluated")


def cmd_convert(args: argparse.Namespace) -> int:
    from .loading import convert

    digest = convert(args.checkpoint, args.output, config=args.config, use_ema=not args.no_ema)
    print(f"wrote {args.output} (weights digest {digest})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    suite = Path(__file__).resolve().parent.parent / "benchmarks"
    if not suite.is_dir():
        raise ValueError(f"the benchmark suite is not installed here (expected {suite}); run from a source checkout")
    results = Path(args.json)
    files = [str(suite / f) for f in ("bench_model.py", "bench_kernels.py", "bench_pipeline.py")]
    cmd = [sys.executable, "-m", "pytest", *files, "--benchmark-only", "-q", f"--benchmark-json={results}"]
    cmd += ["-k", args.select] if args.select else []
    print("+", " ".join(cmd), file=sys.stderr)
    code = subprocess.call(cmd)
    if results.exists():
        sys.path.insert(0, str(suite))
        from report import table

        print(table(str(results)))
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .pipeline import collect_inputs, decode_files, encode_files
    from .video import write_video

    out = Path(args.output)
    sample = out / "sample.mp4"
    out.mkdir(parents=True, exist_ok=True)
    if not sample.exists():
        write_video(sample, _moving_pattern(frames=24, height=120, width=160), fps=8)
    args.random_weights = None if args.checkpoint else 0
    model = _model(args)
    engine = _engine(args, model)
    settings = _settings(args, model)
    start = time.perf_counter()
    enc = encode_files(model, engine, collect_inputs([sample]), out / "tokens", settings, overwrite=True)
    if enc.failed:
        return _finish(enc, "encoded")
    dec = decode_files(engine, [out / "tokens" / "sample.safetensors"], out / "recon", with_source=True, overwrite=True)
    seconds = time.perf_counter() - start
    print(enc.report("encoded"))
    print(dec.report("decoded"))
    print(f"sample video:    {sample}\ntoken file:      {out / 'tokens' / 'sample.safetensors'}")
    print(f"side by side:    {out / 'recon' / 'sample.mp4'} (source | reconstruction)")
    print(f"encode + decode: {enc.clips} clip(s) of {'x'.join(map(str, settings.grid))}, {settings.tokens} tokens, "
          f"{seconds:.2f} s on {model.device} ({torch.get_num_threads()} threads)")  # fmt: skip
    return 1 if dec.failed else 0


def _moving_pattern(frames: int, height: int, width: int):
    """A colourful pattern drifting to the right: [3, frames, height, width] in [-1, 1]."""
    import torch

    t = torch.arange(frames, dtype=torch.float32)[:, None, None]
    y = torch.linspace(0, 1, height)[None, :, None]
    x = torch.linspace(0, 1, width)[None, None, :]
    phase = 6.283 * (x * 2 - t / frames)
    channels = [torch.sin(phase + 4 * y), torch.cos(phase * 1.5 + 0 * y), torch.sin(2 * phase - 3 * y)]
    return torch.stack([c.expand(frames, height, width) for c in channels]) * 0.8


def _add_model_args(p: argparse.ArgumentParser, random_default: bool = False) -> None:
    p.add_argument("--checkpoint", help="upstream model.ckpt or converted .safetensors")
    p.add_argument(
        "--config",
        default=None,
        help="preset (v1, tiny) or upstream YAML; default: the config stored in a .safetensors, v1 for a .ckpt, "
        "tiny for random weights",
    )
    if not random_default:
        p.add_argument("--random-weights", type=int, metavar="SEED", help="use random weights (to try the pipeline)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument(
        "--mode",
        choices=("eager", "compile", "cudagraph"),
        default="eager",
        help="eager: batches at their exact size; compile: torch.compile per token budget; cudagraph: a CUDA graph per "
        "token budget (default eager)",
    )
    p.add_argument("--batch-size", type=_positive, default=32, help="most clips per batch (default 32)")


def _add_clip_args(p: argparse.ArgumentParser, tokens: bool = True) -> None:
    p.add_argument("--grid", type=_grid, default=None, help="clip size TxHxW, e.g. 20x192x192 (default: config)")
    if tokens:
        p.add_argument("--tokens", type=_positive, default=256, help="latent tokens per clip (default 256)")
    p.add_argument("--fps", type=float, default=8.0, help="frames per second sampled from the video (default 8)")
    p.add_argument(
        "--tail",
        choices=("drop", "pad"),
        default="drop",
        help="a last chunk shorter than T frames: drop it, or pad it by repeating its last frame (default drop)",
    )
    p.add_argument(
        "--sampling",
        choices=("upstream", "time"),
        default="upstream",
        help="upstream: the frames upstream's notebook picks (same tokens); time: by presentation time, for "
        "variable frame rate videos (default upstream)",
    )
    p.add_argument("--workers", type=_positive, default=None, help="video decoding workers (default: one per CPU core)")


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--worker-kind",
        choices=("thread", "process"),
        default="thread",
        help="decode in threads, or in worker processes (frames come back through shared memory) where threads "
        "stop scaling with cores (default thread)",
    )
    p.add_argument(
        "--decoder",
        choices=("cpu", "nvdec"),
        default="cpu",
        help="cpu: PyAV/FFmpeg, the exact path; nvdec: the GPU's hardware decoder (PyNvVideoCodec), frames stay on "
        "the GPU; what NVDEC cannot decode falls back to the CPU with a notice (default cpu)",
    )
    p.add_argument(
        "--preprocess",
        choices=("auto", "cpu", "device"),
        default="auto",
        help="where frames are resized, cropped and scaled: in the decoding workers (cpu), or per clip on the "
        "model's device (device); auto: device on CUDA for sources up to 4K, else cpu (default auto)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="titok-fast",
        description="Fast, exact runtime for the TiTok-Video tokenizer. With no command, runs the demo.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    debug = argparse.ArgumentParser(add_help=False)  # --debug after the command too; absent: keep the top level's
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, parents=[debug])

    p = sub.add_parser("encode", help="video files -> token files (.safetensors), resumable")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="video files, folders (recursive) or .txt path lists")
    p.add_argument("-o", "--output", required=True, help="output folder for token files")
    p.add_argument("--overwrite", action="store_true", help="re-encode files whose token file is already complete")
    _add_model_args(p)
    _add_clip_args(p)
    _add_input_args(p)
    p.set_defaults(run=cmd_encode)

    p = sub.add_parser("decode", help="token files -> mp4 reconstructions")
    p.add_argument("tokens", nargs="+", metavar="TOKENS", help="token files written by encode")
    p.add_argument("-o", "--output", required=True, help="output folder for mp4 files")
    p.add_argument("--side-by-side", action="store_true", help="put the source video left of the reconstruction")
    p.add_argument("--force", action="store_true", help="decode even if the token file came from other weights")
    p.add_argument("--overwrite", action="store_true", help="rewrite mp4 files that already exist")
    _add_model_args(p)
    p.set_defaults(run=cmd_decode)

    p = sub.add_parser("eval", help="encode + decode, PSNR and SSIM per token count")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="video files, folders or .txt path lists")
    p.add_argument("--tokens", dest="counts", type=_counts, default=[128, 256, 1024], help="e.g. 128,256,1024")
    p.add_argument("--json", help="also write the table as JSON here")
    _add_model_args(p)
    _add_clip_args(p, tokens=False)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("convert", help="upstream Lightning .ckpt -> .safetensors with the config inside")
    p.add_argument("checkpoint", help="upstream model.ckpt")
    p.add_argument("output", help="output .safetensors path")
    p.add_argument("--config", default="v1", help="preset name (v1, tiny) or upstream YAML path (default: v1)")
    p.add_argument("--no-ema", action="store_true", help="take the raw model weights, not the EMA weights")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("bench", help="run the benchmark suite (pytest-benchmark) and print the results table")
    p.add_argument("--json", default="benchmark-results.json", help="where to keep the raw results")
    p.add_argument("-k", dest="select", help="only benchmarks matching this pytest expression, e.g. gpu or cpu")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("demo", help="sample video -> tokens -> side-by-side mp4, tiny config (random weights)")
    p.add_argument("-o", "--output", default="titok-fast-demo", help="output folder (default titok-fast-demo)")
    _add_model_args(p, random_default=True)
    _add_clip_args(p)
    p.set_defaults(run=cmd_demo, grid=(8, 64, 96), tokens=128, workers=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(["--debug"] if args.debug else [])])
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("titok-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one readable line; --debug shows the traceback
        if args.debug:
            raise
        expected = isinstance(e, (ValueError, TypeError, OSError))
        print(
            f"titok-fast: error: {e if expected else f'{type(e).__name__}: {e} (--debug shows where)'}", file=sys.stderr
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
