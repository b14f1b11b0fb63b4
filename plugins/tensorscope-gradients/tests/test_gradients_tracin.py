"""gradients.tracin and gradients.critical_samples over checkpoints, against backward passes."""

from __future__ import annotations

import pytest
import torch
from gradients_reference import copy_tokenizer, example_grads, load_hf, tokenize, write_trainer_state

from tensorscope_core import RunConfig, analyze, builtin_corpus
from tensorscope_core.testing import check_declared_cost

TRACIN, CRITICAL, TERMS = "gradients.tracin", "gradients.critical_samples", "gradients.tracin_terms"


@pytest.fixture(scope="module")
def checkpoints(models, tmp_path_factory):
    """Two GPT-2 'checkpoints' (the tiny model, then perturbed twice) in checkpoint-10/ and
    checkpoint-20/ with trainer_state.json as the HF Trainer writes it: learning rate 1e-3/step."""
    import transformers as tf

    root = tmp_path_factory.mktemp("run")
    model = tf.AutoModelForCausalLM.from_pretrained(models["gpt2"])
    gen = torch.Generator().manual_seed(0)
    out = {}
    for step in (10, 20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        folder = root / f"checkpoint-{step}"
        model.save_pretrained(folder)
        copy_tokenizer(models["gpt2"], folder)
        write_trainer_state(folder, step, [(s, 1e-3 / s) for s in range(1, step + 1)])
        out[f"ckpt-{step}"] = folder
    return out


@pytest.fixture(scope="module")
def split():
    corpus = builtin_corpus()
    return {"train": corpus[:6], "test": corpus[6:9]}


def test_tracin_equals_backward_passes_with_trainer_state_rates(checkpoints, split, tokenizer):
    """sum_c eta_c g_c(z) . g_c(z') with eta read from trainer_state.json (1e-3/10, 1e-3/20),
    gradients from one backward pass per example in float64."""
    res = analyze(checkpoints, data=split, metrics=[TRACIN, CRITICAL],
                  config=RunConfig(batch_size=4, max_length=32, dtype="float64"))
    result = res.get(TRACIN)
    assert result.status == "ok", result.reason
    train, test = tokenize(tokenizer, split["train"]), tokenize(tokenizer, split["test"])
    want = torch.zeros(6, 3, dtype=torch.float64)
    want_self = torch.zeros(6, dtype=torch.float64)
    for folder, lr in zip(checkpoints.values(), (1e-4, 5e-5), strict=True):
        model = load_hf(folder)
        g_train, g_test = example_grads(model, train), example_grads(model, test)
        want += lr * g_train @ g_test.T
        want_self += lr * (g_train**2).sum(1)
    torch.testing.assert_close(res.tensor(TRACIN, "influence"), want, rtol=1e-9, atol=1e-15)
    assert result.value("self_influence") == pytest.approx(want_self.tolist(), rel=1e-9)
    assert result.values["checkpoints"].rows == [["ckpt-10", 10, 1e-4, "trainer_state.json"],
                                                 ["ckpt-20", 20, 5e-5, "trainer_state.json"]]
    for j in range(3):
        rows = [r for r in result.values["top_proponents"].rows if r[0] == j]
        ranked = [int(i) for i in torch.argsort(want[:, j], descending=True) if want[i, j] > 0][:5]
        assert [r[2] for r in rows] == ranked
        assert rows[0][5] == split["train"][ranked[0]][:120] or rows[0][5].startswith(split["train"][ranked[0]][:20])
    for model in res.record.models:
        check_declared_cost(model.metrics[TERMS])
    assert res.get(CRITICAL).status == "ok"  # 6 training examples: too few to test
    assert "at least 8 are needed" in res.get(CRITICAL).values["diagnosis"].text


def test_declared_state_of_the_model_set_metrics(checkpoints, split, models):
    """Two [n_train, n_test] float64 matrices and four per-example vectors, whatever the number of
    checkpoints: 6 x 3 examples over two checkpoints, over one, and with other task names."""
    want = 8 * (2 * 6 * 3 + 2 * (6 + 3))
    runs = [(checkpoints, split, {}),
            (models["llama"], split, {}),
            (checkpoints, {"fit": split["train"], "held_out": split["test"]},
             {TERMS: {"train_task": "fit", "test_task": "held_out"}})]
    for folders, data, params in runs:
        res = analyze(folders, data=data, metrics=[TRACIN, CRITICAL], config=RunConfig(batch_size=4),
                      params={**params, TRACIN: {"default_learning_rate": 0.1},
                              CRITICAL: {"default_learning_rate": 0.1, "min_examples": 3}})
        for metric in (TRACIN, CRITICAL):
            result = res.get(metric)
            assert result.status == "ok", result.reason
            assert result.measured_bytes == result.declared_bytes == want
            check_declared_cost(result)


def test_learning_rates_given_override_and_are_checked(checkpoints, split):
    params = {TRACIN: {"learning_rates": {"ckpt-10": 1.0, "ckpt-20": 0.0}}}
    res = analyze(checkpoints, data=split, metrics=[TRACIN], params=params, config=RunConfig(batch_size=4))
    rows = res.get(TRACIN).values["checkpoints"].rows
    assert rows == [["ckpt-10", 10, 1.0, "parameter"], ["ckpt-20", 20, 0.0, "parameter"]]
    bad = analyze(checkpoints, data=split, metrics=[TRACIN], params={TRACIN: {"learning_rates": [1.0]}},
                  config=RunConfig(batch_size=4)).get(TRACIN)
    assert bad.status == "error" and "learning_rates has 1 entries for 2 checkpoints" in bad.reason


def test_projection_and_subset_on_llama(models, split, tokenizer):
    """LLaMA, one checkpoint, block 1 only, count-sketched to 512 dimensions: the sketched
    influence is within 5 reported standard-deviation bounds of the exact one."""
    params = {TERMS: {"layers": [1], "projection_dim": 512}, TRACIN: {"default_learning_rate": 0.5}}
    res = analyze(models["llama"], data=split, metrics=[TRACIN], params=params,
                  config=RunConfig(batch_size=4, max_length=32, dtype="float64"))
    result = res.get(TRACIN)
    assert result.status == "ok", result.reason
    model = load_hf(models["llama"])
    names = [n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")]
    g_train = example_grads(model, tokenize(tokenizer, split["train"]), names)
    g_test = example_grads(model, tokenize(tokenizer, split["test"]), names)
    exact = 0.5 * g_train @ g_test.T
    scale = 0.5 * g_train.norm(dim=1)[:, None] * g_test.norm(dim=1)[None, :]
    bound = result.value("projection_error_bound")
    assert bound == pytest.approx((2 / 512) ** 0.5)
    got = res.tensor(TRACIN, "influence")
    assert ((got - exact).abs() <= 5 * bound * scale).all()
    assert 0 < result.value("projection_error") < 3 * bound
    # self-influence stays exact under projection (LLaMA's float32 rotary: rtol 1e-6)
    assert result.value("self_influence") == pytest.approx((0.5 * (g_train**2).sum(1)).tolist(), rel=1e-6)
    assert result.values["checkpoints"].rows[0][2:] == [0.5, "default"]


def test_skipped_without_train_and_test_tasks(models, texts):
    res = analyze(models["gpt2"], data={"a": texts}, metrics=[TRACIN], config=RunConfig(batch_size=4))
    terms = res.get(TERMS, model=res.models[0])
    assert terms.status == "skipped" and "needs named tasks 'train'" in terms.reason
    assert res.get(TRACIN).status == "skipped"
    assert f"dependency '{TERMS}' skipped" in res.get(TRACIN).reason


def test_critical_samples_finds_planted_opponent_and_outlier(planted):
    """GPT-2 with planted pairs: training example 0 = [c_0, z_0] has exactly the opposite
    gradient of test example 0 = [c_0, y_0]; training example 1 = [c_1, w] asks for a token the
    model gives ~0 probability where the planted rows are huge, so its gradient is ~100x
    larger than the others'. The other training examples are ordinary."""
    p = planted["gpt2"]
    k = p.k
    train = torch.cat([p.b[:1], torch.tensor([[int(p.a[1, 0]), p.spare[20]]]), p.a[k:]])  # 2 + 9 examples
    test = torch.cat([p.a[:1], p.b[k + 1:k + 4]])
    res = analyze(p.folder, data={"train": train, "test": test}, metrics=[CRITICAL],
                  params={CRITICAL: {"learning_rates": [1.0]}}, config=RunConfig(batch_size=4))
    result = res.get(CRITICAL)
    assert result.status == "ok", result.reason
    assert [r[0] for r in result.values["negative_influence"].rows] == [0]
    assert [r[0] for r in result.values["high_self_influence"].rows] == [1]
    text = result.values["diagnosis"].text
    assert text.startswith("sample 0 has negative influence on the test set: check for corrupted or mislabelled")
    assert "sample 1 has unusually high self-influence" in text
