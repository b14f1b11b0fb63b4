"""Independent reference computations for the tensorscope-basic tests.

Nothing here calls the plugin: each function recomputes a metric's definition from the
Hugging Face model directly (eager attention, eval mode, float64 accumulation), so the
tests compare the plugin against a second, separately written implementation.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers as tf

from tensorscope_core import testing
from tensorscope_core.core_artifacts import loss_targets  # no public equivalent: the core's seeded MLM masks
from tensorscope_core.plugin_api import Batch

CAUSAL = ("gpt2", "llama")
ALL = ("gpt2", "llama", "bert")
BATCH_SIZE = 4
MAX_LENGTH = 32

# Variable-length texts (12 to 21 words from the built-in corpus, plus a few very short
# ones) so that batches are padded; the short ones end up beside long ones in a batch.
SHORT_TEXTS = ["the sea", "A small boat left the harbour", "the door", "She counted the steps"]


def padded_texts(corpus: Sequence[str]) -> list[str]:
    texts = list(corpus[:8])
    for i, short in enumerate(SHORT_TEXTS):
        texts.insert(2 * i + 1, short)
    return texts


def load_hf(folder: Path | str, family: str) -> torch.nn.Module:
    cls = tf.AutoModelForMaskedLM if family == "bert" else tf.AutoModelForCausalLM
    return cls.from_pretrained(folder, attn_implementation="eager").eval()


def blocks_of(model: torch.nn.Module, family: str) -> list[torch.nn.Module]:
    if family == "gpt2":
        return list(model.transformer.h)
    if family == "llama":
        return list(model.model.layers)
    return list(model.bert.encoder.layer)


def modified_copy(src: Path, dst: Path, family: str, edit: Callable[[torch.nn.Module], None]) -> Path:
    """Load the model in ``src``, apply ``edit`` to it, save it with the same tokenizer."""
    model = load_hf(src, family)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(dst)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy(f, dst / f.name)
    return dst


def tokenize(tokenizer: object, texts: Sequence[str], max_length: int = MAX_LENGTH) -> list[torch.Tensor]:
    return [torch.tensor(tokenizer(t)["input_ids"][:max_length]) for t in texts]  # type: ignore[operator]


def batches(rows: Sequence[torch.Tensor], batch_size: int = BATCH_SIZE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (ids, attention_mask) batches, pad id 0 (the tiny models' pad token)."""
    return testing.padded_batches(rows, batch_size)


def mlm_targets(ids: torch.Tensor, mask: torch.Tensor, index: int, mask_token_id: int, seed: int = 0):
    """The core's seeded masked-LM targets for batch ``index`` (its documented contract)."""
    view = SimpleNamespace(causal=False, mask_token_id=mask_token_id)
    return loss_targets(view, Batch(ids, mask, None, index, index), seed)  # type: ignore[arg-type]


# -- basic.loss --------------------------------------------------------------------------------
def causal_loss_own(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = BATCH_SIZE) -> float:
    """Token-weighted mean of the model's own ``labels=input_ids`` loss per batch (unpadded)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            n = chunk.shape[0] * (chunk.shape[1] - 1)
            total += float(model(chunk, labels=chunk).loss.double()) * n
            tokens += n
    return total / tokens


def causal_loss_solo(model: torch.nn.Module, rows: Sequence[torch.Tensor]) -> tuple[float, int]:
    """Each sequence alone (no padding at all): sum of -log p(x_{t+1} | x_<=t) in float64."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logp = model(row[None]).logits[0].double().log_softmax(-1)
            total += float(-logp[:-1].gather(1, row[1:, None]).sum())
            tokens += len(row) - 1
    return total / tokens, tokens


def mlm_loss(model: torch.nn.Module, ids: torch.Tensor, mask_token_id: int,
             batch_size: int = BATCH_SIZE) -> tuple[float, int]:
    total, tokens = 0.0, 0
    with torch.no_grad():
        for index, (chunk, mask) in enumerate(batches(list(ids), batch_size)):
            t = mlm_targets(chunk, mask, index, mask_token_id)
            logp = model(input_ids=t.model_input, attention_mask=mask).logits.double().log_softmax(-1)
            nll = -logp.gather(2, chunk[..., None])[..., 0]
            chosen = t.target_mask.bool()
            total += float(nll[chosen].sum())
            tokens += int(chosen.sum())
    return total / tokens, tokens


# -- basic.activation_stats --------------------------------------------------------------------
def resid_streams(model: torch.nn.Module, family: str, ids: torch.Tensor,
                  mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """n_layers + 1 residual streams: hidden_states[l] enters block l; the last one is the
    final block's output taken with a hook (HF's last hidden state is after the final norm)."""
    caught: list[torch.Tensor] = []
    hook = blocks_of(model, family)[-1].register_forward_hook(
        lambda mod, args, out: caught.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        hook.remove()
    return [h.detach() for h in out.hidden_states[:-1]] + [caught[0].detach()]


def resid_norm_solo(model: torch.nn.Module, family: str, rows: Sequence[torch.Tensor]) -> list[float]:
    """Mean per-token L2 norm of each residual stream, each sequence run alone."""
    sums: list[float] | None = None
    tokens = 0
    for row in rows:
        streams = resid_streams(model, family, row[None])
        norms = [float(s[0].double().norm(dim=-1).sum()) for s in streams]
        sums = norms if sums is None else [a + b for a, b in zip(sums, norms, strict=True)]
        tokens += len(row)
    assert sums is not None
    return [s / tokens for s in sums]


def resid_norm_mlm(model: torch.nn.Module, ids: torch.Tensor, mask_token_id: int) -> list[float]:
    """BERT: the same on the masked input the shared forward sees."""
    sums: list[float] | None = None
    tokens = 0
    for index, (chunk, mask) in enumerate(batches(list(ids))):
        t = mlm_targets(chunk, mask, index, mask_token_id)
        streams = resid_streams(model, "bert", t.model_input, mask)
        norms = [float(s.double().norm(dim=-1).sum()) for s in streams]
        sums = norms if sums is None else [a + b for a, b in zip(sums, norms, strict=True)]
        tokens += int(mask.sum())
    assert sums is not None
    return [s / tokens for s in sums]


# -- basic.grad_norms --------------------------------------------------------------------------
def grad_norms(model: torch.nn.Module, family: str, batch_list: Sequence[tuple[torch.Tensor, torch.Tensor]],
               mask_token_id: int | None = None) -> dict[str, object]:
    """Per batch: backward of the model's own mean loss; sqrt of the sum of squared grads per
    block, outside the blocks and in total (float64); then the mean over batches."""
    model.train(False)
    blocks = blocks_of(model, family)
    block_params = [set(map(id, b.parameters())) for b in blocks]
    params = list(dict(model.named_parameters()).values())  # each tied tensor once
    per_batch = []
    for index, (ids, mask) in enumerate(batch_list):
        model.zero_grad(set_to_none=True)
        if family == "bert":
            assert mask_token_id is not None
            t = mlm_targets(ids, mask, index, mask_token_id)
            labels = ids.masked_fill(~t.target_mask.bool(), -100)
            loss = model(input_ids=t.model_input, attention_mask=mask, labels=labels).loss
        else:
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        sq_layer = [0.0] * len(blocks)
        sq_out = 0.0
        for p in params:
            if p.grad is None:
                continue
            s = float(p.grad.double().pow(2).sum())
            owner = next((i for i, ids_ in enumerate(block_params) if id(p) in ids_), None)
            if owner is None:
                sq_out += s
            else:
                sq_layer[owner] += s
        per_batch.append([math.sqrt(s) for s in sq_layer] + [math.sqrt(sq_out),
                                                              math.sqrt(sum(sq_layer) + sq_out)])
    model.zero_grad(set_to_none=True)
    mean = torch.tensor(per_batch, dtype=torch.float64).mean(dim=0).tolist()
    return {"layer_norm": mean[:-2], "outside_norm": mean[-2], "total_norm": mean[-1],
            "per_batch_total": [b[-1] for b in per_batch]}
