"""DoRA: the decomposition against a dense computation, init, the detached norm, parity with peft's
``LoraConfig(use_dora=True)`` (forward and gradients), merge/unmerge, peft interchange, save/load."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from conftest import assert_peft_parity, copy_into_peft, gradient_receivers, peft_pair, tiny_bert
from lorafam_nb import AdapterModel, LoraConfig, get_adapter_model, load_peft, save_peft
from lorafam_nb.dora import DoraConfig, DoRALinear, magnitude_direction_change

X = torch.randint(0, 100, (3, 10))


def _layer(d_in: int = 20, d_out: int = 12, r: int = 3, scaling: float = 2.0, dropout: float = 0.0,
           bias: bool = True) -> DoRALinear:
    """A DoRA layer moved away from init: B random, m off the row norms."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(d_in, d_out, bias=bias).requires_grad_(False), r, r * scaling, dropout, scaling)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
        layer.magnitude.mul_(torch.rand(d_out) + 0.5)
    return layer


def _dense(layer: DoRALinear, detach: bool):
    """Trainable copies (A, B, m) and the explicit W' = m · (W0 + sBA) / ‖W0 + sBA‖_c, norm per output row."""
    A, B, m = (p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.magnitude))
    V = layer.base_layer.weight + layer.scaling * B @ A
    C = torch.sqrt((V ** 2).sum(dim=1, keepdim=True))  # one norm per output unit, over d_in
    return (A, B, m), m[:, None] * V / (C.detach() if detach else C)


def test_layer_matches_dense_equation():
    layer = _layer()
    (_, _, _), W = _dense(layer, detach=True)
    x = torch.randn(5, 7, 20)
    torch.testing.assert_close(layer(x), x @ W.T + layer.base_layer.bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.dora_weight(), W.detach())
    torch.testing.assert_close(layer.delta_weight(), (W - layer.base_layer.weight).detach())
    # the norm is per output unit: each row of W' has norm |m_j|
    torch.testing.assert_close(layer.dora_weight().norm(dim=1), layer.magnitude.detach().abs())


def test_init_magnitude_is_row_norm_and_identity():
    torch.manual_seed(0)
    base = nn.Linear(384, 1536)
    layer = DoraConfig(r=8, lora_alpha=16).make_layer("q", base)
    assert layer.magnitude.shape == (1536,)  # d_out entries, not d_in
    torch.testing.assert_close(layer.magnitude.detach(), base.weight.detach().norm(dim=1))
    assert torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(4, 384)
    assert torch.equal(layer(x), base(x))


def test_identity_at_init(bert):
    ref = bert(input_ids=X).logits
    model = get_adapter_model(bert, DoraConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"]))
    assert torch.equal(model(input_ids=X).logits, ref)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("keep_output", [True, False])
@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_gradients_use_the_detached_norm(x_requires_grad, keep_output, bias):
    """The fused backward equals autograd through W' with C detached, and differs from the undetached one;
    whether it reads W'x back from the kept output or computes it again."""
    layer = _layer(bias=bias)
    layer.keep_output = keep_output
    x = torch.randn(4, 5, 20, requires_grad=x_requires_grad)
    g = torch.randn(4, 5, 12)
    layer(x).backward(g)
    ours = [layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad]
    for detach in (True, False):
        params, W = _dense(layer, detach)
        x2 = x.detach().clone().requires_grad_(x_requires_grad)
        (x2 @ W.T + (layer.base_layer.bias if bias else 0)).backward(g)
        if detach:
            for got, want in zip(ours, [p.grad for p in params]):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            if x_requires_grad:
                torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
        else:
            # m's gradient does not involve C's derivative; A's and B's do
            torch.testing.assert_close(ours[2], params[2].grad, atol=1e-5, rtol=1e-5)
            assert (ours[0] - params[0].grad).abs().max() > 1e-3
            assert (ours[1] - params[1].grad).abs().max() > 1e-3


def test_recomputing_outputs_saves_one_output_per_layer(bert):
    from lorafam_nb.bench import SavedTensorMeter
    from lorafam_nb.dora import recompute_outputs

    # The attention's output projection: its output goes to a residual sum, which LayerNorm saves instead.
    model = get_adapter_model(bert, DoraConfig(r=4, target_modules=["query", "attention.output.dense"],
                                               modules_to_save=["classifier"]))

    def saved_bytes() -> int:
        meter = SavedTensorMeter(model)
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            model(input_ids=X).logits.sum().backward()
        meter.close()
        return meter.nbytes

    kept = saved_bytes()
    assert recompute_outputs(model, ["attention.output.dense"]) == [
        f"model.bert.encoder.layer.{i}.attention.output.dense" for i in (0, 1)]
    # One (3, 10, 32) float32 output of each of the two layers is no longer kept.
    assert kept - saved_bytes() == 2 * 3 * 10 * 32 * 4


def test_zero_magnitude_rows_and_unfused_path_agree_with_fused():
    """m_j = 0 (a row the fused backward cannot read back from h) and the unfused path give the same gradients."""
    layer = _layer()
    with torch.no_grad():
        layer.magnitude[[2, 5]] = 0
    x, g = torch.randn(6, 20), torch.randn(6, 12)
    assert layer._can_fuse()
    layer(x).backward(g)
    fused = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.magnitude)]
    assert fused[2][2] != 0
    layer.zero_grad()
    layer.base_layer.weight.requires_grad_(True)  # a trainable base takes the unfused path
    assert not layer._can_fuse()
    layer(x).backward(g)
    for got, p in zip(fused, (layer.lora_A, layer.lora_B, layer.magnitude)):
        torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-5)


def test_dropout_only_on_branch_and_official_form():
    layer = _layer(dropout=0.5).train()
    x = torch.randn(8, 20)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    x_tilde = layer.lora_dropout(x)
    W0, b = layer.base_layer.weight, layer.base_layer.bias
    u = layer.magnitude / layer.weight_norm()
    lora = layer.scaling * x_tilde @ (layer.lora_B @ layer.lora_A).T
    expected = x @ W0.T + b + (u - 1) * (x_tilde @ W0.T) + u * lora
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # in eval mode dropout is off and the output is the paper's equation
    (_, _, _), W = _dense(layer, detach=True)
    torch.testing.assert_close(layer.eval()(x), x @ W.T + b, atol=1e-5, rtol=1e-5)


def _pair(dropout: float = 0.0):
    """Ours and peft's DoRA with the same A, B ≠ 0 and m moved off the row norms."""
    from peft import LoraConfig as PeftConfig
    targets = ["query", "value", "dense"]
    ours, theirs = peft_pair(DoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets),
                             PeftConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, use_dora=True))
    with torch.no_grad():
        for layer in ours.adapter_layers().values():
            layer.magnitude.mul_(torch.rand_like(layer.magnitude) + 0.5)
    copy_into_peft(ours, theirs, ("magnitude",))
    return ours, theirs


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_parity_with_peft_forward_and_gradients(dropout):
    ours, theirs = _pair(dropout=dropout)
    ours.train(), theirs.train()
    assert len(ours.adapter_layers()) == 2 * 5 + 1
    assert_peft_parity(ours, theirs, X, ("lora_A", "lora_B", "magnitude"), dropout_seed=5)


def test_gradients_reach_only_m_a_b_and_head(bert):
    model = get_adapter_model(bert, DoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    got = gradient_receivers(model, X)
    assert all(n.endswith(("lora_A", "lora_B", "magnitude")) or ".classifier." in n for n in got)
    assert sum(n.endswith("magnitude") for n in got) == 4


def test_parameter_count():
    assert DoraConfig(r=8).num_parameters(384, 1536) == 8 * (384 + 1536) + 1536
    config = DoraConfig(r=2, target_modules=["query", "intermediate.dense"])
    layers = get_adapter_model(tiny_bert(), config).adapter_layers().values()
    trainable = sum(p.numel() for l in layers for p in l.parameters() if p.requires_grad)
    assert trainable == sum(config.num_parameters(l.base_layer.in_features, l.base_layer.out_features) for l in layers)


def test_merge_unmerge():
    ours, _ = _pair()
    ours.eval()
    w0 = {n: l.base_layer.weight.clone() for n, l in ours.adapter_layers().items()}
    before = ours(input_ids=X).logits
    ours.merge()
    for n, layer in ours.adapter_layers().items():
        assert layer.merged
        with pytest.raises(RuntimeError, match="unmerge"):
            layer.delta_weight()
    torch.testing.assert_close(ours(input_ids=X).logits, before, atol=1e-5, rtol=0)
    ours.merge()  # idempotent
    ours.unmerge()
    for n, layer in ours.adapter_layers().items():
        torch.testing.assert_close(layer.base_layer.weight, w0[n], atol=1e-6, rtol=0)
        assert layer.merged_norm is None
    torch.testing.assert_close(ours(input_ids=X).logits, before, atol=1e-6, rtol=0)
    plain = ours.merge_and_unload()
    assert not any(isinstance(m, DoRALinear) for m in plain.modules())
    torch.testing.assert_close(plain(input_ids=X).logits, before, atol=1e-5, rtol=0)


def test_save_load_round_trip(tmp_path):
    ours, _ = _pair()
    ours.eval()
    ours.save_adapter(tmp_path)
    assert any(k.endswith(".magnitude") for k in ours.adapter_state_dict())
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert loaded.adapter_config == ours.adapter_config
    assert torch.equal(loaded(input_ids=X).logits, ours(input_ids=X).logits)
    # a LoRA adapter file lacks the magnitudes: refused, not half loaded
    lora = get_adapter_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value", "dense"]))
    lora.save_adapter(tmp_path / "lora")
    dora = get_adapter_model(tiny_bert(), DoraConfig(r=4, target_modules=["query", "value", "dense"]))
    with pytest.raises(ValueError, match="lora"):
        dora.load_adapter(tmp_path / "lora")


def test_peft_loads_what_we_save_and_we_load_what_peft_saves(tmp_path):
    from peft import PeftModel
    ours, theirs = _pair()
    ours.eval(), theirs.eval()
    reference = ours(input_ids=X).logits
    save_peft(ours, tmp_path / "ours")
    loaded_by_peft = PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours").eval()
    assert loaded_by_peft.peft_config["default"].use_dora
    torch.testing.assert_close(loaded_by_peft(input_ids=X).logits, reference, atol=1e-6, rtol=0)

    theirs.save_pretrained(tmp_path / "theirs")
    loaded_by_us = load_peft(tiny_bert(), tmp_path / "theirs")
    assert isinstance(loaded_by_us.adapter_config, DoraConfig)
    torch.testing.assert_close(loaded_by_us(input_ids=X).logits, theirs(input_ids=X).logits, atol=1e-6, rtol=0)


def test_peft_matching_separates_lora_and_dora():
    ours = DoraConfig(r=4, lora_alpha=8, target_modules=["query"]).to_peft(["q"])
    assert ours["use_dora"] is True
    assert DoraConfig.peft_matches(ours) and not LoraConfig.peft_matches(ours)
    plain = LoraConfig(r=4).to_peft(["q"])
    assert LoraConfig.peft_matches(plain) and not DoraConfig.peft_matches(plain)
    assert not DoraConfig.peft_matches(ours | {"use_rslora": True})  # rsLoRA scaling is another method
    assert isinstance(DoraConfig.from_peft(ours), DoraConfig)


def test_bad_config_values():
    with pytest.raises(ValueError, match="positive"):
        DoraConfig(r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        DoraConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="can only adapt"):
        get_adapter_model(tiny_bert(), DoraConfig(target_modules=["embeddings"]))


def test_magnitude_direction_change():
    W0 = torch.randn(6, 10)
    scaled = W0 * torch.tensor([2.0, 1, 1, 1, 1, 1])[:, None]  # row 0 twice as long, same direction
    dm, dd = magnitude_direction_change(scaled, W0)
    assert dm == pytest.approx(W0[0].norm().item() / 6, rel=1e-5) and dd == pytest.approx(0, abs=1e-6)
    rotated = W0.clone()
    rotated[1] = -W0[1]  # same length, opposite direction: 1 − cos = 2
    dm, dd = magnitude_direction_change(rotated, W0)
    assert dm == pytest.approx(0, abs=1e-6) and dd == pytest.approx(2 / 6, rel=1e-5)
