"""structure.modularity against known answers: k equal cliques / k disjoint MLP blocks give Q = 1 - 1/k,
Q agrees with Newman's formula, the +1-corrected p-value is uniform on a null, and the head part is
read from circuits.qkov or skipped with the fix."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from structure_reference import modular_gpt2, modular_llama, newman_q
from tensorscope_structure import graphs
from tensorscope_structure.communities import against_null
from tensorscope_structure.graphs import EdgeBlock, head_block, strongest

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugin_api import BadParameterError
from tensorscope_core.testing import check_declared_cost, check_declared_passes, temporary_plugin

METRIC = "structure.modularity"
CONFIG = RunConfig(batch_size=4, max_length=8, seed=3)
FEW = {"n_permutations": 9, "heads": False}


def cliques(k: int, size: int) -> EdgeBlock:
    """k disjoint cliques of ``size`` nodes, unit weights, as the upper triangle of an n x n matrix
    whose candidate positions are every pair i < j."""
    n = k * size
    upper = [i * n + j for i in range(n) for j in range(i + 1, n)]
    inside = [i * n + j for i, j in itertools.product(range(n), repeat=2) if i < j and i // size == j // size]
    return EdgeBlock(np.array(inside), np.ones(len(inside)), n, n, 0, 0, np.array(upper))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_k_equal_cliques_give_one_minus_one_over_k(k):
    """Closed form: k disjoint equal cliques, each a community, Q = k (1/k - 1/k^2) = 1 - 1/k."""
    m = against_null([cliques(k, 5)], resolution=1.0, n_permutations=19, seed=0, rng=np.random.default_rng(0))
    assert m.q == pytest.approx(1 - 1 / k, abs=1e-12)
    assert sorted(map(sorted, m.communities)) == [list(range(c * 5, c * 5 + 5)) for c in range(k)]
    assert m.p_value == pytest.approx(1 / 20)  # no shuffled graph is as modular
    assert m.null_mean < m.q and m.z > 3


def test_q_matches_newman_formula_on_a_random_graph():
    """Independent reference: Q of the returned partition from the formula with numpy, at two resolutions."""
    rng = np.random.default_rng(5)
    weights = np.abs(rng.normal(size=(12, 20)))
    block = EdgeBlock(np.arange(240), weights.reshape(-1), 12, 20, 0, 12)
    adjacency = np.zeros((32, 32))
    adjacency[:12, 12:] = weights
    adjacency += adjacency.T
    for gamma in (1.0, 1.7):
        m = against_null([block], resolution=gamma, n_permutations=3, seed=1, rng=np.random.default_rng(1))
        assert m.q == pytest.approx(newman_q(adjacency, m.communities, gamma), abs=1e-12)
        assert m.n_edges == 240


def test_p_value_is_uniform_on_a_null():
    """iid weights are exchangeable with their shuffles: P(p <= a) <= a, p >= 1/(P+1), E[p] = (P+2) / 2(P+1)."""
    p_values = []
    for rep in range(60):
        rng = np.random.default_rng(100 + rep)
        block = EdgeBlock(np.arange(48), np.abs(rng.normal(size=48)), 6, 8, 0, 6)
        p_values.append(against_null([block], 1.0, 9, seed=rep, rng=rng).p_value)
    p = np.array(p_values)
    assert p.min() >= 0.1 - 1e-12 and p.max() <= 1.0
    assert np.mean(p <= 0.2) <= 0.2 + 3 * np.sqrt(0.2 * 0.8 / 60)
    assert p.mean() == pytest.approx(0.55, abs=3 * 0.29 / np.sqrt(60))


def test_shuffle_keeps_the_weights_on_distinct_candidates():
    block = head_block(torch.rand(3, 2, 3, 2))
    layer = lambda node: node // 2  # noqa: E731
    for seed in range(5):
        drawn = block.shuffled(np.random.default_rng(seed))
        assert sorted(drawn.weights) == sorted(block.weights)
        assert len(set(drawn.positions.tolist())) == len(drawn.positions)
        rows, cols = np.divmod(drawn.positions, 6)
        assert all(layer(r) < layer(c) for r, c in zip(rows, cols, strict=True))  # cross-layer pairs only


def test_strongest_equals_a_full_sort_whatever_the_chunks(monkeypatch):
    """Independent reference: the top entries by numpy's argsort of the whole matrix (ties avoided)."""
    w = torch.rand(37, 11)
    order = np.argsort(-w.numpy().reshape(-1), kind="stable")
    for chunk in (11, 50, 1 << 22):  # one row per chunk, a few rows, the whole matrix
        monkeypatch.setattr(graphs, "CHUNK_ENTRIES", chunk)
        positions, values = strongest(lambda a, b: w[a:b], 37, 11, 25)
        np.testing.assert_array_equal(positions, np.sort(order[:25]))
        np.testing.assert_allclose(values, w.numpy().reshape(-1)[positions].astype(np.float64))
    monkeypatch.setattr(graphs, "CHUNK_ENTRIES", 1 << 22)
    assert len(strongest(lambda a, b: torch.zeros(b - a, 4), 3, 4, None)[0]) == 0  # zeros are no edges


@pytest.mark.parametrize("k", [2, 4])
def test_block_diagonal_gpt2_mlps(k):
    """Hand-built model: each MLP's input dims, hidden units and output dims in k groups wired only
    within the group (Conv1D weights, |W_out| from negative weights) -> Q = 1 - 1/k, k communities, and
    no shuffle reaches it: p = 1 / (P + 1)."""
    res = analyze(modular_gpt2(k), metrics=[METRIC], params={METRIC: FEW}, config=CONFIG)
    result = res.get(METRIC)
    assert result.ok, result.reason
    assert result.value("mlp_q") == pytest.approx([1 - 1 / k] * 2, abs=1e-9)
    assert result.value("mlp_communities") == [k, k]
    assert result.value("mlp_p_value") == pytest.approx([0.1, 0.1])
    assert result.value("mlp_edges") == [2 * 32 * 128 / k] * 2
    assert result.values["head_graph"].text == "not asked (heads=False)"
    check_declared_cost(result)
    check_declared_passes(result)


def test_gated_llama_mlp_sums_gate_and_up():
    """Gated MLP: |W_gate| + |W_up| between input and hidden units; two equal blocks -> Q = 1/2."""
    res = analyze(modular_llama(2), metrics=[METRIC], params={METRIC: FEW}, config=CONFIG)
    assert res.get(METRIC).value("mlp_q") == pytest.approx([0.5, 0.5], abs=1e-9)


def test_a_zero_mlp_has_no_graph_and_says_so():
    """All-zero weights give no edge: that block's values are NaN with the reason, the others as usual."""
    model = modular_gpt2(2)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.zero_()
        model.transformer.h[0].mlp.c_proj.weight.zero_()
    result = analyze(model, metrics=[METRIC], params={METRIC: FEW}, config=CONFIG).get(METRIC)
    assert result.ok and math.isnan(result.value("mlp_q")[0]) and result.value("mlp_q")[1] == pytest.approx(0.5)
    assert result.value("mlp_edges") == [0, 4096]
    assert "block 0: the graph has no edge" in result.values["mlp_graph"].text


def test_max_edges_keeps_the_strong_blocks():
    """Weak uniform noise off the blocks makes a dense graph; keeping exactly the block entries (the
    strongest) recovers Q = 1 - 1/k, and every entry kept gives a lower Q."""
    model = modular_gpt2(4, noise=0.01)
    kept = 32 * 128 // 4
    params = {METRIC: {**FEW, "max_edges": kept}}
    sparse = analyze(model, metrics=[METRIC], params=params, config=CONFIG).get(METRIC)
    assert sparse.value("mlp_q") == pytest.approx([0.75, 0.75], abs=1e-9)
    assert f"the strongest {kept} of 4096 entries" in sparse.values["mlp_graph"].text
    dense = analyze(model, metrics=[METRIC], params={METRIC: {**FEW, "max_edges": None}}, config=CONFIG).get(METRIC)
    assert dense.value("mlp_edges") == [2 * 4096] * 2
    assert all(q < 0.75 for q in dense.value("mlp_q"))


def test_head_graph_from_two_disjoint_groups():
    """Composition scores linking heads {0, 1} of layer 0 only to {0, 1} of layer 1 and {2, 3} only to
    {2, 3}: two equal components, Q = 0.5."""
    composition = torch.zeros(2, 4, 2, 4)
    for group in ((0, 1), (2, 3)):
        for a, b in itertools.product(group, repeat=2):
            composition[0, a, 1, b] = 0.3
    m = against_null([head_block(composition)], 1.0, 9, seed=0, rng=np.random.default_rng(0))
    assert m.q == pytest.approx(0.5, abs=1e-12)
    assert sorted(map(sorted, m.communities)) == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_head_graph_reads_circuits_qkov(models):
    """Independent reference: the composition-score graph built here from circuits.qkov's tensors,
    and Newman's formula on the head communities the metric reports."""
    params = {METRIC: {"n_permutations": 5, "composition": ["q", "v"]}}
    res = analyze(models["gpt2"], metrics=[METRIC], params=params, config=CONFIG)
    result = res.get(METRIC)
    assert result.ok and "circuits.qkov" in result.values["head_graph"].text
    scores = res.tensor("circuits.qkov", "composition_q").double() + res.tensor("circuits.qkov", "composition_v")
    n = 2 * 4
    adjacency = scores.reshape(n, n).numpy()
    adjacency = adjacency + adjacency.T
    labels = np.array(result.value("head_community")).reshape(-1)
    groups = [np.flatnonzero(labels == c).tolist() for c in range(int(labels.max()) + 1)]
    assert result.value("head_q") == pytest.approx(newman_q(adjacency, groups), abs=1e-9)
    assert result.value("head_communities") == len(groups)
    check_declared_passes(result)


def test_head_graph_skipped_with_the_fix_without_circuits(models, monkeypatch):
    """Only this plugin loaded (TENSORSCOPE_LOAD_PLUGINS=structure): the MLP part runs and the head
    part says how to get it."""
    monkeypatch.setenv("TENSORSCOPE_LOAD_PLUGINS", "structure")
    with temporary_plugin("nothing-else", only_installed=["structure"]) as registry:
        assert "circuits.qkov" not in registry.metrics
        res = analyze(
            models["llama"], metrics=[METRIC], params={METRIC: {"n_permutations": 2}}, config=CONFIG, registry=registry
        )
    result = res.get(METRIC)
    assert result.ok and "head_q" not in result.values and len(result.value("mlp_q")) == 2
    text = result.values["head_graph"].text
    assert text.startswith("skipped") and "pip install tensorscope-circuits" in text


@pytest.mark.parametrize(
    "bad", [{"n_permutations": 0}, {"resolution": 0.0}, {"max_edges": 0}, {"composition": []}, {"composition": ["x"]}]
)
def test_bad_parameters_are_refused(bad, models):
    with pytest.raises(BadParameterError):
        analyze(models["gpt2"], metrics=[METRIC], params={METRIC: bad}, config=CONFIG)
