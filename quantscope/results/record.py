"""The result record: one typed, versioned definition that the harness writes and the store, the
report, recommend and every `--json` output read.

A record is a JSON-able dict (so it stores, diffs and prints as it is), typed by :class:`Record`.
`schema_version` says which definition wrote it: 1 is every record stored before the field existed
(same fields), 2 adds `schema_version` and `eval_seconds`, 3 adds generation agreement (`generation`,
`gen_agreement`) and answer flips in each task's summary (`tasks[name]["flips"]`), 4 adds `timings` (seconds
per phase of the worker), `eval_tokens_per_s` and `kernel` (what the decode steps ran; "ref" where a
format's layers dequantize per call), 5 adds `reference_model` and `reference_fingerprint` (compare
--reference: the baseline is another model; absent, it is the model itself). :func:`upgrade` reads any
stored version and refuses a record written by a newer quantscope.
"""

from __future__ import annotations

from typing import Any, TypedDict

SCHEMA_VERSION = 5


class Record(TypedDict, total=False):
    schema_version: int
    format: str
    baseline: bool  # the reference row: KLD and deltas are measured against it
    error: str  # why the format has no figures (then most fields below are absent)
    # what was measured
    model: str
    model_ref: str
    model_fingerprint: str
    # compare --reference: the baseline's model (on every row; the baseline row's model fields are the same)
    reference_model: str
    reference_fingerprint: str
    text: str
    text_sha256: str
    ctx: int
    windows: int
    window_start_token: int  # windows start after a calibration head cut from the same text
    scoring: str  # all-but-first | second-half
    calibration_overlap: float | None
    device: str  # where the baseline and the format ran: cpu, cuda:N, mps (absent: cpu, before --device)
    dtype: str  # the baseline's dtype: float32, bfloat16, float16 (absent: float32)
    # perplexity and agreement with the baseline
    tokens_scored: int
    perplexity: float
    perplexity_stderr: float
    window_nll: list[float]  # per-window sums: paired statistics
    window_tokens: list[int]
    window_kld: list[float]
    kld_mean: float
    kld_stderr: float
    kld_p99: float
    kld_median: float
    top1_agreement: float
    perplexity_delta: float  # paired with the baseline (added when records are paired)
    perplexity_delta_ci: list[float] | None
    perplexity_delta_significant: bool
    # bytes, memory, time
    weight_bytes: int
    quantized_params: int
    quantized_bytes: int
    bits_per_weight: float | None
    peak_rss_bytes: int
    peak_device_bytes: int | None  # torch's peak allocation on the GPU (None on the CPU)
    rss_before_quantize_bytes: int
    quantize_peak_rss_bytes: int
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None
    quantize_seconds: float
    eval_seconds: float
    eval_tokens_per_s: float | None  # tokens scored per second in the perplexity/KLD pass
    timings: dict  # seconds per phase: startup, load, quantize, reference|evaluate, ..., speed, total
    kernel: str  # what decode steps run: a kernel's name, "ref" (dequantize + matmul), a library's own
    # provenance
    backend: str
    backend_version: str
    spec: dict
    quantscope_version: str
    torch_version: str
    transformers_version: str
    notes: list[str]
    reused: bool  # read back from a run directory, not measured by this call
    ray: dict  # measured as a Ray task: {"node": its IP, "node_id", "attempt": 1 unless retried}
    # optional measurements
    task_items: dict
    tasks: dict
    task_categories: dict
    ctx_sweep: dict
    lm_eval_version: str
    gguf_tensor_types: dict
    # --gen-prompts: per prompt, the greedy continuation and (vs the baseline's) exact match, tokens until
    # the first divergence and mean KLD along the baseline's continuation; and their summary
    generation: dict
    gen_agreement: dict


# The comparison table's fields, every one present in a measured record (None where skipped).
RECORD_FIELDS = (
    "format", "model", "text", "ctx", "windows", "tokens_scored", "perplexity", "perplexity_stderr",
    "kld_mean", "kld_stderr", "kld_p99", "top1_agreement", "weight_bytes", "bits_per_weight",
    "peak_rss_bytes", "prefill_tokens_per_s", "decode_tokens_per_s", "quantize_seconds",
    "quantscope_version", "torch_version", "transformers_version",
)


def new_record(**fields: Any) -> Record:
    return Record(schema_version=SCHEMA_VERSION, **fields)


def error_record(fmt: str, baseline: bool, common: dict, message: str) -> Record:
    return new_record(format=fmt, **common, baseline=baseline, error=message)


def upgrade(record: dict) -> Record:
    """A stored record as the current definition reads it (version 1 had the same fields)."""
    version = record.get("schema_version", 1)
    if version > SCHEMA_VERSION:
        from ..errors import QuantscopeError

        raise QuantscopeError(f"a record of schema version {version} was written by a newer quantscope "
                              f"(this one reads up to {SCHEMA_VERSION}): upgrade quantscope")
    return record  # type: ignore[return-value]  (versions 1-5 differ only by optional fields)
