"""Both metrics on the tiny GPT-2, LLaMA (grouped-query) and BERT with two named tasks: one shared
forward per batch, declared passes and costs, the round trip, the report section and the readings."""

from __future__ import annotations

import pytest
from structure_reference import gaussian_gpt2, modular_gpt2
from tensorscope_structure.modularity import StructureModularity
from tensorscope_structure.report import TITLE, structure_section
from tensorscope_structure.separability import StructureSeparability

from tensorscope_core import RunConfig, analyze, builtin_corpus
from tensorscope_core.testing import check_declared_cost, check_declared_passes, check_roundtrip

METRICS = ["structure.modularity", "structure.separability"]
PARAMS = {"structure.modularity": {"n_permutations": 4}, "structure.separability": {"n_permutations": 19}}
CONFIG = RunConfig(batch_size=4, max_length=12, seed=7)


@pytest.fixture(scope="module")
def data():
    texts = builtin_corpus()
    return {"story": texts[:10], "other": texts[20:29]}  # 3 + 3 batches of at most 4


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_one_forward_per_batch_for_both(family, models, data, tmp_path):
    res = analyze(models[family], data=data, metrics=METRICS, params=PARAMS, config=CONFIG)
    record = res.record.models[0]
    assert record.passes["forward"] == 6 and "backward" not in record.passes  # the shared forward only
    for name in METRICS:
        result = record.metrics[name]
        assert result.ok, result.reason
        assert result.passes_declared == {} and result.model_calls == 0
        check_declared_passes(result)
        check_declared_cost(result)
    n_layers = 2
    separability = res.get("structure.separability")
    assert len(separability.value("mmd2")) == n_layers + 1 and separability.values["mmd2"].axis == "resid"
    assert separability.values["tasks"].text == "story (10), other (9)"
    assert all(1 / 20 <= p <= 1 for p in separability.value("mmd_p_value"))
    modularity = res.get("structure.modularity")
    assert modularity.values["mlp_q"].axis == "block" and len(modularity.value("mlp_q")) == n_layers
    assert all(p in {k / 5 for k in range(1, 6)} for p in modularity.value("mlp_p_value"))
    assert "head_q" in modularity.values  # circuits is installed here: the head graph is read
    check_roundtrip(res, tmp_path / "out")
    html = structure_section(res)
    assert html is not None and html.count("<figure") == 3 and "head graph: circuits.qkov" in html


def test_report_section_left_out_without_results(models, data):
    assert TITLE == "Structure: modularity and separability"
    assert structure_section(analyze(models["gpt2"], data=data, metrics=["basic.loss"], config=CONFIG)) is None


def test_readings_name_the_modular_blocks_and_the_separating_entry():
    """Known answers: every block of the block-diagonal model beats all 19 shuffles (p = 0.05); two
    Gaussians 2 apart differ from resid entry 0 on."""
    modular = analyze(
        modular_gpt2(2),
        metrics=["structure.modularity"],
        config=CONFIG,
        params={"structure.modularity": {"n_permutations": 19, "heads": False}},
    )
    readings = StructureModularity.interpret(modular.get("structure.modularity"))
    assert [r.where for r in readings] == ["block 0", "block 1"]
    model, tasks = gaussian_gpt2(100, 4, 2.0)
    separated = analyze(
        model,
        data=tasks,
        metrics=["structure.separability"],
        params={"structure.separability": {"n_permutations": 49}},
        config=RunConfig(batch_size=100, max_length=4),
    )
    [reading] = StructureSeparability.interpret(separated.get("structure.separability"))
    assert reading.where == "resid 0" and "2 entries significant" in reading.text
