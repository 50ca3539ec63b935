"""What a user would otherwise run: the baselines the speed tables divide by.

- ``upstream-packed`` (:class:`UpstreamPacked`, always available): upstream's inference path as upstream runs it,
  re-expressed for benchmarking. The whole batch goes through the model in ONE packed variable-length pass
  (``cu_seqlens`` over the concatenated sequences), the varlen attention is FlashAttention-2 with native GQA on a
  GPU (PyTorch's ``varlen_attn``), M-RoPE frequencies are computed per call in float64 and the rotation is done
  in complex128, as upstream does; LayerNorms and Linears in the model's dtype, FSQ in float32 on ``z``.
  It is checked against the oracle (``tests/test_baselines.py``).
- ``upstream`` (:func:`load_upstream`): upstream's own code, imported from a checkout the user points at
  (``--upstream PATH`` in ``bench_model.py`` or ``TITOK_UPSTREAM``; branch ``old-variableComp``). Upstream imports
  ``flash_attn`` at import time; where the flash-attn package is not installed, the stand-in package under
  ``benchmarks/flash_attn_standin/`` hands its ``flash_attn_varlen_func`` call to :func:`varlen_attention`.
  Nothing of upstream is copied here: it is imported from the user's checkout.
- ``reference``: the per-video oracle (``titok_fast.reference``), one video at a time. It is no user's path;
  tables label it "per-video oracle".
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from titok_fast.config import HEAD_DIM, TiTokConfig
from titok_fast.kernels.mrope_attention import AXIS_PAIRS
from titok_fast.patches import patch_grid, patchify, unpatchify
from titok_fast.reference import ReferenceTiTok, fsq_quantize

STANDIN = Path(__file__).resolve().parent / "flash_attn_standin"


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    """Non-causal attention within each packed sequence, scale 1/sqrt(64), grouped-query heads.

    q [rows, Hq, 64], k/v [rows, Hkv, 64], cu_seqlens int32 [B+1] -> [rows, Hq, 64]. On CUDA in half precision:
    PyTorch's varlen FlashAttention-2 (one launch for the whole batch, as flash-attn's varlen function); elsewhere
    SDPA per sequence, the best a CPU offers (its flash kernel)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            from torch.nn.attention.varlen import varlen_attn

            return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, enable_gqa=True)
        except (ImportError, TypeError):  # varlen_attn without enable_gqa (torch < 2.12): the flash op takes fewer
            # KV heads itself (repeating K/V here would put two copies into every timed call of the baselines)
            flash = torch.ops.aten._flash_attention_forward
            return flash(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, False, False)[0]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        q_i, k_i, v_i = (t[None, s:e].transpose(1, 2) for t in (q, k, v))
        out[s:e] = F.scaled_dot_product_attention(q_i, k_i, v_i, enable_gqa=True)[0].transpose(0, 1)
    return out


def upstream_rotations(grids: list[tuple[int, int, int]], token_counts: list[int], device) -> torch.Tensor:
    """complex128 [rows, 32]: every packed row's rotation, computed on ``device`` per call in float64, as upstream's
    inference does (its precomputed tables are used only in training)."""
    out = []
    for (gt, gh, gw), n in zip(grids, token_counts, strict=True):
        pos = torch.zeros(n + gt * gh * gw, 3, dtype=torch.int64, device=device)
        pos[:n] = torch.arange(n, device=device)[:, None]
        mesh = torch.meshgrid(*(torch.arange(g, device=device) for g in (gt, gh, gw)), indexing="ij")
        pos[n:] = torch.stack([m.flatten() for m in mesh], dim=1) + n
        columns = []
        for axis, pairs in enumerate(AXIS_PAIRS):
            freqs = 10000.0 ** torch.linspace(0.0, 1.0, pairs, dtype=torch.float64, device=device) * math.pi / 2
            columns.append(pos[:, axis : axis + 1] * freqs)
        angles = torch.cat(columns, dim=1)
        out.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(out)


def _rotate(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], HEAD_DIM // 2, 2))
    return torch.view_as_real(pairs * rotations[:, None, :]).flatten(-2).type_as(x)


class UpstreamPacked(ReferenceTiTok):
    """Upstream's packed inference path (see the module header) with the same parameters as every other provider
    (``load_state_dict`` from the lean model). API: ``encode``, ``decode``, ``decode_indices``."""

    def _layers(self, layers, x, rotations, cu_seqlens, max_seqlen):
        for attn, ffn in zip(layers.attn_layer, layers.ffd_layer, strict=True):
            h = attn.to_qkv(attn.pre_ln(x))
            hq, hkv = attn.q_heads, attn.kv_heads
            q, k, v = h.split([hq * HEAD_DIM, hkv * HEAD_DIM, hkv * HEAD_DIM], dim=-1)
            q, k, v = (t.unflatten(-1, (-1, HEAD_DIM)) for t in (q, k, v))
            q = _rotate(attn.q_norm(q).to(v.dtype), rotations)
            k = _rotate(attn.k_norm(k).to(v.dtype), rotations)
            x = x + attn.out_proj(varlen_attention(q, k, v, cu_seqlens, max_seqlen).flatten(-2))
            x = x + ffn(x)
        return x

    def _layout(self, grids, token_counts, device):
        sizes = [math.prod(g) for g in grids]
        seq_lens = [g + n for g, n in zip(sizes, token_counts, strict=True)]
        cu_seqlens = torch.tensor([0, *seq_lens], device=device).cumsum(0).to(torch.int32)
        return sizes, seq_lens, cu_seqlens

    @torch.no_grad()
    def encode(self, videos: list[torch.Tensor], token_counts: list[int]) -> tuple[torch.Tensor, dict]:
        enc, patch = self.encoder, self.config.patch_size
        grids = [patch_grid(tuple(v.shape[1:]), patch) for v in videos]
        sizes, seq_lens, cu_seqlens = self._layout(grids, token_counts, videos[0].device)
        x = enc.proj_in(torch.cat([patchify(v, patch) for v in videos])).split(sizes)
        x = torch.cat([t for n, p in zip(token_counts, x, strict=True) for t in (enc.mask_token.expand(n, -1), p)])
        rotations = upstream_rotations(grids, token_counts, x.device)
        x = self._layers(enc.model_layers, x, rotations, cu_seqlens, max(seq_lens)).split(seq_lens)
        z = enc.proj_out(enc.ln_post(torch.cat([s[:n] for s, n in zip(x, token_counts, strict=True)])))
        codes, indices = fsq_quantize(z, self.config.fsq_levels)
        return codes.to(z.dtype), {"indices": indices.split(list(token_counts))}

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, token_counts: list[int], grids: list) -> list[torch.Tensor]:
        dec, patch = self.decoder, self.config.patch_size
        shapes = [tuple(s) for s in grids]
        pgrids = [patch_grid(s, patch) for s in shapes]
        sizes, seq_lens, cu_seqlens = self._layout(pgrids, token_counts, codes.device)
        x = dec.proj_in(codes).split(list(token_counts))
        x = torch.cat([t for c, g in zip(x, sizes, strict=True) for t in (c, dec.mask_token.expand(g, -1))])
        rotations = upstream_rotations(pgrids, token_counts, x.device)
        x = self._layers(dec.model_layers, dec.ln_pre(x), rotations, cu_seqlens, max(seq_lens)).split(seq_lens)
        rows = dec.proj_out(torch.cat([s[n:] for s, n in zip(x, token_counts, strict=True)])).split(sizes)
        return [unpatchify(r, s, patch) for r, s in zip(rows, shapes, strict=True)]


def upstream_checkout(path: str | os.PathLike | None = None) -> Path | None:
    """The checkout named by ``path`` or ``TITOK_UPSTREAM`` (None when neither is set); it must hold
    ``model/titok.py`` (upstream's branch ``old-variableComp``)."""
    path = path or os.environ.get("TITOK_UPSTREAM")
    if not path:
        return None
    root = Path(path).resolve()
    if not (root / "model" / "titok.py").is_file():
        raise ValueError(f"{root} is not a checkout of upstream's old-variableComp branch (no model/titok.py)")
    return root


class Upstream:
    """Upstream's own ``TiTok``, built from a checkout with our config and weights. ``decode_indices`` goes through
    upstream's ``quantize.indices_to_codes`` and ``decode`` (upstream's own ``decode_indices`` fails both on the
    tuple ``encode`` returns and on a packed tensor)."""

    def __init__(self, module: torch.nn.Module, config: TiTokConfig):
        self.module, self.config = module, config

    def encode(self, videos, token_counts):
        with torch.no_grad():
            return self.module.encode(videos, list(token_counts))

    def decode_indices(self, indices, grids):
        with torch.no_grad():
            packed = torch.cat(list(indices))
            codes = self.module.quantize.indices_to_codes(packed).to(self.module.decoder.proj_in.weight.dtype)
            return self.module.decode(codes, [len(i) for i in indices], [tuple(g) for g in grids])


def load_upstream(
    state_dict: dict, config: TiTokConfig, path: str | os.PathLike | None = None, device="cpu", dtype=torch.float32
) -> Upstream:
    """Import upstream's model from its checkout (see :func:`upstream_checkout`), load ``state_dict`` into it and
    move it to ``device`` and ``dtype`` (upstream's inference: ``model.eval().to("cuda", torch.bfloat16)``).
    Needs ``einops`` and ``omegaconf`` (``pip install -e '.[bench]'``)."""
    from omegaconf import OmegaConf

    root = upstream_checkout(path)
    if root is None:
        raise ValueError("no upstream checkout: pass --upstream PATH or set TITOK_UPSTREAM")
    if importlib.util.find_spec("flash_attn") is None:
        sys.path.insert(0, str(STANDIN))
    sys.path.insert(0, str(root))
    titok = importlib.import_module("model.titok")
    conf = OmegaConf.create(config.to_dict())  # upstream's own nested layout
    module = titok.TiTok(conf)
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"upstream's model does not take these weights: missing {missing}, unexpected {unexpected}")
    return Upstream(module.eval().to(device=device, dtype=dtype), config)
