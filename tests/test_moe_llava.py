"""MoE-LLaVA (Lin et al., 2024), stage III: the upcycled model against the dense one (tiny Llama and BERT in
float64, and the real SmolLM2-135M), the MoE block against the equations written out token by token, the
capacity queue, the Gumbel-sampled second expert, the Switch balance loss by hand, what stage III trains,
placement on every other layer, routing records (split by modality), first-choice counts, the closed-form count
(and the card's formula) against real layers, registration and bad configs."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from conftest import tiny_bert
from lorafam_nb import get_adapter_model
from lorafam_nb.core import METHODS, AdapterConfig, AdapterModel, count_parameters
from lorafam_nb.models import ModelNotAvailableError, load_model, model_path
from lorafam_nb.moe.losses import switch_load_balance
from lorafam_nb.moe.moe_llava import MoELLaVAConfig, MoELLaVAFFN, first_choice_counts, modality_load, top2_gating

E, D, D_FF = 4, 32, 64


def tiny_llama(layers: int = 5, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=D, intermediate_size=D_FF, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as the book's decoders use it
    mask[2, :5] = 0
    return ids, mask


def upcycled(layers: int = 5, **kw) -> tuple[LlamaForCausalLM, AdapterModel]:
    base = tiny_llama(layers).double()
    return base, get_adapter_model(copy.deepcopy(base), MoELLaVAConfig(**kw))


def spread(model: AdapterModel, seed: int = 1, router_std: float = 1.0, expert_std: float = 0.0) -> AdapterModel:
    """A router spread enough that every expert gets tokens, and (``expert_std``) experts that differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            w = layer.router.weight
            w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * router_std)
            for p in layer.experts.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * expert_std)
    return model


# --- the equations, written out one token at a time ------------------------------------------------
def expert_by_hand(layer: MoELLaVAFFN, e: int, x: torch.Tensor) -> torch.Tensor:
    """FFN_e(x) = W^e_down (SiLU(W^e_gate x) ⊙ W^e_up x) for one token x (d,)."""
    ex = layer.experts
    return ex.down_proj[e] @ (F.silu(ex.gate_proj[e] @ x) * (ex.up_proj[e] @ x))


def block_by_hand(layer: MoELLaVAFFN, x: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """y_t = g_1 FFN_{e_1}(x_t) + g_2 FFN_{e_2}(x_t), g_j = p_{e_j} / (p_{e_1} + p_{e_2}), p = softmax(W_r x_t).
    ``pairs`` (T, 2): the experts to use (a sampled routing); None: the two largest p."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        p = torch.softmax(layer.router.weight @ x[t].to(layer.router.weight.dtype), -1)
        e1, e2 = pairs[t].tolist() if pairs is not None else p.topk(2).indices.tolist()
        assert e1 == int(p.argmax())  # the first expert is always the argmax
        for e in (e1, e2):
            out[t] += p[e] / (p[e1] + p[e2]) * expert_by_hand(layer, e, x[t])
    return out


def layer_inputs(model: AdapterModel) -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {}
    for name, layer in model.adapter_layers().items():
        layer.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0]))
    return seen


# --- placement and upcycling ------------------------------------------------------------------------
def test_sparse_mode_converts_every_other_layer_from_layer_0():
    base, model = upcycled(layers=5)
    assert list(model.adapter_layers()) == [f"model.layers.{i}.mlp" for i in (0, 2, 4)]
    for i, block in enumerate(model.model.model.layers):  # the other layers keep their dense MLP
        assert isinstance(block.mlp, MoELLaVAFFN) == (i % 2 == 0)
    modes = {"dense": [0, 1, 2, 3, 4], "first_half": [0, 1], "second_half": [2, 3, 4]}
    for mode, want in modes.items():
        assert [s.block for s in MoELLaVAConfig(moe_mode=mode).sites(tiny_llama(5))] == want
    assert [s.block for s in MoELLaVAConfig(moe_layers_idx=[3, 1]).sites(tiny_llama(5))] == [1, 3]


def test_smollm2_sparse_layers_and_closed_form_count_from_its_config():
    """SmolLM2-135M's shapes (30 layers, d = 576, d_ff = 1536) on the meta device: 15 MoE layers 0, 2, …, 28,
    and 15 · E (3 d d_ff + d) stage-III parameters."""
    try:
        cfg = AutoConfig.from_pretrained(model_path("smollm2-135m"), local_files_only=True)
    except ModelNotAvailableError:
        pytest.skip("SmolLM2 is not installed")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    config = MoELLaVAConfig()
    sites = config.sites(model)
    assert [s.block for s in sites] == list(range(0, 30, 2))
    d, d_ff = cfg.hidden_size, cfg.intermediate_size
    assert (d, d_ff) == (576, 1536)
    assert config.model_parameters(sites) == 15 * 4 * (3 * 576 * 1536 + 576) == 159_287_040


def test_experts_start_as_exact_copies_and_router_is_deepspeeds_linear():
    base, model = upcycled(layers=3)
    for name, layer in model.adapter_layers().items():
        mlp = base.get_submodule(name)
        for e in range(E):
            assert torch.equal(layer.experts.gate_proj[e], mlp.gate_proj.weight)
            assert torch.equal(layer.experts.up_proj[e], mlp.up_proj.weight)
            assert torch.equal(layer.experts.down_proj[e], mlp.down_proj.weight)
        w = layer.router.weight
        assert w.shape == (E, D) and not [n for n, _ in layer.router.named_parameters() if "bias" in n]
        assert float(w.detach().abs().max()) <= 1 / math.sqrt(D)  # Kaiming-uniform (a = √5): U(-1/√d, 1/√d)
    bf16 = get_adapter_model(tiny_llama(3).to(torch.bfloat16), MoELLaVAConfig())
    for layer in bf16.adapter_layers().values():  # the router stays in float32 in a bf16 model
        assert layer.router.weight.dtype == torch.float32 and layer.experts.up_proj.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_upcycled_model_equals_dense_model_at_init(arch, mode):
    """Identical experts and g_1 + g_2 = 1: the upcycled model computes the dense one, in training (sampled
    second expert) and in eval; nothing is dropped here (drop_tokens=False), so that holds for every token."""
    torch.manual_seed(0)
    base = (tiny_bert() if arch == "bert" else tiny_llama(4)).double()
    model = spread(get_adapter_model(copy.deepcopy(base), MoELLaVAConfig(drop_tokens=False))).eval()
    for layer in model.adapter_layers().values():  # BERT's dropout stays off: only the MoE layers train
        layer.train(mode == "train")
    ids, mask = batch()
    with torch.no_grad():
        got, want = model(input_ids=ids, attention_mask=mask).logits, base(input_ids=ids, attention_mask=mask).logits
    assert len(model.adapter_layers()) == (1 if arch == "bert" else 2)
    real = mask.bool() if arch == "llama" else slice(None)  # positions of left padding are never read
    torch.testing.assert_close(got[real], want[real], atol=1e-12, rtol=0)
    spread(model, expert_std=0.05)  # once the experts differ, so does the model: the check can fail
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits[real], want[real], atol=1e-6)


def test_smollm2_upcycled_equals_dense():
    """The real SmolLM2-135M (15 of 30 layers upcycled to E = 4): equal logits in eval at the paper's settings
    (cf = 2 drops nothing: cap = ⌈2·2·T/4⌉ = T) and in training with the sampled second expert (dropping off)."""
    try:
        base = load_model("smollm2-135m", head="causal_lm")
    except ModelNotAvailableError:
        pytest.skip("SmolLM2 is not installed")
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 7042, 30]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = get_adapter_model(base, MoELLaVAConfig()).eval()  # the paper's settings
    assert len(model.adapter_layers()) == 15
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
        assert model.recorder.summary()["dropped_fraction"] == 0
        model.train()
        for layer in model.adapter_layers().values():
            layer.drop_tokens = False  # a token that lost both copies would differ; cf = 1.5 could drop one
        torch.manual_seed(0)
        trained = model(input_ids=ids).logits
    for got in (evaluated, trained):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-5)
    assert evaluated[0, -1].argmax() == want[0, -1].argmax()


# --- the MoE block against the equations ------------------------------------------------------------
def test_expert_gradients_equal_those_of_the_mixture_written_out():
    """The layer reads each expert's weights through one ``unbind`` per stack: the gradients of the stacked
    experts and of the router equal those of the per-token mixture written with plain indexing."""
    _, model = upcycled(layers=1, drop_tokens=False)
    layer = next(iter(spread(model, expert_std=0.3).eval().adapter_layers().values()))
    x = torch.randn(11, D, dtype=torch.float64)
    w = torch.randn(11, D, dtype=torch.float64)
    params = [layer.experts.gate_proj, layer.experts.up_proj, layer.experts.down_proj, layer.router.weight]
    got = torch.autograd.grad((layer(x) * w).sum(), params)
    want = torch.autograd.grad((block_by_hand(layer, x) * w).sum(), params)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, atol=1e-12, rtol=0)
    assert all(float(g.abs().sum()) > 0 for g in got)


def test_block_equals_top2_mixture_written_out_per_token():
    """Eval (no sampling): e_1, e_2 = top-2 of p, gates renormalised over the pair; experts that differ."""
    _, model = upcycled(layers=1, drop_tokens=False)
    layer = next(iter(spread(model, expert_std=0.3).eval().adapter_layers().values()))
    x = torch.randn(2, 7, D, dtype=torch.float64)
    got = layer(x)
    torch.testing.assert_close(got, block_by_hand(layer, x.reshape(-1, D)).view(2, 7, D), atol=1e-12, rtol=0)
    assert not torch.allclose(got, layer.base_layer(x), atol=1e-3)  # the experts do differ


def test_block_in_training_mixes_the_sampled_pair():
    """Training: e_2 is sampled, so take the pair the layer reported, and check the mixture of that pair."""
    _, model = upcycled(layers=1, drop_tokens=False)
    spread(model, expert_std=0.3).train()
    layer = next(iter(model.adapter_layers().values()))
    x = torch.randn(40, D, dtype=torch.float64)
    model.context.start_forward({}, None)
    torch.manual_seed(3)
    got = layer(x)
    pairs = model.context.routes[0].selected
    torch.testing.assert_close(got, block_by_hand(layer, x, pairs), atol=1e-12, rtol=0)
    p = torch.softmax(x @ layer.router.weight.T, -1)
    assert not torch.equal(pairs[:, 1], p.topk(2).indices[:, 1])  # sampled: not always the runner-up


def test_second_expert_is_gumbel_sampled_from_the_other_logits():
    """Gumbel-max: P(e_2 = e) = p_e / (1 − p_{e_1}) for e ≠ e_1; without noise, the runner-up of p."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = torch.softmax(logits[0], -1)
    torch.manual_seed(0)
    n = 40_000
    noise = -torch.empty(n, 4).exponential_().log()
    gating = top2_gating(logits.expand(n, 4), 2, None, noise=noise)
    assert (gating.chosen[:, 0] == 0).all()
    freq = torch.bincount(gating.chosen[:, 1], minlength=4).double() / n
    want = (p / (1 - p[0])).double()
    want[0] = 0
    torch.testing.assert_close(freq, want, atol=0.01, rtol=0)
    assert top2_gating(logits, 2, None).chosen.tolist() == [[0, 1]]


def test_sampling_in_training_only_unless_asked():
    _, model = upcycled(layers=1, drop_tokens=False)
    layer = next(iter(spread(model).adapter_layers().values()))
    x = torch.randn(64, D, dtype=torch.float64)

    def second(train: bool) -> torch.Tensor:
        layer.train(train)
        return layer.gate(x).chosen[:, 1]

    assert torch.equal(second(False), second(False))
    assert not torch.equal(second(True), second(True))
    layer.sample_in_eval = True
    assert not torch.equal(second(False), second(False))


def test_capacity_queues_first_choices_before_second_choices():
    """E = 4, T = 4, cf = 1: cap = ⌈2·1·4/4⌉ = 2. Tokens 0–2 pick (0, 1), token 3 picks (1, 0). Expert 0 keeps
    the first choices of tokens 0, 1; expert 1 keeps token 3's first choice, then token 0's second. Survivors are
    renormalised; token 2 loses both. (Token-order queuing would drop token 3's first choice instead.)"""
    logits = torch.tensor([[3.0, 2.0, -9, -9]] * 3 + [[2.0, 3.0, -9, -9]], dtype=torch.float64)
    g = top2_gating(logits, 2, capacity_factor=1.0)
    assert g.capacity == 2
    assert g.chosen.tolist() == [[0, 1], [0, 1], [0, 1], [1, 0]]
    assert g.kept.tolist() == [[True, True], [True, False], [False, False], [True, False]]
    assert g.selected.tolist() == [[0, 1], [0, -1], [-1, -1], [1, -1]]
    p = torch.softmax(logits[0], -1)
    torch.testing.assert_close(g.weights, torch.tensor([[p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1])],
                                                        [1, 0], [0, 0], [1, 0]], dtype=torch.float64))
    assert top2_gating(logits, 2, capacity_factor=1.0, min_capacity=4).kept.all()
    valid = torch.tensor([False, True, True, True])  # padding takes no slot: cap = ⌈2·3/4⌉ = 2, token 2 keeps e_1
    assert top2_gating(logits, 2, 1.0, valid=valid).kept.tolist() == [[True, True], [True, True],
                                                                       [True, False], [True, False]]


def test_dropped_tokens_get_only_the_residual():
    """In the layer: a token that keeps one copy still gets F(x) (its gate renormalised to 1); a token that
    loses both gets 0, and the recorder counts the dropped assignments."""
    _, model = upcycled(layers=1, eval_capacity_factor=0.5)  # cap = ⌈2·0.5·8/4⌉ = 2
    layer = next(iter(model.eval().adapter_layers().values()))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[1, 0] = 2.0, 1.0  # every token: e_1 = 0, e_2 = 1
    x = torch.randn(8, D, dtype=torch.float64)
    x[:, 0] = x[:, 0].abs() + 1
    model.context.start_forward({}, None)
    y = layer(x)
    torch.testing.assert_close(y[:2], layer.base_layer(x[:2]), atol=1e-12, rtol=0)
    assert torch.equal(y[2:], torch.zeros_like(y[2:]))
    stats = model.recorder.layers["model.layers.0.mlp"]
    assert stats.dropped == 12 and stats.tokens.tolist() == [2, 2, 0, 0]


def test_topk_1_is_switch_gating_with_the_raw_probability():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    g = top2_gating(logits, 1, None)
    assert g.chosen.tolist() == [[0]]
    torch.testing.assert_close(g.weights, torch.softmax(logits, -1)[:, :1])


# --- the balance loss -------------------------------------------------------------------------------
def test_aux_loss_is_alpha_times_sum_over_layers_of_E_sum_f_P_by_hand():
    _, model = upcycled(layers=5)
    spread(model).train()
    inputs = layer_inputs(model)
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask)
    keep = mask.reshape(-1).bool()
    want, per_layer = 0.0, []
    for name, layer in model.adapter_layers().items():
        x = inputs[name][0].reshape(-1, D)[keep]  # padding left out
        p = torch.softmax(x.to(layer.router.weight.dtype) @ layer.router.weight.T, -1)
        T = p.shape[0]
        first = p.argmax(-1)  # only the first choice counts, before capacity
        f = torch.tensor([(first == e).sum().item() / T for e in range(E)], dtype=p.dtype)
        term = E * (f * p.mean(0)).sum()
        per_layer.append(term)
        torch.testing.assert_close(switch_load_balance(p, first[:, None]), term)
        want += term
    assert len(per_layer) == 3 and T == int(mask.sum())
    got = model.aux_losses()["load_balance"]
    torch.testing.assert_close(got, 0.01 * want, atol=1e-7, rtol=1e-6)  # summed, not averaged
    torch.testing.assert_close(model.aux_loss(), got)


def test_aux_loss_switch_off_and_the_step_0_router_gradient():
    """Identical experts: the LM loss alone gives the router no gradient (y does not depend on the gates);
    α = 0 removes the balance term, and with it every router gradient at step 0."""
    ids, mask = batch()
    for coef in (0.0, 0.01):
        _, model = upcycled(layers=3, router_aux_loss_coef=coef)
        spread(model).train()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        aux = model.aux_loss()
        assert (aux is None) == (coef == 0) and (model.aux_losses() == {}) == (coef == 0)
        (out.loss if aux is None else out.loss + aux).backward()
        router = max(float(layer.router.weight.grad.abs().max()) for layer in model.adapter_layers().values())
        assert (router < 1e-12) if coef == 0 else (router > 1e-6)


# --- what stage III trains --------------------------------------------------------------------------
@pytest.mark.parametrize("train_modules", [["experts", "router"], ["router"]])
def test_stage3_gradients_reach_exactly_experts_and_routers(train_modules):
    _, model = upcycled(layers=4, train_modules=train_modules)
    spread(model).train()
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    (out.loss + model.aux_loss()).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    parts = ["router.weight"] + (["experts.gate_proj", "experts.up_proj", "experts.down_proj"]
                                 if "experts" in train_modules else [])
    want = {f"model.model.layers.{i}.mlp.{part}" for i in (0, 2) for part in parts}
    assert got == trainable == want


def test_parameter_count_is_the_closed_form():
    for arch, per_expert in (("llama", 3 * D * D_FF), ("bert", 2 * D * D_FF + D_FF + D)):
        base = tiny_bert() if arch == "bert" else tiny_llama(4)
        config = MoELLaVAConfig()
        sites = config.sites(base)
        model = get_adapter_model(base, config)
        want = len(sites) * E * (per_expert + D)  # E copies of the FFN and the E × d router per MoE layer
        assert count_parameters(model)[0] == config.model_parameters(sites) == want
    assert MoELLaVAConfig(train_modules=["router"]).block_parameters(2048, 5632) == 4 * 2048
    # The spec sheet's StableLM-1.6B figure: P_FFN = 3 · 2048 · 5632 ≈ 34.6 M.
    assert round(MoELLaVAConfig(num_experts=1, top_k=1, train_modules=["experts"]).block_parameters(2048, 5632) / 1e5) == 346


# --- routing records --------------------------------------------------------------------------------
def test_routing_is_recorded_per_moe_layer_and_split_by_modality():
    _, model = upcycled(layers=5, drop_tokens=False)
    spread(model).train()
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask)
    rec = model.recorder.layers
    assert list(rec) == ["model.layers.0.mlp", "model.layers.2.mlp", "model.layers.4.mlp"]
    real = int(mask.sum())
    assert all(s.n_tokens == real and s.tokens.sum() == 2 * real and s.dropped == 0 for s in rec.values())
    model.recorder.reset()
    image = torch.zeros_like(ids)
    image[:, -4:] = 1  # the last four positions of every row are image tokens
    model(input_ids=ids, attention_mask=mask, image_mask=image)
    rec = model.recorder.layers
    assert sorted(rec) == sorted(f"model.layers.{i}.mlp[{m}]" for i in (0, 2, 4) for m in ("text", "image"))
    n_image = int((image * mask).sum())
    for i in (0, 2, 4):
        assert rec[f"model.layers.{i}.mlp[image]"].n_tokens == n_image
        assert rec[f"model.layers.{i}.mlp[text]"].tokens.sum() == 2 * (real - n_image)
    load = modality_load(model.recorder)
    assert sorted(load) == ["model.layers.0.mlp", "model.layers.2.mlp", "model.layers.4.mlp"]
    assert all(float(v.sum()) == pytest.approx(1) for shares in load.values() for v in shares.values())
    with pytest.raises(ValueError, match="image_mask has 6 entries"):
        model(input_ids=ids, attention_mask=mask, image_mask=image[:, :2])


def test_first_choice_counts_are_the_argmax_of_p_per_layer_and_modality():
    """After a forward: each layer's count of e_1 = argmax p over its real tokens, split by the image_mask (the
    f_e of the balance loss, times T); without a mask, one count per layer."""
    _, model = upcycled(layers=3, drop_tokens=False)
    spread(model).train()
    inputs = layer_inputs(model)
    ids, mask = batch()
    image = torch.zeros_like(ids)
    image[:, -4:] = 1
    model(input_ids=ids, attention_mask=mask, image_mask=image)
    counts = first_choice_counts(model)
    keep = mask.reshape(-1).bool()
    flags = image.reshape(-1).bool()[keep]
    assert sorted(counts) == sorted(f"model.layers.{i}.mlp[{m}]" for i in (0, 2) for m in ("text", "image"))
    for name, layer in model.adapter_layers().items():
        x = inputs[name][0].reshape(-1, D)[keep]
        first = torch.softmax(x @ layer.router.weight.T, -1).argmax(-1)
        for modality, part in (("text", ~flags), ("image", flags)):
            assert counts[f"{name}[{modality}]"].tolist() == torch.bincount(first[part], minlength=E).tolist()
        f = (counts[f"{name}[text]"] + counts[f"{name}[image]"]).double() / keep.sum()
        p = torch.softmax(x @ layer.router.weight.T, -1)
        torch.testing.assert_close(E * (f * p.mean(0)).sum(), switch_load_balance(p, first[:, None]))
    model(input_ids=ids, attention_mask=mask)
    plain = first_choice_counts(model)
    assert sorted(plain) == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert all(int(c.sum()) == int(mask.sum()) for c in plain.values())


def test_card_formula_equals_the_trainable_count_of_real_layers():
    """The card's E(3 d d_ff + d), read as the book's overview reads card formulas, against the parameters an
    upcycled block really trains: a tiny Llama's, and SmolLM2-135M's shapes on the meta device."""
    from test_overview import latex_to_python

    card = MoELLaVAConfig.card

    def formula(config: MoELLaVAConfig, d: int, d_ff: int) -> int:
        return eval(latex_to_python(card.params), {"__builtins__": {}},  # noqa: S307 (our own string)
                    {"E": config.num_experts, "d": d, "d_ff": d_ff})

    models = [(tiny_llama(3), D, D_FF)]
    try:
        cfg = AutoConfig.from_pretrained(model_path("smollm2-135m"), local_files_only=True)
        with torch.device("meta"):
            models.append((LlamaForCausalLM(cfg), cfg.hidden_size, cfg.intermediate_size))
    except ModelNotAvailableError:
        pass
    for base, d, d_ff in models:
        for experts in (1, 4):  # E = 1, top-1: the dense FFN trained as one copy (the chapter's dense arm)
            config = MoELLaVAConfig(num_experts=experts, top_k=min(experts, 2), moe_layers_idx=[0, 2])
            layers = get_adapter_model(copy.deepcopy(base), config).adapter_layers()
            assert len(layers) == 2
            for layer in layers.values():
                trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
                assert trainable == formula(config, d, d_ff) == config.block_parameters(d, d_ff)


def test_registered_as_a_multimodal_method_and_rebuilt_from_json():
    assert METHODS["moe_llava"] is MoELLaVAConfig and MoELLaVAConfig.modality == "multimodal"
    config = MoELLaVAConfig(num_experts=3, moe_layers_idx=[0, 4], router_aux_loss_coef=0.0, train_modules=["router"])
    assert AdapterConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_adapter_state_round_trip():
    """The experts and routers are the adapter: a fresh upcycled model with them loaded computes the same."""
    _, model = upcycled(layers=2)
    spread(model, expert_std=0.2).eval()
    state = model.adapter_state_dict()
    assert sorted(k.split(".mlp.")[1] for k in state) == ["experts.down_proj", "experts.gate_proj",
                                                          "experts.up_proj", "router.weight"]
    _, fresh = upcycled(layers=2)
    fresh.eval().load_adapter_state_dict(state)
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


# --- bad configurations -----------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"top_k": 3}, "top_k must be 1 or 2"),
    ({"num_experts": 1}, "exceeds num_experts"),
    ({"num_experts": 0}, "num_experts must be a positive integer"),
    ({"moe_mode": "odd"}, "moe_mode must be one of"),
    ({"moe_layers_idx": []}, "non-empty list"),
    ({"moe_layers_idx": [-1]}, "non-empty list"),
    ({"moe_layers_idx": [0, 0]}, "repeated"),
    ({"capacity_factor": 0}, "capacity_factor must be positive"),
    ({"min_capacity": -1}, "min_capacity"),
    ({"router_aux_loss_coef": -0.1}, "non-negative"),
    ({"train_modules": ["attention"]}, "train_modules"),
    ({"train_modules": []}, "train_modules"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        MoELLaVAConfig(**kw)


def test_layers_outside_the_model_raise_before_anything_changes():
    base = tiny_llama(2)
    with pytest.raises(ValueError, match=r"moe_layers_idx \[5\] lie outside the model's 2 layers"):
        get_adapter_model(base, MoELLaVAConfig(moe_layers_idx=[0, 5]))
    assert all(isinstance(b.mlp, nn.Module) and not isinstance(b.mlp, MoELLaVAFFN) for b in base.model.layers)
    assert all(p.requires_grad for p in base.parameters())
