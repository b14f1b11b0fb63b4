"""Checkpoints in training order: the step a checkpoint's name carries (``ckpt_step_1000``,
``checkpoint-500``, ``step-0300``; ``final``/``last`` go after every step), or an explicit order.
One rule for ``compare()`` and for plugins' model-set metrics over checkpoint series."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import UsageError, did_you_mean
from .results.analysis import ModelOrder

_STEP = re.compile(r"(?<![a-z])(?:global_step|global-step|step|steps|ckpt|checkpoint|iter|iteration|epoch)"
                   r"[-_=]?(\d+)(?!\d)", re.IGNORECASE)
_TRAILING = re.compile(r"(?:^|[-_])(\d+)$")
FINAL_NAMES = frozenset({"final", "last", "latest", "end", "main"})


def name_key(name: str) -> str:
    """A model name as order and outcome lookups compare it (a trailing slash does not count)."""
    return str(name).rstrip("/\\")


def step_of(name: str) -> int | None:
    """The training step a checkpoint's name carries, or None."""
    base = name_key(name)
    found = list(_STEP.finditer(base))
    if found:
        return int(found[-1].group(1))
    leaf = re.split(r"[/\\]", base)[-1]
    trailing = _TRAILING.search(leaf)
    return int(trailing.group(1)) if trailing else None


def _is_final(name: str) -> bool:
    return re.split(r"[/\\]", name_key(name))[-1].lower() in FINAL_NAMES


def order_models(names: Sequence[str], order: Sequence[str] | None = None) -> ModelOrder:
    """Explicit ``order`` (every model once), else by step when names carry one, else as given."""
    names = list(names)
    steps = [step_of(n) for n in names]
    if order is not None:
        by_norm = {name_key(n): n for n in names}
        unknown = [o for o in order if name_key(o) not in by_norm]
        if unknown:
            raise UsageError(f"order names {unknown} that are not in these results; "
                             f"{did_you_mean(unknown[0], names) or 'models: ' + ', '.join(names)}",
                             "list every model once, as Results.models names them")
        ordered = [by_norm[name_key(o)] for o in order]
        if sorted(ordered) != sorted(names):
            missing = sorted(set(names) - set(ordered))
            raise UsageError(f"order must list every model once; missing or repeated: {missing or ordered}",
                             "pass a permutation of Results.models")
        return ModelOrder(names=ordered, steps=[step_of(n) for n in ordered], ordered_by="explicit")
    stepped = [s is not None for s in steps]
    if sum(stepped) >= 2 and all(s or _is_final(n) for s, n in zip(stepped, names, strict=True)):
        ranked = sorted(range(len(names)), key=lambda i: (steps[i] is None, steps[i] or 0, i))
        return ModelOrder(names=[names[i] for i in ranked], steps=[steps[i] for i in ranked], ordered_by="step")
    return ModelOrder(names=names, steps=steps, ordered_by="given")
