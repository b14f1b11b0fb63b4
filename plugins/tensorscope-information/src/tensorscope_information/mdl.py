"""information.mdl: description lengths of probes per layer, and of the model itself as a two-part code."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

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

from .codes import LEVEL_CHUNK, architecture_bits, online_code_bits, quantised_entropy_bits, uniform_code_bits
from .labels import bucket, frequent_tokens
from .probe import fit_probe, token_nll
from .resampling import group_index
from .tokens import TokenBank, bank_bytes, bank_capacity, per_sequence_quota

MIN_TOKENS = 16
#: steps of L-BFGS history kept by ``probe.fit_probe`` (its history_size)
PROBE_HISTORY = 20


class MDLParams(Params):
    max_tokens: int = Field(
        4096,
        ge=MIN_TOKENS,
        description="tokens kept over the run (memory: max_tokens x (n_layers + 1) x d_model x 4 bytes)",
    )
    tokens_per_sequence: int = Field(64, ge=1, description="positions drawn per sequence (seeded; never position 0)")
    top_k: int = Field(64, ge=1, description="labels: the top_k most frequent loss targets, all others 'other'")
    probe_l2: float = Field(1e-3, ge=0.0, description="L2 penalty of each probe on standardised inputs")
    probe_max_iter: int = Field(100, ge=1, description="L-BFGS iterations of each probe fit")
    weight_bits: int = Field(
        8,
        ge=1,
        le=24,
        description="precision of the weight code: 2**weight_bits uniform levels from each tensor's min to max",
    )
    weight_step: float | None = Field(
        None, gt=0.0, description="a fixed quantisation step for every tensor instead of weight_bits"
    )


class MDL(Metric):
    """Minimum description length, in bits.

    Per resid entry (entry 0 the embeddings), ``online_bits``: the online (prequential) code
    length of the labels given the representations with a linear softmax probe (Voita & Titov
    2020): the tokens (a seeded sample, position 0 excluded; sequences in a seeded order) are
    sent in blocks ending at 0.1, 0.2, ..., 50, 100% of them, the first with a uniform code, each
    later one with a probe fitted on all tokens before it. The label is the position's loss
    target among the ``top_k`` most frequent plus "other"; ``compression`` = n log2 K / L, with
    K the classes present (``uniform_bits`` = n log2 K).

    The model as a two-part code: ``weight_bits``, the entropy code of every parameter tensor
    uniformly quantised on its own grid (``weight_bits`` levels, or ``weight_step``);
    ``architecture_bits``, an Elias-gamma code of the tensor count and shapes plus each tensor's
    quantiser (2 float32); ``data_bits``, the summed token NLL of the run / ln 2, read from the
    shared forward's ``token_loss`` (the sum ``basic.loss`` averages; asking ``basic.loss`` by
    name would put this metric in a later stage with a forward of its own);
    ``model_code_bits`` their sum.
    """

    name = "information.mdl"
    supports_dispatch = True  # reads the shared capture, and the weights through view.named_weights
    version = "1"
    summary = "online code length and compression of a probe per layer; weight, architecture and data code lengths"
    Params = MDLParams
    artifacts = ("resid", "token_loss")
    fields = {
        "online_bits": "online code length of the labels per resid entry (bits)",
        "compression": "uniform_bits / online_bits per resid entry",
        "uniform_bits": "n log2 K: the labels with a uniform code",
        "classes": "K, label classes present",
        "tokens": "tokens coded",
        "weight_bits": "entropy code of the quantised parameters (bits)",
        "weight_bits_per_param": "weight_bits / number of parameters",
        "architecture_bits": "universal code of the tensor shapes and quantisers",
        "data_bits": "summed token NLL / ln 2 of the run (basic.loss loss x n / ln 2)",
        "model_code_bits": "weight + architecture + data bits",
        "estimator": "the codes and settings, in words",
    }

    @classmethod
    def skip_reason(cls, params: MDLParams, view: ModelView, data: PreparedData | None) -> str | None:
        if data is not None and data.n_sequences < 2:
            return f"needs at least 2 sequences for a seeded order of blocks, got {data.n_sequences}"
        return None

    @classmethod
    def cost(cls, params: MDLParams, view: ModelView, shape: RunShape) -> Cost:
        capacity = bank_capacity(params.max_tokens, params.tokens_per_sequence, shape.n_sequences, shape.seq_len)
        working = max(_probe_bytes(capacity, view.d_model, params.top_k + 1), _weight_code_bytes(params, view))
        return Cost(
            state_bytes=bank_bytes(capacity, [view.d_model] * (view.n_layers + 1)) + 16, transient_bytes=working
        )

    def setup(self) -> None:
        p, s = self.params, self.shape
        capacity = bank_capacity(p.max_tokens, p.tokens_per_sequence, s.n_sequences, s.seq_len)
        quota = per_sequence_quota(p.max_tokens, p.tokens_per_sequence, s.n_sequences, s.seq_len)
        self.bank = TokenBank(capacity, [self.view.d_model] * (self.view.n_layers + 1), quota, s.seed, s.tasks)
        self.loss = torch.zeros(2, dtype=torch.float64)  # summed token NLL (nats), targets

    def update(self, step: Step) -> None:
        self.bank.add(step, step["resid"])
        mask = step.target_mask.double()
        self.loss += torch.stack([(step["token_loss"].double() * mask).sum().cpu(), mask.sum().cpu()])

    def finalize(self) -> dict[str, Any]:
        out = self._probe_codes()
        out.update(self._model_code())
        return out

    def _probe_codes(self) -> dict[str, Any]:
        bank, p = self.bank, self.params
        n = bank.filled
        if n < MIN_TOKENS:
            raise ValueError(f"{n} tokens besides position 0 are too few for an online code (needs {MIN_TOKENS})")
        order = _sequence_order(bank.sequence[:n], self.shape.seed)
        targets = bank.labels[:n][order]
        _, classes = torch.unique(bucket(targets, frequent_tokens(targets, p.top_k)), return_inverse=True)
        k = int(classes.max()) + 1
        fit = _probe_fit(k, p.probe_l2, p.probe_max_iter)
        online = [online_code_bits(bank.kept(layer)[order], classes, k, fit) for layer in range(len(bank.sources))]
        uniform = uniform_code_bits(n, k)
        return {
            "online_bits": LayerValue(values=online, axis="resid"),
            "compression": LayerValue(
                values=[uniform / bits if bits > 0 else math.inf for bits in online], axis="resid"
            ),
            "uniform_bits": ScalarValue(value=uniform, unit="bits"),
            "classes": k,
            "tokens": n,
        }

    def _model_code(self) -> dict[str, Any]:
        p = self.params
        weight, shapes = 0.0, []
        for _, w in self.view.named_weights():  # one at a time: a dispatched model's offloaded ones load in turn
            weight += quantised_entropy_bits(w, p.weight_bits, p.weight_step)
            shapes.append(tuple(w.shape))
        count = sum(math.prod(s) for s in shapes)
        arch = architecture_bits(shapes)
        data, targets = float(self.loss[0]) / math.log(2.0), int(self.loss[1])
        precision = f"step {p.weight_step}" if p.weight_step is not None else f"{p.weight_bits}-bit per tensor"
        text = (
            f"online code: linear softmax probe (L-BFGS, l2={p.probe_l2}), Voita-Titov blocks; weights: entropy "
            f"of uniformly quantised values ({precision}); data: the summed token loss of the shared forward "
            f"over {targets} targets"
        )
        return {
            "weight_bits": ScalarValue(value=weight, unit="bits"),
            "weight_bits_per_param": ScalarValue(value=weight / max(1, count), unit="bits"),
            "architecture_bits": ScalarValue(value=float(arch), unit="bits"),
            "data_bits": ScalarValue(value=data, n=targets, unit="bits"),
            "model_code_bits": ScalarValue(value=weight + arch + data, unit="bits"),
            "estimator": TextValue(text=text),
        }


def _probe_bytes(n: int, d: int, classes: int) -> int:
    """Finalize's probe working set: one source's n rows in sequence order, their standardised copy and
    its centred temporary (n x d float32 each), and L-BFGS's history and search directions, each
    (d + 1) x classes float32."""
    return 3 * 4 * n * d + 4 * (2 * PROBE_HISTORY + 6) * (d + 1) * classes


def _weight_code_bytes(params: MDLParams, view: ModelView) -> int:
    """The weight code's working set: a float64 chunk of levels with torch.unique's sorted copy and index
    buffers (4 x 8 bytes a value), and the merged (level, count) pairs with their merge copy (3 x 16 bytes
    each): at most 2**weight_bits levels, or as many as the largest tensor's values with weight_step."""
    largest = max((w.numel() for w in view.model.parameters()), default=0)
    levels = largest if params.weight_step is not None else min(2**params.weight_bits, largest)
    return 4 * 8 * LEVEL_CHUNK + 3 * 16 * levels


def _sequence_order(sequence: torch.Tensor, seed: int) -> torch.Tensor:
    """Token indices with the sequences in a seeded order, each sequence's tokens in position order."""
    groups, n_groups = group_index(sequence)
    rank = np.random.default_rng(seed).permutation(n_groups)[groups]
    return torch.from_numpy(np.lexsort((np.arange(len(groups)), rank)))


def _probe_fit(n_classes: int, l2: float, max_iter: int) -> Callable[..., Any]:
    def fit(x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        probe = fit_probe(x, y, n_classes, l2, max_iter)
        return lambda xs, ys: token_nll(probe, xs, ys)

    return fit
