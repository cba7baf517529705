"""Planner bytes against measured bytes, and the `plan`, `sensitivity` and `recommend` commands."""

import copy
import json
from pathlib import Path

import pytest

from conftest import tiny_llama
from quantscope.cli import main
from quantscope.formats.spec import parse_format
from quantscope.measure.memory import weight_bytes
from quantscope.modules.swap import apply_plan, select_modules
from quantscope.plan import planner
from quantscope.results.runs import load_run

FIXTURES = Path(__file__).parent / "fixtures" / "configs"


# ---------------------------------------------------------------- planner == measured

@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("fmt", ["fp32", "int8", "int4-g128", "nf4"])
@pytest.mark.parametrize("embed_format", [None, "int8"])
def test_planned_weight_bytes_equal_the_quantized_models_bytes(fmt, tied, embed_format):
    # hidden 64 and intermediate 128: int4-g128 has one partial group per row (64 of 128)
    model = tiny_llama(tied=tied, layers=2)
    config = json.loads(model.config.to_json_string())
    spec = parse_format(fmt)
    plan = {n: spec for n in select_modules(model)}
    if embed_format:
        emb = parse_format(embed_format)
        plan.update({n: emb for n in select_modules(model, include=("embed_tokens", "lm_head"))
                     if not n.startswith("model.layers.")})
    q = apply_plan(copy.deepcopy(model), plan)
    planned = planner.weight_bytes_for_model_config(config, fmt, embed_format=embed_format, baseline_dtype="fp32")
    assert planned == weight_bytes(q)  # exact, not merely within 1%


# ---------------------------------------------------------------- plan

def test_plan_command_table_and_json(capsys):
    cfg = str(FIXTURES / "llama-3.1-8b.json")
    assert main(["plan", cfg, "--ctx", "8192", "--formats", "bf16,int4-g128", "--device", "24GB"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("bf16", "int4-g128"))}
    assert "16.06 GB" in lines["bf16"]  # the published checkpoint size
    assert lines["bf16"].rstrip().endswith("yes") and lines["int4-g128"].rstrip().endswith("yes")
    assert "ESTIMATE" in out
    assert main(["plan", cfg, "--formats", "bf16", "--device", "10GB", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    row = data["rows"][0]
    assert row["weight_bytes"] == planner.weight_bytes_for_model_config(json.loads(Path(cfg).read_text()), "bf16")
    assert "10GB" not in row["fits"] and row["total_bytes"] > 10 * 10**9


def test_plan_command_bad_input_is_one_line(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]


# ---------------------------------------------------------------- sensitivity

def test_sensitivity_command(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUANTSCOPE_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_model_dir
    out_json = tmp_path / "sens.json"
    argv = ["sensitivity", "--model", str(model_dir), "--text", str(text), "--windows", "2", "--ctx", "32",
            "--top", "3", "--include-embeddings", "--json", str(out_json), "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads(out_json.read_text())["rows"]
    assert len(rows) == 2 * 7 + 1  # every linear of 2 blocks, plus the tied embedding + head once
    klds = [r["kld"] for r in rows]
    assert klds == sorted(klds, reverse=True)
    assert f"1     {rows[0]['name']}" in out and rows[3]["name"] not in out
    meta = load_run(tmp_path / "run").meta
    assert [s["layer"] for s in meta["sensitivity"]] == [r["name"] for r in rows]


# ---------------------------------------------------------------- recommend

def _recommend(model_dir, text, run_dir, *extra):
    return main(["recommend", "--model", str(model_dir), "--text", str(text), "--windows", "2", "--ctx", "32",
                 "--calib-samples", "2", "--calib-seqlen", "64", "--threads", "1", "--out", str(run_dir), *extra])


def test_recommend_picks_the_expected_step_and_stores_its_trail(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # Measured on this seeded tiny model: KLD upper bounds int8 ~1e-6, 4-bit (nf4, int4-g128) ~1.6e-4 to 2e-4,
    # mixed-auto at 5 bits ~1.2e-5.
    monkeypatch.setenv("QUANTSCOPE_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_model_dir
    run = tmp_path / "run"
    assert _recommend(model_dir, text, run, "--max-kld", "1e-5", "--mixed-bpw", "", "--no-isolate",
                      "--json", str(tmp_path / "a.json")) == 0
    out = capsys.readouterr().out
    decision = json.loads((tmp_path / "a.json").read_text())
    assert decision["chosen"] == "int8" and decision["meets_target"]
    verdicts = {t["format"]: t["verdict"] for t in decision["trail"]}
    assert verdicts == {"int8": "pass", "nf4": "fail", "int4-g128": "fail"}
    assert "recommended: int8" in out and "KLD upper 95% bound" in out
    assert load_run(run).meta["recommendation"]["chosen"] == "int8"

    # 4-bit fails, mixed precision at 5 bits passes and is smaller than int8; nothing measured twice
    assert _recommend(model_dir, text, run, "--max-kld", "5e-5", "--mixed-bpw", "5,6", "--no-isolate",
                      "--json", str(tmp_path / "b.json")) == 0
    err = capsys.readouterr().err
    decision = json.loads((tmp_path / "b.json").read_text())
    assert decision["chosen"] == "mixed-auto:5:int3-g128/int4-g128/int8"
    verdicts = {t["format"]: t["verdict"] for t in decision["trail"]}
    assert verdicts["mixed-auto:6:int3-g128/int4-g128/int8"] == "skipped"
    assert "[reused] int8" in err and "[measured] int8" not in err
    steps = load_run(run).meta["recommendation"]["steps"]
    assert [s["passed"] for s in steps] == [True, False, False, True, None]


def test_recommend_impossible_memory_budget_exits_2_with_one_line(tiny_model_dir, tmp_path, capsys):
    model_dir, text = tiny_model_dir
    run = tmp_path / "run"
    code = _recommend(model_dir, text, run, "--max-kld", "1", "--memory", "50KB", "--mixed-bpw", "", "--quiet")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "no format fits memory" in err[0] and "the closest is nf4" in err[0]
    assert not run.exists()  # sizes come from config.json: nothing was measured


def test_recommend_in_worker_processes_with_a_scenario(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # research: int8 only, otherwise full precision; the scenario's budget replaced by --max-kld.
    # Two worker processes (baseline, int8): the default, isolated path.
    monkeypatch.setenv("QUANTSCOPE_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_model_dir
    assert _recommend(model_dir, text, tmp_path / "run", "--scenario", "research", "--max-kld", "1e-5",
                      "--quiet", "--json", str(tmp_path / "r.json")) == 0
    decision = json.loads((tmp_path / "r.json").read_text())
    assert decision["chosen"] == "int8" and [t["format"] for t in decision["trail"]] == ["int8"]
    assert "recommended: int8" in capsys.readouterr().out
    records = {r["format"]: r for r in load_run(tmp_path / "run").records}
    assert set(records) == {"fp32", "int8"} and records["int8"]["peak_rss_bytes"] > 0


def test_recommend_loads_the_model_and_text_once_for_the_whole_ladder(tiny_model_dir, tmp_path, monkeypatch):
    """Every ladder step is its own comparison, but the tokenizer, the safetensors headers and the
    text's tokens are read once for all of them."""
    import quantscope.evaluate.text as text_mod
    import quantscope.harness.preparation as prep

    monkeypatch.setenv("QUANTSCOPE_CACHE", str(tmp_path / "cache"))
    calls = {"headers": 0, "tokenize": 0}
    real_check, real_tok = prep.check_safetensors, text_mod.tokenize

    def check(folder):
        calls["headers"] += 1
        return real_check(folder)

    def tokenize(tok, text):
        calls["tokenize"] += 1
        return real_tok(tok, text)

    monkeypatch.setattr(prep, "check_safetensors", check)
    monkeypatch.setattr(text_mod, "tokenize", tokenize)
    model_dir, text = tiny_model_dir
    assert _recommend(model_dir, text, tmp_path / "run", "--max-kld", "1e-5", "--mixed-bpw", "", "--no-isolate",
                      "--quiet", "--json", str(tmp_path / "d.json")) == 0
    trail = json.loads((tmp_path / "d.json").read_text())["trail"]
    assert sum(t["verdict"] != "skipped" for t in trail) >= 3  # int8, nf4, int4-g128 measured
    assert calls == {"headers": 1, "tokenize": 1}
