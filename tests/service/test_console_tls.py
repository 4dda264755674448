"""TLS from the broker to a console with a TLS port of its own (plan kind ``tls``):
:class:`broker.service.ConsoleTLS` and the resolver's connection, against a local TLS
server with certificates made here."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.tls import TLSListener
from certs import make_certificates

from broker.service import ConsoleTLS, Refused
from broker.service._libvirt import LibvirtResolver, Target
from broker.service._plan import EndpointPlan
from broker.service._refusals import CONSOLE_AUTH_FAILED, CONSOLE_UNREACHABLE


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _echo(stream: anyio.abc.ByteStream) -> None:
    async with stream:
        try:
            while True:
                await stream.send(await stream.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            pass


@asynccontextmanager
async def _console(paths: dict[str, Path] | None) -> AsyncIterator[int]:
    """An echo server on loopback: TLS with *paths*' server certificate, or plain."""
    listener: anyio.abc.Listener[anyio.abc.ByteStream]
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = tcp.extra(anyio.abc.SocketAttribute.local_port)
    if paths is None:
        listener = tcp
    else:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(paths["server"], paths["server-key"])
        listener = TLSListener(tcp, context, standard_compatible=False)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, _echo)
        yield port
        group.cancel_scope.cancel()


async def _open(port: int, tls: ConsoleTLS) -> anyio.abc.ByteStream:
    resolver = LibvirtResolver("test:///default")
    plan = EndpointPlan("tls", "spice", host="127.0.0.1", port=port)
    endpoint = await resolver.open(Target("uuid", "guest", plan, tls=tls))
    assert endpoint.kind == "tls" and endpoint.description == f"tls 127.0.0.1:{port}"
    return endpoint.stream


@pytest.mark.anyio
async def test_the_console_certificate_is_verified_with_its_name(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path, names=("127.0.0.1",))
    async with _console(paths) as port:
        stream = await _open(port, ConsoleTLS.from_files(str(paths["ca"])))
        async with stream:
            await stream.send(b"REDQ")
            assert await stream.receive() == b"REDQ"


@pytest.mark.anyio
async def test_a_name_other_than_the_address_is_configured(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path, names=("qemu.example",))
    async with _console(paths) as port:
        with pytest.raises(Refused, match="certificate verify failed") as info:
            await _open(port, ConsoleTLS.from_files(str(paths["ca"])))
        assert info.value.refusal is CONSOLE_AUTH_FAILED
        tls = ConsoleTLS.from_files(str(paths["ca"]), server_name="qemu.example")
        stream = await _open(port, tls)
        await stream.aclose()


@pytest.mark.anyio
async def test_a_certificate_of_another_ca_is_refused(tmp_path: Path) -> None:
    ours = make_certificates(tmp_path / "ours")
    theirs = make_certificates(tmp_path / "theirs")
    async with _console(theirs) as port:
        with pytest.raises(Refused, match=r"tls 127.0.0.1:\d+: TLS: certificate verify failed"):
            await _open(port, ConsoleTLS.from_files(str(ours["ca"])))


@pytest.mark.anyio
async def test_a_console_that_speaks_no_tls_is_unreachable(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path)

    async def plain(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            await stream.send(b"REDQ" + bytes(100))

    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = tcp.extra(anyio.abc.SocketAttribute.local_port)
    async with tcp, anyio.create_task_group() as group:
        group.start_soon(tcp.serve, plain)
        with pytest.raises(Refused) as info:
            await _open(port, ConsoleTLS.from_files(str(paths["ca"])))
        assert info.value.refusal is CONSOLE_UNREACHABLE
        group.cancel_scope.cancel()


def test_for_address_checks_the_name_only_where_there_is_one(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path)
    tls = ConsoleTLS.from_files(str(paths["ca"]))
    assert tls.for_address("127.0.0.1") == (tls.context, "127.0.0.1")
    assert tls.for_address(None) == (tls.chain_only, None)  # a socket from libvirt
    named = ConsoleTLS.from_files(str(paths["ca"]), server_name="qemu.example")
    assert named.for_address(None) == (named.context, "qemu.example")
    assert tls.context.check_hostname and not tls.chain_only.check_hostname
    with pytest.raises(OSError):
        ConsoleTLS.from_files(str(tmp_path / "missing.pem"))
