"""TracIn over checkpoints: per-checkpoint terms (per model), TracInCP and critical samples (model set)."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    GradientStore,
    MetricResult,
    ModelSetMetric,
    ModelView,
    Params,
    PreparedData,
    Rung,
    RunShape,
    ScalarValue,
    SeriesValue,
    Step,
    StoreBacking,
    TableValue,
    TextValue,
    row_squares,
)

from .checkpoints import CheckpointRate, learning_rates
from .common import example_texts, upper_bound_examples
from .interpolation import PathGradients, copy_bytes, path_tasks, point_calls
from .ladders import example_rows_ladder, stored_width
from .maths import bh, interpolation_weights, null_p_values, robust_null
from .per_sample import ARTIFACT, mean_loss_rows, per_example_request, projected_rows, sketch_dim
from .projection import Projection
from .selection import Layout, SubsetMetric, SubsetParams, planned_size, select_parameters, subset_size

TERMS = "gradients.tracin_terms"


class TermsParams(SubsetParams):
    train_task: str = Field("train", description="the named task holding the training examples")
    test_task: str = Field("test", description="the named task holding the test (held-out) examples")
    projection_dim: int | None = Field(None, ge=1, description="count-sketch the gradients to this many "
                                                               "dimensions (None: exact dot products)")
    backing: StoreBacking = Field("memory", description="where the kept gradients live: 'memory' or 'disk' (a "
                                                        "file in the run's scratch folder; the same values)")


class TracInTerms(SubsetMetric):
    """The TracIn terms of one checkpoint: for training examples z (task ``train_task``) and
    test examples z' (task ``test_task``), the dot products g(z) . g(z') and the squared norms
    ||g(z)||^2, ||g(z')||^2 of the per-example gradients (the core's shared ``per_example_grads``
    artifact, divided by the example's number of targets: gradient of its mean token loss),
    optionally on a parameter subset
    (names, blocks, and the masked entries of a ``mask_metric``) and/or count-sketch
    projected to ``projection_dim`` dimensions (the squared norms stay exact), kept in RAM or on
    disk (``backing``; the same values). Memory ladder: disk when the rows fit there, else
    projections to 4096 and 1024 dimensions.
    ``gradients.tracin`` and ``gradients.critical_samples`` weight and sum them over the
    checkpoints of a model set; this metric's parameters choose the tasks, the subset and
    the projection for both.
    """

    name = TERMS
    supports_dispatch = True  # reads the core's per-example gradients only
    version = "1"
    summary = "per-checkpoint train x test per-example gradient dot products (the terms of TracIn)"
    Params = TermsParams
    artifacts = (ARTIFACT,)
    fields = {"dots": "table train_index, test_index, g(train) . g(test)",
              "train_self": "||g(z)||^2 per training example", "test_self": "||g(z')||^2 per test example",
              "examples": "table split, index, loss, n_targets, text",
              "n_train": "training examples", "n_test": "test examples",
              "projection_error": "RMS over examples of |sketched - exact squared norm| / ||g||^2 (0: exact)",
              "projection_error_bound": "sqrt(2 / projection_dim): bound on the SD of that error (0: exact)"}

    @classmethod
    def skip_reason(cls, params: TermsParams, view: ModelView, data: PreparedData | None) -> str | None:
        tasks = data.tasks if data is not None else []
        missing = [t for t in (params.train_task, params.test_task) if t not in tasks]
        if missing:
            return (f"needs named tasks {params.train_task!r} (training examples) and {params.test_task!r} "
                    f"(test examples) in the data, e.g. data={{{params.train_task!r}: [...], "
                    f"{params.test_task!r}: [...]}}; missing {missing}, the run has {tasks or 'no named tasks'}")
        return None

    def setup(self) -> None:
        p = self.params
        self.chosen = self.subset()
        self.layouts: dict[tuple[str, ...], Layout] = {}
        size = subset_size(self.view, self.chosen)
        self.projection = Projection(size, p.projection_dim, self.shape.seed) if p.projection_dim else None
        self.parameters = select_parameters(self.view, p.parameters, p.layers)  # what the request named
        width = p.projection_dim or size
        self.train = GradientStore(width, backing=p.backing)
        self.test = GradientStore(width, backing=p.backing)
        self.train_self = torch.zeros(0, dtype=torch.float64)
        self.test_self = torch.zeros(0, dtype=torch.float64)
        self.meta: dict[str, list[tuple[float, float, str]]] = {"train": [], "test": []}

    @classmethod
    def artifact_requests(cls, params: TermsParams, view: ModelView) -> dict[str, Mapping[str, Any]]:
        return per_example_request(params, view, sketch_dim(params, params.projection_dim))

    @classmethod
    def cost(cls, params: TermsParams, view: ModelView, shape: RunShape) -> Cost:
        index_bytes = planned_size(view, params)[1]
        n = upper_bound_examples(shape.n_sequences, shape.n_batches, shape.batch_size)
        width, item = stored_width(params, view)
        return Cost(state_bytes=GradientStore.declared_bytes(n, width, "none", item, params.backing) + 8 * n
                    + index_bytes)

    @classmethod
    def ladder(cls, params: TermsParams, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """Disk (exact) when the rows fit in the scratch folder's free space; else count-sketch projections."""
        return example_rows_ladder(cls, params, view, shape, "none", ())

    def update(self, step: Step) -> None:
        splits = [s for s, task in (("train", self.params.train_task), ("test", self.params.test_task))
                  if step.task == task]
        if not splits:
            return
        g = step[ARTIFACT]
        loss, n_targets = g.loss, g.n_targets
        if self.projection is None:
            rows = mean_loss_rows(self.view, self.chosen, g, self.layouts)
            squares = row_squares(rows.cpu())
        else:
            rows, squares = projected_rows(self.view, self.chosen, g, self.layouts, self.projection, self.parameters)
        texts = example_texts(self.view, step.batch.input_ids, step.batch.attention_mask)
        for split in splits:
            (self.train if split == "train" else self.test).add(rows)
            if split == "train":
                self.train_self = torch.cat([self.train_self, squares])
            else:
                self.test_self = torch.cat([self.test_self, squares])
            self.meta[split] += [(float(a), float(b), t) for a, b, t in zip(loss, n_targets, texts, strict=True)]

    def finalize(self) -> dict[str, object]:
        dots = self.train.cross(self.test)
        self.train.close()
        self.test.close()
        n_train, n_test = dots.shape
        ii, jj = torch.meshgrid(torch.arange(n_train), torch.arange(n_test), indexing="ij")
        rows = [[int(i), int(j), float(d)] for i, j, d in zip(ii.flatten(), jj.flatten(), dots.flatten(), strict=True)]
        examples = [[split, k, loss, n, text] for split in ("train", "test")
                    for k, (loss, n, text) in enumerate(self.meta[split])]
        projection = self.projection
        return {"dots": TableValue(columns=["train_index", "test_index", "dot"], rows=rows),
                "train_self": SeriesValue(values=self.train_self.tolist(), index_name="train_index"),
                "test_self": SeriesValue(values=self.test_self.tolist(), index_name="test_index"),
                "examples": TableValue(columns=["split", "index", "loss", "n_targets", "text"], rows=examples),
                "n_train": ScalarValue(value=n_train), "n_test": ScalarValue(value=n_test),
                "projection_error": ScalarValue(value=projection.error if projection is not None else 0.0),
                "projection_error_bound": ScalarValue(value=projection.bound if projection is not None else 0.0)}



class CheckpointParams(Params):
    learning_rates: list[float] | dict[str, float] | None = Field(
        None, description="learning rate per checkpoint: a list in model order or {model name: rate}; "
                          "None: read trainer_state.json in each checkpoint folder")
    default_learning_rate: float | None = Field(
        None, gt=0, description="rate for checkpoints with neither learning_rates nor trainer_state.json")


@dataclass
class Combined:
    influence: torch.Tensor  # [n_train, n_test]
    self_influence: torch.Tensor  # [n_train]
    test_self_influence: torch.Tensor  # [n_test]
    rates: list[CheckpointRate]
    path_points: int  # interior points of the path evaluated (0: TracInCP)
    train_texts: list[str]
    test_texts: list[str]
    projection_error: float
    projection_error_bound: float
    terms_params: dict[str, object]


#: rows of a ``dots`` table parsed at a time (bounds the parsing scratch: 40 bytes a row)
PARSE_ROWS = 1 << 16


def _dots(result: MetricResult) -> torch.Tensor:
    n_train, n_test = int(result.value("n_train")), int(result.value("n_test"))
    out = torch.zeros(n_train, n_test, dtype=torch.float64)
    rows = result.values["dots"].rows  # type: ignore[union-attr]
    for start in range(0, len(rows), PARSE_ROWS):
        arr = np.asarray(rows[start:start + PARSE_ROWS], dtype=np.float64)
        out[torch.as_tensor(arr[:, 0].astype(np.int64)), torch.as_tensor(arr[:, 1].astype(np.int64))] = \
            torch.from_numpy(arr[:, 2])
    return out


def split_sizes(shape: RunShape) -> tuple[int, int]:
    """(training, test) examples each checkpoint's ``gradients.tracin_terms`` sees, from the run's
    batches: the rows of its default tasks (``train``, ``test``); where the run lacks either, the
    two largest tasks (the largest train x test product any two tasks can give). A model-set cost
    sees only its own parameters, not those of ``gradients.tracin_terms``: with other task names
    chosen there while ``train`` and ``test`` also exist, this follows ``train`` and ``test``."""
    train, test = default_tasks(shape)
    rows = {train: 0, test: 0}
    for n, _, task in shape.batches:
        if task in rows:
            rows[task] += n
    return rows[train], rows[test]


def default_tasks(shape: RunShape) -> tuple[str | None, str | None]:
    """``path_tasks`` with ``gradients.tracin_terms``' default task names."""
    train, test = (TermsParams.model_fields[f].default for f in ("train_task", "test_task"))
    return path_tasks(shape, train, test)


class CheckpointSetMetric(ModelSetMetric):
    """Base of the model-set metrics that sum the checkpoints' ``gradients.tracin_terms``
    (TracInCP) one checkpoint at a time.

    State (all float64, see ``cost``): the running sums ``influence`` [n_train, n_test],
    ``self_influence`` [n_train] and ``test_self_influence`` [n_test], and the checkpoint being
    added (``checkpoint_dots`` [n_train, n_test], ``checkpoint_selfs``: [n_train] and [n_test]),
    whatever the number of checkpoints.
    """

    requires_metrics = (TERMS,)
    reads_weights = False  # the checkpoints' tracin_terms and their names/configs (learning rates) only
    #: what computes the interior points' terms (a hand-built model's closed form in the known-answer tests)
    path_gradients: ClassVar[type[PathGradients]] = PathGradients

    @classmethod
    def cost(cls, params: CheckpointParams, view: ModelView, shape: RunShape) -> Cost:
        """Two [n_train, n_test] matrices and four per-example vectors in float64 (see the class);
        n_train, n_test from ``split_sizes``."""
        n_train, n_test = split_sizes(shape)
        return Cost(state_bytes=8 * (2 * n_train * n_test + 2 * (n_train + n_test)))

    def setup(self) -> None:
        self.influence = torch.zeros(0, dtype=torch.float64)
        self.self_influence = torch.zeros(0, dtype=torch.float64)
        self.test_self_influence = torch.zeros(0, dtype=torch.float64)
        self.checkpoint_dots = torch.zeros(0, dtype=torch.float64)
        self.checkpoint_selfs: tuple[torch.Tensor, ...] = ()

    def combine(self, views: Mapping[str, ModelView], results: Mapping[str, Mapping[str, MetricResult]],
                points: int = 0) -> Combined:
        """TracInCP over the model set from each checkpoint's ``gradients.tracin_terms``: the sums of
        ``maths.combine_checkpoints`` (the same operations in the same order), added one checkpoint at
        a time into the running sums instead of over a list of every checkpoint's matrices. With
        ``points`` > 0, each checkpoint but the last weighs eta / (points + 1) and the interior points
        of each interval are added after the checkpoints (``maths.interpolation_weights``)."""
        params: CheckpointParams = self.params
        rates = learning_rates(dict(views), params.learning_rates, params.default_learning_rate)
        weights, interior = interpolation_weights([r.learning_rate for r in rates], points)
        terms = [results[rate.model][TERMS] for rate in rates]
        shapes = []
        for weight, result in zip(weights, terms, strict=True):
            self.checkpoint_dots = torch.zeros(0, dtype=torch.float64)  # dropped before the next is parsed
            self.checkpoint_dots = dots = _dots(result)
            self.checkpoint_selfs = selfs = (torch.tensor(result.value("train_self"), dtype=torch.float64),
                                             torch.tensor(result.value("test_self"), dtype=torch.float64))
            shapes.append(tuple(dots.shape))
            if len(set(shapes)) > 1:
                continue  # an error, raised below once every checkpoint's shape is known
            if len(shapes) == 1:
                self.influence = torch.zeros_like(dots, dtype=torch.float64)
                self.self_influence = torch.zeros_like(selfs[0], dtype=torch.float64)
                self.test_self_influence = torch.zeros_like(selfs[1], dtype=torch.float64)
            self.add(weight, dots, *selfs)
        if len(set(shapes)) != 1:
            raise ValueError(f"the checkpoints saw different numbers of train x test examples {sorted(set(shapes))}: "
                             "run every checkpoint on the same data")
        if interior:
            self.add_path(views, terms[0], interior)
        examples = terms[0].values["examples"].rows  # type: ignore[union-attr]
        return Combined(self.influence, self.self_influence, self.test_self_influence, rates, len(interior),
                        [str(r[4]) for r in examples if r[0] == "train"],
                        [str(r[4]) for r in examples if r[0] == "test"],
                        max(float(t.value("projection_error") or 0.0) for t in terms),
                        max(float(t.value("projection_error_bound") or 0.0) for t in terms),
                        dict(terms[0].params))


    def add(self, weight: float, dots: torch.Tensor, train_self: torch.Tensor, test_self: torch.Tensor) -> None:
        """Add one point's terms, times its weight, into the running sums (``dots`` is scaled in place)."""
        self.influence.add_(dots.mul_(weight))
        self.self_influence.add_(train_self.mul_(weight))
        self.test_self_influence.add_(test_self.mul_(weight))

    def add_path(self, views: Mapping[str, ModelView], terms: MetricResult,
                 interior: list[tuple[int, float, float]]) -> None:
        """Add the interior points (interval i, t, weight): theta(t) between checkpoints i and i + 1, built
        one at a time on one copy of the model (``PathGradients``, kept as ``self.path``)."""
        members = list(views)
        first = views[members[0]]
        self.path = path = self.path_gradients(first, terms.params, self.shape.seed)
        tasks = default_tasks(self.shape)
        if {path.train_task, path.test_task} != set(tasks):
            raise ValueError(f"interpolation runs the tasks {path.train_task!r} and {path.test_task!r} of "
                             f"gradients.tracin_terms, but its declared passes follow {tasks[0]!r} and {tasks[1]!r} "
                             "(a model-set metric sees the run's batches, not the terms' parameters): name the "
                             "tasks 'train' and 'test'")
        with path.view() as view:
            for i, t, weight in interior:
                path.move_to(views[members[i]], views[members[i + 1]], t)
                self.checkpoint_dots = torch.zeros(0, dtype=torch.float64)  # the last point's make way
                targets = functools.partial(self.loss_targets, views[members[i]])
                self.checkpoint_dots, *selfs = path.terms(view, self.data[members[i]], targets)
                self.checkpoint_selfs = tuple(selfs)
                self.add(weight, self.checkpoint_dots, *selfs)


class TracInParams(CheckpointParams):
    top_k: int = Field(5, ge=1, description="proponents and opponents listed per test example")
    interpolation_points: int = Field(
        0, ge=0, description="n points per interval between consecutive checkpoints (in the order the models "
                             "were given), theta(t) = (1-t) theta_i + t theta_i+1 at t = k/(n+1), each interval's "
                             "learning rate split evenly over its n+1 sub-steps (0: TracInCP)")


class TracIn(CheckpointSetMetric):
    """TracInCP (Pruthi et al. 2020) over the model set's checkpoints c with learning rates eta_c:

        TracIn(z, z') = sum_c eta_c g_c(z) . g_c(z'),    self-influence(z) = sum_c eta_c ||g_c(z)||^2

    with g_c the gradient of an example's mean token loss at checkpoint c (from each
    checkpoint's ``gradients.tracin_terms``: training examples from its ``train_task``, test
    examples from its ``test_task``). Learning rates: ``learning_rates`` if given, else the
    last logged ``learning_rate`` of each checkpoint folder's trainer_state.json (HF Trainer),
    else ``default_learning_rate``. Positive influence = proponent (a step on z lowers the
    loss on z'), negative = opponent.

    With ``interpolation_points`` n > 0, the path between consecutive checkpoints i, i + 1 (in the
    order the models were given) is sampled at theta(t) = (1 - t) theta_i + t theta_{i+1},
    t = k / (n + 1), k = 1..n, and interval i's learning rate eta_i is split evenly over its n + 1
    sub-steps (checkpoint i and its n interior points, eta_i / (n + 1) each; the last checkpoint
    keeps its eta): a left Riemann sum of eta_i * integral_0^1 g(t) . g'(t) dt per interval, which
    is TracInCP at n = 0. The interior gradients are computed here, one point at a time on one
    extra copy of the model, with the parameters and projection of ``gradients.tracin_terms``
    (declared as per-example backward passes; a ``mask_metric`` subset is refused).
    """

    name = "gradients.tracin"
    version = "2"
    summary = "TracInCP influence of training examples on test examples over checkpoints (optionally along the " \
              "interpolated path between them); self-influence"
    Params = TracInParams
    reads_weights = True  # the checkpoints' weights are the ends of the interpolated path
    fields = {"influence": "[n_train, n_test] TracInCP influence", "self_influence": "per training example",
              "test_self_influence": "per test example",
              "top_proponents": "per test example the top_k training examples with the largest positive influence",
              "top_opponents": "per test example the top_k training examples with the most negative influence",
              "checkpoints": "table model, step, learning_rate, source", "n_checkpoints": "checkpoints summed",
              "path_points": "interior points of the path between checkpoints evaluated "
                             "((checkpoints - 1) x interpolation_points; 0: TracInCP)",
              "projection_error": "largest projection_error of the checkpoints' terms (0: exact)",
              "projection_error_bound": "sqrt(2 / projection_dim) (0: exact)"}

    @classmethod
    def uses_data(cls, params: TracInParams) -> bool:
        return params.interpolation_points > 0

    @classmethod
    def own_passes(cls, params: TracInParams, view: ModelView, shape: RunShape, members: Sequence[str],
                   base_name: str | None) -> dict[str, int]:
        """A per-example backward of every batch of the training and test tasks at each interior point."""
        points = (len(members) - 1) * params.interpolation_points
        return {"per_example_backward": points * point_calls(view, shape, default_tasks(shape))} if points > 0 else {}

    @classmethod
    def cost(cls, params: CheckpointParams, view: ModelView, shape: RunShape) -> Cost:
        """The running sums (see ``CheckpointSetMetric``) and, with interpolation, one copy of the model
        and the test examples' gradients at the current point, float64 [n_test, trainable entries] (an
        upper bound where the terms use a parameter subset or a projection, which a model-set cost
        does not see)."""
        sums = super().cost(params, view, shape).state_bytes
        if not isinstance(params, TracInParams) or params.interpolation_points == 0:
            return Cost(state_bytes=sums)
        n_test = split_sizes(shape)[1]
        width = sum(p.numel() for p in view.model.parameters() if p.requires_grad)
        return Cost(state_bytes=sums + copy_bytes(view) + 8 * n_test * width)

    def compute_set(self, views: Mapping[str, ModelView],
                    results: Mapping[str, Mapping[str, MetricResult]]) -> dict[str, object]:
        c = self.combine(views, results, self.params.interpolation_points)
        infl = c.influence
        k = self.params.top_k
        pro, opp = [], []
        for j in range(infl.shape[1]):
            order = torch.argsort(infl[:, j], descending=True, stable=True).tolist()
            pro += [[j, r, i, float(infl[i, j]), c.test_texts[j], c.train_texts[i]]
                    for r, i in enumerate([i for i in order if infl[i, j] > 0][:k])]
            opp += [[j, r, i, float(infl[i, j]), c.test_texts[j], c.train_texts[i]]
                    for r, i in enumerate([i for i in reversed(order) if infl[i, j] < 0][:k])]
        columns = ["test_index", "rank", "train_index", "influence", "test_text", "train_text"]
        return {"influence": infl if infl.numel() > 1 else ScalarValue(value=float(infl.sum())),
                "self_influence": SeriesValue(values=c.self_influence.tolist(), index_name="train_index"),
                "test_self_influence": SeriesValue(values=c.test_self_influence.tolist(), index_name="test_index"),
                "top_proponents": TableValue(columns=columns, rows=pro),
                "top_opponents": TableValue(columns=columns, rows=opp),
                "checkpoints": TableValue(columns=["model", "step", "learning_rate", "source"],
                                          rows=[[r.model, r.step, r.learning_rate, r.source] for r in c.rates]),
                "n_checkpoints": ScalarValue(value=len(c.rates)),
                "path_points": ScalarValue(value=c.path_points),
                "projection_error": ScalarValue(value=c.projection_error),
                "projection_error_bound": ScalarValue(value=c.projection_error_bound)}


class CriticalParams(CheckpointParams):
    alpha: float = Field(0.05, gt=0, lt=1, description="false discovery rate of the Benjamini-Hochberg procedure")
    min_examples: int = Field(8, ge=3, description="fewest training examples for the tests (else no test)")


class CriticalSamples(CheckpointSetMetric):
    """Training examples that hurt the held-out set or stand out by self-influence, from TracInCP
    over the model set (as ``gradients.tracin``).

    - Negative influence: m_i = mean over test examples of TracIn(z_i, z'). Null: m_i is a
      draw from the distribution over all training examples, fitted robustly as
      N(median(m), (1.4826 MAD(m))^2); p_i = Phi((m_i - median) / scale) (lower tail).
      Flagged when the BH-adjusted p (``scipy.stats.false_discovery_control``) < ``alpha``
      and m_i < 0. ``negative_fraction`` is the share of test examples with negative influence.
    - High self-influence: the same robust null on log self-influence, upper tail.

    Below ``min_examples`` training examples nothing is tested (p-values NaN).
    """

    name = "gradients.critical_samples"
    version = "1"
    summary = "training examples with significantly negative influence or unusually high self-influence"
    Params = CriticalParams
    fields = {"mean_influence": "per training example: mean TracIn influence on the test examples",
              "negative_fraction": "per training example: share of test examples it influences negatively",
              "negative_q": "per training example: BH-adjusted p of the negative-influence test",
              "self_influence_q": "per training example: BH-adjusted p of the high-self-influence test",
              "negative_influence": "table of flagged examples: index, mean influence, negative fraction, z, p, q, "
                                    "text",
              "high_self_influence": "table of flagged examples: index, self-influence, z, p, q, text",
              "n_negative": "examples flagged for negative influence",
              "n_high_self_influence": "examples flagged for high self-influence",
              "diagnosis": "plain-language summary and suggested check"}

    def setup(self) -> None:
        super().setup()
        #: 1.0 where the influence is negative [n_train, n_test]: takes the place of the checkpoint's matrix
        self.negative = torch.zeros(0, dtype=torch.float64)

    def compute_set(self, views: Mapping[str, ModelView],
                    results: Mapping[str, Mapping[str, MetricResult]]) -> dict[str, object]:
        c = self.combine(views, results)
        p = self.params
        n = c.influence.shape[0]
        mean = c.influence.mean(dim=1).numpy() if c.influence.shape[1] else np.full(n, np.nan)
        if c.influence.shape[1]:  # the sums are complete: the checkpoint's matrix makes way for the signs
            self.checkpoint_dots = torch.zeros(0, dtype=torch.float64)
            self.negative = (c.influence < 0).double()
        neg_frac = self.negative.mean(dim=1).numpy() if c.influence.shape[1] else np.full(n, np.nan)
        selfs = c.self_influence.numpy()
        with np.errstate(divide="ignore"):
            log_self = np.where(selfs > 0, np.log(np.where(selfs > 0, selfs, 1.0)), np.nan)
        nan = np.full(n, np.nan)
        p_neg, z_neg, p_self, z_self = nan, nan, nan, nan
        if n >= p.min_examples:
            center, scale = robust_null(mean)
            if math.isfinite(scale):
                z_neg = (mean - center) / scale
                p_neg = null_p_values(mean, center, scale, "lower")
            center, scale = robust_null(log_self)
            if math.isfinite(scale):
                z_self = (log_self - center) / scale
                p_self = null_p_values(log_self, center, scale, "upper")
        q_neg, q_self = bh(p_neg), bh(p_self)
        flag_neg = [i for i in range(n) if q_neg[i] < p.alpha and mean[i] < 0]
        flag_self = [i for i in range(n) if q_self[i] < p.alpha]
        neg_rows: list[list[object]] = [
            [i, float(mean[i]), float(neg_frac[i]), float(z_neg[i]), float(p_neg[i]), float(q_neg[i]),
             c.train_texts[i]] for i in sorted(flag_neg, key=lambda i: float(mean[i]))]
        self_rows: list[list[object]] = [
            [i, float(selfs[i]), float(z_self[i]), float(p_self[i]), float(q_self[i]), c.train_texts[i]]
            for i in sorted(flag_self, key=lambda i: -float(selfs[i]))]
        return {"mean_influence": SeriesValue(values=mean.tolist(), index_name="train_index"),
                "negative_fraction": SeriesValue(values=neg_frac.tolist(), index_name="train_index"),
                "negative_q": SeriesValue(values=q_neg.tolist(), index_name="train_index"),
                "self_influence_q": SeriesValue(values=q_self.tolist(), index_name="train_index"),
                "negative_influence": TableValue(columns=["train_index", "mean_influence", "negative_fraction", "z",
                                                          "p_value", "q_value", "text"], rows=neg_rows),
                "high_self_influence": TableValue(columns=["train_index", "self_influence", "z", "p_value",
                                                           "q_value", "text"], rows=self_rows),
                "n_negative": ScalarValue(value=len(flag_neg)),
                "n_high_self_influence": ScalarValue(value=len(flag_self)),
                "diagnosis": TextValue(text=_diagnosis(flag_neg, flag_self, n, p))}


def _diagnosis(neg: list[int], high: list[int], n: int, p: CriticalParams) -> str:
    if n < p.min_examples:
        return f"only {n} training examples: at least {p.min_examples} are needed to test for critical samples"
    lines = []
    if neg:
        lines.append(f"sample{'s' if len(neg) > 1 else ''} {', '.join(map(str, neg))} "
                     f"{'have' if len(neg) > 1 else 'has'} negative influence on the test set: "
                     f"check for corrupted or mislabelled data")
    if high:
        lines.append(f"sample{'s' if len(high) > 1 else ''} {', '.join(map(str, high))} "
                     f"{'have' if len(high) > 1 else 'has'} unusually high self-influence: check for mislabelled, "
                     f"duplicated or atypical data")
    return "; ".join(lines) if lines else f"no critical training samples at false discovery rate {p.alpha:g}"
