"""`quantscope compare`: quantize into each format and measure them side by side."""

from __future__ import annotations

import argparse

from . import options as o


def add_parser(sub) -> None:
    c = sub.add_parser("compare", help="quantize into each format and measure them side by side")
    o.add_model(c)
    c.add_argument("--reference", default=None, metavar="MODEL",
                   help="the baseline, when it is not --model (e.g. --model saved.gguf --reference default): "
                        "KLD, top-1 and deltas of every row are against it; it must share --model's vocabulary")
    c.add_argument("--formats", type=o.names, default=None, help="comma-separated format names (see 'quantscope formats')")
    o.add_text(c)
    c.add_argument("--score-second-half", action="store_true", help="score only the second half of each window (llama.cpp)")
    o.add_selection(c)
    o.add_calibration(c)
    c.add_argument("--target-bpw", type=o.csv, default=(), metavar="BPW[,BPW]",
                   help="add automatic mixed precision at these bits per weight (layers picked from --ladder by "
                        "measured sensitivity): mixed-auto:BPW:LADDER")
    c.add_argument("--target-bytes", type=o.csv, default=(), metavar="SIZE[,SIZE]",
                   help="the same with a whole-model weight budget, e.g. 150MB (10^6) or 140MiB")
    c.add_argument("--ladder", default="int3-g128/int4-g128/int8",
                   help="formats --target-bpw/--target-bytes choose from (default int3-g128/int4-g128/int8)")
    o.add_tasks(c)
    o.add_generation(c)
    c.add_argument("--sample-seed", type=int, default=None)
    c.add_argument("--shots", type=int, default=0, help="few-shot examples (MMLU)")
    c.add_argument("--lm-eval-task", action="append", default=[], metavar="NAME",
                   help="an lm-evaluation-harness task run on every format, paired like --task (repeatable; "
                        "pip install 'quantscope[lmeval]'; --limit applies)")
    c.add_argument("--lm-eval-include", default=None, metavar="DIR",
                   help="directory of lm-eval task YAML files (then only its tasks are indexed)")
    c.add_argument("--ctx-sweep", type=lambda s: tuple(int(x) for x in o.csv(s)), default=(),
                   help="extra context lengths, e.g. 256,1024,2048: perplexity and KLD at each")
    c.add_argument("--prompt-tokens", type=int, default=64, help="speed test prompt length")
    c.add_argument("--new-tokens", type=int, default=16, help="speed test decode steps")
    c.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    c.add_argument("--no-isolate", action="store_true", help="measure in this process (peak RSS then accumulates)")
    c.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read the model block by block and measure every format in one pass, never holding it whole "
                        "(default: when the planner says the in-memory run does not fit in the memory available)")
    o.add_process(c)
    o.add_verbose(c)
    o.add_ray(c)
    o.add_json(c, "the records (after every format, atomically)")
    c.add_argument("--out", default=None, help="run directory (default quantscope-runs/<model>-<text>-<hash>); re-running resumes")
    c.add_argument("--no-store", action="store_true", help="do not store records in a run directory")
    c.set_defaults(func=run)


def config_from(args):
    from ..api import DEFAULT_FORMATS, CompareConfig, SpeedConfig

    formats = tuple(args.formats) if args.formats is not None else DEFAULT_FORMATS
    formats += tuple(f"mixed-auto:{b}:{args.ladder}" for b in (*args.target_bpw, *args.target_bytes))
    return CompareConfig(
        model=args.model, reference=args.reference, device=args.device, dtype=args.dtype, formats=formats, text=args.text, ctx=args.ctx, windows=args.windows,
        score_second_half=args.score_second_half, include=tuple(args.include), exclude=tuple(args.exclude),
        calib=args.calib, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
        speed=SpeedConfig(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens),
        measure_speed=not args.no_speed, isolate=not args.no_isolate, threads=args.threads,
        trust_remote_code=args.trust_remote_code, tasks=tuple(args.task), task_limit=args.limit,
        task_sample_seed=args.sample_seed, task_shots=args.shots, ctx_sweep=args.ctx_sweep,
        lm_eval_tasks=tuple(args.lm_eval_task), lm_eval_include=args.lm_eval_include,
        gen_prompts=args.gen_prompts, gen_tokens=args.gen_tokens, progress=o.progress_wanted(args),
        stream=args.stream)


def run(args) -> int:
    from ..api import compare, compare_on_ray, default_run_dir
    from ..fileio import write_json_atomic
    from ..report.recovery import recovery_table
    from ..report.terminal import comparison_table, ctx_sweep_table, generation_table, record_notes, task_table

    cfg = config_from(args)
    done: list[dict] = []

    def on_record(rec):
        done.append(rec)
        status = "skipped: " + rec["error"] if rec.get("error") else (
            f"ppl {rec['perplexity']:.3f}, KLD {rec['kld_mean']:.4f}, {rec['bits_per_weight']:.2f} bits/w")
        o.note(args, f"[{len(done)}] {rec['format']}: {status}")
        o.timing_note(args, rec)
        if args.json and not o.json_to_stdout(args):  # after every format: a killed run keeps what it finished
            write_json_atomic(args.json, done)

    run_dir = None if args.no_store else (args.out or default_run_dir(cfg))
    ray = o.ray_options(args)
    if ray is not None:
        records, meta = compare_on_ray(cfg, ray, on_record=on_record, run_dir=run_dir, say=lambda m: o.note(args, m))
    else:
        records, meta = compare(cfg, on_record=on_record, run_dir=run_dir, on_note=lambda n: o.note(args, n))
    o.out(args, f"model: {meta['model']}")
    o.out(args, f"text: {meta['text']}, ctx {meta['ctx']}, {meta['windows']} windows, "
                f"{records[0].get('tokens_scored', '?')} tokens scored ({meta['scoring']})")
    for n in meta["notes"]:
        o.out(args, f"note: {n}")
    o.out(args)
    o.out(args, comparison_table(records))
    for extra in (task_table(records), ctx_sweep_table(records), generation_table(records), recovery_table(records)):
        if extra:
            o.out(args, extra)
    for line in record_notes(records):
        o.out(args, line)
    o.out(args, "\nΔppl: paired bootstrap over windows vs the baseline; * = the 95% interval excludes zero.")
    if run_dir:
        reused = sum(1 for r in records if r.get("reused"))
        o.out(args, f"run directory: {run_dir}" + (f" ({reused} of {len(records)} rows reused from earlier runs)" if reused else ""))
    o.emit(args, records)
    return _named_but_unavailable(args, records, run_dir)


def _named_but_unavailable(args, records, run_dir) -> int:
    """A library format the user named that cannot run here fails the command (exit 2, the install hint in
    the line) once the others are stored; a default format that cannot run stays a skipped row."""
    from ..api import format_unavailable
    from ..errors import QuantscopeError

    named = set(args.formats or ())
    why = [w for r in records if r.get("error") and r["format"] in named and (w := format_unavailable(r["format"]))]
    if args.ray is not None:  # a task fails where it ran: a worker may lack a library this machine has
        why = [f"{r['format']}: {r['error']}" for r in records if r.get("error") and r["format"] in named]
    if why:
        kept = f"; the other formats are stored in {run_dir}" if run_dir else ""
        raise QuantscopeError(f"{'; '.join(why)}{kept}")
    return 0
