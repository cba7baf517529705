"""quantscope: quantize a causal LM into many formats and measure them side by side.

See :mod:`quantscope.api` for the entry points (`load_model`, `resolve`, `quantize`, `compare`,
`recommend_format`, `save`, `plan_memory` ...).
"""

__version__ = "0.1.0"

_API = ("CompareConfig", "compare", "load_model", "LoadedModel", "quantize", "quantize_with_report", "resolve",
        "Format", "QuantizeOptions", "CalibConfig", "list_formats", "SensitivityConfig", "sensitivity",
        "RecommendConfig", "recommend_format", "SaveConfig", "save", "PlanConfig", "plan_memory", "list_runs",
        "load_run", "load_paired_run", "run_sweep", "SpeedConfig", "RecoverConfig", "RecoverRunConfig", "run_recover")


def __getattr__(name):  # lazy: importing quantscope must not import torch/transformers
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'quantscope' has no attribute {name!r}")
