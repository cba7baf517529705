"""What every command shares: the parser that fails in one line, and the option groups defined once."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

MODEL_HELP = "'default' (embedded SmolLM2-135M), a local HF folder, a Hub id or a .gguf file"
TEXT_HELP = "'python-docs', a .txt file or a .jsonl file with a 'text' field"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the whole usage)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def names(s: str) -> tuple[str, ...]:
    """A comma-separated list that names at least one thing ('' or ',,' is a mistake, not the defaults)."""
    got = csv(s)
    if not got:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got '{s}'")
    return got


def count(s: str) -> int:
    """An integer >= 0."""
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{s}'") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def task_arg(s: str) -> tuple[str, str]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"--task takes NAME=PATH, got '{s}'")
    name, path = s.split("=", 1)
    return name.strip(), path.strip()


def add_model(p: argparse.ArgumentParser) -> None:
    """--model, and where and in which dtype it runs (--device, --dtype)."""
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--device", default="auto",
                   help="auto (the first GPU, else MPS, else the CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto",
                   help="the baseline's dtype: auto (the checkpoint's own on a GPU, fp32 on the CPU), fp32, bf16, fp16")


def add_text(p: argparse.ArgumentParser, ctx: int = 512, windows: int = 8, help: str = TEXT_HELP) -> None:
    p.add_argument("--text", default="python-docs", help=help)
    p.add_argument("--ctx", type=int, default=ctx, help=f"tokens per window (default {ctx})")
    p.add_argument("--windows", type=int, default=windows, help=f"windows scored (default {windows})")


def add_selection(p: argparse.ArgumentParser, what: str = "quantize") -> None:
    p.add_argument("--include", action="append", default=[],
                   help=f"module-name pattern to {what} too, e.g. embed_tokens (repeatable)")
    p.add_argument("--exclude", action="append", default=[], help="module-name pattern to leave out (repeatable)")


def add_calibration(p: argparse.ArgumentParser, default: str | None = None,
                    help: str = "calibration text for GPTQ/AWQ (default: the head of --text)") -> None:
    p.add_argument("--calib", default=default, help=help)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)


def add_tasks(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", type=task_arg, action="append", default=[], help="NAME=PATH task (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="questions per task (first N, or a sample with --sample-seed)")


def add_generation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gen-prompts", default=None, metavar="FILE|default",
                   help="generation agreement: a JSONL of {\"prompt\": ...} or {\"messages\": [...]} lines, or "
                        "'default' (a set shipped with quantscope)")
    p.add_argument("--gen-tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")


def add_process(p: argparse.ArgumentParser, remote_code: bool = True) -> None:
    """Threads, remote code and progress: every command that loads a model."""
    p.add_argument("--threads", type=int, default=None, help="torch threads (per worker process)")
    if remote_code:
        p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub (off by default)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="after each format, where its time went (load, quantize, reference/evaluation, speed) on stderr")


def timing_note(args, rec: dict) -> None:
    """--verbose: one line per record with its phases, tokens scored per second and kernel."""
    if not getattr(args, "verbose", False) or rec.get("error"):
        return
    from ..harness.timings import describe

    state = "reused: measured earlier" if rec.get("reused") else "time"
    eps = rec.get("eval_tokens_per_s")
    note(args, f"    {state}: {describe(rec.get('timings'))}" + (f"; {eps:.0f} tokens scored/s" if eps else "")
         + (f"; kernel {rec['kernel']}" if rec.get("kernel") else ""))


def add_ray(p: argparse.ArgumentParser) -> None:
    """--ray and the resources each Ray task declares (sweep, compare)."""
    g = p.add_argument_group("Ray (pip install 'quantscope[ray]')")
    g.add_argument("--ray", nargs="?", const="auto", default=None, metavar="auto|local|HOST:PORT",
                   help="run each format as a task on a Ray cluster: auto (the cluster this machine belongs to), "
                        "local (start one here for this run) or the head's HOST:PORT")
    g.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs per task, also its torch threads (default 1)")
    g.add_argument("--ray-gpus", type=float, default=None, help="GPUs per task (default: 1 when the device is a GPU)")
    g.add_argument("--ray-memory", default=None, metavar="SIZE",
                   help="memory per task, e.g. 6GiB (default: the planner's estimate of the task's peak)")
    g.add_argument("--ray-retries", type=count, default=2, help="re-runs of a task whose worker or node died (default 2)")
    g.add_argument("--ray-reference", choices=("recompute", "share"), default="recompute",
                   help="the baseline's log-probabilities: recomputed in every task (default) or shared "
                        "through Ray's object store")


def ray_options(args):
    """RayOptions from --ray*, or None without --ray."""
    if getattr(args, "ray", None) is None:
        return None
    from ..harness.ray_run import RayOptions
    from ..units import parse_memory

    return RayOptions(address=args.ray, cpus=args.ray_cpus, gpus=args.ray_gpus, max_retries=args.ray_retries,
                      memory=parse_memory(args.ray_memory) if args.ray_memory else None,
                      reference=args.ray_reference)


def add_json(p: argparse.ArgumentParser, what: str = "the results") -> None:
    p.add_argument("--json", default=None, metavar="PATH",
                   help=f"write {what} as JSON to PATH ('-': print to stdout instead of the tables)")


def add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="quantscope-runs", help="folder holding the run directories")


def _is_sqlite(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def check_output_path(path: str | None, option: str = "--json", folder: bool = False) -> None:
    """Refuse an output path that could not be written, before any work: a directory where a file goes
    (a file where a `folder` goes), or a parent that is a file or not writable. '-' (stdout) and None
    pass; missing parent folders are fine, they are created when the file is written."""
    from ..errors import QuantscopeError

    if path is None or (path == "-" and not folder):
        return
    if not str(path).strip():
        raise QuantscopeError(f"{option} is empty: give a {'folder' if folder else 'file'} path")
    p = Path(path)
    if p.is_dir() and not folder:
        raise QuantscopeError(f"{option} {path} is a directory: give a file path")
    if p.is_file() and not folder and _is_sqlite(p):
        raise QuantscopeError(f"{option} {path} is a result store (SQLite): refusing to overwrite it, give "
                              "another path")
    if p.exists() and not p.is_dir() and folder:
        raise QuantscopeError(f"{option} {path} is a file: give a folder path")
    parent = p.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise QuantscopeError(f"cannot write {option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QuantscopeError(f"cannot write {option} {path}: {parent} is not writable")


def progress_wanted(args) -> bool:
    return sys.stderr.isatty() and not getattr(args, "quiet", False)


def json_to_stdout(args) -> bool:
    """`--json -`: stdout carries the JSON alone, so the human tables are not printed."""
    return getattr(args, "json", None) == "-"


def out(args, text: str = "") -> None:
    """A line of the human output (suppressed when stdout carries JSON)."""
    if not json_to_stdout(args):
        print(text)


def emit(args, obj) -> None:
    """The command's machine output, where --json says."""
    from ..fileio import emit_json

    if args.json:
        emit_json(args.json, obj)
        if not json_to_stdout(args):
            print(f"wrote {args.json}")


def note(args, line: str) -> None:
    if not getattr(args, "quiet", False):
        print(line, file=sys.stderr, flush=True)


def warn(line: str) -> None:
    """A note about how the work is done (shown even with --quiet, which silences progress only)."""
    print(f"note: {line}", file=sys.stderr, flush=True)
