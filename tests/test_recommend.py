"""Recommendation policy on fake measure functions: the step it picks, laziness, intervals, budgets."""

import pytest

from quantscope.errors import QuantscopeError
from quantscope.recommend import (
    DEFAULT_LADDER,
    SCENARIOS,
    Ladder,
    Step,
    Target,
    check_quality,
    recipe_ladder,
    recommend,
    scenario_target,
)

SIZES = {
    "bf16": 1000, "int8": 500, "int4-g128": 270, "nf4": 265, "gptq-int4-g128-act": 270, "awq-int4-g128": 270,
    "awq+gptq-int4-g128": 270,
    "mixed-5.0": 320, "mixed-6.0": 380, "mixed-7.0": 440,
}  # fmt: skip
BASE_PPL = 10.0


def rec(fmt, pct_ci, point=None, **extra):
    """A record whose perplexity rose by `point`% (default: CI midpoint) with CI `pct_ci` in % of baseline."""
    lo, hi = (BASE_PPL * p / 100 for p in pct_ci)
    delta = (lo + hi) / 2 if point is None else BASE_PPL * point / 100
    r = {"format": fmt, "weight_bytes": SIZES[fmt], "perplexity": BASE_PPL + delta,
         "perplexity_delta": delta, "perplexity_delta_ci": (lo, hi)}  # fmt: skip
    r.update(extra)
    return r


class FakeMeasure:
    def __init__(self, records):
        self.records = records
        self.calls = []

    def __call__(self, fmt):
        self.calls.append(fmt)
        return self.records[fmt]


GOOD, BAD = (0.1, 0.5), (3.0, 6.0)


def fake(**ci):
    """Every format good unless given; ci maps format (with _ for -) to its % CI."""
    return FakeMeasure({f: rec(f, ci.get(f.replace("-", "_").replace(".", "_").replace("+", "_"), GOOD))
                        for f in SIZES})


def test_stops_as_soon_as_the_smallest_passing_format_is_certain():
    m = fake()
    ladder = recipe_ladder(mixed=("mixed-5.0", "mixed-6.0"))
    d = recommend(Target(max_ppl_increase_pct=2), m, ladder, size_of=SIZES.__getitem__)
    # int8 passes; nf4 (the smallest of its step) passes; nothing left is strictly smaller than nf4
    assert m.calls == ["int8", "nf4"]
    assert d.chosen == "nf4" and d.meets_target
    skipped = {t.format: t.why for t in d.trail if t.verdict == "skipped"}
    assert set(skipped) == {"int4-g128", "gptq-int4-g128-act", "awq-int4-g128", "awq+gptq-int4-g128",
                            "mixed-5.0", "mixed-6.0"}
    assert "not smaller than nf4" in skipped["gptq-int4-g128-act"]


def test_calibrated_step_when_round_to_nearest_fails():
    m = fake(int4_g128=BAD, nf4=BAD)
    d = recommend(Target(max_ppl_increase_pct=2), m, DEFAULT_LADDER, size_of=SIZES.__getitem__)
    assert d.chosen == "gptq-int4-g128-act"
    assert m.calls == ["int8", "nf4", "int4-g128", "gptq-int4-g128-act"]  # awq is the same size: skipped
    verdicts = {t.format: t.verdict for t in d.trail}
    assert verdicts == {"int8": "pass", "int4-g128": "fail", "nf4": "fail",
                        "gptq-int4-g128-act": "pass", "awq-int4-g128": "skipped",
                        "awq+gptq-int4-g128": "skipped"}  # fmt: skip
    # each measured step carries its numbers
    int8 = next(t for t in d.trail if t.format == "int8")
    assert int8.numbers["weight_bytes"] == 500 and int8.numbers["checked_upper"] == pytest.approx(0.5)


def test_mixed_precision_at_the_smallest_budget_that_passes():
    four_bit_bad = dict(int4_g128=BAD, nf4=BAD, gptq_int4_g128_act=BAD, awq_int4_g128=BAD, awq_gptq_int4_g128=BAD, mixed_5_0=BAD)
    m = fake(**four_bit_bad)
    ladder = recipe_ladder(mixed=("mixed-5.0", "mixed-6.0", "mixed-7.0"))
    d = recommend(Target(max_ppl_increase_pct=2), m, ladder, size_of=SIZES.__getitem__)
    assert d.chosen == "mixed-6.0"
    assert "mixed-7.0" not in m.calls
    # nothing in the mixed step passes: int8 (which passed) is the answer
    m = fake(**four_bit_bad, mixed_6_0=BAD, mixed_7_0=BAD)
    assert recommend(Target(max_ppl_increase_pct=2), m, ladder, size_of=SIZES.__getitem__).chosen == "int8"


def test_the_upper_end_of_the_interval_is_what_is_checked():
    # int4-g128: point +1.0% but upper end +2.5% -> fails a 2% target; nf4: point +1.5%, upper +1.9% -> passes
    m = FakeMeasure({"int8": rec("int8", (0.0, 0.4)), "int4-g128": rec("int4-g128", (-0.5, 2.5), point=1.0),
                     "nf4": rec("nf4", (1.1, 1.9), point=1.5)})  # fmt: skip
    ladder = Ladder((Step("8-bit", ("int8",)), Step("4-bit", ("int4-g128", "nf4"))))
    d = recommend(Target(max_ppl_increase_pct=2), m, ladder)  # no size_of: recipe order, both measured
    assert d.chosen == "nf4" and m.calls == ["int8", "int4-g128", "nf4"]
    int4 = next(t for t in d.trail if t.format == "int4-g128")
    assert int4.verdict == "fail" and int4.numbers["checked_upper"] == pytest.approx(2.5)
    # KLD: mean under the limit, mean + 1.96 stderr over it
    r = {"format": "x", "kld_mean": 0.015, "kld_stderr": 0.005}
    assert check_quality(r, Target(max_kld=0.02))[0] is False
    assert check_quality(r, Target(max_kld=0.025))[0] is True
    # accuracy: delta -0.5 points, CI down to -1.5 points -> fails a 1-point limit
    r = {"format": "x", "tasks": {"arc": {"delta": -0.005, "delta_ci": (-0.015, 0.005)}}}
    passed, upper, why = check_quality(r, Target(max_acc_drop_pct=1.0))
    assert not passed and upper == pytest.approx(1.5) and "arc" in why
    assert check_quality(r, Target(max_acc_drop_pct=1.6, task="arc"))[0]
    # baseline perplexity given explicitly takes precedence
    r = {"format": "x", "perplexity_delta_ci": (0.0, 0.3), "baseline_perplexity": 20.0}
    assert check_quality(r, Target(max_ppl_increase_pct=1.6))[1] == pytest.approx(1.5)


def test_int8_failing_falls_back_to_the_widest_format_without_measuring_smaller_ones():
    m = fake(int8=BAD)
    d = recommend(Target(max_ppl_increase_pct=2), m, DEFAULT_LADDER, size_of=SIZES.__getitem__)
    assert d.chosen == "bf16" and d.meets_target
    assert m.calls == ["int8", "bf16"]
    assert "nothing smaller met the target" in d.reason
    # without size_of the fallback is still found by measuring it
    m = fake(int8=BAD)
    assert recommend(Target(max_ppl_increase_pct=2), m).chosen == "bf16"
    assert m.calls == ["int8", "bf16"]


def test_memory_limit_skips_formats_that_cannot_fit_and_falls_back_to_the_widest_that_fits():
    m = fake(int4_g128=BAD, nf4=BAD, gptq_int4_g128_act=BAD, awq_int4_g128=BAD, awq_gptq_int4_g128=BAD)
    d = recommend(Target(max_ppl_increase_pct=2, memory_bytes=300), m, DEFAULT_LADDER, size_of=SIZES.__getitem__)
    assert "int8" not in m.calls and "bf16" not in m.calls
    # nothing that fits meets the target: the widest that fits (270 bytes, earliest in the recipe)
    assert d.chosen == "int4-g128" and not d.meets_target
    assert "misses the target" in d.reason and d.reason.startswith("nothing that fits")


def test_impossible_memory_budget_names_the_closest_format():
    m = fake()
    with pytest.raises(QuantscopeError, match=r"no format fits memory .*closest is nf4 .*265 bytes"):
        recommend(Target(max_ppl_increase_pct=2, memory_bytes=200), m, DEFAULT_LADDER, size_of=SIZES.__getitem__)
    assert m.calls == []  # known without measuring anything
    m = fake()
    with pytest.raises(QuantscopeError, match="closest is nf4"):
        recommend(Target(max_ppl_increase_pct=2, memory_bytes=200), m)


def test_prefer_fastest_measures_every_fitting_candidate_and_picks_the_fastest():
    speeds = {"int8": 30.0, "int4-g128": 50.0, "nf4": 20.0, "gptq-int4-g128-act": 45.0, "awq-int4-g128": 44.0,
              "awq+gptq-int4-g128": 40.0}
    records = {f: rec(f, GOOD, decode_tokens_per_s=s) for f, s in speeds.items()}
    records["int4-g128"] = rec("int4-g128", BAD, decode_tokens_per_s=50.0)  # fastest, but fails
    m = FakeMeasure(records)
    d = recommend(Target(max_ppl_increase_pct=2, prefer="fastest"), m, DEFAULT_LADDER, size_of=SIZES.__getitem__)
    assert d.chosen == "gptq-int4-g128-act"
    assert sorted(m.calls) == sorted(speeds)


def test_a_crashed_format_fails_without_stopping_the_recipe():
    m = fake()
    m.records["int8"] = {"format": "int8", "error": "out of memory", "weight_bytes": None}
    d = recommend(Target(max_ppl_increase_pct=2), m, DEFAULT_LADDER, size_of=SIZES.__getitem__)
    assert d.chosen == "nf4"
    assert "could not be measured: out of memory" in d.trail[0].why


def test_target_validation():
    with pytest.raises(QuantscopeError, match="exactly one quality target"):
        Target()
    with pytest.raises(QuantscopeError, match="exactly one quality target"):
        Target(max_kld=0.1, max_ppl_increase_pct=2)
    with pytest.raises(QuantscopeError, match="prefer"):
        Target(max_kld=0.1, prefer="cheapest")
    with pytest.raises(QuantscopeError, match="non-negative"):
        Target(max_kld=-1)


def test_scenarios_match_the_seed_table_and_can_be_overridden():
    assert set(SCENARIOS) == {"cloud-gpu", "edge", "large-model-limited-hw", "research"}
    budgets = {n: s.target.max_ppl_increase_pct for n, s in SCENARIOS.items()}
    assert budgets == {"cloud-gpu": 1.0, "edge": 3.0, "large-model-limited-hw": 1.5, "research": 1.0}
    assert SCENARIOS["cloud-gpu"].target.prefer == "fastest"
    assert SCENARIOS["research"].ladder.formats() == ["int8", "bf16"]
    with pytest.raises(QuantscopeError, match="needs --memory"):
        scenario_target("large-model-limited-hw")
    target, _ = scenario_target("large-model-limited-hw", memory_bytes=4 * 10**9)
    assert target.memory_bytes == 4 * 10**9 and target.max_ppl_increase_pct == 1.5
    target, _ = scenario_target("edge", task="arc-easy")  # the same budget, on that task's accuracy
    assert target.max_acc_drop_pct == 3.0 and target.max_ppl_increase_pct is None and target.task == "arc-easy"
    target, _ = scenario_target("edge", max_kld=0.05, prefer="fastest")
    assert target.max_kld == 0.05 and target.max_ppl_increase_pct is None and target.prefer == "fastest"
    with pytest.raises(QuantscopeError, match="unknown scenario"):
        scenario_target("laptop")


def test_decision_serialises_its_trail():
    d = recommend(Target(max_ppl_increase_pct=2), fake(), DEFAULT_LADDER, size_of=SIZES.__getitem__)
    out = d.to_dict()
    assert out["chosen"] == "nf4" and out["target"]["max_ppl_increase_pct"] == 2
    assert [t["format"] for t in out["trail"]] == ["int8", "nf4", "int4-g128", "gptq-int4-g128-act", "awq-int4-g128",
                                                  "awq+gptq-int4-g128"]
