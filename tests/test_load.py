"""Every model source (HF folder, safetensors / .pt state dict plus base config, module)
loads to the same weights and gives the same numbers; bad sources are typed errors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from core_helpers import view_of

from tensorscope_core import ModelSource, RunConfig, analyze
from tensorscope_core.errors import ModelLoadError, NonFiniteWeightsError

pytestmark = pytest.mark.usefixtures("basic_only")

CFG = RunConfig(batch_size=4, max_length=32)


def _module(folder: Path) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    cls = transformers.BertForMaskedLM if config.model_type == "bert" else transformers.AutoModelForCausalLM
    return cls.from_pretrained(folder, local_files_only=True)


def _state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone: tied parameters share storage, which safetensors refuses to save twice
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def weight_files(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The GPT-2 (tied embeddings) and LLaMA weights as bare state dicts, away from any config."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("weights")
    files = {}
    for family in ("gpt2", "llama"):
        state = _state_dict(_module(model_dirs[family]))
        save_file(state, str(root / f"{family}.safetensors"))
        torch.save(state, root / f"{family}.pt")
        files[f"{family}.safetensors"] = root / f"{family}.safetensors"
        files[f"{family}.pt"] = root / f"{family}.pt"
    return files


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_source_gives_the_same_loss(model_dirs: dict[str, Path], weight_files: dict[str, Path],
                                          tokens: torch.Tensor, basic_registry: Any, family: str) -> None:
    folder = model_dirs[family]
    sources = {
        "folder": str(folder),
        "safetensors": ModelSource(weight_files[f"{family}.safetensors"], base_config=folder),
        "pt": ModelSource(weight_files[f"{family}.pt"], base_config=str(folder / "config.json")),
        "module": _module(folder),
    }
    fingerprints = {name: view_of(src, basic_registry).fingerprint() for name, src in sources.items()
                    if name != "module"}
    assert len(set(fingerprints.values())) == 1, fingerprints
    losses = {}
    for name, src in sources.items():
        res = analyze(src, data=tokens, metrics=["basic.loss", "basic.weight_norms"], config=CFG)
        assert res.get("basic.loss").ok, (name, res.get("basic.loss").reason)
        losses[name] = (res.get("basic.loss").value("loss"), res.get("basic.weight_norms").value("total_norm"),
                        res.model().fingerprint)
    assert len(set(losses.values())) == 1, losses
    # and the loss is what the model itself reports on each batch (mean over batches of
    # equal token counts = mean over tokens)
    module = _module(folder).eval()
    with torch.no_grad():
        direct = torch.stack([module(input_ids=tokens[i:i + 4], labels=tokens[i:i + 4]).loss
                              for i in range(0, 12, 4)]).mean()
    assert losses["folder"][0] == pytest.approx(float(direct), rel=1e-5)


def test_tied_weights_stay_tied_after_a_state_dict_load(model_dirs: dict[str, Path], weight_files: dict[str, Path],
                                                        basic_registry: Any) -> None:
    view = view_of(ModelSource(weight_files["gpt2.safetensors"], base_config=model_dirs["gpt2"]), basic_registry)
    assert view.model.lm_head.weight.data_ptr() == view.model.transformer.wte.weight.data_ptr()
    assert view.tokenizer is not None  # found beside the base config


def test_state_dict_from_a_folder_with_its_config(model_dirs: dict[str, Path], tmp_path: Path,
                                                  weight_files: dict[str, Path], basic_registry: Any) -> None:
    """A bare state dict next to a config.json needs no base_config."""
    shutil.copy(model_dirs["llama"] / "config.json", tmp_path / "config.json")
    shutil.copy(weight_files["llama.pt"], tmp_path / "w.pt")
    direct = view_of(model_dirs["llama"], basic_registry)
    assert view_of(tmp_path / "w.pt", basic_registry).fingerprint() == direct.fingerprint()


def test_state_dict_without_a_config_asks_for_base_config(weight_files: dict[str, Path], basic_registry: Any) -> None:
    with pytest.raises(ModelLoadError, match="base_config"):
        view_of(weight_files["llama.safetensors"], basic_registry)


def test_state_dict_of_another_model_is_refused(model_dirs: dict[str, Path], weight_files: dict[str, Path],
                                                basic_registry: Any) -> None:
    with pytest.raises(ModelLoadError, match="does not match the config"):
        view_of(ModelSource(weight_files["gpt2.safetensors"], base_config=model_dirs["llama"]), basic_registry)


def test_pt_file_is_loaded_weights_only(model_dirs: dict[str, Path], tmp_path: Path, basic_registry: Any) -> None:
    """A pickle that is more than plain tensors is refused (torch.load(weights_only=True)),
    without running its code, as a ModelLoadError."""
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "obj": _Unsafe()}, path)
    with pytest.raises(ModelLoadError, match="could not be read as a state dict") as info:
        view_of(ModelSource(path, base_config=model_dirs["gpt2"]), basic_registry)
    assert not _Unsafe.loaded
    assert "weights_only" in info.value.fix


class _Unsafe:
    loaded = False

    def __setstate__(self, state: Any) -> None:
        _Unsafe.loaded = True


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_corrupt_weight_file_is_a_model_load_error(model_dirs: dict[str, Path], tmp_path: Path,
                                                   basic_registry: Any, suffix: str) -> None:
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(ModelLoadError, match="could not be read as a state dict"):
        view_of(ModelSource(path, base_config=model_dirs["gpt2"]), basic_registry)


def test_state_dict_with_other_shapes_is_refused(model_dirs: dict[str, Path], tmp_path: Path,
                                                 basic_registry: Any) -> None:
    """Same parameter names, other sizes: a ModelLoadError, not a bare RuntimeError."""
    from safetensors.torch import save_file

    from tensorscope_core.testing import tiny_config

    wide = transformers.LlamaForCausalLM(tiny_config("llama", 340, d_model=48))
    save_file(_state_dict(wide), str(tmp_path / "wide.safetensors"))
    with pytest.raises(ModelLoadError, match="does not match the config"):
        view_of(ModelSource(tmp_path / "wide.safetensors", base_config=model_dirs["llama"]), basic_registry)


def test_non_finite_weights_are_refused(model_dirs: dict[str, Path], tmp_path: Path, tokens: torch.Tensor) -> None:
    module = _module(model_dirs["llama"])
    with torch.no_grad():
        module.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        analyze(module, data=tokens, metrics=["basic.loss"], config=CFG)
    module.save_pretrained(tmp_path / "nan")
    with torch.no_grad():
        module.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError):
        analyze(str(tmp_path / "nan"), data=tokens, metrics=["basic.weight_norms"], config=CFG)
    with pytest.raises(NonFiniteWeightsError):
        analyze(module, metrics=["basic.weight_norms"], config=CFG)


@pytest.mark.parametrize("make", [
    pytest.param(lambda tmp: tmp / "no_such_folder", id="missing path"),
    pytest.param(lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", id="folder without config"),
    pytest.param(lambda tmp: (tmp / "model.bin.txt").write_text("x") and tmp / "model.bin.txt", id="unknown file"),
])
def test_bad_sources_are_model_load_errors(tmp_path: Path, tokens: torch.Tensor, make: Any) -> None:
    with pytest.raises(ModelLoadError):
        analyze(str(make(tmp_path)), data=tokens, metrics=["basic.loss"], config=CFG)


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        analyze(str(missing), metrics=["basic.weight_norms"])
    assert str(missing) in str(info.value)


def test_models_as_a_named_mapping(model_dirs: dict[str, Path], tokens: torch.Tensor) -> None:
    res = analyze({"first": str(model_dirs["gpt2"]), "second": _module(model_dirs["gpt2"])}, data=tokens,
                  metrics=["basic.loss"], config=CFG)
    assert res.models == ["first", "second"]
    assert res.get("basic.loss", model="first").value("loss") == res.get("basic.loss", model="second").value("loss")


def test_corrupt_weights_in_a_folder_are_a_model_load_error(model_dirs: dict[str, Path], tmp_path: Path,
                                                            basic_registry: Any) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(model_dirs["gpt2"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])  # cut short, as by a killed download
    with pytest.raises(ModelLoadError, match="could not load a Hugging Face model"):
        view_of(folder, basic_registry)
    (folder / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError):
        view_of(folder, basic_registry)


def test_tied_state_dict_saved_with_save_model_loads(tmp_path) -> None:
    """safetensors' save_model keeps one name of a tied pair; either name must load."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    from tensorscope_core import ModelSource, RunConfig, analyze
    from tensorscope_core.testing import random_token_data, tiny_model

    folder = tiny_model("gpt2", tmp_path / "gpt2", with_tokenizer=False)
    model = AutoModelForCausalLM.from_pretrained(folder)
    safetensors.torch.save_model(model, str(tmp_path / "weights.safetensors"))
    kept = set(safetensors.torch.load_file(str(tmp_path / "weights.safetensors")))
    assert ("transformer.wte.weight" in kept) != ("lm_head.weight" in kept)
    data = random_token_data(64, n=4, length=8)
    config = RunConfig(batch_size=4)
    from_file = analyze(ModelSource(tmp_path / "weights.safetensors", base_config=folder), data, ["basic.loss"],
                        config=config).get("basic.loss").value("loss")
    from_folder = analyze(str(folder), data, ["basic.loss"], config=config).get("basic.loss").value("loss")
    assert from_file == from_folder


REMOTE_CODE = '''
from pathlib import Path
Path(__file__).with_name("CODE_RAN").write_text("the folder's Python file ran")
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "tensorscope-evil"
'''


def test_code_from_a_model_folder_never_runs(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A config with an unknown model_type and an auto_map pointing at the folder's own Python file:
    transformers would ask on stdin (trust_remote_code unset) and a piped "y" ran the file. The load is
    refused before that, with the reason, also with "y" on stdin and as a state dict's base config."""
    import json
    import subprocess
    import sys

    folder = tmp_path / "evil"
    shutil.copytree(model_dirs["gpt2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tensorscope-evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                                           "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(REMOTE_CODE)
    proc = subprocess.run([sys.executable, "-m", "tensorscope_core.cli", "analyze", str(folder), "--metrics",
                           "basic.loss", "--out", str(tmp_path / "out"), "--json"], input="y\ny\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    error = json.loads(proc.stdout)
    assert error["error"] == "UnsupportedModelError" and "trust_remote_code is refused" in error["problem"], error
    assert not (folder / "CODE_RAN").exists()
    assert not (tmp_path / "out").exists()
    weights = tmp_path / "weights.safetensors"
    shutil.copy(folder / "model.safetensors", weights)
    with pytest.raises(ModelLoadError, match="never runs code from a model folder"):
        analyze(ModelSource(str(weights), base_config=str(folder)), None, ["basic.weight_norms"])
    assert not (folder / "CODE_RAN").exists()
