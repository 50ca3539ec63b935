"""FP8 linear layers, opt in (``precision="fp8"``): the decoder's transformer GEMMs in float8 e4m3, bf16 elsewhere.

What runs in FP8: the four bias-free Linears of every decoder layer (``to_qkv``, ``out_proj`` and the FFN's two),
which hold nearly all of its matrix FLOPs. The decoder's ``proj_in`` / ``proj_out``, its norms and attention stay
in the model's dtype, and so does the whole encoder: tokens are never made in FP8. Measured on an H200 (V1, batch
32, benchmarks/RESULTS.md), an FP8 encoder ran no faster than bf16 (1.00x) and kept 68% of the float32 oracle's
tokens against bf16's 96%, while the FP8 decoder ran 1.19x bf16: FP8 buys decoding speed, and costs token
fidelity for nothing. So a model in precision ``"fp8"`` encodes exactly as in ``"default"``, and token files do
not record it.

Scales are fine-grained: one float32 scale per activation row (token) computed at each call, and one per output
channel of the weight, so an outlier costs precision only in its own row or channel. A product is
``(x_q @ w_q.T) * s_x * s_w.T``: fp8 x fp8 products accumulated in float32, the scales applied to the
accumulator (on CUDA: ``torch._scaled_mm`` with row-wise scales and exact accumulation; elsewhere the same
arithmetic emulated in float32, which is how CPUs check the numerics). Activations are quantised by one fused
Triton pass on CUDA (``kernels/fp8_quant.py``), by its PyTorch reference elsewhere: the same bits. The triton
backend goes further (``backends.py``): it hands a layer's Linears the codes and scales that the kernel making
their input writes instead of 16-bit rows (:meth:`Fp8Linear.of_codes`): ``layer_norm_rows_fp8`` for ``to_qkv`` and
the FFN's first Linear, ``gated_gelu(..., fp8=True)`` for its second; ``out_proj`` quantises the attention's
output itself.

The fp8 weights are a cache beside the parameters (never in ``state_dict``), requantised when a weight changes,
in place where the shape allows: CUDA graphs and compiled graphs read the cache, and the engine calls
:func:`refresh` before each replay so new weights reach them. Inside a ``torch.compile`` trace the cache is read
as it is (it must be filled first: :func:`refresh`).

Where FP8 runs natively (:func:`check_fp8_runs`): CUDA GPUs of compute capability 8.9 or newer (Ada, Hopper),
with bf16 activations, the combination ``torch._scaled_mm`` supports with row-wise scales.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from titok_fast.kernels.fp8_quant import quantize_rows_fp8_ref

PRECISIONS = ("default", "fp8")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_q float8 e4m3 [M, K], scale float32 [M, 1]) with x ~= x_q * scale; each row's largest
    magnitude maps to 448. An all-zero row gets scale 1 (its codes are zeros). On CUDA one fused Triton pass
    (``kernels/fp8_quant.py``, a custom op), elsewhere its PyTorch reference: the same bits."""
    if x.is_cuda:
        from .ops import quantize_rows_fp8_op

        return quantize_rows_fp8_op(x.contiguous())
    return quantize_rows_fp8_ref(x)


def fp8_matmul(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """(x_q [M, K] @ w_q [N, K].T) * x_scale [M, 1] * w_scale [N, 1].T -> [M, N] in ``out_dtype``."""
    if x_q.is_cuda:  # row-wise scales: bf16 output only (other dtypes are cast from it)
        out = torch._scaled_mm(
            x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16, use_fast_accum=False
        )
        return out.to(out_dtype)
    acc = x_q.float() @ w_q.float().t()  # each fp8 x fp8 product is exact in float32; sums round as on the GPU
    return (acc * x_scale * w_scale.t()).to(out_dtype)


def _sharing_parameters(cls: type[nn.Linear], linear: nn.Linear) -> nn.Linear:
    """A ``cls`` holding ``linear``'s parameters themselves (shared, not copied)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.in_features, new.out_features = linear.in_features, linear.out_features
    new.weight, new.bias = linear.weight, linear.bias
    return new


_QUANTISING = threading.Lock()  # held while a layer's FP8 weight cache is checked and filled


@contextlib.contextmanager
def outside_inference_mode() -> Iterator[None]:
    """Where tensors kept across calls and refilled in place are made (FP8 weight copies, an engine's buffers):
    outside inference mode, since made inside it they could not be refilled by a later call outside it, and
    without autograd (leaving inference mode turns grad mode on)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` computing in FP8 (module header); same parameters and ``state_dict`` as the Linear."""

    _fp8_weight: tuple | None = None  # (weight key, w_q, scale)

    def __getstate__(self) -> dict:
        """Without the FP8 weight, derived from the weight and made again at the first use: a copy or pickle of a
        model that had run (torch's plain pickling of float8 tensors fails: Ray's and spawned workers' too)."""
        state = dict(super().__getstate__())
        state.pop("_fp8_weight", None)
        return state

    @classmethod
    def of(cls, linear: nn.Linear) -> Fp8Linear:
        """An FP8 view of ``linear``: its parameters themselves, shared."""
        return _sharing_parameters(cls, linear)

    def fp8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_q float8 [N, K], scale float32 [N, 1]), requantised when the weight changed: into the same tensors
        when their shape and device still fit, so graphs that read them by address see the new weights."""
        cache = self._fp8_weight
        if torch.compiler.is_compiling():  # a trace reads the cache; the engine refreshes it before every run
            if cache is None:
                raise RuntimeError("FP8 weights are quantised before tracing: call titok_fast.fp8.refresh(model)")
            return cache[1], cache[2]
        w = self._parameters["weight"]  # not self.weight: nn.Module's attribute fallback costs more than the check
        key = tensor_key(w)
        if cache is None or cache[0] != key:
            # threads: one quantises, into the tensors a graph may read (requantised in place by later calls)
            with _QUANTISING, outside_inference_mode():
                if (cache := self._fp8_weight) is None or cache[0] != key:
                    w_q, scale = quantize_rows(w)
                    if cache is not None and cache[1].shape == w_q.shape and cache[1].device == w_q.device:
                        w_q, scale = cache[1].copy_(w_q), cache[2].copy_(scale)
                    cache = self._fp8_weight = (key, w_q, scale)
        return cache[1], cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q, x_scale = quantize_rows(x.reshape(-1, self.in_features))
        return self.of_codes(x_q, x_scale, x.dtype).reshape(*x.shape[:-1], self.out_features)

    def of_codes(self, x_q: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The layer of activations already quantised (:func:`quantize_rows`' codes [M, K] and scales [M, 1], as a
        kernel that makes the activations may give them): [M, out_features] in ``dtype``."""
        w_q, w_scale = self.fp8_weight()
        out = fp8_matmul(x_q, x_scale, w_q, w_scale, dtype)
        return out + self.bias if self.bias is not None else out


def tensor_key(t: torch.Tensor) -> tuple:
    """What tells that a tensor changed: which tensor it is, its memory, version counter, dtype and device (its
    memory alone may be a freed tensor's: a new one there starts at version 0 too). Inference tensors (made under
    ``torch.inference_mode()``) have no version counter: writes to them in place are seen only through
    ``TiTok.weights_changed()``."""
    return (Identity(t), t.data_ptr(), version(t), t.dtype, t.device)


def _nothing() -> None:
    return None


def version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version


class Identity:
    """A tensor in a key: equal only to the same tensor object, while it lives. A copy (a model copied or pickled
    with its caches) names no tensor: equal to none, so what the caches hold is made again."""

    __slots__ = ("ref",)

    def __init__(self, t: torch.Tensor | None = None):
        self.ref = weakref.ref(t) if t is not None else _nothing

    def __reduce__(self):
        return Identity, ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Identity) and (t := self.ref()) is not None and t is other.ref()

    def __hash__(self) -> int:
        return id(self.ref())


def layer_linears(layers: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, name) of the four bias-free Linears of every layer of a ``model_layers`` stack."""
    found = []
    for attn, ffn in zip(layers.attn_layer, layers.ffd_layer, strict=True):
        found += [(attn, "to_qkv"), (attn, "out_proj"), (ffn, "1"), (ffn, "4")]
    return found


def model_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, name) of the Linears that precision ``"fp8"`` runs in FP8: the four bias-free Linears of every
    layer of ``model.decoder`` (the encoder never: module header)."""
    return layer_linears(model.decoder.model_layers)


def check_precision(precision: object) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a one-line ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    return precision


def set_precision(model: nn.Module, precision: str) -> None:
    """Switch the decoder layers' Linears (:func:`model_linears`) to FP8 (``"fp8"``) or back (``"default"``), in
    place; parameters and ``state_dict`` are unchanged."""
    wanted = Fp8Linear if check_precision(precision) == "fp8" else nn.Linear
    switched, replaced = [], False
    for parent, name in model_linears(model):
        linear = getattr(parent, name)
        if type(linear) is not wanted:
            linear, replaced = _sharing_parameters(wanted, linear), True
            setattr(parent, name, linear)
        switched.append(linear)
    if replaced and hasattr(model, "_generation"):  # TiTok.generation: runners built on the old modules are stale
        model._generation += 1
    # what precision_of and refresh read: the made_with of every resumed file and every batch would otherwise walk
    # all of the model's layers (110 us for V1)
    model._fp8_linears = switched if precision == "fp8" else []


def precision_of(model: nn.Module) -> str:
    """``"fp8"`` when :func:`set_precision` switched the decoder layers' Linears to FP8, else ``"default"``."""
    return "fp8" if getattr(model, "_fp8_linears", None) else "default"


def refresh(model: nn.Module) -> None:
    """Requantise the FP8 weights whose parameters changed (in place, see the module header), of the Linears that
    :func:`set_precision` switched; nothing to do in the default precision. Call before tracing or replaying a
    graph of the model."""
    for linear in getattr(model, "_fp8_linears", ()):
        linear.fp8_weight()


def forget(model: nn.Module) -> None:
    """Mark every FP8 weight of ``model`` stale: each is requantised at its next use, into the same tensors
    (graphs keep reading them). For weight writes the parameters' version counter does not see (``.data``)."""
    for linear in getattr(model, "_fp8_linears", ()):
        if linear._fp8_weight is not None:
            linear._fp8_weight = (None, *linear._fp8_weight[1:])


def check_fp8_runs(device: torch.device | str, dtype: torch.dtype) -> None:
    """A one-line ValueError unless FP8 GEMMs run natively on ``device`` for a model in ``dtype``: a CUDA GPU of
    compute capability 8.9+ and bfloat16 (elsewhere FP8 is only emulated, slower than the default precision)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"precision fp8 needs a CUDA GPU of compute capability 8.9 or newer; the model is on {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(
            f"precision fp8 needs a CUDA GPU of compute capability 8.9 or newer; {device} has "
            f"{capability[0]}.{capability[1]}"
        )
    if dtype != torch.bfloat16:
        raise ValueError(f"precision fp8 runs with bf16 activations (dtype bf16); the model is {dtype}")
