"""A pinned ``--metrics all`` run on the tiny models, flattened to comparable numbers.

``tests/test_pinned_values.py`` compares a fresh run with ``tests/data/pinned_all_metrics.json``,
written by ``python tests/pinned_run.py --write`` before a refactor of the core, so moving
metrics onto a new core API provably leaves their values unchanged (to 1e-6).

Each model family runs as a model set (two seeds and a base), so model-set metrics are pinned
too. Tensors are pinned by their sum of squares and sum of absolute values (signs of
eigenvectors are arbitrary); table cells by their numbers.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from tensorscope_core import RunConfig, analyze, builtin_corpus
from tensorscope_core.results.schema import (
    HeadValue,
    LayerValue,
    MetricResult,
    ScalarValue,
    SeriesValue,
    TableValue,
    TensorValue,
)
from tensorscope_core.testing import counting_model_calls, single_thread, tiny_model

PINNED = Path(__file__).parent / "data" / "pinned_all_metrics.json"
FAMILIES = ("gpt2", "llama", "bert")
CONFIG = RunConfig(seed=0, batch_size=4, max_length=16, max_batches=2)
#: research defaults of these take tens of seconds per model; the pinned run uses small ones
PARAMS: dict[str, dict[str, Any]] = {
    "fisher.lanczos": {"k": 2, "max_iter": 6, "max_examples": 8},
    "hessian.lanczos": {"k": 2, "max_iter": 6, "max_examples": 8},
    "gradients.tracin": {"default_learning_rate": 1e-3},
    "gradients.critical_samples": {"default_learning_rate": 1e-3},
    "circuits.patching": {"clean": [[5, 6, 7, 8, 9]], "corrupted": [[5, 10, 7, 8, 9]], "answer": [6], "wrong": [10]},
}


def pinned_data() -> dict[str, list[str]]:
    """Two named tasks ``train``/``test`` (task metrics, TracIn) from the built-in corpus."""
    corpus = builtin_corpus()
    return {"train": corpus[:8], "test": corpus[8:16]}


def _numbers(value: Any) -> list[float | None]:
    """Every number of a nested list, None for missing/non-finite."""
    if value is None or isinstance(value, bool):
        return [None]
    if isinstance(value, (int, float)):
        return [float(value) if math.isfinite(value) else None]
    if isinstance(value, (list, tuple)):
        out: list[float | None] = []
        for v in value:
            out += _numbers(v)
        return out
    return []


def flatten(result: MetricResult, tensors: dict[str, torch.Tensor]) -> dict[str, list[float | None]]:
    """field -> its numbers (ok results only)."""
    flat: dict[str, list[float | None]] = {}
    for field, value in result.values.items():
        if isinstance(value, ScalarValue):
            flat[field] = [value.value, value.ci_low, value.ci_high]
        elif isinstance(value, (LayerValue, HeadValue, SeriesValue)):
            flat[field] = _numbers(value.values)
        elif isinstance(value, TableValue):
            flat[field] = [n for row in value.rows for cell in row for n in _numbers(cell)]
        elif isinstance(value, TensorValue):
            t = tensors[value.key].double()
            t = torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)
            flat[field] = [float((t * t).sum()), float(t.abs().sum())]
    return flat


def _passes(res: Any) -> dict[str, Any]:
    """What the run recorded of its passes: every model call it counted, and per metric the
    passes it declared for itself vs the calls counted while it ran."""
    results = [(m.name, r) for m in res.record.models for r in m.metrics.values()]
    results += [("*", r) for r in res.record.model_set.values()]
    recorded = sum(sum(m.model_calls.values()) for m in res.record.models)
    recorded += sum(r.model_calls or 0 for r in res.record.model_set.values())
    return {"recorded_calls": recorded,
            "unattributed": sum(m.model_calls.get("unattributed", 0) for m in res.record.models),
            "declared_vs_counted": {f"{run}/{r.metric}": (sum(r.passes_declared.values()), r.model_calls or 0)
                                    for run, r in results if r.status != "skipped" and not r.from_cache}}


#: the key of each family's RunRecord in what run() returns (kept in memory, not pinned)
RECORD = "record"


def run(root: Path) -> dict[str, Any]:
    """{family: {"status": {run/metric: status}, "values": {run/metric/field: numbers},
    "passes": what the run recorded of its passes, "counted_calls": model calls counted by hand,
    RECORD: the run's RunRecord}}."""
    import transformers as tf

    out: dict[str, Any] = {}
    classes = {"gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM, "bert": tf.BertForMaskedLM}
    with single_thread():
        for family in FAMILIES:
            members = {f"{family}-a": tiny_model(family, root / f"{family}-a", seed=1),
                       f"{family}-b": tiny_model(family, root / f"{family}-b", seed=2)}
            base = tiny_model(family, root / f"{family}-base", seed=0)
            with counting_model_calls([classes[family]]) as counts:
                # interventions.vectors compares two named models of the three: the base and a fine-tune
                params = {**PARAMS, "interventions.vectors": {"broken": "base", "healthy": f"{family}-a"}}
                res = analyze(members, data=pinned_data(), metrics="all", config=CONFIG, params=params, base=base)
            status: dict[str, str] = {}
            values: dict[str, list[float | None]] = {}
            results = [(m.name, r) for m in res.record.models for r in m.metrics.values()]
            results += [("*", r) for r in res.record.model_set.values()]
            for run_name, result in results:
                status[f"{run_name}/{result.metric}"] = result.status
                if result.ok:
                    for field, numbers in flatten(result, res.tensors).items():
                        values[f"{run_name}/{result.metric}/{field}"] = numbers
            out[family] = {"status": status, "values": values, "passes": _passes(res),
                           "counted_calls": counts[classes[family].__name__], RECORD: res.record}
    return out


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"write {PINNED}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = run(Path(tmp))
    n = sum(len(d["values"]) for d in data.values())
    if args.write:
        PINNED.parent.mkdir(parents=True, exist_ok=True)
        pinned = {f: {"status": d["status"], "values": d["values"]} for f, d in data.items()}
        PINNED.write_text(json.dumps(pinned, indent=0, sort_keys=True) + "\n")
        print(f"wrote {n} pinned fields to {PINNED}")
    else:
        print(json.dumps({f: {k: v for k, v in d["status"].items() if v != "ok"} for f, d in data.items()},
                         indent=1))
        for family, d in data.items():
            wrong = {k: v for k, v in d["passes"]["declared_vs_counted"].items() if v[0] != v[1]}
            print(f"{family}: counted {d['counted_calls']} model calls, recorded {d['passes']['recorded_calls']}, "
                  f"unattributed {d['passes']['unattributed']}; declared != counted: {wrong}")
        print(f"{n} fields")


if __name__ == "__main__":
    main()
