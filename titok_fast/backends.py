"""The model's compute backends: one small interface, a PyTorch implementation and a Triton one.

The forward code (``model.py``) calls a :class:`Backend` for the operations that differ between them; it has no
backend branches of its own. Which one runs is resolved per call from the device of the weights
(:func:`resolve_backend`), so a model built on the CPU or ``meta`` and moved to CUDA takes the Triton path.

- :class:`TorchBackend`: q/k norm + M-RoPE on all rows at once, SDPA per sequence; FSQ in PyTorch. The CPU path.
- :class:`TritonBackend`: the fused kernels of ``titok_fast.kernels`` as custom ops (``ops.py``), the FFN's gated
  GELU included, and what feeds an FP8 Linear made as its codes in the pass that makes it; in a 16-bit model the
  residual is added by the GEMM before it. CUDA, or the Triton interpreter on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from titok_fast.kernels._triton import MISSING as TRITON_MISSING
from titok_fast.kernels._triton import triton
from titok_fast.kernels.fsq import FsqConstants

from .config import HEAD_DIM
from .layers import Attention
from .packing import Packing, PackingCache, StaticBatch, pair_positions
from .quantizer import fsq_quantize

BACKENDS = ("auto", "torch", "triton")
QUERIES = ("all", "latent", "patch")  # which rows of a packed batch attend: every row, or one kind only


class Backend:
    """What a backend implements. Shapes: W model width, D code dimensions, rows packed rows."""

    name = ""

    def attention(
        self, attn: Attention, qkv: torch.Tensor, pack: Packing, queries: str, cache: PackingCache
    ) -> torch.Tensor:
        """Packed variable-length attention of one layer before ``out_proj``: qkv [rows, (Hq + 2 Hkv) * 64] (may be
        used as scratch) -> [q rows, Hq * 64], where the query rows are ``queries`` (see ``QUERIES``) in packed
        order. ``cache`` supplies the float32 rotation tables."""
        raise NotImplementedError

    def attention_static(self, attn: Attention, qkv: torch.Tensor, batch: StaticBatch) -> torch.Tensor:
        """Fixed-shape attention, every row a query: qkv [rows, ...] -> [rows, Hq * 64]; the sequences come from
        the device-side ``batch.cu_seqlens`` (no host reads), padding rows attend among themselves."""
        raise NotImplementedError

    def qkv(self, attn: Attention, x: torch.Tensor) -> torch.Tensor:
        """One layer's q/k/v projection of rows [rows, W]: ``to_qkv(pre_ln(x))``."""
        return attn.to_qkv(attn.pre_ln(x))

    def feed_forward(self, ffn: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """One layer's FFN (``ffd_layer.{i}``: LayerNorm, Linear W -> 2I, GatedGelu, Dropout, Linear I -> W) of rows
        [rows, W], before the residual: ``ffn(x)``."""
        return ffn(x)

    def add_linear(self, x: torch.Tensor, linear: torch.nn.Module, h: torch.Tensor, own_x: bool) -> torch.Tensor:
        """The residual stream after a bias-free projection: ``x + linear(h)``, rows [rows, W]. ``own_x``: x is an
        intermediate of the caller's own, which the result may be written over."""
        return x + linear(h)

    def add_feed_forward(self, ffn: torch.nn.Sequential, x: torch.Tensor, own_x: bool) -> torch.Tensor:
        """A layer's second residual: ``x + feed_forward(ffn, x)`` (``own_x`` as for :meth:`add_linear`)."""
        return x + self.feed_forward(ffn, x)

    def encoder_head(
        self, x: torch.Tensor, ln: torch.nn.LayerNorm, proj: torch.nn.Linear, consts: FsqConstants
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent rows [N, W] -> ``proj(ln(x))`` -> FSQ -> (codes [N, D] in x's dtype, indices int32 [N])."""
        raise NotImplementedError

    def decoder_input(
        self, indices: torch.Tensor, table: torch.Tensor, mask_row: torch.Tensor, pack: Packing
    ) -> torch.Tensor:
        """The decoder's packed input [rows, W]: ``table[index]`` on latent rows, ``mask_row`` on patch rows."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.name} backend>"


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [rows, heads, 64]; rotate adjacent pairs by per-row cos/sin [rows, 32] (float32 math, x.dtype out)."""
    pairs = x.float().unflatten(-1, (HEAD_DIM // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)


def attention_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: q's, except on the CPU, where float16 and float64 attend in float32 (the CPU's
    float16 kernel is no faster than float32's, and float64 models are float32-accurate by design). bfloat16
    attends in bfloat16 on the CPU too: its kernel there ran 2.8x as fast as float32's on a V1 encoder sequence
    (Intel Xeon with AMX; 1.8x with AMX and AVX-512 masked off), a bf16 V1 encoded 1.8x as fast as with float32
    attention (files in, token files out), and its tokens stay within the bf16 noise floor
    (benchmarks/bf16_parity.py; RESULTS.md)."""
    return q.dtype if q.device.type != "cpu" or q.dtype == torch.bfloat16 else torch.float32


def split_heads(attn: Attention, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [rows, (Hq + 2 Hkv) * 64] -> views q [rows, Hq, 64], k and v [rows, Hkv, 64]."""
    hq, hkv = attn.q_heads, attn.kv_heads
    q = qkv[:, : hq * HEAD_DIM].unflatten(1, (hq, HEAD_DIM))
    k = qkv[:, hq * HEAD_DIM : (hq + hkv) * HEAD_DIM].unflatten(1, (hkv, HEAD_DIM))
    v = qkv[:, (hq + hkv) * HEAD_DIM :].unflatten(1, (hkv, HEAD_DIM))
    return q, k, v


def scatter_rows(pack: Packing, code_rows: torch.Tensor, mask_row: torch.Tensor) -> torch.Tensor:
    """[rows, W]: ``code_rows`` [sum n, W] on the latent rows, ``mask_row`` [W] on every patch row."""
    x = code_rows.new_empty(pack.rows, code_rows.shape[1])
    x[pack.latent_rows] = code_rows
    x[pack.patch_rows] = mask_row.to(code_rows.dtype).expand(pack.num_patches, -1)
    return x


class TorchBackend(Backend):
    name = "torch"

    def attention(
        self, attn: Attention, qkv: torch.Tensor, pack: Packing, queries: str, cache: PackingCache
    ) -> torch.Tensor:
        cos, sin = cache.row_rotations(pack, qkv.device)
        q, k, v = split_heads(attn, qkv)
        q_bounds, cos_q, sin_q = pack.seq_bounds, cos, sin
        if queries != "all":
            q_rows = pack.latent_rows if queries == "latent" else pack.patch_rows
            q, cos_q, sin_q = q[q_rows], cos[q_rows], sin[q_rows]
            q_bounds = pack.token_bounds if queries == "latent" else pack.patch_bounds
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

    def attention_static(self, attn: Attention, qkv: torch.Tensor, batch: StaticBatch) -> torch.Tensor:
        index = pair_positions(batch.positions)
        cos, sin = batch.cos.gather(0, index), batch.sin.gather(0, index)
        q, k, v = split_heads(attn, qkv)
        q, k = rotate_pairs(attn.q_norm(q), cos, sin), rotate_pairs(attn.k_norm(k), cos, sin)
        seg = batch.segment_ids()
        mask = seg[:, None] == seg[None, :]
        work = attention_dtype(q)
        # A row's NaN or inf key or value would reach every clip: a dense mask's zero weight times a NaN value is
        # NaN, which a varlen kernel never computes. Such rows are made 0, and their own clip's rows NaN (as a
        # varlen kernel leaves a clip attending to NaN), so the others get what they get alone.
        finite = torch.isfinite(k).flatten(1).all(1) & torch.isfinite(v).flatten(1).all(1)
        k, v = (torch.where(finite[:, None, None], t, 0) for t in (k, v))
        q, k, v = (t[None].transpose(1, 2).to(work) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
        bad = torch.zeros(batch.cu_seqlens.numel(), dtype=torch.int32, device=seg.device)  # (segments: ids < it)
        out = torch.where((bad.index_add_(0, seg, (~finite).int()) > 0)[seg][:, None, None], torch.nan, out)
        return out.flatten(1).to(qkv.dtype)

    def encoder_head(
        self, x: torch.Tensor, ln: torch.nn.LayerNorm, proj: torch.nn.Linear, consts: FsqConstants
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z = proj(ln(x))
        codes, indices = fsq_quantize(z, consts)
        return codes.to(z.dtype), indices

    def decoder_input(
        self, indices: torch.Tensor, table: torch.Tensor, mask_row: torch.Tensor, pack: Packing
    ) -> torch.Tensor:
        return scatter_rows(pack, table[indices.long()], mask_row)


class TritonBackend(Backend):
    name = "triton"

    def attention(
        self, attn: Attention, qkv: torch.Tensor, pack: Packing, queries: str, cache: PackingCache
    ) -> torch.Tensor:
        from .ops import attention

        cos, sin = cache.tables(pack.max_position, qkv.device)
        if queries == "all":
            return attention(attn, qkv, pack.cu_seqlens, pack.positions, cos, sin)
        latent = queries == "latent"
        return attention(
            attn, qkv, pack.cu_seqlens, pack.positions, cos, sin,
            q_cu_seqlens=pack.cu_tokens if latent else pack.cu_patches,
            q_starts=pack.latent_starts if latent else pack.patch_starts,
            num_q_rows=pack.num_tokens if latent else pack.num_patches,
        )  # fmt: skip

    def attention_static(self, attn: Attention, qkv: torch.Tensor, batch: StaticBatch) -> torch.Tensor:
        from .ops import attention

        return attention(attn, qkv, batch.cu_seqlens, batch.positions, batch.cos, batch.sin)

    def qkv(self, attn: Attention, x: torch.Tensor) -> torch.Tensor:
        """Into an FP8 ``to_qkv``, ``pre_ln``'s rows as codes and row scales, normalised and quantised in one pass."""
        return _normed_linear(attn.pre_ln, attn.to_qkv, x)

    def feed_forward(self, ffn: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """The gated GELU in one kernel; into an FP8 Linear as its codes and row scales (no 16-bit copy between),
        and so are the norm's rows into an FP8 first Linear."""
        from .fp8 import Fp8Linear
        from .ops import gated_gelu_fp8_op, gated_gelu_op

        ln, up, _, _, down = ffn
        h = _normed_linear(ln, up, x)
        if isinstance(down, Fp8Linear):
            return down.of_codes(*gated_gelu_fp8_op(h), h.dtype)
        return down(gated_gelu_op(h))

    def add_linear(self, x: torch.Tensor, linear: torch.nn.Module, h: torch.Tensor, own_x: bool) -> torch.Tensor:
        """In a 16-bit model, one GEMM that adds the residual in its epilogue (``addmm``, beta = 1): no separate pass
        over the rows that reads two tensors and writes a third, and the sum rounded once, where ``x + linear(h)``
        rounds the product first (so the result is nearer the exact sum; an fp32 model keeps the plain path's
        values, bit for bit). In place where x is the caller's own (a new output would be a copy of x first)."""
        if not _adds_in_gemm(x, linear, h):
            return x + linear(h)
        weight = linear.weight.t()
        return x.addmm_(h, weight) if own_x and not torch.is_grad_enabled() else torch.addmm(x, h, weight)

    def add_feed_forward(self, ffn: torch.nn.Sequential, x: torch.Tensor, own_x: bool) -> torch.Tensor:
        """:meth:`feed_forward` with its second Linear adding the residual (:meth:`add_linear`)."""
        from .fp8 import Fp8Linear
        from .ops import gated_gelu_op

        ln, up, _, _, down = ffn
        if isinstance(down, Fp8Linear):
            return x + self.feed_forward(ffn, x)
        return self.add_linear(x, down, gated_gelu_op(_normed_linear(ln, up, x)), own_x)

    def encoder_head(
        self, x: torch.Tensor, ln: torch.nn.LayerNorm, proj: torch.nn.Linear, consts: FsqConstants
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from .ops import encoder_head

        return encoder_head(x, ln, proj, consts)

    def decoder_input(
        self, indices: torch.Tensor, table: torch.Tensor, mask_row: torch.Tensor, pack: Packing
    ) -> torch.Tensor:
        from .ops import fsq_decoder_input_op

        return fsq_decoder_input_op(indices, table, mask_row, pack.cu_seqlens, pack.cu_tokens, pack.rows)


def plain_module(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` is its arithmetic alone, which a fused path may do in its place: no forward hooks
    (its own, or global ones), no ``forward`` of the instance's own, and parameters that are plain tensors (not a
    subclass that computes otherwise)."""
    from torch.nn.modules import module as modules

    hooked = module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__
    return not (hooked or modules._global_forward_hooks or modules._global_forward_pre_hooks) and all(
        type(p) in (torch.Tensor, torch.nn.Parameter) for p in module._parameters.values() if p is not None
    )


def _adds_in_gemm(x: torch.Tensor, linear: torch.nn.Module, h: torch.Tensor) -> bool:
    """Whether ``x + linear(h)`` can be one ``addmm``: a plain (:func:`plain_module`) bias-free Linear, everything in
    one 16-bit dtype, no autocast (which would run the addmm in its own dtype)."""
    return (
        type(linear) is torch.nn.Linear
        and plain_module(linear)
        and linear.bias is None
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.dtype == h.dtype == linear.weight.dtype
        and x.dim() == h.dim() == 2
        and not torch.is_autocast_enabled(x.device.type)
    )


def _normed_linear(ln: torch.nn.LayerNorm, linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(ln(x))``, the norm a kernel that reads each row once (``kernels/layer_norm.py``) where it takes the
    rows; an FP8 ``linear`` takes the norm's rows as codes made in the norm's own pass."""
    from .fp8 import Fp8Linear
    from .ops import layer_norm_op, layer_norm_rows_fp8_op

    if isinstance(linear, Fp8Linear):
        return linear.of_codes(*layer_norm_rows_fp8_op(x, ln.weight, ln.bias, ln.eps), x.dtype)
    if _norm_in_kernel(ln, x):
        return linear(layer_norm_op(x, ln.weight, ln.bias, ln.eps))
    return linear(ln(x))


def _norm_in_kernel(ln: torch.nn.LayerNorm, x: torch.Tensor) -> bool:
    """Whether the LayerNorm kernel takes ``ln(x)``: a plain LayerNorm (:func:`plain_module`) with an affine of x's
    dtype (as a model in one dtype has), rows and affine the kernel reads (``kernels.layer_norm.rows_problem``: the
    norm over the rows' width, on their device), no autocast."""
    from titok_fast.kernels.layer_norm import rows_problem

    w, b = ln.weight, ln.bias
    return (
        type(ln) is torch.nn.LayerNorm
        and w is not None
        and b is not None
        and x.dtype == w.dtype == b.dtype
        and plain_module(ln)
        and rows_problem(x, w, b) is None
        and not torch.is_autocast_enabled(x.device.type)
    )


TORCH = TorchBackend()
TRITON = TritonBackend()


def check_backend(choice: object) -> str:
    """``choice`` if it names a backend; ``"reference"`` and anything else is a one-line ValueError."""
    if choice == "reference":
        raise ValueError(
            "backend 'reference' is gone from TiTok: the oracle is titok_fast.reference.ReferenceTiTok (same "
            f"weights, load_state_dict moves them); TiTok's backend is one of {BACKENDS}"
        )
    if choice not in BACKENDS:
        raise ValueError(f"backend {choice!r} is not one of {BACKENDS}")
    if choice == "triton" and TRITON_MISSING:
        raise ValueError(f"backend 'triton' cannot run: {TRITON_MISSING}")
    return choice


def resolve_backend(choice: str, device: torch.device | str) -> Backend:
    """The backend that runs for ``choice`` with weights on ``device``: ``"auto"`` is Triton on CUDA (where Triton
    is installed), PyTorch anywhere else; ``"torch"`` and ``"triton"`` are taken as they are."""
    if choice == "auto":
        choice = "triton" if torch.device(device).type == "cuda" and not TRITON_MISSING else "torch"
    return TRITON if check_backend(choice) == "triton" else TORCH


def constant_to_compile(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` (2 s of every run's start,
    needed only by torch.compile): the decorator marks ``fn`` as this does, and returns it (a test checks that the
    mark is the same as torch's)."""
    fn._dynamo_marked_constant = True
    return fn


@constant_to_compile
def _triton_interprets() -> bool:
    """Whether Triton runs its kernels in its interpreter: read once per traced graph, an unguarded constant to
    torch.compile (the Dynamo of torch 2.11 recurses on triton.knobs' descriptors, which read their object's
    ``__dict__``): a graph traced in the interpreter and called with it switched off later is not refused in one
    line (it fails in Triton instead)."""
    return bool(triton.knobs.runtime.interpret)


def check_runs(backend: Backend, device: torch.device) -> None:
    """Refuse, in one line, a call that would fail deep inside or give tensors without values: weights on ``meta``
    (shapes only), or the Triton kernels with weights off CUDA where Triton does not interpret them."""
    if device.type == "meta":
        raise ValueError(
            "the model's weights are on the meta device (shapes only); give them values first: "
            "load_state_dict(state, assign=True), or to_empty(device=...) and then load_state_dict(state)"
        )
    if backend is TRITON and device.type != "cuda" and not _triton_interprets():
        raise ValueError(
            f"backend 'triton' runs on CUDA, or on a CPU in the Triton interpreter (TRITON_INTERPRET=1 before "
            f"Triton is imported); the weights are on {device}: use backend 'auto' or 'torch'"
        )
