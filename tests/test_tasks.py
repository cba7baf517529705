"""Tests for quantscope.evaluate.tasks (loaders, lm-eval-style scoring, summaries) and the lm-eval adapter.

Models are tiny Llamas built from a config over a 257-token byte-level tokenizer; the real eval
files in ../shared/data are used when present (skipped otherwise).
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quantscope.errors import QuantscopeError
from quantscope.evaluate import tasks
from quantscope.evaluate.tasks import Item, Task, TaskScores, load_task, score_task, summarize

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not present")
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval not installed (pip install 'quantscope[lmeval]')")


# ---------------------------------------------------------------------------------------------
# Tiny models and a byte-level tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import byte_tokenizer

    return byte_tokenizer()


def _llama(seed=0, positions=512):
    """conftest's tiny Llama with an untied head and 260 tokens (the tokenizer's 257 fit)."""
    from conftest import make_tiny_model

    return make_tiny_model("llama", seed, tied=False, vocab=260, max_position_embeddings=positions)


@pytest.fixture(scope="module")
def tiny_model():
    model = _llama()
    with torch.no_grad():  # sharper random logits than the default init, so choices differ
        model.lm_head.weight.normal_(0, 0.5)
    return model.eval()


def rigged_model(tokenizer, favourite="Z", strength=16.0):
    """A real LlamaForCausalLM whose next-token distribution is fixed: ``favourite`` gets logit
    ``strength``, every other token 0, whatever the context (attention and MLP outputs are
    zeroed, every embedding is the same vector)."""
    model = _llama(seed=None)  # every weight that reaches the output is set below
    cfg = model.config
    (fav,) = tokenizer.encode(favourite)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[fav].fill_(strength / cfg.hidden_size)
    return model.eval()


def direct_loglik(model, tokenizer, context, continuation):
    """One unbatched, unpadded forward over encode(context + continuation)."""
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0]
    lp = torch.log_softmax(logits.double(), dim=-1)
    return sum(float(lp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))


# ---------------------------------------------------------------------------------------------
# Loaders


def test_arc_loader_and_prompt():
    task = load_task("arc-easy", FIXTURES / "arc_small.jsonl")
    assert task.category == "reasoning" and task.kind == tasks.MULTIPLE_CHOICE
    assert [it.gold for it in task.items] == [1, 0, 1]  # "B", "1" (numeric labels), "B"
    first = task.items[0]
    assert first.context == "Question: Which gas do plants take in from the air?\nAnswer:"
    assert first.continuations == (" oxygen", " carbon dioxide", " helium", " neon")
    assert len(task.items[2].choices) == 5


def test_hellaswag_preprocessing_matches_lm_eval_rules():
    task = load_task("hellaswag", FIXTURES / "hellaswag_small.jsonl")
    a, b = task.items
    assert a.context == "Pole vault: A man runs with a pole. He"  # ctx_b capitalised
    assert a.gold == 1 and a.choices[1] == "jumps over the bar."
    # WikiHow artifacts: " [title]" -> ". ", other [tags] removed, double spaces collapsed
    # ("[step] pour".capitalize() leaves "pour" lower-case, exactly as in lm-eval)
    assert b.context == "Home and Garden: How to water a plant. Fill a can. pour"
    assert b.choices[0] == "the water slowly onto the soil."
    assert b.gold == 0  # label given as the string "0"


def test_piqa_mmlu_lambada_jsonl_loaders():
    piqa = load_task("piqa", FIXTURES / "piqa" / "valid.jsonl")
    assert [it.gold for it in piqa.items] == [0, 1, 0]
    assert piqa.items[1].context == "Question: Dry wet hands\nAnswer:"
    assert load_task("piqa", FIXTURES / "piqa").items == piqa.items  # the directory works too

    lam = load_task("lambada", FIXTURES / "lambada_small.jsonl")
    assert lam.kind == tasks.CLOZE and lam.category == "language-modelling"
    assert lam.items[1].context == "The cat sat on the"
    assert lam.items[1].continuations == (" mat",)

    user = load_task("jsonl", FIXTURES / "known_answer.jsonl", category="reasoning")
    assert [it.gold for it in user.items] == [2, 0, 1]  # index, choice text, index
    assert user.category == "reasoning"


def test_mmlu_zero_and_few_shot_prompts():
    zero = load_task("mmlu", FIXTURES / "mmlu" / "test")
    assert [it.gold for it in zero.items] == [1, 3, 1]
    header = "The following are multiple choice questions (with answers) about tiny subject.\n\n"
    assert zero.items[0].context == header + "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    assert zero.items[0].continuations == (" A", " B", " C", " D")
    assert zero.items[1].context.startswith(header + 'A question with a "quoted" word\nover two lines?\nA. yes')
    assert load_task("mmlu", FIXTURES / "mmlu").items == zero.items  # parent directory works too

    two = load_task("mmlu", FIXTURES / "mmlu", shots=2)
    shots = "What is 1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\nWhat is 3+3?\nA. 5\nB. 7\nC. 6\nD. 8\nAnswer: C\n\n"
    assert two.items[0].context == header + shots + "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    with pytest.raises(QuantscopeError, match="fewer than --shots 3"):
        load_task("mmlu", FIXTURES / "mmlu", shots=3)


def test_limit_and_seeded_sample():
    full = load_task("arc-easy", FIXTURES / "arc_small.jsonl")
    assert [it.id for it in load_task("arc-easy", FIXTURES / "arc_small.jsonl", limit=2).items] == ["Q1", "Q2"]
    s1 = load_task("arc-easy", FIXTURES / "arc_small.jsonl", limit=2, sample_seed=7).items
    s2 = load_task("arc-easy", FIXTURES / "arc_small.jsonl", limit=2, sample_seed=7).items
    assert s1 == s2 and len(s1) == 2 and set(s1) <= set(full.items)
    assert len(load_task("arc-easy", FIXTURES / "arc_small.jsonl", limit=99).items) == 3


def test_unknown_task_suggests_a_name():
    with pytest.raises(QuantscopeError, match="did you mean 'hellaswag'"):
        load_task("helaswag", FIXTURES / "hellaswag_small.jsonl")


def _arc_line(**over):
    rec = {"id": "x", "question": {"stem": "Q?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]}, "answerKey": "A"}
    rec.update(over)
    return json.dumps(rec)


GOOD_HS = {"activity_label": "A", "ctx_a": "b", "ctx_b": "c", "endings": ["x", "y", "z", "w"], "label": 1}


@pytest.mark.parametrize(
    "name, lines, message",
    [
        ("arc-easy", [_arc_line(), _arc_line(answerKey="Z")], r":2: answerKey 'Z' is not one of the labels"),
        ("arc-easy", [_arc_line(), '{"id": "y", "answerKey": "A"}'], r":2: missing field 'question'"),
        ("arc-easy", [_arc_line(), _arc_line(), "{not json"], r":3: invalid JSON"),
        ("arc-easy", [], r": no items \(empty file\)"),
        ("hellaswag", [json.dumps({**GOOD_HS, "label": 4})], r":1: label 4 out of range for 4 choices"),
        ("hellaswag", [json.dumps(GOOD_HS), json.dumps({k: v for k, v in GOOD_HS.items() if k != "endings"})], r":2: missing field 'endings'"),
        ("lambada", ['{"text": "one two"}', '{"txt": "a b"}'], r":2: missing field 'text'"),
        ("jsonl", ['{"question": "q", "choices": ["a", "b"], "answer": 2}'], r":1: label 2 out of range for 2 choices"),
        ("jsonl", ['{"question": "q", "choices": ["a", "b"], "answer": "c"}'], r":1: answer 'c' is not one of the choices"),
        ("jsonl", ['{"question": "q", "choices": ["a", ""], "answer": 0}'], r":1: choices holds an empty"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, name, lines, message):
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(QuantscopeError, match=message) as info:
        load_task(name, f)
    text = str(info.value)
    assert str(f) in text and "\n" not in text


def test_malformed_mmlu_and_piqa(tmp_path):
    (tmp_path / "test").mkdir()
    bad = tmp_path / "test" / "s_test.csv"
    bad.write_text("What?,a,b,c,d,A\nWhy?,a,b,c,d,E\n")
    with pytest.raises(QuantscopeError, match=rf"{bad}:2: answer 'E' is not one of A, B, C, D"):
        load_task("mmlu", tmp_path)
    bad.write_text("What?,a,b,c,d,A\nWhy?,a,b,c,A\n")
    with pytest.raises(QuantscopeError, match=rf"{bad}:2: expected 6 columns"):
        load_task("mmlu", tmp_path)
    with pytest.raises(QuantscopeError, match="no such file"):
        load_task("mmlu", tmp_path, shots=1)  # no dev/ directory

    (tmp_path / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n' * 2)
    (tmp_path / "valid-labels.lst").write_text("0\n")
    with pytest.raises(QuantscopeError, match="1 labels for 2 questions"):
        load_task("piqa", tmp_path / "valid.jsonl")
    (tmp_path / "valid-labels.lst").write_text("0\n2\n")
    with pytest.raises(QuantscopeError, match=r"valid-labels.lst:2: label '2' out of range"):
        load_task("piqa", tmp_path / "valid.jsonl")


@needs_data
def test_real_files_parse_with_documented_row_counts():
    counts = {
        ("arc-easy", "arc/ARC-Easy-Test.jsonl"): 2376,
        ("arc-challenge", "arc/ARC-Challenge-Test.jsonl"): 1172,
        ("piqa", "piqa/valid.jsonl"): 1838,
        ("mmlu", "mmlu"): 1577,
        ("hellaswag", "hellaswag/hellaswag_val_sample1000.jsonl"): 1000,
        ("lambada", "lambada/lambada_test.jsonl"): 5153,
    }
    for (name, rel), n in counts.items():
        assert len(load_task(name, DATA / rel).items) == n, name
    arc = load_task("arc-easy", DATA / "arc/ARC-Easy-Test.jsonl", limit=1).items[0]
    assert arc.context == "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    assert arc.gold == 0
    five = load_task("mmlu", DATA / "mmlu", shots=5)
    assert five.items[0].context.count("\nAnswer: ") == 5  # five solved dev examples, then the question
    assert len({it.id for it in five.items}) == 1577


@needs_data
@needs_lm_eval
def test_hellaswag_matches_lm_eval_process_docs_on_real_file():
    from lm_eval.tasks.hellaswag import utils

    path = DATA / "hellaswag/hellaswag_val_sample1000.jsonl"
    ours = load_task("hellaswag", path).items
    with open(path) as f:
        docs = [json.loads(line) for line in f]
    for item, doc in zip(ours, docs):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        assert item.context == utils.preprocess(doc["activity_label"] + ": " + ctx)
        assert list(item.choices) == [utils.preprocess(e) for e in doc["endings"]]


# ---------------------------------------------------------------------------------------------
# Scoring


def test_encode_pair_moves_trailing_space_and_splits_whole_encoding(tokenizer):
    ctx, cont = tasks.encode_pair(tokenizer, "Answer: ", "yes")
    assert ctx == tokenizer.encode("Answer:")
    assert cont == tokenizer.encode("Answer: yes")[len(ctx) :]
    ctx, cont = tasks.encode_pair(tokenizer, "", "hello")  # empty context -> EOS as prefix
    assert ctx == [tokenizer.eos_token_id] and cont == tokenizer.encode("hello")


@pytest.fixture(scope="module")
def direct_reference(tiny_model, tokenizer):
    """ARC items, and 1-shot MMLU items whose one-letter answers share a forward row."""
    out = []
    for t in (load_task("arc-easy", FIXTURES / "arc_small.jsonl"), load_task("mmlu", FIXTURES / "mmlu", shots=1)):
        expected = [[direct_loglik(tiny_model, tokenizer, it.context, c) for c in it.continuations] for it in t.items]
        out.append((t, expected))
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_scores_equal_direct_log_likelihoods(tiny_model, tokenizer, direct_reference, batch_size):
    for t, expected_all in direct_reference:
        scores = score_task(tiny_model, tokenizer, t, batch_size=batch_size)
        for item, lls, ok, ok_norm, expected in zip(t.items, scores.loglik, scores.correct, scores.correct_norm, expected_all):
            # batched and padded vs one unpadded forward: float32 sums in other orders, so to 1e-4;
            # the argmaxes cannot flip: the fixtures' top two choices are >= 3 nats apart (>= 0.48 per char)
            np.testing.assert_allclose(lls, expected, rtol=1e-4, atol=1e-4)
            assert ok == int(np.argmax(expected) == item.gold)
            lens = np.array([len(c) for c in item.choices], dtype=float)
            assert ok_norm == int(np.argmax(np.array(expected) / lens) == item.gold)


def test_cloze_scores_target_nll_and_greedy_match(tiny_model, tokenizer):
    task = load_task("lambada", FIXTURES / "lambada_small.jsonl")
    scores = score_task(tiny_model, tokenizer, task, batch_size=2)
    for item, nll in zip(task.items, scores.target_nll):
        assert nll == pytest.approx(-direct_loglik(tiny_model, tokenizer, item.context, item.continuations[0]), abs=1e-4)
    assert scores.correct_norm is None
    assert list(scores.target_tokens) == [len(tokenizer.encode(" " + it.choices[0])) for it in task.items]
    ppl = tasks.cloze_perplexity(scores)
    assert ppl["perplexity"] == pytest.approx(np.exp(scores.target_nll.mean()))
    # a model rigged to always say "Z": "ZZZ" is its greedy output, " ZZZ" is not (the space)
    rig = rigged_model(tokenizer)
    items = [Item("a", "x y", ("ZZZ",), 0, delimiter=""), Item("b", "x y", ("ZZZ",), 0, delimiter=" ")]
    zz = Task("lambada", "language-modelling", items, kind=tasks.CLOZE)
    assert score_task(rig, tokenizer, zz).correct.tolist() == [1, 0]


def test_known_answer_fixture_gives_accuracy_one(tokenizer):
    rig = rigged_model(tokenizer)
    task = load_task("jsonl", FIXTURES / "known_answer.jsonl")
    scores = score_task(rig, tokenizer, task, batch_size=2)
    assert scores.correct.tolist() == [1, 1, 1]
    assert scores.correct_norm.tolist() == [1, 1, 1]
    summary = summarize(scores)
    assert summary["acc"] == 1.0 and summary["acc_norm"] == 1.0
    assert summary["acc_ci"][1] == 1.0 and summary["acc_ci"][0] < 1.0


def test_acc_norm_divides_by_characters(tokenizer):
    # with a constant "Z" favourite every choice pays the same price for its leading space, so raw
    # log-likelihood prefers the *shortest* run of Zs, per-character normalisation the *longest*
    rig = rigged_model(tokenizer)
    item_acc = Item("short", "Q:", ("ZZ", "ZZZZZZZZ", "cat"), gold=0)
    item_norm = Item("long", "Q:", ("ZZ", "ZZZZZZZZ", "cat"), gold=1)
    scores = score_task(rig, tokenizer, Task("jsonl", "knowledge", [item_acc, item_norm]))
    assert scores.correct.tolist() == [1, 0]
    assert scores.correct_norm.tolist() == [0, 1]


def test_long_inputs_are_left_truncated(tokenizer):
    model = _llama(seed=1, positions=16)
    item = Item("long", "word " * 20 + "end:", ("ab", "cd"), gold=0)
    scores = score_task(model, tokenizer, Task("jsonl", "knowledge", [item]))
    for c, ll in zip(item.continuations, scores.loglik[0]):
        full = tokenizer.encode(item.context + c)[-17:]
        n = len(tokenizer.encode(c))
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([full[:-1]])).logits[0].double(), -1)
        assert ll == pytest.approx(sum(float(lp[i - 1, full[i]]) for i in range(len(full) - n, len(full))), abs=1e-4)


def test_progress_is_reported(tiny_model, tokenizer):
    calls = []
    score_task(tiny_model, tokenizer, load_task("arc-easy", FIXTURES / "arc_small.jsonl"), batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1] == 12 and len(calls) == 3


# ---------------------------------------------------------------------------------------------
# Summaries


def _scores(correct, norm=None, ids=None):
    correct = np.asarray(correct, dtype=np.int8)
    ids = ids or [str(i) for i in range(correct.size)]
    return TaskScores("arc-easy", tasks.MULTIPLE_CHOICE, ids, [np.zeros(2)] * correct.size, correct, np.asarray(norm if norm is not None else correct, dtype=np.int8))


def test_summarize_keys_and_paired_fields():
    keys = {"n", "acc", "acc_ci", "acc_norm", "acc_norm_ci", "delta", "delta_ci", "mcnemar_p", "significant", "flips"}
    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.7).astype(int)
    cand = base.copy()
    cand[np.flatnonzero(base)[:40]] = 0  # 40 right -> wrong
    cand[np.flatnonzero(base == 0)[:5]] = 1  # 5 wrong -> right
    alone = summarize(_scores(cand))
    assert set(alone) == keys and alone["delta"] is None and alone["significant"] is None
    s = summarize(_scores(cand), _scores(base))
    assert set(s) == keys and s["n"] == 400
    assert s["delta"] == pytest.approx(-35 / 400)
    assert s["mcnemar_p"] == pytest.approx(tasks.stats.mcnemar_exact_p(40, 5))
    assert (s["flips"]["right_to_wrong"], s["flips"]["wrong_to_right"]) == (40, 5)  # the discordant pairs
    assert s["delta_ci"][1] < 0 and s["significant"] is True
    json.dumps(s)  # JSON-able as it stands
    same = summarize(_scores(base), _scores(base))
    assert same["delta"] == 0.0 and same["delta_ci"] == [0.0, 0.0] and same["mcnemar_p"] == 1.0 and same["significant"] is False
    with pytest.raises(QuantscopeError, match="not the same questions"):
        summarize(_scores(base[:10]), _scores(base[:10], ids=[f"q{i}" for i in range(10)]))


def test_task_scores_round_trip_through_json(tiny_model, tokenizer):
    scores = score_task(tiny_model, tokenizer, load_task("lambada", FIXTURES / "lambada_small.jsonl"))
    back = TaskScores.from_dict(json.loads(json.dumps(scores.to_dict())))
    assert back.item_ids == scores.item_ids
    np.testing.assert_array_equal(back.correct, scores.correct)  # integers: exact
    np.testing.assert_allclose(back.target_nll, scores.target_nll)
    assert tasks.cloze_perplexity(back, scores)["perplexity_delta"] == 0.0


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness as an independent reference, and the adapter


def _local_yaml(tmp_path):
    (tmp_path / "qs_known.yaml").write_text(
        "task: qs_known\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {FIXTURES / 'known_answer.jsonl'}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{choices.index(answer) if answer is string else answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tmp_path


@needs_lm_eval
def test_loglikelihoods_equal_lm_eval_hflm(tiny_model, tokenizer):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=tiny_model, tokenizer=tokenizer, batch_size=4)
    task = load_task("arc-easy", FIXTURES / "arc_small.jsonl")
    reqs = [
        Instance("loglikelihood", doc={}, arguments=(it.context, c), idx=j)
        for it in task.items
        for j, c in enumerate(it.continuations)
    ]
    theirs = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    ours = np.concatenate(score_task(tiny_model, tokenizer, task).loglik)
    # lm-eval batches and pads its own way: float32 sums in other orders, equal to 1e-4, not bitwise
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@needs_lm_eval
def test_lm_eval_adapter_runs_a_local_task_offline(tmp_path, monkeypatch, tokenizer):
    from quantscope.evaluate.lmeval_adapter import run_lm_eval, to_task_scores

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rig = rigged_model(tokenizer)
    state = torch.random.get_rng_state()
    out = run_lm_eval(rig, tokenizer, ["qs_known"], include_path=str(_local_yaml(tmp_path)), include_defaults=False, batch_size=4)
    assert torch.equal(state, torch.random.get_rng_state())  # global seeds left alone (bytes: exact)
    entry = out["tasks"]["qs_known"]
    assert entry["n"] == 3 and entry["acc"] == 1.0 and entry["acc_norm"] == 1.0
    assert entry["per_item"]["acc"] == [1.0, 1.0, 1.0]
    theirs = to_task_scores(out, "qs_known")
    ours = score_task(rig, tokenizer, load_task("jsonl", FIXTURES / "known_answer.jsonl"))
    np.testing.assert_array_equal(theirs.correct, ours.correct)  # 0/1 on a rigged model's wide margins
    assert summarize(theirs, theirs)["delta"] == 0.0  # lm-eval runs pair with each other
    with pytest.raises(QuantscopeError, match="lm-eval:.*qs_nope"):
        run_lm_eval(rig, tokenizer, ["qs_nope"], include_path=str(tmp_path), include_defaults=False)


def test_lm_eval_adapter_without_lm_eval_gives_install_hint(monkeypatch, tokenizer):
    import builtins

    from quantscope.evaluate import lmeval_adapter

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'", name="lm_eval")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(QuantscopeError, match=r"pip install 'quantscope\[lmeval\]'"):
        lmeval_adapter.run_lm_eval(torch.nn.Linear(1, 1), tokenizer, ["arc_easy"])


def test_category_deltas_pool_the_questions_of_a_category():
    base_a, base_b = _scores([1, 1, 0, 0]), _scores([1, 0, 1, 0, 1, 1])
    worse_a, same_b = _scores([0, 0, 0, 0]), _scores([1, 0, 1, 0, 1, 1])
    cats = {"a": "reasoning", "b": "reasoning", "c": "knowledge"}
    out = tasks.category_deltas({"a": (worse_a, base_a), "b": (same_b, base_b), "c": (base_a, base_a)}, cats)
    r = out["reasoning"]
    assert r["tasks"] == ["a", "b"] and r["n"] == 10
    assert r["delta"] == pytest.approx(-2 / 10)  # two questions lost out of ten pooled
    assert r["delta_ci"][0] <= r["delta"] <= r["delta_ci"][1]
    assert r["mcnemar_p"] == pytest.approx(0.5)  # 2 discordant pairs, both one way: exact p = 2 x 0.25
    k = out["knowledge"]
    assert k["delta"] == 0.0 and k["delta_ci"] == [0.0, 0.0] and k["significant"] is False
