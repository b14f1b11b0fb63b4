"""fisher.stein: the activation Fisher of the next-token distribution at intermediate residuals."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from tensorscope_core.plugin_api import (
    Cost,
    EmptyDataError,
    LayerValue,
    Metric,
    ModelView,
    Params,
    PreparedData,
    RunShape,
    ScalarValue,
    SeriesValue,
    Step,
    block_saved_bytes,
    forward_act_bytes,
)

from .spectral import SUMMARY_KEYS, spectral_summary
from .stein import (
    SCORE_CHUNK,
    VOCAB_CHUNK,
    Extension,
    Method,
    Site,
    check_layer,
    eig_fisher,
    exact_fisher,
    sampled_fisher,
    sites_of_row,
    topk_fisher,
)


def default_layers(n_layers: int) -> list[int]:
    """A few residuals spread over depth: n_layers * {1, 2, 3} // 4."""
    return sorted({n_layers * i // 4 for i in (1, 2, 3)})


def planned_positions(positions: Literal["last", "all"] | list[int], length: int) -> int:
    """Positions evaluated in a sequence of ``length`` real tokens (``resolve_positions``' count;
    indices out of range count as they are, the metric refuses them at run time)."""
    if positions == "last":
        return 1
    if positions == "all":
        return length
    return len({p + length if p < 0 else p for p in positions})


def _sliding_window(attn: Any) -> int | None:
    """The window an attention module attends over: its own attribute where transformers sets one per layer
    (Gemma, Qwen2: None on global layers), else its config's (Mistral passes config.sliding_window)."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window  # type: ignore[no-any-return]
    return getattr(getattr(attn, "config", None), "sliding_window", None)


class SteinParams(Params):
    layers: list[int] | None = Field(None, description="residuals h to analyse: h enters block l (0 = embeddings, "
                                     "n_layers = input of the final norm); default n_layers * {1,2,3} // 4")
    positions: Literal["last", "all"] | list[int] = Field(
        "last", description="'last' (each sequence's last real token), 'all', or indices (negative from the end)")
    method: Method = Field("exact", description="exact | sampled | topk | eig (see the metric's description)")
    draws: int = Field(64, ge=1, description="sampled: Monte-Carlo draws y ~ p per site")
    topk: int = Field(1024, ge=1, description="topk: tokens kept (the most probable)")
    rank: int = Field(8, ge=1, description="eigenvectors reported per layer; eig: eigenpairs computed")
    max_iter: int = Field(200, ge=1, description="eig: Lanczos products at most")
    tol: float = Field(1e-6, gt=0, description="eig: Lanczos residual bound, relative to the largest Ritz value")
    num_samples: int = Field(0, ge=0, description="the reference's protocol: per position, draw this many next "
                             "tokens and average F over the extended sequences (0: F at the positions themselves)")
    temperature: float = Field(1.0, gt=0, description="protocol: temperature of the next-token draws")
    top_p: float = Field(1.0, gt=0, le=1, description="protocol: nucleus truncation of the draws (< 1 is biased)")

    @field_validator("positions")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("positions must name at least one position")
        return value


class FisherStein(Metric):
    """Activation Fisher ("Fisher-Stein") at intermediate residuals of a causal LM.

    For residual l and a position with its context held fixed, ``F = E_{y~p}[s_y s_y^T]`` with
    ``s_y = grad_h log p(y | h) = J^T (e_y - p)``, ``J = dlogits/dh``; so ``F = J^T (diag p - p p^T) J``
    (PSD, rank <= min(d, V - 1)). h is the residual entering block l at the position (``resid[l]``); the
    model above it runs one token on top of the context's keys/values (KV cache, computed once per
    sequence). Per layer the matrices are averaged over all sites (sequences x positions, x sampled
    extensions with ``num_samples``), pooled over tasks when the data has them.

    Methods: ``exact`` = ``J_g^T M J_g`` with ``g`` the unembedding input and
    ``M = W_U^T diag(p) W_U - (W_U^T p)(W_U^T p)^T`` (d batched single-position backward passes, one
    V x d x d contraction; the V x d Jacobian is never built; needs logits = W_U g + b). ``sampled`` =
    mean of ``s_y s_y^T`` over ``draws`` tokens y ~ p (unbiased, one VJP per draw). ``topk`` = M over the
    ``topk`` most probable tokens, p NOT renormalised (a lower bound of F); ``dropped_mass`` and
    ``error_bound >= tr(F - F_topk) >= ||F - F_topk||_F`` are reported. ``eig`` = top-``rank`` eigenpairs
    of the mean F by Lanczos on ``v -> J^T (diag p - p p^T) J v`` (one JVP + one VJP per site and product),
    without any matrix (but every site's context keys/values and graph stay alive during the iteration);
    its summary keeps only ``eigmax`` (the others need the whole spectrum).

    Protocol (``num_samples > 0``, the reference's): at each position draw next tokens from
    softmax(logits / temperature) (top_p < 1 truncates the nucleus and biases the average), append each
    and evaluate F at the new last position. Spectral summary (``tensorscope_fisher.spectral``): trace,
    eigmax, eigmin, cond, energy_r8, energy_r16 (share of the trace in the top 8 / 16 eigenvalues) and
    effective_rank (smallest k with energy_k >= 0.9), one value per analysed layer.
    """

    name = "fisher.stein"
    supports_dispatch = True  # calls the blocks as modules (their dispatching hooks load offloaded weights)
    version = "2"
    summary = "activation Fisher of the next-token distribution at intermediate residuals (exact/sampled/topk/eig)"
    Params = SteinParams
    artifacts = ("batches",)  # the batches only: it makes its own passes over them
    fields = {
        "fisher/layer_<l>": "mean F over sites [d, d] (float64); not for method eig",
        "eigenvalues/layer_<l>": "eigenvalues of the mean F, descending (eig: the top rank)",
        "eigenvectors/layer_<l>": "top-rank eigenvectors [d, rank] (columns)",
        **{key: f"spectral summary per analysed layer: {key}" for key in SUMMARY_KEYS},
        "dropped_mass": "topk: mean over sites of the probability outside the top k, per layer",
        "dropped_mass_max": "topk: largest dropped mass of a site, per layer",
        "error_bound": "topk: bound on tr(F - F_topk) >= ||F - F_topk||_F of the mean, per layer",
        "residual_norms/layer_<l>": "eig: ||F v - lambda v|| of each eigenpair",
        "n_sites": "sites averaged (sequences x positions x sampled extensions)",
    }

    @classmethod
    def skip_reason(cls, params: SteinParams, view: ModelView, data: PreparedData | None) -> str | None:
        if not view.causal:
            return "fisher.stein needs a causal LM (next-token distribution given a context); this is an encoder"
        windowed = [i for i, a in enumerate(view.attn) if _sliding_window(a)]
        if windowed or getattr(view.config, "attn_logit_softcapping", None):
            return (f"fisher.stein's single-position attention does not model sliding-window attention (layers "
                    f"{windowed}) or soft-capped logits of {view.family} models: use a GPT-2, LLaMA-family "
                    "(no sliding window) or GPT-NeoX model")
        return None

    @classmethod
    def cost(cls, params: SteinParams, view: ModelView, shape: RunShape) -> Cost:
        positions = 1 if params.positions == "last" else (
            shape.seq_len if params.positions == "all" else len(params.positions))
        sites = shape.n_sequences * positions * max(1, params.num_samples)
        layers = params.layers if params.layers is not None else default_layers(view.n_layers)
        d, vocab = view.d_model, view.vocab_size
        per_block = max(view.n_params - 2 * vocab * d, 0) / max(view.n_layers, 1)
        flops = 0.0
        for layer in layers:
            pass_flops = 2 * per_block * (view.n_layers - layer) + 2 * vocab * d  # one position, upper network
            if params.method in ("exact", "topk"):
                kept = vocab if params.method == "exact" else min(params.topk, vocab)
                flops += sites * (d * 2 * pass_flops + 2 * kept * d * d + 4 * d ** 3)
            elif params.method == "sampled":
                flops += sites * (params.draws * 2 * pass_flops + 2 * params.draws * d * d)
            else:
                flops += sites * params.max_iter * 3 * pass_flops
        # the token ids kept until finalize: int32 [n_sequences, seq_len] and int64 lengths
        return Cost(state_bytes=shape.n_sequences * (4 * shape.seq_len + 8), flops=flops,
                    transient_bytes=cls._working_bytes(params, view, shape, min(layers), sites))

    @staticmethod
    def _working_bytes(params: SteinParams, view: ModelView, shape: RunShape, lowest: int, sites: int) -> int:
        """A sequence's context forward with its logits, then at a site the graph of copies of h at one
        position through the blocks above the lowest analysed layer: d copies for J_g (exact, topk; with the
        identity cotangent and J_g, d x d each, and the vocabulary chunks of the centred moment), 256 copies
        with their logits and cotangents for sampled, one per site held through the Lanczos iteration for
        eig. Measured on the 135M shape (exact, 4 / 8 / 30 layers): 102 / 183 / 680 MiB, this 95 / 173 / 619.
        On a dispatched model each graph also keeps the offloaded weights it loaded (``graph_weight_bytes``),
        and exact / topk read an offloaded unembedding's loaded tensor (``weight_of``)."""
        d, item = view.d_model, view.dtype_bytes
        upper = view.n_layers - lowest
        context = forward_act_bytes(view, 1, shape.seq_len)
        above = [*view.blocks[lowest:], *([view.final_norm] if view.final_norm is not None else [])]
        head = [view.unembed] if view.unembed is not None else []
        if params.method in ("exact", "topk"):  # J_g's graph stops at the unembedding
            graph = upper * block_saved_bytes(view, d, 1) + 2 * d * d * item + 3 * VOCAB_CHUNK * d * 8 \
                + view.graph_weight_bytes(above) + sum(view.loaded_bytes(m) for m in head)
        elif params.method == "sampled":
            graph = upper * block_saved_bytes(view, SCORE_CHUNK, 1) + 2 * SCORE_CHUNK * view.vocab_size * item \
                + view.graph_weight_bytes(above + head)
        else:
            graph = sites * upper * block_saved_bytes(view, 1, 1) \
                + view.graph_weight_bytes(above + head, graphs=sites)
        return context + graph

    @classmethod
    def own_passes(cls, params: SteinParams, view: ModelView, shape: RunShape) -> dict[str, int]:
        """Every call is of the whole model (``view.model``; none is a block call): per sequence, one
        forward of it with the KV cache (``context_states``), then per site (position, or sampled
        extension with ``num_samples``) the model's forward on the site's single token over the cached
        context, with h swapped in at block ``layer`` (``forward_site``). With ``S`` sites of a
        sequence, ``L`` analysed layers (``layers``, repeats included), ``R`` sequences:

        - exact / topk: per layer and sequence ``1 + S`` forwards (context; p at the site, no graph)
          and ``S`` differentiated calls (``jacobian_g``): ``L * sum(1 + S)`` replay_forward,
          ``L * sum(S)`` replay_backward;
        - sampled: the same forwards and ``ceil(draws / 256)`` backwards of sampled tokens per site
          (``score_vectors``' chunks): ``L * sum(S) * ceil(draws / 256)`` sampled_backward;
        - eig: the contexts once (``R`` replay_forward), then per layer and site one call with a graph
          and one forward-mode call per Lanczos product: ``L * sum(S) * (1 + products)``
          replay_backward, ``products = min(max(max_iter, r), d_model)``, ``r = min(rank, d_model)``,
          the planned maximum (Lanczos stops earlier when every pair meets ``tol``).

        ``S = positions x max(1, num_samples)``, positions 1 for ``last``; for ``all`` and index lists
        they depend on each sequence's real length, which the run shape does not give: the batch's
        padded length stands in (exact when the sequences are not padded; an upper bound for
        ``all``)."""
        if not view.causal or not shape.batches:
            return {}
        layers = len(params.layers) if params.layers is not None else len(default_layers(view.n_layers))
        per_site = max(1, params.num_samples)
        rows = sum(r for r, _, _ in shape.batches)
        sites = sum(r * planned_positions(params.positions, length) * per_site for r, length, _ in shape.batches)
        if params.method == "eig":
            rank = min(params.rank, view.d_model)
            products = min(max(params.max_iter, rank), view.d_model)
            return {"replay_forward": rows, "replay_backward": layers * sites * (1 + products)}
        out = {"replay_forward": layers * (rows + sites)}
        if params.method == "sampled":
            out["sampled_backward"] = layers * sites * -(-params.draws // SCORE_CHUNK)
        else:
            out["replay_backward"] = layers * sites
        return out

    def setup(self) -> None:
        self.layers = self.params.layers if self.params.layers is not None else default_layers(self.view.n_layers)
        for layer in self.layers:
            check_layer(self.view, layer)
        self.ids = torch.zeros(self.shape.n_sequences, self.shape.seq_len, dtype=torch.int32)
        self.lengths = torch.zeros(self.shape.n_sequences, dtype=torch.int64)
        self.filled = 0

    def update(self, step: Step) -> None:
        # Only the token ids: the Fisher needs its own forwards, run in finalize, after the shared pass's
        # capture hooks are gone.
        for ids, mask in zip(step.batch.input_ids, step.batch.attention_mask, strict=True):
            real = ids[mask.bool()].cpu()
            self.ids[self.filled, :real.numel()] = real
            self.lengths[self.filled] = real.numel()
            self.filled += 1

    @property
    def rows(self) -> list[torch.Tensor]:
        """The real tokens of every sequence seen, in data order (int64)."""
        return [self.ids[i, :int(self.lengths[i])].long() for i in range(self.filled)]

    def finalize(self) -> dict[str, Any]:
        if not self.filled:
            raise EmptyDataError("fisher.stein saw no sequence", "pass data with at least one non-empty sequence")
        view, params = self.view, self.params
        ext = Extension(params.num_samples, params.temperature, params.top_p)
        device = view.input_device
        sites_gen = torch.Generator().manual_seed(self.shape.seed)
        per_row = [sites_of_row(view, row.to(device), params.positions, ext, sites_gen) for row in self.rows] \
            if params.method == "eig" else None
        out: dict[str, Any] = {}
        summaries: list[dict[str, float | None]] = []
        extra: dict[str, list[float]] = {"dropped_mass": [], "dropped_mass_max": [], "error_bound": []}
        n_sites = 0
        for layer in self.layers:
            tag = f"layer_{layer}"
            if per_row is not None:
                sites = [s for row_sites in per_row for s in row_sites]
                result = eig_fisher(view, layer, sites, min(params.rank, view.d_model), max_iter=params.max_iter,
                                    tol=params.tol, seed=self.shape.seed)
                n_sites = len(sites)
                values = result.eigenvalues.double()
                out[f"eigenvalues/{tag}"] = SeriesValue(values=values.tolist(), index_name="eigenpair")
                out[f"eigenvectors/{tag}"] = result.eigenvectors.double()
                out[f"residual_norms/{tag}"] = SeriesValue(values=result.residual_norms.double().tolist(),
                                                           index_name="eigenpair")
                summaries.append({key: (float(values[0]) if key == "eigmax" else None) for key in SUMMARY_KEYS})
                continue
            total, n_sites, bounds = self._accumulate(layer, ext)
            mean = total / n_sites
            eigenvalues, eigenvectors = torch.linalg.eigh(mean)
            eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
            out[f"fisher/{tag}"] = mean
            out[f"eigenvalues/{tag}"] = SeriesValue(values=eigenvalues.tolist(), index_name="eigenvalue")
            out[f"eigenvectors/{tag}"] = eigenvectors[:, :min(params.rank, view.d_model)].contiguous()
            summaries.append(dict(spectral_summary(eigenvalues)))
            if params.method == "topk":
                masses = torch.tensor(bounds["mass"], dtype=torch.float64)
                extra["dropped_mass"].append(float(masses.mean()))
                extra["dropped_mass_max"].append(float(masses.max()))
                extra["error_bound"].append(float(torch.tensor(bounds["bound"], dtype=torch.float64).mean()))
        labels = [str(layer) for layer in self.layers]  # residual-stream positions (0 = embeddings)
        for key in SUMMARY_KEYS:
            out[key] = LayerValue(values=[s[key] for s in summaries], labels=labels, axis="resid")
        if params.method == "topk":
            out.update({key: LayerValue(values=vals, labels=labels, axis="resid") for key, vals in extra.items()})
        out["n_sites"] = ScalarValue(value=float(n_sites), n=n_sites)
        return out

    def _accumulate(self, layer: int, ext: Extension) -> tuple[torch.Tensor, int, dict[str, list[float]]]:
        """Sum of F over all sites at ``layer`` (float64), their number, and topk's per-site masses / bounds.

        Sites are built one sequence at a time, so only one sequence's keys and values are alive. Every
        layer sees the same sites (the protocol's draws restart from the run's seed); ``sampled`` draws
        its tokens from a second stream.
        """
        view, params = self.view, self.params
        d = view.d_model
        total = torch.zeros(d, d, dtype=torch.float64, device=view.input_device)
        bounds: dict[str, list[float]] = {"mass": [], "bound": []}
        count = 0
        sites_gen = torch.Generator().manual_seed(self.shape.seed)
        draws_gen = torch.Generator().manual_seed(self.shape.seed + 1 + layer)
        for row in self.rows:
            for site in sites_of_row(view, row.to(total.device), params.positions, ext, sites_gen):
                total += self._site_fisher(layer, site, draws_gen, bounds).double()
                count += 1
        return total, count, bounds

    def _site_fisher(self, layer: int, site: Site, generator: torch.Generator,
                     bounds: dict[str, list[float]]) -> torch.Tensor:
        if self.params.method == "exact":
            return exact_fisher(self.view, layer, site).detach()
        if self.params.method == "sampled":
            return sampled_fisher(self.view, layer, site, self.params.draws, generator).detach()
        top = topk_fisher(self.view, layer, site, self.params.topk)
        bounds["mass"].append(top.dropped_mass)
        bounds["bound"].append(top.error_bound)
        return top.fisher.detach()
