"""First-party adapters; registered with the plugin manager by the core's built-in plugin."""

from .base import Adapter
from .bert import BertAdapter
from .generic import GenericAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .neox import NeoXAdapter

BUILTIN_ADAPTERS: tuple[Adapter, ...] = (GPT2Adapter(), LlamaAdapter(), NeoXAdapter(), BertAdapter())

__all__ = ["Adapter", "BUILTIN_ADAPTERS", "BertAdapter", "GPT2Adapter", "GenericAdapter", "LlamaAdapter",
           "NeoXAdapter"]
