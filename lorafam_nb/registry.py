"""The registry of methods by name: which module implements each paper, and the configs registered so far.

A method's module registers its config(s) when imported (:func:`register_method`); a config rebuilt from
JSON finds its class here by ``method`` (:func:`import_method`). This list is kept apart from
:mod:`lorafam_nb.core` because the results store fingerprints the code a run executes: adding a method
here changes no other run's number, so it must not change every record's key
(:mod:`lorafam_nb.results` does not follow this module).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import AdapterConfig

__all__ = ["EXTENSION_MODULES", "METHODS", "METHOD_MODULES", "METHOD_PATHS", "import_extensions", "import_method",
           "import_methods", "register_method"]

METHODS: dict[str, type[AdapterConfig]] = {}
# The package's method modules, one per paper, by module path inside the package (the mixtures live
# in ``moe/``); each registers its config(s) when imported. A method's registered name is the last
# part of its path. A new method joins the registry (and everything built from it: loading, the
# overview table, the experiments grid) by adding its module path here.
METHOD_MODULES: tuple[str, ...] = (
    "lora", "lora_plus", "rslora", "vera", "lora_fa", "lora_drop", "adalora", "dora", "delta_lora", "plora",
    "qlora", "moe.mixlora", "moe.loramoe", "moe.mola", "moe.moral", "moe.moelora_cl", "moe.moelora_mt", "moe.moa",
    "moe.pesc", "moe.adamix", "moe.polytropon", "moe.sira", "moe.mole", "moe.mosa", "moe.mlore",
    "moe.moe_llava", "moe.llava_mole", "moe.cond_mixlora", "moe.octavius",
    "moe.mocle",
)
# Modules that register tasks, protocols and models beyond the text core (the vision tasks, the toy
# vision-language model), imported when a name is not found. Kept out of the text core, like the methods, so
# that editing one changes the keys of the runs that use it and no others.
EXTENSION_MODULES: tuple[str, ...] = ("vision_tasks", "vlm")
# Registered method name -> module path ("mixlora" -> "moe.mixlora").
METHOD_PATHS: dict[str, str] = {path.rpartition(".")[2]: path for path in METHOD_MODULES}


def register_method(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make a config findable by its ``method`` name (for loading from JSON)."""
    if not cls.method:
        raise ValueError(f"{cls.__name__} must set the class variable `method`")
    METHODS[cls.method] = cls
    return cls


def import_methods() -> dict[str, type[AdapterConfig]]:
    """Import every method module so that ``METHODS`` is complete; returns it."""
    for module in METHOD_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return METHODS


def import_method(method: str) -> type[AdapterConfig]:
    """The config class registered as ``method``, importing its module if needed."""
    if method not in METHODS and method in METHOD_PATHS:
        importlib.import_module(f"{__package__}.{METHOD_PATHS[method]}")  # a method registers when loaded
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; registered: {sorted(set(METHODS) | set(METHOD_PATHS))}")
    return METHODS[method]


def import_extensions() -> None:
    """Import every extension module (each registers its tasks, protocols and models when imported)."""
    for module in EXTENSION_MODULES:
        importlib.import_module(f"{__package__}.{module}")
