"""fisher.grouped: the Fisher diagonal summed per attention head, per MLP unit and per block."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tensorscope_core.plugin_api import (
    Cost,
    HeadValue,
    LayerValue,
    Metric,
    ModelView,
    NoParams,
    ParameterEntries,
    PreparedData,
    RunShape,
    ScalarValue,
    linear_out_in,
)

from .diagonal import diagonal_kinds, diagonal_tasks, read_diagonal


def head_sums(view: ModelView, layer: int, diag: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(qk, ov) [n_heads] for one layer: per query head, the diagonal summed over its W_Q (and b_Q)
    and over W_O's rows that read its output, plus 1/g of its key/value head's W_K, b_K (for qk) and
    W_V, b_V (for ov), g the number of query heads that share that key/value head."""
    heads = view.head_entries(layer)
    kv = torch.tensor(heads.kv_head_of)
    share = torch.bincount(kv, minlength=heads.W_K.shape[0]).double()

    def per_head(entries: ParameterEntries | None, n: int) -> torch.Tensor:
        if entries is None:
            return torch.zeros(n, dtype=torch.float64)
        return diag[entries.name].reshape(-1)[entries.index()].reshape(n, -1).sum(dim=1)

    n_q, n_kv = heads.W_Q.shape[0], heads.W_K.shape[0]
    q = per_head(heads.W_Q, n_q) + per_head(heads.b_Q, n_q)
    k = (per_head(heads.W_K, n_kv) + per_head(heads.b_K, n_kv)) / share
    v = (per_head(heads.W_V, n_kv) + per_head(heads.b_V, n_kv)) / share
    o = per_head(heads.W_O, n_q)
    return q + k[kv], v[kv] + o


def _unit_rows(module: nn.Module, d_mlp: int) -> list[torch.Tensor | None]:
    """A projection into the hidden units as d_mlp-row parts of its [out, in] weight, each followed by
    the same rows of its bias (None without one); a fused one (Phi-3's gate_up_proj: gate rows, then up
    rows) has several parts."""
    weight, bias = linear_out_in(module), getattr(module, "bias", None)
    parts: list[torch.Tensor | None] = []
    for k in range(weight.shape[0] // d_mlp):
        rows = slice(k * d_mlp, (k + 1) * d_mlp)
        parts += [weight[rows], None if bias is None else bias[rows]]
    return parts


def mlp_unit_parts(view: ModelView, layer: int) -> list[tuple[ParameterEntries, int]]:
    """The entries of each MLP hidden unit: (parameter entries [d_mlp, ...]) and the axis of the unit.
    The projections into the hidden units are the block's Linear / Conv1D modules outside attention
    with a multiple of d_mlp outputs (rows of [out, in], their biases); the projection out is
    ``mlp_out[layer]`` (its columns). Its bias is not per unit (it counts in the block)."""
    attn = {id(m) for m in view.attn[layer].modules()}
    out_module = view.mlp_out[layer]
    parts: list[tuple[ParameterEntries, int]] = []
    for module in view.blocks[layer].modules():
        if id(module) in attn or module is out_module or not hasattr(module, "weight") or \
                type(module).__name__ not in ("Linear", "Conv1D"):
            continue
        if linear_out_in(module).shape[0] % view.d_mlp:  # shapes are readable without loading the weights
            continue
        found = view.parameter_entries(module, lambda m=module: _unit_rows(m, view.d_mlp))  # type: ignore[misc]
        parts += [(entries, 0) for entries in found if entries is not None]
    if not parts:
        raise ValueError(f"found no projection into the {view.d_mlp} MLP hidden units in block {layer} "
                         f"of {view.name}")
    out = view.parameter_entries(out_module, lambda: [linear_out_in(out_module)])[0]
    assert out is not None
    parts.append((out, 1))
    return parts


class FisherGrouped(Metric):
    """The ``fisher.diagonal`` values summed per attention head, per MLP unit and per block.

    Per query head h of layer l: ``head_qk`` sums the diagonal over W_Q's entries of h (and
    b_Q's) plus 1/g of those of its key/value head in W_K, b_K; ``head_ov`` over W_O's rows
    that read h's output plus 1/g of its key/value head's W_V, b_V entries; ``head`` is their
    sum. g is the number of query heads sharing that key/value head (grouped-query attention:
    ``ModelView.head_weights(l).kv_head_of``); the equal split makes the heads partition the
    attention projections (the query heads of a group cannot be told apart in a shared
    entry). The attention output bias, norms and other parameters of a block count in
    ``block`` only. ``mlp_unit`` sums unit j's row of each projection into the hidden units
    (both of a gated MLP), its bias entry, and column j of the projection out; ``block``
    sums every parameter of the block. Entries are located through the adapter's per-head
    views of the parameters, so fused (GPT-2 c_attn) and interleaved (NeoX) layouts map exactly.
    """

    name = "fisher.grouped"
    supports_dispatch = True  # reads fisher.diagonal's result; head and unit entries from view.head_entries
    version = "1"
    summary = "Fisher diagonal summed per attention head (Q/K/V/O, GQA-aware), per MLP unit and per block"
    requires_metrics = ("fisher.diagonal",)
    derived_from = ("fisher.diagonal",)
    fields = {
        "<kind>/head": "per layer x query head: head_qk + head_ov (kind: true or empirical)",
        "<kind>/head_qk": "the part from W_Q, b_Q and the head's share of W_K, b_K",
        "<kind>/head_ov": "the part from W_O and the head's share of W_V, b_V",
        "<kind>/mlp_unit": "[n_layers, d_mlp]: per MLP hidden unit",
        "<kind>/block": "per block: every parameter of the block",
        "<kind>/outside": "parameters outside every block (embeddings, final norm, head)",
        "<kind>/<task>/...": "the same per task",
        "n_entries": "entries of the full diagonal (per kind and segment)",
        "n_grouped": "values of the grouped fields (per kind and segment)",
        "memory_reduction": "n_entries / n_grouped",
    }

    @classmethod
    def skip_reason(cls, params: NoParams, view: ModelView, data: PreparedData | None) -> str | None:
        if view.head_weights_fn is None:
            return (f"the {view.family} adapter maps no per-head weights (GenericAdapter does not): "
                    "register an adapter with head_weights_fn for this architecture")
        return None

    @classmethod
    def cost(cls, params: NoParams, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=0)  # computed from fisher.diagonal's result, nothing held across batches

    def finalize(self) -> dict[str, Any]:
        view = self.view
        result = self.deps["fisher.diagonal"]
        layer_of = view.layer_of_parameter()
        units = [mlp_unit_parts(view, layer) for layer in range(view.n_layers)]
        out: dict[str, Any] = {}
        n_entries = 0
        for task in (None, *diagonal_tasks(result, self.shape.tasks)):
            for kind in diagonal_kinds(result):
                diag = read_diagonal(view, result, self.tensor_of, kind, task)
                n_entries = sum(d.numel() for d in diag.values())
                seg = f"{kind}/" if task is None else f"{kind}/{task}/"
                qk, ov = zip(*(head_sums(view, layer, diag) for layer in range(view.n_layers)), strict=True)
                out[seg + "head_qk"] = HeadValue(values=[h.tolist() for h in qk])
                out[seg + "head_ov"] = HeadValue(values=[h.tolist() for h in ov])
                out[seg + "head"] = HeadValue(values=[(a + b).tolist() for a, b in zip(qk, ov, strict=True)])
                mlp = torch.zeros(view.n_layers, view.d_mlp, dtype=torch.float64)
                for layer, parts in enumerate(units):
                    for entries, axis in parts:
                        values = diag[entries.name].reshape(-1)[entries.index()]
                        mlp[layer] += values.sum(dim=1 - axis) if values.ndim == 2 else values
                out[seg + "mlp_unit"] = mlp
                blocks = torch.zeros(view.n_layers + 1, dtype=torch.float64)
                for name, d in diag.items():
                    owner = layer_of.get(name)
                    blocks[view.n_layers if owner is None else owner] += d.sum()
                out[seg + "block"] = LayerValue(values=blocks[:-1].tolist(), axis="block")
                out[seg + "outside"] = ScalarValue(value=float(blocks[-1]))
        n_grouped = view.n_layers * (3 * view.n_heads + view.d_mlp + 1) + 1
        out["n_entries"] = ScalarValue(value=float(n_entries))
        out["n_grouped"] = ScalarValue(value=float(n_grouped))
        out["memory_reduction"] = ScalarValue(value=n_entries / n_grouped)
        return out
