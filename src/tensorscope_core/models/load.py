"""Turn what the user names (module, HF folder, state dict, GGUF) into a checked ModelView."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError, NonFiniteWeightsError, UnsupportedModelError, UsageError
from ..quiet import no_loading_bars
from .adapters import Adapter
from .view import ModelView

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """A model to analyse: a path or module, plus a base config for bare state dicts."""

    source: str | os.PathLike[str] | nn.Module
    base_config: str | os.PathLike[str] | None = None
    name: str | None = None
    #: a folder with a config.json and no weights is built on the ``meta`` device (planning only)
    config_only_ok: bool = False

    @property
    def display_name(self) -> str:
        return self.name or self.where

    @property
    def where(self) -> str:
        """The path as given (a module: its class name), for messages about loading it."""
        if isinstance(self.source, nn.Module):
            return type(self.source).__name__
        return str(self.source).rstrip("/")


def files_signature(src: ModelSource) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime) of the files a model is loaded from (a module passed in: none), to tell
    whether they changed between planning the model and running it."""
    if isinstance(src.source, nn.Module):
        return ()
    path = Path(src.source)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return tuple((str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in files if p.exists())


def _is_masked_lm(config: Any) -> bool:
    return any(a.endswith("ForMaskedLM") for a in (getattr(config, "architectures", None) or [])) or \
        getattr(config, "model_type", "") in {"bert", "roberta"}


def _auto_class(config: Any) -> Any:
    """The Auto class with the language-model head TensorScope measures through (causal or masked);
    an architecture with neither (T5, ViT, ...) is refused here, before transformers lists its classes."""
    import transformers

    cls = transformers.AutoModelForMaskedLM if _is_masked_lm(config) else transformers.AutoModelForCausalLM
    if type(config) not in cls._model_mapping:
        raise UnsupportedModelError(
            f"'{getattr(config, 'model_type', type(config).__name__)}' models have no causal or masked "
            "language-model head in transformers: TensorScope measures decoder LMs and masked-LM encoders",
            "load the model yourself and pass the nn.Module to analyze() with an adapter (GenericAdapter "
            "naming its blocks, attention and MLP modules)")
    return cls


def _read_config(folder: Path) -> Any:
    """``folder/config.json`` through transformers; a damaged or unknown config as ModelLoadError."""
    from transformers import AutoConfig

    _refuse_remote_code(folder)
    try:
        return AutoConfig.from_pretrained(folder, **HF_SAFE)
    except (OSError, ValueError, KeyError) as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ModelLoadError(f"{folder / 'config.json'} cannot be read: {first_line}",
                             "write it again with model.config.save_pretrained(folder) (it must be JSON naming "
                             "a model_type transformers ships)") from exc


#: every Hugging Face loading call: local files only, and never code from the model's folder
#: (``trust_remote_code`` left unset makes transformers ask on standard input, and a "y" runs it)
HF_SAFE = {"local_files_only": True, "trust_remote_code": False}


def _refuse_remote_code(folder: Path) -> None:
    """A config whose classes live in the folder's own Python files (``auto_map``) is refused
    before transformers sees it: TensorScope never runs code from a model folder."""
    config = folder / "config.json"
    try:
        asks = config.exists() and "auto_map" in json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError):
        return  # a corrupt config.json is reported by the loader itself
    if asks:
        raise UnsupportedModelError(
            f"{folder} defines its model in Python files of its own (auto_map in config.json); TensorScope "
            "never runs code from a model folder (trust_remote_code is refused)",
            "use an architecture transformers ships, or load the model yourself (trusting its code) and pass "
            "the nn.Module to analyze() with an adapter (GenericAdapter)")


def _load_tokenizer(folder: Path) -> Any:
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, **HF_SAFE)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"tokenizer files in {folder} could not be read: {exc}",
                             "repair or remove the tokenizer files, or pass token ids as data") from exc


@dataclass(frozen=True)
class Dispatch:
    """How accelerate spreads a model folder over devices (``RunConfig.device_map`` and friends)."""

    device_map: str | dict[str, int | str]
    max_memory: dict[str, str | int] | None
    offload_dir: Path | None
    dtype: str

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        memory = None if self.max_memory is None else {
            (int(k) if str(k).isdigit() else k): v for k, v in self.max_memory.items()}
        return {"device_map": self.device_map, "max_memory": memory, "torch_dtype": _DTYPES[self.dtype],
                "offload_folder": None if self.offload_dir is None else str(self.offload_dir)}


def _from_hf_folder(folder: Path, dispatch: Dispatch | None = None) -> tuple[nn.Module, Any]:
    config = _read_config(folder)
    auto = _auto_class(config)
    extra = {} if dispatch is None else dispatch.from_pretrained_kwargs()
    try:
        with no_loading_bars():
            model = auto.from_pretrained(folder, attn_implementation="eager", **HF_SAFE, **extra)
    except Exception as exc:
        if dispatch is not None and "offload" in str(exc):
            raise ModelLoadError(f"accelerate could not place {folder} with device_map={dispatch.device_map!r}: {exc}",
                                 "give an offload dir (--offload-dir DIR) for what goes to disk, or more --max-memory"
                                 ) from exc  # missing or corrupt files (OSError, ValueError, SafetensorError, ...)
        raise ModelLoadError(f"could not load a Hugging Face model from {folder}: {exc}",
                             "check that the folder holds config.json and model weights "
                             "(save it with model.save_pretrained(folder))") from exc
    return model, _load_tokenizer(folder)


#: files that hold a Hugging Face folder's weights
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.safetensors.index.json")


def has_weights(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS)


#: the attribute that marks a module built from a config.json alone (``ModelView.from_config``)
FROM_CONFIG = "_tensorscope_from_config"


def _empty_from_config(folder: Path) -> tuple[nn.Module, Any]:
    """The model a config.json describes, its parameters on the ``meta`` device (shapes and dtypes,
    no storage): enough to plan a model that is not here, a 70B one included, in a second."""
    config = _read_config(folder)
    auto = _auto_class(config)
    try:
        config._attn_implementation = "eager"
        with torch.device("meta"):
            model = auto.from_config(config, attn_implementation="eager")
    except Exception as exc:
        raise ModelLoadError(f"could not build a model from {folder / 'config.json'}: {exc}",
                             "check that config.json names an architecture transformers ships") from exc
    setattr(model, FROM_CONFIG, True)
    return model, _load_tokenizer(folder)


def is_meta(model: nn.Module) -> bool:
    """Whether the model's parameters have no storage (built from a config, or released)."""
    first = next(model.parameters(), None)
    return first is not None and first.is_meta


def _from_state_dict(path: Path, base_config: Path | None) -> tuple[nn.Module, Any]:
    config_dir = base_config if base_config is not None else path.parent
    if config_dir.is_file():
        config_dir = config_dir.parent
    if not (config_dir / "config.json").exists():
        raise ModelLoadError(f"{path.name} is a bare state dict and no config.json was found in {config_dir}",
                             "pass base_config='folder/with/config.json' (CLI: --base-config)")
    config = _read_config(config_dir)
    config._attn_implementation = "eager"
    model = _auto_class(config).from_config(config, attn_implementation="eager")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle that is more than tensors
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ModelLoadError(f"{path} could not be read as a state dict: {type(exc).__name__}: {first_line}",
                             "save it with safetensors.torch.save_file(model.state_dict(), path) or with "
                             "torch.save(model.state_dict(), path); .pt files load with weights_only=True") from exc
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold a state dict", "save it with torch.save(model.state_dict(), path)")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes
        raise ModelLoadError(f"{path.name} does not match the config in {config_dir}: {exc}",
                             "pass the base config the weights were saved from") from exc
    # A tied pair is one Parameter under two names; a file may hold either name (save_model keeps one).
    by_name = model.state_dict(keep_vars=True)
    loaded = {id(by_name[k]) for k in state if k in by_name}
    missing = [m for m in missing if id(by_name[m]) not in loaded]
    if missing or unexpected:
        raise ModelLoadError(f"{path.name} does not match the config in {config_dir}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}", "pass the base config the weights were saved from")
    return model, _load_tokenizer(config_dir)


def _from_gguf(path: Path) -> tuple[nn.Module, Any]:
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError("loading GGUF files needs the 'gguf' and 'accelerate' packages",
                             "pip install 'tensorscope[gguf]'") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with no_loading_bars():
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                         attn_implementation="eager", **HF_SAFE)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, **HF_SAFE)
    except Exception as exc:  # the gguf reader raises whatever a damaged file makes it meet
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ModelLoadError(f"{path} cannot be read as a GGUF model: {type(exc).__name__}: {first_line}",
                             "check the file is a complete GGUF of an architecture transformers converts "
                             "(llama, mistral, qwen2, gpt2, ...), or pass the Hugging Face folder instead") from exc
    return model, tokenizer


def _use_eager_attention(model: nn.Module) -> None:
    """Attention patterns and forward-mode AD need the eager kernel, not fused SDPA."""
    setter = getattr(model, "set_attn_implementation", None)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", "eager") != "eager":
        if setter is not None:
            setter("eager")
        else:
            config._attn_implementation = "eager"


def _planned_dispatch(folder: Path, dispatch: Dispatch) -> tuple[nn.Module, Any]:
    """The model a weightless folder describes (``_empty_from_config``) in the run's dtype, with the device
    map accelerate would give it in ``hf_device_map`` (transformers' rule: the memory balanced over the
    GPUs unless the map is "sequential", no block split), so that its plan counts what each device would
    hold. The map depends only on the shapes and ``max_memory``: the same as the weights' load gives."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    model, tokenizer = _empty_from_config(folder)
    model = model.to(dtype=_DTYPES[dispatch.dtype])
    placement = dispatch.device_map
    if isinstance(placement, str):
        memory = dispatch.from_pretrained_kwargs()["max_memory"]
        if memory is None:
            raise UsageError(f"planning {folder} spread over devices needs the memory of each device it will run on",
                             "name them: --max-memory 0=70GiB --max-memory cpu=200GiB "
                             "(RunConfig(max_memory={'0': '70GiB', 'cpu': '200GiB'}))")
        split = model._no_split_modules
        memory = get_max_memory(memory) if placement == "sequential" else get_balanced_memory(
            model, max_memory=memory, no_split_module_classes=split, low_zero=placement == "balanced_low_0")
        placement = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=split)
    model.hf_device_map = dict(placement)  # type: ignore[assignment]  # transformers sets it the same way
    return model, tokenizer


def load_module(src: ModelSource, dispatch: Dispatch | None = None) -> tuple[nn.Module, Any]:
    """Load the raw module and tokenizer (None when the model ships without one); ``dispatch``: spread
    a model folder over devices with accelerate (a folder with no weights, to be planned: placed as
    accelerate would place it)."""
    folder = Path(src.source) if isinstance(src.source, (str, os.PathLike)) else None
    if dispatch is not None and folder is not None and src.config_only_ok and (folder / "config.json").exists() \
            and not has_weights(folder):
        return _planned_dispatch(folder, dispatch)
    if dispatch is not None and not (folder is not None and folder.is_dir() and has_weights(folder)):
        raise UnsupportedModelError(
            f"device_map dispatches Hugging Face model folders; {src.where} is not one",
            "save the model with save_pretrained(folder), or dispatch the module yourself with accelerate "
            "(dispatch_model) and pass it without device_map")
    if isinstance(src.source, nn.Module):
        return src.source, None
    path = Path(src.source)
    if not path.exists():
        raise ModelLoadError(f"model source {path} does not exist", "pass a model folder, a weights file or a module")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json", "save the model with save_pretrained(folder)")
        if not has_weights(path):
            if src.config_only_ok:
                return _empty_from_config(path)
            raise ModelLoadError(f"{path} holds a config.json but no weights",
                                 f"`tensorscope plan {path}` plans a model from its config alone; analysing it "
                                 "needs its weights (save it with model.save_pretrained(folder))")
        return _from_hf_folder(path, dispatch)
    if path.suffix in (".safetensors", ".pt", ".bin"):
        return _from_state_dict(path, Path(src.base_config) if src.base_config else None)
    if path.suffix == ".gguf":
        return _from_gguf(path)
    raise ModelLoadError(f"cannot tell what kind of model {path} is",
                         "pass a Hugging Face folder, a .safetensors/.pt state dict or a .gguf file")


#: elements checked at once: ``isfinite`` of a whole embedding would hold several copies of it
_FINITE_CHUNK = 1 << 20


def _all_finite(tensor: torch.Tensor) -> bool:
    """A chunk's float64 sum is NaN or Inf exactly when the chunk holds one (float32 and narrower
    entries cannot overflow it), so one pass screens a chunk; float64 weights, whose sum can overflow,
    and a failed screen are checked entry by entry."""
    flat = tensor.detach().reshape(-1)
    for i in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[i:i + _FINITE_CHUNK]
        if chunk.dtype == torch.float64 or not bool(torch.isfinite(chunk.sum(dtype=torch.float64))):
            if not bool(torch.isfinite(chunk).all()):
                return False
    return True


def check_finite(model: nn.Module, skip_meta: bool = False) -> None:
    """NonFiniteWeightsError naming the parameters with NaN or Inf, checked a chunk at a time so the
    check adds megabytes, not a multiple of the largest weight, to the run's peak."""
    bad = [name for name, p in model.named_parameters() if not (skip_meta and p.is_meta) and not _all_finite(p)]
    if bad:
        raise NonFiniteWeightsError(f"{len(bad)} parameter tensor(s) hold NaN or Inf, first: {bad[:3]}",
                                    "check the checkpoint (a diverged run or a bad conversion); "
                                    "nothing was computed on it")


def choose_adapter(model: nn.Module, adapters: Sequence[Adapter]) -> Adapter:
    for adapter in adapters:
        if adapter.matches(model):
            return adapter
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    known = ", ".join(a.name for a in adapters)
    raise UnsupportedModelError(
        f"no adapter knows models of type '{kind}' (adapters installed: {known})",
        "pass adapter=GenericAdapter(blocks=..., attn=..., mlp_out=..., n_heads=...) naming its modules, "
        "or install a plugin that registers an adapter for it")


@contextmanager
def modules_restored(sources: Sequence[ModelSource]) -> Iterator[None]:
    """Put modules the caller passed in back as they were after a run: training flag,
    dtype and device, attention kernel and their .grad tensors (a run casts the module,
    switches it to eval and eager attention, and clears gradients). A module accelerate dispatched
    keeps its devices and dtype in a run, and accelerate refuses to move it, so it is not cast back."""
    saved = []
    for src in sources:
        if isinstance(src.source, nn.Module):
            module: Any = src.source
            first = next(module.parameters(), None)
            config = getattr(module, "config", None)
            saved.append((module, module.training, first.dtype if first is not None else None,
                          first.device if first is not None else None,
                          getattr(config, "_attn_implementation", None),
                          {n: p.grad for n, p in module.named_parameters()}))
    try:
        yield
    finally:
        for module, training, dtype, device, attn, grads in saved:
            if dtype is not None and not is_dispatched(module):
                module.to(dtype=dtype, device=device)
            module.train(training)
            if attn is not None and getattr(module.config, "_attn_implementation", attn) != attn:
                setter = getattr(module, "set_attn_implementation", None)
                if setter is not None:
                    setter(attn)
                else:
                    module.config._attn_implementation = attn
            for name, p in module.named_parameters():
                grad = grads.get(name)  # Module.to() cast these in place; float32 -> float64 -> float32 is exact
                p.grad = None if grad is None else grad.to(dtype=p.dtype, device=p.device)


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate spread the model over several devices or offloaded part of it (its own
    loader, or the caller's ``dispatch_model``)."""
    placed = getattr(model, "hf_device_map", None) or {}
    return len({str(d) for d in placed.values()}) > 1 or "disk" in {str(d) for d in placed.values()}


def load_model(src: ModelSource, adapters: Sequence[Adapter], *, dtype: str = "float32", device: str = "cpu",
               adapter: Adapter | None = None, tokenizer: Any = None, dispatch: Dispatch | None = None) -> ModelView:
    """Load, cast, check finiteness and map through an adapter; raises typed errors only."""
    try:
        module, found_tokenizer = load_module(src, dispatch)
    except UnsupportedModelError as exc:
        if "adapters installed" in exc.problem:
            raise
        raise UnsupportedModelError(f"{src.where}: {exc.problem} (adapters installed: "
                                    f"{', '.join(a.name for a in adapters)})", exc.fix) from exc
    _use_eager_attention(module)
    dispatched = is_dispatched(module)
    if dispatched:  # accelerate placed it: its devices and dtype stay; offloaded weights are checked as they load
        check_finite(module, skip_meta=True)
    elif is_meta(module):  # built from a config to be planned: shapes and dtype only
        module = module.to(dtype=_DTYPES[dtype])
    else:
        module = module.to(dtype=_DTYPES[dtype], device=device)
        check_finite(module)
    module.eval()
    chosen = adapter or choose_adapter(module, adapters)
    try:
        view = chosen.build(module, src.display_name, tokenizer or found_tokenizer)
    except UnsupportedModelError:
        raise
    except (AttributeError, KeyError, TypeError) as exc:
        raise UnsupportedModelError(f"adapter '{chosen.name}' could not map {type(module).__name__}: {exc}",
                                    "use GenericAdapter with this model's module names") from exc
    if dispatched:
        view.device_map = dict(getattr(module, "hf_device_map", {}))
    view.from_config = getattr(module, FROM_CONFIG, False)
    return view


_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
                torch.float16: "float16"}


@contextmanager
def model_view(model: nn.Module | ModelView, adapter: Adapter | None = None) -> Iterator[ModelView]:
    """A ModelView of ``model`` through the installed adapters, in the model's own dtype and device,
    for functional APIs used outside a run (a ModelView passes through unchanged).

    Loading switches the module to eval mode and eager attention (forward-mode AD does not run
    through the fused SDPA kernel); all of that is put back on exit.
    """
    if isinstance(model, ModelView):
        yield model
        return
    from ..plugins import get_registry

    first = next(model.parameters())
    source = ModelSource(model)
    with modules_restored([source]):
        yield load_model(source, get_registry().adapters, dtype=_DTYPE_NAMES[first.dtype], device=str(first.device),
                         adapter=adapter)


def release(view: ModelView) -> None:
    """Free a loaded model's parameters and buffers, keeping its structure, names, shapes and
    config (on PyTorch's ``meta`` device), and drop what was derived from them (hook-free copies)."""
    view.extras.clear()
    view.model.to("meta")
