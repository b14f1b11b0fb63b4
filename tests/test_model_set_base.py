"""Model sets with a base model: ``analyze({...}, base=...)``, ``--base``, ``self.base_name``, ``self.data``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tensorscope_core import (
    Analyzer,
    ModelSetMetric,
    NoParams,
    RunConfig,
    ScalarValue,
    TextValue,
    analyze,
    plan,
)
from tensorscope_core.cli import main
from tensorscope_core.errors import UsageError
from tensorscope_core.testing import random_token_data, tiny_model


class SeesBase(ModelSetMetric):
    """Reports what the core told it: the base member and the members' order."""

    name = "testbase.sees"
    Params = NoParams
    requires_metrics = ("basic.weight_norms",)

    def compute_set(self, views, results):
        base_norm = results[self.base_name]["basic.weight_norms"].value("total_norm") if self.base_name else 0.0
        return {"base": TextValue(text=str(self.base_name)), "members": TextValue(text=",".join(views)),
                "base_norm": ScalarValue(value=base_norm), "has_data": ScalarValue(value=float(bool(self.data)))}


class NeedsBase(ModelSetMetric):
    name = "testbase.needs"
    Params = NoParams
    needs_base = True

    def compute_set(self, views, results):
        return {"n": ScalarValue(value=len(views))}


class TwoOnly(ModelSetMetric):
    name = "testbase.two_only"
    Params = NoParams

    @classmethod
    def set_skip_reason(cls, params, views, base_name):
        return None if len(views) == 2 else f"needs exactly two models, got {len(views)}"

    def compute_set(self, views, results):
        return {"n": ScalarValue(value=len(views))}


class ReadsData(ModelSetMetric):
    """Sums the token ids of each member's batches: the data reaches compute_set unchanged."""

    name = "testbase.reads_data"
    Params = NoParams

    @classmethod
    def uses_data(cls, params):
        return True

    def compute_set(self, views, results):
        out = {}
        for member, data in self.data.items():
            total = sum(int((b.input_ids * b.attention_mask).sum()) for b in data.batches())
            out[f"id_sum/{member}"] = ScalarValue(value=float(total))
        out["seed"] = ScalarValue(value=float(self.shape.seed))
        return out


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("base-set")
    return {name: tiny_model("gpt2", root / name, seed=seed, with_tokenizer=False, n_layers=1)
            for seed, name in enumerate(("base", "math", "code"))}


def test_the_base_runs_first_as_base_and_model_set_metrics_see_it(family, use_registry) -> None:
    use_registry(SeesBase)
    res = analyze({"math": family["math"], "code": family["code"]}, base=family["base"], metrics=["testbase.sees"])
    assert [m.name for m in res.record.models] == ["base", "math", "code"]
    assert all(res.get("basic.weight_norms", model=m).ok for m in ("base", "math", "code"))  # per-model on base too
    result = res.get("testbase.sees")
    assert result.value("base").text == "base"
    assert result.value("members").text == "base,math,code"
    assert result.value("base_norm") == res.get("basic.weight_norms", model="base").value("total_norm")
    assert result.value("has_data") == 0.0  # nothing asked for data: none prepared


def test_without_a_base_the_base_name_is_none(family, use_registry) -> None:
    use_registry(SeesBase)
    result = analyze({"math": family["math"], "code": family["code"]}, metrics=["testbase.sees"]).get("testbase.sees")
    assert result.value("base").text == "None"
    assert result.value("members").text == "math,code"


def test_a_member_named_base_is_refused(family, use_registry) -> None:
    use_registry(SeesBase)
    with pytest.raises(UsageError, match="named 'base'"):
        analyze({"base": family["math"]}, base=family["base"], metrics=["testbase.sees"])


def test_a_metric_that_needs_a_base_is_skipped_without_one(family, use_registry) -> None:
    use_registry(NeedsBase)
    result = analyze({"math": family["math"], "code": family["code"]}, metrics=["testbase.needs"]).get("testbase.needs")
    assert result.status == "skipped"
    assert "base=" in result.reason and "--base" in result.reason
    with_base = analyze({"math": family["math"]}, base=family["base"], metrics=["testbase.needs"])
    assert with_base.get("testbase.needs").value("n") == 2


def test_set_skip_reason_skips(family, use_registry) -> None:
    use_registry(TwoOnly)
    res = analyze({"math": family["math"], "code": family["code"]}, base=family["base"], metrics=["testbase.two_only"])
    result = res.get("testbase.two_only")
    assert result.status == "skipped" and result.reason == "needs exactly two models, got 3"


def test_uses_data_hands_every_members_batches_to_compute_set(family, use_registry) -> None:
    use_registry(ReadsData)
    ids = random_token_data(64, n=6, length=7, seed=3)
    res = analyze({"math": family["math"]}, base=family["base"], data=ids, metrics=["testbase.reads_data"],
                  config=RunConfig(batch_size=4, seed=11))
    result = res.get("testbase.reads_data")
    assert result.status == "ok", result.reason
    want = float(ids.sum())
    assert result.value("id_sum/base") == want and result.value("id_sum/math") == want
    assert result.value("seed") == 11


def test_plan_and_analyzer_take_the_base(family, use_registry) -> None:
    use_registry(SeesBase)
    plans = plan({"math": family["math"]}, base=family["base"], metrics=["testbase.sees"])
    assert [p.model for p in plans] == ["base", "math", "model set"]  # the model-set stage is planned too
    analyzer = Analyzer(["testbase.sees"])
    assert [p.model for p in analyzer.plan({"math": family["math"]}, base=family["base"])] == \
        ["base", "math", "model set"]
    result = analyzer.run({"math": family["math"]}, base=family["base"]).get("testbase.sees")
    assert result.value("base").text == "base"


def test_cli_base_option(family, use_registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    use_registry(SeesBase)
    out = tmp_path / "out"
    code = main(["analyze", f"math={family['math']}", f"code={family['code']}", "--base", str(family["base"]),
                 "--metrics", "testbase.sees", "--out", str(out), "--no-cache"])
    assert code == 0, capsys.readouterr()
    capsys.readouterr()
    record = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in record["models"]] == ["base", "math", "code"]
    assert record["model_set"]["testbase.sees"]["values"]["base"]["text"] == "base"
    code = main(["plan", f"math={family['math']}", "--base", str(family["base"]), "--metrics", "testbase.sees",
                 "--json"])
    assert code == 0
    assert [p["model"] for p in json.loads(capsys.readouterr().out)] == ["base", "math", "model set"]
