"""Sweeps and comparisons on a two-node Ray cluster on loopback (`ray.cluster_utils.Cluster`, one CPU per
node, shared by the module): tasks spread over both nodes, `compare --ray` gives the local figures with the
reference recomputed per task or shared through the object store, and a task no single node can hold
is refused although the cluster has the CPUs in total."""

from __future__ import annotations

import os

import pytest

from quantscope.errors import QuantscopeError

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback (see test_ray.py)
ray = pytest.importorskip("ray")

from test_ray import FIGURES, sweep_on_ray, tiny, write_study  # noqa: E402,F401  (tiny: the fixture)


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 150 * 2**20}
    c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        c.add_node(**node)
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def test_a_sweep_spreads_over_both_nodes(two_nodes, tiny, tmp_path):
    study = write_study(tmp_path / "study.toml", tiny, formats=("fp32", "int8"))
    outcome, said = sweep_on_ray(study, tmp_path / "run")
    assert outcome.measured == 2 and not any("error" in r for r in outcome.records)
    assert len({r["ray"]["node_id"] for r in outcome.records}) == 2
    assert "ray: 2 done, 0 running, 0 queued, 0 failed (of 2)" in said


def test_compare_on_ray_gives_the_local_figures_with_either_reference(two_nodes, tiny, tmp_path):
    """`compare --ray`: the figures of a local comparison (which serves the baseline's log-probabilities to
    each worker) whether each task recomputes the reference or reads it from the object store."""
    from quantscope.api import CompareConfig, compare, compare_on_ray
    from quantscope.harness.ray_run import RayOptions
    from quantscope.results.runs import load_run

    d, text = tiny
    cfg = CompareConfig(model=str(d), text=str(text), formats=("fp32", "int4-g32"), ctx=32, windows=2,
                        measure_speed=False)
    local, _ = compare(cfg, run_dir=str(tmp_path / "local"))
    for mode in ("recompute", "share"):
        said = []
        records, meta = compare_on_ray(cfg, RayOptions(reference=mode), run_dir=str(tmp_path / mode), say=said.append)
        assert [r["format"] for r in records] == ["fp32", "int4-g32"]
        for got, want in zip(records, local):
            assert "error" not in got and got["ray"]["attempt"] == 1
            for f in FIGURES:
                assert got[f] == pytest.approx(want[f], rel=1e-6, abs=1e-9), (mode, got["format"], f)
        assert sorted(load_run(tmp_path / mode).keys) == sorted(load_run(tmp_path / "local").keys)
        again, _ = compare_on_ray(cfg, RayOptions(reference=mode), run_dir=str(tmp_path / mode))
        assert all(r.get("reused") for r in again)


def test_a_task_no_single_node_can_hold_is_refused(two_nodes, tiny, tmp_path):
    from quantscope.harness.ray_run import RayOptions

    study = write_study(tmp_path / "study.toml", tiny, formats=("int8",))
    with pytest.raises(QuantscopeError, match=r"format int8 needs 2 CPU, 0 GPU, .*the largest has 1 CPU"):
        sweep_on_ray(study, tmp_path / "run", RayOptions(cpus=2))
