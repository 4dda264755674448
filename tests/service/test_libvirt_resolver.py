"""The libvirt resolver against libvirt's own in-process test driver (``test:///default``).

No VM and no daemon: the test driver keeps domains in memory and emits
lifecycle events like the QEMU driver, so lookups, the live XML, the
metadata, refusals and stop events are exercised through real libvirt calls
and real libvirtaio events (it cannot open graphics sockets or consoles: the
real-stack tests do that).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import libvirt
import pytest

from broker.service import _refusals as R
from broker.service._libvirt import LibvirtResolver
from broker.service._plan import EndpointPlan
from broker.service._refusals import Refusal, Refused
from broker.tokens import Claims, Rights

pytestmark = pytest.mark.anyio
URI = "test:///default"
METADATA = """<metadata>
    <cb:consoles xmlns:cb='https://console-broker.dev/xmlns/consoles/1' created='metadata'>
      <cb:console protocol='vnc' mode='fd' device='graphics' device-type='vnc'/>
    </cb:consoles>
  </metadata>"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Events:
    def __init__(self) -> None:
        self.gone: list[tuple[str, str]] = []
        self.changed = anyio.Event()

    def domain_gone(self, domain_uuid: str, ending: Refusal) -> None:
        self.gone.append((domain_uuid, ending.reason))
        self.changed.set()

    def connection_lost(self) -> None:
        pass

    def connection_restored(self) -> None:
        pass


def _domain_xml(name: str, domain_uuid: str) -> str:
    return f"""<domain type='test'>
  <name>{name}</name>
  <uuid>{domain_uuid}</uuid>
  {METADATA}
  <memory unit='MiB'>128</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <graphics type='vnc'><listen type='none'/></graphics>
  </devices>
</domain>"""


def _claims(domain_uuid: str, protocol: str = "vnc") -> Claims:
    return Claims(domain_uuid, protocol, "hv1", Rights.FULL, 0, 0, 60, "jti")


@pytest.fixture
async def resolver() -> AsyncIterator[tuple[LibvirtResolver, Events]]:
    resolver, events = LibvirtResolver(URI), Events()
    async with anyio.create_task_group() as group:
        await group.start(resolver.run, events)
        yield resolver, events
        group.cancel_scope.cancel()


@pytest.fixture
def domain() -> Any:
    conn = libvirt.open(URI)
    domain_uuid = str(uuid.uuid4())
    dom = conn.defineXML(_domain_xml(f"cb-{domain_uuid[:8]}", domain_uuid))
    yield dom
    try:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    except libvirt.libvirtError:
        pass
    conn.close()


async def test_a_running_domain_resolves_to_its_recorded_console(
    resolver: tuple[LibvirtResolver, Events], domain: Any
) -> None:
    res, _ = resolver
    assert res.available and res.health() == {"uri": URI, "connected": True}
    domain.create()
    target = await res.target(_claims(domain.UUIDString()), "vnc")
    assert target.plan == EndpointPlan("fd", "vnc", index=0)
    assert target.domain_name == domain.name()
    assert await res.ending_for(domain.UUIDString()) is None


async def test_refusals(resolver: tuple[LibvirtResolver, Events], domain: Any) -> None:
    res, _ = resolver
    for claims, console, refusal in (
        (_claims(str(uuid.uuid4())), "vnc", R.UNKNOWN_DOMAIN),
        (_claims(domain.UUIDString()), "vnc", R.VM_NOT_RUNNING),
    ):
        with pytest.raises(Refused) as info:
            await res.target(claims, console)
        assert info.value.refusal is refusal
    domain.create()
    with pytest.raises(Refused, match="no serial console enabled") as info:
        await res.target(_claims(domain.UUIDString(), "serial"), "serial")
    assert info.value.refusal is R.CONSOLE_NOT_ENABLED


async def test_stop_and_undefine_events_reach_the_broker(
    resolver: tuple[LibvirtResolver, Events], domain: Any
) -> None:
    res, events = resolver
    domain.create()
    domain_uuid = domain.UUIDString()
    domain.destroy()
    with anyio.fail_after(2):
        while (domain_uuid, "vm_stopped") not in events.gone:
            events.changed = anyio.Event()
            await events.changed.wait()
    assert await res.ending_for(domain_uuid) is R.VM_STOPPED
    domain.undefine()
    with anyio.fail_after(2):
        while (domain_uuid, "domain_undefined") not in events.gone:
            events.changed = anyio.Event()
            await events.changed.wait()
    assert await res.ending_for(domain_uuid) is R.DOMAIN_UNDEFINED


async def test_an_unreachable_hypervisor_is_retried_and_refused() -> None:
    res = LibvirtResolver("test:///nonexistent/no-such-file.xml")
    async with anyio.create_task_group() as group:
        await group.start(res.run, Events())
        assert not res.available
        health = res.health()
        assert health["connected"] is False and health["error"]
        with pytest.raises(Refused) as info:
            await res.target(_claims(str(uuid.uuid4())), "vnc")
        assert info.value.refusal is R.HYPERVISOR_UNAVAILABLE
        group.cancel_scope.cancel()
