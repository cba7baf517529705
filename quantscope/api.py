"""The library's entry points; the CLI is one thin module per command over these.

    import quantscope as qs
    lm = qs.load_model()                                   # embedded SmolLM2-135M (FP32 baseline)
    qs.quantize(lm.model, "int4-g128")                     # in place; packed storage, real bytes
    fmt = qs.resolve("gptq-int4-g128")                     # a Format: kind, calibration, storage
    records, meta = qs.compare(qs.CompareConfig(formats=("int8", "nf4"), windows=4))
    decision, target, run_dir = qs.recommend_format(qs.RecommendConfig(max_ppl_increase_pct=2))
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from .harness.config import DEFAULT_FORMATS, CompareConfig
from .harness.generate import GenerateConfig, Generator, load_generator
from .harness.pairing import add_paired_statistics, paired_tasks
from .harness.recommend import RecommendConfig, recommend_format
from .harness.recover import RecoverRunConfig, run_recover
from .harness.recommend import target_and_ladder as recommend_target
from .harness.run import compare, default_run_dir
from .harness.sensitivity import SensitivityConfig
from .harness.sensitivity import run_sensitivity as sensitivity
from .measure.speed import SpeedConfig
from .methods.calibrate import CalibConfig
from .methods.recover_config import RecoverConfig
from .model.load import LoadedModel, load_model
from .quantization import Format, QuantizeOptions, Quantized, resolve
from .quantization import quantize as _quantize
from .results.runs import list_runs, load_run, resolve_run
from .save import SaveConfig, save
from .units import parse_memory

__all__ = ["DEFAULT_FORMATS", "parse_memory", "CompareConfig", "compare", "default_run_dir", "add_paired_statistics", "paired_tasks", "load_model",
           "LoadedModel", "quantize", "quantize_with_report", "resolve", "Format", "QuantizeOptions", "Quantized",
           "CalibConfig", "list_formats", "SpeedConfig", "SensitivityConfig", "sensitivity", "store_sensitivity",
           "RecommendConfig", "recommend_format", "recommend_target", "SaveConfig", "save", "PlanConfig",
           "plan_memory", "list_runs", "load_run", "load_paired_run", "run_sweep", "compare_on_ray", "GenerateConfig", "Generator",
           "load_generator", "RecoverConfig", "RecoverRunConfig", "run_recover"]


def quantize(model: torch.nn.Module, fmt: str | Format, include: Iterable[str] = (), exclude: Iterable[str] = (),
             calib: list[torch.Tensor] | None = None, source: str | None = None,
             calib_config: CalibConfig | None = None) -> torch.nn.Module:
    """Quantize `model` into `fmt` (any own, calibrated, mixed or library format name) and return it
    (the same object for quantscope's own formats). Calibrated formats need `calib`: a list of 1-D
    token-id tensors. llama.cpp formats (`llamacpp-*`) start from the model's GGUF file: `source` is
    the reference `model` was loaded from ('default' or a .gguf path)."""
    return quantize_with_report(model, fmt, include, exclude, calib, source, calib_config).model


def quantize_with_report(model, fmt, include=(), exclude=(), calib=None, source=None, calib_config=None) -> Quantized:
    """As :func:`quantize`, returning the handler's report too (notes, record fields, seconds)."""
    return _quantize(model, fmt, QuantizeOptions(include=tuple(include), exclude=tuple(exclude), calib=calib,
                                                 source=source, calib_config=calib_config))


def list_formats() -> list[dict]:
    """Rows for `quantscope formats`: own formats (examples of each family) and every backend format."""
    from .backends import BACKEND_FORMATS, available
    from .formats.registry import family_of
    from .formats.spec import EXAMPLE_NAMES

    rows = []
    for name in EXAMPLE_NAMES:
        f = resolve(name)
        desc = family_of(f.spec).description
        if f.kind == "calibrated":
            desc = f"{f.spec.method.upper()} calibrated; " + desc
        rows.append({"name": f.name, "backend": "quantscope", "installed": True,
                     "bits_per_weight": 8 * f.storage_bytes(1536, 576) / (1536 * 576),
                     "description": desc + (" (experimental)" if f.spec.experimental else ""), "note": ""})
    for name, b in BACKEND_FORMATS.items():
        ok, reason = available(name)
        rows.append({"name": name, "backend": b.backend, "installed": ok, "bits_per_weight": float(b.nominal_bits),
                     "description": b.description, "note": "" if ok else reason})
    return rows


def format_unavailable(name: str) -> str | None:
    """Why library format `name` cannot run here (with the install hint), or None when it can or is not one."""
    from .backends import BACKEND_FORMATS, available

    if name not in BACKEND_FORMATS:
        return None
    ok, reason = available(name)
    return None if ok else reason


def load_paired_run(ref: str, root: str = "quantscope-runs"):
    """(Run, its records with paired statistics against their baselines), read without writing."""
    run = load_run(resolve_run(ref, root))
    records = [dict(r) for r in run.records]
    add_paired_statistics(records)
    return run, records


def store_sensitivity(run_dir: str, rows: list[dict], meta: dict) -> None:
    """Keep a sensitivity ranking in a run directory (`quantscope report` shows it)."""
    from .results.store import RunStore

    with RunStore.open(run_dir) as store:
        store.update_meta({"sensitivity": [{"layer": r["name"], **r} for r in rows], "sensitivity_meta": meta})


def run_sweep(study_path: str, out: str | None = None, retry_errors: bool = False,
              progress: Callable | None = None, ray=None, say: Callable[[str], None] | None = None):
    """Run a study file resumably: (SweepOutcome, its records with paired statistics).

    `ray` (a :class:`quantscope.harness.ray_run.RayOptions`) measures the cells left to do as tasks on a
    Ray cluster, several at a time, stored under the same keys; `say` receives its progress lines."""
    from .model.load import resolve as resolve_model
    from .sweep import load_study, run_study
    from .sweep_measure import measure_cell

    study = load_study(study_path)
    for f in study.formats:  # fail on a bad name before measuring anything
        resolve(f)
    with contextlib.ExitStack() as stack:
        measure_all = None
        if ray is not None:
            from .harness.ray_run import ray_session
            from .sweep_measure import measure_on_ray

            stack.enter_context(ray_session(ray))  # an unreachable cluster: refused before the run directory
            measure_all = measure_on_ray(ray, say=say)
        outcome = run_study(study, out, measure_cell, retry_errors=retry_errors, progress=progress,
                            fingerprint_fn=lambda m: resolve_model(m)[2], measure_all=measure_all)
    records = [dict(r) for r in outcome.records]
    add_paired_statistics(records)
    return outcome, records


def compare_on_ray(config: CompareConfig, ray, on_record: Callable[[dict], None] | None = None,
                   run_dir: str | None = None, say: Callable[[str], None] | None = None):
    """As :func:`compare`, each format a task on the Ray cluster `ray` (a RayOptions) names."""
    from .harness.ray_compare import compare_on_ray as _on_ray

    return _on_ray(config, ray, on_record=on_record, run_dir=run_dir, say=say)


@dataclass(frozen=True)
class PlanConfig:
    model: str  # a local folder, its config.json, or a Hub id: only config.json is read
    formats: tuple[str, ...] = ("bf16", "fp8-e4m3", "int8", "int4-g128", "nf4", "int3-g128")
    ctx: int = 8192
    batch: int = 1
    kv_dtype: str = "bf16"
    embed_format: str | None = None
    devices: tuple[str, ...] = ()  # extra devices: sizes (24GB) or listed names
    attention: str = "fused"
    framework_overhead: str | None = None  # e.g. 1GiB (the default)


@dataclass
class MemoryPlan:
    config: PlanConfig
    geometry: object
    rows: list
    devices: list
    custom: list
    assumptions: object

    def to_dict(self) -> dict:
        c = self.config
        return {"model": c.model, "ctx": c.ctx, "batch": c.batch, "kv_dtype": c.kv_dtype,
                "assumptions": asdict(self.assumptions), "devices": [asdict(d) for d in self.devices],
                "rows": [r.to_dict() for r in self.rows]}


def plan_memory(config: PlanConfig) -> MemoryPlan:
    """Weights and KV cache (exact, from config.json) and an estimated overhead per format, and the
    listed devices each fits on. Nothing is loaded."""
    from .plan import planner
    from .plan.devices import DEVICES, parse_device
    from .units import parse_memory

    mcfg = planner.load_config(config.model)
    g = planner.geometry(mcfg)
    custom = [parse_device(d) for d in config.devices]
    devices = list(DEVICES) + [d for d in custom if d not in DEVICES]
    default = planner.RuntimeAssumptions.framework_bytes
    assumptions = planner.RuntimeAssumptions(
        framework_bytes=parse_memory(config.framework_overhead) if config.framework_overhead else default,
        attention=config.attention)
    rows = planner.plan(mcfg, config.formats, config.ctx, config.batch, kv_dtype=config.kv_dtype,
                        embed_format=config.embed_format, devices=devices, assumptions=assumptions)
    return MemoryPlan(config, g, rows, devices, custom, assumptions)
