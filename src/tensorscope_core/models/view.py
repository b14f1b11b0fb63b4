"""ModelView: one vocabulary for every architecture, so metrics never touch model internals."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class HeadWeights:
    """Per-head attention weights in the ``x @ W`` convention.

    ``W_Q``: [n_heads, d_model, d_head]; ``W_K``, ``W_V``: [n_kv_heads, d_model, d_head];
    ``W_O``: [n_heads, d_head, d_model]. Query head ``h`` reads key/value head
    ``kv_head_of[h]`` (grouped-query attention). Biases are None where absent.
    """

    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor
    b_Q: torch.Tensor | None
    b_K: torch.Tensor | None
    b_V: torch.Tensor | None
    kv_head_of: tuple[int, ...]

    def expanded(self) -> HeadWeights:
        """K and V repeated to one per query head."""
        index = torch.tensor(self.kv_head_of)
        b_K = None if self.b_K is None else self.b_K[index]
        b_V = None if self.b_V is None else self.b_V[index]
        return HeadWeights(self.W_Q, self.W_K[index], self.W_V[index], self.W_O, self.b_Q, b_K, b_V,
                           tuple(range(len(self.kv_head_of))))


@dataclass(frozen=True)
class ParameterEntries:
    """Which entries of one parameter a view of it covers, kept apart from the parameter's data.

    ``name`` as in ``model.named_parameters()``, the parameter's ``numel``, and the view's ``shape``,
    ``stride`` and ``offset`` into it. A dispatched model's weights are loaded copies that live only
    while read, so a metric that indexes gradients or Fisher values per head keeps these instead of
    the views (``ModelView.parameter_entries``, ``ModelView.head_entries``).
    """

    name: str
    numel: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def index(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[shape] positions of the view's entries in the flattened parameter (``device="meta"``: the shape
        and strides alone, for sizing without listing billions of entries)."""
        return torch.arange(self.numel, device=device).as_strided(self.shape, self.stride, self.offset)


@dataclass(frozen=True)
class HeadEntries:
    """``HeadWeights`` as ``ParameterEntries``: the same fields, shapes and strides."""

    W_Q: ParameterEntries
    W_K: ParameterEntries
    W_V: ParameterEntries
    W_O: ParameterEntries
    b_Q: ParameterEntries | None
    b_K: ParameterEntries | None
    b_V: ParameterEntries | None
    kv_head_of: tuple[int, ...]


def _entries_of(view: torch.Tensor, params: list[tuple[str, nn.Parameter]]) -> ParameterEntries:
    """The parameter ``view`` is a view of (its autograd base; else the parameter whose storage it shares)
    and the view's geometry in it."""
    base = view if view._base is None else view._base
    hit = next(((n, p) for n, p in params if p is base), None)
    if hit is None and not view.is_meta:  # an alias that is no autograd view (a detached parameter)
        ptr = view.untyped_storage().data_ptr()
        hit = next(((n, p) for n, p in params if not p.is_meta and p.untyped_storage().data_ptr() == ptr), None)
    if hit is None or not hit[1].is_contiguous():
        raise ValueError("the adapter's per-head weights and MLP projections must be views of the model's "
                         "(contiguous) parameters; this one returned a copy")
    name, p = hit
    return ParameterEntries(name, p.numel(), tuple(view.shape), tuple(view.stride()),
                            int(view.storage_offset() - p.storage_offset()))


@dataclass
class ModelView:
    """A loaded model plus the map of its parts that metrics and capture use.

    Built by an adapter. ``blocks[l]`` maps the residual stream in to out at layer l;
    ``mlp_out[l]`` is the module whose *input* is the MLP's hidden units; ``attn_out[l]`` is
    the attention output projection, whose *input* is the heads' outputs concatenated
    head-major ([..., n_heads * d_head], head h in columns h*d_head:(h+1)*d_head), so head
    interventions need no per-architecture knowledge (empty where the adapter does not map it).
    """

    model: nn.Module
    name: str
    family: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    vocab_size: int
    max_positions: int | None
    causal: bool
    rotary: bool
    embed: nn.Embedding
    blocks: list[nn.Module]
    attn: list[nn.Module]
    mlp_out: list[nn.Module]
    final_norm: nn.Module | None
    unembed: nn.Module | None
    head_weights_fn: Callable[[int], HeadWeights] | None = None
    tokenizer: Any = None
    config: Any = None
    mask_token_id: int | None = None
    pad_token_id: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    attn_out: list[nn.Module] = field(default_factory=list)
    #: True where the architecture flattens the tokens to [batch * seq, ...] around its MLP (OPT): hooks
    #: on ``mlp_out`` then see 2-D tensors; read them through ``mlp_tokens``
    mlp_tokens_flat: bool = False
    #: where accelerate placed each module (module name -> GPU index, "cpu" or "disk"); None: one device
    device_map: dict[str, Any] | None = None
    #: tied weights as built: the name of each parameter that is another, earlier one -> that one's name.
    #: Accelerate's forward on an offloaded module replaces its parameter objects, which unties an
    #: offloaded tied embedding, so identity no longer says which names are one tensor (``named_parameters``)
    tied_duplicates: dict[str, str] | None = None
    #: built from a config.json alone, to be planned (every tensor meta, no weights)
    from_config: bool = False
    #: values worked out from the model inside ``planning`` (key -> value); None outside it
    _memo: dict[Hashable, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tied_duplicates is None:
            first: dict[int, str] = {}
            duplicates = {}
            for name, p in self.model.named_parameters(remove_duplicate=False):
                if id(p) in first:
                    duplicates[name] = first[id(p)]
                first.setdefault(id(p), name)
            self.tied_duplicates = duplicates

    @contextmanager
    def planning(self) -> Iterator[None]:
        """Inside the block the model does not change: a plan asks the same sizes of it thousands of times
        (each a walk over every module), so ``memoised`` values are worked out once. A block inside another
        shares the outer one's values; they are dropped when the outer one ends."""
        if self._memo is not None:
            yield
            return
        self._memo = {}
        try:
            yield
        finally:
            self._memo = None

    def memoised(self, key: Hashable, compute: Callable[[], T]) -> T:
        """``compute()``, worked out once per ``key`` inside ``planning`` (every call outside it, where the
        model may have been cast, moved or dispatched since). Keys name the asker: a plugin prefixes its own."""
        if self._memo is None:
            return compute()
        if key not in self._memo:
            self._memo[key] = compute()
        value: T = self._memo[key]
        return value

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``model.named_parameters()`` with tied weights once, as the model was built, also after a
        dispatched model's forward has untied an offloaded tied embedding (see ``tied_duplicates``)."""
        tied = self.tied_duplicates or {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if name not in tied:
                yield name, p

    def mlp_tokens(self, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``tensor`` seen by a hook on ``mlp_out`` as [batch, seq, ...], ``like`` being any [batch, seq, ...]
        tensor of the same forward (its ids, or the residual stream): a no-op except where the architecture
        flattened the tokens (OPT)."""
        return tensor.reshape(*like.shape[:2], *tensor.shape[1:]) if self.mlp_tokens_flat else tensor

    @property
    def input_device(self) -> torch.device:
        """Where the model's inputs go: the embedding's execution device (on a dispatched model the
        embedding's own weight may be offloaded, a meta tensor)."""
        device = getattr(getattr(self.embed, "_hf_hook", None), "execution_device", None)
        return torch.device(device) if device is not None else self.embed.weight.device

    @contextmanager
    def onloaded(self, module: nn.Module) -> Iterator[nn.Module]:
        """``module`` (and its submodules) with its weights readable for the block's duration. A dispatched
        model's offloaded modules hold meta tensors outside their forward; accelerate loads them here
        (``align_module_device``, module by module: its hooks sit on the modules that own parameters) and
        offloads them again after. A plain model's modules are as they are."""
        if self.device_map is None:
            yield module
            return
        from accelerate.utils import align_module_device

        with ExitStack() as stack:
            for part in module.modules():
                stack.enter_context(align_module_device(part))
            yield module

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``model.named_parameters()`` detached and readable, tied duplicates once: a dispatched model's
        offloaded ones loaded one module at a time, each valid until the next is read."""
        tied = self.tied_duplicates or {}
        for prefix, module in self.model.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False)
                   if (f"{prefix}.{n}" if prefix else n) not in tied]
            if not own:
                continue
            with self.onloaded(module) if any(p.is_meta for _, p in own) else nullcontext(module):
                for name, _ in own:
                    yield f"{prefix}.{name}" if prefix else name, getattr(module, name).detach()

    def weight_of(self, module: nn.Module) -> torch.Tensor:
        """``module.weight``, detached and readable, to be read only: the model's own tensor, or where a
        dispatched model offloaded the module, the tensor accelerate loaded for the read (new memory, freed
        with the last reference: ``loaded_bytes``)."""
        return self._read(module, "weight")

    def read_parameter(self, name: str) -> torch.Tensor:
        """The parameter ``name`` (as in ``model.named_parameters()``), detached and readable like
        ``weight_of``: the model's own tensor, a loaded one where it is offloaded."""
        owner, _, attr = name.rpartition(".")
        return self._read(self.model.get_submodule(owner), attr)

    def _read(self, module: nn.Module, attr: str) -> torch.Tensor:
        with self.onloaded(module):
            tensor = getattr(module, attr, None)
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{type(module).__name__} has no {attr} tensor")
            return tensor.detach()

    def loaded_bytes(self, module: nn.Module, attr: str = "weight") -> int:
        """Bytes ``weight_of`` / ``read_parameter`` allocate for ``module``'s ``attr``: the loaded tensor of
        an offloaded one (planned from a config: where its map puts it), 0 for one the model holds."""
        tensor = getattr(module, attr, None)
        if self.device_map is None or not isinstance(tensor, torch.Tensor):
            return 0
        prefix = self._module_names[id(module)]
        name = f"{prefix}.{attr}" if prefix else attr
        name = (self.tied_duplicates or {}).get(name, name)  # a tied weight is offloaded where its first name is
        return tensor.numel() * tensor.element_size() if self.offloaded(name, tensor) else 0

    @functools.cached_property
    def _module_names(self) -> dict[int, str]:
        return {id(m): n for n, m in self.model.named_modules()}

    def head_weights(self, layer: int) -> HeadWeights:
        """Layer ``layer``'s per-head weight factors, to be read only (a dispatched model's offloaded
        attention loaded for the read)."""
        if self.head_weights_fn is None:
            raise NotImplementedError(f"the {self.family} adapter does not map per-head weights")
        if self.device_map is None:
            return self.head_weights_fn(layer)
        with self.onloaded(self.attn[layer]):
            weights = self.head_weights_fn(layer)
            return replace(weights, **{f.name: getattr(weights, f.name).detach() for f in fields(weights)
                                       if isinstance(getattr(weights, f.name), torch.Tensor)})

    def parameter_entries(self, module: nn.Module,
                          pick: Callable[[], Sequence[torch.Tensor | None]]) -> list[ParameterEntries | None]:
        """Which parameter entries each tensor that ``pick()`` returns covers (None stays None). ``pick``
        slices, reshapes or transposes ``module``'s weights (views, never copies) and runs while they are
        readable: a dispatched model's offloaded module is loaded for the call. The entries outlive it."""
        with self.onloaded(module):
            params = list(self.model.named_parameters())
            return [None if t is None else _entries_of(t, params) for t in pick()]

    def head_entries(self, layer: int) -> HeadEntries:
        """Layer ``layer``'s ``head_weights`` as the parameter entries they cover (also when dispatched, where
        ``head_weights`` returns copies)."""
        fn = self.head_weights_fn
        if fn is None:
            raise NotImplementedError(f"the {self.family} adapter does not map per-head weights")
        names = [f.name for f in fields(HeadWeights) if f.name != "kv_head_of"]
        read: list[HeadWeights] = []

        def pick() -> list[torch.Tensor | None]:
            read.append(fn(layer))
            return [getattr(read[0], n) for n in names]

        found = self.parameter_entries(self.attn[layer], pick)
        return HeadEntries(**dict(zip(names, found, strict=True)), kv_head_of=read[0].kv_head_of)  # type: ignore[arg-type]

    @property
    def kv_head_of(self) -> tuple[int, ...]:
        group = self.n_heads // self.n_kv_heads
        return tuple(h // group for h in range(self.n_heads))

    def layer_of_parameter(self) -> dict[str, int | None]:
        """Parameter name -> block index (None for parameters outside every block)."""
        owner: dict[int, int] = {}
        for layer, block in enumerate(self.blocks):
            for p in block.parameters():
                owner[id(p)] = layer
        return {name: owner.get(id(p)) for name, p in self.named_parameters()}

    @property
    def n_params(self) -> int:
        return sum(p.numel() for _, p in self.named_parameters())

    @property
    def every_param_bytes(self) -> int:
        """Bytes of every parameter (tied ones once), offloaded ones included: what a tensor per parameter
        (its gradient) holds."""
        return self.memoised("every_param_bytes",
                             lambda: sum(p.numel() * p.element_size() for _, p in self.named_parameters()))

    @property
    def param_bytes(self) -> int:
        """Bytes the weights hold while the model runs. Dispatched: the parameters not offloaded, plus
        the largest block's offloaded ones (accelerate loads one offloaded module at a time)."""
        return self.every_param_bytes if self.device_map is None else self._dispatched_param_bytes

    @functools.cached_property
    def _dispatched_param_bytes(self) -> int:
        """``param_bytes`` of a dispatched model, counted once (a plan asks thousands of times; where
        accelerate put each weight does not change after the load)."""
        resident = sum(p.numel() * p.element_size() for n, p in self.named_parameters() if not self.offloaded(n, p))
        return resident + self._largest_offloaded_block

    @functools.cached_property
    def _largest_offloaded_block(self) -> int:
        return max((self._offloaded_bytes(block) for block in self.blocks), default=0)

    def _offloaded_bytes(self, module: nn.Module) -> int:
        """Bytes of ``module``'s offloaded parameters (a tied one where its first name is placed)."""
        tied = self.tied_duplicates or {}
        named = module.named_parameters(prefix=self._module_names[id(module)], remove_duplicate=False)
        return sum(p.numel() * p.element_size() for n, p in named if self.offloaded(tied.get(n, n), p))

    def graph_weight_bytes(self, modules: Iterable[nn.Module], graphs: int = 1) -> int:
        """Bytes ``graphs`` graphs held at once through ``modules`` keep of a dispatched model's offloaded
        weights, beyond the one block ``param_bytes`` counts: accelerate loads an offloaded weight for each
        call of its module and drops it after, but autograd keeps the loaded tensor (a linear layer saves its
        weight for its input's gradient) until the backward reaches it. 0 for a plain model."""
        if self.device_map is None:
            return 0
        loaded = graphs * sum(self._offloaded_bytes(m) for m in modules)
        return max(loaded - self._largest_offloaded_block, 0)

    @property
    def planned_dispatch(self) -> bool:
        """A model built from its config alone (every tensor meta) with the device map accelerate would
        give it: where each weight would be is read from the map."""
        return self.from_config and self.device_map is not None

    def placement(self, name: str) -> Any:
        """Where the device map puts parameter ``name``: the entry of its longest module prefix (a GPU
        index, "cpu" or "disk"), "" without a map entry."""
        found = (self.device_map or {}).get("", "")
        best = -1
        for module, where in (self.device_map or {}).items():
            if (name == module or name.startswith(module + ".")) and len(module) > best:
                found, best = where, len(module)
        return found

    def main_placement(self) -> Any:
        """The device a dispatched model's inputs go to, by accelerate's rule: the map's first GPU, else
        the CPU."""
        return next((d for d in (self.device_map or {}).values() if d not in ("cpu", "disk")), "cpu")

    def offloaded(self, name: str, p: torch.Tensor) -> bool:
        """Whether accelerate keeps parameter ``name`` off its module (in the CPU's memory or on disk) and
        loads it for the module's forward: a meta tensor on a dispatched model. Planned from a config,
        where its map puts it: on disk, or in the CPU's memory while the inputs go to a GPU."""
        return name in self._planned_offload if self.planned_dispatch else p.is_meta

    @functools.cached_property
    def _planned_offload(self) -> frozenset[str]:
        """The parameters a planned map offloads (``offloaded``), found once: a plan asks for each many times."""
        gpu_run = self.main_placement() != "cpu"
        return frozenset(n for n, _ in self.named_parameters()
                         if self.placement(n) == "disk" or (gpu_run and self.placement(n) == "cpu"))

    @property
    def tied_embedding_bytes(self) -> int:
        """Bytes of the embedding when the output layer shares it (0 otherwise): a backward into the
        weights then makes two gradients of it, one from each use, and holds both and their sum at once
        (the autograd engine adds them before storing the weight's gradient)."""
        weight = self.embed.weight
        if self.unembed is None or getattr(self.unembed, "weight", None) is not weight:
            return 0
        return weight.numel() * weight.element_size()

    @property
    def dtype_bytes(self) -> int:
        return next(self.model.parameters()).element_size()

    def fingerprint(self) -> str:
        """Hash of parameter names, shapes, dtypes and values (identifies the weights).

        Tied tensors are hashed once; bytes go to the hash without an extra copy.
        """
        digest = hashlib.blake2b(digest_size=16)
        seen: set[tuple[int, int]] = set()
        modules = dict(self.model.named_modules()) if self.device_map is not None else {}
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
            if tensor.is_meta and modules:
                tensor = _offloaded_value(modules, name)
            key = (tensor.data_ptr(), tensor.numel())
            if key in seen or not tensor.numel():
                continue
            seen.add(key)
            data = tensor.detach().cpu().contiguous()
            digest.update(data.reshape(-1).view(torch.uint8).numpy())
        return digest.hexdigest()

    def dims(self) -> dict[str, int]:
        return {"n_layers": self.n_layers, "d_model": self.d_model, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "d_head": self.d_head, "d_mlp": self.d_mlp,
                "vocab_size": self.vocab_size, "n_params": self.n_params}


def _offloaded_value(modules: dict[str, nn.Module], name: str) -> torch.Tensor:
    """The value of an offloaded tensor ``name`` of a dispatched model, read through the weights map
    of the accelerate hook of the module that owns it (loaded from the offload folder)."""
    path, _, local = name.rpartition(".")
    hook = getattr(modules.get(path), "_hf_hook", None)
    for candidate in [hook, *getattr(hook, "hooks", ())]:
        weights = getattr(candidate, "weights_map", None)
        if weights is not None and local in weights:
            return weights[local]
    raise RuntimeError(f"{name} is offloaded and its accelerate hook holds no value for it")
