"""Build the course's decks: `make slides` (or `python slides/build.py`).

Each deck is a Marp Markdown template, `slides/decks/NN_name.md`, beside a Python module of the
same name that computes what the deck shows: `values()` returns {name: text or matplotlib
Figure}. A template says `{{ name }}` where a value goes; a figure becomes an inline SVG image
(a data: URI), so each deck is one self-contained HTML file and a PDF, with nothing typed by hand
and nothing fetched from the network. Marp CLI (pinned in package-lock.json) renders them; its
MathJax typesets the formulas at build time, and Chromium prints the PDF.

    python slides/build.py                  # every deck, HTML and PDF, into slides/build/
    python slides/build.py 03 05 --no-pdf   # some decks, HTML only
"""
from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

# The decks show the course's CPU measurements (gloo ranks on CPU cores), also when built on a
# GPU machine, where labkit.launch would otherwise place the ranks on the GPU (labkit.placement).
os.environ["LABKIT_DEVICE"] = "cpu"

HERE = Path(__file__).resolve().parent
DECKS = HERE / "decks"
MARP = HERE / "node_modules" / ".bin" / "marp"
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")

# Marp's front matter, the same for every deck: the templates hold only slides.
FRONT_MATTER = """---
marp: true
theme: default
size: 16:9
math: mathjax
paginate: true
footer: "{footer}"
style: |
  section {{ font-size: 26px; }}
  section.title h1 {{ font-size: 52px; }}
  table {{ font-size: 20px; }}
  img.figure {{ display: block; margin: 0 auto; max-width: 100%; max-height: 480px; }}
---

"""


class DeckError(Exception):
    """A deck that cannot be built, with what to fix."""


def deck_names(only=()) -> list[str]:
    """The decks' stems (e.g. "03_overlap_buckets"), in order; ``only`` filters by prefix."""
    names = sorted(p.stem for p in DECKS.glob("[0-9][0-9]_*.md"))
    if only:
        unknown = [o for o in only if not any(n.startswith(o) for n in names)]
        if unknown:
            raise DeckError(f"no deck starts with {', '.join(unknown)}; decks: {', '.join(names)}")
        names = [n for n in names if any(n.startswith(o) for o in only)]
    return names


def load_values(name: str) -> dict:
    """Run the deck's module and return its values (an empty dict for a deck with none)."""
    path = DECKS / f"{name}.py"
    if not path.exists():
        return {}
    import cloudpickle

    module_name = f"slides_deck_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    # labkit.launch sends functions to the ranks with cloudpickle; a module loaded from a path
    # cannot be imported there, so its functions travel by value.
    cloudpickle.register_pickle_by_value(module)
    spec.loader.exec_module(module)
    values = module.values()
    if not isinstance(values, dict):
        raise DeckError(f"{path.name}: values() must return a dict, got {type(values).__name__}")
    return values


def figure_uri(figure) -> str:
    """A matplotlib Figure as an SVG data: URI (text as paths: no font needed to view it)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    with plt.rc_context({"svg.fonttype": "path", "svg.hashsalt": "labkit-slides"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render(name: str, values: dict) -> str:
    """The deck's Markdown with every placeholder filled; a missing or unused value is an error."""
    template = (DECKS / f"{name}.md").read_text(encoding="utf-8")
    wanted = set(PLACEHOLDER.findall(template))
    missing = sorted(wanted - set(values))
    if missing:
        raise DeckError(f"{name}.md uses {', '.join(missing)}, which {name}.py's values() "
                        "does not return")
    unused = sorted(set(values) - wanted)
    if unused:
        raise DeckError(f"{name}.py returns {', '.join(unused)}, which {name}.md never uses")
    texts = {}
    for key, value in values.items():
        if hasattr(value, "savefig"):
            texts[key] = figure_uri(value)
        elif isinstance(value, str):
            texts[key] = value
        else:
            raise DeckError(f"{name}.py: value {key!r} is a {type(value).__name__}; return text "
                            "(formatted as the slide should show it) or a matplotlib Figure")
    # markdown-it refuses data:image/svg+xml links, so a figure becomes an <img> tag (--html);
    # Marp's "w:N" in the alt text becomes its width.
    def figure_tag(match):
        alt, key = match.group(1), match.group(2)
        if not hasattr(values.get(key), "savefig"):
            return match.group(0)
        width = re.search(r"\bw:(\d+)", alt)
        style = f' style="width:{width.group(1)}px"' if width else ""
        words = " ".join(w for w in alt.split() if not re.match(r"^[wh]:\d+$", w))
        return f'<img class="figure" alt="{words}" src="{texts[key]}"{style}>'

    template = re.sub(r"!\[([^\]]*)\]\(\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}\)", figure_tag,
                      template)
    title = re.search(r"^# (.+)$", template, flags=re.MULTILINE)
    footer = title.group(1).replace('"', "'") if title else name
    body = PLACEHOLDER.sub(lambda m: texts[m.group(1)], template)
    return FRONT_MATTER.format(footer=footer) + body


def chromium() -> str | None:
    path = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    return path if Path(path).exists() else shutil.which("chromium")


def marp(markdown_dir: Path, out: Path, pdf: bool) -> None:
    """Marp over every rendered deck at once: HTML, and PDF when asked."""
    if not MARP.exists():
        raise DeckError(f"Marp CLI is not installed: run `make slides` (it runs `npm ci` in "
                        f"{HERE}; needs Node.js 18+ and npm)")
    for extra in [[]] + ([["--pdf"]] if pdf else []):
        # --html: the templates may use HTML tags (columns, small print); they are ours
        command = [str(MARP), "--html", "--input-dir", str(markdown_dir), "--output", str(out),
                   *extra]
        if "--pdf" in extra:
            browser = chromium()
            if browser is None:
                raise DeckError("the PDFs need Chromium: install Debian's `chromium` (make "
                                "chromium), set CHROMIUM=/path/to/chromium, or pass --no-pdf")
            command += ["--browser-path", browser, "--browser-timeout", "120"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise DeckError(f"marp failed ({' '.join(extra) or 'HTML'}):\n{done.stdout}{done.stderr}")


def build(out: Path, only=(), pdf: bool = True, quiet: bool = False) -> list[str]:
    """Render and build the decks into ``out``; returns the names built."""
    import matplotlib

    matplotlib.use("agg")
    names = deck_names(only)
    markdown_dir = out / "markdown"
    markdown_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        started = time.perf_counter()
        text = render(name, load_values(name))
        (markdown_dir / f"{name}.md").write_text(text, encoding="utf-8")
        if not quiet:
            print(f"slides: {name}: computed in {time.perf_counter() - started:.1f} s", flush=True)
    marp(markdown_dir, out, pdf)
    if not quiet:
        kinds = "HTML and PDF" if pdf else "HTML"
        print(f"slides: {len(names)} decks ({kinds}) in {out}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("decks", nargs="*", help="deck number prefixes (default: every deck)")
    parser.add_argument("--out", type=Path, default=HERE / "build")
    parser.add_argument("--no-pdf", action="store_true", help="HTML only (no Chromium needed)")
    args = parser.parse_args(argv)
    try:
        build(args.out, args.decks, pdf=not args.no_pdf)
    except DeckError as error:
        print(f"slides: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
