"""LLaVA-MoLE (Chen et al., 2024): the FFN mixture against its equation written out token by token (the
release's sparse mode, the Switch-style ablation and the dense mode), one expert per token and nothing else
touching it, the frozen model at init, which parameters the LM loss and the balance loss reach, the
release's per-sample balance term by hand, parameter counts, the domain × expert tables, and SmolLM2-135M."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_bert
from lorafam_nb import get_adapter_model
from lorafam_nb.core import AdapterContext, count_parameters
from lorafam_nb.lora import LoRALinear
from lorafam_nb.models import FeedForward
from lorafam_nb.moe.llava_mole import LLaVAMoLEConfig, LLaVAMoLEFFN, mutual_information, route_table

K, R, ALPHA = 3, 4, 8
MODES = {"code": {}, "scale_by_gate": {"scale_by_gate": True}, "dense_moe": {"dense_moe": True}}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def mole_config(**kw) -> LLaVAMoLEConfig:
    return LLaVAMoLEConfig(**{"r": R, "lora_alpha": ALPHA, "num_experts": K} | kw)


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :5] = 0
    return ids, mask


def perturb(model, seed: int = 1):
    """Every B off zero, routers spread so that every expert gets tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            if isinstance(layer, LLaVAMoLEFFN):
                layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g) * 2)
                for experts in layer.experts.values():
                    experts.lora_B.copy_(torch.randn(experts.lora_B.shape, generator=g) * 0.1)
            else:
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


def ffn_layer(seed: int = 0, **kw) -> LLaVAMoLEFFN:
    torch.manual_seed(seed)
    d, d_ff = 12, 20
    ffn = FeedForward(nn.Linear(d, d_ff, bias=False), nn.Linear(d_ff, d, bias=False), nn.SiLU(),
                      nn.Linear(d, d_ff, bias=False)).requires_grad_(False)
    layer = LLaVAMoLEFFN(ffn, K, 1, r=3, scaling=1.5, **kw).double()
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
        for experts in layer.experts.values():
            experts.lora_B.normal_(0, 0.3)
    return layer


def equation(layer: LLaVAMoLEFFN, x: torch.Tensor) -> torch.Tensor:
    """Token by token: p = softmax(W_r x + b_r), e* = argmax p, weights g (1 on e*; p_{e*} on e*; p), and
    D h + Σ_e g_e ΔD_e(h), h = SiLU(G x + Σ_e g_e ΔG_e x) ⊙ (U x + Σ_e g_e ΔU_e x)."""
    ffn, s = layer.base_layer, layer.experts["up"].scaling

    def delta(name, e, v):
        ex = layer.experts[name]
        return s * ex.lora_B[e] @ (ex.lora_A[e] @ v)

    rows = []
    for t in x.reshape(-1, x.shape[-1]):
        p = torch.softmax(layer.router.weight @ t + layer.router.bias, 0)
        star = int(p.detach().argmax())
        if layer.dense_moe:
            g = {e: p[e] for e in range(K)}
        else:
            g = {star: p[star] if layer.scale_by_gate else 1.0}
        h = F.silu(ffn.gate.weight @ t + sum(w * delta("gate", e, t) for e, w in g.items())) * \
            (ffn.up.weight @ t + sum(w * delta("up", e, t) for e, w in g.items()))
        rows.append(ffn.down.weight @ h + sum(w * delta("down", e, h) for e, w in g.items()))
    return torch.stack(rows).view(x.shape)


@pytest.mark.parametrize("mode", list(MODES))
def test_ffn_equals_equation_on_both_paths(mode):
    layer = ffn_layer(**MODES[mode])
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    g = torch.randn_like(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert len(params) == 2 + 6  # router W_r, b_r; A, B on gate, up, down
    results = {}
    for path in ("dense", "sparse", "equation"):
        layer.path = "dense" if path == "equation" else path
        out = equation(layer, x) if path == "equation" else layer(x)
        results[path] = (out, torch.autograd.grad(out, params, g, allow_unused=True))
    for path in ("sparse", "equation"):
        torch.testing.assert_close(results[path][0], results["dense"][0], atol=1e-10, rtol=0)
        for ours, ref in zip(results["dense"][1], results[path][1]):
            if ref is None:
                assert ours is None or ours.abs().max() == 0
            else:
                torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
    assert (results["dense"][0] - layer.base_layer(x)).abs().max() > 1e-2  # the experts do act
    router_grad = results["dense"][1][0]
    # the release's sparse mode: no LM gradient reaches the router; the two ablations do reach it
    assert (router_grad is None or router_grad.abs().max() == 0) == (mode == "code")


def test_one_expert_per_token_and_a_token_depends_only_on_its_expert():
    layer = ffn_layer()
    layer.context = AdapterContext()
    x = torch.randn(40, 12, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    route = layer.context.routes[-1]
    assert route.selected.shape == (40, 1)
    chosen = route.selected[:, 0]
    assert set(chosen.tolist()) == set(range(K))  # every expert has tokens, so the check below bites
    stats = layer.context.recorder.layers[""]
    assert int(stats.tokens.sum()) == 40 and stats.n_tokens == 40
    for e in range(K):
        changed = copy.deepcopy(layer)
        with torch.no_grad():
            for experts in changed.experts.values():
                experts.lora_A[e].normal_()
                experts.lora_B[e].normal_()
        with torch.no_grad():
            diff = (changed(x) - out).abs().amax(1)
        assert torch.equal(diff[chosen != e], torch.zeros_like(diff[chosen != e]))
        assert (diff[chosen == e] > 1e-6).all()


def test_init_is_the_frozen_model_and_targets():
    base = tiny_llama()
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    model = get_adapter_model(copy.deepcopy(base), mole_config())
    layers = model.adapter_layers()
    assert sorted({type(m).__name__ for m in layers.values()}) == ["LLaVAMoLEFFN", "LoRALinear"]
    assert sum(isinstance(m, LLaVAMoLEFFN) for m in layers.values()) == 2
    assert sorted({n.rpartition(".")[2] for n, m in layers.items() if isinstance(m, LoRALinear)}) == \
        ["k_proj", "o_proj", "q_proj", "v_proj"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-6, rtol=0)
        perturb(model)
        assert (model(input_ids=ids, attention_mask=mask).logits - ref).abs().max() > 1e-4


@pytest.mark.parametrize("mode", list(MODES))
def test_gradients_reach_exactly_what_the_paper_trains(mode):
    model = perturb(get_adapter_model(tiny_llama(), mole_config(lora_dropout=0.0, **MODES[mode]))).train()
    ids, mask = padded_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.endswith(("router.weight", "router.bias", "lora_A", "lora_B"))}
    assert trainable == expected and len(expected) == 2 * (2 + 6) + 2 * 4 * 2
    out.loss.backward(retain_graph=True)
    lm = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    routers = {n for n in trainable if ".router." in n}
    assert lm == (trainable - routers if mode == "code" else trainable)  # sparse: the LM loss skips the routers
    model.zero_grad()
    model.aux_loss().backward()
    aux = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert routers <= aux  # the balance loss trains them (through P)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def _balance_by_hand(probs, chosen, rows) -> float:
    """(1/B) Σ_i Σ_e mean_{tokens of i} p_e · mean_{tokens of i} 1[e* = e], all layers pooled per sample."""
    total, samples = 0.0, sorted(set(rows))
    for i in samples:
        mine = [j for j, r in enumerate(rows) if r == i]
        P = [sum(probs[j][e] for j in mine) / len(mine) for e in range(len(probs[0]))]
        Fr = [sum(chosen[j] == e for j in mine) / len(mine) for e in range(len(probs[0]))]
        total += sum(p * f for p, f in zip(P, Fr))
    return total / len(samples)


def test_balance_loss_by_hand_per_sample_pooled_over_layers_without_padding():
    config = mole_config(num_experts=3)
    logits = {"l0": torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0], [0.0, 3.0, 0.0],
                                  [2.5, 0.0, 1.0], [0.0, 0.0, 0.5], [0.0, 0.0, 9.0]]),
              "l1": torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.5, 0.0, 0.0],
                                  [0.0, 0.0, 4.0], [1.0, 0.0, 0.0], [9.0, 0.0, 0.0]])}
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    context = AdapterContext()
    context.start_forward({}, mask)
    for name, z in logits.items():
        p = torch.softmax(z, -1)
        context.route(name, z, p, p.argmax(-1, keepdim=True), torch.zeros(2, 3, 5))
    got = config.aux_loss_terms(context)["load_balance"].item()
    real = [0, 1, 2, 3, 4]  # token 5 (row 1, last position) is padding
    probs = [torch.softmax(logits[n][t], -1).tolist() for n in logits for t in real]
    chosen = [max(range(3), key=lambda e: p[e]) for p in probs]
    rows = [t // 3 for _ in logits for t in real]
    assert got == pytest.approx(_balance_by_hand(probs, chosen, rows), rel=1e-6)
    # not the batch-level Switch form (E Σ_e f_e P_e), nor its value with the padding token
    f = [sum(c == e for c in chosen) / len(chosen) for e in range(3)]
    P = [sum(p[e] for p in probs) / len(probs) for e in range(3)]
    assert abs(got - 3 * sum(a * b for a, b in zip(f, P))) > 0.1
    everything = [torch.softmax(logits[n][t], -1).tolist() for n in logits for t in range(6)]
    assert abs(got - _balance_by_hand(everything, [max(range(3), key=lambda e: p[e]) for p in everything],
                                      [t // 3 for _ in logits for t in range(6)])) > 1e-3
    # one expert taking everything with certainty gives 1 per sample; an even spread at p = 1/K gives 1/K
    ctx = AdapterContext()
    ctx.start_forward({}, None)
    ctx.route("l", torch.zeros(6, 3), torch.full((6, 3), 1 / 3), torch.tensor([[0], [1], [2]] * 2), torch.zeros(2, 3, 4))
    assert config.aux_loss_terms(ctx)["load_balance"].item() == pytest.approx(1 / 3)


def test_model_balance_loss_matches_hand_computation_and_weight():
    model = perturb(get_adapter_model(tiny_llama(), mole_config(router_aux_loss_coef=0.05))).eval()
    captured = []
    for layer in model.adapter_layers().values():
        if isinstance(layer, LLaVAMoLEFFN):
            layer.router.register_forward_hook(lambda mod, args, out: captured.append(out))
    ids, mask = padded_batch()
    model(input_ids=ids, attention_mask=mask)
    keep = mask.reshape(-1).bool()
    rows = torch.arange(3).repeat_interleave(9)[keep].tolist() * 2
    probs = torch.cat([c.probs[keep] for c in captured]).tolist()
    chosen = torch.cat([c.selected[keep, 0] for c in captured]).tolist()
    assert model.aux_losses()["load_balance"].item() == pytest.approx(0.05 * _balance_by_hand(probs, chosen, rows),
                                                                      rel=1e-5)
    assert get_adapter_model(tiny_llama(), mole_config(router_aux_loss_coef=0.0)).aux_losses() == {}


def test_parameter_count_is_the_closed_form():
    base = tiny_llama()
    config = mole_config()
    sites = config.sites(base)
    model = get_adapter_model(base, config)
    d, ff, kv = 32, 64, 16  # k and v project to 2 key/value heads of width 8
    attention = R * ((d + d) * 2 + (d + kv) * 2)
    mlp = K * R * 3 * (d + ff) + K * (d + 1)
    assert count_parameters(model)[0] == config.model_parameters(sites) == 2 * (attention + mlp)
    assert config.num_parameters(d, ff) == K * R * (d + ff)
    # the spec's Vicuna-7B example: r = 16, K = 3 → 2.71 M per layer, 86.8 M in all
    vicuna = mole_config(r=16)
    per_layer = 3 * 16 * 3 * (4096 + 11008) + 3 * 4097 + 4 * 16 * (4096 + 4096)
    assert round(per_layer / 1e6, 2) == 2.71 and round(32 * per_layer / 1e6, 1) == 86.8
    assert vicuna.num_parameters(4096, 11008) * 3 + 3 * 4097 + 4 * 16 * 8192 == per_layer


def test_route_table_attributes_routes_to_samples_and_mutual_information():
    model = perturb(get_adapter_model(tiny_llama(), mole_config())).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    domains = torch.tensor([0, 1, 1])
    tables = route_table(model.context.routes, domains, 2)
    assert list(tables) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for name, table in tables.items():
        assert table.shape == (2, K)
        assert table.sum(1).tolist() == [int(mask[0].sum()), int(mask[1:].sum())]  # real tokens per domain
        assert torch.equal(table.sum(0), model.recorder.layers[name].tokens.long())
    assert mutual_information(torch.tensor([[5, 0], [0, 5]])) == pytest.approx(math.log(2))
    assert mutual_information(torch.tensor([[2, 4], [1, 2]])) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r must be"), ({"num_experts": 0}, "num_experts"), ({"top_k": 4}, "exceeds"),
    ({"lora_dropout": 1.0}, "lora_dropout"), ({"router_aux_loss_coef": -1.0}, "non-negative"),
    ({"path": "fast"}, "path"), ({"dense_moe": True, "scale_by_gate": True}, "dense_moe"),
])
def test_invalid_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mole_config(**kwargs)


def test_ungated_bert_ffn_starts_frozen_and_trains_up_and_down_experts():
    base = tiny_bert()
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    config = mole_config(target_modules=["query", "value"], modules_to_save=["classifier"])
    sites = config.sites(base)
    model = get_adapter_model(copy.deepcopy(base), config)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-6, rtol=0)
    layer = model.model.bert.encoder.layer[0].intermediate
    assert isinstance(layer, LLaVAMoLEFFN) and sorted(layer.experts) == ["down", "up"]
    head = sum(p.numel() for n, p in model.named_parameters() if ".classifier." in n)
    assert count_parameters(model)[0] - head == config.model_parameters(sites) == \
        2 * (K * R * 2 * (32 + 64) + K * 33 + 2 * R * 64)
    perturb(model).train()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1]))
    (out.loss + model.aux_loss()).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}
    # the GELU FFN against its equation, token by token (the code's sparse mode)
    x = torch.randn(5, 32)
    with torch.no_grad():
        p = torch.softmax(x @ layer.router.weight.t() + layer.router.bias, -1)
        ffn, s = layer.base_layer, layer.experts["up"].scaling
        rows = []
        for t, e in zip(x, p.argmax(-1).tolist()):
            up, down = layer.experts["up"], layer.experts["down"]
            h = F.gelu(ffn.up(t) + s * up.lora_B[e] @ (up.lora_A[e] @ t))
            rows.append(ffn.down(h) + s * down.lora_B[e] @ (down.lora_A[e] @ h))
        torch.testing.assert_close(layer.eval()(x), torch.stack(rows), atol=1e-5, rtol=0)


def test_smollm2_inject_forward_backward():
    from lorafam_nb.models import ModelNotAvailableError, load_model
    try:
        base = load_model("smollm2-135m", head="causal_lm")
    except ModelNotAvailableError as err:
        pytest.skip(str(err))
    ids = torch.tensor([[1, 504, 3458, 314, 4649, 28], [2, 2, 1, 1116, 8323, 30]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    config = LLaVAMoLEConfig(lora_dropout=0.0)
    sites = config.sites(base)
    model = get_adapter_model(base, config)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out.logits.detach()[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=0)
    assert sum(isinstance(m, LLaVAMoLEFFN) for m in model.modules()) == 30
    (out.loss + model.aux_loss()).backward()
    d, ff = 576, 1536
    assert count_parameters(model)[0] == config.model_parameters(sites) == \
        30 * (3 * 16 * 3 * (d + ff) + 3 * (d + 1) + 16 * (2 * (d + d) + 2 * (d + 192)))
    router = model.model.model.layers[0].mlp.router
    assert router.weight.grad.abs().sum() > 0 and router.bias.grad.abs().sum() > 0
    assert all(int(s.tokens.sum()) == int(mask.sum()) for s in model.recorder.layers.values())


def test_registered_as_a_multimodal_method():
    from lorafam_nb.registry import METHODS

    assert METHODS["llava_mole"] is LLaVAMoLEConfig
    assert LLaVAMoLEConfig.modality == "multimodal" and "card" in LLaVAMoLEConfig.__dict__
    assert LLaVAMoLEConfig.card.bibkey == "chen2024llavamole" and LLaVAMoLEConfig.card.chapter == "llava_mole"


def _card_formula(config: LLaVAMoLEConfig, d_in: int, d_out: int) -> int:
    """The card's ``params`` (K r (d_in + d_out), in LaTeX) read as the overview reads card formulas, with the config's K and r."""
    from test_overview import latex_to_python

    return eval(latex_to_python(config.card.params), {"__builtins__": {}},  # noqa: S307 (our own string)
                {"K": config.num_experts, "r": config.r, "d_in": d_in, "d_out": d_out})


@pytest.mark.parametrize(("d", "d_ff", "r", "k"), [(32, 64, 4, 3), (24, 40, 3, 2)])
def test_card_parameter_formula_matches_a_real_ffn_layer(d, d_ff, r, k):
    """The overview's formula checks build text models only: here the card's per-FFN-linear count against what
    a real Llama FFN's experts train, and the note's router and attention terms against the whole model."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=d, intermediate_size=d_ff, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    config = LLaVAMoLEConfig(r=r, lora_alpha=2 * r, num_experts=k)
    model = get_adapter_model(llama, config)
    layer = model.model.model.layers[0].mlp
    assert isinstance(layer, LLaVAMoLEFFN)
    for name, (d_in, d_out) in {"gate": (d, d_ff), "up": (d, d_ff), "down": (d_ff, d)}.items():
        trained = sum(p.numel() for p in layer.experts[name].parameters() if p.requires_grad)
        assert trained == _card_formula(config, d_in, d_out) == config.num_parameters(d_in, d_out)
    router = sum(p.numel() for p in layer.router.parameters())
    assert router == k * (d + 1)  # the card's note: K (d + 1) per layer
    ffn = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert ffn == 2 * _card_formula(config, d, d_ff) + _card_formula(config, d_ff, d) + router
    attention = 4 * r * (d + d)  # the note: r (d_in + d_out) per attention linear
    assert count_parameters(model)[0] == ffn + attention
