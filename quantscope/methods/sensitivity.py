"""Layer sensitivity: the KL divergence that quantizing one layer (or one decoder block) alone causes.

For each *unit* -- one selected module, or with ``unit="block"`` the selected linears of one decoder
block -- the unit alone is quantized with round-to-nearest into the format, the model scores the token
windows, and the per-token KL(reference || quantized) against the unquantized model is averaged.
Units are ranked most sensitive first. A tied embedding and ``lm_head`` are one tensor and one unit.

No copy of the model is made: each unit's quantized modules are built once (with
:func:`quantscope.modules.swap.apply_plan`, so tied weights are handled exactly as everywhere else),
then swapped in for a forward pass and the original modules swapped back.

Loop order and memory. The outer loop runs over the windows, the inner over (format, unit) probes.
A window's reference log-probabilities ([tokens, vocab] float32; 256 x 49,152 x 4 B = 50 MB for
SmolLM2) are computed once and reused by every probe, and only one window's are alive at a time, so
memory does not grow with the number of windows. The quantized modules of every probe are kept for
the whole scan: together about the size of the model quantized into each format once (for int4 about
1/7 of the fp32 linears), which is cheaper than quantizing every unit again for every window.
The KL formula is the one of :func:`quantscope.evaluate.perplexity.score_windows`; it is repeated here
because that function recomputes the reference for every call, which would double the cost of a scan.

Replaying the unchanged blocks. A probe changes nothing before its unit's first decoder block, so the
reference pass records every block's output for the window and a probe replays the blocks before its
unit from that record instead of computing them again (a probe of the last block, or of an untied
``lm_head``, computes only what follows). The record is [tokens, hidden] per block and window
(256 x 576 x 4 B x 30 blocks = 18 MB for SmolLM2). A probe of block b skips b of the blocks, so a
scan over every layer skips about half of the decoder's work (the head and the softmax still run
for every probe); the result is the same tensor operations on the same inputs, so the KLDs are
identical (tested against ``replay=False``). It relies only on the decoder blocks being called in order, each
once per forward, which a hook checks: any other call pattern falls back to the full forward.

Results can be cached on disk (:class:`SensitivityCache`), keyed by the model's fingerprint, the exact
window tokens, the format, the units and the quantscope version: a scan of 200 layers costs minutes on
a CPU, and mixed-precision allocations at several budgets over the same ladder need the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import QuantscopeError
from ..formats.registry import storage_bytes
from ..formats.spec import FormatSpec
from ..modules.names import block_index, block_names, block_prefix
from ..modules.swap import apply_plan, select_modules, set_module, tied_pairs
from ..modules.qmodules import reference_products
from ..placement import module_device

UNITS = ("layer", "block")


@dataclass(frozen=True)
class Unit:
    """What is quantized at once: one module (with its tied head), or one decoder block's modules."""

    name: str  # a module name, or a block prefix such as "model.layers.3"
    modules: tuple[str, ...]  # module names quantized together (a tied head follows its embedding)


def embedding_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the input embedding and the output head (both, even when tied)."""
    targets = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        m = getattr(model, getter, lambda: None)()
        if m is not None:
            targets.append(m)
    return tuple(n for n, m in model.named_modules() if any(m is t for t in targets))


def sensitivity_units(model: nn.Module, unit: str = "layer", include: Iterable[str] = (),
                      exclude: Iterable[str] = (), include_embeddings: bool = False) -> list[Unit]:
    """The units of a scan, in model order. The modules are those of
    :func:`~quantscope.modules.swap.select_modules` (plus the embedding and head when asked)."""
    if unit not in UNITS:
        raise QuantscopeError(f"--unit must be one of {', '.join(UNITS)}, not {unit!r}")
    extra = embedding_names(model) if include_embeddings else ()
    names = select_modules(model, tuple(include) + extra, tuple(exclude))
    heads = tied_pairs(model)  # tied head -> its embedding
    units: dict[str, list[str]] = {}
    for name in names:
        if name in heads and heads[name] in names:
            continue  # joins its embedding's unit below
        key = (block_prefix(name) if unit == "block" else None) or name
        units.setdefault(key, []).append(name)
        units[key] += [h for h, e in heads.items() if e == name and h in names]
    return [Unit(k, tuple(v)) for k, v in units.items()]


def unit_size(model: nn.Module, unit: Unit, fmt: FormatSpec) -> tuple[int, int]:
    """(parameters, stored bytes in `fmt`) of a unit; a tied head shares its embedding's weight."""
    params = nbytes = 0
    seen = set()
    for name in unit.modules:
        w = model.get_submodule(name).weight
        if w.data_ptr() in seen:
            continue
        seen.add(w.data_ptr())
        params += w.numel()
        nbytes += storage_bytes(fmt, *w.shape)
    return params, nbytes


def rtn_spec(fmt) -> FormatSpec:
    if not isinstance(fmt, FormatSpec) or fmt.calibrated:
        name = getattr(fmt, "name", fmt)
        raise QuantscopeError(f"sensitivity quantizes with round-to-nearest: '{name}' is not a quantscope "
                              "round-to-nearest format (use e.g. int4-g128, nf4, int8)")
    return fmt


def _put(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Set each named submodule; returns the modules that were there."""
    old = {}
    for name, new in modules.items():
        old[name] = model.get_submodule(name)
        set_module(model, name, new)
    return old


def _quantized_modules(model: nn.Module, unit: Unit, fmt: FormatSpec) -> dict[str, nn.Module]:
    """The unit's modules quantized into `fmt`, built by apply_plan and taken out of the model again."""
    originals = {n: model.get_submodule(n) for n in unit.modules}
    with torch.no_grad():
        apply_plan(model, {n: fmt for n in unit.modules})
    quantized = {n: model.get_submodule(n) for n in unit.modules}
    _put(model, originals)
    return quantized


def _log_probs(model: nn.Module, ids: torch.Tensor, score_from: int) -> torch.Tensor:
    logits = model(input_ids=ids.to(module_device(model)).unsqueeze(0), use_cache=False).logits[0].float()
    return torch.log_softmax(logits[score_from - 1:-1], dim=-1)


def first_block(model: nn.Module, unit: Unit, blocks: Sequence[str]) -> int:
    """The first decoder block whose computation a probe of `unit` changes: the lowest block holding
    one of its modules; len(blocks) for a unit that is only the output head; 0 for anything else."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    first = len(blocks)
    for name in unit.modules:
        b = block_index(name)
        if b is not None and b < len(blocks):
            first = min(first, b)
        elif head is None or model.get_submodule(name) is not head:
            return 0  # the embedding (or anything outside the blocks): everything after it changes
    return first


class _Replay(nn.Module):
    """Stands in for a decoder block: returns the output the block gave in the reference pass."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


def _record_blocks(model: nn.Module, blocks: Sequence[str], ids: torch.Tensor, score_from: int):
    """The reference log-probabilities and each block's output ([] if a block ran other than once)."""
    outputs: dict[int, list] = {i: [] for i in range(len(blocks))}
    hooks = [model.get_submodule(n).register_forward_hook(lambda _m, _a, out, i=i: outputs[i].append(out))
             for i, n in enumerate(blocks)]
    try:
        ref = _log_probs(model, ids, score_from)
    finally:
        for h in hooks:
            h.remove()
    once = all(len(v) == 1 for v in outputs.values())
    return ref, [outputs[i][0] for i in range(len(blocks))] if once else []


@dataclass(frozen=True)
class SensitivityCache:
    """Scan results on disk, one JSON file per (model, windows, format, units, version)."""

    directory: Path
    model_key: str  # identifies the weights: e.g. the model fingerprint and dtype

    def _path(self, windows: torch.Tensor, fmt: FormatSpec, units: Sequence[Unit], score_from: int) -> Path:
        from .. import __version__

        h = hashlib.sha256()
        for part in (self.model_key, fmt.name, str(score_from), __version__,
                     json.dumps([[u.name, list(u.modules)] for u in units]), str(tuple(windows.shape))):
            h.update(part.encode() + b"\0")
        h.update(windows.to(torch.int64).numpy().tobytes())
        return Path(self.directory) / f"{h.hexdigest()[:32]}.json"

    def get(self, windows, fmt, units, score_from) -> list[dict] | None:
        p = self._path(windows, fmt, units, score_from)
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None  # absent or unreadable: measure again

    def put(self, windows, fmt, units, score_from, rows: list[dict]) -> None:
        from ..fileio import write_json_atomic

        write_json_atomic(self._path(windows, fmt, units, score_from), rows)


@reference_products()
def measure_sensitivity(model: nn.Module, windows: torch.Tensor, formats: Sequence[FormatSpec],
                        units: Sequence[Unit], score_from: int = 1, cache: SensitivityCache | None = None,
                        progress: Callable[[int, int], None] | None = None,
                        replay: bool = True) -> dict[str, list[dict]]:
    """{format name: rows} for every format and unit, each row ``{"name", "modules", "format",
    "params", "bytes", "kld", "kld_stderr"}`` in unit order (not ranked). Windows: a [n, ctx] LongTensor.
    ``replay`` reuses the reference pass's block outputs before each unit (same result, less work)."""
    formats = [rtn_spec(f) for f in dict.fromkeys(formats)]
    if not units:
        raise QuantscopeError("no modules to scan: the selection is empty")
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise QuantscopeError(f"sensitivity windows must be [n >= 1, ctx >= 2] token ids, got {tuple(windows.shape)}")
    if not 1 <= score_from < windows.shape[1]:
        raise QuantscopeError("score_from must be in [1, ctx)")
    out: dict[str, list[dict]] = {}
    todo = []
    for f in formats:
        hit = cache.get(windows, f, units, score_from) if cache else None
        if hit is not None:
            out[f.name] = hit
        else:
            todo.append(f)
    if not todo:
        return out
    model.eval()
    probes = [(f, u, _quantized_modules(model, u, f)) for f in todo for u in units]
    kld: dict[tuple[str, str], list[np.ndarray]] = {(f.name, u.name): [] for f, u, _ in probes}
    total, done = len(windows) * (1 + len(probes)), 0
    blocks = block_names(model) if replay else []
    start = {u.name: first_block(model, u, blocks) for u in units}
    with torch.inference_mode():
        for w in windows:
            ref, recorded = _record_blocks(model, blocks, w, score_from)
            p_ref = ref.exp()
            done += 1
            for f, u, quantized in probes:
                swap = dict(quantized)
                if recorded:
                    swap.update({blocks[i]: _Replay(recorded[i]) for i in range(start[u.name])})
                old = _put(model, swap)
                try:
                    logp = _log_probs(model, w, score_from)
                finally:
                    _put(model, old)
                k = logp.neg_().add_(ref).mul_(p_ref).sum(-1).clamp_min(0)  # p_ref (ref - logp), in place
                kld[(f.name, u.name)].append(k.cpu().numpy().astype(np.float64))
                done += 1
                if progress is not None:
                    progress(done, total)
            del ref, p_ref, recorded
    for f in todo:
        rows = []
        for u in units:
            k = np.concatenate(kld[(f.name, u.name)])
            params, nbytes = unit_size(model, u, f)
            rows.append({"name": u.name, "modules": list(u.modules), "format": f.name, "params": params,
                         "bytes": nbytes, "kld": float(k.mean()),
                         "kld_stderr": float(k.std(ddof=1) / math.sqrt(len(k))) if len(k) > 1 else float("nan")})
        out[f.name] = rows
        if cache:
            cache.put(windows, f, units, score_from, rows)
    return {f.name: out[f.name] for f in formats}


def layer_sensitivity(model: nn.Module, windows: torch.Tensor, fmt: FormatSpec, unit: str = "layer",
                      include: Iterable[str] = (), exclude: Iterable[str] = (), include_embeddings: bool = False,
                      score_from: int = 1, cache: SensitivityCache | None = None,
                      progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Rank units by the mean per-token KL divergence that quantizing each alone into `fmt` causes.

    Returns ``[{"name", "modules", "format", "params", "bytes", "kld", "kld_stderr"}]``, most sensitive
    first. ``bytes`` is the unit's stored size in `fmt`; ``kld_stderr`` treats tokens as independent
    (they are not, within a window: read it as a lower bound)."""
    units = sensitivity_units(model, unit, include, exclude, include_embeddings)
    rows = measure_sensitivity(model, windows, [rtn_spec(fmt)], units, score_from, cache, progress)[fmt.name]
    return sorted(rows, key=lambda r: -r["kld"])


# ---------------------------------------------------------------- the command's pipeline
