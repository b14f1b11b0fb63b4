"""merging.mode_connectivity: zero barrier between identical models, and a hand-permuted copy realigned."""

from __future__ import annotations

import pytest
import torch
from merging_models_reference import load, permuted_mlp_copy, registry
from tensorscope_merging.mode_connectivity import barrier, bezier_point

from tensorscope_core import RunConfig, analyze, plan
from tensorscope_core.testing import check_declared_cost, random_token_data, tiny_model

METRIC = "merging.mode_connectivity"
CONFIG = RunConfig(batch_size=4, seed=3)


def _run(models: dict, params: dict, **kw):
    return _run_with_tensors(models, params, **kw)[0]


def _run_with_tensors(models: dict, params: dict, config: RunConfig = CONFIG, **kw):
    with registry("merging"):
        res = analyze(models, data=random_token_data(340, n=8, length=12, seed=1), metrics=[METRIC],
                      params={METRIC: params}, config=config, **kw)
    out = res.get(METRIC)
    assert out.status == "ok", out.reason
    return out, res.tensors


def test_barrier_closed_form() -> None:
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert barrier([1.0, 1.5, 2.5, 2.5, 3.0], ts) == pytest.approx(0.5)  # 2.5 at t=0.5 over the line's 2.0
    assert barrier([2.0, 1.0, 0.5, 1.0, 2.0], ts) == 0.0  # below the line: the endpoints set the max


def test_bezier_ends_at_the_endpoints_and_passes_near_the_middle() -> None:
    a, m, b = {"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])}
    assert bezier_point(a, m, b, 0.0)["w"].item() == 0.0 and bezier_point(a, m, b, 1.0)["w"].item() == 4.0
    assert bezier_point(a, m, b, 0.5)["w"].item() == pytest.approx(0.25 * 0 + 0.5 * 1 + 0.25 * 4)


def test_identical_endpoints_have_zero_barrier(models, tmp_path) -> None:
    twin = tiny_model("gpt2", tmp_path / "twin", seed=0)  # the same seed: the same weights as models["gpt2"]
    out = _run({"a": models["gpt2"], "b": twin}, {"n_points": 5, "bezier_steps": 0})
    losses = out.value("loss_linear")
    assert max(losses) - min(losses) == 0.0
    assert out.value("barrier_linear") == 0.0 and out.value("barrier_bezier") == 0.0
    assert out.value("t") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert out.value("endpoints").text == "a -> b"


def test_fitted_bezier_is_seeded_and_keeps_the_endpoints(models, tmp_path) -> None:
    other = tiny_model("gpt2", tmp_path / "other", seed=4)
    params = {"n_points": 3, "bezier_steps": 6, "bezier_lr": 1e-2}
    first = _run({"a": models["gpt2"], "b": other}, params)
    again = _run({"a": models["gpt2"], "b": other}, params)
    assert first.value("bezier_fit_loss") == again.value("bezier_fit_loss")  # the run's seed fixes t and batches
    assert len(first.value("bezier_fit_loss")) == 6
    assert first.value("loss_bezier")[0] == pytest.approx(first.value("loss_linear")[0], rel=1e-6)
    assert first.value("loss_bezier")[-1] == pytest.approx(first.value("loss_linear")[-1], rel=1e-6)
    assert first.value("barrier_linear") >= 0.0 and first.value("barrier_bezier") >= 0.0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_float64_path_ends_are_basic_loss(models, tmp_path, family) -> None:
    """In a float64 run the path's losses are float64 cross-entropy: its ends (t = 0, 1: the members' own
    weights) are ``basic.loss`` of each member to rounding (the float32 cross-entropy was ~2e-7 off)."""
    other = tiny_model(family, tmp_path / "other", seed=4)
    with registry("merging,basic"):
        res = analyze({"a": models[family], "b": other}, data=random_token_data(340, n=8, length=12, seed=1),
                      metrics=[METRIC, "basic.loss"], params={METRIC: {"n_points": 3, "bezier": False}},
                      config=RunConfig(batch_size=4, seed=3, dtype="float64"))
    out = res.get(METRIC)
    assert out.status == "ok", out.reason
    ends = out.value("loss_linear")
    assert ends[0] == pytest.approx(res.get("basic.loss", model="a").value("loss"), rel=1e-12, abs=0)
    assert ends[-1] == pytest.approx(res.get("basic.loss", model="b").value("loss"), rel=1e-12, abs=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_alignment_recovers_a_hand_permutation_and_removes_the_barrier(models, tmp_path, family) -> None:
    base = models[family]
    d_mlp = 128 if family == "gpt2" else 64
    gen = torch.Generator().manual_seed(11)
    perms = [torch.randperm(d_mlp, generator=gen) for _ in range(2)]
    copy = permuted_mlp_copy(base, tmp_path / "perm", perms)
    out, tensors = _run_with_tensors({"a": base, "b": copy}, {"n_points": 5, "align": True, "bezier": False})
    assert out.values["permutation"].shape == [2, d_mlp]
    table = tensors[out.values["permutation"].key]
    for layer, perm in enumerate(perms):  # copy unit j is base unit perm[j]: base unit i sits at argsort(perm)[i]
        assert torch.equal(table[layer], torch.argsort(perm))
    assert out.value("units_moved") == pytest.approx(float(sum((p != torch.arange(d_mlp)).sum() for p in perms))
                                                     / (2 * d_mlp))
    ends = out.value("loss_linear")
    assert ends[0] == pytest.approx(ends[-1], rel=1e-5)  # the copy computes the same function
    assert out.value("barrier_linear_aligned") == pytest.approx(0.0, abs=1e-6)
    assert max(out.value("loss_linear_aligned")) - min(out.value("loss_linear_aligned")) < 1e-5
    unaligned = out.value("loss_linear")  # unaligned, the inner points mix unrelated units: another function
    assert max(abs(v - ends[0]) for v in unaligned) > 1e-4


@pytest.mark.parametrize("params", [{"n_points": 3, "align": True, "bezier_steps": 2},
                                    {"n_points": 3, "bezier_steps": 0},
                                    {"n_points": 2, "align": True, "bezier": False}],
                         ids=["align+fit", "unfitted-bezier", "align-linear"])
def test_declared_state(models, tmp_path, params) -> None:
    """In the parameters' dtype: a path point; with the Bezier fit its middle point, gradient and two Adam
    moments (only the middle point without steps); with ``align`` the permuted MLP weights."""
    gen = torch.Generator().manual_seed(2)
    copy = permuted_mlp_copy(models["gpt2"], tmp_path / "perm", [torch.randperm(128, generator=gen) for _ in range(2)])
    out = _run({"a": models["gpt2"], "b": copy}, params)
    model = load(models["gpt2"])
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    mlp = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".mlp.c_fc." in n
              or n.endswith("mlp.c_proj.weight"))
    copies = 1 + (0 if params.get("bezier") is False else 4 if params["bezier_steps"] else 1)
    assert out.declared_bytes == copies * param_bytes + (mlp if params.get("align") else 0)
    assert out.measured_bytes == out.declared_bytes
    check_declared_cost(out)


def test_endpoints_must_be_chosen_among_three_models(models, tmp_path) -> None:
    b, c = tiny_model("gpt2", tmp_path / "b", seed=1), tiny_model("gpt2", tmp_path / "c", seed=2)
    with registry("merging"):
        res = analyze({"a": models["gpt2"], "b": b, "c": c}, data=random_token_data(340, n=4, length=8),
                      metrics=[METRIC], config=CONFIG)
    out = res.get(METRIC)
    assert out.status == "skipped" and "endpoints" in out.reason
    chosen = _run({"a": models["gpt2"], "b": b, "c": c}, {"endpoints": ["c", "a"], "n_points": 2, "bezier": False})
    assert chosen.value("endpoints").text == "c -> a"
    with_base = _run({"b": b, "c": c}, {"n_points": 2, "bezier": False}, base=models["gpt2"])
    assert with_base.value("endpoints").text == "b -> c"  # a base and two fine-tunes: the fine-tunes


def test_alignment_of_a_bert_mlp_is_skipped_with_the_reason(models) -> None:
    with registry("merging"):
        res = analyze({"a": models["bert"], "b": models["bert"]}, data=random_token_data(300, n=4, length=8),
                      metrics=[METRIC], params={METRIC: {"align": True}}, config=CONFIG)
    out = res.get(METRIC)
    assert out.status == "skipped" and "align=True" in out.reason and "GPT-2, LLaMA and NeoX" in out.reason


def test_parameters_are_checked() -> None:
    from tensorscope_core.plugin_api import BadParameterError

    with registry("merging"), pytest.raises(BadParameterError, match="endpoints"):
        analyze([], metrics=[METRIC], params={METRIC: {"endpoints": ["only-one"]}})


def test_a_tight_budget_steps_down_to_the_linear_path(models, tmp_path) -> None:
    """The Bezier fit's four model copies do not fit: the planner takes ``linear`` (one path point
    held), whose values are exactly those of ``bezier=False``; pinning ``linear_unaligned`` drops the
    alignment too."""
    other = tiny_model("gpt2", tmp_path / "other", seed=4)
    pair = {"a": models["gpt2"], "b": other}
    params = {"n_points": 3, "bezier_steps": 2, "align": True}
    data = random_token_data(340, n=8, length=12, seed=1)
    with registry("merging"):
        roomy = plan(pair, data=data, metrics=[METRIC], params={METRIC: params},
                     config=RunConfig(batch_size=4, seed=3, memory_budget="64GiB"))[-1]
    param_bytes = sum(p.numel() * p.element_size() for p in load(models["gpt2"]).parameters())
    budget = roomy.peak_bytes - 2 * param_bytes
    out = _run(pair, params, config=RunConfig(batch_size=4, seed=3, memory_budget=budget))
    plain = _run(pair, {**params, "bezier": False})
    assert out.rung is not None and (out.rung.name, out.rung.chosen_by) == ("linear", "budget")
    assert "loss_bezier" not in out.values and out.value("loss_linear") == plain.value("loss_linear")
    assert out.value("loss_linear_aligned") == plain.value("loss_linear_aligned")
    check_declared_cost(out)
    pinned = _run(pair, params, config=RunConfig(batch_size=4, seed=3, rungs={METRIC: "linear_unaligned"}))
    assert pinned.rung is not None and pinned.rung.chosen_by == "pinned"
    assert pinned.value("loss_linear") == plain.value("loss_linear") and "permutation" not in pinned.values
    assert pinned.declared_bytes == param_bytes
    check_declared_cost(pinned)
