"""The mixture-of-experts machinery every mixture shares (lorafam_nb.moe) and the core seams it stands on:
routers, batched experts against a per-expert loop, the auxiliary losses against their formulas, the
routing recorder, side inputs lined up with the rows a layer sees, the scope, whole-state checkpoints."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import Interrupt, tiny_bert, toy_task
from lorafam_nb import get_adapter_model
from lorafam_nb.core import AdapterContext, RoutingRecorder
from lorafam_nb.data import task_info
from lorafam_nb.moe import (DenseRouter, Dispatch, LoRAExperts, MoELoRALinear, TaskRouter, TopKRouter, cv_squared,
                            localized_balance, router_z_loss, switch_load_balance, top_k)
from lorafam_nb.moe.moral import MoRALConfig
from lorafam_nb.tasks import EncodedTask, collate
from lorafam_nb.trainer import TrainConfig, Trainer

T, E, R, D_IN, D_OUT = 37, 5, 3, 11, 7


def experts64(seed: int = 0) -> tuple[LoRAExperts, torch.Tensor]:
    torch.manual_seed(seed)
    experts = LoRAExperts(E, R, D_IN, D_OUT, scaling=1.5, dtype=torch.float64)
    with torch.no_grad():
        experts.lora_B.normal_()
    return experts, torch.randn(T, D_IN, dtype=torch.float64, requires_grad=True)


def loop_reference(experts: LoRAExperts, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Σ_e g_te s B_e A_e x_t, one expert at a time over the tokens it serves (the test's reference)."""
    out = torch.zeros(x.shape[0], experts.lora_B.shape[1], dtype=x.dtype)
    for e in range(experts.num_experts):
        served = gates[:, e] != 0
        out = out.index_add(0, served.nonzero()[:, 0],
                            gates[served, e, None] * (x[served] @ experts.delta_weight(e).t()))
    return out


def grads(out: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                    tensors, retain_graph=True))


@pytest.mark.parametrize("k", [1, 2, E])
def test_sparse_and_dense_paths_equal_the_per_expert_loop(k):
    experts, x = experts64()
    routing = top_k(torch.randn(T, E, dtype=torch.float64), k)
    gates = torch.zeros(T, E, dtype=torch.float64).scatter(1, routing.selected, routing.weights)
    reference = loop_reference(experts, x, gates)
    sparse = experts.sparse(x, Dispatch.build(routing.selected, routing.weights, E))
    dense = experts.dense(x, gates)
    params = (x, experts.lora_A, experts.lora_B)
    for out in (sparse, dense):
        torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)
        for g, g_ref in zip(grads(out, *params), grads(reference, *params)):
            torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=0)


def test_dispatch_groups_every_assignment_once():
    selected = torch.tensor([[0, 2], [2, 1], [2, 0], [1, 2]])
    d = Dispatch.build(selected, torch.full((4, 2), 0.5), num_experts=4)
    assert d.capacity == 4 and d.expert.tolist() == [0, 0, 1, 1, 2, 2, 2, 2]
    assert sorted(zip(d.token.tolist(), d.expert.tolist())) == sorted(
        (t, e) for t in range(4) for e in selected[t].tolist())
    rows = torch.arange(8.0)[:, None]
    grouped = d.group(rows)
    assert grouped.shape == (4, 4, 1) and grouped[3].abs().sum() == 0  # expert 3 serves nobody: padding only
    assert torch.equal(d.ungroup(grouped), rows)


def test_top_k_is_softmax_over_all_then_renormalised():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    r = top_k(logits, 2)
    p = torch.softmax(logits, -1)[0]
    assert r.selected.tolist() == [[0, 1]]
    torch.testing.assert_close(r.weights[0], torch.stack([p[0], p[1]]) / (p[0] + p[1]))
    torch.testing.assert_close(r.probs, torch.softmax(logits, -1))


def test_top_k_with_k_equal_e_is_the_dense_mixture():
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT).double()
    routed = TopKRouter(D_IN, E, E, dtype=torch.float64)
    dense_router = DenseRouter(D_IN, E, dtype=torch.float64)
    with torch.no_grad():
        dense_router.weight.copy_(routed.weight)
    a = MoELoRALinear(base, routed, E, R, 2.0)
    b = MoELoRALinear(base, dense_router, E, R, 2.0)
    with torch.no_grad():
        b.experts.load_state_dict(a.experts.state_dict())
        a.experts.lora_B.normal_()
        b.experts.lora_B.copy_(a.experts.lora_B)
    x = torch.randn(4, 6, D_IN, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), atol=1e-10, rtol=0)


def test_router_jitter_only_in_training_and_never_in_place():
    router = TopKRouter(D_IN, E, 2, jitter_noise=0.5)
    x = torch.randn(T, D_IN)
    kept = x.clone()
    router.train()
    assert not torch.equal(router(x).logits, router(x).logits)
    assert torch.equal(x, kept)
    router.eval()
    assert torch.equal(router(x).logits, router(x).logits)


def test_task_router_depends_only_on_the_task():
    router = TaskRouter(num_tasks=3, num_experts=E)
    r = router(torch.tensor([0, 2, 0]))
    assert torch.equal(r.probs[0], r.probs[2]) and not torch.equal(r.probs[0], r.probs[1])
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(3))


def test_switch_load_balance_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4], [0.2, 0.2, 0.6]])
    selected = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 0]])
    F = torch.tensor([3 / 4, 2 / 4, 3 / 4])  # tokens whose top-2 holds each expert; Σ F = k = 2
    P = probs.mean(0)
    torch.testing.assert_close(switch_load_balance(probs, selected), 3 * (F * P).sum())
    uniform = torch.full((6, 3), 1 / 3)
    assert switch_load_balance(uniform, torch.tensor([[0, 1], [1, 2], [2, 0]] * 2)).item() == pytest.approx(2.0)
    logits = torch.randn(5, 3, requires_grad=True)
    switch_load_balance(torch.softmax(logits, -1), torch.zeros(5, 1, dtype=torch.long)).backward()
    assert logits.grad.abs().sum() > 0  # through P: the router learns from the loss


def test_z_loss_cv_and_localized_balance_by_hand():
    logits = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    expected = (math.log(math.e + math.e ** 2) ** 2 + math.log(2) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert cv_squared(x).item() == pytest.approx(x.var().item() / 9.0, rel=1e-6)
    assert cv_squared(torch.full((5,), 2.0)).item() == 0
    Q = torch.tensor([[3.0, 1.0], [2.0, 2.0], [1.0, 4.0], [0.5, 3.0]])  # 4 experts × 2 samples
    types = torch.tensor([1, 1, 0, 0])  # the first half is type 1
    I = torch.tensor([[1.1, 0.9], [1.1, 0.9], [0.9, 1.1], [0.9, 1.1]])  # samples of type 1 and 0, δ = 0.1
    Z = I * Q
    torch.testing.assert_close(localized_balance(Q, types, torch.tensor([1, 0]), 0.1), Z.var() / Z.mean() ** 2)


def test_recorder_counts_tokens_times_k_and_leaves_padding_out():
    model = get_adapter_model(tiny_bert(), MoRALConfig(num_experts=4, top_k=2, target_modules=["query", "value"]))
    ids = torch.randint(1, 100, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    model(input_ids=ids, attention_mask=mask)
    real = int(mask.sum())
    assert len(model.recorder.layers) == 4
    for stats in model.recorder.layers.values():
        assert stats.n_tokens == real and int(stats.tokens.sum()) == real * 2
        assert stats.mass.sum().item() == pytest.approx(real)
    names, load = model.recorder.load_matrix()
    assert load.shape == (4, 4) and torch.allclose(load.sum(1), torch.ones(4, dtype=load.dtype))
    assert all(r.probs.shape[0] == real for r in model.context.routes)
    summary = model.recorder.summary()
    assert 0 < summary["router_entropy"] <= math.log(4) and summary["dropped_fraction"] == 0
    recorder = RoutingRecorder()
    recorder.record("x", torch.full((5, 2), 0.5), torch.zeros(5, 1, dtype=torch.long), dropped=5)
    assert recorder.summary()["dropped_fraction"] == 0.5


def test_side_inputs_repeat_to_the_rows_a_layer_sees():
    mc = EncodedTask(task_info("arc_e"), "encoder", [
        {"choices": [{"input_ids": [1, 2], "attention_mask": [1, 1]}] * 3, "label": 0, "task_id": 4},
        {"choices": [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]}] * 4, "label": 1, "task_id": 7}], pad_id=0)
    batch = collate(mc, mc.examples)
    assert batch["input_ids"].shape[:2] == (2, 4)
    assert batch["task_ids"].tolist() == [4] * 4 + [7] * 4  # one per flattened (example, choice) row
    ll = EncodedTask(task_info("arc_e"), "loglik", [
        {"prompt": [1, 2], "continuations": [[3], [4, 5]], "label": 0, "task_type": 0},
        {"prompt": [1], "continuations": [[3], [4]], "label": 1, "task_type": 1}], pad_id=0)
    batch = collate(ll, ll.examples)
    assert batch["input_ids"].shape[0] == 4 and batch["task_types"].tolist() == [0, 0, 1, 1]
    plain = toy_task(4)
    for i, e in enumerate(plain.examples):
        e["task_id"] = i
    assert collate(plain, plain.examples)["task_ids"].tolist() == [0, 1, 2, 3]
    ctx = AdapterContext()
    ctx.start_forward({"task_ids": torch.tensor([5, 6])}, None)
    assert ctx.side_rows("task_ids", torch.zeros(2, 3, 8)).tolist() == [5, 5, 5, 6, 6, 6]
    with pytest.raises(ValueError, match="one entry per row"):
        ctx.side_rows("task_ids", torch.zeros(4, 3, 8))
    with pytest.raises(ValueError, match="needs the side input 'cluster_ids'"):
        ctx.side_rows("cluster_ids", torch.zeros(2, 3, 8))


def test_merging_a_routed_mixture_raises_and_changes_nothing():
    model = get_adapter_model(tiny_bert(), MoRALConfig(target_modules=["query", "value"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (model.merge, model.merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged.*nothing was changed"):
            call()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_failed_injection_leaves_the_model_untouched():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError):
        get_adapter_model(model, MoRALConfig(target_modules=["no_such_module"]))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(type(m).__name__ == "MoELoRALinear" for m in model.modules())


def test_checkpoints_hold_the_whole_adapter_state(tmp_path):
    """A resumed run equals an uninterrupted one for a mixture, and the frozen LoRA-FA A travels with it."""
    from lorafam_nb.lora_fa import LoraFAConfig

    def train(config, interrupt=None, resume=False):
        torch.manual_seed(0)
        model = get_adapter_model(tiny_bert(), config)
        cfg = TrainConfig(max_steps=6, batch_size=8, progress=False, checkpoint_dir=str(tmp_path / config.method),
                          checkpoint_every=1)
        if resume:  # a fresh model whose frozen tensors differ: the checkpoint must restore them
            torch.manual_seed(123)
            model = get_adapter_model(tiny_bert(), config)
        callbacks = [Interrupt(interrupt)] if interrupt else []
        try:
            Trainer(model, toy_task(), cfg, callbacks=callbacks).train(resume=resume)
        except KeyboardInterrupt:
            return None
        return model.adapter_state_dict()

    for config in (MoRALConfig(target_modules=["query", "value"], modules_to_save=["classifier"]),
                   LoraFAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])):
        straight = train(config)
        (tmp_path / config.method / "checkpoint.pt").unlink()
        assert train(config, interrupt=3) is None
        resumed = train(config, resume=True)
        for key, value in straight.items():
            torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=0, msg=key)


def test_scope_saves_a_shared_module_once(tmp_path):
    from lorafam_nb.vera import VeraConfig

    model = get_adapter_model(tiny_bert(), VeraConfig(r=4, target_modules=["query", "value"]))
    state = model.adapter_state_dict()
    assert [k for k in state if k.startswith("adapter_scope.")] == [
        "adapter_scope.vera_projections.vera_A", "adapter_scope.vera_projections.vera_B"]
    lean = get_adapter_model(tiny_bert(), VeraConfig(r=4, save_projection=False, target_modules=["query"]))
    assert not any(k.startswith("adapter_scope.") for k in lean.adapter_state_dict())
