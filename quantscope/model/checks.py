"""A local model folder checked before anything is loaded: weights, tokenizer, and whether the two agree
with config.json — each failure one line that names the file, instead of transformers' error from deep
inside loading (a tokenizer backend's multi-line complaint, a size-mismatch "report above" we never show).

Only headers are read: safetensors headers (shapes, no tensor data) and a skeleton of the model built on
the meta device (no memory, no weights).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import QuantscopeError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")


def check_safetensors(folder: Path) -> dict[str, tuple[int, ...]]:
    """Read every safetensors header so a corrupt or truncated weight file fails before any work;
    returns {tensor name: shape}."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files and not any(folder.glob("*.bin")):
        raise QuantscopeError(f"no weights in {folder} (expected *.safetensors)")
    check_index(folder)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    shapes[k] = tuple(h.get_slice(k).get_shape())
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "unreadable"
            raise QuantscopeError(f"corrupt weight file {f}: {type(e).__name__}: {first}") from None
    return shapes


def check_index(folder: Path) -> None:
    """Every shard model.safetensors.index.json names is in the folder."""
    import json

    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise QuantscopeError(f"{index}: not a safetensors index (no weight_map)") from None
    missing = sorted(f for f in files if not (folder / f).is_file())
    if missing:
        raise QuantscopeError(f"{folder}: shard {missing[0]} is named by model.safetensors.index.json but missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def check_tokenizer_files(folder: Path) -> None:
    if not any((folder / n).is_file() for n in _TOKENIZER_FILES):
        raise QuantscopeError(f"no tokenizer in {folder} (expected one of {', '.join(_TOKENIZER_FILES[:3])})")


def skeleton(config, trust_remote_code: bool = False):
    """The model `config` describes, on the meta device; None where it cannot be built this way
    (then the real load is the check)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:
        return None


def check_shapes(folder: Path, shapes: dict[str, tuple[int, ...]], config, trust_remote_code: bool = False) -> None:
    """Every stored tensor the config's model also has must have the config's shape."""
    model = skeleton(config, trust_remote_code)
    if model is None:
        return
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in shapes.items():
        if name in want and want[name] != shape:
            raise QuantscopeError(f"{folder}: {name} is {list(shape)} in the weights but {list(want[name])} by "
                                  "config.json: the folder's config and weights do not belong together")


def check_folder(folder: Path, trust_remote_code: bool = False, config=None) -> None:
    """Weights readable, a tokenizer present (load_model loads both), weights shaped as config.json
    says (`config`: the loaded config if the caller has it, else it is read here)."""
    shapes = check_safetensors(folder)
    check_tokenizer_files(folder)
    if config is None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except Exception:  # the real load reports a config it cannot read, in its own words
            return
    check_shapes(folder, shapes, config, trust_remote_code)
