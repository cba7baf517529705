"""`quantscope formats`: every format with its bits per weight and whether its library is installed."""

from __future__ import annotations

from . import options as o


def add_parser(sub) -> None:
    f = sub.add_parser("formats", help="list every format with its bits per weight")
    o.add_json(f, "the list")
    f.set_defaults(func=run)


def run(args) -> int:
    from ..api import list_formats
    from ..report.terminal import formats_table

    rows = list_formats()
    o.out(args, formats_table(rows))
    o.emit(args, rows)
    return 0
