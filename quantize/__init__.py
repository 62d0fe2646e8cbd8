"""`kimivl-local quantize`: bf16 checkpoint -> compressed-tensors pack-quantized checkpoint."""

from .main import main, quantize

__all__ = ["main", "quantize"]
