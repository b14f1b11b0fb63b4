"""Hand-built models whose information quantities are known, mapped with the core's GenericAdapter.

``GaussianChain``: resid 0 = X, a standard Gaussian of the (token, position); block l maps
h -> rho_l h + sqrt(1 - rho_l^2) Z_l with Z_l another standard Gaussian of (token, position),
so resid l and resid l + 1 are bivariate Gaussian with correlation rho_l per dimension and
I = -d/2 ln(1 - rho_l^2). ``BitLayers``: block l writes bit l of the token id as a +-1 vector,
so resid entries 1 and 2 are two discrete sources for a PID.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from tensorscope_core import GenericAdapter

POSITIONS = 64


class Mix(nn.Module):
    """h -> rho h + sqrt(1 - rho^2) Z[token, position] (Z fixed at construction)."""

    def __init__(self, rho: float, vocab: int, d: int, gen: torch.Generator) -> None:
        super().__init__()
        self.rho = rho
        self.noise = nn.Parameter(torch.randn(vocab, POSITIONS, d, generator=gen), requires_grad=False)
        self.ids: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        assert self.ids is not None
        z = self.noise[self.ids, torch.arange(self.ids.shape[1])]
        return self.rho * h + math.sqrt(1.0 - self.rho**2) * z


class Bit(nn.Module):
    """h -> (2 * bit_l(token) - 1) * ones: a +-1 vector carrying one bit of the token id."""

    def __init__(self, bit: int, d: int) -> None:
        super().__init__()
        self.bit = bit
        self.d = d
        self.ids: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        assert self.ids is not None
        sign = 2.0 * ((self.ids >> self.bit) & 1).to(h.dtype) - 1.0
        return sign[..., None].expand(*self.ids.shape, self.d).clone()


class Block(nn.Module):
    def __init__(self, inner: nn.Module, d: int) -> None:
        super().__init__()
        self.inner = inner
        self.attn = nn.Identity()
        self.mlp = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner(self.attn(h))


class ToyLM(nn.Module):
    """Embedding table over (token, position), blocks that may read the token ids, a linear head."""

    def __init__(
        self, inners: list[nn.Module], vocab: int, d: int, gen: torch.Generator, positional: bool = True
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        with torch.no_grad():
            self.tok.weight.copy_(torch.randn(vocab, d, generator=gen))
        self.table = nn.Parameter(torch.randn(vocab, POSITIONS, d, generator=gen), requires_grad=False)
        self.positional = positional
        self.layers = nn.ModuleList([Block(inner, d) for inner in inners])
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, use_cache: bool = False, **_: object
    ) -> SimpleNamespace:
        h = self.tok(input_ids)
        if self.positional:
            h = self.table[input_ids, torch.arange(input_ids.shape[1])]
        for block in self.layers:
            block.inner.ids = input_ids
            h = block(h)
        return SimpleNamespace(logits=self.head(h))


def gaussian_chain(rhos: list[float], vocab: int = 2048, d: int = 1, seed: int = 0, positional: bool = True) -> ToyLM:
    """Without ``positional`` resid 0 is the token's embedding alone (a function of the token)."""
    gen = torch.Generator().manual_seed(seed)
    return ToyLM([Mix(rho, vocab, d, gen) for rho in rhos], vocab, d, gen, positional).eval()


def bit_layers(vocab: int = 16, d: int = 4, seed: int = 0) -> ToyLM:
    gen = torch.Generator().manual_seed(seed)
    return ToyLM([Bit(0, d), Bit(1, d)], vocab, d, gen).eval()


def toy_adapter() -> GenericAdapter:
    return GenericAdapter(blocks="layers", attn="attn", mlp_out="mlp", n_heads=1, embed="tok", unembed="head")


def gaussian_mi(rho: float, d: int = 1) -> float:
    return -0.5 * d * math.log(1.0 - rho**2)
