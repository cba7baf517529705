"""Run keys: the stable identity of one measurement, so a re-run finds what is already done."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from quantscope.errors import QuantscopeError


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings (tuples = lists)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _spec_to_jsonable(spec: Any) -> Any:
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return {"__type__": type(spec).__name__, **dataclasses.asdict(spec)}
    return spec


def record_key(model_fingerprint: str, format_spec: Any, eval_spec: dict, version: str) -> str:
    """Stable identity of one measurement: sha256 of the canonical JSON of everything that defines it.

    `format_spec` is a format name or a FormatSpec dataclass; `eval_spec` holds the text hash, ctx,
    windows, tasks and any other knob that changes the numbers. Keys do not depend on dict order.
    """
    try:
        payload = canonical_json(
            {
                "model": model_fingerprint,
                "format": _spec_to_jsonable(format_spec),
                "eval": eval_spec,
                "version": version,
            }
        )
    except (TypeError, ValueError) as e:
        raise QuantscopeError(f"cannot build a record key: the evaluation spec is not plain JSON ({e})") from e
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
