"""Decoder-block names: the one place that knows transformers number their blocks ``...layers.<i>``."""

from __future__ import annotations

import re

from torch import nn

# a module inside decoder block i: "model.layers.7.mlp.up_proj"
_MEMBER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# block i itself: "model.layers.7"
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)$")
# the ModuleList holding the blocks: "model.layers"
_LIST = re.compile(r"(?:^|\.)layers$")


def block_index(name: str) -> int | None:
    """Decoder block number of a module name (``model.layers.7.mlp.up_proj`` -> 7), else None."""
    m = _MEMBER.search(name)
    return int(m.group(1)) if m else None


def block_prefix(name: str) -> str | None:
    """The block a module belongs to (``model.layers.7.mlp.up_proj`` -> ``model.layers.7``), else None."""
    m = _MEMBER.search(name)
    return name[: m.end() - 1] if m else None


def in_block(name: str) -> bool:
    return _MEMBER.search(name) is not None


def is_block_list(name: str) -> bool:
    """True for the name of the ModuleList that holds the decoder blocks (``model.layers``)."""
    return _LIST.search(name) is not None


def block_names(model: nn.Module) -> list[str]:
    """Names of the decoder blocks (``model.layers.0`` ...) in order; [] unless numbered 0..n-1."""
    found = {}
    for name, _ in model.named_modules():
        m = _BLOCK.search(name)
        if m:
            found.setdefault(int(m.group(1)), name)
    return [found[i] for i in range(len(found))] if sorted(found) == list(range(len(found))) else []


def decoder_blocks(model: nn.Module) -> list[int]:
    """Sorted decoder block numbers of the model (from module names ``...layers.<i>....``)."""
    return sorted({b for n, _ in model.named_modules() if (b := block_index(n)) is not None})
