"""The library surface people call from their own code: every peft export checked by peft itself, every
refused export or load changing nothing (not the model, not the folder)."""
from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import text_methods, tiny_bert
from lorafam_nb import AdapterModel, get_adapter_model, load_peft, save_peft
from lorafam_nb.core import CONFIG_FILE, WEIGHTS_FILE, import_methods

X = torch.randint(0, 100, (3, 10))
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
HEAD = ["classifier"]


def _adapted(method: str, knob: int = 2) -> AdapterModel:
    """``method`` on tiny_bert at a small size, every adapter tensor randomised so the update is not zero."""
    cls = import_methods()[method]
    config = cls.sized(knob, TARGETS, steps=40, modules_to_save=HEAD)
    if method == "qlora":
        config = dataclasses.replace(config, compute_dtype="float32")  # bf16 compute would blur the comparison
    if method == "lora_drop":
        config = dataclasses.replace(config, kept_modules=["bert.encoder.layer.0.attention.self.query"])
    model = get_adapter_model(tiny_bert(), config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in model.adapter_state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype) * 0.2)
    return model.eval()


def _side(model: AdapterModel) -> dict[str, torch.Tensor]:
    return {"task_ids": torch.zeros(X.shape[0], dtype=torch.long)} if "task_ids" in model.adapter_config.side_inputs else {}


def _peft_base(model: AdapterModel) -> torch.nn.Module:
    """tiny_bert with the base weights our layers really use (QLoRA's are the dequantised 4-bit ones)."""
    base = tiny_bert()
    with torch.no_grad():
        for name, layer in model.adapter_layers().items():
            weight = layer.base_layer.dequantize() if hasattr(layer.base_layer, "dequantize") else layer.base_layer.weight
            base.get_submodule(name).weight.copy_(weight)
    return base


def _folder(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())} if path.exists() else {}


@pytest.mark.parametrize("method", sorted(text_methods()))
def test_every_export_loads_in_peft_or_is_refused_cleanly(tmp_path, method):
    from peft import PeftModel
    model = _adapted(method)
    out = tmp_path / "export"
    if not model.adapter_config.peft_type:
        earlier = _adapted("lora")
        save_peft(earlier, out)
        before = _folder(out)
        with pytest.raises(ValueError, match="no peft equivalent"):
            save_peft(model, out)
        assert _folder(out) == before  # the earlier export is intact, nothing added
        return
    with torch.no_grad():
        ours = model(input_ids=X, **_side(model)).logits
        save_peft(model, out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            # The tuner model's forward takes side inputs (Poly's task_ids), which PeftModel's does not pass on.
            theirs = PeftModel.from_pretrained(_peft_base(model), out).eval().base_model(input_ids=X, **_side(model)).logits
    assert not torch.allclose(ours, tiny_bert()(input_ids=X).logits, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


# --- a failed call changes nothing --------------------------------------------------------------------

def _snapshot(model: torch.nn.Module) -> tuple[list, dict, dict]:
    modules = [(n, type(m).__name__, id(m)) for n, m in model.named_modules()]
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return modules, values, flags


def _assert_unchanged(model: torch.nn.Module, snapshot: tuple[list, dict, dict]) -> None:
    modules, values, flags = _snapshot(model)
    assert modules == snapshot[0]
    assert flags == snapshot[2]
    assert values.keys() == snapshot[1].keys() and all(torch.equal(values[n], snapshot[1][n]) for n in values)


def _ours(tmp_path: Path, method: str = "lora") -> Path:
    path = tmp_path / f"ours_{method}"
    _adapted(method).save_adapter(path)
    return path


def _peft_lora(tmp_path: Path, **options) -> Path:
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    path = tmp_path / "peft_lora"
    get_peft_model(tiny_bert(), PeftLoraConfig(r=2, target_modules=["query", "value"], **options)).save_pretrained(path)
    return path


def _edit_json(path: Path, name: str, **changes) -> None:
    data = json.loads((path / name).read_text())
    (path / name).write_text(json.dumps(data | changes))


def _bad_inputs(tmp_path: Path):
    """(label, loader, folder, error pattern) for every kind of input that must be refused."""
    cases = []

    def ours(label, edit, match):
        path = _ours(tmp_path / label)
        edit(path)
        cases.append((label, AdapterModel.from_pretrained, path, match))

    def theirs(label, edit, match, **options):
        path = _peft_lora(tmp_path / label, **options)
        edit(path)
        cases.append((label, load_peft, path, match))

    nothing = lambda path: None  # noqa: E731
    ours("bad rank", lambda p: _edit_json(p, CONFIG_FILE, r=0), "positive")
    ours("no target matches", lambda p: _edit_json(p, CONFIG_FILE, target_modules=["nonexistent"]), "nonexistent")
    ours("unknown method", lambda p: _edit_json(p, CONFIG_FILE, method="nolora"), "unknown adapter method")
    ours("wrong shapes", lambda p: _edit_json(p, CONFIG_FILE, r=3), "wrong shapes")
    ours("corrupt weights", lambda p: (p / WEIGHTS_FILE).write_bytes(b"\x00garbage" * 9), "cannot read")
    ours("truncated weights", lambda p: (p / WEIGHTS_FILE).write_bytes((p / WEIGHTS_FILE).read_bytes()[:200]),
         "cannot read")
    ours("empty weights", lambda p: (p / WEIGHTS_FILE).write_bytes(b""), "cannot read")
    ours("corrupt config", lambda p: (p / CONFIG_FILE).write_text("{not json"), "not valid JSON")
    ours("missing config", lambda p: (p / CONFIG_FILE).unlink(), "cannot read")

    def other_method(p: Path) -> None:  # DoRA's weights under LoRA's config: magnitudes nobody expects
        dora = _ours(tmp_path / "other", "dora")
        shutil.copy(dora / WEIGHTS_FILE, p / WEIGHTS_FILE)
    ours("wrong method's file", other_method, "does not fit")
    theirs("peft wrong shapes", lambda p: _edit_json(p, "adapter_config.json", r=4), "wrong shapes")
    theirs("peft no target", lambda p: _edit_json(p, "adapter_config.json", target_modules=["nonexistent"]),
           "nonexistent")
    theirs("peft bad rank", lambda p: _edit_json(p, "adapter_config.json", r=0), "positive")
    theirs("peft unknown type", lambda p: _edit_json(p, "adapter_config.json", peft_type="NOLORA"), "no lorafam_nb")
    theirs("peft corrupt weights", lambda p: (p / "adapter_model.safetensors").write_bytes(b"xx"), "cannot read")
    theirs("peft empty weights", lambda p: (p / "adapter_model.safetensors").write_bytes(b""), "cannot read")
    theirs("peft alpha_pattern", nothing, "alpha_pattern", alpha_pattern={"value": 7})
    theirs("peft rank_pattern", nothing, "rank_pattern", rank_pattern={"value": 3})

    def vera_weights(p: Path) -> None:  # a VeRA file under a LoRA config
        from peft import VeraConfig as PeftVeraConfig, get_peft_model
        get_peft_model(tiny_bert(), PeftVeraConfig(r=2, target_modules=["query", "value"])).save_pretrained(p / "v")
        shutil.copy(p / "v" / "adapter_model.safetensors", p / "adapter_model.safetensors")
    theirs("peft wrong method's file", vera_weights, "does not fit")
    return cases


def test_every_refused_load_leaves_the_model_as_it_was(tmp_path):
    cases = _bad_inputs(tmp_path)
    assert len(cases) == 19
    for label, loader, path, match in cases:
        model = tiny_bert()
        model.classifier.requires_grad_(False)  # a caller's own flags, which the loader must keep as well
        before = _snapshot(model)
        with pytest.raises(ValueError, match=match):
            loader(model, path)
        _assert_unchanged(model, before)


def test_the_good_files_behind_those_cases_do_load(tmp_path):
    """The refusals above are caused by the edits, not by the files they start from."""
    assert isinstance(AdapterModel.from_pretrained(tiny_bert(), _ours(tmp_path)), AdapterModel)
    assert isinstance(load_peft(tiny_bert(), _peft_lora(tmp_path)), AdapterModel)


def test_a_refused_export_keeps_an_earlier_one_byte_for_byte(tmp_path):
    good = _adapted("lora")
    save_peft(good, tmp_path)
    before = _folder(tmp_path)
    adalora = _adapted("adalora")
    adalora.adapter_config.orth_reg_form = "paper"  # a setting peft's AdaLoRA cannot express
    with pytest.raises(ValueError, match="orth_reg_form"):
        save_peft(adalora, tmp_path)
    assert _folder(tmp_path) == before


def test_an_interrupted_write_leaves_no_half_export(tmp_path, monkeypatch):
    good = _adapted("lora")
    save_peft(good, tmp_path)
    before = _folder(tmp_path)
    import lorafam_nb.core as core

    def failing(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(core, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save_peft(_adapted("dora"), tmp_path)
    assert _folder(tmp_path) == before


def test_our_own_save_and_load_round_trip_still_exact(tmp_path):
    model = _adapted("dora")
    model.save_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    back = AdapterModel.from_pretrained(tiny_bert(), tmp_path)
    assert torch.equal(back(input_ids=X).logits, model(input_ids=X).logits)
    assert load_file(str(tmp_path / WEIGHTS_FILE)).keys() == model.adapter_state_dict().keys()
