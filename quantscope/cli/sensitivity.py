"""`quantscope sensitivity`: rank layers by the KL divergence quantizing each alone causes."""

from __future__ import annotations

import sys

from . import options as o


def add_parser(sub) -> None:
    se = sub.add_parser("sensitivity", help="rank layers by the KL divergence quantizing each alone causes")
    o.add_model(se)
    se.add_argument("--format", default="int4-g128", help="round-to-nearest format each unit is quantized into")
    se.add_argument("--unit", choices=("layer", "block"), default="layer", help="one module, or one decoder block's linears, at a time")
    o.add_text(se, ctx=256, windows=2, help="calibration text: windows from its start")
    o.add_selection(se, what="scan")
    se.add_argument("--include-embeddings", action="store_true", help="scan the embedding and lm_head too (tied: one unit)")
    se.add_argument("--top", type=o.count, default=10, help="rows printed (0: all)")
    o.add_json(se, "every unit's row")
    se.add_argument("--out", default=None, help="run directory to store the ranking in (for 'quantscope report')")
    se.add_argument("--no-cache", action="store_true", help="measure again even if this scan is cached")
    o.add_process(se)
    se.set_defaults(func=run)


def _progress(label: str, quiet: bool):
    """A (done, total) callback printing one updating line on stderr, or None when quiet / not a terminal."""
    if quiet or not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        sys.stderr.write(f"\r{label}: {done}/{total}" + ("\n" if done == total else ""))
        sys.stderr.flush()

    return show


def run(args) -> int:
    from ..api import SensitivityConfig, sensitivity, store_sensitivity
    from ..report.terminal import sensitivity_table

    cfg = SensitivityConfig(model=args.model, format=args.format, unit=args.unit, text=args.text,
                            windows=args.windows, ctx=args.ctx, include=tuple(args.include),
                            exclude=tuple(args.exclude), include_embeddings=args.include_embeddings,
                            trust_remote_code=args.trust_remote_code, use_cache=not args.no_cache,
                            threads=args.threads, device=args.device, dtype=args.dtype)
    rows, meta = sensitivity(cfg, _progress("sensitivity", args.quiet))
    o.out(args, f"model: {meta['model']}\nformat: {meta['format']}, one {meta['unit']} at a time (round-to-nearest); "
                f"text: {meta['text']}, {meta['windows']} x {meta['ctx']} tokens from its start")
    o.out(args, sensitivity_table(rows, args.top))
    if args.top and len(rows) > args.top:
        o.out(args, f"({args.top} of {len(rows)} shown; --top 0 shows all)")
    o.out(args, "KLD: mean per-token KL divergence from the unquantized model with only that unit quantized; "
                "share: of the sum over units (the additive prediction of quantizing them all).")
    o.emit(args, {"meta": meta, "rows": rows})
    if args.out:
        store_sensitivity(args.out, rows, meta)
        o.out(args, f"stored in run directory {args.out} (shown by 'quantscope report')")
    return 0
