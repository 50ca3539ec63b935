"""titok-fast: a fast, exact runtime for the TiTok-Video V1 tokenizer.

The names below are imported when first used: ``import titok_fast`` (and so the command line, whose ``--help``
and argument errors need no model) does not import torch, which takes seconds, and an interrupt during that
import reaches the command's own handling (one line) instead of printing a traceback."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import PRESETS, TiTokConfig
    from .engine import Engine
    from .loading import load_tokenizer
    from .model import TiTok

__all__ = ["PRESETS", "Engine", "TiTok", "TiTokConfig", "load_tokenizer"]
__version__ = "0.1.0"

_HOMES = {"PRESETS": "config", "TiTokConfig": "config", "Engine": "engine", "load_tokenizer": "loading",
          "TiTok": "model"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    else:  # a submodule: titok_fast.engine after a bare `import titok_fast`, as when the package imported them all
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":  # a module it needs is missing: said as it is
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
