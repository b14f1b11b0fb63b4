"""The README's examples run as written, in order, in a folder holding what they name.

The folder has what the demo leaves (`demo-out/checkpoints/step-0100`, `step-0300` in the demo's
format, with its tokenizer, and `demo-out/data.safetensors`; trained for 1 step instead of 300, which
changes values, not what runs) and the fine-tune example's `base/`, `ft-math/`, `ft-code/`. The two
install commands are what CI itself runs (.ci/run), so they are not run again here. Every `bash` line
runs through the shell; the `python` blocks run in one process, in order between them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tensorscope_core.demo import repeated_sequences, train
from tensorscope_core.testing import tiny_model

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.S)


def readme_steps() -> list[tuple[str, str]]:
    """(language, code) in README order: each bash line alone, each python block whole."""
    steps: list[tuple[str, str]] = []
    for language, code in BLOCK.findall(README.read_text()):
        if language == "python":
            steps.append(("python", code))
            continue
        steps.extend(("bash", line) for line in code.splitlines()
                     if line.strip() and not line.startswith("pip install"))
    return steps


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    demo = root / "demo-out"
    made = train(demo, steps=(0, 1), log=lambda _: None)
    for old, new in (("step-0000", "step-0100"), ("step-0001", "step-0300")):
        made[old].rename(demo / "checkpoints" / new)
    save_file({"input_ids": repeated_sequences(64, torch.Generator().manual_seed(1))},
              str(demo / "data.safetensors"))
    for seed, name in enumerate(("base", "ft-math", "ft-code")):
        tiny_model("gpt2", root / name, seed=seed)
    return root


def test_the_readme_names_the_commands_it_is_tested_on() -> None:
    steps = readme_steps()
    assert sum(language == "python" for language, _ in steps) == 2
    commands = [code.split()[1] for language, code in steps if language == "bash"]
    for command in ("analyze", "plan", "plugins", "metrics", "new-plugin", "export", "fim", "report"):
        assert command in commands, command


def test_every_readme_example_runs_as_written(folder: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TQDM_DISABLE": "1"}
    python_so_far: list[str] = []
    for language, code in readme_steps():
        if language == "python":  # each block runs after the ones before it, as in one session
            python_so_far.append(code)
            done = subprocess.run([sys.executable, "-c", "\n".join(python_so_far)], cwd=folder, env=env,
                                  capture_output=True, text=True)
        else:
            done = subprocess.run(["bash", "-c", code], cwd=folder, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{code}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert (folder / "out" / "report.html").exists() and (folder / "report.html").exists()
    assert (folder / "fim" / "fim_summary.csv").exists() and (folder / "merged" / "results.json").exists()
    assert (folder / "sweep" / "results.json").exists()
