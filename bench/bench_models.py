"""The bench models (random init, seeded, eager attention) and their random token data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class BenchSize:
    """How big a bench run is: the models' shape and the data (batches x batch size x length)."""

    quick: bool
    batch_size: int
    seq_len: int
    n_batches: int
    reps: int


FULL = BenchSize(quick=False, batch_size=4, seq_len=64, n_batches=2, reps=4)
QUICK = BenchSize(quick=True, batch_size=4, seq_len=32, n_batches=2, reps=3)


def gpt2_model(quick: bool, seed: int = 0) -> Any:
    """GPT-2 small shape (12 layers, d 768, 12 heads, vocab 50257); quick: 2 layers, d 128, 4 heads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, d, heads = (2, 128, 4) if quick else (12, 768, 12)
    config = GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=50257, n_positions=1024,
                        attn_implementation="eager")
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def llama_model(quick: bool, seed: int = 0) -> Any:
    """LLaMA shape of similar size: 12 layers, d 768, 12 query / 4 key-value heads (grouped-query),
    rotary, MLP 2048, vocab 32000, untied head; quick: 2 layers, d 128, 4 / 2 heads, MLP 512."""
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, d, heads, kv, mlp = (2, 128, 4, 2, 512) if quick else (12, 768, 12, 4, 2048)
    config = LlamaConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=mlp, vocab_size=32000,
                         max_position_embeddings=2048, tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


MODELS = {"gpt2-small-shape": gpt2_model, "llama-gqa-shape": llama_model}


def random_tokens(vocab_size: int, size: BenchSize, seed: int = 0) -> torch.Tensor:
    """[n_batches * batch_size, seq_len] token ids, uniform over the vocabulary, seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (size.n_batches * size.batch_size, size.seq_len), generator=gen)


def describe(model: Any) -> dict[str, Any]:
    config = model.config
    return {"class": type(model).__name__, "n_params": sum(p.numel() for p in model.parameters()),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "n_layers": config.num_hidden_layers, "d_model": config.hidden_size,
            "n_heads": config.num_attention_heads,
            "n_kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            "vocab_size": config.vocab_size}
