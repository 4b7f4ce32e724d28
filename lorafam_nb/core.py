"""The shared core: adapter configs, layer injection, merge/unmerge, accounting, save/load.

Every method in the book plugs in through the same three pieces:

* an :class:`AdapterConfig` subclass (a dataclass: the paper's hyperparameters, peft-style names),
  registered with :func:`register_method` so configs can be rebuilt from JSON;
* an :class:`AdapterLayer` subclass that wraps the frozen module it replaces (``base_layer``);
* optional training hooks the config hands to the trainer (:meth:`AdapterConfig.callbacks`,
  :meth:`AdapterConfig.param_groups`).

Seams for methods beyond one linear at a time (the mixtures, VeRA, LoRA-drop):

* **Sites and a scope.** Injection hands :meth:`AdapterConfig.build_layer` a :class:`Site` (module
  name, block index, module type, input/output widths) and the model's :class:`AdapterScope`, one per
  adapted model, saved once: modules that several layers share (VeRA's random pair, LoRA-drop's
  shared pair, routers shared by depth) live there. :meth:`AdapterConfig.sites` may return whole
  feed-forward blocks (see :func:`lorafam_nb.models.ffn_blocks`), not only single linears.
* **Side inputs.** The wrapped model takes per-row side information (``task_ids``) off the forward
  call and hands it to every layer through the shared :class:`AdapterContext`.
* **Auxiliary losses.** Layers add named raw terms to the context; the config weighs each name
  (:meth:`AdapterConfig.aux_loss_weights`) and may compute model-level terms from the routing of the
  whole forward pass (:meth:`AdapterConfig.aux_loss_terms`); the trainer adds them and logs each.
* **Routing.** Mixture layers report each routing decision to the context's
  :class:`RoutingRecorder` (tokens per expert, router entropy, dropped tokens).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

# The registry of methods by name: its own module, which the results store's code fingerprint does not
# follow (adding a method changes no other run's numbers).
from .registry import METHOD_MODULES, METHOD_PATHS, METHODS, import_method, import_methods, register_method

if TYPE_CHECKING:
    from .experiment import RunSpec
    from .trainer import Callback

__all__ = [
    "AdapterConfig",
    "AdapterContext",
    "AdapterLayer",
    "AdapterModel",
    "AdapterScope",
    "block_index",
    "METHODS",
    "MethodCard",
    "METHOD_MODULES",
    "METHOD_PATHS",
    "get_adapter_model",
    "saved_module_names",
    "suffix_match",
    "read_json",
    "require_positive_ints",
    "read_tensors",
    "write_adapter_files",
    "import_methods",
    "count_parameters",
    "print_trainable_parameters",
    "register_method",
    "Route",
    "RoutingRecorder",
    "Site",
    "site_of",
    "site_type",
    "target_module_names",
]

CONFIG_FILE = "adapter_config.json"
BUDGET_TOLERANCE = 0.05  # a parameter budget counts as matched within ±5 %
WEIGHTS_FILE = "adapter.safetensors"

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


@dataclass
class LayerRouting:
    """What one mixture layer's router did since the last reset (all counts over non-padding tokens)."""

    tokens: Tensor  # (E,) tokens sent to each expert (a token counts once per expert it is routed to)
    mass: Tensor  # (E,) summed router probability per expert
    entropy: float = 0.0  # summed per-token router entropy (nats)
    n_tokens: int = 0
    dropped: int = 0  # (token, expert) assignments dropped, e.g. over an expert's capacity


class RoutingRecorder:
    """Per-layer routing statistics that mixture layers report on every forward pass.

    Tests read the counts (they sum to tokens × k for a top-k router); chapters plot
    :meth:`load_matrix` as a layer × expert heatmap; the trainer logs :meth:`summary` with each
    logged step and then resets. Recording is detached and costs one ``bincount`` per layer.
    """

    def __init__(self) -> None:
        self.layers: dict[str, LayerRouting] = {}

    def reset(self) -> None:
        self.layers = {}

    @torch.no_grad()
    def record(self, layer: str, probs: Tensor, selected: Tensor | None = None, dropped: int = 0) -> None:
        """``probs``: (T, E) router probabilities of the T (non-padding) tokens; ``selected``: (T, k)
        expert indices each token was routed to (None for a dense mixture: every expert, weighted), -1 for
        an assignment that was dropped (counted in ``dropped``, not as a token of any expert)."""
        probs = probs.detach().float()
        n_experts = probs.shape[-1]
        stats = self.layers.get(layer)
        if stats is None:
            zeros = torch.zeros(n_experts, dtype=torch.float64, device=probs.device)
            stats = self.layers[layer] = LayerRouting(zeros.clone(), zeros.clone())
        if selected is not None:
            chosen = selected[selected >= 0]
            stats.tokens += torch.bincount(chosen, minlength=n_experts).to(stats.tokens)
        stats.mass += probs.sum(0).to(stats.mass)
        stats.entropy += float(-(probs * probs.clamp_min(1e-12).log()).sum())
        stats.n_tokens += probs.shape[0]
        stats.dropped += int(dropped)

    def load_matrix(self) -> tuple[list[str], Tensor]:
        """(layer names, (layers × E) share of each layer's routing per expert). Token counts for
        routed layers, probability mass for dense ones; each row sums to 1. Layers of unequal E are
        padded with NaN."""
        names = list(self.layers)
        width = max((s.mass.numel() for s in self.layers.values()), default=0)
        out = torch.full((len(names), width), float("nan"), dtype=torch.float64)
        for i, stats in enumerate(self.layers.values()):
            load = stats.tokens if stats.tokens.sum() > 0 else stats.mass
            out[i, : load.numel()] = (load / load.sum().clamp_min(1e-12)).cpu()
        return names, out

    def summary(self) -> dict[str, float]:
        """Mean router entropy per token, the largest expert share and the dropped fraction, over layers."""
        if not self.layers:
            return {}
        _, load = self.load_matrix()
        n = sum(s.n_tokens for s in self.layers.values())
        assigned = sum(float(s.tokens.sum()) + s.dropped for s in self.layers.values())
        return {"router_entropy": sum(s.entropy for s in self.layers.values()) / max(n, 1),
                "max_expert_share": float(load.nan_to_num(0).max()),
                "dropped_fraction": sum(s.dropped for s in self.layers.values()) / max(assigned, 1)}


@dataclass
class Route:
    """One layer's routing in one forward pass, real tokens only (padding removed)."""

    layer: str  # the adapted module's name
    logits: Tensor  # (T, E), with gradient
    probs: Tensor  # (T, E) softmax over all experts, with gradient
    selected: Tensor | None  # (T, k) selected experts (-1: dropped, e.g. over capacity); None for a dense mixture
    rows: Tensor  # (T,) the row (example × choice) each token belongs to


class AdapterContext:
    """State shared by all adapter layers of one model during one forward pass.

    ``side`` carries per-row side information (task ids, cluster ids) that the model's own forward
    signature knows nothing about, one entry per row of what the layers see (a multiple-choice batch
    of B examples × C choices has B·C rows); ``token_mask`` is the forward's attention mask (1 for a
    real token), so that layers can leave padding out of routing statistics and losses;
    ``aux_losses`` collects the raw extra loss terms layers produce, named, so that the config can
    weigh each and the trainer can log each; ``routes`` collects each routed layer's router
    probabilities and selections of this forward, for model-level losses; ``recorder`` accumulates
    routing statistics across forwards.
    """

    def __init__(self) -> None:
        self.side: dict[str, Any] = {}
        self.token_mask: Tensor | None = None
        self.aux_losses: list[tuple[str, Tensor]] = []
        self.routes: list[Route] = []
        self.recorder = RoutingRecorder()

    def start_forward(self, side: dict[str, Any], token_mask: Tensor | None) -> None:
        self.side, self.token_mask = side, token_mask
        self.aux_losses, self.routes = [], []

    def add_aux_loss(self, name: str, value: Tensor) -> None:
        self.aux_losses.append((name, value))

    def real_tokens(self, x: Tensor) -> Tensor | None:
        """A flat bool mask over the tokens of ``x`` (…, d) that are not padding, or None when the
        forward had no attention mask of ``x``'s token layout (then every token counts)."""
        mask = self.token_mask
        if mask is None or mask.numel() != x.shape[:-1].numel():
            return None
        return mask.reshape(-1).to(device=x.device, dtype=torch.bool)

    def side_rows(self, name: str, x: Tensor) -> Tensor:
        """Side input ``name`` repeated to one entry per token of ``x`` (rows, …, d): shape (tokens,)."""
        if name not in self.side:
            raise ValueError(f"this adapter needs the side input {name!r} in the forward call "
                             f"(e.g. model(input_ids=..., {name}=...)); got {sorted(self.side) or 'none'}")
        rows = self.side[name].to(x.device)
        if rows.shape[0] != x.shape[0]:
            raise ValueError(f"side input {name!r} has {rows.shape[0]} rows but the layer sees {x.shape[0]}: "
                             "give one entry per row (per example × choice for flattened batches)")
        return rows.repeat_interleave(x.shape[:-1].numel() // x.shape[0])

    def route(self, layer: str, logits: Tensor, probs: Tensor, selected: Tensor | None, x: Tensor,
              dropped: int = 0) -> None:
        """Report one routing decision over the tokens of ``x`` (rows, …, d): keeps the real (non-padding)
        tokens' routing for model-level losses and feeds the recorder."""
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(x.shape[:-1].numel() // x.shape[0])
        keep = self.real_tokens(x)
        if keep is not None:
            logits, probs, rows = logits[keep], probs[keep], rows[keep]
            selected = selected[keep] if selected is not None else None
        self.routes.append(Route(layer, logits, probs, selected, rows))
        self.recorder.record(layer, probs, selected, dropped)


@dataclass(frozen=True)
class Site:
    """One place an adapter layer goes: the module at ``name`` (a linear, or a whole FFN block).

    ``block`` is the transformer block index (the first number in the name; None outside the
    blocks), ``module_type`` the name with the block index replaced by ``*`` (one type per position
    in a block), ``d_in``/``d_out`` the input and output widths (an FFN: the model width, both).
    ``bypass`` names a module that must become the identity when this site is replaced (BERT's FFN
    output linear lives outside the module that starts the FFN, see :func:`lorafam_nb.models.ffn_blocks`).
    """

    name: str
    module: nn.Module = field(compare=False, repr=False)
    block: int | None
    module_type: str
    d_in: int
    d_out: int
    kind: str = "linear"  # "linear" or "ffn"
    bypass: str | None = None


def site_of(model: nn.Module, name: str, **fields: Any) -> Site:
    """The :class:`Site` of module ``name`` of ``model``: a linear, unless ``fields`` say otherwise
    (``module``, ``d_in``, ``d_out``, ``kind``, ``bypass``)."""
    module = model.get_submodule(name)
    values = {"module": module, "d_in": getattr(module, "in_features", 0),
              "d_out": getattr(module, "out_features", 0)} | fields
    return Site(name=name, block=block_index(name), module_type=site_type(name), **values)


def block_index(name: str) -> int | None:
    """The transformer block a module belongs to: the first number in its dotted name (None if none)."""
    number = re.search(r"\.(\d+)\.", f".{name}.")
    return int(number.group(1)) if number else None


class AdapterScope(nn.Module):
    """Modules that several adapter layers of one model share, owned by that model and saved once.

    A layer factory asks for a shared module by key (:meth:`shared`); the first request builds it,
    later ones get the same object. Entries marked not ``persistent`` (VeRA's pair when it is
    regenerated from its seed) are left out of the saved adapter.
    """

    def __init__(self) -> None:
        super().__init__()
        self.entries = nn.ModuleDict()
        self.transient: set[str] = set()

    def shared(self, key: str, build: Callable[[], nn.Module], persistent: bool = True) -> nn.Module:
        key = re.sub(r"[^0-9A-Za-z_]", "_", key)
        if key not in self.entries:
            self.entries[key] = build()
            if not persistent:
                self.transient.add(key)
        return self.entries[key]

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {f"{k}.{n}": v for k, module in self.entries.items() if k not in self.transient
                for n, v in module.state_dict().items()}


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
        self.site = ""  # the module name this layer replaced (set by AdapterModel; names routing records)

    def delta_weight(self) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} is not mergeable into a single weight")

    @property
    def mergeable(self) -> bool:
        """Whether this layer's update is one weight delta (mixtures routed per token are not)."""
        return type(self).delta_weight is not AdapterLayer.delta_weight

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
    # Tensors of modules the layers share (``adapter_scope.<key>``) -> peft's model-level name
    # (``base_model.<name>``), e.g. VeRA's saved projections.
    peft_scope_keys: ClassVar[dict[str, str]] = {}
    # The method's card for the overview page; every registered config sets its own (not inherited).
    card: ClassVar[MethodCard | None] = None
    # The size hyperparameter that sets the trainable-parameter count (what the experiments grid tunes
    # to match a budget through ``num_parameters``).
    budget_knob: ClassVar[str] = "r"
    # The method's learning rate relative to LoRA's in the same run (VeRA trains its vectors 30× higher).
    lr_scale: ClassVar[float] = 1.0
    # Whether the CI's smoke grid runs this method (a matched one, one that cannot match, one mixture);
    # like ``card``, a config's own setting, not inherited.
    in_smoke_grid: ClassVar[bool] = False
    # Whether peft implements this method's layer, so that the benchmark times peft's (built from
    # :meth:`to_peft`) beside ours; a config's own setting, not inherited.
    peft_reference: ClassVar[bool] = False
    # What the method adapts: "text" methods join the text experiments grid and the MiniLM benchmark;
    # "vision" and "multimodal" ones are compared on their own models (the vision chapters).
    modality: ClassVar[str] = "text"
    # The wrapper :func:`get_adapter_model` builds (None: :class:`AdapterModel`); a method whose adapter is a
    # module on top of the model (MLoRE's decoder) subclasses it.
    model_class: ClassVar[type[AdapterModel] | None] = None

    def make_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        raise NotImplementedError

    def sites(self, model: nn.Module) -> list[Site]:
        """Where this adapter goes in ``model``: by default every module :func:`target_module_names` picks."""
        return [site_of(model, name) for name in target_module_names(model, self)]

    def build_layer(self, site: Site, scope: AdapterScope) -> AdapterLayer:
        """The layer for ``site``. Methods whose layers share modules override this and take them from
        ``scope``; the default builds an independent layer with :meth:`make_layer`."""
        return self.make_layer(site.name, site.module)

    def site_parameters(self, site: Site) -> int:
        """Trainable parameters this adapter puts at ``site`` (the per-linear formula by default)."""
        return self.num_parameters(site.d_in, site.d_out)

    def model_parameters(self, sites: list[Site]) -> int:
        """Closed-form trainable adapter parameters over ``sites``, shared modules (routers, gates,
        shared pairs) counted once: what the experiments grid matches budgets with."""
        return sum(self.site_parameters(s) for s in sites)

    def num_parameters(self, d_in: int, d_out: int) -> int:
        raise NotImplementedError(f"{self.method} has no num_parameters(d_in, d_out) formula")

    @classmethod
    def budget_candidates(cls, sites: list[Site]) -> list[dict[str, Any]]:
        """Size settings to try when matching a parameter budget: the knob from 1 to the largest rank any
        adapted ``ΔW`` can have, ``max min(d_in, d_out)`` (a larger knob adds parameters, not rank)."""
        top = max(min(s.d_in, s.d_out) for s in sites)
        return [{cls.budget_knob: v} for v in range(1, top + 1)]

    @classmethod
    def budget_order(cls, values: dict[str, Any], count: int, target: int) -> tuple[float, ...]:
        """Sort key among candidates (smallest wins): the nearest count, ties to the larger knob."""
        return (abs(count - target), -values[cls.budget_knob])

    def aux_loss_weights(self) -> dict[str, float]:
        """The weight of each named auxiliary loss term this method produces (none by default)."""
        return {}

    def aux_loss_terms(self, context: AdapterContext) -> dict[str, Tensor]:
        """Raw auxiliary terms of the forward that just ran: the layers' terms summed by name. Methods
        whose loss spans the whole model (routing of all layers at once) override this."""
        terms: dict[str, Tensor] = {}
        for name, value in context.aux_losses:
            terms[name] = terms[name] + value if name in terms else value
        return terms

    @classmethod
    def run_settings(cls, knob: int, steps: int, lr: float) -> dict[str, Any]:
        """Settings beyond the size that depend on the run: schedules the paper gives in steps, scaled to a
        run of ``steps`` optimizer steps at ``lr`` (LoRA's rate, before :attr:`lr_scale`). None by default."""
        return {}

    @classmethod
    def sized(cls, values: dict[str, Any] | int, target_modules: list[str] | str, steps: int = 1,
              lr: float = 1e-3, **fields: Any) -> AdapterConfig:
        """This method at the size settings ``values`` (a bare int: the knob) for a run of ``steps`` steps at
        ``lr``: the one rule by which the experiments grid and the benchmark size every method.
        ``lora_alpha = 2 × knob`` where the method has one (the reference table's α = 2r, LoRA's scale 2)."""
        values = values if isinstance(values, dict) else {cls.budget_knob: values}
        knob = values[cls.budget_knob]
        kwargs = {**values, "target_modules": target_modules, **cls.run_settings(knob, steps, lr), **fields}
        if "lora_alpha" in {f.name for f in dataclasses.fields(cls)}:
            kwargs.setdefault("lora_alpha", 2.0 * knob)
        return cls(**kwargs)

    def resolve(self, spec: RunSpec) -> AdapterConfig:
        """The config to inject for ``spec``: a method whose architecture a first stage decides (LoRA-drop's
        probe picks the layers that keep their own LoRA) runs that stage here, before anything is injected.
        The experiment's :func:`~lorafam_nb.experiment.build_model` calls it; ``self`` by default."""
        return self

    def prepare(self, model: AdapterModel, spec: RunSpec) -> None:
        """A stage that runs after injection and before the main training of ``spec`` (the experiment's
        :func:`~lorafam_nb.experiment.build_model` calls it): methods whose experts are trained separately
        first train them here, through :func:`~lorafam_nb.experiment.run`. Nothing by default."""

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

    def peft_state(self, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Our :meth:`AdapterModel.adapter_state_dict` in peft's layout (still under our key names), and what
        peft's config must add to read it. Unchanged by default; AdaLoRA cuts the masked triplets and states
        the rank pattern."""
        return state, {}

    def state_from_peft(self, state: dict[str, Tensor], peft_config: dict[str, Any]) -> dict[str, Tensor]:
        """The inverse of :meth:`peft_state`: peft's tensors (already under our key names) in our layout."""
        return state

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
        cls = import_method(data.pop("method", None))
        method = cls.method
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{method} config has unknown fields {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**data)


def site_type(name: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``bert.encoder.layer.*.attention.self.query``."""
    return re.sub(r"\.\d+\.", ".*.", name)


def _modules_of_type(model: nn.Module, types: tuple[type[nn.Module], ...]) -> list[str]:
    return [n for n, m in model.named_modules() if n and isinstance(m, types)]


def suffix_match(name: str, suffixes: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in suffixes)


def saved_module_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Modules trained in full beside the adapter (``modules_to_save``, e.g. the task head)."""
    return [n for n, _ in model.named_modules() if n and suffix_match(n, config.modules_to_save)]


def target_module_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules ``config`` would replace; raises ``ValueError`` if there are none."""
    candidates = _modules_of_type(model, config.layer_types)
    targets = config.target_modules
    if targets == "all-linear":
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        skip = {n for n, m in model.named_modules() if out_emb is not None and m is out_emb}
        heads = saved_module_names(model, config)
        names = [n for n in candidates if n not in skip and not any(n == h or n.startswith(h + ".") for h in heads)]
    elif isinstance(targets, str):
        names = [n for n in candidates if re.fullmatch(targets, n)]
    else:
        names = [n for n in candidates if suffix_match(n, targets)]
    # A pattern naming something of another type is a mistake the user should hear about.
    wrong = [n for n, m in model.named_modules() if isinstance(targets, list) and n
             and suffix_match(n, targets) and not isinstance(m, config.layer_types)]
    if wrong:
        raise ValueError(f"{config.method} can only adapt {config.layer_types}; these targets are not: {wrong[:5]}")
    if not names:
        kinds = "/".join(t.__name__ for t in config.layer_types)
        found = sorted(dict.fromkeys(site_type(n) for n in candidates))
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
        sites = config.sites(model)
        # Build every layer before touching the model: a config that fails on some site leaves it as it was.
        self.adapter_scope = AdapterScope()
        layers = [config.build_layer(site, self.adapter_scope) for site in sites]
        self.model = model
        self.adapter_config = config
        self.context = AdapterContext()
        for p in model.parameters():
            p.requires_grad_(False)
        for site, layer in zip(sites, layers):
            layer.context = self.context
            layer.site = site.name
            _set_submodule(model, site.name, layer)
            if site.bypass:
                _set_submodule(model, site.bypass, nn.Identity())
        for name in saved_module_names(model, config):
            model.get_submodule(name).requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        side = {k: kwargs.pop(k) for k in self.adapter_config.side_inputs if k in kwargs}
        self.context.start_forward(side, kwargs.get("attention_mask"))
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    # --- inspection -------------------------------------------------------------------------
    def adapter_layers(self) -> dict[str, AdapterLayer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, AdapterLayer)}

    def aux_losses(self) -> dict[str, Tensor]:
        """The weighted auxiliary loss terms of the last forward, by name (weights from the config)."""
        weights = self.adapter_config.aux_loss_weights()
        terms = self.adapter_config.aux_loss_terms(self.context)
        unknown = sorted(set(terms) - set(weights))
        if unknown:
            raise ValueError(f"{self.adapter_config.method} produced auxiliary losses {unknown} that its config gives "
                             f"no weight (aux_loss_weights() has {sorted(weights)})")
        return {name: weights[name] * value for name, value in terms.items() if weights[name] != 0}

    def aux_loss(self) -> Tensor | None:
        """Sum of the weighted auxiliary losses the last forward produced (None when there were none)."""
        terms = list(self.aux_losses().values())
        return torch.stack(terms).sum() if terms else None

    @property
    def recorder(self) -> RoutingRecorder:
        return self.context.recorder

    def print_trainable_parameters(self) -> None:
        print_trainable_parameters(self)

    # --- merge --------------------------------------------------------------------------------
    def check_mergeable(self) -> None:
        """Raise before any weight changes if some layer cannot be folded into its base weight, saying why
        (the method card's merge note)."""
        layers = self.adapter_layers()
        blocked = [n for n, layer in layers.items() if not layer.mergeable]
        if blocked:
            kinds = sorted({type(layers[n]).__name__ for n in blocked})
            card = type(self.adapter_config).card
            why = card.merge_note if card and card.merge_note else "their update is no single weight"
            raise ValueError(f"{self.adapter_config.method} cannot be merged: {why} ({kinds} layers, "
                             f"{len(blocked)} of them, e.g. {blocked[0]}); nothing was changed")

    def merge(self) -> None:
        self.check_mergeable()
        for layer in self.adapter_layers().values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.adapter_layers().values():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Fold every adapter into its base weight and return the plain model."""
        self.check_mergeable()
        for name, layer in self.adapter_layers().items():
            layer.merge()
            _set_submodule(self.model, name, layer.base_layer)
        return self.model

    # --- save / load --------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        state.update({f"adapter_scope.{k}": v for k, v in self.adapter_scope.adapter_state_dict().items()})
        for name, layer in self.adapter_layers().items():
            state.update({f"{name}.{k}": v for k, v in layer.adapter_state_dict().items()})
        for name in saved_module_names(self.model, self.adapter_config):
            state.update({f"{name}.{k}": v for k, v in self.model.get_submodule(name).state_dict().items()})
        return state

    def save_adapter(self, directory: str | Path) -> None:
        """Write ``adapter_config.json`` and ``adapter.safetensors`` (adapter + head only)."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        write_adapter_files(directory, {WEIGHTS_FILE: state, CONFIG_FILE: self.adapter_config.to_dict()})

    def load_adapter(self, directory: str | Path) -> None:
        """Load weights saved by :meth:`save_adapter`; validates everything before touching the model."""
        directory = Path(directory)
        saved = read_json(directory / CONFIG_FILE)
        if saved.get("method") != self.adapter_config.method:
            raise ValueError(
                f"{directory} holds a {saved.get('method')!r} adapter; this model has {self.adapter_config.method!r}"
            )
        self.load_adapter_state_dict(read_tensors(directory / WEIGHTS_FILE), source=str(directory))

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
        """Inject the adapter described in ``directory`` into ``model`` and load its weights. Everything is
        read and validated first; a file that does not fit leaves ``model`` exactly as it was."""
        directory = Path(directory)
        config = AdapterConfig.from_dict(read_json(directory / CONFIG_FILE))
        tensors = read_tensors(directory / WEIGHTS_FILE)
        return cls.inject_and_load(model, config, tensors, str(directory))

    @classmethod
    def inject_and_load(cls, model: nn.Module, config: AdapterConfig,
                        tensors: dict[str, Tensor] | Callable[[AdapterModel], dict[str, Tensor]],
                        source: str) -> AdapterModel:
        """``config`` injected into ``model`` with ``tensors`` (our adapter_state_dict keys, or a function of
        the injected model that returns them) loaded; when they do not fit, every replaced module and every
        ``requires_grad`` flag of ``model`` is put back before the error propagates."""
        modules = dict(model.named_modules())  # parents before children
        flags = [(p, p.requires_grad) for p in model.parameters()]
        adapted = (config.model_class or cls)(model, config)
        try:
            adapted.load_adapter_state_dict(tensors(adapted) if callable(tensors) else tensors, source=source)
        except BaseException:
            for name, module in modules.items():
                if name and model.get_submodule(name) is not module:
                    _set_submodule(model, name, module)
            for p, flag in flags:
                p.requires_grad_(flag)
            raise
        return adapted


def require_positive_ints(**values: Any) -> None:
    """Raise a ValueError naming the first of ``values`` that is not a positive integer (configs' checks)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a ValueError that names the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from err
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file, or a ValueError for a missing, empty, truncated or corrupted one."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: the file is missing, corrupted or truncated ({err})") from err


def write_adapter_files(directory: str | Path, files: dict[str, dict[str, Any]]) -> None:
    """Write ``{file name: tensors (.safetensors) or a JSON object}`` into ``directory`` all or nothing: each
    goes to a temporary name first, and only when all are written do they replace what was there."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, content in files.items():
            tmp = directory / f".{name}.tmp"
            staged.append((tmp, directory / name))
            if name.endswith(".safetensors"):
                save_file(content, str(tmp))
            else:
                tmp.write_text(json.dumps(content, indent=2))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in staged:
        os.replace(tmp, final)


def get_adapter_model(model: nn.Module, config: AdapterConfig) -> AdapterModel:
    """Inject ``config``'s adapter into ``model`` (in place) and return the wrapper (the config's
    ``model_class``, by default :class:`AdapterModel`)."""
    return (config.model_class or AdapterModel)(model, config)
