"""The comparison harness end to end on a tiny saved model, and its measurements checked directly."""

import json
import math
import sys

import pytest
import torch

from quantscope.report.terminal import ctx_sweep_table
from quantscope.harness import CompareConfig, compare
from quantscope.evaluate.perplexity import score_windows
from quantscope.formats import parse_format
from quantscope.measure.memory import weight_bytes
from quantscope.modules.qmodules import QuantLinear, TiedQuantHead
from quantscope.api import quantize
from quantscope.modules.swap import select_modules

from conftest import tiny_llama
from quantscope.formats.registry import storage_bytes


def test_perplexity_is_exp_mean_nll_and_self_kld_zero():
    m = tiny_llama()
    windows = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    res = score_windows(m, windows, reference=m)
    s = res.summary()
    with torch.no_grad():
        nll = []
        for w in windows:
            logits = m(input_ids=w[None]).logits[0]
            nll.append(torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="none"))
        direct = torch.cat(nll)
    assert s["tokens_scored"] == 3 * 31
    assert s["perplexity"] == pytest.approx(math.exp(direct.mean().item()), rel=1e-5)
    assert s["kld_mean"] == pytest.approx(0.0, abs=1e-6)
    assert s["top1_agreement"] == 1.0  # a count: the model against itself, the same forward in one process
    half = score_windows(m, windows, score_from=16).summary()
    assert half["tokens_scored"] == 3 * 16


def test_lossy_format_has_positive_kld():
    m = tiny_llama()
    q = quantize(tiny_llama(), parse_format("int3-g32"))
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    s = score_windows(q, windows, reference=m).summary()
    assert s["kld_mean"] > 1e-4
    assert 0 <= s["top1_agreement"] <= 1


def test_quantized_model_is_small_and_selection_default():
    m = tiny_llama()
    names = select_modules(m)
    assert names and all(".layers." in n for n in names)  # decoder linears only by default
    base = weight_bytes(m)
    q = quantize(m, parse_format("int4-g128"))
    assert all(isinstance(q.get_submodule(n), QuantLinear) for n in names)
    assert weight_bytes(q) < base


def test_tied_embedding_quantized_once():
    m = tiny_llama(tied=True)
    ref = tiny_llama(tied=True)
    q = quantize(m, parse_format("int8"), include=["embed_tokens"])
    assert isinstance(q.lm_head, TiedQuantHead)
    assert q.lm_head.embedding is q.model.embed_tokens
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, q(input_ids=ids).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    emb_params = ref.model.embed_tokens.weight.numel()
    # the table is stored once: int8 codes + one fp16 scale per row, not twice
    emb = q.model.embed_tokens
    assert sum(t.numel() * t.element_size() for t in emb.storage().values()) == \
        storage_bytes(parse_format("int8"), *ref.model.embed_tokens.weight.shape)
    assert weight_bytes(q) < weight_bytes(ref) - emb_params * 3


def test_compare_end_to_end_and_resume(tiny_model_dir, tmp_path):
    d, text = tiny_model_dir
    cfg = CompareConfig(model=str(d), text=str(text), formats=("int8", "int4-g128", "nf4"), ctx=32,
                        windows=5, isolate=False)
    run = tmp_path / "run"
    records, meta = compare(cfg, run_dir=run)
    by = {r["format"]: r for r in records}
    assert list(by) == ["fp32", "int8", "int4-g128", "nf4"]
    assert by["fp32"]["baseline"] and by["fp32"]["kld_mean"] == 0.0  # set, not computed: exact
    for f in ("int8", "int4-g128", "nf4"):
        r = by[f]
        assert r["tokens_scored"] == 5 * 31
        assert r["kld_mean"] > 0 and r["weight_bytes"] < by["fp32"]["weight_bytes"]
        assert len(r["perplexity_delta_ci"]) == 2 and r["perplexity_delta_ci"][0] <= r["perplexity_delta_ci"][1]
        for k in ("perplexity", "perplexity_stderr", "kld_stderr", "kld_p99", "top1_agreement",
                  "peak_rss_bytes", "prefill_tokens_per_s", "decode_tokens_per_s", "quantize_seconds",
                  "quantscope_version", "torch_version", "transformers_version"):
            assert r[k] is not None, k
        if sys.platform.startswith("linux"):  # the quantization's own peak, within the process's
            slack = 8 << 20  # the kernel's RSS counters are cached per CPU: reads are approximate
            assert 0 < r["rss_before_quantize_bytes"] < r["quantize_peak_rss_bytes"] + slack
            assert r["quantize_peak_rss_bytes"] < r["peak_rss_bytes"] + slack
    # bits per weight of int4-g128 follow from its definition on this model's layer shapes
    m = tiny_llama(vocab=257)
    spec = parse_format("int4-g128")
    mods = dict(m.named_modules())
    sel = select_modules(m)
    expect = 8 * sum(storage_bytes(spec, *mods[n].weight.shape) for n in sel) / sum(mods[n].weight.numel() for n in sel)
    assert by["int4-g128"]["bits_per_weight"] == pytest.approx(expect, rel=1e-12)
    assert by["int8"]["kld_mean"] < by["int4-g128"]["kld_mean"]
    # the same comparison again reuses every stored record and measures nothing
    again, _ = compare(cfg, run_dir=run)
    assert all(r.get("reused") for r in again)
    assert [r["perplexity"] for r in again] == [r["perplexity"] for r in records]  # read back: exact


def test_compare_ctx_sweep(tiny_model_dir):
    d, text = tiny_model_dir
    cfg = CompareConfig(model=str(d), text=str(text), formats=("int4-g128",), ctx=32, windows=2,
                        isolate=False, measure_speed=False, ctx_sweep=(16, 64))
    records, _ = compare(cfg)
    for r in records:
        assert set(r["ctx_sweep"]) == {"16", "64"}
        assert r["ctx_sweep"]["16"]["tokens_scored"] == 4 * 15
    base, q = records
    assert q["ctx_sweep"]["64"]["kld_mean"] > 0
    # each length is paired with the baseline at that length: the delta is the difference of the two
    # perplexities on the same windows; 4 windows of 16 are too few for an interval, and say so
    for L in ("16", "64"):
        assert base["ctx_sweep"][L]["perplexity_delta"] == 0.0  # x - x on the same numbers: exact
        b, c = base["ctx_sweep"][L]["perplexity"], q["ctx_sweep"][L]["perplexity"]
        assert q["ctx_sweep"][L]["perplexity_delta"] == pytest.approx(c - b, abs=1e-5 * b)  # float32 window sums
    assert q["ctx_sweep"]["16"]["perplexity_delta_ci"] is None
    assert "no CI" in ctx_sweep_table(records)


def test_ctx_sweep_interval_with_enough_windows(tiny_model_dir):
    """With five or more windows at a length, its delta gets a paired interval that contains the delta."""
    d, text = tiny_model_dir
    cfg = CompareConfig(model=str(d), text=str(text), formats=("int4-g128",), ctx=32, windows=4,
                        isolate=False, measure_speed=False, ctx_sweep=(16,))
    _, q = compare(cfg)[0]
    cell = q["ctx_sweep"]["16"]
    lo, hi = cell["perplexity_delta_ci"]
    assert len(cell["window_nll"]) == 8 and lo <= cell["perplexity_delta"] <= hi
    assert cell["perplexity_delta_significant"] == (lo > 0 or hi < 0)


def test_served_reference_equals_side_by_side(tiny_model_dir):
    """KLD from the baseline's cached log-probabilities equals KLD recomputed in the worker."""
    d, text = tiny_model_dir
    common = dict(model=str(d), text=str(text), formats=("int4-g128",), ctx=32, windows=2, isolate=False,
                  measure_speed=False)
    served, _ = compare(CompareConfig(**common))
    local, _ = compare(CompareConfig(**common, reference_cache_bytes=0))
    assert served[1]["kld_mean"] > 0
    assert served[1]["kld_mean"] == pytest.approx(local[1]["kld_mean"], rel=1e-5)
    # counts of argmax matches: the same baseline forward either way, cached or recomputed
    assert served[1]["top1_agreement"] == local[1]["top1_agreement"]
    assert served[1]["perplexity"] == pytest.approx(local[1]["perplexity"], rel=1e-6)
    # two windows are too few to resample: a delta, but no interval and never "significant"
    assert served[1]["perplexity_delta_ci"] is None and served[1]["perplexity_delta_significant"] is False


def test_api_quantize_own_mixed_and_calibrated_without_data():
    import quantscope as qs
    from quantscope.errors import QuantscopeError

    m = qs.quantize(tiny_llama(), "int4-g128")
    assert isinstance(m.model.layers[0].mlp.up_proj, QuantLinear)
    m = qs.quantize(tiny_llama(), "mixed-edges:int4-g128/int8")
    assert m.model.layers[0].mlp.up_proj.spec.name == "int8"
    assert m.model.layers[-1].mlp.up_proj.spec.name == "int8"
    with pytest.raises(QuantscopeError, match="calib"):
        qs.quantize(tiny_llama(), "gptq-int4-g128")


def test_reserve_calib_keeps_windows_where_a_calibrated_run_puts_them(tiny_model_dir):
    """recommend measures one format at a time: with reserve_calib every step scores the windows a
    run with calibrated formats scores (after the calibration head), so rows pair and are reused."""
    d, text = tiny_model_dir
    common = dict(model=str(d), text=str(text), ctx=32, windows=2, isolate=False, measure_speed=False,
                  calib_samples=2, calib_seqlen=16)
    _, plain = compare(CompareConfig(formats=("int8",), **common))
    _, reserved = compare(CompareConfig(formats=("int8",), reserve_calib=True, **common))
    _, calibrated = compare(CompareConfig(formats=("int8", "gptq-int4-g32"), **common))
    assert plain["window_start_token"] == 0
    assert reserved["window_start_token"] == calibrated["window_start_token"] == 32
def test_compare_runs_lm_eval_tasks_paired_like_its_own(tiny_model_dir, tmp_path, monkeypatch):
    """--lm-eval-task: lm-eval's per-document answers on every format, paired with the baseline's;
    on a local task they equal quantscope's own scoring of the same questions (an independent check)."""
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install 'quantscope[lmeval]'")
    from test_tasks import FIXTURES, _local_yaml

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    d, text = tiny_model_dir
    (tmp_path / "yaml").mkdir()
    yaml_dir = _local_yaml(tmp_path / "yaml")
    cfg = CompareConfig(model=str(d), text=str(text), formats=("int4-g128",), ctx=32, windows=2,
                        isolate=False, measure_speed=False, lm_eval_tasks=("qs_known",),
                        lm_eval_include=str(yaml_dir), tasks=(("jsonl", str(FIXTURES / "known_answer.jsonl")),))
    records, _ = compare(cfg)
    for r in records:
        theirs, ours = r["tasks"]["lm-eval:qs_known"], r["tasks"]["jsonl"]
        assert theirs["n"] == ours["n"] == 3
        assert theirs["acc"] == ours["acc"] and theirs["acc_norm"] == ours["acc_norm"]
        assert r["task_items"]["lm-eval:qs_known"]["correct"] == r["task_items"]["jsonl"]["correct"]
        assert r["lm_eval_version"]
    assert "delta" in records[1]["tasks"]["lm-eval:qs_known"]
    with pytest.raises(Exception, match="not a directory"):
        compare(CompareConfig(model=str(d), text=str(text), formats=("int8",), ctx=32, windows=2, isolate=False,
                              lm_eval_tasks=("qs_known",), lm_eval_include=str(tmp_path / "nope")))


def test_a_tied_embedding_counts_once_in_bits_per_weight(tiny_model_dir):
    d, text = tiny_model_dir
    records, _ = compare(CompareConfig(model=str(d), text=str(text), formats=("int8",), ctx=32, windows=2,
                                       isolate=False, measure_speed=False, include=("embed_tokens",)))
    fp32, int8 = records
    assert fp32["bits_per_weight"] == 32.0  # the shared table's parameters once, like its bytes
    m = tiny_llama(vocab=257)
    params = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2)  # tied head not listed again
    assert fp32["quantized_params"] == int8["quantized_params"] == params
    assert 8.0 < int8["bits_per_weight"] < 9.0


def test_new_format_reuses_the_stored_baseline_tasks(tiny_model_dir, tmp_path, monkeypatch):
    """A format added to a stored run: the baseline is scored again over its windows only (to serve its
    log-probabilities), its tasks are not; the new format's KLD equals a fresh run's."""
    import quantscope.evaluate.tasks as tasks_mod
    from test_tasks import FIXTURES

    d, text = tiny_model_dir
    common = dict(model=str(d), text=str(text), ctx=32, windows=5, isolate=False, measure_speed=False,
                  tasks=(("jsonl", str(FIXTURES / "known_answer.jsonl")),))
    run = tmp_path / "run"
    compare(CompareConfig(formats=("int8",), **common), run_dir=run)
    scored = []
    real = tasks_mod.score_task
    monkeypatch.setattr(tasks_mod, "score_task", lambda model, tok, task, **k: scored.append(task.name) or real(model, tok, task, **k))
    records, _ = compare(CompareConfig(formats=("int8", "int4-g128"), **common), run_dir=run)
    assert scored == ["jsonl"]  # the new format's, not the baseline's again
    by = {r["format"]: r for r in records}
    assert by["fp32"].get("reused") and by["int8"].get("reused") and not by["int4-g128"].get("reused")
    assert by["int4-g128"]["tasks"]["jsonl"]["n"] == by["fp32"]["tasks"]["jsonl"]["n"]
    fresh, _ = compare(CompareConfig(formats=("int4-g128",), **common))
    assert by["int4-g128"]["kld_mean"] == pytest.approx(fresh[1]["kld_mean"], rel=1e-6)


def test_paired_tasks_between_two_formats():
    """Any two records answering the same questions pair: delta = a - b with McNemar on the discordant pairs."""
    from quantscope.harness import paired_tasks

    def rec(fmt, correct):
        items = {"task": "arc-easy", "kind": "mc", "item_ids": [str(i) for i in range(len(correct))],
                 "loglik": [[0.0, -1.0]] * len(correct), "correct": correct, "correct_norm": correct}
        return {"format": fmt, "task_items": {"arc-easy": items}}

    a = rec("gptq", [1] * 30 + [0] * 10)
    b = rec("rtn", [1] * 20 + [0] * 20)  # a is right on 10 questions b gets wrong, never the reverse
    p = paired_tasks(a, b)
    t = p["tasks"]["arc-easy"]
    assert p["format"] == "gptq - rtn" and t["delta"] == pytest.approx(0.25)
    assert t["mcnemar_p"] == pytest.approx(2 * 0.5 ** 10) and t["significant"] and t["delta_ci"][0] > 0
    assert p["task_categories"]["reasoning"]["delta"] == pytest.approx(0.25)
    same = paired_tasks(a, rec("gptq-again", [1] * 30 + [0] * 10))["tasks"]["arc-easy"]
    assert same["delta"] == 0 and same["delta_ci"][0] <= 0 <= same["delta_ci"][1] and not same["significant"]
