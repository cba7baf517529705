"""The command line: bad inputs give one line on stderr, exit code 2, no traceback, no output file."""

import json
import subprocess
import sys

import pytest

from conftest import assert_one_line_error, run_cli
from quantscope.cli import main


def test_unknown_format(capsys, tiny_model_dir, tmp_path):
    d, text = tiny_model_dir
    out = tmp_path / "o.json"
    code, _, err = run_cli(capsys, "compare", "--model", str(d), "--text", str(text), "--formats", "in4-g128",
                           "--json", str(out), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "did you mean 'int4-g128'")
    assert not out.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,needle", [
    (["--model", "/nonexistent/model-dir"], "model not found"),
    (["--windows", "0"], "--windows must be at least 1"),
    (["--ctx", "100000"], "longer than the model's maximum"),
])
def test_bad_arguments(capsys, tiny_model_dir, tmp_path, args, needle):
    d, text = tiny_model_dir
    base = {"--model": str(d), "--text": str(text)}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = ["compare", "--formats", "int8", "--json", str(tmp_path / "o.json"), "--out", str(tmp_path / "run")]
    for k, v in base.items():
        argv += [k, v]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "run").exists()


def test_empty_and_binary_text(capsys, tiny_model_dir, tmp_path):
    d, _ = tiny_model_dir
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run_cli(capsys, "compare", "--model", str(d), "--text", str(empty), "--ctx", "32", "--no-store")
    assert_one_line_error(code, err, "the text is empty")
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    code, _, err = run_cli(capsys, "compare", "--model", str(d), "--text", str(binary), "--ctx", "32", "--no-store")
    assert_one_line_error(code, err, "not a UTF-8 text file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    code, _, err = run_cli(capsys, "compare", "--model", str(d), "--text", str(bad), "--ctx", "32", "--no-store")
    assert_one_line_error(code, err, "bad.jsonl:2")


def test_corrupt_safetensors(capsys, tiny_model_dir, tmp_path):
    d, text = tiny_model_dir
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # truncated
    code, _, err = run_cli(capsys, "compare", "--model", str(d), "--text", str(text), "--no-store")
    assert_one_line_error(code, err, "corrupt weight file")
    w.write_bytes(b"garbage" * 100)
    code, _, err = run_cli(capsys, "compare", "--model", str(d), "--text", str(text), "--no-store")
    assert_one_line_error(code, err, "corrupt weight file")


def test_nan_weights(capsys, tmp_path):
    from conftest import byte_tokenizer, tiny_llama

    m = tiny_llama(vocab=257)
    m.model.layers[0].mlp.up_proj.weight.data[0, 0] = float("nan")
    d = tmp_path / "nan-model"
    m.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 400)
    code, _, err = run_cli(capsys, "compare", "--model", str(d), "--text", str(text), "--ctx", "32",
                           "--windows", "2", "--formats", "int8", "--no-isolate", "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "NaN")
    assert not (tmp_path / "run").exists()


def test_formats_lists_every_family(capsys):
    code, out, _ = run_cli(capsys, "formats")
    assert code == 0
    for name in ("int4-g128", "nf4", "fp8-e4m3", "ternary", "gptq-int4-g128", "bnb-nf4", "hqq-int4-g64"):
        assert f"\n{name} " in "\n" + out


def test_compare_cli_isolated_end_to_end(tiny_model_dir, tmp_path):
    """The real CLI in a subprocess, a worker process per format, JSON with every field."""
    d, text = tiny_model_dir
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "quantscope.cli", "compare", "--model", str(d), "--text", str(text),
                        "--ctx", "32", "--windows", "2", "--formats", "int8,int3-g32", "--json", str(out),
                        "--out", str(tmp_path / "run"), "--new-tokens", "3", "--threads", "1"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = json.loads(out.read_text())
    assert [r["format"] for r in recs] == ["fp32", "int8", "int3-g32"]
    from quantscope.results.record import RECORD_FIELDS

    for r in recs:
        for f in RECORD_FIELDS:
            assert f in r, f
        assert r["peak_rss_bytes"] > 0
    assert "int3-g32" in p.stdout and "Δppl" in p.stdout
    p2 = subprocess.run([sys.executable, "-m", "quantscope.cli", "show", str(tmp_path / "run")],
                        capture_output=True, text=True, timeout=300)
    assert p2.returncode == 0 and "int3-g32" in p2.stdout


def test_sweep_runs_real_cells_and_resumes(tiny_model_dir, tmp_path):
    """`quantscope sweep` through the real harness (worker processes), then again: nothing re-measured."""
    d, text = tiny_model_dir
    study = tmp_path / "study.toml"
    study.write_text(f'name = "tiny"\nmodels = ["{d}"]\nformats = ["fp32", "int4-g64"]\n'
                     f'texts = ["{text}"]\nctx = 32\nwindows = 2\n')
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "quantscope.cli", "sweep", str(study), "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "2 measured, 0 reused" in p.stdout and "int4-g64" in p.stdout
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "0 measured, 2 reused" in p.stdout
    r = subprocess.run([sys.executable, "-m", "quantscope.cli", "report", str(out), "--md", str(tmp_path / "r.md")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "int4-g64" in (tmp_path / "r.md").read_text()


def test_bad_calibration_input(capsys, tiny_model_dir, tmp_path):
    d, text = tiny_model_dir
    base = ["compare", "--model", str(d), "--text", str(text), "--ctx", "32", "--windows", "2",
            "--formats", "gptq-int4-g32", "--no-store"]
    empty = tmp_path / "calib.txt"
    empty.write_text("")
    code, _, err = run_cli(capsys, *base, "--calib", str(empty))
    assert_one_line_error(code, err, "the text is empty")
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    code, _, err = run_cli(capsys, *base, "--calib", str(short), "--calib-seqlen", "64")
    assert_one_line_error(code, err, "fewer than one sample")
    binary = tmp_path / "calib.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    code, _, err = run_cli(capsys, *base, "--calib", str(binary))
    assert_one_line_error(code, err, "not a UTF-8 text file")


def test_calibration_disjoint_or_warned(tiny_model_dir, tmp_path):
    from quantscope.harness import CompareConfig, prepare

    d, text = tiny_model_dir
    same = prepare(CompareConfig(model=str(d), text=str(text), formats=("gptq-int4-g32",), ctx=32, windows=2,
                                 calib_samples=4, calib_seqlen=32))
    job = same.jobs[1]
    assert job.common["window_start_token"] == 4 * 32  # evaluation starts after the calibration head
    assert any("disjoint" in n for n in same.notes)
    # an explicit calibration file (different bytes) that contains the evaluation text is flagged
    (tmp_path / "copy.txt").write_text("Preface.\n" + text.read_text())
    other = prepare(CompareConfig(model=str(d), text=str(text), formats=("gptq-int4-g32",), ctx=32, windows=2,
                                  calib=str(tmp_path / "copy.txt"), calib_samples=8, calib_seqlen=32))
    assert other.jobs[1].common["window_start_token"] == 0
    assert other.jobs[1].common["calibration_overlap"] > 0.5
    assert any(n.startswith("WARNING") for n in other.notes)


def test_skipped_format_reason_is_a_line_of_its_own():
    from quantscope.report.terminal import comparison_table

    ok = {"format": "fp32", "baseline": True, "bits_per_weight": 32.0, "weight_bytes": 1 << 20,
          "perplexity": 10.0, "perplexity_stderr": 0.1, "kld_mean": 0.0, "kld_stderr": 0.0, "kld_p99": 0.0,
          "top1_agreement": 1.0}
    why = "llm-compressor cannot run here: " + "a long reason " * 20
    lines = comparison_table([{"format": "llmc-gptq-int4-g128", "error": why}, ok]).splitlines()
    header, fp32, skipped = lines[0], lines[2], lines[3]
    assert fp32.startswith("fp32") and skipped.startswith("llmc-gptq-int4-g128")
    assert why.strip() in skipped  # the whole reason, not cut at 90 characters
    assert len(header) < 200  # the reason does not widen the columns


def test_task_table_shows_each_task_and_where_each_format_loses():
    from quantscope.report.terminal import task_table

    t = {"n": 100, "acc": 0.5, "acc_ci": [0.4, 0.6], "acc_norm": 0.5, "category": "reasoning"}
    base = {"format": "fp32", "baseline": True, "tasks": {"arc-easy": t}}
    lost = {**t, "acc": 0.4, "delta": -0.1, "delta_ci": [-0.16, -0.04], "significant": True, "mcnemar_p": 0.002}
    q = {"format": "int4-g128", "tasks": {"arc-easy": lost},
         "task_categories": {"reasoning": {"tasks": ["arc-easy"], "n": 100, "delta": -0.1,
                                           "delta_ci": [-0.16, -0.04], "significant": True}}}
    lines = task_table([base, q]).splitlines()
    assert any(ln.strip().startswith("int4-g128") and "Δ -10.0 pts [-16.0,-4.0] *" in ln for ln in lines)
    i = next(i for i, ln in enumerate(lines) if ln.startswith("where each format loses"))
    assert "reasoning" in lines[i + 1]
    assert lines[i + 2].split()[0] == "int4-g128" and "-10.0 [-16.0,-4.0] *" in lines[i + 2]
    assert lines[i + 3].strip() == "reasoning: arc-easy"


def test_task_table_shows_lambada_last_word_perplexity():
    from quantscope.report.terminal import task_table

    t = {"n": 50, "acc": 0.3, "acc_ci": [0.2, 0.4], "category": "language-modelling", "perplexity": 60.0,
         "perplexity_stderr": 9.0}
    q = {**t, "acc": 0.2, "delta": -0.1, "delta_ci": [-0.2, 0.0], "significant": False, "mcnemar_p": 0.06,
         "perplexity": 70.5, "perplexity_delta": 10.5, "perplexity_delta_ci": [2.25, 19.0]}
    lines = task_table([{"format": "fp32", "baseline": True, "tasks": {"lambada": t}},
                        {"format": "nf4", "tasks": {"lambada": q}}]).splitlines()
    assert any(ln.strip().startswith("fp32") and ln.endswith("last-word ppl 60.00±9.00") for ln in lines)
    assert any(ln.strip().startswith("nf4") and "Δ -10.0 pts [-20.0,+0.0]  McNemar" in ln
               and ln.endswith("last-word ppl 70.50±9.00 Δ +10.50 [+2.25,+19.00] *") for ln in lines)


def test_json_means_one_thing_on_every_command(tmp_path, capsys):
    """`--json -` prints the JSON alone on stdout; `--json PATH` writes the file and keeps the tables."""
    import json

    assert main(["formats", "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"int4-g128", "bnb-nf4"} <= {r["name"] for r in rows}
    assert main(["runs", "--root", str(tmp_path / "none"), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    path = tmp_path / "formats.json"
    assert main(["formats", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "int4-g128" in out and f"wrote {path}" in out
    assert json.loads(path.read_text()) == rows

