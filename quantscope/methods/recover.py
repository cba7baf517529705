"""Accuracy recovery on a quantized model: quantize, put LoRA adapters on it, train them, and hand back
one of three outcomes, each then measured like a format.

    recovered = recover_model(model, spec, tokens, folder, quantize_base=..., requantize_calibrated=...)

- ``adapter`` (``<format>+lora``): the adapters kept beside the frozen quantized base (QLoRA serving;
  their bytes count in the row);
- ``merged`` (``<format>+lora-merged``): each adapter merged into its layer's dequantized weight and
  the sum requantized in the same format: round-to-nearest for quantscope's own formats and bnb, the
  base's calibrated method again (GPTQ/AWQ on the training tokens) for gptq-/awq- bases;
- ``merged-rtn`` (calibrated bases only): the merge rounded to nearest on the same grid.

The model passed in is the unquantized baseline (the harness's copy of it): it is quantized here by
the base format's own handler (`quantize_base`), after the baseline's log-probabilities on the held-out
rows are taken and, for distillation or LoftQ, a copy of it kept. Training state lives in
`folder/<format>-<key>/` (see :mod:`quantscope.methods.lora_train`): the rows of one `recover`
(adapter and merged) share one training, and a killed one resumes there.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..fileio import write_json_atomic
from ..placement import module_device
from . import lora
from .lora_train import log_probs, heldout_kld, train, training_rows
from .recover_config import RecoverSpec


@dataclass
class Recovered:
    model: nn.Module
    record: dict  # the record's `recover` field
    notes: list[str] = field(default_factory=list)


def training_folder(root: str | os.PathLike, spec: RecoverSpec, tokens: torch.Tensor, model: nn.Module,
                    selection: tuple = ()) -> Path:
    """One folder per (base format, training settings, training tokens, dtype, layer selection)."""
    h = hashlib.sha256(json.dumps([spec.base, spec.config.training_key(), str(_dtype(model)), list(selection)])
                       .encode())
    h.update(tokens.cpu().numpy().tobytes())
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.base)
    return Path(root) / f"{safe}+lora-{h.hexdigest()[:16]}"


def _dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def recover_model(model: nn.Module, spec: RecoverSpec, tokens: list[torch.Tensor], root: str | os.PathLike,
                  quantize_base: Callable[[nn.Module], tuple[nn.Module, list[str]]],
                  requantize_calibrated: Callable[[nn.Module], list[str]] | None = None,
                  selection: tuple = (), progress: Callable[[str, int, int], None] | None = None) -> Recovered:
    """Quantize `model` (the baseline) with `quantize_base`, train LoRA adapters on `tokens` and return
    the `spec.outcome`. `requantize_calibrated(model)` re-runs a calibrated base's method on the merged
    float layers (None: the base rounds to nearest)."""
    cfg = spec.config
    with lora.quiet_peft():
        lora.import_peft()  # not installed: the hint before anything is quantized
    rows, held = training_rows(tokens, cfg.seqlen)
    folder = training_folder(root, spec, torch.cat([t.reshape(-1) for t in tokens]), model, selection)
    dev = module_device(model)
    model.eval()
    with torch.no_grad():  # the baseline's view of the held-out rows, before it is quantized
        held_ref = [log_probs(model, r[None].to(dev))[0, :-1].cpu() for r in held]
    keep = copy.deepcopy(model) if cfg.objective == "distill" or cfg.init == "loftq" else None
    notes = [f"LoRA training: {len(rows)} sequences of {cfg.seqlen} tokens from the training text"
             + (f", {len(held)} held out for the logged KLD" if len(held) else " (too short to hold any out)")]
    model, base_notes = quantize_base(model)
    notes.extend(base_notes)
    names = lora.target_layers(model, cfg, spec.base)
    with lora.quiet_peft():
        lora.inject(model, cfg, names)
    loftq_stats = None
    if cfg.init == "loftq":
        loftq_stats = _loftq(model, keep, cfg, folder)
        if cfg.objective != "distill":
            keep = None
            gc.collect()
    tick = None if progress is None else (lambda done, total: progress(f"{spec.name}: training (step {done})", done, total))
    result = train(model, rows, cfg, teacher=keep, heldout=held, heldout_ref=held_ref, folder=folder, progress=tick)
    del keep
    gc.collect()
    rec = {"base": spec.base, "outcome": spec.outcome, "config": cfg.to_dict(), "training_folder": str(folder),
           "adapted_layers": len(names), "trainable_params": sum(p.numel() for p in lora.adapter_parameters(model)),
           "adapter_bytes": lora.adapter_bytes(model), "train_rows": len(rows), "heldout_rows": len(held),
           "train_tokens": int(rows.numel()), **result.to_dict()}
    if loftq_stats:
        rec["loftq"] = loftq_stats
    if result.resumed_from:
        notes.append(f"LoRA training resumed from its checkpoint at step {result.resumed_from} in {folder}")
    if spec.outcome != "adapter":
        old = lora.merge(model)
        if spec.outcome == "merged" and requantize_calibrated is not None:
            notes.extend(requantize_calibrated(model))
            how = "requantized with the base's calibrated method"
        else:
            lora.requantize_rtn(model, old)
            how = "requantized by round-to-nearest in the same format"
        notes.append(f"adapters merged into the dequantized weights of {len(old)} layers and {how}")
        rec["heldout_kld_merged"] = heldout_kld(model, held, held_ref)
    return Recovered(model.eval(), rec, notes)


def _loftq(model: nn.Module, baseline: nn.Module, cfg, folder: Path) -> dict:
    """LoftQ's base and adapters: read back from the training folder, or computed and stored there
    (own formats; a bnb base is recomputed, which gives the same result)."""
    from safetensors.torch import load_file, save_file

    path = folder / "loftq_init.safetensors"
    layers = lora.lora_layers(model)
    own = all(isinstance(layer.base_layer, lora.QuantLinear) for layer in layers.values())
    if own and path.is_file() and (folder / "loftq.json").is_file():
        state = load_file(str(path))
        lora.load_base_state(model, {k[5:]: v for k, v in state.items() if k.startswith("base.")})
        lora.load_adapter_state(model, {k[8:]: v for k, v in state.items() if k.startswith("adapter.")})
        return json.loads((folder / "loftq.json").read_text())
    mods = dict(baseline.named_modules())
    weights = {n: mods[n].weight.data for n in layers}
    stats = lora.loftq_init(model, weights, cfg)
    if own:
        folder.mkdir(parents=True, exist_ok=True)
        state = {**{f"base.{k}": v.cpu() for k, v in lora.base_state(model).items()},
                 **{f"adapter.{k}": v.cpu() for k, v in lora.adapter_state(model).items()}}
        tmp = folder / f".loftq_init.partial-{os.getpid()}"
        save_file(state, str(tmp))
        os.replace(tmp, path)
        write_json_atomic(folder / "loftq.json", stats)
    return stats
