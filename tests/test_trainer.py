"""Trainer: determinism, resume, NaN stop, schedules, and the hooks methods rely on."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from conftest import Interrupt, tiny_bert, toy_task
from lorafam_nb import LoraConfig, get_adapter_model
from lorafam_nb.trainer import Callback, TrainConfig, Trainer, lr_lambda


def lora_model(seed: int = 0):
    return get_adapter_model(tiny_bert(seed), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         modules_to_save=["classifier"], lora_dropout=0.1))


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 5e-3, "max_steps": 6, "batch_size": 5, "progress": False, "log_every": 1, **kw})


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_same_seed_same_numbers_and_learning():
    a, b = lora_model(), lora_model()
    ra = Trainer(a, toy_task(), cfg(max_steps=60, lr=2e-2), eval_tasks=[toy_task(40, seed=1)]).train()
    rb = Trainer(b, toy_task(), cfg(max_steps=60, lr=2e-2), eval_tasks=[toy_task(40, seed=1)]).train()
    assert [h["loss"] for h in ra.history] == [h["loss"] for h in rb.history]
    assert all(torch.equal(v, params(b)[k]) for k, v in params(a).items())
    c = lora_model()
    rc = Trainer(c, toy_task(), cfg(max_steps=60, lr=2e-2, seed=1)).train()
    assert [h["loss"] for h in rc.history] != [h["loss"] for h in ra.history]
    assert ra.history[-1]["loss"] < ra.history[0]["loss"]
    assert ra.final["sst2"] >= 0.9  # held-out accuracy: the toy rule is learnable in 60 steps


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, grad_accum):
    # 48 examples, batch 5: epochs end on a short micro-batch, so resuming must find the right offset
    full = lora_model()
    ref = Trainer(full, toy_task(), cfg(max_steps=12, grad_accum=grad_accum)).train()
    run = lora_model()
    config = cfg(max_steps=12, grad_accum=grad_accum, checkpoint_dir=str(tmp_path), checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        Trainer(run, toy_task(), config, callbacks=[Interrupt(7)]).train()
    resumed = lora_model()  # a fresh process would rebuild the model from scratch
    out = Trainer(resumed, toy_task(), config).train(resume=True)
    assert [h["loss"] for h in out.history] == [h["loss"] for h in ref.history]
    assert all(torch.equal(v, params(full)[k]) for k, v in params(resumed).items())


def test_nan_loss_stops_naming_the_step():
    class Poison(Callback):
        def extra_loss(self, trainer):
            return {"poison": torch.tensor(float("nan"))} if trainer.step == 3 else {}
    with pytest.raises(FloatingPointError, match="step 4"):
        Trainer(lora_model(), toy_task(), cfg(), callbacks=[Poison()]).train()


def test_lr_schedules():
    linear = lr_lambda("linear", warmup=2, total=10)
    assert [round(linear(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    cosine = lr_lambda("cosine", warmup=0, total=10)
    assert cosine(0) == 1.0 and abs(cosine(5) - 0.5) < 1e-9
    assert lr_lambda("constant", warmup=0, total=10)(9) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")


@dataclass
class TwoRateLora(LoraConfig):
    """A LoRA+-shaped config: B gets 4x the LR (exercises the param-group seam)."""
    method = "test_two_rate"

    def param_groups(self, model, lr, weight_decay):
        a = [p for n, p in model.named_parameters() if n.endswith("lora_A")]
        b = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
        head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
        return [{"params": a + head, "lr": lr}, {"params": b, "lr": 4 * lr}]


def test_param_groups_and_hook_order():
    model = get_adapter_model(tiny_bert(), TwoRateLora(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    events: list[str] = []

    class Recorder(Callback):
        def on_train_begin(self, t): events.append("begin")
        def on_after_backward(self, t):
            assert all(p.grad is not None for p in t.trainable)  # gradients are visible here
            events.append("backward")
        def on_step_end(self, t): events.append(f"step{t.step}")
        def on_evaluate(self, t, m): events.append("eval")
        def on_train_end(self, t): events.append("end")

    trainer = Trainer(model, toy_task(), cfg(max_steps=2, warmup_ratio=0, schedule="constant"),
                      eval_tasks=[toy_task(10)], callbacks=[Recorder()])
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [5e-3, 2e-2]
    trainer.train()
    assert events == ["begin", "backward", "step1", "backward", "step2", "eval", "end"]


def test_bad_configs():
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        Trainer(lora_model(), toy_task(), cfg()).train(resume=True)
    frozen = tiny_bert().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        Trainer(frozen, toy_task(), cfg())
