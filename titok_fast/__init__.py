"""titok-fast: a fast, exact runtime for the TiTok-Video V1 tokenizer."""

from .config import PRESETS, TiTokConfig
from .engine import Engine
from .loading import load_tokenizer
from .model import TiTok

__all__ = ["PRESETS", "Engine", "TiTok", "TiTokConfig", "load_tokenizer"]
__version__ = "0.1.0"
