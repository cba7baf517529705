"""`quantscope generate`: text from one format, streamed; `--compare` puts the baseline's beside it."""

from __future__ import annotations

import sys

from . import options as o


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate text with a quantized model (streamed), or compare it with the baseline's")
    g.add_argument("format", help="any format name (see 'quantscope formats')")
    g.add_argument("--prompt", default=None, help="the prompt (with --chat: the user's turn; read from stdin when absent)")
    o.add_model(g)
    g.add_argument("--chat", action="store_true", help="use the model's chat template (an interactive loop on a terminal)")
    g.add_argument("--compare", action="store_true",
                   help="greedy continuations of the baseline and the format side by side, first difference marked")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    o.add_calibration(g, default="python-docs", help="calibration text for GPTQ/AWQ/mixed-auto (its head)")
    o.add_json(g, "the prompts, continuations and agreement")
    o.add_process(g)
    g.set_defaults(func=run)


def _marked(tokenizer, tokens: list[int], at: int) -> str:
    """The text of `tokens` on one line (newlines as \\n) with the first differing token in [[ ]]."""
    def dec(t):
        return tokenizer.decode(t).replace("\n", "\\n")

    if at >= len(tokens):
        return dec(tokens)
    return dec(tokens[:at]) + "[[" + dec(tokens[at:at + 1]) + "]]" + dec(tokens[at + 1:])


def run(args) -> int:
    from ..api import GenerateConfig, load_generator

    interactive = args.chat and args.prompt is None and sys.stdin.isatty()
    prompt = args.prompt
    if prompt is None and not interactive:
        prompt = sys.stdin.read()
    cfg = GenerateConfig(format=args.format, prompt=prompt, model=args.model, chat=args.chat, compare=args.compare,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed, calib=args.calib, calib_samples=args.calib_samples,
                         calib_seqlen=args.calib_seqlen, threads=args.threads, trust_remote_code=args.trust_remote_code,
                         device=args.device, dtype=args.dtype)
    gen = load_generator(cfg)
    for n in gen.notes:
        o.note(args, f"note: {n}")
    turns = []
    if interactive:
        history: tuple = ()
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                continue
            reply = _one(args, gen, line, history, turns)
            history = (*history, ("user", line), ("assistant", reply))
    else:
        _one(args, gen, prompt, (), turns)
    o.emit(args, {"format": cfg.format, "model": cfg.model, "chat": cfg.chat, "turns": turns})
    return 0


def _one(args, gen, prompt: str, history: tuple, turns: list) -> str:
    ids = gen.encode(prompt, history)
    if gen.config.compare:
        c = gen.compare(ids)
        n = len(c["baseline_tokens"])
        o.out(args, f"baseline:      {_marked(gen.tokenizer, c['baseline_tokens'], c['divergence'])}")
        o.out(args, f"{gen.config.format + ':':<14} {_marked(gen.tokenizer, c['tokens'], c['divergence'])}")
        o.out(args, ("identical for all %d tokens" % n) if c["exact"] else
              f"first difference at token {c['divergence'] + 1} of {n} (marked [[ ]]); mean KLD along the "
              f"baseline's continuation {c['kld']:.4f}")
        turns.append({"prompt": prompt, **c})
        return c["text"]
    show = not o.json_to_stdout(args)
    toks = gen.stream(ids, on_text=(lambda t: print(t, end="", flush=True)) if show else None)
    if show:
        print()
    text = gen.tokenizer.decode(toks, skip_special_tokens=True)
    turns.append({"prompt": prompt, "tokens": toks, "text": text})
    return text
