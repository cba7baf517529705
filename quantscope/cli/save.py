"""`quantscope save`: quantize into one integer format and write a compressed-tensors checkpoint (vLLM),
or a GGUF file (llama.cpp) when --out ends in .gguf."""

from __future__ import annotations

from . import options as o


def add_parser(sub) -> None:
    sv = sub.add_parser("save", help="quantize into one integer format and write a compressed-tensors checkpoint "
                                           "(vLLM) or, with --out FILE.gguf, a GGUF file (llama.cpp)")
    sv.add_argument("format", help="intN[-gG][-sym], int8, gptq-..., awq-..., or a mixed- plan of integer formats")
    sv.add_argument("--out", required=True, help="checkpoint folder to create, or FILE.gguf (must not exist)")
    o.add_model(sv)
    o.add_calibration(sv, default="python-docs", help="calibration text for GPTQ/AWQ/mixed-auto (its head)")
    o.add_selection(sv)
    o.add_json(sv, "the report")
    o.add_process(sv)
    sv.set_defaults(func=run)


def run(args) -> int:
    from ..api import SaveConfig, save
    from ..report.fmt import fmt_bytes

    cfg = SaveConfig(format=args.format, out=args.out, model=args.model, calib=args.calib,
                     calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, include=tuple(args.include),
                     exclude=tuple(args.exclude), threads=args.threads, trust_remote_code=args.trust_remote_code,
                     device=args.device, dtype=args.dtype)
    r = save(cfg)
    if hasattr(r, "gguf_types"):
        return _gguf(args, r)
    o.out(args, f"wrote {r.out}: compressed-tensors pack-quantized checkpoint (vLLM, transformers), "
                f"{r.linears} quantized linears, {fmt_bytes(r.file_bytes)} of safetensors")
    for g, v in r.groups.items():
        w = v["weights"]
        o.out(args, f"  {g}: {v['layers']} layers, int{w['num_bits']} {'symmetric' if w['symmetric'] else 'asymmetric'}, "
                    + (f"groups of {w['group_size']}" if w["strategy"] == "group" else "per output channel"))
    o.out(args, f"read back before it was moved into place (compressed-tensors {r.versions['compressed-tensors']} "
                f"unpacked every layer, transformers rebuilt the model): weights identical to quantscope's (max |Δ| "
                f"{r.max_weight_diff:g}); logits on {r.check_tokens} tokens: max |Δ| {r.max_logit_diff:.2g}")
    for n in r.notes:
        o.out(args, f"note: {n}")
    o.emit(args, r.as_dict())
    return 0


def _gguf(args, r) -> int:
    from ..report.fmt import fmt_bytes

    types = ", ".join(f"{n} {t}" for t, n in sorted(r.gguf_types.items()))
    o.out(args, f"wrote {r.out}: GGUF ({r.source}'s codes), {fmt_bytes(r.file_bytes)}; tensors: {types}")
    if r.source == "quantscope":
        o.out(args, f"read back before it was moved into place: gguf-py read every code and scale back identical; "
                    f"weights {'identical to' if r.exact else 'within %.2g of' % r.max_weight_diff} quantscope's")
    o.out(args, f"transformers' GGUF loader rebuilt the model: logits on {r.check_tokens} tokens, KLD "
                f"{r.kld:.2g} nats/token, max |Δ| {r.max_logit_diff:.2g}")
    for n in r.notes:
        o.out(args, f"note: {n}")
    o.emit(args, r.as_dict())
    return 0
