"""`quantscope sweep`: a study file (models x formats x texts x tasks), resumably, here or on Ray."""

from __future__ import annotations

from . import options as o


def add_parser(sub) -> None:
    sw = sub.add_parser("sweep", help="run a study file (models x formats x texts x tasks), resumably")
    sw.add_argument("study", help="study .toml file")
    sw.add_argument("--out", default=None, help="run directory (default quantscope-runs/<study name>)")
    sw.add_argument("--retry-errors", action="store_true", help="measure again the cells that failed last time")
    sw.add_argument("--quiet", action="store_true", help="no progress on stderr")
    o.add_ray(sw)
    o.add_json(sw, "the records, paired")
    sw.set_defaults(func=run)


def run(args) -> int:
    from ..api import run_sweep
    from ..errors import QuantscopeError
    from ..report.terminal import comparison_table

    def progress(i, total, model, fmt, text, skipped):
        o.note(args, f"[{i}/{total}] {model} {fmt} {text}: {'already done' if skipped else 'measured'}")

    out, records = run_sweep(args.study, args.out, retry_errors=args.retry_errors, progress=progress,
                             ray=o.ray_options(args), say=lambda line: o.note(args, line))
    o.out(args, comparison_table(records))
    o.out(args, f"\nrun directory: {out.run_dir} ({out.measured} measured, {out.skipped} reused)")
    o.emit(args, records)
    failed = [r for r in records if r.get("error")]
    if failed:  # the others are stored; the line names each failed cell and why (an install hint, a crash)
        why = "; ".join(f"{r.get('model')} {r['format']} {r.get('text')}: {r['error']}" for r in failed)
        raise QuantscopeError(f"{len(failed)} of {len(records)} cells failed ({why}); the others are stored in "
                              f"{out.run_dir} (--retry-errors measures the failed ones again)")
    return 0
