"""LoRA: the paper's equation, init, parity with peft (forward and gradients), peft interchange."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import assert_peft_parity, gradient_receivers, peft_pair, tiny_bert
from lorafam_nb import LoraConfig, LoRALinear, get_adapter_model, load_peft, save_peft

X = torch.randint(0, 100, (3, 10))


def test_layer_matches_dense_equation():
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    layer = LoRALinear(base, r=3, lora_alpha=6, lora_dropout=0.0, scaling=2.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 7, 20)
    dense = x @ (base.weight + 2.0 * layer.lora_B @ layer.lora_A).T + base.bias
    torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_B @ layer.lora_A)


@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_fused_path_equals_unfused(x_requires_grad):
    """The fused GEMM (fp32, no branch dropout) must give the unfused branch's outputs and gradients."""
    torch.manual_seed(0)
    base = nn.Linear(24, 40).requires_grad_(False)
    fused = LoRALinear(base, r=4, lora_alpha=8, lora_dropout=0.0, scaling=2.0)
    nn.init.normal_(fused.lora_B)
    assert fused._can_fuse()
    x = torch.randn(3, 5, 24, requires_grad=x_requires_grad)
    g = torch.randn(3, 5, 40)
    fused(x).backward(g)
    grads = [fused.lora_A.grad.clone(), fused.lora_B.grad.clone()] + ([x.grad.clone()] if x_requires_grad else [])
    A, B = fused.lora_A.detach().clone().requires_grad_(), fused.lora_B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_(x_requires_grad)
    ref = base(x2) + 2.0 * (x2 @ A.T) @ B.T
    torch.testing.assert_close(fused(x), ref, atol=1e-5, rtol=1e-5)
    ref.backward(g)
    expected = [A.grad, B.grad] + ([x2.grad] if x_requires_grad else [])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # half precision, active dropout or a trainable base take the unfused path
    assert not LoRALinear(nn.Linear(4, 4).requires_grad_(False).bfloat16(), 2, 2, 0.0, 1.0)._can_fuse()
    assert not LoRALinear(nn.Linear(4, 4).requires_grad_(False), 2, 2, 0.1, 1.0).train()._can_fuse()
    assert not LoRALinear(nn.Linear(4, 4), 2, 2, 0.0, 1.0)._can_fuse()


def test_init_and_scaling():
    torch.manual_seed(0)
    layer = LoraConfig(r=8, lora_alpha=16).make_layer("q", nn.Linear(384, 1536))
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(384)  # kaiming_uniform_(a=√5) on (r, d_in)
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.95 * bound
    assert abs(layer.lora_A.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # U(-b, b) has std b/√3
    with pytest.raises(ValueError, match="positive"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="positive"):
        LoRALinear(nn.Linear(4, 4), r=0, lora_alpha=1, lora_dropout=0, scaling=1)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraConfig(lora_dropout=1.5)


def test_identity_at_init(bert):
    ref = bert(input_ids=X).logits
    model = get_adapter_model(bert, LoraConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"]))
    assert torch.equal(model(input_ids=X).logits, ref)


def test_dropout_only_on_branch():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), r=2, lora_alpha=2, lora_dropout=0.5, scaling=1.0).train()
    x = torch.randn(4, 16)
    # B = 0: the branch contributes nothing, so dropout must not change the output at all
    torch.testing.assert_close(layer(x), layer.base_layer(x))


TARGETS = ["query", "value", "dense"]


def _pair():
    from peft import LoraConfig as PeftConfig
    return peft_pair(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                     PeftConfig(r=4, lora_alpha=8, target_modules=TARGETS))


def test_parity_with_peft_forward_and_gradients():
    ours, theirs = _pair()
    assert len(ours.adapter_layers()) == 2 * 5 + 1  # query, value, three denses per block; the pooler dense
    assert_peft_parity(ours, theirs, X)


def test_gradients_reach_only_a_b_and_head(bert):
    model = get_adapter_model(bert, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    got = gradient_receivers(model, X)
    assert all(n.endswith(("lora_A", "lora_B")) or ".classifier." in n for n in got)


def test_peft_loads_what_we_save_and_we_load_what_peft_saves(tmp_path):
    from peft import PeftModel
    ours, theirs = _pair()
    reference = ours(input_ids=X).logits
    save_peft(ours, tmp_path / "ours")
    loaded_by_peft = PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours")
    torch.testing.assert_close(loaded_by_peft(input_ids=X).logits, reference, atol=1e-6, rtol=0)

    theirs.save_pretrained(tmp_path / "theirs")
    loaded_by_us = load_peft(tiny_bert(), tmp_path / "theirs")
    torch.testing.assert_close(loaded_by_us(input_ids=X).logits, theirs(input_ids=X).logits, atol=1e-6, rtol=0)


def test_peft_interchange_with_head(tmp_path):
    from peft import LoraConfig as PeftConfig, PeftModel, get_peft_model
    theirs = get_peft_model(tiny_bert(), PeftConfig(r=2, lora_alpha=4, target_modules=["query"], task_type="SEQ_CLS"))
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    theirs.eval().save_pretrained(tmp_path)
    ours = load_peft(tiny_bert(), tmp_path)
    torch.testing.assert_close(ours(input_ids=X).logits, theirs(input_ids=X).logits, atol=1e-6, rtol=0)
    save_peft(ours, tmp_path / "back", task_type="SEQ_CLS")
    again = PeftModel.from_pretrained(tiny_bert(), tmp_path / "back").eval()
    torch.testing.assert_close(again(input_ids=X).logits, theirs(input_ids=X).logits, atol=1e-6, rtol=0)


def test_peft_options_we_do_not_read_are_refused(tmp_path):
    from peft import LoraConfig as PeftConfig, get_peft_model
    get_peft_model(tiny_bert(), PeftConfig(r=2, target_modules=["query"], bias="all")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no lorafam_nb method"):
        load_peft(tiny_bert(), tmp_path)
