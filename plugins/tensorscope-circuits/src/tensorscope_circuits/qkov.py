"""circuits.qkov: QK and OV circuits of every head, full circuits, copying and composition scores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    HeadValue,
    Metric,
    ModelView,
    Params,
    PreparedData,
    RunShape,
    SeriesValue,
    TextValue,
)

from .factored import composition_scores, copying_scores, factored_svdvals, gram, product_norm, rotary_matrix


class QKOVParams(Params):
    rotary_offsets: tuple[int, ...] = Field((1, 2, 4, 8, 16), description="query-minus-key offsets D swept for "
                                            "rotary models, besides D = 0: QK(D) = W_Q R(D) W_K^T")
    full_circuits: bool = Field(True, description="compute the circuits through embedding and unembedding")
    matrices: bool = Field(False, description="also return W_QK and W_OV themselves ([L, H, d, d] tensors)")


@dataclass(frozen=True)
class Heads:
    """One layer's head factors in float64: W_Q, W_K, W_V [H, d, r] (K and V mapped to their
    query heads), W_O [H, r, d]."""

    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor


def layer_heads(view: ModelView, layer: int) -> Heads:
    w = view.head_weights(layer).expanded()
    return Heads(*(t.detach().double().cpu() for t in (w.W_Q, w.W_K, w.W_V, w.W_O)))


def rotary_frequencies(view: ModelView) -> tuple[torch.Tensor, float] | None:
    """(inv_freq, attention scaling) of the model's rotary embedding module, None if it has none."""
    for module in view.model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            return inv_freq.detach().double().cpu(), float(getattr(module, "attention_scaling", 1.0))
    return None


def compositions(view: ModelView, rotation: torch.Tensor | None, modes: str = "qkv") -> dict[str, torch.Tensor]:
    """Q-, K- and V-composition [L, H, L, H] (those in ``modes``), the query factor W_Q, or
    W_Q R(D) at a rotary offset D when ``rotation`` is R(D)."""
    def right(mode: str) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
        def factors(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
            h = layer_heads(view, layer)
            w_q = h.W_Q if rotation is None else h.W_Q @ rotation
            return {"q": (w_q, h.W_K.transpose(-2, -1)), "k": (h.W_K, w_q.transpose(-2, -1)),
                    "v": (h.W_V, h.W_O)}[mode]
        return factors

    def left(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = layer_heads(view, layer)
        return h.W_V, h.W_O

    return {m: composition_scores(left, right(m), view.n_layers) for m in modes}


#: vocabulary rows per block of the Gram sums
GRAM_ROWS = 4096


@dataclass(frozen=True)
class TokenGrams:
    """E^T E, U^T U and U^T E (d x d) of the embedding E and unembedding U [V, d]: the full
    circuits' norms and eigenvalues need nothing of size V beyond these."""

    embed: torch.Tensor
    unembed: torch.Tensor
    cross: torch.Tensor

    @classmethod
    def of(cls, embed: torch.Tensor, unembed: torch.Tensor) -> TokenGrams:
        """Summed in float64 over blocks of ``GRAM_ROWS`` tokens: no float64 copy of a V x d matrix."""
        d = embed.shape[1]
        grams = [torch.zeros(d, d, dtype=torch.float64) for _ in range(3)]
        for start in range(0, embed.shape[0], GRAM_ROWS):
            e = embed[start:start + GRAM_ROWS].detach().double().cpu()
            u = unembed[start:start + GRAM_ROWS].detach().double().cpu()
            for total, block in zip(grams, (gram(e), gram(u), u.T @ e), strict=True):
                total += block
        return cls(*grams)

    @staticmethod
    def working_bytes(view: ModelView) -> int:
        """Two float64 row blocks and the three d x d Gram matrices."""
        return 8 * (2 * min(GRAM_ROWS, view.vocab_size) * view.d_model + 4 * view.d_model ** 2)


def full_circuits(h: Heads, grams: TokenGrams) -> dict[str, torch.Tensor]:
    """Norms of E W_QK E^T and E W_OV U^T and the eigenvalues of the latter, per head.

    The nonzero eigenvalues of the V x V matrix (E W_V)(W_O U^T) are those of the r x r
    W_O (U^T E) W_V (eigenvalues of AB and BA agree away from zero).
    """
    def t(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-2, -1)

    qk = (t(h.W_Q) @ grams.embed @ h.W_Q) * (t(h.W_K) @ grams.embed @ h.W_K)
    ov = (t(h.W_V) @ grams.embed @ h.W_V) * (h.W_O @ grams.unembed @ t(h.W_O))
    return {"qk_norm": qk.sum(dim=(-2, -1)).clamp_min(0).sqrt(), "ov_norm": ov.sum(dim=(-2, -1)).clamp_min(0).sqrt(),
            "eigenvalues": torch.linalg.eigvals(h.W_O @ grams.cross @ h.W_V)}


class QKOV(Metric):
    """QK and OV circuits of every head from the weights (no data), in the row-vector
    convention of TransformerLens: W_QK = W_Q W_K^T (score x_q W_QK x_k^T) and W_OV = W_V W_O
    (d x d, rank <= d_head), with grouped-query K/V mapped to their query heads (head h reads
    K/V head kv_head_of[h]); biases and norm gains are not folded in (TransformerLens with
    fold_ln=False). It works layer by layer, in float64: at most two layers' head factors
    (2 x 4 x n_heads x d_model x d_head x 8 bytes) and one layer pair's [H, H, r, r] products
    are held at a time, besides the d x d Grams of the embeddings and the outputs.

    - ``qk_norm``/``ov_norm`` and their singular values, from the r x r core of the factors.
    - Full circuits through the embedding E [V, d] and the unembedding weight U [V, d] (what
      lies between them and the residual stream, e.g. the final norm, is left out): the
      Frobenius norms of E W_QK E^T and E W_OV U^T, and the copying scores of the full OV
      circuit from its eigenvalues l (the eigenvalues of the r x r matrix W_O U^T E W_V, equal
      to the nonzero ones of the V x V circuit, which is never formed): ``copying`` =
      sum Re(l) / sum |l| (Elhage et al. 2021, in [-1, 1]) and ``copying_positive`` =
      sum max(Re(l), 0) / sum |l|, the fraction of the eigenvalue mass that is positive real.
    - Composition scores (TransformerLens ``all_composition_scores``): for an earlier head i
      and a later head j, ||W_OV^i R_j||_F / (||W_OV^i||_F ||R_j||_F) with R_j = W_QK^j (Q),
      (W_QK^j)^T (K) or W_OV^j (V); [L, H, L, H] tensors, zero unless layer(i) < layer(j).
    - Rotary models: the query-key score depends on the offset D = i - j, QK(D) = W_Q R(D) W_K^T
      with R(D) the rotation of the model's own rotary module (its inv_freq; rotary dims paired
      as Hugging Face's rotate_half). The main fields are D = 0 (the unrotated weights, as
      TransformerLens); ``*_by_offset`` fields repeat the QK-dependent ones at each D in
      ``rotary_offsets`` (first axis), and ``rotary`` says which were used.
    """

    name = "circuits.qkov"
    supports_dispatch = True  # reads the weights through view.head_weights / weight_of (loaded when offloaded)
    version = "1"
    summary = "per-head QK/OV circuits, full-circuit copying scores, Q/K/V composition (rotary offsets swept)"
    Params = QKOVParams
    artifacts = ("weights",)
    fields = {
        "qk_norm": "layer x head ||W_QK||_F (offset 0)", "ov_norm": "layer x head ||W_OV||_F",
        "qk_singular_values": "[L, H, d_head] singular values of W_QK (offset 0)",
        "ov_singular_values": "[L, H, d_head] singular values of W_OV",
        "full_qk_norm": "layer x head ||E W_QK E^T||_F", "full_ov_norm": "layer x head ||E W_OV U^T||_F",
        "full_ov_eigenvalues": "[L, H, d_head, 2] real and imaginary parts of the full OV circuit's eigenvalues",
        "copying": "layer x head sum Re(l) / sum |l| of the full OV circuit", "copying_positive":
        "layer x head sum max(Re(l), 0) / sum |l| of the full OV circuit",
        "composition_q": "[L, H, L, H] Q-composition (offset 0)", "composition_k": "[L, H, L, H] K-composition "
        "(offset 0)", "composition_v": "[L, H, L, H] V-composition",
        "rotary_offsets": "the offsets D of the *_by_offset fields (rotary models)",
        "qk_norm_by_offset": "[n_offsets, L, H] ||W_Q R(D) W_K^T||_F",
        "composition_q_by_offset": "[n_offsets, L, H, L, H]", "composition_k_by_offset": "[n_offsets, L, H, L, H]",
        "rotary": "which offsets were used and why", "W_QK": "[L, H, d, d] (matrices=True)",
        "W_OV": "[L, H, d, d] (matrices=True)",
    }

    @classmethod
    def skip_reason(cls, params: QKOVParams, view: ModelView, data: PreparedData | None) -> str | None:
        try:
            view.head_weights(0)
        except NotImplementedError as exc:
            return f"{exc}: per-head circuits need an adapter that maps heads"
        return None

    @classmethod
    def cost(cls, params: QKOVParams, view: ModelView, shape: RunShape) -> Cost:
        n, r, d = view.n_layers * view.n_heads, view.d_head, view.d_model
        sweeps = 3 + (2 * len(params.rotary_offsets) if view.rotary else 0)
        # per head pair and composition: B_i P_j (2 r^2 d) and the two r x r products (4 r^3)
        flops = n * n / 2 * (2 * r * r * d + 4 * r ** 3) * sweeps + n * 8 * d * d * r
        if params.full_circuits:
            flops += 6.0 * view.vocab_size * d * d
        # ``weight_of`` loads an offloaded embedding and unembedding, both held while their Gram matrices are made
        copies = sum(view.loaded_bytes(m) for m in (view.embed, view.unembed) if m is not None)
        return Cost(state_bytes=0, flops=flops, result_bytes=cls.result_tensor_bytes(params, view),
                    transient_bytes=TokenGrams.working_bytes(view) + copies if params.full_circuits else 0)

    @staticmethod
    def result_tensor_bytes(params: QKOVParams, view: ModelView) -> int:
        """The float32 tensors among the results: per head the two spectra (and the full OV eigenvalues as
        real pairs), the three [L, H, L, H] compositions, their QK sweeps over the rotary offsets, and with
        ``matrices`` W_QK and W_OV."""
        heads, r = view.n_layers * view.n_heads, view.d_head
        floats = heads * r * (2 + (2 if params.full_circuits else 0)) + 3 * heads * heads
        offsets = len(params.rotary_offsets) if view.rotary else 0
        floats += offsets * (heads + 2 * heads * heads)
        if params.matrices:
            floats += 2 * heads * view.d_model ** 2
        return 4 * floats

    def finalize(self) -> dict[str, Any]:
        view, p = self.view, self.params
        unembed = getattr(view.unembed, "weight", None)
        full = p.full_circuits and isinstance(unembed, torch.Tensor) and unembed.shape[-1] == view.d_model
        # weight_of: a dispatched model's embedding and unembedding may be offloaded
        grams = TokenGrams.of(view.weight_of(view.embed), view.weight_of(view.unembed)) \
            if full and view.unembed is not None else None
        per_layer: dict[str, list[torch.Tensor]] = {}
        for layer in range(view.n_layers):
            for name, value in self._head_values(layer_heads(view, layer), grams).items():
                per_layer.setdefault(name, []).append(value)
        stacked = {name: torch.stack(values) for name, values in per_layer.items()}
        out: dict[str, Any] = {}
        for name, value in stacked.items():
            if name == "full_ov_eigenvalues":
                out[name] = torch.view_as_real(value).float()
            elif value.dim() == 2:
                out[name] = HeadValue(values=value.tolist())
            else:
                out[name] = value.float()
        out.update({f"composition_{k}": v.float() for k, v in compositions(view, None).items()})
        out.update(self._rotary())
        return out

    def _head_values(self, h: Heads, grams: TokenGrams | None) -> dict[str, torch.Tensor]:
        """One layer's per-head values: [H] norms and scores, [H, r] spectra (and [H, d, d] matrices)."""
        qk, ov = (h.W_Q, h.W_K.transpose(-2, -1)), (h.W_V, h.W_O)
        out = {"qk_norm": product_norm(*qk), "ov_norm": product_norm(*ov),
               "qk_singular_values": factored_svdvals(*qk), "ov_singular_values": factored_svdvals(*ov)}
        if grams is not None:
            full = full_circuits(h, grams)
            copying, positive = copying_scores(full["eigenvalues"])
            out.update({"full_qk_norm": full["qk_norm"], "full_ov_norm": full["ov_norm"], "copying": copying,
                        "copying_positive": positive, "full_ov_eigenvalues": full["eigenvalues"]})
        if self.params.matrices:
            out.update({"W_QK": qk[0] @ qk[1], "W_OV": ov[0] @ ov[1]})
        return out

    def _rotary(self) -> dict[str, Any]:
        view, offsets = self.view, self.params.rotary_offsets
        if not view.rotary:
            return {"rotary": TextValue(text="no rotary embedding: QK does not depend on the offset")}
        found = rotary_frequencies(view)
        if found is None or not offsets:
            why = "no rotary module with inv_freq found" if found is None else "no offsets requested"
            return {"rotary": TextValue(text=f"offset 0 only ({why})")}
        inv_freq, scaling = found
        by_norm, by_q, by_k = [], [], []
        for delta in offsets:
            rotation = rotary_matrix(inv_freq, view.d_head, delta, scaling)
            by_norm.append(torch.stack([product_norm(h.W_Q @ rotation, h.W_K.transpose(-2, -1)) for h in
                                        (layer_heads(view, layer) for layer in range(view.n_layers))]))
            comp = compositions(view, rotation, modes="qk")
            by_q.append(comp["q"])
            by_k.append(comp["k"])
        text = (f"main fields at offset 0 (unrotated weights); *_by_offset at offsets {list(offsets)}, "
                f"rotary dims {2 * inv_freq.shape[0]} of {view.d_head}")
        return {"rotary": TextValue(text=text),
                "rotary_offsets": SeriesValue(values=[float(d) for d in offsets], index_name="offset"),
                "qk_norm_by_offset": torch.stack(by_norm).float(),
                "composition_q_by_offset": torch.stack(by_q).float(),
                "composition_k_by_offset": torch.stack(by_k).float()}
