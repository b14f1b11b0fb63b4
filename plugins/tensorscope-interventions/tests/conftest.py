"""Shared fixtures: the core's tiny models and one-thread session (tensorscope_core.testing_fixtures)."""

from __future__ import annotations

from tensorscope_core.testing_fixtures import models, one_thread, tokenizer  # noqa: F401
