"""Every case of the bad-input catalogue (tests/bad_inputs.py): the right typed error and exit
code, a message saying what went wrong, and nothing written or lost."""

from __future__ import annotations

from pathlib import Path

import pytest
from bad_inputs import CASES, GUIDE, Case, Workspace, guide_with_table


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, model_dirs: dict[str, Path], tmp_path: Path) -> None:
    outcome = case.run(Workspace(tmp_path, model_dirs))
    assert (outcome.kind, outcome.exit_code) == (case.expect, case.exit_code), outcome.message
    assert case.says.lower() in outcome.message.lower(), outcome.message
    if case.expect[0].isupper():  # an error type: it names a fix, and nothing was written
        assert "| fix: " in outcome.message and not outcome.message.endswith("| fix: None")
        assert not outcome.wrote, "a refused run must leave no output behind"
    else:
        assert outcome.wrote == case.writes


def test_catalogue_has_every_case_once() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 50


def test_the_user_guide_table_is_current() -> None:
    text = GUIDE.read_text()
    assert guide_with_table(text) == text, "run `python tests/bad_inputs.py` to regenerate the table"
