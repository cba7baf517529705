"""`quantscope plan`: a memory plan from config.json only (weights, KV cache, overhead, devices)."""

from __future__ import annotations

from . import options as o


def add_parser(sub) -> None:
    pl = sub.add_parser("plan", help="memory plan from config.json only: weights, KV cache, overhead, devices")
    pl.add_argument("model", help="local model folder, its config.json, or a Hub id")
    pl.add_argument("--ctx", type=int, default=8192)
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--formats", type=o.names, default=("bf16", "fp8-e4m3", "int8", "int4-g128", "nf4", "int3-g128"),
                    help="comma-separated formats")
    pl.add_argument("--device", action="append", default=[], help="extra device: a size (24GB, 24GiB) or a listed name (repeatable)")
    pl.add_argument("--kv-dtype", default="bf16", help="KV cache dtype: bf16, fp16, fp32, fp8")
    pl.add_argument("--embed-format", default=None, help="quantize the embeddings and head into this format too")
    pl.add_argument("--attention", choices=("fused", "eager"), default="fused")
    pl.add_argument("--framework-overhead", default=None, help="fixed runtime allowance (default 1GiB)")
    o.add_json(pl, "the plan")
    pl.set_defaults(func=run)


def run(args) -> int:
    from ..api import PlanConfig, plan_memory
    from ..report.terminal import plan_table

    p = plan_memory(PlanConfig(model=args.model, formats=tuple(args.formats), ctx=args.ctx, batch=args.batch,
                               kv_dtype=args.kv_dtype, embed_format=args.embed_format, devices=tuple(args.device),
                               attention=args.attention, framework_overhead=args.framework_overhead))
    g, a = p.geometry, p.assumptions
    o.out(args, f"model: {args.model} ({g.model_type}, {g.layers} layers, hidden {g.hidden}, {g.kv_heads} KV heads x "
                f"{g.head_dim}, vocab {g.vocab}, {'tied' if g.tied else 'untied'} head, unquantized tensors in {g.dtype})")
    o.out(args, f"ctx {args.ctx} x batch {args.batch}, KV cache in {args.kv_dtype}"
                + (f", embeddings in {args.embed_format}" if args.embed_format else ""))
    o.out(args, plan_table(p.rows, p.devices, p.custom))
    o.out(args, f"\nweights and KV cache are exact (config.json only; nothing loaded). *overhead is an ESTIMATE: "
                f"activations of one prefill ({a.attention} attention, {a.activation_dtype}) + one dequantized weight "
                f"(quantscope's QuantLinear) + a {a.framework_bytes / 2**30:g} GiB framework allowance.")
    for line in dict.fromkeys(n for r in p.rows for n in r.notes):
        o.out(args, f"note: {line}")
    o.emit(args, p.to_dict())
    return 0
