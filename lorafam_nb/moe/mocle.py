"""MoCLE: Mixture of Cluster-conditional LoRA Experts for Vision-language Instruction Tuning
(Gou et al., arXiv 2312.12379, 2023).

One LoRA trained on many instruction tasks lets them fight over the same weights. MoCLE sorts the
instructions into clusters *before* training and lets the cluster decide which LoRA expert a sample uses;
an always-on universal LoRA keeps the model general for instructions that fit no cluster well.

**Offline (frozen).** The instruction q_n of sample n (the prompt only, never the answer) is embedded by
all-MiniLM-L6-v2, mean-pooled and L2-normalised, u_n ∈ R^384 (:func:`embed_instructions`); k-means on the
training instructions gives centroids μ_1..μ_C (:func:`fit_instruction_clusters`), and
c_n = argmin_j ‖u_n − μ_j‖ is the sample's cluster id (:meth:`InstructionClusters.assign`). It reaches the
model as the ``cluster_ids`` side input, one id per row.

**Per adapted linear W_0** (:class:`MoCLELinear`): E expert LoRAs (A_e, B_e), one universal LoRA (A_u, B_u),
scale s = α/r, and the layer's own router: a cluster table T ∈ R^{C×d_T} and a gate (W_g, b_g):

    ℓ_n = W_g T[c_n] + b_g + ε,  ε ~ N(0, σ²I) in training only;   p_n = softmax(ℓ_n / τ)
    e*_n = argmax_e p_{n,e},  g_n = p_{n,e*_n}                       (top-1, g not renormalised)
    y = W_0 x + λ(g_n) s B_{e*} A_{e*} drop(x) + (1 − g_n) s B_u A_u drop(x)     for every token x of sample n

Since g_n is the largest of E probabilities, g_n ≥ 1/E: the expert always gets at least as much weight as
the universal LoRA when E = 2, and with a small τ (0.05) g ≈ 1 on a confident route. The argmax passes no
gradient; the router learns through the value g_n (specialist against universal) and T.

Pinned details (see the method sheet; the paper's body was not readable here, the authors' code was):

* λ(g) = g (``gate_power=1``, default): the paper's convex mix of the chosen expert and the universal one.
  The released code (``peft-main/.../lora/layer.py``) multiplies the expert output by the gate twice (its
  dispatcher's ``combine`` and then the universal mix ``y_e·w + y_g·(1−w)``), i.e. λ(g) = g²;
  ``gate_power=2`` reproduces that.
* Experts E = 4 (the code's default), r = 8, α = 32, dropout 0.1, σ = 0.1, τ = 0.05, C = 64 (or 16).
  One dropout mask is shared by the expert and universal branches (the equation's one drop(x); the code
  draws one per adapter).
* No auxiliary (load-balancing) loss: the released code defines ``cv_squared`` but never calls it.
* The gate runs in float32 (the code's float16 softmax at τ = 0.05 can overflow).
* Init: A Kaiming-uniform, B = 0 (so y = W_0 x at step 0); T ~ N(0, 1) (``nn.Embedding``); W_g, b_g as
  ``nn.Linear``.
* Targets: the code leaves PEFT's LLaMA default, q_proj and v_proj; ``target_modules`` chooses here.

**Experiment arms through the config:** ``routing="random"`` replaces every row's cluster id by a seeded
uniformly random id, drawn afresh each forward and shared by all layers of that forward (the route then
carries no information about the instruction; the ids given are ignored and may be absent);
``universal=False`` drops the universal expert (then y = W_0 x + λ(g) s B_{e*} A_{e*} drop(x)).
:func:`random_cluster_ids` gives the other random control, a fixed random partition of the examples.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import AdapterConfig, AdapterScope, MethodCard, Site, require_positive_ints
from ..registry import register_method
from .experts import LoRAExperts
from .layers import PATHS, MixtureBudget, MoELoRALinear
from .routers import Routing, TaskRouter, router_dtype, softmax
from .separate import kmeans

__all__ = ["ClusterRouter", "InstructionClusters", "MoCLEConfig", "MoCLELinear", "RandomClusterIds",
           "assign_clusters", "embed_instructions", "fit_instruction_clusters", "instruction_encoder",
           "random_cluster_ids"]

ENCODER = "minilm"  # the package's all-MiniLM-L6-v2 (the paper's instruction encoder)
EMBEDDING_DIM = 384  # its width, the paper's width of T
MAX_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
ROUTINGS = ("cluster", "random")
RANDOM_KEY = "mocle_random_clusters"  # the random arm's shared id source in the model's AdapterScope
_DRAWN = "_mocle_random_cluster_ids"  # where one forward's random ids are kept (its side dict)


# --- offline: instructions -> cluster ids --------------------------------------------------------

_ENCODERS: dict[str, tuple[nn.Module, Any]] = {}


def instruction_encoder(name: str = ENCODER) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of the frozen sentence encoder, loaded once per process (offline, by short name)."""
    if name not in _ENCODERS:
        from ..models import load_model, load_tokenizer  # transformers is heavy; only the clustering needs it

        model = load_model(name, head="base").eval().requires_grad_(False)
        _ENCODERS[name] = (model, load_tokenizer(name))
    return _ENCODERS[name]


@torch.no_grad()
def embed_instructions(texts: Sequence[str], encoder: tuple[nn.Module, Any] | None = None, batch_size: int = 64,
                       max_length: int = MAX_LENGTH) -> Tensor:
    """u_n for each instruction: (n, 384) float32, the mean of the real tokens' last hidden states,
    L2-normalised — sentence-transformers' pipeline for all-MiniLM-L6-v2, so Euclidean k-means on u acts
    as cosine k-means. Embed only the instruction, never the answer (the route would leak the label)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a sequence of instruction strings")
    model, tokenizer = encoder or instruction_encoder()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(F.normalize(pooled, dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0, EMBEDDING_DIM)


def assign_clusters(embeddings: Tensor, centroids: Tensor) -> Tensor:
    """c_n = argmin_j ‖u_n − μ_j‖₂ for each row of ``embeddings``: (n,) long (what ``KMeans.predict`` does)."""
    if embeddings.dim() != 2 or embeddings.shape[1] != centroids.shape[1]:
        raise ValueError(f"embeddings must be (n, {centroids.shape[1]}), got {tuple(embeddings.shape)}")
    return torch.cdist(embeddings.double(), centroids.double()).argmin(1)


@dataclass
class InstructionClusters:
    """The frozen clustering: centroids μ (C, 384) fitted on the training instructions, the training
    instructions' ids, and the encoder name. :meth:`assign` maps new instructions to ids with the same
    embedding function the centroids were fitted on (the sheet's pitfall: fit and route identically)."""

    centroids: Tensor
    train_ids: Tensor
    encoder: str = ENCODER

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def assign(self, texts: Sequence[str]) -> Tensor:
        return assign_clusters(embed_instructions(texts, instruction_encoder(self.encoder)), self.centroids)

    __call__ = assign


def fit_instruction_clusters(texts: Sequence[str] | Tensor, num_clusters: int, seed: int = 0,
                             iterations: int = 100, encoder: str = ENCODER) -> InstructionClusters:
    """Embed the training instructions (or take their (n, 384) embeddings) and fit a seeded k-means
    (k-means++ seeding, Lloyd's iterations: :func:`lorafam_nb.moe.separate.kmeans`) with ``num_clusters``.
    Embed each distinct instruction once per example: k-means weighs clusters by how often they occur."""
    require_positive_ints(num_clusters=num_clusters)
    u = texts if isinstance(texts, Tensor) else embed_instructions(texts, instruction_encoder(encoder))
    centroids, ids = kmeans(u, num_clusters, seed=seed, iterations=iterations)
    return InstructionClusters(centroids.float(), ids, encoder)


def random_cluster_ids(n: int, num_clusters: int, seed: int = 0) -> Tensor:
    """A fixed random partition: n ids uniform in [0, C) from ``seed`` (the data-side random control:
    the same random id for an example every epoch, NMI ≈ 0 with its task)."""
    return torch.randint(num_clusters, (n,), generator=torch.Generator().manual_seed(seed))


# --- the router -----------------------------------------------------------------------------------

class ClusterRouter(TaskRouter):
    """One layer's router: the cluster table T (C × d_T, ``task_embedding``) and the gate W_g (E × d_T,
    ``weight``) of :class:`TaskRouter`, plus a bias b_g, Gaussian noise σ on the logits in training and a
    temperature τ, then top-1 without renormalisation. Input: (n,) cluster ids, one per row.

    The returned :class:`Routing` has ``logits`` ℓ (noisy, before τ), ``probs`` softmax(ℓ/τ) in float32,
    ``selected`` (n, 1) e* and ``weights`` (n, 1) g = p_{e*}."""

    def __init__(self, num_clusters: int, num_experts: int, cluster_dim: int = EMBEDDING_DIM,
                 temperature: float = 0.05, noise_std: float = 0.1, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__(num_clusters, num_experts, cluster_dim, dtype=dtype, device=device)
        self.temperature, self.noise_std = temperature, noise_std
        bound = 1 / math.sqrt(cluster_dim)  # nn.Linear's bias init
        self.bias = nn.Parameter(torch.empty(num_experts, dtype=dtype, device=device).uniform_(-bound, bound))

    @property
    def T(self) -> Tensor:
        return self.task_embedding.weight

    @property
    def W_g(self) -> Tensor:
        return self.weight

    def forward(self, cluster_ids: Tensor) -> Routing:
        logits = F.linear(self.task_embedding(cluster_ids), self.weight, self.bias)
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)  # before ÷τ: σ/τ in softmax units
        # ÷τ and softmax in float32 at least: at τ = 0.05 the code's fp16 softmax can overflow
        probs = softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / self.temperature)
        g, selected = probs.max(-1, keepdim=True)  # the argmax has no gradient; g does
        return Routing(logits, probs, g, selected)

    def extra_repr(self) -> str:
        C, d = self.task_embedding.weight.shape
        return (f"num_clusters={C}, cluster_dim={d}, num_experts={self.weight.shape[0]}, "
                f"temperature={self.temperature:g}, noise_std={self.noise_std:g}")


class RandomClusterIds(nn.Module):
    """The random arm's source of cluster ids, shared by every layer of a model (no saved state): the first
    layer of a forward draws one uniform id per row from a seeded generator, later layers reuse it (kept in
    the forward's side dict), so a sample has one random id throughout the model, like a real cluster id."""

    def __init__(self, num_clusters: int, seed: int) -> None:
        super().__init__()
        self.num_clusters, self.seed = num_clusters, seed
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int | None = None) -> None:
        self.generator.manual_seed(self.seed if seed is None else seed)

    def draw(self, side: dict[str, Any], rows: int, device: torch.device) -> Tensor:
        ids = side.get(_DRAWN)
        if ids is None or ids.shape[0] != rows:
            ids = side[_DRAWN] = torch.randint(self.num_clusters, (rows,), generator=self.generator)
        return ids.to(device)

    def extra_repr(self) -> str:
        return f"num_clusters={self.num_clusters}, seed={self.seed}"


# --- the layer ------------------------------------------------------------------------------------

class MoCLELinear(MoELoRALinear):
    """``nn.Linear`` + E expert LoRAs (``experts``) picked per row by the layer's :class:`ClusterRouter` from
    the row's cluster id, + the universal LoRA (``universal``, one expert of the same shape; None when
    ``universal=False``). Every token of a row takes its row's route. ``gate_power`` p: λ(g) = g^p.
    The last forward's route per row (ids used, e*, g) stays in ``last_route`` for the chapter's plots."""

    def __init__(self, base_layer: nn.Linear, router: ClusterRouter, num_experts: int, r: int, scaling: float,
                 lora_dropout: float = 0.0, universal: bool = True, gate_power: int = 1, path: str = "dense",
                 random_ids: RandomClusterIds | None = None) -> None:
        super().__init__(base_layer, router, num_experts, r, scaling, lora_dropout, path)
        w = base_layer.weight
        self.universal = LoRAExperts(1, r, base_layer.in_features, base_layer.out_features, scaling,
                                     dtype=w.dtype, device=w.device) if universal else None
        self.gate_power = gate_power
        self.random_ids = random_ids  # set: the random arm (ids drawn, the side input ignored)
        self.last_route: dict[str, Tensor] = {}

    @property
    def num_clusters(self) -> int:
        return self.router.task_embedding.num_embeddings

    def row_clusters(self, x: Tensor) -> Tensor:
        """(rows,) cluster ids of the rows of ``x`` (rows, …, d): the ``cluster_ids`` side input, checked; the
        random arm's draw instead when ``random_ids`` is set."""
        rows = x.shape[0]
        if self.random_ids is not None:
            return self.random_ids.draw(self.context.side, rows, x.device)
        side = self.context.side.get("cluster_ids")
        if side is None:
            raise ValueError(f"{self.site or 'MoCLE'} needs each row's instruction cluster: pass cluster_ids=... "
                             f"(one id in [0, {self.num_clusters}) per row) to the model's forward")
        ids = torch.as_tensor(side, device=x.device)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"cluster_ids must be integer ids, got dtype {ids.dtype}")
        ids = ids.long().reshape(-1)
        if ids.shape[0] != rows:
            raise ValueError(f"cluster_ids has {ids.shape[0]} entries but the layer sees {rows} rows: give one "
                             "cluster id per row (per example × choice for flattened multiple-choice batches)")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_clusters):
            bad = sorted({i for i in ids.tolist() if not 0 <= i < self.num_clusters})
            raise ValueError(f"cluster ids must lie in [0, {self.num_clusters}) (num_clusters={self.num_clusters}); "
                             f"got {bad}")
        return ids

    def route(self, flat: Tensor, x: Tensor) -> Routing:
        """Route each row once by its cluster id and broadcast to its tokens: (T, ·) per-token routing whose
        ``weights`` are λ(g) (what :meth:`mix` weighs the chosen expert by). Reported to the context per token."""
        ids = self.row_clusters(x)
        routing = self.router(ids)
        g = routing.weights
        self.last_route = {"cluster_ids": ids.detach(), "experts": routing.selected[:, 0].detach(),
                           "gate": g[:, 0].detach()}
        per_row = flat.shape[0] // x.shape[0]
        tokens = [t.repeat_interleave(per_row, 0) for t in (routing.logits, routing.probs, routing.selected)]
        self.context.route(self.site, *tokens, x)
        return Routing(tokens[0], tokens[1], (g ** self.gate_power).repeat_interleave(per_row, 0), tokens[2])

    def forward(self, x: Tensor) -> Tensor:
        h = self.base_layer(x)
        flat = x.reshape(-1, x.shape[-1])
        routing = self.route(flat, x)
        branch = self.lora_dropout(flat)  # one mask for both branches: the equation's drop(x)
        delta = self.mix(branch, routing)  # λ(g) s B_{e*} A_{e*} drop(x)
        if self.universal is not None:
            g = routing.probs.gather(1, routing.selected)  # g itself (weights hold λ(g))
            delta = delta + self.universal.dense(branch, 1 - g)  # (1 − g) s B_u A_u drop(x)
        return h + delta.view(h.shape).to(h.dtype)

    @torch.no_grad()
    def cluster_delta(self, cluster: int) -> Tensor:
        """ΔW_c (d_out × d_in): the fixed update rows of cluster ``cluster`` get in eval mode (no noise),
        s [λ(g_c) B_{e_c} A_{e_c} + (1 − g_c) B_u A_u], rank ≤ 2r: what a per-cluster merge would add."""
        if self.random_ids is not None:
            raise ValueError("the random-routing arm has no fixed update per cluster (its ids are drawn per forward)")
        if not 0 <= cluster < self.num_clusters:
            raise ValueError(f"cluster must be an id in [0, {self.num_clusters}), got {cluster}")
        was = self.router.training
        self.router.eval()
        try:
            routing = self.router(torch.tensor([cluster], device=self.router.weight.device))
        finally:
            self.router.train(was)
        e, g = int(routing.selected[0, 0]), float(routing.weights[0, 0])
        delta = g ** self.gate_power * self.experts.delta_weight(e).float()
        if self.universal is not None:
            delta = delta + (1 - g) * self.universal.delta_weight(0).float()
        return delta

    def extra_repr(self) -> str:
        arm = "random" if self.random_ids is not None else "cluster"
        return f"path={self.path}, universal={self.universal is not None}, gate_power={self.gate_power}, routing={arm}"


# --- the config -----------------------------------------------------------------------------------

@register_method
@dataclass
class MoCLEConfig(MixtureBudget, AdapterConfig):
    """MoCLE's hyperparameters (the paper's defaults): expert rank ``r`` 8, ``lora_alpha`` α 32 (s = α/r = 4),
    ``lora_dropout`` 0.1 on the LoRA input, ``num_experts`` E 4 (plus the universal expert), ``num_clusters``
    C 64 (the k-means of the instructions; 16 also released), ``cluster_dim`` d_T 384 (the width of each layer's
    cluster table T, MiniLM's width in the paper's code), gate ``temperature`` τ 0.05 and ``noise_std`` σ 0.1
    (training only). ``gate_power`` p: λ(g) = g^p on the chosen expert (1: the paper's equation; 2: the released
    code). ``universal``: whether the universal expert exists. ``routing``: ``"cluster"`` (the method) or
    ``"random"`` (each row's id replaced by a uniform draw from ``routing_seed``; the ids given are ignored).
    ``path``: how the expert LoRAs run (see :class:`~lorafam_nb.moe.layers.MoELoRALinear`).
    The model takes ``cluster_ids`` (one id per row) in its forward call."""

    r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    num_experts: int = 4
    num_clusters: int = 64
    cluster_dim: int = EMBEDDING_DIM
    temperature: float = 0.05
    noise_std: float = 0.1
    gate_power: int = 1
    universal: bool = True
    routing: str = "cluster"
    routing_seed: int = 0
    path: str = "dense"

    method: ClassVar[str] = "mocle"
    modality: ClassVar[str] = "multimodal"  # compared on the toy vision-language model
    side_inputs: ClassVar[tuple[str, ...]] = ("cluster_ids",)
    card: ClassVar[MethodCard | None] = MethodCard(
        title="MoCLE", paper="Gou et al., 2023", arxiv="2312.12379", date="2023-12",
        idea=r"instructions clustered offline (MiniLM + k-means); each layer's gate maps the sample's cluster to "
             r"one of $E$ LoRA experts (top-1, weight $g$), mixed with an always-on universal LoRA (weight $1-g$)",
        trains=r"$A_e$, $B_e$ per expert, $A_u$, $B_u$; per layer a cluster table $T$ and gate $W_g$, $b_g$",
        frozen=r"$W_0$, the sentence encoder, the centroids", mergeable=False,
        params=r"(E+1)\,r(d_{in}+d_{out})+C\,d_T+E(d_T+1)", chapter="mocle", bibkey="gou2023mocle",
        params_note=r"$d_T=384$; the frozen MiniLM and the $C$ centroids are not counted",
        merge_note=r"the update depends on the sample's cluster: per cluster $\Delta W_c=s[g_cB_{e_c}A_{e_c}+"
                   r"(1-g_c)B_uA_u]$ (cluster_delta), not one weight",
    )

    def __post_init__(self) -> None:
        require_positive_ints(r=self.r, num_experts=self.num_experts, num_clusters=self.num_clusters,
                              cluster_dim=self.cluster_dim)
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not self.noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if self.gate_power not in (1, 2):
            raise ValueError(f"gate_power must be 1 (λ(g) = g, the paper) or 2 (g², the released code), "
                             f"got {self.gate_power!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")

    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def router(self, site: Site) -> ClusterRouter:
        w = site.module.weight
        return ClusterRouter(self.num_clusters, self.num_experts, self.cluster_dim, self.temperature,
                             self.noise_std, dtype=router_dtype(w.dtype), device=w.device)

    def build_layer(self, site: Site, scope: AdapterScope) -> MoCLELinear:
        random_ids = None
        if self.routing == "random":  # one id source per model: every layer sees the same random id per row
            random_ids = scope.shared(RANDOM_KEY, lambda: RandomClusterIds(self.num_clusters, self.routing_seed),
                                      persistent=False)
        return MoCLELinear(site.module, self.router(site), self.num_experts, self.r, self.scaling(),
                           self.lora_dropout, self.universal, self.gate_power, self.path, random_ids)

    def num_parameters(self, d_in: int, d_out: int) -> int:
        """Per adapted d_out × d_in linear: (E + 1) r (d_in + d_out) (experts + universal) + C d_T (T)
        + (d_T + 1) E (W_g, b_g); without the universal expert E r (d_in + d_out) + …"""
        loras = self.num_experts + (1 if self.universal else 0)
        return loras * self.r * (d_in + d_out) + self.num_clusters * self.cluster_dim + (self.cluster_dim + 1) * self.num_experts

