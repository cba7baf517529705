"""llama.cpp itself on GGUF files: quantscope's exported Q8_0/Q4_0/Q4_1 measured by llama.cpp's kernels,
`save llamacpp-*` copying out llama.cpp's own file, and llama.cpp's importance matrix.

Skipped where llama-cpp-python is not installed (it compiles llama.cpp: not in CI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, byte_tokenizer, make_tiny_model, run_cli

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")


@pytest.fixture
def sharp_model_dir(tmp_path):
    """A tiny Llama whose weights are large enough (initializer_range 0.3) for peaked next-token
    distributions, so quantization error shows in perplexity and KLD well above float noise."""
    from quantscope.evaluate.text import python_docs_text

    d = tmp_path / "sharp"
    make_tiny_model("llama", 0, vocab=257, initializer_range=0.3).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    text = tmp_path / "text.txt"
    text.write_text(python_docs_text()[:20000])
    return d, text


def _windows(tokenizer, text, n=8, ctx=64):
    ids = tokenizer(text.read_text(), return_tensors="pt").input_ids[0]
    return ids[: n * ctx].reshape(n, ctx)


@pytest.mark.parametrize("fmt,qtype", [("int8-g32-sym", "Q8_0"), ("int4-g32-sym", "Q4_0"), ("int4-g32", "Q4_1")])
def test_llamacpp_measures_our_file_like_quantscope(sharp_model_dir, tmp_path, fmt, qtype):
    """llama.cpp loads quantscope's file, and its perplexity and KLD (from its own logits, on the same
    windows, against the same baseline) are quantscope's row for the format within 2%. For Q8_0 the
    weights' rounding is as small as that of llama.cpp's 8-bit activations (which doubles the KLD on
    this model), so there the row compared is quantscope's model with the activations rounded the same way."""
    from quantscope.backends.llamacpp import LlamaCppLM, tensor_types
    from quantscope.evaluate.perplexity import score_windows
    from quantscope.model.gguf_check import llamacpp_activation_rounding
    from quantscope.model.gguf_export import save_gguf
    from quantscope.model.load import load_model
    from quantscope.quantization import quantize

    d, text = sharp_model_dir
    lm = load_model(str(d))
    windows = _windows(lm.tokenizer, text)
    q = quantize(load_model(str(d)).model, fmt).model
    ours = score_windows(q, windows, reference=lm.model).summary()
    out = tmp_path / "q.gguf"
    save_gguf(q, lm.tokenizer, q.config, out, windows[0], {"model": "sharp"})
    assert tensor_types(out)[qtype] == 14
    cpp = LlamaCppLM(out, windows.shape[1], 2, {})
    theirs = score_windows(cpp, windows, reference=lm.model).summary()
    cpp._llm.close()
    assert ours["kld_mean"] > 1e-3  # well above the engines' float differences
    assert theirs["perplexity"] == pytest.approx(ours["perplexity"], rel=0.02)
    with llamacpp_activation_rounding(q):
        rounded = score_windows(q, windows, reference=lm.model).summary()
    assert theirs["kld_mean"] == pytest.approx(rounded["kld_mean"], rel=0.02)
    if qtype != "Q8_0":
        assert theirs["kld_mean"] == pytest.approx(ours["kld_mean"], rel=0.02)


def test_llamacpp_reads_a_quantized_token_embedding(sharp_model_dir, tmp_path):
    """token_embd in Q4_0 (looked up, and the tied output): llama.cpp's KLD and perplexity are
    quantscope's within 2%."""
    from quantscope.backends.llamacpp import LlamaCppLM
    from quantscope.evaluate.perplexity import score_windows
    from quantscope.model.gguf_export import save_gguf
    from quantscope.model.load import load_model
    from quantscope.quantization import QuantizeOptions, quantize

    d, text = sharp_model_dir
    lm = load_model(str(d))
    windows = _windows(lm.tokenizer, text)
    q = quantize(load_model(str(d)).model, "int4-g32-sym", QuantizeOptions(include=("embed_tokens",))).model
    out = tmp_path / "q.gguf"
    save_gguf(q, lm.tokenizer, q.config, out, windows[0], {"model": "sharp"})
    cpp = LlamaCppLM(out, windows.shape[1], 2, {})
    theirs = score_windows(cpp, windows, reference=lm.model).summary()
    cpp._llm.close()
    ours = score_windows(q, windows, reference=lm.model).summary()
    plain = score_windows(quantize(load_model(str(d)).model, "int4-g32-sym").model, windows, reference=lm.model)
    assert ours["kld_mean"] > plain.summary()["kld_mean"]  # the embedding's rounding is in the figure
    assert theirs["kld_mean"] == pytest.approx(ours["kld_mean"], rel=0.02)
    assert theirs["perplexity"] == pytest.approx(ours["perplexity"], rel=0.02)


def _source_gguf(capsys, d, text, tmp_path):
    """A GGUF of the tiny model (quantscope's Q8_0): what llama.cpp formats start from."""
    src = tmp_path / "src.gguf"
    code, _, err = run_cli(capsys, "save", "int8-g32-sym", "--model", str(d), "--out", str(src), "--calib", str(text))
    assert code == 0, err
    return src


@pytest.mark.parametrize("fmt,qtype", [("llamacpp-q4_0", "Q4_0"), ("llamacpp-q8_0", "Q8_0"),
                                       ("llamacpp-q4_0-imatrix", "Q4_0"), ("llamacpp-f32", "F32")])
def test_save_copies_out_llamacpps_file(capsys, tiny_model_dir, tmp_path, fmt, qtype):
    d, text = tiny_model_dir
    src = _source_gguf(capsys, d, text, tmp_path)
    out = tmp_path / "out.gguf"
    code, stdout, err = run_cli(capsys, "save", fmt, "--model", str(src), "--out", str(out), "--calib", str(text),
                                "--calib-samples", "4", "--calib-seqlen", "64", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["source"] == "llama.cpp" and r["file_bytes"] == out.stat().st_size
    assert r["gguf_types"].get(qtype, 0) == (20 if qtype == "F32" else 14)  # the 14 decoder linears
    # transformers' reload of llama.cpp's file agrees with llama.cpp (up to its 8-bit activations)
    assert r["kld"] < 1e-4 and r["readback_identical"] is None
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    # the file is measured like any model (compare --model out.gguf)
    from quantscope.model.load import load_model

    assert load_model(str(out)).tokenizer.get_vocab() == load_model(str(d)).tokenizer.get_vocab()
    # and not overwritten
    code, _, err = run_cli(capsys, "save", fmt, "--model", str(src), "--out", str(out), "--calib", str(text))
    assert_one_line_error(code, err, "already exists")


def test_copy_out_needs_a_gguf_source(capsys, sharp_model_dir, tmp_path):
    d, text = sharp_model_dir
    code, _, err = run_cli(capsys, "save", "llamacpp-q4_0", "--model", str(d), "--out", str(tmp_path / "x.gguf"),
                           "--calib", str(text))
    assert_one_line_error(code, err, "need a GGUF source model")
    assert not list(tmp_path.glob("*x.gguf*"))


def test_importance_matrix_is_the_mean_squared_input(sharp_model_dir, tmp_path, capsys):
    from quantscope.backends.llamacpp import f32_gguf
    from quantscope.backends.llamacpp_imatrix import importance_matrix
    from quantscope.model.load import load_model

    d, text = sharp_model_dir
    base = f32_gguf(_source_gguf(capsys, d, text, tmp_path))
    lm = load_model(str(d))
    calib = list(_windows(lm.tokenizer, text, n=3))
    im = importance_matrix(lm.model, calib, base)
    assert len(im) == 14 and all(v.dtype == np.float32 for v in im.values())
    # blk.0.attn_q's input is layer 0's input norm of the token embeddings: computed directly
    layer = lm.model.model.layers[0]
    with torch.no_grad():
        x = torch.cat([layer.input_layernorm(lm.model.model.embed_tokens(s)) for s in calib])
    assert np.allclose(im["blk.0.attn_q.weight"], (x * x).mean(0).numpy(), rtol=1e-5, atol=1e-8)
    assert np.array_equal(im["blk.0.attn_q.weight"], im["blk.0.attn_k.weight"])  # the same input


def test_importance_matrix_lowers_the_weighted_error(sharp_model_dir, tmp_path, capsys):
    """llama.cpp's Q4_0 with the importance matrix picks scales that lower the importance-weighted squared
    error of every tensor's weights against the F32 file's, compared with its plain Q4_0."""
    from quantscope.backends.llamacpp import f32_gguf, quantize_file
    from quantscope.backends.llamacpp_imatrix import importance_matrix
    from quantscope.model.load import load_model

    d, text = sharp_model_dir
    base = f32_gguf(_source_gguf(capsys, d, text, tmp_path))
    lm = load_model(str(d))
    im = importance_matrix(lm.model, list(_windows(lm.tokenizer, text, n=4)), base)
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "imatrix.gguf"
    quantize_file(base, plain, "Q4_0", 2)
    quantize_file(base, weighted, "Q4_0", 2, im)

    def tensors(path):
        return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors}

    f32, a, b = tensors(base), tensors(plain), tensors(weighted)
    assert set(im) <= set(a)
    for name, w in im.items():
        err_plain = float((w * (a[name] - f32[name]) ** 2).sum())
        err_imatrix = float((w * (b[name] - f32[name]) ** 2).sum())
        assert err_imatrix < err_plain, name
