"""MOELoRA (multi-task): the layer against the paper's equation by hand, the one model-level task gate (shared,
saved once, reached by the gradient of every layer), per-task merging, gradients, save/load, the recorder,
budgets and invalid settings."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_bert
from lorafam_nb import get_adapter_model
from lorafam_nb.core import AdapterModel, count_parameters
from lorafam_nb.moe.moelora_mt import (GATE_KEY, MOELoRAConfig, MOELoRALinear, gate_entropy, merge_task,
                                       shared_gate, task_gates)
from lorafam_nb.moe.routers import TaskRouter

X = torch.randint(1, 100, (4, 9), generator=torch.Generator().manual_seed(3))
MASK = torch.ones_like(X)
MASK[1, 6:] = 0
MASK[3, 4:] = 0
TASKS = torch.tensor([0, 2, 2, 1])
HEAD = ["classifier"]
SIX = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _model(std: float = 0.3, seed: int = 1, **kwargs) -> AdapterModel:
    """MOELoRA on every linear of a tiny BERT, every expert's B (and the gate) moved off its init."""
    cfg = MOELoRAConfig(**{"r": 2, "num_experts": 4, "num_tasks": 3, "task_dim": 8, "lora_dropout": 0.0,
                           "target_modules": SIX, "modules_to_save": HEAD, **kwargs})
    model = get_adapter_model(tiny_bert(), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.experts.lora_B.add_(std * torch.randn(layer.experts.lora_B.shape, generator=g))
        shared_gate(model).weight.mul_(4)  # a peaked gate, so that tasks differ clearly
    return model


def test_layer_equals_the_equation_by_hand():
    """h = W0 x + b0 + α/(N r) Σ_i ω_{t,i} B_i A_i x, ω_t = softmax(W_T E_T[t]), per row's task, float64."""
    model = _model(lora_alpha=8.0).double().eval()
    name, layer = next(iter(model.adapter_layers().items()))
    x = torch.randn(3, 5, layer.base_layer.in_features, dtype=torch.float64)
    tasks = torch.tensor([2, 0, 2])
    layer.context.start_forward({"task_ids": tasks}, None)
    gate = shared_gate(model)
    E_T, W_T = gate.task_embedding.weight, gate.weight
    A, B = layer.experts.lora_A, layer.experts.lora_B
    want = x @ layer.base_layer.weight.T + layer.base_layer.bias
    for row, t in enumerate(tasks):
        omega = torch.softmax(W_T @ E_T[t], -1)
        for i in range(4):
            want[row] = want[row] + (8.0 / (4 * 2)) * omega[i] * (x[row] @ A[i].T @ B[i].T)
    torch.testing.assert_close(layer(x), want, atol=1e-10, rtol=1e-10)
    assert layer.experts.scaling == 8.0 / 8  # α over the total rank N·r, not over the expert rank r


def test_gate_sees_only_the_task():
    model = _model().eval()
    omega = task_gates(model)[TASKS]
    seen = []
    shared_gate(model).register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), out.weights)))
    with torch.no_grad():
        model(input_ids=X, attention_mask=MASK, task_ids=TASKS)
        model(input_ids=X.flip(1), attention_mask=MASK, task_ids=TASKS)  # other tokens, same tasks
    assert len(seen) == 2 * len(model.adapter_layers())
    for ids, weights in seen:
        assert torch.equal(ids, TASKS)
        torch.testing.assert_close(weights, omega, atol=1e-6, rtol=0)


def test_one_gate_shared_by_every_layer_and_saved_once(tmp_path):
    model = _model().eval()
    gate = model.adapter_scope.entries[GATE_KEY]
    assert isinstance(gate, TaskRouter)
    assert all(layer.gate is gate for layer in model.adapter_layers().values())
    state = model.adapter_state_dict()
    assert sorted(k for k in state if "task_embedding" in k or k.endswith("gate.weight")) == [
        f"adapter_scope.{GATE_KEY}.task_embedding.weight", f"adapter_scope.{GATE_KEY}.weight"]
    model.save_adapter(tmp_path)
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert all(layer.gate is shared_gate(loaded) for layer in loaded.adapter_layers().values())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=X, attention_mask=MASK, task_ids=TASKS).logits,
                           model(input_ids=X, attention_mask=MASK, task_ids=TASKS).logits)


def test_gradients_from_every_layer_reach_the_shared_gate():
    """The gate's gradient is the sum, over all adapted linears, of what flows back through each one's ω."""
    model = _model().train()
    gate = shared_gate(model)
    omegas = []

    def keep(module, args, out):
        out.weights.retain_grad()
        omegas.append(out.weights)
    gate.register_forward_hook(keep)
    out = model(input_ids=X, attention_mask=MASK, task_ids=TASKS, labels=torch.tensor([0, 1, 0, 1]))
    out.loss.backward(retain_graph=True)
    assert len(omegas) == len(model.adapter_layers()) == 12
    params = [gate.task_embedding.weight, gate.weight]
    total = [torch.zeros_like(p) for p in params]
    for omega in omegas:
        assert omega.grad is not None and omega.grad.abs().sum() > 0  # every layer sends gradient to ω
        for acc, g in zip(total, torch.autograd.grad(omega, params, grad_outputs=omega.grad, retain_graph=True)):
            acc += g
    for p, want in zip(params, total):
        torch.testing.assert_close(p.grad, want, atol=1e-7, rtol=1e-5)


def test_gradients_reach_exactly_experts_gate_and_head():
    model = _model().train()
    model(input_ids=X, attention_mask=MASK, task_ids=torch.tensor([0, 2, 2, 0]), labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {f"model.{s}.experts.{t}" for s in model.adapter_layers() for t in ("lora_A", "lora_B")}
    expected |= {f"adapter_scope.entries.{GATE_KEY}.task_embedding.weight", f"adapter_scope.entries.{GATE_KEY}.weight"}
    expected |= {n for n, _ in model.named_parameters() if ".classifier." in n}
    assert got == expected == {n for n, p in model.named_parameters() if p.requires_grad}
    # only the embeddings of the tasks in the batch (0 and 2) receive gradient
    rows = shared_gate(model).task_embedding.weight.grad.abs().sum(1)
    assert rows[0] > 0 and rows[2] > 0 and rows[1] == 0


@pytest.mark.parametrize("task", [0, 1, 2])
def test_merge_task_equals_the_unmerged_model_for_that_task(task):
    model = _model().eval()
    weights = {n: l.base_layer.weight.clone() for n, l in model.adapter_layers().items()}
    ids = torch.full((4,), task)
    with torch.no_grad():
        want = model(input_ids=X, attention_mask=MASK, task_ids=ids).logits
        other = model(input_ids=X, attention_mask=MASK, task_ids=(ids + 1) % 3).logits
        assert (want - other).abs().max() > 1e-4  # the tasks really differ
        merge_task(model, task)
        torch.testing.assert_close(model(input_ids=X, attention_mask=MASK).logits, want, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="merged for task"):
            model(input_ids=X, task_ids=(ids + 1) % 3)
        with pytest.raises(ValueError, match="unmerge"):
            merge_task(model, (task + 1) % 3)
        model.unmerge()
        assert all(torch.allclose(l.base_layer.weight, weights[n], atol=1e-6) for n, l in model.adapter_layers().items())
        merge_task(model, task)
        plain = copy.deepcopy(model).merge_and_unload()
        assert not any(isinstance(m, MOELoRALinear) for m in plain.modules())
        torch.testing.assert_close(plain(input_ids=X, attention_mask=MASK).logits, want, atol=1e-5, rtol=1e-5)


def test_task_delta_is_the_gated_sum_of_expert_products():
    model = _model().double()
    layer = next(iter(model.adapter_layers().values()))
    omega = task_gates(model)[1].double()
    A, B, s = layer.experts.lora_A, layer.experts.lora_B, layer.experts.scaling
    torch.testing.assert_close(layer.task_delta(1), s * sum(omega[i] * B[i] @ A[i] for i in range(4)))


def test_rows_without_task_ids_are_the_default_task_and_plain_merge_uses_it():
    model = _model(default_task=2).eval()
    with torch.no_grad():
        want = model(input_ids=X, task_ids=torch.full((4,), 2)).logits
        torch.testing.assert_close(model(input_ids=X).logits, want)
        model.merge()
        torch.testing.assert_close(model(input_ids=X).logits, want, atol=1e-5, rtol=1e-5)


def test_init_is_the_base_model_and_counts_match():
    base = tiny_bert()
    cfg = MOELoRAConfig(r=2, num_experts=4, num_tasks=5, task_dim=16, target_modules=SIX, modules_to_save=HEAD)
    model = get_adapter_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=X, task_ids=torch.tensor([0, 4, 1, 3])).logits, base(input_ids=X).logits)
    head = sum(p.numel() for p in base.classifier.parameters())
    sites = cfg.sites(base)
    assert count_parameters(model)[0] - head == cfg.model_parameters(sites) == (
        sum(4 * 2 * (s.d_in + s.d_out) for s in sites) + (5 + 4) * 16)
    # the spec's MiniLM example: total rank 16 (N = 8, rank 2) on all six linears, 5 tasks, d_T = 64
    from lorafam_nb.models import load_model
    minilm = MOELoRAConfig(r=2, num_experts=8, num_tasks=5, task_dim=64, target_modules=SIX)
    assert minilm.model_parameters(minilm.sites(load_model("minilm", head="base"))) == 663_552 + (5 + 8) * 64
    # A ~ N(0, 0.01²) as the authors' code initialises it
    assert 0.008 < float(next(iter(model.adapter_layers().values())).experts.lora_A.detach().std()) < 0.012


def test_recorder_gets_each_rows_gate_on_real_tokens():
    model = _model().eval()
    with torch.no_grad():
        model(input_ids=X, attention_mask=MASK, task_ids=TASKS)
    omega = task_gates(model)[TASKS].double()
    real = MASK.sum(1).double()
    for stats in model.recorder.layers.values():
        assert stats.n_tokens == int(real.sum())
        torch.testing.assert_close(stats.mass, (omega * real[:, None]).sum(0), atol=1e-5, rtol=1e-5)
    assert len(model.recorder.layers) == 12


def test_gate_entropy():
    assert torch.allclose(gate_entropy(torch.full((2, 8), 1 / 8)), torch.ones(2))
    assert gate_entropy(torch.tensor([[1.0, 0, 0, 0]]))[0] < 1e-6


@pytest.mark.parametrize("model_name", ["minilm", "smollm2-135m"])
def test_budget_matches_lora_r8_on_all_linears(model_name):
    from lorafam_nb import grid
    shape = grid.model_shape(model_name)
    target = grid.reference_count(shape, 8)
    budget = grid.match_budget(MOELoRAConfig, grid.method_sites(MOELoRAConfig, shape), target)
    assert budget.matched and budget.values == {"r": 1, "num_experts": 8}
    cfg = MOELoRAConfig.sized(budget.values, shape.targets)
    assert cfg.lora_alpha == 16.0 and cfg.num_experts * cfg.r == 8  # scale α/(N r) = 2, LoRA r=8's
    assert cfg.model_parameters(grid.method_sites(MOELoRAConfig, shape)) == budget.closed_form == target + 18 * 64


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r must be"), ({"num_experts": 0}, "num_experts"), ({"task_dim": 0}, "task_dim"),
    ({"num_tasks": 2, "default_task": 2}, "default_task"), ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"init_std": 0.0}, "init_std"),
])
def test_invalid_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MOELoRAConfig(**kwargs)


def test_invalid_inputs_raise():
    model = _model()
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 3\)"):
        model(input_ids=X, task_ids=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="one task id per row"):
        model(input_ids=X, task_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="task must be"):
        merge_task(model, 5)
    with pytest.raises(ValueError, match="no MOELoRA gate"):
        shared_gate(get_adapter_model(tiny_bert(), __import__("lorafam_nb").LoraConfig(target_modules=SIX)))


def test_init_std_none_keeps_loras_kaiming_a():
    layer = next(iter(_model(init_std=None).adapter_layers().values()))
    bound = 1 / layer.base_layer.in_features ** 0.5
    A = layer.experts.lora_A.detach()
    assert A.abs().max() <= bound and A.std() > 0.4 * bound  # U(±1/√d_in): std = bound/√3


def test_single_task_run_trains_task_zero():
    """A run without a mix carries no task ids: every row is the default task, and only its embedding trains
    (from the second step: at B = 0 the gate gets no gradient)."""
    from lorafam_nb.experiment import RunSpec, build_model, run
    from lorafam_nb.trainer import TrainConfig
    spec = RunSpec(model="minilm", task="piqa", finetune=MOELoRAConfig(r=1, num_experts=2, task_dim=4), train_n=4,
                   eval_n=4, max_length=16, train=TrainConfig(max_steps=2, batch_size=4, device="cpu", progress=False))
    model = build_model(spec)
    before = shared_gate(model).task_embedding.weight.detach().clone()
    out = run(spec, model)
    after = shared_gate(out.model).task_embedding.weight.detach()
    assert out.row["steps"] == 2 and 0 <= out.row["accuracy"] <= 1
    assert not torch.equal(after[0], before[0]) and torch.equal(after[1:], before[1:])
