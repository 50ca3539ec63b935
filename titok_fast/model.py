"""The lean drop-in TiTok-Video model: upstream's parameter names and API, packed variable-length execution.

Backends (``TiTok(config, backend=...)``):
- ``"reference"``: the oracle of ``reference.py`` (per video, float64 complex RoPE).
- ``"torch"``: packed batch, q/k norm + M-RoPE on all rows at once, SDPA per sequence. Fast on the CPU.
- ``"triton"``: packed batch through the fused kernels of ``kernels/`` (CUDA, or the Triton interpreter).
- ``"auto"``: ``"triton"`` for CUDA tensors, ``"torch"`` otherwise.

Work the output does not need is skipped, exactly: the last encoder layer computes queries and the FFN only for
latent rows, the last decoder layer only for patch rows, and the decoder input ``ln_pre(proj_in(code))`` is a
table over the codebook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from titok_fast.kernels.fsq import FsqConstants, fsq_indices_to_codes_ref, fsq_quantize_ref

from . import reference
from .checks import check_codes, check_grids, check_indices, check_token_counts, check_videos, is_integer
from .config import HEAD_DIM, TiTokConfig
from .layers import Attention, DecoderParams, EncoderParams, Layers
from .packing import Packing, PackingCache, StaticBatch, pair_positions
from .reference import patch_grid, patchify, unpatchify

BACKENDS = ("auto", "reference", "torch", "triton")


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [rows, heads, 64]; rotate adjacent pairs by per-row cos/sin [rows, 32] (float32 math, x.dtype out)."""
    pairs = x.float().unflatten(-1, (HEAD_DIM // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)


def attention_dtype(q: torch.Tensor) -> torch.dtype:
    """Half precision on the CPU attends in float32, like the oracle: the CPU kernel's bf16 path cost 0.2 points
    of bf16 index parity in our runs (benchmarks/bf16_parity.py)."""
    return torch.float32 if q.device.type == "cpu" else q.dtype


def upstream_argument_order(grids, token_counts):
    """``(grids, token_counts)`` whichever order they came in: upstream's ``decode_indices(indices, token_counts,
    grids)`` passes counts (integers) where we take grids (triples), and grids last."""
    if (
        isinstance(grids, (list, tuple)) and grids and all(is_integer(n) for n in grids)
        and isinstance(token_counts, (list, tuple)) and token_counts
        and all(isinstance(g, (list, tuple)) and len(g) == 3 for g in token_counts)
    ):  # fmt: skip
        return token_counts, grids
    return grids, token_counts


class TiTok(nn.Module):
    """TiTok-Video tokenizer. ``state_dict()`` keys and shapes are exactly upstream's.

    Args:
        config: a preset name (``"v1"``, ``"tiny"``), an upstream YAML path, an OmegaConf config or a dict.
        backend: one of ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"``.
    """

    def __init__(self, config: object = "v1", backend: str = "auto"):
        super().__init__()
        self.config = TiTokConfig.from_any(config)
        self.encoder = EncoderParams(self.config)
        self.decoder = DecoderParams(self.config)
        self.backend = backend
        self._packings = PackingCache()
        self._fsq: dict[str, FsqConstants] = {}
        self._decoder_table: tuple | None = None
        self.weights_digest: str | None = None  # set by the loaders; names the weights in token files
        self.weights_source = ""  # the checkpoint path the weights came from, set by load_tokenizer

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend {value!r} is not one of {BACKENDS}")
        self._backend = value

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.proj_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.proj_in.weight.device

    def _active_backend(self) -> str:
        if self.backend == "auto":
            return "triton" if self.device.type == "cuda" else "torch"
        return self.backend

    def _fsq_constants(self) -> FsqConstants:
        key = str(self.device)
        if key not in self._fsq:
            self._fsq[key] = FsqConstants.of(self.config.fsq_levels, self.device)
        return self._fsq[key]

    def _grids(self, shapes: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        return [patch_grid(s, self.config.patch_size) for s in shapes]

    # ----------------------------------------------------------------------------------------------- public API
    @torch.no_grad()
    def encode(self, videos: list[torch.Tensor], token_counts: list[int]) -> tuple[torch.Tensor, dict]:
        """videos: list of [3, T, H, W] in [-1, 1]; token_counts: one int >= 1 per video.

        Returns ``(codes [sum n, D] model dtype, {"indices": tuple of int32 [n_i]})``.
        """
        shapes = check_videos(videos, self.config.patch_size)
        counts = check_token_counts(token_counts, len(videos))
        videos = [v.to(device=self.device, dtype=self.dtype) for v in videos]
        if self._active_backend() == "reference":
            return reference.encode(self.config, self.encoder, videos, counts)
        pack = self._packings.packing(counts, self._grids(shapes), self.device)
        patches = torch.cat([patchify(v, self.config.patch_size) for v in videos])
        codes, indices = self.encode_packed(patches, pack)
        return codes, {"indices": tuple(i.clone() for i in indices.split(counts))}

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, token_counts: list[int], grids: list) -> list[torch.Tensor]:
        """codes [sum n, D]; grids: pixel shapes (T, H, W) per video. Returns [3, T, H, W] each, not clamped."""
        counts = check_token_counts(token_counts, None)
        shapes = check_grids(grids, len(counts), self.config.patch_size)
        check_codes(codes, len(self.config.fsq_levels), sum(counts))
        codes = codes.to(device=self.device)
        if self._active_backend() == "reference":
            return reference.decode(self.config, self.decoder, codes.to(self.dtype), counts, shapes)
        indices = self._codes_to_indices(codes)
        pack = self._packings.packing(counts, self._grids(shapes), self.device)
        if indices is None:  # off the FSQ grid: no table row exists, project the codes themselves
            dec = self.decoder
            rows = dec.ln_pre(dec.proj_in(codes.to(self.dtype)))
            x = self._scatter_decoder_input(pack, rows, self.decoder_table()[1])
            return self._unpatchify_all(self._decoder_stack(x, pack), pack, shapes)
        return self._decode_indices_packed(indices, pack, shapes)

    @torch.no_grad()
    def decode_indices(self, indices, grids: list, token_counts: list[int] | None = None) -> list[torch.Tensor]:
        """indices: the tuple/list that ``encode`` returns (one int tensor [n_i] per video), or one packed
        tensor [sum n] together with ``token_counts``. grids: pixel shapes (T, H, W) per video.

        Upstream's own order, ``decode_indices(packed, token_counts, grids)``, is recognised and accepted too."""
        grids, token_counts = upstream_argument_order(grids, token_counts)
        packed, counts = self._pack_indices(indices, token_counts)
        shapes = check_grids(grids, len(counts), self.config.patch_size)
        packed = packed.to(self.device)
        if self._active_backend() == "reference":
            codes = reference.fsq_indices_to_codes(packed, self.config.fsq_levels).to(self.dtype)
            return reference.decode(self.config, self.decoder, codes, counts, shapes)
        pack = self._packings.packing(counts, self._grids(shapes), self.device)
        return self._decode_indices_packed(packed, pack, shapes)

    def forward(self, videos: list[torch.Tensor], token_counts: list[int]) -> tuple[list[torch.Tensor], dict]:
        """Encode then decode: ``(reconstructions, {"indices": ...})``."""
        codes, result = self.encode(videos, token_counts)
        shapes = [tuple(v.shape[1:]) for v in videos]
        return self.decode(codes, token_counts, shapes), result

    # ------------------------------------------------------------------------------------------- packed core
    def packing(self, token_counts: list[int], grids: list[tuple[int, int, int]]) -> Packing:
        """The (cached) packed layout for token counts and *patch* grids, on the model's device."""
        return self._packings.packing(token_counts, grids, self.device)

    @torch.no_grad()
    def encode_packed(self, patches: torch.Tensor, pack: Packing) -> tuple[torch.Tensor, torch.Tensor]:
        """patches [sum G, 768] (model dtype) -> (codes [sum n, D], indices int32 [sum n])."""
        enc = self.encoder
        x = patches.new_empty(pack.rows, enc.size.width)
        x[pack.latent_rows] = enc.mask_token.expand(pack.num_tokens, -1)
        x[pack.patch_rows] = enc.proj_in(patches)
        x = self._run_layers(enc.model_layers, x, pack, queries="latent")
        return self._encoder_head(x)

    def _encoder_head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent rows [N, W] -> ln_post, proj_out, FSQ -> (codes [N, D] model dtype, indices int32 [N])."""
        enc = self.encoder
        if self._active_backend() == "triton":
            from .ops import encoder_head

            return encoder_head(x, enc.ln_post, enc.proj_out, self._fsq_constants())
        z = enc.proj_out(enc.ln_post(x))
        codes, indices = fsq_quantize_ref(z, self._fsq_constants())
        return codes.to(z.dtype), indices

    @torch.no_grad()
    def decode_packed(self, indices: torch.Tensor, pack: Packing) -> torch.Tensor:
        """indices [sum n] -> patch rows [sum G, 768] (model dtype)."""
        table, mask_row = self.decoder_table()
        if self._active_backend() == "triton":
            from .ops import fsq_decoder_input_op

            x = fsq_decoder_input_op(indices, table, mask_row, pack.cu_seqlens, pack.cu_tokens, pack.rows)
        else:
            x = self._scatter_decoder_input(pack, table[indices.long()], mask_row)
        return self._decoder_stack(x, pack)

    def _decoder_stack(self, x: torch.Tensor, pack: Packing) -> torch.Tensor:
        """Packed decoder input [rows, W] -> layers (the last for patch rows only) -> proj_out: [sum G, 768]."""
        return self.decoder.proj_out(self._run_layers(self.decoder.model_layers, x, pack, queries="patch"))

    def decoder_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ln_pre(proj_in(code)) for every code [K, W], ln_pre(mask_token) [W])``, rebuilt when weights change."""
        dec = self.decoder
        params = (dec.proj_in.weight, dec.proj_in.bias, dec.ln_pre.weight, dec.ln_pre.bias, dec.mask_token)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._decoder_table is None or self._decoder_table[0] != key:
            with torch.no_grad():
                codes = fsq_indices_to_codes_ref(
                    torch.arange(self.config.codebook_size, device=self.device), self._fsq_constants()
                )
                table = dec.ln_pre(dec.proj_in(codes.to(self.dtype)))
                mask_row = dec.ln_pre(dec.mask_token)[0]
            self._decoder_table = (key, table, mask_row)
        return self._decoder_table[1], self._decoder_table[2]

    @torch.no_grad()
    def encode_static(self, patch_rows: torch.Tensor, batch: StaticBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed-shape encode for the engine: patch_rows [rows, 768] (zeros on latent and padding rows) ->
        (codes [rows, D], indices int32 [rows]); only latent rows are meaningful. Every layer runs on every row,
        so shapes never depend on the batch contents (torch.compile, CUDA graphs)."""
        enc = self.encoder
        x = torch.where(batch.is_latent[:, None], enc.mask_token, enc.proj_in(patch_rows))
        x = self._run_layers(enc.model_layers, x, batch, queries="all")
        return self._encoder_head(x)

    @torch.no_grad()
    def decode_static(
        self, indices: torch.Tensor, batch: StaticBatch, table: torch.Tensor, mask_row: torch.Tensor
    ) -> torch.Tensor:
        """Fixed-shape decode for the engine: indices [rows] (any valid index on non-latent rows) and
        ``decoder_table()`` -> output rows [rows, 768]; only patch rows are meaningful."""
        x = torch.where(batch.is_latent[:, None], table[indices.long()], mask_row)
        x = self._run_layers(self.decoder.model_layers, x, batch, queries="all")
        return self.decoder.proj_out(x)

    # ------------------------------------------------------------------------------------------------ helpers
    def _decode_indices_packed(self, indices: torch.Tensor, pack: Packing, shapes: list) -> list[torch.Tensor]:
        rows = self.decode_packed(indices, pack)
        return self._unpatchify_all(rows, pack, shapes)

    def _unpatchify_all(self, rows: torch.Tensor, pack: Packing, shapes: list) -> list[torch.Tensor]:
        return [
            unpatchify(rows[s:e], shape, self.config.patch_size)
            for (s, e), shape in zip(pack.patch_bounds, shapes, strict=True)
        ]

    @staticmethod
    def _scatter_decoder_input(pack: Packing, code_rows: torch.Tensor, mask_row: torch.Tensor) -> torch.Tensor:
        x = code_rows.new_empty(pack.rows, code_rows.shape[1])
        x[pack.latent_rows] = code_rows
        x[pack.patch_rows] = mask_row.to(code_rows.dtype).expand(pack.num_patches, -1)
        return x

    def _codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor | None:
        """Indices of codes that all lie exactly on the FSQ grid (compared in the codes' dtype), else None."""
        consts = self._fsq_constants()
        q = torch.round(codes.float() * consts.half_width)
        level = q + consts.half_width
        on_grid = (level >= 0) & (level < consts.levels) & ((q / consts.half_width).to(codes.dtype) == codes)
        if not bool(on_grid.all()):
            return None
        return (level.long() * consts.basis).sum(-1).to(torch.int32)

    def _pack_indices(self, indices, token_counts) -> tuple[torch.Tensor, list[int]]:
        k = self.config.codebook_size
        if isinstance(indices, torch.Tensor):
            if token_counts is None:
                raise ValueError(
                    "decode_indices got one packed tensor of indices but no token_counts; pass token_counts= "
                    "or the tuple of per-video index tensors that encode returns"
                )
            counts = check_token_counts(token_counts, None)
            check_indices(indices, k, "indices")
            if indices.numel() != sum(counts):
                raise ValueError(f"indices has {indices.numel()} entries but token_counts sum to {sum(counts)}")
            return indices, counts
        if not isinstance(indices, (list, tuple)):
            raise TypeError(
                f"indices must be a tuple/list of per-video tensors or one tensor, got {type(indices).__name__}"
            )
        if len(indices) == 0:
            raise ValueError("empty batch: indices holds no videos")
        for i, idx in enumerate(indices):
            check_indices(idx, k, f"indices of video {i}")
            if idx.numel() == 0:
                raise ValueError(f"indices of video {i} is empty; expected at least one token")
            if idx.device != indices[0].device:
                raise ValueError(f"indices of video {i} are on {idx.device} but video 0's on {indices[0].device}")
        counts = [int(i.numel()) for i in indices]
        if token_counts is not None and check_token_counts(token_counts, len(indices)) != counts:
            raise ValueError(f"token_counts {list(token_counts)} do not match the index lengths {counts}")
        return torch.cat([i.long() for i in indices]), counts

    def _run_layers(self, layers: Layers, x: torch.Tensor, pack: Packing | StaticBatch, queries: str) -> torch.Tensor:
        """All layers; the last one only for the ``queries`` rows (``"latent"`` or ``"patch"``), returned compact."""
        n = len(layers.attn_layer)
        for i, (attn, ffn) in enumerate(zip(layers.attn_layer, layers.ffd_layer, strict=True)):
            last = i == n - 1
            out = self._attention(attn, x, pack, queries if last else "all")
            if last and queries != "all":
                x = x[pack.latent_rows if queries == "latent" else pack.patch_rows]
            x = x + out
            x = x + ffn(x)
        return x

    def _attention(self, attn: Attention, x: torch.Tensor, pack: Packing | StaticBatch, queries: str) -> torch.Tensor:
        qkv = attn.to_qkv(attn.pre_ln(x))
        if isinstance(pack, StaticBatch):
            out = self._attention_static(attn, qkv, pack)
        elif self._active_backend() == "triton":
            out = self._attention_triton(attn, qkv, pack, queries)
        else:
            out = self._attention_torch(attn, qkv, pack, queries)
        return attn.out_proj(out)

    def _attention_triton(self, attn: Attention, qkv: torch.Tensor, pack: Packing, queries: str) -> torch.Tensor:
        from .ops import attention

        cos, sin = self._packings.tables(pack.max_position, self.device)
        if queries == "all":
            return attention(attn, qkv, pack.cu_seqlens, pack.positions, cos, sin)
        latent = queries == "latent"
        return attention(
            attn, qkv, pack.cu_seqlens, pack.positions, cos, sin,
            q_cu_seqlens=pack.cu_tokens if latent else pack.cu_patches,
            q_starts=pack.latent_starts if latent else pack.patch_starts,
            num_q_rows=pack.num_tokens if latent else pack.num_patches,
        )  # fmt: skip

    def _attention_static(self, attn: Attention, qkv: torch.Tensor, batch: StaticBatch) -> torch.Tensor:
        """Every row a query; sequences from the device-side ``cu_seqlens`` (no host reads)."""
        if self._active_backend() == "triton":
            from .ops import attention

            return attention(attn, qkv, batch.cu_seqlens, batch.positions, batch.cos, batch.sin)
        index = pair_positions(batch.positions)
        cos, sin = batch.cos.gather(0, index), batch.sin.gather(0, index)
        q, k, v = self._split_heads(attn, qkv)
        q, k = rotate_pairs(attn.q_norm(q), cos, sin), rotate_pairs(attn.k_norm(k), cos, sin)
        seg = batch.segment_ids()
        work = attention_dtype(q)
        q, k, v = (t[None].transpose(1, 2).to(work) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=seg[:, None] == seg[None, :], enable_gqa=True)
        return out[0].transpose(0, 1).flatten(1).to(qkv.dtype)

    @staticmethod
    def _split_heads(attn: Attention, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [rows, (Hq + 2 Hkv) * 64] -> views q [rows, Hq, 64], k and v [rows, Hkv, 64]."""
        hq, hkv = attn.q_heads, attn.kv_heads
        q = qkv[:, : hq * HEAD_DIM].unflatten(1, (hq, HEAD_DIM))
        k = qkv[:, hq * HEAD_DIM : (hq + hkv) * HEAD_DIM].unflatten(1, (hkv, HEAD_DIM))
        v = qkv[:, (hq + hkv) * HEAD_DIM :].unflatten(1, (hkv, HEAD_DIM))
        return q, k, v

    def _attention_torch(self, attn: Attention, qkv: torch.Tensor, pack: Packing, queries: str) -> torch.Tensor:
        cos, sin = self._packings.row_rotations(pack, self.device)
        q, k, v = self._split_heads(attn, qkv)
        q_bounds = pack.seq_bounds
        if queries != "all":
            q_rows = pack.latent_rows if queries == "latent" else pack.patch_rows
            q, cos_q, sin_q = q[q_rows], cos[q_rows], sin[q_rows]
            q_bounds = pack.token_bounds if queries == "latent" else pack.patch_bounds
        else:
            cos_q, sin_q = cos, sin
        q, k = rotate_pairs(attn.q_norm(q), cos_q, sin_q), rotate_pairs(attn.k_norm(k), cos, sin)
        out = q.new_empty(q.shape)
        work = attention_dtype(q)
        for (qs, qe), (ks, ke) in zip(q_bounds, pack.seq_bounds, strict=True):
            # 4-D inputs: the CPU flash kernel takes them; 3-D ones fall back to the math path (3x slower)
            q_i, k_i, v_i = (
                t[None, a:b].transpose(1, 2).to(work) for t, a, b in ((q, qs, qe), (k, ks, ke), (v, ks, ke))
            )
            out[qs:qe] = F.scaled_dot_product_attention(q_i, k_i, v_i, enable_gqa=True)[0].transpose(0, 1)
        return out.flatten(1)
