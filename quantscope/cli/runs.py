"""`quantscope runs`, `show` and `report`: stored runs listed, shown again, written as a report."""

from __future__ import annotations

from . import options as o


def add_parsers(sub) -> None:
    r = sub.add_parser("runs", help="list stored runs")
    o.add_root(r)
    o.add_json(r, "the list")
    r.set_defaults(func=runs)
    sh = sub.add_parser("show", help="print a stored run's table again, without recomputing")
    sh.add_argument("run", help="run name (under --root) or path")
    o.add_root(sh)
    o.add_json(sh, "the run's records, paired")
    sh.set_defaults(func=show)
    rp = sub.add_parser("report", help="write a self-contained HTML (and/or Markdown) report of a run")
    rp.add_argument("run", help="run name (under --root) or path")
    o.add_root(rp)
    rp.add_argument("--html", default=None, help="HTML path (default: <run>/report.html)")
    rp.add_argument("--md", default=None, help="Markdown path")
    o.add_json(rp, "the paths written")
    rp.set_defaults(func=report)


def runs(args) -> int:
    from ..api import list_runs

    rows = list_runs(args.root)
    if not rows:
        o.out(args, f"no runs under {args.root}")
    for r in rows:
        extra = f"  error: {r['error']}" if r.get("error") else ""
        o.out(args, f"{r['name']:<40} {r.get('records') or 0:>4} records  {r.get('created') or '':<25} "
                    f"{r.get('model') or ''}{extra}")
    o.emit(args, rows)
    return 0


def show(args) -> int:
    from ..api import load_paired_run
    from ..report.terminal import comparison_table, generation_table, task_table

    run, records = load_paired_run(args.run, args.root)
    o.out(args, f"run: {run.path}  model: {run.meta.get('model', '?')}  text: {run.meta.get('text', '?')}")
    o.out(args, comparison_table(records))
    for t in (task_table(records), generation_table(records)):
        if t:
            o.out(args, t)
    o.emit(args, records)
    return 0


def report(args) -> int:
    from ..api import load_paired_run
    from ..report import write_report

    for option, path in (("--html", args.html), ("--md", args.md)):
        o.check_output_path(path, option)
    run, records = load_paired_run(args.run, args.root)
    html = args.html if (args.html or args.md) else str(run.path / "report.html")
    written = [str(p) for p in write_report(records, run.meta, html_path=html, md_path=args.md)]
    for p in written:
        o.out(args, f"wrote {p}")
    o.emit(args, {"written": written})
    return 0
