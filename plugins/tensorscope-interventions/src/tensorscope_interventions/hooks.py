"""Adding a vector to the residual stream at one position of a (hook-free) model view.

Position l < n_layers is the stream entering block l (a forward pre-hook on that block), position
n_layers the stream leaving the last block (a forward hook on it), the positions of the core's
``resid`` artifact. The hooks go on ``hook_free_view(view)``'s blocks, so the run's capture hooks
never see the steered forwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from tensorscope_core.plugin_api import ModelView


def _shifted(hidden: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return hidden + delta.to(device=hidden.device, dtype=hidden.dtype)


@contextmanager
def added_to_resid(view: ModelView, position: int, delta: torch.Tensor) -> Iterator[None]:
    """Within the block, every forward of ``view``'s model has ``delta`` [d_model] added to the residual
    stream at ``position`` (0 .. n_layers), at every token."""
    if not 0 <= position <= view.n_layers:
        raise ValueError(f"residual position {position} is outside 0..{view.n_layers}")
    if position < view.n_layers:

        def pre(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (_shifted(args[0], delta), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": _shifted(kwargs["hidden_states"], delta)}

        handle = view.blocks[position].register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def post(module: Any, args: tuple, output: Any) -> Any:
            if isinstance(output, torch.Tensor):
                return _shifted(output, delta)
            return (_shifted(output[0], delta), *output[1:])

        handle = view.blocks[-1].register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()
