"""Scoring protocols: prompts, label tokens, padding invariance, explicit log-likelihoods."""
from __future__ import annotations

import pytest
import torch

from lorafam_nb import LoraConfig, get_adapter_model
from lorafam_nb.data import load_task
from lorafam_nb.models import MODELS, load_model, load_tokenizer
from lorafam_nb.tasks import batch_to, collate, encode, evaluate, score_batch
from lorafam_nb.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def smol():
    torch.manual_seed(0)
    return load_model("smollm2-135m", head="causal_lm").eval(), load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def minilm_tok():
    return load_tokenizer("minilm")


def test_label_token_prompt_and_labels(smol):
    _, tok = smol
    enc = encode(load_task("arc_e", "test", n=4), "arc_e", tok, "label_token")
    for ex, row in zip(enc.examples, load_task("arc_e", "test", n=4)):
        text = tok.decode(ex["input_ids"])
        assert text.endswith("\nAnswer:") and row["question"] in text
        assert [tok.decode([i]) for i in ex["label_ids"]] == [f" {c}" for c in "ABCDE"[: len(row["choices"])]]
    short = encode(load_task("arc_e", "test", n=4), "arc_e", tok, "label_token", max_length=24)
    assert all(len(e["input_ids"]) <= 24 and tok.decode(e["input_ids"]).endswith("\nAnswer:") for e in short.examples)
    boolq = encode(load_task("boolq", "test", n=2), "boolq", tok, "label_token")
    assert [tok.decode([i]) for i in boolq.examples[0]["label_ids"]] == [" true", " false"]
    sst = encode(load_task("sst2", "validation", n=2), "sst2", tok, "label_token")
    assert [tok.decode([i]) for i in sst.examples[0]["label_ids"]] == [" negative", " positive"]


def _scores_one_by_one(model, enc):
    return [score_batch(model, enc, collate(enc, [e]))[1][0] for e in enc.examples]


@pytest.mark.parametrize("protocol", ["label_token", "loglik"])
def test_decoder_scores_do_not_depend_on_padding(smol, protocol):
    model, tok = smol
    enc = encode(load_task("arc_c", "test", n=5), "arc_c", tok, protocol)
    with torch.no_grad():
        batched = score_batch(model, enc, collate(enc, enc.examples))[1]
        alone = _scores_one_by_one(model, enc)
    for row, single in zip(batched, alone):
        n = int(torch.isfinite(single).sum())
        torch.testing.assert_close(row[:n], single[:n], atol=2e-3, rtol=1e-4)
        assert torch.isinf(row[n:]).all()  # padded choices can never win


def test_loglik_equals_explicit_sum(smol):
    model, tok = smol
    enc = encode(load_task("piqa", "test", n=2), "piqa", tok, "loglik")
    with torch.no_grad():
        scores = score_batch(model, enc, collate(enc, enc.examples))[1]
        for i, ex in enumerate(enc.examples):
            for j, cont in enumerate(ex["continuations"]):
                ids = torch.tensor([ex["prompt"] + cont])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                want = sum(logp[len(ex["prompt"]) - 1 + t, tok_id] for t, tok_id in enumerate(cont))
                torch.testing.assert_close(scores[i, j], want, atol=2e-3, rtol=1e-4)


def test_encoder_multiple_choice_pads_choices(minilm_tok):
    ds = load_task("arc_c", "train")
    rows = [r for r in ds if len(r["choices"]) != 4][:1] + [r for r in ds if len(r["choices"]) == 4][:2]
    import datasets
    enc = encode(datasets.Dataset.from_list(rows), "arc_c", minilm_tok, "encoder", max_length=48)
    batch = collate(enc, enc.examples)
    n_max = max(len(r["choices"]) for r in rows)
    assert batch["input_ids"].shape[:2] == (3, n_max)
    assert batch["choice_mask"].sum(1).tolist() == [len(r["choices"]) for r in rows]
    torch.manual_seed(0)
    model = load_model("minilm", head="multiple_choice")
    _, scores = score_batch(model, enc, batch)
    assert torch.isinf(scores[~batch["choice_mask"]]).all() and torch.isfinite(scores[batch["choice_mask"]]).all()


def test_bad_protocol_and_decoder_regression(smol, minilm_tok):
    with pytest.raises(ValueError, match="protocol"):
        encode(load_task("sst2", n=2), "sst2", minilm_tok, "generate")
    with pytest.raises(ValueError, match="regression"):
        encode(load_task("stsb", n=2), "stsb", smol[1], "label_token")


def test_regression_reports_pearson(minilm_tok):
    torch.manual_seed(0)
    model = load_model("minilm", head="sequence_classification", num_labels=1)
    enc = encode(load_task("stsb", "validation", n=40), "stsb", minilm_tok, "encoder", max_length=64)
    result = evaluate(model, enc)
    assert result["n"] == 40 and -1 <= result["pearson"] <= 1 and "accuracy" not in result


def test_label_token_training_learns_the_answer_letter(smol):
    """A few LoRA steps on 8 ARC prompts must raise the gold label's probability (the loss falls)."""
    _, tok = smol
    torch.manual_seed(0)
    model = get_adapter_model(load_model("smollm2-135m", head="causal_lm"),
                              LoraConfig(r=4, lora_alpha=8, target_modules=list(MODELS["smollm2-135m"].all_linear)))
    enc = encode(load_task("arc_e", "train", n=8), "arc_e", tok, "label_token", max_length=96)
    batch = batch_to(collate(enc, enc.examples), "cpu")
    with torch.no_grad():
        before = score_batch(model, enc, batch)[0].item()
    Trainer(model, enc, TrainConfig(lr=3e-3, max_steps=6, batch_size=8, warmup_ratio=0, progress=False)).train()
    with torch.no_grad():
        after = score_batch(model, enc, batch)[0].item()
    assert after < 0.5 * before
