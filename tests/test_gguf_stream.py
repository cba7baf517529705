"""Streamed evaluation read straight from a GGUF file (model.gguf_source): transformers' own tensors,
the same figures as from the dequantized cache and in memory, no cache built, bad files refused."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_one_line_error, make_tiny_model, run_cli
from test_stream import _same

gguf = pytest.importorskip("gguf")


def _bpe_tokenizer():
    """Byte-level BPE with two merges (transformers rebuilds a GGUF's gpt2 tokenizer from its merges; the
    merge-free byte tokenizer of the other tests has none to write)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("t", "h"), ("th", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny untied Llama (4 heads over 2 kv heads: the q/k permutation is not the identity) saved as
    GGUF by quantscope: decoder linears Q4_1 (int4-g32), embedding, head and norms F32."""
    from quantscope.api import quantize
    from quantscope.model.gguf_export import save_gguf

    tok = _bpe_tokenizer()
    m = make_tiny_model("llama", tied=False, hidden=64, layers=3, vocab=len(tok))
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    save_gguf(quantize(m, "int4-g32"), tok, m.config, out, check_ids=torch.arange(32), provenance={})
    return out


@pytest.fixture
def text(tmp_path):
    from quantscope.evaluate.text import python_docs_text

    p = tmp_path / "text.txt"
    p.write_text(python_docs_text()[:30000])
    return p


def _transformers_state(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return m.config, m.state_dict()


def test_tensors_equal_transformers_gguf_load(tiny_gguf):
    from gguf.quants import dequantize

    from quantscope.model.blocks import check_complete, streamed_skeleton
    from quantscope.model.gguf_source import GGUFBlockSource, open_source

    config, want = _transformers_state(tiny_gguf)
    skel = streamed_skeleton(config, "float32")
    src = open_source(tiny_gguf, skel)
    assert isinstance(src, GGUFBlockSource)
    assert not check_complete(skel, src)  # untied: output.weight is stored
    assert set(src.shapes) == set(want)
    got = src.read(sorted(want))
    for n, t in want.items():
        assert tuple(src.shapes[n]) == tuple(t.shape), n
        assert got[n].dtype == torch.float32 and torch.equal(got[n], t), n
    raw = {t.name: t for t in gguf.GGUFReader(tiny_gguf).tensors}
    for hf, g in (("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight"),
                  ("model.layers.1.self_attn.k_proj.weight", "blk.1.attn_k.weight")):
        stored = torch.from_numpy(dequantize(raw[g].data, raw[g].tensor_type))
        assert not torch.equal(stored, got[hf])  # the rows were permuted back, as transformers does
        assert torch.equal(stored.sort(dim=0).values, got[hf].sort(dim=0).values)
    assert src.nbytes(["model.layers.0.mlp.up_proj.weight"]) == int(raw["blk.0.ffn_up.weight"].n_bytes)
    layer = src.load(skel.model.layers[2], "model.layers.2.", "bfloat16", "cpu")
    assert layer.self_attn.q_proj.weight.dtype == torch.bfloat16
    assert torch.equal(layer.self_attn.q_proj.weight, want["model.layers.2.self_attn.q_proj.weight"].bfloat16())


def test_streamed_from_gguf_equals_cache_and_in_memory(tiny_gguf, text, tmp_path, monkeypatch):
    from quantscope.api import CompareConfig, compare
    from quantscope.fileio import sha256_file

    monkeypatch.setenv("QUANTSCOPE_CACHE", str(tmp_path / "cache"))
    kw = dict(text=str(text), formats=("fp32", "int8", "int4-g32", "gptq-int4-g32"), ctx=64, windows=3,
              calib_samples=8, calib_seqlen=64, measure_speed=False, isolate=False)
    streamed, _ = compare(CompareConfig(model=str(tiny_gguf), stream=True, **kw))
    assert not (tmp_path / "cache" / "models").exists()  # read from the file: no dequantized cache built
    mem, _ = compare(CompareConfig(model=str(tiny_gguf), stream=False, **kw))
    cache = next((tmp_path / "cache" / "models").iterdir())
    from_cache, _ = compare(CompareConfig(model=str(cache), stream=True, **kw))
    _same(mem, streamed)
    _same(mem, from_cache)
    fp = "gguf-sha256:" + sha256_file(tiny_gguf)
    assert {r["model_fingerprint"] for r in streamed + mem} == {fp}  # the records pair as before


def test_truncated_gguf_is_one_line(tiny_gguf, text, tmp_path, capsys):
    from quantscope.errors import QuantscopeError
    from quantscope.model.blocks import streamed_skeleton
    from quantscope.model.gguf_source import GGUFBlockSource

    config, _ = _transformers_state(tiny_gguf)
    data = tiny_gguf.read_bytes()
    for keep, name in ((len(data) - 1000, "short.gguf"), (200, "header.gguf")):
        bad = tmp_path / name
        bad.write_bytes(data[:keep])
        with pytest.raises(QuantscopeError, match="not a readable GGUF file"):
            GGUFBlockSource(bad, streamed_skeleton(config, "float32"))
        code, _, err = run_cli(capsys, "compare", "--model", str(bad), "--text", str(text), "--formats", "int8",
                               "--windows", "2", "--ctx", "64", "--no-speed", "--no-store", "--stream")
        assert_one_line_error(code, err, name)


@pytest.mark.integration
def test_embedded_model_streamed_from_gguf_equals_in_memory(tmp_path, monkeypatch):
    """The embedded Q4_1 SmolLM2 streamed from its GGUF file, with no dequantized cache anywhere, gives the
    in-memory figures (which load the cache)."""
    from quantscope.api import CompareConfig, compare
    from quantscope.fileio import cache_root

    default_cache = cache_root()
    monkeypatch.setenv("QUANTSCOPE_CACHE", str(tmp_path / "cache"))
    kw = dict(model="default", formats=("fp32", "int8"), ctx=128, windows=2, measure_speed=False, isolate=False)
    streamed, _ = compare(CompareConfig(**kw, stream=True))
    assert not (tmp_path / "cache" / "models").exists()
    monkeypatch.setenv("QUANTSCOPE_CACHE", str(default_cache))  # in memory: the cache, built once per machine
    mem, _ = compare(CompareConfig(**kw, stream=False))
    _same(mem, streamed)
