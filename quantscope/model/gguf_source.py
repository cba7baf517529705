"""A GGUF file read one tensor at a time: the streamed path's loader for GGUF models.

:class:`GGUFBlockSource` offers what :class:`.blocks.BlockSource` offers for safetensors shards
(`shapes`, `read`, `nbytes`, `load`), so the streamed pass reads a 70B GGUF block by block instead of
first dequantizing the whole model into a cache. The tensors come out exactly as transformers' own GGUF
loader (``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint``) gives them:

- names: transformers' ``get_gguf_hf_weights_map`` (gguf-py's tensor name map over the skeleton's
  state-dict names: ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``), reused;
- values: gguf-py's ``quants.dequantize`` to float32 of the tensor's bytes, then transformers'
  ``TENSOR_PROCESSORS`` entry for the file's ``general.architecture``, reused (for llama:
  ``LlamaTensorProcessor``, which undoes ``convert_hf_to_gguf.py``'s q/k row permutation), built with the
  model's config as the loader builds it with the config it parsed from the same file;
- a tensor the map does not name (``rope_freqs`` and the like) is skipped, as the loader skips it;
  no ``output.weight`` means a tied head (the config says so, and the skeleton shares the embedding).

Only the tensors asked for are dequantized. The file is opened with gguf-py's ``GGUFReader`` once for
its metadata (offsets, types, shapes: header pages only) and closed; each :meth:`read` maps the file
again, dequantizes the tensors it was asked for from their byte ranges and drops the map, so the pages it
touched do not stay resident. (The model's fingerprint is the file's SHA-256, read through buffered
reads when the model is resolved: that, not the map, is what reads the whole file.) These two
transformers functions are used as they are (stable since transformers 4.46); a version without them
is refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import QuantscopeError
from .blocks import BlockSource, TensorSource


def open_source(path: str | Path, model: nn.Module) -> TensorSource:
    """The weights at `path` for the skeleton `model`: a GGUF file, else a safetensors model folder."""
    path = Path(path)
    return GGUFBlockSource(path, model) if path.suffix == ".gguf" else BlockSource(path)


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0]}" if s else type(e).__name__


def _transformers_gguf():
    try:
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map)
    except ImportError as e:
        raise QuantscopeError(f"streaming a GGUF file needs transformers' GGUF loader ({_first_line(e)}): "
                              "pip install -U transformers gguf") from None
    return TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map


class GGUFBlockSource(TensorSource):
    """The tensors of a GGUF file under their Hugging Face names, for the skeleton `model` (meta
    parameters are enough: only its state-dict names and its config are used)."""

    def __init__(self, path: str | Path, model: nn.Module):
        try:
            import gguf
        except ImportError:
            raise QuantscopeError("streaming a GGUF file needs gguf-py: pip install gguf") from None
        self.folder = Path(path)
        if not self.folder.is_file():
            raise QuantscopeError(f"GGUF file not found: {self.folder}")
        processors, default, weights_map = _transformers_gguf()
        try:
            reader = gguf.GGUFReader(self.folder)
            arch_field = reader.fields.get("general.architecture")
            arch = str(bytes(arch_field.parts[arch_field.data[0]]), encoding="utf-8") if arch_field else None
            tensors = [(t.name, t.tensor_type, int(t.data_offset), t.data.dtype, tuple(t.data.shape),
                        int(t.n_bytes), tuple(int(d) for d in reversed(t.shape.tolist()))) for t in reader.tensors]
        except Exception as e:
            raise QuantscopeError(f"{self.folder}: not a readable GGUF file ({_first_line(e)})") from None
        del reader  # unmaps the file: each read maps it again
        self._processor = processors.get(arch, default)(config=model.config.to_dict())
        try:
            hf_of = weights_map(model, self._processor)  # gguf name -> HF name
        except Exception as e:
            raise QuantscopeError(f"{self.folder}: its tensor names cannot be mapped for "
                                  f"{type(model).__name__} ({_first_line(e)})") from None
        self._info: dict[str, tuple] = {}
        self.shapes: dict[str, tuple] = {}
        for gname, qtype, offset, dtype, raw_shape, n_bytes, shape in tensors:  # (a truncated file fails above)
            if gname in hf_of:
                self._info[hf_of[gname]] = (gname, qtype, offset, dtype, raw_shape, n_bytes)
                self.shapes[hf_of[gname]] = shape

    def nbytes(self, names) -> int:
        """Stored (quantized) bytes of the named tensors."""
        return sum(self._info[n][5] for n in names)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors dequantized to float32 and processed as transformers' GGUF loader does;
        the file is mapped for this read only."""
        from gguf import quants

        missing = [n for n in names if n not in self._info]
        if missing:
            raise QuantscopeError(f"{self.folder}: tensor {missing[0]} is not in the weights")
        mm = np.memmap(self.folder, dtype=np.uint8, mode="r")
        out = {}
        try:
            for n in names:
                gname, qtype, offset, dtype, raw_shape, n_bytes = self._info[n]
                raw = mm[offset:offset + n_bytes].view(dtype).reshape(raw_shape)
                w = quants.dequantize(raw, qtype)
                res = self._processor.process(weights=w, name=gname, tensor_key_mapping={gname: n},
                                              parsed_parameters={"tensors": {}})
                w = getattr(res, "weights", None)
                if w is None or getattr(res, "name", gname) != gname:
                    raise QuantscopeError(f"{self.folder}: {gname} is not one tensor of its own in this "
                                          "architecture's GGUF layout: run it in memory (--no-stream)")
                if np.may_share_memory(w, mm) or not w.flags.writeable:  # F32 tensors are views of the map
                    w = np.array(w)
                out[n] = torch.from_numpy(np.ascontiguousarray(w))
        except QuantscopeError:
            raise
        except Exception as e:
            raise QuantscopeError(f"{self.folder}: could not read tensor {gname} ({_first_line(e)})") from None
        finally:
            del mm
        return out
