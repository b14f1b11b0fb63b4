"""Results: the typed record of a run plus its tensors; save, load, query, flatten."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from ..errors import OutputError, ResultsFormatError, did_you_mean
from .schema import SCHEMA_VERSION, MetricResult, ModelRecord, RunRecord
from .store import atomic_write, load_tensors, save_tensors
from .table import COLUMNS, tall_rows

if TYPE_CHECKING:
    from ..trackers import ExportSummary
    from .analysis import Comparisons, Discovery

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
TENSORS_FILE = "tensors.safetensors"


def _norm(name: str) -> str:
    return str(name).rstrip("/")


def _same_path(a: str, b: str) -> bool:
    return _norm(a) == _norm(b) or os.path.abspath(a) == os.path.abspath(b)


def _tensors_beside(json_path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_tensors(json_path.parent / TENSORS_FILE)
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise ResultsFormatError(f"{json_path.parent / TENSORS_FILE} cannot be read: {exc}",
                                 "run the analysis again, or remove the damaged tensors file to load the rest") from exc


class Results:
    """What ``analyze`` returns: plain data. ``record`` is the pydantic RunRecord; large arrays
    live in ``tensors`` under the keys their TensorValue names. Comparisons, correlations and
    reports are computed by ``tensorscope_core.report`` and kept here (``comparisons``,
    ``correlations``) for the reports to reuse."""

    def __init__(self, record: RunRecord, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.record = record
        self.tensors = tensors or {}
        #: the latest ``report.compare()`` and ``report.discover_correlations()`` per unit; reports reuse them
        self.comparisons: Comparisons | None = None
        self.correlations: dict[str, Discovery] = {}

    @property
    def models(self) -> list[str]:
        return [m.name for m in self.record.models]

    def model(self, name: str | None = None) -> ModelRecord:
        if name is None:
            if len(self.record.models) != 1:
                raise KeyError(f"results hold {len(self.record.models)} models: name one of {self.models}")
            return self.record.models[0]
        for m in self.record.models:
            if _norm(m.name) == _norm(name):
                return m
        for m in self.record.models:  # the path it was read from, as given or absolute
            if m.source is not None and _same_path(m.source, name):
                return m
        raise KeyError(f"no model '{name}' in these results ({self.models}); {did_you_mean(name, self.models)}")

    def get(self, metric: str, model: str | None = None) -> MetricResult:
        """The result of ``metric`` on ``model`` (model-set metrics: leave ``model`` out)."""
        if metric in self.record.model_set and model is None:
            return self.record.model_set[metric]
        record = self.model(model)
        if metric not in record.metrics:
            raise KeyError(f"no result for '{metric}' on {record.name}; "
                           f"{did_you_mean(metric, record.metrics) or 'available: ' + ', '.join(record.metrics)}")
        return record.metrics[metric]

    def tensor(self, metric: str, field: str, model: str | None = None) -> torch.Tensor:
        value = self.get(metric, model).values[field]
        return self.tensors[value.key]  # type: ignore[union-attr]

    def table(self) -> Any:
        """The tall table as a pandas DataFrame (a list of dicts when pandas is absent)."""
        rows = tall_rows(self.record)
        try:
            import pandas as pd
        except ImportError:
            return rows
        return pd.DataFrame(rows, columns=list(COLUMNS))

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in tall_rows(self.record):
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        return buffer.getvalue()

    def save(self, out: str | Path) -> Path:
        """Write results.json, results.csv and (when any) tensors.safetensors, each atomically, as one
        set: the old results.json goes first and the new one is written last, so a folder never holds
        a results.json beside another run's tensors or table (a stale tensors file is removed)."""
        out = Path(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / RESULTS_JSON).unlink(missing_ok=True)
            if self.tensors:
                save_tensors(self.tensors, out / TENSORS_FILE)
            else:
                (out / TENSORS_FILE).unlink(missing_ok=True)
            with atomic_write(out / RESULTS_CSV) as handle:
                handle.write(self.to_csv())
            with atomic_write(out / RESULTS_JSON) as handle:
                handle.write(self.record.model_dump_json(indent=2))
        except OSError as exc:
            raise OutputError(f"the results could not be written to {out}: {exc.strerror or exc}",
                              "free space or choose another out dir; with a cache, running the same command again "
                              "takes the finished metrics from it") from exc
        return out

    @classmethod
    def load(cls, path: str | Path) -> Results:
        """Read what ``save()`` (a folder or its results.json) or ``save_report()`` wrote."""
        path = Path(path)
        json_path = path / RESULTS_JSON if path.is_dir() else path
        if not json_path.exists():
            raise ResultsFormatError(f"{json_path} does not exist", "pass the folder that `res.save()` wrote")
        try:
            raw = json.loads(json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ResultsFormatError(f"{json_path} is not JSON ({exc})", "pass the results.json a run wrote") from exc
        version = str(raw.get("schema_version", "")) if isinstance(raw, dict) else ""
        if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise ResultsFormatError(f"{json_path} has schema {version or 'none'}, this tensorscope reads "
                                     f"{SCHEMA_VERSION}", "load it with the tensorscope version that wrote it")
        try:
            if "report_version" in raw:  # written by save_report(): the run record plus comparisons and findings
                from .analysis import ReportRecord

                report = ReportRecord.model_validate(raw)
                record = RunRecord.model_validate(report.model_dump(include=set(RunRecord.model_fields)))
                results = cls(record, _tensors_beside(json_path))
                results.comparisons = report.comparisons
                results.correlations = {d.unit: d for d in report.correlations}
                return results
            record = RunRecord.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ResultsFormatError(
                f"{json_path} is JSON of schema {version} but not a run's results: {exc.error_count()} problem(s), "
                f"first at {'.'.join(map(str, first['loc'])) or 'the top'}: {first['msg']}",
                "pass a results.json written by `tensorscope analyze` or Results.save(), unedited") from exc
        return cls(record, _tensors_beside(json_path))

    def export(self, *, tensorboard: str | Path | None = None, wandb_dir: str | Path | None = None,
               mlflow_uri: str | None = None, writer: Any = None, report: str | Path | None = None,
               name: str | None = None) -> ExportSummary:
        """Log these results to experiment trackers (see ``tensorscope_core.trackers.export``); the
        tracker packages are extras, imported only here."""
        from ..trackers import export

        return export(self, tensorboard=tensorboard, wandb_dir=wandb_dir, mlflow_uri=mlflow_uri, writer=writer,
                      report=report, name=name)

    def __repr__(self) -> str:
        n = sum(len(m.metrics) for m in self.record.models) + len(self.record.model_set)
        return f"Results({len(self.record.models)} model(s), {n} metric result(s))"


__all__ = ["MetricResult", "ModelRecord", "Results", "RunRecord"]
