"""Save a quantized model as a GGUF file that llama.cpp (and Ollama, LM Studio) runs.

Which formats (see :mod:`quantscope.model.gguf_blocks` for the block layouts): quantscope's own
integer formats whose grid is a GGUF block type — symmetric int8 -> Q8_0, symmetric int4 -> Q4_0,
asymmetric int4 -> Q4_1, with groups of 32 or any multiple of 32 (or one per row) — written with
quantscope's own codes and scales, so GPTQ / AWQ / mixed plans on those grids run their calibrated
codes on llama.cpp's kernels. Tensors the format leaves unquantized (norms, the token embedding unless
``--include embed_tokens`` quantizes it too, any excluded linear) are F32, as quantscope's baseline
holds them. ``llamacpp-*`` formats are llama.cpp's
own file, copied out (:func:`copy_llamacpp`). Everything else is refused by name, with the list.

Metadata and tokenizer come from the source model (:mod:`quantscope.model.gguf_meta`), tensors are
added through gguf-py's `GGUFWriter` as raw block bytes. The file is assembled at a hidden partial
path beside the target, verified (:mod:`quantscope.model.gguf_check`: gguf-py reads back identical
codes and scales; transformers' GGUF loader rebuilds the model, whose logits must match the
in-memory quantized model's), and only then renamed into place; a failure, a full disk or a kill
leaves no file (a killed save's partial is removed by the next save).
"""

from __future__ import annotations

import errno
import importlib.metadata as md
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import QuantscopeError
from ..fileio import partial_path
from ..modules.qmodules import QuantEmbedding, QuantLinear, TiedQuantHead
from . import gguf_blocks as gb
from . import gguf_meta

SAVABLE = ("int8[-gG]-sym / int8 -> Q8_0, int4[-gG]-sym -> Q4_0, int4[-gG] -> Q4_1 (G a multiple of 32), "
           "their gptq-/awq-/awq+gptq- variants, mixed- plans of them, and llamacpp-* formats")
_FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1"}


@dataclass
class GGUFReport:
    out: str
    gguf_types: dict  # GGUF tensor type -> how many tensors of it the file holds
    file_bytes: int
    quantized: int  # tensors written as quantscope's blocks
    readback_identical: bool | None  # gguf-py read back every tensor bit for bit as written (None: llama.cpp wrote it)
    exact: bool  # every block type written reproduces quantscope's weights exactly (Q8_0 / Q4_0)
    max_weight_diff: float  # max |GGUF weight - quantscope's weight| (0 when exact; Q4_1's fp16 minimum)
    max_logit_diff: float  # transformers-reloaded logits vs the in-memory quantized model's
    kld: float  # mean KL(quantscope's model || reloaded file) per token, nats
    check_tokens: int
    source: str = "quantscope"  # quantscope (own codes) | llama.cpp (llamacpp-* copied out)
    versions: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def is_gguf_path(out) -> bool:
    return str(out).lower().endswith(".gguf")


def refuse(name: str, why: str = "") -> None:
    raise QuantscopeError(f"'{name}' cannot be saved as GGUF{why}; formats that can: {SAVABLE}")


def require_gguf_format(fmt, parts) -> None:
    """Refuse, before loading anything, a format with no GGUF block type."""
    if fmt.kind == "library":
        if fmt.backend != "llama.cpp":
            refuse(fmt.name, f" (it is made by {fmt.backend})")
        return
    for p in parts:
        if gb.gguf_type(p.spec) is None:
            refuse(fmt.name if p.name == fmt.name else f"{fmt.name}' (its part '{p.name}'",
                   "" if p.name == fmt.name else ")")


def check_out_file(out: Path) -> None:
    """The GGUF file must be new, in an existing folder this process can write: nothing is overwritten."""
    if out.exists():
        raise QuantscopeError(f"{out} already exists: choose a new file name (nothing is overwritten)")
    parent = out.parent
    if not parent.is_dir():
        raise QuantscopeError(f"{parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QuantscopeError(f"cannot write into {parent} (permission denied)")


def check_geometry(model: nn.Module, names) -> None:
    """GGUF blocks cover 32 inputs: every selected linear's width (an embedding's row) must be a multiple of 32."""
    mods = dict(model.named_modules())
    for n in names:
        m = mods[n]
        width = m.embedding_dim if isinstance(m, nn.Embedding) else m.in_features
        if width % gb.BLOCK:
            raise QuantscopeError(f"{n}: {width} input columns are not a multiple of 32, the GGUF block")


@dataclass
class _Tensor:
    name: str  # GGUF name
    blocks: gb.Blocks | None = None  # quantized
    array: np.ndarray | None = None  # F32
    want: torch.Tensor | None = None  # quantscope's dequantized weight in GGUF row order


def _plan(model: nn.Module, config) -> list[_Tensor]:
    """Every tensor of the file: quantscope's quantized linears (and a quantized token embedding, whose
    rows are blocks the same way: llama.cpp looks rows up in Q8_0/Q4_0/Q4_1, and a tied head reads it as
    the output) as blocks, every other parameter F32."""
    arch, permute = gguf_meta.arch_of(config)
    namer = gguf_meta.tensor_namer(arch, config.num_hidden_layers)
    emb = [n for n, m in model.named_modules() if isinstance(m, (QuantEmbedding, TiedQuantHead))]
    plan, inside = [], set()
    for name, m in model.named_modules():
        if not isinstance(m, (QuantLinear, QuantEmbedding)):
            continue  # (a TiedQuantHead is its embedding: not written, as a float tied head is not)
        hf = name + ".weight"
        width = m.qshape[1]
        if gb.gguf_type(m.spec) is None or width % gb.BLOCK:
            refuse(m.spec.name, f" ({name}: {width} inputs)")
        blocks = gb.from_storage(m.storage(), m.spec, m.qshape)
        want = m.dequantized_weight().float()
        perm = gguf_meta.qk_permutation(hf, config) if permute else None
        if perm is not None:
            blocks, want = gb.permute_rows(blocks, perm), want[torch.from_numpy(perm)]
        plan.append(_Tensor(namer(hf), blocks=blocks, want=want))
        inside.add(hf)
        if getattr(m, "bias", None) is not None:
            inside.add(name + ".bias")
            plan.append(_Tensor(namer(name + ".bias"), array=_f32(m.bias, name + ".bias", config, permute)))
    for hf, p in model.named_parameters():  # tied weights appear once (the embedding)
        if hf not in inside and not hf.startswith(tuple(f"{n}." for n in emb)):
            plan.append(_Tensor(namer(hf), array=_f32(p, hf, config, permute)))
    return plan


def _f32(t: torch.Tensor, hf: str, config, permute: bool) -> np.ndarray:
    a = t.detach().to("cpu", torch.float32).numpy()
    perm = gguf_meta.qk_permutation(hf, config) if permute else None
    return np.ascontiguousarray(a if perm is None else a[perm])


def _write(path: Path, plan: list[_Tensor], config, tokenizer, name: str, pre: str, provenance: dict) -> None:
    import gguf

    arch, _ = gguf_meta.arch_of(config)
    types = Counter(t.blocks.qtype for t in plan if t.blocks is not None)
    ftype = getattr(gguf.LlamaFileType, _FILE_TYPES[types.most_common(1)[0][0]]) if types else gguf.LlamaFileType.ALL_F32
    writer = gguf_meta.writer(path, arch)
    try:
        gguf_meta.write_hparams(writer, config, name, int(ftype))
        gguf_meta.write_tokenizer(writer, tokenizer, config, pre)
        writer.add_string("quantscope.provenance", json.dumps(provenance, default=str))
        for t in plan:
            if t.blocks is not None:
                writer.add_tensor(t.name, gb.to_bytes(t.blocks), raw_dtype=gguf.GGMLQuantizationType[t.blocks.qtype])
            else:
                writer.add_tensor(t.name, t.array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def save_gguf(model: nn.Module, tokenizer, config, out: str | os.PathLike, check_ids: torch.Tensor,
              provenance: dict, source_gguf: Path | None = None) -> GGUFReport:
    """Write `model` (quantized by quantscope) to the new file `out` and verify it against the
    in-memory model on `check_ids` before it appears."""
    from . import gguf_check

    out = Path(out)
    check_out_file(out)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=check_ids.unsqueeze(0), use_cache=False).logits[0].float()
    plan = _plan(model, config)
    pre = (gguf_meta.source_pre_tokenizer(source_gguf) if source_gguf else None) or "default"
    tmp = partial_path(out)
    try:
        try:
            _write(tmp, plan, config, tokenizer, provenance.get("model", "model"), pre, provenance)
        except OSError as e:
            why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise QuantscopeError(f"could not write {out}: {why}; nothing was written") from None
        gguf_check.read_back(tmp, plan)
        got = gguf_check.reload_logits(tmp, check_ids)
        kld, ldiff = gguf_check.compare_logits(want, got)
        deltas = [gb.weight_delta(t.blocks, t.want) for t in plan if t.blocks is not None]
        wdiff = max(deltas, default=0.0)
        types = Counter(t.blocks.qtype if t.blocks is not None else "F32" for t in plan)
        exact = "Q4_1" not in types
        if exact and wdiff != 0.0:
            raise QuantscopeError(f"internal: the GGUF blocks do not reproduce quantscope's weights (max |Δ| {wdiff:.3g})")
        gguf_check.require_match(kld, ldiff)
        notes = [] if exact else [f"Q4_1 stores the group minimum -zero*scale in fp16, which rounds: codes and "
                                  f"scales are quantscope's, weights differ by up to {wdiff:.2g}"]
        report = GGUFReport(out=str(out), gguf_types=dict(types), file_bytes=tmp.stat().st_size,
                            quantized=sum(t.blocks is not None for t in plan), readback_identical=True, exact=exact,
                            max_weight_diff=wdiff, max_logit_diff=ldiff, kld=kld, check_tokens=int(check_ids.numel()),
                            versions={p: md.version(p) for p in ("gguf", "transformers", "torch")}, notes=notes)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return report


def copy_llamacpp(fmt, source: str | None, out: str | os.PathLike, check_ids: torch.Tensor, threads: int,
                  model: nn.Module | None = None, calib: list[torch.Tensor] | None = None) -> GGUFReport:
    """A ``llamacpp-*`` format: llama.cpp's own quantizer writes the file (from the F32 copy of the
    source GGUF, as the format's comparison row runs it; an ``-imatrix`` format with the importance
    matrix of `model`, the baseline, on `calib`); transformers must reload it, and its logits must
    match llama.cpp's on the same tokens."""
    from ..backends import llamacpp
    from . import gguf_check

    out = Path(out)
    check_out_file(out)
    spec = fmt.spec
    src = llamacpp.gguf_source(source)
    if src is None:
        raise QuantscopeError(f"{fmt.name}: llama.cpp formats need a GGUF source model (the embedded default or a .gguf)")
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        raise QuantscopeError(f"llama-cpp-python failed to import ({e}); {spec.install_hint}") from None
    tmp = partial_path(out)
    try:
        base = llamacpp.f32_gguf(src)
        ftype = str(spec.option("ftype"))
        try:
            if ftype == "F32":
                import shutil

                shutil.copyfile(base, tmp)
            else:
                llamacpp.make_file(spec, model, calib, base, tmp, threads)
        except OSError as e:
            why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise QuantscopeError(f"could not write {out}: {why}; nothing was written") from None
        if not tmp.is_file():
            raise QuantscopeError(f"llama.cpp wrote no file for {fmt.name}; nothing was written")
        lm = llamacpp.LlamaCppLM(tmp, max(64, int(check_ids.numel())), threads, llamacpp.tensor_types(tmp))
        try:
            with torch.no_grad():
                want = lm(check_ids.unsqueeze(0)).logits[0].float()
        finally:
            lm._llm.close()
        got = gguf_check.reload_logits(tmp, check_ids)
        # reported, not required to be ~0: llama.cpp rounds activations to 8 bits in its quantized dot
        # products, which transformers' reload (float activations) does not
        kld, ldiff = gguf_check.compare_logits(want, got)
        imatrix = " with its importance matrix" if dict(spec.options).get("imatrix") else ""
        report = GGUFReport(out=str(out), gguf_types=dict(lm.types), file_bytes=tmp.stat().st_size, quantized=0,
                            readback_identical=None, exact=False, max_weight_diff=float("nan"), max_logit_diff=ldiff,
                            kld=kld, check_tokens=int(check_ids.numel()), source="llama.cpp",
                            versions={"llama-cpp-python": llamacpp.version(), "gguf": md.version("gguf")},
                            notes=[f"llama.cpp's own {ftype} file{imatrix} (its quantizer, its tensor mix); the check "
                                   "compares transformers' reload of it with llama.cpp's logits"])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return report
