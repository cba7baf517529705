"""quantscope: quantize a causal LM into many formats and measure them side by side.

See :mod:`quantscope.api` for the entry points (`load_model`, `quantize`, `compare`).
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing quantscope must not import torch/transformers
    from . import api

    if hasattr(api, name):
        return getattr(api, name)
    raise AttributeError(name)
