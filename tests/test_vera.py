"""VeRA: the equation, init, one shared frozen pair per model, parity with peft, counts, merge, save/load."""
from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import tiny_bert, toy_task
from lorafam_nb import AdapterModel, count_parameters, get_adapter_model, load_peft, save_peft
from lorafam_nb.trainer import TrainConfig, Trainer
from lorafam_nb.vera import VeraConfig, VeRALinear, VeraProjections, shared_projections

X = torch.randint(0, 100, (3, 10))
# tiny_bert: q, v, attention.output.dense are 32 -> 32, intermediate.dense 32 -> 64, output.dense 64 -> 32,
# so the shared pair must cover D_in = D_out = 64 and each layer uses a different slice.
MIXED = ["query", "value", "intermediate.dense", "output.dense"]


def vera(**kw) -> VeraConfig:
    return VeraConfig(**{"r": 4, "target_modules": MIXED, "modules_to_save": ["classifier"], **kw})


def randomise_vectors(model: AdapterModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.vera_lambda_b.copy_(torch.randn(layer.vera_lambda_b.shape, generator=g) * 0.5)
            layer.vera_lambda_d.copy_(torch.randn(layer.vera_lambda_d.shape, generator=g))


def test_layer_matches_dense_equation():
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    layer = VeRALinear(base, r=6)
    with torch.no_grad():
        layer.vera_lambda_b.normal_()
        layer.vera_lambda_d.normal_()
    A, B = layer.vera_projections.vera_A, layer.vera_projections.vera_B
    assert A.shape == (6, 20) and B.shape == (12, 6)  # alone, the layer's pair has its own shape
    dense_delta = torch.diag(layer.vera_lambda_b) @ B @ torch.diag(layer.vera_lambda_d) @ A  # Λ_b B Λ_d A
    x = torch.randn(5, 7, 20)
    torch.testing.assert_close(layer(x), x @ (base.weight + dense_delta).T + base.bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), dense_delta, atol=1e-6, rtol=1e-6)
    # dropout acts on the branch input only: with b = 0 the branch adds nothing, dropout or not
    dropped = VeRALinear(base, r=6, vera_dropout=0.5).train()
    torch.testing.assert_close(dropped(x), base(x))


def test_init_b_zero_d_constant_kaiming_uniform_pair(bert):
    ref = bert(input_ids=X).logits
    model = get_adapter_model(bert, vera(r=64, d_initial=0.25))
    for layer in model.adapter_layers().values():
        assert torch.count_nonzero(layer.vera_lambda_b) == 0
        assert torch.equal(layer.vera_lambda_d, torch.full((64,), 0.25))
    pair = shared_projections(model)
    for m, fan_in in ((pair.vera_A, 64), (pair.vera_B, 64)):  # A: r × D_in, B: D_out × r (fan_in = r)
        bound = math.sqrt(6 / fan_in)  # Kaiming uniform, ReLU gain √2
        assert 0.95 * bound < m.abs().max() <= bound
        assert abs(m.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert torch.equal(model(input_ids=X).logits, ref)  # b = 0: the pretrained model exactly


def test_one_pair_per_model_sized_to_largest_and_sliced(bert):
    cfg = vera(r=5)
    model = get_adapter_model(bert, cfg)
    layers = model.adapter_layers()
    pair = shared_projections(model)
    assert all(layer.vera_projections is pair for layer in layers.values())
    assert len([m for m in model.modules() if isinstance(m, VeraProjections)]) == 1
    assert pair.vera_A.shape == (5, 64) and pair.vera_B.shape == (64, 5)
    inter = layers["bert.encoder.layer.0.intermediate.dense"]  # 32 -> 64
    A, B = inter.projections()
    assert torch.equal(A, pair.vera_A[:, :32]) and torch.equal(B, pair.vera_B[:64])
    assert A.data_ptr() == pair.vera_A.data_ptr()  # a view of the shared tensor, not a copy
    assert list(model.adapter_scope.entries.values()) == [pair]  # the model's scope owns the one pair
    # The same config object on a second model: a pair of its own (same seed, same values), not the first's.
    other = get_adapter_model(tiny_bert(), cfg)
    assert shared_projections(other) is not pair and torch.equal(shared_projections(other).vera_A, pair.vera_A)
    assert not torch.equal(shared_projections(get_adapter_model(tiny_bert(), vera(r=5, projection_prng_key=1))).vera_A,
                           pair.vera_A)


def test_sharing_survives_dtype_moves_and_deepcopy(bert):
    model = get_adapter_model(bert, vera())
    randomise_vectors(model)
    ref = model(input_ids=X).logits.double()
    model.double()
    pair = shared_projections(model)  # still exactly one pair after .double()
    assert pair.vera_A.dtype == torch.float64
    torch.testing.assert_close(model(input_ids=X).logits, ref, atol=1e-5, rtol=0)
    clone = copy.deepcopy(model)
    assert shared_projections(clone) is not pair
    with torch.no_grad():
        shared_projections(clone).vera_A.zero_()  # the copy's pair is its own ...
    assert torch.count_nonzero(pair.vera_A) > 0  # ... the original is untouched
    assert not torch.equal(clone(input_ids=X).logits, model(input_ids=X).logits)


def _pair_with_peft(**kw):
    from peft import VeraConfig as PeftVeraConfig, get_peft_model
    base = tiny_bert()
    ours = get_adapter_model(copy.deepcopy(base), VeraConfig(r=4, target_modules=MIXED, **kw))
    theirs = get_peft_model(copy.deepcopy(base), PeftVeraConfig(r=4, target_modules=MIXED, **kw))
    randomise_vectors(ours)
    for name, layer in ours.adapter_layers().items():
        p = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            p.vera_lambda_b["default"].copy_(layer.vera_lambda_b)
            p.vera_lambda_d["default"].copy_(layer.vera_lambda_d)
    return ours, theirs


def test_parity_with_peft_frozen_pair_forward_and_gradients():
    ours, theirs = _pair_with_peft()
    # peft draws its pair with the same recipe and seed: the frozen matrices are bit-identical.
    assert torch.equal(shared_projections(ours).vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(shared_projections(ours).vera_B, theirs.base_model.vera_B["default"])
    labels = torch.tensor([0, 1, 1])
    out_ours, out_theirs = ours(input_ids=X, labels=labels), theirs(input_ids=X, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-6, rtol=0)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    assert len(ours.adapter_layers()) == 2 * 5  # query, value, intermediate, attention output, output
    for name, layer in ours.adapter_layers().items():
        p = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.vera_lambda_b.grad, p.vera_lambda_b["default"].grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.vera_lambda_d.grad, p.vera_lambda_d["default"].grad, atol=1e-6, rtol=0)
        assert layer.base_layer.weight.grad is None
    # merged weights agree too (peft forms (b ⊙ B)(d ⊙ A) itself)
    for name, layer in ours.adapter_layers().items():
        peft_delta = theirs.base_model.model.get_submodule(name).get_delta_weight("default")
        torch.testing.assert_close(layer.delta_weight(), peft_delta, atol=1e-6, rtol=0)


def test_gradients_reach_exactly_b_d_and_head(bert):
    model = get_adapter_model(bert, vera())
    model(input_ids=X, labels=torch.tensor([0, 1, 0])).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # at init (b = 0) only b moves: ∂L/∂d carries a factor b
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("vera_lambda_b"))
    assert all(torch.count_nonzero(g) == 0 for n, g in grads.items() if n.endswith("vera_lambda_d"))
    model.zero_grad()
    randomise_vectors(model)
    model(input_ids=X, labels=torch.tensor([0, 1, 0])).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("vera_lambda_b", "vera_lambda_d")) or ".classifier." in n for n in got)
    assert not any(b.requires_grad for b in model.buffers())


def test_parameter_count_d_out_plus_r_per_layer(bert):
    cfg = vera(r=7)
    model = get_adapter_model(bert, cfg)
    layers = model.adapter_layers()
    adapter = sum(cfg.num_parameters(l.base_layer.in_features, l.base_layer.out_features) for l in layers.values())
    assert adapter == 2 * ((32 + 7) * 3 + (64 + 7) + (32 + 7))
    trainable, total = count_parameters(model)
    assert trainable == adapter + 32 * 2 + 2  # + the classifier; the frozen pair is not a parameter
    assert total == count_parameters(tiny_bert())[1] + adapter
    pair = shared_projections(model)
    assert pair.vera_A.numel() + pair.vera_B.numel() == 7 * (64 + 64)  # r (D_in + D_out), stored once


def test_merge_unmerge_exact(bert):
    model = get_adapter_model(bert, vera())
    randomise_vectors(model)
    w0 = {n: l.base_layer.weight.clone() for n, l in model.adapter_layers().items()}
    out = model(input_ids=X).logits
    model.merge()
    for n, l in model.adapter_layers().items():
        torch.testing.assert_close(l.base_layer.weight, w0[n] + l.delta_weight(), atol=0, rtol=0)
    torch.testing.assert_close(model(input_ids=X).logits, out, atol=1e-5, rtol=0)
    model.unmerge()
    for n, l in model.adapter_layers().items():
        torch.testing.assert_close(l.base_layer.weight, w0[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(model(input_ids=X).logits, out, atol=1e-6, rtol=0)


def test_save_load_round_trip_includes_the_frozen_pair(tmp_path):
    model = get_adapter_model(tiny_bert(), vera(projection_prng_key=3))
    randomise_vectors(model)
    ref = model(input_ids=X).logits
    model.save_adapter(tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    assert sum(k.endswith(".vera_A") for k in saved) == 1 and sum(k.endswith(".vera_B") for k in saved) == 1
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["projection_prng_key"] == 3
    # Loading into a model whose pair came from another seed: the saved pair replaces it, in every layer.
    other = get_adapter_model(tiny_bert(), vera(projection_prng_key=9))
    other.load_adapter(tmp_path / "a")
    assert torch.equal(shared_projections(other).vera_A, shared_projections(model).vera_A)
    assert torch.equal(other(input_ids=X).logits, ref)
    again = AdapterModel.from_pretrained(tiny_bert(), tmp_path / "a")
    assert torch.equal(again(input_ids=X).logits, ref)
    # save_projection=False: only b, d (+ head) are stored, and the reload redraws the pair from the seed.
    lean = get_adapter_model(tiny_bert(), vera(save_projection=False))
    randomise_vectors(lean)
    lean.save_adapter(tmp_path / "b")
    assert not any(k.endswith((".vera_A", ".vera_B")) for k in load_file(str(tmp_path / "b" / "adapter.safetensors")))
    assert torch.equal(AdapterModel.from_pretrained(tiny_bert(), tmp_path / "b")(input_ids=X).logits,
                       lean(input_ids=X).logits)


@pytest.mark.parametrize("save_projection", [False, True])
def test_peft_interchange_both_ways(tmp_path, save_projection):
    """peft's default saves the pair (base_model.vera_A / vera_B); without it both sides redraw it from the seed."""
    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft warns when it redraws the pair from the seed
        ours, theirs = _pair_with_peft(save_projection=save_projection)
        reference = ours(input_ids=X).logits
        save_peft(ours, tmp_path / "ours")
        saved = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
        assert ("base_model.vera_A" in saved) == save_projection
        loaded_by_peft = PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours")
        torch.testing.assert_close(loaded_by_peft(input_ids=X).logits, reference, atol=1e-6, rtol=0)
        theirs.save_pretrained(tmp_path / "theirs")
    loaded_by_us = load_peft(tiny_bert(), tmp_path / "theirs")
    assert isinstance(loaded_by_us.adapter_config, VeraConfig)
    assert loaded_by_us.adapter_config.save_projection == save_projection
    torch.testing.assert_close(loaded_by_us(input_ids=X).logits, theirs(input_ids=X).logits, atol=1e-6, rtol=0)


def test_a_saved_pair_is_read_not_redrawn(tmp_path):
    """A peft file whose pair differs from the seed's draw loads that pair (and peft reads ours the same way)."""
    from peft import PeftModel
    ours, _ = _pair_with_peft(save_projection=True)
    with torch.no_grad():
        shared_projections(ours).vera_A.mul_(2.0)
    save_peft(ours, tmp_path / "ours")
    back = load_peft(tiny_bert(), tmp_path / "ours")
    assert torch.equal(shared_projections(back).vera_A, shared_projections(ours).vera_A)
    torch.testing.assert_close(PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours")(input_ids=X).logits,
                               ours(input_ids=X).logits, atol=1e-6, rtol=0)


def test_training_moves_only_the_vectors():
    model = get_adapter_model(tiny_bert(), vera(r=16))
    pair = shared_projections(model)
    A0, B0 = pair.vera_A.clone(), pair.vera_B.clone()
    d0 = {n: l.vera_lambda_d.detach().clone() for n, l in model.adapter_layers().items()}
    result = Trainer(model, toy_task(48), TrainConfig(lr=1e-2, max_steps=6, batch_size=8, progress=False,
                                                      device="cpu", log_every=1)).train()
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert torch.equal(pair.vera_A, A0) and torch.equal(pair.vera_B, B0)
    layers = model.adapter_layers()
    assert all(torch.count_nonzero(l.vera_lambda_b) > 0 for l in layers.values())
    assert any(not torch.equal(l.vera_lambda_d, d0[n]) for n, l in layers.items())


def test_head_lr_gives_the_head_its_own_learning_rate(bert):
    model = get_adapter_model(bert, vera(head_lr=3e-3))
    names = {id(p): n for n, p in model.named_parameters()}
    trainer = Trainer(model, toy_task(16), TrainConfig(lr=1e-2, max_steps=1, progress=False, device="cpu"))
    vectors, head = trainer.optimizer.param_groups
    assert trainer.scheduler.base_lrs == [1e-2, 3e-3]
    assert len(vectors["params"]) == 2 * len(model.adapter_layers())
    assert all(names[id(p)].endswith(("vera_lambda_b", "vera_lambda_d")) for p in vectors["params"])
    assert {names[id(p)] for p in head["params"]} == {"model.classifier.weight", "model.classifier.bias"}
    default = get_adapter_model(tiny_bert(), vera())  # head_lr=None: one group at the trainer's lr
    assert len(default.adapter_config.param_groups(default, 1e-2, 0.0)) == 1


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="positive"):
        VeraConfig(r=0)
    with pytest.raises(ValueError, match="positive"):
        VeRALinear(nn.Linear(4, 4), r=-1)
    with pytest.raises(ValueError, match="vera_dropout"):
        VeraConfig(vera_dropout=1.0)
    with pytest.raises(ValueError, match="d_initial"):
        VeraConfig(d_initial=0.0)
    with pytest.raises(ValueError, match="head_lr"):
        VeraConfig(head_lr=0.0)
    with pytest.raises(ValueError, match="matched no Linear"):
        get_adapter_model(tiny_bert(), VeraConfig(target_modules=["q_proj"]))
