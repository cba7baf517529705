"""Issue 20: bad input and faults are one line on stderr and exit 2, before any work, nothing left behind."""

from __future__ import annotations

import json

import pytest

from conftest import byte_tokenizer, tiny_llama
from conftest import assert_one_line_error, run_cli
from quantscope.cli import main


def fast(d, text, *extra):
    return ["compare", "--model", str(d), "--text", str(text), "--ctx", "32", "--windows", "2", "--no-speed",
            "--no-isolate", "--quiet", *extra]


def test_reused_run_directory_refuses_another_model_or_text(capsys, tiny_model_dir, tmp_path):
    d, text = tiny_model_dir
    run = tmp_path / "runs" / "base"
    code, _, err = run_cli(capsys, *fast(d, text, "--formats", "int8", "--out", str(run)))
    assert code == 0, err
    other = tmp_path / "other-llama"
    tiny_llama(seed=1, vocab=257).save_pretrained(other)
    byte_tokenizer().save_pretrained(other)
    code, _, err = run_cli(capsys, *fast(other, text, "--formats", "int8", "--out", str(run)))
    assert_one_line_error(code, err, "new --out")
    assert "tiny-llama" in err and "other-llama" in err
    text2 = tmp_path / "text2.txt"
    text2.write_text(text.read_text()[::-1])
    code, _, err = run_cli(capsys, *fast(d, text2, "--formats", "int8", "--out", str(run)))
    assert_one_line_error(code, err, "new --out")
    assert "text2.txt" in err
    code, _, err = run_cli(capsys, *fast(d, text, "--ctx", "48", "--formats", "int8", "--out", str(run)))
    assert_one_line_error(code, err, "ctx")
    code, out, err = run_cli(capsys, "show", str(run))  # the header still names the first model and text
    assert code == 0, err
    assert "other-llama" not in out and "text2" not in out
    # the same model and text adds formats to the directory as before
    code, _, err = run_cli(capsys, *fast(d, text, "--formats", "int8,int4-g32", "--out", str(run)))
    assert code == 0, err


def test_runs_lists_a_corrupt_run_with_its_error(capsys, tmp_path):
    from quantscope.results.db import DB_NAME
    from quantscope.results.store import RunStore

    root = tmp_path / "runs"
    with RunStore.open(root / "good", meta={"model": "tiny"}) as store:
        store.put("k", {"format": "fp32", "model": "tiny"})
    (root / "bad").mkdir()
    (root / "bad" / DB_NAME).write_bytes(b"SQLite format 3\0" + bytes(range(256)) * 8)
    code, out, err = run_cli(capsys, "runs", "--root", str(root))
    assert code == 0 and "Traceback" not in err, err
    lines = {l.split()[0]: l for l in out.splitlines()}
    assert "error:" in lines["bad"] and "move it aside" in lines["bad"]
    assert "error" not in lines["good"] and "tiny" in lines["good"]
    code, out, err = run_cli(capsys, "runs", "--root", str(root), "--json", "-")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert "not a readable quantscope result store" in rows["bad"]["error"]
    assert rows["good"]["records"] == 1 and not rows["good"].get("error")


def _bad_outputs(tmp_path):
    """(a path whose parent is a file, an existing directory): neither can be written, even by root."""
    f = tmp_path / "file.txt"
    f.write_text("x")
    d = tmp_path / "a-dir"
    d.mkdir()
    return f / "out.json", d


def test_compare_and_sensitivity_refuse_an_unwritable_json_before_work(capsys, tiny_model_dir, tmp_path):
    d, text = tiny_model_dir
    under_file, a_dir = _bad_outputs(tmp_path)
    for dest, needle in ((under_file, "is not a directory"), (a_dir, "is a directory")):
        run = tmp_path / "run"
        code, _, err = run_cli(capsys, *fast(d, text, "--formats", "int8", "--json", str(dest), "--out", str(run)))
        assert_one_line_error(code, err, needle)
        assert "--json" in err and not run.exists()
        code, _, err = run_cli(capsys, "sensitivity", "--model", str(d), "--text", str(text), "--ctx", "32",
                               "--windows", "1", "--no-cache", "--quiet", "--json", str(dest))
        assert_one_line_error(code, err, needle)
    code, _, err = run_cli(capsys, *fast(d, text, "--formats", "int8", "--out", str(tmp_path / "file.txt")))
    assert_one_line_error(code, err, "--out")


def test_report_refuses_unwritable_md_or_html(capsys, tmp_path):
    under_file, a_dir = _bad_outputs(tmp_path)
    for option in ("--md", "--html"):
        for dest, needle in ((under_file, "is not a directory"), (a_dir, "is a directory")):
            code, _, err = run_cli(capsys, "report", "some-run", "--root", str(tmp_path), option, str(dest))
            assert_one_line_error(code, err, needle)
            assert option in err


def test_save_refuses_unwritable_out_or_json_before_work(capsys, tiny_model_dir, tmp_path):
    d, _ = tiny_model_dir
    under_file, a_dir = _bad_outputs(tmp_path)
    code, _, err = run_cli(capsys, "save", "int8", "--model", str(d), "--out", str(under_file.parent / "ckpt"),
                           "--quiet")
    assert_one_line_error(code, err, "is not a directory")
    ckpt = tmp_path / "ckpt"
    code, _, err = run_cli(capsys, "save", "int8", "--model", str(d), "--out", str(ckpt), "--json", str(a_dir),
                           "--quiet")
    assert_one_line_error(code, err, "is a directory")  # before quantizing and writing the checkpoint
    assert not ckpt.exists()


def test_a_write_that_fails_midway_is_one_line(capsys, tmp_path, monkeypatch):
    import errno

    import quantscope.fileio as fileio

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fileio, "write_text_atomic", full)
    out = tmp_path / "runs.json"
    code, _, err = run_cli(capsys, "runs", "--root", str(tmp_path / "none"), "--json", str(out))
    assert_one_line_error(code, err, f"cannot write {out}: No space left on device")


def run_cli_exit(capsys, *argv):
    """run_cli for mistakes argparse refuses (it exits with SystemExit(2))."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("formats", ["", ",,", " , "])
def test_empty_format_selection_is_refused(capsys, tiny_model_dir, tmp_path, formats):
    d, text = tiny_model_dir
    run = tmp_path / "run"
    code, out, err = run_cli_exit(capsys, *fast(d, text, "--formats", formats, "--out", str(run)))
    assert_one_line_error(code, err, "--formats")
    assert not run.exists() and not out
    code, _, err = run_cli_exit(capsys, "plan", str(d), "--formats", formats)
    assert_one_line_error(code, err, "--formats")


def test_negative_top_is_refused(capsys, tiny_model_dir):
    d, text = tiny_model_dir
    code, _, err = run_cli_exit(capsys, "sensitivity", "--model", str(d), "--text", str(text), "--top", "-2")
    assert_one_line_error(code, err, "--top")
    assert "0 or more" in err


def test_a_named_library_format_that_cannot_run_fails_after_the_others(capsys, tiny_model_dir, tmp_path):
    from quantscope.api import format_unavailable, list_formats
    from quantscope.backends import BACKEND_FORMATS

    missing = next((r["name"] for r in list_formats() if not r["installed"] and "not installed" in r["note"]
                    and not BACKEND_FORMATS[r["name"]].needs_calibration), None)
    if missing is None:
        pytest.skip("every library format can run here")
    d, text = tiny_model_dir
    run, out = tmp_path / "run", tmp_path / "o.json"
    code, stdout, err = run_cli(capsys, *fast(d, text, "--formats", f"int8,{missing}", "--out", str(run),
                                              "--json", str(out)))
    assert_one_line_error(code, err, format_unavailable(missing))
    assert "pip install" in err and str(run) in err
    assert missing in stdout and "skipped" in stdout  # the row is still printed
    assert [r["format"] for r in json.loads(out.read_text()) if not r.get("error")] == ["fp32", "int8"]
    code, stdout, err = run_cli(capsys, "show", str(run))
    assert code == 0 and "int8" in stdout
