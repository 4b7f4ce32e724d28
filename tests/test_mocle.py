"""MoCLE: the layer against the sheet's equation by hand (per-sample route, universal mix, λ(g) = g or g²),
the frozen model at init, gradients (exactly the trained parameters; none through the argmax), one route per
sample, the offline clustering (k-means on blobs, MiniLM on real instructions), the random-routing arm,
the closed-form count, save/load, the data pipeline's ``cluster_id``, invalid input, the registration and
the card's formula against the linears of a real Llama."""
from __future__ import annotations

import time

import pytest
import torch

from conftest import tiny_bert, toy_task
from lorafam_nb import get_adapter_model
from lorafam_nb.core import AdapterModel, count_parameters
from lorafam_nb.moe.mocle import (RANDOM_KEY, ClusterRouter, MoCLEConfig, MoCLELinear, assign_clusters,
                                  embed_instructions, fit_instruction_clusters, instruction_encoder,
                                  random_cluster_ids)
from lorafam_nb.tasks import collate, score_batch

X = torch.randint(1, 100, (4, 9), generator=torch.Generator().manual_seed(3))
MASK = torch.ones_like(X)
MASK[1, 6:] = 0
CLUSTERS = torch.tensor([0, 2, 2, 1])
LABELS = torch.tensor([0, 1, 0, 1])
HEAD = ["classifier"]
SIX = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _config(**kwargs) -> MoCLEConfig:
    return MoCLEConfig(**{"r": 2, "lora_alpha": 4.0, "num_experts": 3, "num_clusters": 3, "cluster_dim": 8,
                          "temperature": 0.5, "lora_dropout": 0.0, "target_modules": SIX, "modules_to_save": HEAD,
                          **kwargs})


def _model(std: float = 0.3, seed: int = 1, **kwargs) -> AdapterModel:
    """MoCLE on every linear of a tiny BERT with every B (experts and universal) moved off zero."""
    model = get_adapter_model(tiny_bert(), _config(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            for lora in (layer.experts, layer.universal):
                if lora is not None:
                    lora.lora_B.add_(std * torch.randn(lora.lora_B.shape, generator=g))
    return model


def _first(model: AdapterModel) -> MoCLELinear:
    return next(iter(model.adapter_layers().values()))


@pytest.mark.parametrize("gate_power", [1, 2])
@pytest.mark.parametrize("universal", [True, False])
def test_layer_equals_the_equation_by_hand(gate_power, universal):
    """y = W0 x + b0 + λ(g_n) s B_e* A_e* x + (1 − g_n) s B_u A_u x, e* = argmax softmax((W_g T[c_n] + b_g)/τ),
    g_n the top probability (not renormalised), per sample, float64, eval (no noise)."""
    model = _model(gate_power=gate_power, universal=universal).double().eval()
    layer = _first(model)
    with torch.no_grad():
        layer.router.weight.mul_(3)  # spread the gate so that clusters pick different experts
    x = torch.randn(4, 5, layer.base_layer.in_features, dtype=torch.float64)
    ids = torch.tensor([2, 0, 1, 2])
    layer.context.start_forward({"cluster_ids": ids}, None)
    T, W_g, b_g = layer.router.T, layer.router.W_g, layer.router.bias
    s = 4.0 / 2
    want = x @ layer.base_layer.weight.T + layer.base_layer.bias
    picked = set()
    for n, c in enumerate(ids):
        p = torch.softmax((W_g @ T[c] + b_g) / 0.5, -1)
        e = int(p.argmax())
        picked.add(e)
        g = p[e]
        A, B = layer.experts.lora_A[e], layer.experts.lora_B[e]
        want[n] = want[n] + g ** gate_power * s * (x[n] @ A.T @ B.T)
        if universal:
            A_u, B_u = layer.universal.lora_A[0], layer.universal.lora_B[0]
            want[n] = want[n] + (1 - g) * s * (x[n] @ A_u.T @ B_u.T)
    assert len(picked) > 1  # the check covers more than one expert
    torch.testing.assert_close(layer(x), want, atol=1e-10, rtol=1e-10)
    assert (layer.universal is None) == (not universal)


def test_sparse_path_equals_dense():
    model = _model().eval()
    sparse = _model(path="sparse").eval()
    with torch.no_grad():
        a = model(input_ids=X, attention_mask=MASK, cluster_ids=CLUSTERS).logits
        b = sparse(input_ids=X, attention_mask=MASK, cluster_ids=CLUSTERS).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_zero_B_is_the_frozen_model():
    """B = 0 for every expert and the universal LoRA: the adapted model is the base model, for any cluster ids,
    in training mode too (noise and dropout only touch branches that are zero)."""
    base = tiny_bert()
    model = get_adapter_model(tiny_bert(), _config(lora_dropout=0.1, noise_std=1.0)).eval()
    with torch.no_grad():
        want = base(input_ids=X, attention_mask=MASK).logits
        for ids in (CLUSTERS, torch.tensor([2, 2, 2, 2])):
            torch.testing.assert_close(model(input_ids=X, attention_mask=MASK, cluster_ids=ids).logits, want,
                                       atol=0, rtol=0)
        # the adapter layers in training mode (BERT's own dropout stays off): router noise and LoRA dropout live
        for layer in model.adapter_layers().values():
            layer.train()
        torch.testing.assert_close(model(input_ids=X, attention_mask=MASK, cluster_ids=CLUSTERS).logits, want,
                                   atol=0, rtol=0)


def test_every_token_of_a_sample_takes_its_samples_route():
    """In eval mode each row's update is one fixed weight ΔW_c of its cluster: every token of row n gets
    x ΔW_{c_n}ᵀ, whatever the other tokens are; the recorded per-token selections are constant per row."""
    model = _model().eval()
    layer = _first(model)
    x = torch.randn(4, 7, layer.base_layer.in_features)
    layer.context.start_forward({"cluster_ids": CLUSTERS}, None)
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
        for n, c in enumerate(CLUSTERS.tolist()):
            torch.testing.assert_close(delta[n], x[n] @ layer.cluster_delta(c).T, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model(input_ids=X, attention_mask=MASK, cluster_ids=CLUSTERS)
    for route in model.context.routes:
        sel = route.selected[:, 0]
        for row in route.rows.unique():
            assert sel[route.rows == row].unique().numel() == 1
    # training mode (noise on): still one expert per sample, not per token
    model.train()
    model(input_ids=X, attention_mask=MASK, cluster_ids=CLUSTERS)
    for route in model.context.routes:
        for row in route.rows.unique():
            assert route.selected[route.rows == row, 0].unique().numel() == 1


def test_noise_only_in_training():
    router = ClusterRouter(3, 4, 8, temperature=0.5, noise_std=0.5)
    ids = torch.tensor([0, 1, 2, 0])
    router.eval()
    a, b = router(ids), router(ids)
    assert torch.equal(a.logits, b.logits)
    torch.testing.assert_close(a.logits, router.T[ids] @ router.W_g.T + router.bias)
    router.train()
    torch.manual_seed(0)
    c = router(ids)
    assert not torch.allclose(c.logits, a.logits)
    torch.testing.assert_close((c.logits - a.logits).std(), torch.tensor(0.5), atol=0.35, rtol=0)
    assert c.weights.shape == (4, 1) and torch.equal(c.weights, c.probs.gather(1, c.selected))
    assert (c.weights >= 1 / 4).all() and (c.weights < 1).all()  # top-1 of E probabilities, not renormalised


def test_gradients_reach_exactly_the_trained_parameters():
    model = _model().train()
    model(input_ids=X, attention_mask=MASK, cluster_ids=torch.tensor([0, 2, 2, 0]), labels=LABELS).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"model.{s}.{t}" for s in model.adapter_layers() for t in
                ("experts.lora_A", "experts.lora_B", "universal.lora_A", "universal.lora_B",
                 "router.task_embedding.weight", "router.weight", "router.bias")}
    expected |= {n for n, _ in model.named_parameters() if ".classifier." in n}
    assert trainable == expected
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == expected  # W0 (frozen) gets nothing; every trained tensor gets something
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    for layer in model.adapter_layers().values():
        # T: only the rows of the clusters in the batch (0 and 2)
        rows = layer.router.task_embedding.weight.grad.abs().sum(1)
        assert rows[0] > 0 and rows[2] > 0 and rows[1] == 0
        # experts: only the ones some sample was routed to
        used = set(layer.last_route["experts"].tolist())
        for e in range(3):
            assert (layer.experts.lora_B.grad[e].abs().sum() > 0) == (e in used)


def test_the_argmax_gets_no_gradient():
    """The router learns only through the value g (expert vs universal). Make the universal LoRA equal to every
    expert: then y does not depend on g, so T, W_g and b_g must get exactly zero gradient — a straight-through
    or soft (probability-weighted) selection would still send them some."""
    model = _model().train()
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.universal.lora_A.copy_(layer.experts.lora_A[:1])
            layer.universal.lora_B.copy_(layer.experts.lora_B[:1])
            layer.experts.lora_A.copy_(layer.universal.lora_A.expand_as(layer.experts.lora_A))
            layer.experts.lora_B.copy_(layer.universal.lora_B.expand_as(layer.experts.lora_B))
    model(input_ids=X, attention_mask=MASK, cluster_ids=CLUSTERS, labels=LABELS).loss.backward()
    for layer in model.adapter_layers().values():
        assert layer.experts.lora_B.grad.abs().sum() > 0
        for p in layer.router.parameters():
            assert p.grad is None or p.grad.abs().max() < 1e-9
    # with distinct experts the same routers do learn
    model = _model().train()
    model(input_ids=X, attention_mask=MASK, cluster_ids=CLUSTERS, labels=LABELS).loss.backward()
    assert all(layer.router.weight.grad.abs().sum() > 0 for layer in model.adapter_layers().values())


def test_kmeans_recovers_separated_blobs_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centers = 10 * torch.randn(4, 16, generator=g)
    truth = torch.arange(4).repeat_interleave(25)
    points = centers[truth] + 0.3 * torch.randn(100, 16, generator=g)
    points = points[torch.randperm(100, generator=g)]
    truth = assign_clusters(points, centers)  # the blob each (shuffled) point came from
    fit = fit_instruction_clusters(points, 4, seed=3)
    # the partition is the blobs', up to the names of the clusters
    pairs = set(zip(fit.train_ids.tolist(), truth.tolist()))
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4
    for j in range(4):
        member = fit.train_ids == j
        torch.testing.assert_close(fit.centroids[j].double(), points[member].double().mean(0), atol=1e-5, rtol=0)
    assert torch.equal(assign_clusters(points, fit.centroids), fit.train_ids)
    again = fit_instruction_clusters(points, 4, seed=3)
    assert torch.equal(again.centroids, fit.centroids) and torch.equal(again.train_ids, fit.train_ids)


def test_kmeans_is_deterministic_under_a_seed_on_ambiguous_data():
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(1))
    a, b = fit_instruction_clusters(x, 5, seed=7), fit_instruction_clusters(x, 5, seed=7)
    assert torch.equal(a.train_ids, b.train_ids)
    others = [fit_instruction_clusters(x, 5, seed=s).centroids for s in range(4)]
    assert any(not torch.equal(o, others[0]) for o in others[1:])  # the seed matters on data without clear blobs
    with pytest.raises(ValueError, match="at least 5"):
        fit_instruction_clusters(x[:3], 5)


FAMILIES = {
    "digit": ["What digit is shown in this image?", "Which number is written here?",
              "Tell me the digit in the picture.", "Name the number in the image."],
    "translate": ["Translate this sentence into French.", "Give the French translation of the text.",
                  "Render the following passage in French.", "How do you say this in French?"],
    "caption": ["Write a short caption describing the photo.", "Describe the picture in one sentence.",
                "Give a brief description of this image.", "Caption this photograph."],
}


def test_minilm_clusters_real_instructions_stably():
    """The shipped all-MiniLM-L6-v2, mean-pooled and normalised, separates three instruction families; refitting
    with the seed and re-embedding give the same ids; unseen paraphrases land in their family's cluster."""
    start = time.perf_counter()
    texts = [t for family in FAMILIES.values() for t in family]
    u = embed_instructions(texts)
    assert u.shape == (12, 384) and torch.allclose(u.norm(dim=1), torch.ones(12), atol=1e-5)
    fit = fit_instruction_clusters(texts, 3, seed=0)
    assert torch.equal(fit.train_ids, fit_instruction_clusters(texts, 3, seed=0).train_ids)
    family_of = fit.train_ids.view(3, 4)
    assert all(row.unique().numel() == 1 for row in family_of)  # each family is one cluster
    assert family_of[:, 0].unique().numel() == 3  # and the families are different clusters
    assert torch.equal(fit.assign(texts), fit.train_ids)
    new = ["Which digit does the image show?", "Translate the text below to French.", "Describe this photo briefly."]
    assert fit(new).tolist() == family_of[:, 0].tolist()
    # batching does not change an embedding (padding is left out of the mean)
    torch.testing.assert_close(embed_instructions(texts[:1]), u[:1], atol=1e-5, rtol=0)
    assert time.perf_counter() - start < 10


def test_embedding_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from lorafam_nb.models import model_path

    instruction_encoder()
    texts = FAMILIES["caption"][:2] + FAMILIES["digit"][:1]
    want = st.SentenceTransformer(model_path("minilm"), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(embed_instructions(texts), want.cpu(), atol=1e-5, rtol=1e-4)


def test_random_routing_ignores_the_cluster_ids_and_differs_from_cluster_routing():
    cluster = _model().eval()
    rand = _model(routing="random").eval()
    source = rand.adapter_scope.entries[RANDOM_KEY]
    assert source.state_dict() == {} and not any(k.startswith(f"adapter_scope.{RANDOM_KEY}") for k in rand.adapter_state_dict())
    with torch.no_grad():
        outs = []
        for ids in (CLUSTERS, torch.tensor([1, 1, 0, 0]), None):
            source.reseed()
            kwargs = {} if ids is None else {"cluster_ids": ids}
            outs.append(rand(input_ids=X, attention_mask=MASK, **kwargs).logits)
            drawn = [layer.last_route["cluster_ids"] for layer in rand.adapter_layers().values()]
            assert all(torch.equal(d, drawn[0]) for d in drawn)  # one id per sample for the whole model
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
        # a fresh draw every forward: the same batch gets other routes next time
        draws = set()
        for _ in range(4):
            rand(input_ids=X, attention_mask=MASK)
            draws.add(tuple(_first(rand).last_route["cluster_ids"].tolist()))
        assert len(draws) > 1
        # same weights as the cluster arm (same seeds), but other routes and outputs
        source.reseed()
        r = rand(input_ids=X, attention_mask=MASK, cluster_ids=CLUSTERS).logits
        c = cluster(input_ids=X, attention_mask=MASK, cluster_ids=CLUSTERS).logits
        assert torch.equal(_first(cluster).last_route["cluster_ids"], CLUSTERS)
        assert not torch.equal(_first(rand).last_route["cluster_ids"], CLUSTERS)
        assert (r - c).abs().max() > 1e-4
        # the seed decides the draw
        other = _model(routing="random", routing_seed=5).eval()
        other(input_ids=X, attention_mask=MASK)
        source.reseed()
        rand(input_ids=X, attention_mask=MASK)
        assert not torch.equal(_first(other).last_route["cluster_ids"], _first(rand).last_route["cluster_ids"])
    with pytest.raises(ValueError, match="random"):
        _first(rand).cluster_delta(0)


def test_parameter_count_is_the_closed_form():
    for kwargs in ({}, {"universal": False}, {"num_experts": 5, "num_clusters": 7}):
        model = get_adapter_model(tiny_bert(), _config(**kwargs))
        cfg = model.adapter_config
        head = sum(p.numel() for n, p in model.named_parameters() if ".classifier." in n)
        per_layer = [cfg.num_parameters(layer.base_layer.in_features, layer.base_layer.out_features)
                     for layer in model.adapter_layers().values()]
        assert count_parameters(model)[0] - head == sum(per_layer)
        for layer, n in zip(model.adapter_layers().values(), per_layer):
            assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == n
    # the sheet's Vicuna-7B figure: q, v of 32 layers, E = 4, r = 8, C = 64: 353,796 per 4096 × 4096 linear
    paper = MoCLEConfig()
    assert (paper.r, paper.lora_alpha, paper.num_experts, paper.num_clusters, paper.temperature,
            paper.noise_std, paper.lora_dropout) == (8, 32.0, 4, 64, 0.05, 0.1, 0.1)
    assert paper.num_parameters(4096, 4096) == 353_796
    assert 64 * paper.num_parameters(4096, 4096) == 22_642_944


def test_save_and_load_round_trip(tmp_path):
    model = _model().eval()
    model.save_adapter(tmp_path)
    fresh = get_adapter_model(tiny_bert(), _config())  # the config class passed explicitly (not registered yet)
    fresh.load_adapter(tmp_path)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=X, attention_mask=MASK, cluster_ids=CLUSTERS).logits,
                           model(input_ids=X, attention_mask=MASK, cluster_ids=CLUSTERS).logits)
    keys = model.adapter_state_dict()
    assert any(k.endswith("router.task_embedding.weight") for k in keys)
    assert any(k.endswith("universal.lora_B") for k in keys)


def test_cluster_ids_from_the_data_pipeline_and_a_training_step():
    """An example's ``cluster_id`` becomes the ``cluster_ids`` forward kwarg (tasks.SIDE_FIELDS); a few steps
    of training lower the loss."""
    task = toy_task(16)
    for i, e in enumerate(task.examples):
        e["cluster_id"] = i % 3
    batch = collate(task, task.examples)
    assert torch.equal(batch["cluster_ids"], torch.arange(16) % 3)
    torch.manual_seed(0)
    model = get_adapter_model(tiny_bert(), _config(lora_dropout=0.1)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = float(score_batch(model, task, batch)[0])
        model.train()
        return loss
    before = eval_loss()
    for _ in range(10):
        loss, _ = score_batch(model, task, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < before - 0.02
    del batch["cluster_ids"]
    with pytest.raises(ValueError, match="cluster_ids"):
        score_batch(model, task, batch)


def test_invalid_input_raises_clearly():
    model = _model().eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match="cluster_ids=..."):
            model(input_ids=X, attention_mask=MASK)
        with pytest.raises(ValueError, match=r"\[0, 3\).*\[3\]"):
            model(input_ids=X, cluster_ids=torch.tensor([0, 1, 3, 0]))
        with pytest.raises(ValueError, match=r"\[-1\]"):
            model(input_ids=X, cluster_ids=torch.tensor([0, -1, 2, 0]))
        with pytest.raises(ValueError, match="4 rows"):
            model(input_ids=X, cluster_ids=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="integer"):
            model(input_ids=X, cluster_ids=torch.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="cluster must be"):
        _first(model).cluster_delta(3)
    for bad, match in (({"temperature": 0.0}, "temperature"), ({"gate_power": 3}, "gate_power"),
                       ({"routing": "oracle"}, "routing"), ({"num_clusters": 0}, "num_clusters"),
                       ({"noise_std": -0.1}, "noise_std"), ({"lora_dropout": 1.0}, "lora_dropout"),
                       ({"r": 0}, "r must"), ({"path": "fast"}, "path")):
        with pytest.raises(ValueError, match=match):
            _config(**bad)
    with pytest.raises(TypeError):
        embed_instructions("one string, not a list")


def test_random_cluster_ids_are_a_seeded_partition():
    a, b = random_cluster_ids(50, 4, seed=1), random_cluster_ids(50, 4, seed=1)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 4 and a.unique().numel() == 4
    assert not torch.equal(a, random_cluster_ids(50, 4, seed=2))


def test_registered_as_a_multimodal_method():
    from lorafam_nb.registry import METHODS

    assert METHODS["mocle"] is MoCLEConfig
    assert MoCLEConfig.modality == "multimodal" and "card" in MoCLEConfig.__dict__
    assert MoCLEConfig.card.bibkey == "gou2023mocle" and MoCLEConfig.card.chapter == "mocle"


@pytest.mark.parametrize(("experts", "r", "clusters", "cluster_dim"), [(4, 4, 8, 384), (3, 2, 5, 16)])
def test_card_formula_equals_the_trainable_count_of_real_layers(experts, r, clusters, cluster_dim):
    """The card's (E+1) r (d_in + d_out) + C d_T + E (d_T + 1), read as the book's overview reads card formulas,
    against what every linear of a tiny Llama (seven linears of four shapes) really trains."""
    from test_overview import latex_to_python
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    config = MoCLEConfig(r=r, num_experts=experts, num_clusters=clusters, cluster_dim=cluster_dim,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_adapter_model(llama, config)
    layers = model.adapter_layers()
    assert len(layers) == 7
    shapes = set()
    for layer in layers.values():
        d_in, d_out = layer.base_layer.in_features, layer.base_layer.out_features
        shapes.add((d_in, d_out))
        card = eval(latex_to_python(MoCLEConfig.card.params), {"__builtins__": {}},  # noqa: S307 (our own string)
                    {"E": experts, "r": r, "C": clusters, "d_T": cluster_dim, "d_in": d_in, "d_out": d_out})
        trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        assert trainable == card == config.num_parameters(d_in, d_out)
    assert len(shapes) == 4  # q/o, k/v, gate/up, down
    assert count_parameters(model)[0] == sum(sum(p.numel() for p in l.parameters() if p.requires_grad)
                                             for l in layers.values())
