"""Generation agreement and `quantscope generate` on tiny random models (no downloads)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import run_cli, tiny_llama
from quantscope.errors import QuantscopeError
from quantscope.evaluate import generation as g
from quantscope.evaluate.prompts import load_prompts


def _bad(capsys, argv, needle):
    from conftest import assert_one_line_error

    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, needle)


def _perturbed(model, scale=0.5, seed=1):
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
    return m


def test_baseline_agrees_with_itself():
    m = tiny_llama(vocab=257)
    prompt = [5, 17, 99, 3]
    cont = g.greedy_continuation(m, prompt, 12)
    assert len(cont) == 12 and cont == g.greedy_continuation(m, prompt, 12)
    lp = g.continuation_logprobs(m, prompt, cont)
    row = g.compare_prompt(cont, cont, lp, lp)
    assert row == {"exact": True, "divergence": 12, "kld": 0.0}


def test_greedy_with_cache_matches_full_recompute():
    m = tiny_llama(vocab=257)
    ids = [1, 2, 3]
    want = []
    with torch.no_grad():
        for _ in range(8):
            want.append(int(m(input_ids=torch.tensor([ids + want])).logits[0, -1].argmax()))
    assert g.greedy_continuation(m, ids, 8) == want


def test_perturbed_model_diverges_and_kld_is_direct():
    m = tiny_llama(vocab=257)
    q = _perturbed(m, scale=3.0)
    prompt = [10, 20, 30, 40, 50]
    ref, got = g.greedy_continuation(m, prompt, 16), g.greedy_continuation(q, prompt, 16)
    row = g.compare_prompt(ref, got, g.continuation_logprobs(m, prompt, ref), g.continuation_logprobs(q, prompt, ref))
    assert not row["exact"] and row["divergence"] < 16
    assert ref[:row["divergence"]] == got[:row["divergence"]] and ref[row["divergence"]] != got[row["divergence"]]
    # the teacher-forced KLD, computed position by position along the baseline's continuation
    klds = []
    with torch.no_grad():
        for i in range(16):
            ctx = torch.tensor([prompt + ref[:i]])
            p = torch.log_softmax(m(input_ids=ctx).logits[0, -1].double(), -1)
            qq = torch.log_softmax(q(input_ids=ctx).logits[0, -1].double(), -1)
            klds.append(float((p.exp() * (p - qq)).sum()))
    assert row["kld"] == pytest.approx(sum(klds) / 16, rel=1e-4, abs=1e-7)


def test_divergence_and_summary():
    assert g.divergence([1, 2, 3], [1, 2, 3]) == 3
    assert g.divergence([1, 2, 3], [1, 5, 3]) == 1
    s = g.summarize({"exact": [True, False, True, True], "divergence": [8, 2, 8, 8], "kld": [0.0, 0.3, 0.01, 0.0]},
                    8, ["text", "chat", "text", "chat"])
    assert s["exact_match"] == 0.75 and s["divergence_mean"] == 6.5 and s["kld_mean"] == pytest.approx(0.0775)
    assert s["divergence_ci"][0] <= 6.5 <= s["divergence_ci"][1] <= 8
    assert s["kld_mean_chat"] == pytest.approx(0.15) and s["exact_match_text"] == 1.0


def test_default_prompts_load():
    name, prompts = load_prompts("default")
    assert len(prompts) >= 15 and {p.kind for p in prompts} == {"text", "chat"}


@pytest.mark.parametrize("content, match", [
    ("", "no prompts"),
    ('{"text": "x"}\n', "expected"),
    ('{"prompt": "a", "messages": []}\n', "expected"),
    ('{"messages": [{"role": "user"}]}\n', "role"),
])
def test_bad_prompt_files(tmp_path, content, match):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(QuantscopeError, match=match):
        load_prompts(str(f))


def _prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Hello there"}\n{"prompt": "def f(x):"}\n{"prompt": "The cat sat on"}\n')
    return f


def test_compare_generation_end_to_end_and_resume(tiny_model_dir, tmp_path, capsys, monkeypatch):
    d, text = tiny_model_dir
    f = _prompts(tmp_path)
    out = tmp_path / "run"
    argv = ["compare", "--model", str(d), "--text", str(text), "--formats", "fp32,int4-g64,int2-g32", "--ctx", "64",
            "--windows", "2", "--no-speed", "--no-isolate", "--gen-prompts", str(f), "--gen-tokens", "8",
            "--out", str(out), "--json", str(tmp_path / "r.json")]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "generation agreement: 3 prompts, 8 greedy tokens" in stdout
    recs = json.loads((tmp_path / "r.json").read_text())
    base = recs[0]
    assert base["baseline"] and base["gen_agreement"]["exact_match"] == 1.0
    assert all(len(c) == 8 for c in base["generation"]["continuations"])
    assert recs[1]["gen_agreement"]["kld_mean"] > 0
    # resumed: the stored baseline continuations are reused, not generated again
    from quantscope.harness import agreement

    calls = []
    real = agreement.greedy_continuation
    monkeypatch.setattr(agreement, "greedy_continuation", lambda m, p, n: calls.append(1) or real(m, p, n))
    argv[argv.index("fp32,int4-g64,int2-g32")] = "fp32,int4-g64,int2-g32,int8"
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    recs2 = json.loads((tmp_path / "r.json").read_text())
    assert recs2[0]["reused"] and recs2[0]["generation"]["continuations"] == base["generation"]["continuations"]
    assert len(calls) == 3  # the new format's three prompts only
    code, stdout, err = run_cli(capsys, "show", str(out))
    assert code == 0 and "generation agreement" in stdout


def test_generate_cli(tiny_model_dir, tmp_path, capsys):
    d, _ = tiny_model_dir
    code, out, err = run_cli(capsys, "generate", "int8", "--model", str(d), "--prompt", "Hello", "--max-new-tokens",
                             "6", "--json", str(tmp_path / "g.json"))
    assert code == 0, err
    turn = json.loads((tmp_path / "g.json").read_text())["turns"][0]
    assert 1 <= len(turn["tokens"]) <= 6
    code, out, err = run_cli(capsys, "generate", "fp32", "--model", str(d), "--prompt", "Hello", "--compare",
                             "--max-new-tokens", "6", "--json", "-")
    assert code == 0, err
    turn = json.loads(out)["turns"][0]
    assert turn["exact"] and turn["divergence"] == 6 and turn["kld"] == 0.0
    code, out, err = run_cli(capsys, "generate", "fp32", "--model", str(d), "--prompt", "Hi", "--temperature", "0.8",
                             "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "5", "--json", "-")
    a = json.loads(out)["turns"][0]["tokens"]
    code, out, err = run_cli(capsys, "generate", "fp32", "--model", str(d), "--prompt", "Hi", "--temperature", "0.8",
                             "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "5", "--json", "-")
    assert json.loads(out)["turns"][0]["tokens"] == a  # the seed repeats a sampled generation


@pytest.mark.parametrize("extra, match", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--chat"], "chat template"),
    (["--prompt", "x" * 300], "longer than the model's context"),
])
def test_generate_bad_input(tiny_model_dir, capsys, extra, match):
    d, _ = tiny_model_dir
    argv = ["generate", "fp32", "--model", str(d), *extra]
    if "--prompt" not in extra:
        argv += ["--prompt", "Hello"]
    _bad(capsys, argv, match)


def test_generate_unknown_format(tiny_model_dir, capsys):
    d, _ = tiny_model_dir
    _bad(capsys, ["generate", "int4-gx", "--model", str(d), "--prompt", "Hi"], "")


@pytest.mark.parametrize("extra, match", [
    (["--gen-tokens", "0"], "--gen-tokens"),
    (["--gen-tokens", "-3"], "--gen-tokens"),
    (["--gen-prompts", "EMPTY"], "no prompts"),
    (["--gen-prompts", "LONG"], "longer than the model's context"),
    (["--gen-prompts", "CHAT"], "chat template"),
])
def test_compare_generation_bad_input(tiny_model_dir, tmp_path, capsys, extra, match):
    d, text = tiny_model_dir
    files = {"EMPTY": "\n", "LONG": json.dumps({"prompt": "y" * 300}) + "\n",
             "CHAT": json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"}
    extra = list(extra)
    if extra[1] in files:
        (tmp_path / "p.jsonl").write_text(files[extra[1]])
        extra[1] = str(tmp_path / "p.jsonl")
    else:
        extra += ["--gen-prompts", "default"]
    _bad(capsys, ["compare", "--model", str(d), "--text", str(text), "--formats", "fp32,int8",
                                   "--ctx", "64", "--windows", "2", "--no-store", "--no-speed", *extra], match)
