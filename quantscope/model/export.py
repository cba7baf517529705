"""Save a quantized model as a compressed-tensors checkpoint: the format vLLM serves and transformers loads.

Which formats: quantscope's integer formats — round-to-nearest `intN-gG` / `int8`, symmetric or
not, GPTQ and AWQ (their codes live in the same layout), and mixed-precision plans made of them (one
compressed-tensors config group per distinct format). They become compressed-tensors' weight-only
"pack-quantized" scheme (`type: int`, `strategy: group` or `channel`), which vLLM runs with its WNA16
kernels. Formats without an integer grid (NF4/FP4 codebooks, fp8 with quantscope's scaling,
ternary) and the libraries' own formats have no such encoding and are refused by name.

How: every quantized linear goes back to an `nn.Linear` holding its dequantized weight — exactly the
grid points quantscope chose — with compressed-tensors' scheme attached and quantscope's scales and
zero points written into the scheme's parameters; compressed-tensors' own `ModelCompressor` then
quantizes (recovering quantscope's integer codes: each weight is (q - z) * s) and packs, and writes
the `quantization_config` into config.json. Only the mapping from quantscope's storage to
compressed-tensors' scheme is written here; the packing, the file layout and the config are the
library's, so what vLLM expects is what compressed-tensors writes.

Not tested here (no GPU, no vLLM): serving the file with vLLM. vLLM's compressed-tensors WNA16 scheme takes
4- and 8-bit weights; 2- and 3-bit layers are written (the format allows 1-8 bits) with a note saying so.

Limits that come from the format, not from quantscope: compressed-tensors (and vLLM) need whole groups,
so a layer whose input width is not a multiple of the group size (576 inputs with groups of 128, the
embedded SmolLM2) cannot be saved with that group size — the error names a group size that fits.
Quantized embeddings are refused (the tensors that are saved quantized are the linears).

Every checkpoint is verified before it appears: compressed-tensors' decompressor unpacks every layer
under its own config group, every weight is compared with quantscope's (they must be identical), and
transformers rebuilds the model from the file so the logits of a few tokens can be compared with the
in-memory quantized model's; the numbers go in the report and in
`quantscope.json` beside the weights. Files are written into a temporary folder next to the target
and renamed into place only after the check, so a failed or killed save leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import QuantscopeError
from ..fileio import partial_path
from ..modules.qmodules import QuantEmbedding, QuantLinear, TiedQuantHead
from ..modules.swap import set_module

CT_HINT = "pip install 'quantscope[export]' (compressed-tensors)"
PACKED_FORMAT = "pack-quantized"


@dataclass
class SaveReport:
    out: str
    linears: int  # quantized linears written packed
    groups: dict  # compressed-tensors config group -> {"weights": args, "layers": n}
    file_bytes: int  # bytes of the .safetensors files written
    max_weight_diff: float  # max |reloaded weight - quantscope's dequantized weight| over every linear
    max_logit_diff: float  # max |reloaded logits - in-memory logits| on the check tokens
    check_tokens: int
    versions: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@contextlib.contextmanager
def _compress_bar_off():
    """Keep compressed-tensors' "Compressing model" tqdm bar off the terminal, touching nothing else.

    `ModelCompressor.compress_model` has no switch for its bar (`apply_quantization_config` has
    `show_progress`), so for the call only the library module's own `tqdm` name is bound to a
    disabled tqdm, and restored after. stderr itself is left alone: warnings and errors still show."""
    from compressed_tensors.compressors.model_compressors import model_compressor

    bar = getattr(model_compressor, "tqdm", None)
    if bar is None:  # a compressed-tensors laid out differently: its bar is drawn, nothing breaks
        yield
        return
    model_compressor.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        model_compressor.tqdm = bar


def import_ct():
    try:
        import compressed_tensors  # noqa: F401
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                     apply_quantization_config)
    except ImportError:
        raise QuantscopeError(f"saving a compressed-tensors checkpoint needs compressed-tensors: {CT_HINT}") from None
    return ModelCompressor, QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config


def require_integer(spec, where: str = "") -> None:
    """Refuse, in one line, a format that has no compressed-tensors integer encoding."""
    if spec.family != "int" or not 2 <= spec.bits <= 8:
        raise QuantscopeError(f"{where}format '{spec.name}' has no compressed-tensors encoding; saving supports "
                              "integer formats (intN[-gG][-sym], int8, gptq-/awq- and mixed plans of them)")


def refuse_embedding(name: str) -> None:
    raise QuantscopeError(f"saving quantized embeddings is not supported ({name}): quantize the linears only "
                          "(leave out --include embed_tokens)")


def check_out_dir(out: Path) -> None:
    """The checkpoint folder must be new, in an existing folder: nothing is ever overwritten."""
    if out.exists():
        raise QuantscopeError(f"{out} already exists: choose a new folder (nothing is overwritten)")
    if not out.parent.is_dir():
        raise QuantscopeError(f"{out.parent} is not a directory")


def weight_args(spec, in_features: int, layer: str) -> dict:
    """compressed-tensors' weight quantization arguments for one quantscope-quantized linear."""
    require_integer(spec, f"{layer}: ")
    g = spec.group_size
    if g is not None and in_features % g:
        fits = [d for d in (256, 128, 64, 32, 16) if in_features % d == 0]
        hint = f"; group sizes that fit: {', '.join(map(str, fits))}" if fits else ""
        raise QuantscopeError(f"{layer}: {in_features} input columns are not a multiple of the group size {g} of "
                              f"'{spec.name}', and compressed-tensors (like vLLM) needs whole groups{hint}")
    return {"num_bits": spec.bits, "type": "int", "symmetric": bool(spec.symmetric),
            "strategy": "channel" if g is None else "group", "group_size": g}


def _to_compressed_tensors(model: nn.Module) -> tuple[object, dict]:
    """In place: quantscope's quantized linears become `nn.Linear`s carrying compressed-tensors schemes
    whose scales and zero points are quantscope's. Returns (QuantizationConfig, {name: weight})."""
    _, QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_config = import_ct()
    emb = [n for n, m in model.named_modules() if isinstance(m, (QuantEmbedding, TiedQuantHead))]
    if emb:
        refuse_embedding(emb[0])
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not linears:
        raise QuantscopeError("nothing to save: the model has no quantscope-quantized linear layers")
    groups: dict[str, list[str]] = {}
    args_of: dict[str, dict] = {}
    storage, weights = {}, {}
    for name, m in linears:
        args = weight_args(m.spec, m.in_features, name)
        key = json.dumps(args, sort_keys=True)
        groups.setdefault(key, []).append(name)
        args_of[key] = args
        w = m.dequantized_weight()
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        storage[name] = (m.spec, m.storage())
        weights[name] = w
        set_module(model, name, lin)
    config_groups = {f"group_{i}": QuantizationScheme(targets=names, weights=QuantizationArgs(**args_of[k]))
                     for i, (k, names) in enumerate(groups.items())}
    qconfig = QuantizationConfig(config_groups=config_groups, quantization_status="frozen")
    apply_config(model, qconfig, show_progress=False)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (spec, st) in storage.items():
            lin = modules[name]
            scales = st["scales"].float()
            lin.weight_scale.data.copy_(scales.view_as(lin.weight_scale))
            zp = getattr(lin, "weight_zero_point", None)
            if zp is not None:  # signed zero points, as compressed-tensors counts codes from -2^(N-1)
                z = st["zeros"].float() - 2 ** (spec.bits - 1) if "zeros" in st else torch.zeros_like(scales)
                zp.data.copy_(z.to(zp.dtype).view_as(zp))
    return qconfig, weights


def _dense_state(path: Path, weights: dict[str, torch.Tensor] | None = None) -> tuple[dict, float]:
    """Every packed layer of a compressed-tensors checkpoint unpacked by compressed-tensors' own
    decompressor under its config group's scheme, plus the file's other tensors: (state dict of the
    dense model, max difference from `weights` where given).

    (transformers' own dequantizing loader would be the shorter path, but transformers 5.24 applies one
    group's scheme to every layer of a checkpoint with several config groups — a mixed-precision plan —
    and fails; so the layers are decompressed here, each under its own scheme.)"""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors import safe_open

    cfg = json.loads((path / "config.json").read_text())
    qcfg = cfg.get("quantization_config") or {}
    compressor = BaseCompressor.get_value_from_registry(qcfg["format"])
    scheme_of = {}
    for g in qcfg["config_groups"].values():
        scheme = QuantizationScheme.model_validate(g)
        scheme_of.update({t: scheme for t in scheme.targets})
    by_module: dict[str, dict[str, torch.Tensor]] = {}  # module name -> {parameter name: tensor}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                mod, _, param = k.rpartition(".")
                by_module.setdefault(mod, {})[param] = h.get_tensor(k)
    state, worst = {}, 0.0
    packed = [m for m, params in by_module.items() if "weight_packed" in params or "weight_scale" in params]
    for name in (weights if weights is not None else packed):
        scheme = _scheme_for(name, scheme_of)
        if scheme is None:
            raise QuantscopeError(f"{path}: layer {name} is in no config group of the checkpoint")
        got = compressor.decompress(by_module.pop(name, {}), scheme)
        dense = got["weight"].float()
        if weights is not None:
            if dense.shape != weights[name].shape:
                raise QuantscopeError(f"internal: {name} came back with shape {tuple(dense.shape)}, "
                                      f"not {tuple(weights[name].shape)}")
            worst = max(worst, float((dense - weights[name]).abs().max()))
        state[name + ".weight"] = dense
        if "bias" in got:
            state[name + ".bias"] = got["bias"]
    state.update({f"{mod}.{param}": t for mod, params in by_module.items() for param, t in params.items()})
    return state, worst


def _scheme_for(name: str, scheme_of: dict):
    """A layer's scheme: its own name among the targets (quantscope writes those), else a `re:` pattern
    or the class name `Linear` (llm-compressor's targets)."""
    import re

    if name in scheme_of:
        return scheme_of[name]
    for target, scheme in scheme_of.items():
        if target.startswith("re:") and re.match(target[3:], name) or target == "Linear":
            return scheme
    return None


def _rebuild(path: Path, state: dict):
    """The dense model of a compressed-tensors checkpoint, from config.json (its quantization_config
    dropped) and the decompressed state."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .quiet import quiet_loading as _quiet

    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    with _quiet():
        back = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = back.load_state_dict(state, strict=False)
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and k.startswith("lm_head.")}
    if set(missing) - tied or unexpected:
        raise QuantscopeError(f"the saved checkpoint does not match the model: missing {sorted(set(missing) - tied)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    return back.eval()


def dense_copy(path: Path, dest: Path) -> None:
    """Write the dense (dequantized, float32) model of the compressed-tensors checkpoint `path` to the
    new folder `dest`, with its tokenizer: a saved checkpoint measured like any model."""
    import_ct()
    from .quiet import quiet_loading as _quiet

    state, _ = _dense_state(path)
    model = _rebuild(path, state)
    with _quiet():
        model.save_pretrained(dest, safe_serialization=True)
    for f in path.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, dest / f.name)


def _verify(path: Path, weights: dict[str, torch.Tensor], ids: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """Read the checkpoint back as a serving engine does (every packed layer unpacked by compressed-tensors,
    the dense model rebuilt by transformers). Returns (max weight difference, max logit difference)."""
    state, worst = _dense_state(path, weights)
    back = _rebuild(path, state)
    with torch.no_grad():
        logits = back(input_ids=ids.unsqueeze(0), use_cache=False).logits[0].float()
    return worst, float((logits - want).abs().max())


def save_compressed_tensors(model: nn.Module, tokenizer, out: str | os.PathLike, check_ids: torch.Tensor,
                            provenance: dict) -> SaveReport:
    """Write `model` (quantized by quantscope, modified in place) as a compressed-tensors checkpoint at
    `out`, a folder that must not exist yet; verify it against the in-memory model on `check_ids`."""
    import importlib.metadata as md

    ModelCompressor = import_ct()[0]
    out = Path(out)
    check_out_dir(out)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=check_ids.unsqueeze(0), use_cache=False).logits[0].float()
    qconfig, weights = _to_compressed_tensors(model)
    tmp = partial_path(out)
    tmp.mkdir()  # (mkdir, not mkdtemp: the folder gets the user's usual permissions)
    try:
        compressor = ModelCompressor.from_pretrained_model(model, PACKED_FORMAT)
        from .quiet import quiet_loading as _quiet

        with _quiet(), _compress_bar_off():
            compressor.compress_model(model)
            model.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        try:
            wdiff, ldiff = _verify(tmp, weights, check_ids, want)
        except QuantscopeError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise QuantscopeError(f"the checkpoint could not be read back ({type(e).__name__}: {first}): not written") from None
        if wdiff != 0.0:
            raise QuantscopeError(f"the saved checkpoint does not reproduce quantscope's weights (max |Δ| {wdiff:.3g}): "
                                  "not written")
        groups = {g: {"weights": s.weights.model_dump(include={"num_bits", "type", "symmetric", "strategy", "group_size"}),
                      "layers": len(s.targets)} for g, s in qconfig.config_groups.items()}
        versions = {p: md.version(p) for p in ("compressed-tensors", "transformers", "torch")}
        odd = sorted({v["weights"]["num_bits"] for v in groups.values()} - {4, 8})
        notes = [f"{'/'.join(map(str, odd))}-bit layers: a valid compressed-tensors file, but vLLM's WNA16 kernels "
                 "take 4- and 8-bit weights only"] if odd else []
        report = SaveReport(out=str(out), linears=len(weights), groups=groups,
                            file_bytes=sum(f.stat().st_size for f in tmp.glob("*.safetensors")),
                            max_weight_diff=wdiff, max_logit_diff=ldiff, check_tokens=int(check_ids.numel()),
                            versions=versions, notes=notes)
        (tmp / "quantscope.json").write_text(json.dumps({**provenance, "checkpoint": report.as_dict()}, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
