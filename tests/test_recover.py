"""LoRA recovery: names, LoftQ, injection and merging checked by hand, training (objectives, resume, NaN),
the recovered-gap statistics, and `recover` / `compare` end to end on a tiny saved model."""

import copy
import json
import re

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, make_tiny_model, run_cli, tiny_llama
from quantscope.errors import QuantscopeError
from quantscope.evaluate.perplexity import score_windows
from quantscope.evaluate.stats import recovered_fraction_ci
from quantscope.formats import parse_format
from quantscope.formats.qtensor import quantize_tensor
from quantscope.methods import lora
from quantscope.methods.lora_train import Checkpoints, batch_indices, train, training_rows
from quantscope.methods.recover_config import RecoverConfig, parse_recovered
from quantscope.modules.qmodules import QuantLinear
from quantscope.quantization import quantize, resolve

pytest.importorskip("peft")


def _peaky(seed=0):
    """A tiny Llama whose next-token distributions are far from uniform, so int2 loses a visible KLD."""
    return make_tiny_model(seed=seed, initializer_range=0.1)


def _tokens(n=20, length=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (length,), generator=g) for _ in range(n)]


def _adapted(fmt="int3-g32", **kw):
    cfg = RecoverConfig(rank=4, **kw)
    m = tiny_llama()
    quantize(m, fmt)
    names = lora.target_layers(m, cfg)
    lora.inject(m, cfg, names)
    return m, cfg, names


# --- names ----------------------------------------------------------------------------------------

def test_names_round_trip_and_defaults():
    s = parse_recovered("int4-g64+lora-merged-kd-loftq3-r8-a16-s20-lr0.0005-len64-b2-seed3-log5-tq_proj.v_proj")
    assert (s.outcome, s.config.objective, s.config.init, s.config.loftq_iters) == ("merged", "distill", "loftq", 3)
    assert (s.config.rank, s.config.alpha, s.config.steps, s.config.lr) == (8, 16.0, 20, 0.0005)
    assert (s.config.seqlen, s.config.batch, s.config.seed, s.config.log_every) == (64, 2, 3, 5)
    assert s.config.targets == ("q_proj", "v_proj")
    assert parse_recovered(s.name) == s  # canonical names read back as themselves
    assert resolve("INT4-G64+lora-r16").name == "int4-g64+lora"  # defaults are not spelled
    assert resolve("int4-g64+lora-lr0.00001").name == "int4-g64+lora-lr0.00001"  # no exponent: '-' splits names
    assert resolve("int4-g64+lora-merged-rtn").name == "int4-g64+lora-merged"  # RTN is an own format's method
    assert resolve("gptq-int4-g64+lora-merged-rtn").spec.outcome == "merged-rtn"
    f = resolve("nf4+lora-kd")
    assert (f.kind, f.needs_calibration, f.spec.base) == ("recovered", True, "nf4")


@pytest.mark.parametrize("name, needle", [
    ("int4-g64+lora-zz", "unknown option '-zz'"),
    ("int4-g64+lora-r0", "--rank must be at least 1"),
    ("int4-g64+lora-lr2", "--lr must be in (0, 1)"),
    ("fp32+lora", "nothing to adapt in fp32"),
    ("hqq-int4-g64+lora", "nothing to adapt in hqq-int4-g64"),
    ("gptq-int4-g64+lora-loftq", "LoftQ alternates round-to-nearest"),
    ("int4-g64+lora+lora", "options after +lora start with '-'"),
    ("int9-g64+lora", "unknown format"),
])
def test_bad_names(name, needle):
    with pytest.raises(QuantscopeError, match=re.escape(needle)):
        resolve(name)


# --- LoftQ, injection, merging ---------------------------------------------------------------------

def test_loftq_starts_nearer_the_float_weight_than_plain_init():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    spec = parse_format("int3-g32")

    def q(x):
        qt = quantize_tensor(x, spec)
        return qt, qt.dequantize()

    plain = (w - q(w)[1]).norm() / w.norm()
    _, a, b, r0, r1 = lora.loftq(w, q, rank=8, scaling=2.0, iters=1)
    assert r0 == pytest.approx(float(plain), rel=1e-5)  # one iteration quantizes W itself
    assert a.shape == (8, 64) and b.shape == (48, 8)
    # the rank-8 SVD of the residual is its best rank-8 approximation (Eckart-Young)
    s = torch.linalg.svdvals(w - q(w)[1])
    assert r1 == pytest.approx(float(s[8:].norm() / w.norm()), rel=1e-4)
    _, _, _, _, r3 = lora.loftq(w, q, rank=8, scaling=2.0, iters=3)
    assert r3 < plain


def test_plain_adapters_leave_the_quantized_model_unchanged_and_merge_matches_them():
    m, cfg, names = _adapted()
    ids = torch.randint(0, 256, (1, 24))
    ref = copy.deepcopy(m)
    with torch.no_grad():
        for layer in lora.lora_layers(ref).values():
            layer.enable_adapters(False)
        before = ref(input_ids=ids).logits
        assert torch.equal(m(input_ids=ids).logits, before)  # B = 0: step 0 is the quantized model
        for layer in lora.lora_layers(m).values():  # a non-zero adapter
            layer.lora_B["default"].weight.normal_(0, 0.05)
        adapted = m(input_ids=ids).logits
        assert not torch.allclose(adapted, before)
    assert set(names) == {n for n, mod in tiny_llama().named_modules() if isinstance(mod, torch.nn.Linear)
                          and ".layers." in n}
    old = lora.merge(m)
    assert set(old) == set(names) and not lora.lora_layers(m)
    with torch.no_grad():
        assert torch.allclose(m(input_ids=ids).logits, adapted, atol=1e-4)  # merged in float: the same model
    lora.requantize_rtn(m, old)
    assert all(isinstance(m.get_submodule(n), QuantLinear) for n in names)
    assert all(m.get_submodule(n).spec.name == "int3-g32" for n in names)


def test_rank_larger_than_a_layer_and_nothing_to_adapt_are_refused():
    m = tiny_llama()
    quantize(m, "int4-g32")
    with pytest.raises(QuantscopeError, match=r"--rank 65 is larger than layer .*needs r <= 64"):
        lora.target_layers(m, RecoverConfig(rank=65))
    with pytest.raises(QuantscopeError, match="nothing to adapt with targets c_attn"):
        lora.target_layers(m, RecoverConfig(targets=("c_attn",)))
    with pytest.raises(QuantscopeError, match="no quantized linear"):
        lora.target_layers(tiny_llama(), RecoverConfig())


# --- training ---------------------------------------------------------------------------------------

def test_training_rows_and_batches():
    rows, held = training_rows(_tokens(4, 40), seqlen=32)  # 160 tokens: 5 rows, 1 held out
    assert rows.shape == (4, 32) and held.shape == (1, 32)
    assert torch.equal(torch.cat([rows.reshape(-1), held.reshape(-1)]), torch.cat(_tokens(4, 40))[:160])
    with pytest.raises(QuantscopeError, match="has 20 tokens, fewer than one training sequence of --seqlen 32"):
        training_rows([torch.arange(20)], 32)
    seen = torch.cat([batch_indices(10, 4, 0, s) for s in range(5)])  # 2 passes over 10 rows
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:20].tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 4, 0, 3), batch_indices(10, 4, 0, 3))


def test_distillation_and_loftq_reduce_the_kld_they_are_measured_by(tmp_path):
    toks, wins = _tokens(), torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(9))
    base = _peaky()
    kld = {}
    for name in ("int2-g32", "int2-g32+lora-kd-s24-len32-b4-r4-lr0.01", "int2-g32+lora-kd-loftq-s24-len32-b4-r4-lr0.01"):
        m = copy.deepcopy(base)
        done = quantize(m, name, calib=toks, work_dir=str(tmp_path))
        kld[name] = score_windows(m, wins, reference=base).summary()["kld_mean"]
        if "+lora" in name:
            log = done.record["recover"]["log"]
            assert log[-1]["heldout_kld"] < log[0]["heldout_kld"]  # held-out rows, never trained on
            assert done.record["recover"]["seconds_per_step"] > 0
    plain, loftq_ = kld["int2-g32+lora-kd-s24-len32-b4-r4-lr0.01"], kld["int2-g32+lora-kd-loftq-s24-len32-b4-r4-lr0.01"]
    assert plain < kld["int2-g32"] and loftq_ < plain


def test_a_killed_training_resumes_to_the_same_adapters(tmp_path):
    rows = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    cfg = RecoverConfig(rank=4, steps=6, batch=2, seqlen=16, log_every=2, lr=0.01)

    def fresh():
        m = tiny_llama()
        quantize(m, "int3-g32")
        lora.inject(m, cfg, lora.target_layers(m, cfg))
        return m

    whole = fresh()
    train(whole, rows, cfg, folder=tmp_path / "a")

    class Killed(Exception):
        pass

    def kill_at_5(done, total):
        if done == 5:
            raise Killed

    m = fresh()
    with pytest.raises(Killed):
        train(m, rows, cfg, folder=tmp_path / "b", progress=kill_at_5)
    assert Checkpoints(tmp_path / "b").latest()[0] == 4  # the newest complete checkpoint only
    again = fresh()
    res = train(again, rows, cfg, folder=tmp_path / "b")
    assert res.resumed_from == 4 and [e["step"] for e in res.log] == [0, 2, 4, 6]
    for k, v in lora.adapter_state(whole).items():
        assert torch.allclose(v, lora.adapter_state(again)[k], atol=1e-6), k


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    rows = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    cfg = RecoverConfig(rank=4, steps=6, batch=2, seqlen=16, log_every=2)
    m = tiny_llama()
    quantize(m, "int3-g32")
    lora.inject(m, cfg, lora.target_layers(m, cfg))

    def poison(done, total):
        if done == 2:
            with torch.no_grad():
                next(iter(lora.lora_layers(m).values())).lora_B["default"].weight.fill_(float("nan"))

    with pytest.raises(QuantscopeError, match=r"training loss is nan at step 3 of 6.*checkpoint \(step 2\) is kept"):
        train(m, rows, cfg, folder=tmp_path, progress=poison)
    assert Checkpoints(tmp_path).latest()[0] == 2


def test_bnb_nf4_qlora_trains_and_merges_into_4bit():
    bnb = pytest.importorskip("bitsandbytes")
    m = tiny_llama()
    done = quantize(m, "bnb-nf4+lora-merged-s2-len32-r4", calib=_tokens(6))
    assert done.record["recover"]["adapted_layers"] == 14
    assert all(np.isfinite(e["loss"]) for e in done.record["recover"]["log"][1:])
    assert isinstance(m.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not lora.lora_layers(m)


# --- statistics ---------------------------------------------------------------------------------------

def test_recovered_fraction_by_hand():
    before = np.array([4.0, 2.0, 3.0, 5.0, 6.0])
    after = np.array([1.0, 1.0, 1.5, 2.0, 2.5])
    frac, lo, hi = recovered_fraction_ci(lambda i: before[i].mean(-1), lambda i: after[i].mean(-1), 5)
    assert frac == pytest.approx(1 - after.mean() / before.mean())
    assert lo <= frac <= hi and 0 < lo and hi < 1
    nan = recovered_fraction_ci(lambda i: before[i].mean(-1) * 0, lambda i: after[i].mean(-1), 5)
    assert all(np.isnan(nan))


# --- end to end ---------------------------------------------------------------------------------------

def test_recover_cli_end_to_end_same_file_disjoint_and_resumed(capsys, tiny_model_dir, tmp_path):
    d, text = tiny_model_dir
    out = tmp_path / "run"
    args = ["recover", "int3-g32", "--model", str(d), "--text", str(text), "--train", str(text), "--ctx", "64",
            "--windows", "5", "--steps", "4", "--seqlen", "32", "--batch", "3", "--log-every", "2", "--rank", "4",
            "--objective", "distill", "--no-speed", "--no-isolate", "--out", str(out), "--json", str(tmp_path / "r.json")]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    recs = json.loads((tmp_path / "r.json").read_text())
    assert [r["format"] for r in recs] == ["fp32", "int3-g32", "int3-g32+lora-kd-r4-s4-len32-b3-log2",
                                           "int3-g32+lora-merged-kd-r4-s4-len32-b3-log2"]
    head = 14 * 32  # (4 steps x 3 + 2 held out) rows of 32: evaluation starts after them
    assert {r["window_start_token"] for r in recs} == {head}
    assert "evaluation windows start after them, disjoint spans of the same text" in stdout
    adapter, merged = recs[2], recs[3]
    assert [e["step"] for e in adapter["recover"]["log"]] == [0, 2, 4]
    # rank 4 x (in + out) fp32 per layer: q, o 64+64, k, v 64+32, gate, up, down 64+128; two blocks
    assert adapter["recover"]["adapter_bytes"] == 2 * 4 * 4 * (2 * 128 + 2 * 96 + 3 * 192)
    assert adapter["weight_bytes"] - recs[1]["weight_bytes"] == adapter["recover"]["adapter_bytes"]
    assert merged["weight_bytes"] == recs[1]["weight_bytes"]  # merged: the format's own storage again
    assert "resumed from its checkpoint at step 4" in " ".join(merged["notes"])  # one training for both rows
    for r in (adapter, merged):
        rv = r["recovered"]
        assert rv["vs"] == "int3-g32" and rv["kld"]["ci"] is not None
        assert rv["kld"]["fraction"] == pytest.approx(1 - r["kld_mean"] / recs[1]["kld_mean"], rel=1e-6)
    assert "KLD recovered" in stdout and "held-out KLD" in stdout
    code, stdout, err = run_cli(capsys, *args)  # the same command again: every row from the run directory
    assert code == 0 and json.loads((tmp_path / "r.json").read_text())[3].get("reused") is True


def test_compare_measures_recovered_formats_like_any_format(tiny_model_dir, tmp_path):
    from quantscope.harness import CompareConfig, compare

    d, text = tiny_model_dir
    cfg = CompareConfig(model=str(d), text=str(text), formats=("int4-g32", "int4-g32+lora-s2-len32-r4"), ctx=64,
                        windows=5, calib_samples=8, calib_seqlen=32, measure_speed=False, isolate=False)
    records, meta = compare(cfg, run_dir=tmp_path / "run")
    rec = records[-1]
    assert rec["format"] == "int4-g32+lora-r4-s2-len32" and "recovered" in rec and "error" not in rec
    assert (tmp_path / "run" / "recover").is_dir()


def test_recover_refusals_are_one_line(capsys, tiny_model_dir, tmp_path):
    d, text = tiny_model_dir
    short = tmp_path / "short.txt"
    short.write_text("tiny text")
    common = ["--model", str(d), "--text", str(text), "--ctx", "64", "--windows", "5", "--no-isolate", "--no-speed",
              "--out", str(tmp_path / "run")]
    for extra, needle in [(["int4-g32", "--rank", "65"], "--rank 65 is larger than layer"),
                          (["int4-g32", "--targets", "c_attn"], "nothing to adapt"),
                          (["int4-g32", "--objective", "sft"], "--objective must be one of lm, distill"),
                          (["int4-g32+lora"], "give the base format"),
                          (["int4-g32", "--outcomes", "kept"], "unknown outcome 'kept'"),
                          (["hqq-int4-g64"], "nothing to adapt in hqq-int4-g64"),
                          (["int4-g32", "--train", str(short), "--seqlen", "32"],
                           "short.txt has 9 tokens, fewer than one training sequence of --seqlen 32")]:
        code, _, err = run_cli(capsys, "recover", *extra, *common)
        assert_one_line_error(code, err, needle)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run" / "recover").glob("*/ckpt-*"))


def test_recovery_statistics_pair_each_row_with_its_format_and_the_baseline():
    from quantscope.harness.pairing import add_paired_statistics

    rng = np.random.default_rng(0)
    n, tok = 8, 100
    base_nll = rng.uniform(200, 300, n)

    def rec(fmt, extra_nll, kld, correct, **kw):
        items = {"task": "t", "kind": "multiple_choice", "item_ids": [str(i) for i in range(len(correct))],
                 "loglik": [[0.0, -1.0]] * len(correct), "correct": correct, "correct_norm": None}
        return {"format": fmt, "window_start_token": 0, "window_nll": list(base_nll + extra_nll),
                "window_tokens": [tok] * n, "window_kld": list(kld * tok), "kld_mean": float(np.mean(kld)),
                "perplexity": float(np.exp((base_nll + extra_nll).sum() / (n * tok))), "task_items": {"t": items}, **kw}

    answers = [1] * 30 + [0] * 10
    base = rec("fp32", np.zeros(n), np.zeros(n), answers, baseline=True)
    before = rec("int3-g64", rng.uniform(20, 30, n), rng.uniform(0.3, 0.4, n), [1] * 20 + [0] * 20)
    after = rec("int3-g64+lora", rng.uniform(5, 10, n), rng.uniform(0.1, 0.2, n), [1] * 26 + [0] * 14,
                recover={"base": "int3-g64", "outcome": "adapter"})
    records = [base, before, after]
    add_paired_statistics(records)
    rv = after["recovered"]
    kb, ka = sum(before["window_kld"]), sum(after["window_kld"])
    assert rv["vs"] == "int3-g64" and rv["kld"]["fraction"] == pytest.approx(1 - ka / kb)
    pb, p0, pa = base["perplexity"], before["perplexity"], after["perplexity"]
    assert rv["perplexity"]["fraction"] == pytest.approx(1 - (pa - pb) / (p0 - pb))
    assert rv["tasks"]["t"]["fraction"] == pytest.approx(1 - (30 - 26) / (30 - 20))  # 6 of 10 answers won back
    for cell in (rv["kld"], rv["perplexity"], rv["tasks"]["t"]):
        lo, hi = cell["ci"]
        assert lo <= cell["fraction"] <= hi
    assert "recovered" not in before and "recovered" not in base
