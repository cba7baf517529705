"""Format names and their parsed form.

A format is data (:class:`FormatSpec`) plus two functions (quantize, dequantize) registered per family
in :mod:`quantscope.formats.registry`. Names are parsed here, once; an unknown name raises
:class:`UnknownFormatError` with the closest known names.

Grammar (own formats)::

    fp32 | bf16 | fp16 | fp8-e4m3 | fp8-e5m2
    int8                                   weight-only, symmetric, per output channel
    intN-gG[-sym]                          N in 2..8, any group size G; asymmetric unless -sym
    intN[-sym]                             per output channel (no grouping)
    nf4[-dq] | fp4[-dq]                    QLoRA codebooks, block-wise absmax (block 64)
    ternary[-gG] | binary[-gG]             experimental, per-group scale (default G=64)
    gptq-intN-gG[-sym][-act][-dampX][-bB][-bf16fwd]
                                           calibrated (GPTQ); X = dampening fraction, B = block size;
                                           -bf16fwd: calibration forward passes in bfloat16
    awq-intN-gG[-sym]                      calibrated (AWQ scale search + clipping)
    awq+gptq-intN-gG[...]                  AWQ scaling, then GPTQ rounding
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass

from ..errors import QuantscopeError


class UnknownFormatError(QuantscopeError):
    pass


@dataclass(frozen=True)
class FormatSpec:
    """A parsed weight format. `name` is canonical (parse_format(spec.name) == spec)."""

    name: str
    family: str  # float | fp8 | int | codebook | ternary | binary
    bits: int  # bits of one code (for float families: of the stored dtype)
    variant: str = ""  # fp32/bf16/fp16, e4m3/e5m2, nf4/fp4
    group_size: int | None = None  # None: one group per output row
    symmetric: bool = False
    double_quant: bool = False
    method: str = "rtn"  # rtn | gptq | awq | awq+gptq: the algorithm that chooses the codes
    # settings of that method spelled in the name (gptq-...-act-damp0.05-b64-bf16fwd), as (key, value)
    # pairs that differ from the method's defaults; their meaning and defaults belong to the method's
    # config dataclass (quantscope.methods.config.GPTQConfig), not to the storage format
    options: tuple[tuple[str, object], ...] = ()
    experimental: bool = False

    def __post_init__(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            raise UnknownFormatError(f"group size must be >= 1 in '{self.name}'")
        if not 1 <= self.bits <= 32:
            raise UnknownFormatError(f"bits out of range in '{self.name}'")

    @property
    def calibrated(self) -> bool:
        return self.method != "rtn"

    @property
    def is_lossless_fp32(self) -> bool:
        return self.family == "float" and self.variant == "fp32"

    def rtn(self) -> "FormatSpec":
        """The plain round-to-nearest format with the same storage (what a calibrated method emits)."""
        if self.method == "rtn":
            return self
        base = _int_name(self.bits, self.group_size, self.symmetric)
        return parse_format(base)

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["options"] = dict(self.options)
        d["version"] = 2
        return d


def _int_name(bits: int, group: int | None, sym: bool) -> str:
    if bits == 8 and group is None and sym:
        return "int8"
    name = f"int{bits}" + (f"-g{group}" if group is not None else "")
    return name + ("-sym" if sym else "")


_INT_RE = re.compile(r"^int(?P<bits>[2-8])(?:-g(?P<group>\d+))?(?P<rest>(?:-[a-z0-9.]+)*)$")
_LOWBIT_RE = re.compile(r"^(?P<kind>ternary|binary)(?:-g(?P<group>\d+))?$")
_METHODS = ("awq+gptq", "gptq", "awq")


def parse_format(name: str) -> FormatSpec:
    """Parse a format name into a FormatSpec, or raise UnknownFormatError with suggestions."""
    raw = name
    name = name.strip().lower()
    if name in ("fp32", "bf16", "fp16"):
        return FormatSpec(name=name, family="float", bits={"fp32": 32, "bf16": 16, "fp16": 16}[name], variant=name)
    if name in ("fp8-e4m3", "fp8-e5m2"):
        return FormatSpec(name=name, family="fp8", bits=8, variant=name[4:])
    if name == "int8":
        return FormatSpec(name="int8", family="int", bits=8, symmetric=True)
    if name in ("nf4", "fp4", "nf4-dq", "fp4-dq"):
        return FormatSpec(name=name, family="codebook", bits=4, variant=name[:3], group_size=64,
                          double_quant=name.endswith("-dq"))
    m = _LOWBIT_RE.match(name)
    if m:
        group = int(m["group"]) if m["group"] else 64
        canon = m["kind"] + ("" if group == 64 else f"-g{group}")
        return FormatSpec(name=canon, family=m["kind"], bits=2 if m["kind"] == "ternary" else 1,
                          group_size=group, symmetric=True, experimental=True)
    method = "rtn"
    body = name
    for meth in _METHODS:
        if name.startswith(meth + "-"):
            method, body = meth, name[len(meth) + 1:]
            break
    m = _INT_RE.match(body)
    if m:
        bits = int(m["bits"])
        group = int(m["group"]) if m["group"] else None
        sym, act, damp, block, fwd = False, False, 0.01, 128, "float32"
        for opt in [o for o in m["rest"].split("-") if o]:
            if opt == "sym":
                sym = True
            elif opt == "act" and method in ("gptq", "awq+gptq"):
                act = True
            elif opt.startswith("damp") and method in ("gptq", "awq+gptq") and _is_float(opt[4:]):
                damp = float(opt[4:])
            elif re.fullmatch(r"b\d+", opt) and method in ("gptq", "awq+gptq"):
                block = int(opt[1:])
            elif opt == "bf16fwd" and method == "gptq":
                fwd = "bfloat16"
            else:
                raise UnknownFormatError(f"unknown option '-{opt}' in format '{raw}'" + _suggest(name))
        if method == "rtn" and bits == 8 and group is None and sym:
            return parse_format("int8")
        canon = _int_name(bits, group, sym)
        if method != "rtn":
            canon = f"{method}-{canon}"
            if act:
                canon += "-act"
            if damp != 0.01:
                canon += f"-damp{damp:g}"
            if block != 128:
                canon += f"-b{block}"
            if fwd != "float32":
                canon += "-bf16fwd"
        if not 0.0 < damp < 1.0:
            raise UnknownFormatError(f"dampening must be in (0, 1) in '{raw}'")
        options = tuple((k, v) for k, v, default in (("act_order", act, False), ("damp", damp, 0.01),
                                                     ("block_size", block, 128), ("calib_dtype", fwd, "float32"))
                        if v != default)
        return FormatSpec(name=canon, family="int", bits=bits, group_size=group, symmetric=sym,
                          method=method, options=options, experimental=bits <= 2)
    raise UnknownFormatError(f"unknown format '{raw}'" + _suggest(name))


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# Names shown by `quantscope formats` and used for "did you mean" suggestions.
EXAMPLE_NAMES = (
    "fp32", "bf16", "fp16", "fp8-e4m3", "fp8-e5m2", "int8", "int8-g128", "int4-g128", "int4-g64",
    "int4-g32", "int4-g128-sym", "int3-g128", "int3-g64", "int2-g64", "int2-g32", "nf4", "nf4-dq",
    "fp4", "fp4-dq", "ternary", "binary", "gptq-int4-g128", "gptq-int4-g128-act", "gptq-int3-g128",
    "gptq-int2-g64", "gptq-int8-g128", "awq-int4-g128", "awq-int3-g128", "awq+gptq-int4-g128",
)


def _suggest(name: str, extra: tuple[str, ...] = ()) -> str:
    close = difflib.get_close_matches(name, list(EXAMPLE_NAMES) + list(extra), n=3, cutoff=0.6)
    if not close:
        return " (run 'quantscope formats' for the list)"
    return " — did you mean " + " or ".join(f"'{c}'" for c in close) + "?"


def suggest(name: str, extra: tuple[str, ...] = ()) -> str:
    """' — did you mean ...?' for any name, including backend names passed in `extra`."""
    return _suggest(name.strip().lower(), extra)
