"""Every metric on a CUDA device gives its CPU values (skipped where no GPU is present; a GPU machine runs
them with ``bash bench/bench_gpu.sh``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugins import get_registry
from tensorscope_core.testing import random_token_data

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")]


def _numbers(res: Any, name: str) -> dict[str, torch.Tensor]:
    result = res.get(name)
    out = {}
    for field, value in result.values.items():
        if value.kind == "tensor":
            out[field] = res.tensor(name, field).double().cpu()
        elif value.kind == "scalar":
            out[field] = torch.tensor(result.value(field), dtype=torch.float64)
        elif hasattr(value, "values"):
            out[field] = torch.tensor(value.values, dtype=torch.float64)
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_every_metric_runs_on_cuda_with_the_cpu_values(model_dirs: dict[str, Path], family: str) -> None:
    data = {"train": random_token_data(64, n=8, length=12, seed=1), "test": random_token_data(64, n=8, length=12,
                                                                                             seed=2)}
    metrics = sorted(n for n, c in get_registry().metrics.items() if c.scope == "model")
    base = RunConfig(batch_size=4, max_length=12, dtype="float64", memory_budget="8GiB")
    cpu = analyze(str(model_dirs[family]), data, metrics, config=base)
    gpu = analyze(str(model_dirs[family]), data, metrics, config=base.model_copy(update={"device": "cuda"}))
    for name in metrics:
        a, b = cpu.get(name), gpu.get(name)
        assert b.status == a.status, (name, a.status, b.status, b.reason)
        if not a.ok:
            continue
        for field, value in _numbers(cpu, name).items():
            torch.testing.assert_close(_numbers(gpu, name)[field], value, rtol=1e-6, atol=1e-9, equal_nan=True,
                                       msg=lambda m, n=name, f=field: f"{n}.{f}: {m}")
