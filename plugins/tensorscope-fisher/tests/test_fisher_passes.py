"""The whole-model passes the plugin's metrics and artifacts declare equal the calls the run counts,
in configurations other than the pinned run's: batches of 3 over tasks of 5 sequences (a short last
batch per task), other parameters."""

from __future__ import annotations

import pytest

from tensorscope_core import RunConfig, analyze, builtin_corpus
from tensorscope_core.testing import check_declared_passes, random_token_data

CONFIG = RunConfig(batch_size=3, max_length=12, max_batches=2)  # batches of 3, 2, 3, 2 rows


@pytest.fixture(scope="module")
def tasks() -> dict[str, list[str]]:
    """Two tasks of 5 texts of different lengths (every batch is padded)."""
    corpus = builtin_corpus()
    return {"a": corpus[:5], "b": corpus[5:10]}


def _result(folder, data, metric: str, params: dict, config: RunConfig = CONFIG):
    res = analyze(folder, data=data, metrics=[metric], params={metric: params}, config=config)
    result = res.get(metric)
    assert result.ok, result.reason
    return res, result


@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize(("metric", "params", "kept"), [
    ("fisher.lanczos", {"k": 1, "max_iter": 3, "max_examples": 5, "products": "recomputed"}, 2),  # 3 + 2 rows
    ("hessian.lanczos", {"k": 2, "max_iter": 3, "max_examples": 4, "products": "recomputed"}, 2),  # 3 + 1
    ("fisher.lanczos", {"k": 1, "max_iter": 2, "max_examples": None, "products": "recomputed"}, 4),  # every batch
])
def test_lanczos_declares_its_products(models, tasks, family, metric, params, kept):
    _, result = _result(models[family], tasks, metric, params)
    check_declared_passes(result)
    per_product = 2 if metric == "fisher.lanczos" else 1
    assert result.passes_declared == {"replay_backward": per_product * params["max_iter"] * kept}
    assert result.value("iterations") == params["max_iter"]
    assert result.value("n_examples") == (params["max_examples"] or 10)


@pytest.mark.parametrize(("products", "per_batch"), [("recomputed", 2), ("kept-graph", 1)])
def test_lanczos_declares_on_llama(models, tasks, products, per_batch):
    """Recomputed: a call per product and kept batch; kept graphs: one call per kept batch builds its
    graph, and the products are backwards through it."""
    _, result = _result(models["llama"], tasks, "hessian.lanczos",
                        {"k": 1, "max_iter": 2, "max_examples": 7, "products": products})
    check_declared_passes(result)
    assert result.passes_declared == {"replay_backward": per_batch * 3}  # batches of 3, 2, 3 (2 rows) kept


@pytest.mark.parametrize(("metric", "max_examples", "kept"), [("hessian.lanczos", 4, 2), ("fisher.lanczos", None, 4)])
def test_kept_graphs_declare_one_call_per_kept_batch(models, tasks, metric, max_examples, kept):
    """The default products: one call per kept batch builds its graphs; the products call the model no more."""
    _, result = _result(models["gpt2"], tasks, metric, {"k": 2, "max_iter": 3, "max_examples": max_examples})
    check_declared_passes(result)
    assert result.passes_declared == {"replay_backward": kept}  # 3 + 1 rows, or every batch
    assert result.value("iterations") == 3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("params", [
    {"layers": [1, 2], "positions": [-1, -2]},  # exact, residual n_layers too
    {"method": "topk", "topk": 5, "layers": [0]},
    {"method": "sampled", "draws": 3, "num_samples": 2, "layers": [1]},
    {"method": "eig", "rank": 2, "max_iter": 3, "layers": [0, 2]},
])
def test_stein_declares_its_sites(models, tasks, family, params):
    _, result = _result(models[family], tasks, "fisher.stein", params)
    check_declared_passes(result)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_stein_all_positions_on_unpadded_data(models, family):
    """positions='all': the sites are every real token, exact when no sequence is padded."""
    data = {"a": random_token_data(64, n=5, length=4, seed=1), "b": random_token_data(64, n=4, length=4, seed=2)}
    _, result = _result(models[family], data, "fisher.stein", {"positions": "all", "layers": [1]})
    check_declared_passes(result)
    assert result.passes_declared == {"replay_forward": 9 + 9 * 4, "replay_backward": 9 * 4}


def _artifact_calls(res, artifact: str, kind: str) -> tuple[int, int]:
    """(declared, counted) calls of the artifact on the run's only model."""
    model = res.record.models[0]
    return model.passes.get(kind, 0), model.model_calls.get(f"artifact:{artifact}", 0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_kfac_stats_declares_one_backward_per_micro_batch(models, tasks, family):
    res, _ = _result(models[family], tasks, "fisher.kfac", {"labels": "observed"})
    assert _artifact_calls(res, "fisher.kfac_stats", "replay_backward") == (4, 4)
    res, _ = _result(models[family], tasks, "fisher.kfac", {}, RunConfig(batch_size=4, max_length=12, max_batches=1))
    assert _artifact_calls(res, "fisher.kfac_stats", "sampled_backward") == (2, 2)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_per_example_grads_declares_its_calls(models, tasks, family):
    """The core's per_example_grads, as the Fisher metrics ask it: one vmapped call per micro-batch;
    a masked-LM encoder loops, one call per sequence (10)."""
    res, _ = _result(models[family], tasks, "fisher.diagonal", {})
    declared, counted = _artifact_calls(res, "per_example_grads", "per_example_backward")
    assert (declared, counted) == ((10, 10) if family == "bert" else (4, 4))
