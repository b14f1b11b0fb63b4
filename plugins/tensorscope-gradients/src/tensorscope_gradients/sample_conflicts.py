"""gradients.sample_conflicts: cross-task example pairs whose per-example gradients conflict."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Compression,
    Cost,
    GradientStore,
    ModelView,
    PreparedData,
    Rung,
    RunShape,
    ScalarValue,
    SeriesValue,
    Step,
    StoreBacking,
    TableValue,
    tasks_skip_reason,
)

from .common import example_texts, upper_bound_examples
from .ladders import example_rows_ladder, stored_width
from .maths import bh, fisher_z, null_p_values, robust_null
from .per_sample import ARTIFACT, mean_loss_rows, per_example_request, projected_rows, sketch_dim
from .projection import Projection
from .selection import Layout, SubsetMetric, SubsetParams, planned_size, select_parameters, subset_size


class SampleConflictParams(SubsetParams):
    compression: Compression = Field("none", description="how per-example gradients are kept: 'none', 'int8' "
                                                         "(chunked int8 quantisation) or 'int8_zlib' (int8 + zlib)")
    backing: StoreBacking = Field("memory", description="where the kept gradients live: 'memory' or 'disk' (a "
                                                        "file in the run's scratch folder; the same values)")
    projection_dim: int | None = Field(None, ge=1, description="count-sketch the gradients to this many dimensions "
                                                               "before keeping them (None: exact)")
    alpha: float = Field(0.05, gt=0, lt=1, description="false discovery rate of the Benjamini-Hochberg procedure")
    top_k: int = Field(20, ge=1, description="rows of the top_pairs table (most negative cosines)")
    min_pairs: int = Field(20, ge=3, description="fewest cross-task pairs of a task pair to fit its empirical null")
    min_conflict: float = Field(0.0, ge=0, lt=1, description="effect-size floor: a significant pair also needs "
                                                            "cosine < -min_conflict")


class SampleConflicts(SubsetMetric):
    """Per-example gradients g_i (the core's shared ``per_example_grads`` artifact, divided by
    the example's number of targets: gradient of its mean token loss; optionally a parameter
    subset, optionally compressed) and, for every pair (i, j) of examples from different tasks,
    c_ij = cos(g_i, g_j).

    Null and test (Efron's empirical null): for each task pair (A, B) with at least
    ``min_pairs`` pairs, z_ij = atanh(c_ij); the bulk of the A-B pairs is fitted robustly as
    N(d0, s0^2), d0 = median(z), s0 = 1.4826 x MAD(z). H0 for a pair: it is no more opposed
    than the typical A-B pair nor than orthogonal gradients, i.e. its z is centred at
    b = min(d0, 0) with spread s0. The one-sided p-value is p_ij = Phi((z_ij - b) / s0); the
    effect sizes are c_ij itself and the standardised score (z_ij - b) / s0. The p-values of
    all cross-task pairs are adjusted together by Benjamini-Hochberg
    (``scipy.stats.false_discovery_control``); a pair is a significant conflict when its
    adjusted p is below ``alpha`` and c_ij < -``min_conflict`` (default 0). The null assumes
    the bulk is roughly normal on the atanh scale; a heavy-tailed bulk makes the test liberal
    (see the README).

    With ``mask_metric``, only the masked entries of the selected parameters are used (the
    artifact differentiates the parameters; the entries are picked after; see the README's
    mask contract). Examples without target tokens (zero gradient) are left out. With compression the
    cosines are g~_i . g~_j / (||g_i|| ||g_j||) and ``cosine_error_bound`` bounds their
    distance from the exact cosines (see the README); with ``projection_dim`` = k they are
    Sg_i . Sg_j / (||g_i|| ||g_j||), with a standard deviation of at most sqrt(2/k)
    (``projection_error_bound``). ``backing="disk"`` keeps the gradients in a file (same values).
    Memory ladder (``ladder``): disk when the rows fit there, else int8, then projections to 4096
    and 1024 dimensions.
    """

    name = "gradients.sample_conflicts"
    supports_dispatch = True  # reads the core's per-example gradients only
    version = "1"
    summary = "cross-task example pairs with conflicting per-example gradients: p-values, effect sizes, BH FDR"
    Params = SampleConflictParams
    artifacts = (ARTIFACT,)
    fields = {"n_examples": "examples with at least one target", "n_pairs": "cross-task example pairs",
              "conflict_fraction": "fraction of cross-task pairs with cosine < 0",
              "n_significant": "pairs with BH-adjusted p < alpha and cosine < -min_conflict",
              "top_pairs": "the top_k most negative cross-task pairs: tasks, indices, cosine, effect, p, q, texts",
              "significant_pairs": "every significant pair, same columns",
              "cosines": "[n, n] cosine matrix of all examples (data order)",
              "p_values": "[n, n] one-sided p-values of cross-task pairs (NaN elsewhere)",
              "q_values": "[n, n] BH-adjusted p-values (NaN elsewhere)",
              "null_center": "empirical null of the first task pair: median of atanh(cosine) "
                             "(the test centres H0 at min(this, 0))",
              "null_scale": "empirical null of the first task pair: 1.4826 x MAD of atanh(cosine)",
              "reconstruction_error": "per example: ||g - g~|| / ||g|| (0 without compression)",
              "cosine_error_bound": "largest bound on |estimated - exact| cosine over all pairs (compression)",
              "projection_error": "RMS over examples of |sketched - exact squared norm| / ||g||^2 (0: exact)",
              "projection_error_bound": "sqrt(2 / projection_dim): bound on the SD of that error (0: exact)",
              "stored_bytes": "bytes the kept gradients take"}

    @classmethod
    def skip_reason(cls, params: SampleConflictParams, view: ModelView, data: PreparedData | None) -> str | None:
        return tasks_skip_reason(data)

    def setup(self) -> None:
        p = self.params
        self.chosen = self.subset()
        self.layouts: dict[tuple[str, ...], Layout] = {}
        size = subset_size(self.view, self.chosen)
        self.projection = Projection(size, p.projection_dim, self.shape.seed) if p.projection_dim else None
        self.parameters = select_parameters(self.view, p.parameters, p.layers)  # what the request named
        self.store = GradientStore(p.projection_dim or size, p.compression, p.backing)
        self.squares = torch.zeros(0, dtype=torch.float64)  # exact ||g_i||^2 (the store's are projected ones)
        self.tasks: list[str] = []
        self.index_in_task: list[int] = []
        self.seen: dict[str, int] = {}
        self.texts: list[str] = []
        self.n_targets = torch.zeros(0, dtype=torch.float64)

    @classmethod
    def artifact_requests(cls, params: SampleConflictParams, view: ModelView) -> dict[str, Mapping[str, Any]]:
        return per_example_request(params, view, sketch_dim(params, params.projection_dim))

    @classmethod
    def cost(cls, params: SampleConflictParams, view: ModelView, shape: RunShape) -> Cost:
        """The store (``GradientStore.declared_bytes``), the exact squared norms and target counts
        (8 bytes each per example) and the masks' entry indices."""
        index_bytes = planned_size(view, params)[1]
        n = upper_bound_examples(shape.n_sequences, shape.n_batches, shape.batch_size)
        width, item = stored_width(params, view)
        return Cost(state_bytes=GradientStore.declared_bytes(n, width, params.compression, item, params.backing)
                    + 16 * n + index_bytes,
                    flops=float(2 * n * n * width))

    @classmethod
    def ladder(cls, params: SampleConflictParams, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """Disk (exact) when the rows fit in the scratch folder's free space; else int8 (cosines
        within the reported bound), then count-sketch projections."""
        int8 = [Rung("int8", params.model_copy(update={"compression": "int8"}),
                     "cosines within +-(e_i + e_j + e_i e_j), e = each row's int8 reconstruction error "
                     "(~0.01 on Gaussian-like gradients; reported)")] if params.compression == "none" else []
        on_disk = "int8" if params.compression == "int8_zlib" else params.compression  # zlib: the same int8 codes
        return example_rows_ladder(cls, params, view, shape, on_disk, int8)

    def update(self, step: Step) -> None:
        assert step.task is not None
        g = step[ARTIFACT]
        n_targets = g.n_targets
        if self.projection is None:
            squares = self.store.add(mean_loss_rows(self.view, self.chosen, g, self.layouts))
        else:
            projected, squares = projected_rows(self.view, self.chosen, g, self.layouts, self.projection,
                                                self.parameters)
            self.store.add(projected)
        self.squares = torch.cat([self.squares, squares])
        counter = self.seen.get(step.task, 0)
        rows = n_targets.shape[0]
        self.seen[step.task] = counter + rows
        self.tasks += [step.task] * rows
        self.index_in_task += list(range(counter, counter + rows))
        self.texts += example_texts(self.view, step.batch.input_ids, step.batch.attention_mask)
        self.n_targets = torch.cat([self.n_targets, n_targets.double()])

    def finalize(self) -> dict[str, object]:
        p = self.params
        n = len(self.store)
        norms = self.squares.sqrt()
        gram = self.store.gram()
        denom = norms[:, None] * norms[None, :]
        cos = torch.where(denom > 0, gram / torch.where(denom > 0, denom, torch.ones_like(denom)),
                          torch.full_like(gram, math.nan))
        valid = ((self.n_targets > 0) & (norms > 0)).numpy()
        tasks = list(dict.fromkeys(self.tasks))
        task_of = np.array([tasks.index(t) for t in self.tasks], dtype=np.int64)
        C = cos.numpy()
        Z = fisher_z(C)
        pvals = np.full((n, n), np.nan)
        effect = np.full((n, n), np.nan)
        centers, scales = [], []
        for a in range(len(tasks)):
            for b in range(a + 1, len(tasks)):
                rows = np.where((task_of == a) & valid)[0]
                cols = np.where((task_of == b) & valid)[0]
                block = Z[np.ix_(rows, cols)]
                center, scale = robust_null(block.ravel()) if block.size >= p.min_pairs else (math.nan, math.nan)
                centers.append(center)
                scales.append(scale)
                if math.isfinite(scale):
                    bound = min(center, 0.0)  # H0: no more opposed than the typical pair, nor than orthogonal
                    for r, c in ((rows, cols), (cols, rows)):
                        both = np.ix_(r, c)
                        values = block if r is rows else block.T
                        pvals[both] = null_p_values(values, bound, scale, "lower")
                        effect[both] = (values - bound) / scale
        cross = (task_of[:, None] != task_of[None, :]) & valid[:, None] & valid[None, :]
        ii, jj = np.where(np.triu(cross, k=1))  # each unordered cross-task pair once (i < j)
        q_flat = bh(pvals[ii, jj])
        qvals = np.full((n, n), np.nan)
        qvals[ii, jj] = q_flat
        qvals[jj, ii] = q_flat
        cos_pairs = C[ii, jj]
        significant = (q_flat < p.alpha) & (cos_pairs < -p.min_conflict)

        def row(k: int) -> list[object]:
            i, j = int(ii[k]), int(jj[k])
            if task_of[i] > task_of[j]:
                i, j = j, i
            return [self.tasks[i], self.index_in_task[i], self.tasks[j], self.index_in_task[j], float(C[i, j]),
                    _num(effect[i, j]), _num(pvals[i, j]), _num(qvals[i, j]), bool(significant[k]),
                    self.texts[i], self.texts[j]]

        columns = ["task_a", "index_a", "task_b", "index_b", "cosine", "effect_z", "p_value", "q_value",
                   "significant", "text_a", "text_b"]
        by_cos = np.argsort(cos_pairs, kind="stable")
        top = [row(int(k)) for k in by_cos[:p.top_k]]
        sig = [row(int(k)) for k in by_cos if significant[k]]
        error_bound = self.store.cosine_error_bound()
        pair_bound = float(error_bound[torch.as_tensor(ii), torch.as_tensor(jj)].max()) if len(ii) else 0.0
        stored = self.store.stored_bytes
        self.store.close()
        projection = self.projection
        return {"n_examples": ScalarValue(value=int(valid.sum())),
                "n_pairs": ScalarValue(value=len(ii)),
                "conflict_fraction": ScalarValue(value=float((cos_pairs < 0).mean()) if len(ii) else math.nan,
                                                 n=len(ii)),
                "n_significant": ScalarValue(value=int(significant.sum())),
                "top_pairs": TableValue(columns=columns, rows=top),
                "significant_pairs": TableValue(columns=columns, rows=sig),
                "cosines": cos,
                "p_values": torch.from_numpy(pvals),
                "q_values": torch.from_numpy(qvals),
                "null_center": ScalarValue(value=centers[0] if centers else math.nan),
                "null_scale": ScalarValue(value=scales[0] if scales else math.nan),
                "reconstruction_error": SeriesValue(values=self.store.errors.tolist(), index_name="example"),
                "cosine_error_bound": ScalarValue(value=pair_bound),
                "projection_error": ScalarValue(value=projection.error if projection is not None else 0.0),
                "projection_error_bound": ScalarValue(value=projection.bound if projection is not None else 0.0),
                "stored_bytes": ScalarValue(value=stored, unit="bytes")}


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None
