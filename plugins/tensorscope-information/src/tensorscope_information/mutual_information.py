"""information.mutual_information: three well-posed mutual-information estimates per layer.

Between layers of a deterministic network with continuous activations the true MI is
infinite or an artefact of binning, so no binned MI is reported: (a) a probe lower bound on
the information a layer holds about a discrete label, (b) the Gaussian (CCA) MI between
consecutive layers, which measures linear dependence, and (c) KSG on a few principal
components as a non-linear cross-check of (b).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    LayerValue,
    Metric,
    ModelView,
    Params,
    PreparedData,
    RunShape,
    ScalarValue,
    Step,
    TextValue,
)

from .estimates import Estimate, gaussian_estimate, ksg_estimate, probe_bound
from .gaussian import fit_whitener, usable_dims
from .labels import bucket, frequent_tokens
from .resampling import group_index, held_out_split
from .tokens import TokenBank, bank_bytes, bank_capacity, per_sequence_quota

Estimator = Literal["probe", "gaussian", "ksg"]
MIN_SEQUENCES = 4


class MIParams(Params):
    estimators: tuple[Estimator, ...] = Field(("probe", "gaussian", "ksg"), description="which estimates to compute")
    max_tokens: int = Field(
        4096, ge=16, description="tokens kept over the run (memory: max_tokens x (n_layers + 1) x d_model x 4 bytes)"
    )
    tokens_per_sequence: int = Field(64, ge=1, description="positions drawn per sequence (seeded; position 0 never)")
    top_k: int = Field(
        64,
        ge=1,
        description="the probe's label is the next token among the top_k most frequent "
        "training targets, all others one class 'other'",
    )
    test_fraction: float = Field(
        0.25,
        gt=0.0,
        lt=1.0,
        description="fraction of sequences held out to score the probe (split fixed by the run's seed)",
    )
    probe_l2: float = Field(1e-3, ge=0.0, description="L2 penalty of the probe on standardised inputs")
    probe_max_iter: int = Field(100, ge=1, description="L-BFGS iterations of each probe fit")
    pca_dims: int = Field(32, ge=1, description="principal components per layer for the Gaussian MI (r)")
    min_tokens_per_dim: int = Field(
        5, ge=1, description="r is reduced until the 2r-dim joint covariance has this many tokens per dimension"
    )
    ksg_dims: int = Field(4, ge=1, le=20, description="principal components per layer for KSG")
    ksg_k: int = Field(3, ge=1, description="neighbours of the KSG estimator")
    ksg_max_tokens: int = Field(2048, ge=16, description="tokens (a seeded subset) KSG runs on")
    n_bootstrap: int = Field(100, ge=0, description="resamples of the sequences for each CI (0: no CI)")


class MutualInformation(Metric):
    """Per layer of the residual stream (``resid``: entry 0 the embeddings, entry l the output
    of block l - 1), on a seeded sample of loss-target positions (position 0 excluded: the
    attention sink of causal models, ``[CLS]`` of BERT), in nats:

    - ``probe_next_token``: I(h_l; Y) >= H(Y) - CE_test, clipped at 0 (Barber-Agakov), Y the
      position's loss target (next token; masked token for masked-LM encoders) among the
      ``top_k`` most frequent training targets plus "other"; a linear softmax probe fitted on
      a seeded (1 - test_fraction) of the sequences and scored on the rest;
      ``probe_task``: the same for the sequence's task when the run has two or more tasks;
    - ``gaussian``: per block l, -1/2 sum ln(1 - rho_i^2) between resid l and resid l + 1 after
      PCA to r whitened dimensions and Ledoit-Wolf shrinkage of the joint covariance;
    - ``ksg``: KSG (k neighbours) between the first ``ksg_dims`` whitened components.

    Each has ``<field>_ci_low`` / ``_ci_high``: 95% percentile bootstrap over sequences (the
    probe: held-out sequences, probe fixed; KSG: half-samples without replacement).
    """

    name = "information.mutual_information"
    supports_dispatch = True  # reads the shared pass's activations only
    version = "1"
    summary = "probe lower bound, Gaussian (CCA) and KSG mutual information per layer, with bootstrap CIs"
    Params = MIParams
    artifacts = ("resid",)
    fields = {
        "probe_next_token": "I(h_l; next token) lower bound per resid entry (nats), with _ci_low/_ci_high",
        "probe_task": "I(h_l; task) lower bound per resid entry (nats), with CIs; runs with >= 2 tasks only",
        "entropy_next_token": "plug-in H(Y) of the held-out labels (nats): the bound's ceiling",
        "entropy_task": "plug-in H(task) of the held-out tokens (nats)",
        "gaussian": "Gaussian (CCA) MI between resid l and l + 1 per block (nats), with CIs",
        "ksg": "KSG MI between resid l and l + 1 per block on ksg_dims components (nats), with CIs",
        "pca_dims": "r used for the Gaussian MI (after the n <= r guard)",
        "tokens": "tokens sampled",
        "test_tokens": "held-out tokens",
        "sequences": "sequences sampled",
        "classes": "probe classes (top_k + 'other')",
        "estimators": "which estimator produced each field, and any estimate left out with the reason",
    }

    @classmethod
    def skip_reason(cls, params: MIParams, view: ModelView, data: PreparedData | None) -> str | None:
        if data is not None and data.n_sequences < MIN_SEQUENCES:
            return (
                f"needs at least {MIN_SEQUENCES} sequences (a held-out split and a bootstrap over sequences), "
                f"got {data.n_sequences}"
            )
        return None

    @classmethod
    def cost(cls, params: MIParams, view: ModelView, shape: RunShape) -> Cost:
        capacity = bank_capacity(params.max_tokens, params.tokens_per_sequence, shape.n_sequences, shape.seq_len)
        return Cost(state_bytes=bank_bytes(capacity, [view.d_model] * (view.n_layers + 1)))

    def setup(self) -> None:
        p, s = self.params, self.shape
        capacity = bank_capacity(p.max_tokens, p.tokens_per_sequence, s.n_sequences, s.seq_len)
        quota = per_sequence_quota(p.max_tokens, p.tokens_per_sequence, s.n_sequences, s.seq_len)
        self.bank = TokenBank(capacity, [self.view.d_model] * (self.view.n_layers + 1), quota, s.seed, s.tasks)

    def update(self, step: Step) -> None:
        self.bank.add(step, step["resid"])

    def finalize(self) -> dict[str, Any]:
        bank, p, seed = self.bank, self.params, self.shape.seed
        groups, n_groups = group_index(bank.sequence[: bank.filled])
        if n_groups < MIN_SEQUENCES:
            raise ValueError(
                f"only {n_groups} sequences had a scorable position besides position 0; "
                f"the estimates need at least {MIN_SEQUENCES}"
            )
        held_out = held_out_split(groups, n_groups, p.test_fraction, seed)
        out: dict[str, Any] = {"tokens": bank.filled, "sequences": n_groups, "test_tokens": int(held_out.sum())}
        notes = [f"tokens: {bank.filled} positions of {n_groups} sequences, position 0 excluded"]
        if "probe" in p.estimators:
            notes += self._probes(out, groups, held_out)
        if "gaussian" in p.estimators or "ksg" in p.estimators:
            notes += self._between_layers(out, groups, n_groups)
        out["estimators"] = TextValue(text="\n".join(notes))
        return out

    def _probes(self, out: dict[str, Any], groups: np.ndarray, held_out: np.ndarray) -> list[str]:
        bank, p, seed = self.bank, self.params, self.shape.seed
        train = torch.from_numpy(~held_out)
        targets = bank.labels[: bank.filled]
        kept = frequent_tokens(targets[train], p.top_k)
        classes = bucket(targets, kept)
        n_classes = len(kept) + 1
        out["classes"] = n_classes
        labels = {"next_token": (classes, n_classes)}
        if len(bank.tasks) >= 2:
            labels["task"] = (bank.task[: bank.filled].clamp_min(0), len(bank.tasks))
        for label, (y, count) in labels.items():
            bounds = [
                probe_bound(
                    bank.kept(layer), y, count, held_out, groups, p.probe_l2, p.probe_max_iter, p.n_bootstrap, seed
                )
                for layer in range(len(bank.sources))
            ]
            _put(out, f"probe_{label}", [b.information for b in bounds], "resid")
            out[f"entropy_{label}"] = ScalarValue(value=bounds[0].entropy, unit="nats")
        return [
            f"probe_*: H(Y) - CE_test of a linear softmax probe (L-BFGS, l2={p.probe_l2}), clipped at 0; "
            f"labels: top {len(kept)} training targets + 'other'; CI: held-out sequences resampled, probe fixed"
        ]

    def _between_layers(self, out: dict[str, Any], groups: np.ndarray, n_groups: int) -> list[str]:
        bank, p, seed = self.bank, self.params, self.shape.seed
        r = usable_dims(bank.filled, self.view.d_model, p.pca_dims, p.min_tokens_per_dim)
        if r == 0:
            return [
                f"gaussian, ksg: left out: {bank.filled} tokens are too few for one principal component with "
                f"{p.min_tokens_per_dim} tokens per joint dimension (n <= r makes the covariance singular)"
            ]
        whitened = [
            fit_whitener(bank.kept(layer).double().numpy(), r)(bank.kept(layer).double().numpy())
            for layer in range(len(bank.sources))
        ]
        out["pca_dims"] = r
        notes = []
        pairs = range(len(whitened) - 1)
        if "gaussian" in p.estimators:
            _put(
                out,
                "gaussian",
                [gaussian_estimate(whitened[i], whitened[i + 1], groups, n_groups, p.n_bootstrap, seed) for i in pairs],
                "block",
            )
            notes.append(
                f"gaussian: -1/2 sum ln(1 - rho_i^2) of the Ledoit-Wolf joint covariance of r={r} whitened "
                "principal components per layer; CI: sequences resampled (percentile bootstrap)"
            )
        if "ksg" in p.estimators:
            rng = np.random.default_rng(seed)
            subset = np.sort(rng.permutation(bank.filled)[: p.ksg_max_tokens])
            sub_groups, sub_n = group_index(torch.from_numpy(groups[subset]))
            dims = min(p.ksg_dims, r)
            _put(
                out,
                "ksg",
                [
                    ksg_estimate(
                        whitened[i][subset, :dims],
                        whitened[i + 1][subset, :dims],
                        sub_groups,
                        sub_n,
                        p.ksg_k,
                        p.n_bootstrap,
                        seed,
                    )
                    for i in pairs
                ],
                "block",
            )
            notes.append(
                f"ksg: Kraskov (algorithm 1, k={p.ksg_k}) on the first {dims} whitened components of "
                f"{len(subset)} tokens; CI: half-samples of the sequences, recentred"
            )
        return notes


def _put(out: dict[str, Any], name: str, estimates: list[Estimate], axis: Literal["resid", "block"]) -> None:
    """A per-layer estimate and its CI bounds as three LayerValues."""
    for suffix, attr in (("", "value"), ("_ci_low", "ci_low"), ("_ci_high", "ci_high")):
        out[name + suffix] = LayerValue(values=[getattr(e, attr) for e in estimates], axis=axis)
