"""merging.fisher_weighted: the merge on hand-made Fisher tensors, the field contract, and the real fisher plugin."""

from __future__ import annotations

import pytest
import torch
from merging_models_reference import finetune, load, registry
from tensorscope_merging.fisher_weighted import fisher_merge, plain_average

from tensorscope_core import RunConfig, analyze, plan
from tensorscope_core.plugin_api import Metric, NoParams
from tensorscope_core.testing import check_declared_cost, random_token_data

BLOCK1 = ".h.1."
BIG = 1e6


def test_fisher_merge_closed_form() -> None:
    thetas = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], dtype=torch.float64)
    fishers = torch.tensor([[1.0, 0.0, 3.0, 0.0], [3.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    merged = fisher_merge(thetas, fishers)
    assert merged[:3].tolist() == pytest.approx([(1 + 15) / 4, 6.0, 3.0])
    assert torch.isnan(merged[3])  # no information and no floor: undefined
    floored = fisher_merge(thetas, fishers + 1e-6)
    assert float(floored[3]) == pytest.approx(6.0)  # the floor falls back to the plain average
    assert plain_average(thetas).tolist() == [3.0, 4.0, 5.0, 6.0]
    assert fisher_merge(thetas, torch.full((2, 4), 2.5, dtype=torch.float64)).tolist() == [3.0, 4.0, 5.0, 6.0]


class HandFisher(Metric):
    """A stand-in for fisher.diagonal with Fisher values fixed by hand (same field names).

    Pooled ``true/<param>``: BIG on block 1 for model 'y', 0 elsewhere. Per task
    ``true/<task>/<param>``: BIG on block 1 for model 'x' on task 'x', 0 elsewhere.
    """

    name = "fisher.diagonal"
    Params = NoParams
    artifacts = ("weights",)

    def finalize(self):
        out = {}
        for name, p in self.view.model.named_parameters():
            hot = torch.full_like(p, BIG if BLOCK1 in name else 0.0)
            out[f"true/{name}"] = hot if self.view.name == "y" else torch.zeros_like(p)
            for task in self.shape.tasks:
                out[f"true/{task}/{name}"] = hot if (self.view.name, task) == ("x", "x") else torch.zeros_like(p)
        return out


@pytest.fixture(scope="module")
def pair(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("fw")
    gen = torch.Generator().manual_seed(7)
    params = dict(load(models["gpt2"]).named_parameters())

    def moved(scale: float):
        return {n: scale * torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}

    return {"x": finetune(models["gpt2"], root / "x", moved(0.02)),
            "y": finetune(models["gpt2"], root / "y", moved(0.02))}


def _data(tasks: tuple[str, ...]):
    return {t: random_token_data(340, n=4, length=10, seed=i) for i, t in enumerate(tasks)}


def test_pooled_fisher_moves_block_1_to_the_model_holding_the_mass(pair) -> None:
    with registry("merging", HandFisher):
        res = analyze(pair, data=random_token_data(340, n=4, length=10), metrics=["merging.fisher_weighted"],
                      config=RunConfig(batch_size=4))
    out = res.get("merging.fisher_weighted")
    assert out.status == "ok", out.reason
    rel = out.value("relative_shift")
    assert rel[1] == pytest.approx(1.0, abs=1e-5)  # all of block 1's Fisher is y's: the merge is y there
    assert rel[0] == pytest.approx(0.0, abs=1e-5) and rel[2] == pytest.approx(0.0, abs=1e-5)  # equal floors
    x, y = (dict(load(pair[m]).named_parameters()) for m in ("x", "y"))
    want = sum(float((x[n] - y[n]).detach().double().pow(2).sum()) for n in x if BLOCK1 in n) ** 0.5 / 2
    assert out.value("shift")[1] == pytest.approx(want, rel=1e-5)
    assert out.value("fisher_source").text == "x: true/<param> (pooled); y: true/<param> (pooled)"
    assert out.value("loss/y") == pytest.approx(out.values["losses"].rows[1][-1])
    assert out.values["losses"].rows[2][0] == "fisher (merge)"


def test_per_task_fisher_is_read_when_the_task_is_named_like_the_member(pair) -> None:
    with registry("merging", HandFisher):
        res = analyze(pair, data=_data(("x", "y")), metrics=["merging.fisher_weighted"],
                      config=RunConfig(batch_size=4))
    out = res.get("merging.fisher_weighted")
    assert out.status == "ok", out.reason
    assert out.value("fisher_source").text == "x: true/x/<param>; y: true/y/<param>"
    assert out.value("relative_shift")[1] == pytest.approx(1.0, abs=1e-5)  # now x holds block 1's mass
    assert {"merged_loss/fisher/x", "merged_loss/fisher/y", "merged_loss/average", "loss/x/y"} <= set(out.values)


def test_declared_state_is_the_working_block_whatever_the_members(models, pair, tmp_path) -> None:
    """Three merged members and a base, no evaluation: one float64 working block (on a tiny model d
    entries, two rows per member) is what the metric holds, whatever the number of members."""
    gen = torch.Generator().manual_seed(8)
    third = finetune(models["gpt2"], tmp_path / "z", {n: 0.02 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
                                                      for n, p in load(models["gpt2"]).named_parameters()})
    with registry("merging", HandFisher):
        res = analyze({**pair, "z": third}, base=models["gpt2"], data=_data(("x", "y")),
                      metrics=["merging.fisher_weighted"], config=RunConfig(batch_size=4),
                      params={"merging.fisher_weighted": {"evaluate": False}})
    out = res.get("merging.fisher_weighted")
    assert out.status == "ok", out.reason
    n_params = sum(p.numel() for p in load(models["gpt2"]).parameters())
    assert out.declared_bytes == 8 * n_params and out.measured_bytes == 8 * 6 * (n_params // 6)
    check_declared_cost(out)


def test_slices_give_the_whole_model_merges_and_the_rung_is_taken(models, pair, monkeypatch) -> None:
    """Slices of 250 entries (across parameter boundaries) give the shifts of the whole-model maths;
    a tight budget steps the metric to ``shift_only``, which holds no merged model and changes no shift."""
    monkeypatch.setattr("tensorscope_merging.flat.WORK_ENTRIES", 1000)
    args = dict(base=models["gpt2"], data=_data(("x", "y")), metrics=["merging.fisher_weighted"])
    with registry("merging", HandFisher):
        full = analyze(pair, **args, config=RunConfig(batch_size=4)).get("merging.fisher_weighted")
        roomy = plan(pair, **args, config=RunConfig(batch_size=4, memory_budget="64GiB"))[-1]
        budget = roomy.peak_bytes - roomy.declared_state["merging.fisher_weighted"] // 2
        out = analyze(pair, **args, config=RunConfig(batch_size=4, memory_budget=budget)).get(
            "merging.fisher_weighted")
    assert full.status == out.status == "ok", (full.reason, out.reason)
    assert out.rung is not None and (out.rung.name, out.rung.chosen_by) == ("shift_only", "budget")
    assert "merged_loss/fisher" not in out.values and out.value("shift") == full.value("shift")
    check_declared_cost(full)
    check_declared_cost(out)
    base = dict(load(models["gpt2"]).named_parameters())
    members = [dict(load(pair[m]).named_parameters()) for m in ("x", "y")]
    fishers = [{n: torch.full_like(t, BIG if BLOCK1 in n else 0.0) for n, t in base.items()},  # x on task x
               {n: torch.zeros_like(t) for n, t in base.items()}]  # y on task y
    shift = torch.zeros(len(full.value("shift")), dtype=torch.float64)
    layer_of = {n: (int(n.split(".")[2]) if n.startswith("transformer.h.") else len(shift) - 1) for n in base}
    for n in base:
        values = torch.stack([t[n].detach().double() for t in members])
        weights = torch.stack([f[n].double() + 1e-6 for f in fishers])
        fisher = fisher_merge(values, weights).to(base[n].dtype).double()
        shift[layer_of[n]] += float((fisher - plain_average(values).to(base[n].dtype).double()).square().sum())
    assert full.value("shift") == pytest.approx(shift.sqrt().tolist(), rel=1e-12, abs=1e-15)


def test_without_the_fisher_plugin_the_error_names_it(pair) -> None:
    with registry("merging"):
        out = analyze(pair, metrics=["merging.fisher_weighted"]).get("merging.fisher_weighted")
    assert out.status == "error" and "pip install 'tensorscope[fisher]'" in out.reason


def test_with_the_real_fisher_plugin(pair) -> None:
    with registry("merging,fisher") as built:
        if "fisher.diagonal" not in built.metrics:
            pytest.skip("the fisher plugin (fisher.diagonal) is not installed")
        res = analyze(pair, data=_data(("x", "y")), metrics=["merging.fisher_weighted"],
                      config=RunConfig(batch_size=4), params={"merging.fisher_weighted": {"evaluate": False}})
    out = res.get("merging.fisher_weighted")
    assert out.status == "ok", out.reason
    assert out.value("fisher_source").text == "x: true/x/<param>; y: true/y/<param>"
    rel = [v for v in out.value("relative_shift") if v is not None]
    assert len(rel) == 3 and all(0.0 <= v <= 1.0 + 1e-6 for v in rel)  # a convex combination, entrywise
