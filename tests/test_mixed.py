"""Mixed precision: names, the edges preset, measured allocation within budget, and the harness path."""

import copy
import math

import pytest
import torch

from conftest import tiny_llama
from quantscope.harness import CompareConfig, add_paired_statistics, compare
from quantscope.errors import QuantscopeError
from quantscope.formats.spec import UnknownFormatError, parse_format
from quantscope.measure.memory import tensor_bytes, weight_bytes
from quantscope.plan.mixed import mixed_weight_bytes
from quantscope.methods.mixed import (MixedSpec, bpw_of_plan, edges_plan, parse_mixed,
                                      plan_bytes, quantize_mixed)
from conftest import quantized_modules
from quantscope.modules.swap import select_modules
from quantscope.quantization import resolve
from quantscope.formats.registry import storage_bytes


def windows(n=2, ctx=32, seed=1):
    return torch.randint(0, 256, (n, ctx), generator=torch.Generator().manual_seed(seed))


def stored_bytes_of_quantized_layers(model) -> int:
    return tensor_bytes(t for _, m in quantized_modules(model) for t in m.buffers())


# ---------------------------------------------------------------- names

def test_names_parse_to_canonical_specs():
    s = resolve("Mixed-Auto:4.50:int8/int4-g128/int3-g128").spec
    assert isinstance(s, MixedSpec) and s.kind == "auto" and s.needs_calibration
    assert s.name == "mixed-auto:4.5:int3-g128/int4-g128/int8"  # ladder ordered by size
    assert s.target_bpw == 4.5 and s.ladder == ("int3-g128", "int4-g128", "int8")
    assert parse_mixed(s.name) == s
    e = resolve("mixed-edges:int4-g128/int8-sym").spec  # int8-sym is int8's canonical name
    assert e == MixedSpec("mixed-edges:int4-g128/int8", "edges", base="int4-g128", wide="int8")
    assert not e.needs_calibration and parse_mixed(e.name) == e
    assert parse_mixed("mixed-auto:4.2777:int4-g128/int8").name == "mixed-auto:4.2777:int4-g128/int8"
    assert s.to_dict()["family"] == "mixed"


@pytest.mark.parametrize("name, match", [
    ("mixed-edges:int4-g128", "two formats"),
    ("mixed-edges:int4-g128/int9", "unknown format 'int9'"),
    ("mixed-auto:abc:int4-g128/int8", "bits per weight \\(4.5\\) or a size"),
    ("mixed-auto:-1:int4-g128/int8", "positive number"),
    ("mixed-auto:4.5:int4-g128", "at least two"),
    ("mixed-auto:4.5:gptq-int4-g128/int8", "calibrated"),
    ("mixed-middle:int4-g128/int8", "unknown mixed format"),
])
def test_bad_names_are_one_clear_error(name, match):
    with pytest.raises(UnknownFormatError, match=match):
        resolve(name).spec


# ---------------------------------------------------------------- edges

def test_edges_plan_puts_the_wide_format_on_the_first_and_last_block():
    model = tiny_llama(layers=4)
    spec = parse_mixed("mixed-edges:int4-g128/int8")
    plan = edges_plan(model, spec)
    assert set(plan) == set(select_modules(model))
    for name, fmt in plan.items():
        edge = name.startswith(("model.layers.0.", "model.layers.3."))
        assert fmt.name == ("int8" if edge else "int4-g128"), name
    q = copy.deepcopy(model)
    result = quantize_mixed(q, spec)
    assert result.plan == {n: f.name for n, f in plan.items()} and result.predicted_kld is None
    assert {n: m.spec.name for n, m in quantized_modules(q)} == result.plan
    assert weight_bytes(q) == weight_bytes(model) - tensor_bytes(
        model.get_submodule(n).weight for n in plan) + plan_bytes(model, plan)


# ---------------------------------------------------------------- auto

@pytest.mark.parametrize("bpw", [3.5, 4.0, 5.0, 7.0])
def test_auto_never_exceeds_its_budget(bpw):
    model = tiny_llama(layers=2)
    spec = parse_mixed(f"mixed-auto:{bpw}:int3-g128/int4-g128/int8")
    q = copy.deepcopy(model)
    result = quantize_mixed(q, spec, windows())
    params = sum(model.get_submodule(n).weight.numel() for n in select_modules(model))
    budget = math.floor(bpw * params / 8)
    measured = stored_bytes_of_quantized_layers(q)
    assert measured <= budget
    assert measured == result.allocation["total_bytes"]
    assert bpw_of_plan(model, {n: parse_format(f) for n, f in result.plan.items()}) <= bpw
    assert set(result.plan) == set(select_modules(model))
    assert result.predicted_kld > 0


@pytest.mark.parametrize("scaled", [None, "model.layers.1.mlp.down_proj"])
def test_auto_gives_the_most_sensitive_layer_the_wider_format(scaled):
    # Two layers of the same size (the blocks' down_proj), a budget with room to widen exactly one:
    # untouched, block 0's is the more sensitive; scaled up 10x, block 1's becomes so.
    model = tiny_llama(layers=2)
    if scaled:
        with torch.no_grad():
            model.get_submodule(scaled).weight.mul_(10.0)
    exclude = ("self_attn", "gate_proj", "up_proj")
    names = select_modules(model, exclude=exclude)
    assert names == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    narrow, wide = parse_format("int3-g128"), parse_format("int8")
    shape = model.get_submodule(names[0]).weight.shape
    budget = storage_bytes(narrow, *shape) + storage_bytes(wide, *shape)
    bpw = 8 * budget / (2 * shape.numel())
    spec = parse_mixed(f"mixed-auto:{bpw!r}:int3-g128/int8")
    result = quantize_mixed(copy.deepcopy(model), spec, windows(), exclude=exclude)
    sensitive = scaled or "model.layers.0.mlp.down_proj"
    assert result.plan == {n: "int8" if n == sensitive else "int3-g128" for n in names}
    assert result.allocation["total_bytes"] == budget == result.allocation["budget_bytes"]


def test_auto_without_calibration_tokens_is_refused():
    with pytest.raises(QuantscopeError, match="calibration"):
        quantize_mixed(tiny_llama(layers=1), parse_mixed("mixed-auto:5:int4-g128/int8"))


def test_planned_bytes_of_mixed_formats_match_the_model():
    import json

    model = tiny_llama(layers=4, tied=False)
    config = json.loads(model.config.to_json_string())
    edges = parse_mixed("mixed-edges:int4-g128/int8")
    q = copy.deepcopy(model)
    quantize_mixed(q, edges)
    assert mixed_weight_bytes(config, edges, baseline_dtype="fp32") == weight_bytes(q)
    auto = parse_mixed("mixed-auto:4.5:int3-g128/int4-g128/int8")
    q = copy.deepcopy(model)
    quantize_mixed(q, auto, windows())
    assert weight_bytes(q) <= mixed_weight_bytes(config, auto, baseline_dtype="fp32")  # an upper bound


# ---------------------------------------------------------------- through the harness

def test_compare_records_plan_prediction_and_disjoint_calibration(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSCOPE_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_model_dir
    cfg = CompareConfig(model=str(model_dir), text=str(text), ctx=32, windows=2, isolate=False,
                        measure_speed=False, calib_samples=2, calib_seqlen=64,
                        formats=("int4-g128", "mixed-edges:int4-g128/int8", "mixed-auto:5:int3-g128/int4-g128/int8"))
    records, meta = compare(cfg, run_dir=tmp_path / "run")
    by = {r["format"]: r for r in records}
    assert not any(r.get("error") for r in records)
    auto = by["mixed-auto:5:int3-g128/int4-g128/int8"]
    assert auto["bits_per_weight"] <= 5.0
    assert set(auto["mixed_plan"].values()) <= {"int3-g128", "int4-g128", "int8"}
    assert auto["predicted_kld"] > 0 and auto["kld_mean"] > 0
    assert auto["mixed_allocation"]["total_bytes"] <= auto["mixed_allocation"]["budget_bytes"]
    assert auto["spec"]["family"] == "mixed"
    assert "disjoint" in " ".join(auto["notes"])
    # the calibration head (2 x 64 tokens) comes before every evaluation window
    assert all(r["window_start_token"] == 128 for r in records)
    assert any("evaluation windows start after them" in n for n in meta["notes"])
    edges = by["mixed-edges:int4-g128/int8"]
    assert edges["predicted_kld"] is None
    assert by["int4-g128"]["weight_bytes"] < edges["weight_bytes"]
    assert list(tmp_path.joinpath("cache").rglob("*.json"))  # the scan is cached for the next budget


def test_paired_statistics_pair_each_record_with_the_baseline_of_its_windows():
    def rec(fmt, start, nll, baseline=False):
        return {"format": fmt, "baseline": baseline, "window_start_token": start, "window_nll": nll,
                "window_tokens": [10, 10, 10]}

    records = [rec("fp32", 0, [10.0, 11.0, 12.0], True), rec("int8", 0, [10.0, 11.0, 12.0]),
               rec("fp32", 128, [20.0, 21.0, 22.0], True), rec("mixed-auto:5:int4-g128/int8", 128, [20.0, 21.0, 22.0])]
    add_paired_statistics(records)  # identical window NLLs: each delta is x - x, exactly 0
    assert records[1]["perplexity_delta"] == 0.0
    assert records[3]["perplexity_delta"] == 0.0  # against the start-128 baseline, not the first one
    assert records[2]["perplexity_delta"] == 0.0


# ---------------------------------------------------------------- a whole-model byte budget

@pytest.mark.parametrize("include", [(), ("embed_tokens",)])
def test_auto_with_a_byte_budget_keeps_the_whole_model_within_it(include):
    model = tiny_llama(layers=2)
    whole = weight_bytes(model)
    int4 = copy.deepcopy(model)
    quantize_mixed(int4, parse_mixed("mixed-edges:int4-g128/int4-g128"), include=include)
    budget = (weight_bytes(int4) + whole) // 3  # between all-int4 and FP32: a real choice
    spec = parse_mixed(f"mixed-auto:{budget}B:int4-g128/int8")
    assert spec.budget_bytes == budget and spec.target_bpw is None
    q = copy.deepcopy(model)
    result = quantize_mixed(q, spec, windows(), include=include)
    assert weight_bytes(int4) < weight_bytes(q) <= budget  # the whole model, measured
    assert set(result.plan.values()) == {"int4-g128", "int8"}
    assert mixed_weight_bytes(model.config.to_dict(), spec) == budget  # the planner's upper bound
    with pytest.raises(QuantscopeError, match="cannot be made smaller than"):
        quantize_mixed(copy.deepcopy(model), parse_mixed(f"mixed-auto:{weight_bytes(int4) - 1}B:int4-g128/int8"),
                       windows(), include=include)


def test_compare_cli_target_bpw_and_bytes_add_mixed_formats(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from quantscope.cli import main

    monkeypatch.setenv("QUANTSCOPE_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_model_dir
    out = tmp_path / "r.json"
    argv = ["compare", "--model", str(model_dir), "--text", str(text), "--ctx", "32", "--windows", "2",
            "--calib-samples", "2", "--calib-seqlen", "64", "--no-speed", "--no-isolate", "--no-store",
            "--formats", "int8", "--target-bpw", "5", "--target-bytes", "1GB", "--ladder", "int4-g128/int8",
            "--json", str(out)]
    assert main(argv) == 0
    import json

    recs = {r["format"]: r for r in json.loads(out.read_text())}
    assert {"mixed-auto:5:int4-g128/int8", "mixed-auto:1GB:int4-g128/int8"} <= set(recs)
    assert recs["mixed-auto:5:int4-g128/int8"]["bits_per_weight"] <= 5
    assert recs["mixed-auto:1GB:int4-g128/int8"]["weight_bytes"] <= 10**9
    # a budget nothing meets: that format's row says why in one line, the others are measured
    assert main(argv[:-8] + ["--target-bytes", "1KB", "--json", str(out)]) == 0
    recs = {r["format"]: r for r in json.loads(out.read_text())}
    why = recs["mixed-auto:1KB:int3-g128/int4-g128/int8"]["error"]
    assert "cannot be made smaller than" in why and "\n" not in why
    assert not recs["int8"].get("error")
