"""The book builds strictly (`jupyter-book build -W`): every page, every chapter, every citation; and no page
loads anything from the network (MathJax is bundled)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_book_builds_without_warnings(built_book):
    assert built_book.returncode == 0, built_book.log
    html = built_book.html
    for page in ("index.html", "book/chapters/overview.html", "book/chapters/lora.html", "book/data.html",
                 "book/changelog.html", "book/references.html"):
        assert (html / page).exists(), page
    lora = (html / "book/chapters/lora.html").read_text()
    assert "Hu et al." in lora and "<img" in lora  # the citation resolved and the figures are embedded
    # The overview's generated table: MyST math rendered, every chapter link resolved to its page.
    overview = (html / "book/chapters/overview.html").read_text()
    assert "<table" in overview and "<img" in overview and r"\(r(d_{in}+d_{out})\)" in overview
    assert 'href="dora.html"' in overview or "dora" not in (ROOT / "_toc.yml").read_text()
    for chapter in ("lora", "lora_plus", "vera", "adalora", "qlora"):
        assert f'href="{chapter}.html"' in overview, chapter


# A script, stylesheet, image or frame fetched from another host, or a CDN named anywhere (a script's constant).
EXTERNAL = re.compile(r"<(?:script|link|img|iframe)\b[^>]*?\b(?:src|href)=[\"']?(?:https?:)?//[^\s\"'>]+"
                      r"|\b(?:unpkg\.com|cdn\.jsdelivr\.net|cdnjs\.cloudflare\.com|fonts\.googleapis\.com)\b", re.I)


def test_no_page_loads_anything_from_the_network(built_book):
    assert built_book.returncode == 0, built_book.log
    pages = sorted(built_book.html.rglob("*.html"))
    assert len(pages) > 20
    found = {str(p.relative_to(built_book.html)): EXTERNAL.findall(p.read_text()) for p in pages}
    assert not {page: hits for page, hits in found.items() if hits}
    mathjax = built_book.html / "_static" / "mathjax" / "tex-chtml.js"
    assert mathjax.exists() and 'src="../../_static/mathjax/tex-chtml.js"' in (built_book.html / "book/chapters/lora.html").read_text()


# --- what the chapters show: the smoke banner, tables, figures (lorafam_nb.notebook) ---------------
CHAPTERS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def code_cells(notebook: Path) -> list[dict]:
    return [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]


def test_smoke_banner_only_at_the_smoke_profile():
    from lorafam_nb.notebook import smoke_banner

    banner = smoke_banner("smoke")
    assert 'class="admonition warning"' in banner._repr_html_() and "only prove" in repr(banner)
    assert smoke_banner("book") is None and smoke_banner("full") is None


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_committed_smoke_outputs_carry_the_banner(notebook):
    """The committed chapters are executed at the smoke profile: each one that shows its settings shows the
    banner right there, in the set-up cell's output (unless its numbers do not depend on the profile)."""
    setup = [c for c in code_cells(notebook) if "show_settings(" in "".join(c["source"])]
    if not setup:
        pytest.skip(f"{notebook.name} does not show its settings through lorafam_nb.notebook")
    html = "".join("".join(o.get("data", {}).get("text/html", "")) for o in setup[0]["outputs"])
    assert ("Smoke-profile outputs" in html) == ("banner=False" not in "".join(setup[0]["source"]))


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_every_figure_has_a_caption_and_alt_text(notebook):
    figures = [c for c in code_cells(notebook) if any("image/png" in o.get("data", {}) for o in c["outputs"])]
    for cell in figures:
        options = cell["metadata"].get("mystnb", {})
        assert options.get("figure", {}).get("caption"), "".join(cell["source"])[:200]
        assert options.get("image", {}).get("alt"), "".join(cell["source"])[:200]


def _calls(notebook: Path) -> list:
    import ast

    tree = ast.parse("\n".join("\n".join(line for line in "".join(c["source"]).splitlines()
                                          if not line.lstrip().startswith(("%", "!")))
                               for c in code_cells(notebook)))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_every_training_run_goes_through_the_results_store(notebook):
    """A chapter trains only through ``experiment.run`` (or the grid) with the store and the profile, so that
    `make book` reads its runs back: it builds no Trainer of its own, and every ``run(...)`` names ``store=``
    and ``profile=`` (``store=None`` where a chapter deliberately retrains a recorded run to get its model back;
    the performance page's benchmark times steps, it reports no trained result)."""
    for call in _calls(notebook):
        name = call.func.attr if hasattr(call.func, "attr") else getattr(call.func, "id", "")
        assert name != "Trainer", f"{notebook.stem}: a Trainer outside experiment.run"
        owner = getattr(getattr(call.func, "value", None), "id", "experiment")
        if name == "run" and owner in ("experiment", "run"):
            given = {k.arg for k in call.keywords}
            assert {"store", "profile"} <= given, f"{notebook.stem}: run(...) without store= and profile="


def test_table_hides_the_index_and_separates_thousands():
    from lorafam_nb.notebook import table

    shown = table([{"n": 1234567, "acc": 0.41666, "lr": 2e-6}, {"n": 3, "acc": 1.0, "lr": 0.0}], digits=3)
    assert repr(shown).splitlines() == ["        n   acc       lr", "1,234,567 0.417 2.00e-06", "        3 1.000    0.000"]
    html = shown._repr_html_()
    assert "1,234,567" in html and html.count("</th>") == 3  # three columns and no index column
    assert shown.loc[0, "n"] == 1234567  # still a DataFrame of the values


def test_show_marks_single_points_and_wraps_long_titles():
    import matplotlib

    matplotlib.use("Agg")
    from lorafam_nb.notebook import COLUMN_WIDTH, show, subplots

    fig, (one, many) = subplots(1, 2, height=3)
    assert fig.get_figwidth() == COLUMN_WIDTH
    one.plot([3], [0.7], label="a single step")
    many.plot([1, 2, 3], [0.7, 0.6, 0.5], label="a run")
    one.legend()
    one.set_title("a title far too long for half of the book's text column, which must wrap onto lines")
    show(fig)
    assert one.get_lines()[0].get_marker() == "o" and many.get_lines()[0].get_marker() in ("None", "")
    assert one.get_legend().legend_handles[0].get_marker() == "o"
    assert "\n" in one.get_title()
