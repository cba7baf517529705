"""transformers and huggingface_hub kept quiet while a model is read (their bars and chatter are not
quantscope's output), with every switch restored after."""

from __future__ import annotations

import contextlib
import warnings


@contextlib.contextmanager
def quiet_loading():
    """Silence transformers' progress bars and chatter while loading; afterwards the verbosity, the
    warning filters and both progress-bar switches (transformers' and huggingface_hub's, which
    transformers' also sets) are as the caller had them."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars_on, hub_bars_off = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:  # inside the filter: a switch that HF_HUB_DISABLE_PROGRESS_BARS fixes warns when set
            if bars_on:
                hf_logging.enable_progress_bar()
            if are_progress_bars_disabled() != hub_bars_off:
                (disable_progress_bars if hub_bars_off else enable_progress_bars)()
            hf_logging.set_verbosity(level)
