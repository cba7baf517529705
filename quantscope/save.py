"""`quantscope save`: quantize a model into one format and write a checkpoint that serving engines load.

Load -> (calibrate on the head of a text) -> quantize -> write compressed-tensors (see
:mod:`quantscope.model.export` for the format, its limits and the check made before anything appears),
or, when `--out` ends in ``.gguf``, a GGUF file for llama.cpp (:mod:`quantscope.model.gguf_export`).
Bad input — unknown format, a format with no compressed-tensors encoding, an existing output folder,
a missing model — fails with one line before the model is loaded where it can.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .errors import QuantscopeError
from .quantization import Format, own_parts, resolve


@dataclass(frozen=True)
class SaveConfig:
    format: str  # a quantscope integer format: intN[-gG][-sym], int8, gptq-..., awq-..., mixed-... of them
    out: str  # the checkpoint folder to create, or a FILE.gguf (must not exist: nothing is overwritten)
    model: str = "default"  # as for compare: 'default' (embedded SmolLM2), a HF folder, a Hub id, a .gguf
    calib: str = "python-docs"  # calibration text of GPTQ/AWQ/mixed-auto: its head is used
    calib_samples: int = 128
    calib_seqlen: int = 512
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    threads: int | None = None
    trust_remote_code: bool = False
    # where the model is quantized (GPTQ/AWQ on a GPU are much faster) and the dtype of the tensors left
    # unquantized: as for compare (quantscope.placement); the checkpoint is written from the CPU
    device: str = "auto"
    dtype: str = "auto"
    check_tokens: int = 64  # tokens of the text whose logits are compared after reloading the checkpoint

    def __post_init__(self):
        from .logs import check_threads

        check_threads(self.threads)
        if self.calib_samples < 1 or self.calib_seqlen < 2:
            raise QuantscopeError("--calib-samples must be >= 1 and --calib-seqlen >= 2")
        if self.check_tokens < 2:
            raise QuantscopeError("--check-tokens must be at least 2")


def _integer_formats(fmt: Format) -> list[Format]:
    """The own formats `fmt` quantizes layers into (a mixed plan's ladder or parts), or a one-line refusal."""
    from .model.export import require_integer

    if fmt.kind == "library":
        raise QuantscopeError(f"'{fmt.name}' is made by {fmt.backend}: save it with that library; quantscope "
                              "saves its own integer formats as compressed-tensors checkpoints")
    parts = own_parts(fmt)
    for p in parts:
        require_integer(p.spec)
    return parts


def _check_geometry(model, fmt: Format, include, exclude, gguf: bool = False) -> None:
    """Every selected linear must take the format's groups whole: refuse before minutes of quantizing."""
    from torch import nn

    from .model.export import refuse_embedding, weight_args
    from .modules.swap import select_modules

    mods = dict(model.named_modules())
    names = select_modules(model, include, exclude)
    if gguf:
        from .model.gguf_export import check_geometry

        return check_geometry(model, names)
    emb = [n for n in names if isinstance(mods[n], nn.Embedding)]
    if emb:
        refuse_embedding(emb[0])
    for part in _integer_formats(fmt):
        for n in names:
            weight_args(part.spec, mods[n].in_features, n)


def save(config: SaveConfig):
    """Quantize `config.model` into `config.format` and write it to `config.out`; returns a SaveReport."""
    from pathlib import Path

    from .fileio import remove_stale_partials
    from .logs import torch_threads
    from .model.export import check_out_dir, import_ct
    from .model.gguf_export import check_out_file, is_gguf_path, require_gguf_format

    fmt = resolve(config.format)
    out = Path(config.out)
    if is_gguf_path(out):
        require_gguf_format(fmt, [] if fmt.kind == "library" else own_parts(fmt))
        check_out_file(out)  # before minutes of loading and quantizing
    else:
        _integer_formats(fmt)
        import_ct()  # the install hint before minutes of loading and quantizing
        check_out_dir(out)
    stale = remove_stale_partials(out)  # what a save killed with -9 left beside `out`
    with torch_threads(config.threads):
        report = _save(config, fmt, out)
    report.notes.extend(f"removed {name} ({size / 1e6:.1f} MB), left by an earlier save that was killed"
                        for name, size in stale)
    return report


def _save(config: SaveConfig, fmt: Format, out):
    from . import __version__
    from .evaluate.text import load_text, tokenize
    from .harness.preparation import calibration_head
    from .model.export import save_compressed_tensors
    from .model.load import load_model
    from .quantization import QuantizeOptions, quantize

    from .model.gguf_export import is_gguf_path

    gguf = is_gguf_path(out)
    lm = load_model(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code,
                    device=config.device)
    if fmt.kind != "library":
        _check_geometry(lm.model, fmt, config.include, config.exclude, gguf)
    text = load_text(config.calib)
    ids = tokenize(lm.tokenizer, text.text)
    calib = None
    provenance = {"format": fmt.name, "model": lm.info.name, "model_ref": config.model,
                  "model_fingerprint": lm.info.fingerprint, "include": list(config.include),
                  "exclude": list(config.exclude), "quantscope": __version__,
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notes": list(lm.info.notes)}
    if fmt.needs_calibration:
        calib = calibration_head(ids, text.name, config.calib_samples, config.calib_seqlen, same_text=False).tokens
        provenance["calibration"] = {"text": text.name, "text_sha256": text.sha256, "samples": int(calib.shape[0]),
                                     "seqlen": config.calib_seqlen}
    check = ids[: config.check_tokens]
    if len(check) < 2:
        raise QuantscopeError(f"{text.name} has fewer than 2 tokens: nothing to check the saved model on")
    if fmt.kind == "library":  # llamacpp-*: llama.cpp's own file (require_gguf_format let nothing else through)
        import torch

        from .model.gguf_export import copy_llamacpp

        return copy_llamacpp(fmt, config.model, out, check, torch.get_num_threads(), model=lm.model,
                             calib=list(calib) if calib is not None else None)
    t0 = time.perf_counter()
    done = quantize(lm.model, fmt, QuantizeOptions(include=config.include, exclude=config.exclude,
                                                   calib=list(calib) if calib is not None else None))
    provenance.update(quantize_seconds=time.perf_counter() - t0, device=lm.info.device, dtype=lm.info.dtype)
    model = done.model.to("cpu") if lm.info.device != "cpu" else done.model  # the files are written from the CPU
    if gguf:
        from .backends.llamacpp import gguf_source
        from .model.gguf_export import save_gguf

        return save_gguf(model, lm.tokenizer, model.config, out, check, provenance, gguf_source(config.model))
    return save_compressed_tensors(model, lm.tokenizer, out, check, provenance)
