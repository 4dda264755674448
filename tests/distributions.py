"""Installing a distribution of a plugin into the tests' environment, as a user would; and
console-broker's own, installed from the wheel, when the suite runs against it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

#: The checkout, whose broker package an editable install imports.
REPO = Path(__file__).resolve().parents[1]


def installed_wheel() -> metadata.Distribution:
    """console-broker's distribution installed in this environment, when the suite runs
    against it (``scripts/test``: the wheel built from the checkout, in tox's ``py``
    environment). Run from the checkout itself (the editable ``.venv``), the test is
    skipped, and fails when ``CI`` is set: CI must test what a user installs."""
    import broker

    if Path(broker.__file__).resolve() == REPO / "broker" / "__init__.py":
        why = "broker is imported from the checkout; scripts/test runs this against the wheel"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the suite against the installed wheel: {why}",
                        pytrace=False)
        pytest.skip(why)
    return metadata.distribution("console-broker")


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
