"""First-party adapters; registered with the plugin manager by the core's built-in plugin."""

from .base import Adapter
from .bert import BertAdapter
from .generic import GenericAdapter
from .gpt2 import GPT2Adapter
from .gptj import GPTJAdapter
from .llama import Gemma3Adapter, LlamaAdapter, Phi3Adapter
from .neox import NeoXAdapter
from .opt import OPTAdapter

BUILTIN_ADAPTERS: tuple[Adapter, ...] = (GPT2Adapter(), LlamaAdapter(), Gemma3Adapter(), Phi3Adapter(),
                                         NeoXAdapter(), GPTJAdapter(), OPTAdapter(), BertAdapter())

__all__ = ["Adapter", "BUILTIN_ADAPTERS", "BertAdapter", "GPT2Adapter", "GPTJAdapter", "Gemma3Adapter",
           "GenericAdapter", "LlamaAdapter", "NeoXAdapter", "OPTAdapter", "Phi3Adapter"]
