"""Loading weights without ever executing code from the file.

- Upstream Lightning ``.ckpt`` (a torch zip archive): read by our own restricted unpickler. Tensors are rebuilt
  from the archive's raw storages by our code; every other class the pickle names (OmegaConf configs, optimiser
  state objects, anything at all) becomes an inert placeholder, so no constructor or ``__reduce__`` callable
  from the file ever runs. Only the tensors we need are read from disk.
- Our ``.safetensors``: weights plus the model config as metadata, so later loads need no config argument.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import TiTokConfig
from .layers import perturb_norms
from .model import TiTok

METADATA_KEY = "titok_fast"
FORMAT_VERSION = 1

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model."""


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype


@dataclass(frozen=True)
class _TensorRef:
    """A tensor in the archive, not yet read: storage, offset, size, stride (in elements)."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class Placeholder:
    """Stands in for any object the pickle names that is not a tensor or a plain container; runs nothing."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<placeholder for {self.qualname}>"


def _rebuild_tensor(storage, offset, size, stride, *_unused):
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_unused):
    return data


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        return type(f"Placeholder_{name}", (Placeholder,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise CheckpointError(f"unsupported storage reference {pid!r} in the checkpoint")
        return _StorageRef(key=str(pid[2]), dtype=pid[1])


class _Archive:
    """A torch zip checkpoint opened for lazy tensor reads."""

    def __init__(self, path: Path):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path} is not a torch zip checkpoint (legacy torch.save format or not a checkpoint at all)"
            )
        self.zip = zipfile.ZipFile(path)
        pickles = [n for n in self.zip.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        self.prefix = pickles[0][: -len("data.pkl")]
        byteorder = self.prefix + "byteorder"
        if byteorder in self.zip.namelist() and self.zip.read(byteorder).decode() != "little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        with self.zip.open(pickles[0]) as f:
            try:
                self.root = _RestrictedUnpickler(f, self.zip, self.prefix).load()
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read the checkpoint's pickle ({e})") from e
        self.path = path
        self._storages: dict[str, torch.Tensor] = {}

    def tensor(self, ref: _TensorRef) -> torch.Tensor:
        key = ref.storage.key
        if key not in self._storages:
            data = bytearray(self.zip.read(f"{self.prefix}data/{key}"))
            self._storages[key] = torch.frombuffer(data, dtype=ref.storage.dtype) if data else torch.empty(0)
        flat = self._storages[key]
        return flat.as_strided(ref.size, ref.stride, ref.offset).clone()


def _select_state(root: object, path: Path, use_ema: bool) -> tuple[dict, str]:
    """The model's tensors (still references) from a Lightning checkpoint or a bare state_dict."""
    state = root.get("state_dict", root) if isinstance(root, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no state_dict found (top level is {type(root).__name__})")
    prefixes = ["ema_model.", "model."] if use_ema else ["model."]
    for prefix in [*prefixes, ""]:
        picked = {}
        for key, value in state.items():
            if not isinstance(key, str) or not key.startswith(prefix):
                continue
            name = key[len(prefix) :]
            for wrapper in ("module.", "_orig_mod."):  # DataParallel/EMA wrappers, torch.compile
                name = name[len(wrapper) :] if name.startswith(wrapper) else name
            if name.startswith(("encoder.", "decoder.")):
                picked[name] = value
        if picked:
            return picked, prefix
    raise CheckpointError(f"{path}: no encoder./decoder. tensors under the prefixes {prefixes} or at top level")


def _check_and_fill(model: TiTok, tensors: dict, path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]} ({len(missing)} missing in all)")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]}; does the config match the checkpoint?")
    for key, ref in tensors.items():
        size = (
            tuple(ref.size)
            if isinstance(ref, _TensorRef)
            else tuple(ref.shape)
            if isinstance(ref, torch.Tensor)
            else None
        )
        if size is None:
            raise CheckpointError(f"{path}: entry {key} is a {type(ref).__name__}, not a tensor")
        size = tuple(ref.size) if isinstance(ref, _TensorRef) else tuple(ref.shape)
        if size != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: tensor {key} has shape {list(size)}, expected {list(expected[key].shape)} "
                f"for config {model.config.name!r}"
            )


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and float32 values of the tensors, in key order (first 16 hex digits)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{list(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def read_safetensors_metadata(path: str | os.PathLike) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        return {}
    try:
        return json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({e})") from e


def load_state(
    path: str | os.PathLike, config: object | None = None, use_ema: bool = True
) -> tuple[TiTokConfig, dict[str, torch.Tensor], str]:
    """Read (config, state_dict, weights digest) from a Lightning ``.ckpt`` or our ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        meta = read_safetensors_metadata(path)
        cfg = TiTokConfig.from_any(config if config is not None else meta.get("config", "v1"))
        shell = TiTok(cfg, backend="torch")
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        _check_and_fill(shell, tensors, path)
        return cfg, tensors, meta.get("weights_digest") or weights_digest(tensors)
    archive = _Archive(path)
    refs, _prefix = _select_state(archive.root, path, use_ema)
    cfg = TiTokConfig.from_any(config if config is not None else "v1")
    with torch.device("meta"):
        shell = TiTok(cfg, backend="torch")
    _check_and_fill(shell, refs, path)
    tensors = {}
    for key, ref in refs.items():
        try:
            tensors[key] = archive.tensor(ref) if isinstance(ref, _TensorRef) else ref
        except (KeyError, RuntimeError, ValueError) as e:  # missing storage record, sizes past its end, ...
            raise CheckpointError(f"{path}: tensor {key} cannot be read from the archive ({e})") from e
    return cfg, tensors, weights_digest(tensors)


def load_tokenizer(
    path: str | os.PathLike,
    config: object | None = None,
    use_ema: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> TiTok:
    """Load a TiTok model from an upstream Lightning ``.ckpt`` or a titok-fast ``.safetensors``.

    ``config`` defaults to the one stored in a ``.safetensors`` file, else ``"v1"``. EMA weights are preferred
    when present and ``use_ema``. Strict: a missing, unexpected or misshaped tensor is an error naming it.
    """
    cfg, tensors, digest = load_state(path, config, use_ema)
    with torch.device("meta"):
        model = TiTok(cfg, backend=backend)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.weights_digest = digest
    model.weights_source = str(Path(path).resolve())
    return model.to(device=device, dtype=dtype).eval()


def random_tokenizer(
    config: object = "tiny",
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> TiTok:
    """A model with reproducible random weights (``perturb_norms`` applied), for demos and tests. Its digest
    starts with ``random-seed<seed>-`` so token files made with it can be decoded by rebuilding it."""
    torch.manual_seed(seed)
    model = TiTok(config, backend=backend).eval()
    perturb_norms(model)
    model.weights_digest = f"random-seed{seed}-{weights_digest(model.state_dict())}"
    return model.to(device=device, dtype=dtype)


def save_safetensors(model: TiTok, path: str | os.PathLike, **extra: object) -> None:
    """Write the model's weights with its config (and ``extra`` fields) as metadata, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format_version": FORMAT_VERSION, "config": model.config.to_dict(), "weights_digest": weights_digest(state)}
    meta.update(extra)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, path)


def convert(src: str | os.PathLike, dst: str | os.PathLike, config: object | None = None, use_ema: bool = True) -> str:
    """Upstream ``.ckpt`` -> ``.safetensors`` with the config as metadata; returns the weights digest."""
    model = load_tokenizer(src, config=config, use_ema=use_ema, backend="torch")
    save_safetensors(model, dst, source=os.path.basename(str(src)), ema=use_ema)
    return model.weights_digest
