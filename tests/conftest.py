"""Shared fixtures: the real stack (libvirtd + QEMU + the tiny guest).

Tests that need it use the ``testbed`` fixture (or one built on it) and carry
the ``vm`` marker. Without the test bed they are skipped on a developer
machine, but when ``CI`` is set a missing test bed is an error: CI must never
pass by skipping the real stack.

The event loop: ``--event-loop`` (or ``CONSOLE_BROKER_TEST_EVENT_LOOP``), ``auto``
(the broker's default: uvloop when installed), ``uvloop`` or ``asyncio``, is what every
asyncio loop of the test process is: the anyio tests' and any ``anyio.run`` or
``asyncio.run`` of a test (the asyncio event loop policy is set for the whole run).
``console-broker serve`` subprocesses run on their configuration's loop (the default).
scripts/test runs the whole suite on the default and the unit tests once more on
asyncio's loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import Testbed, TestbedError
from distributions import installed

#: The third-party example distribution (console-broker-example-plugin).
EXAMPLE = Path(__file__).parent / "plugin_example"
#: The QEMU monitor plugin, the worked example of docs/plugins.md
#: (console-broker-qemu-monitor).
MONITOR_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "qemu-monitor"

# The tests' Python subprocesses (``python -m broker.cli``, ``python -c ...``) must import
# the broker this test process does. Python would put their working directory, the
# checkout, first on sys.path, so that under scripts/test (the suite against the wheel
# installed in .tox/py) they would run the source tree instead of the installed copy.
os.environ["PYTHONSAFEPATH"] = "1"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--event-loop",
        choices=("auto", "uvloop", "asyncio"),
        default=os.environ.get("CONSOLE_BROKER_TEST_EVENT_LOOP", "auto"),
        help="the asyncio event loop of the tests' own loops, as service.event_loop "
        "(default: $CONSOLE_BROKER_TEST_EVENT_LOOP, else auto: uvloop when installed)",
    )


def pytest_configure(config: pytest.Config) -> None:
    from broker.service._loop import choose_event_loop

    loop = choose_event_loop(config.getoption("event_loop"))
    config.stash[_EVENT_LOOP] = f"{loop.name} {loop.version}"
    if loop.name == "uvloop":
        import uvloop

        with warnings.catch_warnings():  # the policy API is deprecated from Python 3.14
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def pytest_report_header(config: pytest.Config) -> str:
    return f"event loop: {config.stash[_EVENT_LOOP]}"


_EVENT_LOOP = pytest.StashKey[str]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        uses_testbed = "testbed" in getattr(item, "fixturenames", ())
        if uses_testbed and item.get_closest_marker("vm") is None:
            raise pytest.UsageError(
                f"{item.nodeid} uses the test bed: mark it with @pytest.mark.vm"
            )
    # Tests that restart libvirtd (switching QEMU's TLS on in the global qemu.conf, or
    # losing the connection on purpose) run last, so that no other test's domain starts
    # or its connection breaks meanwhile.
    items.sort(key=lambda item: any(
        item.get_closest_marker(name) is not None for name in ("qemu_tls", "libvirtd_restart")
    ))


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    """The test bed, brought up once per session; its domains are removed after."""
    try:
        bed = Testbed()
    except TestbedError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the test bed is required when CI is set: {exc}", pytrace=False)
        pytest.skip(f"no test bed here ({exc})")
    yield bed
    bed.close()


@pytest.fixture(scope="session")
def qemu_tls(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A VNC and a SPICE guest whose servers use TLS (tests/qemutls.py), started once per
    session in one short window of TLS in qemu.conf; tests using it are marked
    ``qemu_tls``."""
    from certs import make_certificates
    from qemutls import start_tls_guests

    directory = tmp_path_factory.mktemp("qemu-tls")
    directory.chmod(0o755)
    guests = start_tls_guests(testbed, make_certificates(directory, client=True))
    try:
        yield guests
    finally:
        testbed.remove(guests.vnc)
        testbed.remove(guests.spice)


@pytest.fixture(scope="session")
def remote_viewer() -> str:
    """remote-viewer (Debian virt-viewer) and Xvfb for a native SPICE client; like the test
    bed, missing ones skip on a developer machine and fail when ``CI`` is set."""
    missing = [tool for tool in ("remote-viewer", "Xvfb") if shutil.which(tool) is None]
    if missing:
        why = f"{' and '.join(missing)} not installed (scripts/setup-host installs them)"
        if os.environ.get("CI"):
            pytest.fail(f"remote-viewer and Xvfb are required when CI is set: {why}",
                        pytrace=False)
        pytest.skip(why)
    return "remote-viewer"


@pytest.fixture(scope="module")
def example_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Install the third-party example distribution into this environment (per module)."""
    with installed(EXAMPLE, "console-broker-example-plugin", tmp_path_factory.mktemp("example")):
        yield


@pytest.fixture(scope="module")
def monitor_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Install the QEMU monitor example (examples/qemu-monitor,
    console-broker-qemu-monitor) into this environment (per module): the tests' ``python
    -m broker.cli`` and served brokers load it through its entry point, as they would any
    third-party plugin. The other modules see the built-in plugins only."""
    scratch = tmp_path_factory.mktemp("qemu-monitor")
    with installed(MONITOR_EXAMPLE, "console-broker-qemu-monitor", scratch):
        yield


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's headless Chromium driven by Selenium (one per test session).

    The flags keep Chromium from reaching for the network (this machine has
    none beyond loopback) and let it run as root.
    """
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1024,768",
    ):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    except WebDriverException as exc:
        if os.environ.get("CI"):
            pytest.fail(f"headless Chromium is required when CI is set: {exc}", pytrace=False)
        pytest.skip(f"no headless Chromium here ({exc.msg})")
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
