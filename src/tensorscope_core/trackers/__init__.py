"""Experiment trackers: export a run's results to TensorBoard, W&B (offline) and MLflow, and
``track()`` a model from a training loop. The tracker packages are extras (``tensorscope[tensorboard]``,
``[wandb]``, ``[mlflow]``), imported only by the writer that needs one."""

from .events import StepBatch, Table, step_batches, tag
from .export import ExportSummary, export
from .writers import MlflowWriter, TensorBoardWriter, TrackerWriter, WandbWriter, as_writer

__all__ = ["ExportSummary", "MlflowWriter", "StepBatch", "Table", "TensorBoardWriter", "TrackerWriter",
           "WandbWriter", "as_writer", "export", "step_batches", "tag"]
