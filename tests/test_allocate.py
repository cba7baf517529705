"""Mixed-precision allocator: budget never exceeded, optimal where the grid is exact, sensible choices."""

import itertools
import math
import random

import pytest

from quantscope.errors import QuantscopeError
from quantscope.methods.allocate import LayerCost, allocate


def brute_force(layers, candidates, budget):
    """Least summed KLD over every assignment within budget (None if none fits)."""
    options = [[(f, *layer.options[f]) for f in candidates if f in layer.options] for layer in layers]
    best = None
    for combo in itertools.product(*options):
        nbytes = sum(o[1] for o in combo)
        loss = sum(o[2] for o in combo)
        if nbytes <= budget and (best is None or loss < best[0] - 1e-12):
            best = (loss, nbytes)
    return best


def random_layers(rng, n, fmts, scale):
    layers = []
    for i in range(n):
        params = rng.randint(1, 50) * scale
        opts = {}
        for bits in fmts:
            # bytes grow with bits (plus noise); loss shrinks with bits, scaled by a random sensitivity.
            nbytes = params * bits // 8 + rng.randint(0, scale)
            opts[f"int{bits}"] = (nbytes, rng.random() * 2.0 ** (-bits))
        layers.append(LayerCost(f"layer{i}", params, opts))
    return layers


def test_matches_brute_force_and_never_exceeds_budget_small_exact_grid():
    rng = random.Random(0)
    fmts = [2, 3, 4, 8]
    for _ in range(150):
        layers = random_layers(rng, rng.randint(1, 5), rng.sample(fmts, rng.randint(1, 4)), scale=8)
        cands = [f"int{b}" for b in fmts]
        lo = sum(min(v[0] for v in layer.options.values()) for layer in layers)
        hi = sum(max(v[0] for v in layer.options.values()) for layer in layers)
        budget = rng.randint(lo, hi + 5)
        result = allocate(layers, cands, budget_bytes=budget)
        assert result.total_bytes <= budget
        assert result.grid_bytes == 1  # small spans: the DP is exact
        best = brute_force(layers, cands, budget)
        assert result.predicted_kld == pytest.approx(best[0], rel=1e-9, abs=1e-15)
        # the reported totals are those of the reported choices
        chosen = [layer.options[result.choices[layer.name]] for layer in layers]
        assert result.total_bytes == sum(c[0] for c in chosen)
        assert result.predicted_kld == pytest.approx(sum(c[1] for c in chosen))


def test_coarse_grid_never_exceeds_budget_and_is_within_its_stated_bound():
    rng = random.Random(1)
    cands = ["int2", "int3", "int4", "int8"]
    for _ in range(60):
        layers = random_layers(rng, rng.randint(2, 6), [2, 3, 4, 8], scale=10_000)
        lo = sum(min(v[0] for v in layer.options.values()) for layer in layers)
        hi = sum(max(v[0] for v in layer.options.values()) for layer in layers)
        budget = rng.randint(lo, hi)
        grid = rng.choice([4, 16, 64])
        result = allocate(layers, cands, budget_bytes=budget, grid_cells=grid)
        assert result.total_bytes <= budget
        exact = brute_force(layers, cands, budget)
        assert result.predicted_kld >= exact[0] - 1e-12
        # documented bound: at least as good as the optimum for budget - n_items * (q - 1)
        weaker = brute_force(layers, cands, budget - len(layers) * (result.grid_bytes - 1))
        if weaker is not None:
            assert result.predicted_kld <= weaker[0] + 1e-12


def test_rounding_slack_is_spent_after_the_coarse_grid():
    # One grid cell of 120 bytes: each 60-byte upgrade rounds up to a whole cell, so the grid alone
    # affords one upgrade; the greedy pass spends the 60 bytes left on the second.
    layers = [LayerCost(n, 100, {"int4": (55, k), "int8": (115, k / 100)}) for n, k in (("a", 0.2), ("b", 0.1))]
    result = allocate(layers, ["int4", "int8"], budget_bytes=2 * 115, grid_cells=1)
    assert result.grid_bytes == 120
    assert result.choices == {"a": "int8", "b": "int8"} and result.total_bytes == 230


def test_most_sensitive_layer_gets_the_wider_format():
    # Four equal layers; int8 costs 2x int4. Budget allows exactly one int8 upgrade.
    kld4 = {"a": 0.01, "b": 0.30, "c": 0.02, "d": 0.05}  # "b" is the sensitive one
    layers = [LayerCost(n, 1000, {"int4": (530, k), "int8": (1010, k / 50)}) for n, k in kld4.items()]
    result = allocate(layers, ["int4", "int8"], budget_bytes=3 * 530 + 1010)
    assert result.choices == {"a": "int4", "b": "int8", "c": "int4", "d": "int4"}
    assert result.total_bytes == 3 * 530 + 1010
    # one byte less: nothing can be upgraded
    result = allocate(layers, ["int4", "int8"], budget_bytes=3 * 530 + 1009)
    assert set(result.choices.values()) == {"int4"}


def test_target_bpw_sets_the_budget_from_params():
    layers = [LayerCost(f"l{i}", 1024, {"int4": (544, 0.1 * (i + 1)), "int8": (1040, 0.001)}) for i in range(4)]
    # 6.2 bits: 3174 bytes = 4 x 544 + 998, room for exactly two upgrades of 496 bytes
    result = allocate(layers, ["int4", "int8"], target_bpw=6.2)
    assert result.budget_bytes == math.floor(6.2 * 4096 / 8) == 3174
    assert result.total_bytes <= result.budget_bytes
    assert result.bits_per_weight <= 6.2
    assert result.counts == {"int4": 2, "int8": 2}
    # the two most sensitive layers (l3, l2) are the ones upgraded
    assert result.choices["l3"] == "int8" and result.choices["l2"] == "int8"


def test_infeasible_budget_names_smallest_achievable_size():
    layers = [LayerCost(f"l{i}", 100, {"int2": (30, 1.0), "int4": (55, 0.1)}) for i in range(3)]
    with pytest.raises(QuantscopeError, match=r"smallest achievable size 90 bytes"):
        allocate(layers, ["int2", "int4"], budget_bytes=89)
    assert allocate(layers, ["int2", "int4"], budget_bytes=90).total_bytes == 90


def test_tied_layer_is_one_item_and_counted_once():
    embed = LayerCost("model.embed_tokens", 1000, {"int4": (520, 0.5), "bf16": (2000, 0.0)}, tied=("lm_head",))
    other = LayerCost("model.layers.0.mlp.up_proj", 1000, {"int4": (520, 0.01), "bf16": (2000, 0.0)})
    result = allocate([embed, other], ["int4", "bf16"], budget_bytes=2520)
    assert result.choices["model.embed_tokens"] == result.choices["lm_head"] == "bf16"
    assert result.total_bytes == 2520  # tied bytes counted once
    assert result.params == 2000
    with pytest.raises(QuantscopeError, match="appears twice"):
        allocate([embed, LayerCost("lm_head", 1000, {"int4": (520, 0.5)})], ["int4"], budget_bytes=10_000)


def test_bad_inputs_raise():
    layer = LayerCost("l", 10, {"int4": (6, 0.1)})
    with pytest.raises(QuantscopeError, match="exactly one"):
        allocate([layer], ["int4"])
    with pytest.raises(QuantscopeError, match="none of the candidate formats"):
        allocate([layer], ["int8"], budget_bytes=100)
