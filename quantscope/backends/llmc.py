"""llm-compressor adapter: its GPTQ and AWQ choose the codes; quantscope stores and runs them.

llm-compressor (the quantizer whose compressed-tensors checkpoints vLLM serves) pins transformers
5.17 and compressed-tensors 0.19; installing it beside quantscope would downgrade transformers. So it
normally lives in a virtualenv of its own, named by ``QUANTSCOPE_LLMC_PYTHON`` (that environment's
``python``); when llmcompressor is importable in quantscope's own environment, that is used instead.

The adapter writes the model (safetensors, ``save_pretrained``) and the calibration token ids
(safetensors) to a temporary folder, runs :mod:`quantscope.backends.llmc_worker` in that interpreter,
and reads back, per linear, the integer codes, scales and zero points llm-compressor chose (plus the
norms AWQ rescaled). Only safetensors and JSON cross the process boundary. The codes go into
quantscope's own packed integer layout (the one of ``int4-g64``: packed codes, fp16 scale and zero
per group), so ``weight_bytes``, speed and every later feature are measured exactly as for quantscope's
own GPTQ/AWQ, and the comparison isolates the algorithms. Storing the scales in fp16 (llm-compressor
keeps them in the model's dtype, fp32 here) moves each dequantized weight by at most 2^-11 of its
value; the record reports the largest absolute change (``llmc_max_abs_change``).

Group sizes: llm-compressor refuses a group size that does not divide a layer's input width (576 on
the embedded model for groups of 128), so the ``-g64`` formats exist beside the ``-g128`` ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from quantscope.backends import BackendFormat, external_python
from quantscope.backends._common import (Include, check_divisible, require_selection, select_linears,
                                         walk_storage)
from quantscope.errors import QuantscopeError

WORKER = Path(__file__).with_name("llmc_worker.py")


def version() -> str:
    return external_python("llmcompressor")[1]


def _calib_tensor(calib: list[torch.Tensor] | None, fmt_name: str) -> torch.Tensor:
    if not calib:
        raise QuantscopeError(f"{fmt_name} is calibrated: it needs calibration token sequences")
    lengths = {int(c.numel()) for c in calib}
    if len(lengths) != 1:
        raise QuantscopeError(f"{fmt_name}: calibration sequences must have one length, got {sorted(lengths)}")
    return torch.stack([c.reshape(-1).long() for c in calib])


def run_worker(model_dir: Path, calib_file: Path, out_file: Path, method: str, bits: int, group: int,
               ignore: list[str], threads: int = 0) -> dict:
    """Run the worker in llm-compressor's interpreter; its JSON summary, or QuantscopeError with
    the worker's last error line."""
    python, _ = external_python("llmcompressor")
    cmd = [python, str(WORKER), "--model", str(model_dir), "--calib", str(calib_file), "--method", method,
           "--bits", str(bits), "--group", str(group), "--out", str(out_file), "--threads", str(threads),
           "--ignore", *ignore]
    env = dict(os.environ, PYTHONNOUSERSITE="1", TQDM_DISABLE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode < 0:
        raise QuantscopeError(f"llm-compressor {method} was stopped by signal {-proc.returncode}")
    if proc.returncode != 0 or not out_file.exists():
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "| WARNING" not in ln
                 and "| INFO" not in ln] or [ln for ln in proc.stdout.splitlines() if ln.strip()]
        raise QuantscopeError(f"llm-compressor {method} failed (exit {proc.returncode}): "
                              f"{lines[-1] if lines else 'no output'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def quantize(model: nn.Module, fmt: BackendFormat, include: Include,
             calib: list[torch.Tensor] | None = None) -> nn.Module:
    """Quantize the selected linears of `model` in place through llm-compressor (see the docstring)."""
    from safetensors.torch import load_file, save_file

    from quantscope.formats import integer
    from quantscope.formats.qtensor import QuantizedTensor
    from quantscope.formats.spec import parse_format
    from quantscope.modules.swap import apply_plan

    bits, group, method = int(fmt.option("bits")), int(fmt.option("group_size")), str(fmt.option("method"))
    spec = parse_format(f"int{bits}-g{group}")
    if spec.symmetric:
        raise QuantscopeError(f"internal: {spec.name} is symmetric; the adapter writes zero points")
    ids = _calib_tensor(calib, fmt.name)
    selected = select_linears(model, include)
    require_selection(selected, fmt.name)
    check_divisible(selected, group, f"{fmt.name} (llm-compressor needs groups that divide the width)")
    chosen = {n for n, _ in selected}
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in chosen]
    with tempfile.TemporaryDirectory(prefix="quantscope-llmc-") as tmp:
        tmp = Path(tmp)
        model.save_pretrained(tmp / "model", safe_serialization=True)
        save_file({"input_ids": ids.contiguous()}, str(tmp / "calib.safetensors"))
        t0 = time.perf_counter()
        info = run_worker(tmp / "model", tmp / "calib.safetensors", tmp / "out.safetensors", method, bits,
                          group, ignore, threads=torch.get_num_threads())
        wall = time.perf_counter() - t0
        out = load_file(str(tmp / "out.safetensors"))
    missing = [n for n in chosen if f"{n}.codes" not in out]
    if missing:
        raise QuantscopeError(f"{fmt.name}: llm-compressor left {len(missing)} selected linears "
                              f"unquantized (first: {sorted(missing)[0]})")
    pre, worst = {}, 0.0
    with torch.no_grad():
        for name in chosen:
            codes, scales, zeros = out[f"{name}.codes"], out[f"{name}.scales"], out[f"{name}.zeros"]
            qt = QuantizedTensor(spec, tuple(codes.shape), integer.from_codes(codes, scales, zeros, spec))
            exact = ((codes.float() - zeros.repeat_interleave(group, 1)[:, :codes.shape[1]])
                     * scales.repeat_interleave(group, 1)[:, :codes.shape[1]])
            worst = max(worst, float((qt.dequantize() - exact).abs().max()))
            pre[name] = qt
        for key, value in out.items():
            if key.endswith(".float"):
                model.get_parameter(key.removesuffix(".float")).data.copy_(value)
        apply_plan(model, {n: spec for n in chosen}, precomputed=pre)
    model.quantscope_quantize_seconds = float(info.get("seconds", wall))
    model.quantscope_llmc = {"llmc_method": method, "llmc_versions": {k: info.get(k) for k in (
        "llmcompressor", "compressed_tensors", "transformers")}, "llmc_recipe": info.get("recipe"),
        "llmc_seconds_with_io": wall, "llmc_rescaled": info.get("changed_float", []),
        "llmc_max_abs_change": worst, "llmc_stored_as": spec.name}
    return model


def storage_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """quantscope's own storage: packed codes, scales and zeros (buffers), the other parameters."""
    return walk_storage(model)


def describe(model: nn.Module) -> dict:
    return dict(getattr(model, "quantscope_llmc", {}))
