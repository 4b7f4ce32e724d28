"""MoELoRA (contrastive): the top-k layer against its equation, the contrastive loss against an explicit
hand computation (a closed-form case and loops over anchors, positives and negatives), the model-level term
from hooked expert inputs, that minimising it makes the experts' outputs less alike, the λ_cl = 0 arm,
gradients, recorder, save/load, default targets, budgets on MiniLM and SmolLM2, bad configs.

⚠ The paper's contrastive formula was not recoverable from the available sources; the tests pin the reading
the module documents (InfoNCE with the expert as the class, every positive pair used)."""
from __future__ import annotations

import copy
import dataclasses
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
from lorafam_nb.moe import moelora_cl
from lorafam_nb.moe.layers import MoELoRALinear
from lorafam_nb.moe.moelora_cl import (PAPER_TARGETS, ContrastiveMoELoRALinear, MoELoRAConfig,
                                       expert_contrastive_loss, expert_outputs)
from test_loramoe import tiny_llama

X = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(3))
MASK = torch.ones_like(X)
MASK[1, 6:] = 0
MASK[2, 3:] = 0
HEAD = ["classifier"]
SIX = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _loss_by_hand(outputs: torch.Tensor, experts: torch.Tensor, tau: float) -> float:
    """Loops over anchors a = (t, i), positives (same expert, other token), negatives (other expert)."""
    S, k, _ = outputs.shape
    items = [(t, int(experts[t, j]), outputs[t, j].double()) for t in range(S) for j in range(k)]
    unit = [o / o.norm() for _, _, o in items]
    terms = []
    for a, (ta, ea, _) in enumerate(items):
        negatives = [math.exp(float(unit[a] @ unit[n]) / tau) for n, (_, en, _) in enumerate(items) if en != ea]
        for p, (tp, ep, _) in enumerate(items):
            if ep == ea and tp != ta and negatives:
                pos = math.exp(float(unit[a] @ unit[p]) / tau)
                terms.append(-math.log(pos / (pos + sum(negatives))))
    return sum(terms) / len(terms)


def test_contrastive_loss_closed_form_case():
    """Two tokens on experts (0, 1): expert 0 outputs e1 on both, expert 1 outputs e2. Each of the 4 anchors
    has one positive (cos 1) and two negatives (cos 0): loss = −log(e^{1/τ} / (e^{1/τ} + 2))."""
    e1, e2 = torch.eye(3)[0], torch.eye(3)[1]
    outputs = torch.stack([torch.stack([3 * e1, e2]), torch.stack([e1, 5 * e2])])  # norms do not matter
    experts = torch.tensor([[0, 1], [0, 1]])
    tau = 0.1
    want = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2))
    assert float(expert_contrastive_loss(outputs, experts, tau)) == pytest.approx(want, rel=1e-6)
    # the same outputs with the experts crossed on token 1 (its e1 now comes from expert 1): the positives are
    # orthogonal and the negatives identical, so the loss is far higher
    crossed = expert_contrastive_loss(outputs, torch.tensor([[0, 1], [1, 0]]), tau)
    assert float(crossed) == pytest.approx(-math.log(1 / (1 + math.exp(1 / tau) + 1)), rel=1e-6)


@pytest.mark.parametrize("seed, k, tau", [(0, 2, 0.1), (1, 3, 0.5), (2, 1, 0.2)])
def test_contrastive_loss_equals_explicit_loops(seed, k, tau):
    g = torch.Generator().manual_seed(seed)
    outputs = torch.randn(7, k, 5, generator=g, dtype=torch.float64)
    experts = torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(7)])  # k distinct experts per token
    got = expert_contrastive_loss(outputs, experts, tau)
    assert float(got) == pytest.approx(_loss_by_hand(outputs, experts, tau), rel=1e-6)


def test_contrastive_loss_without_pairs_and_at_zero_outputs():
    one = expert_contrastive_loss(torch.randn(1, 2, 4, requires_grad=True), torch.tensor([[0, 1]]), 0.1)
    assert float(one.detach()) == 0.0  # no positive: a single token
    zero = torch.zeros(3, 2, 4, requires_grad=True)  # B = 0 at initialisation: every similarity is 0
    loss = expert_contrastive_loss(zero, torch.tensor([[0, 1], [0, 1], [1, 0]]), 0.1)
    assert float(loss) == pytest.approx(math.log(1 + 3))  # −log(1 / (1 + 3 negatives))
    loss.backward()
    assert torch.isfinite(zero.grad).all() and float(zero.grad.abs().sum()) == 0.0


def test_layer_equals_top_k_equation_and_expert_outputs():
    layer = mixture_layer(MoELoRAConfig(r=3, lora_alpha=6.0, num_experts=5, top_k=2))
    assert isinstance(layer, ContrastiveMoELoRALinear)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    A, B = layer.experts.lora_A, layer.experts.lora_B
    p = torch.softmax(x @ layer.router.weight.T, -1)
    top, idx = p.topk(2, -1)
    g = torch.zeros_like(p).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    ref = x @ layer.base_layer.weight.T + layer.base_layer.bias
    ref = ref + sum(g[..., i:i + 1] * 2.0 * (x @ A[i].T @ B[i].T) for i in range(5))
    torch.testing.assert_close(layer(x), ref, atol=1e-10, rtol=1e-10)
    flat = x.reshape(-1, 12)
    outs = expert_outputs(layer, flat, idx.reshape(-1, 2))
    for t in (0, 5, 13):
        for j in range(2):
            e = int(idx.reshape(-1, 2)[t, j])
            torch.testing.assert_close(outs[t, j], 2.0 * (B[e] @ (A[e] @ flat[t])), atol=1e-12, rtol=1e-12)


def test_model_term_is_the_mean_over_linears_of_the_loss_on_real_tokens():
    cfg = MoELoRAConfig(num_experts=4, top_k=2, contrastive_weight=0.3, temperature=0.2, contrastive_tokens=None,
                        target_modules=SIX, modules_to_save=HEAD)
    model = get_adapter_model(tiny_bert(), cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.experts.lora_B.normal_(0, 0.3)
    inputs: dict[str, torch.Tensor] = {}
    for name, layer in model.adapter_layers().items():
        layer.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0].detach()))
    model(input_ids=X, attention_mask=MASK)
    keep = MASK.reshape(-1).bool()
    per_linear = []
    with torch.no_grad():
        for name, layer in model.adapter_layers().items():
            x = inputs[name].reshape(-1, inputs[name].shape[-1])[keep]
            idx = torch.softmax(x @ layer.router.weight.T, -1).topk(2, -1).indices
            per_linear.append(_loss_by_hand(expert_outputs(layer, x, idx), idx, 0.2))
    got = model.aux_losses()
    assert set(got) == {"load_balance", "contrastive"}
    assert float(got["contrastive"]) == pytest.approx(0.3 * sum(per_linear) / len(per_linear), rel=1e-5)
    # padding is left out: the loss over all tokens differs
    with torch.no_grad():
        name, layer = next(iter(model.adapter_layers().items()))
        x = inputs[name].reshape(-1, inputs[name].shape[-1])
        idx = torch.softmax(x @ layer.router.weight.T, -1).topk(2, -1).indices
        assert abs(_loss_by_hand(expert_outputs(layer, x, idx), idx, 0.2) - per_linear[0]) > 1e-4
    with torch.no_grad():  # an evaluation forward computes no contrastive term
        model(input_ids=X, attention_mask=MASK)
    assert "contrastive" not in model.aux_losses()


def test_sampling_caps_the_tokens_per_linear(monkeypatch):
    layer = mixture_layer(MoELoRAConfig(num_experts=4, contrastive_tokens=5))
    seen = []
    monkeypatch.setattr(moelora_cl, "expert_contrastive_loss",
                        lambda o, e, t: seen.append(o.shape) or expert_contrastive_loss(o, e, t))
    layer(torch.randn(30, 12, dtype=torch.float64))
    assert seen == [torch.Size([5, 2, 10])]


def test_minimising_the_loss_makes_experts_outputs_less_alike():
    """The mechanism the paper relies on: a few steps on L_cl alone lower the cosine between different
    experts' outputs on the same tokens."""
    torch.manual_seed(0)
    layer = mixture_layer(MoELoRAConfig(r=2, num_experts=4, top_k=2, contrastive_tokens=None))
    with torch.no_grad():  # start from near-identical experts: every B the same plus a little noise
        layer.experts.lora_A.copy_(layer.experts.lora_A[:1].expand_as(layer.experts.lora_A))
        layer.experts.lora_B.copy_(layer.experts.lora_B[:1] + 0.05 * torch.randn_like(layer.experts.lora_B))
    x = torch.randn(64, 12, dtype=torch.float64)

    def cross_cosine() -> float:
        with torch.no_grad():
            outs = F.normalize(expert_outputs(layer, x, torch.arange(4).expand(64, 4)), dim=-1)  # (T, 4, d)
            sims = torch.einsum("tid,tjd->ij", outs, outs) / 64
            return float(sims[~torch.eye(4, dtype=torch.bool)].mean())

    before = cross_cosine()
    opt = torch.optim.Adam([layer.experts.lora_A, layer.experts.lora_B], lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        layer.context.start_forward({}, None)
        layer(x)
        torch.stack([v for _, v in layer.context.aux_losses]).sum().backward()
        opt.step()
    assert before > 0.9 and cross_cosine() < before - 0.3


def test_weight_zero_is_the_plain_mixture():
    cfg = MoELoRAConfig(num_experts=4, contrastive_weight=0.0, target_modules=SIX, modules_to_save=HEAD)
    model = get_adapter_model(tiny_bert(), cfg)
    assert all(type(layer) is MoELoRALinear for layer in model.adapter_layers().values())
    model(input_ids=X, attention_mask=MASK)
    assert set(model.aux_losses()) == {"load_balance"}


def test_gradients_recorder_save_load_and_merge(tmp_path):
    cfg = MoELoRAConfig(num_experts=4, target_modules=SIX, modules_to_save=HEAD)
    model = get_adapter_model(tiny_bert(), cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.experts.lora_B.normal_(0, 0.3)
    model.recorder.reset()
    assert_mixture_gradients(model, input_ids=X, attention_mask=MASK, labels=torch.tensor([0, 1, 0, 1]))
    for stats in model.recorder.layers.values():
        assert stats.n_tokens == int(MASK.sum()) and int(stats.tokens.sum()) == 2 * int(MASK.sum())
    model.save_adapter(tmp_path)
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert loaded.adapter_config == cfg
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=X, attention_mask=MASK).logits,
                                   model.eval()(input_ids=X, attention_mask=MASK).logits, atol=0, rtol=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_paper_targets_are_query_and_value_and_init_is_the_base():
    base = tiny_bert()
    bert = get_adapter_model(copy.deepcopy(base), MoELoRAConfig(target_modules=PAPER_TARGETS, modules_to_save=HEAD)).eval()
    assert sorted({n.rsplit(".", 1)[1] for n in bert.adapter_layers()}) == ["query", "value"]
    with torch.no_grad():
        torch.testing.assert_close(bert(input_ids=X, attention_mask=MASK).logits,
                                   base(input_ids=X, attention_mask=MASK).logits, atol=0, rtol=0)
    llama = get_adapter_model(tiny_llama(), MoELoRAConfig(target_modules=PAPER_TARGETS))
    assert sorted({n.rsplit(".", 1)[1] for n in llama.adapter_layers()}) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("change, message", [
    (dict(contrastive_weight=-0.1), "contrastive_weight"),
    (dict(temperature=0.0), "temperature must be positive"),
    (dict(contrastive_tokens=1), "contrastive_tokens"),
    (dict(num_experts=2, top_k=3), "top_k"),
])
def test_invalid_configs_raise(change, message):
    with pytest.raises(ValueError, match=message):
        MoELoRAConfig(**change)


@pytest.mark.parametrize("name", ["minilm", "smollm2-135m"])
def test_budget_matches_lora_r8_on_all_linears(name):
    config = (AutoConfig.from_pretrained(model_path("minilm")) if name == "minilm" else
              LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64))
    with torch.device("meta"):
        base = AutoModel.from_config(config)
    targets = list(MODELS[name].all_linear)
    sites = MoELoRAConfig(target_modules=targets).sites(base)
    target = LoraConfig(r=8).model_parameters(LoraConfig(target_modules=targets).sites(base))
    budget = match_budget(MoELoRAConfig, sites, target)
    assert budget.matched, budget
    sized = MoELoRAConfig.sized(budget.values, targets)
    assert sized.model_parameters(sites) == budget.closed_form == sum(
        sized.experts_per_layer[s.block] * (sized.r * (s.d_in + s.d_out) + s.d_in) for s in sites)
    adapted = get_adapter_model(base, sized)
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == budget.closed_form


def test_the_grids_matched_config_trains_with_unequal_expert_counts():
    """The budget match spreads experts unequally over layers ([5, 5, 5, 6, 6, 6] on MiniLM): the load-balance
    term pools each expert count's linears, and a whole training step runs (the grid and the benchmark do this)."""
    from lorafam_nb.grid import match_budget, method_sites, model_shape
    shape = model_shape("minilm")
    budget = match_budget(MoELoRAConfig, method_sites(MoELoRAConfig, shape), 331_776)
    assert len(set(budget.values["experts_per_layer"])) > 1
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    config = MoELoRAConfig.sized(budget.values, targets, modules_to_save=["classifier"])
    config = dataclasses.replace(config, experts_per_layer=[3, 4])  # tiny_bert's two blocks, unequal as well
    model = get_adapter_model(tiny_bert(), config)
    out = model(input_ids=torch.randint(1, 100, (2, 9)), labels=torch.tensor([0, 1]))
    terms = model.aux_losses()
    assert set(terms) >= {"load_balance"} and all(torch.isfinite(v) for v in terms.values())
    (out.loss + sum(terms.values())).backward()
