"""Issue 19 benchmark: examples/study.toml measured locally and on a local Ray cluster with 2 workers.

    flock -x /work/cpu.lock python benchmarks/ray_sweep.py [--study examples/study.toml] [--modes recompute,share]

The same study three ways, each into a fresh run directory: the local sweep (one cell after another,
each in a spawned worker with torch's default threads), then on a Ray instance started here with 2 CPUs
(2 tasks at a time, 1 CPU and 1 torch thread each), once per way of handing the baseline's reference to
the tasks (`recompute`: every task computes it beside its format; `share`: one baseline task, its
log-probabilities through the object store). Prints and writes (benchmarks/results/ray_sweep.json) the
wall time of each and its ratio to the local one, every format's perplexity / KLD / peak RSS per way
with the largest difference from the local figures, and each task's declared memory (the planner's
estimate) beside the peak RSS it measured. The machine has 2 cores: 2 Ray workers can at best halve
the time, and only when each core is free.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from _common import ROOT, write

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the Ray instance stays on loopback

FIGS = ("perplexity", "kld_mean", "kld_p99", "top1_agreement", "bits_per_weight", "weight_bytes")


def timed_sweep(study: str, out: Path, ray=None) -> tuple[float, list[dict]]:
    from quantscope.api import run_sweep

    t0 = time.perf_counter()
    outcome, records = run_sweep(study, str(out), ray=ray, say=lambda line: print("  " + line, flush=True),
                                 progress=lambda i, n, m, f, t, s: print(f"  [{i}/{n}] {f}", flush=True))
    assert outcome.measured == len(records), "a benchmark run must start from an empty run directory"
    return time.perf_counter() - t0, records


def declared_memory(study_path: str) -> dict[str, int | None]:
    """The memory each cell's Ray task declares (recompute mode: a reference copy beside the format)."""
    from dataclasses import replace

    from quantscope.harness.ray_run import memory_estimate
    from quantscope.sweep import eval_spec_for, load_study, text_fingerprint
    from quantscope.sweep_measure import cell_job

    study = load_study(study_path)
    spec = eval_spec_for(study, study.texts[0], text_fingerprint(study.texts[0]))
    out, inputs = {}, None
    for f in study.formats:
        job, inputs = cell_job(study.models[0], f, spec, inputs)
        out[f] = memory_estimate(replace(job, ref_mode="local"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default=str(ROOT / "examples" / "study.toml"))
    ap.add_argument("--modes", default="recompute,share")
    ap.add_argument("--object-store", type=int, default=2 * 2**30, help="bytes (the share mode's reference fits)")
    args = ap.parse_args()
    import ray

    from quantscope.harness.ray_run import RayOptions

    tmp = Path(tempfile.mkdtemp(prefix="ray_sweep-"))
    result = {"study": os.path.relpath(args.study, ROOT), "machine": {"cpus": os.cpu_count(), "processor": platform.processor()}, "runs": {}}
    try:
        print("local sweep", flush=True)
        local_s, local = timed_sweep(args.study, tmp / "local")
        result["runs"]["local"] = {"seconds": local_s, "records": local}
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=args.object_store, log_to_driver=False)
        result["ray_start_seconds"] = time.perf_counter() - t0
        try:
            for mode in args.modes.split(","):
                print(f"Ray, 2 workers, reference={mode}", flush=True)
                secs, recs = timed_sweep(args.study, tmp / mode, RayOptions(reference=mode))
                result["runs"][mode] = {"seconds": secs, "records": recs}
        finally:
            ray.shutdown()
        result["declared_memory_bytes"] = declared_memory(args.study)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(result)
    print(f"\nwrote {write('ray_sweep', result)}")
    return 0


def report(result: dict) -> None:
    runs = result["runs"]
    local = {r["format"]: r for r in runs["local"]["records"]}
    tokens = next(iter(local.values())).get("tokens_scored")
    print(f"\n{result['study']}: {len(local)} formats, {tokens} tokens scored per format; "
          f"Ray start {result['ray_start_seconds']:.1f} s (not in the wall times)")
    print(f"{'run':<10} {'wall s':>8} {'local/this':>10}  max |diff| vs local (ppl, KLD)")
    result["summary"] = {}
    for name, run in runs.items():
        recs = {r["format"]: r for r in run["records"]}
        diff = {f: max(abs((recs[k].get(f) or 0) - (local[k].get(f) or 0)) for k in local) for f in FIGS}
        ratio = runs["local"]["seconds"] / run["seconds"]
        result["summary"][name] = {"seconds": run["seconds"], "speedup_vs_local": ratio, "max_abs_diff": diff}
        print(f"{name:<10} {run['seconds']:8.1f} {ratio:10.2f}  {diff['perplexity']:.3g}, {diff['kld_mean']:.3g}")
    print(f"\n{'format':<10} {'ppl':>9} {'KLD':>8} {'RSS local':>10} " +
          " ".join(f"{'RSS ' + n:>14}" for n in runs if n != "local") + f" {'declared':>9}")
    mem = result["declared_memory_bytes"]
    for f, r in local.items():
        rss = " ".join(f"{next(x for x in runs[n]['records'] if x['format'] == f)['peak_rss_bytes'] / 2**20:11.0f} MiB"
                       for n in runs if n != "local")
        print(f"{f:<10} {r['perplexity']:9.4f} {r['kld_mean']:8.5f} {r['peak_rss_bytes'] / 2**20:6.0f} MiB {rss} "
              f"{(mem[f] or 0) / 2**20:5.0f} MiB")


if __name__ == "__main__":
    raise SystemExit(main())
