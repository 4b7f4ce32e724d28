"""AdaLoRA: P Λ Q layer, parity with peft (forward, gradients, regulariser, budget, scores, masks),
orthogonality penalty, hand-computed importance, global masking, schedule in training, resume, merge, save/load."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import Interrupt, tiny_bert, toy_task
from lorafam_nb import AdapterModel, get_adapter_model
from lorafam_nb.interop import load_peft, save_peft
from lorafam_nb.adalora import AdaLoraConfig, AdaLoRALinear, RankAllocator, effective_parameters, rank_pattern
from lorafam_nb.models import MODELS
from lorafam_nb.trainer import Callback, TrainConfig, Trainer

X = torch.randint(0, 100, (3, 10))
TARGETS = list(MODELS["minilm"].all_linear)  # the six linears of a BERT block: 12 matrices in tiny_bert


def adalora(model=None, **kw) -> AdapterModel:
    kw = {"init_r": 4, "target_r": 2, "lora_alpha": 6.0, "target_modules": TARGETS, **kw}
    return get_adapter_model(model if model is not None else tiny_bert(), AdaLoraConfig(**kw))


def randomise(model: AdapterModel, seed: int = 1, std: float = 0.3) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_A.normal_(0, std)
            layer.lora_B.normal_(0, std)
            layer.lora_E.normal_()


def test_layer_matches_dense_equation_fused_and_unfused():
    torch.manual_seed(0)
    base = nn.Linear(20, 12).requires_grad_(False)
    layer = AdaLoRALinear(base, r=3, lora_alpha=6, lora_dropout=0.0)
    assert layer.scaling == 2.0  # α / r with the *initial* r
    with torch.no_grad():
        layer.lora_E.normal_()
    P, lam, Q = layer.lora_B, layer.lora_E.view(-1), layer.lora_A
    x = torch.randn(5, 7, 20)
    dense_w = base.weight + 2.0 * P @ torch.diag(lam) @ Q
    torch.testing.assert_close(layer.delta_weight(), 2.0 * P @ torch.diag(lam) @ Q)
    assert layer._can_fuse()
    g = torch.randn(5, 7, 12)
    layer(x).backward(g)
    fused = [p.grad.clone() for p in (layer.lora_A, layer.lora_E, layer.lora_B)]
    torch.testing.assert_close(layer(x), x @ dense_w.T + base.bias, atol=1e-5, rtol=1e-5)
    # a trainable base takes the unfused path: same outputs and gradients
    unfused = copy.deepcopy(layer)
    unfused.base_layer.requires_grad_(True)
    assert not unfused._can_fuse()
    torch.testing.assert_close(unfused(x), x @ dense_w.T + base.bias, atol=1e-5, rtol=1e-5)
    for p in (unfused.lora_A, unfused.lora_E, unfused.lora_B):
        p.grad = None
    unfused(x).backward(g)
    for got, want in zip((unfused.lora_A.grad, unfused.lora_E.grad, unfused.lora_B.grad), fused):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_init_identity_and_which_parameters_train(bert):
    ref = bert(input_ids=X).logits
    torch.manual_seed(0)
    model = adalora(bert, init_r=8, modules_to_save=["classifier"])
    layers = model.adapter_layers()
    assert len(layers) == 12
    q = layers["bert.encoder.layer.0.intermediate.dense"]
    assert torch.count_nonzero(q.lora_E) == 0 and q.lora_E.shape == (8, 1)
    both = torch.cat([torch.cat([l.lora_A.flatten(), l.lora_B.flatten()]) for l in layers.values()])
    assert abs(both.std().item() - 0.02) < 0.002 and abs(both.mean().item()) < 0.002  # N(0, 0.02²)
    assert all(l.rank_mask.all() and l.rank == 8 for l in layers.values())
    assert torch.equal(model(input_ids=X).logits, ref)  # Λ = 0: exactly the base model
    # At Λ = 0 only Λ gets a gradient (∂L/∂P and ∂L/∂Q carry a factor λ); W0 none.
    model(input_ids=X, labels=torch.tensor([0, 1, 0])).loss.backward()
    for layer in layers.values():
        assert torch.count_nonzero(layer.lora_A.grad) == 0 and torch.count_nonzero(layer.lora_B.grad) == 0
        assert torch.count_nonzero(layer.lora_E.grad) > 0
        assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    # The orthogonality regulariser has no factor λ: with it, P and Q do get a gradient at step one.
    model.zero_grad()
    RankAllocator(model, model.adapter_config).orthogonality_penalty().backward()
    for layer in layers.values():
        assert torch.count_nonzero(layer.lora_A.grad) > 0 and torch.count_nonzero(layer.lora_B.grad) > 0
        assert layer.lora_E.grad is None or torch.count_nonzero(layer.lora_E.grad) == 0
    # Once Λ ≠ 0 the gradients reach exactly P, Λ, Q and the head.
    model.zero_grad()
    randomise(model)
    model(input_ids=X, labels=torch.tensor([0, 1, 0])).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_A", "lora_E", "lora_B")) or ".classifier." in n for n in got)
    assert len(got) == 12 * 3 + 2


def test_config_errors():
    for bad, match in [(dict(init_r=0), "init_r"), (dict(target_r=13), "target_r"), (dict(target_r=0), "target_r"),
                       (dict(deltaT=0), "deltaT"), (dict(beta1=1.0), "beta1"), (dict(orth_reg_weight=-1), "orth_reg"),
                       (dict(orth_reg_form="squared"), "orth_reg_form"), (dict(lora_dropout=1.0), "lora_dropout"),
                       (dict(tinit=5, tfinal=5, total_step=10), "total_step")]:
        with pytest.raises(ValueError, match=match):
            AdaLoraConfig(**bad)
    model = adalora(tinit=5, tfinal=10)
    with pytest.raises(ValueError, match="tinit \\+ tfinal"):
        Trainer(model, toy_task(), TrainConfig(max_steps=15, progress=False)).train()
    model = adalora(total_step=30)
    with pytest.raises(ValueError, match="total_step=30"):
        Trainer(model, toy_task(), TrainConfig(max_steps=15, progress=False)).train()
    assert AdaLoraConfig(init_r=6, target_r=4).num_parameters(384, 1536) == 6 * (384 + 1536 + 1)


def _peft_pair(init_r: int = 4, target_r: int = 2, alpha: float = 6.0, gamma: float = 0.3, **schedule):
    """Our model and peft's AdaLoRA on the same tiny BERT, with the same random P, Λ, Q."""
    from peft import AdaLoraConfig as PeftAdaLoraConfig, get_peft_model
    schedule = {"tinit": 2, "tfinal": 3, "deltaT": 1, "total_step": 12, **schedule}
    base = tiny_bert()
    ours = adalora(copy.deepcopy(base), init_r=init_r, target_r=target_r, lora_alpha=alpha, orth_reg_weight=gamma,
                   **{k: v for k, v in schedule.items() if k != "total_step"})
    theirs = get_peft_model(copy.deepcopy(base), PeftAdaLoraConfig(
        init_r=init_r, target_r=target_r, lora_alpha=alpha, target_modules=TARGETS, orth_reg_weight=gamma, **schedule))
    randomise(ours)
    for name, layer in ours.adapter_layers().items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        # peft's convention: scaling = lora_alpha, divided by ranknum = init_r at every forward
        assert peft_layer.scaling["default"] == alpha and peft_layer.ranknum["default"].item() == init_r
        with torch.no_grad():
            peft_layer.lora_A["default"].copy_(layer.lora_A)  # Q
            peft_layer.lora_E["default"].copy_(layer.lora_E)  # Λ
            peft_layer.lora_B["default"].copy_(layer.lora_B)  # P
            # peft divides by ranknum + 1e-5 (a guard for r = 0); cancel the guard to compare α/r with α/r.
            peft_layer.ranknum["default"].fill_(init_r - 1e-5)
    allocator = RankAllocator(ours, ours.adapter_config)
    allocator.set_total_step(schedule["total_step"])
    return ours, theirs, allocator


def test_parity_with_peft_forward_regulariser_and_gradients():
    ours, theirs, allocator = _peft_pair()
    labels = torch.tensor([0, 1, 1])
    # peft adds its regulariser in AdaLoraModel.forward (PeftModel without a task type would skip it)
    out_ours, out_theirs = ours(input_ids=X, labels=labels), theirs.base_model(input_ids=X, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-6, rtol=0)
    # peft adds γ/(2n) Σ (‖QQᵀ − I‖_F + ‖PᵀP − I‖_F) to the loss: our "peft" form must equal it
    loss_ours = out_ours.loss + allocator.orthogonality_penalty()
    torch.testing.assert_close(loss_ours, out_theirs.loss, atol=1e-6, rtol=0)
    assert allocator.orthogonality_penalty().item() > 0.1  # a real term, not a vanishing one
    loss_ours.backward()
    out_theirs.loss.backward()
    for name, layer in ours.adapter_layers().items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        for ours_p, theirs_p in [(layer.lora_A, peft_layer.lora_A), (layer.lora_E, peft_layer.lora_E),
                                 (layer.lora_B, peft_layer.lora_B)]:
            torch.testing.assert_close(ours_p.grad, theirs_p["default"].grad, atol=1e-6, rtol=0)


def closed_form_budget(t: int, b0: int, bT: int, T: int, ti: int, tf: int) -> int:
    if t <= ti:
        return b0
    if t > T - tf:
        return bT
    return bT + math.floor((b0 - bT) * (1 - (t - ti) / (T - ti - tf)) ** 3)


@pytest.mark.parametrize("init_r,target_r,T,ti,tf,dT",
                         [(4, 2, 40, 5, 10, 3), (6, 4, 60, 6, 18, 10), (3, 1, 9, 0, 0, 1)])
def test_budget_schedule_matches_peft_and_closed_form(init_r, target_r, T, ti, tf, dT):
    _, theirs, allocator = _peft_pair(init_r, target_r, tinit=ti, tfinal=tf, deltaT=dT, total_step=T)
    peft_allocator = theirs.base_model.rankallocator
    n = 12
    assert (allocator.init_budget, allocator.target_budget) == (peft_allocator.init_bgt, peft_allocator.target_bgt)
    assert (allocator.init_budget, allocator.target_budget) == (n * init_r, n * target_r)
    budgets = [allocator.budget(t) for t in range(1, T + 1)]
    assert budgets == [peft_allocator.budget_schedule(t)[0] for t in range(1, T + 1)]
    assert budgets == [closed_form_budget(t, n * init_r, n * target_r, T, ti, tf) for t in range(1, T + 1)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # never increases
    assert budgets[T - tf - 1] == n * target_r  # b(T − t_f) = b(T)
    # Masking steps: peft masks when its schedule says so and forces a final mask at T − t_f; from
    # then on it re-applies the frozen pattern. Ours: a new pick or a re-application at the same steps.
    ours_masks = [allocator.allocates(t) or allocator.scores_frozen(t) for t in range(1, T + 1)]
    theirs_masks = [peft_allocator.budget_schedule(t)[1] or t == T - tf for t in range(1, T + 1)]
    assert ours_masks == theirs_masks


def _set_grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.grad = torch.randn(p.shape, generator=g)


def test_importance_scores_and_mask_match_peft():
    ours, theirs, allocator = _peft_pair()
    peft_allocator, peft_inner = theirs.base_model.rankallocator, theirs.base_model.model
    for step in range(3):
        _set_grads(ours, step)
        _set_grads(theirs, step)
        allocator.update_importance()
        peft_allocator.update_ipt(peft_inner)
    for name in ours.adapter_layers():
        for factor in ("lora_A", "lora_E", "lora_B"):
            key = f"{name}.{factor}.default"
            # same formulas; in-place vs out-of-place float32 arithmetic may differ in the last bit
            for ours_ema, theirs_ema in [(allocator.ipt, peft_allocator.exp_avg_ipt),
                                         (allocator.unc, peft_allocator.exp_avg_unc)]:
                torch.testing.assert_close(ours_ema[f"{name}.{factor}"], theirs_ema[key], atol=0, rtol=1e-6)
    for budget in (40, 25, 7):
        pattern = peft_allocator.mask_to_budget(peft_inner, budget)
        allocator.mask_to_budget(budget)
        for name, layer in ours.adapter_layers().items():
            assert layer.rank_mask.tolist() == pattern[f"{name}.lora_E.default"]
            assert torch.equal(layer.lora_E, peft_inner.get_submodule(name).lora_E["default"])


def test_importance_on_a_hand_made_example():
    """β1 = β2 = 1/2, two steps; every number below is worked out by hand from the paper's formulas."""
    layer = AdaLoRALinear(nn.Linear(3, 2), r=2, lora_alpha=2, lora_dropout=0.0)
    allocator = RankAllocator(nn.ModuleDict({"m": layer}), AdaLoraConfig(init_r=2, target_r=1, beta1=0.5, beta2=0.5))
    # Sensitivities I = |w · g| wanted at step 1 and step 2, per entry.
    I1 = {"lora_A": [[4, 0, 2], [0, 4, 0]], "lora_E": [[2], [0]], "lora_B": [[4, 4], [0, 2]]}
    I2 = {"lora_A": [[2, 4, 2], [0, 0, 0]], "lora_E": [[2], [4]], "lora_B": [[0, 2], [0, 2]]}
    with torch.no_grad():
        layer.lora_A.fill_(-2.0)  # negative weights and mixed-sign gradients exercise the |·|
        layer.lora_E.fill_(2.0)
        layer.lora_B.fill_(0.5)
    for step, wanted in enumerate((I1, I2)):
        for factor, values in wanted.items():
            p = getattr(layer, factor)
            sign = -1.0 if step == 0 else 1.0
            p.grad = sign * torch.tensor(values, dtype=torch.float32) / p.detach()
        allocator.update_importance()
    # Per entry: Ī = (I1/2)/2 + I2/2,  Ū = (|I1 − I1/2|/2)/2 + |I2 − Ī|/2,  s = Ī·Ū.
    # (I1, I2) = (4,2) → s = 2·0.5 = 1;  (0,4) → 2·1 = 2;  (4,0) → 1·1 = 1;  (2,2) → 1.5·0.5 = 0.75;  (0,0) → 0.
    s = {"lora_A": [[1, 2, 0.75], [0, 1, 0]], "lora_E": [[0.75], [2]], "lora_B": [[1, 1], [0, 0.75]]}
    for factor, values in s.items():
        got = allocator.ipt[f"m.{factor}"] * allocator.unc[f"m.{factor}"]
        torch.testing.assert_close(got, torch.tensor(values), atol=1e-6, rtol=0)
    # S_i = s(λ_i) + mean over P's column i + mean over Q's row i
    S = allocator.triplet_scores()["m"]
    torch.testing.assert_close(S, torch.tensor([0.75 + 0.5 + 3.75 / 3, 2 + 0.875 + 1 / 3]), atol=1e-6, rtol=0)
    allocator.mask_to_budget(1)  # the higher-scoring triplet 1 survives, λ_0 is zeroed
    assert layer.rank_mask.tolist() == [False, True] and layer.lora_E.view(-1).tolist() == [0.0, 2.0]


def test_masking_keeps_exactly_the_global_budget():
    model = adalora(init_r=4)
    randomise(model)
    allocator = RankAllocator(model, model.adapter_config)
    for step in range(3):
        _set_grads(model, step)
        allocator.update_importance()
    scores = allocator.triplet_scores()
    flat = torch.cat(list(scores.values()))
    for budget in (48, 31, 12, 1):
        before = {n: l.lora_E.detach().clone() for n, l in model.adapter_layers().items()}
        allocator.mask_to_budget(budget)
        layers = model.adapter_layers()
        assert sum(l.rank for l in layers.values()) == budget
        kept = torch.cat([scores[n][l.rank_mask] for n, l in layers.items()])
        dropped = torch.cat([scores[n][~l.rank_mask] for n, l in layers.items()])
        assert torch.equal(kept.sort().values, flat.sort().values[-budget:])  # the top-b over *all* matrices
        assert dropped.numel() == 0 or dropped.max() <= kept.min()
        for n, l in layers.items():
            assert torch.equal(l.lora_E[l.rank_mask], before[n][l.rank_mask])  # kept λ untouched
            assert torch.count_nonzero(l.lora_E[~l.rank_mask]) == 0
    # One matrix with dominant scores takes the whole budget: allocation is global, not per matrix.
    name = "bert.encoder.layer.1.intermediate.dense"
    for factor in ("lora_A", "lora_E", "lora_B"):
        allocator.ipt[f"{name}.{factor}"] *= 1e3
    allocator.mask_to_budget(4)
    assert rank_pattern(model)[name] == 4 and sum(rank_pattern(model).values()) == 4
    # A masked triplet whose score rises is kept again at the next allocation (soft pruning)...
    other = "bert.encoder.layer.0.attention.self.query"
    assert not model.adapter_layers()[other].rank_mask[0]
    allocator.ipt[f"{other}.lora_E"][0] = 1e9
    allocator.mask_to_budget(4)
    assert model.adapter_layers()[other].rank_mask[0]
    # ...but its λ is not restored: it regrows from 0 through the optimizer.
    assert model.adapter_layers()[other].lora_E[0].item() == 0.0


class Record(Callback):
    """Snapshots of the allocator and of Λ after chosen steps (runs after the allocator's own hook)."""

    def __init__(self, steps):
        self.steps, self.seen = steps, {}

    def on_step_end(self, trainer):
        if trainer.step in self.steps:
            allocator = trainer.callbacks[0]
            self.seen[trainer.step] = (copy.deepcopy(allocator.state_dict()),
                                       {n: l.lora_E.detach().clone() for n, l in allocator.layers.items()})


def _train_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 5e-3, "max_steps": T, "batch_size": 8, "progress": False, "log_every": 1, **kw})


T, TI, TF = 16, 2, 5
SCHEDULE = dict(init_r=4, target_r=2, tinit=TI, tfinal=TF, deltaT=2, orth_reg_weight=0.1,
                modules_to_save=["classifier"])


@pytest.fixture(scope="module")
def trained():
    """One uninterrupted AdaLoRA run on the toy task, with snapshots after steps 4, 5, T − t_f and T."""
    model = adalora(**SCHEDULE)
    record = Record({4, 5, T - TF, T})
    trainer = Trainer(model, toy_task(), _train_cfg(), callbacks=[record])
    return model, trainer, trainer.train(), record


def test_training_follows_the_schedule_and_freezes_the_pattern(trained):
    model, trainer, _, record = trained
    allocator = trainer.callbacks[0]
    assert isinstance(allocator, RankAllocator) and [r["step"] for r in allocator.log] == list(range(1, T + 1))
    for row in allocator.log:
        assert row["budget"] == allocator.budget(row["step"])
        if allocator.allocates(row["step"]) or row["step"] <= TI or row["step"] > T - TF:
            assert row["rank"] == row["budget"]  # after a pick (or outside the budgeting phase) rank = b(t)
    assert allocator.log[-1]["rank"] == 12 * 2
    assert any(row["rank"] > row["budget"] for row in allocator.log)  # between picks the rank lags b(t)
    # soft pruning: a λ zeroed at the pick of step 4 is non-zero again after step 5 (no pick at 5)
    masks4, lam5 = record.seen[4][0]["masks"], record.seen[5][1]
    assert any(torch.count_nonzero(lam5[n].view(-1)[~m]) > 0 for n, m in masks4.items())
    # final phase: pattern and scores frozen from T − t_f on, masked λ stay exactly 0
    frozen, end = record.seen[T - TF][0], record.seen[T][0]
    assert all(torch.equal(frozen["masks"][n], end["masks"][n]) for n in frozen["masks"])
    assert all(torch.equal(frozen["ipt"][k], end["ipt"][k]) for k in frozen["ipt"])
    for layer in model.adapter_layers().values():
        assert torch.count_nonzero(layer.lora_E.view(-1)[~layer.rank_mask]) == 0
    pattern = rank_pattern(model)
    assert len(set(pattern.values())) > 1  # the split is learned, not uniform
    assert effective_parameters(model) == sum(
        r * (l.base_layer.in_features + l.base_layer.out_features + 1)
        for r, l in zip(pattern.values(), model.adapter_layers().values()))


def test_checkpoint_resume_is_exact(trained, tmp_path):
    full, ref_trainer, ref, _ = trained
    config = _train_cfg(checkpoint_dir=str(tmp_path), checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):  # interrupted in the budgeting phase, last checkpoint at step 6
        Trainer(adalora(**SCHEDULE), toy_task(), config, callbacks=[Interrupt(8)]).train()
    resumed = adalora(**SCHEDULE)
    trainer = Trainer(resumed, toy_task(), config)
    out = trainer.train(resume=True)
    assert [h["loss"] for h in out.history] == [h["loss"] for h in ref.history]
    ours, theirs = dict(resumed.named_parameters()), dict(full.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in ours.items() if p.requires_grad)
    assert rank_pattern(resumed) == rank_pattern(full)
    a, b = trainer.callbacks[0].state_dict(), ref_trainer.callbacks[0].state_dict()
    assert a["log"] == b["log"] and all(torch.equal(a["ipt"][k], b["ipt"][k]) for k in b["ipt"])


def test_merge_unmerge_and_save_load_with_rank_mask(tmp_path):
    model = adalora(init_r=4, modules_to_save=["classifier"])
    randomise(model)
    allocator = RankAllocator(model, model.adapter_config)
    _set_grads(model, 0)
    allocator.update_importance()
    allocator.mask_to_budget(17)
    before = model(input_ids=X).logits
    w0 = {n: l.base_layer.weight.clone() for n, l in model.adapter_layers().items()}
    for layer in model.adapter_layers().values():
        P, lam, Q = layer.lora_B, layer.lora_E.view(-1), layer.lora_A
        torch.testing.assert_close(layer.delta_weight(), layer.scaling * P @ torch.diag(lam) @ Q)
    with torch.no_grad():
        model.merge()
        torch.testing.assert_close(model(input_ids=X).logits, before, atol=1e-5, rtol=0)
        model.unmerge()
    for n, layer in model.adapter_layers().items():
        torch.testing.assert_close(layer.base_layer.weight, w0[n], atol=1e-6, rtol=0)
    model.save_adapter(tmp_path)
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path)
    assert isinstance(loaded.adapter_config, AdaLoraConfig) and loaded.adapter_config == model.adapter_config
    assert rank_pattern(loaded) == rank_pattern(model) and sum(rank_pattern(loaded).values()) == 17
    assert torch.equal(loaded(input_ids=X).logits, before)


def test_orthogonality_penalty_against_dense_computation():
    model = adalora(init_r=3, orth_reg_weight=0.7)
    randomise(model)
    layers = list(model.adapter_layers().values())
    norms = []
    for layer in layers:
        P, Q = layer.lora_B.detach().double(), layer.lora_A.detach().double()
        r = P.shape[1]
        P, Q = P.tolist(), Q.tolist()
        gram_p = [[sum(row[a] * row[b] for row in P) - float(a == b) for b in range(r)] for a in range(r)]
        gram_q = [[sum(x * y for x, y in zip(Q[a], Q[b])) - float(a == b) for b in range(r)] for a in range(r)]
        norms += [sum(v * v for row in gram_p for v in row), sum(v * v for row in gram_q for v in row)]
    ours = RankAllocator(model, model.adapter_config).orthogonality_penalty().item()
    assert ours == pytest.approx(0.7 * sum(math.sqrt(v) for v in norms) / (2 * len(layers)), rel=1e-5)
    paper = AdaLoraConfig(init_r=3, target_r=2, orth_reg_weight=0.7, orth_reg_form="paper")
    assert RankAllocator(model, paper).orthogonality_penalty().item() == pytest.approx(0.7 * sum(norms), rel=1e-5)
    # zero exactly when P has orthonormal columns and Q orthonormal rows
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.copy_(torch.linalg.qr(torch.randn(layer.lora_B.shape)).Q)
            layer.lora_A.copy_(torch.linalg.qr(torch.randn(layer.lora_A.shape[::-1])).Q.T)
    assert RankAllocator(model, paper).orthogonality_penalty().item() < 1e-10


@pytest.mark.parametrize("masked", [False, True])
def test_peft_loads_what_we_save_rank_state_included(tmp_path, masked):
    from peft import PeftModel
    model = adalora(init_r=4, modules_to_save=["classifier"])
    randomise(model)
    if masked:
        allocator = RankAllocator(model, model.adapter_config)
        _set_grads(model, 0)
        allocator.update_importance()
        allocator.mask_to_budget(17)
    save_peft(model, tmp_path)
    theirs = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(theirs(input_ids=X).logits, model(input_ids=X).logits, atol=1e-5, rtol=0)
    pattern = theirs.peft_config["default"].rank_pattern
    if masked:  # peft holds only the kept triplets, and the pattern that says which
        assert {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()} == rank_pattern(model)
        for name, layer in model.adapter_layers().items():
            assert theirs.base_model.model.get_submodule(name).lora_E["default"].shape == (layer.rank, 1)
    else:
        assert pattern is None
    back = load_peft(tiny_bert(), tmp_path)  # and our own export reads back exactly
    assert rank_pattern(back) == rank_pattern(model)
    same = ("init_r", "target_r", "lora_alpha", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight")
    assert all(getattr(back.adapter_config, k) == getattr(model.adapter_config, k) for k in same)
    torch.testing.assert_close(back(input_ids=X).logits, model(input_ids=X).logits, atol=1e-6, rtol=0)


def test_we_load_what_peft_saves_after_its_allocation(tmp_path):
    from peft import AdaLoraConfig as PeftAdaLoraConfig, get_peft_model
    theirs = get_peft_model(tiny_bert(), PeftAdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, target_modules=TARGETS,
                                                           total_step=10, modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(3)
    pattern = {}
    with torch.no_grad():
        for name, module in theirs.base_model.model.named_modules():
            if hasattr(module, "lora_E") and "default" in getattr(module, "lora_E", {}):
                for t in (module.lora_A["default"], module.lora_B["default"], module.lora_E["default"]):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)
                keep = (torch.rand(4, generator=g) < 0.6).tolist()
                keep[0] = True  # at least one triplet per matrix
                module.lora_E["default"][~torch.tensor(keep)] = 0.0
                pattern[f"{name}.lora_E"] = keep
    theirs.peft_config["default"].rank_pattern = pattern
    theirs.save_pretrained(tmp_path)
    ours = load_peft(tiny_bert(), tmp_path)
    assert rank_pattern(ours) == {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    torch.testing.assert_close(ours(input_ids=X).logits, theirs(input_ids=X).logits, atol=1e-5, rtol=0)
