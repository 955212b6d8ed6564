"""onnx-widen: widen a Transformer exported to ONNX into an exactly equivalent wider model."""
from __future__ import annotations

import importlib.util
import os
import sys

__version__ = "0.1.0"


def _checkout_patterns():
    """In a source checkout `patterns/` sits beside this package; installs map it to
    onnx_widen.patterns (pyproject package-dir). Resolve it the same way without an install."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "patterns")):
        return
    src = os.path.join(os.path.dirname(here), "patterns", "__init__.py")
    if os.path.isfile(src) and f"{__name__}.patterns" not in sys.modules:
        spec = importlib.util.spec_from_file_location(f"{__name__}.patterns", src, submodule_search_locations=[os.path.dirname(src)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)


_checkout_patterns()

from .api import inspect, validate, widen  # noqa: E402
from .errors import UsageError, WidenError  # noqa: E402

__all__ = ["widen", "inspect", "validate", "WidenError", "UsageError", "__version__"]
