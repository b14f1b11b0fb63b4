"""Every first-party metric's values on the tiny models are those pinned before the core v2 move,
and every pass the run makes is one it declared and recorded.

``tests/pinned_run.py`` runs ``--metrics all`` on tiny GPT-2, LLaMA-GQA and BERT model sets
(two seeds and a base); ``tests/data/pinned_all_metrics.json`` holds what that run gave before
the metrics moved onto the public plugin API and the single executor. A refactor of the core
must leave every status and every number unchanged (to 1e-6, relative to the number's size).

One deliberate re-pin: when tensorscope-gradients moved onto the core's shared ``per_example_grads``
(one per-example backward for every plugin), its per-example gradients became the summed-loss
gradients divided by the example's target count instead of the gradients of the mean loss. In float32
that rounds differently: 13 fields of ``gradients.tracin_terms`` (``dots``), ``sample_conflicts``
(``top_pairs``) and ``critical_samples`` moved by at most 1.1e-5 (at most 1.8e-7 of the product of the
two gradients' norms) and were re-pinned; every other field was checked unchanged first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from pinned_run import PINNED, RECORD, run

REL_TOL = 1e-6


def _close(got: float | None, want: float | None) -> bool:
    if got is None or want is None:
        return got is want
    if math.isnan(got) or math.isnan(want):  # a metric's own NaN ("not applicable") stays NaN
        return math.isnan(got) and math.isnan(want)
    return math.isclose(got, want, rel_tol=REL_TOL, abs_tol=REL_TOL)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run(tmp_path_factory.mktemp("pinned"))


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_values_equal_the_pinned_run(fresh: dict, family: str) -> None:
    pinned = json.loads(Path(PINNED).read_text())[family]
    now = fresh[family]
    assert now["status"] == pinned["status"]
    assert sorted(now["values"]) == sorted(pinned["values"])
    differing = []
    for field, want in pinned["values"].items():
        got = now["values"][field]
        if len(got) != len(want) or not all(_close(g, w) for g, w in zip(got, want, strict=True)):
            differing.append(field)
    assert not differing, f"{len(differing)} fields changed, e.g. {differing[:5]}"


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_recorded_passes_equal_the_model_calls_counted_by_hand(fresh: dict, family: str) -> None:
    """``--metrics all``: every call of the model (counted here by wrapping the model class's
    forward) is recorded by the run, and every metric made exactly the passes it declared."""
    passes = fresh[family]["passes"]
    assert passes["recorded_calls"] == fresh[family]["counted_calls"]
    assert passes["unattributed"] == 0
    wrong = {who: f"declared {d}, counted {c}" for who, (d, c) in passes["declared_vs_counted"].items() if d != c}
    assert not wrong, wrong


def _residuals(values: dict, keys: list, group: Callable[[tuple], tuple]) -> list[float]:
    """Each observation less the mean of its group."""
    groups: dict = {}
    for key in keys:
        groups.setdefault(group(key), []).append(values[key])
    means = {g: sum(v) / len(v) for g, v in groups.items()}
    return [values[key] - means[group(key)] for key in keys]


def _identity_holds_within_groups(variables: dict, x: str, y: str) -> bool:
    """A pooled |r| near 1 over (model, layer) points can come from one source of variation alone: with
    two layers, or three models, any two quantities that differ more between those than within them
    give tight clusters on a line. The same quantity agrees on every source: with each model's mean
    removed (variation over layers), and with each position's mean removed (variation over models),
    the residuals correlate too, wherever both have variation left to tell."""
    keys = sorted(set(variables[x].values) & set(variables[y].values))
    scale = max(max(abs(v) for v in variables[label].values.values()) for label in (x, y))
    for group in (lambda key: key[:1], lambda key: key[1:]):  # within models; within positions
        rx, ry = (_residuals(variables[label].values, keys, group) for label in (x, y))
        sx, sy = (math.sqrt(sum(v * v for v in r)) for r in (rx, ry))
        covariance = abs(sum(a * b for a, b in zip(rx, ry, strict=True)))
        if min(sx, sy) > 1e-9 * max(scale, 1e-30) and covariance <= 0.99 * sx * sy:
            return False
    return True


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_no_two_metrics_are_the_same_quantity_unless_declared(fresh: dict, family: str) -> None:
    """Across every first-party metric of ``--metrics all``, no pair of values over layers, heads or
    models correlates at |r| > 0.999 (Pearson, every observation pooled, n >= 6) unless one is declared
    to derive from the other (``derived_from``): an undeclared identity (the same per-head trace from two
    plugins, say) would top every discovery at r = 1 and crowd out real findings. Over layers and
    heads, an identity must also hold within models and within positions (see
    ``_identity_holds_within_groups``), so clusters of layers or of models alone do not make one."""
    from tensorscope_core.checkpoints import order_models
    from tensorscope_core.discovery import collect, discover_correlations

    record = fresh[family][RECORD]
    identities = []
    for unit in ("layer", "head", "model"):
        found = discover_correlations(record, unit=unit, method="pearson", min_n=3, n_resamples=0, pooled=True)
        variables = collect(record, unit, order_models([m.name for m in record.models])) \
            if unit != "model" else {}
        identities += [f"{unit}: {f.x} ~ {f.y} (r={f.r:.5f}, n={f.n})" for f in found.findings + found.not_claimed
                       if f.r is not None and abs(f.r) > 0.999 and f.n >= 6
                       and (unit == "model" or _identity_holds_within_groups(variables, f.x, f.y))]
    assert not identities, "declare these as derivations (derived_from) or show they differ:\n" + \
        "\n".join(identities)
