"""MoA: the routed layer against the equations by hand (router on the pooled first input, one LoRA per row,
LoRAs of unequal rank), the router loss by hand, teacher forcing and oracle routing, the recorder's
per-domain counts, stage 1 (each LoRA equals a plain LoRA run on its task; the head is their average; the
LoRAs freeze), the single-task clusters, task-id mapping, save/load, gradients, budgets, invalid configs."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import layer_io, tiny_bert
from lorafam_nb import get_adapter_model, grid, multitask
from lorafam_nb.core import AdapterModel
from lorafam_nb.experiment import RunSpec, build_model, run, training_set
from lorafam_nb.lora import LoraConfig
from lorafam_nb.moe.moa import MoAConfig, MoALinear, oracle_routing, router_of
from lorafam_nb.moe.separate import kmeans, pooled_inputs
from lorafam_nb.trainer import TrainConfig, Trainer

X = torch.randint(0, 100, (5, 9), generator=torch.Generator().manual_seed(3))
MASK = torch.ones_like(X)
MASK[1, 6:] = 0
MASK[3, 4:] = 0
SIX = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
HEAD = ["classifier"]
TASKS = ["sst2_mc", "boolq", "piqa"]
IDS = torch.tensor([0, 1, 2, 3, 1])  # task id 3 ("arc_e") has no LoRA


def moa_model(ranks=(1, 3, 2), **fields) -> tuple[torch.nn.Module, AdapterModel]:
    """A float64 tiny BERT with MoA over three LoRAs of unequal rank, every B moved off zero."""
    base = tiny_bert().double()
    cfg = MoAConfig(r=max(ranks), ranks=list(ranks), num_experts=len(ranks), lora_alpha=2.0 * max(ranks),
                    domains=TASKS, task_names=TASKS + ["arc_e"], target_modules=SIX, modules_to_save=HEAD, **fields)
    model = get_adapter_model(copy.deepcopy(base), cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.experts.lora_B.normal_(0, 0.3)
    return base, model


def by_hand(model: AdapterModel, seen, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Check every adapted linear against W_0 x + b_0 + (α/r) B_k A_k x with k per row; returns the k's.
    k = the router's argmax of W_R h̄ + b_R, h̄ the mean of the real tokens of the first linear's input,
    unless ``labels`` (teacher forcing / oracle) names the row's LoRA."""
    router = router_of(model)
    first = next(iter(seen.values()))[0]
    h = (first * MASK[..., None]).sum(1) / MASK.sum(1, keepdim=True)
    chosen = (h @ router.weight.T + router.bias).argmax(-1)
    k = chosen if labels is None else torch.where(labels >= 0, labels, chosen)
    for name, layer in model.adapter_layers().items():
        x, y = seen[name]
        experts = layer.experts
        for row in range(x.shape[0]):
            A, B = experts.pair(int(k[row]))
            ref = x[row] @ layer.base_layer.weight.T + layer.base_layer.bias + experts.scaling * (x[row] @ A.T @ B.T)
            torch.testing.assert_close(y[row], ref, atol=1e-10, rtol=0)
    return k


def test_inference_routes_each_row_by_the_router_to_one_lora():
    _, model = moa_model()
    seen = layer_io(model)
    with torch.no_grad():
        model(input_ids=X, attention_mask=MASK, task_ids=IDS)
    k = by_hand(model, seen)
    assert router_of(model).selected.tolist() == k.tolist()
    assert model.adapter_config.expert_ranks() == [1, 3, 2]
    assert tuple(model.adapter_layers()["bert.encoder.layer.0.attention.self.query"].experts.lora_A.shape) == (6, 32)


def test_training_routes_by_the_label_and_adds_the_router_loss_by_hand():
    _, model = moa_model()
    model.train()
    seen = layer_io(model)
    model(input_ids=X, attention_mask=MASK, task_ids=IDS, labels=torch.zeros(5, dtype=torch.long))
    labels = torch.tensor([0, 1, 2, -1, 1])  # expert_of_task: task id 3 has none
    k = by_hand(model, seen, labels)
    assert k.tolist()[:3] == [0, 1, 2] and k[4] == 1
    router = router_of(model)
    first = next(iter(seen.values()))[0]
    h = (first * MASK[..., None]).sum(1) / MASK.sum(1, keepdim=True)
    logits = h @ router.weight.T + router.bias
    known = labels >= 0
    expected = -torch.log_softmax(logits, -1)[known].gather(1, labels[known][:, None]).mean()
    torch.testing.assert_close(model.aux_losses()["router"], expected)
    cfg = dataclasses.replace(model.adapter_config, router_loss_weight=0.25)
    model.adapter_config = cfg
    torch.testing.assert_close(model.aux_losses()["router"], 0.25 * expected)


def test_without_teacher_forcing_training_routes_by_the_router():
    _, model = moa_model(teacher_forcing=False)
    model.train()
    seen = layer_io(model)
    model(input_ids=X, attention_mask=MASK, task_ids=IDS)
    by_hand(model, seen)


def test_oracle_routing_uses_the_label_at_inference():
    _, model = moa_model()
    oracle_routing(model)
    seen = layer_io(model)
    with torch.no_grad():
        model(input_ids=X, attention_mask=MASK, task_ids=IDS)
    by_hand(model, seen, torch.tensor([0, 1, 2, -1, 1]))
    oracle_routing(model, False)


def test_recorder_counts_each_domain_rows_and_the_router_choice():
    _, model = moa_model()
    with torch.no_grad():
        model(input_ids=X, attention_mask=MASK, task_ids=IDS)
        model(input_ids=X[:2], attention_mask=MASK[:2])  # no task ids: unlabelled
    layers = model.recorder.layers
    assert {n: s.n_tokens for n, s in layers.items()} == {"domain 0": 1, "domain 1": 2, "domain 2": 1,
                                                          "no domain": 1, "unlabelled": 2}
    chosen = router_of(model).selected  # the last forward's (unlabelled) choices
    assert layers["unlabelled"].tokens.tolist() == torch.bincount(chosen, minlength=3).tolist()


def test_init_equals_base_and_a_training_forward_without_task_ids_raises():
    base = tiny_bert()
    cfg = MoAConfig(r=2, num_experts=3, domains=TASKS, task_names=TASKS, target_modules=SIX, modules_to_save=HEAD)
    model = get_adapter_model(copy.deepcopy(base), cfg).eval()
    assert all(isinstance(m, MoALinear) for m in model.adapter_layers().values())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=X, attention_mask=MASK).logits,
                                   base(input_ids=X, attention_mask=MASK).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="pass task_ids"):
        model.train()(input_ids=X, attention_mask=MASK)
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 3\)"):
        model(input_ids=X, attention_mask=MASK, task_ids=torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="one task id per row"):
        model(input_ids=X, attention_mask=MASK, task_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge()


def test_without_stage_one_every_row_is_domain_zero():
    """Injected without tasks or clusters (no stage 1), training labels every row with LoRA 0."""
    _, model = moa_model()
    model.adapter_config = dataclasses.replace(model.adapter_config, domains=[], task_names=[])
    fresh = get_adapter_model(tiny_bert().double(), model.adapter_config)
    fresh.load_adapter_state_dict(model.adapter_state_dict())
    fresh.train()
    seen = layer_io(fresh)
    fresh(input_ids=X, attention_mask=MASK, labels=torch.zeros(5, dtype=torch.long))
    assert by_hand(fresh, seen, torch.zeros(5, dtype=torch.long)).tolist() == [0] * 5
    assert fresh.recorder.layers["domain 0"].n_tokens == 5 and "router" in fresh.aux_losses()


def test_stage_two_gradients_reach_the_router_and_the_head_only():
    _, model = moa_model()
    for layer in model.adapter_layers().values():
        layer.experts.requires_grad_(False)  # what stage 1 leaves
    model.train()
    out = model(input_ids=X, attention_mask=MASK, task_ids=IDS, labels=torch.tensor([0, 1, 0, 1, 1]))
    (out.loss + model.aux_loss()).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == trainable == {"adapter_scope.entries.moa_router.weight", "adapter_scope.entries.moa_router.bias",
                                "model.classifier.weight", "model.classifier.bias"}


def test_save_load_round_trip_keeps_loras_router_and_centroids(tmp_path):
    base, model = moa_model()
    router = router_of(model)
    with torch.no_grad():
        router.centroids.normal_()
        router.has_centroids.fill_(True)
    model.save_adapter(tmp_path)
    loaded = AdapterModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert loaded.adapter_config == model.adapter_config
    torch.testing.assert_close(router_of(loaded).centroids, router.centroids)
    assert bool(router_of(loaded).has_centroids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=X, attention_mask=MASK, task_ids=IDS).logits,
                                   model(input_ids=X, attention_mask=MASK, task_ids=IDS).logits, atol=0, rtol=0)
    # the router is saved once, by the scope
    assert sum(".router." in k for k in model.adapter_state_dict()) == 0


def test_resolve_maps_task_ids_to_loras_and_checks_the_count():
    spec = multitask.spec(MoAConfig(num_experts=len(multitask.TRAIN_TASKS)))
    cfg = spec.finetune.resolve(spec)
    assert cfg.domains == list(multitask.TRAIN_TASKS) and cfg.task_names == list(multitask.MULTITASK_TASKS)
    assert cfg.expert_of_task() == list(range(9)) + [-1]  # the held-out task has no LoRA
    with pytest.raises(ValueError, match="one LoRA per task of the mix: num_experts=5 but the run mixes 9"):
        MoAConfig().resolve(spec)
    single = MoAConfig(domains=["a", "b", "c", "d", "e"]).resolve(RunSpec(task="sst2_mc"))
    assert single.domains == [] and single.task_names == []


@pytest.mark.parametrize("fields, message", [
    (dict(ranks=[1, 2]), "one positive integer rank per LoRA"),
    (dict(r=3, ranks=[1, 2, 2, 1, 1]), "r is the largest of ranks"),
    (dict(r=0), "positive integer"),
    (dict(num_experts=0), "num_experts must be a positive integer"),
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
    (dict(router_loss_weight=-1.0), "non-negative"),
    (dict(num_experts=2, domains=["a", "a"]), "one distinct task per LoRA"),
])
def test_invalid_configs_raise(fields, message):
    with pytest.raises(ValueError, match=message):
        MoAConfig(**fields)


def test_kmeans_recovers_separated_clusters_and_keeps_every_cluster_non_empty():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(20, 2, generator=g) for c in centres])
    centroids, assign = kmeans(x, 3, seed=1)
    for j in range(3):  # each blob is one cluster
        assert assign[20 * j:20 * (j + 1)].unique().numel() == 1
    torch.testing.assert_close(centroids[assign[::20]], centres.double(), atol=0.1, rtol=0)
    _, assign = kmeans(torch.zeros(4, 2), 3)  # identical points: still three non-empty clusters
    assert sorted(torch.bincount(assign, minlength=3).tolist()) == [1, 1, 2]
    with pytest.raises(ValueError, match="at least 3 training examples"):
        kmeans(torch.zeros(2, 2), 3)


TRAIN = TrainConfig(lr=1e-3, batch_size=4, progress=False, log_every=1)


def test_stage_one_trains_each_lora_alone_and_freezes_it():
    """Expert k of every layer is exactly the LoRA that a plain run on task k trains (rank r_k, α_k = s r_k,
    same seed and settings) against the mixture's initial head, frozen; that head is left as it was; the
    LoRAs freeze."""
    cfg = MoAConfig(r=2, ranks=[1, 2], num_experts=2, lora_alpha=4.0)
    spec = multitask.spec(cfg, tasks=("sst2_mc", "boolq"), train_n=4, eval_n=4, max_length=24, train=TRAIN)
    model = build_model(spec)
    assert model.stage_one.domains == ["sst2_mc", "boolq"] and model.stage_one.sizes == [4, 4]
    for k, task in enumerate(("sst2_mc", "boolq")):
        lora = LoraConfig(r=[1, 2][k], lora_alpha=2.0 * [1, 2][k], target_modules="all-linear")
        alone = dataclasses.replace(spec, task=task, mix=(), task_ids=(), finetune=lora)
        plain = build_model(alone)  # the same seed: the same fresh head as the mixture's, which stage 1 left alone
        torch.testing.assert_close(plain.model.classifier.weight, model.model.classifier.weight, atol=0, rtol=0)
        plain.model.bert.pooler.requires_grad_(False)
        plain.model.classifier.requires_grad_(False)
        Trainer(plain, training_set(alone), dataclasses.replace(TRAIN, seed=0)).train()
        for name, layer in model.adapter_layers().items():
            A, B = layer.experts.pair(k)
            torch.testing.assert_close(A, plain.adapter_layers()[name].lora_A, atol=0, rtol=0)
            torch.testing.assert_close(B, plain.adapter_layers()[name].lora_B, atol=0, rtol=0)
        torch.testing.assert_close(plain.model.bert.pooler.dense.weight, model.model.bert.pooler.dense.weight,
                                   atol=0, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("router" in n or ".pooler." in n or ".classifier." in n for n in trainable)
    out = run(spec, model)  # stage 2: the router learns the two domains' labels
    assert out.history[-1]["router"] > 0 and out.row["trainable"] == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    names, load = model.recorder.load_matrix()  # the final evaluation's routing, per domain
    assert names == ["domain 0", "domain 1"] and torch.allclose(load.sum(1), torch.ones(2, dtype=load.dtype))


def test_single_task_run_clusters_its_training_set_and_labels_rows_by_the_centroids():
    cfg = MoAConfig(r=1, num_experts=3, lora_alpha=2.0)
    spec = RunSpec(task="sst2_mc", finetune=cfg, train_n=9, eval_n=4, max_length=24, train=TRAIN)
    model = build_model(spec)
    stage = model.stage_one
    assert stage.domains == [f"sst2_mc cluster {i}" for i in range(3)] and sum(stage.sizes) == 9
    assert min(stage.sizes) >= 1
    router = router_of(model)
    assert bool(router.has_centroids)
    centroids, assign = kmeans(pooled_inputs(model, training_set(spec)), 3, seed=0)
    torch.testing.assert_close(router.centroids, centroids.float())
    assert torch.bincount(assign, minlength=3).tolist() == stage.sizes
    out = run(spec, model)
    assert "router" in out.history[-1]


@pytest.fixture(scope="module")
def shapes():
    return {m: grid.model_shape(m) for m in ("minilm", "smollm2-135m")}


@pytest.mark.parametrize("model, ranks, count", [
    # MiniLM: 36 linears, S_io = 41,472; 5 LoRAs of ranks summing to 8 plus the router 5 (384 + 1).
    ("minilm", [1, 1, 2, 2, 2], 8 * 41_472 + 5 * 385),
    # SmolLM2-135M: 210 linears, S_io = 305,280; router 5 (576 + 1).
    ("smollm2-135m", [1, 1, 2, 2, 2], 8 * 305_280 + 5 * 577),
])
def test_budget_matches_lora_r8_with_the_router_counted(shapes, model, ranks, count):
    shape = shapes[model]
    sites = grid.method_sites(MoAConfig, shape)
    target = grid.reference_count(shape, 8)
    budget = grid.match_budget(MoAConfig, sites, target)
    assert budget.values == {"r": 2, "num_experts": 5, "ranks": ranks}
    assert budget.closed_form == count and budget.matched
    config = MoAConfig.sized(budget.values, shape.targets)
    assert config.lora_alpha == 4.0 and config.scaling() == 2.0  # every LoRA at LoRA's scale α/r = 2
    if model == "minilm":  # the injected model trains exactly the closed form (both stages' parameters)
        adapted = get_adapter_model(copy.deepcopy(shape.base), config)
        assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == count


def test_grid_cells_run_both_stages_single_task_and_mix():
    """One single-task cell (k-means pseudo-domains) and the mix cell (one LoRA per task) of the grid at
    tiny sizes: the planned budget is matched, and what stage 2 trains is the router (and the head)."""
    profile = grid.Profile("test", {"minilm": grid.ModelSettings(8, 8, 24, 8, 1e-3)}, methods=("moa",))
    cells = {run.task: run for run in grid.plan(profile)}
    for task in (grid.TASKS[0], grid.MIX):
        record = grid.execute(cells[task], device="cpu")
        assert record["params"]["closed_form"] == 8 * 41_472 + 5 * 385
        assert record["params"]["real"] == 5 * 385  # after stage 1: the router; the LoRAs are frozen
        trained = record["adapter_trained"]
        assert trained["domains"] == (list(grid.TASKS) if task == grid.MIX else [])
        assert set(record["accuracy"]) == set(cells[task].tasks)
