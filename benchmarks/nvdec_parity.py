"""Tokens of ``--decoder nvdec`` against those of the CPU decoder, beside the bf16 noise floor.

H.264 and HEVC decoding is specified to the bit, so NVDEC's NV12 planes are PyAV's, frame by frame
(``tests/test_preprocess.py::test_gpu_nvdec_gives_pyavs_planes_bit_for_bit``, on a GPU). What may differ between
the two decoders is the YUV to RGB conversion: libswscale's for the CPU path (PyAV's rgb24), ``kernels/nv12_rgb.py``
for NVDEC's frames (libswscale's arithmetic, its bytes; a float conversion within 2 levels of them before).

Without ``--real`` NVDEC's frames are made on the CPU from PyAV's planes: what NVDEC gives, given that test. With
``--real`` (a GPU with PyNvVideoCodec) they are NVDEC's own, converted by the kernel.

Each source is read by both decoders into clips of source-size uint8 frames (preprocessing placed on the model's
device for both), resized alike and encoded by a random-weight model (``perturb_norms``) in float32 and in bf16.
Reported, as shares of tokens equal to the float32 tokens of the CPU decoder's clips:

- ``bf16, cpu decoder``: the bf16 noise floor;
- ``fp32, nvdec``: what the decoder alone changes;
- ``bf16, nvdec``: both.

    python benchmarks/nvdec_parity.py --config v1 --sources 720p30,256p8 [--device cuda --real]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from unittest import mock

import av
import torch

from titok_fast import decoders
from titok_fast.decoders import NvdecFrame
from titok_fast.kernels.nv12_rgb import nv12_surface
from titok_fast.loading import random_tokenizer
from titok_fast.preprocess import clip_pixels, normalize_pixels
from titok_fast.video import ClipReader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pipeline  # noqa: E402


def pyav_as_nvdec(path: str, stream: av.video.stream.VideoStream, gpu: int = 0):
    """:func:`decoders.nvdec_frames` on a machine without NVDEC: its frames, their surfaces made of PyAV's planes."""
    matrix = decoders._matrix(stream)
    with decoders.open_input(path) as container:
        for frame in container.decode(video=0):
            nv12 = nv12_surface(*decoders.yuv420p_planes(frame))
            yield NvdecFrame(nv12, frame.height, frame.pts, frame.time_base, frame.duration, matrix)


def clips_of(path: str, decoder: str, grid: tuple[int, int, int], fps: float, device: str) -> list[torch.Tensor]:
    """The file's clips as raw resized pixels [3, T, H, W] (0..255, float32) on ``device``, read by ``decoder``."""
    frames, height, width = grid
    reader = ClipReader(path, frames=frames, height=height, width=width, fps=fps, decoder=decoder,
                        preprocess="device", device=device)  # fmt: skip
    clips = [clip_pixels(clip.to(device), height, width) for clip in reader]
    if reader.decoded_by != decoder:
        raise RuntimeError(f"{path}: decoded by {reader.decoded_by}, not {decoder}")
    return clips


def indices_of(model, clips: list[torch.Tensor], tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """The token indices of ``clips`` encoded by ``model`` in ``dtype``, on the CPU."""
    _, info = model.encode([normalize_pixels(c, dtype) for c in clips], [tokens] * len(clips))
    return torch.cat(info["indices"]).cpu()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--sources", default="720p30,256p8", help="of bench_pipeline.py's sources")
    p.add_argument("--seconds", type=float, default=10, help="each source's length (default 10)")
    p.add_argument("--videos", default="bench-videos", help="where the sources are (made if missing)")
    p.add_argument("--grid", type=int, nargs=3, default=(20, 192, 192), metavar=("T", "H", "W"))
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--fps", type=float, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--real", action="store_true", help="NVDEC itself (a GPU with PyNvVideoCodec)")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 is float32
    models = {dtype: random_tokenizer(args.config, seed=args.seed, device=args.device, dtype=dtype)
              for dtype in (torch.float32, torch.bfloat16)}  # fmt: skip
    made = bench_pipeline.sources(Path(args.videos), args.sources.split(","), args.seconds)
    rows = []
    print("| source | clips | tokens | bf16, cpu decoder | fp32, nvdec | bf16, nvdec |\n|---|---|---|---|---|---|")
    for name, (path, _) in made.items():
        with contextlib.nullcontext() if args.real else mock.patch.object(decoders, "nvdec_frames", pyav_as_nvdec):
            clips = {d: clips_of(str(path), d, tuple(args.grid), args.fps, args.device) for d in ("cpu", "nvdec")}
        truth = indices_of(models[torch.float32], clips["cpu"], args.tokens, torch.float32)
        row = {"source": name, "clips": len(clips["cpu"]), "tokens": len(truth), "real_nvdec": args.real,
               "config": args.config, "max_rgb_levels": max_rgb_levels(clips)}  # fmt: skip
        for label, dtype, decoder in (("bf16, cpu decoder", torch.bfloat16, "cpu"),
                                      ("fp32, nvdec", torch.float32, "nvdec"),
                                      ("bf16, nvdec", torch.bfloat16, "nvdec")):  # fmt: skip
            row[label] = float((indices_of(models[dtype], clips[decoder], args.tokens, dtype) == truth).float().mean())
        rows.append(row)
        print(f"| {name} | {row['clips']} | {row['tokens']} | {row['bf16, cpu decoder']:.2%} | "
              f"{row['fp32, nvdec']:.2%} | {row['bf16, nvdec']:.2%} |", flush=True)  # fmt: skip
    return rows


def max_rgb_levels(clips: dict[str, list[torch.Tensor]]) -> float:
    """The largest difference between the two decoders' resized pixels (0..255 scale)."""
    return max(float((a - b).abs().max()) for a, b in zip(clips["cpu"], clips["nvdec"], strict=True))


if __name__ == "__main__":
    main()
