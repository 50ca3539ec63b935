"""titok-fast: a fast, exact runtime for the TiTok-Video V1 tokenizer."""

from .config import PRESETS, TiTokConfig
from .model import TiTok

__all__ = ["PRESETS", "TiTok", "TiTokConfig"]
__version__ = "0.1.0"
