"""Model size vs peak RSS vs tokens scored per second, in memory and streamed (`compare --stream`).

    python benchmarks/scale.py [--models embedded,llama-1b,llama-7b] [--keep]

Each run is one `quantscope compare --no-isolate --no-store --no-speed` in a child process, so the
child's peak RSS (``RUSAGE_CHILDREN``) is the run's. Rows:

- the embedded SmolLM2-135M (fp32 baseline), in memory and streamed;
- a synthetic Llama-3.2-1B-shaped model (bf16 shards, fp32 baseline), in memory and streamed;
- a synthetic Llama-2-7B-shaped model (bf16 shards, ~13.5 GB; ~27 GB in fp32, more than this machine's
  memory): the issue's command, ``--dtype bf16 --stream --formats bf16,int8,int4-g128 --windows 2``; in
  memory it does not fit (the planner's estimate is printed instead).

For every streamed run the planner's prediction (`plan --stream`) is printed beside the measured peak.
Synthetic models are written to --work and deleted afterwards unless --keep. Their accuracy figures
mean nothing (random weights); their bytes, memory and time are real. Writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORMATS = "int8,int4-g128"


def _run(cmd: list[str]) -> tuple[int, str, int]:
    """(exit code, stderr, peak RSS in bytes) of one child: wait4 reports that child's own peak."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return proc.returncode, err.read(), usage.ru_maxrss * 1024


def run_compare(model: str, dtype: str, stream: bool, formats: str, windows: int, ctx: int) -> dict:
    """One comparison in a fresh child; its records, wall time and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        cmd = [sys.executable, "-m", "quantscope.cli", "compare", "--model", model, "--dtype", dtype,
               "--formats", formats, "--windows", str(windows), "--ctx", str(ctx), "--no-speed", "--no-isolate",
               "--no-store", "--stream" if stream else "--no-stream", "--json", str(out), "--quiet"]
        t0 = time.perf_counter()
        code, err, peak = _run(cmd)
        wall = time.perf_counter() - t0
        if code != 0:
            return {"error": (err.strip().splitlines() or ["?"])[-1], "wall_s": wall}
        records = json.loads(out.read_text())
    tokens = sum(r["tokens_scored"] for r in records)
    return {"wall_s": wall, "peak_rss_bytes": peak, "records": records, "tokens_scored": tokens,
            "tokens_per_s": tokens / wall, "weight_bytes": records[0]["weight_bytes"],
            "rows": {r["format"]: {k: r.get(k) for k in ("perplexity", "kld_mean", "weight_bytes", "eval_seconds",
                                                         "quantize_seconds")} for r in records}}


def plan_stream(model: str, dtype: str, formats: str, windows: int, ctx: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "quantscope.cli", "plan", model, "--stream", "--dtype", dtype,
                           "--formats", formats, "--windows", str(windows), "--ctx", str(ctx), "--json", "-"],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-7b,embedded,llama-1b")
    ap.add_argument("--work", default=None, help="where synthetic models are written (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic models")
    ap.add_argument("--windows", type=int, default=2, help="evaluation windows per run (the issue's 7B command: 2)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="quantscope-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for name in args.models.split(","):
            if name == "embedded":
                # the dequantized cache, built before any timing, in a child: a parent that loaded the model
                # itself would pass its RSS on to every later child's ru_maxrss at fork (measure.memory)
                subprocess.run([sys.executable, "-c", "from quantscope.model.load import load_model; "
                                "load_model('default')"], check=True, stdout=subprocess.DEVNULL)
                model, settings = "default", [("fp32", False, "fp32," + FORMATS), ("fp32", True, "fp32," + FORMATS)]
            else:
                model = str(work / name)
                if not (work / name / "config.json").is_file():
                    subprocess.run([sys.executable, str(HERE / "synthetic_model.py"), "--shape", name, "--out", model,
                                    "--dtype", "bf16"], check=True)
                if name == "llama-7b":
                    settings = [("bf16", True, "bf16," + FORMATS)]
                else:
                    settings = [("fp32", False, "fp32," + FORMATS), ("fp32", True, "fp32," + FORMATS)]
            windows, ctx = args.windows, args.ctx
            for dtype, stream, formats in settings:
                print(f"{name}: {'streamed' if stream else 'in memory'} ({dtype}, {formats}, {windows}x{ctx}) ...",
                      file=sys.stderr, flush=True)
                res = run_compare(model, dtype, stream, formats, windows, ctx)
                row = {"model": name, "mode": "streamed" if stream else "in memory", "dtype": dtype, "formats": formats,
                       "windows": windows, "ctx": ctx, **{k: v for k, v in res.items() if k != "records"}}
                try:
                    plan = plan_stream(model, dtype, formats, windows, ctx)
                except subprocess.CalledProcessError as e:
                    row["plan_error_message"] = (e.stderr or "").strip().splitlines()[-1:]
                    plan = None
                if plan is not None:
                    row["planned_stream_peak_bytes"] = plan["total_bytes"]
                    row["planned_in_memory_bytes"] = plan["in_memory_bytes"]
                    if stream and "peak_rss_bytes" in row:
                        row["plan_error"] = plan["total_bytes"] / row["peak_rss_bytes"] - 1
                        row["plan_within_20pct"] = abs(row["plan_error"]) <= 0.20  # the bar
                row["load_average"] = os.getloadavg()[0]  # above the cpu count: the timings were contended
                rows.append(row)
                _save(args.out, rows)  # after every row: a run stopped part-way keeps what it measured
                print(json.dumps({k: v for k, v in row.items() if k != "rows"}), file=sys.stderr, flush=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    gib = lambda n: f"{n / 2**30:.2f}" if n else "-"  # noqa: E731
    print(f"{'model':<10} {'mode':<10} {'dtype':<5} {'weights GiB':>11} {'peak RSS GiB':>12} {'planned GiB':>11} "
          f"{'err':>6} {'tok/s':>8} {'wall s':>7}")
    for r in rows:
        err = f"{100 * r['plan_error']:+.0f}%" + ("" if r["plan_within_20pct"] else "!") if "plan_error" in r else "-"
        planned = r.get("planned_stream_peak_bytes") if r["mode"] == "streamed" else None
        print(f"{r['model']:<10} {r['mode']:<10} {r['dtype']:<5} {gib(r.get('weight_bytes')):>11} "
              f"{gib(r.get('peak_rss_bytes')):>12} {gib(planned):>11} {err:>6} {r.get('tokens_per_s', 0):>8.1f} "
              f"{r['wall_s']:>7.0f}" + (f"  ERROR {r['error']}" if r.get("error") else ""))
    if any(not r.get("plan_within_20pct", True) for r in rows):
        print("! the plan is more than 20% off the measured peak", file=sys.stderr)
        return 1
    return 0


def _save(path: str, rows: list[dict]) -> None:
    from quantscope.fileio import write_json_atomic

    write_json_atomic(path, {"machine": os.uname().machine, "cpu_count": os.cpu_count(), "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
