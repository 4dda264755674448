"""Shared data and helpers of the domain XML tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import attrs

CORPUS = Path(__file__).parent.parent / "xml_corpus"
HOSTILE = CORPUS / "hostile"
#: A small domain used throughout: VNC with a password, no serial, no SPICE.
SAMPLE = b"""<domain type='qemu'>
  <name>sample</name>
  <memory unit='KiB'>131072</memory>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <devices>
    <controller type='usb' model='piix3-uhci'/>
    <graphics type='vnc' port='5905' autoport='no' passwd='s3cret' keymap='de'>
      <listen type='address' address='0.0.0.0'/>
    </graphics>
    <video>
      <model type='vga'/>
    </video>
  </devices>
</domain>
"""


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.xml"))


def hostile_files() -> list[Path]:
    return sorted(HOSTILE.glob("*.xml"))


@attrs.frozen
class Run:
    status: int
    stdout: bytes
    stderr: str


#: ``cli(*args, stdin=b"...") -> Run``: see the ``cli`` fixture.
CliRunner = Callable[..., Run]
