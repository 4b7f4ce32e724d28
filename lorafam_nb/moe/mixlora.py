"""MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of Experts
(Li et al., 2024, arXiv 2404.15159).

Every frozen feed-forward block becomes a sparse mixture of E experts. All experts *share* the frozen
FFN weights and differ only by their own LoRA on each FFN matrix, so expert e is the whole FFN with
adapted weights (Llama: W_1 = gate, W_3 = up, W_2 = down):

    E_e(h) = W̃_2^e ( SiLU(W̃_1^e h) ⊙ W̃_3^e h ),     W̃_m^e x = W_m x + s B_m^e A_m^e drop(x)

(BERT: E_e(h) = W̃_down^e GELU(W̃_up^e h)). A router W_r ∈ R^{E×d} on the FFN input picks the top k:

    p = softmax(W_r h),  S = TopK(p, k),  MixLoRA(h) = Σ_{e∈S} (p_e / Σ_{j∈S} p_j) E_e(h)

* Softmax over all E logits first, then top-k, then renormalise (the Mixtral order; the authors' code).
* The nonlinearity sits between adapted matrices: an expert is not FFN(h) + a linear Δ(h), and the
  mixture cannot be merged into W.
* Shared-FFN trick (the paper's Fig. 3b): W_1 h and W_3 h are computed once for all tokens and each
  selected expert adds only its LoRA terms; W_2 runs once per (token, expert) assignment, k times per token.
* The attention projections get one plain LoRA each (not a mixture): "all-linear" targets every linear
  outside the FFN.
* Load balance (Switch / Mixtral form) over the routing of *all* layers at once, padding left out:
  ``L_aux = a · E · Σ_e F_e P_e``, F_e the share of tokens with e in their top k, P_e the mean router
  probability. Weight a = ``router_aux_loss_coef``: 0.01, the paper's text (its ablation and the authors'
  code default pick 1e-3; see the chapter).
* Init: LoRA A Kaiming-uniform, B = 0 (so MixLoRA(h) = FFN(h) at step 0); router N(0, 0.02²), in float32.

:func:`save_mixlora` / :func:`load_mixlora` read and write the authors' ``mixlora`` package format.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterConfig, AdapterLayer, AdapterModel, AdapterScope, MethodCard, Site, \
    register_method, site_of, target_module_names, require_positive_ints
from ..lora import LoRALinear
from ..models import FeedForward, ffn_blocks
from .experts import LoRAExperts
from .layers import PATHS, MixtureBudget, PooledLoadBalance
from .routers import TopKRouter, router_dtype

__all__ = ["MixLoraConfig", "MixLoRAFFN", "authors_model", "load_mixlora", "mixlora_config", "save_mixlora"]


class MixLoRAFFN(AdapterLayer):
    """A frozen FFN (``base_layer``, a :class:`~lorafam_nb.models.FeedForward`) turned into E experts.

    ``experts["gate" | "up" | "down"]`` hold every expert's LoRA on that FFN matrix.
    """

    def __init__(self, base_layer: FeedForward, num_experts: int, top_k: int, r: int, scaling: float,
                 lora_dropout: float = 0.0, jitter_noise: float = 0.0, router_init_range: float = 0.02,
                 path: str = "sparse") -> None:
        super().__init__(base_layer)
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        w = base_layer.up.weight
        self.path = path
        # The router stays in (at least) float32 whatever the model's dtype, as in the authors' code.
        self.router = TopKRouter(base_layer.up.in_features, num_experts, top_k, jitter_noise,
                                 init_std=router_init_range, dtype=router_dtype(w.dtype), device=w.device)
        matrices = {"gate": base_layer.gate, "up": base_layer.up, "down": base_layer.down}
        self.experts = nn.ModuleDict({
            name: LoRAExperts(num_experts, r, m.in_features, m.out_features, scaling, dtype=w.dtype, device=w.device)
            for name, m in matrices.items() if m is not None})
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        routing = self.router(flat)
        self.context.route(self.site, routing.logits, routing.probs, routing.selected, x)
        num_experts = self.router.weight.shape[0]
        if self.path == "sparse":  # each token's k selected experts
            out = self._mixture(flat, routing.selected.reshape(-1), routing.weights)
        else:  # every expert on every token, weight 0 off the top k
            gates = routing.probs.new_zeros(routing.probs.shape).scatter(1, routing.selected, routing.weights)
            every = torch.arange(num_experts, device=flat.device).repeat(flat.shape[0])
            out = self._mixture(flat, every, gates)
        return out.view(x.shape).to(x.dtype)

    def _mixture(self, flat: Tensor, expert: Tensor, weight: Tensor) -> Tensor:
        """``Σ_j weight_tj · E_{expert_tj}(h_t)`` over the k = ``weight.shape[1]`` experts of each token.

        The frozen W_3 h (and W_1 h) run once per token; each of the token's k experts adds its own LoRA
        term (broadcast over k, so the base activation is not copied k times), and W_2 then runs on the
        T·k expert activations: one more down-projection per token at top-2. Each expert's LoRA comes from
        :meth:`LoRAExperts.dense` with one-hot gates: all E experts' r-dim projections of a token cost E·r·d,
        far below W_2's d_ff·d at MixLoRA's ranks, and need no sorting or padding. LoRA dropout on W_1 and
        W_3's input is drawn once per token (shared by its k experts); on W_2's input once per expert row.
        """
        T, k = weight.shape
        own = F.one_hot(expert, self.router.weight.shape[0]).to(flat.dtype).view(T, k, -1)
        ffn, experts, drop = self.base_layer, self.experts, self.lora_dropout
        up = ffn.up(flat)[:, None] + experts["up"].dense(drop(flat), own)  # (T, k, d_ff)
        if ffn.gate is None:
            inner = ffn.act(up)
        else:
            inner = ffn.act(ffn.gate(flat)[:, None] + experts["gate"].dense(drop(flat), own)) * up
        inner = inner.reshape(T * k, -1)
        out = ffn.down(inner) + experts["down"].dense(drop(inner), own.reshape(T * k, -1))
        return (out.view(T, k, -1) * weight[..., None].to(out.dtype)).sum(1)

    def extra_repr(self) -> str:
        return f"path={self.path}"


@register_method
@dataclass
class MixLoraConfig(MixtureBudget, PooledLoadBalance, AdapterConfig):
    """MixLoRA's hyperparameters (the authors' names): ``num_experts`` E, ``top_k`` k, the experts' and the
    attention LoRAs' rank ``r``, ``lora_alpha`` and ``lora_dropout``, ``router_aux_loss_coef`` a,
    ``router_init_range`` (std of W_r) and ``jitter_noise`` ε. ``target_modules`` names the linears that
    get a plain LoRA ("all-linear": every linear outside the FFN blocks; ``[]``: none). ``path``:
    ``"sparse"`` dispatches tokens to their k experts, ``"dense"`` runs all E and zeroes the rest."""

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    num_experts: int = 8
    top_k: int = 2
    router_aux_loss_coef: float = 0.01
    router_init_range: float = 0.02
    jitter_noise: float = 0.0
    path: str = "sparse"

    method = "mixlora"
    in_smoke_grid = True
    card = MethodCard(
        title="MixLoRA", paper="Li et al., arXiv 2024", arxiv="2404.15159", date="2024-04",
        idea=r"every FFN becomes a top-$k$ mixture of experts that share the frozen FFN and differ by their own "
             r"LoRAs; plain LoRA on attention; Switch load balance",
        trains=r"$A^e_m$, $B^e_m$ per expert and FFN matrix; router $W_r$; attention $A$, $B$",
        frozen=r"all base weights (the FFN is shared by all experts)", mergeable=False,
        params=r"E\,r(d_{in}+d_{out})", chapter="mixlora", bibkey="li2024mixlora",
        params_note=r"per FFN linear; plus the block's router $E\,d$ and $r(d_{in}+d_{out})$ per attention linear",
        merge_note="routing is per token and SiLU sits between adapted matrices; only the attention LoRAs merge",
    )

    def __post_init__(self) -> None:
        require_positive_ints(r=self.r, num_experts=self.num_experts, top_k=self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")

    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def sites(self, model: nn.Module) -> list[Site]:
        """Every FFN block, then the plain-LoRA linears of ``target_modules`` outside the FFNs."""
        ffns = ffn_blocks(model)
        if self.target_modules == []:
            return ffns
        inside = {id(m) for s in ffns for m in s.module.modules()}
        linears = [site_of(model, n) for n in target_module_names(model, self)]
        return ffns + [s for s in linears if id(s.module) not in inside]

    def build_layer(self, site: Site, scope: AdapterScope) -> AdapterLayer:
        if site.kind == "ffn":
            return MixLoRAFFN(site.module, self.num_experts, self.top_k, self.r, self.scaling(), self.lora_dropout,
                              self.jitter_noise, self.router_init_range, self.path)
        return LoRALinear(site.module, self.r, self.lora_alpha, self.lora_dropout, self.scaling())

    def site_parameters(self, site: Site) -> int:
        """An FFN: E r Σ_m (d_in_m + d_out_m) over its matrices plus the router E·d; a linear: r (d_in + d_out)."""
        if site.kind != "ffn":
            return self.r * (site.d_in + site.d_out)
        ffn: FeedForward = site.module
        matrices = [m for m in (ffn.gate, ffn.up, ffn.down) if m is not None]
        return self.num_experts * (self.r * sum(m.in_features + m.out_features for m in matrices) + site.d_in)

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """Trainable parameters of the experts on one d_out × d_in FFN linear: E r (d_in + d_out)."""
        return self.num_experts * self.r * (d_in + d_out)



# --- the authors' on-disk format (the `mixlora` package: adapter_config.json + adapter_model.bin) -------

_MIXLORA_CONFIG, _MIXLORA_WEIGHTS = "adapter_config.json", "adapter_model.bin"


def _theirs(name: str) -> str:
    """``model.layers.3.mlp`` -> ``mixlora.layers.3.mlp`` (their keys start at the decoder's layers)."""
    head, sep, tail = name.partition("layers.")
    if not sep:
        raise ValueError(f"the mixlora format names modules under a Llama-style `layers.N`; {name!r} is not")
    return f"mixlora.layers.{tail}"


def _mixlora_keys(model: AdapterModel) -> dict[str, tuple[Tensor, int | None, str]]:
    """Their key -> (our tensor, expert index or None, "A"/"B"/"gate")."""
    out: dict[str, tuple[Tensor, int | None, str]] = {}
    names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    for name, layer in model.adapter_layers().items():
        prefix = _theirs(name)
        if isinstance(layer, MixLoRAFFN):
            out[f"{prefix}.moe_gate.weight"] = (layer.router.weight, None, "gate")
            for key, experts in layer.experts.items():
                for e in range(experts.num_experts):
                    for ab in ("A", "B"):
                        out[f"{prefix}.{names[key]}.experts.{e}.lora_{ab}.weight"] = (
                            getattr(experts, f"lora_{ab}"), e, ab)
        else:
            for ab in ("A", "B"):
                out[f"{prefix}.lora_{ab}.weight"] = (getattr(layer, f"lora_{ab}"), None, ab)
    return out


def save_mixlora(model: AdapterModel, directory: str | Path) -> None:
    """Write ``model``'s MixLoRA adapter in the ``mixlora`` package's format (its ``load_adapter_weights``
    and ``MixLoraModelForCausalLM.from_pretrained`` read it). Llama-style models only."""
    config = model.adapter_config
    if not isinstance(config, MixLoraConfig):
        raise ValueError(f"save_mixlora writes MixLoRA adapters; this model has {config.method!r}")
    if config.path != "sparse" or model.model.config.model_type not in ("llama", "mistral", "qwen2", "gemma"):
        raise ValueError("the mixlora format holds decoder (Llama-style) models; "
                         f"got model_type {model.model.config.model_type!r}")
    if float(config.lora_alpha) != int(config.lora_alpha):
        raise ValueError(f"the mixlora format stores lora_alpha as an integer; {config.lora_alpha} would be "
                         "truncated and the adapter rescaled")
    keys = _mixlora_keys(model)  # validates every name before anything is written
    state = {k: (t[e] if e is not None else t).detach().cpu().clone() for k, (t, e, _) in keys.items()}
    targets = {"gate_proj": True, "up_proj": True, "down_proj": True}
    targets.update({n.rpartition(".")[2]: True for n, l in model.adapter_layers().items() if isinstance(l, LoRALinear)})
    act = {"silu": "silu", "gelu": "gelu"}.get(getattr(model.model.config, "hidden_act", "silu"), "silu")
    meta = {"peft_type": "MIXLORA", "routing_strategy": "mixlora", "task_type": "CAUSAL_LM", "bias": "none",
            "base_model_name_or_path": getattr(model.model.config, "_name_or_path", ""),
            "r": config.r, "lora_alpha": int(config.lora_alpha), "lora_dropout": config.lora_dropout,
            "target_modules": targets, "num_experts": config.num_experts, "top_k": config.top_k, "act_fn": act,
            "router_aux_loss_coef": float(config.router_aux_loss_coef),
            "router_init_range": float(config.router_init_range), "jitter_noise": float(config.jitter_noise)}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / _MIXLORA_WEIGHTS)
    (directory / _MIXLORA_CONFIG).write_text(json.dumps(meta, indent=2))


def mixlora_config(directory: str | Path) -> MixLoraConfig:
    """Our config for the adapter the ``mixlora`` package saved in ``directory`` (ValueError if the file is
    missing, not JSON, not a MixLoRA adapter, or lacks a field the format requires)."""
    path = Path(directory) / _MIXLORA_CONFIG
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if not isinstance(meta, dict) or meta.get("peft_type") != "MIXLORA" or meta.get("routing_strategy") != "mixlora":
        peft_type = meta.get("peft_type") if isinstance(meta, dict) else None
        raise ValueError(f"{directory} does not hold a MixLoRA adapter with 'mixlora' routing (peft_type={peft_type!r})")
    missing = [k for k in ("r", "lora_alpha", "target_modules", "num_experts") if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks the required fields {missing}")
    targets = meta["target_modules"]
    targets = [k for k, v in targets.items() if v] if isinstance(targets, dict) else list(targets)
    ffn = {"gate_proj", "up_proj", "down_proj"}
    if not ffn <= set(targets):
        raise ValueError(f"MixLoRA here adapts all three FFN matrices; {directory} targets {sorted(targets)}")
    if meta.get("use_dora") or meta.get("use_rslora") or meta.get("expert_lora"):
        raise ValueError(f"{directory} uses DoRA, rsLoRA or separate expert LoRA settings, which this MixLoRA does not")
    return MixLoraConfig(r=meta["r"], lora_alpha=float(meta["lora_alpha"]), lora_dropout=meta.get("lora_dropout", 0.05),
                         num_experts=meta["num_experts"], top_k=meta.get("top_k", 2),
                         router_aux_loss_coef=meta.get("router_aux_loss_coef", 0.001),
                         router_init_range=meta.get("router_init_range", 0.02),
                         jitter_noise=meta.get("jitter_noise", 0.0),
                         target_modules=sorted(set(targets) - ffn))


@torch.no_grad()
def load_mixlora(model: nn.Module, directory: str | Path) -> AdapterModel:
    """Inject the MixLoRA adapter that the ``mixlora`` package saved in ``directory`` into ``model``.
    Everything is read and checked before the model is touched."""
    directory = Path(directory)
    config = mixlora_config(directory)
    try:
        state = torch.load(directory / _MIXLORA_WEIGHTS, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(f"cannot read {directory / _MIXLORA_WEIGHTS}: {err}") from err
    want = _expected_shapes(config, config.sites(model))
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise ValueError(f"{directory} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    bad = [f"{k}: saved {tuple(state[k].shape)} vs model {shape}" for k, shape in want.items() if tuple(state[k].shape) != shape]
    if bad:
        raise ValueError(f"{directory} has wrong shapes: {bad[:3]}")
    adapted = AdapterModel(model, config)
    for key, (tensor, e, _) in _mixlora_keys(adapted).items():
        (tensor[e] if e is not None else tensor).copy_(state[key])
    return adapted


def _expected_shapes(config: MixLoraConfig, sites: list[Site]) -> dict[str, tuple[int, ...]]:
    """The keys and shapes an adapter of ``config`` at ``sites`` has in the mixlora format."""
    r, E = config.r, config.num_experts
    out: dict[str, tuple[int, ...]] = {}
    for site in sites:
        prefix = _theirs(site.name)
        if site.kind == "ffn":
            out[f"{prefix}.moe_gate.weight"] = (E, site.d_in)
            for theirs, m in (("gate_proj", site.module.gate), ("up_proj", site.module.up), ("down_proj", site.module.down)):
                for e in range(E):
                    out[f"{prefix}.{theirs}.experts.{e}.lora_A.weight"] = (r, m.in_features)
                    out[f"{prefix}.{theirs}.experts.{e}.lora_B.weight"] = (m.out_features, r)
        else:
            out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = (r, site.d_in), (site.d_out, r)
    return out


def authors_model(adapted: AdapterModel, base: nn.Module, trainable: bool = False,
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    """The authors' ``mixlora`` package (0.2.3) model on a copy of ``base``, holding ``adapted``'s weights
    (passed through their on-disk format), for parity checks and timings.

    Their package keeps the experts and the router as plain tensors in dicts, not registered parameters,
    and ``.eval()`` does not reach the experts' dropout. So the experts are registered on the returned
    model (``mixlora_experts``); with ``trainable`` the routers are too (``mixlora_routers``), and every
    LoRA (experts and attention) and router requires gradients, the base frozen, so that an optimizer
    trains them and a training step can be timed against ours. The model comes back in training mode
    when ``trainable``, else in eval mode. ``dtype`` is the precision their mixture computes in.
    """
    try:
        import mixlora
    except ImportError as err:
        raise ImportError("the authors' package is a test extra: pip install --no-deps mixlora==0.2.3") from err
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        save_mixlora(adapted, directory)
        config, weights = mixlora.load_adapter_weights(directory, device=str(base.device), dtype=dtype)
    model = copy.deepcopy(base)
    mixlora.inject_adapter_in_model(model, config, weights)
    moes = [moe for layer in model.model.layers for moe in layer.mlp.mixlora_moes.values()]
    # Registered, so that .train()/.eval() reach their experts' dropout and .parameters() their weights.
    model.mixlora_experts = nn.ModuleList(lora for moe in moes for lora in moe.experts_.values())
    model.requires_grad_(False)
    if trainable:
        for moe in moes:
            moe.gate_ = nn.Parameter(moe.gate_)
        model.mixlora_routers = nn.ParameterList(moe.gate_ for moe in moes)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("mixlora_experts.", "mixlora_routers.")) or ".lora_" in name)
    return model.train(trainable)
