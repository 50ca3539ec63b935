"""Loading weights without ever executing code from the file.

- Upstream Lightning ``.ckpt`` (a torch zip archive): read by our own restricted unpickler. Tensors are rebuilt
  from the archive's raw storages by our code; every other class the pickle names (OmegaConf configs, optimiser
  state objects, anything at all) becomes an inert placeholder, so no constructor or ``__reduce__`` callable
  from the file ever runs. Only the tensors we need are read from disk.
- Our ``.safetensors``: weights plus the model config as metadata, so later loads need no config argument.
- A Hub repository id (see :mod:`titok_fast.hub`): fetched through ``huggingface_hub``, converted once into
  titok-fast's cache (keyed by the sha256 of the downloaded file), and loaded from there without unpickling.

Files from strangers are read within bounds: every size a file declares (storage records, tensor shapes, the
config's levels, patch size, grids and token range) is checked against the model's weight shapes and the limits
below before anything of that size is allocated, and a config in a file's metadata is only ever a JSON object,
never a path to open. A checkpoint's pickle is bounded in bytes and opcodes before it is unpickled, and in the
classes it names and the elements its calls copy while it is; model tensors must be floating point. Whatever else
goes wrong while reading a file is a one-line CheckpointError naming it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import re
import stat
import sys
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from . import hub
from .checks import MAX_GRID, MAX_TOKENS, is_integer
from .config import TiTokConfig
from .files import FORMAT_VERSION, MAX_SEED, METADATA_KEY, absolute, kind_of, notice, open_atomically
from .layers import perturb_norms
from .model import TiTok
from .tokens import MAX_CODEBOOK_SIZE
from .tokens import TENSORS as TOKEN_TENSORS

# Sane limits on what a config may ask for (V1 uses patch (4, 8, 8), levels (7, 7, 7, 5, 5), grid (20, 192, 192)
# and 128-1024 tokens): beyond them a file is refused before any table or buffer of that size exists.
MAX_PATCH = 64  # per axis
# Voxels per patch (16x V1's 4 * 8 * 8): proj_in and proj_out have 3 * volume * width weights each, so without a
# bound on the product a patch within MAX_PATCH per axis, e.g. (64, 64, 64), asks for billions of parameters.
MAX_PATCH_VOLUME = 4096
# A checkpoint's data.pkl holds only tensor records (their bytes are stored beside it), optimiser-state records and
# hyper-parameters: about 180 KiB and 54 thousand opcodes for V1 with EMA and Adam states, about 1 MiB and 320
# thousand for a model with ten times as many tensors. Beyond these bounds a pickle is refused before it is
# unpickled. Every opcode builds at most one object (a call may copy what it is given: those copies are bounded
# by MAX_PICKLE_OPCODES too, see _RestrictedUnpickler), so the opcode bound bounds the memory unpickling takes.
MAX_PICKLE_BYTES = 32 << 20
MAX_PICKLE_OPCODES = 2_000_000
MAX_PICKLE_CLASSES = 1024  # distinct classes a pickle may name (a Lightning checkpoint names a few dozen)
MAX_TENSOR_DIMS = 64  # per tensor record
# Entries of a checkpoint's zip archive: one per storage (a few thousand for V1 with EMA and optimiser states).
# Python's zipfile keeps every entry of the central directory in memory, about ten times its size on disk.
MAX_ARCHIVE_ENTRIES = 100_000
# zipfile reads the central directory by the size the end record declares, not by its count of entries: a 186 MB
# directory of 3 million entries declared as one took 2 GB. An entry there is 46 bytes and its name (torch's:
# <file stem, up to 255 bytes>/data/<key>): 512 bytes each is generous, and bounds zipfile's memory at ~0.5 GB.
MAX_ARCHIVE_DIRECTORY_BYTES = MAX_ARCHIVE_ENTRIES * 512
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # the ones zipfile inflates in bounded steps
# A .safetensors header lists its tensors (V1: 194 in 23 KB) beside the metadata (a few KiB; at most
# MAX_CHECKPOINT_METADATA_CHARS, checked before it is parsed); the safetensors library reads headers of up to 100 MB.
MAX_CHECKPOINT_METADATA_CHARS = 1 << 20
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20

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
# Model tensors must be one of these (a checkpoint may hold tensors of other types elsewhere, e.g. optimiser steps):
# a complex tensor would lose its imaginary part silently when cast, an integer one fails deep inside torch.
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_SAFETENSORS_FLOAT_DTYPES = ("F32", "F64", "F16", "BF16")  # the same, as safetensors headers name them


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model."""


def _one_line(error: BaseException) -> str:
    """An exception as one short line, for a CheckpointError's message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


@contextlib.contextmanager
def _reading(path: Path):
    """Any failure while reading `path` becomes a one-line CheckpointError naming it: a stranger's file can break
    a parser (zip, pickle, safetensors, torch) in ways no check here foresees."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read ({_one_line(e)})") from e


class _Frozen:
    """The unpickler's BUILD opcode would set a dataclass's fields behind its back (frozen or not), after
    _rebuild_tensor checked them: records the pickle builds refuse any state."""

    def __setstate__(self, state):
        raise CheckpointError(f"the pickle gives state to a {type(self).__name__[1:]}")


@dataclass(frozen=True)
class _StorageRef(_Frozen):
    key: str
    dtype: torch.dtype | str  # a str: the name of a storage type titok-fast does not read


@dataclass(frozen=True, eq=False)  # (hashed by identity: a key of records with colliding int offsets is not slow)
class _TensorRef(_Frozen):
    """A tensor in the archive, not yet read: storage, offset, size, stride (in elements)."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class Placeholder:
    """Stands in for any object the pickle names that is not a tensor or a plain container; runs nothing and keeps
    nothing it is given (the loader reads only tensors, and a placeholder keeping its arguments would let a pickle
    multiply its size by handing one big list to many calls)."""

    __slots__ = ()
    qualname = "?"

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def __repr__(self) -> str:
        return f"<placeholder for {self.qualname}>"


def _plain_ints(values) -> bool:
    return all(type(v) is int for v in values)  # not bool, float or a placeholder


def _rebuild_tensor(storage, offset, size, stride, *_unused):
    """A tensor record: its fields come from the file, so each is checked before anything is built from it (the
    lengths first: a record handing over a list of millions would otherwise be copied on every call)."""
    if not isinstance(storage, _StorageRef):
        raise CheckpointError(f"a tensor record's storage is not a storage reference (got {type(storage).__name__})")
    if not all(isinstance(v, (tuple, list)) for v in (size, stride)) or not len(size) == len(stride) <= MAX_TENSOR_DIMS:
        raise CheckpointError(
            f"a tensor record's size and stride must be sequences of one length, at most {MAX_TENSOR_DIMS}"
        )
    if not _plain_ints((offset, *size, *stride)):
        raise CheckpointError("a tensor record's offset, size and stride must be integers")
    return _TensorRef(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_unused):
    return data


_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}
# Containers a pickle builds by calling them with what they will hold: each call copies its argument, so the
# unpickler counts the elements it hands them (see _RestrictedUnpickler.copy).
_COPYING_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
}


def _check_opcodes(data: bytes) -> None:
    """Refuse a pickle of more than MAX_PICKLE_OPCODES opcodes, one that stores a memo entry far past the previous
    ones, or one whose dict or set keys could take long to hash, before it is unpickled. The C unpickler grows its
    memo table to twice the highest index stored, so a few bytes naming index 2**30 would take 16 GiB; a pickler
    numbers its entries 0, 1, 2, ... in order. Reading arguments here also checks every declared length against
    the bytes actually there. Keys: see :class:`_KeyCheck`."""
    stored = 0
    keys = _KeyCheck()
    for count, (opcode, arg, _pos) in enumerate(pickletools.genops(data), 1):
        if count > MAX_PICKLE_OPCODES:
            raise CheckpointError(f"its pickle has more than {MAX_PICKLE_OPCODES} opcodes")
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if arg > stored:
                raise CheckpointError(f"its pickle stores memo entry {arg} after only {stored} entries")
            stored += 1
        elif opcode.name == "MEMOIZE":
            stored += 1
        keys.step(opcode, arg)


MAX_KEY_WEIGHT = 256  # elements of a tuple used as a dict or set key, counted through its nested tuples
MAX_KEYS_OF_NUMBERS = 4096  # dict or set keys that are tuples or frozensets holding numbers, in all (_KeyCheck)
MAX_GLOBAL_NAME = 256  # characters of a module or class name a pickle names (each new one is copied into a class)
MAX_KEYS_WEIGHT = 4 * MAX_PICKLE_OPCODES  # of every key hashed while unpickling, together
COLLIDING_INT = (1 << 61) - 1  # Python hashes an int modulo this prime: its multiples all hash alike


class _Item:
    """What :class:`_KeyCheck` knows of an object the pickle builds: how long hashing it takes (``weight``, the
    elements a tuple's hash visits, through shared sub-tuples as often as they occur; None: it cannot be hashed
    quickly, or in many colliding copies), and for a list or tuple, its elements."""

    __slots__ = ("weight", "elements", "copies", "numbers")

    def __init__(self, weight: int | None = 1, elements: list | None = None, copies: str = "", numbers: int = 0):
        self.weight, self.elements = weight, elements
        self.copies = copies  # for a callable: "OrderedDict", or "set" (set, frozenset, or a name not followed)
        self.numbers = numbers  # NUMBER: a number; MADE_OF_NUMBERS: made from one (a tuple, a call's result)


NUMBER, MADE_OF_NUMBERS = 1, 2


def _made_of(items) -> int:
    """MADE_OF_NUMBERS where any of ``items`` (what :class:`_KeyCheck` knows of them) is a number or made from one,
    else 0: the ``numbers`` of what is made from them (a tuple's or frozenset's hash of numbers can be steered)."""
    return MADE_OF_NUMBERS if any(isinstance(item, _Item) and item.numbers for item in items) else 0


_NUMBERS = {"NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"}
_LITERALS = {"NONE", "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
             "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", *_NUMBERS}  # fmt: skip
_KEYED_OPCODES = {"SETITEM": 2, "SETITEMS": 2, "DICT": 2, "ADDITEMS": 1, "FROZENSET": 1}  # every 2nd / every item


class _KeyCheck:
    """Follows a pickle's stack, opcode by opcode (without building anything), to refuse keys whose hashing the
    unpickler would spend unbounded time on: a tuple built from one shared sub-tuple, twice per level, hashes in
    2**levels steps (40 levels: hours, in C, where no signal is handled), a tuple nested a million deep overflows
    the C stack, and ints that are multiples of 2**61 - 1 all hash alike (inserting n of them takes n**2 steps).
    And tuples (or frozensets) holding numbers: numbers hash the same in every process and each step of a tuple's
    hash can be undone, so a pickle can give every such key one hash (100k (int, int) keys, a 1.9 MB file: 98 s;
    strings hash by a key of the process's own): at most MAX_KEYS_OF_NUMBERS of them, a fraction of a second
    however they collide. A key may be a string, bytes, a number (an int below 2**61 - 1 in size), None, an
    object built by the pickle (hashed by its identity), or a tuple of these of at most MAX_KEY_WEIGHT elements in
    all; all keys together at most MAX_KEYS_WEIGHT. Checkpoints key their dicts by strings and small ints."""

    def __init__(self):
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}
        self.hashed = 0
        self.steerable = 0  # keys made of numbers (MADE_OF_NUMBERS)

    def key(self, item) -> None:
        weight = item.weight if isinstance(item, _Item) else None
        if weight is None or weight > MAX_KEY_WEIGHT:
            raise CheckpointError(
                "its pickle uses a dict or set key that would take long to hash (a tuple of more than "
                f"{MAX_KEY_WEIGHT} elements, nested tuples shared many times, or an int of 2**61 - 1 or more)"
            )
        self.steerable += item.numbers == MADE_OF_NUMBERS
        if self.steerable > MAX_KEYS_OF_NUMBERS:
            raise CheckpointError(f"its pickle uses more than {MAX_KEYS_OF_NUMBERS} dict or set keys that are tuples "
                                  "or frozensets holding numbers")  # fmt: skip
        self.hashed += weight
        if self.hashed > MAX_KEYS_WEIGHT:
            raise CheckpointError(f"its pickle hashes more than {MAX_KEYS_WEIGHT} key elements")

    def _pop_mark(self) -> list:
        if not self.marks:
            raise CheckpointError("its pickle is malformed (a mark is missing)")
        at = self.marks.pop()
        items, self.stack[at:] = self.stack[at:], []
        return items

    def _pop(self, count: int) -> list:
        if count > len(self.stack) - (self.marks[-1] if self.marks else 0):
            raise CheckpointError("its pickle is malformed (it takes more from its stack than it put there)")
        if not count:
            return []
        items, self.stack[-count:] = self.stack[-count:], []
        return items

    def step(self, opcode, arg) -> None:
        name, stack = opcode.name, self.stack
        if name in ("PROTO", "FRAME", "STOP"):
            return
        if name in _LITERALS:
            big = name in ("INT", "LONG", "LONG1", "LONG4") and isinstance(arg, int) and abs(arg) >= COLLIDING_INT
            stack.append(_Item(None if big else 1, numbers=NUMBER if name in _NUMBERS else 0))
        elif name == "MARK":
            self.marks.append(len(stack))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            if not stack:
                raise CheckpointError("its pickle is malformed (it stores an empty stack)")
            self.memo[len(self.memo) if name == "MEMOIZE" else arg] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in self.memo:
                raise CheckpointError(f"its pickle reads memo entry {arg}, never stored")
            stack.append(self.memo[arg])
        elif name == "DUP":
            stack.append(self._pop(1)[0])
            stack.append(stack[-1])
        elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
            n = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "EMPTY_TUPLE": 0}.get(name)
            elements = self._pop_mark() if n is None else self._pop(n)
            weights = [e.weight if isinstance(e, _Item) else None for e in elements]
            weight = None if None in weights else min(1 + sum(weights), MAX_KEYS_WEIGHT + 1)
            stack.append(_Item(weight, elements, numbers=_made_of(elements)))
        elif name in ("EMPTY_LIST", "LIST"):
            stack.append(_Item(None, self._pop_mark() if name == "LIST" else []))
        elif name in ("APPEND", "APPENDS"):
            added = self._pop_mark() if name == "APPENDS" else self._pop(1)
            target = self._pop(1)[0]
            if isinstance(target, _Item) and target.elements is not None and target.weight is None:  # a list
                target.elements.extend(added)
            stack.append(target)
        elif name in _KEYED_OPCODES:
            items = self._pop_mark() if name in ("SETITEMS", "DICT", "ADDITEMS", "FROZENSET") else self._pop(2)
            for item in items[:: _KEYED_OPCODES[name]]:
                self.key(item)
            if name in ("SETITEM", "SETITEMS", "ADDITEMS"):
                target = self._pop(1)[0]
                if name != "ADDITEMS" and isinstance(target, _Item) and target.elements is not None:  # a list's
                    target.elements.extend(items[1::2])  # items set by index: what a later set(list) would hash
                stack.append(target)
            else:
                stack.append(_Item(1 if name == "FROZENSET" else None, numbers=_made_of(items)))
        elif name == "BUILD":  # the object stays on the stack (its state is set, or ignored)
            self._pop(1)
            if not stack:
                raise CheckpointError("its pickle is malformed (it builds nothing)")
        elif name in ("EMPTY_DICT", "EMPTY_SET"):
            stack.append(_Item(None))
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            module, _, qualname = arg.partition(" ") if name == "GLOBAL" else ("", "", "")
            self._pop(2 if name == "STACK_GLOBAL" else 0)  # (STACK_GLOBAL's names are not followed: any may copy)
            copies = "set" if name == "STACK_GLOBAL" or (module, qualname) in _COPYING_GLOBALS else ""
            stack.append(_Item(1, copies="OrderedDict" if qualname == "OrderedDict" and copies else copies))
        elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "INST", "OBJ"):
            if name in ("INST", "OBJ"):
                args = self._pop_mark()
                module, _, qualname = arg.partition(" ") if name == "INST" else ("", "", "")
                function = args.pop(0) if name == "OBJ" and args else _Item(1, copies="set" if (
                    module, qualname) in _COPYING_GLOBALS else "")  # fmt: skip
                args = _Item(None, args)
            else:
                function, args, *_ = self._pop({"REDUCE": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3}[name])
            if isinstance(function, _Item) and function.copies and isinstance(args, _Item) and args.elements:
                for argument in args.elements if name in ("INST", "OBJ") else args.elements[:1]:
                    self._copied_keys(argument, function.copies)
            # what a call gives may be one of its arguments (torch's _rebuild_parameter gives its tensor): it is
            # hashed no faster than they are
            stack.append(_Item(args.weight if isinstance(args, _Item) else None, numbers=_made_of([args])))
        else:  # every other opcode by its stack effect: what it builds is an object of its own
            before, after = opcode.stack_before, opcode.stack_after
            if pickletools.markobject in before:
                self._pop_mark()
                self._pop(before.index(pickletools.markobject))
            else:
                self._pop(len(before))
            for kind in after:
                if kind is pickletools.markobject:
                    self.marks.append(len(stack))
                else:
                    stack.append(_Item(1))

    def _copied_keys(self, argument, copies: str) -> None:
        """set(x), frozenset(x) (or a callable named by names not followed): each element of a list or tuple x is
        a key; OrderedDict(x): the first of each (key, value) pair."""
        if not isinstance(argument, _Item) or argument.elements is None:
            return
        for element in argument.elements:
            pair = isinstance(element, _Item) and element.elements is not None and len(element.elements) == 2
            if copies == "OrderedDict" and pair:
                self.key(element.elements[0])
            else:
                self.key(element)


class _Callable:
    """What find_class hands out for a function the pickle may call: a fresh object per pickle, calling `function`
    with `bound` then the pickle's arguments. The BUILD opcode sets attributes on whatever it is given (a function's
    ``__name__``, ``__kwdefaults__``, ``__dict__``, ...): handed titok-fast's own functions, a pickle would change
    them for the rest of the process; handed this, it is refused."""

    __slots__ = ("function", "bound", "qualname")

    def __init__(self, qualname: str, function, *bound):
        self.qualname, self.function, self.bound = qualname, function, bound

    def __call__(self, *args):
        return self.function(*self.bound, *args)

    def __setstate__(self, state):
        raise CheckpointError(f"the pickle gives state to {self.qualname}")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.placeholders: dict[tuple[str, str], type] = {}  # one class per name, however often the pickle names it
        self.copied = 0  # elements handed to _COPYING_GLOBALS calls

    def find_class(self, module: str, name: str):
        if len(module) > MAX_GLOBAL_NAME or len(name) > MAX_GLOBAL_NAME:  # (before a copy of either is made)
            raise CheckpointError(f"its pickle names a class or function by a name over {MAX_GLOBAL_NAME} characters")
        if (module, name) in _SAFE_GLOBALS:
            return _Callable(f"{module}.{name}", _SAFE_GLOBALS[(module, name)])
        if (module, name) in _COPYING_GLOBALS:
            return _Callable(f"{module}.{name}", self.copy, _COPYING_GLOBALS[(module, name)])
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]  # torch's dtypes: BUILD cannot set their attributes, they have none to set
        if (module, name) not in self.placeholders:
            if len(self.placeholders) >= MAX_PICKLE_CLASSES:
                raise CheckpointError(f"its pickle names more than {MAX_PICKLE_CLASSES} classes")
            self.placeholders[module, name] = type(
                f"Placeholder_{name}", (Placeholder,), {"__slots__": (), "qualname": f"{module}.{name}"}
            )
        return self.placeholders[module, name]

    def copy(self, container: type, *args):
        """`container(*args)`, counting the elements copied: a pickle builds each container from elements it lists
        once, so all the calls together copy no more elements than the pickle has opcodes; a pickle handing one
        list to many calls is refused before it multiplies its size."""
        self.copied += sum(len(a) for a in args if hasattr(a, "__len__"))
        if self.copied > MAX_PICKLE_OPCODES:
            raise CheckpointError(f"its pickle copies more than {MAX_PICKLE_OPCODES} elements into containers")
        return container(*args)

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) >= 3
            and isinstance(pid[0], str)
            and pid[0] == "storage"
            and (isinstance(pid[1], torch.dtype) or isinstance(pid[1], type) and issubclass(pid[1], Placeholder))
            and isinstance(pid[2], str)
            and re.fullmatch(r"[0-9A-Za-z_.-]{1,64}", pid[2])
        ):
            raise CheckpointError(
                f"unsupported storage reference (a {type(pid).__name__}); expected ('storage', <storage type>, <key>, "
                "...) with a short key"
            )
        # a storage type titok-fast does not read (float8, ...) is named by its type, and refused by _check_floating
        # if a model tensor uses it; other entries of the checkpoint (optimiser state) may hold such storages
        return _StorageRef(key=pid[2], dtype=pid[1] if isinstance(pid[1], torch.dtype) else pid[1].qualname)


def _declared_directory(file) -> tuple[int, int]:
    """(entries, bytes) of the central directory a zip archive's end records declare, read from the open `file`'s
    end before zipfile reads the whole directory; (0, 0) where there is no end record (zipfile then says what is
    wrong). Read by zipfile's own reader of those records (private, but there since Python 2): zipfile takes a
    Zip64 record wherever one precedes the end record, whatever the end record says, so a reader of our own would
    check other numbers than those zipfile then uses."""
    file.seek(0)
    end = zipfile._EndRecData(file)
    if not end:
        return 0, 0
    return end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]


class _Archive:
    """A torch zip checkpoint opened for lazy tensor reads: `file`, open for reading, is the file at `path` (one file,
    checked and then read: not a path opened twice)."""

    def __init__(self, path: Path, file):
        self.path = path
        if not zipfile.is_zipfile(file):
            raise CheckpointError(
                f"{path} is not a torch zip checkpoint (legacy torch.save format or not a checkpoint at all)"
            )
        entries, size = _declared_directory(file)
        if entries > MAX_ARCHIVE_ENTRIES:
            raise CheckpointError(f"{path}: its archive declares {entries} entries; at most {MAX_ARCHIVE_ENTRIES}")
        if size > MAX_ARCHIVE_DIRECTORY_BYTES:
            raise CheckpointError(
                f"{path}: its archive declares a central directory of {size} bytes; at most "
                f"{MAX_ARCHIVE_DIRECTORY_BYTES}"
            )
        self.zip = zipfile.ZipFile(file)
        # zipfile bounds what one read inflates for deflate only: a bzip2 or LZMA record declaring a few bytes can
        # inflate gigabytes in one read (torch stores records raw; a zip tool may deflate them)
        odd = next((i for i in self.zip.infolist() if i.compress_type not in _ZIP_METHODS), None)
        if odd is not None:
            raise CheckpointError(
                f"{path}: record {odd.filename!r:.120} is compressed by zip method {odd.compress_type}; expected "
                "stored or deflated records"
            )
        self.names = set(self.zip.namelist())
        pickles = [n for n in self.names if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        self.prefix = pickles[0][: -len("data.pkl")]
        if not (self.prefix.isprintable() and len(self.prefix) <= 256):  # its records' names are said in errors
            raise CheckpointError(f"{path}: its archive's folder {self.prefix!r:.120} is not a printable name of up "
                                  "to 256 characters")  # fmt: skip
        byteorder = self.prefix + "byteorder"
        if byteorder in self.names:
            order = self._small_record(byteorder, 16)
            if order == b"big":
                raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
            if order != b"little":
                raise CheckpointError(f"{path}: its byteorder record holds {order[:16]!r}; expected b'little'")
        data = self._small_record(pickles[0], MAX_PICKLE_BYTES)
        try:
            _check_opcodes(data)
            self.root = _RestrictedUnpickler(io.BytesIO(data)).load()
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read the checkpoint's pickle ({_one_line(e)})") from e

    def _small_record(self, name: str, limit: int) -> bytes:
        """The bytes of record `name`, refused past `limit`: from its declared size before inflating it, and by a
        read that stops at `limit` + 1 bytes whatever the declared size says."""
        info = self.zip.getinfo(name)
        if info.file_size > limit:
            raise CheckpointError(
                f"{self.path}: record {name} declares {info.file_size} bytes; at most {limit} expected"
            )
        with self.zip.open(info) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise CheckpointError(f"{self.path}: record {name} inflates past {limit} bytes")
        return data

    def read(self, refs: dict[str, _TensorRef], budget: int) -> dict[str, torch.Tensor]:
        """The tensors `refs` name. Each storage record is checked against the bytes its tensors need, and all of
        them against `budget` bytes, before any is read; a record is read only as far as its tensors need."""
        needed: dict[_StorageRef, int] = {}
        for key, ref in refs.items():
            if any(s < 0 for s in ref.stride) or ref.offset < 0:
                raise CheckpointError(f"{self.path}: tensor {key} has a negative stride or offset")
            last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
            elements = last + 1 if all(ref.size) else 0
            needed[ref.storage] = max(needed.get(ref.storage, 0), elements * ref.storage.dtype.itemsize)
        if sum(needed.values()) > budget:
            raise CheckpointError(
                f"{self.path}: its tensors span {sum(needed.values())} bytes of storage; at most {budget} are allowed"
            )
        storages = {}
        for storage, size in needed.items():
            name = f"{self.prefix}data/{storage.key}"
            if name not in self.names:
                raise CheckpointError(f"{self.path}: storage record {name} is missing")
            info = self.zip.getinfo(name)
            if info.file_size < size:
                raise CheckpointError(f"{self.path}: storage record {name} holds {info.file_size} bytes; needs {size}")
            if info.compress_type != zipfile.ZIP_STORED and info.file_size > size:  # torch stores records raw
                raise CheckpointError(
                    f"{self.path}: compressed storage record {name} inflates to {info.file_size} bytes; "
                    f"its tensors need {size}"
                )
            try:
                with self.zip.open(name) as f:
                    data = bytearray(f.read(size))  # never more than the tensors need, whatever the record inflates to
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise CheckpointError(f"{self.path}: storage record {name} is corrupt ({e})") from None
            if len(data) != size:
                raise CheckpointError(f"{self.path}: storage record {name} ends after {len(data)} of {size} bytes")
            flat = torch.frombuffer(data, dtype=storage.dtype) if data else torch.empty(0, dtype=storage.dtype)
            storages[storage] = flat
        return {k: storages[r.storage].as_strided(r.size, r.stride, r.offset).clone() for k, r in refs.items()}


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


def _check_shapes(config: TiTokConfig, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Names and shapes of a file's tensors against the model `config` describes (built on ``meta``: no memory)."""
    with torch.device("meta"):
        expected = TiTok(config, backend="torch").state_dict()
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]} ({len(missing)} missing in all for config "
                              f"{config.name!r}); does the config match the checkpoint?")  # fmt: skip
    unexpected = [k for k in shapes if k not in expected]
    if unexpected:
        raise CheckpointError(  # the name comes from the file: quoted and cut, so the message stays one line
            f"{path}: unexpected tensor {unexpected[0]!r:.100}; does the config match the checkpoint?"
        )
    for key, size in shapes.items():
        if size != tuple(expected[key].shape):
            raise CheckpointError(
                f"{path}: tensor {key} has shape {list(size)}, expected {list(expected[key].shape)} "
                f"for config {config.name!r}"
            )


def _check_floating(path: Path, dtypes: dict[str, object], allowed: tuple) -> None:
    """Every model tensor of a file is floating point (``allowed``: the dtypes as the file's format names them),
    checked before any is read."""
    wrong = next((k for k, dtype in dtypes.items() if dtype not in allowed), None)
    if wrong is not None:
        raise CheckpointError(f"{path}: tensor {wrong} is {dtypes[wrong]}; expected one of {list(allowed)}")


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every model tensor holds finite values: a NaN weight turns every token into garbage (FSQ's index of NaN is
    no code), which would only show when token files are written, as a fault of each video."""
    wrong = next((k for k, t in tensors.items() if not bool(torch.isfinite(t).all())), None)
    if wrong is not None:
        raise CheckpointError(f"{path}: tensor {wrong} holds NaN or infinite values; expected finite weights")


@functools.lru_cache(maxsize=256)
def exact_fsq_level(level: int) -> bool:
    """Whether titok-fast takes FSQ level ``level``: upstream computes indices in float32, as ((q / h) * h + h) *
    basis summed over the levels (h = level // 2, q a code, -h .. level - h - 1), so its tokens are exact integers
    whatever the basis when that first factor is q + h exactly for every q. It is for every level up to 25; from 26
    on it is not for some levels (26, 27, 38, 39, 42-47, 50-55, ...), whose upstream indices can be off by one, which
    no exact fast path gives. Levels past MAX_CODEBOOK_SIZE (token files store int16) are not looked at."""
    if not 2 <= level <= MAX_CODEBOOK_SIZE:
        return False
    half = torch.tensor(level // 2, dtype=torch.float32, device="cpu")  # (whatever device is the default: a model
    q = torch.arange(-(level // 2), level - level // 2, dtype=torch.float32, device="cpu")  # built on meta checks it)
    return torch.equal(q / half * half + half, q + half)


def check_config(config: TiTokConfig, where: str = "config") -> None:
    """Refuse a config whose sizes exceed the module's limits (MAX_PATCH, MAX_PATCH_VOLUME, exact_fsq_level,
    MAX_CODEBOOK_SIZE, MAX_GRID, MAX_TOKENS) before any model, table or buffer is built from it; `where` names it in
    the error."""
    inexact = sorted({v for v in config.fsq_levels if v <= MAX_CODEBOOK_SIZE and not exact_fsq_level(v)})  # (larger:
    # refused by the codebook's size)
    problems = [
        (any(p > MAX_PATCH for p in config.patch_size), f"patch_size {list(config.patch_size)} exceeds {MAX_PATCH}"),
        (
            math.prod(config.patch_size) > MAX_PATCH_VOLUME,
            f"patch_size {list(config.patch_size)} makes patches of {math.prod(config.patch_size)} voxels; at most "
            f"{MAX_PATCH_VOLUME}",
        ),
        (
            bool(inexact),
            f"fsq_levels {list(config.fsq_levels)}: upstream computes the indices of level(s) {inexact} inexactly "
            "(in float32), so titok-fast cannot give its tokens; every level from 2 to 25 is taken, and a larger one "
            "where upstream's indices are exact",
        ),
        (
            math.prod(config.fsq_levels) > MAX_CODEBOOK_SIZE,
            f"fsq_levels {list(config.fsq_levels)} make {math.prod(config.fsq_levels)} codes; at most "
            f"{MAX_CODEBOOK_SIZE} (token files store indices as int16)",
        ),
        (
            any(g > m for g, m in zip(config.max_grid, MAX_GRID, strict=True)),
            f"max_grid {list(config.max_grid)} exceeds {list(MAX_GRID)}",
        ),
        (  # (the default clip size: one it could not take would be blamed on a --grid never given)
            any(g < p or g % p for g, p in zip(config.max_grid, config.patch_size, strict=True)),
            f"max_grid {list(config.max_grid)} must be positive multiples of patch_size {list(config.patch_size)}",
        ),
        (
            not config.num_token_range[0] <= config.num_token_range[1] <= MAX_TOKENS,
            f"num_token_range {list(config.num_token_range)} must be increasing and at most {MAX_TOKENS}",
        ),
    ]
    for bad, message in problems:
        if bad:
            raise CheckpointError(f"{where}: {message}")


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and float32 values of the tensors, in key order (first 16 hex digits)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{list(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def read_safetensors_metadata(path: str | os.PathLike) -> dict:
    """The JSON object a titok-fast ``.safetensors`` stores under METADATA_KEY ({} when absent). The header's
    declared size is checked before the header is read, and the metadata's length before it is parsed."""
    with _reading(path):
        with hub.open_regular(path) as file:
            declared = int.from_bytes(file.read(8), "little")
        if declared > MAX_SAFETENSORS_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: its safetensors header declares {declared} bytes; at most {MAX_SAFETENSORS_HEADER_BYTES}"
            )
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        return {}
    if len(meta[METADATA_KEY]) > MAX_CHECKPOINT_METADATA_CHARS:
        raise CheckpointError(f"{path}: metadata {METADATA_KEY!r} is {len(meta[METADATA_KEY])} characters; at most "
                              f"{MAX_CHECKPOINT_METADATA_CHARS}")  # fmt: skip
    try:
        value = json.loads(meta[METADATA_KEY])
    except (ValueError, RecursionError) as e:  # (nested too deep, a number too long for an int)
        raise CheckpointError(f"{path}: metadata is not valid JSON ({_one_line(e)})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: metadata {METADATA_KEY!r} must be a JSON object; got {type(value).__name__}")
    return value


def _file_config(meta: dict, path: Path) -> TiTokConfig:
    """The config a file's metadata holds: a JSON object only (a string would be taken as a path to open)."""
    if "config" not in meta:
        return _taken_as_v1(path)
    if not isinstance(meta["config"], dict):
        raise CheckpointError(
            f"{path}: metadata config must be a JSON object; got {type(meta['config']).__name__} {meta['config']!r:.80}"
        )
    try:
        return TiTokConfig.from_any(meta["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: metadata config is invalid ({e})") from None


_SAID: set[tuple[str, str]] = set()  # (file, notice) said in this process


def _say_once(path: Path, message: str) -> None:
    """A notice about a weights file, once a process (a run may load its weights more than once)."""
    key = (str(path.absolute()), message)
    if key not in _SAID:
        _SAID.add(key)
        notice(message)


def _taken_as_v1(path: Path) -> TiTokConfig:
    """The config of weights that record none (an upstream checkpoint never does): v1's, said once. Weights shaped
    as v1's but trained with other FSQ levels would otherwise load and give other tokens without a word."""
    _say_once(path, f"{path} records no model config, so it is read as v1, the released model's: give --config "
                    "(config=) with its training YAML if it is a model of your own, or --config v1 to say it is "
                    "V1")  # fmt: skip
    return TiTokConfig.from_any("v1")


def load_state(
    path: str | os.PathLike, config: object | None = None, use_ema: bool = True
) -> tuple[TiTokConfig, dict[str, torch.Tensor], str, bool | None]:
    """Read (config, state_dict, weights digest, whether they are EMA weights) from a Lightning ``.ckpt`` or our
    ``.safetensors`` (which records it, or not: None).

    Every size is checked (config limits, tensor shapes, storage records) before tensors are read."""
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise CheckpointError(
            f"checkpoint {path} {what}{hub.why_not_a_reference(str(path))}; expected a .ckpt (.pt, .pth) or "
            ".safetensors file, or a Hub id owner/name[@revision][:file]"
        )
    given = TiTokConfig.from_any(config) if config is not None else None  # the caller's: its errors are not the file's
    if _is_safetensors(path):
        with _reading(path):
            meta = read_safetensors_metadata(path)
            if "chunking" in meta and "model_config" in meta:  # (what every token file's metadata holds)
                with safe_open(str(path), framework="pt") as f:
                    if set(f.keys()) == set(TOKEN_TENSORS):
                        raise CheckpointError(f"{path}: is a token file (written by encode), not model weights; "
                                              "expected a .ckpt (.pt, .pth) or a .safetensors of weights")  # fmt: skip
            cfg = given if given is not None else _file_config(meta, path)
            # (not a conversion in the cache, which records source_sha256: keyed by its checkpoint alone, it stores
            # the config of the first load that made it, not one of the weights')
            if (given is not None and "config" in meta and "source_sha256" not in meta
                    and given != (stored := _file_config(meta, path))):  # fmt: skip
                _say_once(path, f"{path}: the config given differs from the one it stores in "
                                f"{given.differences(stored, 'stored')}; the one given is used")  # fmt: skip
            check_config(cfg, str(path))
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                _check_shapes(cfg, {k: tuple(f.get_slice(k).get_shape()) for k in names}, path)
                dtypes = {k: f.get_slice(k).get_dtype() for k in names}  # from the header: nothing read yet
                _check_floating(path, dtypes, _SAFETENSORS_FLOAT_DTYPES)
                tensors = {k: f.get_tensor(k) for k in names}
            _check_finite(path, tensors)
            digest = weights_digest(tensors)
        if meta.get("weights_digest", digest) != digest:
            raise CheckpointError(f"{path}: metadata digest {meta['weights_digest']!r:.80} disagrees with its tensors")
        ema = meta.get("ema")
        return cfg, tensors, digest, ema if isinstance(ema, bool) else None
    cfg = given if given is not None else TiTokConfig.from_any("v1")
    check_config(cfg, str(path))
    with _reading(path), hub.open_regular(path) as file:  # a FIFO swapped in after the check above: refused
        archive = _Archive(path, file)
        refs, prefix = _select_state(archive.root, path, use_ema)
        if given is None:  # (said of a checkpoint: a file that is none, a video given by mistake, is refused alone)
            _taken_as_v1(path)
        wrong = next((k for k, r in refs.items() if not isinstance(r, _TensorRef)), None)
        if wrong is not None:
            got = refs[wrong]
            if isinstance(got, Placeholder) and got.qualname.startswith("torch._utils._rebuild_tensor"):
                kind = f"tensor record of a kind titok-fast does not read ({got.qualname}: float8 or newer types)"
            else:
                kind = got.qualname if isinstance(got, Placeholder) else type(got).__name__
            raise CheckpointError(
                f"{path}: entry {wrong!r:.100} is a {kind:.200}; expected a tensor of one of "
                f"{[str(d) for d in _FLOAT_DTYPES]}"
            )
        _check_shapes(cfg, {k: r.size for k, r in refs.items()}, path)
        _check_floating(path, {k: r.storage.dtype for k, r in refs.items()}, _FLOAT_DTYPES)
        budget = 2 * sum(math.prod(r.size) * r.storage.dtype.itemsize for r in refs.values()) + (1 << 20)
        try:
            tensors = archive.read(refs, budget)
        except (RuntimeError, ValueError) as e:  # strides past the storage's end, ...
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: tensors cannot be read from the archive ({_one_line(e)})") from e
        _check_finite(path, tensors)
        digest = weights_digest(tensors)
    return cfg, tensors, digest, prefix == "ema_model."


def _is_safetensors(path: Path) -> bool:
    """A .safetensors file by its suffix (in any case) or, named otherwise, by its first bytes: an 8-byte header
    length, then the header's JSON object (a torch checkpoint begins as a zip archive, "PK", or a pickle)."""
    if path.suffix.lower() == ".safetensors":
        return True
    with _reading(path), open(path, "rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


LOADABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _checked_target(device: torch.device | str, dtype: torch.dtype) -> torch.device:
    """load_tokenizer's ``device`` (as a torch.device) and ``dtype``, checked before any file is read."""
    if dtype not in LOADABLE_DTYPES:
        raise TypeError(f"dtype {dtype!r}: expected one of torch.float32, torch.bfloat16, torch.float16, torch.float64")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r}: not a device ({' '.join(str(e).split())[:200]})") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here (no GPU, or a CPU build of torch)")
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if target.type not in ("cpu", "cuda", "meta"):  # (mps, xpu, ...: what this torch build and machine support)
        try:
            torch.empty(0, device=target)
        except Exception as e:  # (torch says it as it will: RuntimeError, AssertionError, a module not found)
            said = " ".join(str(e).split()).split(". ")[0][:160]
            raise ValueError(f"device {device!r}: not available in this torch build or on this machine ({said})"
                             ) from None  # fmt: skip
    return target


def load_tokenizer(
    path: str | os.PathLike,
    config: object | None = None,
    use_ema: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    quick: bool = False,
    precision: str = "default",
) -> TiTok:
    """Load a TiTok model from an upstream Lightning ``.ckpt``, a titok-fast ``.safetensors`` or a Hub id.

    path: a local file, or a Hub reference ``owner/name[@revision][:file]`` / ``hf://...`` (see
    :mod:`titok_fast.hub`; a Hub checkpoint is converted once into :func:`titok_fast.hub.cache_dir`).
    ``config`` defaults to the one stored in a ``.safetensors`` file, the preset of a known Hub id, else ``"v1"``.
    EMA weights are preferred when present and ``use_ema``. Strict: a missing, unexpected or misshaped tensor is
    an error naming it. ``quick``: wait only briefly for the Hub (the demo's fallback).
    """
    device = _checked_target(device, dtype)
    ref = hub.parse_hub_ref(path)
    if ref is not None:
        try:
            path, config, source = _from_hub(ref, config, use_ema, quick)
        except ValueError as e:  # (WeightsUnavailable too): a local path mistyped reads as a Hub id (a release's
            # id is meant as one)
            if ref.repo_id in hub.KNOWN_CONFIGS or not (alike := hub.local_look_alike(str(path))):
                raise
            raise type(e)(f"{e}{alike}") from None
    else:
        source = str(Path(path).resolve())
    cfg, tensors, digest, ema = load_state(path, config, use_ema)
    with torch.device("meta"):
        model = TiTok(cfg, backend=backend, precision=precision)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.weights_digest = digest
    model.weights_source = source
    model._weights_ema = ema  # what a conversion records (EMA asked for and none there: the raw weights were taken)
    return model.to(device=device, dtype=dtype).eval()


def _from_hub(ref: hub.HubRef, config: object | None, use_ema: bool, quick: bool) -> tuple[Path, object | None, str]:
    """(a local .safetensors, its config or None for the one it stores, the pinned hf:// reference) for a Hub file;
    an upstream checkpoint is converted into the cache first."""
    config = config if config is not None else hub.KNOWN_CONFIGS.get(ref.repo_id)
    if config is None and not ref.filename.endswith(".safetensors"):  # an upstream .ckpt carries no config
        raise ValueError(
            f"{ref.repo_id} is not a known release {sorted(hub.KNOWN_CONFIGS)}: say which config it uses with --config"
        )
    local, pinned = hub.download(ref, quick=quick)
    if local.suffix == ".safetensors":
        return local, config, str(pinned)
    try:
        return converted(local, TiTokConfig.from_any(config), use_ema), config, str(pinned)
    except CacheUnusable as e:  # (the same weights, read from the checkpoint: the same digest)
        _say_once(local, f"{e}; the checkpoint is read as it is, unpickled at every run")
        return local, config, str(pinned)


class CacheUnusable(OSError):
    """titok-fast's cache of converted weights cannot be looked in or written (the message says where, and why)."""


def converted(src: str | os.PathLike, config: TiTokConfig, use_ema: bool = True) -> Path:
    """The ``.safetensors`` conversion of the upstream checkpoint `src` in titok-fast's cache, made on first use.

    Keyed by the sha256 of `src`'s bytes and the EMA choice, not by the config (the weights are the checkpoint's
    whatever config they are loaded with, which is given at every load: token files naming one Hub file with eight
    configs had it converted eight times, a GB each for V1); written atomically, so processes converting
    at once each rename a complete file and later runs read it without unpickling anything. A conversion already
    cached is found by the name of `src`'s Hugging Face blob (its sha256, unread); one written here is keyed by the
    bytes actually read, so a blob named by another file's sha256 (whoever can write to the Hugging Face cache can
    put any weights under the genuine file's name) is refused instead of poisoning that key for good. The file
    hashed must be the file converted: one replaced or rewritten meanwhile (its inode, size, modification or change
    time differ) is refused before anything is written."""
    claimed = hub.file_sha256(src)
    target = hub.cache_dir() / "converted" / f"{claimed}-{'ema' if use_ema else 'raw'}.safetensors"
    with _using_cache(target):
        cached = _converted_from(target, claimed)
    if not cached:
        with _using_cache(target):  # (a folder that cannot be written: said before the checkpoint is hashed)
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=target.parent):
                pass
        with hub.open_regular(src) as file, _reading(Path(src)):  # its archive's directory first (a few KB), before
            _Archive(Path(src), file)  # all its bytes are hashed: a file that is no checkpoint (gigabytes, say) is
            # refused unread, in one line naming it
        before = _identity(src)
        actual = hub.file_sha256(src, trust_blob_name=False)
        if actual != claimed:
            raise CheckpointError(
                f"{src}: its bytes have sha256 {actual}, not the {claimed} its Hugging Face cache blob is named by; "
                "delete that blob and download the file again"
            )
        print(f"converting {src} into {target} (once)", file=sys.stderr)
        model = load_tokenizer(src, config=config, use_ema=use_ema, backend="torch")
        if _identity(src) != before:
            raise CheckpointError(f"{src}: changed while it was hashed and converted; nothing was cached, try again")
        with _using_cache(target):
            save_safetensors(model, target, source=os.path.basename(str(src)), **_ema_taken(model),
                             source_sha256=actual)  # fmt: skip
        _remove_config_keyed(target.parent, claimed)
    return target


@contextlib.contextmanager
def _using_cache(target: Path):
    """A CacheUnusable, saying where and why, for an OSError of looking in or writing to the cache (a read-only or
    full disk, a cache path that is a file)."""
    try:
        yield
    except OSError as e:
        raise CacheUnusable(f"titok-fast's cache of converted weights ({target.parent.parent}: ${hub.CACHE_ENV}, else "
                            f"$XDG_CACHE_HOME/titok-fast) cannot be used: {e.strerror or e}") from None  # fmt: skip


def _remove_config_keyed(folder: Path, sha256: str) -> None:
    """Remove the conversions of the checkpoint ``sha256`` that versions before 2026-12-06 keyed by its config as
    well (``<sha256>-<12 hex digits>.safetensors``: a V1 model's worth each, never read again). Only regular files
    of that name: anything else there is left."""
    pattern = re.compile(rf"{sha256}-[0-9a-f]{{12}}\.safetensors")
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _converted_from(target: Path, sha256: str) -> bool:
    """Whether the cache entry ``target`` is a conversion of the checkpoint whose bytes have ``sha256``, as its
    metadata records: anything else under that name (a file cut short, one copied there, one written before
    conversions recorded it) is converted again over it. Something that is not a file there is refused."""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:  # (nothing there, or a link that leads nowhere: replaced by the conversion)
        return False
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{target}: the cache entry for this conversion is {kind_of(mode)}, not a file; remove "
                              "it")  # fmt: skip
    try:
        return read_safetensors_metadata(target).get("source_sha256") == sha256
    except CheckpointError:
        return False


def _identity(path: str | os.PathLike) -> tuple[int, ...]:
    """What tells a file (where its links lead) from another, or from itself rewritten: device, inode, size,
    modification and change times (the change time cannot be set back)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def random_tokenizer(
    config: object = "tiny",
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    precision: str = "default",
) -> TiTok:
    """A model with reproducible random weights (``perturb_norms`` applied), for demos and tests; ``seed`` in
    [0, MAX_SEED]. Its digest starts with ``random-seed<seed>-`` so token files made with it can be decoded by
    rebuilding it. The global random number generator is left as it was."""
    if not is_integer(seed) or isinstance(seed, torch.Tensor) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}] (token files record it); got {seed!r}")
    config = TiTokConfig.from_any(config)
    check_config(config)
    with torch.random.fork_rng(devices=[]):  # the caller's random numbers go on as they were (built on the CPU:
        torch.random.default_generator.manual_seed(seed)  # only its generator is used, and only it is reseeded)
        model = TiTok(config, backend=backend, precision=precision).eval()
        perturb_norms(model)
    model.weights_digest = f"random-seed{seed}-{weights_digest(model.state_dict())}"
    return model.to(device=device, dtype=dtype)


def random_seed(digest: str | None) -> int | None:
    """The seed a :func:`random_tokenizer` digest records (``random-seed<seed>-<16 hex>``), else None. The digest
    may come from a stranger's token file: only that exact form, with a bounded seed, is accepted."""
    found = re.fullmatch(r"random-seed(\d{1,18})-[0-9a-f]{16}", digest or "")
    return int(found.group(1)) if found else None


def save_safetensors(model: TiTok, path: str | os.PathLike, **extra: object) -> None:
    """Write the model's weights with its config (and ``extra`` fields) as metadata, atomically. Written into its
    locked temporary (:func:`write_safetensors`), so a write removes the temporaries that killed writes of the same
    file left (a killed ``convert``, a conversion into the Hub cache: a V1 model's worth each) and leaves alone one
    another process is writing now."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format_version": FORMAT_VERSION, "config": model.config.to_dict(), "weights_digest": weights_digest(state)}
    meta.update(extra)
    os.makedirs(os.path.dirname(absolute(path)), exist_ok=True)
    with open_atomically(path, tidy=True) as file:
        write_safetensors(file, state, {METADATA_KEY: json.dumps(meta)})


SAFETENSORS_DTYPES = {  # in the order safetensors writes them (its dtypes' order, reversed)
    torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32", torch.bfloat16: "BF16",
    torch.float16: "F16", torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def write_safetensors(file: io.BufferedIOBase, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``tensors`` (contiguous, on the CPU) and ``metadata`` written to the open ``file`` in safetensors' format:
    the bytes ``safetensors.torch.save_file`` writes (its order: by dtype, then by name; its header padded with
    spaces to 8 bytes), a tensor at a time. ``save_file`` writes a file of its own (a new one at the
    name, unlocked), which another process's clean-up cannot tell from a killed write's."""
    if sys.byteorder != "little":  # (the format's byte order)
        raise RuntimeError("writing safetensors needs a little-endian machine")
    rank = {dtype: i for i, dtype in enumerate(SAFETENSORS_DTYPES)}
    if other := next((name for name, tensor in tensors.items() if tensor.dtype not in rank), None):
        raise ValueError(f"tensor {other!r} is {tensors[other].dtype}: weights are written in "
                         f"{', '.join(map(str, SAFETENSORS_DTYPES))}")  # fmt: skip
    order = sorted(tensors, key=lambda name: (rank[tensors[name].dtype], name))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    file.write(len(text).to_bytes(8, "little") + text)
    for name in order:
        file.write(tensors[name].reshape(-1).view(torch.uint8).numpy().data)


def convert(src: str | os.PathLike, dst: str | os.PathLike, config: object | None = None, use_ema: bool = True) -> str:
    """Upstream ``.ckpt`` -> ``.safetensors`` with the config as metadata; returns the weights digest. ``dst`` must
    end in ``.safetensors`` (what the loader reads as such) and must not be ``src``."""
    if not str(dst).endswith(".safetensors"):
        raise ValueError(f"convert writes safetensors: the output {str(dst)!r} must end in .safetensors")
    if os.path.isdir(dst):
        raise ValueError(f"the output {str(dst)!r} is a folder; expected a file name ending in .safetensors")
    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise ValueError(f"the output {str(dst)!r} is the checkpoint being converted; name another file")
    model = load_tokenizer(src, config=config, use_ema=use_ema, backend="torch")
    if use_ema and model._weights_ema is False:
        notice(f"{src} holds no EMA weights (ema_model.*): its model weights were converted")
    save_safetensors(model, dst, source=os.path.basename(str(src)), **_ema_taken(model))
    return model.weights_digest


def _ema_taken(model: TiTok) -> dict[str, bool]:
    """The ``ema`` field a converted file records: whether its weights are the checkpoint's EMA weights, where that
    is known."""
    return {} if model._weights_ema is None else {"ema": model._weights_ema}
