"""export(): write a run's results to TensorBoard, W&B (offline) and/or MLflow in one go."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .events import step_batches
from .writers import MlflowWriter, TensorBoardWriter, TrackerWriter, WandbWriter, as_writer

if TYPE_CHECKING:
    from ..results import Results


@dataclass
class ExportSummary:
    """What export() wrote: the CLI prints it, and it says what a tracker should now hold."""

    destinations: list[str]
    steps: list[int]
    scalars: int
    tables: int
    texts: int
    report: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _open(stack: ExitStack, tensorboard: str | Path | None, wandb_dir: str | Path | None, mlflow_uri: str | None,
          writer: Any, name: str | None) -> tuple[list[TrackerWriter], list[str]]:
    """Open each named tracker; the stack closes every one opened, also when a later one fails."""
    writers: list[TrackerWriter] = []
    names: list[str] = []

    def add(w: TrackerWriter, label: str) -> None:
        stack.callback(w.close)
        writers.append(w)
        names.append(label)

    if tensorboard is not None:
        add(TensorBoardWriter(tensorboard), f"tensorboard:{tensorboard}")
    if wandb_dir is not None:
        add(WandbWriter(wandb_dir, name=name), f"wandb-offline:{wandb_dir}")
    if mlflow_uri is not None:
        add(MlflowWriter(mlflow_uri, name=name), f"mlflow:{mlflow_uri}")
    if writer is not None:
        add(as_writer(writer), type(writer).__name__)
    return writers, names


def export(results: Results, *, tensorboard: str | Path | None = None, wandb_dir: str | Path | None = None,
           mlflow_uri: str | None = None, writer: Any = None, report: str | Path | None = None,
           name: str | None = None) -> ExportSummary:
    """Log every numeric tall-table row as a scalar (``metric/field[/L{layer}[/H{head}]]`` at the
    checkpoint's step), tables and texts, and ``report`` (the HTML report) as an artifact, to each
    tracker named. ``writer``: your own SummaryWriter, wandb run or TrackerWriter (left open).
    ``name``: the W&B / MLflow run name."""
    if tensorboard is None and wandb_dir is None and mlflow_uri is None and writer is None:
        raise UsageError("no tracker named", "pass tensorboard=DIR, wandb_dir=DIR, mlflow_uri=URI or writer=...")
    report_path = Path(report) if report is not None else None
    if report_path is not None and not report_path.is_file():
        raise UsageError(f"report {report_path} does not exist",
                         "write it first with `tensorscope report`, or leave the report out")
    batches = step_batches(results.record)
    with ExitStack() as stack:
        writers, destinations = _open(stack, tensorboard, wandb_dir, mlflow_uri, writer, name)
        for w in writers:
            for step, batch in batches:
                w.log(step, batch)
            if report_path is not None:
                w.artifact(report_path)
    return ExportSummary(destinations=destinations, steps=[s for s, _ in batches],
                         scalars=sum(len(b.scalars) for _, b in batches),
                         tables=sum(len(b.tables) for _, b in batches),
                         texts=sum(len(b.texts) for _, b in batches),
                         report=str(report_path) if report_path else None)
