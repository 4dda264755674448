"""console-broker's build hook: the wheel bundles the browser clients its console pages serve.

pyproject.toml holds the whole configuration; this file only replaces setuptools'
``build_py`` command. After building the Python packages, it installs package.json's
``dependencies`` (not its ``devDependencies``) with ``npm ci --omit=dev`` from
package-lock.json in a temporary directory (offline where npm's cache holds them, as
after ``scripts/setup-host``), and copies into the build, under :data:`BUNDLE`, the files
of each installed package the pages can serve, with its licence files: :func:`bundled`
chooses them. ``broker.assets.assets_dir`` finds that directory when the broker runs
installed.

npm is needed only to build the wheel (from a checkout or from the sdist, which holds
package.json, package-lock.json and this file); an editable install (``pip install -e``,
as ``scripts/setup-host`` does) bundles nothing, since the source tree serves its own
``node_modules``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import ExecError, FileError

HERE = Path(__file__).resolve().parent
#: Where the bundle lives in the wheel: a data directory of the broker package
#: (``broker.assets.BUNDLED_ASSETS``), written into the build only, never into the tree.
BUNDLE = PurePosixPath("broker/web_clients/node_modules")
#: The files a console page can serve (``broker.assets.CONTENT_TYPES``) and package.json.
SERVED_SUFFIXES = frozenset({".js", ".css", ".html", ".json"})
#: Licence files, wherever they are in a package (noVNC keeps some in docs/), by the start
#: of their name in capitals: the licence itself, its notices, and the list of authors a
#: copyright line may refer to.
LICENCE_NAMES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")
#: The start of a README's name in capitals: one below a package's top (vendored code, such
#: as spice-html5's src/thirdparty/browser-es-module-loader) may be where its licence is
#: stated, and is kept; the package's own, at its top, is documentation.
README = "README"
#: Directories of a package that no page serves.
UNSERVED_DIRECTORIES = frozenset({
    "test", "tests", "__tests__", "spec", "doc", "docs", "example", "examples", "demo",
    "demos", "benchmark", "benchmarks", "coverage",
})
NPM_CI = [
    "ci", "--omit=dev", "--prefer-offline", "--ignore-scripts", "--no-audit", "--no-fund",
    "--loglevel=error",
]
NO_NPM = (
    "building console-broker's wheel needs npm (Node.js's package manager), which was not "
    "found on PATH: the wheel bundles the browser clients of its console pages, which npm "
    "installs from package-lock.json (npm ci). Install Node.js with npm (Debian and Ubuntu: "
    "apt-get install npm; elsewhere: https://nodejs.org/en/download) and build again. "
    "npm is needed only to build the wheel, not to install or run it."
)


def is_licence(name: str) -> bool:
    """Whether the file *name* is a licence file (:data:`LICENCE_NAMES`)."""
    return name.upper().startswith(LICENCE_NAMES)


def bundled(relative: PurePosixPath) -> bool:
    """Whether the file at *relative* below an npm package's directory goes into the wheel:
    its package.json and licence files (:func:`is_licence`) anywhere, else, outside the
    directories no page serves (:data:`UNSERVED_DIRECTORIES`), a file a page can serve
    (:data:`SERVED_SUFFIXES`) or the README of vendored code (:data:`README`). Never a
    hidden file or directory (the broker serves none: ``broker.assets.read_below``), nor a
    file in a nested ``node_modules`` (its packages are bundled as packages of their own)."""
    parts = relative.parts
    if not parts or any(part.startswith(".") for part in parts):
        return False
    if "node_modules" in parts:  # a nested package's: bundled as a package of its own
        return False
    if relative == PurePosixPath("package.json") or is_licence(relative.name):
        return True
    if any(part.lower() in UNSERVED_DIRECTORIES for part in parts[:-1]):
        return False
    if len(parts) > 1 and relative.name.upper().startswith(README):
        return True
    return relative.suffix in SERVED_SUFFIXES


def installed_packages(node_modules: Path) -> Iterator[Path]:
    """The package directories npm installed in *node_modules* (``name`` or
    ``@scope/name``, and those in their own nested ``node_modules``); no links."""
    for entry in sorted(node_modules.iterdir()):
        if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
            continue
        scoped = entry.name.startswith("@")
        for package in sorted(entry.iterdir()) if scoped else [entry]:
            if package.is_symlink() or not package.is_dir():
                continue
            yield package
            if (package / "node_modules").is_dir():
                yield from installed_packages(package / "node_modules")


def copy_bundle(node_modules: Path, target: Path) -> list[Path]:
    """Copy the :func:`bundled` files of every package installed in *node_modules* to the
    same place below *target*; the files written."""
    written = []
    for package in installed_packages(node_modules):
        for path in sorted(package.rglob("*")):
            relative = PurePosixPath(path.relative_to(package).as_posix())
            if path.is_symlink() or not path.is_file() or not bundled(relative):
                continue
            out = target / path.relative_to(node_modules)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)
            written.append(out)
    return written


def npm_install(source: Path, work: Path) -> Path:
    """``npm ci --omit=dev`` of *source*'s package.json and package-lock.json, in *work*:
    the node_modules directory it filled."""
    npm = shutil.which("npm")
    if npm is None:
        raise ExecError(NO_NPM)
    for name in ("package.json", "package-lock.json"):
        if not (source / name).is_file():
            raise FileError(
                f"building console-broker's wheel needs {name} (the browser clients its "
                f"console pages serve, which the wheel bundles); it is missing from {source}"
            )
        shutil.copyfile(source / name, work / name)
    done = subprocess.run(
        [npm, *NPM_CI], cwd=work, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        check=False,
    )
    if done.returncode != 0:
        raise ExecError(
            f"npm ci failed (exit status {done.returncode}) installing the browser clients "
            f"the wheel bundles:\n{done.stdout}{done.stderr}"
        )
    return work / "node_modules"


class BuildWithWebClients(build_py):
    """setuptools' ``build_py``, then the browser clients into the build (not when
    editable: the source tree serves its own node_modules)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib, *BUNDLE.parts)
        shutil.rmtree(target, ignore_errors=True)  # nothing left from an earlier build
        with tempfile.TemporaryDirectory(prefix="console-broker-npm-") as work:
            written = copy_bundle(npm_install(HERE, Path(work)), target)
        self.announce(f"bundled {len(written)} files of the browser clients in {target}", 2)


if __name__ == "__main__":
    setup(cmdclass={"build_py": BuildWithWebClients})
