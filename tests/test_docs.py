"""The documentation's code blocks run as written and print what the page says they print."""
import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["docs/en/recovery.md", "docs/tr/kurtarma.md", "docs/en/api.md", "docs/tr/api.md",
         "docs/en/budget.md", "docs/tr/butce.md"]


def blocks(text):
    """(code, expected output or None) for every ```python block, in page order."""
    out = []
    for m in re.finditer(r"```python\n(.*?)```(\s*```text\n(.*?)```)?", text, re.S):
        out.append((m.group(1), m.group(3)))
    return out


@pytest.mark.parametrize("page", PAGES)
def test_page_runs_and_prints_what_it_shows(page, tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    path = ROOT / page
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc__"}
    for i, (code, expected) in enumerate(blocks(path.read_text())):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(code, f"{page} block {i}", "exec"), namespace)
        if expected is not None:
            assert buf.getvalue().strip() == expected.strip(), f"{page} block {i}:\n{code}"
