"""track(): analyse a model from inside a training loop every N steps and log it to a tracker,
leaving the training exactly as it was (weights, gradients, train/eval modes, random stream)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..api import analyze
from ..config import RunConfig
from ..errors import BadParameterError
from ..results import Results
from .events import step_batches
from .writers import TrackerWriter, as_writer


class Tracker:
    """Call ``tracker.step(step)`` (or ``tracker(step)``) after each optimiser step; every ``every``
    steps it runs ``analyze()`` on the model and logs the results at that step."""

    def __init__(self, model: nn.Module, every: int, metrics: str | Sequence[str], writer: TrackerWriter,
                 *, data: Any = None, config: RunConfig | None = None,
                 params: Mapping[str, Mapping[str, Any]] | None = None, tokenizer: Any = None,
                 name: str = "model") -> None:
        self.model, self.every, self.metrics, self.writer = model, every, metrics, writer
        self.data, self.config, self.params, self.tokenizer, self.name = data, config, params, tokenizer, name

    def step(self, step: int) -> Results | None:
        """Analyse and log at multiples of ``every``; the Results, or None on the other steps."""
        if step % self.every:
            return None
        modes = [m.training for m in self.model.modules()]  # analyze() restores the top module's flag only
        devices = list(range(torch.cuda.device_count()))
        with torch.random.fork_rng(devices=devices):  # analyze() seeds torch; training's stream goes on
            results = analyze({self.name: self.model}, data=self.data, metrics=self.metrics, config=self.config,
                              params=self.params, tokenizer=self.tokenizer)
        for module, training in zip(self.model.modules(), modes, strict=True):
            module.training = training
        for at, batch in step_batches(results.record, step=step):
            self.writer.log(at, batch)
        return results

    __call__ = step

    def close(self) -> None:
        self.writer.close()


def track(model: nn.Module, *, every: int, metrics: str | Sequence[str], writer: Any, data: Any = None,
          config: RunConfig | None = None, params: Mapping[str, Mapping[str, Any]] | None = None,
          tokenizer: Any = None, name: str = "model") -> Tracker:
    """A Tracker for a training loop. ``writer``: a TrackerWriter (TensorBoardWriter, WandbWriter,
    MlflowWriter), or your own SummaryWriter or wandb run. ``data``, ``config``, ``params``,
    ``tokenizer`` go to ``analyze()`` as they are."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise BadParameterError(f"every={every!r}: track() analyses every N steps, N a positive integer",
                                "pass every=100 to analyse at steps 0, 100, 200, ...")
    return Tracker(model, every, metrics, as_writer(writer), data=data, config=config, params=params,
                   tokenizer=tokenizer, name=name)
