"""Look at built decks the way an audience does: in Chromium, slide by slide.

    python slides/look.py                 # every built deck: problems, and a PNG of each slide
    python slides/look.py 03 --no-png     # deck 03: problems only

Problems are what a viewer would notice: a slide whose content runs past its bottom edge, a
formula left as raw `$...$`, a blank slide, a slide without speaker notes. The tests
(tests/test_slides.py) use the same functions on a fresh build.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VIEWPORT = {"width": 1280, "height": 720}
# $...$ or $$...$$ that MathJax did not typeset: a dollar, then text, then a dollar
RAW_MATH = re.compile(r"\$[^$\s][^$]*\$")


def browser(playwright):
    path = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    return playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])


def slide_facts(page) -> list[dict]:
    """For each slide of the open deck: its text outside code, whether it overflows, its note."""
    return page.evaluate("""() => {
        const slides = [...document.querySelectorAll('div.bespoke-marp-parent > svg > foreignObject > section')];
        return slides.map((s, i) => {
            const copy = s.cloneNode(true);
            copy.querySelectorAll('pre, code, mjx-container, svg, footer, header').forEach(e => e.remove());
            const note = document.querySelector(`.bespoke-marp-note[data-index="${i}"]`);
            return {text: copy.textContent,
                    overflow: s.scrollHeight - s.clientHeight,
                    note: note ? note.textContent.trim() : ''};
        });
    }""")


def open_slide(page, html: Path, number: int) -> None:
    """Show slide ``number`` (1-based) of ``html``; fonts and images loaded."""
    page.goto(f"file://{html.resolve()}#{number}")
    page.wait_for_load_state("load")
    page.wait_for_timeout(300)


def ink(png: bytes) -> float:
    """The share of pixels that differ from the most common colour (0 for a blank slide)."""
    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]
    flat = (pixels.reshape(-1, 3) * 255).round().astype(np.int32)
    codes = flat[:, 0] * 65536 + flat[:, 1] * 256 + flat[:, 2]
    values, counts = np.unique(codes, return_counts=True)
    return float(1 - counts.max() / codes.size)


def problems(facts: list[dict]) -> list[str]:
    """What is wrong with a deck's slides, one line each (empty when nothing is)."""
    found = []
    for number, fact in enumerate(facts, start=1):
        if fact["overflow"] > 2:
            found.append(f"slide {number}: the content runs {fact['overflow']} px past the "
                         "bottom: split the slide or cut text")
        raw = RAW_MATH.search(fact["text"])
        if raw:
            found.append(f"slide {number}: formula not typeset: {raw.group(0)[:60]}")
        if number > 1 and not fact["note"]:
            found.append(f"slide {number}: no speaker notes (an HTML comment on the slide)")
    return found


def main(argv=None) -> int:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("decks", nargs="*", help="deck number prefixes (default: every built deck)")
    parser.add_argument("--build", type=Path, default=HERE / "build")
    parser.add_argument("--no-png", action="store_true")
    args = parser.parse_args(argv)
    decks = sorted(p for p in args.build.glob("[0-9][0-9]_*.html")
                   if not args.decks or any(p.name.startswith(d) for d in args.decks))
    if not decks:
        print(f"no built decks in {args.build}: run `make slides` first", file=sys.stderr)
        return 1
    bad = 0
    with sync_playwright() as playwright:
        chromium = browser(playwright)
        page = chromium.new_page(viewport=VIEWPORT)
        for html in decks:
            open_slide(page, html, 1)
            facts = slide_facts(page)
            found = problems(facts)
            if not args.no_png:
                folder = args.build / "png"
                folder.mkdir(exist_ok=True)
                for number in range(1, len(facts) + 1):
                    open_slide(page, html, number)
                    page.screenshot(path=str(folder / f"{html.stem}-{number:02d}.png"))
            bad += len(found)
            print(f"{html.stem}: {len(facts)} slides, " + ("ok" if not found else
                  f"{len(found)} problem(s):\n  " + "\n  ".join(found)))
        chromium.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
