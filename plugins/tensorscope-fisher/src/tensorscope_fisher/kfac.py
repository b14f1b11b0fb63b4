"""fisher.kfac: Kronecker-factored Fisher (K-FAC) factors of the Linear layers and their capacity."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    LayerValue,
    Metric,
    ModelView,
    Params,
    PreparedData,
    Rung,
    RunShape,
    ScalarValue,
    Step,
    TableValue,
)

from .kfac_stats import (
    ARTIFACT,
    KfacStats,
    Labels,
    block_linears,
    factor_bytes,
    factor_dims,
    is_diagonal,
    served_as_asked,
)
from .kronecker import factor_eigenvalues, kron_capacity
from .values import finite_or_none

CAPACITY_COLUMNS = ["module", "layer", "dim_A", "dim_G", "trace", "logdet", "cond", "eigmax", "eigmin", "diagonal"]
#: the ladder's thresholds: factors above each are kept as their diagonals (0: every factor)
DIAGONAL_RUNGS = (2048, 1024, 512, 0)


class FactorParams(Params):
    """What selects and shapes the K-FAC factors (fisher.kfac, fisher.natural_gradient)."""

    modules: tuple[str, ...] = Field(("*",), description="fnmatch patterns over module names (as in "
                                     "model.named_modules()); the Linear/Conv1D modules inside the blocks that "
                                     "match any of them are analysed")
    labels: Labels = Field("sampled", description="'sampled': y drawn from the model (true Fisher); "
                           "'observed': the data's next tokens (empirical Fisher)")
    diagonal_over: int | None = Field(
        None, ge=0, description="factors of more rows than this are accumulated as their diagonal only (d instead "
        "of d x d values); their eigenvalues are taken to be the diagonal's entries; None: every factor in full")


FactorParamsT = TypeVar("FactorParamsT", bound=FactorParams)


def diagonal_rungs(params: FactorParamsT, state_bytes: Callable[[FactorParamsT], int], effect: str) -> list[Rung]:
    """The rungs of a metric that holds K-FAC factor sums: factors above 2048, 1024, 512 rows, then every
    factor, kept as their diagonals, each offered only where it holds less than the one before;
    ``effect`` says what a diagonal factor does to the metric's values."""
    out: list[Rung] = []
    last = state_bytes(params)
    for over in DIAGONAL_RUNGS:
        if params.diagonal_over is not None and over >= params.diagonal_over:
            continue
        rung = params.model_copy(update={"diagonal_over": over})
        held = state_bytes(rung)
        if held < last:
            which = "every factor" if over == 0 else f"factors over {over} rows"
            out.append(Rung("diagonal" if over == 0 else f"diagonal-over-{over}", rung,
                            f"{which} kept as their diagonals: {effect}"))
            last = held
    return out


class KfacParams(FactorParams):
    damping: float = Field(1e-3, ge=0.0, description="λ added to A ⊗ G for logdet and cond (0: undamped)")
    keep_factors: bool = Field(True, description="return the factors A and G of every module as tensors")


def selected_modules(params: FactorParams, view: ModelView) -> list[str]:
    return [n for n in block_linears(view) if any(fnmatch.fnmatchcase(n, p) for p in params.modules)]


class Kfac(Metric):
    """K-FAC (Martens & Grosse 2015) for the Linear and GPT-2 Conv1D modules inside the blocks.

    For a module ``s = W ā`` (``ā = [a; 1]`` with a bias), ``F_W ≈ A ⊗ G`` with ``A = E[ā āᵀ]`` and
    ``G = E[g gᵀ]``, ``g = ∂ log p(y|x) / ∂ s``, y drawn from the model (the true Fisher; ``labels=
    'observed'`` gives the empirical Fisher). Each token position is an example (causal models: the
    positions with a loss target; encoders: every real token; see ``fisher.kfac_stats``); ``g`` is
    the gradient of the sequence's summed log-likelihood, so ``vec(∇W) = Σ_t ā_t ⊗ g_t`` and with a
    single example ``A ⊗ G = vec(∇W) vec(∇W)ᵀ`` exactly. Vec order: column-major ``vec`` of the
    ``[out, in(+1)]`` matrix ``[W | b]`` gives ``A ⊗ G``; PyTorch's row-major flatten of an
    ``nn.Linear`` weight ``[out, in]`` gives ``G ⊗ A``, of a ``Conv1D`` weight ``[in, out]`` ``A ⊗ G``.

    Capacity of ``A ⊗ G`` from the factors' eigenvalues (``eig(A ⊗ G) = {a_i g_j}``, no Kronecker
    product is formed): ``trace = tr A · tr G``; ``logdet = Σ_ij log(a_i g_j + λ)`` (at ``λ = 0``:
    ``dim G · logdet A + dim A · logdet G``); ``cond = (a_max g_max + λ) / (a_min g_min + λ)``;
    ``eigmax``, ``eigmin`` undamped. ``λ`` (``damping``, 1e-3 as in KFAC-PyTorch) is Tikhonov damping
    of the product, so logdet and cond stay finite when a factor is singular (``A`` always is when
    there are fewer examples than inputs). Per layer, the block-diagonal K-FAC over its modules
    sums trace and logdet.
    """

    name = "fisher.kfac"
    supports_dispatch = True  # reads the shared pass's module inputs and output gradients only
    version = "1"
    summary = "K-FAC factors A, G per Linear layer and the trace / log-det / condition of A ⊗ G"
    Params = KfacParams
    artifacts = (ARTIFACT,)
    fields = {
        "capacity": "table: module, layer, dim_A, dim_G, trace, logdet, cond, eigmax, eigmin of A ⊗ G "
                    "(null where infinite: damping 0 and a singular factor), diagonal: which factors are "
                    "diagonals (none, A, G, A+G)",
        "trace": "per layer, Σ over its modules of tr A · tr G",
        "logdet": "per layer, Σ over its modules of logdet(A ⊗ G + damping·I)",
        "n_examples": "token positions the factors average over",
        "A/<module>": "factor A = E[ā āᵀ], float64 [dim_A, dim_A] (keep_factors)",
        "G/<module>": "factor G = E[g gᵀ], float64 [dim_G, dim_G] (keep_factors)",
        "A_diag/<module>, G_diag/<module>": "the diagonal [dim] of a factor above diagonal_over (keep_factors)",
    }

    @classmethod
    def skip_reason(cls, params: KfacParams, view: ModelView, data: PreparedData | None) -> str | None:
        if selected_modules(params, view):
            return None
        names = list(block_linears(view))
        return (f"no Linear/Conv1D module inside the blocks matches modules={list(params.modules)}; "
                f"names look like {names[:3] or 'none (the blocks hold no Linear layers)'}")

    @classmethod
    def cost(cls, params: KfacParams, view: ModelView, shape: RunShape) -> Cost:
        modules = block_linears(view)
        dims = [factor_dims(modules[n][1]) for n in selected_modules(params, view)]
        held = sum(factor_bytes(d_a, params.diagonal_over) + factor_bytes(d_g, params.diagonal_over)
                   for d_a, d_g in dims)
        tokens = shape.n_batches * shape.batch_size * shape.seq_len
        entries = held // 8  # float64 entries of the factors: one multiply-add each per token
        flops = tokens * (6 * view.n_params + 2 * entries) + sum(10 * (d_a**3 + d_g**3) for d_a, d_g in dims)
        # with keep_factors the factors are among the results (the run keeps them to its end)
        return Cost(state_bytes=held + 8, flops=float(flops), result_bytes=held if params.keep_factors else 0)

    @classmethod
    def ladder(cls, params: KfacParams, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """Factors above 2048, 1024, 512 rows, then every factor, kept as their diagonals."""
        return diagonal_rungs(params, lambda rung: cls.cost(rung, view, shape).state_bytes,
                              "trace exact; for those modules eigmax a lower bound, eigmin an upper bound, logdet an "
                              "upper bound, cond a lower bound (Schur, Hadamard); smaller factors exact")

    @classmethod
    def artifact_requests(cls, params: KfacParams, view: ModelView) -> dict[str, Any]:
        """The selected modules' statistics, with the chosen labels and diagonal threshold."""
        return {ARTIFACT: {"modules": tuple(selected_modules(params, view)), "labels": params.labels,
                           "diagonal_over": params.diagonal_over}}

    def setup(self) -> None:
        self.names = selected_modules(self.params, self.view)
        modules = block_linears(self.view)
        self.layers = [modules[n][0] for n in self.names]
        dims = [factor_dims(modules[n][1]) for n in self.names]
        self.a_sums = [zero_factor(d_a, self.params.diagonal_over) for d_a, _ in dims]
        self.g_sums = [zero_factor(d_g, self.params.diagonal_over) for _, d_g in dims]
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, step: Step) -> None:
        served: KfacStats = step[ARTIFACT]
        self.count += served.counts.sum().cpu()
        for i, name in enumerate(self.names):
            a_sum, g_sum = served.of(name)
            self.a_sums[i] += served_as_asked(a_sum.sum(0), self.a_sums[i].ndim).cpu()
            self.g_sums[i] += served_as_asked(g_sum.sum(0), self.g_sums[i].ndim).cpu()

    def finalize(self) -> dict[str, Any]:
        n = float(self.count)
        if n == 0:
            raise ValueError("fisher.kfac saw no example positions (no token had a loss target): give it "
                             "sequences of at least two tokens")
        rows: list[list[Any]] = []
        out: dict[str, Any] = {}
        trace, logdet = [0.0] * self.view.n_layers, [0.0] * self.view.n_layers
        for name, layer, a_sum, g_sum in zip(self.names, self.layers, self.a_sums, self.g_sums, strict=True):
            a, g = a_sum / n, g_sum / n
            cap = kron_capacity(_eigenvalues(a), _eigenvalues(g), self.params.damping)
            diagonal = "+".join(f for f, x in (("A", a), ("G", g)) if x.ndim == 1) or "none"
            rows.append([name, layer, a.shape[0], g.shape[0],
                         *(finite_or_none(cap[k]) for k in CAPACITY_COLUMNS[4:-1]), diagonal])
            trace[layer] += cap["trace"]
            logdet[layer] += cap["logdet"]
            if self.params.keep_factors:
                for label, x in (("A", a), ("G", g)):
                    out[f"{label}_diag/{name}" if x.ndim == 1 else f"{label}/{name}"] = x
        used = sorted(set(self.layers))
        out["capacity"] = TableValue(columns=CAPACITY_COLUMNS, rows=rows)
        blocks = [str(i) for i in used]  # the blocks holding a selected module, by index
        out["trace"] = LayerValue(values=[trace[i] for i in used], labels=blocks, axis="block")
        out["logdet"] = LayerValue(values=[finite_or_none(logdet[i]) for i in used], labels=blocks, axis="block")
        out["n_examples"] = ScalarValue(value=n, n=int(n))
        return out


def zero_factor(dim: int, diagonal_over: int | None) -> torch.Tensor:
    """A factor's running sum: d x d, or d for a diagonal (float64)."""
    return torch.zeros(dim if is_diagonal(dim, diagonal_over) else (dim, dim), dtype=torch.float64)


def _eigenvalues(factor: torch.Tensor) -> torch.Tensor:
    """A full factor's eigenvalues; a diagonal's entries (sorted, clipped at 0) stand in for them."""
    return factor.double().sort().values.clamp_min(0.0) if factor.ndim == 1 else factor_eigenvalues(factor)
