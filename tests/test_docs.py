"""The documentation's code blocks run as written and print what the page says they print.

Every ```python block of a page runs, in page order, in one namespace, with the current
directory a fresh temporary one. On the guide pages (docs/en, docs/tr) a ```text block right
after a ```python block is what that block prints, exactly. A block that is not meant to run is
fenced as ```text or left unlabelled, never as ```python.
"""
import contextlib
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("docs/en/*.md"),
                                                   *ROOT.glob("docs/tr/*.md")]
               if "```python" in p.read_text())
#: what README.md's comments say its code prints, and the line printed (a budget met on
#: random weights may land just under its target)
README_PRINTS = [("11689512 1814073344", r"11689512 1814073344"),
                 ("budget: macs 0.500 of dense (target 0.500)",
                  r"budget: macs 0\.(49\d|500) of dense \(target 0\.500\)"),
                 ("2 1 32", r"2 1 32"), ("static 21", r"static 21"),
                 ("torch.export.load", r"torch\.export\.load")]


def blocks(text):
    """(code, expected output or None) for every ```python block, in page order."""
    out = []
    for m in re.finditer(r"```python\n(.*?)```(\s*```text\n(.*?)```)?", text, re.S):
        out.append((m.group(1), m.group(3)))
    return out


def run_page(page):
    """Run every ```python block of ``page``; yields (block index, code, expected, printed)."""
    namespace = {"__name__": "__doc__"}
    for i, (code, expected) in enumerate(blocks((ROOT / page).read_text())):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(code, f"{page} block {i}", "exec"), namespace)
        yield i, code, expected, buf.getvalue()


def without_comments(code):
    """``code`` as tokens, comments and layout left out: what two translations must share."""
    return [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(code).readline)
            if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                              tokenize.DEDENT)]


def test_every_guide_page_with_code_is_checked():
    assert {"docs/en/api.md", "docs/en/concepts.md", "docs/en/strategies.md", "docs/en/index.md",
            "docs/en/limitations.md", "docs/tr/api.md", "docs/tr/kurtarma.md"} <= set(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_page_runs_and_prints_what_it_shows(page, tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    monkeypatch.chdir(tmp_path)
    for i, code, expected, printed in run_page(page):
        if expected is not None:
            assert printed.strip() == expected.strip(), f"{page} block {i}:\n{code}"


def test_readme_runs_top_to_bottom(tmp_path, monkeypatch):
    """README.md's blocks run in one namespace and print the numbers its comments give."""
    for package in ("torchvision", "transformers", "matplotlib"):
        pytest.importorskip(package)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    printed = []
    for i, code, expected, out in run_page("README.md"):
        assert expected is None or out.strip() == expected.strip(), f"README.md block {i}"
        printed += out.splitlines()
    text = (ROOT / "README.md").read_text()
    for comment, line in README_PRINTS:
        assert f"# {comment}" in text and any(re.fullmatch(line, p) for p in printed), comment
    assert (tmp_path / "pruned" / "cleanai.json").is_file() and (tmp_path / "kept.png").is_file()


def test_readme_translation_has_the_same_code():
    """README.tr.md's blocks are README.md's with translated comments, so they run too."""
    en, tr = (blocks((ROOT / name).read_text()) for name in ("README.md", "README.tr.md"))
    assert len(en) == len(tr)
    for i, ((a, _), (b, _)) in enumerate(zip(en, tr)):
        assert without_comments(a) == without_comments(b), f"README.tr.md block {i}:\n{b}"
