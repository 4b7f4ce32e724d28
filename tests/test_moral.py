"""MoRAL: the top-k mixture layer (⚠ the paper's layer details are not recovered; the common recipe),
its load balance by hand, sparse == dense, merge, gradients, and the lifelong protocol: the accuracy
matrix R[s][j] and backward transfer, on a fake stream and on two tiny shipped chunks via
``experiment.run``."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_mixture_gradients, assert_sparse_equals_dense, mixture_layer, tiny_bert
from lorafam_nb import get_adapter_model
from lorafam_nb.experiment import RunSpec, encode_task, run
from lorafam_nb.moe.moral import LifelongResult, MoRALConfig, backward_transfer, lifelong
from lorafam_nb.tasks import evaluate
from lorafam_nb.trainer import TrainConfig

X = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(3))
MASK = torch.ones_like(X)
MASK[0, 5:] = 0
HEAD = ["classifier"]
SIX = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _randomise_b(model, std: float = 0.3) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.experts.lora_B.normal_(0, std)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_layer_equals_top_k_equation(k):
    layer = mixture_layer(MoRALConfig(r=2, lora_alpha=8.0, num_experts=4, top_k=k))
    x = torch.randn(13, 12, dtype=torch.float64)
    p = torch.softmax(x @ layer.router.weight.double().T, -1)
    top, idx = p.topk(k, -1)
    g = torch.zeros_like(p).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    if k == 4:
        torch.testing.assert_close(g, p)  # top_k = N: the dense softmax mixture
    mix = sum(g[:, i:i + 1] * (x @ layer.experts.lora_A[i].T @ layer.experts.lora_B[i].T) for i in range(4))
    ref = x @ layer.base_layer.weight.T + layer.base_layer.bias + 4.0 * mix
    torch.testing.assert_close(layer(x), ref, atol=1e-6, rtol=1e-6)


def test_init_equals_base_and_sparse_equals_dense():
    base = tiny_bert()
    cfg = MoRALConfig(target_modules=SIX, modules_to_save=HEAD, path="sparse")
    model = get_adapter_model(copy.deepcopy(base), cfg).eval()
    assert all(layer.path == "sparse" for layer in model.adapter_layers().values())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=X, attention_mask=MASK).logits,
                                   base(input_ids=X, attention_mask=MASK).logits, atol=0, rtol=0)
    _randomise_b(model)
    assert_sparse_equals_dense(model, input_ids=X, attention_mask=MASK, labels=torch.tensor([0, 1, 1, 0]))


def test_aux_loss_is_switch_balance_over_all_linears():
    cfg = MoRALConfig(num_experts=4, top_k=2, router_aux_loss_coef=0.05, target_modules=SIX, modules_to_save=HEAD)
    model = get_adapter_model(tiny_bert(), cfg).eval()
    _randomise_b(model)
    seen = []
    for layer in model.adapter_layers().values():
        layer.router.register_forward_hook(lambda mod, args, out: seen.append(out.logits.detach()))
    model(input_ids=X, attention_mask=MASK)
    keep = MASK.reshape(-1).bool()
    p = torch.softmax(torch.cat([s[keep] for s in seen]).double(), -1)
    sel = p.topk(2, -1).indices
    F = torch.tensor([(sel == i).any(-1).double().mean().item() for i in range(4)], dtype=torch.float64)
    want = 0.05 * 4 * (F * p.mean(0)).sum()  # λ N Σ_i F_i P_i with Σ F = k
    torch.testing.assert_close(model.aux_losses()["load_balance"].detach().double(), want, atol=1e-7, rtol=1e-6)


def test_gradients_and_merge():
    model = get_adapter_model(tiny_bert(), MoRALConfig(target_modules=SIX, modules_to_save=HEAD))
    _randomise_b(model)
    assert_mixture_gradients(model, input_ids=X, attention_mask=MASK, labels=torch.tensor([0, 1, 0, 1]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="top_k"):
        MoRALConfig(num_experts=2, top_k=3)


# --- the lifelong protocol -------------------------------------------------------------------------

def test_backward_transfer_formula():
    R = [[0.5, 0.1, 0.2], [0.4, 0.7, 0.3], [0.3, 0.6, 0.9]]
    # (R[2][0] − R[0][0] + R[2][1] − R[1][1]) / 2
    assert backward_transfer(R) == pytest.approx(((0.3 - 0.5) + (0.6 - 0.7)) / 2)
    assert LifelongResult(["a", "b", "c"], R, []).learning == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    with pytest.raises(ValueError, match="two chunks"):
        backward_transfer([[1.0]])


def test_lifelong_bookkeeping_with_a_fake_run():
    """Each stage gets the previous stage's model and is evaluated on every chunk; R[s] is that row."""
    calls = []

    def fake_run(spec, model):
        calls.append((spec.task, spec.eval_on, model))
        stage = len(calls)
        per_task = {c: round(0.1 * stage + 0.01 * i, 4) for i, c in enumerate(spec.eval_on)}
        return SimpleNamespace(model=f"model after {spec.task}", row={"per_task": per_task, "stage": stage})

    specs = [RunSpec(task=t) for t in ("arc_e", "obqa", "piqa")]
    result = lifelong(specs, fake_run)
    assert [c[0] for c in calls] == ["arc_e", "obqa", "piqa"]
    assert all(c[1] == ("arc_e", "obqa", "piqa") for c in calls)
    assert [c[2] for c in calls] == [None, "model after arc_e", "model after obqa"]
    assert result.accuracy == [[0.1, 0.11, 0.12], [0.2, 0.21, 0.22], [0.3, 0.31, 0.32]]
    assert backward_transfer(result.accuracy) == pytest.approx(((0.3 - 0.1) + (0.31 - 0.21)) / 2)
    with pytest.raises(ValueError, match="own chunk"):
        lifelong([RunSpec(task="arc_e"), RunSpec(task="arc_e")], fake_run)


@pytest.fixture
def one_thread():
    """MiniLM steps on a shared CPU: one intra-op thread avoids OpenMP oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lifelong_matrix_on_shipped_chunks(one_thread):
    """Two tiny chunks through experiment.run: R[s][j] equals an independent evaluation of the model
    right after stage s on chunk j's held-out split, and the model really carries over."""
    independent = []

    def recording_run(spec, model):
        out = run(spec, model)
        scores = {}
        for task in spec.eval_on:
            data = encode_task(RunSpec(**{**spec.__dict__, "task": task}), "test", spec.eval_n)
            scores[task] = evaluate(out.model, data)["accuracy"]
        independent.append(scores)
        return out

    train = TrainConfig(max_steps=1, batch_size=4, lr=1e-3, progress=False, device="cpu", log_every=1)
    finetune = MoRALConfig(num_experts=4, top_k=2, r=2, target_modules=SIX)
    specs = [RunSpec(model="minilm", task=t, finetune=finetune, train_n=4, eval_n=6, max_length=24, train=train)
             for t in ("arc_e", "obqa")]
    result = lifelong(specs, recording_run)
    assert result.chunks == ["arc_e", "obqa"]
    assert result.accuracy == [[s["arc_e"], s["obqa"]] for s in independent]
    assert result.runs[1]["eval_n"] == 12 and result.runs[1]["steps"] == 1
    assert backward_transfer(result.accuracy) == result.accuracy[1][0] - result.accuracy[0][0]
