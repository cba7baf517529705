"""Where a run's time goes (records' `timings`, `eval_tokens_per_s`, `kernel`), --verbose, and the baseline's
reference pass reused across compare calls (recommend's ladder)."""

import pytest

from quantscope.harness import CompareConfig, compare
from quantscope.harness import run as run_mod
from quantscope.harness.timings import Timings, describe
from quantscope.harness.worker import ReferenceStore
from quantscope.modules import cpu_kernels as ck
from quantscope.report.terminal import comparison_table


def test_timings_add_up_phases_and_describe_them_in_order():
    clock = Timings()
    with clock("load") as t:
        pass
    clock.add("speed", 2.0)
    clock.add("speed", 0.5)
    assert clock.seconds["speed"] == 2.5 and t.seconds >= 0 and clock.seconds["load"] == t.seconds
    assert describe({"speed": 1.0, "load": 2.0, "total": 3.0}) == "load 2.0s, speed 1.0s, total 3.0s"
    assert describe(None) == "no timings recorded"


def test_records_carry_timings_eval_rate_and_kernel(tiny_model_dir):
    d, text = tiny_model_dir
    cfg = CompareConfig(model=str(d), text=str(text), formats=("int4-g32", "int3-g32"), ctx=32, windows=2,
                        isolate=False, threads=1)
    records, _ = compare(cfg)
    by = {r["format"]: r for r in records}
    base, q4, q3 = by["fp32"], by["int4-g32"], by["int3-g32"]
    assert {"load", "reference", "speed", "total"} <= set(base["timings"])
    assert {"load", "quantize", "evaluate", "speed", "total"} <= set(q4["timings"])
    assert all(v >= 0 for v in q4["timings"].values())
    assert q4["timings"]["total"] >= q4["timings"]["evaluate"] + q4["timings"]["speed"]
    assert q4["eval_tokens_per_s"] == pytest.approx(q4["tokens_scored"] / q4["eval_seconds"])
    assert base["kernel"] == "dense (torch matmul)"
    assert q4["kernel"] == ("quantscope-avx2:int4" if ck.available() else "ref")
    assert q3["kernel"] == "ref"  # no 3-bit kernel: the speed column says so
    table = comparison_table(records)
    q3_line = next(line for line in table.splitlines() if line.startswith("int3-g32"))
    assert " ref" in q3_line and "ref: no kernel reads" in table


def test_verbose_prints_each_formats_phases(tiny_model_dir, capsys):
    from quantscope.cli import main

    d, text = tiny_model_dir
    rc = main(["compare", "--model", str(d), "--text", str(text), "--formats", "int8", "--ctx", "32",
               "--windows", "2", "--no-store", "--no-isolate", "--verbose", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "time: load" in err and "evaluate" in err and "tokens scored/s" in err and "kernel" in err


def test_a_reference_store_is_reused_by_a_later_compare_call(tiny_model_dir, tmp_path, monkeypatch):
    d, text = tiny_model_dir
    calls = []
    real = run_mod.run_job

    def counting(job, **kw):
        calls.append((job.format, job.is_baseline))
        return real(job, **kw)

    monkeypatch.setattr(run_mod, "run_job", counting)
    common = dict(model=str(d), text=str(text), ctx=32, windows=2, isolate=False, threads=1, measure_speed=False)
    refs, run_dir = ReferenceStore(), tmp_path / "run"
    first, _ = compare(CompareConfig(formats=("int8",), **common), run_dir=run_dir, refs=refs)
    second, _ = compare(CompareConfig(formats=("nf4",), **common), run_dir=run_dir, refs=refs)
    assert calls == [("fp32", True), ("int8", False), ("nf4", False)]  # no second reference pass
    # the same figures as a run that computes the reference again
    fresh, _ = compare(CompareConfig(formats=("nf4",), **common), run_dir=tmp_path / "other")
    nf4 = next(r for r in second if r["format"] == "nf4")
    assert nf4["kld_mean"] == pytest.approx(next(r for r in fresh if r["format"] == "nf4")["kld_mean"], rel=1e-6)
    # another baseline (other windows) resets the store instead of serving the wrong log-probabilities
    calls.clear()
    compare(CompareConfig(formats=("int8",), **dict(common, windows=3)), run_dir=tmp_path / "third", refs=refs)
    assert calls == [("fp32", True), ("int8", False)] and len(refs.windows) == 3
