"""Adapters to the quantization libraries people deploy, behind one pure-data table.

`BACKEND_FORMATS` names every backend format quantscope knows (bitsandbytes, torchao, HQQ,
optimum-quanto, llm-compressor, llama.cpp's GGUF block formats through gguf-py, and llama.cpp itself). Importing this module imports no
backend library: `available(name)` asks `importlib.util.find_spec` whether the library is there and
`load_backend(name)` imports the adapter module only when asked, raising `QuantscopeError` with the
install hint when the library is missing or the format cannot run on this machine.

Every adapter module (`quantscope.backends.<module>`) exposes the same three functions:

    quantize(model, fmt, include, calib=None) -> nn.Module
        quantize, through the library, the `nn.Linear` modules for which `include(name, module)` is
        True; fails loudly (QuantscopeError) if the library leaves any of them unquantized.
    storage_tensors(model) -> Iterator[Tensor]
        every plain tensor holding the model's weights as the library stores them (packed codes,
        scales, absmax / quant_state, outlier statistics, and the unquantized parameters too);
        tensor subclasses are opened (`__tensor_flatten__`) because their `.nbytes` reports the
        dequantized size. Callers deduplicate shared storage before summing `nbytes`.
    version() -> str
        the library's installed version.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from types import ModuleType

from quantscope.errors import QuantscopeError

LLMC_PYTHON = "QUANTSCOPE_LLMC_PYTHON"
_LLMC_HINT = (
    "llmcompressor 0.14 pins transformers 5.17 (pip would downgrade quantscope's), so give it a "
    "virtualenv of its own: python -m venv DIR && DIR/bin/pip install torch==2.13.0 "
    f"&& DIR/bin/pip install llmcompressor==0.14.0.1, then export {LLMC_PYTHON}=DIR/bin/python"
)


@dataclass(frozen=True)
class BackendFormat:
    """One format of one external library: pure data, no library imported."""

    name: str  # the name users type, prefixed by the backend: "bnb-nf4"
    backend: str  # library display name: "bitsandbytes"
    module: str  # adapter module with quantize/storage_tensors/version ("" = no adapter here)
    import_name: str  # what find_spec looks for: "bitsandbytes", "optimum.quanto"
    pip_name: str  # distribution name on PyPI (also used for the installed version)
    extra: str  # quantscope extra that installs it: pip install 'quantscope[<extra>]'
    nominal_bits: int  # bits of the codes (not bits per weight: scales are measured, not assumed)
    description: str  # one line for `quantscope formats`
    needs_calibration: bool = False
    unsupported_reason: str | None = None  # why it cannot run here, when known in advance
    options: tuple[tuple[str, object], ...] = ()  # adapter parameters (quant type, group size...)
    needs_source: bool = False  # quantize() also takes source= (the model reference) and n_ctx=
    python_env: str = ""  # the library runs in another interpreter, named by this environment variable

    @property
    def install_hint(self) -> str:
        return f"pip install 'quantscope[{self.extra}]' (or: pip install {self.pip_name})"

    def option(self, key: str) -> object:
        """The adapter parameter `key`; KeyError names the format if it is missing."""
        for k, v in self.options:
            if k == key:
                return v
        raise KeyError(f"{self.name} has no option {key!r}")


def _fmts(*formats: BackendFormat) -> dict[str, BackendFormat]:
    return {f.name: f for f in formats}


def _bnb(name: str, bits: int, desc: str, **opts: object) -> BackendFormat:
    return BackendFormat(name, "bitsandbytes", "quantscope.backends.bnb", "bitsandbytes",
                         "bitsandbytes", "bnb", bits, desc, options=tuple(opts.items()))


def _ao(name: str, bits: int, desc: str, reason: str | None = None, **opts: object) -> BackendFormat:
    return BackendFormat(name, "torchao", "quantscope.backends.ao", "torchao", "torchao",
                         "torchao", bits, desc, unsupported_reason=reason, options=tuple(opts.items()))


def _hqq(bits: int, group: int) -> BackendFormat:
    return BackendFormat(
        f"hqq-int{bits}-g{group}", "hqq", "quantscope.backends.hqqlib", "hqq", "hqq", "hqq", bits,
        f"HQQ {bits}-bit asymmetric, group {group}, calibration-free half-quadratic zero/scale fit; "
        "scale and zero kept in the model dtype",
        options=(("nbits", bits), ("group_size", group)))


def _quanto(name: str, bits: int, qtype: str, desc: str) -> BackendFormat:
    return BackendFormat(name, "optimum-quanto", "quantscope.backends.quanto", "optimum.quanto",
                         "optimum-quanto", "quanto", bits, desc, options=(("qtype", qtype),))


def _gguf(name: str, bits: int, qtype: str, desc: str, reason: str | None = None) -> BackendFormat:
    label = "llama.cpp block format, evaluated dequantized in torch, not llama.cpp kernels"
    return BackendFormat(name, "gguf", "quantscope.backends.ggufpy", "gguf", "gguf", "gguf", bits,
                         f"{desc} ({label})", unsupported_reason=reason, options=(("qtype", qtype),))


def _gguf_k(name: str, bits: int, qtype: str, desc: str) -> BackendFormat:
    reason = (f"gguf-py 0.19 can dequantize {qtype} but not quantize to it; llama.cpp's own quantizer "
              f"and kernels run it as llamacpp-{name.removeprefix('gguf-')} (pip install "
              "'quantscope[llamacpp]', which compiles llama.cpp: ~10 min)")
    return _gguf(name, bits, qtype, desc, reason)


def _llmc(method: str, group: int) -> BackendFormat:
    what = {"gptq": "GPTQ (its defaults: static activation order, dampening 0.01, blocks of 128)",
            "awq": "AWQ scale search (its default Llama mappings and grid), then min-max int4"}[method]
    return BackendFormat(
        f"llmc-{method}-int4-g{group}", "llm-compressor", "quantscope.backends.llmc", "llmcompressor",
        "llmcompressor", "llmc", 4, f"llm-compressor {what}, asymmetric int4, group {group}, calibrated; "
        f"codes stored and run in quantscope's int4-g{group} layout", needs_calibration=True,
        options=(("method", method), ("bits", 4), ("group_size", group)), python_env=LLMC_PYTHON)


def _llamacpp(name: str, bits: int, ftype: str, desc: str, imatrix: bool = False) -> BackendFormat:
    how = " with its importance matrix of the baseline on the calibration text" if imatrix else ""
    return BackendFormat(
        name, "llama.cpp", "quantscope.backends.llamacpp", "llama_cpp", "llama-cpp-python", "llamacpp",
        bits, f"{desc}; quantized by llama.cpp{how} from the baseline written to F32 GGUF, run by its CPU "
        "kernels (token embedding kept F32)", needs_calibration=imatrix,
        options=(("ftype", ftype),) + ((("imatrix", True),) if imatrix else ()), needs_source=True)


BACKEND_FORMATS: dict[str, BackendFormat] = _fmts(
    _bnb("bnb-int8", 8, "LLM.int8(): int8 per-row absmax weights, fp16 outlier columns above "
         "activation threshold 6.0", kind="int8", threshold=6.0),
    _bnb("bnb-nf4", 4, "NF4 codebook, absmax per block of 64 (fp32)", kind="4bit", quant_type="nf4",
         double_quant=False),
    _bnb("bnb-fp4", 4, "FP4 (e2m1) codebook, absmax per block of 64 (fp32)", kind="4bit",
         quant_type="fp4", double_quant=False),
    _bnb("bnb-nf4-dq", 4, "NF4 with double quantization (absmax as 8-bit per 256 blocks); bnb's "
         "AVX512-BF16 CPU kernel undoes it (absmax to bf16) at first inference",
         kind="4bit", quant_type="nf4", double_quant=True),
    _bnb("bnb-fp4-dq", 4, "FP4 with double quantization (absmax as 8-bit per 256 blocks); bnb's "
         "AVX512-BF16 CPU kernel undoes it (absmax to bf16) at first inference",
         kind="4bit", quant_type="fp4", double_quant=True),
    _ao("torchao-int8wo", 8, "Int8WeightOnlyConfig: int8 per-row symmetric weights, float activations",
        config="int8wo"),
    _ao("torchao-int8dq", 8, "Int8DynamicActivationInt8WeightConfig: int8 per-row weights, "
        "int8 per-token dynamic activations", config="int8dq"),
    _ao("torchao-int4wo-g32", 4, "IntxWeightOnlyConfig(int4, group 32): int4 codes stored one per "
        "int8 byte (IntxUnpackedToInt8Tensor), so no memory saving over int8", config="intx4wo",
        group_size=32),
    _ao("torchao-int4wo-g128", 4, "Int4WeightOnlyConfig(group 128): packed int4, tinygemm/mslk kernels",
        reason="torchao 0.18 Int4WeightOnlyConfig needs mslk >= 1.0.0 for its plain/preshuffled "
        "layouts (PyPI has only a placeholder), its plain_int32 layout has no CPU support and "
        "tile_packed_to_4d needs CUDA; it also silently skips layers whose input width is not a "
        "multiple of the group size", config="int4wo", group_size=128),
    _hqq(4, 64),
    _hqq(3, 64),
    _hqq(2, 16),
    _quanto("quanto-int8", 8, "qint8", "qint8 weights, per-row symmetric scale"),
    _quanto("quanto-int4", 4, "qint4", "qint4 weights, group 128 (quanto lowers it by 32 until it "
            "divides the input width: 96 for 576), scale and shift per group"),
    _quanto("quanto-int2", 2, "qint2", "qint2 weights, group 128 (lowered like qint4), scale and "
            "shift per group"),
    _quanto("quanto-fp8", 8, "qfloat8", "float8 e4m3 weights, per-row scale"),
    _llmc("gptq", 128), _llmc("awq", 128), _llmc("gptq", 64), _llmc("awq", 64),
    _gguf("gguf-q8_0", 8, "Q8_0", "Q8_0: int8 codes, fp16 scale per block of 32 (8.5 bpw)"),
    _gguf("gguf-q5_1", 5, "Q5_1", "Q5_1: 5-bit codes, fp16 scale and min per block of 32 (6.0 bpw)"),
    _gguf("gguf-q5_0", 5, "Q5_0", "Q5_0: 5-bit codes, fp16 scale per block of 32 (5.5 bpw)"),
    _gguf("gguf-q4_1", 4, "Q4_1", "Q4_1: 4-bit codes, fp16 scale and min per block of 32 (5.0 bpw)"),
    _gguf("gguf-q4_0", 4, "Q4_0", "Q4_0: 4-bit codes, fp16 scale per block of 32 (4.5 bpw)"),
    _gguf("gguf-mxfp4", 4, "MXFP4", "MXFP4: e2m1 codes, e8m0 scale per block of 32 (4.25 bpw)"),
    _gguf_k("gguf-q6_k", 6, "Q6_K", "Q6_K: 6-bit k-quant, super-blocks of 256"),
    _gguf_k("gguf-q5_k_m", 5, "Q5_K", "Q5_K_M: llama.cpp's Q5_K/Q6_K tensor mix"),
    _gguf_k("gguf-q4_k_m", 4, "Q4_K", "Q4_K_M: llama.cpp's Q4_K/Q6_K tensor mix"),
    _gguf_k("gguf-iq4_nl", 4, "IQ4_NL", "IQ4_NL: non-linear 4-bit codebook, blocks of 32"),
    _gguf_k("gguf-q3_k_m", 3, "Q3_K", "Q3_K_M: llama.cpp's Q3_K/Q4_K/Q5_K tensor mix"),
    _gguf_k("gguf-q2_k", 2, "Q2_K", "Q2_K: 2-bit k-quant, super-blocks of 256"),
    _llamacpp("llamacpp-f32", 32, "F32", "F32: the baseline itself in llama.cpp (the engine's own "
              "numerical difference from the torch baseline)"),
    _llamacpp("llamacpp-q8_0", 8, "Q8_0", "Q8_0: int8 codes, fp16 scale per block of 32"),
    _llamacpp("llamacpp-q6_k", 6, "Q6_K", "Q6_K: 6-bit k-quant, super-blocks of 256"),
    _llamacpp("llamacpp-q5_k_m", 5, "Q5_K_M", "Q5_K_M: llama.cpp's Q5_K/Q6_K tensor mix"),
    _llamacpp("llamacpp-q4_k_m", 4, "Q4_K_M", "Q4_K_M: llama.cpp's Q4_K/Q6_K tensor mix"),
    _llamacpp("llamacpp-q4_0", 4, "Q4_0", "Q4_0: 4-bit codes, fp16 scale per block of 32"),
    _llamacpp("llamacpp-q4_0-imatrix", 4, "Q4_0", "Q4_0 with an importance matrix (llama.cpp then keeps the "
              "first n_layer/8 ffn_down at Q4_1)", imatrix=True),
    _llamacpp("llamacpp-q4_k_m-imatrix", 4, "Q4_K_M", "Q4_K_M with an importance matrix", imatrix=True),
    _llamacpp("llamacpp-iq4_nl", 4, "IQ4_NL", "IQ4_NL: non-linear 4-bit codebook, blocks of 32"),
    _llamacpp("llamacpp-q3_k_m", 3, "Q3_K_M", "Q3_K_M: llama.cpp's Q3_K/Q4_K/Q5_K tensor mix"),
    _llamacpp("llamacpp-q2_k", 2, "Q2_K", "Q2_K: 2-bit k-quant, super-blocks of 256 (no importance matrix)"),
)


def backend_format(name: str) -> BackendFormat:
    """The BackendFormat called `name`; QuantscopeError with suggestions if there is none."""
    fmt = BACKEND_FORMATS.get(name)
    if fmt is None:
        close = difflib.get_close_matches(name, list(BACKEND_FORMATS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise QuantscopeError(f"unknown backend format {name!r}{hint}")
    return fmt


def _find_spec(import_name: str) -> bool:
    try:
        return importlib.util.find_spec(import_name) is not None
    except (ImportError, ValueError):  # a missing parent package ("optimum") raises
        return False


def available(name: str) -> tuple[bool, str]:
    """(True, "<lib> <version>") when format `name` can run here, else (False, why + install hint).

    Uses find_spec and package metadata only: no backend library is imported.
    """
    fmt = backend_format(name)
    if fmt.unsupported_reason is not None:
        return False, f"{fmt.name} ({fmt.backend}) cannot run here: {fmt.unsupported_reason}"
    if fmt.python_env:
        try:
            python, ver = external_python(fmt.import_name)
        except QuantscopeError as exc:
            return False, str(exc)
        return True, f"{fmt.backend} {ver} ({python})"
    if not _find_spec(fmt.import_name):
        return False, f"{fmt.backend} is not installed: {fmt.install_hint}"
    try:
        ver = importlib.metadata.version(fmt.pip_name)
    except importlib.metadata.PackageNotFoundError:
        ver = "unknown version"
    return True, f"{fmt.backend} {ver}"


_EXTERNAL = {"llmcompressor": (LLMC_PYTHON, "llmcompressor", _LLMC_HINT)}


def external_python(import_name: str) -> tuple[str, str]:
    """(interpreter, library version) for a library that runs in an interpreter of its own: the one
    named by its environment variable, else this one if the library is installed here.
    QuantscopeError with the setup hint otherwise. Asks the interpreter for the version only."""
    import os
    import sys

    var, dist, hint = _EXTERNAL[import_name]
    python = os.environ.get(var, "")
    if not python:
        if _find_spec(import_name):
            return sys.executable, importlib.metadata.version(dist)
        raise QuantscopeError(f"{dist} is not installed and {var} is not set: {hint}")
    return python, _version_in(python, dist, var, hint)


@functools.lru_cache(maxsize=None)
def _version_in(python: str, dist: str, var: str, hint: str) -> str:
    import subprocess

    try:
        proc = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                              capture_output=True, text=True, timeout=120, check=False)
    except OSError as exc:
        raise QuantscopeError(f"{var}={python} cannot be run ({exc.strerror}): {hint}") from None
    if proc.returncode != 0:
        raise QuantscopeError(f"{dist} is not installed in {var}={python}: {hint}")
    return proc.stdout.strip()


def load_backend(name: str) -> ModuleType:
    """Import and return the adapter module of format `name` (it has quantize/storage_tensors/version).

    Raises QuantscopeError, with the install hint, when the library is missing or cannot run here.
    """
    ok, why = available(name)
    if not ok:
        raise QuantscopeError(why)
    fmt = BACKEND_FORMATS[name]
    try:
        return importlib.import_module(fmt.module)
    except ImportError as exc:
        raise QuantscopeError(
            f"{fmt.backend} is installed but failed to import ({exc}); {fmt.install_hint}") from exc
