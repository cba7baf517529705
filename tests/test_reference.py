"""compare --reference: the baseline is another model than --model (its vocabulary checked), in records and keys."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import assert_one_line_error, byte_tokenizer, make_tiny_model, run_cli
from quantscope.errors import QuantscopeError
from quantscope.evaluate.perplexity import score_windows
from quantscope.harness import CompareConfig, compare
from quantscope.harness.preparation import prepare
from quantscope.harness.run import default_run_dir, job_key
from quantscope.model.load import load_model, resolve


def _tiny(tmp_path, name, seed, tokenizer=None, **cfg):
    d = tmp_path / name
    make_tiny_model("llama", seed, vocab=257, **cfg).save_pretrained(d)
    (tokenizer or byte_tokenizer()).save_pretrained(d)
    return d


def _config(model, text, **kw):
    return CompareConfig(model=str(model), text=str(text), formats=kw.pop("formats", ("fp32", "int8")), ctx=32,
                         windows=5, isolate=False, measure_speed=False, **kw)


def test_reference_is_the_baseline(tiny_model_dir, tmp_path):
    a, text = tiny_model_dir
    b = _tiny(tmp_path, "other", seed=1)
    cfg = _config(b, text, reference=str(a))
    records, meta = compare(cfg, run_dir=tmp_path / "run")
    base, own, q = records
    fa, fb = resolve(str(a))[2], resolve(str(b))[2]
    assert base["baseline"] and base["model_fingerprint"] == fa and base["model_ref"] == str(a)
    assert [r["format"] for r in records] == ["fp32", "fp32", "int8"]  # the model's own fp32 is a row
    assert own["model_fingerprint"] == q["model_fingerprint"] == meta["model_fingerprint"] == fb
    assert all(r["reference_fingerprint"] == fa and r["reference_model"] == a.name for r in records)
    # the model's fp32 row against the reference, computed directly on the run's windows
    windows = prepare(cfg).jobs[0].windows
    direct = score_windows(load_model(str(b)).model, windows, reference=load_model(str(a)).model).summary()
    assert own["kld_mean"] > 0.01 and own["kld_mean"] == pytest.approx(direct["kld_mean"], rel=1e-5)
    assert own["top1_agreement"] == direct["top1_agreement"]
    # each row keeps its own perplexity: the same numbers as a run without a reference
    plain_b, _ = compare(_config(b, text, formats=("int8",)))
    plain_a, _ = compare(_config(a, text, formats=("int8",)))
    assert base["perplexity"] == pytest.approx(plain_a[0]["perplexity"], rel=1e-6)
    assert own["perplexity"] == pytest.approx(plain_b[0]["perplexity"], rel=1e-6)
    assert q["perplexity"] == pytest.approx(plain_b[1]["perplexity"], rel=1e-6)
    # the paired delta is against the reference: B's perplexity minus A's on the same windows
    assert own["perplexity_delta"] == pytest.approx(own["perplexity"] - base["perplexity"], abs=1e-5 * base["perplexity"])
    # the reference is computed in the worker (no shared cache) the same way
    local, _ = compare(_config(b, text, reference=str(a), reference_cache_bytes=0))
    assert local[1]["kld_mean"] == pytest.approx(own["kld_mean"], rel=1e-5)
    assert local[2]["top1_agreement"] == q["top1_agreement"]


def test_reference_in_keys_and_run_directories(tiny_model_dir, tmp_path):
    a, text = tiny_model_dir
    b = _tiny(tmp_path, "other", seed=1)
    with_ref, without = prepare(_config(b, text, reference=str(a))), prepare(_config(b, text))
    keys = {job_key(j) for j in with_ref.jobs}
    assert len(keys) == 3 and not keys & {job_key(j) for j in without.jobs}
    assert default_run_dir(_config(b, text, reference=str(a))) != default_run_dir(_config(b, text))
    # one run directory does not hold a run with and one without the reference
    run = tmp_path / "run"
    compare(_config(b, text, formats=("fp32",)), run_dir=run)
    with pytest.raises(QuantscopeError, match="give a new --out"):
        compare(_config(b, text, formats=("fp32",), reference=str(a)), run_dir=run)


def test_reference_must_share_the_vocabulary(capsys, tiny_model_dir, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    a, text = tiny_model_dir
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), reverse=True)  # the same tokens, other ids
    t = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    other = _tiny(tmp_path, "shuffled", 1, PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>"))
    code, _, err = run_cli(capsys, "compare", "--model", str(a), "--reference", str(other), "--text", str(text),
                           "--formats", "int8", "--ctx", "32", "--windows", "2", "--no-store", "--no-speed")
    assert_one_line_error(code, err, "does not share the vocabulary")
    assert "256 of 257 token ids differ" in err
    wider = _tiny(tmp_path, "wider", 1, vocab_size=320)  # same tokenizer, more logits
    with pytest.raises(QuantscopeError, match="320 logits per token"):
        prepare(_config(a, text, reference=str(wider)))


def test_saved_gguf_against_its_original(capsys, tiny_model_dir, tmp_path):
    """--model saved.gguf --reference ORIGINAL: the file's own fp32 row costs what the format cost in memory."""
    a, text = tiny_model_dir
    out = tmp_path / "q8.gguf"
    code, _, err = run_cli(capsys, "save", "int8-g32-sym", "--model", str(a), "--out", str(out), "--calib", str(text))
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "compare", "--model", str(out), "--reference", str(a), "--text", str(text),
                                "--formats", "fp32", "--ctx", "32", "--windows", "5", "--no-store", "--no-speed",
                                "--no-isolate", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    base, saved = json.loads((tmp_path / "r.json").read_text())
    assert "fp32 (reference: tiny-llama)" in stdout and "--reference" in stdout
    direct, _ = compare(_config(a, text, formats=("int8-g32-sym",)))
    # Q8_0 holds quantscope's codes and scales exactly: the file's KLD from the original is the format's
    assert saved["kld_mean"] == pytest.approx(direct[1]["kld_mean"], rel=1e-4)
    assert saved["perplexity"] == pytest.approx(direct[1]["perplexity"], rel=1e-5)
    assert base["perplexity"] == pytest.approx(direct[0]["perplexity"], rel=1e-6)


@pytest.mark.integration
def test_saved_gguf_of_the_embedded_model_against_the_original(tmp_path):
    """The embedded SmolLM2 saved as Q4_0, measured with the original as the baseline: its KLD is the
    format's (Q4_0 holds quantscope's codes and scales exactly)."""
    from quantscope.save import SaveConfig, save

    out = tmp_path / "smol-q4_0.gguf"
    save(SaveConfig(format="int4-g32-sym", out=str(out), check_tokens=32))
    common = dict(ctx=128, windows=2, isolate=False, measure_speed=False)
    from quantscope.model.load import gguf_cache_dir

    try:
        saved, _ = compare(CompareConfig(model=str(out), reference="default", formats=("fp32",), **common))
    finally:  # the file's dequantized cache (517 MB) is this test's alone: not left in the user's cache
        shutil.rmtree(gguf_cache_dir(out, build=False)[0], ignore_errors=True)
    direct, _ = compare(CompareConfig(formats=("int4-g32-sym",), **common))
    assert saved[0]["model_fingerprint"] == direct[0]["model_fingerprint"]  # the baseline is the original
    assert saved[1]["kld_mean"] == pytest.approx(direct[1]["kld_mean"], rel=1e-3)
    assert saved[1]["perplexity"] == pytest.approx(direct[1]["perplexity"], rel=1e-4)
