"""Activation Fisher ("Fisher-Stein") of the next-token distribution at one residual of a causal LM.

``h`` is the residual entering block ``layer`` (the core's ``resid[layer]``; ``layer = n_layers`` is the
input of the final norm) at one position; the other positions are context, held fixed. The *upper
network* ``z(h)`` is the model above that point at that single position: its query attends to the
context's keys and values, computed once by one forward of the sequence with the KV cache, and to its own
key and value (functions of ``h``). The model's own forward runs it on the one token (so embeddings,
positions, rotary and norms are the model's; no block is called bare), with a pre-hook that swaps ``h`` in
at block ``layer``, one that reads the unembedding's input ``g(h)``, and an attention function
(``_site_attention``, registered with transformers' AttentionInterface for the call) that reads the
context's keys/values as constants: the query is the last position, so attending to all of them and to
itself is exactly the causal mask, and no gradient or tangent of the context is ever formed.

    s_y = grad_h log p_y = J^T (e_y - p),   F = E_{y~p}[s_y s_y^T] = J^T (diag p - p p^T) J,   J = dz/dh

Methods: ``exact`` uses ``z = W_U g(h) + b`` and ``F = J_g^T M J_g`` with
``M = W_U^T diag(p) W_U - wbar wbar^T = sum_y p_y (w_y - wbar)(w_y - wbar)^T``, ``wbar = W_U^T p``
(computed centred, in vocabulary chunks): d single-position backward passes for ``J_g`` (one backward of
d copies of h) and one V x d x d contraction, never the V x d logit Jacobian. ``sampled`` averages
``s_y s_y^T`` over S draws ``y ~ p`` (one VJP of the logits per draw, unbiased). ``topk`` keeps the k most
probable tokens in M (not renormalised: the scores keep the full-vocabulary mean, so ``0 <= F - F_topk``
and ``||F - F_topk||_F <= tr(F - F_topk) <= dropped_mass * ||J_g||_2^2 * max_{y dropped} ||w_y - wbar||^2``,
the reported bound). ``eig``: top-r eigenpairs by Lanczos on ``v -> J^T (diag p - p p^T) J v`` (one
forward-mode JVP and one VJP of the logits per product). Forward-mode AD does not run through PyTorch's
fused CPU attention (SDPA); the site's attention is ``_site_attention`` (plain ops) whatever the model was
loaded with, and the functional API loads through ``load_model``, which switches to eager attention too.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.autograd import forward_ad
from torch.nn import functional as F  # noqa: N812
from transformers import AttentionInterface

from tensorscope_core.plugin_api import BadParameterError, ModelView, UnsupportedModelError, stopped_before

from .lanczos import LanczosResult, top_eigenpairs

Method = Literal["exact", "sampled", "topk", "eig"]
METHODS = ("exact", "sampled", "topk", "eig")
VOCAB_CHUNK = 4096  # rows of W_U per step of the centred moment: bounds its temporaries to 4096 x d


# -- where h lives ------------------------------------------------------------------------------


def check_layer(view: ModelView, layer: int) -> None:
    """``layer`` must index a residual: 0 (embeddings) .. n_layers (input of the final norm)."""
    if not view.causal:
        raise UnsupportedModelError(
            f"fisher.stein needs a causal LM (the next-token distribution at a position given its context); "
            f"{view.name} ({view.family}) is a bidirectional encoder", "use a decoder-only model")
    if not 0 <= layer <= view.n_layers:
        raise BadParameterError(f"layer {layer} is out of range: {view.name} has residuals 0..{view.n_layers} "
                                f"(h is the residual entering block layer; {view.n_layers} enters the final norm)",
                                f"pass layers in 0..{view.n_layers}")
    if view.unembed is None or getattr(view.unembed, "weight", None) is None:
        raise UnsupportedModelError(f"{view.name}: no unembedding module with a weight was found",
                                    "use an adapter that maps unembed (GenericAdapter(unembed=...))")


def _injection_module(view: ModelView, layer: int) -> torch.nn.Module:
    if layer < view.n_layers:
        return view.blocks[layer]
    assert view.unembed is not None
    return view.final_norm if view.final_norm is not None else view.unembed


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


KV = list[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def context_states(view: ModelView, row: torch.Tensor, *, all_logits: bool = False) -> tuple[KV, torch.Tensor]:
    """One forward of a whole sequence ``row`` [T]: every layer's keys and values [1, kv, T, d_head] and the
    next-token logits at every position [T, V] (``all_logits``; else the last only, sparing a T x V x d
    product). Keys/values of any prefix are slices of these (causal attention)."""
    model = view.model
    keep = {} if all_logits or "logits_to_keep" not in inspect.signature(model.forward).parameters \
        else {"logits_to_keep": 1}
    out = model(input_ids=row[None], use_cache=True, **keep)
    cache = _cache_of(out)
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return kv, out.logits[0]


@dataclass
class Site:
    """One place to evaluate F: token ``token`` at position ``context``, after the context whose keys and
    values are the first ``context`` entries of ``kv`` (every layer's, from ``context_states``)."""

    kv: KV
    context: int
    token: int


@dataclass
class SiteForward:
    """``h`` [copies, 1, d] (a leaf, or a dual tensor), the unembedding input ``g`` [copies, d] and the
    logits [copies, V] (None when the forward stopped at the unembedding); row i depends on h[i] only."""

    h: torch.Tensor
    g: torch.Tensor
    logits: torch.Tensor | None


ATTENTION = "tensorscope_stein"
_CONTEXT: contextvars.ContextVar[KV] = contextvars.ContextVar("tensorscope_stein_context")


def _site_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query (the site) over the context's cached keys/values and its own key/value.

    The context part is a constant, so backward and forward-mode passes never build a gradient or tangent
    of the context's keys and values (which a cache concatenation would: T x d per pass and layer). The
    query is the last position, so attending to everything is the causal mask. Registered with
    transformers' AttentionInterface; ``key``/``value`` [copies, kv_heads, 1, d_head] are the site's own.
    """
    if kwargs.get("sliding_window") or kwargs.get("softcap") or getattr(module, "is_causal", True) is False:
        raise UnsupportedModelError(f"fisher.stein's single-position attention does not model "
                                    f"{type(module).__name__} (sliding window, soft-capping or non-causal)",
                                    "use a GPT-2, LLaMA-family (no sliding window) or GPT-NeoX model")
    context_k, context_v = _CONTEXT.get()[module.layer_idx]
    repeat = query.shape[1] // key.shape[1]  # grouped-query attention: kv head of each query head
    context_k, context_v, key, value = (t.repeat_interleave(repeat, dim=1) if repeat > 1 else t
                                        for t in (context_k, context_v, key, value))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    # einsum over the unbatched context (no broadcast copy of it per row of a batch of copies)
    scores = torch.cat([torch.einsum("bhqd,hkd->bhqk", query, context_k[0]),
                        (query * key).sum(-1, keepdim=True)], dim=-1) * scale
    upcast = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    weights = torch.softmax(scores, dim=-1, dtype=upcast).to(query.dtype)
    n = context_k.shape[-2]
    out = torch.einsum("bhqk,hkd->bhqd", weights[..., :n], context_v[0]) + weights[..., n:] * value
    return out.transpose(1, 2), weights


AttentionInterface.register(ATTENTION, _site_attention)


@contextmanager
def _site_attention_on(model: torch.nn.Module, kv: KV) -> Iterator[None]:
    config: Any = model.config
    before = config._attn_implementation
    token = _CONTEXT.set(kv)
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
        _CONTEXT.reset(token)


def forward_site(view: ModelView, layer: int, site: Site, *, copies: int = 1, tangent: torch.Tensor | None = None,
                 logits: bool = True, grad: bool = True) -> SiteForward:
    """Run the model on ``site.token`` at position ``site.context`` over the context's keys/values, with
    ``h`` swapped in at ``layer`` as ``copies`` independent rows (attention: ``_site_attention``).

    With ``tangent`` (forward-mode AD, inside ``forward_ad.dual_level()``), ``h`` is a dual tensor with that
    tangent; otherwise a leaf that requires grad (``grad=False``: no graph). ``logits=False`` stops at the
    unembedding's input.
    """
    model = view.model
    device = site.kv[0][0].device
    seen: dict[str, torch.Tensor] = {}

    def inject(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        h = hidden.detach().expand(copies, *hidden.shape[1:]).clone()
        h = forward_ad.make_dual(h, tangent.reshape(h.shape).to(h.dtype)) if tangent is not None \
            else h.requires_grad_(grad)
        seen["h"] = h
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    def read(module: Any, args: tuple, kwargs: dict) -> None:
        seen["g"] = args[0] if args else next(iter(kwargs.values()))

    assert view.unembed is not None
    handles = [_injection_module(view, layer).register_forward_pre_hook(inject, with_kwargs=True),
               view.unembed.register_forward_pre_hook(read, with_kwargs=True)]
    kv = [(k[:, :, :site.context], v[:, :, :site.context]) for k, v in site.kv]
    out = None
    try:  # without logits the forward stops at the unembedding, after ``read`` (spares copies x V x d)
        with _site_attention_on(model, kv), torch.set_grad_enabled(grad and tangent is None), \
                nullcontext() if logits else stopped_before(view.unembed):
            out = model(input_ids=torch.tensor([[site.token]], device=device),
                        position_ids=torch.tensor([[site.context]], device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    d = seen["g"].shape[-1]
    return SiteForward(seen["h"], seen["g"].reshape(copies, d), None if out is None else out.logits.reshape(copies, -1))


# -- the pieces of F ----------------------------------------------------------------------------


def _probs(logits: torch.Tensor | None) -> torch.Tensor:
    assert logits is not None
    return torch.softmax(logits.detach()[0].double(), dim=-1)


def jacobian_g(view: ModelView, layer: int, site: Site) -> torch.Tensor:
    """J_g = dg/dh [d, d]: d single-position backward passes, run as one backward of d copies of h (row i
    of the identity cotangent on copy i); the forward stops at the unembedding."""
    d = view.d_model
    fwd = forward_site(view, layer, site, copies=d, logits=False)
    eye = torch.eye(d, dtype=fwd.g.dtype, device=fwd.g.device)
    (rows,) = torch.autograd.grad(fwd.g, fwd.h, eye)
    return rows.reshape(d, d)


def unembedding(view: ModelView) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W_U [V, d] and the head's bias (or None), loaded where a dispatched model offloaded the head."""
    assert view.unembed is not None  # checked by check_layer
    with view.onloaded(view.unembed) as head:
        bias: torch.Tensor | None = getattr(head, "bias", None)
        bias = None if bias is None else bias.detach().clone()
    return view.weight_of(view.unembed), bias


def head_probs(view: ModelView, layer: int, site: Site) -> torch.Tensor:
    """p at the site (float64), after checking the factored form's premise: logits = W_U g + b exactly
    (no soft-capping or scaling after the head)."""
    fwd = forward_site(view, layer, site, grad=False)
    weight, bias = unembedding(view)
    assert fwd.logits is not None
    linear = F.linear(fwd.g.detach(), weight, bias)
    logits = fwd.logits.detach()
    scale = float(logits.abs().max().clamp(min=1e-30))
    if linear.shape != logits.shape or not torch.allclose(linear, logits, rtol=1e-4, atol=1e-5 * scale):
        raise UnsupportedModelError(
            f"{view.name}: the logits are not a linear function of the unembedding's input (logits != "
            "unembed(final_norm(h))), so the factored exact Fisher does not apply",
            "use method='sampled' or method='eig', which differentiate the logits themselves")
    return _probs(fwd.logits)


def centred_moment(weight: torch.Tensor, p: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """M = sum_{y in rows} p_y (w_y - wbar)(w_y - wbar)^T [d, d], wbar = W^T p over the whole vocabulary.

    Over all rows this is W^T diag(p) W - wbar wbar^T, the covariance of the unembedding rows under p,
    computed centred (no cancellation between the two terms) in chunks of VOCAB_CHUNK rows.
    """
    p = p.to(weight.dtype)
    wbar = p @ weight
    d = weight.shape[1]
    moment = torch.zeros(d, d, dtype=weight.dtype, device=weight.device)
    n = weight.shape[0] if rows is None else rows.numel()
    for start in range(0, n, VOCAB_CHUNK):
        index = slice(start, start + VOCAB_CHUNK) if rows is None else rows[start:start + VOCAB_CHUNK]
        centred = weight[index] - wbar
        moment += (centred * p[index, None]).T @ centred
    return moment


def _sandwich(jac: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    out = jac.T @ moment @ jac
    return (out + out.T) / 2


def exact_fisher(view: ModelView, layer: int, site: Site) -> torch.Tensor:
    """F = J_g^T M J_g [d, d] at one site (model dtype)."""
    p = head_probs(view, layer, site)
    weight, _ = unembedding(view)
    return _sandwich(jacobian_g(view, layer, site), centred_moment(weight, p))


@dataclass(frozen=True)
class TopK:
    fisher: torch.Tensor
    dropped_mass: float
    error_bound: float  # >= tr(F - F_topk) >= ||F - F_topk||_F


def topk_fisher(view: ModelView, layer: int, site: Site, k: int) -> TopK:
    """F restricted to the k most probable tokens (p not renormalised), with the dropped mass and a bound."""
    p = head_probs(view, layer, site)
    weight, _ = unembedding(view)
    k = min(k, p.numel())
    kept = torch.topk(p, k).indices
    jac = jacobian_g(view, layer, site)
    fisher = _sandwich(jac, centred_moment(weight, p, kept))
    dropped = torch.ones_like(p, dtype=torch.bool)
    dropped[kept] = False
    mass = float(p[dropped].sum())
    if mass == 0.0 or not bool(dropped.any()):
        return TopK(fisher, mass, 0.0)
    wbar = p.to(weight.dtype) @ weight
    spread = max(float(((weight[idx] - wbar) ** 2).sum(dim=1).max())
                 for idx in dropped.nonzero().flatten().split(VOCAB_CHUNK))
    jac_norm = float(torch.linalg.matrix_norm(jac.double(), ord=2))
    return TopK(fisher, mass, mass * jac_norm ** 2 * spread)


SCORE_CHUNK = 256  # copies of h per backward in score_vectors: bounds the copies x V logits


def score_vectors(view: ModelView, layer: int, site: Site, tokens: torch.Tensor) -> torch.Tensor:
    """s_y = J^T (e_y - p) [len(tokens), d] for the given next tokens: one VJP of the logits each, run as one
    backward of a copy of h per token (in chunks of SCORE_CHUNK)."""
    out = []
    for chunk in tokens.split(SCORE_CHUNK):
        fwd = forward_site(view, layer, site, copies=chunk.numel())
        assert fwd.logits is not None
        p = torch.softmax(fwd.logits.detach()[0].double(), dim=-1).to(fwd.logits.dtype)
        cotangents = -p.expand(chunk.numel(), -1).clone()
        cotangents[torch.arange(chunk.numel()), chunk] += 1
        (rows,) = torch.autograd.grad(fwd.logits, fwd.h, cotangents)
        out.append(rows.reshape(chunk.numel(), -1))
    return torch.cat(out)


def sampled_fisher(view: ModelView, layer: int, site: Site, draws: int, generator: torch.Generator) -> torch.Tensor:
    """(1/S) sum_i s_{y_i} s_{y_i}^T with y_i ~ p (S = draws): unbiased, rank <= S."""
    p = _probs(forward_site(view, layer, site, grad=False).logits)
    tokens = torch.multinomial(p.cpu(), draws, replacement=True, generator=generator).to(p.device)
    scores = score_vectors(view, layer, site, tokens)
    return scores.T @ scores / draws


def fisher_matvec(view: ModelView, layer: int, site: Site) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> F v = J^T (diag p - p p^T) J v at ``site``: one forward-mode JVP and one VJP per product."""
    graph = forward_site(view, layer, site)
    assert graph.logits is not None
    logits = graph.logits
    p = _probs(logits).to(logits.dtype)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        with forward_ad.dual_level():
            dual = forward_site(view, layer, site, tangent=v).logits
            assert dual is not None
            tangent = forward_ad.unpack_dual(dual).tangent
        if tangent is None:  # the logits do not depend on h
            return torch.zeros_like(v)
        jv = tangent.reshape(-1)
        u = p * jv - p * torch.dot(p, jv)
        (out,) = torch.autograd.grad(logits, graph.h, u.reshape(logits.shape), retain_graph=True)
        return out.reshape(-1).to(v.dtype)

    return matvec


def eig_fisher(view: ModelView, layer: int, sites: Sequence[Site], rank: int, *, max_iter: int = 200,
               tol: float = 1e-8, seed: int = 0) -> LanczosResult:
    """Top-``rank`` eigenpairs of the mean over ``sites`` of F, matrix-free (Lanczos)."""
    products = [fisher_matvec(view, layer, s) for s in sites]
    model_dtype = next(view.model.parameters()).dtype
    # Lanczos in the precision the products have: float32 products are exact to ~1e-7 only, and a float64
    # iteration would wait for float64 accuracy before reorthogonalising against converged vectors (ghosts).
    dtype = torch.float64 if model_dtype == torch.float64 else torch.float32
    # transformers computes norms (LLaMA's RMSNorm), softmaxes and rotary tables in float32 even in float64
    # models: the products are no more accurate than float32, and the solver must be told (as fisher.lanczos
    # is), or it never reorthogonalises against converged Ritz vectors and returns copies of their values
    precision = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)

    def mean_matvec(v: torch.Tensor) -> torch.Tensor:
        model_v = v.to(model_dtype)
        return torch.stack([mv(model_v) for mv in products]).to(dtype).mean(dim=0)

    return top_eigenpairs(mean_matvec, view.d_model, rank, max_iter=max(max_iter, rank), tol=tol, seed=seed,
                          dtype=dtype, device=view.embed.weight.device, precision=precision)


# -- which sites ---------------------------------------------------------------------------------

Positions = Literal["last", "all"] | Sequence[int]


def resolve_positions(positions: Positions, length: int) -> list[int]:
    """Positions of a sequence of ``length`` tokens ("last", "all" or indices; negative from the end)."""
    if positions == "last":
        return [length - 1]
    if positions == "all":
        return list(range(length))
    if isinstance(positions, str):
        raise BadParameterError(f"positions={positions!r} is not 'last', 'all' or a list of indices",
                                "pass positions='last', 'all' or e.g. [-1, 5]")
    out = []
    for pos in positions:
        resolved = pos + length if pos < 0 else pos
        if not 0 <= resolved < length:
            raise BadParameterError(f"position {pos} is out of range for a sequence of {length} tokens",
                                    f"pass positions in -{length}..{length - 1}, or 'last'")
        out.append(resolved)
    return sorted(set(out))


@dataclass(frozen=True)
class Extension:
    """The reference's protocol: at each position draw ``num_samples`` next tokens from
    softmax(logits / temperature) (nucleus-truncated to ``top_p``; any top_p < 1 biases the average) and
    evaluate F at the extended sequence's last position. ``num_samples = 0``: F at the positions themselves."""

    num_samples: int = 0
    temperature: float = 1.0
    top_p: float = 1.0


def next_token_draws(logits: torch.Tensor, ext: Extension, generator: torch.Generator) -> torch.Tensor:
    """``ext.num_samples`` draws from the tempered (and nucleus-truncated) next-token distribution."""
    probs = torch.softmax(logits.detach().double().cpu() / ext.temperature, dim=-1)
    if ext.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_p, 0) - sorted_p >= ext.top_p  # keep the smallest prefix reaching top_p
        probs = probs.clone()
        probs[order[outside]] = 0.0
    return torch.multinomial(probs, ext.num_samples, replacement=True, generator=generator)


def sites_of_row(view: ModelView, row: torch.Tensor, positions: Positions, ext: Extension,
                 generator: torch.Generator) -> list[Site]:
    """The sites of one sequence: its chosen positions, or their sampled one-token extensions."""
    length = int(row.numel())
    if length == 0:
        raise BadParameterError("an empty sequence has no position to evaluate", "pass sequences of >= 1 token")
    chosen = resolve_positions(positions, length)
    if ext.num_samples and view.max_positions is not None and chosen[-1] + 1 >= view.max_positions:
        raise BadParameterError(f"extending position {chosen[-1]} by a sampled token needs {chosen[-1] + 2} "
                                f"positions; {view.name} has {view.max_positions}",
                                "truncate the data (max_length) or set num_samples=0")
    kv, logits = context_states(view, row, all_logits=bool(ext.num_samples))
    if not ext.num_samples:
        return [Site(kv, pos, int(row[pos])) for pos in chosen]
    return [Site(kv, pos + 1, int(y)) for pos in chosen for y in next_token_draws(logits[pos], ext, generator)]
