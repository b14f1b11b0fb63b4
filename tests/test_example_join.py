"""Per-example values of two plugins join on the run's data order, so odd samples can be correlated
with self-influence: ``geometry.sample_outliers`` keeps one sample per example of the run (tasks in the
order given, examples in order), ``gradients.tracin`` one self-influence per example of the ``train``
task, so the first n_train outlier samples are the train examples (the geometry README's recipe)."""

from __future__ import annotations

from pathlib import Path

import torch

from tensorscope_core import analyze
from tensorscope_core.stats import correlation
from tensorscope_core.testing import tiny_model

PLANTED = 5  # the train example made unlike the others


def test_outlier_scores_join_tracin_self_influence_by_data_order(tmp_path: Path) -> None:
    checkpoints = {f"step-{i}": str(tiny_model("gpt2", tmp_path / f"step-{i}", seed=i, with_tokenizer=False))
                   for i in range(3)}
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(4, 60, (8, 12), generator=gen)
    train[PLANTED] = 7  # one token repeated: far from every random sequence in the final representation
    test = torch.randint(4, 60, (4, 12), generator=gen)
    res = analyze(checkpoints, data={"train": train, "test": test},
                  metrics=["geometry.sample_outliers", "gradients.tracin"],
                  params={"geometry.sample_outliers": {"k": 3},
                          "gradients.tracin": {"default_learning_rate": 1e-3}})
    outliers = res.get("geometry.sample_outliers", model="step-2")
    assert outliers.ok, outliers.reason
    z = outliers.values["robust_z"].samples
    self_influence = res.get("gradients.tracin").value("self_influence")
    assert z is not None and len(z) == 12 and len(self_influence) == 8
    train_z = z[:len(self_influence)]  # train first: the data's task order
    assert max(range(8), key=lambda i: train_z[i]) == PLANTED
    found = correlation(train_z, self_influence, method="spearman", min_n=3, n_resamples=0)
    assert found.n == 8 and found.r is not None and -1 <= found.r <= 1
