"""Short model names: the fewest trailing path parts that tell a run's models apart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torch import nn

from tensorscope_core.api import _sources
from tensorscope_core.errors import UsageError
from tensorscope_core.models.load import ModelSource
from tensorscope_core.models.names import short_names


def _names(*paths: str, taken: tuple[str, ...] = ()) -> list[str]:
    return [s.display_name for s in short_names([ModelSource(p) for p in paths], taken)]


def test_checkpoints_of_one_run_are_named_by_their_folders() -> None:
    assert _names("/home/me/runs/ckpt-100", "/home/me/runs/ckpt-500/") == ["ckpt-100", "ckpt-500"]


def test_same_leaf_in_two_runs_takes_the_part_that_differs() -> None:
    assert _names("/x/run-a/final", "/x/run-b/final", "/x/run-a/ckpt-10") == ["run-a/final", "run-b/final",
                                                                              "ckpt-10"]


def test_a_relative_path_is_named_by_the_folder_it_points_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ckpt-7").mkdir()
    monkeypatch.chdir(tmp_path / "ckpt-7")
    assert _names(".") == ["ckpt-7"]
    assert _names("../ckpt-7") == ["ckpt-7"]


def test_a_name_taken_by_the_base_or_the_user_is_not_reused() -> None:
    assert _names("/w/models/base", taken=("base",)) == ["models/base"]
    named = short_names([ModelSource("/w/a/final", name="final"), ModelSource("/w/b/final")])
    assert [s.display_name for s in named] == ["final", "b/final"]


def test_modules_and_given_names_are_kept() -> None:
    module = nn.Linear(2, 2)
    named = short_names([ModelSource(module), ModelSource("/p/q", name="mine"), ModelSource("/p/r")])
    assert [s.display_name for s in named] == ["Linear", "mine", "r"]
    assert named[2].where == "/p/r"  # load messages still name the path


def test_one_path_given_twice_is_refused_by_name() -> None:
    with pytest.raises(UsageError, match="named 'ckpt'"):
        _sources(["/runs/ckpt", "/runs/ckpt/"], None)


def test_base_keeps_its_name_and_members_are_shortened() -> None:
    got = _sources([os.path.join("/r", "base"), "/r/step-20"], None, base="/r/step-0")
    assert [s.display_name for s in got] == ["base", "r/base", "step-20"]
