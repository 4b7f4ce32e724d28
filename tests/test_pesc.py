"""PESC (Wu et al., EMNLP 2024): every expert against the explicit dense computation (frozen FFN + its
bottleneck adapter), the top-2 mixture with the router's KeepTopK-then-softmax order, sparse == dense, the
Switch load balance by hand, gradients, routing counts, save/load, and the grid's budgets on MiniLM and
SmolLM2 (shapes from their configs, no weights)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel

from conftest import assert_mixture_gradients, assert_sparse_equals_dense, tiny_bert, toy_task
from lorafam_nb import get_adapter_model, grid
from lorafam_nb.core import AdapterModel
from lorafam_nb.lora import LoraConfig
from lorafam_nb.models import MODELS, model_path
from lorafam_nb.moe.pesc import PESCConfig, PESCFFN
from lorafam_nb.trainer import TrainConfig, Trainer
from test_mixlora import padded_batch, tiny_llama

HEAD = ["classifier"]
X = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(3))
MASK = torch.ones_like(X)
MASK[1, 6:] = 0
MASK[2, 3:] = 0


def perturb(model: AdapterModel, seed: int = 1, up_std: float = 0.3, router_std: float = 0.5) -> AdapterModel:
    """Every W_up off zero and a router spread enough that every expert gets tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.experts.up.copy_(torch.randn(layer.experts.up.shape, generator=g) * up_std)
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g) * router_std)
    return model


def ffn_by_hand(ffn, x: torch.Tensor) -> torch.Tensor:
    """F(x) from the frozen weights: W_down(SiLU(W_gate x) ⊙ W_up x) (Llama) or W_down GELU(W_up x + b) + b (BERT)."""
    def lin(m: nn.Linear, v: torch.Tensor) -> torch.Tensor:
        return v @ m.weight.T + (m.bias if m.bias is not None else 0)
    inner = F.silu(lin(ffn.gate, x)) * lin(ffn.up, x) if ffn.gate is not None else F.gelu(lin(ffn.up, x))
    return lin(ffn.down, inner)


def expert_by_hand(layer: PESCFFN, i: int, x: torch.Tensor) -> torch.Tensor:
    """E_i(x) = A_i(F(x)) = s · GELU(F(x) W^i_down) W^i_up + F(x), the paper's row-vector form."""
    u = ffn_by_hand(layer.base_layer, x)
    w_down, w_up = layer.experts.down[i].T, layer.experts.up[i].T  # (d, b) and (b, d)
    return layer.experts.scaling * F.gelu(u @ w_down) @ w_up + u


def mixture_by_hand(layer: PESCFFN, x: torch.Tensor, k: int) -> torch.Tensor:
    """y = Σ_{i ∈ TopK} R(x)_i E_i(x), R = softmax(KeepTopK(W_r x, k)): top k of the logits, softmax over them."""
    logits = x @ layer.router.weight.T.to(x.dtype)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        top, idx = logits[t].topk(k)
        weights = torch.softmax(top, -1)
        for w, i in zip(weights, idx.tolist()):
            out[t] += w * expert_by_hand(layer, i, x[t:t + 1])[0]
    return out


def _layer(arch: str, path: str = "dense", **kw) -> PESCFFN:
    base = (tiny_bert() if arch == "bert" else tiny_llama()).double()
    cfg = PESCConfig(**{"num_experts": 5, "top_k": 2, "adapter_dim": 3, "moe_scaling": 0.7, "adapter_dropout": 0.0,
                        "path": path} | kw)
    model = perturb(get_adapter_model(base, cfg).eval())
    return next(iter(model.adapter_layers().values()))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_each_expert_equals_frozen_ffn_plus_its_adapter(arch):
    """With one-hot routing weights the layer is expert i alone, for every i: output = A_i(F(x)) by hand."""
    layer = _layer(arch)
    x = torch.randn(7, 32, dtype=torch.float64)
    u = layer.base_layer(x)
    torch.testing.assert_close(u, ffn_by_hand(layer.base_layer, x), atol=1e-12, rtol=0)
    for i in range(5):
        gates = F.one_hot(torch.full((7,), i), 5).double()
        got = u + layer.experts.dense(u, gates)
        torch.testing.assert_close(got, expert_by_hand(layer, i, x), atol=1e-12, rtol=0)
        torch.testing.assert_close(u + layer.experts.branch(u, i, i), expert_by_hand(layer, i, x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_layer_equals_top2_mixture_written_out_per_token(arch, path):
    layer = _layer(arch, path)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    got = layer(x)
    want = mixture_by_hand(layer, x.reshape(-1, 32), 2).view(2, 6, 32)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert layer.router.weight.shape == (5, 32)  # W_r ∈ R^{n×d}, no bias
    assert layer.experts.down_bias is None and layer.experts.up_bias is None


def test_sparse_path_equals_dense_path_forward_and_grads():
    model = perturb(get_adapter_model(tiny_bert(), PESCConfig(num_experts=4, adapter_dim=4, adapter_dropout=0.0,
                                                              path="sparse", modules_to_save=HEAD))).eval()
    assert_sparse_equals_dense(model, input_ids=X, attention_mask=MASK, labels=torch.tensor([0, 1, 1, 0]))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_init_equals_dense_model(arch):
    """W_up = 0: every adapter is the identity, the upcycled model is the dense one."""
    base = tiny_bert() if arch == "bert" else tiny_llama()
    model = get_adapter_model(copy.deepcopy(base), PESCConfig(num_experts=4, adapter_dim=4)).eval()
    assert all(float(layer.experts.up.detach().abs().sum()) == 0 for layer in model.adapter_layers().values())
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   base(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)


def test_dropout_is_on_the_adapter_input_only():
    """In training, with W_up = 0 the output is F(x) exactly whatever the dropout drew: F(x) itself is not dropped."""
    layer = _layer("llama", adapter_dropout=0.5)
    with torch.no_grad():
        layer.experts.up.zero_()
    layer.train()
    x = torch.randn(9, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ffn_by_hand(layer.base_layer, x), atol=1e-12, rtol=0)
    with torch.no_grad():
        layer.experts.up.normal_()
    assert not torch.equal(layer(x), layer(x))  # the branch does see dropout


def test_load_balance_equals_switch_formula_over_all_layers():
    cfg = PESCConfig(num_experts=4, adapter_dim=4, router_aux_loss_coef=0.01, modules_to_save=HEAD)
    model = perturb(get_adapter_model(tiny_bert(), cfg)).eval()
    seen = {}
    for name, layer in model.adapter_layers().items():
        layer.router.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out.logits.detach()))
    with torch.no_grad():
        model(input_ids=X, attention_mask=MASK)
    got = model.aux_losses()["load_balance"]
    keep = MASK.reshape(-1).bool()
    p = torch.softmax(torch.cat([v[keep] for v in seen.values()]).double(), -1)  # full softmax, padding out
    T, n = p.shape
    picks = p.topk(2, -1).indices
    f = torch.tensor([(picks == i).any(-1).sum().item() for i in range(n)], dtype=torch.float64) / T  # Σ f = k
    want = 0.01 * n * (f * p.mean(0)).sum()
    torch.testing.assert_close(got.double(), want, atol=1e-9, rtol=1e-6)
    model.adapter_config.router_aux_loss_coef = 0.0
    assert model.aux_losses() == {}


def test_gradients_reach_exactly_routers_adapters_and_head():
    model = perturb(get_adapter_model(tiny_bert(), PESCConfig(num_experts=4, adapter_dim=4, modules_to_save=HEAD)))
    assert_mixture_gradients(model, ("router.weight", "experts.down", "experts.up"),
                             input_ids=X, attention_mask=MASK, labels=torch.tensor([0, 1, 0, 1]))


def test_recorder_counts_two_experts_per_real_token():
    model = perturb(get_adapter_model(tiny_bert(), PESCConfig(num_experts=4, adapter_dim=4, modules_to_save=HEAD)))
    model.eval().recorder.reset()
    with torch.no_grad():
        model(input_ids=X, attention_mask=MASK)
    for stats in model.recorder.layers.values():
        assert stats.n_tokens == int(MASK.sum()) and int(stats.tokens.sum()) == 2 * int(MASK.sum())
    names, load = model.recorder.load_matrix()
    assert load.shape == (2, 4) and torch.allclose(load.sum(1), torch.ones(2, dtype=load.dtype))


def test_save_load_round_trip_and_merge_refused(tmp_path):
    model = perturb(get_adapter_model(tiny_bert(), PESCConfig(num_experts=3, adapter_dim=5, modules_to_save=HEAD)))
    model.eval().save_adapter(tmp_path)
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert isinstance(loaded.adapter_config, PESCConfig) and loaded.adapter_config.adapter_dim == 5
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=X, attention_mask=MASK).logits,
                                   model(input_ids=X, attention_mask=MASK).logits, atol=0, rtol=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad, message", [
    (dict(num_experts=0), "num_experts"), (dict(top_k=3, num_experts=2), "exceeds"),
    (dict(adapter_dim=1.5), "adapter_dim"), (dict(adapter_dropout=1.0), "adapter_dropout"),
    (dict(router_aux_loss_coef=-1.0), "non-negative"), (dict(path="fast"), "path"),
])
def test_invalid_configs_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        PESCConfig(**bad)


def test_closed_form_count_equals_real_count_and_trains():
    cfg = PESCConfig(num_experts=3, adapter_dim=5, modules_to_save=HEAD)
    model = get_adapter_model(tiny_bert(), cfg)
    real = sum(p.numel() for layer in model.adapter_layers().values() for p in layer.parameters() if p.requires_grad)
    assert real == cfg.model_parameters(cfg.sites(tiny_bert())) == 2 * 3 * (2 * 32 * 5 + 32)
    trainer = Trainer(model, toy_task(32), TrainConfig(lr=5e-3, max_steps=4, batch_size=8, device="cpu",
                                                       progress=False, log_every=2))
    history = trainer.train().history
    assert [row["step"] for row in history] == [2, 4] and all(row["load_balance"] > 0 for row in history)
    assert all(float(layer.experts.up.detach().abs().sum()) > 0 for layer in model.adapter_layers().values())


# --- the grid's budget: LoRA r = 8 on every linear, within ±5 %, routers counted -----------------------

def meta_model(name: str) -> tuple[nn.Module, list[str], int]:
    """An embedded model's base network on the meta device (its config, no weights), its "all linear layers"
    targets and LoRA r = 8's count on them (the grid's budget)."""
    with torch.device("meta"):
        base = AutoModel.from_config(AutoConfig.from_pretrained(model_path(name)))
    targets = list(MODELS[name].all_linear)
    lora = LoraConfig(r=8, target_modules=targets)
    return base, targets, lora.model_parameters(lora.sites(base))


@pytest.mark.parametrize("name, values, count", [
    ("minilm", {"adapter_dim": 10, "num_experts": 7}, 6 * 7 * (2 * 384 * 10 + 384)),
    ("smollm2-135m", {"adapter_dim": 8, "num_experts": 8}, 30 * 8 * (2 * 576 * 8 + 576)),
])
def test_budget_matches_lora_r8(name, values, count):
    base, targets, target = meta_model(name)
    assert target == {"minilm": 331_776, "smollm2-135m": 2_442_240}[name]
    sites = PESCConfig(target_modules=targets).sites(base)
    budget = grid.match_budget(PESCConfig, sites, target)
    assert budget.matched and budget.values == values and budget.closed_form == count
    config = PESCConfig.sized(budget.values, targets)
    adapted = get_adapter_model(base, config)
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == count
