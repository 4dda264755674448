"""The distribution: pyproject.toml ships every package and data file of the tree, and the
suite runs against the wheel built from it.

The checks of pyproject.toml against the tree run everywhere. The others check the
installed copy that ``scripts/test`` builds from this checkout (the wheel, installed not
editable into tox's ``py`` environment): run from the checkout itself (the editable
``.venv``) they are skipped, and when ``CI`` is set they fail, since CI must test what a
user installs. That copy has the server side (tox.ini's extras: server and test); the
wheel installed with its base dependencies alone, as on a workstation, is
tests/test_client_install.py's.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path, PurePosixPath

import pytest
from console_broker_testbed import Testbed
from servedbroker import ServedBroker

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGES: list[str] = SETUPTOOLS["packages"]
#: Each top-level package and the directory it is built from.
ROOTS = {
    name: REPO / SETUPTOOLS["package-dir"].get(name, name)
    for name in sorted({package.split(".")[0] for package in PACKAGES})
}


def source_dir(package: str) -> Path:
    top, *sub = package.split(".")
    return ROOTS[top].joinpath(*sub)


def tree_files() -> dict[str, Path]:
    """Every file of the package directories (no caches, no hidden files), by its path in
    the wheel."""
    files = {}
    for name, root in ROOTS.items():
        for path in root.rglob("*"):
            parts = path.relative_to(root).parts
            if path.is_dir() or "__pycache__" in parts or any(p.startswith(".") for p in parts):
                continue
            files[PurePosixPath(name, *parts).as_posix()] = path
    return files


def test_every_package_directory_is_listed() -> None:
    on_disk = {
        ".".join((name, *init.parent.relative_to(root).parts))
        for name, root in ROOTS.items()
        for init in root.rglob("__init__.py")
    }
    assert sorted(on_disk) == sorted(PACKAGES), "[tool.setuptools] packages"
    # A module in a directory without __init__.py would not be shipped.
    stray = [
        wheel_path
        for wheel_path, path in tree_files().items()
        if path.suffix == ".py" and not (path.parent / "__init__.py").is_file()
    ]
    assert stray == []


def test_every_plugin_directory_is_mapped() -> None:
    plugins = {
        path for path in (REPO / "plugins").iterdir()
        if path.is_dir() and not path.name.startswith((".", "__"))
    }
    assert plugins == {root for root in ROOTS.values() if root.parent == REPO / "plugins"}


def test_every_data_file_is_package_data() -> None:
    data = SETUPTOOLS["package-data"]
    covered = {
        path
        for package in PACKAGES
        for pattern in (*data.get("*", ()), *data.get(package, ()))
        for path in source_dir(package).glob(pattern)
    }
    assert "broker_xml_templates/vnc/graphics.xml" in tree_files()
    missing = [
        wheel_path
        for wheel_path, path in tree_files().items()
        if path.suffix != ".py" and path not in covered
    ]
    assert missing == [], "[tool.setuptools.package-data]"


def test_the_testbed_is_a_distribution_of_its_own() -> None:
    """The test bed (the tests' and scripts/demo's) is not a package of the broker."""
    testbed = tomllib.loads((REPO / "testbed" / "pyproject.toml").read_text())
    assert testbed["project"]["name"] == "console-broker-testbed"
    assert testbed["tool"]["setuptools"]["packages"] == ["console_broker_testbed"]
    assert "console_broker_testbed" not in ROOTS
    assert not (REPO / "broker" / "testbed.py").exists()


@pytest.fixture(scope="module")
def installed() -> metadata.Distribution:
    """The installed distribution, when the suite runs against it (not the checkout)."""
    import broker

    if Path(broker.__file__).resolve() == REPO / "broker" / "__init__.py":
        why = "broker is imported from the checkout; scripts/test runs this against the wheel"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the suite against the installed wheel: {why}",
                        pytrace=False)
        pytest.skip(why)
    return metadata.distribution(PYPROJECT["project"]["name"])


def test_every_package_is_imported_from_the_installed_copy(
    installed: metadata.Distribution,
) -> None:
    for package in PACKAGES:
        module = importlib.import_module(package)
        where = Path(installed.locate_file(f"{package.replace('.', '/')}/__init__.py"))
        assert module.__file__ is not None
        assert Path(module.__file__).resolve() == where.resolve(), package


def test_subprocesses_import_the_installed_copy(installed: metadata.Distribution) -> None:
    """The tests' ``python -m broker.cli`` and the like, run in the checkout, do not
    import the source tree (tests/conftest.py sets PYTHONSAFEPATH)."""
    script = "import importlib, json, sys; print(json.dumps("
    script += "[importlib.import_module(p).__file__ for p in sys.argv[1:]]))"
    done = subprocess.run(
        [sys.executable, "-c", script, *PACKAGES],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    site = Path(installed.locate_file("")).resolve()
    for package, found in zip(PACKAGES, json.loads(done.stdout), strict=True):
        assert Path(found).resolve().is_relative_to(site), (package, found)


def test_the_wheel_holds_exactly_the_package_directories(
    installed: metadata.Distribution,
) -> None:
    record = {
        path.as_posix()
        for path in installed.files or ()
        if path.parts[0] in ROOTS and "__pycache__" not in path.parts
    }
    tree = set(tree_files())
    assert sorted(tree - record) == [], "in the tree, missing from the wheel"
    # A stale build/ directory puts what it holds into the wheel (scripts/test removes it).
    assert sorted(record - tree) == [], "in the wheel, not in the tree"
    # The test bed comes from its own distribution (tox.ini's deps), never from this one.
    assert not any("testbed" in path.as_posix() for path in installed.files or ())
    owners = metadata.packages_distributions()["console_broker_testbed"]
    assert owners == ["console-broker-testbed"]


@pytest.mark.vm
def test_the_installed_script_serves_the_pages(testbed: Testbed, tmp_path: Path) -> None:
    """``console-broker serve`` through this environment's script: /healthz, and the
    console pages with their files from the package data and the browser clients."""
    script = Path(sysconfig.get_path("scripts")) / "console-broker"
    served = ServedBroker(tmp_path, command=[str(script)])
    try:
        status, body = served.get("/healthz")
        assert status == 200
        assert json.loads(body)["version"] == metadata.version(PYPROJECT["project"]["name"])
        # The pages are served only when their browser clients are found.
        files = {
            "/console/vnc/": "plugins/vnc/web/console.html",
            "/console/vnc/app/console.js": "plugins/vnc/web/console.js",
            "/console/vnc/novnc/core/rfb.js": "node_modules/@novnc/novnc/core/rfb.js",
            "/console/spice/": "plugins/spice/web/console.html",
            "/console/spice/app/console.css": "plugins/spice/web/console.css",
            "/console/serial/": "plugins/serial/static/console.html",
            "/console/serial/console.js": "plugins/serial/static/console.js",
            "/console/serial/xterm/xterm.js": "node_modules/@xterm/xterm/lib/xterm.js",
        }
        for url, path in files.items():
            assert served.get(url) == (200, (REPO / path).read_bytes()), url
    finally:
        served.stop()
