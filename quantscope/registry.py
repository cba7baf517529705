"""The one place a format name is resolved: quantscope's own formats, then the library backends.

Own formats are parsed by :mod:`quantscope.formats.spec`; mixed-precision names (``mixed-edges:...``,
``mixed-auto:...``) by :mod:`quantscope.methods.mixed`; backend formats (`bnb-nf4`, `hqq-int4-g64`,
...) are pure data in :mod:`quantscope.backends`. An unknown name gets one error with the closest
names from both lists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .backends import BACKEND_FORMATS, BackendFormat
from .formats.spec import FormatSpec, UnknownFormatError, parse_format, suggest

if TYPE_CHECKING:
    from .methods.mixed import MixedSpec

__all__ = ["BackendFormat", "FormatSpec", "resolve_format"]


def resolve_format(name: str) -> FormatSpec | BackendFormat | MixedSpec:
    key = name.strip().lower()
    if key.startswith("mixed-"):
        from .methods.mixed import parse_mixed

        return parse_mixed(key)
    if key in BACKEND_FORMATS:
        return BACKEND_FORMATS[key]
    try:
        return parse_format(key)
    except UnknownFormatError as e:
        if str(e).startswith("unknown format"):
            raise UnknownFormatError(f"unknown format '{name}'" + suggest(key, tuple(BACKEND_FORMATS))) from None
        raise
