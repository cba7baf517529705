"""Integration: the embedded SmolLM2-135M model end to end (builds the cache on first use, ~40 s)."""

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded():
    from quantscope.model.load import embedded_gguf_path, load_model

    try:
        embedded_gguf_path()
    except Exception as e:  # the package is part of the README's install command
        pytest.skip(f"embedded model unavailable: {e}")
    return load_model()


def test_embedded_model_shape_and_cache(embedded):
    from quantscope.model.load import _cache_valid, resolve

    m = embedded.model
    assert embedded.info.n_params == 134_515_008
    assert m.model.embed_tokens.weight.data_ptr() == m.lm_head.weight.data_ptr()  # tied
    kind, path, fp, name = resolve("default")
    assert kind == "embedded" and _cache_valid(path) and "dequantized" in name
    assert any("dequantized" in n for n in embedded.info.notes)


def test_embedded_int8_close_and_int4_further(embedded):
    from quantscope.evaluate.perplexity import score_windows
    from quantscope.evaluate.text import load_text, make_windows, tokenize
    from quantscope.measure.memory import weight_bytes
    from quantscope.model.swap import quantize_model
    from quantscope.formats import parse_format
    import copy

    base = embedded.model
    ids = tokenize(embedded.tokenizer, load_text("python-docs").text)
    assert len(ids) > 100_000
    win = make_windows(ids, 128, 2)
    q8 = quantize_model(copy.deepcopy(base), parse_format("int8"))
    s8 = score_windows(q8, win, reference=base).summary()
    b = score_windows(base, win).summary()
    assert abs(s8["perplexity"] / b["perplexity"] - 1) < 0.02
    assert 0 < s8["kld_mean"] < 0.02
    del q8
    q4 = quantize_model(copy.deepcopy(base), parse_format("int4-g128"))
    s4 = score_windows(q4, win, reference=base).summary()
    assert s4["kld_mean"] > s8["kld_mean"]
    assert weight_bytes(q4) < weight_bytes(base) / 2.5
