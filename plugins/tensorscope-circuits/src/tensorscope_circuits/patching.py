"""circuits.patching: which activations carry the difference between a clean and a corrupted prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field, model_validator
from torch.utils.hooks import RemovableHandle

from tensorscope_core.plugin_api import (
    Cost,
    DataError,
    HeadValue,
    Metric,
    ModelView,
    Params,
    PreparedData,
    RunShape,
    ScalarValue,
)

from .interventions import edit_heads, edit_resid, head_attn_out_reason, hooked, logits_of, record
from .tokens import token_id

Prompt = str | list[int]
EXAMPLE = ("params={'circuits.patching': {'clean': ['When Mary and John went out, John gave it to'], "
           "'corrupted': ['When Mary and John went out, Mary gave it to'], 'answer': [' Mary'], 'wrong': [' John']}}")


class PatchingParams(Params):
    clean: list[Prompt] = Field(default_factory=list, description="clean prompts (texts or token ids)")
    corrupted: list[Prompt] = Field(default_factory=list, description="corrupted prompts, token-aligned with clean")
    answer: list[int | str] = Field(default_factory=list, description="the right answer token per pair (or one)")
    wrong: list[int | str] = Field(default_factory=list, description="the wrong answer token per pair (or one)")
    position: int = Field(-1, description="position whose logits give the logit difference (negative: from the end)")
    heads: bool = Field(True, description="also patch every head's output")

    @model_validator(mode="after")
    def _pairs(self) -> PatchingParams:
        if len(self.clean) != len(self.corrupted):
            raise ValueError(f"{len(self.clean)} clean but {len(self.corrupted)} corrupted prompts: give them in pairs")
        for name, tokens in (("answer", self.answer), ("wrong", self.wrong)):
            if self.clean and len(tokens) not in (1, len(self.clean)):
                raise ValueError(f"{name} needs one token, or one per pair ({len(self.clean)}), got {len(tokens)}")
        return self


def _prompt_ids(view: ModelView, prompts: Sequence[Prompt], what: str) -> list[list[int]]:
    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if view.tokenizer is None:
                raise DataError(f"{what} prompt {i} is text but {view.name} has no tokenizer",
                                "pass token ids, or save the tokenizer with the model")
            prompt = list(view.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if not prompt or min(prompt) < 0 or max(prompt) >= view.vocab_size:
            raise DataError(f"{what} prompt {i} is empty or has ids outside the vocabulary "
                            f"({view.vocab_size} tokens)", "pass non-empty prompts in the model's vocabulary")
        rows.append(prompt)
    return rows


def _checked(params: PatchingParams, view: ModelView) -> tuple[list[list[int]], list[list[int]], int, list[int],
                                                                list[int]]:
    """(clean ids, corrupted ids, position >= 0, answer ids, wrong ids); raises DataError on
    prompts or tokens the metric cannot use (before any forward)."""
    clean, corrupted = _prompt_ids(view, params.clean, "clean"), _prompt_ids(view, params.corrupted, "corrupted")
    lengths = {len(row) for row in clean + corrupted}
    if len(lengths) != 1:
        detail = ", ".join(f"pair {i}: {len(c)} / {len(x)}" for i, (c, x) in enumerate(zip(clean, corrupted,
                                                                                          strict=True)))
        raise DataError(f"patching needs every prompt to have the same number of tokens ({detail})",
                        "make each corrupted prompt token-aligned with its clean one, and all pairs one length")
    t = lengths.pop()
    position = t + params.position if params.position < 0 else params.position
    if not 0 <= position < t:
        raise DataError(f"position {params.position} lies outside prompts of {t} tokens", "choose -t..t-1")
    answer = [token_id(view, token, "answer") for token in params.answer]
    wrong = [token_id(view, token, "wrong") for token in params.wrong]
    return clean, corrupted, position, answer, wrong


class Patcher:
    """Runs the clean prompts once (keeping every resid entry and head output), the corrupted
    ones once, and then one corrupted run per patch. ``restored`` of a patch is
    (LD_patched - LD_corrupted) / (LD_clean - LD_corrupted) with LD the logit difference
    logit[answer] - logit[wrong] at ``position``, averaged over the pairs."""

    def __init__(self, view: ModelView, clean: torch.Tensor, corrupted: torch.Tensor, answer: torch.Tensor,
                 wrong: torch.Tensor, position: int, heads: bool) -> None:
        self.view, self.corrupted = view, corrupted
        self.answer, self.wrong, self.position = answer, wrong, position
        self.mask = torch.ones_like(corrupted)
        self.store: dict[Any, torch.Tensor] = {}
        handles = [edit_resid(view, i, record(self.store, ("resid", i))) for i in range(view.n_layers + 1)]
        if heads:
            handles += [edit_heads(view, layer, record(self.store, ("head", layer))) for layer in range(view.n_layers)]
        self.clean = self._logit_diff(handles, clean)
        self.corrupt = self._logit_diff([], corrupted)
        if abs(self.clean - self.corrupt) <= 1e-9 * max(1.0, abs(self.clean)):
            raise ValueError(f"the clean and corrupted prompts give the same mean logit difference ({self.clean:.6g}): "
                             "there is nothing to restore; choose pairs whose answers differ")

    def _logit_diff(self, handles: list[RemovableHandle], ids: torch.Tensor) -> float:
        with hooked(handles), torch.no_grad():
            logits = logits_of(self.view, ids, self.mask)[:, self.position].double()
        rows = torch.arange(len(ids))
        return float((logits[rows, self.answer] - logits[rows, self.wrong]).mean())

    def _restored(self, handle: RemovableHandle) -> float:
        return (self._logit_diff([handle], self.corrupted) - self.corrupt) / (self.clean - self.corrupt)

    def resid(self, index: int, positions: int | slice) -> float:
        """Restored fraction with ``resid[index]`` at ``positions`` taken from the clean run."""
        source = self.store[("resid", index)]

        def patch(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[:, positions] = source[:, positions].to(x)
            return x
        return self._restored(edit_resid(self.view, index, patch))

    def head(self, layer: int, head: int) -> float:
        """Restored fraction with head ``head`` of ``layer`` taken from the clean run at every position."""
        source = self.store[("head", layer)]

        def patch(z: torch.Tensor) -> torch.Tensor:
            z = z.clone()
            z[..., head, :] = source.view_as(z)[..., head, :].to(z)
            return z
        return self._restored(edit_heads(self.view, layer, patch))


class ActivationPatching(Metric):
    """Activation patching (Meng et al. 2022; Wang et al. 2022, the IOI circuit): run the
    corrupted prompt, replace one activation with its value on the clean prompt, and measure how
    much of the clean logit difference comes back:

        restored = (LD_patched - LD_corrupted) / (LD_clean - LD_corrupted),
        LD = logit[answer] - logit[wrong] at ``position``, averaged over the pairs

    (1 = the activation carries all of the difference, 0 = none). ``resid`` [n_layers + 1, T]:
    ``resid[l]`` (the core's numbering: l = 0 enters block 0, l = n_layers leaves the last block)
    patched at one position at a time. ``heads`` per layer x head: the head's output (its slice of
    the input of the attention output projection) patched at every position.

    The prompt pairs are the metric's data, given in its parameters (texts are tokenised as the
    core tokenises data, special tokens included; or token ids): every prompt must have the
    same number of tokens T, each clean prompt token-aligned with its corrupted one. The run's
    batches are not used (the metric needs no data pass).
    """

    name = "circuits.patching"
    version = "1"
    summary = "activation patching clean -> corrupted: restored logit difference per layer x position and per head"
    Params = PatchingParams
    artifacts = ("weights",)
    supports_dispatch = True  # its forwards run through the model's own (dispatching) hooks, edited by hooks
    fields = {"resid": "restored fraction per resid entry x position [n_layers + 1, T]",
              "heads": "restored fraction per layer x head (the head's output patched at every position)",
              "logit_diff_clean": "mean logit difference on the clean prompts",
              "logit_diff_corrupted": "mean logit difference on the corrupted prompts"}

    @classmethod
    def skip_reason(cls, params: PatchingParams, view: ModelView, data: PreparedData | None) -> str | None:
        if not params.clean:
            return f"needs prompt pairs and answers in its parameters, e.g. {EXAMPLE}"
        if params.heads:
            reason = head_attn_out_reason(view)
            return None if reason is None else f"{reason} (or set heads=False to patch only the residual stream)"
        return None

    @classmethod
    def cost(cls, params: PatchingParams, view: ModelView, shape: RunShape) -> Cost:
        # token ids are counted, texts estimated by their words (the tokenizer is not at hand here)
        pairs = len(params.clean)
        t = max((len(p) if isinstance(p, list) else len(p.split()) + 1 for p in params.clean), default=0)
        forwards = 2 + (view.n_layers + 1) * t + view.n_layers * view.n_heads * params.heads
        return Cost(state_bytes=0, flops=2.0 * view.n_params * pairs * t * forwards)

    @classmethod
    def own_passes(cls, params: PatchingParams, view: ModelView, shape: RunShape) -> dict[str, int]:
        """In ``finalize``, on the prompt pairs (all at once): one forward of the clean and one
        of the corrupted prompts, one per resid entry and position ((n_layers + 1) x T, T the
        prompts' token count) and, with ``heads``, one per head. None when the prompts or answer
        tokens are refused (the metric fails before any call). Planned count: when the clean
        and corrupted prompts give the same logit difference it fails after the first two."""
        try:
            clean, *_ = _checked(params, view)
        except DataError:
            return {}
        t = len(clean[0])
        return {"replay_forward": 2 + (view.n_layers + 1) * t + view.n_layers * view.n_heads * params.heads}

    def finalize(self) -> dict[str, Any]:
        p = self.params
        clean, corrupted, position, answer, wrong = _checked(p, self.view)
        t = len(clean[0])
        device = self.view.input_device  # a dispatched model's embedding may be offloaded (a meta tensor)

        def tokens(ids: list[int]) -> torch.Tensor:
            return torch.tensor(ids * len(clean) if len(ids) == 1 else ids, device=device)

        patcher = Patcher(self.view, torch.tensor(clean, device=device), torch.tensor(corrupted, device=device),
                          tokens(answer), tokens(wrong), position, p.heads)
        resid = torch.tensor([[patcher.resid(i, pos) for pos in range(t)] for i in range(self.view.n_layers + 1)],
                             dtype=torch.float64)
        out: dict[str, Any] = {"resid": resid,
                               "logit_diff_clean": ScalarValue(value=patcher.clean, n=len(clean)),
                               "logit_diff_corrupted": ScalarValue(value=patcher.corrupt, n=len(clean))}
        if p.heads:
            out["heads"] = HeadValue(values=[[patcher.head(layer, h) for h in range(self.view.n_heads)]
                                             for layer in range(self.view.n_layers)])
        return out
