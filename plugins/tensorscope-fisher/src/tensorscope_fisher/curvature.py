"""fisher.lanczos and hessian.lanczos: top eigenpairs of the full-parameter Fisher (GGN) and of the
loss Hessian, matrix-free, by Lanczos with selective reorthogonalisation (``lanczos.py``).

Both use the same loss over the examples the metric kept (the first ``max_examples``):

    L(theta) = (1 / N) sum_i l_i(theta),   l_i = sum_t m_it CE(logits_it, y_it)

with ``per='example'`` (N the number of examples with targets: the normalisation of
``fisher.diagonal``, so the Fisher's trace is ``fisher.diagonal``'s ``true_trace`` in
expectation), or N the number of target tokens with ``per='token'`` (the run's token loss,
``basic.loss``). The Fisher is the generalised Gauss-Newton matrix of L,
G = (1/N) sum_i sum_t J_it^T (diag p_it - p_it p_it^T) J_it (J_it = d logits_it / d theta), which is
the true Fisher of the model's next-token distributions given the contexts; the Hessian is
G plus the terms of the logits' curvature weighted by the residuals p - e_y.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch.func import grad, jvp, vjp

from tensorscope_core.plugin_api import (
    Cost,
    LossTargets,
    Metric,
    ModelView,
    OneDeviceModel,
    Params,
    Rung,
    RunShape,
    ScalarValue,
    SeriesValue,
    Step,
    TextValue,
    act_bytes,
    kept_graph_bytes,
    offloaded_bytes,
)

from .fisher_grads import Layout, layout_of, layout_size
from .lanczos import Lanczos, Reorthogonalise

Weights = dict[str, torch.Tensor]
Examples = list[tuple[LossTargets, torch.Tensor]]  # (targets, attention mask) per kept batch


class CurvatureParams(Params):
    k: int = Field(10, ge=1, description="number of top eigenpairs")
    max_iter: int = Field(100, ge=1, description="most Lanczos iterations (matrix-vector products)")
    tol: float = Field(1e-6, gt=0.0, description="stop when every Ritz residual bound is at most tol x ||T||")
    max_examples: int | None = Field(64, ge=1, description="the first this many examples of the run; None: all")
    per: Literal["example", "token"] = Field(
        "example", description="normalise the loss per example (as fisher.diagonal) or per target token (basic.loss)")
    keep_vectors: bool = Field(False, description="also return the eigenvectors [n_params, k] (a tensor field)")
    seed: int = Field(0, description="seed of the Lanczos start vector")
    reorthogonalise: Reorthogonalise = Field(
        "selective", description="'selective': keep the Krylov basis (2 x (max_iter + 1) parameter vectors), "
        "true residual norms, eigenvectors; 'local': three parameter vectors, eigenvalues with Lanczos error "
        "bounds, ghost copies merged, no eigenvectors")
    products: Literal["kept-graph", "recomputed"] = Field(
        "kept-graph", description="'kept-graph': build each kept batch's graphs once (a forward, and a backward "
        "with create_graph) and make every product backwards through them, no forward (the graphs stay in "
        "memory while Lanczos runs); 'recomputed': each product differentiates its batches from scratch "
        "(forward-mode AD, nothing kept; slower)")
    layers: list[int] | None = Field(
        None, description="block indices whose parameters span the operator (the principal block of the "
        "Fisher / Hessian over them: its eigenvalues are lower bounds of the full one's, by Cauchy interlacing); "
        "None: every trainable parameter")

    @model_validator(mode="after")
    def _vectors_need_a_basis(self) -> CurvatureParams:
        if self.keep_vectors and self.reorthogonalise == "local":
            raise ValueError("keep_vectors needs reorthogonalise='selective' (local keeps no basis to form them)")
        return self


def operator_layout(params: CurvatureParams, view: ModelView) -> Layout:
    """The trainable parameters the operator acts on (those of ``layers`` when given), packed in order."""
    layout = layout_of(view)
    if params.layers is None:
        return layout
    wanted = set(params.layers)
    owner = view.layer_of_parameter()
    out: Layout = {}
    offset = 0
    for name, (sl, shape) in layout.items():
        if owner.get(name) in wanted:
            out[name] = (slice(offset, offset + sl.stop - sl.start), shape)
            offset += sl.stop - sl.start
    return out


def solver_dtype(view: ModelView) -> torch.dtype:
    """The Lanczos vectors' dtype: the model's, float32 for half precision (its products are no more
    accurate than that, see ``finalize``)."""
    dtype = next(view.model.parameters()).dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def room_for(params: CurvatureParams, stored: int, rows: int) -> int:
    """Rows of the next batch ``update`` keeps: up to ``max_examples`` in all (every row when None)."""
    return rows if params.max_examples is None else min(rows, params.max_examples - stored)


def kept_rows(params: CurvatureParams, shape: RunShape) -> list[tuple[int, int]]:
    """(rows, padded length) of each batch ``update`` keeps: every batch until ``max_examples`` rows are
    kept (every batch with ``max_examples=None``)."""
    kept: list[tuple[int, int]] = []
    stored = 0
    for rows, length, _ in shape.batches:
        room = room_for(params, stored, rows)
        if room > 0:
            kept.append((room, length))
            stored += room
    return kept


def kept_batches(params: CurvatureParams, shape: RunShape) -> int:
    """How many of the run's batches ``update`` keeps."""
    return len(kept_rows(params, shape))


class _Lanczos(Metric):
    """Keeps the examples' inputs per batch; finalize runs Lanczos on ``matvec``."""

    Params = CurvatureParams
    #: calls of the model per Lanczos product and kept batch
    calls_per_product: ClassVar[int] = 1
    #: gradients of every parameter a recomputed product makes beside its output (a tied embedding's two
    #: parts each)
    gradients_per_product: ClassVar[int] = 0
    #: logits-sized float32 tensors kept per kept batch beside its graph (the GGN's logits, dual and softmax)
    kept_per_logit: ClassVar[int] = 0
    #: what recomputing the products costs in time against the kept graphs, measured at the 135M shape
    recomputed_time: ClassVar[str] = ""
    artifacts = ("batches",)  # the batches only: it makes its own passes over them
    supports_dispatch = True  # its products run on OneDeviceModel, which loads a dispatched model's weights
    fields = {
        "eigenvalues": "the k largest eigenvalues, descending",
        "residual_norms": "||A v - lambda v|| of each returned eigenpair (unit v; reorthogonalise='selective')",
        "residual_bounds": "the Lanczos bound beta |s| of each eigenvalue (reorthogonalise='local')",
        "n_params": "parameters the operator acts on (all trainable ones, or those of layers)",
        "lambda_max": "the largest eigenvalue",
        "iterations": "Lanczos iterations (matrix-vector products)",
        "converged": "1 when every pair met tol, else 0",
        "n_examples": "examples used",
        "eigenvectors": "[n_params, k], trainable parameters in named_parameters order (keep_vectors only)",
        "note": "when not every pair met tol: what the unconverged values are and are not, and the fix",
    }

    @classmethod
    def cost(cls, params: CurvatureParams, view: ModelView, shape: RunShape) -> Cost:
        """State: the kept examples (per token: input ids, targets, target mask, attention mask, int64).
        Finalize: the solver's buffers (``Lanczos.held_bytes``: selective ``2 (max_iter + 1) + 2k + 1``
        vectors of the operator's parameters, local 3), the product's output in the model's dtype and in the
        solver's, with ``keep_vectors`` the eigenvectors (which the run keeps), and the products' own:

        - ``recomputed``, one product at a time on a kept batch: two passes' autograd buffers (the GGN's
          jvp and vjp, the Hessian's forward-over-reverse), a tied embedding's two gradients beside their
          sum, the running sum over batches and the gradients the product makes (``gradients_per_product``);
        - ``kept-graph``: every kept batch's first-order graph (``kept_graph_bytes``: from the first block
          of ``layers`` on) and its logits-sized tensors (``kept_per_logit``), the summed gradient the
          graphs end in, a tied embedding's two parts beside it and beside the output, and the double
          backward's own working tensors (one batch's ``act_bytes``).

        On a dispatched model, also every weight it loads onto the input device (``offloaded_bytes``)."""
        examples = min(shape.n_sequences, params.max_examples or shape.n_sequences)
        tokens = examples * shape.seq_len
        size = layout_size(operator_layout(params, view))
        solver_bytes = torch.finfo(solver_dtype(view)).bits // 8
        solver = Lanczos.held_bytes(size, params.k, max(params.max_iter, params.k), params.reorthogonalise,
                                    solver_bytes) if params.k <= size else 0
        output = size * (view.dtype_bytes + solver_bytes)
        if params.products == "kept-graph":
            logit_bytes = max(view.dtype_bytes, 4)
            blocks = None if params.layers is None else view.n_layers - min(params.layers, default=view.n_layers)
            graphs = sum(kept_graph_bytes(view, rows, length, blocks)
                         + cls.kept_per_logit * rows * length * view.vocab_size * logit_bytes
                         for rows, length in kept_rows(params, shape))
            product = graphs + act_bytes(view, shape.batch_size, shape.seq_len) + size * view.dtype_bytes \
                + 4 * view.tied_embedding_bytes + output
        else:
            product = 2 * act_bytes(view, shape.batch_size, shape.seq_len) + 2 * view.tied_embedding_bytes \
                + size * view.dtype_bytes + output \
                + cls.gradients_per_product * (size * view.dtype_bytes + 2 * view.tied_embedding_bytes)
        vectors = size * params.k * solver_bytes if params.keep_vectors else 0  # the eigenvectors, kept
        loaded = offloaded_bytes(view)  # a dispatched model's weights loaded onto its input device
        return Cost(state_bytes=4 * 8 * tokens, finalize_bytes=solver + product + vectors + loaded,
                    result_bytes=vectors,
                    flops=float(params.max_iter * 8 * view.n_params * tokens))

    @classmethod
    def ladder(cls, params: CurvatureParams, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """Fewer iterations (``max-iter-25``), then no basis (``local``), then the last block only
        (``last-block``). With the graphs kept (the default), each is followed by its ``-recomputed`` twin
        (the same values without the graphs, slower), and ``recomputed`` comes first. Each rung is kept
        only where it holds less than the rung before."""
        iters = min(25, params.max_iter)
        local = params.model_copy(update={"reorthogonalise": "local", "keep_vectors": False})
        rungs = [
            Rung("max-iter-25", params.model_copy(update={"max_iter": iters}),
                 "at most 25 Lanczos products: pairs not converged by then are reported with converged=0 "
                 "(their true residual norms say how far off)"),
            Rung("local", local, "no Krylov basis: eigenvalues within their Lanczos bounds (residual_bounds, not "
                 "true residuals), values closer than sqrt(float eps) x lambda_max merged, no eigenvectors"),
            Rung("last-block", local.model_copy(update={"layers": [view.n_layers - 1]}),
                 "the principal block of the last transformer block's parameters only (local): its eigenvalues "
                 "are lower bounds of the whole model's (Cauchy interlacing)"),
        ]
        if params.products == "kept-graph":
            recompute = {"products": "recomputed"}
            why = (f"same values; each product differentiates its batches from scratch instead of keeping their "
                   f"graphs: {cls.recomputed_time} (bench_hessian_product)")
            twins = [Rung("recomputed", params.model_copy(update=recompute), why)]
            for rung in rungs:
                twins += [rung, Rung(f"{rung.name}-recomputed", rung.params.model_copy(update=recompute),
                                     f"{rung.accuracy}; {why}")]
            rungs = twins
        return cls.cheaper_rungs(params, view, shape, rungs)

    @classmethod
    def own_passes(cls, params: CurvatureParams, view: ModelView, shape: RunShape) -> dict[str, int]:
        """Calls of the (hook-free copy of the) model, all differentiated (``replay_backward``):
        ``kept-graph``, one per kept batch (``kept_batches``), which builds its graphs, the products being
        backwards through them; ``recomputed``, ``calls_per_product`` per Lanczos product and kept batch.
        The products are at most ``min(max(max_iter, k), n_params)``; Lanczos stops earlier when every Ritz
        pair meets ``tol`` (known only at run time, reported in ``iterations``), so this is the planned
        maximum. None when ``k`` exceeds the trainable parameters (finalize refuses before any product)."""
        size = layout_size(operator_layout(params, view))
        if params.k > size:
            return {}
        if params.products == "kept-graph":
            return {"replay_backward": kept_batches(params, shape)}
        products = min(max(params.max_iter, params.k), size)
        return {"replay_backward": cls.calls_per_product * products * kept_batches(params, shape)}

    def setup(self) -> None:
        self.inputs: list[torch.Tensor] = []
        self.attention: list[torch.Tensor] = []
        self.target_ids: list[torch.Tensor] = []
        self.target_masks: list[torch.Tensor] = []

    def update(self, step: Step) -> None:
        room = room_for(self.params, sum(len(x) for x in self.inputs), step.batch.input_ids.shape[0])
        if room <= 0:
            return
        targets = step.targets.slice(0, room)  # the run's own targets
        self.inputs.append(targets.model_input.detach().cpu())
        self.target_ids.append(targets.target_ids.detach().cpu())
        self.target_masks.append(targets.target_mask.detach().cpu())
        self.attention.append(step.batch.attention_mask[:room].detach().cpu())

    def matvec_factory(self, model: OneDeviceModel, weights: Weights, examples: Examples,
                       scale: float) -> Callable[[Weights], Weights]:
        raise NotImplementedError

    def finalize(self) -> dict[str, Any]:
        view = self.view
        layout = operator_layout(self.params, view)
        size = layout_size(layout)
        model = OneDeviceModel(view, layout)  # a dispatched model's weights loaded onto its input device
        weights = {n: model.weights[n] for n in layout}
        if not weights:
            raise ValueError(f"layers={self.params.layers} hold no trainable parameter of {view.name}")
        device, dtype = next(iter(weights.values())).device, next(iter(weights.values())).dtype
        examples: Examples = [(LossTargets(i.to(device), t.to(device), m.to(device)), a.to(device))
                              for i, t, m, a in zip(self.inputs, self.target_ids, self.target_masks, self.attention,
                                                    strict=True)]
        n_examples = sum(int((t.target_mask.sum(dim=1) > 0).sum()) for t, _ in examples)
        n_tokens = sum(t.n_targets for t, _ in examples)
        if n_examples == 0:
            raise ValueError(f"{self.name} saw no example with a loss target: give it sequences of at least "
                             "two tokens (causal models) or a tokenizer with a mask token (encoders)")
        if self.params.k > size:
            raise ValueError(f"k={self.params.k} exceeds the {size} trainable parameters of {view.name}")
        scale = 1.0 / (n_examples if self.params.per == "example" else n_tokens)
        product = self.matvec_factory(model, weights, examples, scale)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            tangent = {n: v[sl].reshape(shape).to(dtype) for n, (sl, shape) in layout.items()}
            out = product(tangent)
            return torch.cat([out[n].reshape(-1) for n in layout]).to(v.dtype)

        # transformers computes norms (LLaMA's RMSNorm), softmaxes and rotary tables in float32 even
        # in float64 models: the products are no more accurate than float32
        precision = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
        solver = Lanczos(size, self.params.k, max_iter=max(self.params.max_iter, self.params.k),
                         tol=self.params.tol, seed=self.params.seed, dtype=solver_dtype(view), device=device,
                         precision=precision, reorthogonalise=self.params.reorthogonalise)
        result = solver.run(matvec)
        values = result.eigenvalues.tolist()
        errors = "residual_norms" if self.params.reorthogonalise == "selective" else "residual_bounds"
        out: dict[str, Any] = {
            "eigenvalues": SeriesValue(values=values, index_name="rank"),
            errors: SeriesValue(values=result.residual_norms.tolist(), index_name="rank"),
            "lambda_max": ScalarValue(value=values[0]),
            "iterations": ScalarValue(value=float(result.iterations)),
            "converged": ScalarValue(value=float(result.converged)),
            "n_examples": ScalarValue(value=float(n_examples)),
            "n_params": ScalarValue(value=float(size)),
        }
        if not result.converged:
            out["note"] = TextValue(text=(
                f"not every pair met tol={self.params.tol:g} within {result.iterations} products: each value lies "
                f"within its {errors.replace('_', ' ')[:-1]} of an eigenvalue, but where the top of the spectrum is a "
                "cluster (as on random models), larger eigenvalues may not be found yet, so an unconverged value's "
                "rank may be too high; raise max_iter and compare"))
        if self.params.keep_vectors:
            out["eigenvectors"] = result.eigenvectors.cpu()
        for name in ("inputs", "attention", "target_ids", "target_masks"):
            getattr(self, name).clear()
        return out


def _logits_fn(model: OneDeviceModel, targets: LossTargets, attention: torch.Tensor) -> Callable[[Weights], Any]:
    def logits(w: Weights) -> torch.Tensor:
        out = model(w, input_ids=targets.model_input, attention_mask=attention, use_cache=False)
        z = out.logits
        return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    return logits


def ggn_product(logits: Callable[[Weights], torch.Tensor], weights: Weights, target_mask: torch.Tensor,
                scale: float) -> Callable[[Weights], Weights]:
    """v -> scale sum_t J_t^T (diag p_t - p_t p_t^T) J_t v over the positions where ``target_mask`` is 1:
    the Gauss-Newton product of the summed cross-entropy of ``logits(weights)`` [..., vocab]; one JVP
    (J v) and one VJP (J^T u), never a Jacobian."""
    def product(v: Weights) -> Weights:
        z, jv = jvp(logits, (weights,), (v,))[:2]
        p = torch.softmax(z.detach(), dim=-1)
        u = (p * jv - p * (p * jv).sum(dim=-1, keepdim=True)) * (target_mask.to(p.dtype)[..., None] * scale)
        _, pullback = vjp(logits, weights)[:2]
        return dict(pullback(u.to(z.dtype))[0])
    return product


def hessian_product(loss: Callable[[Weights], torch.Tensor], weights: Weights) -> Callable[[Weights], Weights]:
    """v -> H v for the Hessian H of the scalar ``loss`` at ``weights``: forward-over-reverse
    (``torch.func.jvp`` of ``grad``)."""
    def product(v: Weights) -> Weights:
        return dict(jvp(grad(loss), (weights,), (v,))[1])
    return product


def _added(total: list[torch.Tensor | None], parts: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """``total + parts`` entry by entry, an absent (None) entry counting as zero."""
    return [b if a is None else a if b is None else a + b for a, b in zip(total, parts, strict=True)]


def _differentiable(total: list[torch.Tensor | None]) -> list[tuple[int, torch.Tensor]]:
    """(index, gradient) of the summed gradients that depend on the weights: one that is absent or constant
    in them has a zero row of the second derivative, and no graph to differentiate."""
    return [(i, g) for i, g in enumerate(total) if g is not None and g.requires_grad]


def kept_ggn_product(logits: Sequence[tuple[Callable[[Weights], torch.Tensor], torch.Tensor]], weights: Weights,
                     scale: float) -> Callable[[Weights], Weights]:
    """v -> scale sum_b sum_t J_bt^T (diag p_bt - p_bt p_bt^T) J_bt v over the (logits function, target mask)
    pairs: ``ggn_product`` summed over them, on graphs built once. Per pair one forward makes the logits
    z_b, kept with their graph, and one backward with ``create_graph=True`` makes J_b^T u_b for a zero
    u_b that requires grad; their sum g over the pairs is linear in every u_b, so one backward of g . v
    gives every J_b v (d(g . v)/du_b), and one backward of sum_b z_b . w_b every J_b^T w_b. A product
    is those two backwards through the kept graphs, no forward."""
    leaves = {n: w.detach().requires_grad_(True) for n, w in weights.items()}
    inputs = list(leaves.values())
    outputs: list[torch.Tensor] = []
    duals: list[torch.Tensor] = []
    probs: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    total: list[torch.Tensor | None] = [None] * len(inputs)
    for f, mask in logits:
        z = f(leaves)
        u = torch.zeros_like(z, requires_grad=True)
        parts = torch.autograd.grad(z, inputs, grad_outputs=u, create_graph=True, allow_unused=True)
        total = _added(total, parts)
        del parts
        outputs.append(z)
        duals.append(u)
        probs.append(torch.softmax(z.detach(), dim=-1))
        masks.append(mask.to(z.dtype)[..., None] * scale)
    rows = _differentiable(total)
    del total
    names = list(leaves)

    def product(v: Weights) -> Weights:
        jv = torch.autograd.grad([g for _, g in rows], duals, grad_outputs=[v[names[i]] for i, _ in rows],
                                 retain_graph=True, materialize_grads=True)
        u = [(p * x - p * (p * x).sum(dim=-1, keepdim=True)) * m for p, x, m in zip(probs, jv, masks, strict=True)]
        out = torch.autograd.grad(outputs, inputs, grad_outputs=u, retain_graph=True, allow_unused=True,
                                  materialize_grads=True)
        return dict(zip(names, out, strict=True))
    return product


def kept_graph_product(losses: Sequence[Callable[[Weights], torch.Tensor]],
                       weights: Weights) -> Callable[[Weights], Weights]:
    """v -> H v for the Hessian H of ``sum(loss(weights) for loss in losses)``, reverse-over-reverse on
    first-order graphs built once: the summed gradient g is made with ``create_graph=True`` (one forward
    and backward per loss), and each product is one backward through the kept graphs,
    H v = d(g . v)/dw. It costs the graphs' memory (``kept_graph_bytes`` per loss) and saves every
    product's forward: ``bench/bench_hessian_product.py`` measures it against ``hessian_product``."""
    leaves = {n: w.detach().requires_grad_(True) for n, w in weights.items()}
    inputs = list(leaves.values())
    total: list[torch.Tensor | None] = [None] * len(inputs)
    for loss in losses:
        parts = torch.autograd.grad(loss(leaves), inputs, create_graph=True, allow_unused=True)
        total = _added(total, parts)
        del parts
    rows = _differentiable(total)
    del total
    names = list(leaves)

    def product(v: Weights) -> Weights:
        if not rows:
            return {n: torch.zeros_like(w) for n, w in leaves.items()}
        out = torch.autograd.grad([g for _, g in rows], inputs, grad_outputs=[v[names[i]] for i, _ in rows],
                                  retain_graph=True, allow_unused=True, materialize_grads=True)
        return dict(zip(names, out, strict=True))
    return product


def _summed(products: list[Callable[[Weights], Weights]]) -> Callable[[Weights], Weights]:
    def product(v: Weights) -> Weights:
        total: Weights = {}
        for part in products:
            for n, x in part(v).items():
                total[n] = total[n] + x if n in total else x
        return total
    return product


class FisherLanczos(_Lanczos):
    """Top-k eigenpairs of the full-parameter Fisher, matrix-free: the GGN product
    G v = (1/N) sum_i sum_t J_it^T (diag p_it - p_it p_it^T) J_it v, a J v and a J^T u through the model
    per kept batch, p = softmax(logits) over the target positions (see the module docstring for N and
    ``per``): by default two backwards through graphs built once per kept batch and kept
    (``kept_ggn_product``); with ``products='recomputed'`` a JVP and a VJP from scratch per product
    (``ggn_product``). Both give the same products. G is the true Fisher: its diagonal is what
    ``fisher.diagonal``'s ``true`` fields estimate by sampling (``per='example'``). Lanczos with
    selective reorthogonalisation; ``residual_norms`` are the true ||G v - lambda v||.
    """

    name = "fisher.lanczos"
    version = "2"
    summary = "top-k eigenvalues of the full-parameter Fisher (GGN products J^T H J v), Lanczos"
    calls_per_product = 2  # recomputed: torch.func.jvp and vjp, one forward each
    kept_per_logit = 3  # the logits, the zero dual they are differentiated against, their softmax
    recomputed_time = "about 1.5x the time per product at the 135M shape"

    def matvec_factory(self, model: OneDeviceModel, weights: Weights, examples: Examples,
                       scale: float) -> Callable[[Weights], Weights]:
        logits = [(_logits_fn(model, t, a), t.target_mask) for t, a in examples]
        if self.params.products == "kept-graph":
            return kept_ggn_product(logits, weights, scale)
        return _summed([ggn_product(f, weights, mask, scale) for f, mask in logits])


class HessianLanczos(_Lanczos):
    """Top-k (largest algebraic) eigenpairs of the Hessian of the loss L (module docstring: the
    examples' summed token NLL averaged per example, or per token with ``per='token'``), from
    Hessian-vector products per kept batch: by default one backward through each batch's first-order
    graph, built once and kept (``kept_graph_product``, reverse-over-reverse); with
    ``products='recomputed'`` forward-over-reverse (``torch.func.jvp`` of ``grad``) from scratch per
    product. Both give the same products. Negative eigenvalues come last; ``residual_norms`` are the true
    ||H v - lambda v||. With ``per='token'`` this is the Hessian of ``basic.loss``'s loss.
    """

    name = "hessian.lanczos"
    version = "2"
    summary = "top-k eigenvalues of the loss Hessian (Hessian-vector products), Lanczos"
    calls_per_product = 1  # recomputed: torch.func.jvp of grad, one forward
    #: forward-over-reverse makes the gradient and its tangent; measured on the 135M shape, a product holds
    #: 2.7 parameter-sized float32 vectors more than the GGN's (2 and a tied embedding's two parts each)
    gradients_per_product = 2
    recomputed_time = "about 1.7x the time per product at the 135M shape"

    def matvec_factory(self, model: OneDeviceModel, weights: Weights, examples: Examples,
                       scale: float) -> Callable[[Weights], Weights]:
        def loss_of(targets: LossTargets, attention: torch.Tensor) -> Callable[[Weights], torch.Tensor]:
            f = _logits_fn(model, targets, attention)

            def loss(w: Weights) -> torch.Tensor:
                z = f(w)
                ce = torch.nn.functional.cross_entropy(z.transpose(1, 2), targets.target_ids, reduction="none")
                return (ce * targets.target_mask.to(ce.dtype)).sum() * scale
            return loss

        losses = [loss_of(t, a) for t, a in examples]
        if self.params.products == "kept-graph":
            return kept_graph_product(losses, weights)
        return _summed([hessian_product(loss, weights) for loss in losses])
