"""MoLE: the gate and the composed layer against the paper's equations by hand (pooled LoRA outputs, layer
norm, e, temperature τ, one G per sample shared by the layer's linears), masking with renormalisation by
hand and masking down to one LoRA (= that LoRA alone), the balance loss by hand, τ's clamp, gate groups,
stage 1 and 2 end to end (only the gates and the head train), save/load, gradients, budgets, invalid
configs."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import layer_io, tiny_bert, toy_task
from lorafam_nb import get_adapter_model, grid, multitask
from lorafam_nb.core import AdapterModel
from lorafam_nb.experiment import build_model, run
from lorafam_nb.lora import LoraConfig
from lorafam_nb.moe.mole import MoLEConfig, gates_of, mask_loras
from lorafam_nb.trainer import TrainConfig, Trainer

X = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(3))
MASK = torch.ones_like(X)
MASK[1, 6:] = 0
MASK[3, 4:] = 0
SIX = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
HEAD = ["classifier"]


def mole_model(ranks=(1, 3, 2), tau: float = 1.7, **fields) -> tuple[torch.nn.Module, AdapterModel]:
    """A float64 tiny BERT composing three LoRAs of unequal rank, B off zero, gates moved off uniform."""
    base = tiny_bert().double()
    cfg = MoLEConfig(r=max(ranks), ranks=list(ranks), num_experts=len(ranks), lora_alpha=2.0 * max(ranks),
                     target_modules=SIX, modules_to_save=HEAD, **fields)
    model = get_adapter_model(copy.deepcopy(base), cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.experts.lora_B.normal_(0, 0.3)
        for gate in gates_of(model):
            gate.e.normal_(0, 0.2)
            gate.temperature.fill_(tau)
    return base, model


def gate_by_hand(layer, x: torch.Tensor, mask: torch.Tensor, masked=()) -> torch.Tensor:
    """G (rows, N) of the gate fed by ``layer``: E_i = s B_i A_i x, averaged over each row's real tokens,
    concatenated, layer-normalised (no parameters, eps 1e-5), times e, softmax over ε/τ; masked LoRAs
    dropped and the rest renormalised."""
    experts, gate = layer.experts, layer.gate
    E = [experts.scaling * (x @ experts.pair(i)[0].T @ experts.pair(i)[1].T) for i in range(experts.num_experts)]
    pooled = [(e * mask[..., None]).sum(1) / mask.sum(1, keepdim=True) for e in E]
    v = torch.cat(pooled, -1)
    v = (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-5)
    G = torch.softmax(v @ gate.e / gate.temperature, -1)
    keep = torch.ones(experts.num_experts, dtype=G.dtype)
    keep[list(masked)] = 0
    return G * keep / (G * keep).sum(-1, keepdim=True)


def check_layers(model: AdapterModel, seen, masked=()) -> dict[int, torch.Tensor]:
    """Every adapted linear equals W_0 x + b_0 + Σ_i G_i s B_i A_i x with its layer's G (computed by hand from
    the layer's query); returns G per layer."""
    gates = {}
    for name, layer in model.adapter_layers().items():
        x, y = seen[name]
        block = int(name.split(".")[3])
        if layer.reads_gate:
            gates[block] = gate_by_hand(layer, x, MASK, masked)
        G = gates[block]
        mix = sum(G[:, i, None, None] * layer.experts.scaling * (x @ A.T @ B.T)
                  for i, (A, B) in enumerate(layer.experts.pair(i) for i in range(layer.experts.num_experts)))
        torch.testing.assert_close(y, x @ layer.base_layer.weight.T + layer.base_layer.bias + mix, atol=1e-10, rtol=0)
    return gates


def test_every_linear_equals_the_gated_sum_with_its_layers_gate():
    _, model = mole_model()
    seen = layer_io(model)
    with torch.no_grad():
        model(input_ids=X, attention_mask=MASK)
    gates = check_layers(model, seen)
    assert len(gates) == 2 and not torch.allclose(gates[0], gates[1])
    assert all(float(G.detach().max()) > 0.4 for G in gates.values())  # a non-uniform gate: the check can fail
    assert [l.reads_gate for l in model.adapter_layers().values()] == [True] + [False] * 5 + [True] + [False] * 5


@pytest.mark.parametrize("masked", [(1,), (0, 2)])
def test_masking_renormalises_the_other_loras_by_hand(masked):
    _, model = mole_model()
    seen = layer_io(model)
    with torch.no_grad():
        model(input_ids=X, attention_mask=MASK)
    full = check_layers(model, seen)
    mask_loras(model, masked)
    seen.clear()
    with torch.no_grad():
        model(input_ids=X, attention_mask=MASK)
    hatted = check_layers(model, seen, masked)
    # The first layer's gate sees the same input either way (later layers see what the masking changed):
    G, keep = full[0], [i for i in range(3) if i not in masked]
    expected = torch.zeros_like(G)
    expected[:, keep] = G[:, keep] / G[:, keep].sum(-1, keepdim=True)  # Ĝ_i = G_i / Σ_{j ∉ S} G_j
    torch.testing.assert_close(hatted[0], expected)
    mask_loras(model)
    assert all(bool((g.mask == 1).all()) for g in gates_of(model))


def test_masking_all_but_one_lora_is_that_lora_alone():
    base, model = mole_model()
    mask_loras(model, (0, 2))
    lora = get_adapter_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6.0, target_modules=SIX,
                                                              modules_to_save=HEAD)).eval()
    with torch.no_grad():
        for name, layer in lora.adapter_layers().items():
            A, B = model.adapter_layers()[name].experts.pair(1)
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        torch.testing.assert_close(model(input_ids=X, attention_mask=MASK).logits,
                                   lora(input_ids=X, attention_mask=MASK).logits, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="keep at least one"):
        mask_loras(model, (0, 1, 2))
    with pytest.raises(ValueError, match=r"LoRA indices must lie in \[0, 3\)"):
        mask_loras(model, (3,))


def test_balance_loss_by_hand_over_gates_and_batch():
    _, model = mole_model()
    model.train()
    seen = layer_io(model)
    model(input_ids=X, attention_mask=MASK, labels=torch.tensor([0, 1, 0, 1]))
    gates = check_layers(model, seen)
    q = torch.stack([G.mean(0) for G in gates.values()]).mean(0)  # over the M = 2 gates and the batch
    torch.testing.assert_close(model.aux_losses()["balance"], 0.5 * -torch.log(q).sum())
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert -torch.log(q).sum() > -torch.log(uniform).sum()  # its minimum, N log N, at uniform q


def test_layers_per_gate_shares_one_gate_across_layers_and_counts_it_once():
    _, model = mole_model(layers_per_gate=2)
    assert len(gates_of(model)) == 1
    seen = layer_io(model)
    with torch.no_grad():
        model(input_ids=X, attention_mask=MASK)
    layers = list(model.adapter_layers().values())
    assert [l.reads_gate for l in layers] == [True] + [False] * 11
    G = gate_by_hand(layers[0], seen[next(iter(seen))][0], MASK)
    x, y = seen["bert.encoder.layer.1.output.dense"]
    last = layers[-1]
    mix = sum(G[:, i, None, None] * last.experts.scaling * (x @ last.experts.pair(i)[0].T @ last.experts.pair(i)[1].T)
              for i in range(3))
    torch.testing.assert_close(y, x @ last.base_layer.weight.T + last.base_layer.bias + mix, atol=1e-10, rtol=0)
    cfg = model.adapter_config
    sites = cfg.sites(tiny_bert())
    loras = 6 * 2 * (4 * 64 + 2 * 96)  # Σr = 6 over two blocks of six linears
    assert cfg.model_parameters(sites) == loras + (9 * 32 + 1)  # one gate: N² d_out (the query's) + τ


def test_temperature_is_learned_and_clamped_to_its_range_after_each_step():
    base = tiny_bert()
    model = get_adapter_model(base, MoLEConfig(r=2, num_experts=2, target_modules=SIX, modules_to_save=HEAD))
    for layer in model.adapter_layers().values():
        layer.experts.requires_grad_(False)
    gates = gates_of(model)
    with torch.no_grad():
        gates[0].temperature.fill_(7.0)
        gates[1].temperature.fill_(0.2)
    Trainer(model, toy_task(8), TrainConfig(lr=1e-2, max_steps=1, batch_size=8, progress=False)).train()
    assert [float(g.temperature.detach()) for g in gates] == [3.0, 1.0]
    assert all(g.temperature.requires_grad and g.e.requires_grad for g in gates)


def test_stage_two_gradients_reach_the_gates_and_the_head_only():
    _, model = mole_model()
    for layer in model.adapter_layers().values():
        layer.experts.requires_grad_(False)  # what stage 1 leaves
    model.train()
    out = model(input_ids=X, attention_mask=MASK, labels=torch.tensor([0, 1, 0, 1]))
    (out.loss + model.aux_loss()).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == trainable == {f"adapter_scope.entries.mole_gate_{b}.{p}" for b in (0, 1) for p in ("e", "temperature")
                                } | {"model.classifier.weight", "model.classifier.bias"}


def test_init_equals_base_and_merge_raises():
    base = tiny_bert()
    model = get_adapter_model(copy.deepcopy(base), MoLEConfig(r=2, num_experts=3, target_modules=SIX)).eval()
    gate = gates_of(model)[0]
    torch.testing.assert_close(gate.e.norm(dim=0), torch.full((3,), 0.01))  # the released code's init
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=X, attention_mask=MASK).logits,
                                   base(input_ids=X, attention_mask=MASK).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge()


def test_save_load_round_trip(tmp_path):
    base, model = mole_model()
    model.save_adapter(tmp_path)
    loaded = AdapterModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert loaded.adapter_config == model.adapter_config
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=X, attention_mask=MASK).logits,
                                   model(input_ids=X, attention_mask=MASK).logits, atol=0, rtol=0)
    assert sum(".gate." in k for k in model.adapter_state_dict()) == 0  # gates saved once, by the scope


@pytest.mark.parametrize("fields, message", [
    (dict(layers_per_gate=0), "layers_per_gate must be a positive integer"),
    (dict(balance_weight=-0.5), "non-negative"),
    (dict(temperature_min=1.5), "τ starts at 1"),
    (dict(temperature_max=0.5), "τ starts at 1"),
    (dict(ranks=[2, 2]), "one positive integer rank per LoRA"),
])
def test_invalid_configs_raise(fields, message):
    with pytest.raises(ValueError, match=message):
        MoLEConfig(**fields)


def test_both_stages_end_to_end_train_only_the_gates_and_the_head():
    cfg = MoLEConfig(r=2, num_experts=2, lora_alpha=4.0)
    train = TrainConfig(lr=1e-3, batch_size=4, progress=False, log_every=1)
    spec = multitask.spec(cfg, tasks=("sst2_mc", "boolq"), train_n=4, eval_n=4, max_length=24, train=train)
    out = run(spec)
    model = out.model
    assert model.stage_one.domains == ["sst2_mc", "boolq"]
    assert all(not l.experts.lora_A.requires_grad for l in model.adapter_layers().values())
    assert all(float(l.experts.lora_B.abs().sum()) > 0 for l in model.adapter_layers().values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".mole_gate_" in n or ".pooler." in n or ".classifier." in n for n in trainable)
    assert out.history[-1]["balance"] > 0
    names, load = model.recorder.load_matrix()  # the final evaluation's gates: one row per layer
    assert len(names) == 6 and torch.allclose(load.sum(1), torch.ones(6, dtype=load.dtype))
    frozen_head = dataclasses.replace(spec, finetune=dataclasses.replace(cfg, train_head=False))
    model = build_model(frozen_head)  # the papers' stage 2: the gates alone train
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"adapter_scope.entries.mole_gate_{b}.{p}" for b in range(6) for p in ("e", "temperature")}


@pytest.fixture(scope="module")
def shapes():
    return {m: grid.model_shape(m) for m in ("minilm", "smollm2-135m")}


@pytest.mark.parametrize("model, values, count", [
    # MiniLM: S_io = 41,472; ranks summing to 7; one gate per layer, 5·5·384 + 1 each, six layers (+4.86 %).
    ("minilm", {"r": 2, "num_experts": 5, "ranks": [1, 1, 1, 2, 2], "layers_per_gate": 1},
     7 * 41_472 + 6 * (25 * 384 + 1)),
    # SmolLM2-135M: S_io = 305,280; a gate per layer would be +5.2 %, so two layers share each gate (−3.66 %).
    ("smollm2-135m", {"r": 2, "num_experts": 5, "ranks": [1, 1, 1, 2, 2], "layers_per_gate": 2},
     7 * 305_280 + 15 * (25 * 576 + 1)),
])
def test_budget_matches_lora_r8_with_the_gates_counted(shapes, model, values, count):
    shape = shapes[model]
    target = grid.reference_count(shape, 8)
    budget = grid.match_budget(MoLEConfig, grid.method_sites(MoLEConfig, shape), target)
    assert budget.values == values and budget.closed_form == count and budget.matched
    if model == "minilm":  # the injected model trains exactly the closed form (both stages' parameters)
        adapted = get_adapter_model(copy.deepcopy(shape.base), MoLEConfig.sized(budget.values, shape.targets))
        assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == count


def test_grid_cells_run_both_stages_single_task_and_mix():
    """One single-task cell (k-means pseudo-tasks) and the mix cell (one LoRA per task) of the grid at tiny
    sizes: the planned budget is matched, and what stage 2 trains is the gates (and the head)."""
    profile = grid.Profile("test", {"minilm": grid.ModelSettings(8, 8, 24, 8, 1e-3)}, methods=("mole",))
    cells = {run.task: run for run in grid.plan(profile)}
    for task in (grid.TASKS[0], grid.MIX):
        record = grid.execute(cells[task], device="cpu")
        assert record["params"]["closed_form"] == 7 * 41_472 + 6 * (25 * 384 + 1)
        assert record["params"]["real"] == 6 * (25 * 384 + 1)  # after stage 1: the gates; the LoRAs are frozen
        assert record["adapter_trained"]["domains"] == (list(grid.TASKS) if task == grid.MIX else [])
        assert set(record["accuracy"]) == set(cells[task].tasks)
