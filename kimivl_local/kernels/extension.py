"""The compiled extension ``kimivl_local._C``, if this install has one.

Importing never compiles anything: a missing or broken extension just means the ops run on
their torch references, and ``kimivl-local info`` says why.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("kimivl_local._C"), None
    except ImportError as exc:  # not built (KIMIVL_SKIP_EXT, no compiler) or built for another ABI
        return None, str(exc)


def extension() -> ModuleType | None:
    """The ``_C`` module, or None when this install has no usable extension."""
    return _load()[0]


def extension_error() -> str | None:
    """Why the extension could not be imported (None when it loaded)."""
    return _load()[1]


def build_info() -> dict:
    """``_C.build_info()`` plus ``available``; a dict with ``available: False`` without ``_C``."""
    ext = extension()
    if ext is None:
        return {"available": False, "error": extension_error()}
    return {"available": True, **ext.build_info()}
