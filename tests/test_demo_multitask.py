"""`tensorscope demo --recipe multitask`, reduced: the untrained checkpoint (step 0) analysed per task in one
run. Known answers: an untrained model predicts neither task (loss ln 64 on both); each task's mask keeps
ceil(10% of the parameters); the overlap's Jaccard is |A and B| / |A or B| of its own counts; Lanczos
eigenvalues come out descending with lambda_max the first; the triangulation holds each estimator's own value."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tensorscope_core.cli import build_parser
from tensorscope_core.demo import MULTITASK_METRICS, counting_sequences, run_multitask

SMALL = {"fisher.lanczos": {"k": 2, "max_iter": 6, "max_examples": 4},
         "hessian.lanczos": {"k": 2, "max_iter": 6, "max_examples": 4}}


def test_counting_sequences_count_up_modulo_the_vocabulary() -> None:
    import torch

    ids = counting_sequences(3, torch.Generator().manual_seed(0))
    assert ids.shape == (3, 32)
    assert torch.equal((ids[:, 1:] - ids[:, :-1]) % 64, torch.ones(3, 31, dtype=ids.dtype))


def test_the_cli_offers_the_recipe() -> None:
    args = build_parser().parse_args(["demo", "--recipe", "multitask", "--out", "x"])
    assert (args.recipe, args.out) == ("multitask", "x")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--recipe", "nope"])


def test_multitask_recipe_runs_fisher_masks_overlap_and_curvature_per_task(tmp_path: Path) -> None:
    lines: list[str] = []
    results = run_multitask(tmp_path, steps=(0,), log=lines.append, reports=False, n_per_task=8, params=SMALL)
    metrics = results.model("step-0000").metrics
    assert sorted(metrics) == sorted(MULTITASK_METRICS)
    assert all(r.ok for r in metrics.values()), {n: r.reason for n, r in metrics.items() if not r.ok}
    loss = metrics["basic.loss"]
    for task in ("repeat", "count"):
        assert abs(loss.value(f"loss/{task}") - math.log(64)) < 0.15
    n_params = metrics["fisher.lanczos"].value("n_params")
    for task in ("repeat", "count"):
        assert metrics["fisher.masks"].value(f"n_selected/{task}") == math.ceil(0.1 * n_params)
        assert metrics["fisher.diagonal"].value(f"true_trace/{task}") > 0
    ((a, b, n_a, n_b, n_both, jaccard, _),) = metrics["fisher.overlap"].values["pairs"].rows
    assert (a, b) == ("repeat", "count")
    assert jaccard == pytest.approx(n_both / (n_a + n_b - n_both))
    assert metrics["fisher.overlap"].value("jaccard_overall/repeat/count") == pytest.approx(jaccard)
    for name in ("fisher.lanczos", "hessian.lanczos"):
        eig = metrics[name].value("eigenvalues")
        assert eig == sorted(eig, reverse=True) and metrics[name].value("lambda_max") == eig[0]
    assert f"  mask overlap repeat/count: Jaccard {jaccard:.3f}" in lines
    # one triangulation result holds the three estimators, each as its own metric reported it
    rows = {row[0]: row for row in metrics["fisher.triangulation"].values["estimates"].rows}
    assert rows["fisher.lanczos"][6] == metrics["fisher.lanczos"].value("lambda_max")
    assert rows["hessian.lanczos"][6] == metrics["hessian.lanczos"].value("lambda_max")
    per_task = [metrics["fisher.diagonal"].value(f"true_trace/{task}") for task in ("repeat", "count")]
    assert rows["fisher.diagonal (true)"][5] == pytest.approx(sum(per_task) / 2)  # two tasks of 8 sequences
    lanczos = metrics["fisher.lanczos"].value("lambda_max")
    assert f"    fisher.lanczos [true Fisher]: top {lanczos:.4g} (estimate)" in lines
    assert (tmp_path / "results.json").exists()
