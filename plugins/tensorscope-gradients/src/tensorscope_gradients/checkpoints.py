"""Learning rates of checkpoints: given, or read from a Hugging Face Trainer's trainer_state.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tensorscope_core.plugin_api import ModelView, NotApplicable

TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class CheckpointRate:
    model: str
    learning_rate: float
    step: int | None
    source: str  # "parameter", "trainer_state.json", "default"


def checkpoint_folder(view: ModelView) -> Path | None:
    """The folder the model was loaded from (the config's ``_name_or_path``, else the view's name)."""
    for candidate in (getattr(view.config, "_name_or_path", None), view.name):
        if candidate and Path(str(candidate)).is_dir():
            return Path(str(candidate))
    return None


def trainer_state_rate(folder: Path) -> tuple[float, int] | None:
    """(learning rate, global step) from ``folder/trainer_state.json`` as the HF Trainer writes it.

    The rate is the ``learning_rate`` of the last ``log_history`` entry whose ``step`` is at
    most ``global_step`` (the Trainer logs the rate of the optimizer step it just took).
    None when the file is absent or logs no learning rate.
    """
    path = folder / TRAINER_STATE
    if not path.is_file():
        return None
    state = json.loads(path.read_text(encoding="utf-8"))
    step = int(state.get("global_step", 0))
    logged = [e for e in state.get("log_history", []) if "learning_rate" in e and int(e.get("step", 0)) <= step]
    if not logged:
        return None
    return float(logged[-1]["learning_rate"]), step


def learning_rates(views: dict[str, ModelView], given: list[float] | dict[str, float] | None,
                   default: float | None) -> list[CheckpointRate]:
    """One learning rate per model, in the order of ``views``.

    Precedence: ``given`` (a list in model order, or {model name: rate}) over the
    checkpoint folder's trainer_state.json over ``default``; a model with none of them makes the metric
    not apply (``NotApplicable``: it ends skipped naming the fix, as when a run has too few checkpoints).
    """
    names = list(views)
    if isinstance(given, list) and len(given) != len(names):
        raise ValueError(f"learning_rates has {len(given)} entries for {len(names)} checkpoints ({names})")
    if isinstance(given, dict):
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"learning_rates names unknown models {unknown}; the models are {names}")
    out = []
    for i, name in enumerate(names):
        folder = checkpoint_folder(views[name])
        state = trainer_state_rate(folder) if folder is not None else None
        if isinstance(given, list):
            out.append(CheckpointRate(name, float(given[i]), state[1] if state else None, "parameter"))
        elif isinstance(given, dict) and name in given:
            out.append(CheckpointRate(name, float(given[name]), state[1] if state else None, "parameter"))
        elif state is not None:
            out.append(CheckpointRate(name, state[0], state[1], TRAINER_STATE))
        elif default is not None:
            out.append(CheckpointRate(name, float(default), None, "default"))
        else:
            raise NotApplicable(f"no learning rate for checkpoint {name}: it has no {TRAINER_STATE} with a logged "
                                "learning_rate", "pass learning_rates=[...] (one per checkpoint) or "
                                "default_learning_rate")
    return out
