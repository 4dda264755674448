"""The distribution: pyproject.toml ships every package and data file of the tree, and the
suite runs against the wheel built from it.

The wheel also bundles the browser clients the console pages serve (setup.py, the build
hook, installs package.json's dependencies with npm): the runtime packages with their
licence files, nothing of the dev dependencies.

The checks of pyproject.toml against the tree, and of the build hook, run everywhere. The
others check the
installed copy that ``scripts/test`` builds from this checkout (the wheel, installed not
editable into tox's ``py`` environment): run from the checkout itself (the editable
``.venv``) they are skipped, and when ``CI`` is set they fail, since CI must test what a
user installs. That copy has the server side (tox.ini's extras: server and test); the
wheel installed with its base dependencies alone, as on a workstation, is
tests/test_client_install.py's.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path, PurePosixPath
from types import ModuleType

import pytest
from console_broker_testbed import Testbed
from distributions import installed_wheel
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


#: package.json and its lock: the browser packages the wheel bundles (dependencies) and not
#: (devDependencies, which only the tests use).
PACKAGE_JSON = json.loads((REPO / "package.json").read_text())
PACKAGE_LOCK = json.loads((REPO / "package-lock.json").read_text())
#: The checkout's browser clients (scripts/setup-host runs npm ci there).
NODE_MODULES = REPO / "node_modules"


def build_hook() -> ModuleType:
    """setup.py, the build hook, as a module (its setup() runs only as ``__main__``)."""
    spec = importlib.util.spec_from_file_location("console_broker_build_hook", REPO / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOOK = build_hook()
#: Where the bundle lives in the wheel (and in the installed copy).
BUNDLE = HOOK.BUNDLE.as_posix()


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
    assert PYPROJECT["project"]["name"] == "console-broker"
    return installed_wheel()


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
        and not path.as_posix().startswith(f"{BUNDLE}/")  # built, not in the tree: below
    }
    tree = set(tree_files())
    assert sorted(tree - record) == [], "in the tree, missing from the wheel"
    # A stale build/ directory puts what it holds into the wheel (scripts/test removes it).
    assert sorted(record - tree) == [], "in the wheel, not in the tree"
    # The test bed comes from its own distribution (tox.ini's deps), never from this one.
    assert not any("testbed" in path.as_posix() for path in installed.files or ())
    owners = metadata.packages_distributions()["console_broker_testbed"]
    assert owners == ["console-broker-testbed"]


def bundled_files(installed: metadata.Distribution) -> dict[str, set[PurePosixPath]]:
    """The files the wheel bundles, by npm package (``name`` or ``@scope/name``), each
    relative to its package's directory."""
    packages: dict[str, set[PurePosixPath]] = {}
    for path in installed.files or ():
        posix = PurePosixPath(path.as_posix())
        if not posix.is_relative_to(BUNDLE):
            continue
        parts = posix.relative_to(BUNDLE).parts
        size = 2 if parts[0].startswith("@") else 1
        packages.setdefault("/".join(parts[:size]), set()).add(PurePosixPath(*parts[size:]))
    return packages


def lock_packages(*, dev: bool) -> set[str]:
    """The packages package-lock.json installs in node_modules itself, for development
    only (*dev*) or not."""
    return {
        key.removeprefix("node_modules/")
        for key, entry in PACKAGE_LOCK["packages"].items()
        if key.count("node_modules/") == 1 and bool(entry.get("dev")) is dev
    }


def licence_files(files: set[PurePosixPath]) -> set[PurePosixPath]:
    return {path for path in files if HOOK.is_licence(path.name)}


def test_the_wheel_bundles_every_runtime_browser_package_with_its_licences(
    installed: metadata.Distribution,
) -> None:
    bundled = bundled_files(installed)
    runtime = PACKAGE_JSON["dependencies"]
    assert runtime and set(runtime) <= set(bundled)
    # and what they need (none today): the lock's packages not only for development
    assert sorted(bundled) == sorted(lock_packages(dev=False))
    for name, version in runtime.items():
        files = bundled[name]
        # its package.json, of the version package-lock.json pins
        where = Path(installed.locate_file(f"{BUNDLE}/{name}/package.json"))
        assert json.loads(where.read_text())["version"] == version, name
        assert PACKAGE_LOCK["packages"][f"node_modules/{name}"]["version"] == version, name
        # its licence files: at its top at least, and all those npm installs
        assert {p for p in licence_files(files) if len(p.parts) == 1}, f"{name}: no licence"
        if (NODE_MODULES / name).is_dir():  # scripts/setup-host installed the same
            in_tree = {
                PurePosixPath(p.relative_to(NODE_MODULES / name).as_posix())
                for p in (NODE_MODULES / name).rglob("*") if p.is_file()
            }
            installed_licences = {
                p for p in in_tree if HOOK.is_licence(p.name) and "node_modules" not in p.parts
            }
            assert licence_files(files) == installed_licences, name
        # nothing else but what the pages can serve
        assert [p for p in files if not HOOK.bundled(p)] == [], name
    # what the pages serve is there (the rest of the broker's pages' assets: their tests)
    assert PurePosixPath("core/rfb.js") in bundled["@novnc/novnc"]
    assert PurePosixPath("docs/LICENSE.MPL-2.0") in bundled["@novnc/novnc"]
    assert PurePosixPath("lib/xterm.js") in bundled["@xterm/xterm"]
    assert PurePosixPath("css/xterm.css") in bundled["@xterm/xterm"]
    assert PurePosixPath("src/main.js") in bundled["@spice-project/spice-html5"]
    assert not any(p.suffix in (".map", ".ts") for files in bundled.values() for p in files)


def test_the_wheel_bundles_nothing_of_the_dev_dependencies(
    installed: metadata.Distribution,
) -> None:
    dev = set(PACKAGE_JSON["devDependencies"]) | lock_packages(dev=True)
    assert "jose" in dev  # the token tests' JWT implementation, installed in the tree only
    assert sorted(dev & set(bundled_files(installed))) == []
    below = [path.as_posix() for path in installed.files or ()]
    assert [p for p in below if p.startswith(BUNDLE) and "jose" in p.split("/")] == []


def test_the_bundle_is_built_never_in_the_tree() -> None:
    """The bundle goes into the build only, where the installed broker looks for it; the
    sdist carries what makes it."""
    from broker.assets import BUNDLED_ASSETS

    assert BUNDLED_ASSETS.relative_to(BUNDLED_ASSETS.parents[2]).as_posix() == BUNDLE
    assert not (REPO / BUNDLE).exists()
    assert f"/{PurePosixPath(BUNDLE).parent}/" in (REPO / ".gitignore").read_text().splitlines()
    manifest = (REPO / "MANIFEST.in").read_text().split()
    assert {"package.json", "package-lock.json"} <= set(manifest)


@pytest.mark.parametrize(
    ("relative", "kept"),
    [
        ("package.json", True),
        ("core/rfb.js", True),
        ("vendor/pako/lib/zlib/inflate.js", True),
        ("lib/xterm.js", True),
        ("css/xterm.css", True),
        ("spice.html", True),
        ("LICENSE", True),
        ("LICENSE.txt", True),
        ("license.md", True),
        ("COPYING.LESSER", True),
        ("NOTICE", True),
        ("AUTHORS", True),
        ("docs/LICENSE.MPL-2.0", True),  # licences wherever they are
        ("vendor/pako/LICENSE", True),
        ("README.md", False),  # the package's documentation
        ("src/thirdparty/loader/README.md", True),  # vendored code's: its licence, maybe
        ("vendor/pako/README", True),
        ("docs/README.md", False),
        ("docs/API.md", False),
        ("docs/index.html", False),  # docs, tests and examples are not served
        ("test/rfb.js", False),
        ("tests/fixtures/data.json", False),
        ("__tests__/a.js", False),
        ("examples/demo.html", False),
        ("lib/xterm.js.map", False),  # nor are maps, TypeScript, modules by another name
        ("lib/xterm.mjs", False),
        ("src/browser/Terminal.ts", False),
        ("typings/xterm.d.ts", False),
        ("Makefile", False),
        ("package.json.in", False),
        ("lib/.hidden.js", False),  # hidden: the broker serves none
        (".github/LICENSE", False),
        ("node_modules/dep/index.js", False),  # a nested package: bundled as one of its own
        ("node_modules/dep/LICENSE", False),
    ],
)
def test_the_build_hooks_filter(relative: str, kept: bool) -> None:
    assert HOOK.bundled(PurePosixPath(relative)) is kept


def test_the_build_hook_copies_each_installed_package(tmp_path: Path) -> None:
    """Scoped, plain and nested packages, filtered; no links, nothing hidden."""
    modules = tmp_path / "node_modules"
    files = {
        "@scope/a/package.json": True,
        "@scope/a/LICENSE": True,
        "@scope/a/lib/a.js": True,
        "@scope/a/lib/a.js.map": False,
        "@scope/a/docs/guide.md": False,
        "@scope/a/README.md": False,
        "@scope/a/vendor/v/README.md": True,
        "b/package.json": True,
        "b/COPYING": True,
        "b/index.js": True,
        "b/test/b.js": False,
        "b/node_modules/c/package.json": True,
        "b/node_modules/c/c.css": True,
        "b/node_modules/c/README.md": False,
        ".package-lock.json": False,
        ".bin/tool": False,
    }
    for name in files:
        (modules / name).parent.mkdir(parents=True, exist_ok=True)
        (modules / name).write_text(name)
    (modules / "linked").symlink_to(modules / "b")
    (modules / "@scope" / "a" / "lib" / "out.js").symlink_to(tmp_path / "elsewhere.js")
    (tmp_path / "elsewhere.js").write_text("// outside\n")
    target = tmp_path / "bundle"
    written = HOOK.copy_bundle(modules, target)
    kept = sorted(name for name, keep in files.items() if keep)
    assert sorted(p.relative_to(target).as_posix() for p in written) == kept
    assert sorted(
        p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()
    ) == kept
    assert (target / "b" / "index.js").read_text() == "b/index.js"


def test_the_build_hook_names_npm_when_it_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from setuptools.errors import ExecError  # what setuptools reports as "error: ..."

    monkeypatch.setenv("PATH", str(tmp_path))  # no npm there
    with pytest.raises(ExecError, match=r"needs npm .* apt-get install npm"):
        HOOK.npm_install(REPO, tmp_path)


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
