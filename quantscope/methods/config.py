"""Settings of the calibrated methods, as config dataclasses (validated when made).

A format name carries the few settings people vary (``gptq-int4-g128-act-damp0.05-b64-bf16fwd``);
:meth:`GPTQConfig.from_spec` reads them from the parsed name with every other setting at its default.
AWQ's grid and clipping are :class:`quantscope.methods.awq.AWQConfig`; the calibration batch and
AWQ settings together are :class:`quantscope.methods.calibrate.CalibConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..formats.spec import FormatSpec

CALIB_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01  # dampening: this fraction of the mean Hessian diagonal is added to the diagonal
    block_size: int = 128  # columns solved together before the lazy batch update of the rest
    act_order: bool = False  # solve columns by decreasing Hessian diagonal (groups stay static)
    calib_dtype: str = "float32"  # dtype of the calibration forward passes; solves stay float32

    def __post_init__(self) -> None:
        if not 0.0 < self.damp < 1.0:
            raise ValueError(f"GPTQConfig.damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"GPTQConfig.block_size must be >= 1, got {self.block_size}")
        if self.calib_dtype not in CALIB_DTYPES:
            raise ValueError(f"GPTQConfig.calib_dtype must be one of {CALIB_DTYPES}, got {self.calib_dtype!r}")

    @classmethod
    def from_spec(cls, spec: FormatSpec) -> "GPTQConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in spec.options if k in names})
