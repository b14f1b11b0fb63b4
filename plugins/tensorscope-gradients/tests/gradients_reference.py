"""Independent reference computations and hand-built models for the tensorscope-gradients tests.

Nothing here calls the plugin's code: gradients come from ordinary backward passes of the
Hugging Face model (eval mode, eager attention), one example or one batch at a time, in
float64; PCGrad follows the reference PCGrad_tf.py loop written out in numpy.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import transformers as tf

from tensorscope_core import testing

BATCH_SIZE = 4
MAX_LENGTH = 32


def load_hf(folder: Path | str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    return tf.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").to(dtype).eval()


def copy_tokenizer(src: Path, dst: Path) -> None:
    for f in Path(src).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy(f, Path(dst) / f.name)


def modified_copy(src: Path, dst: Path, edit: Callable[[torch.nn.Module], None]) -> Path:
    """Load ``src``, apply ``edit`` under no_grad, save to ``dst`` with the same tokenizer."""
    model = tf.AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        edit(model)
    model.save_pretrained(dst)
    copy_tokenizer(src, dst)
    return dst


def tokenize(tokenizer: object, texts: Sequence[str], max_length: int = MAX_LENGTH) -> list[torch.Tensor]:
    return [torch.tensor(tokenizer(t)["input_ids"][:max_length]) for t in texts]  # type: ignore[operator]


def padded_batches(rows: Sequence[torch.Tensor],
                   batch_size: int = BATCH_SIZE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (ids, attention_mask) batches, pad id 0 (the tiny models' pad token)."""
    return testing.padded_batches(rows, batch_size)


def param_names(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def flat_grad(model: torch.nn.Module, names: Sequence[str] | None = None) -> torch.Tensor:
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    return torch.cat([(params[n].grad if params[n].grad is not None else torch.zeros_like(params[n])).reshape(-1)
                      for n in names]).double()


def example_grads(model: torch.nn.Module, rows: Sequence[torch.Tensor],
                  names: Sequence[str] | None = None, pad_to: Sequence[int] | None = None,
                  summed: bool = False) -> torch.Tensor:
    """[n, P]: one backward pass per example of its mean token loss, float64.

    ``pad_to``: run example i alone but right-padded to ``pad_to[i]`` tokens (attention mask 0
    on the padding), as in its batch. LLaMA's rotary embedding computes its angles in float32,
    so in float64 a sequence padded to a longer length differs from the same sequence alone by
    ~1e-8; padding it the same way isolates what the tests check.

    ``summed``: the backward pass of the *summed* token loss, divided by the number of targets
    after (the same gradient, rounded as the core's ``per_example_grads`` rounds it: LLaMA's
    RMSNorm computes in float32, so in float64 the two orders differ by float32 rounding, ~1e-7
    of the gradient's size).
    """
    out = []
    for i, row in enumerate(rows):
        model.zero_grad(set_to_none=True)
        width = len(row) if pad_to is None else pad_to[i]
        ids = torch.zeros(1, width, dtype=torch.long)
        ids[0, :len(row)] = row
        mask = (torch.arange(width) < len(row)).long()[None]
        logp = model(input_ids=ids, attention_mask=mask).logits[0, :len(row) - 1].log_softmax(-1)
        nll = -logp.gather(1, row[1:, None])
        if summed:
            nll.sum().backward()
            out.append(flat_grad(model, names) / max(1, nll.numel()))
        else:
            nll.mean().backward()
            out.append(flat_grad(model, names))
    model.zero_grad(set_to_none=True)
    return torch.stack(out)


def batch_widths(rows: Sequence[torch.Tensor], batch_size: int = BATCH_SIZE) -> list[int]:
    """The padded length each row has in its batch."""
    return [max(len(r) for r in rows[s:s + batch_size]) for s in range(0, len(rows), batch_size)
            for _ in rows[s:s + batch_size]]


def batch_grads(model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                names: Sequence[str] | None = None) -> torch.Tensor:
    """[n_batches, P]: gradient of each padded batch's mean token loss over its real next tokens,
    the cross-entropy written out in the model's dtype (transformers' own loss upcasts to float32)."""
    out = []
    for ids, mask in batches:
        model.zero_grad(set_to_none=True)
        logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
        nll = -logp.gather(2, ids[:, 1:, None])[..., 0]
        keep = mask[:, 1:].to(nll.dtype)
        ((nll * keep).sum() / keep.sum()).backward()
        out.append(flat_grad(model, names))
    model.zero_grad(set_to_none=True)
    return torch.stack(out)


def block_of(model: torch.nn.Module) -> list[int | None]:
    """Block index per parameter (named_parameters order), None outside the blocks."""
    blocks = list(model.transformer.h) if hasattr(model, "transformer") else list(model.model.layers)
    owner = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
    return [owner.get(id(p)) for _, p in model.named_parameters()]


def group_slices(model: torch.nn.Module) -> list[torch.Tensor]:
    """Per block (then 'outside'): boolean mask over the flat vector."""
    owners = block_of(model)
    n_layers = max(o for o in owners if o is not None) + 1
    sizes = [p.numel() for _, p in model.named_parameters()]
    labels = torch.cat([torch.full((s,), n_layers if o is None else o) for s, o in zip(sizes, owners, strict=True)])
    return [labels == layer for layer in range(n_layers + 1)]


def pcgrad_reference(grads: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """PCGrad_tf.py: each task gradient projected in turn against every other task's
    original gradient (in ``order``) when their inner product is negative; coefficient min(., 0)."""
    out = []
    for i in range(len(grads)):
        g = grads[i].copy()
        for j in order:
            if j == i:
                continue
            inner = float(g @ grads[j])
            g = g - min(inner, 0.0) / float(grads[j] @ grads[j]) * grads[j]
        out.append(g)
    return np.array(out)


def write_trainer_state(folder: Path, step: int, rates: Sequence[tuple[int, float]]) -> None:
    """trainer_state.json as transformers' TrainerState.save_to_json writes it (the fields we read)."""
    log = [{"epoch": s / 10, "grad_norm": 1.0, "learning_rate": lr, "loss": 2.0, "step": s} for s, lr in rates]
    log.append({"epoch": step / 10, "eval_loss": 1.5, "step": step})  # an eval entry: no learning rate
    state = {"best_global_step": None, "best_metric": None, "best_model_checkpoint": None, "epoch": step / 10,
             "eval_steps": 500, "global_step": step, "is_hyper_param_search": False, "is_local_process_zero": True,
             "is_world_process_zero": True, "log_history": log, "logging_steps": 1, "max_steps": 100,
             "num_input_tokens_seen": 0, "num_train_epochs": 1, "save_steps": 10, "stateful_callbacks": {},
             "total_flos": 0.0, "train_batch_size": 4, "trial_name": None, "trial_params": None}
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


# -- a model with planted conflicting examples --------------------------------------------------
def plant_conflicts(src: Path, dst: Path, contexts: Sequence[int], pairs: Sequence[tuple[int, int]],
                    others: Sequence[int], strength: float = 20.0) -> Path:
    """Make the model predict y_k and z_k with probability 1/2 each after the one-token context
    c_k, and leave every other context in ``others`` untouched.

    The unembedding rows of y_k and z_k are both set to a u_k, with u_k the part of the final
    hidden state h(c_k) orthogonal to the hidden states of every other context, scaled so that
    the logit a u_k . h(c_k) = ``strength``. Then the examples [c_k, y_k] and [c_k, z_k] have
    exactly opposite loss gradients (softmax - one-hot = +-(e_z - e_y)/2, and the rows of y_k
    and z_k are equal, so nothing reaches the rest of the model), while the logits of y_k, z_k
    after any other context are 0.
    """
    def edit(model: torch.nn.Module) -> None:
        all_contexts = list(contexts) + [c for c in others if c not in contexts]
        hidden = model(torch.tensor(all_contexts)[:, None], output_hidden_states=True).hidden_states[-1][:, 0]
        hidden = hidden.double()
        weight = model.get_output_embeddings().weight
        for k, (y, z) in enumerate(pairs):
            rest = torch.cat([hidden[:k], hidden[k + 1:]])
            basis, _ = torch.linalg.qr(rest.T)
            u = hidden[k] - basis @ (basis.T @ hidden[k])
            u = u / u.norm()
            row = (strength / float(hidden[k] @ u)) * u
            weight[y] = row.to(weight.dtype)
            weight[z] = row.to(weight.dtype)

    return modified_copy(src, dst, edit)
