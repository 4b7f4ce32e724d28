"""Polytropon: the layer against the paper's equations by hand (eval σ(Z), training Gumbel-sigmoid, MHR splits),
parity with peft's ``poly`` tuner (logits, the relaxed-Bernoulli sample, adapters exchanged in peft's format
both ways), per-task merging, few-shot adaptation of one allocation row, gradients, save/load, the recorder,
budgets and invalid settings."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import tiny_bert
from lorafam_nb import get_adapter_model, load_peft, save_peft
from lorafam_nb.core import AdapterModel, AdapterScope, site_of
from lorafam_nb.experiment import RunSpec
from lorafam_nb.moe.layers import merge_task
from lorafam_nb.moe.polytropon import (EPS, PolyLinear, PolytroponConfig, allocation, allocation_entropy,
                                       train_allocation_only)
from lorafam_nb.tasks import EncodedTask
from lorafam_nb.data import task_info
from lorafam_nb.trainer import TrainConfig, Trainer

X = torch.randint(1, 100, (4, 9), generator=torch.Generator().manual_seed(3))
MASK = torch.ones_like(X)
MASK[1, 6:] = 0
TASKS = torch.tensor([0, 2, 2, 1])
HEAD = ["classifier"]
SIX = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _perturb(model: AdapterModel, std: float = 0.3, seed: int = 1) -> AdapterModel:
    """Move every skill and allocation off its init (B = 0 and Z ≈ 0 would make every check trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            for p in (layer.lora_B, layer.lora_A, layer.module_logits):
                p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _layer(n_splits: int = 1, n_skills: int = 3, r: int = 2, n_tasks: int = 4, d_in: int = 12, d_out: int = 8):
    torch.manual_seed(0)
    host = torch.nn.Sequential(torch.nn.Linear(d_in, d_out)).double().requires_grad_(False)
    cfg = PolytroponConfig(r=r, n_skills=n_skills, n_tasks=n_tasks, n_splits=n_splits)
    layer = cfg.build_layer(site_of(host, "0"), AdapterScope()).double()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
        layer.module_logits.normal_(0, 1.0)
    return layer


def _by_hand(layer: PolyLinear, x: torch.Tensor, tasks: torch.Tensor, z_hat: torch.Tensor) -> torch.Tensor:
    """h = W0 x + b0 + (1/r) B^(t) A^(t) x per row, with A_s ∈ R^{r×d_in}, B_s ∈ R^{d_out×r} in the paper's
    orientation, mixed split by split: w = ẑ / (Σ ẑ + ε), A^(t) = Σ_s w_s A_s, B^(t) = Σ_s w_s B_s."""
    h_splits, S = layer.n_splits, layer.n_skills
    out = x @ layer.base_layer.weight.T + layer.base_layer.bias
    for row in range(x.shape[0]):
        blocks_A, blocks_B = [], []
        for q in range(h_splits):
            w = z_hat[row, q] / (z_hat[row, q].sum() + EPS)
            blocks_A.append(sum(w[s] * layer.lora_A[q, s].T for s in range(S)))  # (r, d_in/h)
            blocks_B.append(sum(w[s] * layer.lora_B[q, s].T for s in range(S)))  # (d_out/h, r)
        A_t, B_t = torch.cat(blocks_A, 1), torch.cat(blocks_B, 0)  # (r, d_in), (d_out, r)
        out[row] = out[row] + x[row] @ A_t.T @ B_t.T / layer.r
    return out


@pytest.mark.parametrize("n_splits", [1, 2])
def test_eval_layer_equals_the_equation_with_sigmoid_allocation(n_splits):
    layer = _layer(n_splits).eval()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    tasks = torch.tensor([3, 0, 3])
    layer.context.start_forward({"task_ids": tasks}, None)
    z_hat = torch.sigmoid(layer.module_logits[tasks]).view(3, n_splits, 3)
    got = layer(x)
    torch.testing.assert_close(got, _by_hand(layer, x, tasks, z_hat), atol=1e-10, rtol=1e-10)
    if n_splits == 1:  # the product of averages, not the average of products (a higher-rank update)
        w = z_hat[:, 0] / z_hat[:, 0].sum(-1, keepdim=True)
        products = sum(w[:, s, None, None] * (x @ layer.lora_A[0, s] @ layer.lora_B[0, s]) for s in range(3)) / 2
        assert (got - (x @ layer.base_layer.weight.T + layer.base_layer.bias + products)).abs().max() > 1e-3


def test_training_layer_uses_the_gumbel_sigmoid_sample():
    """σ((Z + log u − log(1 − u)) / τ), one u per row and skill, drawn as torch.rand draws it."""
    layer = _layer(n_splits=2).train()
    layer.temperature = 0.5
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    tasks = torch.tensor([1, 1, 2])
    layer.context.start_forward({"task_ids": tasks}, None)
    torch.manual_seed(11)
    got = layer(x)
    torch.manual_seed(11)
    u = torch.rand(3, 2, 3, dtype=torch.float64)
    z_hat = torch.sigmoid((layer.module_logits[tasks].view(3, 2, 3) + u.log() - (1 - u).log()) / 0.5)
    torch.testing.assert_close(got, _by_hand(layer, x, tasks, z_hat), atol=1e-10, rtol=1e-10)


def test_init_is_the_base_model_and_counts_match_the_formula():
    base = tiny_bert()
    cfg = PolytroponConfig(r=2, n_skills=4, n_tasks=5, target_modules=SIX, modules_to_save=HEAD)
    model = get_adapter_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=X, task_ids=TASKS).logits, base(input_ids=X).logits)
    real = sum(p.numel() for l in model.adapter_layers().values() for p in l.parameters() if p.requires_grad)
    assert real == cfg.model_parameters(cfg.sites(base)) == sum(
        4 * 2 * (s.d_in + s.d_out) + 5 * 4 for s in cfg.sites(base))
    # the spec's MiniLM example: |S| = 4, r = 4 on the four attention linears, 5 tasks: 49,232 per layer
    assert 4 * PolytroponConfig(r=4, n_skills=4, n_tasks=5).num_parameters(384, 384) == 49_232


def test_rows_without_task_ids_are_the_default_task():
    model = _perturb(get_adapter_model(tiny_bert(), PolytroponConfig(n_tasks=3, default_task=2,
                                                                    target_modules=SIX))).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=X).logits, model(input_ids=X, task_ids=torch.full((4,), 2)).logits)


# --- parity with peft 0.21.2's poly tuner ------------------------------------------------------------------

def _peft_poly(n_splits: int = 1, task_type: str | None = None):
    from peft import PolyConfig, get_peft_model
    base = tiny_bert()
    ours = _perturb(get_adapter_model(copy.deepcopy(base), PolytroponConfig(
        r=2, n_skills=3, n_tasks=4, n_splits=n_splits, target_modules=SIX, modules_to_save=HEAD)))
    theirs = get_peft_model(copy.deepcopy(base), PolyConfig(
        r=2, n_skills=3, n_tasks=4, n_splits=n_splits, target_modules=SIX, modules_to_save=HEAD, task_type=task_type))
    with torch.no_grad():
        for name, layer in ours.adapter_layers().items():
            module = theirs.base_model.model.get_submodule(name)
            module.poly_lora_A["default"].copy_(layer.lora_A)
            module.poly_lora_B["default"].copy_(layer.lora_B)
            module.poly_router["default"].module_logits.copy_(layer.module_logits)
    return ours, theirs


@pytest.mark.parametrize("n_splits", [1, 2])
def test_logits_match_peft_poly(n_splits):
    ours, theirs = _peft_poly(n_splits)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        mine = ours(input_ids=X, attention_mask=MASK, task_ids=TASKS, output_hidden_states=True)
        peft_out = theirs.base_model(input_ids=X, attention_mask=MASK, task_ids=TASKS, output_hidden_states=True)
        plain = tiny_bert()(input_ids=X, attention_mask=MASK, output_hidden_states=True)
    assert (mine.hidden_states[-1] - plain.hidden_states[-1]).abs().max() > 0.1  # the adapter acts
    torch.testing.assert_close(mine.logits, peft_out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine.hidden_states[-1], peft_out.hidden_states[-1], atol=1e-5, rtol=1e-5)


def test_training_sample_matches_peft_relaxed_bernoulli():
    ours, theirs = _peft_poly(n_splits=2)
    name, layer = next(iter(ours.adapter_layers().items()))
    router = theirs.base_model.model.get_submodule(name).poly_router["default"]
    layer.train(), router.train()
    torch.manual_seed(5)
    mine = layer.allocation_weights(TASKS)
    torch.manual_seed(5)
    torch.testing.assert_close(mine, router(task_ids=TASKS, input_ids=None), atol=1e-6, rtol=1e-6)


def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    from peft import PeftModel
    ours, _ = _peft_poly(n_splits=2)
    ours.eval()
    save_peft(ours, tmp_path)
    theirs = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs.base_model(input_ids=X, attention_mask=MASK, task_ids=TASKS).logits,
                                   ours(input_ids=X, attention_mask=MASK, task_ids=TASKS).logits, atol=1e-5, rtol=1e-5)


def test_peft_saved_adapter_loads_in_ours_with_the_same_logits(tmp_path):
    _, theirs = _peft_poly(n_splits=1)
    with torch.no_grad():  # train peft's head too, so that a head lost in transit would show
        theirs.base_model.model.classifier.modules_to_save["default"].weight.normal_(0, 0.5)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = load_peft(tiny_bert(), tmp_path).eval()
    assert isinstance(ours.adapter_config, PolytroponConfig) and ours.adapter_config.n_skills == 3
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=X, attention_mask=MASK, task_ids=TASKS).logits,
                                   theirs.base_model(input_ids=X, attention_mask=MASK, task_ids=TASKS).logits,
                                   atol=1e-5, rtol=1e-5)


def test_peft_export_refuses_a_temperature_peft_cannot_express(tmp_path):
    model = get_adapter_model(tiny_bert(), PolytroponConfig(temperature=0.5, target_modules=SIX))
    with pytest.raises(ValueError, match="temperature"):
        save_peft(model, tmp_path)


# --- merging, gradients, few-shot adaptation ---------------------------------------------------------------

def test_merge_task_gives_a_plain_weight_equal_to_the_task_rows():
    model = _perturb(get_adapter_model(tiny_bert(), PolytroponConfig(n_tasks=3, n_splits=2, target_modules=SIX,
                                                                    modules_to_save=HEAD))).eval()
    weights = {n: l.base_layer.weight.clone() for n, l in model.adapter_layers().items()}
    with torch.no_grad():
        full = model(input_ids=X, attention_mask=MASK, task_ids=TASKS).logits
        for t in (0, 1, 2):
            rows = (TASKS == t).nonzero().flatten()
            merge_task(model, t)
            merged = model(input_ids=X[rows], attention_mask=MASK[rows]).logits
            torch.testing.assert_close(merged, full[rows], atol=1e-5, rtol=1e-5)
            with pytest.raises(ValueError, match="merged for task"):
                model(input_ids=X, task_ids=TASKS)
            model.unmerge()
    assert all(torch.allclose(l.base_layer.weight, weights[n], atol=1e-6) for n, l in model.adapter_layers().items())


def test_gradients_reach_skills_allocations_and_head_only():
    model = _perturb(get_adapter_model(tiny_bert(), PolytroponConfig(n_tasks=3, target_modules=SIX,
                                                                    modules_to_save=HEAD))).train()
    model(input_ids=X, attention_mask=MASK, task_ids=TASKS, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {f"model.{site}.{t}" for site in model.adapter_layers() for t in ("lora_A", "lora_B", "module_logits")}
    expected |= {n for n, p in model.named_parameters() if ".classifier." in n}
    assert got == expected == {n for n, p in model.named_parameters() if p.requires_grad}
    for layer in model.adapter_layers().values():  # only the rows of tasks in the batch (0, 1, 2 all are)
        assert (layer.module_logits.grad.abs().sum(1) > 0).all()


def _toy_task(task_id: int, n: int = 16) -> EncodedTask:
    g = torch.Generator().manual_seed(task_id)
    examples = [{"input_ids": [1] + torch.randint(10, 99, (10,), generator=g).tolist(), "attention_mask": [1] * 11,
                 "label": i % 2, "task_id": task_id} for i in range(n)]
    return EncodedTask(task_info("sst2"), "encoder", examples, pad_id=0)


def test_few_shot_adaptation_trains_only_the_new_task_row():
    model = _perturb(get_adapter_model(tiny_bert(), PolytroponConfig(n_tasks=4, target_modules=SIX,
                                                                    modules_to_save=HEAD)))
    train_allocation_only(model, 3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.{s}.module_logits" for s in model.adapter_layers()}
    # gradient: row 3 only, even when the batch also holds rows of other tasks
    model.train()
    model(input_ids=X, task_ids=torch.tensor([3, 0, 3, 1]), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    for layer in model.adapter_layers().values():
        assert layer.module_logits.grad[3].abs().sum() > 0 and layer.module_logits.grad[:3].abs().sum() == 0
    model.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(model, _toy_task(3), TrainConfig(lr=1e-2, max_steps=3, batch_size=8, weight_decay=0.1, device="cpu",
                                             progress=False)).train()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"model.{s}.module_logits" for s in model.adapter_layers()}
    for layer_name in model.adapter_layers():
        key = f"model.{layer_name}.module_logits"
        assert torch.equal(model.state_dict()[key][:3], before[key][:3])


def test_two_speed_param_groups():
    cfg = PolytroponConfig(allocation_lr_ratio=20.0, target_modules=SIX, modules_to_save=HEAD)
    model = get_adapter_model(tiny_bert(), cfg)
    skills, logits = cfg.param_groups(model, 1e-3, 0.01)
    assert logits["lr"] == pytest.approx(2e-2) and logits["weight_decay"] == 0.0 and skills["weight_decay"] == 0.01
    assert len(logits["params"]) == len(model.adapter_layers())
    assert len(skills["params"]) + len(logits["params"]) == sum(p.requires_grad for p in model.parameters())


# --- save/load, recorder, allocation summaries ----------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    model = _perturb(get_adapter_model(tiny_bert(), PolytroponConfig(n_tasks=3, target_modules=SIX,
                                                                    modules_to_save=HEAD))).eval()
    model.save_adapter(tmp_path)
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=X, task_ids=TASKS).logits, model(input_ids=X, task_ids=TASKS).logits)


def test_recorder_sees_each_rows_allocation_on_real_tokens():
    model = _perturb(get_adapter_model(tiny_bert(), PolytroponConfig(n_tasks=3, target_modules=SIX))).eval()
    with torch.no_grad():
        model(input_ids=X, attention_mask=MASK, task_ids=TASKS)
    real = MASK.sum(1)
    for name, stats in model.recorder.layers.items():
        layer = model.adapter_layers()[name]
        w = torch.sigmoid(layer.module_logits[TASKS].double())
        w = w / w.sum(-1, keepdim=True)
        assert stats.n_tokens == int(real.sum())
        torch.testing.assert_close(stats.mass, (w * real[:, None]).sum(0), atol=1e-5, rtol=1e-5)


def test_allocation_heatmap_and_entropy():
    model = get_adapter_model(tiny_bert(), PolytroponConfig(n_tasks=3, n_skills=4, target_modules=SIX))
    probs = allocation(model)
    assert probs.shape == (3, 4) and torch.allclose(probs, torch.full((3, 4), 0.5), atol=1e-3)
    assert torch.allclose(allocation_entropy(probs), torch.ones(3), atol=1e-5)
    assert allocation_entropy(torch.tensor([[1.0, 0.0, 1.0, 0.0]]))[0] < 1e-6


# --- budgets and invalid settings -----------------------------------------------------------------------------

@pytest.mark.parametrize("model_name", ["minilm", "smollm2-135m"])
def test_budget_matches_lora_r8_on_all_linears(model_name):
    from lorafam_nb import grid
    shape = grid.model_shape(model_name)
    target = grid.reference_count(shape, 8)
    budget = grid.match_budget(PolytroponConfig, grid.method_sites(PolytroponConfig, shape), target)
    assert budget.matched and budget.values == {"r": 2, "n_skills": 4}
    cfg = PolytroponConfig.sized(budget.values, shape.targets)
    assert cfg.model_parameters(grid.method_sites(PolytroponConfig, shape)) == budget.closed_form


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r must be"), ({"n_skills": 0}, "n_skills"), ({"n_splits": 1.5}, "n_splits"),
    ({"temperature": 0.0}, "temperature"), ({"default_task": 10}, "default_task"),
    ({"allocation_lr_ratio": 0}, "allocation_lr_ratio"),
])
def test_invalid_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolytroponConfig(**kwargs)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="must divide"):
        get_adapter_model(tiny_bert(), PolytroponConfig(n_splits=5, target_modules=SIX))
    model = get_adapter_model(tiny_bert(), PolytroponConfig(n_tasks=3, target_modules=SIX))
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 3\)"):
        model(input_ids=X, task_ids=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="one task id per row"):
        model(input_ids=X, task_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="task must be"):
        train_allocation_only(model, 3)
    with pytest.raises(ValueError, match="no Polytropon layers"):
        allocation(get_adapter_model(tiny_bert(), __import__("lorafam_nb").LoraConfig(target_modules=SIX)))


def test_few_shot_run_on_the_held_out_task_carries_its_id():
    """The setting's held-out task keeps id 9 in a single-task run, which selects row 9 of every Z."""
    from lorafam_nb import experiment, multitask
    spec = RunSpec(task=multitask.HELD_OUT, task_ids=multitask.MULTITASK_TASKS, train_n=2)
    assert {e["task_id"] for e in experiment.training_set(spec).examples} == {9}
    assert PolytroponConfig().n_tasks == len(multitask.MULTITASK_TASKS) and math.isclose(EPS, 1e-12)


def test_single_task_run_trains_task_zero_row():
    """A run without a mix carries no task ids: every row is the default task, and only its row of Z trains
    (from the second step: at B = 0 the allocation gets no gradient)."""
    from lorafam_nb.experiment import build_model, run
    spec = RunSpec(model="minilm", task="piqa", finetune=PolytroponConfig(r=1, n_skills=2), train_n=4, eval_n=4,
                   max_length=16, train=TrainConfig(max_steps=2, batch_size=4, device="cpu", progress=False))
    model = build_model(spec)
    before = {n: l.module_logits.detach().clone() for n, l in model.adapter_layers().items()}
    out = run(spec, model)
    assert out.row["steps"] == 2 and 0 <= out.row["accuracy"] <= 1
    for name, layer in out.model.adapter_layers().items():
        assert not torch.equal(layer.module_logits[0], before[name][0])
        assert torch.equal(layer.module_logits[1:], before[name][1:])
