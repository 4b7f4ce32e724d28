"""The book builds strictly (`jupyter-book build -W`): every page, every chapter, every citation."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_book_builds_without_warnings(tmp_path):
    # Build a copy, with the committed (smoke-profile) chapter outputs in place of `make book`'s.
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "book", tmp_path / "book", ignore=shutil.ignore_patterns("chapters", "_build"))
    (tmp_path / "book" / "chapters").mkdir()
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copy(notebook, tmp_path / "book" / "chapters" / notebook.name)
    jb = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run([str(jb), "build", str(tmp_path), "--builder", "html", "-W", "-n", "--keep-going"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    html = tmp_path / "_build" / "html"
    for page in ("index.html", "book/chapters/overview.html", "book/chapters/lora.html", "book/data.html",
                 "book/changelog.html", "book/references.html"):
        assert (html / page).exists(), page
    lora = (html / "book/chapters/lora.html").read_text()
    assert "Hu et al." in lora and "<img" in lora  # the citation resolved and the figures are embedded
    # The overview's generated table: MyST math rendered, every chapter link resolved to its page.
    overview = (html / "book/chapters/overview.html").read_text()
    assert "<table" in overview and "<img" in overview and r"\(r(d_{in}+d_{out})\)" in overview
    assert 'href="dora.html"' in overview or "dora" not in (tmp_path / "_toc.yml").read_text()
    for chapter in ("lora", "lora_plus", "vera", "adalora", "qlora"):
        assert f'href="{chapter}.html"' in overview, chapter
