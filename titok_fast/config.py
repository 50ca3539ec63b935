"""Model configuration: the size table, named presets and a tolerant reader of upstream configs."""

from __future__ import annotations

import math
import os
import re
import reprlib
from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace
from typing import Any

# name -> (layers, q heads, kv heads, mlp_ratio); head_dim is always 64 and width = 64 * q heads.
SIZES: dict[str, tuple[int, int, int, float]] = {
    "tiny": (4, 4, 2, 4.0),
    "small": (8, 8, 2, 4.0),
    "base": (12, 12, 4, 4.0),
    "large": (24, 16, 4, 4.0),
    "tiny_thin": (2, 8, 2, 2.0),
    "small_thin": (5, 12, 4, 2.0),
    "base_thin": (7, 16, 4, 2.0),
    "large_thin": (8, 32, 8, 2.0),
}
HEAD_DIM = 64
MODEL_FIELDS = ("patch_size", "fsq_levels", "encoder_size", "decoder_size")  # under tokenizer.model
SAMPLING_FIELDS = ("max_grid", "num_token_range")  # under training.sampling
MAX_FSQ_LEVELS = 15  # every level is >= 2 and indices are int16 (codebooks of at most 2**15 codes)


@dataclass(frozen=True)
class StackSize:
    """Dimensions of one transformer stack (encoder or decoder)."""

    name: str
    layers: int
    q_heads: int
    kv_heads: int
    mlp_ratio: float

    @property
    def width(self) -> int:
        return HEAD_DIM * self.q_heads

    @property
    def ffn_inner(self) -> int:
        """FFN inner width I = 32 * ceil(int(mlp_ratio * 2/3 * W) / 32)."""
        return 32 * math.ceil(int(self.mlp_ratio * 2 / 3 * self.width) / 32)

    def flops(self, sequence_lengths: list[int]) -> float:
        """Model FLOPs of this stack over packed sequences: every row through every layer (DESIGN.md section 9)."""
        return self.layers * self._layer_flops(sequence_lengths, sequence_lengths)

    def packed_flops(self, sequence_lengths: list[int], output_lengths: list[int]) -> float:
        """FLOPs the packed path executes (``titok_fast.model.run_layers``): every layer but the last as in
        :meth:`flops`; the last projects q/k/v for every row, but attends, projects out and runs the FFN only for
        the ``output_lengths`` rows of each sequence that come out (latent rows in the encoder, patch rows in the
        decoder)."""
        every_row = self._layer_flops(sequence_lengths, sequence_lengths)
        return (self.layers - 1) * every_row + self._layer_flops(sequence_lengths, output_lengths)

    def _layer_flops(self, sequence_lengths: list[int], query_lengths: list[int]) -> float:
        """One layer: q/k/v projections of every row; attention, out_proj and FFN of the query rows."""
        w, inner = self.width, self.ffn_inner
        qkv = 2 * w * (self.q_heads + 2 * self.kv_heads) * HEAD_DIM
        per_query = 2 * w * (w + 3 * inner)
        pairs = sum(q * s for q, s in zip(query_lengths, sequence_lengths, strict=True))
        return qkv * sum(sequence_lengths) + per_query * sum(query_lengths) + 4 * pairs * self.q_heads * HEAD_DIM

    @classmethod
    def named(cls, name: str) -> StackSize:
        if name not in SIZES:
            raise ValueError(f"unknown model size {name!r:.80}; expected one of {sorted(SIZES)}")
        return cls(name, *SIZES[name])


@dataclass(frozen=True)
class TiTokConfig:
    """What the model reads of an upstream config.

    Upstream paths: ``tokenizer.model.{patch_size, fsq_levels, encoder_size, decoder_size}`` and
    ``training.sampling.{max_grid, num_token_range}``.
    """

    patch_size: tuple[int, int, int] = (4, 8, 8)
    fsq_levels: tuple[int, ...] = (7, 7, 7, 5, 5)
    encoder_size: str = "base_thin"
    decoder_size: str = "large_thin"
    max_grid: tuple[int, int, int] = (20, 192, 192)
    num_token_range: tuple[int, int] = (128, 1024)
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for key in ("patch_size", "fsq_levels", "max_grid", "num_token_range"):  # lists are fine too
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))
        _check_int_seq("patch_size", self.patch_size, 3)
        _check_int_seq("max_grid", self.max_grid, 3)
        _check_int_seq("num_token_range", self.num_token_range, 2)
        if isinstance(self.fsq_levels, tuple) and len(self.fsq_levels) > MAX_FSQ_LEVELS:  # before any is looked at
            raise ValueError(
                f"config field fsq_levels has {len(self.fsq_levels)} levels; at most {MAX_FSQ_LEVELS} (every level "
                "is >= 2 and a codebook has at most 2**15 codes)"
            )
        _check_int_seq("fsq_levels", self.fsq_levels, None)
        if any(level < 2 for level in self.fsq_levels):
            raise ValueError(f"fsq_levels: every level must be >= 2, got {list(self.fsq_levels)}")
        for key in ("encoder_size", "decoder_size"):
            try:
                StackSize.named(getattr(self, key))
            except ValueError as e:
                raise ValueError(f"config field {key}: {e}") from None

    @property
    def encoder(self) -> StackSize:
        return StackSize.named(self.encoder_size)

    @property
    def decoder(self) -> StackSize:
        return StackSize.named(self.decoder_size)

    @property
    def patch_dim(self) -> int:
        pt, ph, pw = self.patch_size
        return 3 * pt * ph * pw

    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels)

    @property
    def tokenizer(self) -> SimpleNamespace:
        """Upstream's ``config.tokenizer.model.*`` (the fields read), as attributes."""
        return _namespace(self.to_dict()["tokenizer"])

    @property
    def training(self) -> SimpleNamespace:
        """Upstream's ``config.training.sampling.*`` (the fields read), as attributes."""
        return _namespace(self.to_dict()["training"])

    def differences(self, other: TiTokConfig, label: str = "other") -> str:
        """The fields (those compared: not ``name``) in which this config differs from ``other``, each with both
        values: "fsq_levels [8, 8, 6, 5, 5] (<label> [7, 7, 7, 5, 5])"; "" if none."""
        return ", ".join(
            f"{f.name} {_plain(getattr(self, f.name))} ({label} {_plain(getattr(other, f.name))})"
            for f in fields(self)
            if f.compare and getattr(self, f.name) != getattr(other, f.name)
        )

    def to_dict(self) -> dict[str, Any]:
        """The upstream nested layout, readable back by :meth:`from_any`."""
        d = asdict(self)
        return {
            "tokenizer": {"model": {k: _plain(d[k]) for k in MODEL_FIELDS}},
            "training": {"sampling": {k: _plain(d[k]) for k in SAMPLING_FIELDS}},
        }

    @classmethod
    def from_any(cls, config: Any) -> TiTokConfig:
        """Accept a preset name, a path to an upstream YAML file, an OmegaConf config or a plain dict."""
        if isinstance(config, TiTokConfig):
            return config
        if isinstance(config, (str, os.PathLike)):
            if str(config) in PRESETS:
                return PRESETS[str(config)]
            if not os.path.isfile(config):
                raise ValueError(
                    f"config {str(config)!r} is neither a preset {sorted(PRESETS)} nor an existing YAML file"
                )
            data = _read_yaml(config)  # (its errors name the file)
            try:
                return cls.from_any(data)
            except (ValueError, TypeError) as e:
                raise type(e)(f"config file {str(config)!r}: {e}") from None
        if type(config).__module__.startswith("omegaconf"):
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(config, resolve=True)
        if not isinstance(config, dict):
            raise TypeError(
                f"config must be a preset name, a YAML path, an OmegaConf config or a dict, got {type(config).__name__}"
            )
        links = [0]  # followed so far, for the whole config (a stranger's file may hold one: bounded work)
        model, at_model = _node(config, "tokenizer.model", links=links)
        sampling, at_sampling = _node(config, "training.sampling", links=links)
        values = {k: _interpolated(config, at_model, k, _get(model, k, "tokenizer.model."), links=links)
                  for k in MODEL_FIELDS}  # fmt: skip
        values.update({k: _interpolated(config, at_sampling, k, _get(sampling, k, "training.sampling."), links=links)
                       for k in SAMPLING_FIELDS})  # fmt: skip
        for key in ("encoder_size", "decoder_size"):
            if not isinstance(values[key], str):
                got = _brief(values[key])
                raise ValueError(f"config field tokenizer.model.{key} must be a size name, got {got}")
        for key in ("patch_size", "fsq_levels", "max_grid", "num_token_range"):
            if not isinstance(values[key], (list, tuple)):
                raise ValueError(f"config field {key} must be a list of integers, got {_brief(values[key])}")
            values[key] = tuple(values[key])
        config = cls(**values)
        return next((preset for preset in PRESETS.values() if preset == config), config)


class _Brief(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 1000:  # (YAML reads hexadecimal past Python's digit limit for str(), which it raises)
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_BRIEF = _Brief()
_BRIEF.maxlevel = 3  # (nested lists, as YAML aliases make them, print 6 items a level: 6**6 leaves at reprlib's 6)


def _brief(value: Any) -> str:
    """``value``'s repr, at most 100 characters, made at a bounded cost."""
    return _BRIEF.repr(value)[:100]


def _cut(text: str, limit: int = 100) -> str:
    """A field's name or a link, as a message says it: at most ``limit`` characters (a stranger's config may
    link to a path of a MiB)."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _namespace(tree: dict[str, Any]) -> SimpleNamespace:
    return SimpleNamespace(**{k: _namespace(v) if isinstance(v, dict) else v for k, v in tree.items()})


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_int_seq(name: str, value: Any, length: int | None) -> None:
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**31 for v in value
    ):  # (bounded: the checks after this one print the values)
        raise ValueError(
            f"config field {name} must be a list of positive integers below 2**31, got {_brief(value)}"
        )
    if length is not None and len(value) != length:
        raise ValueError(f"config field {name} must have {length} entries, got {len(value)}: {_brief(value)}")
    if length is None and not value:
        raise ValueError(f"config field {name} must not be empty")


_INTERPOLATION = re.compile(r"\$\{(\.*)([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*)\}")
MAX_INTERPOLATIONS = 64  # links followed in a whole config: a loop of them, or lists of links to lists of links
# (work that grows as a power of their length), is an error, not a hang


def _interpolated(
    config: dict, parent: str, key: str, value: Any, in_list: bool = False, links: list[int] | None = None
) -> Any:
    """The field ``parent.key``'s ``value`` with OmegaConf's node interpolations resolved, as upstream's
    ``OmegaConf.load`` resolves them when the field is read: a value (or a list item) that is exactly
    ``${a.b.c}`` (from the top) or ``${.c}`` / ``${..b.c}`` (from the field's own node, a dot more per level up;
    not in a list item) is the value there, links on the way followed. Anything else with ``${`` (a resolver such
    as ``${oc.env:...}``, text around a link) is refused in one line: nothing is looked up in the environment.
    ``links``: the count of links followed, shared by a config's fields (at most MAX_INTERPOLATIONS)."""
    name, links = f"{parent}.{key}".lstrip("."), [0] if links is None else links
    if isinstance(value, list) and not in_list:
        return [_interpolated(config, parent, key, v, True, links) for v in value]
    if isinstance(value, str) and "${" in value:
        link = _INTERPOLATION.fullmatch(value)
        if link is None or (link.group(1) and in_list):
            raise ValueError(f"config field {_cut(name)} holds {_brief(value)}: only a field's interpolation of "
                             "another field, ${a.b} or ${.b}, is resolved here")  # fmt: skip
        what = f"config field {_cut(name)}"
        value, at = _node(config, _target(link, parent, what), f"(interpolated by {_cut(name)}) ", links, followed=1)
        parent, _, key = at.rpartition(".")
        if isinstance(value, (list, str)):  # (its own links: a field's, from where it is)
            return _interpolated(config, parent, key, value, links=links)
    return value


def _target(link: re.Match, parent: str, what: str) -> str:
    """Where the link ``link`` (an _INTERPOLATION match) in a field of the node ``parent`` leads, from the top."""
    dots, target = link.groups()
    if not dots:
        return target
    up = parent.split(".") if parent else []
    if len(dots) - 1 > len(up):
        raise ValueError(f"{what}: the interpolation {_cut(link.group(0))} goes above the config's top")
    return ".".join([*up[: len(up) - (len(dots) - 1)], target])


def _node(
    config: dict, dotted: str, prefix: str = "", links: list[int] | None = None, followed: int = 0
) -> tuple[Any, str]:
    """The node at ``dotted`` and where it is: a node on the way, or the node itself, that is a link
    (``tokenizer: {model: ${presets.v1}}``) is followed, as OmegaConf follows it; where it leads is where its own
    fields' relative links are taken from. ``links``, ``followed`` (links taken to get here): counted against
    MAX_INTERPOLATIONS."""
    links = [0] if links is None else links
    links[0] += followed
    what = f"config field {prefix}{_cut(dotted)}"
    if links[0] > MAX_INTERPOLATIONS:
        raise ValueError(f"{what}: more than {MAX_INTERPOLATIONS} interpolations (a loop?)")

    def where_it_leads(node: Any, at: list[str]) -> tuple[Any, list[str]]:
        while isinstance(node, str) and (link := _INTERPOLATION.fullmatch(node)) is not None:
            node, place = _node(config, _target(link, ".".join(at[:-1]), what), prefix, links, followed=1)
            at = place.split(".")
        return node, at

    node, at = config, []
    for part in dotted.split("."):
        node, at = where_it_leads(node, at)
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"config is missing field {prefix}{_cut(dotted)}")
        node, at = node[part], [*at, part]
    node, at = where_it_leads(node, at)
    return node, ".".join(at)


def _get(mapping: Any, dotted: str, prefix: str = "") -> Any:
    node = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"config is missing field {prefix}{_cut(dotted)}")
        node = node[part]
    return node


MAX_CONFIG_BYTES = 1 << 20  # a YAML config file (upstream's are 2 KB)


def _read_yaml(path: str | os.PathLike) -> dict:
    import yaml

    from .hub import open_regular

    with open_regular(path) as f:  # (a FIFO or a device is refused, not read)
        text = f.read(MAX_CONFIG_BYTES + 1)
    if len(text) > MAX_CONFIG_BYTES:
        raise ValueError(f"config file {str(path)!r} is larger than {MAX_CONFIG_BYTES} bytes: not a YAML config")
    try:
        data = yaml.load(text.decode("utf-8"), Loader=_plain_loader())  # plain data only: a python/object tag is an
        # error, never a call
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # (UnicodeDecodeError, a 5000-digit number: ValueError)
        first = " ".join(str(e).split())  # YAML's messages span lines: one line, as every error here
        raise ValueError(f"config file {str(path)!r} is not a plain YAML config ({first:.300})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} does not hold a mapping")
    return data


def _plain_loader() -> type:
    """PyYAML's safe loader without two YAML 1.1 features YAML 1.2 dropped: base-60 numbers (``1:30`` is a string),
    whose conversion takes time that grows with the square of their length (a 1.35 MB number: 55 s); and merge keys
    (refused, before any is merged), which PyYAML copies anew at every level (a 0.8 KB config of 14 levels of
    merges: gigabytes). Upstream's configs use neither."""
    import re

    import yaml

    class PlainLoader(yaml.SafeLoader):
        def flatten_mapping(self, node):
            for key, _ in node.value:
                if key.tag == "tag:yaml.org,2002:merge" or (isinstance(key, yaml.ScalarNode) and key.value == "<<"):
                    raise yaml.constructor.ConstructorError(
                        None, None, "merge keys (<<) are not read: write the fields out", key.start_mark
                    )
            super().flatten_mapping(node)  # (no merge key left: what it does with "=" keys)

    numbers = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    PlainLoader.yaml_implicit_resolvers = {
        first: [(tag, pattern) for tag, pattern in resolvers if tag not in numbers]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    PlainLoader.add_implicit_resolver(
        numbers[0],
        re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
        list("-+0123456789"),
    )
    PlainLoader.add_implicit_resolver(
        numbers[1],
        re.compile(
            r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        list("-+0123456789."),
    )
    return PlainLoader


PRESETS: dict[str, TiTokConfig] = {
    "v1": TiTokConfig(name="v1"),
    "tiny": TiTokConfig(
        fsq_levels=(7, 5, 5, 5, 5),
        encoder_size="tiny_thin",
        decoder_size="tiny_thin",
        max_grid=(12, 160, 160),
        num_token_range=(64, 384),
        name="tiny",
    ),
}
