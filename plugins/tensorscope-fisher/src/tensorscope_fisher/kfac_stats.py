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
(``tensorscope_core.functional.hook_free_copy``), so the run's capture hooks never see them and the
model's ``.grad`` is untouched. The labels are drawn as ``fisher.per_example_grads`` draws them
(``fisher_grads.draw_labels``: seeded per sequence), so both see the same y and micro-batching
never changes the draws.

Value: ``[n_examples [m], [[A_sum [m, dA, dA], G_sum [m, dG, dG]] per module]]`` in float64, one
entry of the leading dimension per micro-batch (``m``); consumers sum over it. The modules and the
labels are those of ``request(view, ...)``, made by the consuming metric in ``setup``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from tensorscope_core import ArtifactSpec, ModelView
from tensorscope_core.artifacts import act_bytes
from tensorscope_core.capture import CaptureContext
from tensorscope_core.functional import hook_free_copy

from .fisher_grads import draw_labels

ARTIFACT = "fisher.kfac_stats"
Labels = Literal["sampled", "observed"]
_REQUEST = "tensorscope_fisher.kfac.request"


@dataclass(frozen=True)
class KfacRequest:
    modules: tuple[str, ...]
    labels: Labels


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or Hugging Face's Conv1D (GPT-2), which stores its weight as [in, out]."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def block_linears(view: ModelView) -> dict[str, tuple[int, nn.Module]]:
    """Name -> (layer, module) of the Linear/Conv1D modules inside the blocks, in model order."""
    layer_of = {id(m): layer for layer, block in enumerate(view.blocks) for m in block.modules()}
    return {name: (layer_of[id(m)], m) for name, m in view.model.named_modules()
            if id(m) in layer_of and is_linear(m)}


def factor_dims(module: nn.Module) -> tuple[int, int]:
    """(dim A, dim G): input features (+1 with a bias) and output features."""
    weight: Any = module.weight
    d_in, d_out = (weight.shape[0], weight.shape[1]) if type(module).__name__ == "Conv1D" else \
        (weight.shape[1], weight.shape[0])
    return d_in + (getattr(module, "bias", None) is not None), d_out


def request(view: ModelView, modules: tuple[str, ...], labels: Labels) -> None:
    """Ask the artifact for these modules' statistics with these labels (one request per view)."""
    view.extras[_REQUEST] = KfacRequest(modules, labels)


def _requested(view: ModelView) -> KfacRequest:
    found = view.extras.get(_REQUEST)
    return found if found is not None else KfacRequest(tuple(block_linears(view)), "sampled")


def _derive(ctx: CaptureContext) -> None:
    assert ctx.batch is not None
    want = _requested(ctx.view)
    targets = ctx.store["_targets"]
    shadow = hook_free_copy(ctx.view)
    modules = dict(shadow.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in want.modules:
        def keep(module: nn.Module, args: tuple, output: torch.Tensor, name: str = name) -> None:
            inputs[name], outputs[name] = args[0].detach(), output
        handles.append(modules[name].register_forward_hook(keep))
    try:
        with torch.enable_grad():
            logits = shadow(input_ids=targets.model_input, attention_mask=ctx.batch.attention_mask,
                            use_cache=False).logits
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            labels = targets.target_ids if want.labels == "observed" else draw_labels(
                logits, ctx.batch, ctx.batch.input_ids, ctx.seed)
            logp = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
            loss = (logp * targets.target_mask.to(logp.dtype)).sum()
            missing = [n for n in want.modules if n not in outputs]
            if missing:
                raise ValueError(f"fisher.kfac: the model's forward never calls {missing[0]}; leave it out "
                                 "(modules=...)")
            frozen = [n for n in want.modules if not outputs[n].requires_grad]
            if frozen:
                raise ValueError(f"fisher.kfac: the output of {frozen[0]} does not depend on trainable parameters; "
                                 "set requires_grad on the model's parameters or leave the module out (modules=...)")
            grads = torch.autograd.grad(loss, [outputs[n] for n in want.modules], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    examples = (targets.target_mask if ctx.view.causal else ctx.batch.attention_mask).bool()
    stats = []
    for name, grad in zip(want.modules, grads, strict=True):
        a = inputs[name][examples].double()
        if getattr(modules[name], "bias", None) is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
        g = torch.zeros(a.shape[0], outputs[name].shape[-1], dtype=torch.float64, device=a.device) \
            if grad is None else grad[examples].double()
        stats.append([(a.T @ a)[None], (g.T @ g)[None]])
    ctx.store[ARTIFACT] = [examples.sum().double().reshape(1), stats]


def _bytes(view: ModelView, batch: int, seq: int) -> int:
    dims = [factor_dims(m) for _, m in block_linears(view).values()]
    per_token = sum(d_a + d_g for d_a, d_g in dims)
    return sum(8 * (d_a * d_a + d_g * d_g) for d_a, d_g in dims) + 8 * batch * seq * per_token + \
        act_bytes(view, batch, seq)


KFAC_STATS = ArtifactSpec(
    ARTIFACT, "forward",
    "K-FAC sums per block Linear/Conv1D module, one backward of log p(y|x) with y drawn from the model: "
    "[n_examples [m], [[A_sum [m, dA, dA], G_sum [m, dG, dG]] per module]] (m micro-batches)",
    _bytes, derive=_derive, requires=("token_loss",))
