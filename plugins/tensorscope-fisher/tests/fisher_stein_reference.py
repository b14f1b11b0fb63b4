"""Float64 brute force of the activation Fisher, written differently from the plugin: the whole sequence
through the model without a cache, the residual at one position replaced, the full V x d logit Jacobian by
torch.autograd.functional.jacobian and the closed form J^T (diag p - p p^T) J."""

from __future__ import annotations

from typing import Any

import torch


def brute_force_fisher(model: Any, entry: torch.nn.Module, ids: torch.Tensor, position: int) -> torch.Tensor:
    """F [d, d] at ``position`` of ``ids`` [T] w.r.t. the input of module ``entry`` (a block or the final norm)."""
    prefix = ids[None, :position + 1]
    captured: dict[str, torch.Tensor] = {}

    def capture(module: Any, args: tuple, kwargs: dict) -> None:
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = entry.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=prefix, use_cache=False)
    handle.remove()
    hidden = captured["x"]

    def logits_of(h: torch.Tensor) -> torch.Tensor:
        def replace(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            new = torch.cat([hidden[:, :position], h.reshape(1, 1, -1)], dim=1)
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        hook = entry.register_forward_pre_hook(replace, with_kwargs=True)
        try:
            return model(input_ids=prefix, use_cache=False).logits[0, -1]
        finally:
            hook.remove()

    h0 = hidden[0, position].clone()
    jac = torch.autograd.functional.jacobian(logits_of, h0, vectorize=True)  # [V, d]
    with torch.no_grad():
        p = torch.softmax(logits_of(h0), dim=-1)
    return jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
