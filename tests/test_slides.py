"""The decks: each builds from its template and computed values, offline, and reads well in Chromium.

Two tests build half the decks each (their values computed, HTML and PDF by Marp) and look at
each deck the way an audience does: nothing fetched from outside the file, the first and a middle slide
not blank, no slide overflowing, no formula left raw, speaker notes, one PDF page per slide.
They need Marp (`make slides-deps`, npm) and Chromium (`make chromium`); without them they skip and
say why. The template rules (no typed numbers, one deck per notebook) need neither.
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT / "slides"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))


def _module(name):
    spec = importlib.util.spec_from_file_location(f"slides_{name}", SLIDES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _module("build")
look = _module("look")
DECKS = build.deck_names()


def _needs_toolchain():
    if not build.MARP.exists():
        pytest.skip("Marp CLI is not installed: `make slides-deps` (needs npm) installs it")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: `make chromium` installs it (Debian, as root)")
    pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    pytest.importorskip("pypdf", reason="pypdf is in the test extra")


def _build(out, *decks):
    done = subprocess.run([sys.executable, str(SLIDES / "build.py"), *decks, "--out", str(out)],
                          capture_output=True, text=True, timeout=560, cwd=ROOT)
    assert done.returncode == 0, f"the build failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


# --- the templates ---------------------------------------------------------------------------

def test_one_deck_per_notebook():
    notebooks = sorted(p.stem for p in (ROOT / "notebooks" / "source").glob("[0-9][0-9]_*.ipynb"))
    assert DECKS == notebooks
    for name in DECKS:
        assert (SLIDES / "decks" / f"{name}.py").exists(), f"{name}.md has no values module"


ALLOWED = [r"torch \d+\.\d+", r"§\s?\d+(\.\d+)*(\s?[–-]\s?\d+(\.\d+)*)?", r"arXiv:?\s?\d{4}\.\d{4,5}", r"\b(19|20)\d\d\b",
           r"Python \d+\.\d+", r"\b[wh]:\d+"]   # the last: a figure's width on the slide


def typed_numbers(template: str) -> list[str]:
    """Decimals and numbers of 3+ digits typed outside code, notes and allowed citations."""
    text = re.sub(r"```.*?```", " ", template, flags=re.DOTALL)    # fenced code
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.DOTALL)       # speaker notes, directives
    text = re.sub(r"`[^`]*`", " ", text)                           # inline code
    text = re.sub(r"style=\"[^\"]*\"", " ", text)                  # HTML layout
    for pattern in ALLOWED:
        text = re.sub(pattern, " ", text)
    return re.findall(r"(?<![\w.])(?:\d+\.\d+|\d{3,})(?![\w.])", text)


def test_the_typed_number_rule_catches_numbers():
    assert typed_numbers("a $7.5$ B model on 1024 ranks") == ["7.5", "1024"]
    assert typed_numbers("ZeRO-3 on 4 ranks, §3.1, §5.1–5.3, torch 2.13, `x = 256`\n<!-- 123 -->") == []


@pytest.mark.parametrize("name", DECKS)
def test_templates_type_no_numbers(name):
    template = (SLIDES / "decks" / f"{name}.md").read_text(encoding="utf-8")
    found = typed_numbers(template)
    assert not found, (f"{name}.md types {found}: compute them in {name}.py's values() and write "
                       "{{ name }} (slides/README.md)")


def test_a_missing_or_unused_value_stops_the_build():
    name = DECKS[0]
    template = (SLIDES / "decks" / f"{name}.md").read_text(encoding="utf-8")
    wanted = set(build.PLACEHOLDER.findall(template))
    with pytest.raises(build.DeckError, match="does not return"):
        build.render(name, {})
    if wanted:
        values = {key: "x" for key in wanted} | {"never_used": "y"}
        with pytest.raises(build.DeckError, match="never uses"):
            build.render(name, values)


# --- the built decks -------------------------------------------------------------------------

EXTERNAL = re.compile(r"""(?:\b(?:src|href|action|poster)\s*=\s*["']?\s*(?:https?:)?//"""
                      r"""|url\(\s*["']?\s*(?:https?:)?//|@import)""", re.IGNORECASE)


def external_references(html: str) -> list[str]:
    return [html[max(0, m.start() - 40):m.end() + 60] for m in EXTERNAL.finditer(html)]


def test_the_external_reference_check_finds_them():
    assert external_references('<script src="https://cdn.example/x.js">') != []
    assert external_references("a{background:url(//cdn.example/x.png)}") != []
    assert external_references('<img src="data:image/svg+xml;base64,AAA">') == []


def _look(html: Path):
    """(facts per slide, ink of the first and the middle slide) in headless Chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = look.browser(playwright)
        try:
            page = chromium.new_page(viewport=look.VIEWPORT)
            look.open_slide(page, html, 1)
            facts = look.slide_facts(page)
            inks = []
            for number in sorted({1, (len(facts) + 1) // 2}):
                look.open_slide(page, html, number)
                inks.append(look.ink(page.screenshot()))
        finally:
            chromium.close()
    return facts, inks


# Two builds of half the decks each: make test runs the notebook phase two at a time, and one
# build of five decks costs one Python start-up and two Marp runs instead of five and ten.
HALVES = [DECKS[:len(DECKS) // 2], DECKS[len(DECKS) // 2:]]


@pytest.mark.notebook
@pytest.mark.timeout(600)
@pytest.mark.parametrize("names", HALVES, ids=lambda names: f"{names[0][:2]}-{names[-1][:2]}")
def test_decks_build_offline_and_read_well(names, tmp_path):
    import pypdf

    _needs_toolchain()
    _build(tmp_path, *[name[:2] for name in names])
    for name in names:
        html, pdf = tmp_path / f"{name}.html", tmp_path / f"{name}.pdf"
        assert html.exists() and pdf.exists(), name
        text = html.read_text(encoding="utf-8")
        assert not external_references(text), (name, external_references(text)[:3])
        facts, inks = _look(html)
        assert len(facts) >= 5, f"{name}: {len(facts)} slides"
        for ink in inks:
            assert ink > 0.02, f"{name}: a slide is blank ({ink:.1%} of its pixels differ)"
        assert look.problems(facts) == [], name
        assert len(pypdf.PdfReader(pdf).pages) == len(facts), name


BAD_DECK = """<!-- _class: title -->

# 98 · A deck with mistakes

---

## Too long
""" + "\n".join(f"- line {i}" for i in range(40)) + """

<!-- notes -->

---

## Raw math and no notes

The cost is \\$\\alpha + S\\beta\\$ here.
"""


@pytest.mark.notebook
@pytest.mark.timeout(300)
def test_look_finds_overflow_raw_math_and_missing_notes(tmp_path, monkeypatch):
    _needs_toolchain()
    decks = tmp_path / "decks"
    decks.mkdir()
    (decks / "98_bad.md").write_text(BAD_DECK, encoding="utf-8")
    monkeypatch.setattr(build, "DECKS", decks)
    build.build(tmp_path / "out", pdf=False, quiet=True)
    facts, _ = _look(tmp_path / "out" / "98_bad.html")
    found = look.problems(facts)
    assert any(line.startswith("slide 2: the content runs") for line in found), found
    assert any(line.startswith("slide 3: formula not typeset") for line in found), found
    assert any(line.startswith("slide 3: no speaker notes") for line in found), found
    assert len(found) == 3, found
