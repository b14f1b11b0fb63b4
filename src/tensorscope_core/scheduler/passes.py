"""Counting the passes a run really makes: every call of a whole model, attributed to who made it.

A *pass* is one call of a member's whole model (its top-level module, or a copy of it, e.g. the
hook-free copy that loss-at-other-weights helpers use): the shared forward of a batch, an
artifact's own per-example backward, or a metric's replay (ablation, patching, loss landscapes,
Lanczos iterations, integrated-gradient steps). Metrics and artifacts declare how many they make
(``replays``); the executor attributes every call it observes here to the shared pass, an
artifact or a metric, and the run records both, so a plan that hides work shows up as a mismatch.
Calls of parts of a model (single blocks) are not passes and are not counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

#: what a pass is for: the shared passes, and the kinds metrics and artifacts declare for their own
PASS_KINDS = ("weights", "forward", "backward", "sampled_backward", "per_example_backward", "replay_forward",
              "replay_backward")
#: the kinds a metric or an artifact may declare as its own passes
OWN_PASS_KINDS = ("sampled_backward", "per_example_backward", "replay_forward", "replay_backward")


class PassCounter:
    """Counts calls of the given model classes' top-level modules, by the name on top of the
    attribution stack (``shared``, ``artifact:NAME`` or a metric's name); calls made while no
    one is attributed are counted under ``unattributed``."""

    def __init__(self, model_classes: Iterable[type[nn.Module]]) -> None:
        self.classes = frozenset(model_classes)
        self.calls: Counter[str] = Counter()
        self._stack: list[str] = []

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        if type(module) in self.classes:
            self.calls[self._stack[-1] if self._stack else "unattributed"] += 1

    @contextmanager
    def active(self) -> Iterator[PassCounter]:
        """Observe model calls inside the block (a global forward pre-hook, removed on exit)."""
        handle = register_module_forward_pre_hook(self._pre_hook)
        try:
            yield self
        finally:
            handle.remove()

    @contextmanager
    def attributed(self, who: str) -> Iterator[None]:
        self._stack.append(who)
        try:
            yield
        finally:
            self._stack.pop()


def check_declared(kinds: dict[str, int], who: str) -> dict[str, int]:
    """Refuse pass kinds the core does not know (a typo would hide a pass from the plan)."""
    unknown = sorted(set(kinds) - set(OWN_PASS_KINDS))
    if unknown:
        raise ValueError(f"{who} declares passes of unknown kind(s) {unknown}; kinds: {', '.join(OWN_PASS_KINDS)}")
    return {k: int(v) for k, v in kinds.items() if v}
