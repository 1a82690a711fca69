"""Process-wide settings for a glotkit command (and for the worker processes it starts)."""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    """Keep the libraries' own chatter (progress bars on every model load, deprecation notes)
    off the terminal, so that glotkit's lines and bars are what the user reads."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" bars on every model load
    except Exception:  # pragma: no cover - transformers missing is reported elsewhere
        pass
    import logging

    # bitsandbytes warns on import that the optional `kernels` package (hub-downloaded CPU 4-bit
    # kernels) is missing; its own CPU path works without it
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
