"""Memory ladders of the metrics that keep gradient rows (``Metric.ladder``).

The exact rung keeps the rows on disk (``backing="disk"``): only a few bytes per row stay in RAM,
fewer than any lossy setting, so when the rows fit in the free space of the scratch folder it is
the whole ladder. When they do not, the ladder is lossy and in RAM: int8 rows (where a metric
offers compression), then count-sketch projections to 4096 and 1024 dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from tensorscope_core.plugin_api import Compression, GradientStore, Metric, ModelView, Rung, RunShape

from .common import upper_bound_examples
from .selection import planned_size

PROJECTIONS = (4096, 1024)


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def disk_rung(params: Any, disk_bytes: int, **changes: object) -> Rung | None:
    """The exact rung with the rows on disk (``params`` has a ``backing`` field; ``changes`` keep the
    values, e.g. int8 for int8_zlib); None when they are there already or do not fit there."""
    if params.backing == "disk" or disk_bytes > GradientStore.disk_room():
        return None
    return Rung("disk", params.model_copy(update={"backing": "disk", **changes}),
                f"exact (same values), rows on disk: {gib(disk_bytes)} in the run's scratch folder")


def dot_accuracy(k: int) -> str:
    return (f"dot products off by +-{math.sqrt(2 / k):.3f} x ||g|| ||h|| (1 SD; count sketch to {k} dimensions; "
            "measured error reported)")


def projection_rungs(params: Any, accuracy: Callable[[int], str] = dot_accuracy) -> list[Rung]:
    """Count-sketch rungs to fewer dimensions than ``params`` (with a ``projection_dim`` field) project to."""
    asked = params.projection_dim
    return [Rung(f"project-{k}", params.model_copy(update={"projection_dim": k}), accuracy(k))
            for k in PROJECTIONS if asked is None or k < asked]


def stored_width(params: Any, view: ModelView) -> tuple[int, int]:
    """Entries and bytes per entry of each per-example row kept: the selected entries in the model's
    dtype, or the projection (``params.projection_dim``) in float64."""
    return (params.projection_dim, 8) if params.projection_dim else (planned_size(view, params)[0], view.dtype_bytes)


def example_rows_ladder(metric: type[Metric], params: Any, view: ModelView, shape: RunShape,
                        on_disk: Compression, lossy: Sequence[Rung]) -> list[Rung]:
    """The ladder of a metric keeping per-example rows: disk (kept as ``on_disk``) when they fit
    there, else ``lossy`` and the projections, each holding less than the one before."""
    n = upper_bound_examples(shape.n_sequences, shape.n_batches, shape.batch_size)
    width, item = stored_width(params, view)
    changes = {"compression": on_disk} if "compression" in type(params).model_fields else {}
    disk = disk_rung(params, GradientStore.disk_bytes(n, width, on_disk, item), **changes)
    if disk is not None:
        return [disk]
    return metric.cheaper_rungs(params, view, shape, [*lossy, *projection_rungs(params)])
