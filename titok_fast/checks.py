"""Input validation for every user-facing entry point: clear errors naming the offending item."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

# The largest clip shape and latent token count anything accepts (a config, a grid, a token count): beyond them an
# input is refused before a buffer of that size exists. V1 uses grid (20, 192, 192) and 128-1024 tokens.
MAX_GRID = (4096, 8192, 8192)  # frames, height, width
# and T x H x W at most this: 400 MB a float32 RGB clip (V1's patch and largest budget allow 2**24 at most; a
# stranger's token file with a config of large patches could otherwise ask for gigabytes per chunk)
MAX_GRID_VOXELS = 1 << 25
MAX_TOKENS = 1 << 16
# what indices may come as (torch's uint16/32/64 lack the reductions the checks use)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# what videos and codes may come as (float8 types have no reductions, and no arithmetic, on a CPU)
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def is_integer(x: object) -> bool:
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def from_numpy(value: object) -> object:
    """A NumPy array as nested Python lists (upstream's calls take one where they take a list of counts or grids);
    anything else unchanged. Its values are then checked as a list's."""
    if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":
        return value.tolist()
    return value


def check_no_grad(t: torch.Tensor, what: str) -> None:
    """Inference only: an input that requires grad would come back silently detached, so it is refused."""
    if t.requires_grad:
        raise ValueError(
            f"{what} requires grad; titok-fast is inference-only (encode/decode run without autograd): pass "
            f"{what}.detach(), or use upstream's modules to train"
        )


MAX_PIXEL_MAGNITUDE = 1e9  # far beyond any scaling of pixels (0-255, 16-bit), far below an overflow in the model
MAGNITUDE_HEADROOM = 1e3  # of a 16-bit model's range: float16's 65504 / 1e3, beyond which its patch embedding overflows


def magnitude_limit(dtype: torch.dtype | None) -> float:
    """The largest magnitude of a pixel or code value a model computing in ``dtype`` takes: MAX_PIXEL_MAGNITUDE,
    or for float16 its largest value / MAGNITUDE_HEADROOM (65.504: 6e4 passed, its patch embedding overflowed, and
    the tokens that came out were NaN cast to int32, which decode refuses)."""
    if dtype is None or not dtype.is_floating_point:
        return MAX_PIXEL_MAGNITUDE
    return min(MAX_PIXEL_MAGNITUDE, torch.finfo(dtype).max / MAGNITUDE_HEADROOM)


def _value_problems(
    tensors: Sequence[torch.Tensor], dtype: torch.dtype | None, most: float = math.inf
) -> list[str]:
    """What is wrong with each tensor's values ("" if nothing): NaN or infinite, finite but infinite once cast
    to ``dtype`` (1e300 in float64 is finite, but not in float32, and FSQ has no code for what then comes out), or
    beyond ``most`` in magnitude (videos: MAX_PIXEL_MAGNITUDE).
    One reduction per tensor (its extremes: NaN and infinities propagate through them) and one host sync."""
    return _problems_of(_extremes(tensors).cpu(), dtype, most)


def _extremes(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[n, 2]: each tensor's minimum and maximum, in their dtype, where they are."""
    return torch.stack([torch.stack(torch.aminmax(t)) for t in tensors])


def _problems_of(extremes: torch.Tensor, dtype: torch.dtype | None, most: float) -> list[str]:
    """_value_problems from the tensors' extremes, on the host."""
    cast = extremes.to(dtype) if dtype is not None and dtype.is_floating_point else extremes
    problems = []
    for values, fits in zip(extremes.tolist(), cast.isfinite().tolist(), strict=True):
        if not all(math.isfinite(v) for v in values):
            problems.append("contains NaN or infinite values")
        elif not all(fits):
            value = values[0] if not fits[0] else values[1]
            problems.append(f"holds {value:g}, beyond the model's {dtype}; expected values in [-1, 1]")
        elif max(map(abs, values)) > most:
            value = values[0] if abs(values[0]) > most else values[1]
            problems.append(
                f"holds {value:g}; expected values in [-1, 1] (beyond {most:g} they are refused in {dtype}, well "
                "before the model's activations overflow, where what comes out is no video's)"
            )
        else:
            problems.append("")
    return problems


class PendingValueCheck:
    """:func:`check_videos`'s value check of one video, started without waiting for the device: on CUDA the
    video's extremes go to pinned host memory behind the work queued on the current stream (the batches queued
    before included), and :meth:`error` waits for that copy. A host sync when the video arrives would wait there
    and then, leaving the device idle while the rest of the next batch is gathered; the engine asks for the error
    only when the video's batch is about to run. On the CPU the check is done at once."""

    def __init__(self, video: torch.Tensor, name: str, dtype: torch.dtype | None):
        self.name, self.dtype = name, dtype
        extremes = _extremes([video])
        self._done = None
        if extremes.device.type == "cuda":
            self._extremes = torch.empty(extremes.shape, dtype=extremes.dtype, pin_memory=True)
            self._extremes.copy_(extremes, non_blocking=True)
            self._done = torch.cuda.Event(blocking=True)  # the waiting thread sleeps: the decoders want the cores
            self._done.record(torch.cuda.current_stream(extremes.device))
        else:
            self._extremes = extremes

    def error(self) -> ValueError | None:
        """The error :func:`check_videos` would raise for the video's values, or None."""
        if self._done is not None:
            self._done.synchronize()
        problem = _problems_of(self._extremes, self.dtype, magnitude_limit(self.dtype))[0]
        return ValueError(f"{self.name} {problem}") if problem else None


def check_not_meta(t: torch.Tensor, what: str) -> None:
    if t.device.type == "meta":
        raise ValueError(f"{what} is on the meta device (shapes only); expected a tensor with values")


def check_videos(
    videos: object,
    patch: tuple[int, int, int],
    name: Callable[[int], str] = "video {}".format,
    dtype: torch.dtype | None = None,
    values: bool = True,
) -> list[tuple[int, int, int]]:
    """Validate a batch of videos [3, T, H, W] (a list, or one [videos, 3, T, H, W] tensor, as upstream takes);
    return their pixel shapes (T, H, W). ``name(i)`` names video i in the errors. ``dtype``: the model's, which the
    values must fit (1e300 in float64 is finite, but infinite once cast to float32, and FSQ has no code for what then
    comes out). ``values=False`` leaves the values unchecked (a :class:`PendingValueCheck` of each video then checks
    them)."""
    if isinstance(videos, torch.Tensor) and videos.dim() == 5:  # a batch of videos of one shape, as upstream takes
        videos = list(videos)
    if isinstance(videos, torch.Tensor):
        hint = "; wrap a single video in a list" if videos.dim() == 4 else ""
        raise TypeError(f"videos must be a list of [3, T, H, W] tensors or one [videos, 3, T, H, W] tensor, got one "
                        f"tensor of shape {list(videos.shape)}{hint}")  # fmt: skip
    if not isinstance(videos, Sequence):
        raise TypeError(f"videos must be a list of [3, T, H, W] tensors, got {type(videos).__name__}")
    if len(videos) == 0:
        raise ValueError("empty batch: videos must hold at least one [3, T, H, W] tensor")
    shapes = []
    for i, v in enumerate(videos):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name(i)} is a {type(v).__name__}; expected a torch.Tensor [3, T, H, W]")
        _check_dense(v, name(i))
        if v.dim() != 4 or v.shape[0] != 3:
            raise ValueError(f"{name(i)} has shape {list(v.shape)}; expected [3, T, H, W] (3 channels, rank 4)")
        if v.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name(i)} has dtype {v.dtype}; expected one of {[str(d) for d in FLOAT_DTYPES]} with "
                            "values in [-1, 1]")  # fmt: skip
        check_no_grad(v, name(i))
        if problem := _grid_problem(tuple(v.shape[1:]), patch):  # (encode nothing that decode would refuse)
            raise ValueError(f"{name(i)} has shape {list(v.shape)}; {problem}")
        check_not_meta(v, name(i))
        if v.device != videos[0].device:
            raise ValueError(f"{name(i)} is on {v.device} but {name(0)} is on {videos[0].device}; mixed devices")
        if v.dtype != videos[0].dtype:
            raise ValueError(f"{name(i)} has dtype {v.dtype} but {name(0)} has {videos[0].dtype}; mixed dtypes")
        shapes.append(tuple(int(s) for s in v.shape[1:]))
    for i, problem in enumerate(_value_problems(videos, dtype, magnitude_limit(dtype)) if values else ()):
        if problem:
            raise ValueError(f"{name(i)} {problem}")
    return shapes


def check_token_counts(
    token_counts: object, expected: int | None, what: str = "videos", name: Callable[[int], str] = "video {}".format
) -> list[int]:
    """Validate per-video latent token counts (integers >= 1), one per video when ``expected`` is given;
    ``name(i)`` names video i in the errors."""
    given, token_counts = token_counts, from_numpy(token_counts)
    if token_counts is not given and is_integer(token_counts):  # a 0-d array: one count, as a 0-d tensor is
        token_counts = [token_counts]
    if isinstance(token_counts, torch.Tensor):
        check_not_meta(token_counts, "token_counts")
        token_counts = token_counts.tolist() if token_counts.dim() else [token_counts.item()]
    if is_integer(token_counts):
        raise TypeError(f"token_counts must be a list with one integer per video, got the single value {token_counts}")
    if not isinstance(token_counts, Sequence):
        raise TypeError(f"token_counts must be a list of integers, got {type(token_counts).__name__}")
    if expected is not None and len(token_counts) != expected:
        raise ValueError(f"got {len(token_counts)} token counts for {expected} {what}; expected one per video")
    if len(token_counts) == 0:
        raise ValueError("empty batch: token_counts is empty")
    out = []
    for i, n in enumerate(token_counts):
        if isinstance(n, torch.Tensor):
            check_not_meta(n, f"token count of {name(i)}")
        if not is_integer(n):
            raise TypeError(f"token count of {name(i)} is {n!r}; expected an integer >= 1")
        if not 1 <= int(n) <= MAX_TOKENS:
            raise ValueError(f"token count of {name(i)} is {int(n)}; expected an integer in [1, {MAX_TOKENS}]")
        out.append(int(n))
    return out


def check_grids(
    grids: object, expected: int, patch: tuple[int, int, int], name: Callable[[int], str] = "video {}".format
) -> list[tuple[int, int, int]]:
    """Validate per-video pixel shapes (T, H, W), multiples of the patch; ``name(i)`` names video i in the
    errors. A [videos, 3] integer tensor or NumPy array is taken too (a row per video)."""
    grids = from_numpy(grids)
    if isinstance(grids, torch.Tensor):
        if grids.dim() != 2 or grids.shape[1] != 3 or grids.is_floating_point() or grids.is_complex():
            raise ValueError(f"grids is a {grids.dtype} tensor of shape {list(grids.shape)}; expected integers of "
                             "shape [videos, 3], a (T, H, W) pixel shape per video")  # fmt: skip
        check_not_meta(grids, "grids")
        grids = grids.tolist()
    if not isinstance(grids, Sequence) or isinstance(grids, str):
        raise TypeError(f"grids must be a list of (T, H, W) pixel shapes, got {type(grids).__name__}")
    if len(grids) != expected:
        raise ValueError(f"got {len(grids)} grids for {expected} videos; expected one (T, H, W) per video")
    out = []
    for i, g in enumerate(grids):
        g = from_numpy(g)
        if isinstance(g, torch.Tensor):
            check_not_meta(g, f"grid of {name(i)}")
            g = g.tolist()
        if not isinstance(g, Sequence) or len(g) != 3 or not all(is_integer(s) for s in g):
            raise ValueError(f"grid of {name(i)} is {g!r}; expected three integers (T, H, W)")
        g = tuple(int(s) for s in g)
        if problem := _grid_problem(g, patch):
            raise ValueError(f"grid of {name(i)} is {list(g)}; {problem}")
        out.append(g)
    return out


def _grid_problem(grid: tuple[int, ...], patch: tuple[int, int, int]) -> str:
    """What is wrong with a pixel shape (T, H, W) for the model, "" if nothing: the same for a video to encode as
    for a grid to decode, so that no tokens come out that cannot go back."""
    for axis, size, p, most in zip("THW", grid, patch, MAX_GRID, strict=True):
        if size <= 0 or size % p:
            return f"{axis} must be a positive multiple of {p} (patch {list(patch)})"
        if size > most:
            return f"{axis} must be at most {most}"
    if math.prod(grid) > MAX_GRID_VOXELS:
        return f"T x H x W must be at most {MAX_GRID_VOXELS}"
    return ""


def _check_dense(t: torch.Tensor, what: str) -> None:
    """A plain strided tensor: sparse, quantized-layout or nested ones have none of the reductions the checks use."""
    if t.layout != torch.strided or t.is_nested:
        layout = "nested" if t.is_nested else t.layout
        raise TypeError(f"{what} has layout {layout}; expected a dense tensor (call .to_dense() or .contiguous())")


def check_indices(indices: torch.Tensor, codebook_size: int, what: str) -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{what} is a {type(indices).__name__}; expected an integer torch.Tensor")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"{what} has dtype {indices.dtype}; expected one of {[str(d) for d in INDEX_DTYPES]} (call .long() on it)"
        )
    _check_dense(indices, what)
    check_not_meta(indices, what)
    if indices.dim() != 1:
        raise ValueError(f"{what} has shape {list(indices.shape)}; expected a 1-D tensor of indices")
    if indices.numel():
        lo, hi = torch.aminmax(indices)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= codebook_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{what} holds index {bad}; expected indices in [0, {codebook_size})")


def check_clip_indices(indices: torch.Tensor, codebook_size: int, what: str) -> None:
    """One clip's indices: as :func:`check_indices`, and at least one (a clip has at least one token)."""
    check_indices(indices, codebook_size, what)
    if indices.numel() == 0:
        raise ValueError(f"{what} is empty; expected at least one token")


def check_codes(codes: object, width: int, total: int, dtype: torch.dtype | None = None) -> None:
    """Codes [total, width] of a floating dtype, with values finite also in the model's ``dtype``."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes is a {type(codes).__name__}; expected a torch.Tensor [sum(token_counts), {width}]")
    if codes.dtype not in FLOAT_DTYPES:
        raise TypeError(f"codes has dtype {codes.dtype}; expected one of {[str(d) for d in FLOAT_DTYPES]}")
    _check_dense(codes, "codes")
    check_no_grad(codes, "codes")
    if codes.dim() != 2 or codes.shape[1] != width:
        raise ValueError(f"codes has shape {list(codes.shape)}; expected [sum(token_counts), {width}]")
    if codes.shape[0] != total:
        raise ValueError(f"codes has {codes.shape[0]} rows but token_counts sum to {total}")
    check_not_meta(codes, "codes")
    problem = _value_problems([codes], dtype, magnitude_limit(dtype))[0] if codes.numel() else ""  # (1e30: inf video)
    if problem:
        raise ValueError(f"codes {problem}")
