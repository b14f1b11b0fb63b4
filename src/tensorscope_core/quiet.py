"""Keep third-party chatter out of the user's terminal."""

from __future__ import annotations


def quiet_transformers() -> None:
    """Loading bars and config chatter from transformers drown the command's own output (and, from
    Ray workers, the driver's)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
