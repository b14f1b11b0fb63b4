"""Plans for models that are not here: a folder with only config.json is built on the meta device
(no storage), counted exactly and planned for a device and budget; analysing it is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig

from tensorscope_core import RunConfig, plan
from tensorscope_core.cli import main
from tensorscope_core.errors import ModelLoadError
from tensorscope_core.models.load import ModelSource, is_meta, load_model
from tensorscope_core.plugins import get_registry
from tensorscope_core.scheduler.plan import ModelPlan

pytestmark = pytest.mark.usefixtures("basic_only")

LLAMA_2_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
              "intermediate_size": 11008, "vocab_size": 32000}
LLAMA_2_70B = {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
               "intermediate_size": 28672, "vocab_size": 32000}


def _config_dir(root: Path, name: str, **fields: int) -> Path:
    folder = root / name
    LlamaConfig(**fields).save_pretrained(folder)
    assert [p.name for p in folder.iterdir()] == ["config.json"]  # no weights, no tokenizer
    return folder


@pytest.mark.parametrize(("fields", "n_params"), [(LLAMA_2_7B, 6_738_415_616), (LLAMA_2_70B, 68_976_648_192)],
                         ids=["llama-2-7b", "llama-2-70b"])
def test_a_config_alone_builds_the_model_on_meta_with_its_exact_size(tmp_path: Path, fields: dict[str, int],
                                                                     n_params: int) -> None:
    folder = _config_dir(tmp_path, "cfg", **fields)
    view = load_model(ModelSource(folder, config_only_ok=True), get_registry().adapters, dtype="bfloat16")
    assert is_meta(view.model)
    assert view.n_params == n_params  # the published parameter counts
    assert view.param_bytes == 2 * n_params
    assert view.n_layers == fields["num_hidden_layers"]


def test_plan_of_a_config_folder_for_a_gpu_budget(tmp_path: Path) -> None:
    folder = _config_dir(tmp_path, "llama7b", **LLAMA_2_7B)
    config = RunConfig(device="cuda", dtype="bfloat16", memory_budget="80GiB", batch_size=4, max_length=256)
    (p,) = plan(str(folder), None, ["basic.weight_norms", "basic.loss", "basic.grad_norms"], config=config)
    assert isinstance(p, ModelPlan)
    assert p.weights_bytes == 2 * 6_738_415_616 and p.budget_bytes == 80 * 2**30 and p.fits
    assert any("meta device" in n for n in p.notes)
    assert any("40 sequences of 256 token ids" in n for n in p.notes)  # synthetic data: no tokenizer
    assert [s.kind for s in p.passes] == ["weights", "forward+backward"]


def test_analysing_a_config_folder_is_refused_with_the_fix(tmp_path: Path) -> None:
    from tensorscope_core import analyze

    folder = _config_dir(tmp_path, "cfg", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, vocab_size=100)
    with pytest.raises(ModelLoadError, match="no weights") as info:
        analyze(str(folder), None, ["basic.weight_norms"])
    assert "tensorscope plan" in info.value.fix


def test_cli_plans_a_config_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _config_dir(tmp_path, "cfg", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, vocab_size=100)
    code = main(["plan", str(folder), "--metrics", "basic.loss", "--device", "cuda", "--memory-budget", "1GiB",
                 "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "meta device" in out and "budget 1.0 GiB (memory_budget)" in out and "fits" in out
