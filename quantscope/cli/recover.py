"""`quantscope recover`: a format, the same with LoRA adapters trained on your text, and the adapters
merged and requantized, measured side by side (the share of the gap won back, with intervals)."""

from __future__ import annotations

from . import options as o


def add_parser(sub) -> None:
    r = sub.add_parser("recover", help="train LoRA adapters on a quantized model (QLoRA, LoftQ, distillation) and "
                                       "measure what they win back, kept and merged")
    r.add_argument("format", help="the base format: an own format (int4-g64, nf4 ...), gptq-/awq-/mixed-, or bnb-nf4")
    r.add_argument("--train", default="python-docs",
                   help="training text (its head; the same file as --text is cut into disjoint spans)")
    o.add_model(r)
    o.add_text(r, help="evaluation text: " + o.TEXT_HELP)
    o.add_selection(r)
    d = _defaults()
    r.add_argument("--rank", type=int, default=d.rank)
    r.add_argument("--alpha", type=float, default=d.alpha, help=f"the update is scaled by alpha/rank (default {d.alpha:g})")
    r.add_argument("--targets", type=o.names, default=d.targets, help="leaf names of the layers to adapt "
                   f"(default {','.join(d.targets)})")
    r.add_argument("--steps", type=int, default=d.steps)
    r.add_argument("--lr", type=float, default=d.lr)
    r.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per training sequence")
    r.add_argument("--batch", type=int, default=d.batch, help="sequences per step")
    r.add_argument("--seed", type=int, default=d.seed)
    r.add_argument("--objective", default=d.objective, help="lm (next-token loss) or distill (KL from the baseline)")
    r.add_argument("--init", default=d.init, help="plain (B = 0) or loftq")
    r.add_argument("--loftq-iters", type=int, default=d.loftq_iters)
    r.add_argument("--log-every", type=int, default=d.log_every, help="log loss and held-out KLD, checkpoint, every N steps")
    r.add_argument("--outcomes", type=o.names, default=("adapter", "merged"),
                   help="adapter (kept beside the base), merged (requantized by the base's method), merged-rtn")
    o.add_tasks(r)
    r.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    r.add_argument("--no-isolate", action="store_true", help="measure in this process (peak RSS then accumulates)")
    o.add_process(r)
    o.add_json(r, "the records")
    r.add_argument("--out", default=None, help="run directory (default quantscope-runs/...); a killed run resumes there")
    r.set_defaults(func=run)


def _defaults():
    from ..api import RecoverConfig

    return RecoverConfig()


def run(args) -> int:
    from ..api import RecoverConfig, RecoverRunConfig, run_recover
    from ..report.recovery import recovery_table, training_log
    from ..report.terminal import comparison_table, record_notes, task_table

    rc = RecoverConfig(rank=args.rank, alpha=args.alpha, targets=tuple(args.targets), steps=args.steps, lr=args.lr,
                       seqlen=args.seqlen, batch=args.batch, seed=args.seed, objective=args.objective, init=args.init,
                       loftq_iters=args.loftq_iters, log_every=args.log_every)
    cfg = RecoverRunConfig(format=args.format, train=args.train, model=args.model, text=args.text, ctx=args.ctx,
                           windows=args.windows, recover=rc, outcomes=tuple(args.outcomes), include=tuple(args.include),
                           exclude=tuple(args.exclude), tasks=tuple(args.task), task_limit=args.limit,
                           measure_speed=not args.no_speed, isolate=not args.no_isolate, threads=args.threads, device=args.device, dtype=args.dtype,
                           trust_remote_code=args.trust_remote_code, progress=o.progress_wanted(args))

    def on_record(rec):
        status = "failed: " + rec["error"] if rec.get("error") else f"ppl {rec['perplexity']:.3f}, KLD {rec['kld_mean']:.4f}"
        o.note(args, f"{rec['format']}: {status}")

    records, meta, run_dir = run_recover(cfg, run_dir=args.out, on_record=on_record)
    o.out(args, f"model: {meta['model']}; evaluation: {meta['text']}, ctx {meta['ctx']}, {meta['windows']} windows")
    for n in meta["notes"]:
        o.out(args, f"note: {n}")
    o.out(args)
    o.out(args, comparison_table(records))
    for extra in (task_table(records), recovery_table(records), training_log(records)):
        if extra:
            o.out(args, extra)
    for line in record_notes(records):
        o.out(args, line)
    o.out(args, f"run directory: {run_dir}")
    o.emit(args, records)
    return 0
