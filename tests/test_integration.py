"""Integration: the embedded SmolLM2-135M model end to end (builds the cache on first use, ~40 s)."""

import json
from pathlib import Path

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
    from quantscope.api import quantize
    from quantscope.formats import parse_format
    import copy

    base = embedded.model
    ids = tokenize(embedded.tokenizer, load_text("python-docs").text)
    assert len(ids) > 100_000
    win = make_windows(ids, 128, 2)
    q8 = quantize(copy.deepcopy(base), parse_format("int8"))
    s8 = score_windows(q8, win, reference=base).summary()
    b = score_windows(base, win).summary()
    assert abs(s8["perplexity"] / b["perplexity"] - 1) < 0.02
    assert 0 < s8["kld_mean"] < 0.02
    del q8
    q4 = quantize(copy.deepcopy(base), parse_format("int4-g128"))
    s4 = score_windows(q4, win, reference=base).summary()
    assert s4["kld_mean"] > s8["kld_mean"]
    assert weight_bytes(q4) < weight_bytes(base) / 2.5


def test_llama_cpp_rows_through_the_harness(tmp_path):
    """llama.cpp's own quantizer and kernels under the protocol: its F32 run of the baseline agrees
    with the torch baseline (engine noise only), Q8_0 is close and smaller, Q4_K_M further."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install 'quantscope[llamacpp]'")
    from quantscope.harness import CompareConfig, compare

    cfg = CompareConfig(formats=("fp32", "llamacpp-f32", "llamacpp-q8_0", "llamacpp-q4_k_m"), windows=2,
                        ctx=128, threads=2)
    records, _ = compare(cfg, run_dir=str(tmp_path / "run"))
    by = {r["format"]: r for r in records}
    assert not any(r.get("error") for r in records), [r.get("error") for r in records]
    assert by["llamacpp-f32"]["kld_mean"] < 1e-3 and by["llamacpp-f32"]["top1_agreement"] > 0.97
    assert abs(by["llamacpp-f32"]["perplexity"] / by["fp32"]["perplexity"] - 1) < 0.01
    assert by["llamacpp-f32"]["kld_mean"] < by["llamacpp-q8_0"]["kld_mean"] < by["llamacpp-q4_k_m"]["kld_mean"]
    assert by["llamacpp-q4_k_m"]["weight_bytes"] < by["llamacpp-q8_0"]["weight_bytes"] < by["fp32"]["weight_bytes"]
    assert by["llamacpp-q8_0"]["backend"] == "llama.cpp" and by["llamacpp-q8_0"]["backend_version"]
    assert by["llamacpp-q4_k_m"]["gguf_tensor_types"].get("F32", 0) >= 1  # norms and the embedding
    assert by["llamacpp-q8_0"]["decode_tokens_per_s"] > 0 and by["llamacpp-q8_0"]["prefill_tokens_per_s"] > 0


def test_save_embedded_int4_g64_checkpoint(embedded, tmp_path):
    """`quantscope save` on the embedded model: a compressed-tensors checkpoint that reads back exactly;
    group 128 is refused (576 inputs are not whole groups) before anything is written."""
    import json
    import subprocess
    import sys

    pytest.importorskip("compressed_tensors")
    cmd = [sys.executable, "-m", "quantscope.cli", "save", "--threads", "1", "--json", "-"]
    bad = subprocess.run(cmd + ["int4-g128", "--out", str(tmp_path / "g128")], capture_output=True, text=True)
    assert bad.returncode == 2 and "whole groups" in bad.stderr and "Traceback" not in bad.stderr
    assert not any(tmp_path.iterdir())
    r = subprocess.run(cmd + ["int4-g64", "--out", str(tmp_path / "g64")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["linears"] == 210 and rep["max_weight_diff"] == 0.0 and rep["max_logit_diff"] < 1e-3
    # 4-bit codes + fp32 scales and zero points of 30 x 7 linears, plus the fp32 embedding (tied head)
    assert 100 * 2**20 < rep["file_bytes"] < 200 * 2**20
    meta = json.loads((tmp_path / "g64" / "quantscope.json").read_text())
    assert meta["format"] == "int4-g64" and "dequantized" in meta["notes"][0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g64"]


def test_shipped_study_example_runs_end_to_end(embedded, tmp_path):
    """examples/study.toml (the README's sweep example) parses as shipped, and the same study with
    fewer formats and tokens runs through `quantscope sweep` on the built-in text, then resumes."""
    import tomllib

    from quantscope.cli import main
    from quantscope.results.runs import load_run
    from quantscope.sweep import load_study

    example = Path(__file__).resolve().parents[1] / "examples" / "study.toml"
    shipped = load_study(example)
    assert shipped.models == ("default",) and shipped.texts == ("python-docs",)
    data = tomllib.loads(example.read_text())
    data.update(formats=["fp32", "int8"], ctx=64, windows=2)
    small = tmp_path / "study.toml"
    small.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in data.items()) + "\n")
    out = tmp_path / "run"
    assert main(["sweep", str(small), "--out", str(out), "--quiet"]) == 0
    records = load_run(out).records
    assert [r["format"] for r in records] == ["fp32", "int8"] and not any(r.get("error") for r in records)
    assert records[1]["kld_mean"] > 0 and records[1]["text"] == records[0]["text"]
    assert main(["sweep", str(small), "--out", str(out), "--quiet"]) == 0  # resumes: nothing measured again
    assert len(load_run(out).records) == 2
