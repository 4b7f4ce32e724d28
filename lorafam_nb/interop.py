"""Adapter interchange in peft's on-disk format.

peft stores ``adapter_config.json`` (its config class's fields, with ``peft_type``) and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module path>.<peft name>``, e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``; the task head listed
in ``modules_to_save`` is stored under its plain path. A method joins the interchange by giving its
config ``peft_type``, ``peft_keys`` (our tensor name -> peft's) and ``to_peft``/``from_peft``.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .core import AdapterConfig, AdapterModel, import_methods

__all__ = ["save_peft", "load_peft"]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _key_maps(model: AdapterModel) -> dict[str, str]:
    """Our adapter_state_dict key -> peft's key."""
    config = model.adapter_config
    out: dict[str, str] = {}
    for key in model.adapter_state_dict():
        module, _, tensor = key.rpartition(".")
        out[key] = PREFIX + (f"{module}.{config.peft_keys[tensor]}" if tensor in config.peft_keys else key)
    return out


def save_peft(model: AdapterModel, directory: str | Path, base_model_name_or_path: str | None = None,
              task_type: str | None = None) -> None:
    """Save ``model``'s adapter so that ``peft.PeftModel.from_pretrained`` can load it."""
    config = model.adapter_config
    if not config.peft_type:
        raise ValueError(f"{config.method} has no peft equivalent to export to")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.adapter_state_dict()
    keys = _key_maps(model)
    save_file({keys[k]: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / PEFT_WEIGHTS))
    targets = sorted(model.adapter_layers())
    peft_config = config.to_peft(targets) | {
        "base_model_name_or_path": base_model_name_or_path,
        "task_type": task_type,
    }
    (directory / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2))


def load_peft(model: nn.Module, directory: str | Path) -> AdapterModel:
    """Inject the adapter that peft saved in ``directory`` into ``model`` and load its weights."""
    directory = Path(directory)
    peft_config = json.loads((directory / PEFT_CONFIG).read_text())
    matches = [cls for cls in import_methods().values() if cls.peft_type and cls.peft_matches(peft_config)]
    if not matches:
        raise ValueError(
            f"{directory}: no lorafam_nb method reads peft_type={peft_config.get('peft_type')!r} with these options"
        )
    config: AdapterConfig = matches[0].from_peft(peft_config)
    try:
        tensors = load_file(str(directory / PEFT_WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {directory / PEFT_WEIGHTS}: {err}") from err
    adapted = AdapterModel(model, config)
    ours = {v: k for k, v in _key_maps(adapted).items()}
    # peft may also save the head under its "modules_to_save" wrapper name; accept both.
    renamed = {ours.get(k.replace(".modules_to_save.default.", "."), k): v for k, v in tensors.items()}
    adapted.load_adapter_state_dict(renamed, source=str(directory))
    return adapted
