"""Sweeps on Ray, on a real one-node cluster on loopback (`ray.init(num_cpus=2)`), shared by the module:
the same keys and numbers as a local sweep, half local and half Ray in one store, a killed driver and a
killed Ray worker, and bad input (an unreachable address, resources no node has, a missing library)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import assert_one_line_error, byte_tokenizer, run_cli, tiny_llama
from quantscope.errors import QuantscopeError
from quantscope.results.runs import load_run

# Ray binds to the machine's outward address unless told it is not a cluster (read when Ray is
# imported, inherited by the nodes, workers and drivers started from here): keep it on loopback
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
try:
    import ray
except ImportError:  # the tests that need it skip; the install hint is tested without it
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install 'quantscope[ray]')")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    """One Ray instance, 2 CPUs, for the whole module (a start costs seconds); its GCS address."""
    if ray is None:
        pytest.skip("Ray is not installed (pip install 'quantscope[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama saved with its tokenizer, and a text file: (model dir, text)."""
    root = tmp_path_factory.mktemp("ray-tiny")
    d = root / "tiny-llama"
    tiny_llama(vocab=257).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    from quantscope.evaluate.text import python_docs_text

    text = root / "text.txt"
    text.write_text(python_docs_text()[:20000])
    return d, text


def write_study(path: Path, tiny, formats=("fp32", "int8", "int4-g32")) -> Path:
    d, text = tiny
    fmts = ", ".join(f'"{f}"' for f in formats)
    path.write_text(f'name = "tiny"\nmodels = ["{d}"]\nformats = [{fmts}]\ntexts = ["{text}"]\nctx = 32\nwindows = 2\n')
    return path


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")])
    return e


def sweep_on_ray(study: Path, out: Path, options=None, measure=None, retry_errors=False):
    """run_study with the cells measured on the module's cluster (as `quantscope sweep --ray`)."""
    from quantscope.harness.ray_run import RayOptions
    from quantscope.model.load import resolve
    from quantscope.sweep import load_study, run_study
    from quantscope.sweep_measure import measure_cell, measure_on_ray

    said: list[str] = []
    outcome = run_study(load_study(study), out, measure_cell, fingerprint_fn=lambda m: resolve(m)[2],
                        retry_errors=retry_errors,
                        measure_all=measure_on_ray(options or RayOptions(), say=said.append, measure=measure))
    return outcome, said


FIGURES = ("perplexity", "kld_mean", "kld_p99", "top1_agreement", "window_nll", "weight_bytes", "bits_per_weight")


def test_half_local_half_ray_is_one_set_of_records_with_the_local_numbers(cluster, tiny, tmp_path, capsys):
    """A sweep measured locally, and the same sweep started locally (one cell), then finished on Ray:
    the same keys, one record per cell, and the figures of the Ray cells equal the local ones."""
    from quantscope.api import run_sweep
    from quantscope.model.load import resolve
    from quantscope.sweep import load_study, run_study
    from quantscope.sweep_measure import measure_cell

    study = write_study(tmp_path / "study.toml", tiny)
    local, _ = run_sweep(str(study), str(tmp_path / "runs" / "local"))
    mixed = tmp_path / "runs" / "mixed"

    class Stop(Exception):
        pass

    seen = []

    def one_then_stop(model, fmt, spec):
        if seen:
            raise Stop
        seen.append(fmt)
        return measure_cell(model, fmt, spec)

    with pytest.raises(Stop):
        run_study(load_study(study), mixed, one_then_stop, fingerprint_fn=lambda m: resolve(m)[2])
    assert len(load_run(mixed).records) == 1
    outcome, said = sweep_on_ray(study, mixed)
    assert (outcome.measured, outcome.skipped) == (2, 1)
    assert "ray: 2 done, 0 running, 0 queued, 0 failed (of 2)" in said, said
    run, ref = load_run(mixed), load_run(local.run_dir)
    assert sorted(run.keys) == sorted(ref.keys) and len(set(run.keys)) == 3
    by_key = dict(zip(ref.keys, ref.records))
    ray_rows = [(k, r) for k, r in zip(run.keys, run.records) if "ray" in r]
    assert len(ray_rows) == 2 and all(r["ray"]["attempt"] == 1 for _, r in ray_rows)
    for key, rec in ray_rows:
        for f in FIGURES:
            assert rec[f] == pytest.approx(by_key[key][f], rel=1e-6, abs=1e-9), (rec["format"], f)
    # `quantscope runs` and `report` read it as any run
    code, out, _ = run_cli(capsys, "runs", "--root", str(tmp_path / "runs"))
    assert code == 0 and "mixed" in out
    code, _, err = run_cli(capsys, "report", str(mixed), "--md", str(tmp_path / "r.md"))
    assert code == 0, err
    assert "int4-g32" in (tmp_path / "r.md").read_text()


def _ray_workers_running(title: str) -> list[int]:
    """pids of the Ray worker processes whose title is `ray::<title>` (a task of that name is running)."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if p.name.isdigit() and cmd.strip() == f"ray::{title}":
            pids.append(int(p.name))
    return pids


def test_a_ray_worker_killed_mid_task_is_retried_without_a_duplicate(cluster, tiny, tmp_path):
    study = write_study(tmp_path / "study.toml", tiny, formats=("fp32", "int8"))
    marker = tmp_path / "int8-started"

    def slow_first_time(job, refs):  # (a closure: Ray ships it by value)
        from quantscope.harness.worker import measure_format

        if job.format == "int8" and not marker.exists():
            marker.touch()
            time.sleep(60)  # killed in here
        return measure_format(job, refs=refs)

    result = {}
    runner = threading.Thread(target=lambda: result.update(out=sweep_on_ray(study, tmp_path / "run",
                                                                             measure=slow_first_time)))
    runner.start()
    deadline = time.monotonic() + 120
    while not (marker.exists() and _ray_workers_running("quantscope int8")) and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = _ray_workers_running("quantscope int8")
    assert marker.exists() and len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    runner.join(180)
    assert not runner.is_alive()
    outcome, said = result["out"]
    run = load_run(tmp_path / "run")
    assert len(run.keys) == len(set(run.keys)) == 2 and outcome.measured == 2
    rec = next(r for r in run.records if r["format"] == "int8")
    assert "error" not in rec and rec["ray"]["attempt"] == 2 and rec["kld_mean"] > 0


def test_a_killed_driver_keeps_what_finished_and_the_rerun_completes_it(cluster, tiny, tmp_path):
    """`quantscope sweep --ray ADDRESS` killed once a record is stored, then run again: the stored records
    are kept as they were, the rest is measured, nothing twice; progress is on stderr."""
    study = write_study(tmp_path / "study.toml", tiny, formats=("fp32", "int8", "int4-g32", "nf4"))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "quantscope.cli", "sweep", str(study), "--out", str(run_dir), "--ray", cluster]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if (run_dir / "results.sqlite").exists() and load_run(run_dir).records:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    first = load_run(run_dir)
    assert 1 <= len(first.records) < 4
    again = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{4 - len(first.records)} measured, {len(first.records)} reused" in again.stdout
    assert "ray: " in again.stderr and " done, 0 running, 0 queued, 0 failed" in again.stderr
    final = load_run(run_dir)
    assert len(final.keys) == len(set(final.keys)) == 4
    kept = dict(zip(final.keys, final.records))
    assert all(kept[k] == r for k, r in zip(first.keys, first.records))


def test_resources_that_no_node_has_are_refused_before_anything_runs(cluster, tiny, tmp_path):
    from quantscope.harness.ray_run import RayOptions

    study = write_study(tmp_path / "study.toml", tiny, formats=("int8",))
    with pytest.raises(QuantscopeError, match=r"format int8 needs 16 CPU, 0 GPU, .* no node of the Ray cluster"):
        sweep_on_ray(study, tmp_path / "run", RayOptions(cpus=16))
    with pytest.raises(QuantscopeError, match=r"needs 1 CPU, 0 GPU, 931322.57 GiB memory per task"):
        sweep_on_ray(study, tmp_path / "run", RayOptions(memory=10**15))
    with pytest.raises(QuantscopeError, match="needs 1 CPU, 1 GPU"):
        sweep_on_ray(study, tmp_path / "run", RayOptions(gpus=1))
    assert load_run(tmp_path / "run").records == []


# a Python started with this on its path cannot find the package: as where it is not installed
HIDE = """import sys
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name == {name!r} or name.startswith({name!r} + "."):
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, _Hide())
"""


def hiding(tmp_path: Path, package: str) -> str:
    """A PYTHONPATH under which `package` cannot be imported (a sitecustomize that hides it)."""
    d = tmp_path / f"hide-{package}"
    d.mkdir()
    (d / "sitecustomize.py").write_text(HIDE.format(name=package))
    return os.pathsep.join([str(d), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])


def test_a_worker_without_a_backend_library_fails_that_row_with_the_install_hint(cluster, tiny, tmp_path):
    """Tasks whose Python cannot find bitsandbytes: the bnb row fails with the install hint, the others
    are measured."""
    from quantscope.harness.ray_run import RayOptions

    path = hiding(tmp_path, "bitsandbytes")
    study = write_study(tmp_path / "study.toml", tiny, formats=("fp32", "bnb-int8", "int8"))
    outcome, said = sweep_on_ray(study, tmp_path / "run", RayOptions(runtime_env={"env_vars": {"PYTHONPATH": path}}))
    rows = {r["format"]: r for r in outcome.records}
    assert rows["bnb-int8"]["error"].startswith("bitsandbytes is not installed: pip install 'quantscope[bnb]'")
    assert "error" not in rows["int8"] and "error" not in rows["fp32"]
    assert "ray: 2 done, 0 running, 0 queued, 1 failed (of 3)" in said


@needs_ray
def test_an_unreachable_cluster_is_one_line_and_exit_2(tiny, tmp_path):
    study = write_study(tmp_path / "study.toml", tiny, formats=("int8",))
    d, text = tiny
    for argv in (["sweep", str(study), "--out", str(tmp_path / "run")],
                 ["compare", "--model", str(d), "--text", str(text), "--ctx", "32", "--windows", "2",
                  "--formats", "int8", "--no-store"]):
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "quantscope.cli", *argv, "--ray", "127.0.0.1:9"], env=env(),
                           capture_output=True, text=True, timeout=120)
        assert_one_line_error(p.returncode, p.stderr, "cannot reach a Ray cluster at 127.0.0.1:9")
        assert time.monotonic() - t0 < 60
    assert not (tmp_path / "run").exists()


def test_without_ray_the_flag_gives_the_install_hint_and_nothing_else_imports_it(tiny, tmp_path):
    study = write_study(tmp_path / "study.toml", tiny, formats=("int8",))
    e = dict(env(), PYTHONPATH=hiding(tmp_path, "ray"))
    p = subprocess.run([sys.executable, "-m", "quantscope.cli", "sweep", str(study), "--ray", "--out",
                        str(tmp_path / "run")], env=e, capture_output=True, text=True, timeout=120)
    assert_one_line_error(p.returncode, p.stderr, "--ray needs Ray, which is not installed: pip install 'quantscope[ray]'")
    assert not (tmp_path / "run").exists()
    p = subprocess.run([sys.executable, "-c", "import sys, quantscope.api, quantscope.cli, quantscope.sweep_measure; "
                        "print('ray' in sys.modules)"], env=env(), capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "False", p.stderr[-1000:]
