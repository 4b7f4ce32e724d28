"""The toy vision-language model: its forward against the language model run by hand, padding that changes
nothing, the masks its batches carry, the tasks, and the cached stages."""
from __future__ import annotations

import pytest
import torch

from lorafam_nb import vlm
from lorafam_nb.data import load_task, task_info
from lorafam_nb.experiment import RunSpec, encode_task
from lorafam_nb.models import load_model, load_tokenizer, model_spec
from lorafam_nb.tasks import collate, score_batch
from lorafam_nb.vision_models import pixel_values


@pytest.fixture(scope="module")
def raw() -> vlm.ToyVLM:
    return load_model("toy-vlm-raw", head="causal_lm").eval()


@pytest.fixture(scope="module")
def color_task():
    spec = RunSpec(model="toy-vlm-raw", task="vlm_color", max_length=64, task_ids=vlm.VLM_TASKS)
    return encode_task(spec, "train", 6)


def test_image_features_are_dinov2_patch_tokens_pooled_two_by_two():
    images = [load_task("vlm_fashion", "train", n=2)[i].image for i in range(2)]
    feats = vlm.image_features(images)
    dino = load_model("dinov2-small", head="base").eval()
    with torch.no_grad():
        tokens = dino(pixel_values=torch.cat([pixel_values(im[None], 112) for im in images])).last_hidden_state
    grid = tokens[:, 1:].reshape(2, 8, 8, 384)  # row-major patches
    want = grid.reshape(2, 4, 2, 4, 2, 384).mean((2, 4)).reshape(2, 16, 384)
    torch.testing.assert_close(feats, want, atol=1e-5, rtol=1e-5)


def test_forward_is_the_language_model_on_image_then_text_embeddings(raw, color_task):
    e = color_task.examples[0]
    ids = torch.tensor([e["input_ids"]])
    with torch.no_grad():
        got = raw(image_features=e["image_features"][None], input_ids=ids,
                  attention_mask=torch.ones(1, 16 + ids.shape[1], dtype=torch.long)).logits
        embeds = torch.cat([raw.projector(e["image_features"][None]), raw.llm.get_input_embeddings()(ids)], 1)
        want = raw.llm(inputs_embeds=embeds).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_left_padding_changes_no_score(raw, color_task):
    """Prompts of different lengths in one batch score as they do alone: the positions skip the padding."""
    lengths = [len(e["input_ids"]) for e in color_task.examples]
    assert len(set(lengths)) > 1
    with torch.no_grad():
        together = score_batch(raw, color_task, collate(color_task, color_task.examples))[1]
        alone = torch.cat([score_batch(raw, color_task, collate(color_task, [e]))[1] for e in color_task.examples])
    torch.testing.assert_close(together, alone, atol=2e-4, rtol=1e-4)


def test_batches_mark_image_tokens_and_instruction_tokens(color_task):
    batch = collate(color_task, color_task.examples)
    B, T = batch["input_ids"].shape
    assert batch["attention_mask"].shape == batch["image_mask"].shape == (B, 16 + T)
    assert batch["image_mask"][:, :16].all() and not batch["image_mask"][:, 16:].any()
    tokenizer = load_tokenizer("toy-vlm-raw")
    rows = load_task("vlm_color", "train", n=6)
    for b, row in enumerate(rows):
        marked = batch["input_ids"][b][batch["instruction_mask"][b].bool()]
        assert tokenizer.decode(marked) == row.instruction  # exactly the instruction, never the padding
        assert batch["attention_mask"][b, 16:].sum() == len(color_task.examples[b]["input_ids"])
    assert batch["task_ids"].tolist() == [vlm.VLM_TASKS.index("vlm_color")] * B
    assert ((0 <= batch["cluster_ids"]) & (batch["cluster_ids"] < vlm.NUM_CLUSTERS)).all()


def test_tasks_ask_their_own_questions():
    sizes = {t: len(load_task(t, "train")) for t in vlm.VLM_TASKS}
    assert sizes == {"vlm_shape": 1279, "vlm_color": 1038, "vlm_yesno": 5615, "vlm_fashion": 1000, "vlm_textile": 135}
    assert all(task_info(t).protocol == "vlm" for t in (*vlm.VLM_TASKS, "vlm_caption"))
    yesno = load_task("vlm_yesno", "test")
    assert {r.options for r in yesno} == {("yes", "no")} and all(r.instruction.startswith(("is", "does")) for r in yesno)
    shape = load_task("vlm_shape", "test")
    assert all("shape" in r.instruction or "what is the" in r.instruction for r in shape)
    # The same question can be asked of different images: instructions cluster, answers do not leak into them.
    assert all(r.options[r.label] not in r.instruction for r in load_task("vlm_color", "test") if "color" in r.instruction)


def test_the_models_are_registered_with_the_language_models_linears():
    for name in ("toy-vlm-raw", "toy-vlm-aligned", "toy-vlm", "toy-vlm-smoke"):
        spec = model_spec(name)
        assert spec.architecture == "vlm" and "q_proj" in spec.all_linear
    assert model_spec("toy-vlm-raw").head_modules == ("projector",) and model_spec("toy-vlm").head_modules == ()


def test_stages_train_once_then_load_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(vlm, "_cache_root", lambda: tmp_path)
    recipe = vlm.RECIPES["toy-vlm-smoke"]  # the registered models hold their recipe: use theirs
    calls = []
    real_run = __import__("lorafam_nb.experiment", fromlist=["run"]).run

    def counted(spec, *args, **kwargs):
        calls.append(spec.model)
        return real_run(spec, *args, **kwargs)
    monkeypatch.setattr("lorafam_nb.experiment.run", counted)
    first = vlm._aligned_projector(recipe)
    report = vlm.stage_report(recipe.name)
    assert calls == ["toy-vlm-raw", "toy-vlm-smoke-aligned"]
    # Stage 1 trains the projector alone: LLaVA-1.5's 384 → 576 → 576 MLP.
    assert report["stage1"]["row"]["trainable"] == 384 * 576 + 576 + 576 * 576 + 576
    assert report["stage2"]["row"]["task"] == "+".join(vlm.VLM_TASKS)
    again = vlm._aligned_projector(recipe)
    assert calls == ["toy-vlm-raw", "toy-vlm-smoke-aligned"]  # read back, not retrained
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], vlm.projector().state_dict()[k]) for k in first)  # it trained
    # The tuned model is the raw one with stage 2's LoRA merged: its linears moved, its embeddings did not.
    tuned, base = load_model("toy-vlm-smoke", head="causal_lm"), load_model("toy-vlm-raw", head="causal_lm")
    q = "llm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(tuned.state_dict()[q], base.state_dict()[q])
    assert torch.equal(tuned.llm.get_input_embeddings().weight, base.llm.get_input_embeddings().weight)
    stage_2_tensors = vlm._instruction_tuned(recipe)  # the projector trained on in stage 2
    assert torch.equal(tuned.projector[0].weight, stage_2_tensors["projector.0.weight"])
    assert not torch.equal(stage_2_tensors["projector.0.weight"], again["0.weight"])
