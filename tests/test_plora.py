"""PLoRA: the unload rules (hard and momentum) against dense formulas, stage ends in the trainer (function
kept, the LoRA factors' optimizer state cleared and their LR restarted, the head's state and schedule kept), rank of the accumulated update above r, exact resume across
a stage boundary, save/load, config errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import Interrupt, tiny_bert, toy_task
from lorafam_nb import LoraConfig, get_adapter_model
from lorafam_nb.core import AdapterConfig, AdapterModel
from lorafam_nb.plora import PLoraConfig, PLoRALinear, lora_factors
from lorafam_nb.trainer import Callback, TrainConfig, Trainer

X = torch.randint(0, 100, (3, 10))


def plora_model(r: int = 2, unload_every: int = 3, momentum: float | None = None, seed: int = 0) -> AdapterModel:
    return get_adapter_model(tiny_bert(seed), PLoraConfig(r=r, lora_alpha=2 * r, unload_every=unload_every,
                                                          momentum=momentum, modules_to_save=["classifier"]))


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-2, "max_steps": 9, "batch_size": 5, "progress": False, "log_every": 1,
                          "warmup_ratio": 0.34, **kw})


def weights(model: AdapterModel) -> dict[str, torch.Tensor]:
    return {n: l.base_layer.weight.detach().clone() for n, l in model.adapter_layers().items()}


def trained_layer() -> PLoRALinear:
    torch.manual_seed(0)
    layer = PLoraConfig(r=3, lora_alpha=6).make_layer("q", nn.Linear(20, 12))
    nn.init.normal_(layer.lora_B, std=0.1)
    return layer


def test_hard_unload_moves_sba_into_w_and_restarts_the_adapter():
    layer = trained_layer()
    W, A, B, s = layer.base_layer.weight.clone(), layer.lora_A.clone(), layer.lora_B.clone(), layer.scaling
    x = torch.randn(5, 20)
    before = layer(x)
    layer.unload(generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(layer.base_layer.weight, W + s * B @ A, atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(layer.lora_B) == 0
    # a fresh LoRA A: Kaiming-uniform(a=√5), bound 1/√d_in, and not the old one
    assert not torch.equal(layer.lora_A, A) and layer.lora_A.abs().max() <= 1 / math.sqrt(20)
    expected = nn.init.kaiming_uniform_(torch.empty(3, 20), a=math.sqrt(5), generator=torch.Generator().manual_seed(7))
    assert torch.equal(layer.lora_A, expected)
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-6)  # the unload keeps the function


def test_momentum_unload_formula():
    mu = 0.1
    layer = trained_layer()
    W, A, B, s = layer.base_layer.weight.clone(), layer.lora_A.clone(), layer.lora_B.clone(), layer.scaling
    layer.unload(momentum=mu)
    torch.testing.assert_close(layer.base_layer.weight, W + mu * s * B @ A, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.lora_A, (1 - mu) * A)
    torch.testing.assert_close(layer.lora_B, (1 - mu) * B)
    # not function-preserving: the effective weight keeps μ + (1 − μ)² of sBA
    effective = layer.base_layer.weight + layer.delta_weight()
    torch.testing.assert_close(effective, W + (mu + (1 - mu) ** 2) * s * B @ A, atol=1e-6, rtol=1e-6)


class Probe(Callback):
    """Logits on a fixed input (eval mode), B norms, optimizer-state size, the head's Adam moments, the LoRA
    factors' Adam steps and the LR at each step end."""

    def __init__(self, model: AdapterModel) -> None:
        self.model, self.rows = model, []

    def on_step_end(self, trainer):
        self.model.eval()
        with torch.no_grad():
            logits = self.model(input_ids=X).logits
        self.model.train()
        B = sum(float(l.lora_B.detach().norm()) for l in self.model.adapter_layers().values())
        state = trainer.optimizer.state
        head = [p for n, p in self.model.named_parameters() if p.requires_grad and "classifier" in n]
        self.rows.append({"logits": logits, "B": B, "state": len(state),
                          "head": [state[p]["exp_avg_sq"].clone() for p in head if p in state],
                          "lora_steps": [float(state[p]["step"]) if p in state else 0.0 for p in lora_factors(self.model)],
                          "lr": trainer.optimizer.param_groups[0]["lr"], "W": weights(self.model)})


def test_stage_end_in_trainer_keeps_function_resets_only_the_lora_state_and_schedule():
    model = plora_model(unload_every=3)
    trainer = Trainer(model, toy_task(), cfg(max_steps=9))
    groups = trainer.optimizer.param_groups
    assert [len(g["params"]) for g in groups] == [len(lora_factors(model)), 2]  # the factors; the head
    pre, post = Probe(model), Probe(model)
    trainer.callbacks.insert(0, pre)  # runs after the optimizer step, before the unload
    trainer.callbacks.append(post)  # after the unload
    lrs = []
    trainer.callbacks.append(type("LR", (Callback,), {
        "on_after_backward": lambda self, t: lrs.append([g["lr"] for g in t.optimizer.param_groups])})())
    w0 = weights(model)
    trainer.train()
    for i, (a, b) in enumerate(zip(pre.rows, post.rows)):
        step = i + 1
        torch.testing.assert_close(b["logits"], a["logits"], atol=1e-5, rtol=1e-5)
        assert len(b["head"]) == 2 and all(torch.equal(x, y) for x, y in zip(a["head"], b["head"]))  # head kept
        if step in (3, 6):  # stage ends: the LoRA factors' state is gone, the head's is the same
            assert a["B"] > 0 and b["B"] == 0 and a["state"] == len(lora_factors(model)) + 2 and b["state"] == 2
            assert min(a["lora_steps"]) == 3 and max(b["lora_steps"]) == 0
            assert any(not torch.equal(b["W"][n], a["W"][n]) for n in w0)
        else:  # inside a stage, and the last step (its adapter is kept): nothing is written
            assert b["B"] == a["B"] and b["state"] == a["state"] and b["lora_steps"] == a["lora_steps"]
            assert all(torch.equal(b["W"][n], a["W"][n]) for n in w0)
    # the factors: each 3-step stage runs its own schedule, warm-up int(0.34·3) = 1 step, then linear decay
    assert [lr[0] for lr in lrs] == pytest.approx([1e-2 * f for f in (1.0, 1.0, 0.5)] * 3)
    # the head: one schedule over the 9 steps, warm-up int(0.34·9) = 3 steps, then linear decay over 6
    assert [lr[1] for lr in lrs] == pytest.approx([1e-2 * f for f in (1 / 3, 2 / 3, 1, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6)])


def test_momentum_variant_keeps_optimizer_state_and_schedule():
    mu = 0.5
    model = plora_model(unload_every=1, momentum=mu)
    pre, post = Probe(model), Probe(model)
    trainer = Trainer(model, toy_task(), cfg(max_steps=4, warmup_ratio=0.0))
    trainer.callbacks.insert(0, pre)
    trainer.callbacks.append(post)
    trainer.train()
    for a, b in list(zip(pre.rows, post.rows))[:-1]:
        assert b["state"] == a["state"] > 0 and b["lr"] == a["lr"]
        assert b["B"] == pytest.approx((1 - mu) * a["B"], rel=1e-5)
    assert [r["lr"] for r in post.rows] == pytest.approx([1e-2 * f for f in (0.75, 0.5, 0.25, 0.0)])


def numerical_rank(matrix: torch.Tensor) -> int:
    s = torch.linalg.svdvals(matrix.double())
    return int((s > 0.01 * s[0]).sum())


def test_accumulated_update_has_rank_above_r():
    r, steps = 1, 12
    model = plora_model(r=r, unload_every=2)
    lora = get_adapter_model(tiny_bert(), LoraConfig(r=r, lora_alpha=2, modules_to_save=["classifier"]))
    w0 = weights(model)
    Trainer(model, toy_task(), cfg(max_steps=steps)).train()
    Trainer(lora, toy_task(), cfg(max_steps=steps)).train()
    ranks = [numerical_rank(l.base_layer.weight - w0[n] + l.delta_weight()) for n, l in model.adapter_layers().items()]
    assert min(ranks) > r and max(ranks) <= steps // 2  # one rank-r piece per stage
    assert all(numerical_rank(l.delta_weight()) <= r for l in lora.adapter_layers().values())


@pytest.mark.parametrize("checkpoint_every,interrupt", [(3, 5), (2, 5)])  # saved at a stage end / mid-stage
def test_resume_across_a_stage_boundary_is_exact(tmp_path, checkpoint_every, interrupt):
    full = plora_model(unload_every=3)
    ref = Trainer(full, toy_task(), cfg(max_steps=9)).train()
    config = cfg(max_steps=9, checkpoint_dir=str(tmp_path), checkpoint_every=checkpoint_every)
    with pytest.raises(KeyboardInterrupt):
        Trainer(plora_model(unload_every=3), toy_task(), config, callbacks=[Interrupt(interrupt)]).train()
    resumed = plora_model(unload_every=3)
    out = Trainer(resumed, toy_task(), config).train(resume=True)
    assert [h["loss"] for h in out.history] == [h["loss"] for h in ref.history]
    assert [h["lr"] for h in out.history] == [h["lr"] for h in ref.history]
    assert all(torch.equal(w, weights(full)[n]) for n, w in weights(resumed).items())
    assert all(torch.equal(p, dict(full.named_parameters())[n]) for n, p in resumed.named_parameters())


def test_save_load_round_trip_with_the_modified_backbone(tmp_path):
    model = plora_model(unload_every=2)
    Trainer(model, toy_task(), cfg(max_steps=5)).train()
    model.eval()
    ref = model(input_ids=X).logits
    model.save_adapter(tmp_path)
    assert AdapterConfig.from_dict(model.adapter_config.to_dict()) == model.adapter_config
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert isinstance(next(iter(loaded.adapter_layers().values())), PLoRALinear)
    assert torch.equal(loaded(input_ids=X).logits, ref)


def test_bad_configs():
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="unload_every"):
            PLoraConfig(unload_every=bad)
    for bad in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(ValueError, match="momentum"):
            PLoraConfig(momentum=bad)
    with pytest.raises(ValueError, match="float32"):
        PLoraConfig().make_layer("q", nn.Linear(8, 8).half())
    PLoraConfig(lora_dropout=0.1, momentum=0.1, unload_every=1)  # dropout is fine: stages are plain LoRA
