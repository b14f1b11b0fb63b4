"""The members of a model set as a checkpoint series: their order and training steps.

The order is the core's, the one ``compare()`` uses (``order_models`` and ``step_of`` from the
plugin API): the step a member's name carries (``ckpt_step_1000``, ``checkpoint-500``,
``step-0300``); members are sorted by step when at least two have one and every other is a final
checkpoint (``final``, ``last``, ... go after every step); otherwise they keep the given order.
The ``steps`` parameter (model name -> step) overrides the step of the members it names, and the
same rule orders them. The steps are known when every member has one; otherwise positions
0, 1, ... (in that order) stand for steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import Field

from tensorscope_core.plugin_api import BadParameterError, Params, order_models, step_of


class SeriesParams(Params):
    steps: dict[str, float] | None = Field(
        None,
        description="training step of each member, by model name; default: the step its name carries, "
        "as compare() reads it (step-0300 -> 300); members are sorted by step as compare() sorts them "
        "(final/last after every step), and positions stand for steps unless every member has one",
    )


@dataclass(frozen=True)
class Checkpoints:
    """Member names in step order, with their steps (the position where not every step is known)."""

    names: list[str]
    steps: list[float]
    by_step: bool

    @property
    def uneven(self) -> bool:
        """Whether the steps are unevenly spaced (then change locations are placed on log step)."""
        gaps = [b - a for a, b in zip(self.steps, self.steps[1:], strict=False)]
        return len(gaps) > 1 and max(gaps) - min(gaps) > 1e-9 * max(abs(g) for g in gaps)

    def midpoint(self, before: int, after: int) -> float:
        """Where a change between checkpoints ``before`` and ``after`` is placed: the midpoint of
        their steps, on log(1 + step) when the steps are unevenly spaced."""
        a, b = self.steps[before], self.steps[after]
        if self.uneven and self.by_step and a >= 0 and b >= 0:
            return math.expm1((math.log1p(a) + math.log1p(b)) / 2)
        return (a + b) / 2


def order_checkpoints(names: Sequence[str], steps: Mapping[str, float] | None) -> Checkpoints:
    """The members in the core's checkpoint order (``order_models``, as ``compare()``), the
    ``steps`` parameter overriding the step of the members it names."""
    names = list(names)
    if steps is not None:
        unknown = sorted(set(steps) - set(names))
        if unknown:
            raise BadParameterError(
                f"steps names models that are not members: {unknown}", f"use the member names {names}"
            )
    found: list[float | None] = []
    for name in names:
        step = steps[name] if steps is not None and name in steps else step_of(name)
        found.append(None if step is None else float(step))
    # order_models decides the order. A member with a step (given or from its name) goes in as the
    # stand-in name 'step_<rank>', its rank in (step, position) order, so that a given step counts
    # as a name's would; a member without one goes in under its own name, so that the core's rule
    # for it applies (final/last after every step; any other: the given order).
    ranked = sorted((i for i, s in enumerate(found) if s is not None), key=lambda i: (found[i], i))
    stand_ins = {i: f"step_{rank}" for rank, i in enumerate(ranked)}
    position = {stand_ins.get(i, name): i for i, name in enumerate(names)}
    order = [position[n] for n in order_models(list(position)).names]
    ordered = [found[i] for i in order]
    if all(s is not None for s in ordered):
        return Checkpoints([names[i] for i in order], [s for s in ordered if s is not None], True)
    return Checkpoints([names[i] for i in order], [float(i) for i in range(len(order))], False)
