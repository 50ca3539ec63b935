"""titok-fast: a fast, exact runtime for the TiTok-Video V1 tokenizer.

The names below are imported when first used: ``import titok_fast`` (and so the command line, whose ``--help``
and argument errors need no model) does not import torch, which takes seconds, and an interrupt during that
import reaches the command's own handling (one line) instead of printing a traceback."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
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


def _kernels_of_the_checkout() -> None:
    """The kernels are the top-level folder ``kernels/`` of a source checkout, installed as ``titok_fast.kernels``
    (setup.py's package_dir). Where this package is imported from the checkout itself (a script or ``python -m``
    run there, ``PYTHONPATH=.``, with a wheel installed or none), that folder is made ``titok_fast.kernels``:
    otherwise every model import failed, "No module named 'titok_fast.kernels'". An installed package holds its
    own ``kernels`` folder, and nothing is done."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    folder = os.path.join(root, "kernels")
    marks = (os.path.join(folder, "__init__.py"), os.path.join(folder, "fsq.py"), os.path.join(root, "setup.py"))
    if os.path.isdir(os.path.join(here, "kernels")) or not all(map(os.path.isfile, marks)):
        return
    spec = importlib.util.spec_from_file_location(
        f"{__name__}.kernels", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_kernels_of_the_checkout()


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
