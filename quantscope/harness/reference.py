"""`compare --reference ORIGINAL`: the baseline is another model than the one being measured.

Measuring a saved file (``--model saved.gguf``, a compressed-tensors folder) against itself says
nothing about what saving it cost; against the original it does. With a reference, the baseline row
is the reference model (in the run's baseline dtype) and every format, ``fp32`` included, is applied
to ``--model``; KL divergence, top-1 agreement, the paired deltas, task flips and generation agreement
are all against the reference. Both models must score the same token ids: the reference must have the
same vocabulary (every token at the same id) and the same number of logits, which is checked here,
before any weights are read. Every record of such a run carries ``reference_model`` and
``reference_fingerprint``, and the fingerprint is part of its run key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import QuantscopeError


@dataclass(frozen=True)
class Reference:
    ref: str  # as given: 'default', a folder, a Hub id, a .gguf
    kind: str
    path: str  # what the worker loads
    fingerprint: str
    name: str


def reference_of(ref, inputs) -> Reference:
    """The reference, from its resolved `ref` Inputs, checked against the measured model's `inputs`."""
    check_same_vocab(ref.tokenizer, ref.model_config, inputs.tokenizer, inputs.model_config, ref.model_ref,
                     inputs.model_name)
    path = ref.path
    if ref.gguf_file:  # the worker loads a GGUF's dequantized cache
        from ..model.load import ensure_gguf_cache

        path = str(ensure_gguf_cache(Path(ref.gguf_file), Path(ref.path)))
    return Reference(ref.model_ref, ref.kind, path, ref.fingerprint, ref.model_name)


def check_same_vocab(ref_tok, ref_cfg, tok, cfg, ref: str, model_name: str) -> None:
    """The reference must read the same token ids as the model: same id -> token map, same logit width."""
    a, b = ref_tok.get_vocab(), tok.get_vocab()
    if a != b:
        by_id_a, by_id_b = ({i: t for t, i in v.items()} for v in (a, b))
        ids = sorted(set(by_id_a) | set(by_id_b))
        differ = [i for i in ids if by_id_a.get(i) != by_id_b.get(i)]
        i = differ[0]
        raise QuantscopeError(
            f"--reference {ref} does not share the vocabulary of {model_name} ({len(differ)} of {len(ids)} token "
            f"ids differ, e.g. id {i}: {by_id_a.get(i)!r} vs {by_id_b.get(i)!r}): KL divergence needs the same tokens")
    va, vb = getattr(ref_cfg, "vocab_size", None), getattr(cfg, "vocab_size", None)
    if va is not None and vb is not None and va != vb:
        raise QuantscopeError(f"--reference {ref} has {va} logits per token, {model_name} has {vb}: "
                              "KL divergence needs the same vocabulary")
