"""GGUF metadata for a Hugging Face causal LM: architecture, hyperparameters, tensor names, tokenizer.

Written through gguf-py's `GGUFWriter` with the keys llama.cpp's ``convert_hf_to_gguf.py`` writes for
the same model (its `LlamaModel` / `Qwen2Model` and `_set_vocab_gpt2`):

- ``{arch}.context_length / embedding_length / block_count / feed_forward_length``,
  ``attention.head_count(_kv)``, ``attention.layer_norm_rms_epsilon``, ``rope.freq_base``,
  ``rope.dimension_count`` (the head width), ``vocab_size``; ``general.file_type`` and
  ``general.quantization_version``;
- tensor names from gguf-py's `TensorNameMap` (``model.layers.3.self_attn.q_proj.weight`` ->
  ``blk.3.attn_q.weight``); a tied output head is not written (llama.cpp, like transformers, then
  uses ``token_embd`` for the output, and transformers sets ``tie_word_embeddings`` from its absence);
- llama's q_proj / k_proj rows permuted as ``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` does
  (llama.cpp's rope pairs neighbouring dimensions, transformers' the two halves of a head);
  the permutation moves whole rows, so quantized blocks are permuted without touching a code;
- a gpt2-style byte-level BPE tokenizer: ``tokenizer.ggml.model = gpt2``, tokens with their types
  (normal / control / user-defined / unused padding ids up to the config's vocab size), merges (an
  empty list for a BPE with none: llama.cpp requires the key, transformers then builds no merges),
  special token ids, ``add_bos_token``, the chat template. ``tokenizer.ggml.pre`` (llama.cpp's
  pre-tokenizer regex) is taken from the source GGUF when the model came from one (the embedded
  SmolLM2: ``smollm``), else ``default``.

Only these two architectures (and BPE tokenizers) are written; anything else is refused in one line.
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import QuantscopeError

# HF model_type -> (gguf-py MODEL_ARCH member, q/k rows permuted for llama.cpp's rope)
ARCHS = {"llama": ("LLAMA", True), "qwen2": ("QWEN2", False)}


def arch_of(config) -> tuple[str, bool]:
    """(gguf architecture name, permute q/k) for a transformers config, or a one-line refusal."""
    import gguf

    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise QuantscopeError(f"GGUF export writes {' and '.join(ARCHS)} models; this one is '{mt}'")
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    if kind not in (None, "default"):
        raise QuantscopeError(f"GGUF export does not write rope scaling '{kind}' (only plain rope)")
    member, permute = ARCHS[mt]
    return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[member]], permute


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_hparams(writer, config, name: str, file_type: int) -> None:
    """The architecture keys llama.cpp reads for llama / qwen2."""
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return theta


def tensor_namer(arch: str, n_blocks: int):
    """hf parameter name -> GGUF tensor name (gguf-py's table for `arch`)."""
    import gguf

    member = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    table = gguf.get_tensor_name_map(member, n_blocks)

    def name(hf: str) -> str:
        got = table.get_name(hf, try_suffixes=(".weight", ".bias"))
        if got is None:
            raise QuantscopeError(f"GGUF export: no GGUF name for tensor {hf}")
        return got
    return name


def qk_permutation(hf_name: str, config) -> np.ndarray | None:
    """The row order llama.cpp expects for a llama q_proj / k_proj weight (None for other tensors):
    ``convert_hf_to_gguf.py``'s ``w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)``."""
    if hf_name.endswith("q_proj.weight") or hf_name.endswith("q_proj.bias"):
        heads = config.num_attention_heads
    elif hf_name.endswith("k_proj.weight") or hf_name.endswith("k_proj.bias"):
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    else:
        return None
    rows = heads * head_dim(config)
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def writer(path, arch: str):
    """gguf-py's `GGUFWriter`, also writing a zero-length array (GGUF and llama.cpp's reader allow one,
    gguf-py's writer refuses it): the merges of a BPE tokenizer that has none."""
    import gguf

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer(str(path), arch)


def write_tokenizer(writer, tokenizer, config, pre: str = "default") -> None:
    """tokenizer.ggml.* for a byte-level BPE tokenizer (transformers' fast tokenizer), as
    ``convert_hf_to_gguf.py``'s ``_set_vocab_gpt2`` + gguf-py's ``SpecialVocab`` write them."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        raise QuantscopeError("GGUF export writes byte-level BPE (gpt2-style) tokenizers; this tokenizer is "
                              f"{model.get('type') or type(tokenizer).__name__}")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    size = max(config.vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # llama.cpp requires the merges key of a gpt2 vocabulary; a BPE with no merges (every token a
    # byte-level character or an added token) is an empty list, which `writer()` can write
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.STRING)
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        tid = getattr(tokenizer, f"{key}_token_id", None)
        if tid is not None:
            add(int(tid))
    add_bos = getattr(tokenizer, "add_bos_token", None)
    if isinstance(add_bos, bool):
        writer.add_add_bos_token(add_bos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def source_pre_tokenizer(path) -> str | None:
    """``tokenizer.ggml.pre`` of a source GGUF file, if it has one."""
    import gguf

    f = gguf.GGUFReader(str(path)).fields.get(gguf.Keys.Tokenizer.PRE)
    return None if f is None else str(f.contents())
