"""The two tasks a per-model metric compares, chosen by name or as the run's first two."""

from __future__ import annotations

from collections.abc import Sequence

from tensorscope_core.plugin_api import ModelView, PreparedData, RunShape


def pick_tasks(first: str | None, second: str | None, tasks: Sequence[str]) -> tuple[str, str] | str:
    """``(first, second)``, each defaulting to the run's first and second task in data order; or why
    they cannot be chosen (too few tasks, an unknown name, the same task twice)."""
    if len(tasks) < 2:
        return (
            f"needs data with at least 2 named tasks, e.g. data={{'plus': [...], 'minus': [...]}}; "
            f"this run has {len(tasks)} ({', '.join(map(repr, tasks)) or 'untasked data'})"
        )
    a = first if first is not None else next(t for t in tasks if t != second)
    b = second if second is not None else next(t for t in tasks if t != a)
    unknown = [t for t in (a, b) if t not in tasks]
    if unknown:
        return f"task(s) {unknown} are not tasks of this run ({list(tasks)})"
    if a == b:
        return f"the two tasks must differ, got {a!r} twice"
    return a, b


def data_tasks(data: PreparedData | None) -> list[str]:
    return list(data.tasks) if data is not None else []


def has_loss_target(view: ModelView, padded_length: int) -> bool:
    """Whether a batch of this padded length has a loss target on ``view``: a causal model predicts
    every token after the first; a masked LM with a mask token masks a token of every row."""
    if view.causal:
        return padded_length >= 2
    return view.mask_token_id is not None and padded_length >= 1


def task_rows(shape: RunShape, task: str | None) -> int:
    """Rows of the run's batches of ``task`` (None: every batch)."""
    return sum(rows for rows, _, t in shape.batches if task is None or t == task)


def target_batches(view: ModelView, shape: RunShape, task: str) -> int:
    """Batches of ``task`` with a loss target on ``view``: the ones a replay over that task runs."""
    return sum(1 for _, length, t in shape.batches if t == task and has_loss_target(view, length))
