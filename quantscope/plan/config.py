"""Reading a model's config.json for the planner: a local model directory, a .json file, or a Hub id
(only config.json is downloaded). Every failure is a one-line `QuantscopeError`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from quantscope.errors import QuantscopeError


def load_config(model_ref: str | os.PathLike) -> dict:
    """config.json of a local model directory, a path to a .json file, or a Hub id (downloaded)."""
    ref = str(model_ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise QuantscopeError(f"{path}: no config.json in this directory")
    elif path.is_file():
        if path.suffix != ".json":
            raise QuantscopeError(
                f"{path}: the planner reads config.json; pass the model directory, its config.json or a Hub id"
            )
        cfg_path = path
    elif ref.startswith((".", "/", "~")) or ref.endswith(".json") or ref.count("/") > 1 or "\\" in ref:
        raise QuantscopeError(f"{ref}: no such file or directory")
    else:  # "owner/name" (or a bare legacy name) that is not a local path: a Hub id, as transformers reads it
        cfg_path = _download_config(ref)
    return _read_config(cfg_path)


def _read_config(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise QuantscopeError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise QuantscopeError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(config, dict):
        raise QuantscopeError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _download_config(repo_id: str) -> Path:
    from ..model.hub import locate

    where, cached = locate(repo_id)  # one line in seconds when it is neither a folder nor on the Hub
    if cached:
        return Path(where) / "config.json"
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except hf_errors.GatedRepoError:
        raise QuantscopeError(
            f"{repo_id} is gated on the Hub: accept its license there and log in (hf auth login)"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise QuantscopeError(f"{repo_id}: not found on the Hub (or private: log in with hf auth login)") from None
    except hf_errors.LocalEntryNotFoundError:
        raise QuantscopeError(
            f"{repo_id}: cannot reach the Hub and its config.json is not in the local cache "
            "(offline? pass a local model directory instead)"
        ) from None
    except (hf_errors.EntryNotFoundError, hf_errors.RemoteEntryNotFoundError):
        raise QuantscopeError(f"{repo_id}: the Hub repository has no config.json") from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise QuantscopeError(f"{repo_id}: could not download config.json ({type(e).__name__}: {e})") from None
