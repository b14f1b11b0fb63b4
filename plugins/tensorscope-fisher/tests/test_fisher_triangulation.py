"""fisher.triangulation against a dense float64 Fisher of a model small enough to build it (1912 parameters):
the empirical trace exactly, the true trace within the diagonal's interval, K-FAC's trace = Σ tr A tr G,
Lanczos' top eigenvalue to 1e-6 of dense eigh; the verdicts; missing estimators; 1 and 2 tasks."""

from __future__ import annotations

import pytest
import torch
from fisher_triangulation_reference import dense_fishers
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import check_declared_cost, check_declared_passes, random_token_data, tiny_model

PARAMS = {"fisher.lanczos": {"k": 3, "max_iter": 300, "tol": 1e-10}, "hessian.lanczos": {"k": 2, "max_iter": 40}}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 1-layer GPT-2 of width 8 (1912 parameters), its data, the run and the dense Fishers."""
    folder = tiny_model(
        "gpt2", tmp_path_factory.mktemp("small") / "gpt2", with_tokenizer=False, n_layers=1, d_model=8, n_heads=2
    )
    rows = random_token_data(64, n=4, length=6, seed=0)
    res = analyze(
        folder,
        data=rows,
        metrics=["fisher.triangulation"],
        params=PARAMS,
        config=RunConfig(batch_size=4, max_length=8, dtype="float64"),
    )
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float64)
    ggn, emp = dense_fishers(model, rows)
    return res, ggn, emp


def rows_of(result, table="estimates"):
    value = result.values[table]
    return {r[0]: dict(zip(value.columns, r, strict=True)) for r in value.rows}


def test_each_estimator_against_the_dense_fisher(small):
    res, ggn, emp = small
    result = res.get("fisher.triangulation")
    assert result.ok, result.reason
    rows = rows_of(result)
    exact_trace, exact_top = float(ggn.trace()), float(torch.linalg.eigvalsh(ggn)[-1])
    # empirical Fisher: the diagonal's trace is exact
    assert rows["fisher.diagonal (empirical)"]["trace"] == pytest.approx(float(emp.trace()), rel=1e-6)
    assert rows["fisher.diagonal (empirical)"]["top1"] == pytest.approx(float(emp.diagonal().max()), rel=1e-6)
    # true Fisher: the sampled trace's interval holds the exact trace; the largest diagonal entry is a lower bound
    trace = res.get("fisher.diagonal").values["true_trace"]
    assert trace.ci_low <= exact_trace <= trace.ci_high
    assert rows["fisher.diagonal (true)"]["trace"] == trace.value
    # Lanczos: the top eigenvalues of the GGN to 1e-6 of dense eigh
    top3 = torch.linalg.eigvalsh(ggn).flip(0)[:3]
    assert rows["fisher.lanczos"]["top1"] == pytest.approx(exact_top, rel=1e-6)
    assert result.value("topk/fisher.lanczos") == pytest.approx(top3.tolist(), rel=1e-6)
    # K-FAC: Σ tr A tr G over the modules, per position, times positions per sequence (4 x 5 positions / 4)
    kfac = res.get("fisher.kfac")
    names = [r[0] for r in kfac.values["capacity"].rows]
    total = sum(
        float(res.tensor("fisher.kfac", f"A/{n}").trace() * res.tensor("fisher.kfac", f"G/{n}").trace()) for n in names
    )
    assert rows["fisher.kfac"]["trace"] == pytest.approx(total * 20 / 4, rel=1e-12)
    # grouped regroups the diagonal: the same trace
    assert rows["fisher.grouped (true)"]["trace"] == pytest.approx(trace.value, rel=1e-9)
    # spectrum: exact on the same 4 sequences; its block eigenvalues are lower bounds of its full matrix's
    assert rows["fisher.spectrum"]["top1_kind"] == "lower bound"
    assert rows["fisher.spectrum"]["top1"] <= trace.value


def test_verdicts(small):
    res, _, _ = small
    result = res.get("fisher.triangulation")
    pairs = {(q, a, b): (ratio, verdict) for q, a, b, ratio, verdict in result.values["pairs"].rows}
    assert pairs[("trace", "fisher.diagonal (true)", "fisher.grouped (true)")][1] == "agree"
    ratio, verdict = pairs[("top1", "fisher.diagonal (true)", "fisher.lanczos")]
    assert verdict == "consistent" and ratio < 1  # the largest diagonal entry is below λ_max
    assert pairs[("top1", "fisher.lanczos", "hessian.lanczos")][1] == "not comparable: true Fisher vs Hessian"
    assert pairs[("trace", "fisher.diagonal (true)", "fisher.diagonal (empirical)")][1].startswith("not comparable")
    assert result.values["missing"].rows == []
    assert result.derived_from == [
        "fisher.diagonal",
        "fisher.grouped",
        "fisher.kfac",
        "fisher.lanczos",
        "hessian.lanczos",
        "fisher.spectrum",
    ]
    check_declared_cost(result)
    check_declared_passes(result)
    assert result.passes_declared == {}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_tiny_models_with_one_and_two_tasks(models, family):
    """Cheap estimators only; the others listed as missing; one task and two tasks (the multitask demo)."""
    data = random_token_data(300, n=6, length=8, seed=1)
    params = {
        "fisher.triangulation": {"estimators": ["fisher.diagonal", "fisher.kfac", "fisher.lanczos"]},
        "fisher.lanczos": {"k": 2, "max_iter": 8},
    }
    for run_data in (data, {"a": data[:3], "b": data[3:]}):
        res = analyze(
            models[family],
            data=run_data,
            metrics=["fisher.triangulation"],
            params=params,
            config=RunConfig(batch_size=3, max_length=12),
        )
        result = res.get("fisher.triangulation")
        assert result.ok, result.reason
        assert {r[0] for r in result.values["missing"].rows} == {"fisher.grouped", "hessian.lanczos", "fisher.spectrum"}
        rows = rows_of(result)
        assert rows["fisher.lanczos"]["trace"] is None  # Lanczos gives no trace: null, never 0
        assert rows["fisher.diagonal (true)"]["n_examples"] == 6


def test_report_section_lists_every_row_and_verdict(small):
    pytest.importorskip("markupsafe")
    from tensorscope_fisher.triangulation_report import triangulation_section

    res, _, _ = small
    html = triangulation_section(res)
    result = res.get("fisher.triangulation")
    for row in result.values["estimates"].rows:
        assert f"<td>{row[0]}</td>" in html
    assert html.count("<tr>") == 2 + len(result.values["estimates"].rows) + len(result.values["pairs"].rows)
