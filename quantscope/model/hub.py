"""Where a model name that is not a local path comes from: the Hub, the local Hub cache, or nowhere.

`from_pretrained` on a name that is neither a folder nor reachable retries its downloads for most of a
minute before failing with a many-line error. quantscope asks once, with a short timeout, before any
loading: a name that is a cached Hub snapshot loads from that snapshot folder (no network), a name the
Hub answers for loads from the Hub, and anything else fails in a second or two with one line that says
both that there is no such folder and what the Hub said.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import QuantscopeError

PROBE_TIMEOUT_S = 5.0  # one metadata request; downloads themselves are not bounded by this


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(constants.HF_HUB_OFFLINE) or env


def cached_snapshot(repo_id: str) -> Path | None:
    """The local Hub-cache snapshot folder of `repo_id` holding its config.json, or None."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json")
    return Path(hit).parent if isinstance(hit, str) else None


def locate(ref: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is the local cache) for a Hub id; one line if neither.

    The cache is preferred when the Hub cannot be asked (offline or unreachable); when it can, the Hub
    answers (so a newer revision is seen, as `from_pretrained` would).
    """
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import model_info
        from huggingface_hub.utils import validate_repo_id
    except ImportError:
        raise QuantscopeError(f"no such folder: {ref} (and huggingface_hub, needed for Hub ids, is not "
                              "installed: pip install huggingface_hub)") from None
    try:
        validate_repo_id(ref)
    except hf_errors.HFValidationError:
        raise QuantscopeError(f"no such folder: {ref} (and it is not a valid Hub id)") from None
    snapshot = cached_snapshot(ref)
    if _offline():
        if snapshot is not None:
            return str(snapshot), True
        raise QuantscopeError(f"no such folder: {ref}, and the Hugging Face Hub is off (HF_HUB_OFFLINE "
                              "is set) with no cached copy of it")
    try:
        model_info(ref, timeout=PROBE_TIMEOUT_S)
    except hf_errors.GatedRepoError:
        if snapshot is not None:
            return str(snapshot), True
        raise QuantscopeError(f"{ref} is gated on the Hub: accept its license there and log in "
                              "(hf auth login)") from None
    except hf_errors.RepositoryNotFoundError:
        raise QuantscopeError(f"no such folder: {ref}, and no such model on the Hub (or it is private: "
                              "hf auth login)") from None
    except Exception as e:  # connection refused, DNS, timeout, proxy, HTTP 5xx: the Hub cannot be asked
        if snapshot is not None:
            return str(snapshot), True
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise QuantscopeError(f"no such folder: {ref}, and the Hugging Face Hub is unreachable ({why})") from None
    return ref, False
