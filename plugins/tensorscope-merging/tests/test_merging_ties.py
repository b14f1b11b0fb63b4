"""merging.ties_conflicts: the worked example of metric-specs.md section 6, on vectors and planted in models."""

from __future__ import annotations

import pytest
import torch
from merging_models_reference import finetune, load, registry
from safetensors.torch import load_file
from tensorscope_merging.ties import keep_count, sign_agreement_ratio, sign_counts, task_arithmetic, ties_merge
from tensorscope_merging.ties_conflicts import TiesConflicts

from tensorscope_core import RunConfig, analyze, plan
from tensorscope_core.testing import check_declared_cost, random_token_data

TAU = torch.tensor([[0.5, -0.1, 0.3, -0.8, 0.05],
                    [-0.6, 0.2, 0.1, -0.4, 0.0],
                    [0.4, 0.7, -0.2, 0.1, -0.3]], dtype=torch.float64)
TRIMMED = [[0.5, 0, 0.3, -0.8, 0], [-0.6, 0.2, 0, -0.4, 0], [0.4, 0.7, 0, 0, -0.3]]
MERGED = [0.45, 0.45, 0.30, -0.60, -0.30]
FC1 = "transformer.h.1.mlp.c_fc.weight"


def test_worked_example_of_the_reference() -> None:
    trimmed, signs, merged = ties_merge(TAU, density=0.4)  # the reference's K = 0.4 keeps int(5*0.4)+1 = 3
    assert keep_count(5, 0.4) == 3
    assert trimmed.tolist() == TRIMMED
    assert signs.tolist() == [1, 1, 1, -1, -1]
    assert merged.tolist() == pytest.approx(MERGED, abs=1e-15)
    post, pre = sign_counts(trimmed), sign_counts(TAU)
    assert post.conflict_fraction == 0.2 and pre.conflict_fraction == 1.0
    assert post.conflict_among_shared == pytest.approx(1 / 3) and pre.conflict_among_shared == 1.0
    assert sign_agreement_ratio(trimmed).tolist() == pytest.approx([1 / 3, 1, 1, 1, 1], abs=1e-15)


def test_ties_keeps_more_than_the_count_on_tied_magnitudes() -> None:
    tied = torch.tensor([[0.3, -0.3, 0.3, 0.1, 0.0]], dtype=torch.float64)
    trimmed, _, _ = ties_merge(tied, density=0.2)  # keep count int(5 * 0.2) + 1 = 2, but three magnitudes tie
    assert trimmed.tolist() == [[0.3, -0.3, 0.3, 0.0, 0.0]]


def test_identical_task_vectors_give_the_vector_back() -> None:
    tau = torch.tensor([0.2, -0.5, 0.0, 1.5], dtype=torch.float64)
    _, _, merged = ties_merge(tau.repeat(3, 1), density=1.0)
    assert torch.allclose(merged, tau, rtol=1e-15, atol=0)
    assert torch.allclose(task_arithmetic(tau.repeat(3, 1), lam=0.4), 0.4 * 3 * tau, rtol=1e-15, atol=0)


def test_zero_sum_entries_take_the_majority_sign() -> None:
    _, signs, merged = ties_merge(torch.tensor([[0.5, 0.2, 0.1], [-0.5, 0.3, 0.2]], dtype=torch.float64), density=1.0)
    assert signs.tolist() == [1, 1, 1]  # entry 0 sums to 0: majority of the elected signs is +
    assert merged.tolist() == pytest.approx([0.5, 0.25, 0.15])


@pytest.fixture(scope="module")
def planted(models, tmp_path_factory):
    """Three fine-tunes of the GPT-2 base whose task vectors are the worked example's, in the first
    five entries of block 1's c_fc weight, and zero everywhere else."""
    root = tmp_path_factory.mktemp("ties")
    shape = dict(load(models["gpt2"]).named_parameters())[FC1].shape
    fts = {}
    for i, row in enumerate(TAU):
        delta = torch.zeros(shape, dtype=torch.float64)
        delta[0, :5] = row
        fts[f"t{i + 1}"] = finetune(models["gpt2"], root / f"t{i + 1}", {FC1: delta})
    return fts


def test_worked_example_planted_in_a_model(models, planted, tmp_path) -> None:
    n_params = sum(p.numel() for p in load(models["gpt2"]).parameters())
    density = 2.5 / n_params  # int(d * density) + 1 = 3 entries kept per task, as in the example
    saved = tmp_path / "merged"
    params = {"density": density, "lam": 1.0, "evaluate": False, "save_to": str(saved)}
    with registry("merging"):
        res = analyze(planted, base=models["gpt2"], metrics=["merging.ties_conflicts"],
                      params={"merging.ties_conflicts": params})
    out = res.get("merging.ties_conflicts")
    assert out.status == "ok", out.reason
    layer_entries = sum(p.numel() for n, p in load(models["gpt2"]).named_parameters() if ".h.1." in n)
    assert out.value("keep_count") == 3
    assert out.value("conflict")[1] == pytest.approx(1 / layer_entries, rel=1e-12)
    assert out.value("conflict_pre_trim")[1] == pytest.approx(5 / layer_entries, rel=1e-12)
    assert out.value("conflict_among_shared")[1] == pytest.approx(1 / 3)
    assert out.value("conflict_pre_trim_among_shared")[1] == 1.0
    assert out.value("conflict")[0] == 0.0 and out.value("conflict_among_shared")[0] is None  # nothing shared
    sar = (1 / 3 + (layer_entries - 1)) / layer_entries
    assert out.value("sign_agreement")[1] == pytest.approx(sar, rel=1e-12)
    assert out.value("conflict_total") == pytest.approx(1 / n_params, rel=1e-12)
    assert out.values["ranking"].rows[0][:2] == [1, "1"]
    assert out.value("summary").text == (f"{100 / layer_entries:.3g}% weight conflicts in layer 1 after trimming to "
                                         f"the top {100 * density:.3g}% ({500 / layer_entries:.3g}% before trimming)")
    (hotspot,) = TiesConflicts.interpret(out)
    assert hotspot.level == "hotspot" and hotspot.where == "layer 1"
    merged = dict(load(saved).named_parameters())[FC1].detach().double()
    base = dict(load(models["gpt2"]).named_parameters())[FC1].detach().double()
    delta = merged - base
    assert delta[0, :5].tolist() == pytest.approx(MERGED, abs=1e-6)
    assert float(delta.abs().sum() - delta[0, :5].abs().sum()) == 0.0
    # three fine-tunes share the one working block the declaration sizes (it never grows with them),
    # and the saved merge is the one merged model held
    check_declared_cost(out)
    assert out.measured_bytes <= out.declared_bytes == 4 * n_params + 4 * n_params


@pytest.fixture(scope="module")
def twins(models, tmp_path_factory):
    """Two fine-tunes with the same task vector (every parameter moved)."""
    root = tmp_path_factory.mktemp("twins")
    gen = torch.Generator().manual_seed(3)
    deltas = {n: 0.02 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
              for n, p in load(models["gpt2"]).named_parameters()}
    return {"x": finetune(models["gpt2"], root / "x", deltas), "y": finetune(models["gpt2"], root / "y", deltas)}


def test_identical_fine_tunes_ties_is_the_fine_tune_and_arithmetic_scales_it(models, twins, tmp_path) -> None:
    data = {"math": random_token_data(340, n=4, length=12, seed=1), "code": random_token_data(340, n=4, length=12,
                                                                                           seed=2)}
    file = tmp_path / "merged.safetensors"
    params = {"density": 1.0, "lam": 1.0, "arithmetic_lam": 0.5, "save_to": str(file)}
    with registry("merging,basic"):
        res = analyze(twins, base=models["gpt2"], data=data, config=RunConfig(batch_size=4),
                      metrics=["merging.ties_conflicts", "basic.loss"], params={"merging.ties_conflicts": params})
    out = res.get("merging.ties_conflicts")
    assert out.status == "ok", out.reason
    assert out.value("conflict_total") == 0.0 and out.value("sign_agreement_total") == 1.0
    for task in ("math", "code"):  # theta_base + 1.0 * tau and theta_base + 0.5 * 2 tau are the fine-tune
        own = out.value(f"loss/x/{task}")
        assert own == pytest.approx(res.get("basic.loss", model="x").value(f"loss/{task}"), rel=1e-6)
        assert out.value(f"merged_loss/ties/{task}") == pytest.approx(own, rel=1e-5)
        assert out.value(f"merged_loss/task_arithmetic/{task}") == pytest.approx(own, rel=1e-5)
    assert out.value("loss/base") == pytest.approx(res.get("basic.loss", model="base").value("loss"), rel=1e-6)
    assert [r[0] for r in out.values["losses"].rows] == ["base", "x", "y", "ties (merge)", "task_arithmetic (merge)"]
    state = load_file(str(file))
    fine = dict(load(twins["x"]).named_parameters())
    assert all(torch.allclose(state[n], fine[n].detach(), atol=1e-6) for n in fine)
    check_declared_cost(out)  # both merges held: TIES and task arithmetic


def test_declared_state_without_evaluation(models, twins) -> None:
    """No evaluation and nothing saved: only the working block (on a tiny model, d float32 entries)."""
    with registry("merging"):
        res = analyze(twins, base=models["gpt2"], metrics=["merging.ties_conflicts"],
                      params={"merging.ties_conflicts": {"density": 0.5, "evaluate": False}})
    out = res.get("merging.ties_conflicts")
    assert out.status == "ok", out.reason
    n_params = sum(p.numel() for p in load(models["gpt2"]).parameters())
    assert out.declared_bytes == 4 * n_params and out.measured_bytes == 2 * (n_params // 2) * 4
    check_declared_cost(out)


@pytest.fixture(scope="module")
def triplets(models, tmp_path_factory):
    """Three fine-tunes of the GPT-2 base, every parameter moved by its own Gaussian delta."""
    root = tmp_path_factory.mktemp("triplets")
    out = {}
    for i in range(3):
        gen = torch.Generator().manual_seed(10 + i)
        deltas = {n: 0.02 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
                  for n, p in load(models["gpt2"]).named_parameters()}
        out[f"f{i}"] = finetune(models["gpt2"], root / f"f{i}", deltas)
    return out


def test_sliced_walk_equals_the_whole_stack(models, triplets, tmp_path, monkeypatch) -> None:
    """A working block of 1000 entries (slices of 333, across parameter boundaries) gives exactly the
    TIES merge and counts of the whole stacked task vectors (``ties_merge`` on [3, d])."""
    monkeypatch.setattr("tensorscope_merging.flat.WORK_ENTRIES", 1000)
    file = tmp_path / "merged.safetensors"
    params = {"density": 0.3, "lam": 0.7, "evaluate": False, "save_to": str(file)}
    with registry("merging"):
        out = analyze(triplets, base=models["gpt2"], metrics=["merging.ties_conflicts"],
                      params={"merging.ties_conflicts": params}).get("merging.ties_conflicts")
    assert out.status == "ok", out.reason
    base = dict(load(models["gpt2"]).named_parameters())
    names = sorted(base)
    fine = [dict(load(triplets[f"f{i}"]).named_parameters()) for i in range(3)]
    stack = torch.stack([torch.cat([(f[n] - base[n]).detach().reshape(-1) for n in names]) for f in fine])
    trimmed, _, merged = ties_merge(stack, density=0.3)
    assert out.value("conflict_total") == sign_counts(trimmed).conflict_fraction
    assert out.value("conflict_pre_trim_total") == sign_counts(stack).conflict_fraction
    assert [out.value(f"kept_fraction/f{i}") for i in range(3)] == [float((r != 0).sum()) / r.numel()
                                                                      for r in trimmed]
    state, start = load_file(str(file)), 0
    for n in names:
        size = base[n].numel()
        expected = base[n].detach() + 0.7 * merged[start:start + size].view_as(base[n])
        assert torch.equal(state[n], expected), n
        start += size
    check_declared_cost(out)
    assert out.declared_bytes == 4 * 1000 + 4 * stack.shape[1]


def test_conflicts_only_rung_is_taken_under_a_tight_budget(models, triplets) -> None:
    """The planner steps the metric down to ``conflicts_only`` (no merged model held), and its
    values are those of ``evaluate=False``."""
    data = random_token_data(340, n=4, length=12, seed=1)
    args = dict(base=models["gpt2"], data=data, metrics=["merging.ties_conflicts"])
    with registry("merging"):
        roomy = plan(triplets, **args, config=RunConfig(batch_size=4, memory_budget="64GiB"))[-1]
        assert not roomy.rungs
        budget = roomy.peak_bytes - roomy.declared_state["merging.ties_conflicts"] // 4
        res = analyze(triplets, **args, config=RunConfig(batch_size=4, memory_budget=budget))
        plain = analyze(triplets, **args, params={"merging.ties_conflicts": {"evaluate": False}})
    out, expected = res.get("merging.ties_conflicts"), plain.get("merging.ties_conflicts")
    assert out.status == "ok", out.reason
    assert out.rung is not None and (out.rung.name, out.rung.chosen_by) == ("conflicts_only", "budget")
    assert out.params["evaluate"] is False and "merged_loss/ties" not in out.values
    assert out.value("conflict_total") == expected.value("conflict_total")
    assert out.value("merged_norm") == expected.value("merged_norm")
    check_declared_cost(out)


def test_one_fine_tune_is_skipped(models, planted) -> None:
    with registry("merging"):
        out = analyze({"t1": planted["t1"]}, base=models["gpt2"], metrics=["merging.ties_conflicts"]).get(
            "merging.ties_conflicts")
    assert out.status == "skipped" and "at least two fine-tunes" in out.reason


def test_bad_density_is_refused() -> None:
    from tensorscope_core.plugin_api import BadParameterError

    with registry("merging"), pytest.raises(BadParameterError, match="density"):
        analyze([], metrics=["merging.ties_conflicts"], params={"merging.ties_conflicts": {"density": 0}})
