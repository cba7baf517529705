"""llama.cpp itself: the baseline written to GGUF, quantized by llama.cpp, evaluated by its kernels.

The path a llama.cpp / ollama / LM Studio user takes, measured under quantscope's protocol:

1. the source GGUF (the embedded model's, or the user's ``.gguf``) is rewritten with every tensor
   dequantized to F32 by gguf-py, the same dequantization transformers applies when it loads the
   file, so llama.cpp starts from exactly quantscope's baseline weights (cached, built atomically);
2. ``llama_model_quantize`` (llama.cpp's own quantizer, through llama-cpp-python) makes the requested
   type (``-imatrix`` formats: with llama.cpp's importance matrix of the baseline on the calibration
   text, :mod:`quantscope.backends.llamacpp_imatrix`): its per-tensor mixes (Q4_K_M keeps some attn_v / ffn_down at Q6_K) and its fallbacks for rows
   whose width is not a multiple of 256 (576 on the embedded model) are llama.cpp's, not ours. The
   token embedding is kept at F32 so the same tensors are quantized as in every other row of the
   table (decoder linears only; the tied output head is the embedding);
3. the quantized file is loaded by ``llama_cpp.Llama`` and wrapped in :class:`LlamaCppLM`, an
   ``nn.Module`` whose ``forward`` feeds the harness's token ids to llama.cpp (no re-tokenisation, no
   BOS added, as for the torch rows) and returns its logits, so perplexity, KL divergence against the
   torch baseline, tasks and the prefill/decode loop all run llama.cpp's CPU kernels.

``weight_bytes`` is the bytes of every tensor in the quantized GGUF file (read with gguf-py), i.e.
llama.cpp's own storage. Written by hand because no library exposes llama.cpp's quantizer and
evaluator as a torch model. llama-cpp-python has no wheel for this machine: ``pip install
llama-cpp-python`` compiles llama.cpp (about 10 minutes on 2 cores), hence an optional extra outside
``[all]``. Only GGUF-sourced models are supported: writing a Hugging Face folder to GGUF is llama.cpp's
``convert_hf_to_gguf.py``, which is not part of any pip package.

Build note: llama-cpp-python's default build compiles for the build machine (``-march=native``). On
this workplace's virtual machines the CPU reports AMX but executing AMX tile instructions raises
SIGILL (ggml's AMX kernels serve Q4_0/Q4_1/Q8_0 weights), so build without AMX:
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" pip install llama-cpp-python``. A worker that dies
this way is a row with the signal, not a crashed comparison.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from quantscope.backends import BackendFormat
from quantscope.backends._common import Include, select_linears
from quantscope.errors import QuantscopeError

# the llama_ftype constant of llama-cpp-python for each format's `ftype` option
FTYPES = {"F32": "LLAMA_FTYPE_ALL_F32", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
          "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K", "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
          "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
          "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL"}


def version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def gguf_source(ref: str | None) -> Path | None:
    """The GGUF file a model reference comes from: the embedded model's, a ``.gguf`` path, or None."""
    from quantscope.model.load import embedded_gguf_path

    if ref in (None, "", "default"):
        return embedded_gguf_path()
    p = Path(ref).expanduser()
    return p if p.suffix == ".gguf" and p.is_file() else None


def write_f32_gguf(src: Path, dest: Path) -> None:
    """Copy `src` to `dest` with every tensor dequantized to F32 (metadata and tokenizer unchanged).

    Written to a temporary file and renamed, so a killed run never leaves a partial file."""
    import gguf

    from quantscope.model.gguf_meta import writer as gguf_writer

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    writer = gguf_writer(tmp, arch)  # (empty arrays too: the merges of a BPE with none)
    try:
        for field in reader.fields.values():
            if field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE) \
                    or field.name.startswith("GGUF."):
                continue
            vtype = field.types[0]
            sub = None
            if vtype == gguf.GGUFValueType.ARRAY:  # the reader lists no item type for an empty array: its header has it
                sub = field.types[-1] if len(field.types) > 1 else gguf.GGUFValueType(int(field.parts[3][0]))
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for t in reader.tensors:
            data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            writer.add_tensor(t.name, np.ascontiguousarray(data))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def f32_gguf(src: Path) -> Path:
    """The cached F32 copy of `src` (built on first use)."""
    from quantscope.fileio import sha256_file
    from quantscope.model.load import cache_root

    dest = cache_root() / "llamacpp" / f"{src.stem}-{sha256_file(src)[:16]}-F32.gguf"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_f32_gguf(src, dest)
    return dest


def quantize_file(src_f32: Path, dest: Path, ftype: str, threads: int, imatrix: dict | None = None) -> None:
    """llama.cpp's quantizer: `src_f32` to `dest` in llama_ftype `ftype`, token embedding kept F32;
    with `imatrix` ({GGUF tensor name: per-column importance}, see llamacpp_imatrix) as its
    importance matrix."""
    import logging

    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # not a line per tensor on stderr
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[ftype])
    params.nthread = threads
    params.token_embedding_type = llama_cpp.GGML_TYPE_F32
    params.output_tensor_type = llama_cpp.GGML_TYPE_F32
    alive = None
    if imatrix:
        from .llamacpp_imatrix import as_c_array

        params.imatrix, alive = as_c_array(imatrix)
    rc = llama_cpp.llama_model_quantize(str(src_f32).encode(), str(dest).encode(), params)
    del alive  # the quantizer has copied the importance matrix
    if rc != 0 or not dest.is_file():
        raise QuantscopeError(f"llama.cpp could not quantize {src_f32.name} to {ftype} (code {rc})")


class LlamaCppLM(nn.Module):
    """A llama.cpp model behind the slice of the transformers forward API the harness uses.

    ``forward(input_ids [B, T], attention_mask=None, use_cache=False, cache=None, logits_to_keep=0)``
    returns an object with ``logits`` [B, T or logits_to_keep, vocab] (float32) and ``cache``. Rows
    are evaluated one after another from an empty KV cache (right padding is dropped by the mask).
    With ``use_cache`` the returned cache is a marker of llama.cpp's own KV cache: passing it back
    with one new token continues the sequence (the decode loop of the speed measurement)."""

    def __init__(self, path: Path, n_ctx: int, threads: int, types: dict[str, int]):
        super().__init__()
        self.path, self.threads, self.types = path, threads, types
        self.quantscope_quantize_seconds: float | None = None
        self._llm = None
        self._n_ctx = 0
        self._open(n_ctx)

    def _open(self, n_ctx: int) -> None:
        import llama_cpp

        if self._llm is not None:
            self._llm.close()
        self._llm = None
        self._llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx,
                                    n_ubatch=min(n_ctx, 512), n_threads=self.threads,
                                    n_threads_batch=self.threads, logits_all=True, verbose=False)
        self._n_ctx = n_ctx
        # freed before interpreter teardown: llama-cpp-python's own finalizer fails once its
        # module globals are gone (a TypeError printed at every worker's exit)
        atexit.register(self._llm.close)

    def _ensure_ctx(self, n: int) -> None:
        if n > self._n_ctx:
            self._open(1 << (n - 1).bit_length())  # grow to the next power of two

    def _run(self, tokens: list[int], continue_from: int | None) -> np.ndarray:
        llm = self._llm
        if continue_from is None:
            self._ensure_ctx(len(tokens))
            llm = self._llm
            llm.reset()
        elif continue_from != llm.n_tokens:
            raise QuantscopeError("internal: llama.cpp KV cache out of step with the caller's cache")
        elif llm.n_tokens + len(tokens) > self._n_ctx:
            raise QuantscopeError(f"llama.cpp context of {self._n_ctx} tokens exceeded")
        start = llm.n_tokens
        llm.eval(tokens)
        return llm.scores[start:llm.n_tokens]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = False, cache=None, logits_to_keep: int = 0, **_ignored):
        ids = input_ids.tolist()
        if cache is not None and len(ids) != 1:
            raise QuantscopeError("llama.cpp: a KV cache continues one sequence at a time")
        lengths = [len(r) for r in ids] if attention_mask is None else attention_mask.sum(1).tolist()
        width = len(ids[0])
        keep = width if not logits_to_keep else min(int(logits_to_keep), width)
        out = torch.zeros(len(ids), keep, self._llm.n_vocab(), dtype=torch.float32)
        for b, (row, n) in enumerate(zip(ids, lengths)):
            scores = self._run(row[:n], None if cache is None else cache.n_tokens)
            full = torch.from_numpy(np.array(scores, dtype=np.float32))  # [n, vocab], a copy
            lo = width - keep  # logits of padded positions stay zero (never read)
            if n > lo:
                out[b, : n - lo] = full[lo:n]
        marker = SimpleNamespace(n_tokens=self._llm.n_tokens) if use_cache else None
        return SimpleNamespace(logits=out, cache=marker, past_key_values=marker)


def _check_selection(model: nn.Module, include: Include, name: str) -> int:
    """llama.cpp quantizes every 2-D weight of the decoder: the selection must be exactly that."""
    linears = select_linears(model, lambda n, m: True)
    inside = {n for n, _ in linears if ".layers." in f".{n}"}
    chosen = {n for n, m in linears if include(n, m)}
    embeds = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and include(n, m)]
    if chosen != inside or embeds:
        raise QuantscopeError(f"{name}: llama.cpp quantizes every decoder linear and keeps the embedding; "
                              "--include/--exclude cannot change that for llamacpp-* formats")
    return len(inside)


def quantize(model: nn.Module, fmt: BackendFormat, include: Include,
             calib: list[torch.Tensor] | None = None, source: str | None = None,
             n_ctx: int = 512) -> nn.Module:
    """The llama.cpp model of `fmt` for the baseline `model` (which it replaces: the torch weights
    are not used past the selection check). `source` is the model reference the baseline came from."""
    _check_selection(model, include, fmt.name)
    src = gguf_source(source)
    if src is None:
        raise QuantscopeError(f"{fmt.name}: llama.cpp formats need a GGUF source model (the embedded "
                              "default or a .gguf file); convert a Hugging Face folder with llama.cpp's "
                              "convert_hf_to_gguf.py first")
    try:
        import llama_cpp  # noqa: F401 - fail here, with the hint, not in the middle of the work
    except ImportError as e:
        raise QuantscopeError(f"llama-cpp-python failed to import ({e}); {fmt.install_hint}") from None
    threads = torch.get_num_threads()
    base = f32_gguf(src)
    ftype = str(fmt.option("ftype"))
    if ftype == "F32":
        path, secs = base, 0.0
    else:
        work = Path(tempfile.mkdtemp(prefix="quantscope-llamacpp-"))
        atexit.register(shutil.rmtree, work, True)
        path = work / f"{base.stem.removesuffix('-F32')}-{ftype}.gguf"
        t0 = time.perf_counter()
        make_file(fmt, model, calib, base, path, threads)
        secs = time.perf_counter() - t0
    lm = LlamaCppLM(path, n_ctx, threads, tensor_types(path))
    lm.quantscope_quantize_seconds = secs
    return lm


def make_file(fmt: BackendFormat, model: nn.Module, calib: list[torch.Tensor] | None, base: Path, dest: Path,
              threads: int) -> None:
    """`fmt`'s file at `dest`, quantized by llama.cpp from the F32 file `base` (which holds `model`'s
    weights); an ``-imatrix`` format first computes the importance matrix of `model` on `calib`."""
    imatrix = None
    if dict(fmt.options).get("imatrix"):
        from .llamacpp_imatrix import importance_matrix

        if not calib:
            raise QuantscopeError(f"{fmt.name} is calibrated (llama.cpp's importance matrix): pass calibration text")
        imatrix = importance_matrix(model, calib, base)
    quantize_file(base, dest, str(fmt.option("ftype")), threads, imatrix)


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type the file holds (llama.cpp's per-tensor mix)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def storage_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor of the GGUF file llama.cpp runs, as stored (memory-mapped, not copied)."""
    import warnings

    import gguf

    if not isinstance(model, LlamaCppLM):
        raise QuantscopeError("internal: not a llama.cpp model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the memmap is read-only
        for t in gguf.GGUFReader(str(model.path)).tensors:
            yield torch.from_numpy(np.asarray(t.data).reshape(-1).view(np.uint8))


def describe(model: nn.Module) -> dict:
    """Record fields: llama.cpp's per-tensor type mix in the file it ran."""
    return {"gguf_tensor_types": dict(model.types)} if isinstance(model, LlamaCppLM) else {}
