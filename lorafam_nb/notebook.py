"""Small helpers the chapter notebooks share: quiet set-up, showing package code, tables, figures."""
from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["PROFILES", "setup", "show_source", "table"]

PROFILES = ("smoke", "book", "full")


def setup(profile: str, seed: int = 0) -> None:
    """Validate the profile, seed everything, and silence progress bars that would make outputs vary."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    import datasets
    import transformers

    from .trainer import set_seed

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft calls a transformers method that transformers 5 deprecates; the warning is theirs, not ours.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    set_seed(seed)


def show_source(*objects: Any) -> Any:
    """Display the package's own source of classes/functions (the chapter never keeps a copy)."""
    from IPython.display import Code, display

    for obj in objects:
        display(Code(inspect.getsource(obj), language="python"))


def table(rows: Sequence[dict[str, Any]], columns: dict[str, str] | None = None, digits: int = 3) -> Any:
    """A pandas DataFrame of ``rows`` with ``columns`` renamed {key: header} (default: every key of the first
    row, as it is), floats rounded."""
    import pandas as pd

    columns = columns or {key: key for key in rows[0]}
    frame = pd.DataFrame([{header: row.get(key) for key, header in columns.items()} for row in rows])
    return frame.round(digits)
