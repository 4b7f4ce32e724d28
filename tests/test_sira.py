"""SiRA: capacity (the kept assignments and the dropped count against a hand-written GShard loop), dropped
tokens get no expert output, expert dropout on the gate values, evaluation without either, GShard's
auxiliary loss by hand, recorder counts, gradients, save/load, budgets on MiniLM and SmolLM2, bad configs.

⚠ The paper's capacity factor, dropout rate and loss weight are not recovered; the formulas follow GShard,
which SiRA says it adopts (see the module docstring and the chapter)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, LlamaConfig

from conftest import assert_mixture_gradients, mixture_layer, tiny_bert
from lorafam_nb import AdapterModel, get_adapter_model
from lorafam_nb.grid import match_budget
from lorafam_nb.lora import LoraConfig
from lorafam_nb.models import MODELS, model_path
from lorafam_nb.moe.sira import SiRAConfig, SiRALinear, capacity_mask, expert_capacity

X = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(3))
MASK = torch.ones_like(X)
MASK[1, 6:] = 0
MASK[3, 4:] = 0
HEAD = ["classifier"]
SIX = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _gshard_by_hand(selected: list[list[int]], num_experts: int, capacity: int, real: list[bool]) -> list[list[bool]]:
    """GShard's placement: first choices of all tokens in order, then second choices; padding skipped."""
    load = [0] * num_experts
    fits = [[True] * len(row) for row in selected]
    for j in range(len(selected[0])):
        for t, row in enumerate(selected):
            if not real[t]:
                continue
            e = row[j]
            fits[t][j] = load[e] < capacity
            load[e] += fits[t][j]
    return fits


def test_capacity_formula_and_mask_equal_hand_loop():
    assert expert_capacity(16, 4, 2, 1.0) == 8 and expert_capacity(10, 4, 2, 1.25) == 7  # ⌈γ k S / E⌉
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(23, 5, generator=g) + torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0])  # crowd experts 0 and 1
    selected = logits.topk(2, -1).indices
    real = torch.rand(23, generator=g) > 0.2
    for capacity in (0, 3, 6, 100):
        got = capacity_mask(selected, 5, capacity, real)
        want = _gshard_by_hand(selected.tolist(), 5, capacity, real.tolist())
        assert got.tolist() == want, capacity
    assert capacity_mask(selected, 5, 4).tolist() == _gshard_by_hand(selected.tolist(), 5, 4, [True] * 23)


def _crowded_layer(num_experts: int = 4, **kw) -> SiRALinear:
    """A float64 SiRA layer whose router sends every token of a positive input to experts 0 then 1."""
    layer = mixture_layer(SiRAConfig(r=2, lora_alpha=4.0, num_experts=num_experts, top_k=2, **kw))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0
        layer.router.weight[1] = 0.5
    return layer


def _reference(layer: SiRALinear, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    A, B = layer.experts.lora_A, layer.experts.lora_B
    out = x @ layer.base_layer.weight.T + layer.base_layer.bias
    return out + sum(gates[:, e:e + 1] * layer.experts.scaling * (x @ A[e].T @ B[e].T) for e in range(A.shape[0]))


def test_over_capacity_assignments_are_dropped_counted_and_give_no_output():
    layer = _crowded_layer(capacity_factor=1.0, expert_dropout=0.0).train()
    x = torch.rand(16, 12, dtype=torch.float64) + 0.1  # all tokens prefer expert 0, then 1
    out = layer(x)
    C = expert_capacity(16, 4, 2, 1.0)  # 8
    p = torch.softmax(x @ layer.router.weight.T, -1)
    top, idx = p.topk(2, -1)
    assert (idx[:, 0] == 0).all() and (idx[:, 1] == 1).all()
    fits = torch.tensor(_gshard_by_hand(idx.tolist(), 4, C, [True] * 16))
    assert int((~fits).sum()) == 16  # tokens 8..15 lose both choices: 8 over expert 0's capacity, 8 over 1's
    stats = layer.context.recorder.layers[""]
    assert stats.dropped == 16 and stats.tokens.tolist() == [8, 8, 0, 0]
    gates = torch.zeros_like(p).scatter(-1, idx, top / top.sum(-1, keepdim=True) * fits)
    torch.testing.assert_close(out, _reference(layer, x, gates), atol=1e-10, rtol=1e-10)
    # a token whose every assignment was dropped passes through W_0 alone, bit for bit
    base = layer.base_layer(x)
    assert torch.equal(out[8:], base[8:]) and not torch.allclose(out[:8], base[:8])
    assert layer.context.recorder.summary()["dropped_fraction"] == pytest.approx(16 / 32)


def test_padding_takes_no_capacity_and_is_never_dropped():
    layer = _crowded_layer(capacity_factor=1.0, expert_dropout=0.0).train()
    x = torch.rand(2, 8, 12, dtype=torch.float64) + 0.1
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0  # 13 real tokens: C = ⌈2·13/4⌉ = 7
    layer.context.start_forward({}, mask)
    layer(x)
    real = mask.reshape(-1).bool().tolist()
    fits = _gshard_by_hand([[0, 1]] * 16, 4, expert_capacity(13, 4, 2, 1.0), real)
    dropped = sum(not f for t, row in enumerate(fits) for f in row if real[t])
    stats = layer.context.recorder.layers[""]
    assert stats.n_tokens == 13 and stats.dropped == dropped == 12 and int(stats.tokens.sum()) == 26 - 12


def test_expert_dropout_zeroes_gate_values_and_rescales_the_rest():
    layer = mixture_layer(SiRAConfig(r=2, lora_alpha=4.0, num_experts=4, top_k=2, capacity_factor=None,
                                     expert_dropout=0.5)).train()
    x = torch.randn(40, 12, dtype=torch.float64)
    torch.manual_seed(7)
    out = layer(x)
    p = torch.softmax(x @ layer.router.weight.T, -1)
    top, idx = p.topk(2, -1)
    torch.manual_seed(7)
    keep = F.dropout(torch.ones(40, 2, dtype=torch.float64), 0.5)  # the same draws: 0 or 1/(1 − p) = 2
    assert set(keep.unique().tolist()) == {0.0, 2.0}
    gates = torch.zeros_like(p).scatter(-1, idx, top / top.sum(-1, keepdim=True) * keep)
    torch.testing.assert_close(out, _reference(layer, x, gates), atol=1e-10, rtol=1e-10)
    assert layer.context.recorder.layers[""].dropped == 0  # expert dropout is not a capacity drop


def test_evaluation_has_no_capacity_or_dropout_unless_asked():
    layer = _crowded_layer(capacity_factor=1.0, expert_dropout=0.5).eval()
    x = torch.rand(16, 12, dtype=torch.float64) + 0.1
    p = torch.softmax(x @ layer.router.weight.T, -1)
    top, idx = p.topk(2, -1)
    plain = torch.zeros_like(p).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(layer(x), _reference(layer, x, plain), atol=1e-10, rtol=1e-10)
    assert layer.context.recorder.layers[""].dropped == 0
    layer.eval_capacity_factor = 1.0
    assert torch.equal(layer(x)[8:], layer.base_layer(x)[8:])
    assert layer.context.recorder.layers[""].dropped == 16


def _router_logits(model) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    for layer in model.adapter_layers().values():
        layer.router.register_forward_hook(lambda mod, args, out: seen.append(out.logits.detach()))
    return seen


def test_aux_loss_is_gshard_per_linear_by_hand():
    cfg = SiRAConfig(num_experts=4, top_k=2, router_aux_loss_coef=0.05, target_modules=SIX, modules_to_save=HEAD)
    model = get_adapter_model(tiny_bert(), cfg).train()
    seen = _router_logits(model)
    model(input_ids=X, attention_mask=MASK)
    keep = MASK.reshape(-1).bool()
    terms = []
    for logits in seen:
        p = torch.softmax(logits[keep].double(), -1)
        S, E = p.shape
        first = p.argmax(-1)
        c = torch.tensor([(first == e).sum().item() for e in range(E)], dtype=torch.float64)
        terms.append(E * sum(c[e] / S * p[:, e].mean() for e in range(E)))  # E Σ_e (c_e/S) m_e
    want = 0.05 * sum(terms) / len(terms)
    torch.testing.assert_close(model.aux_losses()["load_balance"].detach().double(), want, atol=1e-7, rtol=1e-6)
    assert len(seen) == 12


def test_recorder_over_a_model_counts_kept_and_dropped_real_assignments():
    cfg = SiRAConfig(num_experts=4, top_k=2, capacity_factor=0.5, target_modules=SIX, modules_to_save=HEAD)
    model = get_adapter_model(tiny_bert(), cfg).train()
    seen = _router_logits(model)
    model.recorder.reset()
    model(input_ids=X, attention_mask=MASK)
    keep = MASK.reshape(-1).bool()
    real = int(keep.sum())
    total = 0
    for logits, stats in zip(seen, model.recorder.layers.values()):
        idx = logits.topk(2, -1).indices
        fits = _gshard_by_hand(idx.tolist(), 4, expert_capacity(real, 4, 2, 0.5), keep.tolist())
        dropped = sum(not f for t, row in enumerate(fits) for f in row if keep[t])
        assert stats.dropped == dropped and int(stats.tokens.sum()) == 2 * real - dropped
        total += dropped
    assert total > 0  # γ = 0.5 leaves room for only half of the assignments
    assert model.recorder.summary()["dropped_fraction"] == pytest.approx(total / (12 * 2 * real))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradients_reach_exactly_experts_routers_head(mode):
    cfg = SiRAConfig(num_experts=4, capacity_factor=2.0, expert_dropout=0.1, target_modules=SIX,
                     modules_to_save=HEAD)
    model = get_adapter_model(tiny_bert(), cfg)
    getattr(model, mode)()
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.experts.lora_B.normal_(0, 0.3)
    assert_mixture_gradients(model, input_ids=X, attention_mask=MASK, labels=torch.tensor([0, 1, 0, 1]))


def test_init_is_the_base_model_and_save_load_round_trip(tmp_path):
    base = tiny_bert()
    cfg = SiRAConfig(num_experts=4, target_modules=SIX, modules_to_save=HEAD)
    model = get_adapter_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=X, attention_mask=MASK).logits,
                                   base(input_ids=X, attention_mask=MASK).logits, atol=0, rtol=0)
        for layer in model.adapter_layers().values():
            layer.experts.lora_B.normal_(0, 0.3)
    model.save_adapter(tmp_path)
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert loaded.adapter_config == cfg
    assert all(isinstance(layer, SiRALinear) for layer in loaded.adapter_layers().values())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=X, attention_mask=MASK).logits,
                                   model(input_ids=X, attention_mask=MASK).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge()


@pytest.mark.parametrize("change, message", [
    (dict(capacity_factor=0.0), "capacity_factor must be positive"),
    (dict(eval_capacity_factor=-1.0), "eval_capacity_factor must be positive"),
    (dict(expert_dropout=1.0), r"expert_dropout must be in \[0, 1\)"),
    (dict(num_experts=2, top_k=3), "top_k"),
    (dict(experts_per_layer=[4, 1]), "top_k"),
])
def test_invalid_configs_raise(change, message):
    with pytest.raises(ValueError, match=message):
        SiRAConfig(**change)


def _shape_sites(name: str, config):
    """The sites SiRA and LoRA get on ``name``'s linears, from its config alone (meta device, no weights)."""
    with torch.device("meta"):
        base = AutoModel.from_config(config)
    targets = list(MODELS[name].all_linear)
    return base, targets, SiRAConfig(target_modules=targets).sites(base), LoraConfig(target_modules=targets).sites(base)


@pytest.mark.parametrize("name", ["minilm", "smollm2-135m"])
def test_budget_matches_lora_r8_on_all_linears(name):
    config = (AutoConfig.from_pretrained(model_path("minilm")) if name == "minilm" else
              LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64))
    base, targets, sites, lora_sites = _shape_sites(name, config)
    assert len(sites) == {"minilm": 6 * 6, "smollm2-135m": 30 * 7}[name]
    target = LoraConfig(r=8).model_parameters(lora_sites)
    budget = match_budget(SiRAConfig, sites, target)
    assert budget.matched, budget
    sized = SiRAConfig.sized(budget.values, targets)
    per_layer = sized.experts_per_layer
    assert min(per_layer) >= sized.top_k and max(per_layer) - min(per_layer) <= 1
    assert sized.model_parameters(sites) == budget.closed_form
    # the closed form is N_j r (d_in + d_out) + N_j d_in summed over the linears
    assert budget.closed_form == sum(per_layer[s.block] * (sized.r * (s.d_in + s.d_out) + s.d_in) for s in sites)
    assert abs(budget.closed_form / target - 1) <= 0.05 and math.isclose(budget.deviation, budget.closed_form / target - 1)
    adapted = get_adapter_model(base, sized)  # what injection really creates (on the meta device)
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == budget.closed_form
