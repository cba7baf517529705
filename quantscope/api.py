"""The library's entry points. The CLI is a thin layer over these.

    import quantscope as qs
    lm = qs.load_model()                                  # embedded SmolLM2-135M (FP32 baseline)
    qs.quantize(lm.model, "int4-g128")                    # in place; packed storage, real bytes
    records, meta = qs.compare(qs.CompareConfig(formats=("int8", "nf4"), windows=4))
"""

from __future__ import annotations

from typing import Iterable

import torch

from .compare import CompareConfig, compare
from .formats.spec import EXAMPLE_NAMES, FormatSpec
from .model.load import LoadedModel, load_model
from .registry import BackendFormat, resolve_format

__all__ = ["CompareConfig", "compare", "load_model", "LoadedModel", "quantize", "list_formats",
           "resolve_format"]


def quantize(model: torch.nn.Module, fmt: str | FormatSpec, include: Iterable[str] = (),
             exclude: Iterable[str] = (), calib: list[torch.Tensor] | None = None,
             source: str | None = None) -> torch.nn.Module:
    """Quantize `model` into `fmt` (any own or backend format name). Calibrated formats need `calib`:
    a list of 1-D token-id tensors. llama.cpp formats (`llamacpp-*`) start from the model's GGUF file:
    `source` is the reference `model` was loaded from ('default' or a .gguf path). Returns the
    quantized model (the same object for own formats)."""
    from .errors import QuantscopeError
    from .model.swap import apply_plan, select_modules, uniform_plan

    spec = resolve_format(fmt) if isinstance(fmt, str) else fmt
    from .methods.mixed import MixedSpec

    if isinstance(spec, MixedSpec):
        from .methods.mixed import quantize_mixed, sensitivity_windows

        windows = sensitivity_windows(torch.stack(list(calib))) if spec.needs_calibration and calib else None
        if spec.needs_calibration and windows is None:
            raise QuantscopeError(f"format '{spec.name}' measures layer sensitivity: pass calib token sequences")
        quantize_mixed(model, spec, windows, tuple(include), tuple(exclude))
        return model
    if isinstance(spec, BackendFormat):
        from .backends import load_backend

        chosen = set(select_modules(model, include, exclude))
        extra = {"source": source} if spec.needs_source else {}
        return load_backend(spec.name).quantize(model, spec, lambda n, m: n in chosen, calib, **extra)
    if spec.calibrated:
        if not calib:
            raise QuantscopeError(f"format '{spec.name}' is calibrated: pass calib token sequences")
        from .methods.calibrate import quantize_calibrated

        return quantize_calibrated(model, spec, list(calib), include=tuple(include), exclude=tuple(exclude))[0]
    with torch.no_grad():
        return apply_plan(model, uniform_plan(model, spec, include, exclude))


def list_formats() -> list[dict]:
    """Rows for `quantscope formats`: own formats (examples of each family) and every backend format."""
    from .backends import BACKEND_FORMATS, available
    from .formats.registry import family_of

    rows = []
    for name in EXAMPLE_NAMES:
        s = resolve_format(name)
        bpw = 8 * s.storage_bytes(1536, 576) / (1536 * 576)
        desc = family_of(s).description
        if s.calibrated:
            desc = f"{s.method.upper()} calibrated; " + desc
        rows.append({"name": s.name, "backend": "quantscope", "installed": True,
                     "bits_per_weight": bpw, "description": desc + (" (experimental)" if s.experimental else ""),
                     "note": ""})
    for name, b in BACKEND_FORMATS.items():
        ok, reason = available(name)
        rows.append({"name": name, "backend": b.backend, "installed": ok, "bits_per_weight": float(b.nominal_bits),
                     "description": b.description, "note": "" if ok else reason})
    return rows
