"""Shared fixtures: tiny random models built from a config (no downloads), and the shared data path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


_ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def make_tiny_model(arch: str = "llama", seed: int | None = 0, *, tied: bool = True, hidden: int = 64,
                    layers: int = 2, vocab: int = 256, **overrides):
    """A tiny random Llama or Qwen2 (eval mode, parameters frozen as quantscope's loader leaves them):
    `hidden` wide, MLP 2 x hidden, 4 heads over 2 kv heads, 256 positions; any other config key in
    `overrides` (e.g. ``num_key_value_heads=4``, ``max_position_embeddings=512``). ``torch.manual_seed(seed)``
    first unless `seed` is None. Every test builds its tiny models here."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in _ARCHS[arch])
    cfg = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
               max_position_embeddings=256, tie_word_embeddings=tied)
    cfg.update(overrides)
    if seed is not None:
        torch.manual_seed(seed)
    m = model_cls(config_cls(**cfg)).eval()
    m.requires_grad_(False)
    return m


def tiny_llama(seed: int = 0, tied: bool = True, hidden: int = 64, layers: int = 2, vocab: int = 256):
    return make_tiny_model("llama", seed, tied=tied, hidden=hidden, layers=layers, vocab=vocab)


def tiny_qwen(seed: int = 0):
    return make_tiny_model("qwen2", seed)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Keep the real model cache (shared by integration tests) but never write elsewhere by accident.
    if "QUANTSCOPE_CACHE" not in os.environ:
        monkeypatch.setenv("QUANTSCOPE_CACHE", str(Path.home() / ".cache" / "quantscope"))
    torch.set_num_threads(1)


def byte_tokenizer():
    """A byte-level BPE-free tokenizer (256 byte tokens + EOS): no download, any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny random Llama (hidden 64, tied embeddings) saved with its tokenizer, plus a text file."""
    m = tiny_llama(vocab=257)
    d = tmp_path / "tiny-llama"
    m.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    text = tmp_path / "text.txt"
    from quantscope.evaluate.text import python_docs_text

    text.write_text(python_docs_text()[:20000])
    return d, text


def quantized_modules(model):
    """(name, module) of every quantscope-quantized module (tied heads excluded: they own nothing)."""
    from quantscope.modules.qmodules import QuantEmbedding, QuantLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))]


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `quantscope ARGV` run in this process."""
    from quantscope.cli import main

    capsys.readouterr()  # drop what fixtures printed (e.g. save_pretrained progress)
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


_TALLY = os.environ.get("QUANTSCOPE_TALLY_BAD_INPUTS")  # a file: one line per bad input a test tries


def _tally(kind: str, what: str) -> None:
    """Count the bad inputs the suite tries (README / closing note), only when asked to."""
    if _TALLY:
        import inspect

        caller = next((f for f in inspect.stack()[2:] if f.filename.endswith(".py") and "/tests/test_" in f.filename),
                      None)
        where = f"{Path(caller.filename).name}:{caller.lineno}" if caller else "?"
        with open(_TALLY, "a", encoding="utf-8") as fh:
            fh.write(f"{kind}\t{where}\t{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{what}\n")


if _TALLY:  # library-level refusals: every pytest.raises(QuantscopeError, ...) a test enters
    _raises = pytest.raises

    def _counting_raises(expected, *a, **k):
        from quantscope.errors import QuantscopeError

        if isinstance(expected, type) and issubclass(expected, QuantscopeError):
            _tally("raises", str(k.get("match", "")))
        return _raises(expected, *a, **k)

    pytest.raises = _counting_raises


def assert_one_line_error(code, err, needle):
    """A user mistake: exit 2 and one line on stderr holding `needle`, no traceback."""
    _tally("cli", needle)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]
