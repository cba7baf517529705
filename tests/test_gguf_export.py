"""GGUF export: blocks against gguf-py's own dequantizer, files read back and reloaded, bad input refused."""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli
from quantscope.formats.qtensor import quantize_tensor
from quantscope.formats.spec import parse_format
from quantscope.model import gguf_blocks as gb

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("name,qtype", [("int8-g32-sym", "Q8_0"), ("int8", "Q8_0"), ("int4-g32-sym", "Q4_0"),
                                        ("int4-g128-sym", "Q4_0"), ("int4-g32", "Q4_1"), ("int4-g64", "Q4_1")])
def test_blocks_match_gguf_py_dequantizer(name, qtype):
    torch.manual_seed(0)
    w = torch.randn(16, 256) * 0.05
    spec = parse_format(name)
    qt = quantize_tensor(w, spec)
    b = gb.from_storage(qt.tensors, spec, qt.shape)
    assert b.qtype == qtype
    raw = gb.to_bytes(b)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]))  # independent reference
    assert torch.equal(ref, gb.dequantize(b))
    assert gb.same(gb.from_bytes(raw, qtype, qt.shape), b)
    delta = float((ref - qt.dequantize()).abs().max())
    if qtype == "Q4_1":  # only the fp16 minimum rounds: within half an ulp of fp16 at the weights' scale
        assert 0 <= delta < 1e-4
    else:
        assert delta == 0.0


def test_formats_without_a_block_type():
    for name in ("int4-g16-sym", "int3-g32", "int8-g32", "nf4", "fp8-e4m3", "int4-g48"):
        assert gb.gguf_type(parse_format(name)) is None, name


def _save(capsys, d, text, fmt, out, *extra):
    return run_cli(capsys, "save", fmt, "--model", str(d), "--out", str(out), "--calib", str(text),
                   "--calib-samples", "4", "--calib-seqlen", "32", *extra)


@pytest.mark.parametrize("fmt,qtype,exact", [("int4-g32-sym", "Q4_0", True), ("int4-g32", "Q4_1", False),
                                             ("int8-g32-sym", "Q8_0", True), ("gptq-int4-g32-sym-act", "Q4_0", True),
                                             ("awq-int4-g32-sym", "Q4_0", True)])
def test_save_gguf_reads_back_and_reloads(capsys, tiny_model_dir, tmp_path, fmt, qtype, exact):
    import json

    d, text = tiny_model_dir
    out = tmp_path / "m.gguf"
    code, stdout, err = _save(capsys, d, text, fmt, out, "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["gguf_types"] == {qtype: 14, "F32": 6}  # 2 blocks x 7 linears; 2 x 2 norms, final norm, embedding
    assert r["readback_identical"] and r["exact"] is exact
    assert (r["max_weight_diff"] == 0.0) is exact
    assert r["kld"] < 1e-6 and r["file_bytes"] == out.stat().st_size
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied head: token_embd serves
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 257


@pytest.mark.parametrize("fmt,qtype", [("int8-g32-sym", "Q8_0"), ("int4-g32", "Q4_1")])
def test_quantized_token_embedding_is_written_in_blocks(capsys, tiny_model_dir, tmp_path, fmt, qtype):
    """--include embed_tokens: the (tied) embedding is token_embd in the format's blocks, not F32."""
    import json

    d, text = tiny_model_dir
    out = tmp_path / "m.gguf"
    code, _, err = _save(capsys, d, text, fmt, out, "--include", "embed_tokens", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["gguf_types"] == {qtype: 15, "F32": 5} and r["kld"] < 1e-6  # the tied head reads it too
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert tensors["token_embd.weight"].tensor_type.name == qtype and "output.weight" not in tensors
    plain = tmp_path / "plain.gguf"
    assert _save(capsys, d, text, fmt, plain)[0] == 0
    assert out.stat().st_size < plain.stat().st_size


def test_tokenizer_without_merges_round_trips(capsys, tiny_model_dir, tmp_path):
    """A BPE with no merges is written with an empty merges list (llama.cpp requires the key;
    transformers read a missing one as "derive them from scores" and failed with KeyError 'scores')."""
    from quantscope.model.load import load_model

    d, text = tiny_model_dir
    out = tmp_path / "m.gguf"
    code, _, err = _save(capsys, d, text, "int8-g32-sym", out)
    assert code == 0, err
    assert gguf.GGUFReader(str(out)).fields["tokenizer.ggml.merges"].contents() == []
    orig, back = load_model(str(d)).tokenizer, load_model(str(out)).tokenizer
    assert back.get_vocab() == orig.get_vocab()
    sample = text.read_text()[:2000]
    assert back.encode(sample) == orig.encode(sample)


def test_saved_codes_are_quantscopes(tiny_model_dir, tmp_path):
    """The file's blocks, un-permuted, are the quantized model's codes and scales (a library call)."""
    from quantscope.model.gguf_export import save_gguf
    from quantscope.model.gguf_meta import qk_permutation
    from quantscope.model.load import load_model
    from quantscope.modules.qmodules import QuantLinear
    from quantscope.quantization import quantize

    d, _ = tiny_model_dir
    lm = load_model(str(d))
    model = quantize(lm.model, "int4-g32-sym").model
    out = tmp_path / "q.gguf"
    save_gguf(model, lm.tokenizer, model.config, out, torch.arange(16), {"model": "tiny"})
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    m = dict(model.named_modules())["model.layers.1.self_attn.q_proj"]
    assert isinstance(m, QuantLinear)
    got = gb.from_bytes(np.asarray(tensors["blk.1.attn_q.weight"].data), "Q4_0", m.qshape)
    inv = np.argsort(qk_permutation("model.layers.1.self_attn.q_proj.weight", model.config))
    assert gb.same(gb.permute_rows(got, inv), gb.from_storage(m.storage(), m.spec, m.qshape))


def test_refused_format_lists_what_can_be_saved(capsys, tiny_model_dir, tmp_path):
    d, text = tiny_model_dir
    for fmt in ("nf4", "int3-g32", "int4-g16-sym", "bnb-nf4"):
        code, _, err = _save(capsys, d, text, fmt, tmp_path / "x.gguf")
        assert_one_line_error(code, err, "cannot be saved as GGUF")
        assert "Q4_0" in err and "llamacpp-*" in err
    assert not list(tmp_path.glob("*x.gguf*"))


def test_existing_output_and_unwritable_folder(capsys, tiny_model_dir, tmp_path):
    d, text = tiny_model_dir
    out = tmp_path / "there.gguf"
    out.write_bytes(b"keep")
    code, _, err = _save(capsys, d, text, "int4-g32-sym", out)
    assert_one_line_error(code, err, "already exists")
    assert out.read_bytes() == b"keep"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        code, _, err = _save(capsys, d, text, "int4-g32-sym", ro / "m.gguf")
        assert_one_line_error(code, err, "cannot write")
    finally:
        ro.chmod(0o700)


def test_full_disk_leaves_nothing(capsys, tiny_model_dir, tmp_path, monkeypatch):
    d, text = tiny_model_dir

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    code, _, err = _save(capsys, d, text, "int4-g32-sym", tmp_path / "m.gguf")
    assert_one_line_error(code, err, "no space left on device")
    assert [p.name for p in tmp_path.iterdir() if "m.gguf" in p.name] == []


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
@pytest.mark.integration
def test_llamacpp_kld_matches_quantscope(tmp_path):
    """llama.cpp's own logits on quantscope's Q4_0 file agree with quantscope's model of the same format."""
    from quantscope.backends.llamacpp import LlamaCppLM
    from quantscope.evaluate.text import load_text, tokenize
    from quantscope.model.gguf_check import compare_logits
    from quantscope.model.gguf_export import save_gguf
    from quantscope.model.load import load_model
    from quantscope.quantization import quantize

    lm = load_model("default")
    ids = tokenize(lm.tokenizer, load_text("python-docs").text)[:256]
    with torch.no_grad():
        base = lm.model(input_ids=ids.unsqueeze(0)).logits[0].float()
    model = quantize(lm.model, "int4-g32-sym").model
    with torch.no_grad():
        ours = model(input_ids=ids.unsqueeze(0)).logits[0].float()
    out = tmp_path / "q.gguf"
    save_gguf(model, lm.tokenizer, model.config, out, ids[:32], {"model": "embedded"})
    cpp = LlamaCppLM(out, 256, 2, {})(ids.unsqueeze(0)).logits[0].float()
    k_ours, k_cpp = compare_logits(base, ours)[0], compare_logits(base, cpp)[0]
    assert abs(k_cpp - k_ours) <= 0.02 * k_ours


@pytest.mark.integration
def test_embedded_model_q4_0(tmp_path):
    """The embedded SmolLM2 (576 wide, 9 heads over 3 kv heads, tied, a GGUF source) round-trips."""
    from quantscope.save import SaveConfig, save

    out = tmp_path / "smol.gguf"
    r = save(SaveConfig(format="int4-g32-sym", out=str(out), check_tokens=32))
    assert r.gguf_types == {"Q4_0": 210, "F32": 62}  # 30 x 7 linears; 30 x 2 norms, final norm, embedding
    assert r.exact and r.max_weight_diff == 0.0 and r.kld < 1e-5
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"  # from the source GGUF
    assert fields["llama.attention.head_count_kv"].contents() == 3
    from quantscope.model.load import load_model  # `compare --model smol.gguf` loads it like any model

    from quantscope.model.load import gguf_cache_dir

    try:
        back = load_model(str(out))
    finally:  # its dequantized cache (517 MB) is this test's alone: not left in the user's cache
        shutil.rmtree(gguf_cache_dir(out, build=False)[0], ignore_errors=True)
    assert back.info.kind == "gguf" and back.tokenizer.encode("Hello world") == load_model().tokenizer.encode("Hello world")
