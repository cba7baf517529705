"""quantscope: quantize a causal LM into many formats and measure them side by side.

See :mod:`quantscope.api` for the entry points (`load_model`, `quantize`, `compare`).
"""

__version__ = "0.1.0"

_API = ("CompareConfig", "compare", "load_model", "LoadedModel", "quantize", "list_formats", "resolve_format")


def __getattr__(name):  # lazy: importing quantscope must not import torch/transformers
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'quantscope' has no attribute {name!r}")
