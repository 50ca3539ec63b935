"""The lean drop-in TiTok-Video model: upstream's parameter names and API, packed variable-length execution.

``TiTok`` has upstream's submodules: ``model.encoder(videos, token_counts)`` returns the packed pre-quantisation
latents, ``model.quantize`` is the FSQ module (``quantizer.py``), ``model.decoder(codes, token_counts, grids)`` returns
the videos. ``encode`` / ``decode`` / ``decode_indices`` / ``forward`` are upstream's methods, fused where it pays.

The arithmetic that differs between PyTorch and the Triton kernels lives in ``backends.py``; which backend runs is
resolved at every call from the device of the weights (``backend="auto"``), or forced (``"torch"``, ``"triton"``).

Work the output does not need is skipped, exactly: the last encoder layer computes queries and the FFN only for
latent rows, the last decoder layer only for patch rows, and the decoder input ``ln_pre(proj_in(code))`` is a
table over the codebook.

Inference only: every entry point runs without autograd, and an input that requires grad is refused. Every entry
point also switches off an enclosing ``torch.autocast`` (:func:`inference`): the model computes in its own dtype.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from titok_fast.kernels.fsq import FsqConstants

from . import fp8
from .backends import Backend, check_backend, check_runs, constant_to_compile, plain_module, resolve_backend
from .checks import (
    check_clip_indices,
    check_codes,
    check_grids,
    check_indices,
    check_not_meta,
    check_token_counts,
    check_videos,
    from_numpy,
    is_integer,
)
from .config import TiTokConfig
from .layers import DecoderParams, EncoderParams, Layers
from .packing import Packing, PackingCache, StaticBatch
from .patches import patch_grid, patchify, unpatchify
from .quantizer import FSQ, grid_indices


def inference(method):
    """A method of the model (of an object with a ``device``) run under ``torch.no_grad``, and with any
    ``torch.autocast`` around it switched off, on the CPU and on the model's device: the model computes in its own
    dtype (``model.to(torch.bfloat16)`` for bf16), with the same tokens and outputs inside and outside an autocast
    region (a generative model's training step, say). Under autocast its Linears would run in the autocast dtype
    on weights of another, which its fused paths do not take (an fp32 model's buffers met bf16 values), and a
    table built there would be kept in that dtype for later calls."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with torch.no_grad(), own_dtype(self.device):
            return method(self, *args, **kwargs)

    return run


@constant_to_compile
def _autocast_available(device_type: str) -> bool:
    """Whether autocast runs on ``device_type``: a constant to torch.compile (the Dynamo of torch 2.11, the GPU
    machines' version, cannot trace torch._C._is_autocast_available; 2.13's folds it)."""
    return torch.amp.is_autocast_available(device_type)


@contextlib.contextmanager
def own_dtype(device: torch.device) -> Iterator[None]:
    """Any ``torch.autocast`` around this switched off, on the CPU and on ``device`` (see :func:`inference`)."""
    kind = device.type if _autocast_available(device.type) else "cpu"  # (the meta device has none)
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled(kind) or not torch.is_autocast_cache_enabled():
        # (the cache setting too, which autocast(enabled=False) would keep: compiled graphs are guarded on it)
        with torch.autocast("cpu", enabled=False, cache_enabled=True), \
                torch.autocast(kind, enabled=False, cache_enabled=True):  # fmt: skip
            yield
    else:
        yield


def upstream_argument_order(grids, token_counts):
    """``(grids, token_counts)`` whichever order they came in. Upstream's ``decode_indices(indices, grids)`` has
    no counts; as a convenience we also take ``decode_indices(packed, token_counts, grids)``, the argument order of
    ``decode(codes, token_counts, grids)``, recognised by its types (counts are integers, grids triples; either
    may be a tensor)."""
    grids, token_counts = from_numpy(grids), from_numpy(token_counts)
    for name, given in (("grids", grids), ("token_counts", token_counts)):
        if isinstance(given, torch.Tensor):
            check_not_meta(given, name)
    counts = grids.tolist() if isinstance(grids, torch.Tensor) and grids.dim() == 1 else grids
    shapes = token_counts
    if isinstance(token_counts, torch.Tensor) and token_counts.dim() == 2:
        shapes = token_counts.tolist()
    # (a single count too: check_token_counts then says counts come one per video)
    if (
        (is_integer(counts) or isinstance(counts, (list, tuple)) and counts and all(is_integer(n) for n in counts))
        and isinstance(shapes, (list, tuple)) and shapes and all(_is_grid(g) for g in shapes)
    ):  # fmt: skip
        return token_counts, grids
    return grids, token_counts


def _is_grid(g: object) -> bool:
    """Whether ``g`` has the form of a pixel shape (T, H, W): a triple, or a 1-D tensor of three values."""
    if isinstance(g, torch.Tensor):
        return g.dim() == 1 and g.numel() == 3
    return isinstance(g, (list, tuple)) and len(g) == 3


class Runtime:
    """What the encoder and decoder of one model share: the backend choice, the packed layouts and RoPE tables,
    and the FSQ module."""

    def __init__(self, backend: str, fsq: FSQ):
        self.choice = check_backend(backend)
        self.packings = PackingCache()
        self.fsq = fsq
        self.dtypes: dict[str, set[torch.dtype]] = {}  # per parameter: its dtypes since the weights digest was set

    def note_dtypes(self, module: nn.Module, prefix: str) -> None:
        """After a cast of ``module`` (the model's, named ``prefix``: ``to()``, ``half()``, ...): the dtypes its
        weights were rounded to stay on record."""
        for name, p in module.named_parameters(prefix):
            self.dtypes.setdefault(name, set()).add(p.dtype)

    def backend(self, device: torch.device) -> Backend:
        return resolve_backend(self.choice, device)

    def runner(self, device: torch.device) -> Backend:
        """:meth:`backend`, for a call that runs on it now (refused where it cannot: :func:`check_runs`)."""
        backend = self.backend(device)
        check_runs(backend, device)
        return backend


def _holds(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Whether every value of dtype ``narrow`` is one of ``wide``."""
    order = {torch.float64: 3, torch.float32: 2, torch.bfloat16: 1, torch.float16: 1}
    return narrow == wide or order.get(narrow, 9) < order.get(wide, 0)


def _kept_values(
    named: dict[str, torch.dtype], passed: dict[str, set[torch.dtype]], now: dict[str, torch.dtype]
) -> bool:
    """Whether each parameter, named by a digest in dtype ``named[name]`` and cast through ``passed[name]`` since,
    holds what a cast straight to its dtype ``now[name]`` gives: no cast rounded it to something narrower."""
    return all(
        _narrowest(passed.get(name, set()) | {dtype}) == _narrowest({named.get(name, dtype), dtype})
        for name, dtype in now.items()
    )


def _narrowest(dtypes: set[torch.dtype]) -> set[torch.dtype]:
    """The dtypes of ``dtypes`` that hold no other of them: what a value cast through all of them is rounded to."""
    return {d for d in dtypes if not any(e != d and _holds(d, e) for e in dtypes)}


def run_layers(
    layers: Layers, x: torch.Tensor, pack: Packing, queries: str, backend: Backend, cache: PackingCache
) -> torch.Tensor:
    """x [rows, W] through every layer; the last one only for the ``queries`` rows (``"latent"``, ``"patch"`` or
    ``"all"``), returned compact: [query rows, W]."""
    n = len(layers.attn_layer)
    for i, (attn, ffn) in enumerate(zip(layers.attn_layer, layers.ffd_layer, strict=True)):
        last = i == n - 1
        out = backend.attention(attn, backend.qkv(attn, x), pack, queries if last else "all", cache)
        if last and queries != "all":
            x = x[pack.latent_rows if queries == "latent" else pack.patch_rows]
        # x is the caller's until the first residual has made a new one: only then may a residual add in place
        x = backend.add_linear(x, attn.out_proj, out, own_x=i > 0)
        x = backend.add_feed_forward(ffn, x, own_x=True)
    return x


def run_layers_static(layers: Layers, x: torch.Tensor, batch: StaticBatch, backend: Backend) -> torch.Tensor:
    """x [rows, W] through every layer, every row a query, shapes independent of the batch contents."""
    for i, (attn, ffn) in enumerate(zip(layers.attn_layer, layers.ffd_layer, strict=True)):
        x = backend.add_linear(x, attn.out_proj, backend.attention_static(attn, backend.qkv(attn, x), batch), i > 0)
        x = backend.add_feed_forward(ffn, x, own_x=True)
    return x


def input_weight(module: nn.Module, default: torch.Tensor) -> torch.Tensor:
    """``module.weight``, or for a module without one (a wrapper around the Linear) its first parameter, else
    ``default``: what gives the dtype and device that the module's input is cast to."""
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else next(module.parameters(), default)


class Encoder(EncoderParams):
    """Upstream's encoder: ``encoder(videos, token_counts)`` -> packed latents ``z`` [sum n, D] (``ln_post`` and
    ``proj_out`` applied, not quantised), in the model dtype."""

    def __init__(self, config: TiTokConfig, runtime: Runtime):
        super().__init__(config)
        self.config, self.runtime = config, runtime

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.runtime.note_dtypes(self, "encoder")
        return out

    @property
    def device(self) -> torch.device:
        return self.input_weight().device

    def input_weight(self) -> torch.Tensor:
        """The weight whose dtype and device the patches are cast to (:func:`input_weight` of ``proj_in``)."""
        return input_weight(self.proj_in, self.mask_token)

    @inference
    def forward(self, x: list[torch.Tensor], token_counts: list[int]) -> torch.Tensor:
        """x (upstream's name): videos, a list of [3, T, H, W]; token_counts: one int >= 1 per video -> z [sum n, D]."""
        patches, pack = self.prepare(x, token_counts)
        return self.proj_out(self.ln_post(self.latents(patches, pack)))

    def prepare(self, videos: list[torch.Tensor], token_counts: list[int]) -> tuple[torch.Tensor, Packing]:
        """Checked videos -> (patch rows [sum G, 768] in the weights' dtype and device, their packing)."""
        weight = self.input_weight()
        shapes = check_videos(videos, self.config.patch_size, dtype=weight.dtype)
        counts = check_token_counts(token_counts, len(videos))
        patches = torch.cat([patchify(v.to(device=weight.device, dtype=weight.dtype), self.config.patch_size)
                             for v in videos])  # fmt: skip
        grids = [patch_grid(s, self.config.patch_size) for s in shapes]
        return patches, self.runtime.packings.packing(counts, grids, weight.device)

    def latents(self, patches: torch.Tensor, pack: Packing, cache: PackingCache | None = None) -> torch.Tensor:
        """patches [sum G, 768] -> the latent rows after the last layer [sum n, W]."""
        x = patches.new_empty(pack.rows, self.size.width)
        x[pack.latent_rows] = self.mask_token.expand(pack.num_tokens, -1)
        x[pack.patch_rows] = self.proj_in(patches)
        backend = self.runtime.runner(self.device)
        return run_layers(self.model_layers, x, pack, "latent", backend, cache or self.runtime.packings)

    def quantized(self, x: torch.Tensor, backend: Backend) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent rows [N, W] -> ln_post, proj_out, FSQ -> (codes [N, D] model dtype, indices int32 [N])."""
        return backend.encoder_head(x, self.ln_post, self.proj_out, self.runtime.fsq.constants(self.device))

    @inference
    def encode_packed(
        self, patches: torch.Tensor, pack: Packing, cache: PackingCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """patches [sum G, 768] (model dtype) -> (codes [sum n, D], indices int32 [sum n]); ``cache``: where the
        RoPE tables come from (default the model's own)."""
        return self.quantized(self.latents(patches, pack, cache), self.runtime.runner(self.device))

    @inference
    def encode_static(self, patch_rows: torch.Tensor, batch: StaticBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """patch_rows [rows, 768] (any values on latent and padding rows: never read into a clip) ->
        (codes [rows, D], indices int32 [rows]); only latent rows are meaningful. Padding rows start as zeros, so
        whatever the buffer held there (even NaN) stays out of the attention of real rows."""
        backend = self.runtime.runner(self.device)
        patches = torch.where(batch.real_rows()[:, None], self.proj_in(patch_rows), 0)
        x = torch.where(batch.is_latent[:, None], self.mask_token, patches)
        return self.quantized(run_layers_static(self.model_layers, x, batch, backend), backend)


class Decoder(DecoderParams):
    """Upstream's decoder: ``decoder(codes, token_counts, grids)`` -> one video [3, T, H, W] per entry of
    ``grids`` (pixel shapes (T, H, W)), not clamped."""

    def __init__(self, config: TiTokConfig, runtime: Runtime):
        super().__init__(config)
        self.config, self.runtime = config, runtime
        self._table: tuple | None = None

    def __getstate__(self) -> dict:
        """Without the code table, derived from the weights and made again at the first use: a copy, pickle or
        torch.save of a model that had decoded carried it (V1: 68 MB more)."""
        state = dict(super().__getstate__())
        state["_table"] = None
        return state

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.runtime.note_dtypes(self, "decoder")
        return out

    @property
    def device(self) -> torch.device:
        return self.input_weight().device

    def input_weight(self) -> torch.Tensor:
        """The weight whose dtype and device the codes are cast to (:func:`input_weight` of ``proj_in``)."""
        return input_weight(self.proj_in, self.mask_token)

    @inference
    def forward(self, x: torch.Tensor, token_counts: list[int], grids: list) -> list[torch.Tensor]:
        """x (upstream's name): codes [sum n, D] -> list of [3, T, H, W]. Codes on the FSQ grid take the table path
        (the same numbers); others are projected as they are."""
        codes = x
        counts = check_token_counts(token_counts, None)
        shapes = check_grids(grids, len(counts), self.config.patch_size)
        weight = self.input_weight()
        check_codes(codes, len(self.config.fsq_levels), sum(counts), weight.dtype)
        self.runtime.runner(weight.device)  # refused in one line before anything reads values (meta weights)
        codes = codes.to(device=weight.device)
        pack = self.packing(counts, shapes)
        indices = grid_indices(codes, self.runtime.fsq.constants(weight.device)) if self.table_stands_in() else None
        if indices is not None:
            return self.videos(self.decode_packed(indices, pack), pack, shapes)
        return self.videos(self.rows(self.sequence(codes.to(weight.dtype), pack), pack), pack, shapes)

    def packing(self, counts: list[int], shapes: list[tuple[int, int, int]]) -> Packing:
        grids = [patch_grid(s, self.config.patch_size) for s in shapes]
        return self.runtime.packings.packing(counts, grids, self.device)

    def table_stands_in(self) -> bool:
        """Whether the code table may stand for ``ln_pre(proj_in(codes))``: both are the plain modules
        (:func:`plain_module`; exactly ``nn.Linear`` and ``nn.LayerNorm``, whose output rows follow from their
        weights and input rows alone). Otherwise (a subclass, such as a LoRA Linear, a wrapper, a parametrization,
        hooks) the decoder runs upstream's ``ln_pre`` over ``proj_in(codes)`` and the mask rows (:meth:`sequence`)."""
        return (
            type(self.proj_in) is nn.Linear
            and type(self.ln_pre) is nn.LayerNorm
            and plain_module(self.proj_in)
            and plain_module(self.ln_pre)
        )

    def sequence(self, codes: torch.Tensor, pack: Packing) -> torch.Tensor:
        """Upstream's decoder input: each sequence ``[proj_in(its codes) ; mask_token for each patch row]``, packed,
        then ``ln_pre`` on every row -> [rows, W]."""
        projected = self.proj_in(codes)
        x = projected.new_empty(pack.rows, projected.shape[-1])
        x[pack.latent_rows] = projected
        x[pack.patch_rows] = self.mask_token.to(x.dtype).expand(len(pack.patch_rows), -1)
        return self.ln_pre(x)

    @inference
    def table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ln_pre(proj_in(code)) for every code [K, W], ln_pre(mask_token) [W])``, rebuilt when weights change
        (made anew at every call where the table does not stand for the modules: :meth:`table_stands_in`)."""
        key = None
        if self.table_stands_in():
            params = (self.proj_in.weight, self.proj_in.bias, self.ln_pre.weight, self.ln_pre.bias, self.mask_token)
            key = tuple(None if p is None else fp8.tensor_key(p) for p in params)
        if key is None or self._table is None or self._table[0] != key:
            codes = self.runtime.fsq.indices_to_codes(torch.arange(self.runtime.fsq.codebook_size, device=self.device))
            table = self.ln_pre(self.proj_in(codes.to(self.input_weight().dtype)))
            mask_row = self.ln_pre(self.mask_token)[0]
            self._table = (key, table, mask_row)
        return self._table[1], self._table[2]

    def rows(self, x: torch.Tensor, pack: Packing, cache: PackingCache | None = None) -> torch.Tensor:
        """Packed decoder input [rows, W] -> layers (the last for patch rows only) -> proj_out: [sum G, 768]."""
        backend = self.runtime.runner(self.device)
        return self.proj_out(run_layers(self.model_layers, x, pack, "patch", backend, cache or self.runtime.packings))

    def videos(self, rows: torch.Tensor, pack: Packing, shapes: list) -> list[torch.Tensor]:
        """Output patch rows [sum G, 768] -> one [3, T, H, W] per pixel shape."""
        return [
            unpatchify(rows[s:e], shape, self.config.patch_size)
            for (s, e), shape in zip(pack.patch_bounds, shapes, strict=True)
        ]

    @inference
    def decode_packed(
        self, indices: torch.Tensor, pack: Packing, cache: PackingCache | None = None, table: tuple | None = None
    ) -> torch.Tensor:
        """indices [sum n] (any integer dtype, any stride) -> output patch rows [sum G, 768] (model dtype).
        ``cache``: where the RoPE tables come from (default the model's own); ``table``: the pair :meth:`table`
        gives, or a copy of it (default the model's own)."""
        if table is None and not self.table_stands_in():
            codes = self.runtime.fsq.indices_to_codes(indices.long()).to(self.input_weight().dtype)
            return self.rows(self.sequence(codes, pack), pack, cache)
        if indices.dtype not in (torch.int32, torch.int64):
            indices = indices.long()  # token files store int16; the gather kernel reads int32/int64 (any stride)
        table, mask_row = table or self.table()
        x = self.runtime.runner(self.device).decoder_input(indices, table, mask_row, pack)
        return self.rows(x, pack, cache)

    @inference
    def decode_static(
        self, indices: torch.Tensor, batch: StaticBatch, table: torch.Tensor, mask_row: torch.Tensor
    ) -> torch.Tensor:
        """indices [rows] (any valid index on non-latent rows) and ``table()`` -> output rows [rows, 768]; only
        patch rows are meaningful."""
        x = torch.where(batch.is_latent[:, None], table[indices.long()], mask_row)
        backend = self.runtime.runner(self.device)
        return self.proj_out(run_layers_static(self.model_layers, x, batch, backend))


# modules and parameters registered on any module (set as attributes, e.g. a submodule replaced), counted by
# torch's global registration hooks: TiTok.parameter_addresses finds its parameters' modules again when it changes
_registrations = [0]


def _count_registration(*_) -> None:
    _registrations[0] += 1


nn.modules.module.register_module_module_registration_hook(_count_registration)
nn.modules.module.register_module_parameter_registration_hook(_count_registration)


class TiTok(nn.Module):
    """TiTok-Video tokenizer. ``state_dict()`` keys and shapes are exactly upstream's.

    Args:
        config: a preset name (``"v1"``, ``"tiny"``), an upstream YAML path, an OmegaConf config or a dict.
        backend: ``"auto"`` (Triton when the weights are on CUDA, PyTorch otherwise, decided at every call),
            ``"torch"`` or ``"triton"``. The oracle is :class:`titok_fast.reference.ReferenceTiTok`.
        precision: ``"default"`` (every matmul in the model's dtype) or ``"fp8"``: the decoder's transformer
            Linears in float8 with fine-grained scales; the encoder, and so the tokens, as in the default
            (:mod:`titok_fast.fp8`; settable, opt in).
    """

    def __init__(self, config: object = "v1", backend: str = "auto", precision: str = "default"):
        super().__init__()
        self._generation = 0  # see generation
        self._parameter_slots: tuple[int, list] = (-1, [])  # (_registrations, (module's parameters, name) pairs)
        self.config = TiTokConfig.from_any(config)
        from .loading import check_config  # (here: loading imports this module)

        check_config(self.config)  # what loading refuses (inexact FSQ levels, codebooks past int16, ...) refused here
        self.quantize = FSQ(self.config.fsq_levels)
        self._runtime = Runtime(backend, self.quantize)
        self.encoder = Encoder(self.config, self._runtime)
        self.decoder = Decoder(self.config, self._runtime)
        self._digest: tuple | None = None  # (the weights' identity when it was set, the digest): weights_digest
        self.weights_source = ""  # the checkpoint path the weights came from, set by load_tokenizer
        self._weights_ema: bool | None = None  # whether those are a checkpoint's EMA weights (None: not known)
        self.precision = precision

    @property
    def precision(self) -> str:
        """``"default"`` or ``"fp8"`` (settable; parameters and ``state_dict`` stay as they are)."""
        return fp8.precision_of(self)

    @precision.setter
    def precision(self, value: str) -> None:
        fp8.set_precision(self, value)

    @property
    def weights_digest(self) -> str | None:
        """Names the weights in token files (set by the loaders; ``encode_files`` works it out where it is None).
        None again once the weights change (``load_state_dict``, in-place writes, replaced parameters,
        :meth:`weights_changed`), so token files never name weights that did not make them; ``to()``, a precision
        switch and a copy keep it (the same weights), except a cast back to a dtype that holds more than one the
        weights were rounded to since (``to(bfloat16)`` then ``to(float32)``, of the model, its encoder or its
        decoder: no longer the named weights in float32). Parameters made under ``torch.inference_mode()`` have no
        version counter, and a cast of a module inside the encoder or decoder (``model.decoder.proj_out.half()``)
        is not seen: after writing to them in place (``load_state_dict`` without ``assign``), or such a cast, call
        :meth:`weights_changed`."""
        found = self._digest
        if found is not None and (
            found[0] != self._weights_identity() or not _kept_values(found[2], self._runtime.dtypes, self._dtypes())
        ):
            self._digest = found = None
        return None if found is None else found[1]

    @weights_digest.setter
    def weights_digest(self, value: str | None) -> None:
        dtypes = self._dtypes()
        self._runtime.dtypes = {name: {dtype} for name, dtype in dtypes.items()}
        self._digest = None if value is None else (self._weights_identity(), value, dtypes)

    def _dtypes(self) -> dict[str, torch.dtype]:
        """Each parameter's dtype, by name."""
        return {name: p.dtype for name, p in self.named_parameters()}

    def __getstate__(self) -> dict:  # copied or pickled: the digest of the weights as they are, set on the copy's
        state = self.__dict__.copy()  # (with the dtypes it named; the runtime holds those the weights had since)
        digest = self.weights_digest
        state["_digest"] = None if digest is None else (digest, self._digest[2])
        return state

    def __setstate__(self, state: dict) -> None:
        digest = state.pop("_digest", None)
        super().__setstate__(state)
        self._digest = None
        if not isinstance(getattr(self._runtime, "dtypes", None), dict):  # (pickled by an earlier version)
            self._runtime.dtypes = {name: {dtype} for name, dtype in self._dtypes().items()}
        if isinstance(digest, str):  # (likewise: the digest alone, of the weights as they were)
            digest = (digest, self._dtypes())
        if digest is not None:
            self._digest = (self._weights_identity(), *digest)

    def _weights_identity(self) -> tuple:
        """Each parameter object and its version counter (not its memory, dtype or device: ``to()`` keeps them)."""
        return tuple((fp8.Identity(t := held[name]), fp8.version(t)) for held, name in self._parameter_holders())

    def weights_changed(self) -> None:
        """Rebuild what is derived from the weights (the decoder's code table, the FP8 weight copies) at its next
        use. Changes made the usual ways (``load_state_dict``, in-place operations on the parameters, optimiser
        steps, ``to()``) are seen without this; writes through ``parameter.data``, and in place to parameters made
        under ``torch.inference_mode()``, bypass the version counter that tells, so call it after them. Engines
        built on the model follow at their next batch."""
        self.decoder._table = None
        fp8.forget(self)
        self._digest = None

    @property
    def generation(self) -> int:
        """A count that changes when the model's modules are replaced (a precision switch): what was built on the
        old ones (an engine's fixed-shape runners) is stale."""
        return self._generation

    def parameter_addresses(self) -> tuple[int, ...]:
        """Where each parameter's data lives now: it changes when a parameter is replaced or moved (``to()``,
        ``half()``, ``load_state_dict(..., assign=True)``, on the model or a submodule, ``parameter.data = ...``),
        not when it is written in place. What reads the parameters by address (CUDA graphs) is stale when it
        changes. Cheap enough to check at every call (V1: 194 parameters, 30-70 us)."""
        return tuple(held[name].data_ptr() for held, name in self._parameter_holders())

    def _parameter_holders(self) -> list:
        """(a module's ``_parameters``, name) of every parameter, found again after a registration anywhere."""
        seen = _registrations[0]  # read first: a registration during the walk is seen at the next call
        if self._parameter_slots[0] != seen:  # the modules holding them, found again after a change
            found = [(m._parameters, n) for m in self.modules() for n, p in m._parameters.items() if p is not None]
            self._parameter_slots = (seen, found)
        return self._parameter_slots[1]

    @property
    def backend(self) -> str:
        """The backend choice: ``"auto"``, ``"torch"`` or ``"triton"`` (settable)."""
        return self._runtime.choice

    @backend.setter
    def backend(self, value: str) -> None:
        self._runtime.choice = check_backend(value)

    @property
    def active_backend(self) -> Backend:
        """The backend a call runs on now, for the weights' current device (``.name``: ``"torch"``/``"triton"``)."""
        return self._runtime.backend(self.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.input_weight().dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.input_weight().device

    # ----------------------------------------------------------------------------------------------- public API
    @inference
    def encode(self, x: list[torch.Tensor], token_counts: list[int]) -> tuple[torch.Tensor, dict]:
        """x (upstream's name): videos, a list of [3, T, H, W] in [-1, 1]; token_counts: one int >= 1 per video.

        Returns ``(codes [sum n, D] model dtype, {"indices": tuple of int32 [n_i]})``. With forward hooks on
        ``encoder`` or ``quantize`` (or global ones), as upstream: ``quantize(encoder(x, token_counts))``, each
        module called, its hooks with it; otherwise the same numbers, with the encoder's head fused.
        """
        if not (plain_module(self.encoder) and plain_module(self.quantize)):
            codes, result = self.quantize(self.encoder(x, token_counts))
            counts = [int(n) for n in token_counts]
            return codes, {**result, "indices": tuple(i.clone() for i in result["indices"].split(counts))}
        patches, pack = self.encoder.prepare(x, token_counts)
        codes, indices = self.encode_packed(patches, pack)
        return codes, {"indices": tuple(i.clone() for i in indices.split(list(pack.token_counts)))}

    @inference
    def decode(self, x: torch.Tensor, token_counts: list[int], grids: list) -> list[torch.Tensor]:
        """x (upstream's name): codes [sum n, D]; grids: pixel shapes (T, H, W) per video. Returns [3, T, H, W]
        each, not clamped."""
        return self.decoder(x, token_counts, grids)

    @inference
    def decode_indices(self, indices, grids: list, token_counts: list[int] | None = None) -> list[torch.Tensor]:
        """Upstream's ``decode_indices(indices, grids)``. indices: the tuple/list that ``encode`` returns (one int
        tensor [n_i] per video), one packed tensor [sum n] with ``token_counts``, or one [videos, n] tensor (a row
        a video); grids: pixel shapes (T, H, W).

        As a convenience, ``decode_indices(packed, token_counts, grids)`` (the order of ``decode``) is recognised
        too (see :func:`upstream_argument_order`)."""
        grids, token_counts = upstream_argument_order(grids, token_counts)
        packed, counts = self.pack_indices(indices, token_counts)
        shapes = check_grids(grids, len(counts), self.config.patch_size)
        if not plain_module(self.decoder):  # hooks on the decoder: upstream's codes, then the module called
            codes = self.quantize.indices_to_codes(packed.long()).to(self.decoder.input_weight().dtype)
            return self.decoder(codes, counts, shapes)
        pack = self.decoder.packing(counts, shapes)
        return self.videos_from_rows(self.decode_packed(packed.to(self.device), pack), pack, shapes)

    @inference
    def forward(self, x: list[torch.Tensor], token_counts: list[int]) -> tuple[list[torch.Tensor], dict]:
        """Encode then decode the videos ``x``: ``(reconstructions, {"indices": ...})``."""
        codes, result = self.encode(x, token_counts)
        shapes = [tuple(v.shape[1:]) for v in x]
        return self.decode(codes, token_counts, shapes), result

    # ------------------------------------------------------------------------ packed API (used by the engine)
    def pack_indices(self, indices, token_counts: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Checked indices -> (packed [sum n] on their own device, token counts). ``indices``: a tuple/list of
        per-video integer tensors, one packed tensor with ``token_counts``, or one [videos, n] tensor (a sampler's
        output: each row a video's n indices)."""
        k = self.config.codebook_size
        if isinstance(indices, torch.Tensor) and indices.dim() == 2:
            indices = tuple(indices)
        if isinstance(indices, torch.Tensor):
            if indices.dim() != 1:
                raise ValueError(f"indices has shape {list(indices.shape)}; expected one packed [sum n] tensor (with "
                                 "token_counts=), one [videos, n] tensor or a tuple of [n_i] tensors")  # fmt: skip
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
            check_clip_indices(idx, k, f"indices of video {i}")
            if idx.device != indices[0].device:
                raise ValueError(f"indices of video {i} are on {idx.device} but video 0's on {indices[0].device}")
        counts = check_token_counts([int(i.numel()) for i in indices], None, name="the indices of video {}".format)
        if token_counts is not None and check_token_counts(token_counts, len(indices)) != counts:
            raise ValueError(f"token_counts {list(token_counts)} do not match the index lengths {counts}")
        return torch.cat([i.long() for i in indices]), counts

    def packing(self, token_counts: list[int], grids: list[tuple[int, int, int]]) -> Packing:
        """The (cached) packed layout for token counts and *patch* grids, on the model's device."""
        return self._runtime.packings.packing(token_counts, grids, self.device)

    def rope_tables(self, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin [P >= num_positions, 32] on the model's device (computed in float64, cached)."""
        return self._runtime.packings.tables(num_positions, self.device)

    def fsq_constants(self) -> FsqConstants:
        """The FSQ constants on the model's device (cached: call before tracing so no trace fills the cache)."""
        return self.quantize.constants(self.device)

    def encode_packed(
        self, patches: torch.Tensor, pack: Packing, cache: PackingCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """patches [sum G, 768] (model dtype) -> (codes [sum n, D], indices int32 [sum n]). ``cache``: the
        :class:`PackingCache` the RoPE tables are read from, by default the model's own (one whose tables stay put
        for a CUDA graph of this call: the engine's)."""
        return self.encoder.encode_packed(patches, pack, cache)

    def decode_packed(
        self, indices: torch.Tensor, pack: Packing, cache: PackingCache | None = None, table: tuple | None = None
    ) -> torch.Tensor:
        """indices [sum n] -> output patch rows [sum G, 768] (model dtype). ``cache`` as for :meth:`encode_packed`;
        ``table``: :meth:`decoder_table`'s pair or a copy of it (a graph's, refilled in place when weights change),
        by default the model's own."""
        return self.decoder.decode_packed(indices, pack, cache, table)

    def videos_from_rows(self, rows: torch.Tensor, pack: Packing, shapes: list) -> list[torch.Tensor]:
        """Output patch rows [sum G, 768] of ``pack`` -> one [3, T, H, W] per pixel shape."""
        return self.decoder.videos(rows, pack, shapes)

    def decoder_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ln_pre(proj_in(code)) for every code [K, W], ln_pre(mask_token) [W])``, rebuilt when weights change."""
        return self.decoder.table()

    def encode_static(self, patch_rows: torch.Tensor, batch: StaticBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed-shape encode for the engine: patch_rows [rows, 768] (anything on latent and padding rows) ->
        (codes [rows, D], indices int32 [rows]); only latent rows are meaningful. Every layer runs on every row,
        so shapes never depend on the batch contents (torch.compile, CUDA graphs)."""
        return self.encoder.encode_static(patch_rows, batch)

    def decode_static(
        self, indices: torch.Tensor, batch: StaticBatch, table: torch.Tensor, mask_row: torch.Tensor
    ) -> torch.Tensor:
        """Fixed-shape decode for the engine: indices [rows] (any valid index on non-latent rows) and
        ``decoder_table()`` -> output rows [rows, 768]; only patch rows are meaningful."""
        return self.decoder.decode_static(indices, batch, table, mask_row)
