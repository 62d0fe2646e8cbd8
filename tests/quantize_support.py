"""Shared by the quantize tests: `kimivl_local.quantize` from a source checkout, where setup.py's
package_dir mapping (quantize/ -> kimivl_local.quantize) is not installed, is mapped here."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def import_quantize(module: str):
    """kimivl_local.quantize.<module>: the installed subpackage, or this checkout's quantize/."""
    if importlib.util.find_spec("kimivl_local.quantize") is None:
        import kimivl_local

        spec = importlib.util.spec_from_file_location(
            "kimivl_local.quantize", REPO / "quantize" / "__init__.py",
            submodule_search_locations=[str(REPO / "quantize")])
        package = importlib.util.module_from_spec(spec)
        sys.modules["kimivl_local.quantize"] = package
        spec.loader.exec_module(package)
        kimivl_local.quantize = package
    return importlib.import_module(f"kimivl_local.quantize.{module}")
