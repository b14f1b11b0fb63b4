"""Plans of models spread over devices, made from their config alone: a weightless folder with a
``device_map`` is placed as accelerate would place it, and the plan counts what each device would hold.
Known answers: the plan of the config equals the plan of the saved weights loaded with the same map
(every metric's declared state, rung and the peak), the "auto" map equals the one transformers makes
from the weights, and the weights held are counted by hand from the parameter shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tensorscope_core import RunConfig, plan
from tensorscope_core.errors import UsageError
from tensorscope_core.functional import offloaded_bytes
from tensorscope_core.models.load import Dispatch, ModelSource, load_model
from tensorscope_core.plugins import get_registry
from tensorscope_core.scheduler.plan import ModelPlan

CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     tie_word_embeddings=True)
#: layers 1 and 2 and the final norm on disk, the rest on the CPU
SPREAD = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
          "model.layers.3": "cpu", "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "cpu"}
DATA = [torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(i)) for i in range(8)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, LlamaForCausalLM]:
    """The same model twice: its config alone, and saved with its weights."""
    root = tmp_path_factory.mktemp("planned-dispatch")
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    model.save_pretrained(root / "weights")
    CONFIG.save_pretrained(root / "config")
    return root / "config", root / "weights", model


def _view(folder: Path, device_map: Any, max_memory: dict[str, str] | None, offload: Path | None,
          dtype: str = "float32") -> Any:
    return load_model(ModelSource(folder, config_only_ok=True), get_registry().adapters, dtype=dtype,
                      dispatch=Dispatch(device_map, max_memory, offload, dtype))


def _numel(model: torch.nn.Module, *prefixes: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))


def test_the_plan_of_the_config_is_the_plan_of_the_weights(folders: tuple[Path, Path, LlamaForCausalLM],
                                                           tmp_path: Path) -> None:
    config_dir, weights_dir, model = folders
    run = RunConfig(device_map=SPREAD, offload_dir=str(tmp_path / "offload"), memory_budget="1GiB", batch_size=2)
    (planned, *_), (loaded, *_) = (plan(str(f), DATA, "all", config=run) for f in (config_dir, weights_dir))
    assert isinstance(planned, ModelPlan) and isinstance(loaded, ModelPlan)
    # held: the CPU's embedding (tied to the head) and layers 0 and 3, and one offloaded layer while it runs
    held = _numel(model, "model.embed_tokens", "model.layers.0.", "model.layers.3.") + _numel(model, "model.layers.1.")
    assert planned.weights_bytes == loaded.weights_bytes == 4 * held
    assert planned.declared_state == loaded.declared_state
    assert planned.declared_transient == loaded.declared_transient
    assert planned.rungs == loaded.rungs and planned.left_out == loaded.left_out
    assert planned.peak_bytes == loaded.peak_bytes
    offloaded = _numel(model, "model.layers.1.", "model.layers.2.", "model.norm.")
    note = f"dispatched over cpu, disk by accelerate (device_map): {offloaded:,} of {model.num_parameters():,}"
    assert planned.notes[0].startswith(note) and loaded.notes[0].startswith(note)
    assert any("placed as accelerate would place it" in n for n in planned.notes)
    assert not any("meta device" in n for n in loaded.notes)


def test_an_auto_map_is_the_one_transformers_makes(folders: tuple[Path, Path, LlamaForCausalLM],
                                                   tmp_path: Path) -> None:
    config_dir, weights_dir, _ = folders
    for limit in ("150KiB", "400KiB"):
        memory = {"cpu": limit}
        planned = _view(config_dir, "auto", memory, tmp_path / "a")
        loaded = _view(weights_dir, "auto", memory, tmp_path / limit)
        assert planned.device_map == loaded.device_map
        assert "disk" in planned.device_map.values()
        assert planned.param_bytes == loaded.param_bytes
        assert offloaded_bytes(planned) == offloaded_bytes(loaded)


def test_a_gpu_map_planned_on_a_machine_without_one(folders: tuple[Path, Path, LlamaForCausalLM]) -> None:
    """Weights the map leaves in the CPU's memory are offloaded for a GPU run (loaded for their forward):
    the GPU holds its own weights and one such layer at a time."""
    config_dir, _, model = folders
    gpu_map = {**{k: 0 for k in SPREAD}, "model.layers.1": "cpu", "model.layers.2": "cpu"}
    view = _view(config_dir, gpu_map, None, None, dtype="bfloat16")
    on_cpu = _numel(model, "model.layers.1.", "model.layers.2.")
    assert view.param_bytes == 2 * (model.num_parameters() - on_cpu + _numel(model, "model.layers.1."))
    assert offloaded_bytes(view) == 2 * on_cpu  # what a run that needs every weight on the GPU loads
    run = RunConfig(device="cuda", dtype="bfloat16", memory_budget="1GiB", device_map=gpu_map)
    (p, *_) = plan(str(config_dir), DATA, ["basic.loss", "basic.weight_norms"], config=run)
    assert isinstance(p, ModelPlan) and p.weights_bytes == view.param_bytes
    assert p.notes[0].startswith(f"dispatched over 0, cpu by accelerate (device_map): {on_cpu:,} of")


def test_an_auto_map_needs_the_devices_memory(folders: tuple[Path, Path, LlamaForCausalLM]) -> None:
    with pytest.raises(UsageError, match="needs the memory of each device") as err:
        _view(folders[0], "auto", None, None)
    assert "--max-memory" in err.value.fix


@pytest.mark.parametrize("embedding_on", ["cpu", "disk"])
def test_weight_of_loads_only_what_is_offloaded_and_the_plan_counts_it(
        folders: tuple[Path, Path, LlamaForCausalLM], tmp_path: Path, embedding_on: str) -> None:
    """``weight_of`` reads a held module's own tensor (no copy: same storage) and loads an offloaded one
    (equal to the saved weight); ``loaded_bytes`` is what it allocates, 0 for a held one. The tied head is
    offloaded where the embedding is. The planned view (config alone) says the same as the loaded one."""
    config_dir, weights_dir, model = folders
    device_map = {**SPREAD, "model.embed_tokens": embedding_on, "lm_head": embedding_on}  # tied: placed together
    loaded = _view(weights_dir, device_map, None, tmp_path / "loaded")
    planned = _view(config_dir, device_map, None, tmp_path / "planned")
    embedding = model.model.embed_tokens.weight
    want = embedding.numel() * 4 if embedding_on == "disk" else 0
    for view in (loaded, planned):
        assert view.loaded_bytes(view.embed) == view.loaded_bytes(view.unembed) == want
        assert view.loaded_bytes(view.blocks[1].mlp.down_proj) == 4 * 64 * 128
        assert view.loaded_bytes(view.blocks[0].mlp.down_proj) == 0
    for module in (loaded.embed, loaded.unembed):
        weight = loaded.weight_of(module)
        torch.testing.assert_close(weight, embedding.detach(), rtol=0, atol=0)
        assert (weight.data_ptr() == module.weight.data_ptr()) == (embedding_on == "cpu")
    down = loaded.read_parameter("model.layers.1.mlp.down_proj.weight")
    torch.testing.assert_close(down, model.model.layers[1].mlp.down_proj.weight.detach(), rtol=0, atol=0)


def test_graph_weight_bytes_are_the_loaded_weights_autograd_keeps(
        folders: tuple[Path, Path, LlamaForCausalLM], tmp_path: Path) -> None:
    """A forward with a graph through a dispatched model keeps each offloaded weight accelerate loaded for it
    (saved for the backward): the saved tensors that are loaded weights, counted with a saved-tensors hook,
    are ``graph_weight_bytes`` of the modules the forward ran plus the one block ``param_bytes`` counts.
    The planned view says the same, and two graphs held at once keep two loads."""
    config_dir, weights_dir, model = folders
    loaded = _view(weights_dir, SPREAD, None, tmp_path / "loaded")
    planned = _view(config_dir, SPREAD, None, tmp_path / "planned")
    layer = 4 * _numel(model, "model.layers.1.")
    saved: dict[int, int] = {}
    held = {p.untyped_storage().data_ptr() for p in loaded.model.parameters() if not p.is_meta}
    offloaded = [p.detach() for n, p in model.named_parameters()
                 if n.startswith(("model.layers.1.", "model.layers.2."))]

    def pack(t: torch.Tensor) -> torch.Tensor:  # a loaded weight: equal to an offloaded one, not the model's
        if t.untyped_storage().data_ptr() not in held and any(
                w.shape == t.shape and torch.equal(w, t) or w.T.shape == t.shape and torch.equal(w.T, t)
                for w in offloaded):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    embeddings = loaded.model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loaded.model(inputs_embeds=embeddings).logits.sum().backward()
    modules = [*loaded.blocks, loaded.final_norm, loaded.unembed]
    planned_modules = [*planned.blocks, planned.final_norm, planned.unembed]
    assert sum(saved.values()) == 2 * layer + 4 * 64  # every weight of the two offloaded layers and the norm
    kept = sum(saved.values())
    assert loaded.graph_weight_bytes(modules) == planned.graph_weight_bytes(planned_modules) == kept - layer
    assert loaded.graph_weight_bytes(modules, graphs=2) == 4 * layer + 8 * 64 - layer
    assert loaded.graph_weight_bytes(loaded.blocks[3:]) == 0
    assert _view(weights_dir, None, None, None).graph_weight_bytes(modules) == 0
