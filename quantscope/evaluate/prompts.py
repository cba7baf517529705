"""Prompts for generation agreement: a JSONL file (or the set shipped in the package) read and checked.

Each line is ``{"prompt": "..."}`` (plain text, encoded as it is) or ``{"messages": [{"role": ...,
"content": ...}, ...]}`` (chat messages, encoded with the model's chat template and its generation
prompt). :func:`encode_prompts` turns them into token ids once, in the process that prepares a run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from quantscope.errors import QuantscopeError
from quantscope.evaluate.jsonl import read_jsonl

DEFAULT = "default"  # the prompt set shipped in the package (prompts_default.jsonl)


@dataclass(frozen=True)
class Prompt:
    text: str | None = None  # a plain prompt
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) chat turns

    @property
    def kind(self) -> str:
        return "chat" if self.messages is not None else "text"

    def to_dict(self) -> dict:
        if self.messages is not None:
            return {"messages": [{"role": r, "content": c} for r, c in self.messages]}
        return {"prompt": self.text}


def _prompt_of(value, where: str) -> Prompt:
    if isinstance(value, dict) and isinstance(value.get("prompt"), str) and "messages" not in value:
        if not value["prompt"].strip():
            raise QuantscopeError(f"{where}: the prompt is empty")
        return Prompt(text=value["prompt"])
    if isinstance(value, dict) and isinstance(value.get("messages"), list) and "prompt" not in value:
        turns = []
        for m in value["messages"]:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise QuantscopeError(f"{where}: each message must be an object with string 'role' and 'content'")
            turns.append((m["role"], m["content"]))
        if not turns:
            raise QuantscopeError(f"{where}: 'messages' is empty")
        return Prompt(messages=tuple(turns))
    raise QuantscopeError(f'{where}: expected {{"prompt": "..."}} or {{"messages": [...]}}, got '
                          f"{json.dumps(value)[:60]}")


def load_prompts(ref: str) -> tuple[str, list[Prompt]]:
    """(name, prompts) of a JSONL file, or of the shipped set for 'default'."""
    if ref == DEFAULT:
        text = resources.files("quantscope.evaluate").joinpath("prompts_default.jsonl").read_text("utf-8")
        lines = enumerate(text.splitlines(), start=1)
        name = "default prompts"
        parsed = ((n, json.loads(line)) for n, line in lines if line.strip())
    else:
        path = Path(ref)
        name = path.name
        parsed = read_jsonl(path)
    prompts = [_prompt_of(v, f"{ref}:{n}") for n, v in parsed]
    if not prompts:
        raise QuantscopeError(f"--gen-prompts {ref}: no prompts in the file")
    return name, prompts


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of one prompt: chat messages through the model's chat template (generation prompt
    added), plain text as the tokenizer encodes it."""
    if prompt.messages is None:
        return list(tokenizer(prompt.text).input_ids)
    if not has_chat_template(tokenizer):
        raise QuantscopeError("the model's tokenizer has no chat template: chat messages cannot be encoded "
                              "(give plain {\"prompt\": ...} lines, or a model with a chat template)")
    text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in prompt.messages],
                                         tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def encode_prompts(tokenizer, prompts: list[Prompt], new_tokens: int, max_positions: int | None,
                   where: str = "--gen-prompts") -> list[list[int]]:
    """Every prompt encoded, each checked to leave room for `new_tokens` within the model's context."""
    out = []
    for i, p in enumerate(prompts, 1):
        ids = encode(tokenizer, p)
        if not ids:
            raise QuantscopeError(f"{where}: prompt {i} encodes to no tokens")
        if max_positions and len(ids) + new_tokens > max_positions:
            raise QuantscopeError(f"{where}: prompt {i} is {len(ids)} tokens; with {new_tokens} new tokens it is "
                                  f"longer than the model's context ({max_positions} tokens)")
        out.append(ids)
    return out


def prompts_sha256(ids: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()
