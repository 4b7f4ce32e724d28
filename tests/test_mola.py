"""MoLA: layer-wise expert allocation, the top-k equation, sparse == dense, budgets, the per-layer load
balance by hand, merge, gradients, and parity with moe-peft 2.0.2 (logits and its aux-loss function).

moe-peft's MoLA gives every layer the same number of experts, so the parity tests use uniform counts;
its ``_mixtral_load_balancing_loss_func`` (moe_peft/adapters/mola/model.py:13-64) is applied per layer
to compare with MoLA's per-layer loss.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_mixture_gradients, assert_sparse_equals_dense, mixture_layer, tiny_bert
from lorafam_nb import get_adapter_model
from lorafam_nb.core import block_index
from lorafam_nb.models import load_model
from lorafam_nb.moe.layers import MoELoRALinear
from lorafam_nb.moe.mola import SCHEMES, MoLAConfig, allocation
from test_loramoe import require_moe_peft, moe_peft_forward, moe_peft_model, tiny_llama

X = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(3))
MASK = torch.ones_like(X)
MASK[1, 6:] = 0
MASK[2, 3:] = 0
HEAD = ["classifier"]
SIX = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _randomise_b(model, std: float = 0.3, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.experts.lora_B.normal_(0, std)


def _dense_reference(layer: MoELoRALinear, x: torch.Tensor, k: int) -> torch.Tensor:
    W0, b0 = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.experts.lora_A, layer.experts.lora_B
    p = torch.softmax(x @ layer.router.weight.double().T, -1)  # softmax over all N experts first
    top, idx = p.topk(k, -1)
    w = torch.zeros_like(p).scatter(-1, idx, top / top.sum(-1, keepdim=True))  # then renormalise the top k
    out = x @ W0.T + b0
    for i in range(A.shape[0]):
        out = out + w[..., i:i + 1] * layer.experts.scaling * (x @ A[i].T @ B[i].T)
    return out


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_layer_equals_top_k_equation(path):
    cfg = MoLAConfig(r=3, lora_alpha=6.0, num_experts=5, top_k=2, lora_dropout=0.0, path=path)
    layer = mixture_layer(cfg)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _dense_reference(layer, x, 2), atol=1e-6, rtol=1e-6)


def test_top_k_equal_to_experts_is_the_dense_softmax_mixture():
    layer = mixture_layer(MoLAConfig(r=2, lora_alpha=4.0, num_experts=3, top_k=3, lora_dropout=0.0))
    x = torch.randn(11, 12, dtype=torch.float64)
    p = torch.softmax(x @ layer.router.weight.double().T, -1)
    mix = sum(p[:, i:i + 1] * (x @ layer.experts.lora_A[i].T @ layer.experts.lora_B[i].T) for i in range(3))
    ref = x @ layer.base_layer.weight.T + layer.base_layer.bias + 2.0 * mix
    torch.testing.assert_close(layer(x), ref, atol=1e-6, rtol=1e-6)


def test_sparse_path_equals_dense_path_forward_and_grads():
    cfg = MoLAConfig(r=4, num_experts=4, top_k=2, lora_dropout=0.0, target_modules=SIX, modules_to_save=HEAD,
                     path="sparse")
    sparse = get_adapter_model(tiny_bert(), cfg).eval()
    assert all(layer.path == "sparse" for layer in sparse.adapter_layers().values())
    _randomise_b(sparse)
    assert_sparse_equals_dense(sparse, input_ids=X, attention_mask=MASK, labels=torch.tensor([0, 1, 1, 0]))


def test_init_equals_base_model_bert_and_llama():
    base = tiny_bert()
    model = get_adapter_model(copy.deepcopy(base), MoLAConfig(experts_per_layer=[2, 4], target_modules=SIX,
                                                              modules_to_save=HEAD)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=X, attention_mask=MASK).logits,
                                   base(input_ids=X, attention_mask=MASK).logits, atol=0, rtol=0)
    llama = tiny_llama()
    adapted = get_adapter_model(copy.deepcopy(llama), MoLAConfig(experts_per_layer=[3, 5])).eval()
    assert len(adapted.adapter_layers()) == 2 * 7  # q, k, v, o, gate, up, down in both layers
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, llama(input_ids=ids).logits, atol=0, rtol=0)


def test_allocation_schemes():
    assert allocation("▽", 32) == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    assert allocation("△", 8) == [8, 8, 6, 6, 4, 4, 2, 2]
    assert allocation("⋈", 4) == [8, 2, 2, 8] and allocation("◇", 4) == [2, 8, 8, 2]
    assert allocation("□", 4) == [5, 5, 5, 5]
    assert allocation((2, 4, 6), 6) == [2, 2, 4, 4, 6, 6]
    assert set(SCHEMES) == {"□", "△", "▽", "⋈", "◇"}
    with pytest.raises(ValueError, match="equal groups"):
        allocation("▽", 6)
    with pytest.raises(ValueError, match="top_k"):
        MoLAConfig(experts_per_layer=[2, 1])


def test_per_layer_expert_counts_follow_the_allocation():
    model = get_adapter_model(tiny_bert(), MoLAConfig(experts_per_layer=[2, 6], target_modules=SIX,
                                                      modules_to_save=HEAD))
    for name, layer in model.adapter_layers().items():
        n = [2, 6][block_index(name)]
        assert layer.router.weight.shape[0] == n and layer.experts.lora_A.shape[0] == n
    with pytest.raises(ValueError, match="experts_per_layer"):
        get_adapter_model(tiny_bert(), MoLAConfig(experts_per_layer=[2], target_modules=SIX))


def _adapter_count(model) -> int:
    return sum(p.numel() for layer in model.adapter_layers().values() for p in layer.parameters() if p.requires_grad)


def test_equal_totals_give_equal_parameter_counts_closed_form_and_real():
    counts = {}
    for scheme in ([2, 6], [6, 2], [4, 4]):
        cfg = MoLAConfig(r=4, experts_per_layer=scheme, target_modules=SIX, modules_to_save=HEAD)
        model = get_adapter_model(tiny_bert(), cfg)
        counts[tuple(scheme)] = _adapter_count(model)
        assert cfg.model_parameters(cfg.sites(tiny_bert())) == counts[tuple(scheme)]
    assert len(set(counts.values())) == 1
    more = MoLAConfig(r=4, experts_per_layer=[4, 6], target_modules=SIX)
    assert more.model_parameters(more.sites(tiny_bert())) > counts[(4, 4)]


def test_minilm_count_matches_the_spec():
    """24 experts, r = 4 on the six linears of MiniLM-L6: 746,496 parameters for every scheme."""
    for scheme in ((2, 4, 6), (6, 4, 2), (4, 4, 4)):
        cfg = MoLAConfig(r=4, experts_per_layer=allocation(scheme, 6), target_modules=SIX)
        model = load_model("minilm", head="multiple_choice")
        assert cfg.model_parameters(cfg.sites(model)) == 746_496
    adapted = get_adapter_model(model, cfg)
    assert _adapter_count(adapted) == 746_496


@torch.no_grad()
def _aux_by_hand(model, seen: dict[str, list], mask: torch.Tensor, k: int, c: float) -> torch.Tensor:
    """c Σ_j N_j Σ_i f_i P_i, layer j over all its linears' real tokens, f over the K·T selections."""
    keep = mask.reshape(-1).bool()
    by_layer: dict[int, list[torch.Tensor]] = {}
    for name, logits in seen.items():
        by_layer.setdefault(block_index(name), []).append(logits[-1][keep])
    total = torch.zeros((), dtype=torch.float64)
    for logits in by_layer.values():
        p = torch.softmax(torch.cat(logits).double(), -1)  # (T, N_j), T = linears × tokens
        T, N = p.shape
        sel = p.topk(k, -1).indices
        f = torch.tensor([(sel == i).sum().item() for i in range(N)], dtype=torch.float64) / (k * T)
        P = p.mean(0)
        assert abs(float(f.sum()) - 1) < 1e-12
        total = total + N * (f * P).sum()
    return c * total


def _router_logits(model) -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {}
    for name, layer in model.adapter_layers().items():
        layer.router.register_forward_hook(lambda mod, args, out, name=name: seen.setdefault(name, []).append(out.logits))
    return seen


def test_aux_loss_equals_per_layer_hand_computation():
    cfg = MoLAConfig(r=4, experts_per_layer=[3, 5], top_k=2, router_aux_loss_coef=0.01, target_modules=SIX,
                     modules_to_save=HEAD)
    model = get_adapter_model(tiny_bert(), cfg).eval()
    _randomise_b(model)
    seen = _router_logits(model)
    model(input_ids=X, attention_mask=MASK)
    got = model.aux_losses()["load_balance"]
    torch.testing.assert_close(got.double(), _aux_by_hand(model, seen, MASK, 2, 0.01), atol=1e-7, rtol=1e-6)
    # padding is left out: counting padded tokens too changes the value
    assert abs(float(_aux_by_hand(model, seen, torch.ones_like(MASK), 2, 0.01) - got.detach())) > 1e-7


def test_aux_loss_off_when_coefficient_zero():
    model = get_adapter_model(tiny_bert(), MoLAConfig(router_aux_loss_coef=0.0, target_modules=SIX,
                                                      modules_to_save=HEAD))
    model(input_ids=X, attention_mask=MASK)
    assert model.aux_losses() == {}


def test_gradients_reach_exactly_experts_routers_head():
    cfg = MoLAConfig(experts_per_layer=[2, 4], target_modules=SIX, modules_to_save=HEAD)
    model = get_adapter_model(tiny_bert(), cfg)
    _randomise_b(model)
    assert_mixture_gradients(model, input_ids=X, attention_mask=MASK, labels=torch.tensor([0, 1, 0, 1]))


def test_merge_raises_and_changes_nothing():
    model = get_adapter_model(tiny_bert(), MoLAConfig(target_modules=SIX, modules_to_save=HEAD))
    _randomise_b(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_recorder_counts_k_selections_per_real_token():
    model = get_adapter_model(tiny_bert(), MoLAConfig(experts_per_layer=[2, 4], target_modules=SIX,
                                                      modules_to_save=HEAD)).eval()
    model.recorder.reset()
    with torch.no_grad():
        model(input_ids=X, attention_mask=MASK)
    for stats in model.recorder.layers.values():
        assert stats.n_tokens == int(MASK.sum()) and int(stats.tokens.sum()) == 2 * int(MASK.sum())
    names, load = model.recorder.load_matrix()
    assert load.shape == (12, 4) and torch.isnan(load[0, 2:]).all()


# --- parity with moe-peft 2.0.2 (MolaSparseMoe.forward, moe_peft/adapters/mola/model.py:111-159) ------

PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _theirs_and_ours(k: int = 2, coef: float = 0.01):
    hf = tiny_llama()
    cfg = MoLAConfig(r=4, lora_alpha=8.0, num_experts=4, top_k=k, lora_dropout=0.0, target_modules=PROJS,
                     router_aux_loss_coef=coef)
    ours = get_adapter_model(copy.deepcopy(hf), cfg).eval()
    _randomise_b(ours, std=0.2)
    weights = {}
    for site, layer in ours.adapter_layers().items():
        key = "mola." + site.removeprefix("model.")
        weights[f"{key}.moe_gate.weight"] = layer.router.weight.detach().clone()
        for e in range(cfg.num_experts):
            weights[f"{key}.experts.{e}.lora_A.weight"] = layer.experts.lora_A[e].detach().clone()
            weights[f"{key}.experts.{e}.lora_B.weight"] = layer.experts.lora_B[e].detach().clone()
    theirs = moe_peft_model(hf, {"peft_type": "MOLA", "routing_strategy": "mola", "r": 4, "lora_alpha": 8,
                                 "lora_dropout": 0.05, "num_experts": 4, "top_k": k, "router_loss": True,
                                 "router_aux_loss_coef": coef, "target_modules": PROJS}, weights, "x")
    return ours, theirs


def test_logits_and_aux_match_moe_peft_mola():
    require_moe_peft()
    from moe_peft.adapters.mola.model import _mixtral_load_balancing_loss_func as theirs_loss
    ours, theirs = _theirs_and_ours()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mine = ours(input_ids=ids).logits
    aux = ours.aux_losses()["load_balance"]
    out = moe_peft_forward(theirs, "x", ids, labels=True)
    torch.testing.assert_close(mine, out.logits, atol=1e-5, rtol=1e-5)
    # their router logits: layer by layer, 7 linears × 14 tokens each (all real, no padding)
    logits = out.router_logits
    assert logits.shape == (2 * 7 * 14, 4)
    per_layer = logits.view(2, 7 * 14, 4)
    # MoLA's loss: per layer over its linears, f over K·T picks (their F counts over T: Σ F = K), summed
    want = 0.01 * sum(theirs_loss(per_layer[j], 4, 2) for j in range(2)) / 2
    torch.testing.assert_close(aux, want, atol=1e-7, rtol=1e-6)
    # and moe-peft's own aux is the same function over all layers at once (a different pooling)
    torch.testing.assert_close(out.aux_loss, 0.01 * theirs_loss(logits, 4, 2), atol=1e-7, rtol=1e-6)
