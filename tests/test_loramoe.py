"""LoRAMoE: the dense equation, init = base, localized balancing loss by hand, gradients, merge, side
inputs through the trainer, and logits parity with moe-peft 2.0.2 (the authors' later package).

moe-peft has no LoRAMoE balancing loss (its ``router_loss_dict`` has no "loramoe" entry), so the
localized balancing test follows the paper's definition (Dou et al., §3.3) computed by hand.
"""
from __future__ import annotations

import copy
import sys
import types
import warnings

import pytest
import torch

from conftest import assert_mixture_gradients, mixture_layer, tiny_bert, toy_task
from lorafam_nb import get_adapter_model
from lorafam_nb.moe.layers import MoELoRALinear
from lorafam_nb.moe.loramoe import LoraMoEConfig, expert_types
from lorafam_nb.trainer import TrainConfig, Trainer

X = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(3))
MASK = torch.ones_like(X)
MASK[1, 6:] = 0
MASK[3, 4:] = 0
HEAD = ["classifier"]
SIX = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _adapted(cfg: LoraMoEConfig, seed: int = 0):
    base = tiny_bert(seed)
    model = get_adapter_model(copy.deepcopy(base), cfg).eval()
    return base, model


def _randomise_b(model, std: float = 0.3, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.experts.lora_B.normal_(0, std)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_layer_equals_dense_equation(tau):
    cfg = LoraMoEConfig(r=3, lora_alpha=6.0, num_experts=4, temperature=tau, lora_dropout=0.0)
    layer = mixture_layer(cfg)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    W0, b0 = layer.base_layer.weight, layer.base_layer.bias
    A, B, Wg = layer.experts.lora_A, layer.experts.lora_B, layer.router.weight.double()
    g = torch.softmax(x @ Wg.T / tau, -1)  # (2, 5, N), every expert weighted: no top-k
    mix = sum(g[..., i:i + 1] * (x @ A[i].T @ B[i].T) for i in range(4))
    ref = x @ W0.T + b0 + (6.0 / 3) * mix
    assert (mix.abs() > 1e-3).any()
    # the router's softmax runs in float32 like the authors' code: 1e-6 absorbs that rounding
    torch.testing.assert_close(layer(x), ref, atol=1e-6, rtol=1e-6)


def test_init_equals_base_model():
    base, model = _adapted(LoraMoEConfig(target_modules=SIX, modules_to_save=HEAD))
    assert all(isinstance(m, MoELoRALinear) for m in model.adapter_layers().values())
    assert len(model.adapter_layers()) == 2 * 6  # every linear of both blocks except the head
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=X, attention_mask=MASK).logits,
                                   base(input_ids=X, attention_mask=MASK).logits, atol=0, rtol=0)


def _routing_inputs(model) -> dict[str, list[torch.Tensor]]:
    """Hook every adapted linear's input (the router's input)."""
    seen: dict[str, list[torch.Tensor]] = {}
    for name, layer in model.adapter_layers().items():
        layer.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].detach()))
    return seen


@torch.no_grad()
def _lbc_by_hand(model, seen, mask, types_, delta, tau=1.0):
    """Σ over adapted linears of Var(I∘Q)/mean(I∘Q)² (unbiased variance), Q summed over real tokens."""
    total = torch.zeros((), dtype=torch.float64)
    for name, layer in model.adapter_layers().items():
        x = seen[name][-1].double()  # (M, T, d_in)
        g = torch.softmax(x @ layer.router.weight.double().T / tau, -1)  # (M, T, N)
        Q = (g * mask[..., None].double()).sum(1).T  # (N, M)
        N, M = Q.shape
        I = torch.empty(N, M, dtype=torch.float64)
        for n in range(N):
            for m in range(M):
                expert_type = 1 if n < N // 2 else 0  # first half: type 1 (downstream)
                I[n, m] = 1 + delta if expert_type == int(types_[m]) else 1 - delta
        Z = (I * Q).reshape(-1)
        total = total + Z.var() / Z.mean() ** 2
    return total


def test_expert_types_first_half_downstream():
    assert expert_types(6).tolist() == [1, 1, 1, 0, 0, 0]


def test_localized_balance_equals_hand_computation():
    cfg = LoraMoEConfig(num_experts=4, blc_alpha=0.1, blc_weight=0.3, target_modules=SIX, modules_to_save=HEAD)
    _, model = _adapted(cfg)
    _randomise_b(model)
    seen = _routing_inputs(model)
    types_ = torch.tensor([0, 1, 1, 0])
    model(input_ids=X, attention_mask=MASK, task_types=types_)
    got = model.aux_losses()["localized_balance"]
    want = 0.3 * _lbc_by_hand(model, seen, MASK, types_, 0.1)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    # padding is left out: counting the padded tokens too gives a different value
    padded = 0.3 * _lbc_by_hand(model, seen, torch.ones_like(MASK), types_, 0.1)
    assert abs(float(padded - want)) > 1e-4


def test_localized_balance_on_crafted_uniform_routing():
    """Zero router weights: G = 1/N per token, so Q_{n,m} = T_m/N and Z_{n,m} = (1±δ) T_m/N exactly."""
    N, delta = 4, 0.2
    cfg = LoraMoEConfig(num_experts=N, blc_alpha=delta, blc_weight=1.0, target_modules=SIX, modules_to_save=HEAD)
    _, model = _adapted(cfg)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.router.weight.zero_()
    types_ = torch.tensor([1, 1, 0, 0])
    model(input_ids=X, attention_mask=MASK, task_types=types_)
    lengths = MASK.sum(1).double()
    Z = torch.tensor([[(1 + delta if (n < N // 2) == bool(types_[m]) else 1 - delta) * lengths[m] / N
                       for m in range(4)] for n in range(N)], dtype=torch.float64).reshape(-1)
    per_linear = Z.var() / Z.mean() ** 2
    got = model.aux_losses()["localized_balance"]
    torch.testing.assert_close(got.double(), len(model.adapter_layers()) * per_linear, atol=1e-6, rtol=1e-6)
    # δ = 0 and equal lengths: perfectly balanced, the constraint is 0
    cfg0 = LoraMoEConfig(num_experts=N, blc_alpha=0.0, blc_weight=1.0, target_modules=SIX, modules_to_save=HEAD)
    _, m0 = _adapted(cfg0)
    with torch.no_grad():
        for layer in m0.adapter_layers().values():
            layer.router.weight.zero_()
    m0(input_ids=X, task_types=types_)
    assert m0.aux_losses()["localized_balance"].item() < 1e-10


def test_balance_needs_task_types_and_weight_zero_gives_no_term():
    _, model = _adapted(LoraMoEConfig(target_modules=SIX, modules_to_save=HEAD, default_task_type=None))
    model(input_ids=X, attention_mask=MASK)
    with pytest.raises(ValueError, match="task_types"):
        model.aux_losses()
    # By default an unlabelled sample is downstream data (type 1): the same loss as labelling every row 1.
    _, typed = _adapted(LoraMoEConfig(target_modules=SIX, modules_to_save=HEAD))
    with torch.no_grad():
        typed.load_state_dict(model.state_dict())
    typed(input_ids=X, attention_mask=MASK)
    unlabelled = typed.aux_losses()["localized_balance"]
    typed(input_ids=X, attention_mask=MASK, task_types=torch.ones(X.shape[0], dtype=torch.long))
    torch.testing.assert_close(unlabelled, typed.aux_losses()["localized_balance"])
    _, free = _adapted(LoraMoEConfig(blc_weight=0.0, target_modules=SIX, modules_to_save=HEAD))
    free(input_ids=X, attention_mask=MASK)
    assert free.aux_losses() == {} and free.aux_loss() is None


def test_task_types_from_task_ids_map():
    """In a multi-task mix the trainer only knows task ids; ``task_type_by_id`` maps them to types."""
    cfg = LoraMoEConfig(num_experts=4, blc_weight=1.0, task_type_by_id=[1, 0], target_modules=SIX, modules_to_save=HEAD)
    _, model = _adapted(cfg)
    _randomise_b(model)
    model(input_ids=X, attention_mask=MASK, task_ids=torch.tensor([1, 0, 0, 1]))
    via_ids = model.aux_losses()["localized_balance"]
    model(input_ids=X, attention_mask=MASK, task_types=torch.tensor([0, 1, 1, 0]))
    torch.testing.assert_close(via_ids, model.aux_losses()["localized_balance"])


def test_gradients_reach_exactly_experts_routers_head():
    cfg = LoraMoEConfig(num_experts=4, target_modules=SIX, modules_to_save=HEAD)
    _, model = _adapted(cfg)
    _randomise_b(model)
    assert_mixture_gradients(model, input_ids=X, attention_mask=MASK, labels=torch.tensor([0, 1, 0, 1]),
                             task_types=torch.tensor([0, 1, 0, 1]))


def test_router_gets_gradient_from_balance_loss_alone():
    _, model = _adapted(LoraMoEConfig(num_experts=4, blc_weight=1.0, target_modules=SIX, modules_to_save=HEAD))
    model(input_ids=X, attention_mask=MASK, task_types=torch.tensor([0, 1, 0, 1]))
    model.aux_loss().backward()
    for layer in model.adapter_layers().values():
        assert layer.router.weight.grad.abs().sum() > 0
        # B = 0: the experts change nothing, so the constraint (a function of the routers) gives them no gradient
        assert layer.experts.lora_A.grad is None or not layer.experts.lora_A.grad.any()


def test_merge_raises_and_changes_nothing():
    _, model = _adapted(LoraMoEConfig(target_modules=SIX, modules_to_save=HEAD))
    _randomise_b(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_config_validation_and_parameter_count():
    with pytest.raises(ValueError, match="even"):
        LoraMoEConfig(num_experts=5)
    with pytest.raises(ValueError, match="blc_alpha"):
        LoraMoEConfig(blc_alpha=1.0)
    cfg = LoraMoEConfig(num_experts=6, r=4, target_modules=["intermediate.dense", "output.dense"],
                        modules_to_save=HEAD)
    _, model = _adapted(cfg)
    real = sum(p.numel() for layer in model.adapter_layers().values() for n, p in layer.named_parameters()
               if p.requires_grad)
    assert cfg.model_parameters(cfg.sites(tiny_bert())) == real
    # the spec's MiniLM count: 6·4·(384+1536)·2 + 6·(384+1536) per layer = 103,680; × 6 layers
    assert 6 * (6 * 4 * (384 + 1536) * 2 + 6 * (384 + 1536)) == 622_080


def test_task_types_flow_through_trainer_and_are_logged():
    task = toy_task(16)
    for i, example in enumerate(task.examples):
        example["task_type"] = i % 2
    cfg = LoraMoEConfig(num_experts=4, blc_weight=0.1, target_modules=SIX, modules_to_save=HEAD)
    model = get_adapter_model(tiny_bert(), cfg)
    result = Trainer(model, task, TrainConfig(max_steps=2, batch_size=8, log_every=1, progress=False,
                                              device="cpu")).train()
    assert all(row["localized_balance"] > 0 for row in result.history)
    assert {"router_entropy", "max_expert_share"} <= set(result.history[0])


# --- parity with moe-peft 2.0.2 (LoraMoe.forward, moe_peft/adapters/loramoe/model.py:42-62) -----------

def require_moe_peft():
    sys.modules.setdefault("evaluate", types.ModuleType("evaluate"))  # only its metric tasks import it
    return pytest.importorskip("moe_peft", reason="moe-peft==2.0.2 is a test extra (make installs it --no-deps)")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def moe_peft_model(hf, adapter: dict, weights: dict, name: str):
    moe_peft = require_moe_peft()
    from moe_peft.adapters import lora_config_factory
    from moe_peft.models import from_pretrained
    hf.config.rope_theta = 10000.0  # transformers 5 keeps it in rope_parameters; moe-peft reads the old field
    hf.config.rope_scaling = None
    with warnings.catch_warnings():  # transformers warns that rope_scaling is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        model = moe_peft.LLMModel(from_pretrained(hf, attn_impl="eager", use_sliding_window=False, device="cpu"))
    cfg = lora_config_factory(adapter)
    cfg.adapter_name = name
    model.init_adapter(cfg, weights)
    for layer in model.model_.layers_:  # moe-peft never puts its LoRA dropouts in eval mode
        for lin in list(layer.self_attn_.state_dict().values()) + list(layer.mlp_.state_dict().values()):
            for lora in lin.loras_.values():
                lora.dropout_.eval()
    return model


def moe_peft_forward(model, name: str, ids: torch.Tensor, labels: bool = False):
    from moe_peft import LLMBatchConfig, LLMModelInput
    inp = LLMModelInput(batch_configs_=[LLMBatchConfig(adapter_name_=name, batch_start_idx_=0,
                                                       batch_end_idx_=len(ids))],
                        batch_tokens_=ids.tolist(), batch_labels_=ids.tolist() if labels else None, batch_masks_=[[1] * ids.shape[1]] * len(ids),
                        output_router_logits_=True, efficient_operator_=False, inference_mode_=True)
    with torch.no_grad():
        return model.forward(inp)[0]


def test_logits_match_moe_peft_loramoe():
    require_moe_peft()
    hf = tiny_llama()
    projs = ["gate_proj", "up_proj", "down_proj"]
    cfg = LoraMoEConfig(r=4, lora_alpha=8.0, num_experts=4, lora_dropout=0.0, target_modules=projs)
    ours = get_adapter_model(copy.deepcopy(hf), cfg).eval()
    _randomise_b(ours, std=0.2)
    weights = {}
    for site, layer in ours.adapter_layers().items():
        key = "loramoe." + site.removeprefix("model.")  # model.layers.0.mlp.gate_proj -> loramoe.layers.0.mlp.gate_proj
        weights[f"{key}.moe_gate.weight"] = layer.router.weight.detach().clone()
        for e in range(cfg.num_experts):
            weights[f"{key}.experts.{e}.lora_A.weight"] = layer.experts.lora_A[e].detach().clone()
            weights[f"{key}.experts.{e}.lora_B.weight"] = layer.experts.lora_B[e].detach().clone()
    theirs = moe_peft_model(hf, {"peft_type": "LORAMOE", "routing_strategy": "loramoe", "r": 4, "lora_alpha": 8,
                                 "lora_dropout": 0.05, "num_experts": 4, "target_modules": projs}, weights, "x")
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mine = ours(input_ids=ids).logits
        base = tiny_llama()(input_ids=ids).logits
    out = moe_peft_forward(theirs, "x", ids)
    assert (mine - base).abs().max() > 1e-2  # the experts do change the output
    torch.testing.assert_close(mine, out.logits, atol=1e-5, rtol=1e-5)
    # their router logits, layer by layer in order gate, down, up: ours on the same tokens
    assert out.router_logits is not None and out.aux_loss is None  # moe-peft has no LoRAMoE balance loss
