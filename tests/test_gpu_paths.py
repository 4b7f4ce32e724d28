"""The GPU paths: every method under bfloat16 autocast (on the CPU here, on CUDA when there is one), QLoRA on
bitsandbytes' kernels against our NF4 code, and the full profile's settings. CUDA-only tests skip on a CPU."""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from lorafam_nb import bench, grid
from lorafam_nb.models import load_model
from lorafam_nb.qlora import Linear4bit, QLoRALinear, to_bitsandbytes
from lorafam_nb.trainer import TrainConfig, Trainer

from conftest import text_methods

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU; on a CPU the same code runs under CPU autocast")
needs_bnb = pytest.mark.skipif(not CUDA or importlib.util.find_spec("bitsandbytes") is None,
                               reason="needs a CUDA GPU and bitsandbytes (pip install bitsandbytes)")
METHODS = list(text_methods())


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return load_model("minilm", head="sequence_classification", num_labels=2)


@pytest.fixture(scope="module")
def builders():
    return bench.setups(r=8, steps=2)


def _train_bf16(model: nn.Module, device: str) -> tuple[list[float], int, int]:
    batch = {"input_ids": torch.randint(1000, 20000, (4, 16), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(4, 16, dtype=torch.long), "labels": torch.tensor([0, 1, 0, 1])}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = Trainer(model, bench._task_of(batch), TrainConfig(lr=1e-3, max_steps=2, batch_size=4, precision="bf16",
                                                                device=device, progress=False, log_every=1))
    outputs = []
    query = next(m for n, m in model.named_modules() if n.endswith("layer.0.attention.self.query"))
    base = getattr(query, "base_layer", query)  # the frozen GEMM, inside an adapter layer or alone
    hook = base.register_forward_hook(lambda m, i, o: outputs.append(o.dtype))
    history = trainer.train().history
    hook.remove()
    # The first block's query GEMM ran in bf16 in every forward pass (QLoRA's always does, in its compute
    # dtype, and hands back the input's dtype).
    assert set(outputs) == {torch.float32 if isinstance(base, Linear4bit) else torch.bfloat16}
    moved = sum(bool((p.detach().cpu() != trainable[n]).any()) for n, p in model.named_parameters() if n in trainable)
    return [row["loss"] for row in history], moved, len(trainable)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_under_bf16_autocast(method, device, minilm, builders):
    losses, moved, trainable = _train_bf16(builders[method](copy.deepcopy(minilm)), device)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # Parameters the step may leave: experts no token chose (mixtures), gates of unselected experts.
    assert moved >= trainable // 2 and moved > 0, (moved, trainable)
    for p in minilm.parameters():
        assert p.dtype == torch.float32  # parameters (and so AdamW's state) stay fp32 under autocast


def test_fused_lora_is_left_out_under_autocast(minilm, builders):
    # The fused GEMM would round a small s·BA away in bf16: under autocast LoRA takes the unfused path.
    model = builders["lora"](copy.deepcopy(minilm))
    layer = next(m for m in model.modules() if type(m).__name__ == "LoRALinear")
    assert layer._can_fuse()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer._can_fuse()


@needs_bnb
def test_qlora_on_bitsandbytes_matches_our_nf4():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    linear = nn.Linear(512, 256).cuda()
    ours = Linear4bit.from_linear(linear)
    # The paper's path, from the float weight: bitsandbytes' codes and constants against ours.
    theirs = bnb.nn.Params4bit(linear.weight.detach().cpu(), requires_grad=False, quant_type="nf4",
                               compress_statistics=True, blocksize=64).cuda()
    reference = bnb.functional.dequantize_4bit(theirs.data, theirs.quant_state).float()
    # The same codes and constants: a weight within float rounding of a midpoint between two codes may land on
    # the other one (bitsandbytes multiplies by 1/absmax where we divide), so allow a few one-step flips.
    diff = (ours.dequantize() - reference).abs()
    assert (diff > 1e-6).float().mean() < 1e-4
    assert diff.max() <= 0.31 * linear.weight.abs().max()  # NF4's widest step, -1 to -0.696, is < 0.31 of an absmax
    # A whole QLoRA model moved onto bitsandbytes' kernels computes what our de-quantising layer computes.
    layer = QLoRALinear(linear, r=8, lora_alpha=16, lora_dropout=0.0, scaling=2.0, compute_dtype=torch.bfloat16)
    nn.init.normal_(layer.lora_B)
    holder = nn.Sequential(layer)
    x = torch.randn(8, 512, device="cuda")
    expected = holder(x)
    to_bitsandbytes(holder)
    assert type(layer.base_layer).__name__ == "BitsAndBytes4bit"
    torch.testing.assert_close(holder(x), expected, rtol=2e-2, atol=2e-2)  # both matmuls in bf16


def test_to_bitsandbytes_refuses_a_cpu_model():
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (pip install bitsandbytes)")
    layer = QLoRALinear(nn.Linear(64, 32), r=4, lora_alpha=8, lora_dropout=0.0, scaling=2.0)
    with pytest.raises(ValueError, match="CUDA"):
        to_bitsandbytes(nn.Sequential(layer))


def test_full_profile_is_sized_for_one_gpu():
    full = grid.PROFILES["full"]
    for settings in full.models.values():
        assert settings.batch_size * settings.grad_accum == 16 and settings.max_length == 512
        assert settings.precision == "bf16"
    run = next(r for r in grid.plan(full) if r.method == "qlora")
    spec = run.spec(device="cuda")
    assert spec.train.precision == "bf16" and spec.train.device == "cuda"
