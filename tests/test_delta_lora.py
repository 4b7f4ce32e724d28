"""Delta-LoRA: the W update after real optimizer steps (and none before K), no gradient or optimizer state
for W, LoRA's memory, exact resume, save/load with the modified W, merge, and config errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import Interrupt, tiny_bert, toy_task
from lorafam_nb import LoraConfig, get_adapter_model, save_peft
from lorafam_nb.core import AdapterConfig, AdapterModel
from lorafam_nb.delta_lora import BackboneLoRALinear, DeltaLoRAUpdate, DeltaLoraConfig
from lorafam_nb.trainer import Callback, TrainConfig, Trainer

X = torch.randint(0, 100, (3, 10))


def delta_model(update_ratio: float = 0.5, start_step: int = 2, seed: int = 0) -> AdapterModel:
    return get_adapter_model(tiny_bert(seed), DeltaLoraConfig(r=4, lora_alpha=8, update_ratio=update_ratio,
                                                              start_step=start_step, modules_to_save=["classifier"]))


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-2, "max_steps": 6, "batch_size": 5, "progress": False, "log_every": 1, **kw})


def weights(model: AdapterModel) -> dict[str, torch.Tensor]:
    return {n: l.base_layer.weight.detach().clone() for n, l in model.adapter_layers().items()}


class Record(Callback):
    """W, A, B of every layer before each optimizer step and after the method's update."""

    def __init__(self, model: AdapterModel) -> None:
        self.layers = model.adapter_layers()
        self.before: list[dict] = []
        self.after: list[dict] = []

    def _grab(self) -> dict:
        return {n: (l.base_layer.weight.detach().double().clone(), l.lora_A.detach().double().clone(),
                    l.lora_B.detach().double().clone()) for n, l in self.layers.items()}

    def on_after_backward(self, trainer):
        self.before.append(self._grab())

    def on_step_end(self, trainer):
        self.after.append(self._grab())


def test_update_equals_lambda_delta_after_real_steps_and_nothing_before_k():
    lam, K, steps = 0.5, 2, 6
    model = delta_model(lam, K)
    rec = Record(model)
    Trainer(model, toy_task(), cfg(max_steps=steps), callbacks=[rec]).train()  # rec runs after the method's hook
    s = next(iter(model.adapter_layers().values())).scaling
    assert s == 2.0
    for t in range(steps):
        for name in rec.layers:
            W_t, A_t, B_t = rec.before[t][name]
            W_next, A_next, B_next = rec.after[t][name]
            assert not torch.equal(B_next, B_t)  # the optimizer did move the factors
            if t <= K:  # Algorithm 1 writes W only for t > K
                assert torch.equal(W_next, W_t)
            else:
                expected = lam * s * (B_next @ A_next - B_t @ A_t)
                assert expected.abs().max() > 1e-5
                torch.testing.assert_close(W_next - W_t, expected, atol=2e-8, rtol=1e-4)
    # telescoping: W_T − W_0 = λ s (B_T A_T − B_{K+1} A_{K+1}) (W_{K+1} = W_0)
    for name, layer in model.adapter_layers().items():
        W_0, A_K, B_K = rec.before[K + 1][name]
        assert torch.equal(W_0, rec.before[0][name][0])
        W_T, A_T, B_T = rec.after[-1][name]
        torch.testing.assert_close(W_T - W_0, lam * s * (B_T @ A_T - B_K @ A_K), atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("K", [0, 3])
def test_first_write_follows_step_k_plus_one(K):
    """Algorithm 1 reads t > K: steps t = 0, …, K leave W alone, step t = K + 1 is the first to write it."""
    model = delta_model(0.5, K)
    rec = Record(model)
    Trainer(model, toy_task(), cfg(max_steps=K + 2), callbacks=[rec]).train()
    changed = [t for t in range(K + 2) if any(not torch.equal(rec.after[t][n][0], rec.before[t][n][0]) for n in rec.layers)]
    assert changed == [K + 1]


def test_w_gets_no_gradient_and_no_optimizer_state_same_memory_as_lora():
    model = delta_model(start_step=0)
    trainer = Trainer(model, toy_task(), cfg(max_steps=3))
    w0 = weights(model)
    trainer.train()
    W = [l.base_layer.weight for l in model.adapter_layers().values()]
    assert all(not w.requires_grad and w.grad is None for w in W)
    assert any(not torch.equal(l.base_layer.weight, w0[n]) for n, l in model.adapter_layers().items())
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(w) for w in W}
    with_state = {id(p) for p in trainer.optimizer.state}
    trained = {n for n, p in model.named_parameters() if id(p) in with_state}
    assert trained == {n for n, p in model.named_parameters() if "lora_" in n or "classifier" in n}

    lora = get_adapter_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, modules_to_save=["classifier"]))
    lora_trainer = Trainer(lora, toy_task(), cfg(max_steps=3))
    lora_trainer.train()

    def state_bytes(t: Trainer) -> int:
        return sum(v.nbytes for s in t.optimizer.state.values() for v in s.values() if torch.is_tensor(v))

    assert state_bytes(trainer) == state_bytes(lora_trainer) > 0
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_lambda_zero_is_exactly_lora():
    ref = get_adapter_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, modules_to_save=["classifier"]))
    model = delta_model(update_ratio=0.0, start_step=0)
    a = Trainer(ref, toy_task(), cfg()).train()
    b = Trainer(model, toy_task(), cfg()).train()
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert torch.equal(ref.eval()(input_ids=X).logits, model.eval()(input_ids=X).logits)


def test_checkpoint_resume_restores_w_exactly(tmp_path):
    full = delta_model(start_step=1)
    ref = Trainer(full, toy_task(), cfg(max_steps=8)).train()
    config = cfg(max_steps=8, checkpoint_dir=str(tmp_path), checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        Trainer(delta_model(start_step=1), toy_task(), config, callbacks=[Interrupt(5)]).train()
    resumed = delta_model(start_step=1)  # a fresh process: pretrained W, fresh adapter
    out = Trainer(resumed, toy_task(), config).train(resume=True)
    assert [h["loss"] for h in out.history] == [h["loss"] for h in ref.history]
    assert all(torch.equal(w, weights(full)[n]) for n, w in weights(resumed).items())
    assert torch.equal(resumed.eval()(input_ids=X).logits, full.eval()(input_ids=X).logits)


def test_save_load_reproduces_trained_model_and_merge_is_consistent(tmp_path):
    model = delta_model(start_step=0)
    Trainer(model, toy_task(), cfg(max_steps=4)).train()
    model.eval()
    ref = model(input_ids=X).logits
    w_trained = weights(model)
    model.save_adapter(tmp_path)
    assert AdapterConfig.from_dict(model.adapter_config.to_dict()) == model.adapter_config
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path).eval()  # the pretrained model: W comes from the file
    assert all(torch.equal(w, w_trained[n]) for n, w in weights(loaded).items())
    assert torch.equal(loaded(input_ids=X).logits, ref)

    with torch.no_grad():
        model.merge()
        merged = model(input_ids=X).logits
        with pytest.raises(ValueError, match="unmerge"):
            model.adapter_state_dict()
        model.unmerge()
    torch.testing.assert_close(merged, ref, atol=1e-5, rtol=1e-5)
    assert all((w - w_trained[n]).abs().max() < 1e-6 for n, w in weights(model).items())
    with pytest.raises(ValueError, match="no peft equivalent"):
        save_peft(model, tmp_path / "peft")


def test_hook_needs_whole_optimizer_steps_with_accumulation():
    """With grad_accum=2 the update is applied once per optimizer step, from that step's A, B."""
    lam = 2.0
    model = delta_model(update_ratio=lam, start_step=0)
    rec = Record(model)
    Trainer(model, toy_task(), cfg(max_steps=4, grad_accum=2), callbacks=[rec]).train()
    assert len(rec.after) == 4
    for t in range(1, 4):  # t > K = 0
        for name in rec.layers:
            (W_t, A_t, B_t), (W_n, A_n, B_n) = rec.before[t][name], rec.after[t][name]
            torch.testing.assert_close(W_n - W_t, lam * 2.0 * (B_n @ A_n - B_t @ A_t), atol=2e-8, rtol=1e-4)


def test_bad_configs_and_dtypes():
    with pytest.raises(ValueError, match="dropout"):
        DeltaLoraConfig(lora_dropout=0.1)
    with pytest.raises(ValueError, match="update_ratio"):
        DeltaLoraConfig(update_ratio=-1.0)
    with pytest.raises(ValueError, match="start_step"):
        DeltaLoraConfig(start_step=-3)
    with pytest.raises(ValueError, match="positive"):
        DeltaLoraConfig(r=0)
    with pytest.raises(ValueError, match="float32"):
        DeltaLoraConfig().make_layer("q", nn.Linear(8, 8).bfloat16())
    layer = DeltaLoraConfig(r=2).make_layer("q", nn.Linear(8, 8))
    assert isinstance(layer, BackboneLoRALinear) and isinstance(layer.lora_dropout, nn.Identity)
    model = delta_model()
    callbacks = model.adapter_config.callbacks(model)
    assert len(callbacks) == 1 and isinstance(callbacks[0], DeltaLoRAUpdate)
