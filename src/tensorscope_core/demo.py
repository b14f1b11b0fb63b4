"""The built-in demo: train a 2-layer model until its induction heads form, analyse the checkpoints.

Task: sequences of 16 uniform random tokens repeated once (vocabulary 64). The first
half is unpredictable (loss ln 64 = 4.16); once an induction head copies the token
that followed the previous occurrence, the second half becomes predictable and the
mean loss falls towards ln(64) / 2 = 2.08. Checkpoints before, during and after the
phase change are saved with ``save_pretrained`` and analysed with every installed metric.

The ``multitask`` recipe trains the same model on two tasks at once (``repeat``: the sequences
above; ``count``: a run of consecutive token ids, predictable from the previous token alone) and
analyses the last checkpoint in one run, per task: the Welford Fisher diagonal, the top-p% Fisher
masks, their overlap between the tasks, and the curvature triangulation (``fisher.triangulation``:
the diagonal's trace and the top eigenvalues of the full Fisher and of the Hessian by Lanczos, side by
side with their ratios and which agree).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from .api import analyze
from .config import RunConfig
from .errors import MissingDependencyError
from .plugins import get_registry
from .results import Results
from .scheduler.graph import resolve

VOCAB = 64
HALF = 16
CHECKPOINT_STEPS = (0, 25, 50, 75, 100, 300)
#: Demo-sized settings of the iterative metrics, whose defaults are sized for research runs (there, the
#: two Lanczos metrics alone take about 45 s per checkpoint of the demo model). Metrics of plugins that
#: are not installed are left out.
DEMO_PARAMS: dict[str, dict[str, Any]] = {
    "fisher.lanczos": {"k": 4, "max_iter": 16, "max_examples": 8},
    "hessian.lanczos": {"k": 4, "max_iter": 16, "max_examples": 8},
    # replayed forwards and backwards: demo-sized grids, probes, steps and rounds (each of these took
    # 25-70 s over the six checkpoints at its research default)
    "landscape.surface_2d": {"grid": 5, "max_batches": 1},
    "landscape.sharpness": {"ascent_steps": 2, "hutchinson_probes": 2, "max_batches": 1},
    "dynamics.signal_propagation": {"n_probes": 4, "max_batches": 1, "sv_tokens": 1},
    "dynamics.plasticity": {"k_steps": 5},
    "circuits.integrated_gradients": {"steps": 16, "chunk": 16},
    "information.mdl": {"max_tokens": 1024, "probe_max_iter": 30},
    "lottery.imp": {"steps": 5, "rounds": 2},
    # probe what the model was trained on: a random block of HALF tokens repeated, with no BOS (the
    # default probe, BOS plus 31 positions, repeats with period 15 and finds duplicate-token heads instead)
    "circuits.head_scores": {"sequence_length": HALF, "bos": "never"},
    # the demo's headline: where the loss and the layers' induction scores change
    "dynamics.phase_transitions": {"series": ["basic.loss.loss", "circuits.head_scores.induction_max"]},
    # fewer resamples and null graphs than research runs use (each metric else takes ~5 s per checkpoint)
    "information.mutual_information": {"n_bootstrap": 20},
    "information.pid": {"n_bootstrap": 10},
    "structure.modularity": {"n_permutations": 9, "max_edges": 1024},
    # the multitask recipe's curvature triangulation: the three estimators it runs anyway
    "fisher.triangulation": {"estimators": ["fisher.diagonal", "fisher.lanczos", "hessian.lanczos"]},
}


Sequences = Callable[[int, torch.Generator], torch.Tensor]


def demo_params(metrics: str | Sequence[str]) -> dict[str, dict[str, Any]]:
    """DEMO_PARAMS of the metrics a run computes (those asked for and what they need)."""
    computed = {node.name for node in resolve(metrics, {}, get_registry())}
    return {m: p for m, p in DEMO_PARAMS.items() if m in computed}


def repeated_sequences(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 2*HALF] token ids: HALF random tokens, then the same tokens again."""
    first = torch.randint(0, VOCAB, (n, HALF), generator=generator)
    return torch.cat([first, first], dim=1)


def counting_sequences(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 2*HALF] token ids: a random start, then each next id one more (mod VOCAB)."""
    start = torch.randint(0, VOCAB, (n, 1), generator=generator)
    return (start + torch.arange(2 * HALF)) % VOCAB


def mixed_sequences(n: int, generator: torch.Generator) -> torch.Tensor:
    """The multitask recipe's training batches: half repeated, half counting sequences."""
    return torch.cat([repeated_sequences(n - n // 2, generator), counting_sequences(n // 2, generator)])


def demo_model() -> Any:
    """2-layer LLaMA-style model: rotary positions, d=64, 4 heads, eager attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2 * HALF,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config)


def demo_tokenizer() -> Any:
    """The checkpoints' tokenizer: token i is the number ``i`` written out, so ``"3 17 42 3 17 42"`` is
    ids 3, 17, 42, 3, 17, 42 and the checkpoints take text as well as token ids. Anything else is id 0,
    the model's pad/BOS/EOS id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({str(i): i for i in range(VOCAB)}, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="0", pad_token="0")


def train(out: Path, steps: Sequence[int] = CHECKPOINT_STEPS, seed: int = 0, batch_size: int = 64,
          lr: float = 3e-3, log: Callable[[str], None] = print,
          sequences: Sequences = repeated_sequences) -> dict[str, Path]:
    """Train with AdamW on batches of ``sequences``, saving a checkpoint folder at each of ``steps``;
    returns name -> folder."""
    torch.manual_seed(seed)
    model = demo_model()
    model.config._attn_implementation = "eager"
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    tokenizer = demo_tokenizer()
    checkpoints: dict[str, Path] = {}
    for step in range(max(steps) + 1):
        if step in steps:
            folder = out / "checkpoints" / f"step-{step:04d}"
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            checkpoints[f"step-{step:04d}"] = folder
        if step == max(steps):
            break
        ids = sequences(batch_size, generator)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            log(f"  step {step:4d}  training loss {loss.item():.3f}")
    return checkpoints


def run_demo(out: str | Path, *, steps: Sequence[int] | None = None, seed: int = 0,
             metrics: str | Sequence[str] | None = None, log: Callable[[str], None] = print,
             reports: bool = True, recipe: Literal["induction", "multitask"] = "induction") -> Results:
    """Run a recipe: ``induction`` (every checkpoint, every installed metric by default) or
    ``multitask`` (the last checkpoint, the recipe's Fisher and curvature metrics by default)."""
    if recipe == "multitask":
        return run_multitask(out, steps=steps or MULTITASK_STEPS, seed=seed, metrics=metrics or MULTITASK_METRICS,
                             log=log, reports=reports)
    steps = steps or CHECKPOINT_STEPS
    metrics = metrics or "all"
    out = Path(out)
    log(f"training the demo model (2 layers, 4 heads) on repeated random sequences; checkpoints at {list(steps)}")
    checkpoints = train(out, steps, seed=seed, log=log)
    data = repeated_sequences(64, torch.Generator().manual_seed(seed + 1))  # held out from training
    out.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": data}, str(out / "data.safetensors"))
    log(f"analysing {len(checkpoints)} checkpoints with metrics: {metrics}")
    results = analyze({name: str(path) for name, path in checkpoints.items()}, data=data, metrics=metrics,
                      params=demo_params(metrics),
                      config=RunConfig(seed=seed, batch_size=16, max_length=2 * HALF,
                                       cache_dir=out / ".cache"))
    results.save(out)
    for model in results.record.models:
        loss = model.metrics.get("basic.loss")
        shown = f"loss {loss.value('loss'):.3f}" if loss is not None and loss.ok else ""
        failed = [n for n, r in model.metrics.items() if r.status == "error"]
        log(f"  {model.name}: {shown}" + (f"  errors: {failed}" if failed else ""))
    log(f"wrote {out / 'results.json'} and {out / 'results.csv'}; the analysis data is {out / 'data.safetensors'}")
    if reports:
        write_available_reports(results, out, log)
    return results


#: the multitask recipe's training (its last checkpoint is analysed) and metrics: fisher.triangulation sets
#: the diagonal's trace and the Fisher and Hessian Lanczos eigenvalues side by side in one result
MULTITASK_STEPS = (0, 300)
MULTITASK_METRICS = ("basic.loss", "fisher.diagonal", "fisher.masks", "fisher.overlap", "fisher.lanczos",
                     "hessian.lanczos", "fisher.triangulation")
TASKS = {"repeat": repeated_sequences, "count": counting_sequences}


def run_multitask(out: str | Path, *, steps: Sequence[int] = MULTITASK_STEPS, seed: int = 0,
                  metrics: str | Sequence[str] = MULTITASK_METRICS, log: Callable[[str], None] = print,
                  reports: bool = True, n_per_task: int = 32,
                  params: dict[str, dict[str, Any]] | None = None) -> Results:
    """Two tasks in one run: per-task Welford Fisher -> masks -> overlap, and the curvature three ways."""
    out = Path(out)
    log(f"training the demo model on two tasks ({', '.join(TASKS)}); checkpoints at {list(steps)}")
    checkpoints = train(out, steps, seed=seed, log=log, sequences=mixed_sequences)
    last = list(checkpoints)[-1]
    gen = torch.Generator().manual_seed(seed + 1)
    data = {task: make(n_per_task, gen) for task, make in TASKS.items()}  # held out from training
    out.mkdir(parents=True, exist_ok=True)
    save_file({f"{task}/input_ids": ids for task, ids in data.items()}, str(out / "data.safetensors"))
    installed = get_registry().metrics
    asked = [m for m in ([metrics] if isinstance(metrics, str) else metrics) if m in installed or "*" in m]
    log(f"analysing {last} per task with: {', '.join(asked)}")
    results = analyze({last: str(checkpoints[last])}, data=data, metrics=asked,
                      params={**demo_params(asked), **(params or {})},
                      config=RunConfig(seed=seed, batch_size=16, max_length=2 * HALF, cache_dir=out / ".cache"))
    results.save(out)
    for line in multitask_summary(results):
        log(line)
    log(f"wrote {out / 'results.json'} and {out / 'results.csv'}")
    if reports:
        write_available_reports(results, out, log)
    return results


def multitask_summary(results: Results) -> list[str]:
    """Per-task loss and Fisher trace, the masks' overlap, and the curvature triangulation."""
    metrics = results.model().metrics
    lines = []
    for task in TASKS:
        loss, diag = metrics.get("basic.loss"), metrics.get("fisher.diagonal")
        parts = [f"loss {loss.value(f'loss/{task}'):.3f}" if loss is not None and loss.ok else "",
                 f"Fisher trace {diag.value(f'true_trace/{task}'):.4g}" if diag is not None and diag.ok else ""]
        lines.append(f"  {task}: " + "  ".join(p for p in parts if p))
    overlap = metrics.get("fisher.overlap")
    if overlap is not None and overlap.ok:
        a, b = TASKS
        lines.append(f"  mask overlap {a}/{b}: Jaccard {overlap.value(f'jaccard_overall/{a}/{b}'):.3f}")
    triangulation = metrics.get("fisher.triangulation")
    if triangulation is not None and triangulation.ok:
        lines.append("  curvature triangulation (trace, top eigenvalue):")
        for row in triangulation.values["estimates"].rows:  # type: ignore[union-attr]
            estimator, matrix, trace, top1, kind = row[0], row[1], row[5], row[6], row[7]
            shown = "  ".join(p for p in (f"trace {trace:.4g}" if trace is not None else "",
                                          f"top {top1:.4g} ({kind})" if top1 is not None else "") if p)
            lines.append(f"    {estimator} [{matrix}]: {shown}")
        lines.append(f"    pairs: {triangulation.value('n_agree'):.0f} agree or consistent, "
                     f"{triangulation.value('n_disagree'):.0f} disagree")
    return lines


def write_available_reports(results: Results, out: Path, log: Callable[[str], None]) -> None:
    """HTML and PDF reports where their optional dependencies are installed (both from one render); a
    note where not (without weasyprint or pango the HTML is still written)."""
    from .report import generate_pdf_report

    html = out / "report.html"
    try:
        pdf = generate_pdf_report(results, out / "report.pdf", html=html)
        log(f"wrote {html}")
        log(f"wrote {pdf}")
    except MissingDependencyError as exc:
        if html.exists():
            log(f"wrote {html}")
        log(f"report not written: {exc.problem} (fix: {exc.fix})")
