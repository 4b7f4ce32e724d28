"""QLoRA: the NF4 table, block-wise and double quantisation, 4-bit packing, the forward/backward through the
dequantised base, storage per parameter, gradients, save/load, merging, config errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import assert_peft_parity, gradient_receivers, peft_pair, tiny_bert, toy_task
from lorafam_nb import AdapterModel, LoraConfig, get_adapter_model, load_peft, save_peft
from lorafam_nb.core import AdapterConfig
from lorafam_nb.qlora import (
    CODEBOOKS, NF4_DELTA, NF4_OFFSET, Linear4bit, QLoraConfig, QLoRALinear, blockwise_dequantize, blockwise_quantize,
    dynamic_code, normal_float_code, pack_4bit, unpack_4bit,
)
from lorafam_nb.trainer import TrainConfig, Trainer

X = torch.randint(0, 100, (3, 10))

# bitsandbytes' NF4 table (functional.get_4bit_type("nf4"), also hard-coded in its CUDA dequantisation kernel).
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def _half_max_gap(code: torch.Tensor) -> float:
    return (code[1:] - code[:-1]).max().item() / 2


def _heavy_tailed(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w.view(-1)[torch.randint(0, w.numel(), (20,), generator=g)] *= 8  # outliers, as real weights have
    return w


def test_nf4_code_is_the_published_table():
    code = normal_float_code()
    assert torch.equal(code, torch.tensor(PUBLISHED_NF4))
    assert code.numel() == 16 and code.unique().numel() == 16
    assert (code < 0).sum() == 7 and (code > 0).sum() == 8 and (code == 0).sum() == 1  # asymmetric, exact zero
    assert code.min() == -1 and code.max() == 1
    assert abs(NF4_OFFSET - (1 - NF4_DELTA)) < 1e-7  # bitsandbytes' offset is 1 - ½(1/32 + 1/30)
    # A symmetric 16-level construction would not be NF4: the largest negative level is not -|largest positive|.
    assert not torch.allclose(code[1:8], -code[8:15].flip(0))


def test_comparison_codebooks_and_dynamic_type():
    fp4, int4 = CODEBOOKS["fp4"](), CODEBOOKS["int4"]()
    torch.testing.assert_close(fp4[8:] * 12, torch.tensor([0.0625, 2, 3, 4, 6, 8, 12]))
    assert fp4.numel() == 15 and torch.equal(fp4, -fp4.flip(0))
    assert torch.equal(int4 * 7, torch.arange(-7, 8, dtype=torch.float32))
    dyn = dynamic_code()
    assert dyn.numel() == 256 and dyn.unique().numel() == 256 and torch.all(dyn[1:] > dyn[:-1])
    assert dyn.max() == 1 and (dyn == 0).sum() == 1
    torch.testing.assert_close(dyn[dyn > 0].min(), torch.tensor(0.55e-6))  # finest decade: 10^-6 · 0.55
    torch.testing.assert_close(dyn.min(), torch.tensor(-(1 + (1 - 0.9 / 64)) / 2))  # coarsest: 64 steps


def test_indices_are_nearest_codes_and_error_bounded_per_block():
    w = _heavy_tailed((48, 100))  # 4800 values: 75 blocks of 64, no padding issue; odd rows exercise flattening
    code = normal_float_code()
    index, c2 = blockwise_quantize(w, code, 64)
    assert index.dtype == torch.uint8 and index.numel() == w.numel() and c2.numel() == 75
    blocks = w.reshape(-1, 64)
    torch.testing.assert_close(c2, blocks.abs().amax(1))
    distance = (blocks / c2[:, None]).reshape(-1, 1).sub(code).abs()  # to every code value
    chosen = distance.gather(1, index.long()[:, None]).squeeze(1)
    assert torch.all(chosen <= distance.min(1).values + 1e-6)  # the nearest code (ties only up to rounding)
    err = (blockwise_dequantize(index, c2, code, 64) - w.reshape(-1)).abs().view(-1, 64)
    assert torch.all(err <= _half_max_gap(code) * c2[:, None] * (1 + 1e-6))
    # A short last block is padded, not mixed with anything.
    index, c2 = blockwise_quantize(w[:, :-1], code, 64)
    assert c2.numel() == math.ceil(48 * 99 / 64)
    assert blockwise_dequantize(index, c2, code, 64).numel() == 48 * 99


def test_double_quantisation_reconstructs_absmax_within_8bit_error():
    w = _heavy_tailed((96, 384), seed=1)  # 576 blocks -> 3 second-level blocks (the last one short)
    layer = Linear4bit(w, None, double_quant=True, dq_blocksize=256)
    plain = Linear4bit(w, None, double_quant=False)
    c2 = plain.c2
    assert layer.c2.dtype == torch.uint8 and layer.c2.numel() == 576 and layer.c1.numel() == 3
    torch.testing.assert_close(layer.c2_mean, c2.mean())
    centred = (c2 - c2.mean()).view(-1)
    c1 = torch.stack([centred[i:i + 256].abs().max() for i in range(0, 576, 256)])
    torch.testing.assert_close(layer.c1, c1)
    bound = _half_max_gap(dynamic_code()) * c1.repeat_interleave(256)[:576]
    assert torch.all((layer.block_constants() - c2).abs() <= bound * (1 + 1e-5))
    # The weight error adds at most |Δc2| (|q| ≤ 1) to the single-level bound.
    err = (layer.dequantize() - w).abs().view(-1, 64)
    slack = (layer.block_constants() - c2).abs()
    assert torch.all(err <= (_half_max_gap(layer.code) * c2 + slack)[:, None] * (1 + 1e-5))


def test_packing_round_trip_and_nibble_order():
    index = torch.randint(0, 16, (1001,), dtype=torch.uint8)
    packed = pack_4bit(index)
    assert packed.dtype == torch.uint8 and packed.numel() == 501
    assert torch.equal(unpack_4bit(packed, 1001), index)
    assert pack_4bit(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist() == [0x12, 0xF0]  # first = high nibble


def test_forward_equals_dense_dequantised_weight_plus_lora():
    torch.manual_seed(0)
    base = nn.Linear(384, 192)
    layer = QLoRALinear(base, r=4, lora_alpha=8, lora_dropout=0.0, scaling=2.0, compute_dtype=torch.float32)
    nn.init.normal_(layer.lora_B, std=0.1)
    assert not hasattr(layer.base_layer, "weight")  # no float copy of W is kept
    x = torch.randn(2, 5, 384)
    w_hat = layer.base_layer.dequantize()
    dense = x @ (w_hat + 2.0 * layer.lora_B @ layer.lora_A).T + base.bias
    torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)
    # BF16 compute (the paper's): the base matmul runs on bf16 operands, the LoRA branch in fp32.
    layer.base_layer.compute_dtype = torch.bfloat16
    ref = (x.bfloat16() @ w_hat.bfloat16().T).float() + base.bias + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), ref, atol=1e-2, rtol=1e-2)


def test_backward_rebuilds_the_weight_and_saves_nothing_weight_sized():
    torch.manual_seed(0)
    layer = QLoRALinear(nn.Linear(128, 96), r=4, lora_alpha=4, lora_dropout=0.0, scaling=1.0,
                        compute_dtype=torch.float32)
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(7, 128, requires_grad=True)
    g = torch.randn(7, 96)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        out = layer(x)
    out.backward(g)
    assert (96, 128) not in shapes and (128, 96) not in shapes
    x2 = x.detach().clone().requires_grad_()
    A, B = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    ref = x2 @ layer.base_layer.dequantize().T + layer.base_layer.bias + (x2 @ A.T) @ B.T
    ref.backward(g)
    for got, want in [(x.grad, x2.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad)]:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _dequantised_copy(model: nn.Module, adapted: AdapterModel) -> nn.Module:
    """``model`` with every adapted linear's weight replaced by the dequantised NF4 weight."""
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in adapted.adapter_layers().items():
            dense.get_submodule(name).weight.copy_(layer.base_layer.dequantize())
    return dense


def test_identity_at_init_is_the_quantised_model(bert):
    reference = copy.deepcopy(bert)
    model = get_adapter_model(bert, QLoraConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"],
                                                compute_dtype="float32"))
    dense = _dequantised_copy(reference, model)
    torch.testing.assert_close(model(input_ids=X).logits, dense(input_ids=X).logits, atol=1e-6, rtol=0)
    # ... and not the float model: the quantisation error is real.
    assert (model(input_ids=X).logits - reference(input_ids=X).logits).abs().max() > 1e-4


def test_parity_with_peft_lora_on_the_dequantised_base():
    """peft (independent code) with the dequantised weights as its dense base and our A, B."""
    from peft import LoraConfig as PeftConfig
    targets = ["query", "value", "dense"]
    ours, theirs = peft_pair(QLoraConfig(r=4, lora_alpha=8, target_modules=targets, compute_dtype="float32"),
                             PeftConfig(r=4, lora_alpha=8, target_modules=targets), peft_base=_dequantised_copy)
    assert_peft_parity(ours, theirs, X)

def test_gradients_reach_only_a_b_and_head(bert):
    model = get_adapter_model(bert, QLoraConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"]))
    got = gradient_receivers(model, X)
    assert all(n.endswith(("lora_A", "lora_B")) or n.startswith("model.classifier.") for n in got)
    assert all(not b.requires_grad for b in model.buffers())


def test_storage_is_about_4_127_bits_per_parameter():
    w = torch.randn(1536, 384) * 0.02  # MiniLM's FFN shape
    layer = Linear4bit(w, torch.zeros(1536))
    n = w.numel()
    blocks = n // 64
    assert layer.storage_bytes() == {"w_4bit": n // 2, "c2": blocks, "c1": 4 * math.ceil(blocks / 256), "c2_mean": 4}
    # Every byte in the state dict is either this storage or the float bias.
    assert sum(t.nbytes for t in layer.state_dict().values()) == sum(layer.storage_bytes().values()) + 4 * 1536
    assert abs(layer.bits_per_parameter() - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-3  # the paper's 4.127
    assert Linear4bit(w, None, double_quant=False).bits_per_parameter() == 4.5  # 4 + 32/64


def test_nf4_beats_fp4_and_int4_on_normal_weights():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    err = {q: ((Linear4bit(w, None, quant_type=q).dequantize() - w).norm() / w.norm()).item() for q in CODEBOOKS}
    assert err["nf4"] < err["int4"] < err["fp4"]


def test_training_moves_only_lora_and_head_and_keeps_the_codes():
    model = get_adapter_model(tiny_bert(), QLoraConfig(r=4, lora_alpha=8, modules_to_save=["classifier"]))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    # One full batch per step: the logged losses are on the same 32 examples, so they must fall.
    result = Trainer(model, toy_task(32), TrainConfig(lr=1e-2, max_steps=8, batch_size=32, warmup_ratio=0.0,
                                                      progress=False, log_every=1, device="cpu")).train()
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())


def test_save_load_round_trip_rebuilds_the_base(tmp_path):
    config = QLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["classifier"])
    model = get_adapter_model(tiny_bert(), config)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.normal_()
        model.model.classifier.weight.normal_()
    model.save_adapter(tmp_path)
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    # Only LoRA and the head: the 4-bit base is not in the file.
    assert all(k.endswith(("lora_A", "lora_B")) or k.startswith("classifier.") for k in saved)
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path)  # same base checkpoint; head and LoRA from the file
    assert loaded.adapter_config == config
    assert torch.equal(loaded(input_ids=X).logits, model(input_ids=X).logits)
    with pytest.raises(ValueError, match="holds a 'qlora' adapter"):
        get_adapter_model(tiny_bert(), LoraConfig(target_modules="all-linear")).load_adapter(tmp_path)


def test_merge_is_the_dense_deployment_path(bert):
    model = get_adapter_model(bert, QLoraConfig(r=4, target_modules=["query", "value"], compute_dtype="float32"))
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.normal_(0, 0.1)
    before = model(input_ids=X).logits
    model.merge()
    layer = next(iter(model.adapter_layers().values()))
    assert type(layer.base_layer) is nn.Linear
    torch.testing.assert_close(model(input_ids=X).logits, before, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="re-quantising"):
        model.unmerge()
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (QLoRALinear, Linear4bit)) for m in plain.modules())


def test_config_validation_serialisation_and_peft(tmp_path):
    for bad, match in [(dict(quant_type="nf3"), "quant_type"), (dict(blocksize=0), "blocksize"),
                       (dict(dq_blocksize=-1), "dq_blocksize"), (dict(compute_dtype="int8"), "compute_dtype"),
                       (dict(r=0), "positive")]:
        with pytest.raises(ValueError, match=match):
            QLoraConfig(**bad)
    config = QLoraConfig(r=2, quant_type="int4", double_quant=False, compute_dtype="float32")
    assert AdapterConfig.from_dict(config.to_dict()) == config
    layer = config.make_layer("q", nn.Linear(64, 64))
    assert layer.base_layer.quant_type == "int4" and layer.base_layer.c2.dtype == torch.float32
    # A QLoRA adapter exports as a peft LoRA; peft's file says nothing about quantisation, so it reads back as LoRA.
    model = get_adapter_model(tiny_bert(), QLoraConfig(r=2, target_modules=["query"]))
    save_peft(model, tmp_path)
    assert type(load_peft(tiny_bert(), tmp_path).adapter_config) is LoraConfig
