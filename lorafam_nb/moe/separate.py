"""Mixtures of *separately trained* LoRAs: the first stage that MoA and MoLE share.

MoA (:mod:`.moa`) and MoLE (:mod:`.mole`) do not train their experts jointly. Stage 1 trains N ordinary
LoRAs, each on its own data; stage 2 freezes them and trains only what combines them (MoA's router,
MoLE's gates). This module holds what both need:

* :class:`RankedLoRAs` — N LoRAs on one frozen linear, each with its own rank ``r_i`` but one scale s,
  stored side by side as one rank-Σr_i pair ``A = [A_1; …; A_N]``, ``B = [B_1 … B_N]``. A gate g per
  expert then scales expert i's r_i coordinates: ``Σ_i g_i s B_i A_i x = s B (g[owner] ⊙ A x)``.
  Unequal ranks let a mixture of N LoRAs meet a parameter budget that N equal ranks miss (N = 5 LoRAs
  against LoRA r = 8: ranks 1, 1, 2, 2, 2).
* :class:`SeparateLoRAsConfig` — the fields both share (``r``, ``lora_alpha``, ``num_experts``, ``ranks``)
  and stage 1 itself, run by :meth:`~lorafam_nb.core.AdapterConfig.prepare` once the layers are injected:
  for each expert i, a plain :class:`~lorafam_nb.lora.LoraConfig` run (rank r_i, scale s, the same
  targets, the run's training settings) on that expert's data, whose A and B are then copied into
  expert i of every layer and frozen.
* Which data each expert trains on. In a multi-task run (``RunSpec.mix``) expert i is the LoRA of the
  mix's i-th task, and ``num_experts`` must equal the number of tasks (:meth:`~SeparateLoRAsConfig.resolve`
  records the tasks, so that task ids map to experts). A single-task run has no domains: its training
  set is split into N *pseudo-domains* by k-means over the mean-pooled input of the model's first
  adapted linear (the same representation MoA's router reads), and expert i trains on cluster i.
* The task head (an encoder's pooler and classifier, fresh at the start) is shared: every stage-1 LoRA is
  trained against the mixture's own initial head, frozen, as a decoder's LoRAs all speak to its one frozen
  LM head, so that the skill sits in the LoRA and the LoRAs fit one head. Stage 2 trains the head on
  (as the book trains every method's head), unless ``train_head`` is off: then it stays the head every
  LoRA was trained against, and stage 2 trains only the router or gates, as the papers do.

Counting: a budget counts what the method trains over both stages — the N LoRAs (stage 1) and the
router or gates (stage 2). An injected model holds exactly that as trainable parameters; stage 1 then
freezes the LoRAs, so a model after :meth:`~SeparateLoRAsConfig.prepare` trains only the stage-2 part.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..core import BUDGET_TOLERANCE, AdapterConfig, AdapterContext, AdapterModel, Site, saved_module_names
from ..lora import LoraConfig
from ..tasks import EncodedTask, batch_to, collate, score_batch
from .layers import spread

if TYPE_CHECKING:
    from ..experiment import RunSpec
    from ..trainer import TrainResult

__all__ = ["RankedLoRAs", "SeparateLoRAsConfig", "StageOne", "kmeans", "pool_rows", "pooled_inputs",
           "train_experts"]


class RankedLoRAs(nn.Module):
    """N LoRAs on one d_out × d_in weight with ranks ``ranks`` and one scale s: ``lora_A`` (Σr, d_in) holds
    A_1 … A_N stacked, ``lora_B`` (d_out, Σr) holds B_1 … B_N side by side; ``owner`` names the expert of
    each of the Σr coordinates. Init as LoRA, expert by expert: A Kaiming-uniform, B = 0."""

    def __init__(self, ranks: Sequence[int], d_in: int, d_out: int, scaling: float,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        if not ranks or any(not isinstance(r, int) or r <= 0 for r in ranks):
            raise ValueError(f"every LoRA needs a positive integer rank, got {list(ranks)}")
        self.ranks, self.scaling = list(ranks), scaling
        total = sum(ranks)
        self.lora_A = nn.Parameter(torch.empty(total, d_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, total, dtype=dtype, device=device))
        nn.init.uniform_(self.lora_A, -1 / math.sqrt(d_in), 1 / math.sqrt(d_in))  # kaiming_uniform_(a=√5)
        owner = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks))
        self.register_buffer("owner", owner.to(device), persistent=False)

    @property
    def num_experts(self) -> int:
        return len(self.ranks)

    def span(self, i: int) -> slice:
        start = sum(self.ranks[:i])
        return slice(start, start + self.ranks[i])

    def pair(self, i: int) -> tuple[Tensor, Tensor]:
        """(A_i, B_i): views of expert i's factors, (r_i, d_in) and (d_out, r_i)."""
        return self.lora_A[self.span(i)], self.lora_B[:, self.span(i)]

    @torch.no_grad()
    def load(self, i: int, A: Tensor, B: Tensor) -> None:
        """Copy a trained LoRA's (A, B) into expert i."""
        own_A, own_B = self.pair(i)
        if A.shape != own_A.shape or B.shape != own_B.shape:
            raise ValueError(f"expert {i} holds A {tuple(own_A.shape)}, B {tuple(own_B.shape)}; got A "
                             f"{tuple(A.shape)}, B {tuple(B.shape)}")
        own_A.copy_(A)
        own_B.copy_(B)

    def delta_weight(self, i: int) -> Tensor:
        """Expert i's update as a dense d_out × d_in matrix, ``s B_i A_i``."""
        A, B = self.pair(i)
        return self.scaling * B @ A

    def mix(self, x: Tensor, gates: Tensor) -> Tensor:
        """``Σ_i g_ti · s B_i A_i x_t`` for (T, d_in) tokens and (T, N) gates -> (T, d_out): one rank-Σr LoRA
        whose coordinates are scaled by their expert's gate."""
        z = (x @ self.lora_A.t()) * gates.to(x.dtype)[:, self.owner]
        return z @ self.lora_B.t() * self.scaling

    def outputs(self, x: Tensor) -> Tensor:
        """Each expert's output on its own, ``s B_i A_i x_t``: (T, d_in) -> (T, N, d_out)."""
        z = x @ self.lora_A.t()
        return torch.stack([z[:, self.span(i)] @ self.pair(i)[1].t() for i in range(self.num_experts)], 1) * self.scaling

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, d_in={self.lora_A.shape[1]}, d_out={self.lora_B.shape[0]}, scaling={self.scaling:g}"


def pool_rows(x: Tensor, context: AdapterContext) -> Tensor:
    """The mean of each row's real (non-padding) tokens, in at least float32: x (rows, …, d) -> (rows, d)."""
    rows = x.shape[0]
    flat = x.reshape(rows, -1, x.shape[-1])
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    keep = context.real_tokens(x)
    if keep is None:
        return flat.mean(1)
    weight = keep.view(rows, -1).to(flat.dtype)
    return (flat * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp_min(1)


@torch.no_grad()
def pooled_inputs(model: AdapterModel, task: EncodedTask, batch_size: int = 32) -> Tensor:
    """(examples, d): each example's mean-pooled input to the model's first adapted linear (its choices'
    rows averaged for multiple-choice data), the representation stage 1 clusters."""
    first = next(iter(model.adapter_layers().values()))
    seen: list[Tensor] = []
    hook = first.register_forward_pre_hook(lambda module, args: seen.append(pool_rows(args[0], model.context)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for start in range(0, len(task), batch_size):
            chunk = task.examples[start:start + batch_size]
            seen.clear()
            score_batch(model, task, batch_to(collate(task, chunk), device))
            rows = seen[0]
            out.append(rows.view(len(chunk), -1, rows.shape[-1]).mean(1).cpu())
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(out)


def kmeans(x: Tensor, k: int, seed: int = 0, iterations: int = 100) -> tuple[Tensor, Tensor]:
    """k-means (k-means++ seeding, Lloyd's iterations) of the rows of x: (centroids (k, d), assignment (n,)).
    Every cluster keeps at least one point: an empty cluster takes the point farthest from its centroid
    among clusters that have more than one."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"cannot split {n} examples into {k} clusters: give at least {k} training examples")
    x = x.double()
    g = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(n, (1,), generator=g))]
    for _ in range(1, k):
        d2 = torch.cdist(x, x[chosen]).pow(2).min(1).values
        chosen.append(int(torch.multinomial(d2, 1, generator=g)) if d2.sum() > 0 else
                      int(torch.randint(n, (1,), generator=g)))
    centroids = x[chosen].clone()
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        distance = torch.cdist(x, centroids)
        new = distance.argmin(1)
        for j in range(k):
            if not (new == j).any():
                counts = torch.bincount(new, minlength=k)
                far = distance.gather(1, new[:, None]).squeeze(1).masked_fill(counts[new] < 2, -1.0)
                new[int(far.argmax())] = j
        if torch.equal(new, assign):
            break
        assign = new
        centroids = torch.stack([x[assign == j].mean(0) for j in range(k)])
    return centroids, assign


@dataclass
class StageOne:
    """What stage 1 did: the data of each expert (a task name, or ``"<task> cluster i"``), its training
    examples, its run's training result, and the k-means centroids of a single-task run (else None)."""

    domains: list[str]
    sizes: list[int]
    results: list[TrainResult]
    centroids: Tensor | None = None


@dataclass
class SeparateLoRAsConfig(AdapterConfig):
    """What MoA and MoLE share (not a method itself): ``num_experts`` N LoRAs of rank ``r`` (or one rank each,
    ``ranks``, with ``r`` their largest), one scale s = ``lora_alpha`` / r for all, ``lora_dropout`` on their
    input. ``domains`` (the task of each expert) and ``task_names`` (the tasks the ``task_ids`` side input
    indexes) are filled in from the run by :meth:`resolve`; a single-task run leaves ``domains`` empty.
    ``train_head``: whether stage 2 trains the task head (``modules_to_save``) beside the router or gates."""

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    num_experts: int = 5
    ranks: list[int] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    task_names: list[str] = field(default_factory=list)
    train_head: bool = True

    budget_knob: ClassVar[str] = "r"
    max_experts: ClassVar[int] = 10  # budget candidates: 2 … 10 LoRAs (the multi-task setting's ten tasks)
    max_total_rank: ClassVar[int] = 96  # … with Σ r_i up to 96 (LoRA r = 80 of the reference table fits)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"rank r must be a positive integer, got {self.r!r}")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {self.num_experts!r}")
        if self.ranks:
            if len(self.ranks) != self.num_experts or any(not isinstance(r, int) or r <= 0 for r in self.ranks):
                raise ValueError(f"ranks gives one positive integer rank per LoRA ({self.num_experts}), got {self.ranks}")
            if max(self.ranks) != self.r:
                raise ValueError(f"r is the largest of ranks (it sets the scale α/r): ranks {self.ranks} need "
                                 f"r={max(self.ranks)}, got r={self.r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.domains and (len(self.domains) != self.num_experts or len(set(self.domains)) != len(self.domains)):
            raise ValueError(f"domains names one distinct task per LoRA ({self.num_experts}), got {self.domains}")

    # --- sizes ---------------------------------------------------------------------------------------
    def expert_ranks(self) -> list[int]:
        return list(self.ranks) or [self.r] * self.num_experts

    def scaling(self) -> float:
        """s = α / r, shared by every LoRA (each stage-1 LoRA of rank r_i is trained with α_i = s r_i)."""
        return self.lora_alpha / self.r

    def make_experts(self, site: Site) -> RankedLoRAs:
        w = site.module.weight
        return RankedLoRAs(self.expert_ranks(), site.d_in, site.d_out, self.scaling(), dtype=w.dtype, device=w.device)

    def site_parameters(self, site: Site) -> int:
        """The N LoRAs on ``site``, Σ_i r_i (d_in + d_out); routers and gates are the model's, counted once by
        :meth:`model_parameters`."""
        return sum(self.expert_ranks()) * (site.d_in + site.d_out)

    @classmethod
    def expert_candidates(cls) -> list[dict[str, Any]]:
        """Budget candidates: N LoRAs (2 … ``max_experts``) with a total rank R ≥ N spread over them as evenly
        as integers allow (``ranks`` only when unequal)."""
        out = []
        for n in range(2, cls.max_experts + 1):
            for total in range(n, cls.max_total_rank + 1):
                ranks = spread(total, n)
                out.append({"r": max(ranks), "num_experts": n, "ranks": ranks if len(set(ranks)) > 1 else []})
        return out

    @classmethod
    def expert_order(cls, values: dict[str, Any], count: int, target: int) -> tuple[bool, int]:
        """Matched candidates first, and among those the number of LoRAs nearest the default."""
        unmatched = abs(count / target - 1) > BUDGET_TOLERANCE
        default = cls.__dataclass_fields__["num_experts"].default
        return unmatched, 0 if unmatched else abs(values["num_experts"] - default)

    # --- the stages ----------------------------------------------------------------------------------
    def resolve(self, spec: RunSpec) -> SeparateLoRAsConfig:
        """The config for ``spec``: in a multi-task run, one LoRA per task of the mix (their order), and the
        task list that the examples' task ids index; a single-task run has no domains (stage 1 clusters)."""
        if len(spec.mix) < 2:
            return dataclasses.replace(self, domains=[], task_names=[])
        if len(spec.mix) != self.num_experts:
            raise ValueError(f"{self.method} trains one LoRA per task of the mix: num_experts={self.num_experts} but "
                             f"the run mixes {len(spec.mix)} tasks {list(spec.mix)}; set num_experts={len(spec.mix)}")
        return dataclasses.replace(self, domains=list(spec.mix), task_names=list(spec.task_ids or spec.mix))

    def expert_of_task(self) -> list[int]:
        """For each task id (an index into ``task_names``): the LoRA trained on that task, or -1 if none was."""
        return [self.domains.index(t) if t in self.domains else -1 for t in self.task_names]

    def prepare(self, model: AdapterModel, spec: RunSpec) -> None:
        """Stage 1 (:func:`train_experts`); the model keeps its record as ``model.stage_one``. Without
        ``train_head`` the head is frozen too, so that stage 2 trains only the router or gates."""
        model.stage_one = train_experts(model, spec)
        self.load_stage_one(model, model.stage_one)
        if not self.train_head:
            for name in saved_module_names(model.model, self):
                model.model.get_submodule(name).requires_grad_(False)

    def load_stage_one(self, model: AdapterModel, stage: StageOne) -> None:
        """What a method keeps from stage 1 beyond the LoRAs (MoA: the clusters' centroids). Nothing by default."""


def _expert_layers(model: AdapterModel) -> dict[str, nn.Module]:
    return {n: layer for n, layer in model.adapter_layers().items() if isinstance(getattr(layer, "experts", None),
                                                                                   RankedLoRAs)}


def train_experts(model: AdapterModel, spec: RunSpec) -> StageOne:
    """Stage 1 for ``model`` (a mixture of separately trained LoRAs, just injected) on ``spec``'s data.

    Expert i: a plain LoRA (rank r_i, α_i = s r_i, the mixture's targets and dropout, the run's training
    settings, ``spec.seed``) trained on task ``domains[i]`` alone, or on k-means cluster i of a single-task
    run's training set, against ``model``'s task head, copied in and frozen; its A and B go into expert i of
    every layer. Then every LoRA is frozen.
    """
    from ..experiment import build_model, training_set
    from ..trainer import Trainer

    config = model.adapter_config
    if not isinstance(config, SeparateLoRAsConfig):
        raise ValueError(f"stage 1 trains the LoRAs of MoA/MoLE-type configs, not {config.method}")
    layers = _expert_layers(model)
    ranks, s = config.expert_ranks(), config.scaling()
    single = dataclasses.replace(spec, mix=(), task_ids=(), eval_on=())
    centroids = None
    if config.domains:
        domains = list(config.domains)
        data = [training_set(dataclasses.replace(single, task=t)) for t in domains]
    else:
        pooled = training_set(single)
        vectors = pooled_inputs(model, pooled)
        centroids, assign = kmeans(vectors, config.num_experts, seed=spec.seed)
        domains = [f"{spec.task} cluster {i}" for i in range(config.num_experts)]
        data = [dataclasses.replace(pooled, examples=[e for e, a in zip(pooled.examples, assign.tolist()) if a == i])
                for i in range(config.num_experts)]
    heads = {name: model.model.get_submodule(name).state_dict() for name in saved_module_names(model.model, config)}
    results = []
    for i, (domain, examples) in enumerate(zip(domains, data)):
        lora = LoraConfig(r=ranks[i], lora_alpha=s * ranks[i], lora_dropout=config.lora_dropout,
                          target_modules=config.target_modules, modules_to_save=list(config.modules_to_save))
        run = dataclasses.replace(single, task=spec.task if not config.domains else domain, finetune=lora)
        trained = build_model(run)
        for name, state in heads.items():  # the mixture's head, shared and frozen
            head = trained.model.get_submodule(name)
            head.load_state_dict(state)
            head.requires_grad_(False)
        results.append(Trainer(trained, examples, dataclasses.replace(spec.train, seed=spec.seed)).train())
        theirs = trained.adapter_layers()
        for name, layer in layers.items():
            layer.experts.load(i, theirs[name].lora_A.detach().to(layer.experts.lora_A),
                               theirs[name].lora_B.detach().to(layer.experts.lora_B))
        del trained
    for layer in layers.values():
        layer.experts.requires_grad_(False)
    return StageOne(domains, [len(d) for d in data], results, None if centroids is None else centroids.float())
