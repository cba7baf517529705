"""`quantscope plan`: a memory plan from config.json only (weights, KV cache, overhead, devices)."""

from __future__ import annotations

from . import options as o


def add_parser(sub) -> None:
    pl = sub.add_parser("plan", help="memory plan from config.json only: weights, KV cache, overhead, devices")
    pl.add_argument("model", help="local model folder, its config.json, or a Hub id")
    pl.add_argument("--ctx", type=int, default=None, help="context tokens (default 8192; with --stream 512)")
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--formats", type=o.names, default=("bf16", "fp8-e4m3", "int8", "int4-g128", "nf4", "int3-g128"),
                    help="comma-separated formats")
    pl.add_argument("--device", action="append", default=[], help="extra device: a size (24GB, 24GiB) or a listed name (repeatable)")
    pl.add_argument("--kv-dtype", default="bf16", help="KV cache dtype: bf16, fp16, fp32, fp8")
    pl.add_argument("--embed-format", default=None, help="quantize the embeddings and head into this format too")
    pl.add_argument("--attention", choices=("fused", "eager"), default="fused")
    pl.add_argument("--framework-overhead", default=None, help="fixed runtime allowance (default 1GiB)")
    pl.add_argument("--stream", action="store_true",
                    help="plan a streamed comparison instead (compare --stream): peak memory with one block in flight")
    pl.add_argument("--windows", type=int, default=8, help="with --stream: evaluation windows (of --ctx tokens)")
    pl.add_argument("--dtype", default=None, help="with --stream: the baseline's dtype (default: the checkpoint's)")
    pl.add_argument("--calib-samples", type=int, default=128, help="with --stream: calibration sequences (GPTQ/AWQ)")
    pl.add_argument("--calib-seqlen", type=int, default=512)
    o.add_json(pl, "the plan")
    pl.set_defaults(func=run)


def run(args) -> int:
    if args.stream:
        return _stream(args)
    args.ctx = args.ctx or 8192
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


def _stream(args) -> int:
    from ..errors import QuantscopeError
    from ..plan.geometry import geometry
    from ..dtypes import short_name, torch_name as long_name
    from ..placement import compute_dtype
    from ..plan.stream import stream_plan

    args.ctx = args.ctx or 512
    if args.windows < 1 or args.ctx < 2:
        raise QuantscopeError("--windows must be at least 1 and --ctx at least 2")
    config = _config(args.model)
    dtype = args.dtype or geometry(config).dtype
    compute = short_name(compute_dtype(long_name(dtype), "cpu"))  # (the planner's machine: this one's CPU)
    p = stream_plan(config, tuple(args.formats), args.windows, args.ctx, dtype, args.calib_samples, args.calib_seqlen,
                    compute=compute)
    gib = lambda n: f"{n / 2**30:8.2f} GiB"  # noqa: E731
    o.out(args, f"streamed comparison of {args.model}: baseline in {dtype}, {', '.join(args.formats)}; "
                f"{args.windows} windows x {args.ctx} tokens")
    for label, value in (("outside the blocks (embedding, norm, head)", p.outside_bytes),
                         ("one block in flight (float, copy, quantized)", p.in_flight_bytes),
                         ("hidden-state streams (baseline, formats, calibration)", p.stream_bytes),
                         ("*blocks phase: activations, rounding workspace", p.workspace_bytes),
                         ("*head phase: logits chunk (+ compute copy of the head)", p.head_bytes),
                         ("*runtime (Python, torch, transformers)", p.runtime_bytes),
                         ("predicted peak, streamed", p.total_bytes),
                         ("*in memory, for comparison", p.in_memory_bytes)):
        o.out(args, f"  {label:<56}{gib(value)}")
    o.out(args, "* = estimate or assumption; the rest is exact from config.json (see quantscope.plan.stream); "
                "peak = outside + streams + runtime + the larger phase"
                + (f"; blocks computed in {compute} on this CPU" if compute != dtype else ""))
    o.emit(args, {"model": args.model, "dtype": dtype, "compute_dtype": compute, "formats": list(args.formats), "windows": args.windows,
                  "ctx": args.ctx, **p.to_dict()})
    return 0


def _config(ref: str) -> dict:
    """config.json as a dict: the planner's reader for folders, .json files and Hub ids; for the embedded
    model and a .gguf file, the config transformers reads from the GGUF (nothing dequantized)."""
    from pathlib import Path

    from ..plan.config import load_config

    if ref not in ("default", "") and Path(ref).suffix != ".gguf":
        return load_config(ref)
    from transformers import AutoConfig

    from ..errors import QuantscopeError
    from ..model.load import embedded_gguf_path

    gguf = embedded_gguf_path() if ref in ("default", "") else Path(ref).expanduser()
    if not gguf.is_file():
        raise QuantscopeError(f"{ref}: no such file")
    try:
        cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).to_dict()
    except Exception as e:
        raise QuantscopeError(f"{gguf}: not a readable GGUF ({type(e).__name__})") from None
    cfg.setdefault("dtype", "float32")  # quantscope's baseline for a GGUF: its weights dequantized to fp32
    return cfg
