"""The command line: one thin module per command over the library API (:mod:`quantscope.api`).

Human tables go to stdout, progress and warnings to stderr, machine output where `--json` says
(`--json PATH` writes a file, `--json -` prints it instead of the tables). A user mistake
(QuantscopeError) is one line on stderr and exit code 2, never a traceback; so is a file that could not
be written (OSError), though every output path is checked before the work starts.
"""

from __future__ import annotations

import sys

from ..errors import QuantscopeError, one_line
from . import compare, formats, generate, plan, recommend, recover, runs, save, sensitivity, sweep
from .options import Parser, check_output_path

_COMMANDS = (compare.add_parser, formats.add_parser, runs.add_parsers, sweep.add_parser, sensitivity.add_parser,
             recommend.add_parser, save.add_parser, plan.add_parser, generate.add_parser,
             recover.add_parser)


def build_parser() -> Parser:
    from .. import __version__

    p = Parser(prog="quantscope", description="Quantize a causal LM into many formats and compare them.")
    p.add_argument("--version", action="version", version=f"quantscope {__version__}")
    sub = p.add_subparsers(dest="cmd", parser_class=Parser)
    for add in _COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..logs import quiet_libraries

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "cmd", None):
        parser.print_help()
        return 2
    with quiet_libraries():
        try:
            # every command's --json file and --out folder, checked before the work starts
            check_output_path(getattr(args, "json", None))
            out = getattr(args, "out", None)  # a folder, except save's FILE.gguf
            check_output_path(out, "--out", folder=not str(out).lower().endswith(".gguf"))
            return int(args.func(args) or 0)
        except QuantscopeError as e:
            sys.stderr.write(f"quantscope: error: {one_line(e)}\n")
            return 2
        except OSError as e:  # a file that could not be written (disk full, a folder gone): one line too
            where = f"{e.filename}: " if e.filename else ""
            sys.stderr.write(f"quantscope: error: cannot write {where}{one_line(e.strerror or e)}\n")
            return 2
        except KeyboardInterrupt:
            sys.stderr.write("quantscope: interrupted\n")
            return 130
