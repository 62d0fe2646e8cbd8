"""kimivl-local: run Kimi-VL-A3B on one consumer GPU or a CPU, offline."""

__version__ = "0.1.0"

from .api import KimiVL, load

__all__ = ["KimiVL", "load", "__version__"]
