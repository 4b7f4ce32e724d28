"""AdaMix (Wang et al., EMNLP 2022): stochastic routing (one random copy per forward pass, per layer and
projection) against the explicit adapter, the weight-averaged adapter of inference against the mean of the
weights, inference cost of one adapter (matmul FLOPs counted), single-copy evaluation, the symmetric KL
against the authors' form, the consistency term's second forward pass through the trainer's hook, gradients,
routing counts, save/load, and the grid's budgets on MiniLM and SmolLM2."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_bert, toy_task
from lorafam_nb import get_adapter_model, grid
from lorafam_nb.core import AdapterModel
from lorafam_nb.models import load_model
from lorafam_nb.moe.adamix import AdaMixConfig, AdaMixFFN, adamix_layers, symmetric_kl, use_module
from lorafam_nb.trainer import TrainConfig, Trainer
from test_mixlora import tiny_llama
from test_pesc import meta_model

HEAD = ["classifier"]
X = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(3))
MASK = torch.ones_like(X)
MASK[1, 6:] = 0


def perturb(model: AdapterModel, seed: int = 1) -> AdapterModel:
    """Every copy's weights and biases visibly different (the init's N(0, 0.02²) is too close to the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adamix_layers(model).values():
            for p in layer.adapters.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def _layer(share_up: bool = True, arch: str = "bert", **kw) -> AdaMixFFN:
    base = (tiny_bert() if arch == "bert" else tiny_llama()).double()
    model = perturb(get_adapter_model(base, AdaMixConfig(**{"num_modules": 4, "adapter_dim": 3,
                                                            "share_up": share_up} | kw)))
    return next(iter(adamix_layers(model).values()))


def adapter_by_hand(layer: AdaMixFFN, h: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """h + W^up_j GELU(W^down_i h + b^down_i) + b^up_j for the FFN output h."""
    a = layer.adapters
    return h + F.gelu(h @ a.down[i].T + a.down_bias[i]) @ a.up[j].T + a.up_bias[j]


@pytest.mark.parametrize("share_up", [True, False])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_training_pass_is_one_random_adapter(share_up, arch):
    layer = _layer(share_up, arch).train()
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    h = layer.base_layer(x)
    for _ in range(12):
        out = layer(x)
        chosen = layer.context.routes[-1].selected
        assert chosen.shape == (15, 1) and (chosen == chosen[0]).all()  # one copy for the whole pass
        i = int(chosen[0])
        candidates = [adapter_by_hand(layer, h, i, j) for j in range(layer.adapters.num_up)]
        assert any(torch.allclose(out, c, atol=1e-12, rtol=0) for c in candidates)
    assert layer.adapters.num_up == (1 if share_up else 4) and layer.adapters.num_down == 4


def test_routing_is_uniform_per_pass_and_independent_across_layers():
    model = get_adapter_model(tiny_bert(), AdaMixConfig(num_modules=4, adapter_dim=3, modules_to_save=HEAD)).train()
    torch.manual_seed(0)
    picks = []
    for _ in range(400):
        model(input_ids=X, attention_mask=MASK)
        picks.append([int(r.selected[0]) for r in model.context.routes])
    picks = torch.tensor(picks)  # (passes, layers)
    for layer in range(2):
        counts = torch.bincount(picks[:, layer], minlength=4)
        assert counts.min() > 60 and counts.max() < 140, counts  # 100 expected each
    assert (picks[:, 0] != picks[:, 1]).float().mean() > 0.5  # layers draw separately
    stats = model.recorder.layers
    assert all(s.n_tokens == 400 * int(MASK.sum()) and int(s.tokens.sum()) == s.n_tokens for s in stats.values())


def test_averaged_adapter_is_the_mean_of_the_weights():
    layer = _layer(share_up=False).eval()
    a, M = layer.adapters, 4
    w_down, b_down, w_up, b_up = a.average()
    torch.testing.assert_close(w_down, sum(a.down[i] for i in range(M)) / M, atol=1e-15, rtol=0)
    torch.testing.assert_close(b_down, sum(a.down_bias[i] for i in range(M)) / M, atol=1e-15, rtol=0)
    torch.testing.assert_close(w_up, sum(a.up[i] for i in range(M)) / M, atol=1e-15, rtol=0)
    torch.testing.assert_close(b_up, sum(a.up_bias[i] for i in range(M)) / M, atol=1e-15, rtol=0)
    x = torch.randn(6, 32, dtype=torch.float64)
    h = layer.base_layer(x)
    merged = h + F.gelu(h @ w_down.T + b_down) @ w_up.T + b_up
    torch.testing.assert_close(layer(x), merged, atol=1e-12, rtol=0)
    # an average of weights, not of outputs: the adapter is nonlinear
    outputs = sum(adapter_by_hand(layer, h, i, i) for i in range(M)) / M
    assert (layer(x) - outputs).abs().max() > 1e-3


def test_single_module_evaluation_and_restore():
    model = perturb(get_adapter_model(tiny_bert().double(), AdaMixConfig(num_modules=3, adapter_dim=3,
                                                                         modules_to_save=HEAD))).eval()
    layers = adamix_layers(model)
    x = torch.randn(5, 32, dtype=torch.float64)
    for m in range(3):
        with use_module(model, m):
            for layer in layers.values():
                h = layer.base_layer(x)
                torch.testing.assert_close(layer(x), adapter_by_hand(layer, h, m, 0), atol=1e-12, rtol=0)
    assert all(layer.inference == "average" for layer in layers.values())
    for bad in (3, -1, "mean"):
        with pytest.raises(ValueError, match="module index"):
            with use_module(model, bad):
                pass


def _matmul_flops(module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("share_up", [True, False])
def test_inference_costs_one_adapter(share_up):
    """Matmul FLOPs of an evaluation forward: the FFN plus one adapter (2·T·d·b each way), the same as a
    single adapter (M = 1); a training pass too. Eight copies cost no more than one."""
    x = torch.randn(2, 7, 32)
    T, d, b = 14, 32, 6
    single = next(iter(adamix_layers(get_adapter_model(tiny_bert(), AdaMixConfig(num_modules=1, adapter_dim=b)))
                       .values())).eval()
    mix = next(iter(adamix_layers(get_adapter_model(tiny_bert(), AdaMixConfig(num_modules=8, adapter_dim=b,
                                                                              share_up=share_up))).values())).eval()
    ffn = _matmul_flops(mix.base_layer, x)
    assert _matmul_flops(single, x) == _matmul_flops(mix, x) == ffn + 2 * (2 * T * d * b)
    mix.train()
    assert _matmul_flops(mix, x) == ffn + 2 * (2 * T * d * b)


def test_init_independent_normal_copies_zero_biases():
    model = get_adapter_model(tiny_bert(), AdaMixConfig(num_modules=4, adapter_dim=8, share_up=False))
    for layer in adamix_layers(model).values():
        a = layer.adapters
        assert float(a.down_bias.detach().abs().sum()) == 0 and float(a.up_bias.detach().abs().sum()) == 0
        assert not torch.equal(a.down[0], a.down[1]) and not torch.equal(a.up[0], a.up[1])
        assert 0.01 < float(a.down.detach().std()) < 0.03 and 0.01 < float(a.up.detach().std()) < 0.03


def test_symmetric_kl_equals_the_authors_form_and_detaches_targets():
    a = torch.randn(5, 3, requires_grad=True)
    b = torch.randn(5, 3, requires_grad=True)
    # the released symmetric_KL_loss: kl_div(log_softmax(input), softmax(target).detach(), batchmean), both ways, ½
    want = 0.5 * (F.kl_div(F.log_softmax(a, -1), F.softmax(b, -1).detach(), reduction="batchmean")
                  + F.kl_div(F.log_softmax(b, -1), F.softmax(a, -1).detach(), reduction="batchmean"))
    got = symmetric_kl(a, b)
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)
    (grad_a,) = torch.autograd.grad(got, a, retain_graph=True)
    (want_a,) = torch.autograd.grad(0.5 * F.kl_div(F.log_softmax(a, -1), F.softmax(b, -1).detach(),
                                                   reduction="batchmean"), a)
    torch.testing.assert_close(grad_a, want_a, atol=1e-7, rtol=1e-6)
    # absent choices (score −inf) drop out: the value is that of the rows' real choices alone
    masked_a = torch.cat([a.detach(), torch.full((5, 1), float("-inf"))], 1)
    masked_b = torch.cat([b.detach(), torch.full((5, 1), float("-inf"))], 1)
    torch.testing.assert_close(symmetric_kl(masked_a, masked_b), want.detach(), atol=1e-7, rtol=1e-6)
    assert symmetric_kl(a, a).abs() < 1e-7
    # A regression head: unit-variance Gaussians, (a − b)² / 2 per row; each pass gets half the pull.
    ra, rb = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    term = symmetric_kl(ra, rb)
    torch.testing.assert_close(term, ((ra - rb) ** 2).mean().detach() / 2)
    term.backward()
    torch.testing.assert_close(ra.grad, (ra - rb).detach() / (2 * 4))  # d/da of ¼ mean over 4 rows
    torch.testing.assert_close(rb.grad, (rb - ra).detach() / (2 * 4))
    with pytest.raises(ValueError, match="regression outputs"):
        symmetric_kl(torch.randn(4), torch.randn(5))


def test_consistency_runs_a_second_pass_through_the_trainer_hook():
    model = perturb(get_adapter_model(tiny_bert(), AdaMixConfig(num_modules=4, adapter_dim=3, modules_to_save=HEAD)))
    logits = []
    model.model.register_forward_hook(lambda m, args, out: logits.append(out.logits.detach()) if m.training else None)
    trainer = Trainer(model, toy_task(16), TrainConfig(lr=1e-3, max_steps=2, batch_size=8, device="cpu",
                                                       progress=False, log_every=1, max_grad_norm=None))
    history = trainer.train().history
    assert len(logits) == 4  # two passes per step
    for step, row in enumerate(history):
        first, second = logits[2 * step], logits[2 * step + 1]
        assert not torch.equal(first, second)  # fresh random copies in the second pass
        assert row["consistency"] == pytest.approx(float(symmetric_kl(first, second)), rel=1e-5)
    logits.clear()
    plain = get_adapter_model(tiny_bert(), AdaMixConfig(num_modules=4, adapter_dim=3, consistency_weight=0.0,
                                                        modules_to_save=HEAD))
    plain.model.register_forward_hook(lambda m, args, out: logits.append(out.logits) if m.training else None)
    history = Trainer(plain, toy_task(16), TrainConfig(max_steps=2, batch_size=8, device="cpu", progress=False,
                                                       log_every=1)).train().history
    assert len(logits) == 2 and "consistency" not in history[0]


def test_gradients_reach_the_chosen_copy_and_the_head_only():
    model = perturb(get_adapter_model(tiny_bert(), AdaMixConfig(num_modules=4, adapter_dim=3, modules_to_save=HEAD)))
    model.train()
    out = model(input_ids=X, attention_mask=MASK, labels=torch.tensor([0, 1, 0, 1]))
    out.loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"model.{site}.adapters.{t}" for site in adamix_layers(model)
                for t in ("down", "down_bias", "up", "up_bias")}
    assert got == trainable == expected | {n for n in trainable if ".classifier." in n}
    for route, layer in zip(model.context.routes, adamix_layers(model).values()):
        i = int(route.selected[0])
        touched = [m for m in range(4) if layer.adapters.down.grad[m].abs().sum() > 0]
        assert touched == [i]  # one pass trains one copy


def test_save_load_round_trip(tmp_path):
    model = perturb(get_adapter_model(tiny_bert(), AdaMixConfig(num_modules=3, adapter_dim=5, modules_to_save=HEAD)))
    model.eval().save_adapter(tmp_path)
    loaded = AdapterModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert isinstance(loaded.adapter_config, AdaMixConfig)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=X, attention_mask=MASK).logits,
                                   model(input_ids=X, attention_mask=MASK).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge()


@pytest.mark.parametrize("bad, message", [
    (dict(num_modules=0), "num_modules"), (dict(adapter_dim=0), "adapter_dim"),
    (dict(share_up=True, share_down=True), "single adapter"), (dict(consistency_weight=-1.0), "non-negative"),
    (dict(init_std=0.0), "init_std"),
])
def test_invalid_configs_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        AdaMixConfig(**bad)


def test_minilm_counts_match_the_spec():
    """b = 16, M = 4, shared up: 31,168 per layer, 187,008 trained; one merged adapter per layer, 76,128."""
    cfg = AdaMixConfig(num_modules=4, adapter_dim=16)
    base = load_model("minilm", head="multiple_choice")
    sites = cfg.sites(base)
    assert cfg.model_parameters(sites) == 187_008 and cfg.inference_parameters(sites) == 76_128
    adapted = get_adapter_model(base, cfg)
    assert sum(p.numel() for layer in adapted.adapter_layers().values() for p in layer.parameters()
               if p.requires_grad) == 187_008


@pytest.mark.parametrize("name, b, count", [
    ("minilm", 29, 6 * (4 * (384 * 29 + 29) + 29 * 384 + 384)),
    ("smollm2-135m", 28, 30 * (4 * (576 * 28 + 28) + 28 * 576 + 576)),
])
def test_budget_matches_lora_r8(name, b, count):
    base, targets, target = meta_model(name)
    budget = grid.match_budget(AdaMixConfig, AdaMixConfig(target_modules=targets).sites(base), target)
    assert budget.matched and budget.values == {"adapter_dim": b} and budget.closed_form == count
    adapted = get_adapter_model(base, AdaMixConfig.sized(budget.values, targets))
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == count
