"""Installing a distribution of a plugin into the tests' environment, as a user would."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def installed(source: Path, distribution: str, scratch: Path) -> Iterator[Path]:
    """Install the distribution in *source* into this environment, as a user would (not
    editable, without its dependencies: the broker is here), from a copy in *scratch*
    (the build leaves its output beside the sources); uninstall it after. Yields the
    copy."""
    copy = scratch / source.name
    leftovers = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    shutil.copytree(source, copy, ignore=leftovers)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", str(copy)], check=True, capture_output=True)
    try:
        yield copy
    finally:
        subprocess.run([*pip, "uninstall", "-y", distribution], check=True)
