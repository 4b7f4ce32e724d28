"""Method cards (the overview page's source) against the package, the book and the bibliography.

Every registered method carries its own :class:`~lorafam_nb.core.MethodCard`. The card's facts are
checked against things that can contradict them: its date against its arXiv id, its chapter
against ``notebooks/`` and ``_toc.yml``, its bib key against the book's ``.bib`` files and the
chapter's citations, its parameter formula against ``num_parameters`` and against the parameters
an injected layer really trains, and ``mergeable`` against what ``merge`` does to a model's logits.
"""
from __future__ import annotations

import copy
import json
import re
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_bert
from lorafam_nb import AdapterConfig, MethodCard, count_parameters, get_adapter_model
from lorafam_nb.core import METHOD_PATHS, AdapterLayer, import_methods

ROOT = Path(__file__).resolve().parents[1]


def package_methods() -> dict[str, type]:
    # Tests elsewhere may register toy configs for a moment; the book's methods live in the package.
    return {name: cls for name, cls in import_methods().items() if cls.__module__.startswith("lorafam_nb.")}


METHODS = package_methods()
NAMES = sorted(METHODS)
# The formula and merge checks below build text models (a linear, a Llama FFN, a tiny BERT); the vision and
# multimodal methods check their cards' counts and merges on their own models, in their own test files.
TEXT_NAMES = sorted(name for name, cls in METHODS.items() if cls.modality == "text")


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [chapter["file"] for part in toc["parts"] for chapter in part["chapters"]]


def bib_entries() -> dict[str, str]:
    """{key: entry text} over every .bib file the book's _config.yml lists."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    entries: dict[str, str] = {}
    for bib in config["bibtex_bibfiles"]:
        text = (ROOT / bib).read_text()
        starts = [m for m in re.finditer(r"@\w+\{([^,\s]+),", text)]
        for m, nxt in zip(starts, starts[1:] + [None]):
            entries[m.group(1)] = text[m.start(): nxt.start() if nxt else len(text)]
    return entries


def latex_to_python(formula: str) -> str:
    """``r(d_{in}+d_{out})+d_{out}`` -> ``r*(d_in+d_out)+d_out``: the few constructs the cards use, and
    nothing else (anything left over, such as a backslash, makes ``eval`` fail and the test with it)."""
    expr = formula.replace(r"\,", "*").replace(" ", "")
    expr = re.sub(r"([A-Za-z])_\{(\w+)\}", r"\1_\2", expr)  # d_{in} -> d_in, r_{init} -> r_init
    expr = re.sub(r"(?<=\d)(?=[A-Za-z(])", "*", expr)  # 2r -> 2*r, 2(…) -> 2*(…)
    return re.sub(r"(?<=[\w)])\(", "*(", expr)  # implicit products: r(…) -> r*(…), )( -> )*(


# How a card's symbols map to config fields: the rank is ``r``, or AdaLoRA's initial rank; a mixture's
# expert count is E or N (N_j: the count of the layer at hand).
RANK_FIELDS = {"r": "r", "r_init": "init_r", "E": "num_experts", "N": "num_experts", "N_j": "num_experts",
               "S": "n_skills", "T": "n_tasks", "b": "adapter_dim", "n": "num_experts", "M": "num_modules"}


def config_with_rank(cls: type, rank: int, **kwargs):
    """``cls`` with its size knob (``budget_knob``: a rank, or an adapter width) at ``rank``."""
    if cls.budget_knob == "init_r":
        return cls(init_r=rank, target_r=1, **kwargs)
    return cls(**{cls.budget_knob: rank}, **kwargs)


def evaluate(card: MethodCard, config, d_in: int, d_out: int) -> int:
    names = {"d_in": d_in, "d_out": d_out}
    names |= {symbol: getattr(config, field) for symbol, field in RANK_FIELDS.items() if hasattr(config, field)}
    return eval(latex_to_python(card.params), {"__builtins__": {}}, names)  # noqa: S307 (our own strings)


def test_every_method_module_registers_a_config_with_its_own_card():
    modules = {cls.__module__.removeprefix("lorafam_nb.") for cls in METHODS.values()}
    assert modules == set(METHOD_PATHS.values())
    for name, cls in METHODS.items():
        # Configs subclass LoraConfig: an inherited card would silently describe LoRA instead.
        assert "card" in cls.__dict__, f"{cls.__name__} inherits its card; set its own"
        assert isinstance(cls.card, MethodCard), name
    cards = [cls.card for cls in METHODS.values()]
    for attribute in ("title", "chapter", "arxiv", "bibkey"):
        values = [getattr(c, attribute) for c in cards]
        assert len(set(values)) == len(values), f"two cards share a {attribute}: {values}"


@pytest.mark.parametrize("name", NAMES)
def test_card_fields_are_well_formed(name):
    cls = METHODS[name]
    card = cls.card
    for field in ("title", "paper", "arxiv", "date", "idea", "trains", "frozen", "params", "chapter", "bibkey"):
        value = getattr(card, field)
        assert isinstance(value, str) and value.strip(), f"{name}: empty {field}"
        # A pipe would split the overview's Markdown table cell.
        assert "|" not in value and "\n" not in value, f"{name}: {field} must be one line without '|'"
    assert isinstance(card.mergeable, bool)
    assert re.fullmatch(r"\d{4}\.\d{4,5}", card.arxiv), card.arxiv
    # arXiv ids start with the year and month of the first version; the card's date is that month.
    date = datetime.strptime(card.date, "%Y-%m")
    assert card.date == f"20{card.arxiv[:2]}-{card.arxiv[2:4]}", (card.date, card.arxiv)
    assert 2020 <= date.year <= datetime.now().year
    # The module implementing the method names the same paper.
    module_doc = sys.modules[cls.__module__].__doc__
    assert card.arxiv in module_doc, f"{cls.__module__}'s docstring does not cite arXiv {card.arxiv}"


@pytest.mark.parametrize("name", NAMES)
def test_card_chapter_exists_is_in_the_toc_and_cites_the_paper(name):
    card = METHODS[name].card
    notebook = ROOT / "notebooks" / f"{card.chapter}.ipynb"
    assert notebook.exists(), notebook
    assert f"book/chapters/{card.chapter}" in toc_files(), f"{card.chapter} is not in _toc.yml"
    entries = bib_entries()
    assert card.bibkey in entries, f"{card.bibkey} is in no .bib file that _config.yml lists"
    assert card.arxiv in entries[card.bibkey], f"bib entry {card.bibkey} does not carry arXiv {card.arxiv}"
    cells = json.loads(notebook.read_text())["cells"]
    markdown = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    cited = {key.strip() for keys in re.findall(r"\{cite(?::[pt])?\}`([^`]+)`", markdown) for key in keys.split(",")}
    assert card.bibkey in cited, f"notebooks/{card.chapter}.ipynb never cites {card.bibkey}"


@pytest.mark.parametrize("name", TEXT_NAMES)
@pytest.mark.parametrize(("d_in", "d_out", "rank"), [(48, 20, 4), (20, 72, 3)])
def test_card_parameter_formula_matches_num_parameters_and_a_real_layer(name, d_in, d_out, rank):
    cls = METHODS[name]
    config = config_with_rank(cls, rank)
    formula = evaluate(cls.card, config, d_in, d_out)
    torch.manual_seed(0)
    if config.sites.__func__ is not AdapterConfig.sites:
        # Whole-FFN methods: each card states its own unit (MixLoRA per FFN linear, PESC and AdaMix per block),
        # so the card must agree with the config's formula, and a real FFN layer with the config's site count.
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=d_in, intermediate_size=d_out,
                                             num_hidden_layers=1, num_attention_heads=1))
        site = next(s for s in config.sites(llama) if s.kind == "ffn")
        layer = get_adapter_model(llama, config).adapter_layers()[site.name]
        assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == config.site_parameters(site), name
        trainable = config.num_parameters(d_in, d_out)
    else:
        plain = nn.Sequential(nn.Linear(d_in, d_out))
        site = config.sites(plain)[0]
        # Per linear: what the model holds once beyond its sites (MOELoRA's task gate) is not one linear's.
        model_level = config.model_parameters([site]) - config.site_parameters(site)
        trainable = count_parameters(get_adapter_model(plain, config))[0] - model_level
    assert formula == trainable, f"{name}: card says {cls.card.params} = {formula}, the layer trains {trainable}"
    if hasattr(config, "num_parameters"):
        assert config.num_parameters(d_in, d_out) == formula


def test_latex_to_python_reads_every_construct_the_cards_use():
    assert latex_to_python(r"r(d_{in}+d_{out})+d_{out}") == "r*(d_in+d_out)+d_out"
    assert latex_to_python(r"r\,d_{out}") == "r*d_out"
    assert latex_to_python(r"r_{init}(d_{in}+d_{out}+1)") == "r_init*(d_in+d_out+1)"
    assert latex_to_python(r"d_{out}+2r") == "d_out+2*r"
    with pytest.raises(SyntaxError):
        eval(latex_to_python(r"\frac{r}{2}"))  # noqa: S307 — unknown LaTeX fails instead of passing


def mergeable_config(cls: type):
    kwargs = {"target_modules": "all-linear"}
    if cls.__name__ == "QLoraConfig":
        # The base matmul must run in float32 for the comparison: with the default bfloat16 compute
        # dtype the *unmerged* model already differs from a float32 dense one by ~1e-2, merge or not.
        kwargs["compute_dtype"] = "float32"
    if cls.__name__ == "LoraDropConfig":
        # Exercise both kinds of layer: one kept layer with its own LoRA, the rest sharing per type.
        kwargs["kept_modules"] = ["bert.encoder.layer.0.attention.self.query"]
    return config_with_rank(cls, 4, **kwargs)


@pytest.mark.parametrize("name", TEXT_NAMES)
def test_mergeable_agrees_with_what_merge_does(name):
    cls = METHODS[name]
    base = tiny_bert()
    ids = torch.randint(1, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    model = get_adapter_model(copy.deepcopy(base), mergeable_config(cls))
    # Move every trainable tensor away from its init (B = 0, Λ = 0, b = 0 would make any merge trivial).
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        # Compared before the pooler and head, which squash a small change (PESC's narrow adapters).
        last = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        assert (last - base(input_ids=ids, output_hidden_states=True).hidden_states[-1]).abs().max() > 1e-3, \
            "the adapter changes nothing"
    if not cls.card.mergeable:
        with pytest.raises((NotImplementedError, ValueError, RuntimeError)):
            model.merge()
        return
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    with torch.no_grad():
        after = plain(input_ids=ids).logits
    assert (after - before).abs().max() < 1e-5, f"{name}: merging changed the logits"


def test_overview_is_first_and_changelog_follows_data_in_the_toc():
    files = toc_files()
    assert files[0] == "book/chapters/overview"
    assert files.index("book/changelog") == files.index("book/data") + 1


def test_overview_notebook_links_every_chapter():
    cells = json.loads((ROOT / "notebooks" / "overview.ipynb").read_text())["cells"]
    shown = "".join("".join(o.get("data", {}).get("text/markdown", ""))
                    for c in cells if c["cell_type"] == "code" for o in c.get("outputs", []))
    for name, cls in METHODS.items():
        card = cls.card
        assert f"[{card.title}]({card.chapter}.ipynb)" in shown, f"the stored overview table lacks {name}"
