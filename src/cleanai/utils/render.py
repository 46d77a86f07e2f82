"""Drawing the dependency graph with Graphviz, when it is installed."""
from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any, Union

__all__ = ["render_graph"]


def render_graph(graph: Any, path: Union[str, os.PathLike], timeout: float = 120) -> Path:
    """Write ``graph`` (a :class:`DependencyGraph`, or DOT text) as Graphviz DOT and render it.

    ``path`` ending in ``.svg``, ``.png`` or ``.pdf``: the DOT text goes next to it (same name,
    ``.dot``) and the ``dot`` program renders the picture when it is on ``PATH``; otherwise a
    warning says so and the ``.dot`` file is returned. Any other suffix writes only DOT.
    Returns the file written last (the picture when rendered).

    Raises:
        RuntimeError: if ``dot`` is present but fails, with its error output.
    """
    text = graph if isinstance(graph, str) else graph.to_dot()
    out = Path(path)
    fmt = out.suffix.lower().lstrip(".")
    dot_file = out.with_suffix(".dot") if fmt in ("svg", "png", "pdf") else out
    dot_file.parent.mkdir(parents=True, exist_ok=True)
    dot_file.write_text(text)
    if dot_file == out:
        return out
    exe = shutil.which("dot")
    if exe is None:
        warnings.warn(f"Graphviz 'dot' is not installed: wrote {dot_file} only; render it with "
                      f"'dot -T{fmt} {dot_file} -o {out}' (apt install graphviz)", stacklevel=2)
        return dot_file
    done = subprocess.run([exe, f"-T{fmt}", str(dot_file), "-o", str(out)], capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"Graphviz 'dot' failed to render {dot_file}: {done.stderr.strip()}")
    return out
