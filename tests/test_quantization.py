"""The one quantize entry point: names resolved once, one handler per kind, options never mutated."""

import pytest

from conftest import tiny_llama
from quantscope.errors import QuantscopeError
from quantscope.modules.qmodules import QuantLinear
from quantscope.quantization import QuantizeOptions, quantize, resolve


def test_names_resolve_to_one_kind_each():
    kinds = {n: resolve(n).kind for n in ("int4-g128", "gptq-int4-g128", "mixed-edges:int4-g128/int8", "bnb-nf4")}
    assert kinds == {"int4-g128": "own", "gptq-int4-g128": "calibrated", "mixed-edges:int4-g128/int8": "mixed",
                     "bnb-nf4": "library"}
    assert resolve("GPTQ-int4-g128").needs_calibration and not resolve("nf4").needs_calibration
    assert resolve(" Int8 ") == resolve("int8") and resolve("int8") is resolve("int8")  # cached per name


def test_keyword_options_leave_the_callers_options_alone():
    opts = QuantizeOptions(exclude=("mlp",))
    done = quantize(tiny_llama(), "int8", opts, include=["embed_tokens"])
    assert opts.include == () and opts.exclude == ("mlp",)
    names = [n for n, m in done.model.named_modules() if isinstance(m, QuantLinear)]
    assert names and not any("mlp" in n for n in names)
    with pytest.raises(TypeError, match="unexpected options"):
        quantize(tiny_llama(), "int8", bogus=1)


def test_a_calibrated_format_without_calibration_tokens_is_one_clear_error():
    with pytest.raises(QuantscopeError, match="is calibrated: pass calib"):
        quantize(tiny_llama(), "gptq-int4-g32")
