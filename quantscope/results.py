"""Result records: the schema every measurement writes and every report reads.

A record is a flat JSON-able dict. These are the field names of the comparison table; records may
carry more (per-window arrays for paired statistics, task results, backend versions).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# Fields every comparison record carries (None where a measurement was skipped, with `error` saying why).
RECORD_FIELDS = (
    "format",
    "model",
    "text",
    "ctx",
    "windows",
    "tokens_scored",
    "perplexity",
    "perplexity_stderr",
    "kld_mean",
    "kld_stderr",
    "kld_p99",
    "top1_agreement",
    "weight_bytes",
    "bits_per_weight",
    "peak_rss_bytes",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "quantize_seconds",
    "quantscope_version",
    "torch_version",
    "transformers_version",
)

# Extra fields: `baseline` (bool), `backend`, `backend_version`, `quantized_params`,
# `quantized_bytes`, `window_nll` / `window_tokens` / `window_kld` (per-window sums, for paired
# statistics), `tasks` (issue 5), `error` (why a format was skipped), `notes` (list of str),
# `rss_before_quantize_bytes` / `quantize_peak_rss_bytes` (the quantization's own peak, Linux),
# `gguf_tensor_types` (llama.cpp rows: tensors per ggml type in the file llama.cpp ran).

Record = dict[str, Any]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text so that a reader never sees a half-written file (temp file in the same dir + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (see write_text_atomic)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")
