"""The book builds strictly (`jupyter-book build -W`): every page, every chapter, every citation; and no page
loads anything from the network (MathJax is bundled)."""
from __future__ import annotations

import re
from pathlib import Path

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
