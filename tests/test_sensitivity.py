"""Layer sensitivity: ranking, units (tied embedding once), no lasting change to the model, cache."""

import pytest
import torch

from conftest import tiny_llama, tiny_qwen
from quantscope.errors import QuantscopeError
from quantscope.evaluate.perplexity import score_windows
from quantscope.formats.spec import parse_format
from quantscope.modules.swap import apply_plan
from quantscope.formats.registry import storage_bytes
from quantscope.methods.sensitivity import (SensitivityCache, block_names, first_block, layer_sensitivity,
                                            measure_sensitivity, sensitivity_units)

INT4 = parse_format("int4-g128")


def windows(n=2, ctx=32, vocab=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, ctx), generator=g)


def test_a_layer_scaled_up_tenfold_ranks_first():
    # The last block's down_proj writes straight into the residual stream the head reads: scaled up
    # 10x, its rounding error (relative to its weights, the same) is 10x larger in absolute terms.
    model = tiny_llama(layers=2)
    w = windows()
    target = "model.layers.1.mlp.down_proj"
    before = layer_sensitivity(model, w, INT4)
    rank_before = [r["name"] for r in before].index(target)
    assert rank_before >= 3  # not among the sensitive layers of the untouched model
    with torch.no_grad():
        model.get_submodule(target).weight.mul_(10.0)
    after = layer_sensitivity(model, w, INT4)
    assert after[0]["name"] == target
    assert after[0]["kld"] > 10 * before[rank_before]["kld"]
    assert [r["kld"] for r in after] == sorted((r["kld"] for r in after), reverse=True)


def test_unit_kld_equals_the_harness_kld_of_that_unit_alone():
    # an independent path: quantize the unit with apply_plan on a copy and score with score_windows
    import copy

    model = tiny_llama(layers=2)
    w = windows()
    rows = {r["name"]: r for r in layer_sensitivity(model, w, INT4, unit="block")}
    q = copy.deepcopy(model)
    apply_plan(q, {n: INT4 for n in rows["model.layers.1"]["modules"]})
    ref = score_windows(q, w, reference=model).summary()
    assert rows["model.layers.1"]["kld"] == pytest.approx(ref["kld_mean"], rel=1e-4)
    assert rows["model.layers.1"]["kld_stderr"] == pytest.approx(ref["kld_stderr"], rel=1e-3)


def test_units_blocks_and_the_tied_embedding_counted_once():
    model = tiny_llama(layers=3, tied=True)
    blocks = sensitivity_units(model, "block")
    assert [u.name for u in blocks] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert all(len(u.modules) == 7 for u in blocks)
    layers = sensitivity_units(model, "layer", include_embeddings=True)
    emb = [u for u in layers if "model.embed_tokens" in u.modules]
    assert len(emb) == 1 and set(emb[0].modules) == {"model.embed_tokens", "lm_head"}
    rows = layer_sensitivity(model, windows(1), INT4, include_embeddings=True)
    row = next(r for r in rows if r["name"] == "model.embed_tokens")
    assert row["params"] == 256 * 64  # the shared table, once
    assert row["bytes"] == storage_bytes(INT4, 256, 64)
    untied = tiny_llama(layers=1, tied=False)
    names = [u.name for u in sensitivity_units(untied, "layer", include_embeddings=True)]
    assert "model.embed_tokens" in names and "lm_head" in names


def test_the_model_is_unchanged_after_a_scan():
    model = tiny_llama(layers=2)
    w = windows()
    types = {n: type(m) for n, m in model.named_modules()}
    with torch.inference_mode():
        out = model(input_ids=w[:1]).logits.clone()
    layer_sensitivity(model, w, INT4, include_embeddings=True)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    with torch.inference_mode():  # exact: the same forward, same weights, same thread count, one process
        assert torch.equal(model(input_ids=w[:1]).logits, out)


def test_cache_reuses_a_scan_and_keys_on_format_and_windows(tmp_path):
    model = tiny_llama(layers=1)
    w = windows()
    units = sensitivity_units(model)
    cache = SensitivityCache(tmp_path, "tiny")
    calls = []
    first = measure_sensitivity(model, w, [INT4], units, cache=cache, progress=lambda d, t: calls.append(d))
    assert calls
    calls.clear()
    again = measure_sensitivity(model, w, [INT4], units, cache=cache, progress=lambda d, t: calls.append(d))
    assert again == first and not calls  # nothing measured
    measure_sensitivity(model, windows(seed=2), [INT4], units, cache=cache, progress=lambda d, t: calls.append(d))
    assert calls  # other windows: measured
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_calibrated_and_unknown_inputs_are_refused():
    model = tiny_llama(layers=1)
    with pytest.raises(QuantscopeError, match="round-to-nearest"):
        layer_sensitivity(model, windows(), parse_format("gptq-int4-g128"))
    with pytest.raises(QuantscopeError, match="--unit"):
        layer_sensitivity(model, windows(), INT4, unit="row")
    with pytest.raises(QuantscopeError, match="windows"):
        layer_sensitivity(model, torch.zeros(4, dtype=torch.long), INT4)


@pytest.mark.parametrize("build", [lambda: tiny_llama(layers=3, tied=False), lambda: tiny_qwen()])
def test_replaying_the_blocks_before_a_unit_gives_the_same_klds(build):
    model = build()
    w = windows(ctx=24)
    units = sensitivity_units(model, "layer", include_embeddings=True)
    fmts = [INT4, parse_format("int3-g128")]
    fast = measure_sensitivity(model, w, fmts, units)
    full = measure_sensitivity(model, w, fmts, units, replay=False)
    # exact: replay feeds each probe the block outputs the same forward computes on the same window
    assert fast == full


def test_a_probe_computes_only_the_blocks_from_its_unit_on():
    model = tiny_llama(layers=3, tied=False)
    blocks = block_names(model)
    assert blocks == ["model.layers.0", "model.layers.1", "model.layers.2"]
    units = {u.name: u for u in sensitivity_units(model, "layer", include_embeddings=True)}
    assert first_block(model, units["model.layers.2.mlp.up_proj"], blocks) == 2
    assert first_block(model, units["lm_head"], blocks) == 3
    assert first_block(model, units["model.embed_tokens"], blocks) == 0
    calls = []
    for i, name in enumerate(blocks):
        model.get_submodule(name).register_forward_hook(lambda *_a, i=i: calls.append(i))
    measure_sensitivity(model, windows(n=1), [INT4], [units["model.layers.2.mlp.up_proj"], units["lm_head"]])
    assert calls == [0, 1, 2, 2]  # the reference pass, then block 2 for the up_proj probe, none for lm_head
