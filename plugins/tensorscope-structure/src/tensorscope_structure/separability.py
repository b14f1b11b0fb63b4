"""structure.separability: per layer, how well the run's named tasks can be told apart (probe, MMD^2)."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    Interpretation,
    LayerValue,
    Metric,
    MetricResult,
    ModelView,
    Params,
    PreparedData,
    Rung,
    RunShape,
    ScalarValue,
    Step,
    TableValue,
    TextValue,
    fdr_bh,
    tasks_skip_reason,
)

from .probe import probe_accuracy
from .two_sample import MMDTest, mmd_test

#: the per-task cap of the ladder's subset rung
SUBSET = 256
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class SeparabilityParams(Params):
    folds: int = Field(5, ge=2, description="stratified cross-validation folds of the probe")
    c: float = Field(1.0, gt=0, description="inverse L2 regularisation strength of the logistic probe")
    n_permutations: int = Field(
        199, ge=1, description="label permutations of the MMD test; the smallest p-value is 1 / (n_permutations + 1)"
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="false discovery rate of the Benjamini-Hochberg verdicts")
    store_dtype: Literal["float64", "float32"] = Field("float64", description="dtype of the pooled vectors kept")
    max_per_task: int | None = Field(None, ge=2, description="keep only the first sequences of each task (None: all)")


def kept_per_task(params: SeparabilityParams, batches: tuple[tuple[int, int, str | None], ...]) -> dict[str, int]:
    """Sequences kept of each named task, in order of first appearance: all, or the first ``max_per_task``."""
    rows: dict[str, int] = {}
    for n, _, task in batches:
        if task is not None:
            rows[task] = rows.get(task, 0) + n
    cap = params.max_per_task
    return {t: n if cap is None else min(n, cap) for t, n in rows.items()}


class StructureSeparability(Metric):
    """Per resid entry (0: the embeddings, l: after block l), how separable the run's named tasks are.

    Each sequence is one example: the mean of its resid vectors over its real tokens (pooled per
    sequence, so the examples are independent and every test moves whole sequences; per-token
    examples would count dependent tokens as replicates). Untasked sequences are left out.

    - ``probe_accuracy``: held-out balanced accuracy (mean per-task recall; chance 1 / n_tasks) of
      a standardised L2 logistic regression (scikit-learn, inverse strength ``c``) over ``folds``
      stratified folds shuffled with the run's seed.
    - ``mmd2``: the unbiased MMD^2 (Gretton et al. 2012) between the tasks' examples with the RBF
      kernel exp(-||x - y||^2 / 2h^2), h the median distance between all pooled examples (the
      median heuristic; label-free, so fixed under permutation); with more than two tasks, the
      mean over task pairs (each pair in ``mmd2_pairs``). It can be slightly negative.
    - ``mmd_p_value``: (1 + #{permuted >= observed}) / (1 + n_permutations), task labels of the
      sequences permuted with the run's seed; ``mmd_p_adjusted`` / ``mmd_significant``:
      Benjamini-Hochberg across the resid entries at ``alpha`` (the core's ``fdr_bh``).

    Degenerate input ends skipped: fewer than two named tasks, or a task with fewer sequences
    than ``folds`` (or 2). State: the pooled vectors, n_sequences x (n_layers + 1) x d_model.
    """

    name = "structure.separability"
    supports_dispatch = True  # reads the shared capture's residual stream only
    version = "1"
    summary = "per-layer task separability: cross-validated logistic-probe accuracy and unbiased MMD^2 (BH-tested)"
    Params = SeparabilityParams
    artifacts = ("resid",)
    fields = {
        "probe_accuracy": "per resid entry: mean held-out balanced accuracy of the logistic probe",
        "probe_accuracy_sd": "per resid entry: its SD over folds",
        "chance": "1 / n_tasks",
        "mmd2": "per resid entry: unbiased MMD^2 (mean over task pairs)",
        "mmd_p_value": "per resid entry: permutation p-value",
        "mmd_p_adjusted": "per resid entry: BH-adjusted",
        "mmd_significant": "per resid entry: 1 where the BH-adjusted p < alpha",
        "bandwidth": "per resid entry: h",
        "mmd2_pairs": "table: resid entry, task a, task b, MMD^2",
        "tasks": "the tasks and their sequence counts",
        "notes": "probe fits that stopped early, entries left out",
    }

    @classmethod
    def skip_reason(cls, params: SeparabilityParams, view: ModelView, data: PreparedData | None) -> str | None:
        reason = tasks_skip_reason(data)
        if reason is not None or data is None:
            return reason
        need = max(params.folds, 2)
        short = {t: n for t, n in kept_per_task(params, data.batch_layout()).items() if n < need}
        if short:
            listed = ", ".join(f"{t!r} {n}" for t, n in short.items())
            return (
                f"every task needs at least {need} sequences for the {params.folds}-fold probe and MMD^2; "
                f"this run has {listed}: pass more data or lower folds"
            )
        return None

    @classmethod
    def cost(cls, params: SeparabilityParams, view: ModelView, shape: RunShape) -> Cost:
        n = sum(kept_per_task(params, shape.batches).values())
        itemsize = 4 if params.store_dtype == "float32" else 8
        entries = view.n_layers + 1
        flops = entries * n * n * (view.d_model + 2 * (params.n_permutations + 1))
        return Cost(state_bytes=n * entries * view.d_model * itemsize + 8 * n, flops=float(flops))

    @classmethod
    def ladder(cls, params: SeparabilityParams, view: ModelView, shape: RunShape) -> list[Rung]:
        """float32 vectors, then the first 256 sequences of each task."""
        half = params.model_copy(update={"store_dtype": "float32"})
        subset = half.model_copy(
            update={"max_per_task": SUBSET if params.max_per_task is None else min(SUBSET, params.max_per_task)}
        )
        return cls.cheaper_rungs(
            params,
            view,
            shape,
            [
                Rung(
                    "float32",
                    half,
                    "pooled vectors rounded to float32: MMD^2 within ~1e-6 relative; a probe "
                    "prediction may flip for an example on the boundary",
                ),
                Rung(
                    f"first-{SUBSET}-per-task",
                    subset,
                    f"float32, and only the first {SUBSET} sequences of each task (exact on those)",
                ),
            ],
        )

    def setup(self) -> None:
        self.kept = kept_per_task(self.params, self.shape.batches)
        self.task_names = list(self.kept)
        n = sum(self.kept.values())
        self.pooled = torch.zeros(n, self.view.n_layers + 1, self.view.d_model, dtype=DTYPES[self.params.store_dtype])
        self.labels = torch.zeros(n, dtype=torch.int64)
        self.seen = dict.fromkeys(self.task_names, 0)
        self.filled = 0

    def update(self, step: Step) -> None:
        task = step.task
        if task is None:
            return
        rows = min(step.batch.input_ids.shape[0], self.kept[task] - self.seen[task])
        if rows <= 0:
            return
        mask = step.batch.attention_mask[:rows].double().unsqueeze(-1)  # [rows, seq, 1]
        pooled = torch.stack(
            [(x[:rows].double() * mask.to(x.device)).sum(1) / mask.sum(1).to(x.device) for x in step["resid"]], dim=1
        )
        self.pooled[self.filled : self.filled + rows] = pooled.cpu().to(self.pooled.dtype)
        self.labels[self.filled : self.filled + rows] = self.task_names.index(task)
        self.seen[task] += rows
        self.filled += rows

    def finalize(self) -> dict[str, Any]:
        p, seed = self.params, self.shape.seed
        labels = self.labels[: self.filled].numpy()
        n_tasks = len(self.task_names)
        accuracy: list[float] = []
        spread: list[float] = []
        tests: list[MMDTest | None] = []
        notes: list[str] = []
        stopped: list[str] = []
        for entry in range(self.view.n_layers + 1):
            x = self.pooled[: self.filled, entry].double()
            mean, sd, early = probe_accuracy(x.numpy(), labels, p.folds, p.c, seed)
            accuracy.append(mean)
            spread.append(sd)
            if early:
                stopped.append(str(entry))
            try:
                tests.append(mmd_test(x, labels, n_tasks, p.n_permutations, np.random.default_rng([seed, 3, entry])))
            except ValueError as exc:
                tests.append(None)
                notes.append(f"resid entry {entry}: MMD^2 left out, {exc}")
        if stopped:
            notes.append(f"probe fits stopped before converging at resid entries {', '.join(stopped)}")
        return self._values(accuracy, spread, tests, notes)

    def _values(
        self, accuracy: list[float], spread: list[float], tests: list[MMDTest | None], notes: list[str]
    ) -> dict[str, Any]:
        nan = float("nan")
        p_values = [nan if t is None else t.p_value for t in tests]
        reject, adjusted = fdr_bh(p_values, self.params.alpha)

        def layer(values: Any) -> LayerValue:
            return LayerValue(values=[float(v) for v in values], axis="resid")

        pairs = [(a, b) for i, a in enumerate(self.task_names) for b in self.task_names[i + 1 :]]
        rows = [
            [entry, a, b, value]
            for entry, t in enumerate(tests)
            if t is not None
            for (a, b), value in zip(pairs, t.pairs, strict=True)
        ]
        counts = ", ".join(f"{t} ({self.seen[t]})" for t in self.task_names)
        return {
            "probe_accuracy": layer(accuracy),
            "probe_accuracy_sd": layer(spread),
            "chance": ScalarValue(value=1 / len(self.task_names)),
            "mmd2": layer(nan if t is None else t.mmd2 for t in tests),
            "mmd_p_value": layer(p_values),
            "mmd_p_adjusted": layer(adjusted),
            "mmd_significant": layer(nan if math.isnan(q) else float(r) for q, r in zip(p_values, reject, strict=True)),
            "bandwidth": layer(nan if t is None else t.bandwidth for t in tests),
            "mmd2_pairs": TableValue(columns=["resid", "task_a", "task_b", "mmd2"], rows=rows),
            "tasks": TextValue(text=counts),
            "notes": TextValue(text="; ".join(notes) or "none"),
        }

    @classmethod
    def interpret(cls, result: MetricResult) -> list[Interpretation]:
        """The first resid entry where the tasks' distributions differ (BH-adjusted MMD test)."""
        significant = [i for i, s in enumerate(result.value("mmd_significant")) if s == 1.0]
        if not significant:
            return [Interpretation(text="no resid entry separates the tasks (MMD test, BH-adjusted)")]
        return [
            Interpretation(
                text=f"tasks differ in distribution from resid entry {significant[0]} on "
                f"({len(significant)} entries significant after BH)",
                where=f"resid {significant[0]}",
            )
        ]
