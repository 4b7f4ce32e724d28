"""Conditional MixLoRA (Shen et al., 2402.15896): the layer against the equation with each instance's A and B
assembled by hand, init = frozen model, per-instance selection (padding left out), gradients (factor pools only,
unselected factors none; routers only when score-weighted), no auxiliary loss, parameter counts, the routers in
the saved state, SmolLM2 forward/backward, and the errors."""
from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lorafam_nb import get_adapter_model
from lorafam_nb.core import AdapterScope, count_parameters, site_of
from lorafam_nb.moe.cond_mixlora import CondMixLoRALinear, CondMixLoraConfig

D_IN, D_OUT = 12, 10
MODES = [("input", "frozen"), ("input", "scored"), ("input_lora_a_param", "frozen"),
         ("input_lora_a_param", "scored")]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def batch(rows: int = 3, length: int = 7, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 100, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as SmolLM2's tokenizer pads
    return ids, mask


def layer_of(seed: int = 0, **kw) -> CondMixLoRALinear:
    """One float64 layer with non-zero B factors (so the update is visible)."""
    cfg = CondMixLoraConfig(**{"r": 3, "num_factors": 8, "lora_alpha": 6.0, "lora_dropout": 0.0} | kw)
    torch.manual_seed(seed)
    host = nn.Sequential(nn.Linear(D_IN, D_OUT)).double().requires_grad_(False)
    layer = cfg.build_layer(site_of(host, "0"), AdapterScope()).double()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    return layer


def randomise_b(model, seed: int = 1, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


def top(scores: torch.Tensor, r: int) -> list[int]:
    """The r best indices, best first, by an explicit sort (not torch.topk)."""
    return sorted(range(scores.numel()), key=lambda j: -float(scores[j].detach()))[:r]


def reference(layer: CondMixLoRALinear, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The sheet's equation instance by instance: x̄ over the real tokens, TopK for A (IFS) and B (IFS or
    IFS + CFS with U_k = the k-th d_in-block of columns of the (E, r·d_in) matrix, transposed), A(x) and B(x)
    stacked by hand, then y = W_0 x + b_0 + s · (B(x) A(x)) x as one dense d_out × d_in matrix."""
    W0, b0, s, r, d = layer.base_layer.weight, layer.base_layer.bias, layer.scaling, layer.r, x.shape[-1]
    out = []
    for n in range(x.shape[0]):
        real = x[n] if mask is None else x[n][mask[n].bool()]
        x_bar = real.mean(0)
        logits_A = layer.router_A.weight.double() @ x_bar
        S_A = top(logits_A, r)
        score_B = layer.router_B.weight.double() @ x_bar
        if layer.cond_type == "input_lora_a_param":
            score_B = torch.softmax(score_B, 0)
            for k in range(r):
                U_k = layer.cfs_weight.double()[:, k * d:(k + 1) * d].T  # (d_in, E)
                score_B = score_B + layer.ifs_weight * torch.softmax(U_k.T @ layer.lora_A[S_A[k]], 0)
        S_B = top(score_B, r)
        A = torch.stack([layer.lora_A[j] for j in S_A])  # (r, d_in): row k is a_{S_A[k]}
        B = torch.stack([layer.lora_B[:, j] for j in S_B], dim=1)  # (d_out, r): column k is b_{S_B[k]}
        if layer.router_training == "scored":
            w_A = torch.softmax(logits_A, 0)[S_A]
            w_B = torch.softmax(score_B, 0)[S_B]
            A, B = torch.diag(w_A / w_A.sum()) @ A, B @ torch.diag(w_B / w_B.sum())
        out.append(x[n] @ W0.T + b0 + s * x[n] @ (B @ A).T)
    return torch.stack(out)


@pytest.mark.parametrize("cond_type,router_training", MODES)
@pytest.mark.parametrize("masked", [False, True])
def test_layer_equals_dense_equation(cond_type, router_training, masked):
    layer = layer_of(cond_type=cond_type, router_training=router_training)
    x = torch.randn(3, 5, D_IN, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, :2] = 0
    mask[2, 4:] = 0
    layer.context.start_forward({}, mask if masked else None)
    torch.testing.assert_close(layer(x), reference(layer, x, mask if masked else None), atol=1e-10, rtol=1e-10)


def test_instance_delta_is_the_update_applied():
    layer = layer_of(cond_type="input_lora_a_param")
    x = torch.randn(2, 4, D_IN, dtype=torch.float64)
    delta = layer.instance_delta(x)
    assert delta.shape == (2, D_OUT, D_IN)
    assert torch.linalg.matrix_rank(delta[0]) == layer.r  # rank r per instance, from a pool of E
    torch.testing.assert_close(layer(x) - layer.base_layer(x), torch.einsum("ntd,nod->nto", x, delta))


@pytest.mark.parametrize("cond_type", ["input", "input_lora_a_param", "random"])
def test_init_is_exactly_the_frozen_model(cond_type):
    base = tiny_llama()
    ids, mask = batch()
    model = get_adapter_model(copy.deepcopy(base), CondMixLoraConfig(cond_type=cond_type)).eval()
    assert all(float(layer.lora_B.detach().abs().max()) == 0 for layer in model.adapter_layers().values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           base(input_ids=ids, attention_mask=mask).logits)
    randomise_b(model)  # and the adapters do act once B moves
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits,
                                  base(input_ids=ids, attention_mask=mask).logits)


def test_selection_is_per_instance():
    layer = layer_of(cond_type="input_lora_a_param", num_factors=16, r=4)
    x = torch.randn(3, 6, D_IN, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0
    layer.context.start_forward({}, mask)
    y = layer(x)
    routes = {r.layer: r for r in layer.context.routes}
    assert set(routes) == {":A", ":B"}  # a layer outside a model has no site name
    for route in routes.values():  # every real token of a row carries its row's selection
        for n in range(3):
            sel = route.selected[route.rows == n]
            assert sel.shape[0] == int(mask[n].sum()) and (sel == sel[0]).all()
    A0, B0 = (s.selected[0].clone() for s in layer.selection(x))
    # another instance changes: instance 0's selection and output do not
    x2 = x.clone()
    x2[1] = torch.randn(6, D_IN, dtype=torch.float64) * 3
    A0b, B0b = (s.selected[0] for s in layer.selection(x2))
    assert torch.equal(A0, A0b) and torch.equal(B0, B0b)
    y2 = layer(x2)
    assert torch.equal(y2[0], y[0]) and torch.equal(y2[2], y[2]) and not torch.allclose(y2[1], y[1])
    # instance 0's padding changes: with padding masked nothing about its real tokens changes
    x3 = x.clone()
    x3[0, :2] = torch.randn(2, D_IN, dtype=torch.float64) * 10
    torch.testing.assert_close(layer(x3)[0, 2:], y[0, 2:], atol=1e-12, rtol=0)
    unmasked = layer_of(cond_type="input_lora_a_param", num_factors=16, r=4, mask_padding=False)
    unmasked.context.start_forward({}, mask)
    assert not torch.allclose(unmasked(x3)[0, 2:], unmasked(x)[0, 2:])  # the authors' mean sees the padding


def _selected(model, pool: str) -> dict[str, set[int]]:
    return {r.layer.rsplit(":", 1)[0]: set(r.selected.reshape(-1).tolist()) for r in model.context.routes
            if r.layer.endswith(":" + pool)}


@pytest.mark.parametrize("cond_type,router_training", MODES)
def test_gradients_reach_exactly_what_trains(cond_type, router_training):
    ids, mask = batch(rows=2)
    cfg = CondMixLoraConfig(r=2, num_factors=16, lora_dropout=0.0, cond_type=cond_type, router_training=router_training)
    model = get_adapter_model(tiny_llama(), cfg)
    randomise_b(model)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    pools = {f"model.{site}.{t}" for site in model.adapter_layers() for t in ("lora_A", "lora_B")}
    routers = {f"model.{site}.{t}" for site in model.adapter_layers()
               for t in ("router_A.weight", "router_B.weight") + (("cfs_weight",) if "param" in cond_type else ())}
    expected = pools | (routers if router_training == "scored" else set())
    assert got == trainable == expected
    # no unselected factor gets a gradient; every selected one does
    chosen_A, chosen_B = _selected(model, "A"), _selected(model, "B")
    for site, layer in model.adapter_layers().items():
        rows_A = layer.lora_A.grad.abs().sum(1) > 0
        cols_B = layer.lora_B.grad.abs().sum(0) > 0
        assert set(rows_A.nonzero().reshape(-1).tolist()) == chosen_A[site]
        assert set(cols_B.nonzero().reshape(-1).tolist()) == chosen_B[site]
        assert len(chosen_A[site]) < layer.num_factors


def test_no_auxiliary_loss_and_recorder_counts():
    ids, mask = batch()
    model = get_adapter_model(tiny_llama(), CondMixLoraConfig(r=3, num_factors=8))
    model(input_ids=ids, attention_mask=mask)
    assert model.aux_loss() is None and model.aux_losses() == {}
    stats = model.recorder.layers
    assert len(stats) == 2 * len(model.adapter_layers())  # one record per pool per adapted linear
    assert all(float(s.tokens.sum()) == int(mask.sum()) * 3 for s in stats.values())  # real tokens × r


@pytest.mark.parametrize("cond_type,router_training", MODES + [("random", "frozen")])
def test_parameter_counts_match_closed_form(cond_type, router_training):
    base = tiny_llama()
    cfg = CondMixLoraConfig(r=3, num_factors=8, cond_type=cond_type, router_training=router_training)
    sites = cfg.sites(base)
    frozen_total = count_parameters(base)[1]
    model = get_adapter_model(base, cfg)
    trainable, total = count_parameters(model)
    assert trainable == cfg.model_parameters(sites)
    E, r = 8, 3
    pools = sum(E * (s.d_in + s.d_out) for s in sites)
    routers = sum((0 if cond_type == "random" else 2 * E * s.d_in) + (r * s.d_in * E if "param" in cond_type else 0)
                  for s in sites)
    assert trainable == pools + (routers if router_training == "scored" else 0)
    assert total - frozen_total == pools + routers  # the routers are stored either way
    assert sum(v.numel() for v in model.adapter_state_dict().values()) == pools + routers
    assert cfg.num_parameters(32, 64) == E * 96 + (cfg.router_parameters(32) if router_training == "scored" else 0)


def test_routers_are_saved_and_reloaded():
    """Frozen routers never train, but they define the routing: they must travel with the adapter."""
    base = tiny_llama()
    cfg = CondMixLoraConfig(r=2, num_factors=8, cond_type="input_lora_a_param")
    torch.manual_seed(0)
    model = get_adapter_model(copy.deepcopy(base), cfg).eval()
    randomise_b(model)
    state = model.adapter_state_dict()
    assert any(k.endswith("router_A.weight") for k in state) and any(k.endswith("cfs_weight") for k in state)
    torch.manual_seed(1)
    other = get_adapter_model(copy.deepcopy(base), cfg).eval()
    ids, mask = batch()
    with torch.no_grad():
        before = other(input_ids=ids, attention_mask=mask).logits
        other.load_adapter_state_dict(state)
        after = other(input_ids=ids, attention_mask=mask).logits
        ref = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(before, ref)
    torch.testing.assert_close(after, ref, atol=0, rtol=0)


def test_random_selection_draws_r_distinct_factors_per_instance():
    layer = layer_of(cond_type="random", num_factors=16, r=4)
    assert layer.router_A is None and layer.router_parameters() == []
    x = torch.randn(5, 3, D_IN, dtype=torch.float64)
    torch.manual_seed(0)
    first = layer.selection(x)[0].selected
    assert all(len(set(row.tolist())) == 4 for row in first)
    assert not torch.equal(first, layer.selection(x)[0].selected)


def test_smollm2_injection_forward_backward():
    from lorafam_nb.models import ModelNotAvailableError, load_model
    start = time.perf_counter()
    try:
        model = load_model("smollm2-135m", head="causal_lm")
    except ModelNotAvailableError as err:
        pytest.skip(str(err))
    assert model.config.hidden_size == 576  # the real checkpoint, not a tiny stand-in
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    cfg = CondMixLoraConfig(r=4, num_factors=16, cond_type="input_lora_a_param")
    adapted = get_adapter_model(model, cfg)
    layers = adapted.adapter_layers()
    assert len(layers) == 2 * 7 and not any("lm_head" in n for n in layers)  # q,k,v,o,gate,up,down; no LM head
    ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = adapted(input_ids=ids, attention_mask=mask, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0 for layer in layers.values())
    assert all(layer.router_A.weight.grad is None for layer in layers.values())
    assert time.perf_counter() - start < 15


def test_clear_errors():
    with pytest.raises(ValueError, match="num_factors=4"):
        CondMixLoraConfig(r=8, num_factors=4)
    with pytest.raises(ValueError, match="cond_type"):
        CondMixLoraConfig(cond_type="lora_a_choice")
    with pytest.raises(ValueError, match="router_training"):
        CondMixLoraConfig(router_training="straight-through")
    with pytest.raises(ValueError, match="random"):
        CondMixLoraConfig(cond_type="random", router_training="scored")
    with pytest.raises(ValueError, match="ifs_weight"):
        CondMixLoraConfig(ifs_weight=-1.0)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        CondMixLoraConfig(r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        CondMixLoraConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="instances"):
        layer_of()(torch.randn(D_IN, dtype=torch.float64))
    model = get_adapter_model(tiny_llama(), CondMixLoraConfig())
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge()
    sites = CondMixLoraConfig().sites(tiny_llama())
    assert CondMixLoraConfig.budget_candidates(sites)[0] == {"num_factors": 4}
    sized = CondMixLoraConfig.sized(8, "all-linear")
    assert sized.num_factors == 8 and sized.lora_alpha == 16.0  # α = 2E, the authors' scripts


def test_registered_multimodal_with_its_card_formula_on_real_shapes():
    """Registered by name as a multimodal method; the card's E(d_in + d_out), read as the overview reads card
    formulas, equals what a real layer trains at SmolLM2's shapes (the overview checks text methods only)."""
    from test_overview import latex_to_python

    from lorafam_nb.core import AdapterConfig
    from lorafam_nb.registry import METHODS

    assert METHODS["cond_mixlora"] is CondMixLoraConfig and CondMixLoraConfig.modality == "multimodal"
    assert CondMixLoraConfig.card.chapter == "cond_mixlora" and CondMixLoraConfig.card.bibkey == "shen2024multimodal"
    cfg = CondMixLoraConfig(r=4, num_factors=16, cond_type="input_lora_a_param")
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    for d_in, d_out in ((576, 576), (576, 192), (1536, 576)):  # SmolLM2-135M: q/o, k/v, down
        host = nn.Sequential(nn.Linear(d_in, d_out, bias=False)).requires_grad_(False)
        for router_training in ("frozen", "scored"):
            config = CondMixLoraConfig(r=4, num_factors=16, router_training=router_training)
            layer = config.build_layer(site_of(host, "0"), AdapterScope())
            trained = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            card = eval(latex_to_python(config.card.params), {"__builtins__": {}},  # noqa: S307 (our own string)
                        {"E": config.num_factors, "d_in": d_in, "d_out": d_out})
            assert trained == config.num_parameters(d_in, d_out)
            assert trained - card == (config.router_parameters(d_in) if router_training == "scored" else 0)
