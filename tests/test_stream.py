"""Streamed evaluation (harness.stream): the same figures as in memory, bounded memory, and its refusals."""

from __future__ import annotations

import json

import pytest

from conftest import assert_one_line_error, byte_tokenizer, make_tiny_model, run_cli

FORMATS = ("fp32", "int8", "int4-g128", "nf4", "gptq-int4-g128")


def _folder(tmp_path, name="m", shard=None, **kw):
    m = make_tiny_model(kw.pop("arch", "llama"), hidden=kw.pop("hidden", 128), vocab=257, **kw)
    d = tmp_path / name
    m.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def text(tmp_path):
    from quantscope.evaluate.text import python_docs_text

    p = tmp_path / "text.txt"
    p.write_text(python_docs_text()[:30000])
    return p


def _config(d, text, **kw):
    from quantscope.api import CompareConfig

    base = dict(model=str(d), text=str(text), formats=FORMATS, ctx=64, windows=3, calib_samples=8, calib_seqlen=64,
                measure_speed=False, isolate=False)
    return CompareConfig(**{**base, **kw})


def _same(a: list[dict], b: list[dict]) -> None:
    assert [r["format"] for r in a] == [r["format"] for r in b]
    for x, y in zip(a, b):
        assert not x.get("error") and not y.get("error"), (x.get("error"), y.get("error"))
        assert y["streamed"] and not x.get("streamed")
        assert y["perplexity"] == pytest.approx(x["perplexity"], rel=1e-4), x["format"]
        assert y["kld_mean"] == pytest.approx(x["kld_mean"], rel=1e-3, abs=1e-9), x["format"]
        assert y["top1_agreement"] == pytest.approx(x["top1_agreement"], abs=1e-9)
        assert y["weight_bytes"] == x["weight_bytes"] and y["bits_per_weight"] == pytest.approx(x["bits_per_weight"])
        assert y["window_nll"] == pytest.approx(x["window_nll"], rel=1e-4)


@pytest.mark.parametrize("arch,tied,shard", [("llama", True, None), ("llama", False, "150KB"), ("qwen2", True, None)])
def test_streamed_equals_in_memory(tmp_path, text, arch, tied, shard):
    from quantscope.api import compare

    d = _folder(tmp_path, arch=arch, tied=tied, shard=shard, layers=3)
    if shard:
        assert len(list(d.glob("*.safetensors"))) > 1  # really read shard by shard
    mem, _ = compare(_config(d, text, stream=False))
    streamed, meta = compare(_config(d, text, stream=True))
    _same(mem, streamed)
    assert any("streamed" in n for r in streamed for n in r["notes"])
    assert streamed[0]["prefill_tokens_per_s"] is None  # speed is not presented for a model never whole


def test_streamed_with_embedding_and_head_selected(tmp_path, text):
    from quantscope.api import compare

    d = _folder(tmp_path, tied=False)
    kw = dict(formats=("fp32", "int8", "int4-g32", "gptq-int4-g32"), include=("embed", "lm_head"))
    mem, _ = compare(_config(d, text, stream=False, **kw))
    streamed, _ = compare(_config(d, text, stream=True, **kw))
    _same(mem, streamed)


def test_streamed_tasks_equal_in_memory(tmp_path, text):
    from pathlib import Path

    from quantscope.api import compare

    d = _folder(tmp_path)
    task = (("jsonl", str(Path(__file__).parent / "fixtures" / "tasks" / "known_answer.jsonl")),
            ("lambada", str(Path(__file__).parent / "fixtures" / "tasks" / "lambada_small.jsonl")))
    kw = dict(formats=("fp32", "int8", "int4-g32"), tasks=task)
    mem, _ = compare(_config(d, text, stream=False, **kw))
    streamed, _ = compare(_config(d, text, stream=True, **kw))
    _same(mem, streamed)
    for x, y in zip(mem, streamed):
        a, b = x["task_items"]["jsonl"], y["task_items"]["jsonl"]
        assert a["correct"] == b["correct"] and a["item_ids"] == b["item_ids"]
        assert [v for ll in b["loglik"] for v in ll] == pytest.approx([v for ll in a["loglik"] for v in ll], rel=1e-4)
    assert streamed[1]["tasks"]["jsonl"]["acc"] == mem[1]["tasks"]["jsonl"]["acc"]
    assert streamed[1]["tasks"]["lambada"]["acc"] == mem[1]["tasks"]["lambada"]["acc"]


def test_streamed_run_resumes_and_measures_only_new_formats(tmp_path, text, monkeypatch):
    from quantscope.api import compare
    import quantscope.harness.stream as stream

    d = _folder(tmp_path)
    run = tmp_path / "run"
    first, _ = compare(_config(d, text, stream=True, formats=("fp32", "int8")), run_dir=run)
    seen = []
    real = stream.stream_jobs
    monkeypatch.setattr(stream, "stream_jobs", lambda jobs, *a, **k: seen.append([j.format for j in jobs]) or real(jobs, *a, **k))
    again, _ = compare(_config(d, text, stream=True, formats=("fp32", "int8", "nf4")), run_dir=run)
    assert seen == [["fp32", "nf4"]]  # the baseline again (every format's reference), int8 reused
    assert [r.get("reused", False) for r in again] == [True, True, False]
    assert again[1]["perplexity"] == first[1]["perplexity"]
    seen.clear()
    compare(_config(d, text, stream=True, formats=("fp32", "int8", "nf4")), run_dir=run)
    assert seen == []  # all stored: nothing streamed
    # streamed and in-memory records never stand in for each other
    mem, _ = compare(_config(d, text, stream=False, formats=("fp32", "int8")), run_dir=run)
    assert not any(r.get("reused") for r in mem)


def test_stream_chosen_when_in_memory_does_not_fit(tmp_path, text, monkeypatch):
    from quantscope.api import compare
    from quantscope.plan.stream import stream_plan

    d = _folder(tmp_path, layers=8)  # deep enough that one block in flight is well below the whole model
    monkeypatch.setattr("quantscope.plan.stream.RUNTIME_BYTES", 0)  # the tiny model's whole plan is the runtime
    cfg = json.loads((d / "config.json").read_text())
    p = stream_plan(cfg, ("fp32", "int8"), 3, 64, "fp32")
    assert p.total_bytes < p.in_memory_bytes
    monkeypatch.setattr("quantscope.measure.machine.available_memory_bytes", lambda: p.in_memory_bytes - 1)
    notes = []
    recs, meta = compare(_config(d, text, formats=("fp32", "int8")), on_note=notes.append)
    assert recs[1]["streamed"] and notes and notes[0].startswith("streamed: in memory this run needs about")
    assert any(n.startswith("streamed: in memory") for n in meta["notes"])


def test_does_not_fit_even_streamed_is_one_line(tmp_path, text, capsys, monkeypatch):
    d = _folder(tmp_path)
    monkeypatch.setattr("quantscope.measure.machine.available_memory_bytes", lambda: 1000)
    code, out, err = run_cli(capsys, "compare", "--model", str(d), "--text", str(text), "--formats", "int8",
                             "--windows", "2", "--ctx", "64", "--no-speed", "--no-store")
    assert_one_line_error(code, err, "does not fit even streamed")


def test_stream_refusals_are_one_line(tmp_path, text, capsys):
    d = _folder(tmp_path)
    base = ["compare", "--model", str(d), "--text", str(text), "--windows", "2", "--ctx", "64", "--no-speed",
            "--no-store", "--stream"]
    code, _, err = run_cli(capsys, *base, "--formats", "int8,bnb-nf4")
    assert_one_line_error(code, err, "bnb-nf4 need the whole model in memory")
    code, _, err = run_cli(capsys, *base, "--formats", "int8", "--ctx-sweep", "32")
    assert_one_line_error(code, err, "--ctx-sweep run(s) on a whole model")


def test_missing_shard_is_one_line(tmp_path, text, capsys):
    d = _folder(tmp_path, shard="150KB")
    shards = sorted(d.glob("*.safetensors"))
    shards[-1].unlink()
    code, _, err = run_cli(capsys, "compare", "--model", str(d), "--text", str(text), "--formats", "int8",
                           "--windows", "2", "--ctx", "64", "--no-speed", "--no-store", "--stream")
    assert_one_line_error(code, err, f"shard {shards[-1].name} is named by model.safetensors.index.json but missing")


def test_bf16_on_a_cpu_without_bf16_units_computes_in_float32(monkeypatch):
    from quantscope import placement

    monkeypatch.setattr(placement, "cpu_flags", lambda: {"avx2"})
    assert placement.compute_dtype("bfloat16", "cpu") == "float32"
    assert placement.compute_dtype("float32", "cpu") == "float32"
    monkeypatch.setattr(placement, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert placement.compute_dtype("bfloat16", "cpu") == "bfloat16"
    assert placement.compute_dtype("float16", "cpu") == "float32"


def test_plan_stream_parts_add_up(tmp_path, capsys):
    d = _folder(tmp_path, tied=False, layers=4)
    out = tmp_path / "plan.json"
    code, text_out, _ = run_cli(capsys, "plan", str(d), "--stream", "--formats", "int8,int4-g128", "--windows", "2",
                                "--ctx", "64", "--json", str(out))
    assert code == 0 and "predicted peak, streamed" in text_out
    p = json.loads(out.read_text())
    assert p["total_bytes"] == p["outside_bytes"] + p["stream_bytes"] + p["runtime_bytes"] + max(
        p["in_flight_bytes"] + p["workspace_bytes"], p["head_bytes"])
    cfg = json.loads((d / "config.json").read_text())
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    assert p["outside_bytes"] == (2 * v * h + h) * 4  # embedding + untied head + final norm, float32
    assert p["stream_bytes"] == 3 * 2 * 64 * h * 4  # baseline + 2 formats, 2 windows x 64 tokens


@pytest.mark.integration
def test_embedded_model_streamed_equals_in_memory():
    from quantscope.api import CompareConfig, compare

    kw = dict(model="default", formats=FORMATS, ctx=128, windows=2, calib_samples=8, calib_seqlen=128,
              measure_speed=False, isolate=False)
    mem, _ = compare(CompareConfig(**kw, stream=False))
    streamed, _ = compare(CompareConfig(**kw, stream=True))
    _same(mem, streamed)
