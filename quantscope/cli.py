"""The command line: a thin layer over quantscope.api.

Human tables go to stdout, progress and warnings to stderr, machine output to the --json file. A user
mistake (QuantscopeError) is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys

from .errors import QuantscopeError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the whole usage)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _task_arg(s: str) -> tuple[str, str]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"--task takes NAME=PATH, got '{s}'")
    name, path = s.split("=", 1)
    return name.strip(), path.strip()


def _fmt(x, spec=".3f", none="-"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def comparison_table(records: list[dict]) -> str:
    """The side-by-side table printed by `quantscope compare` and `quantscope show`."""
    from .compare import fmt_bytes

    head = ["format", "bits/w", "weights", "perplexity", "Δppl [95% CI]", "KLD mean", "KLD p99", "top-1",
            "prefill t/s", "decode t/s", "quant s", "peak RSS"]
    rows = []
    for r in records:
        if r.get("error"):
            rows.append([r["format"], "-", "-", "skipped: " + r["error"][:90]] + [""] * 8)
            continue
        ci = r.get("perplexity_delta_ci")
        if r.get("baseline"):
            delta = "baseline"
        elif ci:
            sig = " *" if r.get("perplexity_delta_significant") else ""
            delta = f"{r['perplexity_delta']:+.3f} [{ci[0]:+.3f},{ci[1]:+.3f}]{sig}"
        else:
            delta = "-"
        rows.append([
            r["format"], _fmt(r.get("bits_per_weight"), ".2f"), fmt_bytes(r.get("weight_bytes")),
            f"{r['perplexity']:.3f}±{r['perplexity_stderr']:.3f}", delta,
            f"{r['kld_mean']:.4f}±{r['kld_stderr']:.4f}", _fmt(r.get("kld_p99"), ".3f"),
            f"{100 * r['top1_agreement']:.1f}%", _fmt(r.get("prefill_tokens_per_s"), ".0f"),
            _fmt(r.get("decode_tokens_per_s"), ".1f"), _fmt(r.get("quantize_seconds"), ".1f"),
            fmt_bytes(r.get("peak_rss_bytes")),
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def task_table(records: list[dict]) -> str:
    names = sorted({t for r in records for t in (r.get("tasks") or {})})
    if not names:
        return ""
    lines = []
    for name in names:
        lines.append(f"\n{name}")
        for r in records:
            t = (r.get("tasks") or {}).get(name)
            if not t:
                continue
            ci = t.get("acc_ci") or [float("nan")] * 2
            line = f"  {r['format']:<22} n={t['n']:<5} acc {100 * t['acc']:.1f}% [{100 * ci[0]:.1f},{100 * ci[1]:.1f}]"
            if t.get("acc_norm") is not None:
                line += f"  acc_norm {100 * t['acc_norm']:.1f}%"
            if t.get("delta") is not None and not r.get("baseline"):
                dci = t["delta_ci"]
                sig = " *" if t.get("significant") else ""
                line += (f"  Δ {100 * t['delta']:+.1f} pts [{100 * dci[0]:+.1f},{100 * dci[1]:+.1f}]{sig}"
                         f"  McNemar p={t['mcnemar_p']:.3g}")
            lines.append(line)
    return "\n".join(lines)


def ctx_sweep_table(records: list[dict]) -> str:
    lens = sorted({int(L) for r in records for L in (r.get("ctx_sweep") or {})})
    if not lens:
        return ""
    lines = ["\nlong context (--ctx-sweep): perplexity / KLD mean at each context length"]
    lines.append("  " + "format".ljust(22) + "".join(f"{L:>22}" for L in lens))
    for r in records:
        cs = r.get("ctx_sweep") or {}
        cells = []
        for L in lens:
            c = cs.get(str(L))
            cells.append(f"{c['perplexity']:.2f} / {c['kld_mean']:.4f}".rjust(22) if c else "-".rjust(22))
        lines.append("  " + r["format"].ljust(22) + "".join(cells))
    return "\n".join(lines)


def _cmd_compare(args) -> int:
    from .compare import CompareConfig, compare
    from .measure.speed import SpeedConfig
    from .results import write_json_atomic

    cfg = CompareConfig(
        model=args.model, formats=args.formats, text=args.text, ctx=args.ctx, windows=args.windows,
        score_second_half=args.score_second_half, include=tuple(args.include), exclude=tuple(args.exclude),
        calib=args.calib, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
        speed=SpeedConfig(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens),
        measure_speed=not args.no_speed, isolate=not args.no_isolate, threads=args.threads,
        trust_remote_code=args.trust_remote_code, tasks=tuple(args.task), task_limit=args.limit,
        task_sample_seed=args.sample_seed, task_shots=args.shots, ctx_sweep=args.ctx_sweep,
    )
    done: list[dict] = []

    def on_record(rec):
        done.append(rec)
        status = "skipped: " + rec["error"] if rec.get("error") else (
            f"ppl {rec['perplexity']:.3f}, KLD {rec['kld_mean']:.4f}, {rec['bits_per_weight']:.2f} bits/w")
        if not args.quiet:
            print(f"[{len(done)}] {rec['format']}: {status}", file=sys.stderr, flush=True)
        if args.json:  # written after every format, atomically: a killed run keeps what it finished
            write_json_atomic(args.json, done)

    from .compare import default_run_dir

    run_dir = None if args.no_store else (args.out or default_run_dir(cfg))
    records, meta = compare(cfg, on_record=on_record, run_dir=run_dir)
    if args.json:
        write_json_atomic(args.json, records)
    print(f"model: {meta['model']}")
    print(f"text: {meta['text']}, ctx {meta['ctx']}, {meta['windows']} windows, "
          f"{records[0].get('tokens_scored', '?')} tokens scored ({meta['scoring']})")
    for n in meta["notes"]:
        print(f"note: {n}")
    print()
    print(comparison_table(records))
    t = task_table(records)
    if t:
        print(t)
    s = ctx_sweep_table(records)
    if s:
        print(s)
    print("\nΔppl: paired bootstrap over windows vs the baseline; * = the 95% interval excludes zero.")
    if run_dir:
        reused = sum(1 for r in records if r.get("reused"))
        print(f"run directory: {run_dir}" + (f" ({reused} of {len(records)} rows reused from earlier runs)" if reused else ""))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _cmd_formats(args) -> int:
    from .api import list_formats

    rows = list_formats()
    w = max(len(r["name"]) for r in rows)
    for r in rows:
        inst = "yes" if r["installed"] else "no"
        line = f"{r['name']:<{w}}  {r['backend']:<14} {inst:<3} {r['bits_per_weight']:5.2f}  {r['description']}"
        if r["note"]:
            line += f"  [{r['note']}]"
        print(line)
    print("\nbits/w: own formats at a 1536x576 layer (codes + 16-bit scales/zeros); backends: code bits.")
    print("intN-gG takes any N in 2..8 and any group size G; add -sym for symmetric.")
    return 0


def _cmd_runs(args) -> int:
    import json

    from .store import list_runs

    runs = list_runs(args.root)
    if args.json:
        print(json.dumps(runs, indent=2, default=str))
        return 0
    if not runs:
        print(f"no runs under {args.root}")
        return 0
    for r in runs:
        extra = f"  error: {r['error']}" if r.get("error") else ""
        print(f"{r['name']:<40} {r.get('records', 0):>4} records  {r.get('created') or '':<25} {r.get('model') or ''}{extra}")
    return 0


def _load_run(ref: str, root: str):
    from .store import load_run, resolve_run

    return load_run(resolve_run(ref, root))


def _cmd_show(args) -> int:
    import json

    from .compare import add_paired_statistics

    run = _load_run(args.run, args.root)
    records = [dict(r) for r in run.records]
    add_paired_statistics(records)
    if args.json:
        print(json.dumps(records, indent=2, default=str))
        return 0
    print(f"run: {run.path}  model: {run.meta.get('model', '?')}  text: {run.meta.get('text', '?')}")
    print(comparison_table(records))
    t = task_table(records)
    if t:
        print(t)
    return 0


def _cmd_report(args) -> int:
    from .compare import add_paired_statistics
    from .report import write_report

    run = _load_run(args.run, args.root)
    records = [dict(r) for r in run.records]
    add_paired_statistics(records)
    html = args.html if (args.html or args.md) else str(run.path / "report.html")
    for p in write_report(records, run.meta, html_path=html, md_path=args.md):
        print(f"wrote {p}")
    return 0


def _cmd_sweep(args) -> int:
    from .sweep import load_study, run_study
    from .sweep_measure import measure_cell

    study = load_study(args.study)
    for f in study.formats:  # fail on a bad name before measuring anything
        __import__("quantscope.registry", fromlist=["resolve_format"]).resolve_format(f)

    def progress(i, total, model, fmt, text, skipped):
        if not args.quiet:
            print(f"[{i}/{total}] {model} {fmt} {text}: {'already done' if skipped else 'measured'}",
                  file=sys.stderr, flush=True)

    from .model.load import resolve

    out = run_study(study, args.out, measure_cell, retry_errors=args.retry_errors, progress=progress,
                    fingerprint_fn=lambda m: resolve(m)[2])
    records = [dict(r) for r in out.records]
    from .compare import add_paired_statistics

    add_paired_statistics(records)
    print(comparison_table(records))
    print(f"\nrun directory: {out.run_dir} ({out.measured} measured, {out.skipped} reused)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="quantscope", description="Quantize a causal LM into many formats and compare them.")
    p.add_argument("--version", action="version", version=f"quantscope {__import__('quantscope').__version__}")
    sub = p.add_subparsers(dest="cmd", parser_class=_Parser)

    c = sub.add_parser("compare", help="quantize into each format and measure them side by side")
    c.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M), a local HF folder, a Hub id or a .gguf file")
    c.add_argument("--formats", type=_csv, default=None, help="comma-separated format names (see 'quantscope formats')")
    c.add_argument("--text", default="python-docs", help="'python-docs', a .txt file or a .jsonl file with a 'text' field")
    c.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    c.add_argument("--windows", type=int, default=8, help="windows scored (default 8)")
    c.add_argument("--score-second-half", action="store_true", help="score only the second half of each window (llama.cpp)")
    c.add_argument("--include", action="append", default=[], help="module-name pattern to quantize too (repeatable)")
    c.add_argument("--exclude", action="append", default=[], help="module-name pattern to leave unquantized (repeatable)")
    c.add_argument("--calib", default=None, help="calibration text for GPTQ/AWQ (default: the head of --text)")
    c.add_argument("--calib-samples", type=int, default=128)
    c.add_argument("--calib-seqlen", type=int, default=512)
    c.add_argument("--task", type=_task_arg, action="append", default=[], help="NAME=PATH task (repeatable)")
    c.add_argument("--limit", type=int, default=None, help="questions per task (first N, or a sample with --sample-seed)")
    c.add_argument("--sample-seed", type=int, default=None)
    c.add_argument("--shots", type=int, default=0, help="few-shot examples (MMLU)")
    c.add_argument("--ctx-sweep", type=lambda s: tuple(int(x) for x in _csv(s)), default=(),
                   help="extra context lengths, e.g. 256,1024,2048: perplexity and KLD at each")
    c.add_argument("--prompt-tokens", type=int, default=64, help="speed test prompt length")
    c.add_argument("--new-tokens", type=int, default=16, help="speed test decode steps")
    c.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    c.add_argument("--no-isolate", action="store_true", help="measure in this process (peak RSS then accumulates)")
    c.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    c.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub (off by default)")
    c.add_argument("--json", default=None, help="write the records to this JSON file")
    c.add_argument("--out", default=None, help="run directory (default quantscope-runs/<model>-<text>-<hash>); re-running resumes")
    c.add_argument("--no-store", action="store_true", help="do not store records in a run directory")
    c.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    c.set_defaults(func=_cmd_compare)

    f = sub.add_parser("formats", help="list every format with its bits per weight")
    f.set_defaults(func=_cmd_formats)

    r = sub.add_parser("runs", help="list stored runs")
    r.add_argument("--root", default="quantscope-runs")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=_cmd_runs)
    sh = sub.add_parser("show", help="print a stored run's table again, without recomputing")
    sh.add_argument("run", help="run name (under --root) or path")
    sh.add_argument("--root", default="quantscope-runs")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=_cmd_show)
    rp = sub.add_parser("report", help="write a self-contained HTML (and/or Markdown) report of a run")
    rp.add_argument("run", help="run name (under --root) or path")
    rp.add_argument("--root", default="quantscope-runs")
    rp.add_argument("--html", default=None, help="HTML path (default: <run>/report.html)")
    rp.add_argument("--md", default=None, help="Markdown path")
    rp.set_defaults(func=_cmd_report)
    sw = sub.add_parser("sweep", help="run a study file (models x formats x texts x tasks), resumably")
    sw.add_argument("study", help="study .toml file")
    sw.add_argument("--out", default=None, help="run directory (default quantscope-runs/<study name>)")
    sw.add_argument("--retry-errors", action="store_true")
    sw.add_argument("--quiet", action="store_true")
    sw.set_defaults(func=_cmd_sweep)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "cmd", None):
        parser.print_help()
        return 2
    if getattr(args, "formats", "absent") is None:
        from .compare import DEFAULT_FORMATS

        args.formats = DEFAULT_FORMATS
    try:
        return int(args.func(args) or 0)
    except QuantscopeError as e:
        sys.stderr.write(f"quantscope: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("quantscope: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
