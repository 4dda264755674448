"""broker.assets: where the console pages' assets are, which files below a package are
served and as what; and the key naming the directory, http.assets_dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import assets
from broker.assets import (
    BUNDLED_ASSETS,
    INSTALLED_ASSETS,
    assets_dir,
    content_type,
    package_file,
    read_below,
)
from broker.config import ConfigError, config_from_dict, load_config
from broker.plugins import PluginManager

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A package directory in a node_modules, with a file beside it to be kept out."""
    root = tmp_path / "node_modules" / "@scope" / "pkg"
    (root / "lib" / "sub").mkdir(parents=True)
    (root / "lib" / "main.js").write_text("export {};\n")
    (root / "lib" / "sub" / "deep.js").write_text("// deep\n")
    (root / "lib" / "style.css").write_text("body {}\n")
    (root / "lib" / ".hidden.js").write_text("// hidden\n")
    (root / "lib" / "dir.js").mkdir()
    (root / "package.json").write_text("{}\n")
    (tmp_path / "node_modules" / "@scope" / "secret.js").write_text("// secret\n")
    return root


def test_the_default_is_the_source_trees_node_modules_when_run_from_it() -> None:
    """From the checkout (the editable install) the default is its node_modules; installed
    (scripts/test runs the suite against the wheel) the broker finds no source tree, and
    the browser clients the wheel bundles."""
    if Path(assets.__file__).resolve() == REPO / "broker" / "assets.py":
        assert assets.source_tree() == REPO
        assert assets_dir("") == REPO / "node_modules"
    else:
        assert assets.source_tree() is None
        assert assets_dir("") == BUNDLED_ASSETS
        assert (BUNDLED_ASSETS / "@novnc" / "novnc" / "core" / "rfb.js").is_file()


def test_the_bundle_is_a_directory_of_the_broker_package() -> None:
    """Where setup.py, the build hook, writes it (tests/test_packaging.py checks that)."""
    root = Path(assets.__file__).resolve().parents[1]
    assert BUNDLED_ASSETS.relative_to(root).as_posix() == "broker/web_clients/node_modules"


def test_a_configured_directory_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(assets, "BUNDLED_ASSETS", tmp_path)
    assert assets_dir("/srv/web") == Path("/srv/web")


def test_a_source_tree_wins_over_the_bundle(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(assets, "source_tree", lambda: tmp_path / "tree")
    monkeypatch.setattr(assets, "BUNDLED_ASSETS", tmp_path)
    assert assets_dir("") == tmp_path / "tree" / "node_modules"


def test_installed_the_default_is_the_bundle(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(assets, "source_tree", lambda: None)
    monkeypatch.setattr(assets, "BUNDLED_ASSETS", tmp_path)
    assert assets_dir("") == tmp_path


def test_installed_without_a_bundle_the_default_is_under_usr_share(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(assets, "source_tree", lambda: None)
    monkeypatch.setattr(assets, "BUNDLED_ASSETS", tmp_path / "missing")
    assert assets_dir("") == INSTALLED_ASSETS == Path("/usr/share/console-broker/node_modules")


def test_content_types() -> None:
    assert content_type("a/b.js") == "text/javascript; charset=utf-8"
    assert content_type("b.css") == "text/css; charset=utf-8"
    assert content_type("console.html") == "text/html; charset=utf-8"
    assert content_type("package.json") == "application/octet-stream"
    assert content_type("LICENSE") == "application/octet-stream"


def test_files_below_the_package_are_served(package: Path) -> None:
    assert read_below(package, "lib/main.js") == b"export {};\n"
    assert read_below(package, "lib/sub/deep.js") == b"// deep\n"
    served = package_file(package, "lib/style.css", suffixes=(".css",), headers=[("X", "1")])
    assert served is not None and served.body == b"body {}\n"
    assert served.content_type == "text/css; charset=utf-8" and served.headers == (("X", "1"),)
    assert served.status == 200


@pytest.mark.parametrize(
    "relative",
    [
        "../secret.js",
        "lib/../../secret.js",
        "lib/../lib/main.js",  # '..' anywhere, even when it stays inside
        "./lib/main.js",
        "lib//main.js",
        "/lib/main.js",
        "lib/main.js/",
        "lib/.hidden.js",
        "lib/main.js\0.js",
        "lib/missing.js",
        "lib/dir.js",  # not a file
        "lib",
        "",
        "package.json",  # not a wanted suffix
        "lib/style.css",
    ],
)
def test_anything_else_is_refused(package: Path, relative: str) -> None:
    assert read_below(package, relative) is None
    assert package_file(package, relative) is None


def test_an_absolute_path_is_refused(package: Path) -> None:
    assert read_below(package, str(package / "lib" / "main.js")) is None


def test_a_link_out_of_the_package_is_refused(package: Path) -> None:
    (package / "lib" / "out.js").symlink_to(package.parent / "secret.js")
    (package / "lib" / "loop.js").symlink_to(package / "lib" / "loop.js")
    (package / "lib" / "inside.js").symlink_to(package / "lib" / "main.js")
    assert read_below(package, "lib/out.js") is None
    assert read_below(package, "lib/loop.js") is None
    assert read_below(package, "lib/inside.js") == b"export {};\n"


def test_a_linked_package_directory_is_served(package: Path, tmp_path: Path) -> None:
    """Distributions link a package's directory into node_modules from elsewhere."""
    elsewhere = tmp_path / "linked"
    elsewhere.symlink_to(package)
    assert read_below(elsewhere, "lib/main.js") == b"export {};\n"
    assert read_below(elsewhere, "../secret.js") is None


def test_a_missing_package_is_refused(tmp_path: Path) -> None:
    assert read_below(tmp_path / "absent", "lib/main.js") is None


def test_assets_dir_is_an_http_key_relative_to_the_file(tmp_path: Path) -> None:
    config = config_from_dict({"http": {"assets_dir": "web"}}, source=tmp_path / "broker.toml")
    assert config.http.assets_dir == str(tmp_path / "web")
    assert config_from_dict({}).http.assets_dir == ""


def test_the_moved_key_names_its_new_place(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('[vnc]\nshared = true\nassets_dir = "/srv/web"\n')
    with pytest.raises(ConfigError) as raised:
        load_config(path, PluginManager(disabled=()).config_tables)
    assert raised.value.problems == [
        f"{path}: vnc.assets_dir: unknown key: it is now http.assets_dir "
        "(set assets_dir in the [http] table)"
    ]
