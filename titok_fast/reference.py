"""The reference oracle: DESIGN.md sections 3-7 written for clarity, not speed.

Per-video loops, float64 complex M-RoPE (as upstream), explicit softmax attention per sequence, FSQ in float32
computed the way upstream computes it. Every fast path is tested against this. It runs on the CPU and takes the
same parameters as the lean model (``layers.py``), so weights move between them with ``load_state_dict``.

In bfloat16 it follows upstream's bf16 inference: LayerNorms and Linears in bf16, q/k norms in bf16, the
rotation in float64 rounded back to bf16, attention with float32 softmax, FSQ in float32 on the bf16 ``z``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from titok_fast.kernels.mrope_attention import AXIS_PAIRS

from .config import HEAD_DIM, TiTokConfig
from .layers import Attention, DecoderParams, EncoderParams, Layers
from .patches import patch_grid, patchify, unpatchify


def mrope_angles(n_tokens: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """float64 [n + G, 32]: rotation angle of every (row, pair) of one sequence (DESIGN.md section 6)."""
    gt, gh, gw = grid
    pos = [(j, j, j) for j in range(n_tokens)]
    pos += [(a + n_tokens, b + n_tokens, c + n_tokens) for a in range(gt) for b in range(gh) for c in range(gw)]
    pos = torch.tensor(pos, dtype=torch.float64)
    columns = []
    for axis, pairs in enumerate(AXIS_PAIRS):  # frequencies as upstream computes them, bit for bit
        freqs = 10000.0 ** torch.linspace(0.0, 1.0, pairs, dtype=torch.float64) * math.pi / 2.0
        columns.append(pos[:, axis : axis + 1] * freqs)
    return torch.cat(columns, dim=1)


@functools.lru_cache(maxsize=64)
def _angles_on(n_tokens: int, grid: tuple[int, int, int], device: str) -> torch.Tensor:
    """:func:`mrope_angles` computed once per shape and kept on ``device``: no per-video host work or blocking
    copy when the oracle is the benchmarks' reference (the values are the same float64 numbers)."""
    return mrope_angles(n_tokens, grid).to(device)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x: [S, heads, 64]; adjacent pairs rotated as complex128 numbers; returns x.dtype."""
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], HEAD_DIM // 2, 2).contiguous())
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    return torch.view_as_real(rotated).reshape(x.shape).to(x.dtype)


def attention(attn: Attention, x: torch.Tensor, angles: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """One sequence: x [S, W] -> [S, W]. ``fused``: the softmax attention through SDPA (FlashAttention-2 on a
    GPU in half precision, as upstream's flash-attn) instead of the explicit float32 softmax."""
    s = x.shape[0]
    hq, hkv = attn.q_heads, attn.kv_heads
    qkv = attn.to_qkv(attn.pre_ln(x))
    q = qkv[:, : hq * HEAD_DIM].reshape(s, hq, HEAD_DIM)
    k = qkv[:, hq * HEAD_DIM : (hq + hkv) * HEAD_DIM].reshape(s, hkv, HEAD_DIM)
    v = qkv[:, (hq + hkv) * HEAD_DIM :].reshape(s, hkv, HEAD_DIM)
    q = rotate(attn.q_norm(q), angles)
    k = rotate(attn.k_norm(k), angles)
    group = hq // hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    if fused:
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # FlashAttention-2, as upstream (not cuDNN's kernel)
                out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return attn.out_proj(out[0].transpose(0, 1).reshape(s, hq * HEAD_DIM))
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / math.sqrt(HEAD_DIM)
    out = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v.float())
    return attn.out_proj(out.reshape(s, hq * HEAD_DIM).to(x.dtype))


def run_layers(layers: Layers, x: torch.Tensor, angles: torch.Tensor, fused: bool = False) -> torch.Tensor:
    for attn, ffn in zip(layers.attn_layer, layers.ffd_layer, strict=True):
        x = x + attention(attn, x, angles, fused)
        x = x + ffn(x)
    return x


@functools.lru_cache(maxsize=16)
def _fsq_tables(levels: tuple[int, ...], device: str) -> tuple[torch.Tensor, ...]:
    """Upstream's FSQ constants, made once per device: (half_l, offset, shift, half_width, basis int32, levels
    int64, half_width int64, basis int64)."""
    lv = torch.tensor(levels, dtype=torch.int32, device=device)
    half_l = (lv - 1) * (1 + 1e-3) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0).to(device)
    shift = (offset / half_l).atanh()
    basis = torch.cumprod(torch.tensor([1, *levels[:-1]], device=device), dim=0)
    return half_l, offset, shift, lv // 2, basis.to(torch.int32), lv.long(), lv.long() // 2, basis


def fsq_quantize(z: torch.Tensor, levels: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """z [N, D] -> (codes float32 [N, D], indices int32 [N]) exactly as upstream FSQ (float32)."""
    half_l, offset, shift, half_width, basis = _fsq_tables(tuple(levels), str(z.device))[:5]
    bounded = (z.float() + shift).tanh() * half_l - offset
    codes = torch.round(bounded) / half_width
    indices = ((codes * half_width + half_width) * basis).sum(dim=-1).to(torch.int32)
    return codes, indices


def fsq_indices_to_codes(indices: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """indices [N] -> codes float32 [N, D]."""
    lv, half_width, basis = _fsq_tables(tuple(levels), str(indices.device))[5:]
    level = (indices.long()[:, None] // basis) % lv
    return (level - half_width).float() / half_width


def encoder_latents(
    config: TiTokConfig, enc: EncoderParams, videos: list[torch.Tensor], token_counts: list[int], fused: bool = False
) -> torch.Tensor:
    """Per video: patchify, proj_in, [mask tokens ; patches], layers, first n rows, ln_post, proj_out -> the
    packed latents z [sum n, D] before FSQ (upstream's ``encoder(videos, token_counts)``)."""
    latents = []
    for video, n in zip(videos, token_counts, strict=True):
        grid = patch_grid(tuple(video.shape[1:]), config.patch_size)
        patches = enc.proj_in(patchify(video, config.patch_size))
        x = torch.cat([enc.mask_token.expand(n, -1), patches])
        x = run_layers(enc.model_layers, x, _angles_on(n, grid, str(x.device)), fused)
        latents.append(enc.proj_out(enc.ln_post(x[:n])))
    return torch.cat(latents)


def encode(
    config: TiTokConfig, enc: EncoderParams, videos: list[torch.Tensor], token_counts: list[int], fused: bool = False
) -> tuple[torch.Tensor, dict]:
    """:func:`encoder_latents`, then FSQ (row by row, so on the packed latents at once)."""
    z = encoder_latents(config, enc, videos, token_counts, fused)
    codes, indices = fsq_quantize(z, config.fsq_levels)
    return codes.to(z.dtype), {"indices": tuple(indices.split(list(token_counts)))}


def decode(
    config: TiTokConfig,
    dec: DecoderParams,
    codes: torch.Tensor,
    token_counts: list[int],
    grids: list,
    fused: bool = False,
) -> list[torch.Tensor]:
    """Per video: proj_in(codes), [codes ; mask tokens], ln_pre, layers, last G rows, proj_out, un-patchify."""
    videos, start = [], 0
    for n, shape in zip(token_counts, grids, strict=True):
        grid = patch_grid(tuple(shape), config.patch_size)
        g = math.prod(grid)
        x = torch.cat([dec.proj_in(codes[start : start + n]), dec.mask_token.expand(g, -1)])
        x = run_layers(dec.model_layers, dec.ln_pre(x), _angles_on(n, grid, str(x.device)), fused)
        videos.append(unpatchify(dec.proj_out(x[n:]), tuple(shape), config.patch_size))
        start += n
    return videos


class ReferenceTiTok(torch.nn.Module):
    """The oracle as a module with upstream's parameter names and API (inputs are trusted, not checked).

    ``fused_attention=True`` runs the softmax attention through SDPA: on a GPU in half precision that is
    FlashAttention-2, which makes this upstream's own inference path (the benchmarks' reference)."""

    def __init__(self, config: object = "v1", fused_attention: bool = False):
        super().__init__()
        self.fused_attention = fused_attention
        self.config = TiTokConfig.from_any(config)
        self.encoder = EncoderParams(self.config)
        self.decoder = DecoderParams(self.config)

    @torch.no_grad()
    def encode(self, videos: list[torch.Tensor], token_counts: list[int]) -> tuple[torch.Tensor, dict]:
        return encode(self.config, self.encoder, videos, token_counts, self.fused_attention)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, token_counts: list[int], grids: list) -> list[torch.Tensor]:
        return decode(self.config, self.decoder, codes, token_counts, grids, self.fused_attention)

    def decode_indices(self, indices, grids, token_counts=None) -> list[torch.Tensor]:
        if isinstance(indices, torch.Tensor):
            indices = indices.split(list(token_counts))
        codes = fsq_indices_to_codes(torch.cat(list(indices)), self.config.fsq_levels)
        return self.decode(codes.to(self.decoder.proj_in.weight.dtype), [len(i) for i in indices], grids)

    def forward(self, videos: list[torch.Tensor], token_counts: list[int]) -> tuple[list, dict]:
        codes, result = self.encode(videos, token_counts)
        return self.decode(codes, token_counts, [tuple(v.shape[1:]) for v in videos]), result
