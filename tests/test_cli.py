"""The `tensorscope` command: every subcommand, --json output and the exit codes 0/1/2/3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tensorscope_core.cli import main
from tensorscope_core.testing import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model("gpt2", tmp_path_factory.mktemp("cli") / "gpt2")


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli-data") / "ids.safetensors"
    save_file({"input_ids": torch.randint(4, 300, (8, 12), generator=torch.Generator().manual_seed(0))}, str(path))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_on_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("analyze", "plan", "plugins", "metrics", "explain", "demo", "cache", "report", "fim", "export",
                    "new-plugin"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: tensorscope " + command in capsys.readouterr().out


def test_analyze_writes_results_and_json_summary(capsys, model_dir: Path, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "analyze", str(model_dir), "--metrics", "basic.loss,basic.weight_norms",
                       "--out", str(tmp_path / "out"), "--batch-size", "4", "--json")
    assert code == 0
    summary = json.loads(out)
    assert {(r["metric"], r["status"]) for r in summary["results"]} == {("basic.loss", "ok"),
                                                                         ("basic.weight_norms", "ok")}
    assert (tmp_path / "out" / "results.json").exists() and (tmp_path / "out" / "results.csv").exists()
    header = (tmp_path / "out" / "results.csv").read_text().splitlines()[0]
    assert header == "run,layer,head,metric,field,index,value,ci_low,ci_high"


def test_unknown_metric_is_a_usage_error_with_suggestion(capsys, model_dir: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, "analyze", str(model_dir), "--metrics", "basic.los", "--out", str(tmp_path / "o"))
    assert code == 2
    assert "unknown metric 'basic.los'" in err and "'basic.loss'" in err
    assert not (tmp_path / "o").exists()


def test_bad_parameter_is_a_usage_error(capsys, model_dir: Path, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "analyze", str(model_dir), "--metrics", "basic.activation_stats", "--param",
                       "basic.activation_stats.dead_treshold=0.1", "--out", str(tmp_path / "o"), "--json")
    assert code == 2
    error = json.loads(out)
    assert error["error"] == "BadParameterError" and "dead_threshold" in error["problem"]


def test_plan_over_budget_exits_3_and_writes_nothing(capsys, model_dir: Path, ids_file: Path,
                                                     tmp_path: Path) -> None:
    code, out, _ = run(capsys, "plan", str(model_dir), "--metrics", "all", "--data", str(ids_file),
                       "--memory-budget", "10KiB", "--json")
    assert code == 3
    plans = json.loads(out)
    assert plans[0]["fits"] is False and plans[0]["micro_batch"] == 1
    code, _, err = run(capsys, "analyze", str(model_dir), "--metrics", "all", "--data", str(ids_file),
                       "--memory-budget", "10KiB", "--out", str(tmp_path / "o"))
    assert code == 3 and "DOES NOT FIT" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.usefixtures("basic_only")  # the four basic metrics: one weights pass and one forward+backward
def test_plan_shows_one_shared_pass(capsys, model_dir: Path, ids_file: Path) -> None:
    code, out, _ = run(capsys, "plan", str(model_dir), "--metrics", "all", "--data", str(ids_file), "--json")
    assert code == 0
    kinds = [p["kind"] for p in json.loads(out)[0]["passes"]]
    assert kinds == ["weights", "forward+backward"]


def test_plugins_metrics_explain(capsys) -> None:
    code, out, _ = run(capsys, "plugins", "--json")
    assert code == 0 and any(p["name"] == "tensorscope-basic" and p["status"] == "ok" for p in json.loads(out))
    code, out, _ = run(capsys, "metrics", "--json")
    assert {"basic.loss", "basic.grad_norms"} <= {e["name"] for e in json.loads(out)}
    code, out, _ = run(capsys, "explain", "basic.activation_stats")
    assert code == 0 and "dead_threshold" in out and "resid" in out
    code, _, err = run(capsys, "explain", "basic.activation_stat")
    assert code == 2 and "basic.activation_stats" in err


def test_named_models_and_task_data(capsys, model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("the river runs past the mill\nthe boat left at dawn\n")
    (tmp_path / "b.jsonl").write_text('{"text": "two plus two is four"}\n{"text": "a cat slept"}\n')
    code, _, _ = run(capsys, "analyze", f"first={model_dir}", f"second={model_dir}", "--metrics", "basic.loss",
                     "--data", f"a={tmp_path / 'a.txt'}", "--data", f"b={tmp_path / 'b.jsonl'}",
                     "--out", str(tmp_path / "out"))
    assert code == 0
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [m["name"] for m in record["models"]] == ["first", "second"]
    assert set(record["models"][0]["metrics"]["basic.loss"]["values"]) == {"loss", "perplexity", "loss/a", "loss/b"}


def test_missing_model_is_a_failure_exit_1(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "analyze", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 1 and "does not exist" in err


@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_an_out_dir_that_cannot_be_a_folder_is_refused_before_any_computing(capsys, model_dir: Path, tmp_path: Path,
                                                                           where: str) -> None:
    """Found at the first write it cost the whole run (a raw NotADirectoryError): exit 2 with the
    fix under --json, before a model loads, and nothing written."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    out = blocker if where == "is_a_file" else blocker / "out"
    code = main(["analyze", str(model_dir), "--metrics", "basic.loss", "--out", str(out), "--json"])
    error = json.loads(capsys.readouterr().out)
    assert code == 2 and error["error"] == "UsageError" and "is a file" in error["problem"], error
    assert "--out" in error["fix"]
    assert blocker.read_text() == "a file, not a folder"


def test_a_cache_dir_that_is_a_file_is_refused_before_any_pass(model_dir: Path, tmp_path: Path) -> None:
    from tensorscope_core import RunConfig, analyze
    from tensorscope_core.errors import UsageError

    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    with pytest.raises(UsageError, match="cache dir"):
        analyze(str(model_dir), None, ["basic.weight_norms"], config=RunConfig(cache_dir=cache))


def test_new_plugin_names_a_next_step_that_brings_pytest(capsys, tmp_path: Path) -> None:
    """The printed next step installs the plugin with its `test` extra (pytest) and runs pytest through
    the same Python, so it works in a fresh environment that has only TensorScope."""
    import tomllib

    assert main(["new-plugin", "probes", "--dir", str(tmp_path)]) == 0
    folder = tmp_path / "tensorscope-probes"
    nxt = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("next:"))
    assert nxt == f"next: pip install -e '{folder}[test]' && python -m pytest {folder}/tests"
    extras = tomllib.loads((folder / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("pytest") for req in extras["test"])
