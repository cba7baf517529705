"""Numeric weight formats: quantize/dequantize and packed storage. Torch only; knows nothing of models."""

from .qtensor import QuantizedTensor, quantize_tensor
from .spec import FormatSpec, UnknownFormatError, parse_format

__all__ = ["FormatSpec", "QuantizedTensor", "UnknownFormatError", "parse_format", "quantize_tensor"]
