"""LoRA-drop: output energy against a dense ‖ΔW x‖², the cumulative-threshold selection, real sharing
(same tensors, summed gradients), the (k+1) parameter count, merge/unmerge and save/load with sharing."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from conftest import toy_task
from lorafam_nb import AdapterModel, LoraConfig, LoRALinear, count_parameters, get_adapter_model, save_peft
from lorafam_nb.core import AdapterConfig
from lorafam_nb.lora_drop import (
    LoraDropConfig,
    SharedLoRALinear,
    SharedPair,
    importance,
    module_type,
    output_energy,
    select_layers,
    stratified_sample,
)
from lorafam_nb.tasks import EncodedTask, collate

TARGETS = ["query", "value", "intermediate.dense"]
X = torch.randint(0, 100, (3, 10))


def bert4(seed: int = 0) -> BertForSequenceClassification:
    """Like conftest.tiny_bert but with four blocks, so that a type has several layers to share across."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def name(block: int, suffix: str) -> str:
    return f"bert.encoder.layer.{block}.{suffix}"


KEPT = [name(1, "attention.self.query"), name(3, "attention.self.query"), name(2, "intermediate.dense")]


def drop_model(seed: int = 0, kept: list[str] = KEPT, **kw) -> AdapterModel:
    config = LoraDropConfig(r=2, lora_alpha=4, target_modules=TARGETS, kept_modules=list(kept),
                            modules_to_save=["classifier"], **kw)
    return get_adapter_model(bert4(seed), config)


def randomise_b(model: AdapterModel, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.normal_(0, 0.3)


def padded_task() -> EncodedTask:
    """toy_task with varying lengths, so batches carry padding that the energy must ignore."""
    task = toy_task(n=10)
    for i, e in enumerate(task.examples):
        keep = 5 + i % 7
        e["input_ids"], e["attention_mask"] = e["input_ids"][:keep], e["attention_mask"][:keep]
    return task


# --- importance ------------------------------------------------------------------------------------

def test_output_energy_matches_dense_delta_w_x_over_real_tokens():
    model = get_adapter_model(bert4(), LoraConfig(r=3, lora_alpha=6, lora_dropout=0.5, target_modules=TARGETS))
    randomise_b(model)
    task = padded_task()
    model.train()  # the scorer must switch dropout off itself and restore the mode
    model.model.bert.pooler.eval()  # ... of every module: mixed modes come back as they were
    got = output_energy(model, task, batch_size=4)
    assert model.training and model.model.bert.encoder.training and not model.model.bert.pooler.training

    # Dense reference: capture each layer's input, apply ΔW = s·B·A as one matrix, sum over real tokens.
    layers = model.adapter_layers()
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = [l.register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0])) for n, l in layers.items()]
    masks = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(task), 4):
            batch = collate(task, task.examples[start:start + 4])
            masks.append(batch["attention_mask"].bool())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    assert any((~m).any() for m in masks)  # there is padding to mask
    for n, layer in layers.items():
        delta_w = (layer.scaling * layer.lora_B @ layer.lora_A).double()
        dense = sum((x.double()[m] @ delta_w.T).pow(2).sum().item() for x, m in zip(inputs[n], masks))
        unmasked = sum((x.double() @ delta_w.T).pow(2).sum().item() for x in inputs[n])
        assert got[n] == pytest.approx(dense, rel=1e-5)
        assert abs(unmasked - dense) > 1e-3 * dense  # padding would have changed the score


def test_importance_is_normalised_within_each_module_type():
    energy = {name(b, s): float(b + 1 + 10 * j) for b in range(4) for j, s in enumerate(["attention.self.query", "output.dense"])}
    imp = importance(energy)
    for s in ["attention.self.query", "output.dense"]:
        names = [name(b, s) for b in range(4)]
        assert sum(imp[n] for n in names) == pytest.approx(1.0)
        total = sum(energy[n] for n in names)
        assert all(imp[n] == pytest.approx(energy[n] / total) for n in names)
    assert module_type(name(3, "output.dense")) == "bert.encoder.layer.*.output.dense"
    with pytest.raises(ValueError, match="zero"):
        importance({name(0, "x"): 0.0, name(1, "x"): 0.0})
    with pytest.raises(ValueError, match="non-negative"):
        importance({name(0, "x"): -1.0})


def test_untrained_probe_cannot_be_scored():
    model = get_adapter_model(bert4(), LoraConfig(r=2, target_modules=["query"]))  # B = 0
    energy = output_energy(model, padded_task())
    assert set(energy.values()) == {0.0}
    with pytest.raises(ValueError, match="train the probe"):
        importance(energy)


# --- selection -------------------------------------------------------------------------------------

def q(*values: float) -> dict[str, float]:
    return {name(b, "attention.self.query"): v for b, v in enumerate(values)}


def test_cumulative_threshold_rule():
    imp = q(0.15, 0.5, 0.05, 0.3)
    # sorted: 0.5, 0.3, 0.15, 0.05 -> cumulative 0.5, 0.8, 0.95, 1.0
    assert select_layers(imp, 0.9) == [name(0, "attention.self.query"), name(1, "attention.self.query"),
                                        name(3, "attention.self.query")]
    assert select_layers(imp, 0.8) == [name(1, "attention.self.query"), name(3, "attention.self.query")]  # ≥, not >
    assert select_layers(imp, 0.81) == select_layers(imp, 0.9)
    assert select_layers(imp, 0.5) == [name(1, "attention.self.query")]
    assert select_layers(imp, 0.1) == [name(1, "attention.self.query")]
    assert select_layers(imp, 1.0) == list(imp)  # T = 1 keeps all
    assert select_layers(q(0.7, 0.3 - 1e-9, 1e-9), 1.0) == list(q(0, 0, 0))  # even a tiny last one
    assert select_layers(q(0.7, 0.3, 0.0), 1.0) == list(q(0, 0))  # a zero output is not needed to reach T


def test_selection_ties_rounding_and_types():
    assert select_layers(q(0.25, 0.25, 0.25, 0.25), 0.5) == list(q(0, 0))  # ties: earlier block first
    assert select_layers(q(0.25, 0.25, 0.25, 0.25), 0.51) == list(q(0, 0, 0))
    # rounding: 0.7 + 0.2 is 0.8999999999999999 in floating point, yet it reaches T = 0.9 of a total of 1.0
    assert select_layers(q(0.2, 0.1, 0.7), 0.9) == list(q(0, 0, 0))[0::2]
    assert select_layers(q(*[1 / 3] * 3), 2 / 3) == list(q(0, 0))
    # raw (unnormalised) scores give the same selection: the threshold is relative to each type's total
    assert select_layers(q(15, 50, 5, 30), 0.9) == select_layers(q(0.15, 0.5, 0.05, 0.3), 0.9)
    # each module type is ranked on its own
    mixed = {name(0, "a"): 0.9, name(1, "a"): 0.1, name(0, "b"): 0.1, name(1, "b"): 0.9}
    assert select_layers(mixed, 0.8) == [name(0, "a"), name(1, "b")]
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="threshold"):
            select_layers(q(0.5, 0.5), bad)
    with pytest.raises(ValueError, match="non-negative"):
        select_layers(q(0.5, -0.5), 0.5)
    assert LoraDropConfig.from_importance(q(0.15, 0.5, 0.05, 0.3), 0.8, r=4).kept_modules == select_layers(
        q(0.15, 0.5, 0.05, 0.3), 0.8)


def test_stratified_sample_keeps_label_shares():
    task = toy_task(n=40)
    task.examples = [e for i, e in enumerate(task.examples) if e["label"] == 1 or i % 8 == 0]  # 20 ones, 5 zeros
    sample = stratified_sample(task, 10, seed=3)
    labels = [e["label"] for e in sample.examples]
    assert len(labels) == 10 and labels.count(1) == 8 and labels.count(0) == 2
    order = [task.examples.index(e) for e in sample.examples]
    assert order == sorted(order)  # original order kept
    assert stratified_sample(task, 10, seed=3).examples == sample.examples
    assert stratified_sample(task, 10, seed=4).examples != sample.examples
    with pytest.raises(ValueError, match="sample size"):
        stratified_sample(task, 26)
    # quotas 20·12/25 = 9.6 and 5·12/25 = 2.4 round to 10 and 2 (largest remainder)
    labels = [e["label"] for e in stratified_sample(task, 12).examples]
    assert labels.count(1) == 10 and labels.count(0) == 2


# --- the shared architecture ---------------------------------------------------------------------------

def test_dropped_layers_share_the_same_tensors_per_type():
    model = drop_model()
    layers = model.adapter_layers()
    for n in KEPT:
        assert type(layers[n]) is LoRALinear
    for suffix in ["attention.self.query", "attention.self.value", "intermediate.dense"]:
        shared = [l for n, l in layers.items() if n.endswith(suffix) and n not in KEPT]
        assert all(isinstance(l, SharedLoRALinear) for l in shared)
        assert all(l.lora_A is shared[0].lora_A and l.lora_B is shared[0].lora_B for l in shared)
    # the model's scope owns one pair per (type, shape): three types here
    pairs = list(model.adapter_scope.entries.values())
    assert len(pairs) == 3 and all(isinstance(p, SharedPair) for p in pairs)
    assert {id(p.lora_A) for p in pairs} == {id(l.lora_A) for l in layers.values() if isinstance(l, SharedLoRALinear)}
    # The same config on a second model: pairs of its own, not the first model's.
    other = drop_model()
    assert not {id(p.lora_A) for p in other.adapter_scope.entries.values()} & {id(p.lora_A) for p in pairs}
    own = [l.lora_A for n, l in layers.items() if n in KEPT]
    assert len({id(p) for p in own}) == len(own)
    # query and value have the same shape but are different types: different shared pairs
    assert layers[name(0, "attention.self.query")].lora_A is not layers[name(0, "attention.self.value")].lora_A


def test_shared_gradient_is_the_sum_over_the_sharing_layers():
    model = drop_model()
    randomise_b(model)
    # the same model with every dropped layer holding an untied copy of the shared values
    untied = copy.deepcopy(model)
    for layer in untied.adapter_layers().values():
        layer.lora_A = nn.Parameter(layer.lora_A.detach().clone())
        layer.lora_B = nn.Parameter(layer.lora_B.detach().clone())
    labels = torch.tensor([0, 1, 1])
    torch.testing.assert_close(model(input_ids=X).logits, untied(input_ids=X).logits, atol=1e-6, rtol=0)
    model(input_ids=X, labels=labels).loss.backward()
    untied(input_ids=X, labels=labels).loss.backward()
    layers, copies = model.adapter_layers(), untied.adapter_layers()
    groups: dict[str, list[str]] = {}
    for n, l in layers.items():
        if isinstance(l, SharedLoRALinear):
            groups.setdefault(l.group, []).append(n)
    assert len(groups) == 3 and all(len(g) >= 2 for g in groups.values())
    for members in groups.values():
        for attr in ("lora_A", "lora_B"):
            total = sum(getattr(copies[n], attr).grad for n in members)
            torch.testing.assert_close(getattr(layers[members[0]], attr).grad, total, atol=1e-6, rtol=1e-5)
    for n in KEPT:
        torch.testing.assert_close(layers[n].lora_B.grad, copies[n].lora_B.grad, atol=1e-6, rtol=1e-5)
    # gradients reach exactly the adapters and the head; W0 stays frozen
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.endswith(("lora_A", "lora_B")) or ".classifier." in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_parameter_count_is_r_times_din_plus_dout_times_k_plus_one_per_type():
    model = drop_model()
    head = sum(p.numel() for p in model.classifier.parameters())
    r, L = 2, 4
    dims = {"attention.self.query": (32, 32), "attention.self.value": (32, 32), "intermediate.dense": (32, 64)}
    expected = 0
    for suffix, (d_in, d_out) in dims.items():
        k = sum(n.endswith(suffix) for n in KEPT)
        expected += r * (d_in + d_out) * (k + 1)
    assert count_parameters(model)[0] == expected + head
    # the optimizer sees each shared tensor once
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected + head
    lora = get_adapter_model(bert4(), LoraConfig(r=2, target_modules=TARGETS, modules_to_save=["classifier"]))
    assert count_parameters(lora)[0] == r * L * sum(a + b for a, b in dims.values()) + head
    # every layer kept: plain LoRA's count; no layer kept: one LoRA per type
    everything = list(lora.adapter_layers())
    assert count_parameters(drop_model(kept=everything))[0] == count_parameters(lora)[0]
    assert count_parameters(drop_model(kept=[]))[0] == r * sum(a + b for a, b in dims.values()) + head


def test_identity_at_init_and_fresh_pairs_per_model():
    base = bert4()
    ref = base(input_ids=X).logits
    config = LoraDropConfig(r=2, target_modules=TARGETS, kept_modules=KEPT)
    first = get_adapter_model(copy.deepcopy(base), config)
    assert torch.equal(first(input_ids=X).logits, ref)
    second = get_adapter_model(copy.deepcopy(base), config)  # the same config object, a second model
    a1 = first.adapter_layers()[name(0, "attention.self.value")].lora_A
    a2 = second.adapter_layers()[name(0, "attention.self.value")].lora_A
    assert a1 is not a2
    assert second.adapter_layers()[name(3, "attention.self.value")].lora_A is a2


def test_merge_and_unmerge_fold_the_shared_delta_into_each_layer():
    model = drop_model()
    randomise_b(model)
    layers = model.adapter_layers()
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in layers.items()}
    with torch.no_grad():
        before = model(input_ids=X).logits
        model.merge()
        merged = model(input_ids=X).logits
    for n, l in layers.items():
        torch.testing.assert_close(l.base_layer.weight, w0[n] + l.scaling * l.lora_B @ l.lora_A, atol=1e-6, rtol=0)
    shared = [n for n, l in layers.items() if isinstance(l, SharedLoRALinear) and n.endswith("value")]
    deltas = [layers[n].base_layer.weight - w0[n] for n in shared]
    assert all(torch.allclose(d, deltas[0], atol=1e-6) for d in deltas)  # the same ΔW on different W0
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=0)
    model.unmerge()
    for n, l in layers.items():
        torch.testing.assert_close(l.base_layer.weight, w0[n], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=X).logits, before, atol=1e-6, rtol=0)


def test_save_load_round_trip_keeps_sharing(tmp_path):
    model = drop_model()
    randomise_b(model)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_A.add_(0.01)
    model.save_adapter(tmp_path)
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "adapter.safetensors")))
    members = [n for n, l in model.adapter_layers().items() if isinstance(l, SharedLoRALinear)]
    assert {f"{n}.lora_A" for n in KEPT} <= keys
    assert sum(k.startswith("adapter_scope.") and k.endswith(".lora_A") for k in keys) == 3  # each pair once
    assert not any(k.startswith(tuple(f"{n}." for n in members)) for k in keys)

    loaded = AdapterModel.from_pretrained(bert4(), tmp_path)  # same frozen base
    assert isinstance(loaded.adapter_config, LoraDropConfig) and loaded.adapter_config.kept_modules == KEPT
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=X).logits, model(input_ids=X).logits)
    layers = loaded.adapter_layers()
    shared_v = [l for n, l in layers.items() if isinstance(l, SharedLoRALinear) and n.endswith("value")]
    assert all(l.lora_A is shared_v[0].lora_A for l in shared_v)
    assert AdapterConfig.from_dict(model.adapter_config.to_dict()) == model.adapter_config


def test_bad_configs_and_no_peft_export(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        LoraDropConfig(r=0)
    with pytest.raises(ValueError, match="kept_modules"):
        LoraDropConfig(kept_modules="bert.encoder.layer.0.attention.self.query")
    with pytest.raises(ValueError, match="twice"):
        LoraDropConfig(kept_modules=[KEPT[0], KEPT[0]])
    with pytest.raises(ValueError, match="no peft equivalent"):
        save_peft(drop_model(), tmp_path)
