"""The ``titok-fast`` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _cmd_convert(args: argparse.Namespace) -> int:
    from .loading import convert

    digest = convert(args.checkpoint, args.output, config=args.config, use_ema=not args.no_ema)
    print(f"wrote {args.output} (weights digest {digest})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .model import TiTok

    torch.manual_seed(0)
    model = TiTok("tiny").eval()
    print("titok-fast demo: tiny config with RANDOM weights (tokens and reconstructions are not meaningful)")
    clip = torch.linspace(-1, 1, 3 * 12 * 160 * 160).reshape(3, 12, 160, 160)
    start = time.perf_counter()
    _, out = model.encode([clip], [256])
    recon = model.decode_indices(out["indices"], [tuple(clip.shape[1:])])
    seconds = time.perf_counter() - start
    print(
        f"encoded 1 clip {list(clip.shape)} to {out['indices'][0].numel()} tokens and decoded it back to "
        f"{list(recon[0].shape)} in {seconds:.2f} s ({1 / seconds:.2f} clips/s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="titok-fast", description="Fast, exact runtime for the TiTok-Video tokenizer."
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("convert", help="upstream Lightning .ckpt -> .safetensors with the config inside")
    p.add_argument("checkpoint", help="upstream model.ckpt")
    p.add_argument("output", help="output .safetensors path")
    p.add_argument("--config", default="v1", help="preset name (v1, tiny) or upstream YAML path (default: v1)")
    p.add_argument("--no-ema", action="store_true", help="take the raw model weights, not the EMA weights")
    p.set_defaults(run=_cmd_convert)

    p = sub.add_parser("demo", help="encode and decode a synthetic clip with the tiny config and random weights")
    p.set_defaults(run=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo"])
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"titok-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("titok-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
