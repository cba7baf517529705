"""Evaluation and calibration text: the embedded Python docs, a .txt file, or a .jsonl file with `text`.

`python-docs` is the standard library's `pydoc_data.topics` (Python documentation prose, on every
Python): the topic texts joined in sorted key order with blank lines between them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import QuantscopeError
from .jsonl import parse_jsonl


@dataclass(frozen=True)
class TextSource:
    ref: str  # what the user asked for
    name: str  # for reports
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def python_docs_text() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def load_text(ref: str) -> TextSource:
    if ref in ("python-docs", "default", ""):
        return TextSource("python-docs", "python-docs (stdlib pydoc_data.topics)", python_docs_text())
    p = Path(ref).expanduser()
    if not p.is_file():
        raise QuantscopeError(f"text file not found: {ref} (use 'python-docs', a .txt or a .jsonl file)")
    try:
        raw = p.read_bytes()
        if b"\x00" in raw[:65536]:
            raise UnicodeDecodeError("utf-8", raw[:1], 0, 1, "NUL byte")
        content = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise QuantscopeError(f"{ref}: not a UTF-8 text file") from None
    if p.suffix == ".jsonl":
        parts = []
        for i, obj in parse_jsonl(content.splitlines(), ref):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise QuantscopeError(f"{ref}:{i}: expected an object with a string field 'text'")
            parts.append(obj["text"])
        content = "\n\n".join(parts)
    if not content.strip():
        raise QuantscopeError(f"{ref}: the text is empty")
    return TextSource(str(p), p.name, content)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, without special tokens (no BOS), as a 1-D LongTensor."""
    import transformers

    prev = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than the maximum" is expected here
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        transformers.logging.set_verbosity(prev)
    return torch.tensor(ids, dtype=torch.long)


def make_windows(ids: torch.Tensor, ctx: int, n: int, start: int = 0, source: str = "text") -> torch.Tensor:
    """`n` consecutive non-overlapping windows of `ctx` tokens from `start`: a [n, ctx] LongTensor."""
    if ctx < 2:
        raise QuantscopeError(f"--ctx must be at least 2, got {ctx}")
    if n < 1:
        raise QuantscopeError(f"--windows must be at least 1, got {n}")
    avail = (len(ids) - start) // ctx
    if avail < n:
        raise QuantscopeError(f"{source} has {len(ids) - start} tokens after position {start}: "
                              f"room for {avail} windows of {ctx}, {n} requested")
    return ids[start:start + n * ctx].view(n, ctx).clone()


def head_samples(ids: torch.Tensor, samples: int, seqlen: int, source: str = "text") -> torch.Tensor:
    """Calibration samples: the first `samples` x `seqlen` tokens as [n, seqlen] (n < samples when the
    text is shorter; at least one sample, or a one-line error)."""
    if len(ids) < seqlen:
        raise QuantscopeError(f"calibration text {source} has {len(ids)} tokens, fewer than one "
                              f"sample of --calib-seqlen {seqlen}")
    n = min(samples, len(ids) // seqlen)
    return ids[: n * seqlen].view(n, seqlen).clone()
