"""Adapter interchange in peft's on-disk format.

peft stores ``adapter_config.json`` (its config class's fields, with ``peft_type``) and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module path>.<peft name>``, e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``; the task head listed
in ``modules_to_save`` is stored under its plain path, and tensors that several layers share (VeRA's
projections) under ``base_model.<name>``. A method joins the interchange by giving its config
``peft_type``, ``peft_keys`` (our tensor name -> peft's), ``peft_scope_keys`` for shared tensors,
``to_peft``/``from_peft``, and, where peft lays the tensors out otherwise, ``peft_state``/``state_from_peft``.

Both directions validate everything before they change anything: a refused export writes no file (an
earlier export in the folder survives), and a refused load leaves the caller's model as it was.
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from .core import AdapterConfig, AdapterModel, import_methods, read_json, read_tensors, write_adapter_files

__all__ = ["load_peft", "save_peft"]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
SCOPE = "adapter_scope."


def _peft_key(config: AdapterConfig, key: str) -> str:
    """peft's name of our adapter_state_dict ``key``."""
    if key.startswith(SCOPE):
        shared = key[len(SCOPE):]
        if shared not in config.peft_scope_keys:
            raise ValueError(f"{config.method}: peft has no name for the shared tensor {shared!r}")
        return "base_model." + config.peft_scope_keys[shared]
    module, _, tensor = key.rpartition(".")
    return PREFIX + (f"{module}.{config.peft_keys[tensor]}" if tensor in config.peft_keys else key)


def save_peft(model: AdapterModel, directory: str | Path, base_model_name_or_path: str | None = None,
              task_type: str | None = None) -> None:
    """Save ``model``'s adapter so that ``peft.PeftModel.from_pretrained`` can load it. A method peft
    lacks (or options it cannot express) is refused before anything is written."""
    config = model.adapter_config
    if not config.peft_type:
        raise ValueError(f"{config.method} has no peft equivalent to export to; nothing was written")
    state, extra = config.peft_state(model.adapter_state_dict())
    tensors = {_peft_key(config, k): v.detach().contiguous().cpu() for k, v in state.items()}
    peft_config = config.to_peft(sorted(model.adapter_layers())) | extra | {
        "base_model_name_or_path": base_model_name_or_path, "task_type": task_type}
    write_adapter_files(directory, {PEFT_WEIGHTS: tensors, PEFT_CONFIG: peft_config})


def _config_from_peft(peft_config: dict, source: Path) -> AdapterConfig:
    matches = [cls for cls in import_methods().values() if cls.peft_type and cls.peft_matches(peft_config)]
    if not matches:
        raise ValueError(f"{source}: no lorafam_nb method reads peft_type={peft_config.get('peft_type')!r} "
                         "with these options")
    try:
        return matches[0].from_peft(peft_config)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{source}: peft config lacks or mistypes a field ({err})") from err


def load_peft(model: nn.Module, directory: str | Path) -> AdapterModel:
    """Inject the adapter that peft saved in ``directory`` into ``model`` and load its weights. The config
    and the tensors are read and checked first; whatever does not fit leaves ``model`` as it was."""
    directory = Path(directory)
    peft_config = read_json(directory / PEFT_CONFIG)
    config = _config_from_peft(peft_config, directory)
    tensors = read_tensors(directory / PEFT_WEIGHTS)
    # peft may also save the head under its "modules_to_save" wrapper name; accept both.
    tensors = {k.replace(".modules_to_save.default.", "."): v for k, v in tensors.items()}

    def ours(adapted: AdapterModel) -> dict[str, Tensor]:
        names = {_peft_key(config, k): k for k in adapted.adapter_state_dict() if not k.startswith(SCOPE)}
        names |= {"base_model." + peft: SCOPE + key for key, peft in config.peft_scope_keys.items()}
        return config.state_from_peft({names.get(k, k): v for k, v in tensors.items()}, peft_config)

    return AdapterModel.inject_and_load(model, config, ours, str(directory))
