"""The harness plugin authors use in their tests: tiny models, cost and reference checks.

Everything here is offline: models are randomly initialised from small configs, saved
with ``save_pretrained`` and reloaded, with a word-level tokenizer built from the
built-in corpus.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .api import analyze
from .config import RunConfig
from .data import builtin_corpus, pad_rows
from .plugins import Registry, build_registry, get_registry, plugin_module, registry_in_use
from .results import Results
from .results.schema import MetricResult

FAMILIES = ("gpt2", "llama", "neox", "bert", "gemma3", "phi3", "qwen2", "qwen3", "mistral", "gptj", "opt")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[MASK]")

def tiny_tokenizer() -> Any:
    """A word-level tokenizer over the built-in corpus (about 400 tokens), fully offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(builtin_corpus(), trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", mask_token="[MASK]")

def tiny_config(family: str, vocab_size: int, n_layers: int = 2, d_model: int = 32, n_heads: int = 4) -> Any:
    """Config of a tiny model: GPT-2, LLaMA (grouped-query: 2 KV heads, rotary), GPT-NeoX, BERT, or one of
    the LLaMA-layout variants and other decoders (see ``_more_config``)."""
    import transformers as tf

    common = {"vocab_size": vocab_size, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 2}
    if family in _MORE:
        return _more_config(family, common, n_layers, d_model, n_heads)
    if family == "gpt2":
        return tf.GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=64, **common)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                              num_attention_heads=n_heads, num_key_value_heads=max(1, n_heads // 2),
                              max_position_embeddings=64, tie_word_embeddings=False, **common)
    if family == "neox":
        return tf.GPTNeoXConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                                num_attention_heads=n_heads, max_position_embeddings=64, **common)
    if family == "bert":
        return tf.BertConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                             num_attention_heads=n_heads, max_position_embeddings=64, **common)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")

_MORE = ("gemma3", "phi3", "qwen2", "qwen3", "mistral", "gptj", "opt")

def _more_config(family: str, common: dict[str, Any], n_layers: int, d_model: int, n_heads: int) -> Any:
    """Gemma-3 (multi-query, QK-norm, sliding window 4 on even layers), Phi-3 (fused QKV), Qwen2 (QKV
    biases), Qwen3 (QK-norm), Mistral (sliding window 4), all grouped-query; GPT-J (rotary on half of
    each head); OPT (pre-norm, learned positions, MLP on flattened tokens). Windows of 4 act on any
    sequence longer than 4 tokens."""
    import transformers as tf

    d_head = d_model // n_heads
    decoder = {"hidden_size": d_model, "intermediate_size": 2 * d_model, "num_hidden_layers": n_layers,
               "num_attention_heads": n_heads, "num_key_value_heads": max(1, n_heads // 2),
               "max_position_embeddings": 64, **common}
    if family == "gemma3":
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        return tf.Gemma3TextConfig(**{**decoder, "num_key_value_heads": 1}, head_dim=d_head,
                                   query_pre_attn_scalar=d_head, sliding_window=4, layer_types=layer_types)
    if family == "mistral":
        return tf.MistralConfig(**decoder, sliding_window=4, tie_word_embeddings=False)
    if family in ("phi3", "qwen2", "qwen3"):
        cls = {"phi3": tf.Phi3Config, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[family]
        return cls(**decoder, head_dim=d_head, tie_word_embeddings=False)
    if family == "opt":
        return tf.OPTConfig(hidden_size=d_model, ffn_dim=2 * d_model, num_hidden_layers=n_layers,
                            num_attention_heads=n_heads, max_position_embeddings=64, word_embed_proj_dim=d_model,
                            do_layer_norm_before=True, **common)
    return tf.GPTJConfig(n_embd=d_model, n_inner=2 * d_model, n_layer=n_layers, n_head=n_heads, n_positions=64,
                         rotary_dim=d_head // 2, **common)

def tiny_model(family: str, folder: str | Path, *, seed: int = 0, with_tokenizer: bool = True,
               **dims: int) -> Path:
    """Build a random tiny model of ``family``, save it (and a tokenizer) to ``folder``."""
    import transformers as tf

    tokenizer = tiny_tokenizer() if with_tokenizer else None
    folder = Path(folder)
    vocab = _loaded_vocab(family, tokenizer, folder) if tokenizer is not None else 64
    config = tiny_config(family, vocab, **dims)
    torch.manual_seed(seed)
    cls = tf.BertForMaskedLM if family == "bert" else tf.AutoModelForCausalLM
    model = cls(config) if family == "bert" else cls.from_config(config)
    if family == "opt":  # OPT starts its biases at zero; random ones let tests see the bias paths
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if pname.endswith(".bias"):
                    param.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder

#: a real 135M-parameter LLaMA-family model's shape (SmolLM-135M): 30 layers, d 576, 9 query and 3 key/value
#: heads, MLP 1536, vocabulary 49,152, tied embeddings
REAL_135M = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
             "intermediate_size": 1536, "vocab_size": 49152}


#: settings that let the metrics that need more data run on two tasks of 2 x 32 tokens (the memory audit's
#: data), and the model-set metrics on random models named base, a, b and c without training logs, with the
#: demo's settings for the rest (circuits.patching: a prompt pair of token ids, any vocabulary of 64 or more)
SMALL_DATA_PARAMS: dict[str, dict[str, Any]] = {
    "circuits.patching": {"clean": [[5, 9, 17, 33, 12, 40]], "corrupted": [[5, 9, 18, 33, 12, 40]], "answer": [21],
                          "wrong": [22]},
    "information.pid": {"k": 2, "target_classes": 2},
    "geometry.sample_outliers": {"k": 2},
    "structure.separability": {"folds": 2},
    "gradients.tracin": {"default_learning_rate": 1e-3},
    "gradients.critical_samples": {"default_learning_rate": 1e-3},
    "interventions.vectors": {"broken": "a", "healthy": "b"},
    "merging.mode_connectivity": {"endpoints": ["a", "b"]},
}


def real_shaped_llama(seed: int = 0, **shape: int) -> Any:
    """A random LLaMA with ``REAL_135M``'s shape (entries of ``shape`` override it), in eval mode: real
    models' memory and time without a download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**REAL_135M, **shape}, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _loaded_vocab(family: str, tokenizer: Any, folder: Path) -> int:
    """The vocabulary a loader will see: AutoTokenizer picks the family's own tokenizer class, which
    may add tokens (Qwen2's adds <|endoftext|>), so the embedding is sized for that."""
    from transformers import AutoTokenizer

    tiny_config(family, len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return len(AutoTokenizer.from_pretrained(folder))

def padded_batches(rows: Sequence[torch.Tensor], batch_size: int,
                   pad_token_id: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, attention_mask) batches of ``rows`` in order, right-padded as the core pads them."""
    return [pad_rows(rows[start:start + batch_size], pad_token_id) for start in range(0, len(rows), batch_size)]


@contextmanager
def temporary_plugin(name: str = "test-plugin", *, metrics: Sequence[type] = (), artifacts: Sequence[Any] = (),
                     adapters: Sequence[Any] = (),
                     report_sections: Sequence[tuple[str, Callable[..., Any]]] = (),
                     only_installed: Sequence[str] | None = None) -> Iterator[Registry]:
    """A registry of the installed plugins plus one more, named ``name``, that registers
    ``metrics``, ``artifacts``, ``adapters`` and ``report_sections`` (title, render); in use
    process-wide inside the block (so the CLI and ``analyze()`` see it) and also yielded, for
    ``analyze(..., registry=...)``.

    ``only_installed``: load only these installed plugins (distribution or entry-point names),
    as ``TENSORSCOPE_LOAD_PLUGINS`` would; default all. A plugin that fails to register (a bad
    metric class, say) is listed as broken in the registry, as an installed one would be.
    """
    hooks: dict[str, Any] = {}
    if metrics:
        hooks["register_metrics"] = lambda register: [register(m) for m in metrics]
    if artifacts:
        hooks["register_artifacts"] = lambda register: [register(a) for a in artifacts]
    if adapters:
        hooks["register_adapters"] = lambda register: [register(a) for a in adapters]
    if report_sections:
        hooks["register_report_sections"] = lambda register: [register(t, r) for t, r in report_sections]
    extra = [(name, plugin_module(name.replace("-", "_"), **hooks))]
    with _installed_selection(only_installed):
        registry = build_registry(extra_plugins=extra)
    with registry_in_use(registry):
        yield registry


@contextmanager
def _installed_selection(names: Sequence[str] | None) -> Iterator[None]:
    from .plugins import LOAD_ENV

    if names is None:
        yield
        return
    saved = os.environ.get(LOAD_ENV)
    os.environ[LOAD_ENV] = ",".join(names)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(LOAD_ENV, None)
        else:
            os.environ[LOAD_ENV] = saved


@contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny-model tests on one intra-op thread: they gain nothing from more, and on a
    busy 2-core machine spin-waiting threads make them several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def random_token_data(vocab_size: int, n: int = 8, length: int = 16, seed: int = 0) -> torch.Tensor:
    """Token ids [n, length] drawn uniformly (ids 4.. avoid the special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab_size, (n, length), generator=gen)

def run_metric(metric: str, model: Any, data: Any = None, params: dict[str, Any] | None = None,
               **config: Any) -> MetricResult:
    """Run one metric on one model and return its result (raising if it did not end ok)."""
    cfg = RunConfig(**{"batch_size": 4, "max_length": 32, **config})
    res = analyze(model, data=data, metrics=[metric], params={metric: params or {}}, config=cfg)
    result = res.get(metric)
    if result.status != "ok":
        raise AssertionError(f"{metric} ended {result.status}: {result.reason}")
    return result

def run_at_rung(model: Any, data: Any, metric: str, rung: str | None = None, *, config: RunConfig | None = None,
                **params: Any) -> tuple[Results, MetricResult]:
    """Run one metric pinned at a rung of its memory ladder (None: as asked) and check what a rung test
    always should: the result is ok, records that rung, and holds what it declared (within 15%)."""
    base = config or RunConfig(batch_size=4, max_length=32)
    res = analyze(model, data=data, metrics=[metric], params={metric: params},
                  config=base.model_copy(update={"rungs": {metric: rung} if rung else {}}))
    result = res.get(metric)
    if result.status != "ok":
        raise AssertionError(f"{metric} ended {result.status}: {result.reason}")
    if (result.rung.name if result.rung else None) != rung:
        raise AssertionError(f"{metric} ran at rung {result.rung}, not {rung!r}")
    check_declared_cost(result)
    return res, result


def smallest_micro_batch(model: Any, data: Any, metrics: Sequence[str], config: RunConfig) -> RunConfig:
    """``config`` with the memory budget of its plan at the smallest micro-batch (``min_micro_batch``), so a
    run splits every batch into micro-batches: for tests that micro-batching changes no value."""
    from .api import plan
    from .scheduler.plan import ModelPlan

    floor = plan(model, data, list(metrics), config=config.model_copy(update={"memory_budget": 1,
                                                                               "strict_budget": True}))[0]
    if not isinstance(floor, ModelPlan) or floor.micro_batch != config.min_micro_batch:
        raise AssertionError(f"the plan's smallest micro-batch is not {config.min_micro_batch}: {floor}")
    return config.model_copy(update={"memory_budget": floor.peak_bytes})


def check_declared_cost(result: MetricResult, rel_tol: float = 0.15) -> None:
    """Assert the declared state bytes are within ``rel_tol`` of what the metric held."""
    declared, measured = result.declared_bytes or 0, result.measured_bytes or 0
    if max(declared, measured) == 0:
        return
    if abs(declared - measured) > rel_tol * max(declared, measured):
        raise AssertionError(f"{result.metric}: declared {declared} bytes, held {measured} "
                             f"(tolerance {rel_tol:.0%})")

@contextmanager
def counting_model_calls(classes: Sequence[type]) -> Iterator[dict[str, int]]:
    """Count every call of these model classes' ``forward`` inside the block (by wrapping the
    class's ``forward``, independently of the run's own counter): a check that what a run
    recorded of its passes is what it did. Yields ``{class name: calls}``; copies of a model
    (the hook-free copy) are counted too, as they share its class."""
    counts = {c.__name__: 0 for c in classes}
    saved = {c: c.forward for c in classes}  # type: ignore[attr-defined]

    def wrapped(cls: type) -> Callable[..., Any]:
        original = saved[cls]

        def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            if type(self) is cls:
                counts[cls.__name__] += 1
            return original(self, *args, **kwargs)

        return forward

    try:
        for cls in classes:
            cls.forward = wrapped(cls)  # type: ignore[attr-defined]
        yield counts
    finally:
        for cls, forward in saved.items():
            cls.forward = forward  # type: ignore[attr-defined]


def check_declared_passes(result: MetricResult) -> None:
    """Assert the metric made exactly the whole-model passes it declared (``own_passes``): the
    calls of the model the run counted while it ran equal the declared count."""
    declared = sum(result.passes_declared.values())
    if result.model_calls is None or result.model_calls != declared:
        raise AssertionError(f"{result.metric}: declared {result.passes_declared} ({declared} passes), "
                             f"the run counted {result.model_calls} calls of the model")


def check_against_reference(result: MetricResult, field: str, reference: Callable[[], Any],
                            rtol: float = 1e-5, atol: float = 1e-8) -> None:
    """Assert ``result``'s field equals what an independent ``reference()`` computes."""
    got = torch.tensor(_as_floats(result.value(field)), dtype=torch.float64)
    want = torch.as_tensor(reference(), dtype=torch.float64).flatten()
    if got.shape != want.shape or not torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
        raise AssertionError(f"{result.metric}.{field}: got {got.tolist()}, reference {want.tolist()}")

def _as_floats(value: Any) -> list[float]:
    if isinstance(value, (int, float)) or value is None:
        return [math.nan if value is None else float(value)]
    flat: list[float] = []
    for v in value:
        flat += _as_floats(v)
    return flat

def check_roundtrip(results: Results, folder: str | Path) -> Results:
    """Save, reload and assert the record and tensors are unchanged."""
    results.save(folder)
    loaded = Results.load(folder)
    if loaded.record != results.record:
        raise AssertionError("results changed in a save/load round trip")
    for key, tensor in results.tensors.items():
        back = loaded.tensors[key]
        same = back.dtype == tensor.dtype and back.shape == tensor.shape and (
            torch.equal(back, tensor.cpu()) or (tensor.is_floating_point() and torch.allclose(
                back, tensor.cpu(), rtol=0, atol=0, equal_nan=True)))  # NaN marks "not applicable"
        if not same:
            raise AssertionError(f"tensor {key} changed in a save/load round trip")
    return loaded

__all__ = ["FAMILIES", "check_against_reference", "check_declared_cost", "check_declared_passes", "check_roundtrip",
           "counting_model_calls", "get_registry", "padded_batches", "random_token_data", "run_metric",
           "single_thread", "temporary_plugin", "tiny_config", "tiny_model", "tiny_tokenizer"]
