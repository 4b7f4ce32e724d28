"""rsLoRA: γ_r = α/√r, parity with peft's use_rslora (forward, gradients, files), rank-stable first step."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from conftest import assert_peft_parity, peft_pair, tiny_bert
from lorafam_nb import METHODS, AdapterConfig, AdapterModel, LoraConfig, load_peft, save_peft
from lorafam_nb.rslora import RsLoraConfig

X = torch.randint(0, 100, (3, 10))
TARGETS = ["query", "value", "dense"]


def test_scaling_formula_and_layer_equation():
    for r, alpha in [(1, 8.0), (4, 8.0), (16, 2.0), (100, 30.0)]:
        assert RsLoraConfig(r=r, lora_alpha=alpha).scaling() == alpha / math.sqrt(r)
        assert LoraConfig(r=r, lora_alpha=alpha).scaling() == alpha / r
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    layer = RsLoraConfig(r=16, lora_alpha=8).make_layer("q", base)
    assert layer.scaling == 2.0 and torch.count_nonzero(layer.lora_B) == 0  # 8/√16; B = 0 at init
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 20)
    dense = x @ (base.weight + 8 / 4 * layer.lora_B @ layer.lora_A).T + base.bias
    torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        RsLoraConfig(r=0)


def _pair(r: int = 4, alpha: float = 8):
    from peft import LoraConfig as PeftConfig
    return peft_pair(RsLoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS),
                     PeftConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, use_rslora=True))


@pytest.mark.parametrize("r", [4, 9])
def test_parity_with_peft_use_rslora_forward_and_gradients(r):
    ours, theirs = _pair(r=r)
    for name, layer in ours.adapter_layers().items():
        assert layer.scaling == theirs.base_model.model.get_submodule(name).scaling["default"] == 8 / math.sqrt(r)
    assert_peft_parity(ours, theirs, X)


def test_peft_round_trips(tmp_path):
    from peft import PeftModel
    ours, theirs = _pair()
    reference = ours(input_ids=X).logits
    save_peft(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_rslora"] is True
    loaded_by_peft = PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours")
    torch.testing.assert_close(loaded_by_peft(input_ids=X).logits, reference, atol=1e-6, rtol=0)

    theirs.save_pretrained(tmp_path / "theirs")
    loaded_by_us = load_peft(tiny_bert(), tmp_path / "theirs")
    assert type(loaded_by_us.adapter_config) is RsLoraConfig
    torch.testing.assert_close(loaded_by_us(input_ids=X).logits, theirs(input_ids=X).logits, atol=1e-6, rtol=0)


def test_exactly_one_method_reads_each_peft_lora_config():
    """load_peft takes the first match: plain LoRA must never read as rsLoRA, nor rsLoRA as LoRA."""
    plain, rs = LoraConfig().to_peft(["query"]), RsLoraConfig().to_peft(["query"])
    assert [c for c in METHODS.values() if c.peft_type and c.peft_matches(plain)] == [LoraConfig]
    assert [c for c in METHODS.values() if c.peft_type and c.peft_matches(rs)] == [RsLoraConfig]
    assert not RsLoraConfig.peft_matches(rs | {"use_dora": True})  # DoRA on top is another method
    assert RsLoraConfig.from_peft(rs | {"r": 6, "lora_alpha": 3}) == RsLoraConfig(r=6, lora_alpha=3,
                                                                                   target_modules=["query"])


def test_merge_and_own_format_round_trip(tmp_path):
    ours, _ = _pair(r=9, alpha=6)
    before = ours(input_ids=X).logits
    w0 = {n: l.base_layer.weight.clone() for n, l in ours.adapter_layers().items()}
    ours.merge()
    for name, layer in ours.adapter_layers().items():  # the merged delta uses γ_r = α/√r = 2
        torch.testing.assert_close(layer.base_layer.weight - w0[name], 2.0 * layer.lora_B @ layer.lora_A,
                                   atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(input_ids=X).logits, before, atol=1e-5, rtol=0)
    ours.unmerge()
    ours.save_adapter(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["method"] == "rslora"
    again = AdapterModel.from_pretrained(tiny_bert(), tmp_path)
    assert type(again.adapter_config) is RsLoraConfig
    assert again.adapter_config == AdapterConfig.from_dict(ours.adapter_config.to_dict())
    assert torch.equal(again(input_ids=X).logits, before)


def test_first_sgd_step_is_rank_stable():
    """The paper's mechanism: one SGD step on B from B = 0 changes the adapter's output on the same input x
    by η γ_r² ‖Ax‖² ‖g‖, and ‖Ax‖² (a sum of r i.i.d. terms) grows like r. Averaged over draws of A, x
    and g, the change is constant in r for γ_r = α/√r and falls like 1/r for γ_r = α/r."""
    d_in, d_out, eta, draws = 512, 16, 0.1, 64
    change = {}
    for cfg_cls in (LoraConfig, RsLoraConfig):
        for r in (8, 64, 256):
            torch.manual_seed(0)
            base, config, total = nn.Linear(d_in, d_out).requires_grad_(False), cfg_cls(r=r, lora_alpha=8), 0.0
            for _ in range(draws):
                x, g = torch.randn(1, d_in), torch.randn(1, d_out)
                layer = config.make_layer("q", base)
                (layer(x) * g).sum().backward()  # a loss whose gradient with respect to the output is g
                with torch.no_grad():
                    layer.lora_B -= eta * layer.lora_B.grad
                    total += (layer(x) - base(x)).norm().item() / draws
            change[cfg_cls, r] = total
    for r in (64, 256):
        assert 0.8 < change[RsLoraConfig, r] / change[RsLoraConfig, 8] < 1.25
        assert 0.8 < change[LoraConfig, r] / change[LoraConfig, 8] * (r / 8) < 1.25
