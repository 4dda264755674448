"""The systemd unit shipped in the package and ``console-broker install-service``.

systemd is not PID 1 on the development machines nor in CI, so the unit is checked
with ``systemd-analyze verify`` (which loads it as systemd would, and fails on an
``ExecStart`` that is not executable), written with this installation's script, and
its hardening is reproduced without systemd by tests/test_systemd_sandbox.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from systemd_sandbox import unit_options

from broker.config import BrokerSection, LimitsSection
from broker.service_unit import UNIT_NAME, installed_script, render_unit, unit_template

CLI = [sys.executable, "-m", "broker.cli"]


def install_service(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "install-service", *args], capture_output=True, text=True)


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        why = "systemd-analyze is not installed (Debian: systemd; scripts/setup-host)"
        if os.environ.get("CI"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return found


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """The unit as install-service writes it, with this installation's script (which
    must exist: verify fails on an ExecStart that is not executable), and with a
    configuration file; no warning either (an unknown key is only a warning)."""
    analyze = systemd_analyze()
    config = tmp_path / "broker.toml"
    config.write_text("")
    done = install_service("--unit-dir", str(tmp_path), "--config", str(config))
    assert done.returncode == 0, done.stderr
    unit = tmp_path / UNIT_NAME
    checked = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr == "", checked.stderr
    # verify does check: the same unit with a script that is not there fails.
    broken = tmp_path / "broken" / UNIT_NAME
    broken.parent.mkdir()
    broken.write_text(render_unit([str(tmp_path / "no-such-script")]))
    failed = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True)
    assert failed.returncode != 0
    assert "is not executable" in failed.stderr


def test_exec_start_is_the_installed_script() -> None:
    command = installed_script()
    assert Path(command[0]).is_absolute() and os.access(command[0], os.X_OK)
    options = unit_options(render_unit(command, Path("/etc/console-broker/broker.toml")))
    assert options["ExecStart"] == [
        " ".join([*command, "serve", "--config", "/etc/console-broker/broker.toml"])
    ]
    assert options["ExecStart"] != unit_options(unit_template())["ExecStart"]


def test_the_unit_keeps_what_the_broker_relies_on() -> None:
    options = {key: values[-1] for key, values in unit_options(unit_template()).items()}
    # READY=1, RELOADING=1, STOPPING=1 from the main process (test_reload_notify.py).
    assert options["Type"] == "notify" and options["NotifyAccess"] == "main"
    assert options["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # The supervisor passes SIGTERM on to its workers: systemd signals it alone.
    assert options["KillMode"] == "mixed"
    assert options["Restart"] == "on-failure"
    # The state directory systemd makes is the configuration's default one.
    assert Path("/var/lib", options["StateDirectory"]) == Path(BrokerSection().state_dir)
    # Two descriptors a session: the broker's own warning threshold (broker.file_limit).
    assert int(options["LimitNOFILE"]) >= 2 * LimitsSection().max_sessions + 64
    # Longer than the default grace, or systemd would cut the drain short.
    assert float(options["TimeoutStopSec"]) > LimitsSection().shutdown_grace
    for key, value in {
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "NoNewPrivileges": "yes", "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    }.items():
        assert options[key] == value, key


def test_install_service_writes_once_and_refuses_a_changed_unit(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "broker.toml"
    done = install_service("--unit-dir", str(tmp_path), "--config", str(config))
    assert done.returncode == 0, done.stderr
    unit = tmp_path / UNIT_NAME
    lines = done.stdout.splitlines()
    assert lines[0] == f"written: {unit}"
    assert lines[1].strip().startswith(f"ExecStart={installed_script()[0]} serve --config")
    assert f"note: {config} does not exist yet" in done.stdout
    assert "  systemctl daemon-reload" in lines
    assert "  systemctl enable --now console-broker" in lines
    text = unit.read_text()
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    assert text == render_unit(installed_script(), config)
    # Again: nothing to do.
    again = install_service("--unit-dir", str(tmp_path), "--config", str(config))
    assert again.returncode == 0
    assert again.stdout.splitlines()[0] == f"unchanged: {unit}"
    assert "daemon-reload" not in again.stdout
    # Edited by hand: kept, unless --force.
    unit.write_text(text.replace("RestartSec=2s", "RestartSec=9s"))
    refused = install_service("--unit-dir", str(tmp_path), "--config", str(config))
    assert refused.returncode == 1
    assert f"{unit} exists and differs" in refused.stderr
    assert "--force" in refused.stderr
    assert "RestartSec=9s" in unit.read_text()
    forced = install_service("--unit-dir", str(tmp_path), "--config", str(config), "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.startswith(f"replaced: {unit}")
    assert unit.read_text() == text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_dry_run_and_errors(tmp_path: Path) -> None:
    dry = install_service("--unit-dir", str(tmp_path), "--dry-run")
    assert dry.returncode == 0
    assert dry.stdout == render_unit(installed_script())
    assert list(tmp_path.iterdir()) == []
    missing = install_service("--unit-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 1
    assert missing.stderr == (
        f"console-broker: error: {tmp_path / 'nowhere'}: no such directory "
        "(is systemd installed?)\n"
    )
    quoted = install_service("--unit-dir", str(tmp_path), "--config", "/etc/a'b.toml")
    assert quoted.returncode == 1
    assert "cannot go into the unit's ExecStart" in quoted.stderr
    spaced = render_unit(["/opt/console broker/bin/console-broker"], Path("/etc/50%.toml"))
    assert 'ExecStart="/opt/console broker/bin/console-broker" serve --config /etc/50%%.toml' in (
        spaced.splitlines()
    )


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_console_lines_to_the_journal_leave_the_time_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """systemd sets $JOURNAL_STREAM to the device and inode of the journal's stream: a
    console line written there has no timestamp of its own (journald adds one); a JSON
    line keeps its field, and a console line elsewhere its time."""
    import json
    import logging

    import structlog

    from broker.service._logging import configure_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    lines = {}
    try:
        for where in ("journal", "file"):
            path = tmp_path / f"{where}.log"
            with path.open("w") as stream:
                found = os.fstat(stream.fileno())
                stream_id = f"{found.st_dev}:{found.st_ino}" if where == "journal" else "1:2"
                monkeypatch.setenv("JOURNAL_STREAM", stream_id)
                configure_logging(fmt, "info", stream=stream)
                structlog.get_logger("broker.service").info("broker.reloaded", changed=[])
            lines[where] = path.read_text().strip()
    finally:
        structlog.reset_defaults()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
    if fmt == "json":
        assert all("timestamp" in json.loads(line) for line in lines.values())
    else:
        assert lines["journal"].startswith("[info     ] broker.reloaded"), lines
        assert lines["file"][:4].isdigit() and "broker.reloaded" in lines["file"], lines


def test_a_broker_that_cannot_listen_says_so_in_one_line(tmp_path: Path) -> None:
    """What the journal shows when the service cannot start on its port (systemd then
    restarts it, Restart=on-failure): the reason, not a traceback."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "broker.toml"
        config.write_text(f'[broker]\nstate_dir = "state"\n[listen]\nport = {port}\n'
                          '[libvirt]\nuri = "test:///default"\n')
        done = subprocess.run([*CLI, "serve", "--config", str(config)], capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 1
    last = done.stderr.splitlines()[-1]
    assert last == (
        f"console-broker: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "Traceback" not in done.stderr
