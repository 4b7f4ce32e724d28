"""A bibliography style whose labels read as the citations in the text do ("Hu et al., 2022"): the book cites
author–year (``bibtex_reference_style: author_year``), so the reference list is labelled the same way
instead of with pybtex's alpha labels ("HSW+22"). Loaded by ``_config.yml`` as a local Sphinx extension."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle


def _surname(person: Any) -> str:
    return Text.from_latex(" ".join(person.prelast_names + person.last_names)).render_as("text")


class AuthorYearLabelStyle(BaseLabelStyle):
    """One author: "Surname, 2024"; two: "A and B, 2024"; more: "A et al., 2024" (sphinxcontrib-bibtex's
    author_year citations use the same forms)."""

    def format_labels(self, sorted_entries: Iterable[Any]) -> Iterator[str]:
        labels = [self.format_label(entry) for entry in sorted_entries]
        # Equal labels (two papers by "Liu et al." in 2024) get a, b, … after the year, as is usual.
        seen: dict[str, int] = {}
        for label in labels:
            if labels.count(label) > 1:
                seen[label] = seen.get(label, 0) + 1
                yield label + "abcdefghijklmnopqrstuvwxyz"[seen[label] - 1]
            else:
                yield label

    def format_label(self, entry: Any) -> str:
        people = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [_surname(p) for p in people]
        if not names:
            who = Text.from_latex(entry.fields.get("title", entry.key)).render_as("text")
        elif len(names) == 1:
            who = names[0]
        elif len(names) == 2:
            who = f"{names[0]} and {names[1]}"
        else:
            who = f"{names[0]} et al."
        return f"{who}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearStyle(UnsrtStyle):
    default_label_style = AuthorYearLabelStyle
    default_sorting_style = "author_year_title"


def setup(app: Any) -> dict[str, Any]:
    register_plugin("pybtex.style.formatting", "authoryear", AuthorYearStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
