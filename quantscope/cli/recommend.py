"""`quantscope recommend`: the smallest (or fastest) format that meets a quality target, and why."""

from __future__ import annotations

from . import options as o


def add_parser(sub) -> None:
    rc = sub.add_parser("recommend", help="find the smallest format that meets a quality target, with its decision trail")
    rc.add_argument("--max-ppl-increase", type=float, default=None, metavar="PCT", help="perplexity may rise at most PCT %%")
    rc.add_argument("--max-kld", type=float, default=None, metavar="X", help="mean KL divergence from the baseline at most X")
    rc.add_argument("--max-acc-drop", type=float, default=None, metavar="PTS", help="task accuracy may drop at most PTS points (with --task)")
    o.add_tasks(rc)
    rc.add_argument("--memory", default=None, help="the weights must fit this size, e.g. 4GB (10^9) or 4GiB")
    rc.add_argument("--prefer", choices=("smallest", "fastest"), default=None, help="among passing formats (default smallest)")
    rc.add_argument("--scenario", default=None, help="cloud-gpu | edge | large-model-limited-hw | research: each a budget from the typical losses of its recommended approach (8-bit <1%%, 4-bit 1-3%%, mixed <1.5%%)")
    o.add_calibration(rc, help="your calibration text: adds the GPTQ/AWQ step and feeds mixed precision")
    rc.add_argument("--mixed-bpw", type=lambda s: tuple(float(x) for x in o.csv(s)), default=(3.5, 5.0, 6.0),
                    help="mixed-precision budgets tried (bits per weight; '' for none; default 3.5,5,6)")
    rc.add_argument("--mixed-ladder", default="int3-g128/int4-g128/int8", help="formats the mixed allocation picks from")
    o.add_selection(rc)
    o.add_model(rc)
    o.add_text(rc)
    o.add_json(rc, "the decision and its trail")
    rc.add_argument("--out", default=None, help="run directory (default: the one 'compare' uses for these settings)")
    rc.add_argument("--no-isolate", action="store_true", help="measure in this process")
    o.add_process(rc)
    o.add_verbose(rc)
    rc.set_defaults(func=run)


def config_from(args):
    from ..api import CompareConfig, RecommendConfig, parse_memory

    cmp = CompareConfig(model=args.model, device=args.device, dtype=args.dtype, text=args.text, ctx=args.ctx, windows=args.windows,
                        calib=args.calib, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                        isolate=not args.no_isolate, threads=args.threads,
                        trust_remote_code=args.trust_remote_code, tasks=tuple(args.task), task_limit=args.limit,
                        include=tuple(args.include), exclude=tuple(args.exclude), progress=o.progress_wanted(args))
    return RecommendConfig(compare=cmp, max_ppl_increase_pct=args.max_ppl_increase, max_kld=args.max_kld,
                           max_acc_drop_pct=args.max_acc_drop,
                           memory_bytes=parse_memory(args.memory) if args.memory else None,
                           prefer=args.prefer, scenario=args.scenario, mixed_bpw=args.mixed_bpw,
                           mixed_ladder=args.mixed_ladder, run_dir=args.out)


def run(args) -> int:
    from ..api import recommend_format, recommend_target
    from ..report.terminal import trail_lines

    cfg = config_from(args)
    target, _ = recommend_target(cfg)
    o.note(args, f"target: {target.describe()} (the upper end of each 95% interval is checked)")

    def show(rec):
        state = "reused" if rec.get("reused") else "measured"
        o.note(args, f"[{state}] {rec['format']}" + (f": error {rec['error']}" if rec.get("error") else ""))
        o.timing_note(args, rec)

    decision, target, run_dir = recommend_format(cfg, on_record=show, note=o.warn)
    o.out(args, f"target: {target.describe()}; a format passes when the upper end of its 95% interval meets it")
    o.out(args, "decision trail:")
    o.out(args, "\n".join(trail_lines(decision)))
    o.out(args, f"\nrecommended: {decision.chosen}" + ("" if decision.meets_target else " (does NOT meet the target)"))
    o.out(args, f"why: {decision.reason}")
    o.out(args, f"run directory: {run_dir} ('quantscope report {run_dir}' shows the trail)")
    o.emit(args, {**decision.to_dict(), "run_dir": str(run_dir)})
    return 0
