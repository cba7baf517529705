"""`generate`: text from one format, streamed as it is made; or the baseline's and the format's greedy
continuations side by side, with where they first differ.

The model is loaded once; with `compare` a copy of the baseline is kept before quantizing. Calibrated
formats (GPTQ/AWQ, mixed-auto) take the head of `calib` as `save` does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..errors import QuantscopeError
from ..quantization import QuantizeOptions, quantize, resolve


@dataclass(frozen=True)
class GenerateConfig:
    format: str
    prompt: str | None = None  # the text, or the user's turn with `chat`
    model: str = "default"
    chat: bool = False  # encode with the model's chat template (its generation prompt added)
    compare: bool = False  # greedy continuations of the baseline and the format, side by side
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0  # of the sampler, so a sampled generation can be repeated
    calib: str = "python-docs"  # GPTQ/AWQ/mixed-auto calibrate on its head
    calib_samples: int = 128
    calib_seqlen: int = 512
    threads: int | None = None
    trust_remote_code: bool = False
    device: str = "auto"  # as for compare (quantscope.placement)
    dtype: str = "auto"

    def __post_init__(self):
        from ..logs import check_threads

        check_threads(self.threads)
        if self.max_new_tokens < 1:
            raise QuantscopeError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise QuantscopeError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise QuantscopeError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.prompt is not None and not self.prompt.strip():
            raise QuantscopeError("--prompt is empty")


@dataclass
class Generator:
    """A loaded baseline (kept only for `compare`), the quantized model and the tokenizer."""

    config: GenerateConfig
    model: object
    baseline: object | None
    tokenizer: object
    max_positions: int | None
    notes: list

    def encode(self, prompt: str, history: tuple = ()) -> list[int]:
        from ..evaluate.prompts import Prompt, encode

        p = Prompt(messages=(*history, ("user", prompt))) if self.config.chat else Prompt(text=prompt)
        ids = encode(self.tokenizer, p)
        if self.max_positions and len(ids) + self.config.max_new_tokens > self.max_positions:
            raise QuantscopeError(f"the prompt is {len(ids)} tokens; with {self.config.max_new_tokens} new tokens "
                                  f"it is longer than the model's context ({self.max_positions} tokens)")
        return ids

    def stream(self, ids: list[int], on_text=None) -> list[int]:
        """The format's generation of `ids`, text handed to `on_text` as it is made; stops at EOS."""
        import torch

        from ..evaluate.generation import decode

        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        eos = self.tokenizer.eos_token_id
        stop = {eos} if eos is not None else set()
        done: list[int] = []
        shown = [""]

        def on_token(t):  # incremental decoding: the text of all tokens so far, minus what was shown
            done.append(t)
            text = self.tokenizer.decode([x for x in done if x not in stop], skip_special_tokens=True)
            if on_text is not None and len(text) > len(shown[0]) and not text.endswith("\ufffd"):
                on_text(text[len(shown[0]):])
                shown[0] = text

        return decode(self.model, ids, cfg.max_new_tokens, cfg.temperature, cfg.top_p, gen, on_token, stop)

    def compare(self, ids: list[int]) -> dict:
        """Greedy continuations of the baseline and the format, and their agreement."""
        from ..evaluate.generation import compare_prompt, continuation_logprobs, greedy_continuation

        n = self.config.max_new_tokens
        ref = greedy_continuation(self.baseline, ids, n)
        got = greedy_continuation(self.model, ids, n)
        row = compare_prompt(ref, got, continuation_logprobs(self.baseline, ids, ref),
                             continuation_logprobs(self.model, ids, ref))
        return {"baseline_tokens": ref, "tokens": got, "baseline_text": self.tokenizer.decode(ref),
                "text": self.tokenizer.decode(got), **row}


def load_generator(config: GenerateConfig) -> Generator:
    from ..evaluate.prompts import has_chat_template
    from ..evaluate.text import load_text, tokenize
    from ..logs import torch_threads
    from ..model.load import load_model
    from .preparation import calibration_head

    fmt = resolve(config.format)  # an unknown name fails before the model is loaded
    with torch_threads(config.threads):
        lm = load_model(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code,
                        device=config.device)
        if config.chat and not has_chat_template(lm.tokenizer):
            raise QuantscopeError(f"--chat: the tokenizer of {lm.info.name} has no chat template")
        max_pos = getattr(getattr(lm.model, "config", None), "max_position_embeddings", None)
        baseline = copy.deepcopy(lm.model) if config.compare else None
        calib = None
        if fmt.needs_calibration:
            text = load_text(config.calib)
            calib = calibration_head(tokenize(lm.tokenizer, text.text), text.name, config.calib_samples,
                                     config.calib_seqlen, same_text=False).tokens
        done = quantize(lm.model, fmt, QuantizeOptions(calib=list(calib) if calib is not None else None,
                                                       source=config.model))
    return Generator(config, done.model.eval(), baseline, lm.tokenizer, max_pos, list(done.notes))
