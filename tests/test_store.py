"""Result store and resumable sweeps: kill -9 safety, exclusive writers, corruption, study files."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantscope.errors import QuantscopeError
from quantscope.results.db import DB_NAME
from quantscope.results.keys import record_key
from quantscope.results.runs import list_runs, load_run, resolve_run
from quantscope.results.store import RunStore
from quantscope.sweep import Study, load_study, run_study, study_from_dict

REPO = Path(__file__).resolve().parents[1]

# A sweep in a child process with a deterministic fake measurement. Each call first appends its cell
# to a log (so the parent can count how often each cell was measured), then waits a random moment
# (so SIGKILL lands both inside a measurement and inside a commit), then returns a record that is a
# pure function of the cell.
CHILD = r"""
import hashlib, json, random, sys, time
from quantscope.sweep import load_study, run_study
study_path, out, calls, max_delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

def measure(model, fmt, spec):
    with open(calls, "a") as f:
        f.write(f"{model}|{fmt}|{spec['text']}\n")
    time.sleep(random.uniform(0, max_delay))
    h = hashlib.sha256(f"{model}|{fmt}|{spec['text_sha256']}".encode()).digest()
    return {"format": fmt, "model": model, "perplexity": 10 + h[0] / 25.5, "kld_mean": h[1] / 2550,
            "bits_per_weight": 2 + h[2] % 7, "window_nll": [b / 7 for b in h[:8]]}

outcome = run_study(load_study(study_path), out, measure)
print(json.dumps({"measured": outcome.measured, "skipped": outcome.skipped}))
"""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _write_study(tmp_path: Path) -> tuple[Path, int]:
    texts = []
    for i in range(2):
        t = tmp_path / f"text{i}.txt"
        t.write_text(f"text number {i}\n" * 20)
        texts.append(str(t))
    formats = ["fp32", "bf16", "int8", "int4-g128", "nf4", "int3-g128"]
    study = tmp_path / "study.toml"
    study.write_text(
        'name = "killtest"\n'
        'models = ["tiny-a", "tiny-b"]\n'
        f"formats = {json.dumps(formats)}\n"
        f"texts = {json.dumps(texts)}\n"
        "ctx = 64\nwindows = 3\n"
    )
    return study, 2 * len(formats) * len(texts)


def _stored_count(run_dir: Path) -> int:
    if not (run_dir / DB_NAME).exists():
        return 0
    return len(load_run(run_dir).records)


def test_sweep_killed_repeatedly_resumes_to_exactly_the_full_set(tmp_path):
    study, total = _write_study(tmp_path)
    env = _child_env()

    reference_dir = tmp_path / "reference"
    subprocess.run([sys.executable, "-c", CHILD, str(study), str(reference_dir), str(tmp_path / "ref_calls"), "0"],
                   env=env, check=True, capture_output=True, timeout=120)
    reference = load_run(reference_dir)
    assert len(reference.records) == total

    run_dir, calls = tmp_path / "resumed", tmp_path / "calls"
    rng = random.Random(7)
    targets = sorted(rng.sample(range(1, total - 5), 5))
    kills = 0
    for target in targets:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(study), str(run_dir), str(calls), "0.015"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while proc.poll() is None and _stored_count(run_dir) < target and time.monotonic() < deadline:
            time.sleep(0.003)
        time.sleep(rng.uniform(0, 0.02))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
        kills += 1
        done = _stored_count(run_dir)
        assert target <= done < total

    final = subprocess.run([sys.executable, "-c", CHILD, str(study), str(run_dir), str(calls), "0.015"],
                           env=env, check=True, capture_output=True, text=True, timeout=120)
    outcome = json.loads(final.stdout)
    assert outcome["skipped"] >= targets[-1] and outcome["measured"] + outcome["skipped"] == total

    resumed = load_run(run_dir)
    assert len(resumed.keys) == len(set(resumed.keys)) == total
    assert resumed.keys == reference.keys
    assert resumed.records == reference.records
    # Only a measurement in flight at a kill is ever repeated.
    lines = calls.read_text().splitlines()
    assert len(set(lines)) == total
    assert total <= len(lines) <= total + kills


def test_second_writer_is_refused_with_the_holders_pid(tmp_path):
    run_dir = tmp_path / "run"
    code = ("import sys\nfrom quantscope.results.store import RunStore\nfrom quantscope.errors import QuantscopeError\n"
            "try:\n    RunStore.open(sys.argv[1])\nexcept QuantscopeError as e:\n    print(e); sys.exit(2)\n")
    with RunStore.open(run_dir, {"model": "m"}) as store:
        store.put("k", {"format": "int8"})
        proc = subprocess.run([sys.executable, "-c", code, str(run_dir)], env=_child_env(),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        assert f"run dir {run_dir} is in use by pid {os.getpid()}" in proc.stdout
        # Readers are not blocked by the writer.
        assert load_run(run_dir).records == [{"format": "int8"}]
    # Released on close: the next writer gets in and sees the record.
    with RunStore.open(run_dir) as store:
        assert store.get("k") == {"format": "int8"}


def test_writer_waits_for_a_lock_released_in_time(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom quantscope.results.store import RunStore\ns = RunStore.open(sys.argv[1])\n"
         "print('locked', flush=True)\ntime.sleep(0.5)\ns.close()\n", str(run_dir)],
        env=_child_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(QuantscopeError, match="in use by pid"):
        RunStore.open(run_dir)
    with RunStore.open(run_dir, wait_seconds=30) as store:
        assert store.records() == []
    holder.wait(timeout=30)


def test_garbage_database_is_an_error_with_a_way_out_and_left_untouched(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    garbage = random.Random(1).randbytes(8192)
    (run_dir / DB_NAME).write_bytes(garbage)
    for attempt in (lambda: RunStore.open(run_dir), lambda: load_run(run_dir)):
        with pytest.raises(QuantscopeError, match="move it aside or delete it"):
            attempt()
    study = Study(name="s", formats=("int8",), windows=1, texts=(str(run_dir / DB_NAME),))
    with pytest.raises(QuantscopeError, match="not a readable quantscope result store"):
        run_study(study, run_dir, lambda *a: pytest.fail("must not measure into a corrupt store"))
    assert (run_dir / DB_NAME).read_bytes() == garbage
    assert "error" in list_runs(tmp_path)[0]


def test_damaged_pages_of_a_real_store_are_detected(tmp_path):
    run_dir = tmp_path / "run"
    with RunStore.open(run_dir) as store:
        for i in range(200):
            store.put(f"k{i}", {"format": f"f{i}", "window_nll": list(range(50))})
    db = run_dir / DB_NAME
    data = bytearray(db.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 300] = b"\xff" * 300
    db.write_bytes(bytes(data))
    with pytest.raises(QuantscopeError, match="malformed.*move it aside"):
        load_run(run_dir)


def test_a_foreign_sqlite_file_is_not_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    conn = sqlite3.connect(run_dir / DB_NAME)
    conn.execute("CREATE TABLE photos (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(QuantscopeError, match="other tables"):
        RunStore.open(run_dir)


def test_record_key_is_canonical_and_sensitive_to_every_part():
    spec = {"text": "t", "text_sha256": "ab", "ctx": 512, "windows": 8, "tasks": ["piqa"]}
    key = record_key("fp", "int4-g128", spec, "0.1.0")
    assert key == record_key("fp", "int4-g128", dict(reversed(list(spec.items()))), "0.1.0")
    variants = [
        record_key("fp2", "int4-g128", spec, "0.1.0"),
        record_key("fp", "int4-g64", spec, "0.1.0"),
        record_key("fp", "int4-g128", {**spec, "ctx": 256}, "0.1.0"),
        record_key("fp", "int4-g128", {**spec, "text_sha256": "cd"}, "0.1.0"),
        record_key("fp", "int4-g128", {**spec, "tasks": []}, "0.1.0"),
        record_key("fp", "int4-g128", spec, "0.2.0"),
    ]
    assert len({key, *variants}) == 1 + len(variants)


def test_store_round_trip_order_replace_and_meta(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    with RunStore.open(run_dir, {"model": "m"}) as store:
        store.put("a", {"format": "x", "perplexity": float("inf"), "kld_mean": float("nan")})
        store.put("b", {"format": "y"})
        store.put("a", {"format": "x2"})  # replaced in place, order kept
        assert store.has("a") and not store.has("c") and store.get("c") is None
        created = store.meta["created"]
    with RunStore.open(run_dir, {"recommendation": [{"format": "y", "passed": True, "reason": "ok"}]}) as store:
        assert [r["format"] for r in store.records()] == ["x2", "y"]
        assert store.meta["created"] == created and store.meta["model"] == "m"
        store.put("c", {"format": "z", "perplexity": float("inf"), "kld_mean": float("nan")})
    run = load_run(run_dir)
    assert run.meta["recommendation"][0]["format"] == "y"
    assert math.isinf(run.records[2]["perplexity"]) and math.isnan(run.records[2]["kld_mean"])
    rows = list_runs(tmp_path / "runs")
    assert rows == [{"name": "r1", "path": str(run_dir), "records": 3, "created": created, "model": "m"}]
    assert resolve_run("r1", tmp_path / "runs") == tmp_path / "runs" / "r1"
    with pytest.raises(QuantscopeError, match="did you mean 'r1'"):
        resolve_run("run1", tmp_path / "runs")


def test_run_study_in_process_skips_done_cells_and_retries_errors_on_request(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    study = Study(name="s", formats=("a", "b", "c"), windows=2, models=("m",), texts=(str(text),))
    calls = []

    def measure(model, fmt, spec):
        calls.append(fmt)
        assert spec["windows"] == 2 and spec["ctx"] == 512 and len(spec["text_sha256"]) == 64
        return {"format": fmt, "error": "unsupported here"} if fmt == "b" else {"format": fmt, "perplexity": 1.0}

    first = run_study(study, tmp_path / "run", measure)
    assert (first.measured, first.skipped, calls) == (3, 0, ["a", "b", "c"])
    second = run_study(study, tmp_path / "run", measure)
    assert (second.measured, second.skipped, calls[3:]) == (0, 3, [])
    assert second.records == first.records
    third = run_study(study, tmp_path / "run", measure, retry_errors=True)
    assert (third.measured, calls[3:]) == (1, ["b"])
    # A changed text is a different evaluation: everything is measured again.
    text.write_text("hello, changed")
    assert run_study(study, tmp_path / "run", measure).measured == 3
    assert len(load_run(tmp_path / "run").records) == 6


def test_study_file_parsing_and_errors(tmp_path):
    good = tmp_path / "s.toml"
    good.write_text('name = "x"\nformats = ["int8", "nf4"]\nwindows = 4\ntasks = ["piqa"]\n')
    study = load_study(good)
    assert study == Study(name="x", formats=("int8", "nf4"), windows=4, tasks=("piqa",))
    assert study.size == 2

    cases = {
        'name = "x"\nformats = ["int8"]\nwindows = 4\nwindow = 3\n': "unknown key 'window' — did you mean 'windows'",
        'name = "x"\nformats = ["int8"]\n': "missing required key 'windows'",
        'name = "x"\nformats = "int8"\nwindows = "4"\n': "'windows' must be int",
        'name = "x"\nformats = ["int8"]\nwindows = true\n': "'windows' must be int",
        'name = "x"\nformats = []\nwindows = 4\n': "`formats` must list at least one entry",
        'name = "x"\nformats = ["int8", "int8"]\nwindows = 4\n': "repeats int8",
        'name = "x"\nformats = ["int8"]\nwindows = 0\n': "windows must be >= 1",
        'name = "x"\nformats = ["int8"\nwindows = 4\n': "invalid TOML.*line",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.toml"
        path.write_text(text)
        with pytest.raises(QuantscopeError, match=message) as err:
            load_study(path)
        assert str(path) in str(err.value)
    with pytest.raises(QuantscopeError, match="not found"):
        load_study(tmp_path / "missing.toml")
    with pytest.raises(QuantscopeError, match="plain directory name"):
        study_from_dict({"name": "../x", "formats": ["a"], "windows": 1})
