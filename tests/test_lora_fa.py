"""LoRA-FA: dense equation, gradients, frozen A, what autograd saves, merge, save/load, budgets, peft."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import assert_peft_parity, peft_pair, peft_tensor, tiny_bert, toy_task
from lorafam_nb import LoraConfig, LoRALinear, get_adapter_model, load_peft, save_peft
from lorafam_nb.bench import SavedTensorMeter
from lorafam_nb.core import AdapterConfig, AdapterModel
from lorafam_nb.lora_fa import LoraFAConfig, LoRAFALinear, matching_rank
from lorafam_nb.trainer import TrainConfig, Trainer

X = torch.randint(0, 100, (3, 10))
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _layer(d_in: int = 24, d_out: int = 40, r: int = 4, dropout: float = 0.0) -> LoRAFALinear:
    torch.manual_seed(0)
    layer = LoRAFALinear(nn.Linear(d_in, d_out).requires_grad_(False), r=r, lora_alpha=2 * r,
                         lora_dropout=dropout, scaling=2.0)
    nn.init.normal_(layer.lora_B)
    return layer


def test_forward_is_dense_equation():
    layer = _layer()
    x = torch.randn(3, 5, 24)
    W0, b0, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    dense = x @ W0.T + b0 + 2.0 * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * B @ A)


@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_gradients_equal_autograd_of_dense_formula_and_a_gets_none(x_requires_grad):
    layer = _layer()
    assert layer._can_fuse() and not layer.lora_A.requires_grad
    x = torch.randn(3, 5, 24, requires_grad=x_requires_grad)
    g = torch.randn(3, 5, 40)
    layer(x).backward(g)
    W0, b0 = layer.base_layer.weight, layer.base_layer.bias
    A = layer.lora_A.detach().clone().requires_grad_()  # let autograd differentiate A too, to be sure
    B = layer.lora_B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_(x_requires_grad)
    (x2 @ W0.T + b0 + 2.0 * (x2 @ A.T) @ B.T).backward(g)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, atol=1e-5, rtol=1e-5)
    if x_requires_grad:
        torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    assert layer.lora_A.grad is None and A.grad.abs().sum() > 0  # LoRA would have moved A; we must not
    assert layer.base_layer.weight.grad is None


def _saved(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every non-parameter tensor autograd saves during ``layer(x)``."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return saved


def _input_sized(t: torch.Tensor, n: int, d_in: int) -> bool:
    return t.shape[-1] == d_in and t.numel() == n * d_in


def test_autograd_saves_z_not_the_input():
    n, d_in, r = 2 * 64, 48, 4
    x = torch.randn(2, 64, d_in, requires_grad=True)
    fa = _layer(d_in=d_in, d_out=96, r=r)
    saved = _saved(fa, x)
    assert not any(_input_sized(t, n, d_in) for t in saved)
    assert [tuple(t.shape) for t in saved] == [(r, n)]  # Zᵀ = A xᵀ and nothing else
    # plain LoRA keeps x itself
    lora = LoRALinear(fa.base_layer, r=r, lora_alpha=2 * r, lora_dropout=0.0, scaling=2.0)
    assert any(_input_sized(t, n, d_in) and t.data_ptr() == x.data_ptr() for t in _saved(lora, x))


def test_unfused_paths_keep_neither_x_nor_dropped_x():
    """Active dropout and bf16 take LoRA's unfused path; with A frozen it keeps neither x nor drop(x).
    Dropout itself keeps its mask, of x's size (float on CPU): the one input-sized tensor left."""
    n, d_in, p = 2 * 16, 32, 0.1
    dropped = _layer(d_in=d_in, d_out=16, dropout=p).train()
    assert not dropped._can_fuse()
    x = torch.randn(2, 16, d_in, requires_grad=True)
    big = [t for t in _saved(dropped, x) if _input_sized(t, n, d_in)]
    assert len(big) == 1 and big[0].data_ptr() != x.data_ptr()
    values = big[0].unique()  # a mask, not data: exactly the two values 0 and 1/(1-p)
    torch.testing.assert_close(values, torch.tensor([0.0, 1 / (1 - p)]))
    half = _layer(d_in=d_in, d_out=16).bfloat16()
    assert not half._can_fuse()
    assert not any(_input_sized(t, n, d_in) for t in _saved(half, x.detach().bfloat16().requires_grad_()))


def _meter_bytes(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    meter = SavedTensorMeter(model)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    return meter.nbytes


def test_model_saves_less_than_lora_by_the_predicted_amount():
    """Saved activations (the benchmark's meter): LoRA − LoRA-FA = 4N·(distinct inputs' d_in) − 4N·r per layer."""
    base = tiny_bert()
    batch = {"input_ids": torch.randint(0, 100, (4, 16)), "labels": torch.tensor([0, 1, 1, 0])}
    r, n = 4, 4 * 16
    saved = {}
    for name, cls in (("lora", LoraConfig), ("fa", LoraFAConfig)):
        torch.manual_seed(0)  # same dropout masks in both runs
        model = get_adapter_model(copy.deepcopy(base), cls(r=r, target_modules=TARGETS)).train()
        saved[name] = _meter_bytes(model, batch)
    h, ff, blocks, layers = 32, 64, 2, 12
    predicted = 4 * n * blocks * (h + h + h + ff) - 4 * n * r * layers  # q/k/v share one input
    assert saved["lora"] - saved["fa"] == predicted


def test_only_b_and_head_train_and_counts(bert):
    model = get_adapter_model(bert, LoraFAConfig(r=4, target_modules=TARGETS, modules_to_save=["classifier"]))
    layers = model.adapter_layers()
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_()
    model(input_ids=X, labels=torch.tensor([0, 1, 0])).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith("lora_B") or ".classifier." in n for n in got)
    assert all(not l.lora_A.requires_grad and l.lora_A.grad is None for l in layers.values())
    shapes = [(l.base_layer.in_features, l.base_layer.out_features) for l in layers.values()]
    config = model.adapter_config
    assert sum(l.lora_B.numel() for l in layers.values()) == sum(config.num_parameters(i, o) for i, o in shapes)
    assert sum(l.lora_B.numel() for l in layers.values()) == sum(4 * o for _, o in shapes)
    assert sum(l.lora_A.numel() for l in layers.values()) == sum(4 * i for i, _ in shapes)


def test_init_identity_and_config_errors(bert):
    ref = bert(input_ids=X).logits
    model = get_adapter_model(bert, LoraFAConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"]))
    assert torch.equal(model(input_ids=X).logits, ref)
    assert all(torch.count_nonzero(l.lora_B) == 0 and torch.count_nonzero(l.lora_A) > 0
               for l in model.adapter_layers().values())
    with pytest.raises(ValueError, match="positive"):
        LoraFAConfig(r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraFAConfig(lora_dropout=1.0)
    again = AdapterConfig.from_dict(LoraFAConfig(r=16, lora_alpha=16).to_dict())
    assert isinstance(again, LoraFAConfig) and again.r == 16


def test_unfreezing_a_falls_back_to_loras_gradient():
    layer = _layer()
    layer.lora_A.requires_grad_(True)
    assert not layer._can_fuse()
    layer(torch.randn(4, 24)).sum().backward()
    assert layer.lora_A.grad is not None


def test_merge_unmerge_exact(bert):
    model = get_adapter_model(bert, LoraFAConfig(r=4, target_modules=TARGETS)).eval()
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.normal_(0, 0.1)
        before = model(input_ids=X).logits
        w0 = {n: l.base_layer.weight.clone() for n, l in model.adapter_layers().items()}
        model.merge()
        merged = model(input_ids=X).logits
        model.unmerge()
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-5)
    for n, l in model.adapter_layers().items():
        torch.testing.assert_close(l.base_layer.weight, w0[n], atol=1e-6, rtol=0)


def test_save_load_restores_frozen_a(tmp_path):
    torch.manual_seed(0)
    model = get_adapter_model(tiny_bert(), LoraFAConfig(r=4, target_modules=TARGETS, modules_to_save=["classifier"]))
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.normal_(0, 0.1)
    model.eval().save_adapter(tmp_path)
    state = model.adapter_state_dict()
    assert sum(k.endswith("lora_A") for k in state) == len(model.adapter_layers())
    torch.manual_seed(123)  # a different A drawn at injection: the file must overwrite it
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert isinstance(loaded.adapter_config, LoraFAConfig)
    for name, layer in loaded.adapter_layers().items():
        assert torch.equal(layer.lora_A, state[f"{name}.lora_A"]) and not layer.lora_A.requires_grad
    assert torch.equal(loaded(input_ids=X).logits, model(input_ids=X).logits)


def test_training_never_moves_a_and_checkpoints_keep_it(tmp_path):
    """Weight decay on, two steps: A is bit-identical, B moved; resuming into a model whose A was
    drawn with another seed restores the trained-against A from the checkpoint."""
    config = LoraFAConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["classifier"])
    torch.manual_seed(0)
    model = get_adapter_model(tiny_bert(), config)
    A0 = {n: l.lora_A.clone() for n, l in model.adapter_layers().items()}
    train = TrainConfig(lr=1e-2, max_steps=2, batch_size=8, weight_decay=0.1, device="cpu", progress=False,
                        checkpoint_dir=str(tmp_path), checkpoint_every=2)
    Trainer(model, toy_task(16), train).train()
    for n, layer in model.adapter_layers().items():
        assert torch.equal(layer.lora_A, A0[n]) and layer.lora_B.abs().sum() > 0
        delta = layer.delta_weight()  # row space of ΔW inside that of A: projecting onto it changes nothing
        torch.testing.assert_close(delta @ torch.linalg.pinv(layer.lora_A) @ layer.lora_A, delta, atol=1e-6, rtol=0)
    torch.manual_seed(1)
    resumed = get_adapter_model(tiny_bert(), config)
    Trainer(resumed, toy_task(16), train).train(resume=True)
    for n, layer in resumed.adapter_layers().items():
        assert torch.equal(layer.lora_A, A0[n])
        assert torch.equal(layer.lora_B, model.adapter_layers()[n].lora_B)


def test_parity_with_peft_lora_with_frozen_a_and_export(tmp_path):
    """peft's LoRA-FA is its LoRA with lora_A frozen (create_lorafa_optimizer): same logits and B gradients."""
    from peft import LoraConfig as PeftConfig, PeftModel
    ours, theirs = peft_pair(LoraFAConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                             PeftConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for name in ours.adapter_layers():
        peft_tensor(theirs, name, "lora_A").requires_grad_(False)
    assert_peft_parity(ours, theirs, X, ("lora_B",))
    assert all(layer.lora_A.grad is None and peft_tensor(theirs, name, "lora_A").grad is None
               for name, layer in ours.adapter_layers().items())
    save_peft(ours, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=X).logits, ours(input_ids=X).logits, atol=1e-6, rtol=0)
    assert isinstance(load_peft(tiny_bert(), tmp_path).adapter_config, LoraConfig)  # a peft file says nothing of A


def test_budget_match_on_minilm():
    """On MiniLM's six linears Σd_in = Σd_out, so LoRA-FA at r = 2·r_L trains exactly LoRA's count."""
    from lorafam_nb.models import MODELS, load_model
    targets = list(MODELS["minilm"].all_linear)
    base = load_model("minilm", head="sequence_classification", num_labels=2)
    lora = get_adapter_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=targets))
    shapes = [(l.base_layer.in_features, l.base_layer.out_features) for l in lora.adapter_layers().values()]
    assert len(shapes) == 36 and matching_rank(8, shapes) == 16
    fa = get_adapter_model(base, LoraFAConfig(r=16, target_modules=targets))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(fa) == count(lora) == 331_776
