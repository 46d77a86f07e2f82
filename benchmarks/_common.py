"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""
import os
import subprocess

import cleanai


def cleanai_revision() -> str:
    """The git commit CleanAI was imported from, marked when its sources had local changes."""
    where = os.path.dirname(os.path.abspath(cleanai.__file__))

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", where, *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        dirty = " with uncommitted changes" if git("status", "--porcelain", "--", ".") else ""
        return f"commit {git('rev-parse', '--short', 'HEAD')}{dirty}"
    except (OSError, subprocess.CalledProcessError):
        return where
