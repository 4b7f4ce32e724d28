"""Octavius (Chen et al., ICLR 2024): every adapted linear against the equation with the instance gate
computed by hand from the frozen word embeddings of each sample's instruction, one route per sample that its
batch-mates and its padding cannot change, the frozen model at init, which parameters train, the optional
balance term by hand, parameter counts, the gate held for generation, and SmolLM2-135M."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_bert
from lorafam_nb import get_adapter_model
from lorafam_nb.core import count_parameters
from lorafam_nb.moe.octavius import OctaviusConfig, OctaviusEmbedding, OctaviusLinear, gate_of, hold_gate

E, K, R, ALPHA = 4, 2, 4, 8
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def oct_config(**kw) -> OctaviusConfig:
    return OctaviusConfig(**{"r": R, "lora_alpha": ALPHA, "num_experts": E, "top_k": K, "lora_dropout": 0.0} | kw)


def perturb(model, seed: int = 3, gate_std: float = 30.0):
    """B off zero, and a gate spread enough (the tiny model's embeddings have std 0.02) to route apart."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gate_of(model).router.weight.copy_(torch.randn(gate_of(model).router.weight.shape, generator=g) * gate_std)
        for layer in model.adapter_layers().values():
            if isinstance(layer, OctaviusLinear):
                layer.experts.lora_B.copy_(torch.randn(layer.experts.lora_B.shape, generator=g) * 0.1)
    return model


def batch(seed: int = 0):
    """3 rows of 10 tokens, left-padded; the instruction is the first 4 real tokens of each row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    instruction = torch.zeros_like(ids)
    for i in range(3):
        start = int((mask[i] == 0).sum())
        instruction[i, start:start + 4] = 1
    return ids, mask, instruction


def gate_by_hand(model, ids, keep) -> torch.Tensor:
    """(rows, E) g: softmax of W_g · (mean of the kept tokens' word embeddings), top-k renormalised, 0 elsewhere."""
    table = model.model.model.embed_tokens.base_layer.weight.double()
    W = gate_of(model).router.weight.double()
    out = []
    for row, k in zip(ids, keep.bool()):
        s = torch.softmax(W @ table[row[k]].mean(0), 0)
        top = s.topk(K).indices
        g = torch.zeros(E, dtype=torch.float64)
        g[top] = s[top] / s[top].sum()
        out.append(g)
    return torch.stack(out)


def linear_io(model):
    seen = {}
    for name, layer in model.adapter_layers().items():
        if isinstance(layer, OctaviusLinear):
            layer.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out)))
    return seen


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_every_linear_equals_the_equation_with_the_gate_by_hand(path):
    model = perturb(get_adapter_model(tiny_llama(), oct_config(path=path))).eval()
    ids, mask, instruction = batch()
    seen = linear_io(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, instruction_mask=instruction)
    g = gate_by_hand(model, ids, instruction)
    assert (g > 0).sum(1).tolist() == [K] * 3 and len({tuple(r.nonzero().flatten().tolist()) for r in g}) > 1
    assert len(seen) == 2 * 4
    for name, (x, y) in seen.items():
        layer = model.adapter_layers()[name]
        A, B, s = layer.experts.lora_A.double(), layer.experts.lora_B.double(), layer.experts.scaling
        x = x.double()
        # y_{n,t} = W_0 x_{n,t} + Σ_e g_{n,e} s B_e A_e x_{n,t}: the sample's g for every one of its tokens
        per = torch.einsum("ntd,erd->nter", x, A)  # (n, t, E, r)
        delta = torch.einsum("nter,eor->nteo", per, B)  # each expert's update of each token
        ref = x @ layer.base_layer.weight.double().t() + s * (delta * g[:, None, :, None]).sum(2)
        torch.testing.assert_close(y.double(), ref, atol=1e-6, rtol=0)


def test_route_is_per_sample_and_independent_of_batch_mates_and_padding():
    model = perturb(get_adapter_model(tiny_llama(), oct_config())).eval()
    ids, mask, instruction = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, instruction_mask=instruction).logits
        first = gate_of(model).routing.weights.clone(), gate_of(model).routing.selected.clone()
        # row 0 fixed; rows 1 and 2 replaced by other tokens, another padding, another instruction span
        ids2, mask2, instr2 = ids.clone(), mask.clone(), instruction.clone()
        ids2[1:] = torch.randint(3, 100, ids2[1:].shape, generator=torch.Generator().manual_seed(5))
        mask2[1:] = 1
        mask2[2, :7] = 0
        instr2[1:] = 0
        instr2[1, :6] = 1
        instr2[2, 7:] = 1
        out2 = model(input_ids=ids2, attention_mask=mask2, instruction_mask=instr2).logits
        second = gate_of(model).routing
    torch.testing.assert_close(second.weights[0], first[0][0], atol=0, rtol=0)
    assert torch.equal(second.selected[0], first[1][0])
    torch.testing.assert_close(out2[0], out[0], atol=1e-5, rtol=0)
    assert not torch.allclose(second.weights[1:], first[0][1:])  # the others did change
    # the same sample with more left padding (as a longer batch-mate would force) keeps its route
    padded = torch.cat([torch.full((3, 4), 7), ids], 1)
    with torch.no_grad():
        model(input_ids=padded, attention_mask=torch.cat([torch.zeros(3, 4, dtype=torch.long), mask], 1),
              instruction_mask=torch.cat([torch.ones(3, 4, dtype=torch.long), instruction], 1))
    torch.testing.assert_close(gate_of(model).routing.weights, first[0], atol=1e-6, rtol=0)


def test_gate_reads_only_the_instruction_tokens():
    model = perturb(get_adapter_model(tiny_llama(), oct_config())).eval()
    ids, mask, instruction = batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, instruction_mask=instruction)
        before = gate_of(model).routing.probs.clone()
        outside = ids.clone()
        outside[instruction == 0] = 3  # every token outside the instructions changed
        model(input_ids=outside, attention_mask=mask, instruction_mask=instruction)
        torch.testing.assert_close(gate_of(model).routing.probs, before, atol=0, rtol=0)
        model(input_ids=ids, attention_mask=mask)  # no instruction_mask: every real token
        whole = gate_of(model).routing.probs
    torch.testing.assert_close(whole.double(), torch.softmax(
        (gate_of(model).router.weight.double() @ torch.stack([model.model.model.embed_tokens.base_layer.weight.double()[
            r[m.bool()]].mean(0) for r, m in zip(ids, mask)]).t()).t(), -1), atol=1e-6, rtol=0)
    assert (whole - before).abs().max() > 1e-4


def test_init_is_the_frozen_model():
    base = tiny_llama()
    ids, mask, instruction = batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    model = get_adapter_model(copy.deepcopy(base), oct_config())
    assert sorted({n.rpartition(".")[2] for n, m in model.adapter_layers().items() if isinstance(m, OctaviusLinear)}) \
        == sorted(ATTENTION)
    assert isinstance(model.model.model.embed_tokens, OctaviusEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, instruction_mask=instruction).logits,
                                   ref, atol=1e-6, rtol=0)
        perturb(model)
        assert (model(input_ids=ids, attention_mask=mask, instruction_mask=instruction).logits - ref).abs().max() > 1e-4


def test_bert_word_embeddings_feed_the_gate():
    base = tiny_bert()
    ids, mask, instruction = batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    model = get_adapter_model(copy.deepcopy(base), oct_config(target_modules=["query", "value"],
                                                              modules_to_save=["classifier"]))
    assert isinstance(model.model.bert.embeddings.word_embeddings, OctaviusEmbedding)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, instruction_mask=instruction).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    table = base.bert.embeddings.word_embeddings.weight
    pooled = torch.stack([table[r[m.bool()]].mean(0) for r, m in zip(ids, instruction)])
    torch.testing.assert_close(gate_of(model).routing.logits, pooled @ gate_of(model).router.weight.t(),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [2, 1])
def test_gradients_reach_exactly_the_experts_and_the_gate(k):
    model = perturb(get_adapter_model(tiny_llama(), oct_config(top_k=k))).train()
    ids, mask, instruction = batch()
    model(input_ids=ids, attention_mask=mask, instruction_mask=instruction, labels=ids).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    gate = {n for n in trainable if "gate.router.weight" in n}
    experts = {n for n in trainable if n.endswith(("experts.lora_A", "experts.lora_B"))}
    assert len(gate) == 1 and len(experts) == 2 * 4 * 2 and trainable == gate | experts
    # top-2: the LM loss reaches W_g through the renormalised g; top-1: g = p/p = 1, whose gradient is 0 up
    # to rounding
    assert got - gate == experts
    gate_grad = gate_of(model).router.weight.grad.abs().max()
    assert (gate_grad > 1e-6) if k == 2 else (gate_grad < 1e-10)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_no_balance_loss_by_default_and_the_optional_switch_term_by_hand():
    ids, mask, instruction = batch()
    model = perturb(get_adapter_model(tiny_llama(), oct_config()))
    model(input_ids=ids, attention_mask=mask, instruction_mask=instruction)
    assert model.aux_losses() == {} and model.aux_loss() is None
    model = perturb(get_adapter_model(tiny_llama(), oct_config(router_aux_loss_coef=0.01)))
    model(input_ids=ids, attention_mask=mask, instruction_mask=instruction)
    routing = gate_of(model).routing
    probs, chosen = routing.probs.tolist(), routing.selected.tolist()
    f = [sum(e in c for c in chosen) / 3 for e in range(E)]  # one decision per sample, not per token
    P = [sum(p[e] for p in probs) / 3 for e in range(E)]
    assert model.aux_losses()["load_balance"].item() == pytest.approx(0.01 * E * sum(a * b for a, b in zip(f, P)))
    stats = model.recorder.layers["model.embed_tokens"]
    assert stats.n_tokens == 3 and int(stats.tokens.sum()) == 3 * K and len(model.recorder.layers) == 1


def test_parameter_count_is_the_closed_form_and_init_of_a():
    base = tiny_llama()
    config = oct_config()
    sites = config.sites(base)
    model = get_adapter_model(base, config)
    d, kv = 32, 16
    assert count_parameters(model)[0] == config.model_parameters(sites) == \
        2 * E * R * (2 * (d + d) + 2 * (d + kv)) + E * d
    # the spec's Vicuna-13B example: E = 4, r = 32, 40 layers × 4 linears of 5120 × 5120
    assert 40 * 4 * OctaviusConfig().num_parameters(5120, 5120) == 209_715_200
    A = model.model.model.layers[0].self_attn.q_proj.experts.lora_A.detach()
    bound = 1 / math.sqrt(d * R)  # Kaiming-uniform over the stacked (E, d_in, r) tensor
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    lora = get_adapter_model(tiny_llama(), oct_config(init_a="lora")).model.model.layers[0].self_attn.q_proj
    assert lora.experts.lora_A.abs().max() > 1.5 * bound


def test_state_dict_saves_the_gate_once():
    model = get_adapter_model(tiny_llama(), oct_config())
    keys = list(model.adapter_state_dict())
    assert [k for k in keys if "router" in k] == ["adapter_scope.octavius_gate.router.weight"]
    assert len(keys) == 1 + 2 * 4 * 2


def test_hold_gate_keeps_the_prompts_route_for_decoding_steps():
    model = perturb(get_adapter_model(tiny_llama(), oct_config())).eval()
    ids, mask, instruction = batch()
    with torch.no_grad(), hold_gate(model) as gate:
        model(input_ids=ids, attention_mask=mask, instruction_mask=instruction)
        prompt = gate.routing.weights.clone()
        model(input_ids=torch.tensor([[5], [6], [7]]))  # a decoding step sees only the new tokens
        torch.testing.assert_close(gate.routing.weights, prompt, atol=0, rtol=0)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5], [6], [7]]))
    assert not torch.allclose(gate_of(model).routing.weights, prompt)


def test_bad_inputs_raise():
    model = get_adapter_model(tiny_llama(), oct_config())
    ids, mask, instruction = batch()
    with pytest.raises(ValueError, match="instruction_mask has shape"):
        model(input_ids=ids, attention_mask=mask, instruction_mask=instruction[:, :5])
    empty = instruction.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have no"):
        model(input_ids=ids, attention_mask=mask, instruction_mask=empty)
    pad_only = instruction.clone()
    pad_only[2] = 1 - mask[2]  # marks only padding
    with pytest.raises(ValueError, match=r"rows \[2\] have no"):
        model(input_ids=ids, attention_mask=mask, instruction_mask=pad_only)
    embeds = model.model.model.embed_tokens.base_layer(ids)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=embeds, attention_mask=mask)
    with pytest.raises(ValueError, match="gate_of|no Octavius gate"):
        gate_of(get_adapter_model(tiny_bert(), __import__("lorafam_nb").LoraConfig(target_modules=["query"])))


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r must be"), ({"num_experts": 0}, "num_experts"), ({"top_k": 5}, "exceeds"),
    ({"lora_dropout": 1.0}, "lora_dropout"), ({"gate_init_std": 0.0}, "gate_init_std"),
    ({"init_a": "zeros"}, "init_a"), ({"router_aux_loss_coef": -1.0}, "non-negative"), ({"path": "x"}, "path"),
])
def test_invalid_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        oct_config(**kwargs)


def test_smollm2_inject_forward_backward():
    from lorafam_nb.models import ModelNotAvailableError, load_model
    try:
        base = load_model("smollm2-135m", head="causal_lm")
    except ModelNotAvailableError as err:
        pytest.skip(str(err))
    ids = torch.tensor([[1, 504, 3458, 314, 4649, 28], [2, 2, 1, 1116, 8323, 30]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    instruction = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]])
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    config = OctaviusConfig(lora_dropout=0.0)
    sites = config.sites(base)
    model = get_adapter_model(base, config)
    out = model(input_ids=ids, attention_mask=mask, instruction_mask=instruction, labels=ids)
    torch.testing.assert_close(out.logits.detach()[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=0)
    assert sum(isinstance(m, OctaviusLinear) for m in model.modules()) == 30 * 4
    assert model.model.lm_head.weight is model.model.model.embed_tokens.base_layer.weight  # still tied
    d = 576
    assert count_parameters(model)[0] == config.model_parameters(sites) == \
        30 * 4 * 32 * (2 * (d + d) + 2 * (d + 192)) + 4 * d
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            if isinstance(layer, OctaviusLinear):
                layer.experts.lora_B.normal_(0, 0.01)
    out = model(input_ids=ids, attention_mask=mask, instruction_mask=instruction, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and gate_of(model).router.weight.grad.abs().sum() > 0
    assert gate_of(model).routing.selected.shape == (2, 2)


def test_registered_as_a_multimodal_method():
    from lorafam_nb.registry import METHODS

    assert METHODS["octavius"] is OctaviusConfig
    assert OctaviusConfig.modality == "multimodal" and "card" in OctaviusConfig.__dict__
    assert OctaviusConfig.card.bibkey == "chen2024octavius" and OctaviusConfig.card.chapter == "octavius"


def _card_formula(config: OctaviusConfig, d_in: int, d_out: int) -> int:
    """The card's ``params`` (E r (d_in + d_out), in LaTeX) read as the overview reads card formulas, with the config's E and r."""
    from test_overview import latex_to_python

    return eval(latex_to_python(config.card.params), {"__builtins__": {}},  # noqa: S307 (our own string)
                {"E": config.num_experts, "r": config.r, "d_in": d_in, "d_out": d_out})


@pytest.mark.parametrize(("d", "kv_heads", "r", "e"), [(32, 2, 4, 4), (24, 1, 3, 3)])
def test_card_parameter_formula_matches_a_real_layer(d, kv_heads, r, e):
    """The overview's formula checks build text models only: here the card's count per adapted linear against
    what a real Llama attention linear's experts train, and the note's gate term E d against the whole model."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=kv_heads))
    config = OctaviusConfig(r=r, lora_alpha=2 * r, num_experts=e, top_k=2)
    model = get_adapter_model(llama, config)
    attention = model.model.model.layers[0].self_attn
    kv = d // 4 * kv_heads
    total = 0
    for name, (d_in, d_out) in {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d)}.items():
        layer = getattr(attention, name)
        assert isinstance(layer, OctaviusLinear)
        trained = sum(p.numel() for p in layer.experts.parameters() if p.requires_grad)  # the gate is shared
        assert trained == _card_formula(config, d_in, d_out) == config.num_parameters(d_in, d_out)
        total += trained
    gate = sum(p.numel() for p in gate_of(model).parameters())
    assert gate == e * d  # the card's note: E d for the model's one gate
    assert count_parameters(model)[0] == total + gate
