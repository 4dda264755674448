"""The shipped unit's restrictions, reproduced without systemd (which is not PID 1 on the
development machines nor in CI), to run ``console-broker serve`` under them.

:class:`Sandbox` reads the options from the unit file (``broker/data/console-broker.service``,
so the tests follow the unit) and builds a command line that applies them one by one:

* ``unshare --mount --propagation private``: a mount namespace of the command's own, no
  fork (the broker is the process the test started and signals).
* ``PrivateTmp=yes``: a new, empty tmpfs on ``/tmp`` and on ``/var/tmp``. The test's
  directory (under ``/tmp``) is bind-mounted into it at the same path, standing in for
  ``/etc/console-broker`` (the configuration, keys, certificates): read-only.
* ``ProtectHome=yes``: ``/home``, ``/root`` and ``/run/user`` (where they exist) hidden
  under an empty, read-only tmpfs of mode 000. One deviation: a Python installation
  under a home directory (this project's machines have pyenv's under ``/root``; the
  test environments' interpreters link to it) is bind-mounted back, read-only, on a
  traversable tmpfs, as ``ProtectHome=tmpfs`` with ``BindReadOnlyPaths=`` would.
  ``install-service`` warns about such an installation: with the unit as shipped, the
  service would not start. Likewise the checkout, the test environment and the
  pages' browser clients, when they lie under ``/tmp`` (a CI clone may), are bound into
  the private ``/tmp`` at their paths, read-only.
* ``ProtectSystem=strict``: every mount remounted read-only (``/proc``, ``/sys`` and
  ``/dev`` excepted, as systemd does), then ``ReadWritePaths`` made writable again:
  ``StateDirectory=`` and ``RuntimeDirectory=`` are, for the test, directories the
  caller names (the broker's ``broker.state_dir`` in the test's configuration, standing
  in for ``/var/lib/console-broker``, which is not created on the test machine), and the
  private ``/tmp`` and ``/var/tmp``.
* ``ProtectKernelTunables=yes`` and ``ProtectControlGroups=yes``: ``/proc/sys`` and every
  mount under ``/sys`` (the control groups included) read-only.
* ``UMask=``: the shell's umask.
* ``LimitNOFILE=``: ``prlimit --nofile``, at most the test process's hard limit (raising
  it needs ``CAP_SYS_RESOURCE``, which PID 1 has and a container's root may lack).
* ``NoNewPrivileges=yes``: ``setpriv --no-new-privs``.
* ``CapabilityBoundingSet=``: ``setpriv --bounding-set`` (and the inheritable and ambient
  sets cleared): the broker runs as root with no capability but those listed.

Not reproduced (each needs systemd, seccomp or a namespace the broker's test would not
be helped by): ``PrivateDevices=`` (a /dev of its own), ``ProtectKernelModules=``,
``ProtectKernelLogs=``, ``ProtectClock=``, ``ProtectHostname=``,
``RestrictAddressFamilies=``, ``RestrictNamespaces=``, ``RestrictRealtime=``,
``RestrictSUIDSGID=``, ``LockPersonality=``, ``SystemCallArchitectures=``,
``SystemCallFilter=`` (all seccomp filters or capability drops on top of the above),
``Restart=``, ``KillMode=``, ``TimeoutStopSec=`` (the service manager's own behaviour)
and the journal (the broker's standard error goes to the test's log file instead).
``systemd-analyze verify`` checks that systemd accepts all of them
(tests/test_systemd_unit.py).
"""

from __future__ import annotations

import resource
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from broker.service_unit import unit_template

#: What ProtectHome=yes hides (systemd.exec(5)).
HOMES = ("/home", "/root", "/run/user")
#: Mounts that ProtectSystem=strict leaves as they are (systemd.exec(5)).
API_FILE_SYSTEMS = ("/proc", "/sys", "/dev")


def unit_options(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit (all sections), each key's values in order."""
    options: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        options.setdefault(key.strip(), []).append(value.strip())
    return options


def _capabilities(value: str) -> str:
    """``CapabilityBoundingSet=CAP_A CAP_B`` as setpriv's ``-all,+a,+b``."""
    names = [name.lower().removeprefix("cap_") for name in value.split()]
    return ",".join(["-all", *(f"+{name}" for name in names)])


class Sandbox:
    """The unit's restrictions around a command (see the module's notes).

    *directory*: the test's files (configuration, keys, certificates), under ``/tmp``,
    visible read-only inside; *writable*: the directories standing in for the unit's
    ``StateDirectory=`` and ``RuntimeDirectory=`` (inside *directory* or not), writable;
    *needed*: what the broker reads besides (its script, the pages' browser clients),
    visible read-only inside even where it lies under ``/tmp`` or a home directory.
    """

    def __init__(
        self,
        directory: Path,
        writable: Sequence[Path],
        needed: Sequence[Path] = (),
        unit: str | None = None,
    ) -> None:
        self.options = {
            key: values[-1]
            for key, values in unit_options(unit if unit is not None else unit_template()).items()
        }
        self.directory = directory.resolve()
        self.writable = [path.resolve() for path in writable]
        # What the broker needs that PrivateTmp= or ProtectHome= would hide: the Python
        # installation it runs on (pyenv's under /root here), a checkout or virtual
        # environment under /tmp (CI's clone may be there), *needed*. Outermost only.
        wanted = {Path(sys.base_prefix), Path(sys.prefix), *needed}
        candidates = sorted({path.resolve() for path in wanted}, key=lambda p: len(p.parts))
        outermost: list[Path] = []
        for path in candidates:
            if not any(path.is_relative_to(seen) for seen in outermost):
                outermost.append(path)
        #: Under /tmp: bound into the private /tmp at the same path.
        self.in_tmp = [path for path in outermost if path.is_relative_to("/tmp")
                       and not path.is_relative_to(directory.resolve())]
        #: Under a home directory: bound back onto the home's empty tmpfs.
        self.exposed = [path for path in outermost
                        if any(path.is_relative_to(home) for home in HOMES)]
        assert self.directory.is_relative_to("/tmp"), "the test's directory is under /tmp"
        # What is reproduced (an option the unit dropped is not applied here either).
        assert self.options.get("ProtectSystem") == "strict"
        assert self.options.get("StateDirectory")

    def script(self) -> str:
        """The shell script run in the new mount namespace; it ends by executing its
        arguments."""
        o = self.options
        q = shlex.quote
        lines = ["set -eu"]
        if o.get("PrivateTmp") == "yes":
            # A new /tmp holding, at the same path, the test's directory: made in a
            # staging tmpfs, then moved over /tmp.
            stage = self.directory / ".private-tmp"

            def staged(path: Path) -> str:  # where *path* is in the new /tmp, before the move
                return q(str(stage / path.relative_to("/tmp")))

            lines += [
                f"mkdir -p {q(str(stage))}",
                f"mount -t tmpfs -o mode=1777 private-tmp {q(str(stage))}",
                f"mkdir -p {staged(self.directory)}",
                f"mount --bind {q(str(self.directory))} {staged(self.directory)}",
            ]
            for path in self.writable:
                if path.is_relative_to(self.directory):
                    lines += [f"mkdir -p {q(str(path))}",
                              f"mount --bind {q(str(path))} {staged(path)}"]
            for path in self.in_tmp:
                lines += [f"mkdir -p {staged(path)}",
                          f"mount --bind {q(str(path))} {staged(path)}"]
            lines += [
                f"mount --move {q(str(stage))} /tmp",
                "mount -t tmpfs -o mode=1777 private-var-tmp /var/tmp",
            ]
        if o.get("ProtectHome") in ("yes", "true"):
            # The paths to keep are bind-mounted aside first (under the private /tmp),
            # then back onto the empty tmpfs, which is then traversable (0111).
            for number, path in enumerate(self.exposed):
                lines += [f"mkdir -p /tmp/.exposed/{number}",
                          f"mount --bind {q(str(path))} /tmp/.exposed/{number}"]
            for home in HOMES:
                hidden = [path for path in self.exposed if path.is_relative_to(home)]
                mode = "0111" if hidden else "000"  # traversable, never listed
                lines.append(f"if [ -d {home} ]; then "
                             f"mount -t tmpfs -o mode={mode} protect-home {home}; fi")
                for path in hidden:
                    number = self.exposed.index(path)
                    lines += [f"mkdir -p {q(str(path))}",
                              f"mount --move /tmp/.exposed/{number} {q(str(path))}"]
        writable = [str(path) for path in self.writable if not path.is_relative_to("/tmp")]
        for path in writable:  # a mount of its own, to be made writable again below
            lines.append(f"mount --bind {q(path)} {q(path)}")
        # ProtectSystem=strict: every mount but the API file systems read-only.
        api = "|".join(f"{fs}|{fs}/*" for fs in API_FILE_SYSTEMS)
        lines += [
            "for mp in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do",
            f'  case "$mp" in {api}) continue ;; esac',
            '  mount -o remount,bind,ro "$mp"',
            "done",
        ]
        if o.get("ProtectKernelTunables") == "yes" or o.get("ProtectControlGroups") == "yes":
            lines += [
                "mount --bind /proc/sys /proc/sys",
                "for mp in /proc/sys $(awk '{print $5}' /proc/self/mountinfo | grep '^/sys'); do",
                '  mount -o remount,bind,ro "$mp"',
                "done",
            ]
        rw = [*writable, *(str(p) for p in self.writable if p.is_relative_to("/tmp"))]
        if o.get("PrivateTmp") == "yes":
            rw += ["/tmp", "/var/tmp"]
        lines += [f"mount -o remount,bind,rw {q(path)}" for path in rw]
        if "UMask" in o:
            lines.append(f"umask {q(o['UMask'])}")
        prefix = []
        if "LimitNOFILE" in o:
            # At most this process's hard limit: raising it needs CAP_SYS_RESOURCE, which
            # systemd (PID 1) has and a test machine's root may not.
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            limit = int(o["LimitNOFILE"])
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            prefix += ["prlimit", f"--nofile={limit}:{limit}", "--"]
        setpriv = ["setpriv"]
        if o.get("NoNewPrivileges") == "yes":
            setpriv.append("--no-new-privs")
        if "CapabilityBoundingSet" in o:
            setpriv += ["--bounding-set", _capabilities(o["CapabilityBoundingSet"]),
                        "--inh-caps", "-all", "--ambient-caps", "-all"]
        prefix += [*setpriv, "--"]
        lines.append(f'exec {" ".join(q(part) for part in prefix)} "$@"')
        return "\n".join(lines)

    def command(self, argv: Sequence[str] = ()) -> list[str]:
        """The command line running *argv* (more arguments may follow) in the sandbox."""
        return ["unshare", "--mount", "--propagation", "private", "--",
                "sh", "-c", self.script(), "sandbox", *argv]
