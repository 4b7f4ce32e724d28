"""Small helpers the chapter notebooks share: quiet set-up, the run's settings (with the smoke banner),
showing package code, tables and figures sized for the book's text column."""
from __future__ import annotations

import html
import inspect
import math
import os
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from .intervals import mean_interval, pearson_interval, wilson_interval

__all__ = ["COLUMN_WIDTH", "PROFILES", "Table", "accuracy_text", "mapping_text", "mean_interval", "pearson_interval", "setup", "show",
           "show_settings", "show_source", "smoke_banner", "store_for", "subplots", "table", "wilson_interval"]

PROFILES = ("smoke", "book", "full")
COLUMN_WIDTH = 7.0  # inches: a figure this wide is shown at its own size in the book's text column
FONT_SIZE = 9  # points, for every figure: a column-wide figure then reads like the text around it

SMOKE_TEXT = ("These outputs come from the smoke profile: a few dozen examples and a few optimizer steps per "
              "run. Their numbers only prove that the pipeline runs; they say nothing about the methods. "
              "`make book` executes this chapter at the book profile.")


def setup(profile: str, seed: int = 0) -> None:
    """Validate the profile, seed everything, silence progress bars that would make outputs vary, and set
    the figures' font size."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    import datasets
    import matplotlib.pyplot as plt
    import transformers

    from .trainer import set_seed

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft calls a transformers method that transformers 5 deprecates; the warning is theirs, not ours.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    plt.rcParams.update({"font.size": FONT_SIZE, "axes.titlesize": FONT_SIZE, "legend.fontsize": FONT_SIZE - 1})
    set_seed(seed)


def store_for(profile: str) -> Any:
    """The results store a chapter's runs use (:mod:`lorafam_nb.results`): the committed one at the ``book``
    and ``full`` profiles, so that a recorded run is read back instead of trained; at ``smoke`` a fresh
    temporary one, so that a smoke execution (CI's) really trains every run and leaves the committed
    records alone."""
    import tempfile

    from .results import Store

    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    return Store(tempfile.mkdtemp(prefix="lorafam-smoke-")) if profile == "smoke" else Store()


# --- uncertainty: the maths lives in :mod:`lorafam_nb.intervals`; these show it ---------------------

def accuracy_text(accuracy: float, n: int, digits: int = 3) -> str:
    """"0.853 [0.821, 0.880]": an accuracy on ``n`` examples with its 95 % Wilson interval."""
    low, high = wilson_interval(accuracy, n)
    return f"{accuracy:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


class Rich:
    """An output with an HTML form (the book) and a text form (the notebook's plain view, which nbval compares)."""

    def __init__(self, html_text: str, text: str) -> None:
        self.html_text, self.text = html_text, text

    def _repr_html_(self) -> str:
        return self.html_text

    def __repr__(self) -> str:
        return self.text


def smoke_banner(profile: str) -> Rich | None:
    """At the smoke profile, a warning box saying that the numbers only prove the pipeline runs; None at the
    other profiles, so a book-profile execution shows no banner."""
    if profile != "smoke":
        return None
    body = html.escape(SMOKE_TEXT).replace("`make book`", "<code>make book</code>")
    return Rich(f'<div class="admonition warning"><p class="admonition-title">Smoke-profile outputs</p>'
                f"<p>{body}</p></div>", f"⚠ Smoke-profile outputs. {SMOKE_TEXT}")


def show_settings(profile: str, settings: Mapping[str, Any] | None = None, banner: bool = True, **run: Any) -> None:
    """The chapter's set-up as it ran: the smoke banner (at the smoke profile only; ``banner=False`` for a page
    whose numbers do not depend on the profile), then one small table of the run (``profile``, then ``run``:
    device, model, seed, …) and the profile's ``settings``."""
    from IPython.display import display

    if banner and profile == "smoke":
        display(smoke_banner(profile))
    values = {"profile": profile, **run, **(settings or {})}
    display(table([{"setting": key, "value": _setting(value)} for key, value in values.items()]))


def _setting(value: Any) -> str:
    if isinstance(value, Mapping):
        return "; ".join(f"{key}: {_setting(v)}" for key, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_setting(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def mapping_text(mapping: Mapping[str, Any], digits: int = 3) -> str:
    """``mapping`` as one line for a printed sentence, "a: 0.562, b: 1,024", instead of a dict's repr."""
    return ", ".join(f"{key}: {_number(value, digits)}" for key, value in mapping.items())


def show_source(*objects: Any) -> Any:
    """Display the package's own source of classes/functions (the chapter never keeps a copy)."""
    from IPython.display import Code, display

    for obj in objects:
        display(Code(inspect.getsource(obj), language="python"))


def _number(value: Any, digits: int) -> str:
    """Thousands separators for integers; floats to ``digits`` decimals, or in e-notation when that would
    show a non-zero number as zero."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value != 0 and abs(value) < 0.5 * 10 ** -digits:
            return f"{value:.{max(1, digits - 1)}e}"
        return f"{value:,.{digits}f}"
    return str(value)


class Table(pd.DataFrame):
    """A chapter's table: a DataFrame shown without its index, numbers with thousands separators and
    ``digits`` decimals, headers that wrap and a width that fits the text column (it scrolls when it cannot)."""

    _metadata = ["digits"]

    @property
    def _constructor(self) -> type[Table]:
        return Table

    def cells(self) -> list[list[str]]:
        digits = getattr(self, "digits", 3)
        return [[_number(v.item() if hasattr(v, "item") else v, digits) for v in row]
                for row in self.itertuples(index=False)]

    def is_numeric(self, column: str) -> bool:
        return pd.api.types.is_numeric_dtype(self[column]) and not pd.api.types.is_bool_dtype(self[column])

    def __repr__(self) -> str:
        if self.empty:
            return "(no rows)"
        return pd.DataFrame(self.cells(), columns=[str(c) for c in self.columns]).to_string(index=False)

    def _repr_html_(self) -> str:
        right = [self.is_numeric(c) for c in self.columns]
        align = ['text-align: right' if r else 'text-align: left' for r in right]
        head = "".join(f'<th style="{a}; white-space: normal">{html.escape(str(c))}</th>'
                       for c, a in zip(self.columns, align))
        body = "".join("<tr>" + "".join(f'<td style="{a}">{html.escape(v)}</td>' for v, a in zip(row, align))
                       + "</tr>" for row in self.cells())
        return ('<div style="max-width: 100%; overflow-x: auto">'
                '<table class="dataframe" style="font-size: 0.85em; width: auto">'
                f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def table(rows: Sequence[dict[str, Any]], columns: dict[str, str] | None = None, digits: int = 3) -> Table:
    """A :class:`Table` of ``rows`` with ``columns`` renamed {key: header} (default: every key of the first
    row, as it is), floats shown to ``digits`` decimals."""
    columns = columns or {key: key for key in rows[0]}
    frame = Table([{header: row.get(key) for key, header in columns.items()} for row in rows])
    frame.digits = digits
    return frame


# --- figures ------------------------------------------------------------------------------------
def subplots(nrows: int = 1, ncols: int = 1, height: float = 3.6, **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots`` at the width of the book's column (``COLUMN_WIDTH``), with a layout engine that keeps
    titles, labels and colour bars from overlapping; ``height`` in inches."""
    import matplotlib.pyplot as plt

    kwargs.pop("constrained_layout", None)
    return plt.subplots(nrows, ncols, figsize=(COLUMN_WIDTH, height), layout="constrained", **kwargs)


def show(fig: Any) -> None:
    """Finish and show a figure: a line with fewer than two points gets markers (a single point draws no
    line), titles and axis labels wrap to the width of their axes (an x label leaves room for the axis'
    offset text, "1e-5"), and x tick labels that would overlap are turned (by 30 degrees, or upright when
    there are many)."""
    import matplotlib.pyplot as plt

    width, height = fig.get_figwidth(), fig.get_figheight()
    fig.canvas.draw()  # the layout, the tick labels and the axes' offset texts exist from here on
    for ax in fig.axes:
        marked = set()
        for line in ax.get_lines():
            if len(line.get_xdata()) < 2 and line.get_marker() in (None, "", " ", "None", "none"):
                line.set_marker("o")
                marked.add(line.get_label())
        legend = ax.get_legend()
        if legend is not None and marked:  # the legend drew its samples before: mark those too
            for handle, label in zip(legend.legend_handles, legend.get_texts()):
                if label.get_text() in marked and hasattr(handle, "set_marker"):
                    handle.set_marker("o")
        box = ax.get_position()
        _wrap(ax.title, box.width * width)
        _wrap(ax.xaxis.label, box.width * width * (0.7 if ax.xaxis.get_offset_text().get_text() else 1.0))
        _wrap(ax.yaxis.label, box.height * height)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = sorted((t for t in ax.get_xticklabels() if t.get_visible() and t.get_text()),
                        key=lambda t: t.get_window_extent(renderer).x0)
        boxes = [t.get_window_extent(renderer) for t in labels]
        if any(left.x1 > right.x0 for left, right in zip(boxes, boxes[1:])):
            steep = len(labels) > 8  # many labels: upright text would still collide at 30 degrees
            for t in labels:
                t.set_rotation(90 if steep else 30)
                t.set_horizontalalignment("center" if steep else "right")
    plt.show()


def _wrap(text: Any, inches: float) -> None:
    """Wrap a matplotlib text to about ``inches`` (an average glyph is about half the font size wide)."""
    content = text.get_text()
    if not content or "$" in content:  # mathtext must not be cut
        return
    chars = max(12, int(inches * 72 / (0.55 * text.get_fontsize())))
    text.set_text("\n".join(textwrap.fill(line, chars, break_long_words=False) for line in content.split("\n")))
