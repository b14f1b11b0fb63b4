"""The trackers' writers: one small class per tracker behind one protocol, so export and the
training-loop callback log the same events the same way. Each tracker package is an extra,
imported only when its writer is made."""

from __future__ import annotations

import importlib
import os
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from ..errors import MissingDependencyError, OutputError, UsageError
from .events import StepBatch

EXPERIMENT = "tensorscope"  # the W&B project and MLflow experiment unless one is named
_MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch call


class TrackerWriter(Protocol):
    """What export() and track() write to; pass your own object with these methods for another tracker."""

    def log(self, step: int, batch: StepBatch) -> None: ...

    def artifact(self, path: Path) -> None: ...

    def close(self) -> None: ...


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import a tracker's package, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module.split(".")[0], needed_for,
                                     f"pip install 'tensorscope[{extra}]'") from exc


class TensorBoardWriter:
    """Scalars as scalars, tables and texts as (Markdown) text; the report is copied into the log dir
    (TensorBoard has no artifacts) and named in a text entry. Takes a log dir or your SummaryWriter."""

    def __init__(self, target: str | Path | Any) -> None:
        if isinstance(target, str | Path):
            tb = require("torch.utils.tensorboard", "tensorboard", "TensorBoard export")
            self.writer, self.owned = tb.SummaryWriter(log_dir=str(target)), True
        else:
            self.writer, self.owned = target, False

    def log(self, step: int, batch: StepBatch) -> None:
        for name, value in batch.scalars.items():
            self.writer.add_scalar(name, value, global_step=step)
        for name, table in batch.tables.items():
            self.writer.add_text(name, table.markdown(), global_step=step)
        for name, text in batch.texts.items():
            self.writer.add_text(name, text, global_step=step)

    def artifact(self, path: Path) -> None:
        copy = Path(self.writer.get_logdir()) / path.name
        if copy.resolve() != path.resolve():
            shutil.copyfile(path, copy)
        self.writer.add_text("tensorscope/report", f"report: {copy}")

    def close(self) -> None:
        self.writer.flush()
        if self.owned:
            self.writer.close()


class WandbWriter:
    """One W&B run: each step's values in one ``run.log(..., step=)`` call (W&B wants steps in order),
    tables as ``wandb.Table``, texts as one-cell tables, the report saved into the run's files.
    Takes a directory (an offline run is started there) or your run from ``wandb.init``."""

    def __init__(self, target: str | Path | Any, *, project: str = EXPERIMENT, name: str | None = None) -> None:
        self.wandb = require("wandb", "wandb", "W&B export")
        if isinstance(target, str | Path):
            Path(target).mkdir(parents=True, exist_ok=True)
            self.run = self.wandb.init(mode="offline", dir=str(target), project=project, name=name,
                                       settings=self.wandb.Settings(silent=True))
            self.owned = True
        else:
            self.run, self.owned = target, False

    def log(self, step: int, batch: StepBatch) -> None:
        values: dict[str, Any] = dict(batch.scalars)
        values |= {n: self.wandb.Table(columns=t.columns, data=t.rows) for n, t in batch.tables.items()}
        values |= {n: self.wandb.Table(columns=["text"], data=[[t]]) for n, t in batch.texts.items()}
        self.run.log(values, step=step)

    def artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self) -> None:
        if self.owned:
            self.run.finish()
            if self.wandb.run is None:  # finish() returns before W&B's service has written the run's file;
                self.wandb.teardown()  # teardown waits for it (and would end other runs: only when none is open)


class MlflowWriter:
    """One MLflow run through ``MlflowClient``: scalars with log_batch, tables with log_table, texts
    with log_text, the report with log_artifact. A local path or ``file:`` URI is MLflow's file store,
    which MLflow 3 refuses unless ``MLFLOW_ALLOW_FILE_STORE`` is set: naming one asks for it, so it is
    set (for this process, when unset)."""

    def __init__(self, uri: str, *, experiment: str = EXPERIMENT, name: str | None = None) -> None:
        tracking = require("mlflow.tracking", "mlflow", "MLflow export")
        self.entities = require("mlflow.entities", "mlflow", "MLflow export")
        if "://" not in uri or uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = tracking.MlflowClient(tracking_uri=uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id: str = self.client.create_run(experiment_id, run_name=name).info.run_id
        except Exception as exc:  # MlflowException and the store's own OSError alike
            raise OutputError(f"MLflow at {uri} refused the run: {exc}",
                              "pass a writable folder, a file: URI or a tracking server's URI") from exc

    def log(self, step: int, batch: StepBatch) -> None:
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(k, v, now, step) for k, v in batch.scalars.items()]
        for start in range(0, len(metrics), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + _MLFLOW_BATCH])
        for name, table in batch.tables.items():
            columns = {c: [row[i] for row in table.rows] for i, c in enumerate(table.columns)}
            self.client.log_table(self.run_id, columns, f"tables/step_{step}/{name}.json")
        for name, text in batch.texts.items():
            self.client.log_text(self.run_id, text, f"text/step_{step}/{name}.txt")

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def as_writer(target: Any) -> TrackerWriter:
    """A TrackerWriter as is; a ``SummaryWriter`` or a W&B run wrapped (left open: it is yours)."""
    if hasattr(target, "add_scalar"):
        return TensorBoardWriter(target)
    if hasattr(target, "log") and hasattr(target, "finish"):
        return WandbWriter(target)
    if all(callable(getattr(target, m, None)) for m in ("log", "artifact", "close")):
        return target  # type: ignore[no-any-return]
    raise UsageError(f"{type(target).__name__} is not a tracker writer",
                     "pass a SummaryWriter, a wandb run, or an object with log(step, batch), artifact(path), close()")
