"""Independent references for the structure tests: Newman Q from its formula, a brute-force float64
MMD^2, hand-hooked per-sequence resid means, and hand-built models with known answers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy.spatial.distance import pdist
from torch import nn

from tensorscope_core.testing import tiny_config


def newman_q(adjacency: np.ndarray, communities: Iterable[Iterable[int]], gamma: float = 1.0) -> float:
    """Q = (1/2m) sum_ij [A_ij - gamma k_i k_j / 2m] delta(c_i, c_j) for a symmetric adjacency."""
    a = np.asarray(adjacency, dtype=np.float64)
    k = a.sum(axis=1)
    two_m = a.sum()
    label = np.full(len(a), -1)
    for index, members in enumerate(communities):
        label[list(members)] = index
    same = label[:, None] == label[None, :]
    return float(((a - gamma * np.outer(k, k) / two_m) * same).sum() / two_m)


def brute_mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased MMD^2 with exp(-||a - b||^2 / 2h^2), by loops over pairs in float64."""

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * bandwidth * bandwidth))

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def median_distance(points: np.ndarray) -> float:
    return float(np.median(pdist(points)))


def resid_means(model: nn.Module, blocks: Sequence[nn.Module], rows: Sequence[torch.Tensor]) -> np.ndarray:
    """[n, n_blocks + 1, d]: per unpadded sequence, the mean over its tokens of what enters each block
    and of what leaves the last one (hooks placed by hand, one sequence at a time)."""
    seen: list[torch.Tensor] = []

    def entering(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"])[0])

    def leaving(module: nn.Module, args: tuple, output: object) -> None:
        seen.append((output[0] if isinstance(output, tuple) else output)[0])

    out = []
    for ids in rows:
        seen.clear()
        handles = [b.register_forward_pre_hook(entering, with_kwargs=True) for b in blocks]
        handles.append(blocks[-1].register_forward_hook(leaving))
        with torch.no_grad():
            model(ids.unsqueeze(0))
        for h in handles:
            h.remove()
        out.append(torch.stack([s.double().mean(0) for s in seen]).numpy())
    return np.stack(out)


def block_diagonal(rows: int, cols: int, k: int, value: float = 1.0) -> torch.Tensor:
    """[rows, cols] with k equal constant blocks on the diagonal, zeros elsewhere."""
    w = torch.zeros(rows, cols)
    for b in range(k):
        w[b * rows // k : (b + 1) * rows // k, b * cols // k : (b + 1) * cols // k] = value
    return w


def modular_gpt2(k: int, noise: float = 0.0, seed: int = 0) -> nn.Module:
    """A tiny GPT-2 whose every MLP is k disjoint equal blocks: input dims, hidden units and output dims
    split in k groups, each group wired only to itself (|W| = 1 there; ``noise`` elsewhere)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.GPT2LMHeadModel(tiny_config("gpt2", 64)).eval()
    d, h = model.config.n_embd, 4 * model.config.n_embd
    with torch.no_grad():
        for block in model.transformer.h:
            fill = noise * torch.rand(d, h)
            block.mlp.c_fc.weight.copy_(torch.where(block_diagonal(d, h, k) > 0, 1.0, fill))  # Conv1D: [in, out]
            block.mlp.c_proj.weight.copy_(torch.where(block_diagonal(h, d, k) > 0, -1.0, fill.T))
    return model


def modular_llama(k: int) -> nn.Module:
    """A tiny LLaMA (gated MLP) whose gate, up and down projections are each k disjoint equal blocks."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tiny_config("llama", 64)).eval()
    d, h = model.config.hidden_size, model.config.intermediate_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.copy_(block_diagonal(h, d, k, 0.5))  # Linear: [out, in]
            layer.mlp.up_proj.weight.copy_(block_diagonal(h, d, k, -2.0))
            layer.mlp.down_proj.weight.copy_(block_diagonal(d, h, k, 1.0))
    return model


def gaussian_gpt2(n: int, d: int, delta: float, seed: int = 1) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A one-block GPT-2 whose embedding rows are draws of N(0, I) (task a) and N(delta e_1, I) (task b),
    with zero position embeddings, and the two tasks as one-token sequences: resid entry 0 of each
    sequence is exactly its draw."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tiny_config("gpt2", 2 * n + 4, n_layers=1, d_model=d, n_heads=2)).eval()
    draws = torch.randn(2 * n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    draws[n:, 0] += delta
    with torch.no_grad():
        model.transformer.wte.weight[4:] = draws.float()
        model.transformer.wpe.weight.zero_()
    ids = torch.arange(4, 4 + 2 * n).unsqueeze(1)
    return model, {"a": ids[:n], "b": ids[n:]}
