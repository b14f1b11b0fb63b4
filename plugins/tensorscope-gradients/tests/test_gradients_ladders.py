"""Memory ladders: every rung against the exact result (disk: the same bits; int8, sketches and
float32: within the accuracy each rung states), its declared state true, and the planner choosing a
rung under a tight budget."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from gradients_reference import load_hf
from tensorscope_gradients.flow import GradientFlow
from tensorscope_gradients.sample_conflicts import SampleConflicts
from tensorscope_gradients.task_conflict import TaskConflict
from tensorscope_gradients.tracin import TracInTerms

from tensorscope_core import RunConfig, analyze, builtin_corpus, plan
from tensorscope_core.plugin_api import GradientStore, RunShape, model_view
from tensorscope_core.testing import check_declared_cost, run_at_rung

CONFLICTS, TERMS, TASKS, FLOW = ("gradients.sample_conflicts", "gradients.tracin_terms", "gradients.task_conflict",
                                 "gradients.flow")
CONFIG = RunConfig(batch_size=4, max_length=32, dtype="float64")

#: one metric at a rung (pinned) or as asked: ok, the rung recorded, the declaration true
run = partial(run_at_rung, config=CONFIG)



@pytest.fixture(scope="module")
def tasks():
    corpus = builtin_corpus()
    return {"a": corpus[:8], "b": corpus[8:20]}


@pytest.fixture(scope="module")
def split():
    corpus = builtin_corpus()
    return {"train": corpus[:6], "test": corpus[6:9]}


def test_ladders_offer_disk_when_it_fits_and_lossy_rungs_when_not(models, monkeypatch):
    """Disk holds the fewest bytes in RAM, so it is the whole ladder when the rows fit there."""
    shape = RunShape(batch_size=4, seq_len=32, n_batches=5, n_sequences=20, tasks=("a", "b"), seed=0)
    names = {}
    with model_view(load_hf(models["gpt2"])) as view:
        for room in (1 << 40, 0):
            monkeypatch.setattr(GradientStore, "disk_room", staticmethod(lambda room=room: room))
            names[room] = {cls.name: [r.name for r in cls.ladder(cls.Params(), view, shape)]
                           for cls in (SampleConflicts, TracInTerms, TaskConflict, GradientFlow)}
    assert names[1 << 40] == {CONFLICTS: ["disk"], TERMS: ["disk"], TASKS: ["disk"],
                              FLOW: ["float32", "project-4096", "project-1024"]}
    assert names[0] == {CONFLICTS: ["int8", "project-4096", "project-1024"], TERMS: ["project-4096", "project-1024"],
                        TASKS: [], FLOW: ["float32", "project-4096", "project-1024"]}


def test_sample_conflicts_on_disk_equal_in_memory(planted):
    p = planted["gpt2"]
    data = {"a": p.a, "b": p.b}
    res, _ = run(p.folder, data, CONFLICTS)
    disk_res, disk = run(p.folder, data, CONFLICTS, rung="disk")
    assert disk.params["backing"] == "disk"
    assert torch.equal(disk_res.tensor(CONFLICTS, "cosines"), res.tensor(CONFLICTS, "cosines"))
    assert disk_res.get(CONFLICTS).values["top_pairs"] == res.get(CONFLICTS).values["top_pairs"]


@pytest.mark.parametrize("rung", ["int8", "project-4096", "project-1024"])
def test_sample_conflicts_lossy_rungs_within_their_bounds(planted, no_disk_room, rung):
    """int8: each cosine within its bound e_i + e_j + e_i e_j; sketched: within 6 x sqrt(2/k)
    (cosines use the exact norms, so the error is the dot product's, in units of ||g|| ||h||)."""
    p = planted["gpt2"]
    data = {"a": p.a, "b": p.b}
    exact = run(p.folder, data, CONFLICTS)[0].tensor(CONFLICTS, "cosines")
    res, result = run(p.folder, data, CONFLICTS, rung=rung)
    got = res.tensor(CONFLICTS, "cosines")
    cross = torch.zeros_like(exact, dtype=torch.bool)
    cross[:12, 12:] = cross[12:, :12] = True
    if rung == "int8":
        e = torch.tensor(result.value("reconstruction_error"), dtype=torch.float64)
        bound = e[:, None] + e[None, :] + e[:, None] * e[None, :]
    else:
        k = int(rung.split("-")[1])
        assert result.value("projection_error_bound") == pytest.approx(math.sqrt(2 / k))
        assert 0 < result.value("projection_error") < 3 * math.sqrt(2 / k)
        bound = torch.full_like(exact, 6 * math.sqrt(2 / k))
    assert ((got - exact).abs() <= bound + 1e-12)[cross].all()


def test_tracin_terms_on_disk_equal_in_memory(models, split):
    _, exact = run(models["gpt2"], split, TERMS)
    _, disk = run(models["gpt2"], split, TERMS, rung="disk")
    assert disk.values["dots"] == exact.values["dots"]
    assert disk.value("train_self") == exact.value("train_self")


@pytest.mark.parametrize("k", [4096, 1024])
def test_tracin_terms_sketched_within_bound(models, split, no_disk_room, k):
    _, exact = run(models["gpt2"], split, TERMS)
    _, got = run(models["gpt2"], split, TERMS, rung=f"project-{k}")
    train, test = (torch.tensor(exact.value(f), dtype=torch.float64).sqrt() for f in ("train_self", "test_self"))
    scale = (train[:, None] * test[None, :]).flatten()
    want = torch.tensor([row[2] for row in exact.values["dots"].rows], dtype=torch.float64)
    sketched = torch.tensor([row[2] for row in got.values["dots"].rows], dtype=torch.float64)
    assert ((sketched - want).abs() <= 6 * math.sqrt(2 / k) * scale).all()
    # norms stay exact: the artifact sums them parameter by parameter before the division by the target count,
    # so they agree to float64 rounding
    assert got.value("train_self") == pytest.approx(exact.value("train_self"), rel=1e-12)


def test_task_conflict_on_disk_equals_in_memory(models, tasks):
    _, exact = run(models["llama"], tasks, TASKS)
    _, disk = run(models["llama"], tasks, TASKS, rung="disk")
    assert disk.values == exact.values


def _mean_squares(result) -> torch.Tensor:
    """||mean gradient||^2 per block, back from the reported SNR, norm means and variances
    (snr^2 = B m / tr S with tr S = (sum_b n_b^2 - B m) / (B - 1))."""
    B = result.values["total_grad_norm"].n
    snr, mean, var = (torch.tensor(result.value(f), dtype=torch.float64) for f in ("snr", "grad_norm_mean",
                                                                                   "grad_norm_var"))
    squares = (B - 1) * var + B * mean**2
    return snr**2 * squares / (B * (B - 1) + B * snr**2)


@pytest.mark.parametrize("rung", ["float32", "project-4096", "project-1024"])
def test_flow_rungs_within_their_accuracy(models, texts, rung):
    """float32 sums: the SNR within 1e-6 (relative); sketched sums: each block's ||mean gradient||^2
    within 6 x sqrt(2/k) of the exact one (relative); the per-batch norms stay exact."""
    _, exact = run(models["gpt2"], texts, FLOW)
    _, got = run(models["gpt2"], texts, FLOW, rung=rung)
    assert got.value("grad_norm_mean") == exact.value("grad_norm_mean")
    if rung == "float32":
        assert got.value("snr") == pytest.approx(exact.value("snr"), rel=1e-6)
        return
    k = int(rung.split("-")[1])
    want = _mean_squares(exact)
    assert ((_mean_squares(got) - want).abs() <= 6 * math.sqrt(2 / k) * want).all()


@pytest.mark.parametrize("metric", [CONFLICTS, TASKS, FLOW])
def test_a_tight_budget_picks_a_rung(models, tasks, metric):
    """A budget just under the asked plan's peak: the planner steps the metric down one rung
    (disk, or float32 for flow), the result records it, and its declared state is what it held."""
    config = CONFIG.model_copy(update={"memory_budget": "64GiB", "min_micro_batch": 4})
    (full,) = plan(models["gpt2"], tasks, [metric], config=config)
    budget = full.peak_bytes - full.declared_state[metric] // 4
    res = analyze(models["gpt2"], data=tasks, metrics=[metric],
                  config=config.model_copy(update={"memory_budget": budget}))
    result = res.get(metric)
    assert result.ok and result.rung is not None and result.rung.chosen_by == "budget"
    assert result.rung.name == ("float32" if metric == FLOW else "disk")
    check_declared_cost(result)
