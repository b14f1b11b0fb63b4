"""`tensorscope cache ls | stats | clear` and `tensorscope analyze --force-recompute`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tensorscope_core.cli import main
from tensorscope_core.testing import tiny_model

pytestmark = pytest.mark.usefixtures("basic_only")
METRICS = "basic.weight_norms"  # needs no data: two models, one entry each


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("cache-models")
    return [f"{name}={tiny_model('gpt2', root / name, seed=i, with_tokenizer=False)}"
            for i, name in enumerate(("a", "b"))]


def _json(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> Any:
    assert main(argv) == code
    return json.loads(capsys.readouterr().out)


def _analyze(out: Path, models: list[str], *extra: str) -> None:
    assert main(["analyze", *models, "--metrics", METRICS, "--out", str(out), "--json", *extra]) == 0


def test_ls_stats_and_clear_by_model(tmp_path: Path, models: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _analyze(out, models)
    capsys.readouterr()
    rows = _json(capsys, ["cache", "ls", "--out", str(out), "--json"])
    assert [(r["model"], r["metric"], r["status"]) for r in rows] == [("a", METRICS, "ok"), ("b", METRICS, "ok")]
    on_disk = {p.stem: p.stat().st_size for p in (out / ".cache").glob("*.json")}
    assert {r["key"]: r["nbytes"] for r in rows} == on_disk  # no tensors: the JSON entry is all there is
    stats = _json(capsys, ["cache", "stats", "--cache-dir", str(out / ".cache"), "--json"])
    assert (stats["entries"], stats["bytes"]) == (2, sum(on_disk.values()))
    assert [(m["model"], m["entries"]) for m in stats["models"]] == [("a", 1), ("b", 1)]
    cleared = _json(capsys, ["cache", "clear", "--out", str(out), "--model", "a", "--json"])
    assert cleared["removed"] == 1 and cleared["bytes"] == on_disk[rows[0]["key"]]
    assert [r["model"] for r in _json(capsys, ["cache", "ls", "--out", str(out), "--json"])] == ["b"]
    _analyze(out, models)  # a's metric is computed again, b's comes from the cache
    record = json.loads((out / "results.json").read_text())
    assert {m["name"]: m["metrics"][METRICS]["from_cache"] for m in record["models"]} == {"a": False, "b": True}


def test_entries_written_before_the_model_was_kept_are_still_listed(
        tmp_path: Path, models: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _analyze(out, models[:1])
    (entry,) = (out / ".cache").glob("*.json")
    raw = json.loads(entry.read_text())
    assert raw.pop("model") == "a"
    entry.write_text(json.dumps(raw))  # as an older TensorScope wrote it
    capsys.readouterr()
    rows = _json(capsys, ["cache", "ls", "--out", str(out), "--json"])
    assert [(r["model"], r["metric"]) for r in rows] == [(None, METRICS)]
    assert _json(capsys, ["cache", "clear", "--out", str(out), "--model", "a", "--json"])["removed"] == 0
    assert _json(capsys, ["cache", "clear", "--out", str(out), "--json"])["removed"] == 1
    assert not list((out / ".cache").glob("*.json"))


def test_a_folder_that_is_not_a_cache_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    err = _json(capsys, ["cache", "clear", "--cache-dir", str(tmp_path), "--json"], code=2)
    assert err["error"] == "UsageError" and "is not a TensorScope cache: it holds notes.txt" in err["problem"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    err = _json(capsys, ["cache", "ls", "--out", str(tmp_path / "none"), "--json"], code=2)
    assert err["problem"] == f"no cache at {tmp_path / 'none' / '.cache'}"


def test_force_recompute_on_the_command_line(tmp_path: Path, models: list[str]) -> None:
    out = tmp_path / "out"
    _analyze(out, models[:1])
    (entry,) = (out / ".cache").glob("*.json")
    inode = entry.stat().st_ino
    _analyze(out, models[:1], "--force-recompute")
    record = json.loads((out / "results.json").read_text())
    assert record["models"][0]["metrics"][METRICS]["from_cache"] is False
    assert record["config"]["force_recompute"] is True
    assert entry.stat().st_ino != inode  # rewritten in place of the old entry
