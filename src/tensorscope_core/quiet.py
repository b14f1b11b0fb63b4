"""Keep third-party chatter out of the user's terminal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def quiet_transformers() -> None:
    """Loading bars and config chatter from transformers drown the command's own output (and, from
    Ray workers, the driver's)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextmanager
def no_loading_bars() -> Iterator[None]:
    """Transformers' loading bars off for the block, as they were after: the run's own bar is the one a
    user of the Python API sees, and a library leaves the process's settings as it found them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
