"""Models spread over devices by accelerate (``device_map``): a tiny model with one block and the final
norm offloaded to disk, and one with the (tied) embedding and the other block offloaded, give the plain
run's values for every metric that supports dispatch, and every other metric ends skipped with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tensorscope_core import RunConfig, analyze, plan
from tensorscope_core.data import builtin_corpus
from tensorscope_core.errors import UnsupportedModelError
from tensorscope_core.models.load import Dispatch, ModelSource, load_model
from tensorscope_core.plugin_api import Metric, NoParams, ScalarValue
from tensorscope_core.plugins import get_registry
from tensorscope_core.results.schema import MetricResult
from tensorscope_core.scheduler.run import DISPATCH_SKIP
from tensorscope_core.testing import temporary_plugin, tiny_model

#: GPT-2 (two blocks): block 1 and the final norm on disk, the rest on the CPU
OFFLOADED = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h.0": "cpu",
             "transformer.h.1": "disk", "transformer.ln_f": "disk", "lm_head": "cpu"}
#: the token embedding (tied to the output layer) and block 0 on disk: what reads the embedding must load it
EMBEDDING_OFFLOADED = {"transformer.wte": "disk", "transformer.wpe": "cpu", "transformer.drop": "cpu",
                       "transformer.h.0": "disk", "transformer.h.1": "cpu", "transformer.ln_f": "cpu",
                       "lm_head": "disk"}
CONFIG = {"batch_size": 4, "max_batches": 2, "memory_budget": "8GiB"}
#: two tasks of the built-in corpus, named as the train / test metrics (TracIn terms) want them, so the
#: per-task metrics (sample and task conflicts, null space) run too
DATA = {"train": builtin_corpus()[:8], "test": builtin_corpus()[8:16]}
#: prompt pairs, so that circuits.patching runs (it needs them)
PARAMS = {"circuits.patching": {"clean": [[5, 6, 7, 8]], "corrupted": [[5, 9, 7, 8]], "answer": [6], "wrong": [9]}}


def _numbers(res: Any, name: str) -> dict[str, torch.Tensor]:
    """Every numeric field of a result (scalars, per-layer, per-head, series, tensors) in float64."""
    result: MetricResult = res.get(name)
    out = {}
    for field, value in result.values.items():
        if value.kind == "tensor":
            out[field] = res.tensor(name, field).double()
            continue
        raw = result.value(field) if value.kind == "scalar" else getattr(value, "values", None)
        if raw is not None:
            out[field] = torch.tensor(raw, dtype=torch.float64)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, list[str], Any]:
    """The plain run, the run with block 1 offloaded (every metric), and the run with the embedding offloaded
    (the metrics that support dispatch)."""
    root = tmp_path_factory.mktemp("dispatch")
    folder = tiny_model("gpt2", root / "gpt2")
    metrics = sorted(name for name, cls in get_registry().metrics.items() if cls.scope == "model")
    plain = analyze(str(folder), DATA, metrics, config=RunConfig(**CONFIG), params=PARAMS)
    dispatched = analyze(str(folder), DATA, metrics, params=PARAMS,
                         config=RunConfig(**CONFIG, device_map=OFFLOADED, offload_dir=root / "offload"))
    supported = [m for m in metrics if get_registry().metrics[m].supports_dispatch]
    embedding_offloaded = analyze(str(folder), DATA, supported, params=PARAMS, config=RunConfig(
        **CONFIG, device_map=EMBEDDING_OFFLOADED, offload_dir=root / "offload-embedding"))
    return plain, dispatched, metrics, embedding_offloaded


def test_the_model_really_is_offloaded(runs: tuple[Any, Any, list[str], Any], tmp_path: Path) -> None:
    """Both runs say what was offloaded, counting the parameters of the modules put on disk (the tied
    embedding once, though accelerate unties it)."""
    _, dispatched, _, embedding_offloaded = runs
    plain = dict(load_model(ModelSource(str(tiny_model("gpt2", tmp_path / "gpt2"))),
                            get_registry().adapters).named_parameters())
    for res, device_map in ((dispatched, OFFLOADED), (embedding_offloaded, EMBEDDING_OFFLOADED)):
        on_disk = [m for m, where in device_map.items() if where == "disk"]
        count = sum(p.numel() for n, p in plain.items() if any(n.startswith(f"{m}.") for m in on_disk))
        notes = " ".join(res.model().notes)
        assert "dispatched over cpu, disk" in notes
        assert f"{count:,} of {sum(p.numel() for p in plain.values()):,} parameters offloaded" in notes, notes


@pytest.mark.parametrize("where", ["block", "embedding"])
def test_metrics_that_support_dispatch_give_the_plain_values(runs: tuple[Any, Any, list[str], Any], where: str) -> None:
    plain, block_offloaded, metrics, embedding_offloaded = runs
    dispatched = block_offloaded if where == "block" else embedding_offloaded
    supported = [m for m in metrics if get_registry().metrics[m].supports_dispatch]
    assert supported == metrics  # every first-party per-model metric, as the user guide says
    assert sum(plain.get(m).ok for m in supported) >= 20
    per_example = ["fisher.diagonal", "fisher.masks", "gradients.layer_alignment", "gradients.sample_conflicts",
                   "gradients.tracin_terms", "interventions.null_space"]  # the core's per-example pass, dispatched
    param_grad = ["basic.grad_norms", "gradients.flow", "gradients.pathology", "gradients.task_conflict",
                  "fisher.natural_gradient"]  # the shared backward's param_grad, the offloaded weights' hooked
    weights = ["structure.modularity", "geometry.effective_rank", "information.mdl"]  # read through the view
    products = ["fisher.lanczos", "hessian.lanczos"]  # their own products through OneDeviceModel's loaded weights
    perturbed = ["landscape.sharpness", "landscape.surface_2d", "lottery.magnitude_masks",
                 "lottery.imp"]  # batch_loss on OneDeviceModel's loaded weights (trainable_model)
    heads = ["fisher.grouped", "fisher.spectrum", "fisher.hotspots", "fisher.triangulation",
             "circuits.qkov_interference"]  # per-head entries through view.head_entries
    own_copy = ["dynamics.fragility", "dynamics.signal_propagation",
                "dynamics.plasticity"]  # forwards, block calls and training steps on OneDeviceModel
    hooked = ["circuits.patching"]  # edited forwards through the model's own dispatching hooks
    assert all(plain.get(m).ok and m in supported
               for m in per_example + param_grad + weights + products + perturbed + heads + own_copy + hooked)
    for name in supported:
        a, b = plain.get(name), dispatched.get(name)
        if a.status == "skipped":  # too little data for it here (e.g. a plug-in estimate's sample floor)
            assert (b.status, b.reason) == (a.status, a.reason), name
            continue
        assert a.ok and b.ok, (name, b.reason)
        numbers_a, numbers_b = _numbers(plain, name), _numbers(dispatched, name)
        assert numbers_a.keys() == numbers_b.keys() and numbers_a, name
        for field, value in numbers_a.items():
            torch.testing.assert_close(numbers_b[field], value, rtol=1e-5, atol=1e-7, equal_nan=True,
                                       msg=lambda m, n=name, f=field: f"{n}.{f}: {m}")


class _ReadsWeights(Metric):
    """A plugin's metric that reads the parameters directly and does not declare ``supports_dispatch``."""

    name = "t.reads_weights"
    Params = NoParams
    artifacts = ("weights",)

    def finalize(self) -> dict[str, Any]:
        return {"sum": ScalarValue(value=float(sum(p.detach().sum() for p in self.view.model.parameters())))}


def test_a_metric_without_dispatch_support_is_skipped_saying_why(tmp_path: Path) -> None:
    """Every first-party per-model metric supports dispatch now; a plugin's that does not ends skipped with
    the reason on a dispatched model (and runs on the plain one), and the run's other metrics still run."""
    folder = tiny_model("gpt2", tmp_path / "gpt2")
    metrics = ["t.reads_weights", "basic.loss"]
    with temporary_plugin("t-weights", metrics=[_ReadsWeights], only_installed=["basic"]) as registry:
        plain = analyze(str(folder), DATA, metrics, config=RunConfig(**CONFIG), registry=registry)
        dispatched = analyze(str(folder), DATA, metrics, registry=registry, config=RunConfig(
            **CONFIG, device_map=OFFLOADED, offload_dir=tmp_path / "offload"))
    assert plain.get("t.reads_weights").ok
    skipped = dispatched.get("t.reads_weights")
    assert (skipped.status, skipped.reason) == ("skipped", DISPATCH_SKIP)
    assert dispatched.get("basic.loss").ok
    assert dispatched.get("basic.loss").value("loss") == pytest.approx(plain.get("basic.loss").value("loss"), rel=1e-6)


@pytest.mark.parametrize("device_map", [OFFLOADED, EMBEDDING_OFFLOADED], ids=["block", "embedding"])
def test_head_and_unit_entries_of_a_dispatched_model_index_its_weights(tmp_path: Path, device_map: Any) -> None:
    """The entries read from a dispatched model (its attention loaded from disk for the read) are the plain
    model's, and indexing the plain parameters with them gives the adapter's per-head weights exactly."""
    folder = tiny_model("gpt2", tmp_path / "gpt2")
    registry = get_registry()
    plain = load_model(ModelSource(str(folder)), registry.adapters)
    dispatched = load_model(ModelSource(str(folder)), registry.adapters, dispatch=Dispatch(
        device_map=device_map, max_memory=None, offload_dir=tmp_path / "offload", dtype="float32"))
    assert any(p.is_meta for p in dispatched.model.parameters())
    params = dict(plain.model.named_parameters())
    for layer in range(plain.n_layers):
        entries, weights = dispatched.head_entries(layer), plain.head_weights(layer)
        assert entries == plain.head_entries(layer)
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
            e = getattr(entries, name)
            assert torch.equal(params[e.name].detach().reshape(-1)[e.index()], getattr(weights, name)), name
        mlp = dispatched.mlp_out[layer]
        out = dispatched.parameter_entries(mlp, lambda m=mlp: [m.weight[1:3]])[0]
        assert out is not None and torch.equal(params[out.name].detach().reshape(-1)[out.index()],
                                               plain.mlp_out[layer].weight.detach()[1:3])


def test_a_module_the_caller_dispatched_runs_and_stays_dispatched(tmp_path: Path) -> None:
    """The fix the device_map refusal gives: dispatch the module yourself and pass it. The run gives the
    plain values, and the module comes back as it was (accelerate refuses to move an offloaded model, so
    the run must not cast it back), still dispatched and usable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_model("gpt2", tmp_path / "gpt2")
    metrics = ["basic.loss", "basic.grad_norms", "hessian.lanczos"]
    plain = analyze(str(folder), DATA, metrics, config=RunConfig(**CONFIG))
    module = AutoModelForCausalLM.from_pretrained(folder, device_map=OFFLOADED, offload_folder=str(tmp_path / "off"))
    module.train()
    res = analyze(module, DATA, metrics, config=RunConfig(**CONFIG), tokenizer=AutoTokenizer.from_pretrained(folder))
    assert "dispatched over cpu, disk" in " ".join(res.model().notes)
    for name in metrics:
        for field, want in _numbers(plain, name).items():
            torch.testing.assert_close(_numbers(res, name)[field], want, rtol=1e-5, atol=1e-7, msg=f"{name}.{field}")
    assert module.training and module.hf_device_map == OFFLOADED
    assert module.transformer.h[1].attn.c_attn.weight.is_meta  # still offloaded
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(module.eval()(ids).logits, AutoModelForCausalLM.from_pretrained(folder)(ids).logits)


def test_device_map_needs_a_model_folder(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    module = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="device_map dispatches Hugging Face model folders"):
        analyze(module, None, ["basic.loss"], config=RunConfig(device_map="auto"))


def test_cli_auto_device_map_offloads_what_the_cpu_limit_leaves_out(tmp_path: Path) -> None:
    from tensorscope_core.cli import main
    from tensorscope_core.results import Results

    folder = tiny_model("gpt2", tmp_path / "gpt2")
    common = ["analyze", str(folder), "--metrics", "basic.loss", "--batch-size", "4", "--max-batches", "2",
              "--memory-budget", "1GiB"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "auto"), "--device-map", "auto", "--max-memory", "cpu=60KB",
                 "--offload-dir", str(tmp_path / "offload")]) == 0
    plain, auto = Results.load(tmp_path / "plain"), Results.load(tmp_path / "auto")
    assert "disk" in " ".join(auto.model().notes)
    assert auto.get("basic.loss").value("loss") == pytest.approx(plain.get("basic.loss").value("loss"), rel=1e-6)


def test_a_shared_backward_on_a_dispatched_model_plans_every_weight_held(tmp_path: Path) -> None:
    """accelerate drops an offloaded weight after its module's call, but autograd keeps the loaded tensor for
    the backward: a metric on the shared backward (basic.grad_norms) plans the same peak dispatched as plain,
    every weight on the run device, while a forward-only one (basic.loss) plans less (one block's offloaded
    weights at a time). Measured by bench/memory_audit.py --dispatched: 1.2 GiB held, 0.84 GiB declared
    before, 1.0 GiB after."""
    folder = tiny_model("gpt2", tmp_path / "gpt2")
    spread = RunConfig(**CONFIG, device_map=OFFLOADED, offload_dir=tmp_path / "offload")
    for metric, same in (("basic.grad_norms", True), ("basic.loss", False)):
        plain = plan(str(folder), DATA, [metric], config=RunConfig(**CONFIG))[0]
        dispatched = plan(str(folder), DATA, [metric], config=spread)[0]
        assert dispatched.weights_bytes < plain.weights_bytes
        assert (dispatched.peak_bytes == plain.peak_bytes) is same, (metric, dispatched.peak_bytes, plain.peak_bytes)
