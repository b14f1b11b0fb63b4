"""lottery.imp and lottery.imp_overlap: hand masks, iterated pruning of the survivors equal to one-shot
pruning, lr = 0 (IMP = iterated one-shot pruning, exactly), p = 0, an independent float64 IMP written
here with torch.optim.SGD on the Hugging Face model, declared passes and state, typed errors."""

from __future__ import annotations

import math

import pytest
import torch
from tensorscope_merging.imp import ImpParams, IterativeMagnitudePruning, one_shot_masks, prune_survivors
from tensorscope_merging.lottery import dice, global_masks, jaccard, layerwise_masks
from transformers import AutoModelForCausalLM

from tensorscope_core import ModelSource, RunConfig, analyze
from tensorscope_core.models.load import load_model
from tensorscope_core.plugin_api import BadParameterError, RunShape
from tensorscope_core.plugins import get_registry
from tensorscope_core.testing import (
    check_declared_cost,
    check_declared_passes,
    check_roundtrip,
    random_token_data,
    run_at_rung,
    tiny_model,
)

CFG = RunConfig(batch_size=4, max_length=16)
METRIC = "lottery.imp"


def test_jaccard_and_dice_of_hand_masks():
    a = {"m": torch.tensor([True, True, False, False])}
    b = {"m": torch.tensor([True, False, True, False])}
    assert jaccard(a, b) == pytest.approx(1 / 3) and dice(a, b) == pytest.approx(1 / 2)
    assert jaccard(a, a) == 1.0 and dice(a, a) == 1.0
    none = {"m": torch.zeros(4, dtype=torch.bool)}
    assert dice(none, none) == 1.0 and dice(a, none) == 0.0


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruning_the_survivors_again_is_one_shot_pruning(scope):
    """Magnitudes from 5 values (ties everywhere): pruning half the survivors twice removes exactly the
    entries a one-shot cut at 3/4 removes (stable order by |w|, then position), never regrowing one."""
    gen = torch.Generator().manual_seed(1)
    weights = {n: (torch.randint(-4, 5, shape, generator=gen) * 0.5) for n, shape in (("a", (4, 8)), ("b", (8, 4)))}
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    first = prune_survivors(weights, masks, 0.5, scope)
    second = prune_survivors(weights, first, 0.5, scope)
    want = (global_masks if scope == "global" else layerwise_masks)(weights, 0.75)
    for name in weights:
        assert torch.equal(second[name], want[name]), name
        assert not (second[name] & ~first[name]).any()  # nothing pruned comes back
    assert all(torch.equal(one_shot_masks(weights, second, scope)[n], want[n]) for n in weights)


def test_params_are_checked():
    with pytest.raises(ValueError, match="rewind_step must be below steps"):
        ImpParams(steps=3, rewind_step=3)
    with pytest.raises(ValueError):
        ImpParams(prune_fraction=1.0)
    with pytest.raises(ValueError):
        ImpParams(scope="row")


@pytest.mark.parametrize("params", [{"steps": 2, "rewind_step": 2}, {"momentum": 1.0}, {"round": 2}])
def test_bad_parameters_are_typed_errors(models, tokenizer, params):
    ids = random_token_data(len(tokenizer), n=4, length=8, seed=3)
    with pytest.raises(BadParameterError):
        analyze(str(models["gpt2"]), data=ids, metrics=[METRIC], params={METRIC: params}, config=CFG)


def _blocks_matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """GPT-2's weight matrices inside its blocks, picked by name (what lottery prunes by default)."""
    return {n: p.detach() for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() >= 2}


@pytest.fixture(scope="module")
def data(tokenizer):
    return random_token_data(len(tokenizer), n=8, length=10, seed=8)  # 2 batches of 4, no padding


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_lr_zero_is_iterated_one_shot_pruning(models, data, scope):
    """lr = 0: after n = 2 rounds of p = 1/2 the ticket is the one-shot mask of the given weights at
    sparsity 1 - (1 - 1/2)^2 = 3/4 (every matrix has a multiple of 4 entries, so exactly), and each
    round's loss is basic.loss of the model pruned by hand with that mask."""
    params = {"steps": 2, "rounds": 2, "prune_fraction": 0.5, "lr": 0.0, "scope": scope}
    res = analyze(str(models["gpt2"]), data=data, metrics=[METRIC, "basic.loss"], params={METRIC: params},
                  config=CFG)
    result = res.get(METRIC)
    assert result.ok, result.reason
    assert result.value("sparsity") == [0.0, 0.5, 0.75]
    assert result.value("jaccard_one_shot") == [1.0, 1.0] and result.value("dice_one_shot") == [1.0, 1.0]
    # each mask lies inside the previous one and keeps half of it: Jaccard 1/2, Dice 2 (1/2) / (1 + 1/2) = 2/3
    assert result.value("jaccard_previous") == pytest.approx([0.5, 0.5])
    assert result.value("dice_previous") == pytest.approx([2 / 3, 2 / 3])
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"])
    matrices = _blocks_matrices(model)
    want = (global_masks if scope == "global" else layerwise_masks)(matrices, 0.75)
    assert sorted(f[len("ticket/"):] for f in result.values if f.startswith("ticket/")) == sorted(matrices)
    for name in matrices:
        assert torch.equal(res.tensor(METRIC, f"ticket/{name}"), want[name]), name
    loss = result.value("loss")
    assert loss[0] == pytest.approx(res.get("basic.loss").value("loss"), rel=1e-6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in want:
                p.mul_(want[name])
    pruned = analyze(model, data=data, metrics=["basic.loss"], config=CFG).get("basic.loss").value("loss")
    assert loss[2] == pytest.approx(pruned, rel=1e-6)
    check_declared_cost(result)
    check_declared_passes(result)
    assert result.model_calls == (2 + 2 * 2) + 3 * 2  # K + n K steps, (n + 1) x 2 batches of losses


def test_prune_fraction_zero_keeps_everything(models, data):
    result = analyze(str(models["llama"]), data=data, metrics=[METRIC],
                     params={METRIC: {"steps": 2, "rounds": 2, "prune_fraction": 0.0, "lr": 0.01}},
                     config=CFG).get(METRIC)
    assert result.ok, result.reason
    assert result.value("sparsity") == [0.0, 0.0, 0.0]
    for field in ("jaccard_previous", "dice_previous", "jaccard_one_shot", "dice_one_shot"):
        assert result.value(field) == [1.0, 1.0], field


def reference_imp(model: torch.nn.Module, ids: torch.Tensor, *, steps: int, rounds: int, fraction: float,
                  rewind: int, lr: float, momentum: float) -> tuple[dict[str, torch.Tensor], list[float]]:
    """IMP written independently: the HF model's next-token loss, torch.optim.SGD on its
    parameters, per-matrix pruning of the survivors by a stable sort of their magnitudes."""
    params = dict(model.named_parameters())
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in _blocks_matrices(model).items()}
    batches = [ids[i:i + 4] for i in range(0, len(ids), 4)]
    saved: dict[str, torch.Tensor] = {}

    def loss_of(b: torch.Tensor) -> torch.Tensor:  # the next-token loss (HF's own casts logits to float32)
        logits = model(b).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))

    def train(start: int) -> float:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        for k in range(start, steps):
            if start == 0 and k == rewind:
                saved.update({n: p.detach().clone() for n, p in params.items()})
            opt.zero_grad()
            loss_of(batches[k % len(batches)]).backward()
            for n, m in masks.items():
                params[n].grad.mul_(m)
            opt.step()
        with torch.no_grad():
            return sum(float(loss_of(b)) * b.shape[0] * (b.shape[1] - 1) for b in batches) / (
                sum(b.shape[0] * (b.shape[1] - 1) for b in batches))

    losses = [train(0)]
    for _ in range(rounds):
        for n, m in masks.items():
            alive = m.nonzero(as_tuple=True)
            order = torch.sort(params[n].detach()[alive].abs(), stable=True).indices
            drop = order[:math.floor(fraction * len(order) + 0.5)]
            m[tuple(a[drop] for a in alive)] = False
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved.get(n, theta0[n]) * masks[n] if n in masks else saved.get(n, theta0[n]))
        losses.append(train(rewind))
    return masks, losses


def test_imp_equals_an_independent_float64_imp(models, data):
    """Training on: momentum SGD, rewinding to step 1, three rounds of 30% per matrix, in float64."""
    kw = {"steps": 3, "rounds": 3, "fraction": 0.3, "rewind": 1, "lr": 0.5, "momentum": 0.9}
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"], attn_implementation="eager").double()
    given = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = {"steps": 3, "rounds": 3, "prune_fraction": 0.3, "rewind_step": 1, "lr": 0.5, "momentum": 0.9}
    res = analyze(model, data=data, metrics=[METRIC], params={METRIC: params},
                  config=CFG.model_copy(update={"dtype": "float64"}))
    result = res.get(METRIC)
    assert result.ok, result.reason
    for n, p in model.named_parameters():  # the user's model is never modified
        assert torch.equal(p.detach(), given[n]), n
    masks, losses = reference_imp(model, data, **kw)
    for name, mask in masks.items():
        assert torch.equal(res.tensor(METRIC, f"ticket/{name}"), mask), name
    assert result.value("loss") == pytest.approx(losses, rel=1e-9)
    assert losses[1] != pytest.approx(losses[0], rel=1e-3)  # the training moved the loss
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert result.value("final_sparsity") == pytest.approx((total - kept) / total, abs=1e-15)
    assert abs(result.value("final_sparsity") - (1 - 0.7**3)) < 0.01
    assert result.value("steps_trained") == 3 + 3 * 2
    check_declared_cost(result)
    check_declared_passes(result)


@pytest.fixture(scope="module")
def trained_tickets(models, data):
    params = {"steps": 3, "rounds": 2, "prune_fraction": 0.5, "rewind_step": 1, "lr": 0.1}
    res = analyze(str(models["gpt2"]), data=data, metrics=[METRIC], params={METRIC: params}, config=CFG)
    return params, res


def test_tickets_match_the_independent_imp_in_float32(trained_tickets, models, data):
    params, res = trained_tickets
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"], attn_implementation="eager")
    masks, _ = reference_imp(model, data, steps=3, rounds=2, fraction=0.5, rewind=1, lr=0.1, momentum=0.9)
    got = {n: res.tensor(METRIC, f"ticket/{n}") for n in masks}
    assert jaccard(got, masks) > 0.999  # float32: a few entries at the cut may swap


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_tiny_runs_declare_their_passes_and_state(models, tokenizer, family, tmp_path):
    ids = random_token_data(len(tokenizer), n=6, length=8, seed=4)  # batches of 4 and 2
    params = {"steps": 3, "rounds": 2, "prune_fraction": 0.4, "rewind_step": 1, "lr": 0.05, "scope": "global"}
    res = analyze(str(models[family]), data=ids, metrics=[METRIC], params={METRIC: params}, config=CFG)
    result = res.get(METRIC)
    assert result.ok, result.reason
    assert result.value("sparsity")[1] == pytest.approx(0.4, abs=1e-4)
    assert result.value("final_sparsity") == pytest.approx(1 - 0.6**2, abs=1e-4)
    assert result.value("train_batches") == 2.0
    check_declared_cost(result)
    check_declared_passes(result)
    assert result.model_calls == (3 + 2 * 2) + 3 * 2
    check_roundtrip(res, tmp_path / "out")


def test_passes_skip_batches_without_a_target(models):
    """Batches 3, 3, 1 rows of 9 tokens, then three single-token rows (no causal target) and a row of 4:
    GPT-2 cycles 4 batches, so 5 steps see each once and the first again."""
    short = [torch.tensor([7 + i]) for i in range(3)]
    data = {"a": random_token_data(340, n=7, length=9, seed=2), "b": [*short, torch.tensor([10, 11, 12, 13])]}
    result = analyze(str(models["gpt2"]), data=data, metrics=[METRIC],
                     params={METRIC: {"steps": 5, "rounds": 1, "rewind_step": 2}},
                     config=RunConfig(batch_size=3, seed=5)).get(METRIC)
    assert result.ok, result.reason
    assert result.value("train_batches") == 4.0
    check_declared_passes(result)
    assert result.model_calls == (5 + 3) + 2 * 4


def test_no_loss_target_is_skipped_with_the_reason(models, tmp_path):
    """Nothing to train on (one-token rows on a causal model; a masked LM without a mask token): skipped."""
    rows = [torch.tensor([7 + i]) for i in range(4)]
    one_token = analyze(str(models["gpt2"]), data=rows, metrics=[METRIC], config=CFG).get(METRIC)
    assert one_token.status == "skipped" and "no next token" in one_token.reason
    bert = tiny_model("bert", tmp_path / "bert", with_tokenizer=False)
    unmasked = analyze(str(bert), data=random_token_data(64, n=4, length=8), metrics=[METRIC], config=CFG).get(METRIC)
    assert unmasked.status == "skipped" and "mask token" in unmasked.reason


def test_ladder_rungs_save_memory(models, data):
    """Each rung drops one copy of the weights: the rewind point, then SGD's momentum."""
    view = load_model(ModelSource(models["gpt2"]), get_registry().adapters)
    shape = RunShape(batch_size=4, seq_len=10, n_batches=2, n_sequences=8, tasks=(), seed=0,
                     batches=((4, 10, None), (4, 10, None)))
    params = ImpParams(steps=2, rounds=1, rewind_step=1)
    rungs = IterativeMagnitudePruning.ladder(params, view, shape)
    assert [r.name for r in rungs] == ["rewind_to_init", "plain_sgd"]
    assert [r.params.rewind_step for r in rungs] == [0, 0] and rungs[1].params.momentum == 0.0
    assert [r.name for r in IterativeMagnitudePruning.ladder(rungs[0].params, view, shape)] == ["plain_sgd"]
    weights = sum(p.numel() * p.element_size() for p in view.model.parameters())
    held = [IterativeMagnitudePruning.cost(p, view, shape).state_bytes for p in (params, *[r.params for r in rungs])]
    assert [held[0] - held[1], held[1] - held[2]] == [weights, weights]
    _, result = run_at_rung(str(models["gpt2"]), data, METRIC, "plain_sgd", config=CFG,
                            steps=2, rounds=1, rewind_step=1)
    assert result.declared_bytes == held[2]


def test_overlap_of_tickets_across_checkpoints(models, data, trained_tickets, tmp_path):
    other = tiny_model("gpt2", tmp_path / "other", seed=1)
    params, one = trained_tickets
    res = analyze({"a": models["gpt2"], "b": other, "c": models["gpt2"]}, data=data, metrics=["lottery.imp_overlap"],
                  params={METRIC: params}, config=CFG)
    result = res.get("lottery.imp_overlap")
    assert result.ok, result.reason
    tickets = [{f: res.tensor(METRIC, f, model=m) for f in res.get(METRIC, model=m).values if f.startswith("ticket/")}
               for m in ("a", "b")]
    pair = res.tensor("lottery.imp_overlap", "jaccard")
    assert torch.equal(pair, pair.T) and bool((pair.diagonal() == 1).all())
    assert float(pair[0, 2]) == 1.0  # the same checkpoint twice: the same ticket
    inter = sum(int((tickets[0][f] & tickets[1][f]).sum()) for f in tickets[0])
    union = sum(int((tickets[0][f] | tickets[1][f]).sum()) for f in tickets[0])
    sizes = sum(int(tickets[0][f].sum()) + int(tickets[1][f].sum()) for f in tickets[0])
    assert float(pair[0, 1]) == pytest.approx(inter / union, abs=1e-12)
    assert result.value("dice_consecutive")[0] == pytest.approx(2 * inter / sizes, abs=1e-12)
    assert result.value("jaccard_consecutive") == pytest.approx([inter / union, inter / union], abs=1e-12)
    keep = 0.25  # independent seeds: about the overlap of random tickets, k / (2 - k) and k
    assert abs(float(pair[0, 1]) - keep / (2 - keep)) < 0.05 and abs(result.value("dice_consecutive")[0] - keep) < 0.07


def test_overlap_skips_a_single_model(models, data):
    result = analyze(str(models["gpt2"]), data=data, metrics=["lottery.imp_overlap"], config=CFG).get(
        "lottery.imp_overlap")
    assert result.status == "skipped" and "pass at least 2 models" in result.reason
