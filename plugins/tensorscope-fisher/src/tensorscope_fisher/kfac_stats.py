"""The ``fisher.kfac_stats`` artifact: K-FAC sufficient statistics of one batch.

For every requested Linear (or GPT-2 ``Conv1D``) module with input ``a`` and output ``s``:

    A_sum = Σ_t ā_t ā_tᵀ      (ā = [a; 1] when the module has a bias)
    G_sum = Σ_t g_t g_tᵀ      g_t = ∂ L / ∂ s_t,   L = Σ_targets log p(y_t | x)

summed over the *example positions* t: each token position is an example (a design choice for
sequence models, Martens & Grosse 2015 treat one input as one example). For causal models the
examples are the positions with a loss target (``target_mask``; the last real token has none and
its ``g`` is zero, nothing downstream reads it), for masked-LM encoders every real token (each one
feeds the masked predictions through attention). The labels ``y`` are drawn from the model's own
prediction (``labels="sampled"``: the true Fisher) or are the observed next tokens
(``labels="observed"``: the empirical Fisher).

The forward and backward run on the core's hook-free copy of the model
(``tensorscope_core.plugin_api.hook_free_copy``), so the run's capture hooks never see them and the
model's ``.grad`` is untouched. The labels are drawn as the core's ``per_example_grads`` draws its
``sampled`` labels (``draw_labels``: seeded per sequence), so both see the same y and
micro-batching never changes the draws.

A parameterised artifact: a consumer asks ``{"modules": names, "labels": "sampled"|"observed",
"diagonal_over": n}`` (``artifact_requests``); the pass serves the union of the modules (in model
order) with one label set (consumers asking different label sets are refused), and is sized by what
it serves. A factor of dimension above ``diagonal_over`` (None: never; the largest asked wins) is
served as its diagonal only, ``Σ_t ā_t²`` [m, d] instead of [m, d, d].
Value: ``KfacStats``: the modules served, ``counts`` [m] and per module ``[A_sum [m, dA, dA],
G_sum [m, dG, dG]]`` (or [m, d] diagonals) in float64, one entry of the leading dimension per
micro-batch (``m``); consumers sum over it and pick their modules with ``of(name)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from tensorscope_core.plugin_api import ArtifactSpec, CaptureContext, ModelView, act_bytes, draw_labels, hook_free_copy

ARTIFACT = "fisher.kfac_stats"
Labels = Literal["sampled", "observed"]


@dataclass(frozen=True)
class KfacStats:
    """One batch of the artifact: the modules served, the example counts, each module's sums."""

    modules: tuple[str, ...]
    counts: torch.Tensor
    stats: list[list[torch.Tensor]]

    def of(self, name: str) -> list[torch.Tensor]:
        """``[A_sum [m, dA, dA], G_sum [m, dG, dG]]`` of module ``name``."""
        return self.stats[self.modules.index(name)]

    @classmethod
    def cat(cls, parts: list[KfacStats]) -> KfacStats:
        first = parts[0]
        return cls(first.modules, torch.cat([p.counts for p in parts]),
                   [[torch.cat([p.stats[i][k] for p in parts]) for k in (0, 1)] for i in range(len(first.modules))])


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or Hugging Face's Conv1D (GPT-2), which stores its weight as [in, out]."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def block_linears(view: ModelView) -> dict[str, tuple[int, nn.Module]]:
    """Name -> (layer, module) of the Linear/Conv1D modules inside the blocks, in model order (found once
    per plan: the planner asks for every rung's cost)."""
    def find() -> dict[str, tuple[int, nn.Module]]:
        layer_of = {id(m): layer for layer, block in enumerate(view.blocks) for m in block.modules()}
        return {name: (layer_of[id(m)], m) for name, m in view.model.named_modules()
                if id(m) in layer_of and is_linear(m)}
    return view.memoised("fisher.block_linears", find)


def factor_dims(module: nn.Module) -> tuple[int, int]:
    """(dim A, dim G): input features (+1 with a bias) and output features."""
    weight: Any = module.weight
    d_in, d_out = (weight.shape[0], weight.shape[1]) if type(module).__name__ == "Conv1D" else \
        (weight.shape[1], weight.shape[0])
    return d_in + (getattr(module, "bias", None) is not None), d_out


def merge_requests(requests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The union of the modules asked (in model order) with the one label set they share; factors
    diagonal only above the largest ``diagonal_over`` asked (None, full factors, when any asks it)."""
    labels = {r.get("labels", "sampled") for r in requests} or {"sampled"}
    if len(labels) > 1:
        raise ValueError(f"{ARTIFACT}: consumers of one pass ask different labels {sorted(labels)}; "
                         "one pass serves one label set")
    asked = {m for r in requests for m in r.get("modules", ())}
    limits = [r.get("diagonal_over") for r in requests]
    over = None if not limits or None in limits else max(int(x) for x in limits if x is not None)
    return {"modules": tuple(asked), "labels": labels.pop(), "diagonal_over": over}


def is_diagonal(dim: int, diagonal_over: int | None) -> bool:
    """Whether a factor of ``dim`` rows is kept as its diagonal only."""
    return diagonal_over is not None and dim > diagonal_over


def factor_bytes(dim: int, diagonal_over: int | None) -> int:
    """float64 bytes of one factor sum: d x d, or d for a diagonal."""
    return 8 * (dim if is_diagonal(dim, diagonal_over) else dim * dim)


def served_as_asked(total: torch.Tensor, ndim: int) -> torch.Tensor:
    """A served factor sum in the form its consumer accumulates (``ndim`` 2: full, 1: diagonal): a pass
    serves full factors to every consumer when any asks them (``merge_requests``), so a consumer that
    asked for the diagonal takes it from the full factor."""
    return total.diagonal() if total.ndim == 2 and ndim == 1 else total


def _second_moment(x: torch.Tensor, diagonal_over: int | None) -> torch.Tensor:
    """Σ_t x_t x_tᵀ [1, d, d], or its diagonal Σ_t x_t² [1, d] above ``diagonal_over``."""
    return (x * x).sum(0)[None] if is_diagonal(x.shape[1], diagonal_over) else (x.T @ x)[None]


def _served(view: ModelView, request: Mapping[str, Any]) -> tuple[list[str], Labels]:
    """The modules the pass serves, in model order (all block linears when nobody asked)."""
    asked = set(request.get("modules", ()))
    linears = block_linears(view)
    return [n for n in linears if not asked or n in asked], request.get("labels", "sampled")


def _derive(ctx: CaptureContext) -> None:
    assert ctx.batch is not None
    names, label_set = _served(ctx.view, ctx.request(ARTIFACT))
    targets = ctx.targets
    assert targets is not None
    shadow = hook_free_copy(ctx.view)
    modules = dict(shadow.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def keep(module: nn.Module, args: tuple, output: torch.Tensor, name: str = name) -> None:
            inputs[name], outputs[name] = args[0].detach(), output
        handles.append(modules[name].register_forward_hook(keep))
    try:
        with torch.enable_grad():
            logits = shadow(input_ids=targets.model_input, attention_mask=ctx.batch.attention_mask,
                            use_cache=False).logits
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            labels = targets.target_ids if label_set == "observed" else draw_labels(
                logits, ctx.batch, ctx.batch.input_ids, ctx.seed)
            logp = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
            loss = (logp * targets.target_mask.to(logp.dtype)).sum()
            missing = [n for n in names if n not in outputs]
            if missing:
                raise ValueError(f"fisher.kfac: the model's forward never calls {missing[0]}; leave it out "
                                 "(modules=...)")
            frozen = [n for n in names if not outputs[n].requires_grad]
            if frozen:
                raise ValueError(f"fisher.kfac: the output of {frozen[0]} does not depend on trainable parameters; "
                                 "set requires_grad on the model's parameters or leave the module out (modules=...)")
            grads = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    examples = (targets.target_mask if ctx.view.causal else ctx.batch.attention_mask).bool()
    stats = []
    for name, grad in zip(names, grads, strict=True):
        # [batch, seq, ...] again where the architecture runs a module on flattened tokens (OPT's MLP)
        a = inputs[name].reshape(*examples.shape, -1)[examples].double()
        if getattr(modules[name], "bias", None) is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
        g = torch.zeros(a.shape[0], outputs[name].shape[-1], dtype=torch.float64, device=a.device) \
            if grad is None else grad.reshape(*examples.shape, -1)[examples].double()
        over = ctx.request(ARTIFACT).get("diagonal_over")
        stats.append([_second_moment(a, over), _second_moment(g, over)])
    ctx.store[ARTIFACT] = KfacStats(tuple(names), examples.sum().double().reshape(1), stats)


def _factor_dims(view: ModelView, request: Mapping[str, Any]) -> list[tuple[int, int]]:
    linears = block_linears(view)
    dims = view.memoised("fisher.factor_dims", lambda: {n: factor_dims(m) for n, (_, m) in linears.items()})
    return [dims[n] for n in _served(view, request)[0]]


def _bytes(view: ModelView, batch: int, seq: int, request: Mapping[str, Any]) -> int:
    """The served modules' factor sums (one entry per micro-batch; declared for one) and the count."""
    over = request.get("diagonal_over")
    return sum(factor_bytes(d_a, over) + factor_bytes(d_g, over) for d_a, d_g in _factor_dims(view, request)) + 8


def _transient(view: ModelView, rows: int, seq: int, request: Mapping[str, Any]) -> int:
    """While deriving a micro-batch: the modules' inputs and output gradients per token in float64,
    and what the backward of the hook-free copy keeps."""
    per_token = sum(d_a + d_g for d_a, d_g in _factor_dims(view, request))
    return 8 * rows * seq * per_token + act_bytes(view, rows, seq)


def _own_passes(view: ModelView, rows: int, seq: int, request: Mapping[str, Any]) -> dict[str, int]:
    """One forward and backward of the hook-free copy per micro-batch: with labels drawn from the
    model (``sampled``, the default) a ``sampled_backward``, with the observed ones a ``replay_backward``."""
    kind = "sampled_backward" if _served(view, request)[1] == "sampled" else "replay_backward"
    return {kind: 1}


KFAC_STATS = ArtifactSpec(
    ARTIFACT, "forward",
    "K-FAC sums per requested block Linear/Conv1D module (request: modules, labels), one backward of "
    "log p(y|x): KfacStats (counts [m], [A_sum [m, dA, dA], G_sum [m, dG, dG]] per module; m micro-batches)",
    lambda v, b, s: _bytes(v, b, s, {}), derive=_derive, requires=("token_loss",), own_passes=_own_passes,
    merge=merge_requests, request_nbytes=_bytes, transient_nbytes=_transient)
