"""LoRA+: LoRA's forward, B's learning rate λ·η_A, and the same optimizer groups as peft's LoRA+."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_bert, toy_task
from lorafam_nb import METHODS, AdapterConfig, LoraConfig, get_adapter_model, load_peft, save_peft
from lorafam_nb.lora_plus import LoraPlusConfig
from lorafam_nb.trainer import Callback, TrainConfig, Trainer

X = torch.randint(0, 100, (3, 10))
TARGETS = ["query", "value", "dense"]


def _train_config(**kw) -> TrainConfig:
    return TrainConfig(**{"device": "cpu", "progress": False, "batch_size": 8, **kw})


def test_default_ratio_and_bad_values():
    assert LoraPlusConfig().loraplus_lr_ratio == 16.0  # the paper's rule of thumb λ = 2⁴
    assert METHODS["lora_plus"] is LoraPlusConfig
    for bad in (0.0, -2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="loraplus_lr_ratio"):
            LoraPlusConfig(loraplus_lr_ratio=bad)
    with pytest.raises(ValueError, match="positive"):
        LoraPlusConfig(r=0)


def test_forward_is_lora():
    """Same seed → same A (B = 0), and after perturbing B identically the same logits, bit for bit."""
    models = []
    for cfg in (LoraConfig(r=4, target_modules=TARGETS), LoraPlusConfig(r=4, target_modules=TARGETS)):
        torch.manual_seed(0)
        models.append(get_adapter_model(tiny_bert(), cfg))
    for model in models:
        torch.manual_seed(1)
        with torch.no_grad():
            for layer in model.adapter_layers().values():
                layer.lora_B.normal_()
    lora, plus = models
    layer_types = [{n: type(m) for n, m in model.adapter_layers().items()} for model in (lora, plus)]
    assert layer_types[0] == layer_types[1]
    assert torch.equal(lora(input_ids=X).logits, plus(input_ids=X).logits)


def _peft_to_ours(name: str) -> str:
    """A peft parameter name -> the name of the same tensor in our AdapterModel."""
    name = name.removeprefix("base_model.").replace(".modules_to_save.default.", ".")
    return name.replace(".lora_A.default.weight", ".lora_A").replace(".lora_B.default.weight", ".lora_B")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_trainer_groups_match_peft_create_loraplus_optimizer(weight_decay):
    """Same tensors in the same groups, with the same LR and weight decay, as peft's LoRA+ optimizer.

    The head (classifier) and every LayerNorm are trained in full, so all of peft's rules are used:
    LoRA A and the head weight → η; LoRA B → λη; biases and LayerNorm weights → λη without decay.
    Our TrainConfig.weight_decay plays the role of peft's ``loraplus_weight_decay``.
    """
    from peft import LoraConfig as PeftConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    saved = ["classifier", "LayerNorm"]
    lr, ratio = 3e-4, 12.0
    ours = get_adapter_model(tiny_bert(), LoraPlusConfig(r=4, target_modules=TARGETS, modules_to_save=saved,
                                                         loraplus_lr_ratio=ratio))
    trainer = Trainer(ours, toy_task(), _train_config(lr=lr, weight_decay=weight_decay))
    theirs = get_peft_model(tiny_bert(), PeftConfig(r=4, target_modules=TARGETS, modules_to_save=saved))
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                          loraplus_weight_decay=weight_decay)

    our_names = {id(p): n for n, p in ours.named_parameters()}
    their_names = {id(p): _peft_to_ours(n) for n, p in theirs.named_parameters()}
    got = [(sorted(our_names[id(p)] for p in g["params"]), g["initial_lr"], g["weight_decay"])
           for g in trainer.optimizer.param_groups]
    want = [(sorted(their_names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"])
            for g in optimizer.param_groups if g["params"]]  # peft's embedding group is empty here
    assert got == want
    # every trainable tensor is in exactly one group, on both sides
    assert sum(len(names) for names, _, _ in got) == sum(p.requires_grad for p in ours.parameters())
    peft_trainable = {their_names[id(p)] for p in theirs.parameters() if p.requires_grad}
    assert peft_trainable == {n for names, _, _ in want for n in names}
    # the groups hold what the paper says: A at η, B at λη (exactly, as a product of floats)
    (a_names, lr_a, _), (b_names, lr_b, _), (nd_names, lr_nd, wd_nd) = got
    assert lr_a == lr and lr_b == lr * ratio == lr_nd and wd_nd == 0.0
    assert {n.rpartition(".")[2] for n in a_names} == {"lora_A", "weight"}  # LoRA A and the head's matrix
    assert all(n.endswith(".lora_B") for n in b_names)
    assert all(n.endswith((".bias", ".LayerNorm.weight")) for n in nd_names)


def test_one_step_moves_b_lambda_times_further_and_a_the_same():
    """From the same point and batch, one AdamW step of LoRA+ moves B exactly λ× as far as LoRA's, A equally."""
    ratio, moves = 8.0, []
    for cfg in (LoraConfig(r=4, target_modules=TARGETS),
                LoraPlusConfig(r=4, target_modules=TARGETS, loraplus_lr_ratio=ratio)):
        torch.manual_seed(0)
        model = get_adapter_model(tiny_bert(), cfg)
        with torch.no_grad():
            for layer in model.adapter_layers().values():
                layer.lora_B.normal_(0, 0.1)  # B ≠ 0 so that A receives a gradient too
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        Trainer(model, toy_task(), _train_config(lr=1e-3, max_steps=1, warmup_ratio=0.0, schedule="constant",
                                                 max_grad_norm=None, log_every=1)).train()
        moves.append({n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad})
    lora, plus = moves
    for name in lora:
        factor = ratio if name.endswith("lora_B") else 1.0
        assert lora[name].abs().sum() > 0
        # tolerance: float rounding of p_new - p_old
        torch.testing.assert_close(plus[name], factor * lora[name], rtol=1e-4, atol=1e-6)


def test_ratio_one_trains_exactly_like_lora():
    histories = []
    for cfg in (LoraConfig(r=4, target_modules=TARGETS),
                LoraPlusConfig(r=4, target_modules=TARGETS, loraplus_lr_ratio=1.0)):
        torch.manual_seed(0)
        model = get_adapter_model(tiny_bert(), cfg)
        histories.append(Trainer(model, toy_task(), _train_config(lr=1e-3, max_steps=4, log_every=1)).train().history)
    assert histories[0] == histories[1]


def test_save_load_and_peft_export(tmp_path):
    from peft import PeftModel
    torch.manual_seed(0)
    model = get_adapter_model(tiny_bert(), LoraPlusConfig(r=4, target_modules=TARGETS, loraplus_lr_ratio=4.0,
                                                          modules_to_save=["classifier"]))
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.normal_()
    ref = model(input_ids=X).logits
    model.save_adapter(tmp_path / "ours")
    again = type(model).from_pretrained(tiny_bert(), tmp_path / "ours")
    assert again.adapter_config == model.adapter_config  # λ survives our own format
    assert torch.equal(again(input_ids=X).logits, ref)
    # peft has no LoRA+ adapter type: it exports as, and peft's file reloads as, plain LoRA
    save_peft(model, tmp_path / "peft", task_type="SEQ_CLS")
    by_peft = PeftModel.from_pretrained(tiny_bert(), tmp_path / "peft").eval()
    torch.testing.assert_close(by_peft(input_ids=X).logits, ref, atol=1e-6, rtol=0)
    back = load_peft(tiny_bert(), tmp_path / "peft")
    assert type(back.adapter_config) is LoraConfig
    assert not LoraPlusConfig.peft_matches(LoraConfig().to_peft(["query"]))
    assert AdapterConfig.from_dict(model.adapter_config.to_dict()) == model.adapter_config



def test_schedule_keeps_the_ratio():
    """Warm-up and decay scale every group by the same factor, so η_B / η_A = λ at every step."""

    class Record(Callback):
        def __init__(self):
            self.lrs = []

        def on_step_end(self, trainer):
            self.lrs.append([g["lr"] for g in trainer.optimizer.param_groups])

    model = get_adapter_model(tiny_bert(), LoraPlusConfig(r=2, target_modules=["query"], loraplus_lr_ratio=16.0,
                                                          modules_to_save=["classifier"]))
    record = Record()
    Trainer(model, toy_task(), _train_config(lr=1e-3, max_steps=5, warmup_ratio=0.4), callbacks=[record]).train()
    for a, b, b_no_decay in record.lrs:
        assert b == pytest.approx(16.0 * a, rel=1e-12) and b_no_decay == b
    assert len({a for a, _, _ in record.lrs}) > 2  # the schedule really changed the learning rate
