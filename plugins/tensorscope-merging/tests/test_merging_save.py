"""Writing a merged model: complete or not at all, folder or bare state dict, loadable by the core."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorscope_merging.save import save_merged

from tensorscope_core import ModelSource
from tensorscope_core.models.load import load_model
from tensorscope_core.plugins import get_registry


@pytest.fixture
def view(models):
    return load_model(ModelSource(models["gpt2"]), get_registry().adapters)


def _shifted(view, by: float) -> dict[str, torch.Tensor]:
    return {n: p.detach() + by for n, p in view.model.named_parameters()}


def test_folder_and_file_reload_with_the_merged_weights(view, models, tmp_path: Path) -> None:
    weights = _shifted(view, 0.5)
    folder = save_merged(view, weights, tmp_path / "merged")
    file = save_merged(view, weights, tmp_path / "merged.safetensors")
    for source in (ModelSource(folder), ModelSource(file, base_config=models["gpt2"])):
        back = dict(load_model(source, get_registry().adapters).model.named_parameters())
        assert all(torch.equal(back[n].detach(), w) for n, w in weights.items())
    assert (folder / "tokenizer.json").exists()


def test_an_existing_folder_is_replaced_whole(view, tmp_path: Path) -> None:
    target = tmp_path / "merged"
    save_merged(view, _shifted(view, 0.1), target)
    (target / "stale.txt").write_text("from an older merge")
    save_merged(view, _shifted(view, 0.2), target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary left beside it


def test_a_failed_write_leaves_nothing(view, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(view.model), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_merged(view, _shifted(view, 0.1), tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []
