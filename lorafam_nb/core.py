"""The shared core: adapter configs, layer injection, merge/unmerge, accounting, save/load.

Every method in the book plugs in through the same three pieces:

* an :class:`AdapterConfig` subclass (a dataclass: the paper's hyperparameters, peft-style names),
  registered with :func:`register_method` so configs can be rebuilt from JSON;
* an :class:`AdapterLayer` subclass that wraps the frozen module it replaces (``base_layer``);
* optional training hooks the config hands to the trainer (:meth:`AdapterConfig.callbacks`,
  :meth:`AdapterConfig.param_groups`).

Three seams exist for the mixture-of-experts half of the book: a config may replace any module
type (a whole FFN block, not only ``nn.Linear``), the wrapped model forwards per-example side
information (e.g. ``task_ids``) to every adapter layer through a shared :class:`AdapterContext`,
and layers add auxiliary losses (load balance, contrastive) to that context for the trainer.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

if TYPE_CHECKING:
    from .trainer import Callback

__all__ = [
    "AdapterConfig",
    "AdapterContext",
    "AdapterLayer",
    "AdapterModel",
    "METHODS",
    "MethodCard",
    "METHOD_MODULES",
    "get_adapter_model",
    "import_methods",
    "count_parameters",
    "print_trainable_parameters",
    "register_method",
    "target_module_names",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"

METHODS: dict[str, type[AdapterConfig]] = {}
# The package's method modules, one per paper; each registers its config(s) when imported. A new
# method joins the registry (and everything built from it: loading, the overview table, the
# experiments grid) by adding its module name here.
METHOD_MODULES: tuple[str, ...] = (
    "lora", "lora_plus", "rslora", "vera", "lora_fa", "lora_drop", "adalora", "dora", "delta_lora", "plora",
    "qlora",
)


def register_method(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make a config findable by its ``method`` name (for loading from JSON)."""
    if not cls.method:
        raise ValueError(f"{cls.__name__} must set the class variable `method`")
    METHODS[cls.method] = cls
    return cls


def import_methods() -> dict[str, type[AdapterConfig]]:
    """Import every method module so that ``METHODS`` is complete; returns it."""
    for module in METHOD_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return METHODS


@dataclass(frozen=True)
class MethodCard:
    """What the book says about a method at a glance: one row of the overview table, one timeline point.

    ``date`` is the arXiv first version (``YYYY-MM``, the month the arXiv id's ``yymm`` names);
    ``params`` is the trainable-parameter count for one adapted ``d_out × d_in`` linear as LaTeX (MyST
    math), in ``r``, ``d_{in}``, ``d_{out}`` (AdaLoRA: ``r_{init}``) and agrees with the config's
    ``num_parameters``; ``params_note`` says what the formula leaves out. ``chapter`` is the chapter's
    document name (``book/chapters/<chapter>``, notebook ``notebooks/<chapter>.ipynb``) and ``bibkey``
    the key its paper has in the book's bibliography.
    """

    title: str
    paper: str
    arxiv: str
    date: str
    idea: str
    trains: str
    frozen: str
    mergeable: bool
    params: str
    chapter: str
    bibkey: str
    params_note: str = ""
    merge_note: str = ""


class AdapterContext:
    """State shared by all adapter layers of one model during one forward pass.

    ``side`` carries per-example side information (task ids, cluster ids) that the model's own
    forward signature knows nothing about; ``aux_losses`` collects the extra loss terms layers
    produce (named, so a training log can show each).
    """

    def __init__(self) -> None:
        self.side: dict[str, Any] = {}
        self.aux_losses: list[tuple[str, Tensor]] = []

    def add_aux_loss(self, name: str, value: Tensor) -> None:
        self.aux_losses.append((name, value))


class AdapterLayer(nn.Module):
    """Base class of every injected module: it owns the frozen module it replaces.

    Subclasses implement ``forward`` and, when the update is a weight delta, ``delta_weight``;
    merge/unmerge then work unchanged. Methods that are not mergeable (mixtures) leave
    ``delta_weight`` unimplemented and merging raises.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged = False
        # Set by AdapterModel; kept out of the module tree (it is not a submodule or a parameter).
        self.context = AdapterContext()

    def delta_weight(self) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} is not mergeable into a single weight")

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Everything the adapter adds (trainable or frozen), without the wrapped base module."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base_layer.")}


@dataclass
class AdapterConfig:
    """Fields every method shares (peft's names).

    ``target_modules``: a list of module-name suffixes (``"query"`` matches
    ``bert.encoder.layer.0.attention.self.query``), a regular expression that must match the whole
    name, or ``"all-linear"`` (every module of a replaceable type except the output embedding and
    ``modules_to_save``). ``modules_to_save``: modules trained in full alongside the adapter,
    typically the freshly initialised task head.
    """

    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] = field(default_factory=list)

    method: ClassVar[str] = ""
    layer_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)
    # Names of forward kwargs the wrapped model takes off the call and hands to layers as side info.
    side_inputs: ClassVar[tuple[str, ...]] = ()
    # peft interchange (see interop.py): peft's type name and our tensor name -> peft's tensor name.
    peft_type: ClassVar[str | None] = None
    peft_keys: ClassVar[dict[str, str]] = {}
    # The method's card for the overview page; every registered config sets its own (not inherited).
    card: ClassVar[MethodCard | None] = None
    # The size hyperparameter that sets the trainable-parameter count (what the experiments grid tunes
    # to match a budget through ``num_parameters``).
    budget_knob: ClassVar[str] = "r"

    def make_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        raise NotImplementedError

    def callbacks(self, model: AdapterModel) -> list[Callback]:
        """Training hooks this method needs (schedules, extra updates); none by default."""
        return []

    def param_groups(self, model: AdapterModel, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; one group of all trainable parameters by default."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def to_peft(self, target_modules: list[str]) -> dict[str, Any]:
        """peft's adapter_config.json for this adapter injected at ``target_modules``."""
        raise NotImplementedError(f"{self.method} has no peft equivalent")

    @classmethod
    def peft_matches(cls, peft_config: dict[str, Any]) -> bool:
        return peft_config.get("peft_type") == cls.peft_type

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any]) -> AdapterConfig:
        raise NotImplementedError(f"{cls.method} cannot read peft configs")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> AdapterConfig:
        data = dict(data)
        method = data.pop("method", None)
        if method not in METHODS and method in METHOD_MODULES:
            importlib.import_module(f"{__package__}.{method}")  # a method registers when its module loads
        if method not in METHODS:
            raise ValueError(f"unknown adapter method {method!r}; registered: {sorted(METHODS)}")
        cls = METHODS[method]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{method} config has unknown fields {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**data)


def _pattern(name: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``bert.encoder.layer.*.attention.self.query``."""
    return re.sub(r"\.\d+\.", ".*.", name)


def _modules_of_type(model: nn.Module, types: tuple[type[nn.Module], ...]) -> list[str]:
    return [n for n, m in model.named_modules() if n and isinstance(m, types)]


def _suffix_match(name: str, suffixes: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in suffixes)


def _saved_module_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Modules trained in full beside the adapter (``modules_to_save``, e.g. the task head)."""
    return [n for n, _ in model.named_modules() if n and _suffix_match(n, config.modules_to_save)]


def target_module_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules ``config`` would replace; raises ``ValueError`` if there are none."""
    candidates = _modules_of_type(model, config.layer_types)
    targets = config.target_modules
    if targets == "all-linear":
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        skip = {n for n, m in model.named_modules() if out_emb is not None and m is out_emb}
        heads = _saved_module_names(model, config)
        names = [n for n in candidates if n not in skip and not any(n == h or n.startswith(h + ".") for h in heads)]
    elif isinstance(targets, str):
        names = [n for n in candidates if re.fullmatch(targets, n)]
    else:
        names = [n for n in candidates if _suffix_match(n, targets)]
    # A pattern naming something of another type is a mistake the user should hear about.
    wrong = [n for n, m in model.named_modules() if isinstance(targets, list) and n
             and _suffix_match(n, targets) and not isinstance(m, config.layer_types)]
    if wrong:
        raise ValueError(f"{config.method} can only adapt {config.layer_types}; these targets are not: {wrong[:5]}")
    if not names:
        kinds = "/".join(t.__name__ for t in config.layer_types)
        found = sorted(dict.fromkeys(_pattern(n) for n in candidates))
        raise ValueError(
            f"target_modules={targets!r} matched no {kinds} module of {type(model).__name__}. "
            f"Its {kinds} modules are: {found}"
        )
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """The same line peft prints, so numbers can be compared at a glance."""
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


class AdapterModel(nn.Module):
    """A model with an adapter injected (peft's ``PeftModel`` counterpart).

    The base model is modified in place: targeted modules are replaced by adapter layers and every
    base parameter is frozen except those in ``modules_to_save``.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        self.model = model
        self.adapter_config = config
        self.context = AdapterContext()
        names = target_module_names(model, config)
        for p in model.parameters():
            p.requires_grad_(False)
        for name in names:
            layer = config.make_layer(name, model.get_submodule(name))
            layer.context = self.context
            _set_submodule(model, name, layer)
        for name in _saved_module_names(model, config):
            model.get_submodule(name).requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.context.side = {k: kwargs.pop(k) for k in self.adapter_config.side_inputs if k in kwargs}
        self.context.aux_losses = []
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    # --- inspection -------------------------------------------------------------------------
    def adapter_layers(self) -> dict[str, AdapterLayer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, AdapterLayer)}

    def aux_loss(self) -> Tensor | None:
        """Sum of the auxiliary losses the last forward produced (None when there were none)."""
        terms = [v for _, v in self.context.aux_losses]
        return torch.stack(terms).sum() if terms else None

    def print_trainable_parameters(self) -> None:
        print_trainable_parameters(self)

    # --- merge --------------------------------------------------------------------------------
    def merge(self) -> None:
        for layer in self.adapter_layers().values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.adapter_layers().values():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Fold every adapter into its base weight and return the plain model."""
        for name, layer in self.adapter_layers().items():
            layer.merge()
            _set_submodule(self.model, name, layer.base_layer)
        return self.model

    # --- save / load --------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        for name, layer in self.adapter_layers().items():
            state.update({f"{name}.{k}": v for k, v in layer.adapter_state_dict().items()})
        for name in _saved_module_names(self.model, self.adapter_config):
            state.update({f"{name}.{k}": v for k, v in self.model.get_submodule(name).state_dict().items()})
        return state

    def save_adapter(self, directory: str | Path) -> None:
        """Write ``adapter_config.json`` and ``adapter.safetensors`` (adapter + head only)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.adapter_config.to_dict(), indent=2))

    def load_adapter(self, directory: str | Path) -> None:
        """Load weights saved by :meth:`save_adapter`; validates everything before touching the model."""
        directory = Path(directory)
        saved = json.loads((directory / CONFIG_FILE).read_text())
        if saved.get("method") != self.adapter_config.method:
            raise ValueError(
                f"{directory} holds a {saved.get('method')!r} adapter; this model has {self.adapter_config.method!r}"
            )
        try:
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"cannot read {directory / WEIGHTS_FILE}: the file is corrupted or truncated ({err})") from err
        self.load_adapter_state_dict(tensors, source=str(directory))

    @torch.no_grad()
    def load_adapter_state_dict(self, tensors: dict[str, Tensor], source: str = "state dict") -> None:
        own = self.adapter_state_dict()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(f"{source} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        bad = [f"{k}: saved {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
               for k, v in own.items() if tensors[k].shape != v.shape]
        if bad:
            raise ValueError(f"{source} has wrong shapes: {bad[:5]}")
        for k, v in own.items():
            v.copy_(tensors[k])

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> AdapterModel:
        """Inject the adapter described in ``directory`` into ``model`` and load its weights."""
        config = AdapterConfig.from_dict(json.loads((Path(directory) / CONFIG_FILE).read_text()))
        adapted = cls(model, config)
        adapted.load_adapter(directory)
        return adapted


def get_adapter_model(model: nn.Module, config: AdapterConfig) -> AdapterModel:
    """Inject ``config``'s adapter into ``model`` (in place) and return the wrapper."""
    return AdapterModel(model, config)
