"""ModelView.attn_out: the attention output projection of every family, checked against the
per-head W_O of head_weights (its input is the heads' outputs concatenated head-major)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from core_helpers import FAMILIES, view_of

from tensorscope_core import GenericAdapter

pytestmark = pytest.mark.usefixtures("basic_only")


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_out_input_times_per_head_w_o_is_its_output(model_dirs: dict[str, Any], basic_registry: Any,
                                                         family: str) -> None:
    """out = sum_h z[..., h*d_head:(h+1)*d_head] @ W_O[h] + bias, and zeroing head h's slice
    of the input removes exactly z_h @ W_O[h] from the output (float64)."""
    view = view_of(model_dirs[family], basic_registry, dtype="float64")
    assert len(view.attn_out) == view.n_layers
    ids = torch.randint(4, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda m, a, out, layer=layer: seen.__setitem__(layer, (a[0], out)))
               for layer, m in enumerate(view.attn_out)]
    try:
        with torch.no_grad():
            view.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    dh = view.d_head
    for layer in range(view.n_layers):
        z, out = seen[layer]
        W_O = view.head_weights(layer).W_O
        bias = getattr(view.attn_out[layer], "bias", None)
        per_head = [z[..., h * dh:(h + 1) * dh] @ W_O[h] for h in range(view.n_heads)]
        want = torch.stack(per_head).sum(0) + (0 if bias is None else bias)
        torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
        with torch.no_grad():
            z0 = z.clone()
            z0[..., dh:2 * dh] = 0
            torch.testing.assert_close(view.attn_out[layer](z0), out - per_head[1], atol=1e-10, rtol=0)


def test_generic_adapter_maps_attn_out_only_when_named(model_dirs: dict[str, Any], basic_registry: Any) -> None:
    common: dict[str, Any] = {"blocks": "model.layers", "attn": "self_attn", "mlp_out": "mlp.down_proj",
                              "n_heads": 4, "n_kv_heads": 2}
    named = view_of(model_dirs["llama"], basic_registry, adapter=GenericAdapter(attn_out="self_attn.o_proj",
                                                                                **common))
    assert named.attn_out[1] is named.model.model.layers[1].self_attn.o_proj
    assert view_of(model_dirs["llama"], basic_registry, adapter=GenericAdapter(**common)).attn_out == []
