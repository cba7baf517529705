"""Issue 20, continued: Ctrl-C, killed saves, names that are neither folders nor Hub models, messages
that must stay one line, and what a table must say about ragged groups."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli


def _unreachable_hub(monkeypatch):
    import huggingface_hub

    def refuse(*a, **k):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", refuse)


@pytest.mark.parametrize("argv", [("compare", "--model", "nope_model_dir", "--no-store"),
                                  ("plan", "nope_model_dir"),
                                  ("save", "int8", "--model", "nope_model_dir", "--out", "{tmp}/ck"),
                                  ("sensitivity", "--model", "nope_model_dir")])
def test_a_name_that_is_neither_a_folder_nor_reachable_fails_at_once(capsys, monkeypatch, tmp_path, argv):
    from huggingface_hub import constants

    _unreachable_hub(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    monkeypatch.chdir(tmp_path)
    calls = []
    import huggingface_hub.file_download as fd

    monkeypatch.setattr(fd, "hf_hub_download", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    code, _, err = run_cli(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert_one_line_error(code, err, "no such folder: nope_model_dir, and the Hugging Face Hub is unreachable")
    assert not calls  # no download was attempted (they retry for most of a minute)
    assert not (tmp_path / "ck").exists()


def _cached_snapshot(root: Path, repo: str, model_dir: Path) -> Path:
    """The Hub cache's layout for `repo` at one revision, holding `model_dir`'s files."""
    import shutil

    base = root / ("models--" + repo.replace("/", "--"))
    rev = "0" * 40
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    snap = base / "snapshots" / rev
    shutil.copytree(model_dir, snap)
    return snap


def test_a_cached_hub_model_loads_from_its_snapshot_when_the_hub_is_unreachable(monkeypatch, tmp_path,
                                                                                 tiny_model_dir):
    from huggingface_hub import constants

    from quantscope.model.load import load_model, resolve

    d, _ = tiny_model_dir
    _unreachable_hub(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    snap = _cached_snapshot(tmp_path / "hub", "someone/tiny", d)
    kind, path, fingerprint, name = resolve("someone/tiny")
    assert (kind, Path(path), fingerprint, name) == ("hub", snap, "hub:someone/tiny", "someone/tiny")
    lm = load_model("someone/tiny")  # from the snapshot folder: no network
    assert lm.info.kind == "hub" and lm.info.n_params > 0


def test_a_config_only_folder_reports_the_missing_weights(capsys, tmp_path, tiny_model_dir):
    d, text = tiny_model_dir
    only = tmp_path / "config-only"
    only.mkdir()
    (only / "config.json").write_text((d / "config.json").read_text())
    for argv in (("compare", "--model", str(only), "--text", str(text), "--no-store"),
                 ("save", "int8", "--model", str(only), "--out", str(tmp_path / "ck")),
                 ("sensitivity", "--model", str(only), "--text", str(text))):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, f"no weights in {only}")


def test_a_library_message_over_several_lines_is_printed_as_one(capsys, tmp_path, tiny_model_dir):
    d, _ = tiny_model_dir
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = "two"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "plan", str(bad))
    assert_one_line_error(code, err, "num_hidden_layers")


def test_ragged_groups_are_named_in_the_table_notes(capsys, tmp_path, tiny_model_dir):
    d, text = tiny_model_dir
    code, out, _ = run_cli(capsys, "compare", "--model", str(d), "--text", str(text), "--ctx", "32", "--windows",
                           "2", "--no-speed", "--no-isolate", "--quiet", "--no-store", "--formats", "int4-g7,int4-g32")
    assert code == 0
    notes = [line for line in out.splitlines() if line.startswith("note (")]
    assert len(notes) == 1 and notes[0].startswith("note (int4-g7): 14 layer(s)"), out  # 64 wide: whole g32s
    assert "64 = 9x7 + 1" in notes[0] and "quantscope save` refuses them" in notes[0]


def test_a_killed_saves_partial_folder_is_removed_by_the_next_save(capsys, tmp_path, tiny_model_dir):
    pytest.importorskip("compressed_tensors")
    d, _ = tiny_model_dir
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ck.partial-{dead.pid}-0badcafe"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    live = tmp_path / f".ck.partial-{os.getppid()}-00c0ffee"  # a save of a process that still runs
    live.mkdir()
    code, out, err = run_cli(capsys, "save", "int8", "--model", str(d), "--out", str(tmp_path / "ck"), "--quiet")
    assert code == 0, err
    assert not stale.exists() and live.is_dir() and (tmp_path / "ck" / "config.json").is_file()
    assert f"removed .ck.partial-{dead.pid}-0badcafe (0.0 MB), left by an earlier save that was killed" in out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ck")) == [live.name]


def _sigint_default():
    """In the child before exec: SIGINT back to its default, as a terminal's foreground job has it (a test run
    started in the background of a non-interactive shell inherits it ignored, and so would the CLI)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_ctrl_c_is_quiet_in_the_parent_and_every_worker(tmp_path, tiny_model_dir):
    """The terminal's Ctrl-C reaches the whole process group: send it as a terminal would, while a
    worker is being started and while one runs; the only output is the parent's one line."""
    d, text = tiny_model_dir
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # The signal follows a row's line, not a clock, so the run cannot finish first on a fast machine;
    # 14 rows leave ten or more to interrupt.
    formats = "int8,int4-g32,nf4,int3-g32,fp4,int2-g32,int5-g32,int6-g32,int7-g32,int4-g16,int3-g16,int2-g16,bf16,fp16"
    for after, pause in (("[1] ", 0.05), ("[3] ", 0.0)):
        p = subprocess.Popen([sys.executable, "-m", "quantscope.cli", "compare", "--model", str(d), "--text", str(text),
                              "--ctx", "32", "--windows", "2", "--no-store", "--formats",
                              formats], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True, env=env, text=True, preexec_fn=_sigint_default)
        seen = []
        for line in p.stderr:
            seen.append(line)
            if line.startswith(after):
                time.sleep(pause)  # the next worker is starting (forked, unpickling its job) or already running
                os.killpg(p.pid, signal.SIGINT)
                break
        rest = p.stderr.read()
        p.wait(timeout=120)
        assert p.returncode == 130, (seen, rest)
        lines = [ln for ln in rest.splitlines() if ln.strip()]
        # a row that finished before the signal arrived (workers now start in milliseconds) may be reported
        # first; after it, nothing but the parent's one line: no traceback from the parent or any worker
        assert lines[-1] == "quantscope: interrupted" and all(ln.startswith("[") for ln in lines[:-1]), rest


@pytest.mark.parametrize("extra,needle", [
    (("--exclude", "."), "leave no layer of this model to quantize (--exclude .)"),
    (("--threads", "-1"), "--threads must be a positive integer"),
    (("--threads", "0"), "--threads must be a positive integer"),
])
def test_selections_and_thread_counts_that_cannot_work_are_refused_by_every_command(capsys, tmp_path, tiny_model_dir,
                                                                                    extra, needle):
    d, text = tiny_model_dir
    for argv in (("compare", "--model", str(d), "--text", str(text), "--ctx", "32", "--windows", "2", "--no-store"),
                 ("save", "int8", "--model", str(d), "--out", str(tmp_path / "ck")),
                 ("sensitivity", "--model", str(d), "--text", str(text), "--ctx", "32", "--windows", "1")):
        code, _, err = run_cli(capsys, *argv, *extra, "--quiet")
        assert_one_line_error(code, err, needle)
    assert not (tmp_path / "ck").exists()


def test_no_output_may_overwrite_a_result_store(capsys, tmp_path, tiny_model_dir):
    d, text = tiny_model_dir
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "compare", "--model", str(d), "--text", str(text), "--ctx", "32", "--windows", "2",
                           "--no-speed", "--no-isolate", "--quiet", "--formats", "int8", "--out", str(run))
    assert code == 0, err
    store = run / "results.sqlite"
    before = store.read_bytes()
    for argv in (("report", str(run), "--html", str(store)), ("report", str(run), "--md", str(store)),
                 ("show", str(run), "--json", str(store)), ("formats", "--json", str(store))):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "is a result store (SQLite): refusing to overwrite it")
    assert store.read_bytes() == before
    code, _, err = run_cli(capsys, "save", "int8", "--model", str(d), "--out", "")
    assert_one_line_error(code, err, "--out is empty")


def _copy_model(src: Path, dst: Path, skip=()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_folder_without_a_tokenizer_is_named_by_every_command(capsys, tmp_path, tiny_model_dir):
    d, text = tiny_model_dir
    tok_files = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"}
    bare = _copy_model(d, tmp_path / "no-tok", skip=tok_files)
    for argv in (("compare", "--model", str(bare), "--text", str(text), "--no-store"),
                 ("save", "int8", "--model", str(bare), "--out", str(tmp_path / "ck")),
                 ("sensitivity", "--model", str(bare), "--text", str(text))):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, f"no tokenizer in {bare}")


def test_weights_that_do_not_match_config_json_are_refused_before_any_work(capsys, tmp_path, tiny_model_dir):
    d, text = tiny_model_dir
    wrong = _copy_model(d, tmp_path / "wrong")
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (wrong / "config.json").write_text(json.dumps(cfg))
    for argv in (("compare", "--model", str(wrong), "--text", str(text), "--no-store"),
                 ("save", "int8", "--model", str(wrong), "--out", str(tmp_path / "ck")),
                 ("sensitivity", "--model", str(wrong), "--text", str(text))):
        code, _, err = run_cli(capsys, *argv, "--quiet")
        assert_one_line_error(code, err, "model.layers.0.mlp.down_proj.weight is [64, 128] in the weights but [64, 256]")
        assert "config and weights do not belong together" in err
    assert not (tmp_path / "ck").exists()


def test_sigterm_inside_a_finalizer_exits_without_an_ignored_exception():
    """A worker stopped while Python runs a `__del__` exits at once instead of printing "Exception ignored"."""
    code = ("import signal, os, time\n"
            "from quantscope.interrupt import become_worker\n"
            "become_worker()\n"
            "class Slow:\n"
            "    def __del__(self):\n"
            "        os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
            "x = Slow(); del x\n"
            "print('survived')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert p.returncode == 128 + signal.SIGTERM
    assert "Exception ignored" not in p.stderr and "survived" not in p.stdout


def test_a_ctrl_c_while_a_worker_starts_is_held_and_raised_after_not_lost():
    """deferred_sigint holds a SIGINT that arrives while a worker starts and raises it once the block ends,
    also when the kernel hands it to a thread other than the main one (where an ignored SIGINT is discarded)."""
    import threading

    from quantscope.interrupt import deferred_sigint

    after = []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background run inherits it ignored)
    with pytest.raises(KeyboardInterrupt):
        with deferred_sigint():
            other = threading.Thread(target=time.sleep, args=(0.5,))  # a thread that does not block SIGINT
            other.start()
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # so the kernel must pick `other`
            try:
                os.kill(os.getpid(), signal.SIGINT)  # process-directed, as a terminal sends it
                time.sleep(0.05)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            other.join()
            after.append("the block ran to its end")
    restored = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, previous)
    assert after == ["the block ran to its end"]
    assert restored is signal.default_int_handler
