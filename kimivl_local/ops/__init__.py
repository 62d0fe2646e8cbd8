"""Operators with a torch reference (oracle and fallback); compiled kernels plug in here."""

from .attention import varlen_attention, varlen_attention_reference

__all__ = ["varlen_attention", "varlen_attention_reference"]
