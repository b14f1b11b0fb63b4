"""A scratch per-model metric that returns a given value per model name (its series), so the
model-set metrics can be run on a known series through the real scheduler."""

from __future__ import annotations

from typing import Any, ClassVar

from tensorscope_core.plugin_api import LayerValue, Metric, ScalarValue


def series_metric(values: dict[str, float], layers: dict[str, list[float]] | None = None) -> type:
    class Replay(Metric):
        """Replays a known series: ``value`` (and per-layer ``layers``) of the model of that name."""

        name = "scratch.series"
        artifacts = ("weights",)
        table: ClassVar[dict[str, float]] = values
        layer_table: ClassVar[dict[str, list[float]] | None] = layers

        def finalize(self) -> dict[str, Any]:
            out: dict[str, Any] = {"value": ScalarValue(value=self.table[self.view.name])}
            if self.layer_table is not None:
                out["layers"] = LayerValue(values=self.layer_table[self.view.name], axis="block")
            return out

    return Replay
