"""Float64 brute force for the parameter-Fisher tests: one ordinary backward pass per example."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import stats
from transformers import AutoModelForCausalLM

from tensorscope_core.plugin_api import Batch, draw_labels
from tensorscope_core.testing import padded_batches


def load_causal(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").double().eval()


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
                      for p in model.parameters()])


def example_squares(model: torch.nn.Module, batches: list[tuple[list[torch.Tensor], str | None, int]],
                    seed: int = 0, padded: bool = False) -> list[tuple[str | None, torch.Tensor, torch.Tensor]]:
    """Per batch (rows, task, index in task): (task, true g^2 [n, P], empirical g^2 [n, P]).

    The labels drawn from the model come from ``draw_labels`` on this model's logits of the
    right-padded batch; each gradient is a backward pass of one row alone on its summed
    next-token cross-entropy: unpadded, or with ``padded`` right-padded alone to its batch's
    width (LLaMA's float32 rotary angles differ by ~1e-8 between the two).
    """
    out = []
    for rows, task, index in batches:
        ((ids, mask),) = padded_batches(rows, len(rows))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        drawn = draw_labels(logits, Batch(ids, mask, task, 0, index), ids, seed)
        squares: dict[str, list[torch.Tensor]] = {"true": [], "empirical": []}
        for i, row in enumerate(rows):
            n = len(row)
            for kind, labels in (("true", drawn[i, :n - 1]), ("empirical", row[1:])):
                model.zero_grad(set_to_none=True)
                inputs = {"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]} if padded else \
                    {"input_ids": row[None]}
                logits = model(**inputs).logits[0, :n - 1]
                loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
                loss.backward()
                squares[kind].append(flat_grad(model).pow(2))
        out.append((task, torch.stack(squares["true"]), torch.stack(squares["empirical"])))
    return out


def summary(per_batch: list[torch.Tensor], decay: float, confidence: float = 0.95) -> dict[str, np.ndarray]:
    """numpy mean / ddof-1 variance / t interval over all rows, and the EMA by its recursion over batches."""
    x = torch.cat(per_batch).numpy()
    n = x.shape[0]
    mean, var = x.mean(axis=0), x.var(axis=0, ddof=1)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * np.sqrt(var / n)
    ema = per_batch[0].numpy().mean(axis=0)
    for b in per_batch[1:]:
        ema = decay * ema + (1 - decay) * b.numpy().mean(axis=0)
    norms = x.sum(axis=1)
    return {"mean": mean, "var": var, "low": mean - half, "high": mean + half, "ema": ema,
            "trace": norms.mean(), "trace_low": norms.mean() - stats.t.ppf(0.5 + confidence / 2, n - 1)
            * norms.std(ddof=1) / np.sqrt(n)}
