"""The report section: the loss path and the recovery bars of interventions.vectors, nothing without it."""

from __future__ import annotations

import pytest
import torch
from tensorscope_interventions.report import interventions_section
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import random_token_data

pytest.importorskip("matplotlib")


def test_section_draws_path_and_recovery(models) -> None:
    a = AutoModelForCausalLM.from_pretrained(models["gpt2"])
    ids = random_token_data(a.config.vocab_size, n=3, length=6, seed=2)
    assert interventions_section(analyze(models["gpt2"], data=ids, metrics=["basic.loss"])) is None
    b = AutoModelForCausalLM.from_pretrained(models["gpt2"])
    with torch.no_grad():
        for p in b.transformer.h[0].parameters():
            p.mul_(0.5)
    res = analyze(
        {"b": b, "h": a},
        data=ids,
        metrics=["interventions.vectors"],
        config=RunConfig(batch_size=3),
        params={"interventions.vectors": {"alphas": [0.0, 0.5, 1.0]}},
    )
    html = interventions_section(res)
    assert html is not None and html.count("<figure") == 2 and "b -&gt; h" in html
