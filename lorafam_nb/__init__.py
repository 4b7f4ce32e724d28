"""lorafam_nb — the LoRA family and mixtures of LoRA experts, one file per paper on a shared core.

Quick start::

    import lorafam_nb as lf
    model = lf.models.load_model("minilm", head="sequence_classification", num_labels=2)
    model = lf.get_adapter_model(model, lf.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"]))
    model.print_trainable_parameters()

Submodules that pull in heavier dependencies (``data``, ``models``, ``tasks``, ``trainer``, ``bench``)
and the method modules with their configs (``lf.DoraConfig``, ``lf.vera``, ``lf.MixLoraConfig``) load on
first access;
``lf.import_methods()`` loads every method.
"""
import warnings
from importlib import import_module
from typing import Any

# transformers and datasets import tqdm.auto, which warns inside Jupyter when ipywidgets is absent;
# our progress bars are plain text, so the warning is noise (and it prints a local path).
warnings.filterwarnings("ignore", message="IProgress not found")

from .core import (
    METHOD_MODULES,
    METHODS,
    AdapterConfig,
    AdapterContext,
    AdapterLayer,
    AdapterModel,
    MethodCard,
    count_parameters,
    get_adapter_model,
    import_methods,
    print_trainable_parameters,
    register_method,
)
from .interop import load_peft, save_peft
from .lora import LoraConfig, LoRALinear

__version__ = "0.1.0"

_LAZY = {"data", "models", "tasks", "trainer", "bench", "notebook", "experiment", "multitask", "moe",
         "vision_tasks", "vlm", "modal_grid",
         *(m for m in METHOD_MODULES if "." not in m)}
_LAZY_NAMES = {"Trainer": "trainer", "TrainConfig": "trainer", "Callback": "trainer", "load_task": "data",
               "load_model": "models", "load_tokenizer": "models", "encode": "tasks", "evaluate": "tasks",
               # Each method's config, loaded with its module on first use.
               "LoraPlusConfig": "lora_plus", "RsLoraConfig": "rslora", "VeraConfig": "vera",
               "LoraFAConfig": "lora_fa", "LoraDropConfig": "lora_drop", "AdaLoraConfig": "adalora",
               "DoraConfig": "dora", "DeltaLoraConfig": "delta_lora", "PLoraConfig": "plora",
               "QLoraConfig": "qlora", "MixLoraConfig": "moe.mixlora", "LoraMoEConfig": "moe.loramoe",
               "MoLAConfig": "moe.mola", "MoRALConfig": "moe.moral", "MoELoRAConfig": "moe.moelora_cl",
               "MOELoRAConfig": "moe.moelora_mt", "MoAConfig": "moe.moa", "PESCConfig": "moe.pesc",
               "AdaMixConfig": "moe.adamix", "PolytroponConfig": "moe.polytropon", "SiRAConfig": "moe.sira",
               "MoLEConfig": "moe.mole", "MosaConfig": "moe.mosa",
               "MLoREConfig": "moe.mlore", "MoELLaVAConfig": "moe.moe_llava",
               "LLaVAMoLEConfig": "moe.llava_mole", "CondMixLoraConfig": "moe.cond_mixlora",
               "OctaviusConfig": "moe.octavius", "MoCLEConfig": "moe.mocle"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METHODS", "METHOD_MODULES", "AdapterConfig", "AdapterContext", "AdapterLayer", "AdapterModel", "LoraConfig", "LoRALinear",
    "count_parameters", "get_adapter_model", "import_methods", "load_peft", "print_trainable_parameters", "register_method",
    "MethodCard", "save_peft", *sorted(_LAZY_NAMES),
]
