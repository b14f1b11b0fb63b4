"""RunConfig: everything that decides a run's numbers, validated once at the door."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from .machine import Budget

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
          "gib": 1024**3, "tib": 1024**4}


def parse_bytes(size: str | int | float) -> int:
    """'4GiB', '512MB', '1.5g' or a plain number of bytes -> bytes."""
    if isinstance(size, (int, float)):
        if size <= 0:
            raise ValueError(f"a memory size must be positive, got {size}")
        return int(size)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", size)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {size!r}: write e.g. '4GiB', '512MB' or 1000000")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {size!r}")
    return int(value)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class RunConfig(BaseModel):
    """Settings shared by every metric of a run.

    Values that change numbers (seed, batching, length, dtype) enter the cache key;
    settings that only change how the run is carried out (budget, time limit) do not.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    batch_size: int = Field(8, ge=1)
    max_length: int | None = Field(
        None, ge=2, description="tokens per sequence; None: the model's positions, at most 128")
    max_batches: int | None = Field(None, ge=1, description="stop after this many batches per task")
    device: str = Field("cpu", description="cpu, cuda, cuda:N, mps, or 'auto' (cuda if available, else mps, "
                                           "else cpu; the run records the choice)")
    dtype: Literal["float32", "float64", "bfloat16", "float16", "auto"] = Field(
        "float32", description="'auto': the checkpoint's torch_dtype (config.json) when it is a float type, "
                               "else float32; the run records the choice")
    deterministic: bool = Field(False, description="torch deterministic algorithms and a fixed cuBLAS workspace "
                                                   "for the run (restored afterwards)")
    force_recompute: bool = Field(False, description="compute every metric again and overwrite its cache entry")
    memory_budget: str | int | None = Field(
        None, description="bytes the plan must fit in; None: the device's free memory now, less a margin")
    strict_budget: bool = Field(False, description="refuse a plan over budget instead of stepping metrics down "
                                                   "their ladders or skipping them")
    rungs: dict[str, str] = Field(default_factory=dict,
                                  description="metric -> ladder rung to pin ('asked': never step down)")
    min_micro_batch: int = Field(1, ge=1, description="floor for out-of-memory halving")
    fail_fast: bool = False
    metric_timeout_s: float | None = Field(None, gt=0)
    cache_dir: Path | None = None
    device_map: str | dict[str, int | str] | None = Field(
        None, description="spread a model folder over devices with accelerate: 'auto', 'balanced', 'sequential' "
                          "or {module: device} (devices: GPU index, 'cpu', 'disk')")
    max_memory: dict[str, str | int] | None = Field(
        None, description="device -> memory accelerate may fill with weights, e.g. {'0': '70GiB', 'cpu': '2GiB'}")
    offload_dir: Path | None = Field(None, description="where accelerate keeps the weights it offloads to disk")
    progress: bool = False
    executor: Literal["local", "ray"] = Field(
        "local", description="where the members' per-model stages run: 'local' (one after another here) or "
                             "'ray' (one Ray task each; pip install 'tensorscope[ray]')")
    ray_address: str | None = Field(
        None, description="the Ray cluster to join with executor='ray': None starts a local one, 'auto' joins "
                          "the cluster of `ray start --head`, or 'ray://HOST:10001'")

    @field_validator("device")
    @classmethod
    def _device_readable(cls, v: str) -> str:
        import torch

        if v == "auto":
            return v
        try:
            torch.device(v)
        except RuntimeError as exc:
            raise ValueError(f"unknown device {v!r}: use cpu, cuda, cuda:N, mps or auto") from exc
        return v

    @field_validator("memory_budget")
    @classmethod
    def _budget_readable(cls, v: str | int | None) -> str | int | None:
        if v is not None:
            parse_bytes(v)
        return v

    def budget(self) -> Budget:
        """The budget of this run: ``memory_budget``, else the device's free memory (read now)."""
        from .machine import run_budget

        return run_budget(self.memory_budget, self.device)

    def numeric_key(self) -> dict[str, object]:
        """The part of the config that changes values (enters cache keys)."""
        return {"seed": self.seed, "batch_size": self.batch_size, "max_length": self.max_length,
                "max_batches": self.max_batches, "dtype": self.dtype}
