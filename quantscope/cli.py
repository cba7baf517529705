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
    rows, skipped = [], []
    for r in records:
        if r.get("error"):  # a line of its own after the columns: the reason never widens them
            skipped.append((r["format"], "skipped: " + r["error"]))
            continue
        delta = _delta_cell(r)
        rows.append([
            r["format"], _fmt(r.get("bits_per_weight"), ".2f"), fmt_bytes(r.get("weight_bytes")),
            f"{r['perplexity']:.3f}±{r['perplexity_stderr']:.3f}", delta,
            f"{r['kld_mean']:.4f}±{r['kld_stderr']:.4f}", _fmt(r.get("kld_p99"), ".3f"),
            f"{100 * r['top1_agreement']:.1f}%", _fmt(r.get("prefill_tokens_per_s"), ".0f"),
            _fmt(r.get("decode_tokens_per_s"), ".1f"), _fmt(r.get("quantize_seconds"), ".1f"),
            fmt_bytes(r.get("peak_rss_bytes")),
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    widths[0] = max([widths[0]] + [len(f) for f, _ in skipped])
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows]
    lines += [f"{f.ljust(widths[0])}  {why}" for f, why in skipped]
    return "\n".join(lines)


def task_table(records: list[dict], paired_with: str = "the baseline") -> str:
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
            if t.get("perplexity") is not None:  # LAMBADA: the perplexity of the target word
                line += f"  last-word ppl {t['perplexity']:.2f}±{t['perplexity_stderr']:.2f}"
                pci = t.get("perplexity_delta_ci")
                if pci and not r.get("baseline"):
                    sig = " *" if pci[0] > 0 or pci[1] < 0 else ""
                    line += f" Δ {t['perplexity_delta']:+.2f} [{pci[0]:+.2f},{pci[1]:+.2f}]{sig}"
            lines.append(line)
    cats = sorted({c for r in records for c in (r.get("task_categories") or {})})
    if cats:
        lines.append(f"\nwhere each format loses: accuracy change per category, questions pooled, paired with {paired_with}")
        lines.append("  " + "format".ljust(22) + "".join(c.rjust(30) for c in cats))
        for r in records:
            tc = r.get("task_categories") or {}
            if not tc:
                continue
            cells = []
            for c in cats:
                t = tc.get(c)
                cell = "-" if t is None else (f"{100 * t['delta']:+.1f} [{100 * t['delta_ci'][0]:+.1f},"
                                              f"{100 * t['delta_ci'][1]:+.1f}]{' *' if t['significant'] else '  '}")
                cells.append(cell.rjust(30))
            lines.append("  " + r["format"].ljust(22) + "".join(cells))
        members: dict[str, set] = {c: set() for c in cats}
        for r in records:
            for c, t in (r.get("task_categories") or {}).items():
                members[c].update(t["tasks"])
        lines.append("  " + ", ".join(f"{c}: {' + '.join(sorted(members[c]))}" for c in cats))
    return "\n".join(lines)


def _delta_cell(r: dict) -> str:
    """A record's (or a context-sweep cell's) Δppl with its paired interval, or why it has none."""
    ci = r.get("perplexity_delta_ci")
    if r.get("baseline"):
        return "baseline"
    if ci:
        sig = " *" if r.get("perplexity_delta_significant") else ""
        return f"{r['perplexity_delta']:+.3f} [{ci[0]:+.3f},{ci[1]:+.3f}]{sig}"
    if r.get("perplexity_delta") is not None:
        return f"{r['perplexity_delta']:+.3f} (no CI: <5 windows)"
    return "-"


def ctx_sweep_table(records: list[dict]) -> str:
    """--ctx-sweep: per format and context length, perplexity, its paired delta and KLD vs the baseline."""
    lens = sorted({int(L) for r in records for L in (r.get("ctx_sweep") or {})})
    if not lens:
        return ""
    head = ["format", "ctx", "tokens", "perplexity", "Δppl [95% CI]", "KLD mean", "top-1"]
    rows = []
    for r in records:
        for L in lens:
            c = (r.get("ctx_sweep") or {}).get(str(L))
            if not c:
                continue
            cell = {**c, "baseline": r.get("baseline")}
            rows.append([r["format"], str(L), str(c["tokens_scored"]),
                         f"{c['perplexity']:.3f}±{c['perplexity_stderr']:.3f}", _delta_cell(cell),
                         f"{c['kld_mean']:.4f}±{c['kld_stderr']:.4f}", f"{100 * c['top1_agreement']:.1f}%"])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["\nlong context (--ctx-sweep): the same text in windows of each length, paired with the baseline"]
    lines += ["  " + "  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [head, *rows]]
    return "\n".join(lines)


def _cmd_compare(args) -> int:
    from .compare import CompareConfig, compare
    from .measure.speed import SpeedConfig
    from .results import write_json_atomic

    formats = tuple(args.formats or CompareConfig.formats)
    formats += tuple(f"mixed-auto:{b}:{args.ladder}" for b in (*args.target_bpw, *args.target_bytes))
    cfg = CompareConfig(
        model=args.model, formats=formats, text=args.text, ctx=args.ctx, windows=args.windows,
        score_second_half=args.score_second_half, include=tuple(args.include), exclude=tuple(args.exclude),
        calib=args.calib, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
        speed=SpeedConfig(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens),
        measure_speed=not args.no_speed, isolate=not args.no_isolate, threads=args.threads,
        trust_remote_code=args.trust_remote_code, tasks=tuple(args.task), task_limit=args.limit,
        task_sample_seed=args.sample_seed, task_shots=args.shots, ctx_sweep=args.ctx_sweep,
        lm_eval_tasks=tuple(args.lm_eval_task), lm_eval_include=args.lm_eval_include,
        progress=sys.stderr.isatty() and not args.quiet,
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
    print("mixed precision: mixed-edges:BASE/WIDE (first and last blocks in WIDE) and")
    print("mixed-auto:BPW:F1/F2/... (per-layer formats allocated by measured sensitivity to BPW bits/weight).")
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


def _progress(label: str, quiet: bool):
    """A (done, total) callback printing one updating line on stderr, or None when quiet / not a terminal."""
    if quiet or not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        sys.stderr.write(f"\r{label}: {done}/{total}" + ("\n" if done == total else ""))
        sys.stderr.flush()

    return show


def sensitivity_table(rows: list[dict], top: int | None = None) -> str:
    from .compare import fmt_bytes

    shown = rows[:top] if top else rows
    total = sum(r["kld"] for r in rows) or float("nan")
    head = ["rank", "layer", "params", "bytes", "KLD mean", "± s.e.", "share"]
    body = [[str(i), r["name"] + (f" (+{', '.join(r['modules'][1:])})" if len(r["modules"]) > 1 and r["name"] == r["modules"][0] else ""),
             f"{r['params']:,}", fmt_bytes(r["bytes"]), f"{r['kld']:.4g}", f"{r['kld_stderr']:.2g}",
             f"{100 * r['kld'] / total:.1f}%"] for i, r in enumerate(shown, 1)]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in body])


def _cmd_sensitivity(args) -> int:
    import torch

    from .results import write_json_atomic
    from .sensitivity import SensitivityConfig, run_sensitivity

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SensitivityConfig(model=args.model, format=args.format, unit=args.unit, text=args.text,
                            windows=args.windows, ctx=args.ctx, include=tuple(args.include),
                            exclude=tuple(args.exclude), include_embeddings=args.include_embeddings,
                            trust_remote_code=args.trust_remote_code, use_cache=not args.no_cache)
    rows, meta = run_sensitivity(cfg, _progress("sensitivity", args.quiet))
    print(f"model: {meta['model']}\nformat: {meta['format']}, one {meta['unit']} at a time (round-to-nearest); "
          f"text: {meta['text']}, {meta['windows']} x {meta['ctx']} tokens from its start")
    print(sensitivity_table(rows, args.top))
    if args.top and len(rows) > args.top:
        print(f"({args.top} of {len(rows)} shown; --top 0 shows all)")
    print("KLD: mean per-token KL divergence from the unquantized model with only that unit quantized; "
          "share: of the sum over units (the additive prediction of quantizing them all).")
    if args.json:
        write_json_atomic(args.json, {"meta": meta, "rows": rows})
        print(f"wrote {args.json}")
    if args.out:
        from .store import RunStore

        with RunStore.open(args.out) as store:
            store.update_meta({"sensitivity": [{"layer": r["name"], **r} for r in rows], "sensitivity_meta": meta})
        print(f"stored in run directory {args.out} (shown by 'quantscope report')")
    return 0


def _recommend_target(args, baseline: str):
    """(Target, Ladder) from the command line: the recipe's ladder, or a scenario's, with overrides."""
    from dataclasses import replace

    from .plan.devices import parse_memory
    from .recommend import DEFAULT_LADDER, Target, recipe_ladder, scenario_target
    from .registry import resolve_format

    memory = parse_memory(args.memory) if args.memory else None
    quality = {k: v for k, v in (("max_ppl_increase_pct", args.max_ppl_increase), ("max_kld", args.max_kld),
                                 ("max_acc_drop_pct", args.max_acc_drop)) if v is not None}
    if args.max_acc_drop is not None and not args.task:
        raise QuantscopeError("--max-acc-drop needs --task NAME=PATH (the task whose accuracy may drop)")
    task = args.task[0][0] if len(args.task) == 1 else None
    mixed = tuple(resolve_format(f"mixed-auto:{b:g}:{args.mixed_ladder}").name for b in sorted(args.mixed_bpw))
    ladder = recipe_ladder(calibrated=args.calib is not None, mixed=mixed, fallback=(baseline, "bf16"))
    if not args.scenario:
        return Target(**quality, task=task, memory_bytes=memory, prefer=args.prefer or "smallest"), ladder
    overrides = dict(quality, **({"prefer": args.prefer} if args.prefer else {}))
    target, scenario_ladder = scenario_target(args.scenario, memory_bytes=memory, task=task, **overrides)
    if scenario_ladder is not DEFAULT_LADDER:  # e.g. research: int8 only, otherwise full precision
        ladder = replace(scenario_ladder, fallback=ladder.fallback)
    return target, ladder


def _model_sizes(model: str, dtype: str, include=(), exclude=()):
    """size_of(format) -> weight bytes from the model's config.json (planner), or None if not plannable
    (then recommend measures a format to learn its size). The planner knows the default selection
    (every decoder linear) only, so a changed selection is measured too."""
    if include or exclude:
        return None
    from .methods.mixed import MixedSpec, mixed_weight_bytes
    from .model.load import resolve
    from .plan import planner
    from .registry import resolve_format

    try:
        config = planner.load_config(resolve(model)[1])
        planner.geometry(config)
    except QuantscopeError as e:
        print(f"note: weight sizes will be measured, not planned ({e})", file=sys.stderr)
        return None
    base = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)

    def size_of(fmt: str) -> int:
        spec = resolve_format(fmt)
        if isinstance(spec, MixedSpec):
            return mixed_weight_bytes(config, spec, baseline_dtype=base)
        return planner.weight_bytes_for_model_config(config, spec.name, baseline_dtype=base)

    return size_of


def _trail_lines(decision) -> list[str]:
    from .compare import fmt_bytes

    lines = []
    for i, t in enumerate(decision.trail, 1):
        n = t.numbers
        got = []
        if "weight_bytes" in n:
            got.append(f"weights {fmt_bytes(n['weight_bytes'])}")
        if "perplexity" in n:
            ci = n.get("perplexity_delta_ci")
            got.append(f"ppl {n['perplexity']:.3f}" + (f" (Δ [{ci[0]:+.3f}, {ci[1]:+.3f}])" if ci else ""))
        if "kld_mean" in n:
            got.append(f"KLD {n['kld_mean']:.4g}±{n.get('kld_stderr', float('nan')):.2g}")
        if n.get("decode_tokens_per_s"):
            got.append(f"decode {n['decode_tokens_per_s']:.1f} t/s")
        lines.append(f"  {i}. {t.verdict.upper():<7} {t.format} ({t.step})" + (f": {', '.join(got)}" if got else ""))
        lines.append(f"     {t.why}")
    return lines


def _cmd_recommend(args) -> int:
    from dataclasses import replace

    from .compare import CompareConfig, _baseline_name, compare, default_run_dir
    from .recommend import recommend
    from .results import write_json_atomic
    from .store import RunStore

    baseline = _baseline_name("float32")
    target, ladder = _recommend_target(args, baseline)
    cfg = CompareConfig(model=args.model, formats=(baseline,), text=args.text, ctx=args.ctx, windows=args.windows,
                        calib=args.calib, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                        measure_speed=target.prefer == "fastest", isolate=not args.no_isolate, threads=args.threads,
                        trust_remote_code=args.trust_remote_code, tasks=tuple(args.task), task_limit=args.limit,
                        include=tuple(args.include), exclude=tuple(args.exclude),
                        reserve_calib=True,  # every step on the same windows, calibrated or not
                        progress=sys.stderr.isatty() and not args.quiet)
    run_dir = args.out or default_run_dir(cfg)
    if not args.quiet:
        print(f"target: {target.describe()} (the upper end of each 95% interval is checked)", file=sys.stderr)

    def measure(fmt: str) -> dict:
        def show(rec):
            if not args.quiet:
                state = "reused" if rec.get("reused") else "measured"
                print(f"[{state}] {rec['format']}" + (f": error {rec['error']}" if rec.get("error") else ""),
                      file=sys.stderr, flush=True)

        records, _ = compare(replace(cfg, formats=(fmt,)), on_record=show, run_dir=run_dir)
        return next(r for r in records if r["format"] == fmt)

    decision = recommend(target, measure, ladder, size_of=_model_sizes(args.model, cfg.dtype, cfg.include, cfg.exclude))
    steps = [{"format": t.format, "ladder_step": t.step, "passed": {"pass": True, "fail": False}.get(t.verdict),
              "reason": t.why,
              **{k: v for k, v in t.numbers.items() if k in ("weight_bytes", "perplexity", "kld_mean", "checked_upper")}}
             for t in decision.trail]
    summary = {"chosen": decision.chosen, "meets_target": decision.meets_target, "reason": decision.reason,
               "target": target.describe(), "steps": steps}
    with RunStore.open(run_dir) as store:  # `quantscope report` shows the trail
        store.update_meta({"recommendation": summary})
    print(f"target: {target.describe()}; a format passes when the upper end of its 95% interval meets it")
    print("decision trail:")
    print("\n".join(_trail_lines(decision)))
    print(f"\nrecommended: {decision.chosen}" + ("" if decision.meets_target else " (does NOT meet the target)"))
    print(f"why: {decision.reason}")
    print(f"run directory: {run_dir} ('quantscope report {run_dir}' shows the trail)")
    if args.json:
        write_json_atomic(args.json, {**decision.to_dict(), "run_dir": str(run_dir)})
        print(f"wrote {args.json}")
    return 0


def plan_table(rows, devices, custom) -> str:
    """The `quantscope plan` table: exact weights and KV cache, estimated overhead, where it fits."""
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    usable = {d.name: d.usable_bytes for d in devices}
    head = ["format", "bits/w", "weights", "KV cache", "overhead*", "total", "smallest listed device that fits"]
    head += [d.name for d in custom]
    body = []
    for r in rows:
        listed = [n for n in r.fits if n not in {d.name for d in custom}]
        smallest = min(listed, key=usable.__getitem__) if listed else "none"
        body.append([r.format, f"{r.bits_per_weight:.2f}", gb(r.weight_bytes), gb(r.kv_cache_bytes),
                     gb(r.overhead_bytes), gb(r.total_bytes), smallest]
                    + ["yes" if d.name in r.fits else "no" for d in custom])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in body])


def _cmd_plan(args) -> int:
    import json
    from dataclasses import asdict

    from .plan import planner
    from .plan.devices import DEVICES, parse_device, parse_memory

    config = planner.load_config(args.model)
    g = planner.geometry(config)
    custom = [parse_device(d) for d in args.device]
    devices = list(DEVICES) + [d for d in custom if d not in DEVICES]
    assumptions = planner.RuntimeAssumptions(
        framework_bytes=parse_memory(args.framework_overhead) if args.framework_overhead else planner.RuntimeAssumptions.framework_bytes,
        attention=args.attention)
    rows = planner.plan(config, args.formats, args.ctx, args.batch, kv_dtype=args.kv_dtype,
                        embed_format=args.embed_format, devices=devices, assumptions=assumptions)
    if args.json:
        print(json.dumps({"model": args.model, "ctx": args.ctx, "batch": args.batch, "kv_dtype": args.kv_dtype,
                          "assumptions": asdict(assumptions), "devices": [asdict(d) for d in devices],
                          "rows": [r.to_dict() for r in rows]}, indent=2))
        return 0
    print(f"model: {args.model} ({g.model_type}, {g.layers} layers, hidden {g.hidden}, {g.kv_heads} KV heads x "
          f"{g.head_dim}, vocab {g.vocab}, {'tied' if g.tied else 'untied'} head, unquantized tensors in {g.dtype})")
    print(f"ctx {args.ctx} x batch {args.batch}, KV cache in {args.kv_dtype}"
          + (f", embeddings in {args.embed_format}" if args.embed_format else ""))
    print(plan_table(rows, devices, custom))
    a = assumptions
    print(f"\nweights and KV cache are exact (config.json only; nothing loaded). *overhead is an ESTIMATE: "
          f"activations of one prefill ({a.attention} attention, {a.activation_dtype}) + one dequantized weight "
          f"(quantscope's QuantLinear) + a {a.framework_bytes / 2**30:g} GiB framework allowance.")
    for note in dict.fromkeys(n for r in rows for n in r.notes):
        print(f"note: {note}")
    return 0


MODEL_HELP = "'default' (embedded SmolLM2-135M), a local HF folder, a Hub id or a .gguf file"


def _cmd_save(args) -> int:
    import json

    from .compare import fmt_bytes
    from .save import SaveConfig, save

    cfg = SaveConfig(format=args.format, out=args.out, model=args.model, calib=args.calib,
                     calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, include=tuple(args.include),
                     exclude=tuple(args.exclude), threads=args.threads, trust_remote_code=args.trust_remote_code)
    r = save(cfg)
    if args.json:
        print(json.dumps(r.as_dict(), indent=2))
        return 0
    print(f"wrote {r.out}: compressed-tensors pack-quantized checkpoint (vLLM, transformers), "
          f"{r.linears} quantized linears, {fmt_bytes(r.file_bytes)} of safetensors")
    for g, v in r.groups.items():
        w = v["weights"]
        print(f"  {g}: {v['layers']} layers, int{w['num_bits']} {'symmetric' if w['symmetric'] else 'asymmetric'}, "
              + (f"groups of {w['group_size']}" if w["strategy"] == "group" else "per output channel"))
    print(f"read back before it was moved into place (compressed-tensors {r.versions['compressed-tensors']} unpacked "
          f"every layer, transformers rebuilt the model): weights identical to quantscope's (max |Δ| "
          f"{r.max_weight_diff:g}); logits on {r.check_tokens} tokens: max |Δ| {r.max_logit_diff:.2g}")
    for n in r.notes:
        print(f"note: {n}")
    return 0


def _add_process_options(p: argparse.ArgumentParser) -> None:
    """Options every measuring subcommand shares."""
    p.add_argument("--threads", type=int, default=None, help="torch threads (per worker process)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub (off by default)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="quantscope", description="Quantize a causal LM into many formats and compare them.")
    p.add_argument("--version", action="version", version=f"quantscope {__import__('quantscope').__version__}")
    sub = p.add_subparsers(dest="cmd", parser_class=_Parser)

    c = sub.add_parser("compare", help="quantize into each format and measure them side by side")
    c.add_argument("--model", default="default", help=MODEL_HELP)
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
    c.add_argument("--target-bpw", type=_csv, default=(), metavar="BPW[,BPW]",
                   help="add automatic mixed precision at these bits per weight (layers picked from --ladder by "
                        "measured sensitivity): mixed-auto:BPW:LADDER")
    c.add_argument("--target-bytes", type=_csv, default=(), metavar="SIZE[,SIZE]",
                   help="the same with a whole-model weight budget, e.g. 150MB (10^6) or 140MiB")
    c.add_argument("--ladder", default="int3-g128/int4-g128/int8",
                   help="formats --target-bpw/--target-bytes choose from (default int3-g128/int4-g128/int8)")
    c.add_argument("--task", type=_task_arg, action="append", default=[], help="NAME=PATH task (repeatable)")
    c.add_argument("--limit", type=int, default=None, help="questions per task (first N, or a sample with --sample-seed)")
    c.add_argument("--sample-seed", type=int, default=None)
    c.add_argument("--shots", type=int, default=0, help="few-shot examples (MMLU)")
    c.add_argument("--lm-eval-task", action="append", default=[], metavar="NAME",
                   help="an lm-evaluation-harness task run on every format, paired like --task (repeatable; "
                        "pip install 'quantscope[lmeval]'; --limit applies)")
    c.add_argument("--lm-eval-include", default=None, metavar="DIR",
                   help="directory of lm-eval task YAML files (then only its tasks are indexed)")
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

    se = sub.add_parser("sensitivity", help="rank layers by the KL divergence quantizing each alone causes")
    se.add_argument("--model", default="default", help=MODEL_HELP)
    se.add_argument("--format", default="int4-g128", help="round-to-nearest format each unit is quantized into")
    se.add_argument("--unit", choices=("layer", "block"), default="layer", help="one module, or one decoder block's linears, at a time")
    se.add_argument("--text", default="python-docs", help="calibration text: windows from its start")
    se.add_argument("--windows", type=int, default=2, help="windows scored (default 2)")
    se.add_argument("--ctx", type=int, default=256, help="tokens per window (default 256)")
    se.add_argument("--include", action="append", default=[], help="module-name pattern to scan too (repeatable)")
    se.add_argument("--exclude", action="append", default=[], help="module-name pattern to leave out (repeatable)")
    se.add_argument("--include-embeddings", action="store_true", help="scan the embedding and lm_head too (tied: one unit)")
    se.add_argument("--top", type=int, default=10, help="rows printed (0: all)")
    se.add_argument("--json", default=None, help="write every unit's row to this JSON file")
    se.add_argument("--out", default=None, help="run directory to store the ranking in (for 'quantscope report')")
    se.add_argument("--no-cache", action="store_true", help="measure again even if this scan is cached")
    _add_process_options(se)
    se.set_defaults(func=_cmd_sensitivity)

    rc = sub.add_parser("recommend", help="find the smallest format that meets a quality target, with its decision trail")
    rc.add_argument("--max-ppl-increase", type=float, default=None, metavar="PCT", help="perplexity may rise at most PCT %%")
    rc.add_argument("--max-kld", type=float, default=None, metavar="X", help="mean KL divergence from the baseline at most X")
    rc.add_argument("--max-acc-drop", type=float, default=None, metavar="PTS", help="task accuracy may drop at most PTS points (with --task)")
    rc.add_argument("--task", type=_task_arg, action="append", default=[], help="NAME=PATH task for --max-acc-drop")
    rc.add_argument("--limit", type=int, default=None, help="questions per task")
    rc.add_argument("--memory", default=None, help="the weights must fit this size, e.g. 4GB (10^9) or 4GiB")
    rc.add_argument("--prefer", choices=("smallest", "fastest"), default=None, help="among passing formats (default smallest)")
    rc.add_argument("--scenario", default=None, help="cloud-gpu | edge | large-model-limited-hw | research: budgets from the seed table")
    rc.add_argument("--calib", default=None, help="your calibration text: adds the GPTQ/AWQ step and feeds mixed precision")
    rc.add_argument("--calib-samples", type=int, default=128)
    rc.add_argument("--calib-seqlen", type=int, default=512)
    rc.add_argument("--mixed-bpw", type=lambda s: tuple(float(x) for x in _csv(s)), default=(3.5, 5.0, 6.0),
                    help="mixed-precision budgets tried (bits per weight; '' for none; default 3.5,5,6)")
    rc.add_argument("--mixed-ladder", default="int3-g128/int4-g128/int8", help="formats the mixed allocation picks from")
    rc.add_argument("--include", action="append", default=[], help="module-name pattern to quantize too, e.g. "
                    "embed_tokens (repeatable; applies to every format tried)")
    rc.add_argument("--exclude", action="append", default=[], help="module-name pattern to leave unquantized (repeatable)")
    rc.add_argument("--model", default="default", help=MODEL_HELP)
    rc.add_argument("--text", default="python-docs", help="evaluation text")
    rc.add_argument("--windows", type=int, default=8)
    rc.add_argument("--ctx", type=int, default=512)
    rc.add_argument("--json", default=None, help="write the decision and its trail to this JSON file")
    rc.add_argument("--out", default=None, help="run directory (default: the one 'compare' uses for these settings)")
    rc.add_argument("--no-isolate", action="store_true", help="measure in this process")
    _add_process_options(rc)
    rc.set_defaults(func=_cmd_recommend)

    sv = sub.add_parser("save", help="quantize into one integer format and write a compressed-tensors checkpoint (vLLM)")
    sv.add_argument("format", help="intN[-gG][-sym], int8, gptq-..., awq-..., or a mixed- plan of integer formats")
    sv.add_argument("--out", required=True, help="checkpoint folder to create (must not exist)")
    sv.add_argument("--model", default="default", help=MODEL_HELP)
    sv.add_argument("--calib", default="python-docs", help="calibration text for GPTQ/AWQ/mixed-auto (its head)")
    sv.add_argument("--calib-samples", type=int, default=128)
    sv.add_argument("--calib-seqlen", type=int, default=512)
    sv.add_argument("--include", action="append", default=[], help="module-name pattern to quantize too (repeatable)")
    sv.add_argument("--exclude", action="append", default=[], help="module-name pattern to leave unquantized (repeatable)")
    sv.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_process_options(sv)
    sv.set_defaults(func=_cmd_save)

    pl = sub.add_parser("plan", help="memory plan from config.json only: weights, KV cache, overhead, devices")
    pl.add_argument("model", help="local model folder, its config.json, or a Hub id")
    pl.add_argument("--ctx", type=int, default=8192)
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--formats", type=_csv, default=("bf16", "fp8-e4m3", "int8", "int4-g128", "nf4", "int3-g128"),
                    help="comma-separated formats")
    pl.add_argument("--device", action="append", default=[], help="extra device: a size (24GB, 24GiB) or a listed name (repeatable)")
    pl.add_argument("--kv-dtype", default="bf16", help="KV cache dtype: bf16, fp16, fp32, fp8")
    pl.add_argument("--embed-format", default=None, help="quantize the embeddings and head into this format too")
    pl.add_argument("--attention", choices=("fused", "eager"), default="fused")
    pl.add_argument("--framework-overhead", default=None, help="fixed runtime allowance (default 1GiB)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=_cmd_plan)
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
    from .compare import quiet_library_logs

    quiet_library_logs()
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
