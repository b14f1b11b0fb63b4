"""dynamics.grokking: when train and held-out performance reach a threshold, and the delay between."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from tensorscope_core.plugin_api import (
    BadParameterError,
    Cost,
    MetricResult,
    ModelSetMetric,
    ModelView,
    NotApplicable,
    RunShape,
    ScalarValue,
    TableValue,
)

from .checkpoints import Checkpoints, SeriesParams, order_checkpoints

SOURCES = {"accuracy": ("dynamics.task_accuracy", "accuracy"), "loss": ("basic.loss", "loss")}


class GrokkingParams(SeriesParams):
    quantity: Literal["accuracy", "loss"] = Field(
        "accuracy",
        description="accuracy (reached: >= theta; dynamics.task_accuracy) or loss (reached: <= theta; "
        "basic.loss) of the tasks 'train' and 'test'",
    )
    theta: float = Field(0.9, description="the threshold a curve must reach (accuracy in [0, 1], or a loss in nats)")
    train_task: str = Field("train", description="name of the training task in the run's data")
    test_task: str = Field("test", description="name of the held-out task in the run's data")
    train_outcome: dict[str, float] | None = Field(
        None, description="the training curve given per checkpoint (model name -> value) instead of a task"
    )
    test_outcome: dict[str, float] | None = Field(
        None, description="the held-out curve given per checkpoint (model name -> value) instead of a task"
    )

    @model_validator(mode="after")
    def _pair(self) -> GrokkingParams:
        if (self.train_outcome is None) != (self.test_outcome is None):
            raise ValueError("give both train_outcome and test_outcome, or neither (then the tasks are read)")
        if self.quantity == "accuracy" and not 0.0 <= self.theta <= 1.0:
            raise ValueError(f"an accuracy threshold lies in [0, 1], got {self.theta}")
        return self


def onset(ckpts: Checkpoints, curve: Mapping[str, float], theta: float, higher: bool) -> float | None:
    """The first step (in step order) whose value reaches ``theta``; None if none does."""
    for name, step in zip(ckpts.names, ckpts.steps, strict=True):
        value = curve.get(name)
        if value is not None and (value >= theta if higher else value <= theta):
            return step
    return None


class Grokking(ModelSetMetric):
    """Grokking (Power et al. 2022) over checkpoints (a model set): t_train(theta) and
    t_test(theta) are the first steps at which the training and the held-out curve reach
    theta (accuracy >= theta, or loss <= theta); ``delay`` = t_test - t_train and ``ratio`` =
    t_test / t_train. The curves are the run's tasks ``train`` / ``test`` (``dynamics.task_accuracy``
    or ``basic.loss`` per task) or given per checkpoint (``train_outcome`` / ``test_outcome``).
    A curve that never reaches theta gives null onsets and says so in ``note``; ``ratio`` is null
    when t_train is 0.
    """

    name = "dynamics.grokking"
    min_models = 2  # a comparison: the core skips a smaller set with the fix
    version = "1"
    summary = "train vs held-out onset steps at a threshold: delay and ratio (grokking)"
    Params = GrokkingParams
    requires_metrics = ("dynamics.task_accuracy",)
    reads_weights = False
    fields = {
        "t_train": "first step the training curve reaches theta",
        "t_test": "the same, held-out curve",
        "delay": "t_test - t_train",
        "ratio": "t_test / t_train",
        "curves": "table model, step, train, test",
        "note": "why an onset is missing (table reason)",
    }

    @classmethod
    def metric_needs(cls, params: GrokkingParams) -> tuple[str, ...]:
        return () if params.train_outcome is not None else (SOURCES[params.quantity][0],)

    @classmethod
    def cost(cls, params: Any, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=0)


    def _curves(
        self, names: list[str], results: Mapping[str, Mapping[str, MetricResult]]
    ) -> tuple[dict[str, float], dict[str, float]]:
        p = self.params
        if p.train_outcome is not None and p.test_outcome is not None:
            for given in (p.train_outcome, p.test_outcome):
                unknown = sorted(set(given) - set(names))
                if unknown:
                    raise BadParameterError(
                        f"outcome names models that are not members: {unknown}", f"use the member names {names}"
                    )
            return dict(p.train_outcome), dict(p.test_outcome)
        metric, field = SOURCES[p.quantity]
        curves: tuple[dict[str, float], dict[str, float]] = ({}, {})
        for name in names:
            values = results[name][metric].values
            for curve, task in zip(curves, (p.train_task, p.test_task), strict=True):
                value = values.get(f"{field}/{task}")
                if not isinstance(value, ScalarValue) or value.value is None:
                    raise NotApplicable(
                        f"{metric} of {name} has no '{field}/{task}': grokking compares a training and a "
                        "held-out curve",
                        f"run on data with the named tasks '{p.train_task}' and '{p.test_task}' "
                        f"(data={{'{p.train_task}': ..., '{p.test_task}': ...}}) "
                        "or pass train_outcome and test_outcome",
                    )
                curve[name] = value.value
        return curves

    def compute_set(
        self, views: Mapping[str, ModelView], results: Mapping[str, Mapping[str, MetricResult]]
    ) -> dict[str, Any]:
        ckpts = order_checkpoints(list(views), self.params.steps)
        train, test = self._curves(ckpts.names, results)
        higher = self.params.quantity == "accuracy"
        t_train = onset(ckpts, train, self.params.theta, higher)
        t_test = onset(ckpts, test, self.params.theta, higher)
        notes = [
            [f"the {which} curve never reaches theta={self.params.theta}"]
            for which, t in (("training", t_train), ("held-out", t_test))
            if t is None
        ]
        delay = t_test - t_train if t_train is not None and t_test is not None else None
        ratio = t_test / t_train if t_train and t_test is not None else None
        if t_train == 0:
            notes.append(["t_train is 0: the ratio is undefined"])
        return {
            "t_train": ScalarValue(value=t_train),
            "t_test": ScalarValue(value=t_test),
            "delay": ScalarValue(value=delay),
            "ratio": ScalarValue(value=ratio),
            "curves": TableValue(
                columns=["model", "step", "train", "test"],
                rows=[[n, s, train.get(n), test.get(n)] for n, s in zip(ckpts.names, ckpts.steps, strict=True)],
            ),
            "note": TableValue(columns=["reason"], rows=notes),
        }
