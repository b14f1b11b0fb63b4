"""Independent float64 references for fisher.kfac: hand hooks on one unpadded sequence at a time."""

from __future__ import annotations

import torch


def module_stats(model: torch.nn.Module, module_name: str, rows: list[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A = mean ā āᵀ and G = mean g gᵀ over the positions with a next token, observed labels.

    One sequence at a time, no padding; ``g`` is ``.grad`` of the module's output after a
    backward of the sequence's summed log-likelihood of its next tokens.
    """
    module = dict(model.named_modules())[module_name]
    kept: dict[str, torch.Tensor] = {}

    def hook(mod: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        kept["a"], kept["s"] = args[0].detach()[0], output

    handle = module.register_forward_hook(hook)
    a_sum = g_sum = None
    n = 0
    try:
        for ids in rows:
            model.zero_grad()
            logp = torch.log_softmax(model(ids[None]).logits[0], dim=-1)
            loglik = logp[torch.arange(len(ids) - 1), ids[1:]].sum()
            loglik.backward()
            t = len(ids) - 1  # positions 0..T-2 predict a real next token
            a = kept["a"][:t]
            if module.bias is not None:
                a = torch.cat([a, torch.ones(t, 1, dtype=a.dtype)], dim=1)
            g = kept["s"].grad[0, :t]
            a_sum = a.T @ a if a_sum is None else a_sum + a.T @ a
            g_sum = g.T @ g if g_sum is None else g_sum + g.T @ g
            n += t
    finally:
        handle.remove()
    assert a_sum is not None and g_sum is not None
    return a_sum / n, g_sum / n, n


def weight_grad_row_major(model: torch.nn.Module, module_name: str, ids: torch.Tensor, label: int) -> torch.Tensor:
    """∇ log p(label | ids[:1]) of the module's [weight, bias], each flattened row-major and joined
    so that they form the [out, in+1] (Linear) or [in+1, out] (Conv1D) augmented matrix."""
    module = dict(model.named_modules())[module_name]
    model.zero_grad()
    logp = torch.log_softmax(model(ids[None]).logits[0, 0], dim=-1)[label]
    logp.backward()
    weight, bias = module.weight.grad, None if module.bias is None else module.bias.grad
    if type(module).__name__ == "Conv1D":  # [in, out]: the bias is one more row
        rows = weight if bias is None else torch.cat([weight, bias[None]], dim=0)
    else:  # Linear [out, in]: the bias is one more column
        rows = weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)
    return rows.reshape(-1)
