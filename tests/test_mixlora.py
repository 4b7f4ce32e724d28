"""MixLoRA (Li et al., 2024): the experts against the paper's equation written out token by token,
sparse vs dense paths, the load-balance loss by hand, merging, gradients, parameter counts, and parity
with the authors' ``mixlora`` 0.2.3 package (logits, on-disk format both ways) and with the
load-balance function of ``moe-peft`` 2.0.2, the authors' training code."""
from __future__ import annotations

import copy
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_bert
from lorafam_nb import get_adapter_model
from lorafam_nb.core import AdapterContext, AdapterModel, count_parameters
from lorafam_nb.models import FeedForward
from lorafam_nb.moe.mixlora import MixLoraConfig, MixLoRAFFN, authors_model, load_mixlora, mixlora_config, save_mixlora

E, K, R, ALPHA = 4, 2, 4, 8
BERT_HEAD = ["pooler", "classifier"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def mix_config(**kw) -> MixLoraConfig:
    return MixLoraConfig(**{"r": R, "lora_alpha": ALPHA, "num_experts": E, "top_k": K, "lora_dropout": 0.05} | kw)


def perturb(model: AdapterModel, seed: int = 1, router_std: float = 0.5) -> AdapterModel:
    """Every B off zero and a router spread enough that every expert gets tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            if isinstance(layer, MixLoRAFFN):
                layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g) * router_std)
                for experts in layer.experts.values():
                    experts.lora_B.copy_(torch.randn(experts.lora_B.shape, generator=g) * 0.1)
            else:
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


def padded_batch(vocab: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as the decoders are used in the book
    mask[2, :5] = 0
    return ids, mask


# --- the paper's equation, written out token by token ---------------------------------------------
def expert_ref(layer: MixLoRAFFN, e: int, h: torch.Tensor) -> torch.Tensor:
    """E_e(h) = W̃2e(SiLU(W̃1e h) ⊙ W̃3e h) (gated FFN) or W̃_down,e GELU(W̃_up,e h) (BERT), with
    W̃_m,e x = W_m x + b_m + s B_m,e A_m,e x, for one token h (d,)."""
    ffn, s = layer.base_layer, layer.experts["up"].scaling

    def adapted(name: str, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        ex = layer.experts[name]
        out = linear.weight @ x + s * ex.lora_B[e] @ (ex.lora_A[e] @ x)
        return out + linear.bias if linear.bias is not None else out

    if ffn.gate is not None:
        inner = F.silu(adapted("gate", ffn.gate, h)) * adapted("up", ffn.up, h)
    else:
        inner = F.gelu(adapted("up", ffn.up, h))
    return adapted("down", ffn.down, inner)


def mixture_ref(layer: MixLoRAFFN, x: torch.Tensor, k: int) -> torch.Tensor:
    """Per token: p = softmax over all E logits W_r h, the k largest p, renormalised, Σ g_e E_e(h)."""
    rows = []
    for h in x.reshape(-1, x.shape[-1]):
        p = torch.softmax(layer.router.weight.to(h.dtype) @ h, dim=0)
        chosen = sorted(range(p.numel()), key=lambda j: -float(p[j].detach()))[:k]
        total = sum(p[j] for j in chosen)
        rows.append(sum((p[j] / total) * expert_ref(layer, j, h) for j in chosen))
    return torch.stack(rows).view(x.shape)


def ffn_layer(gated: bool, k: int = K, dtype=torch.float64, seed: int = 0) -> MixLoRAFFN:
    torch.manual_seed(seed)
    d, d_ff = 12, 20
    if gated:
        ffn = FeedForward(nn.Linear(d, d_ff, bias=False), nn.Linear(d_ff, d, bias=False), nn.SiLU(),
                          nn.Linear(d, d_ff, bias=False))
    else:
        ffn = FeedForward(nn.Linear(d, d_ff), nn.Linear(d_ff, d), nn.GELU())
    ffn.requires_grad_(False)
    layer = MixLoRAFFN(ffn, num_experts=E, top_k=k, r=3, scaling=1.5).to(dtype)
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
        for experts in layer.experts.values():
            experts.lora_B.normal_(0, 0.3)
    return layer


def _trainable(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in layer.parameters() if p.requires_grad]


@pytest.mark.parametrize("gated", [True, False], ids=["swiglu", "gelu"])
def test_sparse_equals_dense_equals_per_token_reference(gated):
    layer = ffn_layer(gated)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    g = torch.randn(2, 7, 12, dtype=torch.float64)
    params = _trainable(layer)
    assert len(params) == 1 + 2 * (3 if gated else 2)  # router + A, B per FFN matrix
    results = {}
    for path in ("sparse", "dense", "reference"):
        layer.path = path if path != "reference" else "sparse"
        out = mixture_ref(layer, x, K) if path == "reference" else layer(x)
        results[path] = (out, torch.autograd.grad(out, params, g))
    for path in ("dense", "reference"):
        torch.testing.assert_close(results[path][0], results["sparse"][0], atol=1e-6, rtol=0)
        for ours, theirs in zip(results["sparse"][1], results[path][1]):
            assert ours.abs().sum() > 0
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    # the mixture is not the frozen FFN (B ≠ 0) and only k of the E experts touch each token
    assert (results["sparse"][0] - layer.base_layer(x)).abs().max() > 1e-2


def test_top_k_equal_to_num_experts_is_the_dense_softmax_mixture():
    layer = ffn_layer(gated=True, k=E)
    x = torch.randn(9, 12, dtype=torch.float64)
    p = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    dense = torch.stack([sum(p[t, e] * expert_ref(layer, e, x[t]) for e in range(E)) for t in range(len(x))])
    for path in ("sparse", "dense"):
        layer.path = path
        torch.testing.assert_close(layer(x), dense, atol=1e-6, rtol=0)


def test_router_order_is_softmax_then_top_k_then_renormalise():
    layer = ffn_layer(gated=True)
    routing = layer.router(torch.randn(5, 12, dtype=torch.float64))
    full = torch.softmax(routing.logits.double(), -1)
    torch.testing.assert_close(routing.probs.double(), full, atol=1e-6, rtol=0)
    top = full.topk(K, -1)
    torch.testing.assert_close(routing.weights.double(), top.values / top.values.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    assert torch.equal(routing.selected, top.indices)


# --- the whole model ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_init_logits_equal_base(arch):
    base = tiny_llama() if arch == "llama" else tiny_bert()
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    model = get_adapter_model(copy.deepcopy(base), mix_config(modules_to_save=BERT_HEAD if arch == "bert" else []))
    model.eval()
    assert sum(isinstance(m, MixLoRAFFN) for m in model.modules()) == 2
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    perturb(model)  # and the check can fail:
    with torch.no_grad():
        assert (model(input_ids=ids, attention_mask=mask).logits - ref).abs().max() > 1e-4


def _load_balance_by_hand(probs: list[list[float]], chosen: list[list[int]], n_experts: int) -> float:
    """E Σ_e F_e P_e with F_e the share of tokens whose chosen set holds e, P_e the mean probability."""
    T = len(probs)
    F_ = [sum(e in c for c in chosen) / T for e in range(n_experts)]
    P_ = [sum(p[e] for p in probs) / T for e in range(n_experts)]
    return n_experts * sum(f * p for f, p in zip(F_, P_))


def test_load_balance_by_hand_concatenated_over_layers_and_without_padding():
    """A crafted routing of 2 layers × (2 rows × 3 positions), the last position of row 1 padding."""
    config = mix_config(num_experts=3, top_k=1)
    logits = {"l0": torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0], [0.0, 3.0, 0.0],
                                  [2.5, 0.0, 1.0], [0.0, 0.0, 0.5], [0.0, 0.0, 9.0]]),
              "l1": torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.5, 0.0, 0.0],
                                  [0.0, 0.0, 4.0], [1.0, 0.0, 0.0], [9.0, 0.0, 0.0]])}
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    context = AdapterContext()
    context.start_forward({}, mask)
    x = torch.zeros(2, 3, 5)
    for name, z in logits.items():
        p = torch.softmax(z, -1)
        context.route(name, z, p, p.topk(1, -1).indices, x)
    got = config.aux_loss_terms(context)["load_balance"]
    real = [0, 1, 2, 3, 4]  # token 5 is padding
    probs = [torch.softmax(logits[n][t], -1).tolist() for n in logits for t in real]
    chosen = [[int(torch.softmax(logits[n][t], -1).argmax())] for n in logits for t in real]
    assert got.item() == pytest.approx(_load_balance_by_hand(probs, chosen, 3), rel=1e-6)
    # not the per-layer sum, nor the per-layer mean, and the padding token (confident, 9.0) would change it
    per_layer = [_load_balance_by_hand(probs[i * 5:(i + 1) * 5], chosen[i * 5:(i + 1) * 5], 3) for i in range(2)]
    assert abs(got.item() - sum(per_layer)) > 0.1 and abs(got.item() - sum(per_layer) / 2) > 1e-3
    with_pad = [torch.softmax(logits[n][t], -1).tolist() for n in logits for t in range(6)]
    chosen_pad = [[int(torch.tensor(p).argmax())] for p in with_pad]
    assert abs(got.item() - _load_balance_by_hand(with_pad, chosen_pad, 3)) > 1e-3
    # a perfectly balanced router gives k (the Mixtral normalisation)
    ctx = AdapterContext()
    ctx.start_forward({}, None)
    uniform = torch.full((4, 4), 0.25)
    ctx.route("l", uniform.log(), uniform, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]), torch.zeros(1, 4, 2))
    assert mix_config().aux_loss_terms(ctx)["load_balance"].item() == pytest.approx(K)


def test_model_load_balance_padding_router_gradient_and_recorder():
    model = perturb(get_adapter_model(tiny_llama(), mix_config(router_aux_loss_coef=0.01))).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    captured = []
    hooks = [layer.router.register_forward_hook(lambda mod, args, out: captured.append(out))
             for layer in model.adapter_layers().values() if isinstance(layer, MixLoRAFFN)]
    ids, mask = padded_batch()
    model.recorder.reset()
    model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    keep = mask.reshape(-1).bool()
    probs = torch.cat([c.probs[keep] for c in captured]).tolist()
    chosen = torch.cat([c.selected[keep] for c in captured]).tolist()
    aux = model.aux_losses()["load_balance"]
    assert aux.item() == pytest.approx(0.01 * _load_balance_by_hand(probs, chosen, E), rel=1e-5)
    everything = _load_balance_by_hand(torch.cat([c.probs for c in captured]).tolist(),
                                       torch.cat([c.selected for c in captured]).tolist(), E)
    assert abs(aux.item() - 0.01 * everything) > 1e-6  # padding changes the value, so it was left out
    # the recorder counts every real token k times per layer
    n_real = int(mask.sum())
    assert len(model.recorder.layers) == 2
    for stats in model.recorder.layers.values():
        assert int(stats.tokens.sum()) == n_real * K and stats.n_tokens == n_real
    # the load-balance term reaches both routers (through P_e), and what feeds layer 1's router, never
    # what acts after the last router (layer 1's experts)
    aux.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {f"model.model.layers.{i}.mlp.router.weight" for i in (0, 1)} <= got
    assert "model.model.layers.0.mlp.experts.down.lora_B" in got
    assert not any(n.startswith("model.model.layers.1.mlp.experts") for n in got)


def test_merge_raises_and_changes_nothing():
    model = perturb(get_adapter_model(tiny_llama(), mix_config())).eval()
    ids, mask = padded_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    for action in (model.merge, model.merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged"):
            action()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not layer.merged for layer in model.adapter_layers().values())
    assert sum(isinstance(m, MixLoRAFFN) for m in model.modules()) == 2
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)


def test_gradients_reach_exactly_what_mixlora_trains():
    model = perturb(get_adapter_model(tiny_bert(), mix_config(modules_to_save=BERT_HEAD))).train()
    ids, mask = padded_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1]))
    (out.loss + model.aux_loss()).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == trainable
    expected = {n for n, _ in model.named_parameters()
                if n.endswith(("router.weight", "lora_A", "lora_B")) or ".pooler." in n or ".classifier." in n}
    assert trainable == expected
    # attention LoRA on q, k, v, attention.output.dense; experts on intermediate + output per layer
    assert sum(n.endswith("lora_A") for n in got) == 2 * (4 + 2)
    assert not any(".experts.gate." in n for n in got)  # BERT's FFN has no gate matrix
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_parameter_formula_equals_injected_count(arch):
    base = tiny_llama() if arch == "llama" else tiny_bert()
    config = mix_config(modules_to_save=BERT_HEAD if arch == "bert" else [])
    sites = config.sites(base)
    model = get_adapter_model(base, config)
    head = sum(p.numel() for n, p in model.named_parameters() if ".pooler." in n or ".classifier." in n)
    assert (head > 0) == (arch == "bert")
    assert config.model_parameters(sites) == count_parameters(model)[0] - head
    d, ff = base.config.hidden_size, base.config.intermediate_size
    if arch == "llama":  # q, o: d × d; k, v: d/2 × d (2 of 4 heads are key/value heads)
        attn, ffn = R * (2 * (d + d) + 2 * (d + d // 2)), E * R * 3 * (d + ff)
    else:
        attn, ffn = 4 * R * (d + d), E * R * 2 * (d + ff)
    assert count_parameters(model)[0] - head == 2 * (ffn + E * d + attn)


def test_minilm_spec_count():
    """The spec's MiniLM arm: E=8, r=4 on intermediate/output.dense + r=4 on the four attention linears."""
    from lorafam_nb.models import load_model
    base = load_model("minilm", head="multiple_choice")
    config = MixLoraConfig(r=4, lora_alpha=8, num_experts=8, top_k=2, modules_to_save=BERT_HEAD)
    per_layer = 8 * 4 * 2 * (384 + 1536) + 8 * 384 + 4 * 4 * (384 + 384)
    assert per_layer == 138_240
    assert config.model_parameters(config.sites(base)) == 6 * per_layer == 829_440
    model = get_adapter_model(base, config)
    head = sum(p.numel() for n, p in model.named_parameters() if ".pooler." in n or ".classifier." in n)
    assert count_parameters(model)[0] - head == 829_440


# --- the authors' code ----------------------------------------------------------------------------
def _theirs(base: nn.Module, directory: Path) -> nn.Module:
    """mixlora 0.2.3's model from an adapter directory: their loader and injection, dropout off."""
    mixlora = pytest.importorskip("mixlora", reason="the authors' package: pip install --no-deps mixlora==0.2.3")
    cfg, weights = mixlora.load_adapter_weights(str(directory), device="cpu")
    model = copy.deepcopy(base)
    mixlora.inject_adapter_in_model(model, cfg, weights)
    model.eval()
    for layer in model.model.layers:  # their experts live in a plain dict: model.eval() misses them
        for moe in layer.mlp.mixlora_moes.values():
            for lora in moe.experts_.values():
                lora.eval()
    return model


def _their_router_logits(model: nn.Module) -> tuple[list[torch.Tensor], list]:
    logits: list[torch.Tensor] = []

    def hook(mlp, args):
        moe = mlp.mixlora_moes["default"]
        x = args[0]
        logits.append(F.linear(x.reshape(-1, x.shape[-1]).to(moe.dtype_), moe.gate_))

    return logits, [layer.mlp.register_forward_pre_hook(hook) for layer in model.model.layers]


def _mixtral_load_balancing_loss_func():
    """moe-peft 2.0.2's load balance (moe_peft/adapters/mixlora/model.py:32-83), imported."""
    pytest.importorskip("mixlora")
    sys.modules.setdefault("evaluate", types.ModuleType("evaluate"))  # only its metric tasks need it
    model = pytest.importorskip("moe_peft.adapters.mixlora.model",
                                reason="the authors' training code: pip install --no-deps moe-peft==2.0.2")
    return model._mixtral_load_balancing_loss_func


def smollm2_two_layers() -> nn.Module:
    from lorafam_nb.models import ModelNotAvailableError, load_model
    try:
        model = load_model("smollm2-135m", head="causal_lm")
    except ModelNotAvailableError as err:
        pytest.skip(str(err))
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    return model.eval()


@pytest.mark.parametrize("arch", ["tiny-llama", "smollm2"])
def test_parity_with_mixlora_package_logits_and_load_balance(arch, tmp_path):
    lb = _mixtral_load_balancing_loss_func()
    base = tiny_llama() if arch == "tiny-llama" else smollm2_two_layers()
    vocab = base.config.vocab_size
    torch.manual_seed(0)
    ours = perturb(get_adapter_model(copy.deepcopy(base), mix_config(router_aux_loss_coef=0.01)), router_std=0.2)
    ours.eval()
    save_mixlora(ours, tmp_path)
    theirs = _theirs(base, tmp_path)
    ids, mask = padded_batch(vocab)
    logits, hooks = _their_router_logits(theirs)
    with torch.no_grad():
        ref = theirs(input_ids=ids, attention_mask=mask).logits
        out = ours(input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    for h in hooks:
        h.remove()
    if arch == "tiny-llama":
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:
        # SmolLM2's residual stream reaches |h| ≈ 35 and its logits ≈ 70, where one float32 ulp is 4e-6–8e-6:
        # an absolute 1e-5 is below what two summation orders can agree on. Bound the error relative to the
        # scale instead (observed ≈ 5e-7 of it), and the log-probabilities the label-token protocol scores.
        assert (out - ref).abs().max() <= 2e-6 * ref.abs().max()
        torch.testing.assert_close(out.log_softmax(-1), ref.log_softmax(-1), atol=1e-4, rtol=0)
    assert (out - plain).abs().max() > 1e-3  # the adapters do something, so the match means something
    # their aux loss (moe-peft's function over the logits of all layers, padding masked) = ours
    theirs_aux = 0.01 * lb(torch.cat(logits), E, K, mask)
    torch.testing.assert_close(ours.aux_losses()["load_balance"], theirs_aux, atol=1e-6, rtol=1e-5)
    # every expert of every layer is in use, so F and P are both exercised
    assert all(bool((s.tokens > 0).all()) for s in ours.recorder.layers.values())


def test_their_directory_loads_into_ours(tmp_path):
    """An adapter written in mixlora's format from their own structures (as their package holds it)."""
    mixlora = pytest.importorskip("mixlora", reason="the authors' package: pip install --no-deps mixlora==0.2.3")
    base = tiny_llama()
    H, I, nkv = 32, 64, base.config.num_key_value_heads * 8
    shapes = {"q_proj": (H, H), "k_proj": (nkv, H), "v_proj": (nkv, H), "o_proj": (H, H),
              "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    g = torch.Generator().manual_seed(3)
    weights = {}
    for l in range(2):
        weights[f"mixlora.layers.{l}.mlp.moe_gate.weight"] = torch.randn(E, H, generator=g) * 0.3
        for proj, (o, i) in shapes.items():
            stem = f"mixlora.layers.{l}.{'mlp' if proj in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{proj}"
            for e in range(E) if "mlp" in stem else [None]:
                key = stem if e is None else f"{stem}.experts.{e}"
                weights[f"{key}.lora_A.weight"] = torch.randn(R, i, generator=g) * 0.2
                weights[f"{key}.lora_B.weight"] = torch.randn(o, R, generator=g) * 0.1
    meta = {"base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM", "peft_type": "MIXLORA",
            "routing_strategy": "mixlora", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.05,
            "target_modules": list(shapes), "num_experts": E, "top_k": K, "act_fn": "silu"}
    cfg = mixlora.MixLoraConfig.from_config(meta)
    cfg.adapter_name_, cfg.dtype_ = "default", torch.float32
    theirs = copy.deepcopy(base)
    mixlora.inject_adapter_in_model(theirs, cfg, weights)
    # the directory, written from their live structures with their key names and their config export
    state = {}
    for l, layer in enumerate(theirs.model.layers):
        moe = layer.mlp.mixlora_moes["default"]
        state[f"mixlora.layers.{l}.mlp.moe_gate.weight"] = moe.gate_.clone()
        for name, lora in moe.experts_.items():  # "experts.{e}.{proj}"
            _, e, proj = name.split(".")
            for ab in ("A", "B"):
                state[f"mixlora.layers.{l}.mlp.{proj}.experts.{e}.lora_{ab}.weight"] = getattr(lora, f"lora_{ab}").weight.clone()
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for ab in ("A", "B"):
                state[f"mixlora.layers.{l}.self_attn.{proj}.lora_{ab}.weight"] = \
                    getattr(getattr(layer.self_attn, proj), f"lora_{ab}").weight.clone()
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in state)
    torch.save(state, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg.export()))
    theirs = _theirs(base, tmp_path)
    ours = load_mixlora(copy.deepcopy(base), tmp_path).eval()
    assert isinstance(ours, AdapterModel) and ours.adapter_config.router_aux_loss_coef == 0.001  # their default
    assert sorted(ours.adapter_config.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits,
                                   theirs(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    # and our save of what we loaded is byte-for-byte their tensors
    save_mixlora(ours, tmp_path / "again")
    again = torch.load(tmp_path / "again" / "adapter_model.bin", weights_only=True)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def _snapshot(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    return [type(m).__name__ for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _bad_directories(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good"
    save_mixlora(perturb(get_adapter_model(tiny_llama(), mix_config())), good)
    out = {}

    def variant(name: str, change) -> None:
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        change(d)
        out[name] = d

    variant("truncated", lambda d: (d / "adapter_model.bin").write_bytes((good / "adapter_model.bin").read_bytes()[:500]))
    variant("not_json", lambda d: (d / "adapter_config.json").write_text("{not json"))
    variant("other_peft_type", lambda d: (d / "adapter_config.json").write_text(
        json.dumps(json.loads((good / "adapter_config.json").read_text()) | {"peft_type": "LORA"})))
    variant("no_rank", lambda d: (d / "adapter_config.json").write_text(
        json.dumps({k: v for k, v in json.loads((good / "adapter_config.json").read_text()).items() if k != "r"})))
    variant("wrong_rank", lambda d: (d / "adapter_config.json").write_text(
        json.dumps(json.loads((good / "adapter_config.json").read_text()) | {"r": R + 1})))
    variant("more_experts", lambda d: (d / "adapter_config.json").write_text(
        json.dumps(json.loads((good / "adapter_config.json").read_text()) | {"num_experts": E + 1})))

    def drop_key(d: Path) -> None:
        state = torch.load(d / "adapter_model.bin", weights_only=True)
        state.pop(next(iter(state)))
        torch.save(state, d / "adapter_model.bin")

    variant("missing_key", drop_key)
    (tmp_path / "missing_weights").mkdir()
    (tmp_path / "missing_weights" / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
    out["missing_weights"] = tmp_path / "missing_weights"
    out["empty"] = tmp_path / "empty"
    out["empty"].mkdir()
    return out


def test_bad_files_raise_value_error_and_leave_the_model_untouched(tmp_path):
    for name, directory in _bad_directories(tmp_path).items():
        model = tiny_llama(seed=5)
        before = _snapshot(model)
        with pytest.raises(ValueError):
            load_mixlora(model, directory)
        after = _snapshot(model)
        assert before[0] == after[0], name
        assert all(torch.equal(before[1][k], after[1][k]) for k in before[1]), name
        assert all(p.requires_grad for p in model.parameters()), name  # not even frozen
    # a decoder of another width, and a BERT model, do not fit
    wider = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=100))
    with pytest.raises(ValueError, match="wrong shapes"):
        load_mixlora(wider, tmp_path / "good")
    with pytest.raises(ValueError):
        load_mixlora(tiny_bert(), tmp_path / "good")
    assert mixlora_config(tmp_path / "good").num_experts == E


def test_save_refuses_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError):
        save_mixlora(get_adapter_model(tiny_bert(), mix_config(modules_to_save=BERT_HEAD)), tmp_path / "bert")
    with pytest.raises(ValueError, match="integer"):  # their loader needs an int alpha; truncating would rescale
        save_mixlora(get_adapter_model(tiny_llama(), mix_config(lora_alpha=7.5)), tmp_path / "alpha")
    assert not (tmp_path / "bert").exists() and not (tmp_path / "alpha").exists()
    save_mixlora(get_adapter_model(tiny_llama(), mix_config()), tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == ALPHA and isinstance(config["lora_alpha"], int)
    assert isinstance(config["jitter_noise"], float) and math.isclose(config["router_aux_loss_coef"], 0.01)


def test_parity_with_mixlora_package_on_smollm2_in_float64():
    """In float64 both implementations are exact enough for an absolute 1e-5 on SmolLM2's logits (|logit| ≈ 70,
    where float32 rounding alone reaches that): the same weights, their package computing in float64 too."""
    pytest.importorskip("mixlora", reason="the authors' package: pip install --no-deps mixlora==0.2.3")
    base = smollm2_two_layers().double()
    torch.manual_seed(0)
    ours = perturb(get_adapter_model(copy.deepcopy(base), mix_config()), router_std=0.2).eval()
    assert all(l.router.weight.dtype == torch.float64 for l in ours.adapter_layers().values() if hasattr(l, "router"))
    theirs = authors_model(ours, base, dtype=torch.float64)
    ids, mask = padded_batch(base.config.vocab_size)
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask).logits
        ref = theirs(input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    assert out.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (out - plain).abs().max() > 1e-3
